"""Kangaroo against plain decoding on the CPU (issue 17): the shipped adapter with draft vocabularies of N
tokens and a grid of (η, γ), on MT-bench questions (both turns), by the benchmark harness itself.

    python bench/cpu_sweep.py --answers .carry/answers_cpu.pt --sizes 4096,8192,16384,0 \\
        --thresholds 0.3,0.5 --max-drafts 3,6 --questions 8 --new 128 --out bench/results/cpu_sweep.json

The draft vocabulary is the N most frequent tokens of the target's own answers to training prompts
(--answers: a file written by kangaroo_ext.training.data, or a {"pairs": [(prompt, answer), ...]} file);
N = 0 is the full vocabulary. Plain decoding runs first and last; speedups are against both runs (the
Spec-Bench ratio of mean tokens/s over turns). fp32, the threads torch uses (set --threads).
"""
import argparse
import os
import sys
import time

import torch

import kangaroo_ext as kx
from kangaroo_ext import io
from kangaroo_ext.benchmarking import report
from kangaroo_ext.benchmarking.harness import run_benchmark
from kangaroo_ext.training.data import unpack_sequences
from kangaroo_ext.training.draft import DraftVocab

HERE = os.path.dirname(os.path.abspath(__file__))


def load_pairs(path: str):
    saved = torch.load(path, map_location="cpu", weights_only=False)
    return saved["pairs"] if "pairs" in saved else unpack_sequences(saved["sequences"])


def ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def floats(text):
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--answers", required=True)
    p.add_argument("--prompt-file", default=None,
                   help="training prompts (.jsonl): their tokens rank what the answers never use")
    p.add_argument("--sizes", type=ints, default=[4096, 8192, 16384, 0])
    p.add_argument("--thresholds", type=floats, default=[0.3, 0.5])
    p.add_argument("--max-drafts", type=ints, default=[3, 6])
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=os.path.join(HERE, "results", "cpu_sweep.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = kx.load_default_model(device="cpu", dtype=torch.float32)
    base = kx.load_default_adapter(model)
    pairs = load_pairs(args.answers)
    answers, prompts = [a for _, a in pairs], [p for p, _ in pairs]
    if args.prompt_file:
        prompts += [tok(t, add_special_tokens=False)["input_ids"] for t in io.read_prompts(args.prompt_file,
                                                                                            strict=False)[0]]
    questions = io.select_questions(io.load_questions(), max_questions=args.questions)
    results = {"methods": {}}
    # the adapter's own drafts (copied drafts, on by default on a CPU, are measured in BENCHMARKS.md, issue 22)
    common = dict(max_new_tokens=args.new, warmup=args.warmup, progress=False, results=results, copy_draft=False)

    def run(method, key, **kw):
        run_benchmark(model, tok, questions, [method], method_key=lambda m: key, **common, **kw)
        if results.get("errors"):
            raise RuntimeError(results["errors"])
        return results["methods"][key]["turns"]

    def tps(turns):
        return sum(t["tok_per_s"] for t in turns) / len(turns)

    before = run("plain", "plain before")
    print(f"plain: {tps(before):.1f} tok/s", flush=True)
    rows = []
    for n in args.sizes:
        adapter = kx.Adapter(base.config).to(model.dtype)
        adapter.load_state_dict(base.state_dict(), strict=False)
        if n:
            vocab = DraftVocab.most_frequent(answers, n, model.config.vocab_size, also=prompts)
            adapter.with_draft_vocab(vocab.ids)
        coverage = None
        if n:  # on answers the vocabulary was not built from: a tenth held out
            held = max(1, len(answers) // 10)
            check = DraftVocab.most_frequent(answers[:-held], n, model.config.vocab_size, also=prompts)
            coverage = float(check.covers(torch.tensor([t for a in answers[-held:] for t in a])).float().mean())
        for eta in args.thresholds:
            for gamma in args.max_drafts:
                key = f"kangaroo N={n or 'full'} eta={eta} gamma={gamma}"
                turns = run("kangaroo", key, adapter=adapter, threshold=eta, max_draft=gamma)
                acc = report.acceptance(turns)
                rows.append({"draft_vocab": n or None, "threshold": eta, "max_draft": gamma,
                             "heldout_answer_coverage": coverage, "tau": acc["mean_accepted"],
                             "acceptance_by_position": acc["acceptance_by_position"],
                             "tok_per_s": tps(turns), "turns": turns})
                print(f"{key}: {rows[-1]['tok_per_s']:.1f} tok/s, τ {acc['mean_accepted']:.2f}", flush=True)
    after = run("plain", "plain after")
    plain = before + after
    for r in rows:
        r["speedup"] = report.speedup(r.pop("turns"), plain)
        r["identical_to_plain"] = None  # filled below from the results
    for r, key in zip(rows, [k for k in results["methods"] if k.startswith("kangaroo")]):
        r["identical_to_plain"] = report.identical_rate(results["methods"][key]["turns"], before)
    best = max(rows, key=lambda r: r["speedup"])
    out = {**io.provenance("cpu"), "dtype": "float32", "questions": len(questions), "turns": len(before),
           "max_new_tokens": args.new, "answers_file": os.path.basename(args.answers),
           "answer_tokens": sum(map(len, answers)), "plain_tok_per_s": [tps(before), tps(after)],
           "table": rows, "best": best, "seconds": time.perf_counter() - t0}
    io.write_json(args.out, out)
    print(f"best: N={best['draft_vocab']}, η={best['threshold']}, γ={best['max_draft']}: "
          f"{best['speedup']:.2f}x plain; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
