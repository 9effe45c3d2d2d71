"""Encode an ImageNet-style folder into the latent shards that `dit.data.datamodule.LatentDataModule` trains on.

    python -m dit.extract imagenet/train latents/imagenet_256 --resolution 256          # one GPU
    torchrun --nproc_per_node 8 -m dit.extract imagenet/train latents/imagenet_256      # 8 GPUs
    python -m dit.extract imagenet/train latents/imagenet_512 --resolution 512 --vae mse --precision bf16-true
    python -m dit.extract imagenet/train latents/imagenet_256_repa --repa-encoder dinov2_vitb14    # + REPA features

Each image goes through the official preprocessing (ADM's centre crop, as the official train.py), and the
Stable Diffusion VAE encodes it and its mirror image; a record keeps both posteriors (mean, std) and
the label, so training samples a fresh latent and a random flip at every draw as the official
train.py does, without running the VAE (dit.data). Classes are the sorted sub-folder names, as
torchvision's ImageFolder numbers them in the official code.

REPA features (Yu et al. 2024; `--repa-encoder`, dit.data.encoders): in the same pass, from the same
cropped images, a frozen encoder's patch tokens of each unflipped image are stored in its record as
float16 (T, D) — DINOv2 ViT-B/14's final-norm patch tokens of the image resized to 224 px (448 px at
512), as REPA's train.py computes them at every step. Storage: 256 tokens × 768 × 2 bytes = 384 KiB
an image at 256 px (12× the 32 KiB posterior pair), ≈ 504 GB (469 GiB) for ImageNet's 1,281,167
training images; 1,024 tokens at 512 px, 4× that. A flipped draw uses the features mirrored on the
16×16 token grid (dit.data.datamodule.sample_latents): exactly how the flip moves the patches, but
only approximately what DINOv2 gives for the mirrored image (it is not flip-equivariant); REPA
itself trains without flips, which `data.flip=false` reproduces. `--repa-encoder-weights PATH` takes
the encoder's weights from a local .safetensors / .pth file instead of the Hugging Face hub;
`--repa-encoder-weights random` (for tests only) uses a randomly initialised encoder, recorded as
such in meta.json. The encoder runs in the VAE's precision: on an H200, DINOv2 B/14 at batch 64 took
~940 images/s in fp32 (no TF32) and ~6,900 in bf16 (random weights). bf16's error on the real weights
could not be measured here (a random DINOv2's LayerScale of 1e-5 leaves its blocks nearly off): compare
a few batches in both precisions before using it. A part's records are held in memory until it is
written: with features that is ~4 GB a rank at the default --part-size of 10,000 images.

Work is cut into parts of `--part-size` images of the sorted file list; part p goes to rank p % world
(RANK / WORLD_SIZE of torchrun or SLURM; several nodes need a shared output folder). A finished part
is renamed into place in one step, so a rerun of the same command skips it: an interrupted run resumes
where it stopped. The rank that finishes last links every part's shards into `<out_dir>` with one
index.json and meta.json. An image that cannot be decoded is skipped, counted and listed at the end.

Precision (Lightning's names, as `trainer.precision`): `32-true` (fp32) by default;
`--precision bf16-true` runs the VAE in bfloat16 on the GPU (its speed-up is not measured). On a small random VAE of the SD layout (tests/tools/test_extract.py) the posterior
mean moves by 1.2% of its RMS (RMS of the error; up to 7% for single elements) and the std by under
1%. The real VAE could not be checked here (no weights offline): compare a few batches in both
precisions before using it.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dit.data.encoders import ENCODERS, encoder_input_size, load_encoder
from dit.data.shards import META_FILE, file_crc32, write_chunks
from dit.data.vae import encode, load_vae
from dit.errors import ArgumentParser, UsageError, exit_on_usage_error

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's


def center_crop_arr(image, size):
    """ADM's centre crop (guided-diffusion image_datasets.py, used by DiT's train.py): halve with a
    box filter while the short side is at least 2·size (cheap anti-aliasing), resize with bicubic so
    the short side is `size`, then cut the centre size×size square."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def list_images(root):
    """(path, label) of every image under root/<class>/, in ImageFolder's order; and the class names."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} is not a folder; pass the ImageNet train folder (it holds one folder per class)"
        )
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise UsageError(f"{root} holds no class folders; pass the folder that holds <class>/<image> files")
    files = []
    for label, name in enumerate(classes):
        for folder, _, names in sorted(os.walk(root / name, followlinks=True)):
            files += [(Path(folder) / f, label) for f in sorted(names) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise UsageError(
            f"{root}'s {len(classes)} class folders hold no images ({', '.join(IMAGE_EXTENSIONS)}); pass the folder "
            "that holds <class>/<image> files"
        )
    return files, classes


class CroppedImages(torch.utils.data.Dataset):
    """Decoded, cropped images as uint8 (3, size, size), decoded in loader workers (`encode_part`
    maps them to [-1, 1] for the VAE, and the REPA encoder takes them as they are, as REPA's raw
    images). An image PIL cannot read comes back as None and is skipped by `keep_decoded`."""

    def __init__(self, files, size):
        self.files, self.size = files, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path, label = self.files[i]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")  # grayscale, CMYK, palette and alpha images, as ImageFolder
        except Exception:  # truncated, corrupt, not an image: any failure to decode skips the file
            return None, label, str(path)
        return torch.from_numpy(np.array(center_crop_arr(image, self.size))).permute(2, 0, 1), label, str(path)


def keep_decoded(batch):
    images = [x for x, _, _ in batch if x is not None]
    return (
        torch.stack(images) if images else None,
        torch.tensor([y for x, y, _ in batch if x is not None], dtype=torch.long),
        [path for x, _, path in batch if x is None],
    )


def encode_part(files, vae, size, batch_size, num_workers, progress, encoder=None):
    """Posteriors of the images of one part and of their mirror images (and, with a REPA `encoder`,
    the features of the images): records for write_shards, and the paths that could not be decoded."""
    loader = torch.utils.data.DataLoader(
        CroppedImages(files, size), batch_size=batch_size, num_workers=num_workers, collate_fn=keep_decoded
    )
    records, skipped = [], []
    for images, labels, failed in loader:
        skipped += failed
        progress.update(len(labels) + len(failed))
        if images is None:
            continue
        pixels = (images.float() / 255 - 0.5) / 0.5  # [-1, 1]: Normalize(0.5, 0.5) of the official code
        mean, std = encode(vae, torch.cat([pixels, pixels.flip(-1)]))  # the flip of the official RandomHorizontalFlip
        n = len(images)
        posterior = torch.stack([torch.stack([mean[:n], std[:n]], 1), torch.stack([mean[n:], std[n:]], 1)], 1)
        if encoder is None:
            records += zip(labels.tolist(), posterior.half().cpu().numpy())
        else:  # the unflipped image only: a flipped draw mirrors its tokens (dit.data.datamodule.sample_latents)
            features = encoder.features(images.to(encoder.mean.device)).half().cpu().numpy()
            records += zip(labels.tolist(), posterior.half().cpu().numpy(), features)
    return records, skipped


PART_KEYS = ("part_range", "part_files_sha256")  # a part's own record of its images: differs between parts


def files_fingerprint(listed):
    """sha256 over (path relative to the image folder, byte size) of each file, in order: the same
    for the same files under another mount point; another for a file added, removed, renamed or
    resized (a file rewritten in place at the same size keeps it)."""
    digest = hashlib.sha256()
    for name, size in listed:
        digest.update(f"{name}\0{size}\n".encode())
    return digest.hexdigest()


def part_records(root, files, classes, part_size):
    """What decides each part's records, as its meta.json keeps it: the folder's record (the part
    size, the class folders, the number of files and their fingerprint), and each part's own (its
    index range in the sorted list and its files' fingerprint): part p's entry is parts[p]."""
    root = Path(root)
    listed = []
    for path, _ in files:
        try:
            size = os.stat(path).st_size
        except OSError:  # a broken link: decoding skips it, and lists it
            size = -1
        listed.append((path.relative_to(root).as_posix(), size))
    folder = dict(part_size=part_size, classes=classes, num_files=len(files), files_sha256=files_fingerprint(listed))
    parts = [
        dict(
            folder,
            part_range=[start, min(start + part_size, len(files))],
            part_files_sha256=files_fingerprint(listed[start : start + part_size]),
        )
        for start in range(0, len(files), part_size)
    ]
    return folder, parts


def check_finished_parts(parts_root, folder, parts, features, image_dir):
    """Before encoding (and again before merging): every part an earlier run (or another rank)
    finished holds what this run would write there, else a resumed run would mix them — REPA
    features of another kind (two record layouts), another --part-size (records duplicated or left
    out) or other image files (records of two folders). Parts from before parts recorded their
    images (no part_size / part_files_sha256) are refused: nothing says which images they hold."""
    out_dir = parts_root.parent
    finished = sorted(d for d in parts_root.glob("part_*") if re.fullmatch(r"part_\d+", d.name))
    restart = f"extract into a new folder, or delete {parts_root} to start over"
    for part in finished:
        if not (part / META_FILE).exists():
            raise UsageError(f"{part} holds no {META_FILE}: not a part dit.extract finished; delete it and rerun")
        meta = json.loads((part / META_FILE).read_text())
        written = meta.get("features")
        written = written and {k: written.get(k) for k in ("encoder", "weights")}
        if written != features:

            def said(f):
                return f"--repa-encoder {f['encoder']} (weights: {f['weights']})" if f else "no --repa-encoder"

            raise UsageError(
                f"{part} was written with {said(written)}, this run asks for {said(features)}; rerun with the same "
                f"arguments, or delete {parts_root} to start over"
            )
        if not all(k in meta for k in (*folder, *PART_KEYS)):
            raise UsageError(
                f"{part} was written by a dit.extract that did not record which image files a part holds, so "
                f"resuming cannot check it against {image_dir}: {restart}"
            )
        if meta["part_size"] != folder["part_size"]:
            raise UsageError(
                f"--part-size {folder['part_size']} but {out_dir}'s parts were written with --part-size "
                f"{meta['part_size']}: rerun with --part-size {meta['part_size']}, or extract into a new folder"
            )
        if meta["classes"] != folder["classes"]:
            how = f"other class folders ({len(folder['classes'])} now, {len(meta['classes'])} then)"
        elif meta["num_files"] != folder["num_files"]:
            how = f"{folder['num_files']} image files now, {meta['num_files']} then"
        elif meta["files_sha256"] != folder["files_sha256"]:
            how = "as many files, but other names or sizes"
        else:
            p = int(part.name.removeprefix("part_"))
            if p < len(parts) and all(meta[k] == parts[p][k] for k in PART_KEYS):
                continue
            how = f"{part.name} does not hold the files it would now"
        raise UsageError(
            f"the image files under {image_dir} differ from those {out_dir}'s parts were made from "
            f"(under {meta.get('source')}): {how}; rerun on those images, or {restart}"
        )


def merge_parts(out_dir, part_dirs):
    """Link (or copy, across file systems) every part's chunk files into out_dir under one index.json
    — what litdata.merge_datasets does with copies — then write meta.json, the mark of a finished
    folder. Two ranks merging at once write the same files, each by an atomic rename."""
    sources, config, skipped, first = [], None, [], None
    for part in part_dirs:
        meta = json.loads((part / META_FILE).read_text())
        skipped += meta.pop("skipped")
        # what the records hold; not `source`, which another node may mount elsewhere (the files'
        # fingerprints are of paths relative to it), nor the part's own range and fingerprint
        for key in PART_KEYS:
            meta.pop(key, None)
        settings = {k: v for k, v in meta.items() if k not in ("num_samples", "source")}
        first = first or (part, settings)
        if settings != first[1]:  # e.g. a run resumed with another --repa-encoder: records of two layouts
            raise UsageError(
                f"{part} was written with other settings than {first[0]} ({part_difference(first[1], settings)}); "
                f"delete the parts of the wrong settings from {out_dir / 'parts'} and rerun with the right ones"
            )
        if not meta["num_samples"]:
            continue  # nothing in it could be decoded
        index = json.loads((part / "index.json").read_text())
        config = index["config"]
        sources += [(part, chunk) for chunk in index["chunks"]]
    if config is None:
        raise UsageError(f"no image under {meta['source']} could be decoded; check the folder")
    # One process merges, the rank that finished last (not always rank 0): one bar (dit.evaluation.progress).
    # A link is instant; a copy and the CRC-32 (which dit.data checks before training) read the whole chunk.
    chunks, crc32 = [], {}
    for part, chunk in tqdm(sources, desc="merge parts", unit="chunk"):
        name = f"chunk-0-{len(chunks)}.bin"
        tmp = out_dir / f"{name}.tmp{os.getpid()}"
        try:
            os.link(part / chunk["filename"], tmp)
        except OSError:
            shutil.copyfile(part / chunk["filename"], tmp)
        os.replace(tmp, out_dir / name)
        chunks.append(dict(chunk, filename=name))
        crc32[name] = file_crc32(out_dir / name)
    meta.update(num_samples=sum(chunk["chunk_size"] for chunk in chunks), skipped=skipped, chunk_crc32=crc32)
    for name, content in [("index.json", dict(config=config, chunks=chunks)), (META_FILE, meta)]:
        tmp = out_dir / f"{name}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(content, indent=1))
        os.replace(tmp, out_dir / name)
    return meta


def part_difference(a, b):
    """The meta.json keys two parts disagree on, with both values."""
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k))


def features_setting(encoder_name, weights):
    """What meta.json records of the REPA features asked for (None: no features), before any is computed."""
    if encoder_name is None:
        return None
    if weights is None:
        weights = ENCODERS[encoder_name].hub_id
    elif weights != "random":
        weights = str(Path(weights).resolve())
    return dict(encoder=encoder_name, weights=weights)


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image_dir", help="an ImageNet-style folder: <class>/<image>")
    parser.add_argument("out_dir", help="the folder of latent shards to write (data.path of the training config)")
    parser.add_argument(
        "--resolution", type=int, default=256, help="image side after the centre crop (paper: 256 or 512)"
    )
    parser.add_argument("--vae", default="ema", help="ema (default, as train.py), mse, or a local AutoencoderKL folder")
    parser.add_argument("--batch-size", type=int, default=64, help="images per VAE call (their flips are added to it)")
    parser.add_argument(
        "--precision", choices=["32-true", "bf16-true"], default="32-true", help="the VAE's dtype (bf16-true: GPU only)"
    )
    parser.add_argument(
        "--part-size", type=int, default=10_000, help="images per part, the unit of work split and resume"
    )
    parser.add_argument("--num-workers", type=int, default=8, help="image-decoding processes per rank")
    parser.add_argument(
        "--repa-encoder",
        choices=list(ENCODERS),
        help="also store this frozen encoder's patch tokens of each image, for REPA (data.features=true); "
        "REPA's default is dinov2_vitb14",
    )
    parser.add_argument(
        "--repa-encoder-weights",
        help="a local .safetensors/.pth state dict of the encoder instead of the Hugging Face hub's; "
        "'random': a randomly initialised encoder, for tests only",
    )
    args = parser.parse_args(argv)
    if args.resolution <= 0 or args.resolution % 8:
        raise UsageError(f"--resolution {args.resolution} must be a positive multiple of 8 (the VAE downsamples 8×)")
    if args.batch_size <= 0 or args.part_size <= 0:
        raise UsageError("--batch-size and --part-size must be positive")
    if args.repa_encoder_weights is not None and args.repa_encoder is None:
        raise UsageError("--repa-encoder-weights needs --repa-encoder (the encoder whose weights they are)")
    if args.repa_encoder is not None:
        encoder_input_size(args.resolution)  # a multiple of 16, or one line naming --resolution

    out_dir = Path(args.out_dir)
    if (out_dir / META_FILE).exists():
        done = json.loads((out_dir / META_FILE).read_text())
        features = done.get("features")
        asked = dict(
            source=str(Path(args.image_dir).resolve()),
            vae=args.vae,
            resolution=args.resolution,
            precision=args.precision,
            features=features_setting(args.repa_encoder, args.repa_encoder_weights),
        )
        held = dict(
            {k: done.get(k) for k in asked},
            features=features and {k: features.get(k) for k in ("encoder", "weights")},
        )
        if held != asked:
            raise UsageError(
                f"{out_dir} is finished already, with other settings ({part_difference(held, asked)}); "
                "extract into another folder"
            )
        if "files_sha256" in done:  # finished by a dit.extract that recorded its images: the same ones?
            files, classes = list_images(args.image_dir)
            folder, _ = part_records(args.image_dir, files, classes, done.get("part_size", args.part_size))
            if {k: done.get(k) for k in ("classes", "num_files", "files_sha256")} != {
                k: folder[k] for k in ("classes", "num_files", "files_sha256")
            }:
                raise UsageError(
                    f"{out_dir} is finished already, from other image files than those under {args.image_dir} "
                    f"({done.get('num_files')} then, {folder['num_files']} now, or other names or sizes); "
                    "extract into another folder"
                )
        print(f"{out_dir} is finished already ({META_FILE} is there); nothing to do")
        return
    env = os.environ  # torchrun's variables, else SLURM's (srun starts one task per GPU)
    rank, world = (
        int(env.get("RANK", env.get("SLURM_PROCID", 0))),
        int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1))),
    )
    local = env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if args.precision == "bf16-true" and device.type != "cuda":
        raise UsageError("--precision bf16-true is for GPUs; on the CPU use 32-true")
    files, classes = list_images(args.image_dir)
    num_parts = -(-len(files) // args.part_size)
    parts_root = out_dir / "parts"
    part_dirs = [parts_root / f"part_{p:05d}" for p in range(num_parts)]
    todo = [p for p in range(rank, num_parts, world) if not part_dirs[p].exists()]
    folder, records_of = part_records(args.image_dir, files, classes, args.part_size)
    features = features_setting(args.repa_encoder, args.repa_encoder_weights)
    check_finished_parts(parts_root, folder, records_of, features, args.image_dir)
    print(
        f"rank {rank}/{world}: {len(files)} images of {len(classes)} classes in {num_parts} parts; "
        f"{len(todo)} of this rank's {len(range(rank, num_parts, world))} parts to encode on {device}"
    )

    if todo:
        dtype = torch.bfloat16 if args.precision == "bf16-true" else torch.float32
        vae = load_vae(args.vae, device, dtype)
        encoder = None
        if args.repa_encoder is not None:
            weights = args.repa_encoder_weights
            encoder = load_encoder(
                args.repa_encoder,
                pretrained=weights != "random",
                device=device,
                resolution=args.resolution,
                weights=None if weights in (None, "random") else weights,
                dtype=dtype,
            )
        meta = dict(
            channels=vae.config.latent_channels,
            latent_size=args.resolution // 2 ** (len(vae.config.block_out_channels) - 1),
            num_classes=len(classes),
            source=str(Path(args.image_dir).resolve()),
            vae=args.vae,
            resolution=args.resolution,
            precision=args.precision,
            classes=classes,
        )
        if encoder is not None:
            meta["features"] = dict(
                features_setting(args.repa_encoder, args.repa_encoder_weights),
                tokens=encoder.tokens,
                dim=encoder.dim,
                resolution=encoder.input_size,  # the encoder's input side (REPA: 224 for 256-px images)
            )
    total = sum(len(files[p * args.part_size : (p + 1) * args.part_size]) for p in todo)
    start = time.perf_counter()
    with tqdm(total=total, unit="img", desc=f"rank {rank}", position=rank) as progress:
        for p in todo:
            records, skipped = encode_part(
                files[p * args.part_size : (p + 1) * args.part_size],
                vae,
                args.resolution,
                args.batch_size,
                args.num_workers,
                progress,
                encoder,
            )
            tmp = part_dirs[p].with_name(part_dirs[p].name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
            write_chunks(records, tmp)
            part_meta = dict(meta, **records_of[p], num_samples=len(records), skipped=skipped)
            (tmp / META_FILE).write_text(json.dumps(part_meta))
            os.replace(tmp, part_dirs[p])  # the part is finished: a rerun skips it
    if total:
        elapsed = time.perf_counter() - start
        print(f"rank {rank}: encoded {total} images in {elapsed:.0f} s ({total / elapsed:.1f} images/s)")

    missing = [d.name for d in part_dirs if not d.exists()]
    if missing:
        print(f"rank {rank}: done; {len(missing)} parts are still with other ranks; the last rank to finish merges")
        return
    check_finished_parts(parts_root, folder, records_of, features, args.image_dir)  # other ranks' parts too
    meta = merge_parts(out_dir, part_dirs)
    skipped = meta["skipped"]
    print(
        f"wrote {meta['num_samples']} records ({meta['channels']}×{meta['latent_size']}×{meta['latent_size']} "
        f"latents, {len(classes)} classes) to {out_dir}; {len(skipped)} files could not be decoded and were skipped"
        + "".join(f"\n  skipped: {path}" for path in skipped)
    )


if __name__ == "__main__":
    exit_on_usage_error(main)
