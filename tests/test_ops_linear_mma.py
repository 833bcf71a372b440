"""The tensor-core decode GEMVs (csrc/kernels/decode_linear_mma.cuh, KANGAROO_TENSOR_CORE_GEMV): the same ops
and the same tests as the CUDA-core kernels (tests/test_ops_linear.py) with the switch on, at the default
model's and Llama-3.2-1B's shapes too; the switch really routes eligible shapes to the new kernel and only
those; and bf16 speculative decoding stays token for token plain decoding with it on."""

import pytest
import torch

import kangaroo_ext as kx
from kangaroo_ext import _extension
from kangaroo_ext import ops as kops
from kangaroo_ext.ops import reference

import test_ops_linear as base
from conftest import skip_missing_kernel, tensor_core_gemv
from models import prompts, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
HALF_DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture
def tensor_cores():
    if not _extension.loaded():
        pytest.skip(f"no compiled extension: {_extension.LOAD_ERROR}")
    with tensor_core_gemv(True):
        yield


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(base.LINEAR_CASES))
def test_rms_norm_linear(tensor_cores, dtype, case):
    base.test_rms_norm_linear_matches_reference("cuda", dtype, case)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(base.GATE_UP_CASES))
def test_rms_norm_gate_up(tensor_cores, dtype, case):
    base.test_rms_norm_gate_up_matches_reference("cuda", dtype, case)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(base.DECODE_LINEAR_CASES))
def test_decode_linear(tensor_cores, dtype, case):
    base.test_decode_linear_matches_reference("cuda", dtype, case)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_kernels_round_where_the_reference_does(tensor_cores, dtype):
    base.test_kernels_round_where_the_reference_does("cuda", dtype)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("K", [577, 576], ids=["k577-cuda-cores", "k576-tensor-cores"])
def test_rows_are_batch_invariant(tensor_cores, dtype, K):
    base.test_rows_are_batch_invariant("cuda", dtype, K)


LLAMA_1B = {"hidden": 2048, "q": 2048, "kv": 512, "intermediate": 8192}


@pytest.mark.parametrize("rows", range(1, 10))
def test_llama_1b_shapes(tensor_cores, rows):
    """The four GEMVs of a Llama-3.2-1B layer (K up to 8,192, N up to 8,192) against the reference. Every row
    count: 2 rows of K 8,192 take exactly 48 KiB of dynamic shared memory, which failed to launch while the
    kernel's static arrays went uncounted (common.cuh's ensure_dynamic_smem)."""
    dtype, s = torch.bfloat16, LLAMA_1B
    x, res, nw, g = base._inputs((rows,), s["hidden"], dtype, "cuda", True, seed=rows)
    ws = [base._matrix(n, s["hidden"], dtype, "cuda", g) for n in (s["q"], s["kv"], s["kv"])]
    outs, res_out = kops.rms_norm_linear(x, res, nw, base.EPS, ws, [None] * 3, backend="cuda")
    ref_outs, ref_res = reference.rms_norm_linear(x, res, nw, base.EPS, ws, [None] * 3)
    xn64 = base._normed64(ref_res, nw, base.EPS)
    for i, (out, ref, w) in enumerate(zip(outs, ref_outs, ws)):
        base._check_close(out, ref, base._linear64(xn64, w, None), f"qkv[{i}]")
    gate, up = (base._matrix(s["intermediate"], s["hidden"], dtype, "cuda", g) for _ in range(2))
    act, _ = kops.rms_norm_gate_up(x, res, nw, base.EPS, gate, up, backend="cuda")
    ref_act, _ = reference.rms_norm_gate_up(x, res, nw, base.EPS, gate, up)
    act64 = torch.nn.functional.silu(base._linear64(xn64, gate, None)) * base._linear64(xn64, up, None)
    base._check_close(act, ref_act, act64, "act")
    for K, N in ((s["q"], s["hidden"]), (s["intermediate"], s["hidden"])):   # O and down
        # (few blocks a launch and long K: these take the deeper weight prefetch, decode_linear_mma.cuh:
        # deep_in_flight; its rows must still equal one-row launches bitwise)
        xk = torch.randn(rows, K, generator=g).to(dtype).cuda()
        w = base._matrix(N, K, dtype, "cuda", g)
        out = kops.decode_linear(xk, w, None, backend="cuda")
        base._check_close(out, reference.decode_linear(xk, w, None), base._linear64(xk.double(), w, None),
                          f"linear K={K}")
        with deep_prefetch(True):
            deep = kops.decode_linear(xk, w, None, backend="cuda")
            one_by_one = torch.cat([kops.decode_linear(xk[i:i + 1], w, None, backend="cuda") for i in range(rows)])
        assert torch.equal(deep, out), f"linear K={K}: the deeper prefetch changed bits"
        assert torch.equal(deep, one_by_one), f"linear K={K}: rows differ from one-row launches"


