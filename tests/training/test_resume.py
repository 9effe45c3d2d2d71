"""Runs that survive: exact resume after SIGKILL, preemption by signal, sweeps rerun, changed
settings, and a named run that is never overwritten."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, args, one_line_error, run_train

from dit.training.checkpoints import (
    INTERRUPTED_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    read_checkpoint,
)


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


def run_env():

    return dict(os.environ, PYTHONPATH=str(ROOT / "src"))


def test_resume_after_sigkill_is_exact(tmp_path, digits_dir):
    """Killed mid-run and resumed, with a loader worker: the same weights, EMA, AdamW state and
    losses as a run never interrupted. While it runs, a second launch on the folder is refused;
    after the kill its lock and a half-written checkpoint are cleared."""
    steps = ["trainer.max_steps=45", "data.num_workers=1"]
    full = run_train(args(digits_dir, *steps, "name=full"), cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]

    env_cmd = [sys.executable, str(ROOT / "train.py"), *args(digits_dir, *steps, "name=killed")]
    proc = subprocess.Popen(env_cmd, cwd=tmp_path, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "outputs" / "killed"
    first = run_dir / "checkpoints" / "step=0000010.ckpt"
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None and (run_dir / "run.lock").exists()
    proc.send_signal(signal.SIGSTOP)  # held mid-run (alive, holding its lock) while a second launch tries
    second = run_train(args(digits_dir, *steps, "name=killed", "resume=auto"), cwd=tmp_path)
    assert second.returncode == 2 and one_line_error(second.stderr, f"is in use by process {proc.pid} on this host")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" not in [p.name for p in saved], "the run finished before it was killed"
    stale = run_dir / "checkpoints" / "last.ckpt.99999.tmp"  # as a write killed half-way leaves it
    stale.write_bytes(b"half a checkpoint")

    resumed = run_train(args(digits_dir, *steps, "name=killed", "resume=auto"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"taking over the lock of process {proc.pid}, which is no longer running" in resumed.stdout
    assert f"removing {stale}" in resumed.stdout and not stale.exists() and not (run_dir / "run.lock").exists()
    assert "resume=auto: continuing from" in resumed.stdout

    a, b = weights(tmp_path / "outputs" / "full"), weights(tmp_path / "outputs" / "killed")
    assert a[0] == b[0] == 45
    for theirs, ours in [(a[1], b[1]), (a[2], b[2])]:  # EMA and live weights, bitwise
        assert theirs.keys() == ours.keys()
        for k in theirs:
            assert torch.equal(theirs[k], ours[k]), k
    for k, state in a[3]["state"].items():  # AdamW's moments and step count
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[name], b[3]["state"][k][name]), (k, name)
    assert losses(tmp_path / "outputs" / "full") == losses(tmp_path / "outputs" / "killed")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])  # a scheduler's preemption; Ctrl-C
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
    assert proc.returncode == (INTERRUPTED_EXIT_CODE if sig == signal.SIGINT else PREEMPTED_EXIT_CODE), err[-3000:]
    assert time.time() - signalled < 30  # within a grace period: no sample grid drawn on the way out
    assert f"received {sig.name}" in out
    ckpt = read_checkpoint(tmp_path / "outputs" / "pre" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] >= 10
    # ...and resume=auto continues from it
    again = run_train(
        args(digits_dir, f"trainer.max_steps={ckpt['global_step'] + 3}", "name=pre", "resume=auto"), cwd=tmp_path
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        read_checkpoint(tmp_path / "outputs" / "pre" / "checkpoints" / "last.ckpt")["global_step"]
        == ckpt["global_step"] + 3
    )


def test_named_run_is_never_overwritten(tmp_path, digits_dir, capsys):
    import train
    from conftest import compose_cfg

    first = run_train(args(digits_dir, "trainer.max_steps=10", "name=mine"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_train(args(digits_dir, "trainer.max_steps=10", "name=mine"), cwd=tmp_path)
    assert second.returncode == 2 and one_line_error(
        second.stderr, "already holds checkpoints of an earlier run; pass resume=auto"
    )
    run_dir = tmp_path / "outputs" / "mine"
    step10 = run_dir / "checkpoints" / "step=0000010.ckpt"
    stamp = step10.stat().st_mtime_ns
    for extra, message in [
        (["resume=auto"], "give the run a name (name=...)"),
        (["name=mine", f"resume='{step10}'"], "would be overwritten"),
    ]:
        with pytest.raises(SystemExit):  # in this process: the same train.py main, without an interpreter's start
            train.main(
                compose_cfg(
                    args(digits_dir, "trainer.max_steps=12", *extra), run_dir if "name=mine" in extra else tmp_path
                )
            )
        one_line_error(capsys.readouterr().err, message)
    # resume=<path>, with the '=' of the run's own checkpoint names typed as is: a branch in a new
    # folder, never a write into a run that holds checkpoints
    branch = run_train(args(digits_dir, "trainer.max_steps=12", "name=branch", f"resume={step10}"), cwd=tmp_path)
    assert branch.returncode == 0, branch.stderr[-3000:]
    assert read_checkpoint(tmp_path / "outputs" / "branch" / "checkpoints" / "last.ckpt")["global_step"] == 12
    assert step10.stat().st_mtime_ns == stamp and sorted(p.name for p in step10.parent.iterdir()) == [
        "last.ckpt",
        "step=0000010.ckpt",
    ]


def test_rerun_sweep_with_resume_finishes_only_what_is_missing(tmp_path, digits_dir):
    missing = tmp_path / "later"  # job 1's data appears only after the first attempt
    sweep = [
        "-m",
        *args(digits_dir, "trainer.max_steps=3", "name=sw", "logger=csv", "data.prepare=null"),
        f"data.path={digits_dir},{missing}",
    ]
    first = run_train(sweep, cwd=tmp_path)
    assert first.returncode != 0 and "1 of 2 jobs of the sweep failed" in first.stderr
    done = tmp_path / "multirun" / "sw" / "0" / "checkpoints" / "last.ckpt"
    stamp = done.stat().st_mtime_ns
    import shutil

    shutil.copytree(digits_dir, missing)
    # The rerun lists the jobs in another order: each continues in the folder of its own settings.
    again = run_train([*sweep[:-1], f"data.path={missing},{digits_dir}", "resume=auto"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert done.stat().st_mtime_ns == stamp  # the finished job was not trained again
    redone = read_checkpoint(tmp_path / "multirun" / "sw" / "1" / "checkpoints" / "last.ckpt")
    assert redone["global_step"] == 3 and redone["config"]["data"]["path"] == str(missing)
    assert read_checkpoint(done)["config"]["data"]["path"] == str(digits_dir)
    assert sorted(p.name for p in (tmp_path / "multirun" / "sw").iterdir() if p.name.isdigit()) == ["0", "1"]


def test_resumed_wandb_run_keeps_its_id(tmp_path, digits_dir):
    first = run_train(args(digits_dir, "trainer.max_steps=3", "name=w", "logger=wandb"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = (tmp_path / "outputs" / "w" / "wandb_run_id").read_text()
    again = run_train(args(digits_dir, "trainer.max_steps=5", "name=w", "logger=wandb", "resume=auto"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    runs = sorted((tmp_path / "outputs" / "w" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)


def test_only_the_newest_k_checkpoints_are_kept(tmp_path, digits_dir):
    result = run_train(
        args(
            digits_dir,
            "trainer.max_steps=10",
            "name=k",
            "callbacks.checkpoint.every_n_train_steps=2",
            "callbacks.checkpoint.save_top_k=2",
        ),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    kept = sorted(p.name for p in (tmp_path / "outputs" / "k" / "checkpoints").glob("*.ckpt"))
    assert kept == ["last.ckpt", "step=0000008.ckpt", "step=0000010.ckpt"]


def test_a_resume_without_the_ema_trains_on_from_the_trained_weights(tmp_path, digits_dir):
    """The checkpoint's state_dict holds the EMA; a resume that drops callbacks.ema (accepted)
    continues from current_model_state, the weights the optimizer's moments belong to. lr 0 makes
    the step after the resume leave them as they were."""
    import train
    from conftest import quick_cfg

    base = ["~callbacks.digits_accuracy", "name=r", "logger=none", "trainer.val_check_interval=1000"]
    train.main(quick_cfg(tmp_path, digits_dir, *base, "trainer.max_steps=3"))
    _, average, trained, _ = weights(tmp_path)
    assert any(not torch.equal(average[k], trained[k]) for k in trained)
    resume = ["resume=auto", "trainer.max_steps=4", "~callbacks.ema", "module.optimizer.lr=0", "accept_changes=true"]
    train.main(quick_cfg(tmp_path, digits_dir, *base, *resume))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4 and "current_model_state" not in ckpt
    assert all(torch.equal(ckpt["state_dict"][k], trained[k]) for k in trained if k.startswith("model."))


def test_resume_auto_looks_where_the_run_saved_its_checkpoints(tmp_path, digits_dir, capsys):
    """A run that saved its checkpoints elsewhere (callbacks.checkpoint.dirpath), resumed with
    resume=auto but without that setting, is refused in one line naming the folder, not started
    afresh over its record; given the folder again, it continues."""
    import train
    from conftest import quick_cfg

    moved = tmp_path.parent / f"{tmp_path.name}_ckpts"
    base = ["~callbacks.digits_accuracy", "name=r", "logger=none", "trainer.val_check_interval=1000"]
    where = [f"callbacks.checkpoint.dirpath={moved}", f"callbacks.stop_checkpoint.dirpath={moved}"]
    train.main(quick_cfg(tmp_path / "run", digits_dir, *base, *where, "trainer.max_steps=3"))
    assert read_checkpoint(moved / "last.ckpt")["global_step"] == 3
    summary = (tmp_path / "run" / "summary.json").read_text()
    with pytest.raises(SystemExit) as refused:
        train.main(quick_cfg(tmp_path / "run", digits_dir, *base, "resume=auto", "trainer.max_steps=5"))
    assert refused.value.code == 2
    one_line_error(capsys.readouterr().err, "resume=auto: no checkpoint in", f"saved step 3 in {moved}")
    assert (tmp_path / "run" / "summary.json").read_text() == summary  # the run's record as it was
    train.main(quick_cfg(tmp_path / "run", digits_dir, *base, *where, "resume=auto", "trainer.max_steps=5"))
    assert read_checkpoint(moved / "last.ckpt")["global_step"] == 5
    # Branched back into the run folder's own checkpoints (an explicit resume=), then resumed with the
    # moved folder again: its step 5 is older than the run folder's 7, so resume=auto refuses it.
    train.main(quick_cfg(tmp_path / "run", digits_dir, *base, f"resume={moved / 'last.ckpt'}", "trainer.max_steps=7"))
    with pytest.raises(SystemExit) as refused:
        train.main(quick_cfg(tmp_path / "run", digits_dir, *base, *where, "resume=auto", "trainer.max_steps=9"))
    assert refused.value.code == 2
    one_line_error(capsys.readouterr().err, "resume=auto: step 5 at the latest in", "saved step 7 in")
    assert read_checkpoint(moved / "last.ckpt")["global_step"] == 5


def test_data_path_typed_another_way_is_the_same_folder(tmp_path, digits_dir, capsys):
    """data.path is fixed within a run, but ./x, x/ and /abs/x name one folder: the resume goes on.
    A copy of the data elsewhere is another folder: refused."""
    import shutil

    import train
    from conftest import quick_cfg

    base = ["~callbacks.digits_accuracy", "name=r", "logger=none", "trainer.val_check_interval=1000"]
    train.main(quick_cfg(tmp_path / "run", digits_dir, *base, "trainer.max_steps=3"))
    other_spelling = f"data.path={digits_dir.parent}/./{digits_dir.name}/"
    train.main(quick_cfg(tmp_path / "run", digits_dir, *base, "resume=auto", "trainer.max_steps=4", other_spelling))
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 4
    shutil.copytree(digits_dir, tmp_path / "copy")
    with pytest.raises(SystemExit) as refused:
        train.main(
            quick_cfg(
                tmp_path / "run",
                digits_dir,
                *base,
                "resume=auto",
                "trainer.max_steps=5",
                f"data.path={tmp_path / 'copy'}",
            )
        )
    assert refused.value.code == 2
    one_line_error(capsys.readouterr().err, "other settings that a run cannot change (data.path:")


def test_resume_with_changed_settings_is_refused_or_applied(tmp_path, digits_dir, capsys):
    """A resume whose recipe changed (lr, batch, EMA decay) is refused, naming each key; with
    accept_changes=true the new values are the ones in force (the restored optimizer state would
    otherwise keep the old lr) and the run's manifest records them. logger=none trains too."""
    import train
    from conftest import quick_cfg

    base = ["~callbacks.digits_accuracy", "name=r", "logger=none", "trainer.val_check_interval=1000"]
    train.main(quick_cfg(tmp_path, digits_dir, *base, "trainer.max_steps=3"))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert read_checkpoint(ckpt)["global_step"] == 3
    changed = [
        "resume=auto",
        "trainer.max_steps=5",
        "module.optimizer.lr=5e-4",
        "data.global_batch_size=64",
        "callbacks.ema.multi_avg_fn.decay=0.99",
    ]
    with pytest.raises(SystemExit) as refused:
        train.main(quick_cfg(tmp_path, digits_dir, *base, *changed))
    assert refused.value.code == 2
    one_line_error(
        capsys.readouterr().err,
        "callbacks.ema.multi_avg_fn.decay: 0.995 -> 0.99",
        "data.global_batch_size: 128 -> 64",
        "module.optimizer.lr: 0.001 -> 0.0005",
        "accept_changes=true",
    )
    assert read_checkpoint(ckpt)["global_step"] == 3  # untouched
    train.main(quick_cfg(tmp_path, digits_dir, *base, *changed, "accept_changes=true"))
    resumed = read_checkpoint(ckpt)
    assert resumed["global_step"] == 5 and resumed["optimizer_states"][0]["param_groups"][0]["lr"] == 5e-4
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert len(manifest["launches"]) == 2  # the refused launch wrote nothing
    assert manifest["launches"][-1]["accepted_changes"]["module.optimizer.lr"] == [0.001, 0.0005]
    # each launch keeps the code and the settings it trained with; the top holds the latest
    first, second = manifest["launches"]
    assert first["code"].keys() == second["code"].keys() >= {"dit", "commit", "torch"}
    assert first["config_hash"] != second["config_hash"] == manifest["config_hash"]
    assert resumed["manifest"]["run_id"] == manifest["run_id"]
