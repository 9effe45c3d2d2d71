"""Post-hoc EMA (dit.training.callbacks.posthoc_ema, EDM2 §3 and Appendix C): the power-function
update by hand and in closed form, the reconstruction of a third profile from the snapshots of two,
and the callback inside train.py, resumed bit for bit."""

import math

import numpy as np
import pytest
import torch
from conftest import one_line_error, quick_cfg

from dit.errors import UsageError
from dit.tools.posthoc_ema import main as posthoc_main
from dit.tools.posthoc_ema import solve_coefficients
from dit.training.callbacks.posthoc_ema import (
    PostHocEMA,
    PowerEMA,
    gamma_to_sigma_rel,
    power_beta,
    sigma_rel_to_gamma,
)


def profile_weights(step, gamma, length):
    """The weight of each step 1..length in the discrete power EMA at `step` (0 after it), in
    float64: (τ^(γ+1) - (τ-1)^(γ+1)) / t^(γ+1), the unrolled product of the β's."""
    tau = np.arange(1, length + 1, dtype=np.float64)
    w = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / step ** (gamma + 1)
    return np.where(tau <= step, w, 0.0)


def test_gamma_of_edm2s_profiles():
    """EDM2 §3.2 quotes γ = 16.97 and 6.94 for σ_rel = 0.05 and 0.10; Eq. 123 maps them back."""
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.05, 0.07, 0.1, 0.2, 0.28):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-12)
    for bad in (0, -0.1, 0.29, 1.0, "0.1", True):
        with pytest.raises(UsageError, match="in \\(0, 0.2887\\)"):
            sigma_rel_to_gamma(bad)


def test_update_by_hand_for_the_first_steps():
    """β_t = (1 - 1/t)^(γ+1): β_1 = 0 (the first update takes the weights whatever the average
    held), β_2 = (1/2)^(γ+1), β_3 = (2/3)^(γ+1), β_4 = (3/4)^(γ+1), and each update is
    θ̂ ← β θ̂ + (1 - β) θ; here for weights 1, 2, 4, 8 computed by hand."""
    gamma = sigma_rel_to_gamma(0.10)
    assert power_beta(1, gamma) == 0.0
    assert power_beta(2, gamma) == pytest.approx(0.5 ** (gamma + 1), rel=1e-15)
    assert power_beta(3, gamma) == pytest.approx((2 / 3) ** (gamma + 1), rel=1e-15)
    weight = torch.tensor([123.0])  # what the average starts from: forgotten at step 1
    ema = PowerEMA([0.10], {"w": weight})
    expected = None
    for t, value in enumerate([1.0, 2.0, 4.0, 8.0], start=1):
        beta = ((t - 1) / t) ** (gamma + 1)
        expected = value if t == 1 else beta * expected + (1 - beta) * value
        ema.update([torch.tensor([value])], t)
        assert ema.averages[0][0].item() == pytest.approx(expected, rel=1e-6), t
    assert ema.step == 4
    b2, b3, b4 = (0.5 ** (gamma + 1), (2 / 3) ** (gamma + 1), (0.75) ** (gamma + 1))
    by_hand = ((1 * b2 + 2 * (1 - b2)) * b3 + 4 * (1 - b3)) * b4 + 8 * (1 - b4)
    assert ema.averages[0][0].item() == pytest.approx(by_hand, rel=1e-6)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10])
def test_unrolled_update_weighs_each_step_by_the_profiles_integral(sigma_rel):
    """Weights that are the one-hot vector e_τ at step τ leave in the average exactly the weight
    of each step: (τ^(γ+1) - (τ-1)^(γ+1)) / T^(γ+1), the integral of EDM2's continuous profile
    p_T(x) = (γ+1) x^γ / T^(γ+1) (Eq. 121) over (τ-1, τ]. They sum to 1."""
    length = 60
    ema = PowerEMA([sigma_rel], {"w": torch.zeros(length)})
    for t in range(1, length + 1):
        ema.update([torch.nn.functional.one_hot(torch.tensor(t - 1), length).float()], t)
    expected = profile_weights(length, ema.gammas[0], length)
    assert expected.sum() == pytest.approx(1.0, rel=1e-12)
    torch.testing.assert_close(ema.averages[0][0].double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-7)


