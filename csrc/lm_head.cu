// ATen launcher for kernels/lm_head.cuh (two launches: see that header for why). Checks arguments
// as kangaroo_ext/ops/validate.py does, allocates outputs and the per-call workspace with torch (the
// caching allocator: graph capture takes them from the graph's pool; no state outlives the call) and
// launches on the current stream. No host sync.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>

#include "checks.h"
#include "device_info.h"
#include "dispatch.cuh"
#include "kernels/lm_head.cuh"
#include "launch_options.h"
#include "ops.h"

namespace kangaroo {

std::tuple<at::Tensor, at::Tensor> lm_head_argmax(const at::Tensor& hidden, const at::Tensor& lm_head) {
  checks::cuda(hidden, "hidden");
  checks::cuda(lm_head, "lm_head");
  const auto dt = hidden.scalar_type();
  TORCH_CHECK_VALUE((dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16) && hidden.dim() >= 1 &&
                        hidden.numel() > 0,
                    "hidden must be a non-empty float32/float16/bfloat16 tensor [..., H], got ", dt, " ",
                    hidden.sizes());
  const int64_t H = hidden.size(-1);
  TORCH_CHECK_VALUE(lm_head.dim() == 2 && lm_head.size(1) == H && lm_head.size(0) >= 1, "lm_head must have shape [V, ",
                    H, "] (V >= 1), got ", lm_head.sizes());
  TORCH_CHECK_VALUE(lm_head.scalar_type() == dt, "lm_head must have hidden's dtype ", dt, ", got ",
                    lm_head.scalar_type());
  checks::same_device(lm_head, "lm_head", hidden, "hidden");
  checks::contiguous(hidden, "hidden");
  checks::contiguous(lm_head, "lm_head");
  const int64_t V = lm_head.size(0);
  const int64_t R = hidden.numel() / H;
  // Limits of this implementation: int indices, and R / RB row groups in one grid dimension.
  TORCH_CHECK_VALUE(V < std::numeric_limits<int>::max() && H < std::numeric_limits<int>::max() / 8,
                    "lm_head is too large for the CUDA kernel (V < 2^31 and H < 2^28 needed), got ", lm_head.sizes());
  TORCH_CHECK_VALUE(R <= 65535, "hidden has ", R, " rows; the CUDA kernel takes at most 65535");

  const c10::cuda::OptionalCUDAGuard guard(hidden.device());
  const auto lead = hidden.sizes().slice(0, hidden.dim() - 1);
  at::Tensor token = at::empty(lead, hidden.options().dtype(at::kLong));
  at::Tensor confidence = at::empty(lead, hidden.options().dtype(at::kFloat));
  const auto device = hidden.device().index();
  const int num_sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  const int max_smem = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  dispatch_float_dtype(dt, "hidden", [&](auto tag) {
    using T = element_t<decltype(tag)>;
    const T* x = static_cast<const T*>(hidden.const_data_ptr());
    const T* w = static_cast<const T*>(lm_head.const_data_ptr());
    const lm_head::Plan pl = lm_head::plan<T>(x, w, R, static_cast<int>(V), static_cast<int>(H), max_smem, num_sms);
    TORCH_CHECK_VALUE(pl.rb > 0, "hidden size H = ", H, " is too large for the CUDA kernel (one fp32 row of ",
                      H * 4, " bytes must fit the device's ", max_smem - 2048, " bytes of shared memory per block)");
    // Triples {float, int, float}: three int32 per entry keeps the workspace a plain torch allocation.
    static_assert(sizeof(lm_head::Soft) == 3 * sizeof(int32_t), "Soft layout");
    at::Tensor workspace = at::empty({R * pl.n_blocks * 3}, hidden.options().dtype(at::kInt));
    C10_CUDA_CHECK(lm_head::launch<T>(pl, x, w, R, static_cast<int>(V), static_cast<int>(H),
                                      reinterpret_cast<lm_head::Soft*>(workspace.data_ptr()),
                                      token.mutable_data_ptr<int64_t>(), confidence.mutable_data_ptr<float>(),
                                      Launch{stream, pdl_launches()}));
  });
  return {token, confidence};
}

}  // namespace kangaroo
