"""docs/extending.md's examples, run as written there: a sampler and an objective defined outside
the package, registered in Hydra's ConfigStore, chosen by name in train.py and `python -m dit.sample`."""

import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import train
from conftest import QUICK, compose_cfg, one_line_error
from hydra.core.config_store import ConfigStore

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


@pytest.fixture(scope="module")
def plugins():
    """The doc's Python blocks (the ConfigStore line aside, which names the doc's own package) as
    the module `extending_example`, and its two classes registered as sampler=mean, objective=min_snr."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    module = types.ModuleType("extending_example")
    sys.modules[module.__name__] = module
    for block in blocks:
        if "ConfigStore" not in block:
            exec(compile(block, str(DOC), "exec"), module.__dict__)
    store = ConfigStore.instance()
    store.store(group="sampler", name="mean", node={"_target_": "extending_example.MeanSampler", "steps": "5"})
    store.store(group="objective", name="min_snr", node={"_target_": "extending_example.MinSNR", "gamma": 5.0})
    yield module
    del sys.modules[module.__name__]


def test_a_new_sampler_serves_the_grids_and_dit_sample(plugins, tmp_path, digits_dir):
    from dit.evaluation.sample import main as sample_main

    run = tmp_path / "run"
    cfg = compose_cfg(
        [
            "experiment=quickstart",
            f"data.path={digits_dir}",
            *QUICK,
            "sampler=mean",
            "trainer.max_steps=4",
            "trainer.val_check_interval=4",
            "data.global_batch_size=32",
            "~callbacks.digits_accuracy",
            "logger=none",
        ],
        run,
    )
    assert cfg.module.sampler._target_ == "extending_example.MeanSampler"
    train.main(cfg)
    assert (run / "samples" / "step_0000004.png").exists()

    ckpt = run / "checkpoints" / "last.ckpt"
    args = [
        "--num-samples",
        "4",
        "--batch-size",
        "2",
        "--accelerator",
        "cpu",
        "--devices",
        "1",
        "--guidance-scale",
        "1",
    ]
    sample_main([str(ckpt), str(tmp_path / "mean"), "sampler=mean", "sampler.steps=3", *args])
    sample_main([str(ckpt), str(tmp_path / "ddpm"), "sampler=ddpm", "sampler.steps=3", *args])
    manifest = json.loads((tmp_path / "mean" / "manifest.json").read_text())
    assert manifest["identity"]["sampler.class"] == "extending_example.MeanSampler"
    assert manifest["identity"]["sampler.steps"] == "3"
    mean, ddpm = (np.load(tmp_path / f"{name}.npz")["arr_0"] for name in ("mean", "ddpm"))
    assert mean.shape == ddpm.shape == (4, 8, 8, 3)
    assert not np.array_equal(mean, ddpm)  # the plug-in drew them, not DDPM


def test_a_new_objective_trains(plugins, tmp_path, digits_dir):
    cfg = compose_cfg(
        [
            "experiment=quickstart",
            f"data.path={digits_dir}",
            *QUICK,
            "objective=min_snr",
            "model.learn_sigma=false",
            "trainer.max_steps=3",
            "trainer.log_every_n_steps=1",
            "trainer.val_check_interval=3",
            "data.global_batch_size=32",
            "~callbacks.digits_accuracy",
        ],
        tmp_path,
    )
    train.main(cfg)
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    header, *rows = metrics.splitlines()
    assert "train/loss" in header and "train/mse" in header and "train/vb" not in header
    losses = [
        float(r.split(",")[header.split(",").index("train/loss")])
        for r in rows
        if r.split(",")[header.split(",").index("train/loss")]
    ]
    assert len(losses) == 3 and all(np.isfinite(losses))


def test_an_unknown_sampler_is_one_line(plugins, tmp_path, tiny_run, capsys):
    from dit.errors import exit_on_usage_error
    from dit.evaluation.sample import main as sample_main

    with pytest.raises(SystemExit):
        exit_on_usage_error(
            lambda: sample_main([str(tiny_run), str(tmp_path / "x"), "sampler=nope", "--accelerator", "cpu"])
        )
    one_line_error(capsys.readouterr().err, "sampler=nope")
