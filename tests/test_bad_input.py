"""Bad input gets one clear line that names the problem and the fix, and leaves no half-written
run behind that would break resume=auto."""

import json

import pytest
import torch
from conftest import one_line_error, run_train

from dit.errors import UsageError

BASE = ["experiment=quickstart", "~callbacks.digits_accuracy", "trainer.max_steps=2", "trainer.val_check_interval=1000"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("model=dit_m", "Could not find 'model/dit_m'"),  # unknown group choice (Hydra lists the options)
        ("foo=1", "Could not override 'foo'"),  # unknown option
        ("trainer.max_steps=abc", "trainer.max_steps must be an integer, got 'abc'"),  # ours: one line, exit 2
    ],
)
def test_command_line_mistakes(tmp_path, digits_dir, override, message):
    """As a user types them: Hydra's composition errors and ours, through train.py's command line."""
    result = run_train([*BASE, f"data.path={digits_dir}", "name=bad", override], cwd=tmp_path)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    if not message.startswith("Could not"):  # not Hydra's own composition errors: ours, one line each
        assert result.returncode == 2 and one_line_error(result.stderr, message)
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing half-written; resume=auto would start fresh


@pytest.mark.parametrize(
    "override, message",
    [
        ("module.optimizer.lr=fast", "module.optimizer.lr must be a number, got 'fast'"),
        ("trainer=gpu", "no CUDA GPU is visible (torch.cuda.is_available() is False); use trainer=cpu"),
        ("trainer=tpu_v3", "this machine has no TPU; use trainer=gpu or trainer=cpu"),
        (
            ["trainer=ddp", "trainer.accelerator=cpu"],
            "trainer.devices=-1 with trainer.accelerator=cpu: give the number",
        ),
        (
            ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "module.compile=reduce-overhead"],
            "module.compile=reduce-overhead uses CUDA graphs, which cannot hold FSDP's collectives",
        ),
        ("callbacks=fid", "callbacks.fid.ref needs a value (the FID reference: statistics"),  # a ??? left unset
        # read only at the first sample grid, steps into a run: refused before the first step
        ("module.sampling.guidance_scale=abc", "module.sampling.guidance_scale must be a number, got 'abc'"),
        (["sampler=ddim", "sampler.eta=abc"], "sampler.eta must be a number, got 'abc'"),
        ("data.sample_classes=[11]", "data.sample_classes must be a list of class labels in [0, 9], got [11]"),
        ("module.optimizer.lr=inf", "module.optimizer.lr must be a number of at least 0, got inf"),
        ("trainer.precision=bf16-true", "trainer.precision=bf16-true: the run keeps fp32 weights"),
        ("module.compile=1", "module.compile=1; use one of True, False, auto"),  # 1 == True in Python
        (
            ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=3"],  # refused once, before 3 ranks start
            "data.global_batch_size=128 does not divide over 3 devices (trainer.devices=3, trainer.num_nodes=1)",
        ),
        # refused by the class the node instantiates (Lightning, torch): the node named, one line
        ("trainer.devices=abc", "trainer: `devices` selected with `CPUAccelerator` should be an int > 0."),
        ("trainer.accelerator=mps", "trainer: `MPSAccelerator` can not run on your system"),
        ("callbacks.ema.multi_avg_fn.decay=1.5", "callbacks.ema.multi_avg_fn: Invalid decay value 1.5 provided."),
        ("trainer.num_nodes=0", "trainer: `num_nodes` must be a positive integer"),
        ("module.optimizer.betas=[2,3]", "module.optimizer: Invalid beta parameter at index 0: 2"),  # torch's
        ("module.optimizer.betas=[0.9]", "module.optimizer: "),
        ("resume=Auto", "resume=Auto: write resume=auto (in lower case)"),
        # no launcher set a node's variables: Lightning would wait for node 1 without end
        (
            "trainer.num_nodes=2",
            "trainer.num_nodes=2, but no cluster launcher started this process",
        ),  # else taken as a file's path
        ("data.global_batch_size=100", None),  # fine on one device: the control
    ],
)
def test_config_mistakes(tmp_path, digits_dir, capsys, monkeypatch, override, message):
    """The same checks on the composed config, in this process (train.main: one line, exit code 2)."""
    import train
    from conftest import compose_cfg

    for variable in train.CLUSTER_VARIABLES:  # as on a laptop: no cluster launcher around
        monkeypatch.delenv(variable, raising=False)
    overrides = override if isinstance(override, list) else [override]
    cfg = compose_cfg([*BASE, f"data.path={digits_dir}", "logger=none", *overrides], tmp_path)
    if message is None:
        train.main(cfg)
        return
    one_line_error(train_error(cfg, capsys), message)
    # refused before the run's record: a resume's manifest.json would list a launch that never ran
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "manifest.json").exists()


