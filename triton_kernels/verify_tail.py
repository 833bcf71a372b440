"""A greedy step's end on Triton (the definition is kangaroo_ext/ops/reference.py: verify_tail; the CUDA
version, csrc/kernels/verify_tail.cuh, fuses it into two launches):

    y = fused_add_rms_norm(x, residual, norm_weight, eps)      [B, T, H]
    target_tokens = lm_head_argmax(y, lm_head)                 [B, T]
    accept_commit(draft_tokens, target_tokens, ...)            in place

Here it is this package's three kernels in a row (four launches, y in memory): each is the Triton version of
the op it stands for, so the result is theirs, and the launches can be captured in a CUDA graph.
"""
import torch

from ..ops import validate
from .accept_commit import accept_commit
from .lm_head import lm_head_argmax
from .rms_norm import fused_add_rms_norm


def verify_tail(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                lm_head: torch.Tensor, draft_tokens: torch.Tensor, num_drafted: torch.Tensor,
                cache_len: torch.Tensor, tokens_in: torch.Tensor, history: torch.Tensor,
                report: torch.Tensor) -> torch.Tensor:
    """Returns target_tokens [B, T] int64 and writes the commit's buffers (shapes as ops.verify_tail's)."""
    validate.verify_tail(x, residual, norm_weight, eps, lm_head, draft_tokens, num_drafted, cache_len, tokens_in,
                         history, report)
    y, _ = fused_add_rms_norm(x, residual, norm_weight, eps)
    target_tokens, _ = lm_head_argmax(y, lm_head)
    accept_commit(draft_tokens, target_tokens, num_drafted, cache_len, tokens_in, history, report)
    return target_tokens