def deep_prefetch(enabled: bool):
    """KANGAROO_GEMV_DEEP_PREFETCH's launch option inside the block, as before after it."""
    return _extension.launch_switches(gemv_deep_prefetch=enabled)


def _kernel_names(fn) -> set:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {ev.name for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA}


@pytest.mark.parametrize("dtype,K,N,expected", [
    (torch.bfloat16, 576, 576, True),
    (torch.float16, 64, 200, True),
    (torch.bfloat16, 577, 576, False),   # K % 32 != 0
    (torch.bfloat16, 576, 100, False),   # N % 8 != 0
    (torch.float32, 576, 576, False),    # no 16-bit tensor-core path for fp32
])
@pytest.mark.parametrize("rows", [1, 7])
def test_the_switch_routes_exactly_the_eligible_shapes(dtype, K, N, expected, rows):
    """With the switch on, an eligible shape runs gemv_mma_kernel whatever the number of rows, and any
    other shape the CUDA-core gemv_kernel; with it off, always gemv_kernel."""
    skip_missing_kernel("cuda", "decode_linear")
    g = torch.Generator().manual_seed(K + N)
    x = torch.randn(rows, K, generator=g).to(dtype).cuda()
    w = torch.randn(N, K, generator=g).to(dtype).cuda()
    run = lambda: kops.decode_linear(x, w, None, backend="cuda")  # noqa: E731
    with tensor_core_gemv(True):
        names = _kernel_names(run)
    assert any("gemv_mma_kernel" in n for n in names) == expected, names
    assert any("gemv_kernel" in n and "mma" not in n for n in names) == (not expected), names
    with tensor_core_gemv(False):
        names = _kernel_names(run)
    assert not any("gemv_mma_kernel" in n for n in names), names


@pytest.mark.parametrize("enabled", [False, True], ids=["cuda-cores", "tensor-cores"])
@torch.inference_mode()
def test_bf16_speculative_equals_plain(enabled):
    """bf16, CUDA graphs: Kangaroo's tokens equal plain decoding's, token for token (batch-invariant GEMVs and
    attention: a verified row rounds like the plain step's row)."""
    import copy
    model = copy.deepcopy(tiny_model("llama", layers=4)).to(torch.bfloat16).cuda()
    adapter = kx.Adapter.for_model(model, exit_layer=2, init="next_layer")
    with tensor_core_gemv(enabled):
        for p in prompts(4, seed=21):
            p = p.cuda()
            ref = kx.generate(model, p, max_new_tokens=40, eos_token_id=[]).sequences
            for eta, gamma in ((0.0, 6), (0.5, 3)):
                out = kx.speculative_generate(model, p, adapter=adapter, max_new_tokens=40, threshold=eta,
                                              max_draft=gamma, eos_token_id=[], copy_draft=False)
                assert torch.equal(out.sequences, ref), (eta, gamma)
