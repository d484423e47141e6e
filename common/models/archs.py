"""The architecture table: every backbone name the package accepts, with its size and default input.

One table for the model builders (:mod:`partreid.common.models.vit`, :mod:`partreid.common.models.resnet`), the
checkpoint loader (:func:`partreid.common.models.loader.load_model`), ``pass-pretrain`` and the command-line
choices. Plain data, no torch: the commands read it for ``--help`` without loading a network.
"""

from __future__ import annotations

from typing import Dict, Tuple

#: name → family (``vit``: PASS PartViT/16 with 3 [PART] tokens; ``resnet``: PPLR's ResNet-50 with 3 stripes),
#: width D of the global feature, attention heads (ViT), default input (H, W) in pixels.
#: ViT sizes: DeiT-Ti/S/B (Touvron et al. 2021), as in PASS ``vision_transformer.py`` ``vit_small``/``vit_base``
#: (``vit_tiny`` for CPU demos); ResNet-50 input 384×128 as in PPLR ``examples/train_pplr.py`` (``--height 384``).
ARCHS: Dict[str, Dict[str, object]] = {
    "vit_tiny": {"family": "vit", "embed_dim": 192, "num_heads": 3, "image_size": (256, 128)},
    "vit_small": {"family": "vit", "embed_dim": 384, "num_heads": 6, "image_size": (256, 128)},
    "vit_base": {"family": "vit", "embed_dim": 768, "num_heads": 12, "image_size": (256, 128)},
    "resnet50": {"family": "resnet", "embed_dim": 2048, "num_heads": 0, "image_size": (384, 128)},
}

#: the ViT rows of :data:`ARCHS`, in size order.
VIT_ARCHS: Tuple[str, ...] = tuple(name for name, spec in ARCHS.items() if spec["family"] == "vit")


def default_image_size(arch: str) -> Tuple[int, int]:
    """Default input (H, W) in pixels of ``arch`` (256×128 for ViTs, 384×128 for ResNet-50)."""
    return tuple(ARCHS[arch]["image_size"])  # type: ignore[return-value]
