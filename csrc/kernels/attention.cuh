// RoPE + KV-cache append + causal attention over the static cache, for decode and verification
// (kangaroo_ext/ops/reference.py: rope_append_attention), torch-free.
//
// Launches (programmatic dependent launch, common.cuh): 1 when the plan has one key split (large
// batch / many heads / prefill, or a short cache),
// else 2 (attention_kernel writes per-split partials, combine_kernel merges them). The host cannot
// see the context length (positions live on the device), so the split count is a maximum sized from
// the cache capacity S; every block derives the actual key range from `positions` and a tile whose
// keys fit one split writes the final output itself, which the combine step then skips.
//
// Bytes per call (sz = element size, ctx = keys in a row's [lowest visible, highest position]):
//   launch 1 reads   K, V: 2 * B * Hkv * ctx * D * sz        (once per q-tile; one q-tile when T*G <= 64)
//                    q: B*T*Hq*D*sz, k/v inputs for the new keys, 2 RoPE rows (fp32) per query row
//            writes  cache rows: 2 * B*T*Hkv*D*sz, and either out (B*T*Hq*D*sz) or partials
//                    (splits used * rows * (D + 2) * 4 bytes per (b, kv head))
//   launch 2 reads   the partials, writes out (B*T*Hq*D*sz).
//
// Why the cache append is race-free inside one launch: the new keys are the positions
// [p0, p0 + T - 1], p0 = positions[b, 0] (positions are consecutive by contract). Every block that
// needs one of those keys builds it itself from the k/v inputs (RoPE in shared memory) instead of
// reading the cache, and only the (split 0, q-tile t' % n_qtiles) block writes new key t' to the
// cache. No block ever reads a cache row this call writes, so the writes need no ordering against the
// reads; later calls see them through stream order. (This holds even if positions were not
// consecutive: writes still go to p0 + t' only; just the values would then differ from the reference.)
//
// Rounding: RoPE reproduces the reference bit for bit (cos/sin rounded to the dtype, each product
// and the sum rounded to the dtype, no FMA contraction). Attention is fp32 throughout: scores, an
// online softmax in base 2 (q is pre-multiplied by scale * log2 e), P kept in fp32 (not rounded to
// the dtype as flash kernels do), output rounded once to the dtype.
//
// Positions outside [0, S) (S = cache length): that query's output row is zeros and that key is not
// written (the reference would index out of bounds instead).
//
// Block = 256 threads = 8 warps, one (batch row, kv head, q-tile, key split). A q-tile is up to 64
// query rows r = t * G + g (the G query heads of one kv head for consecutive tokens), so each K/V
// element is read once per tile, not once per query head. Keys stream through shared memory 64 at a
// time (cp.async; V's copy overlaps the QK^T phase, the next tile's K overlaps the PV phase):
//   QK^T: warp w owns rows w, w+8, ... (RPT rows), lane owns keys lane and lane+32 of the tile; the
//         row's online-softmax update is a warp reduction (warps with only padding rows sit it out).
//   PV:   a thread owns one VEC-wide column slice of rows r0, r0+RS, ...; with few rows the 64 keys are
//         split among KG thread groups whose partial sums are added at the end.
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
constexpr int kMaxSplits = 256;
constexpr int kMaxKeyGroups = 16;        // PV key groups: at least 4 keys each (float4 reads of P)
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
  float* part_acc;      // [B*Hkv*n_qtiles, n_splits, m_tile, D]   (only when n_splits > 1)
  float* part_ml;       // [B*Hkv*n_qtiles, n_splits, m_tile, 2]   (running max (log2 domain), sum)
  int batch, tokens, hq, hkv, group, head_dim, cache_len;
  int64_t window;       // 0 = none
  float qscale;         // scale * log2(e)
  int rows;             // tokens * group: query rows per (b, kv head)
  int m_tile;           // query rows per block
  int n_qtiles;         // ceil(rows / m_tile)
  int n_splits;         // maximum key splits (grid z)
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

