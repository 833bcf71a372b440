// Argument checks shared by the launchers. They mirror kangaroo_ext/ops/validate.py, raise
// ValueError in Python like it does (TORCH_CHECK_VALUE), and name the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

}  // namespace checks
}  // namespace kangaroo
