// test_util.h — helpers shared by the tests: golden paths, error-message checks, comparisons.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <unistd.h>
#include <string>
#include <vector>

#include "core/common.h"

namespace megamoe::test {

inline std::string shared_dir() { return MEGAMOE_SHARED_DIR; }
inline std::string golden_dir(const std::string& name) { return shared_dir() + "/golden/" + name; }
inline bool have_golden(const std::string& name) { return std::filesystem::exists(golden_dir(name) + "/golden.safetensors"); }

// Golden data (../shared/golden) that a test needs is missing: the test fails, unless the build
// was configured with -DMEGAMOE_ALLOW_MISSING_GOLDEN=ON, where it skips. Most mutants of the CPU
// code are caught only by the golden cases, so a silent skip would hide them. Returns from the
// calling function (a test body or SetUp), as GTEST_SKIP and FAIL do.
#ifdef MEGAMOE_ALLOW_MISSING_GOLDEN
#define MEGAMOE_MISSING_GOLDEN() GTEST_SKIP() << "golden data missing (allowed: MEGAMOE_ALLOW_MISSING_GOLDEN): "
#else
#define MEGAMOE_MISSING_GOLDEN() \
    FAIL() << "golden data missing (configure with -DMEGAMOE_ALLOW_MISSING_GOLDEN=ON to skip such tests): "
#endif

// The whole file as bytes ("" if it cannot be read; tests then fail on the content).
inline std::string read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
}

// A fresh, empty temporary directory, removed when the object goes away.
struct TempDir {
    std::filesystem::path path;
    TempDir() {
        static int counter = 0;
        const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
        std::string name = std::string("megamoe_") + (info ? info->name() : "t") + "_" + std::to_string(::getpid()) +
                           "_" + std::to_string(counter++);
        std::replace(name.begin(), name.end(), '/', '_');
        path = std::filesystem::temp_directory_path() / name;
        std::filesystem::remove_all(path);
        std::filesystem::create_directories(path);
    }
    ~TempDir() {
        std::error_code ec;
        std::filesystem::remove_all(path, ec);
    }
    std::string str() const { return path.string(); }
};

// Runs fn, expects megamoe::Error, and checks every substring is in its message.
inline void expect_error(const std::function<void()>& fn, const std::vector<std::string>& substrings) {
    try {
        fn();
    } catch (const Error& e) {
        const std::string msg = e.what();
        for (const auto& s : substrings) EXPECT_NE(msg.find(s), std::string::npos) << "'" << s << "' not in: " << msg;
        return;
    } catch (const std::exception& e) {
        ADD_FAILURE() << "threw a non-megamoe exception: " << e.what();
        return;
    }
    ADD_FAILURE() << "expected megamoe::Error";
}

// The port a `megamoe serve --port 0` started with stdout/stderr into `log` listens on: the one it
// prints ("listening on http://127.0.0.1:PORT"), read from the log within timeout_s; -1 if none.
// Binding port 0 leaves the choice to the kernel (no race with another process for a port picked
// in advance).
inline int served_port(const std::string& log, double timeout_s = 60) {
    const std::string marker = "listening on http://127.0.0.1:";
    for (int i = 0; i < static_cast<int>(timeout_s * 20); ++i) {
        const std::string text = read_file(log);
        if (const size_t at = text.find(marker); at != std::string::npos && text.find('\n', at) != std::string::npos)
            return std::atoi(text.c_str() + at + marker.size());
        ::usleep(50000);
    }
    return -1;
}

inline double max_abs_diff(const float* a, const float* b, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; ++i) {
        const double d = std::fabs(static_cast<double>(a[i]) - static_cast<double>(b[i]));
        if (!(d <= m)) m = d;   // NaN propagates as a failure
    }
    return m;
}

// Cosine of two vectors in double (1 when both are zero).
inline double cosine(const float* a, const float* b, int64_t n) {
    double ab = 0, aa = 0, bb = 0;
    for (int64_t i = 0; i < n; ++i) {
        ab += static_cast<double>(a[i]) * b[i];
        aa += static_cast<double>(a[i]) * a[i];
        bb += static_cast<double>(b[i]) * b[i];
    }
    if (aa == 0 && bb == 0) return 1;
    return ab / std::sqrt(aa * bb);
}

// Rank bucket of every id under a distribution p [V] (rank order: larger p first, ties to the lower
// id): 0 for the top id, then ranks 1-3, 4-15, 16-63, 64-255, 256 and beyond. The statistic of the
// speculative decoders' distribution tests.
constexpr int kRankBuckets = 6;
inline std::vector<int> rank_buckets(const std::vector<double>& p) {
    std::vector<int32_t> order(p.size());
    for (size_t i = 0; i < p.size(); ++i) order[i] = static_cast<int32_t>(i);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return p[static_cast<size_t>(a)] > p[static_cast<size_t>(b)]; });
    std::vector<int> bucket(p.size());
    for (size_t r = 0; r < order.size(); ++r)
        bucket[static_cast<size_t>(order[r])] = r == 0 ? 0 : r < 4 ? 1 : r < 16 ? 2 : r < 64 ? 3 : r < 256 ? 4 : 5;
    return bucket;
}
// The L1 distance D = Σ |freq - P| over k buckets from n samples obeys P(D >= λ) <= 2^k exp(-n λ² / 2)
// (Bretagnolle-Huber-Carol): λ for a false-alarm probability delta.
inline double l1_bound(int k, int64_t n, double delta) {
    return std::sqrt(2.0 * (k * std::log(2.0) + std::log(1.0 / delta)) / static_cast<double>(n));
}

}  // namespace megamoe::test
