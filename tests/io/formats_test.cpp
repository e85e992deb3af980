// formats_test.cpp — bit-exactness of the scalar codecs, row decoders and quantizers in formats.h.
//
// Scalar decoders are checked against formulas written independently here (ldexp of sign,
// exponent, mantissa); encoders against exhaustive or brute-force nearest-value searches. The
// quantizer tests check the properties `megamoe synth` and the loaders rely on: the recipe's
// scales, error bounds, exact zeros, and that re-quantizing a dequantized matrix gives the same
// values (and, where the recipe allows it, the same bytes).
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/common.h"
#include "io/formats.h"
#include "test_util.h"

namespace megamoe {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

uint32_t bits(float f) { return std::bit_cast<uint32_t>(f); }
float from_bits(uint32_t u) { return std::bit_cast<float>(u); }
float up(float f) { return std::nextafter(f, kInf); }
float down(float f) { return std::nextafter(f, -kInf); }

const float kE2m1Grid[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};

// Independent e4m3fn decoder: sign, 4-bit exponent (bias 7), 3-bit mantissa, subnormals.
double e4m3_ref(int c) {
    const int s = c >> 7, e = (c >> 3) & 0xF, m = c & 7;
    if (e == 15 && m == 7) return std::nan("");
    const double mag = e == 0 ? std::ldexp(m, -9) : std::ldexp(1.0 + m / 8.0, e - 7);
    return s ? -mag : mag;
}

// Brute-force RNE onto a sorted grid of non-negative values (index parity = mantissa parity).
int nearest_even(const std::vector<double>& grid, double r) {
    int best = 0;
    for (int i = 1; i < static_cast<int>(grid.size()); ++i) {
        const double d = std::fabs(r - grid[i]), db = std::fabs(r - grid[best]);
        if (d < db || (d == db && i % 2 == 0)) best = i;
    }
    return best;
}

std::vector<float> random_matrix(int64_t out, int64_t in, uint32_t seed, float stddev = 1.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> dist(0.0f, stddev);
    std::vector<float> w(static_cast<size_t>(out * in));
    for (float& x : w) x = dist(rng);
    return w;
}

// ---- packed weights plus the callers' pointer arithmetic from formats.h

struct Fp8 {
    int64_t out, in;
    std::vector<uint8_t> q, s;
    Fp8(int64_t o, int64_t i)
        : out(o), in(i), q(static_cast<size_t>(o * i)),
          s(static_cast<size_t>(((o + 127) / 128) * ((i + 127) / 128))) {}
    int64_t scale_cols() const { return (in + 127) / 128; }
    uint8_t scale_of(int64_t r, int64_t c) const {
        return s[static_cast<size_t>((r / 128) * scale_cols() + c / 128)];
    }
};

Fp8 quant_fp8(const std::vector<float>& w, int64_t out, int64_t in) {
    Fp8 p(out, in);
    quantize_fp8_block(w.data(), out, in, p.q.data(), p.s.data());
    return p;
}

std::vector<float> dequant(const Fp8& p) {
    std::vector<float> w(static_cast<size_t>(p.out * p.in));
    for (int64_t n = 0; n < p.out; ++n)
        decode_fp8_block_row(&p.q[static_cast<size_t>(n * p.in)],
                             &p.s[static_cast<size_t>((n / 128) * p.scale_cols())], p.in,
                             &w[static_cast<size_t>(n * p.in)]);
    return w;
}

struct Fp4 {  // MXFP4 or NVFP4
    int64_t out, in, group;
    std::vector<uint8_t> q, s;
    float s2 = 1.0f;
    Fp4(int64_t o, int64_t i, int64_t g)
        : out(o), in(i), group(g), q(static_cast<size_t>(o * i / 2)), s(static_cast<size_t>(o * i / g)) {}
    uint8_t code(int64_t r, int64_t c) const {
        const uint8_t b = q[static_cast<size_t>(r * in / 2 + c / 2)];
        return c % 2 ? b >> 4 : b & 0xF;
    }
    uint8_t scale_of(int64_t r, int64_t c) const {
        return s[static_cast<size_t>(r * in / group + c / group)];
    }
};

Fp4 quant_mxfp4(const std::vector<float>& w, int64_t out, int64_t in) {
    Fp4 p(out, in, kMxfp4Group);
    quantize_mxfp4(w.data(), out, in, p.q.data(), p.s.data());
    return p;
}

Fp4 quant_nvfp4(const std::vector<float>& w, int64_t out, int64_t in) {
    Fp4 p(out, in, kNvfp4Group);
    quantize_nvfp4(w.data(), out, in, p.q.data(), p.s.data(), &p.s2);
    return p;
}

std::vector<float> dequant(const Fp4& p) {
    std::vector<float> w(static_cast<size_t>(p.out * p.in));
    for (int64_t n = 0; n < p.out; ++n) {
        const uint8_t* q = &p.q[static_cast<size_t>(n * p.in / 2)];
        const uint8_t* s = &p.s[static_cast<size_t>(n * p.in / p.group)];
        float* o = &w[static_cast<size_t>(n * p.in)];
        if (p.group == kMxfp4Group)
            decode_mxfp4_row(q, s, p.in, o);
        else
            decode_nvfp4_row(q, s, p.s2, p.in, o);
    }
    return w;
}

void expect_bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i)
        ASSERT_EQ(bits(a[i]), bits(b[i])) << "element " << i << ": " << a[i] << " vs " << b[i];
}

// ============================================================== E2M1

TEST(E2m1, DecodeTable) {
    for (int c = 0; c < 16; ++c) {
        const float v = e2m1_to_f32(static_cast<uint8_t>(c));
        EXPECT_EQ(std::fabs(v), kE2m1Grid[c & 7]) << c;
        EXPECT_EQ(std::signbit(v), c >= 8) << c;
    }
    EXPECT_EQ(e2m1_to_f32(0xF7), 6.0f);  // only the low nibble counts
    EXPECT_EQ(e2m1_to_f32(0x1F), -6.0f);
}

