// Sampling from filtered logits and lossless speculative sampling (kangaroo_ext/ops/reference.py:
// sampling_probs, sample_logits, speculative_sample_accept), torch-free.
//
// One block of kThreads per logit row. A row's distribution is described by four numbers, RowStats:
//   p_i = z_i >= top_k_min && w_i >= top_p_min ? w_i * inv_sum : 0,   z_i = logit_i / T,   w_i = exp(z_i - max_z)
// found with no sorted copy of the row:
//   pass 1        z_i (cached in shared memory when the row fits), max, min, NaN/+inf check
//   top-k search  bisection over z for the k-th largest value (only when 0 < top_k < V)
//   weight pass   w_i (zero below top_k_min; replaces z in the cache) and their sum
//   top-p search  bisection over w for the smallest weight whose strictly heavier tokens weigh < top_p
//   sum pass      the kept weights' sum (only with top-p)
// Each search keeps [lo, hi] on element values and probes one value `mid` halfway between their
// ordered bit patterns per pass: a block reduction gives the count (top-k) or weight (top-p) on one
// side of mid, and the nearest element values on either side, to which lo or hi then snaps. The bit
// distance hi - lo at least halves per pass and lo, hi stay element values, so a search ends exactly
// (lo == hi, the threshold) after at most 32 passes; snapping makes it end as soon as no element lies
// strictly between them (simulated on 49,152-token rows, fp32 or bf16 logits, top-k 50 / top-p 0.9 or
// 0.95: 6 to 17 passes per search). Each pass reads the row from shared memory (the cache) or, when
// V * 4 bytes do not fit (V > ~57,000 on an H100), recomputes it from global memory. All sums are
// block reductions in a fixed order: results are deterministic.
//
// Random numbers: Philox4x32-10, key = the seed's 32-bit halves, counter = (i / 4, row, stream,
// offset), word i % 4, u = ((word >> 9) + 0.5) * 2^-23 in (0, 1). A sample from weights w is the
// exponential race argmax_i w_i / -log(u_i) (first index on ties).
//
// Launches (torch allocations only, no host sync, no state that outlives a call: graph capturable):
//   sampling_probs   probs_kernel, one block per row: the RowStats, then the probabilities.
//   sample_logits    probs_kernel, then sample_race_kernel: ~V / 4096 blocks per row race the written
//                    probabilities; the last block of a row to finish merges the chunk winners.
//   speculative_sample_accept
//     1. accept_rows_kernel, one block per (b, j) row with j <= n_b: the row's RowStats, and for j < n_b
//        the accept test u_j * q_j(x_j) < p_j(x_j), into a small workspace (no probabilities written).
//     2. resample_kernel, ~V / 4096 blocks per b: a = the first rejection; each block races its chunk of
//        row a over max(0, p_a - q_a) and p_a (the fallback when that is all zero, and the bonus when
//        a == n_b); the last block of b merges the chunk winners and writes the outputs.
//   The arrival counters of the split races are zeroed by the launch before, in the same stream.
#pragma once

#include "common.cuh"

