"""Argument checks shared by every backend's Python entry point: bad input raises ValueError naming
the argument and what was expected (the CUDA launchers repeat these as TORCH_CHECKs)."""
import math
from typing import Optional

import torch

from . import reference
from .reference import ACCEPT_STREAM  # streams at and above it are speculative_sample_accept's

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# persistent_draft's barrier buffer (csrc/kernels/persistent_draft.cuh: kBarrierWords): the grid barrier's two
# counters, then one key-split arrival counter per KV head.
PERSISTENT_BARRIER_WORDS = 64


def _tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _contiguous(name, t):
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got strides {tuple(t.stride())} for shape {tuple(t.shape)})")


def _same_device(name, t, ref_name, ref):
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; expected one device")


def _rows(x, dim: str, name: str = "x"):
    """x: a non-empty contiguous float tensor [..., dim] (the rows an op works on), called `name`."""
    _tensor(name, x)
    if x.dtype not in FLOATS:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0 or x.numel() == 0:
        raise ValueError(f"{name} must have shape [..., {dim}] with {dim} >= 1 and no empty dimension, got "
                         f"{tuple(x.shape)}")
    _contiguous(name, x)


def _like_x(name, t, x):
    """t (shape already checked) has x's dtype and device and is contiguous."""
    if t.dtype != x.dtype:
        raise ValueError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    _same_device(name, t, "x", x)
    _contiguous(name, t)


def fused_add_rms_norm(x, residual: Optional[torch.Tensor], weight, eps, weight_name: str = "weight"):
    _rows(x, "H")
    if residual is not None:
        _tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        _like_x("residual", residual, x)
    _tensor(weight_name, weight)
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"{weight_name} must have shape [{x.shape[-1]}] (x's last dimension), got "
                         f"{tuple(weight.shape)}")
    _like_x(weight_name, weight, x)
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")


def _draft_tokens(draft_tokens):
    """draft_tokens: int64 [B, k], B, k >= 1, contiguous."""
    _tensor("draft_tokens", draft_tokens)
    if draft_tokens.dtype != torch.int64 or draft_tokens.dim() != 2 or draft_tokens.shape[1] < 1:
        raise ValueError(f"draft_tokens must be int64 of shape [B, k] with k >= 1, got "
                         f"{draft_tokens.dtype} {tuple(draft_tokens.shape)}")
    if draft_tokens.shape[0] < 1:
        raise ValueError("draft_tokens must have at least one row (B >= 1)")
    _contiguous("draft_tokens", draft_tokens)


def _num_drafted(num_drafted, draft_tokens):
    """num_drafted: None, or int64 [B] on draft_tokens' device, contiguous."""
    if num_drafted is None:
        return
    B = draft_tokens.shape[0]
    _tensor("num_drafted", num_drafted)
    if num_drafted.dtype != torch.int64 or num_drafted.shape != (B,):
        raise ValueError(f"num_drafted must be int64 of shape [{B}], got {num_drafted.dtype} "
                         f"{tuple(num_drafted.shape)}")
    _same_device("num_drafted", num_drafted, "draft_tokens", draft_tokens)
    _contiguous("num_drafted", num_drafted)


def verify_accept(draft_tokens, target_logits, num_drafted: Optional[torch.Tensor]):
    _draft_tokens(draft_tokens)
    B, k = draft_tokens.shape
    _tensor("target_logits", target_logits)
    if target_logits.dtype not in FLOATS:
        raise ValueError(f"target_logits must be float32, float16 or bfloat16, got {target_logits.dtype}")
    if target_logits.dim() != 3 or target_logits.shape[:2] != (B, k + 1) or target_logits.shape[2] < 1:
        raise ValueError(f"target_logits must have shape [B, k+1, V] = [{B}, {k + 1}, V] for draft_tokens "
                         f"[{B}, {k}], got {tuple(target_logits.shape)}")
    _same_device("target_logits", target_logits, "draft_tokens", draft_tokens)
    _contiguous("target_logits", target_logits)
    _num_drafted(num_drafted, draft_tokens)


MAX_ACCEPT_DRAFTS = 1 << 20  # as csrc/checks.h (verify_accept's CUDA launcher has the same bound)


