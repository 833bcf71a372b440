"""The decode engine: the target's own forward on a static KV cache, with Kangaroo's draft and verify steps.

State lives in preallocated device buffers; every step reads and writes them in place, so a step can
be captured once as a CUDA graph and replayed. Invariant between steps (per batch row):

    the sequence has L tokens; the last one, tokens_in[:, 0], is emitted but not yet fed to any layer;
    every cache (layers 0..N-1, then the adapter's blocks in slots N, N+1) holds positions 0..L-2; cache_len = L-1.

Rollback is just not advancing cache_len past the accepted tokens: rejected positions are overwritten
by the next round, and attention never reads past a query's own position.
"""
import contextlib
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import config, ops
from .cpu_linear import PackedLinear, unavailable_reason as cpu_packing_unavailable
from . import prefill as prompt_prefill
from .graphs import CudaGraphs
from .persistent_plain import SWITCH as PLAIN_SWITCH, PersistentPlainStep, kernel_weights
from .persistent_plain import engine_reasons as persistent_engine_reasons
from .rounds import Report
from .spec import LayerWeights, ModelSpec, model_spec

ADAPTER_SLOTS = 2  # KV-cache slots after the target's layers: one per adapter block (adapter.MAX_BLOCKS)
# Random streams within one round (ops.sample_logits): draft step j uses stream j; a step that samples
# the target's token directly (plain decoding, a verify with no draft) this one; the accept its own two.
TARGET_STREAM = ops.ACCEPT_STREAM - 1


