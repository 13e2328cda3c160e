#!/usr/bin/env bash
# Moved here from bench/gpu_methods.sh, which is now the one-command step benchmark (bench/gpu_step.py): this
# accuracy grid takes far longer than the 10 minutes that one has (a ~1B model pre-trained, then two epochs of
# each method on two tasks), needs Debian's wordnet-base from apt and the bench extra, so it runs only where
# a GPU machine can reach a package registry and is held for an hour or more.
#
# The methods benchmark (bench/methods.py) on a GPU, with a ~1B Llama-style causal LM built from a config
# (22 layers, width 2048, MLP 5632, 16 heads / 8 key-value heads, BPE vocabulary 8192: about 1.0B parameters)
# pre-trained on WordNet noun definitions first, and MiniLM on the part-of-speech task at a larger size.
#
# Run from the repository root on a machine with one CUDA GPU, torch (CUDA build), the project installed with
# its bench extra (`pip install -e '.[bench]'`) and Debian's wordnet-base:
#     bash bench/gpu_accuracy.sh
# Writes bench/results/methods-gpu.md and methods-gpu.png (or under $OUT). Energy comes from NVML.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results}

if [ ! -d /usr/share/wordnet ]; then
  apt-get install -y wordnet-base >/dev/null
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"

# bf16 autocast (weights and AdamW states stay float32); one CUDA device; sizes scaled so that each method
# trains a few hundred steps per epoch.
"$PY" bench/methods.py \
  --device cuda --bf16 --threads 8 \
  --lm-hidden 2048 --lm-layers 22 --lm-heads 16 --lm-intermediate 5632 --lm-vocab 8192 --lm-pretrain 20000 \
  --cls-train 8000 --cls-valid 2000 --lm-train 8000 --lm-valid 1000 \
  --batch-size 32 --epochs 2 --bare-steps 50 --tasks classification,generation --seeds 1 --no-double \
  --name methods-gpu --out "$OUT" --work "${WORK:-/tmp/greentrainer-bench-gpu}"
