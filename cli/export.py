"""``export``: a checkpoint → ONNX or TorchScript, verified against torch on real crops."""

import sys

import click

from partreid.cli._common import Command, common_options, emit_output, guard_files, guarded, run_checkpoint
from partreid.cli.extract_features import parse_size


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]}, epilog="""\b
Examples:
  partreid export finetune/last.pth --format onnx --out reid.onnx
  partreid export backbone.pth --format onnx --with-preprocessing --threshold-file threshold.json --out reid.onnx
  partreid export pass_vit_small_full.pth --format torchscript --out reid.pt
  partreid extract-features -c reid.onnx -d folder:crops --out f.h5     # run it with onnxruntime
""")
@click.argument("checkpoint")
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript"]), default="onnx", show_default=True)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Output model file.")
@click.option("--with-preprocessing", is_flag=True,
              help="Put the resize to the model's HxW and the mean/std into the graph: input uint8 N x H x W x 3 "
                   "RGB of any size (bilinear antialiased resize, not PIL bicubic).")
@click.option("--fusion", type=click.Choice(["auto", "cls", "cat", "mean"]), default="auto", show_default=True,
              help="Global feature of a ViT backbone, as in extract-features (fine-tuned models keep theirs).")
@click.option("--neck", type=click.Choice(["after", "before"]), default="after", show_default=True,
              help="Before or after the BNNeck (fine-tuned models only).")
@click.option("--normalize/--no-normalize", default=True, show_default=True, help="L2-normalise the outputs.")
@click.option("--threshold-file", type=click.Path(dir_okay=False), default=None,
              help="A `partreid calibrate` result to embed in the metadata (used by search --threshold auto).")
@click.option("--arch", default=None, help="Force the architecture (vit_tiny/vit_small/vit_base/resnet50).")
@click.option("--image-size", default=None, help="Input size HxW in pixels (default: the checkpoint's).")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare the exported model with torch on real crops; exit 1 (and write nothing) when a row's "
                   "cosine is below --min-cosine.")
@click.option("--verify-data", default=None,
              help="Dataset spec of the verification crops (default: the repository's data/sample/vtest crops).")
@click.option("--verify-images", type=int, default=32, show_default=True, help="Number of verification crops.")
@click.option("--min-cosine", type=float, default=0.9999, show_default=True, help="Verification pass mark.")
@common_options
@guarded
def main(checkpoint, fmt, out, with_preprocessing, fusion, neck, normalize, threshold_file, arch, image_size, opset,
         verify, verify_data, verify_images, min_cosine, device, seed, verbose, debug):
    """Export CHECKPOINT (anything extract-features accepts) to ONNX or TorchScript.

    Outputs `global` (N x D) and `parts` (N x P x Dp), computed as extract-features computes them (fusion,
    neck, normalisation; no flip); the batch is dynamic. The metadata records arch, image size, mean/std,
    fusion, neck, normalisation, package version, the checkpoint's SHA-256 and an optional threshold. The
    export is then run by onnxruntime (or torch.jit) and by torch on real crops, and the minimum cosine per
    row is printed on stderr. Prints the output path on stdout.
    """
    from partreid.common.export import export_model

    checkpoint = run_checkpoint(checkpoint, "CHECKPOINT")
    guard_files(reads={"CHECKPOINT": checkpoint, "--threshold-file": threshold_file}, writes={"--out": out})

    result = export_model(checkpoint, out, fmt, fusion=fusion, neck=neck, normalize=normalize,
                          with_preprocessing=with_preprocessing, threshold_file=threshold_file, arch=arch,
                          image_size=parse_size(image_size), opset=opset, verify=verify, verify_data=verify_data,
                          verify_images=verify_images, min_cosine=min_cosine)
    if result.report is not None:
        click.echo(result.report.format(rows=5 if not verbose else 0), err=True)
    if result.path is None:
        click.echo(f"error: the exported model does not match torch (cosine below {min_cosine}); "
                   f"{out} was not written", err=True)
        sys.exit(1)
    emit_output(result.path)
