"""bench/round_price.py's arithmetic (the GPU part is measured by bench/kernel_report.py)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import round_price  # noqa: E402


def test_round_summary_derives_the_issue_ratios():
    # A made-up round: plain 500 µs, step 0 costs 80, each of the γ further steps 50; verify 1 position
    # 520, +10 each.
    gamma = 6
    draft = {0: 80.0, gamma: 80.0 + 50.0 * gamma}
    verify = {p: 520.0 + 10.0 * (p - 1) for p in range(1, gamma + 2)}
    r = round_price.summarize_round(500.0, draft, verify, gamma, {"draft_round": 40, "verify_step": 250})
    assert r["draft_step_us"] == pytest.approx(50.0)
    assert r["first_draft_step_us"] == 80.0
    assert r["round_6_drafts_us"] == pytest.approx(380.0 + 580.0)
    assert r["ratios"]["verify_7_over_1"] == pytest.approx(580.0 / 520.0)
    assert r["ratios"]["round_6_drafts_over_plain_step"] == pytest.approx(960.0 / 500.0)
    assert r["ratios"]["draft_step_over_plain_step"] == pytest.approx(0.1)
    assert r["launches_per_round"] == 290
    assert r["verify_us"]["7"] == 580.0 and list(r["verify_us"]) == [str(p) for p in range(1, 8)]


def test_round_summary_with_one_draft_step():
    r = round_price.summarize_round(100.0, {0: 20.0, 1: 45.0}, {1: 110.0, 2: 115.0}, 1)
    assert r["draft_step_us"] == 25.0 and "launches_per_round" not in r


@pytest.mark.parametrize("bad, match", [
    (dict(draft_round_us={0: 1.0}), r"draft_round_us lacks entries \[6\]"),
    (dict(verify_us={1: 1.0}), r"verify_us lacks entries \[7\]"),
    (dict(gamma=0), "gamma must be >= 1"),
    (dict(plain_step_us=0.0), "plain_step_us must be > 0"),
])
def test_round_summary_names_what_is_missing(bad, match):
    args = dict(plain_step_us=1.0, draft_round_us={0: 1.0, 6: 2.0}, verify_us={p: 1.0 for p in range(1, 8)}, gamma=6)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        round_price.summarize_round(**args)
