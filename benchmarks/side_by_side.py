"""The official step (bf16 autocast + torch.compile, `official_loop.py`) and the project's step
(`python -m dit.benchmark`) in one process, alternating, so both see the same card, clocks and
libraries; prints each run and the ratio of the means.

    python benchmarks/side_by_side.py --batch-size 32                     # DiT-XL/2, one GPU
    python benchmarks/side_by_side.py --batch-size 32 -- --float8 tensorwise   # project flags after --

Order: official, project, official, project (`--rounds 2`), so a drift of the card's clocks over
the run falls on both.
"""

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from official_loop import official_step  # noqa: E402

from dit.tools.benchmark import main as project_step  # noqa: E402


def release():
    gc.collect()
    torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json")
    p.add_argument("project_args", nargs="*", help="more flags of python -m dit.benchmark, after --")
    args = p.parse_args(argv)
    if args.json and Path(args.json).exists():  # an earlier run's figures: never written over
        raise SystemExit(f"error: --json {args.json} exists (an earlier run's figures?): give a new path, or delete it")
    common = ["--model", args.model, "--batch-size", str(args.batch_size)]
    common += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    official, project = [], []
    for _ in range(args.rounds):
        official.append(official_step(args.model, 256, args.batch_size, args.steps, args.warmup)["images_per_sec"])
        print(f"official (bf16 + compile): {official[-1]:.1f} images/s", flush=True)
        release()
        project.append(project_step(common + args.project_args)["train_images_per_sec"])
        release()
    mean_official, mean_project = sum(official) / len(official), sum(project) / len(project)
    print(
        f"{args.model} at {args.batch_size} a GPU on {torch.cuda.get_device_name()}: official {mean_official:.1f}, "
        f"project {mean_project:.1f} images/s ({mean_project / mean_official:.2f}x)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(dict(official=official, project=project), indent=2))


if __name__ == "__main__":
    main()
