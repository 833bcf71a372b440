"""Copied drafts (ops.ngram_draft): the vectorised lookup against a brute-force search, on random token
streams over a small vocabulary (so matches are everywhere), with matches planted at the very start,
at the end and overlapping; and bad arguments get errors naming them."""
import random

import pytest
import torch

from kangaroo_ext import ops


def brute_force(tokens, min_ngram, max_ngram, gamma):
    """The definition, one Python loop at a time: longest n first, latest earlier occurrence."""
    L = len(tokens)
    for n in range(max_ngram, min_ngram - 1, -1):
        if n >= L:
            continue
        suffix = tokens[L - n:]
        for i in range(L - n - 1, -1, -1):
            if tokens[i:i + n] == suffix:
                return tokens[i + n:i + n + gamma]
    return []


def run(rows, min_ngram, max_ngram, gamma, slack=5):
    S = max(len(r) for r in rows) + slack
    history = torch.full((len(rows), S), 7, dtype=torch.int64)  # junk past each row's length
    for b, r in enumerate(rows):
        history[b, :len(r)] = torch.tensor(r, dtype=torch.int64)
    length = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    tokens, count, matched = ops.ngram_draft(history, length, min_ngram, max_ngram, gamma)
    for b, r in enumerate(rows):  # the n reported is the one that matched: its suffix recurs, no longer one does
        n = int(matched[b])
        assert (n == 0) == (int(count[b]) == 0)
        longer = any(brute_force(r, m, m, 1) for m in range(n + 1, max_ngram + 1))
        assert n == 0 or (brute_force(r, n, n, 1) and not longer)
    return [tokens[b, :count[b]].tolist() for b in range(len(rows))], tokens, count


@pytest.mark.parametrize("vocab", [2, 3, 8, 50])
@pytest.mark.parametrize("min_ngram,max_ngram,gamma", [(1, 4, 5), (2, 3, 10), (3, 3, 1), (1, 1, 4)])
def test_matches_brute_force_on_random_streams(vocab, min_ngram, max_ngram, gamma):
    rng = random.Random(vocab * 100 + min_ngram * 10 + max_ngram + gamma)
    rows = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 40))] for _ in range(24)]
    got, tokens, count = run(rows, min_ngram, max_ngram, gamma)
    for r, g in zip(rows, got):
        assert g == brute_force(r, min_ngram, max_ngram, gamma), r
    assert ((tokens == -1) == (torch.arange(gamma)[None] >= count[:, None])).all()


def test_planted_matches_at_the_start_the_end_and_overlapping():
    start = [1, 2, 3, 9, 8, 7, 6, 5, 4, 10, 11, 1, 2, 3]            # suffix 1 2 3 occurs at 0
    assert run([start], 1, 4, 4)[0] == [[9, 8, 7, 6]]
    end = [5, 6, 7, 8, 9, 1, 2, 3, 4, 1, 2, 3]                       # copy runs into the row's end: 4 1 2 3
    assert run([end], 1, 3, 6)[0] == [[4, 1, 2, 3]]
    overlap = [4, 1, 1, 1, 1]                                         # 1 1 1 at 1 overlaps the suffix at 2
    assert run([overlap], 3, 3, 5)[0] == [[1]]
    latest = [1, 2, 5, 0, 1, 2, 6, 0, 1, 2]                           # the latest of two occurrences: 6
    assert run([latest], 2, 2, 1)[0] == [[6]]
    longest = [3, 1, 2, 8, 0, 1, 2, 9, 3, 1, 2]                       # n=3 finds 8; n=2 alone would find 9
    assert run([longest], 2, 3, 1)[0] == [[8]]
    assert run([longest], 2, 2, 1)[0] == [[9]]
    assert run([[1, 2, 3, 4]], 1, 4, 3)[0] == [[]]                     # nothing repeats
    assert run([[]], 1, 2, 3)[0] == [[]]                               # empty row


def test_a_broken_lookup_fails_the_comparison():
    """The comparison can fail: the earliest occurrence in place of the latest differs somewhere."""
    def earliest(tokens, n, gamma):
        for i in range(len(tokens) - n):
            if tokens[i:i + n] == tokens[len(tokens) - n:]:
                return tokens[i + n:i + n + gamma]
        return []
    rng = random.Random(3)
    rows = [[rng.randrange(3) for _ in range(30)] for _ in range(20)]
    got = run(rows, 2, 2, 3)[0]
    assert any(g != earliest(r, 2, 3) for r, g in zip(rows, got))


@pytest.mark.parametrize("kwargs,name", [
    (dict(min_ngram=0), "min_ngram"), (dict(min_ngram=2.0), "min_ngram"),
    (dict(max_ngram=1, min_ngram=2), "max_ngram"), (dict(max_ngram=33), "max_ngram"),
    (dict(gamma=0), "gamma"), (dict(gamma=True), "gamma"),
])
def test_bad_n_or_gamma_names_the_argument(kwargs, name):
    args = dict(history=torch.zeros(1, 8, dtype=torch.int64), length=torch.tensor([4]), min_ngram=1,
                max_ngram=3, gamma=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        ops.ngram_draft(**args)


def test_bad_tensors_name_the_argument():
    with pytest.raises(ValueError, match="history"):
        ops.ngram_draft(torch.zeros(1, 8, dtype=torch.int32), torch.tensor([4]), 1, 3, 4)
    with pytest.raises(ValueError, match="length"):
        ops.ngram_draft(torch.zeros(2, 8, dtype=torch.int64), torch.tensor([4]), 1, 3, 4)
