// ATen launchers for kernels/decode_linear.cuh: decode_linear, rms_norm_linear, rms_norm_gate_up.
// Checks arguments as kangaroo_ext/ops/validate.py does, allocates outputs with torch and launches
// one kernel on the current stream (programmatic dependent launch: see the header). No host sync.
// With set_tensor_core_gemv(true) (KANGAROO_TENSOR_CORE_GEMV) the 16-bit ops whose shapes allow it run
// kernels/decode_linear_mma.cuh instead; the choice depends on K, N, dtype and alignment, never on the
// number of rows, so plain and verify steps stay bitwise alike.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "checks.h"
#include "device_info.h"
#include "dispatch.cuh"
#include "kernels/decode_linear.cuh"
#include "kernels/decode_linear_mma.cuh"
#include "launch_options.h"
#include "ops.h"

namespace kangaroo {
namespace {

using gemv::Mode;

void check_x(const at::Tensor& x) {
  checks::cuda(x, "x");
  checks::float_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1 && x.numel() > 0,
                    "x must have shape [..., K] with K >= 1 and no empty dimension, got ", x.sizes());
  checks::contiguous(x, "x");
}

void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x) {
  checks::cuda(t, name);
  TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), name, " must have x's dtype ", x.scalar_type(), ", got ",
                    t.scalar_type());
  checks::same_device(t, name, x, "x");
  checks::contiguous(t, name);
}

void check_matrix(const at::Tensor& w, const char* name, const at::Tensor& x) {
  check_like_x(w, name, x);
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) == x.size(-1) && w.size(0) >= 1, name, " must have shape [N, ",
                    x.size(-1), "] (N >= 1; K = x's last dimension), got ", w.sizes());
  TORCH_CHECK_VALUE(w.size(0) < std::numeric_limits<int>::max(), name, " has too many rows for the CUDA kernel");
}

void check_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& norm_weight,
                double eps) {
  check_x(x);
  if (residual.has_value()) {
    check_like_x(*residual, "residual", x);
    TORCH_CHECK_VALUE(residual->sizes() == x.sizes(), "residual must have x's shape ", x.sizes(), ", got ",
                      residual->sizes());
  }
  check_like_x(norm_weight, "norm_weight", x);
  TORCH_CHECK_VALUE(norm_weight.dim() == 1 && norm_weight.size(0) == x.size(-1), "norm_weight must have shape [",
                    x.size(-1), "] (x's last dimension), got ", norm_weight.sizes());
  TORCH_CHECK_VALUE(eps >= 0, "eps must be a float >= 0, got ", eps);
}

at::Tensor new_out(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return at::empty(shape, x.options());
}

// Shape limits of the kernel, then the launch of `MODE` (arguments already checked by the caller).
template <Mode MODE>
void run(const at::Tensor& x, const std::vector<const at::Tensor*>& weights,
         const std::vector<std::optional<at::Tensor>>& biases, const std::vector<at::Tensor>& outs,
         const std::optional<at::Tensor>& residual, const at::Tensor* norm_weight, at::Tensor* residual_out,
         double eps) {
  const int64_t K = x.size(-1), M = x.numel() / K;
  TORCH_CHECK_VALUE(K < std::numeric_limits<int>::max() / 16 && M < std::numeric_limits<int>::max(),
                    "x is too large for the CUDA kernel, got shape ", x.sizes());
  TORCH_CHECK_VALUE(M <= 65535 * 8, "x has ", M, " rows; the CUDA kernel takes at most ", 65535 * 8);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const auto device = x.device().index();
  const int num_sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  const int max_smem = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  dispatch_float_dtype(x.scalar_type(), "x", [&](auto tag) {
    using T = element_t<decltype(tag)>;
    gemv::Params<T> p{};
    p.x = static_cast<const T*>(x.const_data_ptr());
    p.residual = residual.has_value() ? static_cast<const T*>(residual->const_data_ptr()) : nullptr;
    p.norm_weight = norm_weight != nullptr ? static_cast<const T*>(norm_weight->const_data_ptr()) : nullptr;
    p.residual_out = residual_out != nullptr ? static_cast<T*>(residual_out->data_ptr()) : nullptr;
    p.m = static_cast<int>(M);
    p.k = static_cast<int>(K);
    p.eps = static_cast<float>(eps);
    p.n_segments = static_cast<int>(weights.size());
    bool vec16 = K * static_cast<int64_t>(sizeof(T)) % 16 == 0 && is_aligned(p.x, 16) &&
                 (p.residual == nullptr || is_aligned(p.residual, 16)) &&
                 (p.norm_weight == nullptr || is_aligned(p.norm_weight, 16)) &&
                 (p.residual_out == nullptr || is_aligned(p.residual_out, 16));
    int64_t n_total = 0;
    for (size_t s = 0; s < weights.size(); ++s) {
      p.seg[s].w = static_cast<const T*>(weights[s]->const_data_ptr());
      p.seg[s].bias = biases[s].has_value() ? static_cast<const T*>(biases[s]->const_data_ptr()) : nullptr;
      p.seg[s].out = static_cast<T*>(outs[MODE == Mode::kNormGateUp ? 0 : s].data_ptr());
      p.seg[s].n = static_cast<int>(weights[s]->size(0));
      vec16 = vec16 && is_aligned(p.seg[s].w, 16);
      n_total += MODE == Mode::kNormGateUp ? 0 : p.seg[s].n;
    }
    if (MODE == Mode::kNormGateUp) n_total = p.seg[0].n;
    TORCH_CHECK_VALUE(n_total < std::numeric_limits<int>::max(), "the weights have too many rows in total");
    p.n_total = static_cast<int>(n_total);
    if constexpr (sizeof(T) == 2) {
      int rows[gemv::kMaxSegments] = {};
      for (int s = 0; s < p.n_segments; ++s) rows[s] = p.seg[s].n;
      if (tensor_core_gemv() && vec16 && gemv_mma::eligible(p.k, rows, p.n_segments)) {
        const gemv::Plan pl = gemv_mma::plan(p.m, p.k, p.n_total, static_cast<int>(sizeof(T)), max_smem);
        TORCH_CHECK_VALUE(pl.smem_bytes + 4096 <= max_smem, "x's last dimension K = ", K,
                          " is too large for the CUDA kernel (", pl.smem_bytes,
                          " bytes of x rows must fit the device's shared memory per block, ", max_smem, " bytes)");
        const bool deep = gemv_deep_prefetch() && gemv_mma::deep_in_flight(MODE, p.k, p.n_total, num_sms);
        C10_CUDA_CHECK((gemv_mma::launch<T, MODE>(p, pl, deep, Launch{stream, pdl_launches()})));
        return;
      }
    }
    const gemv::Plan pl =
        gemv::plan(p.m, p.k, p.n_total, static_cast<int>(sizeof(T)), vec16, num_sms, max_smem);
    TORCH_CHECK_VALUE(pl.smem_bytes + 1024 <= max_smem, "x's last dimension K = ", K,
                      " is too large for the CUDA kernel (one row of ", pl.smem_bytes,
                      " bytes must fit the device's shared memory per block, ", max_smem, " bytes)");
    const cudaError_t err = gemv::launch<T, MODE>(p, pl, Launch{stream, pdl_launches()});
    C10_CUDA_CHECK(err);
  });
}

}  // namespace

