"""``finetune``: PPLR unsupervised fine-tuning (extract → cluster → cross-agreement → train, every epoch)."""

import click

from partreid.cli._common import common_options, emit_output, guarded, resolve_device, seed_everything
from partreid.cli.extract_features import parse_size
from partreid.common.models.archs import ARCHS


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog="""\b
Examples:
  finetune --checkpoint runs/pass_vit_small/backbone.pth --data market1501:/data/Market-1501-v15.09.15 \\
      --out runs/pplr_market                     # PPLR on PASS part tokens, paper defaults
  finetune --arch resnet50 --checkpoint resnet50-0676ba61.pth --data market1501:/data/M --bn-groups 4 \\
      --out runs/pplr_r50                        # PPLR's original ResNet-50 stripes, 1 GPU behaving like 4
  finetune --preset pass-usl --checkpoint pass_vit_small_full.pth --data market1501:/data/M --out runs/usl
  finetune --labels refined.h5 --epochs 1 --checkpoint backbone.pth --out runs/one_round   # labels from the shell
  torchrun --nproc_per_node 4 $(which finetune) --checkpoint ckpt.pth --data msmt17:/data/MSMT17_V1 --out runs/m
  finetune ... --out runs/pplr_market --resume   # continue an interrupted run
""")
@click.option("--checkpoint", "-c", default="", help="PASS backbone (pass-pretrain export or official), a finetune "
                                                   "checkpoint, or torchvision ResNet-50 weights with --arch resnet50.")
@click.option("--data", "-d", "spec", default="", help="Training dataset spec (its train split; query/gallery are "
                                                     "used for evaluation when labelled).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Run folder.")
@click.option("--preset", type=click.Choice(["pplr", "pplr-cam", "pplr-sgd", "pass-usl"]), default="pplr",
              show_default=True, help="Hyper-parameter preset; options below override it.")
@click.option("--arch", type=click.Choice(list(ARCHS)), default=None,
              help="Backbone; a ViT size is detected from the checkpoint.")
@click.option("--fusion", type=click.Choice(["cat", "mean"]), default=None, help="Global = CLS fused with mean PART "
                                                                               "[default: cat].")
@click.option("--image-size", default=None, help="HxW pixels [default: the backbone's: 256x128 ViT, 384x128 ResNet].")
@click.option("--normalization", type=click.Choice(["checkpoint", "imagenet", "half"]), default=None,
              help="Pixel mean/std: the checkpoint's, ImageNet's, or 0.5/0.5 (PASS --self-norm).")
@click.option("--epochs", type=int, default=None, help="[default: 50]")
@click.option("--iters", type=int, default=None, help="Iterations per epoch [default: 400].")
@click.option("--batch-size", "-b", type=int, default=None, help="P×K images per iteration [default: 64 = 16×4].")
@click.option("--num-instances", type=int, default=None, help="K images per pseudo-id [default: 4].")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default=None, help="[default: adam]")
@click.option("--lr", type=float, default=None, help="[default: 3.5e-4]")
@click.option("--weight-decay", type=float, default=None, help="[default: 5e-4]")
@click.option("--step-size", type=int, default=None, help="StepLR step in epochs [default: 20].")
@click.option("--k1", type=int, default=None, help="Jaccard k1 [default: 30].")
@click.option("--k2", type=int, default=None, help="Jaccard k2 [default: 6].")
@click.option("--eps", type=float, default=None, help="DBSCAN eps [default: 0.5; pass-usl 0.6; pplr-cam 0.4].")
@click.option("--min-samples", type=int, default=None, help="DBSCAN min_samples [default: 4].")
@click.option("--k", "k_agreement", type=int, default=None, help="Cross-agreement k [default: 20].")
@click.option("--beta", type=float, default=None, help="PGLR beta [default: 0.5].")
@click.option("--aals-epoch", type=int, default=None, help="First epoch with AALS (before: label-smoothed CE) "
                                                          "[default: 5].")
@click.option("--triplet-feature", type=click.Choice(["bnneck-output", "bnneck-input"]), default=None,
              help="Feature of the soft triplet: PPLR's post-BN f_g (default) or the BNNeck input.")
