// Building blocks of kernels/attention.cuh: launch constants, kernel parameters, the shared-memory
// layout (the host sizes launches with the same function), the device helpers for RoPE, key ranges
// and K/V tile copies, and the split merge: its arithmetic (one function for the cluster merge and the
// global one) and the global merge's scratch and stage. Torch-free; see attention.cuh for the algorithm.
#pragma once

#include <climits>

#include "common.cuh"
#include "key_split.h"

namespace kangaroo {
namespace attention {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
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
  bool interleaved;     // key_split.h: units of min_chunk keys dealt round-robin, else contiguous splits
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

// ---- split merge ----------------------------------------------------------------------------------

// One output pair of a row from the states of its tile's n_used splits (gathered by the caller, in split
// order): out = sum_z 2^(m_z - M) o_z / sum_z 2^(m_z - M) l_z (a split where the row sees no key has
// m = -inf, l = 0, o = 0 and weighs nothing). The cluster merge and the global merge both call this, so
// their outputs are the same bits by construction. out_ptr() gives the pair's output address; it is called
// only after the sums (the instruction order the kernel had before this was factored out).
template <typename T, typename OutPtr>
__device__ __forceinline__ void merge_splits(int n_used, const float (&mz)[kMaxSplits], const float (&lz)[kMaxSplits],
                                             const float2 (&oz)[kMaxSplits], OutPtr out_ptr) {
  float M = -INFINITY;
#pragma unroll
  for (int zz = 0; zz < kMaxSplits; ++zz) {
    if (zz < n_used) M = fmaxf(M, mz[zz]);
  }
  const float m_ref = M == -INFINITY ? 0.f : M;
  float den = 0.f, a0 = 0.f, a1 = 0.f;
#pragma unroll
  for (int zz = 0; zz < kMaxSplits; ++zz) {
    if (zz < n_used) {
      const float w = exp2f(mz[zz] - m_ref);
      den = fmaf(w, lz[zz], den);
      a0 = fmaf(w, oz[zz].x, a0);
      a1 = fmaf(w, oz[zz].y, a1);
    }
  }
  const float inv = 1.f / den;
  T* dst = out_ptr();
  dst[0] = from_float<T>(a0 * inv);
  dst[1] = from_float<T>(a1 * inv);
}

// Global-memory merge state (attention_block<..., GLOBAL_MERGE = true>, for callers without clusters).
// Tile t = bh * n_qtiles + qt, split z < n_splits, tile row r < m_tile (a slot per m_tile rows, also in
// a last q-tile with fewer rows); all in 4-byte elements, one allocation (merge_scratch_at):
//   o       [tiles][n_splits][m_tile][D]  float  split z's unnormalized output row (first: 16-byte aligned)
//   m, l    [tiles][n_splits][m_tile]     float  split z's row max (base 2) and sum of 2^(s - m)
//   n_used  [tiles][m_tile]               int    the tile's n_used for a row that sees a key, else 0
// A tile's split z < n_used writes its o, m, l rows when n_used > 1; split 0 writes n_used of each of its
// rows (r < m_rows) on every call, and the merge stage reads n_used <= 1 as "nothing to merge" (one split:
// written out already; 0: the row was zeroed). Slots that were not written are never read.
struct MergeScratch {
  float* o;
  float* m;
  float* l;
  int* n_used;
};

// 4-byte elements of the scratch of one launch's tile grid (p.batch, p.hkv, p.head_dim and the plan's
// m_tile, n_qtiles, n_splits: the values attention_block's Params carry).
__host__ __device__ inline int64_t merge_scratch_floats(int batch, int hkv, int head_dim, int m_tile, int n_qtiles,
                                                        int n_splits) {
  const int64_t rows = static_cast<int64_t>(batch) * hkv * n_qtiles * m_tile;
  return rows * n_splits * (head_dim + 2) + rows;
}

// The scratch carved from `base` (merge_scratch_floats(...) elements, 16-byte aligned), same arguments.
__host__ __device__ inline MergeScratch merge_scratch_at(float* base, int batch, int hkv, int head_dim, int m_tile,
                                                         int n_qtiles, int n_splits) {
  const int64_t rows = static_cast<int64_t>(batch) * hkv * n_qtiles * m_tile, states = rows * n_splits;
  MergeScratch s;
  s.o = base;
  s.m = base + states * head_dim;
  s.l = s.m + states;
  s.n_used = reinterpret_cast<int*>(s.l + states);
  return s;
}

// Global merge stage: output pair u of tile (bh, qt), i.e. row r = u / (D/2), columns 2 (u % (D/2)) + {0, 1},
// for u < m_rows * D/2 (m_rows = min(m_tile, rows - qt * m_tile)). Call it after every attention_block
// of the launch has finished and its global writes are visible (a grid-wide barrier with release/acquire
// ordering): it reads the scratch with plain loads. Pairs of tiles or rows with n_used <= 1 return at once.
template <typename T>
__device__ __forceinline__ void attention_merge_global(const Params<T>& p, const MergeScratch& s, int bh, int qt,
                                                       int u) {
  const int D = p.head_dim, pairs = D / 2;
  const int r = u / pairs, col = 2 * (u - r * pairs);
  const int64_t t = static_cast<int64_t>(bh) * p.n_qtiles + qt;
  const int n_used = s.n_used[t * p.m_tile + r];
  if (n_used <= 1) return;
  float mz[kMaxSplits], lz[kMaxSplits];
  float2 oz[kMaxSplits];
#pragma unroll
  for (int zz = 0; zz < kMaxSplits; ++zz) {
    if (zz < n_used) {
      const int64_t sr = (t * p.n_splits + zz) * p.m_tile + r;
      mz[zz] = s.m[sr];
      lz[zz] = s.l[sr];
      oz[zz] = *reinterpret_cast<const float2*>(s.o + sr * D + col);
    }
  }
  const int b = bh / p.hkv, kvh = bh - b * p.hkv;
  merge_splits<T>(n_used, mz, lz, oz,
                  [&] { return p.out + out_row(b, p.tokens, p.hq, kvh, p.group, qt * p.m_tile + r) * D + col; });
}

// The whole merge stage as one strided loop: pairs i = start, start + stride, ... of every tile
// (i = (t * m_tile + r) * D/2 + pair, t = bh * n_qtiles + qt; slots past a last q-tile's rows skipped).
// E.g. start = blockIdx.x * blockDim.x + threadIdx.x, stride = gridDim.x * blockDim.x.
template <typename T>
__device__ __forceinline__ void attention_merge_global_all(const Params<T>& p, const MergeScratch& s, int64_t start,
                                                           int64_t stride) {
  const int pairs = p.head_dim / 2;
  const int64_t tile_pairs = static_cast<int64_t>(p.m_tile) * pairs;
  const int64_t total = static_cast<int64_t>(p.batch) * p.hkv * p.n_qtiles * tile_pairs;
  for (int64_t i = start; i < total; i += stride) {
    const int64_t t = i / tile_pairs;
    const int u = static_cast<int>(i - t * tile_pairs);
    const int bh = static_cast<int>(t / p.n_qtiles), qt = static_cast<int>(t - static_cast<int64_t>(bh) * p.n_qtiles);
    if (u / pairs >= p.rows - qt * p.m_tile) continue;  // past the last q-tile's rows
    attention_merge_global<T>(p, s, bh, qt, u);
  }
}

}  // namespace attention
}  // namespace kangaroo
