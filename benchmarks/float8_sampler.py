"""One guided sampling forward of DiT-XL/2 (2 × batch images: the conditional and unconditional
halves of classifier-free guidance) with each way of running its matmuls, compiled, under bf16 autocast, on one GPU:
the time a forward, the sampler's images/s it implies (250 such forwards an image batch), and how far
its output is from the same forward in fp32.

    python benchmarks/float8_sampler.py --batch-size 64

Variants (each a copy of one model whose zero-initialised adaLN-Zero weights are made non-zero, so
the blocks are not the identity):
- bf16-autocast: the sampler's default, fp32 weights under bf16 autocast (the weights cast on every call)
- bf16-weights: the whole model cast to bf16 once (pos_embed too, so the residual stream is bf16)
- fp8-train-<recipe>: module.float8's torchao Float8Linear (casts weights and inputs on every call)
- fp8-ao-<rowwise|tensorwise>: torchao's inference quantisation of the blocks' qkv, proj, fc1 and fc2
  (Float8DynamicActivationFloat8WeightConfig): weights quantised to float8 e4m3 once, each input on
  every call, with one scale a row or a tensor; the rest as under bf16 autocast
- fp8-fused-<rowwise|tensorwise>[:layer,layer]: the four layers (or those listed) through
  dit.models.float8_sampling (the sampler's --float8): weights quantised once, each input's scale
  computed by plain tensor operations that torch.compile fuses into the kernel producing the input;
  the GELU fused into fc2's input quantisation (rowwise: by a Triton kernel; `rowwise-inductor`
  by torch.compile's kernels instead)
- bf16-sigmoid-gelu: bf16 autocast with the MLP's GELU in its sigmoid form (the same function)

`--profile N` also prints each variant's N largest GPU kernels over 3 forwards (torch.profiler).
torchao and torch's float8 matmuls run on CUDA GPUs of compute capability 8.9+ only.
"""

import argparse
import copy
import gc
import time

import torch

from dit.models import DiT
from dit.models.float8_sampling import Float8SamplingLinear, SigmoidGELU, quantize_for_sampling
from dit.tools.benchmark import model_kwargs
from dit.training.float8 import LAYERS, convert_blocks_to_float8, is_float8_layer


def non_identity_model(name, image_size):
    torch.manual_seed(0)
    model = DiT(**model_kwargs(name, image_size))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0, 0.02)
    return model.eval().requires_grad_(False)


def quantize_blocks_for_sampling(model, granularity):
    """torchao's float8 inference quantisation of the chosen linears, in place, from bf16 weights
    (the dtype they compute in under autocast); torch.compile's global settings left as they are."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    def wanted(module, name):
        return is_float8_layer(module, name, LAYERS)

    for name, module in model.blocks.named_modules():
        if wanted(module, name):
            module.to(torch.bfloat16)
    config = Float8DynamicActivationFloat8WeightConfig(
        granularity=PerRow() if granularity == "rowwise" else PerTensor(), set_inductor_config=False
    )
    quantize_(model.blocks, config, filter_fn=wanted)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64, help="images; a guided forward runs twice as many")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument(
        "--variants",
        nargs="+",
        default=[
            "bf16-autocast",
            "bf16-weights",
            "fp8-train-tensorwise",
            "fp8-train-rowwise",
            "fp8-ao-rowwise",
            "fp8-ao-tensorwise",
            "fp8-fused-rowwise",
            "fp8-fused-tensorwise",
        ],
    )
    p.add_argument("--profile", type=int, default=0, metavar="N", help="print the N largest kernels of each variant")
    args = p.parse_args()
    device = torch.device("cuda")
    base = non_identity_model(args.model, args.image_size)
    n, size = 2 * args.batch_size, args.image_size // 8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, size, size, generator=g).to(device)
    t = torch.randint(0, 1000, (n,), generator=g).to(device)
    y = torch.cat([torch.randint(0, 1000, (n // 2,), generator=g), torch.full((n // 2,), 1000)]).to(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    reference = base.to(device)(x, t, y).float()
    base.cpu()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.model}, forward of {n}", flush=True)
    for variant in args.variants:
        try:
            ms, err, warm = time_variant(variant, base, x, t, y, reference, args.reps, args.profile)
        except Exception as e:  # one variant's failure must not lose the others' figures
            print(f"{variant:22s} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            continue
        print(
            f"{variant:22s} {ms:7.2f} ms a forward -> {args.batch_size / (250 * ms / 1e3):5.2f} images/s at 250 steps; "
            f"relative error to fp32 {err:.4f}; warm-up {warm:.0f} s",
            flush=True,
        )
        gc.collect()
        torch.cuda.empty_cache()


def time_variant(variant, base, x, t, y, reference, reps, profile=0):
    """(ms a forward, relative error to the fp32 output, warm-up seconds); bf16 autocast throughout
    (it casts the inputs; layers already in bf16 or float8 are left as they are)."""
    model = copy.deepcopy(base)
    if variant == "bf16-weights":
        model = model.to(torch.bfloat16)
    elif variant.startswith("fp8-train-"):
        convert_blocks_to_float8(model, variant.removeprefix("fp8-train-"), LAYERS)
    elif variant.startswith("fp8-ao-"):
        quantize_blocks_for_sampling(model, variant.removeprefix("fp8-ao-"))
    elif variant == "bf16-sigmoid-gelu":
        for block in model.blocks:
            block.mlp.act = SigmoidGELU()
    elif variant.startswith("fp8-fused-"):
        granularity, _, layers = variant.removeprefix("fp8-fused-").partition(":")
        quantize_for_sampling(model, granularity.removesuffix("-inductor"), layers.split(",") if layers else LAYERS)
        for module in model.modules():
            if isinstance(module, Float8SamplingLinear):
                module.triton_kernel = not granularity.endswith("-inductor")
    model = torch.compile(model.to(x.device))
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            out = model(x, t, y)
        torch.cuda.synchronize()
        warm = time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(reps):
            model(x, t, y)
        end.record()
        torch.cuda.synchronize()
        if profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    model(x, t, y)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=profile, max_name_column_width=90))
    return begin.elapsed_time(end) / reps, ((out.float() - reference).norm() / reference.norm()).item(), warm


if __name__ == "__main__":
    main()
