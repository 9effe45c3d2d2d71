"""The EMA of the weights (decay 0.9999, updated after every step: paper §4, the official train.py) as
Lightning's `WeightAveraging`, with an update that never waits for the device.

torch's `AveragedModel.update_parameters` keeps its count of updates in a device tensor and tests
it on the host twice an update (`bool(n_averaged == 0)`, `n_averaged > 0`). Each test waits until
the GPU has finished the step, and the GPU then idles while the host launches the next one: for
DiT-XL/2 at batch 32 on an H200 the two reads cost 5 ms of a 69 ms step (docs/benchmarks.md).
Here the count lives on the host; the update is the same foreach arithmetic, bit for bit. (Moving
torch's count to the host is not enough on a GPU: its update copies the count to the device every
time, a blocking copy.)
"""

import itertools
from collections import defaultdict

import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dit.platform.compat import foreach_copy, set_averaged_model, weight_averaging_options


class EMAUpdate:
    """torch's EMA update (`get_ema_multi_avg_fn`) as an object that pickles: torch_xla sends the
    trainer, callbacks included, to each worker process of a TPU host by pickling it (a v3-8: one
    process per chip), and torch's update is a closure, which does not pickle."""

    def __init__(self, decay):
        self.decay = decay

    def __call__(self, ema_params, current_params, num_averaged):
        get_ema_multi_avg_fn(self.decay)(ema_params, current_params, num_averaged)


class HostCountAveragedModel(AveragedModel):
    """AveragedModel whose count of updates is a host tensor, so an update reads nothing back
    from the device. `multi_avg_fn` is required (it gets the count as that host tensor; the EMA
    ignores it)."""

    def __init__(self, model, multi_avg_fn, device=None, use_buffers=False):
        super().__init__(model, device=device, multi_avg_fn=multi_avg_fn, use_buffers=use_buffers)
        self.n_averaged = torch.tensor(0, dtype=torch.long, device="cpu")  # still a buffer: checkpoints keep it

    def update_parameters(self, model):
        def tensors(m):
            return itertools.chain(m.parameters(), m.buffers()) if self.use_buffers else m.parameters()

        # Under FSDP both sides are DTensors of the same layout: the arithmetic runs on each
        # rank's shards (torch's foreach kernels take no DTensors, torch 2.9-2.11).
        averaged = [_local(p.detach()) for p in tensors(self.module)]
        current = [_local(p.detach()).to(a.device) for p, a in zip(tensors(model), averaged)]
        if self.n_averaged.item() == 0:  # a host tensor: no wait
            foreach_copy(averaged, current)
        else:
            groups = defaultdict(lambda: ([], []))  # foreach kernels take one device and dtype, as in torch
            for a, c in zip(averaged, current):
                groups[a.device, a.dtype][0].append(a)
                groups[a.device, a.dtype][1].append(c)
            for mine, theirs in groups.values():
                self.multi_avg_fn(mine, theirs, self.n_averaged)
        if not self.use_buffers:  # buffers follow the model, as in torch's update
            for mine, theirs in zip(self.module.buffers(), model.buffers()):
                mine.detach().copy_(theirs.detach().to(mine.device))
        self.n_averaged += 1


class EMA(WeightAveraging):
    """Lightning's WeightAveraging (its `device`, `use_buffers` and `multi_avg_fn`; the same
    checkpoint contents) averaging through `HostCountAveragedModel`. The defaults are the paper's
    EMA: decay 0.9999 after every step, parameters only (DiT has no buffers to average). Unlike
    Lightning's, it does not build layers of a `configure_model` hook (DiTModule has none)."""

    def __init__(self, device=None, use_buffers=False, multi_avg_fn=None):
        super().__init__(device=device, use_buffers=use_buffers, multi_avg_fn=multi_avg_fn or EMAUpdate(0.9999))

    def setup(self, trainer, pl_module, stage):
        if stage == "fit":
            device, use_buffers, options = weight_averaging_options(self)
            # Under FSDP the model is still whole here: the copy waits on the host until the
            # model's parameters are shards (on_fit_start), and then keeps only this rank's shard.
            sharded = getattr(trainer.strategy, "shards_model", False)
            set_averaged_model(
                self,
                HostCountAveragedModel(
                    pl_module,
                    options["multi_avg_fn"],
                    device="cpu" if sharded else device or pl_module.device,
                    use_buffers=use_buffers,
                ),
            )

    def on_fit_start(self, trainer, pl_module):
        if self._average_model is not None:
            shard_like(self._average_model.module, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        # FSDP: checkpoints hold whole tensors (dit.training.fsdp); every rank takes part in the
        # gathers, rank 0 writes the file.
        for key in ("state_dict", "averaging_state"):
            if key in checkpoint:
                checkpoint[key] = {k: whole(v) for k, v in checkpoint[key].items()}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        if not getattr(trainer.strategy, "shards_model", False):
            return super().on_load_checkpoint(trainer, pl_module, checkpoint)
        # FSDP: every rank has read the whole checkpoint; each keeps its shards. As Lightning's
        # WeightAveraging: `state_dict` holds the EMA, `current_model_state` the trained weights.
        if "current_model_state" in checkpoint and "averaging_state" in checkpoint:
            load_whole(self._average_model.module, checkpoint["state_dict"])
            self._average_model.n_averaged.copy_(checkpoint["averaging_state"]["n_averaged"])
            load_whole(pl_module, checkpoint["current_model_state"])
        else:  # weights of a run without an EMA: both start from them
            load_whole(self._average_model.module, checkpoint["state_dict"])


def _local(tensor):
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def whole(tensor):
    """A DTensor gathered into one host tensor (a collective: every rank calls it); else as it is."""
    return tensor.full_tensor().cpu() if isinstance(tensor, DTensor) else tensor


def _tensors(module):
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        yield name, module.get_submodule(owner), leaf, tensor


def shard_like(copy: torch.nn.Module, model: torch.nn.Module) -> None:
    """Give each parameter of `copy` (a whole replica of `model`) the layout of `model`'s: where
    `model` holds a DTensor shard (FSDP), `copy` keeps the same shard, on the same device. Every
    rank's copy is the same whole tensor, so each cuts its own shard with no communication."""
    theirs = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
    for name, owner, leaf, mine in _tensors(copy):
        target = theirs[name]
        if isinstance(target, DTensor) and not isinstance(mine, DTensor):
            shard = distribute_tensor(
                mine.detach().to(target.device), target.device_mesh, target.placements, src_data_rank=None
            )
            if leaf in owner._parameters:
                owner._parameters[leaf] = torch.nn.Parameter(shard, requires_grad=mine.requires_grad)
            else:
                owner._buffers[leaf] = shard


def load_whole(module: torch.nn.Module, state_dict: dict) -> None:
    """Load whole tensors into `module`, each rank keeping its shard where a tensor is a DTensor."""
    with torch.no_grad():
        for name, owner, leaf, tensor in _tensors(module):
            if name not in state_dict and leaf in owner._buffers:
                continue  # a buffer that state dicts leave out (persistent=False)
            value = state_dict[name]
            if isinstance(tensor, DTensor):
                value = distribute_tensor(
                    value.to(tensor.device, tensor.dtype), tensor.device_mesh, tensor.placements, src_data_rank=None
                )
            tensor.copy_(value)
