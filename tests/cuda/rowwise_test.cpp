// rowwise_test.cpp — the GPU row ops (src/cuda/rowwise.h) against their CPU twins.
//
// Every test runs the twin (ops::embed, ops::rms_norm, ops::rope, ops::expert_ffn's SwiGLU, plain
// copies, megamoe::f32_to_bf16) on the same values the GPU reads: bf16 inputs are generated as bf16
// and widened for the CPU; f32 inputs are used as they are. Shapes: DeepSeek-V4-Flash (D = 4096,
// H = 64, hd = 512, rope 64, q_lora 1024, I = 2048, vocab rows 1000 × 4096), V4-Pro (D = 7168,
// H = 128, I = 3072), the tiny test model (D = 256, hd = 64, rope 16) and odd ones (T = 1, 3, 17,
// 129; widths that are not a multiple of 8 or 4, which take the scalar paths).
//
// Tolerances, from the formats:
//  * embed, gather, f32→bf16: pure data movement / the same rounding function: bit for bit.
//  * bf16 outputs of f32 math (rms_norm, head_norm_rope, swiglu): the GPU computes the twin's f32
//    expression with the same operations in the same order except for (a) the RMS sum of squares,
//    f32 with a fixed tree instead of the twin's f64 (relative error ≤ ~(D/256 + 13)·2^-24 on the
//    sum, half that on rsqrt: ≤ 2^-18 for D ≤ 8192) and (b) cosf / sinf / expf, within 2 ulp of
//    glibc's. So the GPU's f32 value is c·(1 + δ) with |δ| ≤ 2^-17, and RNE to bf16 adds at most
//    2^-9 relative: |bf16 − c| ≤ 2^-9·|c| + |δ c| < 2^-8·|c|. Rotations cancel (a·cos − b·sin can
//    be much smaller than |a| + |b|), so head_norm_rope adds an absolute 2^-16·max|row| (a few
//    f32 ulps of the inputs); rms_norm and swiglu have no cancellation and get no absolute term.
//  * head_norm_rope in official numerics (the bf16 roundings of ref attention_inputs): bit for bit
//    before the rope dims; the rope dims bit for bit but for a bounded count of cosf / sinf-induced
//    bf16 rounding flips (see check_head_official).
#include <gtest/gtest.h>

#include "cuda/rowwise.h"

#ifdef MEGAMOE_HAVE_CUDA

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "core/common.h"
#include "cuda/buffer.h"
#include "cuda/linear.h"
#include "io/formats.h"
#include "ref/ops.h"
#include "rowwise_test_util.h"
#include "test_util.h"

namespace megamoe {
namespace {

using cuda::DeviceArray;
using test::rw::bf16_exact;
using test::rw::expect_bf16_close;
using test::rw::expect_bits_equal;
using test::rw::fake_ptr;
using test::rw::from_bf16;
using test::rw::normal_rows;
using test::rw::to_bf16;

constexpr double kBf16Rel = 1.0 / 256;        // 2^-8, see the header comment
constexpr double kRopeAbs = 1.0 / 65536;      // 2^-16 of the row's largest value

std::string shape_name(const char* op, int64_t a, int64_t b, int64_t c = -1) {
    return str(op, " [", a, ", ", b, c >= 0 ? str(", ", c) : std::string(), "]");
}

// ---------------------------------------------------------------------------- embed

void check_embed(int64_t V, int64_t D, int64_t T, int64_t hc, uint32_t seed) {
    SCOPED_TRACE(shape_name("embed", V, D, T));
    const std::vector<uint16_t> table = to_bf16(normal_rows(V, D, seed, 1.0f, -6.0f, 6.0f));
    std::mt19937 rng(seed + 1);
    std::vector<int32_t> ids(static_cast<size_t>(T));
    for (auto& i : ids) i = static_cast<int32_t>(rng() % V);
    if (T > 1) ids[1] = static_cast<int32_t>(V - 1);

    std::vector<uint16_t> tcopy = table;
    const Tensor tt(tcopy.data(), DType::bf16, {V, D});
    std::vector<float> ref1(static_cast<size_t>(T * D));
    ops::embed(tt, ids.data(), T, ref1.data());
    std::vector<float> ref(static_cast<size_t>(T * hc * D));
    for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < hc; ++j)
            std::copy(ref1.begin() + t * D, ref1.begin() + (t + 1) * D, ref.begin() + (t * hc + j) * D);

