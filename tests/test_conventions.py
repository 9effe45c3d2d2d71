"""What users of lightning-hydra-template look for: debug= presets, a paths group, a git-ignored
local/ override, tags (required for a multirun when asked), and a --help that lists the project's
own groups."""

import json
import re
import shutil
import subprocess

import pytest
import torch
import train
from conftest import CONF, ROOT, compose_cfg, one_line_error, quick_cfg, run_train
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from dit.errors import UsageError
from dit.training.module import DiTModule
from dit.training.sweep_tags import swept_tags


@pytest.fixture
def seen_labels(monkeypatch):
    """The labels of every training batch, in order."""
    seen = []
    step = DiTModule.training_step

    def spy(self, batch, batch_idx):
        seen.append(batch[1].clone())
        return step(self, batch, batch_idx)

    monkeypatch.setattr(DiTModule, "training_step", spy)
    return seen


def test_debug_fdr_is_one_batch_and_no_checkpoint(tmp_path, digits_dir, seen_labels, capsys):
    cfg = quick_cfg(tmp_path, digits_dir, "debug=fdr")  # the quickstart's digits check included
    assert cfg.logger is None and cfg.trainer.detect_anomaly and cfg.module.compile is False
    train.main(cfg)
    assert len(seen_labels) == 1 and (tmp_path / "samples" / "step_0000001.png").exists()
    assert not list(tmp_path.glob("checkpoints/*.ckpt"))
    out = capsys.readouterr().out
    assert "digits: the accuracy check is skipped under fast_dev_run" in out
    assert "checkpoints:  none (fast_dev_run)" in out and "(the EMA grid once, at step 1)" in out


def test_debug_overfit_trains_on_one_batch_and_limit_on_many(tmp_path, digits_dir, seen_labels):
    cfg = quick_cfg(
        tmp_path / "overfit", digits_dir, "debug=overfit", "trainer.max_steps=4", "~callbacks.digits_accuracy"
    )
    assert cfg.trainer.overfit_batches == 1 and cfg.data.shuffle is False
    train.main(cfg)
    assert len(seen_labels) == 4 and all(torch.equal(seen_labels[0], y) for y in seen_labels)

    seen_labels.clear()
    out = tmp_path / "limit"
    train.main(quick_cfg(out, digits_dir, "debug=limit", "~callbacks.digits_accuracy", "tags=[smoke,v1]"))
    assert len(seen_labels) == 30 and not torch.equal(seen_labels[0], seen_labels[1])  # the shuffled data
    assert sorted(p.name for p in out.glob("checkpoints/step=*.ckpt")) == [f"step={s:07d}.ckpt" for s in (10, 20, 30)]
    assert sorted(p.name for p in out.glob("samples/step_*.png")) == [f"step_{s:07d}.png" for s in (10, 20, 30)]
    assert json.loads((out / "summary.json").read_text())["tags"] == ["smoke", "v1"]


def test_debug_profiler_reports_into_the_run_log(tmp_path, digits_dir):
    out = tmp_path / "run"
    train.main(quick_cfg(out, digits_dir, "debug=profiler", "trainer.max_steps=3", "~callbacks.digits_accuracy"))
    log = (out / "train.log").read_text()
    assert "FIT Profiler Report" in log and "run_training_batch" in log


def test_debug_runs_live_apart_and_real_runs_in_the_paths_folders(tmp_path):
    assert compose_cfg(["debug=limit"], tmp_path).paths.runs_dir == "outputs/debug"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["paths.runs_dir=/scratch/runs", "paths.data_dir=/scratch/data"],
            return_hydra_config=True,
        )
    assert cfg.data.path == "/scratch/data/imagenet256_latents"
    assert cfg.hydra.run.dir.startswith("/scratch/runs/") and cfg.hydra.sweep.dir.startswith("multirun/")


