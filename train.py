"""Train a DiT. Every knob lives in conf/; this file only assembles the objects the config names.

python train.py experiment=quickstart                            # digits on the CPU, minutes
python train.py model=dit_xl patch=2 trainer=gpu                 # DiT-XL/2, one GPU
python train.py experiment=dit_xl2_256 trainer=ddp               # the paper's headline run
python train.py -m model=dit_s,dit_b,dit_l,dit_xl patch=2,4,8    # Table 4 grid (multirun)
python train.py -m launcher=slurm trainer=ddp model=dit_b patch=2,4,8   # ... on SLURM
"""

import contextlib
import json
import math
import netrc
import os
import re
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException, OverrideParseException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from dit.errors import ONE_LINE_ERRORS, UsageError, exit_with_one_line
from dit.models import SIZES, config_name
from dit.models.flops import describe
from dit.platform.compat import replace_hydra_subprocess_command
from dit.platform.cpu_threads import choose_cpu_threads
from dit.training.checkpoints import (
    INTERRUPTED_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    StopCheckpoint,
    checkpoint_to_resume,
    read_checkpoint,
    remove_stale_temporaries,
)
from dit.training.fsdp import FSDP, fsdp_compile_mode
from dit.training.manifest import changed_keys, differences, digest, fixed, read_manifest, run_identity
from dit.training.run_folder import RunLock, check_writable, checkpoint_bytes, sweep_job_folder, write_run_manifest
from dit.training.run_log import RunLog, config_tree, guard_console, log_file_path
from dit.training.run_summary import SUMMARY_FILE, RunSummary


def model_name(size, depth, width, patch):
    """The paper's name of a model config, e.g. DiT-XL/2: its size, or its depth and width where given."""
    table = SIZES.get(size, (None, None, None))
    return config_name(depth or table[0], width or table[1], patch)


def wandb_offline():
    """wandb stays offline unless the user has set it up, so no run fails for want of a network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"):
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError):
        return True


def sweep_group():
    """The sweep's folder in a multirun (so wandb groups its jobs), None for a single run."""
    hydra_cfg = HydraConfig.get()
    return hydra_cfg.sweep.dir if hydra_cfg.mode == RunMode.MULTIRUN else None


def ddp_child_command(local_rank):
    """The command Lightning runs for DDP ranks 1..N-1 on this node.

    Lightning re-runs the script with the parent's own arguments; in a multirun those are the whole
    sweep, so every child would start a sweep of its own and the job hangs (a known DDP + Hydra
    multirun failure). The children start from this launch's own copy of its config instead
    (`launch_config`), in its folder: Hydra's `.hydra/config.yaml` there is rewritten by any later
    launch on the same folder, even one that the run lock then refuses.
    """
    hydra_cfg = HydraConfig.get()
    job_dir = hydra_cfg.runtime.output_dir
    config = LAUNCH_CONFIG or Path(job_dir) / hydra_cfg.output_subdir / "config.yaml"  # lock_run=false: Hydra's
    command = [
        sys.executable,
        os.path.abspath(sys.argv[0]),
        "-cp",
        str(config.parent),
        "-cn",
        config.stem,
        f"hydra.run.dir={job_dir}",
        "hydra.output_subdir=null",
        f"hydra.job.name=train_ddp_process_{local_rank}",
    ]
    return command, hydra.utils.get_original_cwd()


LAUNCH_CONFIG = None  # this launch's config file, written by the process that holds the run lock


def launch_config(cfg, out):
    """Save this launch's config (as Hydra's .hydra/config.yaml: unresolved, no hydra node) under
    a name of its own, for the DDP children (ddp_child_command)."""
    global LAUNCH_CONFIG
    LAUNCH_CONFIG = out / ".hydra" / f"launch-{os.getpid()}.yaml"
    LAUNCH_CONFIG.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, LAUNCH_CONFIG)
    return LAUNCH_CONFIG


