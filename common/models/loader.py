"""One loader for every checkpoint a user may hand to ``extract-features``, ``evaluate`` or ``finetune``.

Accepted (detected from the file's content, not its name):

- our ``pass-pretrain`` run checkpoints (``checkpoint.pth`` with ``teacher``/``student``; the teacher backbone is
  used) and ``pass-pretrain export`` files;
- the official PASS checkpoints (``pass_vit_small_full.pth``, ``pass_vit_base_full.pth``: the converted teacher
  backbone, reference-spec §A.9), also DINO-style dicts holding ``teacher``;
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

import torch
from torch import nn

from common.errors import InputError
from common.fileio import sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIT_ARCHS = ("vit_tiny", "vit_small", "vit_base")


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


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise InputError(f"{path}: no such checkpoint") from None
    except Exception as exc:  # pickle/zip errors
        raise InputError(f"{path}: not a readable torch checkpoint ({str(exc).splitlines()[0]})") from None


def _is_resnet_state(sd: Dict[str, Any]) -> bool:
    keys = {k.replace("module.", "").replace("backbone.", "") for k in sd}
    return "conv1.weight" in keys and any(k.startswith("layer4.") for k in keys)


def _build_vit(arch: str, state: Optional[Dict[str, Any]], where: str):
    from common.models.vit import build_part_vit, detect_vit_arch, load_vit_weights

    if arch is None:
        arch = detect_vit_arch(state)
    if arch not in VIT_ARCHS:
        raise InputError(f"{where}: unknown ViT arch {arch!r} (expected one of {', '.join(VIT_ARCHS)})")
    model = build_part_vit(arch)
    if state is not None:
        load_vit_weights(model, state)
    return model, arch


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
            from common.models.resnet import ResNetStripes

            model = ResNetStripes(weights=resnet_weights)
            return _finish(model, "resnet", "resnet50", image_size or (384, 128), IMAGENET_MEAN, IMAGENET_STD, sha,
                           "ResNet-50 stripes (ImageNet weights)" if resnet_weights else "random ResNet-50 stripes")
        model, name = _build_vit(name, None, checkpoint)
        return _finish(model, "vit", name, image_size or (256, 128), IMAGENET_MEAN, IMAGENET_STD, sha,
                       f"randomly initialised {name}")

    path = Path(checkpoint)
    if not path.exists():
        raise InputError(f"{path}: no such checkpoint")
    sha = sha256_file(path)
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise InputError(f"{path}: not a state dict or checkpoint dict (got {type(obj).__name__})")

    fmt = obj.get("format")
    if fmt == "partreid.reid_model":
        from common.models.reid import load_reid_checkpoint

        model, meta = load_reid_checkpoint(path)
        size = tuple(image_size or meta.get("image_size") or (256, 128))
        return _finish(model, "reid", meta.get("arch", "?"), size, tuple(meta.get("pixel_mean", IMAGENET_MEAN)),
                       tuple(meta.get("pixel_std", IMAGENET_STD)), sha, "PartReID finetune checkpoint", meta)
    if fmt == "partreid.backbone":
        meta = obj.get("meta", {})
        model, name = _build_vit(arch or meta.get("arch"), obj["state_dict"], str(path))
        size = tuple(image_size or meta.get("image_size") or (256, 128))
        return _finish(model, "vit", name, size, tuple(meta.get("pixel_mean", IMAGENET_MEAN)),
                       tuple(meta.get("pixel_std", IMAGENET_STD)), sha, "PartReID pass-pretrain export", meta)

    state = obj
    source = "state dict"
    if "teacher" in obj and isinstance(obj["teacher"], dict):
        state, source = obj["teacher"], "teacher of a PASS/DINO training checkpoint"
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
        state = obj["state_dict"]
    elif "model" in obj and isinstance(obj["model"], dict):
        state = obj["model"]
    if _is_resnet_state(state):
        from common.models.resnet import ResNetStripes

        model = ResNetStripes(weights=str(path))
        return _finish(model, "resnet", "resnet50", image_size or (384, 128), IMAGENET_MEAN, IMAGENET_STD, sha,
                       "torchvision ResNet-50 (stripes)")
    model, name = _build_vit(arch, state, str(path))
    meta = obj.get("meta", {}) if isinstance(obj.get("meta"), dict) else {}
    return _finish(model, "vit", name, tuple(image_size or meta.get("image_size") or (256, 128)),
                   tuple(meta.get("pixel_mean", IMAGENET_MEAN)), tuple(meta.get("pixel_std", IMAGENET_STD)), sha,
                   f"ViT {source}", meta)


def _finish(model, kind, arch, size, mean, std, sha, source, meta=None) -> LoadedModel:
    model.eval()
    return LoadedModel(model, kind, arch, (int(size[0]), int(size[1])), tuple(float(v) for v in mean),
                       tuple(float(v) for v in std), sha, source, dict(meta or {}))
