"""The scripts of benchmarks/: the kernel summary of a profile, the DDP scaling command, the loss
curves and the digits score of sample files."""

import time
from pathlib import Path

import pytest
from conftest import ROOT


@pytest.fixture
def benchmark_scripts(monkeypatch):
    """The scripts of benchmarks/ importable by name (they are not part of the package)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))


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


GLOBAL_BATCH_RUNNER = """
import json, os, sys
args = sys.argv[1:]
devices, batch = int(args[args.index("--devices") + 1]), int(args[args.index("--batch-size") + 1])
open(os.environ["RUNS_FILE"], "a").write(f"{devices} {batch}\\n")
rate = 2.0 * batch * (1 if devices == 1 else 0.9 * devices if batch == 128 else 0.85 * devices)
json.dump({"train_images_per_sec": rate, "batch_size": batch}, open(args[args.index("--json") + 1], "w"))
"""


def test_kernel_summary_of_a_trace(benchmark_scripts):
    """benchmarks/kernel_summary.py on a hand-made trace of one step: a matmul, an all-reduce half
    hidden behind it, the optimizer, a host sync, then an idle GPU until an inductor kernel."""
    from kernel_summary import summarize

    def event(name, start, length, cat="kernel"):
        return dict(ph="X", cat=cat, name=name, ts=start * 1000, dur=length * 1000)

    trace = {
        "traceEvents": [
            event("nvjet_sm90_tst_192x192_64x3", 0, 10),
            event("ncclDevKernel_AllReduce_Sum_f32", 5, 10),
            event("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 15, 5),
            event("triton_poi_fused_gelu_0", 30, 1),
            event("triton_poi_fused__scaled_dot_product_cudnn_attention_3", 31, 0, "kernel"),
            event("aten::_local_scalar_dense", 20, 6, "cpu_op"),
            event("aten::mul", 26, 1, "cpu_op"),
            event("cudaStreamSynchronize", 20.5, 5, "cuda_runtime"),
            event("ProfilerStep", 0, 31, "user_annotation"),
        ]
    }
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
    assert rows == [
        "      1 |            — |    100.0 |      100.0 | —",
        "      2 |            — |    180.0 |       90.0 | 90.0%",
        "      3 |            — |    240.0 |       80.0 | 80.0%",
    ]
    child = int((tmp_path / "child.pid").read_text())
    for _ in range(50):  # the hung run's child went with it (gone, or a zombie where nothing reaps orphans)
        stat = Path(f"/proc/{child}/stat")
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the hung run's child {child} is still running")


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
    assert rows == [
        "      1 |          128 |    256.0 |      256.0 | —",
        "      2 |          128 |    460.8 |      230.4 | 90.0%",
        "      1 |           64 |    128.0 |      128.0 | —",
        "      4 |           64 |    435.2 |      108.8 | 85.0%",
    ]


def test_scaling_plan_runs_each_one_device_baseline_once_before_its_counts(benchmark_scripts):
    from scaling import plan

    assert plan([4, 2, 3]) == [(1, None), (4, None), (2, None), (3, None)]
    assert plan([1, 2, 2]) == [(1, None), (2, None)]
    assert plan([4, 2, 1], 256) == [(1, 64), (4, 64), (1, 128), (2, 128), (1, 256)]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--devices", "2", "--", "--devices", "2"], "give --devices before"),
        (["--global-batch-size", "256", "--devices", "2", "--", "--batch-size", "32"], "not both"),
        (["--devices", "2", "--", "--json=x.json"], "no --json after it"),
        (["--global-batch-size", "256", "--devices", "2", "--", "--batch-size=32"], "not both"),
        (["--global-batch-size", "256", "--devices", "2", "--", "--batch", "32"], "not both"),  # argparse expands it
        (["--global-batch-size", "256", "--devices", "3"], "a multiple of each count"),
    ],
)
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

    results = scaling(
        [
            "--global-batch-size",
            "4",
            "--devices",
            "2",
            "--timeout",
            "400",
            "--",
            "--model",
            "DiT-S/8",
            "--image-size",
            "64",
            "--steps",
            "2",
            "--warmup",
            "1",
        ]
    )
    one, two = results[1, 2], results[2, 2]
    assert (one["devices"], one["batch_size"], two["devices"], two["batch_size"], two["ddp"]) == (1, 2, 2, 2, True)
    assert "of linear" in capsys.readouterr().out


def test_loss_curves_compares_windowed_means(benchmark_scripts, tmp_path, capsys):
    """Means over windows of steps, and each run's largest gap to the first, worked by hand."""
    import loss_curves

    def metrics(name, losses):
        path = tmp_path / name / "csv" / "version_0" / "metrics.csv"
        path.parent.mkdir(parents=True)
        rows = [f"{step},{loss},\n" for step, loss in losses] + ["4,,512.0\n"]  # another metric's row
        path.write_text("step,train/loss,train/images_per_sec\n" + "".join(rows))
        return str(path)

    a = metrics("a", [(0, 1.0), (1, 3.0), (2, 2.0), (3, 2.0)])  # windows of 2: means 2.0, 2.0
    b = metrics("b", [(0, 1.5), (1, 2.5), (2, 1.0), (3, 2.0)])  # 2.0, 1.5: largest gap 0.5
    assert loss_curves.windowed_means(a, "train/loss", 2) == {0: 2.0, 2: 2.0}
    loss_curves.main([a, b, "--window", "2"])
    printed = capsys.readouterr().out
    assert "largest gap of b to a: 0.50000" in printed and "2-3" in printed