TEST(E2m1, RoundTripAndSign) {
    for (int c = 0; c < 16; ++c) EXPECT_EQ(f32_to_e2m1(e2m1_to_f32(static_cast<uint8_t>(c))), c) << c;
    EXPECT_EQ(f32_to_e2m1(0.0f), 0x0);
    EXPECT_EQ(f32_to_e2m1(-0.0f), 0x8);   // -0 keeps its sign
    EXPECT_EQ(f32_to_e2m1(-0.1f), 0x8);   // and so does a negative value rounding to 0
    EXPECT_EQ(f32_to_e2m1(-1.0f), 0xA);
    EXPECT_EQ(f32_to_e2m1(kNaN), 0x0);    // E2M1 has no NaN
    EXPECT_EQ(f32_to_e2m1(-kNaN), 0x0);
}

TEST(E2m1, TiesToEven) {
    const struct { float v; uint8_t code; } ties[] = {
        {0.25f, 0}, {0.75f, 2}, {1.25f, 2}, {1.75f, 4}, {2.5f, 4}, {3.5f, 6}, {5.0f, 6}};
    for (const auto& t : ties) {
        EXPECT_EQ(f32_to_e2m1(t.v), t.code) << t.v;
        EXPECT_EQ(f32_to_e2m1(-t.v), t.code | 0x8) << -t.v;
    }
}

TEST(E2m1, NearestAroundMidpoints) {
    for (int c = 0; c < 7; ++c) {
        const float mid = (kE2m1Grid[c] + kE2m1Grid[c + 1]) / 2;
        EXPECT_EQ(f32_to_e2m1(down(mid)), c) << mid;
        EXPECT_EQ(f32_to_e2m1(up(mid)), c + 1) << mid;
        EXPECT_EQ(f32_to_e2m1(-down(mid)), c | 0x8) << mid;
        EXPECT_EQ(f32_to_e2m1(-up(mid)), (c + 1) | 0x8) << mid;
    }
    // Dense sweep of [0, 8) against a brute-force nearest-even search.
    const std::vector<double> grid(std::begin(kE2m1Grid), std::end(kE2m1Grid));
    for (int i = 0; i < 8 * 4096; ++i) {
        const float v = static_cast<float>(i) / 4096.0f;
        ASSERT_EQ(f32_to_e2m1(v), nearest_even(grid, v)) << v;
    }
}

TEST(E2m1, Saturation) {
    for (float v : {6.0f, up(6.0f), 7.0f, 100.0f, 1e30f, std::numeric_limits<float>::max(), kInf}) {
        EXPECT_EQ(f32_to_e2m1(v), 0x7) << v;
        EXPECT_EQ(f32_to_e2m1(-v), 0xF) << -v;
    }
}

// ============================================================== E4M3

TEST(E4m3, DecodeAllCodes) {
    for (int c = 0; c < 256; ++c) {
        const float v = e4m3_to_f32(static_cast<uint8_t>(c));
        if ((c & 0x7F) == 0x7F) {
            EXPECT_TRUE(std::isnan(v)) << c;
            continue;
        }
        EXPECT_EQ(bits(v), bits(static_cast<float>(e4m3_ref(c)))) << "code " << c;
    }
    EXPECT_EQ(e4m3_to_f32(0x7E), 448.0f);
    EXPECT_EQ(e4m3_to_f32(0x01), std::ldexp(1.0f, -9));
    EXPECT_EQ(e4m3_to_f32(0x08), std::ldexp(1.0f, -6));
    EXPECT_EQ(bits(e4m3_to_f32(0x80)), bits(-0.0f));
}

TEST(E4m3, RoundTrip) {
    for (int c = 0; c < 256; ++c) {
        if ((c & 0x7F) == 0x7F) continue;
        EXPECT_EQ(f32_to_e4m3(e4m3_to_f32(static_cast<uint8_t>(c))), c) << c;
    }
    EXPECT_EQ(f32_to_e4m3(-0.0f), 0x80);
    EXPECT_EQ(f32_to_e4m3(kNaN), 0x7F);
    EXPECT_EQ(f32_to_e4m3(-kNaN), 0x7F);
}

TEST(E4m3, TiesToEven) {
    // Every midpoint of adjacent positive values (subnormal/normal boundary 0x07|0x08 included)
    // goes to the even code; one ulp either side goes to the nearer one.
    for (int c = 0; c < 0x7E; ++c) {
        const double lo = e4m3_ref(c), hi = e4m3_ref(c + 1);
        const float mid = static_cast<float>((lo + hi) / 2);
        ASSERT_EQ(static_cast<double>(mid), (lo + hi) / 2);  // exact in f32
        const int even = c % 2 == 0 ? c : c + 1;
        EXPECT_EQ(f32_to_e4m3(mid), even) << mid;
        EXPECT_EQ(f32_to_e4m3(-mid), even | 0x80) << -mid;
        EXPECT_EQ(f32_to_e4m3(down(mid)), c) << mid;
        EXPECT_EQ(f32_to_e4m3(up(mid)), c + 1) << mid;
    }
}

TEST(E4m3, NearestSweep) {
    // Every 997th f32 bit pattern from 0 up to 480, against a brute-force nearest-even search
    // over the 127 non-negative finite values (saturating above 448).
    std::vector<double> grid;
    for (int c = 0; c <= 0x7E; ++c) grid.push_back(e4m3_ref(c));
    for (uint32_t u = 0; u <= bits(480.0f); u += 997) {
        const float v = from_bits(u);
        const int want = v > 448.0f ? 0x7E : nearest_even(grid, v);
        ASSERT_EQ(f32_to_e4m3(v), want) << v;
        ASSERT_EQ(f32_to_e4m3(-v), want | 0x80) << -v;
    }
}

TEST(E4m3, Saturation) {
    for (float v : {up(448.0f), 449.0f, 464.0f, 480.0f, 1e6f, std::numeric_limits<float>::max(), kInf}) {
        EXPECT_EQ(f32_to_e4m3(v), 0x7E) << v;
        EXPECT_EQ(f32_to_e4m3(-v), 0xFE) << -v;
    }
}