namespace kangaroo {
namespace sampling {

constexpr int kThreads = 1024;
constexpr uint32_t kAcceptStream = 0x7fff0000u;  // the accept tests; kAcceptStream + 1: the resample race

// ---- random numbers --------------------------------------------------------------------------------

struct Rng {
  uint32_t key0, key1, offset;
};

// rng: int64 [2] = (seed, offset), read on the device so that the engine can advance it between rounds.
__device__ __forceinline__ Rng read_rng(const int64_t* rng) {
  const uint64_t seed = static_cast<uint64_t>(rng[0]);
  return Rng{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), static_cast<uint32_t>(rng[1])};
}

// Philox4x32-10 (Salmon et al. 2011) on counter (group, row, stream, offset).
__device__ __forceinline__ uint4 philox(const Rng& rng, uint32_t group, uint32_t row, uint32_t stream) {
  uint32_t c0 = group, c1 = row, c2 = stream, c3 = rng.offset;
  uint32_t k0 = rng.key0, k1 = rng.key1;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return make_uint4(c0, c1, c2, c3);
}

__device__ __forceinline__ uint32_t word(const uint4& w, int e) {
  return e == 0 ? w.x : (e == 1 ? w.y : (e == 2 ? w.z : w.w));
}

// Exact in float32 at every step (23-bit integer, + 0.5, times a power of two): never 0 or 1.
__device__ __forceinline__ float uniform(uint32_t bits) {
  return (static_cast<float>(bits >> 9) + 0.5f) * 0x1p-23f;
}

// An Exp(1) clock. logf (not __logf): u close to 1 gives the smallest clocks, i.e. the likely winners,
// and needs full relative accuracy there.
__device__ __forceinline__ float exponential(uint32_t bits) { return -logf(uniform(bits)); }

// ---- a row's distribution ----------------------------------------------------------------------------

struct Filter {
  float temperature;  // > 0
  int top_k;          // 0 or >= V: off
  float top_p;        // >= 1: off
};

struct RowStats {
  float max_z, top_k_min, top_p_min, inv_sum;
  int bad;  // the row has a NaN or +inf z, or only -inf: its probabilities are NaN
};

// z = logit / T rounded once (IEEE division, as torch), + 0 turning -0 into +0 so that equal values have
// one bit pattern in the searches.
template <typename T>
__device__ __forceinline__ float scaled_logit(T x, float temperature) {
  return __fadd_rn(__fdiv_rn(to_float(x), temperature), 0.0f);
}

// Every kernel computes a weight through this one function, so a recomputed weight is bitwise the
// value the searches compared (explicit _rn: no context-dependent contraction).
__device__ __forceinline__ float unnormalized_weight(float z, float max_z) { return expf(__fsub_rn(z, max_z)); }

__device__ __forceinline__ float kept_weight(float z, const RowStats& s) {
  if (z < s.top_k_min) return 0.0f;
  const float w = unnormalized_weight(z, s.max_z);
  return w >= s.top_p_min ? w : 0.0f;
}

// ---- block reductions of one search probe -------------------------------------------------------------

// A probe's per-thread partial: `total` (a count or a weight) and the nearest element values on either
// side of the probe (below: max, above: min).
template <typename A>
struct Probe {
  A total;
  float below, above;
};

template <typename A>
__device__ __forceinline__ Probe<A> warp_reduce(Probe<A> p) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    p.total += __shfl_xor_sync(kFullMask, p.total, offset);
    p.below = fmaxf(p.below, __shfl_xor_sync(kFullMask, p.below, offset));
    p.above = fminf(p.above, __shfl_xor_sync(kFullMask, p.above, offset));
  }
  return p;
}

// Every thread gets the block's result; the order of operations is fixed (deterministic sums).
// scratch: kThreads / 32 entries.
template <typename A>
__device__ Probe<A> block_reduce(Probe<A> p, Probe<A>* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  p = warp_reduce(p);
  if (lane == 0) scratch[warp] = p;
  __syncthreads();
  p = lane < kThreads / kWarpSize ? scratch[lane] : Probe<A>{A(0), -INFINITY, INFINITY};
  p = warp_reduce(p);
  __syncthreads();  // scratch is reused by the next call
  return p;
}

struct Scratch {
  Probe<int> counts[kThreads / kWarpSize];
  Probe<float> weights[kThreads / kWarpSize];
};

// Order-preserving map of floats (no NaN) to integers, and back: a < b iff key(a) < key(b).
__device__ __forceinline__ int64_t ordered_key(float f) {
  const int b = __float_as_int(f);
  return b >= 0 ? b : (b ^ 0x7fffffff);
}

__device__ __forceinline__ float from_ordered_key(int64_t k) {
  const int b = static_cast<int>(k);
  return __int_as_float(b >= 0 ? b : (b ^ 0x7fffffff));
}

// One logit row, its z values read from the shared-memory cache (kCached) or recomputed from global
// memory. After the weight pass the cache holds weights instead (zero below top_k_min).
template <typename T, bool kCached>
struct Row {
  const T* logits;
  int vocab;
  float temperature;
  float* cache;

  __device__ __forceinline__ float z(int i) const {
    return kCached ? cache[i] : scaled_logit(logits[i], temperature);
  }
  __device__ __forceinline__ float weight(int i, float max_z, float top_k_min) const {
    if (kCached) return cache[i];
    const float zi = scaled_logit(logits[i], temperature);
    return zi >= top_k_min ? unnormalized_weight(zi, max_z) : 0.0f;
  }
};

