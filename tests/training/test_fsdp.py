"""trainer=fsdp (torch's FSDP2 through dit.training.fsdp) on the CPU with 2 gloo processes: the
same training as DDP, checkpoints in DDP's layout that resume bit for bit under either strategy,
and the 2.1B preset it is for."""

import csv
import subprocess
import sys

import pytest
import torch
from conftest import QUICK, ROOT, child_env, compose_cfg
from hydra.utils import instantiate

from dit.errors import UsageError
from dit.training.fsdp import FSDP, fsdp_compile_mode

TWO_RANKS = [
    "experiment=quickstart",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.precision=32-true",
    "trainer.log_every_n_steps=1",
    "trainer.val_check_interval=2",  # an EMA sample grid in the middle: the EMA swapped in and out
    "~callbacks.digits_accuracy",
    "logger=csv",
    "print_config=false",
    *QUICK,
]


def launch(tmp_path, digits_dir, name, strategy, steps, *extra):
    """train.py started in the background: two runs share the 2 cores (each mostly imports)."""
    args = [*TWO_RANKS, f"data.path={digits_dir}", f"paths.runs_dir={tmp_path}", f"name={name}"]
    args += [f"trainer={strategy}", f"trainer.max_steps={steps}", *extra]
    env = {**child_env(), "MASTER_PORT": str(29500 + 10 * len(name) + steps)}  # concurrent runs, own ports
    return name, subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    )


def finish(tmp_path, *launched):
    for _, process in launched:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
    return [
        torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        for name, _ in launched
    ]


def train(tmp_path, digits_dir, name, strategy, steps, *extra):
    return finish(tmp_path, launch(tmp_path, digits_dir, name, strategy, steps, *extra))[0]


def losses(tmp_path, name):
    with open(tmp_path / name / "csv" / "version_0" / "metrics.csv") as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


def biggest_gap(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_dir):
    """4 steps under DDP; 4 under FSDP; 2 under FSDP resumed to 4."""
    tmp = tmp_path_factory.mktemp("fsdp")
    ckpts = dict(
        zip(
            ("ddp", "fsdp"),
            finish(tmp, launch(tmp, digits_dir, "ddp", "ddp", 4), launch(tmp, digits_dir, "fsdp", "fsdp", 4)),
        )
    )
    train(tmp, digits_dir, "resumed", "fsdp", 2)
    ckpts["resumed"] = train(tmp, digits_dir, "resumed", "fsdp", 4, "resume=auto")
    return tmp, ckpts


def test_fsdp_trains_as_ddp(runs):
    """Reduce-scatter of shards against all-reduce of replicas: the same mean gradient, so the
    same losses, weights, EMA and AdamW moments up to float rounding."""
    tmp, ckpts = runs
    ddp, fsdp = ckpts["ddp"], ckpts["fsdp"]
    assert fsdp["global_step"] == ddp["global_step"] == 4
    assert losses(tmp, "fsdp") == pytest.approx(losses(tmp, "ddp"), abs=1e-6) and len(losses(tmp, "fsdp")) == 4
    assert biggest_gap(fsdp["current_model_state"], ddp["current_model_state"]) < 1e-6  # trained weights
    assert biggest_gap(fsdp["state_dict"], ddp["state_dict"]) < 1e-6  # the EMA, whole in the file
    # the weights moved (a check that compares two untrained models would pass too)
    assert biggest_gap(fsdp["current_model_state"], fsdp["state_dict"]) > 1e-4
    # the optimizer state in DDP's layout: the same keys, the same moments
    state, theirs = fsdp["optimizer_states"][0]["state"], ddp["optimizer_states"][0]["state"]
    assert sorted(state) == sorted(theirs)
    assert max((state[i]["exp_avg"] - theirs[i]["exp_avg"]).abs().max().item() for i in state) < 1e-6
    assert (tmp / "fsdp" / "samples" / "step_0000002.png").exists()


def assert_continues_exactly(resumed, straight):
    assert resumed["global_step"] == 4
    for key in ("current_model_state", "state_dict"):
        assert all(torch.equal(resumed[key][k], straight[key][k]) for k in straight[key]), key
    mine, theirs = resumed["optimizer_states"][0]["state"], straight["optimizer_states"][0]["state"]
    assert all(torch.equal(mine[i][m], theirs[i][m]) for i in theirs for m in ("exp_avg", "exp_avg_sq", "step"))


def test_fsdp_resumes_exactly(runs):
    """Stopped at step 2 and continued to 4: bit for bit the uninterrupted FSDP run (weights, EMA,
    AdamW state)."""
    _, ckpts = runs
    assert_continues_exactly(ckpts["resumed"], ckpts["fsdp"])


@pytest.mark.slow
def test_a_ddp_checkpoint_resumes_under_fsdp(runs, digits_dir):
    """The same file layout under both strategies: 2 DDP steps continued to 4 under FSDP are bit for
    bit the FSDP run of 4."""
    tmp, ckpts = runs
    train(tmp, digits_dir, "from_ddp", "ddp", 2)
    assert_continues_exactly(train(tmp, digits_dir, "from_ddp", "fsdp", 4, "resume=auto"), ckpts["fsdp"])


def test_the_2b_preset(tmp_path):
    """model=dit_g: over 2B parameters (XL's depth at width 2048, 16 heads), built on no device."""
    cfg = compose_cfg(["model=dit_g", "patch=2", "trainer=fsdp"], tmp_path)
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 2.0e9
    assert (len(model.blocks), model.pos_embed.shape[-1], model.num_heads) == (28, 2048, 16)
    assert cfg.trainer.strategy._target_ == "dit.training.fsdp.FSDP"


def test_a_bad_reshard_setting_is_one_line():
    with pytest.raises(UsageError, match="trainer.strategy.reshard_after_forward='maybe'; give true or false"):
        FSDP(reshard_after_forward="maybe")


def test_compile_modes_under_fsdp():
    """The blocks compile without CUDA graphs, which cannot hold FSDP's collectives."""
    assert fsdp_compile_mode("auto", "cuda") == "default" and fsdp_compile_mode("auto", "cpu") is None
    assert fsdp_compile_mode(True, "cpu") == "default" and fsdp_compile_mode(False, "cuda") is None
    assert fsdp_compile_mode("max-autotune-no-cudagraphs", "cuda") == "max-autotune-no-cudagraphs"
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(UsageError, match="module.compile=.*trainer=fsdp"):
            fsdp_compile_mode(mode, "cuda")
