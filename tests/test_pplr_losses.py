"""PPLR loss formulas against hand-computed values on tiny tensors (PPLR ``pplr/trainers.py``
``PPLRTrainer`` and ``PPLRTrainerCAM``)."""

import math

import pytest
import torch
import torch.nn.functional as F

from partreid.common.errors import InputError
from partreid.pplr_finetune.losses import (aals_loss, batch_precision, build_camera_proxies, ce_label_smooth,
                                  inter_camera_proxy_loss, pglr_loss, pglr_refined_target, soft_triplet_loss)

LN = math.log


def _logits(*probs):
    """Logits whose softmax is exactly ``probs``."""
    return torch.log(torch.tensor(probs, dtype=torch.float64)).float()


# ------------------------------------------------------------------------------------------------ PGLR
def test_pglr_refined_target_equal_agreement():
    # part 1 predicts (0.5, 0.5), part 2 predicts (0.75, 0.25); equal agreement -> weights (0.5, 0.5)
    parts = torch.stack([_logits(0.5, 0.5), _logits(0.75, 0.25)])[None]  # (1, 2, 2)
    target = pglr_refined_target(parts, torch.tensor([0]), torch.tensor([[0.5, 0.5]]), beta=0.5)
    # ensemble = (0.625, 0.375); y_hat = 0.5*(1, 0) + 0.5*ensemble
    assert torch.allclose(target, torch.tensor([[0.8125, 0.1875]]), atol=1e-6)


def test_pglr_refined_target_softmax_weights():
    # ca = (0, 1): w = softmax -> (1/(1+e), e/(1+e)); beta = 0.2
    parts = torch.stack([_logits(0.5, 0.5), _logits(0.75, 0.25)])[None]
    w2 = math.e / (1 + math.e)
    w1 = 1 - w2
    ens0 = w1 * 0.5 + w2 * 0.75
    expected = torch.tensor([[0.8 * ens0, 0.2 + 0.8 * (1 - ens0)]])  # label is class 1
    target = pglr_refined_target(parts, torch.tensor([1]), torch.tensor([[0.0, 1.0]]), beta=0.2)
    assert torch.allclose(target, expected, atol=1e-6)


def test_pglr_loss_value_and_parts_detached():
    parts = torch.stack([_logits(0.5, 0.5), _logits(0.75, 0.25)])[None].requires_grad_(True)
    glob = _logits(0.8, 0.2)[None].requires_grad_(True)
    loss = pglr_loss(glob, parts, torch.tensor([0]), torch.tensor([[0.5, 0.5]]), beta=0.5)
    expected = -(0.8125 * LN(0.8) + 0.1875 * LN(0.2))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert parts.grad is None  # the refined target is detached from the part branch
    # d/dz of -sum y_hat log softmax(z) = softmax(z) - y_hat
    assert torch.allclose(glob.grad, torch.tensor([[0.8 - 0.8125, 0.2 - 0.1875]]), atol=1e-6)


def test_pglr_loss_batch_mean_and_beta_one_is_ce():
    torch.manual_seed(0)
    glob, parts = torch.randn(5, 7), torch.randn(5, 3, 7)
    t, ca = torch.randint(0, 7, (5,)), torch.rand(5, 3)
    assert pglr_loss(glob, parts, t, ca, beta=1.0).item() == pytest.approx(F.cross_entropy(glob, t).item(), abs=1e-6)
    per = [pglr_loss(glob[i:i + 1], parts[i:i + 1], t[i:i + 1], ca[i:i + 1]).item() for i in range(5)]
    assert pglr_loss(glob, parts, t, ca).item() == pytest.approx(sum(per) / 5, abs=1e-6)


def test_pglr_rejects_outlier_targets():
    with pytest.raises(InputError):
        pglr_loss(torch.zeros(2, 3), torch.zeros(2, 3, 3), torch.tensor([0, -1]), torch.zeros(2, 3))
    with pytest.raises(InputError):
        pglr_loss(torch.zeros(2, 3), torch.zeros(2, 3, 3), torch.tensor([0, 1]), torch.zeros(2, 2))


# ------------------------------------------------------------------------------------------------ AALS
Q = (0.4, 0.3, 0.2, 0.1)
CE_Q = -LN(0.4)                                                   # label 0
KL_Q = LN(0.25) - 0.25 * (LN(0.4) + LN(0.3) + LN(0.2) + LN(0.1))  # KL(u || q), u = 1/4


def test_aals_limits_and_mixture():
    logits, t = _logits(*Q)[None], torch.tensor([0])
    assert aals_loss(logits, t, torch.tensor([1.0])).item() == pytest.approx(CE_Q, abs=1e-6)  # ca=1: pure CE
    assert aals_loss(logits, t, torch.tensor([0.0])).item() == pytest.approx(KL_Q, abs=1e-6)  # ca=0: KL to uniform
    assert aals_loss(logits, t, torch.tensor([0.3])).item() == pytest.approx(0.3 * CE_Q + 0.7 * KL_Q, abs=1e-6)


def test_aals_ca_zero_uniform_prediction_is_zero_and_batch_mean():
    assert aals_loss(torch.zeros(1, 5), torch.tensor([2]), torch.tensor([0.0])).item() == pytest.approx(0, abs=1e-7)
    logits = torch.cat([_logits(*Q)[None], torch.zeros(1, 4)])
    got = aals_loss(logits, torch.tensor([0, 3]), torch.tensor([1.0, 0.5])).item()
    expected = (CE_Q + (0.5 * LN(4) + 0.5 * 0.0)) / 2
    assert got == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------------------------- CE-LS
