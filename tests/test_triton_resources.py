"""Shared memory of the Triton launch configurations (triton_kernels/resources.py): the estimates bound
what Triton allocates, the launchers size their blocks to fit the device, and a configuration that
cannot fit makes the Triton backend "cannot run" (auto-selection skips it, forcing it names the limit).
The device limit is faked, so all of this runs on the CPU; the last tests run the real thing on a GPU."""
import importlib

import pytest
import torch

import kangaroo_ext.ops as kops
from kangaroo_ext.ops import backends, reference

triton_kernels = pytest.importorskip("kangaroo_ext.triton_kernels")
resources = importlib.import_module("kangaroo_ext.triton_kernels.resources")
attention = importlib.import_module("kangaroo_ext.triton_kernels.attention")
lm_head = importlib.import_module("kangaroo_ext.triton_kernels.lm_head")

H200_LIMIT = 232_448   # shared_memory_per_block_optin of an H100 / H200

# metadata.shared of the kernels compiled offline for sm_90a by Triton 3.8 (triton.compile with
# GPUTarget("cuda", 90, 32)), at the launchers' num_warps / num_stages.
# attention split: (rows, keys, head dim, element size, exact fp32) -> bytes
MEASURED_ATTENTION = {(16, 16, 64, 4, True): 13_312, (64, 16, 64, 4, True): 28_672, (256, 16, 64, 4, True): 91_136,
                      (1024, 16, 64, 4, True): 339_968, (4096, 16, 64, 4, True): 1_323_008,
                      (16, 16, 128, 4, True): 25_664, (64, 16, 128, 4, True): 53_504,
                      (16, 64, 64, 2, False): 12_288, (64, 64, 64, 2, False): 16_384, (256, 64, 64, 2, False): 40_960,
                      (1024, 64, 64, 2, False): 139_264, (16, 64, 128, 2, False): 22_528,
                      (64, 64, 128, 2, False): 32_768, (64, 64, 256, 2, False): 65_536}
# lm_head partial, 128 x 64 weight tiles, 16 rows: (element size, stages) -> bytes
MEASURED_LM_HEAD = {(4, 1): 36_864, (4, 2): 36_864, (4, 3): 73_728, (4, 4): 110_592, (2, 4): 18_432}


@pytest.mark.parametrize("config", list(MEASURED_ATTENTION))
def test_attention_estimate_bounds_what_triton_allocates(config):
    rows, keys, d, size, fp32 = config
    estimate = resources.attention_split_bytes(rows, keys, d, size, fp32)
    assert estimate >= MEASURED_ATTENTION[config]
    if fp32:
        assert estimate <= 1.02 * MEASURED_ATTENTION[config], "fp32 estimate should be tight"


@pytest.mark.parametrize("config", list(MEASURED_LM_HEAD))
def test_lm_head_estimate_bounds_what_triton_allocates(config):
    size, stages = config
    estimate = resources.lm_head_partial_bytes(128, 64, 16, size, stages)
    assert estimate >= MEASURED_LM_HEAD[config]
    if size == 4:
        assert estimate == MEASURED_LM_HEAD[config]


def test_the_h200_failure_is_the_uncut_fp32_prefill_and_now_fits():
    """SmolLM2 (G = 3, D = 64) prefilling a 1,366-token prompt in fp32: 4,098 query rows per kv head."""
    old = resources.attention_split_bytes(4096, 16, 64, 4, True)
    assert resources.shortfall(old, H200_LIMIT) == \
        f"needs {old:,} bytes of shared memory per block, the device allows 232,448"
    plan = attention.plan_attention(3, 1366, 64, torch.float32, on_cpu=False, limit=H200_LIMIT)
    assert plan.block_r == attention.MAX_BLOCK_R and plan.shortfall == ""
    assert plan.shared_bytes <= H200_LIMIT


