"""Every backend of the two pipeline ops against the PyTorch reference, on awkward shapes.

Float tolerances come from the reference's own error: the reference is run in the low precision and
in float64 on the same inputs, and a backend may be off from the float64 result by at most twice the
reference's own worst error (plus a float32 floor). Integer outputs must match exactly.
"""
import re

import pytest
import torch

import kangaroo_ext.ops as kops
from kangaroo_ext.ops import reference

from conftest import backend_params, device_for, skip_missing_kernel, skip_unsupported

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = backend_params()


def _allowed_error(ref_lowp: torch.Tensor, ref64: torch.Tensor) -> float:
    own = (ref_lowp.double() - ref64).abs().max().item()
    return 2 * own + 1e-6 * ref64.abs().max().item()


# ---- fused residual-add + RMSNorm ----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 576), (3, 576), (3, 4096), (1, 111), (3, 577), (2, 3, 576)], ids=str)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no-residual"])
def test_fused_add_rms_norm_matches_reference(backend, dtype, shape, with_residual):
    device = device_for(backend)
    skip_unsupported(backend, device, dtype)
    H = shape[-1]
    x = torch.randn(shape, device=device).to(dtype)
    res = torch.randn(shape, device=device).to(dtype) * 4 if with_residual else None
    w = (1 + 0.5 * torch.randn(H, device=device)).to(dtype)
    eps = 1e-5

    out, res_out = kops.fused_add_rms_norm(x, res, w, eps, backend=backend)
    ref_out, ref_res = reference.fused_add_rms_norm(x, res, w, eps)
    ref64_out, _ = reference.fused_add_rms_norm(x.double(), None if res is None else res.double(), w.double(), eps)
    if res is not None:  # the float64 reference must see the same rounded residual stream as everyone
        ref64_out, _ = reference.fused_add_rms_norm(ref_res.double(), None, w.double(), eps)

    assert out.shape == x.shape and res_out.shape == x.shape
    assert out.dtype == dtype and res_out.dtype == dtype
    assert torch.equal(res_out, ref_res), "residual_out is one correctly rounded add: must be exact"
    assert torch.isfinite(out).all()
    err = (out.double() - ref64_out).abs().max().item()
    assert err <= _allowed_error(ref_out, ref64_out), f"max error {err}"
    if res is None:
        assert res_out.data_ptr() != x.data_ptr(), "residual_out must not alias x"


# ---- greedy verify-and-accept --------------------------------------------------------------------

def _make_verify_case(B, k, V, dtype, device, gen):
    """Logits with planted exact ties, drafts that follow the target for a random prefix then differ."""
    logits = torch.randn(B, k + 1, V, generator=gen).to(dtype)
    # Exact ties: copy the row max to a lower index in some rows; argmax must return the lower index.
    for b in range(B):
        for j in range(0, k + 1, 2):
            row = logits[b, j]
            top = int(row.float().argmax())
            if top > 0:
                row[int(torch.randint(0, top, (1,), generator=gen))] = row[top].clone()
    target = logits.float().argmax(-1)  # on float: same order as in dtype (conversion is exact)
    drafts = torch.randint(0, V, (B, k), generator=gen)
    prefix = torch.randint(0, k + 1, (B,), generator=gen)
    for b in range(B):
        p = int(prefix[b])
        drafts[b, :p] = target[b, :p]
        if p < k and drafts[b, p] == target[b, p]:
            drafts[b, p] = (target[b, p] + 1) % V
    return drafts.to(device), logits.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [49152, 32000, 111])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("k", range(1, 8))
def test_verify_accept_matches_reference(backend, dtype, V, B, k):
    device = device_for(backend)
    skip_unsupported(backend, device, dtype)
    gen = torch.Generator().manual_seed(1000 * k + V + B)
    drafts, logits = _make_verify_case(B, k, V, dtype, device, gen)
    for num_drafted in (None, torch.randint(0, k + 1, (B,), generator=gen).to(device)):
        accepted, committed = kops.verify_accept(drafts, logits, num_drafted, backend=backend)
        ref_acc, ref_com = reference.verify_accept(drafts, logits, num_drafted)
        assert accepted.dtype == torch.int64 and committed.dtype == torch.int64
        assert torch.equal(accepted, ref_acc) and torch.equal(committed, ref_com)
        _check_verify_invariants(drafts, logits, num_drafted, accepted, committed)


