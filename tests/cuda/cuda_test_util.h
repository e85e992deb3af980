// cuda_test_util.h — helpers shared by the GPU twin tests (include only under MEGAMOE_HAVE_CUDA).
// Device memory in tests: cuda::DeviceArray<T> (buffers), cuda::OwnedLinear (uploaded weights).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/buffer.h"   // DeviceArray
#include "cuda/linear.h"   // CUDA_CHECK, OwnedLinear
#include "io/formats.h"
#include "io/weights.h"

namespace megamoe::test {

inline const char* fmt_name(LinearFormat f) {
    switch (f) {
        case LinearFormat::f32: return "f32";
        case LinearFormat::bf16: return "bf16";
        case LinearFormat::fp8_block: return "fp8";
        case LinearFormat::mxfp4: return "mxfp4";
        case LinearFormat::nvfp4: return "nvfp4";
    }
    return "?";
}

// A Linear whose tensors view buffers owned here. Not copyable: the Linear points at w, s and s2.
struct HostLinear {
    Linear lin;
    std::vector<uint8_t> w, s;
    float s2 = 1.0f;

    HostLinear() = default;
    HostLinear(const HostLinear&) = delete;
    HostLinear& operator=(const HostLinear&) = delete;

    void bind(LinearFormat f, int64_t N, int64_t K) {
        lin = Linear{};
        lin.format = f;
        lin.out = N;
        lin.in = K;
        const FormatInfo& fi = format_info(f);   // the checkpoint's tensors, as the binder expects them
        lin.weight = Tensor(w.data(), fi.weight_dtype, {N, fi.weight_cols(K)});
        if (fi.has_scales()) lin.scale = Tensor(s.data(), fi.scale_dtype, {fi.scale_rows(N), fi.scale_cols(K)});
        if (fi.global_scales) lin.scale_2 = Tensor(&s2, DType::f32, {});
    }
};


// Random normal weights times norm, each row with its own magnitude 2^U(mag_lo, mag_hi) (so block
// scales differ), quantized by the formats.h quantizers.
inline void make_quantized(HostLinear& h, LinearFormat f, int64_t N, int64_t K, uint32_t seed, float mag_lo = -6.0f,
                    float mag_hi = 2.0f, float norm = 1.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::uniform_real_distribution<float> mag(mag_lo, mag_hi);
    std::vector<float> w(static_cast<size_t>(N * K));
    for (int64_t n = 0; n < N; ++n) {
        const float r = std::exp2(mag(rng)) * norm;
        for (int64_t k = 0; k < K; ++k) w[static_cast<size_t>(n * K + k)] = nd(rng) * r;
    }
    switch (f) {
        case LinearFormat::f32:
            h.w.resize(w.size() * 4);
            std::memcpy(h.w.data(), w.data(), h.w.size());
            break;
        case LinearFormat::bf16: {
            h.w.resize(w.size() * 2);
            uint16_t* o = reinterpret_cast<uint16_t*>(h.w.data());
            for (size_t i = 0; i < w.size(); ++i) o[i] = f32_to_bf16(w[i]);
            break;
        }
        case LinearFormat::fp8_block:
            h.w.resize(w.size());
            h.s.resize(static_cast<size_t>(((N + 127) / 128) * ((K + 127) / 128)));
            quantize_fp8_block(w.data(), N, K, h.w.data(), h.s.data());
            break;
        case LinearFormat::mxfp4:
            h.w.resize(w.size() / 2);
            h.s.resize(static_cast<size_t>(N * (K / 32)));
            quantize_mxfp4(w.data(), N, K, h.w.data(), h.s.data());
            break;
        case LinearFormat::nvfp4:
            h.w.resize(w.size() / 2);
            h.s.resize(static_cast<size_t>(N * (K / 16)));
            quantize_nvfp4(w.data(), N, K, h.w.data(), h.s.data(), &h.s2);
            break;
    }
    h.bind(f, N, K);
}

// Random bf16 x [M, K], each row normal times 2^U(mag_lo, mag_hi), with an exact 0 and a -0.
inline std::vector<uint16_t> random_x(int64_t M, int64_t K, uint32_t seed, float mag_lo = -4.0f, float mag_hi = 4.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::uniform_real_distribution<float> mag(mag_lo, mag_hi);
    std::vector<uint16_t> x(static_cast<size_t>(M * K));
    for (int64_t t = 0; t < M; ++t) {
        const float r = std::exp2(mag(rng));
        for (int64_t k = 0; k < K; ++k) x[static_cast<size_t>(t * K + k)] = f32_to_bf16(nd(rng) * r);
    }
    if (K > 3) x[1] = 0;
    if (K > 3) x[2] = 0x8000;
    return x;
}

}  // namespace megamoe::test
