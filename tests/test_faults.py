"""The file contract under misuse, faults and concurrency, through the real commands (issue 12).

Every case runs an installed console script in a subprocess and asserts, whatever the outcome:

* the exit code;
* stderr holds no traceback, and ends in exactly one ``error:`` line when the command failed (none on success);
* the SHA-256 of every input file is unchanged;
* nothing partial is left in the output folder (no ``.partial``/``.lock``/``.tmp`` file), and a failed command
  created nothing there;
* the mode of every file written is ``0666 & ~umask``.

Classes (the ``CLASS`` field of each case): alias (the output guard), lock (one writer per path), mode (file
modes), valid (validation at the boundary), usage (one-line usage errors), signal (SIGTERM like SIGINT),
resume (a finished run), message (messages naming the real cause), run (run folders as inputs).
Model-based cases use a randomly initialised ViT-Tiny on 32 repository crops at 64x32 pixels.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import h5py
import numpy as np
import pytest

from tests.conftest import REPO, script

VTEST = REPO / "data" / "sample" / "vtest"
TINY = ["-c", "random:vit_tiny", "--image-size", "64x32", "--workers", "0", "-b", "4"]
BAD_NAMES = (".partial", ".lock", ".tmp")


# --------------------------------------------------------------------------------------------- helpers
def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_hashes(*roots: Path) -> dict:
    out = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = sha(p)
    return out


# one thread per process: the cases are tiny, and idle OpenMP threads spinning on a 2-core machine cost more
# than the work (the extraction of 32 crops took 2.6x the CPU time with the default 2 threads)
ENV = {"PYTHONWARNINGS": "ignore", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}


def child_env() -> dict:
    env = dict(os.environ, **ENV)
    env.pop("PARTREID_DEBUG", None)
    return env


def run(argv: Sequence, *, stdin: Optional[str] = None, umask: int = 0o022, timeout: float = 300,
        cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    cmd = [script(str(argv[0]))] + [str(a) for a in argv[1:]]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, env=child_env(),
                          cwd=cwd, preexec_fn=lambda: os.umask(umask))


def stderr_lines(text: str) -> list:
    return [ln.split("\r")[-1] for ln in text.splitlines() if ln.split("\r")[-1].strip()]


def check_streams(proc, rc: int) -> None:
    assert proc.returncode == rc, f"exit {proc.returncode}, expected {rc}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "internal error" not in proc.stderr, proc.stderr[-3000:]
    lines = stderr_lines(proc.stderr)
    errors = [ln for ln in lines if ln.startswith("error:")]
    if rc == 0:
        assert not errors, proc.stderr[-3000:]
    else:
        assert len(errors) == 1 and lines[-1].startswith("error:"), proc.stderr[-3000:]


def check_clean(folder: Path) -> None:
    if folder.is_dir():
        left = [p.name for p in folder.rglob("*") if any(b in p.name for b in BAD_NAMES)]
        assert not left, f"left in {folder}: {left}"


def check_modes(paths, umask: int) -> None:
    for p in paths:
        mode = os.stat(p).st_mode & 0o777
        assert mode == 0o666 & ~umask, f"{p}: mode {oct(mode)}, expected {oct(0o666 & ~umask)}"


def listing(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.is_dir() else set()


def mutate(src: Path, dst: Path, fn: Callable) -> Path:
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        fn(f)
    return dst


def replace(f, name, data, **kw):
    del f[name]
    f.create_dataset(name, data=data, **kw)


# --------------------------------------------------------------------------------------------- fixtures
@dataclass
class Env:
    root: Path
    inp: Path
    out: Path = None
    extra_inputs: list = field(default_factory=list)

    def p(self, name: str) -> Path:
        return self.inp / name


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Small synthetic inputs, all in one folder whose hashes every case re-checks."""
    from partreid.common.h5io import read_features, write_features, write_labels
    from partreid.pplr_finetune.cross_agreement import refine_labels_file
    from partreid.pplr_finetune.pseudo_labels import cluster_features_file

    root = tmp_path_factory.mktemp("faults")
    inp = root / "in"
    inp.mkdir()
    rng = np.random.default_rng(0)
    n, d = 60, 16
    centers = rng.normal(size=(6, d))
    g = (centers[np.arange(n) % 6] + 0.05 * rng.normal(size=(n, d))).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    parts = (g[:, None, :8] + 0.05 * rng.normal(size=(n, 3, 8))).astype(np.float32)
    paths = [f"{i:03d}.jpg" for i in range(n)]
    pid, cam = np.arange(n) % 6, (np.arange(n) // 6) % 2
    attrs = {"normalized": True, "dataset": "folder:/nowhere", "split": "train", "command": "test"}
    f = write_features(inp / "f.h5", g, parts, paths, pid, cam, attrs)
    write_features(inp / "q.h5", g[:12] + 0.01, None, paths[:12], pid[:12], 1 - cam[:12], attrs)
    write_features(inp / "g.h5", g, None, paths, pid, cam, attrs)
    write_features(inp / "g_tied.h5", np.repeat(g[:1], n, 0), None, paths, pid, cam, attrs)
    write_features(inp / "g_d8.h5", g[:, :8], None, paths, pid, cam, attrs)
    write_features(inp / "n0.h5", np.zeros((0, d), np.float32), None, [], [], [], attrs)
    cluster_features_file(f, inp / "l.h5", k1=10, k2=3, min_samples=2)
    refine_labels_file(inp / "l.h5", inp / "r.h5", k=5)
    cluster_features_file(f, inp / "l.csv", k1=10, k2=3, min_samples=2)
    # broken features files
    mutate(f, inp / "nan.h5", lambda h: h["global"].__setitem__((3, 0), np.nan))
    mutate(f, inp / "pnan.h5", lambda h: h["parts"].__setitem__((5, 1, 0), np.inf))
    mutate(f, inp / "pN.h5", lambda h: replace(h, "parts", parts[:-1]))
    mutate(f, inp / "g1d.h5", lambda h: replace(h, "global", g[:, 0]))
    mutate(f, inp / "fmt.h5", lambda h: h.attrs.__setitem__("format", "somebody.else"))
    mutate(f, inp / "spid.h5", lambda h: replace(h, "pid", np.array([str(x) for x in pid], dtype=object),
                                               dtype=h5py.string_dtype()))
    mutate(f, inp / "pathN.h5", lambda h: replace(h, "path", np.array(paths[:-2], dtype=object),
                                                dtype=h5py.string_dtype()))
    (inp / "trunc.h5").write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    (inp / "notes.h5").write_text("these are not features\n")
    # broken labels files
    mutate(inp / "l.h5", inp / "lneg.h5", lambda h: h["labels"].__setitem__(0, -5))
    mutate(inp / "l.h5", inp / "lknn.h5", lambda h: h["knn"].__setitem__((0, 1), 999))
    mutate(inp / "l.h5", inp / "lN.h5", lambda h: replace(h, "pid", pid[:-1]))
    mutate(inp / "r.h5", inp / "rnan.h5", lambda h: h["agreement"].__setitem__((2, 2), np.nan))
    (inp / "lbad.csv").write_text("path,label\na.jpg,x\nb.jpg,1\n")
    shutil.copyfile(f, inp / "fcopy.h5")
    cluster_features_file(inp / "fcopy.h5", inp / "lstale.h5", k1=10, k2=3, min_samples=2)
    with h5py.File(inp / "fcopy.h5", "r+") as h:  # the features changed after clustering
        h.attrs["split"] = "edited"
    shutil.copyfile(f, root / "gone.h5")
    cluster_features_file(root / "gone.h5", inp / "lgone.h5", k1=10, k2=3, min_samples=2)
    (root / "gone.h5").unlink()
    # dataset manifest: 32 repository crops (absolute paths), 4 ids x 2 cameras
    crops = sorted(p for p in VTEST.glob("*.jpg"))[:32]
    (inp / "m.csv").write_text("path,pid,camid\n" + "".join(f"{c},{i % 4},{i % 2}\n" for i, c in enumerate(crops)))
    # a fake run folder and checkpoint file (refused before they are read)
    fake = inp / "fakerun"
    fake.mkdir()
    for name in ("checkpoint.pth", "last.pth"):
        (fake / name).write_bytes(b"not really a checkpoint")
    (fake / "metrics.csv").write_text("epoch,loss,mAP\n0,9.5,0.1\n1,8.0,0.2\n")
    (fake / "summary.json").write_text('{"last_epoch": 1, "last": {"mAP": 0.2}}\n')
    from PIL import Image

    Image.new("RGB", (8, 8), (10, 20, 30)).save(fake / "metrics.png")
    (inp / "emptydir").mkdir()
    (inp / "ck.pth").write_bytes(b"weights")
    os.symlink(inp / "f.h5", inp / "flink.h5")
    os.link(inp / "g.h5", inp / "ghard.h5")
    return Env(root, inp)


@pytest.fixture(scope="module")
def solo(env):
    """A solo extract-features run on the 32-crop manifest: the reference file of the model-based cases."""
    ref = env.root / "ref"
    ref.mkdir()
    proc = run(["extract-features", *TINY, "-d", f"csv:{env.p('m.csv')}", "--out", ref / "e.h5"])
    check_streams(proc, 0)
    return ref / "e.h5"


@pytest.fixture(scope="module")
def ft_run(env, solo):
    """A finished one-epoch finetune run (labels given as a file: 4 clusters of 8 crops)."""
    from partreid.common.h5io import read_features, write_labels

    feats = read_features(solo)
    labels_dir = env.root / "labels"
    labels_dir.mkdir()
    good = write_labels(labels_dir / "given.h5", feats.pid, features_file=solo, path=feats.path, pid=feats.pid,
                        camid=feats.camid, attrs={}, agreement=np.full((len(feats), 3), 0.5, np.float32))
    write_labels(labels_dir / "outliers.h5", np.full(len(feats), -1), features_file=solo, path=feats.path,
                 pid=feats.pid, camid=feats.camid, attrs={}, agreement=np.full((len(feats), 3), 0.5, np.float32))
    run_dir = env.root / "ftrun"
    proc = run(["finetune", *FT_ARGS(env, good), "--out", run_dir])
    check_streams(proc, 0)
    return run_dir


def FT_ARGS(env, labels):
    return ["-c", "random:vit_tiny", "--labels", labels, "--data", f"csv:{env.p('m.csv')}", "--epochs", "1",
            "--iters", "1", "-b", "8", "--num-instances", "2", "--eval-every", "0", "--workers", "0",
            "--image-size", "64x32", "--quiet"]


@pytest.fixture
def out(env, request):
    folder = env.root / "out" / request.node.name.replace("[", "_").replace("]", "").replace("/", "_")
    folder.mkdir(parents=True)
    return folder


# --------------------------------------------------------------------------------------------- the cases
@dataclass
class Case:
    cls: str
    name: str
    argv: Callable  # (env, out) -> argv list
    rc: int
    new: Sequence[str] = ()  # files the command must create in `out`
    err: str = ""  # substring of the last stderr line (failures) or of stderr (success)
    stdin: Optional[Callable] = None
    umask: int = 0o022
    stdout: str = ""
    setup: Optional[Callable] = None  # (env, out) -> None, before the run


def P(name):
    return lambda e, o: e.p(name)


CASES = [
    # ---- alias: the output guard (a command never writes a path it reads) ----
    Case("alias", "plot-clusters-over-features",
         lambda e, o: ["cluster", e.p("f.h5"), "--out", o / "l.h5", "--plot-clusters", e.p("f.h5")], 2,
         err="--plot-clusters"),
    Case("alias", "refine-plot-over-labels",
         lambda e, o: ["refine-labels", e.p("l.h5"), "--out", o / "r.h5", "--plot", e.p("l.h5")], 2, err="--plot"),
    Case("alias", "extract-over-manifest",
         lambda e, o: ["extract-features", *TINY, "-d", f"csv:{e.p('m.csv')}", "--out", e.p("m.csv")], 2,
         err="manifest"),
    Case("alias", "export-over-run-checkpoint",
         lambda e, o: ["pass-pretrain", "export", e.p("fakerun"), "--out", e.p("fakerun") / "checkpoint.pth"], 2,
         err="RUN"),
    Case("alias", "evaluate-out-over-stdin-query",
         lambda e, o: ["evaluate", "-g", e.p("g.h5"), "--out", e.p("q.h5")], 2, err="--query",
         stdin=lambda e, o: f"{e.p('q.h5')}\n"),
    Case("alias", "evaluate-out-over-gallery",
         lambda e, o: ["evaluate", "-q", e.p("q.h5"), "-g", e.p("g.h5"), "--out", e.p("g.h5")], 2, err="--gallery"),
    Case("alias", "cluster-out-over-input",
         lambda e, o: ["cluster", e.p("f.h5"), "--out", e.p("f.h5")], 2, err="FEATURES"),
    Case("alias", "cluster-out-over-stdin-input",
         lambda e, o: ["cluster", "--out", e.p("f.h5")], 2, err="FEATURES", stdin=lambda e, o: f"{e.p('f.h5')}\n"),
    Case("alias", "out-through-symlink",
         lambda e, o: ["cluster", e.p("f.h5"), "--out", e.p("flink.h5")], 2, err="would overwrite"),
    Case("alias", "out-through-hard-link",
         lambda e, o: ["evaluate", "-q", e.p("q.h5"), "-g", e.p("g.h5"), "--out", e.p("ghard.h5")], 2,
         err="the same file"),
    Case("alias", "refine-out-over-recorded-features",
         lambda e, o: ["refine-labels", e.p("l.h5"), "--out", e.p("f.h5")], 2, err="the features file of LABELS"),
    Case("alias", "two-outputs-one-path",
         lambda e, o: ["cluster", e.p("f.h5"), "--out", o / "x.h5", "--plot-clusters", o / "x.h5"], 2,
         err="name the same file"),
    Case("alias", "extract-over-checkpoint",
         lambda e, o: ["extract-features", "-c", e.p("ck.pth"), "-d", f"csv:{e.p('m.csv')}", "--out", e.p("ck.pth")],
         2, err="--checkpoint"),
    Case("alias", "finetune-run-over-its-checkpoint",
         lambda e, o: ["finetune", "-c", e.p("fakerun") / "last.pth", "-d", f"csv:{e.p('m.csv')}", "--out",
                       e.p("fakerun")], 2, err="last.pth"),
    Case("alias", "out-under-a-file",
         lambda e, o: ["cluster", e.p("f.h5"), "--out", o / "blocker" / "l.h5"], 2, err="not a folder",
         setup=lambda e, o: (o / "blocker").write_text("a file, not a folder")),
    Case("alias", "out-is-a-folder",
         lambda e, o: ["evaluate", "-q", e.p("q.h5"), "-g", e.p("g.h5"), "--out", o], 2, err="--out"),
    Case("alias", "run-folder-is-a-file",
         lambda e, o: ["pass-pretrain", "--data", f"csv:{e.p('m.csv')}", "--out", o / "x"], 2, err="--out",
         setup=lambda e, o: (o / "x").write_text("file")),
    Case("alias", "read-only-folder",
         lambda e, o: ["cluster", e.p("f.h5"), "--out", o / "ro" / "l.h5"], 2, err="cannot write",
         setup=lambda e, o: ((o / "ro").mkdir(), os.chmod(o / "ro", 0o555))),
    # ---- lock: one writer per final path ----
    Case("lock", "busy-output-refused",
         lambda e, o: ["cluster", e.p("f.h5"), "--out", o / "l.h5"], 2, err="another process"),
    Case("lock", "stale-lock-file-ignored",
         lambda e, o: ["cluster", e.p("f.h5"), "--out", o / "l.h5"], 0, new=["l.h5"],
         setup=lambda e, o: (o / ".l.h5.lock").write_text("12345\n")),
    Case("lock", "stale-partial-removed",
         lambda e, o: ["cluster", e.p("f.h5"), "--out", o / "l.h5"], 0, new=["l.h5"],
         setup=lambda e, o: (o / ".l.h5.12345-abcd0123.partial.h5").write_bytes(b"half a file")),
    Case("lock", "busy-run-folder-refused",
         lambda e, o: ["finetune", "-c", "random:vit_tiny", "-d", f"csv:{e.p('m.csv')}", "--out", o / "run"], 2,
         err="another process"),
    # ---- mode: 0666 & ~umask ----
    Case("mode", "labels-h5-umask-022", lambda e, o: ["cluster", e.p("f.h5"), "--out", o / "l.h5"], 0,
         new=["l.h5"]),
    Case("mode", "labels-h5-umask-002", lambda e, o: ["cluster", e.p("f.h5"), "--out", o / "l.h5"], 0,
         new=["l.h5"], umask=0o002),
    Case("mode", "labels-csv-umask-027", lambda e, o: ["cluster", e.p("f.h5"), "--out", o / "l.csv"], 0,
         new=["l.csv"], umask=0o027),
    Case("mode", "refined-and-png", lambda e, o: ["refine-labels", e.p("l.h5"), "--out", o / "r.h5", "--k", "5",
                                                  "--plot", o / "a.png"], 0, new=["r.h5", "a.png"]),
    Case("mode", "metrics-json", lambda e, o: ["evaluate", "-q", e.p("q.h5"), "-g", e.p("g.h5"), "--out",
                                               o / "m.json"], 0, new=["m.json"], umask=0o077),
    # ---- valid: validation at the boundary ----
    Case("valid", "cluster-n0", lambda e, o: ["cluster", e.p("n0.h5"), "--out", o / "l.h5"], 2, err="N = 0"),
    Case("valid", "inspect-n0", lambda e, o: ["inspect-data", e.p("n0.h5")], 2, err="N = 0"),
    Case("valid", "evaluate-empty-gallery", lambda e, o: ["evaluate", "-q", e.p("q.h5"), "-g", e.p("n0.h5")], 2,
         err="N = 0"),
    Case("valid", "batch-size-0",
         lambda e, o: ["extract-features", *TINY, "-b", "0", "-d", f"csv:{e.p('m.csv')}", "--out", o / "e.h5"], 2,
         err="--batch-size must be >= 1"),
    Case("valid", "workers-negative",
         lambda e, o: ["extract-features", *TINY, "-j", "-1", "-d", f"csv:{e.p('m.csv')}", "--out", o / "e.h5"], 2,
         err="--workers must be >= 0"),
    Case("valid", "k1-0", lambda e, o: ["cluster", e.p("f.h5"), "--out", o / "l.h5", "--k1", "0"], 2, err="--k1"),
    Case("valid", "k2-0", lambda e, o: ["cluster", e.p("f.h5"), "--out", o / "l.h5", "--k2", "0"], 2, err="--k2"),
    Case("valid", "min-samples-0", lambda e, o: ["cluster", e.p("f.h5"), "--out", o / "l.h5", "--min-samples", "0"],
         2, err="--min-samples"),
    Case("valid", "eps-1.5", lambda e, o: ["cluster", e.p("f.h5"), "--out", o / "l.h5", "--eps", "1.5"], 2,
         err="(0, 1]"),
    Case("valid", "eps-0", lambda e, o: ["cluster", e.p("f.h5"), "--out", o / "l.h5", "--eps", "0"], 2,
         err="(0, 1]"),
    Case("valid", "eps-nan", lambda e, o: ["cluster", e.p("f.h5"), "--out", o / "l.h5", "--eps", "nan"], 2,
         err="--eps"),
    Case("valid", "refine-k-0", lambda e, o: ["refine-labels", e.p("l.h5"), "--out", o / "r.h5", "--k", "0"], 2,
         err="--k must"),
    Case("valid", "rerank-k1-0", lambda e, o: ["evaluate", "-q", e.p("q.h5"), "-g", e.p("g.h5"), "--rerank",
                                               "--k1", "0"], 2, err="--k1"),
    Case("valid", "finetune-eps-1.5", lambda e, o: ["finetune", "-c", "random:vit_tiny", "-d",
                                                    f"csv:{e.p('m.csv')}", "--eps", "1.5", "--out", o / "run"], 2,
         err="--eps"),
    Case("valid", "parts-other-n", lambda e, o: ["cluster", e.p("pN.h5"), "--out", o / "l.h5"], 2,
         err="'parts' has 59 rows"),
    Case("valid", "parts-nan-in-cluster", lambda e, o: ["cluster", e.p("pnan.h5"), "--out", o / "l.h5"], 2,
         err="'parts' holds NaN/Inf"),
    Case("valid", "global-nan", lambda e, o: ["inspect-data", e.p("nan.h5")], 2, err="'global' holds NaN"),
    Case("valid", "query-nan", lambda e, o: ["evaluate", "-q", e.p("nan.h5"), "-g", e.p("g.h5")], 2,
         err="NaN"),
    Case("valid", "global-1d", lambda e, o: ["inspect-data", e.p("g1d.h5")], 2, err="2-D"),
    Case("valid", "wrong-format", lambda e, o: ["cluster", e.p("fmt.h5"), "--out", o / "l.h5"], 2,
         err="not a partreid.features file"),
    Case("valid", "labels-given-as-features", lambda e, o: ["evaluate", "-q", e.p("l.h5"), "-g", e.p("g.h5")], 2,
         err="not a partreid.features file"),
    Case("valid", "truncated", lambda e, o: ["inspect-data", e.p("trunc.h5")], 2, err="trunc"),
    Case("valid", "not-hdf5", lambda e, o: ["cluster", e.p("notes.h5"), "--out", o / "l.h5"], 2,
         err="not an HDF5 file"),
    Case("valid", "pid-strings", lambda e, o: ["inspect-data", e.p("spid.h5")], 2, err="'pid' must hold"),
    Case("valid", "path-other-n", lambda e, o: ["evaluate", "-q", e.p("pathN.h5"), "-g", e.p("g.h5")], 2,
         err="mismatched N"),
    Case("valid", "missing-input", lambda e, o: ["cluster", e.p("nope.h5"), "--out", o / "l.h5"], 2,
         err="no such"),
    Case("valid", "input-is-folder", lambda e, o: ["refine-labels", e.p("emptydir"), "--out", o / "r.h5"], 2,
         err="directory"),
    Case("valid", "labels-below-minus-1", lambda e, o: ["inspect-data", e.p("lneg.h5")], 2, err="-5"),
    Case("valid", "knn-out-of-range", lambda e, o: ["refine-labels", e.p("lknn.h5"), "--out", o / "r.h5"], 2,
         err="'knn' holds row indices"),
    Case("valid", "labels-other-n", lambda e, o: ["refine-labels", e.p("lN.h5"), "--out", o / "r.h5"], 2,
         err="mismatched N"),
    Case("valid", "agreement-nan", lambda e, o: ["inspect-data", e.p("rnan.h5")], 2, err="'agreement' holds NaN"),
    Case("valid", "labels-csv-not-integers", lambda e, o: ["inspect-data", e.p("lbad.csv")], 2, err="lbad.csv"),
    Case("valid", "stale-labels", lambda e, o: ["refine-labels", e.p("lstale.h5"), "--out", o / "r.h5"], 2,
         err="different version"),
    Case("valid", "gallery-other-width", lambda e, o: ["evaluate", "-q", e.p("q.h5"), "-g", e.p("g_d8.h5")], 2,
         err="D="),
    # ---- usage: one-line click errors ----
    Case("usage", "no-such-option", lambda e, o: ["cluster", "--bogus"], 2,
         err="error: no such option: --bogus (see 'cluster --help')"),
    Case("usage", "umbrella-no-such-option", lambda e, o: ["partreid", "cluster", "--bogus"], 2,
         err="error: no such option: --bogus (see 'partreid cluster --help')"),
    Case("usage", "umbrella-no-such-command", lambda e, o: ["partreid", "clusterr"], 2,
         err="no such command 'clusterr' (see 'partreid --help')"),
    Case("usage", "missing-required-option", lambda e, o: ["cluster", e.p("f.h5")], 2,
         err="missing option '--out'"),
    Case("usage", "not-an-integer", lambda e, o: ["cluster", e.p("f.h5"), "--out", o / "l.h5", "--k1", "abc"], 2,
         err="'abc' is not a valid integer (see 'cluster --help')"),
    Case("usage", "bad-choice", lambda e, o: ["evaluate", "-q", e.p("q.h5"), "-g", e.p("g.h5"), "--protocol",
                                              "x"], 2, err="--protocol"),
    Case("usage", "extra-argument", lambda e, o: ["refine-labels", "a", "b", "--out", o / "r.h5"], 2,
         err="unexpected extra argument"),
    Case("usage", "subcommand-option", lambda e, o: ["pass-pretrain", "export", "--bogus"], 2,
         err="(see 'pass-pretrain export --help')"),
    Case("usage", "bad-value-parsed-in-body",
         lambda e, o: ["extract-features", *TINY[:2], "--image-size", "12", "-d", f"csv:{e.p('m.csv')}",
                       "--out", o / "e.h5"], 2, err="expected HxW"),
    Case("usage", "bad-sweep", lambda e, o: ["cluster", e.p("f.h5"), "--out", o / "l.h5", "--sweep-eps", "x"], 2,
         err="START:STOP:STEP"),
    Case("usage", "inspect-no-such-option", lambda e, o: ["inspect-data", "--bogus"], 2,
         err="error: no such option: --bogus (see 'inspect-data --help')"),
    # ---- message: the real cause ----
    Case("message", "evaluate-ties-warned", lambda e, o: ["evaluate", "-q", e.p("q.h5"), "-g", e.p("g_tied.h5")],
         0, err="gallery row order"),
    Case("message", "missing-features-of-labels", lambda e, o: ["refine-labels", e.p("lgone.h5"), "--out",
                                                                o / "r.h5"], 2, err="gone.h5 does not exist"),
    # ---- run: run folders as inputs ----
    Case("run", "inspect-fake-run-folder", lambda e, o: ["inspect-data", e.p("fakerun")], 0,
         stdout="run folder"),
    Case("run", "extract-from-folder-without-model",
         lambda e, o: ["extract-features", "-c", e.p("emptydir"), "-d", f"csv:{e.p('m.csv')}", "--out", o / "e.h5"],
         2, err="a folder without a model"),
]


def _busy(case, env, out):
    """Hold the write lock of the case's output from another process while the case runs."""
    target = out / "run" if "run-folder" in case.name else out / "l.h5"
    lock = target.with_name(f".{target.name}.lock")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT, 0o644)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, str(os.getpid()).encode())\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
        "os.unlink(" + repr(str(lock)) + ")\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.parametrize("case", CASES, ids=[f"{c.cls}-{c.name}" for c in CASES])
