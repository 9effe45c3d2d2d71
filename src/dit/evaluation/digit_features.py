"""An offline Fréchet distance for the digits: FID's formula in the feature space of a small classifier
fitted on the real digits, so that a laptop with no network can score samples (the miniature scaling
study, conf/experiment/scaling_digits.yaml).

FID (Heusel et al. 2017) compares the mean and covariance of Inception-v3 pool features of samples and
of real images. Inception's weights are a download, and 8×8 digits upsampled to 299×299 are far from
what it was trained on. Here the features are the 64 activations before the last layer of a small CNN
(two 3×3 convolutions, 16 and 32 channels, then 64 units, then 10 classes), fitted on scikit-learn's
1,797 real digits in a few seconds on a CPU at first use, with a fixed seed. The fitted weights are
cached in `$DIT_CACHE` (default `~/.cache/dit`) and reused. The reference statistics are the features of
the same 1,797 real digits.

The values are "digits FD", not FIDs: their scale is this network's own, so they compare only with each
other, never with an Inception FID. Like FID, they are biased upwards for few samples; compare runs at
equal sample counts.
"""

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dit.evaluation.fid import frechet_distance

FEATURES = 64
CACHE_NAME = "digit_features-v1.pt"  # the version changes with the network or its fitting


class DigitClassifier(nn.Module):
    """(N, 1, 8, 8) digits in [-1, 1] -> 10 logits; `features` gives the 64 activations before them."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),  # 8×8 -> 4×4
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, FEATURES),
            nn.ReLU(),
        )
        self.head = nn.Linear(FEATURES, 10)

    def features(self, x):
        return self.body(x.float().reshape(-1, 1, 8, 8))

    def forward(self, x):
        return self.head(self.features(x))


def real_digits():
    """scikit-learn's 1,797 digits as (N, 1, 8, 8) float32 in [-1, 1] (the quickstart's scaling of
    pixel values 0..16, dit.data.digits) and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    return images, torch.from_numpy(digits.target)


def fit_classifier(images, labels, steps=200, seed=0):
    """A DigitClassifier fitted by full-batch AdamW (200 steps, lr 5e-3, weight decay 1e-4) from `seed`; the
    caller's RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitClassifier()
        optimizer = torch.optim.AdamW(net.parameters(), lr=5e-3, weight_decay=1e-4)
        for _ in range(steps):
            loss = nn.functional.cross_entropy(net(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval().requires_grad_(False)


def cache_dir():
    return Path(os.environ.get("DIT_CACHE") or Path.home() / ".cache" / "dit")


def digit_feature_network():
    """The classifier fitted on all 1,797 real digits: from the cache, or fitted now and cached."""
    path = cache_dir() / CACHE_NAME
    net = DigitClassifier()
    if path.is_file():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.eval().requires_grad_(False)
    net = fit_classifier(*real_digits())
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two processes fitting at once: one file wins whole
    torch.save(net.state_dict(), temporary)
    temporary.replace(path)
    return net


@torch.no_grad()
def digit_features(net, samples):
    """(N, 64) float64 features of (N, 1, 8, 8) samples in [-1, 1], clamped to that range as the
    samples' pixel values are (dit.data.vae.to_uint8)."""
    return net.features(samples.detach().float().cpu().clamp(-1, 1)).double()


def digit_reference(net):
    """{"mu", "sigma"} of the real digits' features."""
    x = digit_features(net, real_digits()[0]).numpy()
    return dict(mu=x.mean(axis=0), sigma=np.cov(x, rowvar=False))


def digit_frechet_distance(samples, net=None, reference=None) -> float:
    """The digits FD of (N, 1, 8, 8) samples in [-1, 1] against the 1,797 real digits."""
    net = net or digit_feature_network()
    reference = reference or digit_reference(net)
    return frechet_distance(digit_features(net, samples), reference)
