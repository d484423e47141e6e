"""A non-editable ``pip install .`` into a fresh virtual environment leaves one import package, ``partreid``.

The fresh venv gets no packages of its own: a ``.pth`` file points it at this environment's site-packages for
the dependencies (torch, faiss, ...), so the test runs offline in seconds. pip (from this environment, with
``--python``) builds the wheel from a copy of the repository and installs it with ``--no-deps --no-index``.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.conftest import REPO

#: folders of the repository that must never appear at the top level of site-packages
NOT_TOP_LEVEL = {"common", "cli", "pass_pretrain", "pplr_finetune", "tests", "benchmarks", "tools", "data"}


@pytest.mark.slow
def test_pip_install_gives_one_package(tmp_path):
    src = tmp_path / "src"
    skip = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.h5", "build", "dist", "*.egg-info", "demo_out",
                                  "runs", ".pytest_cache", ".partreid", ".whl")

    def ignore(folder, names):  # the sample images (data/ at the root) are not part of the package
        return set(skip(folder, names)) | ({"data"} if Path(folder) == REPO else set())

    shutil.copytree(REPO, src, ignore=ignore)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    env_python = env_dir / "bin" / "python"
    purelib = Path(subprocess.run([str(env_python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # dependencies (and setuptools for the build) come from this environment
    (purelib / "_partreid_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHONPATH"))}
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(env_python), "install", "--no-deps",
                           "--no-build-isolation", "--no-index", "--no-cache-dir", "--disable-pip-version-check",
                           "--quiet", str(src)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    top = {p.name for p in purelib.iterdir()} - {"_partreid_test_deps.pth", "__pycache__"}
    packages = {name for name in top if (purelib / name).is_dir() and not name.endswith(".dist-info")}
    assert packages == {"partreid"}, sorted(top)
    assert not (top & NOT_TOP_LEVEL)
    dist_info = [name for name in top if name.endswith(".dist-info")]
    assert len(dist_info) == 1 and dist_info[0].startswith("partreid-")
    assert (purelib / dist_info[0] / "top_level.txt").read_text().split() == ["partreid"]
    assert {"common", "cli", "pass_pretrain", "pplr_finetune"} <= {p.name for p in (purelib / "partreid").iterdir()}

    # imported from a folder that is not the repository, with a common.py there to shadow nothing
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "common.py").write_text("raise SystemExit('the local common.py was imported')\n")
    proc = subprocess.run([str(env_python), "-c", "import partreid; partreid.FeatureExtractor; "
                           "from partreid.common.models.loader import load_model; print(partreid.__file__)"],
                          cwd=work, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip()).parent == purelib / "partreid"
    # the console scripts point into partreid.cli
    proc = subprocess.run([str(env_dir / "bin" / "partreid"), "cluster", "--help"], cwd=work, capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0 and "Usage: partreid cluster" in proc.stdout, proc.stderr[-3000:]
