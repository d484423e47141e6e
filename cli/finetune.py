"""``finetune``: PPLR unsupervised fine-tuning (extract → cluster → cross-agreement → train, every epoch)."""

import click

from partreid.cli._common import (Command, common_options, emit_output, guard_files, guarded, resolve_device,
                                  seed_everything)
from partreid.cli.extract_features import parse_size
from partreid.common.precision import AMP_MODES
from partreid.pplr_finetune.config import PRESETS, FinetuneConfig as _C, describe_default as _d  # torch-free defaults
from partreid.common.models.archs import ARCHS


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]}, epilog="""\b
Examples:
  finetune --checkpoint runs/pass_vit_small/backbone.pth --data market1501:/data/Market-1501-v15.09.15 \\
      --out runs/pplr_market                     # PPLR on PASS part tokens, paper defaults
  finetune --arch resnet50 --resnet-weights resnet50-0676ba61.pth --data market1501:/data/M \\
      --out runs/pplr_r50                        # PPLR's ResNet-50 stripes; BN as on the reference's 4 GPUs
  finetune --preset pplr-cam-msmt --checkpoint backbone.pth --data msmt17:/data/MSMT17_V1 --out runs/cam_msmt
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
@click.option("--preset", type=click.Choice(list(PRESETS)), default="pplr", show_default=True,
              help="Hyper-parameter preset = a published setting (pplr: PPLR on Market-1501 and MSMT17; pplr-cam / "
                   "pplr-cam-msmt: PPLR-CAM; pass-usl / pass-usl-msmt: PASS's cluster-contrast USL scripts; "
                   "pplr-sgd: PPLR with SGD). Options below override it.")
@click.option("--arch", type=click.Choice(list(ARCHS)), default=None,
              help="Backbone; a ViT size is detected from the checkpoint.")
@click.option("--fusion", type=click.Choice(["cat", "mean"]), default=None, help=f"Global = CLS fused with mean PART "
                                                                               f"[default: {_d('fusion')}].")
@click.option("--image-size", default=None, help="HxW pixels [default: the backbone's: 256x128 ViT, 384x128 ResNet].")
@click.option("--normalization", type=click.Choice(["checkpoint", "imagenet", "half"]), default=None,
              help="Pixel mean/std: the checkpoint's, ImageNet's, or 0.5/0.5 (PASS --self-norm).")
@click.option("--epochs", type=int, default=None, help=f"[default: {_d('epochs')}]")
@click.option("--iters", type=int, default=None, help=f"Iterations per epoch [default: {_d('iters')}].")
@click.option("--batch-size", "-b", type=int, default=None, help=f"P×K images per iteration, all processes together [default: {_d('batch_size')}].")
@click.option("--num-instances", type=int, default=None, help=f"K images per pseudo-id [default: {_d('num_instances')}].")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default=None, help=f"[default: {_d('optimizer')}]")
@click.option("--lr", type=float, default=None, help=f"[default: {_d('lr')}]")
@click.option("--weight-decay", type=float, default=None, help=f"[default: {_d('weight_decay')}]")
@click.option("--step-size", type=int, default=None, help=f"StepLR step in epochs [default: {_d('step_size')}].")
@click.option("--k1", type=int, default=None, help=f"Jaccard k1 [default: {_d('k1')}].")
@click.option("--k2", type=int, default=None, help=f"Jaccard k2 [default: {_d('k2')}].")
@click.option("--eps", type=float, default=None, help=f"DBSCAN eps [default: {_d('eps')}].")
@click.option("--min-samples", type=int, default=None, help=f"DBSCAN min_samples [default: {_d('min_samples')}].")
@click.option("--k", "k_agreement", type=int, default=None, help=f"Cross-agreement k [default: {_d('k')}].")
@click.option("--beta", type=float, default=None, help=f"PGLR beta [default: {_d('beta')}].")
@click.option("--aals-epoch", type=int, default=None, help="First epoch with AALS (before: label-smoothed CE) "
                                                          f"[default: {_d('aals_epoch')}].")
@click.option("--triplet-feature", type=click.Choice(["bnneck-output", "bnneck-input"]), default=None,
              help="Feature of the soft triplet: PPLR's post-BN f_g (default) or the BNNeck input.")
@click.option("--camera-aware/--no-camera-aware", default=None, help="PPLR-CAM: add the inter-camera proxy loss [preset pplr-cam].")
@click.option("--lambda-cam", type=float, default=None, help=f"Weight of the camera loss [default: {_d('lambda_cam')}].")
@click.option("--bn-groups", default=None, help="Ghost-BatchNorm groups per process, or auto: split each process's "
              "batch into the reference's per-GPU batch (pass-usl: 64 images; pass-usl-msmt: 128; PPLR: 16 = 64 on 4 "
              "GPUs), whatever the number of processes; 1 = plain BatchNorm over the batch. Logged at start "
              f"[default: {_d('bn_groups')}].")
@click.option("--classifier-capacity", type=int, default=None, help="Classifier rows up front (needed under DDP, "
                                                                   "e.g. 3000).")
@click.option("--eval-every", type=int, default=None, help="Evaluate every N epochs and at the last (0 = never) "
                                                          f"[default: {_d('eval_every')}].")
@click.option("--eval-data", default=None, help="Dataset spec to evaluate on, when not --data's query/gallery.")
@click.option("--labels", "labels_file", default=None, help="Train the first epoch on these refined labels.")
@click.option("--keep-intermediate", type=click.Path(file_okay=False), default=None,
              help="Keep each epoch's features/labels files in this folder.")
@click.option("--resnet-weights", default=None, help="Local torchvision ResNet-50 ImageNet weights (--arch resnet50; "
                                                    "PPLR starts from them).")
@click.option("--random-init", is_flag=True, help="Allow --arch resnet50 from random weights (without it, a ResNet-50 "
                                                  "without --checkpoint or --resnet-weights is an error).")
@click.option("--workers", "-j", type=int, default=None, help=f"DataLoader workers [default: {_d('workers')}].")
@click.option("--amp", type=click.Choice(AMP_MODES), default=None, is_flag=False, flag_value="auto",
              help="Mixed precision, off by default (float32, as PPLR and cluster-contrast train and extract). "
                   "--amp alone = auto: bf16 autocast where the GPU supports it, else fp16 with a GradScaler; or "
                   "--amp fp16|bf16|none. The per-epoch feature extraction uses the same precision "
                   f"[default: {_d('amp')}].")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last completed epoch.")
@click.option("--plot", is_flag=True, help="Draw metrics.png (losses, clusters, agreement, mAP per epoch).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@common_options(seed_default=None,
                seed_help=f"Random seed [default: the preset's, {_C.seed} for every preset, as PPLR].")
@guarded
def main(checkpoint, spec, out, preset, arch, fusion, image_size, normalization, epochs, iters, batch_size,
         num_instances, optimizer, lr, weight_decay, step_size, k1, k2, eps, min_samples, k_agreement, beta,
         aals_epoch, triplet_feature, camera_aware, lambda_cam, bn_groups, classifier_capacity, eval_every, eval_data,
         labels_file, keep_intermediate, resnet_weights, random_init, workers, amp, resume, plot, quiet, device, seed,
         verbose, debug):
    """PPLR unsupervised fine-tuning on a target dataset (PASS part tokens, or --arch resnet50 for the paper's
    ResNet-50 stripes).

    Each epoch: extract features, cluster them (k-reciprocal Jaccard + DBSCAN), score the parts'
    cross-agreement, then train with PGLR, AALS and a soft triplet loss. Writes checkpoint.pth (resume),
    last.pth (the model, for extract-features/evaluate), metrics.csv and summary.json in --out, and prints
    the path of last.pth. Results are reported for the LAST epoch.

    Defaults are the published code's: float32, BatchNorm over the reference's per-GPU batch (--bn-groups
    auto), and --seed the preset's (1, as PPLR) unless given.
    """
    guard_files(reads={"--checkpoint": checkpoint, "--labels": labels_file, "--resnet-weights": resnet_weights},
                specs={"--data": spec, "--eval-data": eval_data}, out_dirs={"--keep-intermediate": keep_intermediate},
                run_dirs={"--out": (out, ("checkpoint.pth", "last.pth", "metrics.csv", "summary.json",
                                          "metrics.png"))})
    from partreid.common.distributed import is_main_process, session
    from partreid.pplr_finetune.train import FinetuneConfig, finetune

    seed_everything(seed)  # None: the preset's seed, applied by finetune()
    with session(resolve_device(device)) as device:
        cfg = FinetuneConfig.from_preset(
            preset, checkpoint=checkpoint, data=spec, arch=arch, fusion=fusion, image_size=parse_size(image_size),
            normalization=normalization, epochs=epochs, iters=iters, batch_size=batch_size,
            num_instances=num_instances, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
            step_size=step_size, k1=k1, k2=k2, eps=eps, min_samples=min_samples, k=k_agreement, beta=beta,
            aals_epoch=aals_epoch, triplet_feature=triplet_feature, camera_aware=camera_aware, lambda_cam=lambda_cam,
            bn_groups=bn_groups, random_init=random_init or None, classifier_capacity=classifier_capacity,
            eval_every=eval_every, eval_data=eval_data, labels=labels_file, keep_intermediate=keep_intermediate,
            resnet_weights=resnet_weights, workers=workers, amp=amp, resume=resume, seed=seed, device=device,
            progress=not quiet)
        path = finetune(cfg, out)
        main_process = is_main_process()
    if main_process:
        if plot:
            from pathlib import Path

            from partreid.cli._plots import plot_history

            click.echo(f"curves: {plot_history(Path(out) / 'metrics.csv', Path(out) / 'metrics.png')}", err=True)
        emit_output(path)