TEST(E4m3, Underflow) {
    const float half_sub = std::ldexp(1.0f, -10);  // half the smallest subnormal 2^-9
    EXPECT_EQ(f32_to_e4m3(std::ldexp(1.0f, -11)), 0x00);
    EXPECT_EQ(f32_to_e4m3(down(half_sub)), 0x00);
    EXPECT_EQ(f32_to_e4m3(half_sub), 0x00);  // tie -> even (0)
    EXPECT_EQ(f32_to_e4m3(up(half_sub)), 0x01);
    EXPECT_EQ(f32_to_e4m3(-up(half_sub)), 0x81);
    EXPECT_EQ(f32_to_e4m3(-half_sub), 0x80);
    EXPECT_EQ(f32_to_e4m3(std::numeric_limits<float>::denorm_min()), 0x00);
    EXPECT_EQ(f32_to_e4m3(std::numeric_limits<float>::min()), 0x00);
    EXPECT_EQ(f32_to_e4m3(1.5f * std::ldexp(1.0f, -9)), 0x02);  // tie 1|2 -> 2
    EXPECT_EQ(f32_to_e4m3(2.5f * std::ldexp(1.0f, -9)), 0x02);  // tie 2|3 -> 2
}

// ============================================================== BF16

TEST(Bf16, DecodeAndRoundTrip) {
    for (uint32_t h = 0; h < 0x10000; ++h) {
        const float f = bf16_to_f32(static_cast<uint16_t>(h));
        ASSERT_EQ(bits(f), h << 16);
        const uint16_t back = f32_to_bf16(f);
        if (std::isnan(f)) {
            ASSERT_TRUE(std::isnan(bf16_to_f32(back))) << h;
            ASSERT_EQ(back, h | 0x40) << h;  // quieted, sign and payload kept
        } else {
            ASSERT_EQ(back, h) << h;
        }
    }
}

TEST(Bf16, RoundsToNearestEven) {
    EXPECT_EQ(f32_to_bf16(from_bits(0x3F808000)), 0x3F80);  // tie, even below
    EXPECT_EQ(f32_to_bf16(from_bits(0x3F818000)), 0x3F82);  // tie, even above
    EXPECT_EQ(f32_to_bf16(from_bits(0x3F807FFF)), 0x3F80);
    EXPECT_EQ(f32_to_bf16(from_bits(0x3F808001)), 0x3F81);
    EXPECT_EQ(f32_to_bf16(from_bits(0xBF818000)), 0xBF82);
    EXPECT_EQ(f32_to_bf16(from_bits(0x3FFF8000)), 0x4000);  // carry into the exponent
    EXPECT_EQ(f32_to_bf16(from_bits(0x7F7FFFFF)), 0x7F80);  // overflows to inf, as RNE does
    // Random patterns against a reference picking the nearer of the two neighbours in double.
    std::mt19937 rng(1234);
    for (int i = 0; i < 200000; ++i) {
        const uint32_t u = static_cast<uint32_t>(rng());
        const float f = from_bits(u);
        if (!std::isfinite(f)) continue;
        const uint32_t lo = u >> 16, hi = lo + 1;
        const double dl = std::fabs(static_cast<double>(f) - bf16_to_f32(static_cast<uint16_t>(lo)));
        const double dh = (hi & 0x7F80) == 0x7F80 && (hi & 0x7F) == 0
                              ? std::ldexp(1.0, 128) - std::fabs(static_cast<double>(f))  // inf as 2^128
                              : std::fabs(static_cast<double>(f) - bf16_to_f32(static_cast<uint16_t>(hi)));
        const uint32_t want = dl < dh || (dl == dh && lo % 2 == 0) ? lo : hi;
        ASSERT_EQ(f32_to_bf16(f), want) << std::hex << u;
    }
}

TEST(Bf16, SpecialValues) {
    EXPECT_EQ(f32_to_bf16(kInf), 0x7F80);
    EXPECT_EQ(f32_to_bf16(-kInf), 0xFF80);
    EXPECT_EQ(f32_to_bf16(-0.0f), 0x8000);
    for (uint32_t u : {0x7F800001u, 0x7F80FFFFu, 0x7FC00000u, 0xFF800001u, 0x7FFFFFFFu}) {
        const uint16_t h = f32_to_bf16(from_bits(u));
        EXPECT_TRUE(std::isnan(bf16_to_f32(h))) << std::hex << u;
        EXPECT_TRUE(h & 0x40) << std::hex << u;  // quiet
        EXPECT_EQ(h & 0x8000, (u >> 16) & 0x8000) << std::hex << u;
    }
    EXPECT_TRUE(std::isinf(bf16_to_f32(0x7F80)));
}

// ============================================================== E8M0

TEST(E8m0, Decode) {
    for (int c = 0; c < 255; ++c)
        EXPECT_EQ(bits(e8m0_to_f32(static_cast<uint8_t>(c))), bits(std::ldexp(1.0f, c - 127))) << c;
    EXPECT_GT(e8m0_to_f32(0), 0.0f);  // 2^-127 is a subnormal, not flushed
    EXPECT_EQ(e8m0_to_f32(127), 1.0f);
    EXPECT_TRUE(std::isnan(e8m0_to_f32(0xFF)));
}

TEST(E8m0, Ceil) {
    for (int k = -127; k <= 127; ++k) {
        const float p = std::ldexp(1.0f, k);
        EXPECT_EQ(e8m0_ceil(p), k + 127) << k;
        EXPECT_EQ(e8m0_ceil(up(p)), k == 127 ? 254 : k + 128) << k;
        if (k > -127) { EXPECT_EQ(e8m0_ceil(down(p)), k + 127) << k; }
        EXPECT_EQ(e8m0_ceil(1.5f * p), k == 127 ? 254 : k + 128) << k;
    }
    EXPECT_EQ(e8m0_ceil(std::numeric_limits<float>::denorm_min()), 0);
    EXPECT_EQ(e8m0_ceil(std::ldexp(1.0f, -140)), 0);
    EXPECT_EQ(e8m0_ceil(1e-40f), 0);
    EXPECT_EQ(e8m0_ceil(std::numeric_limits<float>::max()), 254);
    EXPECT_EQ(e8m0_ceil(kInf), 254);
    EXPECT_EQ(e8m0_ceil(0.0f), 0);
    EXPECT_EQ(e8m0_ceil(-0.0f), 0);
    EXPECT_EQ(e8m0_ceil(-1.0f), 0);
    EXPECT_EQ(e8m0_ceil(kNaN), 0);
    EXPECT_EQ(e8m0_ceil(0.75f), 127);
    EXPECT_EQ(e8m0_ceil(3.0f), 129);
}

// ============================================================== quantizers: fp8 block