// The k-th largest z counting ties (1 <= k < V): the largest element value t with #{z >= t} >= k.
// Invariant: lo <= answer <= hi, both element values; #{z >= lo} >= k.
template <typename T, bool kCached>
__device__ float kth_largest(const Row<T, kCached>& row, int k, float lo, float hi, Scratch& s) {
  while (lo < hi) {  // block-uniform: lo and hi come from block reductions
    const int64_t klo = ordered_key(lo), khi = ordered_key(hi);
    const float mid = from_ordered_key(klo + (khi - klo + 1) / 2);  // lo < mid <= hi
    Probe<int> p{0, -INFINITY, INFINITY};
    for (int i = threadIdx.x; i < row.vocab; i += kThreads) {
      const float z = row.z(i);
      if (z >= mid) {
        p.total += 1;
        p.above = fminf(p.above, z);
      } else {
        p.below = fmaxf(p.below, z);
      }
    }
    p = block_reduce(p, s.counts);
    // Enough at or above mid: the answer is at least the smallest element there (same count).
    // Too few: every element >= mid fails, the answer is below mid.
    if (p.total >= k) lo = p.above;
    else hi = p.below;
  }
  return lo;
}

// The smallest weight t (an element's) whose strictly heavier tokens weigh < top_p * sum: the top-p
// set is {w >= t}. G(t) = sum of weights > t falls as t grows. Invariant: lo <= answer <= hi.
template <typename T, bool kCached>
__device__ float top_p_threshold(const Row<T, kCached>& row, float max_z, float top_k_min, float sum, float top_p,
                                 float lo, Scratch& s) {
  float hi = 1.0f;  // the top token's weight exp(0); nothing is heavier, so G(1) = 0 < top_p * sum
  while (lo < hi) {
    const int64_t klo = ordered_key(lo), khi = ordered_key(hi);
    const float mid = from_ordered_key(klo + (khi - klo) / 2);  // lo <= mid < hi
    Probe<float> p{0.0f, -INFINITY, INFINITY};
    for (int i = threadIdx.x; i < row.vocab; i += kThreads) {
      const float w = row.weight(i, max_z, top_k_min);
      if (w > mid) {
        p.total += w;
        p.above = fminf(p.above, w);
      } else {
        p.below = fmaxf(p.below, w);
      }
    }
    p = block_reduce(p, s.weights);
    // G(mid) small enough: so is G of the largest element <= mid (same set above it), the answer is
    // at most that element. Otherwise no element <= mid qualifies.
    if (p.total / sum < top_p) hi = p.below;
    else lo = p.above;
  }
  return lo;
}

// All threads of the block call this; returns the same RowStats to every thread.
template <typename T, bool kCached>
__device__ RowStats row_stats(const Row<T, kCached>& row, const Filter& f, Scratch& s) {
  RowStats st{0.0f, -INFINITY, 0.0f, 0.0f, 0};
  Probe<int> first{0, -INFINITY, INFINITY};  // total: bad values; below: max z; above: min z
  for (int i = threadIdx.x; i < row.vocab; i += kThreads) {
    const float z = scaled_logit(row.logits[i], row.temperature);
    if (kCached) row.cache[i] = z;
    first.total += !(z < INFINITY);  // NaN or +inf
    first.below = fmaxf(first.below, z);
    first.above = fminf(first.above, z);
  }
  first = block_reduce(first, s.counts);  // its barrier also publishes the cache
  st.max_z = first.below;
  st.bad = first.total > 0 || first.below == -INFINITY;
  if (st.bad) return st;

  if (f.top_k > 0 && f.top_k < row.vocab) st.top_k_min = kth_largest(row, f.top_k, first.above, first.below, s);

  Probe<float> weights{0.0f, -INFINITY, INFINITY};  // total: sum; above: the smallest weight
  for (int i = threadIdx.x; i < row.vocab; i += kThreads) {
    const float z = row.z(i);
    const float w = z >= st.top_k_min ? unnormalized_weight(z, st.max_z) : 0.0f;
    if (kCached) row.cache[i] = w;  // the same thread read z[i] above: no race
    weights.total += w;
    weights.above = fminf(weights.above, w);
  }
  weights = block_reduce(weights, s.weights);
  float sum = weights.total;

  if (f.top_p < 1.0f) {
    st.top_p_min = top_p_threshold(row, st.max_z, st.top_k_min, sum, f.top_p, weights.above, s);
    Probe<float> kept{0.0f, -INFINITY, INFINITY};
    for (int i = threadIdx.x; i < row.vocab; i += kThreads) {
      const float w = row.weight(i, st.max_z, st.top_k_min);
      kept.total += w >= st.top_p_min ? w : 0.0f;
    }
    sum = block_reduce(kept, s.weights).total;
  }
  st.inv_sum = 1.0f / sum;  // sum >= 1: the top token's weight is 1
  return st;
}

