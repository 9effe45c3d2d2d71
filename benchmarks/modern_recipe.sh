#!/usr/bin/env bash
# The modern recipe's cost next to the paper's, on one GPU in one run, DiT-XL/2 at 256 px, 32 images
# per step, bf16-mixed, compiled: the official train.py step (bf16 + compile, the reference), the
# project's step with the paper's objective, with flow matching, and with REPA fed precomputed
# features; then the sampler: 250 DDPM steps, SiT's 250-step SDE with guidance everywhere and for
# t <= 0.7 only (REPA's interval), and Heun at 50 evaluations; all with guidance 1.5, batch 64.
#   bash benchmarks/modern_recipe.sh OUT_DIR
set -euo pipefail
OUT=${1:?usage: bash benchmarks/modern_recipe.sh OUT_DIR}
source "$(dirname "$0")/fresh_out_dir.sh"
PY=$(command -v "${PYTHON:-python}")
TRAIN="--model DiT-XL/2 --batch-size 32 --steps 30 --warmup 8"
$PY benchmarks/official_loop.py --batch-size 32 --json "$OUT/official.json"
for objective in hybrid flow repa; do
  $PY -m dit.benchmark $TRAIN --objective $objective --json "$OUT/train_$objective.json"
done
SAMPLE="--model DiT-XL/2 --no-train --time-sampler --sample-batch-size 64 --guidance-scale 1.5"
$PY -m dit.benchmark $SAMPLE --json "$OUT/sample_ddpm.json"
$PY -m dit.benchmark $SAMPLE --objective flow sampler=sde --json "$OUT/sample_sde.json"
$PY -m dit.benchmark $SAMPLE --objective flow --guidance-interval 0 0.7 sampler=sde --json "$OUT/sample_sde_interval.json"
$PY -m dit.benchmark $SAMPLE --objective flow sampler=heun --json "$OUT/sample_heun.json"
