"""The sampling ops draw exactly the target's distribution ("lossless"), checked statistically.

Each check draws >= 100,000 samples with the reference backend (many rows per call, two offsets) and
compares the counts with the exact distribution by a chi-square test. The other backends are held to
the reference sample for sample in test_ops_sampling.py, so this covers them too.

Why these tests cannot flake: every sample is a deterministic function of fixed seeds (torch generators
for the synthetic logits, the rng tensor for the ops), so a test gives the same p-value on every run.
The threshold p < 1e-4 says how unlucky the fixed seeds would have to be for a correct sampler to fail;
the planted bugs at the end show the same check fails, by far, on the classic mistakes.
"""
import itertools

import pytest
import scipy.stats
import torch

from kangaroo_ext.ops import reference

SAMPLES = 100_000
P_MIN = 1e-4
V = 20      # a small vocabulary: every token's count is informative
K = 2       # drafts per row
SETTINGS = list(itertools.product([0.5, 1.0, 1.5], [0, 5], [1.0, 0.8]))  # (temperature, top_k, top_p)


def chi_square_pvalue(observed: torch.Tensor, probs: torch.Tensor) -> float:
    """observed: [C] counts; probs: [C] exact probabilities. A count in a zero-probability cell gives 0;
    cells expected below 5 are pooled (the chi-square approximation needs a few per cell)."""
    observed, probs = observed.double(), probs.double()
    if observed[probs == 0].sum() > 0:
        return 0.0
    n = observed.sum()
    expected = probs / probs.sum() * n
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big & (probs > 0)].sum()[None]])
    exp = torch.cat([expected[big], expected[~big & (probs > 0)].sum()[None]])
    if exp[-1] < 5:  # fold a small pooled cell into the smallest big one
        i = int(exp[:-1].argmin())
        obs[i] += obs[-1]
        exp[i] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    if len(exp) < 2:
        return 1.0
    return float(scipy.stats.chisquare(obs.numpy(), exp.numpy()).pvalue)


def token_pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    assert (tokens >= 0).all() and (tokens < probs.numel()).all()
    return chi_square_pvalue(torch.bincount(tokens, minlength=probs.numel()), probs)