def _check_verify_invariants(drafts, logits, num_drafted, accepted, committed):
    B, k = drafts.shape
    n = torch.full((B,), k) if num_drafted is None else num_drafted.cpu()
    target = logits.float().argmax(-1).cpu()
    drafts, accepted, committed = drafts.cpu(), accepted.cpu(), committed.cpu()
    for b in range(B):
        a = int(accepted[b])
        assert 0 <= a <= int(n[b])
        assert torch.equal(committed[b, :a], drafts[b, :a]), "accepted slots hold the drafts"
        assert torch.equal(drafts[b, :a], target[b, :a]), "every accepted draft is the target's argmax"
        assert int(committed[b, a]) == int(target[b, a]), "slot a holds the target's correction or bonus"
        if a < int(n[b]):
            assert int(drafts[b, a]) != int(target[b, a]), "the first rejected draft really disagrees"
        assert (committed[b, a + 1:] == -1).all(), "rejected slots are -1"


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_accept_nan_counts_as_max_like_torch_argmax(backend):
    device = device_for(backend)
    logits = torch.randn(1, 3, 111)
    logits[0, 1, 7] = float("nan")
    logits[0, 1, 50] = float("nan")
    drafts = logits.argmax(-1)[:, :2].clone()
    accepted, committed = kops.verify_accept(drafts.to(device), logits.to(device), backend=backend)
    assert committed.cpu()[0].tolist() == logits.argmax(-1)[0].tolist()
    assert committed.cpu()[0, 1] == 7 and accepted.item() == 2


# ---- greedy accept on the target's tokens -------------------------------------------------------

