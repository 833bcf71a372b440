// Decode-time linear layers (kangaroo_ext/ops/reference.py: decode_linear, rms_norm_linear,
// rms_norm_gate_up), torch-free. A decode or verify step multiplies 1..γ+1 rows by each weight matrix,
// so the work is a GEMV: memory- and latency-bound, with the weights read once for all rows.
//
//   decode_linear      out[m, n] = T(sum_k x[m, k] * W[n, k] + bias[n])
//   rms_norm_linear    xn = fused_add_rms_norm(x, residual) (prologue), then 1-3 weights (q, k, v) in
//                      one launch whose rows are the concatenation of the weights' rows
//   rms_norm_gate_up   act[m, i] = T(T(silu(T(xn . gate[i]))) * T(xn . up[i]))   (SiLU·mul epilogue)
//
// One launch per op. Block = WPB warps; warp w owns one output row n (and, for gate_up, the pair of
// rows gate[n], up[n]) for MB rows of x: grid (ceil(N / WPB), ceil(M / MB)). Each lane strides over
// the row in 16-byte vectors, kUnroll vectors in flight, the next chunk prefetched while the current
// one is used; the MB rows of (normalized) x sit in shared memory as T, which is exactly the value the
// reference rounds the normed rows to before its F.linear.
//
// Batch invariance: a lane's partial sum visits k in the same order and the warp reduction is the
// same butterfly whatever M and MB are, so row m's output does not depend on which other rows share
// the launch. A verify step over k+1 positions thus rounds like k+1 single-token steps here.
//
// Programmatic dependent launch (sm_90): the launcher allows this kernel to start before the previous
// kernel in the stream has finished. The weights do not depend on earlier kernels, so each warp issues
// its first weight loads, then waits (griddepcontrol.wait) for the previous grid to complete and
// flush, and only then reads x / residual or writes anything. Early trigger (launch_dependents) lets
// the next PDL kernel do the same. The DRAM latency of the weight stream thus overlaps the tail of
// the previous kernel; without a PDL predecessor the wait returns at once.
//
// The prologue (load_rows) is recomputed by every block (MB rows of K elements, L2-resident after the
// first block); block x = 0 of each row group writes residual_out. Inputs must not alias outputs.
//
// Bytes per call: N * K * sz (weights) + M * N * sz (out) + per block M * K * sz (x, L2) ; the op moves
// ~N * K * sz from DRAM: compare with a copy of that many bytes.
#pragma once

#include "common.cuh"

