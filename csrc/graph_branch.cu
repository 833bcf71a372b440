// kangaroo_ext's own capture of CUDA-graph conditional nodes (see graph_branch.h for the contract).
//
// How a node is captured: a one-thread kernel that sets the node's condition from device memory is
// captured on the current stream, the conditional node is added after it by hand (cudaGraphAddNode),
// the stream's capture continues after the node, and each body is captured on a side stream with
// cudaStreamBeginCaptureToGraph while that side stream is torch's current stream, so every op, ours
// or torch's, lands in the body.
//
// Memory: the caching allocator must hand the bodies' tensors out of the graph's private pool like the
// rest of the capture, else they come from the general pool, where memory freed after the capture
// (empty_cache, other tensors) is what a replay writes into. torch routes allocations by a filter on
// the capturing stream's capture id; this file replaces torch's filter by one that also accepts the
// body captures' ids. The replacement is made again at every body it starts, never remembered: any
// other code that re-registers torch's filter mid-capture (torch's own conditional-node capture does)
// would otherwise leave the later bodies unrouted.
//
// Those allocator calls (beginAllocateToPool / endAllocateToPool / releasePool) are torch internals:
// their reference counting changed after 2.11 (later releases count pool users separately, so the
// releasePool below would drop the pool early) and 2.14 added virtual methods before releasePool. So
// this path is compiled only against torch 2.11.x, the version every GPU test of it ran on; other
// torch versions use torch's own conditional-node API (kangaroo_ext/engine/conditional.py).
#include "graph_branch.h"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#elif __has_include(<torch/version.h>)
#include <torch/version.h>
#endif

#include <algorithm>
#include <climits>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <vector>

#if defined(TORCH_VERSION_MAJOR) && defined(TORCH_VERSION_MINOR) && TORCH_VERSION_MAJOR == 2 && \
    TORCH_VERSION_MINOR == 11
#define KANGAROO_BUILT_FOR_TESTED_TORCH 1
#endif

// SWITCH nodes (one node, several bodies) arrived in CUDA 12.8. KANGAROO_OWN_CAPTURE_COMPILE_CHECK
// compiles this path against another torch's headers only to check that it still builds; setup.py and
// CMake never set it, and such a binary still refuses to capture (branch_unsupported_reason).
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12080 && \
    (defined(KANGAROO_BUILT_FOR_TESTED_TORCH) || defined(KANGAROO_OWN_CAPTURE_COMPILE_CHECK))
#define KANGAROO_OWN_CAPTURE 1
#endif

namespace kangaroo {
namespace graph {

namespace {

std::string built_torch() {
#ifdef TORCH_VERSION
  return TORCH_VERSION;
#else
  return "an unknown version";
#endif
}

// Empty when this binary may capture nodes itself; else why not (no device needed to tell).
std::string build_unsupported_reason() {
#if !defined(CUDART_VERSION) || CUDART_VERSION < 12080
  return "kangaroo_ext._C was built with a CUDA toolkit older than 12.8 (conditional SWITCH graph nodes)";
#elif !defined(KANGAROO_BUILT_FOR_TESTED_TORCH)
  return "kangaroo_ext's own conditional-node capture is compiled only against torch 2.11.x (the version it "
         "was tested on); this extension was built against torch " + built_torch();
#else
  return "";
#endif
}

}  // namespace

#ifdef KANGAROO_OWN_CAPTURE
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

unsigned long long capture_id_of(cudaStream_t stream, bool* active) {
  cudaStreamCaptureStatus status;
  unsigned long long id = 0;
  C10_CUDA_CHECK(capture_info(stream, &status, &id, nullptr, nullptr, nullptr));
  *active = status == cudaStreamCaptureStatusActive;
  return id;
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

// The node tree being captured on this thread: its pool and the capture ids that belong to it.
struct Routing {
  int device = -1;
  PoolId pool{0, 0};
  std::shared_ptr<CaptureIds> ids;
};

struct Frame {
  c10::cuda::CUDAStream enclosing;  // torch's current stream at branch_begin: it captures the node
  cudaStream_t body_stream;
  std::vector<cudaGraph_t> bodies;
  std::set<std::int64_t> captured;  // bodies already captured: a body is captured once
  bool body_open = false;
};

thread_local std::vector<Frame> frames;
thread_local Routing routing;

// One side stream per (device, nesting depth), created once and kept for the process: a nested node's
// body is captured while its parent body's capture is still open on the stream one level up.
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

// Replace the pool's allocation filter (torch allows one per pool) by one that accepts every capture
// id of `ids`. torch's capture_end removes it like its own.
void route_to_pool(int device, PoolId pool, const std::shared_ptr<CaptureIds>& ids) {
  namespace alloc = c10::cuda::CUDACachingAllocator;
  const auto index = static_cast<c10::DeviceIndex>(device);
  try {
    alloc::endAllocateToPool(index, pool);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "branch_begin: the pool given is not the pool of the CUDA graph being captured on device ",
                device, " (pass the pool= of torch.cuda.graph): ", e.what());
  }
  alloc::beginAllocateToPool(index, pool, [ids](cudaStream_t stream) {
    cudaStreamCaptureStatus status;
    unsigned long long id = 0;
    if (capture_info(stream, &status, &id, nullptr, nullptr, nullptr) != cudaSuccess) return false;
    return status == cudaStreamCaptureStatusActive && ids->contains(id);
  });
  alloc::releasePool(index, pool);  // in torch 2.11 beginAllocateToPool took a reference; the capture holds one
}

// Ends a body capture that an error interrupted, unless dismissed: the stream must not stay capturing.
class BodyCaptureGuard {
 public:
  explicit BodyCaptureGuard(cudaStream_t stream) : stream_(stream) {}
  ~BodyCaptureGuard() {
    if (stream_ == nullptr) return;
    cudaGraph_t ignored = nullptr;
    (void)cudaStreamEndCapture(stream_, &ignored);
    (void)cudaGetLastError();  // the error that brought us here is already being reported
  }
  void dismiss() { stream_ = nullptr; }
  BodyCaptureGuard(const BodyCaptureGuard&) = delete;
  BodyCaptureGuard& operator=(const BodyCaptureGuard&) = delete;

