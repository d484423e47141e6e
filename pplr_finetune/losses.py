"""PPLR losses: PGLR, AALS, label-smoothed CE, soft triplet, and PPLR-CAM's inter-camera proxy loss.

All functions are pure (tensors in, scalar tensor out) and differentiable. Notation (PPLR ``pplr/trainers.py``
``PPLRTrainer``): B = batch size, C = number of clusters this epoch (= the active logit width), P = number of parts,
y = one-hot pseudo-label, q = softmax of logits, ca = cross-agreement score in [0, 1].
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

from partreid.common.errors import InputError

__all__ = [
    "pglr_refined_target", "pglr_loss", "aals_loss", "ce_label_smooth", "pairwise_euclidean",
    "soft_triplet_loss", "build_camera_proxies", "inter_camera_proxy_loss", "batch_precision",
]


def _check_targets(logits: torch.Tensor, targets: torch.Tensor, name: str = "logits") -> None:
    if logits.dim() != 2:
        raise InputError(f"{name} must be (B, C), got {tuple(logits.shape)}")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise InputError(f"targets must be ({logits.shape[0]},), got {tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]):
        raise InputError(f"targets must lie in [0, {logits.shape[1]}); outliers (-1) must be removed first")


def pglr_refined_target(logits_parts: torch.Tensor, targets: torch.Tensor, agreement: torch.Tensor,
                        beta: float = 0.5) -> torch.Tensor:
    """PGLR refined target ŷ = β·y + (1 − β)·Σ_n w_n q^{p_n}, with w = softmax_n(ca_n) (PPLR ``pplr/trainers.py``
    ``PPLRTrainer``).

    Args:
        logits_parts: float (B, P, C) part logits (used detached: no gradient reaches the parts).
        targets: int64 (B,) pseudo-labels in [0, C).
        agreement: float (B, P) cross-agreement scores; weights are a plain softmax over the P parts
            (temperature 1).
        beta: weight of the one-hot label (PPLR ``--beta`` 0.5).

    Returns: float (B, C), rows summing to 1, no grad.

    Raises:
        InputError: shape mismatch or targets out of range.
    """
    if logits_parts.dim() != 3:
        raise InputError(f"logits_parts must be (B, P, C), got {tuple(logits_parts.shape)}")
    b, p, c = logits_parts.shape
    _check_targets(logits_parts[:, 0], targets, "logits_parts")
    if tuple(agreement.shape) != (b, p):
        raise InputError(f"agreement must be ({b}, {p}), got {tuple(agreement.shape)}")
    with torch.no_grad():
        w = torch.softmax(agreement.float(), dim=1)
        q_parts = torch.softmax(logits_parts.detach().float(), dim=2)
        ensemble = (w.unsqueeze(2) * q_parts).sum(dim=1)
        onehot = F.one_hot(targets.long(), c).float()
        return beta * onehot + (1.0 - beta) * ensemble


def pglr_loss(logits_global: torch.Tensor, logits_parts: torch.Tensor, targets: torch.Tensor,
              agreement: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Part-guided label refinement loss on the global head: mean_b −Σ_c ŷ_c log q^g_c (PPLR ``pplr/trainers.py``
    ``PPLRTrainer``).

    Args:
        logits_global: float (B, C) global logits.
        logits_parts: float (B, P, C) part logits (detached inside; see :func:`pglr_refined_target`).
        targets: int64 (B,) pseudo-labels in [0, C).
        agreement: float (B, P) cross-agreement scores.
        beta: PPLR β (0.5).

    Returns: scalar float tensor.

    Raises:
        InputError: shapes or targets invalid.
    """
    _check_targets(logits_global, targets, "logits_global")
    if logits_parts.shape[0] != logits_global.shape[0] or logits_parts.shape[-1] != logits_global.shape[1]:
        raise InputError(f"logits_parts {tuple(logits_parts.shape)} does not match logits_global "
                         f"{tuple(logits_global.shape)}")
    target = pglr_refined_target(logits_parts, targets, agreement, beta)
    log_q = F.log_softmax(logits_global.float(), dim=1)
    return -(target * log_q).sum(dim=1).mean()


def aals_loss(logits_part: torch.Tensor, targets: torch.Tensor, agreement_n: torch.Tensor) -> torch.Tensor:
    """Agreement-aware label smoothing for one part: mean_b [ca·CE(y, q) + (1 − ca)·KL(u ‖ q)] (PPLR
    ``pplr/trainers.py`` ``PPLRTrainer``).

    KL(u ‖ q) = Σ_c u_c (log u_c − log q_c) with u uniform over the C classes. ca = 1 gives plain CE,
    ca = 0 pulls the prediction to uniform.

    Args:
        logits_part: float (B, C) logits of part n.
        targets: int64 (B,) pseudo-labels in [0, C).
        agreement_n: float (B,) cross-agreement scores C_i(g, p_n) of part n, in [0, 1].

    Returns: scalar float tensor.

    Raises:
        InputError: shapes or targets invalid.
    """
    _check_targets(logits_part, targets, "logits_part")
    if tuple(agreement_n.shape) != (logits_part.shape[0],):
        raise InputError(f"agreement_n must be ({logits_part.shape[0]},), got {tuple(agreement_n.shape)}")
    c = logits_part.shape[1]
    log_q = F.log_softmax(logits_part.float(), dim=1)
    ce = -log_q.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    kl = -np.log(c) - log_q.mean(dim=1)
    ca = agreement_n.to(log_q)
    return (ca * ce + (1.0 - ca) * kl).mean()


