"""The LightningDataModule of precomputed VAE latents: litdata shards (dit.data.shards) streamed
in fixed-shape batches, a latent sampled from each record's posterior on the device.

Reading keeps up with a GPU at the paper's 32 images per GPU (docs/benchmarks.md): a record is
decoded as a view of the chunk litdata holds and copied once, straight into a batch block of
shared memory that the loader made before its workers started and reuses all epoch; a worker
hands the training process only the block's number, and the training process copies the batch
out and frees the block at once.
"""

from __future__ import annotations

import math
import platform
from pathlib import Path

import litdata
import numpy as np
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, get_worker_info

from dit.data.shards import META_FILE, PosteriorView, ShardDataset, check_shards, read_json
from dit.errors import UsageError
from dit.platform.compat import end_loader_restore, new_shared_storage

NO_FEATURES_FIX = (
    "encoder features; write shards with them (`python -m dit.extract IMAGES OUT --repa-encoder dinov2_vitb14`), "
    "or set data.features=false"
)


class LatentDataModule(LightningDataModule):
    """Streams latent shards from a local folder or an object store (`s3://…`, `gs://…`).

    Each rank and loader worker reads its own part (litdata splits by rank and node), shuffled with
    `seed`, in fixed-shape batches (`drop_last`); the loader's position is saved in checkpoints so a
    run resumes mid-epoch. `global_batch_size` is the batch over all devices, as in the paper (256).
    Validation draws a sample grid: one row per class of `sample_classes`, in batches of
    `sample_batch_size` (dit.diffusion.sampling's seeding: a grid is the same on any number of devices).
    `pixels` says the "latents" are images in [-1, 1] (the digits), which need no VAE to be seen.
    `features` (REPA, Yu et al. 2024) makes the train batches (x, y, features): each record's encoder
    patch tokens (N, T, D) float32, mirrored on the token grid where the latent is the flip's
    (`sample_latents`); the shards must hold them (`python -m dit.extract --repa-encoder ...`).
    `shuffle=False` reads the records in order (debug=overfit: the same first batch at every step).
    """

    def __init__(
        self,
        path: str,
        channels: int,
        latent_size: int,
        num_classes: int,
        global_batch_size: int = 256,
        num_workers: int = 2,
        scale_factor: float = 0.18215,
        flip: bool = True,
        seed: int = 0,
        prepare: str | None = None,
        cache_dir: str | None = None,
        sample_classes: tuple[int, ...] = (),
        samples_per_class: int = 8,
        sample_batch_size: int = 64,
        pixels: bool = False,
        features: bool = False,
        shuffle: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.path = str(path)
        self.flip = flip
        self.scale_factor = scale_factor
        self.pixels = pixels
        self.features = features
        self.feature_shape = None  # (tokens, dim) of the shards' features, read from meta.json in setup()
        self.batch_size = None  # per device, set in setup()

    def prepare_data(self):
        """Build the shards of a bundled dataset (`prepare: digits`) once, on one process."""
        prepare = self.hparams.prepare
        if "://" not in self.path and Path(self.path).exists() and not Path(self.path).is_dir():
            raise UsageError(
                f"data.path={self.path} is a file, not a folder: point data.path at a folder of latent shards"
                + (" (or a new folder to prepare the digits in)" if prepare == "digits" else "")
            )
        if prepare and not (Path(self.path) / META_FILE).exists():
            if prepare != "digits":
                raise UsageError(f"unknown data preparer {prepare!r}; the one bundled dataset is 'digits'")
            if Path(self.path).is_dir() and any(Path(self.path).iterdir()):  # its chunks would be written over
                raise UsageError(
                    f"data.path={self.path} holds files but no {META_FILE} (another dataset, or a preparation "
                    "stopped half-way): the digits are written only into a new or empty folder; give another "
                    "data.path, or delete that folder to prepare them anew"
                )
            from dit.data.digits import prepare_digits

            prepare_digits(self.path)

    def setup(self, stage=None):
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.hparams.global_batch_size % world:
            raise UsageError(
                f"global batch size {self.hparams.global_batch_size} does not divide over {world} devices; "
                f"use a multiple of {world} (data.global_batch_size=...)"
            )
        self.batch_size = self.hparams.global_batch_size // world
        self.check_shards_fit()

    def check_shards_fit(self, feature_tokens: int | None = None, feature_dim: int | None = None):
        """The shards are there, whole, and hold what this data config says (meta.json). With
        `data.features`, they hold encoder features; given `feature_tokens` / `feature_dim` (what a
        REPA projector aligns to: DiT's token count, the encoder's width), the features have them."""
        if "://" in self.path:
            return  # an object store: litdata's own index is checked when streaming starts; features by CollateRecords
        folder = Path(self.path)
        if not (folder / META_FILE).exists():
            what = "does not exist" if not folder.exists() else f"holds no {META_FILE}"
            raise FileNotFoundError(
                f"data folder {folder} {what}: point data.path at a folder of latent shards "
                "(written by dit.data.shards.write_shards)"
            )
        check_shards(folder, read_chunks=self.trainer is None or self.trainer.local_rank == 0)
        meta = read_json(folder / META_FILE, "channels", "latent_size", "num_classes")
        for key in ("channels", "latent_size", "num_classes"):
            if meta[key] != self.hparams[key]:
                raise UsageError(
                    f"the shards in {folder} hold {key}={meta[key]}, but the data config says {self.hparams[key]}; "
                    f"set data.{key}={meta[key]} (the model takes its shape from the data config)"
                )
        if not self.features:
            return
        entry = meta.get("features")
        if not isinstance(entry, dict) or not {"tokens", "dim"} <= entry.keys():
            raise UsageError(f"data.features=true, but the shards in {folder} hold no {NO_FEATURES_FIX}")
        self.feature_shape = (int(entry["tokens"]), int(entry["dim"]))
        for what, want, have, fix in (
            ("tokens", feature_tokens, entry["tokens"], "the model's token count (latent_size/patch)² must equal it"),
            ("dim", feature_dim, entry["dim"], "the projector's output width must equal it"),
        ):
            if want is not None and want != have:
                raise UsageError(
                    f"the features in {folder} have {what}={have} ({entry.get('encoder', 'an encoder')} at "
                    f"{entry.get('resolution', '?')} px), but {want} are asked for: {fix}; extract them again "
                    "for this model (dit.extract --resolution, --repa-encoder) or change the model"
                )

    def train_dataloader(self):
        dataset = ShardDataset(
            self.path,
            cache_dir=self.hparams.cache_dir,
            shuffle=self.hparams.shuffle,
            drop_last=True,
            seed=self.hparams.seed,
            serializers={"numpy": PosteriorView()},
        )
        if len(dataset) < self.batch_size:
            raise UsageError(
                f"{self.path} holds {len(dataset)} samples for this rank, fewer than one batch of {self.batch_size}"
            )
        if self.features and self.feature_shape is None:  # an object store: meta.json was not read, a record is
            first = dataset[0]
            if "features" not in first:
                raise UsageError(f"data.features=true, but the records of {self.path} hold no {NO_FEATURES_FIX}")
            self.feature_shape = tuple(first["features"].shape)
        return LatentLoader(
            dataset,
            CollateRecords(
                self.hparams.num_classes,
                self.hparams.channels,
                self.hparams.latent_size,
                features=self.feature_shape if self.features else None,
            ),
            batch_size=self.batch_size,
            num_workers=self.hparams.num_workers,
            pin_memory=torch.cuda.is_available(),
            drop_last=True,
            persistent_workers=False,  # each epoch makes its pool of batch blocks for the workers it starts
            worker_init_fn=share_batches_by_name,
            # Its own generator: starting an epoch's iterator then draws no number from the global
            # RNG, whose state checkpoints restore (an exact resume starts mid-epoch).
            generator=torch.Generator().manual_seed(self.hparams.seed),
        )

    def val_dataloader(self):
        """The sample grid drawn at each validation: `samples_per_class` columns for each class of
        `sample_classes`, as whole batches (batch number, labels, sample indices), which the
        distributed sampler deals to the devices."""
        labels = torch.tensor(list(self.hparams.sample_classes), dtype=torch.long)
        return DataLoader(
            GridBatches(labels.repeat_interleave(self.hparams.samples_per_class), self.hparams.sample_batch_size),
            batch_size=None,
        )

    def on_after_batch_transfer(self, batch, dataloader_idx):
        """On the device: pick the image or its flip, sample z ~ N(mean, std²), scale it; with
        `features`, their tokens too, mirrored where the flip was picked."""
        if not self.trainer.training:
            return batch
        if self.features:
            x, features = sample_latents(batch["posterior"], self.flip, self.scale_factor, batch["features"])
            return x, batch["label"], features
        return sample_latents(batch["posterior"], self.flip, self.scale_factor), batch["label"]


class GridBatches(Dataset):
    """Batch k of a sample grid: (k, its labels, its sample indices [kB, (k+1)B))."""

    def __init__(self, labels, batch_size):
        self.labels, self.batch_size = labels, batch_size

    def __len__(self):
        return -(-len(self.labels) // self.batch_size)

    def __getitem__(self, k):
        index = torch.arange(k * self.batch_size, min((k + 1) * self.batch_size, len(self.labels)))
        return k, self.labels[index], index


def sample_latents(posterior, flip, scale_factor, features=None):
    """(N, 2, 2, C, H, W) posteriors -> (N, C, H, W) latents: one of [image, flip] at random
    (always the image when `flip` is off), then mean + std·ε, times the VAE scale factor.

    With `features` ((N, T, D) encoder tokens of the unflipped images, T a square grid in row-major
    order), returns (latents, features as float32), the features of each flipped draw mirrored
    left-right on the token grid. That is how a flip moves the patches, so each token stays on the
    patch it describes, but only approximately what the encoder gives for the mirrored image
    (DINOv2 is not flip-equivariant). REPA itself trains without flips (its dataset.py has none);
    `data.flip=false` keeps its exact targets. The draws are the same with or without features."""
    posterior = posterior.float()
    n = posterior.shape[0]
    if flip:
        pick = torch.randint(0, 2, (n,), device=posterior.device)
        chosen = posterior[torch.arange(n, device=posterior.device), pick]
    else:
        chosen = posterior[:, 0]
    mean, std = chosen[:, 0], chosen[:, 1]
    latents = (mean + std * torch.randn_like(mean)) * scale_factor
    if features is None:
        return latents
    features = features.float()
    if flip:
        features = torch.where(pick.bool()[:, None, None], mirror_tokens(features), features)
    return latents, features


def mirror_tokens(features):
    """(N, T, D) tokens of a g×g grid in row-major order -> the tokens of the left-right mirrored grid
    (column c <- column g-1-c): what a horizontal flip of the image does to its patch positions."""
    n, tokens, dim = features.shape
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise UsageError(f"features of {tokens} tokens are not a square grid; extract them again (dit.extract)")
    return features.view(n, grid, grid, dim).flip(2).reshape(n, tokens, dim)


class CollateRecords:
    """Checks a batch of records and stacks them, in the loader worker. The checks (label range,
    posterior shape) are cheap host-side ones: a bad record names itself here rather than surfacing
    as a device-side assert later. The batch is one block of memory, posteriors then labels, and
    each record's bytes are copied once, straight into it.

    In a worker of a `LatentLoader` the block is a free one of the worker's part of `pool` (shared
    memory, made before the workers started): the batch is returned as {"slot": (worker, block),
    "size": n} and `LatentLoader` reads it from there. Should every block of the worker's part be
    in use, a fresh block of shared memory is made instead and the batch returned in it, as in any
    other worker; outside workers it is a plain block. Either way {"label", "posterior"} views of
    a block come from `views`.

    With `features` = (tokens, dim), each record's float16 features are checked and copied too, after
    the labels (an 8-byte aligned offset, whatever their size): {"label", "posterior", "features"}."""

    def __init__(self, num_classes, channels, latent_size, features: tuple[int, int] | None = None):
        self.num_classes = num_classes
        self.shape = (2, 2, channels, latent_size, latent_size)
        self.feature_shape = tuple(features) if features is not None else None
        feature_bytes = int(np.prod(self.feature_shape)) * 2 if features is not None else 0
        self.record_bytes = int(np.prod(self.shape)) * 2 + 8 + feature_bytes  # float16 posterior + int64 label
        self.pool = None  # (blocks, in_use) of the epoch a LatentLoader started last

    def __call__(self, records):
        for record in records:
            if record["posterior"].shape != self.shape:
                raise UsageError(f"a record's posterior has shape {record['posterior'].shape}, expected {self.shape}")
            if self.feature_shape is not None:
                if "features" not in record:
                    raise UsageError(f"data.features=true, but a record holds no {NO_FEATURES_FIX}")
                if record["features"].shape != self.feature_shape:
                    raise UsageError(
                        f"a record's features have shape {record['features'].shape}, expected {self.feature_shape}"
                    )
        labels = np.array([record["label"] for record in records], dtype=np.int64)
        outside = (labels < 0) | (labels >= self.num_classes)
        if outside.any():
            raise UsageError(
                f"a record has label {labels[outside][0]}, outside [0, {self.num_classes - 1}] for this data config"
            )
        n, size = len(records), len(records) * self.record_bytes
        worker, slot = get_worker_info(), None
        free = np.flatnonzero(self.pool[1][worker.id].numpy() == 0) if worker and self.pool else ()
        if len(free):
            slot = (worker.id, int(free[0]))
            self.pool[1][slot] = 1  # the training process sets it back to 0 once it has copied the batch out
            block = self.pool[0][slot][:size]
        elif worker:  # all this worker's blocks in use (never wait: no deadlock), or not a LatentLoader's worker
            block = torch.empty(0, dtype=torch.uint8).set_(new_shared_storage(size))
        else:
            block = torch.empty(size, dtype=torch.uint8)
        batch = self.views(block, n)
        np.stack([record["posterior"] for record in records], out=batch["posterior"].numpy())
        batch["label"].numpy()[:] = labels
        if self.feature_shape is not None:
            np.stack([record["features"] for record in records], out=batch["features"].numpy())
        return batch if slot is None else {"slot": slot, "size": n}

    def views(self, block, n):
        """The batch of `n` records in a uint8 block: {"label": (n,) int64, "posterior": (n, 2, 2, C, H, W)
        float16}, and "features": (n, T, D) float16 with `features`."""
        posterior_bytes = n * int(np.prod(self.shape)) * 2
        posterior = block[:posterior_bytes].view(torch.float16).view(n, *self.shape)
        batch = {"label": block[posterior_bytes : posterior_bytes + 8 * n].view(torch.int64), "posterior": posterior}
        if self.feature_shape is not None:
            batch["features"] = block[posterior_bytes + 8 * n :].view(torch.float16).view(n, *self.feature_shape)
        return batch


# Reusing a block relies on the training process's reads of a batch being done before the worker
# sees the block's in-use flag at 0. The flag is a plain byte written after the copy: x86's
# ordering (TSO: a store is never seen before an earlier load) makes that enough; weaker orderings
# (arm64) would need a fence that Python does not offer, so there every batch gets a fresh block.
REUSE_BLOCKS = platform.machine() in ("x86_64", "AMD64")


class LatentLoader(litdata.StreamingDataLoader):
    """litdata's loader, with its workers filling batch blocks that are made once an epoch and
    reused, rather than a fresh block of shared memory per batch: at batch 32 the page faults of
    fresh blocks and their hand-over cost a worker about half its time (docs/benchmarks.md).

    Each epoch makes `prefetch_factor + 1` blocks per worker (what one worker's batches usually
    hold at once: those in flight plus the one being copied; a worker that gets more prefetch
    work, once another has finished its share, falls back to fresh blocks) and an in-use flag per block, in
    shared memory, before the workers start (fork inherits them, spawn receives them pickled with
    the collate function). A worker fills a free block and sends its number; the training process
    copies the batch out (into pinned memory if `pin_memory`, so the DataLoader's own pinning is
    off) and clears the flag before yielding it, so a caller that keeps batches keeps copies. A
    new pool per epoch means workers of an earlier, abandoned iterator never share one, and flags
    left set by a crashed worker die with its epoch. Batches stay one for one with litdata's, so
    its resume state is untouched. Without workers it is litdata's loader as is."""

    def __init__(self, dataset, collate, *, num_workers, pin_memory, **kwargs):
        # persistent workers would keep the pool of the epoch that started them
        self.reuse_blocks = REUSE_BLOCKS and num_workers > 0 and not kwargs.get("persistent_workers")
        super().__init__(
            dataset,
            collate_fn=collate,
            num_workers=num_workers,
            pin_memory=pin_memory and not self.reuse_blocks,
            **kwargs,
        )
        self.collate = collate
        self.pin_batches = pin_memory
        self.began_restored_epoch = False

    def __iter__(self):
        # An epoch that began from a restored position (an exact resume) is replayed by litdata at
        # every later __iter__ too, until one ends in StopIteration, which Lightning never asks for:
        # the next epoch is a new one.
        if self.began_restored_epoch:
            end_loader_restore(self)
        self.began_restored_epoch = bool(getattr(self, "restore", False))
        if not self.reuse_blocks:
            yield from super().__iter__()
            return
        # A generator's body runs at the first next(), the same call in which litdata's loader
        # starts this epoch's workers: they take this pool, whatever other iterators exist.
        slots = (self.num_workers, self.prefetch_factor + 1)
        blocks = torch.empty(*slots, self.batch_size * self.collate.record_bytes, dtype=torch.uint8).share_memory_()
        in_use = torch.zeros(slots, dtype=torch.uint8).share_memory_()
        self.collate.pool = blocks, in_use
        for batch in super().__iter__():
            if "slot" in batch:
                block = blocks[batch["slot"]][: batch["size"] * self.collate.record_bytes]
                own = torch.empty(block.shape, dtype=torch.uint8, pin_memory=self.pin_batches)
                # numpy copies on this thread; torch's copy_ wakes its thread pool, whose spinning
                # took the workers' CPU (the training process's CPU a sample tripled)
                own.numpy()[:] = block.numpy()
                in_use[batch["slot"]] = 0  # after the copy has read the block: see REUSE_BLOCKS
                batch = self.collate.views(own, batch["size"])
            elif self.pin_batches:
                batch = {key: value.pin_memory() for key, value in batch.items()}
            yield batch


def share_batches_by_name(worker_id):
    """In each loader worker: hand batches in fresh blocks (see `CollateRecords`: none of the pool
    free, or no pool on this CPU) to the training process as named shared-memory files. torch's
    default passes a file descriptor per batch over a socket, a round trip that waits for the busy
    worker's GIL; at batch 32 that capped the loader near 8K samples/s on 2 cores
    (docs/benchmarks.md). Only the workers change strategy; the process that trains keeps its own.
    Lightning's worker seeding (seed_everything(workers=True)) steps aside for this function, and
    has nothing to seed here: the workers draw no random numbers (litdata shuffles with `seed`)."""
    torch.multiprocessing.set_sharing_strategy("file_system")
