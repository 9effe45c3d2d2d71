"""The backbone (dit.models.dit) against the paper (§3) and the official code's layout and meaning."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny

from dit.models import CONDITIONINGS, DiT, DiT_models, describe_state_dict, infer_config


def randomize(model, seed=0):
    """Give every parameter non-trivial values, as a trained checkpoint has (zero-init hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def official_keys(depth, D, patch, tokens, out_channels=8, classes=1000):
    """The state-dict layout of the official DiT (its models.py), written out by hand."""
    keys = {
        "pos_embed": (1, tokens, D),
        "x_embedder.proj.weight": (D, 4, patch, patch),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256),
        "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D),
        "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (classes + 1, D),
        "final_layer.linear.weight": (patch * patch * out_channels, D),
        "final_layer.linear.bias": (patch * patch * out_channels,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D),
        "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for i in range(depth):
        keys |= {
            f"blocks.{i}.attn.qkv.weight": (3 * D, D),
            f"blocks.{i}.attn.qkv.bias": (3 * D,),
            f"blocks.{i}.attn.proj.weight": (D, D),
            f"blocks.{i}.attn.proj.bias": (D,),
            f"blocks.{i}.mlp.fc1.weight": (4 * D, D),
            f"blocks.{i}.mlp.fc1.bias": (4 * D,),
            f"blocks.{i}.mlp.fc2.weight": (D, 4 * D),
            f"blocks.{i}.mlp.fc2.bias": (D,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * D, D),
            f"blocks.{i}.adaLN_modulation.1.bias": (6 * D,),
        }
    return keys


def reference_forward(sd, x, t, y, patch, heads):
    """The official DiT forward written from its description with plain tensor ops and an
    explicit softmax(QKᵀ/√d)V (timm 0.6 Attention), reading weights straight from the state dict."""
    D = sd["pos_embed"].shape[-1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    tok = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half).to(x.dtype)
    arg = t.to(x.dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)
    t_emb = F.linear(
        F.silu(F.linear(emb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
        sd["t_embedder.mlp.2.weight"],
        sd["t_embedder.mlp.2.bias"],
    )
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]
    B, N, _ = tok.shape
    hd = D // heads
    for i in range(depth):
        p = f"blocks.{i}."
        mod = F.linear(F.silu(c), sd[p + "adaLN_modulation.1.weight"], sd[p + "adaLN_modulation.1.bias"])
        sh1, sc1, g1, sh2, sc2, g2 = mod.split(D, dim=1)
        n = F.layer_norm(tok, (D,), eps=1e-6) * (1 + sc1[:, None]) + sh1[:, None]
        qkv = F.linear(n, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(B, N, 3, heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * hd**-0.5).softmax(-1) @ v
        att = F.linear(att.transpose(1, 2).reshape(B, N, D), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        tok = tok + g1[:, None] * att
        n = F.layer_norm(tok, (D,), eps=1e-6) * (1 + sc2[:, None]) + sh2[:, None]
        m = F.gelu(F.linear(n, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]), approximate="tanh")
        tok = tok + g2[:, None] * F.linear(m, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    sh, sc = F.linear(
        F.silu(c), sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"]
    ).split(D, dim=1)
    out = F.linear(
        F.layer_norm(tok, (D,), eps=1e-6) * (1 + sc[:, None]) + sh[:, None],
        sd["final_layer.linear.weight"],
        sd["final_layer.linear.bias"],
    )
    g = int(N**0.5)
    C = out.shape[-1] // (patch * patch)
    out = out.reshape(B, g, g, patch, patch, C)  # (n, h, w, p, q, c) -> (n, c, h, p, w, q)
    return out.permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * patch, g * patch)


@pytest.mark.parametrize("image_size", [256, 512])
def test_adaln_zero_state_dict_layout_equals_official(image_size):
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=image_size // 8)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_keys(28, 1152, 2, (image_size // 16) ** 2)


def test_official_weights_mean_the_same_here():
    """A checkpoint in the official layout, with random values, loads strictly and gives the
    official forward's output."""
    donor = randomize(tiny(num_classes=1000))
    sd = {k: v.double() for k, v in donor.state_dict().items()}
    assert set(sd) == set(official_keys(2, 64, 2, 16))
    model = tiny(num_classes=1000).double().eval()
    model.load_state_dict(sd)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 500, 999])
    y = torch.tensor([1, 999, 1000])  # 1000: the null class of guidance
    ref = reference_forward(sd, x, t, y, patch=2, heads=4)
    out = model(x, t, y)
    assert out.shape == (3, 8, 8, 8)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_pos_embed_equals_mae_recipe():
    # MAE's numpy recipe: grid = meshgrid(grid_w, grid_h); first half encodes grid[0].
    D, gs = 32, 4
    grid = np.stack(np.meshgrid(np.arange(gs, dtype=np.float64), np.arange(gs, dtype=np.float64)), 0)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    expected = np.concatenate([one_d(D // 2, grid[0]), one_d(D // 2, grid[1])], axis=1)
    model = tiny(hidden_size=D, num_heads=2, input_size=8, patch_size=2)
    np.testing.assert_allclose(model.pos_embed[0].numpy(), expected.astype(np.float32), rtol=0, atol=1e-7)
    assert not model.pos_embed.requires_grad


def test_fresh_adaln_zero_model_outputs_zero():
    model = tiny()
    x = torch.randn(4, 4, 8, 8)
    out = model(x, torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,)))
    assert torch.count_nonzero(out) == 0
    # ...because each block starts as the identity: its gates are zero.
    block = model.blocks[0]
    tokens = torch.randn(2, 16, 64)
    torch.testing.assert_close(block(tokens, torch.randn(2, 64)), tokens)


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
@pytest.mark.parametrize("name", list(DiT_models))
@pytest.mark.parametrize("latent", [32, 64])
def test_output_shape_of_every_config(name, conditioning, latent):
    # Meta tensors run the real forward's shape logic without the compute of the big configs.
    with torch.device("meta"):
        model = DiT_models[name](input_size=latent, conditioning=conditioning).eval()
        out = model(
            torch.empty(2, 4, latent, latent), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)
        )
    assert out.shape == (2, 8, latent, latent)
    assert model.name == name


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_forward_backward_on_cpu(conditioning):
    model = randomize(tiny(conditioning=conditioning, input_size=16, patch_size=4, in_channels=3, learn_sigma=False))
    x = torch.randn(2, 3, 16, 16)
    out = model.train()(x, torch.tensor([3, 700]), torch.tensor([0, 9]))
    assert out.shape == (2, 3, 16, 16)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad and not name.startswith("y_embedder"):  # rows of unused labels get no grad
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert model.pos_embed.grad is None


def test_conditioning_changes_output():
    model = randomize(tiny(conditioning="in_context")).eval()
    x = torch.randn(1, 4, 8, 8)
    a = model(x, torch.tensor([10]), torch.tensor([1]))
    assert not torch.allclose(a, model(x, torch.tensor([10]), torch.tensor([2])))
    assert not torch.allclose(a, model(x, torch.tensor([11]), torch.tensor([1])))


def test_label_dropout_uses_null_class_only_in_training():
    model = tiny(class_dropout_prob=1.0)
    emb = model.y_embedder
    labels = torch.arange(10)
    null = emb.embedding_table.weight[10]
    assert torch.equal(emb(labels, train=True), null.expand(10, -1))
    assert torch.equal(emb(labels, train=False), emb.embedding_table.weight[:10])
    forced = emb(labels, train=False, force_drop_ids=(labels % 2 == 0).long())
    assert torch.equal(forced[0], null) and torch.equal(forced[1], emb.embedding_table.weight[1])


def test_label_dropout_rate():
    torch.manual_seed(0)
    emb = tiny(class_dropout_prob=0.1).y_embedder
    labels = torch.zeros(20000, dtype=torch.long)
    dropped = (emb(labels, train=True) == emb.embedding_table.weight[10]).all(1).float().mean()
    assert abs(dropped.item() - 0.1) < 0.01


def test_checkpoint_roundtrip_builds_the_right_config():
    donor = randomize(tiny(conditioning="cross_attn", num_classes=7, in_channels=3, learn_sigma=False))
    cfg = infer_config(donor.state_dict())
    # Weights do not record the head count: off the paper's widths it is unknown, never guessed.
    assert cfg == dict(
        input_size=8,
        patch_size=2,
        in_channels=3,
        hidden_size=64,
        depth=2,
        num_heads=None,
        num_classes=7,
        learn_sigma=False,
        conditioning="cross_attn",
    )
    with pytest.raises(
        ValueError, match="width 64, off the paper's table, and does not record its head count: pass num_heads="
    ):
        DiT.from_state_dict({"ema": donor.state_dict(), "opt": {}})
    model = DiT.from_state_dict({"ema": donor.state_dict(), "opt": {}}, num_heads=4)
    x = torch.randn(2, 3, 8, 8)
    t, y = torch.tensor([1, 2]), torch.tensor([3, 7])
    torch.testing.assert_close(model.eval()(x, t, y), donor.eval()(x, t, y), rtol=0, atol=0)


def test_official_xl2_checkpoint_is_recognised():
    with torch.device("meta"):
        sd = DiT_models["DiT-XL/2"](input_size=64).state_dict()
    assert describe_state_dict(sd) == "DiT-XL/2 (adaln_zero, 4×64×64 latent, 1000 classes, learned sigma)"


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(KeyError, match="unknown model 'DiT-M/2'.*DiT-XL/2"):
        DiT_models["DiT-M/2"]


def test_unknown_conditioning_lists_the_choices():
    with pytest.raises(ValueError, match="unknown conditioning 'adaLN-zero'.*adaln_zero, adaln, cross_attn"):
        tiny(conditioning="adaLN-zero")


def test_patch_size_must_divide_latent():
    with pytest.raises(ValueError, match=r"patch size 4 does not divide the latent size 10.*\[1, 2\]"):
        tiny(input_size=10, patch_size=4)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 4, 16, 16), (4, 8, 8)])
def test_wrong_input_shape_is_named(shape):
    with pytest.raises(ValueError, match=r"DiT-d2w64/2 takes latents of shape \(N, 4, 8, 8\)"):
        tiny()(torch.randn(shape), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))


def test_labels_out_of_range():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\] for 10 classes, got labels in \[0, 11\]"):
        tiny()(torch.randn(2, 4, 8, 8), torch.zeros(2, dtype=torch.long), torch.tensor([0, 11]))


def test_checkpoint_of_another_config_is_named():
    with torch.device("meta"):
        sd = DiT_models["DiT-B/4"]().state_dict()
        model = DiT_models["DiT-XL/2"]()
    with pytest.raises(ValueError, match=r"holds DiT-B/4 \(adaln_zero.*but the model is DiT-XL/2"):
        model.load_state_dict(sd)


def test_not_a_dit_state_dict():
    with pytest.raises(ValueError, match="not a DiT state dict"):
        DiT.from_state_dict({"weight": torch.zeros(1)})
