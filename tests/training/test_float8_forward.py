"""module.float8=rowwise_forward|tensorwise_forward (dit.training.float8_forward): a float8 forward
matmul whose backward is the bf16 linear's, bit for bit, at the same point; fc2 taking the GELU
over; the conversion keeping the parameters; one-line refusals. The CPU runs tensorwise (torch's CPU
float8 matmul takes one scale a tensor); the GPU test runs rowwise and the Triton GELU kernel."""

import copy
import json

import pytest
import torch
from conftest import tiny_with_live_blocks
from torch import nn

from dit.errors import UsageError
from dit.tools.benchmark import main as benchmark
from dit.training.float8 import check_float8, check_float8_device, convert_blocks_to_float8
from dit.training.float8_forward import Float8ForwardLinear

CUDA = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def run(layer, x, grad, device_type):
    x = x.clone().requires_grad_()
    with torch.autocast(device_type, dtype=torch.bfloat16):
        out = layer(x)
    out.backward(grad)
    return out, x.grad, [p.grad for p in layer.parameters()]


def gradients_match(layer, reference, x, grad, device_type="cpu"):
    out, grad_x, grads = run(layer, x, grad, device_type)
    ref_out, ref_grad_x, ref_grads = run(reference, x, grad, device_type)
    assert out.dtype == ref_out.dtype == torch.bfloat16
    assert not torch.equal(out, ref_out)  # the float8 matmul ran
    assert (out.float() - ref_out.float()).norm() / ref_out.float().norm() < 0.1  # e4m3: ~2 significant digits
    # The backward is the bf16 linear's: the same input, weight and output gradient, the same bits.
    assert torch.equal(grad_x, ref_grad_x)
    for g, ref_g in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.float32 and torch.equal(g, ref_g)


def linear_and_copy(n_in, n_out, device="cpu"):
    torch.manual_seed(0)
    linear = nn.Linear(n_in, n_out, device=device)
    return linear, copy.deepcopy(linear)


def test_the_float8_forward_has_the_bf16_linears_gradients():
    linear, reference = linear_and_copy(64, 96)
    layer = Float8ForwardLinear(linear, "tensorwise")
    assert layer.weight is linear.weight and layer.bias is linear.bias
    x, grad = torch.randn(4, 8, 64), torch.randn(4, 8, 96, dtype=torch.bfloat16)
    gradients_match(layer, reference, x, grad)


def test_a_float8_fc2_takes_the_gelu_over_with_the_gelu_mlps_gradients():
    linear, reference = linear_and_copy(256, 64)
    layer = Float8ForwardLinear(linear, "tensorwise", gelu_input=True)
    # fc1's output under autocast is bf16, so the GELU runs in bf16 in the model and here
    h, grad = torch.randn(4, 8, 256, dtype=torch.bfloat16), torch.randn(4, 8, 64, dtype=torch.bfloat16)
    gradients_match(layer, nn.Sequential(nn.GELU(approximate="tanh"), reference), h, grad)


