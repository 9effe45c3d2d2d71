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


def test_official_guidance_never_extrapolates_the_variance_of_data_with_fewer_channels():
    """On 1-channel digits the official variant guides ε (channel 0) only; the learned variance
    (channel 1) is the conditional pass's, as on 4-channel latents."""
    model = tiny_dit(in_channels=1)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.tensor([2, 3])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
        out = guided(model, 3.0, "official")(x, t, y)
    torch.testing.assert_close(out[:, :1], uncond[:, :1] + 3.0 * (cond[:, :1] - uncond[:, :1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 1:], cond[:, 1:])


def test_guidance_interval_guides_only_the_steps_inside_it():
    """10 DDPM steps of the 1000, kept at original indices space_timesteps(1000, "10"); each step's
    time is index/1000, and only those in [0, 0.5] run the doubled batch. Guiding everywhere equals
    the plain guided model; an interval that holds no step equals no guidance."""
    from dit.diffusion import DDPM, Guidance

    model = tiny_dit()
    y = torch.tensor([1, 5, 9])
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sampler = DDPM(steps="10")

    def run(guide):
        out = sampler.sample(guide, noise, dict(learn_sigma=True), dict(y=y), torch.Generator().manual_seed(1))
        return out, (sampler.nfe, sampler.guided_nfe)

    inside = sum(k / 1000 <= 0.5 for k in space_timesteps(1000, "10"))
    assert 0 < inside < 10
    half, counts = run(Guidance(model, 4.0, "official", (0.0, 0.5)))
    assert counts == (10, inside)
    everywhere, counts = run(Guidance(model, 4.0, "official", (0.0, 1.0)))
    assert counts == (10, 10)
    plain, _ = run(guided(model, 4.0))
    torch.testing.assert_close(everywhere, plain, rtol=0, atol=0)
    nowhere, counts = run(Guidance(model, 4.0, "official", (0.9995, 1.0)))
    unguided, _ = run(model)
    assert counts == (10, 0)
    torch.testing.assert_close(nowhere, unguided, rtol=0, atol=0)
    assert not torch.allclose(half, plain) and not torch.allclose(half, unguided)


def test_a_bad_guidance_interval_is_one_line():
    from dit.diffusion import Guidance

    for bad in ((0.7, 0.2), (-0.1, 0.5), (0.0, 1.5)):
        with pytest.raises(ValueError, match="guidance interval .* 0 <= low <= high <= 1"):
            Guidance(tiny_dit(), 2.0, "official", bad)


def test_auto_is_resolved_by_draw_not_by_guided():
    with pytest.raises(ValueError, match="'auto' is resolved by dit.diffusion.draw"):
        guided(tiny_dit(), 2.0, "auto")
