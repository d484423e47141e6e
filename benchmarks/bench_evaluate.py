"""Wall time and peak RSS of ``partreid.common.retrieval.evaluation.evaluate_features`` at Market-1501 and MSMT17 sizes.

Synthetic clustered features (deterministic, seeded): every identity has a random centre in R^D; an image is
its identity's centre plus Gaussian noise of a per-identity scale (so some identities are easy, others hard),
L2-normalised. Distractors (pid 0) are unit-normalised noise. Cameras are uniform. Sizes:

* market: 3,368 queries × 15,913 gallery (750 identities, 2,793 distractors, 6 cameras), D = 768;
* msmt:   11,659 queries × 82,161 gallery (3,060 identities, no distractors, 15 cameras), D = 768.

Each size runs in a fresh subprocess, so the printed peak RSS (``ru_maxrss``) is that size's whole-process
peak: Python + torch + the features (Q+G)×D float32 + the evaluation. The "peer" line times the peers'
approach (TransReID ``utils/metrics.py`` ``eval_func``: full Q×G float32 distance matrix, ``np.argsort`` of every row,
a dense match matrix, a loop over queries), written here from that description, at Market size only; at MSMT size
only its memory estimate is printed.

Usage::

    python benchmarks/bench_evaluate.py [--sizes market,msmt] [--dim 768] [--scale 1.6,2.6] [--no-peer]

Other processes on the machine make the timings noisy; the figures are wall-clock seconds of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SIZES = {
    # name: (num_query, num_gallery, identities, distractors, cameras)
    "market": (3368, 15913, 750, 2793, 6),
    "msmt": (11659, 82161, 3060, 0, 15),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0       # Linux: KiB


def make_features(name: str, dim: int, seed: int = 0, scale_range=(1.6, 2.6)):
    """Deterministic clustered features and labels for one size (generated in blocks to bound memory)."""
    nq, ng, nid, ndis, ncam = SIZES[name]
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((nid + 1, dim), dtype=np.float32)
    scale = rng.uniform(scale_range[0], scale_range[1], nid + 1).astype(np.float32)      # per-identity difficulty
    q_pids = rng.integers(1, nid + 1, nq)
    g_pids = np.concatenate([np.arange(1, nid + 1), rng.integers(1, nid + 1, ng - ndis - nid),
                             np.zeros(ndis, dtype=np.int64)])
    q_cams = rng.integers(0, ncam, nq)
    g_cams = rng.integers(0, ncam, ng)

    def fill(pids):
        out = np.empty((len(pids), dim), dtype=np.float32)
        for s in range(0, len(pids), 4096):
            p = pids[s:s + 4096]
            block = rng.standard_normal((len(p), dim), dtype=np.float32)
            real = p > 0
            block[real] = centers[p[real]] + block[real] * scale[p[real], None]
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            out[s:s + len(p)] = block
        return out

    return fill(q_pids), fill(g_pids), q_pids, q_cams, g_pids, g_cams


def peer_evaluate(qf, gf, q_pids, q_camids, g_pids, g_camids, max_rank=50):
    """The peers' dense approach (TransReID ``utils/metrics.py`` ``eval_func``): full distmat, argsort of all rows,
    match matrix, query loop."""
    import torch
    q, g = torch.from_numpy(qf), torch.from_numpy(gf)
    distmat = (torch.pow(q, 2).sum(1, keepdim=True) + torch.pow(g, 2).sum(1, keepdim=True).t())
    distmat.addmm_(q, g.t(), beta=1, alpha=-2)
    distmat = distmat.numpy()
    indices = np.argsort(distmat, axis=1)
    matches = (g_pids[indices] == q_pids[:, None]).astype(np.int32)
    all_cmc, all_ap, all_inp = [], [], []
    for i in range(len(q_pids)):
        order = indices[i]
        keep = ~((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i]))
        hits = matches[i][keep]
        if not hits.any():
            continue
        cmc = hits.cumsum()
        all_inp.append(cmc[np.flatnonzero(hits)[-1]] / (np.flatnonzero(hits)[-1] + 1.0))
        cmc = np.minimum(cmc, 1)
        all_cmc.append(cmc[:max_rank])
        prec = hits.cumsum() / np.arange(1.0, len(hits) + 1)
        all_ap.append((prec * hits).sum() / hits.sum())
    cmc = np.mean(all_cmc, axis=0)
    return {"mAP": float(np.mean(all_ap)), "mINP": float(np.mean(all_inp)), "rank1": float(cmc[0]),
            "rank5": float(cmc[4]), "rank10": float(cmc[9]), "rank20": float(cmc[19])}


def child(name: str, dim: int, mode: str, scale_range) -> dict:
    import torch  # noqa: F401  (import cost outside the timed region, as in a real CLI run)
    from partreid.common.retrieval.evaluation import evaluate_features

    t0 = time.perf_counter()
    data = make_features(name, dim, scale_range=scale_range)
    gen_s = time.perf_counter() - t0
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    if mode == "ours":
        res = evaluate_features(*data)
    else:
        res = peer_evaluate(*data)
    wall = time.perf_counter() - t0
    out = {k: float(res[k]) for k in ("mAP", "mINP", "rank1", "rank5", "rank10", "rank20")}
    out.update(size=name, mode=mode, wall_s=wall, peak_rss_mb=peak_rss_mb(), rss_before_mb=rss_before,
               gen_s=gen_s, torch_threads=torch.get_num_threads())
    return out


def run_child(name: str, dim: int, mode: str, scale: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", name, "--_mode", mode, "--dim", str(dim),
           "--scale", scale]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, cwd=str(REPO))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="market,msmt", help="comma-separated: market, msmt")
    ap.add_argument("--dim", type=int, default=768, help="feature width D")
    ap.add_argument("--scale", default="1.6,2.6",
                    help="LO,HI range of the per-identity noise scale (larger = harder, lower mAP, deeper "
                         "hardest positives, more work for the ranking step)")
    ap.add_argument("--peer", dest="peer", action="store_true", default=True,
                    help="also time the peers' dense approach at Market size (default)")
    ap.add_argument("--no-peer", dest="peer", action="store_false")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_mode", default="ours", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._child:
        lo, hi = (float(x) for x in args.scale.split(","))
        print(json.dumps(child(args._child, args.dim, args._mode, (lo, hi))))
        return 0

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"unknown size {s!r}; choose from {', '.join(SIZES)}")
    print(f"# evaluate_features on synthetic clustered features, D={args.dim}, noise scale {args.scale}, "
          f"{os.cpu_count()} CPU cores")
    print(f"{'size':7} {'method':6} {'Q':>6} {'G':>6} {'wall_s':>7} {'peakRSS_MB':>10} {'RSS_before_MB':>13} "
          f"{'mAP':>7} {'rank1':>7} {'mINP':>7}")
    for s in sizes:
        nq, ng = SIZES[s][:2]
        runs = [run_child(s, args.dim, "ours", args.scale)]
        if args.peer and s == "market":
            runs.append(run_child(s, args.dim, "peer", args.scale))
        for r in runs:
            print(f"{s:7} {r['mode']:6} {nq:6d} {ng:6d} {r['wall_s']:7.2f} {r['peak_rss_mb']:10.0f} "
                  f"{r['rss_before_mb']:13.0f} {r['mAP']:7.4f} {r['rank1']:7.4f} {r['mINP']:7.4f}")
        if len(runs) == 2:
            diff = max(abs(runs[0][k] - runs[1][k]) for k in ("mAP", "mINP", "rank1", "rank5", "rank10"))
            print(f"# {s}: max |ours - peer| over mAP/mINP/rank1/5/10 = {diff:.2e}; "
                  f"speed-up x{runs[1]['wall_s'] / runs[0]['wall_s']:.1f}")
        if s != "market" or not args.peer:
            gib = nq * ng * (4 + 8 + 4) / 2 ** 30
            print(f"# {s}: the peers' dense approach would hold {nq * ng * 4 / 2 ** 30:.1f} GiB distances + "
                  f"{nq * ng * 8 / 2 ** 30:.1f} GiB int64 argsort + {nq * ng * 4 / 2 ** 30:.1f} GiB int32 matches "
                  f"= {gib:.1f} GiB (not run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
