"""Sample from a DiT checkpoint: a folder of PNGs, a grid, and the .npz that ADM's evaluation suite
reads (`arr_0`, N×H×W×3 uint8), as the official sample_ddp.py.

    # FID-50K of the headline (paper Table 2): cfg 1.5, 250 DDPM steps, ft-EMA decoder, all GPUs
    python -m dit.sample DiT-XL-2-256x256.pt samples/xl2-256-cfg1.5 --num-samples 50000 --guidance-scale 1.5 --vae ema
    # Table 4 and the scaling study: no guidance, ft-MSE decoder
    python -m dit.sample outputs/b4/checkpoints/last.ckpt samples/b4 --num-samples 50000 --guidance-scale 1 --vae mse
    # a few pictures of chosen classes, as the paper's figures (guidance 4.0), with 50 DDIM steps
    python -m dit.sample DiT-XL-2-256x256.pt samples/figure --num-samples 16 --classes 207,360,387,974 \
        --guidance-scale 4 sampler=ddim sampler.steps=ddim50
    # then: python evaluator.py VIRTUAL_imagenet256_labeled.npz samples/xl2-256-cfg1.5.npz  (ADM's suite)
    # a flow model (objective=flow): REPA's protocol, SDE 250 steps, guidance 1.8 for t <= 0.7, 50 per class
    python -m dit.sample outputs/repa/checkpoints/last.ckpt samples/repa --guidance-scale 1.8 \
        --guidance-interval 0 0.7 --labels balanced sampler=sde

Writes `<out_dir>/{index:06d}.png`, `<out_dir>.npz` and the grid `<out_dir>.png`.

Labels: uniform random (`--labels random`, the official protocol), exactly N/classes of each class
(`--labels balanced`; REPA-E's README re-evaluated REPA's 1.42 as 1.28 and LightningDiT's 1.35 as
1.25 this way), or `--classes` cycled. Guidance intervals are in each process's own time, 0 the data
and 1 the noise: a flow's t, the Gaussian diffusion's timestep / 1000, which are not the same noise
levels. The folder's manifest records the labels protocol,
the sampler, its function evaluations per sample (NFE), the guidance and the seed, and dit.fid's
figures carry that record.

`--float8 rowwise|tensorwise` runs the blocks' linears as float8 matmuls with the weights quantised
once (dit.models.float8_sampling; GPUs of compute capability 8.9+, tensorwise also on the CPU),
usually with `--precision bf16-mixed`; the manifest records it, as it changes the samples.

Settings are spelled as in train.py's config: `--guidance-scale`, `--guidance`, `--vae`, `--seed`,
`--batch-size`, `--compile`, `--precision` are the keys of `module.sampling` and `callbacks.fid`
(with Lightning's precision names); the sampler is the same config group, `sampler=NAME` and
`sampler.KEY=VALUE` (conf/sampler/; default ddpm, 250 steps).

Checkpoints: a train.py checkpoint (its config says the model and the data; its `state_dict` holds
the EMA weights), an export of `python -m dit.export`, or the official `DiT-XL-2-256x256.pt`; a bare
state dict describes its model (DiT.from_state_dict) and is taken as VAE latents when it has 4
channels, as pixels when it has 1 or 3. Pixel-space models (the quickstart's digits) are saved as
they are; VAE latents are decoded with the Stable Diffusion VAE (dit.data.vae).

Determinism: batch k holds samples [kB, (k+1)B), its labels, noise and every step's noise come from
`dit.diffusion.batch_generator(seed, k)`, and batches go round-robin to the devices; so the images
do not depend on the number of devices (for one device type and batch size B). A batch whose PNGs all
exist is skipped: rerunning the same command resumes a long run. Several GPUs (or CPU processes)
run through Lightning Fabric's DDP launcher; each draws its own batches, rank 0 writes the .npz.
On 1 and 2 H200s the .npz came out byte-identical (benchmarks/fid_pipeline_on_gpus.sh, docs/benchmarks.md);
on CPU processes a VAE decode can differ in the last bit (Lightning gives each process fewer threads,
which sums in another order): rarely a pixel value off by one. TPU cores (--accelerator tpu) are untried.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from lightning.fabric import Fabric
from PIL import Image
from tqdm import tqdm

from dit.config import is_override, process_options, sampler_from
from dit.data.decoding import data_are_pixels, make_decoder
from dit.data.vae import SCALE_FACTOR, to_uint8
from dit.diffusion import GUIDANCE_VARIANTS, batch_generator, batch_labels, draw, is_flow
from dit.diffusion.guidance import check_guidance, check_guidance_scale
from dit.errors import ArgumentParser, UsageError, exit_on_usage_error
from dit.evaluation.images import make_grid, save_npz, save_png
from dit.models import DiT
from dit.models.float8_sampling import GRANULARITIES as FLOAT8_GRANULARITIES
from dit.models.float8_sampling import check_float8_sampling, quantize_for_sampling
from dit.training.checkpoints import load_weights_file
from dit.training.manifest import (
    MANIFEST_FILE,
    code_version,
    differences,
    flatten,
    read_manifest,
    weights_digest,
    write_manifest,
)
from dit.training.run_folder import RunLock

PRECISIONS = ("32-true", "bf16-mixed")  # Lightning's names, as trainer.precision
COMPILE = {"auto": "auto", "true": True, "false": False}  # as module.compile


def load_model(path: str | Path, num_heads: int | None = None) -> tuple[DiT, tuple[bool, float], dict]:
    """(model in eval mode, its data, provenance). The data are (pixels, scale factor): a train.py
    checkpoint or an export records its data config; a bare state dict (the official file) is of
    VAE latents. The model carries `diffusion_options`, the process it was trained with (the
    Gaussian diffusion's keywords or a flow's path and prediction): those a checkpoint records,
    else the paper's diffusion with the model's learn_sigma. `provenance` says where the weights come from: the file, its
    step and run where recorded, and the digest of the weights."""
    checkpoint = load_weights_file(path)
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    manifest = checkpoint.get("manifest") or {}
    if config:  # train.py's or an export's: the run's config builds the model and says what the data were
        model = DiT.from_state_dict(checkpoint)
        if num_heads and num_heads != model.num_heads:
            raise UsageError(
                f"--num-heads {num_heads}: {path} records its model, with {model.num_heads} heads; --num-heads is "
                "for a bare state dict (the official file's format): leave it out"
            )
        data = (data_are_pixels(config["data"]), config["data"]["scale_factor"])
        options = process_options(config)
    else:
        model = DiT.from_state_dict(checkpoint, **({"num_heads": num_heads} if num_heads else {}))
        pixels = data_are_pixels(None, model.in_channels)
        data = (pixels, 1.0 if pixels else SCALE_FACTOR)
        options = dict(learn_sigma=model.learn_sigma)
    model.diffusion_options = options
    provenance = dict(
        checkpoint=str(path),
        step=checkpoint.get("global_step", manifest.get("step")),
        run=manifest.get("run") or (manifest if "run_id" in manifest else None),
        weights_digest=weights_digest(model.state_dict()),
    )
    return model.eval().requires_grad_(False), data, provenance


def implied_identity(identity: dict, now: dict) -> dict:
    """A folder's recorded identity with the keys added since it was drawn, at the values it was
    drawn with: guidance everywhere, and uniform random labels (or the --classes it cycled). The
    model's settings beyond its weights (model.*) went unrecorded then: taken to be `now`'s."""
    implied = dict(guidance_interval=[0.0, 1.0], labels="classes" if identity.get("classes") else "random", float8=None)
    unrecorded = {} if any(k.startswith("model.") for k in identity) else model_settings(now)
    return implied | unrecorded | identity


def model_settings(identity: dict) -> dict:
    return {k: v for k, v in identity.items() if k.startswith("model.")}


def check_sample_folder(out_dir, identity, overwrite, rank):
    """A sample folder holds the samples of one set of weights and sampler settings (its
    manifest.json), so a rerun resumes it and nothing else does: other settings are refused, or,
    with --overwrite, its PNGs are deleted (by rank 0) and drawn anew."""
    manifest = read_manifest(out_dir)
    pngs = sorted(out_dir.glob("*.png"))
    if manifest is not None and manifest.get("kind") != "samples":  # a training run's folder, say
        raise UsageError(
            f"{out_dir} is a {manifest.get('kind', 'foreign')} folder (its manifest.json), not a sample folder; "
            "sample into another folder"
        )
    npz = Path(f"{out_dir}.npz")
    if manifest is None and npz.exists():
        raise UsageError(
            f"{npz} exists and {out_dir} holds no manifest.json of the samples that wrote it; "
            "sample into another folder, or move it away"
        )
    recorded = None if manifest is None else implied_identity(manifest.get("identity") or {}, identity)
    if recorded == identity:
        return
    if not pngs:  # nothing drawn yet (a refused or failed start): the folder holds nothing to keep
        if rank == 0 and manifest is not None:
            (out_dir / MANIFEST_FILE).unlink()
        return
    if manifest is None:
        why = f"holds {len(pngs)} PNGs but no manifest.json, so what drew them is unknown"
    else:
        why = f"holds samples drawn with other settings ({differences(recorded, identity)})"
    if not overwrite:
        raise UsageError(
            f"{out_dir} {why}; sample into another folder, or pass --overwrite to delete them and draw anew"
        )
    if rank == 0:
        print(f"--overwrite: {out_dir} {why}; deleting its {len(pngs)} PNGs")
        for png in pngs:
            png.unlink()
        (out_dir / MANIFEST_FILE).unlink(missing_ok=True)


def sample_batch(model, k, args, classes, sampler, decoder, device):
    """Batch k of a run as uint8 RGB images (n, H, W, 3), every draw from batch_generator(seed, k)."""
    index = torch.arange(k * args.batch_size, min((k + 1) * args.batch_size, args.num_samples))
    generator = batch_generator(args.seed, k, device)
    labels = batch_labels(index, classes, model.num_classes, generator)
    z = draw(
        model,
        sampler,
        model.diffusion_options,
        labels,
        generator,
        args.guidance_scale,
        args.guidance,
        tuple(args.guidance_interval),
    )
    images = to_uint8(decoder(z))
    return images.expand(-1, -1, -1, 3) if images.shape[-1] == 1 else images  # gray pixels as RGB, for FID tools


def write_png(image, path):
    """Written under a temporary name and renamed: a killed run never leaves half a PNG behind."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    Image.fromarray(image.numpy()).save(tmp, format="png")
    os.replace(tmp, path)