// p_i from the row (the cache holds weights after row_stats).
template <typename T, bool kCached>
__device__ __forceinline__ float probability(const Row<T, kCached>& row, int i, const RowStats& st) {
  if (st.bad) return NAN;
  float w;
  if (kCached) {
    w = row.cache[i];
    w = w >= st.top_p_min ? w : 0.0f;
  } else {
    w = kept_weight(scaled_logit(row.logits[i], row.temperature), st);
  }
  return w * st.inv_sum;
}

__device__ __forceinline__ void race_step(ArgMax& best, float weight, float clock, int i) {
  // Indices arrive in increasing order per thread, so a strict > keeps the first of equal keys.
  if (weight > 0.0f) {
    const float key = weight / clock;
    if (key > best.value || best.index == argmax_empty().index) best = ArgMax{key, i};
  }
}

__device__ __forceinline__ int64_t race_winner(const ArgMax& best) {
  return best.index == argmax_empty().index ? -1 : best.index;
}

// ---- races split over blocks ------------------------------------------------------------------------
// A race over a whole row on one SM would take ~50 instructions per element (Philox, logf, a division)
// for V values. Instead `splits` blocks race one chunk each; each publishes its winners, and the last
// block of the row to finish (counted in `arrivals`, zeroed by the preceding launch) merges them.
// argmax_merge is a strict total order, so the winner does not depend on the arrival order.

constexpr int kRaceThreads = 256;
constexpr int kRaceGroups = 4;          // groups of 4 elements per thread: chunks of >= 4096 elements
constexpr int kMaxRaceSplits = 1024;    // bounds the last block's merge

struct RacePlan {
  int splits, chunk;  // chunk: a multiple of 4, so Philox groups never straddle two blocks
};

inline RacePlan race_plan(int vocab) {
  const int64_t min_chunk = kRaceThreads * kRaceGroups * 4;
  const int64_t splits = std::min<int64_t>(ceil_div(vocab, min_chunk), kMaxRaceSplits);
  const int64_t chunk = ceil_div(ceil_div(vocab, splits), 4) * 4;
  return RacePlan{static_cast<int>(ceil_div(vocab, chunk)), static_cast<int>(chunk)};
}

// All threads call this with their block's N winners (already block-reduced). Returns true in the last
// block of the row, whose threads may then read every block's partials with merge_partials.
// partials: this row's [splits * N]; arrivals: this row's counter.
template <int N>
__device__ bool publish_partials(const ArgMax (&best)[N], ArgMax* partials, int split, int splits,
                                 unsigned* arrivals) {
  __shared__ bool last;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < N; ++w) partials[split * N + w] = best[w];
    __threadfence();  // the partials are visible device-wide before the arrival is counted
    last = atomicAdd(arrivals, 1u) == static_cast<unsigned>(splits - 1);
  }
  __syncthreads();
  if (last) __threadfence();  // pairs with the other blocks' fences: their partials are visible now
  return last;
}

// Warp-wide (call from one whole warp): the winner `which` of N over all the row's blocks.
template <int N>
__device__ ArgMax merge_partials(const ArgMax* partials, int splits, int which) {
  ArgMax best = argmax_empty();
  for (int t = threadIdx.x % kWarpSize; t < splits; t += kWarpSize) {
    const ArgMax* p = partials + t * N + which;
    argmax_merge(best, __ldcg(&p->value), __ldcg(&p->index));  // L2: never a stale L1 line
  }
  return warp_argmax(best);
}

// ---- sampling_probs / sample_logits ---------------------------------------------------------------------

// One block per row: logits [rows, vocab] -> probs [rows, vocab]; top_probs [rows] and arrivals [rows]
// (zeroed for sample_race_kernel) when not null. Dynamic shared memory: vocab floats when kCached.
template <typename T, bool kCached>
__global__ void __launch_bounds__(kThreads)
probs_kernel(const T* __restrict__ logits, int vocab, Filter filter, float* __restrict__ probs,
             float* __restrict__ top_probs, unsigned* __restrict__ arrivals) {
  extern __shared__ float4 dynamic_smem[];
  __shared__ Scratch s;
  const int64_t r = blockIdx.x;
  if (arrivals != nullptr && threadIdx.x == 0) arrivals[r] = 0;
  const Row<T, kCached> row{logits + r * vocab, vocab, filter.temperature, reinterpret_cast<float*>(dynamic_smem)};
  const RowStats st = row_stats(row, filter, s);
  float* out = probs + r * vocab;
  for (int i = threadIdx.x; i < vocab; i += kThreads) out[i] = probability(row, i, st);
  if (top_probs != nullptr && threadIdx.x == 0) top_probs[r] = st.bad ? NAN : st.inv_sum;  // the top weight is 1
}

