// ATen launcher for kernels/persistent_draft.cuh: a whole draft phase in one launch. Checks its
// arguments (kangaroo_ext/ops/validate.py: persistent_draft, the same limits), plans the attention and the
// head's norm as their own launchers would (the same plan: the same bits), carves one workspace from torch's
// caching allocator (CUDA-graph capture takes it from the graph's pool) and launches on the current stream.
// No host sync. A shape the kernel cannot take is an error naming the limit; the engine asks
// persistent_draft_unsupported (Python) first and keeps its per-op graph then.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "attention_plan.h"
#include "checks.h"
#include "device_info.h"
#include "kernels/persistent_draft.cuh"
#include "launch_options.h"
#include "ops.h"

namespace kangaroo {
namespace {

constexpr int kWeightsPerLayer = 14;  // input_norm q k v q_bias k_bias v_bias o o_bias post_norm gate up down down_bias
const char* const kWeightNames[kWeightsPerLayer] = {"input_norm", "q",         "k",    "v",  "q_bias",
                                                    "k_bias",     "v_bias",    "o",    "o_bias", "post_norm",
                                                    "gate",       "up",        "down", "down_bias"};

// A 16-bit CUDA tensor of the model's dtype on the model's device, contiguous, 16-byte aligned.
void model_tensor(const at::Tensor& t, const std::string& name, const at::Tensor& embed) {
  checks::cuda(t, name.c_str());
  TORCH_CHECK_VALUE(t.scalar_type() == embed.scalar_type(), name, " must have embed's dtype ", embed.scalar_type(),
                    ", got ", t.scalar_type());
  checks::same_device(t, name.c_str(), embed, "embed");
  checks::contiguous(t, name.c_str());
  TORCH_CHECK_VALUE(is_aligned(t.const_data_ptr(), 16), name, " must be 16-byte aligned (a tensor of its own, not "
                    "a view at an odd offset)");
}

void shape(const at::Tensor& t, const std::string& name, at::IntArrayRef want) {
  TORCH_CHECK_VALUE(t.sizes() == want, name, " must have shape ", want, ", got ", t.sizes());
}

void state(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Tensor& embed) {
  checks::cuda(t, name);
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  checks::same_device(t, name, embed, "embed");
  checks::contiguous(t, name);
}

const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->const_data_ptr() : nullptr; }

}  // namespace

