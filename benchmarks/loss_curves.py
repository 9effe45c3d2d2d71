"""Compare training-loss curves: the mean of `train/loss` over windows of steps for each run's
metrics.csv (CSVLogger), and each run's largest gap to the first run over the windows. With two
runs of the same recipe and different seeds first, their gap is the run-to-run spread that the
others are measured against.

    python benchmarks/loss_curves.py OUT/bf16_s0/csv/version_0/metrics.csv OUT/bf16_s1/... OUT/fp8_s0/...
"""

import argparse
import csv
from pathlib import Path


def windowed_means(path, key, window):
    """{window start: mean of `key` over the logged steps in [start, start + window)}."""
    sums = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get(key):
                start = int(row["step"]) // window * window
                total, count = sums.get(start, (0.0, 0))
                sums[start] = (total + float(row[key]), count + 1)
    return {start: total / count for start, (total, count) in sorted(sums.items())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", nargs="+", type=Path)
    p.add_argument("--key", default="train/loss")
    p.add_argument("--window", type=int, default=250)
    args = p.parse_args(argv)
    names = [m.parts[-4] if len(m.parts) >= 4 else str(m) for m in args.metrics]  # <run>/csv/version_0/metrics.csv
    curves = [windowed_means(m, args.key, args.window) for m in args.metrics]
    starts = sorted(set.intersection(*(set(c) for c in curves)))
    print(f"mean {args.key} over windows of {args.window} steps")
    print("steps".ljust(12) + "".join(n.rjust(12) for n in names))
    for s in starts:
        print(f"{s}-{s + args.window - 1}".ljust(12) + "".join(f"{c[s]:12.5f}" for c in curves))
    for name, curve in zip(names[1:], curves[1:]):
        gap = max(abs(curve[s] - curves[0][s]) for s in starts)
        print(f"largest gap of {name} to {names[0]}: {gap:.5f}")


if __name__ == "__main__":
    main()
