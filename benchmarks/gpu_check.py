"""One-command GPU check: the training and search paths on the device, as one table (run by gpu_check.sh).

Rows (each check is a function in :data:`CHECKS`; one that fails prints its error in its row and the others
still run):

- ``pass_step``: one PASS pre-training step (teacher on 2 global views, student forward/backward on all 11
  views, AdamW, EMA) at vit_small, batch 128, in fp16 (with a GradScaler, the published setting) and bf16:
  images/s and MFU. FLOPs per image are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one real
  step at batch 2 (matmuls, convolutions and attention; element-wise work is not counted), so MFU is a lower
  bound. The peak is the dense fp16/bf16 tensor-core figure of the device (table below, or --peak-tflops).
- ``extract``: feature extraction (eval forward of a vit_small PartViT at 256×128, batch 256): images/s in
  float32 (the default of extract-features) and fp16.
- ``faiss_knn``: exact k = 31 self-search at Market size (12,936 × 768, float32, inner product) through
  ``knn_search`` on the GPU (needs the faiss GPU build: ``pip install .[gpu]`` after removing faiss-cpu), and
  on the CPU as the floor.
- ``finetune``: one short ``finetune`` epoch (synthetic Market-style identities written by this script, since
  the device receives only the repository) with AMP off (float32, the default) and on (--amp auto): seconds and
  mAP of each.

Extra rows: append a function ``check_x(args) -> list of Row`` to :data:`CHECKS` (see ``EXTRA ROWS`` below).

    python benchmarks/gpu_check.py               # on a GPU machine; prints "skipped: no GPU" elsewhere
    python benchmarks/gpu_check.py --device cpu --tiny   # tiny sizes on the CPU: exercises every code path
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List

import numpy as np



def _importable_package() -> None:
    """Make ``import partreid`` work from a bare checkout (the repository root IS the package): when it is not
    installed, link the root as ``partreid`` in a temporary folder put on sys.path."""
    try:
        import partreid  # noqa: F401
    except ImportError:
        shim = Path(tempfile.mkdtemp(prefix="partreid_shim_"))
        (shim / "partreid").symlink_to(Path(__file__).resolve().parents[1], target_is_directory=True)
        sys.path.insert(0, str(shim))


_importable_package()

#: dense fp16/bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name() (first match wins)
PEAK_TFLOPS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("GH200", 989.4), ("A100", 312.0),
               ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 125.0), ("A10", 125.0),
               ("RTX 4090", 165.2), ("RTX 3090", 71.0), ("V100", 125.0), ("T4", 65.0)]


@dataclass
class Row:
    check: str
    setting: str
    value: str
    unit: str
    note: str = ""


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _peak(args) -> float:
    if args.peak_tflops:
        return float(args.peak_tflops)
    if not args.device.startswith("cuda"):
        return 0.0
    import torch

    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops
    return 0.0


# ------------------------------------------------------------------------------------------------------ checks
def check_pass_step(args) -> List[Row]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from partreid.pass_pretrain.train import PassConfig, PassTrainer

    tiny = args.tiny
    batch = 4 if tiny else 128
    kw = dict(arch="vit_tiny", depth=1, out_dim=256, hidden_dim=64, bottleneck_dim=32, image_size=(64, 32),
              local_size=(32, 16)) if tiny else dict(arch="vit_small")
    peak = _peak(args)
    rows = []
    for amp in ("fp16", "bf16"):
        cfg = PassConfig(batch_size=batch, epochs=1, warmup_epochs=0, amp=amp, num_workers=0, progress=False, **kw)
        torch.manual_seed(0)
        trainer = PassTrainer(cfg, niter_per_epoch=1000, device=args.device)
        precision = "float32 (no fp16 on this device)" if trainer.amp_dtype is None else \
            str(trainer.amp_dtype).replace("torch.", "") + (" + GradScaler" if trainer.scaler else "")

        def views(b):
            g = torch.randn(b, 3, *cfg.image_size, device=args.device)
            loc = torch.randn(b, 3, *cfg.local_size, device=args.device)
            return [g, g.flip(3)] + [loc] * (3 * cfg.local_crops_per_band)

        with FlopCounterMode(display=False) as counter:
            trainer.step(views(2), 0, 0)
        flops_per_image = counter.get_total_flops() / 2
        v = views(batch)
        for i in range(2 if tiny else 3):
            trainer.step(v, 1, i)
        _sync(args.device)
        steps = 2 if tiny else 10
        t0 = time.perf_counter()
        for i in range(steps):
            trainer.step(v, 1, i)
        _sync(args.device)
        ips = batch * steps / (time.perf_counter() - t0)
        mfu = f"{100 * flops_per_image * ips / (peak * 1e12):.1f}%" if peak else "n/a (unknown peak)"
        rows.append(Row("pass_step", f"{cfg.arch} b{batch} {amp}", f"{ips:.1f}", "img/s",
                        f"{precision}; MFU {mfu}; {flops_per_image / 1e9:.1f} GFLOP/img counted"))
        del trainer
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def check_extract(args) -> List[Row]:
    import torch

    from partreid.common.distributed import autocast, resolve_amp
    from partreid.common.models.vit import PartViT

    tiny = args.tiny
    batch = 8 if tiny else 256
    model = PartViT("vit_tiny", depth=1, image_size=(64, 32)) if tiny else PartViT("vit_small", image_size=(256, 128))
    model = model.to(args.device).eval()
    x = torch.randn(batch, 3, *model.image_size, device=args.device)
    rows = []
    for amp in ("none", "fp16"):
        with torch.no_grad(), autocast(args.device, amp):
            model(x)
            _sync(args.device)
            reps = 2 if tiny else 10
            t0 = time.perf_counter()
            for _ in range(reps):
                g, p = model(x)
                g.float().cpu()
            _sync(args.device)
        ips = batch * reps / (time.perf_counter() - t0)
        dtype = resolve_amp(amp, args.device)[0]
        precision = "float32" if dtype is None else str(dtype).replace("torch.", "")
        rows.append(Row("extract", f"{'vit_tiny' if tiny else 'vit_small'} b{batch} --amp {amp}", f"{ips:.1f}",
                        "img/s", precision + (" (extract-features' default)" if amp == "none" else "")))
    return rows


def check_faiss(args) -> List[Row]:
    from partreid.common.retrieval.search import faiss_gpu_available, knn_search

    n, d, k = (2000, 64, 31) if args.tiny else (12936, 768, 31)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t0 = time.perf_counter()
    _, idx_cpu = knn_search(x, k, device="cpu")
    cpu_s = time.perf_counter() - t0
    rows = [Row("faiss_knn", f"cpu exact {n}x{d} k{k}", f"{cpu_s:.3f}", "s", "floor for the GPU row")]
    if not (args.device.startswith("cuda") and faiss_gpu_available()):
        rows.append(Row("faiss_knn", f"gpu exact {n}x{d} k{k}", "skipped", "",
                        "faiss has no GPU here (pip uninstall faiss-cpu && pip install -e .[gpu])"))
        return rows
    knn_search(x[:100], 5, device="cuda")  # warm-up (GPU resources)
    t0 = time.perf_counter()
    _, idx_gpu = knn_search(x, k, device="cuda")
    gpu_s = time.perf_counter() - t0
    agree = float((idx_gpu[:, 1:] == idx_cpu[:, 1:]).mean())
    rows.append(Row("faiss_knn", f"gpu exact {n}x{d} k{k}", f"{gpu_s:.3f}", "s",
                    f"{cpu_s / gpu_s:.1f}x the CPU; {100 * agree:.2f}% same neighbours"))
    return rows


def make_synthetic_market(root: Path, ids: int, per_id: int, size=(128, 64), seed: int = 0) -> Path:
    """Market-style folders of synthetic people: each id three colour bands from a 5-colour palette (ids can share
    bands), per-image brightness and strong noise, 6 cameras in train, 2 in query/gallery."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, size=(5, 3)).astype(np.float32)
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        (root / split).mkdir(parents=True, exist_ok=True)
    h, w = size
    for pid in range(1, ids + 1):
        colours = palette[rng.integers(0, len(palette), size=3)]
        for k in range(per_id + 2):
            img = np.empty((h, w, 3), np.float32)
            for b in range(3):
                img[b * h // 3:(b + 1) * h // 3] = colours[b]
            img = img * rng.uniform(0.6, 1.3) + rng.normal(0, 60, img.shape)
            split = "bounding_box_train" if k < per_id else ("query" if k == per_id else "bounding_box_test")
            cam = 1 + (k + pid) % 6 if split == "bounding_box_train" else 1 + (k - per_id) % 2
            name = f"{pid:04d}_c{cam}s1_{k:06d}_00.jpg"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / split / name, quality=90)
    return root


