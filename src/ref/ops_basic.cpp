// basic.cpp — embedding, RMSNorm, dense and grouped linears, rotary tables (CPU twins).
#include <cmath>
#include <vector>

#include "io/formats.h"
#include "ref/ops.h"
#include "core/parallel.h"
#include "core/sanitize.h"

namespace megamoe::ops {

// Dot product in a fixed order (8 running lanes, then a fixed reduction tree): the same inputs
// give the same bits whatever the batch, and the lanes let the compiler vectorize. It reads
// exactly a[0, n) and b[0, n): under ASan and TSan those are checked whole (core/sanitize.h).
MEGAMOE_UNINSTRUMENTED static float dot_loop(const float* a, const float* b, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
    float tail = 0;
    for (; i < n; ++i) tail += a[i] * b[i];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

static float dot(const float* a, const float* b, int64_t n) {
    sanitize_read(a, n);
    sanitize_read(b, n);
    return dot_loop(a, b, n);
}

void embed(const Tensor& table, const int32_t* ids, int64_t T, float* out) {
    const int64_t D = table.dim(1);
    const uint16_t* w = table.as<uint16_t>();
    for (int64_t t = 0; t < T; ++t)
        for (int64_t d = 0; d < D; ++d) out[t * D + d] = bf16_to_f32(w[ids[t] * D + d]);
}

void add_to_streams(const float* b, int64_t T, int64_t hc, int64_t D, float* X) {
    for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < hc; ++j)
            for (int64_t d = 0; d < D; ++d) X[(t * hc + j) * D + d] += b[t * D + d];
}

void rms_norm(const float* x, int64_t T, int64_t D, const Tensor* w, float eps, float* y) {
    const uint16_t* wb = w ? w->as<uint16_t>() : nullptr;
    parallel_for(T, [&](int64_t t) {
        const float* xr = x + t * D;
        double ss = 0;
        for (int64_t d = 0; d < D; ++d) ss += static_cast<double>(xr[d]) * xr[d];
        const float inv = 1.0f / std::sqrt(static_cast<float>(ss / static_cast<double>(D)) + eps);
        for (int64_t d = 0; d < D; ++d) {
            const float v = xr[d] * inv;
            y[t * D + d] = wb ? bf16_to_f32(wb[d]) * v : v;
        }
    }, 2 * D);
}

void linear(const Linear& W, const float* x, int64_t T, float* y) {
    const int64_t N = W.out, K = W.in;
    parallel_ranges(N, [&](int64_t begin, int64_t end, int) {
        std::vector<float> row(static_cast<size_t>(K));
        for (int64_t n = begin; n < end; ++n) {
            W.decode_row(n, row.data());
            for (int64_t t = 0; t < T; ++t) y[t * N + n] = dot(row.data(), x + t * K, K);
        }
    }, K * (T + 1));
}

void grouped_linear(const Linear& W, int64_t groups, const float* x, int64_t T, float* y) {
    const int64_t N = W.out, K = W.in, R = N / groups;
    MEGAMOE_CHECK(R * groups == N, "grouped_linear: ", N, " rows do not split into ", groups, " groups");
    parallel_ranges(N, [&](int64_t begin, int64_t end, int) {
        std::vector<float> row(static_cast<size_t>(K));
        for (int64_t n = begin; n < end; ++n) {
            W.decode_row(n, row.data());
            const int64_t g = n / R;
            for (int64_t t = 0; t < T; ++t) y[t * N + n] = dot(row.data(), x + (t * groups + g) * K, K);
        }
    }, K * (T + 1));
}

RopeTable make_rope_table(double base, int64_t rope_dim, const YarnConfig* yarn) {
    RopeTable tab;
    tab.rope_dim = rope_dim;
    const int64_t half = rope_dim / 2;
    tab.inv_freq.resize(static_cast<size_t>(half));
    // f_i = 1 / base^(2i/r), each step in f32 as the reference computes it.
    std::vector<float> pos_freq(static_cast<size_t>(half));
    for (int64_t i = 0; i < half; ++i) {
        const float e = static_cast<float>(2 * i) / static_cast<float>(rope_dim);
        pos_freq[static_cast<size_t>(i)] = std::pow(static_cast<float>(base), e);
    }
    if (!yarn || yarn->original_max_position_embeddings <= 0) {
        for (int64_t i = 0; i < half; ++i) tab.inv_freq[static_cast<size_t>(i)] = 1.0f / pos_freq[static_cast<size_t>(i)];
        return tab;
    }
    // YaRN: pairs below `low` keep f_i, pairs above `high` use f_i / factor, a linear ramp between.
    const double two_pi = 2.0 * M_PI;
    auto corr_dim = [&](double rotations) {
        return static_cast<double>(rope_dim) *
               std::log(static_cast<double>(yarn->original_max_position_embeddings) / (rotations * two_pi)) /
               (2.0 * std::log(base));
    };
    double low = std::max(std::floor(corr_dim(yarn->beta_fast)), 0.0);
    double high = std::min(std::ceil(corr_dim(yarn->beta_slow)), static_cast<double>(rope_dim - 1));
    if (low == high) high += 0.001;   // avoid a division by zero, as the reference does
    const float factor = static_cast<float>(yarn->factor);
    for (int64_t i = 0; i < half; ++i) {
        float ramp = (static_cast<float>(i) - static_cast<float>(low)) / static_cast<float>(high - low);
        ramp = std::min(std::max(ramp, 0.0f), 1.0f);
        const float extrap_w = 1.0f - ramp;   // weight of the unscaled frequency
        const float f = 1.0f / pos_freq[static_cast<size_t>(i)];
        const float f_interp = 1.0f / (factor * pos_freq[static_cast<size_t>(i)]);
        tab.inv_freq[static_cast<size_t>(i)] = f_interp * (1.0f - extrap_w) + f * extrap_w;
    }
    return tab;
}

void rope(float* x, int64_t T, int64_t heads, int64_t head_dim, const int64_t* pos, const RopeTable& table,
          bool inverse) {
    const int64_t r = table.rope_dim, half = r / 2, off = head_dim - r;
    std::vector<float> cs(static_cast<size_t>(half)), sn(static_cast<size_t>(half));
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t i = 0; i < half; ++i) {
            const float angle = static_cast<float>(pos[t]) * table.inv_freq[static_cast<size_t>(i)];
            cs[static_cast<size_t>(i)] = std::cos(angle);
            sn[static_cast<size_t>(i)] = inverse ? -std::sin(angle) : std::sin(angle);
        }
        for (int64_t h = 0; h < heads; ++h) {
            float* v = x + (t * heads + h) * head_dim + off;
            for (int64_t i = 0; i < half; ++i) {
                const float a = v[2 * i], b = v[2 * i + 1];
                const float c = cs[static_cast<size_t>(i)], s = sn[static_cast<size_t>(i)];
                v[2 * i] = a * c - b * s;
                v[2 * i + 1] = b * c + a * s;
            }
        }
    }
}

}  // namespace megamoe::ops
