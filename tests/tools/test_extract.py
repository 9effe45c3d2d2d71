"""Latent extraction (dit.extract) end to end on generated images and a small random AutoencoderKL:
ADM's centre crop, shard contents, the DataModule reading them, the split over ranks, resume, bf16,
and the REPA encoder's arguments (its features themselves: tests/data/test_features.py)."""

import json
import shutil
from functools import partial

import numpy as np
import pytest
import torch
from conftest import bars, one_line_error
from PIL import Image

import dit.tools.extract as extract
from dit.data.datamodule import LatentDataModule
from dit.data.shards import check_shards
from dit.data.vae import encode, tiny_vae
from dit.errors import UsageError, exit_on_usage_error

RESOLUTION = 32  # 4×4 latents: the tiny VAE downsamples 8× like the real one


def adm_crop_reference(image, size):
    """The crop as guided-diffusion writes it, on numpy arrays: an independent implementation."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y : y + size, x : x + size]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Three classes (created out of order), JPEGs of various shapes, a grayscale and a CMYK JPEG,
    a tiny PNG, a palette PNG in a sub-folder, a corrupt and a truncated file."""
    root = tmp_path_factory.mktemp("imagenet") / "train"
    rng = np.random.default_rng(1)
    for name in ["n03", "n01", "n02"]:
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate([(50, 40), (40, 70), (96, 64)]):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"img{i}.JPEG")
    Image.fromarray(rng.integers(0, 256, (45, 45), dtype=np.uint8)).save(root / "n01" / "gray.JPEG")
    Image.new("CMYK", (40, 48), (10, 200, 30, 5)).save(root / "n02" / "cmyk.JPEG")
    Image.new("RGB", (3, 4), (255, 0, 0)).save(root / "n02" / "tiny.png")
    (root / "n03" / "deeper").mkdir()
    Image.new("P", (33, 33), 5).save(root / "n03" / "deeper" / "palette.png")
    (root / "n01" / "corrupt.JPEG").write_bytes(b"this is not a JPEG")
    (root / "n03" / "img0.JPEG").write_bytes((root / "n03" / "img0.JPEG").read_bytes()[:300])  # truncated
    (root / "n03" / "notes.txt").write_text("not an image: ignored like ImageFolder does")
    return root


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    tiny_vae().save_pretrained(path)
    return path


def run_extract(image_dir, out, vae_dir, *extra):
    extract.main(
        [
            str(image_dir),
            str(out),
            "--resolution",
            str(RESOLUTION),
            "--vae",
            str(vae_dir),
            "--batch-size",
            "2",
            "--part-size",
            "3",
            "--num-workers",
            "0",
            *extra,
        ]
    )


def read_records(folder):
    from litdata import StreamingDataset

    dataset = StreamingDataset(str(folder), shuffle=False)
    return [dataset[i] for i in range(len(dataset))]