// sample_logits' second launch: `splits` blocks per row (blockIdx.x = row * splits + split) race the
// probabilities probs_kernel wrote (a NaN row has no p > 0: token -1). partials [rows * splits].
__global__ void __launch_bounds__(kRaceThreads)
sample_race_kernel(const float* __restrict__ probs, int vocab, const int64_t* __restrict__ rng, uint32_t stream,
                   int splits, int chunk, ArgMax* __restrict__ partials, unsigned* __restrict__ arrivals,
                   int64_t* __restrict__ tokens) {
  __shared__ ArgMax scratch[kRaceThreads / kWarpSize];
  const int64_t r = blockIdx.x / splits;
  const int split = static_cast<int>(blockIdx.x % splits);
  const float* p_row = probs + r * vocab;
  const Rng rand = read_rng(rng);
  const int begin = split * chunk, end = min(vocab, begin + chunk);
  ArgMax best[1] = {argmax_empty()};
  for (int i0 = begin + 4 * static_cast<int>(threadIdx.x); i0 < end; i0 += 4 * kRaceThreads) {
    const uint4 words = philox(rand, static_cast<uint32_t>(i0 / 4), static_cast<uint32_t>(r), stream);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = i0 + e;
      if (i < end) {
        const float p = p_row[i];
        if (p > 0.0f) race_step(best[0], p, exponential(word(words, e)), i);
      }
    }
  }
  best[0] = block_argmax(best[0], scratch);
  if (!publish_partials(best, partials + r * splits, split, splits, arrivals + r)) return;
  if (threadIdx.x < kWarpSize) {
    const ArgMax winner = merge_partials<1>(partials + r * splits, splits, 0);
    if (threadIdx.x == 0) tokens[r] = race_winner(winner);
  }
}

// ---- speculative_sample_accept ------------------------------------------------------------------------

enum Verdict : int { kRejected = 0, kAccepted = 1, kBadRow = 2, kNoTest = 3 };

struct RowVerdict {
  RowStats stats;
  int verdict;
};

// What launch 2 needs besides the outputs, carved by the caller from one allocation (see Workspace
// sizes in the launcher): rows [B * (k+1)]; partials [B * splits * 2] (each block's residual and p race
// winners); arrivals [B] (blocks of b done so far, zeroed by launch 1).
struct Workspace {
  RowVerdict* rows;
  ArgMax* partials;
  unsigned* arrivals;
};

__device__ __forceinline__ int drafted(const int64_t* num_drafted, int64_t b, int k) {
  if (num_drafted == nullptr) return k;
  const int64_t n = num_drafted[b];
  return static_cast<int>(n < 0 ? 0 : (n > k ? k : n));
}

// Launch 1: one block per (b, j), blockIdx.x = b * (k+1) + j. logits [B, k+1, V]; draft_tokens [B, k];
// draft_probs [B, k, V]. Rows j > n_b are left unwritten: launch 2 never reads them.
template <typename T, bool kCached>
__global__ void __launch_bounds__(kThreads)
accept_rows_kernel(const T* __restrict__ logits, int vocab, int k, Filter filter,
                   const int64_t* __restrict__ draft_tokens, const float* __restrict__ draft_probs,
                   const int64_t* __restrict__ num_drafted, const int64_t* __restrict__ rng, Workspace ws) {
  extern __shared__ float4 dynamic_smem[];
  __shared__ Scratch s;
  const int64_t r = blockIdx.x;
  const int64_t b = r / (k + 1);
  const int j = static_cast<int>(r % (k + 1));
  if (j == 0 && threadIdx.x == 0) ws.arrivals[b] = 0;  // launch 2 starts after this grid: no reset race
  const int n = drafted(num_drafted, b, k);
  if (j > n) return;  // block-uniform
  const Row<T, kCached> row{logits + r * vocab, vocab, filter.temperature, reinterpret_cast<float*>(dynamic_smem)};
  const RowStats st = row_stats(row, filter, s);
  if (threadIdx.x != 0) return;

  int verdict = kNoTest;  // j == n: the bonus row, no draft to test
  if (st.bad) {
    verdict = kBadRow;
  } else if (j < n) {
    const int64_t x = draft_tokens[b * k + j];
    float p = 0.0f, q = 0.0f;  // a draft outside the vocabulary has p = q = 0: rejected
    if (x >= 0 && x < vocab) {
      p = kept_weight(scaled_logit(row.logits[x], filter.temperature), st) * st.inv_sum;
      q = draft_probs[(b * k + j) * static_cast<int64_t>(vocab) + x];
    }
    const float u = uniform(word(philox(read_rng(rng), j / 4, static_cast<uint32_t>(b), kAcceptStream), j % 4));
    verdict = u * q < p ? kAccepted : kRejected;  // u < min(1, p / q) without dividing
  }
  ws.rows[r] = RowVerdict{st, verdict};
}

