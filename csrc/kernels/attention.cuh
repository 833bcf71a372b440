// RoPE + KV-cache append + causal attention over the static cache, for decode and verification
// (kangaroo_ext/ops/reference.py: rope_append_attention), torch-free.
//
// One launch (programmatic dependent launch, common.cuh). A (batch row, kv head, q-tile)'s keys may be
// cut into up to kMaxSplits splits, one block each; the splits of a tile form one thread-block cluster
// (sm_90) and merge their partial softmax states through distributed shared memory, so no partial
// result goes to global memory and no second kernel is needed. (It used to be a second "combine"
// launch: 1.6 us of a plain step's ~22 us per layer on an H200, plus its launch gap.) Before sm_90
// there are no clusters and a tile is one block. The host cannot see the context length (positions
// live on the device), so the split count is a maximum sized from the cache capacity S; every block
// derives the actual key range from `positions`, and a tile whose keys fit one split writes its output
// from that block without touching the cluster.
//
// Bytes per call (sz = element size, ctx = keys in a row's [lowest visible, highest position]):
//   reads   K, V: 2 * B * Hkv * ctx * D * sz        (once per q-tile; one q-tile when T*G <= 64)
//           q: B*T*Hq*D*sz, k/v inputs for the new keys, 2 RoPE rows (fp32) per query row
//   writes  cache rows: 2 * B*T*Hkv*D*sz, and out (B*T*Hq*D*sz)
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
// Prologue: the append (new K rotated, new V copied) and the Q tile's RoPE share one pass of the
// block's threads for decode and verify sizes, so all their global loads are in flight together
// (per-token loops made a verify step's 7 new keys 7 dependent round trips).
// Merge (more than one split used): each block leaves its rows' (max, sum, unnormalized output) in
// its own shared memory; after a cluster barrier, block z computes output elements z, z + n_splits, ...
// (in units of two columns) from every split's state, read through distributed shared memory; a
// second barrier keeps each block's shared memory alive until its peers have read it.
// Without clusters (a persistent kernel running attention_block<..., GLOBAL_MERGE = true>), the splits' states
// go to a global MergeScratch and attention_merge_global merges them after a grid-wide barrier (attention_tiles.cuh).
#pragma once

#include <atomic>
#include <climits>

#include "attention_tiles.cuh"
#include "common.cuh"

