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

// The comb's row softmax depends only on differences of its logits, and is computed so that
// logits far from 0 neither overflow nor underflow f32's exp (the row maximum is subtracted first):
// rows of comb logits around +100 (exp overflows past 88.7) and around -120 (exp underflows below
// -103.3) give the comb of the same rows shifted to 0, and match the double reference. The comb
// logits are exact here (their fn rows are 0, so mix·scale adds nothing; offsets in quarters).
TEST(OpsReference, SinkhornCombOfLargeLogitsIsShiftInvariant) {
    ModelConfig c;
    c.hc_mult = 4, c.hidden_size = 8, c.hc_sinkhorn_iters = 20, c.hc_eps = 1e-6, c.rms_norm_eps = 1e-6;
    const int64_t hc = c.hc_mult, D = c.hidden_size, n = hc * D, mix = c.mix_width();
    std::vector<float> fn(static_cast<size_t>(mix * n), 0.0f), scale = {1.0f, 1.0f, 1.0f};
    for (int64_t o = 0; o < 2 * hc; ++o)
        for (int64_t i = 0; i < n; ++i) fn[size_t(o * n + i)] = std::cos(float(o * n + i)) * 0.1f;
    const float offsets[4][4] = {{0.0f, 0.5f, 1.25f, 2.0f}, {1.0f, 0.0f, 0.75f, 0.25f}, {2.5f, 1.5f, 0.0f, 0.5f},
                                 {0.25f, 2.0f, 1.0f, 0.0f}};
    const float shifts[4] = {100.0f, -120.0f, 0.0f, 90.0f};
    auto bases = [&](bool shifted) {
        std::vector<float> base(static_cast<size_t>(mix), 0.0f);
        for (int64_t j = 0; j < hc; ++j)
            for (int64_t k = 0; k < hc; ++k) base[size_t(2 * hc + j * hc + k)] = offsets[j][k] + (shifted ? shifts[j] : 0.0f);
        return base;
    };
    std::vector<float> base = bases(true), base0 = bases(false);
    HyperConnWeights w;
    w.fn = Tensor(fn.data(), DType::f32, {mix, n});
    w.base = Tensor(base.data(), DType::f32, {mix});
    w.scale = Tensor(scale.data(), DType::f32, {3});
    std::vector<float> x(static_cast<size_t>(n)), u(static_cast<size_t>(D)), post(static_cast<size_t>(hc)),
        comb(static_cast<size_t>(hc * hc));
    for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(float(i) * 0.37f);
    ops::hc_pre(w, c, x.data(), 1, u.data(), post.data(), comb.data());
    for (float v : comb) ASSERT_TRUE(std::isfinite(v));
    const HcRef ref = hc_pre_double(fn, base, scale, x.data(), hc, D, c.rms_norm_eps, c.hc_eps, c.hc_sinkhorn_iters);
    const HcRef ref0 = hc_pre_double(fn, base0, scale, x.data(), hc, D, c.rms_norm_eps, c.hc_eps, c.hc_sinkhorn_iters);
    EXPECT_LE(max_diff(ref.comb, ref0.comb), 1e-12);   // the definition: shifting a row changes nothing
    EXPECT_LE(max_diff(comb.data(), ref.comb), 2e-6);   // kCombTol of the test above
}

// The pre weights have an eps floor: pre_j = sigmoid(mix_j s0 + b_j) + eps, so a stream the gate
// closes (a very negative logit) still enters u with weight eps. With every pre logit at -40
// (sigmoid 4e-18), u = eps · Σ_j x_j: the floor is the whole value, where the comb test above sees
// it only as a 1e-6 part of an O(1) weight.
TEST(OpsReference, HcPreWeightsHaveTheEpsFloor) {
    ModelConfig c;
    c.hc_mult = 4, c.hidden_size = 8, c.hc_sinkhorn_iters = 20, c.hc_eps = 1e-6, c.rms_norm_eps = 1e-6;
    const int64_t hc = c.hc_mult, D = c.hidden_size, n = hc * D, mix = c.mix_width(), T = 2;
    std::vector<float> fn(static_cast<size_t>(mix * n)), base(static_cast<size_t>(mix)), scale = {0.5f, 1.0f, 1.0f};
    for (size_t i = 0; i < fn.size(); ++i) fn[i] = std::cos(float(i) * 0.7f) * 0.1f;
    for (int64_t j = 0; j < mix; ++j) base[size_t(j)] = j < hc ? -40.0f : std::sin(float(j));
    HyperConnWeights w;
    w.fn = Tensor(fn.data(), DType::f32, {mix, n});
    w.base = Tensor(base.data(), DType::f32, {mix});
    w.scale = Tensor(scale.data(), DType::f32, {3});
    std::vector<float> X(static_cast<size_t>(T * n)), u(static_cast<size_t>(T * D)), post(static_cast<size_t>(T * hc)),
        comb(static_cast<size_t>(T * hc * hc));
    for (size_t i = 0; i < X.size(); ++i) X[i] = 1.0f + std::sin(float(i) * 0.37f);   // in [0, 2]: Σ_j x_j > 0
    ops::hc_pre(w, c, X.data(), T, u.data(), post.data(), comb.data());
    for (int64_t t = 0; t < T; ++t) {
        const float* x = X.data() + t * n;
        const HcRef ref = hc_pre_double(fn, base, scale, x, hc, D, c.rms_norm_eps, c.hc_eps, c.hc_sinkhorn_iters);
        for (int64_t j = 0; j < hc; ++j) EXPECT_NEAR(ref.pre[size_t(j)], c.hc_eps, 1e-12) << "the reference's own pre";
        for (int64_t d = 0; d < D; ++d) {
            double want = 0;
            for (int64_t j = 0; j < hc; ++j) want += ref.pre[size_t(j)] * x[j * D + d];
            // fp32: sigmoid(-40) underflows to ~0 either way; u is then eps · Σ x up to a few ulps.
            EXPECT_NEAR(u[size_t(t * D + d)], want, 1e-6 * want) << "token " << t << " dim " << d;
        }
    }
}