def test_ce_label_smooth_hand_value():
    logits = _logits(0.5, 0.3, 0.2)[None]
    eps = 0.1
    expected = -((eps / 3) * LN(0.5) + (0.9 + eps / 3) * LN(0.3) + (eps / 3) * LN(0.2))
    assert ce_label_smooth(logits, torch.tensor([1]), eps).item() == pytest.approx(expected, abs=1e-6)
    assert ce_label_smooth(logits, torch.tensor([1]), 0.0).item() == pytest.approx(-LN(0.3), abs=1e-6)


# ------------------------------------------------------------------------------------------ soft triplet
def _softplus(v):
    return math.log1p(math.exp(v))


def test_soft_triplet_batch_hard_hand_value():
    # 1-D points 0, 1 (id 0) and 3, 7 (id 1): hardest positive = farthest same id, hardest negative = closest other
    feats = torch.tensor([[0.0], [1.0], [3.0], [7.0]], requires_grad=True)
    t = torch.tensor([0, 0, 1, 1])
    # (d_ap, d_an): sample0 (1, 3), sample1 (1, 2), sample2 (4, 2), sample3 (4, 6)
    expected = (_softplus(1 - 3) + _softplus(1 - 2) + _softplus(4 - 2) + _softplus(4 - 6)) / 4
    loss = soft_triplet_loss(feats, t)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    loss.backward()
    assert torch.isfinite(feats.grad).all()


def test_soft_triplet_2d_euclidean_and_degenerate_cases():
    feats = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    t = torch.tensor([0, 0, 1])
    # s0: d_ap 5, d_an 10; s1: d_ap 5, d_an 5; s2 (alone): d_ap ~0 (itself), d_an 5
    expected = (_softplus(-5) + _softplus(0) + _softplus(0 - 5)) / 3
    assert soft_triplet_loss(feats, t).item() == pytest.approx(expected, abs=1e-5)
    x = torch.randn(4, 3, requires_grad=True)
    loss = soft_triplet_loss(x, torch.zeros(4, dtype=torch.long))  # no negative anywhere -> 0, finite grad
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------ camera proxies
def test_build_camera_proxies_hand_value():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0], [5.0, 5.0]])
    labels = torch.tensor([0, 0, 0, 1, -1])
    cams = torch.tensor([0, 0, 1, 0, 0])
    proxies, pids, pcams = build_camera_proxies(feats, labels, cams)
    r = 1 / math.sqrt(2)
    assert torch.allclose(proxies, torch.tensor([[r, r], [r, r], [1.0, 0.0]]), atol=1e-6)
    assert pids.tolist() == [0, 0, 1] and pcams.tolist() == [0, 1, 0]


def _loop_inter_cam(feats, targets, cams, proxies, ppids, pcams, temp, num_neg):
    """Straightforward per-sample implementation of PPLR's ``InterCamProxy`` loss."""
    f = F.normalize(feats, dim=1)
    total = feats.new_zeros(())
    for i in range(feats.shape[0]):
        pos = [j for j in range(len(ppids)) if ppids[j] == targets[i] and pcams[j] != cams[i]]
        if not pos:
            continue
        s = (proxies @ f[i]) / temp
        negs = [j for j in range(len(ppids)) if ppids[j] != targets[i]]
        negs = sorted(negs, key=lambda j: -float(s[j].detach()))[:num_neg]
        logits = s[pos + negs]
        logp = torch.log_softmax(logits, dim=0)
        total = total - logp[:len(pos)].sum() / len(pos)
    return total / feats.shape[0]


def test_inter_camera_proxy_loss_matches_loop():
    g = torch.Generator().manual_seed(3)
    bank = torch.randn(60, 6, generator=g)
    bank_pid = torch.randint(0, 8, (60,), generator=g)
    bank_cam = torch.randint(0, 3, (60,), generator=g)
    proxies, ppids, pcams = build_camera_proxies(bank, bank_pid, bank_cam)
    feats = torch.randn(10, 6, generator=g)
    t = torch.randint(0, 8, (10,), generator=g)
    c = torch.randint(0, 3, (10,), generator=g)
    c[0] = 5  # a camera no proxy has: every same-id proxy is a positive
    t[1] = 99  # an id without proxies: no positive, skipped (but still counted in B)
    for num_neg in (4, 50):
        a = feats.clone().requires_grad_(True)
        b = feats.clone().requires_grad_(True)
        got = inter_camera_proxy_loss(a, t, c, proxies, ppids, pcams, 0.07, num_neg)
        ref = _loop_inter_cam(b, t, c, proxies, ppids, pcams, 0.07, num_neg)
        assert ref.item() > 0
        assert got.item() == pytest.approx(ref.item(), rel=1e-5)
        got.backward()
        ref.backward()
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


def test_inter_camera_proxy_loss_divides_by_full_batch():
    proxies = torch.tensor([[1.0, 0.0], [0.0, 1.0], [math.sqrt(0.5), math.sqrt(0.5)]])
    ppids, pcams = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0])
    feats = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # sample 1 has id 1, no other-camera proxy -> skipped
    t, c = torch.tensor([0, 1]), torch.tensor([0, 0])
    tau = 0.5
    # sample 0: positive = proxy 1 (id 0, cam 1), s = 0; negative = proxy 2, s = sqrt(.5)/tau
    s_pos, s_neg = 0.0, math.sqrt(0.5) / tau
    loss0 = -(s_pos - math.log(math.exp(s_pos) + math.exp(s_neg)))
    got = inter_camera_proxy_loss(feats, t, c, proxies, ppids, pcams, temperature=tau, num_negatives=50)
    assert got.item() == pytest.approx(loss0 / 2, abs=1e-6)
    none = inter_camera_proxy_loss(feats[1:], t[1:], c[1:], proxies, ppids, pcams)
    assert none.item() == 0.0


def test_batch_precision():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0]])
    assert batch_precision(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