at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_x(x);
  check_matrix(weight, "weight", x);
  if (bias.has_value()) {
    check_like_x(*bias, "bias", x);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must have shape [",
                      weight.size(0), "] or be None, got ", bias->sizes());
  }
  at::Tensor out = new_out(x, weight.size(0));
  run<Mode::kLinear>(x, {&weight}, {bias}, {out}, std::nullopt, nullptr, nullptr, 0.0);
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> rms_norm_linear(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& norm_weight, double eps,
    at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases) {
  check_norm(x, residual, norm_weight, eps);
  TORCH_CHECK_VALUE(weights.size() >= 1 && weights.size() <= gemv::kMaxSegments,
                    "weights must be a list of 1 to 3 tensors [N_i, K], got ", weights.size());
  TORCH_CHECK_VALUE(biases.size() == weights.size(), "biases must have one entry (tensor or None) per weight (",
                    weights.size(), "), got ", biases.size());
  static const char* const kWeightNames[] = {"weights[0]", "weights[1]", "weights[2]"};
  static const char* const kBiasNames[] = {"biases[0]", "biases[1]", "biases[2]"};
  std::vector<const at::Tensor*> ws;
  std::vector<std::optional<at::Tensor>> bs;
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < weights.size(); ++i) {
    check_matrix(weights[i], kWeightNames[i], x);
    std::optional<at::Tensor> b = biases.get(i);
    if (b.has_value()) {
      check_like_x(*b, kBiasNames[i], x);
      TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == weights[i].size(0), kBiasNames[i], " must have shape [",
                        weights[i].size(0), "] or be None, got ", b->sizes());
    }
    ws.push_back(&weights[i]);
    bs.push_back(b);
    outs.push_back(new_out(x, weights[i].size(0)));
  }
  at::Tensor residual_out = at::empty_like(x);
  run<Mode::kNormLinear>(x, ws, bs, outs, residual, &norm_weight, &residual_out, eps);
  return {outs, residual_out};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_gate_up(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                    const at::Tensor& norm_weight, double eps,
                                                    const at::Tensor& gate, const at::Tensor& up) {
  check_norm(x, residual, norm_weight, eps);
  check_matrix(gate, "gate", x);
  check_matrix(up, "up", x);
  TORCH_CHECK_VALUE(up.sizes() == gate.sizes(), "up must have gate's shape ", gate.sizes(), ", got ", up.sizes());
  at::Tensor act = new_out(x, gate.size(0));
  at::Tensor residual_out = at::empty_like(x);
  run<Mode::kNormGateUp>(x, {&gate, &up}, {std::nullopt, std::nullopt}, {act}, residual, &norm_weight,
                         &residual_out, eps);
  return {act, residual_out};
}

}  // namespace kangaroo