def random_walk_profiles(steps, every, dim=4096, seed=0):
    """A parameter vector on a deterministic Gaussian random walk (one N(0, 1) step per
    coordinate per training step: what SGD noise does to weights, with no model), tracked by
    EDM2's two profiles (snapshots every `every` steps) and by σ_rel = 0.07 directly."""
    generator = torch.Generator().manual_seed(seed)
    theta = torch.zeros(dim)
    pair = PowerEMA([0.05, 0.10], {"w": theta})
    third = PowerEMA([0.07], {"w": theta})
    snapshots, trajectory = [], []
    for t in range(1, steps + 1):
        theta = theta + torch.randn(dim, generator=generator)
        trajectory.append(theta.double())
        pair.update([theta], t)
        third.update([theta], t)
        if t % every == 0:
            snapshots += [(t, g, avg[0].clone()) for g, avg in zip(pair.gammas, pair.averages)]
    return snapshots, third, theta, torch.stack(trajectory)


def reconstruct(snapshots, step, gamma):
    usable = [s for s in snapshots if s[0] <= step]
    x = solve_coefficients([s[0] for s in usable], [s[1] for s in usable], step, gamma)
    return x, usable, sum(float(c) * s[2].double() for c, s in zip(x, usable))


def test_reconstruction_from_two_profiles_matches_a_third_tracked_directly():
    """THE check of post-hoc EMA: σ_rel = 0.07, rebuilt from the snapshots of 0.05 and 0.10, is
    the σ_rel = 0.07 EMA tracked step by step, to within a relative error of 1e-4.

    The error is measured against the distance of that EMA from the live weights (what averaging
    changes), RMS over 4096 coordinates of a random walk. Where the tolerance comes from: the
    discrete averages weigh each step by the integral of the continuous profile over it (test
    above), so the only error is that of EDM2's least-squares fit of the continuous profiles
    (Appendix C.3), which depends on the number of snapshots per profile, not their spacing (the
    profiles are self-similar). With 40 per profile (every 10 of 400 steps) it predicts 3.1e-5
    for this trajectory, computed below in float64 from the closed-form weights, independently of
    the fitted average; fp32 rounding of the running averages adds ~5e-7. 1e-4 leaves 3x of room
    and still fails where 10 snapshots per profile are used (2.2e-3), and for a wrong γ or β by far.
    EDM2 reports the reconstruction close but not exact: it is above rounding here too."""
    steps = 400
    snapshots, third, live, trajectory = random_walk_profiles(steps, every=10)
    direct = third.averages[0][0].double()
    scale = (direct - live.double()).pow(2).mean().sqrt()  # ~3.9: the EMA trails the walk by ~σ_rel·t steps
    x, usable, rebuilt = reconstruct(snapshots, steps, third.gammas[0])
    assert x.sum() == pytest.approx(1.0, abs=1e-12) and len(usable) == 80
    error = ((rebuilt - direct).pow(2).mean().sqrt() / scale).item()
    # The error predicted from the weights alone: Σ_τ (ŵ_τ - w_τ) θ_τ, ŵ the fitted combination
    # of the snapshots' closed-form weights, w the target's.
    fitted = sum(c * profile_weights(t, g, steps) for c, (t, g, _) in zip(x, usable))
    mismatch = torch.from_numpy(fitted - profile_weights(steps, third.gammas[0], steps))
    predicted = mismatch @ trajectory
    predicted_error = (predicted.pow(2).mean().sqrt() / scale).item()
    assert 1e-6 < error < 1e-4, error
    assert predicted_error == pytest.approx(error, rel=0.05), (predicted_error, error)
    # ...and per coordinate: the measured residual is the predicted one, to fp32 rounding
    assert ((rebuilt - direct - predicted).pow(2).mean().sqrt() / scale).item() < 2e-6
    # The fit is exact where the target is a snapshot: σ_rel 0.05 at a snapshot's step
    _, _, same = reconstruct(snapshots, steps, snapshots[-2][1])
    assert ((same - snapshots[-2][2].double()).abs().max() / scale).item() < 1e-6
    # Fewer snapshots, a looser fit: every 40 steps (10 per profile) is ~70x worse
    sparse = [s for s in snapshots if s[0] % 40 == 0]
    _, _, coarse = reconstruct(sparse, steps, third.gammas[0])
    assert ((coarse - direct).pow(2).mean().sqrt() / scale).item() > 30 * error


def test_reconstruction_at_an_earlier_step_uses_the_snapshots_up_to_it():
    """At step 200 of the 400, from the 20 snapshots per profile before it, against the 0.07 EMA
    of step 200 (the same walk, cut at 200): 20 snapshots per profile, 2.6e-4 measured."""
    snapshots, _, _, _ = random_walk_profiles(400, every=10)
    earlier, third, live, _ = random_walk_profiles(200, every=10)
    assert [s[0] for s in earlier] == [s[0] for s in snapshots if s[0] <= 200]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(earlier, snapshots))  # the same walk, cut at 200
    direct = third.averages[0][0].double()
    scale = (direct - live.double()).pow(2).mean().sqrt()
    x, usable, rebuilt = reconstruct(snapshots, 200, third.gammas[0])
    assert len(usable) == 40
    assert ((rebuilt - direct).pow(2).mean().sqrt() / scale).item() < 1e-3


