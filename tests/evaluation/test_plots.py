"""The scaling charts on the tiny sweep (tests/conftest.py `sweep`: patch 2 and 4 × seeds 0 and 1,
FID of 3 samples at steps 3 and 6): the runs' summaries, their seeds as one point, the figures that
the sweep drew at its end, its wandb summary run, dit.plots and notebooks/scaling.ipynb."""

import csv
import json
import math
import os

import nbformat
import numpy as np
import pytest
import yaml
from conftest import ROOT
from nbclient import NotebookClient
from PIL import Image

from dit.evaluation.plots import fid_vs_compute, fid_vs_gflops, main, save_figures
from dit.evaluation.run_summaries import aggregate, load_runs

FIGURES = ("fid_vs_gflops", "fid_vs_compute", "fid_vs_steps", "loss_curves")


def assert_nonblank_png(path):
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert pixels.shape[0] > 100 and pixels.std() > 5, f"{path} is blank"


def test_the_sweeps_runs_and_their_seeds_as_one_point(sweep, tmp_path):
    runs = load_runs([sweep])
    assert [(r["name"], r["seed"]) for r in runs] == [
        ("DiT-d4w128/4", 0),
        ("DiT-d4w128/4", 1),
        ("DiT-d4w128/2", 0),
        ("DiT-d4w128/2", 1),
    ]  # sorted by Gflops, then seed
    for run in runs:
        assert run["batch"] == 16 and [s for s, _ in run["history"]] == [3, 6] and len(run["loss"]) >= 3
        assert run["final"] == run["history"][-1] and run["metric_name"] == "FID"
    assert runs[0]["group"] == runs[1]["group"] != runs[2]["group"]  # seeds of one config share a group
    assert runs[0]["history"] != runs[1]["history"]  # ... and are different runs
    points = aggregate(runs)
    assert [(p["name"], p["seeds"]) for p in points] == [("DiT-d4w128/4", [0, 1]), ("DiT-d4w128/2", [0, 1])]
    for point, seeds in zip(points, (runs[:2], runs[2:])):
        finals = [r["final"][1] for r in seeds]
        assert point["final"] == pytest.approx(np.mean(finals))
        assert point["final_spread"] == pytest.approx(np.std(finals, ddof=1))
        assert [s for s, _, _ in point["history"]] == [3, 6]
    # training compute = Gflops × batch × steps × 3 (paper Fig. 9), at the seeds' mean FID
    for line, point in zip(fid_vs_compute(points).axes[0].get_lines(), points):
        assert np.allclose(line.get_xdata(), [point["gflops"] * 16 * s * 3 for s in (3, 6)])
        assert np.allclose(line.get_ydata(), [m for _, m, _ in point["history"]])
    # FID vs Gflops: one line per patch size, at the final FID, error bars of the seeds' spread
    ax = fid_vs_gflops(points).axes[0]
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_legend().get_texts()] == ["patch 2", "patch 4"]
    for path in save_figures(runs, tmp_path).values():
        assert_nonblank_png(path)
    with pytest.raises(FileNotFoundError, match="no run with a summary.json or a CSV log"):
        load_runs([tmp_path])


def test_the_sweep_ended_by_drawing_its_charts_and_its_wandb_run(sweep):
    """The Hydra callback (dit.training.sweep_charts) at the end of the multirun: the figures and the
    table of points in <sweep>/charts, and an offline wandb run of the sweep's charts (its contents
    are tested in tests/evaluation/test_wandb_charts.py)."""
    for name in FIGURES:
        assert_nonblank_png(sweep / "charts" / f"{name}.png")
    drawn = json.loads((sweep / "charts" / "points.json").read_text())
    assert drawn == json.loads(
        json.dumps([{k: v for k, v in p.items() if k != "runs"} for p in aggregate(load_runs([sweep]))])
    )
    (run,) = (sweep / "wandb").glob("offline-run-*")  # the summary run, beside the jobs' own
    record = next(run.glob("*.wandb")).read_bytes()
    assert b"sweep-summary" in record and b"wandb/lineseries/v0" in record and str(sweep).encode() in record
    assert any("configs" in p.name for p in run.rglob("*.table.json"))


