"""Decode-time linear layers in Triton: batch-invariant GEMV with a fused RMSNorm prologue.

The definitions are kangaroo_ext/ops/reference.py (rms_norm_linear, rms_norm_gate_up, decode_linear).
For each row of x [..., K] (M rows in all) and weight W [N, K], rounding exactly where the reference does:
    s      = T(float(x) + float(residual))                  (s = x without a residual; residual_out = s)
    rstd   = 1 / sqrt(sum(float(s)^2) / K + eps)            (correctly rounded, as csrc/kernels/rms_norm.cuh)
    xn     = T(float(norm_weight) * float(T(float(s) * rstd)))
    out_n  = T(fp32 dot(xn, W[n]) + float(bias[n]))         (decode_linear: xn = x, no norm)
    act_n  = T(float(T(silu(float(T(g_n))))) * float(T(u_n)))   (gate_up: g, u = the fp32 dots with gate, up)
T() rounds to x.dtype (round to nearest even).

One launch per op; CUDA-graph capturable (torch allocations, no host sync, no data-dependent host work).
Grid = (weight blocks, row groups). A program owns BLOCK_N rows of one weight (rms_norm_linear's 1-3
weights are concatenated along the grid: program p knows from NB0, NB1 which weight it is in; gate_up
reads the same BLOCK_N rows of gate and up) and up to ROWS = 8 rows of x. It streams its weight tile
once over K in BLOCK_K chunks, and uses each chunk for all of its rows: decode (M = 1) and verify
(M = gamma + 1 <= 8) steps read every weight element from memory exactly once, which is the whole cost
of these memory-bound ops. The norm prologue is recomputed by every program: one pass over its rows
of x (+ residual) for rstd, then the main loop re-derives the normed chunk on the fly before each dot
(x rows are tiny and stay in L2). Programs with pid 0 along the weights also write residual_out.

Batch invariance: a row's result is bitwise the same whatever M is (a verify step over k+1 positions
rounds like k+1 single-token steps). Every row is computed by the same code on 1-D/2-D tensors whose
shapes do not involve the row count: an fp32 product tile [BLOCK_N, BLOCK_K] reduced over K by tl.sum,
chunks added in order. No tl.dot (it needs >= 16 rows and its order depends on the tile shape); the
rows of a program are a static loop over ROWS with a runtime `if row < M` (M is not specialised, so
every M runs the same binary). BLOCK_N, BLOCK_K and the warps are chosen from N, K and the device only.

Tuning status: the GPU block sizes below are reasoned defaults (enough programs to cover the SMs on
N = 576, a 16-byte load per thread per weight row on K), not yet measured. Compiled offline for sm_90a
(BLOCK_N = 16): 64-120 registers, 240 for gate_up in 16-bit (two weight tiles), no spills; the K
reduction of a tile stays inside a warp (shuffles), one layout conversion per row broadcasts its x chunk.
"""
import functools
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..ops import validate