def _make_accept_case(B, k, gen):
    """Target tokens from a small vocabulary (so drafts often match by chance too) and drafts that
    follow them for a random prefix, then differ."""
    target = torch.randint(0, 7, (B, k + 1), generator=gen)
    drafts = torch.randint(0, 7, (B, k), generator=gen)
    prefix = torch.randint(0, k + 1, (B,), generator=gen)
    for b in range(B):
        p = int(prefix[b])
        drafts[b, :p] = target[b, :p]
        if p < k:
            drafts[b, p] = (target[b, p] + 1) % 7
    return drafts, target


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B", [1, 3, 5])
@pytest.mark.parametrize("k", [1, 2, 7, 16])
def test_accept_greedy_matches_reference(backend, B, k):
    device = device_for(backend)
    gen = torch.Generator().manual_seed(100 * k + B)
    drafts, target = _make_accept_case(B, k, gen)
    drafts, target = drafts.to(device), target.to(device)
    counts = (None, torch.randint(0, k + 1, (B,), generator=gen), torch.zeros(B, dtype=torch.int64),
              torch.full((B,), k), torch.tensor([-3, k + 5, 1] * B)[:B])  # last: out of range, clamped
    for num_drafted in counts:
        n = None if num_drafted is None else num_drafted.to(device)
        accepted, committed = kops.accept_greedy(drafts, target, n, backend=backend)
        ref_acc, ref_com = reference.accept_greedy(drafts, target, n)
        assert accepted.dtype == torch.int64 and committed.dtype == torch.int64
        assert accepted.shape == (B,) and committed.shape == (B, k + 1)
        assert torch.equal(accepted, ref_acc) and torch.equal(committed, ref_com)
        if num_drafted is not None and not num_drafted.any():
            assert not accepted.any() and torch.equal(committed[:, 0], target[:, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_accept_greedy_long_chain_spans_several_chunks(backend):
    """k past one warp's 32 positions and past the Triton kernel's 1024-position chunk."""
    device = device_for(backend)
    gen = torch.Generator().manual_seed(5)
    drafts, target = _make_accept_case(3, 1500, gen)
    drafts[0], target[0, :1500] = 1, 1     # row 0 accepts everything: the bonus token ends the row
    drafts, target = drafts.to(device), target.to(device)
    accepted, committed = kops.accept_greedy(drafts, target, None, backend=backend)
    ref_acc, ref_com = reference.accept_greedy(drafts, target, None)
    assert accepted[0].item() == 1500
    assert torch.equal(accepted, ref_acc) and torch.equal(committed, ref_com)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_verify_accept_is_accept_greedy_on_the_argmax(backend, dtype):
    """One accept rule: verify_accept(logits) == accept_greedy(logits.argmax(-1)), planted ties included."""
    device = device_for(backend)
    skip_unsupported(backend, device, dtype)
    gen = torch.Generator().manual_seed(21)
    for B, k in ((1, 1), (3, 4), (5, 7)):
        drafts, logits = _make_verify_case(B, k, 111, dtype, device, gen)
        for num_drafted in (None, torch.randint(0, k + 1, (B,), generator=gen).to(device)):
            want = kops.accept_greedy(drafts, logits.argmax(-1), num_drafted, backend=backend)
            got = kops.verify_accept(drafts, logits, num_drafted, backend=backend)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_accept_greedy_auto_selection_takes_the_kernels(monkeypatch):
    """Auto-selection runs accept_greedy's CUDA kernel on CUDA tensors (its GPU tests passed on an H100 at
    bf2d3ab) and the reference on CPU tensors (the Triton interpreter is never chosen automatically)."""
    monkeypatch.delenv("KANGAROO_BACKEND", raising=False)
    d, t = torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, 3, dtype=torch.int64)
    assert kops.select("accept_greedy", None, d, t, None) is reference.accept_greedy
    if not kops.available_backends()["triton"]:
        assert kops.reasons_against("accept_greedy", "triton", d, t, None) == []   # forced: runs
    if torch.cuda.is_available():
        d, t = d.cuda(), t.cuda()
        first = next(b for b in kops.ORDER if not kops.available_backends()[b])
        assert kops.reasons_against("accept_greedy", first, d, t, None, auto=True) == []
        assert kops.select("accept_greedy", None, d, t, None) is not reference.accept_greedy


# ---- a greedy draft step's bookkeeping -----------------------------------------------------------

ETA = 0.25  # exact in float32: a confidence of exactly η must be kept


def _take_draft_case(B, G, with_ids, device, gen):
    """Buffers as a round leaves them, and a proposal whose rows take the confidences above η, exactly η
    (kept), NaN and below η (not kept) in turn, every third row already inactive. With draft_ids the head
    indices include -1 (read as index 0); without, token ids pass through unchanged, -1 included."""
    N = 9
    ids = torch.randperm(1000, generator=gen)[:N] if with_ids else None
    token = torch.randint(-1, N if with_ids else 1000, (B, 1), generator=gen)
    confidence = torch.tensor([0.9, ETA, float("nan"), 0.1])[torch.arange(B) % 4][:, None]
    active = torch.arange(B) % 3 != 2
    bufs = dict(active=active, num_drafted=torch.randint(0, G + 1, (B,), generator=gen),
                draft_tokens=torch.randint(0, 1000, (B, G), generator=gen),
                tokens_in=torch.randint(0, 1000, (B, G + 1), generator=gen))
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(token), move(confidence), torch.tensor(ETA, device=device), {k: move(v) for k, v in bufs.items()}, \
        move(ids)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B", [1, 3, 5])
@pytest.mark.parametrize("G", [1, 6, 17])
@pytest.mark.parametrize("with_ids", [True, False], ids=["draft-ids", "token-ids"])
def test_take_draft_matches_reference(backend, B, G, with_ids):
    device = device_for(backend)
    gen = torch.Generator().manual_seed(100 * B + G + with_ids)
    for step in sorted({0, G // 2, G - 1}):                     # first, middle, last column
        token, conf, eta, before, ids = _take_draft_case(B, G, with_ids, device, gen)
        got, want = ({k: v.clone() for k, v in before.items()} for _ in range(2))
        keep = kops.take_draft(token, conf, eta, *got.values(), step, ids, backend=backend)
        ref_keep = reference.take_draft(token, conf, eta, *want.values(), step, ids)
        assert keep.dtype == torch.bool and keep.shape == (B,) and keep.data_ptr() != got["active"].data_ptr()
        assert torch.equal(keep, ref_keep)
        for name in before:
            assert torch.equal(got[name], want[name]), f"{name} differs from the reference at step {step}"
        # The definition, row by row: every backend (the reference included) is checked against it.
        t = ids[token.clamp_min(0)] if with_ids else token                                  # [B, 1]
        expected = [bool(a) and c >= ETA for a, c in zip(before["active"].tolist(), conf[:, 0].tolist())]
        assert keep.tolist() == expected and torch.equal(got["active"], keep)
        assert torch.equal(got["num_drafted"], before["num_drafted"] + keep.long())
        assert torch.equal(got["draft_tokens"][:, step], t[:, 0])
        assert torch.equal(got["tokens_in"][:, step + 1], t[:, 0])
        untouched = [j for j in range(G) if j != step]             # draft_tokens' other columns
        assert torch.equal(got["draft_tokens"][:, untouched], before["draft_tokens"][:, untouched])
        untouched = [j for j in range(G + 1) if j != step + 1]     # tokens_in's
        assert torch.equal(got["tokens_in"][:, untouched], before["tokens_in"][:, untouched])


def test_take_draft_auto_selection(monkeypatch):
    """Auto-selection runs take_draft's CUDA kernel on CUDA tensors (its GPU tests passed at 4d5b778) and the
    reference on the CPU, never the Triton interpreter; a forced backend runs its kernel regardless."""
    monkeypatch.delenv("KANGAROO_BACKEND", raising=False)
    device = device_for("reference")   # CUDA where there is one
    token, conf, eta, bufs, ids = _take_draft_case(2, 3, True, device, torch.Generator().manual_seed(0))
    args = (token, conf, eta, *bufs.values(), 1, ids)
    chosen = kops.select("take_draft", None, *args)
    if device == "cuda" and kops.available_backends()["cuda"] == []:
        assert chosen is not reference.take_draft
    elif device == "cpu":
        assert chosen is reference.take_draft
        if kops.available_backends()["triton"] == []:
            assert any("interpreter" in r for r in kops.reasons_against("take_draft", "triton", *args, auto=True))


# ---- bad input: each backend's entry point names the argument ------------------------------------

def _rms_args(device):
    x = torch.randn(2, 8, device=device)
    return x, torch.randn(2, 8, device=device), torch.ones(8, device=device)


BAD_RMS = {
    "x dtype": (lambda x, r, w: (x.long(), None, w), "x must be float32"),
    "weight shape": (lambda x, r, w: (x, r, torch.ones(7, device=x.device)), r"weight must have shape \[8\]"),
    "weight dtype": (lambda x, r, w: (x, r, w.half()), "weight must have x's dtype"),
    "residual shape": (lambda x, r, w: (x, r[:1], w), "residual must have x's shape"),
    "residual dtype": (lambda x, r, w: (x, r.half(), w), "residual must have x's dtype"),
    "x non-contiguous": (lambda x, r, w: (torch.randn(8, 2, device=x.device).t(), None, w), "x must be contiguous"),
    "x empty": (lambda x, r, w: (x[:0], None, w), "x must have shape"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_RMS))
def test_fused_add_rms_norm_rejects_bad_input(backend, case):
    make, msg = BAD_RMS[case]
    args = make(*_rms_args(device_for(backend)))
    with pytest.raises(ValueError, match=msg):
        kops.fused_add_rms_norm(*args, 1e-5, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_add_rms_norm_rejects_negative_eps_and_mixed_devices(backend):
    x, r, w = _rms_args(device_for(backend))
    with pytest.raises(ValueError, match="eps must be a float >= 0"):
        kops.fused_add_rms_norm(x, r, w, -1.0, backend=backend)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="weight is on cpu but x is on cuda"):
            kops.fused_add_rms_norm(x.cuda(), r.cuda(), w.cpu(), 1e-5, backend=backend)


BAD_VERIFY = {
    "drafts dtype": (lambda d, l, n: (d.int(), l, n), "draft_tokens must be int64"),
    "drafts 1-D": (lambda d, l, n: (d[0], l, n), "draft_tokens must be int64 of shape"),
    "logits shape": (lambda d, l, n: (d, l[:, :-1], n), r"target_logits must have shape \[B, k\+1, V\]"),
    "logits dtype": (lambda d, l, n: (d, l.long(), n), "target_logits must be float32"),
    "num_drafted shape": (lambda d, l, n: (d, l, n[:1]), "num_drafted must be int64 of shape"),
    "num_drafted dtype": (lambda d, l, n: (d, l, n.int()), "num_drafted must be int64"),
    "logits non-contiguous": (lambda d, l, n: (d, l.transpose(0, 1).contiguous().transpose(0, 1), n),
                              "target_logits must be contiguous"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_VERIFY))
def test_verify_accept_rejects_bad_input(backend, case):
    device = device_for(backend)
    d = torch.randint(0, 50, (2, 3), device=device)
    logits = torch.randn(2, 4, 50, device=device)
    n = torch.tensor([1, 3], device=device)
    make, msg = BAD_VERIFY[case]
    with pytest.raises(ValueError, match=msg):
        kops.verify_accept(*make(d, logits, n), backend=backend)


BAD_ACCEPT = {
    "drafts dtype": (lambda d, t, n: (d.int(), t, n), "draft_tokens must be int64"),
    "drafts 1-D": (lambda d, t, n: (d[0], t, n), r"draft_tokens must be int64 of shape \[B, k\]"),
    "drafts empty": (lambda d, t, n: (d[:, :0], t[:, :1], n), "with k >= 1"),
    "target dtype": (lambda d, t, n: (d, t.float(), n), r"target_tokens must be int64 of shape \[B, k\+1\]"),
    "target logits": (lambda d, t, n: (d, torch.randn(2, 4, 50, device=d.device), n), "target_tokens must be int64"),
    "target k+1": (lambda d, t, n: (d, t[:, :-1], n), r"\[B, k\+1\] = \[2, 4\] .* got torch.int64 \(2, 3\)"),
    "target B": (lambda d, t, n: (d, t[:1], n), r"\[B, k\+1\] = \[2, 4\] .* got torch.int64 \(1, 4\)"),
    "target non-contiguous": (lambda d, t, n: (d, t.t().contiguous().t(), n), "target_tokens must be contiguous"),
    "num_drafted shape": (lambda d, t, n: (d, t, n[:1]), r"num_drafted must be int64 of shape \[2\]"),
    "num_drafted dtype": (lambda d, t, n: (d, t, n.int()), "num_drafted must be int64"),
    "k too large": (lambda d, t, n: (d.new_zeros(2, 1 << 20), t.new_zeros(2, (1 << 20) + 1), n), r"k < 2\^20"),
    "not a tensor": (lambda d, t, n: (d, t.tolist(), n), "target_tokens must be a torch.Tensor"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_ACCEPT))
def test_accept_greedy_rejects_bad_input(backend, case):
    device = device_for(backend)
    d = torch.randint(0, 50, (2, 3), device=device)
    t = torch.randint(0, 50, (2, 4), device=device)
    n = torch.tensor([1, 3], device=device)
    make, msg = BAD_ACCEPT[case]
    with pytest.raises(ValueError, match=msg):
        kops.accept_greedy(*make(d, t, n), backend=backend)


def _column_major(t):
    return t.t().contiguous().t()   # [B, G] values with column-major strides


BAD_TAKE_DRAFT = {  # (token, confidence, threshold, active, num_drafted, draft_tokens, tokens_in, step, draft_ids)
    "token dtype": (lambda a: a.update(token=a["token"].int()), r"token must be int64 of shape \[B, 1\]"),
    "token [B]": (lambda a: a.update(token=a["token"][:, 0]), r"token must be int64 of shape \[B, 1\]"),
    "token no rows": (lambda a: a.update(token=a["token"][:0]), r"token must have at least one row \(B >= 1\)"),
    "token non-contiguous": (lambda a: a.update(token=a["token"].repeat(1, 2)[:, :1]), "token must be contiguous"),
    "not a tensor": (lambda a: a.update(token=a["token"].tolist()), "token must be a torch.Tensor"),
    "confidence dtype": (lambda a: a.update(confidence=a["confidence"].double()),
                         r"confidence must be float32 of shape \[B, 1\] = \[3, 1\], got torch.float64"),
    "confidence [B]": (lambda a: a.update(confidence=a["confidence"][:, 0]), r"= \[3, 1\], got torch.float32 \(3,\)"),
    "threshold [1]": (lambda a: a.update(threshold=a["threshold"][None]), "threshold must be a 0-dim float32 tensor"),
    "threshold dtype": (lambda a: a.update(threshold=a["threshold"].double()), "threshold must be a 0-dim float32"),
    "threshold a float": (lambda a: a.update(threshold=0.25), "threshold must be a torch.Tensor"),
    "active dtype": (lambda a: a.update(active=a["active"].long()), r"active must be bool of shape \[B\] = \[3\]"),
    "active non-contiguous": (lambda a: a.update(active=a["active"].repeat(2)[::2]), "active must be contiguous"),
    "num_drafted dtype": (lambda a: a.update(num_drafted=a["num_drafted"].int()),
                          r"num_drafted must be int64 of shape \[B\] = \[3\], got torch.int32"),
    "num_drafted B": (lambda a: a.update(num_drafted=a["num_drafted"][:2]), r"num_drafted must be int64 .* \(2,\)"),
    "draft_tokens 1-D": (lambda a: a.update(draft_tokens=a["draft_tokens"][0]),
                         r"draft_tokens must be int64 of shape \[B, G\] with G >= 1"),
    "draft_tokens G = 0": (lambda a: a.update(draft_tokens=a["draft_tokens"][:, :0]), "with G >= 1"),
    "draft_tokens B": (lambda a: a.update(draft_tokens=a["draft_tokens"][:2].contiguous()),
                       r"draft_tokens must be int64 of shape \[B, G\] = \[3, 6\], got torch.int64 \(2, 6\)"),
    "draft_tokens dtype": (lambda a: a.update(draft_tokens=a["draft_tokens"].int()), "got torch.int32"),
    "draft_tokens non-contiguous": (lambda a: a.update(draft_tokens=_column_major(a["draft_tokens"])),
                                    "draft_tokens must be contiguous"),
    "tokens_in G": (lambda a: a.update(tokens_in=a["tokens_in"][:, :-1].contiguous()),
                    r"tokens_in must be int64 of shape \[B, G\+1\] = \[3, 7\], got torch.int64 \(3, 6\)"),
    "tokens_in non-contiguous": (lambda a: a.update(tokens_in=_column_major(a["tokens_in"])),
                                 "tokens_in must be contiguous"),
    "step negative": (lambda a: a.update(step=-1), r"step must be an int in \[0, G\) = \[0, 6\) .*got -1"),
    "step G": (lambda a: a.update(step=6), r"step must be an int in \[0, G\) = \[0, 6\) .*got 6"),
    "step a float": (lambda a: a.update(step=1.0), r"step must be an int .*got 1.0"),
    "draft_ids dtype": (lambda a: a.update(draft_ids=a["draft_ids"].int()), r"draft_ids must be int64 of shape \[N\]"),
    "draft_ids empty": (lambda a: a.update(draft_ids=a["draft_ids"][:0]), r"with N >= 1 .* got torch.int64 \(0,\)"),
    "draft_ids 2-D": (lambda a: a.update(draft_ids=a["draft_ids"][None]), r"draft_ids must be int64 of shape \[N\]"),
    "draft_ids non-contiguous": (lambda a: a.update(draft_ids=a["draft_ids"][::2]), "draft_ids must be contiguous"),
}


def _take_draft_args(device):
    token, conf, eta, bufs, ids = _take_draft_case(3, 6, True, device, torch.Generator().manual_seed(1))
    return dict(token=token, confidence=conf, threshold=eta, **bufs, step=2, draft_ids=ids)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_TAKE_DRAFT))
def test_take_draft_rejects_bad_input(backend, case):
    args = _take_draft_args(device_for(backend))
    make, msg = BAD_TAKE_DRAFT[case]
    make(args)
    with pytest.raises(ValueError, match=msg):
        kops.take_draft(**args, backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device beside the CPU")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["confidence", "threshold", "active", "num_drafted", "draft_tokens", "tokens_in",
                                  "draft_ids"])
