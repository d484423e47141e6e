"""Full PASS pre-training step on a GPU: images/s of the device augmentation path, of the PIL path with many
workers, and the model-only bound on synthetic tensors. Prints one row per configuration; exits 0 with a
"skipped" line when no CUDA device is present (``benchmarks/gpu_check.sh`` calls it).

    python benchmarks/bench_pretrain_gpu.py                      # vit_small, batch 128, fp16, synthetic JPEGs
    python benchmarks/bench_pretrain_gpu.py --data luperson:/data/LUPerson --pil-workers 16 --iters 30
    python benchmarks/bench_pretrain_gpu.py --allow-cpu --arch vit_tiny --depth 1 --batch-size 8 --iters 1  # smoke

Rows (each after ``--warmup`` untimed steps, wall clock, CUDA synchronised):
  model only        student+teacher step on synthetic views already on the GPU (the bound)
  augment only      DeviceMultiCrop on GPU batches of decoded uint8 images (no model)
  device path       DataLoader workers decode (torchvision/Pillow) → DeviceMultiCrop on the GPU → step
  device + nvjpeg   workers only read bytes → batched ``torchvision.io.decode_jpeg(device='cuda')`` → same
  PIL path          DataLoader workers run the PIL multi-crop (``--pil-workers``) → step
Each row also gives its ratio to the model-only bound.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root is the package `partreid`

from partreid.common.data import load_dataset  # noqa: E402
from partreid.common.data.images import ImageDataset  # noqa: E402
from partreid.pass_pretrain.augment import (DecodedImages, DeviceMultiCrop, PassMultiCropAugment,  # noqa: E402
                                            UInt8Batch, collate_uint8, device_views)
from partreid.pass_pretrain.train import MultiCropDataset, PassConfig, PassTrainer, collate_views  # noqa: E402


def make_jpegs(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` smooth random person-sized JPEGs (H 160–400, W ≈ H/2.4), LUPerson-like sizes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h = int(rng.integers(160, 401))
        w = max(32, int(h / rng.uniform(2.0, 2.8)))
        small = rng.integers(0, 256, size=(max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).save(folder / f"{i:06d}.jpg", quality=90)


class RawBytes(torch.utils.data.Dataset):
    """Workers only read the encoded bytes (for GPU decoding)."""

    def __init__(self, images: ImageDataset):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        rel = self.images.path(i)
        return self.images.ds.read_bytes(rel)


def collate_bytes(batch):
    return [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in batch]


def gpu_decode_batch(encoded, device) -> UInt8Batch:
    """Batched nvJPEG decode, then the padded HWC canvas of :class:`UInt8Batch` built on the GPU."""
    from torchvision.io import ImageReadMode, decode_jpeg

    imgs = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    hc = max(int(im.shape[1]) for im in imgs)
    wc = max(int(im.shape[2]) for im in imgs)
    canvas = torch.stack([F.pad(im.float().unsqueeze(0), (0, wc - im.shape[2], 0, hc - im.shape[1]),
                                mode="replicate")[0] for im in imgs]).to(torch.uint8)
    sizes = torch.tensor([[im.shape[1], im.shape[2]] for im in imgs])
    return UInt8Batch(canvas.permute(0, 2, 3, 1).contiguous(), sizes, sizes.clone(), torch.arange(len(imgs)))


def timed_steps(step, batches, warmup: int, iters: int, device) -> float:
    """Images/s over ``iters`` steps after ``warmup`` untimed ones; ``batches`` yields the step inputs."""
    it = iter(batches)
    for _ in range(warmup):
        step(next(it))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    n = 0
    for _ in range(iters):
        n += step(next(it))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - t)


def forever(loader):
    while True:
        for b in loader:
            if b is not None:
                yield b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="dataset spec (default: synthetic JPEGs in a temporary folder)")
    ap.add_argument("--n-images", type=int, default=4096, help="synthetic JPEGs to make when --data is not given")
    ap.add_argument("--arch", default="vit_small", choices=["vit_tiny", "vit_small", "vit_base"])
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--amp", default="fp16", choices=["fp16", "bf16", "none"])
    ap.add_argument("--out-dim", type=int, default=65536)
    ap.add_argument("--pil-workers", type=int, default=16)
    ap.add_argument("--device-workers", type=int, default=4, help="decode-only workers of the device path")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--skip", nargs="*", default=[], choices=["model", "augment", "device", "nvjpeg", "pil"])
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no GPU (smoke test)")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("bench_pretrain_gpu: skipped (no CUDA device)")
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    tmp = tempfile.TemporaryDirectory()
    os.environ.setdefault("XDG_CACHE_HOME", str(Path(tmp.name) / "cache"))
    spec = args.data
    if spec is None:
        make_jpegs(Path(tmp.name) / "jpegs", args.n_images)
        spec = f"luperson:{Path(tmp.name) / 'jpegs'}"
    ds = load_dataset(spec, verbose=False)
    images = ImageDataset(ds)
    cfg = PassConfig(arch=args.arch, depth=args.depth, batch_size=args.batch_size, out_dim=args.out_dim,
                     amp=args.amp, epochs=1, warmup_epochs=0, progress=False, device=device.type)
    trainer = PassTrainer(cfg, niter_per_epoch=10_000, device=device)
    B = args.batch_size
    print(f"bench_pretrain_gpu: {name}, {args.arch} depth {args.depth}, batch {B}, amp {args.amp}, "
          f"out_dim {args.out_dim}, {len(images)} images ({spec}), {os.cpu_count()} CPUs")
    print(f"  {'configuration':<44} {'images/s':>10}  {'vs model-only':>13}")
    results = {}

    def report(key, label, value):
        results[key] = value
        ratio = f"{value / results['model']:.2f}x" if "model" in results and key != "model" else ""
        print(f"  {label:<44} {value:>10.1f}  {ratio:>13}", flush=True)

    g = cfg.image_size
    loc = cfg.local_size
    synth = [torch.randn(B, 3, *g, device=device) for _ in range(2)] + \
            [torch.randn(B, 3, *loc, device=device) for _ in range(9)]
    it_count = [0]

    def step(views):
        trainer.step(views, 0, it_count[0])
        it_count[0] += 1
        return views[0].shape[0]

    def repeat(x):
        while True:
            yield x

    if "model" not in args.skip:
        report("model", "model only (synthetic views on the device)", timed_steps(step, repeat(synth), args.warmup,
                                                                                   args.iters, device))
    aug = DeviceMultiCrop(tuple(g), tuple(loc))
    if "augment" not in args.skip:
        batch = collate_uint8([DecodedImages(images)[i] for i in range(min(B, len(images)))])
        gpu_batch = UInt8Batch(batch.images.to(device), batch.sizes, batch.full_sizes, batch.indices)
        report("augment", "augment only: DeviceMultiCrop",
               timed_steps(lambda b: len(device_views(aug, b, device, 0)[0]), repeat(gpu_batch), args.warmup,
                           args.iters, device))
    if "device" not in args.skip:
        loader = DataLoader(DecodedImages(images), batch_size=B, shuffle=True, num_workers=args.device_workers,
                            collate_fn=collate_uint8, pin_memory=device.type == "cuda", drop_last=True,
                            persistent_workers=args.device_workers > 0)
        report("device", f"device path ({args.device_workers} decode workers)",
               timed_steps(lambda b: step(device_views(aug, b, device, it_count[0])), forever(loader), args.warmup,
                           args.iters, device))
    if "nvjpeg" not in args.skip and device.type == "cuda":
        loader = DataLoader(RawBytes(images), batch_size=B, shuffle=True, num_workers=max(1, args.device_workers // 2),
                            collate_fn=collate_bytes, drop_last=True)
        report("nvjpeg", "device path, nvJPEG batched decode on the GPU",
               timed_steps(lambda enc: step(aug(gpu_decode_batch(enc, device),
                                                torch.Generator(device=device).manual_seed(it_count[0]))),
                           forever(loader), args.warmup, args.iters, device))
    if "pil" not in args.skip:
        pil = MultiCropDataset(images, PassMultiCropAugment(tuple(g), tuple(loc)), seed=0)
        loader = DataLoader(pil, batch_size=B, shuffle=True, num_workers=args.pil_workers, collate_fn=collate_views,
                            pin_memory=device.type == "cuda", drop_last=True, persistent_workers=args.pil_workers > 0)
        report("pil", f"PIL path ({args.pil_workers} workers)",
               timed_steps(step, forever(loader), args.warmup, args.iters, device))
    tmp.cleanup()


if __name__ == "__main__":
    main()
