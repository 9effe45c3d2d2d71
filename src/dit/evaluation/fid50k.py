"""The paper's evaluation protocol in one command: sample, then FID (paper §4, "Evaluation metrics").

    # headline (Table 2): 50K samples, 250 DDPM steps, guidance 1.5, ft-EMA decoder, every GPU
    python -m dit.fid50k DiT-XL-2-256x256.pt samples/xl2 --ref VIRTUAL_imagenet256_labeled.npz
    # Table 4 / the scaling study: no guidance, ft-MSE decoder
    python -m dit.fid50k outputs/b4/checkpoints/last.ckpt samples/b4 --ref ref256.npz --guidance-scale 1 --vae mse

Every option of `python -m dit.sample` passes through (its defaults are the headline protocol), and
the run resumes like it: rerunning after an interruption draws only the missing samples. Then
rank 0 measures `<out_dir>.npz` with `python -m dit.fid` (FID, Inception Score, and precision and
recall when the reference holds images) and writes the figures to `<out_dir>.json`.
"""

import argparse
import json
import os
from pathlib import Path

from dit.errors import ArgumentParser, exit_on_usage_error
from dit.evaluation import fid, sample


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    parser.add_argument(
        "--ref", required=True, help="as dit.fid: ADM's reference .npz, a stats .npz, or a folder of real images"
    )
    parser.add_argument("--inception-weights", help="as dit.fid: a local copy of the Inception weights")
    args, sample_args = parser.parse_known_args(argv)
    fid.check_reference(args.ref)
    if os.environ.get("LOCAL_RANK") is None:  # the launching process, once, not each rank it starts
        fid.inception(args.inception_weights)  # a missing file or an offline download: refused before sampling
    if sample.main([args.checkpoint, args.out_dir, *sample_args]) != 0:
        return None  # the other ranks only sample
    fid_args = [f"{args.out_dir}.npz", "--ref", args.ref, "--isc"]
    if Path(args.ref).is_dir() or "arr_0" in _npz_keys(args.ref):
        fid_args.append("--prc")  # precision/recall need reference images, not just statistics
    if args.inception_weights:
        fid_args += ["--inception-weights", args.inception_weights]
    metrics = fid.main(fid_args)
    Path(f"{args.out_dir}.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _npz_keys(path):
    import numpy as np

    return np.load(path).files if str(path).endswith(".npz") and Path(path).is_file() else []


if __name__ == "__main__":
    exit_on_usage_error(main)
