"""DiTModule (dit.training.module): it builds, computes the objective's loss, configures the
optimizer and draws grids with the sampler; its buffers are constants of the config."""

import pytest
import torch
import train
from conftest import compose_cfg, quick_cfg
from hydra.utils import instantiate


def test_module_buffers_are_constants_so_ddp_need_not_broadcast_them(tmp_path):
    """trainer=ddp sets broadcast_buffers: false. That holds only while every buffer of DiTModule
    (the timestep frequencies, both diffusion schedules) is a constant of its config: the same
    whatever the seed, and left as it was by training steps with their hooks and callbacks."""
    from lightning import Trainer

    from dit.tools.benchmark import InMemoryLatents
    from dit.training.callbacks.ema import EMA

    cfg = compose_cfg(["model=tiny", "data=digits"], tmp_path)
    modules = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        modules.append(instantiate(cfg.module, _convert_="all"))
    first, second = (dict(m.named_buffers()) for m in modules)
    assert {"model.t_embedder.freqs", "diffusion.betas"} <= first.keys() == second.keys()
    assert not torch.equal(modules[0].model.x_embedder.proj.weight, modules[1].model.x_embedder.proj.weight)
    before = {name: b.clone() for name, b in first.items()}
    trainer = Trainer(
        accelerator="cpu",
        max_steps=2,
        callbacks=[EMA()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(modules[0], train_dataloaders=InMemoryLatents(2, cfg.model, 2))
    assert trainer.global_step == 2
    after = dict(modules[0].named_buffers())  # read again: training may have replaced a buffer
    assert after.keys() == before.keys()
    for name, buffer in before.items():
        assert torch.equal(buffer, second[name]), f"{name} depends on the seed"
        assert torch.equal(after[name], buffer), f"{name} changed in training"


def test_unknown_compile_choice_is_refused(tmp_path, digits_dir, capsys):
    from conftest import one_line_error

    cfg = quick_cfg(tmp_path, digits_dir, "module.compile=fast", "trainer.max_steps=1", "~callbacks.digits_accuracy")
    with pytest.raises(SystemExit):
        train.main(cfg)
    one_line_error(capsys.readouterr().err, "module.compile='fast'; use one of", "reduce-overhead")


def small_module(**options):
    """A DiTModule of a 1-block DiT on 1-channel 4×4 "latents", as conf/train.yaml composes it."""
    from functools import partial

    from dit.diffusion import DDPM, Hybrid
    from dit.models import DiT
    from dit.training.module import DiTModule

    model = DiT(input_size=4, patch_size=2, in_channels=1, num_classes=3, depth=1, hidden_size=16, num_heads=2)
    kwargs = dict(
        model=model,
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        diffusion=dict(timestep_respacing=""),
        objective=Hybrid(),
        sampler=DDPM("3"),
        sampling=dict(guidance_scale=1.0, guidance="official", seed=0),
    )
    return DiTModule(**(kwargs | options))


def test_the_optimizer_is_fused_where_it_can_be():
    """AdamW gets fused=True on a CPU (one kernel, and the non-finite guard's skip on the device);
    an optimizer without a fused kernel is built as configured; an explicit fused=False stays."""
    from functools import partial

    module = small_module()
    assert module.configure_optimizers().defaults["fused"] is True
    assert isinstance(small_module(optimizer=partial(torch.optim.SGD, lr=0.1)).configure_optimizers(), torch.optim.SGD)
    unfused = small_module(optimizer=partial(torch.optim.AdamW, lr=1e-3, fused=False)).configure_optimizers()
    assert not unfused.defaults["fused"]


def test_the_training_step_logs_every_term_of_the_objective(monkeypatch):
    """training_step minimises the mean of the objective's `loss` and logs each of its terms."""
    from dit.diffusion import Objective

    class Constant(Objective):
        def losses(self, model, process, x_start, t, model_kwargs, noise):
            out = model(x_start, t, **model_kwargs).float().mean(dim=(1, 2, 3))
            return {"loss": out + 2.0, "extra": torch.full_like(out, 7.0)}

    module = small_module(objective=Constant())
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.setdefault(name, float(value)))
    loss = module.training_step((torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])), 0)
    assert loss.item() == pytest.approx(2.0)  # a fresh adaLN-Zero DiT outputs 0
    assert logged == {"train/loss": pytest.approx(2.0), "train/extra": 7.0}


def test_the_grid_is_drawn_by_the_configured_sampler():
    """validation_step draws its batch of the grid with the module's sampler, from batch_generator(seed, k)."""
    from dit.diffusion import DDPM

    class Counting(DDPM):
        steps_taken = 0

        def step(self, *args):
            Counting.steps_taken += 1
            return super().step(*args)

    module = small_module(sampler=Counting("3")).eval()
    module.validation_step((1, torch.tensor([2, 0]), torch.tensor([2, 3])), 0)
    module.validation_step((1, torch.tensor([2, 0]), torch.tensor([2, 3])), 0)
    (i1, z1), (i2, z2) = module._grid
    assert Counting.steps_taken == 6 and torch.equal(i1, torch.tensor([2, 3]))
    assert z1.shape == (2, 1, 4, 4) and torch.equal(z1, z2)  # batch 1 of seed 0, whenever and wherever drawn
