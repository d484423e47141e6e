"""PASS self-distillation loss: DINO cross-entropy over CLS and PART tokens (``DINOLoss`` in PASS/main_pass.py;
PASS ``main_pass.py`` ``DINOLoss``)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from partreid.common.errors import InputError
from partreid.pass_pretrain.augment import CropLayout
from partreid.pass_pretrain.heads import MultiCropOutput


def teacher_temperature_schedule(warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int,
                                 n_epochs: int) -> np.ndarray:
    """Teacher temperature τt per epoch (float64 array of length ``max(n_epochs, warmup_epochs)``): linear
    from ``warmup_teacher_temp`` to ``teacher_temp`` over ``warmup_epochs`` epochs (np.linspace, both ends
    included), then constant (PASS ``main_pass.py`` ``DINOLoss``; PASS default 0.04 → 0.04 with 0 warm-up, i.e.
    constant 0.04)."""
    warm = np.linspace(warmup_teacher_temp, teacher_temp, int(warmup_epochs))
    rest = np.full(max(int(n_epochs) - int(warmup_epochs), 0), float(teacher_temp))
    return np.concatenate([warm, rest])


def _cross_entropy_sum(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, n_student: int,
                       n_teacher: int, student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Σ over teacher view i, student view v ≠ i of mean_b H(p_t,i,b , s_v,b).

    ``student`` (n_student·B, K) and ``teacher`` (n_teacher·B, K) logits; the first ``n_teacher`` student views
    are the same global views as the teacher's (and are skipped against themselves). Uses
    Σ_{v≠i} −q_i·log p_v = −q_i·(Σ_v log p_v − log p_i).
    """
    logp = F.log_softmax(student.float() / student_temp, dim=-1)
    batch = teacher.shape[0] // n_teacher
    logp = logp.view(n_student, batch, -1)
    q = F.softmax((teacher.float() - center) / teacher_temp, dim=-1).detach().view(n_teacher, batch, -1)
    logp_all = logp.sum(dim=0)  # (B, K)
    total = student.new_zeros((), dtype=torch.float32)
    for i in range(n_teacher):
        total = total + torch.sum(-q[i] * (logp_all - logp[i]), dim=-1).mean()
    return total


def pass_loss(student: MultiCropOutput, teacher: MultiCropOutput, centers: torch.Tensor, layout: CropLayout,
              student_temp: float = 0.1, teacher_temp: float = 0.04) -> torch.Tensor:
    """PASS loss (PASS ``main_pass.py`` ``DINOLoss``): mean of the CLS and PART cross-entropy terms.

    * CLS: each teacher global CLS output vs every student CLS output except the same global view
      (2 × 10 = 20 terms with the PASS layout).
    * PART k: each teacher global PART_k output vs the student's [global PART_k…, band-k local PART_k…], skipping
      the same global view (2 × 4 = 8 terms per part, 24 in total).
    * Each term H(p_t, s) = mean over the batch of −Σ_K softmax((t − c)/τt) · log_softmax(s/τs); the result is
      (sum of all ``layout.n_terms`` terms) / ``layout.n_terms`` (44).

    Args:
        student: :class:`MultiCropOutput` of all views (cls (V·B, K), parts[k] ((G+L)·B, K)).
        teacher: :class:`MultiCropOutput` of the global views (cls (G·B, K), parts[k] (G·B, K)).
        centers: (1+P, K) float centres, row 0 for CLS, row k for PART_k.
        layout: the crop layout the outputs follow.
        student_temp: τs (0.1). teacher_temp: τt (0.04).

    Returns:
        scalar float32 tensor (differentiable w.r.t. the student logits; the teacher side is detached).

    Raises:
        InputError: output sizes disagree with ``layout``.
    """
    g = layout.n_global
    if teacher.cls.shape[0] % g:
        raise InputError(f"teacher CLS rows ({teacher.cls.shape[0]}) are not a multiple of {g} global views")
    batch = teacher.cls.shape[0] // g
    n_parts = layout.n_bands
    if student.cls.shape[0] != layout.n_views * batch:
        raise InputError(f"student CLS rows {student.cls.shape[0]} != {layout.n_views} views x batch {batch}")
    if len(student.parts) != n_parts or len(teacher.parts) != n_parts or centers.shape[0] != 1 + n_parts:
        raise InputError(f"expected {n_parts} part outputs and {1 + n_parts} centres")
    total = _cross_entropy_sum(student.cls, teacher.cls, centers[0], layout.n_views, g, student_temp, teacher_temp)
    for k in range(n_parts):
        n_student = len(layout.part_views(k))
        if student.parts[k].shape[0] != n_student * batch or teacher.parts[k].shape[0] != g * batch:
            raise InputError(f"PART{k + 1} outputs have {student.parts[k].shape[0]} student / "
                             f"{teacher.parts[k].shape[0]} teacher rows; the layout needs {n_student * batch} / "
                             f"{g * batch}")
        total = total + _cross_entropy_sum(student.parts[k], teacher.parts[k], centers[1 + k], n_student, g,
                                           student_temp, teacher_temp)
    return total / layout.n_terms