# Rows of x per program (a constexpr: the accumulators are [BLOCK_N, ROWS]). Decode and verify steps
# have 1-8 rows; more rows are spread over the grid's second axis, each group re-reading the weights.
ROWS = 8
# Bytes of each weight row read per loop step on a GPU: 256 bf16/fp16 or 128 fp32 values, one 16-byte
# load per thread and weight row with 32 threads along K (fp32 at 256 values spills registers).
BLOCK_K_BYTES = 512
# Weight rows per program on a GPU: the largest of these that still gives >= 2 programs per SM
# (N = 576 on 132 SMs -> 4 rows, 144 programs; N = 14336 -> 32 rows, 448 programs).
BLOCK_N_CHOICES = (32, 16, 8, 4)
NUM_WARPS = 4
# Under TRITON_INTERPRET=1 (CPU tensors) the cost is per program and per loop step, not per byte, so
# the tiles are larger there. Module-level so tests can lower them to exercise many blocks and chunks.
INTERPRET_BLOCK_N = 128
INTERPRET_BLOCK_K = 512


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _config(n_total: int, K: int, w: torch.Tensor) -> Tuple[int, int]:
    """(BLOCK_N, BLOCK_K) from the weights' shape, dtype and device only (never from M: batch invariance)."""
    device = w.device
    if device.type == "cpu":
        return (min(INTERPRET_BLOCK_N, triton.next_power_of_2(n_total)),
                min(INTERPRET_BLOCK_K, triton.next_power_of_2(K)))
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    block_n = next((b for b in BLOCK_N_CHOICES if triton.cdiv(n_total, b) >= 2 * sms), BLOCK_N_CHOICES[-1])
    return block_n, min(BLOCK_K_BYTES // w.element_size(), max(16, triton.next_power_of_2(K)))


@triton.jit
def _row_rstd(x_ptr, res_ptr, res_out_ptr, row0, M, K, K_f, eps, store_res,
              HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """rstd of each of the program's rows ([ROWS] fp32; 0 for rows >= M). Writes s to residual_out
    where store_res (one program per row group does)."""
    dtype = x_ptr.dtype.element_ty
    ids = tl.arange(0, ROWS)
    kk = tl.arange(0, BLOCK_K)
    rstd = tl.zeros([ROWS], tl.float32)
    for m in tl.static_range(ROWS):
        row = row0 + m
        if row < M:
            base = row.to(tl.int64) * K
            sq = tl.zeros([BLOCK_K], tl.float32)   # lane-wise sum of squares, one reduction at the end
            for k0 in range(0, K, BLOCK_K):
                k = k0 + kk
                k_ok = k < K
                s = tl.load(x_ptr + base + k, mask=k_ok, other=0.0).to(tl.float32)
                if HAS_RES:
                    s += tl.load(res_ptr + base + k, mask=k_ok, other=0.0).to(tl.float32)
                s = s.to(dtype)                     # the residual stream is kept in x.dtype
                tl.store(res_out_ptr + base + k, s, mask=k_ok & store_res)
                h = s.to(tl.float32)
                sq += h * h                         # masked lanes are 0: nothing added
            mean_sq = tl.div_rn(tl.sum(sq, axis=0), K_f)   # divide by K, not BLOCK_K
            r = tl.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))  # 1/sqrt, each correctly rounded (no rsqrt.approx)
            rstd = tl.where(ids == m, r, rstd)
    return rstd


