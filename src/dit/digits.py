"""The quickstart's real data: scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10
classes; no download), and a measurement of whether a trained model draws the digit it is asked for.
"""

from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from dit.data import write_shards
from dit.diffusion import create_diffusion, guided
from dit.module import make_grid, save_png


def prepare_digits(output_dir):
    """The digits as 1-channel "latents" in [-1, 1] with a zero posterior std, in the shard format
    of dit.data (the mirror image is stored too, as the format asks, but the digits config never
    draws it)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 8.0 - 1.0  # pixel values 0..16 -> [-1, 1]
    records = []
    for image, label in zip(images, digits.target):
        mean = np.stack([image, image[:, ::-1]])[:, None, None]  # (2 flips, 1, C=1, 8, 8)
        records.append((label, np.concatenate([mean, np.zeros_like(mean)], axis=1)))  # [mean, std]
    meta = dict(channels=1, latent_size=8, num_classes=10, source="sklearn.datasets.load_digits")
    write_shards(records, output_dir, meta)


def digit_classifier():
    """An SVM fitted on all 1,797 real digits (pixel values 0..16); ~99% accurate on held-out digits."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    return SVC(gamma=0.001).fit(digits.data, digits.target)


def classify(samples, classifier=None):
    """Labels a classifier fitted on the real digits gives (N, 1, 8, 8) samples in [-1, 1]."""
    classifier = classifier or digit_classifier()
    pixels = ((samples.float().cpu().numpy().reshape(len(samples), 64) + 1) * 8).clip(0, 16)
    return classifier.predict(pixels)


class DigitAccuracy(Callback):
    """At the end of training: draw `samples_per_class` guided samples of each digit with the
    final (EMA) weights and report the fraction a classifier fitted on the real digits labels as
    the digit that was asked for (logged as `digits/accuracy`)."""

    def __init__(self, samples_per_class=50, steps="250", guidance_scale=4.0, seed=0):
        self.samples_per_class = samples_per_class
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.accuracy = None

    def on_train_end(self, trainer, pl_module):
        # WeightAveraging has copied the EMA weights into the model by now (its on_train_end runs first).
        if not trainer.is_global_zero:
            return
        model = pl_module.model.eval()
        labels = torch.arange(10, device=pl_module.device).repeat_interleave(self.samples_per_class)
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        diffusion = create_diffusion(self.steps)
        samples = diffusion.p_sample_loop(
            guided(model, self.guidance_scale), (len(labels), 1, 8, 8), model_kwargs=dict(y=labels), generator=generator
        )
        self.accuracy = float((classify(samples) == labels.cpu().numpy()).mean())
        first = samples.view(10, self.samples_per_class, 1, 8, 8)[:, :10].reshape(-1, 1, 8, 8)
        path = save_png(make_grid((first + 1) / 2, nrow=min(10, self.samples_per_class)), Path(trainer.default_root_dir) / "samples" / "final.png")
        print(f"digits: a classifier fitted on the real digits labels {self.accuracy:.1%} of "
              f"{len(labels)} guided samples (scale {self.guidance_scale}) as the digit asked for; grid: {path}")  # fmt: skip
        for logger in trainer.loggers:
            logger.log_metrics({"digits/accuracy": self.accuracy}, step=trainer.global_step)
