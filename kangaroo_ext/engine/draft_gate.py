"""The draft gate: whether the next round drafts at all.

A Kangaroo round pays for its drafts whether or not they are accepted. Where few are (sampling at temperature 1
on MT-bench: τ 1.18, 0.89x plain on an H100 at 80eb2b7; 0.81x on a CPU at f18054f), every round loses to a plain
step. The gate lets such stretches run *resting* rounds instead:

    speculative round   the rounds it wraps (ConditionalRounds, HostRounds, copy rounds, ...), unchanged;
    resting round       draft step 0 without the draft head (the shallow layers and the adapter's blocks on the
                        last token: its exit state and the adapter's cache row, which later drafts attend to),
                        then verification of that one position: a plain step plus the adapter's blocks.

While resting it probes (one speculative round) after `gap` resting rounds, and doubles the gap after each probe
that loses (up to MAX_GAP): text whose drafts start to land again is found within a few dozen tokens.

Greedy output is the target's whatever the gate decides (verification decides every token; a resting round
is the same one-position verification a round without drafts runs), so greedy, the gate weighs the rounds'
own times: speculating pays while a speculative round's tokens (accepted + 1) per second beat a resting
round's one token per its time. Sampled tokens depend on which rounds ran, so there the gate decides from token
counts alone, never a clock, and a seed gives the same tokens run to run. It prices a speculative round beyond
a resting one in plain steps (DraftCosts; also greedy until a resting round has been timed):

    head + drafted * (step + row)        head: the draft head of step 0; step: each further draft step;
                                         row: each further verified position
against the `accepted` tokens it gains. The CPU's prices vary between machines by 2-3x (multi-row GEMMs
above all): bench/round_costs.py measures a machine's, and draft_gate= takes them as a DraftCosts.
"""
from collections import deque
from dataclasses import dataclass
from typing import List

from .rounds import Rounds, RoundResult


@dataclass(frozen=True)
class DraftCosts:
    """What a speculative round costs beyond a resting one, in plain steps (see the module's doc)."""
    head: float
    step: float
    row: float

    def __post_init__(self):
        for name in ("head", "step", "row"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"DraftCosts.{name} must be a finite number >= 0 (plain steps), got {value!r}")

    def extra(self, drafted: float) -> float:
        return self.head + drafted * (self.step + self.row)


# Measured prices, in plain steps of the default model (the gate needs the break-even, not precision):
#   cuda, greedy   H100, 15ee133's tree (round_price_interleaved_1.json): plain step 661 µs, draft step 71.1 of
#                  which ~61 are the shallow layers and the adapter's block a resting round runs too; verify of
#                  1 / 7 positions 624 / 899 µs: 46 µs a further position
#   cuda, sampled  H100, 80eb2b7 (mt_bench_sampled_h100_80eb2b7, 899-round turns): ~118 µs a sampled draft
#                  step (the head ~58) against a ~790 µs plain sampled step; a further verified position ~50 µs
#   cpu            bench/round_costs.py on the 2-core development VM (AVX2, fp32, one thread; three runs at
#                  fd846c6..687fde3 gave head 0.031-0.054, step 0.10-0.13, row 0.12-0.16, the last in
#                  bench/results/round_costs_cpu.json): verifying 7 positions costs 1.9 plain steps there
MEASURED_COSTS = {
    ("cuda", False): DraftCosts(head=0.015, step=0.108, row=0.069),
    ("cuda", True): DraftCosts(head=0.075, step=0.15, row=0.065),
    ("cpu", False): DraftCosts(head=0.031, step=0.111, row=0.154),
    ("cpu", True): DraftCosts(head=0.054, step=0.131, row=0.159),
}


def costs_for(device_type: str, sampled: bool) -> DraftCosts:
    return MEASURED_COSTS[("cuda" if device_type == "cuda" else "cpu", bool(sampled))]


