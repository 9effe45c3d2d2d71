"""Latent shards (dit.data.shards): litdata's format read without a copy, the digits, damaged chunks."""

import json
import os

import numpy as np
import pytest
from conftest import datamodule, numbered_shards

from dit.data.shards import PosteriorView


def test_posterior_view_decodes_litdatas_bytes_without_a_copy():
    from litdata.streaming.serializers import NumpySerializer

    posterior = np.arange(2 * 2 * 3 * 4 * 4, dtype=np.float16).reshape(2, 2, 3, 4, 4)
    data, _ = NumpySerializer().serialize(posterior)
    view = PosteriorView().deserialize(memoryview(data))
    assert view.dtype == np.float16 and np.array_equal(view, posterior)
    assert np.shares_memory(view, np.frombuffer(data, np.uint8)) and not view.flags.writeable


def test_digits_shards(digits_dir):
    dm = datamodule(digits_dir, channels=1, latent_size=8, num_classes=10, batch=128)
    batch = next(iter(dm.train_dataloader()))
    x, y = dm.on_after_batch_transfer(batch, 0)
    assert x.shape == (128, 1, 8, 8) and x.min() >= -1 and x.max() <= 1 and y.max() <= 9
    assert json.loads((digits_dir / "meta.json").read_text())["num_samples"] == 1797


def test_a_damaged_shard_folder_names_the_file(tmp_path):
    """A folder of random files, a corrupt index.json or meta.json, a changed byte in a chunk's
    header or offsets: each is named, not a JSONDecodeError or litdata's struct.error."""
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "a.bin").write_bytes(os.urandom(100))
    with pytest.raises(FileNotFoundError, match="holds no meta.json: point data.path at a folder of latent shards"):
        datamodule(tmp_path / "random")
    path = numbered_shards(tmp_path / "s", n=64)
    index, meta = (path / "index.json").read_text(), (path / "meta.json").read_text()
    (path / "index.json").write_text(index[: len(index) // 2])
    with pytest.raises(ValueError, match=r"index.json is corrupt \(.*\); restore it or write the shards again"):
        datamodule(path)
    (path / "index.json").write_text(index)
    (path / "meta.json").write_text("{}")
    with pytest.raises(ValueError, match="meta.json lacks channels, latent_size, num_classes"):
        datamodule(path)
    # as shards that record no CRC-32s (or stream from a bucket): decoding is where a bad header shows
    (path / "meta.json").write_text(json.dumps({k: v for k, v in json.loads(meta).items() if k != "chunk_crc32"}))
    chunk = path / json.loads(index)["chunks"][1]["filename"]
    data = bytearray(chunk.read_bytes())
    data[6] ^= 0xFF  # inside the chunk's table of record offsets
    chunk.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"shard {chunk} cannot be decoded \(.*\); it is corrupt"):
        list(datamodule(path).train_dataloader())


def test_a_changed_byte_inside_a_record_fails_the_chunks_crc(tmp_path):
    """A flip in a latent's bytes decodes fine and would train on a wrong latent: the CRC-32 that
    write_shards records in meta.json catches it before training, once a chunk is changed."""
    path = numbered_shards(tmp_path / "s", n=64)
    datamodule(path)  # checks every chunk, and remembers that they passed
    assert (
        json.loads((path / ".checked.json").read_text()).keys()
        == json.loads((path / "meta.json").read_text())["chunk_crc32"].keys()
    )
    chunk = path / json.loads((path / "index.json").read_text())["chunks"][2]["filename"]
    data = bytearray(chunk.read_bytes())
    data[-3] ^= 0x01  # the last record's posterior
    chunk.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"shard {chunk} is corrupt: it fails its CRC-32 check"):
        datamodule(path)
