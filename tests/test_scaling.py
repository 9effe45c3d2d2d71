"""The in-training FID monitor, the scaling plots and notebooks/scaling.ipynb, on a real tiny sweep:
two models (patch 2 and 4) trained 6 steps each with FID of 3 EMA samples every 3 steps, measured
with a random Inception of torch-fidelity's own class against statistics of real digits."""

import os

import nbformat
import numpy as np
import pytest
import torch
from nbclient import NotebookClient
from PIL import Image
from test_fid import write_pngs
from test_training import QUICK, ROOT, run_train

from dit.evaluation.fid import main as fid_main
from dit.evaluation.plots import fid_vs_compute, load_runs, save_figures


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, digits_dir, random_inception):
    from dit.evaluation.fid import digit_images

    tmp = tmp_path_factory.mktemp("scaling")
    digits = digit_images()
    write_pngs(torch.stack([digits[i] for i in range(3)]), tmp / "real")
    fid_main(["--ref", str(tmp / "real"), "--resolution", "8", "--inception-weights", str(random_inception),
              "--save-ref-stats", str(tmp / "digits_ref.npz")])  # fmt: skip
    result = run_train(
        ["-m", "experiment=quickstart", f"data.path={digits_dir}", "patch=2,4", "trainer.max_steps=6",
         "trainer.val_check_interval=6", "trainer.log_every_n_steps=2", "data.global_batch_size=16",
         "callbacks.ema.multi_avg_fn.decay=0.5", "~callbacks.digits_accuracy", *QUICK, "callbacks=fid",
         f"callbacks.fid.ref={tmp / 'digits_ref.npz'}", f"callbacks.fid.inception_weights={random_inception}",
         "callbacks.fid.every_n_steps=3", "callbacks.fid.num_samples=3", "sampler.steps='5'",
         f"hydra.sweep.dir={tmp / 'sweep'}"],
        cwd=tmp,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "sweep"


def test_fid_monitor_logs_val_fid_and_its_minimum(sweep):
    import csv

    for job in ("0", "1"):
        rows = list(csv.DictReader((sweep / job / "csv" / "version_0" / "metrics.csv").open()))
        logged = [(int(r["step"]), float(r["val/fid"]), float(r["val/fid_best"])) for r in rows if r["val/fid"]]
        assert [step for step, _, _ in logged] == [3, 6]
        fids = [fid for _, fid, _ in logged]
        assert all(np.isfinite(fids)) and fids[0] != fids[1]  # the EMA weights moved between the two
        assert [best for _, _, best in logged] == [fids[0], min(fids)]


def test_fid_monitor_measures_the_ema_weights(sweep, random_inception):
    """The last FID of a job, recomputed here from the EMA weights in its final checkpoint (the live
    weights differ: EMA decay 0.5): the same samples (labels index % 10, the batch's generator), the
    same features, the same number."""
    import csv

    from dit.data.vae import to_uint8
    from dit.diffusion import create_diffusion
    from dit.evaluation.fid import frechet_distance, inception
    from dit.models import DiT

    ckpt = torch.load(sweep / "0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    model = DiT.from_state_dict(ckpt).eval()  # the run's recorded model config (tiny: 4 heads)
    # one batch (k = 0) of the three samples: its noise, then every step's, from one generator
    # seeded seed·2³² + k (dit.diffusion.sampling's scheme), with seed 0
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 1, 8, 8, generator=generator)
    z = create_diffusion("5").p_sample_loop(model, noise.shape, noise, model_kwargs=dict(y=torch.arange(3)),
                                            generator=generator)  # fmt: skip
    images = to_uint8(z).permute(0, 3, 1, 2).expand(-1, 3, -1, -1)
    with torch.no_grad():
        pool = inception(random_inception)(images)[0]
    expected = frechet_distance(pool, dict(np.load(sweep.parent / "digits_ref.npz")))
    rows = csv.DictReader((sweep / "0" / "csv" / "version_0" / "metrics.csv").open())
    logged = next(float(r["val/fid"]) for r in rows if r["val/fid"] and r["step"] == "6")
    assert logged == pytest.approx(expected, rel=1e-4)


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


def assert_nonblank_png(path):
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert pixels.shape[0] > 100 and pixels.std() > 5, f"{path} is blank"


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
