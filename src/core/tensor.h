// tensor.h — element types and a non-owning, contiguous, row-major tensor view.
//
// A Tensor never owns memory: checkpoint tensors point into memory-mapped shards, activations
// into std::vector<float> buffers owned by the caller. There are no strides, no broadcasting
// and no autograd; ops take views and write into views.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>

#include "core/common.h"

namespace megamoe {

// The safetensors dtypes megamoe accepts; anything else in a header is an error.
enum class DType : uint8_t { f32, bf16, f16, i64, i32, i8, u8, e4m3, e8m0 };

size_t dtype_size(DType t);                       // bytes per element
std::string_view dtype_name(DType t);             // safetensors spelling: "F32", "F8_E4M3", ...
bool dtype_from_name(std::string_view s, DType* out);

enum class Device : uint8_t { cpu, cuda };

constexpr int kMaxDims = 4;

struct Tensor {
    void*   data   = nullptr;
    DType   dtype  = DType::f32;
    Device  device = Device::cpu;
    int     ndim   = 0;                           // 0 = scalar
    std::array<int64_t, kMaxDims> shape{};        // unused dims are 0

    Tensor() = default;
    Tensor(void* d, DType t, std::initializer_list<int64_t> dims, Device dev = Device::cpu);

    int64_t numel() const;
    size_t  bytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
    int64_t dim(int i) const { return shape[static_cast<size_t>(i)]; }
    bool    empty() const { return data == nullptr; }
    std::string shape_str() const;                // "[2048, 4096]"

    template <typename T> T*       as()       { return static_cast<T*>(data); }
    template <typename T> const T* as() const { return static_cast<const T*>(data); }
};

}  // namespace megamoe
