// Warp-chunk attention: the same op as attention.cuh (RoPE + KV-cache append + causal attention over the static
// cache, kangaroo_ext/ops/reference.py: rope_append_attention), torch-free, for decode and verify sizes in 16-bit
// dtypes (head dim 64 or 128, at most max_rows(HD) query rows per kv head), cut for latency instead of tiles.
//
// Why another kernel. attention.cuh's block walks 64-key tiles with its 8 warps in lock step (block barriers
// around every QK^T, softmax and PV phase); at decode sizes (3 query rows per kv head) most warps wait at those
// barriers, and a block's chain of ~700 dependent instructions made the op ~9.6 us at 1,024 keys on an H100
// (ncu: 48% of stalls at barriers, one instruction issued every 10.7 cycles), 30 layers of it ~290 us of a 659 us
// plain step. Here a warp owns a 32-key chunk outright: lane = key for QK^T, lane = two (or four) output columns for
// PV, no block barrier inside the key loop, and each warp's next chunk in flight (cp.async) while it computes.
//
// Layout. Keys are cut into chunks of 32 at fixed absolute boundaries: chunk c = keys [32 c, 32 c + 32). A
// (batch row, kv head) is a cluster of kSplits blocks of kWarps warps; chunk c belongs to block z = c % kSplits,
// warp w = (c / kSplits) % kWarps, in round i = c / (kSplits * kWarps) (1,024 keys per round). A warp folds its
// chunks in round order (online softmax, base 2), the block folds its warps' states in warp order, the cluster
// folds the blocks' states in block order through distributed shared memory (attention_tiles.cuh: merge_splits).
//
// Batch invariance, by construction. Which warp reads a key, in which round, and every fold's order depend on the
// key's index alone, never on the tile's rows or its key range; a row's scores and PV sums are the same
// instructions whatever the row count (explicit fmaf, d and key order fixed). A chunk, warp or block in which a
// row sees no key changes that row's state by exactly nothing (alpha 1, p 0, weight 0). So a verified row (a
// position p inside a T-token launch) is bitwise the row the decode step at p computes, at any context length,
// and the bits do not depend on the cache capacity S either.
//
// New keys (positions p0 .. p0 + T - 1, p0 = positions[b, 0]) are built by every block from the k/v inputs (K
// rotated, rounded to T, exactly as the cache will hold them) into shared memory, from which staging copies them
// into a chunk's rows (the first GPU run, 15ee133, patched them in after the chunk's wait instead, and read stale
// rows when a chunk was nearly all cache rows: BENCHMARKS.md); block 0 of the cluster writes them to the cache.
// No block reads a cache row this launch writes, as in attention.cuh. Keys outside the rows' visible union (and
// outside [0, S)) are zero-filled, never loaded, so P = 0 never meets unwritten cache rows.
//
// Bytes per call: K, V of the keys in [lowest visible, highest position] once (2 * B * Hkv * ctx * D * sz),
// q, the new k/v rows, 2 RoPE rows per query row and new key; writes the new cache rows and out.
#pragma once

#include <climits>

#include "attention_tiles.cuh"
#include "common.cuh"

