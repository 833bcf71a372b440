"""Pure-PyTorch references: the definition of every op. CUDA and Triton versions are tested against these.

Each function is short on purpose; shapes are in the comments. Rounding follows Hugging Face's Llama
modules step by step, so that in fp32 the engine reproduces transformers and in bf16/fp16 the fused
kernels can match the reference to within its own rounding error.
"""
from typing import Optional, Tuple

import torch


def fused_add_rms_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                       eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """residual_out = x + residual (or x); out = weight * rmsnorm(residual_out).

    x, residual: [..., H]; weight: [H]. Returns (out [..., H], residual_out [..., H]), both x.dtype.
    """
    s = x if residual is None else (x.float() + residual.float()).to(x.dtype)  # the residual stream, in x.dtype
    h = s.float()
    normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    out = (weight.float() * normed.float()).to(x.dtype)  # HF: weight * normed, rounded once in x.dtype
    return out, s.clone() if residual is None else s


def verify_accept(draft_tokens: torch.Tensor, target_logits: torch.Tensor,
                  num_drafted: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification: longest prefix of drafts equal to the target's argmax, plus one token.

    draft_tokens: [B, k] int64; target_logits: [B, k+1, V]; num_drafted: [B] int64 in [0, k] or None (= k).
    target_logits[:, j] scores the token that follows draft j-1 (j = 0: follows the last committed token).
    Returns accepted [B] int64 (a) and committed [B, k+1] int64: drafts 0..a-1, then the target's
    token at position a (correction, or bonus when every draft matched), then -1.
    """
    B, k = draft_tokens.shape
    target = target_logits.argmax(dim=-1)                                  # [B, k+1]; first max wins
    n = torch.full((B,), k, dtype=torch.int64, device=draft_tokens.device) if num_drafted is None \
        else num_drafted.clamp(0, k)
    j = torch.arange(k, device=draft_tokens.device)                        # [k]
    match = (draft_tokens == target[:, :k]) & (j[None, :] < n[:, None])   # [B, k]
    accepted = match.long().cumprod(dim=1).sum(dim=1)                      # [B]
    pos = torch.arange(k + 1, device=draft_tokens.device)[None, :]         # [1, k+1]
    drafts_padded = torch.cat([draft_tokens, draft_tokens.new_full((B, 1), -1)], dim=1)
    committed = torch.where(pos < accepted[:, None], drafts_padded,
                            torch.where(pos == accepted[:, None], target, torch.full_like(target, -1)))
    return accepted, committed