@dataclass(frozen=True)
class Sampling:
    """How tokens are drawn: temperature, then top-k (0: off), then top-p (1.0: off). Part of the key of
    the captured graphs (the kernels take them as launch arguments)."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


class Engine:
    """Built once per (model, device, dtype); `reserve` sizes the buffers for a request.

    Buffers keep a leading batch dimension of 1 because the ops take [B, ...]; decoding is batch 1.
    `request()` serialises requests: two threads decoding with one engine would interleave writes to
    one cache, so the second waits for the first; a request started from inside another on the same
    thread (say, from a streamer) is refused."""
    ROWS = 1
    MAX_BOUND_ADAPTERS = 4

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.capacity = 0          # cache positions S
        self.max_draft = 0         # γ the buffers were sized for
        self.adapter = None
        self.adapter_weights: List[LayerWeights] = []
        self._lock = threading.Lock()
        self._owner: Optional[int] = None
        self.sampling: Optional[Sampling] = None  # None: greedy
        self._graphs: Dict[tuple, object] = {}  # CudaGraphs by (adapter, γ, ...), PrefillGraphs
        self._bindings: Dict[int, tuple] = {}         # id(adapter) -> its weights, head norm, draft head, ids
        self._plain_kernel: Optional[PersistentPlainStep] = None  # KANGAROO_PERSISTENT_PLAIN_STEP's buffers
        # Multi-row linears (verify, prefill): on the CPU in fp32, oneDNN with packed weights (cpu_linear.py)
        self.cpu_packing_off = self._cpu_packing_off(spec)
        self._linear = PackedLinear() if not self.cpu_packing_off else F.linear

    def cpu_packing(self) -> Tuple[str, float]:
        """(why steps of several rows do not use packed CPU weights, '' where they do; MiB of packed copies)."""
        return (self.cpu_packing_off or getattr(self._linear, "skipped", ""),
                getattr(self._linear, "packed_bytes", 0) / 2 ** 20)

    @staticmethod
    def _cpu_packing_off(spec: ModelSpec) -> str:
        """'' where multi-row linears use packed weights, else why not."""
        if spec.device.type != "cpu" or spec.dtype != torch.float32:
            return f"packed CPU linears are for fp32 on the CPU, the model is {spec.dtype} on {spec.device}"
        if config.flag("KANGAROO_DISABLE_CPU_PACKING"):
            return "KANGAROO_DISABLE_CPU_PACKING is set"
        return cpu_packing_unavailable()

    @contextlib.contextmanager
    def request(self):
        """Exclusive use of the engine (its caches and buffers) for one request."""
        if self._owner == threading.get_ident():
            raise RuntimeError("a generation on this model was started from inside another one on the same "
                               "thread (e.g. from a streamer); it would overwrite the running one's cache")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield self
            finally:
                self._owner = None

    # ---- buffers ---------------------------------------------------------------------------------

    def cache_bytes(self, capacity: int) -> int:
        """Bytes of the K and V caches for `capacity` positions (every layer plus the adapter's slot)."""
        s = self.spec
        itemsize = torch.empty((), dtype=s.dtype).element_size()
        return 2 * (s.num_layers + ADAPTER_SLOTS) * self.ROWS * s.num_kv_heads * capacity * s.head_dim * itemsize

    def planned_capacity(self, capacity: int, max_draft: int) -> int:
        """The capacity reserve() would allocate for this request (0 when the buffers already suffice)."""
        if capacity <= self.capacity and max_draft <= self.max_draft:
            return 0
        capacity = -(-max(capacity, self.capacity) // 64) * 64  # round up: fewer regrowths (re-captures)
        return min(capacity, self.spec.max_positions + max(max_draft, self.max_draft) + 1)

    def reserve(self, capacity: int, max_draft: int):
        """Allocate caches and step buffers for `capacity` positions and γ up to max_draft. Buffers only
        grow (steps use prefixes of them), so alternating plain and speculative calls reuse everything.
        All-or-nothing: every buffer is allocated before any is replaced, so an out-of-memory error
        leaves the engine as it was, and usable."""
        capacity = self.planned_capacity(capacity, max_draft)
        if not capacity:
            return
        s, dev, dt, B = self.spec, self.spec.device, self.spec.dtype, self.ROWS
        g = max(max_draft, self.max_draft)
        shape = (s.num_layers + ADAPTER_SLOTS, B, s.num_kv_heads, capacity, s.head_dim)  # slots N..: the adapter
        pos = torch.arange(capacity, device=dev, dtype=torch.float32)
        freqs = pos[:, None] * s.inv_freq.to(dev)[None, :]                  # [S, D/2], fp32 as in HF
        emb = torch.cat([freqs, freqs], dim=-1)
        new = dict(
            k_cache=torch.zeros(shape, device=dev, dtype=dt), v_cache=torch.zeros(shape, device=dev, dtype=dt),
            rope_cos=emb.cos() * s.rope_scaling, rope_sin=emb.sin() * s.rope_scaling,        # [S, D]
            steps=torch.arange(g + 1, device=dev),                                         # [γ+1]
            tokens_in=torch.zeros(B, g + 1, dtype=torch.int64, device=dev),
            exit_states=torch.zeros(B, g + 1, s.hidden_size, dtype=dt, device=dev),
            draft_tokens=torch.zeros(B, g, dtype=torch.int64, device=dev),
            num_drafted=torch.zeros(B, dtype=torch.int64, device=dev),
            active=torch.ones(B, dtype=torch.bool, device=dev),
            threshold=torch.zeros((), dtype=torch.float32, device=dev),
            rng=torch.zeros(2, dtype=torch.int64, device=dev),                 # (seed, offset): sampling
            draft_probs=torch.zeros(B, g, s.vocab_size, dtype=torch.float32, device=dev),  # q of each draft
            cache_len=torch.zeros(B, dtype=torch.int64, device=dev),
            report=torch.zeros(B, Report.width(g), dtype=torch.int64, device=dev),  # read once per round
            # the sequence so far (prompt + committed tokens; L = cache_len + 1 of them), which copied
            # drafts search; a round writes up to γ + 1 tokens past L, hence the slack
            history=torch.zeros(B, capacity + g + 2, dtype=torch.int64, device=dev),
            # the persistent draft kernel's counters
            persistent_barrier=torch.zeros(ops.validate.PERSISTENT_BARRIER_WORDS, dtype=torch.int32, device=dev))
        self.__dict__.update(new)
        self.capacity, self.max_draft = capacity, g
        self._graphs = {}  # buffer addresses changed

    # ---- captured graphs, owned here because they replay this engine's buffers ---------------------

    def _graphs_key(self, gamma: int, speculative: bool, device_exit: bool, copy=None) -> tuple:
        # the adapter first: binding eviction drops an adapter's graphs by it (prefill.graphs_key too)
        return (id(self.adapter) if speculative else None, gamma, speculative, bool(device_exit and speculative),
                self.sampling, copy, config.flag("KANGAROO_PERSISTENT_DRAFT"),
                config.flag("KANGAROO_FUSED_COMMIT"), config.flag("KANGAROO_FUSED_VERIFY_TAIL"),
                config.flag(PLAIN_SWITCH), config.flag("KANGAROO_TRITON_ATTENTION"))

    def cached_graphs(self, gamma: int, speculative: bool, device_exit: bool, copy=None) -> Optional[CudaGraphs]:
        """The graphs graphs_for captured for these settings and the bound adapter, or None."""
        return self._graphs.get(self._graphs_key(gamma, speculative, device_exit, copy))

    def graphs_for(self, gamma: int, speculative: bool, device_exit: bool, copy=None) -> Tuple[CudaGraphs, float]:
        """The CUDA graphs of a round with this γ (and the current sampling settings and adapter; copy: a
        copy_rounds.CopyPolicy for captured copy rounds), captured on first use; (graphs, capture seconds)."""
        key = self._graphs_key(gamma, speculative, device_exit, copy)
        graphs = self._graphs.get(key)
        if graphs is not None:
            return graphs, 0.0
        t0 = time.perf_counter()
        graphs = CudaGraphs(self, gamma, speculative, device_exit=key[3], copy=copy)
        self._graphs[key] = graphs
        return graphs, time.perf_counter() - t0

    def set_sampling(self, sampling: Optional[Sampling]):
        """Greedy (None) or sampled decoding from now on (graphs are keyed by it)."""
        self.sampling = sampling

    def seed(self, seed: int):
        """Restart the random stream at (seed, offset 0). Every round advances the offset on the device, so
        each round draws fresh numbers, replays of a captured round included. Call it after capturing
        (a capture's warm-up runs advance the offset too), so a seed gives the same tokens with graphs
        or without, on a first call or a later one."""
        self.rng.copy_(torch.tensor([seed, 0], dtype=torch.int64))

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def bind_adapter(self, adapter):
        """Reference the adapter's weights (the adapter checked its own compatibility), and make the
        draft's LM head: the target's, or its [N, H] slice for a reduced draft vocabulary."""
        if adapter is self.adapter:
            return
        self.adapter = adapter
        if adapter is None:
            self.adapter_weights, self.adapter_norm, self.draft_head, self.draft_ids = [], None, None, None
            return
        # Bindings (and the graphs that read them, keyed by the adapter) stay cached for the last few
        # adapters, so alternating between two adapters neither re-slices the head nor re-captures graphs.
        entry = self._bindings.pop(id(adapter), None)
        if entry is None or entry[0] is not adapter:
            ids = adapter.draft_vocab_ids
            draft_ids = None if ids is None else ids.to(self.spec.device)
            head = self.spec.lm_head if ids is None else self.spec.lm_head.index_select(0, draft_ids).contiguous()
            entry = (adapter, adapter.layer_weights(), adapter.head_norm.detach(), head, draft_ids)
        self._bindings[id(adapter)] = entry
        while len(self._bindings) > self.MAX_BOUND_ADAPTERS:
            oldest = next(iter(self._bindings))
            del self._bindings[oldest]
            self._graphs = {k: g for k, g in self._graphs.items() if k[0] != oldest}
        _, self.adapter_weights, self.adapter_norm, self.draft_head, self.draft_ids = entry

    # ---- the model's forward, from the project's ops ----------------------------------------------

    # Decode and verify steps (at most FUSED_MAX_ROWS rows) run each layer as five launches of fused
    # ops: norm+QKV, RoPE+append+attention, O-proj, norm+gate/up+SiLU·mul, down-proj. Prefill
    # (many rows) is compute-bound and keeps cuBLAS GEMMs. Both compute the same reference math.
    FUSED_MAX_ROWS = 16

    def _norm(self, x, residual, weight):
        return ops.fused_add_rms_norm(x, residual, weight, self.spec.rms_norm_eps)

    def _attend(self, q, k, v, positions, slot: int):
        s = self.spec
        B, T = positions.shape
        q = q.view(B, T, s.num_heads, s.head_dim)
        k, v = (t.view(B, T, s.num_kv_heads, s.head_dim) for t in (k, v))
        backend = None if self.triton_attention_off() else "triton"
        return ops.rope_append_attention(q, k, v, self.rope_cos, self.rope_sin, positions, self.k_cache[slot],
                                         self.v_cache[slot], s.attn_scale, s.sliding_window or 0, backend=backend)

    def triton_attention_off(self) -> str:
        """Why attention does not run the Triton kernel here ('' where it does): the switch
        (KANGAROO_TRITON_ATTENTION), then what it needs: a CUDA device, bf16 / fp16, Triton importable."""
        if not config.flag("KANGAROO_TRITON_ATTENTION"):
            return "KANGAROO_TRITON_ATTENTION is off (the default until its GPU tests pass)"
        if self.spec.device.type != "cuda":
            return "the model is not on a CUDA device"
        if self.spec.dtype not in (torch.float16, torch.bfloat16):
            return f"{self.spec.dtype}: the switch serves bf16 / fp16 (the row-block invariance it relies on)"
        if ops.backends.triton_module() is None:
            return "Triton is not importable"
        return ""

    def _fused(self, rows: int) -> bool:
        """Whether a step of `rows` rows runs the fused decode ops; on the CPU with packed weights, only
        one-row steps do (several rows are cheaper through the packed linears)."""
        return rows <= (1 if not self.cpu_packing_off else self.FUSED_MAX_ROWS)

    def _attention_block(self, x, res, w: LayerWeights, positions, slot: int):
        """(x, res) -> (attention output before the O-projection's residual add, residual stream)."""
        B, T = positions.shape
        if self._fused(B * T):
            (q, k, v), res = ops.rms_norm_linear(x, res, w.input_norm, self.spec.rms_norm_eps, [w.q, w.k, w.v],
                                                 [w.q_bias, w.k_bias, w.v_bias])
            return ops.decode_linear(self._attend(q, k, v, positions, slot), w.o, w.o_bias), res
        normed, res = self._norm(x, res, w.input_norm)
        q, k, v = (self._linear(normed, wt, bt) for wt, bt in ((w.q, w.q_bias), (w.k, w.k_bias), (w.v, w.v_bias)))
        return self._linear(self._attend(q, k, v, positions, slot), w.o, w.o_bias), res

    def _mlp_block(self, x, res, w: LayerWeights):
        B, T = x.shape[:2]
        if self._fused(B * T) and w.gate_bias is None and w.up_bias is None:
            act, res = ops.rms_norm_gate_up(x, res, w.post_norm, self.spec.rms_norm_eps, w.gate, w.up)
            return ops.decode_linear(act, w.down, w.down_bias), res
        normed, res = self._norm(x, res, w.post_norm)
        act = F.silu(self._linear(normed, w.gate, w.gate_bias)) * self._linear(normed, w.up, w.up_bias)
        return self._linear(act, w.down, w.down_bias), res

    def run_layers(self, h, positions, start: int, end: int):
        """Layers [start, end) on the residual stream h [B, T, H] at positions [B, T].

        Returns the last layer's output and residual unsummed (x, res): the next norm adds them (fused)."""
        x, res = h, None
        for i in range(start, end):
            w = self.spec.layers[i]
            x, res = self._attention_block(x, res, w, positions, slot=i)
            x, res = self._mlp_block(x, res, w)
        return x, res

    def adapter_forward(self, x, res, positions, with_head: bool = True, stream: int = 0, head_on_last: bool = False):
        """The adapter on the exit layer's (x, res). Returns h_exit [B, T, H] (the materialised residual
        stream at the exit, which verification starts from) and, with_head, (token, confidence, q) from the
        draft's head: q [B, T, N] is the draft's processed distribution over its N tokens when sampling,
        else None. token is a token id when sampling; greedy, it is the head's argmax, an index into
        draft_ids where the draft vocabulary is reduced (ops.take_draft maps it along with the rest of the
        draft's bookkeeping). Block b's attention uses cache slot N + b. Decode launches for the "kangaroo"
        block: norm+QKV, attention, O-proj, then norm and LM head + argmax (2). head_on_last: the head on
        the last position only (a copied chain wants the adapter's proposal after its last token alone)."""
        h_exit, last = None, len(self.adapter_weights) - 1
        for b, w in enumerate(self.adapter_weights):
            x, res = self._attention_block(x, res, w, positions, slot=self.spec.num_layers + b)
            h_exit = res if h_exit is None else h_exit  # the first norm materialises the exit state
            if w.gate is not None and (with_head or b < last):  # headless, the last MLP feeds nothing
                x, res = self._mlp_block(x, res, w)
        if not with_head:
            return h_exit, None
        if head_on_last:
            x, res = x[:, -1:], res[:, -1:]
        y, _ = self._norm(x, res, self.adapter_norm)
        if self.sampling is None:  # the draft-vocabulary index stays: _take_draft maps it (ops.take_draft)
            token, confidence = ops.lm_head_argmax(y, self.draft_head)
            return h_exit, (token, confidence, None)
        # draw from the draft's processed distribution; its top-1 probability is the confidence
        c = self.sampling
        token, q, confidence = ops.sample_logits(self._linear(y, self.draft_head), c.temperature, c.top_k,
                                                 c.top_p, self.rng, stream)
        if self.draft_ids is not None:
            token = self.draft_ids[token.clamp_min(0)]    # draft-vocabulary index -> token id
        return h_exit, (token, confidence, q)

    def logits(self, x, res):
        y, _ = self._norm(x, res, self.spec.final_norm)
        return self._linear(y, self.spec.lm_head)

    # ---- prefill ---------------------------------------------------------------------------------

    def prefill(self, prompt: torch.Tensor, speculative: bool, captured: bool = False):
        """Feed prompt[:, :-1] through every layer (and the adapter); prompt[:, -1] waits in tokens_in.
        captured: in chunks of captured graphs (prefill.py) where prefill_graphs_off() is ''; capture them
        first with prepare_prefill (their warm-up runs write the cache)."""
        B, T = prompt.shape
        graphs = self._graphs.get(prompt_prefill.graphs_key(self, speculative)) if captured else None
        self.cache_len.zero_()
        self.tokens_in[:, 0] = prompt[:, -1]
        self.history[:, :T] = prompt
        if T > 1:
            if graphs is not None:
                graphs.run(prompt[:, :-1])  # leaves cache_len at T - 1 (the padding dropped)
            else:
                prompt_prefill.prefill_eager(self, prompt[:, :-1], speculative)
                self.cache_len.fill_(T - 1)

    def prefill_graphs_off(self, n_tokens: int = 0) -> str:
        """Why prefill of n_tokens does not run captured chunks here ('' where it does; KANGAROO_PREFILL_GRAPHS)."""
        return prompt_prefill.graphs_off(self) or prompt_prefill.length_off(n_tokens)

    def prepare_prefill(self, speculative: bool) -> Tuple[float, str]:
        """Capture the prefill chunks for the next prefill(captured=True): (seconds, '' or why it stays eager)."""
        return prompt_prefill.prepare(self, speculative)

    # ---- Kangaroo: draft, verify, commit ---------------------------------------------------------

    def begin_round(self):
        self.active.fill_(True)
        self.num_drafted.zero_()

    def draft_step(self, j: int, gamma: int):
        """Draft step j: shallow layers on tokens_in[:, j], save the exit state, and (j < γ) let the
        adapter propose the next token; a row keeps drafting while its confidence stays >= η."""
        ell = self.adapter.exit_layer
        pos = self.cache_len[:, None] + j                                        # [B, 1]
        h = F.embedding(self.tokens_in[:, j:j + 1], self.spec.embed)             # [B, 1, H]
        x, res = self.run_layers(h, pos, 0, ell)
        h_exit, head = self.adapter_forward(x, res, pos, with_head=j < gamma, stream=j)
        self.exit_states[:, j].copy_(h_exit[:, 0])
        if j < gamma:
            return self._take_draft(j, *head)
        return None

    def persistent_draft_off(self, gamma: int) -> str:
        """Why this engine's draft phase cannot run as one persistent kernel ('' if it can): the switch
        (config KANGAROO_PERSISTENT_DRAFT), greedy decoding, batch 1, then the CUDA kernel's own limits."""
        if not config.flag("KANGAROO_PERSISTENT_DRAFT"):
            return "KANGAROO_PERSISTENT_DRAFT is off (the default until the kernel's GPU tests pass)"
        why = persistent_engine_reasons(self, self.spec.layers[:self.adapter.exit_layer])
        if why:
            return why
        return "; ".join(ops.reasons_against("persistent_draft", "cuda", *self._persistent_args(gamma, True)))

    def _persistent_args(self, gamma: int, stop_at_exit: bool) -> tuple:
        s, n_exit = self.spec, self.adapter.exit_layer
        slots = list(range(n_exit)) + [s.num_layers + b for b in range(len(self.adapter_weights))]
        weights = kernel_weights(list(s.layers[:n_exit]) + list(self.adapter_weights))
        return (s.embed, weights, [self.k_cache[i] for i in slots], [self.v_cache[i] for i in slots], n_exit,
                self.adapter_norm, self.draft_head, self.draft_ids, self.rope_cos, self.rope_sin, self.threshold,
                self.cache_len, self.tokens_in, self.draft_tokens, self.num_drafted, self.active, self.exit_states,
                self.persistent_barrier, gamma, stop_at_exit, s.rms_norm_eps, s.attn_scale, s.sliding_window or 0)

    def draft_phase_persistent(self, gamma: int, stop_at_exit: bool, stamps: Optional[torch.Tensor] = None):
        """The adapter's draft steps 0..γ in one launch of the persistent draft kernel (ops.persistent_draft):
        the same tokens, exit states and caches as draft_step(j, γ) for each j, stopping at the confidence
        exit when stop_at_exit (as the conditional nodes do); stamps: the kernel's stage timing (ops.persistent_draft).
        Callers checked persistent_draft_off."""
        ops.persistent_draft(*self._persistent_args(gamma, stop_at_exit), stamps=stamps, backend="cuda")

    def _take_draft(self, j: int, token, conf, q):
        """The adapter's proposal as draft j (token, conf [B, 1]; q [B, 1, N] or None): kept while the
        row is active and its confidence is >= η. Greedy (q is None), token is the head's index (see
        adapter_forward) and ops.take_draft does all of it in one op."""
        if q is None:
            return ops.take_draft(token, conf, self.threshold, self.active, self.num_drafted, self.draft_tokens,
                                  self.tokens_in, j, self.draft_ids)
        keep = self.active & (conf[:, 0] >= self.threshold)
        # sampling: q, the draft's processed distribution, decides acceptance
        if self.draft_ids is None:
            self.draft_probs[:, j].copy_(q[:, 0])
        else:               # in place over the full vocabulary: 0 outside the draft's tokens
            self.draft_probs[:, j].zero_().index_copy_(-1, self.draft_ids, q[:, 0])
        keep = keep & (token[:, 0] >= 0)   # a NaN draft row proposes nothing
        token = token.clamp_min(0)
        self.draft_tokens[:, j] = token[:, 0]
        self.tokens_in[:, j + 1] = token[:, 0]
        self.num_drafted.add_(keep.long())
        self.active.copy_(keep)
        return keep

    def draft_copied(self, tokens: torch.Tensor, k: int, extend: bool):
        """A round's first k drafts copied (tokens [B, >= k] from ops.ngram_draft), put where the
        adapter's would go, then the shallow layers and the adapter's blocks over positions L-1 .. L-1+k in
        one multi-row step (their exit states: what verification needs). A copied token is a deterministic
        proposal, so its q is one-hot: speculative sampling then accepts it with probability p(token) and
        resamples from p without it, exactly. extend: also the adapter's proposal after the last copied
        token (draft k), kept if its confidence is >= η; returns keep [B] then, else None."""
        self.num_drafted.fill_(k)
        head = self._copied_step(tokens[:, :k], with_head=extend)
        return self._take_draft(k, *head) if extend else None

    def copy_lookup(self, policy) -> Tuple[torch.Tensor, torch.Tensor]:
        """This round's copied drafts, on the device (no host sync): tokens [B, policy.rows] from
        ops.ngram_draft and k [B], how many of them to propose (0: no match of policy.min_ngram tokens;
        else at most policy.per_matched per matched token). k also goes to the report's `copied` slot: the
        captured round copies exactly when some row has k > 0, each row its own k."""
        tokens, count, matched = ops.ngram_draft(self.history, self.cache_len + 1, policy.min_ngram,
                                                 policy.max_ngram, policy.rows)
        k = count.minimum(matched * policy.per_matched)
        self.report[:, Report.COPIED] = k
        return tokens, k

    def draft_copied_rows(self, tokens: torch.Tensor, k: torch.Tensor, rows: int):
        """draft_copied with static shapes, for a captured round: always `rows` copied slots, of which the
        first k [B] (device) are the drafts (num_drafted = k). The slots past k are filled with token 0;
        their exit states and cache rows lie past anything verification can accept, so they are never used
        (rollback is the cache length). No adapter proposal after the copied tokens."""
        self.num_drafted.copy_(k)
        self._copied_step(tokens[:, :rows].clamp_min(0), with_head=False)

    def _copied_step(self, copied: torch.Tensor, with_head: bool):
        """Copied tokens [B, n] as drafts 0..n-1, then one multi-row step of the shallow layers and the
        adapter's blocks over positions L-1 .. L-1+n, keeping their exit states; the adapter's head output
        on the last position when with_head (see adapter_forward)."""
        n = copied.shape[1]
        self.draft_tokens[:, :n] = copied
        self.tokens_in[:, 1:n + 1] = copied
        if self.sampling is not None:
            self.draft_probs[:, :n].zero_().scatter_(-1, copied[..., None], 1.0)
        pos = self.cache_len[:, None] + self.steps[:n + 1]                       # [B, n+1]
        h = F.embedding(self.tokens_in[:, :n + 1], self.spec.embed)              # [B, n+1, H]
        x, res = self.run_layers(h, pos, 0, self.adapter.exit_layer)
        h_exit, head = self.adapter_forward(x, res, pos, with_head=with_head, stream=n, head_on_last=True)
        self.exit_states[:, :n + 1].copy_(h_exit)
        return head

    def verify(self, n_positions: int):
        """Layers ℓ..N-1 over the exit states of positions L-1 .. L-2+n, then accept and commit."""
        ell = self.adapter.exit_layer
        pos = self.cache_len[:, None] + self.steps[:n_positions]                 # [B, n]
        x, res = self.run_layers(self.exit_states[:, :n_positions], pos, ell, self.spec.num_layers)
        if self._fused_tail(x, res):  # the norm, the tokens and the commit in two launches
            return
        if n_positions == 1:  # nothing was drafted: the bonus token alone, as a plain step takes it
            self._accept_and_commit(self.draft_tokens[:, :0], self._target_token(x, res))   # [B, 1]
        elif self.sampling is None:
            # Each position's token as a plain step computes it (_target_argmax), never writing [B, n, V]
            # logits: argmax over logits from a GEMM could break a bf16 near-tie the other way.
            self._accept_and_commit(self.draft_tokens[:, :n_positions - 1], self._target_argmax(x, res))
        else:
            c, k = self.sampling, n_positions - 1
            self._commit(*ops.speculative_sample_accept(
                self.draft_tokens[:, :k], self.draft_probs[:, :k], self.logits(x, res), self.num_drafted,
                c.temperature, c.top_k, c.top_p, self.rng))

    def _accept_and_commit(self, drafts: torch.Tensor, targets: torch.Tensor):
        """The end of a step whose tokens are decided (drafts [B, k], targets [B, k+1]; k = 0: the target's
        token alone, greedy or sampled): the greedy accept rule, then the commit. Greedy on a GPU with
        KANGAROO_FUSED_COMMIT, both in one accept_commit launch; the same writes (tests/test_accept_commit.py)."""
        if self.sampling is None and self.spec.device.type == "cuda" and config.flag("KANGAROO_FUSED_COMMIT") \
                and drafts.is_contiguous():   # several rows: drafts is a view of the [B, γ] buffer
            ops.accept_commit(drafts, targets, self.num_drafted, self.cache_len, self.tokens_in, self.history,
                              self.report)
        elif drafts.shape[1]:
            self._commit(*ops.accept_greedy(drafts, targets, self.num_drafted))
        else:
            self._commit(torch.zeros_like(self.num_drafted), targets)

    def fused_tail_off(self) -> str:
        """Why greedy steps do not end with ops.verify_tail ('' where they do): the switch, then what it needs."""
        if not config.flag("KANGAROO_FUSED_VERIFY_TAIL"):
            return "KANGAROO_FUSED_VERIFY_TAIL=0"
        if self.sampling is not None:
            return "sampling: the fused tail takes the target's argmax"
        if self.spec.device.type != "cuda":
            return "not on a GPU: the fused tail is a CUDA kernel"
        if self.ROWS != 1:
            return f"batch {self.ROWS}: the fused tail's drafts are a view of the [B, γ] buffer"
        return ""

    def _fused_tail(self, x, res) -> bool:
        """A greedy step's end on a GPU with KANGAROO_FUSED_VERIFY_TAIL: the final norm, the target's token at each
        of x's positions and the commit in ops.verify_tail's two launches (each token bitwise _target_argmax's).
        False, doing nothing, where it does not apply (fused_tail_off, more rows than the fused ops take)."""
        B, n = x.shape[:2]
        if self.fused_tail_off() or not self._fused(B * n):
            return False
        ops.verify_tail(x.contiguous(), res.contiguous(), self.spec.final_norm, self.spec.rms_norm_eps,
                        self.spec.lm_head, self.draft_tokens[:, :n - 1], self.num_drafted, self.cache_len,
                        self.tokens_in, self.history, self.report)
        return True

    def _target_argmax(self, x, res) -> torch.Tensor:
        """The target's greedy token at each position [B, T] from the last layer's (x, res): the final norm,
        then the fused LM head + argmax over the full vocabulary (the draft's head may be reduced). Plain
        steps and greedy verification both take their tokens from here, so they agree token for token."""
        y, _ = self._norm(x, res, self.spec.final_norm)
        if not self._fused(y.shape[0] * y.shape[1]):  # several rows on the CPU, or past FUSED_MAX_ROWS
            return self._linear(y, self.spec.lm_head).argmax(dim=-1)
        return ops.lm_head_argmax(y, self.spec.lm_head)[0]

    def _target_token(self, x, res) -> torch.Tensor:
        """The target's next token [B, 1] from the last layer's (x, res): argmax, or a sample."""
        if self.sampling is None:
            return self._target_argmax(x, res)
        y, _ = self._norm(x, res, self.spec.final_norm)
        c = self.sampling
        return ops.sample_logits(self._linear(y, self.spec.lm_head), c.temperature, c.top_k, c.top_p, self.rng,
                                 TARGET_STREAM)[0]

    def persistent_plain_off(self) -> str:
        """Why plain steps do not run as one launch of the persistent kernel ('' where they do; see
        persistent_plain.py): the switch, then what the kernel needs."""
        if not config.flag(PLAIN_SWITCH):
            return f"{PLAIN_SWITCH} is off (the default until its GPU tests pass)"
        if self._plain_kernel is None:
            self._plain_kernel = PersistentPlainStep(self)
        return self._plain_kernel.off()

    def plain_step(self):
        """Ordinary decoding: one token through all layers (the honest baseline, same kernels), or all of it
        in one persistent launch where persistent_plain_off allows (the same token and cache bits)."""
        if not self.persistent_plain_off():
            self.num_drafted.zero_()
            self._plain_kernel.launch()
            self._accept_and_commit(self.draft_tokens[:, :0], self._plain_kernel.token)
            return
        pos = self.cache_len[:, None]
        h = F.embedding(self.tokens_in[:, :1], self.spec.embed)
        x, res = self.run_layers(h, pos, 0, self.spec.num_layers)
        self.num_drafted.zero_()
        if not self._fused_tail(x, res):
            self._accept_and_commit(self.draft_tokens[:, :0], self._target_token(x, res))   # [B, 1]

    def _commit(self, accepted, committed):
        """Advance the caches past committed[:, :accepted+1] and report the round; all on the device.
        A row the sampling kernels flagged (accepted -1 or token -1: NaN/inf logits) reports it and does
        not advance; the host raises. Sampling moves to fresh random numbers for the next round."""
        n = committed.shape[1]   # into the history copied drafts search: slots past accepted are overwritten later
        self.history.scatter_(1, self.cache_len[:, None] + 1 + self.steps[:n], committed)
        if self.sampling is None:
            self.cache_len.add_(accepted + 1)
            self.tokens_in[:, 0] = committed.gather(1, accepted[:, None])[:, 0]
        else:
            self.cache_len.add_(torch.where(accepted >= 0, accepted + 1, 0))
            self.tokens_in[:, 0] = committed.gather(1, accepted.clamp_min(0)[:, None])[:, 0].clamp_min(0)
            self.rng[1:].add_(1)
        Report.write(self.report, accepted, self.num_drafted, committed)


# model -> (what the engine was built for, engine). Weak keys: an engine lives as long as its model, and
# the model itself stays free of our state (deepcopy, pickling and save_pretrained see nothing of ours).
_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_ENGINES_LOCK = threading.Lock()


def engine_for(model) -> Engine:
    """The engine for this model, built on first use and rebuilt if the model moved, changed dtype or got
    new weights."""
    embed = model.get_input_embeddings().weight
    key = (str(embed.device), embed.dtype, embed.data_ptr())
    with _ENGINES_LOCK:
        cached = _ENGINES.get(model)
        if cached is None or cached[0] != key:
            cached = (key, Engine(model_spec(model)))
            _ENGINES[model] = cached
    return cached[1]