def test_digits_quality_scores_a_sample_npz(benchmark_scripts, tmp_path, capsys):
    """--npz reads dit.sample's uint8 images as sample i of digit i mod 10: real digits in that order
    score ~100%, the same images one label off score ~0%."""
    import digits_quality
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    from dit.data.vae import to_uint8

    digits = load_digits()
    order = np.concatenate([np.flatnonzero(digits.target == d)[:20] for d in range(10)])
    order = order.reshape(10, 20).T.reshape(-1)  # digit i mod 10 at position i, as --classes 0,...,9 draws
    images = torch.from_numpy(digits.images[order].astype(np.float32) / 8 - 1)[:, None]
    arr = to_uint8(images).expand(-1, -1, -1, 3).numpy()
    np.savez(tmp_path / "real.npz", arr_0=arr)
    np.savez(tmp_path / "shifted.npz", arr_0=np.roll(arr, 1, axis=0))
    digits_quality.score_npz([tmp_path / "real.npz", tmp_path / "shifted.npz"])
    real, shifted = capsys.readouterr().out.splitlines()
    accuracy = [float(line.split("digit accuracy ")[1].split("%")[0]) for line in (real, shifted)]
    assert accuracy[0] >= 98 and accuracy[1] <= 5, (real, shifted)
    # a dit.sample .npz whose manifest says its labels were random, or other classes, is not scored
    import json

    from dit.errors import UsageError

    for classes in ([], [3, 4]):
        manifest = np.array(json.dumps(dict(identity=dict(classes=classes))))
        np.savez(tmp_path / "other.npz", arr_0=arr, manifest=manifest)
        with pytest.raises(UsageError, match="not --classes 0,1,...,9: its labels are unknown here"):
            digits_quality.score_npz([tmp_path / "other.npz"])
    ten = np.array(json.dumps(dict(identity=dict(classes=list(range(10))))))
    np.savez(tmp_path / "ten.npz", arr_0=arr, manifest=ten)
    digits_quality.score_npz([tmp_path / "ten.npz"])
    assert "digit accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["attention_gpu", "float8_gpu", "float8_sampler_gpu", "fsdp_gpu", "modern_recipe"])
def test_a_gpu_script_refuses_a_folder_of_earlier_figures(tmp_path, script):
    """Before its first step: a rerun into the same OUT would write over the figures file by file."""
    import subprocess

    earlier = tmp_path / "official.json"
    earlier.write_text('{"images_per_sec": 414.3}')
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / f"{script}.sh"), str(tmp_path)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.strip()
        == f"error: {tmp_path} holds files (an earlier run's figures?): give a new or empty folder"
    )
    assert earlier.read_text() == '{"images_per_sec": 414.3}' and list(tmp_path.iterdir()) == [earlier]
