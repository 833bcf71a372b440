"""Public functional ops. Each validates its arguments, then runs on the chosen backend.

    out, residual_out = fused_add_rms_norm(x, residual, weight, eps, backend=None)
    accepted, committed = verify_accept(draft_tokens, target_logits, num_drafted=None, backend=None)

    out = rope_append_attention(q, k, v, rope_cos, rope_sin, positions, k_cache, v_cache, scale, window=0)
    token, confidence = lm_head_argmax(hidden, lm_head)

    outs, residual_out = rms_norm_linear(x, residual, norm_weight, eps, weights, biases)
    act, residual_out = rms_norm_gate_up(x, residual, norm_weight, eps, gate, up)
    out = decode_linear(x, weight, bias)

`backend` is "cuda", "triton", "reference" or None/"auto" (default; KANGAROO_BACKEND overrides None).
"""
from typing import List, Optional, Tuple

import torch

from . import reference, schemas, validate  # noqa: F401  (schemas registers torch.ops.kangaroo.*)
from .backends import (ORDER, BackendUnavailable, available_backends, reasons_against, register,  # noqa: F401
                       select, tensor_reasons, triton_module)


# ---- where each op lives ---------------------------------------------------------------------------
# Every op: a CUDA launcher (csrc/, validates and launches) over a torch-free kernel header
# (csrc/kernels/), a Triton version (triton_kernels/, installed as kangaroo_ext.triton_kernels) and the
# PyTorch reference (ops/reference.py, the definition, under the op's own name). Files are shared by ops
# of one family: the decode GEMVs, say. README.md's Backends section shows the same table.
OP_FILES = {
    "fused_add_rms_norm": dict(cuda="csrc/rms_norm.cu", kernel="csrc/kernels/rms_norm.cuh",
                               triton="triton_kernels/rms_norm.py"),
    "rms_norm_linear": dict(cuda="csrc/decode_linear.cu", kernel="csrc/kernels/decode_linear.cuh",
                            triton="triton_kernels/decode_linear.py"),
    "rms_norm_gate_up": dict(cuda="csrc/decode_linear.cu", kernel="csrc/kernels/decode_linear.cuh",
                             triton="triton_kernels/decode_linear.py"),
    "decode_linear": dict(cuda="csrc/decode_linear.cu", kernel="csrc/kernels/decode_linear.cuh",
                          triton="triton_kernels/decode_linear.py"),
    "rope_append_attention": dict(cuda="csrc/attention.cu", kernel="csrc/kernels/attention.cuh",
                                  triton="triton_kernels/attention.py"),
    "lm_head_argmax": dict(cuda="csrc/lm_head.cu", kernel="csrc/kernels/lm_head.cuh",
                           triton="triton_kernels/lm_head.py"),
    "verify_accept": dict(cuda="csrc/verify_accept.cu", kernel="csrc/kernels/verify_accept.cuh",
                          triton="triton_kernels/verify_accept.py"),
}


# ---- fused residual-add + RMSNorm ----------------------------------------------------------------

def fused_add_rms_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                       eps: float = 1e-6, *, backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """residual_out = x + residual (x if residual is None); out = weight * RMSNorm(residual_out).

    Args:
        x: [..., H], float32 / float16 / bfloat16, contiguous.
        residual: [..., H] like x, or None.
        weight: [H], x's dtype.
        eps: added to the mean square.
    Returns:
        (out [..., H], residual_out [..., H]), x's dtype. Rounding as in HF's LlamaRMSNorm.
    """
    validate.fused_add_rms_norm(x, residual, weight, eps)
    return select("fused_add_rms_norm", backend, x, residual, weight, eps)(x, residual, weight, float(eps))


def _rms_reasons(backend):
    def reasons(x, residual, weight, eps):
        return tensor_reasons(backend, {"x": x, "residual": residual, "weight": weight})
    return reasons


