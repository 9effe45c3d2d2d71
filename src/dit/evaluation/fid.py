"""FID (and Inception Score, precision/recall) of generated samples, with torch-fidelity.

The paper reports FID-50K (§4 "Evaluation metrics"): 50,000 samples, 250 DDPM steps, against the
ImageNet reference statistics of ADM's evaluation suite. torch-fidelity's `inception-v3-compat`
extractor is a port of the same TensorFlow Inception graph (2015-12-05) that ADM's suite runs, so its
2048-d pool features, and the FID they give, are comparable with ADM's reference statistics.

    python -m dit.fid samples.npz --ref VIRTUAL_imagenet256_labeled.npz           # ADM's reference batch
    python -m dit.fid samples/ --ref imagenet/train --save-ref-stats ref256.npz   # real images, stats kept
    python -m dit.fid samples.npz --ref ref256.npz --isc                          # + Inception Score
    python -m dit.fid --ref digits --save-ref-stats digits_ref.npz                # the quickstart's reference

Samples: the `.npz` that dit.sample and the official sample_ddp.py write (`arr_0`, N×H×W×3 uint8),
or a folder of PNGs. Reference (`--ref`): a folder of real images (searched recursively, ADM centre
crop to the samples' resolution, as the official train.py prepares its inputs), a statistics file
(`mu`, `sigma`; ADM's `VIRTUAL_imagenet256_labeled.npz` holds these two and `arr_0`, its 10,000
reference images, used only for --prc), or `digits` (scikit-learn's 1,797 real digits).

The Inception weights are downloaded by torch-fidelity on first use; offline, pass a local copy with
--inception-weights (see `inception`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3 as INCEPTION_URL
from tqdm import tqdm

from dit.errors import ArgumentParser, UsageError, exit_on_usage_error
from dit.evaluation.images import save_npz
from dit.training.manifest import read_manifest

POOL, LOGITS = "2048", "logits_unbiased"  # FID and precision/recall use the pool features, IS the logits


# ------------------------------------------------------------------ the extractor


def inception(weights: str | None = None, device: torch.device | str = "cpu"):
    """torch-fidelity's Inception-v3 (`inception-v3-compat`): `weights` is a local copy of its
    weights file, or None to download it (to the torch hub cache, once)."""
    from torch_fidelity.utils import create_feature_extractor

    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"Inception weights {weights} do not exist; download {INCEPTION_URL} and pass its path")
    try:
        extractor = create_feature_extractor(
            "inception-v3-compat", [POOL, LOGITS], cuda=False, feature_extractor_weights_path=weights, verbose=False
        )
    except OSError as error:  # URLError, timeout, refused connection: the download failed
        if weights is not None:
            raise
        raise UsageError(
            f"could not fetch the Inception weights for FID ({error}). Download {INCEPTION_URL} where there "
            f"is a network, copy it here and pass its path: --inception-weights /path/{INCEPTION_URL.rsplit('/', 1)[1]} "
            "(in training: callbacks.fid.inception_weights=/path/...)"
        ) from None
    return extractor.to(device)


def random_inception(path, seed=0):
    """Save torch-fidelity's own Inception-v3, randomly initialised, as a weights file for `inception`:
    the same class and code path as the real weights, for tests and offline checks (as
    dit.data.vae.tiny_vae). Conv weights are drawn with He init, which keeps the activations alive through
    the 90-odd layers (PyTorch's default init shrinks them to ~1e-8: every image would give the same
    features)."""
    from torch import nn
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):  # the class builds itself, then loads weights: skip the load
        def load_state_dict(self, state_dict, strict=True):
            return None

    path = Path(path)
    empty = path.with_name(path.name + ".empty")
    torch.save({}, empty)
    with torch.random.fork_rng(devices=[]):  # every weight from `seed`; the caller's RNG untouched
        torch.manual_seed(seed)
        net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    empty.unlink()
    torch.save(net.state_dict(), path)
    return path


class UInt8Images(Dataset):
    """(N, H, W, C) uint8 images (numpy or torch), given as (3, H, W) tensors, as torch-fidelity takes
    them; one channel (the digits) is repeated to three."""

    def __init__(self, images):
        if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype not in (np.uint8, torch.uint8):
            raise UsageError(f"expected N×H×W×3 uint8 images, got shape {tuple(images.shape)} of {images.dtype}")
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = torch.as_tensor(self.images[i]).permute(2, 0, 1)
        return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def features(extractor, images, batch_size=64, desc=None):
    """{"2048": pool features, "logits_unbiased": logits} of a Dataset of (3, H, W) uint8 images, with a
    progress bar labelled `desc` (None: no bar). torch-fidelity resizes every image to 299×299 the way
    TensorFlow 1 does, as ADM's suite.

    The loop is torch-fidelity's get_featuresdict_from_dataset (0.3 and 0.4 alike), ours for the bar:
    its own (verbose=True) is always "Processing samples", vanishes when done, and prints that line again.
    """
    if len(images) == 0:
        raise UsageError("no images to compute features of")
    cuda = next(extractor.parameters()).is_cuda
    # Loader worker processes (up to 4, as torch-fidelity starts) pay off only for many files to decode;
    # images in memory, or a single batch, are read in-process.
    in_process = isinstance(images, UInt8Images) or len(images) <= batch_size
    loader = DataLoader(
        images,
        batch_size=min(batch_size, len(images)),
        num_workers=0 if in_process else min(4, 2 * multiprocessing.cpu_count()),
        pin_memory=cuda,
    )
    out = []
    with tqdm(total=len(images), desc=desc, unit="img", disable=desc is None) as bar, torch.no_grad():
        for batch in loader:
            batch = batch.cuda(non_blocking=True) if cuda else batch
            out.append({k: v.cpu() for k, v in extractor.convert_features_tuple_to_dict(extractor(batch)).items()})
            bar.update(len(batch))
    return {k: torch.cat([o[k] for o in out]) for k in out[0]}


def statistics(pool_features):
    """Mean and covariance (float64) of the pool features: what FID compares (Heusel et al. 2017)."""
    x = pool_features.double().numpy()
    return dict(mu=x.mean(axis=0), sigma=np.cov(x, rowvar=False))


def frechet_distance(pool_features, reference: dict) -> float:
    """FID of (N, D) pool features against reference statistics {"mu", "sigma"} (Heusel et al. 2017):
    ‖μ − μ_r‖² + tr Σ + tr Σ_r − 2 tr (Σ Σ_r)^½, in float64.

    tr (Σ Σ_r)^½ is the sum of the square roots of the eigenvalues of Σ Σ_r, which are those of the
    symmetric Σ^½ Σ_r Σ^½ (two D×D symmetric eigendecompositions, D = 2048: seconds on a CPU; equal to
    ADM's and torch-fidelity's scipy.linalg.sqrtm to rounding, without scipy's sqrtm, whose signature
    changed under torch-fidelity 0.3's call in recent SciPy). With no more samples than dimensions (a
    monitor's few hundred samples, the tests) it is computed in N×N instead: Σ = BBᵀ with B the centred
    features over √(N−1), and BBᵀΣ_r has the nonzero eigenvalues of the symmetric BᵀΣ_rB (milliseconds).
    """
    x = pool_features.double().cpu().numpy()
    mu_r, sigma_r = (np.asarray(reference[k], dtype=np.float64) for k in ("mu", "sigma"))
    if mu_r.shape != x.shape[1:] or sigma_r.shape != 2 * x.shape[1:]:
        raise UsageError(
            f"reference statistics of shape mu {mu_r.shape}, sigma {sigma_r.shape} do not fit features of dimension "
            f"{x.shape[1]}: they must be of the 2048-d Inception pool features"
        )
    n, dim = x.shape
    if n < 2:
        raise UsageError(f"FID needs at least 2 samples for a covariance, got {n}")
    if n > dim:
        sigma = np.cov(x, rowvar=False)
        w, v = np.linalg.eigh(sigma)
        root = (v * np.sqrt(w.clip(min=0))) @ v.T  # Σ^½
        trace_sqrt = np.sqrt(np.linalg.eigvalsh(root @ sigma_r @ root).clip(min=0)).sum()
        diff = x.mean(axis=0) - mu_r
        return float(diff @ diff + np.trace(sigma) + np.trace(sigma_r) - 2 * trace_sqrt)
    mu = x.mean(axis=0)
    b = (x - mu).T / np.sqrt(n - 1)
    trace_sqrt = np.sqrt(np.linalg.eigvalsh(b.T @ sigma_r @ b).clip(min=0)).sum()
    return float((mu - mu_r) @ (mu - mu_r) + (b * b).sum() + np.trace(sigma_r) - 2 * trace_sqrt)


# ------------------------------------------------------------------ samples and reference


def center_crop(image, size):
    """A real image as the samples were trained on: ADM's centre crop (dit.extract, the official
    train.py's), PIL image -> (3, size, size) uint8 tensor."""
    from dit.tools.extract import center_crop_arr

    return torch.from_numpy(np.array(center_crop_arr(image.convert("RGB"), size))).permute(2, 0, 1)


def image_folder(folder, crop_to=None):
    """The PNG/JPEG files of a folder (and, for a reference, its subfolders), as a Dataset."""
    from torch_fidelity.datasets import ImagesPathDataset
    from torch_fidelity.utils import glob_samples_paths

    deep = crop_to is not None  # real images sit in class subfolders; samples in one folder
    files = glob_samples_paths(str(folder), deep, "png,jpg,jpeg,JPEG", verbose=False)
    if not files:
        raise FileNotFoundError(f"{folder} holds no PNG or JPEG images{' (searched recursively)' if deep else ''}")
    if deep:
        # In a folder of real images, a file that is no image (a stray file, a broken download) is
        # skipped and named rather than failing the pass deep inside a loader worker. A header read,
        # no decoding: a JPEG truncated past its header is still found only when decoded.
        readable = [f for f in files if image_header_reads(f)]
        if len(readable) < len(files):
            skipped = sorted(set(files) - set(readable))
            print(
                f"{len(skipped)} of {len(files)} files in {folder} are not readable images and were skipped: "
                + ", ".join(skipped[:5])
                + (" ..." if len(skipped) > 5 else "")
            )
        files = readable
    return ImagesPathDataset(
        files, None if crop_to is None else partial(center_crop, size=crop_to)
    )  # picklable for workers


def image_header_reads(path):
    """Whether PIL recognises the file as an image (its header only)."""
    from PIL import Image

    try:
        with Image.open(path):
            return True
    except Exception:  # not an image, an unknown format, a header cut short
        return False


def load_samples(path):
    """Generated samples: an `.npz` whose `arr_0` is N×H×W×3 uint8 (ADM's format), or a folder of PNGs."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"samples {path} do not exist; pass the .npz or the folder of PNGs that dit.sample wrote")
    if path.is_dir():
        images = image_folder(path)
        check_one_size(images.files)
        return images
    if path.suffix == ".npz" and path.is_file():
        with np.load(path) as data:
            if "arr_0" not in data:
                raise UsageError(
                    f"{path} holds no arr_0 (it has {list(data.keys())}); samples go in arr_0, N×H×W×3 uint8"
                )
            return UInt8Images(data["arr_0"])
    raise UsageError(f"samples {path} are neither a folder of PNGs nor an .npz file; pass one of those")


def check_one_size(files):
    """FID compares images of one size: mixed sizes would be batched into an error, or, one at a
    time, each resized to 299×299 on its own and measured as if they were alike (header reads only)."""
    from PIL import Image

    sizes = {}
    for file in files:
        with Image.open(file) as image:
            sizes.setdefault(image.size, file)
        if len(sizes) > 1:
            (a, first), (b, second) = sizes.items()
            raise UsageError(
                f"the samples have mixed sizes: {first} is {a[0]}×{a[1]}, {second} is {b[0]}×{b[1]}; "
                "measure one set of samples of one size"
            )


def samples_manifest(path):
    """What drew the samples (dit.sample's manifest: the weights' digest, sampler, guidance, seed ...),
    from the folder's manifest.json or the .npz's `manifest`; None where there is none."""
    path = Path(path)
    if path.is_dir():
        return read_manifest(path)
    with np.load(path) as data:
        return json.loads(str(data["manifest"])) if "manifest" in data else None


def digit_images():
    """scikit-learn's 1,797 real 8×8 digits as uint8 images, mapped to [-1, 1] as the quickstart's
    shards (dit.data.digits) and back to bytes as the samples are (dit.data.vae.to_uint8)."""
    from sklearn.datasets import load_digits

    from dit.data.vae import to_uint8

    pixels = torch.from_numpy(load_digits().images).float() / 8.0 - 1.0
    return UInt8Images(to_uint8(pixels[:, None]))


def load_reference(ref, extractor, resolution=None, batch_size=64, keep_features=False, progress=True):
    """{"mu", "sigma"} (and "features", the pool features, when asked and available) of the reference;
    `progress`: a bar while its features are computed.

    `ref`: a statistics `.npz` (keys `mu` and `sigma`, as ADM's reference batches and --save-ref-stats;
    features come from its `arr_0` images when asked), a folder of real images (ADM centre crop to
    `resolution`), or "digits".
    """
    path = Path(ref)
    desc = "FID features (reference)" if progress else None
    if ref == "digits":
        images = digit_images()
    elif path.is_dir():
        if resolution is None:
            raise UsageError(f"a reference folder ({ref}) is cropped to the samples' resolution: give --resolution")
        images = image_folder(path, crop_to=resolution)
    elif path.suffix == ".npz" and path.is_file():
        with np.load(path) as data:
            stats = dict(mu=data["mu"], sigma=data["sigma"]) if {"mu", "sigma"} <= set(data.keys()) else None
            made_at = int(data["resolution"]) if "resolution" in data else -1  # ADM's batches do not say
            if stats is not None and resolution is not None and made_at not in (-1, resolution):
                raise UsageError(
                    f"reference statistics {ref} were computed on {made_at}×{made_at} images (of {data['source']}), "
                    f"but the samples are {resolution}×{resolution}; compute them at the samples' size "
                    f"(--ref <folder of real images> --save-ref-stats ...)"
                )
            if stats is not None and not keep_features:
                return stats
            if "arr_0" not in data:
                need = "images (arr_0) for precision/recall" if keep_features else "mu and sigma, or images in arr_0"
                raise UsageError(f"reference {ref} holds {sorted(data.keys())}, but it needs {need}")
            images = UInt8Images(data["arr_0"])
        if stats is not None:  # ADM's reference batch: FID against ITS statistics; the images serve P/R only
            return dict(stats, features=features(extractor, images, batch_size, desc)[POOL])
    else:
        raise FileNotFoundError(f"reference {ref} is not a folder of images, an .npz of statistics, or 'digits'")
    pool = features(extractor, images, batch_size, desc)[POOL]
    return dict(statistics(pool), features=pool) if keep_features else statistics(pool)


# ------------------------------------------------------------------ metrics


def save_statistics(path, reference, source, resolution):
    """mu and sigma of a reference, with what they were computed from: its source and the image
    size, which a later `--ref` of these statistics is checked against."""
    save_npz(
        path,
        mu=reference["mu"],
        sigma=reference["sigma"],
        source=np.array(str(source)),
        resolution=np.array(-1 if resolution is None else resolution),
    )


def evaluate(extractor, samples, ref, isc=False, prc=False, batch_size=64, save_ref_stats=None):
    """FID of `samples` (a Dataset of uint8 images, or a path for `load_samples`) against `ref` (see
    `load_reference`; a folder is cropped to the samples' size), and on request the Inception Score
    (10 splits, as ADM's suite) and precision/recall (k = 3 nearest neighbours on the Inception pool
    features, as ADM's suite; Kynkäänniemi et al. 2019)."""
    samples = load_samples(samples) if isinstance(samples, (str, Path)) else samples
    reference = load_reference(ref, extractor, samples[0].shape[1], batch_size, keep_features=prc)
    if save_ref_stats:
        save_statistics(save_ref_stats, reference, ref, samples[0].shape[1])
    ours = features(extractor, samples, batch_size, "FID features (samples)")
    metrics = dict(fid=frechet_distance(ours[POOL], reference), num_samples=len(samples))
    if isc:
        from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_featuresdict_to_metric

        splits = max(1, min(10, len(samples) // 2))  # ADM's 10, unless a split would hold one sample or none
        score = isc_featuresdict_to_metric(ours, LOGITS, isc_splits=splits, verbose=False)
        metrics.update(inception_score=score[KEY_METRIC_ISC_MEAN], inception_score_std=score[KEY_METRIC_ISC_STD])
    if prc:
        from torch_fidelity.metric_prc import prc_features_to_metric

        pr = prc_features_to_metric(ours[POOL], reference["features"], prc_neighborhood=3, verbose=False)
        metrics.update(precision=pr["precision"], recall=pr["recall"])
    return metrics


def check_reference(ref):
    """What load_reference reads, checked without reading it: a run of hours of sampling before FID
    (dit.fid50k) learns of a mistyped --ref at its start, not at its end."""
    path = Path(ref)
    if ref == "digits" or path.is_dir():
        return
    if path.suffix == ".npz" and path.is_file():
        with np.load(path) as data:
            keys = set(data.files)
        if {"mu", "sigma"} <= keys or "arr_0" in keys:
            return
        raise UsageError(f"reference {ref} holds {sorted(keys)}, but it needs mu and sigma (or images, arr_0)")
    raise UsageError(f"reference {ref} is not a folder of images, an .npz of statistics, or 'digits'")


def check_stats_path(path, samples):
    """--save-ref-stats names a new .npz, or reference statistics written before (rewritten): never
    the samples being measured or another file, which np.savez would replace."""
    if path.suffix != ".npz":
        raise UsageError(f"--save-ref-stats {path}: give a file name ending in .npz")
    if not path.parent.is_dir():
        raise UsageError(f"--save-ref-stats {path}: the folder {path.parent} does not exist")
    if samples is not None and path.resolve() == Path(samples).resolve():
        raise UsageError(f"--save-ref-stats {path} is the samples being measured; give another file name")
    if path.exists():
        try:
            with np.load(path) as held:
                is_stats = {"mu", "sigma"} <= set(held.files)
        except Exception:  # not an .npz at all
            is_stats = False
        if not is_stats:
            raise UsageError(
                f"--save-ref-stats {path} exists and holds no reference statistics (mu, sigma); give another file name"
            )


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", nargs="?", help="samples: an .npz (arr_0, N×H×W×3 uint8) or a folder of PNGs")
    parser.add_argument(
        "--ref", required=True, help="reference: a folder of real images, an .npz with mu and sigma, or 'digits'"
    )
    parser.add_argument("--inception-weights", help=f"a local copy of {INCEPTION_URL} (default: download it)")
    parser.add_argument("--isc", action="store_true", help="also the Inception Score")
    parser.add_argument("--prc", action="store_true", help="also precision and recall (needs reference images)")
    parser.add_argument("--save-ref-stats", help="write the reference's mu and sigma to this .npz, for --ref next time")
    parser.add_argument("--resolution", type=int, help="without samples: crop a reference folder to this size")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.samples is None and not args.save_ref_stats:
        raise UsageError("give the samples to measure, or --save-ref-stats to only compute the reference's statistics")
    if args.batch_size < 1 or (args.resolution is not None and args.resolution < 1):
        raise UsageError("--batch-size and --resolution must be positive integers")
    if args.save_ref_stats:
        check_stats_path(Path(args.save_ref_stats), args.samples)
    check_reference(args.ref)  # before Inception's weights are loaded (or fetched)
    extractor = inception(args.inception_weights, "cuda" if torch.cuda.is_available() else "cpu")
    if args.samples is None:
        reference = load_reference(args.ref, extractor, args.resolution, args.batch_size)
        save_statistics(args.save_ref_stats, reference, args.ref, 8 if args.ref == "digits" else args.resolution)
        print(f"reference statistics of {args.ref} written to {args.save_ref_stats}")
        return reference
    metrics = evaluate(extractor, args.samples, args.ref, args.isc, args.prc, args.batch_size, args.save_ref_stats)
    drawn = samples_manifest(args.samples)
    if drawn is not None:  # the figures say what they are of
        metrics["samples"] = dict(
            drawn["identity"],
            checkpoint=drawn["source"]["checkpoint"],
            step=drawn["source"]["step"],
            nfe=drawn.get("nfe"),
        )
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    exit_on_usage_error(main)
