// Device-side branching inside a CUDA graph that torch.cuda.graph is capturing: CUDA conditional
// nodes (IF, and SWITCH from CUDA 12.8), so a captured decode round can skip work on a condition the
// GPU computed, with no host sync. csrc/module.cpp exposes these to Python; the engine uses them
// through kangaroo_ext/engine/conditional.py.
//
// Usage, on the thread and stream that capture (the current torch stream):
//   branch_begin(values, n, is_bool, num_branches, device, pool)  // the node; nothing captured into it yet
//   branch_select(i)                                              // capture what follows into body i
//   ... torch / kangaroo ops ...
//   branch_select(j) ...                                          // (SWITCH) the next body
//   branch_end()                                                  // back to the enclosing graph
// Nesting: a branch_begin while a body is being captured makes a node inside that body.
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

// Why this build or device cannot capture conditional nodes; empty when it can.
std::string branch_unsupported_reason(int device);

void branch_begin(std::uintptr_t values, std::int64_t n, bool is_bool, std::int64_t num_branches, int device,
                  std::pair<unsigned long long, unsigned long long> pool);
void branch_select(std::int64_t index);
void branch_end();

}  // namespace graph
}  // namespace kangaroo
