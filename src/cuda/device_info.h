// device_info.h — per-device facts the launchers read on every call, looked up once per device:
// the SM count and the shared memory of an SM, and a kernel's dynamic shared-memory limit raised
// once per (device, kernel).
// Host API; plain C++ (the CUDA runtime is used only in device_info.cpp).
#pragma once

#include <cstddef>
#include <cstdint>

namespace megamoe::cuda {

// What a launch plan of several CTAs per SM is made from (cudaDeviceGetAttribute). On sm_90:
// 228 KB per SM, 227 KB per CTA with the opt-in, 1 KB the driver reserves per CTA.
struct SmFacts {
    int sms = 0;                           // cudaDevAttrMultiProcessorCount
    int64_t smem_per_sm = 0;               // cudaDevAttrMaxSharedMemoryPerMultiprocessor, bytes
    int64_t smem_per_block_optin = 0;      // cudaDevAttrMaxSharedMemoryPerBlockOptin, bytes
    int64_t smem_reserved_per_block = 0;   // cudaDevAttrReservedSharedMemoryPerBlock, bytes
};

// The current device's facts, cached per device; thread-safe. Throws megamoe::Error when the
// runtime cannot answer (no device).
SmFacts sm_facts();

// SMs of the current device: sm_facts().sms.
int sm_count();

// Raises `kernel`'s cudaFuncAttributeMaxDynamicSharedMemorySize on the current device to at least
// `bytes` (never lowers it), calling the runtime only when a larger value is needed; thread-safe.
// Throws megamoe::Error with the runtime's message when the device refuses the size.
void raise_dynamic_smem(const void* kernel, size_t bytes);

}  // namespace megamoe::cuda
