// Greedy accept and commit in one launch (kangaroo_ext/ops/reference.py: accept_commit), torch-free.
//
//   a_b = the longest prefix of draft_tokens[b, :n_b] equal to target_tokens[b, :n_b]
//         (n_b = clamp(num_drafted[b], 0, k))
//   committed_b = draft_tokens[b, :a_b], then target_tokens[b, a_b], then -1 up to k + 1 tokens
//   history[b, L_b + 1 + j] = committed_b[j]  (j <= k; L_b = cache_len[b])
//   report[b] = [a_b, num_drafted[b], committed_b[0..k]]  (rounds.py: Report)
//   cache_len[b] = L_b + a_b + 1;  tokens_in[b, 0] = target_tokens[b, a_b]
//
// What accept_greedy and the engine's commit (Engine._commit: a scatter, an add, a gather, three report
// writes, each with its index arithmetic: about ten launches of a few scalars) do, in one launch at the end
// of every greedy verify and plain step. One thread per row: k <= 63 compares and k + 1 stores.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace kangaroo {
namespace commit {

constexpr int kThreads = 64;

// Row b's accept and commit: drafts [k] and targets [k + 1] of that row (either may live in shared memory),
// drafted = num_drafted[b]. verify_tail.cuh's last kernel ends with it too: one accept rule, one commit.
__device__ __forceinline__ void commit_row(int64_t b, const int64_t* drafts, const int64_t* targets, int64_t drafted,
                                           int k, int64_t* cache_len, int64_t* tokens_in, int64_t tokens_in_stride,
                                           int64_t* history, int64_t history_len, int64_t* report,
                                           int64_t report_width) {
  const int n = drafted < 0 ? 0 : (drafted > k ? k : static_cast<int>(drafted));
  int a = 0;
  while (a < n && drafts[a] == targets[a]) ++a;
  const int64_t L = cache_len[b];
  int64_t* row = report + b * report_width;
  for (int j = 0; j <= k; ++j) {
    const int64_t c = j < a ? drafts[j] : (j == a ? targets[a] : -1);
    const int64_t at = L + 1 + j;
    if (at >= 0 && at < history_len) history[b * history_len + at] = c;
    row[2 + j] = c;
  }
  row[0] = a;
  row[1] = drafted;
  cache_len[b] = L + a + 1;
  tokens_in[b * tokens_in_stride] = targets[a];
}

// Thread x of block y: row b = y * kThreads + x. draft_tokens [B, k] (k may be 0), target_tokens [B, k + 1],
// num_drafted, cache_len [B]; tokens_in [B, tokens_in_stride]; history [B, history_len]; report [B, report_width]
// with report_width >= k + 3; all int64, contiguous. history_len >= cache_len + k + 2 for every row (the
// launcher cannot read cache_len: a row past it writes what fits and drops the rest). Internal linkage: a
// non-template kernel in a header that verify_tail.cuh includes too.
static __global__ void __launch_bounds__(kThreads)
accept_commit_kernel(const int64_t* __restrict__ draft_tokens, const int64_t* __restrict__ target_tokens,
                     const int64_t* __restrict__ num_drafted, int64_t batch, int k, int64_t* cache_len,
                     int64_t* tokens_in, int64_t tokens_in_stride, int64_t* history, int64_t history_len,
                     int64_t* report, int64_t report_width) {
  pdl_launch_dependents();
  pdl_wait();
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= batch) return;
  commit_row(b, draft_tokens + b * k, target_tokens + b * (k + 1), num_drafted[b], k, cache_len, tokens_in,
             tokens_in_stride, history, history_len, report, report_width);
}

// On `launch.stream`; the caller checked the arguments. Returns the launch status.
inline cudaError_t launch_accept_commit(const int64_t* draft_tokens, const int64_t* target_tokens,
                                        const int64_t* num_drafted, int64_t batch, int k, int64_t* cache_len,
                                        int64_t* tokens_in, int64_t tokens_in_stride, int64_t* history,
                                        int64_t history_len, int64_t* report, int64_t report_width, Launch launch) {
  const dim3 grid(static_cast<unsigned>((batch + kThreads - 1) / kThreads));
  return launch_pdl(accept_commit_kernel, grid, dim3(kThreads), 0, launch, draft_tokens, target_tokens, num_drafted,
                    batch, k, cache_len, tokens_in, tokens_in_stride, history, history_len, report, report_width);
}

}  // namespace commit
}  // namespace kangaroo
