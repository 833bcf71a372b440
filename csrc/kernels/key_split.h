// How attention deals a tile's key range [klo, khi] to the tile's key splits (one block each: attention.cuh's
// per-op kernel and the persistent kernel's attention stage). Torch-free and CUDA-optional: the host test
// (tests/test_key_split.py) compiles this header with the system C++ compiler and checks, for every decode
// position and verify width, the property it exists for.
//
// contiguous (the default): split z takes keys [klo + z * chunk, klo + (z + 1) * chunk), where
//     chunk = roundup(max(ceil(len / n_splits), min_chunk), kKeyTile) and len = khi - klo + 1.
//   A decode step at position p has len = p + 1; a verify tile holding that position has len = p0 + T, up to
//   T - 1 more. Below n_splits * kKeyTile keys the chunk is min_chunk either way; past that it grows with len,
//   so the split boundaries a verified row sees can differ from the decode step's at its position: its keys
//   are summed and merged in another order, and bf16 output can flip at near-ties (the long MT-bench and
//   Spec-Bench turns that differ from plain decoding, H100, 80eb2b7).
// interleaved (KANGAROO_INTERLEAVED_KEY_SPLITS): units of min_chunk keys from klo, unit u to split
//   u % n_splits, each split walking its units in order. Which split reads a key, and in what order, then
//   depends on the key's index alone (and on klo, which is 0 without a sliding window; with one, a verify
//   tile's klo is its first row's, and its later rows are not promised the decode step's order). A verified
//   row's extra keys (past its own position) come after its real ones in each split, masked (weight exactly
//   0), or in a split the decode step leaves empty (its merge weight is exactly 0). With the same min_chunk
//   (the invariant plans' is kKeyTile), a verified row is the decode step's row at any context length. Each
//   split still reads ~len / n_splits keys.
#pragma once

#if defined(__CUDACC__)
#define KANGAROO_KEY_SPLIT_FN __host__ __device__ __forceinline__
#else
#define KANGAROO_KEY_SPLIT_FN inline
#endif

namespace kangaroo {
namespace attention {

constexpr int kKeyTile = 64;  // keys per shared-memory tile (two per lane in QK^T)

// One split's share: n_tiles key tiles of kKeyTile keys, the it-th starting at tile_key(it); keys past
// `hi` in a tile are not this split's (zero-filled, masked). n_used: the splits that get keys (the merge's
// count; 0 when the range is empty), the same for every split of the tile.
struct KeySplit {
  int n_used = 0;
  int n_tiles = 0;
  int first = 0;        // key of the split's first tile
  int hi = -1;          // last key the split may read
  int unit_tiles = 1;   // tiles per unit (consecutive)
  int unit_step = 0;    // keys from one of the split's units to its next
  KANGAROO_KEY_SPLIT_FN int tile_key(int it) const {
    return first + (it / unit_tiles) * unit_step + (it % unit_tiles) * kKeyTile;
  }
};

// min_chunk: a multiple of kKeyTile; z: the split (0 <= z < n_splits).
KANGAROO_KEY_SPLIT_FN KeySplit split_keys(int klo, int khi, int n_splits, int min_chunk, bool interleaved, int z) {
  KeySplit s;
  if (klo > khi) return s;
  const int len = khi - klo + 1;
  if (interleaved) {
    const int units = (len + min_chunk - 1) / min_chunk;
    s.n_used = units < n_splits ? units : n_splits;
    if (z >= s.n_used) return s;
    const int mine = (units - z + n_splits - 1) / n_splits;   // units z, z + n_splits, ...
    const int last = klo + (z + (mine - 1) * n_splits) * min_chunk;
    s.unit_tiles = min_chunk / kKeyTile;
    s.unit_step = n_splits * min_chunk;
    s.first = klo + z * min_chunk;
    s.hi = khi;
    const int last_tiles = (khi - last + kKeyTile) / kKeyTile;  // the last unit may be cut by khi
    s.n_tiles = (mine - 1) * s.unit_tiles + (last_tiles < s.unit_tiles ? last_tiles : s.unit_tiles);
    return s;
  }
  int chunk = (len + n_splits - 1) / n_splits;
  chunk = chunk > min_chunk ? chunk : min_chunk;
  chunk = (chunk + kKeyTile - 1) / kKeyTile * kKeyTile;
  s.n_used = (len + chunk - 1) / chunk;
  if (z >= s.n_used) return s;
  s.first = klo + z * chunk;
  s.hi = (s.first + chunk < khi + 1 ? s.first + chunk : khi + 1) - 1;
  s.n_tiles = (s.hi - s.first + kKeyTile) / kKeyTile;
  s.unit_tiles = s.n_tiles;
  return s;
}

}  // namespace attention
}  // namespace kangaroo
