"""A Triton kernel for the float8 sampler: the MLP's GELU and the rowwise float8 quantisation of its
output in one pass over fc1's output, as the torch op `dit::gelu_quantize_rows`.

torch.compile's own kernel for GELU → row amax → cast loops over each 4608-wide row (DiT-XL) twice,
computing the GELU in each loop; this one keeps the row in registers, so it reads fc1's output once
and writes one byte an element. On an H200 it takes 158 µs for DiT-XL's 32,768 rows, against 464 µs for
torch.compile's and 179 µs for the bf16 GELU alone (docs/benchmarks.md §4). Imported only on CUDA
(Triton ships with torch's CUDA builds); dit.models.float8_sampling computes the same values with
tensor operations elsewhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

E4M3_MAX = tl.constexpr(448.0)  # torch.finfo(torch.float8_e4m3fn).max
TINY = tl.constexpr(1e-12)  # as dit.models.float8_sampling.TINY: an all-zero row stays zero
# (rows, warps) a program: the fastest for DiT-XL's 4608-wide rows on an H200, of those
# benchmarks/gelu_quantize_kernel.py sweeps
LAUNCH = (1, 8)


@triton.jit
def _gelu(x):
    # The tanh-GELU (Hendrycks & Gimpel 2016) as x·σ(2u), u = √(2/π)(x + 0.044715x³), the form of
    # dit.models.float8_sampling.SigmoidGELU, written x · rcp(1 + 2^(-2u·log₂e)). The kernel is bound
    # by issuing instructions, not by memory, so exp2 and the reciprocal are the GPU's approximate
    # instructions (PTX ex2.approx.ftz, rcp.approx.ftz: a few ulp, far below e4m3's step of 2⁻³
    # relative); torch's and Triton's IEEE-style exp and division add range checks to each element.
    z = x * (-2.302208198144325 - 0.1029432395800235 * x * x)  # -2u·log₂e
    e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [z], dtype=tl.float32, is_pure=True, pack=1)
    r = tl.inline_asm_elementwise(
        "rcp.approx.ftz.f32 $0, $1;", "=f,f", [1.0 + e], dtype=tl.float32, is_pure=True, pack=1
    )
    return x * r


@triton.jit
def _gelu_quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, n_rows, n_cols, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)[None, :]
    ok = (rows[:, None] < n_rows) & (cols < n_cols)
    offsets = rows[:, None] * n_cols + cols
    y = _gelu(tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32))
    amax = tl.maximum(tl.max(tl.abs(y), axis=1), TINY)
    # The cast saturates (PTX cvt.rn.satfinite.e4m3x2.f32), which is the clamp to ±448.
    tl.store(q_ptr + offsets, (y * (E4M3_MAX / amax)[:, None]).to(tl.float8e4nv), mask=ok)
    tl.store(scale_ptr + rows, amax / E4M3_MAX, mask=rows < n_rows)


@torch.library.custom_op("dit::gelu_quantize_rows", mutates_args=())
def gelu_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, n) on a CUDA GPU -> (GELU(x) / scale in e4m3 (rows, n), scale (rows, 1) fp32),
    scale = the row's amax of GELU(x) / 448."""
    x = x.contiguous()
    rows, n = x.shape
    q = torch.empty((rows, n), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    rows_per_program, num_warps = LAUNCH
    _gelu_quantize_rows_kernel[(triton.cdiv(rows, rows_per_program),)](
        x, q, scale, rows, n, ROWS=rows_per_program, BLOCK=triton.next_power_of_2(n), num_warps=num_warps
    )
    return q, scale


@gelu_quantize_rows.register_fake
def _(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, n = x.shape
    return x.new_empty((rows, n), dtype=torch.float8_e4m3fn), x.new_empty((rows, 1), dtype=torch.float32)
