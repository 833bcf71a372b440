"""`kangaroo bench`: end-to-end decoding benchmark on Spec-Bench / MT-bench questions.

Protocol (Spec-Bench): greedy, batch 1, chat template with the generation prompt; a multi-turn
question keeps each method's own first answer in the context of its second turn; `warmup` untimed
passes per method; every turn timed between device synchronisations, prefill included. Methods run one
after another (not interleaved), each with its own warm-up: kangaroo and plain share the engine, whose
buffers and CUDA graphs depend on γ, so interleaving them would re-capture graphs inside timed turns.

`run_benchmark(model, tokenizer, questions, ...)` is the harness (model and tokenizer injected, so tests
use tiny ones); `summarize` turns its results into numbers; `write_outputs` writes results.json,
summary.json (the bench/results/latest.json format), results.md and plots, each file atomically
(the numbers, tables and plots themselves are in bench_plots.py).
"""
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .bench_plots import atomic_write, latest_summary, markdown_report, summarize, write_json, write_plots
from .generation import DecodeStats, generate, speculative_generate

METHODS = ("kangaroo", "plain", "hf-eager", "hf-static", "hf-prompt-lookup")
DEFAULT_METHODS = ("kangaroo", "plain", "hf-eager")
HF_METHODS = ("hf-eager", "hf-static", "hf-prompt-lookup")
ENGINE_METHODS = ("kangaroo", "plain")
REQUIRED_FIELDS = ("question_id", "category", "turns")
WARMUP_MAX_NEW_TOKENS = 128   # warm-up only has to trigger compilation / capture / allocation
PROMPT_LOOKUP_TOKENS = 10
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


# ---- input ---------------------------------------------------------------------------------------

def load_questions(path: str) -> List[dict]:
    """Questions of a Spec-Bench / MT-bench .jsonl file, validated; errors name the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"questions file not found: {path}")
    questions, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(q, dict):
                raise ValueError(f"{path}: line {lineno}: expected a JSON object, got {type(q).__name__}")
            missing = [k for k in REQUIRED_FIELDS if k not in q]
            if missing:
                raise ValueError(f"{path}: line {lineno}: missing field(s) {', '.join(missing)} "
                                 f"(each question needs {', '.join(REQUIRED_FIELDS)})")
            turns = q["turns"]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
                raise ValueError(f"{path}: line {lineno}: 'turns' must be a non-empty list of non-empty strings")
            if not isinstance(q["category"], str) or not q["category"]:
                raise ValueError(f"{path}: line {lineno}: 'category' must be a non-empty string")
            if q["question_id"] in seen:
                raise ValueError(f"{path}: line {lineno}: duplicate question_id {q['question_id']!r}")
            seen.add(q["question_id"])
            questions.append({"question_id": q["question_id"], "category": q["category"], "turns": turns})
    if not questions:
        raise ValueError(f"{path}: no questions (the file is empty)")
    return questions


def select_questions(questions: List[dict], categories: Optional[Sequence[str]] = None,
                     max_questions: Optional[int] = None) -> List[dict]:
    """Filter by category, then keep `max_questions` taken round-robin over categories.

    Round-robin because MT-bench is sorted by category: the first N questions would all be "writing".
    A smaller N picks a prefix of the same order, so the hf-* subset lies inside the main set."""
    present = list(dict.fromkeys(q["category"] for q in questions))
    if categories:
        unknown = [c for c in categories if c not in present]
        if unknown:
            raise ValueError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                             f"categories present: {', '.join(present)}")
        questions = [q for q in questions if q["category"] in categories]
    if max_questions is not None:
        if not isinstance(max_questions, int) or max_questions < 1:
            raise ValueError(f"max questions must be a positive int, got {max_questions!r}")
        queues = [[q for q in questions if q["category"] == c] for c in present]
        round_robin = []
        for i in range(max(map(len, queues), default=0)):
            round_robin += [queue[i] for queue in queues if i < len(queue)]
        keep = {id(q) for q in round_robin[:max_questions]}
        questions = [q for q in questions if id(q) in keep]  # file order
    return questions


def parse_methods(text) -> List[str]:
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {', '.join(repr(m) for m in unknown)}; valid methods: {', '.join(METHODS)}")
    if not names:
        raise ValueError(f"no methods given; valid methods: {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


def chat_prompt_ids(tokenizer, messages: List[dict]) -> List[int]:
    """Token ids of the conversation so far, chat template with the generation prompt. Rendered to text
    first: apply_chat_template(tokenize=True) returns a list in transformers 4 and a dict in 5."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---- methods -------------------------------------------------------------------------------------