namespace kangaroo {
namespace warp_chunk {

constexpr int kChunk = kWarpSize;                 // keys per chunk: one per lane
constexpr int kWarps = 4;                         // warps per block
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kSplits = attention::kMaxSplits;    // blocks per (batch row, kv head): one cluster
constexpr int kRoundKeys = kChunk * kWarps * kSplits;
static_assert(kSplits == 8, "the cluster merge reuses attention::merge_splits, sized kMaxSplits");

// Query rows (T * G) one launch may have per kv head: the per-lane accumulators are rows * HD / 32 floats.
__host__ __device__ constexpr inline int max_rows(int head_dim) { return head_dim == 64 ? 32 : 16; }

// Row capacity of the instantiation a launch with `rows` query rows per kv head uses (4, 8, 16, 24 or 32; 24: a
// verify step of 7 tokens at G = 3 without the 32-row instantiation's register spills).
__host__ __device__ constexpr inline int row_capacity(int rows) {
  return rows <= 4 ? 4 : (rows <= 8 ? 8 : (rows <= 16 ? 16 : (rows <= 24 ? 24 : 32)));
}

// Shared memory (byte offsets, 16-byte aligned), for RM query rows and head dim HD of a 2-byte element type.
struct Layout {
  int lo, hi, q, knew, vnew, p, run, stage, warp_state, block_state, total;
  int k_stride;   // elements between staged K rows: HD + 8 (16-byte reads by 8 lanes hit 8 distinct bank groups)
  int stage_bytes;  // one warp's one stage: 32 K rows + 32 V rows
};

using attention::align16;

__host__ __device__ inline Layout layout(int rm, int hd) {
  Layout s{};
  s.k_stride = hd + 8;
  s.stage_bytes = align16(kChunk * s.k_stride * 2) + align16(kChunk * hd * 2);
  int off = 0;
  s.lo = off;          off += align16(rm * 4);
  s.hi = off;          off += align16(rm * 4);
  s.q = off;           off += align16(rm * hd * 4);              // fp32, pre-scaled by scale * log2(e)
  s.knew = off;        off += align16(rm * hd * 2);              // new keys (T <= rows <= rm), rotated
  s.vnew = off;        off += align16(rm * hd * 2);
  s.p = off;           off += kWarps * align16(rm * kChunk * 4);  // per warp: P of its current chunk
  s.run = off;         off += kWarps * align16(2 * rm * 4);      // per warp: running max and sum
  s.stage = off;
  // the warps' final states reuse the staging buffers once every warp is past its key loop
  const int warp_state = kWarps * align16(rm * (hd + 2) * 4);
  const int staging = kWarps * 2 * s.stage_bytes;
  s.warp_state = off;  off += staging > warp_state ? staging : warp_state;
  s.block_state = off; off += align16(rm * (hd + 2) * 4);        // read by the cluster's peers
  s.total = off;
  return s;
}

template <typename T>
using Params = attention::Params<T>;  // the op's parameters; the plan fields (m_tile, splits, ...) are unused

// Stages chunk c's K and V rows into a warp's buffers (ks: K rows, vs: V rows): new keys (positions p0 .. p0 + T
// - 1 inside [0, S)) from the block's rotated K and raw V rows in shared memory (knew, vnew: published before the
// first call), cache rows in [load_lo, load_hi] by cp.async, zeros for the rest. Every staged row is written by
// exactly one of the three, before the cp_async_wait that precedes the chunk's fold: no row is patched after it.
template <typename T, int HD>
__device__ __forceinline__ void stage_chunk(T* ks, T* vs, int k_stride, const T* __restrict__ kcache_head,
                                            const T* __restrict__ vcache_head, const T* knew, const T* vnew, int c,
                                            int load_lo, int load_hi, int p0, int tokens, int S, int lane) {
  constexpr int kPieces = HD / 8;  // 16-byte pieces per row
  for (int idx = lane; idx < kChunk * kPieces; idx += kWarpSize) {
    const int j = idx / kPieces, piece = idx - j * kPieces;
    const int s = c * kChunk + j;
    T* kdst = ks + j * k_stride + piece * 8;
    T* vdst = vs + j * HD + piece * 8;
    if (s - p0 >= 0 && s - p0 < tokens && s >= 0 && s < S) {  // a new key
      Vec<T, 8> x;
      x.load(knew + (s - p0) * HD + piece * 8);
      x.store(kdst);
      x.load(vnew + (s - p0) * HD + piece * 8);
      x.store(vdst);
    } else if (s < load_lo || s > load_hi) {
      vec_zero<T, 8>().store(kdst);
      vec_zero<T, 8>().store(vdst);
    } else {
      copy_async<T, 8>(kdst, kcache_head + static_cast<int64_t>(s) * HD + piece * 8);
      copy_async<T, 8>(vdst, vcache_head + static_cast<int64_t>(s) * HD + piece * 8);
    }
  }
}

// One chunk folded into a warp's running state (run: [RM] max, [RM] sum, in shared memory, written by lane 0):
// scores of every row against the lane's key, each row's chunk max and sum (butterfly shuffles: every lane gets
// the same bits; rows side by side for the shuffles' latency), P to shared memory, then acc = acc * alpha +
// sum_j P[r][j] V[j] over the lane's DPL columns, keys in order.
template <typename T, int HD, int RM>
__device__ __forceinline__ void fold_chunk(const T* ks, const T* vs, int k_stride, const float* Qs, const int* lo_s,
                                           const int* hi_s, float* Pw, float* run, int c, int lane,
                                           float (&acc)[RM][HD / kWarpSize]) {
  constexpr int DPL = HD / kWarpSize;
  float sc[RM];
#pragma unroll
  for (int r = 0; r < RM; ++r) sc[r] = 0.f;
  const T* krow = ks + lane * k_stride;
#pragma unroll
  for (int d = 0; d < HD; d += 8) {
    float kf[8];
    load_as_float<T, 8>(krow + d, kf);
#pragma unroll
    for (int r = 0; r < RM; ++r) {
      float qf[8];
      load_floats<8>(Qs + r * HD + d, qf);
#pragma unroll
      for (int e = 0; e < 8; ++e) sc[r] = fmaf(qf[e], kf[e], sc[r]);
    }
  }
  const int s = c * kChunk + lane;
  float mx[RM], alpha[RM];
#pragma unroll
  for (int r = 0; r < RM; ++r) {
    sc[r] = (s >= lo_s[r] && s <= hi_s[r]) ? sc[r] : -INFINITY;
    mx[r] = warp_max(sc[r]);
  }
#pragma unroll
  for (int r = 0; r < RM; ++r) {
    const float m_old = run[r];
    const float m_new = fmaxf(m_old, mx[r]);
    const float m_ref = m_new == -INFINITY ? 0.f : m_new;  // nothing seen yet: keep exp2 finite
    sc[r] = exp2f(sc[r] - m_ref);                            // P (0 for masked keys)
    // a chunk that does not raise the max leaves the state's scale exactly as it was (1, not exp2f(0))
    alpha[r] = m_new == m_old ? 1.f : exp2f(m_old - m_ref);
    mx[r] = m_new;
    Pw[r * kChunk + lane] = sc[r];
  }
#pragma unroll
  for (int r = 0; r < RM; ++r) sc[r] = warp_sum(sc[r]);
  __syncwarp();  // P published; every lane has read run[] before lane 0 moves it
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < RM; ++r) {
      run[r] = mx[r];
      run[RM + r] = fmaf(run[RM + r], alpha[r], sc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < RM; ++r) {
#pragma unroll
    for (int e = 0; e < DPL; ++e) acc[r][e] *= alpha[r];
  }
#pragma unroll 2
  for (int j = 0; j < kChunk; j += 4) {
    float vf[4][DPL];
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) load_as_float<T, DPL>(vs + (j + jj) * HD + lane * DPL, vf[jj]);
#pragma unroll
    for (int r = 0; r < RM; ++r) {
      const float4 pj = *reinterpret_cast<const float4*>(Pw + r * kChunk + j);
      const float pw[4] = {pj.x, pj.y, pj.z, pj.w};
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
#pragma unroll
        for (int e = 0; e < DPL; ++e) acc[r][e] = fmaf(pw[jj], vf[jj][e], acc[r][e]);
      }
    }
  }
  __syncwarp();  // every lane is done with P, run[] and the staged rows before they change
}

