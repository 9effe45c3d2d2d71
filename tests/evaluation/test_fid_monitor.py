"""The in-training FID monitor (dit.evaluation.fid_monitor) on a real tiny sweep: two models
trained 6 steps each with FID of 3 EMA samples every 3 steps, a random Inception of torch-fidelity's
own class against statistics of real digits."""

import numpy as np
import pytest
import torch


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
