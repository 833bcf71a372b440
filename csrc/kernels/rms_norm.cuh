// Fused residual-add + RMSNorm (kangaroo_ext/ops/reference.py: fused_add_rms_norm), torch-free.
//
//   s   = T(float(x) + float(residual))          (s = x when there is no residual)
//   out = T(float(w) * float(T(float(s) / sqrt(mean(float(s)^2) + eps))))
//
// Memory-bound: every element is read once from DRAM (x, residual) and written once (s, out).
// The second pass needs s again after the row's mean square is known; it is kept in shared memory
// when the block's rows fit in 48 KB (H <= 12288 in fp32, 24576 in 16-bit), otherwise re-read from
// residual_out, which the same thread has just written (so no synchronisation is needed either way).
#pragma once

#include "common.cuh"

namespace kangaroo {
namespace rms_norm {

constexpr int kMaxThreadsPerRow = 512;   // beyond this a row is looped over; up to 4 blocks/SM resident
constexpr int kTargetBlockThreads = 256;  // small rows are packed until a block has about this many
constexpr int kMaxBlockThreads = kMaxThreadsPerRow > kTargetBlockThreads ? kMaxThreadsPerRow : kTargetBlockThreads;
constexpr size_t kMaxCacheBytes = 48 * 1024;  // the dynamic smem a launch gets without opting in

// Accesses a thread issues before using any of them. Scalar accesses move only 2-4 bytes, so the
// scalar path batches 8 (and gives each thread that many, see plan()) to keep enough bytes in
// flight to cover DRAM latency. 16-byte accesses need no batching: at one per thread and 3-4
// resident 512-thread blocks per SM they already reach ~85% of DRAM bandwidth, and batching them
// would double the registers and halve the resident blocks.
template <int VEC>
constexpr int kBatch = VEC == 1 ? 8 : 1;

// One row: threads tx = 0 .. stride - 1 of the row (stride a multiple of 32, the row's warps first_warp ..
// first_warp + stride / 32 - 1 of the block). warp_sums: the block's per-warp sums in shared memory; `sync`:
// the barrier of every thread that shares warp_sums, reached by all of them (also rows past the end:
// active = false). cache: the row in shared memory (CACHE_IN_SMEM). The persistent draft kernel
// (persistent_draft.cuh) runs this for its draft head's norm, so its rounding is this kernel's by construction.
template <typename T, int VEC, bool CACHE_IN_SMEM, class Sync>
__device__ __forceinline__ void norm_row(T* __restrict__ out, T* __restrict__ residual_out, const T* __restrict__ x,
                                         const T* __restrict__ residual, const T* __restrict__ weight, int64_t offset,
                                         int hidden, float eps, bool active, int tx, int stride, int first_warp,
                                         T* cache, float* warp_sums, Sync sync) {
  using V = Vec<T, VEC>;
  constexpr int U = kBatch<VEC>;
  const int nvec = hidden / VEC;
  float sum_sq = 0.f;
  if (active) {
    for (int base = tx; base < nvec; base += U * stride) {
      V s[U], r[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = base + u * stride;
        if (i < nvec) {
          s[u].load(x + offset + static_cast<int64_t>(i) * VEC);
          if (residual != nullptr) r[u].load(residual + offset + static_cast<int64_t>(i) * VEC);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = base + u * stride;
        if (i >= nvec) continue;
        if (residual != nullptr) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) s[u].v[e] = from_float<T>(to_float(s[u].v[e]) + to_float(r[u].v[e]));
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float h = to_float(s[u].v[e]);  // the rounded s, as the reference squares s.float()
          sum_sq += h * h;
        }
        s[u].store(residual_out + offset + static_cast<int64_t>(i) * VEC);
        if (CACHE_IN_SMEM) s[u].store(cache + i * VEC);
      }
    }
  }
  // Row reduction: warp shuffles, then the row's warps combine through shared memory.
  const int lane = tx % kWarpSize;
  const int warps_per_row = stride / kWarpSize;
  sum_sq = warp_sum(sum_sq);
  if (lane == 0) warp_sums[first_warp + tx / kWarpSize] = sum_sq;
  sync();
  sum_sq = warp_sum(lane < warps_per_row ? warp_sums[first_warp + lane] : 0.f);
  // Correctly rounded division and square root (no fast-math): rsqrtf's 2-ulp error would be
  // visible in every fp32 output of the row, and this runs once per row.
  const float inv_rms = 1.0f / sqrtf(sum_sq / static_cast<float>(hidden) + eps);
  if (!active) return;
  for (int base = tx; base < nvec; base += U * stride) {
    V s[U], w[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = base + u * stride;
      if (i < nvec) {
        // Each thread reads back exactly the elements it wrote in the first pass: no barrier needed.
        if (CACHE_IN_SMEM) {
          s[u].load(cache + i * VEC);
        } else {
          s[u].load(residual_out + offset + static_cast<int64_t>(i) * VEC);
        }
        w[u].load(weight + static_cast<int64_t>(i) * VEC);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = base + u * stride;
      if (i >= nvec) continue;
      V o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float normed = round_to<T>(to_float(s[u].v[e]) * inv_rms);  // HF rounds before the weight
        o.v[e] = from_float<T>(to_float(w[u].v[e]) * normed);
      }
      o.store(out + offset + static_cast<int64_t>(i) * VEC);
    }
  }
}

// Block = blockDim.y rows of blockDim.x threads each (blockDim.x a multiple of 32, so a warp
// never straddles two rows). VEC elements per access: 16 bytes / sizeof(T), or 1 on the scalar
// path for hidden sizes or pointers that are not 16-byte aligned.
template <typename T, int VEC, bool CACHE_IN_SMEM>
__global__ void __launch_bounds__(kMaxBlockThreads)
fused_add_rms_norm_kernel(T* __restrict__ out, T* __restrict__ residual_out, const T* __restrict__ x,
                          const T* __restrict__ residual, const T* __restrict__ weight, int64_t rows,
                          int hidden, float eps) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float warp_sums[kMaxBlockThreads / kWarpSize];
  pdl_launch_dependents();  // programmatic dependent launch: common.cuh
  pdl_wait();

  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  // Rows past the end still take part in __syncthreads below, they just do no memory traffic.
  T* cache = reinterpret_cast<T*>(smem_raw) + static_cast<int64_t>(threadIdx.y) * hidden;
  norm_row<T, VEC, CACHE_IN_SMEM>(out, residual_out, x, residual, weight, row * hidden, hidden, eps, row < rows,
                                  threadIdx.x, blockDim.x, threadIdx.y * (blockDim.x / kWarpSize), cache, warp_sums,
                                  WholeBlock{});
}

