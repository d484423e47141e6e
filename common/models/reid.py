"""Re-ID head on a part backbone: fusion, BNNecks, bias-free classifiers, ghost BatchNorm, checkpoints.

Used by PPLR fine-tuning (PPLR ``pplr/models/resnet_part.py``) on a PASS ViT (global = CLS fused with the mean of the
PART tokens, PASS-reID ``TR/model/make_model.py`` ``build_transformer_pass``) or on PPLR's ResNet-50 stripes.

Classifier width and optimizer state (design choice)
-----------------------------------------------------
The reference builds each classifier once with a fixed 3000 rows, overwrites rows ``[:C]`` with the cluster centroids
at every epoch and slices the logits to ``[:, :C]``; the Adam state of those weight tensors is never reset (PPLR
``examples/train_pplr.py``). :class:`ReIDModel` does the same: ``num_classes`` is the classifier *capacity* (rows) and
:meth:`ReIDModel.reset_classifiers` writes the C centroids into rows ``[:C]`` and sets the *active* width C (a
persistent buffer, so it is checkpointed); ``forward`` returns logits of width C. Rows beyond C keep stale values,
exactly like the reference (they still receive the L2 weight-decay part of Adam's update, as there). When an epoch has
more clusters than rows, the classifiers grow: each weight becomes a new, larger ``nn.Parameter`` holding the old
rows, and the optimizer passed to :meth:`ReIDModel.reset_classifiers` gets the new parameter in place of the old one,
with its state tensors (Adam ``exp_avg``/``exp_avg_sq``, SGD ``momentum_buffer``) zero-padded, so the state of
existing rows is kept. Loading a state dict with another capacity resizes the weights in place instead (same parameter
objects, so an optimizer built before ``load_state_dict`` stays valid). Growing parameters under
DistributedDataParallel is not supported: with DDP, construct the model with enough capacity (e.g. 3000 as the
reference, or the train-set size).

Ghost BatchNorm (``bn_groups``)
-------------------------------
The reference trains with ``nn.DataParallel`` on 4 GPUs: each replica sees a contiguous quarter (16 images)
of the 64-image batch and computes BatchNorm statistics on it (PPLR ``examples/train_pplr.py`` wraps the model in
``nn.DataParallel``; the published runs used 4 GPUs). :class:`GroupedBatchNorm1d` /
:class:`GroupedBatchNorm2d` reproduce that on one device: in train mode the batch is split like DataParallel
splits it (``torch.chunk`` along dim 0 into G contiguous groups) and each group is normalised with its own
batch statistics. Running statistics: DataParallel's replica on device 0 shares its buffers with the module,
and the other replicas' in-place buffer updates are lost, so the running mean/var move with the statistics of
the FIRST group only (momentum update, unbiased variance, ``num_batches_tracked`` + 1 per forward). That is
what we emulate. ``bn_groups`` applies to every BatchNorm1d/2d of the model: the BNNecks and, for ResNet-50,
the backbone's BatchNorm2d layers (which DataParallel splits in the same way). Eval mode uses the running
statistics, as plain BatchNorm. Under DDP, ``bn_groups`` splits each rank's own batch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from partreid.common.errors import InputError
from partreid.common.fileio import atomic_path
from partreid.common.models.checkpoint import read_checkpoint
from partreid.common.models.resnet import ResNetStripes
from partreid.common.models.vit import build_part_vit

__all__ = [
    "GroupedBatchNorm1d", "GroupedBatchNorm2d", "convert_to_grouped_bn", "cluster_centroids", "ReIDModel",
    "REID_FORMAT", "save_reid_checkpoint", "load_reid_checkpoint", "build_backbone",
]

REID_FORMAT = "partreid.reid_model"
REID_FORMAT_VERSION = 1
FUSIONS = ("cat", "mean", "cls")


def fuse_features(g: torch.Tensor, parts: torch.Tensor, fusion: str) -> torch.Tensor:
    """Global feature from the [CLS]/GAP output ``g`` (B, D) and the part outputs ``parts`` (B, P, D).

    With f_p = mean over parts: ``'cat'`` → [g ; f_p] (B, 2D); ``'mean'`` → (g + f_p)/2 (B, D); ``'cls'`` → g
    (B, D) (PASS-reID ``TR/model/make_model.py`` ``build_transformer_pass``; CC-PASS
    ``clustercontrast/models/vision_transformer.py``).

    Raises:
        InputError: unknown ``fusion``.
    """
    if fusion == "cls":
        return g
    if fusion == "cat":
        return torch.cat([g, parts.mean(dim=1)], dim=1)
    if fusion == "mean":
        return (g + parts.mean(dim=1)) / 2
    raise InputError(f"unknown feature fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")


# ----------------------------------------------------------------------------------------------- ghost BN
class _GroupedBNMixin:
    """Train-mode forward with per-group batch statistics (see the module docstring)."""

    groups: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - documented on the classes
        use_batch_stats = self.training or self.running_mean is None
        if self.groups <= 1 or not use_batch_stats:
            return super().forward(x)
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        update = self.training and self.track_running_stats and self.running_mean is not None
        if update and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)
        outs = []
        for i, chunk in enumerate(torch.chunk(x, self.groups, dim=0)):
            first = update and i == 0  # DataParallel keeps only device 0's buffer updates
            outs.append(F.batch_norm(chunk, self.running_mean if first else None,
                                     self.running_var if first else None, self.weight, self.bias,
                                     True, factor, self.eps))
        return torch.cat(outs, dim=0)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", groups={self.groups}"


class GroupedBatchNorm1d(_GroupedBNMixin, nn.BatchNorm1d):
    """Ghost BatchNorm1d: drop-in (isinstance- and state-dict-compatible) for ``nn.BatchNorm1d``.

    Input float (B, C) or (B, C, L). In train mode with ``groups`` = G > 1 the batch is split into G contiguous
    groups as ``torch.chunk`` (= nn.DataParallel's scatter) does, each normalised with its own batch mean and
    biased variance; running stats are updated from the first group only (DataParallel device-0 rule). With
    G = 1, or in eval mode, it is exactly ``nn.BatchNorm1d``.

    Args: as ``nn.BatchNorm1d`` plus ``groups`` (int ≥ 1). Source: PPLR ``examples/train_pplr.py`` under
    ``nn.DataParallel`` on 4 GPUs (each replica normalises a quarter of the batch).

    Raises:
        InputError: ``groups`` < 1.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, groups: int = 1, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.groups = _check_groups(groups)


class GroupedBatchNorm2d(_GroupedBNMixin, nn.BatchNorm2d):
    """Ghost BatchNorm2d for (B, C, H, W) inputs; same rules as :class:`GroupedBatchNorm1d`."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, groups: int = 1, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.groups = _check_groups(groups)


def _check_groups(groups) -> int:
    if isinstance(groups, bool) or int(groups) != groups or int(groups) < 1:
        raise InputError(f"bn groups must be an integer >= 1, got {groups!r}")
    return int(groups)


def convert_to_grouped_bn(module: nn.Module, groups: int) -> nn.Module:
    """Replace every ``nn.BatchNorm1d``/``nn.BatchNorm2d`` inside ``module`` by its grouped version, in place.

    The new layers share the old layers' parameters and buffers (same tensors, same state-dict keys) and train
    flag; already-grouped layers just get ``groups`` set. SyncBatchNorm and other norms are left alone.
    Returns ``module`` (or the replacement when ``module`` itself is a BatchNorm).

    Raises:
        InputError: ``groups`` < 1.
    """
    groups = _check_groups(groups)

    def convert(bn: nn.Module) -> nn.Module:
        if isinstance(bn, _GroupedBNMixin):
            bn.groups = groups
            return bn
        cls = GroupedBatchNorm2d if type(bn) is nn.BatchNorm2d else GroupedBatchNorm1d \
            if type(bn) is nn.BatchNorm1d else None
        if cls is None:
            return bn
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, groups=groups)
        for name in ("weight", "bias"):
            setattr(new, name, getattr(bn, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            new._buffers[name] = bn._buffers.get(name)
        new.train(bn.training)
        return new

    root = convert(module)
    if root is not module:
        return root
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            new = convert(child)
            if new is not child:
                setattr(parent, name, new)
    return module


# ------------------------------------------------------------------------------------------- centroids
def cluster_centroids(features, labels) -> torch.Tensor:
    """L2-normalised mean feature of each cluster: features (N, D) float, labels (N,) int → (C, D) float32.

    Labels must be 0..C−1 (every id present); −1 (DBSCAN outlier) rows are ignored. Each row is the mean of its
    cluster's features, then L2-normalised, which is what PPLR writes into the classifier rows (PPLR
    ``examples/train_pplr.py``; the features passed are the extracted, already L2-normalised ones). Pure function.

    Raises:
        InputError: shape mismatch, no clustered sample, labels < −1 or ids missing from 0..C−1.
    """
    feats = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    labs = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if feats.dim() != 2 or labs.dim() != 1 or feats.shape[0] != labs.shape[0]:
        raise InputError(f"features (N, D) and labels (N,) expected, got {tuple(feats.shape)} and {tuple(labs.shape)}")
    labs = labs.to(device=feats.device, dtype=torch.long)
    keep = labs >= 0
    if bool((labs < -1).any()):
        raise InputError("labels must be >= -1 (-1 = outlier)")
    if not bool(keep.any()):
        raise InputError("no clustered sample: every label is -1")
    feats, labs = feats[keep].float(), labs[keep]
    num = int(labs.max()) + 1
    counts = torch.bincount(labs, minlength=num)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten()[:5].tolist()
        raise InputError(f"cluster ids must be contiguous 0..{num - 1}; ids {missing} have no member")
    sums = torch.zeros(num, feats.shape[1], dtype=feats.dtype, device=feats.device).index_add_(0, labs, feats)
    return F.normalize(sums / counts[:, None].to(feats.dtype), dim=1)


# ------------------------------------------------------------------------------------------- the model
def _make_neck(dim: int, groups: int) -> GroupedBatchNorm1d:
    neck = GroupedBatchNorm1d(dim, groups=groups)
    nn.init.ones_(neck.weight)
    nn.init.zeros_(neck.bias)
    neck.bias.requires_grad_(False)  # BNNeck: bias frozen at 0
    return neck


def _make_classifier(dim: int, rows: int) -> nn.Linear:
    lin = nn.Linear(dim, max(rows, 1), bias=False)
    if rows == 0:
        lin.weight = nn.Parameter(torch.empty(0, dim))
        lin.out_features = 0
    else:
        nn.init.normal_(lin.weight, std=0.001)
    return lin


class ReIDModel(nn.Module):
    """Part backbone + fused global BNNeck + per-part BNNecks + bias-free linear classifiers.

    Args:
        backbone: module with ``embed_dim`` (D), ``num_parts`` (P) and ``forward(x) -> (g (B,D), parts (B,P,D))``
            (interfaces.md: PartViT or :class:`~common.models.resnet.ResNetStripes`).
        fusion: global feature from (g, parts), with f_p = mean over parts (PASS-reID ``TR/model/make_model.py``
            ``build_transformer_pass``): ``'cat'`` = [g ; f_p] (Dg = 2D), ``'mean'`` = (g + f_p)/2 (Dg = D), ``'cls'``
            = g (Dg = D; ResNet GAP).
        num_classes: classifier capacity (rows); the active width is set by :meth:`reset_classifiers`
            (0 until then). See the module docstring for how widths and optimizer state are handled.
        bn_groups: ghost-BatchNorm groups G for every BatchNorm of the model (necks and ResNet backbone),
            1 = plain BatchNorm. See :class:`GroupedBatchNorm1d`.

    BNNecks are BatchNorm1d with weight 1, bias 0 and the bias frozen (``requires_grad=False``); classifiers
    are ``nn.Linear(·, num_classes, bias=False)`` initialised N(0, 0.001²) (PPLR ``pplr/models/resnet_part.py``). The
    backbone is modified in place when its BatchNorm layers are converted to grouped ones.

    Raises:
        InputError: unknown fusion, backbone without ``embed_dim``/``num_parts``, num_classes < 0, bn_groups < 1.
    """

    def __init__(self, backbone: nn.Module, fusion: str = "cat", num_classes: int = 0, bn_groups: int = 1):
        super().__init__()
        if fusion not in FUSIONS:
            raise InputError(f"unknown feature fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
        if not hasattr(backbone, "embed_dim") or not hasattr(backbone, "num_parts"):
            raise InputError("backbone must define embed_dim and num_parts")
        if int(num_classes) < 0:
            raise InputError(f"num_classes must be >= 0, got {num_classes}")
        groups = _check_groups(bn_groups)
        dim, parts = int(backbone.embed_dim), int(backbone.num_parts)
        self.backbone = backbone
        self.fusion = fusion
        self.global_dim = 2 * dim if fusion == "cat" else dim
        self.neck_global = _make_neck(self.global_dim, groups)
        self.neck_parts = nn.ModuleList(_make_neck(dim, groups) for _ in range(parts))
        self.classifier_global = _make_classifier(self.global_dim, int(num_classes))
        self.classifier_parts = nn.ModuleList(_make_classifier(dim, int(num_classes)) for _ in range(parts))
        self.register_buffer("active_classes", torch.tensor(0, dtype=torch.long))
        self.set_bn_groups(groups)

    # -- backbone passthrough
    @property
    def embed_dim(self) -> int:
        """D, the width of each part feature."""
        return int(self.backbone.embed_dim)

    @property
    def num_parts(self) -> int:
        """P, the number of parts."""
        return int(self.backbone.num_parts)

    @property
    def pixel_mean(self):
        return self.backbone.pixel_mean

    @property
    def pixel_std(self):
        return self.backbone.pixel_std

    @property
    def image_size(self):
        return self.backbone.image_size

    @property
    def num_classes(self) -> int:
        """Active classifier width C (logit columns), set by :meth:`reset_classifiers`."""
        return int(self.active_classes)

    @property
    def classifier_capacity(self) -> int:
        """Rows of the classifier weights (≥ :attr:`num_classes`)."""
        return int(self.classifier_global.weight.shape[0])

    @property
    def bn_groups(self) -> int:
        return self._bn_groups

    def set_bn_groups(self, groups: int) -> None:
        """Set the ghost-BN group count G for every BatchNorm of the model (converting plain ones in place).

        Raises:
            InputError: ``groups`` < 1.
        """
        self._bn_groups = _check_groups(groups)
        convert_to_grouped_bn(self, self._bn_groups)

    # -- features
    def fuse(self, g: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
        """Fused global feature from g (B, D) and parts (B, P, D) → (B, Dg) (:func:`fuse_features`)."""
        return fuse_features(g, parts, self.fusion)

    def _features(self, x: torch.Tensor):
        g, parts = self.backbone(x)
        gf = self.fuse(g, parts)
        gb = self.neck_global(gf)
        pb = torch.stack([neck(parts[:, k]) for k, neck in enumerate(self.neck_parts)], dim=1)
        return gf, parts, gb, pb

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Images float (B, 3, H, W) → dict of tensors (train or eval mode alike):

        - ``global_feat`` (B, Dg): fused global feature before the BNNeck;
        - ``global_bn`` (B, Dg): after the BNNeck (PPLR's f_g, not normalised);
        - ``parts_feat`` (B, P, D) before and ``parts_bn`` (B, P, D) after the part BNNecks;
        - ``logits_global`` (B, C) and ``logits_parts`` (B, P, C): the first C = :attr:`num_classes` rows of
          the bias-free classifiers applied to the BN features, no temperature (PPLR ``pplr/models/resnet_part.py``).
        """
        gf, parts, gb, pb = self._features(x)
        c = self.num_classes
        logits_g = F.linear(gb, self.classifier_global.weight[:c])
        logits_p = torch.stack([F.linear(pb[:, k], clf.weight[:c]) for k, clf in enumerate(self.classifier_parts)],
                               dim=1)
        return {"global_feat": gf, "global_bn": gb, "parts_feat": parts, "parts_bn": pb,
                "logits_global": logits_g, "logits_parts": logits_p}

    def extract(self, x: torch.Tensor, neck: str = "after") -> Tuple[torch.Tensor, torch.Tensor]:
        """Retrieval/clustering features: (global (B, Dg), parts (B, P, D)), NOT L2-normalised.

        ``neck='after'`` gives the BNNeck outputs (PPLR's features, PPLR ``examples/train_pplr.py``
        ``extract_all_features``); ``'before'`` the fused global and raw part features. Runs in the current train/eval
        mode and grad mode (the caller sets eval() and
        no_grad()).

        Raises:
            InputError: ``neck`` not 'after' or 'before'.
        """
        if neck not in ("after", "before"):
            raise InputError(f"neck must be 'after' or 'before', got {neck!r}")
        gf, parts, gb, pb = self._features(x)
        return (gb, pb) if neck == "after" else (gf, parts)

    # -- classifiers
    def _classifier_weights(self):
        return [self.classifier_global.weight] + [clf.weight for clf in self.classifier_parts]

    @torch.no_grad()
    def resize_classifiers(self, rows: int, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Change the classifier capacity to ``rows``, keeping the first min(old, rows) rows.

        Each resized weight becomes a NEW ``nn.Parameter`` (new rows N(0, 0.001²)): resizing a parameter in
        place breaks autograd while an old graph (e.g. the last ``loss`` of the previous epoch) is alive.
        Pass the ``optimizer`` built on the model: the old parameter is replaced by the new one in its param
        groups and its state moves along, with state tensors shaped like the old weight (Adam
        ``exp_avg``/``exp_avg_sq``, SGD ``momentum_buffer``) zero-padded or truncated row-wise, so the state
        of kept rows is preserved. Without it, an existing optimizer keeps training the orphaned old tensors.
        The active width is clipped to ``rows``.

        Raises:
            InputError: ``rows`` < 0.
        """
        self._resize(rows, optimizer, in_place=False)

    def _resize(self, rows: int, optimizer: Optional[torch.optim.Optimizer], in_place: bool) -> None:
        rows = int(rows)
        if rows < 0:
            raise InputError(f"classifier rows must be >= 0, got {rows}")
        for lin in [self.classifier_global, *self.classifier_parts]:
            w = lin.weight
            old = w.shape[0]
            if old == rows:
                continue
            lin.out_features = rows
            if in_place:  # only used when loading a state dict: keeps optimizers built before the load valid
                w.data = _resize_rows(w.data, rows, init_std=0.001)
                w.grad = None
                continue
            new = nn.Parameter(_resize_rows(w.detach(), rows, init_std=0.001), requires_grad=w.requires_grad)
            lin.weight = new
            if optimizer is None:
                continue
            for group in optimizer.param_groups:
                group["params"] = [new if p is w else p for p in group["params"]]
            if w in optimizer.state:
                st = optimizer.state.pop(w)
                for key, val in list(st.items()):
                    if isinstance(val, torch.Tensor) and val.dim() == 2 and val.shape[0] == old \
                            and val.shape[1] == new.shape[1]:
                        st[key] = _resize_rows(val, rows, init_std=0.0)
                optimizer.state[new] = st
        self.active_classes.fill_(min(self.num_classes, rows))

    @torch.no_grad()
    def reset_classifiers(self, global_centroids: torch.Tensor, part_centroids: torch.Tensor,
                          optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Write cluster centroids into the classifier rows and set the active width C (PPLR
        ``examples/train_pplr.py``).

        Args:
            global_centroids: float (C, Dg), one row per cluster (e.g. :func:`cluster_centroids` of the global
                features); rows are L2-normalised here.
            part_centroids: float (P, C, D), per-part centroids; L2-normalised here.
            optimizer: the training optimizer; always pass it. It is only touched when C exceeds the capacity
                (the grown parameters replace the old ones in it and their state is padded, see
                :meth:`resize_classifiers`); otherwise its state is left untouched, as in the reference.

        Raises:
            InputError: shapes do not match (C, Dg) / (P, C, D), or C = 0.
        """
        gc = torch.as_tensor(global_centroids)
        pc = torch.as_tensor(part_centroids)
        if gc.dim() != 2 or gc.shape[1] != self.global_dim or gc.shape[0] == 0:
            raise InputError(f"global centroids must be (C, {self.global_dim}) with C >= 1, got {tuple(gc.shape)}")
        c = int(gc.shape[0])
        if tuple(pc.shape) != (self.num_parts, c, self.embed_dim):
            raise InputError(f"part centroids must be ({self.num_parts}, {c}, {self.embed_dim}), got {tuple(pc.shape)}")
        if c > self.classifier_capacity:
            self.resize_classifiers(c, optimizer)
        weights = self._classifier_weights()
        weights[0][:c] = F.normalize(gc.float(), dim=1).to(weights[0])
        for k in range(self.num_parts):
            weights[k + 1][:c] = F.normalize(pc[k].float(), dim=1).to(weights[k + 1])
        self.active_classes.fill_(c)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Resize the classifiers to the checkpoint's capacity before the children load their weights.
        w = state_dict.get(prefix + "classifier_global.weight")
        if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] != self.classifier_capacity:
            self._resize(int(w.shape[0]), None, in_place=True)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _resize_rows(t: torch.Tensor, rows: int, init_std: float) -> torch.Tensor:
    out = torch.zeros(rows, *t.shape[1:], dtype=t.dtype, device=t.device)
    if init_std > 0 and rows > t.shape[0]:
        out[t.shape[0]:].normal_(0.0, init_std)
    n = min(rows, t.shape[0])
    out[:n] = t[:n]
    return out


