// Device helpers shared by the kangaroo kernels. Torch-free on purpose: the kernel headers take raw
// pointers so they can be unit-tested or reused without ATen, and the launchers own all torch logic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace kangaroo {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- dtype conversion --------------------------------------------------------------------------
// Explicit intrinsics rather than operator overloads: torch builds with __CUDA_NO_HALF_CONVERSIONS__
// and friends, and the _rn variants round to nearest-even exactly like Tensor.to(dtype).

template <typename T>
struct Convert;

template <>
struct Convert<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};

template <>
struct Convert<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return Convert<T>::to_float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return Convert<T>::from_float(v);
}

// Rounds a float to T and back: the value a tensor of dtype T would hold.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// ---- vector access -----------------------------------------------------------------------------
// N elements moved as one access; with sizeof(T) * N == 16 this compiles to a single 128-bit
// LDG/STG, which is what lets a memory-bound kernel reach full DRAM bandwidth.

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];

  __device__ __forceinline__ void load(const T* p) { *this = *reinterpret_cast<const Vec*>(p); }
  __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<Vec*>(p) = *this; }
};

template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));  // elements in 16 bytes

inline bool is_aligned(const void* p, unsigned bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

__host__ __device__ constexpr inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- reductions --------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// An (value, index) candidate for argmax with torch.argmax's total order: NaN beats every number
// (so the first NaN wins), then larger values, then the smaller index on ties. Being a strict total
// order makes the merge associative and commutative, so the result does not depend on how the
// work was split across threads and blocks.
struct ArgMax {
  float value;
  int index;  // INT_MAX = empty
};

__device__ __forceinline__ bool argmax_better(float a, int ia, float b, int ib) {
  const bool a_nan = a != a, b_nan = b != b;
  if (a_nan || b_nan) return a_nan && (!b_nan || ia < ib);
  return a > b || (a == b && ia < ib);
}

__device__ __forceinline__ void argmax_merge(ArgMax& acc, float v, int i) {
  if (argmax_better(v, i, acc.value, acc.index)) {
    acc.value = v;
    acc.index = i;
  }
}

__device__ __forceinline__ ArgMax argmax_empty() { return ArgMax{-INFINITY, 0x7fffffff}; }

__device__ __forceinline__ ArgMax warp_argmax(ArgMax a) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float v = __shfl_xor_sync(kFullMask, a.value, offset);
    const int i = __shfl_xor_sync(kFullMask, a.index, offset);
    argmax_merge(a, v, i);
  }
  return a;
}

// Block-wide argmax; every thread gets the result. `scratch` needs blockDim.x / 32 entries.
// blockDim.x must be a multiple of 32 (all callers launch whole warps).
__device__ __forceinline__ ArgMax block_argmax(ArgMax a, ArgMax* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  a = warp_argmax(a);
  if (lane == 0) scratch[warp] = a;
  __syncthreads();
  a = lane < num_warps ? scratch[lane] : argmax_empty();
  a = warp_argmax(a);
  __syncthreads();  // scratch may be reused by the caller right after
  return a;
}

}  // namespace kangaroo