struct LaunchConfig {
  bool vectorized;
  bool cache_in_smem;
  dim3 grid, block;
  size_t smem_bytes;
};

inline LaunchConfig plan(int64_t rows, int hidden, size_t elem_size, bool vectorized) {
  LaunchConfig c;
  c.vectorized = vectorized;
  const int vec = vectorized ? static_cast<int>(16 / elem_size) : 1;
  const int64_t nvec = hidden / vec;
  // One 16-byte access per thread when the row allows, but a whole batch per thread on the scalar
  // path: fewer, fuller threads per row.
  const int64_t per_thread = vectorized ? 1 : kBatch<1>;
  const int64_t tx =
      std::min<int64_t>(kMaxThreadsPerRow, ceil_div(ceil_div(nvec, per_thread), kWarpSize) * kWarpSize);
  const int64_t ty = std::max<int64_t>(1, std::min<int64_t>(kTargetBlockThreads / tx, rows));
  c.block = dim3(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
  c.grid = dim3(static_cast<unsigned>(ceil_div(rows, ty)));
  const size_t cache_bytes = static_cast<size_t>(ty) * hidden * elem_size;
  c.cache_in_smem = cache_bytes <= kMaxCacheBytes;
  c.smem_bytes = c.cache_in_smem ? cache_bytes : 0;
  return c;
}

template <typename T>
bool can_vectorize(const T* out, const T* residual_out, const T* x, const T* residual, const T* weight,
                   int hidden) {
  return hidden % kVec16<T> == 0 && is_aligned(out, 16) && is_aligned(residual_out, 16) &&
         is_aligned(x, 16) && (residual == nullptr || is_aligned(residual, 16)) && is_aligned(weight, 16);
}

template <typename T, int VEC>
cudaError_t launch_with_vec(const LaunchConfig& c, T* out, T* residual_out, const T* x, const T* residual,
                            const T* weight, int64_t rows, int hidden, float eps, Launch stream) {
  if (c.cache_in_smem) {
    return launch_pdl(fused_add_rms_norm_kernel<T, VEC, true>, c.grid, c.block, c.smem_bytes, stream, out,
                      residual_out, x, residual, weight, rows, hidden, eps);
  }
  return launch_pdl(fused_add_rms_norm_kernel<T, VEC, false>, c.grid, c.block, 0, stream, out, residual_out, x,
                    residual, weight, rows, hidden, eps);
}

// Launches on `stream` and returns the launch status. `residual` may be null. Outputs must not
// alias the inputs. 1 <= rows < 2^31 (one grid dimension), hidden >= 1.
template <typename T>
cudaError_t launch(T* out, T* residual_out, const T* x, const T* residual, const T* weight, int64_t rows,
                   int hidden, float eps, Launch stream) {
  const bool vectorized = can_vectorize(out, residual_out, x, residual, weight, hidden);
  const LaunchConfig c = plan(rows, hidden, sizeof(T), vectorized);
  if (vectorized) {
    return launch_with_vec<T, kVec16<T>>(c, out, residual_out, x, residual, weight, rows, hidden, eps, stream);
  }
  return launch_with_vec<T, 1>(c, out, residual_out, x, residual, weight, rows, hidden, eps, stream);
}

}  // namespace rms_norm
}  // namespace kangaroo