def test_fault_case(case, env, out):
    if case.name == "read-only-folder" and os.geteuid() == 0:
        pytest.skip("root ignores folder permissions")
    if case.setup:
        case.setup(env, out)
    before_inputs = tree_hashes(env.inp)
    before_out = listing(out)
    holder = _busy(case, env, out) if case.cls == "lock" and case.name.startswith("busy") else None
    try:
        proc = run(case.argv(env, out), stdin=case.stdin(env, out) if case.stdin else None, umask=case.umask)
    finally:
        if holder is not None:
            holder.communicate("", timeout=30)
    check_streams(proc, case.rc)
    assert tree_hashes(env.inp) == before_inputs, "an input file changed"
    check_clean(out)
    if case.rc != 0:
        assert listing(out) == before_out, "a failed command created files"
        assert case.err in stderr_lines(proc.stderr)[-1]
    else:
        assert case.err in proc.stderr
        assert case.stdout in proc.stdout
        for name in case.new:
            assert (out / name).is_file(), f"{name} not written"
        check_modes([out / name for name in case.new], case.umask)
    if case.name == "inspect-fake-run-folder":
        assert "metrics.png" in proc.stdout and "image" not in proc.stdout.lower()
        assert not (env.p("fakerun") / ".partreid").exists()
    if case.name == "stale-lock-file-ignored":
        assert not (out / ".l.h5.lock").exists()


