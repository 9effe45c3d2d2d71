"""How fast the training step and the sampler run, as a share of what the hardware can do.

    python -m dit.benchmark --model DiT-XL/2 --batch-size 32                # one GPU: step + MFU
    python -m dit.benchmark --model DiT-XL/2 --batch-size 32 --devices 2    # DDP over 2 GPUs
    python -m dit.benchmark --model DiT-XL/2 --batch-size 0 --time-sampler  # largest batch that fits, + sampler
    python -m dit.benchmark --model DiT-S/8 --image-size 64 --batch-size 4 --steps 3 --time-sampler sampler.steps=5   # CPU
    python -m dit.benchmark --model DiT-XL/2 --objective flow --time-sampler sampler=heun   # flow matching (SiT)

The training step is the one train.py runs — DiTModule (hybrid loss, AdamW, EMA through Lightning's
dit.training.callbacks.ema.EMA, the non-finite guard) under a Lightning Trainer — fed in-memory latents, so the loader is
not measured here (`benchmarks/loader.py` measures it); the timed steps hold no logging step (one
in 100 in training, with one device sync). Model FLOPs count 2 per multiply-add; a training step
costs 3× the forward pass (backward ≈ 2×), as in PaLM's MFU (Chowdhery et al. 2022, App. B) and
nanoGPT's `estimate_mfu`; activation checkpointing's recomputation is not counted, so it lowers the
share. The matmul rate is measured in the same process on the same device, in the dtype of the
run's matmuls (bf16 under bf16-mixed), and the share is taken against it.
"""

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch
from lightning import Callback, Trainer
from lightning.pytorch.strategies import DDPStrategy

from dit.config import sampler_from
from dit.diffusion import DDPM, REPA, Euler, FlowMatching, Hybrid, batch_generator, draw, is_flow
from dit.diffusion.guidance import check_guidance_scale
from dit.errors import ArgumentParser, UsageError, exit_on_usage_error
from dit.models import DiT, DiT_models
from dit.models.float8_sampling import GRANULARITIES as FLOAT8_GRANULARITIES
from dit.models.float8_sampling import check_float8_sampling, quantize_for_sampling
from dit.models.flops import count_gflops
from dit.training.callbacks.ema import EMA
from dit.training.callbacks.nonfinite_guard import NonFiniteGuard
from dit.training.float8 import LAYERS as FLOAT8_LAYERS
from dit.training.float8 import RECIPES as FLOAT8_RECIPES
from dit.training.module import DiTModule

# The DDP settings of conf/trainer/ddp.yaml (a test checks they agree), so --devices measures what
# train.py trainer=ddp runs.
DDP_OPTIONS = dict(gradient_as_bucket_view=True, bucket_cap_mb=100, broadcast_buffers=False)


def matmul_tflops(device, dtype, size=None, windows=None):
    """Dense square-matmul rate (TFLOP/s, 2 per multiply-add) of `device` in `dtype`: the best of
    several timed windows after a warm-up, so clocks have ramped up and no window is unlucky."""
    cuda = device.type == "cuda"
    size, windows = size or (8192 if cuda else 1024), windows or (8 if cuda else 3)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    reps = 1
    while True:  # calibrate to ~0.25 s a window; this doubles as the warm-up
        start = _now(device)
        for _ in range(reps):
            a @ b
        if _now(device) - start > (0.25 if cuda else 0.1):
            break
        reps *= 2
    best = 0.0
    for _ in range(windows):
        start = _now(device)
        for _ in range(reps):
            a @ b
        best = max(best, 2 * size**3 * reps / (_now(device) - start) / 1e12)
    return best


def matmul_burst_tflops(device, dtype, size=None, bursts=None, reps=4, idle_s=None):
    """The rate of a short burst of the same matmuls after the device idled for `idle_s` (the
    best of `bursts`): what a card reaches before its clocks settle under load, above the
    sustained rate of `matmul_tflops`. Both are reported; the MFU is quoted against the sustained
    one, the rate the training step runs under."""
    cuda = device.type == "cuda"
    size, bursts = size or (8192 if cuda else 1024), bursts or (5 if cuda else 2)
    idle_s = (1.0 if cuda else 0.0) if idle_s is None else idle_s  # a CPU has no GPU boost clock to recover
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b  # kernel selection
    best = 0.0
    for _ in range(bursts):
        _now(device)
        time.sleep(idle_s)
        start = _now(device)
        for _ in range(reps):
            a @ b
        best = max(best, 2 * size**3 * reps / (_now(device) - start) / 1e12)
    return best


