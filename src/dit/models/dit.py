"""The DiT backbone: "Scalable Diffusion Models with Transformers" (Peebles & Xie, 2022), §3.

One file, read top to bottom: embedders, attention, the transformer blocks of the four
conditioning designs of §3.2 / Fig. 3, the final layer, the DiT model, and the 12 configs of
Table 4. For `conditioning="adaln_zero"` (the paper's choice) parameter names, shapes and meaning
equal the official code's (facebookresearch/DiT), so its released checkpoints load unchanged.

Four later block options, each off by default (`BLOCK_DEFAULTS`, the paper's block), as LightningDiT
chose them (Yao et al. 2025, "Reconstruction vs. Generation"; hustvl/LightningDiT models/lightningdit.py):
`rope` (2-D rotary position embedding on q and k, on top of the sin-cos `pos_embed`), `mlp="swiglu"`,
`norm="rmsnorm"` and `qk_norm`. Off, the model is the paper's bit for bit: same modules, keys and init.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from dit.errors import UsageError
from dit.platform.xla_ops import flash_attention, on_tpu

# The four ways of feeding (t, c) to the blocks, §3.2 / Fig. 3: `adaptive`, the blocks regress
# layer-norm scales and shifts from t + c (adaLN; `gated`: adaLN-Zero's residual gates, zeroed at
# init); otherwise t and c are two tokens, attended to (`cross`) or appended to the sequence.
DESIGNS = {
    "adaln_zero": dict(adaptive=True, gated=True, cross=False),
    "adaln": dict(adaptive=True, gated=False, cross=False),
    "cross_attn": dict(adaptive=False, gated=False, cross=True),
    "in_context": dict(adaptive=False, gated=False, cross=False),
}
CONDITIONINGS = tuple(DESIGNS)
# (depth, hidden size, heads) of each model size: paper Table 1, the one place they are written.
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
# The block options of DiT(...) and their defaults: the paper's block (LayerNorm, GELU MLP, absolute
# positions only). conf/blocks/lightningdit.yaml sets LightningDiT's released choice.
BLOCK_DEFAULTS = dict(rope=False, mlp="gelu", norm="layernorm", qk_norm=False)
MLPS = ("gelu", "swiglu")
NORMS = ("layernorm", "rmsnorm")


def modulate(x, shift, scale):
    """Adaptive layer norm's affine step: per-sample scale and shift regressed from (t, c)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                 Embedding layers for patches, timesteps and labels            #
#################################################################################


