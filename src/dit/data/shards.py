"""Precomputed VAE latents, streamed from litdata shards.

The official recipe encodes every image with the VAE at every step and samples a fresh latent from
its posterior, with horizontal flips as the only augmentation (the official train.py). Here each
record holds the posterior (mean and std) of an image AND of its mirror image, encoded once; each
time a sample is drawn one of the two is picked and a latent is sampled from it — the same
distribution of training inputs, at no VAE cost:

    record = {"label": int, "posterior": float16 array (2, 2, C, H, W)}
                                          [image, flip] x [mean, std]

For REPA (Yu et al. 2024) a record may also hold the patch tokens of a frozen vision encoder
(dit.data.encoders) of the unflipped image, which REPA aligns DiT's tokens to:

    record = {"label": int, "posterior": ..., "features": float16 array (T, D)}

(written by `python -m dit.extract --repa-encoder ...`; a flipped draw mirrors them on the token
grid, see dit.data.datamodule.sample_latents). A folder's records all hold features or none do.

A folder of shards also holds `meta.json` (channels, latent size, classes, count, source; with
features, `features: {"encoder", "tokens", "dim", "resolution", ...}`), which is checked against
the model before training starts.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import struct
import zlib
from pathlib import Path

import litdata
import numpy as np
from litdata.streaming.serializers import NumpySerializer

from dit.errors import UsageError
from dit.platform.compat import litdata_numpy_dtypes

META_FILE = "meta.json"
logging.getLogger("litdata").setLevel(logging.WARNING)  # it reports its cache size at every epoch


def write_shards(records, output_dir: str | Path, meta: dict, chunk_bytes: str = "64MB") -> None:
    """Write an iterable of (label, posterior) pairs, or (label, posterior, features) triples, as
    litdata shards plus `meta.json`.

    `posterior` is a (2, 2, C, H, W) array: [image, flip] x [mean, std]; `features` a (T, D) array
    of encoder patch tokens of the unflipped image, stored as float16. `meta` gives channels,
    latent_size, num_classes and source (and, with features, `features`: the encoder's name and
    input resolution); the chunks' CRC-32s and the features' `tokens` and `dim` are added to it.
    """
    output_dir = Path(output_dir)
    shapes = []  # the features' shape, noted as the records go by (they may be a generator)

    def noting(records):
        for record in records:
            if len(record) == 3 and not shapes:
                shapes.append(np.shape(record[2]))
            yield record

    count = write_chunks(noting(records), output_dir, chunk_bytes)
    meta = dict(meta, num_samples=count, chunk_crc32=chunk_checksums(output_dir) if count else {})
    if shapes:
        meta["features"] = features_meta(meta.get("features"), *shapes[0])
    elif meta.get("features") and count:
        raise UsageError("meta gives features, but the records hold none; pass (label, posterior, features) records")
    (output_dir / META_FILE).write_text(json.dumps(meta, indent=2))


def features_meta(given: dict | None, tokens: int, dim: int) -> dict:
    """meta.json's `features` entry: what the writer says (encoder, resolution), with the records'
    token count and width, which must agree with it where it gives them."""
    entry = dict(given or {})
    for key, value in (("tokens", tokens), ("dim", dim)):
        if entry.setdefault(key, value) != value:
            raise UsageError(f"meta gives features {key}={entry[key]}, but the records' features have {key}={value}")
    return entry


def write_chunks(records, folder: Path, chunk_bytes: str = "64MB") -> int:
    """(label, posterior) or (label, posterior, features) records as litdata chunks and their
    index.json in `folder` (created), written in this process by litdata's BinaryWriter
    (litdata.optimize would start worker processes, ~10 s each, for work this process does
    anyway). All records hold features of one shape, or none do. Returns the number of records."""
    from litdata.streaming.writer import BinaryWriter

    folder.mkdir(parents=True, exist_ok=True)
    writer, count, feature_shape = None, 0, None
    for count, (label, posterior, *features) in enumerate(records, 1):
        writer = writer or BinaryWriter(str(folder), chunk_bytes=chunk_bytes)
        record = {"label": int(label), "posterior": np.ascontiguousarray(posterior, dtype=np.float16)}
        shape = np.shape(features[0]) if features else None
        feature_shape = shape if count == 1 else feature_shape
        if shape != feature_shape:  # litdata's writer takes the record layout from the first record, assumes it after
            raise UsageError(
                f"record {count - 1} has features of shape {shape}, the first record {feature_shape}: "
                "a folder's records all hold features of one (tokens, dim) shape, or none do"
            )
        if features:
            record["features"] = np.ascontiguousarray(features[0], dtype=np.float16)
        writer[count - 1] = record
    if writer is None:
        return 0  # nothing to write: meta.json alone says so
    writer.done()
    # done() leaves the writer's "<rank>.index.json"; its merge() would wait for one per WORLD_SIZE
    # process of torchrun, but this writer is alone in its folder: its index is the whole index.
    (worker_index,) = folder.glob("*.index.json")
    worker_index.rename(folder / "index.json")
    return count


def check_shards(folder: Path, read_chunks: bool = True) -> None:
    """Every chunk litdata's index names is there and whole: a missing or truncated chunk (a stat
    per file) or, where meta.json records the chunks' CRC-32s (`write_shards` and dit.extract
    write them), a chunk with a changed byte fails here, naming itself, not deep inside a loader
    worker or silently as a wrong latent. A chunk's CRC is read once: `.checked.json` remembers
    the size, mtime and inode of the chunks that passed (where the folder can be written), and
    only with `read_chunks` (one process per node: the others stat the files)."""
    index = folder / "index.json"
    if not index.exists():
        raise FileNotFoundError(f"{folder} has no index.json: it is not a folder of litdata shards")
    expected = read_json(folder / META_FILE).get("chunk_crc32", {}) if (folder / META_FILE).exists() else {}
    checked_file = folder / ".checked.json"
    try:
        checked = json.loads(checked_file.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: rebuilt
        checked = {}
    passed = {}
    for chunk in read_json(index, "chunks")["chunks"]:
        path = folder / chunk["filename"]
        if not path.exists():
            raise FileNotFoundError(f"shard {path} is missing; restore it or write the shards again")
        stat = path.stat()
        if stat.st_size != chunk["chunk_bytes"]:
            raise UsageError(
                f"shard {path} is truncated or corrupt ({stat.st_size} bytes, the index says "
                f"{chunk['chunk_bytes']}); restore it or write the shards again"
            )
        if chunk["filename"] in expected and read_chunks:
            mark = [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev]  # a copy (cp -a, rsync -a) is a new inode
            if checked.get(chunk["filename"]) != mark and file_crc32(path) != expected[chunk["filename"]]:
                raise UsageError(
                    f"shard {path} is corrupt: it fails its CRC-32 check (a changed byte); restore it or write the shards again"
                )
            passed[chunk["filename"]] = mark
    if passed and passed != checked:
        try:
            checked_file.write_text(json.dumps(passed))
        except OSError:
            pass  # a read-only folder: the chunks are read again at the next start


def file_crc32(path):
    """CRC-32 of a file, as 8 hex digits."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def chunk_checksums(folder):
    """{chunk file name: CRC-32} of every chunk of a shard folder's index, for meta.json."""
    chunks = read_json(Path(folder) / "index.json", "chunks")["chunks"]
    return {c["filename"]: file_crc32(Path(folder) / c["filename"]) for c in chunks}


