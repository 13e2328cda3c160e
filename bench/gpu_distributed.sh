#!/usr/bin/env bash
# One command on a machine with 2 or more CUDA GPUs: bench/distributed.py with NCCL, one rank per GPU, on a
# Llama-shaped model built from a config (random weights; width 2048, 8 layers, about 0.35B parameters). For
# full fine-tuning and green-0.5, per epoch: the bytes the ranks all-reduce (DDP's buckets, counted by
# greencore's communication hook; target: green <= 0.5 of full's), the step time on N ranks and on one GPU,
# and whether the N ranks chose the same tensors and ended at one process's weights. Not yet run on GPUs (no
# machine with several GPUs has been lent), so its duration is unmeasured; this script stops it at 570 s.
#
# Run from the repository root:
#     bash bench/gpu_distributed.sh [extra bench/distributed.py options]
# NPROC (default: every visible GPU) sets the ranks. Writes $OUT/gpu-distributed.md and $OUT/gpu-distributed.log
# (OUT defaults to bench/results). A dry run on a CPU (gloo), end to end on a tiny model:
#     DEVICE=cpu NPROC=2 OUT=/tmp/gpu-dry bash bench/gpu_distributed.sh --small
#
# Installs nothing when what it needs is importable: torch (a CUDA build), transformers, safetensors,
# tokenizers and numpy (the device machines' image has them and no network). greencore runs from this
# checkout (PYTHONPATH), not `pip install -e .`: the project's pins are for the service (see gpu_methods.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu with --small: a dry run of this script on a CPU
if [ -z "${PY:-}" ]; then
  PY=python3
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch; assert torch.cuda.device_count() > 1" 2>/dev/null; then
    PY=.venv/bin/python
  fi
  if [ "$DEVICE" = cpu ] && [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

missing=$("$PY" -c '
import importlib.util
need = ("torch", "transformers", "safetensors", "tokenizers", "numpy")
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))')
if [ -n "$missing" ]; then
  echo "missing: $missing (install them first; this script downloads nothing)" >&2
  exit 1
fi

# The model's size: about 0.35B parameters on GPUs; --small, a tiny one for the dry run.
SIZE=(--hidden 2048 --layers 8 --examples 512 --batch-size 16 --seq-len 256 --epochs 2)
if [ "${1:-}" = "--small" ]; then
  shift
  SIZE=(--hidden 64 --layers 2 --examples 64 --batch-size 4 --seq-len 64 --epochs 1)
fi
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  NPROC=${NPROC:-$gpus}
  if [ "$gpus" -lt 2 ] || [ "$NPROC" -gt "$gpus" ] || [ "$NPROC" -lt 2 ]; then
    echo "needs 2 or more CUDA GPUs, one per rank: $gpus visible, NPROC=$NPROC" >&2
    exit 1
  fi
else
  NPROC=${NPROC:-2}
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
mkdir -p "$OUT"
PYTHONUNBUFFERED=1 timeout 570 "$PY" bench/distributed.py --device "$DEVICE" --nproc "$NPROC" "${SIZE[@]}" \
  --out "$OUT/gpu-distributed.md" "$@" 2>&1 | tee "$OUT/gpu-distributed.log"