def test_the_digits_are_never_written_into_a_folder_of_other_files(tmp_path, capsys):
    """data.prepare=digits on a data.path that holds someone's files: refused, the files as they were."""
    from conftest import compose_cfg

    theirs = tmp_path / "my_latents"
    theirs.mkdir()
    (theirs / "index.json").write_text('{"chunks": ["mine"]}')
    cfg = compose_cfg([*BASE, f"data.path={theirs}", "logger=none"], tmp_path / "run")
    one_line_error(
        train_error(cfg, capsys),
        f"data.path={theirs} holds files but no meta.json",
        "the digits are written only into a new or empty folder",
    )
    assert [p.name for p in theirs.iterdir()] == ["index.json"]
    assert (theirs / "index.json").read_text() == '{"chunks": ["mine"]}'


def test_truncated_or_missing_shard(tmp_path, digits_dir, capsys):
    import shutil

    from conftest import compose_cfg

    data = tmp_path / "digits"
    shutil.copytree(digits_dir, data)
    chunk = data / json.loads((data / "index.json").read_text())["chunks"][0]["filename"]
    chunk.write_bytes(chunk.read_bytes()[:1000])
    cfg = [*BASE, f"data.path={data}", "data.prepare=null", "logger=none"]
    one_line_error(
        train_error(compose_cfg(cfg, tmp_path / "a"), capsys), f"shard {chunk} is truncated or corrupt (1000 bytes"
    )
    chunk.unlink()
    one_line_error(train_error(compose_cfg(cfg, tmp_path / "b"), capsys), f"shard {chunk} is missing")


def test_resume_from_a_checkpoint_of_another_model(tmp_path, digits_dir, tiny_run, capsys):
    """A checkpoint of another design is refused, and accepting changes cannot make its weights fit."""
    from conftest import compose_cfg

    base = [*BASE, f"data.path={digits_dir}", "name=other", f"resume={tiny_run}", "conditioning=in_context"]
    error = train_error(compose_cfg(base, tmp_path / "a"), capsys)
    one_line_error(error, "model.conditioning: 'adaln_zero' -> 'in_context'")
    error = train_error(compose_cfg([*base, "accept_changes=true"], tmp_path / "b"), capsys)
    one_line_error(
        error,
        "settings that a run cannot change (model.conditioning: 'adaln_zero' -> 'in_context')",
        "module.init_from=",
    )


def test_output_folder_that_cannot_be_written(tmp_path, digits_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_train([*BASE, f"data.path={digits_dir}", f"hydra.run.dir={blocker / 'run'}"], cwd=tmp_path)
    assert result.returncode != 0 and str(blocker) in result.stderr and "Not a directory" in result.stderr


def test_labels_beyond_num_classes_in_the_model():
    from dit.models import DiT

    model = DiT(input_size=8, in_channels=1, num_classes=10, depth=1, hidden_size=32, num_heads=2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\] for 10 classes, got labels in \[0, 12\]"):
        model(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), torch.tensor([0, 12]))


