"""REPA's encoder features in the shards (dit.data.shards, dit.data.datamodule, dit.extract): written
with the records, delivered aligned with them, mirrored on the token grid exactly for flipped draws,
and the errors of shards without them."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import datamodule
from PIL import Image

import dit.tools.extract as extract
from dit.data.datamodule import CollateRecords, LatentDataModule, mirror_tokens, sample_latents
from dit.data.encoders import load_encoder
from dit.data.shards import write_shards
from dit.data.vae import tiny_vae
from dit.errors import UsageError

GRID, DIM = 4, 2  # 16 tokens a record


def featured_shards(path, n=48, num_classes=10, features=True):
    """Record i: posterior mean i+1 (image) and -(i+1) (flip), std 0, label i % classes; its features
    say which record (channel 0: i+1) and which token (channel 1: t) they are: exact in float16."""
    records = []
    for i in range(n):
        mean = np.stack([np.full((2, 4, 4), i + 1.0), np.full((2, 4, 4), -(i + 1.0))])[:, None]
        posterior = np.concatenate([mean, np.zeros_like(mean)], axis=1)
        tokens = np.stack([np.full(GRID * GRID, i + 1.0), np.arange(GRID * GRID, dtype=float)], axis=1)
        records.append((i % num_classes, posterior, tokens) if features else (i % num_classes, posterior))
    meta = dict(channels=2, latent_size=4, num_classes=num_classes, source="test")
    if features:
        meta["features"] = dict(encoder="by hand", resolution=GRID * 14)
    write_shards(records, path, meta, chunk_bytes="2KB")
    return path


def mirrored_index(t):
    row, col = divmod(t, GRID)
    return row * GRID + (GRID - 1 - col)


def test_mirror_tokens_by_hand():
    grid = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).reshape(1, 4, 1)  # row-major 2×2
    assert mirror_tokens(grid).flatten().tolist() == [1.0, 0.0, 3.0, 2.0]
    with pytest.raises(UsageError, match="5 tokens are not a square grid"):
        mirror_tokens(torch.zeros(1, 5, 2))


def test_shards_record_the_features_and_their_shape(tmp_path):
    path = featured_shards(tmp_path / "s")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["features"] == {"encoder": "by hand", "resolution": 56, "tokens": 16, "dim": 2}
    from litdata import StreamingDataset

    record = StreamingDataset(str(path), shuffle=False)[5]
    assert record["features"].dtype == np.float16 and record["features"].shape == (16, 2)
    assert (record["features"][:, 0] == 6).all() and record["features"][:, 1].tolist() == list(range(16))


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_carry_each_records_features_mirrored_exactly_on_flips(tmp_path, workers):
    """In the training process and through the loader workers' batch blocks: every batch's features
    are its records' own, and a sample's tokens are mirrored exactly when its latent is the flip's."""
    dm = datamodule(featured_shards(tmp_path / "s"), batch=8, flip=True, features=True, num_workers=workers)
    assert dm.feature_shape == (16, 2)
    torch.manual_seed(0)
    flipped = []
    for batch in dm.train_dataloader():
        assert batch["features"].dtype == torch.float16 and batch["features"].shape == (8, 16, 2)
        ids = batch["posterior"][:, 0, 0, 0, 0, 0].long()
        assert torch.equal(batch["features"][:, :, 0].float(), ids[:, None].float().expand(8, 16))
        x, y, features = dm.on_after_batch_transfer(batch, 0)
        assert features.dtype == torch.float32 and features.shape == (8, 16, 2)
        assert torch.equal(y, (ids - 1) % 10) and torch.equal(
            features[:, :, 0], x[:, 0, 0, 0].abs()[:, None].expand(8, 16)
        )
        flip = x[:, 0, 0, 0] < 0  # the latent was drawn from the flip's posterior
        want = torch.tensor([[mirrored_index(t) if f else t for t in range(16)] for f in flip.tolist()])
        assert torch.equal(features[:, :, 1], want.float())
        flipped += flip.tolist()
    assert len(flipped) == 48 and 10 < sum(flipped) < 38  # both kinds of draw were seen


def test_the_draws_are_the_same_with_and_without_features(tmp_path):
    """Features change nothing else: the same order, latents and labels as features=false on the
    same shards (the flips, the noise and the loader's order draw the same numbers), and
    features=false gives (x, y) batches as before."""
    path = featured_shards(tmp_path / "s")
    runs = []
    for features in (True, False):
        dm = datamodule(path, batch=8, flip=True, features=features)
        torch.manual_seed(0)
        runs.append([dm.on_after_batch_transfer(b, 0) for b in dm.train_dataloader()])
    assert {len(b) for b in runs[0]} == {3} and {len(b) for b in runs[1]} == {2}
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*runs, strict=True))


def test_sample_latents_mirrors_only_flipped_draws_and_keeps_the_rng():
    torch.manual_seed(0)
    post = torch.zeros(4000, 2, 2, 1, 2, 2)
    post[:, 0, 0], post[:, 1, 0] = 1.0, -1.0
    features = torch.arange(16.0).repeat(4000, 1)[:, :, None].half()
    torch.manual_seed(1)
    plain = sample_latents(post, True, 1.0)
    torch.manual_seed(1)
    x, f = sample_latents(post, True, 1.0, features)
    assert torch.equal(x, plain) and f.dtype == torch.float32
    flip = x.mean(dim=(1, 2, 3)) < 0
    assert torch.equal(f[~flip], features[~flip].float())
    assert torch.equal(f[flip], mirror_tokens(features[flip].float())) and 0.45 < flip.float().mean() < 0.55
    _, f = sample_latents(post, False, 1.0, features)
    assert torch.equal(f, features.float())  # flip off: never mirrored


