"""Samplers of flow-matching models (objective=flow): they integrate from the noise at t = 1 to
the data at t = 0 along the model's velocity (SiT §2.3, §3.3).

    python train.py objective=flow sampler=heun sampler.steps=25   # ODE, 2 evaluations a step
    python -m dit.sample ckpt.pt out sampler=sde sampler.steps=250  # SDE, SiT's FID sampler
    python -m dit.sample ckpt.pt out sampler=dopri5                 # adaptive ODE (GPU / CPU)

Euler and Heun take a fixed grid of `steps` intervals, so every step runs the same graph
(torch.compile, XLA). `shift` spaces that grid with the timestep shift (flow.shift_time), more
steps near the noise for s > 1. dopri5 chooses its steps from a local error estimate (torchdiffeq).
"""

from __future__ import annotations

import math

import torch

from dit.diffusion.flow import SAMPLE_EPS, FlowProcess, is_flow, shift_time
from dit.diffusion.guidance import as_guidance
from dit.diffusion.samplers import Sampler, steps_bar
from dit.errors import UsageError, number
from dit.platform.xla_ops import end_step


def whole_steps(steps) -> int:
    if isinstance(steps, bool) or not str(steps).isdigit():
        raise UsageError(f"sampler.steps={steps!r}; a flow sampler takes a whole number of steps")
    return int(steps)


class FlowSampler(Sampler):
    """Base class: the fixed grid from t = 1 to the data end and the velocity of the model there.

    Args:
        steps: intervals of the time grid.
        shift: the timestep shift of the grid (1: evenly spaced).
    """

    def __init__(self, steps: int = 50, shift: float = 1.0):
        super().__init__(steps)
        steps = whole_steps(steps)
        if steps < 1:
            raise UsageError(f"sampler.steps={steps}; a flow sampler needs at least 1 step")
        shift = number("sampler.shift", shift)
        if not shift > 0:
            raise UsageError(f"sampler.shift={shift}; the timestep shift must be positive (1: none)")
        self.steps = int(steps)
        self.shift = shift
        del self.clip_denoised

    def process(self, diffusion_options: dict) -> FlowProcess:
        if not is_flow(diffusion_options):
            raise UsageError(
                f"sampler {type(self).__name__} integrates a flow, but this model learns the Gaussian diffusion "
                "(objective=hybrid or eps_mse): use sampler=ddpm or ddim"
            )
        key = tuple(sorted(diffusion_options.items()))
        if key not in self._processes:
            self._processes[key] = FlowProcess(**diffusion_options)
        return self._processes[key]

    def grid(self, start: float, end: float, intervals: int) -> list[float]:
        """`intervals` + 1 times from `start` (near 1) down to `end`, shifted."""
        return [end + (start - end) * shift_time(1 - i / intervals, self.shift) for i in range(intervals + 1)]

    @staticmethod
    def velocity(process, fn, x, t, model_kwargs):
        return process.velocity(process.output(fn, x, t, model_kwargs), x, t)

    def sample(self, model, noise, diffusion_options, model_kwargs=None, generator=None, progress=False):
        process = self.process(diffusion_options)
        guidance = as_guidance(model)
        with torch.no_grad():
            x = self.integrate(process, guidance, noise, model_kwargs or {}, generator, progress)
        self._counts = (guidance.nfe, guidance.guided_nfe)
        return x

    def integrate(self, process, guidance, x, model_kwargs, generator, progress):
        low, high = process.time_range(SAMPLE_EPS)
        times = self.grid(high, low, self.steps)
        # The grid as a device tensor rolled one place a step, so that each step reads its times
        # from the same places: one graph for every step, no host value baked into it (XLA).
        grid = torch.tensor(times + [times[-1]], device=x.device)
        for i in steps_bar(range(self.steps), progress):
            t, t_next = grid[0].expand(x.shape[0]), grid[1].expand(x.shape[0])
            x = self.step(process, guidance, x, t, t_next, times[i], times[i + 1], model_kwargs)
            grid = grid.roll(-1)
            end_step(x)
        return x

    def step(self, process, guidance, x, t, t_next, time, time_next, model_kwargs):
        """x at t -> x at t_next (device tensors (N,)); `time`, `time_next` are their host values."""
        raise NotImplementedError


