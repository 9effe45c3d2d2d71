"""The Gaussian diffusion (dit.diffusion.process) against an independent float64 computation of
the official recipe (IDDPM as DiT configures it) and against closed forms of the forward process and posterior."""

import math

import numpy as np
import pytest
import torch
from reference import SmoothModel, reference_posterior, reference_schedule, rel_err

from dit.diffusion import GaussianDiffusion, create_diffusion, space_timesteps
from dit.diffusion.process import discretized_gaussian_log_likelihood, normal_kl


def test_posterior_equals_bayes_rule():
    diffusion = create_diffusion("")
    betas, ab, ab_prev = reference_schedule()
    x0, xt = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)
    t = torch.tensor([1, 2, 50, 500, 999])
    mean, var, logvar = diffusion.q_posterior_mean_variance(x0, xt, t)
    ref_mean, ref_var = reference_posterior(betas, ab, ab_prev, x0.double().numpy(), xt.double().numpy(), t.numpy())
    assert rel_err(mean, ref_mean) < 1e-5
    assert rel_err(var.flatten(), ref_var.flatten()) < 1e-5
    torch.testing.assert_close(logvar, var.log(), rtol=1e-5, atol=0)


def test_forward_process_marginal_is_the_composition_of_single_steps():
    # q(x_t | x_0) = N(√ᾱ_t x_0, 1-ᾱ_t) must equal t steps of q(x_s | x_{s-1}) = N(√(1-β_s) x_{s-1}, β_s):
    # the mean scales by Π√(1-β_s) and the variance follows v_s = (1-β_s) v_{s-1} + β_s.
    diffusion = create_diffusion("")
    betas = np.linspace(1e-4, 0.02, 1000)
    scale, var = 1.0, 0.0
    for s in range(1000):
        scale, var = scale * np.sqrt(1 - betas[s]), (1 - betas[s]) * var + betas[s]
        if s in (0, 9, 499, 999):
            x0 = torch.ones(1, 1, 1, 1)
            t = torch.tensor([s])
            assert diffusion.q_sample(x0, t, torch.zeros_like(x0)).item() == pytest.approx(scale, rel=1e-6)
            assert diffusion.q_sample(torch.zeros_like(x0), t, x0).item() ** 2 == pytest.approx(var, rel=1e-5)


def test_kl_of_equal_gaussians_is_zero_and_known_value():
    m, lv = torch.randn(100), torch.randn(100)
    assert normal_kl(m, lv, m, lv).abs().max() < 1e-6
    # KL(N(0,1) ‖ N(1,4)) = log 2 + (1 + 1)/(2·4) - 1/2
    kl = normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(math.log(4)))
    assert kl.item() == pytest.approx(math.log(2) + 2 / 8 - 0.5, rel=1e-6)


def test_decoder_likelihood_sums_to_one_over_bins():
    # The 256 bins of [-1, 1] partition the real line: their probabilities sum to 1.
    bins = torch.linspace(-1, 1, 256)
    mean, log_scale = torch.full((256,), 0.3), torch.full((256,), math.log(0.2))
    p = discretized_gaussian_log_likelihood(bins, mean, log_scale).exp().sum()
    assert p.item() == pytest.approx(1.0, abs=2e-3)


def test_variance_interpolation_ends():
    diffusion = create_diffusion("")
    x, t = torch.randn(3, 4, 2, 2), torch.tensor([0, 400, 999])
    for v, expected in [(1.0, diffusion.log_betas[t]), (-1.0, diffusion.posterior_log_variance_clipped[t])]:
        out = diffusion.p_mean_variance(lambda x, t: torch.cat([torch.zeros_like(x), torch.full_like(x, v)], 1), x, t)
        torch.testing.assert_close(out["log_variance"][:, 0, 0, 0], expected)
    # β_t ≥ posterior variance: the learned range lies between them.
    assert (diffusion.log_betas[1:] >= diffusion.posterior_log_variance_clipped[1:]).all()


def test_respaced_betas_reproduce_kept_alpha_bars():
    base = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    for respacing in ["250", "ddim50", "10,20,30", [0, 10, 999]]:
        diffusion = create_diffusion(respacing)
        kept = diffusion.timestep_map.numpy()
        np.testing.assert_allclose(diffusion.alphas_cumprod.numpy(), base[kept], rtol=1e-6)
        assert diffusion.num_timesteps == len(kept)


def test_space_timesteps():
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and steps[:4] == [0, 4, 8, 12] and steps[-1] == 999
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    sections = space_timesteps(1000, "10,20")
    assert len(sections) == 30 and sections[9] == 499 and sections[10] == 500 and sections[-1] == 999
    assert space_timesteps(1000, "") == list(range(1000))
    assert space_timesteps(1000, [5, 1, 5]) == [1, 5]


def test_model_sees_original_timesteps():
    model = SmoothModel()
    diffusion = create_diffusion("250")
    diffusion.p_sample_loop(model, (2, 4, 3, 3), generator=torch.Generator().manual_seed(0))
    seen = [int(t[0]) for t in model.seen_t]
    assert seen == space_timesteps(1000, "250")[::-1]


def test_fixed_variance_models():
    for sigma_small in (False, True):
        diffusion = create_diffusion("", learn_sigma=False, sigma_small=sigma_small)
        model = SmoothModel(learn_sigma=False)
        terms = diffusion.training_losses(model, torch.randn(2, 4, 3, 3), torch.tensor([0, 999]))
        assert set(terms) == {"mse", "loss"} and torch.equal(terms["loss"], terms["mse"])
        out = diffusion.p_sample(model, torch.randn(2, 4, 3, 3), torch.tensor([0, 999]))
        assert torch.isfinite(out["sample"]).all()


def test_cosine_schedule():
    betas = create_diffusion("", noise_schedule="cosine").betas
    assert len(betas) == 1000 and betas.max() <= 0.999 and (betas[1:] >= betas[:-1]).all()


@pytest.mark.parametrize(
    "respacing, match",
    [
        ("abc", "cannot read timestep respacing 'abc'"),
        ("ddimX", "cannot read timestep respacing 'ddimX'"),
        ("2000", "asks for 2000 steps in a section of 1000"),
        ("ddim3000", "no integer stride gives exactly 3000"),
        ([0, 1000], r"must lie in \[0, 999\]"),
        ("1", "keeps 1 step; a sampler needs at least 2"),
    ],
)
def test_bad_respacing(respacing, match):
    with pytest.raises(ValueError, match=match):
        create_diffusion(respacing)


def test_wrong_channel_count_for_learned_sigma():
    diffusion = create_diffusion("")
    model = SmoothModel(learn_sigma=False)
    with pytest.raises(ValueError, match="expects 8 output channels .* gave 4; match learn_sigma"):
        diffusion.training_losses(model, torch.randn(2, 4, 3, 3), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="expects 8 output channels"):
        diffusion.p_sample_loop(model, (1, 4, 3, 3))


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'"):
        create_diffusion("", noise_schedule="quadratic")


def test_schedule_follows_the_data_device():
    diffusion = GaussianDiffusion(np.linspace(1e-4, 0.02, 10))
    assert diffusion.betas.dtype == torch.float32 and diffusion.timestep_map.tolist() == list(range(10))
