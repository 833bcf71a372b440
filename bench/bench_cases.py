"""What the microbenchmarks measure, shared by test_bench_*.py and kernel_report.py:

  - every op in kangaroo_ext.ops, per backend, at decode shapes of SmolLM2-135M (hidden 576, 9 query
    and 3 KV heads of 64, vocab 49,152, γ = 6; attention after 1,024 cached positions) plus one large
    RMSNorm where bandwidth, not launch latency, dominates;
  - the engine's two decode phases on the default model: one draft round and one verify step, as the
    CUDA graphs the engine itself captured (engine.graphs.draft / .verify).
"""
import dataclasses
import time
from typing import Callable, Dict, List, Optional

import torch

import kangaroo_ext.ops as kops
from kangaroo_ext.engine.engine import engine_for
from kangaroo_ext.io import chat_ids

DTYPE = torch.bfloat16
MAX_DRAFT = 6     # γ of the engine phases (speculative_generate's default)
DEVICE = "cuda"  # a module setting, so the cases can be dry-run on the CPU (reference backend)
CHAT_PROMPTS = [
    "Explain how a bicycle stays upright while it is moving.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main differences between Python lists and tuples? Give examples.",
    "Summarise the causes of the French Revolution in a few paragraphs.",
]


# ---- ops -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class OpCase:
    op: str                                   # kangaroo_ext.ops function name
    shape: str                                # the last part of the key "<op>/<backend>/<shape>"
    launches: int                             # launches per captured graph (fewer for large shapes)
    make: Callable[[str], Callable[[], object]]  # backend -> a call of the op on preallocated inputs
    nbytes: int                               # bytes read + written by one launch (the op's minimum)

    def key(self, backend: str) -> str:
        return f"{self.op}/{backend}/{self.shape}"


