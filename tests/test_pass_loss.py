"""PASS loss (PASS ``main_pass.py`` ``DINOLoss``): value against a direct computation, centre update, temperatures."""

import numpy as np
import pytest
import torch

from partreid.common.errors import InputError
from partreid.pass_pretrain.augment import CropLayout
from partreid.pass_pretrain.heads import MultiCropOutput
from partreid.pass_pretrain.loss import PASSLoss, pass_loss, teacher_temperature_schedule


def _np_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _np_log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def direct_pass_loss(s_cls, s_part, t_cls, t_part, centers, n_global, n_bands, per_band, tau_s, tau_t):
    """Spell out every term of PASS ``main_pass.py`` ``DINOLoss`` with explicit loops (float64 numpy).

    s_cls[v]: (B, K) student CLS logits of view v (crop order); s_part[k][v]: student PART_k logits of view v
    (only defined for global views and band k's crops); t_cls[i], t_part[k][i]: teacher global view i.
    """
    terms = []
    n_views = n_global + n_bands * per_band

    def h(t, s, c):
        q = _np_softmax((t - c) / tau_t)
        return float(np.mean(np.sum(-q * _np_log_softmax(s / tau_s), axis=-1)))

    for i in range(n_global):
        for v in range(n_views):
            if v != i:
                terms.append(h(t_cls[i], s_cls[v], centers[0]))
    for k in range(n_bands):
        band_views = [n_global + k * per_band + j for j in range(per_band)]
        for i in range(n_global):
            for v in list(range(n_global)) + band_views:
                if v != i:
                    terms.append(h(t_part[k][i], s_part[k][v], centers[1 + k]))
    return sum(terms) / len(terms), len(terms)


@pytest.mark.parametrize("per_band,expected_terms", [(3, 44), (2, 32)])
def test_loss_equals_direct_computation(per_band, expected_terms):
    rng = np.random.default_rng(0)
    b, k_out, g, bands = 3, 7, 2, 3
    lay = CropLayout(g, bands, per_band)
    n_views = lay.n_views
    s_cls = [rng.normal(size=(b, k_out)) for _ in range(n_views)]
    s_part = [{v: rng.normal(size=(b, k_out)) for v in lay.part_views(k)} for k in range(bands)]
    t_cls = [rng.normal(size=(b, k_out)) for _ in range(g)]
    t_part = [[rng.normal(size=(b, k_out)) for _ in range(g)] for _ in range(bands)]
    centers = rng.normal(size=(1 + bands, k_out)) * 0.3
    expected, n_terms = direct_pass_loss(s_cls, s_part, t_cls, t_part, centers, g, bands, per_band, 0.1, 0.04)
    assert n_terms == expected_terms == lay.n_terms
    if per_band == 3:
        assert (lay.n_cls_terms, lay.n_part_terms) == (20, 24)

    def t(a):
        return torch.tensor(np.concatenate(a), dtype=torch.float32)

    student = MultiCropOutput(t(s_cls), tuple(t([s_part[k][v] for v in lay.part_views(k)]) for k in range(bands)))
    teacher = MultiCropOutput(t(t_cls), tuple(t(t_part[k]) for k in range(bands)))
    got = pass_loss(student, teacher, torch.tensor(centers, dtype=torch.float32), lay, 0.1, 0.04)
    assert got.item() == pytest.approx(expected, rel=1e-5)

    # the teacher side carries no gradient; the student side does
    s_req = MultiCropOutput(student.cls.clone().requires_grad_(), student.parts)
    t_req = MultiCropOutput(teacher.cls.clone().requires_grad_(), teacher.parts)
    pass_loss(s_req, t_req, torch.tensor(centers, dtype=torch.float32), lay).backward()
    assert s_req.cls.grad is not None and t_req.cls.grad is None

    with pytest.raises(InputError):  # a layout that does not match the outputs is refused
        pass_loss(student, teacher, torch.zeros(4, k_out), CropLayout(g, bands, per_band + 1))


def test_center_update_hand_computed():
    lay = CropLayout(2, 3, 3)
    crit = PASSLoss(out_dim=2, layout=lay, n_epochs=1)
    assert torch.equal(crit.center, torch.zeros(4, 2))
    # teacher outputs for B=1 and the 2 global views: rows [view1; view2]
    cls = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    parts = (torch.tensor([[0.0, 0.0], [2.0, 2.0]]), torch.tensor([[-1.0, 1.0], [-1.0, 1.0]]),
             torch.tensor([[10.0, 0.0], [0.0, 10.0]]))
    crit.update_center(MultiCropOutput(cls, parts))
    expected1 = 0.1 * torch.tensor([[2.0, 4.0], [1.0, 1.0], [-1.0, 1.0], [5.0, 5.0]])
    torch.testing.assert_close(crit.center, expected1)
    crit.update_center(MultiCropOutput(cls * 0, tuple(p * 0 + 1 for p in parts)))
    expected2 = 0.9 * expected1 + 0.1 * torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    torch.testing.assert_close(crit.center, expected2)


def test_loss_forward_uses_old_center_then_updates():
    torch.manual_seed(0)
    lay = CropLayout(2, 3, 1)
    b, k = 2, 5
    student = MultiCropOutput(torch.randn(lay.n_views * b, k), tuple(torch.randn(3 * b, k) for _ in range(3)))
    teacher = MultiCropOutput(torch.randn(2 * b, k), tuple(torch.randn(2 * b, k) for _ in range(3)))
    crit = PASSLoss(out_dim=k, layout=lay, n_epochs=2)
    crit.center.fill_(0.25)
    old = crit.center.clone()
    loss = crit(student, teacher, epoch=0)
    torch.testing.assert_close(loss, pass_loss(student, teacher, old, lay, 0.1, 0.04))
    assert not torch.equal(crit.center, old)
    expected = 0.9 * old[0] + 0.1 * teacher.cls.mean(dim=0)
    torch.testing.assert_close(crit.center[0], expected)


def test_teacher_temperature_schedule():
    assert np.allclose(teacher_temperature_schedule(0.04, 0.04, 0, 100), 0.04)
    sched = teacher_temperature_schedule(0.04, 0.07, 3, 5)
    assert np.allclose(sched, [0.04, 0.055, 0.07, 0.07, 0.07])
    lay = CropLayout(2, 3, 1)
    crit = PASSLoss(out_dim=5, layout=lay, n_epochs=5, warmup_teacher_temp=0.04, teacher_temp=0.07,
                    warmup_teacher_temp_epochs=3)
    assert crit.teacher_temp(0) == pytest.approx(0.04) and crit.teacher_temp(1) == pytest.approx(0.055)
    assert crit.teacher_temp(99) == pytest.approx(0.07)
    torch.manual_seed(1)
    student = MultiCropOutput(torch.randn(lay.n_views * 2, 5), tuple(torch.randn(6, 5) for _ in range(3)))
    teacher = MultiCropOutput(torch.randn(4, 5), tuple(torch.randn(4, 5) for _ in range(3)))
    got = crit(student, teacher, epoch=1, update_center=False)
    torch.testing.assert_close(got, pass_loss(student, teacher, crit.center, lay, 0.1, 0.055))
    assert not torch.allclose(got, pass_loss(student, teacher, crit.center, lay, 0.1, 0.04))
