"""Per-iteration schedules of PASS pre-training (PASS ``utils.py`` ``cosine_scheduler``)."""

from __future__ import annotations

import numpy as np

from partreid.common.errors import InputError


def cosine_schedule(base_value: float, final_value: float, epochs: int, niter_per_epoch: int,
                    warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """Value per iteration: linear warm-up, then a half-cosine from ``base_value`` to ``final_value``.

    Exactly the DINO/PASS rule (PASS ``utils.py`` ``cosine_scheduler``): with W = warmup_epochs·niter_per_epoch
    warm-up iterations and T = epochs·niter_per_epoch in total,

    * iterations 0 … W−1: ``np.linspace(start_warmup_value, base_value, W)`` (both ends included, so the last
      warm-up iteration already has ``base_value``);
    * iteration W + i, i = 0 … T−W−1: final + ½·(base − final)·(1 + cos(π·i/(T−W))) (starts at
      ``base_value``, approaches but never reaches ``final_value``).

    Returns:
        float64 array of length T.

    Raises:
        InputError: non-positive length or more warm-up than training.
    """
    total = int(epochs) * int(niter_per_epoch)
    warm = int(warmup_epochs) * int(niter_per_epoch)
    if total <= 0:
        raise InputError(f"schedule needs epochs ({epochs}) and iterations per epoch ({niter_per_epoch}) > 0")
    if warm > total:
        raise InputError(f"warm-up ({warmup_epochs} epochs) is longer than training ({epochs} epochs)")
    warmup = np.linspace(start_warmup_value, base_value, warm)
    i = np.arange(total - warm)
    cosine = final_value + 0.5 * (base_value - final_value) * (1.0 + np.cos(np.pi * i / max(total - warm, 1)))
    return np.concatenate([warmup, cosine])


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule of PASS: peak lr = base_lr × global_batch / 256 (5e-4 → 0.002 at 1024, PASS
    ``main_pass.py`` ``train_dino``)."""
    return float(base_lr) * int(global_batch) / 256.0


def pass_schedules(*, lr: float, min_lr: float, warmup_epochs: int, weight_decay: float, weight_decay_end: float,
                   momentum_teacher: float, epochs: int, niter_per_epoch: int, global_batch: int) -> dict:
    """The three PASS schedules (PASS ``main_pass.py`` ``train_dino`` and ``utils.py`` ``cosine_scheduler``), arrays
    of length epochs·niter_per_epoch:

    * ``lr``: 0 → scaled_lr(lr, global_batch) over ``warmup_epochs`` then cosine to ``min_lr``;
    * ``wd``: cosine ``weight_decay`` → ``weight_decay_end`` (0.04 → 0.4), regularised group only;
    * ``momentum``: teacher EMA momentum, cosine ``momentum_teacher`` → 1 (0.996 → 1).
    """
    return {
        "lr": cosine_schedule(scaled_lr(lr, global_batch), min_lr, epochs, niter_per_epoch, warmup_epochs),
        "wd": cosine_schedule(weight_decay, weight_decay_end, epochs, niter_per_epoch),
        "momentum": cosine_schedule(momentum_teacher, 1.0, epochs, niter_per_epoch),
    }