# --------------------------------------------------------------------------------------------- model-based cases
def test_signal_sigterm_keeps_resumable_state(env, solo, out):
    """SIGTERM mid-extraction: one line, exit 143, the partial file kept, no lock file, no worker left; --resume
    then completes the file exactly as a solo run."""
    before = tree_hashes(env.inp)
    argv = [script("extract-features"), "-c", "random:vit_tiny", "--image-size", "64x32", "-b", "1", "-j", "1",
            "-d", f"csv:{env.p('m.csv')}", "--out", out / "e.h5"]
    proc = subprocess.Popen([str(a) for a in argv], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: os.umask(0o022), env=child_env())
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any(".partial" in p.name for p in out.iterdir()):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the extraction ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    proc.stdout = stdout
    proc.stderr = stderr
    check_streams(proc, 143)
    assert "SIGTERM" in stderr_lines(stderr)[-1] and "--resume" in stderr_lines(stderr)[-1]
    left = sorted(p.name for p in out.iterdir())
    assert len(left) == 1 and ".partial" in left[0] and not (out / "e.h5").exists(), left
    time.sleep(0.5)
    alive = [pid for pid in os.listdir("/proc") if pid.isdigit() and _pgid(int(pid)) == proc.pid]
    assert not alive, f"processes of the killed run still alive: {alive}"
    resumed = run(["extract-features", "-c", "random:vit_tiny", "--image-size", "64x32", "-b", "8", "-j", "0",
                   "-d", f"csv:{env.p('m.csv')}", "--out", out / "e.h5", "--resume"])
    check_streams(resumed, 0)
    assert sorted(p.name for p in out.iterdir()) == ["e.h5"]
    assert_same_features(out / "e.h5", solo)
    check_modes([out / "e.h5"], 0o022)
    assert tree_hashes(env.inp) == before


