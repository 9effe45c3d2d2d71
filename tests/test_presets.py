"""The modern presets (conf/experiment/): each composes into its paper's settings, counts its Gflops
at full size, and trains one step on the CPU with its recipe and a shrunken model."""

import numpy as np
import pytest
import torch
import train
from conftest import compose_cfg
from hydra.utils import instantiate

from dit.data.shards import write_shards
from dit.models.flops import count_gflops

PRESETS = {
    # preset: (objective, sampler, guidance, guidance interval, block options)
    "sit_xl2_256": ("FlowMatching", "EulerMaruyama", "official", [0.0, 1.0], {}),
    "repa_sit_xl2_256": ("REPA", "EulerMaruyama", "all_channels", [0.0, 0.7], {}),
    "lightningdit_xl2_256": (
        "FlowMatching",
        "Euler",
        "all_channels",
        [0.0, 0.89],
        dict(rope=True, mlp="swiglu", norm="rmsnorm"),
    ),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_modern_preset_composes_counts_and_trains_a_step(preset, tmp_path):
    objective, sampler, guidance, interval, blocks = PRESETS[preset]
    cfg = compose_cfg([f"experiment={preset}"], tmp_path)
    assert cfg.objective._target_.endswith(f".{objective}") and cfg.sampler._target_.endswith(f".{sampler}")
    assert cfg.module.sampling.guidance == guidance and list(cfg.module.sampling.guidance_interval) == interval
    assert cfg.data.global_batch_size == 256 and cfg.module.optimizer.lr == 1e-4
    for key, value in blocks.items():
        assert cfg.model[key] == value
    with torch.device("meta"):
        net = instantiate(cfg.model)
    assert net.name == "DiT-XL/2" and abs(count_gflops(net) - 118.6) < 0.1  # the blocks add no matmuls
    if preset == "repa_sit_xl2_256":
        assert (cfg.objective.weight, cfg.objective.depth, cfg.objective.encoder_dim) == (0.5, 8, 768)
        assert cfg.data.features and not cfg.data.flip and cfg.sampler.diffusion == "linear"
        assert not cfg.model.learn_sigma  # REPA's SiT: C outputs
    if preset == "sit_xl2_256":
        assert (cfg.sampler.steps, cfg.sampler.diffusion, cfg.sampler.last_step) == (250, "sigma", "mean")
        assert cfg.callbacks.get("fid") is None and cfg.model.learn_sigma

    # One step with the preset's recipe on 4-channel 8x8 latents (16 tokens, features of 768 for REPA).
    rng = np.random.default_rng(0)
    records = []
    for i in range(16):
        mean = rng.normal(size=(2, 1, 4, 8, 8))
        posterior = np.concatenate([mean, np.full_like(mean, 0.1)], axis=1)
        records.append((i % 10, posterior, rng.normal(size=(16, 768))))
    write_shards(records, tmp_path / "shards", dict(channels=4, latent_size=8, num_classes=10, source="test"))
    shrink = [
        "++model.depth=2",
        "++model.hidden_size=64",
        "++model.num_heads=2",
        "data.latent_size=8",
        "data.num_classes=10",
        "data.sample_classes=[0,1]",  # ImageNet's grid classes lie beyond 10
    ]
    run = compose_cfg(
        [
            f"experiment={preset}",
            *shrink,
            f"data.path={tmp_path / 'shards'}",
            "data.global_batch_size=4",
            "data.num_workers=0",
            "trainer=cpu",
            "trainer.max_steps=1",
            "trainer.limit_val_batches=0",
            "logger=csv",
            *(["objective.depth=1"] if preset.startswith("repa") else []),
        ],
        tmp_path / "run",
    )
    train.main(run)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 1
    assert checkpoint["config"]["objective"]["_target_"].endswith(f".{objective}")
