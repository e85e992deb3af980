// synth.cu — random device weights (see synth.h). One fill kernel: a counter-based hash of
// (seed, byte index) per element, so a fill depends only on its seed and size.
#include "cuda/synth.h"

#include <cuda_runtime.h>

#include <algorithm>

#include "core/common.h"
#include "io/formats.h"

namespace megamoe::cuda {

namespace {

// splitmix64 finalizer: a good 64-bit mix of (seed, index).
__device__ __forceinline__ uint64_t mix(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}
__device__ __forceinline__ float uniform(uint64_t seed, int64_t i) {   // [-1, 1)
    return static_cast<float>(static_cast<int64_t>(mix(seed ^ mix(static_cast<uint64_t>(i))) >> 40)) /
               static_cast<float>(1 << 23) - 1.0f;
}

enum Mode : int { kBf16Small, kBf16One, kF32Small, kF32Zero, kI32Below, kFp8Codes, kRawBytes, kConstByte };

__global__ void fill_kernel(uint8_t* p, int64_t bytes, int mode, uint64_t seed, int64_t arg) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;; i += stride) {
        switch (mode) {
            case kBf16Small:
            case kBf16One: {
                if (2 * i + 1 >= bytes) return;
                const float v = mode == kBf16One ? 1.0f : 0.05f * uniform(seed, i);
                reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(__float_as_uint(v) >> 16);
                break;
            }
            case kF32Small:
            case kF32Zero:
                if (4 * i + 3 >= bytes) return;
                reinterpret_cast<float*>(p)[i] = mode == kF32Zero ? 0.0f : 0.01f * uniform(seed, i);
                break;
            case kI32Below:
                if (4 * i + 3 >= bytes) return;
                reinterpret_cast<int32_t*>(p)[i] = static_cast<int32_t>(mix(seed ^ mix(static_cast<uint64_t>(i))) %
                                                                        static_cast<uint64_t>(arg));
                break;
            case kFp8Codes: {   // any e4m3 code but the NaN codes 0x7F / 0xFF
                if (i >= bytes) return;
                uint8_t b = static_cast<uint8_t>(mix(seed ^ mix(static_cast<uint64_t>(i))));
                if ((b & 0x7F) == 0x7F) b ^= 1;
                p[i] = b;
                break;
            }
            case kRawBytes:
                if (i >= bytes) return;
                p[i] = static_cast<uint8_t>(mix(seed ^ mix(static_cast<uint64_t>(i))));
                break;
            default:   // kConstByte
                if (i >= bytes) return;
                p[i] = static_cast<uint8_t>(arg);
                break;
        }
    }
}

void fill(void* p, int64_t bytes, int mode, uint64_t seed, int64_t arg, cudaStream_t stream) {
    if (bytes <= 0) return;
    const int64_t blocks = std::min<int64_t>((bytes + 255) / 256, 8192);
    fill_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(static_cast<uint8_t*>(p), bytes, mode, seed, arg);
    CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void synth_fill(void* p, int64_t bytes, SynthFill how, uint64_t seed, int64_t bound, CUstream_st* stream) {
    int mode = kBf16Small;
    switch (how) {
        case SynthFill::bf16_small: mode = kBf16Small; break;
        case SynthFill::bf16_one: mode = kBf16One; break;
        case SynthFill::f32_small: mode = kF32Small; break;
        case SynthFill::f32_zero: mode = kF32Zero; break;
        case SynthFill::i32_below:
            MEGAMOE_CHECK(bound > 0, "synth_fill: bound ", bound);
            mode = kI32Below;
            break;
    }
    fill(p, bytes, mode, seed, bound, stream);
}

DeviceLinear synth_linear(LinearFormat f, int64_t out, int64_t in, DeviceArena& arena, uint64_t seed,
                          CUstream_st* stream) {
    MEGAMOE_CHECK(out > 0 && in > 0, "synth_linear: shape [", out, ", ", in, "]");
    const FormatInfo& fi = format_info(f);
    fi.check_in(in, "synth_linear");
    DeviceLinear d;
    d.format = f;
    d.out = out;
    d.in = in;
    d.weight_row_bytes = device_row_bytes(f, in);   // the layout of upload_linear (linear.h)
    int64_t scale_rows = 0;
    if (fi.has_scales()) {
        scale_rows = fi.scale_rows(out);
        d.scale_row_bytes = fi.scale_cols(d.weight_row_bytes * 8 / fi.weight_bits);
    }
    if (fi.global_scales) d.scale_2 = 0.01f;
    const int64_t wbytes = out * d.weight_row_bytes;
    const int64_t sbytes = scale_rows ? scale_rows * d.scale_row_bytes + 16 : 0;
    d.weight = arena.take(static_cast<size_t>(wbytes));
    if (sbytes) d.scale = arena.take(static_cast<size_t>(sbytes));
    if (arena.counting()) return d;
    // Magnitudes: e4m3 codes average |v| ~ 50 → scale 2^-12; e2m1 codes ~ 2.4 → 2^-7 (MXFP4) or
    // e4m3 1.0 · scale_2 0.01 (NVFP4); bf16 in ±0.05.
    switch (f) {
        case LinearFormat::f32: fill(d.weight, wbytes, kF32Small, seed, 0, stream); break;
        case LinearFormat::bf16: fill(d.weight, wbytes, kBf16Small, seed, 0, stream); break;
        case LinearFormat::fp8_block:
            fill(d.weight, wbytes, kFp8Codes, seed, 0, stream);
            fill(d.scale, sbytes, kConstByte, seed, 127 - 12, stream);
            break;
        case LinearFormat::mxfp4:
            fill(d.weight, wbytes, kRawBytes, seed, 0, stream);
            fill(d.scale, sbytes, kConstByte, seed, 127 - 7, stream);
            break;
        case LinearFormat::nvfp4:
            fill(d.weight, wbytes, kRawBytes, seed, 0, stream);
            fill(d.scale, sbytes, kConstByte, seed, 0x38, stream);   // e4m3 1.0
            break;
    }
    return d;
}

}  // namespace megamoe::cuda
