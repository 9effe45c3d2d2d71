"""SDPA's attention kernels at DiT's shapes (256 px, patch 2: 256 tokens), forward + backward, bf16,
one GPU: which backend is fastest for each size's head dim (S, B, L: 64; XL: 72 = 1152 / 16).

    python benchmarks/attention_kernels.py [--batch-size 32] [--tokens 256]

Prints, per model size, milliseconds per forward + backward of one block's attention for each
backend that accepts the inputs, each one's speed relative to the flash kernel, and the kernels
that SDPA runs when left to choose (the model's `attention: sdpa`).
"""

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from dit.models import SIZES

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def time_backend(backend, q, k, v, repeats=50):
    """Milliseconds per forward + backward, or None where the backend refuses these inputs."""
    grad = torch.randn_like(q)

    def step():
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, k, v).backward(grad)

    try:
        for _ in range(5):
            step()
    except RuntimeError:
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def default_kernels(q, k, v):
    """The names of the GPU kernels of one forward + backward with SDPA's own choice of backend."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
        torch.cuda.synchronize()
    return sorted({e.name[:60] for e in prof.events() if any(w in e.name.lower() for w in ("sdpa", "fmha", "flash"))})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print(f"batch {args.batch_size}, {args.tokens} tokens, bf16, forward + backward of one attention")
    for size, (_, width, heads) in SIZES.items():
        shape = (args.batch_size, heads, args.tokens, width // heads)
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        times = {name: time_backend(backend, q, k, v) for name, backend in BACKENDS.items()}
        flash = times["flash"]
        cells = [
            f"{name} {ms:.3f} ms" + (f" ({flash / ms:.2f}x flash)" if flash and name != "flash" else "")
            if ms is not None
            else f"{name} refused"
            for name, ms in times.items()
        ]
        print(f"DiT-{size} (head dim {width // heads}): " + ", ".join(cells))
        print(f"  SDPA's own choice runs: {', '.join(default_kernels(q, k, v))}")


if __name__ == "__main__":
    main()
