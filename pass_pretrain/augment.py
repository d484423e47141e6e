"""PASS multi-crop augmentation with part bands (PASS ``main_pass.py`` ``DataAugmentationDINO``) and the crop layout
shared by the model routing (PASS ``utils.py`` ``MultiCropWrapper``) and the loss (PASS ``main_pass.py``
``DINOLoss``).

A person image yields, in this fixed order (:class:`CropLayout`)::

    [g1, g2, b1a, b1b, b1c, b2a, b2b, b2c, b3a, b3b, b3c]

two global views at 256×128 and, for each of three overlapping horizontal bands (height int(0.5·H), tops 0,
int(0.25·H), int(0.5·H)), ``local_per_band`` crops at 128×64. The layout object is the single source of truth for
which view belongs to which group: :class:`pass_pretrain.heads.PASSMultiCrop` and :class:`pass_pretrain.loss.PASSLoss`
validate their inputs against it, so changing the number of local crops per band cannot silently mis-route views
(PASS itself hard-codes 9 local crops, PASS ``utils.py`` ``MultiCropWrapper``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from partreid.common.errors import InputError
from partreid.common.data.images import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class CropLayout:
    """Order and grouping of the multi-crop views (PASS ``main_pass.py`` ``DataAugmentationDINO`` "Crop list order",
    PASS ``utils.py`` ``MultiCropWrapper``).

    Views are ``n_global`` global views followed by ``n_bands`` groups of ``local_per_band`` local crops,
    band by band. Band indices are 0-based (band k is routed through [PART_{k+1}]).

    Attributes:
        n_global: number of global views (2 in PASS: g1 with blur p=1, g2 with blur p=0.1 + solarize p=0.2).
        n_bands: number of part bands = number of [PART] tokens P (3).
        local_per_band: local crops per band (3 → 9 local views).
    """

    n_global: int = 2
    n_bands: int = 3
    local_per_band: int = 3

    def __post_init__(self) -> None:
        if self.n_global < 1 or self.n_bands < 1 or self.local_per_band < 0:
            raise InputError(f"bad crop layout: {self.n_global} global views, {self.n_bands} bands, "
                             f"{self.local_per_band} local crops per band")

    @property
    def n_local(self) -> int:
        """Total number of local views."""
        return self.n_bands * self.local_per_band

    @property
    def n_views(self) -> int:
        """Total number of views per image."""
        return self.n_global + self.n_local

    @property
    def global_indices(self) -> List[int]:
        """View indices of the global views (0 … n_global−1)."""
        return list(range(self.n_global))

    def band_indices(self, band: int) -> List[int]:
        """View indices of the local crops of ``band`` (0-based)."""
        if not 0 <= band < self.n_bands:
            raise InputError(f"band {band} out of range 0..{self.n_bands - 1}")
        start = self.n_global + band * self.local_per_band
        return list(range(start, start + self.local_per_band))

    def view_group(self, view: int) -> Tuple[str, Optional[int]]:
        """``('global', None)`` or ``('local', band)`` for view index ``view``."""
        if not 0 <= view < self.n_views:
            raise InputError(f"view {view} out of range 0..{self.n_views - 1}")
        if view < self.n_global:
            return "global", None
        return "local", (view - self.n_global) // self.local_per_band

    @property
    def groups(self) -> List[Tuple[str, Optional[int]]]:
        """``view_group`` of every view, in crop order."""
        return [self.view_group(v) for v in range(self.n_views)]

    def part_views(self, band: int) -> List[int]:
        """Student views whose PART_{band+1} output enters the loss: the globals then the band's local crops."""
        return self.global_indices + self.band_indices(band)

    @property
    def n_cls_terms(self) -> int:
        """CLS cross-entropy terms: each teacher global vs every other student view (2×10 = 20, PASS ``main_pass.py``
        ``DINOLoss``)."""
        return self.n_global * (self.n_views - 1)

    @property
    def n_part_terms(self) -> int:
        """PART terms over all bands: per band n_global × (n_global + local_per_band − 1) (3×2×4 = 24, PASS
        ``main_pass.py`` ``DINOLoss``)."""
        return self.n_bands * self.n_global * (self.n_global + self.local_per_band - 1)

    @property
    def n_terms(self) -> int:
        """All loss terms (44 for the PASS layout); the loss is their uniform mean."""
        return self.n_cls_terms + self.n_part_terms

    def check_views(self, views: Sequence[torch.Tensor], teacher: bool = False) -> None:
        """Validate a list of view batches against the layout.

        Args:
            views: list of (B, 3, h, w) tensors, in crop order; ``n_global`` of them when ``teacher``.
            teacher: the teacher sees only the global views.

        Raises:
            InputError: wrong number of views, differing batch sizes, or a group whose views differ in size.
        """
        expected = self.n_global if teacher else self.n_views
        if len(views) != expected:
            raise InputError(f"got {len(views)} views, the crop layout ({self.n_global} global + "
                             f"{self.n_bands}x{self.local_per_band} local) needs {expected}")
        batch = {int(v.shape[0]) for v in views}
        if len(batch) != 1:
            raise InputError(f"views have differing batch sizes {sorted(batch)}")
        groups = [self.global_indices] + ([] if teacher else [self.band_indices(b) for b in range(self.n_bands)])
        for idx in groups:
            shapes = {tuple(views[i].shape[1:]) for i in idx}
            if len(shapes) > 1:
                raise InputError(f"views {idx} of one group differ in size: {sorted(shapes)}")