struct Shape { int64_t out, in; };

// Re-quantizing dequantized weights reproduces the values bit-exactly. The bytes are the same
// in every block whose largest code exceeds half the format's maximum; in the others (e.g. block
// amax/scale in (224, 232) rounds to 224), 2^ceil(log2(amax/448)) is half the old scale, so the
// scale byte drops by one and codes double. One re-quantization reaches a fixed point.
TEST(QuantFp8, RequantizeIsIdempotent) {
    for (Shape sh : {Shape{3, 160}, Shape{130, 200}, Shape{256, 384}}) {
        SCOPED_TRACE(testing::Message() << sh.out << "x" << sh.in);
        std::vector<float> w = random_matrix(sh.out, sh.in, 11);
        // Block (0,0): amax/scale = 225 rounds to code 224 -> the halving case.
        for (int64_t r = 0; r < std::min<int64_t>(sh.out, 128); ++r)
            for (int64_t c = 0; c < std::min<int64_t>(sh.in, 128); ++c) w[r * sh.in + c] *= 1e-3f;
        w[0] = 225.0f / 256.0f;
        const Fp8 q1 = quant_fp8(w, sh.out, sh.in);
        const std::vector<float> d1 = dequant(q1);
        const Fp8 q2 = quant_fp8(d1, sh.out, sh.in);
        expect_bitwise_equal(dequant(q2), d1);
        int same = 0, halved = 0;
        for (int64_t rb = 0; rb < (sh.out + 127) / 128; ++rb)
            for (int64_t cb = 0; cb < q1.scale_cols(); ++cb) {
                int max_code = 0;
                for (int64_t r = rb * 128; r < std::min(sh.out, rb * 128 + 128); ++r)
                    for (int64_t c = cb * 128; c < std::min(sh.in, cb * 128 + 128); ++c)
                        max_code = std::max(max_code, q1.q[static_cast<size_t>(r * sh.in + c)] & 0x7F);
                const uint8_t s1 = q1.scale_of(rb * 128, cb * 128), s2 = q2.scale_of(rb * 128, cb * 128);
                if (e4m3_to_f32(static_cast<uint8_t>(max_code)) > 224.0f) {
                    EXPECT_EQ(s2, s1);
                    ++same;
                } else {
                    EXPECT_EQ(s2, s1 - 1);
                    ++halved;
                }
            }
        EXPECT_GT(same, 0);
        EXPECT_GT(halved, 0);
        for (size_t i = 0; i < q1.q.size(); ++i) {
            const int64_t r = static_cast<int64_t>(i) / sh.in, c = static_cast<int64_t>(i) % sh.in;
            if (q1.scale_of(r, c) == q2.scale_of(r, c)) { ASSERT_EQ(q2.q[i], q1.q[i]) << i; }
        }
        const Fp8 q3 = quant_fp8(dequant(q2), sh.out, sh.in);
        EXPECT_EQ(q3.q, q2.q);
        EXPECT_EQ(q3.s, q2.s);
    }
}

TEST(QuantFp8, ErrorBound) {
    for (Shape sh : {Shape{3, 160}, Shape{130, 200}, Shape{256, 384}}) {
        SCOPED_TRACE(testing::Message() << sh.out << "x" << sh.in);
        const std::vector<float> w = random_matrix(sh.out, sh.in, 22, 0.02f);
        const Fp8 q = quant_fp8(w, sh.out, sh.in);
        const std::vector<float> d = dequant(q);
        for (int64_t i = 0; i < sh.out * sh.in; ++i) {
            const size_t k = static_cast<size_t>(i);
            const double scale = std::ldexp(1.0, q.scale_of(i / sh.in, i % sh.in) - 127);
            const double r = std::fabs(w[k]) / scale;  // exact: scale is a power of two
            const uint8_t code = q.q[k] & 0x7F;
            const double c = e4m3_ref(code);
            ASSERT_LE(r, 448.0) << i;
            ASSERT_EQ(static_cast<double>(std::fabs(d[k])), c * scale) << i;
            if (c != 0) { ASSERT_EQ(std::signbit(d[k]), std::signbit(w[k])) << i; }
            if (r >= std::ldexp(1.0, -6))
                ASSERT_LE(std::fabs(r - c), std::ldexp(r, -4)) << i;  // half an ulp, relative
            else
                ASSERT_LE(std::fabs(r - c), std::ldexp(1.0, -10)) << i;  // half a subnormal step
            // Nearest: no closer neighbour.
            if (code > 0) { ASSERT_LE(std::fabs(r - c), std::fabs(r - e4m3_ref(code - 1))) << i; }
            if (code < 0x7E) { ASSERT_LE(std::fabs(r - c), std::fabs(r - e4m3_ref(code + 1))) << i; }
        }
        // Every block uses the smallest power-of-two scale with amax/scale <= 448.
        for (int64_t rb = 0; rb < (sh.out + 127) / 128; ++rb)
            for (int64_t cb = 0; cb < q.scale_cols(); ++cb) {
                float amax = 0;
                for (int64_t r = rb * 128; r < std::min(sh.out, rb * 128 + 128); ++r)
                    for (int64_t c = cb * 128; c < std::min(sh.in, cb * 128 + 128); ++c)
                        amax = std::max(amax, std::fabs(w[static_cast<size_t>(r * sh.in + c)]));
                const int s = q.scale_of(rb * 128, cb * 128);
                EXPECT_LE(amax, std::ldexp(448.0, s - 127));
                EXPECT_GT(amax, std::ldexp(448.0, s - 128));
            }
    }
}

TEST(QuantFp8, ZeroBlock) {
    std::vector<float> w = random_matrix(200, 300, 33);
    for (int64_t r = 128; r < 200; ++r)  // block (1, 1), a partial block
        for (int64_t c = 128; c < 256; ++c) w[static_cast<size_t>(r * 300 + c)] = 0.0f;
    const Fp8 q = quant_fp8(w, 200, 300);
    EXPECT_EQ(q.scale_of(128, 128), 0);
    const std::vector<float> d = dequant(q);
    for (int64_t r = 128; r < 200; ++r)
        for (int64_t c = 128; c < 256; ++c) {
            ASSERT_EQ(q.q[static_cast<size_t>(r * 300 + c)], 0);
            ASSERT_EQ(bits(d[static_cast<size_t>(r * 300 + c)]), 0u);
        }
    EXPECT_NE(q.scale_of(0, 0), 0);
}

