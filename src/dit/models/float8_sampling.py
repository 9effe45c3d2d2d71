"""Float8 matmuls for sampling: the blocks' linears with their weights quantised once.

Sampling never changes the weights, so each chosen `nn.Linear` is replaced by a
`Float8SamplingLinear` that holds its weight in float8 e4m3 (quantised once, here) and quantises
only its input on each call. The input's scales are computed with plain tensor operations, so that
torch.compile fuses them into the kernel that produces the input (the modulated layer norm before
qkv and fc1, the GELU before fc2): the input reaches the matmul as float8 with no pass of its own.
The matmul is `torch._scaled_mm` (cuBLAS / CUTLASS float8 kernels, bf16 output, as an autocast
linear's).

The quantised fc2 takes the GELU's output, whose scales need it over a whole row (or tensor)
before the cast: torch.compile's kernel computes the GELU once for the absolute maximum and again
for the cast. So a quantised fc2 takes the GELU over (the MLP's `act` becomes the identity): on a
CUDA GPU, rowwise, one Triton kernel computes GELU, scale and cast in one pass over the row
(dit.models.float8_kernels); elsewhere, and tensorwise, tensor operations do, with the GELU as
`SigmoidGELU`, the same function in the form x·σ(2u), which compiles to the GPU's fast exponential.

Granularity: "rowwise" keeps one scale for each input row (token) and each weight row (output
channel); "tensorwise" one for each tensor. torch's CPU float8 matmul takes tensorwise scales only
(torch 2.9), so the CPU runs tensorwise (for tests) and GPUs of compute capability 8.9+ run both.
The blocks' linears are replaced (SAMPLING_LAYERS: qkv, proj, fc1, fc2; SwiGLU's w12, w3;
cross-attention's q, kv), where both their dimensions divide by 16. Attention, the norms, the adaLN
modulation, the embedders and the final layer stay as they were.
"""

from __future__ import annotations

import torch
from torch import nn

from dit.errors import UsageError
from dit.training.float8 import LAYERS, OTHER_LAYERS, check_float8_device, is_float8_layer, swap_linears

GRANULARITIES = ("rowwise", "tensorwise")
E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
TINY = 1e-12  # an all-zero row (or tensor) gets a scale that keeps it zero rather than nan


def quantize(x: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / scale in e4m3, scale in fp32): scale = amax / 448 over each row of the last dim
    (shape (rows, 1)) or over the whole tensor (shape ()), so the largest magnitude maps to e4m3's."""
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True) if granularity == "rowwise" else x.abs().amax()
    scale = amax.clamp(min=TINY) / E4M3_MAX
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class SigmoidGELU(nn.Module):
    """The tanh-approximated GELU (Hendrycks & Gimpel 2016; the official Mlp's) in the form
    x·σ(2u), u = √(2/π)(x + 0.044715x³): 0.5(1 + tanh u) = σ(2u), so it is the same function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))  # 2√(2/π) = 1.5957…


class Float8SamplingLinear(nn.Module):
    """`linear`'s function with an e4m3 weight: y = (x_q · s_x) (W_q · s_W)ᵀ + b, in bf16; with
    `gelu_input`, of GELU(x) (the GELU before the MLP's fc2, fused into the input's quantisation)."""

    triton_kernel = True  # False: tensor operations on GPUs too (benchmarks/float8_sampler.py compares)

    def __init__(self, linear: nn.Linear, granularity: str, gelu_input: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.granularity = linear.in_features, linear.out_features, granularity
        self.gelu = SigmoidGELU() if gelu_input else None
        weight, scale = quantize(linear.weight.detach(), granularity)
        self.register_buffer("weight", weight)  # (out, in), row-major: .t() is the column-major operand
        # _scaled_mm takes the second operand's scales as (1, out) for rowwise.
        self.register_buffer("weight_scale", scale.t().contiguous() if granularity == "rowwise" else scale)
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, granularity={self.granularity}"

    def quantize_input(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gelu is None:
            return quantize(rows, self.granularity)
        if rows.is_cuda and self.granularity == "rowwise" and self.triton_kernel:
            from dit.models.float8_kernels import gelu_quantize_rows

            return gelu_quantize_rows(rows)
        return quantize(self.gelu(rows.float()), self.granularity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        x_q, x_scale = self.quantize_input(rows)
        out = torch._scaled_mm(
            x_q,
            self.weight.t(),
            scale_a=x_scale,
            scale_b=self.weight_scale,
            bias=self.bias,
            out_dtype=torch.bfloat16,
            use_fast_accum=True,  # inference: the float8 kernels' fast accumulation, as torchao's inference configs
        )
        return out.view(*x.shape[:-1], self.out_features)


def check_float8_sampling(granularity: str, device: torch.device, flag: str = "--float8") -> None:
    """One line, naming `flag`, for a device that cannot run the granularity (argparse's choices
    already hold it to GRANULARITIES)."""
    check_float8_device(granularity, device, f"{flag} {granularity}", f"leave {flag} out")


# The blocks' linears: attention's and the GELU MLP's (dit.training.float8.LAYERS), SwiGLU's two
# (w12, w3) and cross-attention's q and kv (OTHER_LAYERS).
SAMPLING_LAYERS = LAYERS + OTHER_LAYERS


def quantize_for_sampling(model: nn.Module, granularity: str, layers=SAMPLING_LAYERS) -> list[str]:
    """Replace the chosen linears of `model.blocks` by Float8SamplingLinear, in place (a replaced
    fc2 takes over the tanh GELU before it); returns the names of the replaced linears. For sampling
    only: the model's state dict changes (float8 buffers, no parameters)."""
    replaced = swap_linears(
        model.blocks,
        lambda module, name: is_float8_layer(module, name, layers),
        lambda linear, gelu: Float8SamplingLinear(linear, granularity, gelu).to(linear.weight.device),
    )
    if not replaced:
        raise UsageError(
            f"float8: no linear of this model's blocks ({', '.join(layers)}) has both dimensions divisible by 16, "
            "as float8 matmuls need; sample without float8"
        )
    return replaced
