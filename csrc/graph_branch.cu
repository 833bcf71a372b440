// CUDA-graph conditional nodes under torch's stream capture (see graph_branch.h for the contract).
//
// How a node is captured: a one-thread kernel that sets the node's condition from device memory is
// captured on the current stream, the conditional node is added after it by hand
// (cudaGraphAddNode), the stream's capture continues after the node, and each body is captured on a
// side stream with cudaStreamBeginCaptureToGraph while that side stream is torch's current stream,
// so every op, ours or torch's, lands in the body. The caching allocator must hand the body's
// tensors out of the graph's private pool like the rest of the capture: torch routes allocations by
// a filter on the capturing stream's capture id, so this file swaps torch's filter for one that also
// accepts the body streams' capture ids (graph memory stays graph memory; nothing leaks to the
// general pool where a later allocation could reuse it under a replay).
#include "graph_branch.h"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

// SWITCH nodes (one node, several bodies) arrived in CUDA 12.8; IF nodes in 12.4.
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12080
#define KANGAROO_GRAPH_CONDITIONALS 1
#endif

namespace kangaroo {
namespace graph {

#ifdef KANGAROO_GRAPH_CONDITIONALS
namespace {

using PoolId = std::pair<unsigned long long, unsigned long long>;  // torch's MempoolId_t

// CUDA 13 added edge-data arguments to these three calls.
cudaError_t capture_info(cudaStream_t s, cudaStreamCaptureStatus* status, unsigned long long* id, cudaGraph_t* graph,
                         const cudaGraphNode_t** deps, size_t* num_deps) {
#if CUDART_VERSION >= 13000
  return cudaStreamGetCaptureInfo(s, status, id, graph, deps, nullptr, num_deps);
#else
  return cudaStreamGetCaptureInfo(s, status, id, graph, deps, num_deps);
#endif
}

cudaError_t add_node(cudaGraphNode_t* node, cudaGraph_t graph, const cudaGraphNode_t* deps, size_t num_deps,
                     cudaGraphNodeParams* params) {
#if CUDART_VERSION >= 13000
  return cudaGraphAddNode(node, graph, deps, nullptr, num_deps, params);
#else
  return cudaGraphAddNode(node, graph, deps, num_deps, params);
#endif
}

cudaError_t continue_after(cudaStream_t s, cudaGraphNode_t node) {
#if CUDART_VERSION >= 13000
  return cudaStreamUpdateCaptureDependencies(s, &node, nullptr, 1, cudaStreamSetCaptureDependencies);
#else
  return cudaStreamUpdateCaptureDependencies(s, &node, 1, cudaStreamSetCaptureDependencies);
#endif
}

// One thread: the whole condition is n <= a few dozen values (one per batch row).
__global__ void set_condition_kernel(cudaGraphConditionalHandle handle, const void* values, int n, bool is_bool) {
  unsigned int value = 0;
  if (is_bool) {
    const bool* v = static_cast<const bool*>(values);
    for (int i = 0; i < n; ++i) value |= v[i] ? 1u : 0u;
  } else {
    const long long* v = static_cast<const long long*>(values);
    long long m = v[0];
    for (int i = 1; i < n; ++i) m = m > v[i] ? m : v[i];
    value = (m < 0 || m >= static_cast<long long>(UINT_MAX)) ? UINT_MAX : static_cast<unsigned int>(m);
  }
  cudaGraphSetConditional(handle, value);
}

// The capture ids whose allocations go to the graph's pool: the top-level capture and every body
// capture under it. Shared with the allocator's filter, which other threads may call.
struct CaptureIds {
  std::mutex mutex;
  std::vector<unsigned long long> ids;
  bool contains(unsigned long long id) {
    std::lock_guard<std::mutex> lock(mutex);
    return std::find(ids.begin(), ids.end(), id) != ids.end();
  }
  void add(unsigned long long id) {
    std::lock_guard<std::mutex> lock(mutex);
    ids.push_back(id);
  }
};

struct Routing {
  unsigned long long top_id = 0;  // the top-level capture the filter was installed for
  PoolId pool{0, 0};
  std::shared_ptr<CaptureIds> ids;
};

struct Frame {
  c10::cuda::CUDAStream enclosing;  // torch's current stream at branch_begin: it captures the node
  cudaStream_t body_stream;
  std::vector<cudaGraph_t> bodies;
  int selected = -1;
};

thread_local std::vector<Frame> frames;
thread_local Routing routing;

constexpr size_t kPreparedDepths = 8;  // the draft round nests γ IF nodes (γ = 6 by default)

// One side stream per (device, nesting depth), created once: a nested node's body is captured while
// its parent body's capture is still open on the stream one level up.
cudaStream_t body_stream(int device, size_t depth) {
  static std::mutex mutex;
  static std::map<std::pair<int, size_t>, cudaStream_t> streams;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = streams.find({device, depth});
  if (it != streams.end()) return it->second;
  cudaStream_t s;
  C10_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  streams[{device, depth}] = s;
  return s;
}

// At the first node of a capture: replace torch's allocation filter for the pool (one per pool is
// allowed) by one that also accepts the body captures. torch's capture_end removes it like its own.
void route_to_pool(int device, PoolId pool, unsigned long long top_id) {
  if (routing.ids && routing.top_id == top_id && routing.pool == pool) return;
  auto ids = std::make_shared<CaptureIds>();
  ids->add(top_id);
  namespace alloc = c10::cuda::CUDACachingAllocator;
  alloc::endAllocateToPool(static_cast<c10::DeviceIndex>(device), pool);
  alloc::beginAllocateToPool(static_cast<c10::DeviceIndex>(device), pool, [ids](cudaStream_t stream) {
    cudaStreamCaptureStatus status;
    unsigned long long id = 0;
    if (capture_info(stream, &status, &id, nullptr, nullptr, nullptr) != cudaSuccess) return false;
    return status == cudaStreamCaptureStatusActive && ids->contains(id);
  });
  alloc::releasePool(static_cast<c10::DeviceIndex>(device), pool);  // begin took a reference; torch holds one
  routing = Routing{top_id, pool, ids};
}

void end_body(Frame& f) {
  cudaGraph_t captured;
  C10_CUDA_CHECK(cudaStreamEndCapture(f.body_stream, &captured));
  f.selected = -1;
}

}  // namespace
#endif  // KANGAROO_GRAPH_CONDITIONALS

std::string branch_unsupported_reason(int device) {
#ifndef KANGAROO_GRAPH_CONDITIONALS
  (void)device;
  return "the extension was built with a CUDA toolkit older than 12.8 (conditional SWITCH graph nodes)";
#else
  int driver = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess) return "cudaDriverGetVersion failed";
  if (driver < 12080) return "the CUDA driver supports CUDA " + std::to_string(driver / 1000) + "." +
                             std::to_string(driver % 1000 / 10) + "; conditional SWITCH graph nodes need 12.8";
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || device < 0 || device >= count) return "no such CUDA device";
  // The engine asks before it captures: make the body streams of the first depths now, so a capture
  // in torch's global mode never has to create one.
  int previous = 0;
  C10_CUDA_CHECK(cudaGetDevice(&previous));
  C10_CUDA_CHECK(cudaSetDevice(device));
  for (size_t depth = 0; depth < kPreparedDepths; ++depth) body_stream(device, depth);
  C10_CUDA_CHECK(cudaSetDevice(previous));
  return "";
#endif
}