TEST(QuantFp8, MaxElementIsExact) {
    // amax = 448·2^-3: scale 2^-3 exactly, and the max element maps to 0x7E and back exactly.
    for (float sign : {1.0f, -1.0f}) {
        std::vector<float> w = random_matrix(128, 256, 44, 0.5f);
        for (float& x : w) x = std::clamp(x, -40.0f, 40.0f);
        w[5 * 256 + 7] = sign * 448.0f / 8.0f;
        const Fp8 q = quant_fp8(w, 128, 256);
        EXPECT_EQ(q.scale_of(0, 0), 127 - 3);
        EXPECT_EQ(q.q[5 * 256 + 7], sign > 0 ? 0x7E : 0xFE);
        EXPECT_EQ(dequant(q)[5 * 256 + 7], sign * 56.0f);
        const Fp8 q2 = quant_fp8(dequant(q), 128, 256);
        EXPECT_EQ(q2.q, q.q);
        EXPECT_EQ(q2.s, q.s);
    }
}

TEST(QuantFp8, RejectsNonFinite) {
    std::vector<float> w(128 * 128, 1.0f);
    uint8_t s[1];
    std::vector<uint8_t> q(w.size());
    w[77] = kNaN;
    EXPECT_THROW(quantize_fp8_block(w.data(), 128, 128, q.data(), s), Error);
    w[77] = -kInf;
    EXPECT_THROW(quantize_fp8_block(w.data(), 128, 128, q.data(), s), Error);
}

// ============================================================== quantizers: MXFP4

// Same statement as for fp8: values always survive; bytes survive unless a group's largest code
// is 3 (amax/scale in (3, 3.5)), where the scale halves and codes double.
TEST(QuantMxfp4, RequantizeIsIdempotent) {
    for (Shape sh : {Shape{7, 64}, Shape{256, 384}}) {
        SCOPED_TRACE(testing::Message() << sh.out << "x" << sh.in);
        const std::vector<float> w = random_matrix(sh.out, sh.in, 55);
        const Fp4 q1 = quant_mxfp4(w, sh.out, sh.in);
        const std::vector<float> d1 = dequant(q1);
        const Fp4 q2 = quant_mxfp4(d1, sh.out, sh.in);
        expect_bitwise_equal(dequant(q2), d1);
        int same = 0, halved = 0;
        for (int64_t r = 0; r < sh.out; ++r)
            for (int64_t c0 = 0; c0 < sh.in; c0 += 32) {
                int max_code = 0;
                for (int64_t c = c0; c < c0 + 32; ++c) max_code = std::max(max_code, q1.code(r, c) & 7);
                if (max_code > 5) {  // |code value| > 3
                    ++same;
                    ASSERT_EQ(q2.scale_of(r, c0), q1.scale_of(r, c0));
                    for (int64_t c = c0; c < c0 + 32; ++c) ASSERT_EQ(q2.code(r, c), q1.code(r, c));
                } else {
                    ++halved;
                    ASSERT_EQ(q2.scale_of(r, c0), q1.scale_of(r, c0) - 1);
                }
            }
        EXPECT_GT(same, 0);
        if (sh.out == 256) { EXPECT_GT(halved, 0); }
        const Fp4 q3 = quant_mxfp4(dequant(q2), sh.out, sh.in);
        EXPECT_EQ(q3.q, q2.q);
        EXPECT_EQ(q3.s, q2.s);
    }
}

// |w/scale - code| is the distance to the nearest E2M1 value (checked against all 8).
void expect_nearest_e2m1(double r, uint8_t code, double slack, int64_t i) {
    const double c = kE2m1Grid[code & 7];
    for (float g : kE2m1Grid) ASSERT_LE(std::fabs(r - c), std::fabs(r - g) + slack) << "element " << i;
}

TEST(QuantMxfp4, ErrorBound) {
    for (Shape sh : {Shape{7, 64}, Shape{256, 384}}) {
        SCOPED_TRACE(testing::Message() << sh.out << "x" << sh.in);
        const std::vector<float> w = random_matrix(sh.out, sh.in, 66);
        const Fp4 q = quant_mxfp4(w, sh.out, sh.in);
        const std::vector<float> d = dequant(q);
        for (int64_t i = 0; i < sh.out * sh.in; ++i) {
            const size_t k = static_cast<size_t>(i);
            const int64_t r = i / sh.in, c = i % sh.in;
            const double scale = std::ldexp(1.0, q.scale_of(r, c) - 127);
            const double x = std::fabs(w[k]) / scale;  // exact
            ASSERT_LE(x, 6.0) << i;
            expect_nearest_e2m1(x, q.code(r, c), 0.0, i);
            const double half_gap = x <= 2 ? 0.25 : x <= 4 ? 0.5 : 1.0;
            ASSERT_LE(std::fabs(w[k] - d[k]), half_gap * scale) << i;
            ASSERT_LE(std::fabs(w[k] - d[k]), 1.0 * scale) << i;
        }
    }
}

TEST(QuantMxfp4, ScaleOfExactAmax) {
    for (int k : {-20, -3, 0, 5}) {
        std::vector<float> w = random_matrix(2, 64, 77, 0.1f);
        for (float& x : w) x = std::ldexp(std::clamp(x, -5.0f, 5.0f), k);
        w[40] = std::ldexp(-6.0f, k);  // row 0, group 1
        const Fp4 q = quant_mxfp4(w, 2, 64);
        EXPECT_EQ(q.scale_of(0, 40), 127 + k);
        EXPECT_EQ(q.code(0, 40), 0xF);
        EXPECT_EQ(dequant(q)[40], w[40]);
    }
}

TEST(QuantMxfp4, ZeroGroup) {
    std::vector<float> w = random_matrix(7, 64, 88);
    for (int c = 32; c < 64; ++c) w[3 * 64 + c] = 0.0f;
    const Fp4 q = quant_mxfp4(w, 7, 64);
    EXPECT_EQ(q.scale_of(3, 32), 0);
    const std::vector<float> d = dequant(q);
    for (int c = 32; c < 64; ++c) {
        EXPECT_EQ(q.code(3, c), 0);
        EXPECT_EQ(bits(d[3 * 64 + c]), 0u);
    }
}

