"""ResNet-50 with last stride 1 and horizontal stripes: PPLR's original part backbone (PPLR
``pplr/models/resnet_part.py``).

The network is torchvision's ResNet-50. The stride of ``layer4[0].conv2`` and of its downsample conv is set
to 1, so a 384×128 input gives a 2048×24×8 layer-4 map (instead of 12×4). The global feature is the global
average pool of that map; the parts are ``AdaptiveAvgPool2d((P, 1))`` stripes (P = 3: for 384×128 each stripe
averages 8 rows × 8 columns).

Weights never come from the network: pass ``weights=None`` (random init) or the path of a local torchvision
ImageNet checkpoint (e.g. ``resnet50-0676ba61.pth``). PPLR used ``pretrained=True`` with torchvision 0.7, i.e.
the ImageNet-1k "V1" weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torchvision

from partreid.common.data.images import IMAGENET_MEAN, IMAGENET_STD
from partreid.common.errors import InputError
from partreid.common.models.checkpoint import read_checkpoint

__all__ = ["ResNetStripes", "IMAGENET_MEAN", "IMAGENET_STD", "RESNET50_V1_URL", "load_torchvision_state_dict"]

#: torchvision's ImageNet-1k V1 ResNet-50 weights (what ``pretrained=True`` gave PPLR); download it yourself.
RESNET50_V1_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"

_HOW_TO_GET = (f"download torchvision's ImageNet ResNet-50 weights on a machine with internet access "
               f"(e.g. `curl -LO {RESNET50_V1_URL}`) and pass the local file path; this tool never downloads")


def load_torchvision_state_dict(path: Union[str, os.PathLike]) -> dict:
    """Read a local torchvision ResNet-50 checkpoint and return its backbone state dict (``fc.*`` dropped).

    Accepts a plain state dict, or a dict holding one under ``state_dict`` or ``model``; a ``module.``
    prefix (DataParallel) is stripped. Tensors are loaded on the CPU with ``weights_only=True``.

    Raises:
        InputError: the file is missing, unreadable, or not a ResNet-50 state dict.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: ResNet-50 weights file not found; {_HOW_TO_GET}")
    obj = read_checkpoint(p, weights_only=True, what="ResNet-50 weights file")
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{p}: not a state dict of tensors; {_HOW_TO_GET}")
    out = {}
    for k, v in obj.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k.startswith("fc."):
            continue
        out[k] = v
    if "conv1.weight" not in out or "layer4.2.bn3.running_var" not in out:
        raise InputError(f"{p}: does not look like a torchvision ResNet-50 state dict "
                         f"(no conv1.weight / layer4.2.bn3.running_var)")
    return out


class ResNetStripes(nn.Module):
    """ResNet-50 (last stride 1) returning a GAP global feature and P horizontal stripe features.

    Backbone interface (docs: interfaces.md): ``embed_dim`` = 2048, ``num_parts`` = P, ``pixel_mean`` /
    ``pixel_std`` = ImageNet mean/std, ``image_size`` = (384, 128), ``arch`` = ``'resnet50'``.

    Args:
        weights: ``None`` for random init, or the path of a LOCAL torchvision ImageNet ResNet-50 checkpoint
            (``fc.*`` keys are ignored). Anything else (``True``, ``'IMAGENET1K_V1'``, a torchvision weights
            enum, a URL) is refused: this tool never downloads.
        num_parts: P, the number of horizontal stripes (PPLR ``--part 3``).
        last_stride: stride of layer 4 (1 in PPLR; 2 gives torchvision's stock network).
        image_size: default input (H, W) in pixels.

    Raises:
        InputError: bad ``weights`` (not a local file, unreadable, wrong keys/shapes), ``num_parts`` < 1,
            ``last_stride`` not 1 or 2.

    Source: PPLR ``pplr/models/resnet_part.py`` ``ResNetPart``.
    """

    arch = "resnet50"

    def __init__(self, weights: Optional[Union[str, os.PathLike]] = None, num_parts: int = 3,
                 last_stride: int = 1, image_size: Tuple[int, int] = (384, 128)):
        super().__init__()
        if isinstance(weights, bool) or (weights is not None and not isinstance(weights, (str, os.PathLike))):
            raise InputError(f"ResNet-50 weights must be None or a local file path, got {weights!r}; {_HOW_TO_GET}")
        if isinstance(weights, str) and (weights.startswith(("http://", "https://"))
                                         or weights.upper().startswith("IMAGENET") or weights.upper() == "DEFAULT"):
            raise InputError(f"ResNet-50 weights {weights!r} would need a download; {_HOW_TO_GET}")
        if int(num_parts) < 1:
            raise InputError(f"num_parts must be >= 1, got {num_parts}")
        if last_stride not in (1, 2):
            raise InputError(f"last_stride must be 1 or 2, got {last_stride}")
        state = load_torchvision_state_dict(weights) if weights is not None else None
        net = torchvision.models.resnet50(weights=None)
        if state is not None:
            try:
                missing, unexpected = net.load_state_dict(state, strict=False)
            except RuntimeError as exc:  # shape mismatch
                raise InputError(f"{weights}: weights do not fit ResNet-50: {str(exc).splitlines()[-1].strip()}") \
                    from exc
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise InputError(f"{weights}: not a ResNet-50 state dict (missing {missing[:3]}, "
                                 f"unexpected {list(unexpected)[:3]})")
        if last_stride == 1:
            net.layer4[0].conv2.stride = (1, 1)
            net.layer4[0].downsample[0].stride = (1, 1)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.part_pool = nn.AdaptiveAvgPool2d((int(num_parts), 1))
        self.embed_dim = 2048
        self.num_parts = int(num_parts)
        self.last_stride = int(last_stride)
        self.pixel_mean = IMAGENET_MEAN
        self.pixel_std = IMAGENET_STD
        self.image_size = (int(image_size[0]), int(image_size[1]))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Layer-4 map: float (B, 3, H, W) → (B, 2048, H/16, W/16) with last stride 1 (H/32, W/32 with 2)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Float images (B, 3, H, W), normalised with ImageNet mean/std → (g (B, 2048), parts (B, P, 2048)).

        g is the global average pool of the layer-4 map; parts[:, k] is the average over stripe k (top to
        bottom) of ``AdaptiveAvgPool2d((P, 1))``. Neither is normalised.
        """
        fmap = self.feature_map(x)
        g = fmap.mean(dim=(2, 3))
        parts = self.part_pool(fmap).flatten(2).transpose(1, 2)
        return g, parts
