// sim_test.cpp — the CPU twins of the multi-GPU MoE and head (dist/sim.h) against one rank: a
// synthetic tiny checkpoint (hash and score layers, 16 experts, top-4), N = 1, 2, 4, 8 ranks, both
// exchange schemes. slot_rows combine: bit-identical; partial_sums: within plan.h's rounding bound.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>

#include "dist/sim.h"
#include "io/synth.h"
#include "ref/generate.h"
#include "ref/model.h"
#include "ref/ops.h"
#include "test_util.h"

namespace megamoe::dist {
namespace {

// One tiny synthetic model for the whole suite (layers 0..2 hash-routed, 3 score-routed).
const Model& tiny() {
    static std::unique_ptr<test::TempDir> dir;
    static std::unique_ptr<Model> m;
    if (!m) {
        dir = std::make_unique<test::TempDir>();
        SynthOptions o;
        o.layers = 4;
        o.vocab = 1000;
        o.mtp = false;
        o.seed = 13;
        write_synthetic_checkpoint(dir->str(), o);
        m = Model::load(dir->str());
    }
    return *m;
}

struct RankData {
    std::vector<float> x;        // [T, D]
    std::vector<int32_t> tokens; // [T]
    std::vector<int32_t> ids;    // [T, k]
    std::vector<float> wts;      // [T, k]
    int64_t T = 0;
};

// Random inputs per rank, routed by the layer's own router (hash or score).
std::vector<RankData> make_inputs(const Model& m, int64_t layer, const std::vector<int64_t>& T, uint32_t seed) {
    const ModelConfig& c = m.cfg;
    const int64_t D = c.hidden_size, k = c.num_experts_per_tok;
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    const MoeWeights& f = m.w.layers[static_cast<size_t>(layer)].ffn;
    std::vector<RankData> out;
    for (int64_t n : T) {
        RankData r;
        r.T = n;
        r.x.resize(static_cast<size_t>(n * D));
        for (float& v : r.x) v = nd(rng);
        for (int64_t t = 0; t < n; ++t) r.tokens.push_back(static_cast<int32_t>(rng() % c.vocab_size));
        r.ids.resize(static_cast<size_t>(n * k));
        r.wts.resize(static_cast<size_t>(n * k));
        if (n > 0) {
            if (f.router == RouterKind::hash)
                ops::route_hash(f, c, r.x.data(), r.tokens.data(), n, r.ids.data(), r.wts.data());
            else
                ops::route_score(f, c, r.x.data(), n, r.ids.data(), r.wts.data());
        }
        out.push_back(std::move(r));
    }
    return out;
}

std::vector<RankMoeInput> views(const std::vector<RankData>& d) {
    std::vector<RankMoeInput> v;
    for (const auto& r : d) v.push_back({r.x.data(), r.ids.data(), r.wts.data(), r.T});
    return v;
}

// One rank's answer: ops::moe over the rank's tokens.
std::vector<float> reference(const Model& m, int64_t layer, const RankData& r) {
    std::vector<float> y(static_cast<size_t>(r.T * m.cfg.hidden_size));
    if (r.T > 0) ops::moe(m.w.layers[static_cast<size_t>(layer)].ffn, m.cfg, r.x.data(), r.T, r.ids.data(), r.wts.data(), y.data());
    return y;
}

const std::vector<int64_t> kTokens[] = {{5}, {3, 4}, {2, 0, 5, 1}, {1, 2, 0, 3, 1, 1, 2, 4}};

TEST(DistMoe, SlotRowsCombineIsBitIdenticalToOneRank) {
    const Model& m = tiny();
    const ModelConfig& c = m.cfg;
    ASSERT_EQ(c.n_routed_experts, 16);
    for (int64_t layer : {int64_t{0}, int64_t{3}}) {   // a hash layer and a score layer
        ASSERT_EQ(c.router_kind(layer), layer == 0 ? RouterKind::hash : RouterKind::score);
        for (const auto& T : kTokens) {
            const int64_t N = static_cast<int64_t>(T.size());
            const auto data = make_inputs(m, layer, T, static_cast<uint32_t>(100 * layer + N));
            std::vector<const ExpertPartition*> parts;
            const ExpertPartition contiguous = ExpertPartition::contiguous(c.n_routed_experts, N);
            const ModelPartition balanced = partition_model(c, &m.w, N, PartitionKind::balanced);
            for (const ExpertPartition* p : {&contiguous, &balanced.layers[static_cast<size_t>(layer)]}) {
                for (Scheme s : {Scheme::all_to_all, Scheme::gather_scatter}) {
                    std::vector<std::vector<float>> y;
                    simulate_moe(m.w.layers[static_cast<size_t>(layer)].ffn, c, *p, s, Combine::slot_rows, views(data), y);
                    for (int64_t r = 0; r < N; ++r) {
                        const std::vector<float> want = reference(m, layer, data[static_cast<size_t>(r)]);
                        ASSERT_EQ(y[static_cast<size_t>(r)].size(), want.size());
                        // memcmp of empty rows would pass null pointers (undefined: UBSan stops the test).
                        EXPECT_EQ(0, want.empty() ? 0 : std::memcmp(y[static_cast<size_t>(r)].data(), want.data(), want.size() * sizeof(float)))
                            << "layer " << layer << " N=" << N << " rank " << r << " " << scheme_name(s);
                    }
                }
            }
        }
    }
}

TEST(DistMoe, PartialSumsWithinTheRoundingBound) {
    const Model& m = tiny();
    const ModelConfig& c = m.cfg;
    const int64_t D = c.hidden_size, k = c.num_experts_per_tok, layer = 3;
    const float limit = static_cast<float>(c.swiglu_limit);
    const MoeWeights& f = m.w.layers[layer].ffn;
    const double u = std::ldexp(1.0, -24);
    int64_t differ = 0, total = 0;
    for (const auto& T : kTokens) {
        const int64_t N = static_cast<int64_t>(T.size());
        const auto data = make_inputs(m, layer, T, static_cast<uint32_t>(7 + N));
        const ExpertPartition p = ExpertPartition::contiguous(c.n_routed_experts, N);
        for (Scheme s : {Scheme::all_to_all, Scheme::gather_scatter}) {
            std::vector<std::vector<float>> y;
            simulate_moe(f, c, p, s, Combine::partial_sums, views(data), y);
            for (int64_t r = 0; r < N; ++r) {
                const RankData& rd = data[static_cast<size_t>(r)];
                const std::vector<float> want = reference(m, layer, rd);
                // Σ_s |out(t, s)| from each slot's expert output alone.
                std::vector<double> mag(static_cast<size_t>(rd.T * D), 0.0);
                std::vector<float> o(static_cast<size_t>(D));
                for (int64_t t = 0; t < rd.T; ++t)
                    for (int64_t sl = 0; sl < k; ++sl) {
                        ops::expert_ffn(f.experts[static_cast<size_t>(rd.ids[static_cast<size_t>(t * k + sl)])], limit,
                                        rd.x.data() + t * D, 1, &rd.wts[static_cast<size_t>(t * k + sl)], o.data());
                        for (int64_t d = 0; d < D; ++d) mag[static_cast<size_t>(t * D + d)] += std::fabs(o[static_cast<size_t>(d)]);
                    }
                for (size_t i = 0; i < want.size(); ++i) {
                    const double a = y[static_cast<size_t>(r)][i], b = want[i];
                    const double bound = 2.0 * static_cast<double>(k - 1) * u * mag[i] + u * (std::fabs(a) + std::fabs(b));
                    ASSERT_LE(std::fabs(a - b), bound * 1.0001) << "N=" << N << " rank " << r << " i " << i;
                    differ += a != b;
                    ++total;
                }
            }
        }
    }
    // With one rank both schemes add in slot order; with more the grouping changes some sums.
    EXPECT_GT(differ, 0) << "of " << total;
}

TEST(DistMoe, OneRankPartialSumsAreExactToo) {
    const Model& m = tiny();
    const auto data = make_inputs(m, 3, {6}, 99);
    const ExpertPartition p = ExpertPartition::contiguous(m.cfg.n_routed_experts, 1);
    for (Scheme s : {Scheme::all_to_all, Scheme::gather_scatter}) {
        std::vector<std::vector<float>> y;
        simulate_moe(m.w.layers[3].ffn, m.cfg, p, s, Combine::partial_sums, views(data), y);
        const std::vector<float> want = reference(m, 3, data[0]);
        EXPECT_EQ(0, std::memcmp(y[0].data(), want.data(), want.size() * sizeof(float))) << scheme_name(s);
    }
}

TEST(DistMoe, ExchangeBytesFollowThePlan) {
    const Model& m = tiny();
    const ModelConfig& c = m.cfg;
    const int64_t D = c.hidden_size, k = c.num_experts_per_tok;
    const auto data = make_inputs(m, 3, {3, 4}, 5);
    const ExpertPartition p = ExpertPartition::contiguous(c.n_routed_experts, 2);
    std::vector<RankIds> rid = {{data[0].ids.data(), 3}, {data[1].ids.data(), 4}};
    const AllToAllPlan a = plan_all_to_all(p, rid, k);
    std::vector<std::vector<float>> y;
    ExchangeBytes b;
    simulate_moe(m.w.layers[3].ffn, c, p, Scheme::all_to_all, Combine::slot_rows, views(data), y, &b, 2);
    EXPECT_EQ(b.dispatch[0], a.send_count[1] * (2 * D + 8 * k));
    EXPECT_EQ(b.combine[0], a.pair_count[2] * 4 * D);   // rank 0 returns rank 1's pairs on it
    simulate_moe(m.w.layers[3].ffn, c, p, Scheme::gather_scatter, Combine::partial_sums, views(data), y, &b, 2);
    EXPECT_EQ(b.dispatch[1], 4 * (2 * D + 8 * k));     // T_pad = 4 rows to the one other rank
    EXPECT_EQ(b.combine[1], 4 * D * 4);
    test::expect_error(
        [&] { simulate_moe(m.w.layers[3].ffn, c, ExpertPartition::contiguous(16, 4), Scheme::all_to_all,
                           Combine::slot_rows, views(data), y); },
        {"2 ranks", "world of 4"});
}

TEST(DistHead, VocabSlicesGatherToTheFullLogits) {
    const Model& m = tiny();
    const int64_t V = m.cfg.vocab_size, D = m.cfg.hidden_size, T = 3;
    ASSERT_EQ(m.w.head.format, LinearFormat::bf16);
    std::mt19937 rng(3);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> u(static_cast<size_t>(T * D));
    for (float& v : u) v = nd(rng);
    std::vector<float> full(static_cast<size_t>(T * V));
    ops::linear(m.w.head, u.data(), T, full.data());
    for (int64_t N : {1, 2, 3, 8}) {
        const VocabSplit s = split_vocab(V, N);
        ASSERT_EQ(s.begin.back(), V);
        std::vector<std::vector<float>> slices(static_cast<size_t>(N));
        std::vector<std::vector<ArgmaxCandidate>> cands(static_cast<size_t>(N));
        for (int32_t r = 0; r < N; ++r) {
            EXPECT_EQ(s.begin[static_cast<size_t>(r)] % 64, 0);
            slices[static_cast<size_t>(r)].resize(static_cast<size_t>(T * s.rows(r)));
            head_logits_slice(m.w.head, s, r, u.data(), T, slices[static_cast<size_t>(r)].data());
            cands[static_cast<size_t>(r)].resize(static_cast<size_t>(T));
            argmax_candidates(s, r, slices[static_cast<size_t>(r)].data(), T, cands[static_cast<size_t>(r)].data());
        }
        std::vector<float> gathered(static_cast<size_t>(T * V), std::numeric_limits<float>::quiet_NaN());
        gather_logits(s, slices, T, gathered.data());
        EXPECT_EQ(0, std::memcmp(gathered.data(), full.data(), full.size() * sizeof(float))) << "N=" << N;
        std::vector<int32_t> ids(static_cast<size_t>(T));
        reduce_argmax(cands, T, ids.data());
        for (int64_t t = 0; t < T; ++t) EXPECT_EQ(ids[static_cast<size_t>(t)], argmax(full.data() + t * V, V)) << "N=" << N;
    }
    test::expect_error([] { split_vocab(100, 0); }, {"--gpus"});
}

// Ties across ranks, NaNs at a slice start and at id 0: the same id as ref's argmax on the whole row.
TEST(DistHead, ArgmaxAcrossRanksMatchesTheWholeRow) {
    const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
    const std::vector<std::vector<float>> rows = {
        {1, 5, 2, 5, 0, 5, 3, 1},          // tie across slices: lowest id
        {nan, 1, 9, 2, 3, 4, 5, 6},        // NaN at id 0: id 0
        {1, 2, 3, 4, nan, 7, 2, 1},        // NaN at a slice start: skipped
        {-inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf},
        {nan, nan, nan, nan, nan, nan, nan, nan},
        {0, 0, 0, 0, 0, 0, 0, 8},
    };
    for (int64_t N : {1, 2, 3, 4}) {
        const VocabSplit s = split_vocab(8, N, 1);
        for (const auto& row : rows) {
            std::vector<std::vector<ArgmaxCandidate>> cands(static_cast<size_t>(N), std::vector<ArgmaxCandidate>(1));
            for (int32_t r = 0; r < N; ++r)
                argmax_candidates(s, r, row.data() + s.begin[static_cast<size_t>(r)], 1, cands[static_cast<size_t>(r)].data());
            int32_t id = -1;
            reduce_argmax(cands, 1, &id);
            EXPECT_EQ(id, argmax(row.data(), 8)) << "N=" << N << " row starting " << row[0];
        }
    }
}

}  // namespace
}  // namespace megamoe::dist
