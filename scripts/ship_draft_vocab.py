"""Give the shipped adapter a reduced draft vocabulary and per-device recommended settings, from a CPU or
GPU sweep (bench/cpu_sweep.py), without retraining it: the draft head becomes the [N, H] rows of the
target's LM head for the N most frequent tokens of the target's own answers to training prompts.
Lossless whatever N (verification keeps the full head); it only changes what the draft can propose.

    python scripts/ship_draft_vocab.py --answers .carry/answers_cpu.pt --prompt-file ../shared/data/train_prompts.jsonl \\
        --size 8192 --device cpu --threshold 0.3 --max-draft 3 --sweep bench/results/cpu_sweep.json
"""
import argparse
import json
import os
import sys

import torch

from kangaroo_ext import io
from kangaroo_ext.adapter import Adapter
from kangaroo_ext.default_model import ADAPTER_DIR
from kangaroo_ext.training.data import unpack_sequences
from kangaroo_ext.training.draft import DraftVocab


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--answers", required=True, help="answers as saved by kangaroo train (--data) or a pairs file")
    p.add_argument("--prompt-file", default=None, help="training prompts: rank the tokens the answers never use")
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--device", choices=["cpu", "cuda"], required=True, help="the device the settings were measured on")
    p.add_argument("--threshold", type=float, required=True)
    p.add_argument("--max-draft", type=int, required=True)
    p.add_argument("--sweep", required=True, help="the sweep's result file the settings come from")
    p.add_argument("--adapter", default=ADAPTER_DIR)
    args = p.parse_args(argv)
    saved = torch.load(args.answers, map_location="cpu", weights_only=False)
    pairs = saved["pairs"] if "pairs" in saved else unpack_sequences(saved["sequences"])
    adapter = Adapter.from_pretrained(args.adapter)
    V = adapter.config["target"]["vocab_size"]
    prompts = [p for p, _ in pairs]
    if args.prompt_file:
        from transformers import AutoTokenizer  # noqa: F401  (the default model's tokenizer, from its cache)
        import kangaroo_ext as kx
        _, tok = kx.load_default_model(device="cpu")
        prompts += [tok(t, add_special_tokens=False)["input_ids"]
                    for t in io.read_prompts(args.prompt_file, strict=False)[0]]
    held = max(1, len(pairs) // 10)  # coverage measured on answers the vocabulary was not built from
    vocab_check = DraftVocab.most_frequent([a for _, a in pairs[:-held]], args.size, V, also=prompts)
    coverage = float(vocab_check.covers(torch.tensor([t for _, a in pairs[-held:] for t in a])).float().mean())
    vocab = DraftVocab.most_frequent([a for _, a in pairs], args.size, V, also=prompts)
    adapter.with_draft_vocab(vocab.ids)
    with open(args.sweep) as f:
        sweep = json.load(f)
    adapter.config["draft_vocab"] = {
        "size": args.size, "source": f"the {args.size} most frequent tokens of the target's greedy answers to "
                                     f"{len(pairs)} training prompts ({sum(len(a) for _, a in pairs)} tokens), "
                                     "then of the training prompts",
        "heldout_answer_coverage": round(coverage, 4)}
    recommended = adapter.config.setdefault("recommended", {})
    recommended.setdefault("cuda", {"threshold": adapter.config.get("recommended_threshold", 0.3), "max_draft": 6,
                                    "measured": "full vocabulary, H200, commit fff160a (MT-bench)"})
    recommended[args.device] = {"threshold": args.threshold, "max_draft": args.max_draft,
                                "measured": f"{sweep.get('device')}, commit {str(sweep.get('commit'))[:7]}, "
                                            f"{os.path.basename(args.sweep)}"}
    adapter.save_pretrained(args.adapter)
    print(f"draft vocabulary {args.size} (held-out answer coverage {coverage:.3f}); "
          f"recommended on {args.device}: η {args.threshold}, γ {args.max_draft} -> {args.adapter}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
