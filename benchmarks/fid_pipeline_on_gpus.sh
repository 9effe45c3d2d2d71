#!/usr/bin/env bash
# Issue #5's pipeline end to end on 2 GPUs, with random stand-ins for the weights that need a
# download (benchmarks/fid_pipeline_fixtures.py): extraction over 2 GPUs (torchrun, bf16) and on 1
# (fp32) with their posteriors compared; DDP training on the extracted latents with the FID monitor
# on both ranks; dit.evaluation.sample (compiled) on 1 and on 2 GPUs, compared byte for byte, and eager;
# dit.evaluation.fid of the samples against the image folder. Run from the repository root:
#   bash benchmarks/fid_pipeline_on_gpus.sh 0 1        # the two GPUs to use
set -euo pipefail
: "${2:?usage: bash benchmarks/fid_pipeline_on_gpus.sh GPU GPU (two GPU indices, e.g. 0 1)}"
F=${F:-/tmp/fid_pipeline}; ROOT=$PWD; G=$1,$2; PY=$(command -v "${PYTHON:-python}")
rm -rf "$F" && mkdir -p "$F"
$PY benchmarks/fid_pipeline_fixtures.py "$F" 48
CUDA_VISIBLE_DEVICES=$G $PY -m torch.distributed.run --nproc_per_node 2 -m dit.extract "$F/imgs" "$F/lat" --vae "$F/vae" --precision bf16 --batch-size 16 --part-size 48
CUDA_VISIBLE_DEVICES=$1 $PY -m dit.extract "$F/imgs" "$F/lat32" --vae "$F/vae" --precision fp32 --batch-size 16 --part-size 48
$PY - "$F" <<'PY'
import sys
import numpy as np
from litdata import StreamingDataset
by_label = [{}, {}]
for i, name in enumerate(("lat", "lat32")):
    for r in StreamingDataset(f"{sys.argv[1]}/{name}"):
        by_label[i].setdefault(int(r["label"]), []).append(r["posterior"].astype(np.float32))
errors = []
for label, records in by_label[0].items():  # parts are merged in part order: the same order in both
    for bf16, fp32 in zip(records, by_label[1][label]):
        errors.append(np.sqrt(((bf16[:, 0] - fp32[:, 0]) ** 2).mean() / (fp32[:, 0] ** 2).mean()))
print(f"bf16 vs fp32 posterior means: relative RMS error mean {np.mean(errors):.4f}, max {np.max(errors):.4f} ({len(errors)} records)")
PY
(cd "$F" && CUDA_VISIBLE_DEVICES=$G $PY "$ROOT/train.py" model=dit_s patch=8 trainer=ddp data=imagenet_256 data.path="$F/lat" \
  data.num_classes=4 data.global_batch_size=32 data.num_workers=2 "data.sample_classes=[0,1]" trainer.max_steps=20 \
  trainer.log_every_n_steps=5 trainer.val_check_interval=20 logger=csv name=fidrun callbacks=fid callbacks.fid.ref="$F/imgs" \
  callbacks.fid.inception_weights="$F/inception.pth" callbacks.fid.vae="$F/vae" callbacks.fid.num_samples=40 \
  callbacks.fid.every_n_steps=10 'sampler.steps="10"' callbacks.fid.batch_size=16 2>&1 | tee "$F/train.log" | grep "FID")
CK=$F/outputs/fidrun/checkpoints/last.ckpt
S="--num-samples 40 --batch-size 16 sampler=ddpm sampler.steps=20 --vae $F/vae"
CUDA_VISIBLE_DEVICES=$1 $PY -m dit.sample "$CK" "$F/s1" $S --devices 1
CUDA_VISIBLE_DEVICES=$G $PY -m dit.sample "$CK" "$F/s2" $S --devices 2
CUDA_VISIBLE_DEVICES=$1 $PY -m dit.sample "$CK" "$F/s0" $S --devices 1 --compile false
$PY -c "
import numpy as np
one, two, eager = (np.load('$F/' + x + '.npz')['arr_0'].astype(int) for x in ('s1', 's2', 's0'))
print('1 GPU vs 2 GPUs: identical', (one == two).all(), one.shape, '| compiled vs eager: max |diff|', np.abs(one - eager).max())"
CUDA_VISIBLE_DEVICES=$1 $PY -m dit.fid "$F/s2.npz" --ref "$F/imgs" --inception-weights "$F/inception.pth" --isc --prc
