"""The block options of dit.models.DiT (LightningDiT's: rope, mlp=swiglu, norm=rmsnorm, qk_norm): each
against its definition written out by hand, the options-off model against the paper's, their weights
read back from a state dict, their parameters and Gflops against closed forms, and their config group."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CONF, compose_cfg, tiny
from hydra.utils import instantiate
from omegaconf import OmegaConf

import dit.models.dit as dit_module
import dit.models.flops as flops_module
from dit.errors import UsageError
from dit.models import BLOCK_DEFAULTS, CONDITIONINGS, DiT, DiT_models, describe_state_dict, infer_config
from dit.models.dit import RMSNorm, RotaryEmbedding2D
from dit.models.flops import count_gflops, count_params, measure
from dit.models.flops import main as flops_main

ALL_FOUR = dict(rope=True, mlp="swiglu", norm="rmsnorm", qk_norm=True)
LIGHTNINGDIT = dict(rope=True, mlp="swiglu", norm="rmsnorm", qk_norm=False)  # its released config


def randomize(model, seed=0):
    """Non-trivial values in every parameter (adaLN-Zero's zero init would hide most of the blocks)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def inputs(n=2, channels=4, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=g), torch.tensor([3, 900][:n]), torch.tensor([1, 7][:n])


def unit_qk_norms(model):
    """q_norm and k_norm back to weight 1 (bias 0): per-head norms of q and k are then sqrt(head_dim)."""
    for name, m in model.named_modules():
        if name.endswith(("q_norm", "k_norm")):
            torch.nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                torch.nn.init.zeros_(m.bias)
    return model


class SdpaSpy:
    """Records the q, k, v that reach scaled_dot_product_attention, then runs it."""

    def __init__(self, monkeypatch):
        self.calls, self.real = [], F.scaled_dot_product_attention
        monkeypatch.setattr(F, "scaled_dot_product_attention", self)

    def __call__(self, q, k, v, *args, **kwargs):
        self.calls.append((q, k, v))
        return self.real(q, k, v, *args, **kwargs)


# ------------------------------------------------------------------ options off: the paper's model


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_options_off_is_the_paper_model_exactly(conditioning):
    torch.manual_seed(0)
    plain = tiny(conditioning=conditioning)
    rng_plain = torch.get_rng_state()
    torch.manual_seed(0)
    spelled = tiny(conditioning=conditioning, **BLOCK_DEFAULTS)
    # Same init RNG consumption, same module tree, same keys in the same order, same values.
    assert torch.equal(torch.get_rng_state(), rng_plain)
    assert repr(spelled) == repr(plain)
    assert [n for n, _ in spelled.named_modules()] == [n for n, _ in plain.named_modules()]
    assert list(spelled.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(spelled.state_dict().values(), plain.state_dict().values()))
    assert spelled.rope is None and infer_config(spelled.state_dict()) == infer_config(plain.state_dict())
    x, t, y = inputs()
    assert torch.equal(randomize(spelled).eval()(x, t, y), randomize(plain).eval()(x, t, y))


def test_defaults_agree_everywhere():
    # BLOCK_DEFAULTS, DiT's signature, conf/model/default.yaml and conf/blocks/dit.yaml say the same.
    signature = inspect.signature(DiT).parameters
    assert {k: signature[k].default for k in BLOCK_DEFAULTS} == BLOCK_DEFAULTS
    default_yaml = OmegaConf.load(CONF / "model" / "default.yaml")
    assert {k: default_yaml[k] for k in BLOCK_DEFAULTS} == BLOCK_DEFAULTS
    assert OmegaConf.to_container(OmegaConf.load(CONF / "blocks" / "dit.yaml")) == BLOCK_DEFAULTS
    assert OmegaConf.to_container(OmegaConf.load(CONF / "blocks" / "lightningdit.yaml")) == LIGHTNINGDIT


@pytest.mark.parametrize("options", [dict(rope=True), ALL_FOUR])
def test_options_keep_the_size_name(options):
    with torch.device("meta"):
        assert DiT_models["DiT-XL/2"](**options).name == "DiT-XL/2"


# ------------------------------------------------------------------ RoPE


def test_rope_table_is_lightningdits_layout():
    # hustvl/LightningDiT models/pos_embed.py (VisionRotaryEmbeddingFast(dim=head_dim/2)): the first
    # head_dim/2 channels turn with the row, the rest with the column; pair (2i, 2i+1) at
    # frequency 10000^(-2i/(head_dim/2)); tokens in row-major order.
    head_dim, grid = 16, 4
    rope = RotaryEmbedding2D(head_dim, grid)
    half = head_dim // 2
    for token in range(grid * grid):
        row, col = divmod(token, grid)
        for j in range(head_dim):
            pos, i = (row, j // 2) if j < half else (col, (j - half) // 2)
            angle = pos * 10000 ** (-2 * i / half)
            assert rope.cos[token, j].item() == pytest.approx(math.cos(angle), abs=1e-6)
            assert rope.sin[token, j].item() == pytest.approx(math.sin(angle), abs=1e-6)


def test_rope_scores_depend_on_relative_position_only():
    head_dim, grid = 16, 4
    rope = RotaryEmbedding2D(head_dim, grid)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(head_dim, generator=g), torch.randn(head_dim, generator=g)
    # The same q and k at every grid position: the score of (m, n) is a function of m - n alone.
    scores = (rope(q.expand(grid * grid, head_dim)) @ rope(k.expand(grid * grid, head_dim)).T).view(
        grid, grid, grid, grid
    )
    by_offset = {}
    for r1, c1, r2, c2 in torch.cartesian_prod(*[torch.arange(grid)] * 4).tolist():
        by_offset.setdefault((r1 - r2, c1 - c2), []).append(scores[r1, c1, r2, c2])
    for values in by_offset.values():
        assert max(values) - min(values) < 1e-5
    # ...and of both components: moving along a row or along a column changes it.
    assert abs(by_offset[(0, 0)][0] - by_offset[(1, 0)][0]) > 1e-3
    assert abs(by_offset[(0, 0)][0] - by_offset[(0, 1)][0]) > 1e-3
    # Each axis turns its own half of the channels: a pure row shift leaves the column half unturned.
    out = rope(q.expand(grid * grid, head_dim)).view(grid, grid, head_dim)
    assert torch.equal(out[0, :, :8], out[0, :1, :8].expand(grid, 8))
    assert torch.equal(out[:, 0, 8:], out[:1, 0, 8:].expand(grid, 8))


def test_attention_scores_are_shift_equivariant_with_rope(monkeypatch):
    # Through the real attention: tokens whose content moves one column right keep their q·k scores
    # (RoPE alone, no absolute position: the attention module of a block).
    grid, D = 4, 64
    attn = randomize(tiny(rope=True)).blocks[0].attn
    rope = RotaryEmbedding2D(D // 4, grid)
    g = torch.Generator().manual_seed(3)
    content = torch.randn(1, grid, grid, D, generator=g)
    shifted = torch.zeros_like(content)
    shifted[:, :, 1:] = content[:, :, :-1]
    spy = SdpaSpy(monkeypatch)
    with torch.no_grad():
        attn(content.reshape(1, grid * grid, D), rope)
        attn(shifted.reshape(1, grid * grid, D), rope)
        attn(shifted.reshape(1, grid * grid, D), None)
    (q0, k0, _), (q1, k1, _), (q2, k2, _) = spy.calls
    before = (q0 @ k0.transpose(-1, -2)).view(4, grid, grid, grid, grid)[:, :, :-1, :, :-1]
    after = (q1 @ k1.transpose(-1, -2)).view(4, grid, grid, grid, grid)[:, :, 1:, :, 1:]
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    # RoPE really reached the kernel: without it q, k differ from the rotated ones.
    assert not torch.allclose(q1, q2, atol=1e-3) and not torch.allclose(k1, k2, atol=1e-3)


@pytest.mark.parametrize("conditioning", ["adaln_zero", "adaln", "cross_attn"])
def test_rope_changes_the_output_and_adds_no_weights(conditioning):
    plain = randomize(tiny(conditioning=conditioning))
    rotary = tiny(conditioning=conditioning, rope=True)
    assert list(rotary.state_dict()) == list(plain.state_dict())  # non-persistent buffers only
    assert count_params(rotary) == count_params(plain)
    rotary.load_state_dict(plain.state_dict())
    x, t, y = inputs()
    assert not torch.allclose(rotary.eval()(x, t, y), plain.eval()(x, t, y), atol=1e-4)


def test_rope_runs_before_the_xla_flash_kernel(monkeypatch):
    # No TPU here: pretend there is one, with a stand-in kernel that records what it is given.
    seen = []

    def fake_flash(q, k, v):
        seen.append((q, k))
        return F.scaled_dot_product_attention(q, k, v)

    monkeypatch.setattr(dit_module, "on_tpu", lambda tensor: True)
    monkeypatch.setattr(dit_module, "flash_attention", fake_flash)
    reference = unit_qk_norms(randomize(tiny(rope=True, qk_norm=True)))
    flash = tiny(rope=True, qk_norm=True, attention="xla_flash")
    flash.load_state_dict(reference.state_dict())
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(flash.eval()(x, t, y), reference.eval()(x, t, y), rtol=0, atol=0)
    assert len(seen) == 2  # one call per block, none fell back to SDPA
    q, k = seen[0]
    norms = q.norm(dim=-1)  # normalised (then rotated: a rotation keeps the norm)
    torch.testing.assert_close(norms, torch.full_like(norms, 4.0), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_xla_flash_kernel_gets_q_k_in_vs_dtype_under_autocast(monkeypatch, norm):
    # Autocast runs layer_norm in float32 and RMSNorm's float32 weight promotes, while v comes from a
    # bf16 matmul; SDPA is autocast itself, the Pallas kernel is not: it must get q, k, v alike.
    dtypes = []

    def fake_flash(q, k, v):
        dtypes.append((q.dtype, k.dtype, v.dtype))
        return F.scaled_dot_product_attention(q, k, v)

    monkeypatch.setattr(dit_module, "on_tpu", lambda tensor: True)
    monkeypatch.setattr(dit_module, "flash_attention", fake_flash)
    model = tiny(rope=True, qk_norm=True, norm=norm, attention="xla_flash").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(*inputs())
    assert dtypes == [(torch.bfloat16,) * 3] * 2


def test_rope_is_refused_where_tokens_have_no_position():
    with pytest.raises(UsageError, match="rope=True needs every token on the latent grid.*in_context.*rope=false"):
        tiny(conditioning="in_context", rope=True)
    with pytest.raises(UsageError, match="head dim .* divisible by 4, got 6; change num_heads or set rope=false"):
        tiny(hidden_size=24, num_heads=4, rope=True)


# ------------------------------------------------------------------ SwiGLU, RMSNorm, qk_norm by hand


def test_swiglu_equals_its_formula():
    block = randomize(tiny(mlp="swiglu")).blocks[0]
    D, H = 64, int(2 / 3 * 4 * 64)  # LightningDiT: int(2/3 * int(mlp_ratio * D)) = 170
    w12, w3 = block.mlp.w12, block.mlp.w3
    assert (w12.weight.shape, w3.weight.shape) == ((2 * H, D), (D, H))
    W1, W2, b1, b2 = w12.weight[:H], w12.weight[H:], w12.bias[:H], w12.bias[H:]
    x = torch.randn(2, 5, D)
    by_hand = (F.silu(x @ W1.T + b1) * (x @ W2.T + b2)) @ w3.weight.T + w3.bias
    torch.testing.assert_close(block.mlp(x), by_hand)
    with torch.device("meta"):
        assert DiT_models["DiT-XL/2"](mlp="swiglu").blocks[0].mlp.w3.in_features == 3072  # 8·1152/3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_equals_its_formula(dtype):
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 64))
    x = (torch.randn(3, 7, 64) * 5 + 1).to(dtype)
    x32 = x.float()
    by_hand = (x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype) * norm.weight
    torch.testing.assert_close(norm(x), by_hand)


@pytest.mark.parametrize("conditioning", ["adaln_zero", "cross_attn"])
def test_rmsnorm_replaces_every_layernorm_with_a_weight(conditioning):
    model = tiny(conditioning=conditioning, norm="rmsnorm")
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    norms = [n for n, m in model.named_modules() if isinstance(m, RMSNorm)]
    # LightningDiT keeps RMSNorm's weight even in the adaLN blocks (models/rmsnorm.py), and its final norm.
    assert "final_layer.norm_final" in norms and "blocks.0.norm1" in norms and "blocks.1.norm2" in norms
    assert all(f"{n}.weight" in model.state_dict() and f"{n}.bias" not in model.state_dict() for n in norms)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_qk_norm_bounds_q_and_k(monkeypatch, norm):
    model = unit_qk_norms(randomize(tiny(qk_norm=True, norm=norm)))
    kind = RMSNorm if norm == "rmsnorm" else torch.nn.LayerNorm  # timm / LightningDiT: the kind `norm` says
    assert isinstance(model.blocks[0].attn.q_norm, kind) and isinstance(model.blocks[0].attn.k_norm, kind)
    spy = SdpaSpy(monkeypatch)
    x, t, y = inputs()
    with torch.no_grad():
        model.eval()(x * 1000, t, y)
    for q, k, _ in spy.calls:
        for z in (q, k):
            norms = z.norm(dim=-1)
            torch.testing.assert_close(norms, torch.full_like(norms, 4.0), rtol=1e-3, atol=1e-3)  # sqrt(16)


@pytest.mark.parametrize("conditioning", ["adaln_zero", "cross_attn"])
def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k(conditioning):
    # q_norm(a·q) = q_norm(q): scaling the q and k rows of every projection (weights and biases) by 30
    # leaves the output as it was with qk_norm, and changes it without (the control).
    def scaled(model):
        copy = tiny(conditioning=conditioning, **model.block_options)
        copy.load_state_dict(model.state_dict())
        with torch.no_grad():
            for block in copy.blocks:
                block.attn.qkv.weight[: 2 * 64] *= 30
                block.attn.qkv.bias[: 2 * 64] *= 30
                if conditioning == "cross_attn":
                    for p in (block.cross_attn.q.weight, block.cross_attn.q.bias):
                        p *= 30
                    for p in (block.cross_attn.kv.weight, block.cross_attn.kv.bias):
                        p[:64] *= 30
        return copy

    x, t, y = inputs()
    with torch.no_grad():
        normed = randomize(tiny(conditioning=conditioning, qk_norm=True)).eval()
        torch.testing.assert_close(scaled(normed).eval()(x, t, y), normed(x, t, y), rtol=1e-4, atol=1e-4)
        plain = randomize(tiny(conditioning=conditioning)).eval()
        assert not torch.allclose(scaled(plain).eval()(x, t, y), plain(x, t, y), atol=1e-2)


def test_adaln_zero_block_with_all_four_equals_a_hand_written_one():
    # The whole block from its description, plain tensor ops and an explicit softmax(QKᵀ/√d)V:
    # RMSNorm (weight) -> modulate -> qkv -> per-head RMSNorm of q, k -> 2-D RoPE -> attention -> gate;
    # RMSNorm -> modulate -> SwiGLU -> gate (hustvl/LightningDiT models/lightningdit.py LightningDiTBlock).
    model = randomize(tiny(**ALL_FOUR))
    block, sd = model.blocks[0], {k.removeprefix("blocks.0."): v for k, v in model.state_dict().items()}
    B, T, D, heads, hd = 2, 16, 64, 4, 16
    g = torch.Generator().manual_seed(5)
    x, c = torch.randn(B, T, D, generator=g), torch.randn(B, D, generator=g)

    def rms(z, w):
        return z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def rotate(z):  # token (r, c): pairs 0-3 (channels 0-7) turn by r·ω_i, pairs 4-7 by c·ω_i, ω_i = 10000^(-2i/8)
        omega = 10000 ** (-torch.arange(0, 8, 2) / 8)
        rows, cols = torch.arange(T) // 4, torch.arange(T) % 4
        angle = torch.cat([rows[:, None] * omega, cols[:, None] * omega], 1)  # (T, 8 pairs)
        a, b = z[..., 0::2], z[..., 1::2]
        return torch.stack([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], -1).flatten(-2)

    mod = F.linear(F.silu(c), sd["adaLN_modulation.1.weight"], sd["adaLN_modulation.1.bias"])
    sh1, sc1, g1, sh2, sc2, g2 = (m[:, None] for m in mod.split(D, dim=1))
    n = rms(x, sd["norm1.weight"]) * (1 + sc1) + sh1
    q, k, v = F.linear(n, sd["attn.qkv.weight"], sd["attn.qkv.bias"]).view(B, T, 3, heads, hd).permute(2, 0, 3, 1, 4)
    q, k = rotate(rms(q, sd["attn.q_norm.weight"])), rotate(rms(k, sd["attn.k_norm.weight"]))
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v
    h = x + g1 * F.linear(attn.transpose(1, 2).reshape(B, T, D), sd["attn.proj.weight"], sd["attn.proj.bias"])
    n = rms(h, sd["norm2.weight"]) * (1 + sc2) + sh2
    gate, value = F.linear(n, sd["mlp.w12.weight"], sd["mlp.w12.bias"]).chunk(2, -1)
    by_hand = h + g2 * F.linear(F.silu(gate) * value, sd["mlp.w3.weight"], sd["mlp.w3.bias"])
    torch.testing.assert_close(block(x, c, model.rope), by_hand, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ weights -> config, round trips


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
@pytest.mark.parametrize(
    "options",
    [dict(mlp="swiglu"), dict(norm="rmsnorm"), dict(qk_norm=True), dict(norm="rmsnorm", qk_norm=True)],
    ids=["swiglu", "rmsnorm", "qk_norm", "rmsnorm+qk_norm"],
)
def test_infer_config_reads_the_options_that_leave_weights(conditioning, options):
    cfg = infer_config(tiny(conditioning=conditioning, **options).state_dict())
    assert {k: cfg[k] for k in BLOCK_DEFAULTS if k in cfg} == options  # only the non-paper ones are listed
    assert infer_config(tiny(conditioning=conditioning).state_dict()).keys().isdisjoint(BLOCK_DEFAULTS)


@pytest.mark.parametrize("conditioning", ["adaln_zero", "cross_attn"])
def test_bare_state_dict_round_trip_with_all_four(conditioning):
    donor = randomize(tiny(conditioning=conditioning, **ALL_FOUR)).eval()
    x, t, y = inputs()
    model = DiT.from_state_dict(donor.state_dict(), num_heads=4, rope=True)  # RoPE is not in the weights
    assert model.block_options == ALL_FOUR
    torch.testing.assert_close(model.eval()(x, t, y), donor(x, t, y), rtol=0, atol=0)
    forgot = DiT.from_state_dict(donor.state_dict(), num_heads=4)  # loads, but as a model without RoPE
    assert forgot.rope is None and not torch.allclose(forgot.eval()(x, t, y), donor(x, t, y), atol=1e-4)


def test_recorded_config_round_trip_keeps_rope():
    # A train.py checkpoint: Lightning's "state_dict" (the EMA under "model.") and the run's model config.
    config = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10, **LIGHTNINGDIT)
    donor = randomize(DiT(**config)).eval()
    checkpoint = {
        "state_dict": {f"model.{k}": v for k, v in donor.state_dict().items()},
        "config": {"model": {"_target_": "dit.models.DiT", **config}},
    }
    model = DiT.from_state_dict(checkpoint)
    assert model.block_options == LIGHTNINGDIT
    x, t, y = inputs()
    torch.testing.assert_close(model.eval()(x, t, y), donor(x, t, y), rtol=0, atol=0)


def test_description_names_the_options_and_a_mismatch_is_one_line():
    sd = tiny(mlp="swiglu", norm="rmsnorm", qk_norm=True).state_dict()
    assert (
        describe_state_dict(sd)
        == "DiT-d2w64/2 (adaln_zero, swiglu, rmsnorm, qk_norm, 4×8×8 latent, 10 classes, learned sigma)"
    )
    with pytest.raises(
        UsageError,
        match=r"holds DiT-d2w64/2 \(adaln_zero, swiglu, rmsnorm, qk_norm.*but the model is DiT-d2w64/2 \(adaln_zero, 4",
    ):
        tiny().load_state_dict(sd)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mlp="relu"), "unknown mlp 'relu'; choose gelu .* or swiglu"),
        (dict(norm="batchnorm"), "unknown norm 'batchnorm'; choose layernorm .* or rmsnorm"),
        (dict(rope="yes"), "rope must be true or false, got 'yes'"),
        (dict(qk_norm=1), "qk_norm must be true or false, got 1"),
    ],
)
def test_bad_values_are_one_line_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message) as err:
        tiny(**kwargs)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ parameters and Gflops: closed forms

