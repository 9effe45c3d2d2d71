"""The DiT of this project as diffusers' `DiTTransformer2DModel` (the class of the hub's
facebook/DiT-XL-2-256) and back, for adaLN-Zero models of any size, patch, channels and classes.

Same weights, other names and layout (diffusers 0.42: models/transformers/dit_transformer_2d.py,
models/attention.py `BasicTransformerBlock`, models/normalization.py `AdaLayerNormZero`):
- every block owns a copy of the t and y embedders (`norm1.emb`), which ours share: written into
  each block, and read back only where all copies agree;
- the fused `qkv` is split into `to_q`, `to_k`, `to_v` (rows [q; k; v], as timm's);
- the adaLN chunk order is the official one (shift, scale, gate for attention, then for the MLP),
  and the final `proj_out_1` gives (shift, scale) as `final_layer.adaLN_modulation` does: no reordering;
- the class table is the same, null class last (diffusers' `LabelEmbedding` always has that row);
- `pos_embed` is no weight there: diffusers' `PatchEmbed` recomputes the same 2-D sin-cos.

One difference no weight can carry: diffusers' `CombinedTimestepLabelEmbeddings` builds its
`Timesteps` with `downscale_freq_shift=1`, frequencies 10000^(-k/127) where the official code has
10000^(-k/128) (k < 128). So a stock diffusers model embeds t slightly differently from the model
trained here; `official_timesteps(transformer)` restores the official frequencies on an instance.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from dit.errors import UsageError
from dit.models.dit import BLOCK_DEFAULTS, DiT

EXPORT_FILE = "dit_export.json"  # what dit.export writes beside the diffusers files: the run's config and manifest
TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")  # the hub's DiT folders name the older class
MLP_RATIO = 4  # diffusers' FeedForward(mult=4) in BasicTransformerBlock: not configurable


def check_convertible(model: DiT) -> None:
    """A UsageError unless `model` is the paper's adaLN-Zero DiT, the only one diffusers' class builds."""
    if model.conditioning != "adaln_zero":
        raise UsageError(
            f"this model's conditioning is {model.conditioning}; diffusers' DiT class (DiTTransformer2DModel) is "
            "adaLN-Zero only: export it as .pt (the default --format)"
        )
    options = [f"{k}={v}" for k, v in model.block_options.items() if v != BLOCK_DEFAULTS[k]]
    if options:
        raise UsageError(
            f"this model's blocks use {', '.join(options)} (conf/blocks/); diffusers' DiT class (DiTTransformer2DModel) "
            "is the paper's adaLN-Zero block only (LayerNorm, GELU MLP, no RoPE, no qk-norm): export it as .pt"
        )
    hidden = model.pos_embed.shape[-1]
    if model.blocks[0].mlp.fc1.out_features != MLP_RATIO * hidden:
        raise UsageError(
            f"this model's MLP is {model.blocks[0].mlp.fc1.out_features / hidden:g}x wide; diffusers' DiT class "
            f"has {MLP_RATIO}x only: export it as .pt"
        )
    if model.y_embedder.embedding_table.num_embeddings != model.num_classes + 1:
        raise UsageError(
            "this model was trained with class_dropout_prob=0 and has no null-class row; diffusers' DiT class "
            "always has one: export it as .pt"
        )


def diffusers_config(model: DiT) -> dict:
    """`DiTTransformer2DModel`'s keywords for `model`."""
    hidden = model.pos_embed.shape[-1]
    return dict(
        num_attention_heads=model.num_heads,
        attention_head_dim=hidden // model.num_heads,
        in_channels=model.in_channels,
        out_channels=model.out_channels,  # 2 * in_channels with learn_sigma: ε then the variance v
        num_layers=len(model.blocks),
        sample_size=model.input_size,
        patch_size=model.patch_size,
        num_embeds_ada_norm=model.num_classes,
        activation_fn="gelu-approximate",
        attention_bias=True,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        # The MLP's LayerNorm (diffusers' norm3) takes this eps; the official code's is 1e-6, diffusers'
        # default 1e-5 (which the hub's facebook/DiT-XL-2-256 config leaves in place).
        norm_eps=1e-6,
    )


def block_names(i: int) -> dict[str, str]:
    """Ours -> diffusers' names of block i's weights (without .weight / .bias), but for the fused qkv."""
    ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
    return {
        ours + "adaLN_modulation.1": theirs + "norm1.linear",
        ours + "attn.proj": theirs + "attn1.to_out.0",
        ours + "mlp.fc1": theirs + "ff.net.0.proj",
        ours + "mlp.fc2": theirs + "ff.net.2",
    }


EMBEDDERS = {  # shared here, one copy per block there (transformer_blocks.{i}.norm1.emb.*)
    "t_embedder.mlp.0": "timestep_embedder.linear_1",
    "t_embedder.mlp.2": "timestep_embedder.linear_2",
    "y_embedder.embedding_table": "class_embedder.embedding_table",
}
TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",  # (shift, scale) in both
    "final_layer.linear": "proj_out_2",
}


