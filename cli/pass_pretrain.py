"""``pass-pretrain``: PASS part-aware self-supervised pre-training of a ViT (and ``pass-pretrain export``)."""

import click

from partreid.cli._common import Group, guard_files, common_options, emit_output, guarded, read_input_path
from partreid.cli.extract_features import parse_size
from partreid.common.precision import AMP_MODES
from partreid.pass_pretrain.config import CLIP_MODES, PassConfig as _C  # torch-free: the library's defaults


def _size(hw) -> str:
    return f"{hw[0]}x{hw[1]}"
from partreid.common.models.archs import VIT_ARCHS


class _TrainOrExport(Group):
    """``pass-pretrain [OPTIONS]`` trains; ``pass-pretrain export RUN --out FILE`` exports."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            ctx.meta["train_only"] = True
        return super().parse_args(ctx, args)


@click.group(cls=_TrainOrExport, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]}, epilog="""\b
Examples:
  pass-pretrain --data LUPerson --arch vit_small --epochs 100 --batch-size 128 --out runs/pass_vit_small
      (LUPerson found under $REID_DATA: a JPEG tree, or its LMDB read directly)
  torchrun --nproc_per_node 8 $(which pass-pretrain) --data luperson:/data/LUP --out runs/pass_vit_small
  pass-pretrain --data folder:data/sample/vtest --arch vit_tiny --epochs 4 --batch-size 32 \\
      --image-size 128x64 --out-dim 4096 --out runs/tiny          # a CPU-sized demo
  pass-pretrain --data LUPerson --out runs/pass_vit_small --resume  # continue mid-epoch
  pass-pretrain export runs/pass_vit_small --out backbone.pth       # teacher backbone, official PASS keys
