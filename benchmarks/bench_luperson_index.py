"""LUPerson at scale (about 4.2M crops): the file-tree index and the LMDB key list, with synthetic entries.

    python benchmarks/bench_luperson_index.py [--n 4000000] [--lmdb-n 4000000] [--workers 1 2 4]

Nothing here reads real images: the 4M paths are synthetic LUPerson-like names (``CC_city/VVVV/IIIIIIII.jpg``),
the LMDB holds 4M tiny values (32 bytes) under LUPerson's key format ``CC_CC_VVVV_IIIIIIII``. Everything lives in a
temporary folder (``--tmp``). Figures, each beside its floor measured in the same run:

* index build: sort + fingerprint + :class:`PathTable` + cache write, against the previous cache format (gzip
  text, one path per line) and against a plain ``sorted()`` (floor); a real ``os.scandir`` walk of
  ``--scan-files`` empty files gives the listing rate, extrapolated to N.
* cached load: ``load_dataset('luperson:ROOT')`` on a tree whose 4M-path index is cached (memory map) against
  the previous format's load (gzip text → list → DataFrame), floor: reading the cache file's bytes.
* memory per worker: forked workers doing random path look-ups, private (unshared) memory each, for a Python
  list of str and for the memory-mapped table; bytes a spawn/forkserver worker receives (pickle size).
* LMDB: first load (keys.pkl → sorted table, cached) and cached load of 4M keys; random ``get`` reads/s with
  several worker processes, floor: the same loop without the LMDB read.
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing as mp
import os
import pickle
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root is the package `partreid`

from partreid.common.data import compute_fingerprint, load_dataset  # noqa: E402
from partreid.common.data.base import walk_images  # noqa: E402
from partreid.common.data.luperson import (IMAGE_EXTENSIONS, LmdbReader, PathTable, _cache_file,  # noqa: E402
                                           tree_state)


def row(name: str, value: str, note: str = "") -> None:
    print(f"  {name:<60} {value:>12}  {note}", flush=True)


def synthetic_paths(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    vids = rng.integers(0, 10000, size=n)
    out = [f"{i % 7:02d}_city{i % 13:02d}/{v:04d}/{i:08d}.jpg" for i, v in enumerate(vids.tolist())]
    random.Random(seed).shuffle(out)
    return out


def private_kb() -> int:
    """Private (unshared) resident memory of this process, kB (Private_Clean + Private_Dirty)."""
    total = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total


def _touch_worker(holder, n_reads: int, seed: int, q) -> None:
    before = private_kb()
    rng = random.Random(seed)
    n = len(holder)
    total = 0
    for _ in range(n_reads):
        total += len(holder[rng.randrange(n)])
    q.put((private_kb() - before, total))


def worker_memory(holder, workers: int, n_reads: int) -> float:
    """Mean growth of private memory (MB) of ``workers`` forked processes doing ``n_reads`` random look-ups."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_touch_worker, args=(holder, n_reads, s, q)) for s in range(workers)]
    for p in procs:
        p.start()
    res = [q.get() for _ in procs]
    for p in procs:
        p.join()
    return float(np.mean([r[0] for r in res])) / 1024


def _lmdb_worker(db: str, table: PathTable, seconds: float, seed: int, do_read: bool, q) -> None:
    reader = LmdbReader(db)
    rng = random.Random(seed)
    n = len(table)
    count = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(200):
            key = table[rng.randrange(n)]
            if do_read:
                reader.get(key)
        count += 200
    q.put(count)


