// safetensors_fuzz.cpp — libFuzzer target for the safetensors header parser.
//
// The input is a whole shard image: `u64 header_len | header | data`. We apply the same bounds
// checks as SafetensorsFile and hand the in-bounds header to parse_safetensors_header. Rejection
// must be a megamoe::Error; any other exception, crash or sanitizer report is a bug.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    if (size < 8) return 0;
    uint64_t header_len = 0;  // little-endian, as on disk
    for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | data[i];
    if (header_len > megamoe::kMaxHeaderBytes || header_len > size - 8) return 0;
    const std::string_view header(reinterpret_cast<const char*>(data + 8), size_t(header_len));
    const uint64_t data_size = size - 8 - header_len;
    try {
        const auto tensors = megamoe::parse_safetensors_header(header, data_size, "fuzz.safetensors");
        // Whatever is accepted must satisfy the documented invariants.
        for (const auto& t : tensors) {
            if (t.begin > t.end || t.end > data_size || t.ndim < 0 || t.ndim > megamoe::kMaxDims)
                __builtin_trap();
            uint64_t n = 1;
            for (int i = 0; i < t.ndim; ++i) {
                if (t.shape[size_t(i)] < 0) __builtin_trap();
                n *= uint64_t(t.shape[size_t(i)]);  // cannot wrap: the parser checked
            }
            if (n * megamoe::dtype_size(t.dtype) != t.end - t.begin) __builtin_trap();
        }
        uint64_t prev_begin = 0, prev_end = 0;  // sorted by begin; non-empty ranges disjoint
        for (const auto& t : tensors) {
            if (t.begin < prev_begin) __builtin_trap();
            prev_begin = t.begin;
            if (t.begin == t.end) continue;
            if (t.begin < prev_end) __builtin_trap();
            prev_end = t.end;
        }
    } catch (const megamoe::Error&) {
        // expected for malformed input
    }
    return 0;
}