def test_plan_shrinks_rows_then_keys_and_names_what_cannot_fit():
    fits = attention.plan_attention(3, 7, 128, torch.float32, on_cpu=False, limit=H200_LIMIT)
    assert (fits.block_r, fits.block_n) == (32, attention.BLOCK_N_FP32)
    small = attention.plan_attention(3, 7, 128, torch.float32, on_cpu=False, limit=30_000)
    assert small.block_r == 16 and small.shortfall == "" and small.shared_bytes <= 30_000
    bf16 = attention.plan_attention(4, 8, 256, torch.bfloat16, on_cpu=False, limit=60_000)
    assert bf16.block_r == 16 and bf16.block_n < attention.BLOCK_N and bf16.shortfall == ""
    none = attention.plan_attention(3, 7, 128, torch.float32, on_cpu=False, limit=10_000)
    assert none.shortfall == f"needs {none.shared_bytes:,} bytes of shared memory per block, the device allows 10,000"


def test_key_blocks_never_depend_on_the_number_of_queries():
    """The draft step (T = 1) and the verify step (T = k + 1) must cut keys alike."""
    for limit in (H200_LIMIT, 60_000, 30_000):
        for dtype in (torch.float32, torch.bfloat16):
            cuts = {attention.plan_attention(8, T, 128, dtype, on_cpu=False, limit=limit).block_n for T in range(1, 34)}
            assert len(cuts) == 1, (limit, dtype, cuts)


def test_lm_head_stages_fit_the_device():
    assert lm_head.stages(128, 64, 4, H200_LIMIT) == (4, "")
    assert lm_head.stages(128, 64, 4, 101_376) == (3, "")     # a 99 KB (sm_86 / sm_89) device
    assert lm_head.stages(128, 64, 4, 40_000) == (2, "")      # one tile in flight at 1 or 2 stages
    assert lm_head.stages(128, 64, 4, 30_000)[1] == "needs 36,864 bytes of shared memory per block, the device allows 30,000"
    assert lm_head.stages(128, 64, 2, None) == (lm_head.NUM_STAGES, "")


def _attention_args(T=5, dtype=torch.float32):
    B, Hq, Hkv, D, S = 1, 6, 2, 64, 96
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, T, h, D, generator=g, dtype=dtype) for h in (Hq, Hkv, Hkv))
    cache = [torch.randn(B, Hkv, S, D, generator=g, dtype=dtype) for _ in range(2)]
    pos = (40 + torch.arange(T))[None]
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    emb = torch.cat([torch.arange(S + 2)[:, None] * inv] * 2, -1)
    return q, k, v, emb.cos(), emb.sin(), pos, cache[0], cache[1], D ** -0.5, 0


@pytest.fixture
def fake_limit(monkeypatch):
    """Pretend the tensors live on a device allowing `limit` bytes of shared memory per block."""
    def set_limit(limit):
        monkeypatch.setattr(resources, "shared_memory_limit", lambda device: limit)
    return set_limit


def test_forced_triton_that_cannot_fit_raises_naming_the_limit(fake_limit):
    fake_limit(10_000)
    args = _attention_args()
    with pytest.raises(kops.BackendUnavailable, match=r"backend 'triton' cannot run rope_append_attention: the "
                       r"attention kernel needs [\d,]+ bytes of shared memory per block, the device allows 10,000"):
        kops.rope_append_attention(*args, backend="triton")
    hidden, head = torch.randn(2, 64), torch.randn(500, 64)
    with pytest.raises(kops.BackendUnavailable, match="the LM-head kernel needs 36,864 bytes of shared memory per "
                                                      "block, the device allows 10,000"):
        kops.lm_head_argmax(hidden, head, backend="triton")


def test_auto_selection_skips_triton_that_cannot_fit(fake_limit, monkeypatch):
    # Auto-selection never takes the CPU interpreter; lift that rule so the shared-memory reason decides.
    monkeypatch.setattr(backends, "_auto_only_reasons", lambda backend, args: [])
    args = _attention_args()
    fake_limit(H200_LIMIT)
    assert backends.select("rope_append_attention", None, *args) is backends._IMPLS["rope_append_attention"]["triton"][1]
    fake_limit(10_000)
    assert backends.select("rope_append_attention", None, *args) is \
        backends._IMPLS["rope_append_attention"]["reference"][1]


