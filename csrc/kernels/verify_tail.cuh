// The end of a greedy verify (or plain) step in two launches (kangaroo_ext/ops/reference.py: verify_tail),
// torch-free:
//
//   y = rms_norm(x + residual) * norm_weight              [R, H], R = B * T rows (T = k + 1 positions)
//   target_tokens[b, t] = argmax_v T(y[b, t] . W[v])      (the full vocabulary; first index on ties)
//   then accept_commit(draft_tokens, target_tokens, ...)  (accept_commit.cuh's commit_row, per sequence)
//
// which the per-op path does in ~4 launches plus the commit's (fused_add_rms_norm, lm_head_argmax's two,
// accept_commit or about ten small torch ops), writing y and the tokens between them. Here:
//   1. norm_partial_kernel: lm_head_argmax's partial kernel, but each block first norms its RB hidden rows
//      itself (rms_norm.cuh's norm_row with the per-op launch's row width, so y is bitwise the per-op y; the
//      residual sum stays in shared memory: nothing after the final norm reads it), then stages them and runs
//      lm_head.cuh's partial_block: each logit, and each block's triple, is bitwise lm_head_argmax's.
//   2. combine_commit_kernel: one block per sequence merges its T rows' triples (one warp per row; the argmax
//      is exact in any merge order, so the token is lm_head_argmax's), writes target_tokens, then thread 0
//      runs commit_row on them from shared memory.
// No [R, V] logits and no y in memory; the workspace is R * n_blocks triples (a few KB).
//
// The norm's redundancy: every block norms the same RB rows (RB * H elements from L2, one reduction each)
// before streaming its share of W (V * H / n_blocks elements): ~3 KB against ~150 KB a block at the default
// model's H = 576, V = 49152.
#pragma once

#include <cstdint>

#include "accept_commit.cuh"
#include "common.cuh"
#include "lm_head.cuh"
#include "rms_norm.cuh"

