// hyper_conn.cpp — mHC pre (norm, projection, Sinkhorn), post (transposed comb), and the head.
#include <cmath>
#include <vector>

#include "ref/ops.h"
#include "core/parallel.h"
#include "core/sanitize.h"

namespace megamoe::ops {

static float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

// mixes[o] = (x · rsqrt(mean(x²) + eps)) · fn[o]   over the hc·D flattened streams (stream-major).
// Its ranges are checked whole under ASan and TSan, the loops left uninstrumented (core/sanitize.h).
MEGAMOE_UNINSTRUMENTED static void hc_mixes_loop(const float* fn, int64_t n_out, const float* x, int64_t n, float eps,
                                                 float* mixes) {
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
    const float inv = 1.0f / std::sqrt(static_cast<float>(ss / static_cast<double>(n)) + eps);
    for (int64_t o = 0; o < n_out; ++o) {
        const float* w = fn + o * n;
        double acc = 0;
        for (int64_t i = 0; i < n; ++i) acc += static_cast<double>(w[i]) * (x[i] * inv);
        mixes[o] = static_cast<float>(acc);
    }
}

static void hc_mixes(const float* fn, int64_t n_out, const float* x, int64_t n, float eps, float* mixes) {
    sanitize_read(fn, n_out * n);
    sanitize_read(x, n);
    sanitize_write(mixes, n_out);
    hc_mixes_loop(fn, n_out, x, n, eps, mixes);
}

void hc_pre(const HyperConnWeights& w, const ModelConfig& c, const float* X, int64_t T, float* u, float* post,
            float* comb) {
    const int64_t hc = c.hc_mult, D = c.hidden_size, n = hc * D;
    const float eps = static_cast<float>(c.hc_eps);
    const float* fn = w.fn.as<float>();
    const float* base = w.base.as<float>();
    const float* scale = w.scale.as<float>();
    parallel_for(T, [&](int64_t t) {
        const float* x = X + t * n;
        std::vector<float> mix(static_cast<size_t>(c.mix_width()));
        hc_mixes(fn, c.mix_width(), x, n, static_cast<float>(c.rms_norm_eps), mix.data());
        std::vector<float> pre(static_cast<size_t>(hc));
        for (int64_t j = 0; j < hc; ++j) {
            pre[static_cast<size_t>(j)] = sigmoid(mix[static_cast<size_t>(j)] * scale[0] + base[j]) + eps;
            post[t * hc + j] = 2.0f * sigmoid(mix[static_cast<size_t>(hc + j)] * scale[1] + base[hc + j]);
        }
        // comb[j][k]: row softmax + eps, then column normalization, then (iters - 1) × (row, column).
        float* C = comb + t * hc * hc;
        for (int64_t j = 0; j < hc; ++j) {
            float* row = C + j * hc;
            float m = -INFINITY;
            for (int64_t k = 0; k < hc; ++k) {
                row[k] = mix[static_cast<size_t>(2 * hc + j * hc + k)] * scale[2] + base[2 * hc + j * hc + k];
                m = std::max(m, row[k]);
            }
            float s = 0;
            for (int64_t k = 0; k < hc; ++k) s += (row[k] = std::exp(row[k] - m));
            for (int64_t k = 0; k < hc; ++k) row[k] = row[k] / s + eps;
        }
        auto normalize_cols = [&] {
            for (int64_t k = 0; k < hc; ++k) {
                float s = 0;
                for (int64_t j = 0; j < hc; ++j) s += C[j * hc + k];
                for (int64_t j = 0; j < hc; ++j) C[j * hc + k] /= (s + eps);
            }
        };
        auto normalize_rows = [&] {
            for (int64_t j = 0; j < hc; ++j) {
                float s = 0;
                for (int64_t k = 0; k < hc; ++k) s += C[j * hc + k];
                for (int64_t k = 0; k < hc; ++k) C[j * hc + k] /= (s + eps);
            }
        };
        normalize_cols();
        for (int64_t it = 1; it < c.hc_sinkhorn_iters; ++it) {
            normalize_rows();
            normalize_cols();
        }
        for (int64_t d = 0; d < D; ++d) {
            float acc = 0;
            for (int64_t j = 0; j < hc; ++j) acc += pre[static_cast<size_t>(j)] * x[j * D + d];
            u[t * D + d] = acc;
        }
    }, c.mix_width() * n);
}

void hc_post(const float* y, const float* res, const float* post, const float* comb, int64_t T, int64_t hc,
             int64_t D, float* out) {
    parallel_for(T, [&](int64_t t) {
        const float* C = comb + t * hc * hc;
        for (int64_t k = 0; k < hc; ++k) {
            for (int64_t d = 0; d < D; ++d) {
                float acc = post[t * hc + k] * y[t * D + d];
                for (int64_t j = 0; j < hc; ++j) acc += C[j * hc + k] * res[(t * hc + j) * D + d];
                out[(t * hc + k) * D + d] = acc;
            }
        }
    }, hc * hc * D);
}

void hc_head(const HyperHeadWeights& w, const ModelConfig& c, const float* X, int64_t T, float* u) {
    const int64_t hc = c.hc_mult, D = c.hidden_size, n = hc * D;
    const float eps = static_cast<float>(c.hc_eps);
    parallel_for(T, [&](int64_t t) {
        const float* x = X + t * n;
        std::vector<float> mix(static_cast<size_t>(hc)), pre(static_cast<size_t>(hc));
        hc_mixes(w.fn.as<float>(), hc, x, n, static_cast<float>(c.rms_norm_eps), mix.data());
        for (int64_t j = 0; j < hc; ++j)
            pre[static_cast<size_t>(j)] =
                sigmoid(mix[static_cast<size_t>(j)] * w.scale.as<float>()[0] + w.base.as<float>()[j]) + eps;
        for (int64_t d = 0; d < D; ++d) {
            float acc = 0;
            for (int64_t j = 0; j < hc; ++j) acc += pre[static_cast<size_t>(j)] * x[j * D + d];
            u[t * D + d] = acc;
        }
    }, hc * n);
}

}  // namespace megamoe::ops
