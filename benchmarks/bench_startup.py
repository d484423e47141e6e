"""Benchmark: whole-process start-up and run times of the commands that run no network, each beside a floor
measured in the same run (issue "One partreid package ...", step 4).

Every figure is one whole process, as a user times it in a shell: interpreter start, imports, reading the
input file, the work, writing the output. The wall time and the peak RSS of each process are measured by a
small wrapper process (``time.perf_counter`` around ``subprocess.run``, ``resource.getrusage(RUSAGE_CHILDREN)``),
so they cover only the command. Each measurement is repeated ``--repeat`` times and the minimum is reported
(other processes on the machine make single runs noisy).

Rows and targets (2-core machine):

- ``cluster --help`` ≤ 0.5 s (floor: ``python -c pass``, the bare interpreter);
- ``cluster`` on Market-size features (N 12,936, D 768, a features file) ≤ 1.5 × floor + 0.5 s with a peak RSS
  ≤ 0.8 GB; floor: a bare process that loads the same array from ``.npy``, imports faiss and runs the exact
  kNN search ``cluster`` needs (``IndexFlatIP``, k = the columns k1=30/k2=6 need);
- ``evaluate`` at Market size (3,368 queries × 15,913 gallery, D 768, two features files) ≤ 1.3 × floor + 0.5 s;
  floor: a bare process that loads the two arrays from ``.npy`` and computes ``q @ g.T`` in float32.

The synthetic features come from ``benchmarks/bench_cluster.py`` (``make_features``): clustered like a re-ID set.

    python benchmarks/bench_startup.py                  # all rows, 3 repeats
    python benchmarks/bench_startup.py --repeat 5 --rows help cluster
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_cluster import SIZES, make_features  # noqa: E402 - the generator lives beside this script

from partreid.common.h5io import write_features  # noqa: E402
from partreid.common.retrieval.kreciprocal import knn_columns_needed  # noqa: E402

BIN = Path(sys.executable).parent
PY = sys.executable
QUERY_N, GALLERY_N = 3368, 15913  # Market-1501 test split

# runs argv[1:], prints {"wall_s": ..., "rss_gb": ...} of that child alone
_MEASURE = ("import json, resource, subprocess, sys, time\n"
            "t = time.perf_counter()\n"
            "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode\n"
            "wall = time.perf_counter() - t\n"
            "kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
            "print(json.dumps({'rc': rc, 'wall_s': wall, 'rss_gb': kb / 1024 ** 2}))\n")


def measure(argv, repeat: int) -> dict:
    """Minimum wall time (s) and the peak RSS (GB) of ``argv`` run ``repeat`` times as a whole process."""
    runs = []
    for _ in range(repeat):
        out = subprocess.run([PY, "-c", _MEASURE, *map(str, argv)], capture_output=True, text=True, check=True)
        res = json.loads(out.stdout)
        if res["rc"] != 0:
            raise SystemExit(f"failed ({res['rc']}): {' '.join(map(str, argv))}")
        runs.append(res)
    return {"wall_s": min(r["wall_s"] for r in runs), "rss_gb": max(r["rss_gb"] for r in runs),
            "all_s": [round(r["wall_s"], 3) for r in runs]}


def _command(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def prepare(tmp: Path, rows) -> dict:
    """Write the features files (and the .npy copies the floors read)."""
    files = {}
    n, d, ids, cams = SIZES["market"]
    if "cluster" in rows:
        x, _, pid, cam = make_features(n, d, ids, cams, seed=0)
        files["train_h5"] = write_features(tmp / "train.h5", x, None, [f"{i:06d}.jpg" for i in range(n)], pid, cam,
                                           {"normalized": True, "command": "bench_startup"})
        np.save(tmp / "train.npy", x)
    if "evaluate" in rows:
        for name, size, seed in (("query", QUERY_N, 1), ("gallery", GALLERY_N, 2)):
            x, _, pid, cam = make_features(size, d, ids, cams, seed=0 if name == "query" else 0, junk=0.0)
            # same identities and cameras in both splits (seed 0 fixes the centres); fresh noise per split
            rng = np.random.default_rng(seed)
            perm = rng.permutation(size)
            x, pid, cam = x[perm], pid[perm], cam[perm]
            files[f"{name}_h5"] = write_features(tmp / f"{name}.h5", x, None, [f"{i:06d}.jpg" for i in range(size)],
                                                 pid, cam, {"normalized": True, "command": "bench_startup"})
            np.save(tmp / f"{name}.npy", x)
    return files


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per row; the minimum time is reported")
    ap.add_argument("--rows", nargs="+", default=["help", "cluster", "evaluate"],
                    choices=["help", "cluster", "evaluate"])
    ap.add_argument("--keep", default=None, help="keep the generated files in this folder")
    args = ap.parse_args(argv)
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_startup_"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        files = prepare(tmp, args.rows)
        k = knn_columns_needed(30, 6, "reference")
        table = []
        if "help" in args.rows:
            floor = measure([PY, "-c", "pass"], args.repeat)
            cmd = measure([_command("cluster"), "--help"], args.repeat)
            table.append(("cluster --help", cmd, floor, "python -c pass", 0.5, None, None))
        if "cluster" in args.rows:
            floor = measure([PY, "-c", "import sys, numpy as np, faiss\n"
                                       "x = np.load(sys.argv[1]); index = faiss.IndexFlatIP(x.shape[1])\n"
                                       "index.add(x); index.search(x, int(sys.argv[2]))",
                             tmp / "train.npy", k], args.repeat)
            cmd = measure([_command("cluster"), files["train_h5"], "--out", tmp / "labels.h5"], args.repeat)
            table.append(("cluster (Market N 12,936, D 768)", cmd, floor, f"bare faiss exact kNN (k={k})", None,
                          1.5, 0.8))
        if "evaluate" in args.rows:
            floor = measure([PY, "-c", "import sys, numpy as np\n"
                                       "q = np.load(sys.argv[1]); g = np.load(sys.argv[2]); d = q @ g.T",
                             tmp / "query.npy", tmp / "gallery.npy"], args.repeat)
            cmd = measure([_command("evaluate"), "--query", files["query_h5"], "--gallery", files["gallery_h5"]],
                          args.repeat)
            table.append((f"evaluate (Market {QUERY_N:,} x {GALLERY_N:,}, D 768)", cmd, floor, "bare q @ g.T",
                          None, 1.3, None))
        print(f"whole-process figures, minimum of {args.repeat} runs (wall seconds; peak RSS of the process)")
        print(f"{'command':<40} {'time':>7} {'RSS':>8}   {'floor':<34} {'floor t':>7} {'ratio':>6}   target")
        for name, cmd, floor, floor_name, absolute, factor, rss_limit in table:
            if absolute is not None:
                target = f"<= {absolute:.1f} s"
                ok = cmd["wall_s"] <= absolute
            else:
                limit = factor * floor["wall_s"] + 0.5
                target = f"<= {factor}x floor + 0.5 s = {limit:.2f} s"
                ok = cmd["wall_s"] <= limit
            if rss_limit is not None:
                target += f", RSS <= {rss_limit} GB"
                ok = ok and cmd["rss_gb"] <= rss_limit
            print(f"{name:<40} {cmd['wall_s']:>6.2f}s {cmd['rss_gb']:>6.2f}GB   {floor_name:<34} "
                  f"{floor['wall_s']:>6.2f}s {cmd['wall_s'] / floor['wall_s']:>5.2f}x   {target}: "
                  f"{'met' if ok else 'NOT met'}")
        print("all runs (s): " + "; ".join(f"{name}: {cmd['all_s']} (floor {floor['all_s']})"
                                            for name, cmd, floor, *_ in table))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
