"""`python -m dit.benchmark` under a variant of the step that has no switch of its own, chosen by
environment variables; how the variant rows of docs/benchmarks.md were measured.

    DIT_SDPA=cudnn python benchmarks/variants.py --model DiT-XL/2 --batch-size 32     # one SDPA backend
    INDUCTOR='{"coordinate_descent_tuning": true}' python benchmarks/variants.py ...  # torch._inductor.config
    DDP='{"bucket_cap_mb": 250}' python benchmarks/variants.py ... --devices 4       # DDPStrategy keywords
    DDP_HOOK=bf16 python benchmarks/variants.py ... --devices 4      # all-reduce the gradients in bf16

DDP replaces dit.benchmark.DDP_OPTIONS (the settings of conf/trainer/ddp.yaml) by its own keywords.
"""

import contextlib
import json
import os
import sys

import torch

import dit.benchmark as benchmark


def main():
    for key, value in json.loads(os.environ.get("INDUCTOR", "{}")).items():
        setattr(torch._inductor.config, key, value)
    if "DDP" in os.environ:
        benchmark.DDP_OPTIONS = json.loads(os.environ["DDP"])
    if os.environ.get("DDP_HOOK") == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

        benchmark.DDP_OPTIONS = {**benchmark.DDP_OPTIONS, "ddp_comm_hook": bf16_compress_hook}
    backend = contextlib.nullcontext()
    if os.environ.get("DIT_SDPA"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = sdpa_kernel(getattr(SDPBackend, {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                                                   "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}[os.environ["DIT_SDPA"]]))  # fmt: skip
    with backend:
        benchmark.main(sys.argv[1:])


if __name__ == "__main__":
    main()
