// device_info.h — per-device facts the launchers read on every call, looked up once per device:
// the SM count, and a kernel's dynamic shared-memory limit raised once per (device, kernel).
// Host API; plain C++ (the CUDA runtime is used only in device_info.cpp).
#pragma once

#include <cstddef>

namespace megamoe::cuda {

// SMs of the current device (cudaDevAttrMultiProcessorCount), cached per device; thread-safe.
int sm_count();

// Raises `kernel`'s cudaFuncAttributeMaxDynamicSharedMemorySize on the current device to at least
// `bytes` (never lowers it), calling the runtime only when a larger value is needed; thread-safe.
// Throws megamoe::Error with the runtime's message when the device refuses the size.
void raise_dynamic_smem(const void* kernel, size_t bytes);

}  // namespace megamoe::cuda