void branch_begin(std::uintptr_t values, std::int64_t n, bool is_bool, std::int64_t num_branches, int device,
                  std::pair<unsigned long long, unsigned long long> pool) {
#ifndef KANGAROO_GRAPH_CONDITIONALS
  TORCH_CHECK(false, "branch_begin: ", branch_unsupported_reason(device));
#else
  TORCH_CHECK_VALUE(n >= 1 && n <= 1024, "branch_begin: n must be in [1, 1024], got ", n);
  TORCH_CHECK_VALUE(num_branches >= 1 && num_branches <= 64, "branch_begin: num_branches must be in [1, 64], got ",
                    num_branches);
  TORCH_CHECK_VALUE(!is_bool || num_branches == 1, "branch_begin: bool values make an IF node (one branch), got ",
                    num_branches, " branches");
  auto enclosing = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device));
  cudaStreamCaptureStatus status;
  unsigned long long id = 0;
  cudaGraph_t graph = nullptr;
  C10_CUDA_CHECK(capture_info(enclosing.stream(), &status, &id, &graph, nullptr, nullptr));
  TORCH_CHECK(status == cudaStreamCaptureStatusActive,
              "branch_begin: the current stream is not capturing a CUDA graph (use it inside torch.cuda.graph)");
  if (frames.empty()) route_to_pool(device, pool, id);

  cudaGraphConditionalHandle handle;
  C10_CUDA_CHECK(cudaGraphConditionalHandleCreate(&handle, graph, 0, 0));
  set_condition_kernel<<<1, 1, 0, enclosing.stream()>>>(handle, reinterpret_cast<const void*>(values),
                                                        static_cast<int>(n), is_bool);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const cudaGraphNode_t* deps = nullptr;
  size_t num_deps = 0;
  C10_CUDA_CHECK(capture_info(enclosing.stream(), &status, nullptr, &graph, &deps, &num_deps));
  cudaGraphNodeParams params = {cudaGraphNodeTypeConditional};  // aggregate init: the rest zeroed
  params.conditional.handle = handle;
  params.conditional.type = is_bool ? cudaGraphCondTypeIf : cudaGraphCondTypeSwitch;
  params.conditional.size = static_cast<unsigned int>(num_branches);
  cudaGraphNode_t node;
  C10_CUDA_CHECK(add_node(&node, graph, deps, num_deps, &params));
  C10_CUDA_CHECK(continue_after(enclosing.stream(), node));

  Frame f{enclosing, body_stream(device, frames.size()), {}, -1};
  f.bodies.assign(params.conditional.phGraph_out, params.conditional.phGraph_out + num_branches);
  frames.push_back(std::move(f));
