"""The diffusion against an independent float64 computation of the official recipe (IDDPM as DiT
configures it) and against closed forms of the forward process and posterior."""

import math

import numpy as np
import pytest
import torch

from dit.diffusion import GaussianDiffusion, create_diffusion, guided, space_timesteps
from dit.diffusion.objectives import variational_bound_bits
from dit.diffusion.process import discretized_gaussian_log_likelihood, normal_kl
from dit.models import DiT


def rel_err(ours, ref):
    ours, ref = np.asarray(torch.as_tensor(ours).detach(), dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return np.abs(ours - ref).max() / np.abs(ref).max()


class SmoothModel(torch.nn.Module):
    """A fixed smooth function (x, t, y) -> (ε, v) with v in (-1, 1), usable in float32 and float64."""

    def __init__(self, channels=4, learn_sigma=True, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        out = 2 * channels if learn_sigma else channels
        self.w = torch.nn.Parameter(torch.randn(out, channels, generator=g) / channels**0.5)
        self.b = torch.nn.Parameter(torch.randn(out, generator=g) * 0.1)
        self.channels = channels
        self.seen_t = []

    def forward(self, x, t, y=None):
        self.seen_t.append(t.clone())
        h = torch.einsum("oc,nchw->nohw", self.w.to(x.dtype), x) + self.b.to(x.dtype)[:, None, None]
        h = h + (t.to(x.dtype) / 1000)[:, None, None, None]
        if y is not None:
            h = h + 0.1 * torch.cos(y.to(x.dtype))[:, None, None, None]
        eps, rest = h[:, : self.channels], h[:, self.channels :]
        return torch.cat([torch.sin(eps), torch.tanh(rest)], dim=1)


# ----------------------------------------------------------------------------- float64 reference


def reference_schedule(kept=None):
    """β, ᾱ, ᾱ_prev of the linear schedule, respaced by keeping ᾱ at `kept`, in float64 numpy."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alpha_bar = np.cumprod(1.0 - betas)
    if kept is not None:
        alpha_bar = alpha_bar[kept]
        betas = 1.0 - alpha_bar / np.append(1.0, alpha_bar[:-1])
    return betas, alpha_bar, np.append(1.0, alpha_bar[:-1])


def reference_posterior(betas, ab, ab_prev, x0, xt, t):
    """q(x_{t-1} | x_t, x_0) by Bayes' rule on q(x_t | x_{t-1}) q(x_{t-1} | x_0), precision form."""
    b, ap = betas[t][:, None, None, None], ab_prev[t][:, None, None, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = (1 - b) / b + 1 / (1 - ap)
        var = 1 / precision
        mean = var * (np.sqrt(1 - b) * xt / b + np.sqrt(ap) * x0 / (1 - ap))
    # At the first step x_{t-1} is the data itself: ᾱ_prev = 1, the posterior collapses onto x_0.
    return np.where(ap == 1, x0, mean), var


def reference_model_dist(betas, ab, ab_prev, xt, t, eps, v):
    """The official p(x_{t-1}|x_t): x̂_0 from ε, the posterior mean at x̂_0, learned-range variance."""
    a = ab[t][:, None, None, None]
    x0_hat = (xt - np.sqrt(1 - a) * eps) / np.sqrt(a)
    mean, _ = reference_posterior(betas, ab, ab_prev, x0_hat, xt, t)
    post_var = betas * (1 - ab_prev) / (1 - ab)
    post_var_clipped = np.append(post_var[1], post_var[1:])
    min_log = np.log(post_var_clipped)[t][:, None, None, None]
    max_log = np.log(betas)[t][:, None, None, None]
    frac = (v + 1) / 2
    return mean, frac * max_log + (1 - frac) * min_log, x0_hat


def model64(model, x, t, **kw):
    with torch.no_grad():
        out = model(torch.from_numpy(x), torch.from_numpy(t), **kw).double().numpy()
    return out[:, :4], out[:, 4:]


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
    logp = np.where(x0d < -0.999, np.log(np.maximum(plus, 1e-12)),
                    np.where(x0d > 0.999, np.log(np.maximum(1 - minus, 1e-12)), np.log(np.maximum(plus - minus, 1e-12))))  # fmt: skip
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


def tiny_dit(**kw):
    model = DiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10, **kw)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def test_guided_sampling_loop_equals_official_forward_with_cfg():
    """10 guided DDPM steps; the reference doubles the batch the official way (forward_with_cfg:
    the first half duplicated, labels [y, null], guidance on channels 0:3)."""
    model = tiny_dit()
    diffusion = create_diffusion("10")
    kept = space_timesteps(1000, "10")
    betas, ab, ab_prev = reference_schedule(kept)
    B, scale = 3, 4.0
    y = torch.tensor([1, 5, 9])
    g = torch.Generator().manual_seed(7)
    ours = diffusion.p_sample_loop(guided(model, scale), (B, 4, 8, 8), model_kwargs=dict(y=y), generator=g)

    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, 4, 8, 8, generator=g).double()
    m64 = model.double()
    for k in reversed(range(10)):
        noise = torch.randn(B, 4, 8, 8, generator=g).double()
        combined = torch.cat([x, x])
        t = torch.full((2 * B,), kept[k])
        with torch.no_grad():
            out = m64(combined, t, torch.cat([y, torch.full_like(y, 10)]))
        eps, rest = out[:, :3], out[:, 3:]
        cond, uncond = eps.chunk(2)
        half = uncond + scale * (cond - uncond)
        out = torch.cat([torch.cat([half, half]), rest], dim=1)[:B].numpy()
        kd = np.full(B, k)
        mean, logvar, _ = reference_model_dist(betas, ab, ab_prev, x.numpy(), kd, out[:, :4], out[:, 4:])
        x = torch.from_numpy(mean + (k != 0) * np.exp(0.5 * logvar) * noise.numpy())
    assert rel_err(ours, x.numpy()) < 1e-5


def test_all_channel_guidance_guides_every_eps_channel():
    model = tiny_dit()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([2, 3])
    with torch.no_grad():
        cond = model(x, t, y)
        uncond = model(x, t, torch.full_like(y, 10))
        official, full = guided(model, 2.0, "official")(x, t, y), guided(model, 2.0, "all_channels")(x, t, y)
    expected = uncond[:, :4] + 2.0 * (cond[:, :4] - uncond[:, :4])
    torch.testing.assert_close(full[:, :4], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(official[:, :3], expected[:, :3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(official[:, 3:], cond[:, 3:], rtol=1e-5, atol=1e-5)  # unguided, as official
    torch.testing.assert_close(full[:, 4:], cond[:, 4:], rtol=1e-5, atol=1e-5)
    assert guided(model, 1.0) is model


# ----------------------------------------------------------------------------- closed forms


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


def test_true_noise_gives_zero_mse_and_zero_kl():
    diffusion = create_diffusion("")
    x0, noise = torch.randn(4, 4, 5, 5), torch.randn(4, 4, 5, 5)
    t = torch.tensor([1, 10, 300, 999])

    def oracle(x_t, t_model):  # ε = the true noise; v = -1 selects the posterior variance
        return torch.cat([noise, -torch.ones_like(noise)], dim=1)

    terms = diffusion.training_losses(oracle, x0, t, noise=noise)
    assert terms["mse"].abs().max() == 0
    assert terms["vb"].abs().max() < 1e-4


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


# ----------------------------------------------------------------------------- samplers


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


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("respacing, match", [
    ("abc", "cannot read timestep respacing 'abc'"),
    ("ddimX", "cannot read timestep respacing 'ddimX'"),
    ("2000", "asks for 2000 steps in a section of 1000"),
    ("ddim3000", "no integer stride gives exactly 3000"),
    ([0, 1000], r"must lie in \[0, 999\]"),
    ("1", "keeps 1 step; a sampler needs at least 2"),
])  # fmt: skip
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


def test_guidance_needs_a_null_class():
    with pytest.raises(ValueError, match="needs a null class.*class_dropout_prob=0"):
        guided(tiny_dit(class_dropout_prob=0.0), 4.0)
    with pytest.raises(ValueError, match="unknown guidance variant 'first3'"):
        guided(tiny_dit(), 4.0, "first3")


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'"):
        create_diffusion("", noise_schedule="quadratic")


def test_schedule_follows_the_data_device():
    diffusion = GaussianDiffusion(np.linspace(1e-4, 0.02, 10))
    assert diffusion.betas.dtype == torch.float32 and diffusion.timestep_map.tolist() == list(range(10))
