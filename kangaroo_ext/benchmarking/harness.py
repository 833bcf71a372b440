"""The end-to-end decoding benchmark (`kangaroo bench`) on Spec-Bench / MT-bench questions.

Protocol (Spec-Bench): batch 1, chat template with the generation prompt; a multi-turn question keeps
each method's own first answer in the context of its second turn; `warmup` untimed passes per method;
every turn timed between device synchronisations, prefill included. Methods run one after another (not
interleaved), each with its own warm-up: kangaroo and plain share the engine, whose buffers and CUDA
graphs depend on γ, so interleaving them would re-capture graphs inside timed turns.

    results = new_results(questions_path, questions, device, dtype, settings)
    results = run_benchmark(model, tokenizer, questions, ["kangaroo", "plain"], adapter=adapter,
                            results=results, on_turn_done=save)    # save: e.g. write_outputs, for --resume
    write_outputs(results, out_dir)                                  # results.json, summary.json, results.md, PNGs

Model and tokenizer are injected, so tests use tiny ones. Every finished turn is in `results` (and saved
by on_turn_done), so an interrupted run resumes where it stopped: finished turns are kept, not rerun.
"""
import hashlib
import json
import os
import sys
import time
from typing import Callable, List, Optional, Sequence

import torch

from .. import io
from ..decoding import DecodeStats, generate, speculative_generate
from ..engine.copy_rounds import DEFAULT_COPY_GAMMA
from ..engine.engine import engine_for
from . import plots, report

# The kinds of draft side by side: speculative_generate's default (kangaroo: copied drafts beside the
# adapter's where that was measured to win), the adapter's alone (kangaroo-adapter), both forced on
# (kangaroo-copy), copied from the context alone (pld: our engine; hf-pld: transformers' prompt lookup,
# against hf-eager). hf-prompt-lookup is hf-pld's older name. kangaroo-gate / kangaroo-nogate: the defaults
# with the draft gate forced on / off (speculative_generate's draft_gate).
METHODS = ("kangaroo", "kangaroo-adapter", "kangaroo-copy", "kangaroo-gate", "kangaroo-nogate", "pld", "plain",
           "hf-eager", "hf-pld", "hf-static", "hf-prompt-lookup")
DEFAULT_METHODS = ("kangaroo", "plain", "hf-eager", "pld", "hf-pld")
HF_METHODS = ("hf-eager", "hf-pld", "hf-static", "hf-prompt-lookup")
SPECULATIVE_METHODS = ("kangaroo", "kangaroo-adapter", "kangaroo-copy", "kangaroo-gate", "kangaroo-nogate",
                       "pld")   # need an adapter
ENGINE_METHODS = SPECULATIVE_METHODS + ("plain",)
COPY_DRAFT_OF = {"kangaroo-adapter": False, "kangaroo-copy": True, "pld": "only"}  # speculative_generate's copy_draft
DRAFT_GATE_OF = {"kangaroo-gate": True, "kangaroo-nogate": False}                  # and its draft_gate
WARMUP_MAX_NEW_TOKENS = 128   # warm-up only has to trigger compilation / capture / allocation
PROMPT_LOOKUP_TOKENS = 10
# What must match for --resume to keep earlier turns.
RESUME_KEYS = ("questions_sha256", "question_ids", "max_new_tokens", "dtype", "threshold", "max_draft", "adapter",
               "temperature")


def parse_methods(text) -> List[str]:
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {', '.join(repr(m) for m in unknown)}; valid methods: {', '.join(METHODS)}")
    if not names:
        raise ValueError(f"no methods given; valid methods: {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


# ---- methods -------------------------------------------------------------------------------------

def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _context_limit(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)


def _hf_generation_config(method: str, eos: int, max_new: int, temperature: float = 0.0):
    # An explicit config, not the model's: its defaults (repetition penalty, sampling) must not apply.
    from transformers import GenerationConfig
    extra = {"cache_implementation": "static"} if method == "hf-static" else \
        {"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS} if method in ("hf-pld", "hf-prompt-lookup") else {}
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False)
    return GenerationConfig(max_new_tokens=max_new, eos_token_id=eos, pad_token_id=eos, **sampling, **extra)


def _stop_after(n_new: int, prompt_len: int):
    from transformers import StoppingCriteria

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= prompt_len + n_new,
                              dtype=torch.bool, device=input_ids.device)
    return StopAfter()