@pytest.mark.parametrize("sig,rc", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_while_holding_the_output(env, out, sig, rc):
    """A signal after the output guard took its lock: one line, exit 143/130, the lock released, nothing left."""
    before = tree_hashes(env.inp)
    proc = subprocess.Popen([script("cluster"), str(env.p("f.h5")), "--out", str(out / "l.h5")], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=lambda: os.umask(0o022),
                            env=child_env())
    deadline = time.time() + 60
    while not (out / ".l.h5.lock").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "cluster ended before the signal"
    os.kill(proc.pid, sig)
    proc.stdout, proc.stderr = proc.communicate(timeout=60)
    check_streams(proc, rc)
    assert signal.Signals(sig).name in stderr_lines(proc.stderr)[-1]
    assert list(out.iterdir()) == []
    assert tree_hashes(env.inp) == before


def _pgid(pid: int) -> Optional[int]:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def assert_same_features(a: Path, b: Path) -> None:
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert sorted(fa) == sorted(fb)
        for name in fa:
            x, y = fa[name][...], fb[name][...]
            assert x.shape == y.shape and np.array_equal(x, y), name
        skip = {"created", "command"}
        ka = {k: fa.attrs[k] for k in fa.attrs if k not in skip}
        kb = {k: fb.attrs[k] for k in fb.attrs if k not in skip}
        assert ka.keys() == kb.keys()
        for k in ka:
            assert np.array_equal(np.asarray(ka[k]), np.asarray(kb[k])), k


def test_resume_finished_finetune_changes_nothing(env, ft_run):
    before = tree_hashes(ft_run)
    labels = env.root / "labels" / "given.h5"
    proc = run(["finetune", *FT_ARGS(env, labels), "--out", ft_run, "--resume"])
    check_streams(proc, 0)
    assert "already finished" in proc.stderr and "nothing changed" in proc.stderr
    assert proc.stdout.strip() == str(ft_run / "last.pth")
    assert tree_hashes(ft_run) == before
    check_clean(ft_run)
    check_modes([p for p in ft_run.iterdir() if p.is_file()], 0o022)


def test_message_degenerate_given_labels_name_the_file(env, ft_run, out):
    bad = env.root / "labels" / "outliers.h5"
    before = tree_hashes(env.root / "labels", env.inp)
    proc = run(["finetune", *FT_ARGS(env, bad), "--out", out / "run"])
    check_streams(proc, 2)
    last = stderr_lines(proc.stderr)[-1]
    assert str(bad) in last and "--labels" in last and "0 cluster" in last
    assert tree_hashes(env.root / "labels", env.inp) == before
    check_clean(out)


def test_run_folder_as_checkpoint_and_inspect(env, ft_run, solo, out):
    before = tree_hashes(ft_run)
    proc = run(["extract-features", "-c", ft_run, "--image-size", "64x32", "-j", "0", "-b", "8",
                "-d", f"csv:{env.p('m.csv')}", "--out", out / "e.h5"])
    check_streams(proc, 0)
    assert "last.pth" in proc.stderr
    with h5py.File(out / "e.h5", "r") as f:
        assert f["global"].shape[0] == 32
    check_modes([out / "e.h5"], 0o022)
    info = run(["inspect-data", ft_run])
    check_streams(info, 0)
    assert "run folder" in info.stdout and "finetune" in info.stdout and "last.pth" in info.stdout
    assert not (ft_run / ".partreid").exists()
    assert tree_hashes(ft_run) == before
    check_clean(out)


# --------------------------------------------------------------------------------------------- concurrency
def _race(argv, out_file: Path, gap: float, reference: Callable, reps: int = 5):
    outcomes = []
    for rep in range(reps):
        if out_file.exists():
            out_file.unlink()
        first = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=child_env())
        time.sleep(gap)
        second = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=child_env())
        results = []
        for p in (first, second):
            stdout, stderr = p.communicate(timeout=300)
            p.stdout, p.stderr = stdout, stderr
            results.append(p)
        for p in results:
            assert "Traceback" not in p.stderr, p.stderr
            if p.returncode == 0:
                reference(out_file)
            else:
                check_streams(p, 2)
                assert "another process" in stderr_lines(p.stderr)[-1]
        assert any(p.returncode == 0 for p in results)
        reference(out_file)
        check_clean(out_file.parent)
        check_modes([out_file], 0o022)
        outcomes.append(tuple(p.returncode for p in results))
    return outcomes