def pod_run_folder(shared_dir, kind, name):
    """<shared_dir>/<outputs or multirun>/<name>: the one run folder of every host of a pod slice
    (conf/trainer/tpu_v3_pod.yaml), where global rank 0 writes the checkpoints all hosts resume from.

    A missing value exits with one sentence: Hydra resolves this folder before calling main(), and
    an exception there prints some 70 lines of OmegaConf's trace around it."""
    if not shared_dir:
        exit_with_one_line(
            "trainer=tpu_v3_pod needs shared_dir=<a folder every host mounts>, where the run and its checkpoints live"
        )
    if not has_name(name):
        exit_with_one_line(
            "trainer=tpu_v3_pod needs name=<run name>: timestamps differ between hosts, a name gives them one run folder"
        )
    return os.path.join(shared_dir, kind, str(name))


def has_name(name) -> bool:
    """name=0 names a run as name=abc does (Hydra reads it as the number 0); null and "" do not."""
    return name is not None and name != ""


replace_hydra_subprocess_command(ddp_child_command)
OmegaConf.register_new_resolver("run_folder", lambda name, stamp: str(name) if has_name(name) else stamp, replace=True)
OmegaConf.register_new_resolver("pod_run_folder", pod_run_folder, replace=True)
OmegaConf.register_new_resolver(
    "dit_name", lambda size, depth, width, patch: model_name(size, depth, width, patch), replace=True
)
OmegaConf.register_new_resolver("wandb_offline", wandb_offline, replace=True)
OmegaConf.register_new_resolver("sweep_group", sweep_group, replace=True)
OmegaConf.register_new_resolver("sweep_job_folder", sweep_job_folder, replace=True)


# The knobs most often typed on the command line: their type and smallest value. A wrong one fails
# here, by name, rather than as a TypeError or ZeroDivisionError deep inside Lightning or torch.
NUMERIC_KNOBS = {
    "seed": (int, 0),
    "patch": (int, 1),
    "trainer.max_steps": (int, -1),
    "trainer.log_every_n_steps": (int, 1),
    "trainer.val_check_interval": (int, 1),
    "data.global_batch_size": (int, 1),
    "data.num_workers": (int, 0),
    "data.samples_per_class": (int, 1),  # the sample grids'
    "data.sample_batch_size": (int, 1),
    "module.optimizer.lr": (float, 0),
    "module.optimizer.weight_decay": (float, 0),
    # read only when the first sample grid, FID or digit check runs, steps into the run: checked now
    "module.sampling.guidance_scale": (float, 0),
    "module.sampling.seed": (int, 0),
    "sampler.eta": (float, 0),
    "callbacks.fid.guidance_scale": (float, 0),
    "callbacks.fid.seed": (int, 0),
    "callbacks.fid.every_n_steps": (int, 1),
    "callbacks.fid.num_samples": (int, 1),
    "callbacks.fid.batch_size": (int, 1),
    "callbacks.digits_accuracy.guidance_scale": (float, 0),
    "callbacks.digits_accuracy.samples_per_class": (int, 1),
    "callbacks.digits_accuracy.seed": (int, 0),
}

# Lightning's precisions that keep the fp32 master weights AdamW and the EMA update (conf/train.yaml);
# "-true" modes cast the weights themselves, which neither supports.
PRECISIONS = (None, "32-true", "32", 32, "bf16-mixed", "bf16", "16-mixed", "16", 16)


# What a value a config leaves to the user (`???`) is, for the one-line error that asks for it.
REQUIRED_VALUES = {
    "callbacks.fid.ref": "the FID reference: statistics (ADM's VIRTUAL_imagenet256_labeled.npz, or one from "
    "python -m dit.fid --save-ref-stats), a folder of real images, or digits",
}


# Set on a node of a multi-node run by whatever started it: by hand (Lightning's on-prem cluster
# guide sets NODE_RANK, MASTER_ADDR, MASTER_PORT, WORLD_SIZE), SLURM, LSF, torchrun or MPI.
CLUSTER_VARIABLES = (
    "NODE_RANK",
    "MASTER_ADDR",
    "WORLD_SIZE",
    "GROUP_RANK",
    "SLURM_NTASKS",
    "LSB_JOBID",
    "TORCHELASTIC_RUN_ID",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
)