# tiny(): depth L = 2, width D = 64, heads 4 (head dim 16), T = (8/2)² = 16 tokens.
L, D, HD, T = 2, 64, 16, 16
H_GELU, H_SWIGLU = 4 * D, int(2 / 3 * 4 * D)  # 256, 170
# Per block. GELU MLP: fc1 (D·H + H) + fc2 (H·D + D); SwiGLU: w12 (2·D·h + 2h) + w3 (h·D + D).
SWIGLU_PARAMS = (3 * D * H_SWIGLU + 2 * H_SWIGLU + D) - (2 * D * H_GELU + H_GELU + D)
SWIGLU_MACS = 3 * D * H_SWIGLU - 2 * D * H_GELU  # per token: multiply-adds of the matrices


def closed_form(conditioning, options):
    """(Δ parameters, Δ multiply-adds) of a tiny() model with `options` against the paper's block."""
    attentions = L * (2 if conditioning == "cross_attn" else 1)
    tokens = T + 2 if conditioning == "in_context" else T  # in-context: t and c ride through the blocks
    params = macs = 0
    if options.get("mlp") == "swiglu":
        params, macs = params + L * SWIGLU_PARAMS, macs + L * tokens * SWIGLU_MACS
    if options.get("norm") == "rmsnorm":
        if conditioning in ("adaln_zero", "adaln"):  # 2 weightless LayerNorms per block + the final: gain a weight
            params += (2 * L + 1) * D
        else:  # affine LayerNorms (2 per block, 3 with cross-attention, + the final) lose their bias
            params -= ((3 if conditioning == "cross_attn" else 2) * L + 1) * D
    if options.get("qk_norm"):  # q_norm and k_norm per attention: weight (+ bias for LayerNorm) of head_dim
        params += attentions * 2 * HD * (1 if options.get("norm") == "rmsnorm" else 2)
    return params, macs  # RoPE: no parameters, and its rotation is elementwise (no multiply-adds counted)


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
@pytest.mark.parametrize(
    "options",
    [dict(rope=True), dict(mlp="swiglu"), dict(norm="rmsnorm"), dict(qk_norm=True), ALL_FOUR],
    ids=["rope", "swiglu", "rmsnorm", "qk_norm", "all_four"],
)
def test_params_and_gflops_match_closed_forms(conditioning, options):
    if conditioning == "in_context" and options.get("rope"):
        options = {k: v for k, v in options.items() if k != "rope"}
    with torch.device("meta"):
        paper, model = tiny(conditioning=conditioning), tiny(conditioning=conditioning, **options)
    d_params, d_macs = closed_form(conditioning, options)
    assert count_params(model) - count_params(paper) == d_params
    assert (count_gflops(model) - count_gflops(paper)) * 1e9 == pytest.approx(d_macs, abs=1e-3)