class PatchEmbed(nn.Module):
    """Patchify (§3.1): a p×p convolution with stride p, tokens in row-major order."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, C, h, w) -> (N, h*w, D)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the integer timestep (cos half first), then a 2-layer MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256, max_period=10000):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        half = frequency_embedding_size // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        # A buffer, not a parameter: official checkpoints have no such key, and it moves with .to().
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t):
        args = t.float()[:, None] * self.freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row, the null class `num_classes`, for
    classifier-free guidance: while training, each label is replaced by it with probability
    `dropout_prob` (§3.1, "Classifier-free guidance")."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels, train, force_drop_ids=None):
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        if force_drop_ids is not None:
            labels = torch.where(force_drop_ids == 1, self.num_classes, labels)
        return self.embedding_table(labels)


class RotaryEmbedding2D(nn.Module):
    """2-D rotary position embedding (RoFormer, Su et al. 2021, in EVA-02's 2-D form), as LightningDiT
    applies it to q and k (hustvl/LightningDiT models/pos_embed.py, VisionRotaryEmbeddingFast).

    Layout, upstream's: the first half of each head's channels rotates with the token's row, the
    second half with its column. Within a half of d = head_dim/2 channels, the pair (2i, 2i+1) turns
    by the angle pos · θ^(-2i/d), i < d/2, θ = 10000 (adjacent pairs, not the two halves of the half).
    So q_m·k_n depends on the positions m, n only through m - n, on each axis.

    cos and sin are precomputed for the fixed grid of T = grid² tokens in row-major order (PatchEmbed's):
    static shapes, nothing read from the data, so it traces once under torch.compile and XLA. They are
    non-persistent buffers: no state-dict keys, so RoPE leaves no trace in a checkpoint's weights.
    """

    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise UsageError(
                f"rope=True rotates channel pairs on 2 axes, so the head dim (hidden_size / num_heads) must be "
                f"divisible by 4, got {head_dim}; change num_heads or set rope=false"
            )
        half = head_dim // 2
        # float64 for the angles (up to grid · 1 rad), float32 as stored, as sincos_pos_embed_2d.
        freqs = theta ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)  # (half/2,)
        angles = torch.outer(torch.arange(grid_size, dtype=torch.float64), freqs).repeat_interleave(2, dim=1)
        rows = angles[:, None, :].expand(grid_size, grid_size, half)  # token (r, c) -> row r's angles
        cols = angles[None, :, :].expand(grid_size, grid_size, half)  # token (r, c) -> column c's angles
        angles = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def extra_repr(self):
        return f"tokens={self.cos.shape[0]}, head_dim={self.cos.shape[1]}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x (..., T, head_dim): each pair (a, b) -> (a cos - b sin, b cos + a sin)."""
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        # In the buffers' precision (float32 unless the whole model was cast), back to x's dtype, so
        # q and k keep v's dtype for the attention kernel under mixed precision.
        return (x * self.cos + rotated * self.sin).to(x.dtype)


#################################################################################
#                                   Attention                                   #
#################################################################################


class RMSNorm(nn.Module):
    """x / rms(x) · w (Zhang & Sennrich 2019): LayerNorm without centring and without bias. As
    LightningDiT's (LLaMA's) RMSNorm, models/rmsnorm.py: a learnable per-channel weight initialised to 1,
    kept even in the adaLN blocks, where the paper's LayerNorm has no affine parameters; eps 1e-6;
    normalised in float32 and cast back."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(norm, dim, affine):
    """The token norm of the blocks and the final layer: the paper's LayerNorm (eps 1e-6; affine
    only outside the adaLN designs), or RMSNorm, which always has its weight (LightningDiT)."""
    if norm == "rmsnorm":
        return RMSNorm(dim)
    return nn.LayerNorm(dim, elementwise_affine=affine, eps=1e-6)


def make_qk_norm(norm, head_dim):
    """Per-head norm of q or k (Dehghani et al. 2023, ViT-22B). Its kind follows `norm`, as in LightningDiT
    models/lightningdit.py: timm's nn.LayerNorm (affine, torch's eps 1e-5) or RMSNorm (weight, eps 1e-6)."""
    return RMSNorm(head_dim) if norm == "rmsnorm" else nn.LayerNorm(head_dim)


class Attention(nn.Module):
    """Multi-head self-attention through `scaled_dot_product_attention` (flash / memory-efficient
    kernels where the device has them). `qkv` rows are [q; k; v], each heads × head_dim, as in
    timm's Attention, so official weights mean the same here."""

    # "sdpa", or "xla_flash": torch_xla's Pallas flash-attention kernel on a TPU, SDPA elsewhere
    # (DiT(attention=...) sets it; conf/model/default.yaml `attention`).
    kernel = "sdpa"

    def __init__(self, dim, num_heads, qk_norm=False, norm="layernorm"):
        super().__init__()
        if dim % num_heads:
            raise UsageError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qk_norm = qk_norm
        self.qkv = nn.Linear(dim, 3 * dim)
        if qk_norm:  # registered only when on: the paper's block keeps its exact module tree
            self.q_norm = make_qk_norm(norm, dim // num_heads)
            self.k_norm = make_qk_norm(norm, dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        # Norm, then rotate (LightningDiT's order), both before the kernel branch: xla_flash gets the q, k SDPA gets.
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        if self.qk_norm or rope is not None:
            # Under autocast the norms answer in float32 (layer_norm is autocast to it; RMSNorm's float32
            # weight promotes): back to v's dtype, as the Pallas kernel and SDPA want q, k, v alike.
            q, k = q.to(v.dtype), k.to(v.dtype)
        if self.kernel == "xla_flash" and on_tpu(q):
            x = flash_attention(q, k, v)
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class CrossAttention(nn.Module):
    """Multi-head attention from the image tokens to the conditioning tokens [t, c] (§3.2)."""

    def __init__(self, dim, num_heads, qk_norm=False, norm="layernorm"):
        super().__init__()
        self.num_heads = num_heads
        self.qk_norm = qk_norm
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        if qk_norm:  # as the self-attention's: q and k of every attention are normalised
            self.q_norm = make_qk_norm(norm, dim // num_heads)
            self.k_norm = make_qk_norm(norm, dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context):
        B, N, D = x.shape
        H, hd = self.num_heads, D // self.num_heads
        q = self.q(x).view(B, N, H, hd).transpose(1, 2)
        k, v = self.kv(context).view(B, context.shape[1], 2, H, hd).permute(2, 0, 3, 1, 4)
        if self.qk_norm:  # no RoPE here: the keys, t and c, have no grid position
            q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """Pointwise feed-forward: D -> 4D -> D with tanh-approximated GELU (official code)."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """Gated feed-forward w3(silu(x W1) ⊙ x W2) (Shazeer 2020, "GLU Variants Improve Transformer").

    As LightningDiT's SwiGLUFFN (hustvl/LightningDiT models/swiglu_ffn.py, DINOv2's): W1 and W2 are one
    fused linear `w12` (rows [W1; W2]), all three with biases, hidden width int(2/3 · int(mlp_ratio · D))
    (mlp_ratio 4: 8D/3, 3072 at D = 1152), so its 3 matrices cost what the GELU MLP's 2 of width 4D do."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


def make_mlp(mlp, dim, mlp_ratio):
    hidden = int(dim * mlp_ratio)
    # LightningDiT models/lightningdit.py: SwiGLUFFN(hidden_size, int(2/3 * mlp_hidden_dim))
    return SwiGLU(dim, int(2 / 3 * hidden)) if mlp == "swiglu" else Mlp(dim, hidden)


#################################################################################
#                          Transformer blocks (§3.2, Fig. 3)                    #
#################################################################################


class DiTBlock(nn.Module):
    """adaLN-Zero (gated=True) and adaLN (gated=False) blocks.

    The layer norms have no affine parameters: their scale γ and shift β are regressed from the
    sum of the t and c embeddings. adaLN-Zero adds per-channel gates α before each residual and
    initialises the regression to zero, so every block starts as the identity (§3.2).
    `mlp`, `norm`, `qk_norm` and (in forward) `rope`: the block options of `DiT`.
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, gated=True, mlp="gelu", norm="layernorm", qk_norm=False):
        super().__init__()
        self.gated = gated
        self.norm1 = make_norm(norm, hidden_size, affine=False)
        self.attn = Attention(hidden_size, num_heads, qk_norm, norm)
        self.norm2 = make_norm(norm, hidden_size, affine=False)
        self.mlp = make_mlp(mlp, hidden_size, mlp_ratio)
        # Chunk order of the official code: shift, scale, (gate) for attention, then for the MLP.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (6 if gated else 4) * hidden_size))

    def forward(self, x, c, rope=None):
        if self.gated:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
            x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
            return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        return x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class ViTBlock(nn.Module):
    """A standard pre-LN ViT block, for the in-context design (t and c ride along as two extra
    tokens); with `cross_attention=True` a cross-attention layer to the tokens [t, c] follows the
    self-attention (the cross-attention design, §3.2). The block options apply as in `DiTBlock`;
    qk_norm also normalises the cross-attention's q and k; RoPE rotates the self-attention only."""

    def __init__(
        self, hidden_size, num_heads, mlp_ratio=4.0, cross_attention=False, mlp="gelu", norm="layernorm", qk_norm=False
    ):
        super().__init__()
        self.norm1 = make_norm(norm, hidden_size, affine=True)
        self.attn = Attention(hidden_size, num_heads, qk_norm, norm)
        if cross_attention:
            self.norm_cross = make_norm(norm, hidden_size, affine=True)
            self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm, norm)
        self.norm2 = make_norm(norm, hidden_size, affine=True)
        self.mlp = make_mlp(mlp, hidden_size, mlp_ratio)

    def forward(self, x, c, rope=None):
        x = x + self.attn(self.norm1(x), rope)
        if hasattr(self, "cross_attn"):
            x = x + self.cross_attn(self.norm_cross(x), c)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """Layer norm (adaptive for the adaLN designs), then a linear decoder of each token into its
    p×p×C_out output patch (§3.1, "Transformer decoder")."""

    def __init__(self, hidden_size, patch_size, out_channels, adaptive=True, norm="layernorm"):
        super().__init__()
        # norm="rmsnorm" replaces this one too, as LightningDiT's FinalLayer(use_rmsnorm=...)
        self.norm_final = make_norm(norm, hidden_size, affine=not adaptive)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        if adaptive:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        x = self.norm_final(x)
        if hasattr(self, "adaLN_modulation"):
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            x = modulate(x, shift, scale)
        return self.linear(x)


#################################################################################
#                                   The model                                   #
#################################################################################


class DiT(nn.Module):
    """Diffusion Transformer over a C×I×I latent: predicts the noise ε (C channels) and, with
    `learn_sigma`, the variance interpolation v (C more channels) of Improved DDPM.

    `size` is a row of Table 1 (S, B, L, XL: depth, width, heads); `depth`, `hidden_size` and
    `num_heads` replace that row's values where given (a model off the table).

    Block options (LightningDiT's; each off by default, and off the model is the paper's exactly):
    `rope`: 2-D rotary position embedding on the self-attention's q and k, in addition to the sin-cos
    `pos_embed` (it adds no weights: a bare state dict of such a model needs `rope=True` passed to
    `from_state_dict`); refused for in_context, whose t and c tokens have no grid position.
    `mlp="swiglu"`: SwiGLU feed-forward of hidden width int(2/3 · mlp_ratio · D).
    `norm="rmsnorm"`: RMSNorm, with a learnable weight, in place of every LayerNorm (blocks and final layer).
    `qk_norm`: per-head norm of q and k before attention (every attention), of the kind `norm` says.
    None of them changes `name` ("DiT-XL/2" stays "DiT-XL/2")."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        size: str = "XL",
        hidden_size: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        conditioning: str = "adaln_zero",
        activation_checkpointing: bool = False,
        attention: str = "sdpa",
        rope: bool = False,
        mlp: str = "gelu",
        norm: str = "layernorm",
        qk_norm: bool = False,
    ):
        super().__init__()
        if size not in SIZES:
            raise UsageError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)} (paper Table 1)")
        # Table 1's depth, width and heads of `size`, each replaced where given
        depth, hidden_size, num_heads = (
            given or table for given, table in zip((depth, hidden_size, num_heads), SIZES[size])
        )
        if attention not in ("sdpa", "xla_flash"):
            raise UsageError(f"unknown attention {attention!r}; choose sdpa or xla_flash (a TPU's Pallas kernel)")
        if conditioning not in CONDITIONINGS:
            raise UsageError(f"unknown conditioning {conditioning!r}; choose one of {', '.join(CONDITIONINGS)}")
        if input_size % patch_size:
            fits = [p for p in (1, 2, 4, 8, 16) if input_size % p == 0]
            raise UsageError(
                f"patch size {patch_size} does not divide the latent size {input_size}; patch sizes that fit: {fits}"
            )
        for key, value in (("rope", rope), ("qk_norm", qk_norm)):
            if not isinstance(value, bool):
                raise UsageError(f"{key} must be true or false, got {value!r}")
        if mlp not in MLPS:
            raise UsageError(f"unknown mlp {mlp!r}; choose gelu (the paper's) or swiglu (LightningDiT's)")
        if norm not in NORMS:
            raise UsageError(f"unknown norm {norm!r}; choose layernorm (the paper's) or rmsnorm (LightningDiT's)")
        if rope and conditioning == "in_context":
            # Our call: rotating t and c by "no angle" would place them at grid position (0, 0), tied to
            # the top-left patch, which is not "no position"; so RoPE is refused rather than faked.
            raise UsageError(
                "rope=True needs every token on the latent grid, but conditioning=in_context adds t and c tokens "
                "that have no position; set rope=false or use another conditioning"
            )
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.num_heads = num_heads
        self.conditioning = conditioning
        self.block_options = dict(rope=rope, mlp=mlp, norm=norm, qk_norm=qk_norm)
        design = DESIGNS[conditioning]
        self.adaptive, self.in_context = design["adaptive"], not (design["adaptive"] or design["cross"])
        # Recompute each block's activations in the backward pass instead of keeping them: about
        # a third more compute for a fraction of the memory (DiT-XL/2 at large per-GPU batches).
        self.activation_checkpointing = activation_checkpointing

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = (input_size // patch_size) ** 2
        # Fixed 2D sin-cos embedding. Kept as a frozen Parameter (not a buffer) because that is
        # where official checkpoints store it: state_dict key `pos_embed`.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        # One table for all blocks, passed to each (LightningDiT's `feat_rope`); it adds no parameters
        # and no state-dict keys, and None keeps the paper's module tree.
        self.rope = RotaryEmbedding2D(hidden_size // num_heads, input_size // patch_size) if rope else None
        Block = DiTBlock if self.adaptive else ViTBlock
        variant = design["gated"] if self.adaptive else design["cross"]  # DiTBlock's gated, ViTBlock's cross_attention
        self.blocks = nn.ModuleList(
            Block(hidden_size, num_heads, mlp_ratio, variant, mlp, norm, qk_norm) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, self.adaptive, norm)
        for block in self.blocks:
            block.attn.kernel = attention
        self.initialize_weights()

    def initialize_weights(self):
        """As the official code: Xavier-uniform linears, sin-cos positions, N(0, 0.02) embedding
        tables; adaLN-Zero zeroes every modulation, and every design zeroes the final linear, so a
        fresh adaLN-Zero model is the identity in each block and outputs 0."""

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        grid = self.input_size // self.patch_size
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid).unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if DESIGNS[self.conditioning]["gated"]:
            for block in self.blocks:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def name(self):
        """The paper's name of this config, e.g. "DiT-XL/2" (or "DiT-d4w128/2" off the table)."""
        return config_name(len(self.blocks), self.pos_embed.shape[-1], self.patch_size)

    def unpatchify(self, x):
        """(N, T, p*p*C) tokens -> (N, C, H, W) latent; channel is fastest within a token."""
        c, p, h = self.out_channels, self.patch_size, self.input_size // self.patch_size
        x = x.reshape(x.shape[0], h, h, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, tokens_after: int | None = None):
        """x: (N, C, I, I) noisy latents, t: (N,) timesteps, y: (N,) class labels. With
        `tokens_after=k`, also the image tokens (N, T, D) after block k (1-based; REPA's alignment)."""
        self._check_inputs(x, t, y)
        tokens = self.x_embedder(x) + self.pos_embed
        t_emb = self.t_embedder(t)
        y_emb = self.y_embedder(y, self.training)
        if self.adaptive:
            c = t_emb + y_emb  # §3.2: the regression input is the sum of both embeddings
        else:
            c = torch.stack([t_emb, y_emb], dim=1)  # two conditioning tokens
        if self.in_context:
            tokens = torch.cat([c, tokens], dim=1)  # appended like ViT's cls token, no position
        kept = None
        for depth, block in enumerate(self.blocks, 1):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                tokens = torch.utils.checkpoint.checkpoint(block, tokens, c, self.rope, use_reentrant=False)
            else:
                tokens = block(tokens, c, self.rope)
            if depth == tokens_after:
                kept = tokens[:, 2:] if self.in_context else tokens
        if self.in_context:
            tokens = tokens[:, 2:]  # §3.2: removed after the final block
        out = self.unpatchify(self.final_layer(tokens, c))
        return out if tokens_after is None else (out, kept)

    def _check_inputs(self, x, t, y):
        # Shapes are static, so these checks cost nothing under torch.compile or XLA.
        want = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise UsageError(
                f"{self.name} takes latents of shape (N, {want[0]}, {want[1]}, {want[2]}), got {tuple(x.shape)}"
            )
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise UsageError(
                f"t and y must have shape ({x.shape[0]},) to match the batch, got {tuple(t.shape)} and {tuple(y.shape)}"
            )
        # The range of labels is data, not shape: reading it costs a host sync on an accelerator,
        # so it is checked here only on the CPU; the data pipeline checks labels on all devices.
        if y.device.type == "cpu" and y.numel() and not torch.compiler.is_compiling():
            lo, hi = int(y.min()), int(y.max())
            top = self.y_embedder.embedding_table.num_embeddings - 1  # the null class, if any
            if lo < 0 or hi > top:
                raise UsageError(
                    f"labels must lie in [0, {top}] for {self.num_classes} classes, got labels in [{lo}, {hi}]"
                )

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """As nn.Module's, but a checkpoint of another config fails by naming both configs."""
        if strict:
            theirs, ours = describe_state_dict(state_dict), describe_state_dict(self.state_dict())
            if theirs != ours:
                raise UsageError(
                    f"this checkpoint holds {theirs}, but the model is {ours}; "
                    f"build the model as DiT.from_state_dict(state_dict) or with those settings"
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def from_state_dict(cls, checkpoint: dict, **overrides) -> DiT:
        """Build the model a checkpoint describes (any of `backbone_state_dict`'s forms) and load
        it strictly. A train.py checkpoint or an export records its model config, head count and
        block options included; for a bare state dict (the official file) the config is read from
        the weights' keys and shapes, which do not hold the head count: the paper's for its widths
        (Table 1), and for any other width `num_heads=` must be given. They show mlp="swiglu",
        norm="rmsnorm" and qk_norm (infer_config), but not RoPE, which has no weights: a bare state
        dict of a `rope=True` model needs `rope=True` passed here, or it loads as a model without it."""
        state_dict = backbone_state_dict(checkpoint)
        run_config = checkpoint.get("config")
        recorded = run_config.get("model") if isinstance(run_config, dict) else None
        config = {k: v for k, v in recorded.items() if k != "_target_"} if recorded else infer_config(state_dict)
        config |= overrides
        if config["num_heads"] is None:
            raise UsageError(
                f"this state dict has width {config['hidden_size']}, off the paper's table, and does not record "
                "its head count: pass num_heads= (dit.sample: --num-heads)"
            )
        model = cls(**config)
        model.load_state_dict(state_dict)
        return model


def sincos_pos_embed_2d(dim, grid_size):
    """Fixed 2D sin-cos position embedding (MAE code, used by DiT), computed in float64.

    The first dim/2 channels encode each token's column, the last dim/2 its row; each half is
    [sin(pos·ω), cos(pos·ω)] with ω_k = 1 / 10000^(k / (dim/4)).
    """
    if dim % 4:
        raise UsageError(f"hidden size {dim} must be divisible by 4 for the 2D sin-cos embedding")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid_size, dtype=torch.float64), torch.arange(grid_size, dtype=torch.float64), indexing="ij"
    )

    def embed_1d(pos):
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()


