"""Benchmark one PASS pre-training step (teacher forward on 2 global views + student forward/backward on all
11 views + AdamW + EMA) on the current device, on synthetic view batches (no data loading).

Prints images/s (input images per second; each image is 2×256×128 + 9×128×64 views) and the achieved TFLOP/s.
FLOPs are counted analytically (:func:`step_flops`; 2 FLOPs per multiply-add; linear layers, attention
products, patch embedding and heads; the student's backward counted as 2× its forward; element-wise work,
LayerNorm, softmax and the optimiser are left out). Warm-up iterations are excluded. Also prints the single-process
throughput of the multi-crop augmentation (the CPU data pipeline), on a real CUHK01 crop when
``../shared/data`` is present.

    python benchmarks/bench_pretrain_step.py --arch vit_small --batch-size 128 --amp bf16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from partreid.pass_pretrain.augment import PassMultiCropAugment  # noqa: E402
from partreid.pass_pretrain.train import PassConfig, PassTrainer  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def vit_forward_flops(n: int, n_special: int, grid: tuple, dim: int, depth: int, patch: int = 16) -> float:
    """Forward FLOPs of ``n`` images through a ViT: per block 24·D²·T (qkv, projection, 4× MLP) + 4·T²·D
    (QKᵀ and attention × V) for T = special tokens + patches, plus the 16×16 patch-embedding convolution."""
    patches = grid[0] * grid[1]
    tokens = n_special + patches
    per_block = 24.0 * dim * dim * tokens + 4.0 * tokens * tokens * dim
    return n * (depth * per_block + 2.0 * patches * 3 * patch * patch * dim)


def head_flops(rows: int, dim: int, hidden: int, bottleneck: int, out_dim: int) -> float:
    """Forward FLOPs of a DINO head (MLP D→hidden→hidden→bottleneck, last layer bottleneck→out_dim)."""
    return 2.0 * rows * (dim * hidden + hidden * hidden + hidden * bottleneck + bottleneck * out_dim)


def step_flops(cfg: PassConfig, dim: int, batch: int) -> float:
    """FLOPs of one PASS step: teacher forward (2 global views) + student forward and backward (3× forward)."""
    g = (cfg.image_size[0] // 16, cfg.image_size[1] // 16)
    loc = (cfg.local_size[0] // 16, cfg.local_size[1] // 16)
    n_local = 3 * cfg.local_crops_per_band
    teacher = vit_forward_flops(2 * batch, 4, g, dim, cfg.depth)
    student = teacher + vit_forward_flops(n_local * batch, 2, loc, dim, cfg.depth)
    h = lambda rows: head_flops(rows, dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.out_dim)  # noqa: E731
    teacher += h(2 * batch) + 3 * h(2 * batch)
    student += h((2 + n_local) * batch) + 3 * h((2 + cfg.local_crops_per_band) * batch)
    return teacher + 3.0 * student


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="vit_tiny", choices=["vit_tiny", "vit_small", "vit_base"])
    ap.add_argument("--batch-size", type=int, default=4, help="images per step")
    ap.add_argument("--amp", default="none", choices=["bf16", "fp16", "none"])
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--out-dim", type=int, default=65536)
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations")
    ap.add_argument("--iters", type=int, default=5, help="timed iterations")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--aug-images", type=int, default=20, help="images for the augmentation timing (0: skip)")
    args = ap.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cfg = PassConfig(arch=args.arch, depth=args.depth, out_dim=args.out_dim, batch_size=args.batch_size,
                     amp=args.amp, epochs=1, warmup_epochs=0, num_workers=0)
    torch.manual_seed(0)
    trainer = PassTrainer(cfg, niter_per_epoch=args.warmup + args.iters + 1, device=device)
    b = args.batch_size
    gen = torch.Generator().manual_seed(0)
    views = [torch.randn(b, 3, *cfg.image_size, generator=gen) for _ in range(2)] + \
            [torch.randn(b, 3, *cfg.local_size, generator=gen) for _ in range(9)]
    views = [v.to(device) for v in views]

    flops = step_flops(cfg, trainer.student.backbone.embed_dim, b)
    trainer.step(views, epoch=1, iteration=0)
    for i in range(args.warmup):
        trainer.step(views, epoch=1, iteration=1 + i)
    _sync(device)
    start = time.perf_counter()
    for i in range(args.iters):
        trainer.step(views, epoch=1, iteration=1 + args.warmup + i)
    _sync(device)
    seconds = (time.perf_counter() - start) / args.iters

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}")
    print(f"arch {args.arch} depth {args.depth} out_dim {args.out_dim} batch {b} amp {args.amp}: "
          f"{seconds * 1000:.1f} ms/step, {b / seconds:.1f} images/s, "
          f"{flops / 1e9:.1f} GFLOP/step, {flops / seconds / 1e12:.3f} TFLOP/s achieved")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB")

    if args.aug_images > 0:
        from PIL import Image

        data = Path(__file__).resolve().parents[2] / "shared" / "data" / "cuhk01" / "bounding_box_train"
        files = sorted(data.glob("*.jpg"))[:1] if data.is_dir() else []
        img = Image.open(files[0]).convert("RGB") if files else \
            Image.fromarray((np.random.default_rng(0).random((160, 60, 3)) * 255).astype("uint8"))
        aug = PassMultiCropAugment()
        aug(img)
        t0 = time.perf_counter()
        for _ in range(args.aug_images):
            aug(img)
        dt = (time.perf_counter() - t0) / args.aug_images
        print(f"multi-crop augmentation ({'real' if files else 'synthetic'} {img.width}x{img.height} crop, "
              f"11 views): {1 / dt:.1f} images/s per worker process")


if __name__ == "__main__":
    main()
