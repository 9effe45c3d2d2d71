#!/usr/bin/env bash
# trainer=fsdp through train.py on the GPUs of one host (docs/benchmarks.md §3): DiT-XL/2 at 32 a GPU
# and the 2.1B preset (model=dit_g) at 16 a GPU, on synthetic latents; prints train/images_per_sec
# (the mean of the values logged after the first) and the most GPU memory nvidia-smi saw.
#   bash benchmarks/fsdp_gpu.sh OUT [DEVICES]
set -euo pipefail
OUT=${1:?usage: bash benchmarks/fsdp_gpu.sh OUT [DEVICES]}; DEVICES=${2:-1}
source "$(dirname "$0")/fresh_out_dir.sh"
PY=$(command -v "${PYTHON:-python}")
[ -d /tmp/lat32 ] || $PY benchmarks/synthetic_latents.py /tmp/lat32 8192 32
for run in dit_xl:32:60 dit_g:16:40; do
  IFS=: read -r model batch steps <<< "$run"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/${model}_mem.txt" & SMI=$!
  $PY train.py model="$model" patch=2 trainer=fsdp trainer.devices="$DEVICES" logger=csv data.path=/tmp/lat32 \
    data.global_batch_size=$((batch * DEVICES)) data.num_workers=4 trainer.max_steps="$steps" trainer.log_every_n_steps=10 \
    trainer.val_check_interval=1000000 callbacks.checkpoint.every_n_train_steps=1000000 callbacks.checkpoint.save_last=false \
    '~callbacks.stop_checkpoint' print_config=false hydra.run.dir="$OUT/$model" > "$OUT/$model.log" 2>&1 \
    || { kill $SMI; tail -30 "$OUT/$model.log"; exit 1; }
  kill $SMI
  $PY - "$OUT/$model/csv/version_0/metrics.csv" "$OUT/${model}_mem.txt" "$model" "$batch" "$DEVICES" <<'PY'
import csv, sys
rows = [float(r["train/images_per_sec"]) for r in csv.DictReader(open(sys.argv[1])) if r.get("train/images_per_sec")]
mem = max(int(line) for line in open(sys.argv[2]) if line.strip().isdigit())
print(f"trainer=fsdp {sys.argv[3]} at {sys.argv[4]} a GPU on {sys.argv[5]} GPU(s): {sum(rows[1:]) / len(rows[1:]):.1f} images/s "
      f"(logged {', '.join(f'{r:.1f}' for r in rows)}), at most {mem / 1024:.1f} GiB on a GPU (nvidia-smi)")
PY
done
