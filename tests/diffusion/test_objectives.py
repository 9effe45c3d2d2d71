"""The paper's loss (dit.diffusion.objectives.Hybrid, through the official `training_losses` call)
against an independent float64 computation of the official recipe."""

import math

import numpy as np
import torch
from reference import SmoothModel, model64, reference_model_dist, reference_posterior, reference_schedule, rel_err

from dit.diffusion import create_diffusion
from dit.diffusion.objectives import variational_bound_bits


def test_training_loss_equals_official_recipe():
    torch.manual_seed(0)
    diffusion = create_diffusion("")
    model = SmoothModel()
    N = 8
    x0 = torch.randn(N, 4, 6, 6).clamp(-1.5, 1.5)
    noise = torch.randn(N, 4, 6, 6)
    t = torch.tensor([0, 1, 2, 10, 100, 500, 900, 999])
    terms = diffusion.training_losses(model, x0, t, dict(y=torch.arange(N)), noise=noise)

    betas, ab, ab_prev = reference_schedule()
    x0d, nd, td = x0.double().numpy(), noise.double().numpy(), t.numpy()
    a = ab[td][:, None, None, None]
    xt = np.sqrt(a) * x0d + np.sqrt(1 - a) * nd
    eps, v = model64(model.double(), xt, td, y=torch.arange(N))
    mse = ((nd - eps) ** 2).mean(axis=(1, 2, 3))
    true_mean, true_var = reference_posterior(betas, ab, ab_prev, x0d, xt, td)
    post_var = betas * (1 - ab_prev) / (1 - ab)
    true_logvar = np.log(np.append(post_var[1], post_var[1:]))[td][:, None, None, None]
    # the mean is detached in the vb term: it only sees ε as a constant, which changes nothing here
    mean, logvar, _ = reference_model_dist(betas, ab, ab_prev, xt, td, eps, v)
    kl = 0.5 * (-1 + logvar - true_logvar + np.exp(true_logvar - logvar) + (true_mean - mean) ** 2 * np.exp(-logvar))
    kl = kl.mean(axis=(1, 2, 3)) / math.log(2)

    def cdf(z):  # the tanh approximation the official code uses
        return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))

    inv_std = np.exp(-0.5 * logvar)
    plus, minus = cdf(inv_std * (x0d - mean + 1 / 255)), cdf(inv_std * (x0d - mean - 1 / 255))
    logp = np.where(
        x0d < -0.999,
        np.log(np.maximum(plus, 1e-12)),
        np.where(x0d > 0.999, np.log(np.maximum(1 - minus, 1e-12)), np.log(np.maximum(plus - minus, 1e-12))),
    )
    nll = -logp.mean(axis=(1, 2, 3)) / math.log(2)
    vb = np.where(td == 0, nll, kl)

    assert rel_err(terms["mse"], mse) < 1e-5
    for i in range(N):
        assert rel_err(terms["vb"][i], vb[i]) < 1e-5, (t[i], terms["vb"][i], vb[i])
    assert rel_err(terms["loss"], mse + vb) < 1e-5
    assert terms["loss"].shape == (N,)


def test_vb_term_trains_only_the_variance():
    diffusion = create_diffusion("")
    model = SmoothModel()
    x0 = torch.randn(4, 4, 6, 6)
    t = torch.tensor([5, 50, 500, 999])
    terms = diffusion.training_losses(model, x0, t, noise=torch.randn_like(x0))
    out = torch.zeros(4, 8, 6, 6, requires_grad=True)
    vb = variational_bound_bits(
        diffusion,
        x0,
        diffusion.q_sample(x0, t, torch.randn_like(x0)),
        t,
        torch.cat([out[:, :4].detach(), out[:, 4:]], 1),
    )
    vb.sum().backward()
    assert out.grad[:, :4].abs().sum() == 0 and out.grad[:, 4:].abs().sum() > 0
    terms["vb"].sum().backward()
    assert model.w.grad is not None


def test_true_noise_gives_zero_mse_and_zero_kl():
    diffusion = create_diffusion("")
    x0, noise = torch.randn(4, 4, 5, 5), torch.randn(4, 4, 5, 5)
    t = torch.tensor([1, 10, 300, 999])

    def oracle(x_t, t_model):  # ε = the true noise; v = -1 selects the posterior variance
        return torch.cat([noise, -torch.ones_like(noise)], dim=1)

    terms = diffusion.training_losses(oracle, x0, t, noise=noise)
    assert terms["mse"].abs().max() == 0
    assert terms["vb"].abs().max() < 1e-4
