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
    from dit.digits import prepare_digits

    path = tmp_path_factory.mktemp("data") / "digits"
    prepare_digits(path)
    return path


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory):
    """torch-fidelity's own Inception-v3, randomly initialised, in a file (dit.fid.random_inception):
    the real weights cannot be downloaded here."""
    from dit.fid import random_inception

    return random_inception(tmp_path_factory.mktemp("inception") / "inception.pth")