namespace kangaroo {
namespace attention {

// ---- the attention kernel -------------------------------------------------------------------------
// attention_block: the body of the block (bh, qt, z) of the grid (B * Hkv, n_qtiles, n_splits), which
// attention_kernel runs at blockIdx and a persistent kernel may run itself. kThreads threads; smem:
// smem_layout(...).total bytes (16-byte aligned), s_red: 2 int2, both shared memory. Calls one after the
// other in a block need a __syncthreads() between them (a call's last shared-memory reads are unfenced).
// T: element type; VEC: elements per access (16 bytes, or 1); HD: head dim (0 = runtime p.head_dim);
// RPT: query rows per warp (the block holds 8 * RPT >= m_tile rows).
// INV: the batch-invariant PV order (see "Batch invariance" below); the host takes it only for tiles that
// hold every query row of a single q-tile, at most one row slot each, and at most kMaxLocalGroups key
// groups per thread (plan()).
// GLOBAL_MERGE: false merges a tile's splits in its cluster (the n_splits blocks of one (bh, qt); scratch
// unused). true needs no cluster: a split leaves its state in `scratch` (MergeScratch, attention_tiles.cuh)
// and attention_merge_global completes the outputs after a grid-wide barrier; for the kernel's bits, p's
// plan fields and INV must be the kernel's own (the same plan(), clusters included: it sets n_splits).
template <typename T, int VEC, int HD, int RPT, bool INV, bool GLOBAL_MERGE>
__device__ __forceinline__ void attention_block(const Params<T>& p, int bh, int qt, int z, unsigned char* smem,
                                                int2* s_red, const MergeScratch& scratch) {
  constexpr int M_ALLOC = kWarps * RPT;
  constexpr int UPT = units_per_thread(VEC, HD, RPT);
  constexpr int NACC = INV ? kMaxLocalGroups : UPT;  // accumulators: key groups (INV) or row units

  const int D = HD > 0 ? HD : p.head_dim;
  const int half = D / 2;
  const SmemLayout L = smem_layout(D, static_cast<int>(sizeof(T)), VEC, M_ALLOC, INV);
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
  const int b = bh / p.hkv, kvh = bh - b * p.hkv;
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
  const KeySplit mine = split_keys(klo, khi, p.n_splits, p.min_chunk, p.interleaved, z);
  const int n_used = mine.n_used;
  const bool has_keys = z < n_used;  // block-uniform; also uniform over a cluster is n_used itself
  const int64_t tile = static_cast<int64_t>(bh) * p.n_qtiles + qt;  // GLOBAL_MERGE: scratch indices
  const int64_t state0 = (tile * p.n_splits + z) * p.m_tile;         // (this split's row 0)
  const int c_lo = mine.first, c_hi = mine.hi, n_tiles = mine.n_tiles;
  const T* kcache_head = p.k_cache + head_row0 * D;
  const T* vcache_head = p.v_cache + head_row0 * D;
  if (has_keys) {
    issue_tile<T, VEC, HD>(Ks, ks, kcache_head, p.k + new_off, new_stride, c_lo, c_hi, p0, tokens, D);
    cp_async_commit();
    issue_tile<T, VEC, HD>(Vs, ks, vcache_head, p.v + new_off, new_stride, c_lo, c_hi, p0, tokens, D);
    cp_async_commit();
  }

  // Prologue work items, QV rotation pairs (or VEC elements of V) each, spread over the block:
  //   [0, nq)        Q tile: RoPE at each row's position, rounded to T as the reference, then
  //                  * scale * log2(e) (padding rows: zeros)                  (blocks with keys)
  //   [nq, +nk)      append K: new key t' (t' = qt, qt + n_qtiles, ...) rotated at p0 + t'  (split 0)
  //   [nq + nk, +nv) append V: copied                                                        (split 0)
  // A thread's item of each pass loads everything first, so one pass costs one memory round trip;
  // decode and verify sizes are one pass (T = 7, G = 3, D = 64, bf16: 128 + 56 + 56 items).
  {
    constexpr int QV = (HD > 0 && VEC > 1) ? VEC : 1;
    const int hqv = half / QV, nvec = D / VEC;
    const int n_mine = (z == 0 && tokens > qt) ? (tokens - qt + p.n_qtiles - 1) / p.n_qtiles : 0;
    const int nq = has_keys ? M_ALLOC * hqv : 0, nk = n_mine * hqv, nv = n_mine * nvec;
    for (int idx = tid; idx < nq + nk + nv; idx += kThreads) {
      if (idx < nq + nk) {
        const bool is_q = idx < nq;
        const int it = is_q ? idx : idx - nq;
        const int r = it / hqv, j = (it - r * hqv) * QV;  // r: tile row (Q) or new-key index (K)
        const T* src = nullptr;
        T* kdst = nullptr;
        int64_t pos = 0;
        if (is_q) {
          if (r < m_rows && lo_s[r] <= hi_s[r]) {
            const int row = row0 + r, t = row / p.group, g = row - t * p.group;
            src = p.q + ((static_cast<int64_t>(b) * tokens + t) * p.hq + static_cast<int64_t>(kvh) * p.group + g) * D;
            pos = hi_s[r];  // hi == position for a valid row
          }
        } else {
          const int s = p0 + qt + r * p.n_qtiles;
          if (s >= 0 && s < S) {  // positions outside the cache are not written
            src = p.k + new_off + static_cast<int64_t>(s - p0) * new_stride;
            kdst = p.k_cache + (head_row0 + s) * D;
            pos = s;
          }
        }
        float y1[QV], y2[QV];
#pragma unroll
        for (int e = 0; e < QV; ++e) y1[e] = y2[e] = 0.f;
        if (src != nullptr) {
          float x1[QV], x2[QV], c1[QV], s1[QV], c2[QV], s2[QV];
          load_as_float<T, QV>(src + j, x1);
          load_as_float<T, QV>(src + j + half, x2);
          load_floats<QV>(p.rope_cos + pos * D + j, c1);
          load_floats<QV>(p.rope_sin + pos * D + j, s1);
          load_floats<QV>(p.rope_cos + pos * D + j + half, c2);
          load_floats<QV>(p.rope_sin + pos * D + j + half, s2);
#pragma unroll
          for (int e = 0; e < QV; ++e) rope_pair<T>(x1[e], x2[e], c1[e], s1[e], c2[e], s2[e], y1[e], y2[e]);
        }
        if (is_q) {
#pragma unroll
          for (int e = 0; e < QV; ++e) {
            y1[e] *= p.qscale;
            y2[e] *= p.qscale;
          }
          store_floats<QV>(Qs + r * D + j, y1);
          store_floats<QV>(Qs + r * D + j + half, y2);
        } else if (kdst != nullptr) {
          Vec<T, QV> o1, o2;
#pragma unroll
          for (int e = 0; e < QV; ++e) {
            o1.v[e] = from_float<T>(y1[e]);
            o2.v[e] = from_float<T>(y2[e]);
          }
          o1.store(kdst + j);
          o2.store(kdst + j + half);
        }
      } else {
        const int it = idx - nq - nk;
        const int i = it / nvec, c = it - i * nvec;
        const int s = p0 + qt + i * p.n_qtiles;
        if (s < 0 || s >= S) continue;
        Vec<T, VEC> x;
        x.load(p.v + new_off + static_cast<int64_t>(s - p0) * new_stride + c * VEC);
        x.store(p.v_cache + (head_row0 + s) * D + c * VEC);
      }
    }
  }
  // Query rows at positions outside the cache get zeros (lo_s/hi_s are visible: synced above); with
  // GLOBAL_MERGE, each row's split count for the merge stage (MergeScratch::n_used).
  if (z == 0) {
    for (int idx = tid; idx < m_rows * D; idx += kThreads) {
      const int r = idx / D;
      if (GLOBAL_MERGE && idx == r * D) scratch.n_used[tile * p.m_tile + r] = lo_s[r] <= hi_s[r] ? n_used : 0;
      if (lo_s[r] > hi_s[r]) {
        p.out[out_row(b, tokens, p.hq, kvh, p.group, row0 + r) * D + (idx - r * D)] = from_float<T>(0.f);
      }
    }
  }
  // A split without keys adds nothing. It must leave now unless the cluster merge's barriers need it
  // (n_used > 1): it used to run on, and with n_used == 1 its owner threads wrote 0 * (1 / 0) = NaN rows
  // into out, racing with split 0's real rows (first ~64 tokens of a large cache; split 0 finished last).
  if (!has_keys && (GLOBAL_MERGE || n_used <= 1)) return;

  // Softmax state of this warp's rows (replicated across the lanes).
  float m_i[RPT], l_i[RPT];
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    m_i[i] = -INFINITY;
    l_i[i] = 0.f;
  }

