#!/usr/bin/env bash
# The sampler's float8 option on one GPU in one run (docs/benchmarks.md §4): one guided forward of
# DiT-XL/2 with each way of running its matmuls (benchmarks/float8_sampler.py, with the N largest
# kernels of each), then the full sampler (250 DDPM steps, guidance 1.5) in bf16 and with each
# float8 granularity, then bf16 with a guidance interval.
#   bash benchmarks/float8_sampler_gpu.sh OUT_DIR
# PARTS="forward sampler interval" (the default) picks the parts to run; VARIANTS, GRANULARITIES and
# INTERVAL ("bf16 rowwise": bf16 and float8 granularities) what each runs.
set -euo pipefail
OUT=${1:?usage: bash benchmarks/float8_sampler_gpu.sh OUT_DIR}
source "$(dirname "$0")/fresh_out_dir.sh"
PY=$(command -v "${PYTHON:-python}")
PARTS=${PARTS:-"forward sampler interval"}
SAMPLER="-m dit.benchmark --model DiT-XL/2 --no-train --time-sampler --sample-batch-size 64 --guidance-scale 1.5"
VARIANTS=${VARIANTS:-"bf16-autocast bf16-sigmoid-gelu fp8-fused-rowwise fp8-fused-rowwise-inductor fp8-fused-tensorwise fp8-fused-rowwise:qkv,proj,fc1"}
# The kernel tables go to OUT/forward.txt, the figures to the terminal too.
[[ $PARTS == *forward* ]] && $PY benchmarks/float8_sampler.py --batch-size 64 --profile ${PROFILE_TOP:-12} \
  --variants $VARIANTS | tee "$OUT/forward.txt" | grep -E "images/s|failed|forward of"
if [[ $PARTS == *sampler* ]]; then
  for g in ${GRANULARITIES:-rowwise tensorwise}; do $PY $SAMPLER --sampler-float8 $g --json "$OUT/sampler_fp8_$g.json"; done
  $PY $SAMPLER --json "$OUT/sampler_bf16.json"
fi
[[ $PARTS == *interval* ]] || exit 0
# Guidance only for t/1000 in [0, 0.7] (REPA's interval, in the Gaussian diffusion's time).
for g in ${INTERVAL:-bf16 rowwise}; do
  $PY $SAMPLER --guidance-interval 0 0.7 $([[ $g == bf16 ]] || echo --sampler-float8 $g) --json "$OUT/sampler_${g}_interval.json"
done