__host__ __device__ inline SmemLayout smem_layout(int D, int elem_size, int vec, int m_alloc) {
  SmemLayout s{};
  s.ks = D + ((D / vec) % 2 == 0 ? vec : 0);
  const int kv = align16(kKeyTile * s.ks * elem_size);
  const int red = kThreads * vec * 4;  // the PV key-group reduction reuses the K tile after the loop
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

// ---- device helpers shared by both kernels ------------------------------------------------------

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

// ---- the attention kernel -------------------------------------------------------------------------
// grid (B * Hkv, n_qtiles, n_splits), kThreads threads, smem_layout(...).total bytes of dynamic smem.
// T: element type; VEC: elements per access (16 bytes, or 1); HD: head dim (0 = runtime p.head_dim);
// RPT: query rows per warp (the block holds 8 * RPT >= m_tile rows).
template <typename T, int VEC, int HD, int RPT>
__global__ void __launch_bounds__(kThreads) attention_kernel(const Params<T> p) {
  constexpr int M_ALLOC = kWarps * RPT;
  constexpr int UPT = units_per_thread(VEC, HD, RPT);
  extern __shared__ __align__(16) unsigned char smem[];
  pdl_launch_dependents();  // see common.cuh: everything below may depend on the previous kernel
  pdl_wait();
  __shared__ int2 s_red[2];

  const int D = HD > 0 ? HD : p.head_dim;
  const int half = D / 2;
  const SmemLayout L = smem_layout(D, static_cast<int>(sizeof(T)), VEC, M_ALLOC);
  float* Qs = reinterpret_cast<float*>(smem + L.q);
  T* Ks = reinterpret_cast<T*>(smem + L.k);
  T* Vs = reinterpret_cast<T*>(smem + L.v);
  float* Ps = reinterpret_cast<float*>(smem + L.p);
  float* alpha_s = reinterpret_cast<float*>(smem + L.alpha);
  float* m_s = reinterpret_cast<float*>(smem + L.m);
  float* l_s = reinterpret_cast<float*>(smem + L.l);
  int* lo_s = reinterpret_cast<int*>(smem + L.lo);
  int* hi_s = reinterpret_cast<int*>(smem + L.hi);
  const int ks = L.ks;

  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int bh = blockIdx.x, b = bh / p.hkv, kvh = bh - b * p.hkv;
  const int qt = blockIdx.y, z = blockIdx.z;
  const int row0 = qt * p.m_tile;
  const int m_rows = min(p.m_tile, p.rows - row0);  // >= 1 except when Hq == 0 (then 0)
  const int S = p.cache_len, tokens = p.tokens;

  int klo, khi;
  tile_key_range<M_ALLOC>(p.positions, b, tokens, p.group, row0, m_rows, S, p.window, lo_s, hi_s, s_red, klo, khi);

  // p0 clamped to [-T, S]: the same new-key set within [0, S), and s - p0 fits an int.
  const int64_t p0_raw = p.positions[static_cast<int64_t>(b) * tokens];
  const int p0 = static_cast<int>(p0_raw < -tokens ? -tokens : (p0_raw > S ? S : p0_raw));
  const int64_t head_row0 = (static_cast<int64_t>(b) * p.hkv + kvh) * S;  // cache row of key 0
  const int64_t new_stride = static_cast<int64_t>(p.hkv) * D;            // between tokens in k/v
  const int64_t new_off = static_cast<int64_t>(b) * tokens * new_stride + static_cast<int64_t>(kvh) * D;

  // This block's key range, and its first K/V tile in flight (cp.async) before the append below:
  // the tile takes new keys from the k/v inputs, never from the cache rows the append writes.
  int chunk, n_used;
  split_keys(klo, khi, p.n_splits, p.min_chunk, chunk, n_used);
  const int c_lo = klo + z * chunk;
  const int c_hi = min(c_lo + chunk, khi + 1) - 1;
  const int n_tiles = (c_hi - c_lo + kKeyTile) / kKeyTile;
  const T* kcache_head = p.k_cache + head_row0 * D;
  const T* vcache_head = p.v_cache + head_row0 * D;
  if (z < n_used) {
    issue_tile<T, VEC, HD>(Ks, ks, kcache_head, p.k + new_off, new_stride, c_lo, c_hi, p0, tokens, D);
    cp_async_commit();
    issue_tile<T, VEC, HD>(Vs, ks, vcache_head, p.v + new_off, new_stride, c_lo, c_hi, p0, tokens, D);
    cp_async_commit();
  }

  if (z == 0) {
    // Append: new key t' (t' % n_qtiles == qt) to the cache, K rotated at position p0 + t'.
    for (int tn = qt; tn < tokens; tn += p.n_qtiles) {
      const int s = p0 + tn;
      if (s < 0 || s >= S) continue;  // positions outside the cache are not written
      const T* ksrc = p.k + new_off + tn * new_stride;
      const T* vsrc = p.v + new_off + tn * new_stride;
      T* kdst = p.k_cache + (head_row0 + s) * D;
      T* vdst = p.v_cache + (head_row0 + s) * D;
      const float* cs = p.rope_cos + static_cast<int64_t>(s) * D;
      const float* sn = p.rope_sin + static_cast<int64_t>(s) * D;
      for (int j = tid; j < half; j += kThreads) {
        float y1, y2;
        rope_pair<T>(to_float(ksrc[j]), to_float(ksrc[j + half]), cs[j], sn[j], cs[j + half], sn[j + half], y1, y2);
        kdst[j] = from_float<T>(y1);
        kdst[j + half] = from_float<T>(y2);
      }
      for (int e = tid; e < D; e += kThreads) vdst[e] = vsrc[e];
    }
    // Query rows at positions outside the cache get zeros (lo_s/hi_s are visible: synced above).
    for (int idx = tid; idx < m_rows * D; idx += kThreads) {
      const int r = idx / D;
      if (lo_s[r] > hi_s[r]) {
        p.out[out_row(b, tokens, p.hq, kvh, p.group, row0 + r) * D + (idx - r * D)] = from_float<T>(0.f);
      }
    }
  }

  if (z >= n_used) return;  // block-uniform: no barrier is skipped by part of the block

  // Q tile: RoPE at each row's position, rounded to T as the reference, then * scale * log2(e).
  for (int idx = tid; idx < M_ALLOC * half; idx += kThreads) {
    const int r = idx / half, j = idx - r * half;
    float y1 = 0.f, y2 = 0.f;
    if (r < m_rows && lo_s[r] <= hi_s[r]) {
      const int row = row0 + r, t = row / p.group, g = row - t * p.group;
      const T* qr = p.q + ((static_cast<int64_t>(b) * tokens + t) * p.hq + static_cast<int64_t>(kvh) * p.group + g) * D;
      const int64_t pos = hi_s[r];  // hi == position for a valid row
      const float* cs = p.rope_cos + pos * D;
      const float* sn = p.rope_sin + pos * D;
      rope_pair<T>(to_float(qr[j]), to_float(qr[j + half]), cs[j], sn[j], cs[j + half], sn[j + half], y1, y2);
      y1 *= p.qscale;
      y2 *= p.qscale;
    }
    Qs[r * D + j] = y1;
    Qs[r * D + j + half] = y2;
  }

  // Softmax state of this warp's rows (replicated across the lanes).
  float m_i[RPT], l_i[RPT];
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    m_i[i] = -INFINITY;
    l_i[i] = 0.f;
  }

  // PV ownership: column slice c of rows rbase + i * RS; or, with few rows, key group kg.
  const int nd = D / VEC;
  const int RS = kThreads / nd;  // >= 1 since nd <= 256
  int KG = 1;
  if (2 * m_rows <= RS) {
    KG = RS / m_rows;
    KG = KG >= kMaxKeyGroups ? kMaxKeyGroups : (KG >= 8 ? 8 : (KG >= 4 ? 4 : 2));
  }
  const int slot = tid / nd, c = tid - slot * nd;
  const int kg = KG > 1 ? slot / m_rows : 0;
  const int rbase = slot - kg * m_rows;
  const bool pv_active = slot < RS && kg < KG;
  const int kpg = kKeyTile / KG;
  const int jb = kg * kpg;
  float acc[UPT][VEC];
  bool ok_u[UPT];
#pragma unroll
  for (int i = 0; i < UPT; ++i) {
    ok_u[i] = pv_active && (i == 0 || KG == 1) && rbase + i * RS < m_rows;
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[i][e] = 0.f;
  }

  for (int it = 0; it < n_tiles; ++it) {
    const int kb = c_lo + it * kKeyTile;
    cp_async_wait<1>();  // this tile's K has landed (its V may still be in flight)
    __syncthreads();     // ... for every thread; also publishes Qs (first tile)

    // New keys in this tile: apply RoPE in place (one thread per rotation pair: no race).
    {
      const int nlo = max(kb, p0);
      const int nhi = min(min(kb + kKeyTile - 1, c_hi), p0 + tokens - 1);
      if (nlo <= nhi) {
        const int cnt = (nhi - nlo + 1) * half;
        for (int idx = tid; idx < cnt; idx += kThreads) {
          const int jr = idx / half, j = idx - jr * half;
          const int s = nlo + jr;
          T* krow = Ks + (s - kb) * ks;
          const float* cs = p.rope_cos + static_cast<int64_t>(s) * D;
          const float* sn = p.rope_sin + static_cast<int64_t>(s) * D;
          float y1, y2;
          rope_pair<T>(to_float(krow[j]), to_float(krow[j + half]), cs[j], sn[j], cs[j + half], sn[j + half], y1, y2);
          krow[j] = from_float<T>(y1);
          krow[j + half] = from_float<T>(y2);
        }
        __syncthreads();
      }
    }

    // Scores: rows warp + 8 i, keys lane and lane + 32. A warp without real rows (warp >= m_rows:
    // all its rows are padding) skips the phase: nothing reads P or alpha of padding rows.
    if (warp < m_rows) {
      float sc[RPT][2];
#pragma unroll
      for (int i = 0; i < RPT; ++i) sc[i][0] = sc[i][1] = 0.f;
      const T* k0 = Ks + lane * ks;
      const T* k1 = Ks + (lane + kWarpSize) * ks;
#pragma unroll(HD > 0 ? HD / VEC : 2)
      for (int d = 0; d < D; d += VEC) {
        float kf0[VEC], kf1[VEC];
        load_as_float<T, VEC>(k0 + d, kf0);
        load_as_float<T, VEC>(k1 + d, kf1);
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
          float qf[VEC];
          load_floats<VEC>(Qs + (warp + kWarps * i) * D + d, qf);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            sc[i][0] = fmaf(qf[e], kf0[e], sc[i][0]);
            sc[i][1] = fmaf(qf[e], kf1[e], sc[i][1]);
          }
        }
      }
      const int s0 = kb + lane, s1 = kb + lane + kWarpSize;
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
        const int r = warp + kWarps * i;
        const int lo = lo_s[r], hi = min(hi_s[r], c_hi);
        const float x0 = (s0 >= lo && s0 <= hi) ? sc[i][0] : -INFINITY;
        const float x1 = (s1 >= lo && s1 <= hi) ? sc[i][1] : -INFINITY;
        const float m_new = fmaxf(m_i[i], warp_max(fmaxf(x0, x1)));
        const float m_ref = m_new == -INFINITY ? 0.f : m_new;  // all masked so far: keep exp2 finite
        const float e0 = exp2f(x0 - m_ref), e1 = exp2f(x1 - m_ref);
        const float alpha = exp2f(m_i[i] - m_ref);
        l_i[i] = l_i[i] * alpha + warp_sum(e0 + e1);
        m_i[i] = m_new;
        Ps[r * kPStride + lane] = e0;
        Ps[r * kPStride + lane + kWarpSize] = e1;
        if (lane == 0) alpha_s[r] = alpha;
      }
    }
    __syncthreads();  // P and alpha published; every thread is done with Ks

    if (it + 1 < n_tiles) {
      issue_tile<T, VEC, HD>(Ks, ks, kcache_head, p.k + new_off, new_stride, kb + kKeyTile, c_hi, p0, tokens, D);
    }
    cp_async_commit();   // (possibly empty) group: keeps the wait counts below uniform
    cp_async_wait<1>();  // everything but that newest group: this tile's V has landed
    __syncthreads();

    // O = O * alpha + P V over this thread's key group.
