"""The TPU code path on torch_xla's CPU runtime (PJRT_DEVICE=CPU): trainer=xla_cpu is trainer=tpu_v3
(Lightning's XLA strategy, bf16 autocast, XLA checkpoint IO, the EMA's XLA fix) with an accelerator
that accepts the CPU runtime. Nothing here has run on a real TPU."""

import os
import pickle
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
import torch_xla.debug.metrics as metrics  # noqa: E402
import train
from conftest import QUICK, compose_cfg, one_line_error, run_train
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback

from dit.diffusion import create_diffusion, guided
from dit.models import DiT
from dit.tools.export import backbone_weights

os.environ.setdefault("PJRT_DEVICE", "CPU")  # before torch_xla starts its runtime


# Compile without LLVM's optimisation passes: the same graphs (and counts), compiled in about half the
# time, which is most of these tests' time; a one-job run took 25.5 s, 17.5 s with this (2 CPU cores).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")


xla = pytest.importorskip("torch_xla")


# Start the runtime at collection, before the session's first backward pass (a CPU test's) sizes
# autograd's per-device queues: started later, XLA's backward fails an internal assert.
DEVICE = xla.device()


SMALL = ["model.depth=1", "model.hidden_size=32", "model.num_heads=2", "data.global_batch_size=32"]


def count(metric="CompileTime"):
    """How many XLA compilations (or, with "TransferFromDeviceTime", device-to-host reads) so far."""
    data = metrics.metric_data(metric)
    return data[0] if data else 0


class CompileCounter(Callback):
    """XLA compilations and host reads so far after every step, and the live weights at the last step."""

    def __init__(self):
        self.counts, self.reads = {}, {}
        self.live = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counts[trainer.global_step] = count()
        self.reads[trainer.global_step] = count("TransferFromDeviceTime")
        if trainer.global_step == trainer.max_steps:
            self.live = {k: v.cpu() for k, v in pl_module.model.state_dict().items()}


class HandedOver(Exception):
    pass


def test_training_under_xla_compiles_a_fixed_set_of_graphs(tmp_path, digits_dir):
    counter = CompileCounter()
    cfg = compose_cfg(
        [
            "experiment=quickstart",
            f"data.path={digits_dir}",
            *QUICK,
            *SMALL,
            "trainer=xla_cpu",
            "trainer.max_steps=15",
            "trainer.log_every_n_steps=3",
            "trainer.limit_val_batches=0",
            "~callbacks.digits_accuracy",
            "module.optimizer.lr=3e-3",
        ],
        tmp_path,
    )
    callbacks = [counter]
    original = train.instantiate
    # The counter joins the run's own callbacks (train.main builds the Trainer from the config).
    train.instantiate = lambda c, **kw: (
        original(c, **{**kw, "callbacks": kw["callbacks"] + callbacks}) if "callbacks" in kw else original(c, **kw)
    )
    try:
        train.main(cfg)
    finally:
        train.instantiate = original
    # Warm-up: the first steps (optimizer state, first EMA update) and the first two logging steps
    # (grad norm, first logged values). After it, steps 7..14 — logging steps 9 and 12 with their
    # grad-norm graph among them — compile nothing: no step reads the device or changes a shape.
    # (Step 15 also saves last.ckpt: moving the state to the CPU is a graph of its own.)
    after_warmup = [counter.counts[s] for s in range(7, 15)]
    assert after_warmup == [counter.counts[6]] * 8, counter.counts
    # Nothing is read from the device but the values of a logging step (every 3rd; Lightning reads
    # them after the counter has seen that step, so they show at the next): no host sync per step.
    for step in range(7, 15):
        assert (counter.reads[step] > counter.reads[step - 1]) == ((step - 1) % 3 == 0), counter.reads
    # the loss falls
    rows = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("train/loss")
    losses = [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]
    assert len(losses) == 5 and losses[-1] < 0.85 * losses[0], losses
    # the checkpoint written under XLA holds CPU tensors equal to the weights on the device
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    live = backbone_weights(ckpt, "live")
    assert all(t.device.type == "cpu" for t in live.values())
    assert live.keys() == counter.live.keys() and all(torch.equal(live[k], counter.live[k]) for k in live)


