// ATen launcher for kernels/accept_greedy.cuh (one launch). Checks arguments, allocates the outputs with
// torch (the caching allocator, so CUDA-graph capture gets them from the graph's pool) and launches on
// the current stream. No host sync.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>

#include "checks.h"
#include "kernels/accept_greedy.cuh"
#include "ops.h"

namespace kangaroo {

std::tuple<at::Tensor, at::Tensor> accept_greedy(const at::Tensor& draft_tokens, const at::Tensor& target_tokens,
                                                 const std::optional<at::Tensor>& num_drafted) {
  checks::token_chain(draft_tokens, target_tokens, num_drafted);
  const int64_t batch = draft_tokens.size(0), k = draft_tokens.size(1);
  // One warp per row: ceil(B / warps per block) blocks must fit one grid dimension.
  TORCH_CHECK_VALUE(batch <= static_cast<int64_t>(std::numeric_limits<int>::max()),
                    "draft_tokens must have B < 2^31 rows, got ", batch);

  const c10::cuda::OptionalCUDAGuard guard(draft_tokens.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor accepted = at::empty({batch}, draft_tokens.options());
  at::Tensor committed = at::empty({batch, k + 1}, draft_tokens.options());
  accept::launch_accept_greedy(draft_tokens.const_data_ptr<int64_t>(), target_tokens.const_data_ptr<int64_t>(),
                               num_drafted.has_value() ? num_drafted->const_data_ptr<int64_t>() : nullptr, batch,
                               static_cast<int>(k), accepted.mutable_data_ptr<int64_t>(),
                               committed.mutable_data_ptr<int64_t>(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {accepted, committed};
}

}  // namespace kangaroo
