"""PASS pre-training defaults: fp16 + GradScaler (CUDA), bf16 autocast on the CPU, warm-up clamped."""

import logging
import subprocess

import numpy as np
import torch

from partreid.common.distributed import resolve_amp
from partreid.pass_pretrain.train import PassConfig, PassTrainer
from tests.conftest import script
from tests.test_pass_train import tiny_config


def test_precision_modes():
    assert PassConfig().amp == "fp16"
    assert resolve_amp("fp16", "cuda:0") == (torch.float16, True)     # the published runs: fp16 + scaler
    assert resolve_amp("fp16", "cpu") == (None, False)                # no fp16 on the CPU: float32
    assert resolve_amp("bf16", "cpu") == (torch.bfloat16, False)
    assert resolve_amp("bf16", "cuda") == (torch.bfloat16, False)
    assert resolve_amp("none", "cuda") == (None, False) and resolve_amp(None, "cpu") == (None, False)
    out = subprocess.run([script("pass-pretrain"), "--help"], capture_output=True, text=True).stdout
    assert "[default: fp16]" in " ".join(out.split())


def _two_steps(amp):
    torch.manual_seed(0)
    trainer = PassTrainer(tiny_config(amp=amp, drop_path_rate=0.0), niter_per_epoch=2, device="cpu")
    g = torch.Generator().manual_seed(1)
    losses = []
    for it in range(2):
        views = [torch.randn(2, 3, 64, 32, generator=g)] * 2 + [torch.randn(2, 3, 32, 16, generator=g)] * 9
        losses.append(trainer.step(views, 0, it)["loss"])
    return trainer, losses


def test_bf16_autocast_steps_on_cpu():
    t32, l32 = _two_steps("none")
    t16, l16 = _two_steps("bf16")
    assert t16.amp_dtype == torch.bfloat16 and t16.scaler is None
    assert all(np.isfinite(l16)) and l16 != l32
    np.testing.assert_allclose(l16, l32, rtol=0.05)  # the same step, at bf16 precision
    w32 = t32.student.backbone.cls_token if hasattr(t32.student.backbone, "cls_token") else None
    if w32 is not None:
        assert not torch.equal(w32, t16.student.backbone.cls_token)


def test_warmup_longer_than_the_run_is_clamped(caplog):
    caplog.set_level(logging.WARNING, logger="partreid.pass")
    trainer = PassTrainer(tiny_config(epochs=1, warmup_epochs=10), niter_per_epoch=3, device="cpu")
    lr = trainer.schedules["lr"]
    np.testing.assert_allclose(lr, np.linspace(0, trainer.peak_lr, 3))
    assert "clamped" in caplog.text