@triton.jit
def _accumulate(x_ptr, res_ptr, nw_ptr, rstd, w_ptr, w2_ptr, row0, M, N, K, n0,
                NORM: tl.constexpr, HAS_RES: tl.constexpr, PAIR: tl.constexpr,
                ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 dots of the program's rows (normed on the fly when NORM) with weight rows n0 .. n0+BLOCK_N
    of w (and w2 when PAIR). Returns two [BLOCK_N, ROWS] accumulators (the second is zeros unless PAIR)."""
    dtype = x_ptr.dtype.element_ty
    ids = tl.arange(0, ROWS)
    kk = tl.arange(0, BLOCK_K)
    n = n0 + tl.arange(0, BLOCK_N)
    n_ok = n < N
    w_rows = w_ptr + n.to(tl.int64)[:, None] * K           # int64: N * K can pass 2**31
    w2_rows = w2_ptr + n.to(tl.int64)[:, None] * K
    acc = tl.zeros([BLOCK_N, ROWS], tl.float32)
    acc2 = tl.zeros([BLOCK_N, ROWS], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        k_ok = k < K
        w_mask = n_ok[:, None] & k_ok[None, :]
        # The weight tile is read once per chunk and used for every row below.
        w = tl.load(w_rows + k[None, :], mask=w_mask, other=0.0).to(tl.float32)
        if PAIR:
            w2 = tl.load(w2_rows + k[None, :], mask=w_mask, other=0.0).to(tl.float32)
        if NORM:
            nw = tl.load(nw_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        for m in tl.static_range(ROWS):
            row = row0 + m
            if row < M:
                base = row.to(tl.int64) * K
                xr = tl.load(x_ptr + base + k, mask=k_ok, other=0.0).to(tl.float32)
                if NORM:
                    if HAS_RES:
                        xr += tl.load(res_ptr + base + k, mask=k_ok, other=0.0).to(tl.float32)
                    r = tl.sum(tl.where(ids == m, rstd, 0.0), axis=0)    # this row's rstd, exactly
                    normed = (xr.to(dtype).to(tl.float32) * r).to(dtype).to(tl.float32)
                    xr = (nw * normed).to(dtype).to(tl.float32)
                # Same tile shape for every row and every M: the same reduction order over K.
                part = tl.sum(w * xr[None, :], axis=1)                  # [BLOCK_N]
                acc = tl.where(ids[None, :] == m, acc + part[:, None], acc)
                if PAIR:
                    part2 = tl.sum(w2 * xr[None, :], axis=1)
                    acc2 = tl.where(ids[None, :] == m, acc2 + part2[:, None], acc2)
    return acc, acc2


@triton.jit
def _linear_block(x_ptr, res_ptr, nw_ptr, rstd, w_ptr, b_ptr, out_ptr, row0, M, N, K, n0,
                  NORM: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
                  ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    acc, _ = _accumulate(x_ptr, res_ptr, nw_ptr, rstd, w_ptr, w_ptr, row0, M, N, K, n0,
                         NORM, HAS_RES, False, ROWS, BLOCK_N, BLOCK_K)
    n = n0 + tl.arange(0, BLOCK_N)
    n_ok = n < N
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[:, None]   # in fp32, one rounding
    rows = row0 + tl.arange(0, ROWS)
    out = out_ptr + rows.to(tl.int64)[None, :] * N + n[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & (rows < M)[None, :])


@triton.jit(do_not_specialize=["M"])
def _rms_norm_linear_kernel(
    x_ptr, res_ptr, nw_ptr, res_out_ptr,
    w0_ptr, b0_ptr, o0_ptr, w1_ptr, b1_ptr, o1_ptr, w2_ptr, b2_ptr, o2_ptr,
    N0, N1, N2, NB0, NB1, M, K, K_f, eps,
    HAS_RES: tl.constexpr, NUM_W: tl.constexpr,
    HAS_B0: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    row0 = tl.program_id(1) * ROWS
    rstd = _row_rstd(x_ptr, res_ptr, res_out_ptr, row0, M, K, K_f, eps, pid == 0, HAS_RES, ROWS, BLOCK_K)
    # Blocks [0, NB0) belong to weight 0, [NB0, NB0 + NB1) to weight 1, the rest to weight 2.
    if pid < NB0:
        _linear_block(x_ptr, res_ptr, nw_ptr, rstd, w0_ptr, b0_ptr, o0_ptr, row0, M, N0, K, pid * BLOCK_N,
                      True, HAS_RES, HAS_B0, ROWS, BLOCK_N, BLOCK_K)
    elif pid < NB0 + NB1:
        if NUM_W >= 2:
            _linear_block(x_ptr, res_ptr, nw_ptr, rstd, w1_ptr, b1_ptr, o1_ptr, row0, M, N1, K,
                          (pid - NB0) * BLOCK_N, True, HAS_RES, HAS_B1, ROWS, BLOCK_N, BLOCK_K)
    else:
        if NUM_W >= 3:
            _linear_block(x_ptr, res_ptr, nw_ptr, rstd, w2_ptr, b2_ptr, o2_ptr, row0, M, N2, K,
                          (pid - NB0 - NB1) * BLOCK_N, True, HAS_RES, HAS_B2, ROWS, BLOCK_N, BLOCK_K)


@triton.jit(do_not_specialize=["M"])
def _rms_norm_gate_up_kernel(
    x_ptr, res_ptr, nw_ptr, res_out_ptr, gate_ptr, up_ptr, act_ptr,
    N, M, K, K_f, eps,
    HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    row0 = tl.program_id(1) * ROWS
    rstd = _row_rstd(x_ptr, res_ptr, res_out_ptr, row0, M, K, K_f, eps, pid == 0, HAS_RES, ROWS, BLOCK_K)
    n0 = pid * BLOCK_N
    g, u = _accumulate(x_ptr, res_ptr, nw_ptr, rstd, gate_ptr, up_ptr, row0, M, N, K, n0,
                       True, HAS_RES, True, ROWS, BLOCK_N, BLOCK_K)
    dtype = act_ptr.dtype.element_ty
    g = g.to(dtype).to(tl.float32)                 # F.linear's outputs, in x.dtype
    u = u.to(dtype).to(tl.float32)
    # silu in fp32 as torch computes it (x / (1 + exp(-x))), rounded, then the product rounded.
    sg = tl.div_rn(g, 1.0 + tl.exp(-g)).to(dtype).to(tl.float32)
    n = n0 + tl.arange(0, BLOCK_N)
    rows = row0 + tl.arange(0, ROWS)
    out = act_ptr + rows.to(tl.int64)[None, :] * N + n[:, None]
    tl.store(out, (sg * u).to(dtype), mask=(n < N)[:, None] & (rows < M)[None, :])


@triton.jit(do_not_specialize=["M"])
def _decode_linear_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, N, M, K,
    HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row0 = tl.program_id(1) * ROWS
    _linear_block(x_ptr, x_ptr, x_ptr, tl.zeros([ROWS], tl.float32), w_ptr, b_ptr, out_ptr, row0, M, N, K,
                  tl.program_id(0) * BLOCK_N, False, False, HAS_BIAS, ROWS, BLOCK_N, BLOCK_K)


def rms_norm_linear(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor, eps: float,
                    weights: List[torch.Tensor], biases: List[Optional[torch.Tensor]]
                    ) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """([out_i [..., N_i]], residual_out [..., K]): fused_add_rms_norm, then x_normed @ W_i^T + b_i.

    x, residual: [..., K] contiguous (residual may be None); norm_weight: [K]; weights: 1-3 of [N_i, K];
    biases: one [N_i] or None per weight; one dtype (fp32 / fp16 / bf16). One launch for all weights.
    """
    validate.rms_norm_linear(x, residual, norm_weight, eps, weights, biases)
    K = x.shape[-1]
    M = x.numel() // K
    lead = x.shape[:-1]
    outs = [x.new_empty((*lead, w.shape[0])) for w in weights]
    residual_out = torch.empty_like(x)
    Ns = [w.shape[0] for w in weights]
    block_n, block_k = _config(sum(Ns), K, x)
    nbs = [triton.cdiv(n, block_n) for n in Ns]
    # Unused slots get weight 0's tensors (same dtype) and N = 0 blocks: never read.
    pad = 3 - len(weights)
    ws = list(weights) + [weights[0]] * pad
    bs = [b if b is not None else w for b, w in zip(list(biases) + [None] * pad, ws)]  # dummy: never read
    os_ = outs + [outs[0]] * pad
    Ns_ = Ns + [0] * pad
    nbs_ = nbs + [0] * pad
    has_b = [b is not None for b in biases] + [False] * pad
    _rms_norm_linear_kernel[(sum(nbs), triton.cdiv(M, ROWS))](
        x, residual if residual is not None else x,  # dummy pointer, never read when HAS_RES=False
        norm_weight, residual_out,
        ws[0], bs[0], os_[0], ws[1], bs[1], os_[1], ws[2], bs[2], os_[2],
        Ns_[0], Ns_[1], Ns_[2], nbs_[0], nbs_[1], M, K, float(K), float(eps),
        HAS_RES=residual is not None, NUM_W=len(weights),
        HAS_B0=has_b[0], HAS_B1=has_b[1], HAS_B2=has_b[2],
        ROWS=ROWS, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=NUM_WARPS,
    )
    return outs, residual_out


def rms_norm_gate_up(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor, eps: float,
                     gate: torch.Tensor, up: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(act [..., I], residual_out [..., K]): act = silu(xn @ gate^T) * (xn @ up^T), xn = the normed x.

    x, residual: [..., K] contiguous (residual may be None); norm_weight: [K]; gate, up: [I, K]; one dtype.
    """
    validate.rms_norm_gate_up(x, residual, norm_weight, eps, gate, up)
    K = x.shape[-1]
    M = x.numel() // K
    N = gate.shape[0]
    act = x.new_empty((*x.shape[:-1], N))
    residual_out = torch.empty_like(x)
    # Each program reads BLOCK_N rows of gate and the same rows of up (two tiles in flight per step).
    block_n, block_k = _config(N, K, x)
    _rms_norm_gate_up_kernel[(triton.cdiv(N, block_n), triton.cdiv(M, ROWS))](
        x, residual if residual is not None else x, norm_weight, residual_out, gate, up, act,
        N, M, K, float(K), float(eps),
        HAS_RES=residual is not None, ROWS=ROWS, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=NUM_WARPS,
    )
    return act, residual_out


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear(x, weight, bias) for few rows: x [..., K] contiguous; weight [N, K]; bias [N] or None."""
    validate.decode_linear(x, weight, bias)
    K = x.shape[-1]
    M = x.numel() // K
    N = weight.shape[0]
    out = x.new_empty((*x.shape[:-1], N))
    block_n, block_k = _config(N, K, x)
    _decode_linear_kernel[(triton.cdiv(N, block_n), triton.cdiv(M, ROWS))](
        x, weight, bias if bias is not None else weight, out, N, M, K,
        HAS_BIAS=bias is not None, ROWS=ROWS, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=NUM_WARPS,
    )
    return out
