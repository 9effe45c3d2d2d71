"""Samples/s that the latent DataModule delivers from local shards, without a model (does the
loader keep a GPU fed?). ImageNet-256 records: two fp16 4×32×32 posteriors (image, flip).
Also the CPU time a sample costs, the training process and its loader workers together: on a
shared machine samples/s follows the load, CPU time much less. Each batch is read whole, as its
copy to the GPU would.

    python benchmarks/synthetic_latents.py /tmp/lat32 20000 32     # once: 20K random records
    python benchmarks/loader.py /tmp/lat32 --num-workers 2 --batch-size 256 --epochs 3
"""

import argparse
import resource
import time

import numpy as np

from dit.data.datamodule import LatentDataModule


def main():
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    dm = LatentDataModule(
        args.path,
        channels=4,
        latent_size=32,
        num_classes=1000,
        global_batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    # stands in for the GPU: training reads every byte of a batch (its copy to the device), and
    # where a batch's pages are first touched matters to the count of CPU time
    device = np.empty((args.batch_size, 2, 2, 4, 32, 32), dtype=np.float16)
    for epoch in range(args.epochs):  # every epoch starts its workers anew, as in training
        cpu_start = cpu_seconds()
        start, n = time.perf_counter(), 0
        for batch in loader:
            if n == 0:
                first = time.perf_counter()  # workers started, first batch in
            device[...] = batch["posterior"].numpy()
            n += batch["label"].shape[0]
        end = time.perf_counter()
        cpu = (cpu_seconds() - cpu_start) / n  # the workers count once reaped, at the epoch's end
        steady = (n - args.batch_size) / (end - first)
        print(
            f"epoch {epoch}: {n} samples, {n / (end - start):,.0f} samples/s including the workers' start "
            f"({first - start:.2f} s), {steady:,.0f} samples/s after the first batch "
            f"({args.num_workers} workers, batch {args.batch_size}), {cpu * 1e6:.0f} µs of CPU a sample"
        )


def cpu_seconds():
    """User + system CPU time of this process and of its reaped children (the loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    main()