def test_a_number_names_a_run_as_a_word_does(tmp_path):
    """name=0 (Hydra reads the number 0) is the run folder outputs/0, not a timestamp; resume=auto takes it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for name in ("0", "abc"):
            cfg = compose("train", overrides=[f"name={name}", "resume=auto"], return_hydra_config=True)
            assert cfg.hydra.run.dir == f"outputs/{name}" and cfg.hydra.sweep.dir == f"multirun/{name}"
        assert compose("train", return_hydra_config=True).hydra.run.dir.startswith("outputs/20")
    assert train.has_name(0) and train.has_name("abc") and not train.has_name(None) and not train.has_name("")


def test_a_name_that_looks_like_a_number_names_the_folder_as_typed():
    """Hydra reads name=1.50 as the float 1.5 (outputs/1.5), name=true as True, name=1_000 as 1000
    (the folder of name=1000); train.py quotes a plain name so its folder is the name as typed."""
    argv = ["train.py", "name=1.50", "-m", "name=1.0,x/y", "++name=1e3 ", "name=NULL", "name='x'", "name=choice(a,b)"]
    assert train.quote_run_names(argv) == [
        "train.py",
        "name='1.50'",
        "-m",
        "name='1.0','x/y'",  # each name of a sweep, whatever the others are
        "++name='1e3'",
        "name=NULL",  # Hydra's null in any case
        "name='x'",
        "name=choice(a,b)",
    ]
    assert train.quote_run_names(["-cn", "name=7"]) == ["-cn", "name=7"]  # a flag's value
    for escaping in ("name=..", "name=a/../..", "name=.", "-m name=x,.."):
        with pytest.raises(UsageError, match="a run's name is its folder under paths.runs_dir; give one without"):
            train.quote_run_names(escaping.split())
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for typed, folder in (("1.50", "1.50"), ("1e3", "1e3"), ("true", "true"), ("1_000", "1_000"), ("007", "007")):
            (override,) = train.quote_run_names([f"name={typed}"])
            cfg = compose("train", overrides=[override], return_hydra_config=True)
            assert cfg.hydra.run.dir == f"outputs/{folder}" and cfg.name == typed


def test_the_multirun_flag_may_come_after_the_overrides():
    """Hydra's argparse takes -m only before the overrides ("unrecognized arguments" otherwise)."""
    assert train.multirun_flag_first(["train.py", "model=dit_s", "-m", "patch=2,4"]) == [
        "train.py",
        "-m",
        "model=dit_s",
        "patch=2,4",
    ]
    assert train.multirun_flag_first(["train.py", "a=1", "--multirun"]) == ["train.py", "--multirun", "a=1"]
    assert train.multirun_flag_first(["train.py", "-m", "a=1,2"]) == ["train.py", "-m", "a=1,2"]
    assert train.multirun_flag_first(["train.py", "a=1"]) == ["train.py", "a=1"]


def test_a_local_override_file_applies_and_git_ignores_it(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    local = conf / "local" / "default.yaml"
    local.parent.mkdir(exist_ok=True)
    local.write_text("# @package _global_\nseed: 7\npaths:\n  data_dir: /scratch/dit\n")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train")
    assert cfg.seed == 7 and cfg.data.path == "/scratch/dit/imagenet256_latents"
    local.unlink()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        assert compose("train").seed == 0
    ignored = subprocess.run(["git", "check-ignore", "-q", "conf/local/default.yaml"], cwd=ROOT)
    assert ignored.returncode == 0, "conf/local/default.yaml must be ignored by git"


def test_a_multirun_without_tags_is_refused_when_tags_are_required(tmp_path, digits_dir):
    result = run_train(
        ["-m", "experiment=quickstart", f"data.path={digits_dir}", "patch=2,4", "require_tags=true"]
        + ["trainer.max_steps=1", "~callbacks.digits_accuracy"],  # short jobs, were the check to let them run
        cwd=tmp_path,
    )
    assert result.returncode == 2
    one_line_error(result.stderr, "require_tags=true", "tags=[")
    assert not (tmp_path / "multirun").exists() or not list((tmp_path / "multirun").rglob("summary.json"))


# Choices that --help leaves out on purpose: bases of other files, test-only presets, the parts of
# callbacks=default, and the platform group that the trainer selects itself.
NOT_LISTED = {
    "model": {"default"},
    "trainer": {"default", "xla_cpu"},
    "debug": {"default"},
    "callbacks": {"ema", "checkpoint", "stop_checkpoint", "nonfinite_guard", "rng_state", "throughput", "progress_bar"},
}
NOT_GROUPS = {"hydra", "platform", "local"}


def test_help_lists_every_choice_of_the_project_and_hides_the_internal_ones(tmp_path):
    result = run_train(["--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "python train.py experiment=quickstart" in text and "debug=fdr" in text
    groups, current = {}, None
    section = text.split("Config groups", 1)[1].split("Values often set", 1)[0]
    for line in section.splitlines()[1:]:
        match = re.match(r"  (\w+)\s{2,}(.*)", line)
        if match:
            current = match.group(1)
            groups[current] = match.group(2)
        elif current and line.strip():
            groups[current] += " " + line.strip()
    for folder in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name not in NOT_GROUPS):
        assert folder.name in groups, f"--help does not list the group {folder.name}"
        for choice in sorted(p.stem for p in folder.glob("*.yaml")):
            listed = re.search(rf"\b{choice}\b", groups[folder.name]) is not None
            assert listed != (choice in NOT_LISTED.get(folder.name, ())), (folder.name, choice, groups[folder.name])


def test_tags_swept_on_the_command_line_count_as_tags():
    assert swept_tags(["patch=2,4", "tags=[a],[b]"]) and swept_tags(["+tags=[x]"])
    assert not swept_tags(["patch=2,4"]) and not swept_tags(["tags=[]"]) and not swept_tags(["require_tags=true"])
