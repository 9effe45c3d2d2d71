"""Runs that survive: atomic checkpoint files, finding the checkpoint to resume from, preemption,
and a guard against non-finite losses.

A DiT-XL/2 run is millions of steps on preemptible machines; the official code cannot resume at
all. Here `resume=auto` continues from the newest readable checkpoint of the run's folder, a
SIGTERM/SIGUSR1 saves one and exits with PREEMPTED_EXIT_CODE, and a crash while writing never
destroys the last good checkpoint.
"""

import os
import signal
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

# EX_TEMPFAIL of sysexits.h: "temporary failure, the user is invited to retry" — a scheduler can
# requeue on it (SLURM: `--requeue` and a requeue-on-exit-code wrapper; Kubernetes: a restart policy).
PREEMPTED_EXIT_CODE = 75


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file, syncs it to disk, then renames it over the target:
    a crash or preemption while writing leaves the previous file whole."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if "://" in str(path):  # object stores: fsspec's own write
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Per process: at the end of a fit Lightning's XLA launcher has every process write the same file.
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def read_checkpoint(path):
    """Load a training checkpoint on the CPU, or raise a ValueError that says it is unreadable."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {path}") from None
    except Exception as err:  # a truncated zip, a corrupt pickle, ... all mean the same here
        raise ValueError(f"checkpoint {path} is truncated or corrupt ({type(err).__name__}: {err})") from None
    missing = {"state_dict", "global_step", "loops"} - set(checkpoint)
    if missing:
        raise ValueError(f"{path} is not a training checkpoint of train.py (it lacks {', '.join(sorted(missing))})")
    return checkpoint


def checkpoint_to_resume(resume, folder, log=print):
    """The checkpoint a run starts from: None for a fresh run, the newest readable checkpoint in
    `folder` for "auto" (falling back past corrupt ones, saying so), or the path given."""
    folder = Path(folder)
    existing = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []
    if resume is None:
        if existing:
            raise FileExistsError(
                f"{folder} already holds checkpoints of an earlier run; pass resume=auto to continue it, "
                "or give this run another name= (nothing was overwritten)"
            )
        return None
    if resume != "auto":
        read_checkpoint(resume)
        return str(resume)
    for path in existing:
        try:
            read_checkpoint(path)
        except ValueError as err:
            log(f"resume=auto: skipping {err}")
            continue
        log(f"resume=auto: continuing from {path}")
        return str(path)
    log(f"resume=auto: no checkpoint in {folder} yet, starting a fresh run")
    return None


class StopCheckpoint(Callback):
    """Saves `last.ckpt` wherever a run stops between ModelCheckpoint's every-N-steps saves:

    - on SIGTERM or SIGUSR1 (spot instances, TPU VMs, SLURM's warning signal) it finishes the current
      step, saves and stops; train.py then exits with PREEMPTED_EXIT_CODE;
    - at the final step, before the EMA callback copies the average into the model at train end,
      so a finished run holds both weights and can be extended exactly.
    """

    def __init__(self, dirpath, signals=("SIGTERM", "SIGUSR1")):
        self.dirpath = Path(dirpath)
        self.signals = [getattr(signal, name) for name in signals]
        self.received = None  # the signal's name, once one arrived
        self.saved = None  # the checkpoint written because of it

    def on_train_start(self, trainer, pl_module):
        # Installed after Lightning's own handlers, replacing its SIGTERM exception with a clean save.
        for sig in self.signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.save_checkpoint(self.dirpath / "last.ckpt")
            return
        received = self.received is not None
        if trainer.world_size > 1:
            # Any rank signalled: all stop at the same step. Asked every 10 steps, not every step,
            # since the answer is a host sync; a grace period is seconds to minutes long.
            if trainer.global_step % 10:
                return
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if received and self.saved is None:
            self.received = self.received or "a signal on another rank"
            self.saved = self.dirpath / "last.ckpt"
            trainer.save_checkpoint(self.saved)
            trainer.should_stop = True
            trainer.limit_val_batches = 0  # Lightning would draw a sample grid before stopping: no time for it
