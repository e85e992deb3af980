// numerics_test.cpp — the official inference code's activation roundings (deepseek-v4.md §2.3-2.5),
// pinned bit for bit with hand-computed values (ties, zero blocks, subnormals, saturation, block
// boundaries), and the whole model in official numerics against ../shared/golden/official-tiny-mxfp4
// (what DeepSeek's code computes in its own numerics), compared with statistics.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdio>
#include <memory>
#include <vector>

#include "io/safetensors.h"
#include "ref/generate.h"
#include "ref/model.h"
#include "ref/ops.h"
#include "test_util.h"

namespace megamoe {
namespace {

using V = std::vector<float>;
const float kTwoM9 = std::ldexp(1.0f, -9);   // the e4m3 subnormal step

// Bit-for-bit equality (so -0.0 != +0.0 and NaN is caught).
void expect_bits(const V& got, const V& want) {
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i)
        EXPECT_EQ(std::bit_cast<uint32_t>(got[i]), std::bit_cast<uint32_t>(want[i]))
            << "element " << i << ": got " << got[i] << ", want " << want[i];
}

TEST(Numerics, ParseAndName) {
    EXPECT_EQ(parse_numerics("exact"), Numerics::exact);
    EXPECT_EQ(parse_numerics("official"), Numerics::official);
    EXPECT_STREQ(numerics_name(Numerics::official), "official");
    test::expect_error([] { parse_numerics("bf16"); }, {"--numerics", "exact or official", "'bf16'"});
}

TEST(Numerics, Bf16RoundsToNearestEven) {
    // bf16 keeps 7 mantissa bits: in [1, 2) the step is 2^-7.
    EXPECT_EQ(ops::bf16_round(1.0f + std::ldexp(1.0f, -8)), 1.0f);                         // tie -> even (1.0)
    EXPECT_EQ(ops::bf16_round(1.0f + 3 * std::ldexp(1.0f, -8)), 1.0f + std::ldexp(1.0f, -6));   // tie -> even (up)
    EXPECT_EQ(ops::bf16_round(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)), 1.0f + std::ldexp(1.0f, -7));
    EXPECT_EQ(ops::bf16_round(std::ldexp(1.0f, -130)), std::ldexp(1.0f, -130));   // f32 subnormal, kept
    V x{1.0f + std::ldexp(1.0f, -8), 3.0f};
    ops::round_bf16(Numerics::exact, x.data(), 2);   // exact numerics: untouched
    expect_bits(x, {1.0f + std::ldexp(1.0f, -8), 3.0f});
}

TEST(Numerics, Fp8BlockScaleIsPowerOfTwoOfAmaxOver448) {
    // amax 448: s = 1. e4m3 in [1, 2) has step 1/8: 1.0625 and 1.1875 are ties (-> even mantissa).
    // [256, 448] has step 32: 300 -> 288. Subnormals (below 2^-6) are multiples of 2^-9:
    // 1.5 units -> 2 (even), 0.5 units -> 0 (even), 1.25 units -> 1.
    V x{448.0f, 1.0625f, 1.1875f, -300.0f, 3 * kTwoM9 / 2, kTwoM9 / 2, 5 * kTwoM9 / 4, -0.0f};
    ops::fp8_block_qdq(x.data(), static_cast<int64_t>(x.size()), 128);
    expect_bits(x, {448.0f, 1.0f, 1.25f, -288.0f, 2 * kTwoM9, 0.0f, kTwoM9, -0.0f});
}

TEST(Numerics, Fp8BlockSaturatesAndScalesUp) {
    // amax 449 > 448: s = 2^ceil(log2(449/448)) = 2; 449/2 = 224.5 -> 224 (step 16 in [128, 256)) -> 448.
    V x{449.0f, 1.0f, -449.0f};
    ops::fp8_block_qdq(x.data(), 3, 128);
    expect_bits(x, {448.0f, 1.0f, -448.0f});
}

