"""The DiT backbone: "Scalable Diffusion Models with Transformers" (Peebles & Xie, 2022), §3.

One file, read top to bottom: embedders, attention, the transformer blocks of the four
conditioning designs of §3.2 / Fig. 3, the final layer, the DiT model, and the 12 configs of
Table 4. For `conditioning="adaln_zero"` (the paper's choice) parameter names, shapes and meaning
equal the official code's (facebookresearch/DiT), so its released checkpoints load unchanged.
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


#################################################################################
#                                   Attention                                   #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention through `scaled_dot_product_attention` (flash / memory-efficient
    kernels where the device has them). `qkv` rows are [q; k; v], each heads × head_dim, as in
    timm's Attention, so official weights mean the same here."""

    # "sdpa", or "xla_flash": torch_xla's Pallas flash-attention kernel on a TPU, SDPA elsewhere
    # (DiT(attention=...) sets it; conf/model/default.yaml `attention`).
    kernel = "sdpa"

    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise UsageError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.kernel == "xla_flash" and on_tpu(q):
            x = flash_attention(q, k, v)
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class CrossAttention(nn.Module):
    """Multi-head attention from the image tokens to the conditioning tokens [t, c] (§3.2)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context):
        B, N, D = x.shape
        H, hd = self.num_heads, D // self.num_heads
        q = self.q(x).view(B, N, H, hd).transpose(1, 2)
        k, v = self.kv(context).view(B, context.shape[1], 2, H, hd).permute(2, 0, 3, 1, 4)
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


#################################################################################
#                          Transformer blocks (§3.2, Fig. 3)                    #
#################################################################################


class DiTBlock(nn.Module):
    """adaLN-Zero (gated=True) and adaLN (gated=False) blocks.

    The layer norms have no affine parameters: their scale γ and shift β are regressed from the
    sum of the t and c embeddings. adaLN-Zero adds per-channel gates α before each residual and
    initialises the regression to zero, so every block starts as the identity (§3.2).
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, gated=True):
        super().__init__()
        self.gated = gated
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        # Chunk order of the official code: shift, scale, (gate) for attention, then for the MLP.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (6 if gated else 4) * hidden_size))

    def forward(self, x, c):
        if self.gated:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
            x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
            return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class ViTBlock(nn.Module):
    """A standard pre-LN ViT block, for the in-context design (t and c ride along as two extra
    tokens); with `cross_attention=True` a cross-attention layer to the tokens [t, c] follows the
    self-attention (the cross-attention design, §3.2)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, cross_attention=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        if cross_attention:
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x, c):
        x = x + self.attn(self.norm1(x))
        if hasattr(self, "cross_attn"):
            x = x + self.cross_attn(self.norm_cross(x), c)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """Layer norm (adaptive for the adaLN designs), then a linear decoder of each token into its
    p×p×C_out output patch (§3.1, "Transformer decoder")."""

    def __init__(self, hidden_size, patch_size, out_channels, adaptive=True):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=not adaptive, eps=1e-6)
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
    `num_heads` replace that row's values where given (a model off the table)."""

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
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.num_heads = num_heads
        self.conditioning = conditioning
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
        if self.adaptive:
            blocks = (DiTBlock(hidden_size, num_heads, mlp_ratio, design["gated"]) for _ in range(depth))
        else:
            blocks = (ViTBlock(hidden_size, num_heads, mlp_ratio, design["cross"]) for _ in range(depth))
        self.blocks = nn.ModuleList(blocks)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, self.adaptive)
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
        """The paper's name of this config, e.g. "DiT-XL/2" (or "DiT-custom/2" off the table)."""
        return config_name(len(self.blocks), self.pos_embed.shape[-1], self.patch_size)

    def unpatchify(self, x):
        """(N, T, p*p*C) tokens -> (N, C, H, W) latent; channel is fastest within a token."""
        c, p, h = self.out_channels, self.patch_size, self.input_size // self.patch_size
        x = x.reshape(x.shape[0], h, h, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, I, I) noisy latents, t: (N,) integer timesteps, y: (N,) class labels."""
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
        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                tokens = torch.utils.checkpoint.checkpoint(block, tokens, c, use_reentrant=False)
            else:
                tokens = block(tokens, c)
        if self.in_context:
            tokens = tokens[:, 2:]  # §3.2: removed after the final block
        return self.unpatchify(self.final_layer(tokens, c))

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
        it strictly. A train.py checkpoint or an export records its model config, head count
        included; for a bare state dict (the official file) the config is read from the weights'
        shapes, which do not hold the head count: the paper's for its widths (Table 1), and for
        any other width `num_heads=` must be given."""
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
    )


def describe_state_dict(state_dict: dict[str, torch.Tensor]) -> str:
    """A one-line description of the config behind a state dict, e.g.
    "DiT-XL/2 (adaln_zero, 4×32×32 latent, 1000 classes, learned sigma)"."""
    cfg = infer_config(state_dict)
    name = config_name(cfg["depth"], cfg["hidden_size"], cfg["patch_size"])
    size, ch = cfg["input_size"], cfg["in_channels"]
    sigma = "learned sigma" if cfg["learn_sigma"] else "fixed sigma"
    return f"{name} ({cfg['conditioning']}, {ch}×{size}×{size} latent, {cfg['num_classes']} classes, {sigma})"


#################################################################################
#                                 DiT configs (Table 4)                         #
#################################################################################


def config_name(depth: int, hidden_size: int, patch_size: int) -> str:
    size = next((s for s, shape in SIZES.items() if shape[:2] == (depth, hidden_size)), "custom")
    return f"DiT-{size}/{patch_size}"


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
