"""`speculative_generate` and `generate`: greedy decoding on the engine, with and without Kangaroo.

A round reads like the paper: draft with layers[:ℓ] + adapter until confidence < η or γ drafts, verify
with layers[ℓ:] over the cached exit states, accept the longest agreeing prefix plus one token. On a
GPU the round is two CUDA-graph replays and one host read (the report), the only host sync, and the
host reads round i's report while round i+1 runs. The graphs decide the confidence exit themselves
(conditional nodes: engine/graphs.py), so a round does only the draft steps it uses and verifies only
the positions it drafted.
"""
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import torch

from .adapter import Adapter
from .engine import conditional
from .engine.engine import Engine
from .engine.graphs import CudaGraphs
from .engine.spec import model_spec

MODES = ("host", "device", "graphs")


@dataclass
class DecodeStats:
    rounds: int = 0                       # verify steps (plain decoding: tokens)
    new_tokens: int = 0                   # tokens returned, after EOS / max_new_tokens truncation
    drafted: List[int] = field(default_factory=list)    # drafts proposed, per round
    accepted: List[int] = field(default_factory=list)   # drafts accepted, per round (bonus not counted)
    host_syncs: int = 0                   # times the host waited for device results
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0
    capture_s: float = 0.0                # CUDA-graph capture (first call with these shapes only)
    mode: str = ""
    device_exit: bool = False             # graphs mode: the GPU skips the draft steps after the confidence exit
                                          # and verifies exactly the drafted positions (conditional nodes)
    device_exit_off: str = ""             # why not, where it is off in graphs mode

    @property
    def mean_accepted(self) -> float:
        """Tokens committed per verify step, bonus included (plain decoding = 1.0)."""
        return (sum(self.accepted) + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def host_syncs_per_round(self) -> float:
        return self.host_syncs / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_s if self.total_s else 0.0

    def acceptance_by_position(self, max_draft: int) -> List[float]:
        """P(draft i accepted | draft i proposed), i = 1..max_draft."""
        out = []
        for i in range(1, max_draft + 1):
            proposed = sum(1 for d in self.drafted if d >= i)
            taken = sum(1 for a in self.accepted if a >= i)
            out.append(taken / proposed if proposed else float("nan"))
        return out


@dataclass
class GenerationOutput:
    sequences: torch.Tensor               # [1, prompt + new] int64
    stats: DecodeStats


# ---- argument checks -----------------------------------------------------------------------------

def _as_prompt(input_ids, vocab_size: int, device) -> torch.Tensor:
    if isinstance(input_ids, (list, tuple)):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in input_ids):
            raise ValueError("input_ids: a list must hold ints (token ids)")
        input_ids = torch.tensor(input_ids, dtype=torch.int64)
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a LongTensor [1, T] or [T] or a list of ints, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [1, T] or [T], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] != 1:
        raise ValueError(f"input_ids: batch size {input_ids.shape[0]} is not supported yet; only batch 1 is "
                         "(batched decoding with per-row cache lengths is planned). Run the rows one by one.")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one prompt token")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"input_ids: token ids must lie in [0, {vocab_size}), got [{lo}, {hi}]")
    return input_ids.to(device=device, dtype=torch.int64)


