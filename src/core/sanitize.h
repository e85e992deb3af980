// sanitize.h — hot loops that the sanitizers check as whole ranges.
//
// ASan, TSan and UBSan instrument every access. In the CPU reference's innermost loops (dot
// products, weight-row decoding) that cost most of a sanitized test run (76% of a model test's
// time was one dot product, 3.7x its time uninstrumented) and kept the loops from vectorizing.
// A function whose loop touches exactly known ranges, with nothing else running in between,
// checks the ranges once (sanitize_read / sanitize_write, n elements of T from p) and runs the
// loop in a function marked MEGAMOE_UNINSTRUMENTED. What the per-access checks would report is
// reported the same way: an instrumented access of the first element (UBSan: null, alignment of
// T, which every element shares; ASan), then ASan's check of the whole range, with a poisoned byte
// (out of bounds, freed) reported by an instrumented access to it; TSan records the range as read
// or written. In builds without a sanitizer these are no-ops.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define MEGAMOE_SANITIZED_BUILD 1
#endif

#if defined(MEGAMOE_SANITIZED_BUILD)
#define MEGAMOE_UNINSTRUMENTED __attribute__((no_sanitize("address", "thread", "undefined")))
namespace megamoe {
void sanitize_range(const void* p, size_t bytes, bool write);   // ASan / TSan, core/sanitize.cpp

template <typename T>
inline void sanitize_read(const T* p, int64_t n) {
    if (n <= 0) return;
    (void)*static_cast<const volatile T*>(p);   // instrumented: null, alignment, bounds of element 0
    sanitize_range(p, static_cast<size_t>(n) * sizeof(T), false);
}
template <typename T>
inline void sanitize_write(T* p, int64_t n) {
    if (n <= 0) return;
    (void)*static_cast<volatile T*>(p);
    sanitize_range(p, static_cast<size_t>(n) * sizeof(T), true);
}
}  // namespace megamoe
#else
#define MEGAMOE_UNINSTRUMENTED
namespace megamoe {
template <typename T>
inline void sanitize_read(const T*, int64_t) {}
template <typename T>
inline void sanitize_write(T*, int64_t) {}
}  // namespace megamoe
#endif
