"""Commands that run no network never import torch: cluster, refine-labels, evaluate on features files,
inspect-data on files (their --help included), and ``import partreid`` itself.

Each command runs in a fresh interpreter that reports, at exit, whether ``torch`` was ever imported.
"""

import subprocess
import sys

import numpy as np
import pytest

from partreid.common.h5io import write_features

# runs a command's click ``main`` like its console script, then reports on stderr whether torch was loaded
_RUNNER = ("import atexit, sys\n"
           "atexit.register(lambda: sys.stderr.write('\\nTORCH_LOADED=%s\\n' % ('torch' in sys.modules)))\n"
           "atexit.register(lambda: sys.stderr.write('\\nHEAVY=%s\\n' % ','.join(\n"
           "    m for m in ('sklearn', 'pandas', 'matplotlib') if m in sys.modules)))\n"
           "import importlib\n"
           "module = sys.argv.pop(1)\n"
           "sys.argv[0] = module\n"
           "importlib.import_module(module).main()\n")


def _run(module, *args, stdin=None):
    proc = subprocess.run([sys.executable, "-c", _RUNNER, module, *map(str, args)], capture_output=True, text=True,
                          input=stdin)
    assert "TORCH_LOADED=" in proc.stderr, proc.stderr[-2000:]
    return proc, proc.stderr.rsplit("TORCH_LOADED=", 1)[1].strip() == "True"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Query/gallery/train features files: 4 ids × 2 cameras, clustered well apart (D=16, P=3 parts of 8)."""
    tmp = tmp_path_factory.mktemp("startup")
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(8, 16)).astype(np.float32)

    def write(name, n):
        pids = np.arange(n) % 8
        g = centers[pids] + 0.05 * rng.normal(size=(n, 16)).astype(np.float32)
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        parts = rng.normal(size=(n, 3, 8)).astype(np.float32)
        paths = [f"{p:04d}_c{i % 2 + 1}_{i:04d}.jpg" for i, p in enumerate(pids)]
        return write_features(tmp / name, g, parts, paths, pids, (np.arange(n) // 8) % 2,
                              {"normalized": True, "dataset": "folder:/x", "split": "all", "command": "test"})

    return {"train": write("train.h5", 80), "query": write("query.h5", 16), "gallery": write("gallery.h5", 48),
            "dir": tmp}


def test_import_partreid_is_light():
    proc = subprocess.run([sys.executable, "-c", "import sys, partreid; assert callable(partreid.evaluate_rank); "
                           "assert 'FeatureExtractor' in dir(partreid) and 'torch' not in sys.modules; "
                           "print(sorted(partreid.__all__))"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "FeatureExtractor" in proc.stdout and "load_model" in proc.stdout


@pytest.mark.parametrize("module", ["partreid.cli.cluster", "partreid.cli.refine_labels", "partreid.cli.evaluate",
                                    "partreid.cli.inspect_data", "partreid.cli.umbrella"])
def test_help_without_torch(module):
    proc, torch_loaded = _run(module, "--help")
    assert proc.returncode == 0 and "Examples" in proc.stdout, proc.stderr[-2000:]
    assert not torch_loaded


def test_file_commands_without_torch(files):
    tmp = files["dir"]
    proc, torch_loaded = _run("partreid.cli.cluster", files["train"], "--out", tmp / "labels.h5", "--k1", 10,
                              "--k2", 3, "--eps", 0.5, "--min-samples", 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(tmp / "labels.h5") and "clusters" in proc.stderr
    assert not torch_loaded
    # nor scikit-learn and pandas (0.9 s and 0.2 s of start-up), although the report has NMI/ARI vs pids
    assert "quality vs pids: NMI" in proc.stderr
    assert proc.stderr.rsplit("HEAVY=", 1)[1].split("\n")[0] == "", proc.stderr[-300:]
    # refine-labels, reading the labels path from stdin as in a pipe
    proc, torch_loaded = _run("partreid.cli.refine_labels", "--out", tmp / "refined.h5", "--k", 5,
                              stdin=f"{tmp / 'labels.h5'}\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not torch_loaded
    proc, torch_loaded = _run("partreid.cli.evaluate", "--query", files["query"], "--gallery", files["gallery"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "100.00%" in proc.stdout  # every id is its own tight cluster: rank-1 = 100 %
    assert not torch_loaded
    for target in (files["train"], tmp / "refined.h5"):
        proc, torch_loaded = _run("partreid.cli.inspect_data", target)
        assert proc.returncode == 0 and "rows (N): 80" in proc.stdout, proc.stderr[-2000:]
        assert not torch_loaded


def test_runner_detects_torch(files):
    # the check can fail: a command that runs a network does load torch
    proc, torch_loaded = _run("partreid.cli.evaluate", "--checkpoint", "no-such.pth", "--data", "folder:/nonexistent")
    assert proc.returncode == 2 and torch_loaded
