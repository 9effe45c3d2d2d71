"""Checkpoint files (dit.training.checkpoints): atomic writes, the checkpoint resume=auto picks,
corrupt ones skipped, the stop checkpoint's signals."""

import os
import signal
import struct
import time

import pytest
import torch

from dit.training.checkpoints import (
    AtomicCheckpointIO,
    StopCheckpoint,
    checkpoint_to_resume,
    read_checkpoint,
)


def fake_checkpoint(step):
    return {"state_dict": {"w": torch.full((64,), float(step))}, "global_step": step, "loops": {}}


def test_both_signals_are_caught():
    """SIGUSR1 (SLURM's warning signal) takes the path SIGTERM takes end to end below."""
    stop = StopCheckpoint("unused")
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        stop.on_train_start(None, None)
        for sig in before:
            os.kill(os.getpid(), sig)
            assert stop.received == sig.name
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(fake_checkpoint(1), path)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        io.save_checkpoint(fake_checkpoint(2), path)
    assert read_checkpoint(path)["global_step"] == 1


def test_resume_auto_takes_the_highest_step_not_the_newest_file(tmp_path):
    io, messages = AtomicCheckpointIO(), []
    io.save_checkpoint(fake_checkpoint(20), tmp_path / "last.ckpt")
    time.sleep(0.01)
    io.save_checkpoint(fake_checkpoint(10), tmp_path / "step=0000010.ckpt")  # an old checkpoint copied in later
    path, checkpoint = checkpoint_to_resume("auto", tmp_path, log=messages.append)
    assert path == str(tmp_path / "last.ckpt") and checkpoint["global_step"] == 20
    assert messages == [f"resume=auto: continuing from {tmp_path / 'last.ckpt'} (step 20)"]


def test_resume_auto_skips_a_checkpoint_with_a_changed_byte(tmp_path):
    io, messages = AtomicCheckpointIO(), []
    io.save_checkpoint(fake_checkpoint(10), tmp_path / "step=0000010.ckpt")
    io.save_checkpoint(fake_checkpoint(20), tmp_path / "step=0000020.ckpt")
    flipped = tmp_path / "step=0000020.ckpt"
    data = bytearray(flipped.read_bytes())
    at = data.index(struct.pack("<f", 20.0) * 3)  # inside the weights' bytes
    data[at] ^= 0x01
    flipped.write_bytes(bytes(data))
    assert torch.load(flipped, weights_only=False)["state_dict"]["w"][0] != 20.0  # torch.load takes it as it is
    path, _ = checkpoint_to_resume("auto", tmp_path, log=messages.append)
    assert path == str(tmp_path / "step=0000010.ckpt")
    assert f"skipping checkpoint {flipped} is corrupt: its record" in messages[0] and "CRC-32" in messages[0]
    with pytest.raises(ValueError, match="fails its CRC-32 check"):
        read_checkpoint(flipped)


def test_resume_auto_falls_back_past_a_corrupt_checkpoint(tmp_path):
    io, messages = AtomicCheckpointIO(), []
    io.save_checkpoint(fake_checkpoint(10), tmp_path / "step=0000010.ckpt")
    time.sleep(0.01)
    io.save_checkpoint(fake_checkpoint(20), tmp_path / "last.ckpt")
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(data[: len(data) // 2])  # truncated, e.g. by a full disk
    assert checkpoint_to_resume("auto", tmp_path, log=messages.append)[0] == str(tmp_path / "step=0000010.ckpt")
    assert "truncated or corrupt" in messages[0] and "continuing from" in messages[1]
    with pytest.raises(ValueError, match="last.ckpt is truncated or corrupt"):
        checkpoint_to_resume(str(tmp_path / "last.ckpt"), tmp_path / "new_run")
    assert checkpoint_to_resume("auto", tmp_path / "empty", log=messages.append) == (None, None)
    (tmp_path / "step=0000010.ckpt").unlink()  # only the truncated one left: refused, not a fresh run over it
    with pytest.raises(ValueError, match=r"no checkpoint of .* can be read \(last.ckpt: truncated or corrupt"):
        checkpoint_to_resume("auto", tmp_path, log=messages.append)
    assert (tmp_path / "last.ckpt").read_bytes() == data[: len(data) // 2]
