"""The in-training FID monitor (dit.evaluation.fid_monitor) on a real tiny sweep: two models
trained 6 steps each with FID of 3 EMA samples every 3 steps, a random Inception of torch-fidelity's
own class against statistics of real digits. Its progress bars on a stand-in for a run's trainer."""

from functools import partial

import numpy as np
import pytest
import torch
from conftest import bars, stand_in_run, write_pngs
from tqdm import tqdm

from dit.diffusion.samplers import DDIM
from dit.evaluation.fid_monitor import FIDMonitor


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
    z = create_diffusion("5").p_sample_loop(
        model, noise.shape, noise, model_kwargs=dict(y=torch.arange(3)), generator=generator
    )
    images = to_uint8(z).permute(0, 3, 1, 2).expand(-1, 3, -1, -1)
    with torch.no_grad():
        pool = inception(random_inception)(images)[0]
    expected = frechet_distance(pool, dict(np.load(sweep.parent / "digits_ref.npz")))
    rows = csv.DictReader((sweep / "0" / "csv" / "version_0" / "metrics.csv").open())
    logged = next(float(r["val/fid"]) for r in rows if r["val/fid"] and r["step"] == "6")
    assert logged == pytest.approx(expected, rel=1e-4)


def test_fid_monitor_shows_one_bar_of_all_ranks_samples_where_lightning_shows_its_own(monkeypatch, capsys):
    """10 samples in batches of 4: one bar on rank 0 that counts every rank's samples, none on rank
    1 or with the run's bar off. The bar is erased when done (leave=False, under the training bar):
    here every update is drawn, as in a real run's seconds-long batches, so its last count is seen."""
    from dit.evaluation.digit_features import DigitClassifier

    monkeypatch.setattr("dit.evaluation.fid_monitor.tqdm", partial(tqdm, mininterval=0, miniters=1))
    # an unfitted feature network (fitting one takes seconds): the bars are under test, not the features
    monkeypatch.setattr("dit.evaluation.fid_monitor.digit_feature_network", lambda: DigitClassifier().eval())
    monitor = FIDMonitor("digits", DDIM("ddim5"), num_samples=10, batch_size=4, features="digits")
    for (rank, world, refresh_rate), expected in [
        ((0, 1, 20), ["10/10"]),
        ((0, 2, 20), ["10/10"]),  # rank 0 draws batches 0 and 2, rank 1 batch 1: 10 in all
        ((1, 2, 20), []),
        ((0, 1, 0), []),
    ]:
        trainer, module = stand_in_run(rank, world, refresh_rate)
        monitor.setup(trainer, module, "fit")
        monitor.measure(trainer, module)
        assert bars(capsys.readouterr().err, "digits FD samples") == expected, (rank, world, refresh_rate)


def test_fid_monitor_reference_bar_on_rank_0_only(random_inception, tmp_path, capsys):
    """The reference's Inception features: a bar on rank 0, which alone computes them, where Lightning
    shows its bar; the samples' features of a measurement draw none of their own (the monitor's bar
    counts them)."""
    from dit.evaluation.fid import digit_images

    write_pngs(torch.stack([digit_images()[i] for i in range(2)]), tmp_path / "real")
    monitor = FIDMonitor(str(tmp_path / "real"), DDIM("ddim5"), inception_weights=str(random_inception))
    for rank, refresh_rate, expected in [(0, 20, ["2/2"]), (1, 20, []), (0, 0, [])]:
        trainer, module = stand_in_run(rank, world=2, refresh_rate=refresh_rate)
        monitor.setup(trainer, module, "fit")
        assert bars(capsys.readouterr().err, "FID features (reference)") == expected, (rank, refresh_rate)
    monitor.extract(torch.rand(2, 1, 8, 8) * 2 - 1)
    assert capsys.readouterr().err == ""
