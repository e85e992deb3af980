// sampler_test.cpp — tests for src/serve/sampler: the definition's building blocks (Philox against
// Random123's known answers, the 53-bit draw, sampling_exp against exp, the exact ceil and draw
// products), the key (seed, index) fixing the token whatever else is sampled, the definition on
// hand-made rows whose draws can be worked out by hand, the optimized sampler against a plain
// full-sort implementation of the definition token for token, greedy ties, the sampled
// distribution under each filter (checked with a chi-square bound over many keys), -inf/NaN
// handling, parameter validation, logprobs, and generation_config.json defaults.
#include "serve/sampler.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "core/common.h"

#include "test_util.h"

using namespace megamoe;
namespace fs = std::filesystem;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr int kDraws = 200000;

SamplingParams make(float temperature, int32_t top_k = 0, float top_p = 1.0f, float min_p = 0.0f) {
    SamplingParams p;
    p.temperature = temperature;
    p.top_k = top_k;
    p.top_p = top_p;
    p.min_p = min_p;
    return p;
}

// softmax(logits / t) restricted to `keep` (all tokens when empty), in double.
std::vector<double> softmax(const std::vector<float>& logits, double t, const std::vector<int>& keep = {}) {
    std::vector<double> p(logits.size(), 0.0);
    double sum = 0.0;
    for (size_t i = 0; i < logits.size(); ++i) {
        const bool kept = keep.empty() || std::find(keep.begin(), keep.end(), static_cast<int>(i)) != keep.end();
        if (kept && std::isfinite(logits[i])) sum += (p[i] = std::exp(logits[i] / t));
    }
    for (double& v : p) v /= sum;
    return p;
}

// Logits whose softmax is exactly-ish `probs` (log of each).
std::vector<float> logits_of(const std::vector<double>& probs) {
    std::vector<float> l;
    for (double p : probs) l.push_back(static_cast<float>(std::log(p)));
    return l;
}

// Draws kDraws tokens (token indices 0, 1, ... of one seed) and checks them against `expected`:
// tokens with probability 0 must never appear, and the Pearson statistic sum((O - E)^2 / E) over
// the support must stay below the chi-square quantile for df = support - 1 at z = 5 (upper tail
// ~3e-7), from the Wilson-Hilferty approximation df * (1 - 2/(9 df) + z sqrt(2/(9 df)))^3. With a
// correct sampler a fresh seed fails this about once in three million runs; a real error is far
// outside it: shifting one probability of 0.2 by just 0.01 adds N * 0.01^2 / 0.2 = 100 to the
// statistic at N = 200k, while the bound is ~31-50 for the small supports used here.
void expect_distribution(const SamplingParams& params, const std::vector<float>& logits,
                         const std::vector<double>& expected, uint64_t seed = 1) {
    Sampler s(params, seed);
    std::vector<int64_t> counts(logits.size(), 0);
    for (int d = 0; d < kDraws; ++d) {
        const int32_t t = s.sample(logits.data(), static_cast<int64_t>(logits.size()), d);
        ASSERT_GE(t, 0);
        ASSERT_LT(t, static_cast<int32_t>(logits.size()));
        ++counts[static_cast<size_t>(t)];
    }
    double chi2 = 0.0;
    int support = 0;
    for (size_t i = 0; i < logits.size(); ++i) {
        if (expected[i] == 0.0) {
            EXPECT_EQ(counts[i], 0) << "token " << i << " must never be sampled";
            continue;
        }
        ++support;
        const double e = expected[i] * kDraws;
        chi2 += (counts[i] - e) * (counts[i] - e) / e;
    }
    if (support <= 1) return;  // a single token: the zero checks above are the whole test
    const double df = support - 1, z = 5.0, a = 2.0 / (9.0 * df);
    const double bound = df * std::pow(1.0 - a + z * std::sqrt(a), 3.0);
    EXPECT_LT(chi2, bound) << "df " << df;
}

using megamoe::test::expect_error;

