"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models" = EDM2, §3 and Appendix C): two power-function EMAs of the live weights, tracked through
the run and saved every `snapshot_every` steps, from which `python -m dit.posthoc_ema` rebuilds
the EMA of any other length after training (dit.tools.posthoc_ema).

A power-function EMA at training time t weighs the weights of step τ by p_t(τ) ∝ τ^γ (EDM2 Eq. 121):
unlike a fixed decay, its length grows with the run, and its width relative to the run's length is
σ_rel (Eq. 123). It is tracked by the update θ̂_t = β_t θ̂_{t-1} + (1 - β_t) θ_t with
β_t = (1 - 1/t)^(γ+1) (Eq. 127; training/phema.py `power_function_beta` with t in images and Δt a
batch; here t is in optimizer steps and Δt = 1, the same profile on another time unit). Unrolled,
step τ ends up with the weight (τ^(γ+1) - (τ-1)^(γ+1)) / t^(γ+1): the integral of the continuous
profile over (τ-1, τ], so the discrete average *is* the profile the reconstruction assumes.

The update never reads a device value on the host: β_t is a Python float of the host's step
count, and the averages move by one foreach lerp per (device, dtype) group, as the EMA callback
(callbacks/ema.py). Only a snapshot copies the averages to the host (every `snapshot_every` steps).
Measured on an H200 for DiT-XL/2 (675M parameters): the two profiles' update is 4.2 ms of GPU time
a step (16 GB moved, at the memory's bandwidth) and 0.5 ms of host time, with no host sync under
torch.cuda.set_sync_debug_mode("error"); a snapshot of one profile is 1.1 s to the host and 3.2 s
to write its 2.7 GB.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from dit.errors import UsageError
from dit.training.checkpoints import AtomicCheckpointIO

# EDM2's two tracked profiles (§3.2; training/phema.py PowerFunctionEMA's stds=[0.050, 0.100]).
DEFAULT_SIGMA_RELS = (0.05, 0.10)
# σ_rel of γ = 0, a plain average of the whole run (Eq. 123 at γ = 0: sqrt(1/12)); every γ > 0 is
# narrower. EDM2's reconstruct_phema.py accepts σ_rel in (0, 0.289) for the same reason.
MAX_SIGMA_REL = 12**-0.5
SNAPSHOT_FOLDER = "phema"  # under the run folder (trainer.default_root_dir)
SNAPSHOT_KIND = "phema_snapshot"  # manifest["kind"] of a snapshot file


def gamma_to_sigma_rel(gamma: float) -> float:
    """σ_rel of the power-function profile of exponent γ (EDM2 Eq. 123; phema.py `exp_to_std`)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent γ of relative width σ_rel: Eq. 123 squared and inverted is the cubic
    γ³ + 7γ² + (16 - σ⁻²)γ + (12 - σ⁻²) = 0 (Eq. 126, Algorithm 2), whose largest real root is
    the γ ≥ 0 of the profile (phema.py `std_to_exp` takes the same root)."""
    check_sigma_rel(sigma_rel, "sigma_rel")
    inv = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def check_sigma_rel(value: float, name: str) -> float:
    """A σ_rel the power function can have, else a UsageError that names `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < MAX_SIGMA_REL:
        raise UsageError(
            f"{name}={value!r}: a relative EMA width must be a number in (0, {MAX_SIGMA_REL:.4f}) "
            f"(EDM2's 0.05 and 0.10; {MAX_SIGMA_REL:.4f} = 1/sqrt(12) would be a plain average of the whole run)"
        )
    return float(value)


def power_beta(step: int, gamma: float) -> float:
    """β_t = (1 - 1/t)^(γ+1) of step t = 1, 2, ... (EDM2 Eq. 127). β_1 = 0: the first update
    replaces the average by the weights, so what the average started from never counts."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


class PowerEMA:
    """Power-function EMAs of one set of tensors, one average per σ_rel, without Lightning: the
    state of `PostHocEMA`, and what the tests drive on a plain vector. The averages are fp32
    copies on each tensor's device, whatever the tensors' own dtype."""

    def __init__(self, sigma_rels: list[float] | tuple[float, ...], tensors: dict[str, torch.Tensor]):
        self.sigma_rels = [check_sigma_rel(s, "sigma_rels") for s in sigma_rels]
        if len({f"{s:.3f}" for s in self.sigma_rels}) != len(self.sigma_rels):
            raise UsageError(f"sigma_rels={self.sigma_rels}: give distinct values (they name the snapshot files)")
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.names = list(tensors)
        self.averages = [[t.detach().to(torch.float32, copy=True) for t in tensors.values()] for _ in self.sigma_rels]
        self.step = 0  # the t of the last update
        self.since = 0  # the step tracking began at: 0 unless added to a run under way
        self._live_source, self._live_groups = None, None

    @torch.no_grad()
    def update(self, live: list[torch.Tensor], step: int) -> None:
        """Move every average to `live` (the tensors, in the order of `names`) for step `step` ≥ 1."""
        for gamma, (mine, theirs) in zip(self.gammas, self._grouped(live)):
            lerp = get_ema_multi_avg_fn(power_beta(step, gamma))  # torch's public foreach lerp, weight 1 - β
            for a, t in zip(mine, theirs):
                lerp(a, t, None)
        self.step = step

    def _grouped(self, live: list[torch.Tensor]) -> list[tuple[list, list]]:
        """Per profile, (its averages, the live tensors) in lists of one device and dtype each, as
        foreach kernels take them. Built once for a list of live tensors that need no cast (the
        callback passes the same list every step), so a step does no Python work per tensor; live
        tensors of another dtype or device (bf16-true weights) are cast each step."""
        if live is self._live_source:
            return self._live_groups
        cast = any(t.dtype != torch.float32 or t.device != a.device for t, a in zip(live, self.averages[0]))
        groups = defaultdict(list)  # foreach kernels take one device and dtype, as in torch's optimizers
        for i, a in enumerate(self.averages[0]):
            groups[a.device, a.dtype].append(i)
        theirs = [[live[i].detach().to(self.averages[0][i].device, torch.float32) for i in g] for g in groups.values()]
        result = [([[averages[i] for i in g] for g in groups.values()], theirs) for averages in self.averages]
        if not cast:  # the lists hold the live tensors themselves, which the optimizer updates in place
            self._live_source, self._live_groups = live, result
        return result

    def state_dict(self) -> dict:
        return dict(
            sigma_rels=list(self.sigma_rels),
            gammas=list(self.gammas),
            names=list(self.names),
            step=self.step,
            since=self.since,
            averages=[list(a) for a in self.averages],
        )

    def load_state_dict(self, state: dict, where: str = "the checkpoint") -> None:
        """The averages of a checkpoint, copied onto this object's tensors (their devices)."""
        theirs = [float(s) for s in state["sigma_rels"]]
        if len(theirs) != len(self.sigma_rels) or not np.allclose(theirs, self.sigma_rels, rtol=0, atol=1e-12):
            raise UsageError(
                f"callbacks.posthoc_ema.sigma_rels={self.sigma_rels}, but {where} tracks {theirs}: a profile "
                f"cannot change mid-run; resume with callbacks.posthoc_ema.sigma_rels=[{','.join(map(str, theirs))}]"
            )
        if list(state["names"]) != self.names:
            raise UsageError(
                f"{where} averages other weights than this model's ({len(state['names'])} tensors, "
                f"{len(self.names)} here); resume with the model config it was trained with"
            )
        with torch.no_grad():
            for mine, saved in zip(self.averages, state["averages"]):
                for a, s in zip(mine, saved):
                    a.copy_(s)
        self.step, self.since = int(state["step"]), int(state["since"])


def averaged_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a post-hoc EMA averages: the trained ones (floating point, requires_grad). The
    rest (DiT's frozen sin-cos pos_embed, any buffer) is copied from the live model into each
    snapshot, as EDM2's PowerFunctionEMA.get copies the buffers."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()}


class PostHocEMA(Callback):
    """Tracks power-function EMAs of `pl_module.model`'s live weights, one per `sigma_rels` entry
    (EDM2's 0.05 and 0.10), updated after every optimizer step (inside it: torch's step
    post-hook; with gradient accumulation, once per accumulated step), and saves each one every
    `snapshot_every` steps (and at the run's last step, trainer.max_steps) as
    `<run folder>/phema/phema-<step:07d>-<sigma_rel:.3f>.pt`: {"ema": the model's state dict in
    fp32 on the CPU, "config": the run's config (as its checkpoints keep it),
    "manifest": {"kind": "phema_snapshot", "step", "sigma_rel", "gamma", "since", "averaged", "run"}}. A
    snapshot loads with `DiT.from_state_dict` as it is; `python -m dit.posthoc_ema` combines them
    into the EMA of another σ_rel.

    The averages and their step are in Lightning's checkpoints (this callback's state), so a
    resumed run continues the same profiles bit for bit. Global rank 0 writes the snapshots; every
    rank keeps the averages (the same weights on each, like the EMA callback), so any rank's
    checkpoint holds them.

    Reconstruction quality depends on the number of snapshots, not on their spacing in steps (the
    profiles are self-similar): aim for >= 40 snapshots per profile over the run (the default
    10000 gives 40 over the paper's 400K steps; tests/training/test_posthoc_ema.py measures the
    error); each costs 4 bytes per parameter per profile on disk (DiT-XL/2: 2.7 GB).

    Updates the non-finite guard skips (callbacks/nonfinite_guard.py) still count as steps here:
    the live weights did not move, so the average takes in the same weights again. That is the
    profile over the run's time axis the reconstruction assumes; leaving the step out would not
    be (and on the fused path the guard only knows on the device which steps it skipped).
    """

    def __init__(
        self,
        sigma_rels: list[float] | tuple[float, ...] = DEFAULT_SIGMA_RELS,
        snapshot_every: int = 10000,
        folder: str = SNAPSHOT_FOLDER,
    ):
        if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or snapshot_every < 1:
            raise UsageError(f"callbacks.posthoc_ema.snapshot_every={snapshot_every!r}: give a number of steps >= 1")
        if not sigma_rels:
            raise UsageError("callbacks.posthoc_ema.sigma_rels is empty: give at least one, e.g. [0.05, 0.10]")
        self.sigma_rels = [check_sigma_rel(s, "callbacks.posthoc_ema.sigma_rels") for s in sigma_rels]
        self.snapshot_every = snapshot_every
        self.folder = folder
        self.ema: PowerEMA | None = None
        self._live: list[torch.Tensor] = []
        self._pending: dict | None = None  # a checkpoint's state, until the model is on its device
        self._trainer = None
        self._hooks: list = []
        self._snapshot_step = 0  # the step of the last snapshots written

    def on_train_start(self, trainer, pl_module):
        # Here rather than in setup: Lightning restores callback states after setup, and the
        # model is on its device only now.
        tensors = averaged_tensors(pl_module.model)
        self._live = list(tensors.values())
        if self.ema is None or self.ema.names != list(tensors):
            self.ema = PowerEMA(self.sigma_rels, tensors)
        if self._pending is not None:
            self.ema.load_state_dict(self._pending)
            self._pending = None
        elif self.ema.step == 0 and trainer.global_step > 0:
            # A run resumed with this callback added: t stays the run's step (the profile's time
            # axis starts at the run's start), and the steps before count as this step's weights.
            self.ema.step = self.ema.since = trainer.global_step
            rank_zero_warn(
                f"post-hoc EMA starts at step {trainer.global_step} of a run under way: its profiles take the weights "
                "before as those of this step, so reconstructions are approximate; add it from step 0 for exact ones"
            )
        self._snapshot_step = self.ema.step
        restored = self.ema.step > self.ema.since
        if restored and self.ema.step % self.snapshot_every == 0 and not self._snapshots_exist(trainer, self.ema.step):
            # The launch that saved this step was killed between its checkpoint and its snapshots
            # (both are written in on_train_batch_end): the restored state is that step's, exactly.
            self.save_snapshots(trainer, pl_module)
        self._trainer = trainer
        # The update runs inside optimizer.step (torch's public step post-hook), not in
        # on_train_batch_end: StopCheckpoint saves last.ckpt in its own on_train_batch_end, which
        # Lightning may call before this callback's, and a checkpoint that missed its step's update
        # would resume one step behind (a resumed run's profiles would not be the same).
        self._hooks = [opt.register_step_post_hook(self._after_optimizer_step) for opt in trainer.optimizers]

    def _after_optimizer_step(self, optimizer, args, kwargs):
        # Lightning counts the step once optimizer.step returns: this is step global_step + 1.
        step = self._trainer.global_step + 1
        if step > self.ema.step:  # once per step, were there several optimizers
            self.ema.update(self._live, step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = self.ema.step if self.ema is not None else 0
        if step <= self._snapshot_step:  # no new step (accumulating gradients), or saved already
            return
        if step % self.snapshot_every == 0 or 0 < trainer.max_steps <= step:
            self.save_snapshots(trainer, pl_module)
            self._snapshot_step = step

    def on_train_end(self, trainer, pl_module):
        self._remove_hooks()

    def on_exception(self, trainer, pl_module, exception):
        self._remove_hooks()

    def _remove_hooks(self):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _snapshots_exist(self, trainer, step: int) -> bool:
        folder = Path(trainer.default_root_dir) / self.folder
        return all((folder / snapshot_name(step, s)).is_file() for s in self.ema.sigma_rels)

    def save_snapshots(self, trainer, pl_module) -> list[Path]:
        """Write one snapshot per profile of the current step (global rank 0 only)."""
        if not trainer.is_global_zero:
            return []
        folder = Path(trainer.default_root_dir) / self.folder
        config = getattr(pl_module, "run_config", None)  # train.py's, as its checkpoints keep it
        live = pl_module.model.state_dict()
        paths = []
        for sigma_rel, gamma, averages in zip(self.ema.sigma_rels, self.ema.gammas, self.ema.averages):
            averaged = dict(zip(self.ema.names, averages))
            state = {k: to_host_fp32(averaged.get(k, v)) for k, v in live.items()}
            snapshot = dict(
                ema=state,
                config=config,
                manifest=dict(
                    kind=SNAPSHOT_KIND,
                    step=self.ema.step,
                    sigma_rel=sigma_rel,
                    gamma=gamma,
                    since=self.ema.since,
                    averaged=self.ema.names,  # the rest of "ema" is the live model's, as it is
                    run=getattr(pl_module, "run_manifest", None),
                ),
            )
            path = folder / snapshot_name(self.ema.step, sigma_rel)
            AtomicCheckpointIO().save_checkpoint(snapshot, path)  # whole or not at all: a rerun rewrites it
            paths.append(path)
        return paths

    def state_dict(self):
        if self._pending is not None:  # restored, not yet started: keep it as it came
            return self._pending
        return self.ema.state_dict() if self.ema is not None else {}

    def load_state_dict(self, state_dict):
        self._pending = state_dict


def snapshot_name(step: int, sigma_rel: float) -> str:
    """phema-<step>-<σ_rel>.pt, as EDM2's network-snapshot-<kimg>-<std>.pkl."""
    return f"phema-{step:07d}-{sigma_rel:.3f}.pt"


def to_host_fp32(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return tensor.to("cpu", torch.float32, copy=True) if tensor.is_floating_point() else tensor.to("cpu", copy=True)
