"""A run's folder belongs to one run: a lock while a process trains in it, a manifest of what trains
there, a sweep job that finds its own folder by its settings, and the checks that its checkpoints
can be written before any step is taken.
"""

import fcntl
import itertools
import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

from dit.errors import UsageError
from dit.training.manifest import (
    LAUNCH_KEYS,
    MANIFEST_FILE,
    code_version,
    digest,
    read_manifest,
    run_identity,
    write_manifest,
)

LOCK_FILE = "run.lock"

# Overrides that name a launch of a sweep, not one of its jobs.
LAUNCH_OVERRIDES = ("name", "resume", "accept_changes", "hydra")


class RunLock:
    """`<run>/run.lock` holds {"pid", "host", "boot", "pid_namespace", "started"} while a process
    trains in the folder, and is refreshed every REFRESH_S; a second process is refused.

    A lock is stale, and is taken over with a message, when its process is gone: on this machine
    (same host, boot and pid namespace) its pid no longer runs, or is this very process (a
    restarted container that got the same pid); anywhere else (another host, another container),
    when it was not refreshed for STALE_S, as after a process killed with its host. Takeovers
    are serialised by an flock on `run.lock.guard`, so two of them never both win."""

    REFRESH_S = 60
    STALE_S = 300

    def __init__(self, folder, log=print, elsewhere="give this run another name="):
        self.path = Path(folder) / LOCK_FILE
        self.elsewhere = elsewhere  # how to go on without this folder, for the line that refuses
        self.log = log
        self.held = False
        self._stop = threading.Event()
        self._heartbeat = None

    def _guard(self):
        """The flock that serialises taking and dropping the lock (open it with `with`)."""
        guard = open(self.path.with_name(f"{LOCK_FILE}.guard"), "a")
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
        except OSError as err:  # e.g. Lustre mounted without flock: ENOSYS
            guard.close()
            raise UsageError(
                f"{self.path.parent} cannot be locked ({err.strerror or err}: this file system has no flock); "
                "train there with lock_run=false, and make sure no second process starts on the same run"
            ) from None
        return guard

    def acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._guard():
            if self.path.exists():
                self._take_over_if_stale()
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            self.record = dict(this_process(), started=time.time())
            with os.fdopen(fd, "w") as f:
                json.dump(self.record, f)
        self.held = True
        self._heartbeat = threading.Thread(target=self._refresh, name="run-lock-heartbeat", daemon=True)
        self._heartbeat.start()
        return self

    def _refresh(self):
        while not self._stop.wait(self.REFRESH_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # the folder went away or is read-only for now; the next beat tries again

    def _take_over_if_stale(self):
        try:
            age = time.time() - self.path.stat().st_mtime
            owner = json.loads(self.path.read_text())
            pid, host = int(owner["pid"]), owner["host"]
        except FileNotFoundError:  # released meanwhile
            return
        except (ValueError, KeyError, TypeError):  # empty or half-written: its writer died mid-write
            owner = None
        me = this_process()
        if owner is None:
            why = "an unreadable lock"
        elif (
            host == me["host"] and owner.get("boot") == me["boot"] and owner.get("pid_namespace") == me["pid_namespace"]
        ):
            if pid != me["pid"] and process_alive(pid):
                raise UsageError(
                    f"{self.path.parent} is in use by process {pid} on this host (started "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner.get('started', 0)))}); "
                    f"wait for it to finish or stop it, or {self.elsewhere}"
                )
            why = f"the lock of process {pid}, which is no longer running"
        elif host == me["host"] and pid == me["pid"] and age > 2 * self.REFRESH_S:
            # a restarted container that got its pid again; a live one (containers of one host name
            # all start at pid 1) would have refreshed the lock within REFRESH_S
            why = f"the lock of process {pid}, this process's own pid in an earlier container or boot"
        elif age > self.STALE_S:
            why = f"the lock of process {pid} on {host}, not refreshed for {age / 60:.0f} minutes"
        else:
            raise UsageError(
                f"{self.path.parent} is in use by process {pid} on {host} (its lock was refreshed {age:.0f} s ago); "
                f"wait for it to finish, or, if no process runs there, resume once the lock is {self.STALE_S // 60} "
                f"minutes old, or delete {self.path}"
            )
        self.log(f"{self.path.parent}: taking over {why}")
        self.path.unlink()

    def release(self):
        if not self.held:
            return
        self._stop.set()
        self._heartbeat.join(timeout=5)
        self.held = False
        with self._guard():
            try:
                ours = json.loads(self.path.read_text()) == self.record
            except (FileNotFoundError, ValueError):
                ours = False
            if ours:  # not a lock another process took over while this one stalled past STALE_S
                self.path.unlink()


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def this_process():
    """What identifies a process across machines and containers: host name, boot id, pid namespace, pid."""

    def read(path, how):
        try:
            return how(path)
        except OSError:
            return None

    return dict(
        pid=os.getpid(),
        host=socket.gethostname(),
        boot=read("/proc/sys/kernel/random/boot_id", lambda p: Path(p).read_text().strip()),
        pid_namespace=read("/proc/self/ns/pid", lambda p: os.stat(p).st_ino),
    )


