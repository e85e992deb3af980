// cuda_test_util.h — helpers shared by the GPU twin tests (include only under MEGAMOE_HAVE_CUDA).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>

#include "cuda/linear.h"   // CUDA_CHECK

namespace megamoe::test {

// A device buffer of `count` T, freed on scope exit (at least one element is allocated).
template <typename T>
struct DeviceBuf {
    T* p = nullptr;
    size_t n = 0;
    explicit DeviceBuf(size_t count) : n(count) { CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T))); }
    ~DeviceBuf() { (void)cudaFree(p); }
    DeviceBuf(const DeviceBuf&) = delete;
    DeviceBuf& operator=(const DeviceBuf&) = delete;
};

}  // namespace megamoe::test
