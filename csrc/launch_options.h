// Process-wide launch settings of the CUDA launchers, set from Python (kangaroo_ext/_extension.py reads
// them through kangaroo_ext/config.py and calls set_pdl_launches once, at import). The kernel headers
// never read them: each launcher passes them down as a kernels/common.cuh `Launch`.
#pragma once

namespace kangaroo {

// Whether kernels may launch with programmatic dependent launch (default true).
bool pdl_launches();
void set_pdl_launches(bool enabled);

}  // namespace kangaroo
