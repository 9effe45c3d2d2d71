"""The DDPM and DDIM samplers (dit.diffusion.samplers) against an independent float64
computation of the official recipe's steps, and their loops."""

import numpy as np
import pytest
import torch
from reference import SmoothModel, model64, reference_model_dist, reference_schedule, rel_err

from dit.diffusion import create_diffusion, space_timesteps


@pytest.mark.parametrize("respacing", ["", "250"])
def test_ddpm_step_equals_official_recipe(respacing):
    diffusion = create_diffusion(respacing)
    kept = space_timesteps(1000, respacing)
    betas, ab, ab_prev = reference_schedule(kept)
    model = SmoothModel()
    N = 6
    x = torch.randn(N, 4, 5, 5)
    noise = torch.randn(N, 4, 5, 5)
    k = torch.tensor([0, 1, 2, len(kept) // 2, len(kept) - 2, len(kept) - 1])
    ours = diffusion.p_sample(model, x, k, noise=noise)["sample"]

    xd, kd = x.double().numpy(), k.numpy()
    eps, v = model64(model.double(), xd, np.array(kept)[kd])  # the model sees original steps
    mean, logvar, _ = reference_model_dist(betas, ab, ab_prev, xd, kd, eps, v)
    ref = mean + (kd != 0)[:, None, None, None] * np.exp(0.5 * logvar) * noise.double().numpy()
    assert rel_err(ours, ref) < 1e-5


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_step_equals_official_recipe(eta):
    diffusion = create_diffusion("ddim50")
    kept = list(range(0, 1000, 20))
    betas, ab, ab_prev = reference_schedule(kept)
    model = SmoothModel()
    x, noise = torch.randn(5, 4, 5, 5), torch.randn(5, 4, 5, 5)
    k = torch.tensor([0, 1, 10, 30, 49])
    ours = diffusion.ddim_sample(model, x, k, eta=eta, noise=noise)["sample"]

    xd, kd = x.double().numpy(), k.numpy()
    eps, v = model64(model.double(), xd, np.array(kept)[kd])
    _, _, x0_hat = reference_model_dist(betas, ab, ab_prev, xd, kd, eps, v)
    a, ap = ab[kd][:, None, None, None], ab_prev[kd][:, None, None, None]
    sigma = eta * np.sqrt((1 - ap) / (1 - a)) * np.sqrt(1 - a / ap)
    ref = (
        np.sqrt(ap) * x0_hat
        + np.sqrt(1 - ap - sigma**2) * eps
        + (kd != 0)[:, None, None, None] * sigma * noise.double().numpy()
    )
    assert rel_err(ours, ref) < 1e-5


def test_ddim_eta0_is_deterministic_and_invertible_to_first_order():
    model = SmoothModel()
    x_T = torch.randn(2, 4, 5, 5)

    def round_trip(steps):
        diffusion = create_diffusion(f"ddim{steps}")
        x0 = diffusion.ddim_sample_loop(model, x_T.shape, noise=x_T)
        assert torch.equal(x0, diffusion.ddim_sample_loop(model, x_T.shape, noise=x_T.clone()))
        # Down to step index 0, then inverted back up to index steps-1, where x_T lives.
        x = x_T
        with torch.no_grad():
            for k in range(steps - 1, 0, -1):
                x = diffusion.ddim_sample(model, x, torch.full((2,), k))["sample"]
            for k in range(steps - 1):
                x = diffusion.ddim_reverse_sample(model, x, torch.full((2,), k))["sample"]
        return ((x - x_T).norm() / x_T.norm()).item()

    coarse, fine = round_trip(20), round_trip(100)
    assert fine < 0.1
    assert fine < coarse / 3  # the error shrinks with the step size: first order


@pytest.mark.parametrize("batch", [1, 3])
def test_sampling_is_deterministic_per_generator(batch):
    model = SmoothModel()
    diffusion = create_diffusion("20")
    a = diffusion.p_sample_loop(model, (batch, 4, 3, 3), generator=torch.Generator().manual_seed(1))
    b = diffusion.p_sample_loop(model, (batch, 4, 3, 3), generator=torch.Generator().manual_seed(1))
    c = diffusion.p_sample_loop(model, (batch, 4, 3, 3), generator=torch.Generator().manual_seed(2))
    assert a.shape == (batch, 4, 3, 3) and torch.equal(a, b) and not torch.equal(a, c)
    d = diffusion.ddim_sample_loop(model, (batch, 4, 3, 3), generator=torch.Generator().manual_seed(1), eta=1.0)
    assert torch.isfinite(d).all()


def test_progress_bar(capsys):
    create_diffusion("5").p_sample_loop(SmoothModel(), (1, 4, 2, 2), progress=True)
    assert "5/5" in capsys.readouterr().err
