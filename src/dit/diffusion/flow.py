"""Flow matching over stochastic interpolants (SiT: Ma et al. 2024, §2-3): the process of the
flow objective and of its ODE and SDE samplers.

Time runs from the data to the noise: x_t = α_t·x_0 + σ_t·ε with t ∈ [0, 1], x_0 the data at t = 0
and ε ~ N(0, I) at t = 1 (REPA's convention and the DDPM timesteps' direction; SiT's own t runs the
other way, t_SiT = 1 - t). The network is given t itself, as REPA's SiT models are.

The interpolant's velocity is v = dx_t/dt = α'_t·x_0 + σ'_t·ε; the model may predict v, ε or the
score s = ∇ log p_t(x_t) = -E[ε | x_t] / σ_t (SiT §3.1), and `FlowProcess` converts any of them to
the others.
"""

from __future__ import annotations

import math

import torch

from dit.diffusion.process import create_diffusion
from dit.errors import UsageError

PREDICTIONS = ("velocity", "noise", "score")
# SiT's margins (transport.Transport's train_eps, sample_eps): where a conversion divides by α_t or
# σ_t, time stays this far from the end where that coefficient is 0.
TRAIN_EPS, SAMPLE_EPS = 1e-5, 1e-3


class Path:
    """An interpolant x_t = α_t x_0 + σ_t ε (SiT §2.1): `coefficients(t)` = (α, σ, α', σ')."""

    name = ""

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class Linear(Path):
    """α_t = 1 - t, σ_t = t: the straight line of rectified flow (SiT "Linear", its default)."""

    name = "linear"

    def coefficients(self, t):
        one = torch.ones_like(t)
        return 1 - t, t, -one, one


class GVP(Path):
    """α_t = cos(πt/2), σ_t = sin(πt/2): variance preserving at every t, α² + σ² = 1 (SiT "GVP")."""

    name = "gvp"

    def coefficients(self, t):
        angle = 0.5 * math.pi * t
        return torch.cos(angle), torch.sin(angle), -0.5 * math.pi * torch.sin(angle), 0.5 * math.pi * torch.cos(angle)


class VP(Path):
    """The VP SDE's marginal (Song et al. 2021, Eq. 29), β linear from 0.1 to 20 (SiT "VP"):
    log α_t = -¼t²(β_max - β_min) - ½tβ_min, σ_t = √(1 - α_t²). σ_0 = 0, so its data end needs
    the margin SAMPLE_EPS (σ' divides by σ)."""

    name = "vp"
    beta_min, beta_max = 0.1, 20.0

    def coefficients(self, t):
        log_alpha = -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        alpha = torch.exp(log_alpha)
        d_alpha = alpha * (-0.5 * t * (self.beta_max - self.beta_min) - 0.5 * self.beta_min)
        sigma = torch.sqrt(1 - alpha**2)
        return alpha, sigma, d_alpha, -alpha * d_alpha / sigma


PATHS = {path.name: path for path in (Linear, GVP, VP)}


class FlowProcess:
    """The interpolant `path` and what the network predicts along it (`prediction`: velocity,
    noise or score), with the conversions every sampler and the objective need."""

    def __init__(self, path: str = "linear", prediction: str = "velocity"):
        if path not in PATHS:
            raise UsageError(f"unknown path {path!r}; choose one of {', '.join(PATHS)}")
        if prediction not in PREDICTIONS:
            raise UsageError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        self.path = PATHS[path]()
        self.prediction = prediction

    def options(self) -> dict:
        """What a sampler needs to know of this process (checkpoints record it)."""
        return {"path": self.path.name, "prediction": self.prediction}

    def time_range(self, eps: float) -> tuple[float, float]:
        """(data end, noise end) of the times where this process is evaluated (SiT's
        Transport.check_interval): velocity on the linear and GVP paths is defined on all of
        [0, 1]; the VP path's σ' is 0/0 at t = 0; the ε and score conversions divide by α_t,
        which is 0 at t = 1 on the linear and GVP paths, and by σ_t, 0 at t = 0."""
        low = eps if self.path.name == "vp" or self.prediction != "velocity" else 0.0
        high = 1 - eps if self.prediction != "velocity" and self.path.name != "vp" else 1.0
        return low, high

    def output(self, model, x_t: torch.Tensor, t: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        """The network's prediction at (x_t, t): its first C channels (a model built with
        learn_sigma has 2C outputs; the second half is unused, as in SiT's models.py)."""
        return model(x_t, t, **model_kwargs)[:, : x_t.shape[1]]

    def coefficients(self, t: torch.Tensor, x: torch.Tensor):
        """α, σ, α', σ' at times t (N,), shaped to broadcast against x (N, ...)."""
        shape = (-1,) + (1,) * (x.ndim - 1)
        dtype = torch.promote_types(x.dtype, torch.float32)  # float32 at least, also under bf16 autocast
        return tuple(c.reshape(shape) for c in self.path.coefficients(t.to(dtype)))

    def interpolate(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma, _, _ = self.coefficients(t, x0)
        return alpha * x0 + sigma * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output at x_t: v = α' x_0 + σ' ε, ε, or the score -ε/σ."""
        alpha, sigma, d_alpha, d_sigma = self.coefficients(t, x0)
        if self.prediction == "velocity":
            return d_alpha * x0 + d_sigma * noise
        if self.prediction == "noise":
            return noise
        return -noise / sigma

    def noise_and_data(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """(ε̂, x̂_0) implied by the network's output at (x_t, t): the solution of
        x_t = α x_0 + σ ε with the predicted v = α' x_0 + σ' ε, or the predicted ε (or -σ·score)."""
        alpha, sigma, d_alpha, d_sigma = self.coefficients(t, x_t)
        if self.prediction == "velocity":
            det = alpha * d_sigma - sigma * d_alpha
            return (alpha * output - d_alpha * x_t) / det, (d_sigma * x_t - sigma * output) / det
        eps = output if self.prediction == "noise" else -sigma * output
        return eps, (x_t - sigma * eps) / alpha

    def velocity(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """dx_t/dt of the probability-flow ODE at (x_t, t) from the network's output."""
        if self.prediction == "velocity":
            return output
        _, _, d_alpha, d_sigma = self.coefficients(t, x_t)
        eps, x0 = self.noise_and_data(output, x_t, t)
        return d_alpha * x0 + d_sigma * eps

    def score(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """∇ log p_t(x_t) = -ε̂/σ_t from the network's output."""
        if self.prediction == "score":
            return output
        sigma = self.coefficients(t, x_t)[1]
        return -self.noise_and_data(output, x_t, t)[0] / sigma


def shift_time(t, shift: float):
    """The timestep shift of SD3 (Esser et al. 2024, Eq. 23), t -> s·t / (1 + (s - 1)·t): s > 1
    moves times toward the noise end, as higher resolutions need (more pixels keep more signal at
    the same noise level); s = 1 is the identity."""
    return t if shift == 1 else shift * t / (1 + (shift - 1) * t)


def make_process(options: dict):
    """The process a model was trained with, from its options: a flow's `path` and `prediction`
    (FlowProcess.options) or `create_diffusion`'s keywords (the Gaussian diffusion)."""
    return FlowProcess(**options) if is_flow(options) else create_diffusion(**options)


def is_flow(options: dict) -> bool:
    return "path" in options
