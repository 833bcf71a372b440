"""Greedy verify-and-accept in Triton (the definition is kangaroo_ext/ops/reference.py).

For each batch row b, with t_j = argmax_v target_logits[b, j, v] (torch.argmax semantics: the first
maximum wins, and NaN ranks above every number, the first NaN winning):
    a = number of leading j < n_b with draft[b, j] == t_j        (n_b = clamp(num_drafted[b], 0, k))
    committed[b, j] = draft[b, j] (j < a), t_a (j == a), -1 (j > a)

Two launches, both CUDA-graph capturable (torch allocations only, no host sync):
  1. _argmax_kernel: one program per (b, j) row, B*(k+1) of them, streaming V in chunks. It writes
     t_j straight into `committed`, which doubles as the scratch buffer for the targets.
  2. _accept_kernel: one program per batch row; reads its row of targets and overwrites it in place.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..ops import validate

# Chunk of the vocabulary read per loop step, and the warps reading it. One program streams a whole
# row, so it is bound by the bytes one SM keeps in flight, not by HBM bandwidth: wide chunks over many
# warps win. Measured on an H200 (triton 3.6, bf16, V = 49152, 5 or 24 rows, inside a CUDA graph):
# 8192/16 warps 5.9 us, 8192/8 6.0, 4096/16 6.2, 4096/8 8.1, 2048/32 5.5 (best, but 2 values per
# thread). 8192/16 is 16 values per thread (two 16-byte loads in bf16) in 6 steps for V = 49152.
MAX_BLOCK_V = 8192
# "No index yet": larger than any real position. A constexpr, since @triton.jit reads only those
# from module globals.
INT32_MAX = tl.constexpr(2147483647)


@triton.jit
def _argmax_kernel(logits_ptr, target_ptr, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row = b * (k+1) + j; int64 because row * V can pass 2**31
    row_ptr = logits_ptr + row * V
    cols = tl.arange(0, BLOCK_V)

    # Lane-wise running state: lane l sees positions l, l + BLOCK_V, ... in increasing order, so
    # "replace only if strictly better" keeps the lane's *first* best. The cross-lane reduction then
    # happens once, after the loop, instead of once per chunk.
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK_V], INT32_MAX, tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        # Upcasting fp16/bf16 to fp32 is exact, so comparisons (and ties) are unchanged.
        v = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        v_nan = v != v
        best_nan = best != best
        # Better: larger; or NaN over a number (NaN is the top, and a lane keeps its first NaN); or
        # the lane has no index yet (so a row of all -inf still yields index 0, like torch).
        better = (v > best) | (v_nan & ~best_nan) | (best_idx == INT32_MAX)
        better = better & mask
        best = tl.where(better, v, best)
        best_idx = tl.where(better, offs, best_idx)

    # Cross-lane: a NaN anywhere wins, and the smallest NaN position is the first NaN. Otherwise take
    # the maximum and then the smallest position holding it. Done by hand rather than with tl.max /
    # tl.argmax because their NaN handling and tie-breaking are not documented guarantees.
    best_nan = best != best
    first_nan = tl.min(tl.where(best_nan, best_idx, INT32_MAX), axis=0)
    top = tl.max(tl.where(best_nan, float("-inf"), best), axis=0)
    first_top = tl.min(tl.where((best == top) & (best_idx != INT32_MAX), best_idx, INT32_MAX), axis=0)
    result = tl.where(first_nan != INT32_MAX, first_nan, first_top)
    tl.store(target_ptr + row, result.to(tl.int64))


@triton.jit
def _accept_kernel(draft_ptr, num_drafted_ptr, committed_ptr, accepted_ptr, K,
                   HAS_NUM_DRAFTED: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_K)          # positions 0..k (k+1 of them) padded to a power of two
    in_row = j < K + 1
    is_draft = j < K
    draft = tl.load(draft_ptr + b * K + j, mask=is_draft, other=-1)
    target = tl.load(committed_ptr + b * (K + 1) + j, mask=in_row, other=-1)  # t_j from _argmax_kernel
    if HAS_NUM_DRAFTED:
        n = tl.load(num_drafted_ptr + b)
        n = tl.minimum(tl.maximum(n, 0), K)  # clamp to [0, k], as the reference does
    else:
        n = K
    match = (draft == target) & is_draft & (j < n)
    # a = the first position that does not match (k if all k match). Positions j >= n never match,
    # so a <= n without a separate clamp.
    a = tl.min(tl.where(match, K, j), axis=0)
    a = tl.minimum(a, K)  # padding lanes j > k never decide a, but keep the bound explicit
    committed = tl.where(j < a, draft, tl.where(j == a, target, -1))
    # In-place: this program loaded its whole row above, and no other program touches it.
    tl.store(committed_ptr + b * (K + 1) + j, committed, mask=in_row)
    tl.store(accepted_ptr + b, a.to(tl.int64))


def verify_accept(draft_tokens: torch.Tensor, target_logits: torch.Tensor,
                  num_drafted: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification; returns (accepted [B] int64, committed [B, k+1] int64).

    draft_tokens: [B, k] int64; target_logits: [B, k+1, V] fp32/fp16/bf16, contiguous;
    num_drafted: [B] int64 or None (= k).
    """
    validate.verify_accept(draft_tokens, target_logits, num_drafted)
    B, k = draft_tokens.shape
    V = target_logits.shape[-1]
    device = draft_tokens.device
    accepted = torch.empty((B,), dtype=torch.int64, device=device)
    committed = torch.empty((B, k + 1), dtype=torch.int64, device=device)

    block_v = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    _argmax_kernel[(B * (k + 1),)](
        target_logits, committed, V,
        BLOCK_V=block_v,
        # Narrow vocabularies (tests, V = 111) need few threads; wide ones want many (see above).
        num_warps=16 if block_v >= 4096 else (8 if block_v >= 1024 else 4),
    )
    _accept_kernel[(B,)](
        draft_tokens,
        num_drafted if num_drafted is not None else draft_tokens,  # dummy, unread when HAS_NUM_DRAFTED=False
        committed, accepted, k,
        HAS_NUM_DRAFTED=num_drafted is not None,
        BLOCK_K=triton.next_power_of_2(k + 1),
        num_warps=1,  # at most a few dozen int64 lanes: one warp is plenty
    )
    return accepted, committed
