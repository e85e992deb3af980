// rowwise_test_util.h — helpers of the GPU row-op twin tests (rowwise_test.cpp, hyper_conn_test.cpp,
// router_test.cpp): random inputs, bf16 rounding, and element-wise comparisons that report the
// first mismatches. Include only under MEGAMOE_HAVE_CUDA.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/linear.h"   // gpu_available, CUDA_CHECK
#include "io/formats.h"    // f32_to_bf16, bf16_to_f32

namespace megamoe::test::rw {

#define RW_SKIP_WITHOUT_GPU() \
    if (!::megamoe::cuda::gpu_available()) GTEST_SKIP() << "no CUDA device"

// A non-null "device" pointer for the argument-check tests: the checks throw before any launch,
// so it is never dereferenced (and if a check were missing, the launch would fail and throw a
// different message, which the tests catch by the message).
template <typename T> T* fake_ptr() { return reinterpret_cast<T*>(uintptr_t{1} << 20); }

// n normal values times sigma, each row of `width` with its own magnitude 2^U(lo, hi).
inline std::vector<float> normal_rows(int64_t rows, int64_t width, uint32_t seed, float sigma = 1.0f, float lo = 0.0f,
                                      float hi = 0.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::uniform_real_distribution<float> mag(lo, hi);
    std::vector<float> v(static_cast<size_t>(rows * width));
    for (int64_t r = 0; r < rows; ++r) {
        const float m = sigma * (hi > lo ? std::exp2(mag(rng)) : std::exp2(lo));
        for (int64_t i = 0; i < width; ++i) v[static_cast<size_t>(r * width + i)] = nd(rng) * m;
    }
    return v;
}

inline std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
    std::vector<uint16_t> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = f32_to_bf16(v[i]);
    return o;
}
inline std::vector<float> from_bf16(const std::vector<uint16_t>& v) {
    std::vector<float> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = bf16_to_f32(v[i]);
    return o;
}
// The values rounded to bf16 and widened back (inputs the GPU reads as bf16).
inline std::vector<float> bf16_exact(std::vector<float> v) {
    for (float& x : v) x = bf16_to_f32(f32_to_bf16(x));
    return v;
}

// got (bf16) against the twin's f32 ref, in rows of `width`: every element must satisfy
// |got − ref| ≤ rel·|ref| + abs_frac·max_row|ref|. Reports the count and the first mismatches.
inline void expect_bf16_close(const std::vector<uint16_t>& got, const std::vector<float>& ref, int64_t width, double rel,
                              double abs_frac, const std::string& what) {
    ASSERT_EQ(got.size(), ref.size()) << what;
    size_t bad = 0;
    std::ostringstream first;
    for (size_t r0 = 0; r0 < ref.size(); r0 += static_cast<size_t>(width)) {
        double mx = 0;
        for (size_t i = r0; i < r0 + static_cast<size_t>(width); ++i) mx = std::max(mx, std::fabs(static_cast<double>(ref[i])));
        for (size_t i = r0; i < r0 + static_cast<size_t>(width); ++i) {
            const double g = bf16_to_f32(got[i]), c = ref[i];
            const double tol = rel * std::fabs(c) + abs_frac * mx;
            if (!(std::fabs(g - c) <= tol)) {
                if (bad < 5) first << "  [" << i << "] got " << g << " want " << c << " (tol " << tol << ")\n";
                ++bad;
            }
        }
    }
    EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << ref.size() << " elements off\n" << first.str();
}

// got against ref (both f32): |got − ref| ≤ rel·|ref| + abs.
inline void expect_f32_close(const std::vector<float>& got, const std::vector<float>& ref, double rel, double abs,
                             const std::string& what) {
    ASSERT_EQ(got.size(), ref.size()) << what;
    size_t bad = 0;
    std::ostringstream first;
    for (size_t i = 0; i < ref.size(); ++i) {
        const double g = got[i], c = ref[i];
        const double tol = rel * std::fabs(c) + abs;
        if (!(std::fabs(g - c) <= tol)) {
            if (bad < 5) first << "  [" << i << "] got " << g << " want " << c << " (tol " << tol << ")\n";
            ++bad;
        }
    }
    EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << ref.size() << " elements off\n" << first.str();
}

// Bit-for-bit equality (floats compared as bits, so -0 / +0 and NaN payloads count).
template <typename T>
inline void expect_bits_equal(const std::vector<T>& got, const std::vector<T>& ref, const std::string& what) {
    ASSERT_EQ(got.size(), ref.size()) << what;
    size_t bad = 0;
    std::ostringstream first;
    for (size_t i = 0; i < ref.size(); ++i) {
        if (std::memcmp(&got[i], &ref[i], sizeof(T)) != 0) {
            if (bad < 5) first << "  [" << i << "] got " << +got[i] << " want " << +ref[i] << "\n";
            ++bad;
        }
    }
    EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << ref.size() << " elements differ\n" << first.str();
}

// The values of an ActFp8 activation (linear.h): codes q [rows, K] in kernel order (element k of a
// word at byte {0, 2, 1, 3}[k % 4]) times the block scales s [rows, K / 128], as bf16 bits.
inline std::vector<uint16_t> act_fp8_values(const std::vector<uint8_t>& q, const std::vector<float>& s, int64_t rows,
                                            int64_t K) {
    std::vector<uint16_t> v(static_cast<size_t>(rows * K));
    for (int64_t i = 0; i < rows * K; ++i) {
        const int64_t k = i % 4;
        const int64_t at = (i & ~int64_t{3}) + (k == 1 ? 2 : k == 2 ? 1 : k);
        v[static_cast<size_t>(i)] = f32_to_bf16(e4m3_to_f32(q[static_cast<size_t>(at)]) * s[static_cast<size_t>(i / 128)]);
    }
    return v;
}

}  // namespace megamoe::test::rw
