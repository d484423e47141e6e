"""Part-aware Vision Transformer of PASS (PASS ``vision_transformer.py``
``VisionTransformer``; the downstream PASS-reID ``TR/model/backbones/vit_pytorch.py``), built from timm blocks.

The backbone is a plain ViT/16 (timm ``PatchEmbed`` + ``Block``; attention is timm's) with one [CLS] token and
P = 3 learnable [PART] tokens. Every special token has its own learnable position vector; the patch positions
are one table laid out as the 16×8 grid of a 256×128 input, resized bicubically to the grid of whatever input
arrives (PASS ``vision_transformer.py`` ``interpolate_pos_encoding``).

Token routing (PASS ``vision_transformer.py`` ``VisionTransformer``):

* global view: ``[CLS, PART1, PART2, PART3, patches…]`` → the 4 special-token outputs after the final LayerNorm;
* local crop of band k (0-based here): ``[CLS, PART_{k+1}, patches…]`` → 2 outputs.

Parameter names are exactly the official PASS backbone layout (PASS ``convert_model_dino.py``):
``patch_embed.proj.*``, ``cls_token``, ``part_token1..3``, ``cls_pos``, ``part1_pos..part3_pos``, ``pos_embed`` (1,
128, D), ``blocks.*``, ``norm.*``, so released PASS checkpoints (``pass_vit_small_full.pth``,
``pass_vit_base_full.pth``) load unchanged, and a backbone written by :func:`save_backbone` can be read by the
official loaders.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block

from partreid.common.data.images import IMAGENET_MEAN, IMAGENET_STD
from partreid.common.errors import InputError
from partreid.common.fileio import atomic_path
from partreid.common.models.archs import ARCHS, VIT_ARCHS
from partreid.common.models.checkpoint import read_checkpoint


#: key fragments the official downstream loaders drop from a checkpoint (PASS ``convert_model_dino.py``): heads,
#: distillation token, …
_SKIP_FRAGMENTS = ("head", "dist", "pre_logits", "fc.", "classifier", "bottleneck")

#: name of the metadata entry :func:`save_backbone` adds next to the tensors.
META_KEY = "meta"


def resize_pos_grid(table: torch.Tensor, src_grid: Tuple[int, int], dst_grid: Tuple[int, int],
                    mode: str = "bicubic", pass_scale_quirk: bool = False) -> torch.Tensor:
    """Resize a patch position table laid out row-major on ``src_grid`` to ``dst_grid`` (PASS
    ``vision_transformer.py`` ``interpolate_pos_encoding``).

    Args:
        table: (1, h0·w0, D) float tensor, row-major over the (h0, w0) grid of patches.
        src_grid: (h0, w0) grid of ``table``.
        dst_grid: (h, w) wanted grid (patches along height, width).
        mode: ``'bicubic'`` (PASS pre-training, every forward) or ``'bilinear'`` (TransReID-style resize of a
            loaded table, PASS-reID ``TR/model/backbones/vit_pytorch.py`` ``resize_pos_embed``).
        pass_scale_quirk: reproduce PASS/DINO's "+0.1" trick: interpolate with scale factors
            ((h+0.1)/h0, (w+0.1)/w0) *used for the coordinate mapping* (as torch 1.8 did), which shifts positions
            by a fraction of a cell and makes even a same-size resize a slight resample. ``False`` (default)
            resizes to the explicit size, which is an exact identity when the grids agree; the spec records the
            difference as harmless.

    Returns:
        (1, h·w, D) tensor with the dtype of ``table``.
    """
    h0, w0 = src_grid
    h, w = dst_grid
    if table.shape[1] != h0 * w0:
        raise InputError(f"position table has {table.shape[1]} entries, not {h0}x{w0}={h0 * w0}")
    if not pass_scale_quirk and (h, w) == (h0, w0):
        return table
    d = table.shape[-1]
    grid = table.reshape(1, h0, w0, d).permute(0, 3, 1, 2)
    if pass_scale_quirk:
        out = F.interpolate(grid.float(), scale_factor=((h + 0.1) / h0, (w + 0.1) / w0), mode=mode,
                            align_corners=False, recompute_scale_factor=False)
        if tuple(out.shape[-2:]) != (h, w):  # floor(h0·(h+0.1)/h0) == h; guard against rounding surprises
            raise RuntimeError(f"position resize produced {tuple(out.shape[-2:])}, expected {(h, w)}")
    else:
        out = F.interpolate(grid.float(), size=(h, w), mode=mode, align_corners=False)
    return out.to(table.dtype).permute(0, 2, 3, 1).reshape(1, h * w, d)


class PartViT(nn.Module):
    """ViT/16 with one [CLS] and ``num_parts`` [PART] tokens (PASS ``vision_transformer.py``
    ``VisionTransformer`` and ``interpolate_pos_encoding``).

    Args:
        arch: size name in :data:`partreid.common.models.archs.VIT_ARCHS` (``vit_tiny`` D=192/3 heads, ``vit_small`` 384/6, ``vit_base``
            768/12). ``embed_dim``/``num_heads`` override it.
        depth: number of transformer blocks (12 in the paper; smaller values for tests).
        image_size: default input (H, W) in pixels; the position table ``pos_embed`` has the grid
            (H/patch, W/patch), i.e. (1, 128, D) for 256×128.
        patch_size: patch side in pixels (16).
        num_parts: P, number of [PART] tokens (3 in PASS; parameter names ``part_token1..P``).
        mlp_ratio: MLP hidden width / D (4).
        drop_path_rate: stochastic depth of the last block; block i gets ``rate·i/(depth-1)`` (linear 0 → rate;
            0.1 for the PASS student, 0 for the teacher).
        pixel_mean, pixel_std: normalisation the weights expect (ImageNet statistics for PASS pre-training).
        pass_scale_quirk: see :func:`resize_pos_grid` (default ``False``: resize to the explicit grid).

    Attributes:
        embed_dim (int), num_parts (int), image_size ((H, W)), patch_size (int), pixel_mean, pixel_std (3-tuples),
        arch (str), depth (int), num_heads (int).

    Inputs are float tensors (B, 3, H, W) with H and W multiples of ``patch_size``; outputs follow the input dtype
    policy of autocast. Initialisation (PASS ``vision_transformer.py`` ``VisionTransformer``): tokens, ``pos_embed``
    and part positions trunc-normal std 0.02, ``cls_pos`` zero, Linear trunc-normal std 0.02 with zero bias, LayerNorm
    weight 1 / bias 0.
    """

    def __init__(self, arch: str = "vit_small", *, embed_dim: Optional[int] = None, depth: int = 12,
                 num_heads: Optional[int] = None, image_size: Tuple[int, int] = (256, 128), patch_size: int = 16,
                 num_parts: int = 3, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 pixel_mean: Sequence[float] = IMAGENET_MEAN, pixel_std: Sequence[float] = IMAGENET_STD,
                 pass_scale_quirk: bool = False):
        super().__init__()
        if arch not in VIT_ARCHS and (embed_dim is None or num_heads is None):
            raise InputError(f"unknown ViT arch {arch!r}; choose one of {', '.join(VIT_ARCHS)}")
        spec = ARCHS.get(arch, {})
        self.arch = arch
        self.embed_dim = int(embed_dim if embed_dim is not None else spec["embed_dim"])
        self.num_heads = int(num_heads if num_heads is not None else spec["num_heads"])
        self.depth = int(depth)
        self.num_parts = int(num_parts)
        self.patch_size = int(patch_size)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        if self.image_size[0] % patch_size or self.image_size[1] % patch_size:
            raise InputError(f"image size {self.image_size} is not a multiple of the patch size {patch_size}")
        if self.depth < 1 or self.num_parts < 1:
            raise InputError(f"depth ({depth}) and num_parts ({num_parts}) must be positive")
        self.grid = (self.image_size[0] // patch_size, self.image_size[1] // patch_size)
        self.pixel_mean = tuple(float(v) for v in pixel_mean)
        self.pixel_std = tuple(float(v) for v in pixel_std)
        self.pass_scale_quirk = bool(pass_scale_quirk)
        d = self.embed_dim

        self.patch_embed = PatchEmbed(img_size=self.image_size, patch_size=patch_size, in_chans=3, embed_dim=d,
                                      strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, d))
        for k in range(1, self.num_parts + 1):
            setattr(self, f"part_token{k}", nn.Parameter(torch.zeros(1, 1, d)))
            setattr(self, f"part{k}_pos", nn.Parameter(torch.zeros(1, 1, d)))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], d))
        rates = torch.linspace(0, drop_path_rate, self.depth).tolist()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList([
            Block(d, self.num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=rates[i], norm_layer=norm_layer)
            for i in range(self.depth)])
        self.norm = norm_layer(d)

        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        for k in range(1, self.num_parts + 1):
            trunc_normal_(getattr(self, f"part_token{k}"), std=0.02)
            trunc_normal_(getattr(self, f"part{k}_pos"), std=0.02)
        # cls_pos stays zero (PASS ``vision_transformer.py`` ``VisionTransformer``)
        self.apply(self._init_module)

    @staticmethod
    def _init_module(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------------------------ tokens
    def part_token(self, k: int) -> nn.Parameter:
        """[PART] token ``k`` (1-based, as in the parameter names), shape (1, 1, D)."""
        return getattr(self, f"part_token{k}")

    def part_pos(self, k: int) -> nn.Parameter:
        """Position vector of [PART] token ``k`` (1-based), shape (1, 1, D)."""
        return getattr(self, f"part{k}_pos")

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth after construction (e.g. 0.3 for PASS's USL fine-tuning, PASS-reID
        ``CC-PASS/examples/cluster_contrast_train_usl.py``): block i gets ``rate·i/(depth-1)``, as at construction.
        Uses timm's ``DropPath``."""
        self.drop_path_rate = float(rate)
        for r, block in zip(torch.linspace(0, rate, self.depth).tolist(), self.blocks):
            block.drop_path1 = DropPath(r) if r > 0 else nn.Identity()
            block.drop_path2 = DropPath(r) if r > 0 else nn.Identity()

    def grid_pos(self, grid: Tuple[int, int]) -> torch.Tensor:
        """Patch position table resized (bicubic, PASS ``vision_transformer.py`` ``interpolate_pos_encoding``) to
        ``grid`` = (H/patch, W/patch); (1, h·w, D)."""
        return resize_pos_grid(self.pos_embed, self.grid, grid, mode="bicubic",
                               pass_scale_quirk=self.pass_scale_quirk)

    def _encode(self, x: torch.Tensor, parts: Sequence[int]) -> torch.Tensor:
        """Run ``[CLS, PART_k for k in parts, patches]`` through the blocks; returns the (B, 1+len(parts), D)
        special-token outputs after the final LayerNorm (LayerNorm is per token, so only those are normed)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"PartViT expects images (B, 3, H, W); got shape {tuple(x.shape)}")
        b, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise InputError(f"input size {h}x{w} is not a multiple of the patch size {p}")
        patches = self.patch_embed(x) + self.grid_pos((h // p, w // p))
        special = [self.cls_token + self.cls_pos]
        special += [self.part_token(k) + self.part_pos(k) for k in parts]
        special_t = torch.cat(special, dim=1).expand(b, -1, -1)
        seq = torch.cat([special_t.to(patches.dtype), patches], dim=1)
        for blk in self.blocks:
            seq = blk(seq)
        return self.norm(seq[:, :len(special)])

    def forward_global_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Global-view routing ``[CLS, PART1..P, patches]`` (PASS ``vision_transformer.py`` ``VisionTransformer``). x:
        (B, 3, H, W) → (B, 1+P, D)."""
        return self._encode(x, range(1, self.num_parts + 1))

    def forward_band(self, x: torch.Tensor, band: int) -> torch.Tensor:
        """Local-crop routing for band ``band`` (0-based): ``[CLS, PART_{band+1}, patches]`` (PASS
        ``vision_transformer.py`` ``VisionTransformer``).

        x: (B, 3, h, w) → (B, 2, D) = (CLS output, PART_{band+1} output). Raises InputError for a bad band.
        """
        if not 0 <= int(band) < self.num_parts:
            raise InputError(f"band {band} out of range 0..{self.num_parts - 1}")
        return self._encode(x, [int(band) + 1])

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Backbone interface (notes/interfaces.md): x (B, 3, H, W) → (cls (B, D), parts (B, P, D))."""
        out = self.forward_global_tokens(x)
        return out[:, 0], out[:, 1:]

    def config(self) -> Dict[str, Any]:
        """Metadata describing this backbone (stored by :func:`save_backbone`)."""
        return {"arch": self.arch, "embed_dim": self.embed_dim, "depth": self.depth, "num_heads": self.num_heads,
                "num_parts": self.num_parts, "patch_size": self.patch_size, "image_size": list(self.image_size),
                "pixel_mean": list(self.pixel_mean), "pixel_std": list(self.pixel_std)}


def build_part_vit(arch: str = "vit_small", **kwargs: Any) -> PartViT:
    """Build a :class:`PartViT` of size ``arch`` (``vit_tiny``/``vit_small``/``vit_base``); ``kwargs`` go to
    :class:`PartViT` (e.g. ``depth``, ``image_size``, ``drop_path_rate``). Raises InputError for an unknown arch."""
    if arch not in VIT_ARCHS:
        raise InputError(f"unknown ViT arch {arch!r}; choose one of {', '.join(VIT_ARCHS)}")
    return PartViT(arch, **kwargs)


# ------------------------------------------------------------------------------------------------ checkpoints
@dataclass
class LoadReport:
    """What :func:`load_vit_weights` did.

    Attributes:
        source_format: ``'pass'`` (official PASS backbone layout, incl. our export), ``'pass-teacher'`` (a
            DINO/PASS training checkpoint holding ``teacher``; the teacher backbone is used) or ``'timm'``.
        loaded: number of tensors copied into the model.
        skipped: checkpoint keys dropped on purpose (heads, distillation tokens, … as the official loaders do).
        notes: conversions applied (position-table resize, part tokens initialised from [CLS], …).
        meta: our metadata when the file was written by :func:`save_backbone` (else empty).
    """

    source_format: str
    loaded: int = 0
    skipped: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(torch.is_tensor(v) for v in obj.values())


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def unwrap_backbone_state(obj: Any) -> Tuple[Dict[str, torch.Tensor], str, Dict[str, Any], List[str]]:
    """Find the backbone tensors in a loaded checkpoint object (PASS ``convert_model_dino.py``).

    Accepts a flat state dict (official PASS layout or timm ViT, optionally with ``module.``/``backbone.``
    prefixes), a dict wrapping one under ``model``/``state_dict``, a DINO/PASS training checkpoint with a
    ``teacher`` entry (only ``backbone.*`` keys are kept, like PASS/convert_model_dino.py), or our export with its
    :data:`META_KEY` entry.

    Returns:
        (state dict with prefixes stripped and head-like keys removed, format name ``'pass'``/``'pass-teacher'``/
        ``'timm'``, metadata dict, list of skipped keys).

    Raises:
        InputError: nothing that looks like ViT weights is found.
    """
    if not isinstance(obj, Mapping):
        raise InputError(f"checkpoint is a {type(obj).__name__}, not a state dict")
    meta: Dict[str, Any] = {}
    teacher = False
    if "teacher" in obj and isinstance(obj["teacher"], Mapping):
        meta = dict(obj.get(META_KEY) or {})
        obj = obj["teacher"]
        teacher = True
    else:
        for wrapper in ("model", "state_dict"):
            if not _is_tensor_dict(obj) and isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
        if isinstance(obj.get(META_KEY), Mapping):
            meta = dict(obj[META_KEY])
    sd: Dict[str, torch.Tensor] = {}
    skipped: List[str] = []
    for key, value in obj.items():
        if key == META_KEY:
            continue
        if teacher and not (key.startswith("backbone.") or key.startswith("module.backbone.")):
            skipped.append(key)
            continue
        short = _strip_prefixes(key)
        if any(frag in short for frag in _SKIP_FRAGMENTS) or not torch.is_tensor(value):
            skipped.append(key)
            continue
        sd[short] = value
    if "cls_token" not in sd or "pos_embed" not in sd:
        raise InputError("checkpoint holds no ViT backbone (no cls_token/pos_embed after removing "
                         "'module.'/'backbone.' prefixes)")
    fmt = "pass-teacher" if teacher else ("pass" if "cls_pos" in sd else "timm")
    return sd, fmt, meta, skipped


def _square(n: int) -> Optional[int]:
    r = int(round(math.sqrt(n)))
    return r if r * r == n else None


def _infer_grid(n: int, meta: Mapping[str, Any], model_grid: Tuple[int, int]) -> Tuple[int, int]:
    """Grid (h, w) of a checkpoint position table of ``n`` patch entries."""
    if meta.get("image_size") and meta.get("patch_size"):
        h, w = (int(v) // int(meta["patch_size"]) for v in meta["image_size"])
        if h * w == n:
            return h, w
    if n == model_grid[0] * model_grid[1]:
        return model_grid
    side = _square(n)
    if side:  # square table, e.g. an ImageNet timm ViT (14×14 at 224)
        return side, side
    side = _square(2 * n)
    if side and side % 2 == 0:  # PASS / TransReID layout with height:width = 2 (hw_ratio 2, TransReID ``load_param``)
        return side, side // 2
    raise InputError(f"cannot tell the grid of a position table with {n} entries (neither square nor 2:1)")


def _convert_timm(sd: Dict[str, torch.Tensor], num_parts: int, notes: List[str]) -> Dict[str, torch.Tensor]:
    """timm ViT → PASS layout: split the [CLS] position off ``pos_embed``; part tokens/positions copy [CLS]."""
    sd = dict(sd)
    pos = sd["pos_embed"]
    n = pos.shape[1]
    if _square(n - 1) is not None or (_square(n) is None and _square(2 * (n - 1)) is not None):
        sd["cls_pos"] = pos[:, :1].clone()
        sd["pos_embed"] = pos[:, 1:].clone()
    else:  # timm 'no_embed_class' models: no position for [CLS]
        sd["cls_pos"] = torch.zeros_like(sd["cls_token"])
        notes.append("timm table has no [CLS] position: cls_pos set to zero")
    for k in range(1, num_parts + 1):
        sd[f"part_token{k}"] = sd["cls_token"].clone()
        sd[f"part{k}_pos"] = sd["cls_pos"].clone()
    notes.append(f"timm ViT: cls_pos split off pos_embed; part_token1..{num_parts} and part positions "
                 "initialised from [CLS]")
    return sd


def _short_list(items: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", … (+{len(items) - limit} more)" if len(items) > limit else "")


def load_vit_weights(model: PartViT, checkpoint: Any, *, pos_interp: str = "bilinear") -> LoadReport:
    """Load ViT weights into ``model`` from an official PASS backbone, a PASS/DINO training checkpoint, a timm ViT
    state dict, or our own export (PASS ``convert_model_dino.py``; PASS-reID
    ``TR/model/backbones/vit_pytorch.py`` ``load_param``).

    Args:
        model: the :class:`PartViT` to fill (its shape decides what must be present).
        checkpoint: the object returned by ``torch.load`` (see :func:`unwrap_backbone_state` for the accepted
            wrappings), or a path to such a file.
        pos_interp: interpolation for a checkpoint position table whose grid differs from the model's
            (``'bilinear'``, as TransReID's ``resize_pos_embed`` does when fine-tuning at 384×128;
            ``'bicubic'`` also accepted). Special-token positions are copied unchanged.

    Returns:
        :class:`LoadReport`.

    Raises:
        InputError: one line naming the missing and unexpected keys and the shape mismatches, when the
            checkpoint does not fit ``model``; or when the file holds no ViT weights.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint)
    sd, fmt, meta, skipped = unwrap_backbone_state(checkpoint)
    report = LoadReport(source_format=fmt, skipped=skipped, meta=meta)
    if fmt == "timm":
        sd = _convert_timm(sd, model.num_parts, report.notes)
    pos = sd.get("pos_embed")
    if torch.is_tensor(pos) and pos.ndim == 3 and pos.shape[-1] == model.embed_dim \
            and pos.shape[1] != model.pos_embed.shape[1]:
        src = _infer_grid(pos.shape[1], meta, model.grid)
        sd["pos_embed"] = resize_pos_grid(pos.float(), src, model.grid, mode=pos_interp).to(pos.dtype)
        report.notes.append(f"pos_embed resized {src[0]}x{src[1]} -> {model.grid[0]}x{model.grid[1]} ({pos_interp})")
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys [{_short_list(missing)}]")
        if unexpected:
            parts.append(f"unexpected keys [{_short_list(unexpected)}]")
        if shapes:
            parts.append(f"shape mismatch [{_short_list(shapes, 3)}]")
        raise InputError(f"checkpoint ({fmt} layout) does not fit PartViT {model.arch} "
                         f"(D={model.embed_dim}, depth {model.depth}): " + "; ".join(parts))
    model.load_state_dict({k: sd[k] for k in own}, strict=True)
    report.loaded = len(own)
    return report


