"""The decode loop's phase clock: on the GPU it reuses a fixed pool of CUDA events, one set per report
slot, and reads a slot only after the round it timed was waited for. Exercised here with a stand-in
for torch.cuda.Event so the bookkeeping runs on any machine."""
import torch

from kangaroo_ext.engine import rounds


class FakeEvent:
    created = 0

    def __init__(self, enable_timing=False):
        assert enable_timing
        FakeEvent.created += 1
        self.t = None

    def record(self):
        self.t = FakeEvent.now

    def elapsed_time(self, end):  # ms, as torch.cuda.Event
        return (end.t - self.t) * 1e3


def test_gpu_clock_reuses_its_events_and_sums_settled_rounds(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    FakeEvent.created = 0
    FakeEvent.now = 0.0
    clock = rounds.Clock(cuda=True, slots=3)
    assert FakeEvent.created == 3 * rounds.Clock.MARKS

    def round_on(slot, start, draft, verify):
        FakeEvent.now = start
        c0 = clock.mark(slot, 0)
        FakeEvent.now = start + draft
        c1 = clock.mark(slot, 1)
        clock.add(slot, "draft", c0, c1)
        FakeEvent.now = start + draft + verify
        clock.add(slot, "verify", c1, clock.mark(slot, 2))

    # Pipelined: rounds 0 and 1 queued, round 0 settled, round 2 reuses slot 0, ...; the last queued
    # round (slot 1, round 3) is never settled and does not count.
    round_on(0, 0.0, 1.0, 2.0)
    round_on(1, 3.0, 0.5, 1.5)
    clock.settle(0)
    round_on(0, 5.0, 0.25, 1.0)
    clock.settle(1)
    clock.settle(0)
    round_on(1, 7.0, 4.0, 4.0)
    assert abs(clock.total("draft") - 1.75) < 1e-9
    assert abs(clock.total("verify") - 4.5) < 1e-9
    assert FakeEvent.created == 3 * rounds.Clock.MARKS, "no event is created per round"


def test_cpu_clock_adds_at_once():
    clock = rounds.Clock(cuda=False, slots=3)
    a = clock.mark(0, 0)
    clock.add(0, "verify", a, a + 0.5)
    assert clock.total("verify") == 0.5 and clock.total("draft") == 0.0