def check_finetune(args) -> List[Row]:
    import json

    import torch

    from partreid.common.models.vit import PartViT, save_backbone
    from partreid.pplr_finetune.config import FinetuneConfig
    from partreid.pplr_finetune.train import finetune

    tiny = args.tiny
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        tmp = Path(tmp)
        data = make_synthetic_market(tmp / "data", ids=8 if tiny else 96, per_id=4 if tiny else 8,
                                     size=(64, 32) if tiny else (128, 64))
        torch.manual_seed(0)
        arch = PartViT("vit_tiny", depth=1, image_size=(64, 32)) if tiny else \
            PartViT("vit_small", image_size=(256, 128))
        ckpt = save_backbone(arch, tmp / "backbone.pth")
        for amp in ("none", "auto"):
            cfg = FinetuneConfig.from_preset(
                "pplr", checkpoint=str(ckpt), data=f"market1501:{data}", epochs=1, iters=2 if tiny else 50,
                batch_size=16 if tiny else 64, k1=6 if tiny else 20, k2=2 if tiny else 6,
                eps=0.6, min_samples=2, k=4 if tiny else 20, eval_every=1, workers=0 if tiny else 4,
                device=args.device, amp=amp, progress=False, seed=1)
            t0 = time.perf_counter()
            finetune(cfg, tmp / f"run_{amp}")
            seconds = time.perf_counter() - t0
            summary = json.loads((tmp / f"run_{amp}" / "summary.json").read_text())
            last = summary.get("last") or {}
            rows.append(Row("finetune", f"1 epoch amp {amp}{' (fp32)' if amp == 'none' else ''}",
                            f"{seconds:.1f}", "s",
                            f"mAP {100 * last.get('mAP', float('nan')):.2f}%, rank-1 "
                            f"{100 * last.get('rank1', float('nan')):.2f}% (synthetic ids, random vit init)"))
    return rows


