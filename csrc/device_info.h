// Device properties the launchers size their grids from (one place, shared by every launcher).
#pragma once

#include <c10/core/Device.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

namespace kangaroo {

// A host-side attribute query: no stream work, so it is fine during CUDA-graph capture.
inline int device_attribute(cudaDeviceAttr attr, c10::DeviceIndex device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

}  // namespace kangaroo