namespace kangaroo {
namespace gemv {

constexpr int kMaxWarps = 8;
constexpr int kUnroll = 4;  // 16-byte weight vectors a lane has in flight per weight row and chunk
constexpr int kMaxSegments = 3;

enum class Mode { kLinear, kNormLinear, kNormGateUp };

template <typename T>
struct Segment {
  const T* w;     // [n, K]
  const T* bias;  // [n] or null
  T* out;         // [M, n]
  int n;
};

template <typename T>
struct Params {
  const T* x;            // [M, K]
  const T* residual;     // [M, K] or null
  const T* norm_weight;  // [K] (norm modes)
  T* residual_out;       // [M, K] (norm modes)
  Segment<T> seg[kMaxSegments];  // gate_up: seg[0] = gate (out = act), seg[1] = up
  int n_segments;
  int n_total;  // output rows over the segments (gate_up: I)
  int m, k;
  float eps;
};

// Loads the chunk of weight row `w` starting at vector `base`: vector base + u * 32 + lane.
template <typename T, int VEC>
__device__ __forceinline__ void load_chunk(const T* __restrict__ w, int nvec, int base, int lane,
                                           Vec<T, VEC> (&dst)[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int i = base + u * kWarpSize + lane;
    if (w != nullptr && i < nvec) dst[u].load(w + static_cast<int64_t>(i) * VEC);
  }
}

// The prologue: the block's MB rows of x into shared memory, normalized in the norm modes. Every
// global load is issued before any is used (cp.async in the linear mode; kPrologueUnroll per thread
// in the norm modes), so the prologue costs about one L2 round trip rather than one per row or step:
//   1. all threads: norm weight -> nws (cp.async), xs = s = T(x + residual) (block x = 0 also writes
//      residual_out), rows mb..MB-1 of xs = 0;
//   2. warp per row: inverse RMS from shared memory (lane-strided sum: the same order whatever M);
//   3. all threads: xs = T(nw * T(s * inv_rms)).
constexpr int kPrologueUnroll = 4;

// tid / nthreads: this thread among the threads that run the block's work (a whole block, or a sub-block
// of the persistent draft kernel: persistent_draft.cuh); sync: their barrier; write_residual: this block is the
// one of its row group that writes residual_out (block x = 0 of a launch).
template <typename T, int VEC, int MB, Mode MODE, class Sync>
__device__ __forceinline__ void load_rows(const Params<T>& p, int m0, int mb, T* xs, T* nws, float* inv_rms_s,
                                          int tid, int nthreads, bool write_residual_block, Sync sync) {
  using V = Vec<T, VEC>;
  constexpr bool kNorm = MODE != Mode::kLinear;
  const int nvec = p.k / VEC;
  const int total = mb * nvec;
  const bool write_residual = kNorm && write_residual_block;
  if constexpr (kNorm) {  // norm weight -> nws, in flight while x loads
    for (int i = tid; i < nvec; i += nthreads) {
      copy_async<T, VEC>(nws + i * VEC, p.norm_weight + static_cast<int64_t>(i) * VEC);
    }
    cp_async_commit();
  }
  for (int i = total + tid; i < MB * nvec; i += nthreads) vec_zero<T, VEC>().store(xs + i * VEC);
  if constexpr (!kNorm) {
    // Plain x rows: cp.async, all in flight at once whatever their number (a verify step's 7 rows of
    // the down projection's 1,536 inputs were 3 dependent rounds of register loads).
    for (int i = tid; i < total; i += nthreads) {
      copy_async<T, VEC>(xs + i * VEC, p.x + static_cast<int64_t>(m0) * p.k + static_cast<int64_t>(i) * VEC);
    }
    cp_async_commit();
    cp_async_wait<0>();
    // the caller's __syncthreads publishes xs
  } else {
    for (int base = tid; base < total; base += kPrologueUnroll * nthreads) {
      V a[kPrologueUnroll], r[kPrologueUnroll];
#pragma unroll
      for (int u = 0; u < kPrologueUnroll; ++u) {
        const int i = base + u * nthreads;
        if (i >= total) break;
        const int64_t g = static_cast<int64_t>(m0) * p.k + static_cast<int64_t>(i) * VEC;  // rows are contiguous
        a[u].load(p.x + g);
        if (p.residual != nullptr) r[u].load(p.residual + g);
      }
#pragma unroll
      for (int u = 0; u < kPrologueUnroll; ++u) {
        const int i = base + u * nthreads;
        if (i >= total) break;
        if (p.residual != nullptr) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) a[u].v[e] = from_float<T>(to_float(a[u].v[e]) + to_float(r[u].v[e]));
        }
        if (write_residual) {
          a[u].store(p.residual_out + static_cast<int64_t>(m0) * p.k + static_cast<int64_t>(i) * VEC);
        }
        a[u].store(xs + i * VEC);
      }
    }
    cp_async_wait<0>();
    sync();
    const int lane = tid % kWarpSize, warp = tid / kWarpSize, nwarps = nthreads / kWarpSize;
    for (int m = warp; m < mb; m += nwarps) {
      float sum_sq = 0.f;
      for (int i = lane; i < nvec; i += kWarpSize) {
        V t;
        t.load(xs + m * p.k + i * VEC);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float h = to_float(t.v[e]);
          sum_sq += h * h;
        }
      }
      sum_sq = warp_sum(sum_sq);
      // Correctly rounded, as csrc/kernels/rms_norm.cuh (no rsqrtf: its error would show in fp32).
      if (lane == 0) inv_rms_s[m] = 1.0f / sqrtf(sum_sq / static_cast<float>(p.k) + p.eps);
    }
    sync();
    for (int i = tid; i < total; i += nthreads) {
      const int m = i / nvec, c = i - m * nvec;
      const float inv_rms = inv_rms_s[m];
      V t, w;
      t.load(xs + i * VEC);
      w.load(nws + c * VEC);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float normed = round_to<T>(to_float(t.v[e]) * inv_rms);  // HF rounds before the weight
        t.v[e] = from_float<T>(to_float(w.v[e]) * normed);
      }
      t.store(xs + i * VEC);
    }
  }
}