namespace kangaroo {
namespace tail {

constexpr int kThreads = lm_head::kThreads;  // 512
constexpr int kCombineThreads = 256;
constexpr int kMaxPositions = 64;            // T = k + 1, as accept_commit's

// Dynamic shared memory of norm_partial_kernel: RB fp32 rows for the head, then three T rows for the norm
// (its output, its residual sum, the sum's cache).
__host__ __device__ inline int norm_partial_smem_bytes(int rb, int hidden, int elem_size) {
  return rb * hidden * 4 + 3 * ((hidden * elem_size + 15) / 16 * 16);
}

// grid (n_blocks, ceil(R / RB)); kThreads threads; norm_partial_smem_bytes(RB, H, sizeof(T)) bytes.
// x, residual [R, H]; norm_weight [H]; weight [V, H]; partials [R][n_blocks]. norm_threads: the per-op
// RMSNorm launch's row width for H (rms_norm::plan's block.x, <= kThreads), which fixes its reduction order.
template <typename T, int VEC, int RB>
__global__ void __launch_bounds__(kThreads, RB == 1 ? 3 : 1)
norm_partial_kernel(const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ norm_weight,
                    float eps, int norm_threads, const T* __restrict__ weight, int rows, int vocab, int hidden_size,
                    int rows_per_block, lm_head::Soft* __restrict__ partials) {
  extern __shared__ __align__(16) float hs[];
  __shared__ float warp_sums[kThreads / kWarpSize];
  pdl_launch_dependents();  // programmatic dependent launch: common.cuh
  pdl_wait();

  const int H = hidden_size, tid = threadIdx.x;
  const int row_bytes = (H * static_cast<int>(sizeof(T)) + 15) / 16 * 16;
  unsigned char* norm_smem = reinterpret_cast<unsigned char*>(hs + RB * H);
  T* y = reinterpret_cast<T*>(norm_smem);
  T* sum = reinterpret_cast<T*>(norm_smem + row_bytes);
  T* cache = reinterpret_cast<T*>(norm_smem + 2 * row_bytes);
  const int r0 = blockIdx.y * RB;
  const int nr = min(RB, rows - r0);
  for (int r = 0; r < RB; ++r) {  // uniform trip count: the norm's barriers are block-wide
    if (r < nr) {
      const int64_t at = static_cast<int64_t>(r0 + r) * H;
      rms_norm::norm_row<T, VEC, true>(y, sum, x + at, residual + at, norm_weight, 0, H, eps, tid < norm_threads, tid,
                                       norm_threads, 0, cache, warp_sums, WholeBlock{});
      __syncthreads();  // y complete
    }
    lm_head::stage_hidden<T, VEC, 1>(y, 0, r < nr ? 1 : 0, H, hs + r * H, tid, kThreads);  // zeros past nr
    __syncthreads();  // y and warp_sums free for the next row
  }
  lm_head::partial_block<T, VEC, RB>(hs, weight, vocab, H, rows_per_block, r0, nr, partials);
}

// grid (B); kCombineThreads threads. Sequence b's rows b * T .. b * T + T - 1: warp w merges rows w, w + 8, ...
// over their n_blocks triples; target_tokens [B, T]; then commit_row(b) with k = T - 1 (accept_commit.cuh).
// Internal linkage: a non-template kernel in a header that more than one launcher may include.
static __global__ void __launch_bounds__(kCombineThreads)
combine_commit_kernel(const lm_head::Soft* __restrict__ partials, int n_blocks, int positions,
                      const int64_t* __restrict__ draft_tokens, const int64_t* __restrict__ num_drafted,
                      int64_t* __restrict__ target_tokens, int64_t* cache_len, int64_t* tokens_in,
                      int64_t tokens_in_stride, int64_t* history, int64_t history_len, int64_t* report,
                      int64_t report_width) {
  __shared__ int64_t targets[kMaxPositions];
  pdl_launch_dependents();
  pdl_wait();
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  for (int t = warp; t < positions; t += kCombineThreads / kWarpSize) {
    const lm_head::Soft* row = partials + (b * positions + t) * n_blocks;
    lm_head::Soft st = lm_head::soft_empty();
    for (int i = lane; i < n_blocks; i += kWarpSize) lm_head::soft_merge(st, row[i]);
#pragma unroll
    for (int o = kWarpSize / 2; o > 0; o /= 2) lm_head::soft_merge(st, lm_head::shfl_xor_soft(st, o));
    if (lane == 0) {
      targets[t] = st.idx;
      target_tokens[b * positions + t] = st.idx;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const int k = positions - 1;
    commit::commit_row(b, draft_tokens + b * k, targets, num_drafted[b], k, cache_len, tokens_in, tokens_in_stride,
                       history, history_len, report, report_width);
  }
}

// ---- host side ----------------------------------------------------------------------------------

struct Plan {
  int vec;              // elements per access (norm and head): 16 bytes, or 1
  int rb;               // hidden rows per block: 1, 2, 4, 8 (0: H does not fit shared memory)
  int n_rgroups;        // ceil(R / rb): grid y
  int n_blocks;         // grid x
  int rows_per_block;
  int smem_bytes;
  int norm_threads;     // the per-op RMSNorm launch's row width
};

template <typename T>
using KernelFn = void (*)(const T*, const T*, const T*, float, int, const T*, int, int, int, int, lm_head::Soft*);

template <typename T>
struct NormPartial {
  KernelFn<T> fn;
  cudaError_t (*ensure_smem)(int bytes);
};

template <typename T, int VEC, int RB>
NormPartial<T> norm_partial_instance() {
  return {norm_partial_kernel<T, VEC, RB>, ensure_dynamic_smem<norm_partial_kernel<T, VEC, RB>>};
}

template <typename T>
NormPartial<T> norm_partial_for(int vec, int rb) {
  constexpr int V16 = kVec16<T>;
  const bool v16 = vec == V16;
  switch (rb) {
    case 1: return v16 ? norm_partial_instance<T, V16, 1>() : norm_partial_instance<T, 1, 1>();
    case 2: return v16 ? norm_partial_instance<T, V16, 2>() : norm_partial_instance<T, 1, 2>();
    case 4: return v16 ? norm_partial_instance<T, V16, 4>() : norm_partial_instance<T, 1, 4>();
    default: return v16 ? norm_partial_instance<T, V16, 8>() : norm_partial_instance<T, 1, 8>();
  }
}

// As lm_head::plan, with the norm's rows in shared memory. The access width is 16 bytes when every row and
// weight allows it (then both the per-op norm and head use it too), else 1. Host-side queries only.
template <typename T>
Plan plan(const T* x, const T* residual, const T* norm_weight, const T* weight, int64_t rows, int vocab,
          int hidden_size, int max_smem, int num_sms) {
  Plan p{};
  constexpr int V16 = kVec16<T>;
  const bool vec16 = hidden_size % V16 == 0 && is_aligned(x, 16) && is_aligned(residual, 16) &&
                     is_aligned(norm_weight, 16) && is_aligned(weight, 16);
  p.vec = vec16 ? V16 : 1;
  p.norm_threads = static_cast<int>(rms_norm::plan(1, hidden_size, sizeof(T), vec16).block.x);
  int rb = 1;
  while (rb < lm_head::kMaxRowsPerGroup && rb < rows) rb *= 2;
  const int64_t budget = max_smem - 4096;  // the kernel's static shared memory comes off the top
  const auto bytes = [&](int r) { return static_cast<int64_t>(norm_partial_smem_bytes(r, hidden_size, sizeof(T))); };
  while (rb > 1 && bytes(rb) > budget) rb /= 2;
  if (bytes(1) > budget) rb = 0;
  p.rb = rb;
  p.n_rgroups = rb > 0 ? static_cast<int>(ceil_div(rows, rb)) : 0;
  p.smem_bytes = rb > 0 ? static_cast<int>(bytes(rb)) : 0;
  int resident = 1;
  if (rb > 0) {
    const NormPartial<T> k = norm_partial_for<T>(p.vec, rb);
    if (k.ensure_smem(p.smem_bytes) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, k.fn, kThreads, p.smem_bytes) != cudaSuccess) {
      resident = 1;  // the launch reports the real error
    }
  }
  lm_head::Plan hp{};
  lm_head::plan_blocks(hp, vocab, num_sms, resident);
  p.n_blocks = hp.n_blocks;
  p.rows_per_block = hp.rows_per_block;
  return p;
}

struct Commit {  // accept_commit's buffers (accept_commit.cuh)
  const int64_t* draft_tokens;
  const int64_t* num_drafted;
  int64_t* target_tokens;
  int64_t *cache_len, *tokens_in, *history, *report;
  int64_t tokens_in_stride, history_len, report_width;
};

// Both launches on `stream`; returns the launch status. partials: rows * p.n_blocks triples; rows = batch *
// positions, positions <= kMaxPositions; the norm's x, residual [rows, H].
template <typename T>
cudaError_t launch(const Plan& p, const T* x, const T* residual, const T* norm_weight, float eps, const T* weight,
                   int64_t batch, int positions, int vocab, int hidden_size, lm_head::Soft* partials,
                   const Commit& c, Launch stream) {
  if (p.rb < 1 || positions < 1 || positions > kMaxPositions) return cudaErrorInvalidValue;
  const NormPartial<T> k = norm_partial_for<T>(p.vec, p.rb);
  cudaError_t err = k.ensure_smem(p.smem_bytes);
  if (err != cudaSuccess) return err;
  const int64_t rows = batch * positions;
  err = launch_pdl(k.fn, dim3(static_cast<unsigned>(p.n_blocks), static_cast<unsigned>(p.n_rgroups)), dim3(kThreads),
                   static_cast<size_t>(p.smem_bytes), stream, x, residual, norm_weight, eps, p.norm_threads, weight,
                   static_cast<int>(rows), vocab, hidden_size, p.rows_per_block, partials);
  if (err != cudaSuccess) return err;
  return launch_pdl(combine_commit_kernel, dim3(static_cast<unsigned>(batch)), dim3(kCombineThreads), 0, stream,
                    static_cast<const lm_head::Soft*>(partials), p.n_blocks, positions, c.draft_tokens,
                    c.num_drafted, c.target_tokens, c.cache_len, c.tokens_in, c.tokens_in_stride, c.history,
                    c.history_len, c.report, c.report_width);
}

}  // namespace tail
}  // namespace kangaroo
