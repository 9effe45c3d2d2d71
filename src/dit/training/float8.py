"""FP8 training of the blocks' linear layers (`module.float8`): torchao's float8 recipes, or the
project's float8 forward (dit.training.float8_forward).

torchao's `Float8Linear` keeps the fp32 master weight (the same parameter, so the optimizer, the
EMA, checkpoints and exports see an unchanged model) and casts the weight, the layer's input and
its output gradient to float8 e4m3 on every call, with scales computed on the fly from their
absolute maxima: one scale a tensor ("tensorwise", cuBLAS's kernel) or one a row ("rowwise",
CUTLASS's; "rowwise_with_gw_hp" keeps the weight gradient's matmul in bf16). Everything else
stays as under bf16-mixed: the attention, the norms and the adaLN modulation, the diffusion math
and the loss in fp32.

`rowwise_forward` and `tensorwise_forward` (dit.training.float8_forward, no torchao needed) cast
only the forward matmul's operands and keep both gradients' matmuls in bf16.

Only the layers named in `module.float8_layers` are converted. At DiT-XL/2's width the casts cost
more than the fp8 matmul saves in some layers: docs/benchmarks.md measures each layer set.
"""

from __future__ import annotations

import torch
from torch import nn

from dit.errors import UsageError

TORCHAO_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
FORWARD_RECIPES = ("rowwise_forward", "tensorwise_forward")  # dit.training.float8_forward
RECIPES = TORCHAO_RECIPES + FORWARD_RECIPES
LAYERS = ("qkv", "proj", "fc1", "fc2")  # a block's attention and MLP linears (dit.models.dit): the default
OTHER_LAYERS = ("w12", "w3", "q", "kv")  # SwiGLU's (model.mlp=swiglu) and cross-attention's


def check_float8(recipe, layers) -> None:
    """One line for a recipe or a layer list that cannot work, or torchao missing."""
    if isinstance(layers, str):  # module.float8_layers=qkv: one layer, not its letters
        layers = [layers]
    if recipe not in RECIPES:
        raise UsageError(f"module.float8={recipe!r}; use null or one of {', '.join(RECIPES)}")
    unknown = [name for name in layers or () if name not in LAYERS + OTHER_LAYERS]
    if not layers or unknown:
        raise UsageError(
            f"module.float8_layers={list(layers or [])}; list one or more of {', '.join(LAYERS + OTHER_LAYERS)}"
        )
    if recipe in FORWARD_RECIPES:
        return
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise UsageError(
            f"module.float8={recipe} needs torchao: pip install torchao (the release built for your torch)"
        ) from None


def check_float8_device(recipe, device: torch.device, setting: str | None = None, fix: str | None = None) -> None:
    """One line for a device that cannot run the recipe (tensorwise, rowwise, ...): `setting`
    names what asked for it (default module.float8=<recipe>), `fix` what to do instead."""
    setting = setting or f"module.float8={recipe}"
    fix = fix or "set module.float8=null"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise UsageError(
            f"{setting} needs float8 matmuls (compute capability 8.9+: Ada, Hopper, Blackwell); "
            f"{torch.cuda.get_device_name(device)} has none: {fix}"
        )
    # torch's CPU float8 matmul takes one scale per tensor only (torch 2.9); the CPU is for tests.
    if device.type not in ("cuda", "cpu") or (device.type == "cpu" and not recipe.startswith("tensorwise")):
        raise UsageError(f"{setting} runs on CUDA GPUs (tensorwise also on the CPU); {fix}")


def is_float8_layer(module: nn.Module, name: str, layers) -> bool:
    """A linear named one of `layers` (its last name part) whose dimensions float8 matmuls take:
    both divisible by 16 (cuBLAS), as every DiT width is."""
    return (
        isinstance(module, nn.Linear)
        and name.rsplit(".", 1)[-1] in layers
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def swap_linears(blocks: nn.Module, take, make) -> list[str]:
    """Replace each linear of `blocks` for which take(module, name) holds by make(linear, gelu_input),
    in place; returns their names ("blocks.<name>"). An fc2 after a tanh GELU gets gelu_input=True
    and takes the GELU over: the MLP's `act` becomes the identity (the float8 layers fuse the GELU
    into the cast of fc2's input)."""
    replaced = []
    for name, module in list(blocks.named_modules()):
        if not (isinstance(module, nn.Linear) and take(module, name)):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = blocks.get_submodule(parent_name) if parent_name else blocks
        act = getattr(parent, "act", None)
        gelu_input = child == "fc2" and isinstance(act, nn.GELU) and act.approximate == "tanh"
        setattr(parent, child, make(module, gelu_input))
        if gelu_input:
            parent.act = nn.Identity()
        replaced.append(f"blocks.{name}")
    return replaced


def convert_blocks_to_float8(model: nn.Module, recipe: str, layers) -> list[str]:
    """Swap the chosen linears of `model.blocks` for torchao's Float8Linear (or, for the forward
    recipes, Float8ForwardLinear), in place; returns the names of the converted layers. Parameters
    keep their names and order."""
    chosen = {layers} if isinstance(layers, str) else set(layers)
    linears = [(name, m) for name, m in model.blocks.named_modules() if isinstance(m, nn.Linear)]
    take = [name for name, m in linears if is_float8_layer(m, name, chosen)]  # in the blocks' order
    # A chosen name that converts nothing would leave its layers in bf16 without a word (fc1 and fc2 of
    # a SwiGLU model, whose MLP linears are w12 and w3; a width that float8 matmuls cannot take).
    idle = [n for n in LAYERS + OTHER_LAYERS if n in chosen and not any(t.rsplit(".", 1)[-1] == n for t in take)]
    if idle:
        present = {name.rsplit(".", 1)[-1] for name, _ in linears}
        have = [n for n in LAYERS + OTHER_LAYERS if n in present]
        raise UsageError(
            f"module.float8_layers names {', '.join(idle)}, which this model's blocks do not have, or not with both "
            f"dimensions divisible by 16 as float8 matmuls need (their linears: {', '.join(have)}); list those of "
            "them to run in float8"
        )
    if recipe in FORWARD_RECIPES:
        from dit.training.float8_forward import GRANULARITY, Float8ForwardLinear

        return swap_linears(
            model.blocks,
            lambda m, name: name in take,
            lambda linear, gelu: Float8ForwardLinear(linear, GRANULARITY[recipe], gelu),
        )
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    convert_to_float8_training(
        model.blocks, module_filter_fn=lambda m, name: name in take, config=Float8LinearConfig.from_recipe_name(recipe)
    )
    return [f"blocks.{name}" for name in take]
