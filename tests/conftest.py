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
    """A state dict of torch-fidelity's own Inception-v3 (`FeatureExtractorInceptionV3`), randomly
    initialised, in a file: the real weights cannot be downloaded here. Conv weights are drawn with
    He init, which keeps the activations alive through the 90-odd layers (PyTorch's default init
    shrinks them to ~1e-8 and every image would give the same features)."""
    import torch
    from torch import nn
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):  # the class builds itself, then loads weights: skip the load
        def load_state_dict(self, state_dict, strict=True):
            return None

    folder = tmp_path_factory.mktemp("inception")
    torch.save({}, folder / "none.pth")
    net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(folder / "none.pth"))
    torch.manual_seed(0)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), folder / "inception.pth")
    return folder / "inception.pth"
