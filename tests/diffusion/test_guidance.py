"""Classifier-free guidance (dit.diffusion.guidance) against the official forward_with_cfg."""

import numpy as np
import pytest
import torch
from reference import reference_model_dist, reference_schedule, rel_err

from dit.diffusion import create_diffusion, guided, space_timesteps
from dit.models import DiT


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


def test_guidance_needs_a_null_class():
    with pytest.raises(ValueError, match="needs a null class.*class_dropout_prob=0"):
        guided(tiny_dit(class_dropout_prob=0.0), 4.0)
    with pytest.raises(ValueError, match="unknown guidance variant 'first3'"):
        guided(tiny_dit(), 4.0, "first3")
