"""Skip the updates of non-finite gradients, and stop a run that keeps making them."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch.distributed.tensor import DTensor

from dit.platform.compat import skip_update_where


class NonFiniteGuard(Callback):
    """A NaN/Inf in the gradients skips that update and is counted; `max_in_a_row` in a row save the
    last good state as last.ckpt and stop the run (0: no guard). It also logs the gradient norm
    it checks, as `train/grad_norm`, on the steps Lightning logs.

    The check needs the total gradient norm, a device value. With a fused optimizer (AdamW on CUDA
    or a CPU) the skip happens on the device (`found_inf`) and the counts are read on the host once
    per logging interval; with any other optimizer the norm is read on the host every step and a
    bad step's gradients are dropped (the optimizer then skips every parameter). The gradients are
    those after DDP's all-reduce, the same on every rank, so all ranks skip together; under FSDP
    each rank holds a shard of them, and the norm is the total over the shards, on every rank.
    """

    def __init__(self, max_in_a_row: int = 10):
        self.max_in_a_row = max_in_a_row
        self.total = 0  # updates skipped, over the whole run (saved in checkpoints)
        self.in_a_row = 0
        self._on_device = None  # (in a row, longest since the last check, total) as device tensors

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        logged = (trainer.global_step + 1) % trainer.log_every_n_steps == 0  # a step Lightning logs
        if not (logged or self.max_in_a_row):
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(norm, DTensor):  # FSDP: each rank holds a shard's norm; the total, on every rank
            norm = norm.full_tensor()
        if logged:
            pl_module.log("train/grad_norm", norm)
        if not self.max_in_a_row:
            return
        bad = ~torch.isfinite(norm)
        if getattr(optimizer, "defaults", {}).get("fused"):
            skip_update_where(optimizer, bad.float())
            if self._on_device is None:
                zero = torch.zeros((), dtype=torch.long, device=norm.device)
                self._on_device = (zero, zero.clone(), torch.tensor(self.total, device=norm.device))
            in_a_row, longest, total = self._on_device
            in_a_row = torch.where(bad, in_a_row + 1, 0)
            self._on_device = (in_a_row, torch.maximum(longest, in_a_row), total + bad)
        elif bool(bad):  # a host read per step
            for p in pl_module.parameters():
                p.grad = None
            self.in_a_row += 1
            self.total += 1
            pl_module.log("train/nonfinite_skipped", float(self.total))
            print(
                f"step {trainer.global_step}: non-finite gradients, update skipped "
                f"({self.in_a_row} in a row of {self.max_in_a_row} allowed)"
            )
            if self.in_a_row >= self.max_in_a_row:
                self._stop(
                    trainer,
                    f"{self.in_a_row} updates in a row had non-finite gradients (at step {trainer.global_step})",
                )
        else:
            self.in_a_row = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        """Once per logging interval, for the fused path: report the updates skipped since the last
        check; stop the run once `max_in_a_row` came in a row."""
        if self._on_device is None or trainer.global_step % trainer.log_every_n_steps:
            return
        in_a_row, longest, total = self._on_device
        skipped, longest_seen = int(total), int(longest)
        if skipped > self.total:
            print(
                f"step {trainer.global_step}: {skipped - self.total} updates skipped since the last check for "
                f"non-finite gradients (at most {longest_seen} in a row; {self.max_in_a_row} allowed)"
            )
            self.total = skipped
            pl_module.log("train/nonfinite_skipped", torch.tensor(float(skipped)))
        if longest_seen >= self.max_in_a_row:
            self._stop(
                trainer, f"{longest_seen} updates in a row had non-finite gradients (by step {trainer.global_step})"
            )
        self._on_device = (in_a_row, in_a_row.clone(), total)  # "in a row" counts from here on

    def _stop(self, trainer, what):
        """Save the state as last.ckpt and stop: skipped updates left the weights at the last good step."""
        path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(path)
        raise FloatingPointError(
            f"{what}; the last good state is saved in {path}. Lower the learning rate or use fp32 "
            "(trainer.precision=32-true), then resume=auto accept_changes=true"
        )

    def state_dict(self):
        return {"total": self.total if self._on_device is None else int(self._on_device[2])}

    def load_state_dict(self, state_dict):
        self.total = state_dict["total"]
