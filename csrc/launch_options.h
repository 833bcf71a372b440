// Process-wide launch settings of the CUDA launchers, set from Python (kangaroo_ext/_extension.py reads
// them through kangaroo_ext/config.py and sets them once, at import). The kernel headers
// never read them: each launcher passes them down as a kernels/common.cuh `Launch`.
#pragma once

namespace kangaroo {

// Whether kernels may launch with programmatic dependent launch (default true).
bool pdl_launches();
void set_pdl_launches(bool enabled);

// Whether attention uses its batch-invariant PV order where the tile allows it (default false until it
// has passed its GPU tests; csrc/kernels/attention.cuh, "Batch invariance").
bool batch_invariant_attention();
void set_batch_invariant_attention(bool enabled);

}  // namespace kangaroo