def ce_label_smooth(logits: torch.Tensor, targets: torch.Tensor, epsilon: float = 0.1) -> torch.Tensor:
    """Cross-entropy with label smoothing: target (1 − ε)·y + ε/C; mean over the batch (PPLR
    ``pplr/loss/crossentropy.py`` ``CrossEntropyLabelSmooth``, ε = 0.1).

    Args:
        logits: float (B, C). targets: int64 (B,) in [0, C). epsilon: smoothing ε in [0, 1].

    Returns: scalar float tensor.

    Raises:
        InputError: shapes or targets invalid, ε outside [0, 1].
    """
    _check_targets(logits, targets)
    if not 0.0 <= epsilon <= 1.0:
        raise InputError(f"epsilon must be in [0, 1], got {epsilon}")
    c = logits.shape[1]
    log_q = F.log_softmax(logits.float(), dim=1)
    target = (1.0 - epsilon) * F.one_hot(targets.long(), c).to(log_q) + epsilon / c
    return -(target * log_q).sum(dim=1).mean()


def pairwise_euclidean(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distance matrix of x (B, D) → (B, B), as sqrt(clamp(‖a‖² + ‖b‖² − 2a·b, min=1e-12)).

    The clamp follows the reference (so the diagonal is 1e-6, not 0) and keeps the gradient finite.
    """
    x = x.float()
    sq = (x * x).sum(dim=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.t())
    return d2.clamp(min=1e-12).sqrt()


def soft_triplet_loss(features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft-margin batch-hard triplet loss: mean_i softplus(d(i, hardest positive) − d(i, hardest negative)).

    = −log(e^{d_an} / (e^{d_ap} + e^{d_an})), i.e. PPLR's ``SoftTripletLoss(margin=0)`` (PPLR
    ``pplr/loss/triplet.py``). Distances are Euclidean on the given (non-normalised) features; the hardest positive is
    the farthest sample with the same label, the sample itself included (so a label alone in the batch has d_ap ≈ 0,
    as in the reference); the hardest negative is the closest sample with another label. A sample with no negative in
    the batch contributes 0 (the reference adds 9999999 to non-negatives, giving softplus(−huge) = 0).

    Args:
        features: float (B, D). targets: int64 (B,) labels.

    Returns: scalar float tensor.

    Raises:
        InputError: shape mismatch.
    """
    if features.dim() != 2 or targets.dim() != 1 or features.shape[0] != targets.shape[0]:
        raise InputError(f"features (B, D) and targets (B,) expected, got {tuple(features.shape)} "
                         f"and {tuple(targets.shape)}")
    dist = pairwise_euclidean(features)
    same = targets[:, None] == targets[None, :]
    d_ap = dist.masked_fill(~same, float("-inf")).max(dim=1).values
    has_neg = (~same).any(dim=1)
    d_an = dist.masked_fill(same, float("inf")).min(dim=1).values
    d_an = torch.where(has_neg, d_an, d_ap.detach())  # finite placeholder; the term is zeroed below
    terms = F.softplus(d_ap - d_an)
    return torch.where(has_neg, terms, torch.zeros_like(terms)).mean()


def build_camera_proxies(features, labels, camids) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One proxy per (pseudo-id, camera) pair: the L2-normalised mean feature of that pair's images (PPLR
    ``examples/train_pplr_cam.py``, ``pplr/trainers.py`` ``PPLRTrainerCAM``).

    Args:
        features: float (N, D) (the epoch's extracted, L2-normalised features; global or one part).
        labels: int (N,) pseudo-labels; −1 (outliers) are skipped.
        camids: int (N,) camera ids.

    Returns:
        (proxies float32 (M, D), proxy_pids int64 (M,), proxy_camids int64 (M,)), sorted by (pid, camid).
        Fixed during the epoch (the reference never updates them).

    Raises:
        InputError: shape mismatch or no clustered sample.
    """
    feats = features if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features))
    labs = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    cams = torch.as_tensor(np.asarray(camids) if not isinstance(camids, torch.Tensor) else camids)
    if feats.dim() != 2 or labs.shape != (feats.shape[0],) or cams.shape != (feats.shape[0],):
        raise InputError(f"features (N, D), labels (N,), camids (N,) expected, got {tuple(feats.shape)}, "
                         f"{tuple(labs.shape)}, {tuple(cams.shape)}")
    labs = labs.to(feats.device, torch.long)
    cams = cams.to(feats.device, torch.long)
    keep = labs >= 0
    if not bool(keep.any()):
        raise InputError("no clustered sample: every label is -1")
    feats, labs, cams = feats[keep].float(), labs[keep], cams[keep]
    pairs, inverse = torch.unique(torch.stack([labs, cams], dim=1), dim=0, return_inverse=True)
    m = pairs.shape[0]
    sums = torch.zeros(m, feats.shape[1], dtype=feats.dtype, device=feats.device).index_add_(0, inverse, feats)
    counts = torch.bincount(inverse, minlength=m).to(feats.dtype)
    proxies = F.normalize(sums / counts[:, None], dim=1)
    return proxies, pairs[:, 0].contiguous(), pairs[:, 1].contiguous()


def inter_camera_proxy_loss(features: torch.Tensor, targets: torch.Tensor, camids: torch.Tensor,
                            proxies: torch.Tensor, proxy_pids: torch.Tensor, proxy_camids: torch.Tensor,
                            temperature: float = 0.07, num_negatives: int = 50) -> torch.Tensor:
    """PPLR-CAM inter-camera proxy loss (PPLR ``pplr/loss`` ``InterCamProxy``, used by
    ``pplr/trainers.py`` ``PPLRTrainerCAM``), vectorised over the batch.

    For sample i: s = normalize(f_i)·proxiesᵀ / τ. Positives P_i = proxies with the same pseudo-id and a
    different camera; negatives Q_i = the ``num_negatives`` proxies of other pseudo-ids with the highest
    (detached) similarity. loss_i = −(1/|P_i|) Σ_{j∈P_i} log softmax_{P_i ∪ Q_i}(s)_j.

    Reference quirk reproduced: samples with no cross-camera positive are skipped, but the sum is still
    divided by the FULL batch size B (not by the number of samples used).
    Deliberate difference: when fewer than ``num_negatives`` other-id proxies exist, the reference's sort
    pulls same-id proxies (positives included) into the negative set; here Q_i holds only other-id proxies.
    This only happens with fewer than 50 other-id proxies (tiny data), never at Market/MSMT scale.

    Args:
        features: float (B, D) features (normalised here). targets: int64 (B,) pseudo-labels.
        camids: int64 (B,) camera ids. proxies: float (M, D) (from :func:`build_camera_proxies`; used as
            given, not re-normalised). proxy_pids, proxy_camids: int64 (M,).
        temperature: τ (0.07). num_negatives: hard negatives per sample (50).

    Returns: scalar float tensor (0 when no sample has a cross-camera positive).

    Raises:
        InputError: shape mismatch, τ ≤ 0 or num_negatives < 0.
    """
    if features.dim() != 2 or targets.shape != (features.shape[0],) or camids.shape != (features.shape[0],):
        raise InputError(f"features (B, D), targets (B,), camids (B,) expected, got {tuple(features.shape)}, "
                         f"{tuple(targets.shape)}, {tuple(camids.shape)}")
    if proxies.dim() != 2 or proxies.shape[1] != features.shape[1] or proxy_pids.shape != (proxies.shape[0],) \
            or proxy_camids.shape != (proxies.shape[0],):
        raise InputError(f"proxies (M, {features.shape[1]}), proxy_pids (M,), proxy_camids (M,) expected, got "
                         f"{tuple(proxies.shape)}, {tuple(proxy_pids.shape)}, {tuple(proxy_camids.shape)}")
    if temperature <= 0 or num_negatives < 0:
        raise InputError(f"temperature must be > 0 and num_negatives >= 0, got {temperature}, {num_negatives}")
    b = features.shape[0]
    sims = F.normalize(features.float(), dim=1) @ proxies.float().to(features.device).t() / temperature  # (B, M)
    pp = proxy_pids.to(features.device).long()[None, :]
    pc = proxy_camids.to(features.device).long()[None, :]
    t = targets.long()[:, None]
    pos = (t == pp) & (camids.long()[:, None] != pc)
    has_pos = pos.any(dim=1)
    if not bool(has_pos.any()):
        return sims.sum() * 0.0
    sims, pos, neg = sims[has_pos], pos[has_pos], (t != pp)[has_pos]
    k = min(int(num_negatives), sims.shape[1])
    neg_logits = sims.new_empty(sims.shape[0], 0)
    if k > 0:
        scores = sims.detach().masked_fill(~neg, float("-inf"))
        idx = scores.topk(k, dim=1).indices
        valid = neg.gather(1, idx)
        neg_logits = sims.gather(1, idx).masked_fill(~valid, float("-inf"))
    pos_logits = sims.masked_fill(~pos, float("-inf"))
    log_denom = torch.logsumexp(torch.cat([pos_logits, neg_logits], dim=1), dim=1)
    n_pos = pos.sum(dim=1).to(sims.dtype)
    mean_pos = (sims * pos.to(sims.dtype)).sum(dim=1) / n_pos
    return (log_denom - mean_pos).sum() / b


@torch.no_grad()
def batch_precision(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy of logits (B, C) against targets (B,), as a float in [0, 1] (PPLR's logged "precision")."""
    if logits.shape[0] == 0:
        return 0.0
    return float((logits.argmax(dim=1) == targets.to(logits.device)).float().mean())