""")
@click.option("--data", "-d", "spec", default=None, help="Unlabelled images: a dataset spec or a NAME under "
                                                       "$REID_DATA (labels are ignored).")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None, help="Run folder.")
@click.option("--arch", type=click.Choice(list(VIT_ARCHS)), default=_C.arch,
              show_default=True)
@click.option("--epochs", type=int, default=_C.epochs, show_default=True)
@click.option("--batch-size", "-b", type=int, default=_C.batch_size, show_default=True, help="Images per GPU/process.")
@click.option("--lr", type=float, default=_C.lr, show_default=True, help="Base LR, scaled by global batch / 256.")
@click.option("--warmup-epochs", type=int, default=_C.warmup_epochs, show_default=True,
              help="Linear lr warm-up; clamped (with a log line) when longer than --epochs.")
@click.option("--out-dim", type=int, default=_C.out_dim, show_default=True, help="Prototypes per DINO head.")
@click.option("--image-size", default=_size(_C.image_size), show_default=True, help="Global views HxW pixels.")
@click.option("--local-size", default=None, help="Local crops HxW [default: half the global size].")
@click.option("--local-crops-per-band", type=int, default=_C.local_crops_per_band, show_default=True)
@click.option("--teacher-temp", type=float, default=_C.teacher_temp, show_default=True)
@click.option("--warmup-teacher-temp", type=float, default=_C.warmup_teacher_temp, show_default=True)
@click.option("--warmup-teacher-temp-epochs", type=int, default=_C.warmup_teacher_temp_epochs, show_default=True)
@click.option("--momentum-teacher", type=float, default=_C.momentum_teacher, show_default=True)
@click.option("--clip-grad", type=float, default=_C.clip_grad, show_default=True)
@click.option("--clip-mode", type=click.Choice(CLIP_MODES), default=_C.clip_mode,
              show_default=True, help="per-tensor: each parameter tensor's gradient norm is capped on its own, "
                                      "as the reference does.")
@click.option("--freeze-last-layer", type=int, default=_C.freeze_last_layer, show_default=True, help="Epochs with the heads' last "
                                                                                  "layer frozen.")
@click.option("--drop-path", type=float, default=_C.drop_path_rate, show_default=True)
@click.option("--depth", type=int, default=_C.depth, show_default=True, help="Transformer blocks (12 = the paper's).")
@click.option("--amp", type=click.Choice(AMP_MODES), default=_C.amp, show_default=True,
              help="Mixed precision: fp16 = float16 autocast with a GradScaler, as the published runs "
                   "(--use_fp16); bf16 = bfloat16 autocast, no scaler (also on the CPU); auto = bf16 where the GPU "
                   "supports it, else fp16; none = float32. fp16 and auto run float32 on the CPU.")
@click.option("--workers", "-j", type=int, default=_C.num_workers, show_default=True)
@click.option("--augment-on", type=click.Choice(["auto", "cpu", "device"]), default=_C.augment_on,
              show_default=True,
              help="Where the multi-crop augmentation runs. cpu: PIL in the data-loader workers (the reference); "
                   "device: workers only decode, crops and colour run batched on the training device; "
                   "auto: device on CUDA, else cpu.")
@click.option("--checkpoint-every", type=int, default=_C.checkpoint_every, show_default=True,
              help="Also checkpoint every N iterations (0: epoch ends only).")
@click.option("--stop-after-iters", type=int, default=None, help="Stop (with a checkpoint) after N iterations.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint (mid-epoch).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--refresh-index", is_flag=True, help="Re-list an unlabelled image tree instead of using its cached "
                                                    "file index (after adding images deep inside it).")
@click.option("--strict", is_flag=True, help="Fail on an unreadable image instead of skipping it.")
@common_options
@click.pass_context
@guarded
def main(ctx, spec, out, arch, epochs, batch_size, lr, warmup_epochs, out_dim, image_size, local_size,
         local_crops_per_band, teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs, momentum_teacher,
         clip_grad, clip_mode, freeze_last_layer, drop_path, depth, amp, workers, augment_on, checkpoint_every,
         stop_after_iters, resume, quiet, refresh_index, strict, device, seed, verbose, debug):
    """PASS pre-training: DINO self-distillation of a ViT with three [PART] tokens, one per horizontal band.

    Paper defaults (ViT-S: 100 epochs, batch 128/GPU, AdamW lr 5e-4 x batch/256, 10 warm-up epochs, 2 global
    + 9 band-local crops, 4 DINO heads with 65,536 prototypes) are the CLI defaults. Checkpoints are written
    every --checkpoint-every iterations and at each epoch end; --resume continues mid-epoch. When training
    finishes, the teacher backbone is exported to RUN/teacher_backbone.pth and its path printed on stdout.
    """
    if ctx.invoked_subcommand is not None:
        return
    from partreid.common.data import load_dataset
    from partreid.common.data.images import ImageDataset
    from partreid.common.errors import InputError
    from partreid.common.splits import choose_split
    from partreid.pass_pretrain.train import PassConfig, train_pass

    if not spec or not out:
        raise InputError("pass-pretrain needs --data SPEC and --out RUN_DIR (see --help)")
    guard_files(specs={"--data": spec}, run_dirs={"--out": (out, ("checkpoint.pth", "teacher_backbone.pth",
                                                                "config.json", "metrics.csv"))})
    size = parse_size(image_size)
    local = parse_size(local_size) or (size[0] // 2, size[1] // 2)
    config = PassConfig(arch=arch, depth=depth, image_size=size, local_size=local, drop_path_rate=drop_path,
                        out_dim=out_dim, local_crops_per_band=local_crops_per_band, teacher_temp=teacher_temp,
                        warmup_teacher_temp=warmup_teacher_temp, warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
                        epochs=epochs, batch_size=batch_size, lr=lr, warmup_epochs=warmup_epochs,
                        momentum_teacher=momentum_teacher, clip_grad=clip_grad, clip_mode=clip_mode,
                        freeze_last_layer=freeze_last_layer, amp=amp, seed=seed, num_workers=workers, device=device,
                        checkpoint_every=checkpoint_every, stop_after_iters=stop_after_iters, progress=not quiet,
                        augment_on=augment_on)
    ds = load_dataset(spec, refresh=refresh_index, strict=strict)
    # one split (LUPerson): every row, served from the dataset's own path table without building a frame
    frame = None if len(ds.splits) <= 1 else choose_split(ds, None, unlabelled=True)[1]
    ckpt = train_pass(config, ImageDataset(ds, frame, transform=None), out, resume=resume)
    from partreid.common.distributed import is_main_process

    if is_main_process():
        backbone = ckpt.parent / "teacher_backbone.pth"
        emit_output(backbone if backbone.exists() else ckpt)


@main.command("export", context_settings={"help_option_names": ["-h", "--help"]}, epilog="""\b
Examples:
  pass-pretrain export runs/pass_vit_small --out backbone.pth
  pass-pretrain export runs/pass_vit_small/checkpoint.pth --out backbone.pth
""")
@click.argument("run", required=False)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Backbone file to write.")
@click.option("-v", "--verbose", count=True)
@click.option("--debug", is_flag=True)
@guarded
def export(run, out, verbose, debug):
    """Write the teacher backbone of RUN (a run folder or checkpoint) alone, in the official PASS key layout."""
    run = read_input_path(run, "run folder")
    guard_files(reads={"RUN": run}, writes={"--out": out})
    from partreid.pass_pretrain.train import export_backbone

    emit_output(export_backbone(run, out))