    DeviceArray<uint16_t> d_table(table);
    DeviceArray<int32_t> d_ids(ids);
    DeviceArray<float> d_X(ref.size());
    d_X.fill(0xFF);
    cuda::embed_streams(d_table.data(), d_ids.data(), T, D, hc, d_X.data(), nullptr);
    expect_bits_equal(d_X.download(), ref, "embed_streams");
}

TEST(CudaRowwise, EmbedStreamsMatchesOpsEmbed) {
    RW_SKIP_WITHOUT_GPU();
    check_embed(1000, 4096, 1, 4, 1);     // V4-Flash vocab rows
    check_embed(1000, 4096, 129, 4, 2);
    check_embed(1000, 7168, 3, 4, 3);     // V4-Pro
    check_embed(64, 256, 17, 4, 4);       // tiny model
    check_embed(50, 4100, 3, 4, 5);       // D % 8 != 0: scalar path
    check_embed(50, 257, 17, 2, 6);       // odd D, hc = 2
}

// ---------------------------------------------------------------------------- rms norm

void check_rms_norm(int64_t rows, int64_t D, bool weighted, uint32_t seed, float eps = 1e-6f) {
    SCOPED_TRACE(shape_name("rms_norm", rows, D));
    const std::vector<float> x = normal_rows(rows, D, seed, 1.0f, -8.0f, 8.0f);   // f32 in: any values
    std::vector<uint16_t> w = to_bf16(normal_rows(1, D, seed + 1, 1.0f));
    const Tensor wt(w.data(), DType::bf16, {D});
    std::vector<float> ref(x.size());
    ops::rms_norm(x.data(), rows, D, weighted ? &wt : nullptr, eps, ref.data());

    DeviceArray<float> d_x(x);
    DeviceArray<uint16_t> d_w(w), d_y(x.size());
    cuda::rms_norm_rows(d_x.data(), rows, D, weighted ? d_w.data() : nullptr, eps, d_y.data(), nullptr);
    expect_bf16_close(d_y.download(), ref, D, kBf16Rel, 0.0, "rms_norm_rows");
}

TEST(CudaRowwise, RmsNormRowsMatchesOpsRmsNorm) {
    RW_SKIP_WITHOUT_GPU();
    check_rms_norm(1, 4096, true, 10);     // attn_norm / ffn_norm, decode
    check_rms_norm(129, 4096, true, 11);
    check_rms_norm(3, 7168, true, 12);     // V4-Pro
    check_rms_norm(17, 1024, true, 13);    // q_norm (q_lora 1024)
    check_rms_norm(1, 1536, true, 14);     // V4-Pro q_lora
    check_rms_norm(5, 256, false, 15);     // tiny, unweighted
    check_rms_norm(3, 257, true, 16);      // scalar path
    check_rms_norm(2, 4098, true, 17);     // D % 4 != 0
    check_rms_norm(4, 1, true, 18);        // one element per row
    check_rms_norm(3, 64, true, 19, 1.0f); // eps that matters
}

// Official numerics: x rounded to bf16 first (twin: round_bf16, then ops::rms_norm; the same
// tolerance), and yq is ops::round_gemm_input of the kernel's own y, bit for bit (fused for
// D % 128 == 0 on the vector path, else copied and rounded by fp8_block_round; in place when
// yq == y).
void check_rms_norm_official(int64_t rows, int64_t D, uint32_t seed, bool in_place = false) {
    SCOPED_TRACE(shape_name("rms_norm official", rows, D) + (in_place ? " in place" : ""));
    const float eps = 1e-6f;
    const std::vector<float> x = normal_rows(rows, D, seed, 1.0f, -8.0f, 8.0f);
    std::vector<uint16_t> w = to_bf16(normal_rows(1, D, seed + 1, 1.0f));
    const Tensor wt(w.data(), DType::bf16, {D});
    std::vector<float> xr = x, ref(x.size());
    ops::round_bf16(Numerics::official, xr.data(), rows * D);
    ops::rms_norm(xr.data(), rows, D, &wt, eps, ref.data());
    DeviceArray<float> d_x(x);
    DeviceArray<uint16_t> d_w(w), d_y(x.size()), d_q(x.size());
    d_q.fill(0xFF);
    cuda::rms_norm_rows(d_x.data(), rows, D, d_w.data(), eps, d_y.data(), nullptr, Numerics::official,
                        in_place ? d_y.data() : d_q.data());
    if (in_place) {   // only the rounded copy remains: compare it with the rounding of an exact-output run
        DeviceArray<uint16_t> d_y2(x.size());
        cuda::rms_norm_rows(d_x.data(), rows, D, d_w.data(), eps, d_y2.data(), nullptr, Numerics::official);
        std::vector<float> q = from_bf16(d_y2.download());
        ops::round_gemm_input(Numerics::official, q.data(), rows, D);
        expect_bits_equal(d_y.download(), to_bf16(q), "yq == y: round_gemm_input(y)");
        return;
    }
    const std::vector<uint16_t> y = d_y.download();
    expect_bf16_close(y, ref, D, kBf16Rel, 0.0, "rms_norm_rows official");
    std::vector<float> q = from_bf16(y);
    ops::round_gemm_input(Numerics::official, q.data(), rows, D);
    expect_bits_equal(d_q.download(), to_bf16(q), "yq: round_gemm_input(y)");
    if (D % 128 == 0) {   // with codes (linear_fp8_act's input): yq unchanged, codes · scales == yq
        DeviceArray<uint16_t> d_q2(x.size());
        DeviceArray<uint8_t> d_c(x.size());
        DeviceArray<float> d_s(static_cast<size_t>(rows * D / 128));
        cuda::rms_norm_rows(d_x.data(), rows, D, d_w.data(), eps, d_y.data(), nullptr, Numerics::official, d_q2.data(),
                            d_c.data(), d_s.data());
        expect_bits_equal(d_q2.download(), to_bf16(q), "yq with codes");
        expect_bits_equal(test::rw::act_fp8_values(d_c.download(), d_s.download(), rows, D), to_bf16(q),
                          "codes · scales == yq");
    }
}

TEST(CudaRowwise, RmsNormRowsOfficialNumerics) {
    RW_SKIP_WITHOUT_GPU();
    check_rms_norm_official(1, 1024, 80);      // q_norm of V4-Flash, decode: fused
    check_rms_norm_official(17, 1536, 81);     // V4-Pro q_lora
    check_rms_norm_official(4, 4096, 82, true);   // the MTP block's hnorm of 4 streams, rounded in place
    check_rms_norm_official(3, 300, 83);       // D % 128 != 0: rounded after the kernel
    check_rms_norm_official(2, 257, 84);       // scalar path
    check_rms_norm_official(2, 257, 85, true);
}

// ---------------------------------------------------------------------------- head norm + rope

struct RopeCase {
    int64_t T, heads, hd, rope;
    bool normalize, weighted, yarn;
    int64_t max_pos;
};

void check_head(const RopeCase& c, uint32_t seed) {
    SCOPED_TRACE(str("head_norm_rope T=", c.T, " heads=", c.heads, " hd=", c.hd, " rope=", c.rope,
                     " normalize=", c.normalize, " weighted=", c.weighted));
    const float eps = 1e-6f;
    const std::vector<float> x = normal_rows(c.T * c.heads, c.hd, seed, 1.0f, -4.0f, 4.0f);
    std::vector<uint16_t> w = to_bf16(normal_rows(1, c.hd, seed + 1, 1.0f));
    std::mt19937 rng(seed + 2);
    std::vector<int32_t> pos(static_cast<size_t>(c.T));
    for (auto& p : pos) p = static_cast<int32_t>(rng() % static_cast<uint32_t>(c.max_pos));
    pos[0] = 0;
    if (c.T > 2) pos[2] = static_cast<int32_t>(c.max_pos - 1);
    std::vector<int64_t> pos64(pos.begin(), pos.end());
    YarnConfig yarn;
    yarn.factor = 16;
    yarn.original_max_position_embeddings = 65536;
    const ops::RopeTable table = c.yarn ? ops::make_rope_table(160000, c.rope, &yarn) : ops::make_rope_table(10000, c.rope, nullptr);

    // Twin: ops::rms_norm over each head (T·heads rows of hd), then ops::rope.
    std::vector<float> ref = x;
    const Tensor wt(w.data(), DType::bf16, {c.hd});
    if (c.normalize) ops::rms_norm(x.data(), c.T * c.heads, c.hd, c.weighted ? &wt : nullptr, eps, ref.data());
    if (c.rope > 0) ops::rope(ref.data(), c.T, c.heads, c.hd, pos64.data(), table, false);

    DeviceArray<float> d_x(x), d_freq(table.inv_freq.empty() ? std::vector<float>{0.0f} : table.inv_freq);
    DeviceArray<uint16_t> d_w(w), d_y(x.size());
    DeviceArray<int32_t> d_pos(pos);
    cuda::RopeView rv;
    rv.inv_freq = d_freq.data();
    rv.rope_dim = static_cast<int32_t>(c.rope);
    cuda::head_norm_rope(d_x.data(), c.T, c.heads, c.hd, c.normalize, c.weighted ? d_w.data() : nullptr, eps,
                         d_pos.data(), rv, d_y.data(), nullptr);
    expect_bf16_close(d_y.download(), ref, c.hd, kBf16Rel, kRopeAbs, "head_norm_rope");
}

TEST(CudaRowwise, HeadNormRopeMatchesOpsRmsNormThenRope) {
    RW_SKIP_WITHOUT_GPU();
    const int64_t kMillion = 1 << 20;
    //        T  heads  hd  rope  norm   weight yarn   max_pos
    check_head({1, 64, 512, 64, true, false, true, kMillion}, 20);     // V4-Flash q, decode
    check_head({3, 64, 512, 64, true, false, false, 4096}, 21);        // q on a ratio-0 layer
    check_head({17, 1, 512, 64, true, true, true, kMillion}, 22);      // kv with kv_norm
    check_head({3, 64, 128, 64, false, false, true, kMillion}, 23);    // indexer q: rope only
    check_head({2, 128, 512, 64, true, false, true, kMillion}, 24);    // V4-Pro q
    check_head({129, 4, 64, 16, true, true, false, 4096}, 25);         // tiny model
    check_head({3, 5, 66, 16, true, true, true, 100000}, 26);          // hd % 4 != 0: scalar path
    check_head({3, 3, 65, 16, true, false, false, 1000}, 27);          // odd hd (pairs at odd offsets)
    check_head({17, 2, 64, 0, true, true, false, 1}, 28);              // no rope
    check_head({1, 2, 16, 16, false, false, true, kMillion}, 29);      // all dims rotated
}

// ---------------------------------------------------------------------------- head norm + rope, official

// Numerics::official. The twin is the sequence of ref attention_inputs: the linear's f32 output
// rounded to bf16 (linear_rounded), then
//   kv (normalize, weighted):   ops::rms_norm, round_bf16, ops::rope, round_bf16
//   q (normalize, unweighted):  ops::head_rms_norm_bf16, ops::rope, round_bf16
//   indexer q (rope only):      ops::rope, round_bf16
// Agreement. Up to the rotation the GPU performs the twin's operations with the same roundings:
// the bf16 input; the sum of squares in f64 (the twin's: the squares of bf16 values are exact in
// f64, and so is their sum unless the row spans more than ~2^28 in squares; even then the f64
// roundings of two summation orders sit ~2^29 below the f32 mean's, so the mean has the twin's
// bits) or, for q, the bf16 squares added in f32 in the twin's element order; the norm
// multiplies; the bf16 roundings. So the dims [0, hd − rope) must agree bit for bit. The rope dims go through cosf /
// sinf, which may differ from glibc's by an ulp or two; the rotated f32 value then moves by a few
// f32 ulps and its bf16 rounding changes only when it lies that close to a rounding boundary (a
// few in 2^16 of the elements, more where the rotation cancels). So a rope dim may differ, by one
// bf16 ulp (≤ 2^-7 of the value) plus kRopeAbs of the row's max, in at most max(4, n_rope / 1024)
// elements of a case; the rest must agree bit for bit.
void check_head_official(const RopeCase& c, uint32_t seed, float eps = 1e-6f) {
    SCOPED_TRACE(str("head_norm_rope official T=", c.T, " heads=", c.heads, " hd=", c.hd, " rope=", c.rope,
                     " normalize=", c.normalize, " weighted=", c.weighted, " eps=", eps));
    const int64_t rows = c.T * c.heads;
    const std::vector<float> x = normal_rows(rows, c.hd, seed, 1.0f, -4.0f, 4.0f);   // f32: a linear's output
    std::vector<uint16_t> w = to_bf16(normal_rows(1, c.hd, seed + 1, 1.0f));
    std::mt19937 rng(seed + 2);
    std::vector<int32_t> pos(static_cast<size_t>(c.T));
    for (auto& p : pos) p = static_cast<int32_t>(rng() % static_cast<uint32_t>(c.max_pos));
    pos[0] = 0;
    if (c.T > 2) pos[2] = static_cast<int32_t>(c.max_pos - 1);
    std::vector<int64_t> pos64(pos.begin(), pos.end());
    YarnConfig yarn;
    yarn.factor = 16;
    yarn.original_max_position_embeddings = 65536;
    const ops::RopeTable table = c.yarn ? ops::make_rope_table(160000, c.rope, &yarn) : ops::make_rope_table(10000, c.rope, nullptr);

    const Numerics nm = Numerics::official;
    std::vector<float> ref = x;
    const int64_t n = static_cast<int64_t>(ref.size());
    ops::round_bf16(nm, ref.data(), n);
    const Tensor wt(w.data(), DType::bf16, {c.hd});
    if (c.normalize && c.weighted) {
        ops::rms_norm(ref.data(), rows, c.hd, &wt, eps, ref.data());
        ops::round_bf16(nm, ref.data(), n);
    } else if (c.normalize) {
        ops::head_rms_norm_bf16(ref.data(), rows, c.hd, eps);
    }
    if (c.rope > 0) ops::rope(ref.data(), c.T, c.heads, c.hd, pos64.data(), table, false);
    ops::round_bf16(nm, ref.data(), n);

    DeviceArray<float> d_x(x), d_freq(table.inv_freq.empty() ? std::vector<float>{0.0f} : table.inv_freq);
    DeviceArray<uint16_t> d_w(w), d_y(x.size());
    DeviceArray<int32_t> d_pos(pos);
    d_y.fill(0xFF);
    const cuda::RopeView rv{d_freq.data(), static_cast<int32_t>(c.rope)};
    cuda::head_norm_rope(d_x.data(), c.T, c.heads, c.hd, c.normalize, c.weighted ? d_w.data() : nullptr, eps,
                         d_pos.data(), rv, d_y.data(), nullptr, nm);
    const std::vector<uint16_t> got = d_y.download();

    size_t nope_bad = 0, rope_diff = 0, rope_bad = 0, n_rope = 0;
    std::ostringstream first;
    for (int64_t r = 0; r < rows; ++r) {
        double mx = 0;
        for (int64_t e = 0; e < c.hd; ++e) mx = std::max(mx, std::fabs(static_cast<double>(ref[static_cast<size_t>(r * c.hd + e)])));
        for (int64_t e = 0; e < c.hd; ++e) {
            const size_t i = static_cast<size_t>(r * c.hd + e);
            const bool rope_dim = e >= c.hd - c.rope;
            n_rope += rope_dim ? 1 : 0;
            if (got[i] == f32_to_bf16(ref[i])) continue;
            const double g = bf16_to_f32(got[i]), want = ref[i];
            if (first.tellp() < 600)
                first << "  [row " << r << ", " << e << (rope_dim ? " rope" : "") << "] got " << g << " want " << want << "\n";
            if (!rope_dim) {
                ++nope_bad;
            } else {
                ++rope_diff;
                // One bf16 ulp (≤ 2^-7 of the value), or the f32 difference itself where the rotation cancels.
                if (!(std::fabs(g - want) <= 2 * kBf16Rel * std::max(std::fabs(g), std::fabs(want)) + kRopeAbs * mx))
                    ++rope_bad;
            }
        }
    }
    EXPECT_EQ(nope_bad, 0u) << "dims before the rope dims must be bit-identical\n" << first.str();
    EXPECT_EQ(rope_bad, 0u) << "rope dims outside the tolerance\n" << first.str();
    EXPECT_LE(rope_diff, std::max<size_t>(4, n_rope / 1024)) << "rope dims differing in bits\n" << first.str();
    if (rope_diff > 0) std::printf("[     INFO ] %zu of %zu rope elements differ by a bf16 rounding\n", rope_diff, n_rope);
}

TEST(CudaRowwise, HeadNormRopeOfficialMatchesAttentionInputs) {
    RW_SKIP_WITHOUT_GPU();
    const int64_t kMillion = 1 << 20;
    //                  T  heads  hd  rope  norm   weight yarn   max_pos
    check_head_official({1, 64, 512, 64, true, false, true, kMillion}, 120);    // V4-Flash q, decode
    check_head_official({3, 64, 512, 64, true, false, false, 4096}, 121);       // q on a ratio-0 layer
    check_head_official({1, 1, 512, 64, true, true, true, kMillion}, 122);      // kv with kv_norm, decode
    check_head_official({17, 1, 512, 64, true, true, true, kMillion}, 123);     // kv, prefill
    check_head_official({3, 64, 128, 64, false, false, true, kMillion}, 124);   // indexer q: rope only
    check_head_official({2, 128, 512, 64, true, false, true, kMillion}, 125);   // V4-Pro q
    check_head_official({129, 4, 64, 16, true, true, false, 4096}, 126);        // tiny model kv
    check_head_official({129, 4, 64, 16, true, false, false, 4096}, 127);       // tiny model q
    check_head_official({3, 5, 66, 16, true, true, true, 100000}, 128);         // hd % 4 != 0: scalar path
    check_head_official({3, 3, 65, 16, true, false, false, 1000}, 129);         // odd hd, q norm, scalar path
    check_head_official({3, 3, 65, 16, false, false, true, 1000}, 130);         // odd hd, rope only
    check_head_official({17, 2, 64, 0, true, true, false, 1}, 131);             // no rope: all bit for bit
    check_head_official({17, 2, 64, 0, true, false, false, 1}, 132);
    check_head_official({1, 2, 16, 16, false, false, true, kMillion}, 133);     // all dims rotated
    check_head_official({5, 4, 64, 16, true, false, false, 4096}, 134, 1.0f);   // an eps that matters
    check_head_official({5, 4, 64, 16, true, true, false, 4096}, 135, 1.0f);
}

// ---------------------------------------------------------------------------- swiglu

// The twin is ops::expert_ffn itself: with w1 = [1 | 0], w3 = [0 | 1] and w2 = 1 (bf16 identity
// blocks, D = 2I), g = x[:, :I] and u = x[:, I:] exactly, and y = h exactly (each output is one
// product by 1 plus zeros), so y is the twin's SwiGLU in f32.
void check_swiglu(int64_t T, int64_t I, uint32_t seed) {
    SCOPED_TRACE(shape_name("swiglu", T, I));
    const float limit = 10.0f;
    std::vector<float> x = normal_rows(T, 2 * I, seed, 8.0f);   // |v| up to ~30: both clamps active
    x[0] = 25.0f;
    if (I > 2) x[static_cast<size_t>(I + 1)] = -12.0f;
    std::vector<uint16_t> w1(static_cast<size_t>(I * 2 * I), 0), w3(w1.size(), 0), w2(static_cast<size_t>(I * I), 0);
    const uint16_t one = f32_to_bf16(1.0f);
    for (int64_t i = 0; i < I; ++i) {
        w1[static_cast<size_t>(i * 2 * I + i)] = one;
        w3[static_cast<size_t>(i * 2 * I + I + i)] = one;
        w2[static_cast<size_t>(i * I + i)] = one;
    }
    ExpertWeights e;
    auto bind = [](Linear& l, std::vector<uint16_t>& w, int64_t out, int64_t in) {
        l.format = LinearFormat::bf16;
        l.out = out;
        l.in = in;
        l.weight = Tensor(w.data(), DType::bf16, {out, in});
    };
    bind(e.w1, w1, I, 2 * I);
    bind(e.w3, w3, I, 2 * I);
    bind(e.w2, w2, I, I);
    std::vector<float> ref(static_cast<size_t>(T * I));
    ops::expert_ffn(e, limit, x.data(), T, nullptr, ref.data());

    std::vector<float> g(static_cast<size_t>(T * I)), u(g.size());
    for (int64_t t = 0; t < T; ++t)
        for (int64_t i = 0; i < I; ++i) {
            g[static_cast<size_t>(t * I + i)] = x[static_cast<size_t>(t * 2 * I + i)];
            u[static_cast<size_t>(t * I + i)] = x[static_cast<size_t>(t * 2 * I + I + i)];
        }
    DeviceArray<float> d_g(g), d_u(u);
    DeviceArray<uint16_t> d_h(g.size());
    cuda::swiglu(d_g.data(), d_u.data(), T, I, limit, d_h.data(), nullptr);
    expect_bf16_close(d_h.download(), ref, I, kBf16Rel, 0.0, "swiglu");
}

// Official numerics: g and u rounded to bf16 before the SwiGLU; the twin is ops::expert_ffn's
// expression on the rounded values, with the exact-mode test's tolerance (expf vs std::exp).
TEST(CudaRowwise, SwigluOfficialRoundsItsInputs) {
    RW_SKIP_WITHOUT_GPU();
    for (const auto& [T, I] : {std::pair<int64_t, int64_t>{1, 2048}, {17, 3072}, {3, 257}}) {
        SCOPED_TRACE(shape_name("swiglu official", T, I));
        const float limit = 10.0f;
        const std::vector<float> g = normal_rows(T, I, 90, 8.0f), u = normal_rows(T, I, 91, 8.0f);
        std::vector<float> ref(g.size());
        for (size_t i = 0; i < g.size(); ++i) {
            const float gv = std::min(ops::bf16_round(g[i]), limit);
            const float uv = std::clamp(ops::bf16_round(u[i]), -limit, limit);
            ref[i] = gv / (1.0f + std::exp(-gv)) * uv;
        }
        DeviceArray<float> d_g(g), d_u(u);
        DeviceArray<uint16_t> d_h(g.size());
        cuda::swiglu(d_g.data(), d_u.data(), T, I, limit, d_h.data(), nullptr, Numerics::official);
        expect_bf16_close(d_h.download(), ref, I, kBf16Rel, 0.0, "swiglu official");
    }
}

TEST(CudaRowwise, SwigluMatchesExpertFfn) {
    RW_SKIP_WITHOUT_GPU();
    check_swiglu(1, 2048, 30);    // V4-Flash shared expert, decode
    check_swiglu(17, 2048, 31);
    check_swiglu(3, 3072, 32);    // V4-Pro
    check_swiglu(129, 64, 33);    // tiny
    check_swiglu(3, 257, 34);     // T·I % 4 != 0: scalar tail
    check_swiglu(1, 1, 35);
}

// ---------------------------------------------------------------------------- gather / cast

// dst[i] = src[idx[i]] for random idx, bit for bit: bf16 rows (gather_rows_bf16, the head's row
// selection) or f32 rows (gather_rows_f32, the MTP block's streams of chosen rows).
template <typename T>
void check_gather(int64_t V, int64_t width, int64_t n, uint32_t seed) {
    constexpr bool f32 = std::is_same_v<T, float>;
    SCOPED_TRACE(shape_name(f32 ? "gather_f32" : "gather", V, width, n));
    const std::vector<float> rows = normal_rows(V, width, seed, 1.0f, -4.0f, 4.0f);
    std::vector<T> src;
    if constexpr (f32) src = rows;
    else src = to_bf16(rows);
    std::mt19937 rng(seed + 1);
    std::vector<int32_t> idx(static_cast<size_t>(n));
    for (auto& i : idx) i = static_cast<int32_t>(rng() % V);
    std::vector<T> ref(static_cast<size_t>(n * width));
    for (int64_t i = 0; i < n; ++i)
        std::copy(src.begin() + idx[static_cast<size_t>(i)] * width, src.begin() + (idx[static_cast<size_t>(i)] + 1) * width,
                  ref.begin() + i * width);
    DeviceArray<T> d_src(src), d_dst(ref.size());
    DeviceArray<int32_t> d_idx(idx);
    if constexpr (f32) cuda::gather_rows_f32(d_src.data(), d_idx.data(), n, width, d_dst.data(), nullptr);
    else cuda::gather_rows_bf16(d_src.data(), d_idx.data(), n, width, d_dst.data(), nullptr);
    expect_bits_equal(d_dst.download(), ref, f32 ? "gather_rows_f32" : "gather_rows_bf16");
}

TEST(CudaRowwise, GatherRowsCopiesBits) {
    RW_SKIP_WITHOUT_GPU();
    check_gather<uint16_t>(1000, 4096, 1, 40);
    check_gather<uint16_t>(1000, 4096, 129, 41);
    check_gather<uint16_t>(300, 7168, 3, 42);
    check_gather<uint16_t>(100, 4097, 17, 43);   // scalar path
    check_gather<uint16_t>(10, 1, 3, 44);
}

TEST(CudaRowwise, GatherRowsF32CopiesBits) {
    RW_SKIP_WITHOUT_GPU();
    check_gather<float>(8, 4 * 4096, 1, 50);   // V4-Flash streams: hc = 4, D = 4096
    check_gather<float>(40, 4 * 4096, 16, 51);
    check_gather<float>(12, 4 * 7168, 5, 52);  // V4-Pro
    check_gather<float>(9, 4 * 256 + 1, 4, 53);   // scalar path
}

// The MTP block's input sum against ops::add_to_streams (bit for bit: one f32 add per element), and
// in place (X = a), as the runner calls it.
void check_add_streams(int64_t T, int64_t hc, int64_t D, uint32_t seed, int off = 0) {
    SCOPED_TRACE(shape_name("add_rows_broadcast", T, hc, D) + str(" off=", off));
    const std::vector<float> a = normal_rows(T * hc, D, seed, 1.0f, -20.0f, 20.0f);
    const std::vector<float> b = normal_rows(T, D, seed + 1, 1.0f, -20.0f, 20.0f);
    std::vector<float> ref = a;
    ops::add_to_streams(b.data(), T, hc, D, ref.data());
    std::vector<float> a_off(a.size() + static_cast<size_t>(off)), b_off(b.size() + static_cast<size_t>(off));
    std::copy(a.begin(), a.end(), a_off.begin() + off);
    std::copy(b.begin(), b.end(), b_off.begin() + off);
    DeviceArray<float> d_a(a_off), d_b(b_off), d_X(a_off.size());
    d_X.fill(0xFF);
    cuda::add_rows_broadcast(d_a.data() + off, d_b.data() + off, T, hc, D, d_X.data() + off, nullptr);
    std::vector<float> got = d_X.download();
    expect_bits_equal(std::vector<float>(got.begin() + off, got.end()), ref, "add_rows_broadcast");
    cuda::add_rows_broadcast(d_a.data() + off, d_b.data() + off, T, hc, D, d_a.data() + off, nullptr);   // in place
    got = d_a.download();
    expect_bits_equal(std::vector<float>(got.begin() + off, got.end()), ref, "add_rows_broadcast in place");
}

// Official numerics: bf16(bf16(a) + bf16(b)), bit for bit (ref mtp_forward's rounded inputs and sum).
TEST(CudaRowwise, AddRowsBroadcastOfficialNumerics) {
    RW_SKIP_WITHOUT_GPU();
    for (const auto& [T, D] : {std::pair<int64_t, int64_t>{1, 4096}, {5, 257}}) {
        SCOPED_TRACE(shape_name("add_rows_broadcast official", T, 4, D));
        const std::vector<float> a = normal_rows(T * 4, D, 95, 1.0f, -20.0f, 20.0f);
        const std::vector<float> b = normal_rows(T, D, 96, 1.0f, -20.0f, 20.0f);
        std::vector<float> ar = a, br = b;
        ops::round_bf16(Numerics::official, ar.data(), static_cast<int64_t>(ar.size()));
        ops::round_bf16(Numerics::official, br.data(), static_cast<int64_t>(br.size()));
        ops::add_to_streams(br.data(), T, 4, D, ar.data());
        ops::round_bf16(Numerics::official, ar.data(), static_cast<int64_t>(ar.size()));
        DeviceArray<float> d_a(a), d_b(b), d_X(a.size());
        cuda::add_rows_broadcast(d_a.data(), d_b.data(), T, 4, D, d_X.data(), nullptr, Numerics::official);
        expect_bits_equal(d_X.download(), ar, "add_rows_broadcast official");
    }
}

TEST(CudaRowwise, AddRowsBroadcastMatchesAddToStreams) {
    RW_SKIP_WITHOUT_GPU();
    check_add_streams(1, 4, 4096, 70);     // V4-Flash decode
    check_add_streams(129, 4, 4096, 71);
    check_add_streams(3, 4, 7168, 72);     // V4-Pro
    check_add_streams(5, 4, 256, 73);      // tiny
    check_add_streams(7, 2, 257, 74);      // D % 4 != 0: scalar path
    check_add_streams(3, 4, 4096, 75, 1);  // unaligned: scalar path
    // b and X may not overlap.
    DeviceArray<float> buf(64);
    EXPECT_THROW(cuda::add_rows_broadcast(buf.data(), buf.data(), 1, 4, 8, buf.data(), nullptr), Error);
}

void check_cast(int64_t n, int64_t width, uint32_t seed) {
    SCOPED_TRACE(shape_name("f32_to_bf16", n, width));
    std::vector<float> src = normal_rows(n, width, seed, 1.0f, -20.0f, 20.0f);
    // Every special case of the rounding: ties to even both ways, carries into the exponent (up to
    // inf), ±0, ±inf, NaNs (quiet and signalling), subnormals, the largest finite values.
    const uint32_t specials[] = {0x3F808000u, 0x3F818000u, 0x3F80C000u, 0x3F807FFFu, 0x7F7FFFFFu, 0xFF7FFFFFu,
                                 0x7F7F8000u, 0x00000000u, 0x80000000u, 0x7F800000u, 0xFF800000u, 0x7FC00000u,
                                 0x7F800001u, 0xFF812345u, 0x00000001u, 0x807FFFFFu, 0x00408000u, 0x3FFFFFFFu};
    for (size_t i = 0; i < std::size(specials) && i < src.size(); ++i) std::memcpy(&src[i], &specials[i], 4);
    std::vector<uint16_t> ref(src.size());
    for (size_t i = 0; i < src.size(); ++i) ref[i] = f32_to_bf16(src[i]);
    DeviceArray<float> d_src(src);
    DeviceArray<uint16_t> d_dst(src.size());
    cuda::f32_to_bf16_rows(d_src.data(), n, width, d_dst.data(), nullptr);
    expect_bits_equal(d_dst.download(), ref, "f32_to_bf16_rows");
}

TEST(CudaRowwise, F32ToBf16RowsMatchesF32ToBf16) {
    RW_SKIP_WITHOUT_GPU();
    check_cast(1, 4096, 50);
    check_cast(129, 4096, 51);
    check_cast(3, 4097, 52);   // count % 4 != 0: scalar tail
    check_cast(17, 3, 53);
}

TEST(CudaRowwise, UnalignedPointersTakeScalarPaths) {
    RW_SKIP_WITHOUT_GPU();
    // Buffers offset by one element: the vector paths' alignment checks must route to scalars.
    const int64_t rows = 3, D = 4096;
    const std::vector<float> x = normal_rows(rows, D, 60, 1.0f, -2.0f, 2.0f);
    std::vector<uint16_t> w = to_bf16(normal_rows(1, D, 61));
    const Tensor wt(w.data(), DType::bf16, {D});
    std::vector<float> ref(x.size());
    ops::rms_norm(x.data(), rows, D, &wt, 1e-6f, ref.data());
    DeviceArray<float> d_x(x.size() + 1);
    CUDA_CHECK(cudaMemcpy(d_x.data() + 1, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
    DeviceArray<uint16_t> d_w(w), d_y(x.size() + 1);
    cuda::rms_norm_rows(d_x.data() + 1, rows, D, d_w.data(), 1e-6f, d_y.data() + 1, nullptr);
    std::vector<uint16_t> y = d_y.download();
    y.erase(y.begin());
    expect_bf16_close(y, ref, D, kBf16Rel, 0.0, "rms_norm_rows unaligned");

    std::vector<uint16_t> cast_ref(x.size());
    for (size_t i = 0; i < x.size(); ++i) cast_ref[i] = f32_to_bf16(x[i]);
    cuda::f32_to_bf16_rows(d_x.data() + 1, rows, D, d_y.data() + 1, nullptr);
    y = d_y.download();
    y.erase(y.begin());
    expect_bits_equal(y, cast_ref, "f32_to_bf16_rows unaligned");
}

// ---------------------------------------------------------------------------- determinism, graphs

TEST(CudaRowwise, RepeatedRunsAreBitIdentical) {
    RW_SKIP_WITHOUT_GPU();
    const int64_t T = 17, H = 64, hd = 512;
    const std::vector<float> x = normal_rows(T * H, hd, 70, 1.0f, -4.0f, 4.0f);
    std::vector<int32_t> pos(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) pos[static_cast<size_t>(t)] = static_cast<int32_t>(1000 + 37 * t);
    const ops::RopeTable table = ops::make_rope_table(10000, 64, nullptr);
    DeviceArray<float> d_x(x), d_freq(table.inv_freq);
    DeviceArray<int32_t> d_pos(pos);
    DeviceArray<uint16_t> d_a(x.size()), d_b(x.size()), d_c(x.size()), d_d(x.size());
    const cuda::RopeView rv{d_freq.data(), 64};
    cuda::head_norm_rope(d_x.data(), T, H, hd, true, nullptr, 1e-6f, d_pos.data(), rv, d_a.data(), nullptr);
    cuda::head_norm_rope(d_x.data(), T, H, hd, true, nullptr, 1e-6f, d_pos.data(), rv, d_b.data(), nullptr);
    cuda::rms_norm_rows(d_x.data(), T * H, hd, nullptr, 1e-6f, d_c.data(), nullptr);
    cuda::rms_norm_rows(d_x.data(), T * H, hd, nullptr, 1e-6f, d_d.data(), nullptr);
    expect_bits_equal(d_a.download(), d_b.download(), "head_norm_rope twice");
    expect_bits_equal(d_c.download(), d_d.download(), "rms_norm_rows twice");
}

TEST(CudaRowwise, GraphReplayEqualsEager) {
    RW_SKIP_WITHOUT_GPU();
    const int64_t rows = 5, D = 4096;
    std::vector<float> x = normal_rows(rows, D, 80, 1.0f, -3.0f, 3.0f);
    std::vector<uint16_t> w = to_bf16(normal_rows(1, D, 81));
    DeviceArray<float> d_x(x);
    DeviceArray<uint16_t> d_w(w), d_eager(x.size()), d_graph(x.size());
    cudaStream_t s = nullptr;
    CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    CUDA_CHECK(cudaDeviceSynchronize());   // uploads ran on the legacy stream; s does not wait for them
    CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    cuda::rms_norm_rows(d_x.data(), rows, D, d_w.data(), 1e-6f, d_graph.data(), s);
    CUDA_CHECK(cudaStreamEndCapture(s, &graph));
    CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (uint32_t round = 0; round < 2; ++round) {
        if (round == 1) {   // new contents, same buffers
            x = normal_rows(rows, D, 82, 1.0f, -3.0f, 3.0f);
            d_x.upload(x);
        }
        d_graph.fill(0);
        CUDA_CHECK(cudaDeviceSynchronize());   // the fill runs on the legacy stream; s does not wait for it
        CUDA_CHECK(cudaGraphLaunch(exec, s));
        CUDA_CHECK(cudaStreamSynchronize(s));
        cuda::rms_norm_rows(d_x.data(), rows, D, d_w.data(), 1e-6f, d_eager.data(), s);
        CUDA_CHECK(cudaStreamSynchronize(s));
        expect_bits_equal(d_graph.download(), d_eager.download(), str("graph replay round ", round));
    }
    CUDA_CHECK(cudaGraphExecDestroy(exec));
    CUDA_CHECK(cudaGraphDestroy(graph));
    CUDA_CHECK(cudaStreamDestroy(s));
}

// ---------------------------------------------------------------------------- arguments

// The checks run before any CUDA call, so these run in every CUDA build, GPU or not.
TEST(CudaRowwise, RejectsBadArguments) {
    using test::expect_error;
    float* f = fake_ptr<float>();
    uint16_t* b = fake_ptr<uint16_t>();
    int32_t* i = fake_ptr<int32_t>();
    expect_error([&] { cuda::embed_streams(b, i, -1, 8, 4, f, nullptr); }, {"embed_streams", "T=-1"});
    expect_error([&] { cuda::embed_streams(b, i, 2, 0, 4, f, nullptr); }, {"embed_streams", "D=0"});
    expect_error([&] { cuda::embed_streams(b, i, 2, 8, 0, f, nullptr); }, {"embed_streams", "hc=0"});
    expect_error([&] { cuda::embed_streams(nullptr, i, 2, 8, 4, f, nullptr); }, {"embed_streams", "null"});
    expect_error([&] { cuda::rms_norm_rows(f, 2, 0, b, 1e-6f, b, nullptr); }, {"rms_norm_rows", "D=0"});
    expect_error([&] { cuda::rms_norm_rows(nullptr, 2, 8, b, 1e-6f, b, nullptr); }, {"rms_norm_rows", "null"});
    const cuda::RopeView odd{f, 63}, big{f, 66}, none{nullptr, 64};
    expect_error([&] { cuda::head_norm_rope(f, 1, 4, 64, true, nullptr, 1e-6f, i, odd, b, nullptr); },
                 {"head_norm_rope", "rope_dim=63"});
    expect_error([&] { cuda::head_norm_rope(f, 1, 4, 64, true, nullptr, 1e-6f, i, big, b, nullptr); },
                 {"head_norm_rope", "rope_dim=66"});
    expect_error([&] { cuda::head_norm_rope(f, 1, 4, 64, true, nullptr, 1e-6f, i, none, b, nullptr); },
                 {"head_norm_rope", "null pos/inv_freq"});
    expect_error([&] { cuda::head_norm_rope(f, 1, 0, 64, true, nullptr, 1e-6f, i, odd, b, nullptr); },
                 {"head_norm_rope", "heads=0"});
    expect_error([&] { cuda::head_norm_rope(f, 1, 4, 64, false, b, 1e-6f, i, cuda::RopeView{f, 16}, b, nullptr); },
                 {"head_norm_rope", "without normalize"});
    expect_error([&] { cuda::swiglu(f, nullptr, 2, 8, 10.0f, b, nullptr); }, {"swiglu", "null"});
    expect_error([&] { cuda::swiglu(f, f, 2, 0, 10.0f, b, nullptr); }, {"swiglu", "I=0"});
    expect_error([&] { cuda::gather_rows_bf16(b, nullptr, 2, 8, b, nullptr); }, {"gather_rows_bf16", "null"});
    expect_error([&] { cuda::gather_rows_bf16(b, i, -2, 8, b, nullptr); }, {"gather_rows_bf16", "n=-2"});
    expect_error([&] { cuda::f32_to_bf16_rows(f, 2, 0, b, nullptr); }, {"f32_to_bf16_rows", "width=0"});
    // Empty batches are fine and launch nothing (null pointers allowed then).
    cuda::rms_norm_rows(nullptr, 0, 8, nullptr, 1e-6f, nullptr, nullptr);
    cuda::swiglu(nullptr, nullptr, 0, 8, 10.0f, nullptr, nullptr);
}

}  // namespace
}  // namespace megamoe

#else

TEST(CudaRowwise, SkippedWithoutCuda) { GTEST_SKIP() << "built without CUDA"; }

#endif
