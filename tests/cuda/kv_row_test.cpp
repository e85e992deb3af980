// kv_row_test.cpp — the KV rows' storage formats (cuda/kv_row.h) and their host codec, on the CPU:
// the byte layout, which shapes take fp8 rows, and that an fp8 row holds exactly what
// ops::round_kv_latent leaves in a row (decode(encode(x)) = round_kv_latent(x), and rows it
// already rounded come back unchanged). The device encoders are checked against this codec byte
// for byte in compressor_test.cpp, the attention's decoder in attention_test.cpp.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/kv_row.h"
#include "io/formats.h"
#include "ref/ops.h"

namespace megamoe {
namespace {

using cuda::KvRow;

TEST(KvRow, Layout) {
    const KvRow v4{512, 64, true};   // V4-Flash / V4-Pro: 448 e4m3 + 64 bf16 + 7 scale bytes (16)
    EXPECT_EQ(v4.nope(), 448);
    EXPECT_EQ(v4.blocks(), 7);
    EXPECT_EQ(v4.rope_offset(), 448);
    EXPECT_EQ(v4.scale_offset(), 576);
    EXPECT_EQ(v4.bytes(), 592);
    EXPECT_EQ((KvRow{512, 64, false}.bytes()), 1024);
    EXPECT_EQ((KvRow{64, 16, true}.bytes()), 48 + 32 + 16);   // the tiny goldens: one block of 48
    EXPECT_EQ((KvRow{64, 16, true}.blocks()), 1);
    EXPECT_EQ((KvRow{128, 64, true}.bytes()), 64 + 128 + 16);
    EXPECT_TRUE(KvRow::fp8_fits(512, 64));
    EXPECT_TRUE(KvRow::fp8_fits(64, 16));
    EXPECT_TRUE(KvRow::fp8_fits(128, 0));
    EXPECT_FALSE(KvRow::fp8_fits(64, 12)) << "rope dims not a multiple of 8";
    EXPECT_FALSE(KvRow::fp8_fits(600, 64)) << "nope 536 not a multiple of 16";
    EXPECT_FALSE(KvRow::fp8_fits(16, 16)) << "no nope dims";
    EXPECT_FALSE(KvRow::fp8_fits(2048, 0)) << "32 scale blocks do not fit 16 bytes";
}

// Rows of hd values with hard cases per 64-block: all zero, tiny (amax below the 1e-4 clamp),
// values at and past the e4m3 range of their scale, e4m3 subnormals, ties between e4m3 codes,
// wide magnitudes; bf16 values (what the GPU stores).
std::vector<float> hard_rows(std::mt19937& rng, int64_t n, int64_t hd) {
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> v(static_cast<size_t>(n * hd));
    for (int64_t r = 0; r < n; ++r)
        for (int64_t i = 0; i < hd; ++i) {
            const int64_t blk = i / 64;
            float x = 0;
            switch ((r + blk) % 7) {
                case 0: x = 0.0f; break;
                case 1: x = 3e-6f * nd(rng); break;                                         // under the clamp
                case 2: x = (i % 64 == 0) ? 448.0f : std::ldexp(nd(rng), -12); break;      // subnormal codes
                case 3: x = std::ldexp(1.0f + 0.0625f * static_cast<float>(rng() % 16), static_cast<int>(rng() % 9) - 4) *
                            (rng() % 2 ? 1.0f : -1.0f);
                    break;                                                                 // e4m3 ties and grid
                case 4: x = std::ldexp(nd(rng), static_cast<int>(rng() % 40) - 20); break;  // wide magnitudes
                case 5: x = -0.0f; break;
                default: x = nd(rng) * 3.0f;
            }
            v[static_cast<size_t>(r * hd + i)] = bf16_to_f32(f32_to_bf16(x));
        }
    return v;
}

TEST(KvRow, Fp8RowHoldsRoundKvLatent) {
    std::mt19937 rng(7);
    const int64_t n = 64;
    for (const auto& [hd, rope] : {std::pair{512, 64}, std::pair{64, 16}, std::pair{128, 64}, std::pair{80, 0},
                                   std::pair{48, 16}}) {
        SCOPED_TRACE(testing::Message() << "hd " << hd << " rope " << rope);
        const KvRow f{hd, rope, true};
        ASSERT_TRUE(KvRow::fp8_fits(hd, rope));
        const std::vector<float> x = hard_rows(rng, n, hd);
        std::vector<float> rounded = x;
        ops::round_kv_latent(Numerics::official, rounded.data(), n, hd, rope);
        std::vector<uint8_t> bytes(static_cast<size_t>(f.bytes()));
        std::vector<float> back(static_cast<size_t>(hd)), again(static_cast<size_t>(hd));
        int64_t changed = 0;
        for (int64_t r = 0; r < n; ++r) {
            const float* xr = x.data() + r * hd;
            const float* want = rounded.data() + r * hd;
            cuda::kv_row_encode(f, xr, bytes.data());
            cuda::kv_row_decode(f, bytes.data(), back.data());
            for (int64_t i = 0; i < hd; ++i) {
                ASSERT_EQ(std::memcmp(&back[static_cast<size_t>(i)], &want[i], 4), 0)
                    << "row " << r << " dim " << i << ": decoded " << back[static_cast<size_t>(i)] << ", round_kv_latent "
                    << want[i];
                changed += back[static_cast<size_t>(i)] != xr[i] ? 1 : 0;
            }
            for (int32_t b = f.blocks(); b < KvRow::kScaleBytes; ++b) EXPECT_EQ(bytes[static_cast<size_t>(f.scale_offset() + b)], 0);
            // A row round_kv_latent already rounded is stored without loss (the scale may be a
            // smaller power of two than the first rounding's; the values are the same).
            cuda::kv_row_encode(f, want, bytes.data());
            cuda::kv_row_decode(f, bytes.data(), again.data());
            for (int64_t i = 0; i < hd; ++i)
                ASSERT_EQ(std::memcmp(&again[static_cast<size_t>(i)], &want[i], 4), 0) << "row " << r << " dim " << i;
        }
        EXPECT_GT(changed, 0) << "the hard rows must exercise the rounding";
    }
}

TEST(KvRow, Bf16RowIsItsValues) {
    std::mt19937 rng(8);
    const KvRow f{64, 16, false};
    const std::vector<float> x = hard_rows(rng, 4, 64);
    std::vector<uint8_t> bytes(static_cast<size_t>(f.bytes()));
    std::vector<float> back(64);
    for (int r = 0; r < 4; ++r) {
        cuda::kv_row_encode(f, x.data() + r * 64, bytes.data());
        cuda::kv_row_decode(f, bytes.data(), back.data());
        for (int i = 0; i < 64; ++i) EXPECT_EQ(std::memcmp(&back[static_cast<size_t>(i)], &x[static_cast<size_t>(r * 64 + i)], 4), 0);
    }
}

}  // namespace
}  // namespace megamoe
