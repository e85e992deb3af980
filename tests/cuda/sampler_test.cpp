// sampler_test.cpp — cuda::sample_rows (src/cuda/sampler.h) against its CPU twin, the Sampler and
// the logprob functions of serve/sampler.h, and mask_logits.
//
// Rows: random logits of V = 129280 (DeepSeek-V4's vocabulary) and V = 1024 in several shapes
// (normal at three spreads, quantized to 0.25 so ties abound, masked ids and NaN, most ids at one
// equal value, every id equal, two +inf ids, few valid ids, a peaked LM-like row, ±0 ties, a huge
// outlier) under mixed per-row parameters (greedy by temperature 0 and by top_k 1, temperature
// only, top-k, top-p, min-p and combinations), each row drawn with many (seed, index) keys.
//
// Tolerances and why:
//   ids: the twin's exactly. The kernel computes every weight with the same correctly rounded f32
//     operations as the CPU (sampling_exp / sampling_weight, spelled with __fmul_rn / __fadd_rn so
//     nothing is fused into an FMA), every sum is an exact integer, and the draw is an exact
//     integer comparison, so the expected number of differences is zero. The test still allows
//     0.1% (a draw can only differ where the two sides' weights differ in a last bit, i.e. where
//     u · M falls within that rounding of a boundary: e.g. if a host build fused the polynomial
//     into FMAs) and prints every difference it finds. Greedy rows and the top-n ids must match
//     exactly (they depend only on comparisons of the logits).
//   logprobs: the kernel sums expf(x - max) (CUDA's expf: <= 2 ulp, i.e. <= 2^-22 relative) in
//     double, the twin sums exp in double; so the normalizers differ by <= 2^-22 relative and lse
//     by <= 2.4e-7 absolute. Both round x - lse from double to f32 (<= 1/2 ulp each), so
//     |gpu - cpu| <= 2.4e-7 + ulp(lp) <= 3e-7 + 2^-22 |lp|. +inf rows give -log(n) exactly.
//   distribution: GPU draws against the analytic target with the chi-square bound of
//     tests/serve/sampler_test.cpp (z = 5, a false alarm about once in three million runs).
#include <gtest/gtest.h>

#include "cuda/sampler.h"

#ifdef MEGAMOE_HAVE_CUDA

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/common.h"
#include "cuda/buffer.h"
#include "cuda/linear.h"   // gpu_available, CUDA_CHECK
#include "ref/speculative.h"
#include "serve/sampler.h"
#include "test_util.h"

namespace megamoe {
namespace {

using cuda::DeviceArray;

#define SAMPLER_SKIP_WITHOUT_GPU() \
    if (!::megamoe::cuda::gpu_available()) GTEST_SKIP() << "no CUDA device"

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

SamplingParams make(float temperature, int32_t top_k = 0, float top_p = 1.0f, float min_p = 0.0f) {
    SamplingParams p;
    p.temperature = temperature;
    p.top_k = top_k;
    p.top_p = top_p;
    p.min_p = min_p;
    return p;
}

// The per-row parameter mix.
const std::vector<SamplingParams>& param_mix() {
    static const std::vector<SamplingParams> mix = {
        make(0.0f),                      // greedy
        make(1.0f),                      // temperature only
        make(0.6f, 0, 0.95f),            // DeepSeek's defaults
        make(1.0f, 50),                  // top-k
        make(0.8f, 0, 0.9f),             // top-p
        make(1.0f, 0, 1.0f, 0.05f),      // min-p
        make(2.0f, 1),                   // greedy by top_k 1
        make(0.8f, 40, 0.9f, 0.05f),     // all three
        make(1.3f, 0, 0.5f),             // small nucleus
        make(1.0f, 2000, 0.999f),        // large k, wide nucleus
        make(0.7f, 5, 1.0f, 0.3f),       // small k, strong min-p
        make(1.5f, 0, 0.97f, 0.001f),    // hot, wide
    };
    return mix;
}

// Row shapes (see the top of the file). `kind` picks one; rng draws the values.
constexpr int kKinds = 12;
const char* kind_name(int kind) {
    static const char* names[kKinds] = {"normal1", "normal3", "normal8", "quantized", "masked", "many-equal",
                                        "all-equal", "+inf", "few-valid", "peaked", "signed-zero", "outlier"};
    return names[kind % kKinds];
}

std::vector<float> make_row(int kind, int64_t V, std::mt19937& rng) {
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> l(static_cast<size_t>(V));
    const float spread = kind == 0 ? 1.0f : kind == 2 ? 8.0f : 3.0f;
    for (float& x : l) x = nd(rng) * spread;
    auto at = [&](int64_t i) -> float& { return l[static_cast<size_t>(i % V)]; };
    switch (kind) {
        case 3:
            for (float& x : l) x = std::round(x * 4.0f) / 4.0f;
            break;
        case 4:
            for (float& x : l) {
                const uint32_t u = rng() % 100;
                if (u < 20) x = -kInf;
                else if (u < 22) x = kNaN;
            }
            break;
        case 5:
            for (float& x : l)
                if (rng() % 10 < 7) x = 1.25f;
            break;
        case 6:
            for (float& x : l) x = -2.5f;
            break;
        case 7:
            at(V / 3) = kInf;
            at(V / 2 + 1) = kInf;
            at(5) = kNaN;
            break;
        case 8:
            for (int64_t i = 0; i < V; ++i)
                if (i % 97 != 3) l[static_cast<size_t>(i)] = -kInf;
            break;
        case 9:   // a few strong candidates over a broad background, like a language model's
            for (int j = 0; j < 6; ++j) at(static_cast<int64_t>(rng() % static_cast<uint32_t>(V))) = 12.0f + nd(rng);
            break;
        case 10:
            for (int64_t i = 0; i < V; ++i) l[static_cast<size_t>(i)] = (i % 3 == 0) ? -0.0f : (i % 3 == 1 ? 0.0f : -1.0f);
            break;
        case 11:
            at(7) = -1e30f;
            at(11) = 1e4f;
            break;
        default:
            break;
    }
    return l;
}

// Host inputs of one batch: [R, V] logits, R parameter sets and keys.
struct Batch {
    int64_t R = 0, V = 0;
    std::vector<float> logits;
    std::vector<int> kind;
    std::vector<SamplingParams> params;
    std::vector<uint64_t> seed;
    std::vector<int64_t> index;
    const float* row(int64_t r) const { return logits.data() + r * V; }
};

Batch make_batch(int64_t R, int64_t V, uint32_t seed) {
    Batch b;
    b.R = R;
    b.V = V;
    std::mt19937 rng(seed);
    const auto& mix = param_mix();
    for (int64_t r = 0; r < R; ++r) {
        const int kind = static_cast<int>(r % kKinds);
        const std::vector<float> l = make_row(kind, V, rng);
        b.logits.insert(b.logits.end(), l.begin(), l.end());
        b.kind.push_back(kind);
        // Parameters cycle at a different period than the kinds, so every pair occurs.
        b.params.push_back(mix[static_cast<size_t>((r / kKinds + r) % static_cast<int64_t>(mix.size()))]);
        b.seed.push_back((static_cast<uint64_t>(rng()) << 32) | rng());
        b.index.push_back(static_cast<int64_t>(rng() % 4096));
    }
    return b;
}

struct Result {
    std::vector<int32_t> ids;
    std::vector<float> logprob;
    std::vector<int32_t> top_ids;
    std::vector<float> top_logprobs;
};

// Device copies of a batch and its outputs; keys can be replaced between runs.
struct DeviceBatch {
    int64_t R, V;
    int n_top;
    DeviceArray<float> logits, temperature, top_p, min_p, logprob, top_logprobs;
    DeviceArray<int32_t> top_k, ids, top_ids;
    DeviceArray<uint64_t> seed;
    DeviceArray<int64_t> index;

