"""The sampler's float8 option (dit.models.float8_sampling): e4m3 quantisation, the float8 linear
against its fp32 original, the GELU's sigmoid form, a whole DiT, and the devices it refuses. The
CPU runs torch's float8 matmul with one scale a tensor; rowwise is measured on GPUs
(benchmarks/float8_sampler_gpu.sh)."""

import copy

import pytest
import torch
from torch import nn

from dit.errors import UsageError
from dit.models import DiT
from dit.models.float8_sampling import (
    Float8SamplingLinear,
    SigmoidGELU,
    check_float8_sampling,
    quantize,
    quantize_for_sampling,
)


@pytest.mark.parametrize("granularity", ["rowwise", "tensorwise"])
def test_quantize_maps_each_amax_to_448_and_rounds_to_e4m3(granularity):
    """The scale is amax / 448 over a row (or the tensor); dequantised values are within e4m3's
    rounding (3 mantissa bits: half a step, 1/16 relative) of the input; zero rows stay zero."""
    torch.manual_seed(0)
    x = torch.randn(6, 64) * torch.tensor([1.0, 10.0, 0.01, 3.0, 100.0, 0.0]).unsqueeze(1)
    q, scale = quantize(x, granularity)
    assert q.dtype == torch.float8_e4m3fn
    expected_amax = x.abs().amax(dim=1, keepdim=True) if granularity == "rowwise" else x.abs().max()
    assert scale.shape == expected_amax.shape
    nonzero = expected_amax > 0
    assert torch.allclose((scale * 448)[nonzero.expand_as(scale)], expected_amax[nonzero])
    back = q.float() * scale
    assert torch.all(back[5] == 0) and not back.isnan().any()
    normal = x.abs() >= 2**-6 * scale  # e4m3's normal range; below it the step is absolute
    assert ((back - x).abs() <= x.abs() / 16 + 1e-12)[normal].all()
    assert (back - x).abs().max() > 0  # it did round


def test_the_sigmoid_form_is_the_tanh_gelu():
    x = torch.linspace(-12, 12, 10001, dtype=torch.float64)
    assert torch.allclose(SigmoidGELU()(x), nn.functional.gelu(x, approximate="tanh"), atol=1e-12, rtol=0)


def test_a_float8_linear_computes_its_linear_within_float8_error():
    torch.manual_seed(0)
    linear = nn.Linear(128, 256)
    x = torch.randn(3, 10, 128)
    f8 = Float8SamplingLinear(linear, "tensorwise")
    assert f8.weight.dtype == torch.float8_e4m3fn and not list(f8.parameters())
    out, reference = f8(x), linear(x)
    assert out.shape == reference.shape and out.dtype == torch.bfloat16
    error = ((out.float() - reference).norm() / reference.norm()).item()
    assert 1e-4 < error < 0.05, error  # float8's error, not an exact copy nor a wrong result


def non_identity_dit():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=2, num_heads=4, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():  # adaLN-Zero's zeros: the blocks would be the identity
                p.normal_(0, 0.1)
    return model.eval()


def test_a_dit_with_float8_blocks_draws_what_the_fp32_one_does():
    """Every block's qkv, proj, fc1 and fc2 become float8 (fc2 takes over the GELU); the output
    moves from the fp32 model's by a small part of what the blocks change (float8's error; a 10%
    error in the weights' scales moves it 5× as far), under bf16 autocast too."""
    model = non_identity_dit()
    identity = copy.deepcopy(model)
    for block in identity.blocks:  # adaLN-Zero at its initialisation: every block is the identity
        nn.init.zeros_(block.adaLN_modulation[1].weight), nn.init.zeros_(block.adaLN_modulation[1].bias)
    f8 = copy.deepcopy(model)
    replaced = quantize_for_sampling(f8, "tensorwise")
    assert replaced == [
        f"blocks.{b}.{layer}" for b in range(2) for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    ]
    assert all(isinstance(b.mlp.act, nn.Identity) and isinstance(b.mlp.fc2.gelu, SigmoidGELU) for b in f8.blocks)
    assert isinstance(f8.blocks[0].attn.qkv, Float8SamplingLinear) and isinstance(f8.final_layer.linear, nn.Linear)
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([0, 250, 500, 999]), torch.tensor([1, 2, 3, 10])
    with torch.no_grad():
        reference = model(x, t, y)
        effect = (reference - identity(x, t, y)).norm()
        for autocast in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = f8(x, t, y).float()
            error = ((out - reference).norm() / effect).item()
            assert 1e-4 < error < 0.1, (autocast, error)


