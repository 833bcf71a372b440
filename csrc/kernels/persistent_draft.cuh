// The persistent draft kernel: a whole Kangaroo draft phase in one launch (kangaroo_ext/ops/reference.py:
// persistent_draft), torch-free. For draft steps j = 0 .. γ of one sequence (batch 1):
//
//   x = embed[tokens_in[j]]                                   (step j > 0: the token step j - 1 proposed)
//   the target's exit layers [0, ℓ), then the adapter's blocks, at position cache_len + j (KV appended)
//   exit_states[j] = the residual stream entering the adapter (its first norm's residual_out)
//   j < γ: token, conf = argmax / top-1 probability of the draft head over norm(x);
//          draft_tokens[j] = tokens_in[j + 1] = draft_ids[token]; keep = active && conf >= η;
//          num_drafted += keep; active = keep
//   stop_at_exit: step j > 0 runs only while active (Kangaroo's draft early exit)
//
// which is what the engine's per-op graph does with ~23 launches a step (Engine.draft_step), each 3-6 us at
// the default model's sizes: the step cost launch gaps, not bytes. Here the stages of a step run on one
// occupancy-sized grid, ordered by a grid-wide barrier (grid_barrier.cuh: an arrival counter in global
// memory; co-residency from a grid no larger than fits at once), and every stage calls the per-op kernels'
// own bodies, so every value is bitwise what the per-op path computes:
//   norm + QKV, O, norm + gate/up, down   decode_linear_mma.cuh's gemv_mma_tile (tensor cores, 1 row); a
//                                         256-thread block runs two 128-thread tiles side by side, each on a
//                                         named barrier of its own
//   RoPE + append + attention             attention.cuh's attention_block (GLOBAL_MERGE: the key splits'
//                                         states go through global memory); when the plan splits the keys,
//                                         the last split of each tile to finish merges it (per-tile arrival
//                                         counters, attention_merge_global), inside the same stage
//   draft head norm                       rms_norm.cuh's norm_row with the per-op launch's row width, in
//                                         every block (no stage: the row is 1-2k elements)
//   draft head + argmax                   lm_head.cuh's group_logits (each logit bitwise as lm_head_argmax's);
//                                         each block merges its rows' online-softmax triples, and after the
//                                         barrier every block merges all blocks' triples itself (a fixed
//                                         order, so every block gets the same token and keep), so the next
//                                         step starts without another barrier. The argmax is exact; the
//                                         confidence's sum is merged in another order than lm_head_argmax's
//                                         two kernels do, so it may differ in the last bits.
// Stages per step: 3 per attention block, 2 more per MLP, 1 for the head.
//
// Memory. Data written during the launch is never read through the read-only path (.nc): the head's
// norm copies its inputs to shared memory first (norm_row's pointers are __restrict__), and the
// positions the attention reads (one per step, written once by block 0 before the first barrier) never
// change afterwards. The barrier releases every block's writes and acquires them for the next stage.
// The barrier buffer's counters start at zero: the last block to leave resets the grid barrier's two, and the
// last split of a tile resets the tile's, so the same buffer serves the next launch (stream-ordered; not two
// launches at once). The L2 prefetch (Params::prefetch_bytes) only asks the L2 to fetch weight rows early; it
// reads nothing into registers or the L1.
#pragma once

#include <cstdint>

#include "attention.cuh"
#include "common.cuh"
#include "decode_linear_mma.cuh"
#include "grid_barrier.cuh"
#include "lm_head.cuh"
#include "rms_norm.cuh"

