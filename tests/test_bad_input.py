"""Bad input gets one clear line that names the problem and the fix, and leaves no half-written
run behind that would break resume=auto."""

import json

import pytest
import torch

from test_training import run_train

BASE = ["experiment=quickstart", "~callbacks.digits_accuracy", "trainer.max_steps=2", "trainer.val_check_interval=1000"]


@pytest.mark.parametrize("override, message", [
    ("model=dit_m", "Could not find 'model/dit_m'"),                 # unknown group choice (Hydra lists the options)
    ("foo=1", "Could not override 'foo'"),                           # unknown option
    ("trainer.max_steps=abc", "trainer.max_steps must be an integer, got 'abc'"),
    ("module.optimizer.lr=fast", "module.optimizer.lr must be a number, got 'fast'"),
    ("trainer=gpu", "no CUDA GPU is visible (torch.cuda.is_available() is False); use trainer=cpu"),
    ("trainer=tpu_v3", "this machine has no TPU; use trainer=gpu or trainer=cpu"),
    ("data.global_batch_size=100", None),                            # fine on one device: the control
])  # fmt: skip
def test_command_line_mistakes(tmp_path, digits_dir, override, message):
    result = run_train([*BASE, f"data.path={digits_dir}", "name=bad", override], cwd=tmp_path)
    if message is None:
        assert result.returncode == 0, result.stderr[-2000:]
        return
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing half-written; resume=auto would start fresh


def test_truncated_or_missing_shard(tmp_path, digits_dir):
    import shutil

    data = tmp_path / "digits"
    shutil.copytree(digits_dir, data)
    chunk = data / json.loads((data / "index.json").read_text())["chunks"][0]["filename"]
    chunk.write_bytes(chunk.read_bytes()[:1000])
    result = run_train([*BASE, f"data.path={data}", "data.prepare=null"], cwd=tmp_path)
    assert result.returncode != 0 and f"shard {chunk} is truncated or corrupt (1000 bytes" in result.stderr
    chunk.unlink()
    result = run_train([*BASE, f"data.path={data}", "data.prepare=null"], cwd=tmp_path)
    assert result.returncode != 0 and f"shard {chunk} is missing" in result.stderr


def test_resume_from_a_checkpoint_of_another_model(tmp_path, digits_dir):
    first = run_train([*BASE, f"data.path={digits_dir}", "name=small", "conditioning=in_context"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt = tmp_path / "outputs" / "small" / "checkpoints" / "last.ckpt"
    result = run_train([*BASE, f"data.path={digits_dir}", "name=other", f"resume={ckpt}"], cwd=tmp_path)
    assert result.returncode != 0
    assert "the checkpoint holds DiT-custom/2 (in_context" in result.stderr and "but this run builds DiT-custom/2 (adaln_zero" in result.stderr


def test_output_folder_that_cannot_be_written(tmp_path, digits_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_train([*BASE, f"data.path={digits_dir}", f"hydra.run.dir={blocker / 'run'}"], cwd=tmp_path)
    assert result.returncode != 0 and str(blocker) in result.stderr and "Not a directory" in result.stderr


def test_labels_beyond_num_classes_in_the_model():
    from dit.models import DiT

    model = DiT(input_size=8, in_channels=1, num_classes=10, depth=1, hidden_size=32, num_heads=2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\] for 10 classes, got labels in \[0, 12\]"):
        model(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), torch.tensor([0, 12]))


def test_tpu_preset_without_torch_xla(monkeypatch, tmp_path):
    import sys

    import train
    from test_training import compose_cfg

    monkeypatch.setitem(sys.modules, "torch_xla", None)  # as if not installed
    for preset, extra in ("tpu_v3", []), ("tpu_v3_pod", [f"shared_dir={tmp_path}", "name=pod"]):  # the message names the preset typed
        cfg = compose_cfg([f"trainer={preset}", *extra], tmp_path)
        with pytest.raises(RuntimeError, match=rf"trainer={preset} needs torch_xla: pip install -e \".\[tpu\]\""):
            train.check_config(cfg)
