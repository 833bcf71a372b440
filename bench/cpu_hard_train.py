"""A short hard-label training run on the CPU (issue 20): the rates of the exit pass and of training, the
learning curve (tokens seen, loss, held-out first-draft agreement) and the shipped adapter's agreement on
the same held-out answers, split into looping and non-looping text.

    OMP_NUM_THREADS=1 python bench/cpu_hard_train.py --answers .carry/train/answers.pt \\
        --train-sequences 4000 --steps 900 --out bench/results/cpu_hard_train.json

Held out: answers to prompts the shipped adapter never saw (usable-prompt index >= --unseen-from; it was
trained on the first 2,000), chosen by a seeded draw, never trained on. Training answers: a seeded draw of
the rest. Loops cut as in `kangaroo train --cut-loops` (the held-out answers too: agreement is measured on
the text training would see). Resumable: the exit states and the checkpoint live under --work.
"""
import argparse
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import kangaroo_ext as kx  # noqa: E402
from kangaroo_ext import io  # noqa: E402
from kangaroo_ext.adapter import Adapter  # noqa: E402
from kangaroo_ext.default_model import ADAPTER_DIR  # noqa: E402
from kangaroo_ext.engine.spec import model_spec  # noqa: E402
from kangaroo_ext.training import data, draft, hard_labels, loop, loops  # noqa: E402
from kangaroo_ext.training.options import TrainOptions  # noqa: E402


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--answers", required=True)
    ap.add_argument("--exit-layer", type=int, default=1)
    ap.add_argument("--train-sequences", type=int, default=4000)
    ap.add_argument("--holdout", type=int, default=300, help="held-out answers for the final comparison")
    ap.add_argument("--curve-holdout", type=int, default=80, help="the first N of them score the curve")
    ap.add_argument("--unseen-from", type=int, default=2000)
    ap.add_argument("--cut-loops", type=int, default=2)
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=os.path.join(os.path.dirname(HERE), ".carry", "cpu_hard_train"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu_hard_train.json"))
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    say = lambda *a: print(*a, flush=True)  # noqa: E731

    saved = torch.load(args.answers, map_location="cpu", weights_only=True)
    pairs = data.unpack_sequences(saved["sequences"])
    answered = saved["answered"].tolist() if "answered" in saved else list(range(len(pairs)))
    gen = torch.Generator().manual_seed(args.seed + 20)
    unseen = [i for i, k in enumerate(answered) if k >= args.unseen_from]
    hold = sorted(unseen[j] for j in torch.randperm(len(unseen), generator=gen)[:args.holdout].tolist())
    rest = sorted(set(range(len(pairs))) - set(hold))
    train = sorted(rest[j] for j in torch.randperm(len(rest), generator=gen)[:args.train_sequences].tolist())
    seqs = [pairs[i] for i in train + hold]
    raw_answer_tokens = sum(len(a) for _, a in seqs)
    seqs, removed, n_cut = loops.cut_loops(seqs, args.cut_loops) if args.cut_loops else (seqs, 0, 0)
    say(f"{len(train)} training and {len(hold)} held-out answers; loops cut in {n_cut} ({removed} tokens)")

    model, _ = kx.load_default_model(device="cpu", dtype=torch.float32)
    spec = model_spec(model)
    layers = sorted({1, args.exit_layer})  # ℓ = 1 too: the shipped adapter's exit, for the comparison
    cache, exit_stats = hard_labels.build_cache(model, seqs, layers, False, 4096, cache_dir=os.path.join(args.work, "exit_cache"),
                                                model_fingerprint=spec.fingerprint(), progress=False, say=say)
    say(f"exit pass: {exit_stats}")
    cache.repeated = loops.repeated_target_mask(seqs, False)
    train_ids = torch.arange(len(train))
    hold_ids = torch.arange(len(train), len(seqs))
    vocab = draft.DraftVocab.most_frequent((a for _, a in seqs[:len(train)]), args.draft_vocab, spec.vocab_size,
                                           also=(p for p, _ in seqs[:len(train)]))
    rope = loop.rope_tables(spec, int(cache.seq_len.max()))
    opts = TrainOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every,
                        labels="hard", length_grouped=True, cut_loops=args.cut_loops, draft_vocab=args.draft_vocab,
                        seed=args.seed, checkpoint_every=50, resume=True, out_dir=args.work, progress=False)
    fingerprint = dict(opts.training_fingerprint(), exit_layer=args.exit_layer, train=len(train), hold=len(hold))
    ckpt = os.path.join(args.work, "checkpoint", f"layer-{args.exit_layer}.pt")
    for p in model.parameters():  # only the adapter trains (the draft head is a slice of the LM head)
        if not p.is_inference():
            p.requires_grad_(False)
    adapter, run = loop.train_layer(spec, cache, args.exit_layer, train_ids, rope, opts, ckpt, fingerprint,
                                    hold_ids[:args.curve_holdout], vocab)
    adapter.save_pretrained(os.path.join(args.work, f"layer-{args.exit_layer}"))  # never into kangaroo_ext/adapters
    train_tokens = run["history"][-1]["tokens_seen"]
    say(f"trained {args.steps} steps, {train_tokens} answer tokens in {run['seconds']:.0f} s")

    t0 = time.perf_counter()
    new = draft.teacher_forced_metrics(adapter, spec, cache, args.exit_layer, hold_ids, 16, rope, vocab)
    shipped = Adapter.from_pretrained(ADAPTER_DIR, device="cpu", dtype=torch.float32)
    shipped_vocab = draft.DraftVocab.from_ids(shipped.draft_vocab_ids, spec.vocab_size) \
        if shipped.draft_vocab_ids is not None else None
    old = draft.teacher_forced_metrics(shipped, spec, cache, shipped.config["exit_layer"], hold_ids, 16, rope,
                                       shipped_vocab)
    eval_s = time.perf_counter() - t0
    threads = torch.get_num_threads()
    train_rate = train_tokens / run["seconds"]
    three_hours = 3 * 3600
    result = {
        "what": "hard-label adapter training on the CPU (issue 20): labels = the target's own greedy answer tokens",
        "machine": {"cpu": cpu_name(), "torch_threads": threads, "cores_on_machine": os.cpu_count(),
                    "note": "2-core machine shared with other sessions; one thread"},
        "commit": io.git_commit(os.path.dirname(HERE))[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "data": {"answers_file": os.path.basename(args.answers), "train_answers": len(train),
                 "holdout_answers": len(hold), "holdout_from_prompts_at_or_after": args.unseen_from,
                 "answer_tokens_before_cut": raw_answer_tokens, "loops_cut": n_cut, "loop_tokens_removed": removed,
                 "cut_keep_periods": args.cut_loops, "train_answer_tokens": int(cache.loss_count[train_ids].sum()),
                 "holdout_answer_tokens": int(cache.loss_count[hold_ids].sum()),
                 "looping_text": "target token inside a repeated 16-gram of its answer (loops.repeated_target_mask)"},
        "options": {"exit_layer": args.exit_layer, "draft_vocab": args.draft_vocab, "steps": args.steps,
                    "batch_size": args.batch_size, "lr": args.lr, "length_grouped": True, "architecture": "kangaroo"},
        "rates": {"exit_pass_tokens_per_s": exit_stats["tokens_per_s"], "exit_pass_layers_run": exit_stats["layers_run"],
                  "exit_pass": exit_stats, "train_answer_tokens_per_s": round(train_rate, 1),
                  "train_seconds": run["seconds"]},
        "three_hours": {
            "train_answer_tokens": int(train_rate * three_hours),
            "note": "answer tokens (loss positions) one thread trains on in 3 h, prompt tokens included in the work; "
                    "the exit pass is extra: all tokens (prompt + answer) once per exit-layer set"},
        "curve": [{k: h.get(k) for k in ("step", "tokens_seen", "loss", "agreement", "heldout_loss", "heldout_agreement")}
                  for h in run["history"]],
        "curve_note": f"loss/agreement: training window means; heldout_*: the first {args.curve_holdout} held-out answers",
        "final_holdout": {"new_adapter": new, "shipped_adapter": dict(old, exit_layer=shipped.config["exit_layer"],
                                                                      draft_vocab=shipped.config.get("draft_vocab_size"))},
        "eval_seconds": round(eval_s, 1), "total_seconds": round(time.perf_counter() - t_start, 1)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    say(json.dumps({"rates": result["rates"], "final_holdout": result["final_holdout"]}, indent=1))


if __name__ == "__main__":
    main()
