// ATen launchers for kernels/sampling.cuh: sampling_probs (one launch), sample_logits and
// speculative_sample_accept (two launches each). They check arguments as kangaroo_ext/ops/validate.py does,
// allocate outputs and the small per-call workspace with torch (graph capture takes them from the graph's
// pool) and launch on the current stream. The rng tensor is read by the kernels: no host sync.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "checks.h"
#include "device_info.h"
#include "dispatch.cuh"
#include "kernels/sampling.cuh"
#include "ops.h"

namespace kangaroo {
namespace {

sampling::Filter check_filter(double temperature, int64_t top_k, double top_p) {
  const float t = static_cast<float>(temperature);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0 && t > 0 && std::isfinite(t),
                    "temperature must be a finite float > 0 that float32 can hold, got ", temperature);
  TORCH_CHECK_VALUE(top_k >= 0, "top_k must be an int >= 0 (0: no top-k filter), got ", top_k);
  TORCH_CHECK_VALUE(top_p > 0 && top_p <= 1, "top_p must be a float in (0, 1] (1: no top-p filter), got ", top_p);
  const int64_t k_max = std::numeric_limits<int>::max();
  return sampling::Filter{t, static_cast<int>(top_k < k_max ? top_k : k_max), static_cast<float>(top_p)};
}

void check_rng(const at::Tensor& rng, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(rng.scalar_type() == at::kLong && rng.dim() == 1 && rng.size(0) == 2,
                    "rng must be an int64 tensor of shape [2] holding (seed, offset), got ", rng.scalar_type(), " ",
                    rng.sizes());
  TORCH_CHECK_VALUE(rng.device() == ref.device(), "rng is on ", rng.device(), " but ", ref_name, " is on ",
                    ref.device(), "; expected one device");
  checks::contiguous(rng, "rng");
}

// logits [..., V] -> (rows, V) after the checks common to sampling_probs and sample_logits.
std::pair<int64_t, int> check_logit_rows(const at::Tensor& logits) {
  checks::cuda(logits, "logits");
  checks::float_dtype(logits, "logits");
  TORCH_CHECK_VALUE(logits.dim() >= 1 && logits.size(-1) >= 1 && logits.numel() > 0,
                    "logits must have shape [..., V] with V >= 1 and no empty dimension, got ", logits.sizes());
  checks::contiguous(logits, "logits");
  const int64_t vocab = logits.size(-1), rows = logits.numel() / vocab;
  TORCH_CHECK_VALUE(vocab < std::numeric_limits<int>::max() / 4, "logits must have V < 2^29, got ", vocab);
  TORCH_CHECK_VALUE(rows <= std::numeric_limits<int>::max(), "logits has too many rows (", rows,
                    ") for one launch");
  return {rows, static_cast<int>(vocab)};
}

template <bool kSample>
std::tuple<at::Tensor, at::Tensor, at::Tensor> probs_impl(const at::Tensor& logits, const sampling::Filter& filter,
                                                          const at::Tensor* rng, int64_t stream_id) {
  const auto [rows, vocab] = check_logit_rows(logits);
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  const auto lead = logits.sizes().slice(0, logits.dim() - 1);
  at::Tensor probs = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  at::Tensor token, top_prob, workspace;
  const sampling::RacePlan plan = sampling::race_plan(vocab);
  if (kSample) {
    token = at::empty(lead, logits.options().dtype(at::kLong));
    top_prob = at::empty(lead, logits.options().dtype(at::kFloat));
    TORCH_CHECK_VALUE(rows * plan.splits <= std::numeric_limits<int>::max(), "logits has too many rows (", rows,
                      ") for one launch");
    // One int32 allocation: two ints (an ArgMax) per race block, then one arrival counter per row.
    static_assert(sizeof(ArgMax) == 2 * sizeof(int32_t), "ArgMax layout");
    workspace = at::empty({rows * plan.splits * 2 + rows}, logits.options().dtype(at::kInt));
  }
  const int max_smem = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, logits.device().index());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float_dtype(logits.scalar_type(), "logits", [&](auto tag) {
    using T = element_t<decltype(tag)>;
    const T* x = static_cast<const T*>(logits.const_data_ptr());
    if (kSample) {
      int32_t* base = workspace.mutable_data_ptr<int32_t>();
      C10_CUDA_CHECK(sampling::launch_sample<T>(
          x, rows, vocab, filter, rng->const_data_ptr<int64_t>(), static_cast<uint32_t>(stream_id), plan,
          reinterpret_cast<ArgMax*>(base), reinterpret_cast<unsigned*>(base + rows * plan.splits * 2),
          probs.mutable_data_ptr<float>(), token.mutable_data_ptr<int64_t>(), top_prob.mutable_data_ptr<float>(),
          max_smem, stream));
    } else {
      C10_CUDA_CHECK(sampling::launch_probs<T>(x, rows, vocab, filter, probs.mutable_data_ptr<float>(), nullptr,
                                               nullptr, max_smem, stream));
    }
  });
  return {token, probs, top_prob};
}

}  // namespace

