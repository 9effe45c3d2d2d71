"""Samplers: how x_0 is drawn from x_T = noise, stepping down a respacing of the training diffusion.

A sampler holds its settings (`steps`: the respacing, IDDPM §4.1: "250" evenly spaced steps,
"ddim50" a 50-step integer stride, ...) and is given, at each call, the model and the options of the
diffusion it was trained with (`create_diffusion`'s keywords but the respacing), so one sampler
object serves any model. Choose one in config; every caller (train.py's sample grids, the FID
monitor, `python -m dit.sample`, the digits check, the benchmark) draws through
`dit.diffusion.sampling.draw` with it:

    python train.py sampler=ddim sampler.steps=ddim25           # conf/sampler/ddim.yaml
    python -m dit.sample ckpt.pt out sampler=ddpm sampler.steps=100

Flow-matching models (objective=flow) are drawn by the ODE and SDE samplers of flow_samplers.py.
After each call a sampler holds `nfe`, the network evaluations per sample it made (`guided_nfe` of
them with guidance, each a forward of the doubled batch).

A new sampler is a subclass that defines `step` (and a YAML file): docs/extending.md.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from dit.diffusion.flow import is_flow
from dit.diffusion.guidance import as_guidance
from dit.diffusion.process import GaussianDiffusion, create_diffusion
from dit.errors import UsageError
from dit.platform.xla_ops import end_step


def steps_bar(steps, progress, total=None):
    """A sampler's steps with a progress bar: `progress` False (none), True ("sampling") or the bar's label."""
    return tqdm(steps, total=total, desc=progress if isinstance(progress, str) else "sampling", disable=not progress)


class Sampler:
    """Base class: the loop from x_T to x_0 over the kept steps; subclasses define one `step`.

    Args:
        steps: the timestep respacing of the training diffusion's 1000 steps.
        clip_denoised: clamp each predicted x_0 to [-1, 1] (the paper samples without).
    """

    def __init__(self, steps: str | int = "250", clip_denoised: bool = False):
        self.steps = str(steps)
        self.clip_denoised = clip_denoised
        self._processes = {}
        self._counts = (0, 0)

    @property
    def nfe(self) -> int:
        """Network evaluations per sample of the last call (a guided one is one batched forward of 2)."""
        return self._counts[0]

    @property
    def guided_nfe(self) -> int:
        """How many of `nfe` were guided (outside a guidance interval the unconditional pass is skipped)."""
        return self._counts[1]

    def process(self, diffusion_options: dict) -> GaussianDiffusion:
        """The training diffusion (`create_diffusion`'s keywords) respaced to `steps`, built once."""
        if is_flow(diffusion_options):
            raise UsageError(
                f"sampler {type(self).__name__} steps the Gaussian diffusion, but this model learns a flow "
                f"(objective=flow, {diffusion_options['path']} path): use sampler=euler, heun, dopri5 or sde"
            )
        key = tuple(sorted((k, v) for k, v in diffusion_options.items() if k != "timestep_respacing"))
        if key not in self._processes:
            self._processes[key] = create_diffusion(self.steps, **dict(key))
        return self._processes[key]

    def step(
        self,
        process: GaussianDiffusion,
        model,
        x: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """x_t -> x_{t-1}, t the index of the kept step (the model sees process.timestep_map[t])."""
        raise NotImplementedError

    def sample(
        self,
        model,
        noise: torch.Tensor,
        diffusion_options: dict,
        model_kwargs: dict | None = None,
        generator: torch.Generator | None = None,
        progress: bool | str = False,
    ) -> torch.Tensor:
        """x_0 from x_T = `noise` with `model`: (x, t, **model_kwargs) -> output, or a `Guidance`;
        `progress`: a bar of the steps (a string: the bar's label)."""
        return self.loop(self.process(diffusion_options), model, noise, model_kwargs, generator, progress)

    def loop(self, process, model, x, model_kwargs=None, generator=None, progress=False):
        guidance = as_guidance(model)
        times = process.step_times  # host floats, for a guidance interval
        process.on_device(x.device)
        # t is a device tensor stepped down in place of a fresh host value per step, so every step
        # runs the same graph (torch.compile, XLA) with no host-to-device copy.
        t = torch.full((x.shape[0],), process.num_timesteps - 1, device=x.device, dtype=torch.long)
        with torch.no_grad():
            for i in steps_bar(reversed(range(process.num_timesteps)), progress, process.num_timesteps):
                x = self.step(process, guidance.at(times[i]), x, t, model_kwargs or {}, generator)
                t = t - 1
                end_step(x)
        self._counts = (guidance.nfe, guidance.guided_nfe)
        return x

    @staticmethod
    def noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Standard normal noise of x's shape from `generator` (on its device: a CPU generator
        serves an XLA device, which has none of its own)."""
        if generator is None:
            return torch.randn_like(x)
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)

    def settings(self) -> dict:
        """What decides this sampler's draws: its class and settings (sample folders record them)."""
        public = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}", **public}

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.settings().items() if k != 'class')})"


class DDPM(Sampler):
    """Ancestral sampling (DDPM Algorithm 2) with the model's variance: the paper's sampler, at 250
    evenly spaced steps (paper §4)."""

    def step(self, process, model, x, t, model_kwargs, generator):
        return process.p_sample(model, x, t, self.clip_denoised, model_kwargs, noise=self.noise_like(x, generator))[
            "sample"
        ]


class DDIM(Sampler):
    """DDIM (Song et al. 2021, Eq. 12): deterministic at `eta` = 0, DDPM-like at 1.

    Args:
        steps: respacing; "ddim50" keeps every 20th of 1000 steps (the official code's DDIM spacing).
        eta: the noise scale of each step.
    """

    def __init__(self, steps: str | int = "ddim50", eta: float = 0.0, clip_denoised: bool = False):
        super().__init__(steps, clip_denoised)
        self.eta = eta

    def step(self, process, model, x, t, model_kwargs, generator):
        noise = None if self.eta == 0 else self.noise_like(x, generator)
        return process.ddim_sample(model, x, t, self.clip_denoised, model_kwargs, eta=self.eta, noise=noise)["sample"]
