// The grid-wide barrier of a persistent kernel (persistent_draft.cuh), torch-free: an arrival counter in global
// memory that every block of an occupancy-sized grid (all blocks resident at once) increments and polls,
// split into arrive and wait so a stage can issue loads that depend on nothing between the two; per-stage
// timing stamps; and last_arrival, for a task a few blocks share.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace kangaroo {
namespace persistent {

__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// One arrival: everything this thread has seen (its block's writes, through the __syncthreads before) is ordered
// before the increment (fence.acq_rel is cumulative), and the increment is a reduction with no value to wait for.
// fence.acq_rel.gpu instead of __threadfence's fence.sc.gpu: a barrier needs release/acquire, not a single
// total order of fences (the pattern of CUTLASS's GenericBarrier::arrive_inc).
__device__ __forceinline__ void red_release(unsigned* p, unsigned v) {
  asm volatile("fence.acq_rel.gpu;\n\tred.relaxed.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// What each barrier ends (stage timing: Params::stamps). kMerge: the attention splits' merge, once a stage of its
// own; the last split of each tile now merges it inside the attention stage (last_arrival), so no barrier ends it.
enum Stage : int { kStart = 0, kQKV, kAttention, kMerge, kO, kGateUp, kDown, kHead };

// The barrier buffer: [0] the grid barrier's arrivals, [1] its departures (the launch's end), then one arrival
// counter per attention tile (KV head) for its key splits; every counter is zero between launches.
constexpr int kBarrierWords = 64;
constexpr int kTileCounters = 2;                             // the first tile counter's index
constexpr int kMaxTiles = kBarrierWords - kTileCounters;

// One thread of a block that has finished its share of a task n blocks share (its writes ordered before by the
// caller's __syncthreads): whether it is the last of the n to arrive at `counter`. The last one resets the
// counter for the next use (after a grid barrier) and acquires the others' writes; as GridBarrier does.
__device__ __forceinline__ bool last_arrival(unsigned* counter, int n) {
  __threadfence();  // this block's writes, before its arrival
  const bool last = atomicAdd(counter, 1u) == static_cast<unsigned>(n - 1);
  if (last) {
    *counter = 0;
    __threadfence();
  }
  return last;
}

__device__ __forceinline__ int64_t global_ns() {
  int64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// The grid barrier, in two halves: arrive (the block's stage is done) and wait (every block has arrived).
// `target` counts arrivals. sync() is both at once. With `split`, a GEMV stage waits inside its tile bodies,
// after their first weight loads (which depend on nothing earlier), as the per-op kernels do across launches
// with programmatic dependent launch: the weights' latency then overlaps the barrier. A block never arrives
// at barrier k before it has passed k - 1 (arrive waits first if it has not), so arrivals cannot be counted
// towards the wrong barrier. With a stamps buffer, thread 0 of each block records for barrier k the stage it
// ends and the global timer at its arrival and its departure: stamps [rows][stride >= gridDim.x][3] int64.
struct GridBarrier {
  unsigned* counter;
  int64_t* stamps;  // null: no timing
  int rows, stride;
  unsigned target = 0;
  int k = 0;
  bool pending = false;  // arrived at barrier k - 1 and not yet seen it complete (uniform over the block)

  __device__ __forceinline__ int64_t* row(int index) const {
    return stamps != nullptr && index < rows ? stamps + (static_cast<int64_t>(index) * stride + blockIdx.x) * 3
                                             : nullptr;
  }
  // One thread: until barrier k - 1 completes. The acquiring load orders what follows after every block's
  // arrival, and the caller's block barrier passes that on to its other threads (no fence after it).
  __device__ __forceinline__ void spin() const {
    while (load_acquire(counter) < target) {
    }
  }
  __device__ __forceinline__ void arrive(Stage stage) {
    __syncthreads();
    if (threadIdx.x == 0) {
      if (pending) spin();
      if (int64_t* r = row(k)) {
        r[0] = stage;
        r[1] = global_ns();
      }
      red_release(counter, 1u);  // this block's writes (ordered by the __syncthreads above), then its arrival
    }
    target += gridDim.x;
    pending = true;
    ++k;
  }
  __device__ __forceinline__ void wait() {  // every thread of the block
    if (!pending) return;
    if (threadIdx.x == 0) {
      spin();
      if (int64_t* r = row(k - 1)) r[2] = global_ns();
    }
    pending = false;
    __syncthreads();
  }
  // The wait of one 128-thread tile body (its thread tid of 128, its named barrier): see `split`.
  // `sync` (NamedBarrier) counts threads one by one, so lanes 1-31 may wait there while lane 0 still spins.
  template <class Sync>
  __device__ __forceinline__ void wait_tile(int tid, Sync sync) const {
    if (tid == 0) {
      spin();
      if (threadIdx.x == 0) {
        if (int64_t* r = row(k - 1)) r[2] = global_ns();
      }
    }
    sync();
  }
  __device__ __forceinline__ void sync(Stage stage) {
    arrive(stage);
    wait();
  }
};

}  // namespace persistent
}  // namespace kangaroo