def accept_greedy(draft_tokens, target_tokens, num_drafted: Optional[torch.Tensor]):
    _draft_tokens(draft_tokens)
    B, k = draft_tokens.shape
    _tensor("target_tokens", target_tokens)
    if target_tokens.dtype != torch.int64 or target_tokens.shape != (B, k + 1):
        raise ValueError(f"target_tokens must be int64 of shape [B, k+1] = [{B}, {k + 1}] for draft_tokens "
                         f"[{B}, {k}], got {target_tokens.dtype} {tuple(target_tokens.shape)}")
    _same_device("target_tokens", target_tokens, "draft_tokens", draft_tokens)
    _contiguous("target_tokens", target_tokens)
    _num_drafted(num_drafted, draft_tokens)
    if k >= MAX_ACCEPT_DRAFTS:  # the CUDA kernel indexes positions with int; every backend says the same
        raise ValueError(f"draft_tokens must have k < 2^20 drafts per row, got k = {k}")


def _row_buffer(name, t, dtype, shape, shape_text, token):
    """t: a tensor of `dtype` and `shape` (written as shape_text) on token's device, contiguous: the
    kernels index every buffer as a dense row-major array."""
    _tensor(name, t)
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise ValueError(f"{name} must be {str(dtype).replace('torch.', '')} of shape {shape_text} = "
                         f"[{', '.join(map(str, shape))}], got {t.dtype} {tuple(t.shape)}")
    _same_device(name, t, "token", token)
    _contiguous(name, t)


def take_draft(token, confidence, threshold, active, num_drafted, draft_tokens, tokens_in, step, draft_ids):
    _tensor("token", token)
    if token.dtype != torch.int64 or token.dim() != 2 or token.shape[1] != 1:
        raise ValueError(f"token must be int64 of shape [B, 1] (the draft head's argmax), got {token.dtype} "
                         f"{tuple(token.shape)}")
    B = token.shape[0]
    if B < 1:
        raise ValueError("token must have at least one row (B >= 1)")
    _contiguous("token", token)
    _row_buffer("confidence", confidence, torch.float32, (B, 1), "[B, 1]", token)
    _tensor("threshold", threshold)
    if threshold.dtype != torch.float32 or threshold.dim() != 0:
        raise ValueError(f"threshold must be a 0-dim float32 tensor (η, on the device), got {threshold.dtype} "
                         f"{tuple(threshold.shape)}")
    _same_device("threshold", threshold, "token", token)
    _row_buffer("active", active, torch.bool, (B,), "[B]", token)
    _row_buffer("num_drafted", num_drafted, torch.int64, (B,), "[B]", token)
    _tensor("draft_tokens", draft_tokens)
    if draft_tokens.dim() != 2 or draft_tokens.shape[1] < 1:
        raise ValueError(f"draft_tokens must be int64 of shape [B, G] with G >= 1, got {draft_tokens.dtype} "
                         f"{tuple(draft_tokens.shape)}")
    G = draft_tokens.shape[1]
    _row_buffer("draft_tokens", draft_tokens, torch.int64, (B, G), "[B, G]", token)
    _row_buffer("tokens_in", tokens_in, torch.int64, (B, G + 1), "[B, G+1]", token)
    if not (_is_int(step) and 0 <= step < G):
        raise ValueError(f"step must be an int in [0, G) = [0, {G}) (the draft column written), got {step!r}")
    if draft_ids is not None:
        _tensor("draft_ids", draft_ids)
        if draft_ids.dtype != torch.int64 or draft_ids.dim() != 1 or draft_ids.shape[0] < 1:
            raise ValueError(f"draft_ids must be int64 of shape [N] with N >= 1 (draft index -> token id) or "
                             f"None, got {draft_ids.dtype} {tuple(draft_ids.shape)}")
        _same_device("draft_ids", draft_ids, "token", token)
        _contiguous("draft_ids", draft_ids)


