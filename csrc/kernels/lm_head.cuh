// Fused LM head + argmax + confidence (kangaroo_ext/ops/reference.py: lm_head_argmax), torch-free.
// The logits are never written to memory.
//
//   logit[r, v] = T(sum_h float(hidden[r, h]) * float(W[v, h]))   (fp32 accumulation, rounded to the
//                                                                   model dtype as F.linear; fp32: none)
//   token[r] = argmax_v logit[r, v]   (first index on ties; the first NaN wins, as torch.argmax)
//   conf[r]  = 1 / sum_v exp(logit[r, v] - max_v logit[r, v])   (fp32; NaN where the reference's is)
//
// Two launches, no persistent state:
//   1. partial_kernel: grid (n_blocks, ceil(R / RB)). Each block stages its RB hidden rows in shared
//      memory as fp32, streams a contiguous range of W rows with 16-byte loads (each W row read once
//      for all RB hidden rows) and keeps, per hidden row, the online-softmax triple (max, argmax,
//      sum of exp relative to that max); one triple per (row, block) goes to a workspace.
//      n_blocks = min(ceil(V / 128), the blocks resident at once): one 128-row pass per block when V
//      allows (V = 49152: 384 blocks of 512 threads, 3 per SM, one wave on an H100/H200).
//   2. combine_kernel: one block per hidden row merges the n_blocks triples.
// Bytes: launch 1 reads V*H*sz of weights per row group (one group for R <= 8) plus the hidden rows
// (R*H*sz per block, L2-resident) and writes 12 * R * n_blocks bytes; launch 2 reads those and writes
// 12 * R bytes. So the op moves ~V*H*sz: compare its time with a V*H*sz device-to-device copy.
//
// Why not one launch with a last-block-done counter: the counter must be zero when the kernel
// starts. A per-device buffer that the last block resets works for one stream, but two streams (or
// a CUDA graph replayed while the same op runs eagerly elsewhere) would share it and corrupt each
// other's counts, and a per-call buffer needs a memset, i.e. a second operation anyway. The second
// launch costs ~1-2 us of latency in a graph against ~20 us for the 56 MB weight stream at V=49152,
// H=576; in return every buffer comes from PyTorch's caching allocator on the current stream, so the
// op is stream-ordered, graph-capturable (allocations come from the graph's pool) and deterministic.
//
// Thread layout (partial_kernel): 512 threads = 64 groups of 8 lanes; a group works on 2 W rows at a
// time, its 8 lanes striding over the row in 16-byte vectors (4 loads in flight per lane). The 8
// lanes' partial dot products for the RB hidden rows are summed by a reduce-scatter (7 shuffles
// for RB = 8), after which lane l holds the dot product of hidden row l * RB / 8, and one lane per
// row updates that row's online triple: one exp per logit.
#pragma once

#include <climits>

#include "common.cuh"

