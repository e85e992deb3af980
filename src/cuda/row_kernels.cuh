// row_kernels.cuh — device helpers shared by the row-wise kernels (rowwise.cu, hyper_conn.cu,
// router.cu): programmatic-dependent-launch entry, bf16 conversions that match io/formats.h bit
// for bit, fixed-order warp / block sums, and the host launch wrapper. CUDA only.
//
// Matching the CPU twins. The twins are plain f32 C++ compiled without FMA contraction, so where
// a kernel mirrors a twin's arithmetic it spells every rounding out with __fmul_rn / __fadd_rn /
// __fdiv_rn / __fsqrt_rn (nvcc would otherwise contract a·b + c into one FMA and give different
// bits). Transcendentals use the accurate libdevice functions (expf, log1pf, cosf, sinf: ≤ 2 ulp),
// never the __expf-style intrinsics, so they differ from glibc by an ulp or two at most.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/common.h"
#include "cuda/device.cuh"   // dev::launch_pdl
#include "cuda/linear.h"     // CUDA_CHECK

namespace megamoe::cuda::rk {

// First statement of every kernel launched with launch(): wait for the previous kernel of the
// stream (griddepcontrol.wait returns once it has completed and its writes are visible), then let
// the next one be scheduled early (it waits the same way before touching memory).
__device__ __forceinline__ void pdl_begin() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

__device__ __forceinline__ float bf16_to_f32(uint32_t b) { return __uint_as_float(b << 16); }
__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xFFFF0000u); }

// f32 -> bf16 bits, round to nearest even; NaN stays NaN with the quiet bit forced. The same
// function as megamoe::f32_to_bf16 (io/formats.cpp), so every output has the twin's bits.
__device__ __forceinline__ uint32_t f32_to_bf16(float v) {
    const uint32_t u = __float_as_uint(v);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return ((u >> 16) | 0x0040u) & 0xFFFFu;
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) { return f32_to_bf16(lo) | (f32_to_bf16(hi) << 16); }

// Sum over the 32 lanes by an xor butterfly: every lane ends with the same bits (each level adds
// the same two partial sums, a + b == b + a in IEEE arithmetic), and the order is fixed.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over a block of blockDim.x threads (a multiple of 32, at most 1024): warp butterflies, then
// every thread adds the warp sums in warp order. All threads return the same bits. `red` is
// shared [32]; call once per kernel (a second call would need a barrier before reusing red).
__device__ __forceinline__ float block_sum(float v, float* red) {
    v = warp_sum(v);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float s = 0.0f;
    const int nw = static_cast<int>(blockDim.x >> 5);
    for (int w = 0; w < nw; ++w) s += red[w];
    return s;
}

// rsqrt(ss / n + eps) as the twins compute it: 1 / sqrt(mean + eps), each step rounded.
__device__ __forceinline__ float inv_rms(float ss, float n, float eps) {
    return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, n), eps)));
}

inline bool aligned(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

// Launch with programmatic dependent launch (every kernel here starts with pdl_begin) and
// report launch errors as megamoe::Error.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, CUstream_st* s, Args... args) {
    CUDA_CHECK(dev::launch_pdl(kernel, grid, block, smem, static_cast<cudaStream_t>(s), args...));
}

// Grid dimension from a count, checked against CUDA's limit for that dimension.
inline unsigned grid_dim(int64_t blocks, int64_t limit, const char* op) {
    if (blocks > limit) fail(op, ": ", blocks, " blocks exceed the grid limit ", limit);
    return static_cast<unsigned>(blocks);
}

}  // namespace megamoe::cuda::rk
