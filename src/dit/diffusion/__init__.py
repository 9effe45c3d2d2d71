"""The diffusion of the paper's recipe and its plug points.

- process.py: the Gaussian diffusion (IDDPM as the official code configures it), `create_diffusion`.
- objectives.py: what training minimises (`objective=` in config): Hybrid, EpsilonMSE.
- samplers.py: how samples are drawn (`sampler=`): DDPM, DDIM.
- guidance.py: classifier-free guidance.
- sampling.py: `draw`, the one sampling path, and its seeding scheme.
"""

from dit.diffusion.guidance import GUIDANCE_VARIANTS, guided
from dit.diffusion.objectives import EpsilonMSE, Hybrid, Objective
from dit.diffusion.process import GaussianDiffusion, beta_schedule, create_diffusion, space_timesteps
from dit.diffusion.samplers import DDIM, DDPM, Sampler
from dit.diffusion.sampling import batch_generator, batch_labels, draw

__all__ = [
    "GUIDANCE_VARIANTS",
    "guided",
    "Objective",
    "Hybrid",
    "EpsilonMSE",
    "GaussianDiffusion",
    "beta_schedule",
    "create_diffusion",
    "space_timesteps",
    "Sampler",
    "DDPM",
    "DDIM",
    "batch_generator",
    "batch_labels",
    "draw",
]
