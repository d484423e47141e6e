"""``extract-features``: images → global and part features → a features file."""

import click

from partreid.cli._common import (Command, common_options, emit_output, guard_files, guarded, resolve_device,
                                  run_checkpoint, seed_everything)
from partreid.common.models.archs import ARCHS


def parse_size(value):
    """'256x128' → (256, 128) pixels (H×W); None passes through."""
    if value is None:
        return None
    try:
        h, w = value.lower().split("x")
        return int(h), int(w)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected HxW in pixels, e.g. 256x128") from None


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]}, epilog="""\b
Examples:
  extract-features --checkpoint runs/pass_vit_small/backbone.pth \\
      --data market1501:/data/Market-1501-v15.09.15 --split query --out q.h5
  extract-features --checkpoint pass_vit_small_full.pth --data msmt17:/data/MSMT17_V1 \\
      --split train --fusion mean --out train.h5 | cluster --out labels.h5
  extract-features --checkpoint random:vit_tiny --data folder:crops --out f.h5   # random baseline
""")
@click.option("--checkpoint", "-c", required=True,
              help="Model: pass-pretrain run/export, official PASS .pth, finetune checkpoint, timm ViT or "
                   "torchvision ResNet-50 state dict, or random:ARCH.")
@click.option("--data", "-d", "spec", required=True, help="Dataset spec, e.g. market1501:ROOT or a NAME under $REID_DATA.")
@click.option("--split", default=None, help="Split to extract (train/query/gallery/all). Default: train if the "
                                            "dataset has one, else its only split.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Output features file (.h5).")
@click.option("--fusion", type=click.Choice(["auto", "cls", "cat", "mean"]), default="auto", show_default=True,
              help="Global feature of a ViT: CLS, or CLS fused with the mean PART token (cat: 2D, mean: D). "
                   "auto = cat for ViTs, GAP for ResNet-50.")
@click.option("--neck", type=click.Choice(["after", "before"]), default="after", show_default=True,
              help="Before or after the BNNeck (finetuned models only).")
@click.option("--flip/--no-flip", default=False, show_default=True, help="Average with the mirrored image.")
@click.option("--normalize/--no-normalize", default=True, show_default=True, help="L2-normalise features.")
@click.option("--no-parts", is_flag=True, help="Do not store part features.")
@click.option("--arch", type=click.Choice(list(ARCHS)), default=None, help="Force the architecture.")
@click.option("--image-size", default=None, help="Input size HxW in pixels (default: the checkpoint's).")
@click.option("--interpolation", type=click.Choice(["bicubic", "bilinear"]), default="bicubic", show_default=True)
@click.option("--batch-size", "-b", type=int, default=64, show_default=True)
@click.option("--workers", "-j", type=int, default=2, show_default=True, help="DataLoader worker processes.")
@click.option("--resume", is_flag=True, help="Continue a partly written extraction of the same output.")
@click.option("--strict", is_flag=True, help="Fail on an unreadable image instead of skipping it.")
@common_options
@guarded
def main(checkpoint, spec, split, out, fusion, neck, flip, normalize, no_parts, arch, image_size, interpolation,
         batch_size, workers, resume, strict, device, seed, verbose, debug):
    """Extract global and part features of a dataset split into a features file.

    The test transform is the paper's: resize, then normalise with the mean/std the checkpoint was trained
    with. Runs under torchrun too: each rank extracts its share and rank 0 writes the file. Prints the
    output path on stdout.
    """
    checkpoint = run_checkpoint(checkpoint)
    guard_files(reads={"--checkpoint": checkpoint}, specs={"--data": spec}, writes={"--out": out})
    from partreid.common.distributed import is_main_process, session
    from partreid.cli._stages import extract_features

    seed_everything(seed)
    with session(resolve_device(device)) as device:
        path = extract_features(checkpoint, spec, out, split=split, fusion=fusion, neck=neck, flip=flip,
                                normalize=normalize, parts=not no_parts, arch=arch,
                                image_size=parse_size(image_size), interpolation=interpolation,
                                batch_size=batch_size, workers=workers, device=device, resume=resume, strict=strict)
        main_process = is_main_process()
    if main_process:
        emit_output(path)
