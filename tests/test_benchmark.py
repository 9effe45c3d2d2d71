"""The benchmark command (dit.benchmark) on the CPU, and the pieces of the fast step that a CPU
can check: activation checkpointing changes nothing but memory, compile choices are validated."""

import json
import os
import time
from pathlib import Path

import pytest
import torch

from dit.diffusion import create_diffusion
from dit.models import DiT
from dit.models.flops import count_gflops
from dit.tools.benchmark import main, model_kwargs


def test_benchmark_command_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["--model", "DiT-S/8", "--image-size", "64", "--batch-size", "4", "--steps", "2", "--warmup", "1",
          "--time-sampler", "sampler.steps=3", "--sample-batch-size", "2", "--json", str(out)])  # fmt: skip
    r = json.loads(out.read_text())
    with torch.device("meta"):
        paper_gflops = count_gflops(DiT(**model_kwargs("DiT-S/8", 64)))
    # 2 FLOPs per multiply-add; a training step is forward + backward = 3 forwards
    assert r["forward_gflop_per_image"] == pytest.approx(2 * paper_gflops)
    assert r["train_gflop_per_image"] == pytest.approx(3 * r["forward_gflop_per_image"])
    assert r["device"] == "cpu" and r["precision"] == "32-true" and r["matmul_dtype"] == "float32"
    assert r["matmul_tflops"] > 0 and r["train_images_per_sec"] > 0 and r["train_step_ms"] > 0
    # images/s and step time describe the same timed steps
    assert r["train_images_per_sec"] == pytest.approx(4 / (r["train_step_ms"] / 1e3))
    assert 0 < r["train_mfu"] < 1 and r["train_mfu"] == pytest.approx(r["train_tflops_per_device"] / r["matmul_tflops"])
    # 3 DDPM steps, each one batched forward over the conditional and unconditional halves
    assert r["sampler_forwards_per_image"] == 6 and 0 < r["sampler_mfu"] < 1
    printed = capsys.readouterr().out
    assert "% of the matmul rate" in printed and "sampler, batch 2" in printed


def test_xl2_flops_per_image():
    """The figure MFU rests on: DiT-XL/2 at 256px is 118.6 Gflops in the paper's convention (MACs),
    so 237 GFLOP forward and 712 GFLOP per trained image (3 × forward: backward costs 2×)."""
    with torch.device("meta"):
        forward = 2 * count_gflops(DiT(**model_kwargs("DiT-XL/2", 256)))
    assert forward == pytest.approx(237.3, abs=0.2) and 3 * forward == pytest.approx(712, abs=1)


def test_activation_checkpointing_changes_only_memory(monkeypatch):
    torch.manual_seed(0)
    kwargs = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4, num_classes=10,
                  class_dropout_prob=0.0)  # fmt: skip
    plain, checkpointed = DiT(**kwargs), DiT(**kwargs, activation_checkpointing=True)
    for p in plain.parameters():
        p.data.normal_(0, 0.05)  # not the zero init, so every block matters
    checkpointed.load_state_dict(plain.state_dict())
    diffusion = create_diffusion("")
    x, t, y, noise = (
        torch.randn(4, 4, 8, 8),
        torch.tensor([0, 10, 500, 999]),
        torch.tensor([1, 2, 3, 4]),
        torch.randn(4, 4, 8, 8),
    )
    losses, calls = [], []
    real_checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k)
    )
    for model in (plain, checkpointed):
        loss = diffusion.training_losses(model.train(), x, t, dict(y=y), noise=noise)["loss"].mean()
        loss.backward()
        losses.append(loss)
    assert len(calls) == 3  # the checkpointed model's 3 blocks, none of the plain one's
    assert torch.equal(losses[0], losses[1])
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9, msg=name)


def test_unknown_compile_choice_is_refused(tmp_path, digits_dir, capsys):
    import train
    from conftest import one_line_error
    from test_training import quick_cfg

    cfg = quick_cfg(tmp_path, digits_dir, "module.compile=fast", "trainer.max_steps=1", "~callbacks.digits_accuracy")
    with pytest.raises(SystemExit):
        train.main(cfg)
    one_line_error(capsys.readouterr().err, "module.compile='fast'; use one of", "reduce-overhead")


