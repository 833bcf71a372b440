// Process-wide launch settings of the CUDA launchers, set from Python (kangaroo_ext/_extension.py reads
// them through kangaroo_ext/config.py and sets them once, at import). The kernel headers
// never read them: each launcher passes them down as a kernels/common.cuh `Launch`.
#pragma once

namespace kangaroo {

// Whether kernels may launch with programmatic dependent launch (default true).
bool pdl_launches();
void set_pdl_launches(bool enabled);

// Whether attention uses its batch-invariant PV order where the tile allows it (default true since its GPU
// tests passed; csrc/kernels/attention.cuh, "Batch invariance").
bool batch_invariant_attention();
void set_batch_invariant_attention(bool enabled);

// Whether the 16-bit decode GEMVs run on tensor cores where the shapes allow it (default true since their GPU
// tests passed on the H100 at 50fdea6; csrc/kernels/decode_linear_mma.cuh).
bool tensor_core_gemv();
void set_tensor_core_gemv(bool enabled);

// Whether the persistent draft kernel's GEMV stages wait for the grid barrier inside their tiles, after the
// weight loads (default false until its GPU tests run; csrc/kernels/persistent_draft.cuh, GridBarrier).
bool persistent_split_barrier();
void set_persistent_split_barrier(bool enabled);

// Whether tensor-core GEMVs with long K on few blocks keep more weight loads in flight (default true since its
// GPU tests passed on the H100 at 71757c1; csrc/kernels/decode_linear_mma.cuh, deep_in_flight). Same bits.
bool gemv_deep_prefetch();
void set_gemv_deep_prefetch(bool enabled);

// Whether the persistent draft kernel asks the L2 for the next GEMV stage's weights while it waits at a barrier
// (default false until its GPU tests run; csrc/kernels/persistent_draft.cuh, "L2 prefetch"). Same bits either way.
bool persistent_l2_prefetch();
void set_persistent_l2_prefetch(bool enabled);

// Whether attention deals each tile's keys to its splits in fixed units, round-robin, instead of cutting the
// range into contiguous chunks that grow with it (csrc/kernels/key_split.h): then a verified row is the decode
// step's row past 512 keys too. Default false until its GPU tests run. Changes bits past 512 keys.
bool interleaved_key_splits();
void set_interleaved_key_splits(bool enabled);

// Whether attention runs csrc/kernels/warp_chunk_attention.cuh (a warp per 32-key chunk, no block barrier in the
// key loop) where it can take the launch (16-bit, head dim 64 / 128, few query rows), else attention.cuh. Default
// false until its GPU tests pass. Batch-invariant by construction; changes bits against attention.cuh.
bool warp_chunk_attention();
void set_warp_chunk_attention(bool enabled);

// The most blocks one persistent draft kernel launch may use (default 0: every block that fits at once; a cap
// above that changes nothing). Blocks only divide the tiles, heads and head rows among themselves, so the bits are
// the same at any cap but the draft confidence's last bits (its softmax sum merges one partial a block). For
// benchmarks that ask how a stage's and a barrier's time scale with the grid.
int persistent_max_blocks();
void set_persistent_max_blocks(int blocks);

// The most query rows of one attention q-tile at decode and verify sizes (default 0: no cap below the kernel's
// own; csrc/kernels/attention.cuh, plan). A cap cuts a verify tile into several q-tiles of whole tokens, each a
// block per key split. The same bits as uncapped where both plans are batch-invariant. For benchmarks that ask
// whether more, lighter blocks make a verify step's attention cheaper.
int attention_max_tile_rows();
void set_attention_max_tile_rows(int rows);

}  // namespace kangaroo
