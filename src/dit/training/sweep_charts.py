"""At the end of a multirun, the sweep's scaling charts: FID against Gflops, against training compute,
and over training (paper Figs. 6, 8, 9), from its jobs' summaries.

This Hydra callback (conf/train.yaml, hydra.callbacks) draws the PNG figures of dit.evaluation.plots
into `<sweep>/charts/` with the table of plotted points (`points.json`), and, where the sweep logs to
wandb, creates the sweep's summary run with the same tables and charts (dit.evaluation.wandb_charts).
A sweep rerun with name=... resume=auto redraws them from every job's summary. Drawing never fails
the sweep: a problem is one line, and `python -m dit.plots <sweep> --out <folder>` draws them again.
"""

import json
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf


class SweepCharts(Callback):
    def on_multirun_end(self, config, **kwargs):
        sweep = Path(str(config.hydra.sweep.dir))
        try:
            draw_sweep_charts(config, sweep)
        except Exception as error:  # the jobs' results are on disk whatever happens here
            print(
                f"could not draw the sweep's charts ({type(error).__name__}: {error}); "
                f"draw them with: python -m dit.plots {sweep} --out {sweep / 'charts'}",
                file=sys.stderr,
            )


def draw_sweep_charts(config, sweep):
    """The figures, points.json and (logger=wandb) the summary run of the sweep in `sweep`."""
    from dit.evaluation.plots import describe, save_figures
    from dit.evaluation.run_summaries import aggregate, load_runs

    try:
        runs = load_runs([sweep])
    except FileNotFoundError:
        print(f"the sweep in {sweep} has no run summaries to chart")
        return None
    points = aggregate(runs)
    out = sweep / "charts"
    figures = save_figures(runs, out)
    (out / "points.json").write_text(
        json.dumps([{k: v for k, v in p.items() if k != "runs"} for p in points], indent=1)
    )
    print(f"\nthe sweep's {len(runs)} runs as {len(points)} points (each at its final measurement):")
    for line in describe(points):
        print(line)
    print(f"charts: {out}")
    logger = OmegaConf.select(config, "logger", default=None)
    if points and logger is not None and str(logger.get("_target_", "")).endswith("WandbLogger"):
        from dit.evaluation.wandb_charts import log_sweep_charts

        offline = bool(OmegaConf.select(config, "logger.offline", default=False))
        folder = log_sweep_charts(
            points,
            runs,
            figures,
            project=OmegaConf.select(config, "logger.project", default="dit"),
            entity=OmegaConf.select(config, "logger.entity", default=None),
            group=str(config.hydra.sweep.dir),
            name=f"scaling charts ({sweep.name})",
            folder=sweep,
            offline=offline,
        )
        how = f"; upload the sweep with: wandb sync {sweep}/wandb/offline-run-* {sweep}/*/wandb/offline-run-*"
        print(f"wandb: the sweep's charts are in run {folder}{how if offline else ''}")
    return points