def test_benchmark_under_ddp_on_one_device(tmp_path):
    """--ddp: the step wrapped in DDP with no second device (what DDP costs besides communication)."""
    out, environ = tmp_path / "bench.json", dict(os.environ)
    try:
        main(["--model", "DiT-S/8", "--image-size", "64", "--batch-size", "2", "--steps", "1", "--warmup", "1",
              "--ddp", "--json", str(out)])  # fmt: skip
        assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1  # DDP ran
    finally:  # Lightning leaves its process group and its variables behind: later tests start clean
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    r = json.loads(out.read_text())
    assert r["ddp"] and r["devices"] == 1 and r["train_images_per_sec"] > 0


@pytest.fixture
def benchmark_scripts(monkeypatch):
    """The scripts of benchmarks/ importable by name (they are not part of the package)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))


def test_kernel_summary_of_a_trace(benchmark_scripts):
    """benchmarks/kernel_summary.py on a hand-made trace of one step: a matmul, an all-reduce half
    hidden behind it, the optimizer, a host sync, then an idle GPU until an inductor kernel."""
    from kernel_summary import summarize

    def event(name, start, length, cat="kernel"):
        return dict(ph="X", cat=cat, name=name, ts=start * 1000, dur=length * 1000)

    trace = {"traceEvents": [
        event("nvjet_sm90_tst_192x192_64x3", 0, 10), event("ncclDevKernel_AllReduce_Sum_f32", 5, 10),
        event("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 15, 5), event("triton_poi_fused_gelu_0", 30, 1),
        event("triton_poi_fused__scaled_dot_product_cudnn_attention_3", 31, 0, "kernel"),
        event("aten::_local_scalar_dense", 20, 6, "cpu_op"), event("aten::mul", 26, 1, "cpu_op"),
        event("cudaStreamSynchronize", 20.5, 5, "cuda_runtime"), event("ProfilerStep", 0, 31, "user_annotation"),
    ]}  # fmt: skip
    s = summarize(trace, steps=1)
    assert s["window_ms"] == pytest.approx(31) and s["busy_ms"] == pytest.approx(21)
    assert s["compute_busy_ms"] == pytest.approx(16)
    assert s["kinds_ms"] == pytest.approx({"matmul": 10, "nccl": 10, "optimizer": 5, "inductor fused": 1})
    assert s["nccl_ms"] == pytest.approx(10) and s["nccl_alongside_compute_ms"] == pytest.approx(5)
    assert s["host_waits_ms"] == pytest.approx({"aten::_local_scalar_dense": 6, "cudaStreamSynchronize": 5})
    gap, ops = s["idle_gaps"][0]
    assert gap == pytest.approx(10) and [name for name, _ in ops] == [
        "aten::_local_scalar_dense",
        "cudaStreamSynchronize",
        "aten::mul",
    ]
    assert summarize({"traceEvents": [event("aten::mul", 0, 1, "cpu_op")]}) is None  # a CPU run: no kernels


FAKE_RUNNER = """
import json, os, subprocess, sys, time
args = sys.argv[1:]
devices, out = int(args[args.index("--devices") + 1]), args[args.index("--json") + 1]
assert args[:2] == ["--batch-size", "32"], args  # what came after `--`
if devices == 4:  # hangs, with a child of its own, as a DDP launch with ranks would
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    open(os.environ["CHILD_PID_FILE"], "w").write(str(child.pid))
    time.sleep(60)
