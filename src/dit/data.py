"""Precomputed VAE latents, streamed from litdata shards.

The official recipe encodes every image with the VAE at every step and samples a fresh latent from
its posterior, with horizontal flips as the only augmentation (shared/DIT_FACTS.md §3). Here each
record holds the posterior (mean and std) of an image AND of its mirror image, encoded once; each
time a sample is drawn one of the two is picked and a latent is sampled from it — the same
distribution of training inputs, at no VAE cost:

    record = {"label": int, "posterior": float16 array (2, 2, C, H, W)}
                                          [image, flip] x [mean, std]

A folder of shards also holds `meta.json` (channels, latent size, classes, count, source), which
is checked against the model before training starts.

Reading keeps up with a GPU at the paper's 32 images per GPU (docs/benchmarks.md): a record is
decoded as a view of the chunk litdata holds, copied once, straight into a batch that lives in
shared memory as one block, and loader workers hand that block to the training process by name.
"""

import json
import logging
import struct
from pathlib import Path

import litdata
import numpy as np
import torch
from lightning import LightningDataModule
from litdata.constants import _NUMPY_DTYPES_MAPPING  # the shard format's dtype table (private: litdata pinned below 0.3)
from litdata.streaming.serializers import NumpySerializer
from torch.utils.data import DataLoader, TensorDataset, get_worker_info

META_FILE = "meta.json"
logging.getLogger("litdata").setLevel(logging.WARNING)  # it reports its cache size at every epoch


def write_shards(records, output_dir, meta, num_workers=1, chunk_bytes="64MB"):
    """Write an iterable of (label, posterior) pairs as litdata shards plus `meta.json`.

    `posterior` is a (2, 2, C, H, W) array: [image, flip] x [mean, std]. `meta` gives
    channels, latent_size, num_classes and source.
    """
    records = list(records)
    output_dir = Path(output_dir)
    litdata.optimize(
        fn=_to_record,
        inputs=records,
        output_dir=str(output_dir),
        chunk_bytes=chunk_bytes,
        num_workers=num_workers,
        mode="overwrite",
        verbose=False,
    )
    (output_dir / META_FILE).write_text(json.dumps(dict(meta, num_samples=len(records)), indent=2))


def _to_record(item):
    label, posterior = item
    return {"label": int(label), "posterior": np.ascontiguousarray(posterior, dtype=np.float16)}


class LatentDataModule(LightningDataModule):
    """Streams latent shards from a local folder or an object store (`s3://…`, `gs://…`).

    Each rank and loader worker reads its own part (litdata splits by rank and node), shuffled with
    `seed`, in fixed-shape batches (`drop_last`); the loader's position is saved in checkpoints so a
    run resumes mid-epoch. `global_batch_size` is the batch over all devices, as in the paper (256).
    Validation draws a sample grid: one row per class of `sample_classes`.
    """

    def __init__(
        self,
        path,
        channels,
        latent_size,
        num_classes,
        global_batch_size=256,
        num_workers=2,
        scale_factor=0.18215,
        flip=True,
        seed=0,
        prepare=None,
        cache_dir=None,
        sample_classes=(),
        samples_per_class=8,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.path = str(path)
        self.flip = flip
        self.scale_factor = scale_factor
        self.batch_size = None  # per device, set in setup()

    def prepare_data(self):
        """Build the shards of a bundled dataset (`prepare: digits`) once, on one process."""
        prepare = self.hparams.prepare
        if prepare and not (Path(self.path) / META_FILE).exists():
            if prepare != "digits":
                raise ValueError(f"unknown data preparer {prepare!r}; the one bundled dataset is 'digits'")
            from dit.digits import prepare_digits

            prepare_digits(self.path)

    def setup(self, stage=None):
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.hparams.global_batch_size % world:
            raise ValueError(
                f"global batch size {self.hparams.global_batch_size} does not divide over {world} devices; "
                f"use a multiple of {world} (data.global_batch_size=...)"
            )
        self.batch_size = self.hparams.global_batch_size // world
        self.check_shards_fit()

    def check_shards_fit(self):
        """The shards are there, whole, and hold what this data config says (meta.json)."""
        if "://" in self.path:
            return  # an object store: litdata's own index is checked when streaming starts
        folder = Path(self.path)
        if not (folder / META_FILE).exists():
            what = "does not exist" if not folder.exists() else f"holds no {META_FILE}"
            raise FileNotFoundError(
                f"data folder {folder} {what}: point data.path at a folder of latent shards "
                "(written by dit.data.write_shards)"
            )
        check_shards(folder)
        meta = json.loads((folder / META_FILE).read_text())
        for key in ("channels", "latent_size", "num_classes"):
            if meta[key] != self.hparams[key]:
                raise ValueError(
                    f"the shards in {folder} hold {key}={meta[key]}, but the data config says {self.hparams[key]}; "
                    f"set data.{key}={meta[key]} (the model takes its shape from the data config)"
                )

    def train_dataloader(self):
        dataset = litdata.StreamingDataset(
            self.path,
            cache_dir=self.hparams.cache_dir,
            shuffle=True,
            drop_last=True,
            seed=self.hparams.seed,
            serializers={"numpy": PosteriorView()},
        )
        if len(dataset) < self.batch_size:
            raise ValueError(
                f"{self.path} holds {len(dataset)} samples for this rank, fewer than one batch of {self.batch_size}"
            )
        workers = self.hparams.num_workers
        return litdata.StreamingDataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=workers,
            drop_last=True,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            collate_fn=CollateRecords(self.hparams.num_classes, self.hparams.channels, self.hparams.latent_size),
            worker_init_fn=share_batches_by_name,
            # Its own generator: starting an epoch's iterator then draws no number from the global
            # RNG, whose state checkpoints restore (an exact resume starts mid-epoch).
            generator=torch.Generator().manual_seed(self.hparams.seed),
        )

    def val_dataloader(self):
        """The conditions of the sample grid drawn at each validation: `samples_per_class` columns
        for each class of `sample_classes`, as (label, index) pairs; index seeds each sample's noise."""
        labels = torch.tensor(list(self.hparams.sample_classes), dtype=torch.long)
        labels = labels.repeat_interleave(self.hparams.samples_per_class)
        return DataLoader(TensorDataset(labels, torch.arange(len(labels))), batch_size=max(1, len(labels)))

    def on_after_batch_transfer(self, batch, dataloader_idx):
        """On the device: pick the image or its flip, sample z ~ N(mean, std²), scale it."""
        if not self.trainer.training:
            return batch
        return sample_latents(batch["posterior"], self.flip, self.scale_factor), batch["label"]


