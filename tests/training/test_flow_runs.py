"""A flow-matching run end to end in this process: train.py with objective=flow, its checkpoint
and export, and dit.sample from them with the ODE and SDE samplers, NFE and labels protocol recorded."""

import json

import numpy as np
import pytest
import torch
from conftest import quick_cfg

from dit.errors import UsageError


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, digits_dir):
    import train

    out = tmp_path_factory.mktemp("flow")
    cfg = quick_cfg(
        out,
        digits_dir,
        "objective=flow",
        "objective.time_sampling=lognormal",
        "sampler=heun",
        "trainer.max_steps=12",
        "trainer.val_check_interval=12",
        "data.global_batch_size=32",
        "module.sampling.guidance_interval=[0.0,0.7]",
        "~callbacks.digits_accuracy",
    )
    train.main(cfg)
    return out


def test_a_flow_run_trains_and_draws_its_grids_with_the_flow_sampler(flow_run):
    checkpoint = torch.load(flow_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    config = checkpoint["config"]
    assert config["module"]["objective"]["_target_"] == "dit.diffusion.objectives.FlowMatching"
    assert config["module"]["sampler"]["_target_"] == "dit.diffusion.flow_samplers.Heun"
    assert (flow_run / "samples" / "step_0000012.png").is_file()


def test_dit_sample_draws_a_flow_checkpoint_with_its_own_kind_of_sampler(flow_run, tmp_path, capsys):
    from dit.evaluation.sample import main as sample

    ckpt = flow_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "sde"
    sample([str(ckpt), str(out), "--num-samples", "20", "--batch-size", "10", "--labels", "balanced",
            "--guidance-scale", "2", "--guidance-interval", "0", "0.7", "sampler.steps=6"])  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    identity = manifest["identity"]
    assert identity["sampler.class"] == "dit.diffusion.flow_samplers.EulerMaruyama"  # a flow's default: SiT's SDE
    assert identity["labels"] == "balanced" and identity["guidance"] == "all_channels"
    assert identity["guidance_interval"] == [0.0, 0.7]
    assert manifest["nfe"] == 6 and 0 < manifest["guided_nfe"] < 6
    assert "6 function evaluations per sample" in capsys.readouterr().out
    arr = np.load(f"{out}.npz")["arr_0"]
    assert arr.shape == (20, 8, 8, 3)

    heun = tmp_path / "heun"
    sample([str(ckpt), str(heun), "--num-samples", "20", "sampler=heun", "sampler.steps=3", "--guidance-scale", "1"])
    assert json.loads((heun / "manifest.json").read_text())["nfe"] == 6
    # the balanced folder's grid has the 8 columns of a random one, not one per class
    from PIL import Image

    assert Image.open(f"{out}.png").size == Image.open(f"{heun}.png").size


def test_a_flow_export_keeps_its_objective_and_refuses_a_gaussian_sampler(flow_run, tmp_path):
    from dit.evaluation.sample import load_model
    from dit.evaluation.sample import main as sample
    from dit.tools.export import main as export

    exported = export([str(flow_run / "checkpoints" / "last.ckpt"), str(tmp_path / "flow.pt")])
    model = load_model(exported)[0]
    assert model.diffusion_options == {"path": "linear", "prediction": "velocity"}
    with pytest.raises(UsageError, match="learns a flow .*use sampler=euler, heun, dopri5 or sde"):
        sample([str(exported), str(tmp_path / "ddpm"), "--num-samples", "4", "sampler=ddpm", "sampler.steps=5"])


def test_balanced_labels_need_a_multiple_of_the_classes(tiny_run, tmp_path):
    from dit.evaluation.sample import main as sample

    with pytest.raises(UsageError, match="divisible by 10"):
        sample([str(tiny_run), str(tmp_path / "s"), "--num-samples", "15", "--labels", "balanced"])
    with pytest.raises(UsageError, match="leave out --classes"):
        sample([str(tiny_run), str(tmp_path / "s"), "--num-samples", "10", "--labels", "balanced", "--classes", "1"])


def test_a_repa_run_trains_its_projector_on_the_shards_features(tmp_path):
    """objective=repa on shards whose records carry 16 tokens of 8 features: the step logs the
    alignment term, and the checkpoint holds the projector beside the backbone (the export does not)."""
    import train

    from dit.data.shards import write_shards
    from dit.tools.export import export

    rng = np.random.default_rng(0)
    records = []
    for i in range(64):
        image = rng.uniform(-1, 1, (1, 8, 8))
        posterior = np.stack([np.stack([image, 0 * image]), np.stack([image[..., ::-1], 0 * image])])
        records.append((i % 10, posterior, rng.normal(size=(16, 8))))
    write_shards(records, tmp_path / "shards", dict(channels=1, latent_size=8, num_classes=10, source="test"))
    cfg = quick_cfg(
        tmp_path / "run",
        tmp_path / "shards",
        "objective=repa",
        "objective.depth=1",
        "objective.encoder_dim=8",
        "objective.projector_dim=16",
        "data.features=true",
        "sampler=euler",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "trainer.log_every_n_steps=1",
        "data.global_batch_size=16",
        "~callbacks.digits_accuracy",
    )
    train.main(cfg)
    metrics = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/repa" in metrics.splitlines()[0]
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert any(k.startswith("objective_modules.projector.") for k in checkpoint["state_dict"])
    assert not any("projector" in k for k in export(checkpoint, "last.ckpt")["ema"])


def test_a_flow_objective_with_a_gaussian_sampler_is_refused_before_training(tmp_path, digits_dir, capsys):
    import train
    from conftest import one_line_error

    cfg = quick_cfg(tmp_path, digits_dir, "objective=flow", "trainer.max_steps=2")
    with pytest.raises(SystemExit) as exited:
        train.main(cfg)
    assert exited.value.code == 2
    one_line_error(capsys.readouterr().err, "sampler DDPM steps the Gaussian diffusion", "use sampler=euler, heun")
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["module.sampling.guidance_interval=[0.8,0.2]"], "module.sampling: guidance interval [0.8, 0.2]"),
        (["module.sampling.guidance=first3"], "module.sampling: unknown guidance variant 'first3'"),
        (["objective=repa", "objective.depth=2"], "set data.features=true"),
    ],
)
def test_bad_modern_settings_are_refused_before_the_first_step(overrides, message, tmp_path, digits_dir, capsys):
    import train
    from conftest import one_line_error

    cfg = quick_cfg(tmp_path, digits_dir, "objective=flow", "sampler=heun", *overrides)
    with pytest.raises(SystemExit):
        train.main(cfg)
    one_line_error(capsys.readouterr().err, message)
    assert not (tmp_path / "checkpoints").exists()


