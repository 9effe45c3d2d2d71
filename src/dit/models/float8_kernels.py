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
# (rows, warps) a program, for DiT-XL's 4608-wide rows on an H200 (benchmarks/gelu_quantize_kernel.py)
LAUNCH = (1, 16)


@triton.jit
def _gelu_quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, n_rows, n_cols, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offsets = rows[:, None] * n_cols + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    # tanh-GELU as x·σ(2u), u = √(2/π)(x + 0.044715x³) (dit.models.float8_sampling.SigmoidGELU)
    y = x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    scale = tl.maximum(tl.max(tl.abs(y), axis=1), TINY) / E4M3_MAX
    q = tl.clamp(y / scale[:, None], -E4M3_MAX, E4M3_MAX)
    tl.store(q_ptr + offsets, q.to(tl.float8e4nv), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=rows < n_rows)


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