#pragma unroll
    for (int i = 0; i < UPT; ++i) {
      if (!ok_u[i]) continue;
      const float a = alpha_s[rbase + i * RS];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[i][e] *= a;
    }
    if (pv_active) {
#pragma unroll 2
      for (int j = jb; j < jb + kpg; j += 4) {
#pragma unroll
        for (int i = 0; i < UPT; ++i) {
          if (!ok_u[i]) continue;
          const float4 pj = *reinterpret_cast<const float4*>(Ps + (rbase + i * RS) * kPStride + j);
          const float pw[4] = {pj.x, pj.y, pj.z, pj.w};
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) {
            float vf[VEC];
            load_as_float<T, VEC>(Vs + (j + jj) * ks + c * VEC, vf);
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[i][e] = fmaf(pw[jj], vf[e], acc[i][e]);
          }
        }
      }
    }
    __syncthreads();  // every thread is done with Vs, Ps, alpha_s

    if (it + 1 < n_tiles) {
      issue_tile<T, VEC, HD>(Vs, ks, vcache_head, p.v + new_off, new_stride, kb + kKeyTile, c_hi, p0, tokens, D);
    }
    cp_async_commit();
  }
  cp_async_wait<0>();  // only empty groups can remain; keeps the block's async state clean

  // Epilogue. The K tile is free (no copy is pending into it): reuse it for the key-group sums.
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      m_s[warp + kWarps * i] = m_i[i];
      l_s[warp + kWarps * i] = l_i[i];
    }
  }
  float* red = reinterpret_cast<float*>(smem + L.k);  // [KG][m_rows][nd][VEC] floats <= kThreads * VEC
  if (KG > 1 && pv_active && kg > 0) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) red[((kg * m_rows + rbase) * nd + c) * VEC + e] = acc[0][e];
  }
  __syncthreads();

  const int64_t tile = static_cast<int64_t>(bh) * p.n_qtiles + qt;
  const int64_t part_row0 = (tile * p.n_splits + z) * p.m_tile;  // partial row of tile row 0
  if (n_used > 1 && tid < m_rows) {
    p.part_ml[(part_row0 + tid) * 2] = m_s[tid];
    p.part_ml[(part_row0 + tid) * 2 + 1] = l_s[tid];
  }
  if (KG > 1) {
    if (!pv_active || kg != 0) return;  // no barrier follows
    for (int g2 = 1; g2 < KG; ++g2) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[0][e] += red[((g2 * m_rows + rbase) * nd + c) * VEC + e];
    }
  }
