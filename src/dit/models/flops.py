"""Gflops and parameters of DiT configs, measured by running the model, in the paper's convention.

Convention (paper Table 4, and the paper's author in facebookresearch/DiT#14): the theoretical
cost of one forward pass for one image, a multiply-add counted as ONE flop (i.e. GMACs),
classifier-free guidance not doubled, the VAE excluded. Hardware FLOPs are twice these.

    python -m dit.flops                    # the 12 configs of Table 4 + the conditioning ablation
    python -m dit.flops --image-size 512   # the same at 512px (64×64 latents)
    python -m dit.flops --blocks           # DiT-XL/2 with each block option of LightningDiT, then all four

The counter sees matmuls, convolutions and attention, not elementwise work: norms, activations
and RoPE's rotation (O(T·D) per block, against the matmuls' O(T·D²)) count 0, as in the paper's totals.
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dit.errors import ArgumentParser, UsageError, exit_on_usage_error
from dit.models import CONDITIONINGS, DiT_models


def count_gflops(model: torch.nn.Module) -> float:
    """Forward Gflops (multiply-adds) of `model` for one image, counted by torch's flop counter."""
    device = model.pos_embed.device
    x = torch.randn(1, model.in_channels, model.input_size, model.input_size, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    # The counter has formulas for the matmuls and for the CUDA attention kernels, but not for
    # the CPU's fused attention, which would drop the T²·D attention term: force the math backend,
    # whose matmuls it sees.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.eval()(x, t, y)
    return counter.get_total_flops() / 2 / 1e9


def count_params(model):
    """All parameters, the frozen position embedding included, as the official code counts them."""
    return sum(p.numel() for p in model.parameters())


def describe(model: torch.nn.Module) -> dict:
    """Name, conditioning, Gflops, parameters and tokens of a model (build it on the meta device
    to pay no memory and no compute: `with torch.device("meta"): model = DiT(...)`)."""
    tokens = (model.input_size // model.patch_size) ** 2
    return dict(
        name=model.name,
        conditioning=model.conditioning,
        gflops=count_gflops(model),
        params=count_params(model),
        tokens=tokens,
    )


def measure(name: str, conditioning: str = "adaln_zero", image_size: int = 256, **block_options) -> tuple:
    """(Gflops, parameters, tokens) of one of the paper's configs, with any block options of DiT
    (rope=, mlp=, norm=, qk_norm=)."""
    with torch.device("meta"):
        d = describe(DiT_models[name](input_size=image_size // 8, conditioning=conditioning, **block_options))
    return d["gflops"], d["params"], d["tokens"]


# The rows of `--blocks`: the paper's block, each LightningDiT option alone, all four, and
# LightningDiT's released choice (conf/blocks/lightningdit.yaml: no qk_norm).
BLOCK_ROWS = {
    "paper block (DiT)": {},
    "+rope": dict(rope=True),
    "+swiglu": dict(mlp="swiglu"),
    "+rmsnorm": dict(norm="rmsnorm"),
    "+qk_norm": dict(qk_norm=True),
    "all four": dict(rope=True, mlp="swiglu", norm="rmsnorm", qk_norm=True),
    "LightningDiT (rope, swiglu, rmsnorm)": dict(rope=True, mlp="swiglu", norm="rmsnorm"),
}


def print_blocks_table(name: str = "DiT-XL/2", image_size: int = 256) -> None:
    """Gflops and parameters of `name` with each block option (BLOCK_ROWS), and the change from the paper's block."""
    print(
        f"{name} at {image_size}px, adaln_zero, by block option. Gflops: forward pass, one image, multiply-add = 1 flop."
    )
    print("| block | Gflops | Δ Gflops | params (M) | Δ params |")
    print("|---|---|---|---|---|")
    base_gflops = base_params = None
    for label, options in BLOCK_ROWS.items():
        gflops, params, _ = measure(name, image_size=image_size, **options)
        if base_gflops is None:  # the first row, the paper's block, is the reference
            base_gflops, base_params = gflops, params
        print(
            f"| {label} | {gflops:.2f} | {gflops - base_gflops:+.3f} | {params / 1e6:.2f} | {params - base_params:+,d} |"
        )


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=256, help="image size in pixels (latent = size / 8)")
    parser.add_argument("--blocks", action="store_true", help="one model with each block option instead (--model)")
    parser.add_argument("--model", default="DiT-XL/2", choices=list(DiT_models), help="the model of --blocks")
    args = parser.parse_args(argv)
    patch = int(args.model.split("/")[1]) if args.blocks else 8  # the table's largest patch
    if args.image_size < 8 * patch or args.image_size % (8 * patch):
        raise UsageError(
            f"--image-size {args.image_size}: the latent (1/8 of it) must be a positive multiple of the patch {patch}; "
            f"give a multiple of {8 * patch}, e.g. 256"
        )
    if args.blocks:
        return print_blocks_table(args.model, args.image_size)
    rows = [(name, "adaln_zero") for name in DiT_models]
    rows += [("DiT-XL/2", c) for c in CONDITIONINGS if c != "adaln_zero"]
    print(f"DiT at {args.image_size}px. Gflops: forward pass, one image, multiply-add = 1 flop (paper convention).")
    print("| model | conditioning | tokens | Gflops | params (M) |")
    print("|---|---|---|---|---|")
    for name, conditioning in rows:
        gflops, params, tokens = measure(name, conditioning, args.image_size)
        print(f"| {name} | {conditioning} | {tokens} | {gflops:.2f} | {params / 1e6:.2f} |")


def cli():
    """The `dit-flops` console script: usage errors in one line, as `python -m dit.flops`."""
    exit_on_usage_error(main)


if __name__ == "__main__":
    cli()
