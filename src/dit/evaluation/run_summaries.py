"""The runs of a sweep as the scaling charts take them, and the runs of one config over several seeds
as one point (their mean and spread).

A run is read from its folder's `summary.json` (dit.training.run_summary: model, Gflops, batch, seed,
the FID history, final and best), with its loss curve from the CSV log beside it (`csv/*/metrics.csv`;
train.py writes one beside every wandb run). Runs trained before summaries existed are read from the
CSV log and its `hparams.yaml` alone. A wandb project is read through wandb's public API.

Every chart plots a run at its final FID: the last measurement (dit.training.run_summary says why).
"""

import csv
import json
import math
from pathlib import Path

import yaml

from dit.errors import UsageError
from dit.training.run_summary import SUMMARY_FILE, run_label, training_compute

LOSS = "train/loss"
METRIC_NAMES = {"val/fid": "FID", "val/digits_fd": "digits FD"}  # as dit.evaluation.fid_monitor.METRICS


def run_record(summary, loss, source):
    """A run as the charts take it, from its summary (dit.training.run_summary's keys) and its loss
    curve [(step, loss)]."""
    metric = summary.get("metric") or {}
    history = sorted((int(s), float(v)) for s, v in metric.get("history") or [])
    return dict(
        name=summary["name"],
        group=summary.get("config_group") or summary["name"],
        model_name=summary["model_name"],
        patch=summary.get("patch"),
        gflops=float(summary["gflops"]),
        params=summary.get("params"),
        batch=int(summary["global_batch_size"]),
        seed=summary.get("seed"),
        metric=metric.get("key"),
        metric_name=metric.get("name") or METRIC_NAMES.get(metric.get("key")),
        history=history,
        final=history[-1] if history else None,
        best=min((v for _, v in history), default=None),
        loss=sorted(loss),
        source=str(source),
    )


def csv_curves(logs, keys):
    """{key: [(step, value)]} from CSV logs in order; a resumed run repeats steps in its next log file:
    the later value wins."""
    curves = {key: {} for key in keys}
    for log in logs:
        for row in csv.DictReader(log.open()):
            for key, curve in curves.items():
                if row.get(key) not in (None, ""):
                    curve[int(row["step"])] = float(row[key])
    return {key: sorted(curve.items()) for key, curve in curves.items()}


def folder_run(run):
    """The run in folder `run`, from its summary.json, or from its CSV log where it has no summary."""
    logs = sorted(run.rglob("metrics.csv"))  # csv/version_0, version_1 (after a resume), ...
    summary_file = run / SUMMARY_FILE
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text())
        except ValueError as err:  # cut short or edited by hand
            raise UsageError(f"{summary_file} is not valid JSON ({err}); restore it, or move that run away") from None
        if not isinstance(summary, dict):
            raise UsageError(f"{summary_file} holds no run summary (a JSON object); restore it, or move that run away")
        return run_record(summary, csv_curves(logs, [LOSS])[LOSS], run)
    if not logs:
        return None
    hparams = yaml.safe_load((logs[-1].parent / "hparams.yaml").read_text()) or {}
    missing = [k for k in ("model_name", "gflops", "global_batch_size") if k not in hparams]
    if missing:
        raise UsageError(
            f"{run} has no {', '.join(missing)} in its logged config; was it trained with train.py and a logger?"
        )
    curves = csv_curves(logs, [LOSS, *METRIC_NAMES])
    key = next((k for k in METRIC_NAMES if curves[k]), "val/fid")
    summary = dict(
        hparams,
        name=run_label(hparams["model_name"], hparams.get("conditioning", "adaln_zero"), "Hybrid"),
        metric=dict(key=key, history=curves[key]),
    )
    return run_record(summary, curves[LOSS], run)


def local_runs(folder):
    """Every run below `folder` (a run folder or a sweep of them): folders with a Hydra config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; give run or sweep folders, or wandb:<entity>/<project>")
    runs = [folder_run(config.parent.parent) for config in sorted(folder.rglob(".hydra/config.yaml"))]
    runs = [r for r in runs if r is not None]
    if not runs:
        raise FileNotFoundError(
            f"no run with a {SUMMARY_FILE} or a CSV log below {folder}; train with train.py, or read wandb"
        )
    return runs


def wandb_runs(project):
    """The runs of a wandb project ("entity/project"), through the public API: the summary that
    dit.training.run_summary writes into each, and its logged history."""
    import wandb

    runs = []
    for run in wandb.Api().runs(project):
        summary = dict(run.config, **{k: v for k, v in dict(run.summary).items() if not k.startswith("_")})
        key = next((k for k in METRIC_NAMES if k in summary), "val/fid")

        def curve(name, run=run):
            rows = run.scan_history(keys=["trainer/global_step", name])
            return [(int(r["trainer/global_step"]), float(r[name])) for r in rows]

        summary.setdefault(
            "name", run_label(summary["model_name"], summary.get("conditioning", "adaln_zero"), "Hybrid")
        )
        summary["metric"] = dict(key=key, history=curve(key))
        runs.append(run_record(summary, curve(LOSS), run.url))
    return runs


def load_runs(sources):
    """Runs from run/sweep folders and `wandb:<entity>/<project>` names, sorted by Gflops."""
    runs = [r for s in sources for r in (wandb_runs(s[6:]) if str(s).startswith("wandb:") else local_runs(s))]
    return sorted(runs, key=lambda r: (r["gflops"], r["name"], r["seed"] if r["seed"] is not None else -1))


def mean_and_spread(values):
    """The mean and the sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, spread


def aggregate(runs):
    """One point per config: the runs that differ only by their seed (one `config_group`) and were
    measured to the same final step, as the mean and spread of their final FID, and of their FID at
    each step that all of them measured. Runs with no measurement are left out. Sorted by Gflops."""
    measured = [r for r in runs if r["final"] is not None]
    names = sorted({r["metric_name"] for r in measured})
    if len(names) > 1:
        raise UsageError(f"the runs were measured with different metrics ({', '.join(names)}); chart them separately")
    groups = {}
    for run in measured:
        groups.setdefault((run["group"], run["final"][0]), []).append(run)
    points = []
    for (_, final_step), members in groups.items():
        first = members[0]
        final = mean_and_spread([r["final"][1] for r in members])
        steps = sorted(set.intersection(*(set(s for s, _ in r["history"]) for r in members)))
        history = []
        for step in steps:
            mean, spread = mean_and_spread([dict(r["history"])[step] for r in members])
            history.append((step, mean, spread))
        points.append(
            dict(
                name=first["name"],
                model_name=first["model_name"],
                patch=first["patch"],
                gflops=first["gflops"],
                params=first["params"],
                batch=first["batch"],
                metric_name=first["metric_name"],
                seeds=sorted(r["seed"] for r in members if r["seed"] is not None),
                final_step=final_step,
                final=final[0],
                final_spread=final[1],
                best=mean_and_spread([r["best"] for r in members])[0],
                compute=training_compute(first["gflops"], first["batch"], final_step),
                history=history,
                runs=members,
            )
        )
    return sorted(points, key=lambda p: (p["gflops"], p["name"], p["final_step"]))