class Euler(FlowSampler):
    """The ODE's Euler step x <- x + (t' - t)·v(x, t): one evaluation a step."""

    def step(self, process, guidance, x, t, t_next, time, time_next, model_kwargs):
        dt = (t_next - t).view(-1, *[1] * (x.ndim - 1))
        return x + dt * self.velocity(process, guidance.at(time), x, t, model_kwargs)


class Heun(FlowSampler):
    """Heun's second-order step (the trapezoid over an Euler predictor; EDM, Karras et al. 2022,
    Alg. 1): two evaluations a step, so `steps`=25 is 50 function evaluations."""

    def step(self, process, guidance, x, t, t_next, time, time_next, model_kwargs):
        dt = (t_next - t).view(-1, *[1] * (x.ndim - 1))
        # Both slopes guided or neither, as the step's start decides (REPA's euler_sampler with heun=True).
        guided = guidance.at(time)
        d1 = self.velocity(process, guided, x, t, model_kwargs)
        d2 = self.velocity(process, guided, x + dt * d1, t_next, model_kwargs)
        return x + dt * 0.5 * (d1 + d2)


class Dopri5(FlowSampler):
    """Adaptive Dormand-Prince 5(4) over the whole ODE through torchdiffeq (SiT's ODE sampler, its
    defaults atol 1e-6, rtol 1e-3). Its step sizes depend on the data, so it runs on GPUs and CPUs
    only; on XLA each new step size would be a new graph to compile."""

    def __init__(self, atol: float = 1e-6, rtol: float = 1e-3):
        super().__init__(steps=1)
        del self.steps, self.shift
        self.atol, self.rtol = number("sampler.atol", atol), number("sampler.rtol", rtol)

    def integrate(self, process, guidance, x, model_kwargs, generator, progress):
        if x.device.type == "xla":
            raise UsageError(
                "sampler=dopri5 picks its step sizes from the data, which XLA would compile anew at every "
                "step; on a TPU use sampler=euler or heun"
            )
        from torchdiffeq import odeint

        def field(t, x):
            return self.velocity(process, guidance.at(float(t)), x, t.expand(x.shape[0]), model_kwargs)

        low, high = process.time_range(SAMPLE_EPS)
        span = torch.tensor([high, low], device=x.device, dtype=x.dtype)
        # step_t: land a step on the data end instead of stepping past it and interpolating back
        # (torchdiffeq's default), which would evaluate the model at t < 0, off the path.
        options = dict(step_t=span[1:])
        return odeint(field, x, span, method="dopri5", atol=self.atol, rtol=self.rtol, options=options)[-1]


# The SDE's diffusion coefficient D(t) (the noise added is √(2D·h) over a step h), SiT's
# `diffusion_form` choices (transport/path.py compute_diffusion) in this module's time t = 1 - t_SiT.
def _diffusion_coefficient(form, norm, process, t, x):
    alpha, sigma, d_alpha, d_sigma = process.coefficients(t, x)
    t = t.view(-1, *[1] * (x.ndim - 1))
    if form == "constant":
        return torch.full_like(t, norm)
    if form == "sbdm":  # the score-based diffusion model's own: g²/2 of dx = (α'/α)x dt + g dW
        return norm * (sigma * d_sigma - sigma**2 * d_alpha / alpha)
    if form == "sigma":
        return norm * sigma
    if form == "linear":
        return norm * t
    if form == "decreasing":  # SiT's 0.25·(norm·cos(πt_SiT) + 1)², decreasing toward the data
        return 0.25 * (1 - norm * torch.cos(math.pi * t)) ** 2
    return norm * torch.sin(math.pi * t) ** 2  # increasing_decreasing


DIFFUSION_FORMS = ("constant", "sbdm", "sigma", "linear", "decreasing", "increasing_decreasing")
LAST_STEPS = ("mean", "tweedie", "euler", None)