 private:
  cudaStream_t stream_;
};

// Restores torch's current stream and ends the open body capture, if any. Returns the first error.
std::exception_ptr close_frame(Frame& f) {
  std::exception_ptr error;
  try {
    c10::cuda::setCurrentCUDAStream(f.enclosing);
  } catch (...) {
    error = std::current_exception();
  }
  if (f.body_open) {
    f.body_open = false;
    cudaGraph_t captured = nullptr;
    const cudaError_t status = cudaStreamEndCapture(f.body_stream, &captured);
    if (status != cudaSuccess && !error) {
      (void)cudaGetLastError();
      try {
        C10_CUDA_CHECK(status);
      } catch (...) {
        error = std::current_exception();
      }
    }
  }
  return error;
}

// Frames whose node tree the current stream is not capturing into are left over from an abandoned
// capture (nothing closed them): they must not make this capture skip the allocator redirect. Their
// streams belong to a dead capture, so only their body captures are ended.
void drop_stale_frames(unsigned long long current_id) {
  if (frames.empty() || (routing.ids && routing.ids->contains(current_id))) return;
  for (auto& f : frames) {
    if (f.body_open) {
      cudaGraph_t ignored = nullptr;
      (void)cudaStreamEndCapture(f.body_stream, &ignored);
    }
  }
  (void)cudaGetLastError();
  frames.clear();
}

}  // namespace
#endif  // KANGAROO_OWN_CAPTURE

std::string branch_unsupported_reason(int device) {
  const std::string build = build_unsupported_reason();
  if (!build.empty()) return build;
#ifndef KANGAROO_OWN_CAPTURE
  (void)device;
  return "kangaroo_ext._C was built without its own conditional-node capture";
#else
  int driver = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess) return "cudaDriverGetVersion failed";
  if (driver < 12080)
    return "the CUDA driver supports CUDA " + std::to_string(driver / 1000) + "." +
           std::to_string(driver % 1000 / 10) + "; conditional SWITCH graph nodes need 12.8";
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || device < 0 || device >= count) return "no such CUDA device";
  // The engine asks before it captures: make every depth's body stream now, so a capture in torch's
  // global capture mode never has to create one.
  int previous = 0;
  C10_CUDA_CHECK(cudaGetDevice(&previous));
  C10_CUDA_CHECK(cudaSetDevice(device));
  for (size_t depth = 0; depth < static_cast<size_t>(kMaxNestingDepth); ++depth) body_stream(device, depth);
  C10_CUDA_CHECK(cudaSetDevice(previous));
  return "";
#endif
}

std::int64_t branch_depth() {
#ifdef KANGAROO_OWN_CAPTURE
  return static_cast<std::int64_t>(frames.size());
#else
  return 0;
#endif
}

