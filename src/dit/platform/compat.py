"""Every private name of a library this project uses, in one place, with the versions it was read
in. A library upgrade that renames one breaks here, by name, rather than somewhere in training.

Checked on: torch 2.9.1 and 2.11, lightning 2.6.6, litdata 0.2.76, torch_xla 2.9.0, hydra-core
1.3.2 and 1.3.8.
"""

from __future__ import annotations

from typing import Any

import torch


# ---------------------------------------------------------------- litdata 0.2.76 (pinned below 0.3)
def litdata_numpy_dtypes() -> dict:
    """litdata's NumpySerializer writes a dtype's index into this table ahead of each array;
    reading a record without litdata's copy (dit.data.shards.PosteriorView) needs the same table
    (litdata.constants._NUMPY_DTYPES_MAPPING)."""
    from litdata.constants import _NUMPY_DTYPES_MAPPING

    return _NUMPY_DTYPES_MAPPING


def end_loader_restore(loader: Any) -> None:
    """litdata's StreamingDataLoader replays the position `load_state_dict` restored at every
    `__iter__` until one epoch of it ends in StopIteration (its `restore` flag), which Lightning never
    asks for: it knows the epoch's length and stops first. Clearing the flag once the restored epoch
    has begun makes the next epoch a new one (litdata 0.2.76, StreamingDataLoader.restore)."""
    loader.restore = False


# ---------------------------------------------------------------- torch 2.9.1, 2.11


def new_shared_storage(size: int) -> torch.UntypedStorage:
    """A fresh block of CPU shared memory of `size` bytes, as torch's DataLoader workers make for a
    batch (torch.UntypedStorage._new_shared)."""
    return torch.UntypedStorage._new_shared(size)


def foreach_copy(destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """One fused copy of many tensors (torch._foreach_copy_, what torch's own optimizers use)."""
    torch._foreach_copy_(destinations, sources)


def skip_update_where(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """Fused Adam/AdamW skip their whole update (weights, moments, step count) on the device where
    `found_inf` is 1: the attribute the step reads (`getattr(self, "found_inf", None)`, which
    torch's GradScaler sets the same way)."""
    optimizer.found_inf = found_inf


# ---------------------------------------------------------------- lightning 2.6.6


def averaged_model(callback: Any) -> torch.nn.Module | None:
    """The averaged copy that Lightning's `WeightAveraging` keeps (an `AveragedModel` of the whole
    LightningModule), or None before `setup`: Lightning offers no public accessor."""
    return callback._average_model


def set_averaged_model(callback: Any, model: torch.nn.Module) -> None:
    callback._average_model = model


def weight_averaging_options(callback: Any) -> tuple[Any, Any, dict]:
    """(device, use_buffers, the AveragedModel keywords) that `WeightAveraging.__init__` stored."""
    return callback._device, callback._use_buffers, callback._kwargs


def replace_hydra_subprocess_command(command_builder: Any) -> None:
    """Lightning starts the DDP processes of a Hydra app with a command of its own
    (`lightning.pytorch.strategies.launchers.subprocess_script._hydra_subprocess_cmd`); train.py
    gives them one that re-reads this launch's config instead."""
    import lightning.pytorch.strategies.launchers.subprocess_script as launcher

    launcher._hydra_subprocess_cmd = command_builder


# ---------------------------------------------------------------- torch_xla 2.9.0


def xla_to_cpu(checkpoint: Any) -> Any:
    """A checkpoint's XLA tensors copied to the CPU (what XLACheckpointIO saves through)."""
    import torch_xla.core.xla_model as xm

    return xm._maybe_convert_to_cpu(checkpoint, convert=True)


# ---------------------------------------------------------------- hydra-core 1.3


def failed_job_error(job_return: Any) -> BaseException:
    """The exception a failed Hydra job raised (JobReturn._return_value; its public `return_value`
    re-raises it)."""
    return job_return._return_value


def parse_overrides(overrides: list[str]) -> list[Any]:
    """Hydra's own parser of command-line overrides (hydra.core.override_parser), which its
    launchers use to expand a sweep."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(overrides)
