"""Float8 in the forward matmul only (`module.float8=rowwise_forward|tensorwise_forward`).

A `Float8ForwardLinear` computes y = x Wᵀ + b from e4m3 copies of x and W (scales per row or per
tensor, computed on each call from the absolute maxima); the backward's two matmuls, the input
gradient g W and the weight gradient gᵀ x, run in the autocast dtype (bf16) from the saved bf16
input and the fp32 master weight, as an autocast linear's do. So the gradients are those of the
bf16 matmul at the quantised forward's point, and only the forward pays for casts: the input's,
fused by torch.compile into the kernel that produces it (the modulated layer norm before qkv and
fc1, the attention's output before proj), and the weight's.

torchao's recipes also cast the output gradient, whose scales need a pass of their own over each
block's backward; at DiT-XL/2's width those casts cost more than the float8 matmuls save
(docs/benchmarks.md §2). Here the backward is bf16's.

The fc2 of a tanh-GELU MLP takes the GELU over (the MLP's `act` becomes the identity), as the
float8 sampler's does (dit.models.float8_sampling): on a CUDA GPU, rowwise, one Triton kernel
computes GELU, scale and cast in one pass over fc1's output (dit.models.float8_kernels). Its
backward recomputes the GELU from the saved fc1 output for the weight gradient and applies the
GELU's derivative to the input gradient, so no GELU output is kept between forward and backward.
"""

from __future__ import annotations

import torch
from torch import nn

from dit.models.float8_sampling import SigmoidGELU, quantize

GRANULARITY = {"rowwise_forward": "rowwise", "tensorwise_forward": "tensorwise"}  # module.float8 -> scales


def _quantized_input(rows, granularity, gelu_input):
    if not gelu_input:
        return quantize(rows, granularity)
    if rows.is_cuda and granularity == "rowwise":
        from dit.models.float8_kernels import gelu_quantize_rows

        return gelu_quantize_rows(rows)
    return quantize(SigmoidGELU()(rows.float()), granularity)


class _Float8ForwardMatmul(torch.autograd.Function):
    """rows (n, in), weight (out, in) fp32, bias (out,) or None -> (n, out) in `dtype`: float8 forward,
    `dtype` backward. With `gelu_input`, of GELU(rows)."""

    @staticmethod
    def forward(ctx, rows, weight, bias, granularity, gelu_input, dtype):
        rows = rows.to(dtype)
        ctx.save_for_backward(rows, weight)
        ctx.gelu_input, ctx.has_bias = gelu_input, bias is not None
        with torch.autocast(rows.device.type, enabled=False):
            rows_q, rows_scale = _quantized_input(rows, granularity, gelu_input)
            weight_q, weight_scale = quantize(weight, granularity)
            return torch._scaled_mm(
                rows_q,
                weight_q.t(),  # (in, out) column-major, as the float8 kernels take their second operand
                scale_a=rows_scale,
                scale_b=weight_scale.t() if granularity == "rowwise" else weight_scale,  # (1, out) rowwise
                bias=None if bias is None else bias.to(dtype),
                out_dtype=dtype,
                use_fast_accum=True,  # the forward's, as torchao's training recipes set it
            )

    @staticmethod
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        inputs = nn.functional.gelu(rows, approximate="tanh") if ctx.gelu_input else rows
        grad_weight = grad.t() @ inputs
        grad_rows = grad @ weight.to(grad.dtype)
        if ctx.gelu_input:
            grad_rows = torch.ops.aten.gelu_backward(grad_rows, rows, approximate="tanh")
        grad_bias = grad.sum(0) if ctx.has_bias else None  # as the autocast linear's, in its dtype
        return grad_rows, grad_weight, grad_bias, None, None, None


class Float8ForwardLinear(nn.Linear):
    """`linear` (the same weight and bias Parameters) with a float8 forward matmul; with
    `gelu_input`, the tanh GELU before it too."""

    def __init__(self, linear: nn.Linear, granularity: str, gelu_input: bool = False):
        with torch.device("meta"):  # the parameters are linear's own, set below
            super().__init__(linear.in_features, linear.out_features, bias=False)
        self.weight, self.bias = linear.weight, linear.bias
        self.granularity, self.gelu_input = granularity, gelu_input

    def extra_repr(self):
        gelu = ", GELU before it" if self.gelu_input else ""
        return f"{super().extra_repr()}, float8 forward ({self.granularity}){gelu}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        rows = x.reshape(-1, self.in_features)
        out = _Float8ForwardMatmul.apply(rows, self.weight, self.bias, self.granularity, self.gelu_input, dtype)
        return out.view(*x.shape[:-1], self.out_features)