# ------------------------------------------------------------------------------------------ checkpoints
def build_backbone(arch: str, **kwargs) -> nn.Module:
    """Backbone by name: ``'resnet50'`` → :class:`~common.models.resnet.ResNetStripes` (random init unless
    ``weights`` is given), any other name → ``common.models.vit.build_part_vit(arch, **kwargs)``.

    Raises:
        InputError: unknown arch (raised by the builders) or bad arguments.
    """
    if arch == "resnet50":
        return ResNetStripes(**kwargs)
    return build_part_vit(arch, **kwargs)


def _check_plain(obj, where: str = "meta") -> None:
    """Raise InputError unless ``obj`` is built from dict/list/tuple/str/int/float/bool/None/Tensor only
    (what ``torch.load(weights_only=True)`` can read back)."""
    if obj is None or isinstance(obj, (str, int, float, bool, torch.Tensor)):
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise InputError(f"{where}: keys must be str or int, got {type(k).__name__}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise InputError(f"{where}: unsupported type {type(obj).__name__} (use plain str/int/float/bool/list/dict)")


def save_reid_checkpoint(path: Union[str, os.PathLike], model: ReIDModel, meta: Optional[dict] = None) -> Path:
    """Write a fine-tuned :class:`ReIDModel` atomically as a torch file ``{'format': 'partreid.reid_model', …}``.

    Contents: ``format``, ``format_version`` (1), ``arch``, ``backbone_kwargs`` (arguments to rebuild the
    backbone: ``meta['backbone_kwargs']`` when given, else derived from the model: ``num_parts``/``last_stride``/
    ``image_size`` for ``resnet50``, ``backbone.config()`` minus ``arch`` for a PartViT), ``fusion``,
    ``num_classes`` (capacity), ``active_classes``, ``bn_groups``, ``embed_dim``, ``num_parts``, ``image_size``,
    ``pixel_mean``, ``pixel_std``, ``meta`` (the caller's dict) and ``state_dict`` (CPU tensors).

    Args:
        path: destination file (its folder is created).
        model: the model (a DDP/DataParallel wrapper is unwrapped via ``.module``).
        meta: plain JSON-like dict (str/int/float/bool/None/list/dict/tensors). ``meta['arch']`` names the
            backbone; if absent, ``model.backbone.arch`` is used.

    Returns: the path written.

    Raises:
        InputError: not a ReIDModel, no arch known, or meta holds non-plain objects.
    """
    model = getattr(model, "module", model)
    if not isinstance(model, ReIDModel):
        raise InputError(f"save_reid_checkpoint needs a ReIDModel, got {type(model).__name__}")
    meta = dict(meta or {})
    _check_plain(meta)
    arch = meta.get("arch") or getattr(model.backbone, "arch", None)
    if not arch:
        raise InputError("cannot save the model: backbone arch unknown (pass meta={'arch': ...})")
    bb_kwargs = dict(meta.get("backbone_kwargs") or {})
    if not bb_kwargs and arch != "resnet50" and callable(getattr(model.backbone, "config", None)):
        bb_kwargs = {k: v for k, v in model.backbone.config().items() if k != "arch"}  # PartViT.config()
    if arch == "resnet50":
        bb_kwargs.setdefault("num_parts", model.num_parts)
        bb_kwargs.setdefault("last_stride", int(getattr(model.backbone, "last_stride", 1)))
        bb_kwargs.setdefault("image_size", [int(v) for v in model.image_size])
    meta["arch"] = str(arch)
    payload = {
        "format": REID_FORMAT,
        "format_version": REID_FORMAT_VERSION,
        "arch": str(arch),
        "backbone_kwargs": bb_kwargs,
        "fusion": model.fusion,
        "num_classes": model.classifier_capacity,
        "active_classes": model.num_classes,
        "bn_groups": model.bn_groups,
        "embed_dim": model.embed_dim,
        "num_parts": model.num_parts,
        "image_size": [int(v) for v in model.image_size],
        "pixel_mean": [float(v) for v in model.pixel_mean],
        "pixel_std": [float(v) for v in model.pixel_std],
        "meta": meta,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_reid_checkpoint(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu",
                         bn_groups: Optional[int] = None) -> Tuple[ReIDModel, dict]:
    """Rebuild a :class:`ReIDModel` from :func:`save_reid_checkpoint` output.

    The backbone is rebuilt with :func:`build_backbone` from the stored ``arch`` and ``backbone_kwargs`` (no
    pretrained weights are read: the state dict carries them), then the whole state dict is loaded strictly.

    Args:
        path: the checkpoint file.
        map_location: device for the tensors.
        bn_groups: override the stored ghost-BN groups (only matters in train mode).

    Returns:
        (model in eval mode, meta): meta is the stored caller dict, with the header fields (arch, fusion,
        num_classes, active_classes, bn_groups, embed_dim, num_parts, image_size, pixel_mean, pixel_std,
        backbone_kwargs, format_version) added where it does not define them.

    Raises:
        InputError: missing/unreadable file, wrong format tag, newer format version, or weights that do not fit.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: model checkpoint not found")
    obj = read_checkpoint(p, weights_only=True, map_location=map_location, what="model checkpoint")
    if not isinstance(obj, dict) or obj.get("format") != REID_FORMAT:
        tag = obj.get("format") if isinstance(obj, dict) else None
        raise InputError(f"{p}: not a {REID_FORMAT} checkpoint (format={tag!r})")
    if int(obj.get("format_version", 0)) > REID_FORMAT_VERSION:
        raise InputError(f"{p}: format_version {obj.get('format_version')} is newer than this tool supports "
                         f"({REID_FORMAT_VERSION}); upgrade partreid")
    backbone = build_backbone(obj["arch"], **dict(obj.get("backbone_kwargs") or {}))
    groups = obj.get("bn_groups", 1) if bn_groups is None else bn_groups
    model = ReIDModel(backbone, fusion=obj["fusion"], num_classes=int(obj["num_classes"]), bn_groups=groups)
    try:
        model.load_state_dict(obj["state_dict"], strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise InputError(f"{p}: weights do not fit the rebuilt {obj['arch']} model: "
                         f"{' '.join(s.strip() for s in first[:3])[:300]}") from exc
    model.to(map_location).eval()
    meta = dict(obj.get("meta") or {})
    for key in ("arch", "fusion", "num_classes", "active_classes", "bn_groups", "embed_dim", "num_parts",
                "image_size", "pixel_mean", "pixel_std", "backbone_kwargs", "format_version"):
        if key in obj:
            meta.setdefault(key, obj[key])
    return model, meta
