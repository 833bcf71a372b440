"""The decode engine: the target's own forward on a static KV cache, with Kangaroo's draft and verify steps.

State lives in preallocated device buffers; every step reads and writes them in place, so a step can
be captured once as a CUDA graph and replayed. Invariant between steps (per batch row):

    the sequence has L tokens; the last one, tokens_in[:, 0], is emitted but not yet fed to any layer;
    every cache (layers 0..N-1 and the adapter's, in slot N) holds positions 0..L-2; cache_len = L-1.

Rollback is just not advancing cache_len past the accepted tokens: rejected positions are overwritten
by the next round, and attention never reads past a query's own position.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from .. import ops
from .spec import LayerWeights, ModelSpec


class Engine:
    """Built once per (model, device, dtype); `reserve` sizes the buffers for a request."""

    def __init__(self, spec: ModelSpec, batch_size: int = 1):
        self.spec = spec
        self.B = batch_size
        self.capacity = 0          # cache positions S
        self.max_draft = 0         # γ the buffers were sized for
        self.adapter = None
        self.adapter_weights: Optional[LayerWeights] = None
        self.graphs = {}           # (γ, speculative) -> engine.graphs.CudaGraphs, captured on first use

    # ---- buffers ---------------------------------------------------------------------------------

    def reserve(self, capacity: int, max_draft: int):
        """Allocate caches and step buffers for `capacity` positions and γ up to max_draft. Buffers only
        grow (steps use prefixes of them), so alternating plain and speculative calls reuse everything."""
        if capacity <= self.capacity and max_draft <= self.max_draft:
            return
        s, dev, dt, B = self.spec, self.spec.device, self.spec.dtype, self.B
        capacity = max(capacity, self.capacity)
        max_draft = max(max_draft, self.max_draft)
        capacity = -(-capacity // 64) * 64  # round up: fewer regrowths (each one re-captures graphs)
        if capacity > s.max_positions + max_draft + 1:
            capacity = s.max_positions + max_draft + 1
        shape = (s.num_layers + 1, B, s.num_kv_heads, capacity, s.head_dim)  # slot N: the adapter
        self.k_cache = torch.zeros(shape, device=dev, dtype=dt)
        self.v_cache = torch.zeros(shape, device=dev, dtype=dt)
        pos = torch.arange(capacity, device=dev, dtype=torch.float32)
        freqs = pos[:, None] * s.inv_freq.to(dev)[None, :]                  # [S, D/2], fp32 as in HF
        emb = torch.cat([freqs, freqs], dim=-1)
        self.rope_cos = emb.cos() * s.rope_scaling                          # [S, D]
        self.rope_sin = emb.sin() * s.rope_scaling
        g = max_draft
        self.steps = torch.arange(g + 1, device=dev)                        # [γ+1]
        self.tokens_in = torch.zeros(B, g + 1, dtype=torch.int64, device=dev)
        self.exit_states = torch.zeros(B, g + 1, s.hidden_size, dtype=dt, device=dev)
        self.draft_tokens = torch.zeros(B, g, dtype=torch.int64, device=dev)
        self.num_drafted = torch.zeros(B, dtype=torch.int64, device=dev)
        self.active = torch.ones(B, dtype=torch.bool, device=dev)
        self.threshold = torch.zeros((), dtype=torch.float32, device=dev)
        self.cache_len = torch.zeros(B, dtype=torch.int64, device=dev)
        self.out_tokens = torch.full((B, capacity + g + 2), -1, dtype=torch.int64, device=dev)
        self.out_len = torch.zeros(B, dtype=torch.int64, device=dev)
        # What the host reads once per round: out_len, accepted, drafted, committed[γ+1].
        self.report = torch.zeros(B, 3 + g + 1, dtype=torch.int64, device=dev)
        self.capacity, self.max_draft = capacity, max_draft
        self.graphs = {}  # buffer addresses changed

    def bind_adapter(self, adapter):
        """Reference the adapter's weights (the adapter checked its own compatibility)."""
        if adapter is self.adapter:
            return
        self.adapter = adapter
        if adapter is None:
            self.adapter_weights = None
            return
        b = lambda lin: None if lin.bias is None else lin.bias.detach()  # noqa: E731
        self.adapter_weights = LayerWeights(
            input_norm=adapter.norm1.detach(), q=adapter.q_proj.weight.detach(), k=adapter.k_proj.weight.detach(),
            v=adapter.v_proj.weight.detach(), o=adapter.o_proj.weight.detach(), q_bias=b(adapter.q_proj),
            k_bias=b(adapter.k_proj), v_bias=b(adapter.v_proj), o_bias=None, post_norm=adapter.norm2.detach(),
            gate=None, up=None, down=None)
        self.graphs = {}  # the draft graph reads the adapter's weights

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
        return ops.rope_append_attention(q, k, v, self.rope_cos, self.rope_sin, positions, self.k_cache[slot],
                                         self.v_cache[slot], s.attn_scale, s.sliding_window or 0)

    def _attention_block(self, x, res, w: LayerWeights, positions, slot: int):
        """(x, res) -> (attention output before the O-projection's residual add, residual stream)."""
        B, T = positions.shape
        if B * T <= self.FUSED_MAX_ROWS:
            (q, k, v), res = ops.rms_norm_linear(x, res, w.input_norm, self.spec.rms_norm_eps, [w.q, w.k, w.v],
                                                 [w.q_bias, w.k_bias, w.v_bias])
            return ops.decode_linear(self._attend(q, k, v, positions, slot), w.o, w.o_bias), res
        normed, res = self._norm(x, res, w.input_norm)
        q, k, v = (F.linear(normed, wt, bt) for wt, bt in ((w.q, w.q_bias), (w.k, w.k_bias), (w.v, w.v_bias)))
        return F.linear(self._attend(q, k, v, positions, slot), w.o, w.o_bias), res

    def _mlp_block(self, x, res, w: LayerWeights):
        B, T = x.shape[:2]
        if B * T <= self.FUSED_MAX_ROWS and w.gate_bias is None and w.up_bias is None:
            act, res = ops.rms_norm_gate_up(x, res, w.post_norm, self.spec.rms_norm_eps, w.gate, w.up)
            return ops.decode_linear(act, w.down, w.down_bias), res
        normed, res = self._norm(x, res, w.post_norm)
        act = F.silu(F.linear(normed, w.gate, w.gate_bias)) * F.linear(normed, w.up, w.up_bias)
        return F.linear(act, w.down, w.down_bias), res

    def run_layers(self, h, positions, start: int, end: int):
        """Layers [start, end) on the residual stream h [B, T, H] at positions [B, T].

        Returns the last layer's output and residual unsummed (x, res): the next norm adds them (fused)."""
        x, res = h, None
        for i in range(start, end):
            w = self.spec.layers[i]
            x, res = self._attention_block(x, res, w, positions, slot=i)
            x, res = self._mlp_block(x, res, w)
        return x, res

    def adapter_forward(self, x, res, positions, with_head: bool = True):
        """Kangaroo adapter on the exit layer's (x, res). Returns h_exit [B, T, H] (the materialised
        residual stream at the exit, which verification starts from) and, with_head, (token, confidence).
        Decode launches: norm+QKV, attention, O-proj, norm, LM head + argmax (2)."""
        w = self.adapter_weights
        attn, h_exit = self._attention_block(x, res, w, positions, slot=self.spec.num_layers)
        if not with_head:
            return h_exit, None
        y, _ = self._norm(attn, h_exit, w.post_norm)
        return h_exit, ops.lm_head_argmax(y, self.spec.lm_head)

    def logits(self, x, res):
        y, _ = self._norm(x, res, self.spec.final_norm)
        return F.linear(y, self.spec.lm_head)

    # ---- prefill ---------------------------------------------------------------------------------

    def prefill(self, prompt: torch.Tensor, speculative: bool):
        """Feed prompt[:, :-1] through every layer (and the adapter); prompt[:, -1] waits in tokens_in."""
        B, T = prompt.shape
        self.cache_len.zero_()
        self.out_len.fill_(T)
        self.out_tokens[:, :T] = prompt
        self.tokens_in[:, 0] = prompt[:, -1]
        if T > 1:
            pos = torch.arange(T - 1, device=prompt.device)[None, :].expand(B, T - 1)
            h = F.embedding(prompt[:, :-1], self.spec.embed)
            if speculative:
                ell = self.adapter.exit_layer
                x, res = self.run_layers(h, pos, 0, ell)
                h, _ = self.adapter_forward(x, res, pos, with_head=False)
                self.run_layers(h, pos, ell, self.spec.num_layers)
            else:
                self.run_layers(h, pos, 0, self.spec.num_layers)
            self.cache_len.fill_(T - 1)

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
        h_exit, head = self.adapter_forward(x, res, pos, with_head=j < gamma)
        self.exit_states[:, j].copy_(h_exit[:, 0])
        if j < gamma:
            token, conf = head
            keep = self.active & (conf[:, 0] >= self.threshold)
            self.draft_tokens[:, j] = token[:, 0]
            self.tokens_in[:, j + 1] = token[:, 0]
            self.num_drafted.add_(keep.long())
            self.active.copy_(keep)
            return keep
        return None

    def verify(self, n_positions: int):
        """Layers ℓ..N-1 over the exit states of positions L-1 .. L-2+n, then accept and commit."""
        ell = self.adapter.exit_layer
        pos = self.cache_len[:, None] + self.steps[:n_positions]                 # [B, n]
        x, res = self.run_layers(self.exit_states[:, :n_positions], pos, ell, self.spec.num_layers)
        if n_positions == 1:  # nothing was drafted: the bonus token alone, as a plain step takes it
            y, _ = self._norm(x, res, self.spec.final_norm)
            committed, _ = ops.lm_head_argmax(y, self.spec.lm_head)               # [B, 1]
            accepted = torch.zeros_like(self.num_drafted)
        else:
            logits = self.logits(x, res)                                         # [B, n, V]
            accepted, committed = ops.verify_accept(self.draft_tokens[:, :n_positions - 1], logits,
                                                    self.num_drafted)
        self._commit(accepted, committed)

    def plain_step(self):
        """Ordinary decoding: one token through all layers (the honest baseline, same kernels)."""
        pos = self.cache_len[:, None]
        h = F.embedding(self.tokens_in[:, :1], self.spec.embed)
        x, res = self.run_layers(h, pos, 0, self.spec.num_layers)
        y, _ = self._norm(x, res, self.spec.final_norm)
        token, _ = ops.lm_head_argmax(y, self.spec.lm_head)                       # [B, 1]
        self.num_drafted.zero_()
        self._commit(torch.zeros_like(self.num_drafted), token)

    def _commit(self, accepted, committed):
        """Append committed[:, :accepted+1] to the output and advance the caches; all on the device."""
        n = committed.shape[1]
        idx = self.out_len[:, None] + self.steps[:n]
        self.out_tokens.scatter_(1, idx, committed)          # slots past accepted hold -1, overwritten later
        self.out_len.add_(accepted + 1)
        self.cache_len.add_(accepted + 1)
        self.tokens_in[:, 0] = committed.gather(1, accepted[:, None])[:, 0]
        self.report[:, 0] = self.out_len
        self.report[:, 1] = accepted
        self.report[:, 2] = self.num_drafted
        self.report[:, 3:3 + n] = committed
