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

#include "io/safetensors.h"
#include "ref/generate.h"
#include "ref/speculative.h"
#include "serve/sampler.h"
#include "test_util.h"

namespace megamoe {
namespace {

// ---- serve::Sampler's definition as the speculative decoder's SpeculativeSampling

// Integer weights W [V] of the kept ids, by the definition in serve/sampler.h (steps 1-7); the
// sampler draws id i with probability W_i / Σ W.
std::vector<uint64_t> sampler_weights(const SamplingParams& sp, const float* logits, int64_t V) {
    std::vector<uint64_t> W(static_cast<size_t>(V), 0);
    if (sp.greedy()) {
        W[static_cast<size_t>(argmax(logits, V))] = 1;
        return W;
    }
    const float inf = INFINITY;
    auto valid = [&](float x) { return x > -inf; };   // NaN: false
    float m = -inf;
    for (int64_t i = 0; i < V; ++i)
        if (valid(logits[i])) m = std::max(m, logits[i]);
    if (m == -inf) ADD_FAILURE() << "a row without a valid id";
    const bool inf_max = m == inf;
    std::vector<int32_t> cands;   // step 4
    for (int64_t i = 0; i < V; ++i)
        if (inf_max ? logits[i] == inf : valid(logits[i])) cands.push_back(static_cast<int32_t>(i));
    const int S = 63 - static_cast<int>(std::bit_width(cands.size()));
    const float r = 1.0f / sp.temperature;
    std::vector<float> w(static_cast<size_t>(V), 0.0f);
    for (int32_t i : cands) {
        w[static_cast<size_t>(i)] = inf_max ? 1.0f : sampling_weight(logits[i], m, r);
        W[static_cast<size_t>(i)] = static_cast<uint64_t>(w[static_cast<size_t>(i)] * std::ldexp(1.0f, S));
    }
    std::sort(cands.begin(), cands.end(), [&](int32_t a, int32_t b) {   // step 3: rank order
        return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    std::vector<int32_t> kept = cands;
    if (sp.top_k > 0 && static_cast<size_t>(sp.top_k) < kept.size()) kept.resize(static_cast<size_t>(sp.top_k));   // 5
    if (sp.top_p < 1.0f) {   // 6
        uint64_t total = 0, cum = 0;
        for (int32_t i : kept) total += W[static_cast<size_t>(i)];
        const uint64_t thr = ceil_mul(sp.top_p, total);
        size_t keep = kept.size();
        for (size_t j = 0; j < kept.size(); ++j) {
            cum += W[static_cast<size_t>(kept[j])];
            if (cum >= thr) {
                keep = j + 1;
                break;
            }
        }
        kept.resize(keep);
    }
    if (sp.min_p > 0.0f)   // 7
        kept.erase(std::remove_if(kept.begin(), kept.end(), [&](int32_t i) { return w[static_cast<size_t>(i)] < sp.min_p; }),
                   kept.end());
    std::vector<uint64_t> out(static_cast<size_t>(V), 0);
    for (int32_t i : kept) out[static_cast<size_t>(i)] = W[static_cast<size_t>(i)];
    return out;
}

// 53 random bits for (seed, stream, index): Philox-4x32-10 with key {seed lo, seed hi} and counter
// {index lo, index hi, stream, 0}. Stream 0 is serve::sampling_bits.
uint64_t stream_bits(uint64_t seed, SpecStream stream, int64_t index) {
    const auto i = static_cast<uint64_t>(index);
    const auto o = philox4x32_10({static_cast<uint32_t>(i), static_cast<uint32_t>(i >> 32), static_cast<uint32_t>(stream), 0},
                                 {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)});
    return ((static_cast<uint64_t>(o[0]) << 32) | o[1]) >> 11;
}

SpeculativeSampling sampler_sampling(const SamplingParams& sp, uint64_t seed) {
    SpeculativeSampling s;
    s.distribution = [sp](const float* logits, int64_t V, std::vector<double>& p) {
        const std::vector<uint64_t> W = sampler_weights(sp, logits, V);
        double total = 0.0;
        for (uint64_t x : W) total += static_cast<double>(x);
        p.resize(W.size());
        for (size_t i = 0; i < W.size(); ++i) p[i] = static_cast<double>(W[i]) / total;
    };
    s.uniform = [seed](SpecStream stream, int64_t index) { return std::ldexp(static_cast<double>(stream_bits(seed, stream, index)), -53); };
    return s;
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

// The sampling definition used here is serve::Sampler's: drawing from sampler_weights with
// sampling_bits (step 8) gives Sampler::sample's token, and stream 0 is sampling_bits.
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
            const std::vector<uint64_t> W = sampler_weights(sp, l, V);
            uint64_t M = 0;
            for (uint64_t x : W) M += x;
            for (int64_t index = 0; index < 50; ++index) {
                ASSERT_EQ(stream_bits(77, SpecStream::sample, index), sampling_bits(77, index));
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

// Rank bucket of an id under a distribution p [V] (rank order: larger p first, ties to the lower id):
// 0 for the top id, then ranks 1-3, 4-15, 16-63, 64-255, 256 and beyond.
constexpr int kBuckets = 6;
std::vector<int> rank_buckets(const std::vector<double>& p) {
    std::vector<int32_t> order(p.size());
    for (size_t i = 0; i < p.size(); ++i) order[i] = static_cast<int32_t>(i);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return p[static_cast<size_t>(a)] > p[static_cast<size_t>(b)]; });
    std::vector<int> bucket(p.size());
    for (size_t r = 0; r < order.size(); ++r)
        bucket[static_cast<size_t>(order[r])] = r == 0 ? 0 : r < 4 ? 1 : r < 16 ? 2 : r < 64 ? 3 : r < 256 ? 4 : 5;
    return bucket;
}

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
// then the draft, distributed as the MTP block's q) must fail the same bound.
TEST_P(SpecCase, SampledDistributionIsTheMainModels) {
    const Model& m = *g->model;
    const int64_t V = m.cfg.vocab_size;
    SamplingParams sp;
    sp.temperature = 1.0f;
    const std::vector<int32_t> prompt = ids(0, 6);
    const SpeculativeSampling dist = sampler_sampling(sp, 0);

    // Exact bucket probabilities, and each a's bucket map.
    SequenceState st0(m.cfg);
    std::vector<float> logits;
    std::vector<SequenceChunk> pre{{&st0, prompt}};
    forward(m, pre, ForwardOptions{}, logits);
    std::vector<double> p0, pb;
    dist.distribution(logits.data(), V, p0);
    std::vector<std::vector<int>> bucket_of(static_cast<size_t>(V));   // [a][b]
    std::vector<double> exact(kBuckets, 0.0);
    const int64_t batch = 64;
    for (int64_t a0 = 0; a0 < V; a0 += batch) {
        std::vector<SequenceState> states(static_cast<size_t>(std::min(batch, V - a0)), st0);
        std::vector<SequenceChunk> b;
        for (size_t i = 0; i < states.size(); ++i) b.push_back({&states[i], {static_cast<int32_t>(a0 + static_cast<int64_t>(i))}});
        forward(m, b, ForwardOptions{}, logits);   // [batch, V]
        for (size_t i = 0; i < states.size(); ++i) {
            const size_t a = static_cast<size_t>(a0) + i;
            dist.distribution(logits.data() + static_cast<int64_t>(i) * V, V, pb);
            bucket_of[a] = rank_buckets(pb);
            for (int64_t t = 0; t < V; ++t) exact[static_cast<size_t>(bucket_of[a][static_cast<size_t>(t)])] += p0[a] * pb[static_cast<size_t>(t)];
        }
    }

    const int64_t n = 1200;
    const double delta = 1e-6;
    const double lambda = std::sqrt(2.0 * (kBuckets * std::log(2.0) + std::log(1.0 / delta)) / static_cast<double>(n));
    // Each run starts from the one prefill of the prompt (it does not depend on the seed:
    // prefill_speculative; SampledRunsAreReproducible checks that this gives generate_speculative's
    // tokens): the same n runs and the same statistic as prefilling every run, at about 60% of the
    // cost, as the prefill is about 40% of a two-token run.
    auto l1 = [&](int64_t K, AcceptRule rule, SpeculativeStats& total) {
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