  // PV ownership: column slice c of rows rbase + i * RS; or, with few rows, key group kg.
  //
  // Batch invariance (INV). The key groups split each 64-key tile's PV sum, and the groups' sums are
  // added at the end in group order; so a row's rounding depends on the number of groups, which falls
  // as rows are added (a decode step's 3 rows: 8 groups; a 7-token verify's 21 rows: 1). A verified
  // row then differs in the last bits from the plain step that computes the same position, and bf16
  // near-ties can flip. With INV every row is summed in NG = pv_key_groups(G) groups, the decode
  // step's count: a thread holds NGL = NG / KG of them (keys (kg * NGL + l) * kpg ...), and the
  // groups are added in order 0, 1, ..., NG - 1, as a decode step adds them. The scores, the online
  // softmax and the split merge already treat every row alone. With interleaved key splits (key_split.h)
  // which split reads a key, and when, depends on the key alone, so a verified row is bitwise the row a
  // decode step computes at any context; with contiguous ones the boundaries move with the tile's key range
  // past n_splits * kKeyTile keys (512 on sm_90), and rows verified there can differ. INV also
  // skips the scores of padding rows (a 7-token verify's 21 rows sit in 32 row slots), which leaves every
  // real row's arithmetic as it is.
  const int nd = D / VEC;
  const int RS = kThreads / nd;  // >= 1 since nd <= 256
  const int KG = pv_key_groups(m_rows, RS);
  const int NG = INV ? pv_key_groups(min(p.group, p.m_tile), RS) : KG;
  const int NGL = NG / KG;  // key groups per thread: 1 unless INV (the host keeps it <= kMaxLocalGroups)
  const int slot = tid / nd, c = tid - slot * nd;
  const int kg = KG > 1 ? slot / m_rows : 0;
  const int rbase = slot - kg * m_rows;
  const bool pv_active = slot < RS && kg < KG;
  const int kpg = kKeyTile / NG;  // keys per group
  const int jb = kg * NGL * kpg;
  float acc[NACC][VEC];
  bool ok_u[UPT];
#pragma unroll
  for (int i = 0; i < UPT; ++i) ok_u[i] = pv_active && (i == 0 || KG == 1) && rbase + i * RS < m_rows;
#pragma unroll
  for (int i = 0; i < NACC; ++i) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[i][e] = 0.f;
  }