def detect_vit_arch(state_dict: Any) -> str:
    """Size name (``vit_tiny``/``vit_small``/``vit_base``) of ViT weights, from the width of ``cls_token``.

    Accepts the same objects as :func:`unwrap_backbone_state`. Raises InputError for an unknown width.
    """
    return vit_geometry(state_dict)["arch"]


def vit_geometry(state_dict: Any) -> Dict[str, Any]:
    """Arch, width D, depth and number of part tokens of ViT weights, read from the tensor shapes.

    Returns dict ``arch``, ``embed_dim``, ``depth``, ``num_parts`` (0 for timm weights) and ``meta``.
    Raises InputError when the width matches no known size.
    """
    sd, fmt, meta, _ = unwrap_backbone_state(state_dict)
    width = int(sd["cls_token"].shape[-1])
    arch = next((name for name in VIT_ARCHS if ARCHS[name]["embed_dim"] == width), None)
    if arch is None:
        raise InputError(f"ViT width {width} matches none of "
                         + ", ".join(f"{k} (D={ARCHS[k]['embed_dim']})" for k in VIT_ARCHS))
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    num_parts = sum(1 for k in sd if k.startswith("part_token"))
    return {"arch": arch, "embed_dim": width, "depth": depth, "num_parts": num_parts, "format": fmt, "meta": meta}


