"""The RNG states of an exact resume."""

import random

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


class RNGState(Callback):
    """Saves every RNG a training step draws from (torch, CUDA, numpy, Python) in each checkpoint
    (`checkpoint["rng"]`) and restores them on resume, so a resumed run repeats the same steps
    bit for bit (tests/training/test_resume.py)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["rng"] = dict(
            torch=torch.get_rng_state(),
            cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            numpy=np.random.get_state(),
            python=random.getstate(),
        )

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        rng = checkpoint.get("rng")
        if rng is None:
            return
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
