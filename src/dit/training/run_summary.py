"""Every run's summary: what it is (model, size, Gflops, patch, design, objective, seed), how far it
went (steps and training compute) and how good it is (the final and best FID), in
`<run>/summary.json` and in each logger's run summary (wandb's `run.summary`).

The scaling charts (dit.evaluation.plots, the sweep's charts at the end of a multirun, and
notebooks/scaling.ipynb) read these summaries. Their rule for which FID a run is plotted at is the
final one: the last measurement, at the run's last measured step. The paper compares models at equal
training steps (Table 4 and Fig. 8: 400K steps), which the best-so-far would not; the best is kept
beside it. `metric.history` holds the measurements of one protocol (metric, reference, number of
samples, sampler, ...: `metric.protocol`); a run resumed under another keeps the earlier ones apart, in
`metric.earlier`, each with its own protocol.

Training compute is Gflops × global batch × steps × 3, the x axis of paper Fig. 9: Gflops count one
forward pass of one image (a multiply-add = 1 flop) and the backward pass costs about twice the forward.
"""

import json
import os
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from dit.evaluation.fid_monitor import FIDMonitor
from dit.training.manifest import digest, run_identity

SUMMARY_FILE = "summary.json"
GROUPING_EXCLUDES = ("seed", "data.seed")  # runs equal but for these are seeds of one config


def training_compute(gflops, global_batch_size, steps):
    """Gflops of training so far: forward + backward ≈ 3 forward passes per image (paper Fig. 9)."""
    return gflops * global_batch_size * steps * 3


def config_group(run_config):
    """The hash of what a run trains, less its seed: the runs of one config in a `seed=0,1,2` sweep
    share it (their mean and spread are one point of the charts)."""
    identity = run_identity(run_config)
    return digest({k: v for k, v in identity.items() if k not in GROUPING_EXCLUDES})


def quality_monitor(trainer):
    """The run's FID monitor (callbacks=fid or fid_digits), or None."""
    return next((c for c in trainer.callbacks if isinstance(c, FIDMonitor)), None)


def run_label(model_name, conditioning, objective):
    """DiT-B/4, with the design and objective where they are not the paper's: DiT-B/4 (in_context, REPA)."""
    extras = [x for x, paper in ((conditioning, "adaln_zero"), (objective, "Hybrid")) if x != paper]
    return model_name + (f" ({', '.join(extras)})" if extras else "")


class RunSummary(Callback):
    """Writes the summary at the start, every `log_every_n_steps` steps, after each FID measurement and
    at the end (global rank 0). Added by train.py to every run.

    Args:
        folder: the run folder.
        model: `dit.models.flops.describe` of the model (name, params, Gflops, tokens, conditioning).
        run_config: the resolved run config (a plain dict).
        overrides: the launch's command-line overrides.
        run_id: the run's id from its manifest.json, where the run has one.
    """

    def __init__(self, folder, model, run_config, overrides=(), run_id=None):
        self.path = Path(folder) / SUMMARY_FILE
        objective = (run_config.get("objective") or {}).get("_target_", "dit.diffusion.objectives.Hybrid")
        self.static = dict(
            run_id=run_id,
            name=run_label(model["name"], model["conditioning"], objective.rsplit(".", 1)[-1]),
            model_name=model["name"],
            params=model["params"],
            gflops=model["gflops"],
            tokens=model["tokens"],
            patch=run_config["model"]["patch_size"],
            conditioning=model["conditioning"],
            objective=objective.rsplit(".", 1)[-1],
            seed=run_config.get("seed"),
            tags=list(run_config.get("tags") or []),
            global_batch_size=run_config["data"]["global_batch_size"],
            config_group=config_group(run_config),
            overrides=list(overrides),
        )
        self.every = max(1, int((run_config.get("trainer") or {}).get("log_every_n_steps") or 50))
        self.measured = 0
        # The compute of the launches before this one, to their last step (the checkpoint's state of
        # this callback): a resume that changed data.global_batch_size counts each step at its batch.
        self.compute_before, self.steps_before = 0.0, 0
        self._trainer = None

    def compute(self, step):
        return self.compute_before + training_compute(
            self.static["gflops"], self.static["global_batch_size"], step - self.steps_before
        )

    def setup(self, trainer, pl_module, stage):
        self._trainer = trainer

    def state_dict(self):
        step = self._trainer.global_step if self._trainer is not None else self.steps_before
        return {"train_compute": self.compute(step), "step": step}

    def load_state_dict(self, state_dict):
        # a checkpoint from before this state: its steps are counted at this launch's batch
        self.compute_before, self.steps_before = state_dict["train_compute"], state_dict["step"]

    def hyperparameters(self):
        """What the run is (name, model, Gflops, seed, config group ...), for the loggers' configs."""
        return {k: v for k, v in self.static.items() if k not in ("overrides", "run_id")}

    def summary(self, trainer, status):
        step = trainer.global_step
        monitor = quality_monitor(trainer)
        metric = None
        if monitor is not None:
            history = [list(h) for h in monitor.history]
            metric = dict(
                key=monitor.key,
                name=monitor.metric_name,
                final=history[-1][1] if history else None,
                final_step=history[-1][0] if history else None,
                best=min((v for _, v in history), default=None),
                history=history,
                # how the history was measured, and what this run measured under other protocols
                # before a resume changed it (dit.evaluation.fid_monitor): never part of `history`
                protocol=monitor.protocol,
                earlier=monitor.earlier,
            )
        return dict(
            self.static,
            step=step,
            train_compute=self.compute(step),
            metric=metric,
            status=status,
            updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )

    def write(self, trainer, status="running"):
        if not trainer.is_global_zero:
            return
        summary = self.summary(trainer, status)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f"{SUMMARY_FILE}.{os.getpid()}.tmp")  # a reader never sees half a file
        temporary.write_text(json.dumps(summary, indent=1))
        temporary.replace(self.path)
        flat = {k: v for k, v in summary.items() if k not in ("metric", "overrides", "updated", "run_id")}
        flat["train/compute"] = flat.pop("train_compute")
        if summary["metric"] is not None and summary["metric"]["final"] is not None:
            key = summary["metric"]["key"]
            flat.update({key: summary["metric"]["final"], f"{key}_best": summary["metric"]["best"]})
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(flat)

    def on_train_start(self, trainer, pl_module):
        self.write(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        monitor = quality_monitor(trainer)
        measured = len(monitor.history) if monitor is not None else 0
        if trainer.global_step % self.every == 0 or measured != self.measured:
            self.measured = measured
            self.write(trainer)

    def on_train_end(self, trainer, pl_module):
        max_steps = trainer.max_steps
        self.write(
            trainer, "finished" if max_steps is None or max_steps < 0 or trainer.global_step >= max_steps else "stopped"
        )

    def on_exception(self, trainer, pl_module, exception):
        self.write(trainer, "failed")