// The lightning indexer's score of a compressed row: Σ_h w_h · ReLU(q_h · k) / sqrt(hd), the ReLU
// before the per-head weight, and the weights may be negative. Two heads of dim 4, three rows,
// chosen so each row has one head with a negative dot product: by hand, with the ReLU, and the
// scores without it (a plausible bug) differ from these by far more than rounding.
TEST(OpsReference, IndexerScoresReluBeforeTheHeadWeights) {
    const int64_t nh = 2, hd = 4, n = 3;
    const float q[] = {1.0f, 0.5f, -1.0f, 2.0f,    // head 0
                       -2.0f, 1.0f, 0.0f, 0.5f};   // head 1
    const float w[] = {0.75f, -1.5f};
    const float K[] = {1.0f, 2.0f, 0.0f, 1.0f,     // q0·k = 4,    q1·k = 0.5
                       -1.0f, 0.0f, 1.0f, -1.0f,   // q0·k = -4,   q1·k = 1.5
                       2.0f, -2.0f, 1.0f, 0.0f};   // q0·k = -0.0, q1·k = -6
    float score[n];
    ops::indexer_scores(q, w, nh, hd, K, n, score);
    // scale 1/sqrt(4) = 0.5: row 0: 0.75·4·0.5 - 1.5·0.5·0.5 = 1.125; row 1: -1.5·1.5·0.5 = -1.125;
    // row 2: ReLU takes both heads to 0.
    const double want[] = {1.125, -1.125, 0.0};
    const double no_relu[] = {1.125, 0.75 * -4 * 0.5 - 1.125, 0.75 * 0.0 * 0.5 + -1.5 * -6 * 0.5};
    for (int64_t s = 0; s < n; ++s) EXPECT_NEAR(score[s], want[s], 1e-6) << "row " << s;
    EXPECT_GT(std::fabs(no_relu[1] - want[1]), 1.0);
    EXPECT_GT(std::fabs(no_relu[2] - want[2]), 1.0);
}

// Sink attention is a softmax over [logits, sink], evaluated shifted by the largest of them (the
// sink as it enters the softmax, unscaled), so logits of any size neither overflow nor underflow
// to 0/0. Head 0: logits near -1200 with the sink at -2000, far below them; the keys take all the
// weight. A shift by anything else above every logit by more than ~745 (e.g. the sink times the
// softmax scale, -250 here) underflows every exp in double and gives 0/0. Head 1: logits near
// +1200 with the sink at 0.5. One head dim of 2, scale 1/8; the logits are exact (quarters).
TEST(OpsReference, SinkAttentionOfLargeLogitsIsShiftInvariant) {
    const int64_t H = 2, hd = 2, n = 3;
    const float q[] = {40.0f, 0.0f, -40.0f, 0.0f};
    const float k0[] = {-240.0f, 0.0f}, k1[] = {-239.75f, 8.0f}, k2[] = {-239.5f, -4.0f};
    const float* keys[] = {k0, k1, k2};
    const float sink[] = {-2000.0f, 0.5f};
    const float scale = 0.125f;
    float o[H * hd];
    ops::attend_one(q, H, hd, keys, n, sink, scale, o);
    // By hand: head 0's logits are -1200, -1198.75, -1197.5 (weights ∝ e^-2.5, e^-1.25, 1; the
    // sink's e^-802.5 is 0 in double), head 1's +1200, +1198.75, +1197.5 (∝ 1, e^-1.25, e^-2.5).
    const double e[] = {std::exp(-2.5), std::exp(-1.25), 1.0};
    const double den = e[0] + e[1] + e[2];
    std::vector<double> want(size_t(H * hd), 0.0);
    for (int64_t j = 0; j < n; ++j)
        for (int64_t d = 0; d < hd; ++d) {
            want[size_t(d)] += e[j] / den * keys[j][d];
            want[size_t(hd + d)] += e[n - 1 - j] / den * keys[j][d];
        }
    for (float v : o) ASSERT_TRUE(std::isfinite(v));
    EXPECT_LE(max_diff(o, want), 1e-4);   // |out| <= 240: a few f32 ulps (6e-5 at 240 is 4 ulps)
}

}  // namespace
}  // namespace megamoe