TEST(Numerics, Fp8ZeroAndTinyBlocks) {
    // A zero block: amax clamps to 1e-4, every value stays 0 (signs kept).
    V z{0.0f, -0.0f, 0.0f};
    ops::fp8_block_qdq(z.data(), 3, 64);
    expect_bits(z, {0.0f, -0.0f, 0.0f});
    // amax 1e-5 < 1e-4: s = 2^ceil(log2(1e-4/448)) = 2^-22; 1e-5 · 2^22 = 41.94 -> 40 (step 4) -> 40·2^-22.
    V t{1e-5f, -2.5e-6f};
    ops::fp8_block_qdq(t.data(), 2, 64);
    // -2.5e-6 · 2^22 = -10.49 -> -10 (step 1 in [8, 16)) -> -10·2^-22
    expect_bits(t, {40 * std::ldexp(1.0f, -22), -10 * std::ldexp(1.0f, -22)});
}

TEST(Numerics, Fp8BlocksAreIndependent) {
    // 130 values in 128-blocks: the second block (2 values) has its own scale. Block 0: amax 448,
    // s = 1. Block 1: amax 1e-3, s = 2^ceil(log2(1e-3/448)) = 2^-18; 1e-3·2^18 = 262.1 -> 256 -> 2^-10.
    V x(130, 0.0f);
    x[0] = 448.0f;
    x[1] = 9e-4f;    // in block 0 (s = 1): 9e-4 is below half the smallest subnormal step (2^-10): 0
    x[128] = 1e-3f;
    ops::fp8_block_qdq(x.data(), 130, 128);
    EXPECT_EQ(x[0], 448.0f);
    EXPECT_EQ(x[1], 0.0f);
    EXPECT_EQ(x[128], std::ldexp(1.0f, -10));
    EXPECT_EQ(x[129], 0.0f);
}

TEST(Numerics, GemmInputRoundsEachRowIn128Blocks) {
    V x(2 * 256, 0.5f);
    x[0] = 448.0f;            // row 0, block 0: s = 1, 0.5 exact
    x[128] = 1.03125f;        // row 0, block 1: amax 1.03125, s = 2^ceil(log2(1.03125/448)) = 2^-8
    x[256 + 5] = -7.0f;       // row 1, block 0: s = 2^-6; 0.5·64 = 32, 7·64 = 448
    V want = x;
    // 1.03125·256 = 264 -> 256 (step 32 in [256, 512)): 1.0; 0.5·256 = 128: exact.
    want[128] = 1.0f;
    ops::round_gemm_input(Numerics::official, x.data(), 2, 256);
    expect_bits(x, want);
    V e{1.03125f, 0.1f};
    ops::round_gemm_input(Numerics::exact, e.data(), 1, 2);   // exact numerics: untouched
    expect_bits(e, {1.03125f, 0.1f});
}

TEST(Numerics, KvLatentRoundsOnlyTheNopeDims) {
    // hd 80, rope 16: dims [0, 64) are one 64-block; dims [64, 80) stay as they are (not even bf16).
    V kv(2 * 80, 0.0f);
    for (int t = 0; t < 2; ++t) {
        kv[t * 80 + 0] = 3.0f;           // amax 3: s = 2^ceil(log2(3/448)) = 2^-7; 3·128 = 384: exact
        kv[t * 80 + 1] = 1.0625f;        // 136 is a tie between 128 and 144 -> 128: 1.0
        kv[t * 80 + 64] = 1.0001f;       // a rope dim
    }
    ops::round_kv_latent(Numerics::official, kv.data(), 2, 80, 16);
    for (int t = 0; t < 2; ++t) {
        EXPECT_EQ(kv[t * 80 + 0], 3.0f);
        EXPECT_EQ(kv[t * 80 + 1], 1.0f);
        EXPECT_EQ(kv[t * 80 + 64], 1.0001f);
    }
}