def test_features_true_on_shards_without_them(tmp_path, digits_dir):
    for path, shape in (
        (featured_shards(tmp_path / "s", features=False), {}),
        (digits_dir, dict(channels=1, latent_size=8)),
    ):
        with pytest.raises(UsageError) as error:
            datamodule(path, features=True, **shape)
        message = str(error.value)
        assert "\n" not in message and "data.features=true" in message and "hold no encoder features" in message
        assert "python -m dit.extract IMAGES OUT --repa-encoder dinov2_vitb14" in message


def test_check_shards_fit_names_a_token_count_the_model_does_not_have(tmp_path):
    dm = datamodule(featured_shards(tmp_path / "s"), features=True)
    dm.check_shards_fit(feature_tokens=16, feature_dim=2)  # what a DiT of a 4×4 token grid needs
    with pytest.raises(UsageError, match=r"have tokens=16 \(by hand at 56 px\), but 64 are asked for"):
        dm.check_shards_fit(feature_tokens=64)
    with pytest.raises(UsageError, match=r"have dim=2 .*, but 768 are asked for"):
        dm.check_shards_fit(feature_dim=768)


def test_bad_feature_records_are_named(tmp_path):
    post = np.zeros((2, 2, 2, 4, 4))
    with pytest.raises(UsageError, match=r"record 1 has features of shape None, the first record \(16, 2\)"):
        write_shards([(0, post, np.zeros((16, 2))), (1, post)], tmp_path / "a", dict(channels=2))
    with pytest.raises(UsageError, match=r"record 1 has features of shape \(9, 2\), the first record \(16, 2\)"):
        write_shards([(0, post, np.zeros((16, 2))), (1, post, np.zeros((9, 2)))], tmp_path / "b", dict(channels=2))
    with pytest.raises(UsageError, match="meta gives features tokens=256, but the records' features have tokens=16"):
        write_shards([(0, post, np.zeros((16, 2)))], tmp_path / "c", dict(features=dict(tokens=256)))
    collate = CollateRecords(num_classes=10, channels=2, latent_size=4, features=(16, 2))
    record = {"label": 1, "posterior": post.astype(np.float16)}
    with pytest.raises(UsageError, match="data.features=true, but a record holds no encoder features"):
        collate([record])
    with pytest.raises(UsageError, match=r"a record's features have shape \(9, 2\), expected \(16, 2\)"):
        collate([record | {"features": np.zeros((9, 2), np.float16)}])


# ---------------------------------------------------------------- extraction with a random encoder


def test_extraction_stores_the_encoders_features_of_each_cropped_image(tmp_path):
    """dit.extract --repa-encoder with a random DINOv2 S/14 on 32-px crops (a 2×2 token grid): the
    first record's features are the encoder's, run by hand on that crop; meta.json says what they are;
    the DataModule trains on them."""
    root = tmp_path / "train"
    rng = np.random.default_rng(3)
    for name in ("n01", "n02"):
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate([(50, 40), (40, 70)]):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"img{i}.JPEG")
    tiny_vae().save_pretrained(tmp_path / "vae")
    out = tmp_path / "latents"
    extract.main(
        [str(root), str(out), "--resolution", "32", "--vae", str(tmp_path / "vae"), "--batch-size", "2"]
        + [
            "--part-size",
            "3",
            "--num-workers",
            "0",
            "--repa-encoder",
            "dinov2_vits14",
            "--repa-encoder-weights",
            "random",
        ]
    )
    meta = json.loads((out / "meta.json").read_text())
    assert meta["features"] == {
        "encoder": "dinov2_vits14",
        "weights": "random",
        "tokens": 4,
        "dim": 384,
        "resolution": 28,
    }
    from litdata import StreamingDataset

    records = StreamingDataset(str(out), shuffle=False)
    assert len(records) == 4 and all(records[i]["features"].shape == (4, 384) for i in range(4))
    crop = np.array(extract.center_crop_arr(Image.open(root / "n01" / "img0.JPEG").convert("RGB"), 32))
    by_hand = load_encoder("dinov2_vits14", pretrained=False, resolution=32).features(
        torch.from_numpy(crop).permute(2, 0, 1)[None]
    )[0]
    got = torch.from_numpy(records[0]["features"].copy())
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), by_hand, rtol=2e-3, atol=2e-3)  # float16 of (nearly) the same floats
    assert not torch.equal(got, torch.from_numpy(records[1]["features"].copy()))  # each image its own
    dm = LatentDataModule(
        out, channels=4, latent_size=4, num_classes=2, global_batch_size=4, num_workers=0, features=True
    )
    dm.trainer = SimpleNamespace(world_size=1, local_rank=0, training=True)
    dm.setup("fit")
    x, y, features = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert x.shape == (4, 4, 4, 4) and features.shape == (4, 4, 384)
