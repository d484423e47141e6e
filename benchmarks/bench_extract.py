"""extract-features throughput (images/s) next to the bare model forward on the same batches and device.

The overhead of loading, decoding, resizing and writing HDF5 is (bare - extract) / bare. Target: <= 15%.

    python benchmarks/bench_extract.py [--arch vit_small] [--batch-size 64] [--images 512] [--workers 2]

Images: the cuhk01 train crops in ../shared/data (or the embedded data/sample/vtest crops when absent).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_small")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from partreid.common.data import load_dataset
    from partreid.common.distributed import autocast
    from partreid.common.extract import FeatureOptions, compute_batch, extract_to_file
    from partreid.common.models.loader import load_model

    shared = REPO.parent / "shared" / "data" / "cuhk01"
    spec = f"market1501:{shared}" if shared.exists() else f"folder:{REPO / 'data' / 'sample' / 'vtest'}"
    ds = load_dataset(spec, verbose=False)
    frame = ds.frame.iloc[: args.images].reset_index(drop=True)
    torch.manual_seed(0)
    loaded = load_model(f"random:{args.arch}")
    loaded.model.to(args.device).eval()
    opts = FeatureOptions(fusion="cat" if loaded.kind == "vit" else "cls")
    n = len(frame)
    x = torch.randn(args.batch_size, 3, *loaded.image_size, device=args.device)

    with autocast(args.device):
        compute_batch(loaded, x, opts)  # warm-up
        t0 = time.perf_counter()
        done = 0
        while done < n:
            compute_batch(loaded, x, opts)
            done += args.batch_size
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    bare = done / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        extract_to_file(loaded, ds, frame, Path(tmp) / "f.h5", split="bench", opts=opts, batch_size=args.batch_size,
                        workers=args.workers, device=args.device, progress=False)
        full = n / (time.perf_counter() - t0)
    overhead = (bare - full) / bare
    print(f"device {args.device}  arch {args.arch}  batch {args.batch_size}  images {n}  workers {args.workers}  "
          f"threads {torch.get_num_threads()}")
    print(f"bare forward      {bare:8.1f} images/s")
    print(f"extract-features  {full:8.1f} images/s  (loader + decode + HDF5 overhead {100 * overhead:.1f}%; "
          f"target <= 15%)")


if __name__ == "__main__":
    main()
