// ATen launcher for kernels/accept_commit.cuh (one launch). Checks arguments as kangaroo_ext/ops/validate.py
// does and writes cache_len, tokens_in, history and report in place on the current stream. No host sync.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "checks.h"
#include "kernels/accept_commit.cuh"
#include "launch_options.h"
#include "ops.h"

namespace kangaroo {

void accept_commit(const at::Tensor& draft_tokens, const at::Tensor& target_tokens, const at::Tensor& num_drafted,
                   at::Tensor& cache_len, at::Tensor& tokens_in, at::Tensor& history, at::Tensor& report) {
  checks::cuda(target_tokens, "target_tokens");
  TORCH_CHECK_VALUE(target_tokens.scalar_type() == at::kLong && target_tokens.dim() == 2 &&
                        target_tokens.size(0) >= 1 && target_tokens.size(1) >= 1 && target_tokens.size(1) <= 64,
                    "target_tokens must be int64 [B, k + 1] with B >= 1 and 1 <= k + 1 <= 64, got ",
                    target_tokens.scalar_type(), " ", target_tokens.sizes());
  checks::contiguous(target_tokens, "target_tokens");
  const int64_t B = target_tokens.size(0), k = target_tokens.size(1) - 1;
  checks::commit_state(draft_tokens, num_drafted, cache_len, tokens_in, history, report, B, k, target_tokens,
                       "target_tokens");
  const c10::cuda::OptionalCUDAGuard guard(target_tokens.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(commit::launch_accept_commit(
      draft_tokens.const_data_ptr<int64_t>(), target_tokens.const_data_ptr<int64_t>(),
      num_drafted.const_data_ptr<int64_t>(), B, static_cast<int>(k), cache_len.mutable_data_ptr<int64_t>(),
      tokens_in.mutable_data_ptr<int64_t>(), tokens_in.size(1), history.mutable_data_ptr<int64_t>(),
      history.size(1), report.mutable_data_ptr<int64_t>(), report.size(1), Launch{stream, pdl_launches()}));
}

}  // namespace kangaroo
