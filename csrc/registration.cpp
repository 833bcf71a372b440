// The one place the `kangaroo` torch library is defined in C++: schemas (kept character for
// character equal to kangaroo_ext/ops/schemas.py, which checks them at import) and CUDA kernels.
// Fake (meta) and CPU kernels are registered from Python, in schemas.py.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(kangaroo, m) {
  m.def("fused_add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("verify_accept(Tensor draft_tokens, Tensor target_logits, Tensor? num_drafted) -> (Tensor, Tensor)");
  m.def("accept_greedy(Tensor draft_tokens, Tensor target_tokens, Tensor? num_drafted) -> (Tensor, Tensor)");
  m.def("take_draft(Tensor token, Tensor confidence, Tensor threshold, Tensor(a!) active, Tensor(b!) num_drafted, "
        "Tensor(c!) draft_tokens, Tensor(d!) tokens_in, int step, Tensor? draft_ids) -> Tensor");
  m.def("rope_append_attention(Tensor q, Tensor k, Tensor v, Tensor rope_cos, Tensor rope_sin, Tensor positions, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, float scale, int window) -> Tensor");
  m.def("lm_head_argmax(Tensor hidden, Tensor lm_head) -> (Tensor, Tensor)");
  m.def("rms_norm_linear(Tensor x, Tensor? residual, Tensor norm_weight, float eps, Tensor[] weights, "
        "Tensor?[] biases) -> (Tensor[], Tensor)");
  m.def("rms_norm_gate_up(Tensor x, Tensor? residual, Tensor norm_weight, float eps, Tensor gate, Tensor up) "
        "-> (Tensor, Tensor)");
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("sampling_probs(Tensor logits, float temperature, int top_k, float top_p) -> Tensor");
  m.def("sample_logits(Tensor logits, float temperature, int top_k, float top_p, Tensor rng, int stream) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("speculative_sample_accept(Tensor draft_tokens, Tensor draft_probs, Tensor target_logits, "
        "Tensor? num_drafted, float temperature, int top_k, float top_p, Tensor rng) -> (Tensor, Tensor)");
  m.def("accept_commit(Tensor draft_tokens, Tensor target_tokens, Tensor num_drafted, Tensor(a!) cache_len, "
        "Tensor(b!) tokens_in, Tensor(c!) history, Tensor(d!) report) -> ()");
  m.def("verify_tail(Tensor x, Tensor residual, Tensor norm_weight, float eps, Tensor lm_head, Tensor draft_tokens, "
        "Tensor num_drafted, Tensor(a!) cache_len, Tensor(b!) tokens_in, Tensor(c!) history, Tensor(d!) report) "
        "-> Tensor");
  m.def("persistent_draft(Tensor embed, Tensor?[] layer_weights, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, "
        "int num_exit_layers, Tensor head_norm, Tensor head, Tensor? draft_ids, Tensor rope_cos, Tensor rope_sin, "
        "Tensor threshold, Tensor cache_len, Tensor(c!) tokens_in, Tensor(d!) draft_tokens, Tensor(e!) num_drafted, "
        "Tensor(f!) active, Tensor(g!) exit_states, Tensor(h!) barrier, int gamma, bool stop_at_exit, float eps, "
        "float scale, int window, Tensor(i!)? stamps=None) -> ()");
}

TORCH_LIBRARY_IMPL(kangaroo, CUDA, m) {
  m.impl("fused_add_rms_norm", &kangaroo::fused_add_rms_norm);
  m.impl("verify_accept", &kangaroo::verify_accept);
  m.impl("accept_greedy", &kangaroo::accept_greedy);
  m.impl("take_draft", &kangaroo::take_draft);
  m.impl("rope_append_attention", &kangaroo::rope_append_attention);
  m.impl("lm_head_argmax", &kangaroo::lm_head_argmax);
  m.impl("rms_norm_linear", &kangaroo::rms_norm_linear);
  m.impl("rms_norm_gate_up", &kangaroo::rms_norm_gate_up);
  m.impl("decode_linear", &kangaroo::decode_linear);
  m.impl("sampling_probs", &kangaroo::sampling_probs);
  m.impl("sample_logits", &kangaroo::sample_logits);
  m.impl("speculative_sample_accept", &kangaroo::speculative_sample_accept);
  m.impl("accept_commit", &kangaroo::accept_commit);
  m.impl("verify_tail", &kangaroo::verify_tail);
  m.impl("persistent_draft", &kangaroo::persistent_draft);
}