def to_diffusers_state_dict(state_dict: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """A DiT state dict (official names) in `DiTTransformer2DModel`'s names."""
    names = dict(TOP)
    for i in range(depth):
        names |= block_names(i)
    out = {}
    for key, value in state_dict.items():
        module, _, param = key.rpartition(".")
        if key == "pos_embed":
            continue  # a buffer there, recomputed
        if m := re.fullmatch(r"blocks\.(\d+)\.attn\.qkv", module):
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3)):
                out[f"transformer_blocks.{m.group(1)}.attn1.{name}.{param}"] = part
            continue
        if module in EMBEDDERS:
            for i in range(depth):
                out[f"transformer_blocks.{i}.norm1.emb.{EMBEDDERS[module]}.{param}"] = value
            continue
        if module not in names:
            raise UsageError(f"the weight {key!r} has no place in diffusers' DiT class")
        out[f"{names[module]}.{param}"] = value
    return out


def from_diffusers_state_dict(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """`DiTTransformer2DModel`'s weights in official names, but `pos_embed` (the model computes it)."""
    for i in range(1, depth):  # the per-block embedder copies must all be block 0's
        for theirs in EMBEDDERS.values():
            for param in ("weight", "bias"):
                key = f"transformer_blocks.{i}.norm1.emb.{theirs}.{param}"
                first = state.get(f"transformer_blocks.0.norm1.emb.{theirs}.{param}")
                if key in state and not torch.equal(state[key], first):
                    raise UsageError(
                        f"block {i}'s copy of the {theirs.split('.')[0]} differs from block 0's (trained apart in "
                        "diffusers?); a DiT of this project has one shared embedder and cannot hold both"
                    )
    names = {theirs: ours for ours, theirs in TOP.items()}
    names |= {f"transformer_blocks.0.norm1.emb.{theirs}": ours for ours, theirs in EMBEDDERS.items()}
    for i in range(depth):
        names |= {theirs: ours for ours, theirs in block_names(i).items()}
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if m := re.fullmatch(r"transformer_blocks\.(\d+)\.attn1\.to_q", module):
            prefix = f"transformer_blocks.{m.group(1)}.attn1."
            parts = [state[f"{prefix}{name}.{param}"] for name in ("to_q", "to_k", "to_v")]
            out[f"blocks.{m.group(1)}.attn.qkv.{param}"] = torch.cat(parts)
        elif module in names:
            out[f"{names[module]}.{param}"] = value
        elif not re.fullmatch(r"transformer_blocks\.\d+\.(attn1\.to_[kv]|norm1\.emb\..*)", module):
            raise UsageError(f"the diffusers weight {key!r} has no place in a DiT of this project")
    return out


def to_diffusers(model: DiT):
    """`model` as a `DiTTransformer2DModel` with the same weights (dtype included), in eval mode."""
    from diffusers import DiTTransformer2DModel

    check_convertible(model)
    transformer = DiTTransformer2DModel(**diffusers_config(model))
    transformer.load_state_dict(to_diffusers_state_dict(model.state_dict(), len(model.blocks)))
    dtype = model.pos_embed.dtype
    return (transformer if dtype == torch.float32 else transformer.to(dtype)).eval()


def official_timesteps(transformer):
    """Give every block's timestep embedding the official frequencies 10000^(-k/128) (downscale_freq_shift
    0 rather than diffusers' 1): then `transformer` computes what the project's DiT computes. On this
    instance only; its saved config cannot say it, and `from_pretrained` builds the stock one again."""
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return transformer


def transformer_folder(path: str | Path) -> Path | None:
    """The diffusers DiT transformer folder `path` is or holds (a pipeline's transformer/), else None."""
    path = Path(path)
    for folder in (path, path / "transformer"):
        config = folder / "config.json"
        if config.is_file():
            try:
                name = json.loads(config.read_text()).get("_class_name")
            except (json.JSONDecodeError, AttributeError):
                continue
            if name in TRANSFORMER_CLASSES:
                return folder
    return None


def model_config(config: dict) -> dict:
    """The DiT keywords of a diffusers DiT config; a UsageError for anything else diffusers builds."""
    wanted = dict(
        norm_type="ada_norm_zero",
        activation_fn="gelu-approximate",
        attention_bias=True,
        norm_elementwise_affine=False,
    )
    for key, value in wanted.items():
        if config.get(key, value) != value:
            raise UsageError(
                f"this diffusers transformer has {key}={config[key]!r}; a DiT of this project reads only DiT's "
                f"adaLN-Zero transformer ({key}={value!r})"
            )
    if config.get("num_embeds_ada_norm") is None or config.get("patch_size") is None:
        raise UsageError("this diffusers transformer has no class embedding or no patches: it is not a DiT")
    channels = config.get("in_channels", 4)
    out_channels = config.get("out_channels") or channels
    if out_channels not in (channels, 2 * channels):
        raise UsageError(
            f"this diffusers transformer maps {channels} channels to {out_channels}; a DiT outputs ε ({channels}) "
            f"or ε and the variance ({2 * channels})"
        )
    heads = config.get("num_attention_heads", 16)
    return dict(
        input_size=config.get("sample_size", 32),
        patch_size=config["patch_size"],
        in_channels=channels,
        hidden_size=heads * config.get("attention_head_dim", 72),
        depth=config.get("num_layers", 28),
        num_heads=heads,
        num_classes=config["num_embeds_ada_norm"],
        learn_sigma=out_channels == 2 * channels,
        conditioning="adaln_zero",
    )


def load_transformer(path: str | Path):
    """The `DiTTransformer2DModel` of a diffusers DiT folder (a transformer folder or a pipeline's)."""
    from diffusers import DiTTransformer2DModel

    folder = transformer_folder(path)
    if folder is None:
        raise UsageError(
            f"{path} is no diffusers DiT folder: neither it nor its transformer/ holds the config.json "
            "of a DiTTransformer2DModel"
        )
    model_config(json.loads((folder / "config.json").read_text()))  # refuse before building what is no DiT
    try:  # low_cpu_mem_usage=False: without `accelerate` diffusers falls back to it anyway, with a warning
        return DiTTransformer2DModel.from_pretrained(folder, low_cpu_mem_usage=False).eval()
    except Exception as err:  # weights missing, truncated, of other shapes, ...
        raise UsageError(f"{folder} is not a readable diffusers transformer ({type(err).__name__}: {err})") from None


def from_diffusers(path_or_model, **overrides) -> DiT:
    """A diffusers DiT (a `DiTTransformer2DModel`, or a folder: the transformer's or a pipeline's) as a
    DiT of this project with the same weights, in float32. `overrides`: DiT keywords (e.g. attention=)."""
    transformer = path_or_model if not isinstance(path_or_model, (str, Path)) else load_transformer(path_or_model)
    config = model_config(dict(transformer.config)) | overrides
    model = DiT(**config)
    state = {k: v.float() for k, v in transformer.state_dict().items()}
    model.load_state_dict(from_diffusers_state_dict(state, config["depth"]) | {"pos_embed": model.pos_embed.data})
    return model.eval()


def read_folder(path: str | Path) -> dict:
    """A diffusers DiT folder as the checkpoint dict the project's readers take (an export's layout:
    weights, "config", "manifest"). A folder that dit.export wrote keeps the run's config and manifest;
    another (e.g. the hub's facebook/DiT-XL-2-256) gets a config read from its diffusers files."""
    path = Path(path)
    folder = transformer_folder(path)
    model = from_diffusers(path)
    record = next((f / EXPORT_FILE for f in (path, folder.parent) if (f / EXPORT_FILE).is_file()), None)
    if record is not None:
        export = json.loads(record.read_text())
        weights = export["manifest"].get("weights", "ema")
        return {"ema" if weights == "ema" else "model": model.state_dict(), **export}
    return {"ema": model.state_dict(), "config": folder_config(path, folder, model), "manifest": {"source": str(path)}}


def folder_config(path: Path, folder: Path, model: DiT) -> dict:
    """The run config a foreign diffusers folder implies: its model; latents of an SD VAE when it is a
    pipeline with a VAE (or has 4 channels), pixels otherwise; its scheduler's training diffusion."""
    from dit.data.decoding import data_are_pixels
    from dit.data.vae import SCALE_FACTOR

    index = path / "model_index.json"
    pipeline = json.loads(index.read_text()) if folder != path and index.is_file() else {}
    has_vae = (pipeline.get("vae") or [None])[0] is not None
    pixels = not has_vae and data_are_pixels(None, model.in_channels)
    vae_config = path / "vae" / "config.json"
    scale = json.loads(vae_config.read_text()).get("scaling_factor", SCALE_FACTOR) if vae_config.is_file() else None
    diffusion = dict(learn_sigma=model.learn_sigma)
    scheduler = path / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        settings = json.loads(scheduler.read_text())
        schedule = {"linear": "linear", "squaredcos_cap_v2": "cosine"}.get(settings.get("beta_schedule"))
        if schedule:
            diffusion |= dict(noise_schedule=schedule, diffusion_steps=settings.get("num_train_timesteps", 1000))
        diffusion["predict_xstart"] = settings.get("prediction_type") == "sample"
    data = dict(
        channels=model.in_channels,
        latent_size=model.input_size,
        num_classes=model.num_classes,
        pixels=pixels,
        scale_factor=1.0 if pixels else scale or SCALE_FACTOR,
    )
    model_keys = model_config(dict(json.loads((folder / "config.json").read_text())))
    return {"model": model_keys, "data": data, "module": {"diffusion": diffusion}}
