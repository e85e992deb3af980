// dp_test.cpp — the data-parallel step split (dist/dp.h) the multi-GPU backend runs on: slot
// numbering, where a new sequence opens, which chunks and rows each rank gets, and the merge that
// puts the rows back in the step's order. CPU-only.
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "dist/dp.h"
#include "ref/backend.h"
#include "test_util.h"

namespace megamoe::dist {
namespace {

TEST(DistDp, SlotNumbering) {
    for (int32_t world : {1, 2, 3, 8})
        for (int32_t rank = 0; rank < world; ++rank)
            for (int32_t local : {0, 1, 7, 255}) {
                const int32_t s = dp_slot(rank, local, world);
                EXPECT_EQ(dp_rank(s, world), rank);
                EXPECT_EQ(dp_local(s, world), local);
            }
    EXPECT_EQ(dp_slot(0, 5, 1), 5);   // a world of one: the runner's own slots
    test::expect_error([] { (void)dp_rank(-1, 2); }, {"slot -1"});
    test::expect_error([] { (void)dp_slot(2, 0, 2); }, {"rank 2 of 2"});
    test::expect_error([] { (void)dp_slot(0, 0, 0); }, {"a world of 0"});
}

TEST(DistDp, PickRank) {
    // Fewest open sequences first, then the most free state, then the lowest rank; full ranks never.
    EXPECT_EQ(dp_pick_rank({2, 1, 1}, {10, 5, 9}, 4), 2);
    EXPECT_EQ(dp_pick_rank({1, 1, 1}, {10, 10, 10}, 4), 0);
    EXPECT_EQ(dp_pick_rank({0, 4, 1}, {0, 100, 100}, 4), 0);
    EXPECT_EQ(dp_pick_rank({4, 4, 3}, {0, 0, 0}, 4), 2);
    EXPECT_EQ(dp_pick_rank({4, 4}, {9, 9}, 4), -1);
    // Opening one after another spreads the sequences over the ranks.
    std::vector<int64_t> open(3, 0), free_tokens(3, 1000);
    std::vector<int32_t> order;
    for (int i = 0; i < 9; ++i) {
        const int32_t r = dp_pick_rank(open, free_tokens, 3);
        ASSERT_GE(r, 0);
        order.push_back(r);
        ++open[static_cast<size_t>(r)];
    }
    EXPECT_EQ(order, (std::vector<int32_t>{0, 1, 2, 0, 1, 2, 0, 1, 2}));
    EXPECT_EQ(dp_pick_rank(open, free_tokens, 3), -1);
}

// The split against a direct construction: rank r's chunks in step order, its rows the step's
// rows of those chunks (every token's, or each chunk's last), and the merge inverts the split.
TEST(DistDp, StepSplitAndMerge) {
    const int32_t world = 3;
    const std::vector<int32_t> slots{dp_slot(1, 0, world), dp_slot(0, 2, world), dp_slot(1, 3, world),
                                     dp_slot(1, 1, world), dp_slot(0, 0, world)};
    const std::vector<int64_t> lens{3, 1, 2, 1, 4};
    for (bool all : {false, true}) {
        SCOPED_TRACE(all ? "every token a row" : "each chunk's last token");
        const DpStep p = plan_dp_step(slots, lens, all, world);
        EXPECT_EQ(p.chunks[0], (std::vector<int64_t>{1, 4}));
        EXPECT_EQ(p.chunks[1], (std::vector<int64_t>{0, 2, 3}));
        EXPECT_TRUE(p.chunks[2].empty());   // an idle rank: it still joins the exchange
        EXPECT_EQ(p.tokens, (std::vector<int64_t>{5, 6, 0}));
        // The step's rows, chunk by chunk, as one runner would give them.
        std::vector<int64_t> first(slots.size());
        int64_t rows = 0;
        for (size_t i = 0; i < slots.size(); ++i) {
            first[i] = rows;
            rows += all ? lens[i] : 1;
        }
        EXPECT_EQ(p.rows_total, rows);
        for (int32_t r = 0; r < world; ++r) {
            std::vector<int64_t> want;
            for (int64_t i : p.chunks[static_cast<size_t>(r)])
                for (int64_t j = all ? 0 : lens[static_cast<size_t>(i)] - 1; j < lens[static_cast<size_t>(i)]; ++j)
                    want.push_back(first[static_cast<size_t>(i)] + (all ? j : 0));
            EXPECT_EQ(p.rows[static_cast<size_t>(r)], want) << "rank " << r;
        }
        // Merge: each rank's rows carry their own step row number in every column.
        const int64_t width = 3;
        std::vector<std::vector<float>> parts(static_cast<size_t>(world));
        for (int32_t r = 0; r < world; ++r)
            for (int64_t row : p.rows[static_cast<size_t>(r)])
                for (int64_t c = 0; c < width; ++c) parts[static_cast<size_t>(r)].push_back(static_cast<float>(row * 10 + c));
        std::vector<float> out;
        merge_dp_rows(p, parts, width, out);
        ASSERT_EQ(out.size(), static_cast<size_t>(rows * width));
        for (int64_t row = 0; row < rows; ++row)
            for (int64_t c = 0; c < width; ++c) EXPECT_EQ(out[static_cast<size_t>(row * width + c)], row * 10 + c);
        parts[0].pop_back();
        test::expect_error([&] { merge_dp_rows(p, parts, width, out); }, {"rank 0 returned"});
    }
    // Sampled tokens merge the same way (width 1).
    const DpStep p = plan_dp_step(slots, lens, false, world);
    std::vector<std::vector<SampledToken>> drawn(static_cast<size_t>(world));
    for (int32_t r = 0; r < world; ++r)
        for (int64_t row : p.rows[static_cast<size_t>(r)]) drawn[static_cast<size_t>(r)].push_back({static_cast<int32_t>(row), 0.0f, {}});
    std::vector<SampledToken> merged;
    merge_dp_rows(p, drawn, 1, merged);
    ASSERT_EQ(merged.size(), slots.size());
    for (size_t i = 0; i < merged.size(); ++i) EXPECT_EQ(merged[i].id, static_cast<int32_t>(i));
    // A world of one keeps everything in place.
    const DpStep one = plan_dp_step({4, 0, 2}, {2, 1, 5}, true, 1);
    std::vector<int64_t> all_rows(8);
    std::iota(all_rows.begin(), all_rows.end(), 0);
    EXPECT_EQ(one.rows[0], all_rows);
    EXPECT_EQ(one.chunks[0], (std::vector<int64_t>{0, 1, 2}));
    // Bad steps.
    test::expect_error([&] { (void)plan_dp_step({0, 2, 0}, {1, 1, 1}, false, 2); }, {"slot 0 appears twice"});
    test::expect_error([&] { (void)plan_dp_step({0}, {0}, false, 2); }, {"chunk 0 has 0 tokens"});
    test::expect_error([&] { (void)plan_dp_step({0, 1}, {1}, false, 2); }, {"2 slots for 1 chunk lengths"});
}

}  // namespace
}  // namespace megamoe::dist
