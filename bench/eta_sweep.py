"""η sweep for the shipped adapter on the default model: τ, acceptance by position and tok/s against plain
decoding, by the sweep behind the adapter's model card (kangaroo_ext.training.evaluation.measure_speed,
which times turns with the benchmark harness), on MT-bench first turns.

    python bench/eta_sweep.py                  # the shipped MT-bench; writes bench/results/eta_sweep.json

Needs a CUDA device; about 1 minute on an H200 at the defaults (16 questions, 256 tokens, 5 values of η).
"""
import argparse
import os
import sys

import torch

import kangaroo_ext as kx
from kangaroo_ext import io, training
from kangaroo_ext.cli import _floats
from kangaroo_ext.training.evaluation import measure_speed

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", default=io.MT_BENCH_FILE, metavar="FILE.jsonl")
    p.add_argument("--num-questions", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--thresholds", type=_floats, default=[0.1, 0.2, 0.3, 0.4, 0.6])
    p.add_argument("--max-draft", type=int, default=6)
    p.add_argument("--out", default=os.path.join(BENCH_DIR, "results", "eta_sweep.json"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("eta_sweep: needs a CUDA device", file=sys.stderr)
        return 2
    meta = io.provenance("cuda")
    model, tokenizer = kx.load_default_model(device="cuda", dtype=torch.bfloat16)
    adapter = kx.load_default_adapter(model)
    opts = training.TrainOptions(thresholds=args.thresholds, eval_max_new_tokens=args.max_new_tokens,
                                 max_draft=args.max_draft, eval_warmup=1)
    questions = io.select_questions(io.load_questions(args.questions), max_questions=args.num_questions)
    report = measure_speed(model, tokenizer, {adapter.exit_layer: adapter}, questions, opts, say=print)
    io.write_json(args.out, {**meta, "dtype": "bfloat16", **report})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
