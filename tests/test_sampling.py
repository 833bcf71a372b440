"""Sampled decoding end to end: speculative_generate draws the first three tokens exactly from the
target's processed distribution (chi-square against the enumerated distribution, with fixed seeds so the
test cannot flake), and the same test fails for a planted bug in the accept rule. Plus reproducibility,
the greedy path left untouched, and clear errors. CPU, fp32, a 2-layer model with a 50-token vocabulary."""
import copy

import pytest
import torch
from scipy.stats import chi2

import kangaroo_ext as kx
import kangaroo_ext.ops as kops
from kangaroo_ext.ops import reference

from models import tiny_model

VOCAB = 50
PROMPT = [3, 14, 15]
SAMPLES = 5000
P_VALUE = 1e-3  # fixed seeds: each setting's statistic is the same on every run; this bounds a false alarm
# Each value of every parameter appears in some setting: temperature {0.5, 1, 1.5}, top-k {0, 5},
# top-p {1, 0.8}, γ {1, 4}, η {0, 0.5}.
SETTINGS = [dict(temperature=1.0, top_k=0, top_p=1.0, max_draft=4, threshold=0.0),
            dict(temperature=0.5, top_k=5, top_p=1.0, max_draft=1, threshold=0.5),
            dict(temperature=1.5, top_k=0, top_p=0.8, max_draft=4, threshold=0.5),
            dict(temperature=1.0, top_k=5, top_p=0.8, max_draft=1, threshold=0.0)]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=2, vocab=VOCAB, hidden=32, heads=2, kv_heads=1, seed=4)


@pytest.fixture(scope="module")
def adapter(model):
    return kx.Adapter.for_model(model, exit_layer=1, init="random", seed=5)


def target_probs(model, prefix, s) -> torch.Tensor:
    """The target's processed next-token distribution after `prefix` [V], float64."""
    with torch.no_grad():
        logits = model(torch.tensor([prefix])).logits[0, -1].double()
    return reference.sampling_probs(logits, s["temperature"], s["top_k"], s["top_p"]).double()


def chi_square_three_tokens(model, samples, s, prompt=PROMPT) -> float:
    """p-value of the observed (t1, t2, t3) against the enumerated target distribution. Cells, coarse to
    fine: (t1, t2, t3) under a pair (t1, t2) expected at least 50 times, else the pair (t1, t2) if expected
    at least 5 times, else t1's remaining mass as one cell (t1,); cells expected under 5 pooled into one."""
    n = len(samples)
    p1 = target_probs(model, prompt, s)
    expected = {}
    for t1 in torch.nonzero(p1).flatten().tolist():
        p2 = target_probs(model, prompt + [t1], s)
        for t2 in torch.nonzero(p2).flatten().tolist():
            pair = n * float(p1[t1] * p2[t2])
            if pair >= 50:
                p3 = target_probs(model, prompt + [t1, t2], s)
                for t3 in torch.nonzero(p3).flatten().tolist():
                    expected[(t1, t2, t3)] = pair * float(p3[t3])
            elif pair >= 5:
                expected[(t1, t2)] = pair
            else:
                expected[(t1,)] = expected.get((t1,), 0.0) + pair
    observed = {}
    for seq in samples:
        key = next((k for k in (tuple(seq), tuple(seq[:2]), tuple(seq[:1])) if k in expected), None)
        assert key is not None, f"sampled {seq}, which the target gives probability 0"
        observed[key] = observed.get(key, 0) + 1
    big = [k for k, e in expected.items() if e >= 5]
    assert len(big) >= 5, "too few cells for a meaningful test"
    obs = [observed.get(k, 0) for k in big] + [n - sum(observed.get(k, 0) for k in big)]
    exp = [expected[k] for k in big] + [n - sum(expected[k] for k in big)]
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 1e-9)
    return float(chi2.sf(stat, df=len(big)))


def draw(model, adapter, s, n=SAMPLES, base_seed=0, prompt=PROMPT, copy_draft=False):
    out = []
    with torch.inference_mode():
        for i in range(n):
            seq = kx.speculative_generate(model, prompt, adapter=adapter, max_new_tokens=3, eos_token_id=[],
                                          do_sample=True, seed=base_seed + i, copy_draft=copy_draft,
                                          **s).sequences[0, len(prompt):]
            out.append(seq.tolist())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: "T{temperature}-k{top_k}-p{top_p}-g{max_draft}-eta{threshold}"
                         .format(**s))
