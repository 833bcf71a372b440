// ATen launcher for kernels/take_draft.cuh (one launch). Checks arguments as kangaroo_ext/ops/validate.py
// does, allocates keep with torch (the caching allocator, so CUDA-graph capture gets it from the graph's
// pool), writes active, num_drafted, draft_tokens and tokens_in in place and launches on the current
// stream. No host sync: η is read on the device.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "checks.h"
#include "kernels/take_draft.cuh"
#include "ops.h"

namespace kangaroo {
namespace {

// t: CUDA, of `dtype` (named dtype_name, as torch names it) and shape `sizes` (written as shape_text), on
// token's device, contiguous: the kernel indexes every buffer as a dense row-major array.
void row_buffer(const at::Tensor& t, const char* name, at::ScalarType dtype, const char* dtype_name,
                at::IntArrayRef sizes, const char* shape_text, const at::Tensor& token) {
  checks::cuda(t, name);
  TORCH_CHECK_VALUE(t.scalar_type() == dtype && t.sizes() == sizes, name, " must be ", dtype_name, " of shape ",
                    shape_text, " = ", sizes, ", got ", t.scalar_type(), " ", t.sizes());
  checks::same_device(t, name, token, "token");
  checks::contiguous(t, name);
}

}  // namespace

at::Tensor take_draft(const at::Tensor& token, const at::Tensor& confidence, const at::Tensor& threshold,
                      at::Tensor& active, at::Tensor& num_drafted, at::Tensor& draft_tokens, at::Tensor& tokens_in,
                      int64_t step, const std::optional<at::Tensor>& draft_ids) {
  checks::cuda(token, "token");
  TORCH_CHECK_VALUE(token.scalar_type() == at::kLong && token.dim() == 2 && token.size(1) == 1,
                    "token must be int64 of shape [B, 1] (the draft head's argmax), got ", token.scalar_type(), " ",
                    token.sizes());
  const int64_t batch = token.size(0);
  TORCH_CHECK_VALUE(batch >= 1, "token must have at least one row (B >= 1)");
  checks::contiguous(token, "token");
  row_buffer(confidence, "confidence", at::kFloat, "float32", {batch, 1}, "[B, 1]", token);
  checks::cuda(threshold, "threshold");
  TORCH_CHECK_VALUE(threshold.scalar_type() == at::kFloat && threshold.dim() == 0,
                    "threshold must be a 0-dim float32 tensor (η, on the device), got ", threshold.scalar_type(), " ",
                    threshold.sizes());
  checks::same_device(threshold, "threshold", token, "token");
  row_buffer(active, "active", at::kBool, "bool", {batch}, "[B]", token);
  row_buffer(num_drafted, "num_drafted", at::kLong, "int64", {batch}, "[B]", token);
  TORCH_CHECK_VALUE(draft_tokens.dim() == 2 && draft_tokens.size(1) >= 1,
                    "draft_tokens must be int64 of shape [B, G] with G >= 1, got ", draft_tokens.scalar_type(), " ",
                    draft_tokens.sizes());
  const int64_t gamma = draft_tokens.size(1);
  row_buffer(draft_tokens, "draft_tokens", at::kLong, "int64", {batch, gamma}, "[B, G]", token);
  row_buffer(tokens_in, "tokens_in", at::kLong, "int64", {batch, gamma + 1}, "[B, G+1]", token);
  TORCH_CHECK_VALUE(0 <= step && step < gamma, "step must be an int in [0, G) = [0, ", gamma,
                    ") (the draft column written), got ", step);
  int64_t num_ids = 0;
  if (draft_ids.has_value()) {
    const at::Tensor& ids = *draft_ids;
    checks::cuda(ids, "draft_ids");
    TORCH_CHECK_VALUE(ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.size(0) >= 1,
                      "draft_ids must be int64 of shape [N] with N >= 1 (draft index -> token id) or None, got ",
                      ids.scalar_type(), " ", ids.sizes());
    checks::same_device(ids, "draft_ids", token, "token");
    checks::contiguous(ids, "draft_ids");
    num_ids = ids.size(0);
  }
  // One thread per row: ceil(B / threads per block) blocks must fit one grid dimension.
  TORCH_CHECK_VALUE(batch <= static_cast<int64_t>(std::numeric_limits<int>::max()),
                    "token must have B < 2^31 rows, got ", batch);

  const c10::cuda::OptionalCUDAGuard guard(token.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor keep = at::empty({batch}, active.options());
  draft::launch_take_draft(token.const_data_ptr<int64_t>(), confidence.const_data_ptr<float>(),
                           threshold.const_data_ptr<float>(),
                           draft_ids.has_value() ? draft_ids->const_data_ptr<int64_t>() : nullptr, num_ids, batch,
                           gamma, step, active.mutable_data_ptr<bool>(), num_drafted.mutable_data_ptr<int64_t>(),
                           draft_tokens.mutable_data_ptr<int64_t>(), tokens_in.mutable_data_ptr<int64_t>(),
                           keep.mutable_data_ptr<bool>(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return keep;
}

}  // namespace kangaroo
