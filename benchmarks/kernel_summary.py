"""Where a training step's GPU time goes, read from a torch.profiler Chrome trace: kernel time by
kind (matmuls, attention, NCCL, optimizer, EMA, inductor's fused kernels, copies), how much of the
profiled window the GPU was busy, and how much of NCCL's time ran while compute kernels ran too
(under DDP: the all-reduce hidden behind the backward, or not).

    python benchmarks/kernel_summary.py trace.json --steps 2

`benchmarks/variants.py` writes such traces (PROFILE=folder) and prints this summary itself.
"""

import argparse
import bisect
import json
from collections import Counter, defaultdict

# Checked in order: the first kind whose any substring is in the kernel's (lower-cased) name wins.
KINDS = (
    ("nccl", ("nccl",)),
    ("matmul", ("triton_tem",)),  # inductor's matmul templates, before its other kernels
    ("inductor fused", ("triton_",)),  # before attention: some are named after the op they feed
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn::fusion")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "sm90_")),
    ("optimizer", ("adam",)),
    ("ema (lerp)", ("lerp",)),
    ("copies", ("memcpy", "memset", "copy")),
    ("other", ("",)),
)


def kind_of(name):
    name = name.lower()
    return next(kind for kind, keys in KINDS if any(key in name for key in keys))


def merged(intervals):
    """Sorted, non-overlapping union of (start, end) intervals."""
    out = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


def overlap(interval, union, starts):
    """Length of `interval` covered by `union` (merged, with `starts` its start points)."""
    start, end = interval
    total, i = 0.0, max(0, bisect.bisect_right(starts, start) - 1)
    while i < len(union) and union[i][0] < end:
        total += max(0.0, min(end, union[i][1]) - max(start, union[i][0]))
        i += 1
    return total


def summarize(trace, steps=1):
    """Per-step figures (ms) of the GPU kernels in a Chrome trace dict, and the top kernels."""
    kernels = [
        e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    ]
    if not kernels:
        return None
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in kernels]
    by_kind, by_name, count = defaultdict(float), defaultdict(float), Counter()
    for e in kernels:
        by_kind[kind_of(e["name"])] += e["dur"]
        by_name[e["name"]] += e["dur"]
        count[e["name"]] += 1
    busy = merged(spans)
    compute = merged(s for s, e in zip(spans, kernels) if kind_of(e["name"]) != "nccl")
    starts = [s for s, _ in compute]
    nccl = [s for s, e in zip(spans, kernels) if kind_of(e["name"]) == "nccl"]
    hidden = sum(overlap(s, compute, starts) for s in nccl)
    ms = 1e-3 / steps
    # The GPU's longest idle stretches, and what the host was doing then: the CPU-side ops that
    # began in the gap (the launching the GPU waited for) and any call that waited on the device.
    host = [
        e
        for e in trace["traceEvents"]
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "cuda_runtime", "user_annotation")
    ]
    gaps = sorted(((b[0] - a[1], a[1], b[0]) for a, b in zip(busy, busy[1:])), reverse=True)[:6]
    idle = []
    for length, start, end in gaps:
        began = sorted((e for e in host if start <= e["ts"] < end), key=lambda e: -e["dur"])[:4]
        idle.append((length * 1e-3, [(e["name"], e["dur"] * 1e-3) for e in began]))
    waits = defaultdict(float)
    for e in host:
        if "ynchronize" in e["name"] or e["name"] in ("cudaMemcpy", "aten::_local_scalar_dense", "aten::item"):
            waits[e["name"]] += e["dur"]
    return dict(
        idle_gaps=idle,
        host_waits_ms={k: v * ms for k, v in waits.items()},
        window_ms=(max(e for _, e in spans) - min(s for s, _ in spans)) * ms,
        busy_ms=sum(e - s for s, e in busy) * ms,
        compute_busy_ms=sum(e - s for s, e in compute) * ms,
        kinds_ms={k: v * ms for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        nccl_ms=by_kind.get("nccl", 0.0) * ms,
        nccl_alongside_compute_ms=hidden * ms,
        top=[(name, t * ms, count[name] / steps) for name, t in sorted(by_name.items(), key=lambda kv: -kv[1])[:15]],
    )


def report(s, train_gflop_per_step=None):
    print(
        f"  GPU kernels per step: window {s['window_ms']:.1f} ms, busy {s['busy_ms']:.1f} ms "
        f"({100 * s['busy_ms'] / s['window_ms']:.0f}%), "
        f"{s['compute_busy_ms']:.1f} ms of it with kernels other than NCCL"
    )
    for kind, t in s["kinds_ms"].items():
        print(f"    {kind:<16} {t:8.2f} ms")
    if s["nccl_ms"]:
        print(
            f"  NCCL {s['nccl_ms']:.2f} ms a step, {s['nccl_alongside_compute_ms']:.2f} ms of it while compute kernels ran"
        )
    if train_gflop_per_step and s["kinds_ms"].get("matmul"):
        print(
            f"  model FLOPs over matmul + attention kernel time: "
            f"{train_gflop_per_step / (s['kinds_ms']['matmul'] + s['kinds_ms'].get('attention', 0.0)):.0f} TFLOP/s"
        )
    print(
        "  host calls that wait on the device (ms a step): "
        + (", ".join(f"{k} {v:.2f}" for k, v in s["host_waits_ms"].items()) or "none")
    )
    print("  longest GPU idle gaps (ms) and the longest host ops that began in them (ms):")
    for length, ops in s["idle_gaps"]:
        print(f"    {length:6.2f}  " + "; ".join(f"{name[:60]} {d:.2f}" for name, d in ops))
    print("  top kernels (ms a step, launches a step):")
    for name, t, n in s["top"]:
        print(f"    {t:7.2f} {n:6.0f}  {name[:110]}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace")
    p.add_argument("--steps", type=int, default=1, help="training steps the trace holds")
    args = p.parse_args()
    with open(args.trace) as f:
        s = summarize(json.load(f), args.steps)
    if s is None:
        raise SystemExit(f"{args.trace} holds no GPU kernels (a CPU run?)")
    report(s)


if __name__ == "__main__":
    main()
