"""The sampling ops: random numbers, every backend against the reference, bad input.

The statistical tests (the ops really sample the target's distribution) are in
test_ops_sampling_distribution.py. Triton runs under the CPU interpreter here, which costs ~0.5 s per
call: it gets a subset of the settings that still covers every temperature, top-k and top-p value;
CUDA (and Triton on a GPU) get them all, and the default model's vocabulary.
"""
import itertools
import math

import pytest
import torch

import kangaroo_ext.ops as kops
from kangaroo_ext.ops import reference

from conftest import backend_params, device_for, skip_unsupported

BACKENDS = backend_params()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ON_GPU = torch.cuda.is_available()
# 49152: the default model; 65536 does not fit one block's shared memory: the CUDA kernels' other path.
VOCABS = [1, 7, 50, 1000] + ([49152, 65536] if ON_GPU else [])
# (temperature, top_k, top_p): every combination, and a subset covering each value for the interpreter.
ALL_SETTINGS = list(itertools.product([0.5, 1.0, 1.5], [0, 1, 5], [1.0, 0.8]))
FEW_SETTINGS = [(0.5, 0, 1.0), (1.0, 1, 0.8), (1.5, 5, 1.0), (0.5, 5, 0.8), (1.0, 0, 0.8), (1.5, 1, 1.0)]


def _settings(backend, device, few=FEW_SETTINGS):
    return few if backend == "triton" and device == "cpu" else ALL_SETTINGS


def _rng(seed, offset, device):
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


# ---- random numbers --------------------------------------------------------------------------------

# Random123's known-answer vectors for Philox4x32-10 (kat_vectors: counter, key -> output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _philox_python(counter, key):
    """Philox4x32-10 on Python integers, written independently of reference.py."""
    (c0, c1, c2, c3), (k0, k1) = counter, key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c3 ^ k1, p0 & 0xFFFFFFFF
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    assert _philox_python(counter, key) == expected
    got = reference.philox4x32_10(torch.tensor(counter), torch.tensor(key))
    assert tuple(got.tolist()) == expected


def test_philox_matches_python_on_random_counters():
    gen = torch.Generator().manual_seed(1)
    counters = torch.randint(0, 2 ** 32, (64, 4), generator=gen)
    keys = torch.randint(0, 2 ** 32, (64, 2), generator=gen)
    got = reference.philox4x32_10(counters, keys)
    for c, k, g in zip(counters.tolist(), keys.tolist(), got.tolist()):
        assert tuple(g) == _philox_python(c, k)