def test_take_draft_rejects_mixed_devices(backend, name):
    args = _take_draft_args("cuda")
    args[name] = args[name].cpu()
    with pytest.raises(ValueError, match=f"{name} is on cpu but token is on cuda"):
        kops.take_draft(**args, backend=backend)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_take_draft_cuda_launcher_checks_as_validate_does():
    """The compiled op called directly (no validate.py) rejects every bad input with validate.py's ValueError:
    the same argument and expectation, up to how the two print what they got."""
    from kangaroo_ext.ops import validate
    skip_missing_kernel("cuda", "take_draft")
    for case, (make, _) in BAD_TAKE_DRAFT.items():
        args = _take_draft_args("cuda")
        make(args)
        if not all(isinstance(v, torch.Tensor) for k, v in args.items() if k != "step") or \
                not isinstance(args["step"], int):
            continue  # not a tensor (an int): the dispatcher refuses it before the launcher runs
        with pytest.raises(ValueError) as want:
            validate.take_draft(*args.values())
        expected = re.split(r",? \(?got ", str(want.value))[0]
        with pytest.raises(ValueError, match=r"(?<!\w)" + re.escape(expected)):   # the message names the argument
            torch.ops.kangaroo.take_draft(*args.values())
    for name in ("confidence", "threshold", "active", "num_drafted", "draft_tokens", "tokens_in", "draft_ids"):
        args = _take_draft_args("cuda")
        args[name] = args[name].cpu()
        with pytest.raises(ValueError, match=rf"(?<!\w){name} (must be a CUDA tensor|is on cpu but token is on cuda)"):
            torch.ops.kangaroo.take_draft(*args.values())


