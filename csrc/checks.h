// Argument checks shared by the launchers. They mirror kangaroo_ext/ops/validate.py, raise
// ValueError in Python like it does (TORCH_CHECK_VALUE), and name the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>

namespace kangaroo {
namespace checks {

inline void cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got a tensor on ", t.device());
}

inline void same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device(), "; expected one device");
}

inline void contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (got strides ", t.strides(), " for shape ",
                    t.sizes(), ")");
}

inline void float_dtype(const at::Tensor& t, const char* name) {
  const auto d = t.scalar_type();
  TORCH_CHECK_VALUE(d == at::kFloat || d == at::kHalf || d == at::kBFloat16, name,
                    " must be float32, float16 or bfloat16, got ", d);
}

// Drafts as every accept op takes them: draft_tokens CUDA int64 [B, k], B >= 1, 1 <= k < 2^20
// (kernels index positions with int), contiguous.
inline void drafts(const at::Tensor& draft_tokens) {
  cuda(draft_tokens, "draft_tokens");
  TORCH_CHECK_VALUE(draft_tokens.scalar_type() == at::kLong && draft_tokens.dim() == 2 && draft_tokens.size(1) >= 1,
                    "draft_tokens must be int64 of shape [B, k] with k >= 1, got ", draft_tokens.scalar_type(), " ",
                    draft_tokens.sizes());
  TORCH_CHECK_VALUE(draft_tokens.size(0) >= 1, "draft_tokens must have at least one row (B >= 1)");
  contiguous(draft_tokens, "draft_tokens");
}

// num_drafted: none, or CUDA int64 [B] (B = draft_tokens' rows) on draft_tokens' device, contiguous.
inline void drafted_counts(const std::optional<at::Tensor>& num_drafted, const at::Tensor& draft_tokens) {
  if (!num_drafted.has_value()) return;
  const at::Tensor& n = *num_drafted;
  const int64_t batch = draft_tokens.size(0);
  cuda(n, "num_drafted");
  TORCH_CHECK_VALUE(n.scalar_type() == at::kLong && n.dim() == 1 && n.size(0) == batch,
                    "num_drafted must be int64 of shape [", batch, "], got ", n.scalar_type(), " ", n.sizes());
  same_device(n, "num_drafted", draft_tokens, "draft_tokens");
  contiguous(n, "num_drafted");
}

// A chain of drafts and the target's scores of it, as every verify-and-accept op takes them:
// draft_tokens int64 [B, k] (k >= 1), target_logits float [B, k+1, V], num_drafted int64 [B] or none;
// all CUDA, contiguous, on one device. Returns V.
inline int64_t draft_chain(const at::Tensor& draft_tokens, const at::Tensor& target_logits,
                           const std::optional<at::Tensor>& num_drafted) {
  drafts(draft_tokens);
  const int64_t batch = draft_tokens.size(0), k = draft_tokens.size(1);
  cuda(target_logits, "target_logits");
  float_dtype(target_logits, "target_logits");
  TORCH_CHECK_VALUE(target_logits.dim() == 3 && target_logits.size(0) == batch && target_logits.size(1) == k + 1 &&
                        target_logits.size(2) >= 1,
                    "target_logits must have shape [B, k+1, V] = [", batch, ", ", k + 1, ", V] for draft_tokens [",
                    batch, ", ", k, "], got ", target_logits.sizes());
  same_device(target_logits, "target_logits", draft_tokens, "draft_tokens");
  contiguous(target_logits, "target_logits");
  TORCH_CHECK_VALUE(k < (1 << 20), "draft_tokens must have k < 2^20, got ", k);
  drafted_counts(num_drafted, draft_tokens);
  return target_logits.size(2);
}

// A chain of drafts and the target's tokens at each of its positions (accept_greedy): draft_tokens
// int64 [B, k] (1 <= k < 2^20), target_tokens int64 [B, k+1], num_drafted int64 [B] or none; all CUDA,
// contiguous, on one device.
inline void token_chain(const at::Tensor& draft_tokens, const at::Tensor& target_tokens,
                        const std::optional<at::Tensor>& num_drafted) {
  drafts(draft_tokens);
  const int64_t batch = draft_tokens.size(0), k = draft_tokens.size(1);
  cuda(target_tokens, "target_tokens");
  TORCH_CHECK_VALUE(target_tokens.scalar_type() == at::kLong && target_tokens.dim() == 2 &&
                        target_tokens.size(0) == batch && target_tokens.size(1) == k + 1,
                    "target_tokens must be int64 of shape [B, k+1] = [", batch, ", ", k + 1, "] for draft_tokens [",
                    batch, ", ", k, "], got ", target_tokens.scalar_type(), " ", target_tokens.sizes());
  same_device(target_tokens, "target_tokens", draft_tokens, "draft_tokens");
  contiguous(target_tokens, "target_tokens");
  TORCH_CHECK_VALUE(k < (1 << 20), "draft_tokens must have k < 2^20 drafts per row, got k = ", k);
  drafted_counts(num_drafted, draft_tokens);
}

// The state a greedy step's commit writes (accept_commit, verify_tail), for B rows and k drafts:
// draft_tokens [B, k], num_drafted and cache_len [B], tokens_in [B, >= 1], history [B, >= k + 2],
// report [B, >= k + 3]; all CUDA int64, contiguous, on ref's device (ref_name: the argument B comes from).
inline void commit_state(const at::Tensor& draft_tokens, const at::Tensor& num_drafted, const at::Tensor& cache_len,
                         const at::Tensor& tokens_in, const at::Tensor& history, const at::Tensor& report,
                         int64_t batch, int64_t k, const at::Tensor& ref, const char* ref_name) {
  const auto rows = [&](const at::Tensor& t, const char* name) {
    cuda(t, name);
    TORCH_CHECK_VALUE(t.scalar_type() == at::kLong && t.dim() >= 1 && t.size(0) == batch, name,
                      " must be int64 with ", batch, " rows (B, as ", ref_name, "), got ", t.scalar_type(), " ",
                      t.sizes());
    same_device(t, name, ref, ref_name);
    contiguous(t, name);
  };
  rows(draft_tokens, "draft_tokens");
  TORCH_CHECK_VALUE(draft_tokens.dim() == 2 && draft_tokens.size(1) == k, "draft_tokens must be [B, k] = [", batch,
                    ", ", k, "] (one fewer column than ", ref_name, "'s positions), got ", draft_tokens.sizes());
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&num_drafted, "num_drafted"},
                                {&cache_len, "cache_len"}}) {
    rows(*t, name);
    TORCH_CHECK_VALUE(t->dim() == 1, name, " must be [B] = [", batch, "], got ", t->sizes());
  }
  for (const auto& [t, name, least] : {std::tuple<const at::Tensor*, const char*, int64_t>{&tokens_in, "tokens_in", 1},
                                       {&history, "history", k + 2},
                                       {&report, "report", k + 3}}) {
    rows(*t, name);
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(1) >= least, name, " must be [B, >= ", least, "], got ", t->sizes());
  }
  TORCH_CHECK_VALUE(batch <= std::numeric_limits<int>::max(), ref_name, " must have B < 2^31 rows, got ", batch);
}

}  // namespace checks
}  // namespace kangaroo