def lmdb_rate(db: Path, table: PathTable, workers: int, seconds: float, do_read: bool = True) -> float:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_lmdb_worker, args=(str(db), table, seconds, s, do_read, q)) for s in range(workers)]
    for p in procs:
        p.start()
    total = sum(q.get() for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


def old_write(path: Path, header: dict, paths) -> None:
    """The previous cache format: gzip text, a JSON header line then one path per line."""
    with gzip.open(path, "wt", encoding="utf-8", newline="\n", compresslevel=1) as f:
        f.write(json.dumps(header) + "\n")
        for i in range(0, len(paths), 65536):
            f.write("\n".join(paths[i:i + 65536]) + "\n")


def old_load(path: Path) -> pd.DataFrame:
    """The previous cached load: gzip text → list of str → the dataset frame."""
    with gzip.open(path, "rt", encoding="utf-8", newline="\n") as f:
        json.loads(f.readline())
        paths = f.read().split("\n")[:-1]
    n = len(paths)
    return pd.DataFrame({"path": pd.Series(paths, dtype=str), "pid": np.full(n, -1, dtype=np.int64),
                         "camid": np.full(n, -1, dtype=np.int64), "split": pd.Series(["train"] * n, dtype=str)})


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4_000_000, help="paths in the synthetic index")
    ap.add_argument("--lmdb-n", type=int, default=4_000_000, help="entries in the synthetic LMDB (0: skip)")
    ap.add_argument("--scan-files", type=int, default=100_000, help="empty files for the real listing rate")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--seconds", type=float, default=3.0, help="per LMDB read measurement")
    ap.add_argument("--tmp", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-lup-", dir=args.tmp))
    os.environ["XDG_CACHE_HOME"] = str(tmp / "cache")
    print(f"machine: {os.cpu_count()} CPUs, shared (compare ratios); scratch {tmp}")
    try:
        n = args.n
        print(f"\nfile-tree index, {n:,} synthetic paths")
        paths, t_gen = timed(lambda: synthetic_paths(n))
        row("generate the listing (stands in for the scan)", f"{t_gen:.2f} s")
        ordered, t_sort = timed(lambda: sorted(paths))
        row("sorted() (floor of any build)", f"{t_sort:.2f} s")
        fp, t_fp = timed(lambda: compute_fingerprint(ordered, presorted=True))
        table, t_tab = timed(lambda: PathTable.from_strings(ordered))
        row("fingerprint (sha256 of the sorted paths)", f"{t_fp:.2f} s", f"{t_fp / t_sort:.2f}x sorted()")
        row("PathTable from the sorted list", f"{t_tab:.2f} s", f"{t_tab / t_sort:.2f}x sorted()")
        # a real root whose index we plant in the cache (its mtimes are the cache key)
        root = tmp / "LUPerson"
        (root / "00_city00").mkdir(parents=True)
        identity = {"root": str(root), "state": tree_state(root), "extensions": list(IMAGE_EXTENSIONS)}
        cache = _cache_file("file-index", root)
        _, t_save = timed(lambda: table.save(cache, dict(identity, fingerprint=fp)))
        old_cache = tmp / "old-index.txt.gz"
        _, t_old_save = timed(lambda: old_write(old_cache, {"format": "old"}, ordered))
        row("write the cache: PathTable file (new)", f"{t_save:.2f} s",
            f"{cache.stat().st_size / 2**20:.0f} MB")
        row("write the cache: gzip text (previous format)", f"{t_old_save:.2f} s",
            f"{old_cache.stat().st_size / 2**20:.0f} MB, {t_old_save / t_save:.1f}x new")
        scan_root = tmp / "scan"
        per_dir = 1000
        for d in range(0, args.scan_files, per_dir):
            sub = scan_root / f"{d // per_dir:04d}"
            sub.mkdir(parents=True)
            for i in range(min(per_dir, args.scan_files - d)):
                (sub / f"{i:08d}.jpg").touch()
        listed, t_scan = timed(lambda: walk_images(scan_root))
        row(f"real os.scandir walk of {len(listed):,} files", f"{t_scan:.2f} s",
            f"{len(listed) / t_scan:,.0f} files/s -> {n / (len(listed) / t_scan):.0f} s for {n:,}")
        shutil.rmtree(scan_root)

        print("\ncached load (start-up), page cache warm")
        _, t_read = timed(lambda: cache.read_bytes())
        row("read the cache file's bytes (floor)", f"{t_read:.3f} s")
        ds, t_new = timed(lambda: load_dataset(f"luperson:{root}", verbose=False))
        assert len(ds) == n and ds.fingerprint == fp
        row("load_dataset('luperson:ROOT'), cached (new: memory map)", f"{t_new:.3f} s", f"{t_new / t_read:.1f}x floor")
        old_frame, t_old = timed(lambda: old_load(old_cache))
        row("previous cached load: gzip text -> list -> DataFrame", f"{t_old:.2f} s",
            f"{t_old / t_read:.0f}x floor, {t_old / t_new:.0f}x new")
        _, t_frame = timed(lambda: ds.frame)
        row("building ds.frame on demand (4M-row DataFrame; not done at start-up)", f"{t_frame:.2f} s")

        print("\nmemory per DataLoader-style worker (fork; 200,000 random look-ups each)")
        as_list = list(ordered)
        del ordered, paths
        row("Python list of str: private MB per worker", f"{worker_memory(as_list, 2, 200_000):.1f} MB")
        row("old frame 'path' column (object array): private MB", f"{worker_memory(old_frame['path'].to_numpy(), 2, 200_000):.1f} MB")
        row("PathTable (memory map): private MB per worker", f"{worker_memory(ds.paths, 2, 200_000):.1f} MB")
        row("pickle sent to a spawn/forkserver worker: list of str", f"{len(pickle.dumps(as_list)) / 2**20:.0f} MB")
        old_ds_bytes = len(pickle.dumps(old_frame)) + len(pickle.dumps(np.array([p.encode() for p in as_list[:200_000]],
                                                                                 dtype=np.bytes_))) * n / 200_000
        row("pickle: previous ImageDataset (frame + fixed-width bytes array)", f"{old_ds_bytes / 2**20:.0f} MB")
        row("pickle: PathTable (memory map) / LupersonDataset without frame",
            f"{len(pickle.dumps(ds.paths))} B", f"/ {len(pickle.dumps(load_dataset(f'luperson:{root}', verbose=False)))} B")
        del as_list, old_frame, ds

        if args.lmdb_n:
            import lmdb

            m = args.lmdb_n
            print(f"\nLMDB, {m:,} entries of 32 bytes")
            lroot = tmp / "lup"
            (lroot / "lup_lmdb").mkdir(parents=True)
            keys = [f"{i % 7:02d}_{i % 13:02d}_{(i // 1000) % 10000:04d}_{i:08d}" for i in range(m)]
            t = time.perf_counter()
            env = lmdb.open(str(lroot / "lup_lmdb"), map_size=(m * 160) + (1 << 26), writemap=True)
            value = bytes(range(32))
            for start in range(0, m, 500_000):
                with env.begin(write=True) as txn:
                    for k in keys[start:start + 500_000]:
                        txn.put(k.encode(), value)
            env.sync()
            env.close()
            random.Random(1).shuffle(keys)
            with open(lroot / "keys.pkl", "wb") as f:
                pickle.dump(keys, f)
            row("write the synthetic LMDB + keys.pkl", f"{time.perf_counter() - t:.1f} s",
                f"{sum(p.stat().st_size for p in lroot.rglob('*') if p.is_file()) / 2**20:.0f} MB")
            del keys
            _, t_pkl = timed(lambda: pickle.load(open(lroot / "keys.pkl", "rb")))
            row("pickle.load(keys.pkl) (floor of a first load)", f"{t_pkl:.2f} s")
            lds, t_first = timed(lambda: load_dataset(f"luperson:{lroot}", verbose=False))
            row("first load_dataset (keys.pkl -> sorted table, cached)", f"{t_first:.2f} s", f"{t_first / t_pkl:.1f}x floor")
            lds, t_cached = timed(lambda: load_dataset(f"luperson:{lroot}", verbose=False))
            row("cached load_dataset", f"{t_cached:.3f} s", f"{t_cached / t_pkl:.2f}x pickle.load alone")
            for w in args.workers:
                floor = lmdb_rate(lds.lmdb_path, lds.paths, w, args.seconds / 2, do_read=False)
                r = lmdb_rate(lds.lmdb_path, lds.paths, w, args.seconds)
                row(f"random LMDB reads, {w} worker(s)", f"{r:,.0f}/s", f"key look-up alone {floor:,.0f}/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
