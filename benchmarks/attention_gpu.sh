#!/usr/bin/env bash
# Attention kernels and compile warm-up on one GPU in one run (docs/benchmarks.md §2): the kernels
# alone at DiT's shapes and what SDPA picks by itself, the official step with bf16 + compile (the
# reference), the project's DiT-XL/2 step at 32 a GPU twice (the second compiles from torch's caches),
# and the sampler (250 DDPM steps, guidance 1.5, batch 64).
#   bash benchmarks/attention_gpu.sh OUT_DIR
set -euo pipefail
OUT=${1:?usage: bash benchmarks/attention_gpu.sh OUT_DIR}
source "$(dirname "$0")/fresh_out_dir.sh"
PY=$(command -v "${PYTHON:-python}")
$PY benchmarks/attention_kernels.py --batch-size 32 | tee "$OUT/kernels.txt"
$PY benchmarks/official_loop.py --batch-size 32 --json "$OUT/official.json"
TRAIN="--model DiT-XL/2 --batch-size 32 --steps 30 --warmup 8"
$PY -m dit.benchmark $TRAIN --json "$OUT/train.json"
$PY -m dit.benchmark $TRAIN --json "$OUT/train_again.json"
$PY -m dit.benchmark --model DiT-XL/2 --no-train --time-sampler --sample-batch-size 64 --guidance-scale 1.5 \
  --json "$OUT/sample.json"
