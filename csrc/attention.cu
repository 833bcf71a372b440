// ATen launcher for kernels/attention.cuh (one launch: see that header). Checks arguments as
// kangaroo_ext/ops/validate.py does, allocates the output with torch (the caching allocator: during
// CUDA-graph capture it comes from the graph's pool) and launches on the current stream. positions
// stay on the device: no host sync, so the op is capturable.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>

#include "checks.h"
#include "device_info.h"
#include "dispatch.cuh"
#include "attention_plan.h"
#include "kernels/attention.cuh"
#include "kernels/warp_chunk_attention.cuh"
#include "launch_options.h"
#include "ops.h"

namespace kangaroo {

// The launcher's plan (attention_plan.h): the batch-invariant PV order where the switch asks for it, the dtype is
// 16-bit (its GPU tests, the op test and bf16 decoding equal to plain decoding, ran on those; fp32 keeps the order
// its lossless tests passed with until they run with it), the tile allows it and its larger reduction fits the
// shared memory; else the default order. attention_invariant_max_tokens and the persistent draft kernel's
// launcher ask the same question.
attention::Plan attention_launch_plan(int batch, int tokens, int hkv, int group, int head_dim, int cache_len,
                                      int elem_size, bool vec16, int num_sms, int max_smem, bool clusters) {
  const bool invariant = batch_invariant_attention() && elem_size == 2;
  const bool interleaved = interleaved_key_splits();
  const int max_tile_rows = attention_max_tile_rows();
  attention::Plan pl = attention::plan(batch, tokens, hkv, group, head_dim, cache_len, elem_size, vec16, num_sms,
                                       clusters, invariant, interleaved, max_tile_rows);
  if (pl.invariant && pl.smem_bytes + 1024 > max_smem) {
    pl = attention::plan(batch, tokens, hkv, group, head_dim, cache_len, elem_size, vec16, num_sms, clusters, false,
                         interleaved, max_tile_rows);
  }
  return pl;
}

at::Tensor rope_append_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& rope_cos, const at::Tensor& rope_sin, const at::Tensor& positions,
                                 at::Tensor& k_cache, at::Tensor& v_cache, double scale, int64_t window) {
  const std::pair<const char*, const at::Tensor*> all[] = {
      {"q", &q},           {"k", &k},           {"v", &v},           {"rope_cos", &rope_cos},
      {"rope_sin", &rope_sin}, {"positions", &positions}, {"k_cache", &k_cache}, {"v_cache", &v_cache}};
  for (const auto& [name, t] : all) {
    checks::cuda(*t, name);
    checks::contiguous(*t, name);
    if (t != &q) checks::same_device(*t, name, q, "q");
  }
  const auto dt = q.scalar_type();
  TORCH_CHECK_VALUE((dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16) && q.dim() == 4,
                    "q must be a float32/float16/bfloat16 tensor [B, T, Hq, D], got ", dt, " ", q.sizes());
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), D = q.size(3);
  TORCH_CHECK_VALUE(B >= 1 && T >= 1 && D >= 2 && D % 2 == 0,
                    "q must have B, T >= 1 and an even head dim D >= 2, got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4 && k.size(0) == B && k.size(1) == T && k.size(3) == D, "k must have shape [B, T, Hkv, D] = [",
                    B, ", ", T, ", Hkv, ", D, "], got ", k.sizes());
  const int64_t Hkv = k.size(2);
  TORCH_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0, "k's head count ", Hkv, " must divide q's head count ", Hq,
                    " (grouped-query attention)");
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v must have k's shape ", k.sizes(), ", got ", v.sizes());
  const std::pair<const char*, const at::Tensor*> same_dtype[] = {
      {"k", &k}, {"v", &v}, {"k_cache", &k_cache}, {"v_cache", &v_cache}};
  for (const auto& [name, t] : same_dtype) {
    TORCH_CHECK_VALUE(t->scalar_type() == dt, name, " must have q's dtype ", dt, ", got ", t->scalar_type());
  }
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && k_cache.size(0) == B && k_cache.size(1) == Hkv && k_cache.size(3) == D,
                    "k_cache must have shape [B, Hkv, S, D] = [", B, ", ", Hkv, ", S, ", D, "], got ", k_cache.sizes());
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "v_cache must have k_cache's shape ", k_cache.sizes(),
                    ", got ", v_cache.sizes());
  const int64_t S = k_cache.size(2);
  const std::pair<const char*, const at::Tensor*> tables[] = {{"rope_cos", &rope_cos}, {"rope_sin", &rope_sin}};
  for (const auto& [name, t] : tables) {
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(1) == D && t->size(0) >= S, name,
                      " must be float32 [S', D] with S' >= ", S, " (the cache length) and D = ", D, ", got ",
                      t->scalar_type(), " ", t->sizes());
  }
  TORCH_CHECK_VALUE(positions.scalar_type() == at::kLong && positions.dim() == 2 && positions.size(0) == B &&
                        positions.size(1) == T,
                    "positions must be int64 of shape [", B, ", ", T, "], got ", positions.scalar_type(), " ",
                    positions.sizes());
  TORCH_CHECK_VALUE(scale > 0, "scale must be a float > 0, got ", scale);  // also rejects NaN
  TORCH_CHECK_VALUE(window >= 0, "window must be an int >= 0 (0: no sliding window), got ", window);
  // Limits of this implementation (indices are int inside the kernels).
  TORCH_CHECK_VALUE(D <= attention::kMaxHeadDim, "q's head dim D = ", D, " is above the CUDA kernel's limit of ",
                    attention::kMaxHeadDim);
  TORCH_CHECK_VALUE(S < (int64_t{1} << 30) && T < (int64_t{1} << 30),
                    "k_cache's length S and q's token count T must be < 2^30, got S = ", S, ", T = ", T);
  const int64_t G = Hq / Hkv;
  TORCH_CHECK_VALUE(B * Hkv <= std::numeric_limits<int>::max() && T * Hq <= std::numeric_limits<int>::max(),
                    "q is too large for the CUDA kernel (B * Hkv and T * Hq must be < 2^31), got shape ", q.sizes(),
                    " with Hkv = ", Hkv);

  const c10::cuda::OptionalCUDAGuard guard(q.device());
  at::Tensor out = at::empty({B, T, Hq * D}, q.options());
  const auto device = q.device().index();
  const int num_sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  const int max_smem = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const bool clusters = attention::clusters_usable();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  dispatch_float_dtype(dt, "q", [&](auto tag) {
    using T_ = element_t<decltype(tag)>;
    attention::Params<T_> p{};
    p.q = static_cast<const T_*>(q.const_data_ptr());
    p.k = static_cast<const T_*>(k.const_data_ptr());
    p.v = static_cast<const T_*>(v.const_data_ptr());
    p.rope_cos = rope_cos.const_data_ptr<float>();
    p.rope_sin = rope_sin.const_data_ptr<float>();
    p.positions = positions.const_data_ptr<int64_t>();
    p.k_cache = static_cast<T_*>(k_cache.data_ptr());
    p.v_cache = static_cast<T_*>(v_cache.data_ptr());
    p.out = static_cast<T_*>(out.data_ptr());
    p.batch = static_cast<int>(B);
    p.tokens = static_cast<int>(T);
    p.hq = static_cast<int>(Hq);
    p.hkv = static_cast<int>(Hkv);
    p.group = static_cast<int>(G);
    p.head_dim = static_cast<int>(D);
    p.cache_len = static_cast<int>(S);
    p.window = window;
    p.qscale = static_cast<float>(scale * 1.4426950408889634);

    // 16-byte K/V accesses need 16-byte rows and 16-byte aligned bases; the same condition lets q and
    // the RoPE tables be read 4 elements at a time (out is ours). Otherwise (e.g. D % 8 != 0 in 16-bit,
    // or views at odd offsets) element accesses.
    const bool vec16 = (D * static_cast<int64_t>(sizeof(T_))) % 16 == 0 && is_aligned(p.k, 16) &&
                       is_aligned(p.v, 16) && is_aligned(p.k_cache, 16) && is_aligned(p.v_cache, 16) &&
                       is_aligned(p.q, 16) && is_aligned(p.rope_cos, 16) && is_aligned(p.rope_sin, 16);
    p.rows = static_cast<int>(T * G);
    if (warp_chunk_attention() &&
        *warp_chunk::unsupported(sizeof(T_), vec16, p.head_dim, T * G, clusters, max_smem) == '\0') {
      C10_CUDA_CHECK(warp_chunk::launch<T_>(p, Launch{stream, pdl_launches()}));
      return;
    }
    const attention::Plan pl = attention_launch_plan(p.batch, p.tokens, p.hkv, p.group, p.head_dim, p.cache_len,
                                           sizeof(T_), vec16, num_sms, max_smem, clusters);
    TORCH_CHECK_VALUE(pl.n_qtiles <= 65535, "q has too many query rows per kv head for one launch (T * Hq / Hkv = ",
                      T * G, ")");
    TORCH_CHECK_VALUE(pl.smem_bytes + 1024 <= max_smem, "rope_append_attention needs ", pl.smem_bytes + 1024,
                      " bytes of shared memory per block for head dim ", D, " but the device allows ", max_smem);
    p.m_tile = pl.m_tile;
    p.n_qtiles = pl.n_qtiles;
    p.n_splits = pl.n_splits;
    p.min_chunk = pl.min_chunk;
    p.interleaved = pl.interleaved;
    C10_CUDA_CHECK(attention::launch<T_>(p, pl, Launch{stream, pdl_launches()}));
  });
  return out;
}

