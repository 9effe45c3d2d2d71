import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # train.py lives at the root

# Tests never reach wandb's servers, whatever login the machine has.
os.environ["WANDB_MODE"] = "offline"
os.environ.pop("WANDB_API_KEY", None)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """The digits shards, written once per test session."""
    from dit.data.digits import prepare_digits

    path = tmp_path_factory.mktemp("data") / "digits"
    prepare_digits(path)
    return path


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory):
    """torch-fidelity's own Inception-v3, randomly initialised, in a file (dit.fid.random_inception):
    the real weights cannot be downloaded here."""
    from dit.evaluation.fid import random_inception

    return random_inception(tmp_path_factory.mktemp("inception") / "inception.pth")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, digits_dir):
    """The last.ckpt of a 12-step quickstart run (real digits, EMA decay 0.9)."""
    import train
    from test_training import quick_cfg

    out = tmp_path_factory.mktemp("run")
    cfg = quick_cfg(out, digits_dir, "trainer.max_steps=12", "data.global_batch_size=32", "trainer.val_check_interval=12",
                    "callbacks.ema.multi_avg_fn.decay=0.9", "~callbacks.digits_accuracy")  # fmt: skip
    train.main(cfg)
    return out / "checkpoints" / "last.ckpt"


def one_line_error(stderr, *fragments):
    """A usage error as train.py and the tools print it: its one line is the last on stderr,
    nothing on stderr is a traceback, and it says each of `fragments`. Returns the line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), stderr[-3000:]
    assert sum(line.startswith("error: ") for line in lines) == 1, stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]
