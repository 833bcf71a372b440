"""The one place that defines every op of the `kangaroo` torch library: schema, fake kernel, CPU kernel.

csrc/registration.cpp holds the same schema strings in TORCH_LIBRARY(kangaroo, m) and registers the
CUDA kernels; `check_compiled_schemas()` (run at import, and by the tests) fails loudly if the two
ever disagree, e.g. a stale build. Without the compiled extension the schemas are defined here, so
`torch.ops.kangaroo.*` exists on every install: the CPU kernel is the PyTorch reference and the fake
kernels let torch.compile and `torch.library.opcheck` trace the ops everywhere.
"""
from dataclasses import dataclass
from typing import Callable, Dict

import torch

from .. import _extension
from . import reference


@dataclass(frozen=True)
class OpDef:
    schema: str          # as written in csrc/registration.cpp
    fake: Callable       # shapes and dtypes only, no data
    reference: Callable  # the CPU kernel, and the definition of the op


def _fake_fused_add_rms_norm(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


def _fake_verify_accept(draft_tokens, target_logits, num_drafted):
    B, k = draft_tokens.shape
    return (draft_tokens.new_empty((B,), dtype=torch.int64),
            draft_tokens.new_empty((B, k + 1), dtype=torch.int64))


def _fake_accept_greedy(draft_tokens, target_tokens, num_drafted):
    return _fake_verify_accept(draft_tokens, None, num_drafted)


def _fake_take_draft(token, confidence, threshold, active, num_drafted, draft_tokens, tokens_in, step, draft_ids):
    return torch.empty_like(active)  # keep [B] bool; the buffers' writes are declared (a!) in the schema


def _fake_rope_append_attention(q, k, v, rope_cos, rope_sin, positions, k_cache, v_cache, scale, window):
    B, T, Hq, D = q.shape
    return q.new_empty((B, T, Hq * D))


def _fake_lm_head_argmax(hidden, lm_head):
    lead = hidden.shape[:-1]
    return hidden.new_empty(lead, dtype=torch.int64), hidden.new_empty(lead, dtype=torch.float32)


def _fake_rms_norm_linear(x, residual, norm_weight, eps, weights, biases):
    return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights], torch.empty_like(x)


def _fake_rms_norm_gate_up(x, residual, norm_weight, eps, gate, up):
    return x.new_empty((*x.shape[:-1], gate.shape[0])), torch.empty_like(x)


