// parallel_test.cpp — the fork-join pool (core/parallel.h): every index runs exactly once on any
// thread count, ranges are contiguous and cover [0, n), and the pool can be resized after it has
// run work (set_num_threads after a parallel loop used to start workers that took the last,
// finished job for a new one and called a null function).
#include <gtest/gtest.h>

#include <atomic>
#include <vector>

#include "core/parallel.h"

namespace megamoe {
namespace {

TEST(Parallel, ResizeAfterWorkAndEveryIndexOnce) {
    const int restore = num_threads();
    const int64_t n = 1000;
    for (int threads : {2, 3, 1, 4, 2}) {   // resized after each round of work
        set_num_threads(threads);
        ASSERT_EQ(num_threads(), threads);
        for (int round = 0; round < 3; ++round) {
            std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
            parallel_for(n, [&](int64_t i) { hits[static_cast<size_t>(i)].fetch_add(1); }, /*cost_per_item=*/1 << 20);
            for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[static_cast<size_t>(i)].load(), 1) << threads << " threads, index " << i;
            // Ranges: one per worker at most, contiguous, in order of the worker number.
            std::vector<std::pair<int64_t, int64_t>> ranges(static_cast<size_t>(threads), {-1, -1});
            std::atomic<int> calls{0};
            parallel_ranges(n, [&](int64_t b, int64_t e, int w) {
                ASSERT_LT(w, threads);
                ranges[static_cast<size_t>(w)] = {b, e};
                calls.fetch_add(1);
            }, 1 << 20);
            EXPECT_EQ(calls.load(), threads);
            int64_t next = 0;
            for (const auto& [b, e] : ranges) {
                if (b < 0) continue;
                EXPECT_EQ(b, next);
                EXPECT_LT(b, e);
                next = e;
            }
            EXPECT_EQ(next, n);
        }
    }
    set_num_threads(restore);
    EXPECT_EQ(num_threads(), restore);
}

}  // namespace
}  // namespace megamoe
