"""How much a bigger draft vocabulary could buy (issue 20's sweep over N, measured on the data).

    python bench/draft_vocab_coverage.py --answers answers.pt --out bench/results/training/draft_vocab_coverage.json

The draft predicts only its N most frequent answer tokens: a position whose target lies outside can never
be drafted right. This counts, on the held-out answers (the training pipeline's own split and loop cut),
the share of target tokens inside the N most frequent training-answer tokens, for each N. The targets are
the answers' tokens (the target's greedy choices). Agreement at N cannot exceed that coverage, and scaling a
measured agreement by coverage(N) / coverage(N0) bounds what N buys if the adapter were as good on the
added tokens as on the rest. It would be worse, since those tokens are rare. CPU, about a minute.
"""
import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kangaroo_ext.training import data, loops  # noqa: E402
from kangaroo_ext.training.draft import DraftVocab  # noqa: E402
from kangaroo_ext.training.options import TrainOptions  # noqa: E402

SIZES = (2048, 4096, 8192, 16384, 32768)
VOCAB_SIZE = 49152   # SmolLM2


def coverage(train_answers, held_answers, size: int, prompts=()) -> float:
    """Share of the held-out answer tokens inside the `size` most frequent training-answer tokens."""
    vocab = DraftVocab.most_frequent(train_answers, size, VOCAB_SIZE, also=prompts)
    held = torch.tensor([t for a in held_answers for t in a], dtype=torch.int64)
    return float(vocab.covers(held).float().mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--answers", required=True, help="train_default_adapter.sh's answers.pt")
    p.add_argument("--out", required=True)
    p.add_argument("--keep-periods", type=int, default=2, help="loop cut, as the shipped adapter's training")
    p.add_argument("--agreement", type=float, default=0.652, help="measured held-out agreement at --at")
    p.add_argument("--at", type=int, default=8192, help="the draft vocabulary that agreement was measured with")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    saved = torch.load(args.answers, weights_only=False)
    sequences = data.unpack_sequences(saved["sequences"])            # [(prompt ids, answer ids)]
    sequences, removed, cut = loops.cut_loops(sequences, args.keep_periods)
    opts = TrainOptions()
    train_ids, hold_ids = data.split_holdout(len(sequences), opts.holdout_fraction, opts.seed)
    train = [sequences[i][1] for i in train_ids.tolist()]
    held = [sequences[i][1] for i in hold_ids.tolist()]
    prompts = [sequences[i][0] for i in train_ids.tolist()]
    table = {n: coverage(train, held, n, prompts) for n in SIZES}
    base = table.get(args.at) or coverage(train, held, args.at, prompts)
    rows = [{"draft_vocab": n, "held_out_target_coverage": round(c, 4),
             "agreement_bound_if_equally_good": round(args.agreement * c / base, 4)} for n, c in table.items()]
    report = {"what": "held-out answer tokens inside the N most frequent training-answer tokens (issue 20)",
              "answers": os.path.basename(args.answers), "sequences": len(sequences),
              "train_sequences": len(train), "held_out_sequences": len(held),
              "held_out_tokens": sum(len(a) for a in held),
              "loop_cut": {"keep_periods": args.keep_periods, "answers_cut": cut, "tokens_removed": removed},
              "measured_agreement": {"value": args.agreement, "draft_vocab": args.at},
              "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    for r in rows:
        print(f"N = {r['draft_vocab']:6d}: coverage {100 * r['held_out_target_coverage']:5.2f}%, "
              f"agreement at most ~{r['agreement_bound_if_equally_good']:.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
