#include "core/tensor.h"

namespace megamoe {

namespace {
struct DTypeInfo {
    DType            type;
    size_t           size;
    std::string_view name;
};
constexpr DTypeInfo kDTypes[] = {
    {DType::f32, 4, "F32"}, {DType::bf16, 2, "BF16"},   {DType::f16, 2, "F16"},
    {DType::i64, 8, "I64"}, {DType::i32, 4, "I32"},     {DType::i8, 1, "I8"},
    {DType::u8, 1, "U8"},   {DType::e4m3, 1, "F8_E4M3"}, {DType::e8m0, 1, "F8_E8M0"},
};
}  // namespace

size_t dtype_size(DType t) { return kDTypes[static_cast<int>(t)].size; }
std::string_view dtype_name(DType t) { return kDTypes[static_cast<int>(t)].name; }

bool dtype_from_name(std::string_view s, DType* out) {
    for (const auto& d : kDTypes) {
        if (d.name == s) {
            *out = d.type;
            return true;
        }
    }
    return false;
}

Tensor::Tensor(void* d, DType t, std::initializer_list<int64_t> dims, Device dev)
    : data(d), dtype(t), device(dev), ndim(static_cast<int>(dims.size())) {
    MEGAMOE_CHECK(dims.size() <= kMaxDims, "too many dims");
    size_t i = 0;
    for (int64_t v : dims) shape[i++] = v;
}

int64_t Tensor::numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[static_cast<size_t>(i)];
    return n;
}

std::string Tensor::shape_str() const {
    std::string s = "[";
    for (int i = 0; i < ndim; ++i) s += (i ? ", " : "") + std::to_string(shape[static_cast<size_t>(i)]);
    return s + "]";
}

}  // namespace megamoe