def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _context_limit(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)


def _hf_generation_config(method: str, eos: int, max_new: int):
    # An explicit config, not the model's: its defaults (repetition penalty, sampling) must not apply.
    from transformers import GenerationConfig
    extra = {"cache_implementation": "static"} if method == "hf-static" else \
        {"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS} if method == "hf-prompt-lookup" else {}
    return GenerationConfig(do_sample=False, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=eos, **extra)


def _stop_after(n_new: int, prompt_len: int):
    from transformers import StoppingCriteria

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= prompt_len + n_new,
                              dtype=torch.bool, device=input_ids.device)
    return StopAfter()


def make_runner(method: str, model, adapter, eos: int, threshold: float, max_draft: int) -> Callable:
    """run(prompt_ids, max_new, stop_after=None) -> (new token ids, DecodeStats or None)."""
    device = _model_device(model)

    def run(ids: List[int], max_new: int, stop_after: Optional[int] = None):
        if method == "kangaroo":
            out = speculative_generate(model, ids, adapter=adapter, max_new_tokens=max_new, threshold=threshold,
                                       max_draft=max_draft, eos_token_id=eos)
            return out.sequences[0, len(ids):].tolist(), out.stats
        if method == "plain":
            out = generate(model, ids, max_new_tokens=max_new, eos_token_id=eos)
            return out.sequences[0, len(ids):].tolist(), out.stats
        x = torch.tensor([ids], dtype=torch.long, device=device)
        kwargs = {"stopping_criteria": [_stop_after(stop_after, len(ids))]} if stop_after else {}
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x),
                                 generation_config=_hf_generation_config(method, eos, max_new), **kwargs)
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
        worst = max(worst, len(chat_prompt_ids(tokenizer, msgs[:-1])) + len(q["turns"]) * max_new)
    return min(int(worst * 1.05) + 64, limit)


