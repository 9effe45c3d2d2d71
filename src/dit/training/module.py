"""The LightningModule: a DiT backbone, a training objective over the paper's diffusion, AdamW,
and sample grids drawn by the configured sampler.

Everything else a run needs is a callback (conf/callbacks/): the EMA of the weights
(callbacks/ema.py; decay 0.9999, paper §4), which swaps the EMA weights in for validation, where
the grids are drawn, and saves them as the checkpoint's `state_dict`; the non-finite guard; the RNG
states of an exact resume; the throughput.
"""

from __future__ import annotations

import inspect
from functools import partial
from pathlib import Path

import torch
from lightning import LightningModule
from lightning.pytorch.callbacks import WeightAveraging

from dit.data.decoding import make_decoder
from dit.diffusion import Objective, Sampler, draw
from dit.diffusion.guidance import check_guidance
from dit.diffusion.sampling import batch_generator
from dit.errors import UsageError
from dit.evaluation.images import make_grid, save_png
from dit.models import DiT, backbone_state_dict, describe_state_dict
from dit.training.checkpoints import load_weights_file
from dit.training.float8 import LAYERS as FLOAT8_LAYERS
from dit.training.float8 import check_float8, check_float8_device, convert_blocks_to_float8
from dit.training.fsdp import fsdp_compile_mode