// Launch 2: race_plan(V).splits blocks per b (blockIdx.x = b * splits + split), each racing one chunk of
// row a; the last block of b merges the winners and writes accepted [B] and committed [B, k+1].
template <typename T>
__global__ void __launch_bounds__(kRaceThreads)
resample_kernel(const T* __restrict__ logits, int vocab, int k, Filter filter,
                const int64_t* __restrict__ draft_tokens, const float* __restrict__ draft_probs,
                const int64_t* __restrict__ num_drafted, const int64_t* __restrict__ rng, Workspace ws, int splits,
                int chunk, int64_t* __restrict__ accepted, int64_t* __restrict__ committed) {
  __shared__ ArgMax scratch[kRaceThreads / kWarpSize];
  __shared__ int first_reject;
  const int64_t b = blockIdx.x / splits;
  const int split = static_cast<int>(blockIdx.x % splits);
  const int n = drafted(num_drafted, b, k);
  const RowVerdict* verdicts = ws.rows + b * (k + 1);
  if (threadIdx.x == 0) first_reject = n;
  __syncthreads();
  bool bad = false;
  for (int j = threadIdx.x; j <= n; j += kRaceThreads) {
    const int v = verdicts[j].verdict;
    bad |= v == kBadRow;
    if (j < n && v != kAccepted) atomicMin(&first_reject, j);  // an integer min: order-independent
  }
  bad = __syncthreads_or(bad);  // also publishes first_reject
  const int a = first_reject;
  int64_t* out = committed + b * (k + 1);
  if (bad) {  // every block of b sees it; the first writes the voided row, none counts arrivals
    if (split == 0) {
      for (int j = threadIdx.x; j <= k; j += kRaceThreads) out[j] = -1;
      if (threadIdx.x == 0) accepted[b] = -1;
    }
    return;
  }

  // Race max(0, p_a - q_a) (after a rejection) and p_a (the fallback when that is all zero, and the
  // bonus token when a == n) over this block's chunk, with the same clocks (stream kAcceptStream + 1,
  // row b). best[0]: the residual's winner, best[1]: p_a's.
  const RowStats st = verdicts[a].stats;
  const T* row_logits = logits + (b * (k + 1) + a) * static_cast<int64_t>(vocab);
  const bool rejected = a < n;
  const float* q_row = draft_probs + (b * k + (rejected ? a : 0)) * static_cast<int64_t>(vocab);
  const Rng rand = read_rng(rng);
  const int begin = split * chunk, end = min(vocab, begin + chunk);
  ArgMax best[2] = {argmax_empty(), argmax_empty()};
  for (int i0 = begin + 4 * static_cast<int>(threadIdx.x); i0 < end; i0 += 4 * kRaceThreads) {
    const uint4 words = philox(rand, static_cast<uint32_t>(i0 / 4), static_cast<uint32_t>(b), kAcceptStream + 1);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = i0 + e;
      if (i < end) {
        const float p = kept_weight(scaled_logit(row_logits[i], filter.temperature), st) * st.inv_sum;
        if (p > 0.0f) {  // the residual is zero wherever p is
          const float clock = exponential(word(words, e));
          if (rejected) race_step(best[0], fmaxf(p - q_row[i], 0.0f), clock, i);
          race_step(best[1], p, clock, i);
        }
      }
    }
  }
  best[0] = block_argmax(best[0], scratch);
  best[1] = block_argmax(best[1], scratch);
  ArgMax* partials = ws.partials + b * splits * 2;
  if (!publish_partials(best, partials, split, splits, ws.arrivals + b)) return;
  if (threadIdx.x < kWarpSize) {
    const ArgMax residual = merge_partials<2>(partials, splits, 0);
    const ArgMax p = merge_partials<2>(partials, splits, 1);
    const int64_t token = residual.index != argmax_empty().index ? race_winner(residual) : race_winner(p);
    const int64_t* drafts = draft_tokens + b * k;
    for (int j = threadIdx.x; j <= k; j += kWarpSize) out[j] = j < a ? drafts[j] : (j == a ? token : -1);
    if (threadIdx.x == 0) accepted[b] = a;
  }
}

