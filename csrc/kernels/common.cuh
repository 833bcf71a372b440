// Device helpers shared by the kangaroo kernels. Torch-free on purpose: the kernel headers take raw
// pointers so they can be unit-tested or reused without ATen, and the launchers own all torch logic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <utility>

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

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> vec_zero() {
  Vec<T, N> z;
#pragma unroll
  for (int e = 0; e < N; ++e) z.v[e] = from_float<T>(0.f);
  return z;
}

// N elements of T (global or shared) as floats.
template <typename T, int N>
__device__ __forceinline__ void load_as_float(const T* p, float (&out)[N]) {
  Vec<T, N> x;
  x.load(p);
#pragma unroll
  for (int e = 0; e < N; ++e) out[e] = to_float(x.v[e]);
}

// N floats with the widest accesses the alignment of N floats allows (16 bytes at most: a Vec<float, 8>
// would claim 32-byte alignment, which the callers only guarantee for 16).
template <int N>
__device__ __forceinline__ void load_floats(const float* p, float (&out)[N]) {
  constexpr int kPiece = N % 4 == 0 ? 4 : (N % 2 == 0 ? 2 : 1);
#pragma unroll
  for (int i = 0; i < N; i += kPiece) {
    Vec<float, kPiece> x;
    x.load(p + i);
#pragma unroll
    for (int e = 0; e < kPiece; ++e) out[i + e] = x.v[e];
  }
}

template <int N>
__device__ __forceinline__ void store_floats(float* p, const float (&in)[N]) {
  constexpr int kPiece = N % 4 == 0 ? 4 : (N % 2 == 0 ? 2 : 1);
#pragma unroll
  for (int i = 0; i < N; i += kPiece) {
    Vec<float, kPiece> x;
#pragma unroll
    for (int e = 0; e < kPiece; ++e) x.v[e] = in[i + e];
    x.store(p + i);
  }
}

// ---- asynchronous global -> shared copies (sm_80+) -----------------------------------------------
// copy_async<T, N> moves N elements; 4, 8 and 16 bytes go through cp.async (16 bypasses L1), smaller
// copies are plain loads/stores (synchronous). Either way the data is visible to the block after
// cp_async_wait<...>() covering its group, then __syncthreads().

template <typename T, int N>
__device__ __forceinline__ void copy_async(T* smem_dst, const T* gmem_src) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * N;
  if constexpr (kBytes == 16) {
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
  } else if constexpr (kBytes == 8 || kBytes == 4) {
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(dst), "l"(gmem_src), "n"(kBytes) : "memory");
  } else {
    Vec<T, N> x;
    x.load(gmem_src);
    x.store(smem_dst);
  }
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most `kPending` of this thread's most recent groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Raises Kernel's dynamic shared-memory limit to at least `bytes` on the current device, calling the
// driver only when a larger limit than any set before is needed (per kernel and device; a race just
// repeats the call). cudaFuncSetAttribute is host-side state, not stream work: fine during capture.
// No shortcut below 48 KiB: that default limit counts the kernel's static shared memory too, so 48 KiB
// of dynamic memory plus a static array failed to launch ("invalid argument") without the attribute.
template <auto Kernel>
cudaError_t ensure_dynamic_smem(int bytes) {
  if (bytes <= 0) return cudaSuccess;
  constexpr int kMaxDevices = 64;
  static std::atomic<int> granted[kMaxDevices];  // zero-initialized (static storage)
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < kMaxDevices && granted[device].load(std::memory_order_relaxed) >= bytes) return cudaSuccess;
  err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && device < kMaxDevices) {
    int prev = granted[device].load(std::memory_order_relaxed);
    while (prev < bytes && !granted[device].compare_exchange_weak(prev, bytes, std::memory_order_relaxed)) {
    }
  }
  return err;
}

// ---- programmatic dependent launch (sm_90+) -------------------------------------------------------
// A kernel launched with launch_pdl may start while the previous kernel in the stream still runs,
// once every block of that kernel has called pdl_launch_dependents (or exited). Before touching any
// memory an earlier kernel writes or reads, it must call pdl_wait, which returns when the previous
// grid has completed and its writes are visible (and that grid waited on its own predecessor, so the
// whole stream before it is done). What a kernel does before pdl_wait is only what depends on nothing
// earlier: launch latency, block scheduling, and for the GEMVs the first weight loads. Without a PDL
// predecessor both calls are no-ops in effect. Graph capture keeps the programmatic edges.

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Where and how a kernel launches: its stream, and whether it may start while the previous kernel in the
// stream still runs (programmatic dependent launch, PDL). The launcher decides (it turns PDL off for
// profiling: with PDL a kernel's recorded duration includes the time it waits for its predecessor);
// headers only pass it on.
struct Launch {
  cudaStream_t stream;
  bool pdl;
};

