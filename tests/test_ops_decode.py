"""Decode-path ops (attention over the static cache, fused LM head + argmax) on every backend against
the reference, on awkward shapes. Tolerances: twice the reference's own error against float64."""
import zlib

import pytest
import torch

import kangaroo_ext.ops as kops
from kangaroo_ext.ops import reference

from conftest import backend_params, device_for, skip_missing_kernel, skip_unsupported

BACKENDS = backend_params()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _rope_tables(S, D, device):
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    freqs = torch.arange(S, dtype=torch.float32)[:, None] * inv[None]
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().to(device), emb.sin().to(device)


def _allowed(ref_lowp, ref64):
    return 2 * (ref_lowp.double() - ref64).abs().max().item() + 1e-6 * ref64.abs().max().item()


ATTN_CASES = {  # B, T, Hq, Hkv, D, S, start position, window
    "decode-gqa3-d64": (1, 1, 9, 3, 64, 96, 40, 0),
    "verify-7-d64": (1, 7, 9, 3, 64, 96, 50, 0),
    "verify-4-mha-d128": (2, 4, 4, 4, 128, 64, 13, 0),
    "d48-gqa4": (1, 3, 8, 2, 48, 40, 0, 0),
    "d80-end-of-cache": (1, 5, 6, 2, 80, 64, 59, 0),
    "window": (1, 3, 4, 2, 64, 64, 30, 8),
    # Long contexts: the CUDA kernel cuts the keys into splits (up to 8) that merge across a cluster.
    "long-decode-splits": (1, 1, 9, 3, 64, 1100, 1000, 0),
    "long-verify-splits": (1, 7, 9, 3, 64, 1100, 900, 0),
    "long-window-splits": (1, 4, 4, 2, 64, 700, 600, 300),
    "long-mha-d128-b2": (2, 3, 4, 4, 128, 640, 500, 0),
    "long-d80-b2": (2, 2, 6, 2, 80, 800, 700, 0),
    "long-d6-elementwise": (1, 3, 4, 2, 6, 300, 250, 0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_rope_append_attention_matches_reference(backend, dtype, case):
    device = device_for(backend)
    skip_unsupported(backend, device, dtype)
    skip_missing_kernel(backend, "rope_append_attention")
    B, T, Hq, Hkv, D, S, start, window = ATTN_CASES[case]
    g = torch.Generator().manual_seed(zlib.crc32(case.encode()) % 1000)   # not hash(): salted per process
    q, k, v = (torch.randn(B, T, h, D, generator=g).to(dtype).to(device) for h in (Hq, Hkv, Hkv))
    k_cache = torch.randn(B, Hkv, S, D, generator=g).to(dtype).to(device)   # earlier keys: random
    v_cache = torch.randn(B, Hkv, S, D, generator=g).to(dtype).to(device)
    positions = (start + torch.arange(T))[None].repeat(B, 1).to(device)
    positions[-1] -= B - 1  # rows at different lengths
    cos, sin = _rope_tables(S + 3, D, device)
    scale = D ** -0.5

    kc, vc = k_cache.clone(), v_cache.clone()
    out = kops.rope_append_attention(q, k, v, cos, sin, positions, kc, vc, scale, window, backend=backend)
    rkc, rvc = k_cache.clone(), v_cache.clone()
    ref = reference.rope_append_attention(q, k, v, cos, sin, positions, rkc, rvc, scale, window)
    r64kc, r64vc = k_cache.double(), v_cache.double()
    ref64 = reference.rope_append_attention(q.double(), k.double(), v.double(), cos.double(), sin.double(),
                                            positions, r64kc, r64vc, scale, window)
    assert out.shape == (B, T, Hq * D) and out.dtype == dtype
    assert (out.double() - ref64).abs().max().item() <= _allowed(ref, ref64)
    # The cache: new rows hold the rotated k (within rounding) and v (exactly); other rows are untouched.
    written = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        written[b, positions[b].cpu()] = True
    w = written[:, None, :, None].expand_as(kc).to(device)
    assert torch.equal(kc[~w], k_cache[~w]) and torch.equal(vc[~w], v_cache[~w]), "only the new positions change"
    assert torch.equal(vc[w], rvc[w]), "v is copied, not transformed"
    assert (kc[w].double() - r64kc[w]).abs().max().item() <= _allowed(rkc[w], r64kc[w])


HEAD_CASES = {"smollm2": (2, 576, 49152), "llama-7b": (1, 4096, 32000), "odd": (3, 577, 111), "verify-7": (7, 576, 1000)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(HEAD_CASES))
def test_lm_head_argmax_matches_reference(backend, dtype, case):
    device = device_for(backend)
    skip_unsupported(backend, device, dtype)
    skip_missing_kernel(backend, "lm_head_argmax")
    R, H, V = HEAD_CASES[case]
    g = torch.Generator().manual_seed(R * H + V)
    hidden = torch.randn(1, R, H, generator=g).to(dtype).to(device)
    W = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).to(device)
    W[V // 3] = W[V // 5]  # a planted exact tie between two rows
    token, conf = kops.lm_head_argmax(hidden, W, backend=backend)
    ref_tok, ref_conf = reference.lm_head_argmax(hidden, W)
    assert token.shape == (1, R) and token.dtype == torch.int64 and conf.dtype == torch.float32
    # The argmax may differ from the reference only where the reference's own top-2 logits are within
    # its rounding error (the kernels sum in another order); there the chosen logit must be a top one.
    logits64 = hidden.double() @ W.double().T
    ref_logits = torch.nn.functional.linear(hidden, W).float()
    slack = 2 * (ref_logits.double() - logits64).abs().max().item() + 2 * _ulp(ref_logits.abs().max().item(), dtype)
    chosen = logits64.gather(-1, token[..., None])[..., 0]
    assert (logits64.max(-1).values - chosen <= slack).all()
    exact = token == ref_tok
    if dtype == torch.float32:
        assert exact.all(), "fp32 logits have no rounding ties here: the argmax must agree"
    conf64 = torch.softmax(ref_logits.double(), -1).max(-1).values
    torch.testing.assert_close(conf[exact].double(), conf64[exact], rtol=2e-2 if dtype != torch.float32 else 1e-4,
                               atol=1e-6)


def _ulp(x, dtype):
    return x * {torch.float32: 2 ** -23, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_lm_head_argmax_ties_take_the_first_index(backend):
    skip_missing_kernel(backend, "lm_head_argmax")
    device = device_for(backend)
    hidden = torch.ones(1, 1, 16, device=device)
    W = torch.zeros(300, 16, device=device)
    W[[17, 42, 250]] = 1.0
    token, conf = kops.lm_head_argmax(hidden, W, backend=backend)
    assert token.item() == 17
    assert conf.item() == pytest.approx(1 / (3 + 297 * torch.exp(torch.tensor(-16.0)).item()), rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_ops_reject_bad_input(backend):
    device = device_for(backend)  # validation runs before dispatch: every backend rejects alike
    q = torch.randn(1, 2, 4, 16, device=device)
    k = torch.randn(1, 2, 2, 16, device=device)
    cache = torch.zeros(1, 2, 32, 16, device=device)
    cos = torch.zeros(32, 16, device=device)
    pos = torch.tensor([[3, 4]], device=device)
    with pytest.raises(ValueError, match="k's head count 3 must divide q's head count 4"):
        kops.rope_append_attention(q, torch.randn(1, 2, 3, 16, device=device), torch.randn(1, 2, 3, 16, device=device),
                                   cos, cos, pos, cache, cache.clone(), 0.25, backend=backend)
    with pytest.raises(ValueError, match="positions must be int64"):
        kops.rope_append_attention(q, k, k.clone(), cos, cos, pos.int(), cache, cache.clone(), 0.25, backend=backend)
    with pytest.raises(ValueError, match="rope_cos must be float32"):
        kops.rope_append_attention(q, k, k.clone(), cos[:8], cos, pos, cache, cache.clone(), 0.25, backend=backend)
    with pytest.raises(ValueError, match="k_cache must have q's dtype"):
        kops.rope_append_attention(q, k, k.clone(), cos, cos, pos, cache.half(), cache.clone(), 0.25, backend=backend)
    with pytest.raises(ValueError, match=r"lm_head must have shape \[V, 16\]"):
        kops.lm_head_argmax(q[0, 0], torch.randn(10, 8, device=device), backend=backend)
    with pytest.raises(ValueError, match="lm_head must have hidden's dtype"):
        kops.lm_head_argmax(q[0, 0], torch.randn(10, 16, device=device).half(), backend=backend)


# ---- batch invariance of attention (issue 21: a verified row is bitwise the decode step's row) --------

INVARIANCE_CASES = {  # Hq, Hkv, D, start position (keys before it are random cache rows), T verified
    "smollm2-gqa3-d64": (9, 3, 64, 300, 7),
    "llama1b-gqa4-d64": (32, 8, 64, 200, 7),
    "gqa3-d64-2-tokens": (9, 3, 64, 100, 2),
    "gqa3-d64-4-tokens": (9, 3, 64, 450, 4),
    "gqa4-d128": (8, 2, 128, 150, 4),   # 16 rows: a tile of head dim 128 holds at most 16 (one PV slot each)
    # None: as many tokens as the launcher says stay invariant (attention_invariant_max_tokens), the width
    # the engine keeps copied drafts within (engine/copy_rounds.py, copy_policy_for)
    "smollm2-widest": (9, 3, 64, 300, None),
    "llama1b-widest": (32, 8, 64, 200, None),
    "gqa4-d128-widest": (8, 2, 128, 150, None),
}


# Contexts past 512 keys (8 splits of 64 keys on sm_90), where contiguous key splits move with the tile's key
# range: each case's tile crosses a point where the chunk grows (ceil(len / 8) past a multiple of 64).
LONG_INVARIANCE_CASES = {  # Hq, Hkv, D, start position, T verified (None: the widest invariant T)
    "smollm2-crossing-1024": (9, 3, 64, 1018, 7),
    "smollm2-widest-crossing-1536": (9, 3, 64, 1530, None),
    "llama1b-crossing-1024": (32, 8, 64, 1020, 7),
    "gqa4-d128-crossing-2048": (8, 2, 128, 2045, 4),
}


def _rows_differing(case, Hq, Hkv, D, start, T, dtype, backend="cuda", **switches) -> int:
    """Rows of T tokens attended in one call (a verify step) that differ from T one-token calls (plain decode
    steps, each appending its key), on `backend` under the launchers' `switches`; the cache rows written must not
    differ."""
    from kangaroo_ext import _extension
    S, device = max(512, (start + T + 63) // 64 * 64), "cuda"
    g = torch.Generator().manual_seed(len(case) * 7 + T)
    q, k, v = (torch.randn(1, T, h, D, generator=g).to(dtype).to(device) for h in (Hq, Hkv, Hkv))
    k_cache = torch.randn(1, Hkv, S, D, generator=g).to(dtype).to(device)
    v_cache = torch.randn(1, Hkv, S, D, generator=g).to(dtype).to(device)
    cos, sin = _rope_tables(S, D, device)
    positions = (start + torch.arange(T, device=device))[None]
    call = lambda t0, t1, kc, vc: kops.rope_append_attention(  # noqa: E731
        q[:, t0:t1], k[:, t0:t1], v[:, t0:t1], cos, sin, positions[:, t0:t1], kc, vc, D ** -0.5, 0,
        backend=backend)
    with _extension.launch_switches(**switches):
        kc, vc, kc1, vc1 = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
        together = call(0, T, kc, vc)
        alone = torch.cat([call(t, t + 1, kc1, vc1) for t in range(T)], dim=1)
    assert torch.equal(kc, kc1) and torch.equal(vc, vc1), "the cache rows written must not depend on T"
    torch.testing.assert_close(together, alone)           # any order: the same values within rounding
    return int((together != alone).reshape(T, Hq, D).any(-1).sum())


def _widest_invariant_tokens(case, Hq, Hkv, D, dtype) -> int:
    """The most tokens the launcher says stay invariant (attention_invariant_max_tokens), the width the engine
    keeps copied drafts within (engine/copy_rounds.py, copy_policy_for)."""
    from kangaroo_ext import _extension
    with _extension.launch_switches(batch_invariant_attention=True):
        T = _extension.attention_invariant_max_tokens(Hq // Hkv, D, dtype.itemsize, torch.cuda.current_device())
    assert T is not None and T >= 1, f"no invariant width for {case}: {T}"
    return T


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(INVARIANCE_CASES))
def test_attention_verified_rows_are_the_decode_steps_rows(dtype, case):
    """T tokens attended in one call (a verify step) give, row for row, bitwise what T one-token calls
    (plain decode steps, each appending its key) give, with the launchers' batch-invariant order on
    (KANGAROO_BATCH_INVARIANT_ATTENTION). Contexts below 512 keys, where even contiguous key splits cannot
    move (csrc/kernels/key_split.h); both deals are checked. With the order off, the rows that differ are
    counted and printed (the reason for bf16 outputs that differ from plain decoding)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    skip_missing_kernel("cuda", "rope_append_attention")
    Hq, Hkv, D, start, T = INVARIANCE_CASES[case]
    T = T or _widest_invariant_tokens(case, Hq, Hkv, D, dtype)
    default_order = _rows_differing(case, Hq, Hkv, D, start, T, dtype, batch_invariant_attention=False)
    invariant_order = {interleaved: _rows_differing(case, Hq, Hkv, D, start, T, dtype, batch_invariant_attention=True,
                                                    interleaved_key_splits=interleaved)
                       for interleaved in (False, True)}
    print(f"{case} {dtype}: rows differing from the decode step's: {default_order} of {T * Hq} in the "
          f"default order, {invariant_order} in the batch-invariant order (by interleaved key splits)")
    assert invariant_order == {False: 0, True: 0}, f"verified rows differ from the decode step's of {T * Hq}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(LONG_INVARIANCE_CASES))
def test_attention_verified_rows_past_512_keys_need_interleaved_splits(dtype, case):
    """Past 512 keys, with the batch-invariant order and interleaved key splits (KANGAROO_INTERLEAVED_KEY_SPLITS),
    a verified row is still bitwise the decode step's row. With contiguous splits (the default until this test
    has passed on a GPU) the rows whose splits moved are counted and printed: the long bf16 turns that differed
    from plain decoding (H100, 80eb2b7) were verified there."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    skip_missing_kernel("cuda", "rope_append_attention")
    Hq, Hkv, D, start, T = LONG_INVARIANCE_CASES[case]
    T = T or _widest_invariant_tokens(case, Hq, Hkv, D, dtype)
    contiguous = _rows_differing(case, Hq, Hkv, D, start, T, dtype, batch_invariant_attention=True,
                                 interleaved_key_splits=False)
    interleaved = _rows_differing(case, Hq, Hkv, D, start, T, dtype, batch_invariant_attention=True,
                                  interleaved_key_splits=True)
    print(f"{case} {dtype}: rows differing from the decode step's past 512 keys: {contiguous} of {T * Hq} with "
          f"contiguous key splits, {interleaved} with interleaved ones")
    assert interleaved == 0, f"{interleaved} of {T * Hq} verified rows differ from the decode step's"


@pytest.mark.gpu
@pytest.mark.parametrize("max_tile_rows", [3, 6, 12])
@pytest.mark.parametrize("case", ["smollm2-gqa3-d64", "llama1b-gqa4-d64", "gqa4-d128", "smollm2-crossing-1024",
                                  "smollm2-widest-crossing-1536"])
def test_attention_verify_tiles_cut_into_q_tiles_keep_the_decode_steps_rows(case, max_tile_rows):
    """A verify tile cut into q-tiles of whole tokens (_C.set_attention_max_tile_rows: more, lighter blocks) still
    gives, row for row, bitwise the decode steps' rows, with the batch-invariant order and interleaved splits
    (and the split count of one q-tile: attention.cuh, plan); bf16."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    skip_missing_kernel("cuda", "rope_append_attention")
    Hq, Hkv, D, start, T = {**INVARIANCE_CASES, **LONG_INVARIANCE_CASES}[case]
    dtype = torch.bfloat16
    T = T or _widest_invariant_tokens(case, Hq, Hkv, D, dtype)
    differ = _rows_differing(case, Hq, Hkv, D, start, T, dtype, batch_invariant_attention=True,
                             interleaved_key_splits=True, attention_max_tile_rows=max_tile_rows)
    assert differ == 0, f"{differ} of {T * Hq} verified rows differ from the decode step's (q-tiles <= " \
                        f"{max_tile_rows} rows)"
