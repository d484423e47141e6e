"""PASS data pipeline on the CPU: worker decode cost, batched augmentation throughput, and a whole pre-training
step with a tiny model, ``--augment-on device`` against ``--augment-on cpu``. Prints one table.

    python benchmarks/bench_augment.py [--images DIR] [--batch 32] [--steps 4]

Images: ``../shared/data/cuhk03-labeled-val`` (real JPEG person crops, about 60–120 × 250–370, the size range of
LUPerson crops) when present, else the embedded ``data/sample/vtest`` crops (117 × 59). Every figure is printed
beside a floor measured in the same run (the machine may be shared: compare ratios, not absolute times).

Sections:
  1. CPU time per image in one worker process (``time.process_time``, torch on 1 thread): reading the file
     (floor); decode only with Pillow (+ ``draft`` JPEG DCT scaling to a bounded height), the device path's
     worker; decode with ``torchvision.io.decode_jpeg``; the full PIL path of today (decode + 11-view multi-crop).
  2. Augmentation alone, images per CPU-second on one thread: PIL multi-crop on decoded images vs :class:`DeviceMultiCrop` on
     batches of decoded uint8 arrays on the CPU (its compiled kernels, ``pass_pretrain/augment_cpu.py``), and the
     same batched torch operations a GPU runs, executed on the CPU.
  3. A whole step, vit_tiny depth 1, in-process on one thread, data loading in the main process (images per
     CPU-second): PIL path, device path, and the model-only bound on synthetic views.
  4. The same as whole ``pass-pretrain`` processes (start-up included), against ``python -c 'import torch'``.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO.parent))  # the repository root is the package `partreid`

from partreid.common.compiled import numba  # noqa: E402
from partreid.common.data import load_dataset  # noqa: E402
from partreid.common.data.decode import decode_bounded, open_image_file  # noqa: E402
from partreid.common.data.images import ImageDataset  # noqa: E402
from partreid.pass_pretrain.augment import (DEFAULT_MAX_HEIGHT, BoundedDecoder, DecodedImages, DeviceMultiCrop,  # noqa: E402
                                            PassMultiCropAugment, band_boxes, collate_uint8, device_views)
from partreid.pass_pretrain.train import (MultiCropDataset, PassConfig, PassTrainer, collate_views,  # noqa: E402
                                          item_seed)


def default_images() -> Path:
    shared = REPO.parent / "shared" / "data" / "cuhk03-labeled-val"
    return shared if shared.is_dir() else REPO / "data" / "sample" / "vtest"


def cpu_per_image(fn, items, repeat: int = 1) -> float:
    """Mean CPU seconds (this process) of ``fn(item)`` over ``items``."""
    fn(items[0])
    t = time.process_time()
    for _ in range(repeat):
        for it in items:
            fn(it)
    return (time.process_time() - t) / (repeat * len(items))


def rate(fn, n_images: int, repeat: int, warm: bool = True) -> float:
    """Images per CPU-second of this process for ``fn()`` processing ``n_images``, best of ``repeat``. CPU time,
    not wall time: on a shared machine it does not count the time other processes hold the cores."""
    if warm:
        fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return n_images / best


def row(name: str, value: str, note: str = "") -> None:
    print(f"  {name:<58} {value:>14}  {note}")


def kornia_multicrop_rate(batch, aug: DeviceMultiCrop) -> "float | None":
    """Images per CPU-second of ``kornia.augmentation`` running ``aug``'s 11-view recipe (sizes, scales,
    :data:`RECIPE` probabilities and ranges, :func:`band_boxes`) on the padded batch, or None without kornia.
    Timing only: kornia draws its boxes relative to the tensor, so on a batch padded from images of different sizes
    its crops are not PASS's (one reason the device path does not use it)."""
    try:
        import kornia.augmentation as K
    except ImportError:
        return None
    r = aug.recipe
    x = batch.images.permute(0, 3, 1, 2).float() / 255
    blur_size = 2 * int(np.ceil(3 * r.blur_radius[1])) + 1  # the radius of our blur taps at the largest sigma

    def pipe(size, scale, blur_p, sol_p):
        return K.AugmentationSequential(
            K.RandomResizedCrop(size, scale=scale, ratio=r.ratio), K.RandomHorizontalFlip(p=r.flip_p),
            K.ColorJitter(*r.jitter, p=r.jitter_p), K.RandomGrayscale(p=r.gray_p),
            K.RandomGaussianBlur((blur_size, blur_size), r.blur_radius, p=blur_p),
            K.RandomSolarize(0.0, 0.0, p=sol_p), K.Normalize(torch.tensor(aug.mean), torch.tensor(aug.std)))

    g1 = pipe(aug.global_size, aug.global_scale, r.blur_p[0], 0.0)
    g2 = pipe(aug.global_size, aug.global_scale, r.blur_p[1], r.solarize_p)
    local = pipe(aug.local_size, aug.local_scale, r.blur_p[2], 0.0)
    bands = band_boxes(x.shape[2], x.shape[3], aug.layout.n_bands, aug.band_frac)

    def views():
        out = [g1(x), g2(x)]
        for _, top, _, bottom in bands:
            out += [local(x[:, :, top:bottom]) for _ in range(aug.layout.local_per_band)]
        return out

    return rate(views, len(batch), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=default_images(), help="folder of JPEG person crops")
    ap.add_argument("--n", type=int, default=128, help="images used in sections 1 and 2")
    ap.add_argument("--batch", type=int, default=32, help="batch size of sections 2-4")
    ap.add_argument("--steps", type=int, default=4, help="timed steps in sections 3 and 4")
    ap.add_argument("--no-process", action="store_true", help="skip section 4")
    args = ap.parse_args()
    torch.set_num_threads(1)
    numba.set_num_threads(1)  # the compiled CPU kernels of DeviceMultiCrop: one core, like the rest
    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:args.n]
    if not files:
        sys.exit(f"error: no JPEG files under {args.images}")
    sizes = np.array([Image.open(f).size for f in files])
    print(f"machine: {os.cpu_count()} CPUs (shared: compare ratios); torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}")
    print(f"images: {len(files)} JPEGs from {args.images}, W {sizes[:, 0].min()}-{sizes[:, 0].max()}, "
          f"H {sizes[:, 1].min()}-{sizes[:, 1].max()}")

    print("\n1. CPU time per image in one worker (ms; target: decode-only <= 2 ms, today's PIL path ~13 ms)")
    read = cpu_per_image(lambda f: f.read_bytes(), files, 3)
    pil_dec = cpu_per_image(lambda f: open_image_file(f), files, 2)
    bounded_pil = cpu_per_image(lambda f: decode_bounded(f, str(f), DEFAULT_MAX_HEIGHT), files, 2)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_CACHE_HOME"] = tmp
        ds = load_dataset(f"luperson:{args.images}", verbose=False)
        rels = [ds.path_at(i) for i in range(min(len(ds), args.n))]
        decoder = BoundedDecoder(DEFAULT_MAX_HEIGHT)
        bounded = cpu_per_image(lambda r: decoder(ds, r), rels, 2)
    tv = cpu_per_image(lambda f: torchvision.io.decode_jpeg(torchvision.io.read_file(str(f))), files, 2)
    pil_aug = PassMultiCropAugment()
    full = cpu_per_image(lambda f: pil_aug(open_image_file(f)), files[:48])
    row("read the file (floor)", f"{read * 1e3:.3f} ms")
    row("decode only: BoundedDecoder (the device path's worker)", f"{bounded * 1e3:.3f} ms",
        f"{bounded / read:.1f}x floor")
    row("decode only: Pillow + draft, bounded height", f"{bounded_pil * 1e3:.3f} ms", f"{bounded_pil / read:.1f}x floor")
    row("decode only: Pillow, full RGB image", f"{pil_dec * 1e3:.3f} ms", f"{pil_dec / read:.1f}x floor")
    row("decode only: torchvision.io.decode_jpeg (CPU)", f"{tv * 1e3:.3f} ms", f"{tv / read:.1f}x floor")
    row("today's PIL path: decode + 11-view multi-crop", f"{full * 1e3:.3f} ms",
        f"{full / bounded:.1f}x the device path's worker")
    big = []  # the same crops as 3x larger JPEGs: where JPEG DCT scaling (draft) pays
    for f in files[:32]:
        im = open_image_file(f)
        buf = io.BytesIO()
        im.resize((im.width * 3, im.height * 3), Image.Resampling.BILINEAR).save(buf, format="JPEG", quality=90)
        big.append(buf.getvalue())
    big_full = cpu_per_image(lambda b: decode_bounded(io.BytesIO(b), "big", 0), big)
    big_draft = cpu_per_image(lambda b: decode_bounded(io.BytesIO(b), "big", DEFAULT_MAX_HEIGHT), big)
    big_tv = cpu_per_image(lambda b: torchvision.io.decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8)), big)
    row("3x larger JPEGs (750-1100 rows): Pillow, full decode", f"{big_full * 1e3:.3f} ms")
    row(f"3x larger JPEGs: Pillow + draft, bounded to {DEFAULT_MAX_HEIGHT} rows", f"{big_draft * 1e3:.3f} ms",
        f"{big_draft / big_full:.2f}x full decode")
    row("3x larger JPEGs: torchvision.io.decode_jpeg (CPU, full size)", f"{big_tv * 1e3:.3f} ms",
        f"{big_tv / big_full:.2f}x Pillow full decode")

    print("\n2. Augmentation alone on one core (images per CPU-second; target: device path >= 3x PIL)")
    decoded = [open_image_file(f) for f in files]
    arrays = [decode_bounded(f, str(f), DEFAULT_MAX_HEIGHT) for f in files]
    n_pil = min(len(decoded), 48)
    pil_rate = rate(lambda: [pil_aug(im) for im in decoded[:n_pil]], n_pil, 2)
    dev = DeviceMultiCrop()
    batch = collate_uint8([(a, i) for i, a in enumerate(arrays[:args.batch])])
    dev_rate = rate(lambda: device_views(dev, batch, torch.device("cpu"), 0), len(batch), 3)
    ops = DeviceMultiCrop(cpu_kernels=False)
    ops_rate = rate(lambda: device_views(ops, batch, torch.device("cpu"), 0), len(batch), 2)
    kornia_rate = kornia_multicrop_rate(batch, dev)
    collate_rate = rate(lambda: collate_uint8([(a, i) for i, a in enumerate(arrays[:args.batch])]), len(batch), 3)
    row("PIL multi-crop (PassMultiCropAugment), 1 process", f"{pil_rate:.1f} img/s")
    row(f"DeviceMultiCrop on the CPU (compiled), batch {len(batch)}, 1 thread", f"{dev_rate:.1f} img/s",
        f"{dev_rate / pil_rate:.2f}x PIL")
    row("the same, batched torch operations (the GPU code) on the CPU", f"{ops_rate:.1f} img/s",
        f"{ops_rate / pil_rate:.2f}x PIL")
    if kornia_rate is None:
        row("kornia.augmentation, same recipe", "skipped", "(pip install kornia to compare)")
    else:
        row("kornia.augmentation, same recipe (padded batch: timing only)", f"{kornia_rate:.1f} img/s",
            f"{kornia_rate / pil_rate:.2f}x PIL")
    row("collate of uint8 arrays into a padded batch (worker side)", f"{collate_rate:.0f} img/s")

    print(f"\n3. Whole step, vit_tiny depth 1 (heads 512/1024), batch {args.batch}, one process on one thread, "
          f"loading included (images per CPU-second)")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")
        ds = load_dataset(f"luperson:{args.images}", verbose=False)
        images = ImageDataset(ds)
        cfg = PassConfig(arch="vit_tiny", depth=1, batch_size=args.batch, epochs=1, warmup_epochs=0,
                         out_dim=1024, hidden_dim=512, bottleneck_dim=128, num_workers=0, progress=False)
        trainer = PassTrainer(cfg, niter_per_epoch=100)
        steps = args.steps
        idx = np.arange(steps * args.batch) % len(images)

        def pil_steps():
            mc = MultiCropDataset(images, pil_aug, seed=0)
            for s in range(steps):
                views = collate_views([mc[int(i)] for i in idx[s * args.batch:(s + 1) * args.batch]])
                trainer.step(views, 0, s)

        def dev_steps():
            di = DecodedImages(images)
            for s in range(steps):
                b = collate_uint8([di[int(i)] for i in idx[s * args.batch:(s + 1) * args.batch]])
                trainer.step(device_views(dev, b, torch.device("cpu"), item_seed(0, 0, s)), 0, s)

        synth = [torch.randn(args.batch, 3, 256, 128)] * 2 + [torch.randn(args.batch, 3, 128, 64)] * 9

        def model_steps():
            for s in range(steps):
                trainer.step(synth, 0, s)

        n = steps * args.batch
        model_rate = rate(model_steps, n, 2)
        pil_step = rate(pil_steps, n, 1, warm=False)
        dev_step = rate(dev_steps, n, 1, warm=False)
        row("model only (synthetic views; the bound)", f"{model_rate:.1f} img/s")
        row("--augment-on cpu (PIL multi-crop)", f"{pil_step:.1f} img/s", f"{pil_step / model_rate:.2f}x bound")
        row("--augment-on device (on the CPU)", f"{dev_step:.1f} img/s",
            f"{dev_step / model_rate:.2f}x bound, {dev_step / pil_step:.2f}x cpu")

        if not args.no_process:
            print(f"\n4. Whole pass-pretrain processes, {steps} steps of batch {args.batch}, "
                  f"--workers {os.cpu_count()} (wall s)")
            exe = Path(sys.executable).parent / "pass-pretrain"
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import torch"], check=True)
            floor = time.perf_counter() - t
            row("python -c 'import torch' (floor)", f"{floor:.2f} s")
            walls = {}
            for mode in ("cpu", "device"):
                cmd = [str(exe), "--data", f"luperson:{args.images}", "--arch", "vit_tiny", "--depth", "1",
                       "--epochs", "1", "--warmup-epochs", "0", "--batch-size", str(args.batch), "--out-dim", "1024",
                       "--workers", str(os.cpu_count()), "--stop-after-iters", str(steps), "--augment-on", mode,
                       "--device", "cpu", "--quiet", "--out", str(Path(tmp) / f"run-{mode}")]
                t = time.perf_counter()
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                walls[mode] = time.perf_counter() - t
                row(f"pass-pretrain --augment-on {mode}", f"{walls[mode]:.2f} s", f"{walls[mode] / floor:.1f}x floor")
            row("device / cpu", f"{walls['device'] / walls['cpu']:.2f}")


if __name__ == "__main__":
    main()
