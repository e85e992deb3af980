// router_test.cpp — the GPU MoE routers (src/cuda/router.h) against ops::route_score and
// ops::route_hash.
//
// The twins take the router input x and the gate; the GPU takes the gate's logits. The test
// computes the logits with ops::linear on the same gate and x — the very call the twins make
// (router_scores in ops_moe.cpp) — so both sides start from the same f32 logits. The gate's input
// width never reaches the kernel, so it is kept small (64); the logits are spread over ~N(0, 8²)
// so that both branches of sqrt(softplus) (the v > 20 threshold, and large negative v) occur, and
// the bias (~N(0, 0.5²)) is large enough to change the selection.
//
// Tolerances: ids exactly (selection and order). Weights: s = sqrt(log1p(exp(v))) uses expf /
// log1pf / sqrtf within 2 ulp of glibc's, the sum and the division are the twin's f32 operations
// in its order, so a weight is within ~10 ulp of the twin's: relative 2e-6 (~32 ulp). A random
// logit vector can put two biased scores within a few ulp of each other, where that difference
// could legitimately flip the order; such tokens (the gap between consecutive biased scores among
// the first k + 1 is nonzero but below 1e-5) are not compared, and must be rare. Exact ties are
// compared (they must go to the lower id on both sides).
#include <gtest/gtest.h>

#include "cuda/router.h"

#ifdef MEGAMOE_HAVE_CUDA

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/common.h"
#include "cuda/buffer.h"
#include "cuda/linear.h"
#include "io/config.h"
#include "io/formats.h"
#include "io/weights.h"
#include "ref/ops.h"
#include "rowwise_test_util.h"
#include "test_util.h"

namespace megamoe {
namespace {

using cuda::DeviceArray;
using test::rw::expect_bits_equal;
using test::rw::fake_ptr;
using test::rw::normal_rows;
using test::rw::to_bf16;

constexpr int64_t kGateIn = 64;
constexpr double kWeightRel = 2e-6;

struct Router {
    int64_t T, E, k;
    float scale;
    std::vector<uint16_t> gate;     // bf16 [E, kGateIn]
    std::vector<float> bias, x;     // [E], [T, kGateIn]
    std::vector<int64_t> table;     // [V, k] (hash)
    std::vector<int32_t> tokens;    // [T]    (hash)
    MoeWeights m;
    ModelConfig c;