void persistent_draft(const at::Tensor& embed, const c10::List<std::optional<at::Tensor>>& layer_weights,
                      at::TensorList k_caches, at::TensorList v_caches, int64_t num_exit_layers,
                      const at::Tensor& head_norm, const at::Tensor& head, const std::optional<at::Tensor>& draft_ids,
                      const at::Tensor& rope_cos, const at::Tensor& rope_sin, const at::Tensor& threshold,
                      const at::Tensor& cache_len, at::Tensor& tokens_in, at::Tensor& draft_tokens,
                      at::Tensor& num_drafted, at::Tensor& active, at::Tensor& exit_states, at::Tensor& barrier,
                      int64_t gamma, bool stop_at_exit, double eps, double scale, int64_t window,
                      const std::optional<at::Tensor>& stamps) {
  checks::cuda(embed, "embed");
  const auto dt = embed.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kHalf || dt == at::kBFloat16, "persistent_draft runs 16-bit models (its GEMVs are the "
                    "tensor-core ones); embed is ", dt);
  TORCH_CHECK_VALUE(tensor_core_gemv(), "persistent_draft runs the tensor-core GEMVs, and they are switched off "
                    "(KANGAROO_TENSOR_CORE_GEMV=0): its results would not be the per-op path's");
  TORCH_CHECK_VALUE(embed.dim() == 2, "embed must be [V, H], got ", embed.sizes());
  model_tensor(embed, "embed", embed);
  const int64_t H = embed.size(1);
  const int64_t n_layers = static_cast<int64_t>(layer_weights.size()) / kWeightsPerLayer;
  TORCH_CHECK_VALUE(static_cast<int64_t>(layer_weights.size()) == n_layers * kWeightsPerLayer && n_layers >= 2 &&
                        n_layers <= persistent::kMaxLayers,
                    "layer_weights must hold 14 entries per layer for 2..", persistent::kMaxLayers,
                    " layers (the exit layers, then the adapter's blocks), got ", layer_weights.size(), " entries");
  TORCH_CHECK_VALUE(1 <= num_exit_layers && num_exit_layers < n_layers, "num_exit_layers must be in [1, ", n_layers,
                    "): at least one target layer and one adapter block, got ", num_exit_layers);
  TORCH_CHECK_VALUE(static_cast<int64_t>(k_caches.size()) == n_layers && static_cast<int64_t>(v_caches.size()) ==
                        n_layers, "k_caches and v_caches must hold one cache per layer (", n_layers, "), got ",
                    k_caches.size(), " and ", v_caches.size());
  TORCH_CHECK_VALUE(k_caches[0].dim() == 4 && k_caches[0].size(0) == 1,
                    "k_caches[0] must be [1, Hkv, S, D] (the persistent draft kernel decodes batch 1), got ",
                    k_caches[0].sizes());
  const int64_t Hkv = k_caches[0].size(1), S = k_caches[0].size(2), D = k_caches[0].size(3);
  TORCH_CHECK_VALUE(D == 64 || D == 128, "persistent_draft takes head dims 64 and 128, got ", D);
  TORCH_CHECK_VALUE(H % 8 == 0 && H <= persistent::kMaxNormThreads * 8,
                    "persistent_draft takes hidden sizes that are a multiple of 8 up to ",
                    persistent::kMaxNormThreads * 8, " (its head norm's row), got ", H);

  const c10::cuda::OptionalCUDAGuard guard(embed.device());
  const auto device = embed.device().index();
  const int num_sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  const int max_smem = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  auto run = [&](auto tag) {
    using T = decltype(tag);
    persistent::Params<T> p{};
    p.n_layers = static_cast<int>(n_layers);
    p.n_exit = static_cast<int>(num_exit_layers);
    int64_t Hq_D = -1, I = 0;
    for (int64_t l = 0; l < n_layers; ++l) {
      auto w = [&](int i) { return layer_weights.get(l * kWeightsPerLayer + i); };
      const std::string at_l = "layer_weights[" + std::to_string(l) + "].";
      for (int i = 0; i < kWeightsPerLayer; ++i) {
        if (w(i).has_value()) model_tensor(*w(i), at_l + kWeightNames[i], embed);
      }
      for (int i : {0, 1, 2, 3, 7}) {
        TORCH_CHECK_VALUE(w(i).has_value(), at_l, kWeightNames[i], " is required");
      }
      const at::Tensor q = *w(1), k = *w(2), o = *w(7);
      if (Hq_D < 0) Hq_D = q.size(0);
      shape(*w(0), at_l + "input_norm", {H});
      shape(q, at_l + "q", {Hq_D, H});
      shape(k, at_l + "k", {Hkv * D, H});
      shape(*w(3), at_l + "v", {Hkv * D, H});
      shape(o, at_l + "o", {H, Hq_D});
      if (w(4).has_value()) shape(*w(4), at_l + "q_bias", {Hq_D});
      if (w(5).has_value()) shape(*w(5), at_l + "k_bias", {Hkv * D});
      if (w(6).has_value()) shape(*w(6), at_l + "v_bias", {Hkv * D});
      if (w(8).has_value()) shape(*w(8), at_l + "o_bias", {H});
      const bool mlp = w(10).has_value();
      TORCH_CHECK_VALUE(mlp || l >= num_exit_layers, at_l, "gate is required for the target's exit layers");
      if (mlp) {
        TORCH_CHECK_VALUE(w(9).has_value() && w(11).has_value() && w(12).has_value(), at_l,
                          "post_norm, up and down are required with gate");
        if (I == 0) I = w(10)->size(0);
        shape(*w(9), at_l + "post_norm", {H});
        shape(*w(10), at_l + "gate", {I, H});
        shape(*w(11), at_l + "up", {I, H});
        shape(*w(12), at_l + "down", {H, I});
        if (w(13).has_value()) shape(*w(13), at_l + "down_bias", {H});
      }
      for (const auto& [c, name] : {std::pair{&k_caches[l], "k_caches"}, std::pair{&v_caches[l], "v_caches"}}) {
        model_tensor(*c, std::string(name) + "[" + std::to_string(l) + "]", embed);
        shape(*c, std::string(name) + "[" + std::to_string(l) + "]", {1, Hkv, S, D});
      }
      persistent::Layer<T>& L = p.layer[l];
      auto cp = [&](int i) { return static_cast<const T*>(ptr_or_null(w(i))); };
      L = persistent::Layer<T>{cp(0), cp(1), cp(2), cp(3), cp(4), cp(5), cp(6), cp(7), cp(8),
                               cp(9), cp(10), cp(11), cp(12), cp(13),
                               static_cast<T*>(k_caches[l].data_ptr()), static_cast<T*>(v_caches[l].data_ptr())};
    }
    TORCH_CHECK_VALUE(Hq_D % D == 0 && Hq_D / D % Hkv == 0 && Hq_D / D / Hkv <= 8,
                      "the query heads (q's rows / D = ", Hq_D / D, ") must be a multiple of the KV heads (", Hkv,
                      "), at most 8 per KV head");
    // The tensor-core GEMVs' shapes (decode_linear_mma.cuh: eligible): every K a multiple of 32, rows of 8.
    for (int64_t k_dim : {H, Hq_D, I > 0 ? I : H}) {
      TORCH_CHECK_VALUE(k_dim % 32 == 0, "persistent_draft needs the tensor-core GEMVs' shapes: every input width a "
                        "multiple of 32 (hidden, q rows, intermediate), got ", k_dim);
    }
    TORCH_CHECK_VALUE((Hkv * D) % 8 == 0 && Hq_D % 8 == 0 && I % 8 == 0, "the GEMVs' output rows must be multiples "
                      "of 8");
    model_tensor(head_norm, "head_norm", embed);
    shape(head_norm, "head_norm", {H});
    model_tensor(head, "head", embed);
    TORCH_CHECK_VALUE(head.dim() == 2 && head.size(1) == H && head.size(0) >= 1 && head.size(0) < (1LL << 31),
                      "head must be [N, H = ", H, "], got ", head.sizes());
    const int64_t N = head.size(0);
    if (draft_ids.has_value()) {
      state(*draft_ids, "draft_ids", at::kLong, embed);
      shape(*draft_ids, "draft_ids", {N});
    }
    for (const auto& [t, name] : {std::pair{&rope_cos, "rope_cos"}, std::pair{&rope_sin, "rope_sin"}}) {
      state(*t, name, at::kFloat, embed);
      TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) >= S && t->size(1) == D, name, " must be [>= S = ", S, ", D = ",
                        D, "], got ", t->sizes());
    }
    state(threshold, "threshold", at::kFloat, embed);
    TORCH_CHECK_VALUE(threshold.dim() == 0, "threshold must be a 0-dim float32 tensor (η), got ", threshold.sizes());
    state(cache_len, "cache_len", at::kLong, embed);
    shape(cache_len, "cache_len", {1});
    TORCH_CHECK_VALUE(gamma >= 1, "gamma must be >= 1, got ", gamma);
    state(draft_tokens, "draft_tokens", at::kLong, embed);
    TORCH_CHECK_VALUE(draft_tokens.dim() == 2 && draft_tokens.size(0) == 1 && draft_tokens.size(1) >= gamma,
                      "draft_tokens must be [1, >= gamma = ", gamma, "], got ", draft_tokens.sizes());
    state(tokens_in, "tokens_in", at::kLong, embed);
    TORCH_CHECK_VALUE(tokens_in.dim() == 2 && tokens_in.size(0) == 1 && tokens_in.size(1) >= gamma + 1,
                      "tokens_in must be [1, >= gamma + 1 = ", gamma + 1, "], got ", tokens_in.sizes());
    state(num_drafted, "num_drafted", at::kLong, embed);
    shape(num_drafted, "num_drafted", {1});
    state(active, "active", at::kBool, embed);
    shape(active, "active", {1});
    model_tensor(exit_states, "exit_states", embed);
    TORCH_CHECK_VALUE(exit_states.dim() == 3 && exit_states.size(0) == 1 && exit_states.size(1) >= gamma + 1 &&
                          exit_states.size(2) == H,
                      "exit_states must be [1, >= gamma + 1 = ", gamma + 1, ", H = ", H, "], got ",
                      exit_states.sizes());
    state(barrier, "barrier", at::kInt, embed);
    shape(barrier, "barrier", {persistent::kBarrierWords});
    TORCH_CHECK_VALUE(Hkv <= persistent::kMaxTiles, "persistent_draft takes at most ", persistent::kMaxTiles,
                      " KV heads (one split counter each), got ", Hkv);

    // The plans the per-op launchers make: attention (key splits, PV order) and the head norm's row width.
    const int elem = static_cast<int>(sizeof(T));
    const int G = static_cast<int>(Hq_D / D / Hkv);
    const attention::Plan ap = attention_launch_plan(1, 1, static_cast<int>(Hkv), G, static_cast<int>(D),
                                                     static_cast<int>(S), elem, true, num_sms, max_smem,
                                                     attention::clusters_usable());
    const rms_norm::LaunchConfig norm = rms_norm::plan(1, static_cast<int>(H), elem, true);
    const int smem = persistent::smem_bytes(static_cast<int>(H), static_cast<int>(Hq_D), static_cast<int>(I), ap.hd,
                                            elem, ap.invariant);
    TORCH_CHECK_VALUE(smem + 2048 <= max_smem, "persistent_draft needs ", smem, " bytes of shared memory per block; "
                      "the device allows ", max_smem);
    const persistent::Instance<T> kernel = persistent::instance_for<T>(static_cast<int>(D), ap.invariant);
    const int resident = kernel.resident(smem, num_sms);
    TORCH_CHECK(resident >= 1, "persistent_draft: no block of the kernel fits an SM (", smem,
                " bytes of shared memory)");
    const int cap = persistent_max_blocks();  // 0: every block that fits
    const int grid = cap > 0 ? std::min(resident, cap) : resident;

    // Workspace: activations (T), the steps' positions, the head's triples, the attention merge's scratch.
    const int64_t merge_floats = attention::merge_scratch_floats(1, static_cast<int>(Hkv), static_cast<int>(D),
                                                                 ap.m_tile, ap.n_qtiles, ap.n_splits);
    // Each region on 128-byte lines of its own: the positions are read through the read-only cache (they
    // never change once written) and share no line with data the kernel rewrites.
    auto up16 = [](int64_t bytes) { return (bytes + 127) / 128 * 128; };
    const int64_t act_elems[] = {Hq_D, Hkv * D, Hkv * D, Hq_D, H, H, std::max<int64_t>(I, 1), H, H};
    int64_t bytes = 0;
    for (int64_t e : act_elems) bytes += up16(e * elem);
    const int64_t pos_off = bytes;
    bytes += up16((gamma + 1) * 8);
    const int64_t soft_off = bytes;
    bytes += up16(static_cast<int64_t>(grid) * sizeof(lm_head::Soft));
    const int64_t merge_off = bytes;
    bytes += up16(merge_floats * 4);
    at::Tensor ws = at::empty({bytes}, embed.options().dtype(at::kByte));
    auto* base = static_cast<unsigned char*>(ws.data_ptr());
    T* slots[9];
    int64_t off = 0;
    for (int i = 0; i < 9; ++i) {
      slots[i] = reinterpret_cast<T*>(base + off);
      off += up16(act_elems[i] * elem);
    }
    p.q = slots[0];
    p.k = slots[1];
    p.v = slots[2];
    p.attn_out = slots[3];
    p.x_attn = slots[4];
    p.x_mlp = slots[5];
    p.act = slots[6];
    p.res0 = slots[7];
    p.res1 = slots[8];
    p.positions = reinterpret_cast<int64_t*>(base + pos_off);
    p.partials = reinterpret_cast<lm_head::Soft*>(base + soft_off);
    p.merge = attention::merge_scratch_at(reinterpret_cast<float*>(base + merge_off), 1, static_cast<int>(Hkv),
                                          static_cast<int>(D), ap.m_tile, ap.n_qtiles, ap.n_splits);

    p.embed = static_cast<const T*>(embed.const_data_ptr());
    p.head_norm = static_cast<const T*>(head_norm.const_data_ptr());
    p.head = static_cast<const T*>(head.const_data_ptr());
    p.draft_ids = draft_ids.has_value() ? draft_ids->const_data_ptr<int64_t>() : nullptr;
    p.head_rows = static_cast<int>(N);
    p.threshold = threshold.const_data_ptr<float>();
    p.cache_len = cache_len.const_data_ptr<int64_t>();
    p.tokens_in = tokens_in.mutable_data_ptr<int64_t>();
    p.draft_tokens = draft_tokens.mutable_data_ptr<int64_t>();
    p.num_drafted = num_drafted.mutable_data_ptr<int64_t>();
    p.active = active.mutable_data_ptr<bool>();
    p.exit_states = static_cast<T*>(exit_states.data_ptr());
    p.gamma = static_cast<int>(gamma);
    p.stop_at_exit = stop_at_exit;
    p.hidden = static_cast<int>(H);
    p.inter = static_cast<int>(I);
    p.q_rows = static_cast<int>(Hq_D);
    p.kv_rows = static_cast<int>(Hkv * D);
    p.eps = static_cast<float>(eps);
    p.norm_threads = static_cast<int>(norm.block.x);
    p.head_rows_per_block = static_cast<int>((N + grid - 1) / grid);
    p.barrier = reinterpret_cast<unsigned*>(barrier.data_ptr<int>());
    p.split_barrier = persistent_split_barrier();
    // A quarter of the L2 for the next stage's weights, shared by the blocks (the rest keeps the caches, the
    // activations and what other streams hold); the head stage asks for all of its rows (persistent_draft.cuh).
    p.prefetch_bytes = persistent_l2_prefetch() ? device_attribute(cudaDevAttrL2CacheSize, device) / 4 / grid : 0;
    if (stamps.has_value()) {  // stage timing: [rows, >= grid, 3] int64 (persistent_draft.cuh: GridBarrier)
      state(*stamps, "stamps", at::kLong, embed);
      TORCH_CHECK_VALUE(stamps->dim() == 3 && stamps->size(1) >= grid && stamps->size(2) == 3 &&
                            stamps->size(0) < (1LL << 31), "stamps must be int64 [rows, >= ", grid,
                        " (this launch's blocks), 3], got ", stamps->sizes());
      p.stamps = stamps->mutable_data_ptr<int64_t>();
      p.stamp_rows = static_cast<int>(stamps->size(0));
      p.stamp_stride = static_cast<int>(stamps->size(1));
    }

    attention::Params<T>& a = p.attn;
    a.rope_cos = rope_cos.const_data_ptr<float>();
    a.rope_sin = rope_sin.const_data_ptr<float>();
    a.batch = 1;
    a.tokens = 1;
    a.hq = static_cast<int>(Hq_D / D);
    a.hkv = static_cast<int>(Hkv);
    a.group = G;
    a.head_dim = static_cast<int>(D);
    a.cache_len = static_cast<int>(S);
    a.window = window;
    a.qscale = static_cast<float>(scale * 1.4426950408889634);
    a.rows = G;
    a.m_tile = ap.m_tile;
    a.n_qtiles = ap.n_qtiles;
    a.n_splits = ap.n_splits;
    a.min_chunk = ap.min_chunk;
    a.interleaved = ap.interleaved;
    TORCH_CHECK_VALUE(ap.rpt == 1 && ap.n_qtiles == 1 && ap.hd == D, "persistent_draft: the attention plan for ", G,
                      " query heads per KV head is not one q-tile of one row per warp");
    C10_CUDA_CHECK(kernel.launch(p, grid, smem, stream));
  };
  if (dt == at::kHalf) {
    run(__half{});
  } else {
    run(__nv_bfloat16{});
  }
}

}  // namespace kangaroo
