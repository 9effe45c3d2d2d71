"""Samples/s that the latent DataModule delivers from local shards, without a model (does the
loader keep a GPU fed?). ImageNet-256 records: two fp16 4×32×32 posteriors (image, flip).

    python benchmarks/synthetic_latents.py /tmp/lat32 20000 32     # once: 20K random records
    python benchmarks/loader.py /tmp/lat32 --num-workers 2 --batch-size 256 --epochs 3
"""

import argparse
import time

from dit.data import LatentDataModule


def main():
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    dm = LatentDataModule(args.path, channels=4, latent_size=32, num_classes=1000,
                          global_batch_size=args.batch_size, num_workers=args.num_workers)  # fmt: skip
    dm.setup("fit")
    loader = dm.train_dataloader()
    for epoch in range(args.epochs):  # every epoch starts its workers anew, as in training
        start, n = time.perf_counter(), 0
        for batch in loader:
            if n == 0:
                first = time.perf_counter()  # workers started, first batch in
            n += batch["label"].shape[0]
        end = time.perf_counter()
        steady = (n - args.batch_size) / (end - first)
        print(f"epoch {epoch}: {n} samples, {n / (end - start):,.0f} samples/s including the workers' start "
              f"({first - start:.2f} s), {steady:,.0f} samples/s after the first batch "
              f"({args.num_workers} workers, batch {args.batch_size})")  # fmt: skip

if __name__ == "__main__":
    main()