def test_tpu_preset_without_torch_xla(monkeypatch, tmp_path):
    import sys

    import train
    from conftest import compose_cfg

    monkeypatch.setitem(sys.modules, "torch_xla", None)  # as if not installed
    for preset, extra in (
        ("tpu_v3", []),
        ("tpu_v3_pod", [f"shared_dir={tmp_path}", "name=pod"]),
    ):  # the message names the preset typed
        cfg = compose_cfg([f"trainer={preset}", *extra], tmp_path)
        with pytest.raises(UsageError, match=rf"trainer={preset} needs torch_xla: pip install -e \".\[tpu\]\""):
            train.check_config(cfg)


def train_error(cfg, capsys):
    """train.py's task function on a composed config: it must end with exit code 2 and one line."""
    import train

    with pytest.raises(SystemExit) as exited:
        train.main(cfg)
    assert exited.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("patch=0", "patch must be an integer of at least 1, got 0"),
        ("data.global_batch_size=0", "data.global_batch_size must be an integer of at least 1, got 0"),
        ("data.global_batch_size=-32", "data.global_batch_size must be an integer of at least 1, got -32"),
        ("module.optimizer.lr=-1e-4", "module.optimizer.lr must be a number of at least 0, got -0.0001"),
        ("data.sample_batch_size=0", "data.sample_batch_size must be an integer of at least 1, got 0"),
        ("data.samples_per_class=-1", "data.samples_per_class must be an integer of at least 1, got -1"),
        (
            "module.init_from=/nowhere/DiT-XL-2-256x256.pt",
            "module.init_from=/nowhere/DiT-XL-2-256x256.pt: no checkpoint file at",
        ),
        ("accept_changes=maybe", "accept_changes must be true or false, got 'maybe'"),
        ("require_tags=yes_please", "require_tags must be true or false, got 'yes_please'"),
        ("tags=scaling", "tags must be a list of words, e.g. tags=[scaling,v2], got 'scaling'"),
        ("cpu_threads=0", "cpu_threads must be auto or an integer of at least 1, got 0"),
        ("cpu_threads=all", "cpu_threads must be auto or an integer of at least 1, got 'all'"),
    ],
)
def test_bad_values_get_one_line(tmp_path, digits_dir, capsys, override, message):
    from conftest import compose_cfg

    cfg = compose_cfg([*BASE, f"data.path={digits_dir}", override], tmp_path)
    one_line_error(train_error(cfg, capsys), message)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_bad_files_get_one_line(tmp_path, digits_dir, capsys):
    """init_from that is no checkpoint; a data folder of random files; a corrupt index.json."""
    import shutil

    from conftest import compose_cfg

    (tmp_path / "notes.pt").write_text("not a checkpoint")
    random_files = tmp_path / "random"
    random_files.mkdir()
    (random_files / "x.bin").write_bytes(bytes(range(256)))
    broken = tmp_path / "broken"
    shutil.copytree(digits_dir, broken)
    (broken / "index.json").write_text('{"chunks": [')
    for override, message in [
        (f"module.init_from={tmp_path / 'notes.pt'}", "notes.pt is not a readable checkpoint"),
        (f"data.path={random_files}", f"data folder {random_files} holds no meta.json"),
        (f"data.path={broken}", f"{broken / 'index.json'} is corrupt"),
        (f"data.path={tmp_path / 'notes.pt'}", "notes.pt is a file, not a folder: point data.path at a folder"),
    ]:
        cfg = compose_cfg([*BASE, f"data.path={digits_dir}", "data.prepare=null", override], tmp_path / "run")
        one_line_error(train_error(cfg, capsys), message)
    cfg = compose_cfg([*BASE, f"data.path={tmp_path / 'notes.pt'}", "data.prepare=digits"], tmp_path / "run")
    one_line_error(train_error(cfg, capsys), "is a file, not a folder", "a new folder to prepare the digits in")


def test_steps_typed_without_quotes_are_accepted(tmp_path, digits_dir):
    """sampler.steps=250 reaches the config as the integer 250; it means "250"."""
    import train
    from conftest import compose_cfg

    cfg = compose_cfg(
        [
            *BASE,
            f"data.path={digits_dir}",
            "sampler.steps=3",
            "trainer.val_check_interval=2",
            "data.samples_per_class=1",
            "logger=none",
        ],
        tmp_path,
    )
    assert cfg.module.sampler.steps == 3
    train.main(cfg)
    assert (tmp_path / "samples" / "step_0000002.png").exists()


