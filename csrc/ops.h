// CUDA entry points of the `kangaroo` torch library, registered in registration.cpp.
// One block per op; schemas live in registration.cpp and kangaroo_ext/ops/schemas.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/List.h>

namespace kangaroo {

// fused_add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)
// Returns (out, residual_out); rms_norm.cu.
std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                      const at::Tensor& weight, double eps);

// verify_accept(Tensor draft_tokens, Tensor target_logits, Tensor? num_drafted) -> (Tensor, Tensor)
// Returns (accepted [B], committed [B, k+1]); verify_accept.cu.
std::tuple<at::Tensor, at::Tensor> verify_accept(const at::Tensor& draft_tokens, const at::Tensor& target_logits,
                                                 const std::optional<at::Tensor>& num_drafted);

// accept_greedy(Tensor draft_tokens, Tensor target_tokens, Tensor? num_drafted) -> (Tensor, Tensor)
// Returns (accepted [B], committed [B, k+1]); accept_greedy.cu.
std::tuple<at::Tensor, at::Tensor> accept_greedy(const at::Tensor& draft_tokens, const at::Tensor& target_tokens,
                                                 const std::optional<at::Tensor>& num_drafted);

// take_draft(Tensor token, Tensor confidence, Tensor threshold, Tensor(a!) active, Tensor(b!) num_drafted,
//            Tensor(c!) draft_tokens, Tensor(d!) tokens_in, int step, Tensor? draft_ids) -> Tensor
// Returns keep [B] bool; writes active, num_drafted, draft_tokens[:, step], tokens_in[:, step+1]; take_draft.cu.
at::Tensor take_draft(const at::Tensor& token, const at::Tensor& confidence, const at::Tensor& threshold,
                      at::Tensor& active, at::Tensor& num_drafted, at::Tensor& draft_tokens, at::Tensor& tokens_in,
                      int64_t step, const std::optional<at::Tensor>& draft_ids);

// rope_append_attention(Tensor q, Tensor k, Tensor v, Tensor rope_cos, Tensor rope_sin, Tensor positions,
//                       Tensor(a!) k_cache, Tensor(b!) v_cache, float scale, int window) -> Tensor
// Returns out [B, T, Hq*D]; writes the new k/v rows into the caches; attention.cu.
at::Tensor rope_append_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& rope_cos, const at::Tensor& rope_sin, const at::Tensor& positions,
                                 at::Tensor& k_cache, at::Tensor& v_cache, double scale, int64_t window);

// Not an op: the most query tokens one rope_append_attention call on `device` may carry and still sum every
// row in the batch-invariant order (so a verify step over that many positions rounds like one-token steps),
// for a GQA group of `group` query heads per KV head, head dim `head_dim` and 16-bit elements with aligned
// caches; 0 where no call does (the switch off, fp32, head dims without an invariant instantiation).
// The engine keeps its copied drafts within it (engine/copy_rounds.py). attention.cu.
int64_t attention_invariant_max_tokens(int64_t group, int64_t head_dim, int64_t elem_size, int64_t device);

// lm_head_argmax(Tensor hidden, Tensor lm_head) -> (Tensor, Tensor)
// Returns (token [...] int64, confidence [...] float32); lm_head.cu.
std::tuple<at::Tensor, at::Tensor> lm_head_argmax(const at::Tensor& hidden, const at::Tensor& lm_head);

// decode_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor; decode_linear.cu.
at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// rms_norm_linear(Tensor x, Tensor? residual, Tensor norm_weight, float eps, Tensor[] weights, Tensor?[] biases)
//     -> (Tensor[], Tensor); decode_linear.cu.
std::tuple<std::vector<at::Tensor>, at::Tensor> rms_norm_linear(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& norm_weight, double eps,
    at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases);

// rms_norm_gate_up(Tensor x, Tensor? residual, Tensor norm_weight, float eps, Tensor gate, Tensor up)
//     -> (Tensor, Tensor); decode_linear.cu.
std::tuple<at::Tensor, at::Tensor> rms_norm_gate_up(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                    const at::Tensor& norm_weight, double eps,
                                                    const at::Tensor& gate, const at::Tensor& up);