TEST(QuantMxfp4, RejectsBadInput) {
    std::vector<float> w(2 * 48, 1.0f);
    std::vector<uint8_t> q(w.size()), s(w.size());
    EXPECT_THROW(quantize_mxfp4(w.data(), 2, 48, q.data(), s.data()), Error);
    std::vector<float> out(48);
    EXPECT_THROW(decode_mxfp4_row(q.data(), s.data(), 48, out.data()), Error);
    w[3] = kInf;
    EXPECT_THROW(quantize_mxfp4(w.data(), 1, 32, q.data(), s.data()), Error);
}

// ============================================================== quantizers: NVFP4

// With the ModelOpt recipe both the bytes and scale_2 survive a dequantize/quantize round trip
// (for blocks whose e4m3 scale is normal: their largest code is always 6).
TEST(QuantNvfp4, RequantizeIsIdempotent) {
    for (Shape sh : {Shape{7, 64}, Shape{256, 384}}) {
        SCOPED_TRACE(testing::Message() << sh.out << "x" << sh.in);
        std::vector<float> w = random_matrix(sh.out, sh.in, 99);
        for (int c = 16; c < 32; ++c) w[static_cast<size_t>(3 * sh.in + c)] = 0.0f;
        for (int c = 32; c < 64; ++c) w[static_cast<size_t>(5 * sh.in + c)] = 1e-9f;
        const Fp4 q1 = quant_nvfp4(w, sh.out, sh.in);
        const std::vector<float> d1 = dequant(q1);
        const Fp4 q2 = quant_nvfp4(d1, sh.out, sh.in);
        EXPECT_EQ(bits(q2.s2), bits(q1.s2));
        EXPECT_EQ(q2.s, q1.s);
        EXPECT_EQ(q2.q, q1.q);
        expect_bitwise_equal(dequant(q2), d1);
    }
}

TEST(QuantNvfp4, ErrorBound) {
    for (Shape sh : {Shape{7, 64}, Shape{256, 384}}) {
        SCOPED_TRACE(testing::Message() << sh.out << "x" << sh.in);
        const std::vector<float> w = random_matrix(sh.out, sh.in, 111);
        const Fp4 q = quant_nvfp4(w, sh.out, sh.in);
        const std::vector<float> d = dequant(q);
        for (int64_t i = 0; i < sh.out * sh.in; ++i) {
            const size_t k = static_cast<size_t>(i);
            const int64_t r = i / sh.in, c = i % sh.in;
            const double scale = static_cast<double>(e4m3_to_f32(q.scale_of(r, c))) * q.s2;
            ASSERT_GT(scale, 0.0);
            const double x = std::fabs(w[k]) / scale;
            expect_nearest_e2m1(x, q.code(r, c), 1e-5, i);
            ASSERT_LE(std::fabs(w[k] - d[k]), 1.0 * scale) << i;
            const double c_val = e2m1_to_f32(q.code(r, c));
            ASSERT_EQ(d[k], static_cast<float>(c_val) * e4m3_to_f32(q.scale_of(r, c)) * q.s2) << i;
        }
    }
}

TEST(QuantNvfp4, GlobalAndBlockScales) {
    std::vector<float> w = random_matrix(7, 64, 122);
    w[2 * 64 + 50] = -9.5f;  // the global amax
    const Fp4 q = quant_nvfp4(w, 7, 64);
    EXPECT_EQ(bits(q.s2), bits(9.5f / (6.0f * 448.0f)));
    EXPECT_EQ(q.scale_of(2, 50), 0x7E);  // the amax block gets e4m3 448
    EXPECT_EQ(q.code(2, 50), 0xF);       // and the amax element -6
    for (int64_t r = 0; r < 7; ++r)
        for (int64_t g = 0; g < 4; ++g) {
            float amax = 0;
            for (int64_t c = g * 16; c < g * 16 + 16; ++c)
                amax = std::max(amax, std::fabs(w[static_cast<size_t>(r * 64 + c)]));
            EXPECT_EQ(q.scale_of(r, g * 16), f32_to_e4m3(amax / (6.0f * q.s2)));
        }
}

TEST(QuantNvfp4, ZeroAndTinyBlocks) {
    // Mirrors the golden checkpoint (layer 3, expert 0, w1): row 3 columns 16..31 zero, row 5
    // columns 32..63 equal to 1e-9 in a matrix of values ~1: scale byte 0, exact zeros.
    std::vector<float> w = random_matrix(8, 64, 133);
    for (int c = 16; c < 32; ++c) w[3 * 64 + c] = 0.0f;
    for (int c = 32; c < 64; ++c) w[5 * 64 + c] = 1e-9f;
    const Fp4 q = quant_nvfp4(w, 8, 64);
    EXPECT_EQ(q.scale_of(3, 16), 0);
    EXPECT_EQ(q.scale_of(5, 32), 0);
    EXPECT_EQ(q.scale_of(5, 48), 0);
    const std::vector<float> d = dequant(q);
    for (int c = 16; c < 32; ++c) EXPECT_EQ(bits(d[3 * 64 + c]), 0u);
    for (int c = 32; c < 64; ++c) EXPECT_EQ(bits(d[5 * 64 + c]), 0u);
    for (int c = 16; c < 64; ++c) EXPECT_EQ(q.code(c < 32 ? 3 : 5, c), 0);
    // Everything else is nonzero-scaled.
    EXPECT_NE(q.scale_of(3, 0), 0);
    EXPECT_NE(q.scale_of(5, 0), 0);

    // An all-zero tensor: scale_2 = 1, all scales and codes 0.
    const std::vector<float> z(4 * 32, 0.0f);
    const Fp4 qz = quant_nvfp4(z, 4, 32);
    EXPECT_EQ(qz.s2, 1.0f);
    for (uint8_t b : qz.s) EXPECT_EQ(b, 0);
    for (uint8_t b : qz.q) EXPECT_EQ(b, 0);
    for (float x : dequant(qz)) EXPECT_EQ(bits(x), 0u);
}

