// Greedy verify-and-accept (kangaroo_ext/ops/reference.py: verify_accept), torch-free.
//
// Two launches, no persistent state:
//   1. argmax_partial_kernel: the B*(k+1) logit rows are cut into `splits` chunks each, one block
//      per (row, chunk), so even B=1, k=4 fills the GPU; each block writes one (value, index).
//   2. accept_kernel: one block per batch row merges the chunks into t_j = argmax, finds the
//      accepted prefix and writes accepted / committed.
// A single launch with a last-block-done counter would save one launch (~1-2 us of launch latency)
// but needs a zeroed counter that outlives the call: a per-device buffer that
// resets itself races when two streams verify at once and stays dirty after an aborted kernel, and
// a per-call one costs a memset, i.e. the second operation anyway. So: two plain launches, which
// are stream-ordered, deterministic and capturable.
#pragma once

#include "common.cuh"

namespace kangaroo {
namespace verify {

constexpr int kArgmaxThreads = 256;
constexpr int kAcceptThreads = 256;
constexpr int kMaxSplits = 1024;  // bounds accept_kernel's merge loop (32 loads per lane at most)
// 16-byte loads each thread issues before using any: with ~2 blocks per SM that is ~32 KB in
// flight per SM, enough to cover DRAM latency. Also the smallest chunk worth a block per thread.
constexpr int kLoadsInFlight = 4;

// In-thread argmax step. Only valid because a thread visits its indices in increasing order: an
// equal later value never wins, a NaN wins once and then stays. Branch-free, unlike argmax_merge.
__device__ __forceinline__ void argmax_scan(ArgMax& acc, float v, int i) {
  const bool take = (v > acc.value) | ((v != v) & (acc.value == acc.value));
  acc.value = take ? v : acc.value;
  acc.index = take ? i : acc.index;
}

// One block per (row, chunk): blockIdx.x = row * splits + chunk. `chunk` counts VEC-element
// accesses, so chunk boundaries stay 16-byte aligned on the vector path.
template <typename T, int VEC>
__global__ void __launch_bounds__(kArgmaxThreads)
argmax_partial_kernel(const T* __restrict__ logits, int vocab, int splits, int chunk,
                      ArgMax* __restrict__ partials) {
  using V = Vec<T, VEC>;
  constexpr int kStride = kArgmaxThreads * kLoadsInFlight;
  __shared__ ArgMax scratch[kArgmaxThreads / kWarpSize];
  const int64_t row = blockIdx.x / splits;
  const int split = blockIdx.x % splits;
  const T* p = logits + row * vocab;
  const int nvec = vocab / VEC;
  const int begin = split * chunk;
  const int end = min(begin + chunk, nvec);
  const int first = begin + static_cast<int>(threadIdx.x);

  // Starting from (-inf, first index) makes an all -inf range report its first index, as
  // torch.argmax does; a thread with nothing to read stays empty (INT_MAX loses every merge).
  ArgMax best = {-INFINITY, first < end ? first * VEC : argmax_empty().index};
  for (int base = first; base < end; base += kStride) {
    V v[kLoadsInFlight];
#pragma unroll
    for (int u = 0; u < kLoadsInFlight; ++u) {
      const int i = base + u * kArgmaxThreads;
      if (i < end) v[u].load(p + static_cast<int64_t>(i) * VEC);
    }
#pragma unroll
    for (int u = 0; u < kLoadsInFlight; ++u) {
      const int i = base + u * kArgmaxThreads;
      if (i < end) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) argmax_scan(best, to_float(v[u].v[e]), i * VEC + e);
      }
    }
  }
  best = block_argmax(best, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = best;
}

// One block per batch row b. `partials` is [B, k+1, splits]; `num_drafted` may be null (= k).
// committed[b] doubles as the scratch for t_j: written by the merging warps, read back after
// __syncthreads (which also orders global memory within the block).
template <int kThreads>
__global__ void __launch_bounds__(kThreads)
accept_kernel(const int64_t* __restrict__ draft_tokens, const int64_t* __restrict__ num_drafted,
              const ArgMax* __restrict__ partials, int k, int splits, int64_t* __restrict__ accepted,
              int64_t* __restrict__ committed) {
  __shared__ int s_accepted;
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  constexpr int num_warps = kThreads / kWarpSize;
  const int64_t* drafts = draft_tokens + b * k;
  int64_t* out = committed + b * (k + 1);

  for (int j = warp; j <= k; j += num_warps) {
    const ArgMax* pj = partials + (b * (k + 1) + j) * splits;
    ArgMax best = argmax_empty();
    for (int s = lane; s < splits; s += kWarpSize) argmax_merge(best, pj[s].value, pj[s].index);
    best = warp_argmax(best);
    if (lane == 0) out[j] = best.index;
  }
  __syncthreads();

  if (warp == 0) {
    int64_t n = num_drafted == nullptr ? k : num_drafted[b];
    n = n < 0 ? 0 : (n > k ? k : n);
    // a = the first j that stops the prefix: j == n, or a draft that differs from t_j. j == n <= k
    // always stops, so the loop ends within ceil((k+1)/32) rounds.
    int a = -1;
    for (int base = 0; a < 0; base += kWarpSize) {
      const int j = base + lane;
      const bool stop = j >= n || drafts[j] != out[j];
      const unsigned mask = __ballot_sync(kFullMask, stop);
      if (mask != 0u) a = base + __ffs(static_cast<int>(mask)) - 1;
    }
    if (lane == 0) {
      accepted[b] = a;
      s_accepted = a;
    }
  }
  __syncthreads();

  const int a = s_accepted;
  for (int j = threadIdx.x; j <= k; j += kThreads) {
    if (j < a) out[j] = drafts[j];
    else if (j > a) out[j] = -1;  // j == a keeps t_a: the correction, or the bonus token when a == k
  }
}

// How the vocabulary is cut; the caller allocates rows * splits ArgMax of workspace from it.
struct Plan {
  bool vectorized;
  int splits;
  int chunk;  // accesses per block
  int64_t rows;
};

template <typename T>
Plan plan(const T* logits, int64_t rows, int vocab, int num_sms) {
  Plan p;
  p.vectorized = vocab % kVec16<T> == 0 && is_aligned(logits, 16);
  p.rows = rows;
  const int64_t nvec = vocab / (p.vectorized ? kVec16<T> : 1);
  // About two resident blocks per SM in all, but no chunk smaller than one batch of loads per thread.
  int64_t splits = ceil_div(2 * static_cast<int64_t>(num_sms), rows);
  splits = std::min<int64_t>(splits, ceil_div(nvec, kArgmaxThreads * kLoadsInFlight));
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, kMaxSplits));
  const int64_t chunk = ceil_div(nvec, splits);
  p.chunk = static_cast<int>(chunk);
  p.splits = static_cast<int>(ceil_div(nvec, chunk));  // no empty trailing chunks
  return p;
}

