"""Sampling ops in Triton (definitions: kangaroo_ext/ops/reference.py sampling_probs, sample_logits,
speculative_sample_accept).

One program per logit row finds the row's distribution without a sorted copy, streaming the row once
per pass (see csrc/kernels/sampling.cuh for the same search with the row in shared memory):
    p_i = z_i >= keep_min ? exp(z_i - max_z) / total : 0,      z_i = logit_i / T
  pass 1        max, min, NaN / +inf
  top-k search  bisection on the ordered bit patterns of z for the k-th largest value: each pass counts
                the values >= mid and snaps lo / hi to the nearest values on either side, so the interval
                at least halves and ends exactly on an element value (<= 32 passes; 0 < top_k < V only)
  weight pass   w_i = exp(z_i - max_z) above the top-k threshold, their sum
  top-p search  bisection on w for the smallest weight whose strictly heavier tokens weigh < top_p
                (<= 31 passes; top_p < 1 only)
  kept pass     the kept weights' sum, and keep_min = the smallest kept z, so later passes decide
                "kept" by one exact comparison on z instead of recomputing a threshold on exp
Random numbers: Philox4x32-10 on counter (i // 4, row, stream, offset), word i % 4,
u = ((word >> 9) + 0.5) * 2^-23; a sample is the exponential race argmax p_i / -log(u_i).

Launches (torch allocations only, no host sync: CUDA-graph capturable):
  sampling_probs, sample_logits: _probs_kernel, one program per row.
  speculative_sample_accept: _row_stats_kernel, one program per (b, j) row, writes 4 floats per row;
  _accept_kernel, one program per b: the accept tests u_j * q_j(x_j) < p_j(x_j), a = the first
  rejection, and one pass over row a racing max(0, p_a - q_a) and p_a (fallback and bonus).

On a GPU exp and log come from libdevice (correctly rounded to within 1 ulp, as CUDA's expf/logf); the
CPU interpreter has no libdevice and uses tl.exp / tl.log (numpy).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..ops import validate
from ..ops.reference import ACCEPT_STREAM

# Vocabulary chunk per loop step: one program streams its whole row every pass.
MAX_BLOCK_V = 4096
INT32_MAX = tl.constexpr(2147483647)
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)


@triton.jit
def _exp(x, ACCURATE: tl.constexpr):
    if ACCURATE:
        y = libdevice.exp(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def _log(x, ACCURATE: tl.constexpr):
    if ACCURATE:
        y = libdevice.log(x)
    else:
        y = tl.log(x)
    return y


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Salmon et al. 2011): uint32 counter blocks c0..c3, uint32 key (k0, k1)."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def _uniform(rng_ptr, row, stream, idx):
    """reference.uniform(seed, offset, row, stream, idx) for a block of element indices idx >= 0."""
    seed = tl.load(rng_ptr)
    offset = tl.load(rng_ptr + 1)
    zero = tl.zeros(idx.shape, tl.uint32)
    c0 = (idx // 4).to(tl.uint32)
    c1 = zero + row.to(tl.uint32)
    c2 = zero + stream  # a uint32 block plus an int: uint32
    c3 = zero + (offset & 0xFFFFFFFF).to(tl.uint32)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    x0, x1, x2, x3 = _philox(c0, c1, c2, c3, k0, k1)
    lane = idx % 4
    word = tl.where(lane == 0, x0, tl.where(lane == 1, x1, tl.where(lane == 2, x2, x3)))
    return ((word >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # exact: (m + 0.5) * 2^-23


@triton.jit
def _scaled_logits(row_ptr, offs, V, temperature):
    """z = logit / T (IEEE division, as torch) for a chunk; + 0 turns -0 into +0 (one bit pattern per value)."""
    valid = offs < V
    x = tl.load(row_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    return tl.math.div_rn(x, temperature) + 0.0, valid


@triton.jit
def _ordered_key(x):
    """float32 (no NaN) -> int64 with the same order."""
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _from_ordered_key(k):
    b = k.to(tl.int32)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _weights(row_ptr, offs, V, temperature, max_z, top_k_min, ACCURATE: tl.constexpr):
    z, valid = _scaled_logits(row_ptr, offs, V, temperature)
    w = tl.where(valid & (z >= top_k_min), _exp(z - max_z, ACCURATE), 0.0)
    return z, w, valid


@triton.jit
def _row_stats(row_ptr, V, temperature, top_k, top_p, BLOCK_V: tl.constexpr, ACCURATE: tl.constexpr):
    """(max_z, keep_min, total, bad) of one row: p_i = z_i >= keep_min ? exp(z_i - max_z) / total : 0."""
    cols = tl.arange(0, BLOCK_V)
    lo = float("inf")
    hi = float("-inf")
    num_bad = 0
    for start in range(0, V, BLOCK_V):
        z, valid = _scaled_logits(row_ptr, start + cols, V, temperature)
        num_bad += tl.sum((valid & ~(z < float("inf"))).to(tl.int32), axis=0)  # NaN or +inf
        hi = tl.maximum(hi, tl.max(tl.where(valid, z, float("-inf")), axis=0))
        lo = tl.minimum(lo, tl.min(tl.where(valid, z, float("inf")), axis=0))
    bad = (num_bad > 0) | (hi == float("-inf"))
    max_z = tl.where(bad, 0.0, hi)

    # top-k: the largest element value t with #{z >= t} >= k. lo <= answer <= hi, both element values.
    do_top_k = (top_k > 0) & (top_k < V) & ~bad
    lo = tl.where(do_top_k, lo, 0.0)
    hi = tl.where(do_top_k, hi, 0.0)
    while lo < hi:
        k_lo = _ordered_key(lo)
        mid = _from_ordered_key(k_lo + (_ordered_key(hi) - k_lo + 1) // 2)  # lo < mid <= hi
        count = 0
        above = float("inf")
        below = float("-inf")
        for start in range(0, V, BLOCK_V):
            z, valid = _scaled_logits(row_ptr, start + cols, V, temperature)
            ge = valid & (z >= mid)
            count += tl.sum(ge.to(tl.int32), axis=0)
            above = tl.minimum(above, tl.min(tl.where(ge, z, float("inf")), axis=0))
            below = tl.maximum(below, tl.max(tl.where(valid & (z < mid), z, float("-inf")), axis=0))
        enough = count >= top_k  # then the answer is >= the smallest value >= mid; else < mid
        lo = tl.where(enough, above, lo)
        hi = tl.where(enough, hi, below)
    top_k_min = tl.where(do_top_k, lo, float("-inf"))

    total = 0.0
    w_min = float("inf")
    for start in range(0, V, BLOCK_V):
        z, w, valid = _weights(row_ptr, start + cols, V, temperature, max_z, top_k_min, ACCURATE)
        total += tl.sum(w, axis=0)
        w_min = tl.minimum(w_min, tl.min(tl.where(valid, w, float("inf")), axis=0))

    # top-p: the smallest weight t (an element's) with sum(w > t) / total < top_p; the top token's
    # weight exp(0) = 1 always qualifies.
    do_top_p = (top_p < 1.0) & ~bad
    lo = tl.where(do_top_p, w_min, 0.0)
    hi = tl.where(do_top_p, 1.0, 0.0)
    while lo < hi:
        k_lo = _ordered_key(lo)
        mid = _from_ordered_key(k_lo + (_ordered_key(hi) - k_lo) // 2)  # lo <= mid < hi
        mass = 0.0
        above = float("inf")
        below = float("-inf")
        for start in range(0, V, BLOCK_V):
            z, w, valid = _weights(row_ptr, start + cols, V, temperature, max_z, top_k_min, ACCURATE)
            gt = valid & (w > mid)
            mass += tl.sum(tl.where(gt, w, 0.0), axis=0)
            above = tl.minimum(above, tl.min(tl.where(gt, w, float("inf")), axis=0))
            below = tl.maximum(below, tl.max(tl.where(valid & (w <= mid), w, float("-inf")), axis=0))
        fewer = tl.math.div_rn(mass, total) < top_p  # then the answer is <= the largest value <= mid
        hi = tl.where(fewer, below, hi)
        lo = tl.where(fewer, lo, above)
    top_p_min = tl.where(do_top_p, lo, 0.0)

    kept_total = 0.0
    keep_min = float("inf")
    for start in range(0, V, BLOCK_V):
        z, w, valid = _weights(row_ptr, start + cols, V, temperature, max_z, top_k_min, ACCURATE)
        kept = valid & (z >= top_k_min) & (w >= top_p_min)
        kept_total += tl.sum(tl.where(kept, w, 0.0), axis=0)
        keep_min = tl.minimum(keep_min, tl.min(tl.where(kept, z, float("inf")), axis=0))
    return max_z, keep_min, kept_total, bad


@triton.jit
def _probs(row_ptr, offs, V, temperature, max_z, keep_min, total, ACCURATE: tl.constexpr):
    z, valid = _scaled_logits(row_ptr, offs, V, temperature)
    p = tl.where(valid & (z >= keep_min), tl.math.div_rn(_exp(z - max_z, ACCURATE), total), 0.0)
    return p, valid


@triton.jit
def _race_step(best, best_idx, weight, clock, offs):
    """Lane-wise race state: each lane sees increasing offsets, so a strict > keeps its first best."""
    key = tl.where(weight > 0, tl.math.div_rn(weight, clock), -1.0)
    better = key > best
    return tl.where(better, key, best), tl.where(better, offs, best_idx)


@triton.jit
def _race_winner(best, best_idx):
    top = tl.max(best, axis=0)
    first = tl.min(tl.where(best == top, best_idx, INT32_MAX), axis=0)
    return tl.where(top > 0, first.to(tl.int64), -1)


# Integer arguments that Triton would otherwise specialize (e.g. to a constant 1) stay runtime values.
@triton.jit(do_not_specialize=["V", "top_k", "stream"])
def _probs_kernel(logits_ptr, probs_ptr, token_ptr, top_prob_ptr, rng_ptr, V, temperature, top_k, top_p, stream,
                  SAMPLE: tl.constexpr, BLOCK_V: tl.constexpr, ACCURATE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * V
    max_z, keep_min, total, bad = _row_stats(row_ptr, V, temperature, top_k, top_p, BLOCK_V, ACCURATE)
    cols = tl.arange(0, BLOCK_V)
    best = tl.full([BLOCK_V], -1.0, tl.float32)
    best_idx = tl.full([BLOCK_V], INT32_MAX, tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        p, valid = _probs(row_ptr, offs, V, temperature, max_z, keep_min, total, ACCURATE)
        p = tl.where(bad, float("nan"), p)
        tl.store(probs_ptr + row * V + offs, p, mask=valid)
        if SAMPLE:
            clock = -_log(_uniform(rng_ptr, row, stream, offs), ACCURATE)
            best, best_idx = _race_step(best, best_idx, p, clock, offs)
    if SAMPLE:
        tl.store(token_ptr + row, tl.where(bad, -1, _race_winner(best, best_idx)))
        # The top token's weight is exp(0) = 1 exactly: the largest probability is 1 / total.
        tl.store(top_prob_ptr + row, tl.where(bad, float("nan"), tl.math.div_rn(1.0, total)))


@triton.jit(do_not_specialize=["V", "top_k"])
def _row_stats_kernel(logits_ptr, stats_ptr, V, temperature, top_k, top_p,
                      BLOCK_V: tl.constexpr, ACCURATE: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    max_z, keep_min, total, bad = _row_stats(logits_ptr + r * V, V, temperature, top_k, top_p, BLOCK_V, ACCURATE)
    tl.store(stats_ptr + r * 4, max_z)
    tl.store(stats_ptr + r * 4 + 1, keep_min)
    tl.store(stats_ptr + r * 4 + 2, total)
    tl.store(stats_ptr + r * 4 + 3, bad.to(tl.float32))


@triton.jit(do_not_specialize=["K", "V", "accept_stream"])
def _accept_kernel(logits_ptr, stats_ptr, draft_ptr, q_ptr, num_drafted_ptr, rng_ptr, accepted_ptr, committed_ptr,
                   K, V, temperature, accept_stream, HAS_NUM_DRAFTED: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_V: tl.constexpr, ACCURATE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    if HAS_NUM_DRAFTED:
        n = tl.minimum(tl.maximum(tl.load(num_drafted_ptr + b), 0), K).to(tl.int32)
    else:
        n = K
    j = tl.arange(0, BLOCK_K)  # positions 0..k, padded to a power of two
    in_row = j < K + 1
    tested = j < n
    rows = b * (K + 1) + j
    x = tl.load(draft_ptr + b * K + j, mask=j < K, other=-1)
    in_vocab = tested & (x >= 0) & (x < V)  # a draft outside the vocabulary has p = q = 0: rejected
    x_safe = tl.where(in_vocab, x, 0)
    max_z = tl.load(stats_ptr + rows * 4, mask=in_row, other=0.0)
    keep_min = tl.load(stats_ptr + rows * 4 + 1, mask=in_row, other=0.0)
    total = tl.load(stats_ptr + rows * 4 + 2, mask=in_row, other=1.0)
    bad = tl.max(tl.load(stats_ptr + rows * 4 + 3, mask=in_row & (j <= n), other=0.0), axis=0) > 0

    z_x = tl.math.div_rn(tl.load(logits_ptr + rows * V + x_safe, mask=in_vocab, other=0.0).to(tl.float32),
                         temperature) + 0.0
    p_x = tl.where(in_vocab & (z_x >= keep_min), tl.math.div_rn(_exp(z_x - max_z, ACCURATE), total), 0.0)
    q_x = tl.load(q_ptr + (b * K + j) * V + x_safe, mask=in_vocab, other=0.0)
    u = _uniform(rng_ptr, b, accept_stream, j)
    accept = in_vocab & (u * q_x < p_x)  # u < min(1, p / q) without dividing
    a = tl.min(tl.where(tested & ~accept, j, n), axis=0)  # the first rejection, or n

    # Row a: race max(0, p_a - q_a) after a rejection, and p_a (the fallback when that is all zero,
    # and the bonus token when a == n), with the same clocks.
    rejected = a < n
    row_a = b * (K + 1) + a
    max_a = tl.load(stats_ptr + row_a * 4)
    keep_a = tl.load(stats_ptr + row_a * 4 + 1)
    total_a = tl.load(stats_ptr + row_a * 4 + 2)
    q_row = q_ptr + (b * K + tl.minimum(a, K - 1)) * V
    cols = tl.arange(0, BLOCK_V)
    best_r = tl.full([BLOCK_V], -1.0, tl.float32)
    best_r_idx = tl.full([BLOCK_V], INT32_MAX, tl.int32)
    best_p = tl.full([BLOCK_V], -1.0, tl.float32)
    best_p_idx = tl.full([BLOCK_V], INT32_MAX, tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        p, valid = _probs(logits_ptr + row_a * V, offs, V, temperature, max_a, keep_a, total_a, ACCURATE)
        q = tl.load(q_row + offs, mask=valid & rejected, other=0.0)
        clock = -_log(_uniform(rng_ptr, b, accept_stream + 1, offs), ACCURATE)
        best_p, best_p_idx = _race_step(best_p, best_p_idx, p, clock, offs)
        residual = tl.where(rejected, tl.maximum(p - q, 0.0), 0.0)
        best_r, best_r_idx = _race_step(best_r, best_r_idx, residual, clock, offs)
    token_r = _race_winner(best_r, best_r_idx)
    token = tl.where(token_r >= 0, token_r, _race_winner(best_p, best_p_idx))

    committed = tl.where(j < a, x, tl.where(j == a, token, -1))
    tl.store(committed_ptr + b * (K + 1) + j, tl.where(bad, -1, committed), mask=in_row)
    tl.store(accepted_ptr + b, tl.where(bad, -1, a.to(tl.int64)))


def _launch_settings(V: int, device: torch.device):
    block_v = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    return dict(BLOCK_V=block_v, ACCURATE=device.type == "cuda", num_warps=8 if block_v >= 2048 else 4)


def _probs_call(logits, temperature, top_k, top_p, rng, stream, sample: bool):
    V = logits.shape[-1]
    rows = logits.numel() // V
    probs = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    lead = logits.shape[:-1]
    token = torch.empty(lead, dtype=torch.int64, device=logits.device) if sample else probs
    top_prob = torch.empty(lead, dtype=torch.float32, device=logits.device) if sample else probs
    _probs_kernel[(rows,)](logits, probs, token, top_prob, rng if sample else logits, V, float(temperature),
                           int(top_k), float(top_p), int(stream), SAMPLE=sample,
                           **_launch_settings(V, logits.device))
    return token, probs, top_prob


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """probs [..., V] float32 from logits [..., V] (fp32/fp16/bf16, contiguous)."""
    validate.sampling_probs(logits, temperature, top_k, top_p)
    return _probs_call(logits, temperature, top_k, top_p, None, 0, sample=False)[1]


def sample_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, rng: torch.Tensor,
                  stream: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token [...] int64, probs [..., V] float32, top_prob [...] float32); rng: int64 [2] (seed, offset)."""
    validate.sample_logits(logits, temperature, top_k, top_p, rng, stream)
    return _probs_call(logits, temperature, top_k, top_p, rng, stream, sample=True)


