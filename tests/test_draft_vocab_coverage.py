"""bench/draft_vocab_coverage.py: coverage of held-out targets by the N most frequent training tokens."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import draft_vocab_coverage as dvc  # noqa: E402


def test_coverage_counts_held_out_tokens_inside_the_most_frequent():
    train = [[5, 5, 5, 7, 7, 9]]            # by frequency: 5, 7, 9
    held = [[5, 7], [9, 11]]
    assert dvc.coverage(train, held, 1) == pytest.approx(1 / 4)
    assert dvc.coverage(train, held, 2) == pytest.approx(2 / 4)
    assert dvc.coverage(train, held, 3) == pytest.approx(3 / 4)   # 11 never appears in training


def test_unseen_tokens_rank_by_the_prompts_then_by_id():
    train, held = [[5]], [[8]]
    assert dvc.coverage(train, held, 2, prompts=[[8, 8, 3]]) == 1.0   # 8 is the prompts' most frequent
    assert dvc.coverage(train, held, 2) == 0.0                       # else id 0 comes second
