"""The reference of the training-speed rows: the official train.py's step (facebookresearch/DiT)
in plain PyTorch, with bf16 autocast and torch.compile of the model added, and no Lightning.

    python benchmarks/official_loop.py --batch-size 32       # DiT-XL/2 at 256x256, one GPU

Per step, as the official train.py: uniform timesteps, `diffusion.training_losses(...)["loss"].mean()`,
`opt.zero_grad()`, `loss.backward()`, `opt.step()` with torch.optim.AdamW(lr=1e-4, weight_decay=0)
(torch's default implementation), and its `update_ema` (a loop over the parameters, decay 0.9999).
The model is dit.models.DiT, whose parameters and forward are those of the official models.py
(tests/models/test_dit.py loads the official checkpoint), the diffusion dit.diffusion's, equal to the
official one (tests/diffusion/). Latents come from memory (the official loop encodes images
with the VAE at every step, which this leaves out, as `python -m dit.benchmark` does).
"""

import argparse
import json
import time
from copy import deepcopy
from pathlib import Path

import torch

from dit.diffusion import create_diffusion
from dit.models import DiT_models


@torch.no_grad()
def update_ema(ema, model, decay=0.9999):
    ema_params = dict(ema.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


def official_step(model_name="DiT-XL/2", image_size=256, batch_size=32, steps=30, warmup=8):
    """Time the official step; returns images/s and the step time."""
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = DiT_models[model_name](input_size=image_size // 8).to(device)
    ema = deepcopy(model).requires_grad_(False)
    diffusion = create_diffusion("")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    compiled = torch.compile(model)
    x = torch.randn(batch_size, 4, image_size // 8, image_size // 8, device=device)
    y = torch.randint(0, 1000, (batch_size,), device=device)
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = diffusion.training_losses(compiled, x, t, dict(y=y))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_ema(ema, model)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return dict(
        model=model_name,
        batch_size=batch_size,
        device=torch.cuda.get_device_name(),
        images_per_sec=batch_size * steps / seconds,
        step_ms=1e3 * seconds / steps,
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--json")
    args = p.parse_args()
    if args.json and Path(args.json).exists():  # an earlier run's figures: never written over
        raise SystemExit(f"error: --json {args.json} exists (an earlier run's figures?): give a new path, or delete it")
    result = official_step(args.model, args.image_size, args.batch_size, args.steps, args.warmup)
    print(
        f"official loop (bf16 autocast + torch.compile), {args.model}, batch {args.batch_size} on {result['device']}: "
        f"{result['images_per_sec']:.1f} images/s, step {result['step_ms']:.1f} ms"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
