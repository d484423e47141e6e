#!/usr/bin/env python3
"""How good is a threshold calibrated without labels? Estimated vs real false-match rate on a labelled dataset.

    tools/calibration_check.py --checkpoint demo_out/finetune/last.pth --data market1501:../shared/data/cuhk01 \
        --out /tmp/calcheck [--k1 15 --eps 0.5 --min-samples 4] [--fmr 1e-2 1e-3]

1. Extract the train split (its pids are NOT used), cluster it, refine the labels (the unsupervised chain).
2. ``calibrate`` the refined labels at each target FMR.
3. Measure the real FMR and TPR of each threshold with ``evaluate --threshold-file``:
   (a) on the same train images with their true pids (every image as a query against all the others,
       ``--split-query`` style: one query per id, the rest gallery), and
   (b) on the dataset's query/gallery splits (other identities), when it has them.

Prints one table on stdout; the features, labels and thresholds stay in --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True, help="labelled dataset spec with a train split")
    ap.add_argument("--out", required=True)
    ap.add_argument("--fmr", type=float, nargs="+", default=[1e-2, 1e-3])
    ap.add_argument("--k1", type=int, default=15)
    ap.add_argument("--k2", type=int, default=6)
    ap.add_argument("--eps", type=float, default=0.5)
    ap.add_argument("--min-samples", type=int, default=4)
    ap.add_argument("--k", type=int, default=20, help="refine-labels neighbours")
    ap.add_argument("--split-query", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)

    from partreid.common.calibration import calibrate_threshold, write_threshold
    from partreid.common.data import load_dataset
    from partreid.cli._stages import evaluate_files, extract_features
    from partreid.pplr_finetune.cross_agreement import refine_labels_file
    from partreid.pplr_finetune.pseudo_labels import cluster_features_file

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    splits = set(load_dataset(args.data, verbose=False).frame["split"])
    train = extract_features(args.checkpoint, args.data, out / "train.h5", split="train", workers=args.workers,
                             device="cpu", verbose=False)
    _, report = cluster_features_file(train, out / "labels.h5", k1=args.k1, k2=args.k2, eps=args.eps,
                                      min_samples=args.min_samples, device="cpu")
    print(report, file=sys.stderr)
    refine_labels_file(out / "labels.h5", out / "refined.h5", k=args.k, device="cpu")
    test = None
    if {"query", "gallery"} <= splits:
        test = {s: extract_features(args.checkpoint, args.data, out / f"{s}.h5", split=s, workers=args.workers,
                                    device="cpu", parts=False, verbose=False) for s in ("query", "gallery")}
    rows = []
    for fmr in args.fmr:
        rec = calibrate_threshold(out / "refined.h5", fmr=fmr)
        thr = write_threshold(out / f"threshold_{fmr:g}.json", rec)
        a = evaluate_files(train, None, split_query=args.split_query, threshold_file=thr)["verification"]
        row = [f"{fmr:g}", f"{rec['threshold']:.4f}", f"{rec['estimated_fmr']:.5f}", f"{a['fmr@threshold']:.5f}",
               f"{rec['estimated_tpr']:.3f}", f"{a['tpr@threshold']:.3f}", f"{a['threshold@fmr=' + f'{fmr:g}']:.4f}"]
        if test:
            b = evaluate_files(test["query"], test["gallery"], threshold_file=thr)["verification"]
            row += [f"{b['fmr@threshold']:.5f}", f"{b['tpr@threshold']:.3f}", f"{b['threshold@fmr=' + f'{fmr:g}']:.4f}"]
        rows.append((row, rec))
    head = ["target", "threshold", "est FMR", "real FMR train", "est TPR", "real TPR train", "oracle thr train"]
    if test:
        head += ["real FMR test", "real TPR test", "oracle thr test"]
    rec = rows[0][1]
    print(f"{args.data}: {rec['clusters_used']}/{rec['clusters_total']} clusters used (agreement >= "
          f"{rec['min_agreement']:.3f}), {rec['images_used']}/{rec['images_total']} images, "
          f"{rec['num_genuine_pairs']} genuine / {rec['num_impostor_pairs']} impostor pseudo-pairs")
    print(" | ".join(head))
    for row, _ in rows:
        print(" | ".join(row))
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
