"""Fused residual-add + RMSNorm in Triton (the definition is kangaroo_ext/ops/reference.py).

    s      = round(float(x) + float(residual))          # the residual stream, x.dtype
    normed = round(float(s) * rsqrt(mean(float(s)^2) + eps))
    out    = round(float(weight) * float(normed))        # HF LlamaRMSNorm: rounded once more

One program per row. Decode calls this on 1-3 rows of H = 576, so the kernel is launch- and
latency-bound; the point of fusing is one launch and one pass over memory instead of ~6 eager ops.
The launcher allocates with torch, never syncs and never loops over data, so it is CUDA-graph
capturable.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..ops import validate

# Widest row held in registers at once. Above it the kernel loops over BLOCK-wide chunks in two
# passes (8192 fp32 values over 16 warps is 16 registers per thread per live tensor, which still
# leaves room for x, residual and weight; much wider spills). Module-level so tests can lower it to
# exercise the chunked path on small rows.
MAX_FUSED_SIZE = 8192


def _num_warps(block: int) -> int:
    # Enough threads that each holds <= 8-16 elements: one or two 16-byte vector loads per tensor
    # in fp16/bf16, without leaving warps idle on narrow rows (H = 576 -> BLOCK 1024 -> 4 warps).
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


@triton.jit
def _fused_add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    H, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
):
    # int64 row offset: rows * H can pass 2**31 for large prefills.
    row_start = tl.program_id(0).to(tl.int64) * H
    x_row = x_ptr + row_start
    res_row = res_ptr + row_start
    out_row = out_ptr + row_start
    res_out_row = res_out_ptr + row_start
    dtype = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)

    if SINGLE_PASS:
        mask = cols < H
        # Masked lanes read 0, so they add nothing to the sum of squares.
        s = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            s += tl.load(res_row + cols, mask=mask, other=0.0).to(tl.float32)
        # Round the stream to the storage dtype *before* normalising: the reference (and HF) keeps
        # the residual stream in x.dtype, so the norm must see the rounded value. This also makes
        # residual_out bit-exact: one fp32 add of two exact values, then one rounding.
        s = s.to(dtype)
        tl.store(res_out_row + cols, s, mask=mask)
        h = s.to(tl.float32)
        # Divide by H (not BLOCK): padding lanes are zeros, not elements.
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) / H + eps)
        normed = (h * rstd).to(dtype).to(tl.float32)  # HF rounds the normed value to x.dtype first
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + cols, (w * normed).to(dtype), mask=mask)
    else:
        # Pass 1: add, round, store the stream, accumulate squares lane-wise (one cross-lane
        # reduction at the end instead of one per chunk).
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, H, BLOCK):
            offs = start + cols
            mask = offs < H
            s = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                s += tl.load(res_row + offs, mask=mask, other=0.0).to(tl.float32)
            s = s.to(dtype)
            tl.store(res_out_row + offs, s, mask=mask)
            h = s.to(tl.float32)
            acc += h * h
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / H + eps)
        # Pass 2 reads back the stream this program just wrote (one read instead of re-reading x
        # and residual). Each element is loaded with the same layout it was stored with, so the same
        # thread owns it; the barrier makes the ordering explicit anyway.
        tl.debug_barrier()
        for start in range(0, H, BLOCK):
            offs = start + cols
            mask = offs < H
            h = tl.load(res_out_row + offs, mask=mask, other=0.0).to(tl.float32)
            normed = (h * rstd).to(dtype).to(tl.float32)
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_row + offs, (w * normed).to(dtype), mask=mask)


def fused_add_rms_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                       eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, residual_out) = (weight * RMSNorm(x + residual), x + residual); residual may be None.

    x, residual: [..., H] contiguous; weight: [H]; one dtype (fp32 / fp16 / bf16). residual_out is
    always a new tensor (a copy of x when residual is None), as in the reference.
    """
    validate.fused_add_rms_norm(x, residual, weight, eps)
    H = x.shape[-1]
    rows = x.numel() // H
    out = torch.empty_like(x)
    residual_out = torch.empty_like(x)

    block = triton.next_power_of_2(H)
    single_pass = block <= MAX_FUSED_SIZE
    if not single_pass:
        block = MAX_FUSED_SIZE
    _fused_add_rms_norm_kernel[(rows,)](
        x, residual if residual is not None else x,  # dummy pointer, never read when HAS_RESIDUAL=False
        weight, out, residual_out,
        H, float(eps),
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        SINGLE_PASS=single_pass,
        num_warps=_num_warps(block),
    )
    return out, residual_out
