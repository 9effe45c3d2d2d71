"""FID with torch-fidelity (dit.fid): the Fréchet distance against independent computations, the
whole path from images to FID / IS / precision-recall with a random Inception of torch-fidelity's
own class, reference files, and the offline message."""

from urllib.error import URLError

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import bars, write_pngs
from PIL import Image

from dit.errors import UsageError
from dit.evaluation.fid import digit_images, frechet_distance, inception, load_reference, main, statistics


def independent_fid(x, mu_r, sigma_r):
    """FID from the empirical statistics of x, with the trace term as tr (Σ_r^½ Σ Σ_r^½)^½ (scipy's
    sqrtm of the full-rank Σ_r, then the eigenvalues of a symmetric PSD matrix): another route than
    dit.fid's (eigenvalues of Σ Σ_r, or of Bᵀ Σ_r B)."""
    mu, sigma = x.mean(axis=0), np.cov(x, rowvar=False)
    root_r = scipy.linalg.sqrtm(sigma_r).real
    trace_sqrt = np.sqrt(scipy.linalg.eigvalsh(root_r @ sigma @ root_r).clip(min=0)).sum()
    return (mu - mu_r) @ (mu - mu_r) + np.trace(sigma) + np.trace(sigma_r) - 2 * trace_sqrt