def _prepare(method: str, model, run: Callable, tokenizer, questions, max_new: int, max_draft: int):
    """Size caches once for the longest turn, so no timed turn reallocates them: the engine re-captures
    its CUDA graphs on growth, and HF's static cache recompiles (it keeps the largest size seen)."""
    bound = _context_bound(tokenizer, questions, max_new, _context_limit(model))
    if method in ENGINE_METHODS:
        try:
            from .generation import _engine_for  # the engine cached on the model, as generate() finds it
        except ImportError:  # a private helper: if it moves, graphs are captured in the warm-up as before
            return
        gamma = max_draft if method == "kangaroo" else 1
        _engine_for(model).reserve(bound + gamma + 1, gamma)
    elif method == "hf-static":
        ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": questions[0]["turns"][0]}])
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
                  adapter=None, max_new_tokens: int = 1024, threshold: float = 0.6, max_draft: int = 6,
                  hf_max_questions: Optional[int] = None, warmup: int = 3, progress: bool = True,
                  results: Optional[dict] = None, on_method_done: Optional[Callable[[dict], None]] = None) -> dict:
    """Runs every method over the questions' turns; returns the raw results (see summarize()).

    results: earlier results to extend (methods already in it are not rerun).
    on_method_done(results): called after each method, e.g. to save partial results."""
    methods = parse_methods(methods)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if not questions:
        raise ValueError("no questions to run")
    if "kangaroo" in methods and adapter is None:
        raise ValueError("method 'kangaroo' needs an adapter")
    eos = getattr(tokenizer, "eos_token_id", None)
    if not isinstance(eos, int):
        raise ValueError(f"the tokenizer has no single eos_token_id (got {eos!r})")
    hf_questions = select_questions(questions, max_questions=hf_max_questions) if hf_max_questions else questions
    results = results or {"methods": {}}
    results.setdefault("methods", {})
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; a bar is a nicety, never a reason to fail
        tqdm = None

    for method in methods:
        if method in results["methods"]:
            continue
        qs = hf_questions if method in HF_METHODS else questions
        try:
            results["methods"][method] = _run_method(method, model, tokenizer, qs, adapter, eos, max_new_tokens,
                                                     threshold, max_draft, warmup, progress and tqdm)
            results.get("errors", {}).pop(method, None)
        except Exception as e:  # noqa: BLE001  one failing baseline (say, a compile error) must not
            # cost the other methods' numbers in an unattended run: record it, report it, go on
            results.setdefault("errors", {})[method] = f"{type(e).__name__}: {e}"
            print(f"kangaroo bench: method {method} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if on_method_done:
            on_method_done(results)
    return results


def _run_method(method, model, tokenizer, qs, adapter, eos, max_new_tokens, threshold, max_draft, warmup,
                tqdm) -> dict:
    cuda = _model_device(model).type == "cuda"
    run = make_runner(method, model, adapter, eos, threshold, max_draft)
    n_turns = sum(len(q["turns"]) for q in qs)
    bar = tqdm(total=warmup + n_turns, desc=method, unit="turn") if tqdm else None
    t_setup = time.perf_counter()
    _prepare(method, model, run, tokenizer, qs, max_new_tokens, max_draft)
    for i in range(warmup):  # untimed: compilation, graph capture, allocator and clock warm-up
        q = qs[i % len(qs)]
        run(chat_prompt_ids(tokenizer, [{"role": "user", "content": q["turns"][0]}]),
            min(max_new_tokens, WARMUP_MAX_NEW_TOKENS))
        if bar:
            bar.update(1)
    setup_s = time.perf_counter() - t_setup
    turns = []
    for q in qs:
        messages = []
        for t_idx, text in enumerate(q["turns"]):
            messages.append({"role": "user", "content": text})
            ids = chat_prompt_ids(tokenizer, messages)
            room = _context_limit(model) - len(ids)
            if room <= 0:
                raise ValueError(f"question {q['question_id']} turn {t_idx + 1}: the prompt ({len(ids)} "
                                 f"tokens) fills the model's context")
            (new_ids, stats), seconds = _timed(lambda: run(ids, min(max_new_tokens, room)), cuda)
            answer = tokenizer.decode(new_ids, skip_special_tokens=True)
            messages.append({"role": "assistant", "content": answer})  # this method's own answer
            turns.append(_turn_record(q, t_idx, ids, new_ids, answer, seconds, stats, max_draft))
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    return {"setup_s": setup_s, "turns": turns}


def _turn_record(q, t_idx, ids, new_ids, answer, seconds, stats: Optional[DecodeStats], max_draft) -> dict:
    rec = {"question_id": q["question_id"], "category": q["category"], "turn": t_idx,
           "prompt_tokens": len(ids), "new_tokens": len(new_ids), "seconds": seconds,
           "tok_per_s": len(new_ids) / seconds if seconds > 0 else 0.0,
           "output_sha1": hashlib.sha1(json.dumps(new_ids).encode()).hexdigest(), "output": answer}
    if stats is not None:
        size = max_draft + 1
        rec.update(rounds=stats.rounds, accepted_hist=_histogram(stats.accepted, size),
                   drafted_hist=_histogram(stats.drafted, size), host_syncs=stats.host_syncs,
                   prefill_s=stats.prefill_s, draft_s=stats.draft_s, verify_s=stats.verify_s,
                   capture_s=stats.capture_s)  # > 0 would mean a graph capture inside a timed turn
    return rec


# ---- provenance and files ------------------------------------------------------------------------

# What decides the code a measurement ran (bench/ is left out: it also holds the results themselves).
CODE_PATHS = ("csrc", "kangaroo_ext", "triton_kernels", "setup.py")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout this package runs from


def _git(root, *args, env=None) -> str:
    return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=60, check=True,
                          env=env).stdout.strip()


