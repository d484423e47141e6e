"""Reproduction targets refuse clearly without data, and never start a long job on a CPU by accident."""

import os
import subprocess

import pytest

from tests.conftest import BIN, REPO

TARGETS = ["reproduce-pass-small", "reproduce-pass-base", "reproduce-pplr-market", "reproduce-pplr-msmt",
           "reproduce-pplr-resnet-market", "reproduce-pass-usl-market", "reproduce-pass-usl-msmt"]


def _run(target, env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("REID_DATA", "FORCE_CPU")}
    env.update(env_extra)
    env["BIN"] = str(BIN)
    return subprocess.run(["bash", str(REPO / "tools" / "reproduce.sh"), target], capture_output=True, text=True,
                          env=env, cwd=REPO)


@pytest.mark.parametrize("target", TARGETS)
def test_refuses_without_data(target, tmp_path):
    proc = _run(target, {})
    assert proc.returncode == 2
    assert "REID_DATA is not set" in proc.stderr
    proc = _run(target, {"REID_DATA": str(tmp_path)})
    assert proc.returncode == 2 and "missing data" in proc.stderr


def test_makefile_wires_every_target():
    for target in TARGETS:
        dry = subprocess.run(["make", "-n", "-C", str(REPO), target, "VENV=" + str(BIN.parent)], capture_output=True,
                             text=True)
        assert dry.returncode == 0, dry.stderr
        assert f"tools/reproduce.sh {target}" in dry.stdout


def test_refuses_cpu_even_with_data(tmp_path):
    (tmp_path / "Market-1501-v15.09.15").mkdir()
    ckpt = tmp_path / "pass.pth"
    ckpt.write_bytes(b"x")
    proc = _run("reproduce-pplr-market", {"REID_DATA": str(tmp_path), "PASS_CKPT": str(ckpt),
                                          "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    assert "no CUDA GPU visible" in proc.stderr
    assert "81.5" in proc.stderr  # the paper's number is printed before refusing
