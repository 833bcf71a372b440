"""A request's rounds: how one round is issued on the device, the report the host reads back, and the
runner that overlaps round i+1 with reading round i's report.

    rounds = make_rounds(engine, mode, gamma)      # PlainRounds, HostRounds, ConditionalRounds or BudgetRounds
    runner = RoundRunner(engine, rounds)
    runner.prefill(prompt)
    for result in runner.results(remaining):       # RoundResult(accepted, drafted, committed)
        ...
    runner.finish()

A round is Kangaroo's: draft with layers[:ℓ] + adapter until the confidence falls below η or γ drafts,
verify with layers[ℓ:], accept the longest agreeing prefix plus one token. Where the draft early exit
is decided is the only difference between the speculative kinds:
    HostRounds         the host reads each draft's confidence (free on a CPU; a sync per draft on a GPU);
    ConditionalRounds  the GPU decides inside captured graphs (conditional nodes: one sync per round);
    BudgetRounds       the fallback where neither is available: every captured draft step runs, and the
                       number of steps per round follows the draft lengths seen so far (still lossless).
"""
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List

import torch

from . import conditional


# ---- the report: what the host reads once per round ------------------------------------------------

@dataclass
class RoundResult:
    accepted: int            # drafts accepted (the bonus token not counted)
    drafted: int             # drafts proposed
    committed: List[int]     # the accepted drafts, then the target's token: accepted + 1 tokens
    copied: int = 0          # drafts copied from the sequence (captured copy rounds; 0: the adapter's)
    seconds: float = 0.0     # the round's time on the device (GPU: its events; CPU: wall time), set by the runner


class Report:
    """The one definition of the report's layout: an int64 row per batch row on the device,
    [accepted, drafted, committed_0 .. committed_γ, copied] (committed slots past accepted + 1 hold -1;
    `copied`, the last slot, is written only by a captured copy round's lookup (Engine.copy_lookup) and used
    only by those rounds (CapturedCopyRounds.observe); for other rounds it may hold a stale value, unused)."""
    ACCEPTED, DRAFTED, COMMITTED = 0, 1, 2
    COPIED = -1

    @staticmethod
    def width(gamma: int) -> int:
        return Report.COMMITTED + gamma + 1 + 1

    @staticmethod
    def write(report: torch.Tensor, accepted: torch.Tensor, drafted: torch.Tensor, committed: torch.Tensor):
        """On the device: accepted, drafted [B] int64; committed [B, n] int64 with n <= γ + 1."""
        report[:, Report.ACCEPTED] = accepted
        report[:, Report.DRAFTED] = drafted
        report[:, Report.COMMITTED:Report.COMMITTED + committed.shape[1]] = committed

    @staticmethod
    def read(row: List[int]) -> RoundResult:
        accepted = row[Report.ACCEPTED]
        committed = row[Report.COMMITTED:Report.COMMITTED + accepted + 1]
        return RoundResult(accepted=accepted, drafted=row[Report.DRAFTED], committed=committed,
                           copied=max(0, row[Report.COPIED]))


# ---- how a round is issued --------------------------------------------------------------------------

class Rounds:
    """Issues one round on the device, without waiting for it: draft() then verify(), which subclasses
    define. `gamma` is the most drafts a round may propose (0: plain decoding, verify() alone);
    `pipelined` rounds may be queued before the previous report is read."""
    mode = ""
    pipelined = True

    def __init__(self, engine, gamma: int):
        self.engine = engine
        self.gamma = gamma
        self.capture_s = 0.0

    @property
    def speculative(self) -> bool:
        return self.gamma > 0

    def prepare(self):
        """Before prefill: capture graphs (their warm-up runs overwrite the decode state)."""

    def issue(self, clock: "Clock", slot: int):
        """The round's phases, each timed into the clock's slot: draft (speculative only), then verify."""
        start = clock.mark(slot, 0)
        if self.speculative:
            self.draft()
            drafted = clock.mark(slot, 1)
            clock.add(slot, "draft", start, drafted)
            start = drafted
        self.verify()
        clock.add(slot, "verify", start, clock.mark(slot, 2))

    def draft(self):
        raise NotImplementedError

    def verify(self):
        raise NotImplementedError

    def observe(self, result: RoundResult):
        """The host saw a round's result (the budget path adapts to it)."""

    def describe(self) -> dict:
        return {"mode": self.mode}

    def _graphs(self, gamma: int, device_exit: bool):
        graphs, seconds = self.engine.graphs_for(gamma, self.speculative, device_exit)
        self.capture_s += seconds
        return graphs


class PlainRounds(Rounds):
    """Ordinary decoding, one token per round: the honest baseline on the same kernels."""

    def __init__(self, engine, mode: str):
        super().__init__(engine, gamma=0)
        self.mode, self.pipelined, self.graphs = mode, mode != "host", None

    def prepare(self):
        if self.mode == "graphs":
            self.graphs = self._graphs(1, device_exit=False)

    def verify(self):  # the whole step: plain decoding has no draft phase
        self.graphs.plain.replay() if self.graphs is not None else self.engine.plain_step()