namespace kangaroo {
namespace persistent {

constexpr int kThreads = attention::kThreads;                    // 256
constexpr int kTileThreads = gemv_mma::kSplitK * kWarpSize;      // 128: one GEMV tile's body
constexpr int kTilesPerBlock = kThreads / kTileThreads;          // 2 tiles side by side
// exit layers + adapter blocks; 32 also lets one launch run a whole plain step of a model of up to 32 layers
// (bench/persistent_draft_price.py: every layer but the last as exit layers, the last as the "block", the model's
// head, η above any confidence) in the 32 KB of __grid_constant__ parameters (Layer: 128 bytes)
constexpr int kMaxLayers = 32;
constexpr int kMaxNormThreads = kThreads;                        // the head norm's row width (H <= 2048 in 16 bits)

template <typename T>
struct Layer {
  const T *input_norm, *q, *k, *v, *q_bias, *k_bias, *v_bias, *o, *o_bias;  // biases may be null
  const T *post_norm, *gate, *up, *down, *down_bias;                       // gate null: no MLP (adapter)
  T *k_cache, *v_cache;                                                    // [1, Hkv, S, D]
};

template <typename T>
struct Params {
  Layer<T> layer[kMaxLayers];
  int n_exit, n_layers;       // layer[0, n_exit): the target's exit layers; then the adapter's blocks
  const T* embed;             // [V, H]
  const T* head_norm;         // [H] (the adapter's final norm)
  const T* head;              // [N, H] (the draft head)
  const int64_t* draft_ids;   // [N] or null
  int head_rows;              // N
  const float* threshold;     // η
  const int64_t* cache_len;   // [1]
  int64_t* tokens_in;         // [1, G + 1]
  int64_t* draft_tokens;      // [1, G]
  int64_t* num_drafted;       // [1]
  bool* active;               // [1]
  T* exit_states;             // [1, >= G + 1, H]
  int gamma;
  bool stop_at_exit;
  int hidden, inter, q_rows, kv_rows;  // H, I, Hq * D, Hkv * D
  float eps;
  int norm_threads;           // the per-op RMSNorm launch's row width for H (rms_norm::plan's block.x)
  int head_rows_per_block;
  attention::Params<T> attn;  // plan fields and RoPE; q, k, v, out, positions, caches set per stage
  attention::MergeScratch merge;
  // workspace (global)
  T *q, *k, *v, *attn_out, *x_attn, *x_mlp, *act, *res0, *res1;
  int64_t* positions;         // [G + 1]: cache_len + j, written once
  lm_head::Soft* partials;    // [gridDim.x]
  unsigned* barrier;          // [kBarrierWords], zero
  int64_t* stamps;            // [stamp_rows][stamp_stride][3] (stage, arrival ns, departure ns) or null
  int stamp_rows, stamp_stride;
  bool split_barrier;         // GEMV stages wait inside their tiles, after the weight loads (GridBarrier)
  int64_t prefetch_bytes;     // per block: the next GEMV stage's weight bytes asked of the L2 ahead (0: no prefetch)
};

// ---- stages -----------------------------------------------------------------------------------------

struct NoWait {
  __device__ __forceinline__ void operator()() const {}
};

// ---- L2 prefetch (Params::prefetch_bytes) -------------------------------------------------------------
// Weights depend on nothing the launch computes, so while a block waits at a barrier it can ask the L2 for the
// weight rows its tiles of the next GEMV stages will read (`prefetch.global.L2`: a hint, no register, no
// value): when a stage starts, its loads find them in the L2 instead of waiting a DRAM round trip. Each GEMV
// stage asks for the first Params::prefetch_bytes (a share of the L2) of the next GEMV stage's rows, and for
// the rest of its own (a stage larger than that share: Llama-3.2-1B's gate/up is 67 MB) as it starts, ahead
// of its own loads. Only when loads are issued changes, never what is summed or in what order, so the bits
// are the same with or without it.

// Every thread of the block: [p, p + bytes) into the L2, one instruction per 128-byte line.
__device__ __forceinline__ void prefetch_lines(const void* ptr, int64_t bytes) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(ptr) & ~uintptr_t{127};
  const int64_t lines = (static_cast<int64_t>(reinterpret_cast<uintptr_t>(ptr) - first) + bytes + 127) / 128;
  for (int64_t i = threadIdx.x; i < lines; i += kThreads) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(first + static_cast<uintptr_t>(i) * 128));
  }
}

