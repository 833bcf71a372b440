// The decode-time linear layers of decode_linear.cuh (decode_linear, rms_norm_linear, rms_norm_gate_up)
// on tensor cores, for 16-bit T (bf16, fp16), torch-free. Same prologue (load_rows), same epilogues, same
// results to rounding; the products are summed by mma.sync.m16n8k16 instead of CUDA-core FMAs.
//
// Why: the CUDA-core kernel reads each x row from shared memory once per weight vector, so a block of MB
// rows reads MB times the weight bytes from shared memory. At the Llama-3.2-1B shape on an H100 that made
// verifying 7 positions cost 2.29x verifying one (bench/results/gpu_h100_4d5b778/, round_1b). Here a lane
// reads one 16-byte slice of one x row per weight slice, whatever the number of rows: the rows are the
// mma's A operand (padded to 16 with zeros), so 1 to 8 rows cost the same loads and the same instructions.
//
// Layout. Block = kSplitK warps; it computes one tile of 8 output columns (8 weight rows; for gate_up the
// 8 gate rows and the 8 up rows of the same columns) for MB rows of x: grid (n_total / 8, ceil(M / MB)).
// Warp w takes a contiguous range of K's 32-element chunks. In a chunk, lane (g = lane / 4, q = lane % 4)
// loads weight row n0 + g, elements [32c + 8q, 32c + 8q + 8), and x row g, the same elements, one 16-byte
// access each. Two k16 mmas use them: mma j takes elements 8q + 4j + {0, 1} as k slots 2q + {0, 1} and
// 8q + 4j + {2, 3} as slots 2q + 8 + {0, 1}, in A (a0, a2) and B (b0, b1) alike, so every product pairs
// x[g, k] with w[n, k] for the same k, and the two mmas cover the chunk's 32 elements. A's rows 8..15 (a1, a3)
// are zeros. Lane (g, q) ends with rows g's columns 2q, 2q + 1 (d0, d1).
//
// Batch invariance: row m's sum is, for each warp in order, its chunks in order, two mmas each; then the
// kSplitK warp partials added in warp order. Nothing of that depends on M, MB or the other rows (an mma's
// output element depends only on its own row of A), so a verify step over k+1 positions rounds like k+1
// one-token steps here, as with the CUDA-core kernel. The launcher chooses between the two kernels from
// K, N, the dtype and a process-wide switch, never from M: a plain step and a verify step use the same one.
//
// Requirements (the launcher's `eligible`): 16-bit T, 16-byte aligned pointers, K % 32 == 0, and every
// weight's row count % 8 == 0 (a tile never straddles two weights).
#pragma once

#include <cstdint>

#include "common.cuh"
#include "decode_linear.cuh"

namespace kangaroo {
namespace gemv_mma {

using gemv::Mode;
using gemv::Params;

constexpr int kTileN = 8;    // output columns per block: the mma's n
constexpr int kChunk = 32;   // K elements per lane step: two k16 mmas
constexpr int kSplitK = 4;   // warps per block, each a contiguous range of K's chunks
constexpr int kInFlight = 4;  // weight chunks a lane has in flight per weight row (kDeepInFlight: deep_in_flight)
constexpr int kDeepInFlight = 8;

// d += a · b for one m16n8k16 tile, fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a2, uint32_t b0,
                                                        uint32_t b1) {
  const uint32_t zero = 0;  // A rows 8..15: padding
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(zero), "r"(a2), "r"(zero), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1) {
  const uint32_t zero = 0;
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(zero), "r"(a2), "r"(zero), "r"(b0), "r"(b1));
}

// 16 bytes as four 32-bit words: word i holds elements 2i (low half) and 2i + 1 (high half).
__device__ __forceinline__ uint4 load16(const void* p) { return *reinterpret_cast<const uint4*>(p); }

template <typename T, int NR, int DEPTH>
__device__ __forceinline__ void load_weights(const T* const (&wrow)[NR], int c_first, int c_end,
                                             uint4 (&dst)[NR][DEPTH]) {
#pragma unroll
  for (int u = 0; u < DEPTH; ++u) {
    const int c = c_first + u;
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      if (c < c_end) dst[r][u] = load16(wrow[r] + static_cast<int64_t>(c) * kChunk);
    }
  }
}

// Shared memory of one tile's body besides the dynamic x rows: inverse RMS per row, the warps' partial sums.
template <int MB, Mode MODE>
struct alignas(16) TileScratch {
  static constexpr int kNR = MODE == Mode::kNormGateUp ? 2 : 1;
  float inv_rms[MB];
  float partial[kSplitK][kNR][MB][kTileN];
};