def check_shards(folder):
    """Every chunk litdata's index names is there and whole (a stat per file, no reading): a
    truncated or missing shard fails here, naming itself, not deep inside a loader worker."""
    index = folder / "index.json"
    if not index.exists():
        raise FileNotFoundError(f"{folder} has no index.json: it is not a folder of litdata shards")
    for chunk in json.loads(index.read_text())["chunks"]:
        path = folder / chunk["filename"]
        if not path.exists():
            raise FileNotFoundError(f"shard {path} is missing; restore it or write the shards again")
        if path.stat().st_size != chunk["chunk_bytes"]:
            raise ValueError(
                f"shard {path} is truncated or corrupt ({path.stat().st_size} bytes, the index says "
                f"{chunk['chunk_bytes']}); restore it or write the shards again"
            )


def sample_latents(posterior, flip, scale_factor):
    """(N, 2, 2, C, H, W) posteriors -> (N, C, H, W) latents: one of [image, flip] at random
    (always the image when `flip` is off), then mean + std·ε, times the VAE scale factor."""
    posterior = posterior.float()
    n = posterior.shape[0]
    if flip:
        pick = torch.randint(0, 2, (n,), device=posterior.device)
        chosen = posterior[torch.arange(n, device=posterior.device), pick]
    else:
        chosen = posterior[:, 0]
    mean, std = chosen[:, 0], chosen[:, 1]
    return (mean + std * torch.randn_like(mean)) * scale_factor


class PosteriorView(NumpySerializer):
    """litdata's decoding of a record's posterior without its copy: a read-only view of the
    record's bytes in the chunk litdata holds (a memory map of a local shard). `CollateRecords`
    copies it into the batch; the view keeps the chunk mapped until then. Same bytes on disk:
    dtype index, number of dims, dims (uint32 each), then the array."""

    def deserialize(self, data):
        dtype_index, ndim = struct.unpack_from("<II", data)
        shape = struct.unpack_from(f"<{ndim}I", data, 8)
        return np.frombuffer(data, _NUMPY_DTYPES_MAPPING[dtype_index], offset=8 + 4 * ndim).reshape(shape)


class CollateRecords:
    """Checks a batch of records and stacks them, in the loader worker. The checks (label range,
    posterior shape) are cheap host-side ones: a bad record names itself here rather than surfacing
    as a device-side assert later. The batch is one block of memory, posteriors then labels, made
    shared from the start as torch's default collate does in a worker: each record's bytes are
    copied once, and the block goes to the training process in one hand-over, not one a tensor."""

    def __init__(self, num_classes, channels, latent_size):
        self.num_classes = num_classes
        self.shape = (2, 2, channels, latent_size, latent_size)

    def __call__(self, records):
        for record in records:
            if record["posterior"].shape != self.shape:
                raise ValueError(f"a record's posterior has shape {record['posterior'].shape}, expected {self.shape}")
        labels = np.array([record["label"] for record in records], dtype=np.int64)
        outside = (labels < 0) | (labels >= self.num_classes)
        if outside.any():
            raise ValueError(
                f"a record has label {labels[outside][0]}, outside [0, {self.num_classes - 1}] for this data config"
            )
        posterior_bytes = len(records) * int(np.prod(self.shape)) * 2  # float16
        size = posterior_bytes + labels.nbytes
        storage = torch.UntypedStorage._new_shared(size) if get_worker_info() else torch.UntypedStorage(size)
        block = torch.empty(0, dtype=torch.uint8).set_(storage)
        posterior = block[:posterior_bytes].view(torch.float16).view(len(records), *self.shape)
        label = block[posterior_bytes:].view(torch.int64)
        np.stack([record["posterior"] for record in records], out=posterior.numpy())
        label.numpy()[:] = labels
        return {"label": label, "posterior": posterior}


def share_batches_by_name(worker_id):
    """In each loader worker: hand batches to the training process as named shared-memory files.
    torch's default passes a file descriptor per batch over a socket, a round trip that waits for
    the busy worker's GIL; at batch 32 that capped the loader near 8K samples/s on 2 cores
    (docs/benchmarks.md). Only the workers change strategy; the process that trains keeps its own.
    Lightning's worker seeding (seed_everything(workers=True)) steps aside for this function, and
    has nothing to seed here: the workers draw no random numbers (litdata shuffles with `seed`)."""
    torch.multiprocessing.set_sharing_strategy("file_system")