class HostRounds(Rounds):
    """The draft loop on the host: stop at the first draft whose confidence is below η."""
    mode, pipelined = "host", False

    def __init__(self, engine, gamma: int):
        super().__init__(engine, gamma)
        self.syncs = 0     # draft steps whose confidence the host read
        self.drafted = 0   # drafts of the current round

    def draft(self):
        e = self.engine
        e.begin_round()
        self.drafted = 0
        for j in range(self.gamma + 1):
            keep = e.draft_step(j, self.gamma)
            if keep is None:          # step γ: only its exit state is needed
                break
            self.syncs += 1
            if not bool(keep.all()):
                break
            self.drafted = j + 1

    def verify(self):
        self.engine.verify(self.drafted + 1)


class ConditionalRounds(Rounds):
    """Captured rounds in which the GPU applies the draft early exit itself (engine/graphs.py):
    the steps after the exit cost one untaken node, and verification covers exactly the drafts."""
    mode = "graphs"

    def prepare(self):
        self.graphs = self._graphs(self.gamma, device_exit=True)

    def draft(self):
        self.graphs.draft.replay()

    def verify(self):
        self.graphs.verify.replay()

    def describe(self):
        return {"mode": self.mode, "device_exit": True}


class BudgetRounds(Rounds):
    """The fallback where the GPU cannot skip work itself ("device" mode, or graphs without conditional
    nodes): a round runs every draft step it has, whatever the confidence exit decides, so the number of
    steps (the budget) follows the draft lengths seen: see next_budget. adaptive=False always runs γ."""

    def __init__(self, engine, gamma: int, use_graphs: bool, adaptive: bool = True, why: str = ""):
        super().__init__(engine, gamma)
        self.mode, self.use_graphs, self.why = ("graphs" if use_graphs else "device"), use_graphs, why
        self.budgets = list(range(1, gamma + 1)) if adaptive else [gamma]
        self.budget = gamma
        self.graphs = {}

    def prepare(self):
        if self.use_graphs:  # one pair of graphs per budget value
            self.graphs = {b: self._graphs(b, device_exit=False) for b in self.budgets}

    def draft(self):
        e, b = self.engine, self.budget
        if self.use_graphs:
            self.graphs[b].draft.replay()
            return
        e.begin_round()
        for j in range(b + 1):
            e.draft_step(j, b)

    def verify(self):
        b = self.budget
        self.graphs[b].verify.replay() if self.use_graphs else self.engine.verify(b + 1)

    def observe(self, result):
        if len(self.budgets) > 1:
            self.budget = next_budget(self.budget, result.drafted, self.gamma)

    def describe(self):
        return {"mode": self.mode, "device_exit": False, "device_exit_off": self.why}


def next_budget(budget: int, drafted: int, gamma: int) -> int:
    """Draft steps for the next budget round: a draft that stopped at k < budget gets k + 1 next time,
    one that used the whole budget gets twice as much (up to γ). The budget only caps how many drafts are
    proposed; verification decides every token, so the output never changes."""
    return min(gamma, 2 * budget) if drafted >= budget else max(1, drafted + 1)


MODES = ("host", "device", "graphs")