def test_update_never_reads_the_device():
    """On the meta device any read back to the host fails: the update is host floats and foreach ops."""
    with torch.device("meta"):
        weights = {"a": torch.empty(5, 3), "b": torch.empty(7)}
    ema = PowerEMA([0.05, 0.10], weights)
    for t in range(1, 4):
        ema.update(list(weights.values()), t)
    assert ema.step == 3 and ema.averages[0][0].device.type == "meta"


def test_a_resume_with_other_profiles_is_refused():
    weights = {"w": torch.zeros(3)}
    saved = PowerEMA([0.05, 0.10], weights).state_dict()
    with pytest.raises(UsageError, match=r"a profile cannot change mid-run; resume with .*sigma_rels=\[0.05,0.1\]"):
        PowerEMA([0.05, 0.15], weights).load_state_dict(saved)
    with pytest.raises(UsageError, match="a profile cannot change mid-run"):
        PowerEMA([0.05, 0.10, 0.2], weights).load_state_dict(saved)
    with pytest.raises(UsageError, match="averages other weights than this model's"):
        PowerEMA([0.05, 0.10], {"v": torch.zeros(3)}).load_state_dict(saved)
    with pytest.raises(UsageError, match="snapshot_every"):
        PostHocEMA(snapshot_every=0)


# ---------------------------------------------------------------- inside train.py


def train_run(out, digits_dir, *overrides, callbacks="[default,posthoc_ema]"):
    """A tiny digits run (batch 32, no sample grid) with the posthoc_ema callback, as a user adds
    it: `callbacks=[default,posthoc_ema]` (conf/callbacks/posthoc_ema.yaml)."""
    import train

    cfg = quick_cfg(
        out,
        digits_dir,
        f"callbacks={callbacks}",
        *(["callbacks.posthoc_ema.snapshot_every=4"] if "posthoc_ema" in callbacks else []),
        "data.global_batch_size=32",
        "trainer.val_check_interval=1000",
        "callbacks.checkpoint.every_n_train_steps=1000",
        "callbacks.progress_bar.refresh_rate=0",
        "~callbacks.digits_accuracy",
        *overrides,
    )
    train.main(cfg)
    return out


def snapshots(run):
    return {p.name: torch.load(p, weights_only=False) for p in sorted((run / "phema").glob("*.pt"))}


def test_callback_in_train_py_snapshots_and_resumes_bit_for_bit(tmp_path, digits_dir):
    """12 steps in one go and 6 + 6 resumed (resume=auto): the same snapshots every 4 steps and at
    the last, the same averages in last.ckpt, bit for bit. The snapshot of the last step is the
    callback's state: the average of the live weights, not the live weights nor the EMA's."""
    full = train_run(tmp_path / "full", digits_dir, "trainer.max_steps=12", "name=full")
    train_run(tmp_path / "split", digits_dir, "trainer.max_steps=6", "name=split")
    split = train_run(tmp_path / "split", digits_dir, "trainer.max_steps=12", "name=split", "resume=auto")
    a, b = snapshots(full), snapshots(split)
    names = [f"phema-{s:07d}-{r}.pt" for s in (4, 8, 12) for r in ("0.050", "0.100")]
    assert list(a) == names and set(names) <= set(b) and "phema-0000006-0.050.pt" in b  # 6: the first launch's end
    for name in names:
        assert a[name]["manifest"] | {"run": None} == b[name]["manifest"] | {"run": None}, name
        for k, v in a[name]["ema"].items():
            assert v.dtype == torch.float32 and torch.equal(v, b[name]["ema"][k]), (name, k)
    last = a["phema-0000012-0.100.pt"]
    assert last["manifest"]["step"] == 12 and last["manifest"]["gamma"] == pytest.approx(6.94, abs=0.01)
    assert last["config"]["model"]["num_heads"] == 4 and last["manifest"]["run"]["run_id"]
    ckpts = [torch.load(r / "checkpoints" / "last.ckpt", weights_only=False) for r in (full, split)]
    states = [c["callbacks"]["PostHocEMA"] for c in ckpts]
    assert states[0]["step"] == states[1]["step"] == 12 and states[0]["sigma_rels"] == [0.05, 0.10]
    for mine, theirs in zip(states[0]["averages"], states[1]["averages"]):
        assert all(torch.equal(x, y) for x, y in zip(mine, theirs))
    averaged = dict(zip(states[0]["names"], states[0]["averages"][1]))
    live = {k.removeprefix("model."): v for k, v in ckpts[0]["current_model_state"].items()}
    ema = {k.removeprefix("model."): v for k, v in ckpts[0]["state_dict"].items()}
    for k, v in averaged.items():
        assert torch.equal(last["ema"][k], v), k
    assert not torch.equal(averaged["final_layer.linear.weight"], live["final_layer.linear.weight"])
    assert not torch.equal(averaged["final_layer.linear.weight"], ema["final_layer.linear.weight"])
    assert torch.equal(last["ema"]["pos_embed"], live["pos_embed"])  # frozen: copied, not averaged


