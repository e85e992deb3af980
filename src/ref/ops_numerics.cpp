// ops_numerics.cpp — the official inference code's activation roundings (deepseek-v4.md §2.3-2.5):
// bf16, FP8 e4m3 block fake-quant with power-of-two scales, FP4 e2m1 block fake-quant, the
// Walsh-Hadamard rotation, and the ops that the official code runs in bf16.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/parallel.h"
#include "io/formats.h"
#include "ref/ops.h"

namespace megamoe {

const char* numerics_name(Numerics nm) { return nm == Numerics::official ? "official" : "exact"; }

Numerics parse_numerics(const std::string& name) {
    if (name == "exact") return Numerics::exact;
    if (name == "official") return Numerics::official;
    fail("--numerics must be exact or official, got '", name, "'");
}

}  // namespace megamoe

namespace megamoe::ops {

float bf16_round(float v) { return bf16_to_f32(f32_to_bf16(v)); }

void round_bf16(Numerics nm, float* x, int64_t n) {
    if (nm == Numerics::exact) return;
    for (int64_t i = 0; i < n; ++i) x[i] = bf16_round(x[i]);
}

// The power-of-two scale 2^ceil(log2(v)) (the kernel's exponent + (mantissa != 0)); v > 0, normal.
static float pow2_ceil(float v) { return e8m0_to_f32(e8m0_ceil(v)); }

void fp8_block_qdq(float* x, int64_t n, int64_t block) {
    MEGAMOE_CHECK(block > 0, "fp8_block_qdq: block ", block);
    for (int64_t b0 = 0; b0 < n; b0 += block) {
        const int64_t b1 = std::min(n, b0 + block);
        float amax = 0;
        for (int64_t i = b0; i < b1; ++i) amax = std::max(amax, std::fabs(x[i]));
        const float s = pow2_ceil(std::max(amax, 1e-4f) / 448.0f);
        for (int64_t i = b0; i < b1; ++i) {
            const float v = std::clamp(x[i] / s, -448.0f, 448.0f);
            x[i] = bf16_round(e4m3_to_f32(f32_to_e4m3(v)) * s);
        }
    }
}

void fp4_block_qdq(float* x, int64_t n, int64_t block) {
    MEGAMOE_CHECK(block > 0, "fp4_block_qdq: block ", block);
    const float min_amax = 6.0f * std::ldexp(1.0f, -126);
    for (int64_t b0 = 0; b0 < n; b0 += block) {
        const int64_t b1 = std::min(n, b0 + block);
        float amax = 0;
        for (int64_t i = b0; i < b1; ++i) amax = std::max(amax, std::fabs(x[i]));
        const float s = pow2_ceil(std::max(amax, min_amax) / 6.0f);
        for (int64_t i = b0; i < b1; ++i) {
            const float v = std::clamp(x[i] / s, -6.0f, 6.0f);
            x[i] = bf16_round(e2m1_to_f32(f32_to_e2m1(v)) * s);
        }
    }
}

void hadamard(float* x, int64_t n) {
    MEGAMOE_CHECK(n > 0 && (n & (n - 1)) == 0, "hadamard: size ", n, " is not a power of two");
    // Butterflies of width h = 1, 2, 4, ...: (a, b) -> (a + b, a - b) gives Sylvester's order.
    for (int64_t h = 1; h < n; h *= 2)
        for (int64_t i = 0; i < n; i += 2 * h)
            for (int64_t j = i; j < i + h; ++j) {
                const float a = x[j], b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
    const float scale = 1.0f / std::sqrt(static_cast<float>(n));
    for (int64_t i = 0; i < n; ++i) x[i] *= scale;
}

void round_kv_latent(Numerics nm, float* kv, int64_t n, int64_t hd, int64_t rope) {
    if (nm == Numerics::exact) return;
    for (int64_t t = 0; t < n; ++t) fp8_block_qdq(kv + t * hd, hd - rope, 64);
}

void round_indexer_qk(Numerics nm, float* x, int64_t n, int64_t hd) {
    if (nm == Numerics::exact) return;
    for (int64_t t = 0; t < n; ++t) {
        float* row = x + t * hd;
        hadamard(row, hd);
        for (int64_t i = 0; i < hd; ++i) row[i] = bf16_round(row[i]);   // rotate_activation returns bf16
        fp4_block_qdq(row, hd, 32);
    }
}

void round_gemm_input(Numerics nm, float* x, int64_t T, int64_t K) {
    if (nm == Numerics::exact) return;
    for (int64_t t = 0; t < T; ++t) fp8_block_qdq(x + t * K, K, 128);
}

void linear_rounded(Numerics nm, const Linear& W, const float* x, int64_t T, float* y) {
    if (nm == Numerics::exact) return linear(W, x, T, y);
    const bool quantized = W.format == LinearFormat::fp8_block || W.format == LinearFormat::mxfp4 ||
                           W.format == LinearFormat::nvfp4;
    if (quantized) {
        std::vector<float> q(x, x + T * W.in);
        round_gemm_input(nm, q.data(), T, W.in);
        linear(W, q.data(), T, y);
    } else {
        linear(W, x, T, y);
    }
    round_bf16(nm, y, T * W.out);
}

void head_rms_norm_bf16(float* x, int64_t n, int64_t hd, float eps) {
    parallel_for(n, [&](int64_t t) {
        float* v = x + t * hd;
        float ss = 0;   // torch's mean of a bf16 tensor: f32 accumulation, one rounding of the result
        for (int64_t d = 0; d < hd; ++d) ss += bf16_round(v[d] * v[d]);
        const float mean = bf16_round(ss / static_cast<float>(hd));
        const float r = bf16_round(1.0f / std::sqrt(bf16_round(mean + eps)));
        for (int64_t d = 0; d < hd; ++d) v[d] = bf16_round(v[d] * r);
    }, 2 * hd);
}

void indexer_scores_bf16(const float* q, const float* w, int64_t nh, int64_t hd, const float* K, int64_t n_rows,
                         float* score) {
    for (int64_t s = 0; s < n_rows; ++s) {
        const float* k = K + s * hd;
        float acc = 0;
        for (int64_t h = 0; h < nh; ++h) {
            float dotp = 0;
            for (int64_t d = 0; d < hd; ++d) dotp += q[h * hd + d] * k[d];
            const float l = std::max(bf16_round(dotp), 0.0f);
            acc += bf16_round(l * w[h]);
        }
        score[s] = bf16_round(acc);
    }
}

}  // namespace megamoe::ops
