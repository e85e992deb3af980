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
//   indexer_qk_warp(v, ...)  round_indexer_qk of one row of ≤ 128 values spread over a warp
//
// The block amax (128 elements for GEMM inputs, 64 for the KV latent, 32 for FP4) is the calling
// kernel's reduction. s is a power of two, so x / s and q · s are exact, and so is the bf16 rounding
// of an e4m3 or e2m1 value times s: the rounded value is a bf16 that the bf16 GEMMs take unchanged.
// CUDA only; compiled without fast-math (subnormal e4m3 results need IEEE division and no FTZ).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <cstring>

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

// x / s for a power of two s = 2^k (k in [-126, 127]: what fp8_scale and fp4_scale give): x · 2^-k,
// the same number (2^-k is exact, the f32 subnormal 2^-127 included, and a product and a quotient
// are both the correctly rounded value of the same x · 2^-k, subnormal results included; no
// fast-math, no FTZ), in 3 instructions and no branch where the IEEE division takes ~10 and a slow
// path. (A first form fell back to the division for k = 127; with it compiled into the kernels the
// exact path got slower, docs/bench-gemm.md "h rounded once per warp".)
__device__ __forceinline__ float div_pow2(float x, float s) {
    const uint32_t u = __float_as_uint(s);
    return x * __uint_as_float(u < 0x7F000000u ? 0x7F000000u - u : 0x00400000u);
}

// The e4m3 code of x at scale s (fp8_qdq's code; the KV rows' fp8 storage, cuda/kv_row.h).
__device__ __forceinline__ uint8_t e4m3_code(float x, float s) {
    return static_cast<uint8_t>(__nv_cvt_float_to_fp8(fminf(fmaxf(div_pow2(x, s), -448.0f), 448.0f), __NV_SATFINITE, __NV_E4M3));
}

// Two e4m3 codes (low byte first) times a power of two s, as a packed bf16 pair (low half first):
// exact (an e4m3 times 2^k is a bf16 while it stays normal in f32; s ≥ 2^-22 for the KV rows).
__device__ __forceinline__ uint32_t e4m3x2_to_bf16x2(uint16_t codes, float s) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(codes), __NV_E4M3);
    const float2 f = __half22float2(__half2(h));
    const __nv_bfloat162 b = __floats2bfloat162_rn(f.x * s, f.y * s);
    return *reinterpret_cast<const uint32_t*>(&b);
}

// The E8M0 byte of a power-of-two scale s (its biased exponent).
__device__ __forceinline__ uint8_t scale_byte(float s) { return static_cast<uint8_t>(__float_as_uint(s) >> 23); }

__device__ __forceinline__ float fp8_qdq(float x, float s) {
    const float v = fminf(fmaxf(div_pow2(x, s), -448.0f), 448.0f);
    return bf16_round(e4m3_round(v) * s);
}

// fp8_qdq of a packed bf16 pair (low half first) at a power-of-two scale s, inv_s = 1 / s (exact):
// bit-identical to fp8_qdq on each half (x · (1/s) is x / s when 1/s is exact; the saturating
// conversion clamps to ±448 as fp8_qdq's clamp does; e4m3 · s is exact in bf16), in ~9
// instructions per pair where fp8_qdq's division alone takes more.
__device__ __forceinline__ uint32_t fp8_qdq_bf16x2(uint32_t v, float s, float inv_s) {
    const float2 x = make_float2(__uint_as_float(v << 16) * inv_s, __uint_as_float(v & 0xFFFF0000u) * inv_s);
    const __nv_fp8x2_storage_t q = __nv_cvt_float2_to_fp8x2(x, __NV_SATFINITE, __NV_E4M3);
    const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(q, __NV_E4M3)));
    const __nv_bfloat162 b = __floats2bfloat162_rn(f.x * s, f.y * s);
    uint32_t u;
    memcpy(&u, &b, 4);
    return u;
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
    const float v = fminf(fmaxf(div_pow2(x, s), -6.0f), 6.0f);
    return bf16_round(e2m1_round(v) * s);
}

// ops::round_indexer_qk of one row held by a warp: lane i holds v[0..E) = elements [i·E, i·E + E)
// of a row of hd values (hd = 32·E; or hd < 32 with E = 1, and lanes ≥ hd hold 0 and stay 0).
// The Walsh-Hadamard butterflies h = 1, 2, 4, ... compute at every stage exactly the twin's
// a + b (lower element) and a − b (upper element) of the previous stage's values: widths h < E
// in registers, wider ones with the partner lane at distance h / E. Then · scale (the caller's
// 1/sqrt(hd), computed as ops::hadamard does), bf16, and FP4 in 32-blocks (32/E lanes per block;
// the whole row when hd < 32). Every lane of the warp must call it (full-mask shuffles).
template <int E>
__device__ __forceinline__ void indexer_qk_warp(float (&v)[E], int lane, int hd, float scale) {
#pragma unroll
    for (int h = 1; h < E; h *= 2) {
#pragma unroll
        for (int j = 0; j < E; ++j) {
            if ((j & h) == 0) {
                const float a = v[j], b = v[j + h];
                v[j] = __fadd_rn(a, b);
                v[j + h] = __fsub_rn(a, b);
            }
        }
    }
    for (int m = 1; m * E < hd; m *= 2) {
        const bool upper = (lane & m) != 0;   // this lane's elements are the pairs' x[j + h]
#pragma unroll
        for (int j = 0; j < E; ++j) {
            const float o = __shfl_xor_sync(0xffffffffu, v[j], m);
            v[j] = upper ? __fsub_rn(o, v[j]) : __fadd_rn(v[j], o);
        }
    }
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < E; ++j) {
        v[j] = bf16_round(__fmul_rn(v[j], scale));   // rotate_activation returns bf16
        amax = fmaxf(amax, fabsf(v[j]));
    }
    const int lanes = hd >= 32 ? 32 / E : 32;
    for (int o = lanes / 2; o >= 1; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float s = fp4_scale(amax);
#pragma unroll
    for (int j = 0; j < E; ++j) v[j] = fp4_qdq(v[j], s);
}

// round_gemm_input of one 128-block held by a whole warp, 4 consecutive values per lane (lane i:
// elements 4i .. 4i + 3): v rounded to bf16, then FP8-rounded with the block's scale. Every lane of
// the warp must call it.
// v rounded to bf16; returns the FP8 scale of the 128-block the warp holds (every lane must call it).
__device__ __forceinline__ float fp8_warp_block4_scale(float (&v)[4]) {
    float amax = 0.0f;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        v[e] = bf16_round(v[e]);
        amax = fmaxf(amax, fabsf(v[e]));
    }
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, m));
    return fp8_scale(amax);
}

__device__ __forceinline__ void fp8_round_warp_block4(float (&v)[4]) {
    const float s = fp8_warp_block4_scale(v);
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = fp8_qdq(v[e], s);
}

// The same, also giving this lane's four e4m3 codes as one word in kernel order (bytes k0 k2 k1
// k3; the FP8 × FP8 linear's activation, linear.h ActFp8) and the block's scale s.
__device__ __forceinline__ void fp8_round_warp_block4(float (&v)[4], uint32_t& codes, float& s) {
    s = fp8_warp_block4_scale(v);
    uint32_t c[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        c[e] = e4m3_code(v[e], s);
        v[e] = fp8_qdq(v[e], s);
    }
    codes = c[0] | (c[2] << 8) | (c[1] << 16) | (c[3] << 24);
}

}  // namespace megamoe::cuda::nm
