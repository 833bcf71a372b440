// ATen launcher for kernels/rms_norm.cuh. Checks arguments, allocates outputs with torch and
// launches on the current stream: no host sync, so it is safe inside CUDA-graph capture.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>

#include "checks.h"
#include "dispatch.cuh"
#include "kernels/rms_norm.cuh"
#include "launch_options.h"
#include "ops.h"

namespace kangaroo {

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                      const at::Tensor& weight, double eps) {
  checks::cuda(x, "x");
  checks::float_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1 && x.numel() > 0,
                    "x must have shape [..., H] with H >= 1 and no empty dimension, got ", x.sizes());
  checks::contiguous(x, "x");
  const int64_t hidden = x.size(-1);
  const int64_t rows = x.numel() / hidden;
  TORCH_CHECK_VALUE(hidden <= std::numeric_limits<int>::max() && rows <= std::numeric_limits<int>::max(),
                    "x must have H < 2^31 and fewer than 2^31 rows, got shape ", x.sizes());

  const bool has_residual = residual.has_value();
  if (has_residual) {
    const at::Tensor& r = *residual;
    checks::cuda(r, "residual");
    TORCH_CHECK_VALUE(r.sizes() == x.sizes(), "residual must have x's shape ", x.sizes(), ", got ", r.sizes());
    TORCH_CHECK_VALUE(r.scalar_type() == x.scalar_type(), "residual must have x's dtype ", x.scalar_type(),
                      ", got ", r.scalar_type());
    checks::same_device(r, "residual", x, "x");
    checks::contiguous(r, "residual");
  }
  checks::cuda(weight, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == hidden, "weight must have shape [", hidden,
                    "] (x's last dimension), got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type(), "weight must have x's dtype ", x.scalar_type(),
                    ", got ", weight.scalar_type());
  checks::same_device(weight, "weight", x, "x");
  checks::contiguous(weight, "weight");
  TORCH_CHECK_VALUE(eps >= 0, "eps must be a float >= 0, got ", eps);  // also rejects NaN

  const c10::cuda::OptionalCUDAGuard guard(x.device());
  // Fresh tensors for both outputs: residual_out never aliases x or residual, as in the reference.
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor residual_out = at::empty(x.sizes(), x.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  dispatch_float_dtype(x.scalar_type(), "x", [&](auto tag) {
    using T = element_t<decltype(tag)>;
    T* out_ptr = static_cast<T*>(out.data_ptr());
    const cudaError_t err = rms_norm::launch<T>(out_ptr, static_cast<T*>(residual_out.data_ptr()),
                                                static_cast<const T*>(x.const_data_ptr()),
                                                has_residual ? static_cast<const T*>(residual->const_data_ptr())
                                                             : nullptr,
                                                static_cast<const T*>(weight.const_data_ptr()), rows,
                                                static_cast<int>(hidden), static_cast<float>(eps),
                                                Launch{stream, pdl_launches()});
    C10_CUDA_CHECK(err);
  });
  return {out, residual_out};
}

}  // namespace kangaroo