    Router(int64_t T_, int64_t E_, int64_t k_, float scale_, uint32_t seed) : T(T_), E(E_), k(k_), scale(scale_) {
        gate = to_bf16(normal_rows(E, kGateIn, seed, 1.0f));
        x = normal_rows(T, kGateIn, seed + 1, 1.0f);   // logits ~ N(0, 64) = N(0, 8²)
        bias = normal_rows(1, E, seed + 2, 0.5f);
        c.n_routed_experts = E;
        c.num_experts_per_tok = k;
        c.routed_scaling_factor = scale;
    }
    // Call after changing gate / bias / table (the tensors view these vectors).
    void bind() {
        m.gate.format = LinearFormat::bf16;
        m.gate.out = E;
        m.gate.in = kGateIn;
        m.gate.weight = Tensor(gate.data(), DType::bf16, {E, kGateIn});
        m.bias = Tensor(bias.data(), DType::f32, {E});
        if (!table.empty()) m.tid2eid = Tensor(table.data(), DType::i64, {static_cast<int64_t>(table.size()) / k, k});
    }
    std::vector<float> logits() {
        bind();
        std::vector<float> l(static_cast<size_t>(T * E));
        ops::linear(m.gate, x.data(), T, l.data());
        return l;
    }
};

struct Routed {
    std::vector<int32_t> ids;
    std::vector<float> wts;
};

Routed gpu_route(Router& r, bool hash, cudaStream_t stream = nullptr, const std::vector<int32_t>& slots = {},
                 int32_t pad_slot = -1) {
    DeviceArray<float> d_logits(r.logits()), d_bias(r.bias);
    std::vector<int32_t> table32(r.table.begin(), r.table.end());
    DeviceArray<int32_t> d_table(hash ? table32 : std::vector<int32_t>{0});
    DeviceArray<int32_t> d_tokens(hash ? r.tokens : std::vector<int32_t>{0});
    DeviceArray<int32_t> d_ids(static_cast<size_t>(r.T * r.k));
    DeviceArray<float> d_wts(static_cast<size_t>(r.T * r.k));
    d_ids.fill(0xFF);
    d_wts.fill(0xFF);
    DeviceArray<int32_t> d_slots(slots.empty() ? std::vector<int32_t>{0} : slots);
    cuda::route(d_logits.data(), r.T, r.E, r.k, hash ? nullptr : d_bias.data(), hash ? d_table.data() : nullptr,
                hash ? d_tokens.data() : nullptr, r.scale, d_ids.data(), d_wts.data(), stream,
                slots.empty() ? nullptr : d_slots.data(), pad_slot);
    return {d_ids.download(), d_wts.download()};
}

Routed cpu_route(Router& r, bool hash) {
    r.bind();
    Routed o{std::vector<int32_t>(static_cast<size_t>(r.T * r.k)), std::vector<float>(static_cast<size_t>(r.T * r.k))};
    if (hash) ops::route_hash(r.m, r.c, r.x.data(), r.tokens.data(), r.T, o.ids.data(), o.wts.data());
    else ops::route_score(r.m, r.c, r.x.data(), r.T, o.ids.data(), o.wts.data());
    return o;
}

// Tokens whose biased scores have a nonzero gap below 1e-5 among the first k + 1 (see the header).
std::vector<bool> near_ties(Router& r) {
    const std::vector<float> l = r.logits();
    std::vector<bool> near(static_cast<size_t>(r.T), false);
    for (int64_t t = 0; t < r.T; ++t) {
        std::vector<float> b(static_cast<size_t>(r.E));
        for (int64_t e = 0; e < r.E; ++e) {
            const float v = l[static_cast<size_t>(t * r.E + e)];
            b[static_cast<size_t>(e)] = std::sqrt(v > 20.0f ? v : std::log1p(std::exp(v))) + r.bias[static_cast<size_t>(e)];
        }
        std::sort(b.begin(), b.end(), std::greater<float>());
        for (int64_t i = 0; i < std::min(r.k, r.E - 1); ++i) {
            const float gap = b[static_cast<size_t>(i)] - b[static_cast<size_t>(i + 1)];
            if (gap > 0 && gap < 1e-5f * std::max(1.0f, std::fabs(b[static_cast<size_t>(i)]))) near[static_cast<size_t>(t)] = true;
        }
    }
    return near;
}

void compare(Router& r, const Routed& got, const Routed& want, const std::vector<bool>& skip) {
    size_t bad = 0, skipped = 0;
    std::string first;
    for (int64_t t = 0; t < r.T; ++t) {
        if (skip[static_cast<size_t>(t)]) {
            ++skipped;
            continue;
        }
        for (int64_t i = 0; i < r.k; ++i) {
            const size_t j = static_cast<size_t>(t * r.k + i);
            const bool ok = got.ids[j] == want.ids[j] &&
                            std::fabs(static_cast<double>(got.wts[j]) - want.wts[j]) <= kWeightRel * std::fabs(want.wts[j]);
            if (!ok) {
                if (bad < 5)
                    first += str("  t=", t, " slot ", i, ": got (", got.ids[j], ", ", got.wts[j], ") want (", want.ids[j],
                                 ", ", want.wts[j], ")\n");
                ++bad;
            }
        }
    }
    EXPECT_EQ(bad, 0u) << bad << " slots differ\n" << first;
    EXPECT_LE(skipped * 10, static_cast<size_t>(r.T)) << skipped << " of " << r.T << " tokens had near-ties";
}

void check_score(int64_t T, int64_t E, int64_t k, float scale, uint32_t seed) {
    SCOPED_TRACE(str("score T=", T, " E=", E, " k=", k));
    Router r(T, E, k, scale, seed);
    const Routed want = cpu_route(r, false);
    const Routed got = gpu_route(r, false);
    compare(r, got, want, near_ties(r));
}

TEST(CudaRouter, ScoreRouterMatchesRouteScore) {
    RW_SKIP_WITHOUT_GPU();
    for (int64_t T : {1, 3, 17, 129}) {
        check_score(T, 256, 6, 1.5f, 200);    // V4-Flash
        check_score(T, 384, 6, 2.5f, 201);    // V4-Pro
        check_score(T, 16, 4, 1.0f, 202);     // tiny model
    }
    check_score(33, 1024, 16, 1.0f, 203);     // the limits
    check_score(17, 37, 5, 1.0f, 204);        // E not a multiple of 32
    check_score(3, 1, 1, 1.0f, 205);
    check_score(3, 6, 6, 1.0f, 206);          // k = E: everything, sorted
}

TEST(CudaRouter, TiesGoToTheLowerExpertId) {
    RW_SKIP_WITHOUT_GPU();
    // Experts 2, 5, 9, 14 get identical gate rows and the same large bias: identical biased scores
    // above all others. k = 4 takes all four in id order; k = 3 the three lowest.
    for (int64_t k : {4, 3}) {
        SCOPED_TRACE(str("k=", k));
        Router r(5, 16, k, 1.0f, 210);
        for (int64_t e : {5, 9, 14})
            std::copy(r.gate.begin() + 2 * kGateIn, r.gate.begin() + 3 * kGateIn, r.gate.begin() + e * kGateIn);
        for (int64_t e : {2, 5, 9, 14}) r.bias[static_cast<size_t>(e)] = 100.0f;
        const Routed want = cpu_route(r, false), got = gpu_route(r, false);
        compare(r, got, want, std::vector<bool>(static_cast<size_t>(r.T), false));
        for (int64_t t = 0; t < r.T; ++t) {
            EXPECT_EQ(got.ids[static_cast<size_t>(t * k)], 2);
            EXPECT_EQ(got.ids[static_cast<size_t>(t * k + 1)], 5);
            EXPECT_EQ(got.ids[static_cast<size_t>(t * k + 2)], 9);
        }
    }
    // Everything tied: all rows and biases equal, so ids are 0 .. k-1.
    Router r(3, 256, 6, 1.5f, 211);
    for (int64_t e = 1; e < r.E; ++e) std::copy(r.gate.begin(), r.gate.begin() + kGateIn, r.gate.begin() + e * kGateIn);
    std::fill(r.bias.begin(), r.bias.end(), 0.25f);
    const Routed want = cpu_route(r, false), got = gpu_route(r, false);
    compare(r, got, want, std::vector<bool>(static_cast<size_t>(r.T), false));
    for (int64_t t = 0; t < r.T; ++t)
        for (int64_t i = 0; i < r.k; ++i) EXPECT_EQ(got.ids[static_cast<size_t>(t * r.k + i)], i);
}

void check_hash(int64_t T, int64_t E, int64_t k, float scale, int64_t V, uint32_t seed) {
    SCOPED_TRACE(str("hash T=", T, " E=", E, " k=", k));
    Router r(T, E, k, scale, seed);
    std::mt19937 rng(seed + 5);
    r.table.resize(static_cast<size_t>(V * k));
    for (auto& e : r.table) e = static_cast<int64_t>(rng() % E);
    r.table[0] = E - 1;
    r.tokens.resize(static_cast<size_t>(T));
    for (auto& t : r.tokens) t = static_cast<int32_t>(rng() % V);
    r.tokens[0] = 0;
    const Routed want = cpu_route(r, true), got = gpu_route(r, true);
    compare(r, got, want, std::vector<bool>(static_cast<size_t>(r.T), false));   // no selection: no near-ties
}

TEST(CudaRouter, HashRouterMatchesRouteHash) {
    RW_SKIP_WITHOUT_GPU();
    for (int64_t T : {1, 3, 17, 129}) {
        check_hash(T, 256, 6, 1.5f, 1000, 220);
        check_hash(T, 384, 6, 2.5f, 1000, 221);
    }
    check_hash(17, 16, 4, 1.0f, 100, 222);
    check_hash(5, 1024, 16, 1.0f, 50, 223);
}

// Graph padding: tokens whose slot is the padding slot get token 0's ids and weights (both
// routers), every other token what it gets without the slots, bit for bit.
TEST(CudaRouter, PaddingTokensAreRoutedAsTokenZero) {
    RW_SKIP_WITHOUT_GPU();
    for (const bool hash : {false, true}) {
        SCOPED_TRACE(hash ? "hash" : "score");
        const int64_t T = 8, k = 6, E = 256, V = 1000;
        Router r(T, E, k, 1.5f, 240);
        std::mt19937 rng(241);
        if (hash) {
            r.table.resize(static_cast<size_t>(V * k));
            for (auto& e : r.table) e = static_cast<int64_t>(rng() % E);
            r.tokens.resize(static_cast<size_t>(T));
            for (auto& t : r.tokens) t = static_cast<int32_t>(rng() % V);
        }
        const int32_t pad = 9;                                           // the pool's padding slot
        const std::vector<int32_t> slots = {3, 0, 5, pad, 1, pad, pad, 2};   // 3 real, padding, real, padding
        const Routed plain = gpu_route(r, hash), padded = gpu_route(r, hash, nullptr, slots, pad);
        for (int64_t t = 0; t < T; ++t) {
            const int64_t src = slots[static_cast<size_t>(t)] == pad ? 0 : t;
            for (int64_t i = 0; i < k; ++i) {
                const size_t j = static_cast<size_t>(t * k + i), s = static_cast<size_t>(src * k + i);
                EXPECT_EQ(padded.ids[j], plain.ids[s]) << "t=" << t << " slot " << i;
                EXPECT_EQ(std::memcmp(&padded.wts[j], &plain.wts[s], 4), 0) << "t=" << t << " slot " << i;
            }
        }
        bool differs = false;   // the padding rows did change (their own routing is another token's)
        for (int64_t t : {3, 5, 6})
            for (int64_t i = 0; i < k; ++i)
                differs |= plain.ids[static_cast<size_t>(t * k + i)] != plain.ids[static_cast<size_t>(i)];
        EXPECT_TRUE(differs);
    }
}

TEST(CudaRouter, RepeatedRunsAreBitIdentical) {
    RW_SKIP_WITHOUT_GPU();
    Router r(129, 384, 6, 2.5f, 230);
    const Routed a = gpu_route(r, false), b = gpu_route(r, false);
    expect_bits_equal(a.ids, b.ids, "ids");
    expect_bits_equal(a.wts, b.wts, "wts");
}

TEST(CudaRouter, RejectsBadArguments) {
    using test::expect_error;
    float* f = fake_ptr<float>();
    int32_t* i = fake_ptr<int32_t>();
    expect_error([&] { cuda::route(f, -1, 256, 6, f, nullptr, nullptr, 1.0f, i, f, nullptr); }, {"route", "T=-1"});
    expect_error([&] { cuda::route(f, 1, 0, 1, f, nullptr, nullptr, 1.0f, i, f, nullptr); }, {"route", "E=0"});
    expect_error([&] { cuda::route(f, 1, 1025, 6, f, nullptr, nullptr, 1.0f, i, f, nullptr); }, {"route", "E=1025"});
    expect_error([&] { cuda::route(f, 1, 256, 0, f, nullptr, nullptr, 1.0f, i, f, nullptr); }, {"route", "k=0"});
    expect_error([&] { cuda::route(f, 1, 256, 17, f, nullptr, nullptr, 1.0f, i, f, nullptr); }, {"route", "k=17"});
    expect_error([&] { cuda::route(f, 1, 4, 5, f, nullptr, nullptr, 1.0f, i, f, nullptr); }, {"route", "k=5"});
    expect_error([&] { cuda::route(nullptr, 1, 256, 6, f, nullptr, nullptr, 1.0f, i, f, nullptr); }, {"route", "null"});
    expect_error([&] { cuda::route(f, 1, 256, 6, nullptr, i, nullptr, 1.0f, i, f, nullptr); }, {"route", "tokens"});
    cuda::route(nullptr, 0, 256, 6, nullptr, nullptr, nullptr, 1.0f, nullptr, nullptr, nullptr);   // T = 0: nothing
}

}  // namespace
}  // namespace megamoe

#else

TEST(CudaRouter, SkippedWithoutCuda) { GTEST_SKIP() << "built without CUDA"; }

#endif