// sampling_probs(Tensor logits, float temperature, int top_k, float top_p) -> Tensor
// Returns probs [..., V] float32; sampling.cu.
at::Tensor sampling_probs(const at::Tensor& logits, double temperature, int64_t top_k, double top_p);

// sample_logits(Tensor logits, float temperature, int top_k, float top_p, Tensor rng, int stream)
//     -> (Tensor, Tensor, Tensor)
// Returns (token [...] int64, probs [..., V] float32, top_prob [...] float32); sampling.cu.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_logits(const at::Tensor& logits, double temperature,
                                                             int64_t top_k, double top_p, const at::Tensor& rng,
                                                             int64_t stream);

// speculative_sample_accept(Tensor draft_tokens, Tensor draft_probs, Tensor target_logits, Tensor? num_drafted,
//                           float temperature, int top_k, float top_p, Tensor rng) -> (Tensor, Tensor)
// Returns (accepted [B], committed [B, k+1]); sampling.cu.
std::tuple<at::Tensor, at::Tensor> speculative_sample_accept(const at::Tensor& draft_tokens,
                                                             const at::Tensor& draft_probs,
                                                             const at::Tensor& target_logits,
                                                             const std::optional<at::Tensor>& num_drafted,
                                                             double temperature, int64_t top_k, double top_p,
                                                             const at::Tensor& rng);

// accept_commit(Tensor draft_tokens, Tensor target_tokens, Tensor num_drafted, Tensor(a!) cache_len,
//               Tensor(b!) tokens_in, Tensor(c!) history, Tensor(d!) report) -> ()
// Greedy accept + the engine's commit in one launch; accept_commit.cu.
void accept_commit(const at::Tensor& draft_tokens, const at::Tensor& target_tokens, const at::Tensor& num_drafted,
                   at::Tensor& cache_len, at::Tensor& tokens_in, at::Tensor& history, at::Tensor& report);

// verify_tail(Tensor x, Tensor residual, Tensor norm_weight, float eps, Tensor lm_head, Tensor draft_tokens,
//             Tensor num_drafted, Tensor(a!) cache_len, Tensor(b!) tokens_in, Tensor(c!) history,
//             Tensor(d!) report) -> Tensor
// A greedy step's end (final norm, LM head argmax, accept, commit) in two launches; returns target_tokens
// [B, T]; verify_tail.cu.
at::Tensor verify_tail(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
                       const at::Tensor& lm_head, const at::Tensor& draft_tokens, const at::Tensor& num_drafted,
                       at::Tensor& cache_len, at::Tensor& tokens_in, at::Tensor& history, at::Tensor& report);

// persistent_draft(Tensor embed, Tensor?[] layer_weights, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches,
//                  int num_exit_layers, Tensor head_norm, Tensor head, Tensor? draft_ids, Tensor rope_cos,
//                  Tensor rope_sin, Tensor threshold, Tensor cache_len, Tensor(c!) tokens_in, Tensor(d!) draft_tokens,
//                  Tensor(e!) num_drafted, Tensor(f!) active, Tensor(g!) exit_states, Tensor(h!) barrier, int gamma,
//                  bool stop_at_exit, float eps, float scale, int window, Tensor(i!)? stamps=None) -> ()
// A whole draft phase in one launch; writes the buffers marked (!); persistent_draft.cu.
void persistent_draft(const at::Tensor& embed, const c10::List<std::optional<at::Tensor>>& layer_weights,
                      at::TensorList k_caches, at::TensorList v_caches, int64_t num_exit_layers,
                      const at::Tensor& head_norm, const at::Tensor& head, const std::optional<at::Tensor>& draft_ids,
                      const at::Tensor& rope_cos, const at::Tensor& rope_sin, const at::Tensor& threshold,
                      const at::Tensor& cache_len, at::Tensor& tokens_in, at::Tensor& draft_tokens,
                      at::Tensor& num_drafted, at::Tensor& active, at::Tensor& exit_states, at::Tensor& barrier,
                      int64_t gamma, bool stop_at_exit, double eps, double scale, int64_t window,
                      const std::optional<at::Tensor>& stamps);

}  // namespace kangaroo