#pragma unroll
  for (int i = 0; i < UPT; ++i) {
    if (!ok_u[i]) continue;
    const int r = rbase + i * RS;
    if (n_used == 1) {
      if (lo_s[r] > hi_s[r]) continue;  // zeroed by the append phase
      const float inv = 1.f / l_s[r];
      Vec<T, VEC> o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) o.v[e] = from_float<T>(acc[i][e] * inv);
      o.store(p.out + out_row(b, tokens, p.hq, kvh, p.group, row0 + r) * D + c * VEC);
    } else {
      store_floats<VEC>(p.part_acc + (part_row0 + r) * D + c * VEC, acc[i]);
    }
  }
}

// ---- the combine kernel (only when n_splits > 1) ------------------------------------------------
// grid (B * Hkv, n_qtiles), kThreads threads, m_tile * n_splits * 4 bytes of dynamic smem (weights).
// out = sum_z 2^(m_z - M) acc_z / sum_z 2^(m_z - M) l_z over the splits the tile used.
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(const Params<T> p) {
  extern __shared__ float wsm[];  // [m_tile][n_splits]
  __shared__ int lo_s[kMaxTileRows], hi_s[kMaxTileRows];
  __shared__ float inv_den[kMaxTileRows];
  pdl_launch_dependents();
  pdl_wait();
  __shared__ int2 s_red[2];

  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int bh = blockIdx.x, b = bh / p.hkv, kvh = bh - b * p.hkv;
  const int qt = blockIdx.y;
  const int row0 = qt * p.m_tile;
  const int m_rows = min(p.m_tile, p.rows - row0);
  const int D = p.head_dim, S = p.cache_len;

  int klo, khi;
  tile_key_range<kMaxTileRows>(p.positions, b, p.tokens, p.group, row0, m_rows, S, p.window, lo_s, hi_s, s_red, klo,
                               khi);
  int chunk, n_used;
  split_keys(klo, khi, p.n_splits, p.min_chunk, chunk, n_used);
  if (n_used <= 1) return;  // the attention kernel wrote this tile's output (or there is none)

  const int64_t tile = static_cast<int64_t>(bh) * p.n_qtiles + qt;
  const int64_t split_stride = p.m_tile;  // partial rows between splits
  const float* ml = p.part_ml + tile * p.n_splits * split_stride * 2;
  const float* acc = p.part_acc + tile * p.n_splits * split_stride * D;

  for (int r = warp; r < m_rows; r += kWarps) {
    if (lo_s[r] > hi_s[r]) continue;  // warp-uniform
    float M = -INFINITY;
    for (int zz = lane; zz < n_used; zz += kWarpSize) M = fmaxf(M, ml[(zz * split_stride + r) * 2]);
    M = warp_max(M);
    const float m_ref = M == -INFINITY ? 0.f : M;
    float den = 0.f;
    for (int zz = lane; zz < n_used; zz += kWarpSize) {
      const float w = exp2f(ml[(zz * split_stride + r) * 2] - m_ref);
      wsm[r * p.n_splits + zz] = w;
      den += w * ml[(zz * split_stride + r) * 2 + 1];
    }
    den = warp_sum(den);
    if (lane == 0) inv_den[r] = 1.f / den;
  }
  __syncthreads();

  const int half = D / 2;  // column pairs: D is even, so float2 reads of the partials are aligned
  for (int u = tid; u < m_rows * half; u += kThreads) {
    const int r = u / half, cp = u - r * half;
    if (lo_s[r] > hi_s[r]) continue;
    const float* src = acc + static_cast<int64_t>(r) * D + 2 * cp;
    const float* w = wsm + r * p.n_splits;
    float a0 = 0.f, a1 = 0.f;
#pragma unroll 4
    for (int zz = 0; zz < n_used; ++zz) {
      const float2 x = *reinterpret_cast<const float2*>(src + zz * split_stride * D);
      a0 = fmaf(w[zz], x.x, a0);
      a1 = fmaf(w[zz], x.y, a1);
    }
    const float inv = inv_den[r];
    T* dst = p.out + out_row(b, p.tokens, p.hq, kvh, p.group, row0 + r) * D + 2 * cp;
    dst[0] = from_float<T>(a0 * inv);
    dst[1] = from_float<T>(a1 * inv);
  }
}