def _fake_decode_linear(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _fake_sampling_probs(logits, temperature, top_k, top_p):
    return logits.new_empty(logits.shape, dtype=torch.float32)


def _fake_sample_logits(logits, temperature, top_k, top_p, rng, stream):
    lead = logits.shape[:-1]
    return (logits.new_empty(lead, dtype=torch.int64), logits.new_empty(logits.shape, dtype=torch.float32),
            logits.new_empty(lead, dtype=torch.float32))


def _fake_speculative_sample_accept(draft_tokens, draft_probs, target_logits, num_drafted, temperature, top_k,
                                    top_p, rng):
    return _fake_verify_accept(draft_tokens, target_logits, num_drafted)


def _fake_accept_commit(draft_tokens, target_tokens, num_drafted, cache_len, tokens_in, history, report):
    return None  # writes only the buffers declared (!) in the schema


def _fake_verify_tail(x, residual, norm_weight, eps, lm_head, draft_tokens, num_drafted, cache_len, tokens_in,
                      history, report):
    return x.new_empty(x.shape[:2], dtype=torch.int64)  # target_tokens [B, T]; the rest is written in place


def _fake_persistent_draft(embed, layer_weights, k_caches, v_caches, num_exit_layers, head_norm, head, draft_ids,
                           rope_cos, rope_sin, threshold, cache_len, tokens_in, draft_tokens, num_drafted, active,
                           exit_states, barrier, gamma, stop_at_exit, eps, scale, window, stamps=None):
    return None  # writes only the buffers declared (!) in the schema


OPS: Dict[str, OpDef] = {
    "fused_add_rms_norm": OpDef(
        "fused_add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)",
        _fake_fused_add_rms_norm, reference.fused_add_rms_norm),
    "verify_accept": OpDef(
        "verify_accept(Tensor draft_tokens, Tensor target_logits, Tensor? num_drafted) -> (Tensor, Tensor)",
        _fake_verify_accept, reference.verify_accept),
    "accept_greedy": OpDef(
        "accept_greedy(Tensor draft_tokens, Tensor target_tokens, Tensor? num_drafted) -> (Tensor, Tensor)",
        _fake_accept_greedy, reference.accept_greedy),
    "take_draft": OpDef(
        "take_draft(Tensor token, Tensor confidence, Tensor threshold, Tensor(a!) active, Tensor(b!) num_drafted, "
        "Tensor(c!) draft_tokens, Tensor(d!) tokens_in, int step, Tensor? draft_ids) -> Tensor",
        _fake_take_draft, reference.take_draft),
    "rope_append_attention": OpDef(
        "rope_append_attention(Tensor q, Tensor k, Tensor v, Tensor rope_cos, Tensor rope_sin, Tensor positions, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, float scale, int window) -> Tensor",
        _fake_rope_append_attention, reference.rope_append_attention),
    "lm_head_argmax": OpDef(
        "lm_head_argmax(Tensor hidden, Tensor lm_head) -> (Tensor, Tensor)",
        _fake_lm_head_argmax, reference.lm_head_argmax),
    "rms_norm_linear": OpDef(
        "rms_norm_linear(Tensor x, Tensor? residual, Tensor norm_weight, float eps, Tensor[] weights, "
        "Tensor?[] biases) -> (Tensor[], Tensor)",
        _fake_rms_norm_linear, reference.rms_norm_linear),
    "rms_norm_gate_up": OpDef(
        "rms_norm_gate_up(Tensor x, Tensor? residual, Tensor norm_weight, float eps, Tensor gate, Tensor up) "
        "-> (Tensor, Tensor)",
        _fake_rms_norm_gate_up, reference.rms_norm_gate_up),
    "decode_linear": OpDef(
        "decode_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
        _fake_decode_linear, reference.decode_linear),
    "sampling_probs": OpDef(
        "sampling_probs(Tensor logits, float temperature, int top_k, float top_p) -> Tensor",
        _fake_sampling_probs, reference.sampling_probs),
    "sample_logits": OpDef(
        "sample_logits(Tensor logits, float temperature, int top_k, float top_p, Tensor rng, int stream) "
        "-> (Tensor, Tensor, Tensor)",
        _fake_sample_logits, reference.sample_logits),
    "speculative_sample_accept": OpDef(
        "speculative_sample_accept(Tensor draft_tokens, Tensor draft_probs, Tensor target_logits, "
        "Tensor? num_drafted, float temperature, int top_k, float top_p, Tensor rng) -> (Tensor, Tensor)",
        _fake_speculative_sample_accept, reference.speculative_sample_accept),
    "accept_commit": OpDef(
        "accept_commit(Tensor draft_tokens, Tensor target_tokens, Tensor num_drafted, Tensor(a!) cache_len, "
        "Tensor(b!) tokens_in, Tensor(c!) history, Tensor(d!) report) -> ()",
        _fake_accept_commit, reference.accept_commit),
    "verify_tail": OpDef(
        "verify_tail(Tensor x, Tensor residual, Tensor norm_weight, float eps, Tensor lm_head, Tensor draft_tokens, "
        "Tensor num_drafted, Tensor(a!) cache_len, Tensor(b!) tokens_in, Tensor(c!) history, Tensor(d!) report) "
        "-> Tensor",
        _fake_verify_tail, reference.verify_tail),
    "persistent_draft": OpDef(
        "persistent_draft(Tensor embed, Tensor?[] layer_weights, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, "
        "int num_exit_layers, Tensor head_norm, Tensor head, Tensor? draft_ids, Tensor rope_cos, Tensor rope_sin, "
        "Tensor threshold, Tensor cache_len, Tensor(c!) tokens_in, Tensor(d!) draft_tokens, Tensor(e!) num_drafted, "
        "Tensor(f!) active, Tensor(g!) exit_states, Tensor(h!) barrier, int gamma, bool stop_at_exit, float eps, "
        "float scale, int window, Tensor(i!)? stamps=None) -> ()",
        _fake_persistent_draft, reference.persistent_draft),
}

_libs = []  # keep torch.library.Library objects alive: dropping one unregisters its kernels


def _normalize(schema: str) -> str:
    return " ".join(schema.replace("kangaroo::", "").split())


def compiled_schema(name: str) -> str:
    """The schema string the compiled extension registered for `name`."""
    return _normalize(str(getattr(torch.ops.kangaroo, name).default._schema))


MISSING_FROM_EXTENSION = set()  # ops this build of _C lacks (built from older sources): no CUDA kernel


def _compiled_has(name: str) -> bool:
    try:
        getattr(torch.ops.kangaroo, name).default
        return True
    except (AttributeError, RuntimeError):
        return False


SCHEMA_CHECK_NOTE = ""  # set where the check could not use torch's schema parser (shown by `kangaroo info`)


def check_compiled_schemas():
    """Raise if the compiled extension defines an op with another schema than OPS (a stale build).

    torch._C.parse_schema (private) prints a schema the way the compiled one prints. Without it the
    schemas are compared as written; a difference then may be formatting alone, so it is noted in
    SCHEMA_CHECK_NOTE instead of raised."""
    global SCHEMA_CHECK_NOTE
    parse = getattr(torch._C, "parse_schema", None)
    notes = []
    for name, op in OPS.items():
        if name in MISSING_FROM_EXTENSION:
            continue
        got = compiled_schema(name)
        want = None
        if parse is not None:
            try:
                want = _normalize(str(parse("kangaroo::" + op.schema)))
            except Exception as e:  # the private parser changed its interface
                notes.append(f"torch._C.parse_schema failed ({type(e).__name__})")
        if want is None:
            if got != _normalize(op.schema):
                notes.append(f"kangaroo::{name} is '{got}' in kangaroo_ext._C, '{_normalize(op.schema)}' here")
            continue
        if got != want:
            raise RuntimeError(f"kangaroo_ext._C defines kangaroo::{name} as '{got}' but kangaroo_ext "
                               f"expects '{want}': the extension is stale; rebuild it with "
                               "`pip install --no-build-isolation -e .`")
    if parse is None:
        notes.insert(0, "torch._C.parse_schema is unavailable: schemas compared as written")
    SCHEMA_CHECK_NOTE = "; ".join(dict.fromkeys(notes))  # each note once


def _register():
    if _extension.loaded():
        MISSING_FROM_EXTENSION.update(name for name in OPS if not _compiled_has(name))
        check_compiled_schemas()
        to_define = sorted(MISSING_FROM_EXTENSION)
        kind = "FRAGMENT"
    else:
        to_define, kind = list(OPS), "DEF"
    if to_define:
        lib = torch.library.Library("kangaroo", kind)
        for name in to_define:
            lib.define(OPS[name].schema)
        _libs.append(lib)
    impl = torch.library.Library("kangaroo", "IMPL")
    for name, op in OPS.items():
        impl.impl(name, op.reference, "CPU")
        torch.library.register_fake(f"kangaroo::{name}", op.fake, lib=impl)
    _libs.append(impl)


_register()