def test_conversion_keeps_the_parameters_and_trains_near_bf16():
    model = tiny_with_live_blocks()
    fp8 = copy.deepcopy(model)
    before = dict(fp8.named_parameters())
    converted = convert_blocks_to_float8(fp8, "tensorwise_forward", ["qkv", "proj", "fc1", "fc2"])
    assert converted == [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    block = fp8.blocks[0]
    assert all(type(m) is Float8ForwardLinear for m in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2))
    assert block.mlp.fc2.gelu_input and isinstance(block.mlp.act, nn.Identity) and not block.mlp.fc1.gelu_input
    assert type(block.adaLN_modulation[1]) is nn.Linear and type(fp8.final_layer.linear) is nn.Linear
    # the same Parameter objects in the same order, the same state-dict keys: optimizer, EMA, checkpoints
    assert list(before) == [n for n, _ in fp8.named_parameters()]
    assert all(before[n] is p for n, p in fp8.named_parameters())
    assert list(fp8.state_dict()) == list(model.state_dict())

    x, t, y = torch.randn(8, 4, 8, 8), torch.randint(0, 1000, (8,)), torch.randint(0, 10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out8 = model(x, t, y).float(), fp8(x, t, y).float()
    assert not torch.equal(out, out8) and (out8 - out).norm() / out.norm() < 0.1
    out.square().mean().backward()
    out8.square().mean().backward()
    for name in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.bias"):
        g, g8 = model.get_parameter(name).grad, fp8.get_parameter(name).grad
        assert (g8 - g).norm() / g.norm() < 0.2, name


def test_the_benchmark_runs_a_float8_forward_step_on_the_cpu(tmp_path):
    out = tmp_path / "r.json"
    args = "--model DiT-S/8 --image-size 64 --batch-size 2 --steps 1 --warmup 1 --float8 tensorwise_forward"
    benchmark([*args.split(), "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["float8"] == "tensorwise_forward" and r["train_images_per_sec"] > 0


def test_the_forward_recipes_need_no_torchao_and_refuse_in_one_line(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torchao", None)  # import torchao fails
    check_float8("rowwise_forward", ["qkv"])
    check_float8("tensorwise_forward", ["fc2"])
    with pytest.raises(UsageError, match="needs torchao"):
        check_float8("rowwise", ["qkv"])
    with pytest.raises(UsageError, match="module.float8=rowwise_forward runs on CUDA GPUs .tensorwise also on the CPU"):
        check_float8_device("rowwise_forward", torch.device("cpu"))
    check_float8_device("tensorwise_forward", torch.device("cpu"))


@pytest.mark.skipif(
    not CUDA, reason="float8 rowwise matmuls and the Triton GELU kernel need a CUDA GPU of compute capability 8.9+"
)
def test_rowwise_on_the_gpu_has_the_bf16_gradients_with_the_gelu_kernel():
    linear, reference = linear_and_copy(1152, 4608, "cuda")
    x, grad = torch.randn(4, 256, 1152, device="cuda"), torch.randn(4, 256, 4608, device="cuda", dtype=torch.bfloat16)
    gradients_match(Float8ForwardLinear(linear, "rowwise"), reference, x, grad, "cuda")
    linear, reference = linear_and_copy(4608, 1152, "cuda")
    grad = torch.randn(4, 256, 1152, device="cuda", dtype=torch.bfloat16)
    layer = Float8ForwardLinear(linear, "rowwise", gelu_input=True)
    gradients_match(
        layer, nn.Sequential(nn.GELU(approximate="tanh"), reference), x.repeat(1, 1, 4).bfloat16(), grad, "cuda"
    )


def test_layers_that_would_stay_bf16_are_refused(tmp_path, digits_dir, capsys):
    """SwiGLU's MLP linears are w12 and w3: the default fc1, fc2 would convert nothing, without a
    word; so would a width float8 matmuls cannot take. Refused, naming the linears there are."""
    import train
    from conftest import one_line_error, quick_cfg

    swiglu = tiny_with_live_blocks(mlp="swiglu", hidden_size=96)  # SwiGLU width 256: divisible by 16
    with pytest.raises(UsageError, match=r"names fc1, fc2, .*\(their linears: qkv, proj, w12, w3\)"):
        convert_blocks_to_float8(swiglu, "tensorwise_forward", ["qkv", "proj", "fc1", "fc2"])
    converted = convert_blocks_to_float8(swiglu, "tensorwise_forward", ["w12", "w3"])
    assert converted == [f"blocks.{i}.mlp.{n}" for i in range(2) for n in ("w12", "w3")]
    with pytest.raises(SystemExit) as refused:  # through train.py: one line, before any step
        train.main(
            quick_cfg(tmp_path, digits_dir, "model.mlp=swiglu", "module.float8=tensorwise_forward", "logger=none")
        )
    assert refused.value.code == 2
    one_line_error(
        capsys.readouterr().err, "module.float8_layers names fc1, fc2, which this model's blocks do not have"
    )
    assert not list(tmp_path.rglob("*.ckpt"))