  for (int it = 0; it < n_tiles; ++it) {
    const int kb = mine.tile_key(it);
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
          if (INV && warp + kWarps * i >= m_rows) break;  // padding rows (INV): skipped, warp-uniformly
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
        if (INV && r >= m_rows) break;  // nothing reads a padding row's P, alpha or softmax state
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
      issue_tile<T, VEC, HD>(Ks, ks, kcache_head, p.k + new_off, new_stride, mine.tile_key(it + 1), c_hi, p0, tokens,
                             D);
    }
    cp_async_commit();   // (possibly empty) group: keeps the wait counts below uniform
    cp_async_wait<1>();  // everything but that newest group: this tile's V has landed
    __syncthreads();

    // O = O * alpha + P V over this thread's key group(s).
    if constexpr (INV) {
      if (ok_u[0]) {  // one row, NGL key groups of kpg keys, each group's keys in order
        const float a = alpha_s[rbase];
        const float* prow = Ps + rbase * kPStride;
#pragma unroll
        for (int l = 0; l < kMaxLocalGroups; ++l) {
          if (l >= NGL) break;
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[l][e] *= a;
          for (int j = jb + l * kpg; j < jb + (l + 1) * kpg; j += 4) {
            pv_four_keys<T, VEC>(prow + j, Vs + j * ks + c * VEC, ks, acc[l]);
          }
        }
      }
    } else {
#pragma unroll
    for (int i = 0; i < UPT; ++i) {
      if (!ok_u[i]) continue;
      const float a = alpha_s[rbase + i * RS];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[i][e] *= a;
    }
    }
    if (!INV && pv_active) {
#pragma unroll 2
      for (int j = jb; j < jb + kpg; j += 4) {
#pragma unroll
        for (int i = 0; i < UPT; ++i) {
          if (ok_u[i]) pv_four_keys<T, VEC>(Ps + (rbase + i * RS) * kPStride + j, Vs + j * ks + c * VEC, ks, acc[i]);
        }
      }
    }
    __syncthreads();  // every thread is done with Vs, Ps, alpha_s

