"""Fully sharded data parallel training (`trainer=fsdp`): torch's FSDP2 (`fully_shard`) through
Lightning's ModelParallelStrategy, for models whose DDP replica (weights, gradients, AdamW's two
moments and the EMA: 20 bytes a parameter in fp32) does not fit one GPU.

Each DiT block is one FSDP unit (its parameters are gathered for its forward and backward, then
freed); the embedders and the final layer form the root unit. Every rank keeps a 1/world shard of
the weights, the gradients, the optimizer state and the EMA (`callbacks/ema.py`). Gradients are
averaged by a reduce-scatter, where DDP all-reduces: the same mean over all ranks' samples.

Checkpoints are one file, as under DDP: the full weights, EMA and optimizer state gathered on
rank 0 (Lightning's `save_distributed_checkpoint=False`), so dit.sample, dit.export and a resume
on another strategy or world size read them unchanged.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from dit.errors import UsageError

# torch.compile modes with CUDA graphs: a graph cannot hold FSDP's gathers and reduce-scatters,
# which run between the compiled blocks.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class FSDP(ModelParallelStrategy):
    """FSDP2 over every process of every node (data parallel only, no tensor parallelism).

    Args:
        reshard_after_forward: free each block's gathered weights after its forward and gather them
            again for the backward (ZeRO-3, the least memory); false keeps them until the backward
            (ZeRO-2-like: one gather less a step, a block's full weights held from forward to backward).
        process_group_backend, timeout: as Lightning's strategies (nccl on GPUs, gloo on CPUs).
    """

    shards_model = True  # DiTModule.configure_model asks the strategy to shard it

    def __init__(self, reshard_after_forward: bool = True, process_group_backend=None, **kwargs):
        if not isinstance(reshard_after_forward, bool):
            raise UsageError(f"trainer.strategy.reshard_after_forward={reshard_after_forward!r}; give true or false")
        super().__init__(save_distributed_checkpoint=False, process_group_backend=process_group_backend, **kwargs)
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" makes the GPUs of a node a tensor-parallel group; here all
        # of them shard data.
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    # Checkpoints hold the optimizer state as torch's Optimizer.state_dict lays it out, keyed by a
    # parameter's position in the optimizer (DDP's checkpoints, the same file under either
    # strategy). Lightning's ModelParallelStrategy keys it by the position among all of the module's
    # parameters, which the frozen pos_embed shifts by one, and cannot load its own file back
    # (Lightning 2.6.6); both directions are written here instead.

    def optimizer_state(self, optimizer):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        by_name = get_optimizer_state_dict(self.model, optimizer, options=options)  # whole tensors, rank 0
        if not by_name:
            return by_name
        position = {name: i for i, name in enumerate(self._optimizer_names(optimizer))}
        return {
            "state": {position[name]: value for name, value in by_name["state"].items()},
            "param_groups": [
                {**group, "params": [position[name] for name in group["params"]]} for group in by_name["param_groups"]
            ],
        }

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        # Every rank reads the whole file and keeps its shards. `weights_only`: Trainer.fit passes
        # none to a strategy that restores after setup (Lightning 2.6.6), and torch.load's default
        # refuses the run config in train.py's checkpoints; train.py gives False for its own files.
        path = self.broadcast(checkpoint_path)
        checkpoint = torch.load(path, map_location="cpu", weights_only=False if weights_only is None else weights_only)
        options = StateDictOptions(full_state_dict=True, strict=self.lightning_module.strict_loading)
        set_model_state_dict(self.model, checkpoint["state_dict"], options=options)
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
            names = self._optimizer_names(optimizer)
            by_name = {
                "state": {names[i]: value for i, value in state["state"].items()},
                "param_groups": [
                    {**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]
                ],
            }
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=by_name, options=options)
        return checkpoint

    def _optimizer_names(self, optimizer) -> list[str]:
        """The module's name of each parameter of `optimizer`, in the optimizer's order."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]

    def shard(self, model: nn.Module, extra: nn.Module | None = None, compile_mode=None) -> None:
        """Shard a DiT backbone: each block (compiled first, when `compile_mode` is given: the
        blocks are the compiled units under FSDP), then the rest of the backbone; `extra` (an
        objective's trainable modules) as a unit of its own."""
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in model.blocks:
            if compile_mode is not None:
                block.compile(mode=compile_mode)
            fully_shard(block, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        if extra is not None:
            fully_shard(extra, mesh=mesh, reshard_after_forward=self.reshard_after_forward)


def fsdp_compile_mode(compile, device_type: str):
    """The torch.compile mode of the blocks under FSDP for `module.compile`: None for no compile."""
    if compile in CUDA_GRAPH_MODES:
        raise UsageError(
            f"module.compile={compile} uses CUDA graphs, which cannot hold FSDP's collectives between "
            "the blocks; under trainer=fsdp use module.compile=true or max-autotune-no-cudagraphs"
        )
    if compile == "auto":
        return "default" if device_type == "cuda" else None
    if compile is True:
        return "default"
    return compile or None
