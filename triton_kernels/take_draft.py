"""A greedy draft step's bookkeeping after the draft head, in Triton (the definition is
kangaroo_ext/ops/reference.py).

For each batch row b:
    t_b = draft_ids[clamp(token[b], 0, N-1)]    (token[b] when there is no draft_ids)
    keep_b = active[b] and confidence[b] >= η   (False for a NaN confidence)
    draft_tokens[b, step] = t_b; tokens_in[b, step+1] = t_b; num_drafted[b] += keep_b; active[b] = keep_b

About nine tiny torch launches in one. Each row is a few scalar loads and stores, so one program covers
BLOCK_B rows; the clamp at N-1 only keeps an index past the draft vocabulary (which lm_head_argmax never
returns; the reference raises) from reading past draft_ids. Bool tensors are read and written as uint8
views (one byte, 0 or 1, as torch stores them). torch allocations only, no host sync, so the launch can
be captured in a CUDA graph.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops import validate

# Rows a program holds: a decode batch is a few rows, so one program covers every real call.
BLOCK_B = 128


@triton.jit
def _take_draft_kernel(token_ptr, confidence_ptr, threshold_ptr, draft_ids_ptr, active_ptr, num_drafted_ptr,
                       draft_tokens_ptr, tokens_in_ptr, keep_ptr, B, G, step, N,
                       HAS_DRAFT_IDS: tl.constexpr, BLOCK_B: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    in_batch = rows < B
    t = tl.load(token_ptr + rows, mask=in_batch, other=0)
    if HAS_DRAFT_IDS:
        t = tl.load(draft_ids_ptr + tl.minimum(tl.maximum(t, 0), N - 1), mask=in_batch, other=0)
    confidence = tl.load(confidence_ptr + rows, mask=in_batch, other=0.0)
    eta = tl.load(threshold_ptr)
    was_active = tl.load(active_ptr + rows, mask=in_batch, other=0) != 0
    keep = was_active & (confidence >= eta)           # an ordered compare: NaN is never kept
    tl.store(draft_tokens_ptr + rows * G + step, t, mask=in_batch)
    tl.store(tokens_in_ptr + rows * (G + 1) + step + 1, t, mask=in_batch)
    drafted = tl.load(num_drafted_ptr + rows, mask=in_batch, other=0)
    tl.store(num_drafted_ptr + rows, drafted + keep.to(tl.int64), mask=in_batch)
    tl.store(active_ptr + rows, keep.to(tl.uint8), mask=in_batch)
    tl.store(keep_ptr + rows, keep.to(tl.uint8), mask=in_batch)


def take_draft(token: torch.Tensor, confidence: torch.Tensor, threshold: torch.Tensor, active: torch.Tensor,
               num_drafted: torch.Tensor, draft_tokens: torch.Tensor, tokens_in: torch.Tensor, step: int,
               draft_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Record draft `step`; returns keep [B] bool (a new tensor) and writes active, num_drafted,
    draft_tokens[:, step] and tokens_in[:, step + 1] in place.

    token: [B, 1] int64; confidence: [B, 1] float32; threshold: [] float32; active: [B] bool;
    num_drafted: [B] int64; draft_tokens: [B, G] int64; tokens_in: [B, G+1] int64; draft_ids: [N] int64
    or None.
    """
    validate.take_draft(token, confidence, threshold, active, num_drafted, draft_tokens, tokens_in, step, draft_ids)
    B, G = draft_tokens.shape
    keep = torch.empty((B,), dtype=torch.bool, device=token.device)
    _take_draft_kernel[(triton.cdiv(B, BLOCK_B),)](
        token, confidence, threshold,
        draft_ids if draft_ids is not None else token,  # dummy, unread when HAS_DRAFT_IDS=False
        active.view(torch.uint8), num_drafted, draft_tokens, tokens_in, keep.view(torch.uint8),
        B, G, step, draft_ids.shape[0] if draft_ids is not None else 1,
        HAS_DRAFT_IDS=draft_ids is not None,
        BLOCK_B=BLOCK_B,
        num_warps=1,  # int64 scalars per row: one warp covers a decode batch
    )
    return keep