// A fresh temporary directory, removed when the object goes away.
struct TempDir {
    fs::path path;
    TempDir() {
        static int counter = 0;
        path = fs::temp_directory_path() /
               ("megamoe_sampler_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
        fs::remove_all(path);
        fs::create_directories(path);
    }
    ~TempDir() {
        std::error_code ec;
        fs::remove_all(path, ec);
    }
    std::string str() const { return path.string(); }
    void write(const std::string& name, const std::string& text) const {
        std::ofstream(path / name, std::ios::binary) << text;
    }
};

// Deterministic pseudo-random logits for the determinism and speed tests (test-local LCG).
std::vector<float> random_logits(int64_t vocab, uint64_t& state, float scale) {
    std::vector<float> l(static_cast<size_t>(vocab));
    for (float& x : l) {
        state = state * 6364136223846793005ULL + 1442695040888963407ULL;
        x = scale * (static_cast<float>(state >> 40) / static_cast<float>(1 << 24) - 0.5f);
    }
    return l;
}

// The definition in sampler.h written the plain way (full sort of the candidates, no heap,
// pruning, chunked ranking or fast path), for token-for-token comparison. It shares only the
// building blocks (sampling_weight, ceil_mul, draw_target, sampling_bits), which are tested on
// their own below; every sum is an exact integer, so both must agree exactly.
int32_t reference_sample(const SamplingParams& p, uint64_t seed, int64_t index, const std::vector<float>& l) {
    const auto n = static_cast<int32_t>(l.size());
    auto valid = [](float x) { return x > -kInf; };
    if (p.greedy()) {
        int32_t best = -1;
        for (int32_t i = 0; i < n; ++i)
            if (valid(l[i]) && (best < 0 || l[i] > l[best])) best = i;
        return best;
    }
    float m = -kInf;
    for (float x : l)
        if (valid(x)) m = std::max(m, x);
    const bool inf_max = m == kInf;
    std::vector<int32_t> rank;   // the candidates
    for (int32_t i = 0; i < n; ++i)
        if (inf_max ? l[i] == kInf : valid(l[i])) rank.push_back(i);
    const int S = 63 - static_cast<int>(std::bit_width(rank.size()));
    const float r = 1.0f / p.temperature;
    std::vector<float> w(l.size(), 0.0f);
    std::vector<uint64_t> W(l.size(), 0);
    for (int32_t i : rank) {
        w[i] = inf_max ? 1.0f : sampling_weight(l[i], m, r);
        W[i] = static_cast<uint64_t>(std::ldexp(static_cast<double>(w[i]), S));
    }
    std::sort(rank.begin(), rank.end(), [&](int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
    if (p.top_k > 0 && static_cast<size_t>(p.top_k) < rank.size()) rank.resize(static_cast<size_t>(p.top_k));
    if (p.top_p < 1.0f) {
        uint64_t K = 0, cum = 0;
        for (int32_t i : rank) K += W[i];
        const uint64_t thr = ceil_mul(p.top_p, K);
        size_t j = 0;
        while ((cum += W[rank[j]]) < thr) ++j;
        rank.resize(j + 1);
    }
    std::vector<int32_t> kept;
    for (int32_t i : rank)
        if (!(w[i] < p.min_p)) kept.push_back(i);
    std::sort(kept.begin(), kept.end());
    uint64_t M = 0, acc = 0;
    for (int32_t i : kept) M += W[i];
    const uint64_t t = draw_target(sampling_bits(seed, index), M);
    for (int32_t i : kept)
        if ((acc += W[i]) > t) return i;
    return -1;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Building blocks of the definition

TEST(Philox, MatchesRandom123KnownAnswers) {
    // Random123's tests/kat_vectors, the three "philox4x32 10" lines: counter, key -> output.
    EXPECT_EQ(philox4x32_10({0, 0, 0, 0}, {0, 0}),
              (std::array<uint32_t, 4>{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}));
    EXPECT_EQ(philox4x32_10({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, {0xffffffffu, 0xffffffffu}),
              (std::array<uint32_t, 4>{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}));
    EXPECT_EQ(philox4x32_10({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, {0xa4093822u, 0x299f31d0u}),
              (std::array<uint32_t, 4>{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}));
}

TEST(SamplingBits, FollowTheDefinitionAndLookUniform) {
    const uint64_t seed = 0x0123456789abcdefULL;
    const int64_t index = (int64_t{5} << 32) | 7;
    const auto o = philox4x32_10({7u, 5u, 0u, 0u}, {0x89abcdefu, 0x01234567u});
    EXPECT_EQ(sampling_bits(seed, index), ((static_cast<uint64_t>(o[0]) << 32) | o[1]) >> 11);
    // 53 bits; neighbouring keys unrelated; mean and the top bit balanced (5 sigma bounds).
    constexpr int kN = 100000;
    double sum = 0.0;
    int top = 0;
    for (int i = 0; i < kN; ++i) {
        const uint64_t b = sampling_bits(42, i);
        ASSERT_LT(b, uint64_t{1} << 53);
        ASSERT_NE(b, sampling_bits(43, i));
        sum += static_cast<double>(b) * 0x1p-53;
        top += static_cast<int>(b >> 52);
    }
    EXPECT_NEAR(sum / kN, 0.5, 5 * std::sqrt(1.0 / 12 / kN));
    EXPECT_NEAR(top, kN / 2, 5 * std::sqrt(kN / 4.0));
}

TEST(SamplingExp, WithinAnUlpMonotoneAndExactAtZero) {
    EXPECT_EQ(sampling_exp(0.0f), 1.0f);
    EXPECT_EQ(sampling_exp(-0.0f), 1.0f);
    EXPECT_EQ(sampling_exp(-80.0001f), 0.0f);
    EXPECT_EQ(sampling_exp(-kInf), 0.0f);
    EXPECT_GT(sampling_exp(-80.0f), 0.0f);
    // Every 97th float in [-80, 0] (about 1.1e7 of them), ascending: within 1 ulp of exp, never
    // decreasing, never above 1.
    const uint32_t lo = std::bit_cast<uint32_t>(-80.0f), hi = std::bit_cast<uint32_t>(-0.0f);
    float prev = 0.0f;
    double worst = 0.0;
    for (uint32_t u = lo; u >= hi && u <= lo; u -= 97) {
        const float x = std::bit_cast<float>(u);
        const float y = sampling_exp(x);
        const double e = std::exp(static_cast<double>(x));
        const float ef = static_cast<float>(e);
        const double ulp = std::nextafter(ef, kInf) - ef;
        worst = std::max(worst, std::fabs(y - e) / ulp);
        ASSERT_GE(y, prev) << x;
        ASSERT_LE(y, 1.0f) << x;
        prev = y;
    }
    EXPECT_LE(worst, 1.0);
    // The weight: 1 exactly at the max, whatever the temperature (r = +inf included).
    EXPECT_EQ(sampling_weight(3.5f, 3.5f, kInf), 1.0f);
    EXPECT_EQ(sampling_weight(3.0f, 3.5f, kInf), 0.0f);
    EXPECT_EQ(sampling_weight(-kInf, 3.5f, 1.0f), 0.0f);
    EXPECT_EQ(sampling_weight(2.5f, 3.5f, 2.0f), sampling_exp(-2.0f));
}

TEST(SamplingArithmetic, CeilMulAndDrawTargetAreExact) {
    EXPECT_EQ(ceil_mul(0.5f, 4), 2u);
    EXPECT_EQ(ceil_mul(0.75f, 4), 3u);
    EXPECT_EQ(ceil_mul(0.5f, 5), 3u);
    EXPECT_EQ(ceil_mul(0.6f, 5), 4u);   // 0.6f = 0.60000002384...: 3.0000001 rounds up
    EXPECT_EQ(ceil_mul(0.4f, 5), 3u);   // 0.4f = 0.40000000596...
    EXPECT_EQ(ceil_mul(1.0f, 12345), 12345u);
    EXPECT_EQ(ceil_mul(1e-45f, 1), 1u);   // subnormal p
    EXPECT_EQ(ceil_mul(0.5f, 0), 0u);
    const uint64_t big = (uint64_t{1} << 63) - 1;
    EXPECT_EQ(ceil_mul(1.0f, big), big);
    EXPECT_EQ(ceil_mul(0.5f, big), uint64_t{1} << 62);
    // Against long double (64-bit mantissa: exact for K < 2^40 times a 24-bit p).
    uint64_t state = 3;
    for (int i = 0; i < 100000; ++i) {
        state = state * 6364136223846793005ULL + 1442695040888963407ULL;
        const uint64_t K = state >> 24;   // < 2^40
        const float p = static_cast<float>((state >> 8) & 0xFFFFFF) * 0x1p-24f + 0x1p-25f;
        ASSERT_EQ(ceil_mul(p, K), static_cast<uint64_t>(std::ceil(static_cast<long double>(p) * K))) << p << " " << K;
    }
    EXPECT_EQ(draw_target(0, 1000), 0u);
    EXPECT_EQ(draw_target(uint64_t{1} << 52, 1001), 500u);
    EXPECT_EQ(draw_target((uint64_t{1} << 53) - 1, 1000), 999u);
    EXPECT_EQ(draw_target((uint64_t{1} << 53) - 1, big), big - 1024);
}

// ---------------------------------------------------------------------------------------------
// The key

TEST(Sampler, SameKeySameTokenWhateverElseIsSampled) {
    uint64_t state = 17;
    const std::vector<float> l = random_logits(500, state, 6.0f);
    for (const SamplingParams& p : {make(1.0f), make(0.8f, 40), make(0.7f, 0, 0.9f, 0.02f)}) {
        Sampler a(p, 1234);
        std::vector<int32_t> first;
        for (int64_t i = 0; i < 200; ++i) first.push_back(a.sample(l.data(), 500, i));
        // The same keys again, in reverse, interleaved with other requests' draws on other rows.
        Sampler other(p, 99), again(p, 1234);
        for (int64_t i = 199; i >= 0; --i) {
            const std::vector<float> noise = random_logits(500, state, 3.0f);
            other.sample(noise.data(), 500, i * 7 + 3);
            ASSERT_EQ(again.sample(l.data(), 500, i), first[static_cast<size_t>(i)]) << i;
            ASSERT_EQ(a.sample(l.data(), 500, i), first[static_cast<size_t>(i)]) << i;
        }
        // The index matters: 200 keys do not all give one token.
        EXPECT_GT(std::count(first.begin(), first.end(), first[0]), 0);
        EXPECT_LT(std::count(first.begin(), first.end(), first[0]), 200);
    }
}

TEST(Sampler, SameSeedSameTokens) {
    const SamplingParams settings[] = {make(1.0f), make(0.8f, 50), make(0.7f, 0, 0.9f), make(1.2f, 20, 0.95f, 0.05f)};
    for (const SamplingParams& p : settings) {
        Sampler a(p, 42), b(p, 42), c(p, 43);
        uint64_t state = 7;
        bool differs = false;
        for (int step = 0; step < 500; ++step) {
            const std::vector<float> l = random_logits(1000, state, 8.0f);
            const int32_t ta = a.sample(l.data(), 1000, step), tb = b.sample(l.data(), 1000, step),
                          tc = c.sample(l.data(), 1000, step);
            ASSERT_EQ(ta, tb) << "step " << step;
            differs |= ta != tc;
        }
        EXPECT_TRUE(differs) << "seeds 42 and 43 gave the same 500 tokens";
    }
}

TEST(Sampler, SeedFromParamsOverridesFallback) {
    SamplingParams with_seed = make(1.0f);
    with_seed.seed = 99;
    Sampler a(with_seed, 1), b(with_seed, 2), c(make(1.0f), 99);
    EXPECT_EQ(a.seed(), 99u);
    EXPECT_EQ(c.seed(), 99u);
    uint64_t state = 3;
    for (int step = 0; step < 200; ++step) {
        const std::vector<float> l = random_logits(300, state, 6.0f);
        const int32_t t = a.sample(l.data(), 300, step);
        ASSERT_EQ(t, b.sample(l.data(), 300, step));
        ASSERT_EQ(t, c.sample(l.data(), 300, step));
    }
}

TEST(Sampler, PinnedSequence) {
    // Seeded outputs are part of the API (a request replayed with its seed gives the same text),
    // so a change here must be deliberate. Recorded from this implementation: Philox bits of
    // (12345, index), cumulative walk in id order over softmax(sin(i) * 3).
    std::vector<float> l(50);
    for (size_t i = 0; i < l.size(); ++i) l[i] = 3.0f * static_cast<float>(std::sin(static_cast<double>(i)));
    Sampler s(make(1.0f), 12345);
    std::vector<int32_t> got;
    for (int i = 0; i < 16; ++i) got.push_back(s.sample(l.data(), 50, i));
    const std::vector<int32_t> want = {39, 0, 20, 33, 27, 21, 1, 28, 20, 14, 46, 2, 14, 11, 1, 21};
    EXPECT_EQ(got, want);
}

TEST(Sampler, RankedPathMatchesFastPath) {
    // top_k = vocab - 1 with the last token at -inf keeps every valid token but goes through the
    // ranked path; both paths sum exactly and draw in id order, so the tokens must be identical.
    uint64_t state = 11;
    std::vector<float> l = random_logits(2000, state, 10.0f);
    l.back() = -kInf;
    Sampler fast(make(0.9f), 5), ranked(make(0.9f, 1999), 5);
    for (int i = 0; i < 300; ++i) ASSERT_EQ(fast.sample(l.data(), 2000, i), ranked.sample(l.data(), 2000, i));
}

TEST(Sampler, MatchesReferenceTokenForToken) {
    // Covers the fast path, the heap top-k (small k), nth_element top-k (k > 1024), top-p with
    // pruning and chunked ranking, min-p, and their combinations, on flat and peaked logits
    // (quantized so that ties occur), with masked ids and +inf rows.
    const SamplingParams settings[] = {
        make(1.0f),
        make(0.7f, 0, 1.0f, 0.02f),
        make(1.0f, 40),
        make(0.6f, 1500),
        make(0.9f, 0, 0.9f),
        make(1.3f, 0, 0.999f),
        make(0.8f, 100, 0.95f),
        make(1.0f, 2500, 0.8f, 0.01f),
        make(0.5f, 7, 0.5f, 0.2f),
        make(1.0f, 0, 0.3f),
        make(2.0f, 0, 0.97f, 0.001f),
    };
    uint64_t state = 21;
    for (size_t si = 0; si < std::size(settings); ++si) {
        Sampler s(settings[si], 1000 + si);
        for (int step = 0; step < 40; ++step) {
            std::vector<float> l = random_logits(3000, state, step % 2 ? 40.0f : 6.0f);
            for (float& x : l) x = std::round(x * 4.0f) / 4.0f;
            if (step % 3 == 0) l[static_cast<size_t>(step)] = -kInf;
            if (step % 5 == 1) l[static_cast<size_t>(step) + 1] = kNaN;
            if (step == 7) l[100] = l[2000] = kInf;
            ASSERT_EQ(s.sample(l.data(), 3000, step), reference_sample(settings[si], 1000 + si, step, l))
                << "setting " << si << " step " << step;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The definition on hand-made rows

// Rows whose kept tokens all weigh the same (equal logits or +inf): every W is 2^S, so the draw
// picks kept[floor(x * n / 2^53)] for the n kept ids in id order and the key's bits x. The kept
// sets below are worked out by hand from the definition.
TEST(SamplerDefinition, EqualWeightRowsDrawByHand) {
    struct Case {
        const char* what;
        std::vector<float> l;
        SamplingParams p;
        std::vector<int32_t> kept;
    };
    const float nan = kNaN;
    const Case cases[] = {
        {"all kept", {0, 0, 0, 0}, make(0.7f), {0, 1, 2, 3}},
        {"top_p reached exactly stops there", {0, 0, 0, 0}, make(0.7f, 0, 0.5f), {0, 1}},
        {"top_p 0.75 of 4", {0, 0, 0, 0}, make(1.0f, 0, 0.75f), {0, 1, 2}},
        {"top_p 0.6f of 5 is just above 3 tokens", {1, 1, 1, 1, 1}, make(1.0f, 0, 0.6f), {0, 1, 2, 3}},
        {"top_p 0.4f of 5", {1, 1, 1, 1, 1}, make(1.0f, 0, 0.4f), {0, 1, 2}},
        {"top_p ties keep the lower ids", {-200, 2, 2, -200, 2, 2}, make(1.0f, 0, 0.5f), {1, 2}},
        {"top_k ties keep the lower ids", {-1, 2, 2, 2, 2, -1}, make(1.0f, 3), {1, 2, 3}},
        {"top_k then top_p", {3, 3, 3, 3, 3, 3}, make(1.0f, 4, 0.5f), {0, 1}},
        {"masked and NaN ids", {-kInf, 0, nan, 0, -kInf, 0}, make(1.3f), {1, 3, 5}},
        {"min_p drops below min_p * p_max", {0, 0, -1, -10}, make(1.0f, 0, 1.0f, 0.5f), {0, 1}},
        {"min_p after temperature", {0, 0, -1, -10}, make(4.0f, 0, 1.0f, 0.5f), {0, 1, 2}},
        {"+inf takes all the mass", {1, kInf, 0, kInf, -kInf}, make(1.0f), {1, 3}},
        {"+inf with top_p", {1, kInf, 0, kInf, -kInf}, make(1.0f, 0, 0.5f), {1}},
        {"-0 and +0 tie", {-0.0f, 0.0f, -0.0f, -3.0f}, make(1.0f, 2), {0, 1}},
    };
    for (const Case& c : cases) {
        SCOPED_TRACE(c.what);
        for (uint64_t seed : {0ull, 77ull}) {
            Sampler s(c.p, seed);
            for (int64_t index = 0; index < 300; ++index) {
                const uint64_t x = sampling_bits(seed, index);
                const uint64_t n = c.kept.size();
                // min_p at temperature 4: w(-1) = exp(-0.25) = 0.78 stays, w(-10) = 0.08 goes; the
                // two kept weights differ then, so that case checks membership only.
                const int32_t got = s.sample(c.l.data(), static_cast<int64_t>(c.l.size()), index);
                if (c.p.temperature == 4.0f) {
                    ASSERT_NE(std::find(c.kept.begin(), c.kept.end(), got), c.kept.end()) << got;
                    continue;
                }
                const size_t pick = static_cast<size_t>((static_cast<unsigned __int128>(x) * n) >> 53);
                ASSERT_EQ(got, c.kept[pick]) << "index " << index;
            }
        }
    }
}

TEST(SamplerDefinition, UnequalWeightsFollowTheFixedPointWalk) {
    // Three tokens with logits 0, -1, -2 at T = 1: W = floor(w * 2^61) (|C| = 3, S = 61); the
    // token is the first whose running sum exceeds floor(x * M / 2^53).
    const std::vector<float> l = {-1.0f, 0.0f, -2.0f};
    const uint64_t W[3] = {static_cast<uint64_t>(std::ldexp(static_cast<double>(sampling_exp(-1.0f)), 61)),
                           uint64_t{1} << 61,
                           static_cast<uint64_t>(std::ldexp(static_cast<double>(sampling_exp(-2.0f)), 61))};
    const uint64_t M = W[0] + W[1] + W[2];
    Sampler s(make(1.0f), 5);
    for (int64_t index = 0; index < 1000; ++index) {
        const uint64_t t = draw_target(sampling_bits(5, index), M);
        const int32_t want = t < W[0] ? 0 : (t < W[0] + W[1] ? 1 : 2);
        ASSERT_EQ(s.sample(l.data(), 3, index), want) << index;
    }
}

// ---------------------------------------------------------------------------------------------
// Greedy

TEST(Sampler, GreedyTiesToLowestId) {
    const std::vector<float> l = {-kInf, 1.0f, kNaN, 3.0f, 2.0f, 3.0f, 3.0f};
    for (uint64_t seed : {0u, 1u, 2u}) {
        Sampler t0(make(0.0f), seed), k1(make(1.0f, 1), seed);
        for (int i = 0; i < 20; ++i) {
            EXPECT_EQ(t0.sample(l.data(), 7, i), 3);
            EXPECT_EQ(k1.sample(l.data(), 7, i), 3);
        }
    }
    const std::vector<float> all_equal(5, 0.25f);
    Sampler g(make(0.0f), 0);
    EXPECT_EQ(g.sample(all_equal.data(), 5, 0), 0);
    const std::vector<float> inf = {1.0f, kInf, kInf};
    EXPECT_EQ(g.sample(inf.data(), 3, 9), 1);
}

// ---------------------------------------------------------------------------------------------
// Distributions

TEST(SamplerDistribution, TemperatureOneIsSoftmax) {
    const std::vector<float> l = {1.0f, 2.0f, 0.5f, -1.0f, 3.0f, 0.0f, 2.5f, -0.5f};
    expect_distribution(make(1.0f), l, softmax(l, 1.0));
}

TEST(SamplerDistribution, TemperatureScales) {
    const std::vector<float> l = {1.0f, 2.0f, 0.5f, -1.0f, 3.0f, 0.0f, 2.5f, -0.5f};
    expect_distribution(make(0.5f), l, softmax(l, 0.5), 2);
    expect_distribution(make(2.0f), l, softmax(l, 2.0), 3);
}

TEST(SamplerDistribution, TopKKeepsExactlyTheKBest) {
    const std::vector<float> l = {1.0f, 2.0f, 0.5f, -1.0f, 3.0f, 0.0f, 2.5f, -0.5f};
    // The three best are ids 4 (3.0), 6 (2.5), 1 (2.0); renormalized among themselves.
    expect_distribution(make(1.0f, 3), l, softmax(l, 1.0, {4, 6, 1}));
    expect_distribution(make(0.5f, 3), l, softmax(l, 0.5, {4, 6, 1}), 4);
    // top_k >= vocab and -1 are no-ops.
    expect_distribution(make(1.0f, 8), l, softmax(l, 1.0), 5);
    expect_distribution(make(1.0f, -1), l, softmax(l, 1.0), 6);
    // Ties at the cut keep the lower ids.
    const std::vector<float> ties = {1.0f, 2.0f, 2.0f, 0.0f, 2.0f};
    expect_distribution(make(1.0f, 2), ties, {0, 0.5, 0.5, 0, 0});
}

TEST(SamplerDistribution, TopPKeepsTheMinimalNucleus) {
    const std::vector<double> p = {0.05, 0.40, 0.25, 0.20, 0.10};
    const std::vector<float> l = logits_of(p);
    // Ranked: id1 0.40, id2 0.25 (cum 0.65), id3 0.20 (0.85), id4 0.10 (0.95), id0 0.05.
    // top_p 0.6: id2 crosses the threshold and is kept; the nucleus is {1, 2}.
    expect_distribution(make(1.0f, 0, 0.6f), l, {0, 0.40 / 0.65, 0.25 / 0.65, 0, 0});
    // top_p 0.7: 0.65 falls short, so id3 joins.
    expect_distribution(make(1.0f, 0, 0.7f), l, {0, 0.40 / 0.85, 0.25 / 0.85, 0.20 / 0.85, 0}, 2);
    // top_p below the best token's probability still keeps that one token.
    expect_distribution(make(1.0f, 0, 0.3f), l, {0, 1, 0, 0, 0});
    // Ties at the boundary keep the lower ids: uniform over 4, cumulative 0.25, 0.5, ...;
    // weights are exactly 1, so top_p 0.5 stops exactly at the second token.
    const std::vector<float> flat(4, 0.0f);
    expect_distribution(make(1.0f, 0, 0.5f), flat, {0.5, 0.5, 0, 0}, 3);
    expect_distribution(make(1.0f, 0, 0.6f), flat, {1.0 / 3, 1.0 / 3, 1.0 / 3, 0}, 4);
}

TEST(SamplerDistribution, TopPAppliesAfterTopK) {
    const std::vector<float> l = logits_of({0.05, 0.40, 0.25, 0.20, 0.10});
    // top_k 3 keeps {1, 2, 3} with mass 0.85, renormalized to 0.4706, 0.2941, 0.2353. top_p 0.75
    // on that is reached at id 2 (0.7647) -> {1, 2}. Applied to the unrenormalized distribution it
    // would need id 3 too (0.65 < 0.75), so this pins the order.
    expect_distribution(make(1.0f, 3, 0.75f), l, {0, 0.40 / 0.65, 0.25 / 0.65, 0, 0});
}

TEST(SamplerDistribution, MinPDropsTokensBelowFractionOfMax) {
    const std::vector<double> p = {0.5, 0.2, 0.1, 0.09, 0.06, 0.05};
    const std::vector<float> l = logits_of(p);
    // min_p 0.15 -> threshold 0.075: keep 0.5, 0.2, 0.1, 0.09; drop 0.06, 0.05.
    expect_distribution(make(1.0f, 0, 1.0f, 0.15f), l, {0.5 / 0.89, 0.2 / 0.89, 0.1 / 0.89, 0.09 / 0.89, 0, 0});
    // min_p 1 keeps only the best token; min_p 0 keeps all.
    expect_distribution(make(1.0f, 0, 1.0f, 1.0f), l, {1, 0, 0, 0, 0, 0}, 2);
    expect_distribution(make(1.0f, 0, 1.0f, 0.0f), l, p, 3);
    // Temperature applies first: at t = 0.5 the probabilities go as p^2 (0.25, 0.04, 0.01, ...),
    // ratios to the max 0.16, 0.04, ..., so min_p 0.1 keeps only ids 0 and 1.
    expect_distribution(make(0.5f, 0, 1.0f, 0.1f), l, {0.25 / 0.29, 0.04 / 0.29, 0, 0, 0, 0}, 4);
}

TEST(SamplerDistribution, CombinedSettings) {
    const std::vector<float> l = {2.0f, 1.5f, 1.0f, 0.6f, 0.3f, 0.0f, -1.0f, 2.6f};
    // t 0.7 -> p = [.2283 .1118 .0547 .0309 .0201 .0131 .0031 .5380].
    // top_k 5 keeps {7, 0, 1, 2, 3}, renormalized [.5583 .2369 .1160 .0568 .0321] (rank order).
    // top_p 0.95: cumulative .5583 .7952 .9112 .9679 -> {7, 0, 1, 2} (without top-k's
    //   renormalization the cumulative .538 .766 .878 .933 would also need id 3).
    // min_p 0.15: id 2 is at .0568 / .5583 = 0.10 of the max -> dropped; id 1 at 0.21 stays.
    expect_distribution(make(0.7f, 5, 0.95f, 0.15f), l, softmax(l, 0.7, {7, 0, 1}));
}

TEST(SamplerDistribution, NonFiniteLogits) {
    // -inf and NaN are never sampled; the rest keep softmax proportions.
    const std::vector<float> l = {-kInf, 1.0f, kNaN, 0.0f, -kInf, 2.0f, kNaN};
    std::vector<float> finite = l;
    for (float& x : finite)
        if (std::isnan(x)) x = -kInf;
    expect_distribution(make(1.0f), l, softmax(finite, 1.0));
    expect_distribution(make(0.8f, 2, 0.9f, 0.01f), l, softmax(finite, 0.8, {5, 1}), 2);
    // +inf logits take all the mass, uniformly.
    const std::vector<float> inf = {1.0f, kInf, 0.0f, kInf};
    expect_distribution(make(1.0f), inf, {0, 0.5, 0, 0.5}, 3);
    expect_distribution(make(1.0f, 3, 0.99f), inf, {0, 0.5, 0, 0.5}, 4);
    // Nothing to sample is an error, greedy or not.
    const std::vector<float> none = {-kInf, kNaN, -kInf};
    for (const SamplingParams& p : {make(1.0f), make(0.0f), make(1.0f, 2, 0.5f)}) {
        Sampler s(p, 0);
        expect_error([&] { s.sample(none.data(), 3, 0); }, {"-inf or NaN"});
    }
}

// ---------------------------------------------------------------------------------------------
// Validation

TEST(SamplingParams, InvalidValuesNameTheField) {
    const float nan = kNaN;
    struct Case {
        SamplingParams p;
        const char* field;
    };
    const Case cases[] = {
        {make(-0.1f), "temperature"},
        {make(nan), "temperature"},
        {make(kInf), "temperature"},
        {make(1.0f, 0, 0.0f), "top_p"},
        {make(1.0f, 0, 1.01f), "top_p"},
        {make(1.0f, 0, nan), "top_p"},
        {make(1.0f, 0, -0.5f), "top_p"},
        {make(1.0f, -2), "top_k"},
        {make(1.0f, 0, 1.0f, -0.01f), "min_p"},
        {make(1.0f, 0, 1.0f, 1.5f), "min_p"},
        {make(1.0f, 0, 1.0f, nan), "min_p"},
    };
    for (const Case& c : cases) {
        expect_error([&] { c.p.validate(); }, {c.field});
        expect_error([&] { Sampler s(c.p, 0); }, {c.field});
    }
    // Boundaries are valid.
    make(0.0f, -1, 1.0f, 0.0f).validate();
    make(100.0f, 0, 1e-6f, 1.0f).validate();

    Sampler s(make(1.0f), 0);
    const float one = 0.0f;
    expect_error([&] { s.sample(&one, 0, 0); }, {"vocab"});
}

// ---------------------------------------------------------------------------------------------
// Logprobs

TEST(Logprobs, MatchDirectComputationAndOrder) {
    const std::vector<float> l = {1.0f, 2.0f, 0.5f, 2.0f, -kInf, 3.0f, kNaN, -1.0f};
    double sum = 0.0;
    for (float x : l)
        if (std::isfinite(x)) sum += std::exp(static_cast<double>(x));
    const double lse = std::log(sum);
    for (int32_t id = 0; id < 8; ++id) {
        const float got = token_logprob(l.data(), 8, id);
        if (std::isfinite(l[static_cast<size_t>(id)]))
            EXPECT_NEAR(got, l[static_cast<size_t>(id)] - lse, 1e-6) << id;
        else
            EXPECT_EQ(got, -kInf) << id;
    }
    // Ordered by logprob, the tie between ids 1 and 3 by lower id; -inf and NaN never listed.
    const auto top = top_logprobs(l.data(), 8, 20);
    const std::vector<int32_t> order = {5, 1, 3, 0, 2, 7};
    ASSERT_EQ(top.size(), order.size());
    for (size_t i = 0; i < order.size(); ++i) {
        EXPECT_EQ(top[i].first, order[i]) << i;
        EXPECT_EQ(top[i].second, token_logprob(l.data(), 8, order[i])) << i;
    }
    const auto top3 = top_logprobs(l.data(), 8, 3);
    ASSERT_EQ(top3.size(), 3u);
    EXPECT_EQ(top3[0].first, 5);
    EXPECT_EQ(top3[1].first, 1);
    EXPECT_EQ(top3[2].first, 3);
    EXPECT_TRUE(top_logprobs(l.data(), 8, 0).empty());
    // +inf logits: uniform over them.
    const std::vector<float> inf = {0.0f, kInf, kInf, kNaN};
    EXPECT_FLOAT_EQ(token_logprob(inf.data(), 4, 2), -std::log(2.0f));
    EXPECT_EQ(token_logprob(inf.data(), 4, 0), -kInf);
    const auto tinf = top_logprobs(inf.data(), 4, 5);
    ASSERT_EQ(tinf.size(), 3u);
    EXPECT_EQ(tinf[0].first, 1);
    EXPECT_EQ(tinf[1].first, 2);
    EXPECT_EQ(tinf[2].first, 0);
    EXPECT_EQ(tinf[2].second, -kInf);

    // Large vocabulary: against a direct double computation and a full sort.
    uint64_t state = 5;
    const std::vector<float> big = random_logits(129280, state, 20.0f);
    double bsum = 0.0;
    for (float x : big) bsum += std::exp(static_cast<double>(x));
    const double blse = std::log(bsum);
    std::vector<int32_t> ids(big.size());
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>(i);
    std::stable_sort(ids.begin(), ids.end(),
                     [&](int32_t a, int32_t b) { return big[static_cast<size_t>(a)] > big[static_cast<size_t>(b)]; });
    const auto btop = top_logprobs(big.data(), 129280, 20);
    ASSERT_EQ(btop.size(), 20u);
    for (size_t i = 0; i < 20; ++i) {
        EXPECT_EQ(btop[i].first, ids[i]);
        EXPECT_NEAR(btop[i].second, big[static_cast<size_t>(ids[i])] - blse, 1e-5);
    }
    EXPECT_NEAR(token_logprob(big.data(), 129280, 777), big[777] - blse, 1e-5);

    expect_error([&] { token_logprob(l.data(), 8, 8); }, {"token id 8"});
    expect_error([&] { top_logprobs(l.data(), 8, -1); }, {"k must be >= 0"});
    const std::vector<float> none = {-kInf, kNaN};
    expect_error([&] { token_logprob(none.data(), 2, 0); }, {"-inf or NaN"});
}

// ---------------------------------------------------------------------------------------------
// generation_config.json

TEST(GenerationDefaults, ReadsFieldsOrDefaults) {
    TempDir dir;
    SamplingParams p = load_generation_defaults(dir.str());  // no file
    EXPECT_EQ(p.temperature, 1.0f);
    EXPECT_EQ(p.top_p, 1.0f);
    EXPECT_EQ(p.top_k, 0);
    EXPECT_EQ(p.min_p, 0.0f);
    EXPECT_FALSE(p.seed.has_value());

    dir.write(
        "generation_config.json",
        R"({"_from_model_config": true, "bos_token_id": 0, "do_sample": true, "temperature": 0.6, "top_p": 0.95})");
    p = load_generation_defaults(dir.str());
    EXPECT_EQ(p.temperature, 0.6f);
    EXPECT_EQ(p.top_p, 0.95f);
    EXPECT_EQ(p.top_k, 0);

    dir.write("generation_config.json", R"({"do_sample": false, "temperature": 0.6, "top_k": 40, "min_p": null})");
    p = load_generation_defaults(dir.str());
    EXPECT_EQ(p.temperature, 0.0f);
    EXPECT_EQ(p.top_k, 40);
    EXPECT_EQ(p.min_p, 0.0f);
}

TEST(GenerationDefaults, MalformedFileNamesFileAndField) {
    TempDir dir;
    const std::string file = dir.str() + "/generation_config.json";
    const std::pair<std::string, std::vector<std::string>> cases[] = {
        {R"({"temperature": 0.6,)", {file, "not valid JSON"}},
        {R"([1, 2])", {file, "JSON object"}},
        {R"({"temperature": "hot"})", {file, "temperature", "number"}},
        {R"({"temperature": -1})", {file, "temperature"}},
        {R"({"temperature": 1e300})", {file, "temperature", "out of range"}},
        {R"({"top_p": 1.5})", {file, "top_p"}},
        {R"({"top_k": 2.5})", {file, "top_k", "integer"}},
        {R"({"top_k": -5})", {file, "top_k"}},
        {R"({"top_k": 99999999999})", {file, "top_k", "out of range"}},
        {R"({"min_p": 2})", {file, "min_p"}},
        {R"({"do_sample": "yes"})", {file, "do_sample", "boolean"}},
    };
    for (const auto& [text, want] : cases) {
        SCOPED_TRACE(text);
        dir.write("generation_config.json", text);
        expect_error([&] { load_generation_defaults(dir.str()); }, want);
    }
}

// ---------------------------------------------------------------------------------------------
// Work at the real vocabulary size

// The sampler's work, counted instead of timed (a wall-clock bound fails on a loaded machine and
// under sanitizers, and passes a slow path on a fast one; the counts are deterministic). Every
// step of the definition is one or two passes over the vocabulary except ranking, so an
// accidental quadratic path or a full sort per call shows in the comparisons
// (Sampler::comparisons). On V = 129280 random logits in random order (flat, worst-case-like):
//  - without top-k and top-p nothing is ranked: 0 comparisons;
//  - a small top-k alone compares each candidate once with the heap's front, plus replacements
//    (expected k ln(V / k): about 400 for k = 50, 4900 for k = 1000, each O(log k) comparisons)
//    and a sort of the k kept: about V to 1.6 V, so at most 2 V, where a sort of all candidates
//    takes V log2 V, about 20 V here;
//  - top-p ranks what survives its exact pruning, in growing chunks; on this flat distribution the
//    nucleus is a large part of the vocabulary (about a quarter at top_p 0.999), so its ranking is
//    not linear, but it must stay below what one sort of every candidate costs on the same logits.
TEST(Sampler, FullVocabularyWorkIsBounded) {
    constexpr int64_t kVocab = 129280;
    uint64_t state = 9;
    const std::vector<float> l = random_logits(kVocab, state, 30.0f);
    // One sort of all candidates in rank order, counted the same way: the top-p bound.
    std::vector<std::pair<float, int32_t>> all;
    for (int64_t i = 0; i < kVocab; ++i) all.emplace_back(l[static_cast<size_t>(i)], static_cast<int32_t>(i));
    int64_t sort_cmp = 0;
    std::sort(all.begin(), all.end(), [&](const auto& a, const auto& b) {
        ++sort_cmp;
        return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
    std::printf("    one sort of the vocabulary: %lld comparisons (%.2f V)\n", static_cast<long long>(sort_cmp),
                static_cast<double>(sort_cmp) / kVocab);
    EXPECT_GT(sort_cmp, 10 * kVocab);   // V log2 V: the small-top-k bound below is far from it

    const SamplingParams settings[] = {make(1.0f),
                                       make(0.7f, 50),
                                       make(0.6f, 0, 0.95f),
                                       make(1.0f, 0, 0.999f),
                                       make(1.0f, 0, 1.0f, 0.05f),
                                       make(0.8f, 40, 0.9f, 0.05f),
                                       make(1.0f, 1000)};
    const char* names[] = {"t1", "top_k50", "top_p0.95", "top_p0.999", "min_p", "combined", "top_k1000"};
    for (size_t i = 0; i < std::size(settings); ++i) {
        const SamplingParams& sp = settings[i];
        Sampler s(sp, 1);
        int64_t most = 0;
        for (int c = 0; c < 20; ++c) {
            const int32_t t = s.sample(l.data(), kVocab, c);
            ASSERT_GE(t, 0);
            ASSERT_LT(t, kVocab);
            most = std::max(most, s.comparisons());
        }
        std::printf("    sample(vocab %lld, %s): at most %lld comparisons a call (%.2f V)\n", static_cast<long long>(kVocab),
                    names[i], static_cast<long long>(most), static_cast<double>(most) / kVocab);
        if (sp.top_k <= 0 && sp.top_p >= 1.0f) {
            EXPECT_EQ(most, 0) << names[i];
        } else if (sp.top_p >= 1.0f || sp.top_k > 0) {
            EXPECT_LE(most, 2 * kVocab) << names[i];   // the heap path (top-k first, then top-p among k)
        } else {
            EXPECT_LT(most, sort_cmp) << names[i];
        }
    }
}