def check_writable(folder, needed_bytes):
    """Before the first step: the folder can be created and written, and has room for one checkpoint."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-check.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(
            f"checkpoints cannot be written to {folder} ({err.strerror or err}); choose a writable folder "
            "(hydra.run.dir=..., or name=... under a writable working directory)"
        ) from None
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise UsageError(
            f"{folder} has {free / 2**30:.2f} GiB free, but one checkpoint of this run takes about "
            f"{needed_bytes / 2**30:.2f} GiB; free some space or write the run elsewhere (hydra.run.dir=...)"
        )


def checkpoint_bytes(num_params):
    """About the size of one checkpoint: fp32 weights, their EMA and AdamW's two moments, plus 5%
    for the rest (RNG states, the loader's position, the config)."""
    return int(1.05 * 4 * 4 * num_params)


def job_key(overrides, ignore=LAUNCH_OVERRIDES, keep=()):
    """A sweep job's overrides less those whose keys `ignore` covers (but those in `keep`), without
    `+`, sorted."""
    kept = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in keep or not any(key == k or key.startswith(f"{k}.") for k in ignore):
            kept.append(override.lstrip("+"))
    return sorted(kept)


def swept_keys(multirun_yaml):
    """The keys a launch of a sweep sweeps: its command line's sweep overrides (`patch=2,4`) and
    the sweeper's params (`experiment=scaling`), from the multirun.yaml Hydra wrote for it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    hydra_cfg = OmegaConf.load(multirun_yaml).hydra
    parsed = OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task))
    keys = {o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()}
    return keys | set((hydra_cfg.sweeper.get("params") or {}).keys())


def sweep_job_folder(sweep_dir, job_num, overrides):
    """The sub-folder of a sweep where the job with these overrides lives (Hydra's
    `hydra.sweep.subdir`), so that a rerun after the sweep's list changed continues each job in its
    own folder rather than in whichever had its number:

    1. the folder of the job that had these overrides (less name, resume and accept_changes);
    2. else the one folder of a job that differed only in launch settings that this launch does
       not sweep (LAUNCH_KEYS: `trainer.max_steps` to extend a sweep, devices, logger, ...);
    3. else the job's number when that folder is free, else the next free number.

    Within one launch a folder serves one job: the job claims it with a file named after the
    launch (the time Hydra wrote the sweep's multirun.yaml), created exclusively; processes of one
    job (SLURM tasks, pod hosts) resolve to the same folder. A sweeper that writes no multirun.yaml
    gets Hydra's numbering (the resume check still refuses another job's checkpoint)."""
    sweep_dir, number = Path(sweep_dir), int(job_num)
    launch = sweep_dir / "multirun.yaml"
    if not launch.exists():
        return str(number)
    loose_ignore = LAUNCH_OVERRIDES + LAUNCH_KEYS
    swept = swept_keys(launch)
    exact, loose = job_key(overrides), job_key(overrides, loose_ignore, keep=swept)
    token_name = f".claimed-in-launch-{launch.stat().st_mtime_ns}"

    def claim(folder):
        try:
            fd = os.open(folder / token_name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:  # claimed in this launch: by this job (another of its processes), or another job
            return wait_for(lambda: (folder / token_name).read_text()) == str(number)
        with os.fdopen(fd, "w") as f:
            f.write(str(number))
        return True

    numbered = sorted((int(p.name), p) for p in sweep_dir.glob("*") if p.name.isdigit())
    earlier = [(folder, (read_manifest(folder) or {}).get("overrides")) for _, folder in numbered]
    earlier = [(folder, theirs) for folder, theirs in earlier if theirs is not None]
    for loose_rule, ours in [(False, exact), (True, loose)]:
        matches = [
            f
            for f, theirs in earlier
            if ours == (job_key(theirs, loose_ignore, swept) if loose_rule else job_key(theirs))
        ]
        if loose_rule and len(matches) > 1:
            break  # which one to continue is not clear: a folder of its own
        for folder in matches:
            if claim(folder):
                return folder.name
    after = max([n for n, _ in numbered] + [number]) + 1
    for candidate in itertools.chain([number], itertools.count(after)):
        folder = sweep_dir / str(candidate)
        manifest = read_manifest(folder)
        if manifest is not None:  # taken: by another process of this job just now, or by another job
            if job_key(manifest.get("overrides") or []) == exact and claim(folder):
                return folder.name
            continue
        folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(folder / MANIFEST_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:  # claimed meanwhile: by another process of this job, or by another job
            theirs = wait_for(lambda folder=folder: read_manifest(folder)["overrides"])
            if theirs is not None and job_key(theirs) == exact and claim(folder):
                return folder.name
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(dict(kind="sweep job", overrides=list(overrides)), f)
        claim(folder)
        return str(candidate)


def wait_for(read, seconds=5.0):
    """read() once it works (another process is writing what it reads, one small write), else None."""
    deadline = time.time() + seconds
    while True:
        try:
            value = read()
            if value:
                return value
        except (OSError, TypeError, KeyError):
            pass
        if time.time() > deadline:
            return None
        time.sleep(0.05)


def write_run_manifest(folder, config, overrides, resumed_from, accepted, checkpoint_folders=()):
    """Record this launch in `<run>/manifest.json`: the run's id (kept from its first launch),
    the hash of its identity and the code (the latest launch's at the top), and each launch's
    overrides, start, code, identity hash, accepted changes and the folders its checkpoints go to:
    a resumed run's checkpoints before a launch came from the code of the launches before it, and
    resume=auto looks for them where they went (train.py)."""
    manifest = read_manifest(folder) or {}
    manifest.setdefault("run_id", uuid.uuid4().hex[:12])
    code, config_hash = code_version(), digest(run_identity(config))
    manifest.update(kind="training run", config_hash=config_hash, code=code)
    manifest["overrides"] = list(overrides)  # the latest launch's: how a sweep rerun finds this folder
    manifest.setdefault("launches", []).append(
        dict(
            started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            host=socket.gethostname(),
            pid=os.getpid(),
            overrides=list(overrides),
            resumed_from=resumed_from,
            accepted_changes=accepted or None,
            code=code,
            config_hash=config_hash,
            checkpoint_folders=list(checkpoint_folders),
        )
    )
    write_manifest(folder, manifest)
    return manifest