def test_speculative_sampling_draws_the_targets_distribution(model, adapter, s):
    samples = draw(model, adapter, s, base_seed=1000 * SETTINGS.index(s))
    assert chi_square_three_tokens(model, samples, s) > P_VALUE


# A prompt that repeats itself, so the first rounds copy their drafts: "3 14" recurs, so the lookup proposes
# "15 9 ..." (copied rounds; mixed ones where the match runs out before the adapter's γ).
COPY_PROMPT = [3, 14, 15, 9, 26, 3, 14, 15, 9, 3, 14]


@pytest.mark.slow
@pytest.mark.parametrize("copy_draft", [True, "only"])
def test_sampling_with_copied_drafts_draws_the_targets_distribution(model, adapter, copy_draft):
    """A copied draft is a deterministic proposal (q one-hot): accepted with probability p(token), else the
    next token comes from p without it; the three tokens still follow the target exactly."""
    s = SETTINGS[2]
    with torch.inference_mode():
        probe = kx.speculative_generate(model, COPY_PROMPT, adapter=adapter, max_new_tokens=3, eos_token_id=[],
                                        do_sample=True, seed=0, copy_draft=copy_draft, **s).stats
    assert probe.draft_sources[0] == "copy" and probe.copied[0] >= 2
    samples = draw(model, adapter, s, base_seed=5000, prompt=COPY_PROMPT, copy_draft=copy_draft)
    assert chi_square_three_tokens(model, samples, s, prompt=COPY_PROMPT) > P_VALUE


def test_plain_sampling_draws_the_targets_distribution(model):
    s = dict(temperature=1.5, top_k=0, top_p=0.8)
    with torch.inference_mode():
        samples = [kx.generate(model, PROMPT, max_new_tokens=3, eos_token_id=[], do_sample=True, seed=i, **s)
                   .sequences[0, len(PROMPT):].tolist() for i in range(SAMPLES)]
    assert chi_square_three_tokens(model, samples, s) > P_VALUE


def _accept_with_p(draft_tokens, draft_probs, target_logits, num_drafted, temperature, top_k, top_p, rng, **kw):
    """A planted bug: accept draft x with probability p(x) instead of min(1, p(x)/q(x))."""
    p = reference.sampling_probs(target_logits, temperature, top_k, top_p)     # [B, k+1, V]
    B, k = draft_tokens.shape
    n = k if num_drafted is None else int(num_drafted[0])
    g = torch.Generator().manual_seed(int(rng[0]) * 7919 + int(rng[1]))
    a = 0
    while a < n and torch.rand((), generator=g) < p[0, a, draft_tokens[0, a]]:
        a += 1
    w = (p[0, a] - draft_probs[0, a]).clamp_min(0) if a < n else p[0, a]
    token = torch.multinomial(w / w.sum(), 1, generator=g)
    committed = torch.full((B, k + 1), -1, dtype=torch.int64)
    committed[0, :a] = draft_tokens[0, :a]
    committed[0, a] = token
    return torch.tensor([a]), committed


@pytest.mark.slow
def test_the_distribution_test_catches_a_planted_bug(model, adapter, monkeypatch):
    monkeypatch.setattr(kops, "speculative_sample_accept", _accept_with_p)
    s = SETTINGS[0]
    samples = draw(model, adapter, s, n=1500, base_seed=77)  # its p-value is ~0 already at this size
    assert chi_square_three_tokens(model, samples, s) < P_VALUE, "the chi-square test has no power"


# ---- reproducibility, the greedy path, errors ----------------------------------------------------------

@torch.inference_mode()
def test_a_seed_reproduces_the_tokens_in_every_mode(model, adapter):
    kw = dict(adapter=adapter, max_new_tokens=20, eos_token_id=[], do_sample=True, temperature=1.2, max_draft=3,
              threshold=0.0)
    a = kx.speculative_generate(model, PROMPT, seed=123, **kw).sequences
    assert torch.equal(kx.speculative_generate(model, PROMPT, seed=123, **kw).sequences, a)
    assert torch.equal(kx.speculative_generate(model, PROMPT, seed=123, mode="device", **kw).sequences, a)
    assert not torch.equal(kx.speculative_generate(model, PROMPT, seed=124, **kw).sequences, a)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    first = [kx.generate(model, PROMPT, max_new_tokens=8, do_sample=True, generator=g1).sequences for _ in range(2)]
    again = [kx.generate(model, PROMPT, max_new_tokens=8, do_sample=True, generator=g2).sequences for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(first, again)) and not torch.equal(first[0], first[1])


