// numerics_test.cpp — the official numerics' GPU roundings (src/cuda/numerics.h) and their scalar
// device steps (src/cuda/numerics.cuh) against the CPU twins, bit for bit:
//   CudaNumerics.ScalarStepsMatchFormats        nm::bf16_round, pow2_ceil, fp8_scale, fp4_scale,
//       e4m3_round, e2m1_round, fp8_qdq (and its packed-pair form fp8_qdq_bf16x2), fp4_qdq
//       (through scalar_op_values) against io/formats.h (f32_to_bf16, e8m0_ceil, f32_to_e4m3 /
//       e4m3_to_f32, f32_to_e2m1 / e2m1_to_f32) and the element steps of ref/ops_numerics.cpp,
//       on 2^18 random finite floats of every exponent and on the boundaries: every e4m3 and e2m1
//       value and the midpoints between neighbours (ties to even) with their f32 neighbours, the
//       saturation points (448, 464, 5, 6), the e4m3 subnormal range and its cut-off (2^-10,
//       2^-17), ±0, f32 subnormals, powers of two ± 1 ulp.
//   CudaNumerics.Fp8BlockRoundMatchesRoundGemmInput   rows 1, 3, 16 × K 4096, 7168, 1024, 512 in
//       128-blocks (V4-Flash / Pro hidden sizes, q_lora, the tiny model): ops::round_gemm_input.
//   CudaNumerics.Fp8BlockRoundMatchesRoundKvLatent    kv rows [n, 512] with rope 64 (width 448 in
//       64-blocks) and the tiny [n, 64] with rope 16 (width 48: one partial block); the rope dims
//       must come back untouched: ops::round_kv_latent.
//   CudaNumerics.Fp8BlockRoundOddShapes          partial last blocks (300 in 128-blocks), ld > width,
//       odd ld (the scalar path), x one element off alignment, blocks of 1, 7, 32, 256 (16-byte
//       vectors) and 1000 (lanes loop): ops::fp8_block_qdq per row.
//   CudaNumerics.Fp8BlockRoundHardValues         e4m3 ties, all-zero blocks with −0, −0 in a live
//       block, e4m3-subnormal results, blocks just past 448·2^k (the scale doubles), amax below the
//       1e-4 clamp and at it, bf16-subnormal inputs, in 128- and 64-blocks and a partial block.
//   CudaNumerics.IndexerQkMatchesRoundIndexerQk  rows 1, 3, 16, 129 × hd 128, 64, 32, 16, 8, 2, 1,
//       random rows of every magnitude and crafted rows whose rotation lands on e2m1 ties, zero and
//       −0 rows, one-hot rows, rows small enough for the 6·2^-126 clamp: ops::round_indexer_qk.
//   CudaNumerics.RoundBf16InplaceMatchesRoundBf16     ops::round_bf16 (vector path, tail, unaligned).
//   CudaNumerics.RejectsBadArguments             host checks (no GPU needed).
//
// Agreement: bit for bit everywhere, −0 included. Each kernel performs its twin's operations: the
// block amax is a maximum (exact in any order), the element step is the twin's with the same
// IEEE roundings (the hardware e4m3 conversion is RNE with saturation, as f32_to_e4m3; e2m1 counts
// the same midpoints; the scales are powers of two, so x / s and q · s are exact), and every output
// of the Hadamard is the same sequence of f32 adds as the twin's butterflies (numerics.cuh). So a
// single differing bit is a bug, not rounding noise. Inputs are finite (no NaN / inf: not
// activations, and the CPU and GPU clamps treat NaN differently).
#include <gtest/gtest.h>

#include "cuda/numerics.h"
#include "cuda/w4a8.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "core/common.h"
#include "io/formats.h"
#include "ref/ops.h"
#include "test_util.h"

#ifdef MEGAMOE_HAVE_CUDA
#include <cuda_runtime.h>

#include "cuda/buffer.h"
#include "cuda/linear.h"   // gpu_available, CUDA_CHECK
#endif

