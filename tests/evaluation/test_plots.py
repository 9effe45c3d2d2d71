"""The scaling plots (dit.evaluation.plots) and notebooks/scaling.ipynb on the tiny sweep."""

import os

import nbformat
import numpy as np
import pytest
from conftest import ROOT
from nbclient import NotebookClient
from PIL import Image

from dit.evaluation.plots import fid_vs_compute, load_runs, save_figures


def assert_nonblank_png(path):
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert pixels.shape[0] > 100 and pixels.std() > 5, f"{path} is blank"


def test_plots_from_the_sweep(sweep, tmp_path):
    runs = load_runs([sweep])
    assert [r["name"] for r in runs] == ["DiT-custom/4", "DiT-custom/2"]  # sorted by Gflops
    for run in runs:
        assert run["batch"] == 16 and [s for s, _ in run["fid"]] == [3, 6] and len(run["loss"]) >= 3
    # training compute = Gflops × batch × steps × 3 (paper Fig. 9)
    lines = fid_vs_compute(runs).axes[0].get_lines()
    for line, run in zip(lines, runs):
        assert np.allclose(line.get_xdata(), [run["gflops"] * 16 * s * 3 for s in (3, 6)])
        assert np.allclose(line.get_ydata(), [fid for _, fid in run["fid"]])
    for path in save_figures(runs, tmp_path).values():
        assert_nonblank_png(path)
    with pytest.raises(FileNotFoundError, match="no run with CSV logs"):
        load_runs([tmp_path])


def test_plots_read_a_wandb_project_through_the_public_api(sweep, monkeypatch):
    """`wandb:<entity>/<project>` goes through wandb.Api (no server here): a stand-in serves the
    sweep's own logged config and metrics the way the public API does (run.config, and
    run.scan_history(keys) yielding the rows that hold every key asked for, with just those keys);
    the runs read must equal those read from the folders."""
    import csv

    import wandb
    import yaml

    class Run:
        def __init__(self, folder):
            log = sorted(folder.rglob("metrics.csv"))[-1]
            self.config = yaml.safe_load((log.parent / "hparams.yaml").read_text())
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
    assert len(from_wandb) == 2 and all(r["source"].startswith("https://wandb.ai/team/dit/runs/") for r in from_wandb)
    for ours, theirs in zip(from_wandb, from_folders):
        assert {k: v for k, v in ours.items() if k != "source"} == {k: v for k, v in theirs.items() if k != "source"}


def test_scaling_notebook_runs_on_the_sweep(sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_SWEEP", str(sweep))
    monkeypatch.setenv("DIT_FIGS", str(tmp_path / "figs"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    notebook = nbformat.read(ROOT / "notebooks" / "scaling.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    shown = [
        o
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.outputs
        if "image/png" in o.get("data", {})
    ]
    assert len(shown) == 4
    for name in ("fid_vs_gflops", "fid_vs_compute", "fid_vs_steps", "loss_curves"):
        assert_nonblank_png(tmp_path / "figs" / f"{name}.png")