@pytest.fixture(scope="module")
def extracted(image_dir, vae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents") / "tiny_32"
    run_extract(image_dir, out, vae_dir)
    return out


def test_center_crop_is_adms():
    # Hand-checkable: a 4×4 image of constant 2×2 blocks halves (box filter) to exactly its blocks.
    blocks = np.array([[10, 20], [30, 40]], dtype=np.uint8)
    image = Image.fromarray(np.kron(blocks, np.ones((2, 2), dtype=np.uint8)))
    assert np.array_equal(np.array(extract.center_crop_arr(image, 2)), blocks)
    # A 6-wide, 2-high image at size 2: no resize (short side = 2), the centre columns 2 and 3.
    wide = np.arange(12, dtype=np.uint8).reshape(2, 6)
    assert np.array_equal(np.array(extract.center_crop_arr(Image.fromarray(wide), 2)), wide[:, 2:4])
    # A tiny flat image is enlarged (bicubic keeps a constant), never fails.
    tiny = extract.center_crop_arr(Image.new("RGB", (3, 5), (7, 99, 200)), 8)
    assert tiny.size == (8, 8) and (np.array(tiny) == [7, 99, 200]).all()
    # Known photos' shapes (ImageNet's 500×375 and others, odd sides) against the reference.
    rng = np.random.default_rng(0)
    for w, h, size in [(500, 375, 256), (375, 500, 256), (1024, 683, 512), (301, 97, 32), (65, 64, 32), (17, 31, 32)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = np.array(extract.center_crop_arr(image, size))
        assert ours.shape == (size, size, 3) and np.array_equal(ours, adm_crop_reference(image, size)), (w, h)


def test_extraction_end_to_end(image_dir, vae_dir, extracted, capsys):
    meta = json.loads((extracted / "meta.json").read_text())
    skipped = sorted(p.split("/train/")[1] for p in meta["skipped"])
    assert skipped == ["n01/corrupt.JPEG", "n03/img0.JPEG"]  # listed, counted, and the run went on
    assert meta["classes"] == ["n01", "n02", "n03"] and meta["num_classes"] == 3
    assert (meta["channels"], meta["latent_size"], meta["num_samples"]) == (4, 4, 12)
    check_shards(extracted)  # one index.json naming whole chunk files
    records = read_records(extracted)
    # ImageFolder order: classes sorted, files sorted within a class (sub-folders walked in order).
    names = [
        "n01/gray",
        "n01/img0",
        "n01/img1",
        "n01/img2",
        "n02/cmyk",
        "n02/img0",
        "n02/img1",
        "n02/img2",
        "n02/tiny",
        "n03/img1",
        "n03/img2",
        "n03/deeper/palette",
    ]
    assert [r["label"] for r in records] == [int(n[2]) - 1 for n in names]
    # The records hold the fp16 posterior of the cropped image and of its mirror image.
    vae = tiny_vae()
    for k, name in [(0, "n01/gray"), (4, "n02/cmyk"), (8, "n02/tiny"), (11, "n03/deeper/palette")]:
        path = next(image_dir.glob(name + ".*"))
        crop = np.array(extract.center_crop_arr(Image.open(path).convert("RGB"), RESOLUTION))
        x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 127.5 - 1
        mean, std = encode(vae, torch.cat([x, x.flip(-1)]))
        want = torch.stack([torch.stack([mean, std], 1)[0], torch.stack([mean, std], 1)[1]]).half()
        got = torch.as_tensor(records[k]["posterior"])
        assert got.dtype == torch.float16 and got.shape == (2, 2, 4, 4, 4)
        torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=2e-3)
    # The DataModule trains on the folder as it is.
    dm = LatentDataModule(extracted, channels=4, latent_size=4, num_classes=3, global_batch_size=4, num_workers=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["posterior"].shape == (4, 2, 2, 4, 4, 4) and set(batch["label"].tolist()) <= {0, 1, 2}
    # A second run finds the folder finished; one asking for other latents is refused, not told "done".
    capsys.readouterr()
    run_extract(image_dir, extracted, vae_dir)
    assert "finished already" in capsys.readouterr().out
    with pytest.raises(UsageError, match=rf"finished already, with other settings \(resolution: {RESOLUTION} vs 64\)"):
        extract.main([str(image_dir), str(extracted), "--resolution", "64", "--vae", str(vae_dir)])
    with pytest.raises(UsageError, match=r"with other settings \(source: .* vs .*\); extract into another folder"):
        run_extract(image_dir.parent, extracted, vae_dir)
    added = image_dir / "n01" / "added.png"  # the same folder, another image in it: not "done"
    Image.new("RGB", (40, 40)).save(added)
    try:
        with pytest.raises(UsageError, match=r"finished already, from other image files .*\(14 then, 15 now"):
            run_extract(image_dir, extracted, vae_dir)
    finally:
        added.unlink()


def test_split_over_ranks_and_resume_after_interruption(image_dir, vae_dir, extracted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "latents"
    encoded = []  # the number of files of each part encoded
    real_encode_part = extract.encode_part

    def counting_encode_part(files, *args):
        if len(encoded) == 2:
            raise KeyboardInterrupt  # the job is killed while encoding its third part
        encoded.append(len(files))
        return real_encode_part(files, *args)

    monkeypatch.setattr(extract, "encode_part", counting_encode_part)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")  # 14 files in parts of 3: rank 0 has parts 0, 2 and 4
    with pytest.raises(KeyboardInterrupt):
        run_extract(image_dir, out, vae_dir)
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["part_00000", "part_00002"]
    inode = (out / "parts" / "part_00000" / "chunk-0-0.bin").stat().st_ino
    encoded.clear()
    capsys.readouterr()
    monkeypatch.setenv("RANK", "1")  # parts 1 and 3
    run_extract(image_dir, out, vae_dir)
    assert encoded == [3, 3] and not (out / "meta.json").exists()  # part 4 is missing: no merge yet
    err = capsys.readouterr().err
    assert bars(err, "rank 1") == ["6/6"] and bars(err, "merge parts") == []
    encoded.clear()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    run_extract(image_dir, out, vae_dir)  # the rerun encodes only part 4 (2 files), then merges all
    assert encoded == [2] and (out / "parts" / "part_00000" / "chunk-0-0.bin").stat().st_ino == inode
    chunks = len(json.loads((out / "index.json").read_text())["chunks"])
    assert bars(capsys.readouterr().err, "merge parts") == [f"{chunks}/{chunks}"]  # the merging process's
    meta, uninterrupted_meta = (json.loads((d / "meta.json").read_text()) for d in (out, extracted))
    assert meta == uninterrupted_meta
    for ours, uninterrupted in zip(read_records(out), read_records(extracted), strict=True):
        assert ours["label"] == uninterrupted["label"]
        assert np.array_equal(ours["posterior"], uninterrupted["posterior"])


def folder_state(folder):
    """{relative path: bytes} of every file under folder: what a refused run leaves as it was."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def half_extracted(image_dir, out, vae_dir, monkeypatch):
    """A run that did only some parts: rank 0 of 2 (parts 0, 2 and 4 of 14 files in parts of 3)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    run_extract(image_dir, out, vae_dir)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["part_00000", "part_00002", "part_00004"]
    return folder_state(out)


def refused(capsys, run, *fragments):
    """`run` refused as `python -m dit.extract` prints it: one line, no traceback, saying `fragments`."""
    capsys.readouterr()
    with pytest.raises(SystemExit):
        exit_on_usage_error(run)
    return one_line_error(capsys.readouterr().err, *fragments)


def assert_same_records(folder, reference):
    for ours, theirs in zip(read_records(folder), read_records(reference), strict=True):
        assert ours["label"] == theirs["label"] and np.array_equal(ours["posterior"], theirs["posterior"])


def test_resume_with_another_part_size_is_refused(image_dir, vae_dir, extracted, tmp_path, monkeypatch, capsys):
    """Parts of 3 and a rerun with another --part-size would duplicate or leave out records (the red
    team's 12 images became 16 records): one line naming the setting, and OUT left as it was."""
    out = tmp_path / "latents"
    before = half_extracted(image_dir, out, vae_dir, monkeypatch)
    for size in ("2", "4", "5"):  # 7, 4 and 3 parts (part_00004 is then beyond the last)
        refused(
            capsys,
            partial(run_extract, image_dir, out, vae_dir, "--part-size", size),
            f"--part-size {size} but {out}'s parts were written with --part-size 3: rerun with --part-size 3, "
            "or extract into a new folder",
        )
        assert folder_state(out) == before
    run_extract(image_dir, out, vae_dir)  # the same --part-size resumes: the uninterrupted run's records
    assert json.loads((out / "meta.json").read_text())["num_samples"] == 12
    assert_same_records(out, extracted)


def test_resume_on_other_image_files_is_refused(image_dir, vae_dir, extracted, tmp_path, monkeypatch, capsys):
    """Parts made from one set of images and a rerun on another (a file added or resized in place,
    another class folder, another folder of as many files) would merge records of both: refused."""
    images = tmp_path / "imagenet" / "train"
    shutil.copytree(image_dir, images)
    out = tmp_path / "latents"
    before = half_extracted(images, out, vae_dir, monkeypatch)

    def refused_on(folder, how):
        refused(
            capsys,
            partial(run_extract, folder, out, vae_dir),
            f"the image files under {folder} differ from those {out}'s parts were made from (under "
            f"{images.resolve()}): {how}; rerun on those images, or extract into a new folder",
        )
        assert folder_state(out) == before

    extra = images / "n02" / "img3.JPEG"
    Image.new("RGB", (40, 40)).save(extra)
    refused_on(images, "15 image files now, 14 then")
    extra.unlink()
    resized, original = images / "n02" / "img1.JPEG", (images / "n02" / "img1.JPEG").read_bytes()
    Image.new("RGB", (70, 40)).save(resized)  # the same name, other bytes
    refused_on(images, "as many files, but other names or sizes")
    resized.write_bytes(original)
    (images / "n04").mkdir()  # an empty class folder renumbers nothing here, but would in another
    refused_on(images, "other class folders (4 now, 3 then)")
    (images / "n04").rmdir()
    other = tmp_path / "other" / "train"  # another folder: as many files, one named otherwise
    shutil.copytree(images, other)
    (other / "n01" / "img2.JPEG").rename(other / "n01" / "img5.JPEG")
    refused_on(other, "as many files, but other names or sizes")
    run_extract(images, out, vae_dir)  # the images the parts were made from: resumed
    assert_same_records(out, extracted)


def test_parts_of_an_older_extract_are_refused(image_dir, vae_dir, tmp_path, monkeypatch, capsys):
    """Parts whose meta.json does not record their images (written before it did) cannot be checked
    against the folder: refused rather than merged on trust."""
    out = tmp_path / "latents"
    half_extracted(image_dir, out, vae_dir, monkeypatch)
    meta_file = out / "parts" / "part_00002" / "meta.json"
    meta = json.loads(meta_file.read_text())
    for key in ("part_size", "num_files", "files_sha256", "part_range", "part_files_sha256"):
        del meta[key]
    meta_file.write_text(json.dumps(meta))
    before = folder_state(out)
    refused(
        capsys,
        partial(run_extract, image_dir, out, vae_dir),
        "part_00002 was written by a dit.extract that did not record which image files a part holds",
        f"delete {out / 'parts'} to start over",
    )
    assert folder_state(out) == before


def test_the_same_files_under_another_root_resume_and_merge(image_dir, vae_dir, extracted, tmp_path, monkeypatch):
    """Another node mounting the images elsewhere (or a resume from a copy) has the same files: its
    parts record the same fingerprints, its rank resumes on the others' parts, and all merge."""
    mount = tmp_path / "mnt" / "imagenet" / "train"
    shutil.copytree(image_dir, mount)
    out = tmp_path / "latents"
    half_extracted(image_dir, out, vae_dir, monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    run_extract(mount, out, vae_dir)  # parts 1 and 3 from the other root, then the merge
    parts = [json.loads((d / "meta.json").read_text()) for d in sorted((out / "parts").iterdir())]
    assert [p["source"] for p in parts] == [str(r.resolve()) for r in (image_dir, mount) * 2 + (image_dir,)]
    assert [p["part_range"] for p in parts] == [[0, 3], [3, 6], [6, 9], [9, 12], [12, 14]]
    assert len({p["files_sha256"] for p in parts}) == 1 and {p["part_size"] for p in parts} == {3}
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["num_samples"], meta["part_size"], meta["num_files"]) == (12, 3, 14)
    assert meta["files_sha256"] == parts[0]["files_sha256"] and "part_range" not in meta
    assert_same_records(out, extracted)


def test_bf16_posterior_stays_close_to_fp32():
    """The error `--precision bf16-true` brings, measured on the random VAE (the real weights cannot be
    fetched here): the mean moves by ~1.2% of its RMS (RMS of the error; ≤ 7% at worst over elements),
    the std by ≤ 1% relative. Tolerances: 3% and 15%, 2% for the std."""
    vae = tiny_vae()
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean32, std32 = encode(vae, images)
    mean16, std16 = encode(vae.to(torch.bfloat16), images)
    rms = mean32.pow(2).mean().sqrt()
    mean_error, worst = (
        ((mean16 - mean32).pow(2).mean().sqrt() / rms).item(),
        ((mean16 - mean32).abs().max() / rms).item(),
    )
    std_error = ((std16 - std32).abs() / std32).max().item()
    print(
        f"bf16 vs fp32: RMS(Δmean) = {mean_error:.2%}, max |Δmean| = {worst:.2%} of RMS(mean); max |Δstd|/std = {std_error:.2%}"
    )
    assert mean_error < 0.03 and worst < 0.15 and std_error < 0.02


def test_bad_input_is_named(tmp_path, vae_dir):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        run_extract(tmp_path / "nowhere", tmp_path / "out", vae_dir)
    with pytest.raises(ValueError, match="holds no class folders"):
        run_extract(tmp_path, tmp_path / "out", vae_dir)
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("")
    with pytest.raises(ValueError, match="1 class folders hold no images"):
        run_extract(tmp_path / "empty", tmp_path / "out", vae_dir)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="--resolution 30 must be a positive multiple of 8"):
        run_extract(tmp_path, tmp_path / "out", vae_dir, "--resolution", "30")


# ---------------------------------------------------------------- REPA features (--repa-encoder)


def test_repa_arguments_are_checked(tmp_path, image_dir, vae_dir):
    with pytest.raises(ValueError, match="--repa-encoder-weights needs --repa-encoder"):
        run_extract(image_dir, tmp_path / "out", vae_dir, "--repa-encoder-weights", "random")
    with pytest.raises(ValueError, match="resolution 40 is not a positive multiple of 16.*--resolution"):
        run_extract(image_dir, tmp_path / "out", vae_dir, "--resolution", "40", "--repa-encoder", "dinov2_vits14")
    with pytest.raises(ValueError, match="invalid choice: 'dinov3'"):
        run_extract(image_dir, tmp_path / "out", vae_dir, "--repa-encoder", "dinov3")


def test_repa_encoder_offline_is_one_line(tmp_path, image_dir, vae_dir, monkeypatch, capsys):
    """As `python -m dit.extract ... --repa-encoder dinov2_vits14` prints it with huggingface_hub
    offline and an empty cache (in this process: a subprocess would import torch and timm again)."""
    import huggingface_hub.constants as hub

    from dit.errors import exit_on_usage_error

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SystemExit):
        exit_on_usage_error(
            lambda: run_extract(image_dir, tmp_path / "out", vae_dir, "--repa-encoder", "dinov2_vits14")
        )
    one_line_error(capsys.readouterr().err, "dinov2_vits14", "could not be downloaded", "--repa-encoder-weights PATH")


def test_a_resumed_run_cannot_mix_record_layouts(tmp_path, image_dir, vae_dir, monkeypatch):
    """Parts written without features and a rerun with --repa-encoder (or parts of other settings
    at the merge) would give a folder of two record layouts: each is refused, naming the part."""
    out = tmp_path / "latents"
    real_encode_part, calls = extract.encode_part, []

    def interrupted_encode_part(files, *args):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real_encode_part(files, *args)

    monkeypatch.setattr(extract, "encode_part", interrupted_encode_part)
    with pytest.raises(KeyboardInterrupt):
        run_extract(image_dir, out, vae_dir)  # part 0 written, without features
    monkeypatch.setattr(extract, "encode_part", real_encode_part)
    random_encoder = ("--repa-encoder", "dinov2_vits14", "--repa-encoder-weights", "random")
    with pytest.raises(ValueError, match=r"part_00000 was written with no --repa-encoder, this run asks for "):
        run_extract(image_dir, out, vae_dir, *random_encoder, "--resolution", "32")
    meta = json.loads((out / "parts" / "part_00000" / "meta.json").read_text())
    (out / "parts" / "part_00000" / "meta.json").write_text(json.dumps(meta | {"vae": "another"}))
    with pytest.raises(ValueError, match=r"part_00001 was written with other settings than .*part_00000 \(vae: "):
        run_extract(image_dir, out, vae_dir)
    assert not (out / "meta.json").exists()
