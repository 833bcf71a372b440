"""Copied drafts A/B on a shared CPU, interleaved: for every prompt, each method runs back to back (the
order rotating per prompt), so a change in the machine's background load hits every method alike.
`kangaroo bench` runs methods one after another, which on a machine shared with other jobs confounds the
methods with the load of the moment; this script is its interleaved check.

    OMP_NUM_THREADS=1 python bench/copy_draft_interleaved.py --out bench/results/copy_draft_cpu/interleaved.json

Long-context development prompts with plain, kangaroo, kangaroo-copy and pld; MT-bench first turns with
plain, kangaroo and kangaroo-copy. Per method: tok/s over the whole turn (prefill included, Spec-Bench's
measure) and over decoding alone (the engine's own prefill time removed); outputs compared with plain."""
import argparse
import json
import platform
import time

import torch

import kangaroo_ext as kx
from kangaroo_ext import io

RUNS = {"plain": None, "kangaroo": False, "kangaroo-copy": True, "pld": "only"}


def run(model, adapter, method, ids, max_new):
    if method == "plain":
        out = kx.generate(model, ids, max_new_tokens=max_new)
    else:
        out = kx.speculative_generate(model, ids, adapter=adapter, max_new_tokens=max_new, copy_draft=RUNS[method])
    s = out.stats
    return {"new_tokens": s.new_tokens, "total_s": s.total_s, "prefill_s": s.prefill_s, "rounds": s.rounds,
            "by_source": s.by_source() if s.copy_draft else None, "tokens": out.sequences[0, len(ids):].tolist()}


def measure(model, tokenizer, adapter, questions, methods, max_new):
    rows = []
    for i, q in enumerate(questions):
        ids = io.chat_ids(tokenizer, q["turns"][0])
        order = methods[i % len(methods):] + methods[:i % len(methods)]
        row = {"question_id": q["question_id"], "category": q["category"], "prompt_tokens": len(ids)}
        for m in order:
            row[m] = run(model, adapter, m, ids, max_new)
        for m in methods:
            row[m]["identical_to_plain"] = row[m]["tokens"] == row["plain"]["tokens"]
        rows.append(row)
        print(q["question_id"], {m: round(row[m]["total_s"], 1) for m in methods}, flush=True)
    summary = {}
    for m in methods:
        new = sum(r[m]["new_tokens"] for r in rows)
        total = sum(r[m]["total_s"] for r in rows)
        decode = sum(r[m]["total_s"] - r[m]["prefill_s"] for r in rows)
        summary[m] = {"tok_per_s_total": new / total, "tok_per_s_decode": new / decode,
                      "tau": new / sum(r[m]["rounds"] for r in rows),
                      "identical_to_plain": sum(r[m]["identical_to_plain"] for r in rows) / len(rows)}
    for m in methods:
        mine, plain, alone = summary[m], summary["plain"], summary.get("kangaroo")
        for key in ("total", "decode"):
            mine[f"speedup_vs_plain_{key}"] = mine[f"tok_per_s_{key}"] / plain[f"tok_per_s_{key}"]
        if alone:
            mine["speedup_vs_kangaroo_total"] = mine["tok_per_s_total"] / alone["tok_per_s_total"]
    return {"summary": summary, "turns": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--long-context", type=int, default=8)
    ap.add_argument("--mt-bench", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model, tokenizer = kx.load_default_model(device="cpu")
    adapter = kx.load_default_adapter(model)
    for m in RUNS:  # warm-up: allocation, first-call costs
        run(model, adapter, m, io.chat_ids(tokenizer, "Say hello."), 8)
    result = {"meta": dict(io.provenance(torch.device("cpu")), machine=platform.processor() or platform.machine(),
                           threads=torch.get_num_threads(), started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           max_new_tokens=args.max_new_tokens)}
    long_q = io.select_questions(io.load_questions(io.LONG_CONTEXT_FILE), None, args.long_context)
    result["long_context"] = measure(model, tokenizer, adapter, long_q, ["plain", "kangaroo", "kangaroo-copy", "pld"],
                                     args.max_new_tokens)
    mt_q = io.select_questions(io.load_questions(), None, args.mt_bench)
    result["mt_bench"] = measure(model, tokenizer, adapter, mt_q, ["plain", "kangaroo", "kangaroo-copy"],
                                 args.max_new_tokens)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k]["summary"] for k in ("long_context", "mt_bench")}, indent=1))


if __name__ == "__main__":
    main()
