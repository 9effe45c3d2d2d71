"""Training objectives: what a training step minimises, given the diffusion process.

An objective draws the step's timesteps (`timesteps`) and returns the per-sample loss terms of a
batch (`losses`); DiTModule logs every term and minimises the mean of `loss`. Choose one in config:

    python train.py objective=hybrid     # the paper's: L_simple + L_vlb (conf/objective/hybrid.yaml)
    python train.py objective=eps_mse model.learn_sigma=false   # DDPM's L_simple alone

A new objective is a subclass and a YAML file (docs/extending.md).
"""

from __future__ import annotations

import math

import torch

from dit.diffusion.process import GaussianDiffusion, discretized_gaussian_log_likelihood, mean_flat, normal_kl
from dit.errors import UsageError


class Objective:
    """Base class: uniform timesteps over the process's steps (the paper's and IDDPM's draw)."""

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
    ) -> dict[str, torch.Tensor]:
        """Per-sample loss terms, each of shape (N,), `loss` among them."""
        raise NotImplementedError


class Hybrid(Objective):
    """L_simple + L_vlb of Improved DDPM (IDDPM §3.1; paper §3 "Diffusion formulation").

    `mse` is ‖ε - ε_θ‖² averaged over elements; `vb` is the variational-bound term in bits per
    dimension (KL to the posterior, the decoder NLL at t = 0) with the predicted mean detached, so
    it trains only the variance (learned sigma). With fixed sigma the loss is `mse` alone.
    """

    def losses(self, model, process, x_start, t, model_kwargs, noise):
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

    def losses(self, model, process, x_start, t, model_kwargs, noise):
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
