// partition_test.cpp — expert partitions and dispatch plans (dist/partition.h, dist/plan.h).
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>

#include "dist/partition.h"
#include "dist/plan.h"
#include "test_util.h"

namespace megamoe::dist {
namespace {

void expect_consistent(const ExpertPartition& p) {
    ASSERT_EQ(static_cast<int32_t>(p.held.size()), p.world);
    for (int32_t r = 0; r < p.world; ++r) {
        const auto& h = p.held[static_cast<size_t>(r)];
        EXPECT_EQ(static_cast<int32_t>(h.size()), p.per_rank()) << "rank " << r;
        EXPECT_TRUE(std::is_sorted(h.begin(), h.end()));
    }
    for (int32_t e = 0; e < p.experts; ++e) {
        const int32_t r = p.owner[static_cast<size_t>(e)], l = p.local[static_cast<size_t>(e)];
        ASSERT_GE(r, 0);
        ASSERT_LT(r, p.world);
        EXPECT_EQ(p.held[static_cast<size_t>(r)][static_cast<size_t>(l)], e);
    }
}

TEST(DistPartition, ContiguousHoldsRanges) {
    const ExpertPartition p = ExpertPartition::contiguous(256, 8);
    expect_consistent(p);
    EXPECT_EQ(p.per_rank(), 32);
    EXPECT_EQ(p.owner[0], 0);
    EXPECT_EQ(p.owner[31], 0);
    EXPECT_EQ(p.owner[32], 1);
    EXPECT_EQ(p.owner[255], 7);
    EXPECT_EQ(p.local[33], 1);
    test::expect_error([] { ExpertPartition::contiguous(384, 5); }, {"n_routed_experts = 384", "5 GPUs"});
    test::expect_error([] { ExpertPartition::contiguous(256, 0); }, {"--gpus"});
}

TEST(DistPartition, BalancedEvensASkewedLoad) {
    // Load falls off with the expert id (the first experts are the hot ones): contiguous puts all hot
    // experts on rank 0, balanced spreads them.
    const int64_t E = 64, N = 4;
    std::vector<double> load(E);
    for (int64_t e = 0; e < E; ++e) load[static_cast<size_t>(e)] = 1000.0 / static_cast<double>(e + 1);
    const ExpertPartition c = ExpertPartition::contiguous(E, N), b = ExpertPartition::balanced(load, N);
    expect_consistent(b);
    EXPECT_GT(c.imbalance(load), 2.0);
    EXPECT_LT(b.imbalance(load), 1.1);
    EXPECT_LT(b.imbalance(load), c.imbalance(load));
    // Deterministic: same input, same partition; equal loads fall back to lower rank for lower ids.
    EXPECT_EQ(ExpertPartition::balanced(load, N).owner, b.owner);
    const ExpertPartition u = ExpertPartition::balanced(std::vector<double>(8, 1.0), 2);
    EXPECT_EQ(u.owner, (std::vector<int32_t>{0, 1, 0, 1, 0, 1, 0, 1}));
    test::expect_error([] { ExpertPartition::balanced({1.0, -1.0}, 2); }, {"expert 1", "negative"});
}

TEST(DistPartition, HashLoadCountsTheTable) {
    // tid2eid [V = 3, k = 2]
    const std::vector<int64_t> t = {0, 1, 1, 2, 1, 3};
    EXPECT_EQ(hash_expert_load(t.data(), 3, 2, 4), (std::vector<double>{1, 3, 1, 1}));
    const std::vector<double> freq = {10, 1, 0};
    EXPECT_EQ(hash_expert_load(t.data(), 3, 2, 4, freq.data()), (std::vector<double>{10, 11, 1, 0}));
    const std::vector<int64_t> bad = {0, 4};
    test::expect_error([&] { hash_expert_load(bad.data(), 1, 2, 4); }, {"tid2eid[0, 1] = 4"});
    const std::vector<int32_t> ids = {0, 3, -1, 3};
    EXPECT_EQ(observed_expert_load(ids.data(), 2, 2, 4), (std::vector<double>{1, 0, 0, 2}));
}

// A hand-checked all-to-all layout: E = 4 on 2 ranks (experts 0,1 on rank 0; 2,3 on rank 1), k = 2.
TEST(DistPlan, AllToAllLayoutByHand) {
    const ExpertPartition p = ExpertPartition::contiguous(4, 2);
    const std::vector<int32_t> ids0 = {0, 2, 1, 0};          // rank 0: t0 → {0, 2}, t1 → {1, 0}
    const std::vector<int32_t> ids1 = {2, 3, 0, 3, 1, 2};    // rank 1: t0 → {2, 3}, t1 → {0, 3}, t2 → {1, 2}
    const AllToAllPlan a = plan_all_to_all(p, {{ids0.data(), 2}, {ids1.data(), 3}}, 2);
    EXPECT_EQ(a.send_count, (std::vector<int64_t>{2, 1, 2, 3}));
    EXPECT_EQ(a.send_offset, (std::vector<int64_t>{0, 2, 0, 2}));
    EXPECT_EQ(a.recv_offset, (std::vector<int64_t>{0, 2, 0, 1}));
    EXPECT_EQ(a.send_token[0], (std::vector<int32_t>{0, 1, 0}));
    EXPECT_EQ(a.send_token[1], (std::vector<int32_t>{1, 2, 0, 1, 2}));
    EXPECT_EQ(a.send_local[0], (std::vector<int32_t>{0, -1, 1, 0, -1, 0}));
    EXPECT_EQ(a.send_local[1], (std::vector<int32_t>{0, -1, 1, -1, 0, 1, -1, 1, -1, 0}));
    EXPECT_EQ(a.pair_count, (std::vector<int64_t>{3, 1, 2, 4}));
    EXPECT_EQ(a.pair_offset, (std::vector<int64_t>{0, 3, 0, 2}));
    EXPECT_EQ(a.pair_send_offset, (std::vector<int64_t>{0, 3, 0, 1}));
    EXPECT_EQ(a.pair_row[0], (std::vector<int32_t>{0, 3, 1, 2}));
    EXPECT_EQ(a.pair_row[1], (std::vector<int32_t>{2, 3, 0, 4, 1, 5}));
    EXPECT_EQ(a.send_rows(1), 5);
    EXPECT_EQ(a.recv_rows(0), 4);
    EXPECT_EQ(a.pairs_sent(1), 5);
    EXPECT_EQ(a.pairs_home(1), 6);
    EXPECT_EQ(a.max_block(), 3);
    test::expect_error([&] { plan_all_to_all(p, {{ids0.data(), 2}}, 2); }, {"1 ranks", "world of 2"});
    const std::vector<int32_t> bad = {0, 4};
    test::expect_error([&] { plan_all_to_all(p, {{bad.data(), 1}, {ids1.data(), 0}}, 2); },
                       {"rank 0 token 0 slot 1", "expert id 4", "n_routed_experts = 4"});
}

TEST(DistPlan, GatherScatterPadsToTheLargestRank) {
    const ExpertPartition p = ExpertPartition::contiguous(4, 2);
    const std::vector<int32_t> ids0 = {0, 2, 1, 0}, ids1 = {3, 1};
    const GatherPlan g = plan_gather_scatter(p, {{ids0.data(), 2}, {ids1.data(), 1}}, 2);
    EXPECT_EQ(g.T_pad, 2);
    EXPECT_EQ(g.gathered_ids, (std::vector<int32_t>{0, 2, 1, 0, 3, 1, -1, -1}));
    EXPECT_EQ(g.local[0], (std::vector<int32_t>{0, -1, 1, 0, -1, 1, -1, -1}));
    EXPECT_EQ(g.local[1], (std::vector<int32_t>{-1, 0, -1, -1, 1, -1, -1, -1}));
    EXPECT_EQ(g.pairs, (std::vector<int64_t>{4, 2}));
}

// Invariants on random routings: every (token, slot) pair goes to exactly one rank, exactly once.
TEST(DistPlan, RandomRoutingsAreCoveredOnce) {
    std::mt19937 rng(7);
    for (int64_t N : {1, 2, 4, 8}) {
        const int64_t E = 32, k = 6;
        const ExpertPartition p = ExpertPartition::contiguous(E, N);
        std::vector<std::vector<int32_t>> ids(static_cast<size_t>(N));
        std::vector<RankIds> rid;
        for (int64_t r = 0; r < N; ++r) {
            const int64_t T = static_cast<int64_t>(rng() % 9);
            for (int64_t i = 0; i < T * k; ++i) ids[static_cast<size_t>(r)].push_back(static_cast<int32_t>(rng() % E));
            rid.push_back({ids[static_cast<size_t>(r)].data(), T});
        }
        const AllToAllPlan a = plan_all_to_all(p, rid, k);
        for (int64_t r = 0; r < N; ++r) {
            const int64_t T = rid[static_cast<size_t>(r)].T;
            EXPECT_EQ(a.pairs_home(static_cast<int32_t>(r)), T * k);
            std::vector<int32_t> rows(a.pair_row[static_cast<size_t>(r)]);
            std::sort(rows.begin(), rows.end());
            std::vector<int32_t> want(static_cast<size_t>(T * k));
            std::iota(want.begin(), want.end(), 0);
            EXPECT_EQ(rows, want) << "N=" << N << " r=" << r;
            // every send row has at least one slot on its destination
            for (int64_t q = 0; q < N; ++q)
                for (int64_t j = a.send_offset[static_cast<size_t>(r * N + q)];
                     j < a.send_offset[static_cast<size_t>(r * N + q)] + a.send_count[static_cast<size_t>(r * N + q)]; ++j) {
                    int hits = 0;
                    for (int64_t s = 0; s < k; ++s) hits += a.send_local[static_cast<size_t>(r)][static_cast<size_t>(j * k + s)] >= 0;
                    EXPECT_GT(hits, 0);
                }
        }
        int64_t total = 0;
        for (int64_t q = 0; q < N; ++q) total += a.pairs_sent(static_cast<int32_t>(q));
        int64_t tokens = 0;
        for (auto& r : rid) tokens += r.T;
        EXPECT_EQ(total, tokens * k);
    }
}

}  // namespace
}  // namespace megamoe::dist
