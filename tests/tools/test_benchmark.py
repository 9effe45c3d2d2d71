"""The benchmark command (dit.tools.benchmark) on the CPU, and what a CPU can check of the fast
step: activation checkpointing changes nothing but memory."""

import json
import os
import re

import pytest
import torch

from dit.diffusion import create_diffusion
from dit.models import DiT
from dit.models.flops import count_gflops
from dit.tools.benchmark import main, model_kwargs


def test_benchmark_command_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = "--model DiT-S/8 --image-size 64 --batch-size 4 --steps 2 --warmup 1 --time-sampler sampler.steps=3"
    main([*args.split(), "--sample-batch-size", "2", "--json", str(out)])
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
    assert "% of the sustained matmul rate" in printed and "sampler, batch 2" in printed
    # the burst rate: its own figure, and the share against it follows from it
    assert r["matmul_burst_tflops"] > 0 and r["train_mfu_burst"] == pytest.approx(
        r["train_tflops_per_device"] / r["matmul_burst_tflops"]
    )


@pytest.mark.parametrize("objective", ["flow", "repa"])
def test_benchmark_of_the_modern_objectives(objective, tmp_path):
    """The flow step, REPA's fed random features, and the flow sampler with a guidance interval:
    Heun's 2 steps are 4 evaluations, the 2 of the step that starts at t = 0.5 guided."""
    out = tmp_path / "bench.json"
    args = f"--model DiT-S/8 --image-size 64 --batch-size 2 --steps 1 --warmup 1 --objective {objective}"
    args += " --time-sampler --sample-batch-size 2 --guidance-interval 0 0.5 sampler=heun sampler.steps=2"
    main([*args.split(), "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["objective"] == objective and r["train_images_per_sec"] > 0
    assert r["sampler_nfe"] == 4 and r["sampler_forwards_per_image"] == 4 + 2


def test_the_sampler_with_float8_matmuls(tmp_path):
    """--sampler-float8 tensorwise (the CPU's float8 matmul) times the sampler with the four
    linears of each of DiT-S's 12 blocks in float8."""
    out = tmp_path / "bench.json"
    args = "--model DiT-S/8 --image-size 64 --no-train --time-sampler --sample-batch-size 2 sampler.steps=2"
    main([*args.split(), "--sampler-float8", "tensorwise", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["sampler_float8"] == "tensorwise" and r["sampler_float8_layers"] == 4 * 12
    assert r["sampler_images_per_sec"] > 0


def test_xl2_flops_per_image():
    """The figure MFU rests on: DiT-XL/2 at 256px is 118.6 Gflops in the paper's convention (MACs),
    so 237 GFLOP forward and 712 GFLOP per trained image (3 × forward: backward costs 2×)."""
    with torch.device("meta"):
        forward = 2 * count_gflops(DiT(**model_kwargs("DiT-XL/2", 256)))
    assert forward == pytest.approx(237.3, abs=0.2) and 3 * forward == pytest.approx(712, abs=1)


def test_activation_checkpointing_changes_only_memory(monkeypatch):
    torch.manual_seed(0)
    kwargs = dict(
        input_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=64,
        depth=3,
        num_heads=4,
        num_classes=10,
        class_dropout_prob=0.0,
    )
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


def test_benchmark_under_ddp_on_one_device(tmp_path):
    """--ddp: the step wrapped in DDP with no second device (what DDP costs besides communication)."""
    out, environ = tmp_path / "bench.json", dict(os.environ)
    try:
        main([*"--model DiT-S/8 --image-size 64 --batch-size 2 --steps 1 --warmup 1 --ddp".split(), "--json", str(out)])
        assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1  # DDP ran
    finally:  # Lightning leaves its process group and its variables behind: later tests start clean
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    r = json.loads(out.read_text())
    assert r["ddp"] and r["devices"] == 1 and r["train_images_per_sec"] > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "DiT-Q/3"], "--model 'DiT-Q/3': choose one of DiT-S/2"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--batch-size", "-2"], "--batch-size must be at least 0, got -2"),
        (["--guidance-scale", "nan"], "--guidance-scale must be a number of at least 0 (1: no guidance), got nan"),
        (["--json", "no/such/folder/x.json"], "the folder no/such/folder does not exist"),
        (["--json", __file__], "exists (an earlier run's figures?): give a new path, or delete it"),
        (
            ["--sampler-float8", "tensorwise"],
            "--sampler-float8 is a setting of the sampler's timing: add --time-sampler",
        ),
    ],
)
def test_bad_arguments_are_one_line_before_anything_runs(argv, message):
    from dit.errors import UsageError
    from dit.tools.benchmark import parse_args

    with pytest.raises(UsageError, match=re.escape(message)):
        parse_args(argv)