@torch.inference_mode()
def test_greedy_refuses_the_sampling_arguments_it_would_ignore(model, adapter):
    """Greedy decoding ignores temperature, top_k and top_p: passing them without do_sample=True is an error
    (issue 23), and their default values change nothing."""
    want = kx.speculative_generate(model, PROMPT, adapter=adapter, max_new_tokens=20, eos_token_id=[]).sequences
    with pytest.raises(ValueError, match=r"temperature=0.3, top_k=2, top_p=0.5 only apply to sampling: pass "
                                         r"do_sample=True"):
        kx.speculative_generate(model, PROMPT, adapter=adapter, max_new_tokens=20, eos_token_id=[],
                                do_sample=False, temperature=0.3, top_k=2, top_p=0.5)
    got = kx.speculative_generate(model, PROMPT, adapter=adapter, max_new_tokens=20, eos_token_id=[],
                                  do_sample=False, temperature=1.0, top_k=0, top_p=1.0).sequences
    assert torch.equal(got, want)
    assert torch.equal(kx.generate(model, PROMPT, max_new_tokens=20, eos_token_id=[]).sequences, want)


@pytest.mark.parametrize("kw,message", [
    (dict(temperature=0.0), "temperature must be a finite number > 0 with do_sample=True"),
    (dict(temperature=-1.0), "temperature must be a finite number > 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number > 0"),
    (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be an int >= 0"),
    (dict(seed=-5), "seed must be an int >= 0"),
    (dict(seed=1, generator=torch.Generator()), "give generator or seed, not both"),
    (dict(generator="x"), "generator must be a torch.Generator"),
])
def test_bad_sampling_arguments_are_named(model, adapter, kw, message):
    with pytest.raises(ValueError, match=message):
        kx.speculative_generate(model, PROMPT, adapter=adapter, max_new_tokens=3, do_sample=True, **kw)
    with pytest.raises(ValueError, match=message):
        kx.generate(model, PROMPT, max_new_tokens=3, do_sample=True, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
def test_a_generator_on_another_device_is_refused(model):
    with pytest.raises(ValueError, match="generator is on cuda"):
        kx.generate(model, PROMPT, max_new_tokens=3, do_sample=True, generator=torch.Generator(device="cuda"))


@torch.inference_mode()
def test_nan_logits_stop_sampling_with_a_clear_error(model, adapter):
    broken = copy.deepcopy(model)
    broken.lm_head.weight[7, 0] = float("nan")
    bad_adapter = kx.Adapter.for_model(broken, exit_layer=1, init="random", seed=5)
    with pytest.raises(FloatingPointError, match="NaN or inf at new token 0"):
        kx.generate(broken, PROMPT, max_new_tokens=5, do_sample=True, seed=1)
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        kx.speculative_generate(broken, PROMPT, adapter=bad_adapter, max_new_tokens=5, do_sample=True, seed=1,
                                threshold=0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@torch.inference_mode()
def test_a_seed_reproduces_the_tokens_with_and_without_graphs(model):
    """The first call captures the graphs (whose warm-up runs advance the random offset), the second
    replays them, the third runs without graphs: one seed, the same tokens."""
    gpu = copy.deepcopy(model).cuda()
    adapter = kx.Adapter.for_model(gpu, exit_layer=1, init="random", seed=5)
    kw = dict(adapter=adapter, max_new_tokens=24, eos_token_id=[], do_sample=True, temperature=1.3, max_draft=3,
              threshold=0.0, seed=11)
    first = kx.speculative_generate(gpu, PROMPT, **kw)
    assert first.stats.mode == "graphs" and first.stats.capture_s > 0
    again = kx.speculative_generate(gpu, PROMPT, **kw)
    eager = kx.speculative_generate(gpu, PROMPT, mode="device", **kw)
    assert torch.equal(first.sequences, again.sequences) and torch.equal(first.sequences, eager.sequences)
    plain = [kx.generate(gpu, PROMPT, max_new_tokens=24, do_sample=True, seed=3, mode=m).sequences
             for m in ("graphs", "graphs", "device")]
    assert all(torch.equal(p, plain[0]) for p in plain)