    if (it + 1 < n_tiles) {
      issue_tile<T, VEC, HD>(Vs, ks, vcache_head, p.v + new_off, new_stride, mine.tile_key(it + 1), c_hi, p0, tokens,
                             D);
    }
    cp_async_commit();
  }
  cp_async_wait<0>();  // only empty groups can remain; keeps the block's async state clean

  // Epilogue. Rows' (max, sum) to shared memory; the key groups' PV sums meet in the K tile (free now).
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      m_s[warp + kWarps * i] = m_i[i];
      l_s[warp + kWarps * i] = l_i[i];
    }
  }
  // The groups the owner does not hold, NGL .. NG-1: [NG - NGL][m_rows][nd][VEC] floats, at most
  // kThreads * VEC (kInvariantRedFactor times that with INV: pv_key_groups' bound).
  float* red = reinterpret_cast<float*>(smem + L.k);
  if (KG > 1 && pv_active && kg > 0) {
#pragma unroll
    for (int l = 0; l < NACC; ++l) {
      if (l >= NGL) break;
      const int g = kg * NGL + l - NGL;
#pragma unroll
      for (int e = 0; e < VEC; ++e) red[((g * m_rows + rbase) * nd + c) * VEC + e] = acc[l][e];
    }
  }
  __syncthreads();

  // The owner adds the groups in order: its own (0 .. NGL-1), then the other threads' (NGL .. NG-1).
  const bool owner = pv_active && kg == 0;  // holds finished column slices once the groups are summed
  if (owner) {
#pragma unroll
    for (int l = 1; l < NACC; ++l) {
      if (l >= NGL) break;
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[0][e] += acc[l][e];
    }
    for (int g = 0; g < NG - NGL; ++g) {  // group NGL + g
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[0][e] += red[((g * m_rows + rbase) * nd + c) * VEC + e];
    }
  }
  const bool merge = n_used > 1;  // the same for every block of the cluster (one tile, one key range)
  float* o_s = GLOBAL_MERGE ? scratch.o + state0 * D : Qs;  // merge only: Q is dead after the loop's last barrier
  if (owner) {
#pragma unroll
    for (int i = 0; i < UPT; ++i) {
      if (!ok_u[i]) continue;
      const int r = rbase + i * RS;
      if (merge) {
        store_floats<VEC>(o_s + r * D + c * VEC, acc[i]);
        continue;
      }
      if (lo_s[r] > hi_s[r]) continue;  // zeroed by the append phase
      const float inv = 1.f / l_s[r];
      Vec<T, VEC> o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) o.v[e] = from_float<T>(acc[i][e] * inv);
      o.store(p.out + out_row(b, tokens, p.hq, kvh, p.group, row0 + r) * D + c * VEC);
    }
  }
  if (!merge) return;
  if constexpr (GLOBAL_MERGE) {  // o went out above; (m, l) of the rows (published by the epilogue's barrier)
    for (int r = tid; r < m_rows; r += kThreads) {
      scratch.m[state0 + r] = m_s[r];
      scratch.l[state0 + r] = l_s[r];
    }
    return;
  }

  // Merge the splits (merge_splits). Block z takes two-column units z, z + n_splits, ... of the tile;
  // every split's state is read in one batch.
  cluster_barrier();  // every block's m_s, l_s and o_s are written and visible to the cluster
  const int pairs = D / 2;  // D is even: float2 reads of o are aligned
  for (int u = z * kThreads + tid; u < m_rows * pairs; u += p.n_splits * kThreads) {
    const int r = u / pairs, col = 2 * (u - r * pairs);
    if (lo_s[r] > hi_s[r]) continue;  // zeroed by the append phase
    float mz[kMaxSplits], lz[kMaxSplits];
    float2 oz[kMaxSplits];
#pragma unroll
    for (int zz = 0; zz < kMaxSplits; ++zz) {
      if (zz < n_used) {
        mz[zz] = *cluster_peer(m_s + r, zz);
        lz[zz] = *cluster_peer(l_s + r, zz);
        oz[zz] = *reinterpret_cast<const float2*>(cluster_peer(o_s + r * D + col, zz));
      }
    }
    merge_splits<T>(n_used, mz, lz, oz, [&] {
      return p.out + out_row(b, tokens, p.hq, kvh, p.group, row0 + r) * D + col;
    });
  }
  cluster_barrier();  // no block exits (freeing its shared memory) while a peer may still read it
}

// The per-op kernel: grid (B * Hkv, n_qtiles, n_splits), clusters of the n_splits blocks of a tile.
template <typename T, int VEC, int HD, int RPT, bool INV = false>
__global__ void __launch_bounds__(kThreads) attention_kernel(const Params<T> p) {
  extern __shared__ __align__(16) unsigned char smem[];
  pdl_launch_dependents();  // see common.cuh: everything below may depend on the previous kernel
  pdl_wait();
  __shared__ int2 s_red[2];
  attention_block<T, VEC, HD, RPT, INV, false>(p, blockIdx.x, blockIdx.y, blockIdx.z, smem, s_red, MergeScratch{});
}

// ---- host side ----------------------------------------------------------------------------------

struct Plan {
  int vec;      // elements per access: 16 bytes' worth, or 1
  int hd;       // compile-time head dim (64, 128) or 0
  int rpt;      // rows per warp: 1, 2, 4, 8
  int m_tile, n_qtiles, n_splits, min_chunk;
  bool invariant;  // the batch-invariant PV order (attention_kernel's INV)
  bool interleaved;  // interleaved key splits (key_split.h; Params::interleaved)
  int smem_bytes;
};