// Step 1 on `stream`; the caller checks the launch. logits: [rows, vocab] contiguous (rows =
// B * (k+1)); workspace: plan.rows * plan.splits entries, which must be < 2^31 (one grid dimension).
template <typename T>
void launch_argmax(const Plan& plan, const T* logits, int vocab, ArgMax* workspace, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.rows * plan.splits));
  if (plan.vectorized) {
    argmax_partial_kernel<T, kVec16<T>>
        <<<grid, kArgmaxThreads, 0, stream>>>(logits, vocab, plan.splits, plan.chunk, workspace);
  } else {
    argmax_partial_kernel<T, 1><<<grid, kArgmaxThreads, 0, stream>>>(logits, vocab, plan.splits, plan.chunk,
                                                                     workspace);
  }
}

// Step 2 on `stream`, after launch_argmax on the same stream; the caller checks the launch.
// draft_tokens [B, k], accepted [B], committed [B, k+1]; num_drafted [B] or null.
inline void launch_accept(const Plan& plan, const int64_t* draft_tokens, const int64_t* num_drafted,
                          int64_t batch, int k, const ArgMax* workspace, int64_t* accepted,
                          int64_t* committed, cudaStream_t stream) {
  accept_kernel<kAcceptThreads><<<static_cast<unsigned>(batch), kAcceptThreads, 0, stream>>>(
      draft_tokens, num_drafted, workspace, k, plan.splits, accepted, committed);
}

}  // namespace verify
}  // namespace kangaroo
