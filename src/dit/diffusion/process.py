"""The Gaussian diffusion process DiT trains and samples with: Improved DDPM (Nichol & Dhariwal,
2021) as the official code configures it (paper §3, "Diffusion formulation"; the official
diffusion/ package): the schedule, the forward process q, the posterior, and the model's
p(x_{t-1} | x_t) with one step of each sampler. The loss lives in dit.diffusion.objectives, the
loops in dit.diffusion.samplers.

Plain torch, no Lightning, so notebooks, the sampler and XLA share it. The official code's few lines
work the same here:

    diffusion = create_diffusion("250").to(device)        # 250 evenly spaced DDPM steps
    loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
    z = diffusion.p_sample_loop(guided(model, 4.0), shape, z, model_kwargs=dict(y=y), progress=True)

Schedule tensors are computed in float64 and kept as float32 buffers on the model's device (as the
official code casts them at use), created once. Loops carry the timestep as a device tensor and
hold no data-dependent shapes or host syncs, so the same code runs under torch.compile and XLA.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dit.errors import UsageError

#################################################################################
#                         Noise schedules and respacing                         #
#################################################################################


def beta_schedule(name: str, num_steps: int) -> torch.Tensor:
    """β_1..β_T in float64. "linear": 1e-4 → 0.02 over 1000 steps (DDPM; scaled for other T as in
    IDDPM); "cosine": IDDPM Eq. 17 with s = 0.008, β clipped at 0.999."""
    if name == "linear":
        scale = 1000 / num_steps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)
    if name == "cosine":

        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), 0.999) for i in range(num_steps)]
        return torch.tensor(betas, dtype=torch.float64)
    raise UsageError(f"unknown noise schedule {name!r}; choose 'linear' or 'cosine'")


def space_timesteps(num_steps: int, respacing: str | int | list[int] | None) -> list[int]:
    """The original timesteps kept by a respacing, sorted (IDDPM §4.1).

    "250": 250 steps spread evenly (fractional stride, rounded). "100,50,25": sections of the
    process, each split evenly into that many steps. "ddim50": a 50-step integer stride, as DDIM.
    A list of ints: exactly those steps. "" or None: all steps.
    """
    if respacing in ("", None):
        return list(range(num_steps))
    if isinstance(respacing, int) and not isinstance(respacing, bool):  # `steps=250` typed without quotes
        respacing = str(respacing)
    if isinstance(respacing, (list, tuple)):
        steps = sorted(set(int(s) for s in respacing))
        if not steps or steps[0] < 0 or steps[-1] >= num_steps:
            raise UsageError(f"explicit timesteps must lie in [0, {num_steps - 1}], got {respacing}")
        return steps
    hint = "use e.g. '250', 'ddim50', section counts '100,50,25', or a list of timesteps"
    if not isinstance(respacing, str):
        raise UsageError(f"cannot read timestep respacing {respacing!r}; {hint}")
    if respacing.startswith("ddim"):
        try:
            count = int(respacing[4:])
        except ValueError:
            raise UsageError(f"cannot read timestep respacing {respacing!r}; {hint}") from None
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == count:
                return list(range(0, num_steps, stride))
        raise UsageError(f"{respacing!r}: no integer stride gives exactly {count} of {num_steps} steps")
    try:
        counts = [int(c) for c in respacing.split(",")]
    except ValueError:
        raise UsageError(f"cannot read timestep respacing {respacing!r}; {hint}") from None
    size_per, extra = divmod(num_steps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise UsageError(f"respacing {respacing!r} asks for {count} steps in a section of {size} (of {num_steps})")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        steps += [start + round(k * stride) for k in range(count)]
        start += size
    return sorted(set(steps))


#################################################################################
#                      Gaussian helpers of the variational bound                #
#################################################################################


def mean_flat(x):
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of data in [-1, 1] quantised to 256 bins under N(means, e^(2·log_scales)) — the
    decoder term L_0 of DDPM §3.3, the edge bins taking the tails."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


#################################################################################
#                                The diffusion                                  #
#################################################################################


class GaussianDiffusion(nn.Module):
    """A discrete Gaussian diffusion over the kept timesteps of a base schedule.

    The model always sees the ORIGINAL timestep indices it was trained with (0..999):
    `timestep_map[k]` is the original index of the k-th kept step.
    """

    def __init__(
        self,
        betas,
        timestep_map=None,
        learn_sigma=True,
        sigma_small=False,
        predict_xstart=False,
        original_num_steps=None,
    ):
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64)
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        self.sigma_small = sigma_small
        self.predict_xstart = predict_xstart
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        alphas_cumprod_next = torch.cat([alphas_cumprod[1:], torch.zeros(1, dtype=torch.float64)])
        # q(x_{t-1} | x_t, x_0) (DDPM Eq. 6-7); its variance is 0 at t = 0, so the log is clipped
        # to the value at t = 1.
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        schedule = dict(
            betas=betas,
            log_betas=torch.log(betas),
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            alphas_cumprod_next=alphas_cumprod_next,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - alphas_cumprod).sqrt(),
            sqrt_recip_alphas_cumprod=(1.0 / alphas_cumprod).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1.0 / alphas_cumprod - 1).sqrt(),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            # "fixed large" variance: β_t, with the posterior's at t = 0 for a sensible decoder term.
            log_variance_fixed_large=torch.log(torch.cat([posterior_variance[1:2], betas[1:]])),
            posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
        )
        for name, value in schedule.items():
            self.register_buffer(name, value.float(), persistent=False)
        timestep_map = torch.arange(self.num_timesteps) if timestep_map is None else torch.as_tensor(timestep_map)
        self.register_buffer("timestep_map", timestep_map.long(), persistent=False)
        # The time of each kept step, its original index / the base schedule's length, on the host
        # (a guidance interval is decided there, with no device read).
        total = original_num_steps or int(timestep_map.max()) + 1
        self.step_times = (timestep_map.double() / total).tolist()

    def on_device(self, device):
        """Move the schedule to the data's device once (a no-op afterwards)."""
        if self.betas.device != device:
            self.to(device)

    @staticmethod
    def _at(coef, t, x):
        """coef[t] broadcast over the non-batch dims of x."""
        return coef[t].view(-1, *([1] * (x.ndim - 1)))

    # ------------------------------------------------------------------ forward process and posterior

    def q_sample(self, x_start, t, noise):
        """x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε (DDPM Eq. 4)."""
        self.on_device(x_start.device)
        return (
            self._at(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self._at(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) (DDPM Eq. 6-7)."""
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x_start + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_variance, t, x_t), self._at(self.posterior_log_variance_clipped, t, x_t)

    def predict_xstart_from_eps(self, x_t, t, eps):
        return (
            self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart) / self._at(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    # ------------------------------------------------------------------ the model's p(x_{t-1} | x_t)

    def p_mean_variance(self, model, x, t, clip_denoised=False, model_kwargs=None, model_output=None):
        """Mean, variance, log variance of p(x_{t-1} | x_t) and the predicted x_0.

        With learned sigma the model's second half of channels is v ∈ [-1, 1] and the log variance
        interpolates between the posterior's and β_t: IDDPM Eq. 15, the "learned range".
        """
        self.on_device(x.device)
        if model_output is None:
            model_output = model(x, self.timestep_map[t], **(model_kwargs or {}))
        prediction, v = self.split_output(model_output, x)
        if self.learn_sigma:
            min_log = self._at(self.posterior_log_variance_clipped, t, x)
            max_log = self._at(self.log_betas, t, x)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        elif self.sigma_small:
            log_variance = self._at(self.posterior_log_variance_clipped, t, x).expand_as(x)
        else:
            log_variance = self._at(self.log_variance_fixed_large, t, x).expand_as(x)
        pred_xstart = prediction if self.predict_xstart else self.predict_xstart_from_eps(x, t, prediction)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return dict(mean=mean, variance=torch.exp(log_variance), log_variance=log_variance, pred_xstart=pred_xstart)

    def split_output(self, model_output, x):
        """(ε or x_0 prediction, v or None), after checking the channel count fits learn_sigma."""
        C = x.shape[1]
        want = 2 * C if self.learn_sigma else C
        if model_output.shape[1] != want:
            kind = "learned sigma (ε and v)" if self.learn_sigma else "fixed sigma (ε only)"
            raise UsageError(
                f"the diffusion expects {want} output channels for {C}-channel inputs with {kind}, but the model "
                f"gave {model_output.shape[1]}; match learn_sigma between the model and create_diffusion"
            )
        return model_output.split(C, dim=1) if self.learn_sigma else (model_output, None)

    # ------------------------------------------------------------------ training loss

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """The official call for the paper's loss: `Hybrid().losses(...)` (dit.diffusion.objectives),
        per-sample dict(loss, mse, vb)."""
        from dit.diffusion.objectives import Hybrid

        if noise is None:
            noise = torch.randn_like(x_start)
        return Hybrid().losses(model, self, x_start, t, model_kwargs, noise)

    # ------------------------------------------------------------------ samplers

    def p_sample(self, model, x, t, clip_denoised=False, model_kwargs=None, noise=None, generator=None):
        """One ancestral DDPM step x_t -> x_{t-1} (no noise added at t = 0)."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return dict(
            sample=out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise, pred_xstart=out["pred_xstart"]
        )

    def ddim_sample(self, model, x, t, clip_denoised=False, model_kwargs=None, eta=0.0, noise=None, generator=None):
        """One DDIM step (Song et al. 2021, Eq. 12); η = 0 is deterministic, η = 1 is DDPM-like."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._at(self.alphas_cumprod, t, x)
        alpha_bar_prev = self._at(self.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        if eta == 0:
            return dict(sample=mean, pred_xstart=out["pred_xstart"])
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return dict(sample=mean + nonzero * sigma * noise, pred_xstart=out["pred_xstart"])

    def ddim_reverse_sample(self, model, x, t, clip_denoised=False, model_kwargs=None):
        """One deterministic DDIM inversion step x_t -> x_{t+1} (η = 0)."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._at(self.alphas_cumprod_next, t, x)
        return dict(sample=out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps)

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=False,
        model_kwargs=None,
        device=None,
        progress=False,
        generator=None,
    ):
        """Ancestral sampling from x_T = noise down to x_0 (the official loop; the paper's 250-step
        protocol with create_diffusion("250") and clip_denoised=False): dit.diffusion.samplers.DDPM."""
        from dit.diffusion.samplers import DDPM

        x = _start(shape, noise, device, generator)
        return DDPM(clip_denoised=clip_denoised).loop(self, model, x, model_kwargs, generator, progress)

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=False,
        model_kwargs=None,
        device=None,
        progress=False,
        generator=None,
        eta=0.0,
    ):
        """DDIM sampling (the official loop): dit.diffusion.samplers.DDIM."""
        from dit.diffusion.samplers import DDIM

        x = _start(shape, noise, device, generator)
        return DDIM(eta=eta, clip_denoised=clip_denoised).loop(self, model, x, model_kwargs, generator, progress)