namespace kangaroo {
namespace lm_head {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kLanesPerRow = 8;
constexpr int kGroups = kThreads / kLanesPerRow;
constexpr int kRowsPerGroup = 2;                       // W rows a group handles at once
constexpr int kRowsPerPass = kGroups * kRowsPerGroup;  // W rows a block handles at once
constexpr int kMaxRowsPerGroup = 8;                     // RB: hidden rows per block

// Online-softmax triple: s = sum over the seen logits x of exp(x - m); (m, idx) ordered like
// torch.argmax (argmax_better). Empty: m = -inf, idx = INT_MAX, s = 0.
struct Soft {
  float m;
  int idx;
  float s;
};

__device__ __forceinline__ Soft soft_empty() { return Soft{-INFINITY, INT_MAX, 0.f}; }

// Merges b into a. The winner's sum absorbs the loser's rescaled sum; a loser whose max is -inf
// contributes nothing (its terms are exp(-inf - finite) = 0; when the winner is -inf too the winner's
// own sum is already NaN, as the reference's exp(-inf - (-inf)) is). NaN and +inf maxima make the sum
// NaN through exp(NaN) / exp(inf - inf), as in the reference.
__device__ __forceinline__ void soft_merge(Soft& a, Soft b) {
  if (argmax_better(b.m, b.idx, a.m, a.idx)) {
    const Soft t = a;
    a = b;
    b = t;
  }
  const float term = b.m == -INFINITY ? 0.f : b.s * expf(b.m - a.m);
  a.s += term;
}

// One logit: the triple {x, v, exp(x - x)}, i.e. 1, or NaN for x = +-inf / NaN (as the reference's
// term exp(x - max) is when x is the max). x - x + 1 avoids an exp; no fast-math, so it is not folded.
__device__ __forceinline__ void soft_add(Soft& a, float x, int v) { soft_merge(a, Soft{x, v, (x - x) + 1.f}); }

__device__ __forceinline__ Soft shfl_xor_soft(const Soft& a, int offset) {
  return Soft{__shfl_xor_sync(kFullMask, a.m, offset), __shfl_xor_sync(kFullMask, a.idx, offset),
              __shfl_xor_sync(kFullMask, a.s, offset)};
}

// Sum of v[0..RB) over the 8 lanes of a group, scattered: afterwards v[0] of lane l holds the total
// for index l * RB / 8 (every lane of the group gets a result; for RB < 8 lanes share an index).
template <int RB>
__device__ __forceinline__ float reduce_scatter8(float (&v)[RB], int l8) {
#pragma unroll
  for (int step = 0; step < 3; ++step) {
    const int o = 4 >> step;     // lane bit exchanged in this step
    const int cnt = RB >> step;  // values still held (compile-time once unrolled)
    if (cnt > 1) {
      // Halve: the lane with bit o set keeps the upper half, its partner the lower half.
      const int h = cnt / 2;
      const bool upper = (l8 & o) != 0;
#pragma unroll
      for (int i = 0; i < RB / 2; ++i) {
        if (i < h) {
          const float send = upper ? v[i] : v[i + h];
          const float keep = upper ? v[i + h] : v[i];
          v[i] = keep + __shfl_xor_sync(kFullMask, send, o);
        }
      }
    } else {
      v[0] += __shfl_xor_sync(kFullMask, v[0], o);  // one value left: plain butterfly
    }
  }
  return v[0];
}

// Hidden rows in shared memory as fp32, [RB][H], with the floats of one 16-byte W vector's partners
// laid out so that the 8 lanes of a group read consecutive 16-byte words: element e of vector k sits
// at plane (e / CH), offset k * CH + e % CH, planes H / P floats apart (CH = min(VEC, 4), P = VEC / CH).
template <int VEC>
struct HiddenLayout {
  static constexpr int kChunk = VEC > 4 ? 4 : VEC;
  static constexpr int kPlanes = VEC / kChunk;
};

// dot{0,1}[r] += W rows' vector k (x0, x1) . hidden row r's elements of vector k (from shared memory).
template <typename T, int VEC, int RB>
__device__ __forceinline__ void accumulate(const Vec<T, VEC>& x0, const Vec<T, VEC>& x1, const float* hs, int H,
                                           int plane, int k, float (&dot0)[RB], float (&dot1)[RB]) {
  using HL = HiddenLayout<VEC>;
  constexpr int CH = HL::kChunk, P = HL::kPlanes;
  float f0[VEC], f1[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    f0[e] = to_float(x0.v[e]);
    f1[e] = to_float(x1.v[e]);
  }
#pragma unroll
  for (int r = 0; r < RB; ++r) {
    float hv[VEC];
#pragma unroll
    for (int pl = 0; pl < P; ++pl) {
      float piece[CH];
      load_floats<CH>(hs + r * H + pl * plane + k * CH, piece);
#pragma unroll
      for (int e = 0; e < CH; ++e) hv[pl * CH + e] = piece[e];
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      dot0[r] = fmaf(f0[e], hv[e], dot0[r]);
      dot1[r] = fmaf(f1[e], hv[e], dot1[r]);
    }
  }
}

// Hidden rows r0 .. r0 + nr - 1 (RB slots, the rest zeros) into shared memory as fp32 in HiddenLayout
// order; threads tid of nthreads share the work. The caller's barrier publishes hs.
template <typename T, int VEC, int RB>
__device__ __forceinline__ void stage_hidden(const T* __restrict__ hidden, int r0, int nr, int H, float* hs, int tid,
                                             int nthreads) {
  using HL = HiddenLayout<VEC>;
  constexpr int CH = HL::kChunk, P = HL::kPlanes;
  const int nvec = H / VEC;
  const int plane = H / P;
  for (int i = tid; i < RB * nvec; i += nthreads) {
    const int r = i / nvec, k = i - r * nvec;
    Vec<T, VEC> x = vec_zero<T, VEC>();
    if (r < nr) x.load(hidden + static_cast<int64_t>(r0 + r) * H + static_cast<int64_t>(k) * VEC);
    float* dst = hs + r * H + k * CH;
#pragma unroll
    for (int e = 0; e < VEC; ++e) dst[(e / CH) * plane + e % CH] = to_float(x.v[e]);
  }
}

// The logits of W rows v0 and v0 + 1 for the RB staged hidden rows, by one group of 8 lanes (l8: this
// lane's index in it; ok0 / ok1: whether each W row exists). Afterwards lane l8 holds the logits of
// hidden row l8 * RB / 8 (x0: row v0, x1: row v0 + 1), not yet rounded to T. A logit's arithmetic
// depends on nothing but its W row and hidden row: whichever group, block or kernel computes it (the
// persistent draft kernel, persistent_draft.cuh, does too), it is bitwise the same.
template <typename T, int VEC, int RB>
__device__ __forceinline__ void group_logits(const T* __restrict__ weight, int H, const float* hs, int v0, bool ok0,
                                             bool ok1, int l8, float& x0, float& x1) {
  using HL = HiddenLayout<VEC>;
  const int nvec = H / VEC;
  const int plane = H / HL::kPlanes;
  const T* w0 = weight + static_cast<int64_t>(v0) * H;
  const T* w1 = w0 + H;
  float dot0[RB], dot1[RB];
#pragma unroll
  for (int r = 0; r < RB; ++r) dot0[r] = dot1[r] = 0.f;

  for (int k = l8; k < nvec; k += 2 * kLanesPerRow) {
    const int k2 = k + kLanesPerRow;
    const bool has2 = k2 < nvec;
    // All loads first: 4 independent 16-byte loads in flight per lane.
    Vec<T, VEC> a0 = vec_zero<T, VEC>(), a1 = vec_zero<T, VEC>(), b0 = vec_zero<T, VEC>(), b1 = vec_zero<T, VEC>();
    if (ok0) a0.load(w0 + static_cast<int64_t>(k) * VEC);
    if (ok1) a1.load(w1 + static_cast<int64_t>(k) * VEC);
    if (ok0 && has2) b0.load(w0 + static_cast<int64_t>(k2) * VEC);
    if (ok1 && has2) b1.load(w1 + static_cast<int64_t>(k2) * VEC);
    accumulate<T, VEC, RB>(a0, a1, hs, H, plane, k, dot0, dot1);
    if (has2) accumulate<T, VEC, RB>(b0, b1, hs, H, plane, k2, dot0, dot1);
  }
  x0 = reduce_scatter8<RB>(dot0, l8);
  x1 = reduce_scatter8<RB>(dot1, l8);
}

// One block's share of the head for the RB hidden rows r0 .. r0 + nr - 1 staged in hs (stage_hidden, published
// by the caller's barrier): the triple of its W rows [blockIdx.x * rows_per_block, + rows_per_block) for each
// hidden row, to partials[(r0 + r) * gridDim.x + blockIdx.x]. Every thread of a kThreads block calls it.
// verify_tail.cuh's kernel calls it too, after a norm of its own: one head arithmetic for both.
template <typename T, int VEC, int RB>
__device__ __forceinline__ void partial_block(const float* hs, const T* __restrict__ weight, int vocab, int H,
                                              int rows_per_block, int r0, int nr, Soft* __restrict__ partials) {
  __shared__ Soft warp_soft[kWarps][kLanesPerRow];
  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int gid = tid / kLanesPerRow, l8 = tid % kLanesPerRow;
  const int64_t vb = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int ve = static_cast<int>(std::min<int64_t>(vocab, vb + rows_per_block));
  const int n_pass = static_cast<int>(ceil_div(ve - vb, kRowsPerPass));  // uniform: keeps shuffles convergent
  const bool owner = (l8 & (kLanesPerRow / RB - 1)) == 0;
  Soft st = soft_empty();

  for (int pass = 0; pass < n_pass; ++pass) {
    const int v0 = static_cast<int>(vb) + pass * kRowsPerPass + gid * kRowsPerGroup;
    const bool ok0 = v0 < ve, ok1 = v0 + 1 < ve;
    float x0, x1;
    group_logits<T, VEC, RB>(weight, H, hs, v0, ok0, ok1, l8, x0, x1);
    if (owner) {
      if (ok0) soft_add(st, round_to<T>(x0), v0);
      if (ok1) soft_add(st, round_to<T>(x1), v0 + 1);
    }
  }

  // Block merge: the 4 groups of a warp first (lanes l8, l8 + 8, l8 + 16, l8 + 24 share a row),
  // then the warps through shared memory. Non-owner lanes hold empty triples (identity of the merge).
  soft_merge(st, shfl_xor_soft(st, 8));
  soft_merge(st, shfl_xor_soft(st, 16));
  if (lane < kLanesPerRow) warp_soft[warp][lane] = st;
  __syncthreads();
  if (tid < nr) {
    const int src = tid * (kLanesPerRow / RB);  // the owner lane of hidden row tid
    Soft acc = soft_empty();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) soft_merge(acc, warp_soft[w][src]);
    partials[static_cast<int64_t>(r0 + tid) * gridDim.x + blockIdx.x] = acc;
  }
}

// grid (n_blocks, ceil(R / RB)); kThreads threads; RB * H * 4 bytes of dynamic smem.
// partials: [R][n_blocks] triples. VEC: elements per W access (16 bytes, or 1).
// Register budget: RB = 1 (decode and draft steps) is held to 40 registers so that 3 blocks fit an SM
// and V = 49152 (384 blocks) runs as one wave on 132 SMs (at its natural 53 registers only 2 fit, and
// 120 blocks ran as a second wave). Larger RB would spill at that budget.
template <typename T, int VEC, int RB>
__global__ void __launch_bounds__(kThreads, RB == 1 ? 3 : 1)
partial_kernel(const T* __restrict__ hidden, const T* __restrict__ weight, int rows, int vocab, int hidden_size,
               int rows_per_block, Soft* __restrict__ partials) {
  extern __shared__ __align__(16) float hs[];
  pdl_launch_dependents();  // programmatic dependent launch: common.cuh
  pdl_wait();

  const int H = hidden_size;
  const int r0 = blockIdx.y * RB;
  const int nr = min(RB, rows - r0);
  stage_hidden<T, VEC, RB>(hidden, r0, nr, H, hs, threadIdx.x, kThreads);
  __syncthreads();
  partial_block<T, VEC, RB>(hs, weight, vocab, H, rows_per_block, r0, nr, partials);
}

constexpr int kCombineThreads = 256;

// grid (R); one block per hidden row merges its n_blocks triples (a fixed order: deterministic).
static __global__ void __launch_bounds__(kCombineThreads)
combine_kernel(const Soft* __restrict__ partials, int n_blocks, int64_t* __restrict__ token,
               float* __restrict__ confidence) {
  __shared__ Soft warp_soft[kCombineThreads / kWarpSize];
  pdl_launch_dependents();
  pdl_wait();
  const int r = blockIdx.x;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  Soft st = soft_empty();
  for (int i = threadIdx.x; i < n_blocks; i += kCombineThreads) {
    soft_merge(st, partials[static_cast<int64_t>(r) * n_blocks + i]);
  }
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) soft_merge(st, shfl_xor_soft(st, o));
  if (lane == 0) warp_soft[warp] = st;
  __syncthreads();
  if (threadIdx.x == 0) {
    Soft acc = soft_empty();
#pragma unroll
    for (int w = 0; w < kCombineThreads / kWarpSize; ++w) soft_merge(acc, warp_soft[w]);
    token[r] = acc.idx;
    confidence[r] = 1.f / acc.s;
  }
}

