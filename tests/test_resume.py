"""Runs that survive: exact resume after SIGKILL, preemption by signal, atomic and corrupt
checkpoints, the non-finite loss guard, and a named run that is never overwritten."""

import csv
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dit.checkpoints import PREEMPTED_EXIT_CODE, AtomicCheckpointIO, checkpoint_to_resume, read_checkpoint
from test_training import ROOT, run_train

SHORT = ["experiment=quickstart", "trainer.val_check_interval=1000", "~callbacks.digits_accuracy", "trainer.log_every_n_steps=1",
         "callbacks.checkpoint.every_n_train_steps=10", "callbacks.progress_bar.refresh_rate=0"]  # fmt: skip


def args(digits_dir, *extra):
    return [*SHORT, f"data.path={digits_dir}", *extra]


def losses(run_dir):
    """step -> train/loss, the last value logged for each step (a resumed run re-logs a few)."""
    found = {}
    for part in sorted((run_dir / "csv").glob("version_*/metrics.csv")):  # one per launch, in order
        with open(part) as f:
            found |= {int(r["step"]): r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")}
    return found


def weights(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return ckpt["global_step"], ckpt["state_dict"], ckpt["current_model_state"], ckpt["optimizer_states"][0]


def test_resume_after_sigkill_is_exact(tmp_path, digits_dir):
    steps = "trainer.max_steps=45"
    full = run_train(args(digits_dir, steps, "name=full"), cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]

    env_cmd = [sys.executable, str(ROOT / "train.py"), *args(digits_dir, steps, "name=killed")]
    proc = subprocess.Popen(env_cmd, cwd=tmp_path, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "outputs" / "killed" / "checkpoints" / "step=0000010.ckpt"
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 1.5))  # somewhere between checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted((tmp_path / "outputs" / "killed" / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" not in [p.name for p in saved], "the run finished before it was killed"

    resumed = run_train(args(digits_dir, steps, "name=killed", "resume=auto"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume=auto: continuing from" in resumed.stdout

    a, b = weights(tmp_path / "outputs" / "full"), weights(tmp_path / "outputs" / "killed")
    assert a[0] == b[0] == 45
    for theirs, ours in [(a[1], b[1]), (a[2], b[2])]:  # EMA and live weights, bitwise
        assert theirs.keys() == ours.keys()
        for k in theirs:
            assert torch.equal(theirs[k], ours[k]), k
    for k, state in a[3]["state"].items():  # AdamW moments
        assert torch.equal(state["exp_avg"], b[3]["state"][k]["exp_avg"])
    assert losses(tmp_path / "outputs" / "full") == losses(tmp_path / "outputs" / "killed")


def run_env():
    import os

    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), HYDRA_FULL_ERROR="1")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_a_checkpoint_and_exits_for_requeue(tmp_path, digits_dir, sig):
    cmd = [sys.executable, str(ROOT / "train.py"), *args(digits_dir, "trainer.max_steps=100000", "name=pre")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "outputs" / "pre" / "checkpoints" / "step=0000010.ckpt"
    deadline = time.time() + 300
    while not metrics.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    signalled = time.time()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert time.time() - signalled < 30  # within a grace period: no sample grid drawn on the way out
    assert f"received {sig.name}" in out
    ckpt = read_checkpoint(tmp_path / "outputs" / "pre" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] >= 10
    # ...and resume=auto continues from it
    again = run_train(args(digits_dir, f"trainer.max_steps={ckpt['global_step'] + 3}", "name=pre", "resume=auto"),
                      cwd=tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert read_checkpoint(tmp_path / "outputs" / "pre" / "checkpoints" / "last.ckpt")["global_step"] == ckpt["global_step"] + 3


def test_named_run_is_never_overwritten(tmp_path, digits_dir):
    first = run_train(args(digits_dir, "trainer.max_steps=10", "name=mine"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_train(args(digits_dir, "trainer.max_steps=10", "name=mine"), cwd=tmp_path)
    assert second.returncode != 0 and "already holds checkpoints of an earlier run; pass resume=auto" in second.stderr
    third = run_train(args(digits_dir, "trainer.max_steps=10", "resume=auto"), cwd=tmp_path)
    assert third.returncode != 0 and "give the run a name (name=...)" in third.stderr


def fake_checkpoint(step):
    return {"state_dict": {"w": torch.full((3,), float(step))}, "global_step": step, "loops": {}}


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


def test_resume_auto_falls_back_past_a_corrupt_checkpoint(tmp_path):
    io, messages = AtomicCheckpointIO(), []
    io.save_checkpoint(fake_checkpoint(10), tmp_path / "step=0000010.ckpt")
    time.sleep(0.01)
    io.save_checkpoint(fake_checkpoint(20), tmp_path / "last.ckpt")
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(data[: len(data) // 2])  # truncated, e.g. by a full disk
    assert checkpoint_to_resume("auto", tmp_path, log=messages.append) == str(tmp_path / "step=0000010.ckpt")
    assert "truncated or corrupt" in messages[0] and "continuing from" in messages[1]
    with pytest.raises(ValueError, match="last.ckpt is truncated or corrupt"):
        checkpoint_to_resume(str(tmp_path / "last.ckpt"), tmp_path)
    assert checkpoint_to_resume("auto", tmp_path / "empty", log=messages.append) is None


@pytest.mark.parametrize("skip", ["on_device", "host_read"])
def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path, digits_dir, skip):
    """lr = 1e30 blows the weights up within a few steps; the guard skips, counts, then stops.
    Fused AdamW (the default) skips on the device, counted once per logging interval; another
    optimizer falls back to a host read of the loss every step."""
    extra = ["+module.optimizer.fused=false"] if skip == "host_read" else []
    result = run_train(args(digits_dir, "trainer.max_steps=200", "name=nan", "module.optimizer.lr=1e30",
                            "module.max_nonfinite_in_a_row=3", "trainer.log_every_n_steps=10", *extra), cwd=tmp_path)  # fmt: skip
    assert result.returncode != 0
    if skip == "host_read":
        assert "non-finite loss, update skipped (1 in a row of 3 allowed)" in result.stdout
        assert "3 non-finite losses in a row" in result.stderr
    else:
        assert re.search(r"step 10: \d+ updates skipped since the last check for non-finite gradients", result.stdout)
        assert re.search(r"\d+ updates in a row had non-finite gradients \(by step 10\)", result.stderr)
    assert "resume=auto" in result.stderr
    ckpt = read_checkpoint(tmp_path / "outputs" / "nan" / "checkpoints" / "last.ckpt")
    assert ckpt["nonfinite_total"] >= 3 and ckpt["global_step"] < 200
    assert all(torch.isfinite(v).all() for v in ckpt["current_model_state"].values())  # the last good weights


def test_rerun_sweep_with_resume_finishes_only_what_is_missing(tmp_path, digits_dir):
    missing = tmp_path / "later"  # job 1's data appears only after the first attempt
    sweep = ["-m", *args(digits_dir, "trainer.max_steps=3", "name=sw", "logger=csv", "data.prepare=null"),
             f"data.path={digits_dir},{missing}"]
    first = run_train(sweep, cwd=tmp_path)
    assert first.returncode != 0 and "1 of 2 jobs of the sweep failed" in first.stderr
    done = tmp_path / "multirun" / "sw" / "0" / "checkpoints" / "last.ckpt"
    stamp = done.stat().st_mtime_ns
    import shutil

    shutil.copytree(digits_dir, missing)
    again = run_train([*sweep, "resume=auto"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert done.stat().st_mtime_ns == stamp  # the finished job was not trained again
    assert read_checkpoint(tmp_path / "multirun" / "sw" / "1" / "checkpoints" / "last.ckpt")["global_step"] == 3


def test_resumed_wandb_run_keeps_its_id(tmp_path, digits_dir):
    first = run_train(args(digits_dir, "trainer.max_steps=3", "name=w", "logger=wandb"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = (tmp_path / "outputs" / "w" / "wandb_run_id").read_text()
    again = run_train(args(digits_dir, "trainer.max_steps=5", "name=w", "logger=wandb", "resume=auto"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    runs = sorted((tmp_path / "outputs" / "w" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)


def test_only_the_newest_k_checkpoints_are_kept(tmp_path, digits_dir):
    result = run_train(args(digits_dir, "trainer.max_steps=10", "name=k", "callbacks.checkpoint.every_n_train_steps=2",
                            "callbacks.checkpoint.save_top_k=2"), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    kept = sorted(p.name for p in (tmp_path / "outputs" / "k" / "checkpoints").glob("*.ckpt"))
    assert kept == ["last.ckpt", "step=0000008.ckpt", "step=0000010.ckpt"]