at::Tensor sampling_probs(const at::Tensor& logits, double temperature, int64_t top_k, double top_p) {
  const sampling::Filter filter = check_filter(temperature, top_k, top_p);
  return std::get<1>(probs_impl<false>(logits, filter, nullptr, 0));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_logits(const at::Tensor& logits, double temperature,
                                                             int64_t top_k, double top_p, const at::Tensor& rng,
                                                             int64_t stream) {
  const sampling::Filter filter = check_filter(temperature, top_k, top_p);
  checks::cuda(logits, "logits");
  check_rng(rng, logits, "logits");
  TORCH_CHECK_VALUE(stream >= 0 && stream < sampling::kAcceptStream, "stream must be an int in [0, ",
                    sampling::kAcceptStream, ") (the streams above are speculative_sample_accept's), got ", stream);
  return probs_impl<true>(logits, filter, &rng, stream);
}

std::tuple<at::Tensor, at::Tensor> speculative_sample_accept(const at::Tensor& draft_tokens,
                                                             const at::Tensor& draft_probs,
                                                             const at::Tensor& target_logits,
                                                             const std::optional<at::Tensor>& num_drafted,
                                                             double temperature, int64_t top_k, double top_p,
                                                             const at::Tensor& rng) {
  const sampling::Filter filter = check_filter(temperature, top_k, top_p);
  const int64_t vocab = checks::draft_chain(draft_tokens, target_logits, num_drafted);
  const int64_t batch = draft_tokens.size(0), k = draft_tokens.size(1);
  TORCH_CHECK_VALUE(vocab < std::numeric_limits<int>::max() / 4, "target_logits must have V < 2^29, got ", vocab);
  TORCH_CHECK_VALUE(batch * (k + 1) <= std::numeric_limits<int>::max(), "target_logits has too many rows (B * (k+1) = ",
                    batch * (k + 1), ") for one launch");

  checks::cuda(draft_probs, "draft_probs");
  TORCH_CHECK_VALUE(draft_probs.scalar_type() == at::kFloat && draft_probs.dim() == 3 && draft_probs.size(0) == batch &&
                        draft_probs.size(1) == k && draft_probs.size(2) == vocab,
                    "draft_probs must be float32 of shape [B, k, V] = [", batch, ", ", k, ", ", vocab, "], got ",
                    draft_probs.scalar_type(), " ", draft_probs.sizes());
  checks::same_device(draft_probs, "draft_probs", draft_tokens, "draft_tokens");
  checks::contiguous(draft_probs, "draft_probs");

  check_rng(rng, target_logits, "target_logits");

  const c10::cuda::OptionalCUDAGuard guard(draft_tokens.device());
  at::Tensor accepted = at::empty({batch}, draft_tokens.options());
  at::Tensor committed = at::empty({batch, k + 1}, draft_tokens.options());
  // One int32 allocation holds the workspace (plain torch memory, from the graph's pool under capture):
  // RowVerdict per row (6 x 4 bytes), two ArgMax per resample block (2 x 4 bytes each), a counter per b.
  static_assert(sizeof(sampling::RowVerdict) == 6 * sizeof(int32_t), "RowVerdict layout");
  static_assert(sizeof(ArgMax) == 2 * sizeof(int32_t), "ArgMax layout");
  const sampling::RacePlan plan = sampling::race_plan(static_cast<int>(vocab));
  const int64_t rows_ints = batch * (k + 1) * 6, partial_ints = batch * plan.splits * 2 * 2;
  TORCH_CHECK_VALUE(batch * plan.splits <= std::numeric_limits<int>::max(), "draft_tokens has too many rows (B = ",
                    batch, ") for one launch");
  at::Tensor workspace = at::empty({rows_ints + partial_ints + batch}, draft_tokens.options().dtype(at::kInt));
  int32_t* base = workspace.mutable_data_ptr<int32_t>();
  const sampling::Workspace ws{reinterpret_cast<sampling::RowVerdict*>(base),
                               reinterpret_cast<ArgMax*>(base + rows_ints),
                               reinterpret_cast<unsigned*>(base + rows_ints + partial_ints)};
  const int max_smem = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, draft_tokens.device().index());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float_dtype(target_logits.scalar_type(), "target_logits", [&](auto tag) {
    using T = element_t<decltype(tag)>;
    C10_CUDA_CHECK(sampling::launch_accept<T>(
        static_cast<const T*>(target_logits.const_data_ptr()), batch, static_cast<int>(k), static_cast<int>(vocab),
        filter, draft_tokens.const_data_ptr<int64_t>(), draft_probs.const_data_ptr<float>(),
        num_drafted.has_value() ? num_drafted->const_data_ptr<int64_t>() : nullptr, rng.const_data_ptr<int64_t>(),
        plan, ws, accepted.mutable_data_ptr<int64_t>(), committed.mutable_data_ptr<int64_t>(), max_smem, stream));
  });
  return {accepted, committed};
}

}  // namespace kangaroo
