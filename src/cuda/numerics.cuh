// numerics.cuh — the official inference code's activation roundings (deepseek-v4.md §2.3-2.5) as
// scalar device functions, for the kernels that apply them under Numerics::official. Each one is
// the element step of its CPU twin in ref/ops_numerics.cpp and gives the same bits:
//
//   bf16_round(v)            ops::bf16_round: round to nearest even bf16, back to f32
//   pow2_ceil(v)             2^ceil(log2 v) of a positive normal v (e8m0_ceil: exponent + (mantissa != 0))
//   fp8_scale(amax)          the FP8 block scale: pow2_ceil(max(amax, 1e-4) / 448)
//   fp8_qdq(x, s)            bf16(e4m3(clamp(x / s, ±448)) · s)       (fp8_block_qdq's element step)
//   fp4_scale(amax)          the FP4 block scale: pow2_ceil(max(amax, 6·2^-126) / 6)
//   fp4_qdq(x, s)            bf16(e2m1(clamp(x / s, ±6)) · s)          (fp4_block_qdq's element step)
//
// The block amax (128 elements for GEMM inputs, 64 for the KV latent, 32 for FP4) is the calling
// kernel's reduction. s is a power of two, so x / s and q · s are exact, and so is the bf16 rounding
// of an e4m3 or e2m1 value times s: the rounded value is a bf16 that the bf16 GEMMs take unchanged.
// CUDA only; compiled without fast-math (subnormal e4m3 results need IEEE division and no FTZ).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace megamoe::cuda::nm {

__device__ __forceinline__ float bf16_round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

// v > 0 and normal (the callers clamp amax first, so v >= 2^-126).
__device__ __forceinline__ float pow2_ceil(float v) {
    const uint32_t u = __float_as_uint(v);
    uint32_t e = (u >> 23) + ((u & 0x7FFFFFu) != 0u ? 1u : 0u);
    e = e > 254u ? 254u : e;
    return __uint_as_float(e << 23);
}

__device__ __forceinline__ float fp8_scale(float amax) { return pow2_ceil(fmaxf(amax, 1e-4f) / 448.0f); }

// e4m3 with round-to-nearest-even and saturation (finite v): the hardware conversion.
__device__ __forceinline__ float e4m3_round(float v) {
    const __nv_fp8_storage_t q = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(q, __NV_E4M3)));
}

__device__ __forceinline__ float fp8_qdq(float x, float s) {
    const float v = fminf(fmaxf(x / s, -448.0f), 448.0f);
    return bf16_round(e4m3_round(v) * s);
}

__device__ __forceinline__ float fp4_scale(float amax) {
    return pow2_ceil(fmaxf(amax, 6.0f * 1.17549435e-38f) / 6.0f);   // 6 · 2^-126
}

// e2m1 with round-to-nearest-even, saturating at ±6, the sign of zero kept (f32_to_e2m1: count the
// grid midpoints at or below |v|; strict where the lower neighbour has the even code).
__device__ __forceinline__ float e2m1_round(float v) {
    const float a = fabsf(v);
    const int code = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) + (a > 5.0f);
    constexpr float kGrid[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    float m = 0.0f;
#pragma unroll
    for (int i = 1; i < 8; ++i) m = code == i ? kGrid[i] : m;
    return copysignf(m, v);
}

__device__ __forceinline__ float fp4_qdq(float x, float s) {
    const float v = fminf(fmaxf(x / s, -6.0f), 6.0f);
    return bf16_round(e2m1_round(v) * s);
}

}  // namespace megamoe::cuda::nm