// kernel<<<grid, block, smem, launch.stream>>>(args...), with programmatic stream serialization allowed
// when launch.pdl, in thread-block clusters of `cluster` blocks when that is more than one (sm_90+, grid
// divisible by it).
template <typename... KernelArgs, typename... Args>
cudaError_t launch_pdl_cluster(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, Launch launch,
                               dim3 cluster, Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = launch.stream;
  cudaLaunchAttribute attr[2];
  unsigned n = 0;
  if (launch.pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  if (cluster.x * cluster.y * cluster.z > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = cluster.x;
    attr[n].val.clusterDim.y = cluster.y;
    attr[n].val.clusterDim.z = cluster.z;
    ++n;
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

template <typename... KernelArgs, typename... Args>
cudaError_t launch_pdl(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, Launch launch,
                       Args&&... args) {
  return launch_pdl_cluster(kernel, grid, block, smem, launch, dim3(1, 1, 1), std::forward<Args>(args)...);
}

// ---- the threads a block body runs on ------------------------------------------------------------
// Kernel bodies written as device functions (decode_linear_mma.cuh's gemv_mma_tile, ...) take their
// barrier as a policy, so one body serves its own launch (a whole block: __syncthreads) and the
// persistent draft kernel (persistent_draft.cuh), where a 256-thread block runs two 128-thread bodies side by
// side, each on a named barrier of its own (ids 1 and 2; id 0 is __syncthreads').
struct WholeBlock {
  __device__ __forceinline__ void operator()() const { __syncthreads(); }
};

// A named barrier over kThreadsInGroup threads (a multiple of 32). It is PTX's non-aligned `barrier.sync`,
// which counts arriving threads one by one, not `bar.sync` (= barrier.sync.aligned), which counts a whole warp
// when its first lanes arrive: a warp reaching an aligned barrier in two pieces is counted twice, and a later
// barrier of the group then never fills. That is how the persistent kernel's split-barrier path hung (H100,
// 3a32fec-80eb2b7): compute-sanitizer's synccheck saw lanes 0-7 of a tile's warp 0 (the ones that store the
// tile's outputs) arrive at this barrier apart from lanes 8-31, and cuda-gdb found warp 3 of block 0 split
// the same way one barrier later, with the block's other warps waiting at __syncthreads. A __syncwarp before
// an aligned barrier did not help: the compiler dropped it there as redundant with its own reconvergence.
template <int kThreadsInGroup>
struct NamedBarrier {
  static_assert(kThreadsInGroup % 32 == 0, "a named barrier counts whole warps' threads");
  int id;  // 1..15
  __device__ __forceinline__ void operator()() const {
    asm volatile("barrier.sync %0, %1;" ::"r"(id), "n"(kThreadsInGroup) : "memory");
  }
};

// ---- thread-block clusters (sm_90+; the host never launches a cluster on older devices) --------------

// Every thread of every block of the cluster arrives, then waits; release/acquire order each block's
// shared-memory writes before the barrier with its peers' reads after it. Block-uniform call sites.
__device__ __forceinline__ void cluster_barrier() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}

// The address of `local` (this block's shared memory) in the block of cluster rank `rank`: the same
// variable in the peer's shared memory, readable with ordinary loads (distributed shared memory).
template <typename T>
__device__ __forceinline__ const T* cluster_peer(const T* local, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint64_t peer;
  asm volatile("mapa.u64 %0, %1, %2;\n" : "=l"(peer) : "l"(reinterpret_cast<uint64_t>(local)), "r"(rank));
  return reinterpret_cast<const T*>(peer);
#else
  __trap();
  return local;
#endif
}

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

// Sums each of N values (N a power of two <= 32) over the warp, scattered: afterwards v[0] of lane l
// holds the total of value l / (32 / N). log2(32) + N - 1 shuffles instead of 5 N. Each total is the
// same tree of additions over the lanes as warp_sum's butterfly (only the order inside a pair differs,
// and a + b == b + a exactly), so results are bitwise those of warp_sum.
template <int N>
__device__ __forceinline__ float warp_reduce_scatter(float (&v)[N], int lane) {
  static_assert(N >= 1 && N <= kWarpSize && (N & (N - 1)) == 0, "N: a power of two <= 32");
#pragma unroll
  for (int step = 0; step < 5; ++step) {
    const int o = 16 >> step;
    const int cnt = N >> step;  // values still held (compile-time once unrolled)
    if (cnt > 1) {
      const int h = cnt / 2;
      const bool upper = (lane & o) != 0;  // keeps the upper half, its partner the lower half
#pragma unroll
      for (int i = 0; i < N / 2; ++i) {
        if (i < h) {
          const float send = upper ? v[i] : v[i + h];
          const float keep = upper ? v[i + h] : v[i];
          v[i] = keep + __shfl_xor_sync(kFullMask, send, o);
        }
      }
    } else {
      v[0] += __shfl_xor_sync(kFullMask, v[0], o);
    }
  }
  return v[0];
}

// fmaxf semantics: a NaN loses to any number (callers that must propagate NaN do so separately).
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
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