@click.option("--camera-aware/--no-camera-aware", default=None, help="PPLR-CAM: add the inter-camera proxy loss [preset pplr-cam].")
@click.option("--lambda-cam", type=float, default=None, help="Weight of the camera loss [default: 0.5; MSMT 1.0].")
@click.option("--bn-groups", type=int, default=None, help="Ghost BatchNorm groups: 4 makes one GPU at batch 64 "
                                                         "behave like the reference's 4-GPU DataParallel.")
@click.option("--classifier-capacity", type=int, default=None, help="Classifier rows up front (needed under DDP, "
                                                                   "e.g. 3000).")
@click.option("--eval-every", type=int, default=None, help="Evaluate every N epochs and at the last (0 = never) "
                                                          "[default: 5].")
@click.option("--eval-data", default=None, help="Dataset spec to evaluate on, when not --data's query/gallery.")
@click.option("--labels", "labels_file", default=None, help="Train the first epoch on these refined labels.")
@click.option("--keep-intermediate", type=click.Path(file_okay=False), default=None,
              help="Keep each epoch's features/labels files in this folder.")
@click.option("--resnet-weights", default=None, help="Local torchvision ResNet-50 ImageNet weights (--arch resnet50).")
@click.option("--workers", "-j", type=int, default=None, help="DataLoader workers [default: 2].")
@click.option("--amp/--no-amp", default=True, show_default=True, help="Mixed precision on CUDA.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last completed epoch.")
@click.option("--plot", is_flag=True, help="Draw metrics.png (losses, clusters, agreement, mAP per epoch).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@common_options
@guarded
def main(checkpoint, spec, out, preset, arch, fusion, image_size, normalization, epochs, iters, batch_size,
         num_instances, optimizer, lr, weight_decay, step_size, k1, k2, eps, min_samples, k_agreement, beta,
         aals_epoch, triplet_feature, camera_aware, lambda_cam, bn_groups, classifier_capacity, eval_every, eval_data,
         labels_file, keep_intermediate, resnet_weights, workers, amp, resume, plot, quiet, device, seed, verbose,
         debug):
    """PPLR unsupervised fine-tuning on a target dataset (PASS part tokens, or --arch resnet50 for the paper's
    ResNet-50 stripes).

    Each epoch: extract features, cluster them (k-reciprocal Jaccard + DBSCAN), score the parts'
    cross-agreement, then train with PGLR, AALS and a soft triplet loss. Writes checkpoint.pth (resume),
    last.pth (the model, for extract-features/evaluate), metrics.csv and summary.json in --out, and prints
    the path of last.pth. Results are reported for the LAST epoch.
    """
    from partreid.common.distributed import init_distributed
    from partreid.pplr_finetune.train import FinetuneConfig, finetune

    seed_everything(seed)
    device = init_distributed(resolve_device(device))
    cfg = FinetuneConfig.from_preset(
        preset, checkpoint=checkpoint, data=spec, arch=arch, fusion=fusion, image_size=parse_size(image_size),
        normalization=normalization, epochs=epochs, iters=iters, batch_size=batch_size, num_instances=num_instances,
        optimizer=optimizer, lr=lr, weight_decay=weight_decay, step_size=step_size, k1=k1, k2=k2, eps=eps,
        min_samples=min_samples, k=k_agreement, beta=beta, aals_epoch=aals_epoch, triplet_feature=triplet_feature,
        camera_aware=camera_aware, lambda_cam=lambda_cam, bn_groups=bn_groups,
        classifier_capacity=classifier_capacity, eval_every=eval_every, eval_data=eval_data, labels=labels_file,
        keep_intermediate=keep_intermediate, resnet_weights=resnet_weights, workers=workers, amp=amp,
        resume=resume, seed=seed, device=device, progress=not quiet)
    path = finetune(cfg, out)
    from partreid.common.distributed import is_main_process

    if is_main_process():
        if plot:
            from pathlib import Path

            from partreid.cli._plots import plot_history

            click.echo(f"curves: {plot_history(Path(out) / 'metrics.csv', Path(out) / 'metrics.png')}", err=True)
        emit_output(path)