def test_concurrent_extract_features_same_out(env, solo, out):
    argv = [script("extract-features"), *TINY, "-d", f"csv:{env.p('m.csv')}", "--out", out / "e.h5"]
    outcomes = _race(argv, out / "e.h5", 1.0, lambda f: assert_same_features(f, solo))
    assert all(o == (0, 2) for o in outcomes), outcomes  # the second starts while the first holds the file


def test_concurrent_cluster_same_out(env, out):
    ref = out / "solo" / "l.h5"
    ref.parent.mkdir()
    check_streams(run(["cluster", env.p("f.h5"), "--out", ref]), 0)
    target = out / "race" / "l.h5"
    target.parent.mkdir()
    argv = [script("cluster"), env.p("f.h5"), "--out", target]
    outcomes = _race(argv, target, 0.3, lambda f: _same_labels(f, ref))
    assert all(0 in o for o in outcomes) and (0, 2) in outcomes, outcomes  # the race happened at least once


def _same_labels(a: Path, b: Path) -> None:
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert sorted(fa) == sorted(fb)
        for name in fa:
            assert np.array_equal(fa[name][...], fb[name][...]), name
        for k in fa.attrs:
            if k not in ("created", "command"):
                assert np.array_equal(np.asarray(fa.attrs[k]), np.asarray(fb.attrs[k])), k
