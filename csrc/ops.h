// CUDA entry points of the `kangaroo` torch library, registered in registration.cpp.
// One block per op; schemas live in registration.cpp and kangaroo_ext/ops/schemas.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace kangaroo {

// fused_add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)
// Returns (out, residual_out); rms_norm.cu.
std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                      const at::Tensor& weight, double eps);

// verify_accept(Tensor draft_tokens, Tensor target_logits, Tensor? num_drafted) -> (Tensor, Tensor)
// Returns (accepted [B], committed [B, k+1]); verify_accept.cu.
std::tuple<at::Tensor, at::Tensor> verify_accept(const at::Tensor& draft_tokens, const at::Tensor& target_logits,
                                                 const std::optional<at::Tensor>& num_drafted);

}  // namespace kangaroo