def test_row_blocks_match_the_reference(monkeypatch):
    """Query rows cut into several blocks (and keys into several splits) on the CPU interpreter."""
    if backends.reasons_against("rope_append_attention", "triton", *_attention_args()):
        pytest.skip("; ".join(backends.reasons_against("rope_append_attention", "triton", *_attention_args())))
    monkeypatch.setattr(attention, "INTERPRET_MAX_BLOCK_R", 16)
    monkeypatch.setattr(attention, "MIN_SPLIT_N", 32)
    monkeypatch.setattr(attention, "INTERPRET_BLOCK_N", 16)
    q, k, v, cos, sin, pos, kc, vc, scale, window = _attention_args(T=7)      # 3 x 7 = 21 rows: 2 blocks
    out = triton_kernels.rope_append_attention(q, k, v, cos, sin, pos, kc.clone(), vc.clone(), scale, window)
    want = reference.rope_append_attention(q, k, v, cos, sin, pos, kc.clone(), vc.clone(), scale, window)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


# ---- on a GPU ------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_prefill_attention_runs_on_the_gpu(dtype):
    """The H200 failure: G x T = 4,098 query rows in one Triton launch (fp32 needed 1.3 MB)."""
    B, T, Hq, Hkv, D, S = 1, 1366, 9, 3, 64, 1400
    q, k, v = (torch.randn(B, T, h, D, device="cuda", dtype=dtype) for h in (Hq, Hkv, Hkv))
    kc, vc = (torch.zeros(B, Hkv, S, D, device="cuda", dtype=dtype) for _ in range(2))
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    emb = torch.cat([torch.arange(S)[:, None] * inv] * 2, -1).cuda()
    pos = torch.arange(T, device="cuda")[None]
    assert not backends.reasons_against("rope_append_attention", "triton", q, k, v, emb.cos(), emb.sin(), pos, kc,
                                        vc, D ** -0.5, 0)
    out = kops.rope_append_attention(q, k, v, emb.cos(), emb.sin(), pos, kc.clone(), vc.clone(), D ** -0.5, 0,
                                     backend="triton")
    want = reference.rope_append_attention(q, k, v, emb.cos(), emb.sin(), pos, kc.clone(), vc.clone(), D ** -0.5, 0)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.gpu
@needs_cuda
def test_real_device_limit_is_read(monkeypatch):
    limit = resources.shared_memory_limit(torch.device("cuda"))
    assert limit == torch.cuda.get_device_properties(0).shared_memory_per_block_optin > 48 * 1024
    monkeypatch.setattr(resources, "shared_memory_limit", lambda device: 10_000)
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _attention_args()]
    assert backends.select("rope_append_attention", None, *args) is not \
        backends._IMPLS["rope_append_attention"]["triton"][1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("G, D", [(1, 64), (3, 64), (4, 64), (8, 128)])
def test_decode_and_verify_widths_share_one_row_block(G, D, dtype):
    """On a GPU every launch of up to INVARIANT_BLOCK_R query rows per kv head takes the same row and key blocks, so
    a decode step and a verify step of up to invariant_max_tokens(G) tokens run one compiled kernel (what makes a
    verified row the decode step's row under KANGAROO_TRITON_ATTENTION); wider launches may take other blocks."""
    widest = attention.invariant_max_tokens(G)
    assert widest == attention.INVARIANT_BLOCK_R // G >= 1
    plans = {attention.plan_attention(G, T, D, dtype, on_cpu=False, limit=H200_LIMIT)[:2] for T in range(1, widest + 1)}
    assert plans == {(attention.INVARIANT_BLOCK_R, attention.BLOCK_N)}, plans
    wider = attention.plan_attention(G, widest + 1, D, dtype, on_cpu=False, limit=H200_LIMIT)
    assert wider.block_r > attention.INVARIANT_BLOCK_R and wider.block_n == attention.BLOCK_N