def run(fabric, args):
    """One process's share: batches rank, rank + world, ...; then rank 0 gathers the .npz and grid."""
    out_dir = Path(args.out_dir)
    classes = parse_classes(args.classes)
    model, (pixels, scale), provenance = load_model(args.checkpoint, args.num_heads)
    if args.float8:  # before anything is written: a model with no layer to quantise is refused
        replaced = quantize_for_sampling(model, args.float8)
        if fabric.global_rank == 0:
            print(f"float8 ({args.float8}): {len(replaced)} linears of the blocks")
    # Without sampler=NAME: the paper's 250 DDPM steps, or for a flow SiT's and REPA's FID sampler, the SDE.
    sampler = sampler_from(args.overrides, "sde" if is_flow(model.diffusion_options) else "ddpm")
    if any(not 0 <= c < model.num_classes for c in classes):
        raise UsageError(f"--classes {args.classes}: this model has classes 0..{model.num_classes - 1}")
    if args.labels == "balanced":
        if classes:
            raise UsageError("--labels balanced draws every class equally; leave out --classes, or use --labels random")
        if args.num_samples % model.num_classes:
            raise UsageError(
                f"--labels balanced draws exactly N/{model.num_classes} samples per class: give a --num-samples "
                f"divisible by {model.num_classes} (e.g. {model.num_classes * 50}), got {args.num_samples}"
            )
        classes = list(range(model.num_classes))  # sample i has label i mod K: N/K of each
    if args.guidance == "auto":
        args.guidance = "all_channels" if is_flow(model.diffusion_options) else "official"
    # What decides the images (not --num-samples: a rerun with more extends the same set).
    identity = flatten(
        dict(
            weights_digest=provenance["weights_digest"],
            # what the weights leave open: heads (a bare state dict takes --num-heads), RoPE (no weights of its own)
            model=dict(num_heads=model.num_heads, conditioning=model.conditioning, **model.block_options),
            sampler=sampler.settings(),
            guidance_scale=args.guidance_scale,
            guidance=args.guidance,
            guidance_interval=list(args.guidance_interval),
            labels=args.labels if not args.classes else "classes",
            seed=args.seed,
            batch_size=args.batch_size,
            classes=classes,
            precision=args.precision,
            tf32=args.tf32,
            float8=args.float8,
            vae=None if pixels else args.vae,
            diffusion=model.diffusion_options,
        )
    )
    identity = json.loads(json.dumps(identity))  # as the manifest file gives it back
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} is a file; the samples go into a folder: give a folder's path")
    out_dir.mkdir(parents=True, exist_ok=True)
    # One process fills a folder at a time: two runs into one folder would each take it for theirs
    # and mix their PNGs under one record. Rank 0 holds the lock; every rank learns whether it got it.
    lock, busy = None, None
    if fabric.global_rank == 0:
        try:
            lock = RunLock(out_dir, elsewhere="sample into another folder").acquire()
        except UsageError as err:
            busy = str(err)
    busy = fabric.broadcast(busy, src=0)
    if busy:
        raise UsageError(busy)
    try:
        fill_folder(fabric, args, out_dir, identity, model, sampler, classes, pixels, scale, provenance)
    finally:
        if lock is not None:
            lock.release()


