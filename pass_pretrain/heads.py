"""DINO projection heads and the PASS multi-crop wrapper (PASS ``utils.py`` ``MultiCropWrapper``, PASS
``vision_transformer.py`` ``DINOHead``)."""

from __future__ import annotations

from typing import List, NamedTuple, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch.nn.utils.parametrizations import weight_norm

from partreid.common.errors import InputError
from partreid.common.models.vit import PartViT
from partreid.pass_pretrain.augment import CropLayout


class DINOHead(nn.Module):
    """DINO projection head (PASS ``vision_transformer.py`` ``DINOHead``).

    x (N, in_dim) → MLP in_dim → hidden → … → bottleneck (GELU between layers, optional BatchNorm) → L2
    normalisation → weight-normalised bias-free linear layer bottleneck → out_dim → logits (N, out_dim).

    The last layer is ``torch.nn.utils.parametrizations.weight_norm`` over rows (dim 0): weight = g·v/‖v‖ with
    the magnitude g (parameter ``last_layer.parametrizations.weight.original0``, shape (out_dim, 1)) set to 1.
    With ``norm_last_layer=True`` (PASS default, student and teacher) g is frozen, so the layer is a cosine
    classifier over ``out_dim`` prototypes. MLP linears get trunc-normal std 0.02 init and zero bias; the last
    layer keeps PyTorch's default init, as in DINO. Parameter names contain ``last_layer`` so the epoch-0 freeze
    (PASS ``utils.py`` ``cancel_gradients_last_layer``) can find them.

    Args:
        in_dim: backbone width D.
        out_dim: number of prototypes K (65536 in PASS).
        hidden_dim: MLP width (2048).
        bottleneck_dim: width before the last layer (256).
        nlayers: number of MLP linear layers (3).
        use_bn: BatchNorm1d after hidden linears (False in PASS).
        norm_last_layer: freeze the weight-norm magnitude at 1.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        nlayers = max(int(nlayers), 1)
        if nlayers == 1:
            layers: List[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            for out in [hidden_dim] * (nlayers - 2) + [bottleneck_dim]:
                layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
                layers += [nn.GELU(), nn.Linear(hidden_dim, out)]
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False), name="weight", dim=0)
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)
        self.out_dim = int(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in_dim) → logits (N, out_dim)."""
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


class MultiCropOutput(NamedTuple):
    """Head outputs of one multi-crop forward.

    Attributes:
        cls: (V·B, K) CLS-head logits, views in crop order (view v occupies rows v·B … (v+1)·B−1).
        parts: P tensors; ``parts[k]`` is (len(layout.part_views(k))·B, K): PART_{k+1}-head logits of the global
            views then of band k's local crops (teacher: global views only).
    """

    cls: torch.Tensor
    parts: Tuple[torch.Tensor, ...]


class PASSMultiCrop(nn.Module):
    """Backbone + 1+P DINO heads with PASS's token routing (PASS ``utils.py`` ``MultiCropWrapper``).

    * Global views (all the same size) are concatenated and run as ONE backbone call with all tokens
      ``[CLS, PART1..P]``; their CLS output goes to head 0 and PART_k output to head k.
    * Band k's local crops are concatenated and run as ONE backbone call ``[CLS, PART_{k+1}]``; their CLS output
      goes to head 0, PART output to head k+1.
    * Each head then runs once on all its inputs (concatenated in crop order).

    The view list is validated against ``layout`` (:meth:`CropLayout.check_views`). A list of exactly
    ``layout.n_global`` views is the teacher's input (global views only).

    Args:
        backbone: :class:`common.models.vit.PartViT` with ``num_parts == layout.n_bands``.
        layout: crop layout of the augmentation.
        out_dim, hidden_dim, bottleneck_dim, use_bn, norm_last_layer: see :class:`DINOHead`.

    Raises:
        InputError: the layout's band count differs from the backbone's part-token count.
    """

    def __init__(self, backbone: PartViT, layout: CropLayout, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        if layout.n_bands != backbone.num_parts:
            raise InputError(f"crop layout has {layout.n_bands} bands but the backbone has {backbone.num_parts} "
                             "part tokens")
        self.backbone = backbone
        self.layout = layout
        self.heads = nn.ModuleList([
            DINOHead(backbone.embed_dim, out_dim, hidden_dim, bottleneck_dim, use_bn=use_bn,
                     norm_last_layer=norm_last_layer) for _ in range(1 + backbone.num_parts)])

    def forward(self, views: Sequence[torch.Tensor]) -> MultiCropOutput:
        """views: list of (B, 3, h, w) batches in crop order (all views, or the global views only) →
        :class:`MultiCropOutput`."""
        lay = self.layout
        globals_only = len(views) == lay.n_global
        lay.check_views(views, teacher=globals_only)
        n_parts = lay.n_bands
        tokens = self.backbone.forward_global_tokens(torch.cat([views[i] for i in lay.global_indices]))
        cls_feats = [tokens[:, 0]]
        part_feats = [[tokens[:, k + 1]] for k in range(n_parts)]
        if not globals_only and lay.local_per_band > 0:
            for band in range(n_parts):
                out = self.backbone.forward_band(torch.cat([views[i] for i in lay.band_indices(band)]), band)
                cls_feats.append(out[:, 0])
                part_feats[band].append(out[:, 1])
        cls_logits = self.heads[0](torch.cat(cls_feats))
        part_logits = tuple(self.heads[k + 1](torch.cat(part_feats[k])) for k in range(n_parts))
        return MultiCropOutput(cls_logits, part_logits)
