"""Pure-PyTorch references: the definition of every op. CUDA and Triton versions are tested against these.

Each function is short on purpose; shapes are in the comments. Rounding follows Hugging Face's Llama
modules step by step, so that in fp32 the engine reproduces transformers and in bf16/fp16 the fused
kernels can match the reference to within its own rounding error.
"""
from typing import List, Optional, Tuple

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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_append_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope_cos: torch.Tensor,
                          rope_sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, scale: float, window: int = 0) -> torch.Tensor:
    """RoPE on q and k, append k and v to the static cache at `positions`, causal attention over the cache.

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] (Hq = G * Hkv: query head h reads kv head h // G);
    rope_cos, rope_sin: [S, D] float32 tables; positions: [B, T] int64, consecutive per row;
    k_cache, v_cache: [B, Hkv, S, D], written in place; window > 0 limits keys to the last `window`.
    Key s is visible to the query at position p iff s <= p (and s > p - window). Returns [B, T, Hq*D].
    """
    B, T, Hq, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    cos = rope_cos[positions].to(q.dtype)[:, :, None, :]                  # [B, T, 1, D]
    sin = rope_sin[positions].to(q.dtype)[:, :, None, :]
    q = q * cos + rotate_half(q) * sin                                    # HF rounding: in q.dtype
    k = k * cos + rotate_half(k) * sin
    idx = positions[:, None, :, None].expand(B, Hkv, T, D)                # [B, Hkv, T, D]
    k_cache.scatter_(2, idx, k.transpose(1, 2))
    v_cache.scatter_(2, idx, v.transpose(1, 2))
    G = Hq // Hkv
    qg = q.transpose(1, 2).reshape(B, Hkv, G * T, D)                      # GQA without repeating K/V
    key_pos = torch.arange(S, device=q.device)
    qpos = positions.repeat(1, G)[:, None, :, None]                       # [B, 1, G*T, 1]
    mask = key_pos <= qpos
    if window > 0:
        mask &= key_pos > qpos - window
    out = torch.nn.functional.scaled_dot_product_attention(qg, k_cache, v_cache, attn_mask=mask, scale=scale)
    return out.reshape(B, Hq, T, D).transpose(1, 2).reshape(B, T, Hq * D)


def lm_head_argmax(hidden: torch.Tensor, lm_head: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy token and its softmax probability, from logits rounded to the model dtype as HF's lm_head.

    hidden: [B, T, H]; lm_head: [V, H]. Returns token [B, T] int64 and confidence [B, T] float32.
    """
    logits = torch.nn.functional.linear(hidden, lm_head).float()          # [B, T, V]
    top = logits.max(dim=-1)
    conf = 1.0 / torch.exp(logits - top.values[..., None]).sum(dim=-1)    # max softmax probability
    return logits.argmax(dim=-1), conf


# ---- the decode-time linear layers (few rows: batch-invariant GEMV kernels on the GPU) -------------

def rms_norm_linear(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor, eps: float,
                    weights: List[torch.Tensor], biases: List[Optional[torch.Tensor]]
                    ) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """fused_add_rms_norm, then one F.linear per weight on the normed rows (e.g. q, k, v projections).

    x, residual: [..., K]; norm_weight: [K]; weights[i]: [N_i, K]; biases[i]: [N_i] or None.
    Returns ([out_i [..., N_i]], residual_out [..., K]), x's dtype.
    """
    normed, residual_out = fused_add_rms_norm(x, residual, norm_weight, eps)
    return [torch.nn.functional.linear(normed, w, b) for w, b in zip(weights, biases)], residual_out


def rms_norm_gate_up(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor, eps: float,
                     gate: torch.Tensor, up: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The MLP's input half: act = silu(normed @ gate^T) * (normed @ up^T), rounded as HF's LlamaMLP.

    x, residual: [..., K]; norm_weight: [K]; gate, up: [I, K]. Returns (act [..., I], residual_out [..., K]).
    """
    normed, residual_out = fused_add_rms_norm(x, residual, norm_weight, eps)
    f = torch.nn.functional
    return f.silu(f.linear(normed, gate)) * f.linear(normed, up), residual_out


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear for the few rows of a decode or verify step. x: [..., K]; weight: [N, K]; bias: [N] or None."""
    return torch.nn.functional.linear(x, weight, bias)
