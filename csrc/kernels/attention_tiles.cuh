// Building blocks of kernels/attention.cuh: launch constants, kernel parameters, the shared-memory
// layout (the host sizes launches with the same function), and the device helpers for RoPE, key
// ranges and K/V tile copies. Torch-free; see attention.cuh for the algorithm.
#pragma once

#include <climits>

#include "common.cuh"

namespace kangaroo {
namespace attention {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kKeyTile = 64;             // keys per shared-memory tile (two per lane in QK^T)
constexpr int kPStride = kKeyTile + 4;   // floats per row of P: float4-aligned, rows 4 banks apart
constexpr int kMaxHeadDim = 256;
constexpr int kMaxTileRows = 64;         // query rows per block
constexpr int kMaxSplits = 8;            // cluster size: 8 is the portable maximum
constexpr int kMaxKeyGroups = 16;        // PV key groups: at least 4 keys each (float4 reads of P)
constexpr int kMaxLocalGroups = 8;       // batch-invariant PV: key groups one thread may hold
constexpr int kInvariantRedFactor = 4;   // batch-invariant PV: its reduction buffer, in units of kThreads * vec floats
constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
struct Params {
  const T* q;           // [B, T, Hq, D]
  const T* k;           // [B, T, Hkv, D]
  const T* v;           // [B, T, Hkv, D]
  const float* rope_cos;  // [S', D], S' >= S
  const float* rope_sin;
  const int64_t* positions;  // [B, T]
  T* k_cache;           // [B, Hkv, S, D]
  T* v_cache;
  T* out;               // [B, T, Hq * D]
  int batch, tokens, hq, hkv, group, head_dim, cache_len;
  int64_t window;       // 0 = none
  float qscale;         // scale * log2(e)
  int rows;             // tokens * group: query rows per (b, kv head)
  int m_tile;           // query rows per block
  int n_qtiles;         // ceil(rows / m_tile)
  int n_splits;         // maximum key splits (grid z = the cluster's z size)
  int min_chunk;        // smallest split, in keys (a multiple of kKeyTile)
};

// ---- shared-memory layout (the host sizes the launch with the same function) ------------------------

struct SmemLayout {
  int ks;  // K/V tile row stride in elements: D padded so that consecutive rows are an odd number of
           // VEC-element accesses apart (conflict-free accesses of one column by 32 rows)
  int q, k, v, p, alpha, m, l, lo, hi;  // byte offsets
  int total;
};

__host__ __device__ constexpr inline int align16(int x) { return (x + 15) / 16 * 16; }

// invariant: the batch-invariant PV order's layout (attention.cuh), whose reduction holds every key group
// of every row separately: at most kInvariantRedFactor times the default's (see pv_key_groups).
__host__ __device__ inline SmemLayout smem_layout(int D, int elem_size, int vec, int m_alloc, bool invariant = false) {
  SmemLayout s{};
  s.ks = D + ((D / vec) % 2 == 0 ? vec : 0);
  const int kv = align16(kKeyTile * s.ks * elem_size);
  // the PV key-group reduction reuses the K tile after the loop
  const int red = kThreads * vec * 4 * (invariant ? kInvariantRedFactor : 1);
  int off = 0;
  s.q = off;
  off += align16(m_alloc * D * 4);
  s.k = off;
  off += kv > red ? kv : red;
  s.v = off;
  off += kv;
  s.p = off;
  off += m_alloc * kPStride * 4;
  s.alpha = off;
  off += m_alloc * 4;
  s.m = off;
  off += m_alloc * 4;
  s.l = off;
  off += m_alloc * 4;
  s.lo = off;
  off += m_alloc * 4;
  s.hi = off;
  off += m_alloc * 4;
  s.total = off;
  return s;
}

// Largest head dim a kernel instantiation must handle: 64 rows only come with D <= 128 (plan()).
__host__ __device__ constexpr inline int max_head_dim(int hd, int m_alloc) {
  return hd > 0 ? hd : (m_alloc > 32 ? 128 : kMaxHeadDim);
}

// PV: a thread owns column slice c = tid % nd (nd = D / VEC) of rows r0 + i * RS, RS = 256 / nd.
__host__ __device__ constexpr inline int units_per_thread(int vec, int hd, int rpt) {
  const int m_alloc = kWarps * rpt;
  const int nd_max = max_head_dim(hd, m_alloc) / vec;
  const int rs_min = kThreads / nd_max > 0 ? kThreads / nd_max : 1;
  return (m_alloc + rs_min - 1) / rs_min;
}

// PV key groups for a tile of m_rows query rows, rs = kThreads / (D / VEC) row slots: 1, or as many
// groups (2, 4, 8, 16) as fit while every row keeps a slot per group. Fewer rows, more groups.
//
// Batch-invariant order (attention.cuh, INV): a row's PV sum is always split into NG = pv_key_groups(G)
// groups, the count a single token's tile (its G query heads) uses; a tile of KG < NG groups per row
// gives each thread NG / KG of them. The reduction buffer holds the groups the owner thread does not:
// (NG - NG/KG) groups of m_rows <= rs / KG rows of D floats = NG (KG - 1) / KG^2 * kThreads * vec
// floats, at most 16 / 4 = kInvariantRedFactor times kThreads * vec (KG = 2, NG = 16); without INV
// (NG = KG) under kThreads * vec.
__host__ __device__ constexpr inline int pv_key_groups(int m_rows, int rs) {
  if (m_rows < 1 || 2 * m_rows > rs) return 1;
  const int kg = rs / m_rows;
  return kg >= kMaxKeyGroups ? kMaxKeyGroups : (kg >= 8 ? 8 : (kg >= 4 ? 4 : 2));
}

// ---- device helpers --------------------------------------------------------------------

// RoPE of one rotation pair (i, i + D/2), rounded as the reference does in dtype T:
//   y1 = T(T(x1 * T(c1)) + T(-x2 * T(s1))),  y2 = T(T(x2 * T(c2)) + T(x1 * T(s2))).
// __fmul_rn / __fadd_rn keep nvcc from contracting into an FMA (which would change fp32 results).
template <typename T>
__device__ __forceinline__ void rope_pair(float x1, float x2, float c1, float s1, float c2, float s2, float& y1,
                                          float& y2) {
  const float c1t = round_to<T>(c1), s1t = round_to<T>(s1), c2t = round_to<T>(c2), s2t = round_to<T>(s2);
  y1 = round_to<T>(__fadd_rn(round_to<T>(__fmul_rn(x1, c1t)), round_to<T>(__fmul_rn(-x2, s1t))));
  y2 = round_to<T>(__fadd_rn(round_to<T>(__fmul_rn(x2, c2t)), round_to<T>(__fmul_rn(x1, s2t))));
}

// Visible keys of query row `row` (r = t * G + g): [lo, hi] = [max(0, p - window + 1), p], or the
// empty range (1, 0) when p is outside [0, S).
__device__ __forceinline__ void row_key_range(const int64_t* __restrict__ positions, int b, int tokens, int group,
                                              int row, int S, int64_t window, int& lo, int& hi) {
  const int t = row / group;
  const int64_t p = positions[static_cast<int64_t>(b) * tokens + t];
  if (p < 0 || p >= S) {
    lo = 1;
    hi = 0;
    return;
  }
  hi = static_cast<int>(p);
  const int64_t first = p - window + 1;  // no overflow: p >= 0, window >= 0
  lo = (window > 0 && first > 0) ? static_cast<int>(first) : 0;
}

// Fills lo_s/hi_s[0, M_ALLOC) for the tile's rows (padding rows empty) and returns the union
// [klo, khi] of the valid rows' ranges (klo > khi when none is valid). Contains a __syncthreads.
template <int M_ALLOC>
__device__ __forceinline__ void tile_key_range(const int64_t* __restrict__ positions, int b, int tokens, int group,
                                               int row0, int m_rows, int S, int64_t window, int* lo_s, int* hi_s,
                                               int2* s_red, int& klo, int& khi) {
  constexpr int kRowWarps = (M_ALLOC + kWarpSize - 1) / kWarpSize;
  const int tid = threadIdx.x;
  if (tid < kRowWarps * kWarpSize) {
    int lo = 1, hi = 0;
    if (tid < m_rows) row_key_range(positions, b, tokens, group, row0 + tid, S, window, lo, hi);
    if (tid < M_ALLOC) {
      lo_s[tid] = lo;
      hi_s[tid] = hi;
    }
    const bool valid = lo <= hi;
    const int mn = __reduce_min_sync(kFullMask, valid ? lo : INT_MAX);
    const int mx = __reduce_max_sync(kFullMask, valid ? hi : -1);
    if (tid % kWarpSize == 0) s_red[tid / kWarpSize] = make_int2(mn, mx);
  }
  __syncthreads();
  klo = INT_MAX;
  khi = -1;
#pragma unroll
  for (int w = 0; w < kRowWarps; ++w) {
    klo = min(klo, s_red[w].x);
    khi = max(khi, s_red[w].y);
  }
}

// How the tile's key range is cut: `chunk` keys per split (a multiple of kKeyTile, at least
// min_chunk), `n_used` splits (0 when the range is empty). Both kernels must agree on this.
__device__ __forceinline__ void split_keys(int klo, int khi, int n_splits, int min_chunk, int& chunk, int& n_used) {
  if (klo > khi) {
    chunk = kKeyTile;
    n_used = 0;
    return;
  }
  const int len = khi - klo + 1;
  int c = (len + n_splits - 1) / n_splits;
  c = c > min_chunk ? c : min_chunk;
  chunk = (c + kKeyTile - 1) / kKeyTile * kKeyTile;
  n_used = (len + chunk - 1) / chunk;
}

// acc += P[0..3] * V[0..3] (one column slice of 4 consecutive keys), key by key: the one PV step both
// orders use, so a row's FMAs are the same instructions in either.
template <typename T, int VEC>
__device__ __forceinline__ void pv_four_keys(const float* p, const T* v, int ks, float (&acc)[VEC]) {
  const float4 pj = *reinterpret_cast<const float4*>(p);
  const float pw[4] = {pj.x, pj.y, pj.z, pj.w};
#pragma unroll
  for (int jj = 0; jj < 4; ++jj) {
    float vf[VEC];
    load_as_float<T, VEC>(v + jj * ks, vf);
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = fmaf(pw[jj], vf[e], acc[e]);
  }
}

// Output row of tile row r: out[b, t, kvh * G + g, :].
__device__ __forceinline__ int64_t out_row(int b, int tokens, int hq, int kvh, int group, int row) {
  const int t = row / group, g = row - t * group;
  return (static_cast<int64_t>(b) * tokens + t) * hq + static_cast<int64_t>(kvh) * group + g;
}

// Starts the copy of keys [kb, kb + 64) of one head into a shared tile: new keys (s - p0 in [0, T))
// from the k or v input (raw: K's RoPE is applied after the copy lands), others from the cache;
// keys past c_hi are zero-filled (so P = 0 never meets garbage such as NaN in unwritten rows).
template <typename T, int VEC, int HD>
__device__ __forceinline__ void issue_tile(T* tile, int ks, const T* __restrict__ cache_head,
                                           const T* __restrict__ new_base, int64_t new_stride, int kb, int c_hi,
                                           int p0, int tokens, int head_dim) {
  const int D = HD > 0 ? HD : head_dim;
  const int nvec = D / VEC;
  for (int idx = threadIdx.x; idx < kKeyTile * nvec; idx += kThreads) {
    const int j = idx / nvec, c = idx - j * nvec;
    const int s = kb + j;
    T* dst = tile + j * ks + c * VEC;
    if (s > c_hi) {
      vec_zero<T, VEC>().store(dst);
      continue;
    }
    const int tn = s - p0;
    const T* src = (tn >= 0 && tn < tokens) ? new_base + tn * new_stride + c * VEC
                                            : cache_head + static_cast<int64_t>(s) * D + c * VEC;
    copy_async<T, VEC>(dst, src);
  }
}

}  // namespace attention
}  // namespace kangaroo