# ================================================================================================ EXTRA ROWS
# Other checks add one function here (signature: (args) -> List[Row]), e.g. the PASS loader benchmark.
CHECKS: List[Callable] = [check_pass_step, check_extract, check_faiss, check_finetune]


# -------------------------------------------------------------------------------------------------------- main
def print_table(rows: List[Row], header: str) -> None:
    cols = ["check", "setting", "value", "unit", "note"]
    table = [cols] + [[r.check, r.setting, r.value, r.unit, r.note] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    print(header)
    for i, r in enumerate(table):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    sys.stdout.flush()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto (CUDA, else skip), cuda, or cpu (with --tiny: a dry run)")
    ap.add_argument("--tiny", action="store_true", help="tiny models and sizes (a code-path check, not a benchmark)")
    ap.add_argument("--only", default=None, help="comma-separated check names (e.g. pass_step,faiss)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: from the table)")
    args = ap.parse_args(argv)

    import torch

    if args.device == "auto":
        if not torch.cuda.is_available():
            print("skipped: no GPU (torch.cuda.is_available() is False); "
                  "run with --device cpu --tiny for a dry run of the code paths")
            return 0
        args.device = "cuda"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("skipped: no GPU")
        return 0
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    header = (f"gpu_check: {name}, torch {torch.__version__}, peak {_peak(args) or 'unknown'} TFLOP/s"
              f"{' (TINY dry run: figures are not benchmarks)' if args.tiny else ''}")
    wanted = set(args.only.split(",")) if args.only else None
    rows: List[Row] = []
    failed = 0
    for check in CHECKS:
        short = check.__name__.replace("check_", "")
        if wanted and short not in wanted:
            continue
        t0 = time.perf_counter()
        try:
            rows += check(args)
        except Exception as exc:  # noqa: BLE001 - one failing row must not hide the others
            failed += 1
            traceback.print_exc(file=sys.stderr)
            rows.append(Row(short, "-", "error", "", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
        print(f"[{short}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
    print_table(rows, header)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
