"""Rounds whose drafts may be copied from the sequence itself (prompt lookup), beside the adapter's.

Each round first looks the sequence's last n tokens up in everything before them (ops.ngram_draft:
longest n first, latest occurrence) and picks its draft source:

    "copy"     a match of n >= 2 tokens: the 2n tokens that followed it (at most copy_gamma) are the
               drafts; one multi-row shallow step gives their exit states (no draft head at all), and
               verification pays about a tenth of a plain step per extra row on a CPU;
    "mixed"    a match shorter than the adapter's γ, and extend_with_adapter: the adapter proposes
               after the last copied token and drafts on while its confidence stays >= η;
    "adapter"  no match: exactly today's Kangaroo round (HostRounds), so a failed lookup costs the
               lookup alone (a few int64 compares per round) and nothing else;
    "plain"    no match and no adapter drafting (copy_only, the `pld` method): one ordinary step.

Verification is the engine's one verify path, so greedy output equals plain decoding and sampling keeps
the target's law (a copied draft's q is one-hot: engine.draft_copied).

Where the lookup runs. On the device, over the engine's history buffer, with no host sync (the op has
static shapes): with pipelined rounds the host's copy of the sequence is a round behind (round i+1 is
queued before round i's report is read), so a host-side lookup would either miss the newest tokens or
stall the pipeline. CopyRounds (modes "host", "device") then reads the match length back (`count`),
because the number of rows of the shallow step and of verification follows it: free on a CPU, one extra
sync per round on a GPU. CapturedCopyRounds (mode "graphs") reads nothing: its copy step always has
CopyPolicy.rows rows, the first k of them drafts (num_drafted = k, on the device), a conditional node picks
the copy step or the adapter's draft loop, and verification's SWITCH covers exactly the k drafts.
"""
from dataclasses import dataclass
from typing import List

import torch

from .. import _extension, ops
from .rounds import ConditionalRounds, HostRounds

# The policy's numbers, from the greedy SmolLM2 answers to 12 prompts of the long-context development set
# (bench/results/copy_draft_cpu/README.md): the tokens accepted after a match grow with the matched n,
#     n = 1: 0.3-0.4 accepted on average (83% of 1-token matches propose nothing useful)
#     n = 2: 1.0-1.4;  n = 3: 1.9-2.9;  n = 4-7: 3.1-3.7;  n >= 8: about 6
# while each copied row costs about a tenth of a plain step on a CPU. So: no copying on a single token,
# look up to 8 tokens back, and copy 2 tokens per matched token (at most 10).
DEFAULT_MIN_NGRAM = 2
DEFAULT_MAX_NGRAM = 8
DEFAULT_COPY_GAMMA = 10       # copied drafts cost one multi-row step, so a longer chain than the adapter's pays
COPIED_PER_MATCHED_TOKEN = 2


@dataclass(frozen=True)
class CopyPolicy:
    """What a captured copy round looks up and copies (hashable: it keys the engine's graph cache)."""
    min_ngram: int = DEFAULT_MIN_NGRAM
    max_ngram: int = DEFAULT_MAX_NGRAM
    rows: int = DEFAULT_COPY_GAMMA                  # copied slots per copy round (a static shape)
    per_matched: int = COPIED_PER_MATCHED_TOKEN


def copy_policy_for(engine) -> CopyPolicy:
    """The captured copy rounds' policy for this engine: the default, its copied slots kept within the
    attention kernel's batch-invariant width on a GPU in 16 bits. A copy round verifies rows + 1 positions;
    past that width verified rows stop rounding like one-token steps, and bf16 output drifts from plain
    decoding at near-ties (10 copied slots, 11 positions, 33 query rows of the default model's 32: 27 of
    80 MT-bench turns equal to plain on the H100 at a258f80, against 80 of 80 with the adapter's 7)."""
    spec = engine.spec
    if spec.device.type != "cuda" or spec.dtype not in (torch.float16, torch.bfloat16):
        return CopyPolicy()
    group = spec.num_heads // spec.num_kv_heads
    if not engine.triton_attention_off():  # the Triton kernel's row block (triton_kernels/attention.py)
        most = ops.backends.triton_module().attention.invariant_max_tokens(group)
    else:
        most = _extension.attention_invariant_max_tokens(group, spec.head_dim, spec.dtype.itemsize,
                                                         spec.device.index or 0)
    if not most:  # no invariant order to keep (switched off, or no extension)
        return CopyPolicy()
    return CopyPolicy(rows=max(1, min(DEFAULT_COPY_GAMMA, most - 1)))


