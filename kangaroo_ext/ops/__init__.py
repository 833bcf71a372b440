"""Public functional ops. Each validates its arguments, then runs on the chosen backend.

    out, residual_out = fused_add_rms_norm(x, residual, weight, eps, backend=None)
    accepted, committed = verify_accept(draft_tokens, target_logits, num_drafted=None, backend=None)
    accepted, committed = accept_greedy(draft_tokens, target_tokens, num_drafted=None, backend=None)
    accept_commit(draft_tokens, target_tokens, num_drafted, cache_len, tokens_in, history, report)  # in place
    target_tokens = verify_tail(x, residual, norm_weight, eps, lm_head, draft_tokens, num_drafted, cache_len,
                                tokens_in, history, report)        # final norm + argmax + accept_commit
    keep = take_draft(token, confidence, threshold, active, num_drafted, draft_tokens, tokens_in, step,
                      draft_ids=None, backend=None)                        # writes the buffers in place

    out = rope_append_attention(q, k, v, rope_cos, rope_sin, positions, k_cache, v_cache, scale, window=0)
    token, confidence = lm_head_argmax(hidden, lm_head)

    outs, residual_out = rms_norm_linear(x, residual, norm_weight, eps, weights, biases)
    act, residual_out = rms_norm_gate_up(x, residual, norm_weight, eps, gate, up)
    out = decode_linear(x, weight, bias)

    probs = sampling_probs(logits, temperature, top_k, top_p)
    token, probs, top_prob = sample_logits(logits, temperature, top_k, top_p, rng, stream)
    accepted, committed = speculative_sample_accept(draft_tokens, draft_probs, target_logits, num_drafted,
                                                    temperature, top_k, top_p, rng)

    tokens, count, n = ngram_draft(history, length, min_ngram, max_ngram, gamma)   # copied drafts

    persistent_draft(embed, layer_weights, k_caches, v_caches, num_exit_layers, head_norm, head, draft_ids,
                     rope_cos, rope_sin, threshold, cache_len, tokens_in, draft_tokens, num_drafted, active,
                     exit_states, barrier, gamma, stop_at_exit, eps, scale, window)   # a whole draft phase

`backend` is "cuda", "triton", "reference" or None/"auto" (default; KANGAROO_BACKEND overrides None).
"""
from typing import List, Optional, Tuple

import torch

from .. import _extension
from . import reference, schemas, validate  # noqa: F401  (schemas registers torch.ops.kangaroo.*)
from .reference import ACCEPT_STREAM  # noqa: F401
from .backends import (NO_TRITON, ORDER, BackendUnavailable, available_backends,  # noqa: F401
                       reasons_against, register, select, tensor_reasons, triton_module)


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
    "accept_greedy": dict(cuda="csrc/accept_greedy.cu", kernel="csrc/kernels/accept_greedy.cuh",
                          triton="triton_kernels/accept_greedy.py"),
    "take_draft": dict(cuda="csrc/take_draft.cu", kernel="csrc/kernels/take_draft.cuh",
                       triton="triton_kernels/take_draft.py"),
    "sampling_probs": dict(cuda="csrc/sampling.cu", kernel="csrc/kernels/sampling.cuh",
                           triton="triton_kernels/sampling.py"),
    "sample_logits": dict(cuda="csrc/sampling.cu", kernel="csrc/kernels/sampling.cuh",
                          triton="triton_kernels/sampling.py"),
    "speculative_sample_accept": dict(cuda="csrc/sampling.cu", kernel="csrc/kernels/sampling.cuh",
                                      triton="triton_kernels/sampling.py"),
    "accept_commit": dict(cuda="csrc/accept_commit.cu", kernel="csrc/kernels/accept_commit.cuh",
                          triton="triton_kernels/accept_commit.py"),
    "verify_tail": dict(cuda="csrc/verify_tail.cu", kernel="csrc/kernels/verify_tail.cuh",
                        triton="triton_kernels/verify_tail.py"),
    "persistent_draft": dict(cuda="csrc/persistent_draft.cu", kernel="csrc/kernels/persistent_draft.cuh",
                             triton=None),
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


