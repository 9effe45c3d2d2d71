"""The one way this project draws samples: train.py's sample grids, the FID monitor,
`python -m dit.sample`, the digits check and the benchmark all call `draw`.

One seeding scheme: samples are drawn in batches of a fixed size, batch k holding samples
[kB, (k+1)B); every random number of batch k (random labels, the starting noise, each step's
noise) comes from `batch_generator(seed, k)`. Batches go to devices whole, so an image depends on
the seed, its batch size and its index, never on the number of devices that drew it.
"""

from __future__ import annotations

import torch

from dit.diffusion.flow import is_flow
from dit.diffusion.guidance import Guidance
from dit.diffusion.samplers import Sampler


def batch_generator(seed: int, batch_index: int, device: torch.device | str) -> torch.Generator:
    """The generator of batch `batch_index` of a run seeded with `seed`, on `device` (on the CPU
    for an XLA device, which has no generator of its own; its draws are copied over)."""
    device = torch.device(device)
    where = "cpu" if device.type == "xla" else device
    return torch.Generator(where).manual_seed(seed * 2**32 + batch_index)


def batch_labels(
    indices: torch.Tensor, classes: list[int] | None, num_classes: int, generator: torch.Generator
) -> torch.Tensor:
    """Labels of samples `indices`: the (i mod K)-th of `classes` (columns of a grid are classes),
    or, without classes, uniform random labels from the batch's generator (the official sample_ddp.py)."""
    if classes:
        return torch.tensor(classes, device=generator.device)[indices.to(generator.device) % len(classes)]
    return torch.randint(0, num_classes, (len(indices),), generator=generator, device=generator.device)


def draw(
    model,
    sampler: Sampler,
    diffusion_options: dict,
    labels: torch.Tensor,
    generator: torch.Generator,
    guidance_scale: float = 1.0,
    guidance: str = "auto",
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    progress: bool | str = False,
) -> torch.Tensor:
    """Latents (N, C, I, I) of class `labels` from `model` (a DiT), with classifier-free guidance at
    `guidance_scale` (1: none) for the times in `guidance_interval` (0 the data, 1 the noise),
    drawn by `sampler` from noise of `generator`. Afterwards `sampler.nfe` holds the function
    evaluations per sample.

    `guidance` is the variant: "auto" is "official" (the first 3 channels) on the Gaussian
    diffusion and "all_channels" on a flow. `diffusion_options` are the options of the process the
    model was trained with (DiTModule.diffusion_options; `process_options` of a checkpoint). `progress`:
    a bar of the sampler's steps (a string: the bar's label; dopri5, adaptive, shows none)."""
    if guidance == "auto":
        guidance = "all_channels" if is_flow(diffusion_options) else "official"
    device = next(model.parameters()).device
    shape = (len(labels), model.in_channels, model.input_size, model.input_size)
    noise = torch.randn(shape, generator=generator, device=generator.device).to(device)
    model_kwargs = dict(y=labels.to(device))
    guided = Guidance(model, guidance_scale, guidance, guidance_interval)
    return sampler.sample(guided, noise, diffusion_options, model_kwargs, generator, progress)
