"""The rounds layer without a GPU: the report's layout, the runner's pipelining bound, and the fallback
from conditional-node capture to the budget path when a capture fails."""
from types import SimpleNamespace

import pytest
import torch

from kangaroo_ext.engine import conditional, rounds
from kangaroo_ext.engine.rounds import BudgetRounds, ConditionalRounds, Report


def test_report_layout_round_trips():
    report = torch.full((1, Report.width(4)), -1, dtype=torch.int64)
    Report.write(report, torch.tensor([2]), torch.tensor([3]), torch.tensor([[11, 12, 13, -1]]))
    r = Report.read(report[0].tolist())
    assert (r.accepted, r.drafted, r.committed, r.copied) == (2, 3, [11, 12, 13], 0)   # copied unset: 0
    report[0, Report.COPIED] = 3
    assert Report.read(report[0].tolist()).copied == 3
    assert Report.COMMITTED + 4 + 1 == Report.width(4) - 1, "copied sits after the γ + 1 committed slots"


class FakeEngine:
    """graphs_for as the engine's, failing for conditional captures the way conditional.py reports it."""

    def __init__(self, error):
        self.spec = SimpleNamespace(device=torch.device("cpu"))
        self.error, self.asked = error, []

    def graphs_for(self, gamma, speculative, device_exit):
        self.asked.append((gamma, device_exit))
        if device_exit:
            raise self.error
        return SimpleNamespace(gamma=gamma), 0.25


def test_a_failed_conditional_capture_falls_back_to_the_budget_path(monkeypatch):
    cause = RuntimeError("cudaStreamBeginCaptureToGraph failed")
    failure = conditional.ConditionalCaptureError("capturing an IF node failed")
    failure.__cause__ = cause
    engine = FakeEngine(RuntimeError("torch.cuda.graph: capture invalidated").with_traceback(None))
    engine.error.__context__ = failure
    monkeypatch.setattr(rounds, "make_rounds", lambda e, mode, gamma, adaptive: ConditionalRounds(e, gamma))
    got = rounds.start_rounds(engine, "graphs", 3)
    assert isinstance(got, BudgetRounds) and got.use_graphs
    assert got.describe()["device_exit"] is False and got.describe()["device_exit_off"]
    assert engine.asked[0] == (3, True) and sorted(engine.asked[1:]) == [(1, False), (2, False), (3, False)]


def test_other_capture_errors_are_not_swallowed(monkeypatch):
    engine = FakeEngine(ValueError("a bug in a body"))
    monkeypatch.setattr(rounds, "make_rounds", lambda e, mode, gamma, adaptive: ConditionalRounds(e, gamma))
    with pytest.raises(ValueError, match="a bug in a body"):
        rounds.start_rounds(engine, "graphs", 3)


def test_next_budget_never_exceeds_gamma():
    for budget in range(1, 7):
        for drafted in range(0, budget + 1):
            assert 1 <= rounds.next_budget(budget, drafted, 6) <= 6
