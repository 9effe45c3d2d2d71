"""The paper's scaling figures from a sweep's runs: FID against Gflops, FID against training compute,
FID over training, and the loss curves (paper Fig. 2, 6, 8, 9).

    python -m dit.plots multirun/scaling --out figs/             # local run folders (CSV logger)
    python -m dit.plots multirun/s multirun/b --out figs/          # several sweeps together
    python -m dit.plots wandb:my-team/dit --out figs/              # the runs of a wandb project

A run is read from its folder (any folder below the given ones holding `.hydra/config.yaml`): the CSV
logger's `metrics.csv` (`train/loss`; `val/fid` from callbacks=fid) and `hparams.yaml` (train.py puts
`model_name` and `gflops` there, Lightning the data's `global_batch_size`). train.py writes these CSV
files beside every wandb run too, so offline wandb runs are read from their folders as they are.

Training compute is Gflops × batch × steps × 3, as paper Fig. 9: Gflops count one forward pass of
one image (a multiply-add = 1 flop), and the backward pass costs about twice the forward.
"""

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files, no display: scripts, CI, notebooks alike
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from dit.errors import ArgumentParser, UsageError, exit_on_usage_error  # noqa: E402

LOSS, FID = "train/loss", "val/fid"


def make_run(hparams, rows, source):
    """A run as the figures take it, from its logged config and its metric rows (dicts with `step`)."""
    missing = [k for k in ("model_name", "gflops", "global_batch_size") if k not in hparams]
    if missing:
        raise UsageError(
            f"{source} has no {', '.join(missing)} in its logged config; was it trained with train.py and a logger?"
        )
    curves = {LOSS: {}, FID: {}}
    for row in rows:  # a resumed run repeats steps in its next log file: the later value wins
        for key, curve in curves.items():
            if row.get(key) not in (None, ""):
                curve[int(row["step"])] = float(row[key])
    name = hparams["model_name"] + (
        "" if hparams.get("conditioning", "adaln_zero") == "adaln_zero" else f" ({hparams['conditioning']})"
    )
    return dict(
        name=name,
        gflops=float(hparams["gflops"]),
        batch=int(hparams["global_batch_size"]),
        source=str(source),
        loss=sorted(curves[LOSS].items()),
        fid=sorted(curves[FID].items()),
    )


def local_runs(folder):
    """Every run below `folder` (a run folder or a sweep of them) that has CSV logs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; give run or sweep folders, or wandb:<entity>/<project>")
    runs = []
    for config in sorted(folder.rglob(".hydra/config.yaml")):
        run = config.parent.parent
        logs = sorted(run.rglob("metrics.csv"))  # csv/version_0, version_1 (after a resume), ...
        if not logs:
            continue
        hparams = yaml.safe_load((logs[-1].parent / "hparams.yaml").read_text())
        rows = [row for log in logs for row in csv.DictReader(log.open())]
        runs.append(make_run(hparams, rows, run))
    if not runs:
        raise FileNotFoundError(
            f"no run with CSV logs (metrics.csv) below {folder}; train with train.py (logger=csv or wandb), or read wandb"
        )
    return runs


def wandb_runs(project):
    """The runs of a wandb project ("entity/project"), through the public API."""
    import wandb

    runs = []
    for run in wandb.Api().runs(project):
        rows = [
            dict(row, step=row["trainer/global_step"])
            for key in (LOSS, FID)
            for row in run.scan_history(keys=["trainer/global_step", key])
        ]
        runs.append(make_run(run.config, rows, run.url))
    return runs


def load_runs(sources):
    """Runs from run/sweep folders and `wandb:<entity>/<project>` names, sorted by Gflops."""
    runs = [r for s in sources for r in (wandb_runs(s[6:]) if str(s).startswith("wandb:") else local_runs(s))]
    return sorted(runs, key=lambda r: (r["gflops"], r["name"]))


def fid_vs_gflops(runs):
    """Paper Fig. 8: FID of each model (at its last measurement) against its Gflops, log x."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for run in (r for r in runs if r["fid"]):
        step, fid = run["fid"][-1]
        ax.scatter(run["gflops"], fid)
        ax.annotate(
            f"{run['name']}, {step} steps", (run["gflops"], fid), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    ax.margins(x=0.25)  # room for the labels
    ax.set(
        xscale="log", xlabel="Transformer Gflops (forward pass, one image)", ylabel="FID", title="FID vs. model Gflops"
    )
    return fig


def fid_vs_compute(runs):
    """Paper Fig. 9: FID against training compute, Gflops × batch × steps × 3, one curve per model."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for run in (r for r in runs if r["fid"]):
        steps, fids = zip(*run["fid"])
        ax.plot([run["gflops"] * run["batch"] * s * 3 for s in steps], fids, marker="o", label=run["name"])
    ax.set(xscale="log", xlabel="training compute (Gflops)", ylabel="FID", title="FID vs. training compute")
    ax.legend(fontsize=8)
    return fig


def fid_vs_steps(runs):
    """Paper Fig. 6: FID over training steps, one curve per model."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for run in (r for r in runs if r["fid"]):
        ax.plot(*zip(*run["fid"]), marker="o", label=run["name"])
    ax.set(xlabel="training steps", ylabel="FID", title="FID over training")
    ax.legend(fontsize=8)
    return fig


def loss_curves(runs):
    """The training loss (hybrid: L_simple + L_vlb) of every run against steps."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for run in (r for r in runs if r["loss"]):
        ax.plot(*zip(*run["loss"]), label=run["name"])
    ax.set(yscale="log", xlabel="training steps", ylabel="training loss", title="Loss curves")
    ax.legend(fontsize=8)
    return fig


FIGURES = dict(
    fid_vs_gflops=fid_vs_gflops, fid_vs_compute=fid_vs_compute, fid_vs_steps=fid_vs_steps, loss_curves=loss_curves
)


def save_figures(runs, out_dir):
    """Draw every figure and write it as `<out_dir>/<name>.png`; returns {name: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, draw in FIGURES.items():
        fig = draw(runs)
        fig.tight_layout()
        paths[name] = out_dir / f"{name}.png"
        fig.savefig(paths[name], dpi=120)
        plt.close(fig)
    return paths


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", help="run or sweep folders, or wandb:<entity>/<project>")
    parser.add_argument("--out", default="figs", help="folder for the PNGs")
    args = parser.parse_args(argv)
    runs = load_runs(args.sources)
    for run in runs:
        print(
            f"{run['name']:>24}  {run['gflops']:8.2f} Gflops  batch {run['batch']}  {len(run['loss'])} loss points, "
            f"{len(run['fid'])} FID points  ({run['source']})"
        )
    for path in save_figures(runs, args.out).values():
        print(path)
    return runs


if __name__ == "__main__":
    exit_on_usage_error(main)
