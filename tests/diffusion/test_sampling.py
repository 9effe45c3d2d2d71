"""The one sampling path (dit.diffusion.sampling): `draw`, the labels of a batch, and the seeding
scheme that makes an image depend on its batch, never on the number of devices."""

import torch

from dit.diffusion import DDIM, DDPM, batch_generator, batch_labels, draw
from dit.models import DiT


def tiny():
    torch.manual_seed(0)
    model = DiT(input_size=4, patch_size=2, in_channels=1, num_classes=5, depth=1, hidden_size=16, num_heads=2)
    for p in model.parameters():  # a fresh adaLN-Zero model outputs 0: give it something to say
        p.data.normal_(0, 0.1)
    return model.eval()


def test_a_batch_is_the_same_whatever_was_drawn_before_it():
    """Batch 3 drawn alone equals batch 3 drawn after batches 0-2 (as a device that draws batches
    0, 2, 4, ... or one that draws them all): no draw depends on the global RNG or on order."""
    model, options = tiny(), dict(learn_sigma=True)
    alone = draw(model, DDPM("4"), options, torch.tensor([1, 2]), batch_generator(7, 3, "cpu"))
    for k in range(3):
        draw(model, DDPM("4"), options, torch.tensor([0, 4]), batch_generator(7, k, "cpu"))
        torch.randn(100)  # other work in the process between batches
    again = draw(model, DDPM("4"), options, torch.tensor([1, 2]), batch_generator(7, 3, "cpu"))
    assert torch.equal(alone, again)
    other = draw(model, DDPM("4"), options, torch.tensor([1, 2]), batch_generator(7, 4, "cpu"))
    assert not torch.equal(alone, other)


def test_the_generator_of_a_batch_is_seeded_by_seed_and_index():
    """seed·2³² + k: the noise of (seed 1, batch 0) is not that of (seed 0, batch 1)."""
    first = torch.randn(3, generator=batch_generator(1, 0, "cpu"))
    assert torch.equal(first, torch.randn(3, generator=torch.Generator().manual_seed(2**32)))
    assert not torch.equal(first, torch.randn(3, generator=batch_generator(0, 1, "cpu")))


def test_labels_cycle_through_classes_or_come_from_the_batch_generator():
    index = torch.arange(4, 8)
    assert batch_labels(index, [7, 3, 9], 10, batch_generator(0, 0, "cpu")).tolist() == [3, 9, 7, 3]
    a = batch_labels(index, [], 10, batch_generator(0, 1, "cpu"))
    b = batch_labels(index, [], 10, batch_generator(0, 1, "cpu"))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() < 10


def test_draw_is_the_sampler_on_guided_noise_of_the_batch_generator():
    """draw = the batch generator's noise, then the sampler's loop on the guided model, with the same
    generator: what the official sample_ddp.py does per batch (its noise, then p_sample_loop)."""
    from dit.diffusion import create_diffusion, guided

    model, labels = tiny(), torch.tensor([1, 3])
    ours = draw(model, DDIM("ddim5", eta=1.0), dict(learn_sigma=True), labels, batch_generator(0, 2, "cpu"), 3.0)
    generator = batch_generator(0, 2, "cpu")
    noise = torch.randn(2, 1, 4, 4, generator=generator)
    theirs = create_diffusion("ddim5").ddim_sample_loop(
        guided(model, 3.0), noise.shape, noise, model_kwargs=dict(y=labels), generator=generator, eta=1.0
    )
    assert torch.equal(ours, theirs)
