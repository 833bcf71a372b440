"""A whole plain step in one launch of the persistent draft kernel (issue 21, item 4: the forward of one
token in one launch), behind KANGAROO_PERSISTENT_PLAIN_STEP.

The persistent draft kernel (csrc/kernels/persistent_draft.cuh) runs "exit layers, then blocks, then a head,
then the confidence exit" for steps 0..γ on one grid ordered by grid barriers. A plain step is that kernel with

    exit layers   the target's layers 0 .. N-2         (their K/V appended at cache_len, as run_layers does)
    block         the target's layer N-1
    head          the model's final norm and full LM head (argmax over the whole vocabulary)
    γ, η          1 and +inf: step 0 runs, its proposal is never kept, so the launch stops there

so the token it leaves in `token` [1, 1] is the plain step's (every GEMV, the attention and the head's logits
are the per-op kernels' bodies, the argmax is exact) and every layer's cache slot holds the per-op step's
bits (tests/test_persistent_plain.py). The state buffers are this object's own: the engine's round state
(tokens_in past column 0, draft_tokens, active, exit_states) is untouched. ~150 grid barriers replace ~170
launches; whether that is faster is the GPU's to say (bench/persistent_draft_price.py prices both).
"""
import torch

from .. import _extension, ops

SWITCH = "KANGAROO_PERSISTENT_PLAIN_STEP"


def kernel_weights(layers) -> list:
    """ops.persistent_draft's layer_weights for these LayerWeights: the 14 of each, in
    reference.PERSISTENT_DRAFT_WEIGHTS's order (None where a layer has no such tensor)."""
    return [getattr(w, name) for w in layers for name in ops.reference.PERSISTENT_DRAFT_WEIGHTS]


def engine_reasons(engine, layers) -> str:
    """What the persistent kernel needs of the engine whichever phase it runs ('' if met): greedy decoding,
    one sequence, MLPs without gate / up biases in these layers (its MLP has none), and the tiled attention kernel
    (the persistent kernel's own; with the warp-chunk kernel on, the per-op path's rows would be other bits)."""
    if _extension.loaded() and hasattr(_extension._C, "warp_chunk_attention") and _extension._C.warp_chunk_attention():
        return ("KANGAROO_WARP_CHUNK_ATTENTION is on: the persistent kernel attends with the tiled kernel, whose rows "
                "are other bits than the per-op path's")
    if not engine.triton_attention_off():
        return ("KANGAROO_TRITON_ATTENTION is on: the persistent kernel attends with the tiled CUDA kernel, whose rows "
                "are other bits than the per-op path's")
    if engine.sampling is not None:
        return "sampling: the persistent kernel decodes greedily"
    if engine.ROWS != 1:
        return f"batch {engine.ROWS}: the persistent kernel decodes one sequence"
    if any(w.gate_bias is not None or w.up_bias is not None for w in layers):
        return "gate / up biases: the persistent kernel's MLP has none"
    return ""


class PersistentPlainStep:
    """engine.plain_step as one launch, for a greedy batch-1 engine on a GPU (see off())."""

    def __init__(self, engine):
        s, dev = engine.spec, engine.spec.device
        long = dict(dtype=torch.int64, device=dev)
        self.engine = engine
        self.tokens_in = torch.zeros(1, 2, **long)         # [0]: the pending token; [1]: the kernel's proposal
        self.token = torch.zeros(1, 1, **long)             # the step's token (the kernel's draft_tokens)
        self.drafted = torch.zeros(1, **long)              # stays 0: η is never reached
        self.active = torch.ones(1, dtype=torch.bool, device=dev)
        self.exit_states = torch.zeros(1, 2, s.hidden_size, dtype=s.dtype, device=dev)  # layer N-1's input
        self.never = torch.tensor(float("inf"), device=dev)   # η above every confidence: stop after step 0
        self._off = {}

    def args(self) -> tuple:
        """ops.persistent_draft's arguments (the engine's caches as they are now)."""
        e, s = self.engine, self.engine.spec
        n = s.num_layers
        return (s.embed, kernel_weights(s.layers), [e.k_cache[i] for i in range(n)],
                [e.v_cache[i] for i in range(n)], n - 1, s.final_norm, s.lm_head, None, e.rope_cos, e.rope_sin,
                self.never, e.cache_len, self.tokens_in, self.token, self.drafted, self.active, self.exit_states,
                e.persistent_barrier, 1, True,
                s.rms_norm_eps, s.attn_scale, s.sliding_window or 0)

    def off(self) -> str:
        """Why a plain step of this engine cannot be one launch ('' if it can), the switch aside (the
        engine's persistent_plain_off asks it first): engine_reasons, a GPU, two layers or more, then the
        kernel's own limits. One answer per sampling setting and cache allocation."""
        e = self.engine
        key = (e.sampling, e.k_cache.data_ptr())
        if key not in self._off:
            self._off[key] = self._reasons(e)
        return self._off[key]

    def _reasons(self, e) -> str:
        why = engine_reasons(e, e.spec.layers)
        if why:
            return why
        if e.spec.device.type != "cuda":
            return "not on a GPU: the persistent kernel is a CUDA kernel"
        if e.spec.num_layers < 2:
            return "one layer: the kernel runs at least one exit layer and one block"
        return "; ".join(ops.reasons_against("persistent_draft", "cuda", *self.args()))

    def launch(self, stamps=None, backend: str = "cuda"):
        """The step's forward: every layer's K/V at cache_len, the token in self.token. No host sync.
        backend "reference": ops.persistent_draft's definition, on any device (tests)."""
        self.tokens_in[:, :1].copy_(self.engine.tokens_in[:, :1])
        ops.persistent_draft(*self.args(), stamps=stamps, backend=backend)
