// sanitize.cpp — whole-range checks for the hot loops left uninstrumented (core/sanitize.h).
#include "core/sanitize.h"

#if defined(MEGAMOE_SANITIZED_BUILD)

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif
// Under -fsanitize=thread GCC declares __tsan_read_range / __tsan_write_range (void*, long) itself.

namespace megamoe {

namespace {

#if defined(__SANITIZE_ADDRESS__)
// Instrumented accesses of a byte ASan found poisoned: ASan reports them (and stops) as it would
// have in the loop, with the caller's stack.
[[gnu::noinline]] void asan_read(const volatile char* p) { (void)*p; }
[[gnu::noinline]] void asan_write(volatile char* p) { *p = 0; }
#endif

}  // namespace

void sanitize_range([[maybe_unused]] const void* p, [[maybe_unused]] size_t bytes, [[maybe_unused]] bool write) {
    if (bytes == 0) return;
#if defined(__SANITIZE_ADDRESS__)
    if (void* bad = __asan_region_is_poisoned(const_cast<void*>(p), bytes)) {
        if (write)
            asan_write(static_cast<char*>(bad));
        else
            asan_read(static_cast<const char*>(bad));
    }
#endif
#if defined(__SANITIZE_THREAD__)
    if (write)
        __tsan_write_range(const_cast<void*>(p), static_cast<long>(bytes));
    else
        __tsan_read_range(const_cast<void*>(p), static_cast<long>(bytes));
#endif
}

}  // namespace megamoe

#endif
