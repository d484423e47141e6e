"""One loader for every checkpoint a user may hand to ``extract-features``, ``evaluate`` or ``finetune``.

Accepted (detected from the file's content, not its name):

- our ``pass-pretrain`` run checkpoints (``checkpoint.pth`` with ``teacher``/``student``; the teacher backbone is
  used) and ``pass-pretrain export`` files;
- the official PASS checkpoints (``pass_vit_small_full.pth``, ``pass_vit_base_full.pth``: the converted teacher
  backbone, PASS ``convert_model_dino.py``), also DINO-style dicts holding ``teacher``;
- our ``finetune`` checkpoints (``format`` = ``partreid.reid_model``: backbone + BNNecks + classifiers);
- timm ViT state dicts (part tokens initialised from [CLS]);
- torchvision ResNet-50 state dicts, giving PPLR's part model (last stride 1, 3 horizontal stripes);
- ``random:ARCH`` (e.g. ``random:vit_tiny``, ``random:resnet50``): a randomly initialised model, seeded by
  ``torch.manual_seed``, for baselines and tests.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from torch import nn

from partreid.common.data.images import IMAGENET_MEAN, IMAGENET_STD
from partreid.common.errors import InputError
from partreid.common.fileio import sha256_file
from partreid.common.models.archs import VIT_ARCHS, default_image_size
from partreid.common.models.checkpoint import read_checkpoint
from partreid.common.models.reid import load_reid_checkpoint
from partreid.common.models.resnet import ResNetStripes
from partreid.common.models.vit import build_part_vit, load_part_vit


@dataclass
class LoadedModel:
    """A model ready for feature extraction, with what is needed to feed it.

    Attributes:
        model: the backbone (``forward(x) -> (g (B,D), parts (B,P,D))``) or a ``ReIDModel`` (``extract``).
        kind: ``"vit"``, ``"resnet"`` or ``"reid"`` (a fine-tuned model with BNNecks).
        arch: e.g. ``"vit_small"``, ``"resnet50"``.
        image_size: (H, W) input size in pixels.
        pixel_mean, pixel_std: normalisation the checkpoint was trained with (RGB, 0-1 scale).
        sha256: content hash of the checkpoint file (or of the ``random:`` spec).
        source: a short description of what was detected.
        meta: extra metadata from the checkpoint (e.g. fusion of a fine-tuned model).
    """

    model: nn.Module
    kind: str
    arch: str
    image_size: Tuple[int, int]
    pixel_mean: Tuple[float, float, float]
    pixel_std: Tuple[float, float, float]
    sha256: str
    source: str
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def has_bnneck(self) -> bool:
        return self.kind == "reid"


def _is_resnet_state(sd: Dict[str, Any]) -> bool:
    keys = {k.replace("module.", "").replace("backbone.", "") for k in sd}
    return "conv1.weight" in keys and any(k.startswith("layer4.") for k in keys)


def _build_vit(arch: Optional[str], state: Optional[Dict[str, Any]], where: str, image_size=None):
    """A PartViT: random (``state`` None) or fitted to ``state`` (arch and depth read from the tensor shapes)."""
    if state is None:
        if arch not in VIT_ARCHS:
            raise InputError(f"{where}: unknown ViT arch {arch!r} (expected one of {', '.join(VIT_ARCHS)})")
        kw = {"image_size": tuple(image_size)} if image_size else {}
        return build_part_vit(arch, **kw), arch
    model, _ = load_part_vit(state, image_size=tuple(image_size) if image_size else None)
    return model, getattr(model, "arch", arch or "vit")


def load_model(checkpoint: str, *, arch: Optional[str] = None, image_size: Optional[Tuple[int, int]] = None,
               resnet_weights: Optional[str] = None) -> LoadedModel:
    """Load any accepted checkpoint (see the module docstring) on the CPU, in eval mode.

    Args:
        checkpoint: a file path or ``random:ARCH``.
        arch: force the architecture (otherwise detected from the weights' shapes).
        image_size: override the input size (H, W) in pixels.
        resnet_weights: for ``random:resnet50``, an optional local torchvision ImageNet weight file.

    Raises:
        InputError: missing or unreadable file, unknown content, or weights that do not fit the architecture
            (one line naming the missing/unexpected keys and shapes).
    """
    if checkpoint.startswith("random:"):
        name = checkpoint.split(":", 1)[1] or (arch or "vit_tiny")
        sha = hashlib.sha256(checkpoint.encode()).hexdigest()
        if name == "resnet50":
            model = ResNetStripes(weights=resnet_weights)
            return _finish(model, "resnet", "resnet50", image_size or default_image_size("resnet50"), IMAGENET_MEAN, IMAGENET_STD, sha,
                           "ResNet-50 stripes (ImageNet weights)" if resnet_weights else "random ResNet-50 stripes")
        model, name = _build_vit(name, None, checkpoint, image_size)
        return _finish(model, "vit", name, image_size or default_image_size(name), IMAGENET_MEAN, IMAGENET_STD, sha,
                       f"randomly initialised {name}")

    path = Path(checkpoint)
    if not path.exists():
        raise InputError(f"{path}: no such checkpoint")
    sha = sha256_file(path)
    obj = read_checkpoint(path)
    if not isinstance(obj, dict):
        raise InputError(f"{path}: not a state dict or checkpoint dict (got {type(obj).__name__})")

    fmt = obj.get("format")
    if fmt == "partreid.reid_model":
        model, meta = load_reid_checkpoint(path)
        size = tuple(image_size or meta.get("image_size") or (256, 128))
        return _finish(model, "reid", meta.get("arch", "?"), size, tuple(meta.get("pixel_mean", IMAGENET_MEAN)),
                       tuple(meta.get("pixel_std", IMAGENET_STD)), sha, "PartReID finetune checkpoint", meta)
    state = obj
    for key in ("teacher", "state_dict", "model"):
        if isinstance(obj.get(key), dict):
            state = obj[key]
            break
    if _is_resnet_state(state):
        model = ResNetStripes(weights=str(path))
        return _finish(model, "resnet", "resnet50", image_size or default_image_size("resnet50"), IMAGENET_MEAN, IMAGENET_STD, sha,
                       "torchvision ResNet-50 (stripes)")
    # PartViT: official PASS backbone, DINO/PASS training checkpoint (teacher), timm ViT, or our export
    meta = obj.get("meta", {}) if isinstance(obj.get("meta"), dict) else {}
    source = ("PartReID pass-pretrain export" if meta else
              "teacher of a PASS/DINO training checkpoint" if "teacher" in obj else "ViT state dict")
    model, name = _build_vit(arch, obj, str(path), image_size)
    return _finish(model, "vit", name, tuple(model.image_size), tuple(model.pixel_mean), tuple(model.pixel_std),
                   sha, source, meta)


def _finish(model, kind, arch, size, mean, std, sha, source, meta=None) -> LoadedModel:
    model.eval()
    return LoadedModel(model, kind, arch, (int(size[0]), int(size[1])), tuple(float(v) for v in mean),
                       tuple(float(v) for v in std), sha, source, dict(meta or {}))
