"""The in-training FID monitor (dit.evaluation.fid_monitor) on a real tiny sweep: two models
trained 6 steps each with FID of 3 EMA samples every 3 steps, a random Inception of torch-fidelity's
own class against statistics of real digits. Its progress bars on a stand-in for a run's trainer, and
its history and best across a resume: continued under the same measurement protocol, started anew
under another."""

import math
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import bars, stand_in_run, write_pngs
from tqdm import tqdm

from dit.diffusion.samplers import DDIM
from dit.evaluation.fid_monitor import FIDMonitor

BROADCAST = {}  # what the stand-ins' rank 0 last broadcast, as the other ranks receive it


def stand_in(rank=0, world=1, refresh_rate=0):
    """stand_in_run's trainer and module, with a strategy whose broadcast gives every rank what rank
    0 sent (the ranks are run one after the other, rank 0 first)."""

    def broadcast(obj, src=0):
        if rank == src:
            BROADCAST["last"] = obj
        return BROADCAST["last"]

    trainer, module = stand_in_run(rank, world, refresh_rate)
    trainer.strategy = SimpleNamespace(broadcast=broadcast)
    return trainer, module


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
        trainer, module = stand_in(rank, world, refresh_rate)
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
        trainer, module = stand_in(rank, world=2, refresh_rate=refresh_rate)
        monitor.setup(trainer, module, "fit")
        assert bars(capsys.readouterr().err, "FID features (reference)") == expected, (rank, refresh_rate)
    monitor.extract(torch.rand(2, 1, 8, 8) * 2 - 1)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- the protocol across a resume


@pytest.fixture
def unfitted_digit_features(monkeypatch):
    """The digits FD's network unfitted (fitting takes seconds) but fixed: its weights are part of
    the protocol, so every launch gets the same ones, as from the cache."""
    from dit.evaluation.digit_features import DigitClassifier

    torch.manual_seed(0)
    net = DigitClassifier().eval()
    monkeypatch.setattr("dit.evaluation.fid_monitor.digit_feature_network", lambda: net)


def launch(monitor, state=None):
    """A launch of the monitor on a stand-in trainer: set up as Lightning does (setup, then the
    checkpoint's state), with measurements stood in for by `measure_as`."""
    trainer, module = stand_in()
    trainer.callbacks.append(monitor)
    monitor.setup(trainer, module, "fit")
    if state is not None:
        monitor.load_state_dict(checkpointed(state))
    return trainer, module


def checkpointed(state):
    """`state` through torch.save and torch.load(weights_only=True), as a checkpoint keeps it."""
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def measure_as(monkeypatch, monitor, trainer, module, values):
    """Measurements at steps {step: value}, through the monitor's own end-of-batch hook."""
    for step, value in values.items():
        monkeypatch.setattr(monitor, "measure", lambda trainer, module, value=value: value)
        trainer.global_step = step
        monitor.on_train_batch_end(trainer, module, None, None, 0)


def digits_fd(**kwargs):
    """A digits FD monitor (callbacks=fid_digits) that measures every 10 steps."""
    settings = dict(ref="digits", sampler=DDIM("ddim5"), every_n_steps=10, num_samples=200, batch_size=50)
    return FIDMonitor(**(settings | dict(features="digits") | kwargs))


def summary_metric(trainer, tmp_path):
    """The `metric` of the run's summary.json (dit.training.run_summary) at this point."""
    from dit.training.run_summary import RunSummary

    model = dict(name="DiT-tiny", params=1, gflops=1.0, tokens=16, conditioning="adaln_zero")
    config = dict(model=dict(patch_size=2), data=dict(global_batch_size=16))
    return RunSummary(tmp_path, model, config).summary(trainer, "running")["metric"]


def test_a_resume_under_the_same_protocol_continues_the_history_and_best(
    unfitted_digit_features, monkeypatch, capsys, tmp_path
):
    """Same settings, or settings that choose only which samples are drawn (seed, batch_size) or
    that unguided sampling never uses (the guidance variant at scale 1): one history, one best;
    whether the state comes before or after setup."""
    first = digits_fd()
    trainer, module = launch(first)
    measure_as(monkeypatch, first, trainer, module, {10: 30.0, 20: 25.0})
    state = first.state_dict()
    assert state["protocol"] == first.protocol and state["protocol"]["num_samples"] == 200

    for again in (digits_fd(), digits_fd(seed=7, batch_size=40, guidance="all_channels")):
        trainer, module = launch(again, state)
        assert again.history == [(10, 30.0), (20, 25.0)] and again.best == 25.0 and again.earlier == []
        measure_as(monkeypatch, again, trainer, module, {30: 27.0})
        assert again.history == [(10, 30.0), (20, 25.0), (30, 27.0)] and again.best == 25.0
        metric = summary_metric(trainer, tmp_path)
        assert metric["history"] == [[10, 30.0], [20, 25.0], [30, 27.0]] and metric["best"] == 25.0
        assert metric["earlier"] == []
    assert "anew" not in capsys.readouterr().out

    # Lightning restores a callback's state after its setup; the other order gives the same.
    later = digits_fd()
    later.load_state_dict(checkpointed(state))
    launch(later)
    assert later.history == [(10, 30.0), (20, 25.0)] and later.best == 25.0