template <typename T, int VEC, int MB, Mode MODE>
__global__ void __launch_bounds__(kMaxWarps* kWarpSize) gemv_kernel(const Params<T> p) {
  constexpr int NR = MODE == Mode::kNormGateUp ? 2 : 1;  // weight rows per warp
  using V = Vec<T, VEC>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);  // [MB][K]
  T* nws = xs + MB * p.k;                   // [K] (norm modes)
  __shared__ float inv_rms_s[MB];

  pdl_launch_dependents();
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, wpb = blockDim.x / kWarpSize;
  const int n = blockIdx.x * wpb + warp;
  const int m0 = blockIdx.y * MB;
  const int mb = min(MB, p.m - m0);
  const int nvec = p.k / VEC;

  // Which weight (segment) row n falls in. Warps past the end still join the block's barriers.
  const T* w[NR] = {};
  const T* bias = nullptr;
  T* out = nullptr;
  int n_local = 0, n_cols = 1;
  if (n < p.n_total) {
    if (MODE == Mode::kNormGateUp) {
      w[0] = p.seg[0].w + static_cast<int64_t>(n) * p.k;
      w[NR - 1] = p.seg[1].w + static_cast<int64_t>(n) * p.k;
      out = p.seg[0].out;
      n_local = n;
      n_cols = p.seg[0].n;
    } else {
      int base = 0;
#pragma unroll
      for (int s = 0; s < kMaxSegments; ++s) {
        if (s < p.n_segments && n >= base && n < base + p.seg[s].n) {
          n_local = n - base;
          w[0] = p.seg[s].w + static_cast<int64_t>(n_local) * p.k;
          bias = p.seg[s].bias;
          out = p.seg[s].out;
          n_cols = p.seg[s].n;
        }
        base += s < p.n_segments ? p.seg[s].n : 0;
      }
    }
  }

  // Weights first (they do not depend on the previous kernel), then wait for it, then x.
  V cur[NR][kUnroll];
#pragma unroll
  for (int r = 0; r < NR; ++r) load_chunk<T, VEC>(w[r], nvec, 0, lane, cur[r]);
  pdl_wait();

  load_rows<T, VEC, MB, MODE>(p, m0, mb, xs, nws, inv_rms_s, threadIdx.x, blockDim.x, blockIdx.x == 0, WholeBlock{});
  __syncthreads();
  if (out == nullptr) return;  // no barriers below

  // Rows mb..MB-1 of xs are zeros (load_rows). Their products are skipped: a 5-row verify step runs in an
  // 8-row block, and computing the 3 padding rows made its GEMVs cost like 8 rows (verify of 4 -> 5
  // positions: +162 us on an H100, kernels.json at 6e24b13). mb is uniform over the block, so the
  // unrolled loop only branches, never diverges; a real row's sum is the same sequence of FMAs as before.
  float acc[MB * NR];
#pragma unroll
  for (int j = 0; j < MB * NR; ++j) acc[j] = 0.f;

  constexpr int kChunk = kUnroll * kWarpSize;
  for (int base = 0; base < nvec; base += kChunk) {
    V next[NR][kUnroll];
    if (base + kChunk < nvec) {
#pragma unroll
      for (int r = 0; r < NR; ++r) load_chunk<T, VEC>(w[r], nvec, base + kChunk, lane, next[r]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kWarpSize + lane;
      if (i >= nvec) break;
      float wf[NR][VEC];
#pragma unroll
      for (int r = 0; r < NR; ++r)
#pragma unroll
        for (int e = 0; e < VEC; ++e) wf[r][e] = to_float(cur[r][u].v[e]);
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        if (m >= mb) break;  // padding rows: their sums stay 0 and are never written
        V xv;
        xv.load(xs + m * p.k + i * VEC);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float xf = to_float(xv.v[e]);
#pragma unroll
          for (int r = 0; r < NR; ++r) acc[m * NR + r] = fmaf(wf[r][e], xf, acc[m * NR + r]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < NR; ++r)
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) cur[r][u] = next[r][u];
  }

  // Lane l ends up with value l / G, G = 32 / (MB * NR): row m's gate (or only) value sits in lane
  // m * NR * G, its up value G lanes further.
  constexpr int G = kWarpSize / (MB * NR);
  const float v0 = warp_reduce_scatter<MB * NR>(acc, lane);
  const float v1 = NR > 1 ? __shfl_down_sync(kFullMask, v0, G) : v0;
  const int idx = lane / G;
  const int m = idx / NR;
  if (lane % (NR * G) != 0 || m >= mb) return;
  T* dst = out + static_cast<int64_t>(m0 + m) * n_cols + n_local;
  if (MODE == Mode::kNormGateUp) {
    // HF LlamaMLP in dtype T: act_fn(gate(x)) * up(x), each op rounded to T (F.silu in fp32 opmath).
    const float g = round_to<T>(v0), u = round_to<T>(v1);
    const float silu = round_to<T>(g / (1.0f + expf(-g)));
    *dst = from_float<T>(silu * u);
  } else {
    *dst = from_float<T>(bias != nullptr ? v0 + to_float(bias[n_local]) : v0);
  }
}

