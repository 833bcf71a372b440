"""Repetition loops in the target's greedy answers: how to find them, measure them and cut them.

Two definitions, each for its own job:

- **Looping suffix** (the cut): an answer ends in a loop when, from some index s to its end, every token
  equals the token one period p earlier (a[i] == a[i - p] for all i >= s, 1 <= p <= max_period), and the
  periodic part a[s - p:] spans at least `min_repeats` periods and `min_loop_tokens` tokens. The loop
  starts at s - p (its first period). Greedy decoding that falls into such a loop never leaves it: the
  answer runs to the token cap. `cut_loop` keeps the first `keep_periods` periods and drops the rest, so
  the adapter still learns that text repeats, without hundreds of copies of the same easy tokens.
  An answer without a looping suffix is returned unchanged (the same list).

- **Repeated n-gram** (the measurement): an answer token is "repeated" when it lies inside an n-gram that
  already started at an earlier index of the same answer. This also counts near-loops (numbered lists,
  loops with a changing counter) that are not exactly periodic.

    loop = looping_suffix(answer)            # LoopSpan(start, period) or None
    kept = cut_loop(answer, keep_periods=2)  # answer[:loop.start + 2 * loop.period], or answer itself
    mask = repeated_ngram_mask(answer, 16)   # [L] bool
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

MAX_PERIOD = 256          # longer "periods" are paragraphs repeated, which the n-gram measure catches
MIN_REPEATS = 3           # a suffix that repeats only twice can be a legitimate parallel sentence
MIN_LOOP_TOKENS = 48


@dataclass(frozen=True)
class LoopSpan:
    start: int    # index of the loop's first token (the first period starts here)
    period: int   # tokens per repetition


def _check(tokens, name="answer"):
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1:
            raise ValueError(f"{name} must be a 1-D sequence of token ids, got shape {tuple(tokens.shape)}")
        return tokens.tolist()
    return list(tokens)


def looping_suffix(answer: Sequence[int], max_period: int = MAX_PERIOD, min_repeats: int = MIN_REPEATS,
                   min_loop_tokens: int = MIN_LOOP_TOKENS) -> Optional[LoopSpan]:
    """Reference (pure Python). answer: [L] token ids. The longest periodic suffix (the earliest start;
    ties: the smallest period), or None when none is long enough."""
    a = _check(answer)
    if max_period < 1 or min_repeats < 2 or min_loop_tokens < 1:
        raise ValueError(f"need max_period >= 1, min_repeats >= 2, min_loop_tokens >= 1; got {max_period}, "
                         f"{min_repeats}, {min_loop_tokens}")
    n, best = len(a), None
    for p in range(1, min(max_period, n // min_repeats) + 1):
        i = n - 1
        while i >= p and a[i] == a[i - p]:                  # the run where a[i] == a[i - p], from the end
            i -= 1
        start = i + 1 - p if i >= p else 0                  # first token of the first period
        length = n - start
        if length >= max(min_loop_tokens, min_repeats * p) and (best is None or start < best.start):
            best = LoopSpan(start, p)
    return best


def looping_suffix_batch(answers: List[Sequence[int]], max_period: int = MAX_PERIOD,
                         min_repeats: int = MIN_REPEATS, min_loop_tokens: int = MIN_LOOP_TOKENS
                         ) -> List[Optional[LoopSpan]]:
    """The same in PyTorch (one [P, L] comparison per answer), equal to looping_suffix answer by answer: a
    second, independent form the tests hold the reference to. The reference is the faster one on a CPU
    (its scans stop at the first mismatch): 2.7 s vs 17 s over the 9,104 answers."""
    out = []
    for answer in answers:
        a = torch.as_tensor(_check(answer), dtype=torch.int64)
        n = a.numel()
        top = min(max_period, n // min_repeats)
        if top < 1:
            out.append(None)
            continue
        p = torch.arange(1, top + 1)                                           # [P]
        i = torch.arange(n)                                                     # [L]
        prev = a[(i[None, :] - p[:, None]).clamp_min(0)]                        # [P, L]: a[i - p]
        differ = (a[None, :] != prev) | (i[None, :] < p[:, None])               # [P, L]; i < p: no earlier token
        last_diff = torch.where(differ, i[None, :], torch.full_like(prev, -1)).amax(1)  # [P]
        start = torch.where(last_diff >= p, last_diff + 1 - p, torch.zeros_like(p))
        ok = (n - start) >= torch.clamp(min_repeats * p, min=min_loop_tokens)
        if not bool(ok.any()):
            out.append(None)
            continue
        start = torch.where(ok, start, torch.full_like(start, n + 1))
        k = int(start.argmin())                                                 # earliest; ties: smallest p
        out.append(LoopSpan(int(start[k]), int(p[k])))
    return out


def cut_loop(answer: Sequence[int], keep_periods: int = 2, loop: Optional[LoopSpan] = None, **find) -> list:
    """answer up to the end of its loop's `keep_periods`-th period; an answer without a looping suffix
    comes back unchanged (the very list given). loop: a looping_suffix result already computed."""
    if not isinstance(keep_periods, int) or keep_periods < 1:
        raise ValueError(f"keep_periods must be an int >= 1 (periods of a loop kept), got {keep_periods!r}")
    loop = loop if loop is not None else looping_suffix(answer, **find)
    if loop is None:
        return answer
    return list(answer[:loop.start + keep_periods * loop.period])


def cut_loops(sequences, keep_periods: int, **find):
    """(prompt, answer) pairs with every answer's loop cut (cut_loop); returns (pairs, tokens removed,
    answers cut)."""
    loops = [looping_suffix(a, **find) for _, a in sequences]
    out, removed, cut = [], 0, 0
    for (p, a), loop in zip(sequences, loops):
        kept = cut_loop(a, keep_periods, loop=loop) if loop is not None else a
        removed += len(a) - len(kept)
        cut += len(kept) < len(a)
        out.append((p, kept))
    return out, removed, cut


def repeated_ngram_mask(answer: Sequence[int], n: int) -> List[bool]:
    """Reference. [L] bools: token i lies inside an n-gram a[j:j+n] (j <= i < j + n) that already
    started at some earlier index k < j."""
    a = _check(answer)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen, mask = set(), [False] * len(a)
    for j in range(len(a) - n + 1):
        gram = tuple(a[j:j + n])
        if gram in seen:
            for i in range(j, j + n):
                mask[i] = True
        else:
            seen.add(gram)
    return mask


def repeated_target_mask(sequences, loss_on_prompt: bool, n: int = 16) -> torch.Tensor:
    """[n_loss] bool in a DistillCache's target-row order: the target token lies inside a repeated n-gram of
    its answer (repeated_ngram_mask; prompt targets are never looping). Evaluation splits agreement on it."""
    out = []
    for p, a in sequences:
        prompt_targets = 0 if not loss_on_prompt else len(p) - 1        # targets t+1 that are prompt tokens
        out += [False] * prompt_targets + repeated_ngram_mask(a, n)
    return torch.tensor(out, dtype=torch.bool)
