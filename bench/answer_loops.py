"""How much of the target's greedy training answers is repetition loops (issue 20), and what cutting them
would keep. CPU, a few seconds.

    python bench/answer_loops.py --answers .carry/train/answers.pt --out bench/results/answer_loops.json

Definitions (kangaroo_ext/training/loops.py):
- looping suffix: from its loop start s to the end, the answer repeats one period p exactly
  (a[i] == a[i - p]), p <= 256, over >= 3 periods and >= 48 tokens; "loop tokens" are a[s:];
- repeated n-gram: an answer token inside an n-gram that already started earlier in the same answer
  (n = 8, 16, 32), which also counts near-loops that are not exactly periodic.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from kangaroo_ext.training import data, loops  # noqa: E402


def quantiles(values):
    if not values:
        return None
    q = statistics.quantiles(values, n=20, method="inclusive") if len(values) > 1 else [values[0]] * 19
    return {"min": min(values), "p25": q[4], "median": statistics.median(values), "p75": q[14], "p95": q[18],
            "max": max(values)}


def share(num, den):
    return round(num / den, 4) if den else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--answers", required=True, help="an answers file written by kangaroo_ext.training.data")
    ap.add_argument("--cap", type=int, default=1024, help="the generation's max_new_tokens")
    ap.add_argument("--ngrams", default="8,16,32")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "answer_loops.json"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    saved = torch.load(args.answers, map_location="cpu", weights_only=True)
    answers = [a for _, a in data.unpack_sequences(saved["sequences"])]
    spans = [loops.looping_suffix(a) for a in answers]
    total = sum(map(len, answers))
    capped = [len(a) >= args.cap for a in answers]
    looping = [s is not None for s in spans]
    loop_tokens = sum(len(a) - s.start for a, s in zip(answers, spans) if s)
    first_period = sum(s.period for s in spans if s)
    out = {
        "answers_file": os.path.basename(args.answers),
        "settings": saved["settings"],
        "definitions": {
            "looping_suffix": "from loop start s to the end a[i] == a[i - p] for one period p <= 256, spanning "
                              ">= 3 periods and >= 48 tokens (kangaroo_ext.training.loops.looping_suffix); loop "
                              "tokens = a[s:]; repeats = loop tokens beyond the first period",
            "repeated_ngram": "an answer token inside an n-gram that already started at an earlier index of the "
                              "same answer (loops.repeated_ngram_mask)"},
        "answers": len(answers), "answer_tokens": total,
        "at_cap": sum(capped), "at_cap_share": share(sum(capped), len(answers)),
        "looping_answers": sum(looping), "looping_answers_at_cap": sum(c and l for c, l in zip(capped, looping)),
        "looping_answers_below_cap": sum(l and not c for c, l in zip(capped, looping)),
        "loop_tokens": loop_tokens, "loop_token_share": share(loop_tokens, total),
        "loop_repeat_tokens": loop_tokens - first_period,
        "loop_repeat_token_share": share(loop_tokens - first_period, total),
        "loop_period": quantiles([s.period for s in spans if s]),
        "loop_start": quantiles([s.start for s in spans if s]),
        "cut": {}, "repeated_ngram": {}}
    for keep in (1, 2):
        kept = sum(len(loops.cut_loop(a, keep, loop=s)) for a, s in zip(answers, spans))
        out["cut"][f"keep_{keep}_periods"] = {"answer_tokens_kept": kept, "removed": total - kept,
                                             "removed_share": share(total - kept, total)}
    for n in [int(x) for x in args.ngrams.split(",")]:
        masks = [loops.repeated_ngram_mask(a, n) for a in answers]
        rep = [sum(m) for m in masks]
        groups = {"all": range(len(answers)),
                  "looping": [i for i in range(len(answers)) if looping[i]],
                  "not_looping": [i for i in range(len(answers)) if not looping[i]],
                  "at_cap_not_looping": [i for i in range(len(answers)) if capped[i] and not looping[i]],
                  "below_cap": [i for i in range(len(answers)) if not capped[i]]}
        row = {}
        for name, ids in groups.items():
            toks = sum(len(answers[i]) for i in ids)
            row[name] = {"answers": len(ids), "tokens": toks, "repeated_tokens": sum(rep[i] for i in ids),
                         "repeated_share": share(sum(rep[i] for i in ids), toks)}
        # what a loop cut (2 periods kept) leaves repeated: the near-loops the exact cut misses
        kept = [loops.cut_loop(a, 2, loop=s) for a, s in zip(answers, spans)]
        kept_rep = sum(sum(loops.repeated_ngram_mask(k, n)) for k in kept)
        kept_tok = sum(map(len, kept))
        row["after_cut_keep_2"] = {"tokens": kept_tok, "repeated_tokens": kept_rep,
                                   "repeated_share": share(kept_rep, kept_tok)}
        out["repeated_ngram"][f"n{n}"] = row
    out["seconds"] = round(time.perf_counter() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps({k: out[k] for k in ("answers", "answer_tokens", "at_cap", "looping_answers",
                                          "looping_answers_at_cap", "loop_token_share", "cut")}, indent=1))


if __name__ == "__main__":
    main()