TEST(Numerics, Fp4BlockTiesSaturationZeroAndSubnormals) {
    // amax 6: s = 1. E2M1 grid 0, .5, 1, 1.5, 2, 3, 4, 6; ties go to the even code:
    // .25 -> 0, .75 -> 1, 1.25 -> 1, 2.5 -> 2, 3.5 -> 4, 5 -> 4.
    V x{6.0f, 0.25f, 0.75f, 1.25f, 2.5f, 3.5f, -5.0f, 0.3f};
    ops::fp4_block_qdq(x.data(), 8, 32);
    expect_bits(x, {6.0f, 0.0f, 1.0f, 1.0f, 2.0f, 4.0f, -4.0f, 0.5f});
    // amax 7: s = 2^ceil(log2(7/6)) = 2; 7/2 = 3.5 -> 4 -> 8 (the block's max rounds up); 1/2 = .5 -> 1.
    V y{7.0f, 1.0f};
    ops::fp4_block_qdq(y.data(), 2, 32);
    expect_bits(y, {8.0f, 1.0f});
    // A zero block: amax clamps to 6·2^-126, values stay 0.
    V z{0.0f, -0.0f};
    ops::fp4_block_qdq(z.data(), 2, 32);
    expect_bits(z, {0.0f, -0.0f});
    // f32 subnormals: amax 2^-127 clamps to 6·2^-126, s = 2^-126; 2^-127/s = .5 -> .5: 2^-127 survives,
    // 2^-129/s = .125 -> 0.
    V s{std::ldexp(1.0f, -127), std::ldexp(1.0f, -129)};
    ops::fp4_block_qdq(s.data(), 2, 32);
    expect_bits(s, {std::ldexp(1.0f, -127), 0.0f});
}

TEST(Numerics, Fp4BlocksOf32AreIndependent) {
    V x(64, 0.0f);
    x[0] = 6.0f, x[1] = 0.5f;      // block 0: s = 1
    x[32] = 0.75f, x[33] = 0.5f;   // block 1: s = 2^ceil(log2(.75/6)) = 2^-3: 6·2^-3, 4·2^-3
    ops::fp4_block_qdq(x.data(), 64, 32);
    EXPECT_EQ(x[0], 6.0f);
    EXPECT_EQ(x[1], 0.5f);
    EXPECT_EQ(x[32], 0.75f);
    EXPECT_EQ(x[33], 0.5f);
}

TEST(Numerics, HadamardIsSylvesterOrderedAndOrthonormal) {
    // H4 rows (Sylvester): ++++, +-+-, ++--, +--+; scaled by 1/2.
    V x{1, 2, 3, 4};
    ops::hadamard(x.data(), 4);
    expect_bits(x, {5.0f, -1.0f, -2.0f, 0.0f});
    // Applied twice it is the identity (to rounding), for the indexer's 128 points.
    V y(128), y0;
    for (int i = 0; i < 128; ++i) y[static_cast<size_t>(i)] = std::sin(0.37f * static_cast<float>(i)) * 3.0f;
    y0 = y;
    ops::hadamard(y.data(), 128);
    ops::hadamard(y.data(), 128);
    EXPECT_LE(test::max_abs_diff(y.data(), y0.data(), 128), 1e-5);
    test::expect_error([&] { ops::hadamard(y.data(), 96); }, {"power of two"});
}