def _eos_ids(model, eos_token_id) -> List[int]:
    if eos_token_id is None:
        gc = getattr(model, "generation_config", None)
        eos_token_id = getattr(gc, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not all(isinstance(i, int) for i in ids):
        raise ValueError(f"eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
    return ids


def _check_common(max_new_tokens, mode):
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")


def _engine_for(model) -> Engine:
    """The engine cached on the model; rebuilt if the model moved or changed dtype."""
    embed = model.get_input_embeddings().weight
    spec_key = (str(embed.device), embed.dtype, embed.data_ptr())
    cached = model.__dict__.get("_kangaroo_engine")
    if cached is None or cached[0] != spec_key:
        cached = (spec_key, Engine(model_spec(model)))
        model.__dict__["_kangaroo_engine"] = cached
    return cached[1]


def _pick_mode(engine: Engine, mode: Optional[str]) -> str:
    cuda = engine.spec.device.type == "cuda"
    if mode is None:
        return "graphs" if cuda else "host"
    if mode == "graphs" and not cuda:
        raise ValueError("mode='graphs' needs the model on a CUDA device")
    return mode


def _check_capacity(engine: Engine, prompt_len: int, max_new_tokens: int):
    limit = engine.spec.max_positions
    if prompt_len + max_new_tokens > limit:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"context limit of {limit} positions (max_position_embeddings)")
    window = engine.spec.sliding_window
    if window and prompt_len + max_new_tokens > window:
        raise ValueError(f"prompt + max_new_tokens ({prompt_len + max_new_tokens}) exceeds the sliding window "
                         f"({window}); sliding-window attention past the window is not supported")


# ---- public API ----------------------------------------------------------------------------------

@torch.inference_mode()
def speculative_generate(model, input_ids: Union[torch.Tensor, Sequence[int]], adapter: Adapter = None,
                         max_new_tokens: int = 128, exit_layer: Optional[int] = None, threshold: float = 0.6,
                         max_draft: int = 6, eos_token_id=None, streamer=None,
                         mode: Optional[str] = None, adaptive_draft: bool = True) -> GenerationOutput:
    """Greedy Kangaroo decoding; the output equals `generate` token for token.

    Args:
        model: a transformers LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM on one device.
        input_ids: [1, T] or [T] LongTensor, or a list of ints.
        adapter: a kangaroo_ext.Adapter for this model (kx.load_default_adapter(model) for SmolLM2).
        exit_layer: ℓ; None = the adapter's. The draft is layers[:ℓ] + adapter.
        threshold: η in [0, 1]; drafting stops when the draft's top-1 probability falls below it.
        max_draft: γ >= 1, the most drafts per round.
        eos_token_id: int or list; None = the model's generation config.
        streamer: an object with put(LongTensor) and end() (e.g. transformers.TextStreamer).
        mode: "graphs" (CUDA graphs, default on GPU), "device" (same steps without graphs) or "host"
            (draft loop controlled from the host, default on CPU where reading a tensor costs nothing).
        adaptive_draft: where the GPU cannot apply the confidence exit itself ("device" mode, or
            "graphs" without conditional graph nodes: see stats.device_exit), cap each round's draft
            steps by the draft lengths seen so far (such a round computes every step it has, even after
            the exit); False always runs γ steps. Never changes the output.
    Returns:
        GenerationOutput with sequences [1, T + new] and stats (DecodeStats).
    """
    _check_common(max_new_tokens, mode)
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    if not isinstance(max_draft, int) or isinstance(max_draft, bool) or max_draft < 1:
        raise ValueError(f"max_draft must be an int >= 1, got {max_draft!r}")
    if max_draft > 32:
        raise ValueError(f"max_draft must be <= 32 (acceptance beyond a few drafts is negligible), got {max_draft}")
    if adapter is None:
        raise ValueError("adapter is required: kx.load_default_adapter(model) for the default model, or "
                         "kx.Adapter.for_model(model, exit_layer=...) / Adapter.from_pretrained(dir)")
    if not isinstance(adapter, Adapter):
        raise ValueError(f"adapter must be a kangaroo_ext.Adapter, got {type(adapter).__name__}")
    engine = _engine_for(model)
    adapter.check_compatible(engine.spec)
    if exit_layer is not None and exit_layer != adapter.exit_layer:
        if not isinstance(exit_layer, int) or not 1 <= exit_layer < engine.spec.num_layers:
            raise ValueError(f"exit_layer must be an int in [1, {engine.spec.num_layers - 1}], got {exit_layer!r}")
        raise ValueError(f"exit_layer={exit_layer} but the adapter was built for exit layer {adapter.exit_layer}")
    prompt = _as_prompt(input_ids, engine.spec.vocab_size, engine.spec.device)
    _check_capacity(engine, prompt.shape[1], max_new_tokens)
    engine.bind_adapter(adapter)
    return _decode(engine, prompt, max_new_tokens, _eos_ids(model, eos_token_id), streamer,
                   _pick_mode(engine, mode), gamma=max_draft, threshold=float(threshold),
                   adaptive_draft=bool(adaptive_draft))


@torch.inference_mode()
def generate(model, input_ids: Union[torch.Tensor, Sequence[int]], max_new_tokens: int = 128,
             eos_token_id=None, streamer=None, mode: Optional[str] = None) -> GenerationOutput:
    """Plain greedy decoding on the same engine and kernels: the honest baseline for speedups."""
    _check_common(max_new_tokens, mode)
    engine = _engine_for(model)
    prompt = _as_prompt(input_ids, engine.spec.vocab_size, engine.spec.device)
    _check_capacity(engine, prompt.shape[1], max_new_tokens)
    return _decode(engine, prompt, max_new_tokens, _eos_ids(model, eos_token_id), streamer,
                   _pick_mode(engine, mode), gamma=None, threshold=0.0)


# ---- the decode loop -----------------------------------------------------------------------------

class _Clock:
    """Phase times. CPU: wall time. GPU: CUDA events from a fixed pool, one set per report slot (no
    event is created inside the decode loop); a slot's spans are read by settle(slot) once the round
    they time has been waited for, so reading them costs no extra sync."""

    MARKS = 3  # start, end of drafting, end of the round

    def __init__(self, cuda: bool, slots: int):
        self.cuda = cuda
        self.totals = {}
        self.pending = [[] for _ in range(slots)]
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

    def settle(self, slot: int):
        """Add the slot's spans to the totals; its round must have completed (then its events may be
        recorded again)."""
        for name, start, end in self.pending[slot]:
            self.totals[name] = self.totals.get(name, 0.0) + start.elapsed_time(end) / 1e3
        self.pending[slot].clear()

    def total(self, name: str) -> float:
        return self.totals.get(name, 0.0)


def _next_budget(budget: int, drafted: int, gamma: int) -> int:
    """How many draft steps the next round may take, where the GPU cannot skip work itself (no conditional
    graph nodes, or "device" mode): such a round runs every step it has whatever the confidence exit
    decides (the exit only limits what is proposed), so the budget
    tracks the draft lengths actually seen: a draft that stopped at k < budget gets k + 1 next time, one
    that used the whole budget gets twice as much (up to γ). Output is unchanged: the budget only caps how
    many drafts are proposed, and verification decides every token."""
    return min(gamma, 2 * budget) if drafted >= budget else max(1, drafted + 1)


def _decode(engine: Engine, prompt, max_new, eos_ids, streamer, mode, gamma, threshold,
            adaptive_draft: bool = False) -> GenerationOutput:
    speculative = gamma is not None
    g = gamma or 1
    T = prompt.shape[1]
    cuda = engine.spec.device.type == "cuda"
    stats = DecodeStats(mode=mode)
    engine.reserve(T + max_new + g + 1, g)
    if mode == "graphs" and speculative:
        stats.device_exit_off = conditional.unsupported_reason(engine.spec.device)
        stats.device_exit = not stats.device_exit_off
    # Draft budget per round (see _next_budget), where the GPU cannot exit early itself: one pair of
    # graphs per budget value, captured before prefill because capture warm-ups overwrite the decode state.
    budgets = range(1, g + 1) if speculative and adaptive_draft and not stats.device_exit else [g]
    graphs = {}
    if mode == "graphs":
        for b in budgets:
            graphs[b] = engine.graphs.get((b, speculative))
            if graphs[b] is None or graphs[b].device_exit != stats.device_exit:
                graphs[b] = engine.graphs[(b, speculative)] = CudaGraphs(engine, b, speculative,
                                                                         device_exit=stats.device_exit)
                stats.capture_s += graphs[b].capture_seconds
    budget = g
    # Two report slots: the host reads round i's report while round i+1 already runs on the GPU.
    report_host = torch.empty((2, *engine.report.shape), dtype=torch.int64, pin_memory=cuda)
    ready = [torch.cuda.Event() for _ in range(2)] if cuda else []
    engine.threshold.fill_(threshold)
    PREFILL = 2  # the clock's third slot; slots 0 and 1 follow the report slots
    clock = _Clock(cuda, slots=3)
    if cuda:
        torch.cuda.synchronize()
    t_start = time.perf_counter()

    c0 = clock.mark(PREFILL, 0)
    engine.prefill(prompt, speculative)
    clock.add(PREFILL, "prefill", c0, clock.mark(PREFILL, 1))
    if streamer is not None:
        streamer.put(prompt[0].cpu())

    def enqueue_round(slot: int):
        """One round (plain: one step) on the device, then its report copied to slot; no sync."""
        c0 = clock.mark(slot, 0)
        if not speculative:
            graphs[g].plain.replay() if mode == "graphs" else engine.plain_step()
            clock.add(slot, "verify", c0, clock.mark(slot, 2))
        elif mode == "host":
            engine.begin_round()
            k = 0
            for j in range(g + 1):
                keep = engine.draft_step(j, g)
                if keep is None:
                    break
                stats.host_syncs += 1
                if not bool(keep.all()):
                    break
                k = j + 1
            c1 = clock.mark(slot, 1)
            clock.add(slot, "draft", c0, c1)
            engine.verify(k + 1)
            clock.add(slot, "verify", c1, clock.mark(slot, 2))
        else:
            if mode == "graphs":
                graphs[budget].draft.replay()
            else:
                engine.begin_round()
                for j in range(budget + 1):
                    engine.draft_step(j, budget)
            c1 = clock.mark(slot, 1)
            clock.add(slot, "draft", c0, c1)
            graphs[budget].verify.replay() if mode == "graphs" else engine.verify(budget + 1)
            clock.add(slot, "verify", c1, clock.mark(slot, 2))
        report_host[slot].copy_(engine.report, non_blocking=cuda)
        if cuda:
            ready[slot].record()

    # Rounds run one ahead of the host (not in host mode, whose draft loop syncs anyway): the next
    # round is queued before this one's report is read, so the GPU never waits for Python. The next
    # round is queued only when the current one cannot finish the request by length (at most γ+1
    # tokens per round), so no round runs past the reserved cache; after an EOS the one queued round
    # is wasted work whose output is dropped. Its draft budget comes from the round before.
    pipelined = mode != "host"
    in_flight: List[int] = []
    next_slot = 0
    new_tokens: List[int] = []
    eos = set(eos_ids)
    finished = False
    while not finished:
        if not in_flight:
            enqueue_round(next_slot)
            in_flight.append(next_slot)
            next_slot ^= 1
        if pipelined and len(new_tokens) + g + 1 < max_new:
            enqueue_round(next_slot)
            in_flight.append(next_slot)
            next_slot ^= 1
        slot = in_flight.pop(0)
        if cuda:
            ready[slot].synchronize()                     # the round's one host sync
        stats.host_syncs += 1
        clock.settle(slot)
        rep = report_host[slot, 0].tolist()
        accepted, drafted = rep[1], rep[2]
        committed = rep[3:3 + accepted + 1]
        stats.rounds += 1
        stats.accepted.append(accepted)
        stats.drafted.append(drafted)
        if len(budgets) > 1:
            budget = _next_budget(budget, drafted, g)
        room = max_new - len(new_tokens)
        emit = committed[:room]
        for i, t in enumerate(emit):
            if t in eos:
                emit = emit[:i + 1]
                finished = True
                break
        new_tokens.extend(emit)
        if len(new_tokens) >= max_new:
            finished = True
        if streamer is not None and emit:
            streamer.put(torch.tensor(emit))

    if streamer is not None:
        streamer.end()
    if cuda:
        torch.cuda.synchronize()
    stats.total_s = time.perf_counter() - t_start
    clock.settle(PREFILL)  # synchronized above on the GPU; an unprocessed last round's spans are dropped
    stats.prefill_s = clock.total("prefill")
    stats.draft_s = clock.total("draft")
    stats.verify_s = clock.total("verify")
    stats.new_tokens = len(new_tokens)
    sequences = torch.cat([prompt[0].cpu(), torch.tensor(new_tokens, dtype=torch.int64)])[None]
    return GenerationOutput(sequences=sequences.to(prompt.device), stats=stats)
