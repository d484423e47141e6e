#!/usr/bin/env bash
# One-command GPU check (PASS step fp16/bf16 images/s + MFU, extraction, faiss GPU kNN, finetune AMP on/off):
#   bash benchmarks/gpu_check.sh                 # on a GPU machine: prints one table, at most ~8 minutes
#   bash benchmarks/gpu_check.sh --device cpu --tiny   # dry run of every code path on the CPU
# On a machine without a GPU it prints "skipped: no GPU" and exits 0. Extra rows: see CHECKS in gpu_check.py.
# PYTHON=/path/to/python picks the interpreter (default: .venv/bin/python, else python3).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-}
if [ -z "$PY" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if [ -z "$PY" ]; then PY=$(command -v python3 || command -v python || true); fi
if [ -z "$PY" ] || ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "skipped: no GPU check possible (no python with torch: run make install, or set PYTHON=)"
  exit 0
fi
timeout --signal=INT --kill-after=20 "${GPU_CHECK_TIMEOUT:-330}" "$PY" benchmarks/gpu_check.py "$@"
rc=$?
# The PASS loader check (device-side multi-crop vs PIL workers vs the model-only bound); skips itself without CUDA.
case " $* " in
  *" --tiny "*|*" --only "*) ;;
  *) timeout --signal=INT --kill-after=20 "${PRETRAIN_GPU_TIMEOUT:-150}" "$PY" benchmarks/bench_pretrain_gpu.py \
       --iters 10 --warmup 2 || rc=$? ;;
esac
exit $rc