def check_config(cfg):
    """Clear, one-line errors for a wrong value and for hardware the machine does not have."""
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
    except Exception:  # an interpolation that does not resolve: reported by what reads it, below
        missing = []
    if missing:
        key = missing[0]
        what = f" ({REQUIRED_VALUES[key]})" if key in REQUIRED_VALUES else ""
        raise UsageError(f"{key} needs a value{what}: add {key}=... to the command")
    for key, (kind, smallest) in NUMERIC_KNOBS.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        what = "a number" if kind is float else "an integer"
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise UsageError(f"{key} must be {what}, got {value!r}")
        if not math.isfinite(value) or value < smallest:
            raise UsageError(f"{key} must be {what} of at least {smallest}, got {value!r}")
    precision = cfg.trainer.get("precision")
    if isinstance(precision, bool) or precision not in PRECISIONS:
        raise UsageError(
            f"trainer.precision={precision}: the run keeps fp32 weights for AdamW and the EMA; use 32-true, "
            "bf16-mixed or 16-mixed (module.float8 adds float8 matmuls)"
        )
    classes, num_classes = OmegaConf.select(cfg, "data.sample_classes"), OmegaConf.select(cfg, "data.num_classes")
    if classes is not None and isinstance(num_classes, int):
        labels = list(classes) if OmegaConf.is_list(classes) else None
        if not labels or not all(type(c) is int and 0 <= c < num_classes for c in labels):
            raise UsageError(
                f"data.sample_classes must be a list of class labels in [0, {num_classes - 1}], got {classes}"
            )
    if not (cfg.get("resume") is None or isinstance(cfg.resume, str)):
        raise UsageError(f"resume must be auto or a checkpoint path, got {cfg.resume!r}")
    if isinstance(cfg.get("resume"), str) and cfg.resume != "auto" and cfg.resume.strip().lower() == "auto":
        raise UsageError(f"resume={cfg.resume}: write resume=auto (in lower case) to continue the run")
    for key in ("accept_changes", "require_tags", "print_config"):
        if cfg.get(key, False) not in (True, False):
            raise UsageError(f"{key} must be true or false, got {cfg.get(key)!r}")
    tags = cfg.get("tags")
    if tags is not None and not (OmegaConf.is_list(tags) and all(isinstance(t, str) for t in tags)):
        raise UsageError(f"tags must be a list of words, e.g. tags=[scaling,v2], got {tags!r}")
    accelerator = cfg.trainer.get("accelerator")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is visible (torch.cuda.is_available() is False); "
            "use trainer=cpu here, or check the driver and CUDA_VISIBLE_DEVICES"
        )
    devices = cfg.trainer.get("devices")
    if accelerator == "cpu" and isinstance(devices, int) and not isinstance(devices, bool) and devices < 1:
        # trainer=ddp|fsdp ask for every GPU (devices: -1), which a CPU cannot count
        raise UsageError(
            f"trainer.devices={devices} with trainer.accelerator=cpu: give the number of CPU processes, "
            "e.g. trainer.devices=2"
        )
    nodes = cfg.trainer.get("num_nodes", 1)
    if (
        isinstance(nodes, int)
        and nodes > 1
        and accelerator != "tpu"
        and not any(map(os.environ.get, CLUSTER_VARIABLES))
    ):
        # Lightning would take this process for node 0 and wait for the others without end
        raise UsageError(
            f"trainer.num_nodes={nodes}, but no cluster launcher started this process (none of "
            f"{', '.join(CLUSTER_VARIABLES[:3])}, SLURM's or torchrun's variables is set): start it on every node "
            "with NODE_RANK, MASTER_ADDR and MASTER_PORT set, or through launcher=slurm or torchrun; "
            "or use trainer.num_nodes=1"
        )
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0 and isinstance(nodes, int):
        batch = OmegaConf.select(cfg, "data.global_batch_size")
        if isinstance(batch, int) and nodes > 0 and batch % (devices * nodes):  # else each rank says so, once started
            raise UsageError(
                f"data.global_batch_size={batch} does not divide over {devices * nodes} devices "
                f"(trainer.devices={devices}, trainer.num_nodes={nodes}); use a multiple of {devices * nodes}"
            )
    strategy = cfg.trainer.get("strategy")
    if OmegaConf.is_dict(strategy) and strategy.get("_target_") == f"{FSDP.__module__}.{FSDP.__name__}":
        fsdp_compile_mode(cfg.module.get("compile"), "cpu")  # a mode FSDP refuses: one line, before the ranks start
    if accelerator == "tpu":
        choice = HydraConfig.get().runtime.choices.get("trainer") if HydraConfig.initialized() else None
        preset = f"trainer={choice}" if str(choice).startswith("tpu") else "trainer.accelerator=tpu"  # what was typed
        try:
            import torch_xla  # noqa: F401
        except ImportError:
            raise UsageError(
                f'{preset} needs torch_xla: pip install -e ".[tpu]" (torch 2.9.1 + torch_xla 2.9.0)'
            ) from None
        from lightning.fabric.accelerators.xla import XLAAccelerator

        try:
            has_tpu = XLAAccelerator.is_available()
        except Exception:  # torch_xla asks the cloud's metadata server, unreachable off a TPU VM
            has_tpu = False
        if not has_tpu:
            raise UsageError(f"{preset} but this machine has no TPU; use trainer=gpu or trainer=cpu here")