COMPILE_CHOICES = (True, False, "auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# What "auto" means on a CUDA device: CUDA graphs replay the step's hundreds of kernel launches at
# once; at the paper's 32 images per GPU the step is otherwise bound by the CPU launching them.
CUDA_COMPILE_MODE = "reduce-overhead"


class DiTModule(LightningModule):
    """
    Args:
        model: the backbone (conf/model builds a `dit.models.DiT`).
        optimizer: a partial optimizer, called with the parameters (conf: torch.optim.AdamW with
            `_partial_: true`; paper: lr 1e-4, no weight decay).
        diffusion: keyword arguments of `create_diffusion` for training (paper: all 1000 steps);
            the Gaussian objectives train on it, the flow objective has its own path.
        objective: what training minimises (conf/objective; paper: `Hybrid`, L_simple + L_vlb).
        sampler: how the sample grids are drawn (conf/sampler; paper: `DDPM`, 250 steps).
        sampling: the grids' `guidance_scale`, `guidance` variant, `guidance_interval` and `seed`;
            their classes come from the data, drawn every `trainer.val_check_interval` steps.
        init_from: a checkpoint whose (EMA) weights start the run: the official
            `DiT-XL-2-256x256.pt`, an official training checkpoint, an export, or a train.py checkpoint.
        compile: compile the backbone's forward with torch.compile: true, false, "auto" (on CUDA
            devices only: compiling pays for itself within minutes there, not on a CPU), or one of
            torch.compile's modes ("reduce-overhead" adds CUDA graphs, "max-autotune" ...).
        float8: null, a torchao float8 recipe ("tensorwise", "rowwise", "rowwise_with_gw_hp") or a
            float8 forward ("rowwise_forward", "tensorwise_forward": bf16 gradients) for the
            matmuls of the blocks' `float8_layers` (dit.training.float8); weights, EMA and the
            diffusion math keep their precision.
        float8_layers: which of a block's linears run in float8: qkv, proj, fc1, fc2 (SwiGLU's w12, w3;
            cross-attention's q, kv).
    """

    def __init__(
        self,
        model: DiT,
        optimizer: partial,
        diffusion: dict,
        objective: Objective,
        sampler: Sampler,
        sampling: dict,
        init_from: str | None = None,
        compile: bool | str = "auto",
        float8: str | None = None,
        float8_layers: tuple[str, ...] = FLOAT8_LAYERS,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "optimizer", "objective", "sampler"])
        self.model = model
        if init_from:
            try:
                self.model.load_state_dict(backbone_state_dict(load_weights_file(init_from)))
            except UsageError as err:
                raise UsageError(f"module.init_from={init_from}: {err}") from None
        self.optimizer_factory = optimizer
        # The process training runs on, and what a sampler needs to know of it (checkpoints record it).
        self.diffusion = objective.process(diffusion)
        self.diffusion_options = objective.process_options(diffusion)
        self.objective = objective
        # Trainable parts of the objective (REPA's projector): trained, averaged and checkpointed
        # with the model, never exported with it.
        self.objective_modules = objective.build_modules(model)
        self.sampler = sampler
        # Refused now, not at the first grid: a sampler of the other kind of process, bad guidance.
        sampler.process(self.diffusion_options)
        if float8:
            check_float8(float8, float8_layers)
        if type(compile) not in (bool, str) or compile not in COMPILE_CHOICES:  # 1 == True: not a mode
            raise UsageError(f"module.compile={compile!r}; use one of {', '.join(map(str, COMPILE_CHOICES))}")
        check_guidance(sampling["guidance"], sampling.get("guidance_interval", (0.0, 1.0)), "module.sampling")
        self.run_config = None  # the full run config; train.py sets it, checkpoints keep it
        self.run_manifest = None  # the run's id, config hash and code version (train.py), kept in checkpoints
        self._grid = []
        self._compiled = False
        self._float8_layers = []  # the linears converted to float8 (setup)

    def check_data(self, datamodule) -> None:
        """An objective that aligns to encoder features (REPA) gets data that carry them, of a shape
        it can align (train.py calls this before anything is written; `setup` again, once the shards'
        meta.json has been read)."""
        features = getattr(datamodule, "features", None)  # None: no LatentDataModule (dit.benchmark's batches)
        if self.objective.needs_features and features is False:
            raise UsageError(
                "the objective aligns to encoder features, but the data carry none: set data.features=true on "
                "shards extracted with python -m dit.extract --repa-encoder"
            )
        if features and getattr(datamodule, "feature_shape", None) is not None:
            self.objective.check_features(datamodule.feature_shape, self.model)

    def setup(self, stage):
        if stage == "fit":
            self.check_data(self.trainer.datamodule)
        if stage != "fit" or self._compiled:  # Lightning calls setup for each fit/validate/test
            return
        if self.hparams.float8 and not self._float8_layers:
            # Before compiling, so the compiled graphs hold the float8 casts (fused into their producers).
            check_float8_device(self.hparams.float8, self.trainer.strategy.root_device)
            self._float8_layers = convert_blocks_to_float8(self.model, self.hparams.float8, self.hparams.float8_layers)
        compile = self.hparams.compile
        if getattr(self.trainer.strategy, "shards_model", False):
            # Under FSDP the blocks are compiled one by one as they are sharded (configure_model).
            fsdp_compile_mode(compile, self.trainer.strategy.root_device.type)  # a bad mode: one line, now
            return
        if compile == "auto":
            compile = CUDA_COMPILE_MODE if self.trainer.strategy.root_device.type == "cuda" else False
        if compile:
            mode = None if compile is True else compile
            # The sampler (sample grids, FID) calls the backbone alone; in place, so state-dict
            # keys stay those of the official layout.
            self.model.compile()
            # The training step compiles as one graph: backbone AND the loss around it, whose
            # dozens of small fp32 ops then fuse instead of each being a kernel launch.
            self._losses = torch.compile(self._losses, mode=mode)
            self._compiled = True

    def configure_model(self):
        """Shard the backbone where the strategy shards (trainer=fsdp: dit.training.fsdp); a no-op
        under every other strategy. Lightning calls this after `setup`, before the optimizer."""
        strategy = self.trainer.strategy
        if not getattr(strategy, "shards_model", False) or self._compiled:
            return
        mode = fsdp_compile_mode(self.hparams.compile, strategy.root_device.type)
        strategy.shard(self.model, self.objective_modules, mode)
        self._compiled = True  # sharded (and compiled) once, whatever the number of fits

    # ------------------------------------------------------------------ training

    def training_step(self, batch, batch_idx):
        x, y, *features = batch  # data.features=true adds the encoder's patch features (REPA)
        t = self.objective.timesteps(x.shape[0], self.diffusion, x.device)
        terms = self._losses(x, t, y, *features)
        # Device tensors: Lightning reads them on the host only every log_every_n_steps. Not on the
        # progress bar: its values are read at every step, a host sync per step.
        for name, value in terms.items():
            self.log(f"train/{name}", value.mean())
        return terms["loss"].mean()

    def _losses(self, x, t, y, features=None):
        """Per-sample loss terms of the objective (one graph under `compile`)."""
        extras = {}
        if features is not None:
            extras["features"] = features
        if self.objective_modules is not None:
            extras["modules"] = self.objective_modules
        args = (self.model, self.diffusion, x, t, dict(y=y), torch.randn_like(x))
        return self.objective.losses(*args, extras=extras) if extras else self.objective.losses(*args)

    def check_optimizer(self):
        """One line for optimizer settings that torch refuses (betas=[2,3], betas=[0.9]), before a run starts."""
        try:
            self.optimizer_factory([torch.zeros(1, requires_grad=True)])
        except (ValueError, TypeError, IndexError) as err:
            raise UsageError(f"module.optimizer: {err}") from None

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]  # not the frozen pos_embed
        # Fused where the optimizer has it: one kernel for the whole update, on CUDA and on CPUs; it
        # can also skip an update on the device (callbacks/nonfinite_guard.py).
        has_fused = "fused" in inspect.signature(self.optimizer_factory.func).parameters
        if has_fused and "fused" not in self.optimizer_factory.keywords and self.device.type in ("cuda", "cpu"):
            return self.optimizer_factory(params, fused=True)
        return self.optimizer_factory(params)

    def on_train_start(self):
        # The optimizer's settings come from this run's config, also when a checkpoint restored
        # the optimizer's state (with the settings it was saved with): train.py refuses a resume
        # whose settings changed unless accept_changes=true, and then the new ones are in force.
        for group in self.trainer.optimizers[0].param_groups:
            for key, value in self.optimizer_factory.keywords.items():
                if key in group and key != "fused":
                    group[key] = tuple(value) if isinstance(value, list) else value

    def on_save_checkpoint(self, checkpoint):
        checkpoint["config"] = self.run_config
        checkpoint["manifest"] = self.run_manifest

    def on_load_checkpoint(self, checkpoint):
        # A checkpoint of a run with an EMA holds the average as `state_dict` and the trained
        # weights as `current_model_state` (Lightning's WeightAveraging); the callback puts the
        # trained weights back. Resumed without it (callbacks.ema removed), the run trains on from
        # the trained weights, as AdamW's moments do, not from the average. This hook runs before
        # Lightning loads `state_dict` into the model. (With no trainer, DiTModule.load_from_checkpoint,
        # `state_dict` stays the average: the weights to sample with.)
        trainer = self._trainer
        if trainer is not None and not any(isinstance(c, WeightAveraging) for c in trainer.callbacks):
            checkpoint["state_dict"] = checkpoint.get("current_model_state", checkpoint["state_dict"])
        theirs = backbone_state_dict(checkpoint)
        if describe_state_dict(theirs) != describe_state_dict(self.model.state_dict()):
            raise UsageError(
                f"the checkpoint holds {describe_state_dict(theirs)}, but this run builds "
                f"{describe_state_dict(self.model.state_dict())}; resume with the config it was trained with"
            )

    # ------------------------------------------------------------------ sample grids (EMA weights)

    def validation_step(self, batch, batch_idx):
        k, labels, index = batch
        s = self.hparams.sampling
        generator = batch_generator(s["seed"], int(k), self.device)
        z = draw(
            self.model,
            self.sampler,
            self.diffusion_options,
            labels,
            generator,
            s["guidance_scale"],
            s["guidance"],
            tuple(s.get("guidance_interval", (0.0, 1.0))),
        )
        self._grid.append((index.to(self.device), z))

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
        data = self.trainer.datamodule
        decoder = make_decoder(getattr(data, "pixels", False), getattr(data, "scale_factor", 1.0))
        images = ((decoder(z[order.to(z.device)]) + 1) / 2).clamp(0, 1)
        # One copy to the host: make_grid's per-image slices would each be a graph of their own on XLA.
        grid = make_grid(images.cpu(), nrow=data.hparams.samples_per_class)
        path = Path(self.trainer.default_root_dir) / "samples" / f"step_{self.global_step:07d}.png"
        save_png(grid, path)
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image("samples/grid", [str(path)], step=self.global_step)