def test_balanced_labels_give_each_class_exactly_its_share():
    from dit.diffusion import batch_generator, batch_labels

    labels = torch.cat(
        [batch_labels(torch.arange(k * 7, min((k + 1) * 7, 30)), list(range(10)), 10, batch_generator(0, k, "cpu"))
         for k in range(5)]
    )  # fmt: skip
    assert torch.bincount(labels, minlength=10).tolist() == [3] * 10


def test_a_sample_folder_from_before_the_interval_and_labels_keys_is_resumed(tmp_path):
    """A folder whose manifest lacks guidance_interval, labels and float8 was drawn with guidance
    everywhere, random labels (or its --classes) and no float8: the same identity, so a rerun extends it."""
    from dit.evaluation.sample import check_sample_folder
    from dit.training.manifest import write_manifest

    now = dict(guidance_scale=1.5, classes=[], guidance_interval=[0.0, 1.0], labels="random", float8=None)
    write_manifest(tmp_path, dict(kind="samples", identity=dict(guidance_scale=1.5, classes=[])))
    (tmp_path / "000000.png").write_bytes(b"")
    check_sample_folder(tmp_path, now, overwrite=False, rank=0)  # accepted
    with pytest.raises(UsageError, match="guidance_interval"):
        check_sample_folder(tmp_path, now | dict(guidance_interval=[0.0, 0.7]), overwrite=False, rank=0)
    with pytest.raises(UsageError, match="float8: None -> 'rowwise'"):
        check_sample_folder(tmp_path, now | dict(float8="rowwise"), overwrite=False, rank=0)
