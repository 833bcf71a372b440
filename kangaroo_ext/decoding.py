"""`speculative_generate` and `generate`: greedy decoding on the engine, with and without Kangaroo.

    out = speculative_generate(model, ids, adapter=adapter)   # Kangaroo: draft, verify, accept, repeat
    ref = generate(model, ids)                                  # plain decoding, same engine and kernels
    assert torch.equal(out.sequences, ref.sequences)            # lossless

Every argument is checked before any work. The loop itself (`_decode`) reads like the paper; how a
round runs on the device (host-side draft loop, CUDA graphs with the GPU applying the confidence exit,
or the budget fallback) is engine/rounds.py's business.
"""
import math
import os
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence, Union

import torch

from . import io
from .adapter import Adapter
from .engine.engine import Engine, Sampling, engine_for
from .engine import conditional
from .engine.copy_rounds import DEFAULT_COPY_GAMMA, CapturedCopyRounds, CopyRounds, copy_policy_for
from .engine.draft_gate import DraftCosts, GatedRounds, costs_for
from .engine.rounds import MODES, RoundRunner, start_rounds

DEFAULT_THRESHOLD = 0.6   # η when neither the call nor the adapter says otherwise
DEFAULT_MAX_DRAFT = 6     # γ
# speculative_generate's draft_gate=None, by (on a GPU, sampling): on where it was measured to win
DRAFT_GATE_DEFAULT = {(False, False): True, (False, True): True, (True, False): False, (True, True): False}
MAX_DRAFT_LIMIT = 32


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
    mode: str = ""                        # "host", "device" or "graphs"
    threshold: Optional[float] = None     # η used (speculative only)
    sampling: Optional[dict] = None       # temperature, top_k, top_p and seed of a sampled run (None: greedy)
    device_exit: bool = False             # graphs mode: the GPU skips the draft steps after the confidence exit
                                          # and verifies exactly the drafted positions (conditional nodes)
    device_exit_off: str = ""             # why not, where it is off in a speculative device/graphs run
    copy_draft: bool = False              # rounds could copy their drafts from the sequence (prompt lookup)
    copy_draft_off: str = ""              # why not, where copy_draft was asked for but the rounds cannot
    draft_sources: List[str] = field(default_factory=list)  # per round: "copy", "mixed", "adapter", "plain", "rest"
    copied: List[int] = field(default_factory=list)         # per round: drafts copied (mixed: the rest: adapter's)
    draft_gate: bool = False              # rounds could rest (no drafts) where drafting did not pay: draft_gate.py
    draft_kernel: str = ""                # graphs mode: "persistent" (one launch a draft phase) or "per-op"
    draft_kernel_off: str = ""            # why the persistent draft kernel did not run ("" where it did)
    plain_kernel: str = ""                # plain decoding on a GPU: "persistent" (one launch a step) or "per-op"
    plain_kernel_off: str = ""            # why the persistent plain step did not run ("" where it did)
    verify_tail: str = ""                 # greedy steps' end: "fused" (ops.verify_tail, 2 launches) or "per-op"
    verify_tail_off: str = ""             # why the fused tail did not run ("" where it did)
    attention_kernel: str = ""            # which backend attended: "triton" (KANGAROO_TRITON_ATTENTION) or "auto"
    attention_kernel_off: str = ""        # why the Triton attention did not run ("" where it did)
    prefill_kernel: str = ""              # how the prompt was fed: "graphs" (captured chunks) or "eager"
    prefill_graphs_off: str = ""          # why not in captured chunks ("" where it was)
    cpu_packing_off: str = ""             # why steps of several rows do not use packed CPU weights ("" where they do)
    packed_weights_mb: float = 0.0        # memory of those packed copies (the engine keeps them between calls)

    @property
    def mean_accepted(self) -> float:
        """τ: tokens committed per verify step, bonus included (plain decoding = 1.0)."""
        return (sum(self.accepted) + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def rested(self) -> int:
        """Rounds that rested (draft_gate): a plain step's work plus the adapter's blocks."""
        return self.draft_sources.count("rest")

    @property
    def host_syncs_per_round(self) -> float:
        return self.host_syncs / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_s if self.total_s else 0.0

    def by_source(self) -> dict:
        """{source: {rounds, drafted, accepted}} over the rounds of a copy_draft run."""
        out = {}
        for source, d, a in zip(self.draft_sources, self.drafted, self.accepted):
            row = out.setdefault(source, {"rounds": 0, "drafted": 0, "accepted": 0})
            row["rounds"] += 1
            row["drafted"] += d
            row["accepted"] += a
        return out

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
    sequences: torch.Tensor               # [1, prompt + new] int64, on the model's device
    stats: DecodeStats


# ---- argument checks: all of them before any work ------------------------------------------------

def _positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_threshold(threshold):
    if threshold is not None and (not isinstance(threshold, (int, float)) or isinstance(threshold, bool)
                                  or not 0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold (η) must be a number in [0, 1] or None (the adapter's recommendation), "
                         f"got {threshold!r}")


def check_max_draft(max_draft):
    if max_draft is None:
        return
    if not isinstance(max_draft, int) or isinstance(max_draft, bool) or not 1 <= max_draft <= MAX_DRAFT_LIMIT:
        raise ValueError(f"max_draft (γ) must be an int in [1, {MAX_DRAFT_LIMIT}] or None (the adapter's "
                         f"recommendation; acceptance beyond a few drafts is negligible), got {max_draft!r}")


def check_sampling(do_sample, temperature, top_k, top_p, generator, seed, device) -> Optional[Sampling]:
    """The Sampling settings of a call (None: greedy), every argument checked."""
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
    if not do_sample:
        # Greedy decoding would ignore them: say so rather than decode something the caller did not ask for.
        given = [f"{name}={value!r}" for name, value, default in (
            ("temperature", temperature, 1.0), ("top_k", top_k, 0), ("top_p", top_p, 1.0),
            ("generator", generator, None), ("seed", seed, None)) if value is not default and value != default]
        if given:
            raise ValueError(f"{', '.join(given)} only {'applies' if len(given) == 1 else 'apply'} to sampling: "
                             "pass do_sample=True (with do_sample=False, decoding is greedy)")
        return None
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0 with do_sample=True (use do_sample=False for "
                         f"greedy decoding), got {temperature!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = no top-k filter), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be a number in (0, 1] (1.0 = no top-p filter), got {top_p!r}")
    if generator is not None and seed is not None:
        raise ValueError("give generator or seed, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if torch.device(generator.device).type != torch.device(device).type:
            raise ValueError(f"generator is on {generator.device} but the model is on {device}; make it with "
                             f"torch.Generator(device={str(device)!r})")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return Sampling(float(temperature), int(top_k), float(top_p))


def _draw_seed(generator, seed) -> int:
    """The run's Philox seed: `seed`, else one drawn from `generator` (so successive calls differ and a
    seeded generator reproduces them all), else from torch's default generator (torch.manual_seed)."""
    if seed is not None:
        return seed
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=device).item())


def resolve_settings(threshold, max_draft, adapter, device) -> tuple:
    """(η, γ): the call's, else the adapter's recommendation for this device type ("recommended":
    {"cpu": {...}, "cuda": {...}} in its config, measured there), else its device-independent
    recommended_threshold, else DEFAULT_THRESHOLD and DEFAULT_MAX_DRAFT. One rule for the API, the command
    line and the benchmark."""
    mine = adapter.config.get("recommended", {}).get(torch.device(device).type, {})
    eta = threshold if threshold is not None else \
        mine.get("threshold", adapter.config.get("recommended_threshold", DEFAULT_THRESHOLD))
    gamma = max_draft if max_draft is not None else mine.get("max_draft", DEFAULT_MAX_DRAFT)
    return float(eta), int(gamma)


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
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, T] or [T] (one sequence; decode several one by one), got shape "
                         f"{tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one prompt token")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"input_ids: token ids must lie in [0, {vocab_size}), got [{lo}, {hi}]")
    return input_ids.to(device=device, dtype=torch.int64)


