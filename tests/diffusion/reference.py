"""The official recipe (IDDPM as DiT configures it) computed independently in float64 numpy,
and a smooth stand-in model: what the diffusion tests compare against."""

import numpy as np
import torch


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
