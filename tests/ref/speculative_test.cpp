// speculative_test.cpp — speculative decoding with the MTP block as the draft (ref/speculative.h) on
// the golden checkpoints: state rollback bit for bit, greedy output unchanged, sampled output with
// the main model's distribution.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <random>

#include "io/safetensors.h"
#include "ref/generate.h"
#include "ref/speculative.h"
#include "serve/sampler.h"
#include "ref/spec_exact.h"
#include "test_util.h"

namespace megamoe {
namespace {

// ---- serve::Sampler's definition as the speculative decoder's SpeculativeSampling

SpeculativeSampling sampler_sampling(const SamplingParams& sp, uint64_t seed) {
    SpeculativeSampling s;
    s.weights = [sp](const float* logits, int64_t V, std::vector<uint64_t>& W) { W = sampling_weights(sp, logits, V); };
    s.bits = [seed](SpecStream stream, int64_t index) { return sampling_bits(seed, index, static_cast<uint32_t>(stream)); };
    return s;
}


// ---- the rule's arithmetic

// spec_accepts against the rational comparison x / 2^53 < (wp / Mp) / (wq / Mq), taken in long
// double where that is exact enough, and at the exact boundary.
TEST(SpecRule, AcceptIsTheExactRatioTest) {
    const uint64_t two53 = uint64_t{1} << 53;
    // Ratio >= 1: always accepted, even at the largest x.
    EXPECT_TRUE(spec_accepts(3, 10, 2, 10, two53 - 1));
    EXPECT_TRUE(spec_accepts(5, 10, 5, 10, two53 - 1));
    // p(d) = 0: never accepted, even at x = 0.
    EXPECT_FALSE(spec_accepts(0, 10, 5, 10, 0));
    // q(d) = 0 (not drawn from q): accepted when p(d) > 0.
    EXPECT_TRUE(spec_accepts(1, 10, 0, 10, two53 - 1));
    // Ratio 1/2 exactly: x = 2^52 - 1 accepted, 2^52 not (u < 1/2 strictly).
    EXPECT_TRUE(spec_accepts(1, 4, 2, 4, (uint64_t{1} << 52) - 1));
    EXPECT_FALSE(spec_accepts(1, 4, 2, 4, uint64_t{1} << 52));
    // Products past 2^64 (weights near 2^62, as the sampler's fixed point gives): ratio = wp / wq with
    // Mp = Mq, compared against a long-double evaluation away from the boundary.
    std::mt19937_64 rng(7);
    int checked = 0;
    for (int i = 0; i < 20000; ++i) {
        const uint64_t M = (uint64_t{1} << 62) + (rng() >> 3);
        const uint64_t wp = rng() % M, wq = 1 + rng() % (M - 1), Mq = M - (rng() >> 40);
        const uint64_t x = rng() >> 11;
        const long double ratio = (static_cast<long double>(wp) / M) / (static_cast<long double>(wq) / Mq);
        const long double u = std::ldexp(static_cast<long double>(x), -53);
        if (std::fabs(u - ratio) < 1e-15L) continue;
        ASSERT_EQ(spec_accepts(wp, M, wq, Mq, x), u < ratio) << i;
        ++checked;
    }
    EXPECT_GT(checked, 19000);
}

// mul_shift53 is floor(x · b / 2^53) for 179-bit products: checked with a long multiplication
// in 32-bit limbs.
TEST(SpecRule, MulShift53IsExact) {
    using u128 = unsigned __int128;
    std::mt19937_64 rng(11);
    for (int i = 0; i < 20000; ++i) {
        const uint64_t x = rng() >> 11;
        const u128 b = ((static_cast<u128>(rng()) << 64) | rng()) >> (2 + rng() % 100);
        uint32_t xl[2] = {static_cast<uint32_t>(x), static_cast<uint32_t>(x >> 32)};
        uint32_t bl[4];
        for (int k = 0; k < 4; ++k) bl[k] = static_cast<uint32_t>(b >> (32 * k));
        uint64_t prod[7] = {};
        for (int a = 0; a < 2; ++a)
            for (int c = 0; c < 4; ++c) {
                uint64_t carry = static_cast<uint64_t>(xl[a]) * bl[c];
                for (int k = a + c; carry; ++k) {
                    const uint64_t s = prod[k] + (carry & 0xffffffffu);
                    prod[k] = s & 0xffffffffu;
                    carry = (carry >> 32) + (s >> 32);
                }
            }
        // The 6-limb product (< 2^179) shifted right by 53 bits: limb k at bit 32 k - 53.
        u128 want = prod[1] >> 21;
        for (int k = 2; k <= 5; ++k) want += static_cast<u128>(prod[k]) << (32 * k - 53);
        ASSERT_TRUE(mul_shift53(x, b) == want) << i;
    }
}

// spec_residual draws from max(0, p - q): its frequencies over many keys against the exact
// residual distribution, and the id it picks at a boundary of the cumulative sums.
TEST(SpecRule, ResidualDrawsFromPositivePartOfPMinusQ) {
    const std::vector<uint64_t> Wp = {10, 0, 30, 40, 20}, Wq = {40, 10, 10, 40, 0};   // Mp = Mq = 100
    // max(0, p - q) = {0, 0, 0.2, 0, 0.2}: ids 2 and 4, half each.
    const uint64_t two53 = uint64_t{1} << 53;
    EXPECT_EQ(spec_residual(Wp.data(), Wq.data(), 5, 0), 2);
    EXPECT_EQ(spec_residual(Wp.data(), Wq.data(), 5, two53 / 2 - 1), 2);
    EXPECT_EQ(spec_residual(Wp.data(), Wq.data(), 5, two53 / 2), 4);
    EXPECT_EQ(spec_residual(Wp.data(), Wq.data(), 5, two53 - 1), 4);
    // p == q: no residual mass.
    EXPECT_EQ(spec_residual(Wp.data(), Wp.data(), 5, 123), -1);
    // Different totals (Mp = 7, Mq = 13): R_v = max(0, Wp_v · 13 - Wq_v · 7) = {0, 13, 0, 11}.
    const std::vector<uint64_t> a = {1, 1, 2, 3}, b = {5, 0, 4, 4};
    int n1 = 0, n3 = 0;
    for (uint64_t k = 0; k < 24; ++k) {   // x = ceil(k 2^53 / 24): the draw's target is k
        const int32_t id = spec_residual(a.data(), b.data(), 4, (k * two53 + 23) / 24);
        n1 += id == 1, n3 += id == 3;
    }
    EXPECT_EQ(n1, 13);
    EXPECT_EQ(n3, 11);
    // spec_draw is the sampler's step 8.
    for (uint64_t x : {uint64_t{0}, two53 / 3, two53 - 1})
        EXPECT_EQ(spec_draw(Wp.data(), 5, x), [&] {
            const uint64_t t = draw_target(x, 100);
            uint64_t acc = 0;
            for (int i = 0; i < 5; ++i)
                if ((acc += Wp[static_cast<size_t>(i)]) > t) return i;
            return -1;
        }());
    const std::vector<uint64_t> zero(4, 0);
    EXPECT_EQ(spec_draw(zero.data(), 4, 0), -1);
    const std::vector<uint64_t> huge = {uint64_t{1} << 62, uint64_t{1} << 62};
    test::expect_error([&] { spec_draw(huge.data(), 2, 0); }, {"2^63"});
}

// ---- goldens

struct Case {
    std::unique_ptr<Model> model;
    std::vector<int32_t> ids;   // the golden's input ids
};

const Case* golden(const std::string& name) {
    static std::map<std::string, std::unique_ptr<Case>> cache;
    const std::string dir = test::golden_dir(name);
    if (!std::filesystem::exists(dir + "/mtp.safetensors")) return nullptr;
    auto& g = cache[name];
    if (!g) {
        g = std::make_unique<Case>();
        g->model = Model::load(dir + "/model");
        SafetensorsFile f(dir + "/mtp.safetensors");
        Tensor ids = f.view(*f.find("input_ids"));
        for (int64_t i = 0; i < ids.numel(); ++i) g->ids.push_back(static_cast<int32_t>(ids.as<int64_t>()[i]));
    }
    return g.get();
}

class SpecCase : public ::testing::TestWithParam<std::string> {
protected:
    const Case* g = nullptr;
    void SetUp() override {
        g = golden(GetParam());
        if (!g) {
#ifdef MEGAMOE_ALLOW_MISSING_GOLDEN
            GTEST_SKIP() << "no MTP golden for " << GetParam();
#else
            FAIL() << "no MTP golden for " << GetParam();
#endif
        }
    }
    std::vector<int32_t> ids(int64_t from, int64_t n) const {
        return std::vector<int32_t>(g->ids.begin() + from, g->ids.begin() + from + n);
    }
};

bool same_floats(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

// Every field of two sequence states, bit for bit; the first difference in `why`.
bool same_state(const SequenceState& a, const SequenceState& b, std::string& why) {
    auto comp = [&](const CompressorState& x, const CompressorState& y, const std::string& at) {
        if (x.n_pending != y.n_pending || x.n_rows != y.n_rows) return why = at + " counters", false;
        if (!same_floats(x.pending_kv, y.pending_kv) || !same_floats(x.pending_gate, y.pending_gate))
            return why = at + " pending", false;
        if (!same_floats(x.prev_kv, y.prev_kv) || !same_floats(x.prev_gate, y.prev_gate)) return why = at + " prev", false;
        if (!same_floats(x.rows, y.rows)) return why = at + " rows", false;
        return true;
    };
    auto layer = [&](const LayerState& x, const LayerState& y, const std::string& at) {
        if (x.n_window != y.n_window || !same_floats(x.window, y.window)) return why = at + " window", false;
        return comp(x.comp, y.comp, at + " compressor") && comp(x.index_comp, y.index_comp, at + " indexer compressor");
    };
    if (a.n_past != b.n_past) return why = "n_past", false;
    if (a.layers.size() != b.layers.size()) return why = "layer count", false;
    for (size_t l = 0; l < a.layers.size(); ++l)
        if (!layer(a.layers[l], b.layers[l], "layer " + std::to_string(l))) return false;
    if (a.mtp.n_past != b.mtp.n_past) return why = "mtp n_past", false;
    return layer(a.mtp.layer, b.mtp.layer, "mtp");
}

void run(const Model& m, SequenceState& st, std::vector<int32_t> tokens, std::vector<float>* streams = nullptr) {
    std::vector<float> logits;
    ForwardOptions opt;
    opt.streams_out = streams;
    std::vector<SequenceChunk> b{{&st, std::move(tokens)}};
    forward(m, b, opt, logits);
}

// ---- rollback

// A verification of 4 tokens (x and 3 drafts), rolled back to j accepted drafts (restore, then the
// j+1 accepted tokens again), equals the state of a run of the accepted tokens only, and the state
// of one forward over the whole prefix: bit for bit, for prefixes where the step closes ratio-4 and
// ratio-16 compressor windows (tiny-flash: window 16, ratios 4 and 16) and a state whose MTP block
// has advanced (and is advanced again after the checkpoint, as chained drafts would).
TEST_P(SpecCase, RollbackEqualsRunningOnlyAcceptedTokens) {
    const Model& m = *g->model;
    const int64_t HD = m.cfg.hc_mult * m.cfg.hidden_size;
    int checked = 0;
    for (int64_t P : {3, 12, 13, 14, 15, 16, 30}) {
        const std::vector<int32_t> prompt = ids(0, P), step = ids(P, 4);   // step: x, d1, d2, d3
        for (int64_t j = 0; j <= 3; ++j) {
            const std::vector<int32_t> accepted(step.begin(), step.begin() + j + 1);
            std::vector<float> streams;
            auto prefill = [&](SequenceState& st) {
                run(m, st, prompt, &streams);
                std::vector<float> logits;
                std::vector<MtpChunk> mb{{&st, streams.data(), ids(1, P - 1)}};
                if (P > 1) mtp_forward(m, mb, ForwardOptions{}, logits);
            };
            SequenceState a(m.cfg);
            prefill(a);
            const StateCheckpoint cp = checkpoint_state(a);
            std::vector<float> vstreams, logits;
            run(m, a, step, &vstreams);
            std::vector<float> last(streams.end() - HD, streams.end());   // position P-1
            std::vector<MtpChunk> mb{{&a, last.data(), {step[0]}}};
            mtp_forward(m, mb, ForwardOptions{}, logits);   // the MTP state moves after the checkpoint
            restore_state(a, cp);
            run(m, a, accepted);

            SequenceState b(m.cfg);
            prefill(b);
            run(m, b, accepted);
            std::string why;
            EXPECT_TRUE(same_state(a, b, why)) << "P " << P << " j " << j << ": " << why;

            SequenceState c(m.cfg);   // one forward over prompt + accepted, then the same MTP positions
            std::vector<int32_t> all(prompt);
            all.insert(all.end(), accepted.begin(), accepted.end());
            run(m, c, all, &streams);
            std::vector<MtpChunk> mc{{&c, streams.data(), ids(1, P - 1)}};
            if (P > 1) mtp_forward(m, mc, ForwardOptions{}, logits);
            EXPECT_TRUE(same_state(a, c, why)) << "P " << P << " j " << j << " vs one forward: " << why;
            ++checked;
        }
    }
    EXPECT_EQ(checked, 28);
}

TEST_P(SpecCase, RestoreRefusesAnotherState) {
    const Model& m = *g->model;
    SequenceState a(m.cfg), b(m.cfg);
    run(m, a, ids(0, 20));
    const StateCheckpoint cp = checkpoint_state(a);
    run(m, b, ids(0, 3));
    test::expect_error([&] { restore_state(b, cp); }, {"fewer than the checkpoint's"});
}

// ---- greedy

// Greedy output with speculation equals greedy output without it, token for token (64 tokens),
// with the prompt in one chunk and in chunks of 5.
TEST_P(SpecCase, GreedyEqualsPlainGreedy) {
    const Model& m = *g->model;
    const int64_t N = 64;
    for (int64_t chunk : {0, 5}) {
        const std::vector<int32_t> prompt = ids(0, 12);
        const std::vector<int32_t> base = generate_greedy(m, prompt, N, chunk, true);
        ASSERT_EQ(static_cast<int64_t>(base.size()), N);
        for (int64_t K = 0; K <= 3; ++K) {
            SpeculativeOptions o;
            o.draft_tokens = K, o.chunk = chunk, o.ignore_eos = true;
            const SpeculativeResult r = generate_speculative(m, prompt, N, o);
            EXPECT_EQ(r.tokens, base) << "K " << K << " chunk " << chunk;
            const SpeculativeStats& s = r.stats;
            std::printf("[ spec ] %s greedy K=%ld chunk=%ld: %ld rounds, acceptance %ld/%ld = %.3f, %.3f tokens per "
                        "verification step, %ld rollbacks\n",
                        GetParam().c_str(), K, chunk, s.rounds, s.accepted, s.drafted, s.acceptance_rate(),
                        s.tokens_per_round(), s.rerun_steps);
            if (K == 0) {
                EXPECT_EQ(s.drafted, 0);
            } else {
                EXPECT_GT(s.drafted, 0);
            }
        }
    }
}

// The MTP block accepts as a draft model on these random weights only when it agrees with the main
// model; the acceptance path itself is exercised by always_accept, which must give the drafts.
TEST_P(SpecCase, AlwaysAcceptKeepsEveryDraft) {
    const Model& m = *g->model;
    SpeculativeOptions o;
    o.draft_tokens = 3, o.ignore_eos = true, o.rule = AcceptRule::always_accept;
    const SpeculativeResult r = generate_speculative(m, ids(0, 12), 21, o);
    EXPECT_EQ(r.stats.accepted, r.stats.drafted);
    EXPECT_EQ(r.stats.rerun_steps, 0);
    EXPECT_EQ(r.tokens.size(), 21u);
    EXPECT_EQ(r.stats.rounds, 5);   // 1 token from the prefill, then 4 tokens a round
}

TEST_P(SpecCase, BadInput) {
    const Model& m = *g->model;
    SpeculativeOptions o;
    o.draft_tokens = 4;
    test::expect_error([&] { generate_speculative(m, {1, 2}, 4, o); }, {"--speculative-tokens", "1..3", "got 4"});
    o.draft_tokens = -1;
    test::expect_error([&] { generate_speculative(m, {1, 2}, 4, o); }, {"--speculative-tokens", "got -1"});
    o.draft_tokens = 1;
    test::expect_error([&] { generate_speculative(m, std::vector<int32_t>{}, 4, o); }, {"prompt is empty"});
    o.draft_tokens = 0;
    const SpeculativePrefill plain = prefill_speculative(m, {1, 2}, o);
    o.draft_tokens = 1;
    test::expect_error([&] { generate_speculative(m, plain, 4, o); }, {"prefill was made for no drafts"});
    auto no_mtp = Model::load(test::golden_dir(GetParam()) + "/model");
    no_mtp->w.mtp.reset();
    test::expect_error([&] { generate_speculative(*no_mtp, {1, 2}, 4, o); }, {"--speculative-tokens", "mtp.0.*"});
}

// ---- sampling

// The sampling definition used here is serve::Sampler's: drawing from sampling_weights with
// sampling_bits (step 8) gives Sampler::sample's token, and stream 0 is the plain key.
TEST_P(SpecCase, SamplerWeightsAreTheSamplersDefinition) {
    const Model& m = *g->model;
    const int64_t V = m.cfg.vocab_size;
    const std::vector<float> logits = sequence_logits(m, ids(0, 6), Schedule{});   // [6, V]
    std::vector<SamplingParams> params(5);
    params[1].temperature = 0.7f, params[1].top_k = 3;
    params[2].temperature = 1.3f, params[2].top_p = 0.8f;
    params[3].temperature = 1.0f, params[3].min_p = 0.05f, params[3].top_k = 50;
    params[4].temperature = 0.0f;
    int n = 0;
    for (const SamplingParams& sp : params) {
        Sampler s(sp, 77);
        for (int64_t row = 0; row < 6; ++row) {
            const float* l = logits.data() + row * V;
            const std::vector<uint64_t> W = sampling_weights(sp, l, V);
            uint64_t M = 0;
            for (uint64_t x : W) M += x;
            for (int64_t index = 0; index < 50; ++index) {
                ASSERT_EQ(sampling_bits(77, index, static_cast<uint32_t>(SpecStream::sample)), sampling_bits(77, index));
                const uint64_t t = draw_target(sampling_bits(77, index), M);
                uint64_t acc = 0;
                int32_t ours = -1;
                for (int64_t i = 0; i < V && ours < 0; ++i)
                    if ((acc += W[static_cast<size_t>(i)]) > t) ours = static_cast<int32_t>(i);
                ASSERT_EQ(ours, s.sample(l, V, index)) << "row " << row << " index " << index;
                ++n;
            }
        }
    }
    EXPECT_EQ(n, 1500);
}

using test::rank_buckets;
constexpr int kBuckets = test::kRankBuckets;

// The first 2 sampled tokens: a (index 0, from the prefill) and b (index 1, the first token a
// speculative round decides: an accepted draft or a residual draw). The statistic is b's rank bucket
// under the main model's p(. | prompt, a), a function of the output, so its distribution with
// speculation must equal the one without: exactly Σ_a p(a) Σ_{b in bucket} p(b | a), computed here
// from the main model's logits after every a (a batched forward over copies of the prompt's state).
// Full vocabulary at temperature 1, so the MTP block's and the main model's distributions overlap
// and drafts are accepted (on these weights their top tokens differ, so a top-k would accept none).
// The L1 distance D = Σ |freq - P| over the k = 6 buckets, from n seeds, obeys
// P(D >= λ) <= 2^k exp(-n λ² / 2) (Bretagnolle-Huber-Carol); with λ = sqrt(2 (k ln 2 + ln(1/δ)) / n)
// and δ = 1e-6 a correct sampler fails a check with probability < 1e-6 (3 checks: < 3e-6). Runs
// without speculation (K = 0) and with K = 1 and 3 must pass; the broken always-accept rule (b is
// then the draft, distributed as the MTP block's q) must fail the same bound. The rate at which
// the first draft is accepted must be the rule's exact probability α = Σ_a p(a) Σ_v min(p(v | a),
// q(v | a)) (q: the MTP block's distribution after a), within Hoeffding's bound at δ = 1e-6.
TEST_P(SpecCase, SampledDistributionIsTheMainModels) {
    const Model& m = *g->model;
    SamplingParams sp;
    sp.temperature = 1.0f;
    const std::vector<int32_t> prompt = ids(0, 6);

    // Exact bucket probabilities, each a's bucket map, and the first draft's acceptance probability.
    const test::SpecExact ex = test::spec_exact(m, prompt, sp);
    const std::vector<std::vector<int>>& bucket_of = ex.bucket_of;   // [a][b]
    const std::vector<double>& exact = ex.exact;
    const double alpha = ex.alpha;

    const int64_t n = 1200;
    const double delta = 1e-6;
    const double lambda = test::l1_bound(kBuckets, n, delta);
    // Each run starts from the one prefill of the prompt (it does not depend on the seed:
    // prefill_speculative; SampledRunsAreReproducible checks that this gives generate_speculative's
    // tokens): the same n runs and the same statistic as prefilling every run, at about 60% of the
    // cost, as the prefill is about 40% of a two-token run.
    int64_t first_accepted = 0;   // runs whose first draft was accepted (the last l1 call)
    auto l1 = [&](int64_t K, AcceptRule rule, SpeculativeStats& total) {
        first_accepted = 0;
        std::vector<int64_t> count(kBuckets, 0);
        SpeculativeOptions po;
        po.draft_tokens = K;
        const SpeculativePrefill pre = prefill_speculative(m, prompt, po);
        for (int64_t i = 0; i < n; ++i) {
            const SpeculativeSampling s = sampler_sampling(sp, 1000 + static_cast<uint64_t>(i));
            SpeculativeOptions o;
            o.draft_tokens = K, o.ignore_eos = true, o.sampling = &s, o.rule = rule;
            const SpeculativeResult r = generate_speculative(m, pre, 2, o);
            ++count[static_cast<size_t>(bucket_of[static_cast<size_t>(r.tokens[0])][static_cast<size_t>(r.tokens[1])])];
            total.rounds += r.stats.rounds, total.drafted += r.stats.drafted, total.accepted += r.stats.accepted;
            total.round_tokens += r.stats.round_tokens;
            first_accepted += r.stats.accepted > 0;
        }
        double d = 0.0;
        for (int b = 0; b < kBuckets; ++b) d += std::abs(static_cast<double>(count[static_cast<size_t>(b)]) / static_cast<double>(n) - exact[static_cast<size_t>(b)]);
        return d;
    };
    std::printf("[ spec ] %s exact bucket probabilities:", GetParam().c_str());
    for (double x : exact) std::printf(" %.4f", x);
    std::printf("\n");
    for (int64_t K : {0, 1, 3}) {
        SpeculativeStats s;
        const double d = l1(K, AcceptRule::standard, s);
        std::printf("[ spec ] %s sampled (temperature 1) K=%ld: L1 to the exact distribution %.4f (bound %.4f, n %ld); "
                    "acceptance %ld/%ld = %.3f, %.3f tokens per verification step\n",
                    GetParam().c_str(), K, d, lambda, n, s.accepted, s.drafted, s.acceptance_rate(), s.tokens_per_round());
        EXPECT_LT(d, lambda) << "K " << K;
        if (K > 0) {
            EXPECT_GT(s.accepted, 0) << "no draft accepted: the test would not exercise acceptance";
            const double rate = static_cast<double>(first_accepted) / static_cast<double>(n);
            const double bound = std::sqrt(std::log(2.0 / delta) / (2.0 * static_cast<double>(n)));
            std::printf("[ spec ] %s K=%ld: first draft accepted in %.4f of the runs, exact probability %.4f (bound %.4f)\n",
                        GetParam().c_str(), K, rate, alpha, bound);
            EXPECT_LT(std::abs(rate - alpha), bound) << "K " << K;
        }
    }
    SpeculativeStats s;
    const double broken = l1(1, AcceptRule::always_accept, s);
    std::printf("[ spec ] %s sampled K=1 always-accept: L1 %.4f (bound %.4f)\n", GetParam().c_str(), broken, lambda);
    EXPECT_GT(broken, lambda) << "the bound does not detect an always-accept rule";
}

// Sampling over many rounds (accepted drafts included, so the kept prefix, the rollback and the MTP
// block's catch-up over several positions all run): the same seed gives the same tokens, from the
// prompt and from a prefill of it; another seed other tokens; the acceptance rate on these random
// weights is printed.
TEST_P(SpecCase, SampledRunsAreReproducible) {
    const Model& m = *g->model;
    SamplingParams sp;
    sp.temperature = 1.0f;
    for (int64_t K = 1; K <= 3; ++K) {
        const SpeculativeSampling s1 = sampler_sampling(sp, 5), s1b = sampler_sampling(sp, 5), s2 = sampler_sampling(sp, 6);
        SpeculativeOptions o;
        o.draft_tokens = K, o.ignore_eos = true, o.sampling = &s1;
        const SpeculativeResult a = generate_speculative(m, ids(0, 12), 48, o);
        // b and c start from one prefill of the prompt (prefill_speculative), c first: b, with a's
        // seed, must give a's tokens after the prefill served another run (it is copied, not used up).
        SpeculativeOptions po;
        po.draft_tokens = K;
        const SpeculativePrefill pre = prefill_speculative(m, ids(0, 12), po);
        o.sampling = &s2;
        const SpeculativeResult c = generate_speculative(m, pre, 48, o);
        o.sampling = &s1b;
        const SpeculativeResult b = generate_speculative(m, pre, 48, o);
        EXPECT_EQ(a.tokens, b.tokens) << "K " << K;
        EXPECT_NE(a.tokens, c.tokens) << "K " << K;
        ASSERT_EQ(a.tokens.size(), 48u);
        EXPECT_GT(a.stats.accepted, 0) << "K " << K;
        std::printf("[ spec ] %s sampled (temperature 1) K=%ld, 48 tokens: acceptance %ld/%ld = %.3f, %.3f tokens "
                    "per verification step, %ld rollbacks\n",
                    GetParam().c_str(), K, a.stats.accepted, a.stats.drafted, a.stats.acceptance_rate(),
                    a.stats.tokens_per_round(), a.stats.rerun_steps);
    }
}

INSTANTIATE_TEST_SUITE_P(Golden, SpecCase, ::testing::Values("tiny-flash-nvfp4", "tiny-flash-mxfp4"),
                         [](const auto& info) {
                             std::string s = info.param;
                             std::replace(s.begin(), s.end(), '-', '_');
                             return s;
                         });

}  // namespace
}  // namespace megamoe
