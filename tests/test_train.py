"""train.py end to end: configs compose and build, fast_dev_run per CPU preset, checkpoints with
EMA and config, export, and real multiruns through `train.py -m`."""

import itertools

import pytest
import torch
import train
from conftest import CONF, QUICK, compose_cfg, quick_cfg, run_train
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from dit.models import DiT
from dit.tools.export import backbone_weights
from dit.tools.export import main as export_main

MODELS, PATCHES = ["default", "dit_s", "dit_b", "dit_l", "dit_xl", "tiny"], ["2", "4", "8"]


CONDITIONINGS, DATA = ["adaln_zero", "adaln", "cross_attn", "in_context"], ["imagenet_256", "imagenet_512", "digits"]


@pytest.mark.parametrize("data", DATA)
def test_every_model_patch_and_conditioning_composes_and_builds(data, tmp_path):
    """Each size × patch, and each conditioning design on each size (the groups are independent:
    their full product would compose the same files 60 times per data config)."""
    combos = [(m, p, "adaln_zero") for m, p in itertools.product(MODELS, PATCHES)]
    combos += [(m, "2", c) for m, c in itertools.product(MODELS, CONDITIONINGS) if c != "adaln_zero"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        configs = {
            combo: compose(
                "train",
                overrides=[f"model={combo[0]}", f"patch={combo[1]}", f"conditioning={combo[2]}", f"data={data}"],
            )
            for combo in combos
        }
    for (_, patch, conditioning), cfg in configs.items():
        with torch.device("meta"):
            net = instantiate(cfg.model)
        assert (net.patch_size, net.conditioning, net.input_size) == (int(patch), conditioning, cfg.data.latent_size)
        assert net.in_channels == cfg.data.channels and net.num_classes == cfg.data.num_classes
    dm = instantiate(cfg.data)
    assert dm.hparams.global_batch_size == cfg.data.global_batch_size


@pytest.mark.parametrize(
    "model, name",
    [
        ("default", "DiT-XL/2"),  # `python train.py`, the paper's DiT-XL/2 with the wandb logger
        ("dit_s", "DiT-S/2"),
        ("dit_xl", "DiT-XL/2"),
        ("dit_g", "DiT-d28w2048/2"),  # a width of its own on XL's depth
        ("tiny", "DiT-d4w128/2"),
    ],
)
def test_the_wandb_run_is_named_after_the_model(model, name, tmp_path):
    cfg = compose_cfg([f"model={model}", "patch=2", "logger=wandb"], tmp_path)
    assert cfg.logger.name == name


@pytest.mark.parametrize("preset", ["cpu", "gpu", "ddp", "tpu_v3"])
def test_trainer_presets_compose(preset, tmp_path):
    cfg = compose_cfg([f"trainer={preset}"], tmp_path)
    assert cfg.trainer._target_ == "lightning.Trainer"
    # tpu_v3: no precision flag, its XLA bf16-autocast plugin sets it
    assert cfg.trainer.precision == {"gpu": "bf16-mixed", "ddp": "bf16-mixed", "tpu_v3": None}.get(preset, "32-true")
    if preset == "ddp":  # the strategy dit.benchmark --devices measures
        from dit.tools.benchmark import DDP_OPTIONS

        assert {k: v for k, v in cfg.trainer.strategy.items() if k != "_target_"} == DDP_OPTIONS
        assert instantiate(cfg.trainer.strategy)._ddp_kwargs == DDP_OPTIONS  # a strategy Lightning takes
    if preset == "cpu":
        trainer = instantiate(cfg.trainer, callbacks=[instantiate(c) for c in cfg.callbacks.values()], logger=False)
        assert trainer.max_steps == 400_000


def test_paper_recipe_is_in_the_config(tmp_path):
    cfg = compose_cfg(["experiment=dit_xl2_256"], tmp_path)
    assert (cfg.model.size, cfg.model.patch_size) == ("XL", 2)
    with torch.device("meta"):
        net = instantiate(cfg.model)
    assert (len(net.blocks), net.pos_embed.shape[-1], net.num_heads) == (28, 1152, 16)  # paper Table 1
    assert cfg.module.optimizer.lr == 1e-4 and cfg.module.optimizer.weight_decay == 0
    assert cfg.data.global_batch_size == 256 and cfg.data.flip and cfg.data.scale_factor == 0.18215
    assert cfg.callbacks.ema.multi_avg_fn.decay == 0.9999 and cfg.trainer.max_steps == 7_000_000
    assert compose_cfg(["experiment=dit_xl2_512"], tmp_path).data.latent_size == 64
    compose_cfg(["experiment=scaling"], tmp_path)
    sweep = HydraConfig.get()
    assert sweep.mode.name == "MULTIRUN" and sweep.sweeper.params == {
        "model": "dit_s,dit_b,dit_l,dit_xl",
        "patch": "2,4,8",
    }


def test_fast_dev_run_cpu(tmp_path, digits_dir, capsys):
    cfg = quick_cfg(tmp_path, digits_dir, "trainer=cpu", "trainer.fast_dev_run=true", "~callbacks.digits_accuracy")
    train.main(cfg)
    assert "DiT-d4w128/2 (adaln_zero, 16 tokens)" in capsys.readouterr().out
    assert (tmp_path / "samples" / "step_0000001.png").exists()


def test_training_run_checkpoint_ema_and_export(tmp_path, digits_dir):
    cfg = quick_cfg(
        tmp_path,
        digits_dir,
        "trainer.max_steps=30",
        "trainer.val_check_interval=15",
        "trainer.log_every_n_steps=5",
        "callbacks.checkpoint.every_n_train_steps=15",
        "callbacks.ema.multi_avg_fn.decay=0.9",
        "~callbacks.digits_accuracy",
    )
    train.main(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # model, EMA, optimizer, step and config
    assert ckpt["global_step"] == 30 and ckpt["optimizer_states"] and ckpt["config"]["model"]["depth"] == 4
    assert "current_model_state" in ckpt  # the live weights; "state_dict" holds the EMA
    ema, live = backbone_weights(ckpt, "ema"), backbone_weights(ckpt, "live")
    assert not torch.equal(ema["blocks.0.attn.qkv.weight"], live["blocks.0.attn.qkv.weight"])
    assert (tmp_path / "samples" / "step_0000015.png").exists() and (tmp_path / "samples" / "step_0000030.png").exists()
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    for name in [
        "train/loss",
        "train/mse",
        "train/vb",
        "train/grad_norm",
        "train/images_per_sec",
        "train/steps_per_sec",
        "lr-AdamW",
    ]:
        assert name in metrics.splitlines()[0], name
    # export: a bare state dict in the official layout, loaded by DiT.from_state_dict
    out = tmp_path / "ema.pt"
    export_main([str(tmp_path / "checkpoints" / "last.ckpt"), str(out)])
    model = DiT.from_state_dict(torch.load(out), num_heads=4)
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], ema["blocks.0.attn.qkv.weight"])
    # ...and it starts a new run (init_from), as an official checkpoint would
    cfg2 = quick_cfg(
        tmp_path / "again",
        digits_dir,
        f"module.init_from={out}",
        "trainer.max_steps=1",
        "logger=none",
        "~callbacks.digits_accuracy",
    )
    module = instantiate(cfg2.module, _convert_="all")
    assert torch.equal(module.model.state_dict()["pos_embed"], ema["pos_embed"])
    assert torch.equal(module.model.state_dict()["blocks.1.mlp.fc1.weight"], ema["blocks.1.mlp.fc1.weight"])