#endif
}

void branch_select(std::int64_t index) {
#ifndef KANGAROO_GRAPH_CONDITIONALS
  TORCH_CHECK(false, "branch_select: ", branch_unsupported_reason(0));
#else
  TORCH_CHECK(!frames.empty(), "branch_select: no branch_begin is open on this thread");
  Frame& f = frames.back();
  TORCH_CHECK_VALUE(index >= 0 && index < static_cast<std::int64_t>(f.bodies.size()), "branch_select: index ",
                    index, " is outside [0, ", f.bodies.size(), ")");
  if (f.selected >= 0) end_body(f);
  C10_CUDA_CHECK(cudaStreamBeginCaptureToGraph(f.body_stream, f.bodies[index], nullptr, nullptr, 0,
                                               cudaStreamCaptureModeRelaxed));
  cudaStreamCaptureStatus status;
  unsigned long long id = 0;
  C10_CUDA_CHECK(capture_info(f.body_stream, &status, &id, nullptr, nullptr, nullptr));
  routing.ids->add(id);
  c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromExternal(f.body_stream, f.enclosing.device_index()));
  f.selected = static_cast<int>(index);
#endif
}

void branch_end() {
#ifndef KANGAROO_GRAPH_CONDITIONALS
  TORCH_CHECK(false, "branch_end: ", branch_unsupported_reason(0));
#else
  TORCH_CHECK(!frames.empty(), "branch_end: no branch_begin is open on this thread");
  Frame f = frames.back();
  frames.pop_back();
  c10::cuda::setCurrentCUDAStream(f.enclosing);  // first, so an error below leaves torch's stream right
  if (f.selected >= 0) end_body(f);
#endif
}

}  // namespace graph
}  // namespace kangaroo
