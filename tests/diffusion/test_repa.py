"""REPA's objective (dit.diffusion.objectives.REPA): the tokens it aligns, its projector and its loss."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny

from dit.diffusion import REPA, FlowMatching
from dit.errors import UsageError


def test_tokens_after_block_k_are_those_the_blocks_produce():
    torch.manual_seed(0)
    model = tiny(depth=3).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # adaLN-Zero starts as the identity: make the blocks act
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        out, tokens = model(x, t, y, tokens_after=2)
        c = model.t_embedder(t) + model.y_embedder(y, False)
        by_hand = model.x_embedder(x) + model.pos_embed
        for block in model.blocks[:2]:
            by_hand = block(by_hand, c, model.rope)
        torch.testing.assert_close(tokens, by_hand)
        torch.testing.assert_close(out, model(x, t, y))
        assert not torch.allclose(tokens, model(x, t, y, tokens_after=3)[1])


def test_the_alignment_term_is_the_negative_cosine_similarity_per_token():
    """Features equal to the projected tokens (up to scale) give -1, their negatives +1, and the
    flow term is FlowMatching's; λ weighs the sum."""
    torch.manual_seed(0)
    model = tiny(depth=2)
    objective = REPA(weight=0.5, depth=1, encoder_dim=8, projector_dim=16)
    modules = objective.build_modules(model)
    process = objective.process({})
    x0, noise, t, y = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 1, 2])
    x_t = process.interpolate(x0, noise, t)
    with torch.no_grad():
        projected = modules["projector"](model(x_t, t, y, tokens_after=1)[1])
    for features, expected in ((3.0 * projected, -1.0), (-projected, 1.0)):
        terms = objective.losses(model, process, x0, t, dict(y=y), noise, dict(features=features, modules=modules))
        torch.testing.assert_close(terms["repa"], torch.full((3,), expected))
        flow = FlowMatching().losses(model, process, x0, t, dict(y=y), noise)["loss"]
        torch.testing.assert_close(terms["mse"], flow)
        torch.testing.assert_close(terms["loss"], flow + 0.5 * expected)
    # orthogonal features: each feature vector orthogonal to its projected token
    other = torch.randn_like(projected)
    unit = F.normalize(projected, dim=-1)
    other = other - (other * unit).sum(-1, keepdim=True) * unit
    terms = objective.losses(model, process, x0, t, dict(y=y), noise, dict(features=other, modules=modules))
    assert terms["repa"].abs().max() < 1e-5


def test_repa_refuses_what_it_cannot_align():
    model = tiny(depth=2)
    with pytest.raises(UsageError, match="objective.depth=5, but the model has 2 blocks"):
        REPA(depth=5).build_modules(model)
    objective = REPA(depth=1, encoder_dim=8, projector_dim=16)
    modules = objective.build_modules(model)
    process = objective.process({})
    args = (
        model,
        process,
        torch.randn(2, 4, 8, 8),
        torch.rand(2),
        dict(y=torch.tensor([0, 1])),
        torch.randn(2, 4, 8, 8),
    )
    with pytest.raises(UsageError, match="set data.features=true"):
        objective.losses(*args, dict(modules=modules))
    with pytest.raises(UsageError, match="aligns 16 tokens to features of shape \\(9, 8\\)"):
        objective.losses(*args, dict(features=torch.randn(2, 9, 8), modules=modules))


def test_the_projector_trains_with_the_model_but_is_not_exported(tmp_path):
    from functools import partial

    from dit.diffusion import Euler
    from dit.models import backbone_state_dict
    from dit.training.module import DiTModule

    module = DiTModule(
        model=tiny(depth=2),
        optimizer=partial(torch.optim.AdamW, lr=1e-4),
        diffusion={},
        objective=REPA(depth=1, encoder_dim=8, projector_dim=16),
        sampler=Euler(),
        sampling=dict(guidance_scale=1.0, guidance="auto", seed=0),
        compile=False,
    )
    names = [n for n, _ in module.named_parameters()]
    assert any(n.startswith("objective_modules.projector.") for n in names)
    state = module.state_dict()
    assert set(backbone_state_dict({"state_dict": state})) == set(module.model.state_dict())
