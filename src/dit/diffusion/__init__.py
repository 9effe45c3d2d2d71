"""The diffusion of the paper's recipe and its plug points.

- process.py: the Gaussian diffusion (IDDPM as the official code configures it), `create_diffusion`.
- flow.py: flow matching's interpolants (linear, GVP, VP) and predictions (velocity, noise, score).
- objectives.py: what training minimises (`objective=` in config): Hybrid, EpsilonMSE, FlowMatching, REPA.
- samplers.py: how samples are drawn (`sampler=`) from the Gaussian diffusion: DDPM, DDIM.
- flow_samplers.py: ... and from a flow: Euler, Heun, Dopri5 (ODE), EulerMaruyama (SDE).
- guidance.py: classifier-free guidance, with a guidance interval.
- sampling.py: `draw`, the one sampling path, and its seeding scheme.
"""

from dit.diffusion.flow import PATHS, PREDICTIONS, FlowProcess, is_flow, make_process
from dit.diffusion.flow_samplers import Dopri5, Euler, EulerMaruyama, FlowSampler, Heun
from dit.diffusion.guidance import GUIDANCE_VARIANTS, Guidance, guided
from dit.diffusion.objectives import REPA, EpsilonMSE, FlowMatching, Hybrid, Objective
from dit.diffusion.process import GaussianDiffusion, beta_schedule, create_diffusion, space_timesteps
from dit.diffusion.samplers import DDIM, DDPM, Sampler
from dit.diffusion.sampling import batch_generator, batch_labels, draw

__all__ = [
    "PATHS",
    "PREDICTIONS",
    "FlowProcess",
    "is_flow",
    "make_process",
    "FlowSampler",
    "Euler",
    "Heun",
    "Dopri5",
    "EulerMaruyama",
    "GUIDANCE_VARIANTS",
    "Guidance",
    "guided",
    "Objective",
    "Hybrid",
    "EpsilonMSE",
    "FlowMatching",
    "REPA",
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
