"""Train a DiT. Every knob lives in conf/; this file only assembles the objects the config names.

    python train.py experiment=quickstart                            # digits on the CPU, minutes
    python train.py model=dit_xl patch=2 trainer=gpu                 # DiT-XL/2, one GPU
    python train.py experiment=dit_xl2_256 trainer=ddp               # the paper's headline run
    python train.py -m model=dit_s,dit_b,dit_l,dit_xl patch=2,4,8    # Table 4 grid (multirun)
    python train.py -m launcher=slurm trainer=ddp model=dit_b patch=2,4,8   # ... on SLURM
"""

import netrc
import os
import sys
from pathlib import Path

import hydra
import lightning as L
import lightning.pytorch.strategies.launchers.subprocess_script as lightning_launcher
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from dit.checkpoints import PREEMPTED_EXIT_CODE, StopCheckpoint, checkpoint_to_resume
from dit.flops import describe
from dit.models import DiT, config_name


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
    multirun failure). The children start from this job's saved config instead, in its folder.
    """
    hydra_cfg = HydraConfig.get()
    job_dir = hydra_cfg.runtime.output_dir
    command = [sys.executable, os.path.abspath(sys.argv[0]), "-cp", os.path.join(job_dir, hydra_cfg.output_subdir),
               "-cn", "config", f"hydra.run.dir={job_dir}", "hydra.output_subdir=null",
               f"hydra.job.name=train_ddp_process_{local_rank}"]  # fmt: skip
    return command, hydra.utils.get_original_cwd()


def pod_run_folder(shared_dir, kind, name):
    """<shared_dir>/<outputs or multirun>/<name>: the one run folder of every host of a pod slice
    (conf/trainer/tpu_v3_pod.yaml), where global rank 0 writes the checkpoints all hosts resume from.

    A missing value exits with one sentence: Hydra resolves this folder before calling main(), and
    an exception there prints some 70 lines of OmegaConf's trace around it."""
    if not shared_dir:
        sys.exit("trainer=tpu_v3_pod needs shared_dir=<a folder every host mounts>, where the run and its checkpoints live")
    if not name:
        sys.exit("trainer=tpu_v3_pod needs name=<run name>: timestamps differ between hosts, a name gives them one run folder")
    return os.path.join(shared_dir, kind, name)


lightning_launcher._hydra_subprocess_cmd = ddp_child_command
OmegaConf.register_new_resolver("run_folder", lambda name, stamp: name or stamp, replace=True)
OmegaConf.register_new_resolver("pod_run_folder", pod_run_folder, replace=True)
OmegaConf.register_new_resolver("dit_name", lambda depth, width, patch: config_name(depth, width, patch), replace=True)
OmegaConf.register_new_resolver("wandb_offline", wandb_offline, replace=True)
OmegaConf.register_new_resolver("sweep_group", sweep_group, replace=True)


# The knobs most often typed on the command line, and their types: a wrong one fails here, by name,
# rather than as a TypeError deep inside Lightning or torch.
NUMERIC_KNOBS = {
    "seed": int, "patch": int, "trainer.max_steps": int, "trainer.log_every_n_steps": int,
    "trainer.val_check_interval": int, "data.global_batch_size": int, "data.num_workers": int,
    "module.optimizer.lr": float, "module.optimizer.weight_decay": float,
}  # fmt: skip


def check_config(cfg):
    """Clear, one-line errors for a wrong value type and for hardware the machine does not have."""
    for key, kind in NUMERIC_KNOBS.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int)):
            raise TypeError(f"{key} must be {'a number' if kind is float else 'an integer'}, got {value!r}")
    accelerator = cfg.trainer.get("accelerator")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is visible (torch.cuda.is_available() is False); "
            "use trainer=cpu here, or check the driver and CUDA_VISIBLE_DEVICES"
        )
    if accelerator == "tpu":
        choice = HydraConfig.get().runtime.choices.get("trainer") if HydraConfig.initialized() else None
        preset = f"trainer={choice}" if str(choice).startswith("tpu") else "trainer.accelerator=tpu"  # what was typed
        try:
            import torch_xla  # noqa: F401
        except ImportError:
            raise RuntimeError(f'{preset} needs torch_xla: pip install -e ".[tpu]" (torch 2.9.1 + torch_xla 2.9.0)') from None
        from lightning.fabric.accelerators.xla import XLAAccelerator

        try:
            has_tpu = XLAAccelerator.is_available()
        except Exception:  # torch_xla asks the cloud's metadata server, unreachable off a TPU VM
            has_tpu = False
        if not has_tpu:
            raise RuntimeError(f"{preset} but this machine has no TPU; use trainer=gpu or trainer=cpu here")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig):
    check_config(cfg)  # before anything reads the values it checks
    L.seed_everything(cfg.seed, workers=True)
    with torch.device("meta"):
        summary = describe(DiT(**cfg.model))
    print(
        f"{summary['name']} ({summary['conditioning']}, {summary['tokens']} tokens): {summary['params'] / 1e6:.2f}M "
        f"parameters, {summary['gflops']:.2f} Gflops per forward pass (one image, multiply-add = 1 flop, as the paper)"
    )
    if cfg.resume == "auto" and not cfg.name:
        raise ValueError("resume=auto continues the run in outputs/<name>: give the run a name (name=...)")
    out = Path(cfg.output_dir)
    ckpt_path = checkpoint_to_resume(cfg.resume, out / "checkpoints")
    datamodule = instantiate(cfg.data, _convert_="all")
    module = instantiate(cfg.module, _convert_="all")
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = []
    is_wandb = bool(cfg.get("logger")) and cfg.logger._target_.endswith("WandbLogger")
    wandb_id = out / "wandb_run_id"  # a resumed run logs into the same wandb run
    if cfg.get("logger"):
        resumed = dict(id=wandb_id.read_text(), resume="allow") if is_wandb and wandb_id.exists() else {}
        loggers.append(instantiate(cfg.logger, **resumed))
    if is_wandb:
        # The metrics as CSV beside wandb's: an offline wandb run cannot be read back without
        # `wandb sync` (and an account), and the scaling plots (dit.plots) read these files.
        loggers.append(CSVLogger(save_dir=cfg.output_dir, name="csv", flush_logs_every_n_steps=1))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if is_wandb and trainer.is_global_zero:
        wandb_id.write_text(loggers[0].experiment.id)
    for logger in loggers:
        # Model name, Gflops and parameters in every run's config, for FID-vs-Gflops panels.
        logger.log_hyperparams(
            dict(model_name=summary["name"], patch=cfg.model.patch_size, conditioning=summary["conditioning"],
                 gflops=summary["gflops"], params=summary["params"], tokens=summary["tokens"])  # fmt: skip
        )
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
        print(f"received {stop.received}: saved {stop.saved} at step {trainer.global_step}; "
              f"exiting with code {PREEMPTED_EXIT_CODE} (requeue, then resume=auto continues)")  # fmt: skip
        sys.exit(PREEMPTED_EXIT_CODE)
    return out


if __name__ == "__main__":
    main()