// ---- host side ----------------------------------------------------------------------------------

struct Plan {
  int vec;      // elements per access: 16 bytes' worth, or 1
  int hd;       // compile-time head dim (64, 128) or 0
  int rpt;      // rows per warp: 1, 2, 4, 8
  int m_tile, n_qtiles, n_splits, min_chunk;
  int smem_bytes, combine_smem_bytes;
};

// vec16: the head dim and every K/V pointer allow 16-byte accesses. num_sms: the device's SM count.
inline Plan plan(int batch, int tokens, int hkv, int group, int head_dim, int cache_len, int elem_size, bool vec16,
                 int num_sms) {
  Plan pl{};
  pl.vec = vec16 ? 16 / elem_size : 1;
  pl.hd = (vec16 && (head_dim == 64 || head_dim == 128)) ? head_dim : 0;
  const int64_t rows = static_cast<int64_t>(tokens) * group;
  // Q (fp32) + K + V + P must fit: 64 rows up to D = 128, fewer beyond (fp32 K/V tiles are large).
  const int m_cap = head_dim <= 128 ? kMaxTileRows : (elem_size == 4 ? 16 : 32);
  pl.m_tile = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, m_cap)));
  pl.rpt = pl.m_tile <= 8 ? 1 : (pl.m_tile <= 16 ? 2 : (pl.m_tile <= 32 ? 4 : 8));
  pl.n_qtiles = static_cast<int>(std::max<int64_t>(1, ceil_div(rows, pl.m_tile)));
  // A split reads at least ~2 keys per query row it carries, so the partials (rows * D floats per
  // split) stay small next to the K/V bytes (2 * keys * D elements). (4 keys per row gave a verify
  // step's 21-row tiles two key tiles per split: 26 us vs 9.5 us for one row at 1,024 keys, H200.)
  pl.min_chunk = static_cast<int>(ceil_div(std::max(kKeyTile, 2 * pl.m_tile), kKeyTile) * kKeyTile);
  const int64_t base_blocks = static_cast<int64_t>(batch) * hkv * pl.n_qtiles;
  const int64_t want = ceil_div(2 * static_cast<int64_t>(num_sms), base_blocks);  // ~2 resident blocks per SM
  const int64_t useful = ceil_div(cache_len, pl.min_chunk);
  const int64_t smem_cap = 12288 / pl.m_tile;  // combine weights m_tile * n_splits floats <= 48 KB
  pl.n_splits = static_cast<int>(
      std::max<int64_t>(1, std::min({want, useful, smem_cap, static_cast<int64_t>(kMaxSplits)})));
  pl.smem_bytes = smem_layout(head_dim, elem_size, pl.vec, kWarps * pl.rpt).total;
  pl.combine_smem_bytes = pl.m_tile * pl.n_splits * 4;
  return pl;
}