def fill_folder(fabric, args, out_dir, identity, model, sampler, classes, pixels, scale, provenance):
    """Draw the PNGs the folder lacks (this rank's batches), then rank 0 writes the .npz and the grid."""
    device = fabric.device
    check_sample_folder(out_dir, identity, args.overwrite, fabric.global_rank)
    if fabric.global_rank == 0:  # PNGs half-written by a killed run: no rank draws yet
        for tmp in out_dir.glob("*.tmp"):
            tmp.unlink()
    fabric.barrier()
    manifest = read_manifest(out_dir)  # a resumed folder keeps the record of the run that began it
    if manifest is None:
        manifest = dict(
            kind="samples",
            identity=identity,
            source=provenance,
            code=code_version(),
            command=["python", "-m", "dit.sample", *map(str, args.argv)],
        )
        if fabric.global_rank == 0:
            write_manifest(out_dir, manifest)
    model.to(device)
    if COMPILE[args.compile] is True or (args.compile == "auto" and device.type == "cuda"):
        # Every step of every batch has the same shapes: compiled once, the graph serves the whole run
        # (the last, smaller batch compiles once more).
        model.compile()
    decoder = make_decoder(pixels, scale, None if pixels else args.vae, device)
    if device.type == "cuda":  # TF32 matmuls, as the official sample_ddp.py (its --tf32 default)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32 == "true"
    num_batches = -(-args.num_samples // args.batch_size)

    def pngs(k):
        return [
            out_dir / f"{i:06d}.png"
            for i in range(k * args.batch_size, min((k + 1) * args.batch_size, args.num_samples))
        ]

    todo = [
        k for k in range(fabric.global_rank, num_batches, fabric.world_size) if not all(p.exists() for p in pngs(k))
    ]
    total = sum(len(pngs(k)) for k in todo)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
    with tqdm(total=total, unit="img", desc=f"rank {fabric.global_rank}", position=fabric.global_rank) as bar:
        for k in todo:
            with autocast:
                images = sample_batch(model, k, args, classes, sampler, decoder, device)
            for image, path in zip(images, pngs(k)):
                write_png(image, path)
            bar.update(len(images))
    fabric.barrier()
    if fabric.global_rank == 0:
        counts = dict(nfe=sampler.nfe, guided_nfe=sampler.guided_nfe)
        if todo and {k: manifest.get(k) for k in counts} != counts:
            # the function evaluations per sample of this rank's last batch (dopri5's vary by batch)
            manifest.update(counts)
            write_manifest(out_dir, manifest)
        print(f"sampler {sampler!r}: {manifest.get('nfe')} function evaluations per sample")
        reading = tqdm(range(args.num_samples), desc="PNGs to .npz", unit="img")
        arr = np.stack([np.asarray(Image.open(out_dir / f"{i:06d}.png").convert("RGB")) for i in reading])
        # ADM's evaluator reads arr_0; the manifest rides along, for dit.fid to say what it measured.
        save_npz(f"{out_dir}.npz", arr_0=arr, manifest=np.array(json.dumps(manifest)))
        nrow = len(classes) if classes and args.labels != "balanced" else 8  # balanced: all K classes
        first = torch.from_numpy(arr[: nrow * 8]).permute(0, 3, 1, 2).float() / 255
        grid = save_png(make_grid(first, nrow=nrow), f"{out_dir}.png")
        print(
            f"wrote {args.num_samples} samples to {out_dir}/, {out_dir}.npz (arr_0 {tuple(arr.shape)} uint8), grid {grid}"
        )
        beyond = [p for p in out_dir.glob("*.png") if p.stem.isdigit() and int(p.stem) >= args.num_samples]
        if beyond:  # drawn by an earlier, larger --num-samples with the same settings: kept, not counted
            print(
                f"note: {out_dir} also holds {len(beyond)} PNGs from {args.num_samples:06d}.png on, drawn for a "
                f"larger --num-samples; they are left there and are not in {out_dir}.npz"
            )


def parse_classes(text):
    """--classes "207,360" -> [207, 360]; "" -> [] (uniform random labels)."""
    try:
        return [int(c) for c in text.split(",")] if text else []
    except ValueError:
        raise UsageError(
            f"--classes {text!r}: give class numbers separated by commas, e.g. --classes 207,360,387"
        ) from None


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a train.py checkpoint, an export, or the official DiT-XL-2-256x256.pt")
    parser.add_argument("out_dir", help="the folder of PNGs; <out_dir>.npz and the grid <out_dir>.png go beside it")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="sampler=...",
        help="the sampler as in train.py: sampler=ddpm|ddim|<yours>, sampler.steps=..., sampler.eta=...",
    )
    parser.add_argument("--num-samples", type=int, default=50_000, help="the paper's FID-50K by default")
    parser.add_argument(
        "--classes", default="", help="comma-separated labels to cycle through (default: uniform random)"
    )
    parser.add_argument(
        "--guidance-scale", type=float, default=1.5, help="classifier-free guidance scale; 1 = none (Table 4)"
    )
    parser.add_argument(
        "--guidance",
        choices=GUIDANCE_VARIANTS,
        default="auto",
        help="official: the first 3 channels (auto: official for the Gaussian diffusion, all_channels for a flow)",
    )
    parser.add_argument(
        "--guidance-interval",
        nargs=2,
        type=float,
        default=[0.0, 1.0],
        metavar=("LOW", "HIGH"),
        help="guide only for times in [LOW, HIGH], 0 the data and 1 the noise (REPA: 0 0.7)",
    )
    parser.add_argument(
        "--labels",
        choices=["random", "balanced"],
        default="random",
        help="random: uniform labels (the official protocol); balanced: exactly N/classes of each class",
    )
    parser.add_argument("--vae", default="ema", help="ema (headline), mse (Table 4) or a local AutoencoderKL folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32, help="samples per batch per device (official: 32)")
    parser.add_argument("--devices", default="auto", help="how many devices; auto: every GPU (one process on a CPU)")
    parser.add_argument("--accelerator", default="auto", help="cpu, cuda or auto (Lightning Fabric)")
    parser.add_argument("--precision", choices=PRECISIONS, default="32-true", help="bf16-mixed: bf16 autocast")
    parser.add_argument(
        "--tf32", choices=["true", "false"], default="true", help="TF32 matmuls on GPUs (official: true)"
    )
    parser.add_argument(
        "--compile", choices=list(COMPILE), default="auto", help="torch.compile the model (auto: on GPUs)"
    )
    parser.add_argument(
        "--float8",
        choices=FLOAT8_GRANULARITIES,
        help="the blocks' linears in float8, weights quantised once (dit.models.float8_sampling); with bf16-mixed",
    )
    parser.add_argument("--num-heads", type=int, help="for a bare state dict of a width off the paper's table")
    parser.add_argument(
        "--overwrite", action="store_true", help="out_dir holds samples of other settings: delete them, draw anew"
    )
    args = parser.parse_intermixed_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    bad = [o for o in args.overrides if not is_override(o)]
    if bad:
        raise UsageError(
            f"{bad[0]!r}: after the checkpoint and the folder come sampler overrides such as sampler=ddim sampler.steps=ddim50"
        )
    parse_classes(args.classes)  # before any process starts
    check_guidance(args.guidance, args.guidance_interval, "--guidance-interval")
    if any(o.split("=", 1)[0] == "sampler" for o in args.overrides) or not args.overrides:
        sampler_from(args.overrides)  # sampler.KEY=V alone is checked once the model says its default sampler
    check_guidance_scale(args.guidance_scale)
    if args.num_samples <= 0 or args.batch_size <= 0 or args.seed < 0:
        raise UsageError("--num-samples and --batch-size must be positive, --seed not negative")
    devices = int(args.devices) if args.devices.isdigit() else args.devices
    try:
        fabric = Fabric(accelerator=args.accelerator, devices=devices, strategy="auto" if devices == 1 else "ddp")
    except (ValueError, TypeError, RuntimeError) as err:  # Lightning's MisconfigurationException is a ValueError
        message = str(err).strip().splitlines()[0]
        raise UsageError(
            f"--accelerator {args.accelerator} --devices {args.devices}: {message} (e.g. --accelerator cpu --devices 1)"
        ) from None
    if args.float8:  # once, before the processes start
        check_float8_sampling(args.float8, fabric.device)
    fabric.launch(run, args)
    return fabric.global_rank


if __name__ == "__main__":
    exit_on_usage_error(main)
