#!/usr/bin/env bash
# Loss curves of DiT-XL/2 (MODEL=dit_b: B/2) through train.py on synthetic latents (fixed seeds), 2,000 steps at 32 a
# GPU: one run per "name:seed:float8" argument (float8 `null` for bf16), each in OUT/<name>; then
# benchmarks/loss_curves.py compares them (docs/benchmarks.md §2).
#   bash benchmarks/float8_loss_curve.sh OUT bf16_s0:0:null bf16_s1:1:null fp8_s0:0:tensorwise
set -euo pipefail
OUT=${1:?usage: bash benchmarks/float8_loss_curve.sh OUT name:seed:float8 ...}; shift; mkdir -p "$OUT"
PY=$(command -v "${PYTHON:-python}")
STEPS=${STEPS:-2000}
LAYERS=${LAYERS:-"[qkv,proj,fc1,fc2]"}
[ -d /tmp/lat32 ] || $PY benchmarks/synthetic_latents.py /tmp/lat32 8192 32
for run in "$@"; do
  IFS=: read -r name seed float8 <<< "$run"
  $PY train.py model=${MODEL:-dit_xl} patch=2 trainer=gpu logger=csv data.path=/tmp/lat32 data.global_batch_size=32 \
    data.num_workers=4 trainer.max_steps="$STEPS" trainer.log_every_n_steps=5 trainer.val_check_interval=1000000 \
    callbacks.checkpoint.every_n_train_steps=1000000 callbacks.checkpoint.save_last=false '~callbacks.stop_checkpoint' \
    print_config=false seed="$seed" module.float8="$float8" module.float8_layers="$LAYERS" hydra.run.dir="$OUT/$name" \
    > "$OUT/$name.log" 2>&1 || { tail -20 "$OUT/$name.log"; exit 1; }
  grep -h "images/s\|train/images_per_sec" "$OUT/$name.log" | tail -1 || true
done
$PY benchmarks/loss_curves.py "$OUT"/*/csv/version_0/metrics.csv
