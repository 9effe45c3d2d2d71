"""dit.posthoc_ema: the EMA of any σ_rel rebuilt from a run's snapshots, written as an export that
`DiT.from_state_dict` and `dit.sample` read; bad input gets one line."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, one_line_error, quick_cfg

from dit.errors import exit_on_usage_error
from dit.evaluation.sample import load_model
from dit.models import DiT
from dit.tools.export import main as export_main
from dit.tools.posthoc_ema import main as posthoc_main
from dit.training.manifest import weights_digest


@pytest.fixture(scope="module")
def phema_run(tmp_path_factory, digits_dir):
    """A 12-step digits run of train.py (in this process, as conftest's tiny_run), the callback
    added with the override the yaml documents, snapshots every 3 steps: 4 per profile."""
    import train

    out = tmp_path_factory.mktemp("phema") / "run"
    cfg = quick_cfg(
        out,
        digits_dir,
        "callbacks=[default,posthoc_ema]",
        "callbacks.posthoc_ema.snapshot_every=3",
        "trainer.max_steps=12",
        "data.global_batch_size=32",
        "trainer.val_check_interval=1000",
        "~callbacks.digits_accuracy",
        "callbacks.progress_bar.refresh_rate=0",
    )
    train.main(cfg)
    return out


def ckpt_path(run):
    return run / "checkpoints" / "last.ckpt"


def cli(capsys, *args):
    """`python -m dit.posthoc_ema ...` in this process: (exit code, stderr)."""
    with pytest.raises(SystemExit) as exited:
        exit_on_usage_error(lambda: posthoc_main([str(a) for a in args]))
    return exited.value.code, capsys.readouterr().err


def test_output_is_an_export_that_samples_load(phema_run, tmp_path):
    assert len(list((phema_run / "phema").glob("phema-*.pt"))) == 8
    out = posthoc_main([str(phema_run), "--sigma-rel", "0.07", str(tmp_path / "ema.pt")])
    export = torch.load(out, weights_only=False)
    model = DiT.from_state_dict(export)  # width 128 is off the paper's table: the config gives 4 heads
    assert model.num_heads == 4 and weights_digest(model.state_dict()) == export["manifest"]["weights_digest"]
    m, p = export["manifest"], export["manifest"]["posthoc_ema"]
    assert m["kind"] == "export" and m["weights"] == "ema" and m["step"] == 12 and m["source"] == str(phema_run)
    assert p["sigma_rel"] == 0.07 and p["since"] == 0 and p["gamma"] == pytest.approx(11.24, abs=0.01)
    assert len(p["snapshots"]) == 8 and sum(s["coefficient"] for s in p["snapshots"]) == pytest.approx(1.0)
    ckpt = torch.load(phema_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert m["run"]["run_id"] == ckpt["manifest"]["run_id"] and export["config"]["data"]["channels"] == 1
    # the config subset dit.export writes for the same run
    assert (
        export["config"]
        == torch.load(export_main([str(ckpt_path(phema_run)), str(tmp_path / "e.pt")]), weights_only=False)["config"]
    )
    assert all(v.dtype == torch.float32 for v in export["ema"].values())
    loaded, data, provenance = load_model(out)  # what dit.sample reads
    assert provenance["step"] == 12 and data == (True, 1.0)
    # Between the two tracked profiles, the result is neither
    ends = [torch.load(phema_run / "phema" / f"phema-0000012-{s}.pt", weights_only=False) for s in ("0.050", "0.100")]
    key = "final_layer.linear.weight"
    assert not any(torch.equal(export["ema"][key], e["ema"][key]) for e in ends)
    # A tracked profile at a snapshot's step is that snapshot, to float64 rounding of the fit
    same = torch.load(posthoc_main([str(phema_run), "--sigma-rel", "0.1", str(tmp_path / "s.pt")]), weights_only=False)
    for k, v in ends[1]["ema"].items():
        torch.testing.assert_close(same["ema"][k], v, rtol=0, atol=1e-6)


def test_an_earlier_step_uses_the_snapshots_up_to_it(phema_run, tmp_path):
    export = torch.load(
        posthoc_main([str(phema_run), "--sigma-rel", "0.15", "--step", "6", str(tmp_path / "e.pt")]), weights_only=False
    )
    assert export["manifest"]["step"] == 6
    assert [s["file"] for s in export["manifest"]["posthoc_ema"]["snapshots"]] == [
        f"phema-{t:07d}-{s}.pt" for t in (3, 6) for s in ("0.050", "0.100")
    ]


def test_the_command_line(phema_run, tmp_path):
    """Through the shim (src/dit/posthoc_ema.py), as a user types it (its errors: the same
    exit_on_usage_error as `cli` below)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    ok = subprocess.run(
        [sys.executable, "-m", "dit.posthoc_ema", str(phema_run), "--sigma-rel", "0.07", str(tmp_path / "x.pt")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "wrote the post-hoc EMA (sigma_rel 0.07, step 12, from 8 snapshots) of DiT-d4w128/2" in ok.stdout
    assert DiT.from_state_dict(torch.load(tmp_path / "x.pt", weights_only=False)).num_heads == 4


def test_bad_input_gets_one_line(phema_run, tmp_path, capsys):
    out = tmp_path / "out.pt"
    for sigma, fragment in [("0", "--sigma-rel=0.0"), ("0.3", "--sigma-rel=0.3"), ("-0.1", "--sigma-rel=-0.1")]:
        code, err = cli(capsys, phema_run, "--sigma-rel", sigma, out)
        assert code == 2 and one_line_error(err, fragment, "a relative EMA width must be a number in (0, 0.2887)")
    code, err = cli(capsys, phema_run, "--sigma-rel", "0.07", "--step", "7", out)
    assert code == 2 and one_line_error(
        err, "--step 7: no snapshot at that step; the snapshots are at steps 3, 6, 9, 12"
    )
    code, err = cli(capsys, phema_run, "--sigma-rel", "abc", out)
    assert code == 2 and one_line_error(err, "--sigma-rel", "--help lists the arguments")
    code, err = cli(capsys, tmp_path / "nowhere", "--sigma-rel", "0.07", out)
    assert code == 2 and one_line_error(err, "is not a folder; give the run folder train.py wrote")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    code, err = cli(capsys, empty, "--sigma-rel", "0.07", out)
    assert code == 2 and one_line_error(
        err, f"no post-hoc EMA snapshots in {empty / 'phema'}", "callbacks=[default,posthoc_ema]"
    )
    code, err = cli(capsys, phema_run, "--sigma-rel", "0.07", tmp_path)
    assert code == 2 and one_line_error(err, "is a folder; give a file path")
    ckpt = phema_run / "checkpoints" / "last.ckpt"
    before = ckpt.read_bytes()
    code, err = cli(capsys, phema_run, "--sigma-rel", "0.07", ckpt)
    assert code == 2 and one_line_error(err, "is a training checkpoint (step 12)") and ckpt.read_bytes() == before
    broken = tmp_path / "broken_run"
    shutil.copytree(phema_run / "phema", broken / "phema")
    (broken / "phema" / "phema-0000006-0.050.pt").write_bytes(b"half a snapshot")
    code, err = cli(capsys, broken, "--sigma-rel", "0.07", out)
    assert code == 2 and one_line_error(err, "phema-0000006-0.050.pt is truncated or corrupt", "delete it")
    assert not out.exists()
