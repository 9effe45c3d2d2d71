"""Does a model trained on the digits draw the digit it is asked for? The quickstart's check."""

from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from dit.data.digits import classify, pixel_frechet_distance
from dit.diffusion import batch_generator, draw
from dit.evaluation.images import make_grid, save_png
from dit.evaluation.progress import shown_in_training


class DigitAccuracy(Callback):
    """At the end of training: draw `samples_per_class` guided samples of each digit with the
    final (EMA) weights, through the run's `sampler` and diffusion, and report the fraction a
    classifier fitted on the real digits labels as the digit that was asked for (logged as
    `digits/accuracy`), and their Fréchet distance to the real digits in pixel space
    (`digits/pixel_fd`, dit.data.digits.pixel_frechet_distance), with the sampler's function
    evaluations per sample (`digits/nfe`)."""

    def __init__(self, sampler, samples_per_class=50, guidance_scale=4.0, seed=0):
        self.sampler = sampler
        self.samples_per_class = samples_per_class
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.accuracy = self.pixel_fd = None

    def on_train_end(self, trainer, pl_module):
        # WeightAveraging has copied the EMA weights into the model by now (its on_train_end runs first).
        if not trainer.is_global_zero:
            return
        if trainer.fast_dev_run:  # debug=fdr checks that a config runs: 500 samples of an untrained model say nothing
            print("digits: the accuracy check is skipped under fast_dev_run")
            return
        if 0 < trainer.max_steps and trainer.global_step < trainer.max_steps:
            # stopped early (a preemption signal, the non-finite guard): minutes of sampling would outlast
            # a scheduler's grace period, and the share would describe a model the run did not finish
            print(
                f"digits: the accuracy check is skipped: the run stopped at step {trainer.global_step} of {trainer.max_steps}"
            )
            return
        model = pl_module.model.eval()
        labels = torch.arange(10).repeat_interleave(self.samples_per_class)
        generator = batch_generator(self.seed, 0, pl_module.device)  # one batch
        # One batch, so a bar of the sampler's steps, where Lightning shows its bar (dit.evaluation.progress);
        # it stays on screen (tqdm's leave=True): training is over.
        progress = shown_in_training(trainer) and f"digits: {len(labels)} guided samples"
        samples = draw(
            model, self.sampler, pl_module.diffusion_options, labels, generator, self.guidance_scale, progress=progress
        )
        self.accuracy = float((classify(samples) == labels.numpy()).mean())
        self.pixel_fd = pixel_frechet_distance(samples)
        first = samples.view(10, self.samples_per_class, 1, 8, 8)[:, :10].reshape(-1, 1, 8, 8)
        grid = make_grid(((first + 1) / 2).cpu(), nrow=min(10, self.samples_per_class))
        path = save_png(grid, Path(trainer.default_root_dir) / "samples" / "final.png")
        print(
            f"digits: a classifier fitted on the real digits labels {self.accuracy:.1%} of "
            f"{len(labels)} guided samples (scale {self.guidance_scale}, {self.sampler!r}, {self.sampler.nfe} "
            f"function evaluations) as the digit asked for; their pixel-space Fréchet distance to the real "
            f"digits is {self.pixel_fd:.2f}; grid: {path}"
        )
        metrics = {"digits/accuracy": self.accuracy, "digits/pixel_fd": self.pixel_fd, "digits/nfe": self.sampler.nfe}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
