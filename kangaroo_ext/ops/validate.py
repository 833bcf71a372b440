"""Argument checks shared by every backend's Python entry point: bad input raises ValueError naming
the argument and what was expected (the CUDA launchers repeat these as TORCH_CHECKs)."""
from typing import Optional

import torch

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _contiguous(name, t):
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got strides {tuple(t.stride())} for shape {tuple(t.shape)})")


def _same_device(name, t, ref_name, ref):
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; expected one device")


def fused_add_rms_norm(x, residual: Optional[torch.Tensor], weight, eps):
    _tensor("x", x)
    if x.dtype not in FLOATS:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0 or x.numel() == 0:
        raise ValueError(f"x must have shape [..., H] with H >= 1 and no empty dimension, got {tuple(x.shape)}")
    _contiguous("x", x)
    if residual is not None:
        _tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise ValueError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
        _same_device("residual", residual, "x", x)
        _contiguous("residual", residual)
    _tensor("weight", weight)
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must have shape [{x.shape[-1]}] (x's last dimension), got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    _same_device("weight", weight, "x", x)
    _contiguous("weight", weight)
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")


def verify_accept(draft_tokens, target_logits, num_drafted: Optional[torch.Tensor]):
    _tensor("draft_tokens", draft_tokens)
    if draft_tokens.dtype != torch.int64 or draft_tokens.dim() != 2 or draft_tokens.shape[1] < 1:
        raise ValueError(f"draft_tokens must be int64 of shape [B, k] with k >= 1, got "
                         f"{draft_tokens.dtype} {tuple(draft_tokens.shape)}")
    B, k = draft_tokens.shape
    if B < 1:
        raise ValueError("draft_tokens must have at least one row (B >= 1)")
    _contiguous("draft_tokens", draft_tokens)
    _tensor("target_logits", target_logits)
    if target_logits.dtype not in FLOATS:
        raise ValueError(f"target_logits must be float32, float16 or bfloat16, got {target_logits.dtype}")
    if target_logits.dim() != 3 or target_logits.shape[:2] != (B, k + 1) or target_logits.shape[2] < 1:
        raise ValueError(f"target_logits must have shape [B, k+1, V] = [{B}, {k + 1}, V] for draft_tokens "
                         f"[{B}, {k}], got {tuple(target_logits.shape)}")
    _same_device("target_logits", target_logits, "draft_tokens", draft_tokens)
    _contiguous("target_logits", target_logits)
    if num_drafted is not None:
        _tensor("num_drafted", num_drafted)
        if num_drafted.dtype != torch.int64 or num_drafted.shape != (B,):
            raise ValueError(f"num_drafted must be int64 of shape [{B}], got {num_drafted.dtype} "
                             f"{tuple(num_drafted.shape)}")
        _same_device("num_drafted", num_drafted, "draft_tokens", draft_tokens)
        _contiguous("num_drafted", num_drafted)