@pytest.mark.parametrize("n, dim", [(4000, 8), (20, 64)])  # more samples than dimensions, and fewer
def test_frechet_distance_against_independent_computations(n, dim):
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.5, 2.0, dim), rng.uniform(0.5, 2.0, dim)
    mu_1, mu_2 = rng.normal(size=dim), rng.normal(size=dim)
    x = mu_1 + np.sqrt(a) * rng.normal(size=(n, dim))  # samples of N(μ₁, diag a)
    fid = frechet_distance(torch.from_numpy(x), dict(mu=mu_2, sigma=np.diag(b)))
    assert fid == pytest.approx(independent_fid(x, mu_2, np.diag(b)), rel=1e-8)
    if n > dim:  # the closed form of two Gaussians with commuting (diagonal) covariances
        assert fid == pytest.approx(np.sum((mu_1 - mu_2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=0.05)
    # a full (non-commuting) reference covariance
    m = rng.normal(size=(dim, dim))
    sigma_r = m @ m.T / dim + 0.1 * np.eye(dim)
    fid = frechet_distance(torch.from_numpy(x), dict(mu=mu_2, sigma=sigma_r))
    assert fid == pytest.approx(independent_fid(x, mu_2, sigma_r), rel=1e-8)


def test_frechet_distance_does_not_go_through_torch_fidelitys_metric(monkeypatch):
    """torch-fidelity 0.3's FID calls scipy.linalg.sqrtm(..., disp=False), which recent SciPy refuses
    with a TypeError (seen on the GPU machine's image); 0.4 computes it otherwise. FID here is
    computed the same way under either."""
    import torch_fidelity.metric_fid

    def refused(*args, **kwargs):
        raise TypeError("sqrtm() got an unexpected keyword argument 'disp'")

    x = np.random.default_rng(0).normal(size=(500, 64))
    reference = statistics(torch.from_numpy(x[::-1] * 1.5))
    expected = torch_fidelity.metric_fid.fid_statistics_to_metric(statistics(torch.from_numpy(x)), reference, False)
    monkeypatch.setattr(torch_fidelity.metric_fid, "fid_statistics_to_metric", refused)
    monkeypatch.setattr(scipy.linalg, "sqrtm", refused)
    assert frechet_distance(torch.from_numpy(x), reference) == pytest.approx(
        expected["frechet_inception_distance"], rel=1e-9
    )


@pytest.mark.parametrize("n, dim", [(300, 16), (20, 64)])
def test_identical_sets_give_zero(n, dim):
    x = (
        torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        * torch.linspace(0.1, 3, dim)
        + 5
    )
    # float64 round-off: the square root of an eigenvalue at 1e-16 relative is 1e-8 relative
    assert abs(frechet_distance(x, statistics(x))) < 1e-6 * np.trace(statistics(x)["sigma"])
    assert frechet_distance(x, statistics(x + 0.5)) == pytest.approx(0.25 * dim, rel=1e-6)  # a shifted mean only


def test_whole_path_from_images_to_fid_is_and_precision_recall(random_inception, tmp_path, capsys):
    """An npz of samples vs a folder of the same real images: FID ≈ 0, precision = recall = 1. Then
    other images as PNGs against the saved reference statistics: the FID of features computed directly.
    Each extraction shows one bar of its own (torch-fidelity's is off)."""
    digits = digit_images()
    real = torch.stack([digits[i] for i in range(4)])  # (4, 3, 8, 8) uint8
    np.savez(tmp_path / "samples.npz", arr_0=real.permute(0, 2, 3, 1).numpy())
    write_pngs(real, tmp_path / "real")
    (tmp_path / "real" / "broken.JPEG").write_bytes(b"not an image")  # skipped and named, not fatal
    weights = ["--inception-weights", str(random_inception)]
    metrics = main(
        [
            str(tmp_path / "samples.npz"),
            "--ref",
            str(tmp_path / "real"),
            *weights,
            "--isc",
            "--prc",
            "--save-ref-stats",
            str(tmp_path / "ref.npz"),
        ]
    )
    out, err = capsys.readouterr()
    assert "1 of 5 files" in out and "broken.JPEG" in out
    assert bars(err, "FID features (reference)") == ["4/4"]
    assert bars(err, "FID features (samples)") == ["4/4"]
    assert "Processing samples" not in err
    assert abs(metrics["fid"]) < 1e-6 and metrics["num_samples"] == 4
    assert metrics["precision"] == 1.0 and metrics["recall"] == 1.0
    assert np.isfinite(metrics["inception_score"]) and metrics["inception_score"] >= 1.0

    other = torch.stack([digits[i] for i in range(4, 8)])
    write_pngs(other, tmp_path / "other")
    fid = main([str(tmp_path / "other"), "--ref", str(tmp_path / "ref.npz"), *weights])["fid"]
    err = capsys.readouterr().err  # statistics read from the file: no reference bar
    assert bars(err, "FID features (samples)") == ["4/4"] and bars(err, "FID features (reference)") == []
    # the same, from features of the image tensors (no files, no loaders, no statistics file)
    extractor = inception(str(random_inception))
    with torch.no_grad():
        pool_real, pool_other = (extractor(x)[0] for x in (real, other))
    assert fid > 1e-3 and fid == pytest.approx(frechet_distance(pool_other, statistics(pool_real)), rel=1e-5)


def test_reference_files_adm_batch_and_our_stats(tmp_path, random_inception):
    """ADM's reference batch holds mu, sigma and arr_0: FID reads mu and sigma (no images needed);
    with precision/recall its images give the features, but the statistics stay the file's."""
    mu, sigma = np.arange(4.0), np.eye(4)
    adm = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(adm, mu=mu, sigma=sigma, arr_0=np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8))
    reference = load_reference(str(adm), extractor=None)
    assert np.array_equal(reference["mu"], mu) and np.array_equal(reference["sigma"], sigma)
    with_images = load_reference(str(adm), inception(str(random_inception)), keep_features=True)
    assert np.array_equal(with_images["mu"], mu) and np.array_equal(with_images["sigma"], sigma)
    assert tuple(with_images["features"].shape) == (3, 2048)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    with pytest.raises(ValueError, match="needs images"):  # precision/recall need the reference's images
        load_reference(str(tmp_path / "stats.npz"), extractor=None, keep_features=True)
    with pytest.raises(ValueError, match="do not fit features of dimension 3"):
        frechet_distance(torch.randn(5, 3), reference)


def test_offline_inception_says_how_to_point_to_a_local_copy(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", no_network)
    with pytest.raises(UsageError, match="could not fetch the Inception weights") as error:
        inception(None)
    assert "weights-inception-2015-12-05-6726825d.pth" in str(error.value) and "--inception-weights" in str(error.value)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        inception(tmp_path / "missing.pth")


@pytest.mark.parametrize("batch_size", ["1", "64"])
def test_samples_of_mixed_sizes_or_missing_are_refused(random_inception, tmp_path, capsys, batch_size):
    from conftest import one_line_error

    from dit.errors import exit_on_usage_error

    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "000000.png")
    Image.new("RGB", (16, 16)).save(folder / "000001.png")
    for samples, message in [(folder, "the samples have mixed sizes"), (tmp_path / "nowhere.npz", "do not exist")]:
        with pytest.raises(SystemExit) as exited:
            exit_on_usage_error(
                lambda: main(
                    [
                        str(samples),
                        "--ref",
                        "digits",
                        "--inception-weights",
                        str(random_inception),
                        "--batch-size",
                        batch_size,
                    ]
                )
            )
        assert exited.value.code == 2
        one_line_error(capsys.readouterr().err, message)


def test_a_bad_reference_is_named_before_inception_is_loaded(tmp_path, capsys):
    """Offline, with no Inception weights: the line is about --ref, not about the download."""
    from conftest import one_line_error

    from dit.errors import exit_on_usage_error

    (tmp_path / "ref.txt").write_text("")
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit) as exited:
        exit_on_usage_error(lambda: main([str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.txt")]))
    assert exited.value.code == 2
    one_line_error(capsys.readouterr().err, "ref.txt is not a folder of images, an .npz of statistics")


def test_saved_reference_statistics_say_what_they_were_computed_on(tmp_path):
    from dit.evaluation.fid import save_statistics

    stats = dict(mu=np.zeros(3), sigma=np.eye(3))
    save_statistics(tmp_path / "ref.npz", stats, "imagenet/train", 256)
    assert load_reference(str(tmp_path / "ref.npz"), extractor=None, resolution=256)["mu"].shape == (3,)
    with pytest.raises(
        ValueError, match=r"computed on 256×256 images \(of imagenet/train\), but the samples are 512×512"
    ):
        load_reference(str(tmp_path / "ref.npz"), extractor=None, resolution=512)


def test_save_ref_stats_never_replaces_what_is_not_statistics(random_inception, tmp_path, capsys):
    """--save-ref-stats is checked before any feature is computed: not the samples being measured,
    not another file, a .npz name in a folder that exists; statistics written before are rewritten."""
    from dit.errors import exit_on_usage_error

    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=np.zeros((2, 8, 8, 3), dtype=np.uint8))
    other = tmp_path / "notes.npz"
    other.write_bytes(b"mine")
    write_pngs(torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8), tmp_path / "real")
    common = ["--ref", str(tmp_path / "real"), "--inception-weights", str(random_inception), "--batch-size", "2"]
    for target, message in [
        (samples, "is the samples being measured"),
        (other, "holds no reference statistics (mu, sigma)"),
        (tmp_path / "stats", "give a file name ending in .npz"),
        (tmp_path / "nowhere" / "s.npz", "does not exist"),
    ]:
        with pytest.raises(SystemExit):
            exit_on_usage_error(lambda t=target: main([str(samples), *common, "--save-ref-stats", str(t)]))
        assert message in capsys.readouterr().err
    assert other.read_bytes() == b"mine" and list(np.load(samples).files) == ["arr_0"]
    stats = tmp_path / "stats.npz"
    for _ in range(2):  # written, then rewritten
        main([str(samples), *common, "--save-ref-stats", str(stats)])
        assert {"mu", "sigma"} <= set(np.load(stats).files)
    assert not list(tmp_path.glob("*.tmp"))