#################################################################################
#                     Reading a checkpoint's config from its weights            #
#################################################################################


def backbone_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The DiT weights inside any checkpoint this project meets: a bare state dict (the official
    `DiT-XL-2-256x256.pt`), an official training checkpoint or an export of `python -m dit.export`
    (its "ema"; an export of live weights: its "model"), or a train.py checkpoint (its Lightning
    "state_dict", which holds the EMA under "model.")."""
    if "ema" in checkpoint:
        return checkpoint["ema"]
    if isinstance(checkpoint.get("model"), dict) and "manifest" in checkpoint:
        return checkpoint["model"]
    if "state_dict" in checkpoint:
        return {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    return checkpoint


def infer_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """The constructor arguments a DiT state dict was made with, read from its keys and shapes."""
    try:
        hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
        tokens = state_dict["pos_embed"].shape[1]
        out_dim = state_dict["final_layer.linear.weight"].shape[0]
        table = state_dict["y_embedder.embedding_table.weight"].shape[0]
    except KeyError as err:
        raise UsageError(f"not a DiT state dict: it has no {err.args[0]!r} entry") from None
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    if "blocks.0.adaLN_modulation.1.weight" in state_dict:
        gated = state_dict["blocks.0.adaLN_modulation.1.weight"].shape[0] == 6 * hidden
        conditioning = "adaln_zero" if gated else "adaln"
    else:
        conditioning = "cross_attn" if "blocks.0.cross_attn.q.weight" in state_dict else "in_context"
    # Weights do not record the head count: the paper's for its widths (Table 1), None (unknown) for others.
    heads = {width: heads for _, width, heads in SIZES.values()}.get(hidden)
    # The block options that leave weights (RoPE leaves none): SwiGLU's fused `w12`; RMSNorm's weight
    # without LayerNorm's bias (the adaLN blocks' LayerNorm has neither); q_norm's weight.
    rms = "blocks.0.norm1.weight" in state_dict and "blocks.0.norm1.bias" not in state_dict
    found = dict(
        mlp="swiglu" if "blocks.0.mlp.w12.weight" in state_dict else "gelu",
        norm="rmsnorm" if rms else "layernorm",
        qk_norm="blocks.0.attn.q_norm.weight" in state_dict,
    )
    # Listed only where they differ from the paper's block, so a paper model's config reads as it always has.
    options = {key: value for key, value in found.items() if value != BLOCK_DEFAULTS[key]}
    return dict(
        input_size=int(round(math.sqrt(tokens))) * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        # The table has one extra row (the null class) whenever class dropout was on.
        num_classes=table - 1,
        learn_sigma=out_dim == 2 * in_channels * patch * patch,
        conditioning=conditioning,
        **options,
    )


def describe_state_dict(state_dict: dict[str, torch.Tensor]) -> str:
    """A one-line description of the config behind a state dict, e.g.
    "DiT-XL/2 (adaln_zero, 4×32×32 latent, 1000 classes, learned sigma)"; block options the weights
    show follow the design: "DiT-XL/2 (adaln_zero, swiglu, rmsnorm, 4×32×32 latent, ...)"."""
    cfg = infer_config(state_dict)
    name = config_name(cfg["depth"], cfg["hidden_size"], cfg["patch_size"])
    size, ch = cfg["input_size"], cfg["in_channels"]
    sigma = "learned sigma" if cfg["learn_sigma"] else "fixed sigma"
    shown = [cfg[key] for key in ("mlp", "norm") if key in cfg] + (["qk_norm"] if cfg.get("qk_norm") else [])
    options = "".join(f", {option}" for option in shown)
    return f"{name} ({cfg['conditioning']}{options}, {ch}×{size}×{size} latent, {cfg['num_classes']} classes, {sigma})"


#################################################################################
#                                 DiT configs (Table 4)                         #
#################################################################################


def config_name(depth: int, hidden_size: int, patch_size: int) -> str:
    """DiT-XL/2 for a row of paper Table 1; off the table, the depth and width: DiT-d4w128/2."""
    size = next((s for s, shape in SIZES.items() if shape[:2] == (depth, hidden_size)), None)
    return f"DiT-{size or f'd{depth}w{hidden_size}'}/{patch_size}"


def _paper_config(size, patch_size):
    def build(**kwargs):
        return DiT(size=size, patch_size=patch_size, **kwargs)

    build.__name__ = build.__qualname__ = f"DiT_{size}_{patch_size}"
    return build


class _ConfigTable(dict):
    def __missing__(self, name):
        raise KeyError(f"unknown model {name!r}; choose one of {', '.join(self)}")


# The 12 configs of Table 4, as the official models.py names them: DiT_models["DiT-XL/2"](input_size=32)
DiT_models = _ConfigTable({f"DiT-{size}/{patch}": _paper_config(size, patch) for size in SIZES for patch in (2, 4, 8)})