TEST(QuantNvfp4, RejectsBadInput) {
    std::vector<float> w(2 * 24, 1.0f);
    std::vector<uint8_t> q(w.size()), s(w.size());
    float s2 = 0;
    EXPECT_THROW(quantize_nvfp4(w.data(), 2, 24, q.data(), s.data(), &s2), Error);
    std::vector<float> out(24);
    EXPECT_THROW(decode_nvfp4_row(q.data(), s.data(), 1.0f, 24, out.data()), Error);
    w[5] = kNaN;
    EXPECT_THROW(quantize_nvfp4(w.data(), 1, 16, q.data(), s.data(), &s2), Error);
}

// ============================================================== row decoders on hand-made rows

TEST(DecodeRow, Mxfp4NibbleOrderAndScales) {
    // 64 inputs = 2 groups. Byte 0x21: element 0 = code 1 (0.5), element 1 = code 2 (1.0).
    uint8_t q[32] = {};
    q[0] = 0x21;
    q[1] = 0xF9;   // element 2 = code 9 (-0.5), element 3 = code 15 (-6)
    q[16] = 0x7C;  // element 32 = code 12 (-2), element 33 = code 7 (6)
    const uint8_t s[2] = {127, 130};  // 1, 8
    float out[64];
    decode_mxfp4_row(q, s, 64, out);
    EXPECT_EQ(out[0], 0.5f);
    EXPECT_EQ(out[1], 1.0f);
    EXPECT_EQ(out[2], -0.5f);
    EXPECT_EQ(out[3], -6.0f);
    EXPECT_EQ(out[4], 0.0f);
    EXPECT_EQ(out[32], -16.0f);
    EXPECT_EQ(out[33], 48.0f);
    EXPECT_EQ(out[63], 0.0f);
    // Scale byte 0 is 2^-127, not zero.
    const uint8_t s0[2] = {0, 0};
    decode_mxfp4_row(q, s0, 64, out);
    EXPECT_EQ(out[3], -6.0f * std::ldexp(1.0f, -127));
}

TEST(DecodeRow, Nvfp4NibbleOrderAndScales) {
    // 32 inputs = 2 groups of 16 with e4m3 scales 1.0 (0x38) and 2.0 (0x40), scale_2 = 0.5.
    uint8_t q[16] = {};
    q[0] = 0x5A;   // element 0 = code 10 (-1), element 1 = code 5 (3)
    q[8] = 0x07;   // element 16 = code 7 (6), element 17 = 0
    const uint8_t s[2] = {0x38, 0x40};
    float out[32];
    decode_nvfp4_row(q, s, 0.5f, 32, out);
    EXPECT_EQ(out[0], -0.5f);
    EXPECT_EQ(out[1], 1.5f);
    EXPECT_EQ(out[16], 6.0f);
    EXPECT_EQ(out[17], 0.0f);
    // Order (code · scale) · scale_2: find a scale_2 for which code · (scale · scale_2) would
    // round differently, and check the decoder matches (6 · 448) · scale_2.
    const uint8_t s448[2] = {0x7E, 0x7E};
    volatile float six = 6.0f, f448 = 448.0f;  // keep the compiler from reassociating
    float s2 = 0.1f;
    while (six * f448 * s2 == six * (f448 * s2)) s2 = up(s2);
    decode_nvfp4_row(q, s448, s2, 32, out);
    EXPECT_EQ(bits(out[16]), bits(2688.0f * s2));
    EXPECT_NE(bits(out[16]), bits(6.0f * (448.0f * s2)));
    // A zero scale gives exact zeros whatever the codes and scale_2.
    const uint8_t sz[2] = {0x00, 0x80};
    q[9] = 0x77;
    for (float g : {1.0f, kInf, kNaN}) {
        decode_nvfp4_row(q, sz, g, 32, out);
        for (float x : out) EXPECT_EQ(bits(x), 0u) << g;
    }
}

TEST(DecodeRow, Fp8ScaleIndexing) {
    // [129, 200]: scale [2, 2]. Rows 0..127 use scale row 0, row 128 scale row 1; columns
    // 0..127 scale column 0, 128..199 (a partial block) scale column 1.
    Fp8 p(129, 200);
    std::fill(p.q.begin(), p.q.end(), 0x38);  // 1.0
    p.s = {127, 128, 129, 130};               // 1, 2, 4, 8
    p.q[0] = 0x7E;                            // 448
    p.q[1] = 0xC0;                            // -2
    p.q[128 * 200 + 199] = 0x01;              // 2^-9
    const std::vector<float> d = dequant(p);
    EXPECT_EQ(d[0], 448.0f);
    EXPECT_EQ(d[1], -2.0f);
    EXPECT_EQ(d[127], 1.0f);
    EXPECT_EQ(d[128], 2.0f);
    EXPECT_EQ(d[199], 2.0f);
    EXPECT_EQ(d[127 * 200 + 127], 1.0f);
    EXPECT_EQ(d[127 * 200 + 128], 2.0f);
    EXPECT_EQ(d[128 * 200 + 0], 4.0f);
    EXPECT_EQ(d[128 * 200 + 127], 4.0f);
    EXPECT_EQ(d[128 * 200 + 128], 8.0f);
    EXPECT_EQ(d[128 * 200 + 199], std::ldexp(8.0f, -9));
    // One row decoded directly, with a row length that is not a multiple of 128.
    std::vector<float> row(200);
    decode_fp8_block_row(&p.q[128 * 200], &p.s[2], 200, row.data());
    EXPECT_EQ(row[5], 4.0f);
    EXPECT_EQ(row[150], 8.0f);
    // NaN codes and the NaN scale stay NaN.
    const uint8_t w[2] = {0x7F, 0x38}, s[1] = {0xFF};
    float o[2];
    decode_fp8_block_row(w, s, 2, o);
    EXPECT_TRUE(std::isnan(o[0]));
    EXPECT_TRUE(std::isnan(o[1]));
}

// ============================================================== golden checkpoints

// The golden checkpoints were written by a quantizer run on random f32 weights. Decoding their
// tensors and quantizing again must reproduce the NVFP4 experts byte for byte (the recipe here is
// the one that wrote them), and the fp8 and MXFP4 tensors value for value.
struct StTensor {
    std::string dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> data;
};

