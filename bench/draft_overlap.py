"""How far the adapter's first draft can be accepted, teacher-forced, on the target's own continuations: greedy
ones (top-1 agreement: greedy acceptance) and sampled ones (the overlap sum_x min(p(x), q(x)) of the target's
distribution p and the draft's q: speculative sampling's acceptance probability at that position).

Every position of a continuation is the first draft of some round, so these are the acceptance rates of
P(draft 1 accepted); they need no decoding engine, only the target's forward with hidden states and the
adapter's training forward (the engine's rounding, kangaroo_ext/adapter.py). CPU or GPU, fp32 by default:

    python bench/draft_overlap.py --prompts 6 --new-tokens 128 --out bench/results/draft_overlap_cpu.json
"""
import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIDENCE_BINS = [i / 10 for i in range(10)]     # [lo, lo + 0.1) of the draft's top-1 probability
QUESTIONS = os.path.join(os.path.dirname(HERE), "kangaroo_ext", "data", "mt_bench_question.jsonl")


@torch.no_grad()
def overlaps(model, adapter, spec, rope, ids: torch.Tensor, sequence: torch.Tensor, temperature: float = 1.0,
             draft_temperatures=()) -> dict:
    """Sums over the continuation's positions (the tokens after ids): overlap, top-1 agreement, and the target's
    mass inside the draft vocabulary; p at `temperature`, q at the same one, and the overlap for each of
    draft_temperatures (q from the draft's logits / t: any q keeps speculative sampling exact, so the draft's
    temperature is free to choose)."""
    F = torch.nn.functional
    out = model(sequence, output_hidden_states=True)
    exit_hidden = out.hidden_states[adapter.config["exit_layer"]]
    positions = torch.arange(sequence.shape[1], device=sequence.device)[None]
    y = adapter(exit_hidden.to(adapter.head_norm.dtype), positions, *rope, scale=spec.attn_scale,
                window=spec.sliding_window or 0)
    vocab = adapter.draft_vocab_ids
    head = spec.lm_head if vocab is None else spec.lm_head.index_select(0, vocab)
    first = ids.shape[1] - 1                       # the position whose next token is the first generated one
    p = torch.softmax(out.logits[0, first:-1].float() / temperature, -1)        # [n, V]
    draft_logits = F.linear(y[0, first:-1], head).float()                         # [n, N]

    def spread(t):  # q over the full vocabulary at draft temperature t: [n, V]
        q_draft = torch.softmax(draft_logits / t, -1)
        return q_draft if vocab is None else torch.zeros_like(p).index_copy_(-1, vocab, q_draft)
    q = spread(temperature)
    by_t = {f"overlap_at_draft_t{t:g}": float(torch.minimum(p, spread(t)).sum()) for t in draft_temperatures}
    # by the draft's confidence (its top-1 probability, what the early exit compares with η): how many positions
    # and their summed overlap, so that the η at which a draft pays can be read off
    overlap_each, confidence = torch.minimum(p, q).sum(-1), q.max(-1).values
    by_conf = {}
    for lo in CONFIDENCE_BINS:
        inside = (confidence >= lo) & (confidence < lo + 0.1)
        by_conf[f"positions_conf{lo:.1f}"] = int(inside.sum())
        by_conf[f"overlap_sum_conf{lo:.1f}"] = float(overlap_each[inside].sum())
    return {"positions": len(p), "overlap": float(overlap_each.sum()), **by_t, **by_conf,
            "top1_agreement": int((p.argmax(-1) == q.argmax(-1)).sum()),
            "target_mass_in_draft_vocab": float(p.sum() if vocab is None else p[:, vocab].sum())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=6, help="MT-bench first turns, from the first (default 6)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0, help="of the sampled continuations")
    ap.add_argument("--draft-temperatures", default="",
                    help="comma-separated draft temperatures whose overlap with the target to report as well")
    ap.add_argument("--out", help="write the result here (JSON)")
    args = ap.parse_args()
    draft_ts = [float(t) for t in args.draft_temperatures.split(",") if t.strip()]
    if args.prompts < 1 or args.new_tokens < 1 or not args.temperature > 0 or not all(t > 0 for t in draft_ts):
        ap.error("--prompts and --new-tokens must be >= 1, --temperature and --draft-temperatures > 0")
    import kangaroo_ext as kx
    from kangaroo_ext.engine.spec import model_spec
    from kangaroo_ext.io import git_commit
    from kangaroo_ext.training.loop import rope_tables
    model, tokenizer = kx.load_default_model()
    adapter = kx.load_default_adapter(model)
    spec = model_spec(model)
    with open(QUESTIONS) as f:
        questions = [json.loads(line) for line in f][:args.prompts]
    totals = {kind: {} for kind in ("greedy", "sampled")}
    rope = None
    for i, q in enumerate(questions):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q["turns"][0]}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"].to(spec.device)
        rope = rope or rope_tables(spec, 2048)
        for kind in totals:
            sampled = kind == "sampled"
            how = dict(do_sample=True, temperature=args.temperature, seed=i) if sampled else {}
            seq = kx.generate(model, ids, max_new_tokens=args.new_tokens, **how).sequences
            temperature = args.temperature if sampled else 1.0
            for key, value in overlaps(model, adapter, spec, rope, ids, seq, temperature,
                                       draft_ts if sampled else ()).items():
                totals[kind][key] = totals[kind].get(key, 0) + value
        print(f"prompt {i + 1}/{len(questions)}", flush=True)
    result = {"device": str(spec.device), "dtype": str(spec.embed.dtype), "commit": git_commit()[0], "dirty": git_commit()[1],
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "prompts": len(questions),
              "new_tokens": args.new_tokens, "temperature": args.temperature}
    for kind, t in totals.items():
        n = max(1, t["positions"])
        result[kind] = {key: value if key == "positions" else round(value / n, 4) for key, value in t.items()
                        if "_conf" not in key}
        result[kind]["by_confidence"] = {
            f"{lo:.1f}": {"share": round(t[f"positions_conf{lo:.1f}"] / n, 4),
                          "overlap": round(t[f"overlap_sum_conf{lo:.1f}"] / max(1, t[f"positions_conf{lo:.1f}"]), 4)}
            for lo in CONFIDENCE_BINS}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
