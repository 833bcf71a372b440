"""Decode-time linear ops (rms_norm_linear, rms_norm_gate_up, decode_linear) on every backend against the
reference, on awkward shapes; batch invariance; bad input; opcheck.

Tolerances: twice the reference's own error against a float64 evaluation of the same math (plus a tiny
relative term), as in test_ops.py / test_ops_decode.py. The float64 evaluation starts from the rounded
residual stream (residual_out, which every backend must reproduce exactly), so the error that all
backends share bit for bit does not loosen the bound.

A bound on the error cannot see a kernel that skips one of the reference's roundings (it is then only
more accurate): test_kernels_round_where_the_reference_does checks the rounding points bitwise.
"""
import importlib

import pytest
import torch

import kangaroo_ext.ops as kops
from kangaroo_ext.ops import reference

from conftest import backend_params, device_for, skip_missing_kernel, skip_unsupported, tensor_core_gemv

BACKENDS = backend_params()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5


@pytest.fixture(autouse=True)
def _cuda_cores():
    """These tests are the CUDA-core GEMVs' (the tensor-core ones, on by default, run them again in
    test_ops_linear_mma.py with the switch on)."""
    with tensor_core_gemv(False):
        yield


def _allowed(ref_lowp, ref64):
    return 2 * (ref_lowp.double() - ref64).abs().max().item() + 1e-6 * ref64.abs().max().item()


def _normed64(stream, norm_weight, eps):
    """The reference's RMSNorm in float64 without its intermediate roundings, from the rounded stream."""
    s = stream.double()
    return norm_weight.double() * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps))


def _linear64(x64, w, b):
    return torch.nn.functional.linear(x64, w.double(), None if b is None else b.double())


def _inputs(lead, K, dtype, device, with_residual, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g).to(dtype).to(device)
    res = (4 * torch.randn(*lead, K, generator=g)).to(dtype).to(device) if with_residual else None
    nw = (1 + 0.5 * torch.randn(K, generator=g)).to(dtype).to(device)
    return x, res, nw, g


def _matrix(N, K, dtype, device, g):
    return (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype).to(device)


def _vector(N, dtype, device, g):
    return torch.randn(N, generator=g).to(dtype).to(device)


def _check_close(out, ref, ref64, what):
    assert out.shape == ref.shape and out.dtype == ref.dtype, what
    assert torch.isfinite(out).all(), what
    err = (out.double() - ref64).abs().max().item()
    allowed = _allowed(ref, ref64)
    assert err <= allowed, f"{what}: max error {err} > allowed {allowed}"


def _check_residual_out(res_out, ref_res, x, res):
    assert torch.equal(res_out, ref_res), "residual_out is one correctly rounded add: must be exact"
    if res is None:
        assert res_out.data_ptr() != x.data_ptr(), "residual_out must not alias x"


# ---- rms_norm_linear -----------------------------------------------------------------------------

