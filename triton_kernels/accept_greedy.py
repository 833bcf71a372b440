"""The greedy accept rule on the target's tokens, in Triton (the definition is kangaroo_ext/ops/reference.py).

For each batch row b, with t_j = target_tokens[b, j] (the target's argmax at position j):
    a = number of leading j < n_b with draft[b, j] == t_j        (n_b = clamp(num_drafted[b], 0, k))
    committed[b, j] = draft[b, j] (j < a), t_a (j == a), -1 (j > a)

verify_accept's second launch on its own: the engine's greedy verify takes t from the fused LM head +
argmax, so there are no logits to reduce. One program per batch row, walking the row in chunks of at
most MAX_BLOCK_K positions (k can be up to 2^20); torch allocations only, no host sync, so the launch
can be captured in a CUDA graph.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..ops import validate

# Positions a program holds at once: a round drafts a handful, so one chunk covers every real call;
# the cap only keeps a huge k from asking for a huge block.
MAX_BLOCK_K = 1024


@triton.jit
def _accept_greedy_kernel(draft_ptr, target_ptr, num_drafted_ptr, accepted_ptr, committed_ptr, K,
                          HAS_NUM_DRAFTED: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_K)
    if HAS_NUM_DRAFTED:
        n = tl.load(num_drafted_ptr + b)
        n = tl.minimum(tl.maximum(n, 0), K)  # clamp to [0, k], as the reference does
    else:
        n = tl.full((), K, tl.int64)
    # a = the first position that stops the prefix: j == n, or a draft that differs from t_j. Lanes
    # past k read nothing and cannot stop it below n (n <= k). A tensor, not K itself: Triton makes an
    # int argument equal to 1 a constant, and a loop-carried value must keep one type.
    a = tl.full((), K, tl.int64)
    for start in range(0, K, BLOCK_K):
        j = start + lanes
        is_draft = j < K
        draft = tl.load(draft_ptr + b * K + j, mask=is_draft, other=-1)
        target = tl.load(target_ptr + b * (K + 1) + j, mask=is_draft, other=-1)
        stop = ((draft != target) | (j >= n)) & is_draft
        a = tl.minimum(a, tl.min(tl.where(stop, j.to(tl.int64), K), axis=0))
    a = tl.minimum(a, n)
    for start in range(0, K + 1, BLOCK_K):
        j = start + lanes
        in_row = j < K + 1
        draft = tl.load(draft_ptr + b * K + j, mask=j < K, other=-1)
        target = tl.load(target_ptr + b * (K + 1) + j, mask=in_row, other=-1)
        committed = tl.where(j < a, draft, tl.where(j == a, target, -1))
        tl.store(committed_ptr + b * (K + 1) + j, committed, mask=in_row)
    tl.store(accepted_ptr + b, a)


def accept_greedy(draft_tokens: torch.Tensor, target_tokens: torch.Tensor,
                  num_drafted: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy accept on tokens; returns (accepted [B] int64, committed [B, k+1] int64).

    draft_tokens: [B, k] int64; target_tokens: [B, k+1] int64; num_drafted: [B] int64 or None (= k).
    """
    validate.accept_greedy(draft_tokens, target_tokens, num_drafted)
    B, k = draft_tokens.shape
    device = draft_tokens.device
    accepted = torch.empty((B,), dtype=torch.int64, device=device)
    committed = torch.empty((B, k + 1), dtype=torch.int64, device=device)
    block_k = min(triton.next_power_of_2(k + 1), MAX_BLOCK_K)
    _accept_greedy_kernel[(B,)](
        draft_tokens, target_tokens,
        num_drafted if num_drafted is not None else draft_tokens,  # dummy, unread when HAS_NUM_DRAFTED=False
        accepted, committed, k,
        HAS_NUM_DRAFTED=num_drafted is not None,
        BLOCK_K=block_k,
        num_warps=1 if block_k <= 64 else 4,  # int64 compares: a few lanes per position are plenty
    )
    return accepted, committed
