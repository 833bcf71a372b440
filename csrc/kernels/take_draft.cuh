// A greedy draft step's bookkeeping after the draft head (kangaroo_ext/ops/reference.py: take_draft),
// torch-free.
//
//   t_b = draft_ids[clamp(token[b], 0, N-1)]  (token[b] itself when draft_ids is null)
//   keep_b = active[b] && confidence[b] >= threshold   (false for a NaN confidence or η)
//   draft_tokens[b, step] = t_b;  tokens_in[b, step+1] = t_b;  num_drafted[b] += keep_b;  active[b] = keep_b
//
// About nine tiny torch launches in one. Each row's work is a handful of scalar loads and stores, so one
// thread per row; the clamp at N-1 only keeps a head index past the draft vocabulary (which
// lm_head_argmax never returns; the reference raises) from reading past draft_ids.
#pragma once

#include "common.cuh"

namespace kangaroo {
namespace draft {

constexpr int kThreads = 128;

// Thread x of block y handles batch row b = y * kThreads + x. token, confidence, active, num_drafted,
// keep: [B]; draft_tokens [B, G]; tokens_in [B, G+1]; threshold: one float; draft_ids [N] or null; all
// contiguous. 0 <= step < G.
__global__ void __launch_bounds__(kThreads)
take_draft_kernel(const int64_t* __restrict__ token, const float* __restrict__ confidence,
                  const float* __restrict__ threshold, const int64_t* __restrict__ draft_ids, int64_t num_ids,
                  int64_t batch, int64_t gamma, int64_t step, bool* __restrict__ active,
                  int64_t* __restrict__ num_drafted, int64_t* __restrict__ draft_tokens,
                  int64_t* __restrict__ tokens_in, bool* __restrict__ keep) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= batch) return;
  int64_t t = token[b];
  if (draft_ids != nullptr) {
    t = draft_ids[t < 0 ? 0 : (t >= num_ids ? num_ids - 1 : t)];
  }
  const bool kept = active[b] && confidence[b] >= *threshold;  // an ordered compare: NaN is never kept
  draft_tokens[b * gamma + step] = t;
  tokens_in[b * (gamma + 1) + step + 1] = t;
  num_drafted[b] += kept ? 1 : 0;
  active[b] = kept;
  keep[b] = kept;
}

// On `stream`; the caller checks the launch. batch >= 1 with ceil(batch / kThreads) blocks in one grid
// dimension, gamma >= 1, 0 <= step < gamma, num_ids >= 1 where draft_ids is not null.
inline void launch_take_draft(const int64_t* token, const float* confidence, const float* threshold,
                              const int64_t* draft_ids, int64_t num_ids, int64_t batch, int64_t gamma, int64_t step,
                              bool* active, int64_t* num_drafted, int64_t* draft_tokens, int64_t* tokens_in,
                              bool* keep, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((batch + kThreads - 1) / kThreads));
  take_draft_kernel<<<grid, kThreads, 0, stream>>>(token, confidence, threshold, draft_ids, num_ids, batch, gamma,
                                                   step, active, num_drafted, draft_tokens, tokens_in, keep);
}

}  // namespace draft
}  // namespace kangaroo
