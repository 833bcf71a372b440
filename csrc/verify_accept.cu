// ATen launcher for kernels/verify_accept.cuh (two launches: see that header for why). Checks
// arguments, allocates outputs and workspace with torch (the caching allocator, so CUDA-graph
// capture gets them from the graph's pool) and launches on the current stream. No host sync.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>

#include "checks.h"
#include "device_info.h"
#include "dispatch.cuh"
#include "kernels/verify_accept.cuh"
#include "ops.h"

namespace kangaroo {

std::tuple<at::Tensor, at::Tensor> verify_accept(const at::Tensor& draft_tokens, const at::Tensor& target_logits,
                                                 const std::optional<at::Tensor>& num_drafted) {
  const int64_t vocab = checks::draft_chain(draft_tokens, target_logits, num_drafted);
  const int64_t batch = draft_tokens.size(0), k = draft_tokens.size(1);
  // Indices and k are int inside the kernels, and B * (k+1) * splits must fit one grid dimension.
  TORCH_CHECK_VALUE(vocab <= std::numeric_limits<int>::max(), "target_logits must have V < 2^31, got ", vocab);

  const c10::cuda::OptionalCUDAGuard guard(draft_tokens.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int num_sms = device_attribute(cudaDevAttrMultiProcessorCount, draft_tokens.device().index());
  const int64_t rows = batch * (k + 1);

  at::Tensor accepted = at::empty({batch}, draft_tokens.options());
  at::Tensor committed = at::empty({batch, k + 1}, draft_tokens.options());

  dispatch_float_dtype(target_logits.scalar_type(), "target_logits", [&](auto tag) {
    using T = element_t<decltype(tag)>;
    const T* logits = static_cast<const T*>(target_logits.const_data_ptr());
    const verify::Plan plan = verify::plan<T>(logits, rows, static_cast<int>(vocab), num_sms);
    const int64_t num_partials = rows * plan.splits;
    TORCH_CHECK_VALUE(num_partials <= std::numeric_limits<int>::max(),
                      "target_logits has too many rows (B * (k+1) = ", rows, ") for one launch");
    // ArgMax is {float, int}: two int32 per entry keeps the workspace a plain torch allocation.
    static_assert(sizeof(ArgMax) == 2 * sizeof(int32_t), "ArgMax layout");
    at::Tensor workspace = at::empty({num_partials, 2}, draft_tokens.options().dtype(at::kInt));
    ArgMax* partials = reinterpret_cast<ArgMax*>(workspace.data_ptr());

    verify::launch_argmax<T>(plan, logits, static_cast<int>(vocab), partials, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    verify::launch_accept(plan, draft_tokens.const_data_ptr<int64_t>(),
                          num_drafted.has_value() ? num_drafted->const_data_ptr<int64_t>() : nullptr, batch,
                          static_cast<int>(k), partials, accepted.mutable_data_ptr<int64_t>(),
                          committed.mutable_data_ptr<int64_t>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {accepted, committed};
}

}  // namespace kangaroo
