"""The LightningModule: DiT backbone + the paper's diffusion loss, AdamW, and sample grids.

The EMA of the weights (decay 0.9999 in the paper) is kept by `dit.ema.EMA` (Lightning's `WeightAveraging`)
callback (conf/callbacks/default.yaml): it swaps the EMA weights in for validation — where the
sample grids are drawn, so grids show the EMA model — and saves them as the checkpoint's
`state_dict` (the live weights go to `current_model_state`).
"""

import random
import time
from pathlib import Path

import numpy as np
import torch
from lightning import LightningModule

from dit.checkpoints import load_weights_file
from dit.diffusion import create_diffusion, guided
from dit.errors import UsageError
from dit.models import DiT, backbone_state_dict, describe_state_dict


COMPILE_CHOICES = (True, False, "auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# What "auto" means on a CUDA device: CUDA graphs replay the step's hundreds of kernel launches at
# once; at the paper's 32 images per GPU the step is otherwise bound by the CPU launching them.
CUDA_COMPILE_MODE = "reduce-overhead"


class DiTModule(LightningModule):
    """
    Args:
        model: keyword arguments of `dit.models.DiT` (conf/model, `patch`, conf/conditioning).
        optimizer: keyword arguments of `torch.optim.AdamW` (paper: lr 1e-4, no weight decay).
        diffusion: keyword arguments of `create_diffusion` for training (paper: all 1000 steps).
        sampling: how the sample grid is drawn every `trainer.val_check_interval` steps (its
            classes come from the data): `steps` (respacing), `guidance_scale`, `guidance` variant
            and `seed`.
        init_from: a checkpoint whose (EMA) weights start the run: the official
            `DiT-XL-2-256x256.pt`, an official training checkpoint, an export, or a train.py checkpoint.
        compile: compile the backbone's forward with torch.compile: true, false, "auto" (on CUDA
            devices only: compiling pays for itself within minutes there, not on a CPU), or one of
            torch.compile's modes ("reduce-overhead" adds CUDA graphs, "max-autotune" ...).
        max_nonfinite_in_a_row: a NaN/Inf loss skips its update and is counted; this many in a row
            save the last good state as last.ckpt and stop the run (0: no guard). With fused AdamW
            (CUDA, CPU) the skip happens on the device and the counts are read once per logging
            interval; other optimizers read the loss on the host every step.
    """

    def __init__(self, model, optimizer, diffusion, sampling, init_from=None, compile="auto", max_nonfinite_in_a_row=10):
        super().__init__()
        self.save_hyperparameters()
        self.model = DiT(**model)
        if init_from:
            try:
                self.model.load_state_dict(backbone_state_dict(load_weights_file(init_from)))
            except UsageError as err:
                raise UsageError(f"module.init_from={init_from}: {err}") from None
        self.diffusion = create_diffusion(**diffusion)
        self.sampler = self.sampling_diffusion(sampling["steps"])
        self.run_config = None  # the full run config; train.py sets it, checkpoints keep it
        self.run_manifest = None  # the run's id, config hash and code version (train.py), kept in checkpoints
        self._grid = []
        self._timer = None
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self._compiled = False
        self._skip_on_device = False  # set with the optimizer
        self._in_a_row = self._longest = self._skipped = None  # device counters of skipped updates

    def sampling_diffusion(self, steps):
        """The training diffusion respaced to `steps` for sampling ("250", "ddim50", ...)."""
        return create_diffusion(steps, **{k: v for k, v in self.hparams.diffusion.items() if k != "timestep_respacing"})

    def setup(self, stage):
        if stage != "fit" or self._compiled:  # Lightning calls setup for each fit/validate/test
            return
        compile = self.hparams.compile
        if compile not in COMPILE_CHOICES:
            raise UsageError(f"module.compile={compile!r}; use one of {', '.join(map(str, COMPILE_CHOICES))}")
        if compile == "auto":
            compile = CUDA_COMPILE_MODE if self.trainer.strategy.root_device.type == "cuda" else False
        if compile:
            mode = None if compile is True else compile
            # The sampler (sample grids, FID) calls the backbone alone; in place, so state-dict
            # keys stay those of the official layout.
            self.model.compile()
            # The training step compiles as one graph: backbone AND the diffusion loss around it,
            # whose dozens of small fp32 ops then fuse instead of each being a kernel launch.
            self._losses = torch.compile(self._losses, mode=mode)
            self._compiled = True

    # ------------------------------------------------------------------ training

    def training_step(self, batch, batch_idx):
        x, y = batch
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device)
        terms = self._losses(x, t, y)
        loss = terms["loss"].mean()
        if self.hparams.max_nonfinite_in_a_row and not self._skip_on_device and not self._finite(loss):
            return None  # Lightning skips the backward pass and the update
        # Device tensors: Lightning reads them on the host only every log_every_n_steps. Not on the
        # progress bar: its values are read at every step, a host sync per step.
        self.log("train/loss", loss)
        self.log("train/mse", terms["mse"].mean())
        if "vb" in terms:
            self.log("train/vb", terms["vb"].mean())
        return loss

    def _losses(self, x, t, y):
        """Per-sample loss terms of the hybrid objective (one graph under `compile`)."""
        return self.diffusion.training_losses(self.model, x, t, dict(y=y))

    def _finite(self, loss):
        """The guard for optimizers that cannot skip an update on the device: a host read per step."""
        finite = bool(torch.isfinite(loss))
        if self.trainer.world_size > 1:  # every rank skips together, or DDP would hang
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            self.nonfinite_in_a_row = 0
            return True
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        self.log("train/nonfinite_skipped", float(self.nonfinite_total))
        limit = self.hparams.max_nonfinite_in_a_row
        print(f"step {self.global_step}: non-finite loss, update skipped ({self.nonfinite_in_a_row} in a row of {limit} allowed)")
        if self.nonfinite_in_a_row >= limit:
            self._stop(f"{limit} non-finite losses in a row at step {self.global_step}")
        return False

    def _stop(self, what):
        """Save the state as last.ckpt and stop the run: skipped updates left the weights at the last good step."""
        path = Path(self.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        self.trainer.save_checkpoint(path)
        raise FloatingPointError(
            f"{what}; the last good state is saved in {path}. Lower the learning rate or use fp32 "
            "(trainer.precision=32-true), then resume=auto accept_changes=true"
        )

    def on_before_optimizer_step(self, optimizer):
        logged = (self.global_step + 1) % self.trainer.log_every_n_steps == 0  # a step Lightning logs
        if not (logged or self._skip_on_device):
            return
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        if logged:
            self.log("train/grad_norm", norm)
        if self._skip_on_device:
            # The non-finite guard without a host read: fused AdamW skips the whole update (weights,
            # moments, step count) where `found_inf` is 1, on the device. The gradients are those
            # after DDP's all-reduce, the same on every rank, so all ranks skip together. The
            # counts are read on the host once per logging interval (on_train_batch_end).
            bad = ~torch.isfinite(norm)
            optimizer.found_inf = bad.float()
            if self._in_a_row is None:
                self._in_a_row, self._longest = (torch.zeros((), dtype=torch.long, device=norm.device) for _ in range(2))
                self._skipped = torch.tensor(self.nonfinite_total, device=norm.device)
            self._in_a_row = torch.where(bad, self._in_a_row + 1, 0)
            self._longest = torch.maximum(self._longest, self._in_a_row)
            self._skipped = self._skipped + bad

    def _check_skipped_updates(self):
        """Once per logging interval: report updates skipped since the last check; stop the run
        once `max_nonfinite_in_a_row` came in a row, keeping the last good state."""
        skipped, longest, limit = int(self._skipped), int(self._longest), self.hparams.max_nonfinite_in_a_row
        if skipped > self.nonfinite_total:
            print(f"step {self.global_step}: {skipped - self.nonfinite_total} updates skipped since the last check for "
                  f"non-finite gradients (at most {longest} in a row; {limit} allowed)")  # fmt: skip
            self.nonfinite_total = skipped
            self.log("train/nonfinite_skipped", torch.tensor(float(skipped)))
        if longest >= limit:
            self._stop(f"{longest} updates in a row had non-finite gradients (by step {self.global_step})")
        self._longest = self._in_a_row.clone()  # "in a row" counts from here on, a run still going included

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # Throughput over the last logging interval; one device sync per interval, not per step.
        if self.global_step % self.trainer.log_every_n_steps:  # the step just taken is not logged
            return
        if self._in_a_row is not None:
            self._check_skipped_updates()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now, step = time.perf_counter(), self.global_step
        if self._timer is not None:
            steps = step - self._timer[1]
            steps_per_sec = steps / (now - self._timer[0])
            images = batch[0].shape[0] * self.trainer.world_size
            # Host values logged as CPU tensors: a float would become a device tensor, and on XLA
            # its bookkeeping would change the next step's graph (a recompilation).
            self.log("train/steps_per_sec", torch.tensor(steps_per_sec))
            self.log("train/images_per_sec", torch.tensor(steps_per_sec * images))
        self._timer = (now, step)

    def on_train_epoch_end(self):
        # litdata's loader keeps replaying a restored (mid-epoch) position until one of its epochs
        # runs into StopIteration, which Lightning never asks for: it knows the length and stops
        # first. Without this, every epoch after an exact resume would repeat the resumed one.
        loader = self.trainer.train_dataloader
        if getattr(loader, "restore", False):
            loader.restore = False

    def on_train_start(self):
        # The optimizer's settings come from this run's config, also when a checkpoint restored
        # the optimizer's state (with the settings it was saved with): train.py refuses a resume
        # whose settings changed unless accept_changes=true, and then the new ones are in force.
        for group in self.trainer.optimizers[0].param_groups:
            for key, value in self.hparams.optimizer.items():
                if key in group and key != "fused":
                    group[key] = tuple(value) if isinstance(value, list) else value

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]  # not the frozen pos_embed
        options = dict(self.hparams.optimizer)
        # Fused: one kernel for the whole update, on CUDA and on CPUs; it can also skip an update on
        # the device (the non-finite guard without a host read per step).
        options.setdefault("fused", self.device.type in ("cuda", "cpu"))
        self._skip_on_device = bool(self.hparams.max_nonfinite_in_a_row and options["fused"])
        return torch.optim.AdamW(params, **options)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["config"] = self.run_config
        checkpoint["manifest"] = self.run_manifest
        # Every RNG the training step draws from, so a resumed run repeats the same steps.
        checkpoint["rng"] = dict(
            torch=torch.get_rng_state(),
            cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            numpy=np.random.get_state(),
            python=random.getstate(),
        )
        checkpoint["nonfinite_total"] = self.nonfinite_total if self._skipped is None else int(self._skipped)

    def on_load_checkpoint(self, checkpoint):
        theirs = backbone_state_dict(checkpoint)
        if describe_state_dict(theirs) != describe_state_dict(self.model.state_dict()):
            raise UsageError(
                f"the checkpoint holds {describe_state_dict(theirs)}, but this run builds "
                f"{describe_state_dict(self.model.state_dict())}; resume with the config it was trained with"
            )
        rng = checkpoint.get("rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
        self.nonfinite_total = checkpoint.get("nonfinite_total", 0)

    # ------------------------------------------------------------------ sample grids (EMA weights)

    def validation_step(self, batch, batch_idx):
        s = self.hparams.sampling
        labels, index = batch
        m = self.model
        noise = seeded_noise(m, index, s["seed"]).to(self.device)
        generator = None  # XLA has no torch.Generator: there the device's RNG draws the steps' noise
        if self.device.type != "xla":
            generator = torch.Generator(device=self.device).manual_seed(s["seed"] + 1 + self.global_rank)
        model = guided(m, s["guidance_scale"], s["guidance"])
        z = self.sampler.p_sample_loop(model, noise.shape, noise, model_kwargs=dict(y=labels), generator=generator)
        self._grid.append((index, z))

    def on_validation_epoch_end(self):
        index = torch.cat([i for i, _ in self._grid])
        z = torch.cat([z for _, z in self._grid])
        self._grid.clear()
        # Over devices: (world, n, ...) gathered, flattened; on one device all_gather is identity.
        index, z = self.all_gather(index).reshape(-1), self.all_gather(z).reshape(-1, *z.shape[1:])
        if not self.trainer.is_global_zero:
            return
        order = torch.zeros(int(index.max()) + 1, dtype=torch.long)
        order[index.cpu()] = torch.arange(len(index))  # duplicates from a padded sampler collapse
        images = self.decode(z[order.to(z.device)])
        # One copy to the host: make_grid's per-image slices would each be a graph of their own on XLA.
        grid = make_grid(images.cpu(), nrow=self.trainer.datamodule.hparams.samples_per_class)
        path = Path(self.trainer.default_root_dir) / "samples" / f"step_{self.global_step:07d}.png"
        save_png(grid, path)
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image("samples/grid", [str(path)], step=self.global_step)

    def decode(self, z):
        """Latents -> images in [0, 1]: latents that are pixels in [-1, 1] (the digits) as they are;
        VAE latents previewed as their first 3 channels."""
        scale = self.trainer.datamodule.scale_factor if self.trainer.datamodule is not None else 1.0
        z = z.float() / scale
        if z.shape[1] not in (1, 3):
            z = z[:, :3] / z[:, :3].abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
        return ((z + 1) / 2).clamp(0, 1)


def seeded_noise(model, index, seed):
    """Starting noise for samples `index`, each from its own seed (seed + i): a sample is the same
    whatever batch or device draws it, and at every step of training."""
    shape = (model.in_channels, model.input_size, model.input_size)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in index.tolist()])


def make_grid(images, nrow, pad=1):
    """(N, C, H, W) in [0, 1] -> (C, rows·(H+pad)+pad, nrow·(W+pad)+pad), black gutters."""
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    grid = torch.zeros(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for k in range(n):
        r, col = divmod(k, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = images[k].cpu()
    return grid


def save_png(image, path, upscale=None):
    """Write a (C, H, W) [0, 1] image (C = 1 or 3) as a PNG; small images are upscaled for eyes."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array[..., :3])
    if upscale is None:
        upscale = max(1, 256 // max(img.size))
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    img.save(path)
    return path
