"""Runs that survive: atomic checkpoint files, finding the checkpoint to resume from, and a
checkpoint at preemption (the non-finite guard is callbacks/nonfinite_guard.py).

A DiT-XL/2 run is millions of steps on preemptible machines; the official code cannot resume at
all. Here `resume=auto` continues from the readable checkpoint of the run's folder with the
highest step, every checkpoint is checked byte for byte before it is trusted, a SIGTERM/SIGUSR1
saves one and exits with PREEMPTED_EXIT_CODE, and a crash while writing never destroys the last
good checkpoint.
"""

from __future__ import annotations

import os
import signal
import zipfile
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dit.errors import UsageError
from dit.models.diffusers_format import read_folder, transformer_folder

# EX_TEMPFAIL of sysexits.h: "temporary failure, the user is invited to retry" — a scheduler can
# requeue on it (SLURM: `--requeue` and a requeue-on-exit-code wrapper; Kubernetes: a restart policy).
PREEMPTED_EXIT_CODE = 75
# 128 + SIGINT, as a shell reports a job ended by Ctrl-C
INTERRUPTED_EXIT_CODE = 130


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


def check_integrity(path):
    """Every record of a checkpoint file is whole. torch.save writes a zip archive with a CRC-32 per
    record, which torch.load never checks (checked on torch 2.9 and 2.11): a flipped byte loads as a
    wrong weight and surfaces as NaNs thousands of steps later. zipfile reads each record and
    compares its CRC; a truncated file has no zip directory at its end."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError) as err:  # not OSError: a failing disk or mount is not a corrupt file
        raise UsageError(f"checkpoint {path} is truncated or corrupt ({err})") from None
    if bad is not None:
        raise UsageError(f"checkpoint {path} is corrupt: its record {bad} fails its CRC-32 check (a changed byte)")


def load_weights_file(path: str | Path) -> dict:
    """torch.load of any checkpoint this project reads (train.py's, an export, the official file),
    on the CPU, after `check_integrity` where the file is a zip archive (files of torch < 1.6 are
    not); or a diffusers DiT folder (a DiTTransformer2DModel's or a DiTPipeline's, e.g. of
    `dit.export --format diffusers`), read into the same layout as an export. A missing or
    unreadable file raises a UsageError that names it."""
    path = Path(path)
    if path.is_dir() and transformer_folder(path) is not None:
        return read_folder(path)
    if not path.is_file():
        folder = " (a folder, but no diffusers DiT folder: no DiT config.json in it or its transformer/)"
        raise UsageError(f"no checkpoint file at {path}" + (folder if path.is_dir() else ""))
    if zipfile.is_zipfile(path):
        check_integrity(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except OSError:
        raise
    except Exception as err:  # a corrupt pickle, a file that is no checkpoint at all, ...
        raise UsageError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from None


def read_checkpoint(path: str | Path, verify: bool = True) -> dict | None:
    """A train.py checkpoint, loaded on the CPU with its tensors memory-mapped (nothing large is
    read), after `check_integrity` when `verify`. Raises a UsageError that says what is wrong."""
    if not Path(path).is_file():
        raise UsageError(f"no checkpoint file at {path}")
    if verify:
        check_integrity(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except OSError:
        raise  # the disk or the mount failed: resume=auto must not fall back past a good checkpoint
    except Exception as err:  # a truncated zip, a corrupt pickle, ... all mean the same here
        raise UsageError(f"checkpoint {path} is truncated or corrupt ({type(err).__name__}: {err})") from None
    missing = {"state_dict", "global_step", "loops"} - set(checkpoint if isinstance(checkpoint, dict) else ())
    if missing:
        raise UsageError(f"{path} is not a training checkpoint of train.py (it lacks {', '.join(sorted(missing))})")
    return checkpoint


def remove_stale_temporaries(folder, log=print):
    """Delete the temporary files of checkpoint writes that never finished (a process killed while
    writing: GBs each at XL size). Called while this process holds the run's lock, when no write
    of this run is under way."""
    for tmp in sorted(Path(folder).glob("*.tmp")) if Path(folder).is_dir() else []:
        log(f"removing {tmp}, left by a checkpoint write that did not finish ({tmp.stat().st_size / 2**20:.0f} MiB)")
        tmp.unlink(missing_ok=True)


def checkpoint_to_resume(resume: str | None, folders, log=print) -> tuple[str | None, dict | None]:
    """(path, checkpoint) a run starts from: (None, None) for a fresh run; for "auto", the
    readable checkpoint of the run's checkpoint folders with the highest step (last.ckpt wins a
    tie), skipping corrupt ones with a message; or the path given, which starts a new run (a
    branch) and so must go to folders that hold no checkpoints yet."""
    folders = [Path(f) for f in ([folders] if isinstance(folders, (str, Path)) else folders)]
    existing = sorted(p for f in dict.fromkeys(folders) if f.is_dir() for p in f.glob("*.ckpt"))
    folder = folders[0]
    if resume is None:
        if existing:
            raise UsageError(
                f"{folder} already holds checkpoints of an earlier run; pass resume=auto to continue it, "
                "or give this run another name= (nothing was overwritten)"
            )
        return None, None
    if resume != "auto":
        if existing:
            raise UsageError(
                f"resume={resume} would start from that checkpoint inside {folder}, which already holds this run's "
                "checkpoints and would be overwritten; continue the run there with resume=auto, or branch into a "
                "new run folder with another name="
            )
        return str(resume), read_checkpoint(resume)
    readable = []
    for path in existing:
        try:
            checkpoint = read_checkpoint(path, verify=False)
        except UsageError as err:
            log(f"resume=auto: skipping {err}")
            continue
        readable.append((checkpoint["global_step"], path.name == "last.ckpt", path, checkpoint))
    for step, _, path, checkpoint in sorted(readable, key=lambda r: r[:2], reverse=True):
        try:
            check_integrity(path)
        except UsageError as err:
            log(f"resume=auto: skipping {err}")
            continue
        log(f"resume=auto: continuing from {path} (step {step})")
        return str(path), checkpoint
    if existing:  # a fresh run would overwrite them: a half-copied file is no reason to start over
        raise UsageError(
            f"resume=auto: no checkpoint of {folder} can be read ({', '.join(p.name for p in existing)}: truncated "
            "or corrupt, the lines above say how); nothing was overwritten: restore a good copy, or move them away "
            "to start the run afresh"
        )
    log(f"resume=auto: no checkpoint in {folder} yet, starting a fresh run")
    return None, None


class StopCheckpoint(Callback):
    """Saves `last.ckpt` wherever a run stops between ModelCheckpoint's every-N-steps saves:

    - on SIGTERM or SIGUSR1 (spot instances, TPU VMs, SLURM's warning signal) it finishes the current
      step, saves and stops; train.py then exits with PREEMPTED_EXIT_CODE;
    - on Ctrl-C (SIGINT) the same, exiting with INTERRUPTED_EXIT_CODE; a second Ctrl-C, or one once
      the steps are over, quits at once (KeyboardInterrupt, as Python's own handler);
    - at the final step, before the EMA callback copies the average into the model at train end,
      so a finished run holds both weights and can be extended exactly.
    """

    def __init__(self, dirpath, signals=("SIGTERM", "SIGUSR1", "SIGINT")):
        self.dirpath = Path(dirpath)
        self.signals = [getattr(signal, name) for name in signals]
        self.received = None  # the signal's name, once one arrived
        self.saved = None  # the checkpoint written because of it
        self.stepping = False  # between the first and the last training step
        self.previous = {}

    def on_train_start(self, trainer, pl_module):
        # Installed after Lightning's own handlers, replacing its SIGTERM exception with a clean save.
        self.stepping = True
        for sig in self.signals:
            self.previous[sig] = signal.signal(sig, self._handle)

    def teardown(self, trainer, pl_module, stage):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if not self.stepping or self.received is not None:
                raise KeyboardInterrupt
            print("\nCtrl-C: saving last.ckpt at the end of this step, then stopping (Ctrl-C again quits without it)")
        self.received = signal.Signals(signum).name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # fast_dev_run (debug=fdr) checks a config and writes no checkpoint, as Lightning's own callbacks
        if 0 < trainer.max_steps <= trainer.global_step and not trainer.fast_dev_run:
            self.stepping = False
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
            self.stepping = False
            trainer.should_stop = True
            trainer.limit_val_batches = 0  # Lightning would draw a sample grid before stopping: no time for it
