"""Write N records of random 4×S×S latent posteriors (labels i % 1000) as shards, for throughput
runs of train.py without ImageNet: python benchmarks/synthetic_latents.py /tmp/lat32 8192 32"""

import sys

import numpy as np

from dit.data.shards import write_shards


def main():
    path, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    post = np.random.default_rng(0).standard_normal((n, 2, 2, 4, size, size), dtype=np.float32).astype(np.float16)
    post[:, :, 1] = 0.05  # posterior std
    meta = dict(channels=4, latent_size=size, num_classes=1000, source="synthetic")
    write_shards(((i % 1000, post[i]) for i in range(n)), path, meta)


if __name__ == "__main__":
    main()
