"""RoPE + KV-cache append + causal GQA attention for decode / verify steps, in Triton.

The definition is kangaroo_ext/ops/reference.py (rope_append_attention). Per call, with p = positions[b, t]:
    q, k  <- x * cos[p] + rotate_half(x) * sin[p]     (HF rounding: cos/sin, both products and the sum in x.dtype)
    k_cache[b, :, p], v_cache[b, :, p] <- k, v        (skipped when p is outside [0, S): memory-safe)
    out[b, t, h] = softmax_s(scale * q[b, t, h] . k_cache[b, h // G, s]) @ v_cache[b, h // G, s]
                   over keys s <= p (and s > p - window when window > 0); fp32 scores and softmax.

Launches (no host sync, torch allocations only, so the launcher can be captured in a CUDA graph):
  1. _rope_append_kernel, one program per (b, t, kv head): rotates the G query heads of that kv head
     into a q_rot buffer, rotates k, writes k and v into the caches. Its kernel boundary is what makes
     the new keys visible to every program of launch 2.
  2. _attn_split_kernel, one program per (b, kv head, key split, row block): the G query heads x T
     queries of that kv head are the rows of [BLOCK_R, BLOCK_D] tiles (GQA without repeating K/V: each
     cached key is read once per kv head and row block, not once per query head). Decode and verify
     steps have G x T <= MAX_BLOCK_R rows, one row block; a prefill's rows grow with the prompt and are
     cut into blocks so the tiles fit in shared memory (see resources.py). It streams its split's keys
     in BLOCK_N blocks with an online softmax (exp2, scale folded in) and tensor-core dots.
  3. _attn_merge_kernel, one program per (b, kv head, row block), only when the cache has more than
     one split: merges the splits' partial softmax states (max, sum, unnormalised output) and writes
     the output.

Why split the keys instead of one program per (b, kv head) looping to S: decode has B * Hkv of 3-16
programs for 132 SMs, and one program can only pull a small fraction of HBM bandwidth; splitting the
keys lets the whole GPU stream the cache. The split boundaries are fixed multiples of SPLIT_N (chosen
from S on the host), not derived from the positions: a key's split, hence the order in which a
query's keys are summed, does not depend on T or on the other queries' positions (the draft's T = 1
step and the verify step cut the keys alike), and no host read of `positions` is needed. The live key range [lo, hi) = [min p - window + 1, max p + 1) is
computed on the device: splits outside it do no work and are skipped by the merge, and no program
reads keys past max p (garbage in the unwritten part of the cache is never touched, save for masked
lanes of the last block, which read 0).
"""
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..ops import validate
from . import resources

# Keys per block of the attention loop. 64 keys x D = 128 in bf16 is 16 KB per K or V tile; the dots
# run on tensor cores (mma.sync: the tile has only 16-64 rows) and nothing spills at 4 warps (ptxas for
# sm_90a: 93-171 registers for 16-64 rows). fp32 uses exact fp32 dots (input_precision="ieee", no TF32),
# which Triton lowers to FMA loops holding both operands in registers: 64-key blocks spill up to
# ~18 KB per thread at 64 rows x D = 128 there, 16-key blocks over 8 warps spill nothing up to 32
# rows x D = 128 (and < 600 B at 64 rows).
BLOCK_N = 64
BLOCK_N_FP32 = 16
# Under TRITON_INTERPRET=1 (CPU tensors) the cost is per loop step, not per register: always 64.
INTERPRET_BLOCK_N = 64
# Query rows per program: at most this many (a power of two >= 16, tl.dot's smallest M), fewer where the
# device's shared memory needs it. 64 covers every decode and verify step of G <= 8 heads per kv head and
# gamma <= 7 in one block; fp32 at D = 128 then needs ~53 KB. The CPU interpreter pays per program, not
# per byte, so it takes larger blocks (module-level so tests can lower them to exercise several blocks).
MAX_BLOCK_R = 64
INTERPRET_MAX_BLOCK_R = 256
MIN_BLOCK = 16
# On a GPU every launch of at most this many query rows per kv head (G * T) takes this one row block (and one
# positions block, BLOCK_T), so a decode step (T = 1) and a verify step of up to INVARIANT_BLOCK_R // G tokens run the
# same compiled kernels: a row's dots, softmax sums and merge are the same instructions wherever it sits in the
# block; the key blocks past a row's position that a wider step adds are masked to exactly nothing (alpha 1, p 0),
# and so are the splits past it in the merge; so a verified row is bitwise the decode step's row (the engine's
# KANGAROO_TRITON_ATTENTION relies on it; tests/test_triton_attention_engine.py checks it on a GPU).
INVARIANT_BLOCK_R = 32
# Keys per split: the smallest split, and the most splits per (b, kv head). A cache of S keys is cut
# into max(cdiv(S, SPLIT_N), ...) splits of SPLIT_N = max(MIN_SPLIT_N, next_pow2(cdiv(S, MAX_SPLITS)))
# keys: 256 keys (4 blocks) per program keeps the per-program work above the launch cost while a
# 2k-8k context still spreads over 8-32 programs per kv head. Module-level so tests can lower them.
MIN_SPLIT_N = 256
MAX_SPLITS = 64
# Large enough to mean "no position" and still add safely in int32.
INT32_BIG = tl.constexpr(1 << 30)


