// The attention launcher's plan (csrc/attention.cu), shared with the persistent draft kernel's launcher
// (csrc/persistent_draft.cu): the same plan gives the same key splits and PV order, so the same bits.
#pragma once

#include "kernels/attention.cuh"

namespace kangaroo {

// The batch-invariant PV order where its switch asks for it, the dtype is 16-bit, the tile allows it and its
// larger reduction fits the shared memory; else the default order. clusters: attention::clusters_usable().
attention::Plan attention_launch_plan(int batch, int tokens, int hkv, int group, int head_dim, int cache_len,
                                      int elem_size, bool vec16, int num_sms, int max_smem, bool clusters);

}  // namespace kangaroo
