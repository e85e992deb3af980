// compressor_reference_test.cpp — the ratio-4 overlapping compressor on a hand-built two-window
// case, against pooled rows computed here from the rules in compressor.h (which slots each row
// pools, the per-feature softmax with the position bias, the RMS norm, the rotation at the
// window's first position), and the position at which each compressed row appears.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "io/formats.h"
#include "ref/compressor.h"
#include "test_util.h"

namespace megamoe {
namespace {

constexpr int64_t kR = 4, kD = 4, kW = 2 * kD;   // ratio, row width, per-token width (series A | B)

// Token t's projections: series A = features [0, d), series B = [d, 2d).
float kv_of(int64_t t, int64_t f) { return std::sin(0.9f * float(t) + 1.7f * float(f)) * (1.0f + 0.25f * float(f)); }
float gate_of(int64_t t, int64_t f) { return std::cos(0.6f * float(t) - 0.4f * float(f)); }
float ape_of(int64_t s, int64_t f) { return 0.3f * float(s) - 0.2f * float(f % 3); }

struct Case {
    std::vector<float> ape, kv, gate;
    std::vector<uint16_t> norm;
    Compressor w;
    ModelConfig c;
    ops::RopeTable rope = ops::make_rope_table(10000.0, 2, nullptr);   // the last 2 of 4 dims rotate
    Case() {
        for (int64_t s = 0; s < kR; ++s)
            for (int64_t f = 0; f < kW; ++f) ape.push_back(ape_of(s, f));
        for (int64_t t = 0; t < 3 * kR; ++t)
            for (int64_t f = 0; f < kW; ++f) {
                kv.push_back(kv_of(t, f));
                gate.push_back(gate_of(t, f));
            }
        for (const float v : {1.0f, 0.5f, 2.0f, 1.5f}) norm.push_back(f32_to_bf16(v));
        w.ratio = kR, w.dim = kD, w.overlap = true;
        w.ape = Tensor(ape.data(), DType::f32, {kR, kW});
        w.norm = Tensor(norm.data(), DType::bf16, {kD});
        c.rms_norm_eps = 1e-6;
    }
};

// Row `row` from the rules, in double until the rotation: it pools series A of window row-1 (when
// there is one) and series B of window `row`; slot s of a window gets the bias ape[s].
std::vector<float> expected_row(const Case& k, int64_t row) {
    struct Slot {
        int64_t token, offset;   // offset 0: series A, d: series B
    };
    std::vector<Slot> slots;
    if (row > 0)
        for (int64_t s = 0; s < kR; ++s) slots.push_back({(row - 1) * kR + s, 0});
    for (int64_t s = 0; s < kR; ++s) slots.push_back({row * kR + s, kD});
    std::vector<double> pooled(kD);
    for (int64_t f = 0; f < kD; ++f) {
        double m = -INFINITY, den = 0, num = 0;
        auto g = [&](const Slot& sl) { return double(gate_of(sl.token, sl.offset + f)) + ape_of(sl.token % kR, sl.offset + f); };
        for (const Slot& sl : slots) m = std::max(m, g(sl));
        for (const Slot& sl : slots) {
            den += std::exp(g(sl) - m);
            num += std::exp(g(sl) - m) * kv_of(sl.token, sl.offset + f);
        }
        pooled[size_t(f)] = num / den;
    }
    double ss = 0;
    for (const double v : pooled) ss += v * v;
    const double inv = 1.0 / std::sqrt(ss / kD + 1e-6);
    std::vector<float> out(kD);
    const float weight[] = {1.0f, 0.5f, 2.0f, 1.5f};
    for (int64_t f = 0; f < kD; ++f) out[size_t(f)] = float(pooled[size_t(f)] * inv * weight[f]);
    const int64_t first = row * kR;   // rotated at the window's first position
    ops::rope(out.data(), 1, 1, kD, &first, k.rope, false);
    return out;
}

TEST(CompressorReference, Ratio4OverlapTwoWindowsByHand) {
    const Case k;
    CompressorState st;
    std::vector<int64_t> pos(2 * kR);
    for (int64_t p = 0; p < 2 * kR; ++p) pos[size_t(p)] = p;
    compressor_feed(k.w, k.c, k.rope, false, k.kv.data(), k.gate.data(), pos.data(), 2 * kR, st);
    ASSERT_EQ(st.n_rows, 2);
    ASSERT_EQ(st.rows.size(), size_t(2 * kD));
    for (int64_t row = 0; row < 2; ++row) {
        const std::vector<float> want = expected_row(k, row);
        EXPECT_LE(test::max_abs_diff(st.rows.data() + row * kD, want.data(), kD), 2e-6) << "row " << row;
    }
    // The plausible wrong windows give different rows: the test tells them apart.
    const std::vector<float> row1 = expected_row(k, 1), row0 = expected_row(k, 0);
    EXPECT_GT(test::max_abs_diff(row0.data(), row1.data(), kD), 1e-2);
}

// Row w appears once position (w+1)·r − 1 has been fed, not before: a query at position p sees
// (p + 1) / r rows. Any chunking gives the same rows bit for bit.
TEST(CompressorReference, RowAppearsAtTheLastPositionOfItsWindow) {
    const Case k;
    CompressorState one;
    for (int64_t p = 0; p < 3 * kR; ++p) {
        compressor_feed(k.w, k.c, k.rope, false, k.kv.data() + p * kW, k.gate.data() + p * kW, &p, 1, one);
        EXPECT_EQ(one.n_rows, (p + 1) / kR) << "after position " << p;
        EXPECT_EQ(one.n_pending, (p + 1) % kR) << "after position " << p;
    }
    CompressorState chunks;
    std::vector<int64_t> pos(3 * kR);
    for (int64_t p = 0; p < 3 * kR; ++p) pos[size_t(p)] = p;
    for (const auto& [from, n] : {std::pair<int64_t, int64_t>{0, 3}, {3, 6}, {9, 3}})
        compressor_feed(k.w, k.c, k.rope, false, k.kv.data() + from * kW, k.gate.data() + from * kW, pos.data() + from,
                        n, chunks);
    ASSERT_EQ(chunks.rows.size(), one.rows.size());
    EXPECT_EQ(test::max_abs_diff(chunks.rows.data(), one.rows.data(), one.rows.size()), 0.0);
    const std::vector<float> row2 = expected_row(k, 2);
    EXPECT_LE(test::max_abs_diff(one.rows.data() + 2 * kD, row2.data(), kD), 2e-6);
}

}  // namespace
}  // namespace megamoe