def make_runner(method: str, model, adapter, eos: int, threshold: Optional[float], max_draft: int,
                temperature: float = 0.0, copy_draft=None, draft_gate=None) -> Callable:
    """run(prompt_ids, max_new, stop_after=None) -> (new token ids, DecodeStats or None). temperature > 0
    samples (no top-k / top-p: the Spec-Bench protocol), seeded per turn so a rerun draws the same.
    copy_draft: the `kangaroo` method's (None: speculative_generate's default; kangaroo-copy and pld set
    their own); draft_gate: the same for speculative_generate's draft_gate (kangaroo-gate / -nogate set theirs)."""
    copy_draft = COPY_DRAFT_OF.get(method, copy_draft)
    draft_gate = DRAFT_GATE_OF.get(method, draft_gate)
    device = _model_device(model)
    turn = [0]

    def sampling():
        turn[0] += 1
        return dict(do_sample=True, temperature=temperature, seed=turn[0]) if temperature > 0 else {}

    def run(ids: List[int], max_new: int, stop_after: Optional[int] = None):
        if method in SPECULATIVE_METHODS:
            out = speculative_generate(model, ids, adapter=adapter, max_new_tokens=max_new, threshold=threshold,
                                       max_draft=max_draft, eos_token_id=eos, copy_draft=copy_draft,
                                       draft_gate=draft_gate, **sampling())
            return out.sequences[0, len(ids):].tolist(), out.stats
        if method == "plain":
            out = generate(model, ids, max_new_tokens=max_new, eos_token_id=eos, **sampling())
            return out.sequences[0, len(ids):].tolist(), out.stats
        x = torch.tensor([ids], dtype=torch.long, device=device)
        kwargs = {"stopping_criteria": [_stop_after(stop_after, len(ids))]} if stop_after else {}
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), **kwargs,
                                 generation_config=_hf_generation_config(method, eos, max_new, temperature))
        return out[0, len(ids):].tolist(), None
    return run


def _context_bound(tokenizer, questions: List[dict], max_new: int, limit: int) -> int:
    """An upper bound on any turn's prompt + max_new: every user turn, template included, plus one
    full-length answer per turn, plus slack (decoded answers re-encode to about as many tokens)."""
    worst = 0
    for q in questions:
        msgs = []
        for t in q["turns"]:
            msgs += [{"role": "user", "content": t}, {"role": "assistant", "content": ""}]
        worst = max(worst, len(io.chat_ids(tokenizer, msgs[:-1])) + len(q["turns"]) * max_new)
    return min(int(worst * 1.05) + 64, limit)


def _prepare(method: str, model, run: Callable, tokenizer, questions, max_new: int, max_draft: int):
    """Size caches once for the longest turn, so no timed turn reallocates them: the engine re-captures
    its CUDA graphs on growth, and HF's static cache recompiles (it keeps the largest size seen)."""
    bound = _context_bound(tokenizer, questions, max_new, _context_limit(model))
    if method in ENGINE_METHODS:
        gamma = 1 if method == "plain" else max_draft if method == "kangaroo" else max(max_draft, DEFAULT_COPY_GAMMA)
        engine_for(model).reserve(bound + gamma + 1, gamma)
    elif method == "hf-static":
        ids = io.chat_ids(tokenizer, questions[0]["turns"][0])
        run(ids, max(1, bound - len(ids)), stop_after=16)  # a static cache of `bound`; stops early


def _timed(fn: Callable, cuda: bool):
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def _histogram(values: List[int], size: int) -> List[int]:
    counts = [0] * size
    for v in values:
        counts[min(v, size - 1)] += 1
    return counts


# ---- the harness ---------------------------------------------------------------------------------

