// Greedy accept rule on the target's tokens (kangaroo_ext/ops/reference.py: accept_greedy), torch-free.
//
//   n_b = clamp(num_drafted[b], 0, k)   (k when num_drafted is null)
//   a_b = the first j in [0, n_b) with draft[b, j] != target[b, j], else n_b
//   committed[b, j] = draft[b, j] (j < a_b), target[b, j] (j == a_b), -1 (j > a_b)
//
// verify_accept minus its argmax: the engine's greedy verify gets the target's tokens from the fused
// LM head + argmax (lm_head.cuh), so no logits exist to reduce. What is left is O(B * k) int64 work,
// so one warp per batch row is plenty: the warp tests 32 positions per step and stops at the first
// mismatch (__ballot_sync), then its lanes write the row. No shared memory, no block-wide sync, so a
// block holds several rows' warps and a warp past the last row simply exits.
#pragma once

#include "common.cuh"

namespace kangaroo {
namespace accept {

constexpr int kWarpsPerBlock = 4;

// Warp w of block x handles batch row b = x * kWarpsPerBlock + w. draft_tokens [B, k], target_tokens
// [B, k+1], committed [B, k+1], accepted [B], num_drafted [B] or null; all contiguous.
__global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize)
accept_greedy_kernel(const int64_t* __restrict__ draft_tokens, const int64_t* __restrict__ target_tokens,
                     const int64_t* __restrict__ num_drafted, int64_t batch, int k,
                     int64_t* __restrict__ accepted, int64_t* __restrict__ committed) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (b >= batch) return;  // the whole warp leaves together: the ballots below see full warps only
  const int64_t* drafts = draft_tokens + b * k;
  const int64_t* target = target_tokens + b * (k + 1);
  int64_t* out = committed + b * (k + 1);

  int64_t n = num_drafted == nullptr ? k : num_drafted[b];
  n = n < 0 ? 0 : (n > k ? k : n);
  // j == n <= k always stops the prefix, so the loop ends within ceil((k+1)/32) rounds; positions
  // j >= n are never read (j < n <= k keeps drafts[j] and target[j] in the row).
  int a = -1;
  for (int base = 0; a < 0; base += kWarpSize) {
    const int j = base + lane;
    const bool stop = j >= n || drafts[j] != target[j];
    const unsigned mask = __ballot_sync(kFullMask, stop);
    if (mask != 0u) a = base + __ffs(static_cast<int>(mask)) - 1;
  }
  if (lane == 0) accepted[b] = a;
  for (int j = lane; j <= k; j += kWarpSize) {
    // j == a: the target's token there, the correction (a < n) or the bonus token (a == k)
    out[j] = j < a ? drafts[j] : (j == a ? target[j] : int64_t{-1});
  }
}

// On `stream`; the caller checks the launch. batch >= 1, 1 <= k < 2^20 (positions are int).
inline void launch_accept_greedy(const int64_t* draft_tokens, const int64_t* target_tokens,
                                 const int64_t* num_drafted, int64_t batch, int k, int64_t* accepted,
                                 int64_t* committed, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((batch + kWarpsPerBlock - 1) / kWarpsPerBlock));
  accept_greedy_kernel<<<grid, kWarpsPerBlock * kWarpSize, 0, stream>>>(draft_tokens, target_tokens, num_drafted,
                                                                        batch, k, accepted, committed);
}

}  // namespace accept
}  // namespace kangaroo