def _elsize(dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _rms_case(M: int, H: int, launches: int) -> OpCase:
    def make(backend):
        x = torch.randn(M, H, device=DEVICE, dtype=DTYPE)
        residual = torch.randn_like(x)
        weight = torch.rand(H, device=DEVICE, dtype=DTYPE) + 0.5
        # Forced backend: raises BackendUnavailable with its reasons rather than timing another one.
        kops.fused_add_rms_norm(x, residual, weight, 1e-5, backend=backend)
        return lambda: kops.fused_add_rms_norm(x, residual, weight, 1e-5, backend=backend)
    # reads x, residual, weight; writes out, residual_out
    return OpCase("fused_add_rms_norm", f"{M}x{H}", launches, make, (4 * M * H + H) * _elsize(DTYPE))


def _verify_case(B: int, k: int, V: int, launches: int) -> OpCase:
    def make(backend):
        logits = torch.randn(B, k + 1, V, device=DEVICE, dtype=DTYPE)
        drafts = logits[:, :k].argmax(dim=-1)
        drafts[:, k // 2:] = (drafts[:, k // 2:] + 1) % V   # half the chain agrees: a typical partial accept
        num_drafted = torch.full((B,), k, dtype=torch.int64, device=DEVICE)
        kops.verify_accept(drafts, logits, num_drafted, backend=backend)
        return lambda: kops.verify_accept(drafts, logits, num_drafted, backend=backend)
    # reads logits, drafts, num_drafted; writes accepted, committed
    nbytes = B * (k + 1) * V * _elsize(DTYPE) + 8 * (B * k + B + B + B * (k + 1))
    return OpCase("verify_accept", f"B{B}-k{k}-V{V}", launches, make, nbytes)


def _accept_greedy_case(B: int, k: int, launches: int) -> OpCase:
    """The greedy verify's accept step on the target's tokens (lm_head_argmax over the k+1 rows gives them)."""
    def make(backend):
        target = torch.randint(0, 49152, (B, k + 1), device=DEVICE)
        drafts = target[:, :k].clone()
        drafts[:, k // 2:] += 1                             # half the chain agrees: a typical partial accept
        num_drafted = torch.full((B,), k, dtype=torch.int64, device=DEVICE)
        kops.accept_greedy(drafts, target, num_drafted, backend=backend)
        return lambda: kops.accept_greedy(drafts, target, num_drafted, backend=backend)
    # reads drafts, target tokens, num_drafted; writes accepted, committed
    return OpCase("accept_greedy", f"B{B}-k{k}", launches, make, 8 * (B * k + B * (k + 1) + B + B + B * (k + 1)))


def _take_draft_case(B: int, G: int, N: int, launches: int) -> OpCase:
    """A greedy draft step's bookkeeping after the draft head, with a reduced draft vocabulary of N tokens
    (the index -> token id lookup fused in), at draft step G // 2 of a round of G."""
    def make(backend):
        token = torch.randint(0, N, (B, 1), device=DEVICE)
        confidence = torch.rand(B, 1, device=DEVICE)
        threshold = torch.tensor(0.5, device=DEVICE)
        active = torch.ones(B, dtype=torch.bool, device=DEVICE)
        num_drafted = torch.zeros(B, dtype=torch.int64, device=DEVICE)
        draft_tokens = torch.zeros(B, G, dtype=torch.int64, device=DEVICE)
        tokens_in = torch.zeros(B, G + 1, dtype=torch.int64, device=DEVICE)
        draft_ids = torch.randperm(49152, device=DEVICE)[:N]
        args = (token, confidence, threshold, active, num_drafted, draft_tokens, tokens_in, G // 2, draft_ids)
        kops.take_draft(*args, backend=backend)
        return lambda: kops.take_draft(*args, backend=backend)
    # per row: reads token, confidence, active, num_drafted and one draft id; writes two token ids,
    # num_drafted, active and keep. Plus η.
    nbytes = B * (8 + 4 + 1 + 8 + 8) + B * (8 + 8 + 8 + 1 + 1) + 4
    return OpCase("take_draft", f"B{B}-G{G}-N{N}", launches, make, nbytes)


# Sampling settings: plain temperature sampling, and a typical filtered one (both filters searched).
SAMPLING_SETTINGS = {"T1": (1.0, 0, 1.0), "T0.7-k50-p0.9": (0.7, 50, 0.9)}


def _sampling_case(op: str, rows: int, V: int, setting: str, launches: int) -> OpCase:
    """sampling_probs / sample_logits on `rows` logit rows (a draft step samples one)."""
    def make(backend):
        logits = torch.randn(rows, V, device=DEVICE, dtype=DTYPE) * 3
        rng = torch.tensor([1, 0], dtype=torch.int64, device=DEVICE)
        args = (logits, *SAMPLING_SETTINGS[setting]) + ((rng, 0) if op == "sample_logits" else ())
        fn = getattr(kops, op)
        fn(*args, backend=backend)
        return lambda: fn(*args, backend=backend)
    # reads the logits; writes fp32 probabilities (+ token and top_prob)
    return OpCase(op, f"{rows}x{V}-{setting}", launches, make, rows * V * (_elsize(DTYPE) + 4) + 12 * rows)


def _sample_accept_case(B: int, k: int, V: int, setting: str, launches: int) -> OpCase:
    """speculative_sample_accept at verify_accept's shape (compare with verify_accept/B1-k6-V49152)."""
    def make(backend):
        temperature, top_k, top_p = SAMPLING_SETTINGS[setting]
        logits = torch.randn(B, k + 1, V, device=DEVICE, dtype=DTYPE) * 3
        # The draft's distributions: the target's plus noise, so drafts are often (not always) accepted.
        q = kops.sampling_probs((logits[:, :k].float() + torch.randn(B, k, V, device=DEVICE)).contiguous(),
                                temperature, top_k, top_p, backend="reference")
        drafts = torch.multinomial(q.reshape(-1, V), 1).reshape(B, k)
        num_drafted = torch.full((B,), k, dtype=torch.int64, device=DEVICE)
        rng = torch.tensor([1, 0], dtype=torch.int64, device=DEVICE)
        args = (drafts, q, logits, num_drafted, temperature, top_k, top_p, rng)
        kops.speculative_sample_accept(*args, backend=backend)
        return lambda: kops.speculative_sample_accept(*args, backend=backend)
    # the minimum: every target logit once, one row of q (the residual), drafts and outputs
    nbytes = B * (k + 1) * V * _elsize(DTYPE) + B * V * 4 + 8 * (B * k + B + B + B * (k + 1)) + 16
    return OpCase("speculative_sample_accept", f"B{B}-k{k}-V{V}-{setting}", launches, make, nbytes)


def _attention_case(T: int, context: int, capacity: int, launches: int, Hq=9, Hkv=3, D=64) -> OpCase:
    """T new positions after `context` cached ones (T = 1: a draft or plain step; T = γ+1: verify),
    SmolLM2's heads, a static cache of `capacity` positions."""
    def make(backend):
        q = torch.randn(1, T, Hq, D, device=DEVICE, dtype=DTYPE)
        k = torch.randn(1, T, Hkv, D, device=DEVICE, dtype=DTYPE)
        v = torch.randn_like(k)
        inv_freq = 1.0 / (100000.0 ** (torch.arange(0, D, 2, device=DEVICE, dtype=torch.float32) / D))
        freqs = torch.arange(capacity, device=DEVICE, dtype=torch.float32)[:, None] * inv_freq[None, :]
        cos, sin = torch.cat([freqs, freqs], dim=-1).cos(), torch.cat([freqs, freqs], dim=-1).sin()
        positions = torch.arange(context, context + T, device=DEVICE)[None, :]
        k_cache = torch.randn(1, Hkv, capacity, D, device=DEVICE, dtype=DTYPE)
        v_cache = torch.randn_like(k_cache)
        args = (q, k, v, cos, sin, positions, k_cache, v_cache, D ** -0.5, 0)
        kops.rope_append_attention(*args, backend=backend)
        return lambda: kops.rope_append_attention(*args, backend=backend)
    es = _elsize(DTYPE)
    # minimum: q, k, v and their RoPE rows in; K and V up to the last position; k, v into the cache; output
    nbytes = (T * (Hq + 2 * Hkv) * D * es + 2 * T * D * 4 + 2 * Hkv * (context + T) * D * es
              + 2 * T * Hkv * D * es + T * Hq * D * es)
    return OpCase("rope_append_attention", f"T{T}-ctx{context}-S{capacity}", launches, make, nbytes)


def _head_case(T: int, H: int, V: int, launches: int) -> OpCase:
    def make(backend):
        hidden = torch.randn(1, T, H, device=DEVICE, dtype=DTYPE)
        lm_head = torch.randn(V, H, device=DEVICE, dtype=DTYPE) * H ** -0.5
        kops.lm_head_argmax(hidden, lm_head, backend=backend)
        return lambda: kops.lm_head_argmax(hidden, lm_head, backend=backend)
    # the LM head once, the hidden states, token (int64) + confidence (fp32) out; no logits written
    return OpCase("lm_head_argmax", f"{T}x{H}-V{V}", launches, make, (V * H + T * H) * _elsize(DTYPE) + 12 * T)


def _commit_state(B: int, k: int, capacity: int = 4096):
    """Engine-shaped commit buffers (cache_len, tokens_in, history, report) and drafts half of which agree."""
    target = torch.randint(0, 49152, (B, k + 1), device=DEVICE)
    drafts = target[:, :k].clone()
    drafts[:, k // 2:] += 1                                 # half the chain agrees: a typical partial accept
    num_drafted = torch.full((B,), k, dtype=torch.int64, device=DEVICE)
    state = (torch.zeros(B, dtype=torch.int64, device=DEVICE), torch.zeros(B, k + 1, dtype=torch.int64, device=DEVICE),
             torch.zeros(B, capacity, dtype=torch.int64, device=DEVICE),
             torch.zeros(B, k + 3, dtype=torch.int64, device=DEVICE))
    return drafts, target, num_drafted, state


def _accept_commit_case(B: int, k: int, launches: int) -> OpCase:
    """A greedy step's accept rule and commit in one launch (each call advances cache_len; the history write
    past its end is dropped by design, so repeated calls stay in bounds)."""
    def make(backend):
        drafts, target, num_drafted, state = _commit_state(B, k)
        kops.accept_commit(drafts, target, num_drafted, *state, backend=backend)
        return lambda: kops.accept_commit(drafts, target, num_drafted, *state, backend=backend)
    return OpCase("accept_commit", f"B{B}-k{k}", launches, make, 8 * B * (4 * (k + 1) + 6))


def _verify_tail_case(T: int, H: int, V: int, launches: int) -> OpCase:
    """The fused end of a greedy step: final norm, LM-head argmax at T positions, accept and commit."""
    def make(backend):
        x = torch.randn(1, T, H, device=DEVICE, dtype=DTYPE)
        res = torch.randn_like(x)
        nw = torch.rand(H, device=DEVICE, dtype=DTYPE) + 0.5
        lm_head = torch.randn(V, H, device=DEVICE, dtype=DTYPE) * H ** -0.5
        drafts, _, num_drafted, state = _commit_state(1, T - 1)
        args = (x, res, nw, 1e-5, lm_head, drafts, num_drafted, *state)
        kops.verify_tail(*args, backend=backend)
        return lambda: kops.verify_tail(*args, backend=backend)
    # the LM head once, x and the residual in, the tokens and the commit's few int64 out
    return OpCase("verify_tail", f"{T}x{H}-V{V}", launches, make, (V * H + 2 * T * H + H) * _elsize(DTYPE) + 64 * T)


def _linear_case(op: str, M: int, K: int, Ns, launches: int, residual: bool = True) -> OpCase:
    """The decode GEMV ops: decode_linear (one weight [N, K]), rms_norm_linear (weights [N_i, K], e.g.
    q/k/v), rms_norm_gate_up (gate and up [N, K]); M rows of x."""
    def make(backend):
        x = torch.randn(M, K, device=DEVICE, dtype=DTYPE)
        res = torch.randn_like(x) if residual else None
        nw = torch.rand(K, device=DEVICE, dtype=DTYPE) + 0.5
        ws = [torch.randn(n, K, device=DEVICE, dtype=DTYPE) * K ** -0.5 for n in Ns]
        if op == "decode_linear":
            call = lambda: kops.decode_linear(x, ws[0], None, backend=backend)  # noqa: E731
        elif op == "rms_norm_linear":
            call = lambda: kops.rms_norm_linear(x, res, nw, 1e-5, ws, backend=backend)  # noqa: E731
        else:
            call = lambda: kops.rms_norm_gate_up(x, res, nw, 1e-5, ws[0], ws[1], backend=backend)  # noqa: E731
        call()
        return call
    es = _elsize(DTYPE)
    n_out = Ns[0] if op == "rms_norm_gate_up" else sum(Ns)
    # the weights once, x (and residual, norm weight) in, outputs (and residual_out) out
    nbytes = (sum(Ns) * K + M * K + M * n_out) * es
    if op != "decode_linear":
        nbytes += (K + (2 * M * K if residual else M * K)) * es
    shape = f"{M}x{K}-N{'+'.join(str(n) for n in Ns)}"
    return OpCase(op, shape, launches, make, nbytes)


OP_CASES: Dict[str, List[OpCase]] = {
    "fused_add_rms_norm": [_rms_case(1, 576, 200), _rms_case(7, 576, 200), _rms_case(4096, 4096, 10)],
    "verify_accept": [_verify_case(1, 6, 49152, 200)],
    "accept_greedy": [_accept_greedy_case(1, 6, 200)],
    "accept_commit": [_accept_commit_case(1, 0, 200), _accept_commit_case(1, 6, 200)],
    # the fused greedy tail of a plain step (1 row) and of a verify of 6 drafts (7 rows)
    "verify_tail": [_verify_tail_case(1, 576, 49152, 50), _verify_tail_case(7, 576, 49152, 50)],
    "take_draft": [_take_draft_case(1, 6, 8192, 200)],   # the shipped draft vocabulary: 8,192 tokens
    "sampling_probs": [_sampling_case("sampling_probs", 1, 49152, s, 50) for s in SAMPLING_SETTINGS],
    "sample_logits": [_sampling_case("sample_logits", 1, 49152, s, 50) for s in SAMPLING_SETTINGS],
    "speculative_sample_accept": [_sample_accept_case(1, 6, 49152, s, 50) for s in SAMPLING_SETTINGS],
    "rope_append_attention": [_attention_case(1, 1024, 2048, 100), _attention_case(7, 1024, 2048, 100)],
    # 1 row: a plain step; 7 rows: a greedy verify of 6 drafts (then accept_greedy on its tokens)
    "lm_head_argmax": [_head_case(1, 576, 49152, 50), _head_case(7, 576, 49152, 50)],
    # SmolLM2-135M's layer shapes (q/k/v 576/192/192, MLP 1536) at decode (1 row) and verify (7 rows),
    # plus Llama-7B-sized matrices, where the weight stream, not launch latency, dominates.
    "rms_norm_linear": [_linear_case("rms_norm_linear", 1, 576, (576, 192, 192), 200),
                        _linear_case("rms_norm_linear", 7, 576, (576, 192, 192), 200),
                        _linear_case("rms_norm_linear", 1, 4096, (4096, 4096, 4096), 20)],
    "rms_norm_gate_up": [_linear_case("rms_norm_gate_up", 1, 576, (1536, 1536), 200),
                         _linear_case("rms_norm_gate_up", 7, 576, (1536, 1536), 200),
                         _linear_case("rms_norm_gate_up", 1, 4096, (11008, 11008), 10)],
    "decode_linear": [_linear_case("decode_linear", 1, 1536, (576,), 200, residual=False),
                      _linear_case("decode_linear", 7, 1536, (576,), 200, residual=False),
                      _linear_case("decode_linear", 1, 576, (576,), 200, residual=False),
                      _linear_case("decode_linear", 1, 11008, (4096,), 20, residual=False)],
}


def registered_ops() -> List[str]:
    """Every op the package dispatches (its backend registry), so a new op without a case shows up."""
    return sorted(kops.backends._IMPLS)


def missing_cases() -> List[str]:
    return [op for op in registered_ops() if op not in OP_CASES]


def backends() -> Dict[str, List[str]]:
    """Backend -> reasons it cannot run here ([] = it can)."""
    return kops.available_backends()


# ---- the engine on the default model -------------------------------------------------------------

def _weight_bytes(layer) -> int:
    return sum(t.numel() * t.element_size() for f in dataclasses.fields(layer)
               for t in [getattr(layer, f.name)] if isinstance(t, torch.Tensor))


class DefaultEngine:
    """The default model (bf16, CUDA) and its engine after one Kangaroo generation: the engine holds
    the captured draft / verify graphs and a realistic cache length. restore() puts back the decode
    state (cache and output lengths, pending token) so every timed replay does the same work.

    model / adapter / prompt (token ids [1, L]) replace the default model, its adapter and the chat
    prompt, e.g. a random-weight model of another shape (bench/shaped_models.py)."""

    def __init__(self, new_tokens: int = 128, model=None, adapter=None, prompt: Optional[torch.Tensor] = None):
        import kangaroo_ext as kx
        t0 = time.perf_counter()
        if model is None:
            self.model, self.tokenizer = kx.load_default_model(device=DEVICE, dtype=DTYPE)
            self.adapter = kx.load_default_adapter(self.model)
            self.prompt = chat_ids(self.tokenizer, CHAT_PROMPTS[0])
        else:
            if adapter is None or prompt is None:
                raise ValueError("DefaultEngine: a model given needs its adapter and a prompt (token ids [1, L])")
            self.model, self.tokenizer, self.adapter, self.prompt = model, None, adapter, prompt
        self.load_s = time.perf_counter() - t0
        out = kx.speculative_generate(self.model, self.prompt, adapter=self.adapter,   # the adapter's round
                                      max_new_tokens=new_tokens, max_draft=MAX_DRAFT, copy_draft=False)
        assert out.stats.mode == "graphs", out.stats.mode
        self.engine = engine_for(self.model)
        self.graphs, _ = self.engine.graphs_for(MAX_DRAFT, True, device_exit=out.stats.device_exit)
        self._saved = {n: getattr(self.engine, n).clone() for n in ("cache_len", "tokens_in")}
        torch.cuda.synchronize()

    def restore(self, drafts: Optional[int] = None):
        """Put back the decode state, set for a round of `drafts` drafts (default γ: the whole round).
        Where the GPU applies the confidence exit (graphs.device_exit) this sets the work a replay does:
        the draft graph runs every step at η = 0 and only step 0 at η = 2 (no confidence reaches it),
        the verify graph verifies num_drafted + 1 positions."""
        drafts = self.graphs.gamma if drafts is None else drafts
        with torch.inference_mode():  # the engine's buffers are inference tensors (made by speculative_generate)
            for name, saved in self._saved.items():
                getattr(self.engine, name).copy_(saved)
            self.engine.num_drafted.fill_(drafts)
            if drafts in (0, self.graphs.gamma):
                self.engine.threshold.fill_(0.0 if drafts else 2.0)

    def restore_and_sync(self):
        self.restore()
        torch.cuda.synchronize()

    def describe(self) -> dict:
        e, s = self.engine, self.engine.spec
        return {"gamma": self.graphs.gamma, "exit_layer": self.adapter.exit_layer, "layers": s.num_layers,
                "cache_len": int(self._saved["cache_len"][0]), "cache_capacity": e.capacity}

    def phase_bytes(self) -> Dict[str, int]:
        """Minimum bytes one phase reads: weights once per step that uses them (decode GEMVs re-read
        them), the LM head per draft, and each attention's K and V up to the last position (a kernel
        that reads the whole static cache moves more, and its GB/s counts only this minimum)."""
        e, s = self.engine, self.engine.spec
        g, ell = self.graphs.gamma, self.adapter.exit_layer
        positions = int(self._saved["cache_len"][0]) + g + 1
        kv = 2 * e.ROWS * s.num_kv_heads * positions * s.head_dim * e.k_cache.element_size()  # one layer's K, V
        lm_head = s.lm_head.numel() * s.lm_head.element_size()
        shallow = sum(_weight_bytes(w) for w in s.layers[:ell]) + sum(_weight_bytes(w) for w in e.adapter_weights)
        deep = sum(_weight_bytes(w) for w in s.layers[ell:])
        return {"draft_round": (g + 1) * (shallow + (ell + 1) * kv) + g * lm_head,
                "verify_step": deep + (s.num_layers - ell) * kv + lm_head}


def decode_speeds(model, tokenizer, adapter, prompts=CHAT_PROMPTS, max_new_tokens: int = 256) -> dict:
    """kx.generate and kx.speculative_generate over chat prompts, after a warm-up on the longest one
    (the engine's buffers then never grow, so no graph is re-captured while timing). Methods run one
    after the other: they use different graphs. tok/s = total tokens / total decode time."""
    import kangaroo_ext as kx
    ids = [chat_ids(tokenizer, p) for p in prompts]
    longest = max(ids, key=len)
    eos = tokenizer.eos_token_id
    out = {}
    for name, run in (("plain", lambda x: kx.generate(model, x, max_new_tokens=max_new_tokens, eos_token_id=eos)),
                      ("speculative", lambda x: kx.speculative_generate(model, x, adapter=adapter, eos_token_id=eos,
                                                                        max_new_tokens=max_new_tokens))):
        run(longest)
        run(longest)
        stats = [run(x).stats for x in ids]
        tokens, seconds = sum(s.new_tokens for s in stats), sum(s.total_s for s in stats)
        rounds = sum(s.rounds for s in stats)
        out[name] = {"tok_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds, "rounds": rounds,
                     "host_syncs_per_round": sum(s.host_syncs for s in stats) / rounds,
                     "mean_accepted": (sum(sum(s.accepted) for s in stats) + rounds) / rounds,
                     "recaptures": sum(1 for s in stats if s.capture_s > 0)}
    return out
