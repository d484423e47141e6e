#!/usr/bin/env bash
# make demo: the whole PASS -> PPLR chain on real pedestrian crops, on a 2-core CPU in a few minutes.
#   tools/demo.sh OUT_DIR [DATA_SPEC]
# Without DATA_SPEC it uses the crops shipped in data/sample/vtest (unlabelled). With a labelled dataset spec
# (e.g. market1501:/data/Market-1501-v15.09.15) it also evaluates on its query/gallery and draws ranked lists.
set -euo pipefail
OUT=${1:-demo_out}
DATA=${2:-}
BIN=${BIN:-.venv/bin}
export PATH="$BIN:$PATH"
SAMPLE="luperson:data/sample/vtest"   # an unlabelled JPEG tree
TRAIN_SPEC=${DATA:-$SAMPLE}
EPOCHS_PRE=${EPOCHS_PRE:-3}
EPOCHS_FT=${EPOCHS_FT:-2}
SIZE=${SIZE:-64x32}   # CPU-sized input; the papers use 256x128 (PASS) and 384x128 (PPLR ResNet-50)
# 300 crops is a tiny target set: a smaller k1 and eps than PPLR's Market setting (k1 30, eps 0.5-0.6) keep
# the clusters to single walkers (`cluster --sweep-eps 0.3:0.6:0.05` shows the trade-off).
K1=${K1:-15}
EPS=${EPS:-0.5}
EVAL_EVERY=0
[ -n "$DATA" ] && EVAL_EVERY=$EPOCHS_FT
mkdir -p "$OUT"
step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
start=$(date +%s)

step "1/5 pass-pretrain: vit_tiny, $EPOCHS_PRE epochs at $SIZE on $TRAIN_SPEC"
rm -rf "$OUT/pretrain"
pass-pretrain --data "$TRAIN_SPEC" --arch vit_tiny --epochs "$EPOCHS_PRE" --batch-size 32 --out-dim 1024 \
    --warmup-epochs 1 --image-size "$SIZE" --workers 2 --out "$OUT/pretrain" --device cpu >/dev/null
pass-pretrain export "$OUT/pretrain" --out "$OUT/backbone.pth" >/dev/null

step "2/5 extract-features | cluster | refine-labels (a real shell pipeline)"
extract-features --checkpoint "$OUT/backbone.pth" --data "$TRAIN_SPEC" --out "$OUT/features.h5" --device cpu \
  | cluster --out "$OUT/labels.h5" --k1 "$K1" --eps "$EPS" --min-samples 4 \
  | refine-labels --out "$OUT/refined.h5" --plot "$OUT/agreement.png" >/dev/null

step "3/5 finetune: PPLR, $EPOCHS_FT epochs"
rm -rf "$OUT/finetune"
finetune --checkpoint "$OUT/backbone.pth" --data "$TRAIN_SPEC" --epochs "$EPOCHS_FT" --iters 20 --batch-size 32 \
    --lr 1e-4 --k1 "$K1" --eps "$EPS" --eval-every "$EVAL_EVERY" --out "$OUT/finetune" --device cpu --plot >/dev/null

step "4/5 final cluster with the fine-tuned model"
extract-features --checkpoint "$OUT/finetune/last.pth" --data "$TRAIN_SPEC" --out "$OUT/final_features.h5" --device cpu \
  | cluster --out "$OUT/final_labels.h5" --k1 "$K1" --eps "$EPS" --plot-clusters "$OUT/clusters.png" >/dev/null

if [ -n "$DATA" ]; then
  step "5/5 evaluate on the query/gallery of $DATA"
  evaluate --checkpoint "$OUT/finetune/last.pth" --data "$DATA" --out "$OUT/metrics.json" \
      --show-ranks 6 --out-dir "$OUT/eval" --device cpu >/dev/null 2>"$OUT/evaluation.txt"
  cat "$OUT/evaluation.txt" >&2
else
  step "5/5 (no labelled DATA given: evaluation skipped; try make demo DATA=market1501:/path)"
fi

elapsed=$(( $(date +%s) - start ))
{
  echo "PartReID demo ($(date -u +%Y-%m-%dT%H:%M:%SZ), ${elapsed}s on $(nproc) CPU cores)"
  echo "data: $TRAIN_SPEC"
  echo
  echo "-- pseudo-labels before fine-tuning"; inspect-data "$OUT/refined.h5" | sed -n '1,20p'
  echo
  echo "-- pseudo-labels after fine-tuning"; inspect-data "$OUT/final_labels.h5" | sed -n '1,12p'
  if [ -f "$OUT/evaluation.txt" ]; then echo; echo "-- evaluation"; cat "$OUT/evaluation.txt"; fi
} > "$OUT/summary.txt"
cat "$OUT/summary.txt" >&2
cat >&2 <<MSG

Everything is in $OUT/:
  pretrain/             PASS run (checkpoint.pth, metrics.csv)      backbone.pth   exported teacher backbone
  features.h5           features (global + 3 PART tokens)           labels.h5      DBSCAN pseudo-labels (+ kNN)
  refined.h5            + PPLR cross-agreement                       agreement.png  per-part agreement histograms
  finetune/             PPLR run (last.pth, metrics.csv, metrics.png)
  final_labels.h5       clusters with the fine-tuned model           clusters.png   one row per discovered identity
  summary.txt           this summary
MSG