// One tile (8 output columns, row group `row_group` of MB rows of x) on kSplitK warps: threads tid
// 0..kSplitK*32-1 of whoever runs it (nthreads = kSplitK*32, blockDim.x in the op's own launch), `sync` their
// barrier. xs_smem: (MB + 1) * K elements (x rows, norm
// weight). `wait` runs after the first weight loads and before anything reads x (pdl_wait in a launch of its
// own; nothing in the persistent draft kernel, whose grid barrier came before). Tile 0 writes residual_out.
// DEPTH: weight chunks in flight per lane and weight row; it changes when loads are issued, not the order of
// any sum (chunk by chunk, two mmas each), so every DEPTH gives the same bits.
template <typename T, int MB, Mode MODE, class Sync, class Wait, int DEPTH = kInFlight>
__device__ __forceinline__ void gemv_mma_tile(const Params<T>& p, int tile, int row_group, int tid, int nthreads,
                                              T* xs_smem, TileScratch<MB, MODE>& sc, Sync sync, Wait wait) {
  static_assert(sizeof(T) == 2, "tensor-core GEMV: bf16 or fp16");
  static_assert(MB >= 1 && MB <= 8, "at most 8 rows of x per block (the mma's rows 8..15 are padding)");
  constexpr int NR = MODE == Mode::kNormGateUp ? 2 : 1;  // weight tiles per block: gate and up
  constexpr int VEC = kVec16<T>;
  T* xs = xs_smem;          // [MB][K]
  T* nws = xs + MB * p.k;   // [K] (norm modes)

  const int lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int g = lane / 4, q = lane % 4;
  const int n0 = tile * kTileN;
  const int m0 = row_group * MB;
  const int mb = min(MB, p.m - m0);

  // The weight (segment) the tile lies in; the launcher made every segment a whole number of tiles.
  const T* w[NR] = {};
  const T* bias = nullptr;
  T* out = nullptr;
  int n_local0 = 0, n_cols = 1;
  if (MODE == Mode::kNormGateUp) {
    w[0] = p.seg[0].w;
    w[NR - 1] = p.seg[1].w;
    out = p.seg[0].out;
    n_local0 = n0;
    n_cols = p.seg[0].n;
  } else {
    int base = 0;
#pragma unroll
    for (int s = 0; s < gemv::kMaxSegments; ++s) {
      if (s < p.n_segments && n0 >= base && n0 < base + p.seg[s].n) {
        n_local0 = n0 - base;
        w[0] = p.seg[s].w;
        bias = p.seg[s].bias;
        out = p.seg[s].out;
        n_cols = p.seg[s].n;
      }
      base += s < p.n_segments ? p.seg[s].n : 0;
    }
  }
  const T* wrow[NR];
#pragma unroll
  for (int r = 0; r < NR; ++r) wrow[r] = w[r] + static_cast<int64_t>(n_local0 + g) * p.k + q * VEC;

  const int chunks = p.k / kChunk;
  const int c_begin = warp * chunks / kSplitK, c_end = (warp + 1) * chunks / kSplitK;

  // Weights first (they do not depend on the previous kernel), then wait for it, then x.
  uint4 cur[NR][DEPTH];
  load_weights<T, NR, DEPTH>(wrow, c_begin, c_end, cur);
  wait();
  gemv::load_rows<T, VEC, MB, MODE>(p, m0, mb, xs, nws, sc.inv_rms, tid, nthreads, tile == 0, sync);
  sync();

  float d[NR][4];
#pragma unroll
  for (int r = 0; r < NR; ++r)
#pragma unroll
    for (int i = 0; i < 4; ++i) d[r][i] = 0.f;

  const T* xrow = xs + g * p.k + q * VEC;  // row g of x (a padding row when g >= mb: never read)
  for (int c0 = c_begin; c0 < c_end; c0 += DEPTH) {
    uint4 next[NR][DEPTH];
    if (c0 + DEPTH < c_end) load_weights<T, NR, DEPTH>(wrow, c0 + DEPTH, c_end, next);
#pragma unroll
    for (int u = 0; u < DEPTH; ++u) {
      const int c = c0 + u;
      if (c >= c_end) break;
      const uint4 xv = g < mb ? load16(xrow + c * kChunk) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int r = 0; r < NR; ++r) {
        mma_16816<T>(d[r], xv.x, xv.y, cur[r][u].x, cur[r][u].y);  // elements 8q + 0..3
        mma_16816<T>(d[r], xv.z, xv.w, cur[r][u].z, cur[r][u].w);  // elements 8q + 4..7
      }
    }
#pragma unroll
    for (int r = 0; r < NR; ++r)
#pragma unroll
      for (int u = 0; u < DEPTH; ++u) cur[r][u] = next[r][u];
  }

  if (g < mb) {
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      sc.partial[warp][r][g][2 * q] = d[r][0];
      sc.partial[warp][r][g][2 * q + 1] = d[r][1];
    }
  }
  sync();

  // One thread per (row, column): the warps' partials in warp order.
  const int t = tid;
  if (t >= MB * kTileN) return;
  const int m = t / kTileN, col = t % kTileN;
  if (m >= mb) return;
  float v[NR];
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    v[r] = sc.partial[0][r][m][col];
#pragma unroll
    for (int s = 1; s < kSplitK; ++s) v[r] += sc.partial[s][r][m][col];
  }
  const int n_local = n_local0 + col;
  T* dst = out + static_cast<int64_t>(m0 + m) * n_cols + n_local;
  if (MODE == Mode::kNormGateUp) {
    // As decode_linear.cuh: act_fn(gate(x)) * up(x), each op rounded to T.
    const float gv = round_to<T>(v[0]), uv = round_to<T>(v[NR - 1]);
    const float silu = round_to<T>(gv / (1.0f + expf(-gv)));
    *dst = from_float<T>(silu * uv);
  } else {
    *dst = from_float<T>(bias != nullptr ? v[0] + to_float(bias[n_local]) : v[0]);
  }
}

