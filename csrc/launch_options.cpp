#include "launch_options.h"

#include <atomic>

namespace kangaroo {

namespace {
std::atomic<bool> pdl_enabled{true};  // atomic: set once from Python, read by every launch on any thread
}

bool pdl_launches() { return pdl_enabled.load(std::memory_order_relaxed); }

void set_pdl_launches(bool enabled) { pdl_enabled.store(enabled, std::memory_order_relaxed); }

}  // namespace kangaroo