TEST(Numerics, IndexerQkIsHadamardThenBf16ThenFp4) {
    // 8·e0 + 8·e1 over 64 points: H[i][0] + H[i][1] = 1 + (-1)^i, times 8/8: 2, 0, 2, 0, ...
    // FP4: amax 2, s = 2^ceil(log2(2/6)) = 1/2: 2 -> 4 -> 2. A third value 0.3 in row 1 after the
    // rotation is tested through a pre-rotated input: H(H(v)) = v.
    V x(64, 0.0f);
    x[0] = 8.0f, x[1] = 8.0f;
    ops::round_indexer_qk(Numerics::official, x.data(), 1, 64);
    for (int i = 0; i < 64; ++i) EXPECT_EQ(x[static_cast<size_t>(i)], i % 2 == 0 ? 2.0f : 0.0f) << i;
    // Pre-rotate v = (6, 1.25, 0, ...) so that the op's rotation gives v back (to bf16), then FP4
    // (s = 1): 6 -> 6, 1.25 -> 1 (tie to even).
    V v(64, 0.0f);
    v[0] = 6.0f, v[1] = 1.25f;
    ops::hadamard(v.data(), 64);
    ops::round_indexer_qk(Numerics::official, v.data(), 1, 64);
    EXPECT_EQ(v[0], 6.0f);
    EXPECT_EQ(v[1], 1.0f);
    for (int i = 2; i < 64; ++i) EXPECT_EQ(v[static_cast<size_t>(i)], 0.0f) << i;
    V e{8.0f, 8.0f, 0.0f, 0.0f};
    ops::round_indexer_qk(Numerics::exact, e.data(), 1, 4);   // exact numerics: untouched
    expect_bits(e, {8.0f, 8.0f, 0.0f, 0.0f});
}

TEST(Numerics, HeadNormInBf16) {
    // x = (3, 4): squares 9, 16; mean 12.5; + 1e-6 -> 12.5 in bf16; rsqrt = 0.28284 -> bf16 145/512;
    // 3·145/512 = 435/512 is a bf16 tie (step 1/256) -> 218/256; 4·145/512 = 145/128 exact.
    V x{3.0f, 4.0f};
    ops::head_rms_norm_bf16(x.data(), 1, 2, 1e-6f);
    expect_bits(x, {218.0f / 256.0f, 145.0f / 128.0f});
}

TEST(Numerics, IndexerScoresInBf16) {
    // 2 heads of 2 dims, q = (1, 0 | 0, 1), w = (0.5, 7). Row (2, -3): head 0 gives 2·0.5, head 1 ReLU
    // -> 0: 1. Row (1 + 2^-8, 1): head 0's dot rounds to 1.0 in bf16 (a tie) -> 0.5; head 1: 7 -> 7.5.
    const V q{1, 0, 0, 1}, w{0.5f, 7.0f}, K{2.0f, -3.0f, 1.0f + std::ldexp(1.0f, -8), 1.0f};
    V score(2);
    ops::indexer_scores_bf16(q.data(), w.data(), 2, 2, K.data(), 2, score.data());
    expect_bits(score, {1.0f, 7.5f});
}

// ---- the whole model in official numerics against DeepSeek's own code (official-tiny-mxfp4)

struct Stats {
    double cos = 0, top1 = 0, max_abs = 0;
};
// cosine over all values, the share of rows with the same argmax, the largest difference.
Stats compare(const float* a, const float* b, int64_t rows, int64_t width) {
    double ab = 0, aa = 0, bb = 0;
    int64_t same = 0;
    for (int64_t r = 0; r < rows; ++r) {
        const float* x = a + r * width;
        const float* y = b + r * width;
        for (int64_t i = 0; i < width; ++i) ab += double(x[i]) * y[i], aa += double(x[i]) * x[i], bb += double(y[i]) * y[i];
        same += argmax(x, width) == argmax(y, width);
    }
    Stats s;
    s.cos = ab / std::sqrt(aa * bb);
    s.top1 = static_cast<double>(same) / static_cast<double>(rows);
    s.max_abs = test::max_abs_diff(a, b, static_cast<size_t>(rows * width));
    return s;
}
void print(const char* what, const Stats& s) {
    std::printf("[ official ] %-44s cos %.4f  top-1 %.3f  max|d| %.3f\n", what, s.cos, s.top1, s.max_abs);
}