def _pow2_at_least(x: int, floor: int) -> int:
    return max(floor, triton.next_power_of_2(x))


@triton.jit
def _rope(x, x_rot, sign, cos, sin, dtype: tl.constexpr):
    # HF: x * cos + rotate_half(x) * sin, each op rounded to x.dtype. For fp16/bf16 both products are
    # exact in fp32, so rounding each one to the dtype and then the fp32 sum gives torch's results bit for
    # bit (the .to(dtype) between the multiply and the add also stops any fma contraction).
    a = (x * cos).to(dtype).to(tl.float32)
    b = ((x_rot * sign) * sin).to(dtype).to(tl.float32)
    return (a + b).to(dtype)


@triton.jit
def _rope_append_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, q_rot_ptr,
    T, Hq, Hkv, G, S, S_TAB, D,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bt = tl.program_id(0).to(tl.int64)   # b * T + t
    kvh = tl.program_id(1).to(tl.int64)
    b = bt // T
    dtype = q_ptr.dtype.element_ty

    p = tl.load(pos_ptr + bt)            # int64, any value: checked before every use below
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    half = D // 2
    lower = d < half
    d_rot = tl.where(lower, d + half, d - half)     # rotate_half reads x[d + D/2] (negated) / x[d - D/2]
    sign = tl.where(lower, -1.0, 1.0)
    # The tables have S_TAB >= S rows; a position outside them rotates by garbage-free zeros (out of
    # contract anyway) instead of reading out of bounds.
    tab_ok = (p >= 0) & (p < S_TAB)
    tab = p * D + d
    cos = tl.load(cos_ptr + tab, mask=d_ok & tab_ok, other=0.0).to(dtype).to(tl.float32)  # HF: cos.to(q.dtype)
    sin = tl.load(sin_ptr + tab, mask=d_ok & tab_ok, other=0.0).to(dtype).to(tl.float32)

    # The G query heads of this kv head: [BLOCK_G, BLOCK_D].
    g = tl.arange(0, BLOCK_G)
    q_row = (bt * Hq + kvh * G + g) * D
    q_mask = (g < G)[:, None] & d_ok[None, :]
    x = tl.load(q_ptr + q_row[:, None] + d[None, :], mask=q_mask, other=0.0).to(tl.float32)
    xr = tl.load(q_ptr + q_row[:, None] + d_rot[None, :], mask=q_mask, other=0.0).to(tl.float32)
    qr = _rope(x, xr, sign[None, :], cos[None, :], sin[None, :], dtype)
    tl.store(q_rot_ptr + q_row[:, None] + d[None, :], qr, mask=q_mask)

    # k and v of this kv head: [BLOCK_D].
    kv_row = (bt * Hkv + kvh) * D
    x = tl.load(k_ptr + kv_row + d, mask=d_ok, other=0.0).to(tl.float32)
    xr = tl.load(k_ptr + kv_row + d_rot, mask=d_ok, other=0.0).to(tl.float32)
    kr = _rope(x, xr, sign, cos, sin, dtype)
    vv = tl.load(v_ptr + kv_row + d, mask=d_ok, other=0.0)
    write_ok = d_ok & (p >= 0) & (p < S)
    c_off = ((b * Hkv + kvh) * S + p) * D + d
    tl.store(kc_ptr + c_off, kr, mask=write_ok)
    tl.store(vc_ptr + c_off, vv, mask=write_ok)