def test_checkpoints_that_cannot_be_written_are_found_before_training(tmp_path, digits_dir, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    from conftest import compose_cfg

    # /proc refuses new files even to root, as a read-only mount would
    cfg = compose_cfg(
        [*BASE, f"data.path={digits_dir}", "callbacks.checkpoint.dirpath=/proc/dit-checkpoints"], tmp_path
    )
    one_line_error(train_error(cfg, capsys), "checkpoints cannot be written to /proc/dit-checkpoints")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 2**20, 2**20))  # 1 MiB free
    cfg = compose_cfg([*BASE, f"data.path={digits_dir}"], tmp_path / "full")
    one_line_error(train_error(cfg, capsys), "has 0.00 GiB free, but one checkpoint of this run takes about 0.02 GiB")
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.csv"))  # no step was taken


@pytest.mark.parametrize(
    "tool, argv, message",
    [
        ("sample", ["x.pt", "out", "--num-samples", "many"], "argument --num-samples: invalid int value: 'many'"),
        ("fid50k", ["x.pt", "out"], "the following arguments are required: --ref"),
        ("export", ["only-one-argument.ckpt"], "the following arguments are required: output"),
        ("flops", ["--image-size", "256px"], "argument --image-size: invalid int value: '256px'"),
    ],
)
def test_tools_take_bad_arguments_in_one_line(capsys, tool, argv, message):
    import importlib

    from dit.errors import exit_on_usage_error

    main = importlib.import_module(f"dit.{tool}").main
    with pytest.raises(SystemExit) as exited:
        exit_on_usage_error(lambda: main(argv))
    assert exited.value.code == 2
    one_line_error(capsys.readouterr().err, message, "--help lists the arguments")


def test_a_folder_of_another_run_without_checkpoints_is_not_taken_over(tmp_path, digits_dir, capsys):
    """A run that saved no checkpoint (checkpoints off, or stopped before the first) leaves its
    manifest and summary: the same settings may start it again, other settings are refused."""
    import train
    from conftest import compose_cfg

    no_checkpoints = [
        *BASE,
        f"data.path={digits_dir}",
        "logger=none",
        "~callbacks.checkpoint",
        "~callbacks.stop_checkpoint",
    ]
    out = tmp_path / "run"
    train.main(compose_cfg(no_checkpoints, out))
    train.main(compose_cfg(no_checkpoints, out))  # the same settings again: a retry
    record = (out / "manifest.json").read_text()
    assert len(json.loads(record)["launches"]) == 2
    error = train_error(compose_cfg([*no_checkpoints, "module.optimizer.lr=5e-4"], out), capsys)
    one_line_error(error, f"{out} holds an earlier run of other settings that saved no checkpoint", "another name=")
    assert (out / "manifest.json").read_text() == record


def test_resume_auto_points_to_the_folder_hydra_gave_a_number_like_name(tmp_path, digits_dir, capsys):
    """name=2.50 once made the folder 2.5 (Hydra read the number); resume=auto on name=2.50 says where
    that run is instead of starting a fresh one beside it."""
    from conftest import compose_cfg

    old = tmp_path / "outputs" / "2.5" / "checkpoints"
    old.mkdir(parents=True)
    (old / "last.ckpt").write_bytes(b"a checkpoint")
    cfg = compose_cfg([*BASE, f"data.path={digits_dir}", "logger=none", "name='2.50'", "resume=auto"], tmp_path)
    cfg.output_dir = str(tmp_path / "outputs" / "2.50")
    one_line_error(
        train_error(cfg, capsys),
        f"resume=auto: {tmp_path}/outputs/2.50 holds no checkpoint, but {old.parent} does",
        f"(mv {old.parent} {tmp_path}/outputs/2.50) or give name=2.5",
    )
    assert (old / "last.ckpt").read_bytes() == b"a checkpoint"