@pytest.mark.parametrize(
    "override, message",
    [
        ("callbacks.posthoc_ema.snapshot_every=0", "callbacks.posthoc_ema.snapshot_every=0: give a number of steps"),
        ("callbacks.posthoc_ema.sigma_rels=[0.05,0.5]", "callbacks.posthoc_ema.sigma_rels=0.5: a relative EMA width"),
    ],
)
def test_a_bad_setting_stops_train_py_in_one_line(tmp_path, digits_dir, capsys, override, message):
    with pytest.raises(SystemExit):
        train_run(tmp_path, digits_dir, "trainer.max_steps=1", override)
    one_line_error(capsys.readouterr().err, message)
    assert not (tmp_path / "phema").exists()


def test_profiles_of_train_py_follow_the_update(tmp_path, digits_dir, monkeypatch):
    """Under train.py the average is β_t θ̂ + (1 - β_t) θ_t of the live weights after every
    optimizer step: the weights after each step are recorded, and the update replayed on them."""
    seen = []
    original = PostHocEMA.on_train_batch_end

    def recorded(self, trainer, pl_module, outputs, batch, batch_idx):
        seen.append(pl_module.model.final_layer.linear.weight.detach().clone())
        original(self, trainer, pl_module, outputs, batch, batch_idx)

    monkeypatch.setattr(PostHocEMA, "on_train_batch_end", recorded)
    train_run(tmp_path, digits_dir, "trainer.max_steps=5")
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]["PostHocEMA"]
    index = state["names"].index("final_layer.linear.weight")
    assert len(seen) == 5 and state["step"] == 5 and state["since"] == 0
    assert math.isclose(state["gammas"][0], sigma_rel_to_gamma(0.05))
    for gamma, averages in zip(state["gammas"], state["averages"]):
        expected = seen[0].double()  # β_1 = 0
        for t, w in enumerate(seen[1:], start=2):
            beta = (1 - 1 / t) ** (gamma + 1)
            expected = beta * expected + (1 - beta) * w.double()
        torch.testing.assert_close(averages[index].double(), expected, rtol=1e-5, atol=1e-7)


def test_added_to_a_run_under_way_it_counts_the_runs_steps(tmp_path, digits_dir, capsys):
    """Added on resume (a change of settings: accept_changes=true), the profiles keep the run's step
    as their time and say since when they were tracked; the tool's output says it is approximate."""
    train_run(tmp_path, digits_dir, "trainer.max_steps=4", "name=late", callbacks="default")
    with pytest.warns(UserWarning, match="post-hoc EMA starts at step 4 of a run under way"):
        train_run(tmp_path, digits_dir, "trainer.max_steps=8", "name=late", "resume=auto", "accept_changes=true")
    snapshot = torch.load(tmp_path / "phema" / "phema-0000008-0.050.pt", weights_only=False)
    assert snapshot["manifest"]["step"] == 8 and snapshot["manifest"]["since"] == 4
    assert not (tmp_path / "phema" / "phema-0000004-0.050.pt").exists()
    capsys.readouterr()
    posthoc_main([str(tmp_path), "--sigma-rel", "0.07", str(tmp_path / "late.pt")])
    out = capsys.readouterr().out
    assert "from 2 snapshots) of DiT-d4w128/2" in out and "tracking began at step 4, so it is approximate" in out
    assert torch.load(tmp_path / "late.pt", weights_only=False)["manifest"]["posthoc_ema"]["since"] == 4


def test_snapshots_a_killed_launch_missed_are_written_on_resume(tmp_path, digits_dir):
    """A launch killed after its checkpoint but before its snapshots: resume rewrites them, the same."""
    train_run(tmp_path, digits_dir, "trainer.max_steps=4", "name=killed")
    names = ["phema-0000004-0.050.pt", "phema-0000004-0.100.pt"]
    written = [torch.load(tmp_path / "phema" / n, weights_only=False) for n in names]
    for n in names:
        (tmp_path / "phema" / n).unlink()
    train_run(tmp_path, digits_dir, "trainer.max_steps=5", "name=killed", "resume=auto")
    for n, before in zip(names, written):
        again = torch.load(tmp_path / "phema" / n, weights_only=False)
        assert all(torch.equal(v, again["ema"][k]) for k, v in before["ema"].items()), n
