"""Flow matching: the interpolants against their closed forms, the conversions between velocity,
noise and score, the objective's time draws, and the ODE/SDE samplers on a Gaussian target whose
exact velocity field is known, so every sampler must land on that Gaussian."""

import math

import pytest
import torch

from dit.diffusion import Dopri5, Euler, EulerMaruyama, FlowMatching, FlowProcess, Heun
from dit.diffusion.flow import PATHS, shift_time
from dit.errors import UsageError

FLOW = dict(path="linear", prediction="velocity")


@pytest.mark.parametrize("path", sorted(PATHS))
def test_path_coefficients_and_their_derivatives(path):
    """α, σ as written in SiT's plans (in this module's t = 1 - t_SiT); α', σ' equal autograd's derivatives."""
    t = torch.linspace(0.01, 0.99, 33, dtype=torch.float64, requires_grad=True)
    alpha, sigma, d_alpha, d_sigma = PATHS[path]().coefficients(t)
    expected = {
        "linear": (1 - t, t),
        "gvp": (torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)),
        "vp": (torch.exp(-0.25 * t**2 * 19.9 - 0.05 * t), None),
    }[path]
    torch.testing.assert_close(alpha, expected[0])
    if expected[1] is not None:
        torch.testing.assert_close(sigma, expected[1])
    if path != "linear":  # variance preserving
        torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t))
    (grad_alpha,) = torch.autograd.grad(alpha.sum(), t, retain_graph=True)
    (grad_sigma,) = torch.autograd.grad(sigma.sum(), t)
    torch.testing.assert_close(d_alpha, grad_alpha)
    torch.testing.assert_close(d_sigma, grad_sigma)


