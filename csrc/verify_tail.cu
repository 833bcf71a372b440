// ATen launcher for kernels/verify_tail.cuh (two launches). Checks arguments as kangaroo_ext/ops/validate.py
// does, allocates target_tokens and the per-call workspace with torch (the caching allocator: graph capture
// takes them from the graph's pool), writes the commit's buffers in place on the current stream. No host sync.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>
#include <utility>

#include "checks.h"
#include "device_info.h"
#include "dispatch.cuh"
#include "kernels/verify_tail.cuh"
#include "launch_options.h"
#include "ops.h"

namespace kangaroo {

at::Tensor verify_tail(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
                       const at::Tensor& lm_head, const at::Tensor& draft_tokens, const at::Tensor& num_drafted,
                       at::Tensor& cache_len, at::Tensor& tokens_in, at::Tensor& history, at::Tensor& report) {
  checks::cuda(x, "x");
  checks::float_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 3 && x.numel() > 0 && x.size(1) <= tail::kMaxPositions,
                    "x must be [B, T, H] with B, H >= 1 and 1 <= T <= ", tail::kMaxPositions, ", got ",
                    x.sizes());
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2);
  const auto dt = x.scalar_type();
  const std::pair<const at::Tensor*, const char*> same[] = {{&residual, "residual"}, {&norm_weight, "norm_weight"},
                                                            {&lm_head, "lm_head"}};
  for (const auto& [t, name] : same) {
    checks::cuda(*t, name);
    TORCH_CHECK_VALUE(t->scalar_type() == dt, name, " must have x's dtype ", dt, ", got ", t->scalar_type());
    checks::same_device(*t, name, x, "x");
    checks::contiguous(*t, name);
  }
  checks::contiguous(x, "x");
  TORCH_CHECK_VALUE(residual.sizes() == x.sizes(), "residual must have x's shape ", x.sizes(), ", got ",
                    residual.sizes());
  TORCH_CHECK_VALUE(norm_weight.dim() == 1 && norm_weight.size(0) == H, "norm_weight must be [H] = [", H, "], got ",
                    norm_weight.sizes());
  TORCH_CHECK_VALUE(lm_head.dim() == 2 && lm_head.size(1) == H && lm_head.size(0) >= 1, "lm_head must be [V, ", H,
                    "] (V >= 1), got ", lm_head.sizes());
  const int64_t V = lm_head.size(0), R = B * T;
  TORCH_CHECK_VALUE(V < std::numeric_limits<int>::max() && H < std::numeric_limits<int>::max() / 8,
                    "lm_head is too large for the CUDA kernel (V < 2^31 and H < 2^28 needed), got ", lm_head.sizes());
  TORCH_CHECK_VALUE(R <= 65535, "x has ", R, " rows (B * T); the CUDA kernel takes at most 65535");
  checks::commit_state(draft_tokens, num_drafted, cache_len, tokens_in, history, report, B, T - 1, x, "x");

  const c10::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor target_tokens = at::empty({B, T}, x.options().dtype(at::kLong));
  const auto device = x.device().index();
  const int num_sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  const int max_smem = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const tail::Commit commit{draft_tokens.const_data_ptr<int64_t>(),
                                   num_drafted.const_data_ptr<int64_t>(),
                                   target_tokens.mutable_data_ptr<int64_t>(),
                                   cache_len.mutable_data_ptr<int64_t>(),
                                   tokens_in.mutable_data_ptr<int64_t>(),
                                   history.mutable_data_ptr<int64_t>(),
                                   report.mutable_data_ptr<int64_t>(),
                                   tokens_in.size(1),
                                   history.size(1),
                                   report.size(1)};

  dispatch_float_dtype(dt, "x", [&](auto tag) {
    using E = element_t<decltype(tag)>;
    const E* xp = static_cast<const E*>(x.const_data_ptr());
    const E* rp = static_cast<const E*>(residual.const_data_ptr());
    const E* np = static_cast<const E*>(norm_weight.const_data_ptr());
    const E* wp = static_cast<const E*>(lm_head.const_data_ptr());
    const tail::Plan pl = tail::plan<E>(xp, rp, np, wp, R, static_cast<int>(V), static_cast<int>(H),
                                                      max_smem, num_sms);
    TORCH_CHECK_VALUE(pl.rb > 0, "hidden size H = ", H, " is too large for the CUDA kernel (one fp32 row and ",
                      "three rows of x's dtype must fit the device's ", max_smem - 4096,
                      " bytes of shared memory per block)");
    static_assert(sizeof(lm_head::Soft) == 3 * sizeof(int32_t), "Soft layout");
    at::Tensor workspace = at::empty({R * pl.n_blocks * 3}, x.options().dtype(at::kInt));
    C10_CUDA_CHECK(tail::launch<E>(pl, xp, rp, np, static_cast<float>(eps), wp, B, static_cast<int>(T),
                                          static_cast<int>(V), static_cast<int>(H),
                                          reinterpret_cast<lm_head::Soft*>(workspace.data_ptr()), commit,
                                          Launch{stream, pdl_launches()}));
  });
  return target_tokens;
}

}  // namespace kangaroo
