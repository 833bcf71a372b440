"""Fused LM head + argmax + confidence in Triton (the definition is kangaroo_ext/ops/reference.py).

For each of the R rows of hidden [..., H] and lm_head W [V, H]:
    logit_v    = round_to_dtype(fp32 dot(hidden_row, W[v]))       (as F.linear, then .float())
    token      = argmax_v logit_v          (torch.argmax: first maximum; NaN ranks above every number)
    confidence = 1 / sum_v exp(logit_v - max_v logit_v)             (fp32)

The logits never reach memory. Two launches, CUDA-graph capturable (torch allocations, no host sync):
  1. _partial_kernel, one program per (BLOCK_V slice of the vocabulary, BLOCK_R rows): streams its
     BLOCK_V weight rows once over H in BLOCK_H chunks (tensor-core dot W[BLOCK_V, BLOCK_H] x
     hidden^T[BLOCK_H, BLOCK_R], fp32 accumulation), rounds the logits to the model dtype and writes,
     per row, its partial state (max, first index of the max, sum of exp relative to that max).
     With R <= 16 rows (decode and verify) every weight row is read exactly once: the op is one pass
     over the V x H weight matrix at memory bandwidth.
  2. _merge_kernel, one program per row: merges the cdiv(V, BLOCK_V) partial states (smallest index
     among equal maxima, sums rescaled to the global max) and writes token and confidence.

Special values follow torch on the materialised logits: any NaN gives the first NaN's index and a NaN
confidence; all -inf gives index 0 and NaN; a +inf maximum gives NaN confidence (inf - inf).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..ops import validate
from . import resources

# Vocabulary rows per program, hidden columns per loop step, rows per program. A 128 x 64 bf16 weight
# tile is 16 KB per pipeline stage; V = 49152 gives 384 programs (~3 per SM on an H100) each reading
# 128 x H weights. BLOCK_R = 16 is the smallest tl.dot N; decode and verify have 1-8 rows.
# Module-level so tests can lower BLOCK_V to exercise many partials on small vocabularies.
BLOCK_V = 128
BLOCK_H = 64
BLOCK_R = 16
NUM_STAGES = 4   # fewer where the device's shared memory needs it (fp32 at 4 stages: 108 KB; see stages())
# Under TRITON_INTERPRET=1 (CPU tensors) the cost is per program and per loop step, not per byte:
# 512-row slices run V = 49152 about 2-3x faster there than 128 (measured: ~4-7 s vs ~10-18 s for 5
# rows, H = 576). On a GPU 512 x 64 tiles would need 64 KB per pipeline stage, hence two settings.
INTERPRET_BLOCK_V = 512
# Partials merged per loop step of the merge kernel.
MAX_BLOCK_P = 1024
INT32_BIG = tl.constexpr(2147483647)


@triton.jit
def _partial_kernel(
    h_ptr, w_ptr, pm_ptr, ps_ptr, pi_ptr,
    R, V, H, NBLK,
    BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
):
    vb = tl.program_id(0)
    rb = tl.program_id(1)
    v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = v < V
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    kk = tl.arange(0, BLOCK_H)
    w_rows = w_ptr + v.to(tl.int64)[:, None] * H            # int64: V * H can pass 2**31
    h_cols = h_ptr + r.to(tl.int64)[None, :] * H

    acc = tl.zeros([BLOCK_V, BLOCK_R], tl.float32)          # logits^T: vocabulary along the rows
    for k0 in range(0, H, BLOCK_H):
        k = k0 + kk
        k_ok = k < H
        w = tl.load(w_rows + k[None, :], mask=v_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(h_cols + k[:, None], mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(w, x, acc, input_precision="ieee")   # fp32 model: no TF32
        else:
            acc = tl.dot(w, x, acc)

    # F.linear returns logits in the model dtype; the reference then upcasts them.
    x = acc.to(w_ptr.dtype.element_ty).to(tl.float32)
    x = tl.where(v_ok[:, None], x, float("-inf"))
    is_nan = x != x
    m_num = tl.max(tl.where(is_nan, float("-inf"), x), axis=0)          # [BLOCK_R], NaNs ignored
    # A slice whose logits are all -inf contributes a zero sum; the merge makes an all -inf row NaN.
    m_sub = tl.where(m_num == float("-inf"), 0.0, m_num)
    s = tl.sum(tl.where(v_ok[:, None], tl.exp(x - m_sub[None, :]), 0.0), axis=0)   # NaN if a NaN / +inf max
    first_nan = tl.min(tl.where(is_nan, v[:, None], INT32_BIG), axis=0)
    first_max = tl.min(tl.where(v_ok[:, None] & (x == m_num[None, :]), v[:, None], INT32_BIG), axis=0)
    has_nan = first_nan != INT32_BIG
    m = tl.where(has_nan, float("nan"), m_num)
    idx = tl.where(has_nan, first_nan, first_max)

    st = r.to(tl.int64) * NBLK + vb                      # workspace [R, NBLK], row-major
    tl.store(pm_ptr + st, m, mask=r_ok)
    tl.store(ps_ptr + st, s, mask=r_ok)
    tl.store(pi_ptr + st, idx, mask=r_ok)


@triton.jit
def _merge_kernel(pm_ptr, ps_ptr, pi_ptr, token_ptr, conf_ptr, NBLK, BLOCK_P: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * NBLK
    j0 = tl.arange(0, BLOCK_P)

    # Pass 1: the largest non-NaN maximum, and the first NaN (a slice's index is its first NaN).
    lane_max = tl.full([BLOCK_P], float("-inf"), tl.float32)
    lane_nan = tl.full([BLOCK_P], INT32_BIG, tl.int32)
    for p0 in range(0, NBLK, BLOCK_P):
        j = p0 + j0
        ok = j < NBLK
        m = tl.load(pm_ptr + base + j, mask=ok, other=float("-inf"))
        i = tl.load(pi_ptr + base + j, mask=ok, other=INT32_BIG)
        nan = m != m
        lane_max = tl.maximum(lane_max, tl.where(nan, float("-inf"), m))
        lane_nan = tl.minimum(lane_nan, tl.where(nan, i, INT32_BIG))
    top = tl.max(lane_max, axis=0)
    first_nan = tl.min(lane_nan, axis=0)

    # Pass 2: sums rescaled to the top, and the smallest index among the slices holding the top.
    # Slices are disjoint and each reports its first maximum, so that is the first global maximum.
    lane_sum = tl.zeros([BLOCK_P], tl.float32)
    lane_idx = tl.full([BLOCK_P], INT32_BIG, tl.int32)
    for p0 in range(0, NBLK, BLOCK_P):
        j = p0 + j0
        ok = j < NBLK
        m = tl.load(pm_ptr + base + j, mask=ok, other=float("-inf"))
        s = tl.load(ps_ptr + base + j, mask=ok, other=0.0)
        i = tl.load(pi_ptr + base + j, mask=ok, other=INT32_BIG)
        at_top = ok & (m == top)
        # m == top gives factor 1 exactly (also when both are -inf, where exp2 would give NaN).
        lane_sum += tl.where(ok, s * tl.where(at_top, 1.0, tl.exp(m - top)), 0.0)
        lane_idx = tl.minimum(lane_idx, tl.where(at_top, i, INT32_BIG))
    total = tl.sum(lane_sum, axis=0)
    first_top = tl.min(lane_idx, axis=0)

    has_nan = first_nan != INT32_BIG
    token = tl.where(has_nan, first_nan, first_top)
    # torch: exp(logits - max) is NaN everywhere when the max is NaN or -inf (and inf - inf at +inf,
    # which `total` already carries).
    conf = tl.where(has_nan | (top == float("-inf")), float("nan"), 1.0 / total)
    tl.store(token_ptr + row, token.to(tl.int64))
    tl.store(conf_ptr + row, conf)


def _blocks(V: int, H: int, on_cpu: bool) -> Tuple[int, int]:
    block_v = INTERPRET_BLOCK_V if on_cpu else BLOCK_V
    block_v = min(block_v, max(16, triton.next_power_of_2(V)))   # tl.dot needs M >= 16
    block_h = min(BLOCK_H, max(16, triton.next_power_of_2(H)))
    return block_v, block_h


def stages(block_v: int, block_h: int, element_size: int, limit: Optional[int]) -> Tuple[int, str]:
    """(pipeline stages of the partial kernel, '' or why even one stage does not fit `limit` bytes).
    The most stages up to NUM_STAGES that fit: each holds a weight tile in flight."""
    if limit is None:
        return NUM_STAGES, ""
    for n in range(NUM_STAGES, 0, -1):
        if resources.lm_head_partial_bytes(block_v, block_h, BLOCK_R, element_size, n) <= limit:
            return n, ""
    return 1, resources.shortfall(resources.lm_head_partial_bytes(block_v, block_h, BLOCK_R, element_size, 1), limit)


def shared_memory_reasons(hidden: torch.Tensor, lm_head: torch.Tensor) -> list:
    """Why this device cannot run these arguments' launch configuration ([] if it can)."""
    limit = resources.shared_memory_limit(hidden.device)
    if limit is None:
        return []
    block_v, block_h = _blocks(lm_head.shape[0], hidden.shape[-1], False)
    why = stages(block_v, block_h, hidden.element_size(), limit)[1]
    return [f"the LM-head kernel {why}"] if why else []


