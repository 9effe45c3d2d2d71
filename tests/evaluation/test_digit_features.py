"""The digits FD (dit.evaluation.digit_features): a classifier fitted on the real digits, cached, whose
features rank samples as FID would, with no download."""

import numpy as np
import torch

from dit.evaluation.digit_features import (
    CACHE_NAME,
    digit_feature_network,
    digit_features,
    digit_frechet_distance,
    digit_reference,
    fit_classifier,
    real_digits,
)


def test_the_classifier_is_fitted_once_and_read_back_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_CACHE", str(tmp_path))
    first = digit_feature_network()
    assert (tmp_path / CACHE_NAME).is_file()
    (tmp_path / CACHE_NAME).touch()
    mtime = (tmp_path / CACHE_NAME).stat().st_mtime_ns
    second = digit_feature_network()
    assert (tmp_path / CACHE_NAME).stat().st_mtime_ns == mtime  # read, not fitted and written again
    images, labels = real_digits()
    assert torch.equal(digit_features(first, images), digit_features(second, images))
    assert (first(images).argmax(1) == labels).float().mean() > 0.99  # fitted on these digits


def test_the_classifier_labels_held_out_digits(monkeypatch):
    images, labels = real_digits()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))
    train, held_out = order[:1500], order[1500:]
    net = fit_classifier(images[train], labels[train])
    assert (net(images[held_out]).argmax(1) == labels[held_out]).float().mean() > 0.95


def test_the_distance_ranks_real_digits_above_degraded_ones(tmp_path, monkeypatch):
    """Real digits score near 0; Gaussian pixel noise of growing strength, a single class (mode
    collapse) and uniform noise score worse in that order, as FID ranks them on images."""
    monkeypatch.setenv("DIT_CACHE", str(tmp_path))
    net = digit_feature_network()
    reference = digit_reference(net)
    images, labels = real_digits()
    subset = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:500]]
    noise = torch.randn(subset.shape, generator=torch.Generator().manual_seed(0))
    scores = [
        digit_frechet_distance(subset, net, reference),
        digit_frechet_distance((subset + 0.2 * noise).clamp(-1, 1), net, reference),
        digit_frechet_distance((subset + 0.5 * noise).clamp(-1, 1), net, reference),
        digit_frechet_distance(images[labels == 3], net, reference),
        digit_frechet_distance(torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1, net),
    ]
    assert scores[0] < 20 and all(np.diff(scores) > 0), scores
    # the statistics of the reference are those of the real digits' features
    features = digit_features(net, images).numpy()
    assert np.allclose(reference["mu"], features.mean(0)) and np.allclose(reference["sigma"], np.cov(features.T))


def test_the_fid_monitor_takes_the_digits_features_only_against_the_digits():
    import pytest

    from dit.diffusion.samplers import DDPM
    from dit.errors import UsageError
    from dit.evaluation.fid_monitor import FIDMonitor

    with pytest.raises(
        UsageError, match="features=digits measures against the real digits: set callbacks.fid.ref=digits"
    ):
        FIDMonitor("ref.npz", DDPM("5"), features="digits")
    with pytest.raises(UsageError, match="callbacks.fid.features must be one of inception, digits, got 'pixels'"):
        FIDMonitor("digits", DDPM("5"), features="pixels")
    assert FIDMonitor("digits", DDPM("5"), features="digits").key == "val/digits_fd"
