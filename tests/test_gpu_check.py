"""benchmarks/gpu_check.sh: skips softly without a GPU; every check's code path runs on the CPU in --tiny mode."""

import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the skip path is not taken")
def test_skips_without_gpu():
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("skipped: no GPU")


def test_tiny_dry_run_prints_every_row(capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    rc = gpu_check.main(["--device", "cpu", "--tiny"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")]
    checks = [ln.split("|")[1].strip() for ln in lines[1:]]
    assert checks.count("pass_step") == 2 and checks.count("extract") == 2 and checks.count("finetune") == 2
    assert "faiss_knn" in checks and "error" not in out
    assert "mAP" in out and "GFLOP/img" in out
