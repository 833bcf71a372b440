"""How long should a copied draft be? Replays greedy answers offline: for every position of each answer,
looks the text so far up with ops.ngram_draft, and counts how many copied tokens the answer really
continues with (greedy verification would accept exactly those). No timing: the policy in
engine/copy_rounds.py was chosen from this table and a cost of about a tenth of a plain step per extra
verified row on a CPU.

    python bench/copy_policy_study.py [--prompts 12] [--max-new-tokens 128] [--out FILE.json]

Prints, per category, the mean accepted tokens by matched n (1..8), and the simulated speedup of a few
policies under that cost model (decode only, prefill excluded)."""
import argparse
import collections
import json

import torch

import kangaroo_ext as kx
from kangaroo_ext import io, ops


def accepted_after(history, L, out, t, n, copy):
    tokens, count, _ = ops.ngram_draft(history, torch.tensor([L]), n, n, copy)
    k, a = int(count[0]), 0
    while a < k and t + a < len(out) and int(tokens[0, a]) == out[t + a]:
        a += 1
    return k, a


def longest_match(history, L):
    _, count, matched = ops.ngram_draft(history, torch.tensor([L]), 1, 8, 1)
    return int(matched[0])


def simulate(streams, min_n, max_n, cap, row_cost):
    """tokens / cost per category, cost = 1 + row_cost x copied rows per round."""
    res = collections.defaultdict(lambda: [0, 0.0])
    for cat, ids, out in streams:
        history, t, cost = torch.tensor([ids + out]), 0, 0.0
        while t < len(out):
            tokens, count, matched = ops.ngram_draft(history, torch.tensor([len(ids) + t]), min_n, max_n, 16)
            k = min(int(count[0]), cap(int(matched[0])))
            a = 0
            while a < k and t + a < len(out) and int(tokens[0, a]) == out[t + a]:
                a += 1
            cost += 1 + row_cost * k
            t += a + 1
        res[cat][0] += len(out)
        res[cat][1] += cost
    return {c: round(n / cost, 3) for c, (n, cost) in res.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model, tokenizer = kx.load_default_model(device="cpu")
    questions = io.select_questions(io.load_questions(io.LONG_CONTEXT_FILE), None, args.prompts)
    streams = []
    for q in questions:
        ids = io.chat_ids(tokenizer, q["turns"][0])
        out = kx.generate(model, ids, max_new_tokens=args.max_new_tokens).sequences[0, len(ids):].tolist()
        streams.append((q["category"], ids, out))
    by_n = collections.defaultdict(lambda: [0, 0])
    for cat, ids, out in streams:
        history = torch.tensor([ids + out])
        for t in range(len(out)):
            n = longest_match(history, len(ids) + t)
            if n:
                _, a = accepted_after(history, len(ids) + t, out, t, n, 10)
                by_n[(cat, n)][0] += 1
                by_n[(cat, n)][1] += a
    table = {f"{c} n={n}": {"matches": m, "mean_accepted": round(a / m, 2)} for (c, n), (m, a) in sorted(by_n.items())}
    policies = {"n 1-4, copy 10": (1, 4, lambda n: 10), "n 2-8, copy 10": (2, 8, lambda n: 10),
                "n 3-8, copy 10": (3, 8, lambda n: 10), "n 2-8, copy 2n (shipped)": (2, 8, lambda n: min(10, 2 * n))}
    sims = {name: {f"row cost {r}": simulate(streams, lo, hi, cap, r) for r in (0.06, 0.12)}
            for name, (lo, hi, cap) in policies.items()}
    report = {"accepted_by_matched_n": table, "simulated_decode_speedup": sims,
              "prompts": [q["question_id"] for q in questions], "max_new_tokens": args.max_new_tokens}
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
