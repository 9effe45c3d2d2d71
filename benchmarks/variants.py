"""`python -m dit.benchmark` under a variant of the step that has no switch of its own, chosen by
environment variables; how the variant rows of docs/benchmarks.md were measured.

    DIT_SDPA=cudnn python benchmarks/variants.py --model DiT-XL/2 --batch-size 32     # one SDPA backend
    INDUCTOR='{"coordinate_descent_tuning": true}' python benchmarks/variants.py ...  # torch._inductor.config
    DDP='{"bucket_cap_mb": 250}' python benchmarks/variants.py ... --devices 4       # DDPStrategy keywords
    DDP_HOOK=bf16 python benchmarks/variants.py ... --devices 4      # all-reduce the gradients in bf16
    DDP_HOOK=mean python benchmarks/variants.py ... --devices 4      # one averaging all-reduce a bucket
    DDP_STREAM=current python benchmarks/variants.py ... --devices 2  # DDP built on the backward's stream
    DYNAMO='{"optimize_ddp": false}' python benchmarks/variants.py ... --devices 4   # torch._dynamo.config
    PROFILE=/tmp/prof python benchmarks/variants.py ...   # + a kernel profile of two warm-up steps

DDP replaces dit.benchmark.DDP_OPTIONS (the settings of conf/trainer/ddp.yaml) by its own keywords.
PROFILE profiles warm-up steps warmup-3 and warmup-2 (compiled and CUDA-graphed by then; the
timed window is not profiled; --warmup 3 at least), writes rank 0's Chrome trace there and prints where the GPU time went
(`benchmarks/kernel_summary.py`).
"""

import contextlib
import json
import os
import sys

import torch
from kernel_summary import report, summarize
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

import dit.tools.benchmark as benchmark

PROFILED_STEPS = 2


class ProfilingTimer(benchmark.StepTimer):
    """dit.benchmark's StepTimer that also profiles steps warmup-3 and warmup-2 on rank 0."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.warmup - 1 - PROFILED_STEPS and trainer.is_global_zero:
            self.profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            )
            self.profiler.start()
        super().on_train_batch_start(trainer, module, batch, batch_idx)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)
        if batch_idx == self.warmup - 2 and trainer.is_global_zero:
            benchmark._now(module.device)
            self.profiler.stop()
            path = os.path.join(os.environ["PROFILE"], "trace.json")
            os.makedirs(os.environ["PROFILE"], exist_ok=True)
            self.profiler.export_chrome_trace(path)
            with open(path) as f:
                s = summarize(json.load(f), PROFILED_STEPS)
            print(f"profile of steps {batch_idx + 1 - PROFILED_STEPS}-{batch_idx} on rank 0 ({path}):")
            print(self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
            if s is None:
                print("  no GPU kernels in the trace")
            else:
                report(s, self.train_gflop_per_image * len(batch[1]))  # GFLOP a step (batch: latents, labels)


def allreduce_mean(process_group, bucket):
    """A DDP communication hook: each gradient bucket averaged by NCCL itself (`ReduceOp.AVG`).
    Without a hook, DDP's reducer divides each gradient by the world size, one kernel per
    parameter (2.6 ms a step for DiT-XL/2 on an H200). With any hook, though, it copies each
    gradient into its bucket instead (the compiled backward's gradients are not bucket views):
    slower on 2 GPUs (docs/benchmarks.md), so not the default."""
    work = torch.distributed.all_reduce(
        bucket.buffer(), op=torch.distributed.ReduceOp.AVG, group=process_group, async_op=True
    )
    return work.get_future().then(lambda fut: fut.value()[0])


class CurrentStreamDDPStrategy(DDPStrategy):
    """Lightning's DDPStrategy, but DDP is built on the current stream. Lightning builds it under a
    new side stream (for CUDA-graph capture of a whole step), which binds the AccumulateGrad nodes
    DDP keeps, its gradient hooks and the per-gradient division kernels those launch, to that stream
    rather than the backward's: torch warns of the mismatch at every DDP run ("The AccumulateGrad
    node's stream does not match ...") and makes one stream wait on the other for each gradient.
    Lightning's merged PR #21746 drops the side stream. On 2 H100s it silenced the warning but was
    no faster (763.8 against 770.1 images/s, docs/benchmarks.md), so it stays a variant."""

    def _setup_model(self, model):
        return DistributedDataParallel(module=model, device_ids=self.determine_ddp_device_ids(), **self._ddp_kwargs)


def main():
    for key, value in json.loads(os.environ.get("INDUCTOR", "{}")).items():
        setattr(torch._inductor.config, key, value)
    for key, value in json.loads(os.environ.get("DYNAMO", "{}")).items():
        setattr(torch._dynamo.config, key, value)
    if os.environ.get("PROFILE"):
        args = benchmark.parse_args(sys.argv[1:])
        if args.warmup < 1 + PROFILED_STEPS:
            raise SystemExit(f"PROFILE profiles warm-up steps: give --warmup {1 + PROFILED_STEPS} or more")
        kwargs = benchmark.model_kwargs(args.model, args.image_size)
        ProfilingTimer.train_gflop_per_image = 3 * benchmark.forward_gflop(kwargs)
        benchmark.StepTimer = ProfilingTimer
    if "DDP" in os.environ:
        benchmark.DDP_OPTIONS = json.loads(os.environ["DDP"])
    if os.environ.get("DDP_HOOK") == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

        benchmark.DDP_OPTIONS = {**benchmark.DDP_OPTIONS, "ddp_comm_hook": bf16_compress_hook}
    if os.environ.get("DDP_HOOK") == "mean":
        benchmark.DDP_OPTIONS = {**benchmark.DDP_OPTIONS, "ddp_comm_hook": allreduce_mean}
    if os.environ.get("DDP_STREAM") == "current":
        benchmark.DDPStrategy = CurrentStreamDDPStrategy
    backend = contextlib.nullcontext()
    if os.environ.get("DIT_SDPA"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = sdpa_kernel(
            getattr(
                SDPBackend,
                {
                    "flash": "FLASH_ATTENTION",
                    "cudnn": "CUDNN_ATTENTION",
                    "efficient": "EFFICIENT_ATTENTION",
                    "math": "MATH",
                }[os.environ["DIT_SDPA"]],
            )
        )
    with backend:
        benchmark.main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the figures are out: skip interpreter teardown, where DDP runs have hung at exit


if __name__ == "__main__":
    main()
