"""The `kangaroo` command (also `python -m kangaroo_ext`): generate, bench, train, info, which-commit.

Every subcommand's arguments are parsed and checked here, before anything slow happens: a bad value
fails in about a second with one line naming the argument, never after the model has loaded.
"""
import argparse
import dataclasses
import os
import sys
import time

from . import config, io
from .decoding import DEFAULT_MAX_DRAFT, DEFAULT_THRESHOLD, MAX_DRAFT_LIMIT
from .default_model import DTYPE_NAMES

DEMO_PROMPT = "What are three simple ways to save energy at home?"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, but not "(default: None)" on arguments whose absence means something described."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.required:
            return action.help
        return super()._get_help_string(action)


# ---- checks shared by the subcommands ---------------------------------------------------------------

def _check_device_dtype(device, dtype):
    """The loader's own checks (default_model.check_load_arguments), reworded with the flags' names."""
    from .default_model import check_load_arguments
    try:
        check_load_arguments(device, dtype)
    except ValueError as e:
        raise ValueError(str(e).replace(f"device={device!r}", f"--device {device}")
                         .replace(f"dtype={dtype!r}", f"--dtype {dtype}")) from None


def _check_threshold_draft(threshold, max_draft):
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold (η) must be in [0, 1], got {threshold}")
    if max_draft is not None and not 1 <= max_draft <= MAX_DRAFT_LIMIT:
        raise ValueError(f"--max-draft (γ) must be in [1, {MAX_DRAFT_LIMIT}], got {max_draft}")


def _check_positive(name, value):
    if value is not None and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "seed")


def _check_sampling_flags(args):
    """A sampling flag without --sample is an error, not a silent no-op (decoding.check_sampling holds the
    API to the same rule)."""
    given = [f"--{name.replace('_', '-')}" for name in SAMPLING_FLAGS if getattr(args, name) is not None]
    if given and not args.sample:
        raise ValueError(f"{', '.join(given)} only {'applies' if len(given) == 1 else 'apply'} to sampling: add "
                         "--sample (without it, decoding is greedy)")


def _adapter_config(path):
    from .adapter import Adapter
    return Adapter.read_config(path) if path else None