def trained_steps(folder):
    """The steps an earlier run in `folder` trained, as its summary.json says (0 without one)."""
    try:
        return int(json.loads((Path(folder) / SUMMARY_FILE).read_text()).get("step") or 0)
    except (OSError, ValueError, AttributeError, TypeError):
        return 0


def check_no_newer_checkpoints_elsewhere(manifest, folders, step):
    """resume=auto chose step `step` in `folders` (None: found no checkpoint there). Refuse if an
    earlier launch of the run saved its checkpoints in another folder (a callbacks.checkpoint.dirpath
    not given again) that holds a later step, rather than start afresh, or go back to an older
    step, over the run's record."""
    searched = {os.path.abspath(f) for f in folders}
    launches = manifest.get("launches") or []
    elsewhere = dict.fromkeys(
        f for launch in launches for f in launch.get("checkpoint_folders") or [] if f not in searched
    )
    for folder in elsewhere:
        for path in sorted(Path(folder).glob("*.ckpt")):
            try:
                theirs = read_checkpoint(path, verify=False)["global_step"]
            except UsageError:  # unreadable: no later state to keep
                continue
            if step is None or theirs > step:
                found = "no checkpoint" if step is None else f"step {step} at the latest"
                raise UsageError(
                    f"resume=auto: {found} in {', '.join(sorted(searched))}, but an earlier launch of this run saved "
                    f"step {theirs} in {folder}; continue there with callbacks.checkpoint.dirpath={folder} "
                    f"callbacks.stop_checkpoint.dirpath={folder}"
                )


def same_local_folder(a, b):
    """Two spellings of one local path (./x/ for x, /a/./x for /a/x): equal once normalised, both
    relative or both absolute. A relative path is relative to the working directory of its launch,
    which a checkpoint does not record, so it never equals an absolute one; never an object store's."""
    local = isinstance(a, str) and isinstance(b, str) and "://" not in a + b
    return local and os.path.isabs(a) == os.path.isabs(b) and os.path.normpath(a) == os.path.normpath(b)


def check_same_run(checkpoint_path, checkpoint, run_config, accept_changes):
    """A resumed run trains what its checkpoint trained: the settings of run_identity must match,
    or, with accept_changes=true, the new values are applied (DiTModule.on_train_start puts the
    optimizer's in force over the restored ones) and announced. Returns the accepted changes."""
    old, new = run_identity(checkpoint.get("config") or {}), run_identity(run_config)
    # one path typed another way (./data/x/ for data/x) is the same data.path
    if same_local_folder(old.get("data.path"), new.get("data.path")):
        old["data.path"] = new["data.path"]
    changed = differences(old, new)
    if not changed:
        return {}
    cannot = fixed(changed_keys(old, new))
    if cannot:
        raise UsageError(
            f"{checkpoint_path} was trained with other settings that a run cannot change "
            f"({differences({k: old.get(k) for k in cannot if k in old}, {k: new.get(k) for k in cannot if k in new})}): "
            "the weights' shapes, the RNG states and the loader's position depend on them; drop those overrides, "
            "or start a new run from these weights with module.init_from=<checkpoint> and another name="
        )
    if not accept_changes:
        raise UsageError(
            f"{checkpoint_path} was trained with other settings ({changed}); pass accept_changes=true to continue "
            "with the new values (applied from this step on, recorded in the run's manifest.json), or drop those overrides"
        )
    print(f"resume: continuing with changed settings from step {checkpoint['global_step']}: {changed}")
    return {k: [old.get(k), new.get(k)] for k in changed_keys(old, new)}


