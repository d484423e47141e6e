"""Cluster-contrast memory with the hard-instance update: the loss of PASS's own USL setting (PASS-reID
``CC-PASS/examples/cluster_contrast_train_usl.py``).

Used by the ``pass-usl`` presets of ``finetune`` (PASS_cluster_contrast_reid, ``--use-hard``), not by PPLR.
Source: cluster-contrast ``clustercontrast/models/cm.py``, ``ClusterMemory`` with ``CM_Hard``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hard_update_(memory: torch.Tensor, features: torch.Tensor, targets: torch.Tensor, momentum: float) -> None:
    """The ``CM_Hard`` memory update, in place.

    For every cluster c present in ``targets``: among the batch rows i with ``targets[i] == c``, take the one with
    the LOWEST similarity ``features[i] · memory[c]`` (upstream names it "median" but takes the arg-min), then
    ``memory[c] ← normalize(momentum · memory[c] + (1 − momentum) · features[hard])``.

    Args:
        memory: float (C, D), L2-normalised rows; modified in place.
        features: float (B, D), the L2-normalised batch features (no gradient).
        targets: int64 (B,) cluster ids in [0, C).
        momentum: m (0.2 in PASS's USL runs).

    Source: cluster-contrast ``cm.py`` ``CM_Hard.backward``.
    """
    sims = (features * memory[targets]).sum(dim=1)  # (B,) similarity of each row to its own centroid
    for c in torch.unique(targets).tolist():
        members = torch.nonzero(targets == c).flatten()
        hard = members[torch.argmin(sims[members])]
        m = momentum * memory[c] + (1 - momentum) * features[hard]
        memory[c] = F.normalize(m, dim=0)


class _HardMemoryFunction(torch.autograd.Function):
    """logits = f · Mᵀ against the memory as it is; the memory is updated in ``backward``, after the gradient.

    Same order as cluster-contrast ``cm.py`` ``CM_Hard``: the gradient w.r.t. f is ``grad · M`` with the
    pre-update M, and only then is the hard update applied. The memory is passed as a tensor that autograd
    does not track (it is a buffer), so updating it in place cannot invalidate the graph.
    """

    @staticmethod
    def forward(ctx, features, targets, memory, momentum):  # noqa: D102
        ctx.memory = memory
        ctx.momentum = momentum
        ctx.save_for_backward(features, targets)
        return features.mm(memory.t())

    @staticmethod
    def backward(ctx, grad_logits):  # noqa: D102
        features, targets = ctx.saved_tensors
        grad_features = grad_logits.mm(ctx.memory.to(grad_logits.dtype)) if ctx.needs_input_grad[0] else None
        with torch.no_grad():
            hard_update_(ctx.memory, features.detach().to(ctx.memory.dtype), targets, ctx.momentum)
        return grad_features, None, None, None


class HardClusterMemory(torch.nn.Module):
    """One L2-normalised centroid per cluster; InfoNCE over the centroids; hard-instance momentum update.

    Loss for a batch of features f (B, D) with pseudo-labels y (B,):
    ``CE(normalize(f) · Mᵀ / temperature, y)`` (temperature 0.05), with M the memory as it was before this
    step. The update (:func:`hard_update_`) runs inside the backward pass, after the gradient w.r.t. f has
    been computed against that M, as in cluster-contrast ``cm.py`` ``CM_Hard``. A forward pass without a
    backward pass (e.g. evaluation under ``torch.no_grad``) leaves the memory unchanged.

    Args:
        centroids: float (C, D) initial centroids (L2-normalised here), rebuilt every epoch.
        temperature: InfoNCE temperature.
        momentum: memory momentum m.
    """

    def __init__(self, centroids: torch.Tensor, temperature: float = 0.05, momentum: float = 0.2):
        super().__init__()
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.register_buffer("memory", F.normalize(centroids.detach().float(), dim=1).clone())

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss (scalar, the memory's dtype: float32) for features float (B, D) and targets int64 (B,) in [0, C)."""
        f = F.normalize(features.to(self.memory.dtype), dim=1)  # float32 (the memory's dtype) even under autocast
        logits = _HardMemoryFunction.apply(f, targets, self.memory, self.momentum) / self.temperature
        return F.cross_entropy(logits, targets)
