"""Greedy accept and the engine's commit in one Triton launch (the definition is
kangaroo_ext/ops/reference.py: accept_commit; the CUDA kernel is csrc/kernels/accept_commit.cuh).

For each batch row b (one program; k + 1 <= 64 columns in one block):
    a_b = the longest prefix of draft_tokens[b, :n_b] equal to target_tokens[b, :n_b]
          (n_b = clamp(num_drafted[b], 0, k))
    committed_b = draft_tokens[b, :a_b], target_tokens[b, a_b], then -1 (k + 1 tokens)
    history[b, L_b + 1 + j] = committed_b[j]; report[b] = [a_b, num_drafted[b], committed_b...]
    cache_len[b] += a_b + 1; tokens_in[b, 0] = target_tokens[b, a_b]
torch allocations only, no host sync: the launch can be captured in a CUDA graph.
"""
import torch
import triton
import triton.language as tl

from ..ops import validate

BLOCK_K = 64  # k + 1 <= 64: one block holds a row's drafts and targets


@triton.jit
def _accept_commit_kernel(drafts_ptr, targets_ptr, num_drafted_ptr, cache_len_ptr, tokens_in_ptr, history_ptr,
                          report_ptr, k, tokens_in_stride, history_len, report_width, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_K).to(tl.int64)
    d = tl.load(drafts_ptr + b * k + j, mask=j < k, other=-1)
    t = tl.load(targets_ptr + b * (k + 1) + j, mask=j <= k, other=-1)
    drafted = tl.load(num_drafted_ptr + b)
    n = tl.minimum(tl.maximum(drafted, 0), k)
    a = tl.min(tl.where((j < n) & (d != t), j, n), axis=0)               # the first mismatch, or n
    committed = tl.where(j < a, d, tl.where(j == a, t, -1))
    target_at_a = tl.sum(tl.where(j == a, t, 0), axis=0)
    length = tl.load(cache_len_ptr + b)
    at = length + 1 + j
    tl.store(history_ptr + b * history_len + at, committed, mask=(j <= k) & (at >= 0) & (at < history_len))
    tl.store(report_ptr + b * report_width + 2 + j, committed, mask=j <= k)
    tl.store(report_ptr + b * report_width, a)
    tl.store(report_ptr + b * report_width + 1, drafted)
    tl.store(cache_len_ptr + b, length + a + 1)
    tl.store(tokens_in_ptr + b * tokens_in_stride, target_at_a)


def accept_commit(draft_tokens: torch.Tensor, target_tokens: torch.Tensor, num_drafted: torch.Tensor,
                  cache_len: torch.Tensor, tokens_in: torch.Tensor, history: torch.Tensor,
                  report: torch.Tensor) -> None:
    """Writes cache_len, tokens_in, history and report in place (shapes as ops.accept_commit's)."""
    validate.accept_commit(draft_tokens, target_tokens, num_drafted, cache_len, tokens_in, history, report)
    B, k = target_tokens.shape[0], target_tokens.shape[1] - 1
    _accept_commit_kernel[(B,)](draft_tokens, target_tokens, num_drafted, cache_len, tokens_in, history, report, k,
                                tokens_in.shape[1], history.shape[1], report.shape[1], BLOCK_K=BLOCK_K, num_warps=1)