class DraftGate:
    """The policy alone (no engine): speculate() before issuing a round, record() after reading a speculative
    round's result, record_rest() after a resting one's. Estimates are exponential moving averages (weight
    DECAY). timed: weigh the rounds' seconds (greedy), else the costs alone."""
    DECAY = 0.125
    WARMUP = 4          # speculative rounds seen before the first decision to rest
    FIRST_GAP = 4       # resting rounds before the first probe
    MAX_GAP = 32

    def __init__(self, costs: DraftCosts, timed: bool = False):
        self.costs, self.timed = costs, timed
        self.accepted = 0.0     # recent mean drafts accepted per speculative round
        self.drafted = 0.0      # recent mean drafts proposed per speculative round
        self.spec_s = 0.0       # recent mean seconds of a speculative round
        self.rest_s = None      # ... of a resting round (None: none timed yet)
        self.seen = 0
        self.resting = False
        self.gap = self.FIRST_GAP
        self.rested = 0         # resting rounds issued since the last speculative one

    def speculate(self) -> bool:
        """Whether the next round drafts (a probe, after `gap` resting rounds)."""
        if not self.resting or self.rested >= self.gap:
            self.rested = 0
            return True
        self.rested += 1
        return False

    def pays(self) -> bool:
        if self.seen < self.WARMUP:
            return True
        if self.timed and self.rest_s is not None and self.spec_s > 0:
            return (1 + self.accepted) * self.rest_s > self.spec_s    # tokens per second, both kinds
        return self.accepted > self.costs.extra(self.drafted)

    def record_rest(self, seconds: float):
        self.rest_s = seconds if self.rest_s is None else self.rest_s + self.DECAY * (seconds - self.rest_s)

    def record(self, accepted: int, drafted: int, seconds: float = 0.0):
        w = 1.0 if self.seen == 0 else self.DECAY
        self.accepted += w * (accepted - self.accepted)
        self.drafted += w * (drafted - self.drafted)
        self.spec_s += w * (seconds - self.spec_s)
        self.seen += 1
        if self.pays():
            self.resting, self.gap = False, self.FIRST_GAP
        elif self.resting:        # a probe that lost: wait longer before the next
            self.gap = min(2 * self.gap, self.MAX_GAP)
        else:
            self.resting, self.rested = True, 0


class RestingRounds(Rounds):
    """The resting round: draft step 0 without the head, then verification of one position (module doc)."""

    def __init__(self, engine, use_graphs: bool):
        super().__init__(engine, gamma=0)
        self.mode, self.graphs = ("graphs" if use_graphs else "host"), None

    @property
    def speculative(self) -> bool:  # the adapter's cache row and the exit state are written: a draft phase
        return True

    def prepare(self):
        if self.mode == "graphs":
            self.graphs = self._graphs(0, device_exit=False)

    def draft(self):
        if self.graphs is not None:
            self.graphs.draft.replay()
            return
        self.engine.begin_round()
        self.engine.draft_step(0, 0)

    def verify(self):
        self.graphs.verify.replay() if self.graphs is not None else self.engine.verify(1)


class GatedRounds(Rounds):
    """Speculative rounds (prepared) behind a DraftGate: each round is the wrapped rounds' or a resting one.
    rest: the resting rounds (None: RestingRounds); where the wrapped rounds copy drafts, the caller passes
    their copy-only twin, so a resting round still copies where the lookup matches (a copy round costs one
    multi-row shallow step and no draft head) and rests only where it would have drafted with the adapter.
    The gate weighs the adapter's rounds alone ("adapter", "mixed"): copied chains are not its decision.
    `sources` / `copied` follow the rounds read (a resting round without copies: "rest", 0)."""
    WEIGHED = ("adapter", "mixed")

    def __init__(self, inner: Rounds, costs: DraftCosts, rest: Rounds = None, timed: bool = False):
        super().__init__(inner.engine, inner.gamma)
        self.inner, self.gate = inner, DraftGate(costs, timed)
        self.mode, self.pipelined = inner.mode, inner.pipelined
        self.rest = rest if rest is not None else RestingRounds(inner.engine, use_graphs=inner.mode == "graphs")
        self.issued = deque()              # per round issued and not yet read: speculative or not
        self.sources: List[str] = []
        self.copied: List[int] = []

    @property
    def syncs(self) -> int:  # the host-side draft loops' confidence reads (HostRounds), both kinds of round
        return getattr(self.inner, "syncs", 0) + getattr(self.rest, "syncs", 0)

    def prepare(self):
        """The resting rounds' graphs (the wrapped rounds come prepared: start_rounds)."""
        self.rest.prepare()
        self.capture_s = self.inner.capture_s + self.rest.capture_s

    def issue(self, clock, slot: int):
        speculate = self.gate.speculate()
        self.issued.append(speculate)
        (self.inner if speculate else self.rest).issue(clock, slot)

    def observe(self, result: RoundResult):
        rounds = self.inner if self.issued.popleft() else self.rest
        rounds.observe(result)
        own = getattr(rounds, "sources", None)
        source = own[-1] if own else ("adapter" if rounds is self.inner else "rest")
        if rounds is self.rest and source == "plain":   # the copy-only twin found no match
            source = "rest"
        if source in self.WEIGHED:
            self.gate.record(result.accepted, result.drafted, result.seconds)
        elif source == "rest":
            self.gate.record_rest(result.seconds)
        self.sources.append(source)
        self.copied.append(rounds.copied[-1] if own else 0)

    def describe(self) -> dict:
        return dict(self.inner.describe(), draft_gate=True)
