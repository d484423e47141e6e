"""Benchmark: ``cluster`` (kNN → sparse k-reciprocal Jaccard → DBSCAN) and ``refine-labels`` (cross-agreement).

Deterministic synthetic features that look like a re-ID training set: every identity has a centre, every
camera a bias, every (identity, camera) pair its own appearance offset, plus per-image noise; a few percent
of the images are background/junk with no identity. With the defaults DBSCAN (k1=30, k2=6, eps=0.6,
min_samples=4) finds a few hundred clusters and about 10% outliers.

Each size runs in a fresh subprocess, so the peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the
whole process: Python, the features, faiss, the clustering) is per size. Every time is printed next to the
bare exact faiss kNN search on the same data in the same process (``IndexFlatIP``, one ``search`` call):
``cluster`` next to the k1-NN search of the global features, ``refine-labels`` next to its three part searches.
Before the timed runs each worker calls the clustering once on a few hundred images, so that loading the
compiled Jaccard kernels from numba's on-disk cache (printed as "warm-up") is not in the timed figures.

The compiled kernels (numba) are measured first, in two fresh processes sharing an empty temporary
``NUMBA_CACHE_DIR``: the first compiles them (``compile``: first call minus second call, clustering and
re-ranking), the second loads them from the cache (``cached start``: importing the module, numba included, plus
the first calls' extra time over the second ones).

    python benchmarks/bench_cluster.py                      # numba compile/cache, Market and MSMT17 sizes
    python benchmarks/bench_cluster.py --sizes market --stages cluster --repeat 3
    python benchmarks/bench_cluster.py --sizes none --approx-n 200000   # N=200k, D=384, --knn approximate (HNSW)
    python benchmarks/bench_cluster.py --files               # also the file-level functions (HDF5 in/out)
    python benchmarks/bench_cluster.py --no-compile          # skip the compile/cache measurement

Targets (2-core machine): cluster <= 1.4x its kNN time (Market), <= 1.25x (MSMT17), with <= 0.8 GB (Market) /
1.5 GB (MSMT17); refine-labels <= 1.2x its part kNN searches; N=200k approximate <= 15 min, 8 GB.
Other processes on the machine make the times noisy; use --repeat and read the minimum.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SIZES = {  # name: (N, D, identities, cameras)
    "market": (12936, 768, 751, 6),
    "msmt": (32621, 768, 1041, 15),
}


def make_features(n: int, d: int, ids: int, cams: int, *, parts: int = 0, seed: int = 0, sigma: float = 2.0,
                  beta: float = 0.6, gamma: float = 0.8, junk: float = 0.04):
    """Deterministic clustered features, float32 L2-normalised, generated in blocks (bounded memory).

    x = centre[pid] + gamma·appearance[pid, cam] + beta·bias[cam] + sigma·noise (each term a random direction
    of norm ~1 in D dimensions); junk images (pid -1) replace the identity terms by a random direction.
    Identity sizes follow a Gamma(1.5) distribution, as real sets have many small and a few large identities.

    Returns:
        (global (N, D), parts (N, P, D) or None, pid int64 (N,), camid int64 (N,)). Part p uses its own
        centres and 1 + 0.3·p times the noise, so the parts agree less and less with the global feature.
    """
    rng = np.random.default_rng(seed)
    n_junk = int(round(n * junk))
    weights = rng.gamma(1.5, 1.0, ids)
    pid = np.concatenate([rng.choice(ids, size=n - n_junk, p=weights / weights.sum()),
                          -np.ones(n_junk, np.int64)])
    cam = rng.integers(0, cams, n)
    perm = rng.permutation(n)
    pid, cam = pid[perm].astype(np.int64), cam[perm].astype(np.int64)

    def space(salt: int, noise: float) -> np.ndarray:
        r = np.random.default_rng([seed, salt])
        scale = np.float32(1 / np.sqrt(d))
        centre = r.standard_normal((ids, d), dtype=np.float32) * scale
        bias = r.standard_normal((cams, d), dtype=np.float32) * scale
        look = r.standard_normal((ids, cams, d), dtype=np.float32) * scale
        out = np.empty((n, d), np.float32)
        for s in range(0, n, 8192):
            e = min(n, s + 8192)
            p, c = pid[s:e], cam[s:e]
            real = p >= 0
            z = r.standard_normal((e - s, d), dtype=np.float32) * scale
            x = np.float32(beta) * bias[c] + np.float32(noise) * z
            x[real] += centre[p[real]] + np.float32(gamma) * look[p[real], c[real]]
            x[~real] += r.standard_normal((int((~real).sum()), d), dtype=np.float32) * scale
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[s:e] = x
        return out

    g = space(0, sigma)
    p_feats = None
    if parts:
        p_feats = np.empty((n, parts, d), np.float32)
        for j in range(parts):
            p_feats[:, j] = space(1 + j, sigma * (1 + 0.3 * j))
    return g, p_feats, pid, cam


def _peak_rss_gb(who=resource.RUSAGE_SELF) -> float:
    kb = resource.getrusage(who).ru_maxrss
    return kb / (1024 ** 3 if sys.platform == "darwin" else 1024 ** 2)


def _bare_knn(x: np.ndarray, k: int) -> float:
    import faiss

    t = time.perf_counter()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    index.search(x, k)
    return time.perf_counter() - t


def _warm_up() -> float:
    """Seconds of a first clustering of 400 images (loads the compiled kernels from numba's cache)."""
    from partreid.pplr_finetune.pseudo_labels import pseudo_labels

    x = make_features(400, 64, 30, 4, seed=1)[0]
    t = time.perf_counter()
    pseudo_labels(x, k1=30, k2=6, eps=0.6, min_samples=4)
    return time.perf_counter() - t


def worker_cluster(size: str, repeat: int, seed: int, files: bool, noise: float) -> dict:
    from partreid.pplr_finetune.pseudo_labels import cluster_quality, pseudo_labels

    n, d, ids, cams = SIZES[size]
    x, _, pid, cam = make_features(n, d, ids, cams, seed=seed, sigma=noise)
    warm = _warm_up()
    knn_t, clu_t, res = [], [], None
    for _ in range(repeat):
        knn_t.append(_bare_knn(x, 30))
        t = time.perf_counter()
        res = pseudo_labels(x, k1=30, k2=6, eps=0.6, min_samples=4)
        clu_t.append(time.perf_counter() - t)
    q = cluster_quality(res.labels, pid)
    out = {"stage": "cluster", "size": size, "n": n, "d": d, "knn_s": min(knn_t), "time_s": min(clu_t),
           "ratios": [round(c / k, 3) for c, k in zip(clu_t, knn_t)], "warm_up_s": warm,
           "clusters": res.num_clusters, "outliers": res.num_outliers, "ari": q["ari"],
           "graph_nnz_per_row": res.graph.nnz / n,
           "steps": {k: round(v, 3) for k, v in res.timings.items()}}
    if files:
        out["file_s"] = _file_level(x, None, pid, cam, stage="cluster")
    out["peak_rss_gb"] = _peak_rss_gb()
    return out


def worker_numba() -> dict:
    """Import and first/second-call times of the compiled kernels (clustering and re-ranking), in seconds."""
    t = time.perf_counter()
    from partreid.common.retrieval import kreciprocal, reranking

    out = {"import_s": time.perf_counter() - t}
    x = make_features(600, 64, 40, 4, seed=2)[0]
    for name, call in [("cluster", lambda: kreciprocal.kreciprocal_jaccard(x, 30, 6, max_distance=0.6)),
                       ("rerank", lambda: reranking.reranked_distance(x[:100], x[100:]))]:
        for which in ("first", "second"):
            t = time.perf_counter()
            call()
            out[f"{name}_{which}_s"] = time.perf_counter() - t
    return out


def _numba_report() -> None:
    with tempfile.TemporaryDirectory() as cache:
        env = {"NUMBA_CACHE_DIR": cache}
        t = time.perf_counter()
        cold = _run_worker(["numba"], env)
        cold_wall = time.perf_counter() - t
        t = time.perf_counter()
        warm = _run_worker(["numba"], env)
        warm_wall = time.perf_counter() - t
    compile_s = sum(cold[f"{k}_first_s"] - cold[f"{k}_second_s"] for k in ("cluster", "rerank"))
    load_s = sum(warm[f"{k}_first_s"] - warm[f"{k}_second_s"] for k in ("cluster", "rerank"))
    print(f"numba kernels: compile {compile_s:6.2f} s (empty cache; whole process {cold_wall:5.2f} s) | cached "
          f"start {warm['import_s'] + load_s:5.2f} s = import {warm['import_s']:4.2f} s + first-call load "
          f"{load_s:4.2f} s (whole process {warm_wall:5.2f} s)")
    sys.stdout.flush()


def worker_refine(size: str, repeat: int, seed: int, files: bool, noise: float) -> dict:
    from partreid.common.retrieval.search import knn_search
    from partreid.pplr_finetune.cross_agreement import cross_agreement_from_features

    n, d, ids, cams = SIZES[size]
    x, parts, pid, cam = make_features(n, d, ids, cams, parts=3, seed=seed, sigma=noise)
    _, table = knn_search(x, 30)  # what `cluster` stored in the labels file
    knn_t, ref_t, agree = [], [], None
    for _ in range(repeat):
        t_parts = 0.0
        for j in range(parts.shape[1]):
            t_parts += _bare_knn(np.ascontiguousarray(parts[:, j]), 21)
        knn_t.append(t_parts)
        t = time.perf_counter()
        agree = cross_agreement_from_features(x, parts, 20, global_knn=table)
        ref_t.append(time.perf_counter() - t)
    out = {"stage": "refine-labels", "size": size, "n": n, "d": d, "knn_s": min(knn_t), "time_s": min(ref_t),
           "agreement_mean": [round(float(v), 3) for v in agree.mean(axis=0)]}
    if files:
        out["file_s"] = _file_level(x, parts, pid, cam, stage="refine")
    out["peak_rss_gb"] = _peak_rss_gb()
    return out


def worker_approx(n: int, seed: int, noise: float) -> dict:
    from partreid.pplr_finetune.pseudo_labels import cluster_quality, pseudo_labels

    d, ids, cams = 384, max(1, n // 17), 20
    x, _, pid, _ = make_features(n, d, ids, cams, seed=seed, sigma=noise)
    t = time.perf_counter()
    res = pseudo_labels(x, k1=30, k2=6, eps=0.6, min_samples=4, knn="approximate")
    elapsed = time.perf_counter() - t
    q = cluster_quality(res.labels, pid)
    return {"stage": "cluster --knn approximate", "size": f"{n}", "n": n, "d": d, "time_s": elapsed,
            "clusters": res.num_clusters, "outliers": res.num_outliers, "ari": q["ari"],
            "steps": {k: round(v, 3) for k, v in res.timings.items()}, "peak_rss_gb": _peak_rss_gb()}


def _file_level(x, parts, pid, cam, stage: str) -> float:
    """Seconds of the file-level function (HDF5 read, hashing, write) on a temporary features file."""
    from partreid.common.h5io import write_features
    from partreid.pplr_finetune.cross_agreement import refine_labels_file
    from partreid.pplr_finetune.pseudo_labels import cluster_features_file

    with tempfile.TemporaryDirectory() as tmp:
        feats = Path(tmp) / "features.h5"
        write_features(feats, x, parts, [f"{i:06d}.jpg" for i in range(len(x))], pid, cam,
                       {"normalized": True, "command": "bench_cluster"})
        t = time.perf_counter()
        labels, _ = cluster_features_file(feats, Path(tmp) / "labels.h5")
        t_cluster = time.perf_counter() - t
        if stage == "cluster":
            return t_cluster
        t = time.perf_counter()
        refine_labels_file(labels, Path(tmp) / "refined.h5")
        return time.perf_counter() - t


def _run_worker(args: list, env: Optional[dict] = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker"] + [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"worker {args} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _print(res: dict) -> None:
    line = f"{res['stage']:<26} {res['size']:>7} N={res['n']:<7} D={res['d']:<4} time {res['time_s']:7.2f} s"
    if "knn_s" in res:
        ratio = res["time_s"] / res["knn_s"]
        line += f" | bare kNN {res['knn_s']:6.2f} s | ratio {ratio:4.2f}"
    if "file_s" in res:
        line += f" | file-level {res['file_s']:6.2f} s"
    line += f" | peak RSS {res['peak_rss_gb']:5.2f} GB"
    print(line)
    extra = {k: v for k, v in res.items() if k in ("ratios", "warm_up_s", "clusters", "outliers", "ari", "steps",
                                                     "agreement_mean", "graph_nnz_per_row")}
    if extra:
        print("    " + json.dumps(extra, default=lambda v: round(float(v), 4)))
    sys.stdout.flush()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="market,msmt", help="comma list of market,msmt (or 'none')")
    ap.add_argument("--stages", default="cluster,refine", help="comma list of cluster,refine")
    ap.add_argument("--approx-n", type=int, default=0, help="also run N images, D=384, with --knn approximate")
    ap.add_argument("--repeat", type=int, default=1, help="repetitions per measurement (the minimum is shown)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--files", action="store_true", help="also time the file-level functions (HDF5 in/out)")
    ap.add_argument("--noise", type=float, default=2.0,
                    help="per-image noise of the Market/MSMT17-size features (harder data: larger V_qe supports)")
    ap.add_argument("--approx-noise", type=float, default=1.2,
                    help="noise of the --approx-n features (12k random identities in D=384: the targets are time "
                         "and memory; HNSW's recall on such unstructured random clusters is modest)")
    ap.add_argument("--no-compile", action="store_true",
                    help="skip the measurement of numba's compile time and cached start")
    ap.add_argument("--_worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        kind = args._worker[0]
        if kind == "cluster":
            res = worker_cluster(args._worker[1], args.repeat, args.seed, args.files, args.noise)
        elif kind == "numba":
            res = worker_numba()
        elif kind == "refine":
            res = worker_refine(args._worker[1], args.repeat, args.seed, args.files, args.noise)
        else:
            res = worker_approx(int(args._worker[1]), args.seed, args.approx_noise)
        print(json.dumps(res))
        return
    sizes = [s for s in args.sizes.split(",") if s and s != "none"]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"unknown size {s!r}; choose from {', '.join(SIZES)}")
    stages = [s for s in args.stages.split(",") if s]
    print(f"bench_cluster: {os.cpu_count()} CPUs, numpy {np.__version__}; noise {args.noise}; times in seconds "
          f"(min of {args.repeat}; ratios: each repetition's time over its own kNN), peak RSS of the whole "
          f"worker process")
    if not args.no_compile:
        _numba_report()
    common = (["--repeat", args.repeat, "--seed", args.seed, "--noise", args.noise]
              + (["--files"] if args.files else []))
    for s in sizes:
        for stage in stages:
            _print(_run_worker([stage, s] + common))
    if args.approx_n:
        _print(_run_worker(["approx", args.approx_n, "--seed", args.seed, "--approx-noise", args.approx_noise]))


if __name__ == "__main__":
    main()