def test_a_resume_under_another_protocol_starts_the_history_and_best_anew(
    unfitted_digit_features, monkeypatch, capsys, tmp_path
):
    """num_samples 200 -> 20 and another sampler: the next measurement is the only one of the new
    history and its best; the earlier ones are kept apart, with their protocol, and say so once."""
    first = digits_fd()
    trainer, module = launch(first)
    measure_as(monkeypatch, first, trainer, module, {10: 30.0, 20: 25.0})
    capsys.readouterr()

    second = digits_fd(sampler=DDIM("ddim10"), num_samples=20)
    trainer, module = launch(second, first.state_dict())
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FID monitor:")]
    assert len(lines) == 1, lines
    assert "the protocol changed (num_samples: 200 -> 20, sampler: DDIM(steps='ddim5'" in lines[0]
    assert "-> DDIM(steps='ddim10'" in lines[0] and "history and best start anew" in lines[0]
    assert second.history == [] and second.best == math.inf
    measure_as(monkeypatch, second, trainer, module, {30: 40.0})
    assert second.history == [(30, 40.0)] and second.best == 40.0  # not the 25.0 of 200 samples
    assert second.earlier == [
        dict(
            protocol=first.protocol, key="val/digits_fd", name="digits FD", best=25.0, history=[[10, 30.0], [20, 25.0]]
        )
    ]
    metric = summary_metric(trainer, tmp_path)
    assert metric["history"] == [[30, 40.0]] and (metric["final"], metric["best"]) == (40.0, 40.0)
    assert metric["protocol"]["num_samples"] == 20 and metric["earlier"] == second.earlier

    # a third launch, back at the first protocol: both earlier histories are kept, in order
    third = digits_fd()
    launch(third, checkpointed(second.state_dict()))
    assert third.history == [] and [e["history"] for e in third.earlier] == [[[10, 30.0], [20, 25.0]], [[30, 40.0]]]


def test_digits_fd_then_inception_fid_are_two_histories(
    unfitted_digit_features, random_inception, monkeypatch, capsys, tmp_path
):
    """callbacks=fid_digits, resumed with callbacks=fid: no digits FD in the FID's history or best,
    and the digits FD kept under its own key and name. Another reference (other statistics) is
    another protocol too."""
    from dit.evaluation.fid import digit_images

    digits = digit_images()
    write_pngs(torch.stack([digits[i] for i in range(2)]), tmp_path / "real")
    write_pngs(torch.stack([digits[i] for i in range(2, 4)]), tmp_path / "other")
    first = digits_fd()
    trainer, module = launch(first)
    measure_as(monkeypatch, first, trainer, module, {10: 1025.8, 20: 1017.2})
    capsys.readouterr()

    def inception_fid(ref):
        return FIDMonitor(
            str(ref), DDIM("ddim5"), every_n_steps=10, num_samples=200, inception_weights=str(random_inception)
        )

    fid = inception_fid(tmp_path / "real")
    trainer, module = launch(fid, first.state_dict())
    out = capsys.readouterr().out
    assert "the protocol changed (metric: digits -> inception, feature network weights:" in out
    measure_as(monkeypatch, fid, trainer, module, {30: 32.7})
    metric = summary_metric(trainer, tmp_path)
    assert (metric["key"], metric["name"]) == ("val/fid", "FID")
    assert metric["history"] == [[30, 32.7]] and metric["best"] == 32.7
    assert [(e["key"], e["name"], e["history"]) for e in metric["earlier"]] == [
        ("val/digits_fd", "digits FD", [[10, 1025.8], [20, 1017.2]])
    ]

    other = inception_fid(tmp_path / "other")
    launch(other, fid.state_dict())
    assert f"(ref: {tmp_path / 'real'} (statistics " in capsys.readouterr().out
    assert other.history == [] and [e["history"] for e in other.earlier][-1] == [[30, 32.7]]


def test_a_checkpoint_that_predates_the_protocol_starts_anew(unfitted_digit_features, capsys):
    """A state without a protocol may have been measured in any way: set apart, as of an unknown
    protocol, never merged."""
    monitor = digits_fd()
    launch(monitor, {"best": 25.0, "history": [[10, 30.0], [20, 25.0]]})
    assert monitor.history == [] and monitor.best == math.inf
    assert monitor.earlier == [dict(protocol=None, key=None, name=None, best=25.0, history=[[10, 30.0], [20, 25.0]])]
    assert "does not record how its values were measured" in capsys.readouterr().out
    # nothing measured yet: nothing to set apart, nothing to say
    fresh = digits_fd()
    launch(fresh, {"best": math.inf, "history": []})
    assert fresh.earlier == [] and capsys.readouterr().out == ""
