"""The EMA callback (dit.training.callbacks.ema): torch's averaging bit for bit, without reading the device."""

import pytest
import torch
from lightning import LightningModule, Trainer
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dit.training.callbacks.ema import EMA, EMAUpdate, HostCountAveragedModel


def net():
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


class Regression(LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x = torch.full((4, 3), float(batch_idx + 1))
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("use_buffers", [False, True])
def test_same_average_as_torch(use_buffers):
    torch.manual_seed(0)
    model = net()
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=use_buffers)
    ours = HostCountAveragedModel(model, EMAUpdate(0.9), use_buffers=use_buffers)
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 4))  # moves BatchNorm's running statistics (buffers)
        theirs.update_parameters(model)
        ours.update_parameters(model)
    assert theirs.state_dict().keys() == ours.state_dict().keys()
    for (name, a), b in zip(theirs.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), name
    assert ours.n_averaged.item() == 4


def test_update_never_reads_the_device():
    """On the meta device any read back to the host fails: torch's update reads its count (twice a
    step, each a sync on a GPU); ours keeps the count on the host and reads nothing."""
    with torch.device("meta"):
        model = net()
    with pytest.raises(RuntimeError, match="meta"):
        AveragedModel(model, multi_avg_fn=EMAUpdate(0.9), device="meta").update_parameters(model)
    ours = HostCountAveragedModel(model, EMAUpdate(0.9), device="meta")
    for _ in range(2):
        ours.update_parameters(model)
    assert ours.n_averaged.device.type == "cpu" and ours.n_averaged.item() == 2


def test_callback_keeps_the_ema_of_every_step(tmp_path):
    """Under a Trainer: the first update copies the weights, each later one moves the average by
    (1 - decay) towards them; at the end of fit the model holds the average (WeightAveraging)."""
    torch.manual_seed(0)
    module, decay, weights = Regression(), 0.5, []

    class Watch(EMA):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            weights.append(pl_module.layer.weight.detach().clone())
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    ema = Watch(multi_avg_fn=EMAUpdate(decay))
    trainer = Trainer(
        max_steps=5,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ema],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=[0] * 5)
    expected = weights[0]
    for w in weights[1:]:
        expected = decay * expected + (1 - decay) * w
    torch.testing.assert_close(module.layer.weight, expected)
    assert not torch.equal(module.layer.weight, weights[-1])
    assert isinstance(ema._average_model, HostCountAveragedModel) and ema._average_model.n_averaged.item() == 5
