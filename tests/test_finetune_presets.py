"""Every finetune preset × backbone (ViT, ResNet-50) trains: ≥ 2 optimizer steps with backward on tiny data.

Also: bf16 autocast on the CPU (the AMP code path), ``--bn-groups auto``, the no-silent-random-ResNet rule, and
``cluster`` / ``refine-labels`` taking their defaults from the same presets as ``finetune``.
"""

import csv
import subprocess

import numpy as np
import pytest
import torch

from partreid.pplr_finetune.config import PRESETS, FinetuneConfig, default, resolve_bn_groups
from tests.conftest import script
from tests.test_finetune import tiny_inputs

TINY = dict(epochs=1, iters=2, batch_size=32, k1=6, k2=2, eps=0.6, min_samples=2, k=4, eval_every=0, workers=0,
            progress=False, device="cpu", image_size=(64, 32))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    return root, tiny_inputs(root, ids=8, per_id=4)


def _run(root, ckpt, preset, arch, out, **kw):
    from partreid.pplr_finetune.train import finetune

    values = dict(TINY, data=f"market1501:{root / 'data'}")
    if arch == "resnet50":  # a full ResNet-50: half the batch to stay inside the CI budget
        values.update(arch="resnet50", random_init=True, batch_size=16)
    else:
        values.update(checkpoint=str(ckpt))
    values.update(kw)
    last = finetune(FinetuneConfig.from_preset(preset, **values), out)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    return last, rows[-1]


@pytest.mark.parametrize("arch", ["vit", "resnet50"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_trains(tiny, tmp_path, preset, arch):
    root, ckpt = tiny
    last, row = _run(root, ckpt, preset, arch, tmp_path / "run")
    assert int(row["steps"]) == 2 and np.isfinite(float(row["loss"]))
    key = "memory" if PRESETS[preset].get("loss") == "cluster-contrast" else "pglr"
    assert np.isfinite(float(row[key])) and float(row[key]) > 0
    if PRESETS[preset].get("camera_aware"):
        assert "camera" in row
    state = torch.load(tmp_path / "run" / "checkpoint.pth", map_location="cpu", weights_only=False)
    opt = state["optimizer"]["state"]
    assert opt, "the optimizer never stepped"
    if default("optimizer", preset) == "adam":
        assert all(int(s["step"]) == 2 for s in opt.values())
    else:
        assert all("momentum_buffer" in s for s in opt.values())
    assert state["config"]["amp"] == "none"  # float32 unless asked
    assert state["config"]["seed"] == FinetuneConfig().seed == 1  # the preset's seed: --seed was not given


def test_finetune_help_states_the_seed_it_uses():
    out = " ".join(subprocess.run([script("finetune"), "--help"], capture_output=True, text=True).stdout.split())
    assert "Random seed [default: the preset's, 1 for every preset, as PPLR]" in out
    assert "[default: 0]" not in out.split("--seed", 1)[1][:120]


def test_bf16_autocast_runs_on_cpu_and_changes_the_numbers(tiny, tmp_path):
    root, ckpt = tiny
    _, fp32 = _run(root, ckpt, "pplr", "vit", tmp_path / "fp32")
    _, bf16 = _run(root, ckpt, "pplr", "vit", tmp_path / "bf16", amp="bf16")
    assert int(bf16["steps"]) == 2 and np.isfinite(float(bf16["loss"]))
    assert float(bf16["loss"]) != float(fp32["loss"])  # autocast really ran (extraction and training) in bf16
    state = torch.load(tmp_path / "bf16" / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert state["config"]["amp"] == "bf16"
    from partreid.common.distributed import autocast

    with autocast("cpu", "bf16"):
        assert torch.nn.Linear(4, 4)(torch.ones(2, 4)).dtype == torch.bfloat16
    with autocast("cpu"):  # the default: float32
        assert torch.nn.Linear(4, 4)(torch.ones(2, 4)).dtype == torch.float32


def test_bn_groups_auto_emulates_the_reference_per_gpu_batch():
    assert resolve_bn_groups("auto", 64, 1, 16)[0] == 4     # PPLR: 64 on one process = 4 GPUs x 16
    assert resolve_bn_groups("auto", 64, 2, 16)[0] == 2     # two processes of 32
    assert resolve_bn_groups("auto", 64, 4, 16)[0] == 1     # the reference's own layout
    assert resolve_bn_groups("auto", 256, 1, 64)[0] == 4    # pass-usl
    assert resolve_bn_groups("auto", 8, 1, 16)[0] == 1
    groups, line = resolve_bn_groups("3", 64, 1, 16)
    assert groups == 3 and "as given" in line
    assert FinetuneConfig().bn_groups == "auto" and default("bn_batch", "pass-usl") == 64


def test_resnet_without_weights_is_refused(tiny, tmp_path):
    root, _ = tiny
    proc = subprocess.run([script("finetune"), "--arch", "resnet50", "--data", f"market1501:{root / 'data'}",
                           "--out", str(tmp_path / "r"), "--device", "cpu", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "--resnet-weights" in proc.stderr and "Traceback" not in proc.stderr


def test_cluster_and_refine_labels_use_the_finetune_presets(features_file, tmp_path):
    from partreid.common.h5io import read_labels

    assert default("eps") == FinetuneConfig().eps == 0.5
    for preset, eps in (("pplr", 0.5), ("pass-usl", 0.6), ("pass-usl-msmt", 0.7)):
        out = tmp_path / f"{preset}.h5"
        cmd = [script("cluster"), str(features_file), "--out", str(out), "--k1", "4", "--k2", "2"]
        if preset != "pplr":
            cmd += ["--preset", preset]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        labels = read_labels(out)
        assert labels.attrs["eps"] == eps and labels.attrs["min_samples"] == FinetuneConfig().min_samples
    proc = subprocess.run([script("refine-labels"), str(tmp_path / "pplr.h5"), "--out", str(tmp_path / "r.h5"),
                           "--k", "3"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
