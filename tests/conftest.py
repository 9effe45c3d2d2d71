import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import open_dict
from PIL import Image

from dit.data.datamodule import LatentDataModule
from dit.data.shards import write_shards
from dit.evaluation.fid import main as fid_main
from dit.models import DiT

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # train.py lives at the root

# cpu_threads=auto (train.py) follows the machine's load; the tests keep torch's thread count as it is, so
# that two runs compared bit for bit within a test (resume, DDP) use the same count.
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
# Tests never reach wandb's servers, whatever login the machine has.
os.environ["WANDB_MODE"] = "offline"
os.environ.pop("WANDB_API_KEY", None)
# The digits FD's classifier (dit.evaluation.digit_features) is fitted once per session, into a cache
# of the session's own rather than the user's ~/.cache/dit.
os.environ["DIT_CACHE"] = tempfile.mkdtemp(prefix="dit-cache-")


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """The digits shards, written once per test session."""
    from dit.data.digits import prepare_digits

    path = tmp_path_factory.mktemp("data") / "digits"
    prepare_digits(path)
    return path


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory):
    """torch-fidelity's own Inception-v3, randomly initialised, in a file (dit.fid.random_inception):
    the real weights cannot be downloaded here."""
    from dit.evaluation.fid import random_inception

    return random_inception(tmp_path_factory.mktemp("inception") / "inception.pth")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, digits_dir):
    """The last.ckpt of a 12-step quickstart run (real digits, EMA decay 0.9)."""
    import train

    out = tmp_path_factory.mktemp("run")
    cfg = quick_cfg(
        out,
        digits_dir,
        "trainer.max_steps=12",
        "data.global_batch_size=32",
        "trainer.val_check_interval=12",
        "callbacks.ema.multi_avg_fn.decay=0.9",
        "~callbacks.digits_accuracy",
    )
    train.main(cfg)
    return out / "checkpoints" / "last.ckpt"


def one_line_error(stderr, *fragments):
    """A usage error as train.py and the tools print it: its one line is the last on stderr,
    nothing on stderr is a traceback, and it says each of `fragments`. Returns the line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), stderr[-3000:]
    assert sum(line.startswith("error: ") for line in lines) == 1, stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]


# ---------------------------------------------------------------- helpers the test modules share


CONF = ROOT / "conf"


# A few seconds of work for every run below: 5-step sample grids of 2 images per class.
QUICK = ["sampler.steps='5'", "data.samples_per_class=2"]


def compose_cfg(overrides, out_dir):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.output_dir = str(out_dir)
        del cfg.hydra  # as in a real job: the hydra node is reached through HydraConfig
    return cfg


def quick_cfg(tmp_path, digits_dir, *overrides):
    return compose_cfg(["experiment=quickstart", f"data.path={digits_dir}", *QUICK, *overrides], tmp_path)


def child_env():
    """The environment of a child process as a user's shell has it: not the process group that an
    earlier in-process test set up. Lightning leaves MASTER_PORT, LOCAL_RANK, ... behind, and a child
    that sees LOCAL_RANK takes itself for a rank already launched (it never starts rank 1, and waits
    for it); no HYDRA_FULL_ERROR either."""
    launched = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in launched and not k.startswith("PL_")}
    env["PYTHONPATH"] = str(ROOT / "src")
    return env


def run_train(args, cwd, timeout=600):
    env = child_env()
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_pngs(images, folder):
    folder.mkdir()
    for i in range(len(images)):
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(folder / f"{i:06d}.png")


def tiny(**kwargs):
    """A small config through the same code as the paper's: 2 blocks, width 64, 4 heads."""
    args = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    return DiT(**(args | kwargs))


def tiny_with_live_blocks(**kwargs):
    """tiny(), seeded, with its zero-initialised parameters (adaLN-Zero's regressions, the output
    layer) drawn non-zero, so that every block changes the output."""
    torch.manual_seed(0)
    model = tiny(**kwargs)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0, 0.02)
    return model


def numbered_shards(path, n=64, channels=2, size=4, num_classes=10):
    """Shards whose record i has posterior mean i (image) and -i (flip), std 0, label i % classes."""
    records = []
    for i in range(n):
        mean = np.stack([np.full((channels, size, size), i), np.full((channels, size, size), -i)])[:, None]
        records.append((i % num_classes, np.concatenate([mean, np.zeros_like(mean)], axis=1)))
    write_shards(
        records,
        path,
        dict(channels=channels, latent_size=size, num_classes=num_classes, source="test"),
        chunk_bytes="1KB",
    )
    return path


