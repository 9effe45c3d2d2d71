"""dit.export: an export rebuilds its model exactly (head count included), says where it came from,
and never replaces its input, a training checkpoint, or another file."""

import pytest
import torch
from conftest import one_line_error

from dit.errors import exit_on_usage_error
from dit.models import DiT, backbone_state_dict
from dit.tools.export import main as export_main
from dit.training.manifest import weights_digest


def export_cli(capsys, *args):
    """`python -m dit.export ...` in this process: (exit code, stderr)."""
    with pytest.raises(SystemExit) as exited:
        exit_on_usage_error(lambda: export_main([str(a) for a in args]))
    return exited.value.code, capsys.readouterr().err


def test_export_rebuilds_the_model_exactly_and_records_its_source(tiny_run, tmp_path):
    out = export_main([str(tiny_run), str(tmp_path / "ema.pt")])
    export = torch.load(out, weights_only=False)
    # The quickstart's width (128) is off the paper's table: the weights alone would not say 4 heads.
    model = DiT.from_state_dict(export)
    assert model.num_heads == 4 and export["config"]["model"]["num_heads"] == 4
    with pytest.raises(ValueError, match="does not record its head count: pass num_heads="):
        DiT.from_state_dict(export["ema"])  # the bare weights of the same export
    ckpt = torch.load(tiny_run, weights_only=False)
    ema = backbone_state_dict(ckpt)
    assert weights_digest(model.state_dict()) == weights_digest(ema) == export["manifest"]["weights_digest"]
    assert export["manifest"]["step"] == 12 and export["manifest"]["run"]["run_id"] == ckpt["manifest"]["run_id"]
    # The official sample.py's find_model loads `checkpoint["ema"]` when there is one: these weights.
    assert export["ema"].keys() == ema.keys()
    live = torch.load(export_main([str(tiny_run), str(tmp_path / "live.pt"), "--weights", "live"]), weights_only=False)
    assert (
        "ema" not in live
        and weights_digest(DiT.from_state_dict(live).state_dict()) != export["manifest"]["weights_digest"]
    )


def test_export_refuses_its_input_a_checkpoint_an_export_and_other_files(tiny_run, tmp_path, capsys):
    before = tiny_run.read_bytes()
    code, err = export_cli(capsys, tiny_run, tiny_run)
    assert code == 2 and one_line_error(err, "is the input checkpoint")
    other = tmp_path / "other.ckpt"
    other.write_bytes(before)
    code, err = export_cli(capsys, other, tiny_run)  # the input of another name onto a training checkpoint
    assert code == 2 and one_line_error(err, f"the output {tiny_run} is a training checkpoint (step 12)")
    assert tiny_run.read_bytes() == before
    export_main([str(tiny_run), str(tmp_path / "ema.pt")])
    code, err = export_cli(capsys, tmp_path / "ema.pt", tmp_path / "again.pt")
    assert code == 2 and one_line_error(err, "is already an export (of", "step 12)")
    (tmp_path / "notes.txt").write_text("my notes")
    code, err = export_cli(capsys, tiny_run, tmp_path / "notes.txt")
    assert code == 2 and one_line_error(err, "exists and is not an export of dit.export")
    assert (tmp_path / "notes.txt").read_text() == "my notes"
    export_main([str(tiny_run), str(tmp_path / "ema.pt")])  # an earlier export is replaced
    code, err = export_cli(capsys, tmp_path / "missing.ckpt", tmp_path / "x.pt")
    assert code == 2 and one_line_error(err, "no checkpoint file at")
    code, err = export_cli(capsys, tiny_run, f"{tmp_path / 'exports'}/")  # a folder that does not exist yet
    assert code == 2 and one_line_error(err, "names a folder; give a file path such as")
    assert not (tmp_path / "exports").exists()