def lm_head_argmax(hidden: torch.Tensor, lm_head: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(token [...] int64, confidence [...] float32) for hidden [..., H] and lm_head [V, H]."""
    validate.lm_head_argmax(hidden, lm_head)
    H = hidden.shape[-1]
    V = lm_head.shape[0]
    R = hidden.numel() // H
    lead = hidden.shape[:-1]
    device = hidden.device
    token = torch.empty(lead, dtype=torch.int64, device=device)
    conf = torch.empty(lead, dtype=torch.float32, device=device)

    block_v, block_h = _blocks(V, H, device.type == "cpu")
    num_stages, why = stages(block_v, block_h, hidden.element_size(), resources.shared_memory_limit(device))
    if why:  # ops/ never gets here (resource reasons); a direct call gets the numbers, not OutOfResources
        raise RuntimeError(f"lm_head_argmax (Triton): the LM-head kernel {why}")
    nblk = triton.cdiv(V, block_v)
    part_m = torch.empty((R, nblk), dtype=torch.float32, device=device)
    part_s = torch.empty_like(part_m)
    part_i = torch.empty((R, nblk), dtype=torch.int32, device=device)

    _partial_kernel[(nblk, triton.cdiv(R, BLOCK_R))](
        hidden, lm_head, part_m, part_s, part_i,
        R, V, H, nblk,
        BLOCK_V=block_v, BLOCK_H=block_h, BLOCK_R=BLOCK_R, IEEE=hidden.dtype == torch.float32,
        # 4 warps (one warpgroup) per 128 x 16 output tile; up to NUM_STAGES weight tiles in flight per
        # program (4 x 16 KB in bf16) so a memory-bound GEMV keeps enough bytes in flight per SM.
        num_warps=4, num_stages=num_stages,
    )
    block_p = min(MAX_BLOCK_P, triton.next_power_of_2(nblk))
    _merge_kernel[(R,)](
        part_m, part_s, part_i, token, conf, nblk,
        BLOCK_P=block_p,
        num_warps=4 if block_p >= 512 else 1,
    )
    return token, conf
