"""Training throughput, logged as `train/steps_per_sec` and `train/images_per_sec`."""

import time

import torch
from lightning.pytorch.callbacks import Callback


class Throughput(Callback):
    """Steps and images per second over each logging interval, with one device sync per interval.

    Lightning's ThroughputMonitor synchronizes CUDA at every step (lightning 2.6.6,
    `ThroughputMonitor._update`), which takes away the overlap of the host launching the next
    step while the device runs this one; at the paper's 32 images per GPU that overlap is most of
    the speed of a compiled step."""

    def __init__(self):
        self._last = None  # (time, step) at the last logged step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % trainer.log_every_n_steps:  # the step just taken is not logged
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        now, step = time.perf_counter(), trainer.global_step
        if self._last is not None and step > self._last[1]:
            steps_per_sec = (step - self._last[1]) / (now - self._last[0])
            images = batch[0].shape[0] * trainer.world_size
            # Host values logged as CPU tensors: a float would become a device tensor, and on XLA
            # its bookkeeping would change the next step's graph (a recompilation).
            pl_module.log("train/steps_per_sec", torch.tensor(steps_per_sec))
            pl_module.log("train/images_per_sec", torch.tensor(steps_per_sec * images))
        self._last = (now, step)
