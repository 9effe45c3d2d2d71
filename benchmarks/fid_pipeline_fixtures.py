"""Inputs for running issue #5's pipeline where no real weights can be downloaded (as the tests make
them): an ImageNet-style folder of random JPEGs (4 classes, plus one file that is no image), a
randomly initialised small AutoencoderKL folder, and torch-fidelity's Inception-v3 with random
weights in a file. Used by benchmarks/fid_pipeline_on_gpus.sh.

    python benchmarks/fid_pipeline_fixtures.py /tmp/f 48      # 48 images per class
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dit.data.vae import tiny_vae
from dit.evaluation.fid import random_inception


def main():
    root, per_class = Path(sys.argv[1]), int(sys.argv[2])
    rng = np.random.default_rng(0)
    for c in range(4):
        folder = root / "imgs" / f"n0{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(260, 400, 2)  # off-square and larger than 256: the centre crop has work to do
            pixels = rng.integers(0, 255, 3) + rng.normal(0, 40, (h, w, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"img_{i}.JPEG", quality=90)
    (root / "imgs" / "n00" / "broken.JPEG").write_bytes(b"not a jpeg")
    tiny_vae().save_pretrained(root / "vae")
    random_inception(root / "inception.pth")
    print(f"fixtures in {root}: imgs/, vae/, inception.pth")


if __name__ == "__main__":
    main()
