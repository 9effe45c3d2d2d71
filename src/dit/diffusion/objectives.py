"""Training objectives: what a training step minimises, given the diffusion process.

An objective draws the step's timesteps (`timesteps`) and returns the per-sample loss terms of a
batch (`losses`); DiTModule logs every term and minimises the mean of `loss`. Choose one in config:

    python train.py objective=hybrid     # the paper's: L_simple + L_vlb (conf/objective/hybrid.yaml)
    python train.py objective=eps_mse model.learn_sigma=false   # DDPM's L_simple alone
    python train.py objective=flow sampler=heun   # flow matching, SiT's linear path (conf/objective/flow.yaml)

A new objective is a subclass and a YAML file (docs/extending.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dit.diffusion.flow import TRAIN_EPS, FlowProcess, shift_time
from dit.diffusion.process import (
    GaussianDiffusion,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from dit.errors import UsageError, number

TIME_SAMPLINGS = ("uniform", "lognormal")


class Objective:
    """Base class: the Gaussian diffusion of `module.diffusion`, uniform timesteps over its steps
    (the paper's and IDDPM's draw)."""

    def process(self, diffusion: dict):
        """The process training runs on, from `module.diffusion` (create_diffusion's keywords)."""
        return create_diffusion(**diffusion)

    def process_options(self, diffusion: dict) -> dict:
        """What a sampler needs to rebuild this process (checkpoints record it): `make_process`'s input."""
        return {k: v for k, v in diffusion.items() if k != "timestep_respacing"}

    needs_features = False  # whether the batches must carry encoder features (REPA)

    def check_features(self, shape: tuple[int, int], model) -> None:
        """Refuse features of `shape` (tokens, width) that this objective cannot use; none are used here."""

    def build_modules(self, model) -> nn.Module | None:
        """Trainable modules of the objective itself (REPA's projector), trained and checkpointed with
        the model (DiTModule.objective_modules) but not part of it; None for most objectives."""
        return None

    def timesteps(self, batch_size: int, process: GaussianDiffusion, device: torch.device) -> torch.Tensor:
        return torch.randint(0, process.num_timesteps, (batch_size,), device=device)

    def losses(
        self,
        model,
        process: GaussianDiffusion,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None,
        noise: torch.Tensor,
        extras: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample loss terms, each of shape (N,), `loss` among them. `extras` (given only when
        there are any) holds the batch's encoder `features` and the objective's `modules`."""
        raise NotImplementedError


class Hybrid(Objective):
    """L_simple + L_vlb of Improved DDPM (IDDPM §3.1; paper §3 "Diffusion formulation").

    `mse` is ‖ε - ε_θ‖² averaged over elements; `vb` is the variational-bound term in bits per
    dimension (KL to the posterior, the decoder NLL at t = 0) with the predicted mean detached, so
    it trains only the variance (learned sigma). With fixed sigma the loss is `mse` alone.
    """

    def losses(self, model, process, x_start, t, model_kwargs, noise, extras=None):
        process.on_device(x_start.device)
        x_t = process.q_sample(x_start, t, noise)
        model_output = model(x_t, process.timestep_map[t], **(model_kwargs or {}))
        prediction, v = process.split_output(model_output, x_t)
        terms = {}
        if process.learn_sigma:
            frozen = torch.cat([prediction.detach(), v], dim=1)
            terms["vb"] = variational_bound_bits(process, x_start, x_t, t, frozen)
        target = x_start if process.predict_xstart else noise
        terms["mse"] = mean_flat((target - prediction) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


class EpsilonMSE(Objective):
    """DDPM's L_simple (Ho et al. 2020, Eq. 14): ‖ε - ε_θ(x_t, t)‖², the variance fixed. A model
    with learned sigma would leave its variance channels untrained, so it is refused."""

    def losses(self, model, process, x_start, t, model_kwargs, noise, extras=None):
        if process.learn_sigma:
            raise UsageError(
                "objective=eps_mse trains only ε, so the model's learned variance would stay untrained; "
                "set model.learn_sigma=false (a fixed variance), or use objective=hybrid"
            )
        process.on_device(x_start.device)
        x_t = process.q_sample(x_start, t, noise)
        prediction = process.split_output(model(x_t, process.timestep_map[t], **(model_kwargs or {})), x_t)[0]
        mse = mean_flat((noise - prediction) ** 2)
        return {"loss": mse, "mse": mse}


def variational_bound_bits(process, x_start, x_t, t, model_output):
    """L_t = KL(q(x_{t-1}|x_t,x_0) ‖ p(x_{t-1}|x_t)) for t > 0, L_0 = -log p(x_0|x_1), in bits (DDPM §3.3)."""
    true_mean, _, true_log_var = process.q_posterior_mean_variance(x_start, x_t, t)
    out = process.p_mean_variance(None, x_t, t, model_output=model_output)
    kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
    return torch.where(t == 0, mean_flat(nll) / math.log(2.0), kl)


class FlowMatching(Objective):
    """Flow matching on a stochastic interpolant (SiT §2-3; conf/objective/flow.yaml): the network
    regresses the path's velocity (or ε, or the score) at x_t = α_t x_0 + σ_t ε, an unweighted
    mean squared error, as SiT's default. `module.diffusion` is not used.

    Args:
        path: linear (α = 1 - t, σ = t; SiT's and REPA's default), gvp or vp (flow.PATHS).
        prediction: velocity (default), noise, or score. The score's loss is ‖σ_t ŝ + ε‖², the
            score error weighted by σ_t² (SiT transport.py), which stays finite as σ_t -> 0.
        time_sampling: uniform t (SiT), or lognormal: t = sigmoid(n), n ~ N(mean, std²), the
            logit-normal of SD3 (Esser et al. 2024, §3.1) that LightningDiT trains with.
        lognormal_mean, lognormal_std: that normal's parameters (SD3: 0 and 1).
        shift: the timestep shift s applied to every drawn t (flow.shift_time; 1: none).
    """

    def __init__(
        self,
        path: str = "linear",
        prediction: str = "velocity",
        time_sampling: str = "uniform",
        lognormal_mean: float = 0.0,
        lognormal_std: float = 1.0,
        shift: float = 1.0,
    ):
        if time_sampling not in TIME_SAMPLINGS:
            raise UsageError(f"objective.time_sampling={time_sampling!r}; choose one of {', '.join(TIME_SAMPLINGS)}")
        shift = number("objective.shift", shift)
        lognormal_mean, lognormal_std = (
            number("objective.lognormal_mean", lognormal_mean),
            number("objective.lognormal_std", lognormal_std),
        )
        if not shift > 0:
            raise UsageError(f"objective.shift={shift}; the timestep shift must be positive (1: none)")
        self._process = FlowProcess(path, prediction)  # checks path and prediction
        self.path, self.prediction = path, prediction
        self.time_sampling = time_sampling
        self.lognormal_mean, self.lognormal_std = lognormal_mean, lognormal_std
        self.shift = shift

    def process(self, diffusion):
        return self._process

    def process_options(self, diffusion):
        return self._process.options()

    def timesteps(self, batch_size, process, device):
        if self.time_sampling == "uniform":
            u = torch.rand(batch_size, device=device)
        else:
            u = torch.sigmoid(self.lognormal_mean + self.lognormal_std * torch.randn(batch_size, device=device))
        low, high = process.time_range(TRAIN_EPS)
        return low + (high - low) * shift_time(u, self.shift)

    def losses(self, model, process, x_start, t, model_kwargs, noise, extras=None):
        x_t = process.interpolate(x_start, noise, t)
        mse = self.regression(process, process.output(model, x_t, t, model_kwargs or {}), x_start, noise, t)
        return {"loss": mse, "mse": mse}

    @staticmethod
    def regression(process, output, x_start, noise, t):
        """The per-sample squared error of the network's prediction (its first C channels)."""
        if process.prediction == "score":
            sigma = process.coefficients(t, x_start)[1]
            return mean_flat((sigma * output + noise) ** 2)
        return mean_flat((output - process.target(x_start, noise, t)) ** 2)


class REPA(FlowMatching):
    """Representation alignment (Yu et al. 2024, REPA §3, Eq. 8; conf/objective/repa.yaml): the flow
    objective plus `weight` (λ) times the negative cosine similarity between an MLP projection of
    the tokens after block `depth` and the patch features of a frozen vision encoder, averaged over
    the tokens. The features come with the batch (`data.features=true`: precomputed by
    `python -m dit.extract --repa-encoder`), so training never runs the encoder.

    Args:
        weight: λ (REPA: 0.5).
        depth: the block whose output tokens are aligned (REPA: 8 for SiT-XL/2, the 8th of 28).
        encoder_dim: the encoder's feature width (DINOv2 ViT-B/14: 768).
        projector_dim: the MLP's hidden width (REPA: 2048; 3 linears with SiLU, REPA models/sit.py build_mlp).
        flow: FlowMatching's settings (REPA: linear path, velocity, uniform t).
    """

    needs_features = True  # DiTModule.check_data refuses data without them before the first step

    def __init__(
        self,
        weight: float = 0.5,
        depth: int = 8,
        encoder_dim: int = 768,
        projector_dim: int = 2048,
        **flow,
    ):
        super().__init__(**flow)
        if depth < 1:
            raise UsageError(f"objective.depth={depth}; the aligned block is counted from 1")
        self.weight, self.depth = weight, depth
        self.encoder_dim, self.projector_dim = encoder_dim, projector_dim

    def build_modules(self, model):
        if self.depth > len(model.blocks):
            raise UsageError(
                f"objective.depth={self.depth}, but the model has {len(model.blocks)} blocks; "
                f"align a block between 1 and {len(model.blocks)}"
            )
        width = model.pos_embed.shape[-1]
        projector = nn.Sequential(
            nn.Linear(width, self.projector_dim),
            nn.SiLU(),
            nn.Linear(self.projector_dim, self.projector_dim),
            nn.SiLU(),
            nn.Linear(self.projector_dim, self.encoder_dim),
        )
        for layer in projector:  # as REPA's models/sit.py initialize_weights: Xavier-uniform, zero biases
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        return nn.ModuleDict({"projector": projector})

    def check_features(self, shape: tuple[int, int], model) -> None:
        """Features of `shape` (tokens, width) fit the model's token grid and `encoder_dim`."""
        tokens = (model.input_size // model.patch_size) ** 2
        if tuple(shape) != (tokens, self.encoder_dim):
            raise UsageError(
                f"objective=repa aligns {tokens} tokens to features of shape {tuple(shape)}, but needs {tokens} "
                f"tokens of width objective.encoder_dim={self.encoder_dim}: use a model whose token grid matches the "
                "encoder's patches (REPA: /2 models at 256 px, DINOv2 at 224) and the encoder's width"
            )

    def losses(self, model, process, x_start, t, model_kwargs, noise, extras=None):
        features = (extras or {}).get("features")
        if features is None:
            raise UsageError(
                "objective=repa aligns to encoder features, but the batches carry none: set data.features=true "
                "on shards extracted with python -m dit.extract --repa-encoder"
            )
        x_t = process.interpolate(x_start, noise, t)
        output, tokens = model(x_t, t, **(model_kwargs or {}), tokens_after=self.depth)
        mse = self.regression(process, output[:, : x_start.shape[1]], x_start, noise, t)
        self.check_features(tuple(features.shape[1:]), model)  # shapes only: free under compile
        projected = extras["modules"]["projector"](tokens)
        alignment = -(F.normalize(projected, dim=-1) * F.normalize(features.to(projected.dtype), dim=-1)).sum(-1)
        alignment = alignment.mean(dim=1)
        return {"loss": mse + self.weight * alignment, "mse": mse, "repa": alignment}
