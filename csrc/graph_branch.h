// kangaroo_ext's own capture of CUDA-graph conditional nodes (IF, and SWITCH from CUDA 12.8) under
// torch's stream capture, so a captured decode round can skip work on a condition the GPU computed,
// with no host sync. csrc/module.cpp exposes these to Python; kangaroo_ext/engine/conditional.py
// decides whether this path or torch's own conditional-node API captures the nodes.
//
// This path redirects torch's caching allocator through its internal calls, whose meaning changes
// between torch releases, so it is compiled only against the torch it was tested with (2.11.x; see
// kOwnCaptureTorch in graph_branch.cu). Built against any other torch, branch_unsupported_reason()
// says so and the other calls refuse.
//
// Usage, on the thread and stream that capture (the current torch stream):
//   depth = branch_depth()
//   branch_begin(values, n, is_bool, num_branches, device, pool)  // the node; nothing captured into it yet
//   branch_select(i)                                              // capture what follows into body i
//   ... torch / kangaroo ops ...
//   branch_end_body()                                             // back to the enclosing graph
//   branch_select(j) ... branch_end_body()                        // (SWITCH) another body
//   branch_close(depth, /*raise_errors=*/true)                    // forget the node
// On any error (in a body or in these calls), branch_close(depth, false) closes every node opened
// above `depth`, restores torch's current stream and ends open body captures without throwing, so a
// later capture on the thread starts clean.
// Nesting: a branch_begin while a body is being captured makes a node inside that body, up to
// kMaxNestingDepth levels.
//
// At replay, a one-thread kernel captured before the node reads `values` (device memory, n elements)
// and sets the node's condition: bool values -> body 0 runs iff any is true (IF); int64 values ->
// body max(values) runs (SWITCH; none runs if that is negative or >= num_branches).
#pragma once

#include <cstdint>
#include <string>
#include <utility>

namespace kangaroo {
namespace graph {

// γ (max_draft) may be 32 and the draft round nests one IF per draft step; twice that for headroom.
constexpr int kMaxNestingDepth = 64;

// Why this build or device cannot capture conditional nodes itself; empty when it can.
std::string branch_unsupported_reason(int device);

// Nodes open on this thread (0 outside any node).
std::int64_t branch_depth();

void branch_begin(std::uintptr_t values, std::int64_t n, bool is_bool, std::int64_t num_branches, int device,
                  std::pair<unsigned long long, unsigned long long> pool);
void branch_select(std::int64_t index);
void branch_end_body();
void branch_close(std::int64_t depth, bool raise_errors);

}  // namespace graph
}  // namespace kangaroo