def _synthetic(settings, seed):
    """Target logits [1, K+1, V] and the draft's logits [1, K, V]: the target's plus noise, so that q
    differs from p clearly (a total variation of ~0.3-0.8) yet drafts are often accepted."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(1, K + 1, V, generator=gen) * 1.5
    return target, target[:, :K] + 0.6 * torch.randn(1, K, V, generator=gen)


def _draw_drafts(draft_logits, settings, rows, rng):
    """Drafts from q as the draft model would draw them (sample_logits, stream 0), and q itself."""
    tokens, q, _ = reference.sample_logits(draft_logits.expand(rows, K, V).contiguous(), *settings, rng, 0)
    return tokens, q


def _accept_samples(settings, seed):
    """SAMPLES rows of speculative_sample_accept over two offsets, num_drafted random in [0, K]."""
    target, draft_logits = _synthetic(settings, seed)
    rows = SAMPLES // 2
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    for offset in (0, 1):
        rng = torch.tensor([seed, offset])
        drafts, q = _draw_drafts(draft_logits, settings, rows, rng)
        num_drafted = torch.randint(0, K + 1, (rows,), generator=gen)
        accepted, committed = reference.speculative_sample_accept(
            drafts, q, target.expand(rows, K + 1, V).contiguous(), num_drafted, *settings, rng)
        out.append((num_drafted, accepted, committed))
    n, a, c = (torch.cat(t) for t in zip(*out))
    p = reference.sampling_probs(target, *settings)[0]                                   # [K+1, V]
    q = reference.sampling_probs(draft_logits, *settings)[0]                             # [K, V]
    return p, q, n, a, c


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"T{s[0]}-k{s[1]}-p{s[2]}")
def test_speculative_sample_accept_keeps_the_target_distribution(settings):
    seed = 11 + SETTINGS.index(settings)
    p, q, n, a, committed = _accept_samples(settings, seed)
    assert (a >= 0).all() and (a <= n).all()

    # the first new token, whatever the number of drafts: exactly p_0
    assert token_pvalue(committed[:, 0], p[0]) > P_MIN
    # the second, after an accepted first draft: exactly p_1 (drafts and tests are independent per position)
    second = committed[a >= 1, 1]
    assert len(second) > 5_000
    assert token_pvalue(second, p[1]) > P_MIN

    # the accepted count: draft j passes with probability beta_j = sum_x min(p_j, q_j), independently
    beta = torch.minimum(p[:K], q).sum(-1).double()                                      # [K]
    cells, observed = [], []
    for drafted in range(K + 1):
        reach = torch.cat([torch.ones(1, dtype=torch.float64), beta[:drafted].cumprod(0)])  # P(a >= m), m <= n
        law = reach[:-1] - reach[1:] if drafted else torch.zeros(0, dtype=torch.float64)
        law = torch.cat([law, reach[-1:]])                                               # P(a = m | n), m = 0..n
        rows = n == drafted
        cells.append(law * rows.sum())
        observed.append(torch.bincount(a[rows], minlength=drafted + 1).double())
    assert chi_square_pvalue(torch.cat(observed), torch.cat(cells)) > P_MIN


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"T{s[0]}-k{s[1]}-p{s[2]}")
def test_sample_logits_draws_sampling_probs(settings):
    seed = 101 + SETTINGS.index(settings)
    logits = _synthetic(settings, seed)[0][0, 0]                                          # [V]
    p = reference.sampling_probs(logits, *settings)
    tokens = torch.cat([reference.sample_logits(logits.expand(SAMPLES // 2, V).contiguous(), *settings,
                                                torch.tensor([seed, offset]), 7)[0] for offset in (0, 1)])
    assert token_pvalue(tokens, p) > P_MIN
    if settings[1] or settings[2] < 1:
        assert (p == 0).any(), "the setting filters tokens"


# ---- the check has power: classic mistakes fail it -------------------------------------------------

def _first_tokens(drafts, q, target, settings, rng, bug=None):
    """committed[:, 0] of the accept rule with every draft proposed, optionally with a planted bug:
      "accept_with_p":    accept draft x with probability p(x) instead of min(1, p(x) / q(x))
      "resample_from_p":  after a rejection draw from p instead of max(0, p - q)."""
    B = drafts.shape[0]
    rows = torch.arange(B)
    p = reference.sampling_probs(target, *settings)                                      # [B, K+1, V]
    p_x = p[:, :K].gather(-1, drafts[..., None])[..., 0]                                 # [B, K]
    q_x = q.gather(-1, drafts[..., None])[..., 0]
    u = reference.uniform(rng[0], rng[1], rows[:, None], reference.ACCEPT_STREAM, torch.arange(K))
    accept = u < p_x if bug == "accept_with_p" else u * q_x < p_x
    a = accept.long().cumprod(1).sum(1)
    p_a = p[rows, a]
    residual = (p_a - q[rows, a.clamp(max=K - 1)]).clamp(min=0)
    use_residual = (a < K) & (residual > 0).any(-1) & (bug != "resample_from_p")
    w = torch.where(use_residual[:, None], residual, p_a)
    token = reference.exponential_race(w, rng[0], rng[1], rows, reference.ACCEPT_STREAM + 1)
    return torch.where(a >= 1, drafts[:, 0], token)


@pytest.mark.parametrize("bug", ["accept_with_p", "resample_from_p"])
def test_planted_bugs_fail_the_check(bug):
    settings = (1.0, 0, 1.0)
    target, draft_logits = _synthetic(settings, 7)
    target = target.expand(SAMPLES, K + 1, V).contiguous()
    rng = torch.tensor([7, 0])
    drafts, q = _draw_drafts(draft_logits, settings, SAMPLES, rng)
    p0 = reference.sampling_probs(target[0, 0], *settings)

    correct = _first_tokens(drafts, q, target, settings, rng)
    ref_committed = reference.speculative_sample_accept(drafts, q, target, None, *settings, rng)[1]
    assert torch.equal(correct, ref_committed[:, 0]), "the harness is the reference rule when no bug is planted"
    assert token_pvalue(correct, p0) > P_MIN
    assert token_pvalue(_first_tokens(drafts, q, target, settings, rng, bug), p0) < P_MIN


# ---- copied drafts: a deterministic proposal, q one-hot ----------------------------------------------

def _copied_accept(settings, seed, mixed: bool, stale_q: bool = False):
    """SAMPLES rows whose draft 0 is copied (a fixed token per row, spread over likely, unlikely and, with
    a filter, impossible ones) with q = one-hot, and draft 1 copied too or (mixed) drawn from the draft's q.
    stale_q plants the copy path's classic bug: the copied token keeps the draft model's q."""
    target, draft_logits = _synthetic(settings, seed)
    rows = SAMPLES // 2
    out = []
    for offset in (0, 1):
        rng = torch.tensor([seed, offset])
        drafted, q = _draw_drafts(draft_logits, settings, rows, rng)
        copied = torch.arange(rows) % V                                                  # [rows]: every token
        drafts = torch.stack([copied, drafted[:, 1] if mixed else (copied * 7 + 3) % V], dim=1)   # [rows, K]
        one_hot = torch.nn.functional.one_hot(drafts, V).float()                         # [rows, K, V]
        probs = q.clone() if stale_q else one_hot.clone()
        if mixed:
            probs[:, 1] = q[:, 1]
        accepted, committed = reference.speculative_sample_accept(
            drafts, probs.contiguous(), target.expand(rows, K + 1, V).contiguous(), None, *settings, rng)
        out.append((drafts, accepted, committed))
    d, a, c = (torch.cat(t) for t in zip(*out))
    return reference.sampling_probs(target, *settings)[0], d, a, c


@pytest.mark.parametrize("mixed", [False, True], ids=["copied", "copied-then-drafted"])
@pytest.mark.parametrize("settings", SETTINGS[::3], ids=lambda s: f"T{s[0]}-k{s[1]}-p{s[2]}")
def test_copied_proposals_keep_the_target_distribution(settings, mixed):
    seed = 301 + SETTINGS.index(settings) + 50 * mixed
    p, drafts, a, committed = _copied_accept(settings, seed, mixed)
    assert token_pvalue(committed[:, 0], p[0]) > P_MIN
    second = committed[a >= 1, 1]
    assert len(second) > 2_000
    assert token_pvalue(second, p[1]) > P_MIN
    # a copied token x is accepted with probability exactly p_0(x): per token, accepted vs rejected
    x = drafts[:, 0]
    accepted_per_token = torch.bincount(x[a >= 1], minlength=V).double()
    proposed_per_token = torch.bincount(x, minlength=V).double()
    expected = proposed_per_token * p[0].double()
    observed = torch.cat([accepted_per_token, proposed_per_token - accepted_per_token])
    cells = torch.cat([expected, proposed_per_token - expected])
    assert chi_square_pvalue(observed, cells / cells.sum()) > P_MIN


def test_a_copied_token_with_the_drafts_q_fails_the_check():
    """The planted bug (q of the draft model kept for a copied token) fails the same check by far."""
    settings = (1.0, 0, 1.0)
    p, _, _, committed = _copied_accept(settings, 9, mixed=False, stale_q=True)
    assert token_pvalue(committed[:, 0], p[0]) < P_MIN
