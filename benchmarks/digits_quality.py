"""The digits check of a trained quickstart at several guidance scales: the share of 50 samples per
digit that the quickstart's classifier (an SVM fitted on the real digits) labels as the digit asked
for, and their Fréchet distance to the real digits in pixel space (dit.data.digits). The same draws as
the run's own final check (batch 0 of seed 0), with the run's sampler unless `sampler=` is given.

    python benchmarks/digits_quality.py outputs/quickstart/checkpoints/last.ckpt --scales 1 4
    python benchmarks/digits_quality.py outputs/flow/checkpoints/last.ckpt sampler=heun sampler.steps=25
    # the .npz files of `python -m dit.sample <quickstart ckpt> DIR --classes 0,1,2,3,4,5,6,7,8,9 ...`
    python benchmarks/digits_quality.py --npz samples/bf16.npz samples/fp8.npz
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dit.config import build, sampler_from
from dit.data.digits import classify, digit_classifier, pixel_frechet_distance
from dit.diffusion import batch_generator, draw
from dit.errors import ArgumentParser, UsageError, exit_on_usage_error
from dit.evaluation.sample import load_model
from dit.training.checkpoints import load_weights_file


def main():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("overrides", nargs="*", metavar="sampler=...")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--samples-per-class", type=int, default=50)
    p.add_argument("--npz", nargs="+", default=[], help="dit.sample outputs drawn with --classes 0,...,9 instead")
    args = p.parse_intermixed_args()
    if args.npz:
        missing = [path for path in args.npz if not Path(path).is_file()]
        if missing:
            p.error(f"--npz {missing[0]}: no such file (dit.sample writes <out_dir>.npz beside its folder)")
        return score_npz(args.npz)
    if not args.checkpoint:
        p.error("give a quickstart checkpoint, or --npz FILE ... of its samples")
    model = load_model(args.checkpoint)[0]
    recorded = load_weights_file(args.checkpoint)["config"]["module"]["sampler"]
    sampler = sampler_from(args.overrides) if args.overrides else build(recorded, "sampler")
    classifier = digit_classifier()
    labels = torch.arange(10).repeat_interleave(args.samples_per_class)
    for scale in args.scales:
        with torch.no_grad():
            samples = draw(model, sampler, model.diffusion_options, labels, batch_generator(0, 0, "cpu"), scale)
        accuracy = float((classify(samples, classifier) == labels.numpy()).mean())
        print(
            f"{args.checkpoint}: {sampler!r}, {sampler.nfe} evaluations, guidance {scale}: "
            f"digit accuracy {accuracy:.1%}, pixel-space Fréchet distance {pixel_frechet_distance(samples):.1f}"
        )


def score_npz(paths):
    """The same two figures for dit.sample's uint8 images, sample i of digit i mod 10."""
    classifier = digit_classifier()
    for path in paths:
        with np.load(path) as held:
            drawn = json.loads(str(held["manifest"]))["identity"] if "manifest" in held.files else None
            arr = held["arr_0"]
        if drawn is not None and drawn.get("classes") != list(range(10)):  # labels i mod 10, or no score
            raise UsageError(
                f"{path} was drawn with classes {drawn.get('classes') or 'at random'}, not --classes 0,1,...,9: "
                "its labels are unknown here; draw it with --classes 0,1,2,3,4,5,6,7,8,9"
            )
        images = torch.from_numpy(arr[..., :1]).permute(0, 3, 1, 2)
        samples = (images.float() - 128) / 127.5  # dit.data.vae.to_uint8 undone, to within its rounding
        labels = np.arange(len(samples)) % 10
        accuracy = float((classify(samples, classifier) == labels).mean())
        print(
            f"{path}: {len(samples)} samples, digit accuracy {accuracy:.1%}, "
            f"pixel-space Fréchet distance {pixel_frechet_distance(samples):.1f}"
        )


if __name__ == "__main__":
    exit_on_usage_error(main)
