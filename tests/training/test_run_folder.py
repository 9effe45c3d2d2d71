"""A run folder belongs to one run: its lock, and the folder each sweep job finds again by its settings."""

import json
import os
import time

import pytest

from dit.training.run_folder import RunLock, sweep_job_folder, this_process


def write_lock(folder, **owner):
    (folder / "run.lock").write_text(json.dumps(dict(this_process(), started=time.time()) | owner))


def launch(sweep, command, *jobs):
    """One launch of a sweep: Hydra writes multirun.yaml (with the command line's overrides), then
    resolves each job's folder."""
    sweep.mkdir(exist_ok=True)
    (sweep / "multirun.yaml").write_text(
        json.dumps({"hydra": {"overrides": {"task": command}, "sweeper": {"params": None}}})
    )
    stamp = time.time_ns() + 10**9 * len(list(sweep.glob("*/.claimed-in-launch-*")))  # a new mtime per launch
    os.utime(sweep / "multirun.yaml", ns=(stamp, stamp))
    return [sweep_job_folder(sweep, num, overrides) for num, overrides in enumerate(jobs)]


def test_a_live_lock_is_refused_and_a_dead_one_taken_over(tmp_path):
    messages = []
    write_lock(tmp_path, pid=os.getppid())  # a live process of this machine: pytest's parent
    with pytest.raises(ValueError, match=f"is in use by process {os.getppid()} on this host"):
        RunLock(tmp_path, log=messages.append).acquire()
    for pid, why in [(2**22 + 12345, "which is no longer running"), (os.getpid(), "which is no longer running")]:
        write_lock(tmp_path, pid=pid)  # a pid that runs nothing; this very process's (a restarted container)
        lock = RunLock(tmp_path, log=messages.append).acquire()
        assert f"taking over the lock of process {pid}, {why}" in messages[-1]
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
        lock.release()
        assert not (tmp_path / "run.lock").exists()


def test_a_lock_of_another_machine_is_stale_only_once_it_stops_being_refreshed(tmp_path):
    messages = []
    write_lock(tmp_path, pid=1, host="node-7", boot="another boot")
    with pytest.raises(ValueError, match=r"in use by process 1 on node-7 \(its lock was refreshed \d+ s ago\)"):
        RunLock(tmp_path).acquire()
    old = time.time() - RunLock.STALE_S - 60
    os.utime(tmp_path / "run.lock", (old, old))  # its host died: no heartbeat since
    lock = RunLock(tmp_path, log=messages.append).acquire()
    assert "taking over the lock of process 1 on node-7, not refreshed for 6 minutes" in messages[-1]
    lock.release()


def test_the_lock_is_refreshed_while_held(tmp_path, monkeypatch):
    monkeypatch.setattr(RunLock, "REFRESH_S", 0.05)
    lock = RunLock(tmp_path).acquire()
    old = time.time() - 1000
    os.utime(tmp_path / "run.lock", (old, old))
    time.sleep(0.3)
    assert time.time() - (tmp_path / "run.lock").stat().st_mtime < 5
    lock.release()


def test_sweep_jobs_find_their_folders_again(tmp_path):
    sweep = tmp_path / "sw"
    a, b = ["model=dit_s", "name=sw"], ["model=dit_b", "name=sw"]
    assert launch(sweep, ["model=dit_s,dit_b", "name=sw"], a, b) == ["0", "1"]
    assert launch(sweep, ["model=dit_s,dit_b", "name=sw"], a, b) == ["0", "1"]  # launched again: the same
    # reordered, extended with max_steps and resume=auto, one job added: each finds its own
    more = ["trainer.max_steps=800000", "resume=auto"]
    command = ["model=dit_b,dit_l,dit_s", "name=sw", *more]
    assert launch(sweep, command, [*b, *more], ["model=dit_l", "name=sw", *more], [*a, *more]) == ["1", "2", "0"]


def test_jobs_that_differ_in_a_swept_launch_setting_keep_their_folders(tmp_path):
    steps = tmp_path / "steps"
    assert launch(steps, ["trainer.max_steps=100"], ["trainer.max_steps=100"]) == ["0"]
    # now swept: the 100-step job is the finished one, the 200-step job a new one (not an extension of it)
    assert launch(steps, ["trainer.max_steps=200,100"], ["trainer.max_steps=200"], ["trainer.max_steps=100"]) == [
        "1",
        "0",
    ]
    # not swept, raised: which of the two to extend is not clear, a folder of its own
    assert launch(steps, ["trainer.max_steps=300"], ["trainer.max_steps=300"]) == ["2"]


def test_processes_of_one_job_resolve_to_one_folder(tmp_path):
    """SLURM's tasks of a job (or a pod's hosts) resolve the job's folder at the same moment."""
    from concurrent.futures import ThreadPoolExecutor

    sweep = tmp_path / "sw"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(json.dumps({"hydra": {"overrides": {"task": ["seed=0,1"]}, "sweeper": {}}}))
    with ThreadPoolExecutor(8) as pool:
        folders = list(pool.map(lambda task: sweep_job_folder(sweep, task // 4, [f"seed={task // 4}"]), range(8)))
    assert folders == ["0"] * 4 + ["1"] * 4


def test_without_a_record_of_the_launch_jobs_keep_hydras_numbers(tmp_path):
    assert [sweep_job_folder(tmp_path, n, [f"seed={1 - n}"]) for n in (0, 1)] == ["0", "1"]


def test_a_process_finds_the_folder_another_process_of_its_job_took_meanwhile(tmp_path, monkeypatch):
    """The race of SLURM tasks made exact: the folder's claim lands between this process's look
    at the sweep and its own claim."""
    from dit.training import run_folder

    sweep = tmp_path / "sw"
    (sweep / "0").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text(json.dumps({"hydra": {"overrides": {"task": ["seed=0,1"]}, "sweeper": {}}}))
    (sweep / "0" / "manifest.json").write_text(json.dumps({"kind": "sweep job", "overrides": ["seed=0"]}))
    real, first = run_folder.read_manifest, []

    def late(folder):  # the first look, before the other process's claim landed
        if not first:
            first.append(folder)
            return None
        return real(folder)

    monkeypatch.setattr(run_folder, "read_manifest", late)
    assert sweep_job_folder(sweep, 0, ["seed=0"]) == "0"