// Folds n states (m_i, l_i, o_i), i in order, into one: M = max m_i, w_i = 2^(m_i - M), L = sum w_i l_i,
// O = sum w_i o_i (DPL columns). A state with m = -inf weighs exactly 0.
template <int N, int C>
__device__ __forceinline__ void fold_states(const float (&m)[N], const float (&l)[N], const float (&o)[N][C],
                                            float& M, float& L, float (&O)[C]) {
  M = -INFINITY;
#pragma unroll
  for (int i = 0; i < N; ++i) M = fmaxf(M, m[i]);
  const float m_ref = M == -INFINITY ? 0.f : M;
  L = 0.f;
#pragma unroll
  for (int e = 0; e < C; ++e) O[e] = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float w = exp2f(m[i] - m_ref);
    L = fmaf(w, l[i], L);
#pragma unroll
    for (int e = 0; e < C; ++e) O[e] = fmaf(w, o[i][e], O[e]);
  }
}

// The kernel: grid (B * Hkv, 1, kSplits), clusters of the kSplits blocks of one (batch row, kv head).
// RM >= p.rows (row_capacity); HD = p.head_dim (64 or 128); T a 2-byte type.
template <typename T, int HD, int RM>
__global__ void __launch_bounds__(kThreads) warp_chunk_attention_kernel(const Params<T> p) {
  static_assert(sizeof(T) == 2 && (HD == 64 || HD == 128) && RM <= max_rows(HD), "unsupported instantiation");
  constexpr int DPL = HD / kWarpSize;
  constexpr int half = HD / 2;
  extern __shared__ __align__(16) unsigned char smem[];
  pdl_launch_dependents();  // see common.cuh: everything below may depend on the previous kernel
  pdl_wait();
  const Layout L = layout(RM, HD);
  int* lo_s = reinterpret_cast<int*>(smem + L.lo);
  int* hi_s = reinterpret_cast<int*>(smem + L.hi);
  float* Qs = reinterpret_cast<float*>(smem + L.q);
  T* knew = reinterpret_cast<T*>(smem + L.knew);
  T* vnew = reinterpret_cast<T*>(smem + L.vnew);
  __shared__ int2 s_union;

  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int bh = blockIdx.x, z = blockIdx.z;
  const int b = bh / p.hkv, kvh = bh - b * p.hkv;
  const int S = p.cache_len, tokens = p.tokens, rows = p.rows;

  // p0 clamped to [-T, S]: the same new-key set within [0, S) (attention.cuh)
  const int64_t p0_raw = p.positions[static_cast<int64_t>(b) * tokens];
  const int p0 = static_cast<int>(p0_raw < -tokens ? -tokens : (p0_raw > S ? S : p0_raw));
  // Each row's visible keys [lo, hi] (empty (1, 0): position outside [0, S), or a padding row) and their union
  // [klo, khi] (klo > khi: no row sees a key); rows <= RM <= 32, so warp 0 alone finds them. Ends in a barrier.
  int klo, khi;
  attention::tile_key_range<RM>(p.positions, b, tokens, p.group, 0, rows, S, p.window, lo_s, hi_s, &s_union, klo,
                                khi);
  const int load_lo = max(klo, 0), load_hi = min(khi, S - 1);

  const int64_t head_row0 = (static_cast<int64_t>(b) * p.hkv + kvh) * S;
  const T* kcache_head = p.k_cache + head_row0 * HD;
  const T* vcache_head = p.v_cache + head_row0 * HD;

  // This warp's chunks c = i * 32 + (w * kSplits + z) for rounds i in [i_first, i_last].
  const int lane_chunk = warp * kSplits + z;
  constexpr int kChunksPerRound = kWarps * kSplits;
  int i_first = 0, i_last = -1;
  if (klo <= khi) {
    const int c_lo = klo / kChunk, c_hi = khi / kChunk;
    i_first = c_lo > lane_chunk ? (c_lo - lane_chunk + kChunksPerRound - 1) / kChunksPerRound : 0;
    i_last = c_hi >= lane_chunk ? (c_hi - lane_chunk) / kChunksPerRound : -1;
  }
  // The warp's two staging buffers (K rows, then V rows), addressed from the shared base rather than kept in a
  // pointer array (which would live in local memory and make every staged access generic).
  T* const stage0 = reinterpret_cast<T*>(smem + L.stage + (warp * 2) * L.stage_bytes);
  const int stage_elems = L.stage_bytes / 2;               // one buffer, in elements
  const int v_off = align16(kChunk * L.k_stride * 2) / 2;  // V rows after K rows, in elements

  // Prologue: Q rotated and pre-scaled (padding rows zero), the new keys rotated and values copied; block 0 of
  // the cluster writes them to the cache.
  const int64_t new_stride = static_cast<int64_t>(p.hkv) * HD;
  const int64_t new_off = static_cast<int64_t>(b) * tokens * new_stride + static_cast<int64_t>(kvh) * HD;
  for (int idx = tid; idx < RM * half; idx += kThreads) {
    const int r = idx / half, j = idx - r * half;
    float y1 = 0.f, y2 = 0.f;
    if (r < rows && lo_s[r] <= hi_s[r]) {
      const int t = r / p.group, g = r - t * p.group;
      const T* src = p.q + ((static_cast<int64_t>(b) * tokens + t) * p.hq + static_cast<int64_t>(kvh) * p.group + g) * HD;
      const int64_t pos = hi_s[r];
      attention::rope_pair<T>(to_float(src[j]), to_float(src[j + half]), p.rope_cos[pos * HD + j],
                              p.rope_sin[pos * HD + j], p.rope_cos[pos * HD + j + half], p.rope_sin[pos * HD + j + half],
                              y1, y2);
      y1 *= p.qscale;
      y2 *= p.qscale;
    }
    Qs[r * HD + j] = y1;
    Qs[r * HD + j + half] = y2;
  }
  for (int idx = tid; idx < tokens * half; idx += kThreads) {
    const int t = idx / half, j = idx - t * half;
    const int s = p0 + t;
    if (s < 0 || s >= S) continue;  // positions outside the cache are neither written nor visible
    const T* ksrc = p.k + new_off + t * new_stride;
    const T* vsrc = p.v + new_off + t * new_stride;
    float y1, y2;
    attention::rope_pair<T>(to_float(ksrc[j]), to_float(ksrc[j + half]), p.rope_cos[int64_t{s} * HD + j],
                            p.rope_sin[int64_t{s} * HD + j], p.rope_cos[int64_t{s} * HD + j + half],
                            p.rope_sin[int64_t{s} * HD + j + half], y1, y2);
    const T k1 = from_float<T>(y1), k2 = from_float<T>(y2), v1 = vsrc[j], v2 = vsrc[j + half];
    knew[t * HD + j] = k1;
    knew[t * HD + j + half] = k2;
    vnew[t * HD + j] = v1;
    vnew[t * HD + j + half] = v2;
    if (z == 0) {
      T* kdst = p.k_cache + (head_row0 + s) * HD;
      T* vdst = p.v_cache + (head_row0 + s) * HD;
      kdst[j] = k1;
      kdst[j + half] = k2;
      vdst[j] = v1;
      vdst[j + half] = v2;
    }
  }
  float* Pw = reinterpret_cast<float*>(smem + L.p + warp * align16(RM * kChunk * 4));
  float* run = reinterpret_cast<float*>(smem + L.run + warp * align16(2 * RM * 4));
  if (lane < RM) {
    run[lane] = -INFINITY;  // running max
    run[RM + lane] = 0.f;   // running sum
  }
  __syncthreads();  // Q, the new keys and the row ranges published

  // The key loop: no block barrier; the next chunk is staged while this one is folded. The first chunk is staged
  // here, after the new keys are in shared memory, so staging writes every row of a chunk (new keys included)
  // before the wait that precedes its fold.
  if (i_first <= i_last) {
    stage_chunk<T, HD>(stage0, stage0 + v_off, L.k_stride, kcache_head, vcache_head, knew, vnew,
                       i_first * kChunksPerRound + lane_chunk, load_lo, load_hi, p0, tokens, S, lane);
  }
  cp_async_commit();
  float acc[RM][DPL];
#pragma unroll
  for (int r = 0; r < RM; ++r) {
#pragma unroll
    for (int e = 0; e < DPL; ++e) acc[r][e] = 0.f;
  }
  for (int i = i_first, k = 0; i <= i_last; ++i, k ^= 1) {
    T* const cur = stage0 + k * stage_elems;
    if (i < i_last) {
      T* const next = stage0 + (k ^ 1) * stage_elems;
      stage_chunk<T, HD>(next, next + v_off, L.k_stride, kcache_head, vcache_head, knew, vnew,
                         (i + 1) * kChunksPerRound + lane_chunk, load_lo, load_hi, p0, tokens, S, lane);
    }
    cp_async_commit();
    cp_async_wait<1>();  // this chunk's group has landed (the next one may still be in flight)
    __syncwarp();  // every lane's copies and stores of this chunk visible to the whole warp
    const int c = i * kChunksPerRound + lane_chunk;
    fold_chunk<T, HD, RM>(cur, cur + v_off, L.k_stride, Qs, lo_s, hi_s, Pw, run, c, lane, acc);
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is past its key loop: the staging buffers become the warps' states

  // Warp states -> shared memory, then the block's state: warps folded in order.
  float* ws = reinterpret_cast<float*>(smem + L.warp_state) + warp * (align16(RM * (HD + 2) * 4) / 4);
#pragma unroll
  for (int r = 0; r < RM; ++r) {
#pragma unroll
    for (int e = 0; e < DPL; ++e) ws[r * HD + lane * DPL + e] = acc[r][e];
  }
  if (lane < RM) {
    ws[RM * HD + lane] = run[lane];
    ws[RM * HD + RM + lane] = run[RM + lane];
  }
  __syncthreads();
  float* bs = reinterpret_cast<float*>(smem + L.block_state);  // [RM][HD] o, then [RM] m, [RM] l
  const int warp_floats = align16(RM * (HD + 2) * 4) / 4;
  const float* ws0 = reinterpret_cast<const float*>(smem + L.warp_state);
  for (int u = tid; u < rows * half; u += kThreads) {
    const int r = u / half, col = 2 * (u - r * half);
    float m[kWarps], l[kWarps], o[kWarps][2];
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float* st = ws0 + w * warp_floats;
      m[w] = st[RM * HD + r];
      l[w] = st[RM * HD + RM + r];
      o[w][0] = st[r * HD + col];
      o[w][1] = st[r * HD + col + 1];
    }
    float M, Lsum, O[2];
    fold_states<kWarps, 2>(m, l, o, M, Lsum, O);
    bs[r * HD + col] = O[0];
    bs[r * HD + col + 1] = O[1];
    if (col == 0) {
      bs[RM * HD + r] = M;
      bs[RM * HD + RM + r] = Lsum;
    }
  }

  // The cluster's merge: block z writes output pairs z, z + kSplits, ... from every block's state, in block order.
  cluster_barrier();
  for (int u = z * kThreads + tid; u < rows * half; u += kSplits * kThreads) {
    const int r = u / half, col = 2 * (u - r * half);
    T* dst = p.out + attention::out_row(b, tokens, p.hq, kvh, p.group, r) * HD + col;
    if (lo_s[r] > hi_s[r]) {  // no visible key: zeros
      dst[0] = from_float<T>(0.f);
      dst[1] = from_float<T>(0.f);
      continue;
    }
    float mz[kSplits], lz[kSplits];
    float2 oz[kSplits];
#pragma unroll
    for (int zz = 0; zz < kSplits; ++zz) {
      mz[zz] = *cluster_peer(bs + RM * HD + r, zz);
      lz[zz] = *cluster_peer(bs + RM * HD + RM + r, zz);
      oz[zz] = *reinterpret_cast<const float2*>(cluster_peer(bs + r * HD + col, zz));
    }
    attention::merge_splits<T>(kSplits, mz, lz, oz, [&] { return dst; });
  }
  cluster_barrier();  // no block exits (freeing its shared memory) while a peer may still read it
}

