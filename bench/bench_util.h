// bench_util.h — timing and reference measurements shared by the GPU benchmark programs
// (bench/*_bench.cu). CUDA only.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <vector>

#include "core/common.h"
#include "cuda/buffer.h"
#include "cuda/linear.h"   // CUDA_CHECK

#define CUBLAS_CHECK(expr)                                                                             \
    do {                                                                                               \
        const cublasStatus_t st_ = (expr);                                                             \
        if (st_ != CUBLAS_STATUS_SUCCESS) ::megamoe::fail(__FILE__, ":", __LINE__, ": ", #expr, " = ", int(st_)); \
    } while (0)

namespace megamoe::bench {

// How time_graph measures: `warmup` plain replays, then busy replays for about `warm_ms` (at most
// `max_busy`) so that the clocks are up, then the median over `replays` timed replays.
struct Timing {
    int warmup = 2;
    int replays = 9;
    double warm_ms = 25;
    int max_busy = 1000;
};

// Median over replays of (graph time / launches), in microseconds: one CUDA graph of `launches`
// calls of enqueue(i) (i = 0 .. launches - 1) on `stream`, timed with CUDA events.
template <typename F>
double time_graph(int launches, cudaStream_t stream, F&& enqueue, const Timing& t) {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    try {
        for (int i = 0; i < launches; ++i) enqueue(i);
    } catch (...) {
        cudaGraph_t g = nullptr;
        (void)cudaStreamEndCapture(stream, &g);
        if (g) (void)cudaGraphDestroy(g);
        throw;
    }
    CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    cudaEvent_t a, b;
    CUDA_CHECK(cudaEventCreate(&a));
    CUDA_CHECK(cudaEventCreate(&b));
    for (int i = 0; i < t.warmup; ++i) CUDA_CHECK(cudaGraphLaunch(exec, stream));
    CUDA_CHECK(cudaEventRecord(a, stream));
    CUDA_CHECK(cudaGraphLaunch(exec, stream));
    CUDA_CHECK(cudaEventRecord(b, stream));
    CUDA_CHECK(cudaEventSynchronize(b));
    float once = 0;
    CUDA_CHECK(cudaEventElapsedTime(&once, a, b));
    const int busy = static_cast<int>(std::min<double>(t.max_busy, t.warm_ms / std::max(once, 1e-3f)));
    for (int i = 0; i < busy; ++i) CUDA_CHECK(cudaGraphLaunch(exec, stream));
    std::vector<double> us;
    for (int i = 0; i < t.replays; ++i) {
        CUDA_CHECK(cudaEventRecord(a, stream));
        CUDA_CHECK(cudaGraphLaunch(exec, stream));
        CUDA_CHECK(cudaEventRecord(b, stream));
        CUDA_CHECK(cudaEventSynchronize(b));
        float ms = 0;
        CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
        us.push_back(1000.0 * ms / launches);
    }
    CUDA_CHECK(cudaEventDestroy(a));
    CUDA_CHECK(cudaEventDestroy(b));
    CUDA_CHECK(cudaGraphExecDestroy(exec));
    CUDA_CHECK(cudaGraphDestroy(graph));
    std::sort(us.begin(), us.end());
    return us[us.size() / 2];
}

// Device-to-device copy bandwidth, bytes read + written per second (1 GiB cudaMemcpyAsync, median
// of 10 after 2 warm-up copies): the 100% of the benchmarks' "% copy".
inline double d2d_bandwidth(cudaStream_t stream) {
    const size_t bytes = 1ull << 30;
    cuda::DeviceBuffer src(bytes, "d2d_bandwidth source"), dst(bytes, "d2d_bandwidth destination");
    src.fill(0x3C);
    CUDA_CHECK(cudaDeviceSynchronize());
    cudaEvent_t a, b;
    CUDA_CHECK(cudaEventCreate(&a));
    CUDA_CHECK(cudaEventCreate(&b));
    std::vector<double> gbs;
    for (int i = 0; i < 12; ++i) {
        CUDA_CHECK(cudaEventRecord(a, stream));
        CUDA_CHECK(cudaMemcpyAsync(dst.get(), src.get(), bytes, cudaMemcpyDeviceToDevice, stream));
        CUDA_CHECK(cudaEventRecord(b, stream));
        CUDA_CHECK(cudaEventSynchronize(b));
        float ms = 0;
        CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
        if (i >= 2) gbs.push_back(2.0 * bytes / (ms * 1e-3) / 1e9);
    }
    CUDA_CHECK(cudaEventDestroy(a));
    CUDA_CHECK(cudaEventDestroy(b));
    std::sort(gbs.begin(), gbs.end());
    return gbs[gbs.size() / 2];
}

}  // namespace megamoe::bench
