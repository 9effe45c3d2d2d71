"""The pieces Lightning's XLA (TPU) path needs beyond its own: bf16 autocast, atomic checkpoints,
an EMA that survives torch_xla's buffer donation, and an accelerator that runs that same path on
torch_xla's CPU runtime, for tests.

conf/trainer/tpu_v3.yaml (and, for tests, xla_cpu.yaml) name them; train.py needs nothing else.
"""

import os

import torch
from lightning.fabric.plugins import XLACheckpointIO
from lightning.pytorch.accelerators import XLAAccelerator
from lightning.pytorch.plugins.precision import XLAPrecision

from dit.platform.compat import averaged_model, xla_to_cpu
from dit.training.callbacks.ema import EMA
from dit.training.checkpoints import AtomicCheckpointIO


class XLABf16AutocastPrecision(XLAPrecision):
    """bf16 autocast on XLA with fp32 weights and optimizer state (as `bf16-mixed` on a GPU).

    Lightning's own "bf16-true" sets XLA_USE_BF16, which torch_xla deprecated after 2.6 ("convert
    your model to bf16 directly"), which turns every fp32 tensor into bf16, the diffusion schedule
    and loss included, and which torch_xla's Pallas flash-attention kernel refuses to run under.
    """

    def __init__(self):
        super().__init__("32-true")
        self.precision = "bf16-mixed"

    def forward_context(self):
        return torch.autocast("xla", dtype=torch.bfloat16)


class AtomicXLACheckpointIO(AtomicCheckpointIO, XLACheckpointIO):
    """AtomicCheckpointIO for Lightning's XLA strategies, which accept only an XLACheckpointIO:
    the same temporary-file-then-rename write, of a checkpoint whose tensors are moved to the
    CPU first, so it loads anywhere with `torch.load(..., map_location="cpu")`."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        from lightning.fabric.utilities.apply_func import apply_to_collection
        from omegaconf import DictConfig, ListConfig, OmegaConf

        # OmegaConf containers do not survive xm's CPU copy (pytorch/xla#2773): plain dicts first.
        checkpoint = apply_to_collection(checkpoint, (DictConfig, ListConfig), OmegaConf.to_container)
        super().save_checkpoint(xla_to_cpu(checkpoint), path, storage_options)


class XLAWeightAveraging(EMA):
    """The EMA (dit.training.callbacks.ema: its count of averages stays on the host, so no step waits for the
    device to read it) with a fix for torch_xla 2.9's buffer sharing.

    On XLA, copying one device tensor into another (the average's first update, its deepcopy)
    makes both share one buffer, and the next in-place update of one donates that buffer, deleting
    the other's data ("buffer ... is deleted"). The optimizer rewrites every trainable parameter in
    the same graph, so only frozen ones (DiT's pos_embed) break: they get their own buffer here.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        for param in averaged_model(self).parameters():
            if not param.requires_grad:
                param.data = param.data + 0  # a new buffer, computed in the next graph


class CPURuntimeXLAAccelerator(XLAAccelerator):
    """FOR TESTS: Lightning's XLA accelerator on torch_xla's CPU runtime (PJRT_DEVICE=CPU).

    Lightning's availability check counts TPU chips (and asks the cloud's metadata server, which
    fails off a TPU VM). This accepts the CPU runtime instead; everything else — strategy,
    precision, checkpoint IO, the module's step — is the code a TPU runs (conf/trainer/xla_cpu.yaml).
    """

    @staticmethod
    def is_available():
        return os.environ.get("PJRT_DEVICE") == "CPU"

    @staticmethod
    def auto_device_count():
        return 1

    # Lightning checks a device count against the TPU chips it finds: the CPU runtime has none.
    @staticmethod
    def parse_devices(devices):
        return int(devices)

    @staticmethod
    def get_parallel_devices(devices):
        return [torch.device("xla", i) for i in range(int(devices))]
