"""What decides a run (dit.training.manifest.run_identity): keys added to the config later; the
code version every manifest records."""

import shutil
import subprocess

import pytest

from dit.training.manifest import changed_keys, checkout_root, code_version, run_identity


def test_a_checkpoint_without_the_block_options_trained_the_papers_block():
    """A run recorded before model.rope/mlp/norm/qk_norm existed compares equal to the same run with
    them at the paper's values, and differs from one that turns an option on."""
    before = {"model": {"_target_": "dit.models.DiT", "size": "XL"}, "seed": 0}
    now = {"model": {"_target_": "dit.models.DiT", "size": "XL", "rope": False, "mlp": "gelu", "norm": "layernorm",
                     "qk_norm": False}, "seed": 0}  # fmt: skip
    assert changed_keys(run_identity(before), run_identity(now)) == []
    now["model"]["mlp"] = "swiglu"
    assert changed_keys(run_identity(before), run_identity(now)) == ["model.mlp"]


def test_a_checkpoint_without_data_features_read_no_features():
    before = {"model": {"_target_": "dit.models.DiT"}, "data": {"path": "x"}}
    now = {"model": {"_target_": "dit.models.DiT"}, "data": {"path": "x", "features": False}}
    assert changed_keys(run_identity(before), run_identity(now)) == []
    now["data"]["features"] = True
    assert changed_keys(run_identity(before), run_identity(now)) == ["data.features"]


@pytest.mark.skipif(not (checkout_root() / ".git").exists() or shutil.which("git") is None, reason="not a git checkout")
def test_the_code_version_names_this_checkouts_commit():
    head = subprocess.run(["git", "-C", str(checkout_root()), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert (checkout_root() / "src" / "dit" / "training" / "manifest.py").is_file()
    assert code_version()["commit"].removesuffix("+dirty") == head.stdout.strip()