def load_part_vit(checkpoint: Any, *, image_size: Optional[Tuple[int, int]] = None,
                  pos_interp: str = "bilinear", **kwargs: Any) -> Tuple[PartViT, LoadReport]:
    """Build the :class:`PartViT` that fits ``checkpoint`` (path or loaded object) and load it.

    Arch and depth come from the tensor shapes; image size and pixel mean/std from our metadata when present
    (else 256×128 and ImageNet statistics). ``image_size`` overrides the input size (the position table is
    then resized with ``pos_interp``, as TransReID ``resize_pos_embed``); other ``kwargs`` go to :class:`PartViT`.

    Returns (model, report). Raises InputError as :func:`load_vit_weights`.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint)
    geo = vit_geometry(checkpoint)
    meta = geo["meta"]
    opts: Dict[str, Any] = {"depth": geo["depth"]}
    if meta.get("image_size"):
        opts["image_size"] = tuple(meta["image_size"])
    if meta.get("pixel_mean") and meta.get("pixel_std"):
        opts["pixel_mean"], opts["pixel_std"] = tuple(meta["pixel_mean"]), tuple(meta["pixel_std"])
    if image_size is not None:
        opts["image_size"] = tuple(image_size)
    opts.update(kwargs)
    model = build_part_vit(geo["arch"], **opts)
    report = load_vit_weights(model, checkpoint, pos_interp=pos_interp)
    return model, report


def backbone_state_dict(model: PartViT) -> Dict[str, torch.Tensor]:
    """The backbone's tensors in the official PASS key layout (PASS ``convert_model_dino.py``), detached, on the CPU,
    float32."""
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()}


def save_backbone(model_or_state: Union[PartViT, Mapping[str, torch.Tensor]], out: Union[str, os.PathLike],
                  meta: Optional[Mapping[str, Any]] = None) -> Path:
    """Write a backbone file atomically: a flat dict in the official PASS key layout (PASS ``convert_model_dino.py``)
    plus one :data:`META_KEY` entry (arch, image_size, patch_size, pixel_mean/std, …) that our loader reads and
    official loaders do not use.

    Args:
        model_or_state: a :class:`PartViT` or its state dict (official key names).
        out: destination path (``.pth``).
        meta: metadata; taken from ``model.config()`` when a model is given, updated with ``meta``.

    Returns:
        the written path.
    """
    if isinstance(model_or_state, PartViT):
        state = backbone_state_dict(model_or_state)
        info: Dict[str, Any] = model_or_state.config()
    else:
        state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in model_or_state.items()}
        info = {}
    info.update(dict(meta or {}))
    info.setdefault("format", "partreid.pass_backbone")
    info.setdefault("format_version", 1)
    payload: Dict[str, Any] = dict(state)
    payload[META_KEY] = info
    out = Path(out)
    with atomic_path(out) as tmp:
        torch.save(payload, tmp)
    return out
