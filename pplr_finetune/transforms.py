"""Training augmentation of PPLR / cluster-contrast, including their own random erasing.

Source: PPLR ``pplr/utils/data/transforms.py`` (``RandomErasing``, after Zhong et al., "Random Erasing Data
Augmentation", 2017) and the train transform of ``examples/train_pplr.py``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from partreid.common.data.images import IMAGENET_MEAN


class ReferenceRandomErasing:
    """Random erasing as PPLR draws it (not torchvision's law).

    With probability ``p`` the image is erased; then up to ``attempts`` (100) times: draw the area fraction
    s ~ U(``scale``) and the aspect ratio r ~ U(``ratio_min``, 1/``ratio_min``) (uniform, where torchvision draws
    log r uniformly and tries 10 times), h = round(√(s·H·W·r)), w = round(√(s·H·W/r)); when h < H and w < W the
    box's top-left corner is uniform over the positions where it fits and the box is filled with ``value`` (per
    channel, written into the already-normalised tensor, as the reference does). If no draw fits, the image is
    left as it is. At 384×128 the mean erased fraction of an erased image is about 0.198 (torchvision: 0.179).

    Draws use torch's global CPU RNG (seeded per data-loader worker by PyTorch).

    Args:
        p: erasing probability (0.5).
        scale: (s_min, s_max) area fractions (0.02, 0.4).
        ratio_min: r_1, aspect ratios in [r_1, 1/r_1] (0.3).
        value: fill per channel (the ImageNet mean (0.485, 0.456, 0.406), as PPLR's train script passes it).
        attempts: tries before giving up (100).
    """

    def __init__(self, p: float = 0.5, scale: Tuple[float, float] = (0.02, 0.4), ratio_min: float = 0.3,
                 value: Sequence[float] = IMAGENET_MEAN, attempts: int = 100):
        self.p = float(p)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio_min = float(ratio_min)
        self.value = tuple(float(v) for v in value)
        self.attempts = int(attempts)

    def get_params(self, height: int, width: int, generator: Optional[torch.Generator] = None
                   ) -> Optional[Tuple[int, int, int, int]]:
        """One draw of the box (top, left, h, w) for an image of height×width pixels, or None (no box fits).

        The erasing probability ``p`` is not applied here (see :meth:`__call__`)."""
        area = height * width
        lo, hi = self.scale
        r_lo, r_hi = self.ratio_min, 1.0 / self.ratio_min
        for _ in range(self.attempts):
            u = torch.rand(2, generator=generator, dtype=torch.float64)
            target = (lo + (hi - lo) * float(u[0])) * area
            ratio = r_lo + (r_hi - r_lo) * float(u[1])
            h = int(round(math.sqrt(target * ratio)))
            w = int(round(math.sqrt(target / ratio)))
            if h < height and w < width:
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                return top, left, h, w
        return None

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """Erase a box of ``img`` float (C, H, W) in place with probability p; returns it."""
        if float(torch.rand(1)) >= self.p:
            return img
        box = self.get_params(img.shape[-2], img.shape[-1])
        if box is None:
            return img
        top, left, h, w = box
        for c in range(img.shape[0]):
            img[c, top:top + h, left:left + w] = self.value[c % len(self.value)]
        return img

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(p={self.p}, scale={self.scale}, ratio=({self.ratio_min}, "
                f"{1 / self.ratio_min:.4g}) uniform, attempts={self.attempts})")


def train_transform(image_size, mean, std):
    """PPLR / cluster-contrast train augmentation: resize (bicubic), flip 0.5, zero-pad 10 + random crop, to
    tensor, normalise, then :class:`ReferenceRandomErasing` (p 0.5, area 0.02–0.4, aspect ≥ 0.3, fill = ImageNet
    mean written into the normalised tensor, as both references do, also with PASS's 0.5/0.5 normalisation).

    Args:
        image_size: (H, W) pixels.
        mean, std: per-channel normalisation.

    Returns:
        a callable PIL image → float32 tensor (3, H, W).
    """
    from torchvision import transforms as T

    size = tuple(image_size)
    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(0.5),
        T.Pad(10),
        T.RandomCrop(size),
        T.ToTensor(),
        T.Normalize(list(mean), list(std)),
        ReferenceRandomErasing(p=0.5, scale=(0.02, 0.4), ratio_min=0.3, value=IMAGENET_MEAN),
    ])