def _now(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def forward_gflop(kwargs):
    """GFLOP of one image's forward pass of DiT(**kwargs), 2 per multiply-add: twice the paper's Gflops."""
    with torch.device("meta"):
        return 2 * count_gflops(DiT(**kwargs))


def model_kwargs(name, image_size, activation_checkpointing=False):
    """DiT keyword arguments of a paper config (ImageNet: 4-channel latents, 1000 classes)."""
    with torch.device("meta"):
        net = DiT_models[name](input_size=image_size // 8)
    depth, hidden = len(net.blocks), net.pos_embed.shape[-1]
    return dict(
        input_size=image_size // 8,
        patch_size=net.patch_size,
        in_channels=4,
        num_classes=1000,
        depth=depth,
        hidden_size=hidden,
        num_heads=net.num_heads,
        activation_checkpointing=activation_checkpointing,
    )


class InMemoryLatents:
    """`steps` batches of the same random latents and labels (only their shape matters here), and
    with `features` (a width) random encoder features, one per token."""

    def __init__(self, batch_size, kwargs, steps, features=0):
        size = kwargs["input_size"]
        self.batch = (
            torch.randn(batch_size, kwargs["in_channels"], size, size),
            torch.randint(0, kwargs["num_classes"], (batch_size,)),
        )
        if features:
            tokens = (size // kwargs["patch_size"]) ** 2
            self.batch += (torch.randn(batch_size, tokens, features),)
        self.steps = steps

    def __len__(self):
        return self.steps

    def __iter__(self):
        return iter([self.batch] * self.steps)


class StepTimer(Callback):
    """Wall time and peak memory of the steps after `warmup` (compilation, cuDNN/cuBLAS autotuning
    and allocator growth happen in the warm-up), with one device sync at each end of the window."""

    def __init__(self, warmup):
        self.warmup = warmup
        self.begin = self.start = self.end = None
        self.steps = 0

    def on_train_start(self, trainer, module):
        self.begin = _now(module.device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = _now(module.device)
            if module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(module.device)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.end = _now(module.device) if batch_idx + 1 == trainer.max_steps else self.end
            self.steps += 1


# --objective: what the timed step minimises (conf/objective/).
# REPA with its defaults (λ 0.5, block 8, DINOv2 ViT-B/14's 768-wide features), fed precomputed
# features as data.features=true does: the encoder never runs in the step.
OBJECTIVES = {"hybrid": Hybrid, "flow": FlowMatching, "repa": REPA}


def benchmark_training(args, kwargs, accelerator):
    total = args.warmup + args.steps
    module = DiTModule(  # the recipe of conf/train.yaml
        model=DiT(**kwargs),
        optimizer=partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.0),
        diffusion=dict(timestep_respacing=""),
        objective=OBJECTIVES[args.objective](),
        sampler=Euler() if args.objective in ("flow", "repa") else DDPM(),  # the grids' sampler: not timed
        sampling=dict(guidance_scale=1.0, guidance="official", seed=0),
        compile=args.compile,
        float8=args.float8,
        float8_layers=tuple(args.float8_layers),
    )
    timer = StepTimer(args.warmup)
    trainer = Trainer(
        accelerator=accelerator,
        devices=args.devices,
        precision=args.precision,
        max_steps=total,
        strategy=DDPStrategy(**DDP_OPTIONS) if args.devices > 1 or args.ddp else "auto",
        callbacks=[EMA(), NonFiniteGuard(args.nonfinite_guard), timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=100,
    )
    features = module.objective.encoder_dim if args.objective == "repa" else 0
    trainer.fit(module, train_dataloaders=InMemoryLatents(args.batch_size, kwargs, total, features))
    seconds = timer.end - timer.start
    device = trainer.strategy.root_device
    cuda = device.type == "cuda"
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    reserved = torch.cuda.max_memory_reserved(device) / 2**30 if cuda else float("nan")  # what nvidia-smi sees, roughly
    images = args.batch_size * trainer.world_size * timer.steps
    return trainer, dict(
        step_ms=1e3 * seconds / timer.steps,
        images_per_sec=images / seconds,
        peak_gib=peak,
        reserved_gib=reserved,
        warmup_s=timer.start - timer.begin,  # compilation (from torch's caches on a second run) and the first steps
    )


def benchmark_sampler(args, kwargs, device, dtype):
    """The sampler through `dit.diffusion.draw` (the paper's 250 DDPM steps, or sampler=
    overrides) with classifier-free guidance (one batched forward over conditional + unconditional
    halves, for the steps in --guidance-interval), random weights, under autocast."""
    torch.manual_seed(0)
    net = DiT(**{**kwargs, "activation_checkpointing": False}).to(device).eval()
    float8_layers = quantize_for_sampling(net, args.sampler_float8) if args.sampler_float8 else []
    compile = device.type == "cuda" if args.compile == "auto" else args.compile
    if compile:
        net.compile(mode=None if compile is True else compile)
    options = OBJECTIVES[args.objective]().process_options(dict(learn_sigma=net.learn_sigma))
    sampler = sampler_from(args.overrides, "heun" if is_flow(options) else "ddpm")
    labels = torch.randint(0, kwargs["num_classes"], (args.sample_batch_size,))
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def run(which):
        with torch.no_grad(), autocast:
            start = _now(device)
            generator = batch_generator(0, 0, device)
            draw(net, which, options, labels, generator, args.guidance_scale, "auto", tuple(args.guidance_interval))
            return _now(device) - start

    # Warm-up: compilation; every step has the same shapes, so the real loop reuses it.
    run(Euler(steps=2) if is_flow(options) else DDPM("3"))
    seconds = run(sampler)
    return dict(
        images_per_sec=args.sample_batch_size / seconds,
        seconds=seconds,
        nfe=sampler.nfe,
        forwards_per_image=sampler.nfe + sampler.guided_nfe,  # a guided evaluation is a forward of 2
        float8_layers=len(float8_layers),
    )


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-XL/2", help="a config of Table 4, e.g. DiT-XL/2")
    p.add_argument("--image-size", type=int, default=256, help="pixels; the latent is 1/8 of it")
    p.add_argument("--batch-size", type=int, default=32, help="per device; 0 = the largest power of 2 that fits")
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    p.add_argument("--devices", type=int, default=1, help="DDP over this many GPUs when > 1")
    p.add_argument(
        "--ddp",
        action="store_true",
        help="DDP even on one device: what DDP costs the step besides the all-reduce between GPUs",
    )
    p.add_argument("--precision", default=None, help="Lightning precision (default: bf16-mixed on GPU, 32-true on CPU)")
    p.add_argument(
        "--compile",
        default="auto",
        type=lambda s: {"true": True, "false": False}.get(s, s),
        help="auto (on for CUDA) | true | false | a torch.compile mode, e.g. reduce-overhead",
    )
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in the backward")
    p.add_argument(
        "--float8",
        choices=FLOAT8_RECIPES,
        help="module.float8: a float8 recipe for the blocks' linears (torchao's, or the float8 forward's *_forward)",
    )
    p.add_argument(
        "--float8-layers", nargs="+", default=list(FLOAT8_LAYERS), metavar="LAYER", help="module.float8_layers"
    )
    p.add_argument("--nonfinite-guard", type=int, default=10, help="callbacks.nonfinite_guard.max_in_a_row (0: off)")
    p.add_argument("--time-sampler", action="store_true", help="also time the guided sampler (sampler= overrides)")
    p.add_argument(
        "overrides", nargs="*", metavar="sampler=...", help="the sampler as in train.py: sampler=ddim sampler.steps=..."
    )
    p.add_argument("--sample-batch-size", type=int, default=64)
    p.add_argument(
        "--sampler-float8",
        choices=FLOAT8_GRANULARITIES,
        help="the sampler's blocks' linears in float8, weights quantised once (dit.models.float8_sampling)",
    )
    p.add_argument("--guidance-scale", type=float, default=1.5)
    p.add_argument(
        "--guidance-interval", nargs=2, type=float, default=[0.0, 1.0], metavar=("LOW", "HIGH"), help="REPA: 0 0.7"
    )
    p.add_argument(
        "--objective", choices=list(OBJECTIVES), default="hybrid", help="hybrid (the paper's), flow, or repa"
    )
    p.add_argument("--no-train", action="store_true", help="only the sampler")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_intermixed_args(argv)
    if args.model not in DiT_models:
        raise UsageError(f"--model {args.model!r}: choose one of {', '.join(DiT_models)}")
    counts = dict(steps=args.steps, devices=args.devices, sample_batch_size=args.sample_batch_size)
    for name, value in dict(counts, warmup=args.warmup, batch_size=args.batch_size).items():
        if value < (1 if name in counts else 0):
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} must be at least {1 if name in counts else 0}, got {value}")
    check_guidance_scale(args.guidance_scale)
    if args.float8 and args.no_train:
        raise UsageError("--float8 is the training step's; for the sampler's float8 matmuls use --sampler-float8")
    if args.sampler_float8 and not args.time_sampler:
        raise UsageError("--sampler-float8 is a setting of the sampler's timing: add --time-sampler")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise UsageError(f"--json {args.json}: the folder {Path(args.json).parent} does not exist")
    if args.json and Path(args.json).exists():  # an earlier run's figures: never written over
        raise UsageError(f"--json {args.json} exists (an earlier run's figures?): give a new path, or delete it")
    return args


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    accelerator = "gpu" if cuda else "cpu"
    args.precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 runs as the official code
    kwargs = model_kwargs(args.model, args.image_size, args.activation_checkpointing)
    fwd = forward_gflop(kwargs)
    result = dict(
        model=args.model,
        warmup=args.warmup,
        objective=args.objective,
        image_size=args.image_size,
        precision=args.precision,
        compile=args.compile,
        devices=args.devices,
        ddp=args.devices > 1 or args.ddp,
        float8=args.float8,
        float8_layers=args.float8_layers if args.float8 else [],
        sampler_float8=args.sampler_float8,
        forward_gflop_per_image=fwd,
        train_gflop_per_image=3 * fwd,
    )
    if args.sampler_float8:
        check_float8_sampling(args.sampler_float8, torch.device("cuda" if cuda else "cpu"), "--sampler-float8")
    rank0 = True
    if not args.no_train:
        if args.batch_size == 0:
            args.batch_size = largest_batch(args, kwargs, accelerator)
        trainer, train = benchmark_training(args, kwargs, accelerator)
        rank0 = trainer.is_global_zero
        device = trainer.strategy.root_device
        result.update(batch_size=args.batch_size, **{f"train_{k}": v for k, v in train.items()})
    else:
        device = torch.device("cuda" if cuda else "cpu")
    if not rank0:
        return result
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result["matmul_dtype"] = str(dtype).removeprefix("torch.")
    result["matmul_tflops"] = rate = matmul_tflops(device, dtype)
    result["matmul_burst_tflops"] = burst = matmul_burst_tflops(device, dtype)
    if not args.no_train:
        per_device = result["train_images_per_sec"] / args.devices
        result["train_tflops_per_device"] = achieved = per_device * 3 * fwd / 1e3
        result["train_mfu"] = achieved / rate
        result["train_mfu_burst"] = achieved / burst
    if args.time_sampler:
        s = benchmark_sampler(args, kwargs, device, dtype)
        result.update({f"sampler_{k}": v for k, v in s.items()}, sample_batch_size=args.sample_batch_size)
        result["sampler_tflops"] = achieved = s["images_per_sec"] * s["forwards_per_image"] * fwd / 1e3
        result["sampler_mfu"] = achieved / rate
        result["sampler_mfu_burst"] = achieved / burst
    report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def largest_batch(args, kwargs, accelerator):
    """Doubles the per-device batch from 32 until a step runs out of memory (CUDA only)."""
    if accelerator != "gpu":
        raise UsageError("--batch-size 0 (the largest that fits) needs a GPU; give a batch size")
    best, batch = None, 32
    while True:
        trial = argparse.Namespace(**{**vars(args), "batch_size": batch, "steps": 1, "warmup": 1, "devices": 1})
        try:
            benchmark_training(trial, kwargs, accelerator)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            if best is None:
                raise UsageError(f"{args.model} does not fit at batch 32; try --activation-checkpointing") from None
            return best
        best, batch = batch, batch * 2


def report(r):
    print(
        f"{r['model']} ({r['objective']}) at {r['image_size']}px on {r['device']} ×{r['devices']}{' (DDP)' if r['ddp'] else ''}, {r['precision']}, compile={r['compile']}"
    )
    if r["float8"]:
        print(f"  float8 ({r['float8']}) matmuls in the blocks' {', '.join(r['float8_layers'])}")
    print(
        f"  matmul rate ({r['matmul_dtype']}), measured: {r['matmul_tflops']:.1f} TFLOP/s sustained, "
        f"{r['matmul_burst_tflops']:.1f} in a short burst"
    )
    print(
        f"  model FLOPs per image: forward {r['forward_gflop_per_image']:.1f} GFLOP, train step {r['train_gflop_per_image']:.1f} GFLOP"
    )
    if "train_images_per_sec" in r:
        print(
            f"  train, batch {r['batch_size']}/device: {r['train_images_per_sec']:.1f} images/s, "
            f"step {r['train_step_ms']:.1f} ms, peak memory {r['train_peak_gib']:.2f} GiB allocated / {r['train_reserved_gib']:.2f} reserved, "
            f"{r['train_tflops_per_device']:.1f} TFLOP/s per device = {100 * r['train_mfu']:.1f}% of the sustained "
            f"matmul rate ({100 * r['train_mfu_burst']:.1f}% of the burst rate)"
        )
        print(f"  warm-up: {r['train_warmup_s']:.1f} s for the first {r['warmup']} steps (compilation included)")
    if "sampler_images_per_sec" in r:
        float8 = f", float8 ({r['sampler_float8']}) matmuls in the blocks" if r["sampler_float8"] else ""
        print(
            f"  sampler{float8}, batch {r['sample_batch_size']} ({r['sampler_nfe']} evaluations, "
            f"{r['sampler_forwards_per_image']} forwards/image): "
            f"{r['sampler_images_per_sec']:.2f} images/s, {r['sampler_tflops']:.1f} TFLOP/s = "
            f"{100 * r['sampler_mfu']:.1f}% of the sustained matmul rate ({100 * r['sampler_mfu_burst']:.1f}% of the burst rate)"
        )


if __name__ == "__main__":
    exit_on_usage_error(main)
