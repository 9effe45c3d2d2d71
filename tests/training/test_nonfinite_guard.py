"""The non-finite guard (dit.training.callbacks.nonfinite_guard): skipped updates, then a stop
that keeps the last good state."""

import re

import pytest
import torch
from conftest import args, run_train

from dit.training.checkpoints import (
    read_checkpoint,
)


@pytest.mark.parametrize("skip", ["on_device", "host_read"])
def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path, digits_dir, skip):
    """lr = 1e30 blows the weights up within a few steps; the guard skips, counts, then stops.
    Fused AdamW (the default) skips on the device, counted once per logging interval; another
    optimizer falls back to a host read of the gradient norm every step."""
    extra = ["+module.optimizer.fused=false"] if skip == "host_read" else []
    result = run_train(
        args(
            digits_dir,
            "trainer.max_steps=200",
            "name=nan",
            "module.optimizer.lr=1e30",
            "callbacks.nonfinite_guard.max_in_a_row=3",
            "trainer.log_every_n_steps=10",
            *extra,
        ),
        cwd=tmp_path,
    )
    assert result.returncode != 0
    if skip == "host_read":
        assert "non-finite gradients, update skipped (1 in a row of 3 allowed)" in result.stdout
        assert "3 updates in a row had non-finite gradients (at step" in result.stderr
    else:
        assert re.search(r"step 10: \d+ updates skipped since the last check for non-finite gradients", result.stdout)
        assert re.search(r"\d+ updates in a row had non-finite gradients \(by step 10\)", result.stderr)
    assert "resume=auto" in result.stderr
    ckpt = read_checkpoint(tmp_path / "outputs" / "nan" / "checkpoints" / "last.ckpt")
    assert ckpt["callbacks"]["NonFiniteGuard"]["total"] >= 3 and ckpt["global_step"] < 200
    assert all(torch.isfinite(v).all() for v in ckpt["current_model_state"].values())  # the last good weights
