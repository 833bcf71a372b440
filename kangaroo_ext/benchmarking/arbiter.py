"""Who is right when two greedy continuations of one prompt differ: the same model in float64 decides.

Used by bench/fp32_arbiter.py and tests/test_fp32_transformers.py to compare the engine's fp32 output
with transformers' own."""
from typing import List, Optional, Sequence

import torch


def first_difference(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    """The first position where token lists a and b differ, or None if they are equal. A list that is a
    strict prefix of the other (one side stopped at EOS, say) differs at the shorter one's length."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.no_grad()
def arbitrate(model64, ids: torch.Tensor, ours: List[int], theirs: List[int],
              names=("engine", "transformers")) -> Optional[dict]:
    """None if ours == theirs; else where they first differ (`position`), each side's token there (None
    where a side had stopped), the float64 argmax and top-2 gap at that position, and `verdict`: which
    side follows float64 ('<name>_right'), or 'neither'. ids: [1, T] prompt on model64's device."""
    k = first_difference(ours, theirs)
    if k is None:
        return None
    logits = model64(ids.new_tensor([ids[0].tolist() + ours[:k]])).logits[0, -1]
    top2 = logits.topk(2)
    best = int(top2.indices[0])
    row = {"position": k, "fp64_argmax": best, "fp64_top2_gap": float(top2.values[0] - top2.values[1])}
    verdict = "neither"
    for name, tokens in zip(names, (ours, theirs)):
        token = tokens[k] if k < len(tokens) else None
        row[f"{name}_token"] = token
        row[f"{name}_fp64_logit"] = None if token is None else float(logits[token])
        if token == best:
            verdict = f"{name}_right"
    row["verdict"] = verdict
    return row


def describe(row: Optional[dict], names=("engine", "transformers")) -> str:
    """One line for an arbitrate() result (assertion messages)."""
    if row is None:
        return "identical"
    sides = ", ".join(f"{n} {row[f'{n}_token']} (fp64 logit {row[f'{n}_fp64_logit']})" for n in names)
    return (f"first difference at new token {row['position']}: {sides}; fp64 argmax {row['fp64_argmax']} "
            f"(top-2 gap {row['fp64_top2_gap']:.3g}): {row['verdict']}")