// ---- launch plan ---------------------------------------------------------------------------------

struct Plan {
  int vec;   // elements per access (16 bytes, or 1 when sizes / pointers are not 16-byte aligned)
  int mb;    // rows of x per block: 1, 2, 4 or 8
  int wpb;   // warps per block
  dim3 grid;
  int smem_bytes;
};

// Warps per block: enough blocks to cover every SM (each block redoes the small prologue, so not
// more blocks than needed), at most kMaxWarps.
inline Plan plan(int m, int k, int n_total, int elem_size, bool vec16, int num_sms, int max_smem) {
  Plan pl{};
  pl.vec = vec16 ? 16 / elem_size : 1;
  // MB: the smallest of 1, 2, 4, 8 that holds m (8 for more rows, in row groups). Every block computes
  // all MB rows, so a verify step over 2 positions costs 2 rows' arithmetic, not 8 (with MB = 8 for
  // any m > 1, a 2-row verify step's GEMVs took ~1.6x a decode step's on an H100).
  pl.mb = 1;
  while (pl.mb < 8 && pl.mb < m && (2LL * pl.mb + 1) * k * elem_size + 1024 <= max_smem) pl.mb *= 2;
  pl.wpb = 4;
  if (ceil_div(n_total, 8) >= 2 * num_sms) pl.wpb = 8;
  while (pl.wpb > 1 && ceil_div(n_total, pl.wpb) < num_sms) pl.wpb /= 2;
  pl.grid = dim3(static_cast<unsigned>(ceil_div(n_total, pl.wpb)), static_cast<unsigned>(ceil_div(m, pl.mb)));
  pl.smem_bytes = static_cast<int>(static_cast<int64_t>(pl.mb + 1) * k * elem_size);  // x rows + norm weight
  return pl;
}

template <typename T, int VEC, int MB, Mode MODE>
cudaError_t launch_instance(const Params<T>& p, const Plan& pl, Launch stream) {
  constexpr auto kernel = gemv_kernel<T, VEC, MB, MODE>;
  const cudaError_t err = ensure_dynamic_smem<kernel>(pl.smem_bytes);
  if (err != cudaSuccess) return err;
  return launch_pdl(kernel, pl.grid, dim3(static_cast<unsigned>(pl.wpb * kWarpSize)),
                    static_cast<size_t>(pl.smem_bytes), stream, p);
}

// Launches on `stream`. p.m >= 1, p.k >= 1, K % pl.vec == 0 and 16-byte aligned pointers when
// pl.vec > 1; pl.smem_bytes within the device's opt-in limit (the launcher checks).
template <typename T, Mode MODE>
cudaError_t launch(const Params<T>& p, const Plan& pl, Launch stream) {
  constexpr int kVec = kVec16<T>;
  if (pl.vec == kVec) {
    switch (pl.mb) {
      case 1: return launch_instance<T, kVec, 1, MODE>(p, pl, stream);
      case 2: return launch_instance<T, kVec, 2, MODE>(p, pl, stream);
      case 4: return launch_instance<T, kVec, 4, MODE>(p, pl, stream);
      default: return launch_instance<T, kVec, 8, MODE>(p, pl, stream);
    }
  }
  switch (pl.mb) {
    case 1: return launch_instance<T, 1, 1, MODE>(p, pl, stream);
    case 2: return launch_instance<T, 1, 2, MODE>(p, pl, stream);
    case 4: return launch_instance<T, 1, 4, MODE>(p, pl, stream);
    default: return launch_instance<T, 1, 8, MODE>(p, pl, stream);
  }
}

}  // namespace gemv
}  // namespace kangaroo