def test_init_from_a_checkpoint_of_another_model(tmp_path, digits_dir):
    other = DiT(input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=64, num_heads=4, patch_size=4)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    cfg = quick_cfg(tmp_path, digits_dir, f"module.init_from={tmp_path / 'other.pt'}")
    with pytest.raises(Exception, match="holds DiT-d2w64/4 .* but the model is DiT-d4w128/2"):
        instantiate(cfg.module, _convert_="all")


def test_wandb_goes_offline_without_an_account(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    assert train.wandb_offline()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert not train.wandb_offline()
    monkeypatch.setenv("WANDB_API_KEY", "x")
    assert not train.wandb_offline()


def test_multirun_of_two_jobs_with_wandb_and_a_failing_job(tmp_path, digits_dir):
    """Three jobs through `train.py -m`: each its own folder and offline wandb run (grouped by the
    sweep, named after the model, Gflops in its config); the failing middle one stops nobody."""
    result = run_train(
        [
            "-m",
            "experiment=quickstart",
            f"data.path={digits_dir}",
            "logger=wandb",
            "patch=2,3,4",
            "trainer.max_steps=3",
            "trainer.log_every_n_steps=1",
            "trainer.val_check_interval=3",
            "~callbacks.digits_accuracy",
            *QUICK,
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode != 0 and "patch size 3 does not divide the latent size 8" in result.stderr
    # ...and the sweep ends by listing the failed job with its overrides
    assert "1 of 3 jobs of the sweep failed:" in result.stderr.split("Traceback")[-1]
    assert "patch=3" in result.stderr.split("jobs of the sweep failed:")[1]
    jobs = sorted((tmp_path / "sweep").iterdir())
    assert [j.name for j in jobs if j.is_dir()] == ["0", "1", "2"]
    for job, name in [("0", "DiT-d4w128/2"), ("2", "DiT-d4w128/4")]:
        assert (tmp_path / "sweep" / job / "checkpoints" / "last.ckpt").exists()
        runs = list((tmp_path / "sweep" / job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1
        # An offline run keeps its config, name and group in its .wandb record file.
        record = next(runs[0].glob("*.wandb")).read_bytes()
        for field in [b"gflops", b"params", b"conditioning", name.encode(), str(tmp_path / "sweep").encode()]:
            assert field in record, field
        # ...and the same metrics as CSV beside it, which dit.plots reads without wandb
        csv_dir = tmp_path / "sweep" / job / "csv" / "version_0"
        assert (
            "train/loss" in (csv_dir / "metrics.csv").read_text() and "gflops" in (csv_dir / "hparams.yaml").read_text()
        )
    assert not (tmp_path / "sweep" / "1" / "checkpoints" / "last.ckpt").exists()


def test_multirun_through_submitit_local_launcher(tmp_path, digits_dir):
    result = run_train(
        [
            "-m",
            "launcher=local",
            "experiment=quickstart",
            f"data.path={digits_dir}",
            "logger=csv",
            "conditioning=adaln_zero,in_context",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "~callbacks.digits_accuracy",
            *QUICK,
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "checkpoints" / "last.ckpt").exists()
    assert len(list((tmp_path / "sweep" / ".submitit").rglob("*_result.pkl"))) == 2  # two processes


@pytest.mark.slow
def test_quickstart_learns_the_digits(tmp_path):
    """`python train.py experiment=quickstart` as the README gives it: ≤ 10 minutes on 2 cores,
    and ≥ 90% of guided samples are classified as the digit asked for."""
    result = run_train(["experiment=quickstart", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(out for out in result.stdout.splitlines() if out.startswith("digits:"))
    accuracy = float(line.split("labels ")[1].split("%")[0]) / 100
    assert accuracy >= 0.9, line


def test_ddp_multirun_on_cpu(tmp_path, digits_dir):
    """Two jobs of a multirun, each on 2 DDP ranks (gloo on the CPU): the ranks of each job start
    from that job's config, and the second job launches its own ranks (no hang, no crash)."""
    from PIL import Image

    result = run_train(
        [
            "-m",
            "experiment=quickstart",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.precision=32-true",
            f"data.path={digits_dir}",
            "conditioning=adaln_zero,in_context",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "data.samples_per_class=3",
            "~callbacks.digits_accuracy",
            "sampler.steps='5'",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        ckpt = torch.load(
            tmp_path / "sweep" / job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
        )
        assert ckpt["global_step"] == 3
        # the grid gathers both ranks' samples: 10 rows (digits) x 3 columns, 2x upscaled
        assert Image.open(tmp_path / "sweep" / job / "samples" / "step_0000003.png").size == (56, 182)