def load_model(name: str, device, dtype):
    """'default' (SmolLM2-135M-Instruct from its GGUF) or a local transformers model folder."""
    from .default_model import check_load_arguments, load_default_model
    if name == "default":
        return load_default_model(device=device, dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    device, dtype = check_load_arguments(device, dtype)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(name)


def _load_adapter(path, model):
    import kangaroo_ext as kx
    param = model.get_input_embeddings().weight
    return kx.Adapter.from_pretrained(path, device=param.device, dtype=param.dtype) if path \
        else kx.load_default_adapter(model)


def _say(*parts):
    print(*parts, file=sys.stderr, flush=True)


# ---- kangaroo generate ------------------------------------------------------------------------------

def _generate(args):
    prompts = io.read_prompts(args.file, what="--file")[0] if args.file else [args.prompt or DEMO_PROMPT]
    if not all(p.strip() for p in prompts):
        raise ValueError("the prompt is empty: give a question, e.g. kangaroo generate \"Why is the sky blue?\"")
    _check_threshold_draft(args.threshold, args.max_draft)
    _check_positive("--max-new-tokens", args.max_new_tokens)
    _check_device_dtype(args.device, args.dtype)
    _adapter_config(args.adapter)
    _check_sampling_flags(args)
    from .decoding import check_sampling
    sampling = dict(do_sample=args.sample, temperature=1.0 if args.temperature is None else args.temperature,
                    top_k=args.top_k or 0, top_p=1.0 if args.top_p is None else args.top_p)
    check_sampling(**sampling, generator=None, seed=args.seed, device="cpu")
    if args.sample:
        import random
        sampling["seed"] = args.seed if args.seed is not None else random.randrange(2 ** 31)

    import torch
    from transformers import TextStreamer

    import kangaroo_ext as kx
    from .decoding import resolve_settings
    t0 = time.perf_counter()
    model, tokenizer = load_model("default", args.device, args.dtype)
    adapter = _load_adapter(args.adapter, model)
    threshold, max_draft = resolve_settings(args.threshold, args.max_draft, adapter, model.device)
    threads = torch.get_num_threads()
    _say(f"SmolLM2-135M-Instruct on {model.device} ({str(model.dtype).replace('torch.', '')}, {threads} CPU "
         f"thread{'s' if threads > 1 else ''}), loaded in {time.perf_counter() - t0:.1f} s; "
         f"draft: first {adapter.exit_layer} layer(s) + adapter, η = {threshold}, γ = {max_draft}")
    for prompt in prompts:
        ids = torch.tensor([io.chat_ids(tokenizer, prompt)])
        if len(prompts) > 1:
            print(f"\n### {prompt}\n", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        out = kx.speculative_generate(model, ids, adapter=adapter, max_new_tokens=args.max_new_tokens,
                                      threshold=threshold, max_draft=max_draft,
                                      eos_token_id=tokenizer.eos_token_id, streamer=streamer,
                                      copy_draft=args.copy_draft, draft_gate=args.draft_gate, **sampling)
        s = out.stats
        line = (f"Kangaroo: {s.new_tokens} tokens, {s.tokens_per_second:.1f} tok/s "
                f"({s.mean_accepted:.2f} tokens per step{_rested(s)})")
        if not args.compare:
            _say(line)
            continue
        ref = kx.generate(model, ids, max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                          **sampling)
        same = torch.equal(ref.sequences.cpu(), out.sequences.cpu())
        verdict = ("yes" if same else "NO (bf16 near-tie)") if not args.sample else \
            "(sampled: each draws from the same distribution, not the same tokens)"
        ratio = s.tokens_per_second / max(ref.stats.tokens_per_second, 1e-9)
        _say(f"{line} · plain: {ref.stats.tokens_per_second:.1f} tok/s · same output: {verdict} · "
             f"{ratio:.2f}× plain")
        if ratio < 1.0:
            _say(_why_slower(s, ref.stats, model.device))
    return 0


def _rested(stats) -> str:
    return f"; {stats.rested} of {stats.rounds} rounds rested" if stats.draft_gate else ""


def _why_slower(spec_stats, plain_stats, device) -> str:
    """One honest line on where a slowdown comes from, from the run's own measurements."""
    step = plain_stats.total_s / max(plain_stats.new_tokens, 1)
    drafts = sum(spec_stats.drafted)
    per_draft = spec_stats.draft_s / drafts if drafts else 0.0
    where = "a GPU" if device.type == "cuda" else "this CPU"
    return (f"note: slower than plain here. Each round commits {spec_stats.mean_accepted:.2f} tokens on average, "
            f"and each draft costs {100 * per_draft / step:.0f}% of a plain step on {where}; drafting pays off "
            "when drafts are accepted more often than they cost (long, predictable answers gain most; "
            "short answers pay the prefill twice).")


# ---- kangaroo bench -----------------------------------------------------------------------------------

def _bench(args):
    from .benchmarking import harness
    if args.questions == "long-context":
        args.questions = io.LONG_CONTEXT_FILE
    questions = io.select_questions(io.load_questions(args.questions), args.categories, args.max_questions)
    methods = harness.parse_methods(args.methods)
    _check_positive("--max-new-tokens", args.max_new_tokens)
    _check_positive("--hf-max-questions", args.hf_max_questions)
    _check_threshold_draft(args.threshold, args.max_draft)
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if not args.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    _check_device_dtype(args.device, args.dtype)
    _adapter_config(args.adapter)

    from .decoding import resolve_settings
    model, tokenizer = load_model("default", args.device, args.dtype)
    adapter = _load_adapter(args.adapter, model)  # loaded even without kangaroo: --resume compares its name
    threshold, max_draft = resolve_settings(args.threshold, args.max_draft, adapter, model.device)
    out_dir = args.out or os.path.join("bench", "results", "run-" + time.strftime("%Y%m%d-%H%M%S"))
    results = harness.new_results(args.questions or io.MT_BENCH_FILE, questions, model.device, model.dtype,
                                  args.max_new_tokens, threshold, max_draft, args.adapter or "default",
                                  methods, args.hf_max_questions, args.temperature)
    if args.resume:
        results = harness.resumed(os.path.join(out_dir, "results.json"), results)
    print(f"kangaroo bench: {len(questions)} questions, methods {', '.join(methods)} on "
          f"{results['meta']['device']}; η = {threshold}, γ = {max_draft}; writing to {out_dir}")
    results = harness.run_benchmark(
        model, tokenizer, questions, methods, adapter=adapter, max_new_tokens=args.max_new_tokens,
        threshold=threshold, max_draft=max_draft, hf_max_questions=args.hf_max_questions,
        warmup=args.warmup, progress=not args.no_progress, results=results, temperature=args.temperature,
        copy_draft=args.copy_draft, draft_gate=args.draft_gate,
        on_turn_done=lambda r: harness.write_outputs(r, out_dir, with_plots=False))
    for path in harness.write_outputs(results, out_dir):
        print(f"wrote {path}")
    with open(os.path.join(out_dir, "results.md"), encoding="utf-8") as f:
        print(f.read())
    for method, error in results.get("errors", {}).items():
        print(f"kangaroo bench: {method} failed and is missing from the results: {error}", file=sys.stderr)
    return 1 if results.get("errors") else 0


# ---- kangaroo train -----------------------------------------------------------------------------------

def _train(args):
    from .training import TrainOptions, parse_exit_layers, ship_adapter, train_adapter
    io.read_prompts(args.prompts, strict=False)          # fail in a second, not after loading the model
    if args.mt_bench:
        io.load_questions(args.mt_bench)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} exists and is not a folder")
    if args.ship and args.model != "default":
        raise ValueError("--ship installs the default model's adapter; it needs --model default")
    if args.ship and not args.mt_bench:
        raise ValueError("--ship chooses by measured speedup: give --mt-bench")
    if args.model != "default" and not os.path.isdir(args.model):
        raise FileNotFoundError(f"--model: no such model folder: {args.model}")
    _check_device_dtype(args.device, args.dtype)
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions) if hasattr(args, f.name)}
    options.update(out_dir=args.out, progress=not args.no_progress)
    TrainOptions(**options).check(num_layers=1 << 30, vocab_size=1 << 30)  # shape-free checks, before loading

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    load_s = time.perf_counter() - t0
    parse_exit_layers(args.exit_layer, model.config.num_hidden_layers)
    print(f"[train] model loaded in {load_s:.1f} s on {io.device_name(model.device)}", flush=True)
    options.update(run_info={"model_load_s": round(load_s, 2), "command": " ".join(sys.argv)})
    train_adapter(model, tokenizer, args.prompts, exit_layer=args.exit_layer, **options)
    if args.ship and not args.generate_only:
        ship_adapter(args.out)
    return 0