// The bar. DeepSeek's code agrees with *itself* across schedules only to cos 0.9906, top-1 0.789
// (golden.json: its decode after a 100-token prefill vs its full pass, same kernels). A second
// faithful implementation cannot do better than that noise: measured on this code, scaling the
// GEMM outputs by 1 ± 2e-7 (about one f32 ulp, what another accumulation order gives) before their
// bf16 rounding moves the official-numerics logits by 0.13-0.19 at positions 0-4 (no history, no
// indexer, the same experts), as much as the whole official-vs-exact difference there (0.20-0.27):
// the bf16 and FP8 roundings turn a one-ulp difference into a rounding step, and the near ties of
// this model carry it on. The golden has no per-layer tensors, so no layer-by-layer localization
// is possible; positions 0-4 (no history) show the distance is of that noise's size. So the test
// asks for agreement a little below the official code's own (cos >= 0.98, top-1 >= 0.65) on the
// full pass, the decode schedule and the MTP block; measured: 0.9865 / 0.711, 0.9861 / 0.746,
// 0.9910 / 0.804. It also checks the roundings are applied (official differs from exact) and that
// our official numerics, unlike the official code, stay bit-identical across schedules.
constexpr double kMinCos = 0.98, kMinTop1 = 0.65;

TEST(OfficialNumerics, AgreesWithTheOfficialCode) {
    const std::string dir = test::golden_dir("official-tiny-mxfp4");
    if (!test::have_golden("official-tiny-mxfp4")) MEGAMOE_MISSING_GOLDEN() << "no golden case official-tiny-mxfp4";
    auto m = Model::load(dir + "/model");
    SafetensorsFile f(dir + "/golden.safetensors");
    Tensor ids_t = f.view(*f.find("input_ids"));
    std::vector<int32_t> ids;
    for (int64_t i = 0; i < ids_t.numel(); ++i) ids.push_back(static_cast<int32_t>(ids_t.as<int64_t>()[i]));
    const int64_t T = static_cast<int64_t>(ids.size()), Vn = m->cfg.vocab_size;
    const float* gold_full = f.view(*f.find("logits")).as<float>();
    const float* gold_decode = f.view(*f.find("logits_decode")).as<float>();
    const float* gold_mtp = f.view(*f.find("mtp_logits")).as<float>();

    const Stats self = compare(gold_decode, gold_full, T, Vn);   // the official code against itself
    print("official decode vs official full (golden)", self);

    m->numerics = Numerics::exact;
    const MtpLogits exact = sequence_logits_mtp(*m, ids, Schedule{});
    m->numerics = Numerics::official;
    const MtpLogits full = sequence_logits_mtp(*m, ids, Schedule{});
    const MtpLogits decode = sequence_logits_mtp(*m, ids, Schedule{100, 0});   // golden.json: decode_split

    const Stats s_exact = compare(exact.logits.data(), gold_full, T, Vn);
    const Stats s_full = compare(full.logits.data(), gold_full, T, Vn);
    const Stats s_decode = compare(decode.logits.data(), gold_decode, T, Vn);
    const Stats s_mtp = compare(full.mtp_logits.data(), gold_mtp, T - 1, Vn);
    const Stats s_mtp_exact = compare(exact.mtp_logits.data(), gold_mtp, T - 1, Vn);
    print("ours official full vs official full", s_full);
    print("ours official decode@100 vs official decode", s_decode);
    print("ours official MTP vs official MTP", s_mtp);
    print("ours exact full vs official full", s_exact);
    print("ours exact MTP vs official MTP", s_mtp_exact);

    for (const Stats* s : {&s_full, &s_decode, &s_mtp}) {
        EXPECT_GE(s->cos, kMinCos);
        EXPECT_GE(s->top1, kMinTop1);
    }
    EXPECT_GT(test::max_abs_diff(full.logits.data(), exact.logits.data(), full.logits.size()), 0.05);
    // Our official numerics are schedule independent (every rounding is per token or per row).
    EXPECT_EQ(test::max_abs_diff(decode.logits.data(), full.logits.data(), full.logits.size()), 0.0);
    EXPECT_EQ(test::max_abs_diff(decode.mtp_logits.data(), full.mtp_logits.data(), full.mtp_logits.size()), 0.0);
}

}  // namespace
}  // namespace megamoe