def git_commit():
    """(sha, dirty): $KANGAROO_COMMIT when set (a copied tree whose .git, if any, may be stale, as on
    the device machines); else the checkout this package runs from; else "unknown"."""
    if os.environ.get("KANGAROO_COMMIT"):
        return os.environ["KANGAROO_COMMIT"], None
    try:
        return _git(_ROOT, "rev-parse", "HEAD"), bool(_git(_ROOT, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("KANGAROO_COMMIT") or "unknown", None


def code_trees(root: Optional[str] = None) -> Optional[Dict[str, str]]:
    """{path: git object hash} of CODE_PATHS as they are on disk (tracked and untracked files that git does
    not ignore), through a scratch index, so the checkout's own index is untouched. Equal bytes give equal
    hashes in any copy of the checkout, whatever state its .git is in, so which_commit() can name the
    commit a result was measured on even when the copy's HEAD is stale. None without a usable git."""
    root = root or _ROOT
    if not os.path.exists(os.path.join(root, ".git")):  # an installed package, not a checkout (or a copy)
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "GIT_INDEX_FILE": os.path.join(tmp, "index")}
            dirs = [d for d in CODE_PATHS if os.path.exists(os.path.join(root, d))]
            if not dirs:
                return None
            _git(root, "add", "-A", "--", *dirs, env=env)
            tree = _git(root, "write-tree", env=env)
            return {d: _git(root, "rev-parse", f"{tree}:{d}") for d in dirs}
    except (OSError, subprocess.SubprocessError):
        return None


def which_commit(trees: Dict[str, str], root: Optional[str] = None, depth: int = 500) -> List[str]:
    """Commits among the last `depth` of HEAD whose CODE_PATHS objects equal `trees` (newest first)."""
    root = root or _ROOT
    found = []
    for sha in _git(root, "log", f"-{depth}", "--format=%h").split():
        listing = _git(root, "ls-tree", sha, "--", *trees)
        have = {line.split("\t", 1)[1]: line.split()[2] for line in listing.splitlines()}
        if have == trees:
            found.append(sha)
    return found


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def write_outputs(results: dict, out_dir: str, plots: bool = True) -> List[str]:
    """results.json (raw + summary), summary.json (latest.json form), results.md, and PNG plots."""
    summary = summarize(results)
    results["summary"] = summary
    latest = latest_summary(results, summary)
    paths = [os.path.join(out_dir, n) for n in ("results.json", "summary.json", "results.md")]
    write_json(paths[0], results)
    write_json(paths[1], latest)
    md = markdown_report(results, summary, latest)
    atomic_write(paths[2], lambda f: f.write(md))
    if plots:
        paths += write_plots(summary, out_dir)
    return paths


def new_results(questions_path: str, questions: List[dict], device, dtype, max_new_tokens: int, threshold: float,
                max_draft: int, adapter_desc: str, methods: Sequence[str], hf_max_questions) -> dict:
    commit, dirty = git_commit()
    with open(questions_path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    return {"meta": {"device": device_name(device), "date": datetime.datetime.now(datetime.timezone.utc)
                     .isoformat(timespec="seconds"), "commit": commit, "dirty": dirty, "code_trees": code_trees(),
                     "torch": torch.__version__, "python": platform.python_version()},
            "config": {"questions": questions_path, "questions_sha256": sha,
                       "question_ids": [q["question_id"] for q in questions], "max_new_tokens": max_new_tokens,
                       "dtype": str(dtype).replace("torch.", ""), "threshold": threshold, "max_draft": max_draft,
                       "adapter": adapter_desc, "methods": list(methods), "hf_max_questions": hf_max_questions,
                       "protocol": "greedy, batch 1, chat template, answers carried to the next turn, "
                                   "each turn timed between device syncs incl. prefill"},
            "methods": {}}


# ---- command line --------------------------------------------------------------------------------

def add_parser(subparsers):
    p = subparsers.add_parser("bench", help="end-to-end decoding benchmark (Spec-Bench / MT-bench questions)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", required=True, metavar="FILE.jsonl",
                   help="Spec-Bench / MT-bench questions: question_id, category, turns")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list of: {', '.join(METHODS)}")
    p.add_argument("--max-questions", type=int, help="at most N questions, round-robin over categories")
    p.add_argument("--hf-max-questions", type=int, help="at most N questions for the slow hf-* methods")
    p.add_argument("--categories", help="comma list: only these categories")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--threshold", type=float, default=0.6, help="η: stop drafting below this confidence")
    p.add_argument("--max-draft", type=int, default=6, help="γ: most drafts per round")
    p.add_argument("--adapter", metavar="DIR", help="adapter folder (default: kx.load_default_adapter)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", help=f"one of {', '.join(DTYPES)} (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--out", metavar="DIR", help="default: bench/results/run-<date>")
    p.add_argument("--warmup", type=int, default=3, help="untimed passes per method")
    p.add_argument("--resume", action="store_true",
                   help="keep the methods already measured in DIR/results.json (same settings and commit)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_from_args)
    return p


def _check_args(args):
    """Every user error, before the model loads (loading takes half a minute)."""
    questions = load_questions(args.questions)
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    questions = select_questions(questions, categories, args.max_questions)
    methods = parse_methods(args.methods)
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    if args.hf_max_questions is not None and args.hf_max_questions < 1:
        raise ValueError(f"--hf-max-questions must be >= 1, got {args.hf_max_questions}")
    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
    if not 1 <= args.max_draft <= 32:
        raise ValueError(f"--max-draft must be in [1, 32], got {args.max_draft}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {args.dtype!r}; one of {', '.join(DTYPES)}")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available")
    if args.adapter is not None and not os.path.isdir(args.adapter):
        raise FileNotFoundError(f"adapter folder not found: {args.adapter}")
    return questions, methods


def _resumed(out_dir: str, fresh: dict) -> dict:
    """Earlier results in out_dir, if any, measured with the same settings, device and commit: their
    methods are kept (so a long run can be split, one method per command) and not rerun."""
    path = os.path.join(out_dir, "results.json")
    if not os.path.isfile(path):
        return fresh
    with open(path, encoding="utf-8") as f:
        old = json.load(f)
    for k in ("questions_sha256", "question_ids", "max_new_tokens", "dtype", "threshold", "max_draft", "adapter"):
        if old.get("config", {}).get(k) != fresh["config"][k]:
            raise ValueError(f"--resume: {path} was run with a different {k}; use another --out")
    for k, what in (("device", "on"), ("commit", "at commit")):
        if old.get("meta", {}).get(k) != fresh["meta"][k]:
            raise ValueError(f"--resume: {path} was measured {what} {old.get('meta', {}).get(k)}, not "
                             f"{fresh['meta'][k]}; use another --out")
    fresh["methods"] = dict(old.get("methods", {}))
    fresh["config"]["methods"] = list(dict.fromkeys(list(fresh["methods"]) + fresh["config"]["methods"]))
    return fresh


def run_from_args(args) -> int:
    import kangaroo_ext as kx
    questions, methods = _check_args(args)
    model, tokenizer = kx.load_default_model(device=args.device, dtype=DTYPES.get(args.dtype))
    # Loaded even when kangaroo is not run (it is small): the settings --resume compares name it.
    param = model.get_input_embeddings().weight
    adapter = kx.Adapter.from_pretrained(args.adapter, device=param.device, dtype=param.dtype) \
        if args.adapter else kx.load_default_adapter(model)
    adapter_desc = args.adapter or "default"
    if not adapter.config.get("trained", True):
        adapter_desc += " (untrained)"  # its config says trained: false; expect little speedup
    out_dir = args.out or os.path.join("bench", "results", "run-" + time.strftime("%Y%m%d-%H%M%S"))
    results = new_results(args.questions, questions, _model_device(model), model.dtype, args.max_new_tokens,
                          args.threshold, args.max_draft, adapter_desc, methods, args.hf_max_questions)
    if args.resume:
        results = _resumed(out_dir, results)
    print(f"kangaroo bench: {len(questions)} questions, methods {', '.join(methods)} on "
          f"{results['meta']['device']}; writing to {out_dir}")
    results = run_benchmark(model, tokenizer, questions, methods, adapter=adapter, max_new_tokens=args.max_new_tokens,
                            threshold=args.threshold, max_draft=args.max_draft, hf_max_questions=args.hf_max_questions,
                            warmup=args.warmup, progress=not args.no_progress, results=results,
                            on_method_done=lambda r: write_outputs(r, out_dir, plots=False))
    for path in write_outputs(results, out_dir):
        print(f"wrote {path}")
    with open(os.path.join(out_dir, "results.md"), encoding="utf-8") as f:
        print(f.read())
    for method, error in results.get("errors", {}).items():
        print(f"kangaroo bench: {method} failed and is missing from the results: {error}", file=sys.stderr)
    return 1 if results.get("errors") else 0