def read_json(path, *keys):
    """A JSON file of the shard folder that holds `keys`, or a UsageError that names it."""
    try:
        content = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is corrupt ({err}); restore it or write the shards again") from None
    missing = [k for k in keys if not isinstance(content, dict) or k not in content]
    if missing:
        raise UsageError(
            f"{path} lacks {', '.join(missing)}: it was not written by dit.data.shards.write_shards; write the shards again"
        )
    return content


class ShardDataset(litdata.StreamingDataset):
    """litdata's dataset, reporting a record that cannot be decoded (a changed byte in a chunk's
    header or offsets: litdata's struct.error or a buffer of the wrong size) by naming its chunk."""

    def __init__(self, path, **kwargs):
        super().__init__(path, **kwargs)
        self.folder = path

    def __getitem__(self, index):
        try:
            return super().__getitem__(index)
        except (struct.error, ValueError, RuntimeError, IndexError) as err:
            if "://" in self.folder:  # streamed: a failed download looks the same; keep litdata's own error
                raise
            chunks = read_json(Path(self.folder) / "index.json", "chunks")["chunks"]
            chunk = getattr(index, "chunk_index", None)  # iteration passes litdata's ChunkedIndex
            if chunk is None:  # a plain record number: chunks hold consecutive records
                chunk = bisect.bisect_right(list(itertools.accumulate(c["chunk_size"] for c in chunks)), int(index))
            name = Path(self.folder) / chunks[chunk]["filename"]
            raise UsageError(
                f"shard {name} cannot be decoded ({type(err).__name__}: {err}); it is corrupt: restore it or write the shards again"
            ) from None


class PosteriorView(NumpySerializer):
    """litdata's decoding of a record's posterior (and features) without its copy: a read-only view
    of the record's bytes in the chunk litdata holds (a memory map of a local shard). `CollateRecords`
    copies it into the batch; the view keeps the chunk mapped until then. Same bytes on disk:
    dtype index, number of dims, dims (uint32 each), then the array."""

    def deserialize(self, data):
        dtype_index, ndim = struct.unpack_from("<II", data)
        shape = struct.unpack_from(f"<{ndim}I", data, 8)
        return np.frombuffer(data, litdata_numpy_dtypes()[dtype_index], offset=8 + 4 * ndim).reshape(shape)