int64_t attention_invariant_max_tokens(int64_t group, int64_t head_dim, int64_t elem_size, int64_t device) {
  TORCH_CHECK_VALUE(group >= 1 && head_dim >= 1 && head_dim <= attention::kMaxHeadDim,
                    "group must be >= 1 and head_dim in 1..", attention::kMaxHeadDim, ", got group = ", group,
                    ", head_dim = ", head_dim);
  TORCH_CHECK_VALUE(elem_size == 2 || elem_size == 4, "elem_size must be 2 or 4 (bytes), got ", elem_size);
  const auto index = static_cast<c10::DeviceIndex>(device);
  if (warp_chunk_attention() && elem_size == 2) {
    const int smem = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, index);
    if (*warp_chunk::unsupported(2, true, static_cast<int>(head_dim), group, attention::clusters_usable(), smem) ==
        '\0') {
      // the warp-chunk kernel is invariant by construction; wider launches would fall back to the tiled kernel,
      // whose rows are other bits
      return warp_chunk::max_rows(static_cast<int>(head_dim)) / group;
    }
  }
  if (!batch_invariant_attention() || elem_size != 2) return 0;  // launch_plan's answer, without a device
  const int num_sms = device_attribute(cudaDevAttrMultiProcessorCount, index);
  const int max_smem = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, index);
  int64_t most = 0;
  // Eligibility depends on the rows of one KV head's tile (tokens * group), not on the batch, the KV heads
  // or the cache length (those only change the split count): 1 sequence, 1 KV head, any cache length.
  for (int tokens = 1; tokens <= attention::kMaxTileRows; ++tokens) {
    const attention::Plan pl = attention_launch_plan(1, tokens, 1, static_cast<int>(group), static_cast<int>(head_dim),
                                                     4096, static_cast<int>(elem_size), true, num_sms, max_smem, true);
    if (!pl.invariant) break;
    most = tokens;
  }
  return most;
}

}  // namespace kangaroo