def make_rounds(engine, mode: str, gamma: int, adaptive_draft: bool = True) -> Rounds:
    """The Rounds for a request. mode: "host", "device" or "graphs"; gamma: γ, or 0 for plain decoding."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if gamma == 0:
        return PlainRounds(engine, mode)
    if mode == "host":
        return HostRounds(engine, gamma)
    if mode == "graphs":
        why = conditional.unsupported_reason(engine.spec.device) if adaptive_draft else \
            "adaptive_draft=False asks for every draft step in every round"
        if not why:
            return ConditionalRounds(engine, gamma)
        return BudgetRounds(engine, gamma, use_graphs=True, adaptive=adaptive_draft, why=why)
    return BudgetRounds(engine, gamma, use_graphs=False, adaptive=adaptive_draft,
                        why="mode='device' runs the draft steps without graphs")


def start_rounds(engine, mode: str, gamma: int, adaptive_draft: bool = True) -> Rounds:
    """make_rounds, prepared (graphs captured). Where capturing conditional nodes fails although they were
    reported available, the round falls back to the budget path and says why (conditional.py remembers
    the failure, so later requests go there directly)."""
    rounds = make_rounds(engine, mode, gamma, adaptive_draft)
    try:
        rounds.prepare()
    except Exception as e:  # noqa: BLE001  only the capture failure is handled; anything else re-raises
        if not (isinstance(rounds, ConditionalRounds) and conditional.is_capture_error(e)):
            raise
        why = conditional.unsupported_reason(engine.spec.device) or f"capturing conditional nodes failed: {e}"
        rounds = BudgetRounds(engine, gamma, use_graphs=True, adaptive=adaptive_draft, why=why)
        rounds.prepare()
    return rounds


# ---- running rounds: report slots, pipelining and the phase clock ------------------------------------

class Clock:
    """Phase times. CPU: wall time. GPU: CUDA events from a fixed pool, one set per slot (no event is
    created inside the decode loop); a slot's spans are read by settle(slot) once the round they time
    has been waited for, so reading them costs no extra sync."""

    MARKS = 3  # start, end of drafting, end of the round

    def __init__(self, cuda: bool, slots: int):
        self.cuda = cuda
        self.totals = {}
        self.pending = [[] for _ in range(slots)]
        self.unsettled = [0.0] * slots   # CPU: a slot's seconds since its last settle
        self.events = [[torch.cuda.Event(enable_timing=True) for _ in range(self.MARKS)] for _ in range(slots)] \
            if cuda else []

    def mark(self, slot: int, i: int):
        if not self.cuda:
            return time.perf_counter()
        ev = self.events[slot][i]
        ev.record()
        return ev

    def add(self, slot: int, name: str, start, end):
        if self.cuda:
            self.pending[slot].append((name, start, end))
        else:
            self.totals[name] = self.totals.get(name, 0.0) + (end - start)
            self.unsettled[slot] += end - start

    def settle(self, slot: int) -> float:
        """Add the slot's spans to the totals; its round must have completed (then its events may be
        recorded again). Returns the seconds they span."""
        spent, self.unsettled[slot] = self.unsettled[slot], 0.0
        for name, start, end in self.pending[slot]:
            seconds = start.elapsed_time(end) / 1e3
            self.totals[name] = self.totals.get(name, 0.0) + seconds
            spent += seconds
        self.pending[slot].clear()
        return spent

    def total(self, name: str) -> float:
        return self.totals.get(name, 0.0)


class RoundRunner:
    """Runs a request's rounds. Two report slots: the host reads round i's report while round i+1
    already runs (pipelined rounds only), so the GPU never waits for Python; the read is the round's one
    host sync. The next round is queued only when the current one cannot finish the request by length
    (a round commits at most γ + 1 tokens), so no round runs past the reserved cache; after an EOS the
    one queued round is wasted work whose output is dropped."""
    PREFILL = 2  # the clock's third slot

    def __init__(self, engine, rounds: Rounds):
        self.engine, self.rounds = engine, rounds
        self.cuda = engine.spec.device.type == "cuda"
        self.report_host = torch.empty((2, *engine.report.shape), dtype=torch.int64, pin_memory=self.cuda)
        self.ready = [torch.cuda.Event() for _ in range(2)] if self.cuda else []
        self.clock = Clock(self.cuda, slots=3)
        self.host_syncs = 0
        self.t_start = 0.0
        self.prefill_off = "no prefill yet"

    def prefill(self, prompt: torch.Tensor):
        # in captured chunks where the rounds replay graphs and the engine can (Engine.prefill_graphs_off)
        self.prefill_off = self.engine.prefill_graphs_off(prompt.shape[1] - 1) if self.rounds.mode == "graphs" else \
            f"the rounds run in mode {self.rounds.mode!r}, without graphs"
        if not self.prefill_off:  # before the clock and the prompt: capturing writes the cache
            seconds, self.prefill_off = self.engine.prepare_prefill(self.rounds.speculative)
            self.rounds.capture_s += seconds
        captured = not self.prefill_off
        if self.cuda:
            torch.cuda.synchronize()
        self.t_start = time.perf_counter()
        c0 = self.clock.mark(self.PREFILL, 0)
        self.engine.prefill(prompt, self.rounds.speculative, captured=captured)
        self.clock.add(self.PREFILL, "prefill", c0, self.clock.mark(self.PREFILL, 1))

    def _issue(self, slot: int):
        self.rounds.issue(self.clock, slot)
        self.report_host[slot].copy_(self.engine.report, non_blocking=self.cuda)
        if self.cuda:
            self.ready[slot].record()

    def results(self, remaining: Callable[[], int]) -> Iterator[RoundResult]:
        """Round results in order, forever; remaining() is how many tokens the request still needs."""
        in_flight: List[int] = []
        next_slot = 0
        most = self.rounds.gamma + 1
        while True:
            if not in_flight:
                self._issue(next_slot)
                in_flight.append(next_slot)
                next_slot ^= 1
            if self.rounds.pipelined and most < remaining():
                self._issue(next_slot)
                in_flight.append(next_slot)
                next_slot ^= 1
            slot = in_flight.pop(0)
            if self.cuda:
                self.ready[slot].synchronize()
            self.host_syncs += 1
            spent = self.clock.settle(slot)
            result = Report.read(self.report_host[slot, 0].tolist())
            result.seconds = spent
            self.rounds.observe(result)
            yield result

    def finish(self) -> dict:
        """Wait for the device; the request's wall time and phase totals (an unread queued round's spans
        are dropped)."""
        if self.cuda:
            torch.cuda.synchronize()
        total = time.perf_counter() - self.t_start
        self.clock.settle(self.PREFILL)
        syncs = self.host_syncs + getattr(self.rounds, "syncs", 0)
        return {"total_s": total, "prefill_s": self.clock.total("prefill"), "draft_s": self.clock.total("draft"),
                "verify_s": self.clock.total("verify"), "host_syncs": syncs, "capture_s": self.rounds.capture_s,
                "prefill_kernel": "eager" if self.prefill_off else "graphs", "prefill_graphs_off": self.prefill_off}