def test_guided_sampling_under_xla_matches_the_cpu(tmp_path):
    torch.manual_seed(0)
    model = DiT(input_size=8, in_channels=1, num_classes=10, depth=1, hidden_size=32, num_heads=2).eval()
    for p in model.parameters():  # away from the zero init, so the model's output matters
        p.data.normal_(0, 0.05)
    on_xla = DiT(input_size=8, in_channels=1, num_classes=10, depth=1, hidden_size=32, num_heads=2).eval()
    on_xla.load_state_dict(model.state_dict())
    device = DEVICE
    on_xla.to(device)
    y, z = torch.arange(4), torch.randn(4, 1, 8, 8)
    # Deterministic DDIM: the same numbers on both devices, within fp32 reordering.
    sampler = create_diffusion("ddim10")
    cpu = sampler.ddim_sample_loop(guided(model, 4.0), z.shape, z, model_kwargs=dict(y=y))
    out = sampler.ddim_sample_loop(guided(on_xla, 4.0), z.shape, z.to(device), model_kwargs=dict(y=y.to(device)))
    torch.testing.assert_close(out.cpu(), cpu, atol=1e-4, rtol=1e-4)
    # Ancestral DDPM with guidance: neither the graphs compiled nor the host reads (only the final
    # .cpu()) depend on the number of steps.
    compiled, reads = {}, {}
    for steps in (10, 20):
        before, read_before = count(), count("TransferFromDeviceTime")
        create_diffusion(str(steps)).p_sample_loop(
            guided(on_xla, 4.0), z.shape, z.to(device), model_kwargs=dict(y=y.to(device))
        ).cpu()
        compiled[steps], reads[steps] = count() - before, count("TransferFromDeviceTime") - read_before
    assert compiled[10] == compiled[20] <= 3 and reads[10] == reads[20] == 1, (compiled, reads)