# ---- greedy verify-and-accept --------------------------------------------------------------------

def verify_accept(draft_tokens: torch.Tensor, target_logits: torch.Tensor,
                  num_drafted: Optional[torch.Tensor] = None, *,
                  backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification of a chain of drafts, on the device (no host sync).

    Args:
        draft_tokens: [B, k] int64, k >= 1.
        target_logits: [B, k+1, V]; row j scores the token after draft j-1 (row 0: after the last
            committed token).
        num_drafted: [B] int64, drafts actually proposed per row (the rest are padding); None = k.
    Returns:
        accepted [B] int64: length a of the longest prefix where draft == argmax(target_logits).
        committed [B, k+1] int64: drafts[:a], then argmax(target_logits[:, a]), then -1.
    """
    validate.verify_accept(draft_tokens, target_logits, num_drafted)
    return select("verify_accept", backend, draft_tokens, target_logits, num_drafted)(
        draft_tokens, target_logits, num_drafted)


def _verify_reasons(backend):
    def reasons(draft_tokens, target_logits, num_drafted):
        return tensor_reasons(backend, {"draft_tokens": draft_tokens, "target_logits": target_logits,
                                        "num_drafted": num_drafted})
    return reasons


# ---- decode / verify attention over the static KV cache ------------------------------------------

def rope_append_attention(q, k, v, rope_cos, rope_sin, positions, k_cache, v_cache, scale: float,
                          window: int = 0, *, backend: Optional[str] = None) -> torch.Tensor:
    """RoPE on q and k, append k and v to the static cache at device-side positions, causal attention.

    Args:
        q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] (Hkv divides Hq; query head h reads kv head h // (Hq/Hkv)).
        rope_cos, rope_sin: [S', D] float32 tables (HF layout: the two halves repeat the frequencies), S' >= S.
        positions: [B, T] int64, consecutive per row, < S: where k/v are written and what q may see.
        k_cache, v_cache: [B, Hkv, S, D], updated in place.
        scale: softmax scale (HF's `scaling`); window: sliding window (0 = none).
    Returns:
        [B, T, Hq * D]: attention output of every query over keys s <= its position.
    """
    validate.rope_append_attention(q, k, v, rope_cos, rope_sin, positions, k_cache, v_cache, scale, window)
    args = (q, k, v, rope_cos, rope_sin, positions, k_cache, v_cache, float(scale), int(window))
    return select("rope_append_attention", backend, *args)(*args)


def _attention_reasons(backend):
    def reasons(q, k, v, rope_cos, rope_sin, positions, k_cache, v_cache, scale, window):
        return tensor_reasons(backend, {"q": q, "k": k, "v": v, "rope_cos": rope_cos, "rope_sin": rope_sin,
                                        "positions": positions, "k_cache": k_cache, "v_cache": v_cache})
    return reasons


# ---- fused LM head + argmax + confidence (the draft's head) ---------------------------------------

def lm_head_argmax(hidden: torch.Tensor, lm_head: torch.Tensor, *,
                   backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy token and its softmax probability without writing the logits to memory.

    Args:
        hidden: [..., H]; lm_head: [V, H], same dtype.
    Returns:
        token [...] int64 (argmax of the logits rounded to the model dtype, first index on ties) and
        confidence [...] float32 (the top token's softmax probability).
    """
    validate.lm_head_argmax(hidden, lm_head)
    return select("lm_head_argmax", backend, hidden, lm_head)(hidden, lm_head)


def _head_reasons(backend):
    def reasons(hidden, lm_head):
        return tensor_reasons(backend, {"hidden": hidden, "lm_head": lm_head})
    return reasons


# ---- decode-time linear layers: batch-invariant GEMV with fused prologues/epilogues ----------------
# A decode step multiplies 1..γ+1 rows by each weight matrix: memory- and launch-bound. These ops read
# every weight once for all rows, fuse the residual add + RMSNorm into the prologue and SiLU·mul into
# the epilogue, and compute each row with the same reduction order whatever the number of rows, so a
# verify step over k+1 positions rounds exactly like k+1 single-token steps (the GEMV part of it).

def rms_norm_linear(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor, eps: float,
                    weights: List[torch.Tensor], biases: Optional[List[Optional[torch.Tensor]]] = None, *,
                    backend: Optional[str] = None) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """fused_add_rms_norm followed by 1-3 linear layers on the normed rows (q, k, v in one launch).

    Args:
        x, residual: [..., K] (residual may be None); norm_weight: [K]; eps: RMSNorm epsilon.
        weights: list of [N_i, K]; biases: list of [N_i] or None (None: no biases).
    Returns:
        ([out_i [..., N_i]], residual_out [..., K]), x's dtype.
    """
    biases = [None] * len(weights) if biases is None else list(biases)
    weights = list(weights)
    validate.rms_norm_linear(x, residual, norm_weight, eps, weights, biases)
    args = (x, residual, norm_weight, float(eps), weights, biases)
    outs, residual_out = select("rms_norm_linear", backend, *args)(*args)
    return list(outs), residual_out


def rms_norm_gate_up(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor, eps: float,
                     gate: torch.Tensor, up: torch.Tensor, *,
                     backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """fused_add_rms_norm, then the MLP's gated input: silu(normed @ gate^T) * (normed @ up^T).

    Args:
        x, residual: [..., K] (residual may be None); norm_weight: [K]; gate, up: [I, K].
    Returns:
        (act [..., I], residual_out [..., K]), x's dtype, rounded as HF's LlamaMLP.
    """
    validate.rms_norm_gate_up(x, residual, norm_weight, eps, gate, up)
    args = (x, residual, norm_weight, float(eps), gate, up)
    return select("rms_norm_gate_up", backend, *args)(*args)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                  backend: Optional[str] = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for the few rows of a decode or verify step.

    Args:
        x: [..., K]; weight: [N, K]; bias: [N] or None.
    Returns:
        [..., N], x's dtype.
    """
    validate.decode_linear(x, weight, bias)
    return select("decode_linear", backend, x, weight, bias)(x, weight, bias)


def _linear_reasons(backend):
    def reasons(x, residual, norm_weight, eps, weights, biases):
        named = {"x": x, "residual": residual, "norm_weight": norm_weight}
        named.update({f"weights[{i}]": w for i, w in enumerate(weights)})
        named.update({f"biases[{i}]": b for i, b in enumerate(biases)})
        return tensor_reasons(backend, named)
    return reasons


def _gate_up_reasons(backend):
    def reasons(x, residual, norm_weight, eps, gate, up):
        return tensor_reasons(backend, {"x": x, "residual": residual, "norm_weight": norm_weight, "gate": gate,
                                        "up": up})
    return reasons


def _decode_linear_reasons(backend):
    def reasons(x, weight, bias):
        return tensor_reasons(backend, {"x": x, "weight": weight, "bias": bias})
    return reasons


# ---- registrations -------------------------------------------------------------------------------

def _cuda(name):
    return lambda *args: getattr(torch.ops.kangaroo, name)(*args)


def _triton(name):
    return lambda *args: getattr(triton_module(), name)(*args)


for _name, _reasons in (("fused_add_rms_norm", _rms_reasons), ("verify_accept", _verify_reasons),
                        ("rope_append_attention", _attention_reasons), ("lm_head_argmax", _head_reasons),
                        ("rms_norm_linear", _linear_reasons), ("rms_norm_gate_up", _gate_up_reasons),
                        ("decode_linear", _decode_linear_reasons)):
    register(_name, "cuda", _cuda(_name), _reasons("cuda"))
    register(_name, "triton", _triton(_name), _reasons("triton"))
    register(_name, "reference", getattr(reference, _name), _reasons("reference"))