def owns_run_folder(cfg):
    """Whether this process is the one that locks and records the run folder: rank 0 as Lightning
    reads it from the environment (RANK, LOCAL_RANK, SLURM_PROCID, JSM_NAMESPACE_RANK) on node 0,
    not a rank that Lightning, torchrun or SLURM started besides it, and not a pod host (lock_run: false)."""
    node_zero = all(os.environ.get(v, "0") == "0" for v in ("NODE_RANK", "GROUP_RANK"))
    return bool(cfg.get("lock_run", True)) and rank_zero_only.rank == 0 and node_zero


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig):
    """Train; a usage error (a bad value, a refused resume) ends a single run with one line. On rank 0,
    everything the run prints also goes to its log file (Hydra's <run>/train.log)."""
    with RunLog(Path(cfg.output_dir)) if rank_zero_only.rank == 0 else contextlib.nullcontext():
        return run_and_report(cfg)


# What a class raises for a value it refuses (Lightning's Trainer for trainer.devices=abc or an
# accelerator this machine lacks, torch for an EMA decay of 1.5): the config node and the message.
REFUSED_VALUE_ERRORS = (TypeError, ValueError, MisconfigurationException)


def refused_value(err: InstantiationException) -> UsageError | None:
    """One line for a config node whose class refused a value, naming the node; None with
    HYDRA_FULL_ERROR=1 (Hydra's switch for the whole trace) or for another kind of failure."""
    cause = err.__cause__
    if not isinstance(cause, REFUSED_VALUE_ERRORS) or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return None
    node = re.search(r"full_key: (\S+)", str(err))
    lines = str(cause).strip().splitlines() or [type(cause).__name__]
    where = node.group(1) if node else "the config"
    return UsageError(f"{where}: {lines[0]} (fix the value under {where}; HYDRA_FULL_ERROR=1 shows the trace)")


def run_and_report(cfg):
    try:
        return train(cfg)
    except (InstantiationException, *ONE_LINE_ERRORS) as err:
        cause = err.__cause__ if isinstance(err, InstantiationException) else err
        if isinstance(err, InstantiationException) and not isinstance(cause, ONE_LINE_ERRORS):
            cause = refused_value(err) or cause
        if not isinstance(cause, ONE_LINE_ERRORS):
            raise
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise cause from None  # the job fails, the sweep goes on and lists it at its end
        message = str(cause).strip()
        if "Original Traceback" in message:  # raised in a loader worker: torch wraps it with the worker's trace
            message = message.splitlines()[-1].split(": ", 1)[-1]
        exit_with_one_line(message)


CPU_THREADS = {}  # (setting, processes): the choice, made once per process


def set_cpu_threads(cfg):
    """torch's thread count for a run on the CPU (dit.platform.cpu_threads: a busy machine thrashes).
    Chosen once per process: a multirun's later jobs would read the load of the jobs before them."""
    if cfg.trainer.get("accelerator") != "cpu":
        return
    devices = cfg.trainer.get("devices")
    key = (cfg.get("cpu_threads", "auto"), devices if isinstance(devices, int) else 1)
    if key not in CPU_THREADS:
        CPU_THREADS[key] = choose_cpu_threads(*key)
    threads, why = CPU_THREADS[key]
    if threads is not None:
        torch.set_num_threads(threads)
    if rank_zero_only.rank == 0:
        print(f"CPU threads: {torch.get_num_threads()} ({why})")