// The weights of one GEMV stage as gemv_stage tiles them: segments concatenated along N (QKV), or gate and up
// sharing each tile (`paired`). Tile t reads 8 rows of K elements of each weight it lies in.
template <typename T>
struct StageWeights {
  const T* w[3];
  int rows[3];
  int n = 0;  // segments
  int k = 0;
  bool paired = false;
};

// Both prefetch functions stay out of line: inlined, they cost the kernel (255 registers) ~20% more spill
// loads on every path, prefetch on or off (ptxas -v, bf16, head dim 64, batch-invariant attention).

// This block's tiles of `s` in the order gemv_stage runs them: the tiles that start in [begin, end) of the
// bytes they read, counted in that order. A stage asks for its first Params::prefetch_bytes during the stage
// before it and for the rest when it starts (before its barrier wait: see layer_stages).
template <typename T>
__device__ __noinline__ void prefetch_stage(const StageWeights<T>& s, int64_t begin, int64_t end) {
  if (begin >= end) return;
  const int n_total = s.paired ? s.rows[0] : s.rows[0] + (s.n > 1 ? s.rows[1] : 0) + (s.n > 2 ? s.rows[2] : 0);
  const int tiles = n_total / gemv_mma::kTileN;
  const int64_t row_bytes = static_cast<int64_t>(s.k) * sizeof(T);
  const int64_t tile_bytes = gemv_mma::kTileN * row_bytes;
  int64_t at = 0;  // bytes of this block's earlier tiles
  for (int t0 = blockIdx.x * kTilesPerBlock; t0 < tiles && at < end; t0 += gridDim.x * kTilesPerBlock) {
    for (int t = t0; t < min(t0 + kTilesPerBlock, tiles); ++t) {
      int n0 = t * gemv_mma::kTileN;
      for (int seg = 0; seg < s.n; ++seg) {
        if (s.paired || n0 < s.rows[seg]) {
          if (at >= begin && at < end) prefetch_lines(s.w[seg] + static_cast<int64_t>(n0) * s.k, tile_bytes);
          at += tile_bytes;
          if (!s.paired) break;
        } else {
          n0 -= s.rows[seg];
        }
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ StageWeights<T> qkv_weights(const Params<T>& p, const Layer<T>& w) {
  return StageWeights<T>{{w.q, w.k, w.v}, {p.q_rows, p.kv_rows, p.kv_rows}, 3, p.hidden, false};
}
template <typename T>
__device__ __forceinline__ StageWeights<T> o_weights(const Params<T>& p, const Layer<T>& w) {
  return StageWeights<T>{{w.o, nullptr, nullptr}, {p.hidden, 0, 0}, 1, p.q_rows, false};
}
template <typename T>
__device__ __forceinline__ StageWeights<T> gate_up_weights(const Params<T>& p, const Layer<T>& w) {
  return StageWeights<T>{{w.gate, w.up, nullptr}, {p.inter, p.inter, 0}, 2, p.hidden, true};
}
template <typename T>
__device__ __forceinline__ StageWeights<T> down_weights(const Params<T>& p, const Layer<T>& w) {
  return StageWeights<T>{{w.down, nullptr, nullptr}, {p.hidden, 0, 0}, 1, p.inter, false};
}

// This block's rows of the head, bytes [begin, end) of them (the head stage reads them pass by pass, in order).
template <typename T>
__device__ __noinline__ void prefetch_head(const Params<T>& p, int64_t begin, int64_t end) {
  const int vb = blockIdx.x * p.head_rows_per_block;
  const int ve = min(p.head_rows, vb + p.head_rows_per_block);
  const int64_t bytes = ve > vb ? static_cast<int64_t>(ve - vb) * p.hidden * static_cast<int64_t>(sizeof(T)) : 0;
  end = min(end, bytes);
  if (begin >= end) return;
  prefetch_lines(reinterpret_cast<const char*>(p.head + static_cast<int64_t>(vb) * p.hidden) + begin, end - begin);
}

// Bytes of one tile's shared memory: the x rows and norm weight (2 rows of the widest K), then its scratch.
__host__ __device__ inline int tile_smem_bytes(int max_k, int elem_size) {
  const int xs = (2 * max_k * elem_size + 15) / 16 * 16;
  return xs + static_cast<int>(sizeof(gemv_mma::TileScratch<1, gemv::Mode::kNormGateUp>));
}

template <class Sync>
struct TileWait {  // gemv_mma_tile's wait: the grid barrier's, inside the tile (GridBarrier: split)
  const GridBarrier* bar;
  int tid;
  Sync sync;
  __device__ __forceinline__ void operator()() const { bar->wait_tile(tid, sync); }
};

// The stage's GEMV tiles over the grid, two 128-thread tiles per block at a time. Starts with the grid
// barrier's wait: before the first tile, or (split) inside each tile after its weight loads.
template <typename T, gemv::Mode MODE>
__device__ __forceinline__ void gemv_stage(const gemv::Params<T>& gp, unsigned char* smem, int tile_bytes,
                                           int xs_bytes, GridBarrier& bar, bool split) {
  const int sub = threadIdx.x / kTileThreads, tid = threadIdx.x % kTileThreads;
  unsigned char* mine = smem + sub * tile_bytes;
  T* xs = reinterpret_cast<T*>(mine);
  auto& sc = *reinterpret_cast<gemv_mma::TileScratch<1, MODE>*>(mine + xs_bytes);
  const NamedBarrier<kTileThreads> sync{1 + sub};
  const int tiles = gp.n_total / gemv_mma::kTileN;
  if (!split) bar.wait();
  const TileWait<NamedBarrier<kTileThreads>> wait{&bar, tid, sync};
  for (int t = blockIdx.x * kTilesPerBlock + sub; t < tiles; t += gridDim.x * kTilesPerBlock) {
    if (split) {
      gemv_mma::gemv_mma_tile<T, 1, MODE>(gp, t, 0, tid, kTileThreads, xs, sc, sync, wait);
    } else {
      gemv_mma::gemv_mma_tile<T, 1, MODE>(gp, t, 0, tid, kTileThreads, xs, sc, sync, NoWait{});
    }
    sync();  // the next tile reuses xs and the scratch
  }
}

template <typename T>
__device__ __forceinline__ gemv::Params<T> gemv_params(const T* x, const T* residual, const T* norm, T* residual_out,
                                                       int m_k, float eps) {
  gemv::Params<T> gp{};
  gp.x = x;
  gp.residual = residual;
  gp.norm_weight = norm;
  gp.residual_out = residual_out;
  gp.m = 1;
  gp.k = m_k;
  gp.eps = eps;
  return gp;
}

template <typename T>
__device__ __forceinline__ void add_segment(gemv::Params<T>& gp, const T* w, const T* bias, T* out, int n) {
  gp.seg[gp.n_segments] = gemv::Segment<T>{w, bias, out, n};
  gp.n_segments += 1;
  gp.n_total += n;
}

// The draft head over norm(x + res): this block's rows' triple to p.partials[blockIdx.x], then (after
// the barrier) the merge of every block's triples. Returns the head index of the argmax; conf: 1 / sum.
template <typename T, int VEC>
__device__ __forceinline__ int draft_head(const Params<T>& p, const T* x, const T* res, unsigned char* smem,
                                          GridBarrier& bar, float& conf) {
  const int H = p.hidden, tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  T* in = reinterpret_cast<T*>(smem);                       // [H] x, then [H] res: shared copies (see the top)
  T* rs = in + H;
  T* y = rs + H;                                            // [H] the normed row
  T* cache = y + H;                                         // [H] norm_row's residual_out and cache
  float* hs = reinterpret_cast<float*>(cache + H);          // [H] fp32, lm_head's layout
  __shared__ float warp_sums[kThreads / kWarpSize];
  __shared__ lm_head::Soft warp_soft[kThreads / kWarpSize][lm_head::kLanesPerRow];
  if (p.prefetch_bytes > 0) {  // the rest of this block's head rows (read once, in order), then the next step's QKV
    prefetch_head(p, p.prefetch_bytes, INT64_MAX);
    prefetch_stage(qkv_weights(p, p.layer[0]), 0, p.prefetch_bytes);
  }
  bar.wait();  // the adapter's last stage
  for (int i = tid; i < H / VEC; i += kThreads) {
    Vec<T, VEC> a, b;
    a.load(x + i * VEC);
    b.load(res + i * VEC);
    a.store(in + i * VEC);
    b.store(rs + i * VEC);
  }
  __syncthreads();
  rms_norm::norm_row<T, VEC, true>(y, cache, in, rs, p.head_norm, 0, H, p.eps, tid < p.norm_threads, tid,
                                   p.norm_threads, 0, cache, warp_sums, WholeBlock{});
  __syncthreads();
  lm_head::stage_hidden<T, VEC, 1>(y, 0, 1, H, hs, tid, kThreads);
  __syncthreads();

  constexpr int kRowsPerPass = (kThreads / lm_head::kLanesPerRow) * lm_head::kRowsPerGroup;
  const int gid = tid / lm_head::kLanesPerRow, l8 = tid % lm_head::kLanesPerRow;
  const int vb = blockIdx.x * p.head_rows_per_block;
  const int ve = min(p.head_rows, vb + p.head_rows_per_block);
  const int n_pass = ve > vb ? (ve - vb + kRowsPerPass - 1) / kRowsPerPass : 0;
  lm_head::Soft st = lm_head::soft_empty();
  for (int pass = 0; pass < n_pass; ++pass) {
    const int v0 = vb + pass * kRowsPerPass + gid * lm_head::kRowsPerGroup;
    const bool ok0 = v0 < ve, ok1 = v0 + 1 < ve;
    float x0, x1;
    lm_head::group_logits<T, VEC, 1>(p.head, H, hs, v0, ok0, ok1, l8, x0, x1);
    if (l8 == 0) {
      if (ok0) lm_head::soft_add(st, round_to<T>(x0), v0);
      if (ok1) lm_head::soft_add(st, round_to<T>(x1), v0 + 1);
    }
  }
  lm_head::soft_merge(st, lm_head::shfl_xor_soft(st, 8));
  lm_head::soft_merge(st, lm_head::shfl_xor_soft(st, 16));
  if (lane < lm_head::kLanesPerRow) warp_soft[warp][lane] = st;
  __syncthreads();
  if (tid == 0) {
    lm_head::Soft acc = lm_head::soft_empty();
#pragma unroll
    for (int w = 0; w < kThreads / kWarpSize; ++w) lm_head::soft_merge(acc, warp_soft[w][0]);
    p.partials[blockIdx.x] = acc;
  }
  bar.sync(kHead);

  // Every block merges all blocks' triples in the same order: the same token everywhere.
  __shared__ lm_head::Soft result;
  if (warp == 0) {
    lm_head::Soft acc = lm_head::soft_empty();
    for (int i = lane; i < static_cast<int>(gridDim.x); i += kWarpSize) lm_head::soft_merge(acc, p.partials[i]);
#pragma unroll
    for (int o = kWarpSize / 2; o > 0; o /= 2) lm_head::soft_merge(acc, lm_head::shfl_xor_soft(acc, o));
    if (lane == 0) result = acc;
  }
  __syncthreads();
  conf = 1.f / result.s;
  return result.idx;
}

// The workspace residual buffer a stage may write: the one its residual input is not.
template <typename T>
__device__ __forceinline__ T* other_residual(const Params<T>& p, const T* res) {
  return res == p.res0 ? p.res1 : p.res0;
}

// The O or down projection back to the residual width: in [K] -> out [H], then the stage's arrival.
template <typename T>
__device__ __forceinline__ const T* projection(const Params<T>& p, const T* in, int k, const T* w, const T* bias,
                                               T* out, unsigned char* smem, int tile_bytes, int xs_bytes,
                                               GridBarrier& bar, Stage stage) {
  gemv::Params<T> gp = gemv_params<T>(in, nullptr, nullptr, nullptr, k, p.eps);
  add_segment(gp, w, bias, out, p.hidden);
  gemv_stage<T, gemv::Mode::kLinear>(gp, smem, tile_bytes, xs_bytes, bar, p.split_barrier);
  bar.arrive(stage);
  return out;
}

// One layer (a target layer or an adapter block) at this step's position: (x, res) in, (x, res) out.
// exit_row: where the first norm's residual_out goes (the exit state), or null. next: the layer after this one,
// or null (the head comes next): with Params::prefetch_bytes, each GEMV stage first asks the L2 for the rest of
// its own weights and the first prefetch_bytes of the next GEMV stage's.
template <typename T, int VEC, int HD, bool INV>
__device__ __forceinline__ void layer_stages(const Params<T>& p, const Layer<T>& w, const Layer<T>* next,
                                             const T*& x, const T*& res, T* exit_row, const int64_t* position,
                                             unsigned char* smem, int tile_bytes, int xs_bytes, GridBarrier& bar) {
  const int64_t pf = p.prefetch_bytes;
  const auto prefetch_after_layer = [&]() {
    if (next != nullptr) {
      prefetch_stage(qkv_weights(p, *next), 0, pf);
    } else {
      prefetch_head(p, 0, pf);
    }
  };
  if (pf > 0) {
    prefetch_stage(qkv_weights(p, w), pf, INT64_MAX);
    prefetch_stage(o_weights(p, w), 0, pf);
  }
  {  // norm + QKV
    T* res_out = exit_row != nullptr ? exit_row : other_residual(p, res);
    gemv::Params<T> gp = gemv_params<T>(x, res, w.input_norm, res_out, p.hidden, p.eps);
    add_segment(gp, w.q, w.q_bias, p.q, p.q_rows);
    add_segment(gp, w.k, w.k_bias, p.k, p.kv_rows);
    add_segment(gp, w.v, w.v_bias, p.v, p.kv_rows);
    gemv_stage<T, gemv::Mode::kNormLinear>(gp, smem, tile_bytes, xs_bytes, bar, p.split_barrier);
    res = res_out;
  }
  bar.arrive(kQKV);

  attention::Params<T> ap = p.attn;  // RoPE + append + attention, then the split merge
  ap.q = p.q;
  ap.k = p.k;
  ap.v = p.v;
  ap.out = p.attn_out;
  ap.positions = position;
  ap.k_cache = w.k_cache;
  ap.v_cache = w.v_cache;
  bar.wait();
  {
    __shared__ int2 s_red[2];
    __shared__ bool merges;
    const int blocks = ap.hkv * ap.n_splits;  // batch 1, one q-tile per KV head
    const int pairs = ap.head_dim / 2;
    for (int vb = blockIdx.x; vb < blocks; vb += gridDim.x) {
      const int tile = vb / ap.n_splits;
      attention::attention_block<T, VEC, HD, 1, INV, true>(ap, tile, 0, vb % ap.n_splits, smem, s_red, p.merge);
      __syncthreads();
      if (ap.n_splits > 1) {  // the tile's last split to finish merges the tile: no merge stage of its own
        if (threadIdx.x == 0) merges = last_arrival(p.barrier + kTileCounters + tile, ap.n_splits);
        __syncthreads();
        if (merges) {
          for (int u = threadIdx.x; u < ap.rows * pairs; u += kThreads) {
            attention::attention_merge_global<T>(ap, p.merge, tile, 0, u);
          }
        }
        __syncthreads();  // `merges` is rewritten for the next tile
      }
    }
  }
  bar.arrive(kAttention);

  if (pf > 0) {
    prefetch_stage(o_weights(p, w), pf, INT64_MAX);
    if (w.gate != nullptr) {
      prefetch_stage(gate_up_weights(p, w), 0, pf);
    } else {
      prefetch_after_layer();
    }
  }
  x = projection(p, p.attn_out, p.q_rows, w.o, w.o_bias, p.x_attn, smem, tile_bytes, xs_bytes, bar, kO);
  if (w.gate == nullptr) return;

  if (pf > 0) {
    prefetch_stage(gate_up_weights(p, w), pf, INT64_MAX);
    prefetch_stage(down_weights(p, w), 0, pf);
  }
  {  // norm + gate/up + SiLU·mul
    T* res_out = other_residual(p, res);
    gemv::Params<T> gp = gemv_params<T>(x, res, w.post_norm, res_out, p.hidden, p.eps);
    gp.seg[0] = gemv::Segment<T>{w.gate, nullptr, p.act, p.inter};
    gp.seg[1] = gemv::Segment<T>{w.up, nullptr, p.act, p.inter};
    gp.n_segments = 2;
    gp.n_total = p.inter;
    gemv_stage<T, gemv::Mode::kNormGateUp>(gp, smem, tile_bytes, xs_bytes, bar, p.split_barrier);
    res = res_out;
  }
  bar.arrive(kGateUp);
  if (pf > 0) {
    prefetch_stage(down_weights(p, w), pf, INT64_MAX);
    prefetch_after_layer();
  }
  x = projection(p, p.act, p.inter, w.down, w.down_bias, p.x_mlp, smem, tile_bytes, xs_bytes, bar, kDown);
}

// grid: at most the blocks resident at once (resident_blocks); kThreads threads; smem_bytes(...) bytes.
template <typename T, int HD, bool INV>
__global__ void __launch_bounds__(kThreads, 1) persistent_draft_kernel(const __grid_constant__ Params<T> p) {
  constexpr int VEC = kVec16<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int max_k = max(max(p.hidden, p.q_rows), p.inter);
  const int tile_bytes = tile_smem_bytes(max_k, static_cast<int>(sizeof(T)));
  const int xs_bytes = (2 * max_k * static_cast<int>(sizeof(T)) + 15) / 16 * 16;
  GridBarrier bar{p.barrier, p.stamps, p.stamp_rows, p.stamp_stride};

  if (blockIdx.x == 0) {  // the steps' positions, written once, before any stage reads them
    for (int j = threadIdx.x; j <= p.gamma; j += kThreads) p.positions[j] = p.cache_len[0] + j;
  }
  int64_t token = p.tokens_in[0];
  bool active = p.active[0];
  int64_t drafted = p.num_drafted[0];
  if (p.prefetch_bytes > 0) prefetch_stage(qkv_weights(p, p.layer[0]), 0, p.prefetch_bytes);
  bar.arrive(kStart);

  for (int j = 0; j <= p.gamma; ++j) {
    if (j > 0 && p.stop_at_exit && !active) break;  // the same in every block: the same merged token
    const T* x = p.embed + token * p.hidden;
    const T* res = nullptr;
    for (int l = 0; l < p.n_layers; ++l) {
      T* exit_row = l == p.n_exit ? p.exit_states + static_cast<int64_t>(j) * p.hidden : nullptr;
      const Layer<T>* next = l + 1 < p.n_layers ? &p.layer[l + 1] : nullptr;
      layer_stages<T, VEC, HD, INV>(p, p.layer[l], next, x, res, exit_row, p.positions + j, smem, tile_bytes,
                                    xs_bytes, bar);
    }
    if (j == p.gamma) break;
    float conf;
    const int idx = draft_head<T, VEC>(p, x, res, smem, bar, conf);
    const int64_t id = p.draft_ids != nullptr ? p.draft_ids[idx < 0 ? 0 : min(idx, p.head_rows - 1)] : idx;
    const bool keep = active && conf >= *p.threshold;  // ordered compare: a NaN confidence is never kept
    drafted += keep ? 1 : 0;
    active = keep;
    token = id;
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      p.draft_tokens[j] = id;
      p.tokens_in[j + 1] = id;
      p.num_drafted[0] = drafted;
      p.active[0] = keep;
    }
  }

  // The last block out resets the counters for the next launch (every block is past its last wait).
  bar.wait();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(p.barrier + 1, 1u) == gridDim.x - 1) {
      p.barrier[0] = 0;
      p.barrier[1] = 0;
      __threadfence();
    }
  }
}

// ---- host side ------------------------------------------------------------------------------------

// Dynamic shared memory of the kernel: the largest stage's (two GEMV tiles, the attention block, the head).
inline int smem_bytes(int hidden, int q_rows, int inter, int head_dim, int elem_size, bool invariant) {
  const int max_k = std::max(std::max(hidden, q_rows), inter);
  const int tiles = kTilesPerBlock * tile_smem_bytes(max_k, elem_size);
  const int attn = attention::smem_layout(head_dim, elem_size, 16 / elem_size, attention::kWarps, invariant).total;
  const int head = 4 * hidden * elem_size + hidden * 4;
  return std::max(std::max(tiles, attn), head);
}

template <typename T, int HD, bool INV>
cudaError_t launch_instance(const Params<T>& p, int grid, int smem, cudaStream_t stream) {
  static_assert(sizeof(Params<T>) <= 32764, "a kernel's parameters take at most 32,764 bytes (CUDA >= 12.1)");
  constexpr auto kernel = persistent_draft_kernel<T, HD, INV>;
  cudaError_t err = ensure_dynamic_smem<kernel>(smem);
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(grid));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = static_cast<size_t>(smem);
  cfg.stream = stream;
  // No PDL: the kernel starts once the stream's previous kernel has finished, so nothing of ours holds an SM
  // it needs. The grid is what the occupancy calculator says fits at once (resident_blocks): every block
  // becomes resident, if need be once other streams' blocks have left, so the barrier cannot wait forever.
  return cudaLaunchKernelEx(&cfg, kernel, p);
}

// The blocks one launch may use: every SM's resident blocks of this instantiation at `smem` bytes.
template <typename T, int HD, bool INV>
int resident_blocks(int smem, int num_sms) {
  constexpr auto kernel = persistent_draft_kernel<T, HD, INV>;
  int per_sm = 0;
  if (ensure_dynamic_smem<kernel>(smem) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, static_cast<size_t>(smem)) !=
          cudaSuccess) {
    return 0;
  }
  return per_sm * num_sms;
}

template <typename T>
struct Instance {
  cudaError_t (*launch)(const Params<T>&, int, int, cudaStream_t);
  int (*resident)(int, int);
};

template <typename T>
Instance<T> instance_for(int head_dim, bool invariant) {
  if (head_dim == 64) {
    return invariant ? Instance<T>{launch_instance<T, 64, true>, resident_blocks<T, 64, true>}
                     : Instance<T>{launch_instance<T, 64, false>, resident_blocks<T, 64, false>};
  }
  return invariant ? Instance<T>{launch_instance<T, 128, true>, resident_blocks<T, 128, true>}
                   : Instance<T>{launch_instance<T, 128, false>, resident_blocks<T, 128, false>};
}

}  // namespace persistent
}  // namespace kangaroo