@pytest.mark.parametrize("prediction", ["velocity", "noise", "score"])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_conversions_recover_noise_data_velocity_and_score(path, prediction):
    """Given the exact target of any prediction, the process recovers ε, x_0, v = α'x_0 + σ'ε and -ε/σ."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(16, 2, 3, 3, generator=g), torch.randn(16, 2, 3, 3, generator=g)
    t = torch.rand(16, generator=g) * 0.9 + 0.05
    process = FlowProcess(path, prediction)
    x_t = process.interpolate(x0, eps, t)
    alpha, sigma, d_alpha, d_sigma = (c.view(-1, 1, 1, 1) for c in PATHS[path]().coefficients(t))
    torch.testing.assert_close(x_t, alpha * x0 + sigma * eps)
    target = process.target(x0, eps, t)
    noise, data = process.noise_and_data(target, x_t, t)
    torch.testing.assert_close(noise, eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(data, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(process.velocity(target, x_t, t), d_alpha * x0 + d_sigma * eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(process.score(target, x_t, t), -eps / sigma, rtol=1e-4, atol=1e-3)


def gaussian_target(process, mu, s):
    """A 'model' that outputs the exact prediction for data x_0 ~ N(mu, s²) per dimension: x_t is
    Gaussian with x_0 and ε, so E[x_0 | x_t] and E[ε | x_t] are linear in x_t (derived by hand:
    Var x_t = α²s² + σ², Cov(x_0, x_t) = αs², Cov(ε, x_t) = σ)."""

    def model(x, t, y):
        alpha, sigma, d_alpha, d_sigma = (c.view(-1, *[1] * (x.ndim - 1)) for c in process.path.coefficients(t))
        var = alpha**2 * s**2 + sigma**2
        x0 = mu + alpha * s**2 / var * (x - alpha * mu)
        eps = sigma / var * (x - alpha * mu)
        out = {"velocity": d_alpha * x0 + d_sigma * eps, "noise": eps, "score": -eps / sigma}[process.prediction]
        return torch.cat([out, torch.full_like(out, float("nan"))], dim=1)  # a learned-sigma half, unused

    return model


def draw_gaussian(sampler, path="linear", prediction="velocity", n=4000, mu=1.5, s=0.5, seed=0):
    """(samples, the exact ODE map of their noise): the flow of a Gaussian is affine, and an
    increasing affine map of N(m_1, v_1) onto N(μ, s²) is x_0 = μ + s·(x_1 - m_1)/√v_1 (m_1 = α_1μ,
    v_1 = α_1²s² + σ_1², the law of x at t = 1; α_1 = 0 but on the VP path)."""
    process = FlowProcess(path, prediction)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    alpha, sigma = (c.item() for c in process.path.coefficients(torch.tensor(1.0, dtype=torch.float64))[:2])
    exact = mu + s * (noise - alpha * mu) / math.sqrt(alpha**2 * s**2 + sigma**2)
    out = sampler.sample(gaussian_target(process, mu, s), noise, process.options(), dict(y=torch.zeros(n)), g)
    return out, exact


@pytest.mark.parametrize(
    "sampler,path,prediction,tolerance",
    [
        (Heun(steps=25), "linear", "velocity", 3e-3),
        (Heun(steps=25), "gvp", "noise", 0.01),
        (Heun(steps=50, shift=0.5), "vp", "score", 3e-3),
        (Euler(steps=200), "linear", "velocity", 0.03),
        (Dopri5(), "linear", "velocity", 0.1),
        (Dopri5(rtol=1e-6), "linear", "velocity", 1e-4),
        (Dopri5(rtol=1e-6), "vp", "velocity", 1e-3),
        (Dopri5(rtol=1e-6), "gvp", "noise", 3e-3),
    ],
)
def test_ode_samplers_follow_the_exact_flow_of_a_gaussian_target(sampler, path, prediction, tolerance):
    """Every sample ends within `tolerance` of where the exact ODE takes its noise (the margins
    of the noise and score conversions, SAMPLE_EPS from each end, cost ~1e-3 by themselves;
    measured: Heun 25 steps 1.2e-3, 50 steps 3e-4; dopri5 at rtol 1e-3 4e-2, at 1e-6 6e-6)."""
    out, exact = draw_gaussian(sampler, path, prediction, n=500)
    assert (out - exact).abs().max() < tolerance


@pytest.mark.parametrize(
    "sampler,path",
    [
        (EulerMaruyama(steps=250), "linear"),
        (EulerMaruyama(steps=250, diffusion="sbdm", last_step="tweedie"), "gvp"),
        (EulerMaruyama(steps=250, diffusion="constant", diffusion_norm=0.5, last_step="euler"), "linear"),
    ],
)
def test_sde_sampler_lands_on_a_gaussian_target(sampler, path):
    """From N(0, I) the reverse SDE with the exact score takes samples to N(1.5, 0.5²): mean and
    std of 16,000 values within 0.02 (their sampling error is ~0.005)."""
    out, _ = draw_gaussian(sampler, path)
    assert torch.isfinite(out).all()
    assert abs(out.mean().item() - 1.5) < 0.02
    assert abs(out.std().item() - 0.5) < 0.02


def test_heun_is_second_order_and_euler_first():
    """Against the exact flow, halving the step divides Heun's error by ~4 and Euler's by ~2."""

    def error(sampler):
        out, exact = draw_gaussian(sampler, n=200)
        return (out - exact).abs().max().item()

    heun = error(Heun(steps=8)) / error(Heun(steps=16))
    euler = error(Euler(steps=8)) / error(Euler(steps=16))
    assert 3.0 < heun < 5.0 and 1.6 < euler < 2.4, (heun, euler)


def test_function_evaluations_are_counted():
    for sampler, nfe in ((Euler(steps=7), 7), (Heun(steps=5), 10), (EulerMaruyama(steps=9), 9)):
        draw_gaussian(sampler, n=8)
        assert (sampler.nfe, sampler.guided_nfe) == (nfe, 0)
    sampler = EulerMaruyama(steps=9, last_step=None)
    draw_gaussian(sampler, n=8)
    assert sampler.nfe == 8
    dopri = Dopri5()
    draw_gaussian(dopri, n=8)
    assert dopri.nfe >= 8  # six stages a step and a first evaluation; adaptive


def test_the_objective_is_zero_at_the_exact_target_and_draws_times_as_configured():
    torch.manual_seed(0)
    x0, eps = torch.randn(8, 1, 2, 2), torch.randn(8, 1, 2, 2)
    for prediction in ("velocity", "noise", "score"):
        objective = FlowMatching(prediction=prediction)
        process = objective.process({})
        t = objective.timesteps(8, process, "cpu")
        target = process.target(x0, eps, t)
        terms = objective.losses(lambda x, t, y: target, process, x0, t, dict(y=None), eps)
        assert terms["loss"].abs().max() < 1e-10
        wrong = objective.losses(lambda x, t, y: target + 1, process, x0, t, dict(y=None), eps)["loss"]
        # an error of 1 everywhere; the score's is weighted by σ_t² = t² on the linear path (SiT's loss)
        torch.testing.assert_close(wrong, t**2 if prediction == "score" else torch.ones(8))
    process = FlowProcess()
    uniform = FlowMatching().timesteps(20000, process, "cpu")
    assert uniform.min() >= 0 and uniform.max() <= 1 and abs(uniform.mean() - 0.5) < 0.01
    logit = torch.logit(FlowMatching(time_sampling="lognormal").timesteps(20000, process, "cpu").double())
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03
    shifted = FlowMatching(shift=3.0).timesteps(20000, process, "cpu")
    assert abs(shifted.median() - 0.75) < 0.01  # the median 1/2 goes to 3·½ / (1 + 2·½)
    assert FlowMatching(prediction="noise").timesteps(1000, process, "cpu").max() <= 1  # before its margin
    assert FlowProcess("linear", "noise").time_range(1e-5) == (1e-5, 1 - 1e-5)


def test_shift_time_fixes_the_ends():
    t = torch.tensor([0.0, 0.5, 1.0])
    assert shift_time(t, 3.0).tolist() == [0.0, 0.75, 1.0]
    assert shift_time(t, 1.0) is t


def test_samplers_refuse_the_other_process_and_bad_settings():
    from dit.diffusion import DDPM

    with pytest.raises(UsageError, match="sampler=euler, heun, dopri5 or sde"):
        DDPM(steps="5").process(FLOW)
    with pytest.raises(UsageError, match="sampler=ddpm or ddim"):
        Heun().process(dict(learn_sigma=True))
    for bad, match in (
        (lambda: FlowProcess("straight"), "unknown path"),
        (lambda: FlowMatching(prediction="x0"), "unknown prediction"),
        (lambda: FlowMatching(time_sampling="beta"), "objective.time_sampling"),
        (lambda: FlowMatching(shift=0), "objective.shift"),
        (lambda: Heun(steps=0), "sampler.steps"),
        (lambda: EulerMaruyama(diffusion="big"), "sampler.diffusion"),
        (lambda: EulerMaruyama(last_step="median"), "sampler.last_step"),
        (lambda: Heun(steps="abc"), "sampler.steps='abc'; a flow sampler takes a whole number"),
        (lambda: Heun(shift="x"), "sampler.shift='x'; give a number"),
        (lambda: Dopri5(rtol="abc"), "sampler.rtol='abc'; give a number"),
        (lambda: EulerMaruyama(last_step_size="a"), "sampler.last_step_size='a'; give a number"),
        (lambda: FlowMatching(lognormal_std="wide"), "objective.lognormal_std='wide'; give a number"),
    ):
        with pytest.raises(UsageError, match=match):
            bad()