# ---- dispatch ------------------------------------------------------------------------------------

def test_forced_unavailable_backend_lists_reasons(monkeypatch):
    x, r, w = _rms_args("cpu")
    with pytest.raises(kops.BackendUnavailable, match="backend 'cuda' cannot run fused_add_rms_norm: .+"):
        kops.fused_add_rms_norm(x, r, w, 1e-5, backend="cuda")
    monkeypatch.setenv("KANGAROO_BACKEND", "nosuch")
    with pytest.raises(ValueError, match="KANGAROO_BACKEND='nosuch' is not a backend: use one of auto, cuda"):
        kops.fused_add_rms_norm(x, r, w, 1e-5)


def test_auto_selection_falls_back_quietly(monkeypatch):
    monkeypatch.delenv("KANGAROO_BACKEND", raising=False)
    x, r, w = _rms_args("cpu")
    x = x.bfloat16(); r = r.bfloat16(); w = w.bfloat16()  # no kernel backend takes CPU bf16
    out, _ = kops.fused_add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(out, reference.fused_add_rms_norm(x, r, w, 1e-5)[0])
    assert kops.reasons_against("fused_add_rms_norm", "cuda", x, r, w, 1e-5)


def test_env_variable_forces_backend(monkeypatch):
    monkeypatch.setenv("KANGAROO_BACKEND", "reference")
    x, r, w = _rms_args("cpu")
    assert kops.select("fused_add_rms_norm", None, x, r, w, 1e-5) is reference.fused_add_rms_norm


def test_auto_selection_never_picks_the_triton_interpreter(monkeypatch):
    monkeypatch.delenv("KANGAROO_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, r, w = _rms_args("cpu")
    assert kops.select("fused_add_rms_norm", None, x, r, w, 1e-5) is reference.fused_add_rms_norm