def accept_greedy(draft_tokens: torch.Tensor, target_tokens: torch.Tensor,
                  num_drafted: Optional[torch.Tensor] = None, *,
                  backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """verify_accept's accept rule on the target's tokens instead of its logits, on the device (no host sync).

    The engine's greedy verify takes the target's tokens from lm_head_argmax, the fused LM head a plain
    step uses, so no [B, k+1, V] logits are written and each position's token is computed the way
    plain decoding computes it. One launch of the CUDA or Triton kernel (tested on an H100 at bf2d3ab);
    the PyTorch reference is a few graph-capturable torch ops.

    Args:
        draft_tokens: [B, k] int64, 1 <= k < 2^20.
        target_tokens: [B, k+1] int64; column j is the target's token after draft j-1 (column 0: after
            the last committed token).
        num_drafted: [B] int64, drafts actually proposed per row (clamped to [0, k]); None = k.
    Returns:
        accepted [B] int64: length a of the longest prefix (among the first num_drafted) where
            draft == target_tokens.
        committed [B, k+1] int64: drafts[:a], then target_tokens[:, a], then -1.
    """
    validate.accept_greedy(draft_tokens, target_tokens, num_drafted)
    return select("accept_greedy", backend, draft_tokens, target_tokens, num_drafted)(
        draft_tokens, target_tokens, num_drafted)


def _accept_greedy_reasons(backend):
    def reasons(draft_tokens, target_tokens, num_drafted):
        return tensor_reasons(backend, {"draft_tokens": draft_tokens, "target_tokens": target_tokens,
                                        "num_drafted": num_drafted})
    return reasons


def accept_commit(draft_tokens: torch.Tensor, target_tokens: torch.Tensor, num_drafted: torch.Tensor,
                  cache_len: torch.Tensor, tokens_in: torch.Tensor, history: torch.Tensor, report: torch.Tensor, *,
                  backend: Optional[str] = None) -> None:
    """The end of a greedy verify or plain step, in one launch of the CUDA kernel: accept_greedy's rule, then
    the engine's commit (the history the copied drafts search, the cache length, the next input token and
    the round's report), which took about ten small launches.

    Args:
        draft_tokens: [B, k] int64 (k >= 0; 0 for a plain step), target_tokens: [B, k+1] int64 (k + 1 <= 64),
            num_drafted: [B] int64: as accept_greedy's.
        cache_len: [B] int64, advanced by accepted + 1. tokens_in: [B, >= 1] int64: column 0 gets the
            committed token at `accepted`. history: [B, >= L + k + 2] int64: columns L+1 .. L+1+k get the
            committed row (-1 past accepted + 1). report: [B, >= k + 3] int64 (engine.rounds.Report):
            [accepted, num_drafted, committed...].
    All int64, contiguous, on one device; written in place. Returns None.
    """
    validate.accept_commit(draft_tokens, target_tokens, num_drafted, cache_len, tokens_in, history, report)
    args = (draft_tokens, target_tokens, num_drafted, cache_len, tokens_in, history, report)
    select("accept_commit", backend, *args)(*args)


def _accept_commit_reasons(backend):
    def reasons(draft_tokens, target_tokens, num_drafted, cache_len, tokens_in, history, report):
        return tensor_reasons(backend, {"draft_tokens": draft_tokens, "target_tokens": target_tokens,
                                        "num_drafted": num_drafted, "cache_len": cache_len, "tokens_in": tokens_in,
                                        "history": history, "report": report})
    return reasons


def verify_tail(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float, lm_head: torch.Tensor,
                draft_tokens: torch.Tensor, num_drafted: torch.Tensor, cache_len: torch.Tensor, tokens_in: torch.Tensor,
                history: torch.Tensor, report: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """A greedy verify or plain step's end from the last layer's output: the final norm, the target's token at
    each position (argmax over the full vocabulary, as lm_head_argmax), then accept_commit. The CUDA kernel does
    it in two launches, writing neither the normed rows nor [B, T, V] logits; each token is bitwise the per-op
    path's (fused_add_rms_norm, lm_head_argmax), so the commit is too.

    Args: x, residual [B, T, H] (T = k + 1 <= 64 positions), norm_weight [H], eps, lm_head [V, H]: one float
        dtype; draft_tokens [B, k], num_drafted [B], cache_len [B], tokens_in [B, >= 1], history
        [B, >= L + k + 2], report [B, >= k + 3]: int64, as accept_commit's (written in place the same way).
    Returns: target_tokens [B, T] int64.
    """
    validate.verify_tail(x, residual, norm_weight, eps, lm_head, draft_tokens, num_drafted, cache_len, tokens_in,
                         history, report)
    args = (x, residual, norm_weight, float(eps), lm_head, draft_tokens, num_drafted, cache_len, tokens_in, history,
            report)
    return select("verify_tail", backend, *args)(*args)


def _verify_tail_reasons(backend):
    def reasons(x, residual, norm_weight, eps, lm_head, draft_tokens, num_drafted, cache_len, tokens_in, history,
                report):
        out = tensor_reasons(backend, dict(x=x, residual=residual, norm_weight=norm_weight, lm_head=lm_head,
                                           draft_tokens=draft_tokens, num_drafted=num_drafted, cache_len=cache_len,
                                           tokens_in=tokens_in, history=history, report=report))
        if backend == "cuda" and x.shape[0] * x.shape[1] > 65535:
            out.append(f"x has {x.shape[0] * x.shape[1]} rows (B * T); the CUDA kernel takes at most 65535")
        return out
    return reasons


# ---- a greedy draft step's bookkeeping -----------------------------------------------------------

def take_draft(token: torch.Tensor, confidence: torch.Tensor, threshold: torch.Tensor, active: torch.Tensor,
               num_drafted: torch.Tensor, draft_tokens: torch.Tensor, tokens_in: torch.Tensor, step: int,
               draft_ids: Optional[torch.Tensor] = None, *, backend: Optional[str] = None) -> torch.Tensor:
    """Record the draft head's greedy proposal as draft `step`, on the device (no host sync).

    Everything a greedy draft step does after lm_head_argmax, in one launch of the CUDA or Triton
    kernel instead of about nine tiny torch ops: map the draft-vocabulary index to a token id, write it
    where the round's drafts and the next step's input live, and apply Kangaroo's confidence exit.
    Automatic selection runs the CUDA kernel on CUDA tensors (on an H100 at 4d5b778 it took the engine's
    6-draft phase from 641 to 569 µs), the PyTorch reference on the CPU.

    Args:
        token: [B, 1] int64, B >= 1, the draft head's argmax: an index into draft_ids when given (< N;
            a negative one reads draft_ids[0]), else a token id.
        confidence: [B, 1] float32, the draft's top-1 probability.
        threshold: [] float32 on the device, η.
        active: [B] bool, rows still drafting; becomes keep.
        num_drafted: [B] int64, drafts per row this round; keep adds one.
        draft_tokens: [B, G] int64, G >= 1; column `step` gets the token id (in every row).
        tokens_in: [B, G+1] int64; column `step + 1` gets the token id (in every row).
        step: int in [0, G), the draft's position in the round.
        draft_ids: [N] int64, draft-vocabulary index -> token id, or None (token holds token ids).
    All tensors contiguous, on one device; only the columns and buffers named are written.
    Returns:
        keep [B] bool, a new tensor: active & (confidence >= threshold); a NaN confidence is not kept.
    """
    validate.take_draft(token, confidence, threshold, active, num_drafted, draft_tokens, tokens_in, step, draft_ids)
    args = (token, confidence, threshold, active, num_drafted, draft_tokens, tokens_in, int(step), draft_ids)
    return select("take_draft", backend, *args)(*args)


def _take_draft_reasons(backend):
    def reasons(token, confidence, threshold, active, num_drafted, draft_tokens, tokens_in, step, draft_ids):
        return tensor_reasons(backend, {"token": token, "confidence": confidence, "threshold": threshold,
                                        "active": active, "num_drafted": num_drafted, "draft_tokens": draft_tokens,
                                        "tokens_in": tokens_in, "draft_ids": draft_ids})
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


# ---- sampling: temperature / top-k / top-p, and lossless speculative sampling ----------------------
# Random numbers come from Philox4x32-10 keyed by rng = (seed, offset), an int64 [2] tensor on the
# device that the ops only read (the caller advances the offset between rounds, on the device), plus a
# row and a stream number; every backend draws the same numbers (reference.uniform).

def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, *,
                   backend: Optional[str] = None) -> torch.Tensor:
    """The distribution to sample from: temperature, then top-k, then top-p.

    Args:
        logits: [..., V], float32 / float16 / bfloat16, contiguous.
        temperature: finite, > 0; z = logits / temperature (in float32).
        top_k: keep the tokens with z >= the k-th largest z (ties kept); 0 (or >= V) keeps all.
        top_p: in (0, 1]; keep token i iff the probability of the tokens strictly more probable than i is
            < top_p (the most probable tokens reaching top_p, whole tie groups); 1.0 keeps all.
    Returns:
        probs [..., V] float32: softmax over the kept tokens, exactly 0 elsewhere. A row with a NaN or
        +inf logit, or only -inf logits, is all NaN.
    """
    validate.sampling_probs(logits, temperature, top_k, top_p)
    args = (logits, float(temperature), int(top_k), float(top_p))
    return select("sampling_probs", backend, *args)(*args)


def sample_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, rng: torch.Tensor,
                  stream: int, *, backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token per row from sampling_probs(logits, ...), on the device (no host sync).

    Args:
        logits: [..., V] as in sampling_probs; temperature, top_k, top_p: as in sampling_probs.
        rng: int64 [2] = (seed, offset) on logits' device; read, never advanced.
        stream: int in [0, ACCEPT_STREAM): separates independent draws made with the same rng (e.g. one
            per draft step); the flattened row index separates rows.
    Returns:
        token [...] int64 (-1 for a NaN row), probs [..., V] float32 (sampling_probs) and top_prob [...]
        float32 (the largest probability).
    """
    validate.sample_logits(logits, temperature, top_k, top_p, rng, stream)
    args = (logits, float(temperature), int(top_k), float(top_p), rng, int(stream))
    return select("sample_logits", backend, *args)(*args)


def speculative_sample_accept(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_logits: torch.Tensor,
                              num_drafted: Optional[torch.Tensor], temperature: float, top_k: int, top_p: float,
                              rng: torch.Tensor, *,
                              backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lossless speculative sampling of a chain of drafts, on the device (no host sync).

    Commits tokens distributed exactly as sampling_probs(target_logits, ...) (Leviathan et al. 2023,
    Chen et al. 2023): draft j is accepted with probability min(1, p_j(x_j) / q_j(x_j)); after the
    first rejection a the next token comes from max(0, p_a - q_a) renormalized (p_a if that is all
    zero); with every draft accepted, a bonus token comes from p_n. Uses streams ACCEPT_STREAM and
    ACCEPT_STREAM + 1 of rng, with row = the batch row.

    Args:
        draft_tokens: [B, k] int64, k >= 1 (a token outside [0, V) is rejected).
        draft_probs: [B, k, V] float32, the draft's distributions q_j (as returned by sample_logits).
        target_logits: [B, k+1, V]; row j scores the token after draft j-1.
        num_drafted: [B] int64, drafts proposed per row (clamped to [0, k]); None = k.
        temperature, top_k, top_p: the target's sampling_probs settings.
        rng: int64 [2] = (seed, offset) on the logits' device; read, never advanced.
    Returns:
        accepted [B] int64 (a) and committed [B, k+1] int64: drafts[:a], the new token, then -1. A row
        whose target logits at positions 0..n hold a NaN or +inf (or only -inf) gets accepted = -1 and
        committed all -1.
    """
    validate.speculative_sample_accept(draft_tokens, draft_probs, target_logits, num_drafted, temperature, top_k,
                                       top_p, rng)
    args = (draft_tokens, draft_probs, target_logits, num_drafted, float(temperature), int(top_k), float(top_p), rng)
    return select("speculative_sample_accept", backend, *args)(*args)


# ---- copied drafts (prompt lookup) ----------------------------------------------------------------
# One definition for every device: the PyTorch reference is already vectorised (compares over a static
# buffer, no host sync), and its cost, S x n int64 compares, is microseconds next to a model step, so
# no CUDA or Triton version is worth keeping in step with it (hence not in OP_FILES).

def ngram_draft(history: torch.Tensor, length: torch.Tensor, min_ngram: int, max_ngram: int,
                gamma: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt-lookup drafts: for each row, the longest n in [min_ngram, max_ngram] whose last n tokens
    occur earlier in history[:, :length] (latest occurrence wins; overlapping allowed), and up to gamma
    tokens that followed that occurrence.

    Args:
        history: [B, S] int64, the prompt and the generated tokens; slots from length on are ignored.
        length: [B] int64 on history's device, tokens per row (L <= S).
        min_ngram, max_ngram: 1 <= min_ngram <= max_ngram <= 32.
        gamma: the most tokens to copy, >= 1.
    Returns:
        tokens [B, gamma] int64 (-1 past count), count [B] int64 (0: no match) and the n that matched
        [B] int64 (0: none).
    """
    validate.ngram_draft(history, length, min_ngram, max_ngram, gamma)
    return reference.ngram_draft(history, length, int(min_ngram), int(max_ngram), int(gamma))


def _sampling_reasons(backend):
    def reasons(logits, temperature, top_k, top_p, rng=None, stream=None):
        return tensor_reasons(backend, {"logits": logits, "rng": rng})
    return reasons


def _sample_accept_reasons(backend):
    def reasons(draft_tokens, draft_probs, target_logits, num_drafted, temperature, top_k, top_p, rng):
        return tensor_reasons(backend, {"draft_tokens": draft_tokens, "draft_probs": draft_probs,
                                        "target_logits": target_logits, "num_drafted": num_drafted, "rng": rng})
    return reasons


# ---- a whole draft phase in one launch -------------------------------------------------------------

def persistent_draft(embed, layer_weights, k_caches, v_caches, num_exit_layers: int, head_norm, head, draft_ids,
                     rope_cos, rope_sin, threshold, cache_len, tokens_in, draft_tokens, num_drafted, active,
                     exit_states, barrier, gamma: int, stop_at_exit: bool, eps: float, scale: float, window: int = 0,
                     stamps: Optional[torch.Tensor] = None, *, backend: Optional[str] = None) -> None:
    """Kangaroo's draft phase for one sequence in one launch: draft steps j = 0..gamma, each the target's
    exit layers and the adapter's blocks on tokens_in[:, j], the exit state, and (j < gamma) the draft head's
    greedy proposal with the confidence exit (reference.persistent_draft is the definition: the engine's
    per-op draft steps). The CUDA kernel runs the stages of every step on one grid ordered by grid-wide
    barriers, with the CUDA ops' own kernel bodies, so its exit states, caches and tokens are bitwise the
    per-op path's (the confidence may differ in its last bits).

    Args:
        embed: [V, H] the token embedding.
        layer_weights: 14 entries per layer (reference.PERSISTENT_DRAFT_WEIGHTS: input_norm, q, k, v, q_bias,
            k_bias, v_bias, o, o_bias, post_norm, gate, up, down, down_bias; biases and, for adapter blocks
            without an MLP, the last five may be None): the target's num_exit_layers layers, then the
            adapter's blocks.
        k_caches, v_caches: one [1, Hkv, S, D] cache per layer, written at cache_len + j.
        head_norm: [H], head: [N, H], draft_ids: [N] int64 or None (head index -> token id).
        rope_cos, rope_sin: [>= S, D] float32.
        threshold: [] float32 (η); cache_len: [1] int64.
        tokens_in: [1, >= gamma + 1], draft_tokens: [1, >= gamma] int64; num_drafted: [1] int64;
            active: [1] bool; exit_states: [1, >= gamma + 1, H]: the round's state, written as the per-op
            steps write it.
        barrier: [64] int32, zero: the kernel's arrival counters (the grid barrier's, then one per KV head for
            its key splits); it leaves them zero; one per stream.
        gamma: draft steps that propose (γ >= 1); stop_at_exit: step j > 0 only while active.
        stamps: None, or int64 [rows, >= the launch's blocks, 3]: the CUDA kernel's stage timing, per grid
            barrier k and block b (stage code, global-timer ns at arrival, at departure; persistent_draft.cuh's
            Stage); rows past the barriers run are left as they were.
    The CUDA kernel takes batch 1, 16-bit models with the tensor-core GEMVs' shapes, head dim 64 or 128 and
    at most 8 query heads per KV head (backend reasons say which limit a call misses).
    """
    args = (embed, list(layer_weights), list(k_caches), list(v_caches), int(num_exit_layers), head_norm, head,
            draft_ids, rope_cos, rope_sin, threshold, cache_len, tokens_in, draft_tokens, num_drafted, active,
            exit_states, barrier, int(gamma), bool(stop_at_exit), float(eps), float(scale), int(window), stamps)
    validate.persistent_draft(*args)
    select("persistent_draft", backend, *args)(*args)


def _persistent_reasons(backend):
    def reasons(embed, layer_weights, k_caches, v_caches, num_exit_layers, head_norm, head, draft_ids, rope_cos,
                rope_sin, threshold, cache_len, tokens_in, draft_tokens, num_drafted, active, exit_states, barrier,
                gamma, *rest):
        why = tensor_reasons(backend, {"embed": embed, "exit_states": exit_states, "k_caches[0]": k_caches[0]})
        if backend != "cuda":
            return why
        return why + persistent_kernel_limits(embed, layer_weights, k_caches[0])
    return reasons


def persistent_kernel_limits(embed, layer_weights, k_cache) -> List[str]:
    """What the CUDA persistent draft kernel cannot take here (csrc/persistent_draft.cu checks the same)."""
    why = []
    if embed.dtype not in (torch.float16, torch.bfloat16):
        why.append(f"the persistent draft kernel runs 16-bit models, not {embed.dtype}")
    elif _extension.loaded() and not _extension.tensor_core_gemv():
        why.append("the persistent draft kernel runs the tensor-core GEMVs, switched off (KANGAROO_TENSOR_CORE_GEMV)")
    H, (Hkv, D) = embed.shape[1], (k_cache.shape[1], k_cache.shape[3])
    n = len(layer_weights) // 14
    q_rows = layer_weights[1].shape[0]
    inter = next((w.shape[0] for w in layer_weights[10::14] if w is not None), H)
    if D not in (64, 128):
        why.append(f"head dim {D} (the kernel takes 64 and 128)")
    if q_rows % D or (q_rows // D) % Hkv or q_rows // D // Hkv > 8:
        why.append(f"{q_rows // D} query heads for {Hkv} KV heads (at most 8 per KV head)")
    if H % 8 or H > 2048:
        why.append(f"hidden size {H} (a multiple of 8, at most 2048: the head norm's row)")
    if any(k % 32 for k in (H, q_rows, inter)) or any(r % 8 for r in (q_rows, Hkv * D, inter)):
        why.append(f"GEMV shapes the tensor-core kernel cannot take (hidden {H}, q rows {q_rows}, "
                   f"intermediate {inter}: widths % 32, rows % 8)")
    if n > 32:
        why.append(f"{n} layers (at most 32: exit layers and adapter blocks)")
    return why


# ---- registrations -------------------------------------------------------------------------------

def _cuda(name):
    return lambda *args: getattr(torch.ops.kangaroo, name)(*args)


def _triton(name):
    return lambda *args: getattr(triton_module(), name)(*args)


for _name, _reasons in (("fused_add_rms_norm", _rms_reasons), ("verify_accept", _verify_reasons),
                        ("accept_greedy", _accept_greedy_reasons), ("take_draft", _take_draft_reasons),
                        ("rope_append_attention", _attention_reasons), ("lm_head_argmax", _head_reasons),
                        ("rms_norm_linear", _linear_reasons), ("rms_norm_gate_up", _gate_up_reasons),
                        ("decode_linear", _decode_linear_reasons), ("sampling_probs", _sampling_reasons),
                        ("sample_logits", _sampling_reasons),
                        ("speculative_sample_accept", _sample_accept_reasons),
                        ("persistent_draft", _persistent_reasons), ("accept_commit", _accept_commit_reasons),
                        ("verify_tail", _verify_tail_reasons)):
    register(_name, "cuda", _cuda(_name), _reasons("cuda"))
    register(_name, "triton", _triton(_name), _reasons("triton"))
    register(_name, "reference", getattr(reference, _name), _reasons("reference"))