LINEAR_CASES = {  # leading dims, K, N_i, residual, which weights have a bias
    "qkv-decode-576": ((1, 1), 576, (576, 192, 192), True, (False, False, False)),
    "qkv-bias-verify-7": ((1, 7), 576, (576, 192, 192), True, (True, True, True)),
    "qkv-verify-2": ((1, 2), 576, (576, 192, 192), True, (False, False, False)),
    "odd-2w-3rows": ((3,), 577, (111, 1000), False, (True, False)),
    "1w-9rows-k64": ((9,), 64, (111,), True, (True,)),
    "1w-8rows-k1536": ((8,), 1536, (576,), True, (False,)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_rms_norm_linear_matches_reference(backend, dtype, case):
    device = device_for(backend)
    skip_unsupported(backend, device, dtype)
    skip_missing_kernel(backend, "rms_norm_linear")
    lead, K, Ns, with_residual, with_bias = LINEAR_CASES[case]
    x, res, nw, g = _inputs(lead, K, dtype, device, with_residual, seed=len(case) * K)
    ws = [_matrix(N, K, dtype, device, g) for N in Ns]
    bs = [_vector(N, dtype, device, g) if b else None for N, b in zip(Ns, with_bias)]

    outs, res_out = kops.rms_norm_linear(x, res, nw, EPS, ws, bs, backend=backend)
    ref_outs, ref_res = reference.rms_norm_linear(x, res, nw, EPS, ws, bs)
    assert isinstance(outs, list) and len(outs) == len(ws)
    assert res_out.shape == x.shape and res_out.dtype == dtype
    _check_residual_out(res_out, ref_res, x, res)
    xn64 = _normed64(ref_res, nw, EPS)
    for i, (out, ref, w, b) in enumerate(zip(outs, ref_outs, ws, bs)):
        assert out.shape == (*lead, w.shape[0])
        _check_close(out, ref, _linear64(xn64, w, b), f"outs[{i}]")


# ---- rms_norm_gate_up ----------------------------------------------------------------------------

GATE_UP_CASES = {  # leading dims, K, I, residual
    "decode-576x1536": ((1, 1), 576, 1536, True),
    "verify-7-odd": ((7,), 577, 111, False),
    "verify-2": ((2,), 576, 1536, True),
    "9rows-k64-i1000": ((9,), 64, 1000, True),
    "3rows-k1536": ((1, 3), 1536, 192, True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(GATE_UP_CASES))
def test_rms_norm_gate_up_matches_reference(backend, dtype, case):
    device = device_for(backend)
    skip_unsupported(backend, device, dtype)
    skip_missing_kernel(backend, "rms_norm_gate_up")
    lead, K, I, with_residual = GATE_UP_CASES[case]
    x, res, nw, g = _inputs(lead, K, dtype, device, with_residual, seed=len(case) * K + I)
    gate, up = _matrix(I, K, dtype, device, g), _matrix(I, K, dtype, device, g)

    act, res_out = kops.rms_norm_gate_up(x, res, nw, EPS, gate, up, backend=backend)
    ref_act, ref_res = reference.rms_norm_gate_up(x, res, nw, EPS, gate, up)
    _check_residual_out(res_out, ref_res, x, res)
    xn64 = _normed64(ref_res, nw, EPS)
    act64 = torch.nn.functional.silu(_linear64(xn64, gate, None)) * _linear64(xn64, up, None)
    _check_close(act, ref_act, act64, "act")
    assert act.shape == (*lead, I)


# ---- decode_linear -------------------------------------------------------------------------------

DECODE_LINEAR_CASES = {  # leading dims, K, N, bias
    "o-proj-decode-576": ((1, 1), 576, 576, False),
    "verify-8-odd-bias": ((8,), 577, 111, True),
    "3x3-rows-k64-bias": ((3, 3), 64, 1000, True),
    "k1536-7rows": ((7,), 1536, 576, False),
    "k1536-5rows": ((5,), 1536, 576, False),
    "o-proj-verify-2": ((2,), 576, 576, False),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(DECODE_LINEAR_CASES))
def test_decode_linear_matches_reference(backend, dtype, case):
    device = device_for(backend)
    skip_unsupported(backend, device, dtype)
    skip_missing_kernel(backend, "decode_linear")
    lead, K, N, with_bias = DECODE_LINEAR_CASES[case]
    g = torch.Generator().manual_seed(len(case) * K + N)
    x = torch.randn(*lead, K, generator=g).to(dtype).to(device)
    w = _matrix(N, K, dtype, device, g)
    b = _vector(N, dtype, device, g) if with_bias else None

    out = kops.decode_linear(x, w, b, backend=backend)
    ref = reference.decode_linear(x, w, b)
    _check_close(out, ref, _linear64(x.double(), w, b), "out")
    assert out.shape == (*lead, N)


# ---- rounding points -----------------------------------------------------------------------------

def _faithful_linear(xn, w, b):
    """F.linear(xn, w, b) with an exact (float64) dot, rounded once to xn.dtype: what an fp32-accumulating
    kernel returns save where its sum lies within a summation-order error of a rounding boundary."""
    return _linear64(xn.double(), w, b).to(xn.dtype)


def _faithful_gate_up(xn, gate, up):
    g, u = _faithful_linear(xn, gate, None).float(), _faithful_linear(xn, up, None).float()
    return (torch.nn.functional.silu(g).to(xn.dtype).float() * u).to(xn.dtype)


def _mostly_equal(out, want, at_least, what):
    same = (out == want).double().mean().item()
    assert same >= at_least, f"{what}: only {same:.2%} of elements equal (need {at_least:.0%})"


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_kernels_round_where_the_reference_does(backend, dtype):
    """Bitwise checks of every rounding step in 16-bit dtypes (fp32 rounding steps are invisible to them).

    1. The normed rows, read back through an identity weight (an exact dot): the reference's values save
       where the kernel's rstd (1/sqrt, another summation order) flips a rounding (measured ~0.02%).
    2. Each op against the reference's roundings applied to exact dots of the kernel's own normed rows
       (measured ~0.2% differ: sums within fp32 summation error of a boundary). Skipping any one rounding
       step of the reference (normed, the norm weight product, g and u, silu) breaks 25-70% of them.
    gate_up is checked against the normed rows of rms_norm_linear: both ops normalise alike.
    """
    device = device_for(backend)
    skip_unsupported(backend, device, dtype)
    for op in ("rms_norm_linear", "rms_norm_gate_up", "decode_linear"):
        skip_missing_kernel(backend, op)
    K, N, I = 577, 300, 200
    x, res, nw, g = _inputs((7,), K, dtype, device, True, seed=3)
    w = _matrix(N, K, dtype, device, g)
    b = _vector(N, dtype, device, g)
    gate, up = _matrix(I, K, dtype, device, g), _matrix(I, K, dtype, device, g)
    eye = torch.eye(K, dtype=dtype, device=device)

    (xn, out), _ = kops.rms_norm_linear(x, res, nw, EPS, [eye, w], [None, b], backend=backend)
    ref_xn, _ = reference.fused_add_rms_norm(x, res, nw, EPS)
    _mostly_equal(xn, ref_xn, 0.99, "normed rows")
    _mostly_equal(out, _faithful_linear(xn, w, b), 0.95, "rms_norm_linear")
    act, _ = kops.rms_norm_gate_up(x, res, nw, EPS, gate, up, backend=backend)
    _mostly_equal(act, _faithful_gate_up(xn, gate, up), 0.95, "rms_norm_gate_up")
    _mostly_equal(kops.decode_linear(x, w, b, backend=backend), _faithful_linear(x, w, b), 0.95, "decode_linear")


# ---- batch invariance ----------------------------------------------------------------------------

def _run_all(backend, x, res, nw, ws, bs, gate, up):
    """Every op on the rows of x (and res): a flat list of outputs, rows first."""
    outs, ro = kops.rms_norm_linear(x, res, nw, EPS, ws, bs, backend=backend)
    act, ro2 = kops.rms_norm_gate_up(x, res, nw, EPS, gate, up, backend=backend)
    lin = kops.decode_linear(x, ws[0], bs[0], backend=backend)
    return outs + [ro, act, ro2, lin]


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [577, 576], ids=["k577-elementwise", "k576-vector"])
def test_rows_are_batch_invariant(backend, dtype, K):
    """A row's result is bitwise the same whatever the number of rows (and row group) it comes with."""
    device = device_for(backend)
    skip_unsupported(backend, device, dtype)
    for op in ("rms_norm_linear", "rms_norm_gate_up", "decode_linear"):
        skip_missing_kernel(backend, op)
    Ns, I = (160, 48, 48), 200
    x, res, nw, g = _inputs((9,), K, dtype, device, True, seed=7)
    ws = [_matrix(N, K, dtype, device, g) for N in Ns]
    bs = [_vector(Ns[0], dtype, device, g), None, _vector(Ns[2], dtype, device, g)]
    gate, up = _matrix(I, K, dtype, device, g), _matrix(I, K, dtype, device, g)

    full = _run_all(backend, x, res, nw, ws, bs, gate, up)              # 9 rows: two row groups on the GPU
    for rows in (slice(0, 1), slice(0, 2), slice(2, 5), slice(0, 7), slice(3, 4), slice(8, 9)):
        part = _run_all(backend, x[rows], res[rows], nw, ws, bs, gate, up)
        for j, (a, b) in enumerate(zip(part, full)):
            assert torch.equal(a, b[rows]), f"output {j}, rows {rows}: differs from the same rows in a 9-row batch"


# ---- Triton tiling: many weight blocks and K chunks ----------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_small_tiles(monkeypatch, dtype):
    """Tiny tiles on the interpreter (or the GPU), so that every remainder path runs several times."""
    why = kops.available_backends()["triton"]
    if why:
        pytest.skip("; ".join(why))
    for op in ("rms_norm_linear", "rms_norm_gate_up", "decode_linear"):
        skip_missing_kernel("triton", op)
    device = device_for("triton")
    skip_unsupported("triton", device, dtype)
    mod = importlib.import_module("kangaroo_ext.triton_kernels.decode_linear")
    monkeypatch.setattr(mod, "INTERPRET_BLOCK_N", 16)
    monkeypatch.setattr(mod, "INTERPRET_BLOCK_K", 64)
    monkeypatch.setattr(mod, "BLOCK_N_CHOICES", (16,))
    monkeypatch.setattr(mod, "BLOCK_K_BYTES", 64 * torch.tensor([], dtype=dtype).element_size())
    K, Ns, I = 201, (40, 17, 33), 37
    x, res, nw, g = _inputs((2, 5), K, dtype, device, True, seed=11)
    ws = [_matrix(N, K, dtype, device, g) for N in Ns]
    bs = [None, _vector(Ns[1], dtype, device, g), _vector(Ns[2], dtype, device, g)]
    gate, up = _matrix(I, K, dtype, device, g), _matrix(I, K, dtype, device, g)

    outs, ro = kops.rms_norm_linear(x, res, nw, EPS, ws, bs, backend="triton")
    ref_outs, ref_res = reference.rms_norm_linear(x, res, nw, EPS, ws, bs)
    assert torch.equal(ro, ref_res)
    xn64 = _normed64(ref_res, nw, EPS)
    for i, (out, ref, w, b) in enumerate(zip(outs, ref_outs, ws, bs)):
        _check_close(out, ref, _linear64(xn64, w, b), f"outs[{i}]")
    act, ro = kops.rms_norm_gate_up(x, res, nw, EPS, gate, up, backend="triton")
    ref_act, _ = reference.rms_norm_gate_up(x, res, nw, EPS, gate, up)
    assert torch.equal(ro, ref_res)
    _check_close(act, ref_act, torch.nn.functional.silu(_linear64(xn64, gate, None)) * _linear64(xn64, up, None),
                 "act")
    out = kops.decode_linear(x, ws[2], bs[2], backend="triton")
    _check_close(out, reference.decode_linear(x, ws[2], bs[2]), _linear64(x.double(), ws[2], bs[2]), "decode_linear")


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_ops_reject_bad_input(backend):
    device = device_for(backend)  # validation runs before dispatch: every backend rejects alike
    K = 64
    x = torch.randn(2, K, device=device)
    nw = torch.ones(K, device=device)
    w = torch.randn(48, K, device=device)
    b = torch.randn(48, device=device)

    def lin(weights, biases=None, **kw):
        return kops.rms_norm_linear(kw.get("x", x), kw.get("residual"), nw, EPS, weights, biases, backend=backend)

    with pytest.raises(ValueError, match=r"weights\[1\] must have shape \[N, 64\]"):
        lin([w, torch.randn(48, K + 1, device=device)])
    with pytest.raises(ValueError, match=r"weights\[0\] must have x's dtype"):
        lin([w.half()])
    with pytest.raises(ValueError, match=r"biases\[0\] must have shape \[48\]"):
        lin([w], [torch.randn(47, device=device)])
    with pytest.raises(ValueError, match=r"biases\[1\] must have x's dtype"):
        lin([w, w], [None, b.half()])
    with pytest.raises(ValueError, match="weights must be a list of 1 to 3 tensors"):
        lin([])
    with pytest.raises(ValueError, match="weights must be a list of 1 to 3 tensors"):
        lin([w, w, w, w])
    with pytest.raises(ValueError, match="biases must be a list with one tensor or None per weight"):
        lin([w, w], [b])
    with pytest.raises(ValueError, match=r"weights\[0\] must be contiguous"):
        lin([torch.randn(K, 48, device=device).t()])
    with pytest.raises(ValueError, match="residual must have x's shape"):
        lin([w], residual=torch.randn(3, K, device=device))
    with pytest.raises(ValueError, match="x must be float32, float16 or bfloat16"):
        lin([w], x=x.to(torch.int32))

    with pytest.raises(ValueError, match=r"gate must have shape \[N, 64\]"):
        kops.rms_norm_gate_up(x, None, nw, EPS, torch.randn(48, 32, device=device), w, backend=backend)
    with pytest.raises(ValueError, match="up must have x's dtype"):
        kops.rms_norm_gate_up(x, None, nw, EPS, w, w.half(), backend=backend)
    with pytest.raises(ValueError, match="up must have gate's shape"):
        kops.rms_norm_gate_up(x, None, nw, EPS, w, w[:40], backend=backend)
    with pytest.raises(ValueError, match="up must be contiguous"):
        kops.rms_norm_gate_up(x, None, nw, EPS, w, torch.randn(K, 48, device=device).t(), backend=backend)

    with pytest.raises(ValueError, match=r"weight must have shape \[N, 64\]"):
        kops.decode_linear(x, torch.randn(48, 63, device=device), backend=backend)
    with pytest.raises(ValueError, match="weight must have x's dtype"):
        kops.decode_linear(x, w.half(), backend=backend)
    with pytest.raises(ValueError, match=r"bias must have shape \[48\]"):
        kops.decode_linear(x, w, torch.randn(1, 48, device=device), backend=backend)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        kops.decode_linear(x, torch.randn(K, 48, device=device).t(), backend=backend)
    with pytest.raises(ValueError, match="x must be contiguous"):
        kops.decode_linear(torch.randn(K, 2, device=device).t(), w, backend=backend)


# ---- the torch library ---------------------------------------------------------------------------

def _opcheck_args(name):
    f32, f16 = torch.float32, torch.float16
    if name == "rms_norm_linear":
        return [(torch.randn(3, 577), torch.randn(3, 577), torch.randn(577), 1e-5,
                 [torch.randn(111, 577), torch.randn(40, 577)], [torch.randn(111), None]),
                (torch.randn(2, 1, 64, dtype=f16), None, torch.randn(64, dtype=f16), 1e-6,
                 [torch.randn(96, 64, dtype=f16)] * 3, [None, None, torch.randn(96, dtype=f16)])]
    if name == "rms_norm_gate_up":
        return [(torch.randn(3, 577), torch.randn(3, 577), torch.randn(577), 1e-5,
                 torch.randn(111, 577), torch.randn(111, 577)),
                (torch.randn(2, 1, 64, dtype=f16), None, torch.randn(64, dtype=f16), 1e-6,
                 torch.randn(96, 64, dtype=f16), torch.randn(96, 64, dtype=f16))]
    if name == "decode_linear":
        return [(torch.randn(7, 577, dtype=f32), torch.randn(111, 577), torch.randn(111)),
                (torch.randn(2, 1, 64, dtype=f16), torch.randn(96, 64, dtype=f16), None)]
    raise KeyError(name)


@pytest.mark.parametrize("name", ["rms_norm_linear", "rms_norm_gate_up", "decode_linear"])
def test_opcheck_cpu(name):
    for args in _opcheck_args(name):
        torch.library.opcheck(getattr(torch.ops.kangaroo, name).default, args)
