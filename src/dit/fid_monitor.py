"""FID during training: every K steps, FID of a few thousand EMA samples against reference statistics.

    python train.py callbacks=fid callbacks.fid.ref=VIRTUAL_imagenet256_labeled.npz           # conf/callbacks/fid.yaml
    python train.py experiment=quickstart callbacks=fid callbacks.fid.ref=digits_ref.npz \\
        callbacks.fid.every_n_steps=500 callbacks.fid.num_samples=1000

Logged as `val/fid` (and `val/fid_best`, the lowest so far, which survives a resume); a wandb run
keeps the minimum of `val/fid` in its summary. FID on 5K samples is biased upwards against FID-50K
(the bias shrinks with N), so it tracks progress; the paper's numbers come from `python -m dit.fid`
on 50K samples.
"""

import math

import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging
from lightning.pytorch.loggers import WandbLogger

from dit.diffusion import guided
from dit.module import seeded_noise
from dit.fid import POOL, UInt8Images, features, frechet_distance, inception, load_reference
from dit.vae import decode, load_vae, to_uint8


class FIDMonitor(Callback):
    """
    Args:
        ref: the reference (see `dit.fid.load_reference`): statistics `.npz` (ADM's
            VIRTUAL_imagenet256_labeled.npz, or one written by `python -m dit.fid --save-ref-stats`), a
            folder of real images, or "digits". Computed once, at the start of the run.
        every_n_steps: measure after every this many optimizer steps.
        num_samples: samples per measurement, spread over all devices.
        inception_weights: a local copy of torch-fidelity's Inception weights (None: download).
        steps, guidance_scale, guidance: the sampler (respacing, scale, variant); the defaults are the
            paper's FID protocol for its scaling results (250 DDPM steps, no guidance, Table 4).
        vae: the VAE that decodes latents ("mse", the paper's Table 4 decoder; "ema"; or a folder).
            Not used for pixel data (1 or 3 channels, such as the digits).
        batch_size: samples drawn (and Inception images) per device at a time.
        seed: each sample's label (balanced over the classes) and starting noise follow from its
            index and this seed, so measurements differ only by the weights, not by the draw.
    """

    def __init__(self, ref, every_n_steps=10000, num_samples=5000, inception_weights=None, steps="250",
                 guidance_scale=1.0, guidance="official", vae="mse", batch_size=64, seed=0):  # fmt: skip
        self.ref = ref
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.inception_weights = inception_weights
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.guidance = guidance
        self.vae_name = vae
        self.batch_size = batch_size
        self.seed = seed
        self.best = math.inf
        self.extractor = self.reference = self.vae = None

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        model = pl_module.model
        pixels = model.in_channels in (1, 3)
        # Every rank extracts its share. torch-fidelity moves batches to CUDA only, so elsewhere (CPU, TPU)
        # the extractor stays on the CPU.
        self.extractor = inception(self.inception_weights, pl_module.device if pl_module.device.type == "cuda" else "cpu")
        if not pixels:
            self.vae = load_vae(self.vae_name, pl_module.device)
        if trainer.is_global_zero:
            resolution = model.input_size * (1 if pixels else 8)  # the SD VAE upsamples 8× (paper §3.1)
            self.reference = load_reference(self.ref, self.extractor, resolution, self.batch_size)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):  # the run's summary keeps the lowest FID, not the last
                    logger.experiment.define_metric("val/fid", summary="min")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every_n_steps:
            return
        fid = trainer.strategy.broadcast(self.measure(trainer, pl_module), src=0)
        self.best = min(self.best, fid)
        if trainer.is_global_zero:
            print(f"step {trainer.global_step}: FID {fid:.2f} on {self.num_samples} EMA samples (best {self.best:.2f})")
            for logger in trainer.loggers:
                logger.log_metrics({"val/fid": fid, "val/fid_best": self.best}, step=trainer.global_step)

    def measure(self, trainer, pl_module):
        """FID of `num_samples` samples of the EMA weights; every rank draws and extracts its share,
        rank 0 gathers the features and returns the FID (the other ranks return None)."""
        model = ema_backbone(trainer, pl_module)
        was_training = model.training
        model.eval()
        sampler = pl_module.sampling_diffusion(self.steps)
        device = pl_module.device
        per_rank = math.ceil(self.num_samples / trainer.world_size)
        index = torch.arange(trainer.global_rank, per_rank * trainer.world_size, trainer.world_size)
        generator = torch.Generator(device=device).manual_seed(self.seed + 1 + trainer.global_rank)
        scale = trainer.datamodule.scale_factor if trainer.datamodule is not None else 1.0
        pool = []
        for chunk in index.split(self.batch_size):
            noise = seeded_noise(model, chunk, self.seed).to(device)
            labels = (chunk % model.num_classes).to(device)
            z = sampler.p_sample_loop(guided(model, self.guidance_scale, self.guidance), noise.shape, noise,
                                      model_kwargs=dict(y=labels), generator=generator)  # fmt: skip
            images = z.float() / scale if self.vae is None else decode(self.vae, z, scale)  # in [-1, 1]
            pool.append(features(self.extractor, UInt8Images(to_uint8(images)), self.batch_size)[POOL].to(device))
        model.train(was_training)
        # (world, per_rank, ...) on every rank; indices past num_samples (the last rank's padding) are dropped.
        pool, index = pl_module.all_gather(torch.cat(pool)), pl_module.all_gather(index.to(device))
        if not trainer.is_global_zero:
            return None
        pool = pool.reshape(-1, pool.shape[-1])[index.reshape(-1) < self.num_samples]
        return frechet_distance(pool, self.reference)

    def state_dict(self):
        return {"best": self.best}

    def load_state_dict(self, state_dict):
        self.best = state_dict["best"]


def ema_backbone(trainer, pl_module):
    """The DiT with the EMA weights: the averaged copy that Lightning's `WeightAveraging` keeps
    (conf/callbacks/default.yaml), or the live weights when a run has no EMA. Lightning 2.6 offers no
    public accessor for the copy; it is an `AveragedModel` of the whole LightningModule."""
    averaging = next((c for c in trainer.callbacks if isinstance(c, WeightAveraging)), None)
    if averaging is None or averaging._average_model is None:
        return pl_module.model
    return averaging._average_model.module.model