def datamodule(path, world=1, batch=8, **kw):
    args = dict(
        channels=2,
        latent_size=4,
        num_classes=10,
        global_batch_size=batch * world,
        num_workers=0,
        scale_factor=1.0,
        flip=False,
    )
    dm = LatentDataModule(path, **(args | kw))
    dm.trainer = SimpleNamespace(world_size=world, local_rank=0, training=True)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="session")
def sweep(tmp_path_factory, digits_dir, random_inception):
    from dit.evaluation.fid import digit_images

    tmp = tmp_path_factory.mktemp("scaling")
    digits = digit_images()
    write_pngs(torch.stack([digits[i] for i in range(3)]), tmp / "real")
    fid_main(
        [
            "--ref",
            str(tmp / "real"),
            "--resolution",
            "8",
            "--inception-weights",
            str(random_inception),
            "--save-ref-stats",
            str(tmp / "digits_ref.npz"),
        ]
    )
    result = run_train(
        [
            "-m",
            "experiment=quickstart",
            f"data.path={digits_dir}",
            "patch=2,4",
            "seed=0,1",
            "logger=wandb",  # offline (tests/conftest.py): the sweep's charts go into a wandb run too
            "trainer.max_steps=6",
            "trainer.val_check_interval=6",
            "trainer.log_every_n_steps=2",
            "data.global_batch_size=16",
            "callbacks.ema.multi_avg_fn.decay=0.5",
            "~callbacks.digits_accuracy",
            *QUICK,
            "callbacks=fid",
            f"callbacks.fid.ref={tmp / 'digits_ref.npz'}",
            f"callbacks.fid.inception_weights={random_inception}",
            "callbacks.fid.every_n_steps=3",
            "callbacks.fid.num_samples=3",
            "sampler.steps='5'",
            f"hydra.sweep.dir={tmp / 'sweep'}",
        ],
        cwd=tmp,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "sweep"


SHORT = [
    "experiment=quickstart",
    "trainer.val_check_interval=1000",
    "~callbacks.digits_accuracy",
    "trainer.log_every_n_steps=1",
    "callbacks.checkpoint.every_n_train_steps=10",
    "callbacks.progress_bar.refresh_rate=0",
]


def args(digits_dir, *extra):
    return [*SHORT, f"data.path={digits_dir}", *extra]


def pytest_collection_modifyitems(items):
    """Tests that run train.py or a tool as a subprocess are marked `e2e` (`pytest -m e2e` runs only
    them, `-m "not e2e"` skips them), read from their source so no such test goes unmarked."""
    import inspect

    for item in items:
        function = getattr(item, "function", None)
        if function is not None and (
            "run_train(" in inspect.getsource(function) or "subprocess." in inspect.getsource(function)
        ):
            item.add_marker(pytest.mark.e2e)


# ---------------------------------------------------------------- progress bars of the long steps


def bars(err, desc):
    """The last "n/total" of each bar labelled `desc`, one entry a bar (each bar starts by drawing "0/total")."""
    ends = []
    for count in re.findall(re.escape(desc) + r":\s+\d+%\|[^|]*\| (\d+/\d+) ", err):
        if count.startswith("0/"):
            ends.append(count)
        else:
            ends[-1] = count
    return ends


def stand_in_run(rank=0, world=1, refresh_rate=20, root="."):
    """What the callbacks read of a Trainer and a DiTModule (a tiny untrained DiT of the digits), with
    Lightning's progress bar callback set up as in a run: off on ranks other than 0, and with
    refresh_rate=0 (as the tests run train.py). all_gather gives this rank's tensors back."""
    progress = TQDMProgressBar(refresh_rate=refresh_rate)
    trainer = SimpleNamespace(
        global_rank=rank,
        world_size=world,
        is_global_zero=rank == 0,
        callbacks=[progress],
        progress_bar_callback=progress,
        datamodule=SimpleNamespace(pixels=True, scale_factor=1.0),
        default_root_dir=str(root),
        loggers=[],
        global_step=0,
        max_steps=-1,
        fast_dev_run=False,
    )
    progress.setup(trainer, None, "fit")
    model = tiny(in_channels=1).eval()
    module = SimpleNamespace(
        model=model, device=torch.device("cpu"), diffusion_options=dict(learn_sigma=True), all_gather=lambda x: x
    )
    return trainer, module
