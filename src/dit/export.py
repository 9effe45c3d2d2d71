"""Export a training checkpoint's EMA weights as a bare DiT state dict, the format of the official
`DiT-XL-2-256x256.pt`: the official sample.py loads it, and so do `DiT.from_state_dict` and
`module.init_from=`.

    python -m dit.export outputs/.../checkpoints/last.ckpt DiT-B-4-ema.pt
"""

import argparse
import sys

import torch

from dit.models import backbone_state_dict, describe_state_dict


def backbone_weights(checkpoint, which="ema"):
    """The backbone's state dict from a Lightning checkpoint of DiTModule.

    With the EMA callback on, the checkpoint's `state_dict` holds the EMA weights and
    `current_model_state` the live ones (Lightning's WeightAveraging layout).
    """
    has_ema = "current_model_state" in checkpoint
    if which == "ema" and not has_ema:
        raise ValueError("this checkpoint holds no EMA weights (trained without the ema callback); export --weights live")
    live = which == "live" and has_ema
    return backbone_state_dict({"state_dict": checkpoint["current_model_state"]} if live else checkpoint)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a Lightning checkpoint written by train.py")
    parser.add_argument("output", help="where to write the bare state dict (.pt)")
    parser.add_argument("--weights", choices=["ema", "live"], default="ema", help="EMA (default, for sampling) or live")
    args = parser.parse_args(argv)
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    try:
        state = backbone_weights(checkpoint, args.weights)
    except ValueError as err:
        sys.exit(f"error: {err}")
    torch.save(state, args.output)
    print(f"wrote the {args.weights} weights of {describe_state_dict(state)} "
          f"(step {checkpoint.get('global_step')}) to {args.output}")  # fmt: skip


if __name__ == "__main__":
    main()