struct PdlWait {
  __device__ __forceinline__ void operator()() const { pdl_wait(); }
};

template <typename T, int MB, Mode MODE, int DEPTH>
__global__ void __launch_bounds__(kSplitK* kWarpSize) gemv_mma_kernel(const Params<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ TileScratch<MB, MODE> sc;
  pdl_launch_dependents();
  gemv_mma_tile<T, MB, MODE, WholeBlock, PdlWait, DEPTH>(p, blockIdx.x, blockIdx.y, threadIdx.x, blockDim.x,
                                                         reinterpret_cast<T*>(smem_raw), sc, WholeBlock{}, PdlWait{});
}

// ---- launch plan ---------------------------------------------------------------------------------

// Whether the tensor-core kernel can run these shapes (the launcher also requires 16-bit T and 16-byte
// aligned pointers). Depends on K and the weights' row counts only, never on M.
inline bool eligible(int k, const int* segment_rows, int n_segments) {
  if (k % kChunk != 0) return false;
  for (int s = 0; s < n_segments; ++s) {
    if (segment_rows[s] % kTileN != 0) return false;
  }
  return true;
}

// Whether a plain projection's lanes keep kDeepInFlight weight chunks in flight instead of kInFlight: where a
// warp has at least 16 chunks of K to stream (K >= 2,048) and the grid has few blocks per SM (the O and down
// projections of Llama-3.2-1B: 256 blocks of 128 threads on 132 SMs, each warp 16 to 64 chunks deep), so
// that each SM has enough bytes in flight to cover DRAM latency. Depends on K and N only, never on M; and
// since DEPTH changes no sum's order, it would not matter if it did. kLinear only: the gate/up tile streams
// two weight rows per lane, whose deeper buffers would cost 64 more registers.
inline bool deep_in_flight(Mode mode, int k, int n_total, int num_sms) {
  return mode == Mode::kLinear && k / kChunk / kSplitK >= 16 && n_total / kTileN < 4 * num_sms;
}

// MB as decode_linear.cuh's plan picks it (the smallest of 1, 2, 4, 8 that holds m, within shared memory).
inline gemv::Plan plan(int m, int k, int n_total, int elem_size, int max_smem) {
  gemv::Plan pl{};
  pl.vec = 16 / elem_size;
  pl.mb = 1;
  while (pl.mb < 8 && pl.mb < m && (2LL * pl.mb + 1) * k * elem_size + 1024 <= max_smem) pl.mb *= 2;
  pl.wpb = kSplitK;
  pl.grid = dim3(static_cast<unsigned>(n_total / kTileN), static_cast<unsigned>(ceil_div(m, pl.mb)));
  pl.smem_bytes = static_cast<int>(static_cast<int64_t>(pl.mb + 1) * k * elem_size);  // x rows + norm weight
  return pl;
}

template <typename T, int MB, Mode MODE, int DEPTH>
cudaError_t launch_instance(const Params<T>& p, const gemv::Plan& pl, Launch stream) {
  constexpr auto kernel = gemv_mma_kernel<T, MB, MODE, DEPTH>;
  const cudaError_t err = ensure_dynamic_smem<kernel>(pl.smem_bytes);
  if (err != cudaSuccess) return err;
  return launch_pdl(kernel, pl.grid, dim3(kSplitK * kWarpSize), static_cast<size_t>(pl.smem_bytes), stream, p);
}

template <typename T, Mode MODE, int DEPTH>
cudaError_t launch_depth(const Params<T>& p, const gemv::Plan& pl, Launch stream) {
  switch (pl.mb) {
    case 1: return launch_instance<T, 1, MODE, DEPTH>(p, pl, stream);
    case 2: return launch_instance<T, 2, MODE, DEPTH>(p, pl, stream);
    case 4: return launch_instance<T, 4, MODE, DEPTH>(p, pl, stream);
    default: return launch_instance<T, 8, MODE, DEPTH>(p, pl, stream);
  }
}

// Launches on `stream`; the caller checked `eligible`, 16-bit T, 16-byte alignment and shared memory.
// deep: deep_in_flight(MODE, ...) (the launcher asks it with the device's SM count).
template <typename T, Mode MODE>
cudaError_t launch(const Params<T>& p, const gemv::Plan& pl, bool deep, Launch stream) {
  if constexpr (MODE == Mode::kLinear) {
    if (deep) return launch_depth<T, MODE, kDeepInFlight>(p, pl, stream);
  }
  return launch_depth<T, MODE, kInFlight>(p, pl, stream);
}

}  // namespace gemv_mma
}  // namespace kangaroo
