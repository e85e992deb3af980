// parallel.h — a small fork-join thread pool for the CPU backend's outer loops.
//
// Why not OpenMP: libgomp's idle workers spin, and on a 2-core machine shared with other
// processes (CI runs test binaries side by side) the spinning made a forward pass of the tiny
// model 3-4x slower than one thread. These workers sleep on a condition variable instead.
// Iterations are split into contiguous static ranges, so which thread computes an element never
// changes the arithmetic: results are identical for any thread count.
#pragma once

#include <cstdint>
#include <functional>

namespace megamoe {

// 0 = the default: the environment's MEGAMOE_THREADS when it is a positive number, else the
// hardware concurrency (ctest sets MEGAMOE_THREADS=1: it runs test processes side by side).
void set_num_threads(int n);
int  num_threads();

// Calls fn(i) for i in [0, n), split across the pool when n·cost_per_item is worth it.
// fn must not call parallel_for itself (nested calls run inline).
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn, int64_t cost_per_item = 1 << 16);

// Calls fn(begin, end, worker) on contiguous ranges, one per worker; for loops that keep a
// per-worker scratch buffer. worker < num_threads().
void parallel_ranges(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn, int64_t cost_per_item = 1 << 16);

}  // namespace megamoe
