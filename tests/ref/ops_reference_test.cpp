// ops_reference_test.cpp — CPU ops against independent double-precision references written from
// the definitions (ops.h), where before only the golden end-to-end cases would see a bug: the
// Sinkhorn comb at its exact iteration count, sink attention with a softmax scale != 1, and the
// two-sided SwiGLU clamp. Each test also checks that it would notice the plausible wrong
// version (one Sinkhorn iteration more or less, the scale applied to the sink, a one-sided
// clamp): the wrong reference differs from the right one by far more than the tolerance.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ref/ops.h"
#include "test_util.h"

namespace megamoe {
namespace {

double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

// hc_pre from its definition, in double: mixes = (x · rsqrt(mean(x²) + rms_eps)) · fn; pre_j =
// sigmoid(mix_j s0 + b_j) + eps; post_j = 2 sigmoid(mix_{hc+j} s1 + b_{hc+j}); comb: row softmax
// + eps, column normalization, then (iters − 1) × (rows, columns), each dividing by (sum + eps).
struct HcRef {
    std::vector<double> pre, post, comb;
};
HcRef hc_pre_double(const std::vector<float>& fn, const std::vector<float>& base, const std::vector<float>& scale,
                    const float* x, int64_t hc, int64_t D, double rms_eps, double eps, int64_t iters) {
    const int64_t n = hc * D, mixw = (2 + hc) * hc;
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * x[i];
    const double inv = 1.0 / std::sqrt(ss / double(n) + rms_eps);
    std::vector<double> mix(static_cast<size_t>(mixw));
    for (int64_t o = 0; o < mixw; ++o) {
        double acc = 0;
        for (int64_t i = 0; i < n; ++i) acc += double(fn[size_t(o * n + i)]) * x[i] * inv;
        mix[size_t(o)] = acc;
    }
    HcRef r;
    for (int64_t j = 0; j < hc; ++j) {
        r.pre.push_back(sigmoid(mix[size_t(j)] * scale[0] + base[size_t(j)]) + eps);
        r.post.push_back(2 * sigmoid(mix[size_t(hc + j)] * scale[1] + base[size_t(hc + j)]));
    }
    std::vector<double>& C = r.comb;
    C.assign(size_t(hc * hc), 0);
    for (int64_t j = 0; j < hc; ++j) {
        double m = -INFINITY, s = 0;
        for (int64_t k = 0; k < hc; ++k) {
            C[size_t(j * hc + k)] = mix[size_t(2 * hc + j * hc + k)] * scale[2] + base[size_t(2 * hc + j * hc + k)];
            m = std::max(m, C[size_t(j * hc + k)]);
        }
        for (int64_t k = 0; k < hc; ++k) s += (C[size_t(j * hc + k)] = std::exp(C[size_t(j * hc + k)] - m));
        for (int64_t k = 0; k < hc; ++k) C[size_t(j * hc + k)] = C[size_t(j * hc + k)] / s + eps;
    }
    auto cols = [&] {
        for (int64_t k = 0; k < hc; ++k) {
            double s = 0;
            for (int64_t j = 0; j < hc; ++j) s += C[size_t(j * hc + k)];
            for (int64_t j = 0; j < hc; ++j) C[size_t(j * hc + k)] /= s + eps;
        }
    };
    auto rows = [&] {
        for (int64_t j = 0; j < hc; ++j) {
            double s = 0;
            for (int64_t k = 0; k < hc; ++k) s += C[size_t(j * hc + k)];
            for (int64_t k = 0; k < hc; ++k) C[size_t(j * hc + k)] /= s + eps;
        }
    };
    cols();
    for (int64_t it = 1; it < iters; ++it) {
        rows();
        cols();
    }
    return r;
}

double max_diff(const float* a, const std::vector<double>& b) {
    double m = 0;
    for (size_t i = 0; i < b.size(); ++i) m = std::max(m, std::fabs(double(a[i]) - b[i]));
    return m;
}
double max_diff(const std::vector<double>& a, const std::vector<double>& b) {
    double m = 0;
    for (size_t i = 0; i < b.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
    return m;
}

TEST(OpsReference, SinkhornCombMatchesDoubleAtExactIterationCount) {
    ModelConfig c;
    c.hc_mult = 4, c.hidden_size = 8, c.hc_sinkhorn_iters = 20, c.hc_eps = 1e-6, c.rms_norm_eps = 1e-6;
    const int64_t hc = c.hc_mult, D = c.hidden_size, n = hc * D, mix = c.mix_width(), T = 3;
    std::vector<float> fn(static_cast<size_t>(mix * n)), base(static_cast<size_t>(mix)), scale = {0.7f, 1.3f, 2.0f};
    for (size_t i = 0; i < fn.size(); ++i) fn[i] = std::cos(float(i) * 1.3f) * 0.2f;
    // Comb logits spread over about ±6: Sinkhorn then converges slowly enough that every
    // iteration moves the comb by ~1e-3 (a well-spread comb converges in a few iterations and
    // would not tell 19 from 20).
    for (int64_t j = 0; j < 2 * hc; ++j) base[size_t(j)] = std::sin(float(j)) * 0.5f;
    for (int64_t j = 0; j < hc; ++j)
        for (int64_t k = 0; k < hc; ++k)
            base[size_t(2 * hc + j * hc + k)] = 6.0f * std::sin(1.7f * float(j) + 0.9f * float(k * k) + 0.3f * float(j * k));
    HyperConnWeights w;
    w.fn = Tensor(fn.data(), DType::f32, {mix, n});
    w.base = Tensor(base.data(), DType::f32, {mix});
    w.scale = Tensor(scale.data(), DType::f32, {3});
    std::vector<float> X(static_cast<size_t>(T * n)), u(static_cast<size_t>(T * D)), post(static_cast<size_t>(T * hc)), comb(static_cast<size_t>(T * hc * hc));
    for (size_t i = 0; i < X.size(); ++i) X[i] = std::sin(float(i) * 0.37f) * 2;
    ops::hc_pre(w, c, X.data(), T, u.data(), post.data(), comb.data());

    // Tolerance: fp32 rounding over 20 normalization rounds of values in [0, 1] stays below 1e-6
    // (measured 1.2e-7); 2e-6 is that with margin, while one iteration more or fewer moves the comb
    // by more than 1e-4 (checked below), so the test tells the iteration count exactly.
    constexpr double kCombTol = 2e-6;
    for (int64_t t = 0; t < T; ++t) {
        const float* x = X.data() + t * n;
        const HcRef ref = hc_pre_double(fn, base, scale, x, hc, D, c.rms_norm_eps, c.hc_eps, c.hc_sinkhorn_iters);
        EXPECT_LE(max_diff(comb.data() + t * hc * hc, ref.comb), kCombTol) << "token " << t;
        EXPECT_LE(max_diff(post.data() + t * hc, ref.post), 1e-6) << "token " << t;
        std::vector<double> u_ref(size_t(D), 0.0);
        for (int64_t d = 0; d < D; ++d)
            for (int64_t j = 0; j < hc; ++j) u_ref[size_t(d)] += ref.pre[size_t(j)] * x[j * D + d];
        EXPECT_LE(max_diff(u.data() + t * D, u_ref), 1e-5) << "token " << t;
        for (const int64_t wrong : {c.hc_sinkhorn_iters - 3, c.hc_sinkhorn_iters - 1, c.hc_sinkhorn_iters + 1}) {
            const HcRef off = hc_pre_double(fn, base, scale, x, hc, D, c.rms_norm_eps, c.hc_eps, wrong);
            EXPECT_GT(max_diff(off.comb, ref.comb), 50 * kCombTol) << wrong << " iterations are not told apart";
        }
    }
}

TEST(OpsReference, SinkAttentionWithSoftmaxScale) {
    // Two heads of dim 3, three keys (K = V), scale 1/8: the sink logit enters the softmax as is,
    // unscaled, and its column is dropped.
    const int64_t H = 2, hd = 3, n = 3;
    const float q[] = {1.5f, -2.0f, 0.5f, 3.0f, 1.0f, -1.0f};
    const float k0[] = {2.0f, 0.5f, -1.0f}, k1[] = {-1.0f, 1.0f, 4.0f}, k2[] = {0.0f, -3.0f, 2.5f};
    const float* keys[] = {k0, k1, k2};
    const float sink[] = {0.5f, -1.0f};
    const float scale = 0.125f;
    float o[H * hd];
    ops::attend_one(q, H, hd, keys, n, sink, scale, o);
    auto reference = [&](double sink_factor) {
        std::vector<double> out(size_t(H * hd), 0.0);
        for (int64_t h = 0; h < H; ++h) {
            double l[3], m = sink[h] * sink_factor, den = 0;
            for (int64_t j = 0; j < n; ++j) {
                double dot = 0;
                for (int64_t d = 0; d < hd; ++d) dot += double(q[h * hd + d]) * keys[j][d];
                l[j] = dot * scale;
                m = std::max(m, l[j]);
            }
            for (int64_t j = 0; j < n; ++j) den += std::exp(l[j] - m);
            den += std::exp(sink[h] * sink_factor - m);
            for (int64_t j = 0; j < n; ++j)
                for (int64_t d = 0; d < hd; ++d) out[size_t(h * hd + d)] += std::exp(l[j] - m) / den * keys[j][d];
        }
        return out;
    };
    const std::vector<double> ref = reference(1.0);
    constexpr double kTol = 1e-6;   // fp32 softmax of values |l| < 1 and |k| <= 4: measured < 3e-7
    EXPECT_LE(max_diff(o, ref), kTol);
    // The sink scaled like the logits would be a different attention: the test tells them apart.
    EXPECT_GT(max_diff(reference(scale), ref), 100 * kTol);
}

TEST(OpsReference, SwigluClampsGateAboveAndUpOnBothSides) {
    // D = I = 4, x = e0: w1's and w3's first column are the gate and up pre-activations, w2 = I.
    const int64_t D = 4, I = 4;
    const float g[] = {3.0f, -2.0f, 0.5f, 1.5f};    // clamped above only: 1, -2, 0.5, 1
    const float up[] = {-4.0f, 0.8f, 3.0f, -0.3f};  // clamped both sides: -1, 0.8, 1, -0.3
    const float limit = 1.0f;
    std::vector<float> w1(size_t(I * D), 0), w3(size_t(I * D), 0), w2(size_t(D * I), 0);
    for (int64_t i = 0; i < I; ++i) {
        w1[size_t(i * D)] = g[i];
        w3[size_t(i * D)] = up[i];
        w2[size_t(i * I + i)] = 1;
    }
    auto lin = [](std::vector<float>& v, int64_t out, int64_t in) {
        Linear l;
        l.format = LinearFormat::f32, l.out = out, l.in = in;
        l.weight = Tensor(v.data(), DType::f32, {out, in});
        return l;
    };
    ExpertWeights e{lin(w1, I, D), lin(w3, I, D), lin(w2, D, I)};
    const float x[] = {1, 0, 0, 0, 2, 0, 0, 0};   // two tokens: x = e0 and 2·e0
    const float route[] = {0.5f, 1.25f};
    float y[2 * D];
    ops::expert_ffn(e, limit, x, 2, route, y);
    auto reference = [&](bool clamp_up_below, bool clamp_gate_below) {
        std::vector<double> out;
        for (int t = 0; t < 2; ++t) {
            for (int64_t i = 0; i < I; ++i) {
                double gv = std::min(double(g[i]) * x[t * D], double(limit));
                if (clamp_gate_below) gv = std::max(gv, -double(limit));
                double uv = std::min(double(up[i]) * x[t * D], double(limit));
                if (clamp_up_below) uv = std::max(uv, -double(limit));
                out.push_back(gv * sigmoid(gv) * uv * route[t]);
            }
        }
        return out;
    };
    const std::vector<double> ref = reference(true, false);
    constexpr double kTol = 1e-6;   // a few fp32 operations on values of order 1
    EXPECT_LE(max_diff(y, ref), kTol);
    EXPECT_GT(max_diff(reference(false, false), ref), 100 * kTol);   // up clamped above only
    EXPECT_GT(max_diff(reference(true, true), ref), 100 * kTol);     // gate clamped below too
}

}  // namespace
}  // namespace megamoe