def test_multirun_of_two_jobs_on_the_xla_preset(tmp_path, digits_dir):
    # One step and a 2-step sampler per job: each graph compiles once, in the first job (most of the
    # time is starting torch_xla and compiling); the second job, in the same process, reuses them.
    result = run_train(
        [
            "-m",
            "experiment=quickstart",
            f"data.path={digits_dir}",
            *SMALL,
            "trainer=xla_cpu",
            "logger=csv",
            "trainer.max_steps=1",
            "trainer.val_check_interval=1",
            "sampler.steps='2'",
            "data.samples_per_class=1",
            "~callbacks.digits_accuracy",
            "seed=0,1",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "samples" / "step_0000001.png").exists()  # a sample grid drawn under XLA
        ckpt = torch.load(
            tmp_path / "sweep" / job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
        )
        assert ckpt["global_step"] == 1 and ckpt["config"]["seed"] == int(job)  # each job its own config


def test_xla_flash_attention_falls_back_to_sdpa_off_a_tpu():
    torch.manual_seed(0)
    sdpa = DiT(input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=32, num_heads=2)
    flash = DiT(
        input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=32, num_heads=2, attention="xla_flash"
    )
    for p in sdpa.parameters():
        p.data.normal_(0, 0.05)
    flash.load_state_dict(sdpa.state_dict())  # the switch changes no weights
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([1, 2, 3])
    for device in ("cpu", DEVICE):  # the CPU, and XLA's CPU runtime (an XLA device, not a TPU)
        with pytest.warns(UserWarning, match="attention=xla_flash needs a TPU"):
            from dit.platform import xla_ops

            xla_ops.on_tpu.warned = False
            out = flash.to(device)(x.to(device), t.to(device), y.to(device)).cpu()
        torch.testing.assert_close(out, sdpa.to(device)(x.to(device), t.to(device), y.to(device)).cpu())
    with pytest.raises(ValueError, match="unknown attention 'flash'; choose sdpa or xla_flash"):
        DiT(attention="flash")


def test_pod_preset_puts_the_run_on_a_shared_folder_and_keeps_tpu_v3(tmp_path, capsys):
    for overrides, missing in (
        ([], "shared_dir=<a folder every host mounts>"),
        (["shared_dir=/mnt/shared"], "name=<run name>"),
    ):
        compose_cfg(["trainer=tpu_v3_pod", *overrides], tmp_path)
        # Hydra resolves the run folder before train.main: the one line, then exit 2 (no trace)
        with pytest.raises(SystemExit) as stop:
            _ = HydraConfig.get().run.dir
        assert stop.value.code == 2
        one_line_error(capsys.readouterr().err, f"trainer=tpu_v3_pod needs {missing}")
    shared = tmp_path / "shared"
    pod = compose_cfg(["trainer=tpu_v3_pod", f"shared_dir={shared}", "name=xl2"], tmp_path)
    assert HydraConfig.get().run.dir == str(shared / "outputs" / "xl2")
    assert HydraConfig.get().sweep.dir == str(shared / "multirun" / "xl2")
    assert pod.data.cache_dir == "/tmp/dit_chunks"  # each host's own disk, not the shared folder
    tpu = compose_cfg(["trainer=tpu_v3"], tmp_path)
    assert pod.trainer.accelerator == "tpu" and pod.callbacks.ema._target_ == "dit.platform.xla.XLAWeightAveraging"
    for key in ("trainer", "model", "module", "callbacks"):  # devices, plugins, attention, NaN guard, EMA
        assert pod[key] == tpu[key], key
    assert {k: v for k, v in pod.data.items() if k != "cache_dir"} == dict(tpu.data.items())


def test_the_run_pickles_for_the_xla_launchers_worker_processes(tmp_path, digits_dir, monkeypatch):
    """On a TPU host torch_xla starts one worker process per chip (a v3-8: 4, each running its chip's
    2 cores in threads) and sends it the trainer, module and data by pickling them: what the preset
    builds must pickle (torch's EMA function, a closure, did not). The CPU runtime cannot run those
    workers — collectives over several XLA:CPU devices hang (pytorch/xla#5005, #9089) — so this
    test stops at the hand-over, inside Lightning's own XLA launcher."""
    import torch_xla.distributed.xla_multiprocessing as xmp

    received = {}

    def spawn(fn, args, **kwargs):  # what a worker receives (while the launcher's result queue lives)
        received["task"] = pickle.loads(ForkingPickler.dumps((fn, args)))  # as concurrent.futures sends a task
        raise HandedOver

    monkeypatch.setattr(xmp, "spawn", spawn)
    cfg = compose_cfg(
        [
            "experiment=quickstart",
            f"data.path={digits_dir}",
            *QUICK,
            *SMALL,
            "trainer=xla_cpu",
            "trainer.devices=2",
            "~callbacks.digits_accuracy",
        ],
        tmp_path,
    )
    with pytest.raises(HandedOver):
        train.main(cfg)
    fn, (trainer, function, args, kwargs, queue) = received["task"]
    assert trainer.strategy.num_processes == 2 and fn.__self__.__class__.__name__ == "_XLALauncher"
    ema = next(c for c in trainer.callbacks if type(c).__name__ == "XLAWeightAveraging")
    assert ema._kwargs["multi_avg_fn"].decay == 0.995  # quickstart's decay came through


def test_flow_samplers_under_xla_compile_graphs_that_do_not_grow_with_the_steps():
    """Heun on a fixed grid reads each step's times from a rolled device tensor: the same numbers as
    the CPU, and as many compiled graphs for 8 steps as for 4, with or without a guidance interval;
    dopri5 is refused in one line."""
    from dit.diffusion import Dopri5, Guidance, Heun
    from dit.errors import UsageError

    torch.manual_seed(0)
    model = DiT(input_size=8, in_channels=1, num_classes=10, depth=1, hidden_size=32, num_heads=2).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    on_xla = DiT(input_size=8, in_channels=1, num_classes=10, depth=1, hidden_size=32, num_heads=2).eval()
    on_xla.load_state_dict(model.state_dict())
    on_xla.to(DEVICE)
    y, z = torch.arange(4), torch.randn(4, 1, 8, 8)
    flow = dict(path="linear", prediction="velocity")
    for interval in ((0.0, 1.0), (0.0, 0.5)):
        cpu = Heun(steps=4).sample(Guidance(model, 3.0, "all_channels", interval), z, flow, dict(y=y))
        compiled = {}
        for steps in (4, 8):
            before = count()
            guided_xla = Guidance(on_xla, 3.0, "all_channels", interval)
            out = Heun(steps=steps).sample(guided_xla, z.to(DEVICE), flow, dict(y=y.to(DEVICE))).cpu()
            compiled[steps] = count() - before
            if steps == 4:
                torch.testing.assert_close(out, cpu, atol=1e-4, rtol=1e-4)
        assert compiled[8] <= compiled[4] <= 6, (interval, compiled)
    with pytest.raises(UsageError, match="sampler=dopri5 .* on a TPU use sampler=euler or heun"):
        Dopri5().sample(on_xla, z.to(DEVICE), flow, dict(y=y.to(DEVICE)))