def test_dit_plots_prints_the_points_and_writes_the_figures(sweep, tmp_path, capsys):
    main([str(sweep), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "DiT-d4w128/2" in out and "over seeds [0, 1]" in out and "at step 6" in out
    assert all((tmp_path / f"{name}.png").is_file() for name in FIGURES)


def test_runs_from_before_summaries_are_read_from_their_csv_logs(sweep, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(sweep / "0", old, ignore=shutil.ignore_patterns("wandb", "checkpoints"))
    (old / "summary.json").unlink()
    (legacy,) = load_runs([old])
    (current,) = [r for r in load_runs([sweep]) if r["source"] == str(sweep / "0")]
    assert legacy["history"] == current["history"] and legacy["loss"] == current["loss"]
    assert legacy["gflops"] == current["gflops"] and legacy["name"] == current["name"]


@pytest.mark.parametrize("content", ["{cut sh", "[]"])
def test_a_broken_summary_is_named(sweep, tmp_path, content):
    import shutil

    from dit.errors import UsageError

    broken = tmp_path / "broken"
    shutil.copytree(sweep / "0", broken, ignore=shutil.ignore_patterns("wandb", "checkpoints"))
    (broken / "summary.json").write_text(content)
    with pytest.raises(UsageError, match=f"{broken / 'summary.json'} (is not valid JSON|holds no run summary)"):
        load_runs([broken])


def test_plots_read_a_wandb_project_through_the_public_api(sweep, monkeypatch):
    """`wandb:<entity>/<project>` goes through wandb.Api (no server here): a stand-in serves each job's
    logged config (what train.py gave log_hyperparams: its hparams.yaml) and its metrics as the public
    API does (run.scan_history(keys) yields the rows that hold every key asked for, with just those
    keys); the runs read must equal those read from the folders."""
    import wandb

    class Run:
        def __init__(self, folder):
            log = sorted(folder.rglob("metrics.csv"))[-1]
            self.config = yaml.safe_load((log.parent / "hparams.yaml").read_text())
            self.summary = {"_runtime": 1.0}
            self.rows = [
                {("trainer/global_step" if k == "step" else k): v for k, v in r.items()}
                for r in csv.DictReader(log.open())
            ]
            self.url = f"https://wandb.ai/team/dit/runs/{folder.name}"

        def scan_history(self, keys):
            return [
                {k: float(row[k]) for k in keys} for row in self.rows if all(row.get(k) not in (None, "") for k in keys)
            ]

    class Api:
        def runs(self, project):
            assert project == "team/dit"
            return [Run(folder) for folder in sorted(sweep.iterdir()) if (folder / ".hydra").is_dir()]

    monkeypatch.setattr(wandb, "Api", Api)
    from_wandb, from_folders = load_runs(["wandb:team/dit"]), load_runs([sweep])
    assert len(from_wandb) == 4 and all(r["source"].startswith("https://wandb.ai/team/dit/runs/") for r in from_wandb)
    for ours, theirs in zip(from_wandb, from_folders):
        assert {k: v for k, v in ours.items() if k != "source"} == {k: v for k, v in theirs.items() if k != "source"}
    assert not math.isnan(aggregate(from_wandb)[0]["final_spread"])


def test_scaling_notebook_runs_on_the_sweep(sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_SWEEP", str(sweep))
    monkeypatch.setenv("DIT_FIGS", str(tmp_path / "figs"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    notebook = nbformat.read(ROOT / "notebooks" / "scaling.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    shown = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(shown) == 4
    printed = "".join(o.get("text", "") for o in outputs)
    assert "DiT-d4w128/2" in printed and "over seeds [0, 1]" in printed  # the same points as dit.plots
    for name in FIGURES:
        assert_nonblank_png(tmp_path / "figs" / f"{name}.png")
