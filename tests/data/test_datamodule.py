"""The latent DataModule (dit.data.datamodule): sharding over ranks, resume, flips and
posterior sampling, the loader's batch blocks."""

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import datamodule, numbered_shards

from dit.data.datamodule import REUSE_BLOCKS, CollateRecords, sample_latents


def record_ids(batch):
    return batch["posterior"][:, 0, 0, 0, 0, 0].long().tolist()


def _rank_ids(rank, path, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29517), WORLD_SIZE="2", RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        dm = datamodule(path, world=2, batch=4)
        ids = [i for b in dm.train_dataloader() for i in record_ids(b)]
        (out / f"rank{rank}.json").write_text(json.dumps(ids))
    finally:
        dist.destroy_process_group()


def test_epoch_is_shuffled_fixed_shape_and_complete(tmp_path):
    dm = datamodule(numbered_shards(tmp_path / "s"), batch=8)
    batches = list(dm.train_dataloader())
    assert all(b["posterior"].shape == (8, 2, 2, 2, 4, 4) and b["posterior"].dtype == torch.float16 for b in batches)
    ids = [i for b in batches for i in record_ids(b)]
    assert sorted(ids) == list(range(64)) and ids != list(range(64))
    assert all(b["label"].tolist() == [i % 10 for i in record_ids(b)] for b in batches)


def test_two_ranks_see_disjoint_parts(tmp_path):
    path = numbered_shards(tmp_path / "s")
    mp.spawn(_rank_ids, args=(path, tmp_path), nprocs=2)
    a, b = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(a) == len(b) == 32 and not set(a) & set(b)
    assert sorted(a + b) == list(range(64))


def test_resumes_mid_epoch(tmp_path):
    """In the training process and with two workers (the state names the worker to go on with:
    stopping after an odd or an even batch resumes on either). Writing shards leaves the start
    method of loader workers as it was (litdata's writers switch it to spawn)."""
    method = mp.get_start_method(allow_none=True)
    path = numbered_shards(tmp_path / "s")
    assert mp.get_start_method(allow_none=True) == method
    for workers, stop in ((0, 2), (2, 1), (2, 2)):
        full = [record_ids(b) for b in datamodule(path, num_workers=workers).train_dataloader()]
        loader = datamodule(path, num_workers=workers).train_dataloader()
        seen = []
        for k, batch in enumerate(loader):
            seen.append(record_ids(batch))
            if k == stop:
                state = loader.state_dict()
                break
        resumed = datamodule(path, num_workers=workers).train_dataloader()
        resumed.load_state_dict(state)
        rest = [record_ids(b) for b in resumed]
        assert seen + rest == full


def test_flip_and_posterior_sampling_statistics():
    torch.manual_seed(0)
    n = 20000
    post = torch.zeros(n, 2, 2, 1, 2, 2)
    post[:, 0, 0] = 1.0  # image mean
    post[:, 1, 0] = -1.0  # flip mean
    post[:, :, 1] = 0.5  # std of both
    z = sample_latents(post, flip=True, scale_factor=0.18215)
    centred = z / 0.18215
    picked_flip = (centred.mean(dim=(1, 2, 3)) < 0).float()
    assert abs(picked_flip.mean().item() - 0.5) < 0.02
    noise = centred - torch.where(picked_flip.bool()[:, None, None, None], -1.0, 1.0)
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 0.5) < 0.01
    z = sample_latents(post, flip=False, scale_factor=1.0)
    assert (z.mean(dim=(1, 2, 3)) > 0).all()  # never the flip
    assert abs(z.mean().item() - 1.0) < 0.01


def test_global_batch_must_divide_over_devices(tmp_path):
    with pytest.raises(ValueError, match="global batch size 10 does not divide over 4 devices"):
        datamodule(numbered_shards(tmp_path / "s"), world=4, batch=2, global_batch_size=10)


def test_missing_data_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: point data.path"):
        datamodule(tmp_path / "nowhere")


def test_shards_that_do_not_fit_the_config(tmp_path):
    with pytest.raises(ValueError, match="hold channels=2, but the data config says 4; set data.channels=2"):
        datamodule(numbered_shards(tmp_path / "s"), channels=4)


def test_label_beyond_num_classes(tmp_path):
    path = numbered_shards(tmp_path / "s", num_classes=20)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps(meta | {"num_classes": 10}))  # a lying meta.json
    with pytest.raises(ValueError, match=r"label 1\d, outside \[0, 9\]"):
        list(datamodule(path).train_dataloader())