def test_swiglu_at_xl2_costs_the_gelu_mlps_flops():
    # 8D/3 is whole at D = 1152 (h = 3072): 3·D·h = 2·D·4D, so the matmul Gflops do not move; each block
    # gains 2h - 4D = 1536 biases. Paper block: 675,129,632 parameters (official train.py).
    with torch.device("meta"):
        assert count_params(DiT_models["DiT-XL/2"](mlp="swiglu")) == 675_129_632 + 28 * (2 * 3072 - 4 * 1152)
    assert 3 * 1152 * 3072 == 2 * 1152 * 4 * 1152
    # Measured where it is quick: DiT-S/2 (D = 384, h = 1024 = 8D/3 too) keeps its Gflops exactly.
    assert measure("DiT-S/2", mlp="swiglu")[0] == measure("DiT-S/2")[0]


def test_blocks_table_command(capsys, monkeypatch):
    assert list(flops_module.BLOCK_ROWS) == [
        "paper block (DiT)",
        "+rope",
        "+swiglu",
        "+rmsnorm",
        "+qk_norm",
        "all four",
        "LightningDiT (rope, swiglu, rmsnorm)",
    ]
    assert flops_module.BLOCK_ROWS["all four"] == ALL_FOUR and flops_module.BLOCK_ROWS["+rope"] == dict(rope=True)
    # Three of the rows, on the smallest config, to keep this test quick.
    rows = {k: flops_module.BLOCK_ROWS[k] for k in ("paper block (DiT)", "+rope", "+qk_norm")}
    monkeypatch.setattr(flops_module, "BLOCK_ROWS", rows)
    flops_main(["--blocks", "--model", "DiT-S/8"])
    out = capsys.readouterr().out
    assert out.startswith("DiT-S/8 at 256px, adaln_zero, by block option.")
    table = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and "Gflops" not in line]
    assert [r[0] for r in table] == ["| paper block (DiT)", "| +rope", "| +qk_norm"]
    assert table[0][1] == "0.36" and float(table[0][3]) == pytest.approx(33, rel=0.01)  # paper Table 4: DiT-S/8
    assert table[1][1:] == [table[0][1], "+0.000", table[0][3], "+0 |"]  # RoPE: no parameters, no matmuls
    assert table[2][4] == f"+{12 * 4 * 64:,d} |"  # qk_norm, LayerNorm kind: 12 blocks × 2 norms × (w + b) × 64


# ------------------------------------------------------------------ training path, compile, config


def test_all_four_train_with_activation_checkpointing():
    x, t, y = inputs()
    grads = []
    for checkpointing in (False, True):
        model = randomize(tiny(activation_checkpointing=checkpointing, **ALL_FOUR)).train()
        torch.manual_seed(0)  # the same label dropout
        model(x, t, y).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert all(g is not None and g.abs().sum() > 0 for g in grads[0].values())  # every new weight learns
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name])


def test_all_four_compile_as_one_graph():
    model = randomize(tiny(depth=1, **ALL_FOUR)).eval()
    x, t, y = inputs()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="eager", fullgraph=True)  # a graph break would raise
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, t, y), model(x, t, y))
    finally:
        torch._dynamo.reset()


def test_blocks_config_group_builds_lightningdit(tmp_path):
    cfg = compose_cfg(["blocks=lightningdit", "model=tiny", "data=digits"], tmp_path)
    model = instantiate(cfg.model)
    assert model.block_options == LIGHTNINGDIT and model.rope is not None
    cfg = compose_cfg(["model=tiny", "data=digits"], tmp_path)  # train.yaml's default: blocks=dit
    assert instantiate(cfg.model).block_options == BLOCK_DEFAULTS