class PASSLoss(nn.Module):
    """Stateful PASS loss: :func:`pass_loss` plus the four centres and the teacher-temperature schedule
    (PASS ``main_pass.py`` ``DINOLoss``).

    Args:
        out_dim: K, head output size (65536).
        layout: crop layout.
        n_epochs: training length (for the temperature schedule).
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs: τt schedule
            (:func:`teacher_temperature_schedule`; PASS: constant 0.04).
        student_temp: τs (0.1).
        center_momentum: m of c ← m·c + (1−m)·batch_mean (0.9).

    Buffers:
        center: (1+P, K) float32, row 0 = CLS centre, row k = PART_k centre; starts at 0.
    """

    def __init__(self, out_dim: int, layout: CropLayout, n_epochs: int, warmup_teacher_temp: float = 0.04,
                 teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 0, student_temp: float = 0.1,
                 center_momentum: float = 0.9):
        super().__init__()
        self.layout = layout
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.register_buffer("center", torch.zeros(1 + layout.n_bands, int(out_dim)))
        self.teacher_temp_schedule = teacher_temperature_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, n_epochs)

    def teacher_temp(self, epoch: int) -> float:
        """τt at ``epoch`` (0-based; epochs past the schedule keep its last value)."""
        sched = self.teacher_temp_schedule
        return float(sched[min(int(epoch), len(sched) - 1)])

    def forward(self, student: MultiCropOutput, teacher: MultiCropOutput, epoch: int,
                update_center: bool = True) -> torch.Tensor:
        """Loss of one step (:func:`pass_loss` with the current centres and τt(epoch)); then, if
        ``update_center``, the centre update of :meth:`update_center` (as DINO does inside its loss)."""
        loss = pass_loss(student, teacher, self.center, self.layout, self.student_temp, self.teacher_temp(epoch))
        if update_center:
            self.update_center(teacher)
        return loss

    @torch.no_grad()
    def update_center(self, teacher: MultiCropOutput) -> None:
        """c ← m·c + (1−m)·mean of the teacher's raw outputs over both global views, separately for CLS and each
        PART; the sum and the row count are all-reduced across ranks when torch.distributed is initialised, so
        the mean is over 2·B·world_size rows (PASS ``main_pass.py`` ``DINOLoss``; the row count is all-reduced too, so
        a rank whose batch lost unreadable images is weighted correctly)."""
        outs: Sequence[torch.Tensor] = (teacher.cls,) + tuple(teacher.parts)
        sums = torch.stack([o.detach().float().sum(dim=0) for o in outs])  # (1+P, K)
        rows = torch.full((1, sums.shape[1]), float(outs[0].shape[0]), device=sums.device)
        if dist.is_available() and dist.is_initialized():
            buf = torch.cat([sums, rows])  # one collective for the sums and the row count
            dist.all_reduce(buf)
            sums, rows = buf[:-1], buf[-1:]
        self.center.mul_(self.center_momentum).add_(sums / rows[:, :1], alpha=1.0 - self.center_momentum)