def test_collate_stacks_records_and_names_a_bad_one():
    collate = CollateRecords(num_classes=10, channels=2, latent_size=4)
    posteriors = np.random.default_rng(0).standard_normal((5, 2, 2, 2, 4, 4)).astype(np.float16)
    batch = collate([{"label": i + 3, "posterior": p} for i, p in enumerate(posteriors)])
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == [3, 4, 5, 6, 7]
    assert batch["posterior"].dtype == torch.float16 and np.array_equal(batch["posterior"].numpy(), posteriors)
    with pytest.raises(ValueError, match=r"a record has label 10, outside \[0, 9\]"):
        collate([{"label": 2, "posterior": posteriors[0]}, {"label": 10, "posterior": posteriors[1]}])
    with pytest.raises(ValueError, match=r"shape \(2, 2, 2, 4, 3\), expected \(2, 2, 2, 4, 4\)"):
        collate([{"label": 2, "posterior": posteriors[0][..., :3]}])


def test_worker_batches_equal_litdatas_own_decoding_and_collate(digits_dir):
    """Two workers, as in training, two epochs of 14 batches each through a pool of 2 x 3 blocks:
    the same batches, bit for bit, as litdata's default path (per-record copy, torch's collate)
    for the same seed. The first epoch is kept whole (list): every batch is the training
    process's own copy (not shared memory), none overwritten by a later one. In the second the
    test holds every block as soon as a batch is in, so workers fall back to fresh shared blocks
    part-way. The training process keeps its own way of sharing tensors. On a machine with CUDA
    this also checks that batches arrive pinned (the DataLoader's own pinning is off)."""
    from litdata import StreamingDataLoader, StreamingDataset

    strategy = torch.multiprocessing.get_sharing_strategy()
    loader = datamodule(
        digits_dir, channels=1, latent_size=8, num_classes=10, batch=128, num_workers=2, seed=3
    ).train_dataloader()
    kept = list(loader)
    held = []
    for batch in loader:
        if loader.reuse_blocks:  # x86 (dit.data.datamodule.REUSE_BLOCKS)
            loader.collate.pool[1].fill_(1)  # every block in use from here on
        held.append(batch)
    dataset = StreamingDataset(str(digits_dir), shuffle=True, drop_last=True, seed=3)
    theirs = StreamingDataLoader(dataset, batch_size=128, num_workers=2, drop_last=True)
    epochs = list(theirs), list(theirs)
    for ours, their_epoch in zip((kept, held), epochs):
        assert len(ours) == len(their_epoch) == 1792 // 128
        for a, b in zip(ours, their_epoch):
            assert torch.equal(a["label"], b["label"]) and torch.equal(a["posterior"], b["posterior"])
    assert epochs[0][0]["label"].tolist() != epochs[1][0]["label"].tolist()  # two epochs, two orders
    assert len({b["posterior"].data_ptr() for b in kept}) == len(kept)
    if loader.pin_batches:  # with CUDA every batch is copied into pinned memory, from either kind of block
        assert all(b["posterior"].is_pinned() for b in kept + held)
    elif loader.reuse_blocks:
        assert not any(b["posterior"].is_shared() for b in kept)
        assert {b["posterior"].is_shared() for b in held} == {False, True}  # pooled, then fresh blocks
    assert torch.multiprocessing.get_sharing_strategy() == strategy


@pytest.mark.slow
@pytest.mark.skipif(not REUSE_BLOCKS, reason="blocks are reused on x86 only (dit.data.datamodule.REUSE_BLOCKS)")
def test_spawned_workers_fill_the_pool(tmp_path):
    """Workers started by spawn get the pool pickled with the collate function (fork workers
    inherit it). Slow: each spawned worker imports torch anew (~10 s here); `pytest -m slow`."""
    path = numbered_shards(tmp_path / "s")
    method = mp.get_start_method(allow_none=True)
    mp.set_start_method("spawn", force=True)
    try:
        batches = list(datamodule(path, num_workers=2).train_dataloader())  # 8 batches, 2 x 3 blocks
    finally:
        mp.set_start_method(method, force=True)
    assert sorted(i for b in batches for i in record_ids(b)) == list(range(64))
    assert all(b["label"].tolist() == [i % 10 for i in record_ids(b)] for b in batches)
    assert not any(b["posterior"].is_shared() for b in batches)  # every batch came through the pool


def test_the_bundled_digits_are_written_on_first_use(tmp_path):
    """data.prepare=digits (the quickstart's data): prepare_data writes the shards where data.path says."""
    from dit.data.datamodule import LatentDataModule

    dm = LatentDataModule(tmp_path / "digits", channels=1, latent_size=8, num_classes=10, prepare="digits")
    dm.prepare_data()
    assert (tmp_path / "digits" / "meta.json").exists() and (tmp_path / "digits" / "index.json").exists()
