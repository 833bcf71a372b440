// Maps a torch dtype to the CUDA element type the torch-free kernels are templated on
// (at::Half / at::BFloat16 are not the types of cuda_fp16.h / cuda_bf16.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace kangaroo {

// Calls f(static_cast<T*>(nullptr)) for the matching T; recover T with element_t<decltype(tag)>.
template <typename F>
void dispatch_float_dtype(at::ScalarType dtype, const char* name, F&& f) {
  switch (dtype) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kHalf: f(static_cast<__half*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: TORCH_CHECK_VALUE(false, name, " must be float32, float16 or bfloat16, got ", dtype);
  }
}

template <typename Tag>
using element_t = std::remove_pointer_t<Tag>;

}  // namespace kangaroo
