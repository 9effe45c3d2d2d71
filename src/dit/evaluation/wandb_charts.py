"""A sweep's scaling charts as a wandb run of their own: tables of the sweep's runs and charts built
from them by code, so that no one assembles FID-vs-Gflops panels by hand in the UI.

The run (job type `sweep-summary`, in the sweep's group, beside its jobs) holds:
- `scaling/configs`: one row per config (its seeds averaged): name, model, patch, Gflops and their
  log10, parameters, seeds, final step, training compute and its log10, final FID (mean and spread
  over seeds) and best FID;
- `scaling/runs`: one row per run (seed), and `scaling/history`: every FID measurement of every run;
- charts, from wandb's built-in presets (they need no spec saved in an account):
  `scaling/fid_vs_gflops` (a line per patch size), `scaling/fid_vs_gflops_points` (a scatter),
  `scaling/fid_vs_compute` and `scaling/fid_over_training` (a line per config). The presets have no
  log axis, so the x of the first three is log10 of Gflops or of compute;
- `scaling/figures/*`: the PNG figures of dit.evaluation.plots (log axes, ± one standard deviation).

wandb writes the run offline or online as the sweep's jobs were (conf/logger/wandb.yaml: `offline`, or
wandb's own settings, WANDB_MODE and `wandb login`, where that is false). An offline
sweep is uploaded, jobs and charts, with `wandb sync <sweep>/wandb/offline-run-* <sweep>/*/wandb/offline-run-*`.
"""

import math


def tables(points, runs):
    """The three wandb.Table of a sweep: configs, runs and history."""
    import wandb

    configs = wandb.Table(
        columns=[
            "name",
            "model",
            "patch",
            "gflops",
            "log10_gflops",
            "params",
            "seeds",
            "final_step",
            "compute_gflops",
            "log10_compute",
            "final",
            "final_spread",
            "best",
            "metric",
        ],
        data=[
            [
                p["name"],
                p["model_name"],
                p["patch"],
                p["gflops"],
                math.log10(p["gflops"]),
                p["params"],
                len(p["seeds"]) or 1,
                p["final_step"],
                p["compute"],
                math.log10(p["compute"]) if p["compute"] > 0 else None,
                p["final"],
                p["final_spread"],
                p["best"],
                p["metric_name"],
            ]
            for p in points
        ],
    )
    per_run = wandb.Table(
        columns=["name", "seed", "patch", "gflops", "final_step", "final", "best", "source"],
        data=[
            [r["name"], r["seed"], r["patch"], r["gflops"], r["final"][0], r["final"][1], r["best"], r["source"]]
            for r in runs
            if r["final"] is not None
        ],
    )
    history = wandb.Table(
        columns=["name", "seed", "step", "compute_gflops", "value"],
        data=[
            [r["name"], r["seed"], step, r["gflops"] * r["batch"] * step * 3, value]
            for r in runs
            for step, value in r["history"]
        ],
    )
    return configs, per_run, history


def charts(points, configs):
    """{key: wandb chart} of the sweep, from its points (dit.evaluation.run_summaries.aggregate)."""
    import wandb

    metric = points[0]["metric_name"]
    patches = sorted({p["patch"] for p in points}, key=str)
    by_patch = [[p for p in points if p["patch"] == patch] for patch in patches]
    with_history = [p for p in points if p["history"]]
    return {
        "scaling/fid_vs_gflops": wandb.plot.line_series(
            xs=[[math.log10(p["gflops"]) for p in mine] for mine in by_patch],
            ys=[[p["final"] for p in mine] for mine in by_patch],
            keys=[f"patch {patch}" for patch in patches],
            title=f"final {metric} vs. log10 Gflops, by patch size",
            xname="log10 Gflops",
        ),
        "scaling/fid_vs_gflops_points": wandb.plot.scatter(
            configs, "log10_gflops", "final", title=f"final {metric} vs. log10 Gflops"
        ),
        "scaling/fid_vs_compute": wandb.plot.line_series(
            xs=[[math.log10(p["gflops"] * p["batch"] * s * 3) for s, _, _ in p["history"]] for p in with_history],
            ys=[[m for _, m, _ in p["history"]] for p in with_history],
            keys=[p["name"] for p in with_history],
            title=f"{metric} vs. log10 training compute (Gflops)",
            xname="log10 training compute",
        ),
        "scaling/fid_over_training": wandb.plot.line_series(
            xs=[[s for s, _, _ in p["history"]] for p in with_history],
            ys=[[m for _, m, _ in p["history"]] for p in with_history],
            keys=[p["name"] for p in with_history],
            title=f"{metric} over training",
            xname="training steps",
        ),
    }


def log_sweep_charts(points, runs, figures, *, project, group, name, folder, offline, entity=None):
    """Create the sweep's summary run and log its tables, charts and `figures` ({name: PNG path});
    returns the run's folder (offline: the one `wandb sync` uploads)."""
    import wandb

    run = wandb.init(
        project=project,
        entity=entity,
        group=group,
        name=name,
        job_type="sweep-summary",
        dir=str(folder),
        mode="offline" if offline else None,  # else as the jobs: wandb's settings (WANDB_MODE, its login) decide
        config=dict(sweep=group, runs=len(runs), configs=len(points), metric=points[0]["metric_name"]),
        reinit="create_new",
    )
    try:
        configs, per_run, history = tables(points, runs)
        logged = {"scaling/configs": configs, "scaling/runs": per_run, "scaling/history": history}
        logged.update(charts(points, configs))
        logged.update({f"scaling/figures/{key}": wandb.Image(str(path)) for key, path in figures.items()})
        run.log(logged)
        return run.dir.rsplit("/files", 1)[0] if run.dir.endswith("/files") else run.dir
    finally:
        run.finish()