def train(cfg):
    global LAUNCH_CONFIG
    check_config(cfg)  # before anything reads the values it checks
    set_cpu_threads(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the seed is in the config tree and the manifest
    with torch.device("meta"):
        summary = describe(instantiate(cfg.model))
    if rank_zero_only.rank == 0:
        print(
            f"{summary['name']} ({summary['conditioning']}, {summary['tokens']} tokens): {summary['params'] / 1e6:.2f}M "
            f"parameters, {summary['gflops']:.2f} Gflops per forward pass (one image, multiply-add = 1 flop, as the paper)"
        )
    if cfg.resume == "auto" and not has_name(cfg.name):
        raise UsageError("resume=auto continues the run in outputs/<name>: give the run a name (name=...)")
    if cfg.resume == "auto" and not list(Path(cfg.output_dir).glob("checkpoints/*.ckpt")):
        read_as = folder_of_the_name_as_hydra_read_it(cfg)
        if read_as is not None and list(read_as.glob("checkpoints/*.ckpt")):
            raise UsageError(
                f"resume=auto: {cfg.output_dir} holds no checkpoint, but {read_as} does: the folder name={cfg.name} "
                f"got when Hydra read the name as {read_as.name}; to continue that run, move it "
                f"(mv {read_as} {cfg.output_dir}) or give name={read_as.name}"
            )
    out = Path(cfg.output_dir)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    lock = RunLock(out) if owns_run_folder(cfg) else None
    if lock is not None:
        lock.acquire()  # before anything reads or writes the folder: a second process is refused here
    try:
        if lock is not None:
            launch_config(cfg, out)
        return fit(cfg, out, run_config, summary, lock)
    finally:
        if lock is not None:
            lock.release()
            if LAUNCH_CONFIG is not None:
                LAUNCH_CONFIG.unlink(missing_ok=True)
            LAUNCH_CONFIG = None  # the next job of a multirun writes its own


def fit(cfg, out, run_config, summary, lock):
    # Where the checkpoint callbacks write (`${output_dir}/checkpoints` unless moved).
    folders = [OmegaConf.select(cfg, f"callbacks.{c}.dirpath") for c in ("stop_checkpoint", "checkpoint")]
    remote = [f for f in folders if f and "://" in str(f)]
    if remote:
        raise UsageError(
            f"checkpoints go to {remote[0]}: resume=auto and the checks that nothing is overwritten read a local "
            "or mounted folder; mount the bucket (gcsfuse, s3fs) and give its path"
        )
    folders = [Path(f) for f in folders if f] or [out / "checkpoints"]
    if lock is not None:
        for folder in folders:
            remove_stale_temporaries(folder)
    ckpt_path, checkpoint = checkpoint_to_resume(cfg.resume, folders)
    earlier = read_manifest(out) if lock is not None else None
    if (
        ckpt_path is None
        and earlier is not None
        and earlier.get("kind") == "training run"  # not a sweep's claim on its job folder
        and earlier.get("config_hash") != digest(run_identity(run_config))
        and trained_steps(out)  # one that failed before its first step (a mistyped value) holds nothing to keep
    ):
        # a run that trained but saved no checkpoint: its summary and manifest would become this run's
        raise UsageError(
            f"{out} holds an earlier run of other settings that saved no checkpoint (its manifest.json); "
            "give this run another name=, or move that folder away"
        )
    if cfg.resume == "auto" and earlier is not None:
        check_no_newer_checkpoints_elsewhere(
            earlier, folders, None if checkpoint is None else checkpoint["global_step"]
        )
    accepted = check_same_run(ckpt_path, checkpoint, run_config, cfg.accept_changes) if checkpoint is not None else {}
    del checkpoint  # memory-mapped; Lightning loads it again
    datamodule = instantiate(cfg.data, _convert_="all")
    module = instantiate(cfg.module, _convert_="all")
    module.check_optimizer()
    module.check_data(datamodule)
    module.run_config = run_config
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    # StopCheckpoint saves last.ckpt in its step-end hook: after every other callback's, so that the
    # checkpoint holds what they did at that step (an FID measured at the final step; Lightning moves
    # its ModelCheckpoints after all others itself).
    callbacks.sort(key=lambda c: isinstance(c, StopCheckpoint))
    loggers = []
    is_wandb = bool(cfg.get("logger")) and cfg.logger._target_.endswith("WandbLogger")
    wandb_id = out / "wandb_run_id"  # a resumed run logs into the same wandb run
    if cfg.get("logger"):
        resumed = dict(id=wandb_id.read_text(), resume="allow") if is_wandb and wandb_id.exists() else {}
        loggers.append(instantiate(cfg.logger, **resumed, _convert_="all"))
    if is_wandb:
        # The metrics as CSV beside wandb's: an offline wandb run cannot be read back without
        # `wandb sync` (and an account), and the scaling plots (dit.plots) read these files.
        loggers.append(CSVLogger(save_dir=cfg.output_dir, name="csv", flush_logs_every_n_steps=1))
    if not loggers:  # logger=none: the learning-rate monitor has nowhere to write (Lightning refuses it)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    # summary.json and the loggers' summaries: what the run is, its compute and its FID (the scaling charts read them)
    run_summary = RunSummary(out, summary, run_config, overrides)
    callbacks.append(run_summary)
    # The Trainer before the manifest: a value it refuses (trainer.devices=abc) leaves the run's record as it was.
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if lock is not None:
        # Before the first step rather than at the first checkpoint, hours later.
        # one each: Lightning's ModelCheckpoint holds an absolute path, StopCheckpoint the one given
        saved_in = sorted(
            {
                os.path.abspath(c.dirpath)
                for c in callbacks
                if isinstance(c, (ModelCheckpoint, StopCheckpoint)) and c.dirpath
            }
        )
        for folder in saved_in:
            check_writable(folder, checkpoint_bytes(summary["params"]))
        manifest = write_run_manifest(out, run_config, overrides, ckpt_path, accepted, saved_in)
        module.run_manifest = {k: manifest[k] for k in ("run_id", "config_hash", "code")}
        run_summary.static["run_id"] = manifest["run_id"]
    if trainer.is_global_zero:
        # The resolved config as a tree, on the console (print_config) and always in the run folder.
        config_tree(cfg, out / "config_tree.log", show=cfg.get("print_config", True))
        print(where_things_go(out, trainer, cfg))
    if is_wandb and trainer.is_global_zero:
        wandb_id.write_text(loggers[0].experiment.id)
    for logger in loggers:
        # Model name, Gflops, parameters, seed ... in every run's config, for FID-vs-Gflops panels.
        logger.log_hyperparams(run_summary.hyperparameters())
    ddp_env = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")}
    try:
        # weights_only=False: the run's own checkpoints also hold RNG states and its config
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
    finally:
        if is_wandb:
            import wandb

            wandb.finish()  # one wandb run per job of a multirun
        # Lightning leaves the DDP process group and its environment behind; the next job of a
        # multirun would take them as ranks started by someone else and wait for ranks that are gone.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in ddp_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    stop = next((c for c in callbacks if isinstance(c, StopCheckpoint)), None)
    if stop is not None and stop.saved is not None:
        code = INTERRUPTED_EXIT_CODE if stop.received == "SIGINT" else PREEMPTED_EXIT_CODE
        print(
            f"received {stop.received}: saved {stop.saved} at step {trainer.global_step}; exiting with code {code} "
            f"({'' if code == INTERRUPTED_EXIT_CODE else 'requeue, then '}resume=auto continues)"
        )
        sys.exit(code)
    return out


def where_things_go(out, trainer, cfg):
    """The run folder's map, printed at the start of a run."""
    checkpoints = sorted(
        {str(c.dirpath) for c in trainer.callbacks if isinstance(c, (ModelCheckpoint, StopCheckpoint))}
    )
    metrics = [str(logger.log_dir) for logger in trainer.loggers if getattr(logger, "log_dir", None)]
    every = f"every {cfg.trainer.get('val_check_interval')} steps"
    if trainer.fast_dev_run:  # Lightning writes no checkpoint and no metrics, and draws one grid
        checkpoints, metrics, every = ["none (fast_dev_run)"], ["none (fast_dev_run)"], "once, at step 1"
    lines = [
        f"run folder: {out}",
        f"  log:          {log_file_path(out)} (everything this run prints but progress bars)",
        f"  config:       {out / 'config_tree.log'} (resolved), {out / '.hydra'} (as composed), manifest.json",
        f"  checkpoints:  {', '.join(checkpoints) or 'none (no checkpoint callback)'}",
        f"  samples:      {out / 'samples'} (the EMA grid {every})",
        f"  metrics:      {', '.join(metrics) or 'no logger'}; {out / 'summary.json'}",
    ]
    return "\n".join(lines)


OVERRIDE_KEY = re.compile(r"[+~]{0,2}[A-Za-z_][\w./@-]*")
FLAGS_WITH_A_VALUE = ("-cp", "-cn", "-cd", "--config-path", "--config-name", "--config-dir", "--experimental-rerun")


def quote_values_with_equals(argv):
    """`resume=outputs/x/checkpoints/step=0000010.ckpt` as typed. Hydra's override grammar reads the
    second '=' as a syntax error; the value of an override that holds one (a path: the checkpoints'
    own names) is quoted for it, as `resume='...'` would be. Not a sweep over such values (a ','
    in the value: quote those by hand), and not the value of a flag such as `-cp <folder>`."""
    quoted = []
    for i, arg in enumerate(argv):
        key, sep, value = arg.partition("=")
        after_flag = i > 0 and argv[i - 1] in FLAGS_WITH_A_VALUE
        if (
            sep
            and "=" in value
            and "," not in value
            and OVERRIDE_KEY.fullmatch(key)
            and not after_flag
            and not value.startswith(("'", '"'))
        ):
            arg = key + "='" + value.replace("'", "\\'") + "'"
        quoted.append(arg)
    return quoted


NAME_KEY = re.compile(r"\+{0,2}name")
GRAMMAR = re.compile(r"[()\[\]{}]|\$\{")  # a sweep function, a list, an interpolation: left as written


def quote_run_names(argv):
    """`name=1.50` as typed. Hydra reads an unquoted value as a number or a bool when it looks like
    one, and the run folder would be outputs/1.5 (`name=1_000`: outputs/1000, the folder of
    name=1000; `name=true`: outputs/True). Each name of a plain value or a sweep (`name=1.0,2.0`) is
    quoted; null (as Hydra reads it, in any case), a quoted name, a sweep function (`choice(...)`)
    and an interpolation stay as written."""
    quoted = []
    for i, arg in enumerate(argv):
        key, sep, value = arg.partition("=")
        after_flag = i > 0 and argv[i - 1] in FLAGS_WITH_A_VALUE
        if sep and NAME_KEY.fullmatch(key) and not after_flag and not GRAMMAR.search(value):
            arg = key + "=" + ",".join(map(quoted_name, value.split(",")))
        quoted.append(arg)
    return quoted


def quoted_name(item):
    """One name of `name=`, quoted; as written if empty, null, or holding a quote or a backslash
    (Hydra's own escapes: the user's to write)."""
    name = item.strip()
    if ".." in name.split("/") or name == ".":  # the run folder would be paths.runs_dir or above it
        raise UsageError(f"name={name}: a run's name is its folder under paths.runs_dir; give one without '.' or '..'")
    if not name or name.lower() == "null" or any(c in name for c in "'\"\\"):
        return item
    return f"'{name}'"


def folder_of_the_name_as_hydra_read_it(cfg) -> Path | None:
    """The run folder that `name=<cfg.name>` got when Hydra read the name as a number or a bool
    (outputs/2.5 for name=2.50), if it differs from this run's; None otherwise."""
    if not isinstance(cfg.name, str) or HydraConfig.get().mode == RunMode.MULTIRUN:
        return None
    try:
        value = OverridesParser.create().parse_override(f"name={cfg.name}").value()
    except OverrideParseException:  # not an override Hydra parses unquoted: it never had another folder
        return None
    folder = Path(cfg.output_dir).parent / str(value)
    return None if isinstance(value, str) or folder == Path(cfg.output_dir) else folder


def multirun_flag_first(argv):
    """`train.py model=dit_s -m patch=2,4`: Hydra's argparse takes -m (--multirun) before the
    overrides only, and ends with "unrecognized arguments" otherwise; a flag without a value, so it
    moves to the front. After `--` (nothing of Hydra's) nothing moves."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [a for a in argv[1:end] if a in ("-m", "--multirun")]
    rest = [a for a in argv[1:end] if a not in ("-m", "--multirun")]
    return [argv[0], *flags, *rest, *argv[end:]]


if __name__ == "__main__":
    guard_console()  # `train.py | head`: the run goes on when the reader stops
    try:
        sys.argv = quote_run_names(quote_values_with_equals(multirun_flag_first(sys.argv)))
    except UsageError as err:
        exit_with_one_line(err)
    main()