def _floats(text: str):
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_train_arguments(p: argparse.ArgumentParser):
    from .training import DEFAULT_EXIT_LAYERS, TrainOptions
    d = TrainOptions()
    a = p.add_argument
    a("--prompts", default=io.TRAIN_PROMPTS_FILE,
      help="a .jsonl with one JSON object per line holding a 'prompt' string (MT-bench 'turns' and plain JSON "
           "strings are read too); default: the shipped GSM8K training questions (MIT licence)")
    a("--out", default="kangaroo-adapter-run",
      help="output folder: layer-<ℓ>/ adapters, report.json, MODEL_CARD.md, checkpoint/")
    a("--exit-layer", default=",".join(map(str, DEFAULT_EXIT_LAYERS)), help="ℓ, or a list: 1,2,3,4,6")
    a("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local transformers model folder")
    a("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    a("--dtype", choices=sorted(DTYPE_NAMES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    a("--num-prompts", type=int, default=d.num_prompts, help="prompts the target answers (held-out ones included)")
    a("--max-prompt-tokens", type=int, default=d.max_prompt_tokens, help="longer prompts (chat template included) are skipped")
    a("--max-new-tokens", type=int, default=d.max_new_tokens, help="answer length in the generation phase")
    a("--gen-batch-size", type=int, default=None, help="default: 128 on GPU, 8 on CPU")
    a("--data", dest="data_file", default=None,
      help="the generated answers as token ids (default: OUT/distill_data.pt); share one between runs with "
           "--reuse-data, or carry it to resume an interrupted generation with --resume")
    a("--generation-time-limit", type=float, default=None, help="seconds; later batches are not generated (0: none, train on the answers already in --data)")
    a("--teacher-tokens-per-batch", type=int, default=None, help="default: 32768 on GPU, 4096 on CPU")
    a("--top-k", type=int, default=d.top_k, help="teacher top-k + rest bucket; 0 = full softmax")
    a("--labels", choices=["soft", "hard"], default=d.labels,
      help="soft: the teacher's distribution (one pass through every layer; the GPU route); hard: the answers' "
           "own next tokens, the teacher's greedy argmax (only the first ℓ layers run, once, cached in "
           "OUT/exit_cache: the CPU route)")
    a("--length-grouped", action="store_true",
      help="batch sequences of similar length together (less padding; about 2x faster training on the CPU)")
    a("--cut-loops", type=int, default=d.cut_loops,
      help="keep this many periods of an answer that ends in a repetition loop and drop the rest (0: keep all)")
    a("--loss-on-prompt", action="store_true", help="also learn the prompt tokens' next-token distributions")
    a("--holdout-fraction", type=float, default=d.holdout_fraction, help="share of sequences held out for agreement")
    a("--architecture", choices=["kangaroo", "decoder", "decoder2"], default=d.architecture,
      help="the adapter: kangaroo (norm, attention, norm), decoder (a full decoder block), decoder2 (two)")
    a("--draft-vocab", type=int, default=d.draft_vocab,
      help="the draft's vocabulary: the N most frequent tokens of the training answers (0 = the full vocabulary)")
    a("--steps", type=int, default=d.steps, help="optimizer steps per exit layer")
    a("--batch-size", type=int, default=d.batch_size, help="sequences per step")
    a("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    a("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps")
    a("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="the cosine decays to lr times this")
    a("--weight-decay", type=float, default=d.weight_decay, help="on weight matrices only")
    a("--grad-clip", type=float, default=d.grad_clip, help="gradient norm clip")
    a("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between resumable checkpoints")
    a("--eval-every", type=int, default=d.eval_every,
      help="score the held-out sequences every N steps: the learning curves in report.json and curves.png "
           "(0 = at the end only)")
    a("--resume", action="store_true", help="continue the run in --out (its data, finished layers, checkpoints)")
    a("--generate-only", action="store_true",
      help="only answer the prompts and save them (--data), resumably; with --generation-time-limit, for "
           "machines whose calls are time-limited")
    a("--reuse-data", action="store_true", help="reuse --out's generated answers, train afresh")
    a("--seed", type=int, default=d.seed, help="seeds data order, hold-out split and init")
    a("--mt-bench", default=None, help="MT-bench question .jsonl for the speed sweep, e.g. the shipped one: "
                                       f"{io.MT_BENCH_FILE} (omitted: no sweep)")
    a("--eval-questions", type=int, default=d.eval_questions, help="MT-bench first turns in the speed sweep")
    a("--eval-max-new-tokens", type=int, default=d.eval_max_new_tokens, help="tokens per answer in the sweep")
    a("--thresholds", type=_floats, default=list(d.thresholds), help="η values, e.g. 0.3,0.4,0.5")
    a("--max-draft", type=int, default=d.max_draft, help="γ in the sweep")
    a("--eval-warmup", type=int, default=d.eval_warmup, help="untimed runs before each timed method")
    a("--no-progress", action="store_true", help="no progress bars")
    a("--ship", action="store_true", help="install the best adapter as the default model's shipped adapter")
    _threads_argument(p)


# ---- kangaroo info / which-commit ---------------------------------------------------------------------

def _info(args):
    from .info import print_info
    print_info()
    return 0


def _which_commit(args):
    """The commits whose code a result file was measured on (its code_trees), from this checkout."""
    import json
    with open(args.file) as f:
        data = json.load(f)
    trees = data.get("code_trees") or data.get("meta", {}).get("code_trees")
    if not trees:
        raise ValueError(f"{args.file} records no code_trees (a result from before they were recorded, or "
                         "measured without git)")
    found = io.which_commit(trees)
    print(" ".join(found) if found else "no commit among the last 500 has exactly this code (uncommitted changes?)")
    return 0 if found else 1


# ---- the parser -----------------------------------------------------------------------------------------

def _decoding_arguments(p: argparse.ArgumentParser):
    """What `generate` and `bench` share: the draft's settings, the adapter, the device and dtype."""
    p.add_argument("--threshold", type=float, default=None,
                   help=f"η: stop drafting below this confidence (default: the adapter's recommendation for the "
                        f"device, else {DEFAULT_THRESHOLD})")
    p.add_argument("--max-draft", type=int, default=None,
                   help=f"γ, the most drafts per round (default: the adapter's recommendation for the device, else "
                        f"{DEFAULT_MAX_DRAFT})")
    p.add_argument("--adapter", metavar="DIR", help="an adapter folder (default: the shipped one)")
    p.add_argument("--copy-draft", action=argparse.BooleanOptionalAction, default=None,
                   help="Kangaroo rounds may also copy their drafts from the prompt and the text so far (prompt "
                        "lookup), alone or extended by the adapter; never changes the output (default: on in "
                        "'host' mode, the CPU's, off on a GPU)")
    p.add_argument("--draft-gate", action=argparse.BooleanOptionalAction, default=None,
                   help="rounds rest (a plain step plus the adapter's block) while recent drafts do not pay for "
                        "their cost; never changes the output (default: on on a CPU, where it was measured to win; "
                        "off on a GPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    _threads_argument(p)


def _threads_argument(p: argparse.ArgumentParser):
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch CPU threads (default: OMP_NUM_THREADS if set, else {config.DEFAULT_CPU_THREADS}: "
                        "small-model decoding gains little from more, and loses most of its speed when another "
                        "program keeps a core busy; see BENCHMARKS.md)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kangaroo", description="Lossless Kangaroo self-speculative decoding")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, help_text, func):
        c = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        c.set_defaults(func=func)
        return c

    command("info", "versions, backends and compiled architectures", _info)

    g = command("generate", "chat with the default model (SmolLM2-135M-Instruct), streaming, with Kangaroo "
                            "decoding", _generate)
    g.add_argument("prompt", nargs="?", default=None, help=f"the user message (default: {DEMO_PROMPT!r})")
    g.add_argument("--file", help="a .jsonl of prompts (\"prompt\" field, MT-bench \"turns\", or strings)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="the most tokens to generate")
    _decoding_arguments(g)
    g.add_argument("--compare", action="store_true", help="also run plain decoding and compare speed and output")
    g.add_argument("--sample", action="store_true",
                   help="sample instead of greedy decoding (Kangaroo keeps the target's distribution exactly); "
                        "--temperature, --top-k, --top-p and --seed need it: without --sample they are an error, "
                        "not silently ignored")
    g.add_argument("--temperature", type=float, default=None, help="with --sample (default: 1.0)")
    g.add_argument("--top-k", type=int, default=None,
                   help="with --sample: keep the k most probable tokens (default: 0, off)")
    g.add_argument("--top-p", type=float, default=None, help="with --sample: nucleus mass (default: 1.0, off)")
    g.add_argument("--seed", type=int, default=None, help="with --sample: the random seed (default: a fresh one)")

    b = command("bench", "end-to-end decoding benchmark (Spec-Bench protocol) on MT-bench or your questions",
                _bench)
    b.add_argument("--questions", default=None, metavar="FILE.jsonl",
                   help="Spec-Bench / MT-bench questions (question_id, category, turns); default: the shipped "
                        "MT-bench (80 questions); 'long-context': the shipped long-context development set")
    b.add_argument("--methods", default="kangaroo,plain,hf-eager,pld,hf-pld",
                   help="comma list of: kangaroo (speculative_generate's defaults), kangaroo-adapter (the "
                        "adapter's drafts alone), kangaroo-copy (adapter and copied drafts), kangaroo-gate / "
                        "kangaroo-nogate (the draft gate forced on / off), pld (copied drafts alone, our engine), "
                        "plain, hf-eager, hf-pld (transformers' prompt lookup), hf-static")
    b.add_argument("--max-questions", type=int, help="at most N questions, round-robin over categories")
    b.add_argument("--hf-max-questions", type=int, help="at most N questions for the slow hf-* methods")
    b.add_argument("--categories", type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
                   help="comma list: only these categories")
    b.add_argument("--max-new-tokens", type=int, default=1024, help="the most tokens per answer")
    _decoding_arguments(b)
    b.add_argument("--out", metavar="DIR", help="default: bench/results/run-<date>")
    b.add_argument("--warmup", type=int, default=3, help="untimed passes per method")
    b.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy; > 0: every method samples at this temperature (Spec-Bench's sampled setting "
                        "is 1.0); Kangaroo keeps the target's distribution exactly")
    b.add_argument("--resume", action="store_true",
                   help="keep every turn already measured in DIR/results.json (same settings and commit)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")

    t = command("train", "train Kangaroo adapters by self-distillation (the target answers prompts; the adapter "
                         "learns its next-token distribution)", _train)
    _add_train_arguments(t)

    w = command("which-commit", "the commit a result file (kernels.json, results.json, ...) measured", _which_commit)
    w.add_argument("file", help="a JSON result with code_trees (top level or under meta)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "threads"):  # the commands that decode; set before any torch work
            config.apply_cpu_threads(args.threads)
        return args.func(args)
    except (ValueError, FileNotFoundError, PermissionError, MemoryError) as e:  # user errors: one line
        print(f"kangaroo {args.command}: error: {e}", file=sys.stderr)
        return 2