def test_only_the_named_layers_are_quantised():
    model = non_identity_dit()
    assert quantize_for_sampling(model, "tensorwise", ["qkv"]) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert isinstance(model.blocks[0].mlp.fc2, nn.Linear) and isinstance(model.blocks[0].mlp.act, nn.GELU)


def test_swiglu_blocks_are_quantised_and_a_model_without_float8_shapes_is_refused():
    # hidden width int(2/3 · 4 · 192) = 512: every dimension divides by 16
    swiglu = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=192, depth=1, num_heads=4, mlp="swiglu")
    assert quantize_for_sampling(swiglu, "tensorwise") == [
        f"blocks.0.{n}" for n in ("attn.qkv", "attn.proj", "mlp.w12", "mlp.w3")
    ]
    narrow = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=72, depth=1, num_heads=4)  # 72 = 16 · 4.5
    with pytest.raises(
        UsageError, match="float8: no linear of this model's blocks .* has both dimensions divisible by 16"
    ):
        quantize_for_sampling(narrow, "tensorwise")


def test_devices_that_cannot_run_are_one_line():
    check_float8_sampling("tensorwise", torch.device("cpu"))
    with pytest.raises(UsageError, match=r"--float8 rowwise runs on CUDA GPUs \(tensorwise also on the CPU\)"):
        check_float8_sampling("rowwise", torch.device("cpu"))
    with pytest.raises(UsageError, match=r"--sampler-float8 rowwise runs on CUDA GPUs .*; leave --sampler-float8 out"):
        check_float8_sampling("rowwise", torch.device("cpu"), "--sampler-float8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on CUDA GPUs")
def test_the_triton_kernel_quantises_as_the_tensor_operations_do():
    """dit::gelu_quantize_rows against quantize(SigmoidGELU(x), "rowwise"), at DiT-XL's MLP width:
    the same scales, and each value the same e4m3 number or its neighbour (the kernel's exp2 and
    reciprocal are the GPU's approximate ones, which can round differently at a boundary)."""
    from dit.models.float8_kernels import gelu_quantize_rows

    x = (torch.randn(4096, 4608, device="cuda") * 3).to(torch.bfloat16)
    x[7] = 0
    q, scale = gelu_quantize_rows(x)
    ref_q, ref_scale = quantize(SigmoidGELU()(x.float()), "rowwise")
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (4096, 1)
    assert torch.allclose(scale, ref_scale, rtol=1e-5, atol=0)
    value, ref_value = q.float(), ref_q.float()
    assert (value - ref_value).abs().le(ref_value.abs() / 8 + 2**-9).all()  # at most one e4m3 step
    assert (value != ref_value).float().mean() < 1e-3 and torch.all(value[7] == 0)


def test_the_triton_kernel_builds_for_hopper_as_its_comments_say():
    """Compiled ahead of time for sm90 (no GPU needed: Triton's own ptxas): the saturating e4m3 cast
    that stands in for the clamp, the approximate exp2 and reciprocal, and 16-byte loads of the row
    (n_cols divisible by 16, as Triton specialises it at launch for DiT's widths). Checked with
    Triton 3.5.1's triton.compile / ASTSource / GPUTarget."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dit.models import float8_kernels

    kernel = float8_kernels._gelu_quantize_rows_kernel
    types = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32"}
    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    aligned = {
        (kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in ("x_ptr", "q_ptr", "scale_ptr", "n_cols")
    }
    source = ASTSource(kernel, signature=signature, constexprs={"ROWS": 1, "BLOCK": 8192}, attrs=aligned)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx
    per_thread = 8192 // (8 * 32)  # a row's padded lanes over 8 warps of 32 threads
    assert ptx.count("ex2.approx.ftz.f32") == ptx.count("rcp.approx.ftz.f32") == per_thread
    assert ptx.count("div.full.f32") <= 2  # a row's scale and its reciprocal, not an element's
    assert "ld.global.v4.b32" in ptx and "ld.global.b16" not in ptx
