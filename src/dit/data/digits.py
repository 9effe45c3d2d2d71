"""The quickstart's real data: scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10
classes; no download), and a classifier of them (dit.evaluation.digit_accuracy asks it whether a
trained model draws the digit it is asked for).
"""

import numpy as np

from dit.data.shards import write_shards


def prepare_digits(output_dir):
    """The digits as 1-channel "latents" in [-1, 1] with a zero posterior std, in the shard format
    of dit.data (the mirror image is stored too, as the format asks, but the digits config never
    draws it)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 8.0 - 1.0  # pixel values 0..16 -> [-1, 1]
    records = []
    for image, label in zip(images, digits.target):
        mean = np.stack([image, image[:, ::-1]])[:, None, None]  # (2 flips, 1, C=1, 8, 8)
        records.append((label, np.concatenate([mean, np.zeros_like(mean)], axis=1)))  # [mean, std]
    meta = dict(channels=1, latent_size=8, num_classes=10, source="sklearn.datasets.load_digits")
    write_shards(records, output_dir, meta)


def digit_classifier():
    """An SVM fitted on all 1,797 real digits (pixel values 0..16); ~99% accurate on held-out digits."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    return SVC(gamma=0.001).fit(digits.data, digits.target)


def pixel_frechet_distance(samples) -> float:
    """The Fréchet distance (Heusel et al. 2017, as FID) between (N, 1, 8, 8) samples in [-1, 1]
    and the 1,797 real digits, in the space of the 64 raw pixel values (0..16): no Inception
    features (they need a download and see 8×8 images poorly), so its values are not FIDs; 0 is
    the real digits' own statistics."""
    from sklearn.datasets import load_digits

    from dit.evaluation.fid import frechet_distance

    real = load_digits().data.astype(np.float64)
    reference = dict(mu=real.mean(0), sigma=np.cov(real, rowvar=False))
    pixels = ((samples.double().cpu().reshape(len(samples), 64) + 1) * 8).clamp(0, 16)
    return frechet_distance(pixels, reference)


def classify(samples, classifier=None):
    """Labels a classifier fitted on the real digits gives (N, 1, 8, 8) samples in [-1, 1]."""
    classifier = classifier or digit_classifier()
    pixels = ((samples.float().cpu().numpy().reshape(len(samples), 64) + 1) * 8).clip(0, 16)
    return classifier.predict(pixels)