// ---- host side ----------------------------------------------------------------------------------

struct Plan {
  int vec;         // elements per W access
  int rb;          // hidden rows per block: 1, 2, 4, 8
  int n_rgroups;   // ceil(R / rb): grid y
  int n_blocks;    // grid x
  int rows_per_block;
  int smem_bytes;  // rb * H * 4
};

// One partial_kernel instantiation, chosen at run time: its pointer and its dynamic shared-memory
// opt-in (common.cuh's ensure_dynamic_smem: one driver call per kernel, device and larger size).
template <typename T>
struct PartialKernel {
  void (*fn)(const T*, const T*, int, int, int, int, Soft*);
  cudaError_t (*ensure_smem)(int bytes);
};

template <typename T, int VEC, int RB>
PartialKernel<T> partial_instance() {
  return {partial_kernel<T, VEC, RB>, ensure_dynamic_smem<partial_kernel<T, VEC, RB>>};
}

template <typename T>
PartialKernel<T> partial_kernel_for(int vec, int rb) {
  constexpr int V16 = kVec16<T>;
  const bool v16 = vec == V16;
  switch (rb) {
    case 1: return v16 ? partial_instance<T, V16, 1>() : partial_instance<T, 1, 1>();
    case 2: return v16 ? partial_instance<T, V16, 2>() : partial_instance<T, 1, 2>();
    case 4: return v16 ? partial_instance<T, V16, 4>() : partial_instance<T, 1, 4>();
    default: return v16 ? partial_instance<T, V16, 8>() : partial_instance<T, 1, 8>();
  }
}

