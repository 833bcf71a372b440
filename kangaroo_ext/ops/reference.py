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


def accept_greedy(draft_tokens: torch.Tensor, target_tokens: torch.Tensor,
                  num_drafted: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The greedy accept rule: longest prefix of drafts equal to the target's tokens, plus one token.

    draft_tokens: [B, k] int64; target_tokens: [B, k+1] int64, the target's argmax at each position
    (target_tokens[:, j] follows draft j-1; j = 0: follows the last committed token);
    num_drafted: [B] int64 (clamped to [0, k]) or None (= k).
    Returns accepted [B] int64 (a) and committed [B, k+1] int64: drafts 0..a-1, then target_tokens[:, a]
    (correction, or bonus when every draft matched), then -1.
    """
    B, k = draft_tokens.shape
    n = torch.full((B,), k, dtype=torch.int64, device=draft_tokens.device) if num_drafted is None \
        else num_drafted.clamp(0, k)                                       # [B]
    j = torch.arange(k, device=draft_tokens.device)                        # [k]
    match = (draft_tokens == target_tokens[:, :k]) & (j[None, :] < n[:, None])  # [B, k]
    accepted = match.long().cumprod(dim=1).sum(dim=1)                      # [B]
    pos = torch.arange(k + 1, device=draft_tokens.device)[None, :]         # [1, k+1]
    drafts_padded = torch.cat([draft_tokens, draft_tokens.new_full((B, 1), -1)], dim=1)  # [B, k+1]
    committed = torch.where(pos < accepted[:, None], drafts_padded,
                            torch.where(pos == accepted[:, None], target_tokens, torch.full_like(target_tokens, -1)))
    return accepted, committed


def take_draft(token: torch.Tensor, confidence: torch.Tensor, threshold: torch.Tensor, active: torch.Tensor,
               num_drafted: torch.Tensor, draft_tokens: torch.Tensor, tokens_in: torch.Tensor, step: int,
               draft_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A greedy draft step's bookkeeping after the draft head: record its proposal as draft `step`, which
    a row keeps while it is still drafting and its confidence is >= η (NaN never is).

    token: [B, 1] int64, the head's argmax (an index into draft_ids when given, else a token id);
    confidence: [B, 1] float32; threshold: [] float32 (η); active: [B] bool and num_drafted: [B] int64,
    updated in place; draft_tokens: [B, G] int64 (column step written); tokens_in: [B, G+1] int64
    (column step + 1 written); 0 <= step < G; draft_ids: [N] int64 (draft index -> token id) or None.
    Returns keep [B] bool, a new tensor (active holds a copy of it).
    """
    t = token if draft_ids is None else draft_ids[token.clamp_min(0)]        # [B, 1] token ids
    keep = active & (confidence[:, 0] >= threshold)                          # [B]; NaN >= η is False
    draft_tokens[:, step] = t[:, 0]
    tokens_in[:, step + 1] = t[:, 0]
    num_drafted.add_(keep.long())
    active.copy_(keep)
    return keep


def accept_commit(draft_tokens: torch.Tensor, target_tokens: torch.Tensor, num_drafted: torch.Tensor,
                  cache_len: torch.Tensor, tokens_in: torch.Tensor, history: torch.Tensor,
                  report: torch.Tensor) -> None:
    """Greedy verification's end, in place: accept_greedy, then the engine's commit (Engine._commit, greedy).

    draft_tokens [B, k], target_tokens [B, k+1], num_drafted [B] int64 as accept_greedy's; cache_len [B],
    tokens_in [B, >= 1], history [B, >= L + k + 2], report [B, >= k + 3] int64 (rounds.Report's layout):
    history[b, L+1 .. L+1+k] = committed; cache_len += accepted + 1; tokens_in[:, 0] = the committed token
    at `accepted`; report = [accepted, num_drafted, committed...]."""
    accepted, committed = accept_greedy(draft_tokens, target_tokens, num_drafted)
    n = committed.shape[1]
    steps = torch.arange(n, device=committed.device)
    history.scatter_(1, cache_len[:, None] + 1 + steps, committed)
    cache_len.add_(accepted + 1)
    tokens_in[:, 0] = committed.gather(1, accepted[:, None])[:, 0]
    report[:, 0] = accepted
    report[:, 1] = num_drafted
    report[:, 2:2 + n] = committed


def verify_tail(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                lm_head: torch.Tensor, draft_tokens: torch.Tensor, num_drafted: torch.Tensor, cache_len: torch.Tensor,
                tokens_in: torch.Tensor, history: torch.Tensor, report: torch.Tensor) -> torch.Tensor:
    """A greedy verify or plain step's end: the final norm, the target's argmax over the full vocabulary at each
    position, then accept_commit (in place). x, residual: [B, T, H] (T = k + 1 positions); norm_weight [H];
    lm_head [V, H]; the rest as accept_commit's. Returns target_tokens [B, T] int64."""
    y, _ = fused_add_rms_norm(x, residual, norm_weight, eps)                   # [B, T, H]
    target_tokens = lm_head_argmax(y, lm_head)[0]                              # [B, T]
    accept_commit(draft_tokens, target_tokens, num_drafted, cache_len, tokens_in, history, report)
    return target_tokens


def verify_accept(draft_tokens: torch.Tensor, target_logits: torch.Tensor,
                  num_drafted: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification from logits: accept_greedy on the target's argmax (one accept rule).

    draft_tokens: [B, k] int64; target_logits: [B, k+1, V]; num_drafted: [B] int64 in [0, k] or None (= k).
    target_logits[:, j] scores the token that follows draft j-1 (j = 0: follows the last committed token).
    Returns accepted [B] int64 and committed [B, k+1] int64, as accept_greedy.
    """
    return accept_greedy(draft_tokens, target_logits.argmax(dim=-1), num_drafted)  # argmax: first max wins


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


# ---- sampling: counter-based random numbers, filtered probabilities, lossless speculative sampling ----
# Randomness is a pure function of (seed, offset, row, stream, element): Philox4x32-10 (Salmon et al.
# 2011) with key = the seed's two 32-bit halves and counter = (i // 4, row, stream, offset mod 2^32);
# element i takes word i % 4. Every backend computes the same words, so they draw the same samples.

ACCEPT_STREAM = 0x7fff0000  # speculative_sample_accept's accept tests; ACCEPT_STREAM + 1: its resample race
_MASK32 = 0xffffffff
_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY_STEP = (0x9E3779B9, 0xBB67AE85)


def _mulhilo32(a: torch.Tensor, b: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for int64 a in [0, 2^32) and a 32-bit constant b, in int64 without
    overflow: b is split into 16-bit halves, so no partial product reaches 2^50."""
    low_part = a * (b & 0xffff)                         # < 2^48
    t = a * (b >> 16) + (low_part >> 16)                # a * b = t * 2^16 + (low_part & 0xffff), t < 2^49
    return t >> 16, ((t & 0xffff) << 16) | (low_part & 0xffff)


def philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10. counter: [..., 4], key: [..., 2], int64 tensors holding uint32 values (broadcast).
    Returns [..., 4] int64 uint32 words."""
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key.unbind(-1)
    for _ in range(10):
        hi0, lo0 = _mulhilo32(c0, _PHILOX_MUL[0])
        hi1, lo1 = _mulhilo32(c2, _PHILOX_MUL[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_KEY_STEP[0]) & _MASK32, (k1 + _PHILOX_KEY_STEP[1]) & _MASK32
    return torch.stack(torch.broadcast_tensors(c0, c1, c2, c3), dim=-1)


def uniform(seed, offset, row, stream, i) -> torch.Tensor:
    """float32 uniforms in (0, 1) for element i of `row` in `stream`: ((word >> 9) + 0.5) * 2^-23, exact
    in float32 (2^23 values, 2^-24 <= u <= 1 - 2^-24). All arguments are ints or int64 tensors; broadcast."""
    i = torch.as_tensor(i, dtype=torch.int64)
    seed = torch.as_tensor(seed, dtype=torch.int64, device=i.device)
    as_int = lambda v: torch.as_tensor(v, dtype=torch.int64, device=seed.device)  # noqa: E731
    i = i.to(seed.device)
    counter = torch.stack(torch.broadcast_tensors(i // 4, as_int(row), as_int(stream), as_int(offset) & _MASK32), -1)
    key = torch.stack([seed & _MASK32, (seed >> 32) & _MASK32], -1)           # [2]
    words = philox4x32_10(counter, key)                                        # [..., 4]
    word = words.gather(-1, (i % 4).expand(words.shape[:-1])[..., None])[..., 0]
    return ((word >> 9).float() + 0.5) * 2.0 ** -23


def _uniform_prefix(seed, offset, row: torch.Tensor, stream: int, V: int) -> torch.Tensor:
    """uniform(seed, offset, row[:, None], stream, arange(V)) in a quarter of the work: one Philox call per
    counter i // 4 yields the words of four elements. row: [R]. Returns [R, V]."""
    groups = torch.arange((V + 3) // 4, device=row.device)                     # [G]
    words = philox4x32_10(
        torch.stack(torch.broadcast_tensors(groups[None, :], row[:, None], torch.as_tensor(stream, device=row.device),
                                            torch.as_tensor(offset, device=row.device) & _MASK32), -1),
        torch.stack([torch.as_tensor(seed) & _MASK32, (torch.as_tensor(seed) >> 32) & _MASK32], -1).to(row.device))
    word = words.reshape(row.shape[0], -1)[:, :V]                              # [R, V]: word i % 4 of group i // 4
    return ((word >> 9).float() + 0.5) * 2.0 ** -23


def exponential_race(w: torch.Tensor, seed, offset, row: torch.Tensor, stream: int) -> torch.Tensor:
    """A sample from the unnormalized weights w: argmax_i w_i / E_i over {w_i > 0}, E_i = -log(u_i) i.i.d.
    Exp(1), so i wins with probability w_i / sum(w) (the minimum of independent Exp(w_i) clocks E_i / w_i).
    No normalization, no prefix sum, any summation order. w: [R, V] >= 0; row: [R]. Returns [R] int64
    (the first index on ties; -1 where no w_i > 0, e.g. NaN rows)."""
    clock = -torch.log(_uniform_prefix(seed, offset, row, stream, w.shape[-1]))  # [R, V] Exp(1)
    key = torch.where(w > 0, w / clock, -1.0)                                  # [R, V]
    return torch.where((w > 0).any(-1), key.argmax(-1), -1)


def _mass_strictly_above(weight: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """[..., V]: for each token, the probability of the tokens with a strictly larger weight (ties excluded)."""
    w_sorted, order = weight.sort(-1, descending=True)                         # [..., V]
    p_sorted = p.gather(-1, order)
    before = torch.cat([torch.zeros_like(p_sorted[..., :1]), p_sorted.cumsum(-1)[..., :-1]], -1)
    group_start = torch.searchsorted(-w_sorted, -w_sorted)                     # first rank of each tie group
    return torch.empty_like(p).scatter_(-1, order, before.gather(-1, group_start))


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution a sampler draws from: temperature, then top-k, then top-p, as float32.

    logits: [..., V] float32/16/bf16 (float64: computed in float64, the tests' exact reference).
    z = logits / float32(temperature). top-k (0 < k < V): keep z >= the k-th largest z (ties kept).
    Softmax over the kept tokens. top-p (< 1): keep token i iff the probability of the tokens strictly
    more probable than i (larger weight exp(z - max z)) is < top_p: the smallest set of most probable
    tokens reaching top_p, whole tie groups. Renormalize; removed tokens are exactly 0. Rows with a NaN
    or +inf z, or only -inf, are all NaN. Returns [..., V].
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    # torch.full, not torch.tensor: no host-to-device copy, so a CUDA graph can capture it
    t = torch.full((), temperature, dtype=torch.float32, device=logits.device).to(dtype)
    z = logits.to(dtype) / t                                                   # [..., V]
    bad = (z.isnan() | (z == float("inf"))).any(-1, keepdim=True) | (z == float("-inf")).all(-1, keepdim=True)
    z = z.masked_fill(bad, 0.0)                                                # NaN rows: filled in at the end
    if 0 < top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[..., -1:]                           # [..., 1] the k-th largest
        z = z.masked_fill(z < kth, float("-inf"))
    weight = torch.exp(z - z.amax(-1, keepdim=True))                           # [..., V], the top one is 1
    p = weight / weight.sum(-1, keepdim=True)
    if top_p < 1.0:
        p = torch.where(_mass_strictly_above(weight, p) < top_p, p, 0.0)
        p = p / p.sum(-1, keepdim=True)
    return p.masked_fill(bad, float("nan"))


def sample_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, rng: torch.Tensor,
                  stream: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A token from sampling_probs(logits, ...) per row by the exponential race (row = flattened row index).

    logits: [..., V]; rng: int64 [2] = (seed, offset). Returns token [...] int64 (-1 for NaN rows),
    probs [..., V] float32 and top_prob [...] float32 (the largest probability).
    """
    probs = sampling_probs(logits, temperature, top_k, top_p)                  # [..., V]
    flat = probs.reshape(-1, probs.shape[-1])                                  # [R, V]
    rows = torch.arange(flat.shape[0], device=flat.device)
    token = exponential_race(flat, rng[0], rng[1], rows, stream)               # [R]
    return token.reshape(probs.shape[:-1]), probs, probs.amax(-1)


def speculative_sample_accept(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_logits: torch.Tensor,
                              num_drafted: Optional[torch.Tensor], temperature: float, top_k: int, top_p: float,
                              rng: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023, Chen et al. 2023): commits tokens distributed exactly
    as sampling_probs(target_logits, ...) whatever the drafts and their distribution q.

    draft_tokens: [B, k] int64; draft_probs: [B, k, V] float32 (q_j, already filtered); target_logits:
    [B, k+1, V]; num_drafted: [B] int64 (clamped to [0, k]) or None (= k); rng: int64 [2] = (seed, offset).
    Draft j (j < n) is accepted with probability min(1, p_j(x_j) / q_j(x_j)); a = the first rejection
    (or n). The next token is drawn from max(0, p_a - q_a) normalized (or p_a if that is all zero) when
    a < n, from p_n (the bonus token) when every draft was accepted. Returns accepted [B] int64 (a) and
    committed [B, k+1] int64 (drafts[:a], the new token, then -1), or -1 everywhere for a row whose
    target logits at positions 0..n have a NaN or +inf (or only -inf).
    """
    B, k = draft_tokens.shape
    dev = draft_tokens.device
    seed, offset = rng[0], rng[1]
    rows = torch.arange(B, device=dev)
    p = sampling_probs(target_logits, temperature, top_k, top_p)               # [B, k+1, V] the target's law
    V = p.shape[-1]
    n = torch.full((B,), k, dtype=torch.int64, device=dev) if num_drafted is None else num_drafted.clamp(0, k)
    j = torch.arange(k, device=dev)                                            # [k]
    x = draft_tokens.clamp(0, V - 1)[..., None]                                # [B, k, 1]
    in_vocab = (draft_tokens >= 0) & (draft_tokens < V)                        # a draft outside [0, V): p = q = 0
    p_x = torch.where(in_vocab, p[:, :k].gather(-1, x)[..., 0], 0.0)          # [B, k]
    q_x = torch.where(in_vocab, draft_probs.gather(-1, x)[..., 0], 0.0)
    u = uniform(seed, offset, rows[:, None], ACCEPT_STREAM, j)                 # [B, k]
    accept = (u * q_x < p_x) & (j < n[:, None])                                # u < min(1, p/q), no division
    a = accept.long().cumprod(dim=1).sum(dim=1)                                # [B]: first rejection, or n
    p_a = p[rows, a]                                                           # [B, V]
    residual = (p_a - draft_probs[rows, a.clamp(max=k - 1)]).clamp(min=0)      # p_a - q_a where positive
    use_residual = (a < n) & (residual > 0).any(-1)
    w = torch.where(use_residual[:, None], residual, p_a)
    token = exponential_race(w, seed, offset, rows, ACCEPT_STREAM + 1)         # [B]
    pos = torch.arange(k + 1, device=dev)[None, :]                             # [1, k+1]
    bad = (p[:, :, 0].isnan() & (pos <= n[:, None])).any(1)                    # NaN rows are all NaN
    drafts_padded = torch.cat([draft_tokens, draft_tokens.new_full((B, 1), -1)], dim=1)
    committed = torch.where(pos < a[:, None], drafts_padded, torch.where(pos == a[:, None], token[:, None], -1))
    return torch.where(bad, -1, a), committed.masked_fill(bad[:, None], -1)


def ngram_draft(history: torch.Tensor, length: torch.Tensor, min_ngram: int, max_ngram: int,
                gamma: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt lookup (copied drafts): the longest n in [min_ngram, max_ngram] whose last n tokens
    history[b, L-n:L] also occur earlier (ending at e < L - 1; the two may overlap), its latest such
    occurrence, and the tokens that followed it: history[b, e+1 : e+1+γ], cut at L.

    history: [B, S] int64 (prompt + generated tokens; slots from L on are ignored); length: [B] int64
    (L). Returns tokens [B, γ] int64 (-1 past count), count [B] int64 (0: no match) and the matched n
    [B] int64 (0: none; a longer match predicts a longer accepted run). One pass over every candidate
    end with static shapes: no host sync, so it can run inside a captured round."""
    B, S = history.shape
    dev = history.device
    j = torch.arange(max_ngram, device=dev)                                    # [N]: steps back
    ends = torch.arange(S, device=dev)                                         # [S]: candidate end e
    back = ends[:, None] - j                                                   # [S, N]: e - j
    left = history[:, back.clamp(min=0)]                                       # [B, S, N]: history[e - j]
    right = history.gather(1, (length[:, None] - 1 - j).clamp(min=0))          # [B, N]: history[L-1-j]
    same = (left == right[:, None, :]) & (back >= 0)                           # [B, S, N]
    run = same.long().cumprod(-1).sum(-1)                                      # [B, S]: suffix matched at e, <= N
    run = torch.where(ends[None, :] < length[:, None] - 1, run, 0)             # strictly earlier occurrences
    score = torch.where(run >= min_ngram, run * S + ends, -1).amax(1)          # [B]: longest n, then latest e
    found = score >= 0
    end = score.clamp(min=0) % S                                               # [B]: e
    count = torch.where(found, (length - 1 - end).clamp(max=gamma), 0)         # [B]
    k = torch.arange(gamma, device=dev)                                        # [γ]
    tokens = history.gather(1, (end[:, None] + 1 + k).clamp(max=S - 1))        # [B, γ]
    return torch.where(k[None, :] < count[:, None], tokens, -1), count, torch.where(found, score // S, 0)


PERSISTENT_DRAFT_WEIGHTS = ("input_norm", "q", "k", "v", "q_bias", "k_bias", "v_bias", "o", "o_bias", "post_norm",
                            "gate", "up", "down", "down_bias")   # layer_weights: these 14 per layer, None allowed


def persistent_draft(embed, layer_weights, k_caches, v_caches, num_exit_layers: int, head_norm, head, draft_ids,
                     rope_cos, rope_sin, threshold, cache_len, tokens_in, draft_tokens, num_drafted, active,
                     exit_states, barrier, gamma: int, stop_at_exit: bool, eps: float, scale: float,
                     window: int, stamps=None) -> None:
    """A whole draft phase of one sequence: the engine's per-op draft steps (Engine.draft_step), written out.

    For j = 0..gamma (from j > 0 only while active[0] when stop_at_exit): the layers (the target's
    num_exit_layers, then the adapter's blocks; a block without gate has no MLP) on tokens_in[:, j] at
    cache_len + j, appending to k_caches / v_caches; exit_states[:, j] = the residual stream entering the
    adapter; for j < gamma the draft head's greedy proposal through take_draft. barrier, stamps: the CUDA
    kernel's (its arrival counters; its stage timing, which has no meaning here and is left as it is)."""
    n = len(layer_weights) // len(PERSISTENT_DRAFT_WEIGHTS)
    D = k_caches[0].shape[-1]
    for j in range(gamma + 1):
        if j and stop_at_exit and not bool(active[0]):
            break
        pos = cache_len[:, None] + j                                               # [1, 1]
        x, res = embed[tokens_in[:, j:j + 1]], None                                # [1, 1, H]
        for layer in range(n):
            w = dict(zip(PERSISTENT_DRAFT_WEIGHTS, layer_weights[layer * 14:(layer + 1) * 14]))
            (q, k, v), res = rms_norm_linear(x, res, w["input_norm"], eps, [w["q"], w["k"], w["v"]],
                                             [w["q_bias"], w["k_bias"], w["v_bias"]])
            if layer == num_exit_layers:
                exit_states[:, j] = res[:, 0]
            q, k, v = (t.view(1, 1, -1, D) for t in (q, k, v))                     # [1, 1, heads, D]
            attn = rope_append_attention(q, k, v, rope_cos, rope_sin, pos, k_caches[layer], v_caches[layer], scale,
                                         window)
            x = decode_linear(attn, w["o"], w["o_bias"])
            if w["gate"] is not None:
                act, res = rms_norm_gate_up(x, res, w["post_norm"], eps, w["gate"], w["up"])
                x = decode_linear(act, w["down"], w["down_bias"])
        if j == gamma:
            break
        y, _ = fused_add_rms_norm(x, res, head_norm, eps)
        token, confidence = lm_head_argmax(y, head)                                # [1, 1] each
        take_draft(token, confidence, threshold, active, num_drafted, draft_tokens, tokens_in, j, draft_ids)
