"""Cluster-contrast memory with the hard-instance update: the loss of PASS's own USL setting (PASS-reID
``CC-PASS/examples/cluster_contrast_train_usl.py``).

Used by the ``pass-usl`` preset of ``finetune`` (PASS_cluster_contrast_reid, ``--use-hard``), not by PPLR.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class HardClusterMemory(torch.nn.Module):
    """One L2-normalised centroid per cluster; InfoNCE over the centroids; hard-instance momentum update.

    Loss for a batch of features f (B, D) with pseudo-labels y (B,):
    ``CE(normalize(f) · M^T / temperature, y)`` (temperature 0.05, PASS-reID
    ``CC-PASS/examples/cluster_contrast_train_usl.py``).

    Update after each step, for every cluster c in the batch: take the batch instance of c with the LOWEST
    similarity to M[c] (the reference calls it "median" but it is an arg-min), then
    ``M[c] ← normalize(momentum · M[c] + (1 − momentum) · f_hard)`` with momentum 0.2.

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
        """Loss (scalar) for features float (B, D) and targets int64 (B,); updates the memory in place."""
        f = F.normalize(features.float(), dim=1)
        logits = f @ self.memory.t() / self.temperature
        loss = F.cross_entropy(logits, targets)
        self._update(f.detach(), targets)
        return loss

    @torch.no_grad()
    def _update(self, f: torch.Tensor, targets: torch.Tensor) -> None:
        sims = (f * self.memory[targets]).sum(dim=1)  # (B,) similarity of each instance to its own centroid
        for c in torch.unique(targets).tolist():
            members = torch.nonzero(targets == c).flatten()
            hard = members[torch.argmin(sims[members])]
            m = self.momentum * self.memory[c] + (1 - self.momentum) * f[hard]
            self.memory[c] = F.normalize(m, dim=0)