class EulerMaruyama(FlowSampler):
    """The reverse-time SDE with the flow's marginals (SiT §2.3, Eq. 5): over a step h from t down,
    x <- x - h·(v - D(t)·s) + √(2D(t)·h)·z, with s the score implied by the model and z ~ N(0, I).
    D = 0 is the probability-flow ODE. As SiT's sampler: `steps` evaluations, the last of them a
    noise-free step over the final `last_step_size` of time.

    Args:
        steps: function evaluations (SiT: 250); steps - 1 stochastic steps and the last step.
        diffusion: the form of D(t): constant, sbdm, sigma (SiT's sample.py default), linear,
            decreasing, increasing_decreasing (SiT transport/path.py).
        diffusion_norm: its scale (SiT: 1).
        last_step: mean (the SDE drift, no noise; SiT's default), tweedie (E[x_0 | x_t] from the
            score), euler (the ODE drift), or null (none: stop at the last grid time).
        last_step_size: the time left to the last step (SiT: 0.04).
    """

    def __init__(
        self,
        steps: int = 250,
        diffusion: str = "sigma",
        diffusion_norm: float = 1.0,
        last_step: str | None = "mean",
        last_step_size: float = 0.04,
        shift: float = 1.0,
    ):
        if whole_steps(steps) < 2:
            raise UsageError(f"sampler.steps={steps}; the SDE sampler needs at least 2")
        if diffusion not in DIFFUSION_FORMS:
            raise UsageError(f"sampler.diffusion={diffusion!r}; choose one of {', '.join(DIFFUSION_FORMS)}")
        if last_step not in LAST_STEPS:
            raise UsageError(f"sampler.last_step={last_step!r}; choose mean, tweedie, euler or null")
        last_step_size = number("sampler.last_step_size", last_step_size)
        diffusion_norm = number("sampler.diffusion_norm", diffusion_norm)
        if last_step is not None and not 0 < last_step_size < 1:
            raise UsageError(f"sampler.last_step_size={last_step_size}; it must lie in (0, 1)")
        super().__init__(steps, shift)
        self.diffusion = diffusion
        self.diffusion_norm = diffusion_norm
        self.last_step = last_step
        self.last_step_size = last_step_size

    def integrate(self, process, guidance, x, model_kwargs, generator, progress):
        low, high = process.time_range(SAMPLE_EPS)
        # SiT's interval (Transport.check_interval): the sbdm coefficient diverges where α = 0.
        start = min(high, 1 - SAMPLE_EPS) if self.diffusion == "sbdm" and process.path.name != "vp" else high
        end = SAMPLE_EPS if self.last_step is None else self.last_step_size
        times = self.grid(start, max(end, low), self.steps - 1)  # the last evaluation is the last step
        grid = torch.tensor(times + [times[-1]], device=x.device)
        shape = (-1,) + (1,) * (x.ndim - 1)
        for i in steps_bar(range(len(times) - 1), progress):
            t, t_next = grid[0].expand(x.shape[0]), grid[1].expand(x.shape[0])
            h = (t - t_next).view(shape)
            v, s = self._drift_parts(process, guidance.at(times[i]), x, t, model_kwargs)
            coefficient = _diffusion_coefficient(self.diffusion, self.diffusion_norm, process, t, x)
            x = x - h * (v - coefficient * s) + torch.sqrt(2 * coefficient * h) * self.noise_like(x, generator)
            grid = grid.roll(-1)
            end_step(x)
        if self.last_step is None:
            return x
        t = grid[0].expand(x.shape[0])
        v, s = self._drift_parts(process, guidance.at(times[-1]), x, t, model_kwargs)
        if self.last_step == "tweedie":  # E[x_0 | x_t] = (x_t + σ²·s) / α
            alpha, sigma = process.coefficients(t, x)[:2]
            return (x + sigma**2 * s) / alpha
        h = t.view(shape)  # down to t = 0
        if self.last_step == "euler":
            return x - h * v
        return x - h * (v - _diffusion_coefficient(self.diffusion, self.diffusion_norm, process, t, x) * s)

    @staticmethod
    def _drift_parts(process, fn, x, t, model_kwargs):
        """(velocity, score) from one evaluation."""
        output = process.output(fn, x, t, model_kwargs)
        return process.velocity(output, x, t), process.score(output, x, t)