def _free_memory(device: torch.device) -> Optional[int]:
    """Bytes that can still be allocated on `device`, or None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_capacity(engine: Engine, prompt_len: int, max_new_tokens: int, gamma: int):
    """Positions and memory, before any work: a request that cannot fit fails here, not mid-way."""
    s = engine.spec
    if prompt_len + max_new_tokens > s.max_positions:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"context limit of {s.max_positions} positions (max_position_embeddings)")
    if s.sliding_window and prompt_len + max_new_tokens > s.sliding_window:
        raise ValueError(f"prompt + max_new_tokens ({prompt_len + max_new_tokens}) exceeds the sliding window "
                         f"({s.sliding_window}); sliding-window attention past the window is not supported")
    capacity = engine.planned_capacity(_capacity(prompt_len, max_new_tokens, gamma), max(gamma, 1))
    need, free = engine.cache_bytes(capacity), _free_memory(s.device)
    if capacity and free is not None and need > free:
        raise MemoryError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) needs a KV cache of "
                          f"{need / 2**30:.2f} GiB ({capacity} positions) but only {free / 2**30:.2f} GiB can be "
                          f"allocated on {s.device}; ask for fewer tokens")


def _capacity(prompt_len: int, max_new_tokens: int, gamma: int) -> int:
    # Room for the request plus one pipelined round beyond it (engine/rounds.py: RoundRunner). The check
    # above and the reserve in _run both size buffers for max(γ, 1) drafts (plain decoding: 1).
    return prompt_len + max_new_tokens + max(gamma, 1) + 1


# ---- public API ----------------------------------------------------------------------------------

@torch.inference_mode()
def speculative_generate(model, input_ids: Union[torch.Tensor, Sequence[int]], adapter: Adapter = None,
                         max_new_tokens: int = 128, threshold: Optional[float] = None,
                         max_draft: Optional[int] = None, eos_token_id=None, streamer=None,
                         mode: Optional[str] = None, adaptive_draft: bool = True, do_sample: bool = False,
                         temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                         generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                         copy_draft: Optional[Union[bool, str]] = None,
                         draft_gate: Optional[Union[bool, DraftCosts]] = None) -> GenerationOutput:
    """Kangaroo decoding. Greedy, the output equals `generate` token for token; sampled, every token is
    distributed exactly as the target's processed distribution (speculative sampling's accept rule).

    Args:
        model: a transformers LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM on one device.
        input_ids: [1, T] or [T] LongTensor, or a list of ints.
        adapter: a kangaroo_ext.Adapter for this model (kx.load_default_adapter(model) for SmolLM2); the
            draft is the target's first ℓ = adapter.exit_layer layers plus the adapter.
        threshold: η in [0, 1]; drafting stops when the draft's top-1 probability falls below it.
            None: the adapter's recommendation for the model's device type, else 0.6.
        max_draft: γ in [1, 32], the most drafts per round. None: the adapter's recommendation, else 6.
        eos_token_id: int or list; None = the model's generation config.
        streamer: an object with put(LongTensor) and end() (e.g. transformers.TextStreamer).
        mode: "graphs" (CUDA graphs, default on GPU), "device" (same steps without graphs) or "host"
            (draft loop controlled from the host, default on CPU where reading a tensor costs nothing).
        adaptive_draft: where the GPU cannot apply the confidence exit itself (see stats.device_exit),
            cap each round's draft steps by the draft lengths seen so far; False always runs γ steps.
            Never changes the output.
        do_sample: False (greedy) or True: sample from the target's distribution after temperature, top_k
            (0: off) and top_p (1.0: off), processed as in transformers; the draft samples from its own
            distribution processed the same way, and its top-1 probability there is the confidence.
            With do_sample=False, a temperature, top_k, top_p, generator or seed other than the default
            raises ValueError (greedy decoding would ignore it).
        generator: a torch.Generator on the model's device; the run's random seed is drawn from it. Or
            seed: an int. Neither: drawn from torch's default generator (torch.manual_seed).
        copy_draft: True: each round may copy its drafts from the prompt and the text so far (the tokens
            that followed the latest earlier occurrence of the longest recurring suffix of 2-8 tokens:
            engine/copy_rounds.py), alone or extended by the adapter; with no match the round is the
            adapter's, unchanged. "only": copied drafts alone,
            no adapter drafting (prompt-lookup decoding on this engine: the `pld` benchmark method).
            In "graphs" mode the rounds are captured (engine/copy_rounds.py, CapturedCopyRounds: copy or
            adapter per round, chosen on the device; no mixed rounds; in 16 bits at most as many copied
            drafts as keep verification batch-invariant, 9 for the default model); that needs conditional
            graph nodes, else it is off and stats.copy_draft_off says why.
            Never changes the output. stats.draft_sources / by_source() tell which source each round used.
            None (default): on where it was measured to win: "host" mode (the CPU's default; 1.45x vs 0.97x
            for the adapter alone on MT-bench, 0.97x vs 0.91x on long prompts: BENCHMARKS.md) and greedy
            decoding in "graphs" mode (the GPU's default; H100, MT-bench, 40 questions: 1.90x vs 1.16x).
            Off in "device" mode and for sampling on a GPU, where it was not measured.
        draft_gate: True: where recent rounds' drafts did not pay for themselves (too few accepted for what
            drafting and verifying them cost), rounds rest: the target's next token alone, as a plain step
            takes it, plus the adapter's blocks on it (a later draft attends to them); a speculative round
            probes again after 4 to 32 resting rounds (engine/draft_gate.py). Greedy, it weighs the rounds'
            measured times; sampled, token counts priced by a table (so a seed still gives the same tokens).
            A DraftCosts: on, priced with it (bench/round_costs.py measures a CPU's). Never changes the
            output. stats.rested counts resting rounds.
            None (default): on where it was measured to win (DRAFT_GATE_DEFAULT: on a CPU; off on a GPU,
            not yet measured there).
    Returns:
        GenerationOutput with sequences [1, T + new] and stats (DecodeStats).
    """
    _positive_int("max_new_tokens", max_new_tokens)
    check_copy_draft(copy_draft)
    check_draft_gate(draft_gate)
    check_threshold(threshold)
    check_max_draft(max_draft)
    if adapter is None:
        raise ValueError("adapter is required: kx.load_default_adapter(model) for the default model, or "
                         "kx.Adapter.for_model(model, exit_layer=...) / Adapter.from_pretrained(dir)")
    if not isinstance(adapter, Adapter):
        raise ValueError(f"adapter must be a kangaroo_ext.Adapter, got {type(adapter).__name__}")
    engine = engine_for(model)
    adapter.check_compatible(engine.spec)
    sampling = check_sampling(do_sample, temperature, top_k, top_p, generator, seed, engine.spec.device)
    threshold, max_draft = resolve_settings(threshold, max_draft, adapter, engine.spec.device)
    return _run(engine, model, input_ids, max_new_tokens, eos_token_id, streamer, mode, gamma=max_draft,
                threshold=threshold, adapter=adapter, adaptive_draft=adaptive_draft,
                sampling=sampling, seed=_draw_seed(generator, seed) if sampling else 0, copy_draft=copy_draft,
                draft_gate=draft_gate)


@torch.inference_mode()
def generate(model, input_ids: Union[torch.Tensor, Sequence[int]], max_new_tokens: int = 128,
             eos_token_id=None, streamer=None, mode: Optional[str] = None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: Optional[torch.Generator] = None, seed: Optional[int] = None) -> GenerationOutput:
    """Plain decoding on the same engine and kernels (greedy, or sampled from the same processed
    distribution with the same kernels): the honest baseline for speedups. Arguments as
    speculative_generate's."""
    _positive_int("max_new_tokens", max_new_tokens)
    engine = engine_for(model)
    sampling = check_sampling(do_sample, temperature, top_k, top_p, generator, seed, engine.spec.device)
    return _run(engine, model, input_ids, max_new_tokens, eos_token_id, streamer, mode, gamma=0,
                sampling=sampling, seed=_draw_seed(generator, seed) if sampling else 0)


def _captured_copy_unavailable(engine) -> str:
    """Why copied drafts cannot be captured in mode 'graphs' here ('' if they can): they need conditional
    nodes (the lookup's result picks the branch on the device)."""
    why = conditional.unsupported_reason(engine.spec.device)
    return f"captured copy rounds need conditional graph nodes: {why}" if why else ""


def _copy_rounds(engine, mode: str, adapter_gamma: int):
    """Copy rounds for this mode, prepared: host-decided (CopyRounds) in 'host' / 'device' mode, captured
    (CapturedCopyRounds) in 'graphs' mode; None where that capture failed (conditional.py remembers why)."""
    if mode != "graphs":
        return CopyRounds(engine, adapter_gamma, mode=mode)
    rounds = CapturedCopyRounds(engine, adapter_gamma, copy_policy_for(engine))
    try:
        rounds.prepare()
    except Exception as e:  # noqa: BLE001  only a capture failure falls back; anything else re-raises
        if not conditional.is_capture_error(e):
            raise
        return None
    return rounds


def check_copy_draft(copy_draft):
    if not (copy_draft is None or copy_draft is True or copy_draft is False or copy_draft == "only"):
        raise ValueError(f"copy_draft must be True, False, 'only' (copied drafts alone) or None (on in 'host' "
                         f"mode), got {copy_draft!r}")


def check_draft_gate(draft_gate):
    if not (draft_gate is None or draft_gate is True or draft_gate is False or isinstance(draft_gate, DraftCosts)):
        raise ValueError(f"draft_gate must be True, False, None (the measured default) or a DraftCosts (this "
                         f"machine's prices: bench/round_costs.py), got {draft_gate!r}")


def _run(engine, model, input_ids, max_new_tokens, eos_token_id, streamer, mode, gamma, threshold=None,
         adapter=None, adaptive_draft=True, sampling=None, seed=0, copy_draft=False,
         draft_gate=False) -> GenerationOutput:
    cuda = engine.spec.device.type == "cuda"
    if mode is None:
        mode = "graphs" if cuda else "host"
    elif mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
    elif mode == "graphs" and not cuda:
        raise ValueError("mode='graphs' needs the model on a CUDA device")
    prompt = _as_prompt(input_ids, engine.spec.vocab_size, engine.spec.device)
    eos = io.eos_ids(model, eos_token_id)
    if copy_draft is None:  # the measured default: see speculative_generate
        copy_draft = gamma > 0 and (mode == "host" or (mode == "graphs" and sampling is None))
    copy_off = _captured_copy_unavailable(engine) if copy_draft and mode == "graphs" else ""
    copying = bool(copy_draft) and not copy_off
    adapter_gamma = 0 if copy_draft == "only" else gamma
    if copying:  # the buffers hold the longest chain either source proposes
        gamma = max(gamma, DEFAULT_COPY_GAMMA)
    _check_capacity(engine, prompt.shape[1], max_new_tokens, gamma)
    with engine.request():  # one request at a time per engine: a second thread waits here
        engine.reserve(_capacity(prompt.shape[1], max_new_tokens, gamma), max(gamma, 1))
        if adapter is not None:
            engine.bind_adapter(adapter)
            engine.threshold.fill_(threshold)
        engine.set_sampling(sampling)
        # Graphs are captured here, before prefill: a capture's warm-up runs overwrite the decode state
        # (the random stream's offset too, hence the seed after it).
        rounds = _copy_rounds(engine, mode, adapter_gamma) if copying else \
            start_rounds(engine, mode, gamma, adaptive_draft)
        if copying and rounds is None:  # capturing the copy round failed: the adapter's rounds, and why
            copying, copy_off = False, _captured_copy_unavailable(engine) or "capturing the copy round failed"
            rounds = start_rounds(engine, mode, adapter_gamma, adaptive_draft)
        if draft_gate is None:
            draft_gate = DRAFT_GATE_DEFAULT[(cuda, sampling is not None)]
        if draft_gate and adapter_gamma > 0:
            rest = _copy_rounds(engine, mode, 0) if copying else None   # a resting round still copies
            costs = draft_gate if isinstance(draft_gate, DraftCosts) else \
                costs_for(engine.spec.device.type, sampling is not None)
            # greedy, the rounds' own times weigh in (the output cannot change); sampled, counts alone
            rounds = GatedRounds(rounds, costs, rest, timed=sampling is None)
            rounds.prepare()  # the resting rounds' graphs: before the seed, as above
        engine.seed(seed)
        new_tokens, stats = _decode(engine, rounds, prompt, max_new_tokens, set(eos), streamer)
    if copying or isinstance(rounds, GatedRounds):
        stats.draft_sources, stats.copied = rounds.sources[:stats.rounds], rounds.copied[:stats.rounds]
    stats.copy_draft_off = copy_off
    if mode == "graphs" and adapter_gamma > 0:
        stats.draft_kernel_off = engine.persistent_draft_off(adapter_gamma)
        stats.draft_kernel = "per-op" if stats.draft_kernel_off else "persistent"
    if gamma == 0:
        stats.plain_kernel_off = engine.persistent_plain_off()
        stats.plain_kernel = "per-op" if stats.plain_kernel_off else "persistent"
    stats.verify_tail_off = engine.fused_tail_off()
    stats.verify_tail = "per-op" if stats.verify_tail_off else "fused"
    stats.attention_kernel_off = engine.triton_attention_off()
    stats.attention_kernel = "auto" if stats.attention_kernel_off else "triton"
    stats.cpu_packing_off, stats.packed_weights_mb = engine.cpu_packing()
    stats.threshold = threshold
    stats.sampling = dict(asdict(sampling), seed=seed) if sampling else None
    sequences = torch.cat([prompt[0].cpu(), torch.tensor(new_tokens, dtype=torch.int64)])[None]
    return GenerationOutput(sequences=sequences.to(prompt.device), stats=stats)


# ---- the decode loop -----------------------------------------------------------------------------

def _decode(engine, rounds, prompt, max_new: int, eos: set, streamer):
    """Prefill, then rounds until max_new tokens or an EOS: each round commits the accepted drafts and
    one token of the target's own; the host reads one report per round."""
    runner = RoundRunner(engine, rounds)
    runner.prefill(prompt)
    if streamer is not None:
        streamer.put(prompt[0].cpu())
    stats = DecodeStats(**rounds.describe())
    new_tokens: List[int] = []
    for result in runner.results(remaining=lambda: max_new - len(new_tokens)):
        if result.accepted < 0 or min(result.committed, default=0) < 0:
            runner.finish()
            raise FloatingPointError(f"the model's logits hold NaN or inf at new token {len(new_tokens)}: "
                                     "sampling needs finite logits (a temperature too small can overflow)")
        stats.rounds += 1
        stats.accepted.append(result.accepted)
        stats.drafted.append(result.drafted)
        emit = result.committed[:max_new - len(new_tokens)]
        stop = next((i for i, t in enumerate(emit) if t in eos), None)
        if stop is not None:
            emit = emit[:stop + 1]
        new_tokens += emit
        if streamer is not None and emit:
            streamer.put(torch.tensor(emit))
        if stop is not None or len(new_tokens) >= max_new:
            break
    for name, value in runner.finish().items():
        setattr(stats, name, value)
    if streamer is not None:
        streamer.end()
    stats.new_tokens = len(new_tokens)
    return new_tokens, stats
