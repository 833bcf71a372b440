"""η sweep for the shipped adapter on the default model: τ, acceptance by position and tok/s against plain
decoding, by kx.speculative_generate itself (kangaroo_ext.training.measure_speed, the sweep behind the
adapter's model card), on MT-bench first turns.

    python bench/eta_sweep.py --questions ../shared/data/mt_bench_question.jsonl     # bench/results/eta_sweep.json

Needs a CUDA device; about 1 minute on an H200 at the defaults (16 questions, 256 tokens, 5 values of η).
"""
import argparse
import datetime
import os
import sys

import torch

import kangaroo_ext as kx
from kangaroo_ext import training
from kangaroo_ext import training_data as data
from kangaroo_ext.benchmark import code_trees, device_name, git_commit, write_json

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", required=True, metavar="FILE.jsonl")
    p.add_argument("--num-questions", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--thresholds", type=training._floats, default=[0.1, 0.2, 0.3, 0.4, 0.6])
    p.add_argument("--max-draft", type=int, default=6)
    p.add_argument("--out", default=os.path.join(BENCH_DIR, "results", "eta_sweep.json"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("eta_sweep: needs a CUDA device", file=sys.stderr)
        return 2
    commit, dirty = git_commit()
    model, tokenizer = kx.load_default_model(device="cuda", dtype=torch.bfloat16)
    adapter = kx.load_default_adapter(model)
    opts = training.TrainOptions(thresholds=args.thresholds, eval_max_new_tokens=args.max_new_tokens,
                                 max_draft=args.max_draft, eval_warmup=1)
    texts = data.read_mt_bench_first_turns(args.questions, args.num_questions)
    report = training.measure_speed(model, tokenizer, {adapter.exit_layer: adapter}, texts, opts, say=print)
    out = {"device": device_name("cuda"), "date": datetime.datetime.now(datetime.timezone.utc)
           .isoformat(timespec="seconds"), "commit": commit, "dirty": dirty, "code_trees": code_trees(),
           "torch": torch.__version__, "dtype": "bfloat16", **report}
    write_json(args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
