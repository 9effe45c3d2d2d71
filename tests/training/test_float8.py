"""module.float8 (dit.training.float8): torchao's Float8Linear in the chosen layers of the blocks,
the same parameters under the same names, a forward and backward that run (tensorwise, which
torch's CPU float8 matmul supports) and stay near the full-precision ones, and one-line refusals."""

import copy
import json

import pytest
import torch
from conftest import tiny_with_live_blocks

from dit.errors import UsageError
from dit.tools.benchmark import main as benchmark
from dit.training.float8 import check_float8, check_float8_device, convert_blocks_to_float8

pytest.importorskip("torchao.float8")


def test_conversion_keeps_the_parameters_and_converts_only_the_chosen_layers():
    from torchao.float8.float8_linear import Float8Linear

    model = tiny_with_live_blocks()
    before = {name: p for name, p in model.named_parameters()}
    converted = convert_blocks_to_float8(model, "tensorwise", ["qkv", "fc1"])
    assert converted == [f"blocks.{i}.{layer}" for i in range(2) for layer in ("attn.qkv", "mlp.fc1")]
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["blocks.0.attn.qkv"] is Float8Linear and kinds["blocks.1.mlp.fc1"] is Float8Linear
    assert kinds["blocks.0.attn.proj"] is torch.nn.Linear and kinds["blocks.0.mlp.fc2"] is torch.nn.Linear
    assert kinds["blocks.0.adaLN_modulation.1"] is torch.nn.Linear and kinds["final_layer.linear"] is torch.nn.Linear
    # the same Parameter objects, in the same order: the optimizer, the EMA and checkpoints see no change
    assert list(before) == [name for name, _ in model.named_parameters()]
    assert all(before[name] is p for name, p in model.named_parameters())


def test_float8_forward_and_backward_stay_near_full_precision():
    model = tiny_with_live_blocks()
    fp8 = copy.deepcopy(model)
    convert_blocks_to_float8(fp8, "tensorwise", ["qkv", "proj", "fc1", "fc2"])
    x, t, y = torch.randn(8, 4, 8, 8), torch.randint(0, 1000, (8,)), torch.randint(0, 10, (8,))
    out, out8 = model(x, t, y), fp8(x, t, y)
    assert not torch.equal(out, out8)  # the float8 matmuls ran
    assert (out8 - out).norm() / out.norm() < 0.1  # e4m3 keeps ~2 significant digits
    out.square().mean().backward()
    out8.square().mean().backward()
    g, g8 = model.blocks[0].attn.qkv.weight.grad, fp8.blocks[0].attn.qkv.weight.grad
    assert g8 is not None and (g8 - g).norm() / g.norm() < 0.2


def test_the_benchmark_runs_a_float8_step_on_the_cpu(tmp_path):
    out = tmp_path / "r.json"
    args = "--model DiT-S/8 --image-size 64 --batch-size 2 --steps 1 --warmup 1 --float8 tensorwise --float8-layers fc1"
    benchmark([*args.split(), "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["float8"] == "tensorwise" and r["float8_layers"] == ["fc1"] and r["train_images_per_sec"] > 0


def test_bad_float8_settings_are_one_line():
    with pytest.raises(UsageError, match=r"module.float8='fp8'; use null or one of tensorwise"):
        check_float8("fp8", ["qkv"])
    with pytest.raises(UsageError, match=r"module.float8_layers=\['qkv', 'mlp'\]; list one or more of qkv"):
        check_float8("tensorwise", ["qkv", "mlp"])
    with pytest.raises(UsageError, match="module.float8_layers=\\[\\]"):
        check_float8("tensorwise", [])
    with pytest.raises(UsageError, match="module.float8=rowwise runs on CUDA GPUs"):
        check_float8_device("rowwise", torch.device("cpu"))
    check_float8("tensorwise", "qkv")  # one layer given as a plain value (module.float8_layers=qkv)
    check_float8_device("tensorwise", torch.device("cpu"))  # the CPU's float8 matmul takes one scale a tensor
