"""bench/round_price.py's arithmetic (the GPU part is measured by bench/kernel_report.py)."""
import os
import sys

import pytest
import torch

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


def test_stamped_times_reads_the_barrier_stamps():
    """bench/persistent_draft_price.py's stage timing on made-up stamps (the kernel's layout: [barrier][block]
    (stage, arrival ns, departure ns), -1 where a barrier or block did not run): 3 blocks ran of a width of 5;
    barrier 0 (start), a QKV stage, an attention stage. The QKV stage runs from the first block's departure
    from barrier 0 (1,000 ns) to the last arrival (4,000): 3 µs; its barrier holds until the last departure
    (5,500): 1.5 µs; its release (the first departure, 4,600): 0.6 µs. A block that left no departure (split
    barrier: no tile of its own) counts for neither."""
    import persistent_draft_price as pdp
    rows = [[(0, 500, 1000), (0, 600, 1200), (0, 700, 1100)],          # start: arrivals, departures
            [(1, 3000, 4600), (1, 4000, 5500), (1, 3500, 5000)],       # qkv
            [(2, 7000, 7400), (2, 6000, -1), (2, 6500, 7800)]]         # attention: block 1 left no departure
    want = torch.full((5, 5, 3), -1, dtype=torch.int64)
    want[:3, :3] = torch.tensor(rows)

    def launch(stamps):
        stamps.copy_(want)
    t = pdp.stamped_times(launch, rows=5, repeats=3, blocks=5, device="cpu")
    assert set(t) == {"qkv", "attention"}
    assert t["qkv"] == {"stage_us": 3.0, "barrier_us": 1.5, "release_us": 0.6, "per_phase": 1}
    # attention: from the first departure of the qkv barrier (4,600) to the last arrival (7,000)
    assert t["attention"] == {"stage_us": 2.4, "barrier_us": 0.8, "release_us": 0.4, "per_phase": 1}