// How many blocks: one pass (kRowsPerPass W rows) per block, but no more blocks than fit the SMs at
// once (`resident` per SM, from the occupancy calculator): a second wave of a few blocks would cost a
// whole pass of latency for a fraction of the rows.
inline void plan_blocks(Plan& p, int vocab, int num_sms, int resident) {
  const int64_t cap = static_cast<int64_t>(std::max(1, resident)) * num_sms;
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(ceil_div(vocab, kRowsPerPass), cap));
  p.rows_per_block = static_cast<int>(ceil_div(vocab, n));
  p.n_blocks = static_cast<int>(ceil_div(vocab, p.rows_per_block));  // no empty blocks
}

// max_smem: the device's opt-in shared memory per block. Returns rb = 0 when even one fp32 hidden
// row does not fit (the caller reports it). Host-side queries only (no stream work).
template <typename T>
Plan plan(const T* hidden, const T* weight, int64_t rows, int vocab, int hidden_size, int max_smem, int num_sms) {
  Plan p{};
  constexpr int V16 = kVec16<T>;
  const bool vec16 = hidden_size % V16 == 0 && is_aligned(hidden, 16) && is_aligned(weight, 16);
  p.vec = vec16 ? V16 : 1;
  int rb = 1;
  while (rb < kMaxRowsPerGroup && rb < rows) rb *= 2;
  const int64_t budget = max_smem - 2048;  // the kernel's static shared memory (1.5 KB) comes off the top
  while (rb > 1 && static_cast<int64_t>(rb) * hidden_size * 4 > budget) rb /= 2;
  if (static_cast<int64_t>(hidden_size) * 4 > budget) rb = 0;
  p.rb = rb;
  p.n_rgroups = rb > 0 ? static_cast<int>(ceil_div(rows, rb)) : 0;
  p.smem_bytes = rb * hidden_size * 4;
  int resident = 1;
  if (rb > 0) {
    const PartialKernel<T> kernel = partial_kernel_for<T>(p.vec, rb);
    if (kernel.ensure_smem(p.smem_bytes) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel.fn, kThreads, p.smem_bytes) != cudaSuccess) {
      resident = 1;  // the launch reports the real error
    }
  }
  plan_blocks(p, vocab, num_sms, resident);
  return p;
}

// Launches both kernels on `stream`; returns the launch status. partials: rows * p.n_blocks triples.
template <typename T>
cudaError_t launch(const Plan& p, const T* hidden, const T* weight, int64_t rows, int vocab, int hidden_size,
                   Soft* partials, int64_t* token, float* confidence, Launch stream) {
  if (p.rb < 1) return cudaErrorInvalidValue;
  const PartialKernel<T> kernel = partial_kernel_for<T>(p.vec, p.rb);
  cudaError_t err = kernel.ensure_smem(p.smem_bytes);
  if (err != cudaSuccess) return err;
  err = launch_pdl(kernel.fn, dim3(static_cast<unsigned>(p.n_blocks), static_cast<unsigned>(p.n_rgroups)),
                   dim3(kThreads), static_cast<size_t>(p.smem_bytes), stream, hidden, weight, static_cast<int>(rows),
                   vocab, hidden_size, p.rows_per_block, partials);
  if (err != cudaSuccess) return err;
  return launch_pdl(combine_kernel, dim3(static_cast<unsigned>(rows)), dim3(kCombineThreads), 0, stream, partials,
                    p.n_blocks, token, confidence);
}

}  // namespace lm_head
}  // namespace kangaroo