    DeviceBatch(const Batch& b, int n_top_)
        : R(b.R), V(b.V), n_top(n_top_), logits(b.logits), temperature(static_cast<size_t>(b.R)),
          top_p(static_cast<size_t>(b.R)), min_p(static_cast<size_t>(b.R)), logprob(static_cast<size_t>(b.R)),
          top_logprobs(static_cast<size_t>(b.R * std::max(n_top_, 1))), top_k(static_cast<size_t>(b.R)),
          ids(static_cast<size_t>(b.R)), top_ids(static_cast<size_t>(b.R * std::max(n_top_, 1))),
          seed(b.seed), index(b.index) {
        std::vector<float> t, p, mp;
        std::vector<int32_t> k;
        for (const SamplingParams& s : b.params) {
            t.push_back(s.temperature);
            p.push_back(s.top_p);
            mp.push_back(s.min_p);
            k.push_back(s.top_k);
        }
        temperature.upload(t);
        top_p.upload(p);
        min_p.upload(mp);
        top_k.upload(k);
    }
    void set_keys(const std::vector<uint64_t>& s, const std::vector<int64_t>& i) {
        seed.upload(s);
        index.upload(i);
    }
    // The rows' parameters and keys as the kernels read them.
    cuda::SampleParams params() const {
        cuda::SampleParams p;
        p.temperature = temperature.data();
        p.top_k = top_k.data();
        p.top_p = top_p.data();
        p.min_p = min_p.data();
        p.seed = seed.data();
        p.index = index.data();
        return p;
    }
    void launch(cudaStream_t stream, const cuda::SampleScratch* scratch = nullptr) {
        const cuda::SampleParams p = params();
        cuda::SampleOutputs o;
        o.ids = ids.data();
        o.logprob = logprob.data();
        o.n_top = n_top;
        o.top_ids = n_top > 0 ? top_ids.data() : nullptr;
        o.top_logprobs = n_top > 0 ? top_logprobs.data() : nullptr;
        cuda::sample_rows(logits.data(), R, V, p, o, stream, nullptr, scratch);
    }
    Result run(const cuda::SampleScratch* scratch = nullptr) {
        CUDA_CHECK(cudaDeviceSynchronize());   // uploads ran on the legacy stream
        ids.fill(0x55);                        // nothing left from an earlier run
        launch(nullptr, scratch);
        CUDA_CHECK(cudaDeviceSynchronize());
        return download();
    }
    Result download() const {
        Result r;
        r.ids = ids.download();
        r.logprob = logprob.download();
        if (n_top > 0) {
            r.top_ids = top_ids.download();
            r.top_logprobs = top_logprobs.download();
        }
        return r;
    }
};

bool logprob_close(float got, float want) {
    if (got == want) return true;   // also ±inf
    return std::fabs(static_cast<double>(got) - want) <= 3e-7 + 0x1p-22 * std::fabs(static_cast<double>(want));
}

// Compares one GPU run with the twin, row by row. Counts draws (non-greedy rows) and their
// differences; everything else must match (reported through gtest).
struct Tally {
    int64_t draws = 0, greedy = 0, diffs = 0, logprob_bad = 0, top_bad = 0;
};

void compare(const Batch& b, const Result& g, int n_top, Tally& t) {
    for (int64_t r = 0; r < b.R; ++r) {
        const size_t rs = static_cast<size_t>(r);
        const SamplingParams& p = b.params[rs];
        Sampler s(p, b.seed[rs]);
        const int32_t want = s.sample(b.row(r), b.V, b.index[rs]);
        const int32_t got = g.ids[rs];
        if (p.greedy()) {
            ++t.greedy;
            EXPECT_EQ(got, want) << "greedy row " << r << " (" << kind_name(b.kind[rs]) << ")";
        } else {
            ++t.draws;
            if (got != want) {
                if (t.diffs < 20)
                    std::printf("    draw differs: row %lld (%s) T %g top_k %d top_p %g min_p %g seed %llu index %lld: "
                                "gpu %d cpu %d\n",
                                static_cast<long long>(r), kind_name(b.kind[rs]), p.temperature, p.top_k, p.top_p,
                                p.min_p, static_cast<unsigned long long>(b.seed[rs]),
                                static_cast<long long>(b.index[rs]), got, want);
                ++t.diffs;
            }
        }
        if (got < 0 || got >= b.V) {
            ADD_FAILURE() << "row " << r << ": id " << got << " out of range";
            continue;
        }
        const float lp = token_logprob(b.row(r), b.V, got);
        if (!logprob_close(g.logprob[rs], lp)) {
            if (t.logprob_bad < 10)
                ADD_FAILURE() << "row " << r << " (" << kind_name(b.kind[rs]) << ") logprob of " << got << ": gpu "
                              << g.logprob[rs] << " cpu " << lp;
            ++t.logprob_bad;
        }
        if (n_top == 0) continue;
        const auto top = top_logprobs(b.row(r), b.V, n_top);
        for (int i = 0; i < n_top; ++i) {
            const size_t at = static_cast<size_t>(r * n_top + i);
            const bool ok = i < static_cast<int>(top.size())
                                ? g.top_ids[at] == top[static_cast<size_t>(i)].first &&
                                      logprob_close(g.top_logprobs[at], top[static_cast<size_t>(i)].second)
                                : g.top_ids[at] == -1 && g.top_logprobs[at] == -kInf;
            if (!ok) {
                if (t.top_bad < 10)
                    ADD_FAILURE() << "row " << r << " (" << kind_name(b.kind[rs]) << ") top " << i << ": gpu ("
                                  << g.top_ids[at] << ", " << g.top_logprobs[at] << ") cpu "
                                  << (i < static_cast<int>(top.size()) ? top[static_cast<size_t>(i)].first : -1);
                ++t.top_bad;
            }
        }
    }
}

// rounds × R keys on one batch: round k uses fresh seeds and indices for every row.
void check_against_twin(int64_t R, int64_t V, int rounds, int n_top, uint32_t seed) {
    SCOPED_TRACE(str("V=", V, " R=", R, " n_top=", n_top));
    Batch b = make_batch(R, V, seed);
    DeviceBatch d(b, n_top);
    std::mt19937_64 keys(seed + 1);
    Tally t;
    for (int round = 0; round < rounds; ++round) {
        for (int64_t r = 0; r < R; ++r) {
            b.seed[static_cast<size_t>(r)] = keys();
            b.index[static_cast<size_t>(r)] = static_cast<int64_t>(keys() % 100000);
        }
        d.set_keys(b.seed, b.index);
        compare(b, d.run(), n_top, t);
    }
    std::printf("    V %lld: %lld draws, %lld differ from the CPU twin; %lld greedy rows\n", static_cast<long long>(V),
                static_cast<long long>(t.draws), static_cast<long long>(t.diffs), static_cast<long long>(t.greedy));
    EXPECT_LE(t.diffs * 1000, t.draws) << t.diffs << " of " << t.draws << " draws differ (more than 0.1%)";
    EXPECT_EQ(t.logprob_bad, 0);
    EXPECT_EQ(t.top_bad, 0);
}

// ---------------------------------------------------------------------------- against the twin

TEST(CudaSampler, MatchesCpuTwinAtFullVocabulary) {
    SAMPLER_SKIP_WITHOUT_GPU();
    check_against_twin(96, 129280, 24, 20, 1);   // 2304 keys
}

TEST(CudaSampler, MatchesCpuTwinAtSmallVocabulary) {
    SAMPLER_SKIP_WITHOUT_GPU();
    check_against_twin(240, 1024, 20, 5, 2);   // 4800 keys
    check_against_twin(48, 1001, 4, 20, 3);    // V not a multiple of 4: unaligned rows, scalar loads
    check_against_twin(24, 7, 4, 20, 4);       // fewer ids than n_top
}

TEST(CudaSampler, WithoutLogprobOutputs) {
    SAMPLER_SKIP_WITHOUT_GPU();
    Batch b = make_batch(48, 4096, 5);
    DeviceBatch d(b, 0);
    const cuda::SampleParams p = d.params();
    cuda::SampleOutputs o;
    o.ids = d.ids.data();   // no logprob, no top
    CUDA_CHECK(cudaDeviceSynchronize());
    cuda::sample_rows(d.logits.data(), b.R, b.V, p, o, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<int32_t> ids = d.ids.download();
    for (int64_t r = 0; r < b.R; ++r) {
        Sampler s(b.params[static_cast<size_t>(r)], b.seed[static_cast<size_t>(r)]);
        EXPECT_EQ(ids[static_cast<size_t>(r)], s.sample(b.row(r), b.V, b.index[static_cast<size_t>(r)])) << r;
    }
}

// ---------------------------------------------------------------------------- the distribution

// Pearson statistic of counts against expected probabilities over the support, and the z = 5
// Wilson-Hilferty bound (as tests/serve/sampler_test.cpp); zero-probability ids must never occur.
void expect_chi_square(const std::vector<int64_t>& counts, const std::vector<double>& expected, int64_t n,
                       const std::string& what) {
    double chi2 = 0.0;
    int support = 0;
    for (size_t i = 0; i < counts.size(); ++i) {
        if (expected[i] == 0.0) {
            EXPECT_EQ(counts[i], 0) << what << ": id " << i << " must never be drawn";
            continue;
        }
        ++support;
        const double e = expected[i] * static_cast<double>(n);
        chi2 += (static_cast<double>(counts[i]) - e) * (static_cast<double>(counts[i]) - e) / e;
    }
    if (support <= 1) return;
    const double df = support - 1, z = 5.0, a = 2.0 / (9.0 * df);
    const double bound = df * std::pow(1.0 - a + z * std::sqrt(a), 3.0);
    EXPECT_LT(chi2, bound) << what << ": df " << df;
}

// softmax(l / t) over `keep`, in double (the definition's target, up to its 2^-S quantization).
std::vector<double> target(const std::vector<float>& l, double t, const std::vector<int>& keep) {
    std::vector<double> p(l.size(), 0.0);
    double sum = 0.0;
    for (int i : keep) sum += (p[static_cast<size_t>(i)] = std::exp(static_cast<double>(l[static_cast<size_t>(i)]) / t));
    for (double& v : p) v /= sum;
    return p;
}

void check_distribution(int64_t V, int64_t R, int rounds) {
    SCOPED_TRACE(str("V=", V));
    // Eight live ids spread over the row, the rest masked. The settings and their kept sets are
    // those worked out in tests/serve/sampler_test.cpp.
    const std::vector<float> live = {1.0f, 2.0f, 0.5f, -1.0f, 3.0f, 0.0f, 2.5f, -0.5f};
    std::vector<int64_t> at(live.size());
    for (size_t j = 0; j < live.size(); ++j) at[j] = static_cast<int64_t>(j) * (V / 8) + static_cast<int64_t>(j % 3);
    const std::vector<SamplingParams> settings = {make(1.0f), make(0.5f), make(1.0f, 3), make(0.7f, 5, 0.95f, 0.15f)};
    const std::vector<std::vector<int>> keep = {{0, 1, 2, 3, 4, 5, 6, 7}, {0, 1, 2, 3, 4, 5, 6, 7}, {4, 6, 1}, {4, 6, 1}};
    // setting 3: T 0.7 keeps by top-k 5 {4, 6, 1, 0, 2}, by top-p 0.95 {4, 6, 1, 0}, by min-p {4, 6, 1}
    const std::vector<double> temps = {1.0, 0.5, 1.0, 0.7};
    Batch b;
    b.R = R;
    b.V = V;
    for (int64_t r = 0; r < R; ++r) {
        std::vector<float> row(static_cast<size_t>(V), -kInf);
        for (size_t j = 0; j < live.size(); ++j) row[static_cast<size_t>(at[j])] = live[j];
        b.logits.insert(b.logits.end(), row.begin(), row.end());
        b.kind.push_back(0);
        b.params.push_back(settings[static_cast<size_t>(r % 4)]);
        b.seed.push_back(2024);
        b.index.push_back(0);
    }
    DeviceBatch d(b, 0);
    std::vector<std::vector<int64_t>> counts(4, std::vector<int64_t>(live.size(), 0));
    int64_t strays = 0;
    for (int round = 0; round < rounds; ++round) {
        for (int64_t r = 0; r < R; ++r) b.index[static_cast<size_t>(r)] = round * R + r;   // distinct keys
        d.set_keys(b.seed, b.index);
        const Result g = d.run();
        for (int64_t r = 0; r < R; ++r) {
            const auto it = std::find(at.begin(), at.end(), static_cast<int64_t>(g.ids[static_cast<size_t>(r)]));
            if (it == at.end()) {
                ++strays;
                continue;
            }
            ++counts[static_cast<size_t>(r % 4)][static_cast<size_t>(it - at.begin())];
        }
    }
    EXPECT_EQ(strays, 0) << "masked ids drawn";
    for (size_t si = 0; si < 4; ++si)
        expect_chi_square(counts[si], target(live, temps[si], keep[si]), R / 4 * rounds, str("setting ", si));
}

TEST(CudaSampler, DrawsFollowTheTargetDistribution) {
    SAMPLER_SKIP_WITHOUT_GPU();
    check_distribution(1024, 4096, 50);     // 51200 draws per setting
    check_distribution(129280, 512, 100);   // 12800 per setting, the chunk walk over the full row
}

// ---------------------------------------------------------------------------- determinism

TEST(CudaSampler, RepeatedRunsAreBitIdentical) {
    SAMPLER_SKIP_WITHOUT_GPU();
    const Batch b = make_batch(64, 129280, 7);
    DeviceBatch d(b, 20);
    const Result x = d.run(), y = d.run();
    EXPECT_EQ(x.ids, y.ids);
    EXPECT_EQ(0, std::memcmp(x.logprob.data(), y.logprob.data(), x.logprob.size() * sizeof(float)));
    EXPECT_EQ(x.top_ids, y.top_ids);
    EXPECT_EQ(0, std::memcmp(x.top_logprobs.data(), y.top_logprobs.data(), x.top_logprobs.size() * sizeof(float)));
}

// Pass A over parts of each row (row_stats_kernel, SampleScratch) gives the same bits as one CTA
// per row: the same rows (every kind: ties, NaN, ±inf, few valid ids, all equal) with n_top 0 and
// 20, at the full vocabulary and at odd ones, with the automatic part count and forced ones (1, 2,
// 7 parts, and more than a row has chunks).
// The part count (host only, no GPU needed).
TEST(CudaSampler, PartsChoice) {
    EXPECT_EQ(cuda::sample_parts(1, 129280, 132), 64);
    EXPECT_EQ(cuda::sample_parts(8, 129280, 132), 33);
    EXPECT_EQ(cuda::sample_parts(66, 129280, 132), 0);   // half a wave of rows: no pre-pass
    EXPECT_EQ(cuda::sample_parts(1, 1000, 132), 0);      // 8 chunks: too few to split
    EXPECT_EQ(cuda::sample_parts(1, 1000, 132, 3), 3);
    EXPECT_EQ(cuda::sample_parts(1, 100, 132, 5), 1);    // one chunk
    EXPECT_EQ(cuda::sample_parts(1, 129280, 132, 0), 0);
    EXPECT_EQ(cuda::sample_scratch_bytes(3, 4), size_t{3 * 4 * 32});
}

TEST(CudaSampler, RowPartsGiveTheSameBits) {
    SAMPLER_SKIP_WITHOUT_GPU();
    int dev = 0, sms = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    for (const auto& [R, V, seed] : {std::tuple<int64_t, int64_t, uint32_t>{9, 129280, 21}, {3, 4099, 22}, {5, 1001, 23}})
        for (int n_top : {0, 20}) {
            const Batch b = make_batch(R, V, seed);
            DeviceBatch d(b, n_top);
            const Result want = d.run();
            DeviceArray<uint8_t> scratch(cuda::sample_scratch_bytes(R));
            for (int parts : {-1, 1, 2, 7, 1000}) {
                cuda::SampleScratch sc;
                sc.p = scratch.data();
                sc.bytes = scratch.size();
                sc.parts = parts;
                const Result got = d.run(&sc);
                const std::string what = str("R ", R, " V ", V, " n_top ", n_top, " parts ", parts, " (",
                                             cuda::sample_parts(R, V, sms, parts), ")");
                EXPECT_EQ(got.ids, want.ids) << what;
                EXPECT_EQ(0, std::memcmp(got.logprob.data(), want.logprob.data(), want.logprob.size() * sizeof(float)))
                    << what;
                EXPECT_EQ(got.top_ids, want.top_ids) << what;
                EXPECT_EQ(0, std::memcmp(got.top_logprobs.data(), want.top_logprobs.data(),
                                         want.top_logprobs.size() * sizeof(float)))
                    << what;
            }
        }
    // Too little scratch for the parts asked is refused before any launch.
    const Batch b = make_batch(2, 4096, 24);
    DeviceBatch d(b, 0);
    DeviceArray<uint8_t> small(cuda::sample_scratch_bytes(2, 4) - 1);
    cuda::SampleScratch sc;
    sc.p = small.data();
    sc.bytes = small.size();
    sc.parts = 4;
    test::expect_error([&] { d.launch(nullptr, &sc); }, {"sample_rows", "scratch"});
}

// A row's token depends on its logits, parameters and key only: not on its position in the
// batch or on the other rows.
TEST(CudaSampler, RowsAreIndependentOfTheBatch) {
    SAMPLER_SKIP_WITHOUT_GPU();
    const Batch full = make_batch(36, 8192, 8);
    DeviceBatch df(full, 3);
    const Result a = df.run();
    Batch rev = full;   // the same rows in reverse order, every other one dropped
    rev.logits.clear();
    rev.kind.clear();
    rev.params.clear();
    rev.seed.clear();
    rev.index.clear();
    std::vector<int64_t> from;
    for (int64_t r = full.R - 1; r >= 0; r -= 2) {
        from.push_back(r);
        rev.logits.insert(rev.logits.end(), full.row(r), full.row(r) + full.V);
        rev.kind.push_back(full.kind[static_cast<size_t>(r)]);
        rev.params.push_back(full.params[static_cast<size_t>(r)]);
        rev.seed.push_back(full.seed[static_cast<size_t>(r)]);
        rev.index.push_back(full.index[static_cast<size_t>(r)]);
    }
    rev.R = static_cast<int64_t>(from.size());
    DeviceBatch dr(rev, 3);
    const Result b = dr.run();
    for (size_t i = 0; i < from.size(); ++i) {
        const size_t r = static_cast<size_t>(from[i]);
        EXPECT_EQ(b.ids[i], a.ids[r]) << "row " << r;
        EXPECT_EQ(b.logprob[i], a.logprob[r]) << "row " << r;
        for (size_t j = 0; j < 3; ++j) EXPECT_EQ(b.top_ids[i * 3 + j], a.top_ids[r * 3 + j]) << "row " << r;
    }
}

TEST(CudaSampler, GraphReplayEqualsEager) {
    SAMPLER_SKIP_WITHOUT_GPU();
    Batch b = make_batch(48, 129280, 9);
    DeviceBatch d(b, 4);
    cudaStream_t s = nullptr;
    CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    CUDA_CHECK(cudaDeviceSynchronize());
    CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    d.launch(s);
    CUDA_CHECK(cudaStreamEndCapture(s, &graph));
    CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    std::mt19937_64 keys(10);
    for (int round = 0; round < 3; ++round) {   // new keys in the same buffers each round
        for (size_t r = 0; r < b.seed.size(); ++r) {
            b.seed[r] = keys();
            b.index[r] = static_cast<int64_t>(keys() % 1000);
        }
        d.set_keys(b.seed, b.index);
        d.ids.fill(0xFF);
        CUDA_CHECK(cudaDeviceSynchronize());   // uploads and fills ran on the legacy stream
        CUDA_CHECK(cudaGraphLaunch(exec, s));
        CUDA_CHECK(cudaStreamSynchronize(s));
        const Result g = d.download();
        const Result e = d.run();
        EXPECT_EQ(g.ids, e.ids) << "round " << round;
        EXPECT_EQ(0, std::memcmp(g.logprob.data(), e.logprob.data(), g.logprob.size() * sizeof(float)));
        EXPECT_EQ(g.top_ids, e.top_ids);
        Tally t;
        compare(b, g, 4, t);
        EXPECT_EQ(t.diffs, 0);
    }
    CUDA_CHECK(cudaGraphExecDestroy(exec));
    CUDA_CHECK(cudaGraphDestroy(graph));
    CUDA_CHECK(cudaStreamDestroy(s));
}

// ---------------------------------------------------------------------------- edge rows

TEST(CudaSampler, RowWithoutValidLogitGivesMinusOne) {
    SAMPLER_SKIP_WITHOUT_GPU();
    Batch b = make_batch(3, 300, 11);
    for (int64_t i = 0; i < b.V; ++i) b.logits[static_cast<size_t>(b.V + i)] = i % 2 ? -kInf : kNaN;   // row 1
    b.params = {make(1.0f, 0, 0.9f), make(0.7f, 5, 0.9f, 0.1f), make(0.0f)};
    DeviceBatch d(b, 2);
    const Result g = d.run();
    EXPECT_EQ(g.ids[1], -1);
    EXPECT_EQ(g.logprob[1], -kInf);
    EXPECT_EQ(g.top_ids[2], -1);
    EXPECT_EQ(g.top_ids[3], -1);
    EXPECT_EQ(g.top_logprobs[2], -kInf);
    for (int64_t r : {0, 2}) {
        Sampler s(b.params[static_cast<size_t>(r)], b.seed[static_cast<size_t>(r)]);
        EXPECT_EQ(g.ids[static_cast<size_t>(r)], s.sample(b.row(r), b.V, b.index[static_cast<size_t>(r)]));
    }
}

TEST(CudaSampler, MaskLogitsWritesMinusInfinity) {
    SAMPLER_SKIP_WITHOUT_GPU();
    const int64_t R = 5, V = 1000;
    std::vector<float> l(static_cast<size_t>(R * V));
    for (size_t i = 0; i < l.size(); ++i) l[i] = static_cast<float>(i % 97);
    const std::vector<int32_t> ids = {0, 999, 500, -3, 1000, 500};   // out-of-range ids are skipped
    DeviceArray<float> dl(l);
    DeviceArray<int32_t> di(ids);
    CUDA_CHECK(cudaDeviceSynchronize());
    cuda::mask_logits(dl.data(), R, V, di.data(), static_cast<int64_t>(ids.size()), nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<float> got = dl.download();
    for (int64_t r = 0; r < R; ++r)
        for (int64_t i = 0; i < V; ++i) {
            const size_t at = static_cast<size_t>(r * V + i);
            if (i == 0 || i == 999 || i == 500)
                EXPECT_EQ(got[at], -kInf) << r << " " << i;
            else
                EXPECT_EQ(got[at], l[at]) << r << " " << i;
        }
}

// ---------------------------------------------------------------------------- speed

TEST(CudaSampler, DecodeBatchOf256IsFast) {
    SAMPLER_SKIP_WITHOUT_GPU();
    // LM-like rows (a broad background and a few strong candidates) under a realistic mix.
    constexpr int64_t R = 256, V = 129280;
    Batch b;
    b.R = R;
    b.V = V;
    std::mt19937 rng(12);
    const std::vector<SamplingParams> mix = {make(0.6f, 0, 0.95f), make(1.0f), make(0.0f), make(0.8f, 40, 0.9f, 0.05f)};
    for (int64_t r = 0; r < R; ++r) {
        const std::vector<float> l = make_row(9, V, rng);
        b.logits.insert(b.logits.end(), l.begin(), l.end());
        b.kind.push_back(9);
        b.params.push_back(mix[static_cast<size_t>(r % 4)]);
        b.seed.push_back(rng());
        b.index.push_back(r);
    }
    for (int n_top : {0, 20}) {
        DeviceBatch d(b, n_top);
        cudaStream_t s = nullptr;
        CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
        CUDA_CHECK(cudaDeviceSynchronize());
        for (int i = 0; i < 3; ++i) d.launch(s);   // warm-up
        cudaEvent_t e0, e1;
        CUDA_CHECK(cudaEventCreate(&e0));
        CUDA_CHECK(cudaEventCreate(&e1));
        constexpr int kIters = 20;
        CUDA_CHECK(cudaEventRecord(e0, s));
        for (int i = 0; i < kIters; ++i) d.launch(s);
        CUDA_CHECK(cudaEventRecord(e1, s));
        CUDA_CHECK(cudaEventSynchronize(e1));
        float ms = 0.0f;
        CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
        ms /= kIters;
        std::printf("    sample_rows(R %lld, V %lld, n_top %d): %.1f us\n", static_cast<long long>(R),
                    static_cast<long long>(V), n_top, ms * 1000.0);
        EXPECT_LT(ms, 1.0f) << "a decode step's sampling should take well under a millisecond";
        CUDA_CHECK(cudaEventDestroy(e0));
        CUDA_CHECK(cudaEventDestroy(e1));
        CUDA_CHECK(cudaStreamDestroy(s));
    }
}

// ---------------------------------------------------------------------------- arguments

// The checks run before any CUDA call, so this runs in every CUDA build, GPU or not.
TEST(CudaSampler, RejectsBadArguments) {
    using test::expect_error;
    const auto fake = [](auto* tag) { return reinterpret_cast<decltype(tag)>(uintptr_t{1} << 20); };
    float* f = fake(static_cast<float*>(nullptr));
    int32_t* i = fake(static_cast<int32_t*>(nullptr));
    cuda::SampleParams p;
    p.temperature = f;
    p.top_k = i;
    p.top_p = f;
    p.min_p = f;
    p.seed = fake(static_cast<uint64_t*>(nullptr));
    p.index = fake(static_cast<int64_t*>(nullptr));
    cuda::SampleOutputs o;
    o.ids = i;
    expect_error([&] { cuda::sample_rows(f, -1, 100, p, o, nullptr); }, {"sample_rows", "R=-1"});
    expect_error([&] { cuda::sample_rows(f, 1, 0, p, o, nullptr); }, {"sample_rows", "V=0"});
    expect_error([&] { cuda::sample_rows(f, 1, 262145, p, o, nullptr); }, {"sample_rows", "V=262145"});
    cuda::SampleOutputs bad = o;
    bad.n_top = 21;
    expect_error([&] { cuda::sample_rows(f, 1, 100, p, bad, nullptr); }, {"sample_rows", "n_top=21"});
    bad.n_top = 3;   // without top arrays
    expect_error([&] { cuda::sample_rows(f, 1, 100, p, bad, nullptr); }, {"sample_rows", "n_top=3"});
    cuda::SampleParams np = p;
    np.seed = nullptr;
    expect_error([&] { cuda::sample_rows(f, 1, 100, np, o, nullptr); }, {"sample_rows", "seed"});
    expect_error([&] { cuda::sample_rows(nullptr, 1, 100, p, o, nullptr); }, {"sample_rows", "null"});
    cuda::sample_rows(nullptr, 0, 100, cuda::SampleParams{}, cuda::SampleOutputs{}, nullptr);   // R = 0: nothing
    expect_error([&] { cuda::mask_logits(f, -1, 100, i, 1, nullptr); }, {"mask_logits"});
    cuda::mask_logits(nullptr, 3, 100, nullptr, 0, nullptr);   // nothing to mask
}

// resolve_next_tokens against its twin: a speculative step's next tokens, given ones mixed with
// references to drawn rows, at the shapes a step has (a few tokens, a long prompt chunk, one).
TEST(CudaSampler, ResolveNextTokensMatchesTwin) {
    SAMPLER_SKIP_WITHOUT_GPU();
    std::mt19937 rng(7);
    for (int64_t T : {int64_t{1}, int64_t{2}, int64_t{37}, int64_t{300}, int64_t{8192}}) {
        const int64_t R = std::max<int64_t>(1, T / 3);
        std::vector<int32_t> given(static_cast<size_t>(T)), drawn(static_cast<size_t>(R));
        for (int32_t& d : drawn) d = static_cast<int32_t>(rng() % 129280);
        for (int64_t t = 0; t < T; ++t)
            given[static_cast<size_t>(t)] = rng() % 2 ? static_cast<int32_t>(rng() % 129280)
                                                      : -1 - static_cast<int32_t>(rng() % static_cast<uint32_t>(R));
        std::vector<int32_t> want(static_cast<size_t>(T));
        resolve_next_tokens(given.data(), drawn.data(), T, want.data());
        DeviceArray<int32_t> g(given), d(drawn), out(static_cast<size_t>(T));
        cuda::resolve_next_tokens(g.data(), d.data(), T, out.data(), nullptr);
        CUDA_CHECK(cudaDeviceSynchronize());
        EXPECT_EQ(out.download(), want) << "T " << T;
    }
    test::expect_error([] { cuda::resolve_next_tokens(nullptr, nullptr, 4, nullptr, nullptr); }, {"must not be null"});
}

// ---- speculative acceptance: spec_accept_rows against ref/speculative.cpp's rule (spec_accepts,
// spec_residual) over serve/sampler.h's sampling_weights, and sample_rows' given / stream /
// index_offset inputs and keep_draft_rows, which the runner's speculative steps use.
//
// Rows p of every kind under the parameter mix (make_batch), each with a draft row q: p plus noise
// of 0.3 (drafts accepted often, and rejected with residual draws), an unrelated row, or p itself
// (every draft accepted). Drafts: draws from q's weights with the draft stream, and on every fourth
// round arbitrary ids (q(d) = 0 among them). Decisions and tokens must be the twin's: the weights
// are the same correctly rounded f32 operations and every sum and comparison is an exact integer
// (up to 0.1% allowed and printed, as for sample_rows above).
void check_spec_accept(int64_t R, int64_t V, int rounds, uint32_t seed) {
    Batch b = make_batch(R, V, seed);
    std::mt19937 rng(seed + 1);
    std::normal_distribution<float> nd(0.0f, 0.3f);
    std::vector<float> q(b.logits.size());
    for (int64_t r = 0; r < R; ++r) {
        float* qr = q.data() + r * V;
        const float* pr = b.row(r);
        if (r % 3 == 1) {
            const std::vector<float> other = make_row(static_cast<int>((r + 5) % kKinds), V, rng);
            std::copy(other.begin(), other.end(), qr);
        } else {
            for (int64_t v = 0; v < V; ++v) qr[v] = r % 3 == 0 && std::isfinite(pr[v]) ? pr[v] + nd(rng) : pr[v];
        }
    }
    std::vector<std::vector<uint64_t>> Wp, Wq;
    for (int64_t r = 0; r < R; ++r) {
        Wp.push_back(sampling_weights(b.params[static_cast<size_t>(r)], b.row(r), V));
        Wq.push_back(sampling_weights(b.params[static_cast<size_t>(r)], q.data() + r * V, V));
    }
    DeviceBatch db(b, 0);
    DeviceArray<float> dq(q);
    std::vector<int64_t> rows(static_cast<size_t>(R));
    for (int64_t r = 0; r < R; ++r) rows[static_cast<size_t>(r)] = (r * 7) % R;   // q rows in another order
    std::vector<float> q_perm(q.size());
    for (int64_t r = 0; r < R; ++r)
        std::copy(q.begin() + r * V, q.begin() + (r + 1) * V, q_perm.begin() + rows[static_cast<size_t>(r)] * V);
    dq.upload(q_perm);
    DeviceArray<int64_t> q_row(rows);
    DeviceArray<int32_t> draft(static_cast<size_t>(R)), given(static_cast<size_t>(R)), accepted(static_cast<size_t>(R));
    int64_t n = 0, n_acc = 0, n_rej = 0, diff = 0;
    for (int round = 0; round < rounds; ++round) {
        std::vector<uint64_t> seeds(static_cast<size_t>(R));
        std::vector<int64_t> index(static_cast<size_t>(R));
        std::vector<int32_t> d(static_cast<size_t>(R));
        for (int64_t r = 0; r < R; ++r) {
            seeds[static_cast<size_t>(r)] = (static_cast<uint64_t>(rng()) << 32) | rng();
            index[static_cast<size_t>(r)] = static_cast<int64_t>(rng() % 100000);
            const std::vector<uint64_t>& w = Wq[static_cast<size_t>(r)];
            d[static_cast<size_t>(r)] = round % 4 == 3 ? static_cast<int32_t>(rng() % static_cast<uint32_t>(V))
                                                       : spec_draw(w.data(), V, sampling_bits(seeds[static_cast<size_t>(r)], index[static_cast<size_t>(r)], cuda::kStreamDraft));
        }
        db.set_keys(seeds, index);
        draft.upload(d);
        cuda::SpecAcceptArgs a;
        a.p = db.logits.data();
        a.check.q = dq.data();
        a.check.q_row = q_row.data();
        a.check.draft = draft.data();
        a.params = db.params();
        a.given = given.data();
        a.check.accepted = accepted.data();
        CUDA_CHECK(cudaDeviceSynchronize());
        cuda::spec_accept_rows(a, R, V, nullptr);
        CUDA_CHECK(cudaDeviceSynchronize());
        const std::vector<int32_t> g = given.download(), acc = accepted.download();
        // The fused form (sample_rows with the check; its twin is the composition): the same
        // tokens, with logprobs of them, and the same flags; unchecked rows (q_row -1 on every
        // fifth round) draw as sample_rows does.
        {
            std::vector<int64_t> qr2 = rows;
            if (round % 5 == 4)
                for (int64_t r = 0; r < R; r += 3) qr2[static_cast<size_t>(r)] = -1;
            DeviceArray<int64_t> q_row2(qr2);
            DeviceArray<int32_t> given2(static_cast<size_t>(R)), acc2(static_cast<size_t>(R)), ids2(static_cast<size_t>(R));
            DeviceArray<float> lp2(static_cast<size_t>(R));
            a.check.q_row = q_row2.data();
            a.given = given2.data();
            a.check.accepted = acc2.data();
            cuda::spec_accept_rows(a, R, V, nullptr);   // the unfused composition: decisions as given ids ...
            cuda::SampleParams sp = a.params;
            sp.given = given2.data();
            cuda::SampleOutputs so;
            so.ids = ids2.data();
            so.logprob = lp2.data();
            cuda::sample_rows(db.logits.data(), R, V, sp, so, nullptr);   // ... then the draws
            CUDA_CHECK(cudaDeviceSynchronize());
            const std::vector<int32_t> want_ids = ids2.download(), want_acc = acc2.download();
            const std::vector<float> want_lp = lp2.download();
            DeviceArray<int32_t> ids3(static_cast<size_t>(R)), acc3(static_cast<size_t>(R));
            DeviceArray<float> lp3(static_cast<size_t>(R));
            cuda::SpecCheck check = a.check;
            check.accepted = acc3.data();
            so.ids = ids3.data();
            so.logprob = lp3.data();
            cuda::sample_rows(db.logits.data(), R, V, a.params, so, nullptr, &check);
            CUDA_CHECK(cudaDeviceSynchronize());
            const std::vector<float> got_lp = lp3.download();
            EXPECT_EQ(ids3.download(), want_ids) << "round " << round;
            EXPECT_EQ(acc3.download(), want_acc) << "round " << round;
            for (int64_t r = 0; r < R; ++r)
                EXPECT_TRUE(std::memcmp(&got_lp[static_cast<size_t>(r)], &want_lp[static_cast<size_t>(r)], 4) == 0)
                    << "round " << round << " row " << r;
            if (round % 5 != 4) {
                for (int64_t r = 0; r < R; ++r)
                    if (g[static_cast<size_t>(r)] >= 0) {
                        EXPECT_EQ(want_ids[static_cast<size_t>(r)], g[static_cast<size_t>(r)]) << "round " << round << " row " << r;
                    }
            }
            a.check.q_row = q_row.data();
            a.given = given.data();
            a.check.accepted = accepted.data();
        }
        for (int64_t r = 0; r < R; ++r) {
            const size_t i = static_cast<size_t>(r);
            const std::vector<uint64_t>& wp = Wp[i];
            const std::vector<uint64_t>& wq = Wq[i];
            const int32_t dr = d[i];
            bool ok;
            int32_t want;
            if (b.params[i].greedy()) {
                const int32_t best = static_cast<int32_t>(std::max_element(wp.begin(), wp.end()) - wp.begin());
                ok = dr == best;
                want = ok ? dr : best;
            } else {
                uint64_t Mp = 0, Mq = 0;
                for (uint64_t x : wp) Mp += x;
                for (uint64_t x : wq) Mq += x;
                ok = spec_accepts(wp[static_cast<size_t>(dr)], Mp, wq[static_cast<size_t>(dr)], Mq,
                                  sampling_bits(seeds[i], index[i], cuda::kStreamAccept));
                want = ok ? dr : spec_residual(wp.data(), wq.data(), V, sampling_bits(seeds[i], index[i], cuda::kStreamResidual));
            }
            ++n;
            n_acc += ok, n_rej += !ok;
            if (g[i] != want || (acc[i] != 0) != ok) {
                if (++diff <= 10)
                    std::printf("  row %ld (%s, T %.2f k %d p %.3f min_p %.3f) draft %d: GPU %d (accepted %d), CPU %d (accepted %d)\n",
                                static_cast<long>(r), kind_name(b.kind[i]), b.params[i].temperature, b.params[i].top_k,
                                b.params[i].top_p, b.params[i].min_p, dr, g[i], acc[i], want, ok ? 1 : 0);
            }
        }
    }
    std::printf("[ spec accept | V %ld ] %ld checks: %ld accepted, %ld rejected (residual draws); %ld differ from the twin\n",
                static_cast<long>(V), static_cast<long>(n), static_cast<long>(n_acc), static_cast<long>(n_rej),
                static_cast<long>(diff));
    EXPECT_LE(diff * 1000, n);
    EXPECT_GT(n_acc, n / 10);
    EXPECT_GT(n_rej, n / 10);
}

TEST(CudaSampler, SpecAcceptMatchesCpuRuleAtFullVocabulary) {
    SAMPLER_SKIP_WITHOUT_GPU();
    check_spec_accept(48, 129280, 8, 31);
}

TEST(CudaSampler, SpecAcceptMatchesCpuRuleAtOddVocabularies) {
    SAMPLER_SKIP_WITHOUT_GPU();
    check_spec_accept(60, 1000, 20, 32);
    check_spec_accept(36, 7, 40, 33);
}

// sample_rows with given ids (reported with their logprobs, not drawn), and with the draft stream
// and an index offset (the draw of spec_draw over sampling_weights with sampling_bits(seed,
// index + offset, stream)); keep_draft_rows copies rows to (slot, k) places.
TEST(CudaSampler, GivenIdsStreamsAndKeptRows) {
    SAMPLER_SKIP_WITHOUT_GPU();
    const int64_t R = 36, V = 1000;
    const Batch b = make_batch(R, V, 41);
    DeviceBatch db(b, 2);
    std::vector<int32_t> given(static_cast<size_t>(R), -1);
    for (int64_t r = 0; r < R; r += 2) given[static_cast<size_t>(r)] = static_cast<int32_t>((r * 37) % V);
    DeviceArray<int32_t> dg(given);
    cuda::SampleParams p = db.params();
    p.given = dg.data();
    p.stream = cuda::kStreamDraft;
    p.index_offset = 1;
    cuda::SampleOutputs o;
    o.ids = db.ids.data();
    o.logprob = db.logprob.data();
    o.n_top = 2;
    o.top_ids = db.top_ids.data();
    o.top_logprobs = db.top_logprobs.data();
    CUDA_CHECK(cudaDeviceSynchronize());
    cuda::sample_rows(db.logits.data(), R, V, p, o, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    const Result g = db.download();
    for (int64_t r = 0; r < R; ++r) {
        const size_t i = static_cast<size_t>(r);
        int32_t want = given[i];
        if (want < 0) {
            const std::vector<uint64_t> w = sampling_weights(b.params[i], b.row(r), V);
            want = spec_draw(w.data(), V, sampling_bits(b.seed[i], b.index[i] + 1, cuda::kStreamDraft));
        }
        EXPECT_EQ(g.ids[i], want) << "row " << r;
        const float lp = token_logprob(b.row(r), V, g.ids[i]);
        EXPECT_TRUE(std::isinf(lp) ? g.logprob[i] == lp : logprob_close(g.logprob[i], lp)) << "row " << r;
    }
    // keep_draft_rows: rows 2, 0 to slots 3 and 1 at k = 2 of 3 per slot; slot -1 skipped.
    DeviceArray<float> dst(static_cast<size_t>(5 * 3 * V));
    dst.upload(std::vector<float>(static_cast<size_t>(5 * 3 * V), 0.0f));
    DeviceArray<int32_t> rows(std::vector<int32_t>{2, 0, 1}), slots(std::vector<int32_t>{3, 1, -1});
    cuda::keep_draft_rows(db.logits.data(), rows.data(), slots.data(), 3, V, 2, 3, dst.data(), nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<float> kept = dst.download();
    for (int64_t v = 0; v < V; ++v) {
        const float a = kept[static_cast<size_t>((3 * 3 + 2) * V + v)], want_a = b.row(2)[v];
        const float c = kept[static_cast<size_t>((1 * 3 + 2) * V + v)], want_c = b.row(0)[v];
        ASSERT_TRUE(std::memcmp(&a, &want_a, 4) == 0 && std::memcmp(&c, &want_c, 4) == 0) << "id " << v;
    }
    int64_t nonzero = 0;
    for (float x : kept) nonzero += x != 0.0f;
    int64_t want_nonzero = 0;
    for (int64_t v = 0; v < V; ++v) want_nonzero += (b.row(2)[v] != 0.0f) + (b.row(0)[v] != 0.0f);
    EXPECT_EQ(nonzero, want_nonzero) << "writes outside the two kept rows";
    test::expect_error([] { cuda::keep_draft_rows(nullptr, nullptr, nullptr, 1, 10, 3, 3, nullptr, nullptr); }, {"bad shape"});
    test::expect_error([] { cuda::spec_accept_rows(cuda::SpecAcceptArgs{}, 2, 10, nullptr); }, {"must not be null"});
    cuda::SpecCheck partial;
    partial.q_row = reinterpret_cast<const int64_t*>(db.index.data());
    test::expect_error([&] { cuda::sample_rows(db.logits.data(), R, V, p, o, nullptr, &partial); }, {"draft check"});
}

}  // namespace
}  // namespace megamoe

#else

TEST(CudaSampler, SkippedWithoutCuda) { GTEST_SKIP() << "built without CUDA"; }

#endif
