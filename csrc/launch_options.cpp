#include "launch_options.h"

#include <atomic>

namespace kangaroo {

namespace {
std::atomic<bool> pdl_enabled{true};  // atomic: set once from Python, read by every launch on any thread
std::atomic<bool> invariant_attention{true};  // config.py's default; set again at import
std::atomic<bool> mma_gemv{true};  // config.py's default; set again at import
std::atomic<bool> split_barrier{false};  // config.py's default; set again at import
std::atomic<bool> deep_prefetch{true};  // config.py's default; set again at import
std::atomic<bool> l2_prefetch{false};  // config.py's default; set again at import
std::atomic<bool> interleaved_splits{true};  // config.py's default; set again at import
std::atomic<bool> warp_chunks{false};  // config.py's default; set again at import
std::atomic<int> max_blocks{0};
std::atomic<int> max_tile_rows{0};
}

bool pdl_launches() { return pdl_enabled.load(std::memory_order_relaxed); }

void set_pdl_launches(bool enabled) { pdl_enabled.store(enabled, std::memory_order_relaxed); }

bool batch_invariant_attention() { return invariant_attention.load(std::memory_order_relaxed); }

void set_batch_invariant_attention(bool enabled) { invariant_attention.store(enabled, std::memory_order_relaxed); }

bool tensor_core_gemv() { return mma_gemv.load(std::memory_order_relaxed); }

void set_tensor_core_gemv(bool enabled) { mma_gemv.store(enabled, std::memory_order_relaxed); }

bool persistent_split_barrier() { return split_barrier.load(std::memory_order_relaxed); }

void set_persistent_split_barrier(bool enabled) { split_barrier.store(enabled, std::memory_order_relaxed); }

bool gemv_deep_prefetch() { return deep_prefetch.load(std::memory_order_relaxed); }

void set_gemv_deep_prefetch(bool enabled) { deep_prefetch.store(enabled, std::memory_order_relaxed); }

bool persistent_l2_prefetch() { return l2_prefetch.load(std::memory_order_relaxed); }

void set_persistent_l2_prefetch(bool enabled) { l2_prefetch.store(enabled, std::memory_order_relaxed); }

bool interleaved_key_splits() { return interleaved_splits.load(std::memory_order_relaxed); }

void set_interleaved_key_splits(bool enabled) { interleaved_splits.store(enabled, std::memory_order_relaxed); }

bool warp_chunk_attention() { return warp_chunks.load(std::memory_order_relaxed); }

void set_warp_chunk_attention(bool enabled) { warp_chunks.store(enabled, std::memory_order_relaxed); }

int persistent_max_blocks() { return max_blocks.load(std::memory_order_relaxed); }

void set_persistent_max_blocks(int blocks) { max_blocks.store(blocks, std::memory_order_relaxed); }

int attention_max_tile_rows() { return max_tile_rows.load(std::memory_order_relaxed); }

void set_attention_max_tile_rows(int rows) { max_tile_rows.store(rows, std::memory_order_relaxed); }

}  // namespace kangaroo