def _start(shape, noise, device, generator):
    """x_T of the official loops' signature: `noise`, or a draw of `shape`."""
    if noise is not None:
        return noise
    if device is None:
        device = generator.device if generator is not None else "cpu"
    return torch.randn(*shape, generator=generator, device=device)


def create_diffusion(
    timestep_respacing: str | list[int] = "",
    noise_schedule: str = "linear",
    learn_sigma: bool = True,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    diffusion_steps: int = 1000,
) -> GaussianDiffusion:
    """The official factory: the paper's diffusion is `create_diffusion("")` for training (1000
    steps, linear β, learned range) and `create_diffusion("250")` for sampling."""
    betas = beta_schedule(noise_schedule, diffusion_steps)
    kept = space_timesteps(diffusion_steps, timestep_respacing)
    if len(kept) < 2:  # the variance tables take step 0's value from step 1's (as the official code)
        raise UsageError(
            f"timestep respacing {timestep_respacing!r} keeps {len(kept)} step; a sampler needs at least 2"
        )
    # Respacing keeps ᾱ at the kept steps and derives new β's from them (IDDPM §4.1).
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)[kept]
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return GaussianDiffusion(
        1 - alphas_cumprod / previous,
        kept,
        learn_sigma,
        sigma_small,
        predict_xstart,
        original_num_steps=diffusion_steps,
    )
