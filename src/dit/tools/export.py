"""Export a training checkpoint's EMA weights for sampling and sharing, in the layout of the
official code's training checkpoints: the weights under "ema", which the official sample.py's
`find_model` loads, beside the config that rebuilds the model exactly (head count included) and a
manifest of where they came from. `DiT.from_state_dict`, `dit.sample` and `module.init_from=` read it.

With `--format diffusers`, a folder for diffusers instead (adaLN-Zero models only): a latent model's
`DiTPipeline` (transformer/, scheduler/, and vae/ where the run's VAE is on this machine), a pixel
model's `DiTTransformer2DModel` alone, and `dit_export.json` (the run's config and the manifest).
`dit.sample` and `module.init_from=` read such a folder too (dit.models.diffusers_format).

    python -m dit.export outputs/.../checkpoints/last.ckpt DiT-B-4-ema.pt
    python -m dit.export outputs/.../checkpoints/last.ckpt DiT-B-4-diffusers --format diffusers
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

from dit.config import process_options
from dit.data.decoding import data_are_pixels
from dit.data.shards import META_FILE
from dit.data.vae import SCALE_FACTOR, VAES
from dit.diffusion.flow import is_flow
from dit.errors import ArgumentParser, UsageError, exit_on_usage_error
from dit.models import DiT, backbone_state_dict, describe_state_dict
from dit.models.diffusers_format import EXPORT_FILE, check_convertible, to_diffusers
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


def check_output_folder(source, output):
    """--format diffusers writes a folder: a new one, an empty one, or an earlier diffusers export."""
    if output.exists() and output.resolve() == source.resolve():
        raise UsageError(f"the output {output} is the input checkpoint; give the export a path of its own")
    if output.exists() and not output.is_dir():
        raise UsageError(
            f"the output {output} is a file; --format diffusers writes a folder: give a path such as {output.with_suffix('')}"
        )
    if output.is_dir() and any(output.iterdir()) and not (output / EXPORT_FILE).is_file():
        raise UsageError(
            f"the output {output} is a folder that holds no export of dit.export; remove it or give another path"
        )


def run_vae(config: dict, given: str | None = None) -> str:
    """The VAE a latent run's data were encoded with, as a hub id or a folder: `given` (--vae), else the
    data config's `vae`, else the shards' meta.json (dit.extract records its --vae there), else "ema",
    dit.extract's and dit.sample's default. ft-EMA and ft-MSE share their encoder; only the decoder differs."""
    data = config["data"]
    name = given or data.get("vae")
    meta = Path(str(data["path"])) / META_FILE if data.get("path") else None
    if not name and meta is not None and meta.is_file():
        name = json.loads(meta.read_text()).get("vae")
    name = name or "ema"
    return VAES.get(name, name)


def diffusers_scheduler(options: dict):
    """The run's Gaussian diffusion as a diffusers scheduler: `DDIMScheduler`, the class of the hub's
    facebook/DiT-XL-2-256 (diffusers' scripts/convert_dit_to_diffusers.py writes it: linear, epsilon,
    clip_sample=False). No scheduler with the learned variance would help: DiTPipeline splits the variance
    channels off before the scheduler sees the output. clip_sample=False: the paper never clamps x_0."""
    from diffusers import DDIMScheduler

    steps = options.get("diffusion_steps", 1000)
    scale = 1000 / steps  # the linear schedule stretched to other step counts, as dit.diffusion.process
    schedule = options.get("noise_schedule", "linear")
    return DDIMScheduler(
        num_train_timesteps=steps,
        beta_start=scale * 1e-4,
        beta_end=scale * 0.02,
        beta_schedule={"linear": "linear", "cosine": "squaredcos_cap_v2"}[schedule],  # the same IDDPM cosine
        prediction_type="sample" if options.get("predict_xstart") else "epsilon",
        clip_sample=False,
    )


def replace_folder(new: Path, target: Path) -> None:
    """`new` renamed to `target`; an earlier export there goes only once the new one is whole."""
    old = target.with_name(f"{target.name}.{os.getpid()}.old")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def export_diffusers(checkpoint: dict, source: str | Path, output: Path, which: str = "ema", vae: str | None = None):
    """Write the diffusers folder of a train.py checkpoint to `output`; returns the lines to print."""
    result = export(checkpoint, source, which)
    config = result["config"]
    model = DiT.from_state_dict(result)
    check_convertible(model)
    options = process_options(config)
    if is_flow(options):
        raise UsageError(
            "this run trained a flow (objective=flow); diffusers' DiTPipeline and its schedulers are Gaussian "
            "diffusion with integer timesteps: export it as .pt (the default --format)"
        )
    transformer = to_diffusers(model)
    what = f"the {which} weights of {describe_state_dict(model.state_dict())} (step {checkpoint['global_step']})"
    tmp = output.with_name(f"{output.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    record = {"manifest": result["manifest"], "config": config}
    try:
        if data_are_pixels(config["data"]):
            transformer.save_pretrained(tmp)
            record["load"] = f"DiTTransformer2DModel.from_pretrained('{output}')"
            lines = [
                f"wrote {what} to {output} as a DiTTransformer2DModel alone: a pixel-space model has no VAE, so no "
                f"DiTPipeline; load: {record['load']}"
            ]
        else:
            lines = write_pipeline(tmp, transformer, config, options, record, run_vae(config, vae), what, output)
        (tmp / EXPORT_FILE).write_text(json.dumps(record, indent=2, default=str))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, output)
    if model.num_classes != 1000 and not data_are_pixels(config["data"]):
        lines.append(
            f"note: DiTPipeline takes class 1000 as the null class; this model has {model.num_classes} classes, "
            "so call it with guidance_scale=1 (or sample with python -m dit.sample, which guides with its own)"
        )
    return lines


def write_pipeline(tmp, transformer, config, options, record, vae_id, what, output):
    """A latent model's DiTPipeline into `tmp`, with the VAE where it loads from this machine (the hub
    cache or a folder), else without it and the id in `record`; returns the lines to print."""
    from diffusers import AutoencoderKL, DiTPipeline
    from diffusers.utils import logging as diffusers_logging

    try:
        autoencoder = AutoencoderKL.from_pretrained(vae_id, local_files_only=True)
    except (OSError, ValueError):  # not in the hub cache, no such folder: the user passes it when loading
        autoencoder = None
    scale = config["data"]["scale_factor"]
    if autoencoder is not None:
        autoencoder.register_to_config(scaling_factor=scale)  # DiTPipeline divides the latents by the VAE's
    # No id2label: ImageNet's class names are not bundled here, and DiTPipeline.save_pretrained would not
    # write them anyway (they are not registered to its config); pipe(class_labels=[...]) takes class ids.
    pipe = DiTPipeline(transformer=transformer, vae=autoencoder, scheduler=diffusers_scheduler(options))
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "vae=None cannot be saved": the printed line says what to do
    try:
        pipe.save_pretrained(tmp)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    record |= dict(vae=vae_id, vae_included=autoencoder is not None)
    if autoencoder is not None:
        record["load"] = f"DiTPipeline.from_pretrained('{output}')"
        return [f"wrote {what} with the VAE {vae_id} to {output}; load: {record['load']}"]
    record["load"] = f"DiTPipeline.from_pretrained('{output}', vae=AutoencoderKL.from_pretrained('{vae_id}'))"
    lines = [f"wrote {what} to {output} without its VAE ({vae_id} is not on this machine); load: {record['load']}"]
    if scale != SCALE_FACTOR:
        lines.append(f"note: this run's latents are scaled by {scale}: set the VAE's scaling_factor to it")
    return lines


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a Lightning checkpoint written by train.py")
    parser.add_argument(
        "output", help="where to write the export (.pt, or a folder); an earlier export there is replaced"
    )
    parser.add_argument("--weights", choices=["ema", "live"], default="ema", help="EMA (default, for sampling) or live")
    parser.add_argument(
        "--format", choices=["pt", "diffusers"], default="pt", help="pt (default) or a diffusers folder (adaLN-Zero)"
    )
    parser.add_argument("--vae", help="diffusers, latent runs: the VAE (ema, mse, hub id, folder); default: the run's")
    args = parser.parse_args(argv)
    source, output = Path(args.checkpoint), Path(args.output)
    if args.format != "diffusers" and args.output.endswith(("/", os.sep)):  # Path() drops the slash
        raise UsageError(f"the output {args.output} names a folder; give a file path such as {output / 'ema.pt'}")
    (check_output_folder if args.format == "diffusers" else check_output)(source, output)
    checkpoint = load_weights_file(source)
    if is_export(checkpoint):
        raise UsageError(
            f"{source} is already an export (of {checkpoint['manifest']['source']}, step "
            f"{checkpoint['manifest']['step']}); sample from it or load it as it is"
        )
    if source.is_dir():
        raise UsageError(
            f"{source} is a diffusers folder, not a train.py checkpoint; dit.sample and init_from= read it as it is"
        )
    if not TRAINING_KEYS <= set(checkpoint if isinstance(checkpoint, dict) else ()):
        raise UsageError(f"{source} is not a training checkpoint of train.py (a bare state dict needs no export)")
    if args.format == "diffusers":
        for line in export_diffusers(checkpoint, source, output, args.weights, args.vae):
            print(line)
        return output
    result = export(checkpoint, source, args.weights)
    AtomicCheckpointIO().save_checkpoint(result, output)  # whole or not at all, synced to disk
    state = result["ema" if args.weights == "ema" else "model"]
    print(
        f"wrote the {args.weights} weights of {describe_state_dict(state)} (step {checkpoint['global_step']}) to {output}"
    )
    return output


if __name__ == "__main__":
    exit_on_usage_error(main)