// A minimal safetensors reader, so this test does not depend on the loader under test elsewhere.
std::map<std::string, StTensor> read_checkpoint(const std::filesystem::path& dir) {
    std::map<std::string, StTensor> m;
    for (const auto& entry : std::filesystem::directory_iterator(dir)) {
        if (entry.path().extension() != ".safetensors") continue;
        std::ifstream f(entry.path(), std::ios::binary);
        const std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
        uint64_t n = 0;
        if (bytes.size() >= 8) std::memcpy(&n, bytes.data(), sizeof n);
        if (bytes.size() < 8 || n > bytes.size() - 8) throw Error(str("truncated ", entry.path()));
        const auto data = bytes.begin() + 8 + static_cast<int64_t>(n);  // tensor data follows the header
        const auto header = nlohmann::json::parse(bytes.begin() + 8, data);
        for (const auto& [name, v] : header.items()) {
            if (name == "__metadata__") continue;
            StTensor t;
            t.dtype = v["dtype"].get<std::string>();
            t.shape = v["shape"].get<std::vector<int64_t>>();
            const auto begin = v["data_offsets"][0].get<int64_t>(), end = v["data_offsets"][1].get<int64_t>();
            if (begin < 0 || begin > end || end > bytes.end() - data) throw Error("bad offsets of " + name);
            t.data.assign(data + begin, data + end);
            m.emplace(name, std::move(t));
        }
    }
    return m;
}

std::filesystem::path golden_dir(const char* name) {
#ifdef MEGAMOE_SHARED_DIR
    std::filesystem::path shared = MEGAMOE_SHARED_DIR;
#else  // built by hand from the repository root
    std::filesystem::path shared = std::filesystem::path(__FILE__).parent_path().parent_path() / ".." /
                                   "shared";
#endif
    return shared / "golden" / name / "model";
}

std::string base_name(const std::string& weight) { return weight.substr(0, weight.rfind('.')); }

TEST(Golden, Nvfp4ExpertsRequantizeBitExactly) {
    const auto dir = golden_dir("tiny-flash-nvfp4");
    if (!std::filesystem::exists(dir)) MEGAMOE_MISSING_GOLDEN() << dir << " not found";
    const auto m = read_checkpoint(dir);
    int tensors = 0;
    for (const auto& [name, t] : m) {
        if (t.dtype != "U8") continue;
        SCOPED_TRACE(name);
        const std::string base = base_name(name);
        Fp4 p(t.shape[0], t.shape[1] * 2, kNvfp4Group);
        p.q = t.data;
        p.s = m.at(base + ".weight_scale").data;
        std::memcpy(&p.s2, m.at(base + ".weight_scale_2").data.data(), sizeof(float));
        ASSERT_EQ(p.s.size(), static_cast<size_t>(p.out * p.in / 16));
        const Fp4 q = quant_nvfp4(dequant(p), p.out, p.in);
        ASSERT_EQ(bits(q.s2), bits(p.s2));
        ASSERT_EQ(q.s, p.s);
        ASSERT_EQ(q.q, p.q);
        ++tensors;
    }
    EXPECT_GT(tensors, 0);
    // layers.3.ffn.experts.0.w1: row 3 columns 16..31 are zero and row 5 columns 32..63 are
    // 1e-9, so those blocks have scale byte 0 and decode to exactly 0.
    const std::string w1 = "layers.3.ffn.experts.0.w1";
    Fp4 p(m.at(w1 + ".weight").shape[0], m.at(w1 + ".weight").shape[1] * 2, kNvfp4Group);
    p.q = m.at(w1 + ".weight").data;
    p.s = m.at(w1 + ".weight_scale").data;
    std::memcpy(&p.s2, m.at(w1 + ".weight_scale_2").data.data(), sizeof(float));
    EXPECT_EQ(p.scale_of(3, 16), 0);
    EXPECT_EQ(p.scale_of(5, 32), 0);
    EXPECT_EQ(p.scale_of(5, 48), 0);
    const std::vector<float> d = dequant(p);
    for (int64_t c = 16; c < 32; ++c) EXPECT_EQ(bits(d[static_cast<size_t>(3 * p.in + c)]), 0u);
    for (int64_t c = 32; c < 64; ++c) EXPECT_EQ(bits(d[static_cast<size_t>(5 * p.in + c)]), 0u);
}

TEST(Golden, Fp8AndMxfp4RequantizeToTheSameValues) {
    for (const char* name : {"tiny-flash-mxfp4", "tiny-flash-nvfp4"}) {
        const auto dir = golden_dir(name);
        if (!std::filesystem::exists(dir)) MEGAMOE_MISSING_GOLDEN() << dir << " not found";
        const auto m = read_checkpoint(dir);
        int fp8 = 0, mxfp4 = 0;
        for (const auto& [tname, t] : m) {
            SCOPED_TRACE(tname);
            const std::string base = base_name(tname);
            if (t.dtype == "F8_E4M3" && tname.ends_with(".weight")) {
                Fp8 p(t.shape[0], t.shape[1]);
                p.q = t.data;
                ASSERT_EQ(m.at(base + ".scale").data.size(), p.s.size());
                p.s = m.at(base + ".scale").data;
                const std::vector<float> d = dequant(p);
                expect_bitwise_equal(dequant(quant_fp8(d, p.out, p.in)), d);
                ++fp8;
            } else if (t.dtype == "I8") {
                Fp4 p(t.shape[0], t.shape[1] * 2, kMxfp4Group);
                p.q = t.data;
                ASSERT_EQ(m.at(base + ".scale").data.size(), p.s.size());
                p.s = m.at(base + ".scale").data;
                const std::vector<float> d = dequant(p);
                expect_bitwise_equal(dequant(quant_mxfp4(d, p.out, p.in)), d);
                // Written with s = 2^ceil(log2(amax/6)): every group's largest |code| is >= 3.
                for (int64_t r = 0; r < p.out; ++r)
                    for (int64_t c0 = 0; c0 < p.in; c0 += 32) {
                        int max_code = 0;
                        for (int64_t c = c0; c < c0 + 32; ++c)
                            max_code = std::max(max_code, p.code(r, c) & 7);
                        ASSERT_GE(max_code, 5) << "row " << r << " column " << c0;
                    }
                ++mxfp4;
            }
        }
        EXPECT_GT(fp8, 0) << name;
        EXPECT_GT(mxfp4, 0) << name;  // the MTP experts stay MXFP4 in the NVFP4 checkpoint
    }
}

}  // namespace
}  // namespace megamoe
