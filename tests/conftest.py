"""Shared fixtures: the real images in ../shared/data, the console-script paths and small feature files."""

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BIN = Path(sys.executable).parent


def shared_data(sub: str = "") -> Path:
    """Path under ../shared/data; skips the test with a clear message when it is absent."""
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"real-image test skipped: {path} not found (the ../shared folder beside the repository "
                    f"root holds the test images)")
    return path


def script(name: str) -> str:
    """Absolute path of an installed console script (falls back to PATH)."""
    candidate = BIN / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


@pytest.fixture
def features_file(tmp_path):
    """A small valid features file: 12 rows, D=8, P=3 parts, 3 pids × 2 cameras."""
    from partreid.common.h5io import write_features

    rng = np.random.default_rng(0)
    g = rng.normal(size=(12, 8)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    parts = rng.normal(size=(12, 3, 4)).astype(np.float32)
    paths = [f"{i // 4:04d}_c{i % 2 + 1}_{i:04d}.jpg" for i in range(12)]
    out = tmp_path / "feats.h5"
    write_features(out, g, parts, paths, np.arange(12) // 4, np.arange(12) % 2,
                   {"normalized": True, "dataset": "folder:/x", "split": "all", "image_size": [256, 128],
                    "command": "test"})
    return out


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    monkeypatch.delenv("PARTREID_DEBUG", raising=False)
    os.environ.setdefault("MPLBACKEND", "Agg")