// ---- launch helpers (the caller checks errors) ------------------------------------------------------

// Whether a row's z values fit the block's shared memory next to the static Scratch.
inline bool row_fits_smem(int vocab, int max_smem_optin) {
  return static_cast<int64_t>(vocab) * 4 + static_cast<int64_t>(sizeof(Scratch)) + 1024 <= max_smem_optin;
}

// One block per row. top_probs / arrivals may be null (sampling_probs).
template <typename T>
cudaError_t launch_probs(const T* logits, int64_t rows, int vocab, const Filter& filter, float* probs,
                         float* top_probs, unsigned* arrivals, int max_smem_optin, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows));
  if (row_fits_smem(vocab, max_smem_optin)) {
    const int smem = vocab * 4;
    const cudaError_t err = ensure_dynamic_smem<probs_kernel<T, true>>(smem);
    if (err != cudaSuccess) return err;
    probs_kernel<T, true><<<grid, kThreads, smem, stream>>>(logits, vocab, filter, probs, top_probs, arrivals);
  } else {
    probs_kernel<T, false><<<grid, kThreads, 0, stream>>>(logits, vocab, filter, probs, top_probs, arrivals);
  }
  return cudaGetLastError();
}

// sample_logits: launch_probs, then the split race. partials: rows * plan.splits; arrivals: rows.
template <typename T>
cudaError_t launch_sample(const T* logits, int64_t rows, int vocab, const Filter& filter, const int64_t* rng,
                          uint32_t stream_id, const RacePlan& plan, ArgMax* partials, unsigned* arrivals,
                          float* probs, int64_t* tokens, float* top_probs, int max_smem_optin, cudaStream_t stream) {
  cudaError_t err = launch_probs(logits, rows, vocab, filter, probs, top_probs, arrivals, max_smem_optin, stream);
  if (err != cudaSuccess) return err;
  sample_race_kernel<<<static_cast<unsigned>(rows * plan.splits), kRaceThreads, 0, stream>>>(
      probs, vocab, rng, stream_id, plan.splits, plan.chunk, partials, arrivals, tokens);
  return cudaGetLastError();
}

// ws: rows [B * (k+1)], partials [B * plan.splits * 2], arrivals [B].
template <typename T>
cudaError_t launch_accept(const T* logits, int64_t batch, int k, int vocab, const Filter& filter,
                          const int64_t* draft_tokens, const float* draft_probs, const int64_t* num_drafted,
                          const int64_t* rng, const RacePlan& plan, Workspace ws, int64_t* accepted,
                          int64_t* committed, int max_smem_optin, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(batch * (k + 1)));
  if (row_fits_smem(vocab, max_smem_optin)) {
    const int smem = vocab * 4;
    const cudaError_t err = ensure_dynamic_smem<accept_rows_kernel<T, true>>(smem);
    if (err != cudaSuccess) return err;
    accept_rows_kernel<T, true><<<grid, kThreads, smem, stream>>>(logits, vocab, k, filter, draft_tokens,
                                                                  draft_probs, num_drafted, rng, ws);
  } else {
    accept_rows_kernel<T, false><<<grid, kThreads, 0, stream>>>(logits, vocab, k, filter, draft_tokens,
                                                                draft_probs, num_drafted, rng, ws);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  resample_kernel<T><<<static_cast<unsigned>(batch * plan.splits), kRaceThreads, 0, stream>>>(
      logits, vocab, k, filter, draft_tokens, draft_probs, num_drafted, rng, ws, plan.splits, plan.chunk, accepted,
      committed);
  return cudaGetLastError();
}

}  // namespace sampling
}  // namespace kangaroo