void branch_begin(std::uintptr_t values, std::int64_t n, bool is_bool, std::int64_t num_branches, int device,
                  std::pair<unsigned long long, unsigned long long> pool) {
  const std::string build = build_unsupported_reason();
  TORCH_CHECK(build.empty(), "branch_begin: ", build);
#ifdef KANGAROO_OWN_CAPTURE
  TORCH_CHECK_VALUE(n >= 1 && n <= 1024, "branch_begin: n must be in [1, 1024], got ", n);
  TORCH_CHECK_VALUE(num_branches >= 1 && num_branches <= 64, "branch_begin: num_branches must be in [1, 64], got ",
                    num_branches);
  TORCH_CHECK_VALUE(!is_bool || num_branches == 1, "branch_begin: bool values make an IF node (one branch), got ",
                    num_branches, " branches");
  auto enclosing = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device));
  bool active = false;
  const unsigned long long id = capture_id_of(enclosing.stream(), &active);
  TORCH_CHECK(active, "branch_begin: the current stream is not capturing a CUDA graph (use it inside torch.cuda.graph)");
  drop_stale_frames(id);
  TORCH_CHECK(frames.size() < static_cast<size_t>(kMaxNestingDepth), "branch_begin: conditional nodes nest at most ",
              kMaxNestingDepth, " deep");
  if (frames.empty()) {  // a new node tree: its own id set, routed now (bodies route again when they start)
    auto ids = std::make_shared<CaptureIds>();
    ids->add(id);
    route_to_pool(device, pool, ids);
    routing = Routing{device, pool, ids};
  }

  cudaGraph_t graph = nullptr;
  cudaStreamCaptureStatus status;
  C10_CUDA_CHECK(capture_info(enclosing.stream(), &status, nullptr, &graph, nullptr, nullptr));
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

  // Last, so an error above leaves no frame behind.
  Frame f{enclosing, body_stream(device, frames.size()), {}, {}, false};
  f.bodies.assign(params.conditional.phGraph_out, params.conditional.phGraph_out + num_branches);
  frames.push_back(std::move(f));
#else
  (void)values, (void)n, (void)is_bool, (void)num_branches, (void)device, (void)pool;
#endif
}

void branch_select(std::int64_t index) {
  const std::string build = build_unsupported_reason();
  TORCH_CHECK(build.empty(), "branch_select: ", build);
#ifdef KANGAROO_OWN_CAPTURE
  TORCH_CHECK(!frames.empty(), "branch_select: no branch_begin is open on this thread");
  Frame& f = frames.back();
  TORCH_CHECK(!f.body_open, "branch_select: body is still open (call branch_end_body first)");
  TORCH_CHECK_VALUE(index >= 0 && index < static_cast<std::int64_t>(f.bodies.size()), "branch_select: index ",
                    index, " is outside [0, ", f.bodies.size(), ")");
  TORCH_CHECK_VALUE(f.captured.count(index) == 0, "branch_select: body ", index, " was captured already");
  TORCH_CHECK(c10::cuda::getCurrentCUDAStream(f.enclosing.device_index()) == f.enclosing,
              "branch_select: torch's current stream changed since branch_begin");
  bool busy = false;
  (void)capture_id_of(f.body_stream, &busy);
  TORCH_CHECK(!busy, "branch_select: the body stream of nesting depth ", frames.size() - 1,
              " is capturing already (conditional nodes captured on two threads of one device at once?)");

  C10_CUDA_CHECK(cudaStreamBeginCaptureToGraph(f.body_stream, f.bodies[index], nullptr, nullptr, 0,
                                               cudaStreamCaptureModeRelaxed));
  BodyCaptureGuard guard(f.body_stream);
  bool active = false;
  const unsigned long long id = capture_id_of(f.body_stream, &active);
  TORCH_CHECK(active, "branch_select: the body capture did not start");
  routing.ids->add(id);
  route_to_pool(routing.device, routing.pool, routing.ids);
  c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromExternal(f.body_stream, f.enclosing.device_index()));
  guard.dismiss();
  f.body_open = true;
  f.captured.insert(index);
#else
  (void)index;
#endif
}

void branch_end_body() {
  const std::string build = build_unsupported_reason();
  TORCH_CHECK(build.empty(), "branch_end_body: ", build);
#ifdef KANGAROO_OWN_CAPTURE
  TORCH_CHECK(!frames.empty() && frames.back().body_open, "branch_end_body: no body is open on this thread");
  std::exception_ptr error = close_frame(frames.back());
  if (error) std::rethrow_exception(error);
#endif
}

void branch_close(std::int64_t depth, bool raise_errors) {
#ifdef KANGAROO_OWN_CAPTURE
  TORCH_CHECK_VALUE(depth >= 0, "branch_close: depth must be >= 0, got ", depth);
  std::exception_ptr first;
  while (static_cast<std::int64_t>(frames.size()) > depth) {
    Frame f = std::move(frames.back());
    frames.pop_back();  // before anything can throw: the frame is gone whatever happens
    std::exception_ptr error = close_frame(f);
    if (!first) first = error;
  }
  if (first && raise_errors) std::rethrow_exception(first);
#else
  (void)depth, (void)raise_errors;
#endif
}

}  // namespace graph
}  // namespace kangaroo
