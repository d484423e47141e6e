"""PASS multi-crop augmentation with part bands (``DataAugmentationDINO`` in PASS ``main_pass.py``), in two
implementations, and the crop layout shared by the model routing and the loss.

A person image yields, in this fixed order (:class:`CropLayout`)::

    [g1, g2, b1a, b1b, b1c, b2a, b2b, b2c, b3a, b3b, b3c]

two global views at 256×128 and, for each of three overlapping horizontal bands (height int(0.5·H), tops 0,
int(0.25·H), int(0.5·H)), ``local_per_band`` crops at 128×64. The layout object is the single source of truth for
which view belongs to which group: :class:`pass_pretrain.heads.PASSMultiCrop` and :class:`pass_pretrain.loss.PASSLoss`
validate their inputs against it, so changing the number of local crops per band cannot silently mis-route views
(PASS itself hard-codes 9 local crops, ``MultiCropWrapper`` in PASS ``utils.py``).

Two implementations of the same random views:

* :class:`PassMultiCropAugment` (``--augment-on cpu``): the PASS recipe with PIL and torchvision transforms,
  one image at a time in DataLoader workers (about 13 ms of CPU per image).
* :class:`DeviceMultiCrop` (``--augment-on device``): workers only decode (:class:`BoundedDecoder`, JPEG DCT
  scaling) and hand uint8 arrays on; every random crop, resize, flip, colour jitter, grayscale, blur and
  solarize then runs batched on the training device with per-sample random parameters drawn from the same
  distributions (:func:`sample_crop_boxes`, :func:`sample_color_params`). Crops are resampled with
  ``torchvision.ops.roi_align`` (bilinear, averaging ⌈box/output⌉² samples per output pixel when shrinking,
  i.e. antialiased) where PIL uses bicubic; the band geometry is that of :func:`band_boxes`. On a GPU these are
  batched torch operations; on the CPU the same views come from three compiled passes
  (:mod:`partreid.pass_pretrain.augment_cpu`), because there each torch operation is a pass over memory.
  Why not ``kornia.augmentation``: its crop boxes are drawn relative to the tensor, which a batch padded from
  images of different sizes cannot use (PASS draws them in each image's own pixels), and on the same recipe it
  ran at 77 images per CPU-second against 86 for these torch operations and 666 for the compiled CPU kernels
  (``benchmarks/bench_augment.py`` with kornia installed); it would also be a new dependency.

Both read their constants from :data:`RECIPE`.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from partreid.common.data.base import ReIDDataset
from partreid.common.data.decode import decode_bounded
from partreid.common.data.images import IMAGENET_MEAN, IMAGENET_STD
from partreid.common.errors import InputError
from partreid.pass_pretrain import augment_cpu


@dataclass(frozen=True)
class AugmentRecipe:
    """Constants of the PASS multi-crop recipe (``DataAugmentationDINO`` in PASS ``main_pass.py``; blur and
    solarize in PASS ``utils.py``), shared by the PIL and the device implementations.

    Attributes:
        ratio: RandomResizedCrop aspect-ratio range w/h (torchvision's default).
        flip_p: horizontal flip probability.
        jitter: ColorJitter (brightness, contrast, saturation, hue) strengths.
        jitter_p: probability of applying the jitter.
        gray_p: RandomGrayscale probability.
        blur_radius: Gaussian blur radius (PIL ``GaussianBlur``: the standard deviation, pixels) range.
        blur_p: blur probability of global view 1, global view 2, local views.
        solarize_p: solarize probability of global view 2 (the other views are never solarized).
        solarize_threshold: pixels >= this (0-255 scale) are inverted (PIL ``ImageOps.solarize`` default).
    """

    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    jitter: Tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_radius: Tuple[float, float] = (0.1, 2.0)
    blur_p: Tuple[float, float, float] = (1.0, 0.1, 0.5)
    solarize_p: float = 0.2
    solarize_threshold: int = 128


#: The PASS recipe.
RECIPE = AugmentRecipe()


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
        r = RECIPE
        bicubic = T.InterpolationMode.BICUBIC
        b, c, s, h = r.jitter
        flip_color = T.Compose([
            T.RandomHorizontalFlip(p=r.flip_p),
            T.RandomApply([T.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)], p=r.jitter_p),
            T.RandomGrayscale(p=r.gray_p),
        ])
        normalize = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
        blur1, blur2, blur_local = (RandomPILGaussianBlur(p, *r.blur_radius) for p in r.blur_p)
        self.global1 = T.Compose([
            T.RandomResizedCrop(tuple(global_size), scale=tuple(global_scale), ratio=r.ratio, interpolation=bicubic),
            flip_color, blur1, normalize])
        self.global2 = T.Compose([
            T.RandomResizedCrop(tuple(global_size), scale=tuple(global_scale), ratio=r.ratio, interpolation=bicubic),
            flip_color, blur2, T.RandomSolarize(threshold=r.solarize_threshold, p=r.solarize_p), normalize])
        self.local = T.Compose([
            T.RandomResizedCrop(tuple(local_size), scale=tuple(local_scale), ratio=r.ratio, interpolation=bicubic),
            flip_color, blur_local, normalize])

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


# ============================================================================================ device-side path

#: Default bound on the height of decoded images handed to the device path (pixels). A local crop covers at
#: least sqrt(0.1)·0.5 ≈ 16% of the image height and is resized to 128 rows, so a 512-row bound keeps full
#: detail for local crops of images up to ~810 rows and for every global crop (LUPerson crops are far smaller).
DEFAULT_MAX_HEIGHT = 512


class BoundedDecoder:
    """Worker-side opener for :meth:`partreid.common.data.images.ImageDataset.with_opener`: decode only.

    ``decoder(ds, path)`` → ``(array H'×W'×3 uint8, (H, W))``: the image decoded to at most ``max_height`` rows
    and its full-resolution size, which the device path needs to draw crop boxes exactly as the PIL path does on
    the full image. JPEGs are decoded with ``torchvision.io.decode_jpeg`` (libjpeg-turbo; measured 1.4–2× less
    CPU than Pillow, ``benchmarks/bench_augment.py``); a JPEG taller than the bound, another format, or bytes
    that torchvision rejects go through :func:`partreid.common.data.decode.decode_bounded` (Pillow, with JPEG
    DCT scaling), which also gives the error message for a corrupt file.
    """

    def __init__(self, max_height: int = DEFAULT_MAX_HEIGHT):
        self.max_height = int(max_height)

    def __call__(self, ds: ReIDDataset, rel_path: str) -> Tuple[np.ndarray, Tuple[int, int]]:
        data = ds.read_bytes(rel_path)
        if data[:3] == b"\xff\xd8\xff":
            try:
                img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            except RuntimeError:
                img = None
            if img is not None and (self.max_height <= 0 or img.shape[1] <= self.max_height):
                return img.permute(1, 2, 0).numpy(), (int(img.shape[1]), int(img.shape[2]))
        return decode_bounded(io.BytesIO(data), ds.image_path(rel_path), self.max_height)


def pil_to_bounded(img: Image.Image, max_height: int = DEFAULT_MAX_HEIGHT) -> Tuple[np.ndarray, Tuple[int, int]]:
    """The :class:`BoundedDecoder` result for an already decoded PIL image (box-filter shrink when too tall)."""
    img = img.convert("RGB")
    w, h = img.size
    if 0 < max_height < h:
        img = img.resize((max(1, round(w * max_height / h)), max_height), Image.Resampling.BOX)
    return np.asarray(img), (h, w)


@dataclass
class UInt8Batch:
    """A batch of decoded images for :class:`DeviceMultiCrop`, padded to one canvas.

    Attributes:
        images: uint8 (B, Hc, Wc, 3); image b occupies ``[:sizes[b,0], :sizes[b,1]]``, its last row and column
            repeated over the padding (so bilinear sampling at the border never sees foreign pixels).
        sizes: int64 (B, 2), decoded (h, w) of each image.
        full_sizes: int64 (B, 2), full-resolution (H, W) of each image (crop boxes are drawn in these units).
        indices: int64 (B,), dataset rows.
    """

    images: torch.Tensor
    sizes: torch.Tensor
    full_sizes: torch.Tensor
    indices: torch.Tensor

    def pin_memory(self) -> "UInt8Batch":
        return UInt8Batch(self.images.pin_memory(), self.sizes, self.full_sizes, self.indices)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def collate_uint8(batch: Sequence[Optional[Tuple[Tuple[np.ndarray, Tuple[int, int]], int]]]) -> Optional[UInt8Batch]:
    """Collate ``ImageDataset`` items ``((array, (H, W)), row)`` (None items are dropped) into a
    :class:`UInt8Batch`; None when nothing is left."""
    items = [b for b in batch if b is not None]
    if not items:
        return None
    hc = max(a.shape[0] for (a, _), _ in items)
    wc = max(a.shape[1] for (a, _), _ in items)
    canvas = np.empty((len(items), hc, wc, 3), dtype=np.uint8)
    for k, ((a, _), _) in enumerate(items):
        h, w = a.shape[:2]
        canvas[k, :h, :w] = a
        canvas[k, h:, :w] = a[h - 1]
        canvas[k, :, w:] = canvas[k, :, w - 1:w]
    return UInt8Batch(torch.from_numpy(canvas),
                      torch.tensor([a.shape[:2] for (a, _), _ in items], dtype=torch.int64),
                      torch.tensor([hw for (_, hw), _ in items], dtype=torch.int64),
                      torch.tensor([i for _, i in items], dtype=torch.int64))


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device: torch.device, shape=()) -> torch.Tensor:
    return torch.rand((n, *shape), generator=gen, device=device) * (hi - lo) + lo


def sample_crop_boxes(heights: torch.Tensor, widths: torch.Tensor, scale: Tuple[float, float],
                      ratio: Tuple[float, float], gen: torch.Generator, attempts: int = 10) -> torch.Tensor:
    """Per-sample ``RandomResizedCrop`` boxes, drawn as ``torchvision.transforms.RandomResizedCrop.get_params``.

    For each image (height H, width W): up to ``attempts`` draws of area fraction ~ U(scale) and log aspect ratio
    ~ U(log ratio), w = round(sqrt(A·s·r)), h = round(sqrt(A·s/r)); the first draw with 0 < w ≤ W and
    0 < h ≤ H wins, placed at top ~ U{0..H−h}, left ~ U{0..W−w}; if none fits, the central crop of the
    aspect ratio clamped to ``ratio``. All draws are batched; the result has torchvision's distribution.

    Args:
        heights, widths: int64 (N,), the sizes of the regions to crop from.
        gen: generator on the device of ``heights``.

    Returns:
        int64 (N, 4) boxes (top, left, h, w) in the region's pixel units.
    """
    device = heights.device
    n = heights.shape[0]
    H = heights.to(torch.float64).unsqueeze(1)
    W = widths.to(torch.float64).unsqueeze(1)
    area = H * W
    s = _uniform(n, scale[0], scale[1], gen, device, (attempts,)).to(torch.float64)
    logr = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), gen, device, (attempts,)).to(torch.float64)
    r = torch.exp(logr)
    w = torch.round(torch.sqrt(area * s * r))
    h = torch.round(torch.sqrt(area * s / r))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)
    found = ok.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    H, W = H.squeeze(1), W.squeeze(1)
    u = torch.rand((n, 2), generator=gen, device=device, dtype=torch.float64)
    top = torch.floor(u[:, 0] * (H - h + 1)).clamp_max(H - h)
    left = torch.floor(u[:, 1] * (W - w + 1)).clamp_max(W - w)
    # fallback: central crop, aspect ratio clamped to the range
    in_ratio = W / H
    fw = torch.where(in_ratio < ratio[0], W, torch.where(in_ratio > ratio[1], torch.round(H * ratio[1]), W))
    fh = torch.where(in_ratio < ratio[0], torch.round(W / ratio[0]), H)
    ftop = torch.div(H - fh, 2, rounding_mode="floor")
    fleft = torch.div(W - fw, 2, rounding_mode="floor")
    out = torch.stack([torch.where(found, top, ftop), torch.where(found, left, fleft),
                       torch.where(found, h, fh), torch.where(found, w, fw)], dim=1)
    return out.to(torch.int64)


def sample_color_params(n: int, gen: torch.Generator, device: torch.device, blur_p: torch.Tensor,
                        solarize_p: torch.Tensor, recipe: AugmentRecipe = RECIPE) -> Dict[str, torch.Tensor]:
    """Per-sample parameters of flip, colour jitter, grayscale, blur and solarize (as the PIL path draws them:
    ``RandomHorizontalFlip``, ``RandomApply(ColorJitter)`` with ``ColorJitter.get_params`` — a random order of
    the four adjustments and a factor for each, ``RandomGrayscale``, :class:`RandomPILGaussianBlur`,
    ``RandomSolarize``).

    Args:
        n: number of views.
        blur_p, solarize_p: float (n,) per-view probabilities (they differ between g1, g2 and local views).

    Returns:
        dict of (n,) tensors: ``flip``, ``jitter``, ``gray``, ``blur``, ``solarize`` (bool), ``brightness``,
        ``contrast``, ``saturation`` (factors around 1), ``hue`` (shift in turns), ``sigma`` (blur radius, px),
        and ``order`` int64 (n, 4): the adjustments in application order (0 brightness, 1 contrast,
        2 saturation, 3 hue).
    """
    b, c, s, h = recipe.jitter
    u = torch.rand((n, 4), generator=gen, device=device)
    return {
        "flip": u[:, 0] < recipe.flip_p,
        "jitter": u[:, 1] < recipe.jitter_p,
        "gray": u[:, 2] < recipe.gray_p,
        "blur": u[:, 3] < blur_p,
        "solarize": torch.rand(n, generator=gen, device=device) < solarize_p,
        "brightness": _uniform(n, max(0.0, 1 - b), 1 + b, gen, device),
        "contrast": _uniform(n, max(0.0, 1 - c), 1 + c, gen, device),
        "saturation": _uniform(n, max(0.0, 1 - s), 1 + s, gen, device),
        "hue": _uniform(n, -h, h, gen, device),
        "sigma": _uniform(n, recipe.blur_radius[0], recipe.blur_radius[1], gen, device),
        "order": torch.argsort(torch.rand((n, 4), generator=gen, device=device), dim=1),
    }


_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale


def hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shift the HSV hue of (n, 3, h, w) floats in [0, 1] by ``shift`` (n,) turns, as torchvision's
    ``adjust_hue`` on tensors (which follows Pillow's RGB↔HSV conversion, ``libImaging/Convert.c``).

    HSV → RGB uses the sector-free form: channel c = v·(1 − s·clip(min(k, 4 − k), 0, 1)) with
    k = (n_c + 6·hue) mod 6 and n = (5, 3, 1) for (r, g, b)."""
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    span = maxc - minc
    inv = torch.where(span > 0, 1.0 / span.clamp(min=1e-12), torch.zeros_like(span))
    # hue·6 in [−1, 5): r max → (g − b)/span, g max → 2 + (b − r)/span, b max → 4 + (r − g)/span
    h6 = torch.where(maxc == r, (g - b) * inv, torch.where(maxc == g, (b - r) * inv + 2.0, (r - g) * inv + 4.0))
    h6.add_(6.0 * shift.view(-1, 1, 1))
    vs = span  # v·s = max − min
    k = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + h6.unsqueeze(1)
    k = torch.remainder(k, 6.0)
    k = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return maxc.unsqueeze(1) - vs.unsqueeze(1) * k


def jitter_affine(params: Dict[str, torch.Tensor], mean_rgb: torch.Tensor,
                  after_hue: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The brightness, contrast and saturation adjustments that come before (``after_hue`` False) or after
    (True) each sample's hue adjustment in its random order, composed into one affine colour map per sample;
    with ``after_hue`` the grayscale step is appended.

    Each of these adjustments is affine in RGB: brightness ``f·x``; saturation ``f·x + (1−f)·gray(x)``;
    contrast ``f·x + (1−f)·mean gray of the image``, where the mean of an affine image is the same map of the
    mean colour ``mean_rgb`` (n, 3); grayscale ``gray(x)`` on all three channels. Samples without jitter get
    the identity (then grayscale).

    Returns:
        (A float32 (n, 3, 3), b float32 (n, 3)): a pixel becomes ``A @ rgb + b``.
    """
    n = mean_rgb.shape[0]
    dev = mean_rgb.device
    eye = torch.eye(3, device=dev).expand(n, 3, 3)
    g = torch.tensor(_GRAY, device=dev)
    gray_m = g.view(1, 1, 3).expand(n, 3, 3)  # every output channel = luma
    A = eye.clone()
    b = torch.zeros(n, 3, device=dev)
    order = params["order"]
    hue_pos = torch.argmax((order == 3).to(torch.int8), dim=1)
    for pos in range(4):
        side = (pos > hue_pos) if after_hue else (pos < hue_pos)
        op = torch.where(params["jitter"] & side, order[:, pos], torch.full_like(order[:, pos], -1))
        f = params["brightness"].view(n, 1, 1)
        M = torch.where((op == 0).view(n, 1, 1), f * eye, eye)
        fc = params["contrast"].view(n, 1)
        mean_gray = ((A @ mean_rgb.unsqueeze(2)).squeeze(2) + b) @ g  # (n,)
        M = torch.where((op == 1).view(n, 1, 1), fc.view(n, 1, 1) * eye, M)
        c = torch.where((op == 1).view(n, 1), ((1 - fc) * mean_gray.view(n, 1)).expand(n, 3), torch.zeros_like(b))
        fs = params["saturation"].view(n, 1, 1)
        M = torch.where((op == 2).view(n, 1, 1), fs * eye + (1 - fs) * gray_m, M)
        A = M @ A
        b = (M @ b.unsqueeze(2)).squeeze(2) + c
    if after_hue:
        gray = params["gray"].view(n, 1, 1)
        A = torch.where(gray, gray_m @ A, A)
        b = torch.where(gray.view(n, 1), (gray_m @ b.unsqueeze(2)).squeeze(2), b)
    return A, b


def blur_taps(sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """(n, 2R+1) weights of a 1-D Gaussian with standard deviation ``sigma`` (n,) pixels over offsets −R…R,
    R = max(1, ⌈3·max_sigma⌉), each row normalised to sum 1."""
    radius = max(1, int(math.ceil(3.0 * float(max_sigma))))
    t = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    g = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1).to(torch.float32)) ** 2)
    return g / g.sum(dim=1, keepdim=True)


def blur_matrix(size: int, sigma: torch.Tensor) -> torch.Tensor:
    """(n, size, size) matrices of a 1-D Gaussian blur with standard deviation ``sigma`` (n,) pixels: the taps of
    :func:`blur_taps` with R from the largest σ, edges extended (PIL ``GaussianBlur`` approximates the same
    Gaussian with box blurs and also extends edges)."""
    n = sigma.shape[0]
    g = blur_taps(sigma, float(sigma.max()))  # (n, K)
    radius = (g.shape[1] - 1) // 2
    t = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.int64)
    cols = (torch.arange(size, device=sigma.device).view(-1, 1) + t.view(1, -1)).clamp_(0, size - 1)
    out = torch.zeros(n, size, size, device=sigma.device, dtype=torch.float32)
    return out.scatter_add_(2, cols.expand(n, size, -1), g.view(n, 1, -1).expand(n, size, -1))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (n, 3, h, w) floats with a per-sample standard deviation ``sigma`` (n,) pixels,
    as two batched products with banded matrices (:func:`blur_matrix`)."""
    n, c, h, w = x.shape
    gy = blur_matrix(h, sigma)
    gx = blur_matrix(w, sigma)
    y = torch.bmm(gy, x.permute(0, 2, 1, 3).reshape(n, h, c * w))  # vertical
    y = y.view(n, h, c, w).permute(0, 2, 1, 3).reshape(n, c * h, w)
    return torch.bmm(y, gx.transpose(1, 2)).view(n, c, h, w)  # horizontal


def color_pipeline(x: torch.Tensor, params: Dict[str, torch.Tensor], mean: Sequence[float], std: Sequence[float],
                   threshold: float) -> torch.Tensor:
    """Flip → colour jitter → grayscale → blur → solarize → normalise (the order of the PIL path) on (n, 3, h, w)
    floats in [0, 1], in place where possible. Returns the normalised float32 views."""
    n, _, hgt, wid = x.shape
    idx = torch.nonzero(params["flip"]).squeeze(1)
    if idx.numel():
        x[idx] = x[idx].flip(3)
    A, b = jitter_affine(params, x.mean(dim=(2, 3)), after_hue=False)
    x = torch.baddbmm(b.unsqueeze(2), A, x.view(n, 3, hgt * wid)).view(n, 3, hgt, wid).clamp_(0.0, 1.0)
    idx = torch.nonzero(params["jitter"]).squeeze(1)
    if idx.numel():
        x[idx] = hue_shift(x[idx], params["hue"][idx])
    A, b = jitter_affine(params, x.mean(dim=(2, 3)), after_hue=True)
    x = torch.baddbmm(b.unsqueeze(2), A, x.view(n, 3, hgt * wid)).view(n, 3, hgt, wid).clamp_(0.0, 1.0)
    idx = torch.nonzero(params["blur"]).squeeze(1)
    if idx.numel():
        x[idx] = gaussian_blur(x[idx], params["sigma"][idx])
    idx = torch.nonzero(params["solarize"]).squeeze(1)
    if idx.numel():
        sub = x[idx]
        x[idx] = torch.where(sub >= threshold, 1.0 - sub, sub)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype)
    s = torch.tensor(std, device=x.device, dtype=x.dtype)
    return torch.addcmul((-m / s).view(1, 3, 1, 1), x, (1.0 / s).view(1, 3, 1, 1))


class DeviceMultiCrop:
    """The PASS multi-crop views of a :class:`UInt8Batch`, computed batched on the batch's device.

    Same views, same order and same parameter distributions as :class:`PassMultiCropAugment` (both read
    :data:`RECIPE`); crop boxes are drawn in full-resolution pixels (:func:`sample_crop_boxes`) and mapped onto
    the decoded image, so a bounded decode changes the sharpness of a crop, never its geometry.

    How: every crop of the batch is cut and resized in one ``torchvision.ops.roi_align`` call (bilinear,
    averaging ⌈box/output⌉² samples per output pixel when shrinking, i.e. antialiased; PIL uses bicubic). Colour
    jitter: the brightness/contrast/saturation adjustments before each sample's hue step are one affine colour
    map (:func:`jitter_affine`), then the exact HSV hue shift (:func:`hue_shift`), then the adjustments after it
    and grayscale as a second affine map, each map followed by a clip to [0, 1]; the blur is two batched
    products with banded matrices; then solarize and the normalisation. Differences from the PIL path, all in
    pixel values, none in the random parameters: bilinear-area instead of bicubic resampling; float arithmetic
    instead of uint8 rounding; no clip between two consecutive affine adjustments.

    Where: on a CUDA batch the torch operations above run on the GPU. On a CPU batch (``cpu_kernels=True``, the
    default) the same random draws are rendered by three compiled passes (:mod:`partreid.pass_pretrain.augment_cpu`:
    resample, jitter + hue, affine + blur + solarize + normalise), which give the torch operations' views to
    float32 rounding at about 7× their speed and 5× the PIL path's per core (``benchmarks/bench_augment.py``);
    ``cpu_kernels=False`` runs the torch operations on the CPU (the reference the tests compare with).

    Call ``aug(batch, gen)`` → list of ``layout.n_views`` float32 tensors (B, 3, h, w), ImageNet-normalised;
    ``gen`` is a ``torch.Generator`` on ``batch.images``'s device (seed it per iteration for reproducibility).
    """

    def __init__(self, global_size: Tuple[int, int] = (256, 128), local_size: Tuple[int, int] = (128, 64),
                 global_scale: Tuple[float, float] = (0.4, 1.0), local_scale: Tuple[float, float] = (0.1, 0.8),
                 local_per_band: int = 3, n_bands: int = 3, band_frac: float = 0.5,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 recipe: AugmentRecipe = RECIPE, cpu_kernels: bool = True):
        self.layout = CropLayout(n_global=2, n_bands=n_bands, local_per_band=local_per_band)
        self.global_size, self.local_size = tuple(global_size), tuple(local_size)
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.band_frac = float(band_frac)
        self.mean, self.std = tuple(mean), tuple(std)
        self.recipe = recipe
        self.cpu_kernels = bool(cpu_kernels)

    def boxes(self, full_sizes: torch.Tensor, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """Crop boxes in full-resolution pixels for a batch with ``full_sizes`` (B, 2) = (H, W).

        Returns:
            (global_boxes int64 (2, B, 4), local_boxes int64 (n_bands, local_per_band, B, 4)), boxes as
            (top, left, h, w) in image coordinates; local boxes lie inside their band (:func:`band_boxes`).
        """
        H, W = full_sizes[:, 0], full_sizes[:, 1]
        g = torch.stack([sample_crop_boxes(H, W, self.global_scale, self.recipe.ratio, gen) for _ in range(2)])
        nb, per = self.layout.n_bands, self.layout.local_per_band
        band_h = torch.floor(self.band_frac * H.to(torch.float64)).to(torch.int64)
        if bool((band_h < 1).any()):
            raise InputError(f"an image of height {int(H.min())} is too small for part bands")
        step = (1.0 - self.band_frac) / (nb - 1) if nb > 1 else 0.0
        local = []
        for k in range(nb):
            top = torch.floor(k * step * H.to(torch.float64)).to(torch.int64)  # int(k·step·H), as band_boxes
            crops = []
            for _ in range(per):
                b = sample_crop_boxes(band_h, W, self.local_scale, self.recipe.ratio, gen)
                b[:, 0] += top
                crops.append(b)
            local.append(torch.stack(crops))
        return g, torch.stack(local)

    def __call__(self, batch: UInt8Batch, gen: torch.Generator) -> List[torch.Tensor]:
        device = batch.images.device
        B = len(batch)
        full = batch.full_sizes.to(device)
        scale_hw = batch.sizes.to(device).to(torch.float32) / full.to(torch.float32)
        g_boxes, l_boxes = self.boxes(full, gen)
        r = self.recipe
        blur_p = torch.cat([torch.full((B,), r.blur_p[0], device=device),
                            torch.full((B,), r.blur_p[1], device=device)])
        sol_p = torch.cat([torch.zeros(B, device=device), torch.full((B,), r.solarize_p, device=device)])
        groups = [(g_boxes, self.global_size, sample_color_params(2 * B, gen, device, blur_p, sol_p, r))]
        n_local = self.layout.n_local
        if n_local:
            m = n_local * B
            groups.append((l_boxes.reshape(n_local, B, 4), self.local_size,
                           sample_color_params(m, gen, device, torch.full((m,), r.blur_p[2], device=device),
                                               torch.zeros(m, device=device), r)))
        compiled = device.type == "cpu" and self.cpu_kernels
        x = None if compiled else batch.images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0).contiguous()
        views: List[torch.Tensor] = []
        for boxes, size, params in groups:
            rois = self._rois(boxes, scale_hw)
            out = (self._render_compiled(batch.images, rois, size, params) if compiled
                   else self._render_torch(x, rois, size, params))
            views.extend(out.view(boxes.shape[0], B, *out.shape[1:]).unbind(0))
        return views

    @staticmethod
    def _rois(boxes: torch.Tensor, scale_hw: torch.Tensor) -> torch.Tensor:
        """(m, B, 4) boxes (top, left, h, w) in full-resolution pixels → (m·B, 5) ``roi_align`` rows
        ``(image, x1, y1, x2, y2)`` in the decoded batch's pixels, view-major."""
        m, B = boxes.shape[0], boxes.shape[1]
        top, left, h, w = boxes.to(torch.float32).unbind(-1)
        sy, sx = scale_hw[:, 0], scale_hw[:, 1]
        rows = torch.arange(B, device=boxes.device, dtype=torch.float32)
        rois = torch.stack([rows.expand(m, B), left * sx, top * sy, (left + w) * sx, (top + h) * sy], dim=-1)
        return rois.reshape(-1, 5)

    def _render_torch(self, x: torch.Tensor, rois: torch.Tensor, size: Tuple[int, int],
                      params: Dict[str, torch.Tensor]) -> torch.Tensor:
        crops = roi_align(x, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        return color_pipeline(crops, params, self.mean, self.std, self.recipe.solarize_threshold / 255.0)

    def _render_compiled(self, images: torch.Tensor, rois: torch.Tensor, size: Tuple[int, int],
                         params: Dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`_render_torch` on the CPU in three compiled passes (:mod:`partreid.pass_pretrain.augment_cpu`):
        the same crops, colour maps, blur taps and normalisation, without the dozens of full passes over the
        views that the torch operations make."""
        n = rois.shape[0]
        out = np.empty((n, 3, *size), np.float32)
        sums = np.empty((n, 3), np.float64)
        pixels = float(size[0] * size[1])
        roi = rois.numpy()
        augment_cpu.resample_views(images.contiguous().numpy(), roi[:, 0].astype(np.int64),
                                   roi[:, 1:].astype(np.float64), params["flip"].numpy(), out, sums)
        A, b = jitter_affine(params, torch.from_numpy(sums / pixels).to(torch.float32), after_hue=False)
        augment_cpu.jitter_views(out, A.numpy(), b.numpy(), params["jitter"].numpy(),
                                 params["hue"].to(torch.float32).numpy(), sums)
        A, b = jitter_affine(params, torch.from_numpy(sums / pixels).to(torch.float32), after_hue=True)
        blur = params["blur"]
        sigma = params["sigma"]
        taps = (blur_taps(sigma, float(sigma[blur].max())) if bool(blur.any())
                else torch.zeros((n, 3), dtype=torch.float32))
        mean = torch.tensor(self.mean, dtype=torch.float32)
        std = torch.tensor(self.std, dtype=torch.float32)
        augment_cpu.finish_views(out, A.numpy(), b.numpy(), blur.numpy(), taps.numpy(),
                                 params["solarize"].numpy(), np.float32(self.recipe.solarize_threshold / 255.0),
                                 (1.0 / std).numpy(), (-mean / std).numpy())
        return torch.from_numpy(out)


def resolve_augment_on(choice: str, device: torch.device) -> str:
    """``'cpu'`` or ``'device'`` for ``--augment-on`` ``choice`` ('auto': device on CUDA, else cpu).

    Raises:
        InputError: an unknown choice.
    """
    if choice not in AUGMENT_ON:
        raise InputError(f"augment_on {choice!r} not in {AUGMENT_ON}")
    if choice == "auto":
        return "device" if torch.device(device).type == "cuda" else "cpu"
    return choice


#: Accepted values of ``--augment-on``.
AUGMENT_ON = ("auto", "cpu", "device")


class DecodedImages(torch.utils.data.Dataset):
    """Worker side of the device path: item i → ``((uint8 H'×W'×3 array, (H, W)), i)`` or None (unreadable).

    Over a :class:`partreid.common.data.images.ImageDataset` the images are decoded by :class:`BoundedDecoder`
    (JPEG DCT scaling, skip counting and ``--strict`` kept); over any other indexable of PIL images (or of
    tuples starting with one) the decoded image is shrunk by :func:`pil_to_bounded`. Collate with
    :func:`collate_uint8`.
    """

    def __init__(self, images: Any, max_height: int = DEFAULT_MAX_HEIGHT):
        self.max_height = int(max_height)
        opener = getattr(images, "with_opener", None)
        self.direct = opener is not None
        self.images = opener(BoundedDecoder(self.max_height)) if self.direct else images

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: the random parameters are drawn on the device (kept for the training loop)."""

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        item = self.images[index]
        if self.direct:
            return item
        if isinstance(item, (tuple, list)):
            item = item[0] if item else None
        if item is None:
            return None
        if not hasattr(item, "convert"):
            raise InputError(f"dataset item {index} is a {type(item).__name__}, expected a PIL image")
        return pil_to_bounded(item, self.max_height), int(index)


def device_views(aug: DeviceMultiCrop, batch: UInt8Batch, device: torch.device, seed: int) -> List[torch.Tensor]:
    """Move a :class:`UInt8Batch` to ``device`` and return its views, with the random parameters drawn from a
    generator on ``device`` seeded with ``seed`` (the training loop passes a seed of (run seed, epoch, iteration),
    so a resumed run draws the same views)."""
    device = torch.device(device)
    moved = UInt8Batch(batch.images.to(device, non_blocking=True), batch.sizes, batch.full_sizes, batch.indices)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) % (2 ** 63))
    return aug(moved, gen)