@triton.jit
def _live_range(pos_ptr, b, T, S, window, HAS_WINDOW: tl.constexpr, BLOCK_T: tl.constexpr):
    """Keys [lo, hi) that some query of batch row b may see, and positions clamped for masking.

    Positions are clamped to [-1, S + window] in int64 before going to int32: for keys s in [0, S) this
    changes no visibility decision (s <= p and s > p - window), and wild int64 values cannot wrap."""
    t = tl.arange(0, BLOCK_T)
    t_ok = t < T
    p = tl.load(pos_ptr + b * T + t, mask=t_ok, other=-1)
    p = tl.minimum(tl.maximum(p, -1), S + window).to(tl.int32)
    hi = tl.minimum(tl.max(tl.where(t_ok, p, -1), axis=0) + 1, S)      # keys past max p are never read
    hi = tl.maximum(hi, 0)
    if HAS_WINDOW:
        lo = tl.maximum(tl.min(tl.where(t_ok, p, INT32_BIG), axis=0) - window + 1, 0)
    else:
        lo = hi * 0
    lo = tl.minimum(lo, hi)
    return lo, hi


@triton.jit
def _attn_split_kernel(
    q_ptr, kc_ptr, vc_ptr, pos_ptr, out_ptr, m_ptr, l_ptr, acc_ptr,
    T, Hq, Hkv, G, S, D, qk_scale, window, NUM_SPLITS,
    SPLIT_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr, HAS_WINDOW: tl.constexpr, SINGLE_SPLIT: tl.constexpr, IEEE: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)   # b * Hkv + kv head
    split = tl.program_id(1)
    b = bh // Hkv
    kvh = bh % Hkv

    # Rows r = g * T + t (query head kvh * G + g, query t), the reference's GQA row order; this program
    # takes the rows of its row block.
    r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    GT = G * T
    r_ok = r < GT
    g = r // T
    t = r % T
    p = tl.load(pos_ptr + b * T + t, mask=r_ok, other=-1)
    p = tl.minimum(tl.maximum(p, -1), S + window).to(tl.int32)   # as in _live_range; padding rows see nothing
    lo, hi = _live_range(pos_ptr, b, T, S, window, HAS_WINDOW, BLOCK_T)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    io_off = ((b * T + t) * Hq + kvh * G + g) * D          # q_rot and out share q's [B, T, Hq, D] layout
    io_mask = r_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + io_off[:, None] + d[None, :], mask=io_mask, other=0.0)

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)    # running max, log2 units
    l_i = tl.zeros([BLOCK_R], tl.float32)                  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)

    # This split's keys, cut to the live range; the start is aligned down to a block boundary (the
    # extra keys are masked). An empty range runs no iteration.
    s_lo = split * SPLIT_N
    start = tl.maximum(s_lo, (lo // BLOCK_N) * BLOCK_N)
    end = tl.minimum(s_lo + SPLIT_N, hi)
    kv_base = bh * S * D
    n_ar = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + n_ar
        n_ok = n < end
        kv_off = kv_base + n.to(tl.int64)[:, None] * D + d[None, :]
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(kc_ptr + kv_off, mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        vis = (n[None, :] <= p[:, None]) & n_ok[None, :]
        if HAS_WINDOW:
            vis = vis & (n[None, :] > p[:, None] - window)
        s = tl.where(vis, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with nothing visible yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        pr = tl.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        v = tl.load(vc_ptr + kv_off, mask=kv_mask, other=0.0)
        # The max, the sum and the accumulator stay fp32. In 16 bits the probabilities go into the tensor-core
        # dot in the cache dtype as two parts, p = hi + lo, each rounded to it: one rounding of p (as flash
        # attention does) put the fp16 error above twice the reference's on 1 input in 1,000
        # (tests/test_ops_decode.py, long-decode-splits, seed 475); hi + lo carries p to ~22 bits.
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(pr, v, input_precision="ieee")
        else:
            pr_hi = pr.to(v.dtype)
            pr_lo = (pr - pr_hi.to(tl.float32)).to(v.dtype)
            acc = acc * alpha[:, None] + tl.dot(pr_hi, v) + tl.dot(pr_lo, v)
        m_i = m_new

    if SINGLE_SPLIT:
        # A row with no visible key (padding, or out of contract) has l = 0: write 0, divide by 1.
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + io_off[:, None] + d[None, :], o.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        # Splits outside the live range write nothing; the merge reads exactly the live ones.
        live = (split >= lo // SPLIT_N) & (split < tl.cdiv(hi, SPLIT_N))
        st = (bh * NUM_SPLITS + split) * GT + r
        tl.store(m_ptr + st, m_i, mask=r_ok & live)
        tl.store(l_ptr + st, l_i, mask=r_ok & live)
        tl.store(acc_ptr + st[:, None] * D + d[None, :], acc, mask=io_mask & live)


@triton.jit
def _attn_merge_kernel(
    m_ptr, l_ptr, acc_ptr, pos_ptr, out_ptr,
    T, Hq, Hkv, G, S, D, window, NUM_SPLITS,
    SPLIT_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // Hkv
    kvh = bh % Hkv
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    GT = G * T
    r_ok = r < GT
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    io_mask = r_ok[:, None] & d_ok[None, :]
    lo, hi = _live_range(pos_ptr, b, T, S, window, HAS_WINDOW, BLOCK_T)

    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for split in range(lo // SPLIT_N, tl.cdiv(hi, SPLIT_N)):
        st = (bh * NUM_SPLITS + split) * GT + r
        m_s = tl.load(m_ptr + st, mask=r_ok, other=float("-inf"))
        l_s = tl.load(l_ptr + st, mask=r_ok, other=0.0)
        a_s = tl.load(acc_ptr + st[:, None] * D + d[None, :], mask=io_mask, other=0.0)
        m_new = tl.maximum(m, m_s)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        c_old = tl.exp2(m - m_sub)
        c_new = tl.exp2(m_s - m_sub)
        l = l * c_old + l_s * c_new
        acc = acc * c_old[:, None] + a_s * c_new[:, None]
        m = m_new

    g = r // T
    t = r % T
    io_off = ((b * T + t) * Hq + kvh * G + g) * D
    o = acc / tl.where(l > 0, l, 1.0)[:, None]        # l = 0: no visible key, acc is 0 too
    tl.store(out_ptr + io_off[:, None] + d[None, :], o.to(out_ptr.dtype.element_ty), mask=io_mask)


class AttentionPlan(NamedTuple):
    block_r: int
    block_n: int
    block_d: int
    shared_bytes: int     # upper bound of the split kernel's shared memory (resources.py)
    shortfall: str        # '' if it fits the device, else why not


def plan_attention(G: int, T: int, D: int, dtype: torch.dtype, on_cpu: bool, limit: Optional[int]) -> AttentionPlan:
    """Block sizes for G * T query rows (per kv head) of head size D, fitted to `limit` bytes of shared
    memory (None: no limit, the CPU interpreter). Depends on G * T, D, the dtype and the device only.
    Rows shrink first (that changes how many rows share a program, not the key blocks a row's softmax
    runs over); the key block shrinks only where even 16 rows do not fit, which depends on D, the dtype
    and the device, never on T, so the draft's and the verify step's keys are still cut alike."""
    fp32 = dtype == torch.float32
    element_size = torch.finfo(dtype).bits // 8
    block_d = _pow2_at_least(D, MIN_BLOCK)
    block_n = INTERPRET_BLOCK_N if on_cpu else (BLOCK_N_FP32 if fp32 else BLOCK_N)
    block_r = min(_pow2_at_least(G * T, MIN_BLOCK), INTERPRET_MAX_BLOCK_R if on_cpu else MAX_BLOCK_R)
    if not on_cpu and G * T <= INVARIANT_BLOCK_R:
        block_r = INVARIANT_BLOCK_R

    def needed(rows, keys):
        return max(resources.attention_split_bytes(rows, keys, block_d, element_size, fp32),
                   resources.attention_merge_bytes(rows))

    if limit is not None:
        while needed(block_r, block_n) > limit and block_r > MIN_BLOCK:
            block_r //= 2
        while needed(block_r, block_n) > limit and block_n > MIN_BLOCK:
            block_n //= 2
    shared = needed(block_r, block_n)
    return AttentionPlan(block_r, block_n, block_d, shared,
                         resources.shortfall(shared, limit) if limit is not None else "")


def invariant_max_tokens(G: int) -> int:
    """The most query tokens a GPU launch may carry and still run the decode step's kernel (G query heads per kv
    head), where the device's shared memory keeps the row block whole (plan_attention shrinks it otherwise)."""
    return INVARIANT_BLOCK_R // G


def shared_memory_reasons(q, k, v, rope_cos, rope_sin, positions, k_cache, v_cache, scale, window) -> list:
    """Why this device cannot run these arguments' launch configuration ([] if it can)."""
    limit = resources.shared_memory_limit(q.device)
    if limit is None:
        return []
    G = q.shape[2] // k_cache.shape[1]
    why = plan_attention(G, q.shape[1], q.shape[3], q.dtype, False, limit).shortfall
    return [f"the attention kernel {why}"] if why else []


def split_size(S: int) -> int:
    """Keys per split for a cache of S keys (a power of two, a multiple of the key block)."""
    return max(MIN_SPLIT_N, BLOCK_N, BLOCK_N_FP32, INTERPRET_BLOCK_N,
               triton.next_power_of_2(triton.cdiv(S, MAX_SPLITS)))


def rope_append_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope_cos: torch.Tensor,
                          rope_sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, scale: float, window: int = 0) -> torch.Tensor:
    """RoPE on q and k, append k and v to the caches at `positions` (in place), causal GQA attention.

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D]; rope_cos, rope_sin: [S', D] float32 (S' >= S);
    positions: [B, T] int64 (device tensor, never read on the host); k_cache, v_cache: [B, Hkv, S, D];
    scale: softmax scale; window: 0 or the sliding window. Returns [B, T, Hq * D] in q's dtype.
    """
    validate.rope_append_attention(q, k, v, rope_cos, rope_sin, positions, k_cache, v_cache, scale, window)
    B, T, Hq, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    # A window wider than the cache restricts no in-range query (p < S); capping it keeps S + window,
    # used on the device, far from int32 overflow.
    window = min(int(window), S + 1)
    out = torch.empty((B, T, Hq * D), dtype=q.dtype, device=q.device)
    q_rot = torch.empty_like(q)

    block_d = _pow2_at_least(D, 16)
    block_g = triton.next_power_of_2(G)
    _rope_append_kernel[(B * T, Hkv)](
        q, k, v, rope_cos, rope_sin, positions, k_cache, v_cache, q_rot,
        T, Hq, Hkv, G, S, rope_cos.shape[0], D,
        BLOCK_G=block_g, BLOCK_D=block_d,
        # At most a few thousand elements per program (G x D): 1-2 warps, 4-16 values per thread.
        num_warps=1 if block_g * block_d <= 256 else 2,
        # No mul+add -> fma contraction: in fp32 the reference rounds both products before adding, and
        # ptxas would otherwise fuse them (seen in the sm_90a PTX). Bit-exact caches in every dtype.
        enable_fp_fusion=False,
    )

    fp32 = q.dtype == torch.float32
    limit = resources.shared_memory_limit(q.device)
    p = plan_attention(G, T, D, q.dtype, q.device.type == "cpu", limit)
    if p.shortfall:  # ops/ never gets here (resource reasons); a direct call gets the numbers, not OutOfResources
        raise RuntimeError(f"rope_append_attention (Triton): the attention kernel {p.shortfall}")
    block_n, block_r = p.block_n, p.block_r
    split_n = split_size(S)
    num_splits = triton.cdiv(S, split_n)
    single = num_splits == 1
    GT = G * T
    row_blocks = triton.cdiv(GT, block_r)
    block_t = triton.next_power_of_2(T)
    if block_r == INVARIANT_BLOCK_R and T <= INVARIANT_BLOCK_R:
        block_t = INVARIANT_BLOCK_R   # decode and verify widths: the same compiled kernels, constexpr for constexpr
    if single:
        m_ws = l_ws = acc_ws = out              # dummies, never touched when SINGLE_SPLIT
    else:
        m_ws = torch.empty((B * Hkv, num_splits, GT), dtype=torch.float32, device=q.device)
        l_ws = torch.empty_like(m_ws)
        acc_ws = torch.empty((B * Hkv, num_splits, GT, D), dtype=torch.float32, device=q.device)
    log2e = 1.4426950408889634
    _attn_split_kernel[(B * Hkv, num_splits, row_blocks)](
        q_rot, k_cache, v_cache, positions, out, m_ws, l_ws, acc_ws,
        T, Hq, Hkv, G, S, D, float(scale) * log2e, window, num_splits,
        SPLIT_N=split_n, BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_T=block_t,
        HAS_WINDOW=window > 0, SINGLE_SPLIT=single, IEEE=fp32,
        # Two stages: K/V of the next block load (cp.async) while this one computes; 12-33 KB of shared
        # memory in bf16 (D = 64..128, 16..64 rows), so several programs fit on an SM.
        num_warps=8 if fp32 else 4, num_stages=2,
    )
    if not single:
        _attn_merge_kernel[(B * Hkv, row_blocks)](
            m_ws, l_ws, acc_ws, positions, out,
            T, Hq, Hkv, G, S, D, window, num_splits,
            SPLIT_N=split_n, BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_T=block_t,
            HAS_WINDOW=window > 0,
            num_warps=4,
        )
    return out
