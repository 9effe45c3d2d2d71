"""A Triton kernel for the float8 sampler: the MLP's GELU and the rowwise float8 quantisation of its
output in one pass over fc1's output, as the torch op `dit::gelu_quantize_rows`.

torch.compile's own kernel for GELU → row amax → cast loops over each 4608-wide row (DiT-XL) twice,
computing the GELU in each loop; this one keeps the row in registers, so it reads fc1's output once
and writes one byte an element. Imported only on CUDA (Triton ships with torch's CUDA builds);
dit.models.float8_sampling computes the same values with tensor operations elsewhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

E4M3_MAX = tl.constexpr(448.0)  # torch.finfo(torch.float8_e4m3fn).max
TINY = tl.constexpr(1e-12)  # as dit.models.float8_sampling.TINY: an all-zero row stays zero
# (rows a program, warps a program, split the row into two power-of-two tiles, GELU form), for
# DiT-XL's 4608-wide rows on an H200 (benchmarks/gelu_quantize_kernel.py)
LAUNCH = (1, 8, False, 2)


@triton.jit
def _gelu(x, FORM: tl.constexpr):
    # tanh-GELU (Hendrycks & Gimpel 2016), u = √(2/π)(x + 0.044715x³)
    if FORM == 0:  # x·σ(2u) (dit.models.float8_sampling.SigmoidGELU)
        return x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    elif FORM == 1:  # x / (1 + exp(-2u)): one division an element
        return x / (1.0 + tl.exp(-1.5957691216057308 * (x + 0.044715 * x * x * x)))
    else:  # x / (1 + 2^(-2u·log₂e)) with the GPU's approximate exp2 and reciprocal (PTX ex2/rcp.approx.ftz)
        z = x * (-2.302208198144325 - 0.1029432395800235 * x * x)  # -2u·log₂e
        e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [z], dtype=tl.float32, is_pure=True, pack=1)
        r = tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=f,f", [1.0 + e], dtype=tl.float32, is_pure=True, pack=1
        )
        return x * r


@triton.jit
def _gelu_quantize_rows_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    n_rows,
    n_cols,
    ROWS: tl.constexpr,
    HEAD: tl.constexpr,
    TAIL: tl.constexpr,
    FORM: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows[:, None] < n_rows
    head_cols = tl.arange(0, HEAD)[None, :]
    head_ok = row_ok & (head_cols < n_cols)
    head = rows[:, None] * n_cols + head_cols
    y_head = _gelu(tl.load(x_ptr + head, mask=head_ok, other=0.0).to(tl.float32), FORM)
    amax = tl.max(tl.abs(y_head), axis=1)
    if TAIL > 0:
        tail_cols = HEAD + tl.arange(0, TAIL)[None, :]
        tail_ok = row_ok & (tail_cols < n_cols)
        tail = rows[:, None] * n_cols + tail_cols
        y_tail = _gelu(tl.load(x_ptr + tail, mask=tail_ok, other=0.0).to(tl.float32), FORM)
        amax = tl.maximum(amax, tl.max(tl.abs(y_tail), axis=1))
    amax = tl.maximum(amax, TINY)
    if FORM == 0:
        scale = amax / E4M3_MAX
        tl.store(q_ptr + head, tl.clamp(y_head / scale[:, None], -E4M3_MAX, E4M3_MAX).to(tl.float8e4nv), mask=head_ok)
    elif FORM == 1:
        inverse_scale = (E4M3_MAX / amax)[:, None]
        tl.store(q_ptr + head, tl.clamp(y_head * inverse_scale, -E4M3_MAX, E4M3_MAX).to(tl.float8e4nv), mask=head_ok)
    else:  # the cast saturates (PTX cvt.rn.satfinite.e4m3x2.f32), which is the clamp
        inverse_scale = (E4M3_MAX / amax)[:, None]
        tl.store(q_ptr + head, (y_head * inverse_scale).to(tl.float8e4nv), mask=head_ok)
    if TAIL > 0:
        inverse_scale = (E4M3_MAX / amax)[:, None]
        tl.store(q_ptr + tail, tl.clamp(y_tail * inverse_scale, -E4M3_MAX, E4M3_MAX).to(tl.float8e4nv), mask=tail_ok)
    tl.store(scale_ptr + rows, amax / E4M3_MAX, mask=rows < n_rows)


@torch.library.custom_op("dit::gelu_quantize_rows", mutates_args=())
def gelu_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, n) on a CUDA GPU -> (GELU(x) / scale in e4m3 (rows, n), scale (rows, 1) fp32),
    scale = the row's amax of GELU(x) / 448."""
    x = x.contiguous()
    rows, n = x.shape
    q = torch.empty((rows, n), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    rows_per_program, num_warps, split, form = LAUNCH
    head = 1 << (n.bit_length() - 1) if split else triton.next_power_of_2(n)
    tail = triton.next_power_of_2(n - head) if n > head else 0
    _gelu_quantize_rows_kernel[(triton.cdiv(rows, rows_per_program),)](
        x, q, scale, rows, n, ROWS=rows_per_program, HEAD=head, TAIL=tail, FORM=form, num_warps=num_warps
    )
    return q, scale


@gelu_quantize_rows.register_fake
def _(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, n = x.shape
    return x.new_empty((rows, n), dtype=torch.float8_e4m3fn), x.new_empty((rows, 1), dtype=torch.float32)