class CopyRounds(HostRounds):
    """Kangaroo's host-controlled rounds, with copied drafts chosen per round (see the module's doc).
    gamma: the adapter's γ (0: copy only); copy_gamma: the most tokens one round copies."""
    mode = "host"

    def __init__(self, engine, gamma: int, copy_gamma: int = DEFAULT_COPY_GAMMA, min_ngram: int = DEFAULT_MIN_NGRAM,
                 max_ngram: int = DEFAULT_MAX_NGRAM, extend_with_adapter: bool = True, mode: str = "host",
                 copied_per_matched_token: int = COPIED_PER_MATCHED_TOKEN):
        super().__init__(engine, max(gamma, copy_gamma))   # self.gamma: the most drafts any round proposes
        self.mode = mode
        self.adapter_gamma, self.copy_gamma = gamma, copy_gamma
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self.per_matched = copied_per_matched_token
        self.extend = extend_with_adapter and gamma > 0
        self.sources: List[str] = []   # per round: "copy", "mixed", "adapter" or "plain"
        self.copied: List[int] = []    # per round: drafts that came from the lookup

    def draft(self):
        e = self.engine
        e.begin_round()
        tokens, count, matched = ops.ngram_draft(e.history, e.cache_len + 1, self.min_ngram, self.max_ngram,
                                                 self.copy_gamma)
        k = int(count.minimum(matched * self.per_matched)[0])   # the one read back: free on a CPU (module doc)
        if k == 0:
            self.copied.append(0)
            if self.adapter_gamma == 0:
                self.sources.append("plain")
                e.draft_step(0, 0)          # the exit state of the last token alone: verify does the rest
                self.drafted = 0
                return
            self.sources.append("adapter")
            self._adapter_chain(0)
            return
        self.copied.append(k)
        extend = self.extend and k < self.adapter_gamma
        keep = e.draft_copied(tokens, k, extend)
        self.drafted = k
        if keep is None:
            self.sources.append("copy")
            return
        self.sources.append("mixed")
        self.syncs += 1
        if bool(keep.all()):
            self.drafted = k + 1
            self._adapter_chain(k + 1)

    def _adapter_chain(self, first: int):
        """HostRounds' draft loop from step `first` (its token is in tokens_in[:, first]), up to the
        adapter's γ drafts in all."""
        e = self.engine
        for j in range(first, self.adapter_gamma + 1):
            keep = e.draft_step(j, self.adapter_gamma)
            if keep is None:
                break
            self.syncs += 1
            if not bool(keep.all()):
                break
            self.drafted = j + 1

    def describe(self) -> dict:
        return {"mode": self.mode, "copy_draft": True}


class CapturedCopyRounds(ConditionalRounds):
    """Copy rounds on a GPU, captured (engine/graphs.py): the lookup, the choice between copying and the
    adapter's draft loop, and verification of exactly the drafts all run on the device, so the host still
    reads one report per round and rounds stay pipelined. Unlike CopyRounds there is no "mixed" round (the
    adapter does not extend a copied chain) and a copy round always runs its shallow step over policy.rows
    slots. Needs conditional nodes. The report's `copied` slot says which source each round used."""

    def __init__(self, engine, gamma: int, policy: CopyPolicy = CopyPolicy()):
        super().__init__(engine, max(gamma, policy.rows))
        self.adapter_gamma, self.policy = gamma, policy
        self.sources: List[str] = []
        self.copied: List[int] = []

    def prepare(self):
        graphs, seconds = self.engine.graphs_for(self.adapter_gamma, True, True, copy=self.policy)
        self.capture_s += seconds
        self.graphs = graphs

    def observe(self, result):
        self.sources.append("copy" if result.copied else ("adapter" if self.adapter_gamma else "plain"))
        self.copied.append(result.copied)

    def describe(self) -> dict:
        return {"mode": self.mode, "device_exit": True, "copy_draft": True}