class RandomPILGaussianBlur:
    """Gaussian blur with probability ``p`` and radius uniform in [radius_min, radius_max] (PIL
    ``ImageFilter.GaussianBlur``; PASS ``utils.py`` ``GaussianBlur``, radius 0.1–2.0). Draws from torch's global RNG
    so that seeding torch makes the whole augmentation reproducible."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.radius_min, self.radius_max = float(p), float(radius_min), float(radius_max)

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.p < 1.0 and torch.rand(()).item() >= self.p:
            return img
        radius = self.radius_min + (self.radius_max - self.radius_min) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, radius=[{self.radius_min}, {self.radius_max}])"


def band_boxes(height: int, width: int, n_bands: int = 3, band_frac: float = 0.5) -> List[Tuple[int, int, int, int]]:
    """PIL crop boxes (left, top, right, bottom) of the overlapping horizontal part bands (PASS ``main_pass.py``
    ``DataAugmentationDINO``).

    Each band has height int(band_frac·H) and full width; tops are evenly spaced from 0 to H − band height, i.e.
    int(k·0.25·H) for k = 0, 1, 2 with the PASS values (rows [0, .5H), [.25H, .75H), [.5H, H)).
    """
    band_h = int(band_frac * height)
    if band_h < 1:
        raise InputError(f"image of height {height} is too small for part bands")
    step = (1.0 - band_frac) / (n_bands - 1) if n_bands > 1 else 0.0
    boxes = []
    for k in range(n_bands):
        top = int(k * step * height)
        boxes.append((0, top, width, top + band_h))
    return boxes


class PassMultiCropAugment:
    """Multi-crop band augmentation of PASS (PASS ``main_pass.py`` ``DataAugmentationDINO``).

    Call it on a PIL RGB image; it returns ``layout.n_views`` float32 tensors (3, h, w), ImageNet-normalised, in
    the order of :class:`CropLayout`: 2 global views (``global_size``, RandomResizedCrop scale ``global_scale``)
    then ``local_per_band`` crops (``local_size``, scale ``local_scale`` *of the band*) for each band.

    Shared colour pipeline: horizontal flip p=0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale p=0.2.
    Global 1: blur p=1.0. Global 2: blur p=0.1 then solarize (threshold 128) p=0.2. Local: blur p=0.5.
    RandomResizedCrop uses bicubic interpolation and torchvision's default ratio (3/4, 4/3).

    All randomness comes from torch's global RNG (torchvision transforms and :class:`RandomPILGaussianBlur`), so
    ``torch.manual_seed`` before the call reproduces the views exactly.
    """

    def __init__(self, global_size: Tuple[int, int] = (256, 128), local_size: Tuple[int, int] = (128, 64),
                 global_scale: Tuple[float, float] = (0.4, 1.0), local_scale: Tuple[float, float] = (0.1, 0.8),
                 local_per_band: int = 3, n_bands: int = 3, band_frac: float = 0.5,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.layout = CropLayout(n_global=2, n_bands=n_bands, local_per_band=local_per_band)
        self.band_frac = float(band_frac)
        bicubic = T.InterpolationMode.BICUBIC
        flip_color = T.Compose([
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ])
        normalize = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
        self.global1 = T.Compose([
            T.RandomResizedCrop(tuple(global_size), scale=tuple(global_scale), interpolation=bicubic),
            flip_color, RandomPILGaussianBlur(1.0), normalize])
        self.global2 = T.Compose([
            T.RandomResizedCrop(tuple(global_size), scale=tuple(global_scale), interpolation=bicubic),
            flip_color, RandomPILGaussianBlur(0.1), T.RandomSolarize(threshold=128, p=0.2), normalize])
        self.local = T.Compose([
            T.RandomResizedCrop(tuple(local_size), scale=tuple(local_scale), interpolation=bicubic),
            flip_color, RandomPILGaussianBlur(0.5), normalize])

    def __call__(self, img: Image.Image) -> List[torch.Tensor]:
        """PIL image (any size, RGB) → list of ``layout.n_views`` tensors (3, h, w) in crop order."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        views = [self.global1(img), self.global2(img)]
        for box in band_boxes(img.height, img.width, self.layout.n_bands, self.band_frac):
            band = img.crop(box)
            views.extend(self.local(band) for _ in range(self.layout.local_per_band))
        return views


def seeded_call(fn: Callable[[Image.Image], List[torch.Tensor]], img: Image.Image, seed: int) -> List[torch.Tensor]:
    """Run ``fn(img)`` with torch's CPU RNG seeded to ``seed``, restoring the caller's RNG state afterwards, so
    the augmentation of an item depends only on its seed and never disturbs the training RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))  # CPU generator only: CUDA RNG is left untouched
        return fn(img)
