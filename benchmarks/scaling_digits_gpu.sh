#!/usr/bin/env bash
# The miniature scaling sweep (conf/experiment/scaling_digits.yaml) on one GPU, timed; its charts and
# its runs' summaries are copied to OUT.   bash benchmarks/scaling_digits_gpu.sh OUT
set -euo pipefail
out=${1:?give a folder for the charts and summaries}; shift
sweep=${SWEEP_DIR:-/tmp/scaling_digits_gpu}
start=$(date +%s)
python train.py experiment=scaling_digits trainer=gpu hydra.sweep.dir="$sweep" callbacks.progress_bar.refresh_rate=0 "$@"
echo "wall time of the sweep on one GPU: $(( $(date +%s) - start )) s"
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p "$out"
cp -r "$sweep/charts" "$out/"
for job in "$sweep"/*/; do cp "$job/summary.json" "$out/summary_$(basename "$job").json"; done