template <typename T, int VEC, int HD, int RPT>
cudaError_t launch_with(const Params<T>& p, const Plan& pl, cudaStream_t stream) {
  constexpr auto kernel = attention_kernel<T, VEC, HD, RPT>;
  const cudaError_t serr = ensure_dynamic_smem<kernel>(pl.smem_bytes);
  if (serr != cudaSuccess) return serr;
  const dim3 grid(static_cast<unsigned>(p.batch * p.hkv), static_cast<unsigned>(pl.n_qtiles),
                  static_cast<unsigned>(pl.n_splits));
  cudaError_t err = launch_pdl(kernel, grid, dim3(kThreads), static_cast<size_t>(pl.smem_bytes), stream, p);
  if (err != cudaSuccess || pl.n_splits == 1) return err;
  return launch_pdl(combine_kernel<T>, dim3(grid.x, grid.y), dim3(kThreads),
                    static_cast<size_t>(pl.combine_smem_bytes), stream, p);
}

template <typename T, int VEC, int HD>
cudaError_t launch_rpt(const Params<T>& p, const Plan& pl, cudaStream_t stream) {
  switch (pl.rpt) {
    case 1: return launch_with<T, VEC, HD, 1>(p, pl, stream);
    case 2: return launch_with<T, VEC, HD, 2>(p, pl, stream);
    case 4: return launch_with<T, VEC, HD, 4>(p, pl, stream);
    default: return launch_with<T, VEC, HD, 8>(p, pl, stream);
  }
}

// Launches on `stream` (1 or 2 kernels, see the top of this file) and returns the launch status.
// p's plan fields (m_tile, n_qtiles, n_splits, min_chunk) must come from `pl`; part_acc/part_ml must
// hold B*Hkv*n_qtiles*n_splits*m_tile*(D and 2) floats when pl.n_splits > 1.
template <typename T>
cudaError_t launch(const Params<T>& p, const Plan& pl, cudaStream_t stream) {
  constexpr int V16 = kVec16<T>;
  if (pl.vec == 1) return launch_rpt<T, 1, 0>(p, pl, stream);
  if (pl.hd == 64) return launch_rpt<T, V16, 64>(p, pl, stream);
  if (pl.hd == 128) return launch_rpt<T, V16, 128>(p, pl, stream);
  return launch_rpt<T, V16, 0>(p, pl, stream);
}

}  // namespace attention
}  // namespace kangaroo