def rope_append_attention(q, k, v, rope_cos, rope_sin, positions, k_cache, v_cache, scale, window):
    for name, t in (("q", q), ("k", k), ("v", v), ("rope_cos", rope_cos), ("rope_sin", rope_sin),
                    ("positions", positions), ("k_cache", k_cache), ("v_cache", v_cache)):
        _tensor(name, t)
        _contiguous(name, t)
        if name != "q":
            _same_device(name, t, "q", q)
    if q.dtype not in FLOATS or q.dim() != 4:
        raise ValueError(f"q must be a float32/float16/bfloat16 tensor [B, T, Hq, D], got {q.dtype} {tuple(q.shape)}")
    B, T, Hq, D = q.shape
    if B < 1 or T < 1 or D < 2 or D % 2:
        raise ValueError(f"q must have B, T >= 1 and an even head dim D >= 2, got shape {tuple(q.shape)}")
    if k.dim() != 4 or k.shape[:2] != (B, T) or k.shape[3] != D:
        raise ValueError(f"k must have shape [B, T, Hkv, D] = [{B}, {T}, Hkv, {D}], got {tuple(k.shape)}")
    Hkv = k.shape[2]
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"k's head count {Hkv} must divide q's head count {Hq} (grouped-query attention)")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    if k_cache.dim() != 4 or k_cache.shape[0] != B or k_cache.shape[1] != Hkv or k_cache.shape[3] != D:
        raise ValueError(f"k_cache must have shape [B, Hkv, S, D] = [{B}, {Hkv}, S, {D}], got {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    S = k_cache.shape[2]
    for name, t in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
        if t.dtype != torch.float32 or t.dim() != 2 or t.shape[1] != D or t.shape[0] < S:
            raise ValueError(f"{name} must be float32 [S', D] with S' >= {S} (the cache length) and D = {D}, got "
                             f"{t.dtype} {tuple(t.shape)}")
    if positions.dtype != torch.int64 or positions.shape != (B, T):
        raise ValueError(f"positions must be int64 of shape [{B}, {T}], got {positions.dtype} {tuple(positions.shape)}")
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a float > 0, got {scale!r}")
    if not (isinstance(window, int) and window >= 0):
        raise ValueError(f"window must be an int >= 0 (0: no sliding window), got {window!r}")


def lm_head_argmax(hidden, lm_head):
    _tensor("hidden", hidden)
    _tensor("lm_head", lm_head)
    if hidden.dtype not in FLOATS or hidden.dim() < 1 or hidden.numel() == 0:
        raise ValueError(f"hidden must be a non-empty float32/float16/bfloat16 tensor [..., H], got "
                         f"{hidden.dtype} {tuple(hidden.shape)}")
    if lm_head.dim() != 2 or lm_head.shape[1] != hidden.shape[-1] or lm_head.shape[0] < 1:
        raise ValueError(f"lm_head must have shape [V, {hidden.shape[-1]}] (V >= 1), got {tuple(lm_head.shape)}")
    if lm_head.dtype != hidden.dtype:
        raise ValueError(f"lm_head must have hidden's dtype {hidden.dtype}, got {lm_head.dtype}")
    _same_device("lm_head", lm_head, "hidden", hidden)
    _contiguous("hidden", hidden)
    _contiguous("lm_head", lm_head)


def _matrix(name, w, K, x):
    _tensor(name, w)
    if w.dim() != 2 or w.shape[1] != K or w.shape[0] < 1:
        raise ValueError(f"{name} must have shape [N, {K}] (N >= 1; K = x's last dimension), got {tuple(w.shape)}")
    _like_x(name, w, x)


def _bias(name, b, N, x):
    if b is None:
        return
    _tensor(name, b)
    if b.shape != (N,):
        raise ValueError(f"{name} must have shape [{N}] or be None, got {tuple(b.shape)}")
    _like_x(name, b, x)


def rms_norm_linear(x, residual, norm_weight, eps, weights, biases):
    fused_add_rms_norm(x, residual, norm_weight, eps, "norm_weight")
    if not isinstance(weights, (list, tuple)) or not 1 <= len(weights) <= 3:
        raise ValueError(f"weights must be a list of 1 to 3 tensors [N_i, K], got {type(weights).__name__} "
                         f"of length {len(weights) if isinstance(weights, (list, tuple)) else '-'}")
    if not isinstance(biases, (list, tuple)) or len(biases) != len(weights):
        raise ValueError(f"biases must be a list with one tensor or None per weight ({len(weights)}), got {biases!r}")
    for i, (w, b) in enumerate(zip(weights, biases)):
        _matrix(f"weights[{i}]", w, x.shape[-1], x)
        _bias(f"biases[{i}]", b, w.shape[0], x)


def rms_norm_gate_up(x, residual, norm_weight, eps, gate, up):
    fused_add_rms_norm(x, residual, norm_weight, eps, "norm_weight")
    _matrix("gate", gate, x.shape[-1], x)
    _matrix("up", up, x.shape[-1], x)
    if up.shape != gate.shape:
        raise ValueError(f"up must have gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")


def decode_linear(x, weight, bias):
    _rows(x, "K")
    _matrix("weight", weight, x.shape[-1], x)
    _bias("bias", bias, weight.shape[0], x)


# ---- sampling ----------------------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def sampling_filter(temperature, top_k, top_p):
    # float32(temperature) must stay finite and > 0: the kernels divide float32 logits by it.
    if not (_is_float(temperature) and math.isfinite(temperature) and temperature > 0
            and float(torch.tensor(temperature, dtype=torch.float32)) not in (0.0, math.inf)):
        raise ValueError(f"temperature must be a finite float > 0 that float32 can hold, got {temperature!r}")
    if not (_is_int(top_k) and top_k >= 0):
        raise ValueError(f"top_k must be an int >= 0 (0: no top-k filter), got {top_k!r}")
    if not (_is_float(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be a float in (0, 1] (1: no top-p filter), got {top_p!r}")


def rng(rng_state, ref_name, ref):
    _tensor("rng", rng_state)
    if rng_state.dtype != torch.int64 or rng_state.shape != (2,):
        raise ValueError(f"rng must be an int64 tensor of shape [2] holding (seed, offset), got {rng_state.dtype} "
                         f"{tuple(rng_state.shape)}")
    _same_device("rng", rng_state, ref_name, ref)
    _contiguous("rng", rng_state)


def sampling_probs(logits, temperature, top_k, top_p):
    _rows(logits, "V", name="logits")
    sampling_filter(temperature, top_k, top_p)


def sample_logits(logits, temperature, top_k, top_p, rng_state, stream):
    sampling_probs(logits, temperature, top_k, top_p)
    rng(rng_state, "logits", logits)
    if not (_is_int(stream) and 0 <= stream < ACCEPT_STREAM):
        raise ValueError(f"stream must be an int in [0, {ACCEPT_STREAM:#x}) (the streams above are "
                         f"speculative_sample_accept's), got {stream!r}")


def speculative_sample_accept(draft_tokens, draft_probs, target_logits, num_drafted, temperature, top_k, top_p,
                              rng_state):
    verify_accept(draft_tokens, target_logits, num_drafted)
    B, k = draft_tokens.shape
    V = target_logits.shape[-1]
    _tensor("draft_probs", draft_probs)
    if draft_probs.dtype != torch.float32 or draft_probs.shape != (B, k, V):
        raise ValueError(f"draft_probs must be float32 of shape [B, k, V] = [{B}, {k}, {V}], got "
                         f"{draft_probs.dtype} {tuple(draft_probs.shape)}")
    _same_device("draft_probs", draft_probs, "draft_tokens", draft_tokens)
    _contiguous("draft_probs", draft_probs)
    sampling_filter(temperature, top_k, top_p)
    rng(rng_state, "target_logits", target_logits)


# ---- copied drafts -----------------------------------------------------------------------------------

def ngram_draft(history, length, min_ngram, max_ngram, gamma):
    _tensor("history", history)
    if history.dtype != torch.int64 or history.dim() != 2:
        raise ValueError(f"history must be an int64 tensor [B, S], got {history.dtype} {tuple(history.shape)}")
    _tensor("length", length)
    if length.dtype != torch.int64 or length.shape != (history.shape[0],):
        raise ValueError(f"length must be an int64 tensor [B] = [{history.shape[0]}], got {length.dtype} "
                         f"{tuple(length.shape)}")
    _same_device("length", length, "history", history)
    if not (_is_int(min_ngram) and min_ngram >= 1):
        raise ValueError(f"min_ngram must be an int >= 1, got {min_ngram!r}")
    if not (_is_int(max_ngram) and min_ngram <= max_ngram <= MAX_NGRAM):
        raise ValueError(f"max_ngram must be an int in [min_ngram, {MAX_NGRAM}] = [{min_ngram}, {MAX_NGRAM}], "
                         f"got {max_ngram!r}")
    if not (_is_int(gamma) and gamma >= 1):
        raise ValueError(f"gamma (γ, the most tokens to copy) must be an int >= 1, got {gamma!r}")


MAX_NGRAM = 32  # longer suffixes than this never pay: a match of 32 tokens is already certain


def persistent_draft(embed, layer_weights, k_caches, v_caches, num_exit_layers, head_norm, head, draft_ids,
                     rope_cos, rope_sin, threshold, cache_len, tokens_in, draft_tokens, num_drafted, active,
                     exit_states, barrier, gamma, stop_at_exit, eps, scale, window, stamps=None):
    """The structure every backend needs (the CUDA kernel's own limits are its backend reasons)."""
    _tensor("embed", embed)
    if embed.dim() != 2 or embed.dtype not in FLOATS:
        raise ValueError(f"embed must be a float tensor [V, H], got {embed.dtype} {tuple(embed.shape)}")
    H = embed.shape[1]
    per_layer = 14
    if not isinstance(layer_weights, (list, tuple)) or len(layer_weights) % per_layer or len(layer_weights) < 28:
        raise ValueError("layer_weights must be a list of 14 entries (tensor or None) per layer, for at least two "
                         f"layers (exit layers, then adapter blocks), got {type(layer_weights).__name__} of "
                         f"{len(layer_weights) if isinstance(layer_weights, (list, tuple)) else '?'}")
    n = len(layer_weights) // per_layer
    if not (_is_int(num_exit_layers) and 1 <= num_exit_layers < n):
        raise ValueError(f"num_exit_layers must be an int in [1, {n}) (at least one target layer and one adapter "
                         f"block), got {num_exit_layers!r}")
    for i, w in enumerate(layer_weights):
        if w is None and i % per_layer in (0, 1, 2, 3, 7):
            raise ValueError(f"layer_weights[{i}] ({_WEIGHT_NAMES[i % per_layer]} of layer {i // per_layer}) "
                             "is required")
        if w is not None:
            _tensor(f"layer_weights[{i}]", w)
            _same_device(f"layer_weights[{i}]", w, "embed", embed)
        if i % per_layer == 10 and w is None and i // per_layer < num_exit_layers:
            raise ValueError(f"layer {i // per_layer} is a target exit layer: its gate (layer_weights[{i}]) is "
                             "required")
    if len(k_caches) != n or len(v_caches) != n:
        raise ValueError(f"k_caches and v_caches must hold one cache per layer ({n}), got {len(k_caches)} and "
                         f"{len(v_caches)}")
    c0 = k_caches[0]
    if c0.dim() != 4 or c0.shape[0] != 1:
        raise ValueError(f"k_caches[0] must be [1, Hkv, S, D] (batch 1), got {tuple(c0.shape)}")
    for name, caches in (("k_caches", k_caches), ("v_caches", v_caches)):
        for i, c in enumerate(caches):
            if tuple(c.shape) != tuple(c0.shape):
                raise ValueError(f"{name}[{i}] must have k_caches[0]'s shape {tuple(c0.shape)}, got {tuple(c.shape)}")
    if not (_is_int(gamma) and gamma >= 1):
        raise ValueError(f"gamma must be an int >= 1, got {gamma!r}")
    for name, t, dtype, rows in (("tokens_in", tokens_in, torch.int64, gamma + 1),
                                 ("draft_tokens", draft_tokens, torch.int64, gamma)):
        _tensor(name, t)
        if t.dtype != dtype or t.dim() != 2 or t.shape[0] != 1 or t.shape[1] < rows:
            raise ValueError(f"{name} must be int64 [1, >= {rows}], got {t.dtype} {tuple(t.shape)}")
    for name, t, dtype in (("cache_len", cache_len, torch.int64), ("num_drafted", num_drafted, torch.int64),
                           ("active", active, torch.bool), ("barrier", barrier, torch.int32)):
        _tensor(name, t)
        size = PERSISTENT_BARRIER_WORDS if name == "barrier" else 1
        if t.dtype != dtype or tuple(t.shape) != (size,):
            raise ValueError(f"{name} must be {str(dtype).replace('torch.', '')} of shape [{size}], got {t.dtype} "
                             f"{tuple(t.shape)}")
    _tensor("threshold", threshold)
    if threshold.dtype != torch.float32 or threshold.dim() != 0:
        raise ValueError(f"threshold must be a 0-dim float32 tensor (η), got {threshold.dtype} "
                         f"{tuple(threshold.shape)}")
    _tensor("exit_states", exit_states)
    if exit_states.dim() != 3 or exit_states.shape[0] != 1 or exit_states.shape[1] < gamma + 1 or \
            exit_states.shape[2] != H:
        raise ValueError(f"exit_states must be [1, >= {gamma + 1}, {H}], got {tuple(exit_states.shape)}")
    if head.dim() != 2 or head.shape[1] != H:
        raise ValueError(f"head must be [N, {H}], got {tuple(head.shape)}")
    if draft_ids is not None and (draft_ids.dtype != torch.int64 or tuple(draft_ids.shape) != (head.shape[0],)):
        raise ValueError(f"draft_ids must be int64 [{head.shape[0]}] or None, got {draft_ids.dtype} "
                         f"{tuple(draft_ids.shape)}")
    if not (_is_int(window) and window >= 0):
        raise ValueError(f"window must be an int >= 0, got {window!r}")
    if stamps is not None and (not isinstance(stamps, torch.Tensor) or stamps.dtype != torch.int64 or
                               stamps.dim() != 3 or stamps.shape[2] != 3):
        raise ValueError("stamps must be None or int64 [rows, blocks, 3] (the kernel's stage timing), got "
                         f"{getattr(stamps, 'dtype', type(stamps).__name__)} {tuple(getattr(stamps, 'shape', ()))}")


_WEIGHT_NAMES = reference.PERSISTENT_DRAFT_WEIGHTS


def accept_commit(draft_tokens, target_tokens, num_drafted, cache_len, tokens_in, history, report):
    _tensor("target_tokens", target_tokens)
    if target_tokens.dtype != torch.int64 or target_tokens.dim() != 2 or not target_tokens.shape[0] >= 1 or \
            not 1 <= target_tokens.shape[1] <= 64:
        raise ValueError(f"target_tokens must be int64 [B, k + 1] with B >= 1 and 1 <= k + 1 <= 64, got "
                         f"{target_tokens.dtype} {tuple(target_tokens.shape)}")
    _commit_state(draft_tokens, num_drafted, cache_len, tokens_in, history, report, *target_tokens.shape,
                  "target_tokens", target_tokens)


def _commit_state(draft_tokens, num_drafted, cache_len, tokens_in, history, report, B, T, ref_name, ref):
    """The buffers a greedy step's commit writes, for B rows and T = k + 1 positions (accept_commit's)."""
    k = T - 1
    for name, t, shape in (("draft_tokens", draft_tokens, (B, k)), ("num_drafted", num_drafted, (B,)),
                           ("cache_len", cache_len, (B,))):
        _tensor(name, t)
        if t.dtype != torch.int64 or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be int64 of shape {list(shape)}, got {t.dtype} {tuple(t.shape)}")
        _same_device(name, t, ref_name, ref)
        _contiguous(name, t)
    for name, t, least in (("tokens_in", tokens_in, 1), ("history", history, k + 2), ("report", report, k + 3)):
        _tensor(name, t)
        if t.dtype != torch.int64 or t.dim() != 2 or t.shape[0] != B or t.shape[1] < least:
            raise ValueError(f"{name} must be int64 [{B}, >= {least}], got {t.dtype} {tuple(t.shape)}")
        _same_device(name, t, ref_name, ref)
        _contiguous(name, t)


def verify_tail(x, residual, norm_weight, eps, lm_head, draft_tokens, num_drafted, cache_len, tokens_in, history,
                report):
    _tensor("x", x)
    if x.dim() != 3 or x.numel() == 0 or not 1 <= x.shape[1] <= 64:
        raise ValueError(f"x must be [B, T, H] with B, H >= 1 and 1 <= T <= 64 positions, got {tuple(x.shape)}")
    fused_add_rms_norm(x, residual, norm_weight, eps, weight_name="norm_weight")
    if residual is None:
        raise ValueError("residual must be a tensor of x's shape (the last layer's residual stream), got None")
    _tensor("lm_head", lm_head)
    if lm_head.dim() != 2 or lm_head.shape[1] != x.shape[-1] or lm_head.shape[0] < 1:
        raise ValueError(f"lm_head must have shape [V, {x.shape[-1]}] (V >= 1), got {tuple(lm_head.shape)}")
    _like_x("lm_head", lm_head, x)
    _commit_state(draft_tokens, num_drafted, cache_len, tokens_in, history, report, x.shape[0], x.shape[1], "x", x)
