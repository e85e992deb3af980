// device_info.cpp — see device_info.h.
#include "cuda/device_info.h"

#include <cuda_runtime_api.h>

#include <map>
#include <mutex>
#include <utility>

#include "core/common.h"

namespace megamoe::cuda {

namespace {

int device_or_fail(const char* what) {
    int dev = 0;
    const cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess) fail(what, ": cudaGetDevice: ", cudaGetErrorString(e));
    return dev;
}

}  // namespace

SmFacts sm_facts() {
    static std::mutex m;
    static std::map<int, SmFacts> cache;
    const int dev = device_or_fail("sm_facts");
    std::lock_guard<std::mutex> lk(m);
    auto it = cache.find(dev);
    if (it != cache.end()) return it->second;
    auto attr = [&](cudaDeviceAttr a, const char* name) {
        int v = 0;
        const cudaError_t e = cudaDeviceGetAttribute(&v, a, dev);
        if (e != cudaSuccess) fail("sm_facts: cudaDeviceGetAttribute(", name, "): ", cudaGetErrorString(e));
        return v;
    };
    SmFacts f;
    f.sms = attr(cudaDevAttrMultiProcessorCount, "MultiProcessorCount");
    f.smem_per_sm = attr(cudaDevAttrMaxSharedMemoryPerMultiprocessor, "MaxSharedMemoryPerMultiprocessor");
    f.smem_per_block_optin = attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, "MaxSharedMemoryPerBlockOptin");
    f.smem_reserved_per_block = attr(cudaDevAttrReservedSharedMemoryPerBlock, "ReservedSharedMemoryPerBlock");
    return cache[dev] = f;
}

int sm_count() { return sm_facts().sms; }

void raise_dynamic_smem(const void* kernel, size_t bytes) {
    static std::mutex m;
    static std::map<std::pair<int, const void*>, size_t> raised;
    const int dev = device_or_fail("raise_dynamic_smem");
    std::lock_guard<std::mutex> lk(m);
    size_t& have = raised[{dev, kernel}];
    if (have >= bytes) return;
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (e != cudaSuccess) fail("raise_dynamic_smem: ", bytes, " bytes: ", cudaGetErrorString(e));
    have = bytes;
}

}  // namespace megamoe::cuda