// Whether the batch-invariant PV order can run this tile shape: each row one PV slot, every q-tile's key groups
// per row (KG, from its row count: m_tile, and the last tile's) dividing the decode step's NG with at most
// kMaxLocalGroups per thread, several q-tiles holding whole tokens (m_tile a multiple of group, so no tile has
// fewer rows than a decode step), and an instantiation for it (16-byte accesses, head dim 64 or 128, at most 4
// rows per warp).
inline bool invariant_eligible(const Plan& pl, int64_t rows, int group, int head_dim) {
  if (pl.vec == 1 || pl.hd == 0 || pl.rpt > 4) return false;
  const int rs = kThreads / (head_dim / pl.vec);
  if (pl.m_tile > rs || (pl.n_qtiles > 1 && pl.m_tile % group != 0)) return false;
  const int last = static_cast<int>(rows - static_cast<int64_t>(pl.n_qtiles - 1) * pl.m_tile);
  const int ng = pv_key_groups(std::min(group, pl.m_tile), rs);
  for (const int m_rows : {pl.m_tile, last}) {
    const int kg = pv_key_groups(m_rows, rs);
    if (ng % kg != 0 || ng / kg > kMaxLocalGroups) return false;
  }
  return true;
}

// Whether splits may form clusters on the current device: the device supports cluster launches
// (sm_90+) and the kernel code the runtime picked for it was compiled for sm_90+ (an sm_80 build
// JIT-compiled from PTX would reach cluster_barrier's trap). Asked once per device; host-side only.
inline bool clusters_usable() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices];  // 0 unknown, 1 no, 2 yes
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (device < kMaxDevices) {
    const int k = known[device].load(std::memory_order_relaxed);
    if (k != 0) return k == 2;
  }
  int has = 0;
  cudaFuncAttributes attrs{};
  const bool ok = cudaDeviceGetAttribute(&has, cudaDevAttrClusterLaunch, device) == cudaSuccess && has != 0 &&
                  cudaFuncGetAttributes(&attrs, attention_kernel<float, 1, 0, 1>) == cudaSuccess &&
                  attrs.binaryVersion >= 90;
  if (device < kMaxDevices) known[device].store(ok ? 2 : 1, std::memory_order_relaxed);
  return ok;
}

// vec16: the head dim and every K/V pointer allow 16-byte accesses. num_sms: the device's SM count.
// clusters: the device has thread-block clusters (sm_90+); without them a tile is never split.
// invariant: take the batch-invariant PV order where invariant_eligible (the launcher's switch).
// interleaved: deal the keys to the splits in units (key_split.h; the launcher's switch).
// max_tile_rows: > 0 cuts decode and verify tiles (at most kMaxTileRows rows) into q-tiles of at most that many
// rows, in whole tokens (a multiple of group, one token at least): more blocks, each with fewer rows' scores and
// PV sums in its serial chain, each reading the tile's keys again (an experiment's setting, 0 = off).
inline Plan plan(int batch, int tokens, int hkv, int group, int head_dim, int cache_len, int elem_size, bool vec16,
                 int num_sms, bool clusters, bool invariant = false, bool interleaved = false, int max_tile_rows = 0) {
  Plan pl{};
  pl.vec = vec16 ? 16 / elem_size : 1;
  pl.hd = (vec16 && (head_dim == 64 || head_dim == 128)) ? head_dim : 0;
  const int64_t rows = static_cast<int64_t>(tokens) * group;
  // Q (fp32) + K + V + P must fit: 64 rows up to D = 128, fewer beyond (fp32 K/V tiles are large).
  int m_cap = head_dim <= 128 ? kMaxTileRows : (elem_size == 4 ? 16 : 32);
  if (max_tile_rows > 0 && rows <= kMaxTileRows && rows > max_tile_rows) {
    m_cap = std::min(m_cap, std::max(group, max_tile_rows / group * group));
  }
  pl.m_tile = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, m_cap)));
  pl.rpt = pl.m_tile <= 8 ? 1 : (pl.m_tile <= 16 ? 2 : (pl.m_tile <= 32 ? 4 : 8));
  pl.n_qtiles = static_cast<int>(std::max<int64_t>(1, ceil_div(rows, pl.m_tile)));
  // A split reads at least ~2 keys per query row it carries, so its share of the merge (rows * D
  // floats per split) stays small next to its K/V bytes (2 * keys * D elements). (4 keys per row
  // gave a verify step's 21-row tiles two key tiles per split: 26 us vs 9.5 us for one row at 1,024
  // keys, H200.)
  pl.min_chunk = static_cast<int>(ceil_div(std::max(kKeyTile, 2 * pl.m_tile), kKeyTile) * kKeyTile);
  pl.invariant = invariant && invariant_eligible(pl, rows, group, head_dim);
  // ~2 resident blocks per SM; an invariant plan counts one q-tile, as a decode step's does, so that a verify
  // tile cut into several q-tiles keeps the decode step's split count (and so its key order)
  const int64_t base_blocks = static_cast<int64_t>(batch) * hkv * (pl.invariant ? 1 : pl.n_qtiles);
  const int64_t want = ceil_div(2 * static_cast<int64_t>(num_sms), base_blocks);
  const int64_t useful = ceil_div(cache_len, pl.min_chunk);
  const int64_t cap = clusters ? kMaxSplits : 1;
  pl.n_splits = static_cast<int>(std::max<int64_t>(1, std::min({want, useful, cap})));
  pl.interleaved = interleaved;
  pl.smem_bytes = smem_layout(head_dim, elem_size, pl.vec, kWarps * pl.rpt, pl.invariant).total;
  return pl;
}