def speculative_sample_accept(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_logits: torch.Tensor,
                              num_drafted: Optional[torch.Tensor], temperature: float, top_k: int, top_p: float,
                              rng: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(accepted [B] int64, committed [B, k+1] int64); shapes as in kangaroo_ext.ops."""
    validate.speculative_sample_accept(draft_tokens, draft_probs, target_logits, num_drafted, temperature, top_k,
                                       top_p, rng)
    B, k = draft_tokens.shape
    V = target_logits.shape[-1]
    device = draft_tokens.device
    stats = torch.empty((B * (k + 1), 4), dtype=torch.float32, device=device)
    accepted = torch.empty((B,), dtype=torch.int64, device=device)
    committed = torch.empty((B, k + 1), dtype=torch.int64, device=device)
    settings = _launch_settings(V, device)
    _row_stats_kernel[(B * (k + 1),)](target_logits, stats, V, float(temperature), int(top_k), float(top_p),
                                      **settings)
    _accept_kernel[(B,)](
        target_logits, stats, draft_tokens, draft_probs,
        num_drafted if num_drafted is not None else draft_tokens,  # dummy, unread when HAS_NUM_DRAFTED=False
        rng, accepted, committed, k, V, float(temperature), ACCEPT_STREAM,
        HAS_NUM_DRAFTED=num_drafted is not None, BLOCK_K=triton.next_power_of_2(k + 1), **settings)
    return accepted, committed
