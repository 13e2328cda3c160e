#!/usr/bin/env bash
# One command on one CUDA GPU (an H100 or H200), in under 10 minutes: bench/gpu_step.py on a ~1.2B Llama built
# from a config (random weights, batches of 4 x 1024 tokens, SDPA). For full and green-0.5 in precision fp32,
# bf16-mixed and bf16: step time and green/full per precision (target <= 0.55), peak memory from the CUDA
# allocator against greencore.memory's estimate, step FLOPs predicted by greencore.profile against
# FlopCounterMode on a real step, and the timed steps' energy from NVML. Not yet run on a GPU (no device has
# been lent), so its duration is unmeasured; the 10 minutes are enforced: the Python script skips
# configurations begun after --max-s (480 s) and this one stops it at 570 s.
#
# Run from the repository root:
#     bash bench/gpu_methods.sh [extra bench/gpu_step.py options]
# Writes $OUT/gpu.md and $OUT/gpu.log (OUT defaults to bench/results). A dry run on a CPU, end to end on a tiny
# model: DEVICE=cpu OUT=/tmp/gpu-dry bash bench/gpu_methods.sh --small
#
# Installs nothing when what it needs is importable: torch (a CUDA build), transformers, safetensors,
# tokenizers, numpy, and nvidia-ml-py for the energy counter (the device machines' image has them all and no
# network). greencore runs from this checkout (PYTHONPATH), not `pip install -e .`: the project's pins
# (torch>=2.13, transformers>=5.20) are for the service and need not hold for the image's versions, and no
# other dependency of the service is used. Wheels in $WHEELS (default .whl) are installed offline first;
# anything still missing is tried with pip (which needs a network); without nvidia-ml-py the energy column is
# labelled `estimate`.
#
# The accuracy grid this script used to run (bench/methods.py --bf16) takes far more than 10 minutes: it is
# bench/gpu_accuracy.sh now.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu with --small: a dry run of this script on a CPU
WHEELS=${WHEELS:-.whl}
if [ -z "${PY:-}" ]; then
  PY=python3
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    PY=.venv/bin/python
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-bench-site "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/gpu-bench-site"
fi
missing=$("$PY" -c '
import importlib.util
need = {"torch": "torch", "transformers": "transformers", "safetensors": "safetensors",
        "tokenizers": "tokenizers", "numpy": "numpy", "pynvml": "nvidia-ml-py"}
print(" ".join(dist for module, dist in need.items() if importlib.util.find_spec(module) is None))')
if [ -n "$missing" ]; then
  echo "missing: $missing; trying pip" >&2
  # shellcheck disable=SC2086  # one word per distribution
  "$PY" -m pip install -q $missing || echo "pip could not install $missing" >&2
fi

if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
fi
mkdir -p "$OUT"
PYTHONUNBUFFERED=1 timeout 570 "$PY" bench/gpu_step.py --device "$DEVICE" --out "$OUT/gpu.md" "$@" 2>&1 | tee "$OUT/gpu.log"