def run_benchmark(model, tokenizer, questions: List[dict], methods: Sequence[str] = DEFAULT_METHODS, *,
                  adapter=None, max_new_tokens: int = 1024, threshold: Optional[float] = None, max_draft: int = 6,
                  hf_max_questions: Optional[int] = None, warmup: int = 3, progress: bool = True,
                  results: Optional[dict] = None, on_turn_done: Optional[Callable[[dict], None]] = None,
                  method_key: Optional[Callable[[str], str]] = None, temperature: float = 0.0,
                  copy_draft=None, draft_gate=None) -> dict:
    """Runs every method over the questions' turns; returns the raw results (see report.summarize()).

    threshold: η for kangaroo (None: the adapter's recommendation).
    results: earlier results to extend: their finished turns are kept, only the missing ones run.
    on_turn_done(results): called after each turn and each method, e.g. to save partial results.
    method_key(method): the key a method's results are stored under (default: the method's name), so one
    results dict can hold several kangaroo configurations (the training sweep).
    temperature: 0 decodes greedily; > 0 samples at that temperature (every method).
    copy_draft, draft_gate: the `kangaroo` method's (see make_runner)."""
    methods = parse_methods(methods)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if not questions:
        raise ValueError("no questions to run")
    needing = [m for m in methods if m in SPECULATIVE_METHODS]
    if needing and adapter is None:
        raise ValueError(f"method '{needing[0]}' needs an adapter (pld runs on the engine's early-exit layout)")
    eos = getattr(tokenizer, "eos_token_id", None)
    if not isinstance(eos, int):
        raise ValueError(f"the tokenizer has no single eos_token_id (got {eos!r})")
    hf_questions = io.select_questions(questions, max_questions=hf_max_questions) if hf_max_questions else questions
    results = results or {"methods": {}}
    results.setdefault("methods", {})
    key = method_key or (lambda m: m)
    for method in methods:
        qs = hf_questions if method in HF_METHODS else questions
        done = results["methods"].setdefault(key(method), {"setup_s": None, "turns": []})
        if len(done["turns"]) == sum(len(q["turns"]) for q in qs):
            continue
        try:
            _run_method(method, model, tokenizer, qs, adapter, eos, max_new_tokens, threshold, max_draft, warmup,
                        progress, done, lambda: on_turn_done and on_turn_done(results), temperature, copy_draft,
                        draft_gate)
            results.get("errors", {}).pop(key(method), None)
        except Exception as e:  # noqa: BLE001  one failing baseline (say, a compile error) must not
            # cost the other methods' numbers in an unattended run: record it, report it, go on
            results.setdefault("errors", {})[key(method)] = f"{type(e).__name__}: {e}"
            if not done["turns"]:
                del results["methods"][key(method)]
            print(f"kangaroo bench: method {method} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if on_turn_done:
            on_turn_done(results)
    return results


def _run_method(method, model, tokenizer, qs, adapter, eos, max_new_tokens, threshold, max_draft, warmup,
                progress, done: dict, saved: Callable, temperature: float = 0.0, copy_draft=None, draft_gate=None):
    """Appends each finished turn to done["turns"] (then calls saved()); skips turns already there."""
    cuda = _model_device(model).type == "cuda"
    run = make_runner(method, model, adapter, eos, threshold, max_draft, temperature, copy_draft, draft_gate)
    finished = {(str(t["question_id"]), t["turn"]): t for t in done["turns"]}
    n_turns = sum(len(q["turns"]) for q in qs)
    bar = io.progress_bar(progress, total=warmup + n_turns, initial=len(finished), desc=method, unit="turn")
    t_setup = time.perf_counter()
    _prepare(method, model, run, tokenizer, qs, max_new_tokens, max_draft)
    for i in range(warmup):  # untimed: compilation, graph capture, allocator and clock warm-up
        run(io.chat_ids(tokenizer, qs[i % len(qs)]["turns"][0]), min(max_new_tokens, WARMUP_MAX_NEW_TOKENS))
        bar.update(1)
    done["setup_s"] = time.perf_counter() - t_setup
    for q in qs:
        messages = []
        for t_idx, text in enumerate(q["turns"]):
            messages.append({"role": "user", "content": text})
            earlier = finished.get((str(q["question_id"]), t_idx))
            if earlier is not None:  # resumed: this method's own answer carries into the next turn
                messages.append({"role": "assistant", "content": earlier["output"]})
                continue
            ids = io.chat_ids(tokenizer, messages)
            room = _context_limit(model) - len(ids)
            if room <= 0:
                raise ValueError(f"question {q['question_id']} turn {t_idx + 1}: the prompt ({len(ids)} "
                                 f"tokens) fills the model's context")
            (new_ids, stats), seconds = _timed(lambda: run(ids, min(max_new_tokens, room)), cuda)
            answer = tokenizer.decode(new_ids, skip_special_tokens=True)
            messages.append({"role": "assistant", "content": answer})  # this method's own answer
            done["turns"].append(_turn_record(q, t_idx, ids, new_ids, answer, seconds, stats, max_draft))
            saved()
            bar.update(1)
    bar.close()


def _turn_record(q, t_idx, ids, new_ids, answer, seconds, stats: Optional[DecodeStats], max_draft) -> dict:
    rec = {"question_id": q["question_id"], "category": q["category"], "turn": t_idx,
           "prompt_tokens": len(ids), "new_tokens": len(new_ids), "seconds": seconds,
           "tok_per_s": len(new_ids) / seconds if seconds > 0 else 0.0,
           "output_sha1": hashlib.sha1(json.dumps(new_ids).encode()).hexdigest(), "output": answer}
    if stats is not None:
        size = max(max_draft, DEFAULT_COPY_GAMMA if stats.copy_draft else 0) + 1
        if stats.copy_draft:
            rec["draft_sources"] = stats.by_source()
        if stats.draft_gate:
            rec["rested"] = stats.rested
        rec.update(rounds=stats.rounds, accepted_hist=_histogram(stats.accepted, size),
                   drafted_hist=_histogram(stats.drafted, size), host_syncs=stats.host_syncs,
                   prefill_s=stats.prefill_s, draft_s=stats.draft_s, verify_s=stats.verify_s,
                   capture_s=stats.capture_s, mode=stats.mode)  # capture_s > 0: a capture in a timed turn
    return rec


# ---- results files -------------------------------------------------------------------------------

def write_outputs(results: dict, out_dir: str, with_plots: bool = True) -> List[str]:
    """results.json (raw + summary), summary.json (latest.json form), results.md, and PNG plots."""
    summary = report.summarize(results)
    results["summary"] = summary
    latest = report.latest_summary(results, summary)
    paths = [os.path.join(out_dir, n) for n in ("results.json", "summary.json", "results.md")]
    io.write_json(paths[0], results)
    io.write_json(paths[1], latest)
    md = report.markdown_report(results, summary, latest)
    io.atomic_write(paths[2], lambda f: f.write(md))
    if with_plots:
        paths += plots.write_plots(summary, out_dir)
    return paths


def new_results(questions_path: str, questions: List[dict], device, dtype, max_new_tokens: int,
                threshold: Optional[float], max_draft: int, adapter_desc: str, methods: Sequence[str],
                hf_max_questions, temperature: float = 0.0) -> dict:
    meta = io.provenance(device)
    with open(questions_path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    return {"meta": meta,
            "config": {"questions": questions_path, "questions_sha256": sha,
                       "question_ids": [q["question_id"] for q in questions], "max_new_tokens": max_new_tokens,
                       "dtype": str(dtype).replace("torch.", ""), "threshold": threshold, "max_draft": max_draft,
                       "adapter": adapter_desc, "methods": list(methods), "hf_max_questions": hf_max_questions,
                       "temperature": temperature,
                       "protocol": ("greedy" if not temperature else f"sampled at temperature {temperature}")
                       + ", batch 1, chat template, answers carried to the next turn, each turn timed between "
                         "device syncs incl. prefill"},
            "methods": {}}


def resumed(path: str, fresh: dict) -> dict:
    """Earlier results at `path` (results.json), if any, measured with the same settings, device and commit:
    their finished turns are kept and not rerun. Raises ValueError where they do not match."""
    if not os.path.isfile(path):
        return fresh
    with open(path, encoding="utf-8") as f:
        old = json.load(f)
    for k in RESUME_KEYS:
        if old.get("config", {}).get(k) != fresh["config"][k]:
            raise ValueError(f"--resume: {path} was run with a different {k}; use another --out")
    for k, what in (("device", "on"), ("commit", "at commit")):
        if old.get("meta", {}).get(k) != fresh["meta"][k]:
            raise ValueError(f"--resume: {path} was measured {what} {old.get('meta', {}).get(k)}, not "
                             f"{fresh['meta'][k]}; use another --out")
    fresh["methods"] = {m: r for m, r in old.get("methods", {}).items() if r.get("turns")}
    fresh["config"]["methods"] = list(dict.fromkeys(list(fresh["methods"]) + fresh["config"]["methods"]))
    return fresh
