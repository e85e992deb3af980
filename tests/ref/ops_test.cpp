// ops_test.cpp — properties of the CPU ops that the golden end-to-end tests do not pin down one
// by one: top-k tie-breaking (the same on every backend), RoPE/YaRN tables, the Sinkhorn
// projection, sink attention, gated pooling, and the routers.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>

#include "io/formats.h"
#include "ref/ops.h"
#include "test_util.h"

namespace megamoe {
namespace {

TEST(Ops, TopkBreaksTiesByLowerIndex) {
    const float s[] = {1, 3, 3, 2, 3, 3};
    EXPECT_EQ(ops::topk_indices(s, 6, 2), (std::vector<int32_t>{1, 2}));
    EXPECT_EQ(ops::topk_indices(s, 6, 3), (std::vector<int32_t>{1, 2, 4}));
    EXPECT_EQ(ops::topk_indices(s, 6, 9), (std::vector<int32_t>{0, 1, 2, 3, 4, 5}));   // k > n: all, ascending
    const float z[] = {0, 0, 0, 0};                                                   // all-zero indexer rows
    EXPECT_EQ(ops::topk_indices(z, 4, 2), (std::vector<int32_t>{0, 1}));
}

TEST(Ops, RopeTableAndInverse) {
    // Without YaRN: f_i = base^(-2i/r).
    ops::RopeTable plain = ops::make_rope_table(10000.0, 16, nullptr);
    ASSERT_EQ(plain.inv_freq.size(), 8u);
    for (int i = 0; i < 8; ++i) EXPECT_NEAR(plain.inv_freq[i], std::pow(10000.0, -2.0 * i / 16), 1e-7);
    // YaRN (release values, rope dim 64, base 160000): pairs 0-15 unchanged, 25-31 divided by 16.
    YarnConfig y{16, 65536, 32, 1};
    ops::RopeTable yarn = ops::make_rope_table(160000.0, 64, &y);
    ops::RopeTable base = ops::make_rope_table(160000.0, 64, nullptr);
    for (int i = 0; i < 32; ++i) {
        if (i <= 15) {
            EXPECT_EQ(yarn.inv_freq[i], base.inv_freq[i]) << i;
        }
        if (i >= 25) {
            EXPECT_NEAR(yarn.inv_freq[i], base.inv_freq[i] / 16, base.inv_freq[i] * 1e-6) << i;
        }
        if (i > 15 && i < 25) {
            EXPECT_LT(yarn.inv_freq[i], base.inv_freq[i]) << i;
            EXPECT_GT(yarn.inv_freq[i], base.inv_freq[i] / 16) << i;
        }
    }
    // Rotating then rotating back restores the vector; the nope dims are never touched.
    std::vector<float> x(2 * 3 * 24), orig;
    for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(static_cast<float>(i) * 0.7f);
    orig = x;
    const int64_t pos[] = {5, 1000};
    ops::RopeTable t = ops::make_rope_table(10000.0, 16, nullptr);
    ops::rope(x.data(), 2, 3, 24, pos, t, false);
    for (int64_t h = 0; h < 6; ++h)
        for (int d = 0; d < 8; ++d) EXPECT_EQ(x[h * 24 + d], orig[h * 24 + d]);
    EXPECT_GT(test::max_abs_diff(x.data(), orig.data(), x.size()), 1e-3);
    ops::rope(x.data(), 2, 3, 24, pos, t, true);
    EXPECT_LT(test::max_abs_diff(x.data(), orig.data(), x.size()), 1e-5);
}

TEST(Ops, HcPreGivesDoublyStochasticComb) {
    ModelConfig c;
    c.hc_mult = 4, c.hidden_size = 8, c.hc_sinkhorn_iters = 20, c.hc_eps = 1e-6, c.rms_norm_eps = 1e-6;
    const int64_t n = c.hc_mult * c.hidden_size, mix = c.mix_width();
    std::vector<float> fn(static_cast<size_t>(mix * n)), base(static_cast<size_t>(mix)), scale = {0.7f, 1.3f, 2.0f};
    for (size_t i = 0; i < fn.size(); ++i) fn[i] = std::cos(static_cast<float>(i) * 1.3f) * 0.3f;
    for (size_t i = 0; i < base.size(); ++i) base[i] = std::sin(static_cast<float>(i)) * 0.5f;
    HyperConnWeights w;
    w.fn = Tensor(fn.data(), DType::f32, {mix, n});
    w.base = Tensor(base.data(), DType::f32, {mix});
    w.scale = Tensor(scale.data(), DType::f32, {3});
    std::vector<float> X(static_cast<size_t>(2 * n)), u(16), post(8), comb(32);
    for (size_t i = 0; i < X.size(); ++i) X[i] = std::sin(static_cast<float>(i) * 0.37f) * 2;
    ops::hc_pre(w, c, X.data(), 2, u.data(), post.data(), comb.data());
    for (int t = 0; t < 2; ++t) {
        for (int j = 0; j < 4; ++j) {
            float row = 0, col = 0;
            for (int k = 0; k < 4; ++k) {
                row += comb[t * 16 + j * 4 + k];
                col += comb[t * 16 + k * 4 + j];
            }
            EXPECT_NEAR(row, 1.0f, 1e-3) << "row " << j;
            EXPECT_NEAR(col, 1.0f, 1e-5) << "col " << j;   // the last normalization is by columns
            EXPECT_GT(post[t * 4 + j], 0.0f);
            EXPECT_LT(post[t * 4 + j], 2.0f);
        }
    }
    // hc_post mixes by the transposed comb: out[k] = post_k y + Σ_j comb[j][k] res[j].
    std::vector<float> y(16, 1.0f), out(static_cast<size_t>(2 * n));
    ops::hc_post(y.data(), X.data(), post.data(), comb.data(), 2, 4, 8, out.data());
    for (int k = 0; k < 4; ++k) {
        float want = post[k] * 1.0f;
        for (int j = 0; j < 4; ++j) want += comb[j * 4 + k] * X[j * 8 + 3];
        EXPECT_NEAR(out[k * 8 + 3], want, 1e-5);
    }
}

TEST(Ops, AttentionWithSink) {
    // Two keys, one head of dim 2: softmax over [l1, l2, sink] with the sink column dropped.
    const float q[] = {1, 0};
    const float k0[] = {2, 0}, k1[] = {0, 3};
    const float* keys[] = {k0, k1};
    const float sink = 0.5f;
    float o[2];
    ops::attend_one(q, 1, 2, keys, 2, &sink, 1.0f, o);
    const double e0 = std::exp(2.0), e1 = std::exp(0.0), es = std::exp(0.5), den = e0 + e1 + es;
    EXPECT_NEAR(o[0], 2 * e0 / den, 1e-6);
    EXPECT_NEAR(o[1], 3 * e1 / den, 1e-6);
    // No keys: the output is zero (all weight on the sink).
    ops::attend_one(q, 1, 2, keys, 0, &sink, 1.0f, o);
    EXPECT_EQ(o[0], 0.0f);
}

TEST(Ops, CompressPoolIsPerChannelSoftmax) {
    const float kv0[] = {1, 10}, kv1[] = {3, 20};
    const float g0[] = {0, -INFINITY}, g1[] = {std::log(3.0f), 0};
    const float* kv[] = {kv0, kv1};
    const float* g[] = {g0, g1};
    float out[2];
    ops::compress_pool(kv, g, 2, 2, out);
    EXPECT_NEAR(out[0], (1 * 1 + 3 * 3) / 4.0, 1e-6);   // weights 1:3
    EXPECT_NEAR(out[1], 20.0, 1e-6);                    // a -inf gate gets weight 0
}

TEST(Ops, RoutersNormalizeAndBreakTies) {
    ModelConfig c;
    c.n_routed_experts = 4, c.num_experts_per_tok = 2, c.hidden_size = 2, c.routed_scaling_factor = 1.5;
    // gate rows give logits e0 = x0, e1 = x0, e2 = x1, e3 = -x1: for x = (1, 1), experts 0, 1, 2 tie.
    std::vector<uint16_t> gate = {f32_to_bf16(1), 0, f32_to_bf16(1), 0, 0, f32_to_bf16(1), 0, f32_to_bf16(-1)};
    std::vector<float> bias = {0, 0, 0, 0};
    MoeWeights m;
    m.gate.format = LinearFormat::bf16, m.gate.out = 4, m.gate.in = 2;
    m.gate.weight = Tensor(gate.data(), DType::bf16, {4, 2});
    m.bias = Tensor(bias.data(), DType::f32, {4});
    const float x[] = {1, 1};
    int32_t ids[2];
    float wts[2];
    ops::route_score(m, c, x, 1, ids, wts);
    EXPECT_EQ(ids[0], 0);
    EXPECT_EQ(ids[1], 1);
    EXPECT_NEAR(wts[0] + wts[1], 1.5f, 1e-6);   // normalized, times routed_scaling_factor
    bias[2] = 0.1f;                               // the bias changes the choice, not the weights
    ops::route_score(m, c, x, 1, ids, wts);
    EXPECT_EQ(ids[0], 2);
    EXPECT_NEAR(wts[0], 0.75f, 1e-6);
    // Hash routing takes the table's experts, weights from the same scores.
    std::vector<int64_t> table = {3, 0, 1, 2};   // token 0 -> {3, 0}, token 1 -> {1, 2}
    m.tid2eid = Tensor(table.data(), DType::i64, {2, 2});
    const int32_t tok[] = {0};
    ops::route_hash(m, c, x, tok, 1, ids, wts);
    EXPECT_EQ(ids[0], 3);
    EXPECT_EQ(ids[1], 0);
    const double s3 = std::sqrt(std::log1p(std::exp(-1.0))), s0 = std::sqrt(std::log1p(std::exp(1.0)));
    EXPECT_NEAR(wts[0], 1.5 * s3 / (s3 + s0), 1e-6);
}

}  // namespace
}  // namespace megamoe
