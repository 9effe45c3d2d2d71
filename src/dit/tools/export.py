"""Export a training checkpoint's EMA weights for sampling and sharing, in the layout of the
official code's training checkpoints: the weights under "ema", which the official sample.py's
`find_model` loads, beside the config that rebuilds the model exactly (head count included) and a
manifest of where they came from. `DiT.from_state_dict`, `dit.sample` and `module.init_from=` read it.

    python -m dit.export outputs/.../checkpoints/last.ckpt DiT-B-4-ema.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dit.errors import ArgumentParser, UsageError, exit_on_usage_error
from dit.models import backbone_state_dict, describe_state_dict
from dit.training.checkpoints import AtomicCheckpointIO, load_weights_file, read_checkpoint
from dit.training.manifest import code_version, weights_digest

TRAINING_KEYS = {"state_dict", "global_step", "loops"}  # what a train.py (Lightning) checkpoint holds


def backbone_weights(checkpoint, which="ema"):
    """The backbone's state dict from a Lightning checkpoint of DiTModule.

    With the EMA callback on, the checkpoint's `state_dict` holds the EMA weights and
    `current_model_state` the live ones (Lightning's WeightAveraging layout).
    """
    has_ema = "current_model_state" in checkpoint
    if which == "ema" and not has_ema:
        raise UsageError(
            "this checkpoint holds no EMA weights (trained without the ema callback); export --weights live"
        )
    live = which == "live" and has_ema
    return backbone_state_dict({"state_dict": checkpoint["current_model_state"]} if live else checkpoint)


def is_export(checkpoint):
    return isinstance(checkpoint, dict) and (checkpoint.get("manifest") or {}).get("kind") == "export"


def export(checkpoint: dict, source: str | Path, which: str = "ema") -> dict:
    """The export of a train.py checkpoint: {"ema" (or "model" for the live weights): the weights,
    "config": the model, data and diffusion settings of the run, "manifest": what they are}."""
    state = backbone_weights(checkpoint, which)
    config = checkpoint["config"]
    manifest = dict(
        kind="export",
        weights=which,
        source=str(source),
        step=checkpoint["global_step"],
        run=checkpoint.get("manifest"),
        weights_digest=weights_digest(state),
        code=code_version(),
    )
    return {
        "ema" if which == "ema" else "model": state,
        "config": {
            "model": config["model"],
            "data": config["data"],
            "module": {k: config["module"][k] for k in ("diffusion", "objective") if k in config["module"]},
        },
        "manifest": manifest,
    }


def check_output(source, output):
    """The output may be a new file or an earlier export; never the input, nor a training checkpoint."""
    if output.exists() and output.resolve() == source.resolve():
        raise UsageError(f"the output {output} is the input checkpoint; give the export a path of its own")
    if output.is_dir():
        raise UsageError(f"the output {output} is a folder; give a file path such as {output / 'ema.pt'}")
    if output.exists():
        try:
            existing = read_checkpoint(output, verify=False)
        except UsageError:
            existing = None
        if existing is not None:
            raise UsageError(
                f"the output {output} is a training checkpoint (step {existing['global_step']}); "
                "an export never replaces one: give another path"
            )
        try:
            earlier = torch.load(output, map_location="cpu", weights_only=False, mmap=True)
        except Exception:  # not a torch file at all
            earlier = None
        if not is_export(earlier):
            raise UsageError(
                f"the output {output} exists and is not an export of dit.export; remove it or give another path"
            )


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a Lightning checkpoint written by train.py")
    parser.add_argument("output", help="where to write the export (.pt); an earlier export there is replaced")
    parser.add_argument("--weights", choices=["ema", "live"], default="ema", help="EMA (default, for sampling) or live")
    args = parser.parse_args(argv)
    source, output = Path(args.checkpoint), Path(args.output)
    check_output(source, output)
    checkpoint = load_weights_file(source)
    if is_export(checkpoint):
        raise UsageError(
            f"{source} is already an export (of {checkpoint['manifest']['source']}, step "
            f"{checkpoint['manifest']['step']}); sample from it or load it as it is"
        )
    if not TRAINING_KEYS <= set(checkpoint if isinstance(checkpoint, dict) else ()):
        raise UsageError(f"{source} is not a training checkpoint of train.py (a bare state dict needs no export)")
    result = export(checkpoint, source, args.weights)
    AtomicCheckpointIO().save_checkpoint(result, output)  # whole or not at all, synced to disk
    state = result["ema" if args.weights == "ema" else "model"]
    print(
        f"wrote the {args.weights} weights of {describe_state_dict(state)} (step {checkpoint['global_step']}) to {output}"
    )
    return output


if __name__ == "__main__":
    exit_on_usage_error(main)