// ---- host side ----------------------------------------------------------------------------------

// Why this kernel cannot run a launch ("" if it can): elem_size in bytes; vec16: 16-byte aligned q, k, v, caches
// and RoPE tables (attention.cu's test); rows = T * G; clusters: attention::clusters_usable().
inline const char* unsupported(int elem_size, bool vec16, int head_dim, int64_t rows, bool clusters, int max_smem) {
  if (elem_size != 2) return "warp-chunk attention takes float16 and bfloat16 only";
  if (head_dim != 64 && head_dim != 128) return "warp-chunk attention takes head dim 64 or 128 only";
  if (!vec16) return "warp-chunk attention needs 16-byte aligned q, k, v, caches and RoPE tables";
  if (rows > max_rows(head_dim)) return "warp-chunk attention takes at most 32 (head dim 64) or 16 (128) query rows";
  if (!clusters) return "warp-chunk attention needs thread-block clusters (sm_90+)";
  if (layout(row_capacity(static_cast<int>(rows)), head_dim).total + 1024 > max_smem) {
    return "warp-chunk attention's shared memory does not fit the device";
  }
  return "";
}

template <typename T, int HD, int RM>
cudaError_t launch_rm(const Params<T>& p, Launch stream) {
  constexpr auto kernel = warp_chunk_attention_kernel<T, HD, RM>;
  const int smem = layout(RM, HD).total;
  const cudaError_t serr = ensure_dynamic_smem<kernel>(smem);
  if (serr != cudaSuccess) return serr;
  const dim3 grid(static_cast<unsigned>(p.batch * p.hkv), 1, kSplits);
  return launch_pdl_cluster(kernel, grid, dim3(kThreads), static_cast<size_t>(smem), stream, dim3(1, 1, kSplits), p);
}

// Launches on `stream`; the caller checked unsupported(...) == "" and filled p's op fields (rows = T * G).
template <typename T>
cudaError_t launch(const Params<T>& p, Launch stream) {
  if constexpr (sizeof(T) == 2) {
    const int rm = row_capacity(p.rows);
    if (p.head_dim == 64) {
      switch (rm) {
        case 4: return launch_rm<T, 64, 4>(p, stream);
        case 8: return launch_rm<T, 64, 8>(p, stream);
        case 16: return launch_rm<T, 64, 16>(p, stream);
        case 24: return launch_rm<T, 64, 24>(p, stream);
        default: return launch_rm<T, 64, 32>(p, stream);
      }
    }
    switch (rm) {
      case 4: return launch_rm<T, 128, 4>(p, stream);
      case 8: return launch_rm<T, 128, 8>(p, stream);
      default: return launch_rm<T, 128, 16>(p, stream);
    }
  }
  return cudaErrorInvalidValue;
}

}  // namespace warp_chunk
}  // namespace kangaroo