rate = {1: 100.0, 2: 180.0, 3: 240.0}[devices]
json.dump({"train_images_per_sec": rate}, open(out, "w"))
"""


def test_scaling_command_runs_each_count_and_kills_a_hung_run(benchmark_scripts, tmp_path, monkeypatch, capsys):
    """benchmarks/scaling.py: one run per device count, the one-device run first, each rate against
    N × the one-device rate; a run past --timeout is killed with its children and left out."""
    from scaling import main as scaling

    runner = tmp_path / "runner.py"
    runner.write_text(FAKE_RUNNER)
    monkeypatch.setenv("CHILD_PID_FILE", str(tmp_path / "child.pid"))
    results = scaling(
        ["--devices", "2", "4", "3", "--timeout", "5", "--runner", str(runner), "--", "--batch-size", "32"]
    )
    assert [(d, r and r["train_images_per_sec"]) for (d, _), r in results.items()] == [
        (1, 100.0),
        (2, 180.0),
        (4, None),
        (3, 240.0),
    ]
    out = capsys.readouterr().out
    assert "devices=4: killed after 5.0 s" in out
    rows = out[out.index("devices | batch/device") :].splitlines()[1:]
    assert rows == ["      1 |            — |    100.0 |      100.0 | —", "      2 |            — |    180.0 |       90.0 | 90.0%",
                    "      3 |            — |    240.0 |       80.0 | 80.0%"]  # fmt: skip
    child = int((tmp_path / "child.pid").read_text())
    for _ in range(50):  # the hung run's child went with it (gone, or a zombie where nothing reaps orphans)
        stat = Path(f"/proc/{child}/stat")
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the hung run's child {child} is still running")


GLOBAL_BATCH_RUNNER = """
import json, os, sys
args = sys.argv[1:]
devices, batch = int(args[args.index("--devices") + 1]), int(args[args.index("--batch-size") + 1])
open(os.environ["RUNS_FILE"], "a").write(f"{devices} {batch}\\n")
rate = 2.0 * batch * (1 if devices == 1 else 0.9 * devices if batch == 128 else 0.85 * devices)
json.dump({"train_images_per_sec": rate, "batch_size": batch}, open(args[args.index("--json") + 1], "w"))
"""


def test_scaling_command_at_a_global_batch(benchmark_scripts, tmp_path, monkeypatch, capsys):
    """--global-batch-size 256 over 2 and 4 devices: 128 and 64 a device, each count divided by a
    one-device run at its own batch, which runs first."""
    from scaling import main as scaling

    runner = tmp_path / "runner.py"
    runner.write_text(GLOBAL_BATCH_RUNNER)
    monkeypatch.setenv("RUNS_FILE", str(tmp_path / "runs"))
    results = scaling(
        ["--global-batch-size", "256", "--devices", "2", "4", "--runner", str(runner), "--", "--steps", "3"]
    )
    assert (tmp_path / "runs").read_text().split("\n")[:-1] == ["1 128", "2 128", "1 64", "4 64"]
    assert list(results) == [(1, 128), (2, 128), (1, 64), (4, 64)]
    out = capsys.readouterr().out
    rows = out[out.index("devices | batch/device") :].splitlines()[1:]
    assert rows == ["      1 |          128 |    256.0 |      256.0 | —", "      2 |          128 |    460.8 |      230.4 | 90.0%",
                    "      1 |           64 |    128.0 |      128.0 | —", "      4 |           64 |    435.2 |      108.8 | 85.0%"]  # fmt: skip


def test_scaling_plan_runs_each_one_device_baseline_once_before_its_counts(benchmark_scripts):
    from scaling import plan

    assert plan([4, 2, 3]) == [(1, None), (4, None), (2, None), (3, None)]
    assert plan([1, 2, 2]) == [(1, None), (2, None)]
    assert plan([4, 2, 1], 256) == [(1, 64), (4, 64), (1, 128), (2, 128), (1, 256)]


@pytest.mark.parametrize("argv, message", [
    (["--devices", "2", "--", "--devices", "2"], "give --devices before"),
    (["--global-batch-size", "256", "--devices", "2", "--", "--batch-size", "32"], "not both"),
    (["--devices", "2", "--", "--json=x.json"], "no --json after it"),
    (["--global-batch-size", "256", "--devices", "2", "--", "--batch-size=32"], "not both"),
    (["--global-batch-size", "256", "--devices", "2", "--", "--batch", "32"], "not both"),  # argparse expands it
    (["--global-batch-size", "256", "--devices", "3"], "a multiple of each count"),
])  # fmt: skip
def test_scaling_command_refuses_conflicting_batches_and_devices(benchmark_scripts, argv, message):
    from scaling import main as scaling

    with pytest.raises(SystemExit, match=message):
        scaling(argv)


@pytest.mark.parametrize(
    "argv", [["--devices", "0"], ["--devices", "2", "-2"], ["--global-batch-size", "0", "--devices", "2"]]
)
def test_scaling_command_refuses_counts_below_one(benchmark_scripts, argv, capsys):
    from scaling import main as scaling

    with pytest.raises(SystemExit):
        scaling(argv)
    assert "is not a positive count" in capsys.readouterr().err


@pytest.mark.slow
def test_scaling_command_with_the_real_benchmark_on_cpu(benchmark_scripts, capsys):
    """The same through `python -m dit.benchmark`, at a global batch of 4: 2 a device, DDP over 2
    CPU processes (gloo); ~1 minute."""
    from scaling import main as scaling

    results = scaling(["--global-batch-size", "4", "--devices", "2", "--timeout", "400", "--",
                       "--model", "DiT-S/8", "--image-size", "64", "--steps", "2", "--warmup", "1"])  # fmt: skip
    one, two = results[1, 2], results[2, 2]
    assert (one["devices"], one["batch_size"], two["devices"], two["batch_size"], two["ddp"]) == (1, 2, 2, 2, True)
    assert "of linear" in capsys.readouterr().out