namespace megamoe {
namespace {

using V = std::vector<float>;

#ifdef MEGAMOE_HAVE_CUDA

using cuda::DeviceArray;
using cuda::ScalarOp;

// ---------------------------------------------------------------------------- argument checks

// The checks run before any CUDA call (the pointers are never dereferenced), so this runs in every
// CUDA build, GPU or not.
TEST(CudaNumerics, RejectsBadArguments) {
    using test::expect_error;
    uint16_t* b = reinterpret_cast<uint16_t*>(uintptr_t{1} << 20);
    float* f = reinterpret_cast<float*>(uintptr_t{1} << 20);
    expect_error([&] { cuda::fp8_block_round(b, -1, 128, 128, 128, nullptr); }, {"fp8_block_round", "rows=-1"});
    expect_error([&] { cuda::fp8_block_round(b, 1, 128, 129, 128, nullptr); }, {"fp8_block_round", "width=129"});
    expect_error([&] { cuda::fp8_block_round(b, 1, 128, 0, 128, nullptr); }, {"fp8_block_round", "width=0"});
    expect_error([&] { cuda::fp8_block_round(b, 1, 128, 128, 0, nullptr); }, {"fp8_block_round", "block=0"});
    expect_error([&] { cuda::fp8_block_round(nullptr, 1, 128, 128, 128, nullptr); }, {"fp8_block_round", "null"});
    expect_error([&] { cuda::round_indexer_qk(b, 1, 96, nullptr); }, {"round_indexer_qk", "hd=96"});
    expect_error([&] { cuda::round_indexer_qk(b, 1, 256, nullptr); }, {"round_indexer_qk", "hd=256"});
    expect_error([&] { cuda::round_indexer_qk(b, 1, 0, nullptr); }, {"round_indexer_qk", "hd=0"});
    expect_error([&] { cuda::round_indexer_qk(b, -2, 128, nullptr); }, {"round_indexer_qk", "rows=-2"});
    expect_error([&] { cuda::round_indexer_qk(nullptr, 1, 128, nullptr); }, {"round_indexer_qk", "null"});
    expect_error([&] { cuda::round_bf16_inplace(f, -1, nullptr); }, {"round_bf16_inplace", "n=-1"});
    expect_error([&] { cuda::round_bf16_inplace(nullptr, 4, nullptr); }, {"round_bf16_inplace", "null"});
    expect_error([&] { cuda::scalar_op_values(cuda::ScalarOp::fp8_qdq, f, nullptr, 4, f, nullptr); },
                 {"scalar_op_values", "null"});
    // Empty calls launch nothing (null pointers allowed then).
    cuda::fp8_block_round(nullptr, 0, 128, 128, 128, nullptr);
    cuda::round_indexer_qk(nullptr, 0, 128, nullptr);
    cuda::round_bf16_inplace(nullptr, 0, nullptr);
}

#define NM_SKIP_WITHOUT_GPU() \
    if (!cuda::gpu_available()) GTEST_SKIP() << "no CUDA device"

uint32_t bits(float v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    return u;
}
float from_bits(uint32_t u) {
    float v;
    std::memcpy(&v, &u, 4);
    return v;
}
float bf16r(float v) { return bf16_to_f32(f32_to_bf16(v)); }

// ---------------------------------------------------------------------------- scalar steps

// The CPU element steps (ref/ops_numerics.cpp's arithmetic, spelled out on io/formats.h).
float cpu_pow2_ceil(float v) { return e8m0_to_f32(e8m0_ceil(v)); }
float cpu_fp8_scale(float amax) { return cpu_pow2_ceil(std::max(amax, 1e-4f) / 448.0f); }
float cpu_fp4_scale(float amax) { return cpu_pow2_ceil(std::max(amax, 6.0f * std::ldexp(1.0f, -126)) / 6.0f); }
float cpu_e4m3(float v) { return e4m3_to_f32(f32_to_e4m3(v)); }
float cpu_e2m1(float v) { return e2m1_to_f32(f32_to_e2m1(v)); }
float cpu_fp8_qdq(float x, float s) { return ops::bf16_round(cpu_e4m3(std::clamp(x / s, -448.0f, 448.0f)) * s); }
float cpu_fp4_qdq(float x, float s) { return ops::bf16_round(cpu_e2m1(std::clamp(x / s, -6.0f, 6.0f)) * s); }

float cpu_op(ScalarOp op, float x, float s) {
    switch (op) {
        case ScalarOp::bf16_round: return bf16r(x);
        case ScalarOp::pow2_ceil: return cpu_pow2_ceil(x);
        case ScalarOp::fp8_scale: return cpu_fp8_scale(x);
        case ScalarOp::fp4_scale: return cpu_fp4_scale(x);
        case ScalarOp::e4m3_round: return cpu_e4m3(x);
        case ScalarOp::e2m1_round: return cpu_e2m1(x);
        case ScalarOp::fp8_qdq: return cpu_fp8_qdq(x, s);
        case ScalarOp::fp4_qdq: return cpu_fp4_qdq(x, s);
        case ScalarOp::fp8_qdq_bf16x2: return cpu_fp8_qdq(bf16r(x), s);
    }
    return 0.0f;
}
const char* op_name(ScalarOp op) {
    switch (op) {
        case ScalarOp::bf16_round: return "bf16_round";
        case ScalarOp::pow2_ceil: return "pow2_ceil";
        case ScalarOp::fp8_scale: return "fp8_scale";
        case ScalarOp::fp4_scale: return "fp4_scale";
        case ScalarOp::e4m3_round: return "e4m3_round";
        case ScalarOp::e2m1_round: return "e2m1_round";
        case ScalarOp::fp8_qdq: return "fp8_qdq";
        case ScalarOp::fp4_qdq: return "fp4_qdq";
        case ScalarOp::fp8_qdq_bf16x2: return "fp8_qdq_bf16x2";
    }
    return "?";
}

// Runs op on the GPU over x (and s) and compares every result with the twin, bit for bit.
void check_scalar(ScalarOp op, const V& x, const V& s = {}) {
    SCOPED_TRACE(op_name(op));
    ASSERT_FALSE(x.empty());
    DeviceArray<float> d_x(x), d_y(x.size());
    DeviceArray<float> d_s(s.empty() ? V{0.0f} : s);
    d_y.fill(0xFF);
    cuda::scalar_op_values(op, d_x.data(), s.empty() ? nullptr : d_s.data(), static_cast<int64_t>(x.size()), d_y.data(),
                           nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    const V y = d_y.download();
    size_t bad = 0;
    std::ostringstream first;
    for (size_t i = 0; i < x.size(); ++i) {
        const float want = cpu_op(op, x[i], s.empty() ? 0.0f : s[i]);
        if (bits(y[i]) != bits(want)) {
            if (bad < 8) {
                first << "  x " << x[i] << " (0x" << std::hex << bits(x[i]) << std::dec << ")";
                if (!s.empty()) first << " s " << s[i];
                first << ": got " << y[i] << " (0x" << std::hex << bits(y[i]) << "), want " << std::dec << want
                      << " (0x" << std::hex << bits(want) << std::dec << ")\n";
            }
            ++bad;
        }
    }
    EXPECT_EQ(bad, 0u) << op_name(op) << ": " << bad << " of " << x.size() << " differ\n" << first.str();
}

// Finite floats of every exponent: random sign, biased exponent in [0, 254], random mantissa.
V random_finite(std::mt19937& rng, size_t n) {
    V v(n);
    for (float& f : v) {
        const uint32_t r = static_cast<uint32_t>(rng());
        const uint32_t e = static_cast<uint32_t>(rng() % 255u);
        f = from_bits((r & 0x80000000u) | (e << 23) | (r & 0x7FFFFFu));
    }
    return v;
}

// The values around which the roundings decide: every e4m3 / e2m1 value, the midpoints between
// neighbours, each with its two f32 neighbours, the saturation and cut-off points, ±0, f32
// subnormals, powers of two and their neighbours; both signs.
V boundary_values() {
    V pos;
    auto with_neighbours = [&](float v) {
        pos.push_back(v);
        pos.push_back(std::nextafter(v, 0.0f));
        pos.push_back(std::nextafter(v, std::numeric_limits<float>::infinity()));
    };
    V e4m3;
    for (int c = 0; c < 0x7F; ++c) e4m3.push_back(e4m3_to_f32(static_cast<uint8_t>(c)));   // 0 .. 448
    for (size_t i = 0; i < e4m3.size(); ++i) {
        with_neighbours(e4m3[i]);
        if (i + 1 < e4m3.size()) with_neighbours((e4m3[i] + e4m3[i + 1]) / 2);   // exact in f32
    }
    const float e2m1[] = {0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f, 0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};
    for (float v : e2m1) with_neighbours(v);
    for (float v : {448.0f, 456.0f, 464.0f, 480.0f, 500.0f, 6.5f, 7.0f, 12.0f, 1e30f, 3.4e38f}) with_neighbours(v);
    for (int k = -20; k <= -6; ++k) with_neighbours(std::ldexp(1.0f, k));   // e4m3 subnormals and the cut-off
    for (int k = -149; k <= 127; ++k) with_neighbours(std::ldexp(1.0f, k));
    for (float v : {1e-4f, 6.0f * std::ldexp(1.0f, -126), 448.0f * 1e-4f}) with_neighbours(v);
    pos.push_back(0.0f);
    pos.push_back(std::numeric_limits<float>::max());
    pos.push_back(std::numeric_limits<float>::denorm_min());
    V all = pos;
    for (float v : pos) all.push_back(-v);
    return all;
}

TEST(CudaNumerics, ScalarStepsMatchFormats) {
    NM_SKIP_WITHOUT_GPU();
    std::mt19937 rng(1);
    V x = boundary_values();
    const V r = random_finite(rng, 1 << 18);
    x.insert(x.end(), r.begin(), r.end());
    for (ScalarOp op : {ScalarOp::bf16_round, ScalarOp::e4m3_round, ScalarOp::e2m1_round}) check_scalar(op, x);
    // Scales: amax ≥ 0 (any finite); pow2_ceil: positive normal values only (the callers clamp first).
    V amax, normal;
    for (float v : x) {
        amax.push_back(std::fabs(v));
        if (std::fabs(v) >= std::numeric_limits<float>::min()) normal.push_back(std::fabs(v));
    }
    check_scalar(ScalarOp::fp8_scale, amax);
    check_scalar(ScalarOp::fp4_scale, amax);
    check_scalar(ScalarOp::pow2_ceil, normal);

    // qdq as the blocks use it: s = the block scale of an amax, x = s · y with y on and between the
    // grid points (ties), y of every magnitude below the grid's top, and y past it (the clamp).
    for (ScalarOp op : {ScalarOp::fp8_qdq, ScalarOp::fp4_qdq}) {
        const bool fp8 = op == ScalarOp::fp8_qdq;
        const float top = fp8 ? 448.0f : 6.0f;
        V xs, ss;
        std::uniform_real_distribution<float> ue(-60.0f, 60.0f), uy(-1.0f, 1.0f);
        const V bnd = boundary_values();
        for (int i = 0; i < (1 << 17); ++i) {
            const float am = std::exp2(ue(rng));
            const float s = fp8 ? cpu_fp8_scale(am) : cpu_fp4_scale(am);
            float y;
            switch (i % 4) {
                case 0: y = bnd[static_cast<size_t>(rng() % bnd.size())]; break;   // grid points, ties, tiny
                case 1: y = uy(rng) * top; break;
                case 2: y = uy(rng) * am / s; break;                                // x within the block's amax
                default: y = uy(rng) * top * 1.5f; break;                           // past the top: clamped
            }
            if (!std::isfinite(y * s) || std::fabs(y) > 1e6f) y = top;
            xs.push_back(y * s);
            ss.push_back(s);
        }
        check_scalar(op, xs, ss);
        // The packed-pair form (moe_small.cu's official h rounding) on the same values taken as bf16.
        if (fp8) check_scalar(ScalarOp::fp8_qdq_bf16x2, xs, ss);
    }
}

// ---------------------------------------------------------------------------- fp8 blocks

// Random bf16 rows [rows, ld]: every block of `block` elements with its own magnitude 2^U(-24, 12)
// (so the scales differ, some blocks fall under the 1e-4 clamp), and a few exact zeros and −0.
std::vector<uint16_t> random_blocks(std::mt19937& rng, int64_t rows, int64_t ld, int64_t block) {
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::uniform_real_distribution<float> mag(-24.0f, 12.0f);
    std::vector<uint16_t> x(static_cast<size_t>(rows * ld));
    for (int64_t r = 0; r < rows; ++r) {
        float m = 1.0f;
        for (int64_t i = 0; i < ld; ++i) {
            if (i % block == 0) m = std::exp2(mag(rng));
            x[static_cast<size_t>(r * ld + i)] = f32_to_bf16(nd(rng) * m);
        }
    }
    for (size_t i = 3; i < x.size(); i += 97) x[i] = (i & 1) ? 0x8000 : 0;
    return x;
}

// fp8_block_round on x bf16 [rows, ld] (uploaded `off` elements past a 256-byte aligned base)
// against ops::fp8_block_qdq over the first `width` elements of each row; the rest must be
// untouched. Bit for bit.
void check_fp8(const std::vector<uint16_t>& x, int64_t rows, int64_t ld, int64_t width, int64_t block,
               const std::string& what, int64_t off = 0) {
    SCOPED_TRACE(str(what, ": rows ", rows, " ld ", ld, " width ", width, " block ", block, " off ", off));
    ASSERT_EQ(static_cast<int64_t>(x.size()), rows * ld);
    std::vector<uint16_t> want = x;
    V row(static_cast<size_t>(width));
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t i = 0; i < width; ++i) row[static_cast<size_t>(i)] = bf16_to_f32(x[static_cast<size_t>(r * ld + i)]);
        ops::fp8_block_qdq(row.data(), width, block);
        for (int64_t i = 0; i < width; ++i) {
            // Every result is a bf16 value (e4m3 · 2^k), so the conversion is exact.
            ASSERT_EQ(bf16r(row[static_cast<size_t>(i)]), row[static_cast<size_t>(i)]) << "twin result not bf16";
            want[static_cast<size_t>(r * ld + i)] = f32_to_bf16(row[static_cast<size_t>(i)]);
        }
    }
    std::vector<uint16_t> padded(x.size() + static_cast<size_t>(off), 0x7FC0);
    std::copy(x.begin(), x.end(), padded.begin() + off);
    DeviceArray<uint16_t> d(padded);
    cuda::fp8_block_round(d.data() + off, rows, ld, width, block, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<uint16_t> got_all = d.download();
    size_t bad = 0;
    std::ostringstream first;
    for (size_t i = 0; i < x.size(); ++i) {
        const uint16_t g = got_all[i + static_cast<size_t>(off)];
        if (g != want[i]) {
            if (bad < 8)
                first << "  [row " << static_cast<int64_t>(i) / ld << ", " << static_cast<int64_t>(i) % ld << "] in "
                      << bf16_to_f32(x[i]) << ": got " << bf16_to_f32(g) << " (0x" << std::hex << g << "), want "
                      << std::dec << bf16_to_f32(want[i]) << " (0x" << std::hex << want[i] << std::dec << ")\n";
            ++bad;
        }
    }
    for (int64_t i = 0; i < off; ++i) EXPECT_EQ(got_all[static_cast<size_t>(i)], 0x7FC0) << "wrote before x";
    EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << x.size() << " elements differ\n" << first.str();
}

TEST(CudaNumerics, Fp8BlockRoundMatchesRoundGemmInput) {
    NM_SKIP_WITHOUT_GPU();
    std::mt19937 rng(2);
    for (int64_t K : {4096, 7168, 1024, 512})   // V4-Flash D, V4-Pro D, q_lora, the tiny model's
        for (int64_t rows : {1, 3, 16}) {
            const std::vector<uint16_t> x = random_blocks(rng, rows, K, 128);
            // The twin of the whole call: ops::round_gemm_input (per row fp8_block_qdq in 128-blocks).
            V f(x.size());
            for (size_t i = 0; i < x.size(); ++i) f[i] = bf16_to_f32(x[i]);
            V g = f;
            ops::round_gemm_input(Numerics::official, g.data(), rows, K);
            V h = f;
            for (int64_t r = 0; r < rows; ++r) ops::fp8_block_qdq(h.data() + r * K, K, 128);
            ASSERT_EQ(0, std::memcmp(g.data(), h.data(), g.size() * 4)) << "round_gemm_input is fp8_block_qdq per row";
            check_fp8(x, rows, K, K, 128, "gemm input");
        }
}

TEST(CudaNumerics, Fp8BlockRoundMatchesRoundKvLatent) {
    NM_SKIP_WITHOUT_GPU();
    std::mt19937 rng(3);
    // (hd, rope): V4 kv rows (512, 64), the tiny model's (64, 16): width hd − rope in 64-blocks.
    for (auto [hd, rope] : {std::pair<int64_t, int64_t>{512, 64}, {64, 16}})
        for (int64_t rows : {1, 3, 16, 129}) {
            const std::vector<uint16_t> x = random_blocks(rng, rows, hd, 64);
            V f(x.size());
            for (size_t i = 0; i < x.size(); ++i) f[i] = bf16_to_f32(x[i]);
            V g = f;
            ops::round_kv_latent(Numerics::official, g.data(), rows, hd, rope);
            V h = f;
            for (int64_t r = 0; r < rows; ++r) ops::fp8_block_qdq(h.data() + r * hd, hd - rope, 64);
            ASSERT_EQ(0, std::memcmp(g.data(), h.data(), g.size() * 4)) << "round_kv_latent is fp8_block_qdq per row";
            check_fp8(x, rows, hd, hd - rope, 64, "kv latent");   // also: dims [hd − rope, hd) untouched
        }
}

TEST(CudaNumerics, Fp8BlockRoundOddShapes) {
    NM_SKIP_WITHOUT_GPU();
    std::mt19937 rng(4);
    struct Case {
        int64_t rows, ld, width, block, off;
    };
    const Case cases[] = {
        {3, 300, 300, 128, 0},     // a partial last block of 44
        {16, 320, 300, 128, 0},    // ld > width: the tail of each row untouched
        {3, 301, 300, 128, 0},     // odd ld: scalar loads
        {3, 4096, 4096, 128, 1},   // x off alignment: scalar loads
        {5, 448, 448, 64, 1},
        {2, 512, 512, 256, 0},     // 16-byte vectors, one per lane
        {2, 512, 500, 256, 0},     // ... with a partial vector at the end
        {3, 3000, 2999, 1000, 0},  // a lane loops over its block
        {4, 96, 96, 32, 0},
        {3, 50, 49, 7, 0},
        {2, 17, 17, 1, 0},         // every element its own block
        {1, 7168, 7168, 128, 0},
    };
    for (const Case& c : cases) check_fp8(random_blocks(rng, c.rows, c.ld, c.block), c.rows, c.ld, c.width, c.block,
                                          "odd", c.off);
}

TEST(CudaNumerics, Fp8BlockRoundHardValues) {
    NM_SKIP_WITHOUT_GPU();
    const float m10 = std::ldexp(1.0f, -10), m11 = std::ldexp(1.0f, -11), m15 = std::ldexp(1.0f, -15);
    // Each entry: the leading values of one block (the rest of the block is 0). All bf16-exact.
    const std::vector<V> blocks = {
        // amax 448, s = 1: e4m3 ties to even (1.0625 -> 1, 1.1875 -> 1.25, 17 -> 16, 19 -> 20,
        // 304 -> 320), subnormal ties (2^-10 -> 0, 3·2^-10 -> 2^-8, 5·2^-11 -> 2^-9), −0.
        {448.0f, 1.0625f, 1.1875f, 17.0f, -19.0f, -304.0f, m10, 3 * m10, -5 * m11, -0.0f, 440.0f, 436.0f},
        // amax 450 > 448: s = 2 (450 -> 225 -> 224 -> 448), the top saturates back to 448.
        {450.0f, -450.0f, 1.0f, 3.0f, 0.5f},
        // A zero block, signs kept.
        {0.0f, -0.0f, 0.0f, -0.0f},
        // amax below the 1e-4 clamp: s = 2^-22.
        {bf16r(1e-5f), bf16r(-2.5e-6f), bf16r(7.6e-6f)},
        // amax at the clamp (bf16 neighbours of 1e-4 on both sides).
        {bf16r(1e-4f), -bf16_to_f32(static_cast<uint16_t>(f32_to_bf16(1e-4f) + 1)), bf16r(3e-5f)},
        {bf16_to_f32(static_cast<uint16_t>(f32_to_bf16(1e-4f) - 1)), bf16r(5e-5f)},
        // amax 56 = 448·2^-3 exactly (s = 2^-3), and 56.25 just past it (s = 2^-2: 225 -> 224).
        {56.0f, 1.0f, 0.0625f},
        {56.25f, 1.0f, 0.0625f, -3.5f},
        // amax 14 (s = 2^-5): x / s in the e4m3 subnormal range with ties (3·2^-10 -> 2^-8).
        {14.0f, 3 * m10 * std::ldexp(1.0f, -5), m15, -5 * m15, 7 * m15},
        // bf16-subnormal inputs in a tiny block (x / s = 2^-108 and less: ±0).
        {std::ldexp(1.0f, -130), -std::ldexp(1.0f, -133), std::ldexp(1.0f, -126)},
        // −0 in a live block, and the largest bf16 below 448 / above.
        {-0.0f, 446.0f, 450.0f, -0.0f, bf16r(0.001f)},
    };
    for (int64_t block : {128, 64}) {
        const int64_t nb = static_cast<int64_t>(blocks.size());
        for (int64_t width : {nb * block, nb * block - block / 2}) {   // whole blocks; a partial last one
            const int64_t rows = 2;
            std::vector<uint16_t> x(static_cast<size_t>(rows * width), 0);
            for (int64_t r = 0; r < rows; ++r)
                for (int64_t b = 0; b < nb; ++b) {
                    const V& vals = blocks[static_cast<size_t>((b + r) % nb)];   // row 1: blocks rotated
                    for (size_t i = 0; i < vals.size(); ++i) {
                        const int64_t at = b * block + static_cast<int64_t>(i) * (r == 0 ? 1 : 3);   // spread in row 1
                        if (at < width && at < (b + 1) * block) {
                            ASSERT_EQ(bf16r(vals[i]), vals[i]) << "hard value " << vals[i] << " is not bf16";
                            x[static_cast<size_t>(r * width + at)] = f32_to_bf16(vals[i]);
                        }
                    }
                }
            check_fp8(x, rows, width, width, block, "hard values");
        }
    }
}

// quantize_gemm_input / fp8_block_round_q against ops::round_gemm_input: the codes (kernel order)
// times the scales are the twin's rounded values bit for bit, every scale is the block's power of
// two, and fp8_block_round_q also leaves fp8_block_round's result in x. A rounded input requantizes
// to the same values (what the runner relies on when it quantizes an already rounded buffer).
void check_quantize(const std::vector<uint16_t>& x, int64_t rows, int64_t K, const std::string& what) {
    SCOPED_TRACE(str(what, ": rows ", rows, " K ", K));
    V f(x.size());
    for (size_t i = 0; i < x.size(); ++i) f[i] = bf16_to_f32(x[i]);
    V want = f;
    ops::round_gemm_input(Numerics::official, want.data(), rows, K);
    const int64_t nblk = K / 128;
    auto check = [&](const std::vector<uint8_t>& q, const std::vector<float>& s, const V& input, const char* how) {
        size_t bad = 0;
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t b = 0; b < nblk; ++b) {
                const float sc = s[static_cast<size_t>(r * nblk + b)];
                int e = 0;
                ASSERT_EQ(std::frexp(sc, &e), 0.5f) << how << ": scale " << sc << " is not a power of two";
                float amax = 0;
                for (int64_t k = 0; k < 128; ++k) amax = std::max(amax, std::fabs(input[size_t(r * K + b * 128 + k)]));
                ASSERT_EQ(sc, std::ldexp(1.0f, static_cast<int>(e8m0_ceil(std::max(amax, 1e-4f) / 448.0f)) - 127))
                    << how << ": block (" << r << ", " << b << ") amax " << amax;
                for (int64_t k = 0; k < 128; ++k) {
                    const int64_t i = r * K + b * 128 + k;
                    // kernel order: element k of a word sits at byte {0, 2, 1, 3}[k % 4]
                    const int64_t at = (i & ~int64_t{3}) + (k % 4 == 1 ? 2 : k % 4 == 2 ? 1 : k % 4);
                    const float v = e4m3_to_f32(q[static_cast<size_t>(at)]) * sc;
                    if (std::memcmp(&v, &want[static_cast<size_t>(i)], 4) != 0 && bad++ < 6)
                        ADD_FAILURE() << how << ": [" << r << ", " << b * 128 + k << "] q·s " << v << " want "
                                      << want[static_cast<size_t>(i)];
                }
            }
        EXPECT_EQ(bad, 0u) << how;
    };
    DeviceArray<uint16_t> d(x);
    DeviceArray<uint8_t> q(x.size());
    DeviceArray<float> s(static_cast<size_t>(rows * nblk));
    cuda::quantize_gemm_input(d.data(), rows, K, q.data(), s.data(), nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    check(q.download(), s.download(), f, "quantize_gemm_input");
    ASSERT_EQ(d.download(), x) << "quantize_gemm_input wrote x";
    q.fill(0);
    cuda::fp8_block_round_q(d.data(), rows, K, q.data(), s.data(), nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    check(q.download(), s.download(), f, "fp8_block_round_q");
    const std::vector<uint16_t> rounded = d.download();
    for (size_t i = 0; i < x.size(); ++i)
        ASSERT_EQ(rounded[i], f32_to_bf16(want[i])) << "fp8_block_round_q's x at " << i;
    V fr(x.size());
    for (size_t i = 0; i < x.size(); ++i) fr[i] = bf16_to_f32(rounded[i]);
    cuda::quantize_gemm_input(d.data(), rows, K, q.data(), s.data(), nullptr);   // requantize the rounded x
    CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<uint8_t> q2 = q.download();
    const std::vector<float> s2 = s.download();
    size_t bad = 0;
    for (int64_t i = 0; i < rows * K; ++i) {
        const int64_t k = i % 4;
        const int64_t at = (i & ~int64_t{3}) + (k == 1 ? 2 : k == 2 ? 1 : k);
        const float v = e4m3_to_f32(q2[static_cast<size_t>(at)]) * s2[static_cast<size_t>(i / 128)];
        bad += std::memcmp(&v, &want[static_cast<size_t>(i)], 4) != 0;
    }
    EXPECT_EQ(bad, 0u) << "a rounded input requantizes to itself";

    // ra_order (the register-A W4A8 tile's input): the same words and scales as kernel order, word w
    // of each 128-block at word position w4a8::ra_word(w), from both functions (and the same x).
    for (int round_too = 0; round_too < 2; ++round_too) {
        const char* how = round_too ? "fp8_block_round_q, ra_order" : "quantize_gemm_input, ra_order";
        std::vector<uint8_t> qs[2];
        std::vector<float> ss[2];
        std::vector<uint16_t> xs[2];
        for (int ra = 0; ra < 2; ++ra) {
            DeviceArray<uint16_t> dr(x);
            DeviceArray<uint8_t> qr(x.size());
            DeviceArray<float> sr(static_cast<size_t>(rows * nblk));
            qr.fill(0);
            if (round_too) cuda::fp8_block_round_q(dr.data(), rows, K, qr.data(), sr.data(), nullptr, ra != 0);
            else cuda::quantize_gemm_input(dr.data(), rows, K, qr.data(), sr.data(), nullptr, ra != 0);
            CUDA_CHECK(cudaDeviceSynchronize());
            qs[ra] = qr.download();
            ss[ra] = sr.download();
            xs[ra] = dr.download();
        }
        ASSERT_EQ(ss[1], ss[0]) << how << ": scales";
        ASSERT_EQ(xs[1], xs[0]) << how << ": x";
        size_t moved = 0;
        for (int64_t blk = 0; blk < rows * nblk; ++blk)
            for (int w = 0; w < 32; ++w)
                for (int b = 0; b < 4; ++b)
                    moved += qs[1][static_cast<size_t>(blk * 128 + cuda::w4a8::ra_word(w) * 4 + b)] !=
                             qs[0][static_cast<size_t>(blk * 128 + w * 4 + b)];
        EXPECT_EQ(moved, 0u) << how << ": bytes not at their register-A place";
    }
}

TEST(CudaNumerics, QuantizeGemmInputIsTheRounding) {
    NM_SKIP_WITHOUT_GPU();
    std::mt19937 rng(9);
    for (int64_t K : {4096, 7168, 1024, 128})
        for (int64_t rows : {1, 3, 16}) check_quantize(random_blocks(rng, rows, K, 128), rows, K, "random blocks");
    // Hard blocks: e4m3 ties, zeros with −0, amax at and below the 1e-4 clamp, just past 448·2^k.
    const float m10 = std::ldexp(1.0f, -10);
    const std::vector<V> blocks = {{448.0f, 1.0625f, 1.1875f, 17.0f, -19.0f, -304.0f, m10, 3 * m10, -0.0f},
                                   {450.0f, -450.0f, 1.0f, 3.0f, 0.5f},
                                   {0.0f, -0.0f},
                                   {bf16r(1e-5f), bf16r(-2.5e-6f)},
                                   {bf16r(1e-4f), bf16r(3e-5f)},
                                   {56.25f, 1.0f, 0.0625f, -3.5f},
                                   {std::ldexp(1.0f, -130), -std::ldexp(1.0f, -133)}};
    const int64_t K = 128 * static_cast<int64_t>(blocks.size());
    std::vector<uint16_t> x(static_cast<size_t>(K), 0);
    for (size_t b = 0; b < blocks.size(); ++b)
        for (size_t i = 0; i < blocks[b].size(); ++i) x[b * 128 + i * 5] = f32_to_bf16(blocks[b][i]);
    check_quantize(x, 1, K, "hard values");
    EXPECT_THROW(cuda::quantize_gemm_input(nullptr, 1, 100, nullptr, nullptr, nullptr), Error);   // K % 128
}

// ---------------------------------------------------------------------------- indexer q / k

void check_indexer(const std::vector<uint16_t>& x, int64_t rows, int64_t hd, const std::string& what) {
    SCOPED_TRACE(str(what, ": rows ", rows, " hd ", hd));
    V f(x.size());
    for (size_t i = 0; i < x.size(); ++i) f[i] = bf16_to_f32(x[i]);
    ops::round_indexer_qk(Numerics::official, f.data(), rows, hd);
    std::vector<uint16_t> want(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
        ASSERT_EQ(bf16r(f[i]), f[i]) << "twin result not bf16";
        want[i] = f32_to_bf16(f[i]);
    }
    DeviceArray<uint16_t> d(x);
    cuda::round_indexer_qk(d.data(), rows, hd, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<uint16_t> got = d.download();
    size_t bad = 0;
    std::ostringstream first;
    for (size_t i = 0; i < x.size(); ++i)
        if (got[i] != want[i]) {
            if (bad < 8)
                first << "  [row " << static_cast<int64_t>(i) / hd << ", " << static_cast<int64_t>(i) % hd << "]: got "
                      << bf16_to_f32(got[i]) << " (0x" << std::hex << got[i] << "), want " << std::dec
                      << bf16_to_f32(want[i]) << " (0x" << std::hex << want[i] << std::dec << ")\n";
            ++bad;
        }
    EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << x.size() << " elements differ\n" << first.str();
}

TEST(CudaNumerics, IndexerQkMatchesRoundIndexerQk) {
    NM_SKIP_WITHOUT_GPU();
    std::mt19937 rng(5);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::uniform_real_distribution<float> mag(-30.0f, 30.0f);
    for (int64_t hd : {128, 64, 32, 16, 8, 2, 1})
        for (int64_t rows : {1, 3, 16, 129}) {
            std::vector<uint16_t> x(static_cast<size_t>(rows * hd));
            for (int64_t r = 0; r < rows; ++r) {
                const float m = std::exp2(mag(rng));
                for (int64_t i = 0; i < hd; ++i) x[static_cast<size_t>(r * hd + i)] = f32_to_bf16(nd(rng) * m);
            }
            check_indexer(x, rows, hd, "random");
        }
    // Crafted rows. With x = a·e0 + b·e1 the rotation is (a + b, a − b, a + b, ...) / sqrt(hd):
    // for hd = 64 that is exactly (a ± b) / 8, so a + b = 48 (6, the block's max: s = 1) and a − b
    // ∈ {2, 6, 10, 20, 28, 40} put the odd outputs on the e2m1 ties 0.25, 0.75, 1.25, 2.5, 3.5, 5.
    // Then: zero and −0 rows, one-hot rows, rows under the 6·2^-126 clamp (f32 subnormals after the
    // rotation), a huge row, alternating signs. The same rows for hd = 128 and 32 (other values).
    for (int64_t hd : {64, 128, 32}) {
        std::vector<V> rows_v;
        for (float d : {2.0f, 6.0f, 10.0f, 20.0f, 28.0f, 40.0f}) {
            V r(static_cast<size_t>(hd), 0.0f);
            r[0] = (48.0f + d) / 2;
            r[1] = (48.0f - d) / 2;
            rows_v.push_back(r);
            for (float& v : r) v = -v;
            rows_v.push_back(r);
        }
        rows_v.push_back(V(static_cast<size_t>(hd), 0.0f));
        rows_v.push_back(V(static_cast<size_t>(hd), -0.0f));
        for (int64_t k : {int64_t{0}, int64_t{5}, hd - 1}) {
            V r(static_cast<size_t>(hd), 0.0f);
            r[static_cast<size_t>(k)] = 8.0f;
            rows_v.push_back(r);
        }
        V tiny(static_cast<size_t>(hd)), huge(static_cast<size_t>(hd)), alt(static_cast<size_t>(hd));
        for (int64_t i = 0; i < hd; ++i) {
            tiny[static_cast<size_t>(i)] = std::ldexp(static_cast<float>((i * 37) % 11) - 5.0f, -130);
            huge[static_cast<size_t>(i)] = std::ldexp(static_cast<float>((i * 13) % 7) + 1.0f, 100);
            alt[static_cast<size_t>(i)] = (i & 1) ? -1.5f : 1.5f;
        }
        rows_v.push_back(tiny);
        rows_v.push_back(huge);
        rows_v.push_back(alt);
        std::vector<uint16_t> x;
        for (const V& r : rows_v)
            for (float v : r) x.push_back(f32_to_bf16(v));
        check_indexer(x, static_cast<int64_t>(rows_v.size()), hd, "crafted");
    }
}

// ---------------------------------------------------------------------------- round_bf16_inplace

TEST(CudaNumerics, RoundBf16InplaceMatchesRoundBf16) {
    NM_SKIP_WITHOUT_GPU();
    std::mt19937 rng(6);
    V x = random_finite(rng, 4099);
    const V bnd = boundary_values();
    std::copy(bnd.begin(), bnd.begin() + std::min<size_t>(bnd.size(), 2000), x.begin());
    for (int64_t off : {0, 1}) {
        SCOPED_TRACE(str("off ", off));
        V want(x.begin() + off, x.end());
        ops::round_bf16(Numerics::official, want.data(), static_cast<int64_t>(want.size()));
        DeviceArray<float> d(x);
        cuda::round_bf16_inplace(d.data() + off, static_cast<int64_t>(want.size()), nullptr);
        CUDA_CHECK(cudaDeviceSynchronize());
        const V got = d.download();
        size_t bad = 0;
        for (size_t i = 0; i < want.size(); ++i) bad += bits(got[i + static_cast<size_t>(off)]) != bits(want[i]);
        EXPECT_EQ(bad, 0u);
        if (off == 1) {
            EXPECT_EQ(bits(got[0]), bits(x[0])) << "wrote before x";
        }
    }
}

#else  // !MEGAMOE_HAVE_CUDA

TEST(CudaNumerics, SkippedWithoutCuda) { GTEST_SKIP() << "built without CUDA"; }

#endif

}  // namespace
}  // namespace megamoe