def test_uniform_is_the_documented_function_of_the_philox_words():
    seed, offset, row, stream = -0x123456789, (7 << 32) + 5, 3, 11  # offset: only its low 32 bits count
    i = torch.arange(10)
    u = reference.uniform(seed, offset, row, stream, i)
    key = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    for e in range(10):
        word = _philox_python((e // 4, row, stream, 5), key)[e % 4]
        assert u[e].item() == ((word >> 9) + 0.5) * 2.0 ** -23
    assert u.dtype == torch.float32
    assert torch.equal(u, reference.uniform(seed, 5, row, stream, i))
    assert not torch.equal(u, reference.uniform(seed + (1 << 32), offset, row, stream, i)), "the seed's high half"


def test_uniform_range_and_uniformity():
    u = reference.uniform(2024, 0, torch.arange(64)[:, None], 0, torch.arange(16384))  # [64, 16384]
    assert u.min().item() > 0 and u.max().item() < 1
    assert u.min().item() >= 2.0 ** -24 and u.max().item() <= 1 - 2.0 ** -24
    n = u.numel()
    assert abs(u.double().mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    counts = torch.histc(u, bins=64, min=0, max=1)
    expected = n / 64
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 130, f"chi-square {chi2:.1f} over 63 degrees of freedom (p ~ 1e-6 at 130)"
    # rows, streams and offsets give different numbers
    i = torch.arange(16)
    base = reference.uniform(2024, 0, 0, 0, i)
    for other in (reference.uniform(2024, 0, 1, 0, i), reference.uniform(2024, 0, 0, 1, i),
                  reference.uniform(2024, 1, 0, 0, i)):
        assert (base != other).all()


def test_uniform_prefix_equals_uniform():
    rows = torch.arange(5)
    for V in (1, 7, 50):
        assert torch.equal(reference._uniform_prefix(-77, 2 ** 33 + 5, rows, 9, V),
                           reference.uniform(-77, 2 ** 33 + 5, rows[:, None], 9, torch.arange(V)))


# ---- every backend against the reference -----------------------------------------------------------

def _allowed_error(ref_lowp: torch.Tensor, ref64: torch.Tensor) -> float:
    """Twice the reference's own float32 error (against its float64 self) plus a float32 floor."""
    own = (ref_lowp.double() - ref64).abs().max().item()
    return 2 * own + 1e-6 * ref64.abs().max().item()


def _logits(shape, dtype, device, gen, scale=3.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype).to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", VOCABS)
def test_sample_logits_matches_reference(backend, dtype, V):
    device = device_for(backend)
    skip_unsupported(backend, device, dtype)
    gen = torch.Generator().manual_seed(V)
    logits = _logits((3, V), dtype, device, gen)
    for s, (temperature, top_k, top_p) in enumerate(_settings(backend, device)):
        rng = _rng(1000 + s, s, device)
        token, probs, top_prob = kops.sample_logits(logits, temperature, top_k, top_p, rng, 5, backend=backend)
        ref_token, ref_probs, ref_top = reference.sample_logits(logits, temperature, top_k, top_p, rng, 5)
        ref64 = reference.sampling_probs(logits.double(), temperature, top_k, top_p)
        setting = f"T={temperature} top_k={top_k} top_p={top_p}"
        assert token.dtype == torch.int64 and probs.dtype == torch.float32 and top_prob.dtype == torch.float32
        assert torch.equal(token, ref_token), setting
        assert torch.equal(probs == 0, ref_probs == 0), f"{setting}: the kept tokens differ"
        tol = _allowed_error(ref_probs, ref64)
        assert (probs.double() - ref64).abs().max().item() <= tol, setting
        assert (top_prob.double() - ref64.amax(-1)).abs().max().item() <= tol, setting
        assert torch.equal(rng.cpu(), torch.tensor([1000 + s, s])), "the op must not advance rng"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sampling_probs_matches_reference(backend, dtype):
    device = device_for(backend)
    skip_unsupported(backend, device, dtype)
    gen = torch.Generator().manual_seed(3)
    logits = _logits((2, 3, 50), dtype, device, gen)
    few = [(1.0, 5, 0.8), (0.5, 0, 1.0)]
    for temperature, top_k, top_p in _settings(backend, device, few):
        probs = kops.sampling_probs(logits, temperature, top_k, top_p, backend=backend)
        ref = reference.sampling_probs(logits, temperature, top_k, top_p)
        ref64 = reference.sampling_probs(logits.double(), temperature, top_k, top_p)
        assert probs.shape == logits.shape and probs.dtype == torch.float32
        assert torch.equal(probs == 0, ref == 0)
        assert (probs.double() - ref64).abs().max().item() <= _allowed_error(ref, ref64)
        assert (probs.sum(-1) - 1).abs().max().item() < 1e-5


# Exact expectations on planted ties: top-k keeps a whole tie group at the boundary; top-p keeps every
# token whose strictly more probable tokens weigh < top_p, so tied tokens stay or go together.
TIES = [
    # logits, top_k, top_p, kept
    ([3.0, 2.0, 2.0, 2.0, 1.0, 0.0], 2, 1.0, [1, 1, 1, 1, 0, 0]),
    ([3.0, 2.0, 2.0, 2.0, 1.0, 0.0], 1, 1.0, [1, 0, 0, 0, 0, 0]),
    ([3.0, 2.0, 2.0, 2.0, 1.0, 0.0], 9, 1.0, [1, 1, 1, 1, 1, 1]),
    ([1.0, 1.0, 0.0], 0, 0.5, [1, 1, 0]),
    ([0.0, 1.0, 1.0, 0.0, -1.0], 0, 0.3, [0, 1, 1, 0, 0]),
    ([0.0, 1.0, 1.0, 0.0, -1.0], 0, 0.95, [1, 1, 1, 1, 0]),
    ([2.0, float("-inf"), 1.0, float("-inf")], 3, 1.0, [1, 0, 1, 0]),
    ([5.0, 0.0, 0.0, 0.0], 0, 0.1, [1, 0, 0, 0]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("logits, top_k, top_p, kept", TIES)
def test_sampling_probs_tie_groups(backend, logits, top_k, top_p, kept):
    x = torch.tensor([logits], device=device_for(backend))
    probs = kops.sampling_probs(x, 1.0, top_k, top_p, backend=backend).cpu()[0]
    assert (probs > 0).long().tolist() == kept
    z = torch.tensor(logits).masked_fill(~torch.tensor(kept, dtype=torch.bool), float("-inf"))
    torch.testing.assert_close(probs, torch.softmax(z, -1), rtol=1e-6, atol=1e-7)


def _accept_case(B, k, V, dtype, device, gen, temperature, top_k, top_p):
    """Target logits; draft distributions near the target's (so that drafts are often accepted); drafts
    drawn from them."""
    target = (torch.randn(B, k + 1, V, generator=gen) * 2).to(dtype)
    draft_logits = target[:, :k].float() + 0.7 * torch.randn(B, k, V, generator=gen)
    q = reference.sampling_probs(draft_logits, temperature, top_k, top_p)                # [B, k, V]
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, k)
    return drafts.to(device), q.to(device), target.to(device)


def _check_accept_invariants(drafts, q, target, num_drafted, accepted, committed, settings):
    B, k = drafts.shape
    p = reference.sampling_probs(target.cpu(), *settings)                                # [B, k+1, V]
    n = torch.full((B,), k) if num_drafted is None else num_drafted.cpu().clamp(0, k)
    drafts, accepted, committed = drafts.cpu(), accepted.cpu(), committed.cpu()
    for b in range(B):
        a = int(accepted[b])
        assert 0 <= a <= int(n[b])
        assert torch.equal(committed[b, :a], drafts[b, :a]), "accepted slots hold the drafts"
        assert all(p[b, j, drafts[b, j]] > 0 for j in range(a)), "an accepted draft has target probability > 0"
        assert p[b, a, committed[b, a]] > 0, "the new token has target probability > 0"
        assert (committed[b, a + 1:] == -1).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("B, k", [(1, 4), (3, 1)] + ([(1, 1), (3, 4)] if ON_GPU else []), ids=str)
def test_speculative_sample_accept_matches_reference(backend, dtype, V, B, k):
    device = device_for(backend)
    skip_unsupported(backend, device, dtype)
    few = [(0.5, 0, 1.0), (1.0, 5, 0.8), (1.5, 1, 0.8)]
    gen = torch.Generator().manual_seed(100 * V + 10 * B + k)
    for s, settings in enumerate(_settings(backend, device, few)):
        drafts, q, target = _accept_case(B, k, V, dtype, device, gen, *settings)
        for num_drafted in (None, torch.tensor([0, k, 1][:B] if B > 1 else [k - 1], device=device)):
            rng = _rng(77 + s, 3 * s, device)
            accepted, committed = kops.speculative_sample_accept(drafts, q, target, num_drafted, *settings, rng,
                                                                 backend=backend)
            ref_acc, ref_com = reference.speculative_sample_accept(drafts, q, target, num_drafted, *settings, rng)
            assert accepted.dtype == torch.int64 and committed.dtype == torch.int64
            assert accepted.shape == (B,) and committed.shape == (B, k + 1)
            assert torch.equal(accepted, ref_acc), f"settings {settings}, num_drafted {num_drafted}"
            assert torch.equal(committed, ref_com), f"settings {settings}, num_drafted {num_drafted}"
            _check_accept_invariants(drafts, q, target, num_drafted, accepted, committed, settings)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accept_handles_drafts_outside_the_vocabulary(backend):
    device = device_for(backend)
    gen = torch.Generator().manual_seed(5)
    drafts, q, target = _accept_case(2, 3, 7, torch.float32, device, gen, 1.0, 0, 1.0)
    drafts[0, 0] = 7       # out of range: rejected at once
    drafts[1, 2] = -1      # padding beyond num_drafted: never read
    num_drafted = torch.tensor([3, 2], device=device)
    rng = _rng(1, 2, device)
    accepted, committed = kops.speculative_sample_accept(drafts, q, target, num_drafted, 1.0, 0, 1.0, rng,
                                                         backend=backend)
    ref = reference.speculative_sample_accept(drafts, q, target, num_drafted, 1.0, 0, 1.0, rng)
    assert accepted[0].item() == 0 and 0 <= committed[0, 0].item() < 7
    assert torch.equal(accepted, ref[0]) and torch.equal(committed, ref[1])


# ---- NaN and infinity ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the Triton interpreter, on the NaN rows
def test_nan_and_inf_rows(backend):
    device = device_for(backend)
    logits = torch.randn(5, 9)
    logits[0, 3] = float("nan")
    logits[1, 8] = float("inf")
    logits[2] = float("-inf")
    logits[3, :4] = float("-inf")  # legal: those tokens get probability 0
    logits = logits.to(device)
    rng = _rng(3, 4, device)
    token, probs, top_prob = kops.sample_logits(logits, 0.7, 0, 0.9, rng, 0, backend=backend)
    token, probs, top_prob = token.cpu(), probs.cpu(), top_prob.cpu()
    assert token[:3].tolist() == [-1, -1, -1] and probs[:3].isnan().all() and top_prob[:3].isnan().all()
    assert (probs[3, :4] == 0).all() and token[3] >= 4 and probs[3:].isfinite().all()
    assert torch.equal(probs.isnan(), kops.sampling_probs(logits, 0.7, 0, 0.9, backend=backend).cpu().isnan())

    # accept: a bad row at a position 0..n voids the row; beyond n (padding) it is ignored
    B, k, V = 3, 2, 9
    target = torch.randn(B, k + 1, V)
    target[0, 1, 2] = float("nan")
    target[1, 2] = float("-inf")     # row 1, position 2 = the bonus position of a full chain: bad
    target[2, 2, 0] = float("inf")   # row 2 drafted only 1: position 2 is padding
    q = torch.full((B, k, V), 1.0 / V)
    drafts = torch.zeros(B, k, dtype=torch.int64)
    num_drafted = torch.tensor([2, 2, 1])
    args = [t.to(device) for t in (drafts, q, target, num_drafted)]
    accepted, committed = kops.speculative_sample_accept(*args, 1.0, 0, 1.0, rng, backend=backend)
    assert accepted.cpu()[:2].tolist() == [-1, -1] and (committed.cpu()[:2] == -1).all()
    assert accepted[2].item() in (0, 1) and committed[2, accepted[2]].item() >= 0
    ref = reference.speculative_sample_accept(*args, 1.0, 0, 1.0, rng)
    assert torch.equal(accepted, ref[0]) and torch.equal(committed, ref[1])


# ---- determinism, graphs ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_same_rng_same_sample_other_offset_other_sample(backend):
    device = device_for(backend)
    logits = torch.zeros(4, 1000, device=device)  # uniform over 1000 tokens
    first = kops.sample_logits(logits, 1.0, 0, 1.0, _rng(9, 0, device), 2, backend=backend)[0]
    again = kops.sample_logits(logits, 1.0, 0, 1.0, _rng(9, 0, device), 2, backend=backend)[0]
    moved = kops.sample_logits(logits, 1.0, 0, 1.0, _rng(9, 1, device), 2, backend=backend)[0]
    other = kops.sample_logits(logits, 1.0, 0, 1.0, _rng(9, 0, device), 3, backend=backend)[0]
    assert torch.equal(first, again)
    assert not torch.equal(first, moved) and not torch.equal(first, other)
    assert len(set(first.tolist())) > 1, "rows draw independently"


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_width_seed_and_offset(backend):
    """Both 32-bit halves of the seed are the key; the offset's low 32 bits are the counter."""
    device = device_for(backend)
    logits = torch.zeros(3, 50, device=device)
    for seed, offset in ((-2 ** 62 + 12345, 2 ** 40 + 7), (2 ** 63 - 1, -1)):
        rng = _rng(seed, offset, device)
        token = kops.sample_logits(logits, 1.0, 0, 1.0, rng, 9, backend=backend)[0]
        assert torch.equal(token, reference.sample_logits(logits, 1.0, 0, 1.0, rng, 9)[0])


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_graph_replay_reads_the_advanced_offset(backend):
    """Captured once, replayed after the offset moved on the device: the samples of the new offset."""
    if kops.available_backends()[backend]:
        pytest.skip("; ".join(kops.available_backends()[backend]))
    gen = torch.Generator().manual_seed(0)
    drafts, q, target = _accept_case(2, 3, 1000, torch.bfloat16, "cuda", gen, 0.8, 5, 0.9)
    logits = target[:, 0].contiguous()
    rng = _rng(5, 0, "cuda")

    def step():
        return (kops.sample_logits(logits, 0.8, 5, 0.9, rng, 1, backend=backend)[0],
                *kops.speculative_sample_accept(drafts, q, target, None, 0.8, 5, 0.9, rng, backend=backend))

    step()  # compile / warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for offset in (3, 4):
        rng[1].fill_(offset)
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(outs, step()):
            assert torch.equal(got, want)


# ---- bad input ----------------------------------------------------------------------------------------

def _sampling_args(device):
    return torch.randn(2, 10, device=device), _rng(1, 2, device)


BAD_SAMPLING = {
    "temperature 0": (dict(temperature=0.0), "temperature must be a finite float > 0"),
    "temperature < 0": (dict(temperature=-1.0), "temperature must be a finite float > 0"),
    "temperature nan": (dict(temperature=float("nan")), "temperature must be a finite float > 0"),
    "temperature inf": (dict(temperature=float("inf")), "temperature must be a finite float > 0"),
    "temperature below float32": (dict(temperature=1e-50), "temperature must be a finite float > 0"),
    "top_k < 0": (dict(top_k=-1), "top_k must be an int >= 0"),
    "top_k float": (dict(top_k=2.5), "top_k must be an int >= 0"),
    "top_p 0": (dict(top_p=0.0), r"top_p must be a float in \(0, 1\]"),
    "top_p > 1": (dict(top_p=1.5), r"top_p must be a float in \(0, 1\]"),
    "top_p nan": (dict(top_p=float("nan")), r"top_p must be a float in \(0, 1\]"),
    "rng dtype": (dict(rng=lambda r: r.int()), r"rng must be an int64 tensor of shape \[2\]"),
    "rng shape": (dict(rng=lambda r: torch.cat([r, r])), r"rng must be an int64 tensor of shape \[2\]"),
    "rng device": (dict(rng=lambda r: r.to("meta")), "rng is on meta but logits is on"),
    "stream < 0": (dict(stream=-1), r"stream must be an int in \[0, 0x7fff0000\)"),
    "stream reserved": (dict(stream=reference.ACCEPT_STREAM), r"stream must be an int in \[0, 0x7fff0000\)"),
    "logits dtype": (dict(logits=lambda x: x.long()), "logits must be float32, float16 or bfloat16"),
    "logits empty": (dict(logits=lambda x: x[:, :0]), r"logits must have shape \[..., V\] with V >= 1"),
    "logits non-contiguous": (dict(logits=lambda x: x.t()), "logits must be contiguous"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_SAMPLING))
def test_sample_logits_rejects_bad_input(backend, case):
    logits, rng = _sampling_args(device_for(backend))
    args = dict(logits=logits, temperature=1.0, top_k=0, top_p=1.0, rng=rng, stream=0)
    change, msg = BAD_SAMPLING[case]
    for name, value in change.items():
        args[name] = value(args[name]) if callable(value) else value
    with pytest.raises(ValueError, match=msg):
        kops.sample_logits(**args, backend=backend)
    if not {"rng", "stream"} & set(change):
        with pytest.raises(ValueError, match=msg):
            kops.sampling_probs(args["logits"], args["temperature"], args["top_k"], args["top_p"], backend=backend)


BAD_ACCEPT = {
    "draft_probs shape": (dict(draft_probs=lambda q: q[:, :-1]), r"draft_probs must be float32 of shape \[B, k, V\]"),
    "draft_probs dtype": (dict(draft_probs=lambda q: q.half()), r"draft_probs must be float32 of shape"),
    "draft_probs vocab": (dict(draft_probs=lambda q: q[..., :-1].contiguous()), r"= \[2, 3, 10\]"),
    "target_logits shape": (dict(target_logits=lambda t: t[:, :-1]), r"target_logits must have shape \[B, k\+1, V\]"),
    "draft_tokens dtype": (dict(draft_tokens=lambda d: d.int()), "draft_tokens must be int64"),
    "num_drafted shape": (dict(num_drafted=lambda n: n[:1]), "num_drafted must be int64 of shape"),
    "rng shape": (dict(rng=lambda r: r[:1]), r"rng must be an int64 tensor of shape \[2\]"),
    "rng device": (dict(rng=lambda r: r.to("meta")), "rng is on meta but target_logits is on"),
    "temperature": (dict(temperature=0.0), "temperature must be a finite float > 0"),
    "top_k": (dict(top_k=-3), "top_k must be an int >= 0"),
    "top_p": (dict(top_p=1.01), r"top_p must be a float in \(0, 1\]"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_ACCEPT))
def test_speculative_sample_accept_rejects_bad_input(backend, case):
    device = device_for(backend)
    args = dict(draft_tokens=torch.zeros(2, 3, dtype=torch.int64, device=device),
                draft_probs=torch.full((2, 3, 10), 0.1, device=device),
                target_logits=torch.randn(2, 4, 10, device=device), num_drafted=torch.tensor([1, 3], device=device),
                temperature=1.0, top_k=0, top_p=1.0, rng=_rng(1, 2, device))
    change, msg = BAD_ACCEPT[case]
    for name, value in change.items():
        args[name] = value(args[name]) if callable(value) else value
    with pytest.raises(ValueError, match=msg):
        kops.speculative_sample_accept(**args, backend=backend)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_cuda_launchers_check_their_arguments():
    """The compiled ops (called directly, without validate.py) raise the same ValueErrors."""
    from kangaroo_ext.ops.schemas import MISSING_FROM_EXTENSION
    if "sample_logits" in MISSING_FROM_EXTENSION:
        pytest.skip("this build of the extension has no sampling kernels")
    ops = torch.ops.kangaroo
    logits, rng = _sampling_args("cuda")
    with pytest.raises(ValueError, match="temperature must be a finite float > 0"):
        ops.sampling_probs(logits, 0.0, 0, 1.0)
    with pytest.raises(ValueError, match="rng is on cpu but logits is on cuda"):
        ops.sample_logits(logits, 1.0, 0, 1.0, rng.cpu(), 0)
    with pytest.raises(ValueError, match="stream must be an int in"):
        ops.sample_logits(logits, 1.0, 0, 1.0, rng, reference.ACCEPT_STREAM)
    d = torch.zeros(2, 3, dtype=torch.int64, device="cuda")
    t = torch.randn(2, 4, 10, device="cuda")
    with pytest.raises(ValueError, match="draft_probs must be float32 of shape"):
        ops.speculative_sample_accept(d, torch.zeros(2, 3, 9, device="cuda"), t, None, 1.0, 0, 1.0, rng)
    with pytest.raises(ValueError, match="top_p must be a float in"):
        ops.speculative_sample_accept(d, torch.zeros(2, 3, 10, device="cuda"), t, None, 1.0, 0, 0.0, rng)