template <typename T, int VEC, int HD, int RPT, bool INV = false>
cudaError_t launch_with(const Params<T>& p, const Plan& pl, Launch stream) {
  constexpr auto kernel = attention_kernel<T, VEC, HD, RPT, INV>;
  const cudaError_t serr = ensure_dynamic_smem<kernel>(pl.smem_bytes);
  if (serr != cudaSuccess) return serr;
  const dim3 grid(static_cast<unsigned>(p.batch * p.hkv), static_cast<unsigned>(pl.n_qtiles),
                  static_cast<unsigned>(pl.n_splits));
  const dim3 cluster(1, 1, grid.z);  // the splits of one tile; 1 x 1 x 1 launches without a cluster
  return launch_pdl_cluster(kernel, grid, dim3(kThreads), static_cast<size_t>(pl.smem_bytes), stream, cluster, p);
}

template <typename T, int VEC, int HD>
cudaError_t launch_rpt(const Params<T>& p, const Plan& pl, Launch stream) {
  if constexpr (VEC > 1 && HD > 0) {  // the batch-invariant instantiations (invariant_eligible)
    if (pl.invariant) {
      switch (pl.rpt) {
        case 1: return launch_with<T, VEC, HD, 1, true>(p, pl, stream);
        case 2: return launch_with<T, VEC, HD, 2, true>(p, pl, stream);
        default: return launch_with<T, VEC, HD, 4, true>(p, pl, stream);
      }
    }
  }
  switch (pl.rpt) {
    case 1: return launch_with<T, VEC, HD, 1>(p, pl, stream);
    case 2: return launch_with<T, VEC, HD, 2>(p, pl, stream);
    case 4: return launch_with<T, VEC, HD, 4>(p, pl, stream);
    default: return launch_with<T, VEC, HD, 8>(p, pl, stream);
  }
}

// Launches the kernel on `stream` and returns the launch status. p's plan fields (m_tile, n_qtiles,
// n_splits, min_chunk, interleaved) must come from `pl`.
template <typename T>
cudaError_t launch(const Params<T>& p, const Plan& pl, Launch stream) {
  constexpr int V16 = kVec16<T>;
  if (pl.vec == 1) return launch_rpt<T, 1, 0>(p, pl, stream);
  if (pl.hd == 64) return launch_rpt<T, V16, 64>(p, pl, stream);
  if (pl.hd == 128) return launch_rpt<T, V16, 128>(p, pl, stream);
  return launch_rpt<T, V16, 0>(p, pl, stream);
}

}  // namespace attention
}  // namespace kangaroo
