#!/usr/bin/env bash
# Full paper reproductions: tools/reproduce.sh TARGET  (called by `make reproduce-*`).
# Needs REID_DATA=/path holding the datasets, a CUDA machine, and GPUS=n (runs through torchrun).
set -euo pipefail
TARGET=$1
GPUS=${GPUS:-1}
BIN=${BIN:-.venv/bin}
RUNS=${RUNS:-runs}
PASS_S=${PASS_CKPT:-$RUNS/pass_vit_small/backbone.pth}
die() { echo "error: $*" >&2; exit 2; }

need_data() {  # need_data NAME...: the first folder under $REID_DATA matching one of the names
  [ -n "${REID_DATA:-}" ] || die "REID_DATA is not set: point it at the folder holding the datasets, e.g. make $TARGET REID_DATA=/data"
  [ -d "$REID_DATA" ] || die "REID_DATA=$REID_DATA is not a folder"
  for n in "$@"; do
    hit=$(find "$REID_DATA" -maxdepth 1 -iname "$n" | head -1)
    [ -n "$hit" ] && { echo "$hit"; return; }
  done
  die "missing data: none of [$*] found under REID_DATA=$REID_DATA"
}
need_gpu() {
  "$BIN/python" - <<'PY' || die "no CUDA GPU visible: this target runs for days on GPUs and is refused on a CPU (set FORCE_CPU=1 to override)"
import os, sys, torch
sys.exit(0 if torch.cuda.is_available() or os.environ.get("FORCE_CPU") == "1" else 1)
PY
}
launch() { if [ "$GPUS" -gt 1 ]; then echo "$BIN/torchrun --standalone --nproc_per_node=$GPUS $BIN/$1"; else echo "$BIN/$1"; fi; }
show() { printf '%s\n' "$@" >&2; }

case "$TARGET" in
  reproduce-pass-small|reproduce-pass-base)
    arch=vit_small; bs=128; [ "$TARGET" = reproduce-pass-base ] && { arch=vit_base; bs=64; }
    root=$(need_data LUPerson LUPerson_img_full LUP lup)
    show "PASS pre-training, $arch, 100 epochs on LUPerson ($root), batch $bs per GPU x $GPUS GPUs." \
         "Paper setting: 8x A100, batch $bs/GPU (global $((bs * 8))), ~4.18M images, ~$([ $arch = vit_small ] && echo 408k || echo 816k) iterations." \
         "Expected downstream (PASS README, ViT-S 256x128): supervised Market 92.2 mAP / 96.3 R1; USL Market 88.7 / 95.0."
    need_gpu
    set -x
    $(launch pass-pretrain) --data "luperson:$root" --arch $arch --epochs 100 --batch-size $bs --out "$RUNS/pass_$arch"
    "$BIN/pass-pretrain" export "$RUNS/pass_$arch" --out "$RUNS/pass_$arch/backbone.pth"
    ;;
  reproduce-pplr-market|reproduce-pplr-msmt)
    if [ "$TARGET" = reproduce-pplr-market ]; then
      root=$(need_data Market-1501-v15.09.15 market1501 Market-1501 market); spec="market1501:$root"
      show "Expected (PPLR paper, ResNet-50, no camera labels): Market 81.5 mAP / 92.8 R1; with cameras 84.4 / 94.3."
    else
      root=$(need_data MSMT17_V1 MSMT17 msmt17); spec="msmt17:$root"
      show "Expected (PPLR paper, ResNet-50, no camera labels): MSMT17 31.4 mAP / 61.1 R1; with cameras 42.2 / 73.3."
    fi
    [ -f "$PASS_S" ] || die "missing PASS ViT-S checkpoint $PASS_S (run make reproduce-pass-small, or set PASS_CKPT=pass_vit_small_full.pth)"
    show "PPLR fine-tuning from the PASS ViT-S checkpoint $PASS_S on $spec: 50 epochs x 400 iterations, batch 64 = 16 x 4," \
         "Adam 3.5e-4, eps 0.5, k1 30, k2 6, k 20, beta 0.5, AALS from epoch 5, float32; BatchNorm over 16-image groups" \
         "(--bn-groups auto: the reference's 4-GPU DataParallel, whatever GPUS is)." \
         "Reference hardware: 4x TITAN RTX (PPLR), ~1 day."
    need_gpu
    set -x
    $(launch finetune) --preset pplr --checkpoint "$PASS_S" --data "$spec" --fusion cat --out "$RUNS/${TARGET#reproduce-}"
    ;;
  reproduce-pplr-resnet-market)
    root=$(need_data Market-1501-v15.09.15 market1501 Market-1501 market)
    w=${RESNET50_WEIGHTS:-$RUNS/resnet50-0676ba61.pth}
    [ -f "$w" ] || die "missing ImageNet ResNet-50 weights $w (download resnet50-0676ba61.pth from the torchvision model zoo; set RESNET50_WEIGHTS)"
    show "PPLR original: ResNet-50 (last stride 1, 3 stripes), 384x128, 50 epochs x 400 it, batch 64, Adam 3.5e-4, eps 0.5." \
         "Expected (PPLR paper): Market 81.5 mAP / 92.8 R1 (no camera labels). Reference: 4x TITAN RTX; users report 58-72 mAP on 1 GPU" \
         "with 64-image BatchNorm; here --bn-groups auto keeps the reference's 16-image groups."
    need_gpu
    set -x
    $(launch finetune) --preset pplr --arch resnet50 --resnet-weights "$w" --data "market1501:$root" --out "$RUNS/pplr_resnet_market"
    ;;
  reproduce-pass-usl-market|reproduce-pass-usl-msmt)
    if [ "$TARGET" = reproduce-pass-usl-market ]; then
      root=$(need_data Market-1501-v15.09.15 market1501 Market-1501 market); spec="market1501:$root"; preset=pass-usl
      show "PASS's own USL setting (cluster-contrast fork, market_usl_cat_singleneck.sh): ViT-S, cat fusion, single neck, eps 0.6," \
           "SGD 3.5e-4, 50 epochs x 200 it, batch 256 = 32 x 8, float32, BatchNorm over 64-image groups (4 GPUs)." \
           "Expected (PASS README): Market 88.7 mAP / 95.0 R1. Reference: 4 GPUs (DataParallel)."
    else
      root=$(need_data MSMT17_V1 MSMT17 msmt17); spec="msmt17:$root"; preset=pass-usl-msmt
      show "PASS's own USL setting (msmt_usl_mean_singleneck.sh): ViT-S, mean fusion, single neck, eps 0.7," \
           "SGD 3.5e-4, 50 epochs x 200 it, batch 256 = 32 x 8, float32, BatchNorm over 128-image groups (2 GPUs)." \
           "Expected (PASS README): MSMT17 41.0 mAP / 67.0 R1. Reference: 2 GPUs (DataParallel)."
    fi
    [ -f "$PASS_S" ] || die "missing PASS ViT-S checkpoint $PASS_S (run make reproduce-pass-small, or set PASS_CKPT=pass_vit_small_full.pth)"
    need_gpu
    set -x
    $(launch finetune) --preset $preset --checkpoint "$PASS_S" --data "$spec" --out "$RUNS/${TARGET#reproduce-}"
    ;;
  *) die "unknown target $TARGET";;
esac
