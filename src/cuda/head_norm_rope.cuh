// head_norm_rope.cuh — the per-row body of head_norm_rope (rowwise.cu: the kernel and its
// numerics), shared with sparse_attention's fused query (attention.cu), so that both make the
// same bits by construction: one warp normalizes and rotates one (token, head) row and hands its
// bf16 values to a store. Device code only.
#pragma once

#include <cstdint>

#include "cuda/numerics.cuh"
#include "cuda/row_kernels.cuh"

namespace megamoe::cuda::hnr {

struct HeadArgs {
    const float* x;           // [rows, hd]
    int64_t rows, heads, hd;
    bool normalize;
    const uint16_t* w;        // [hd] or null
    float eps;
    const int32_t* pos;       // [T]
    const float* inv_freq;    // [rope_dim / 2]
    int64_t rope_dim;
    uint16_t* y;              // [rows, hd]: head_norm_rope_kernel's output (norm_rope_row: a store)
    bool official;            // Numerics::official (rowwise.h)
};

// (a, b) rotated by angle = f32(pos) · f, as ops::rope: a·c − b·s, b·c + a·s.
__device__ __forceinline__ void rotate(float& a, float& b, float fpos, float f) {
    const float angle = __fmul_rn(fpos, f);
    const float c = cosf(angle), s = sinf(angle);
    const float a2 = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    const float b2 = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
    a = a2;
    b = b2;
}

// Row `row` = (t, h) by one warp (lane = its lane): each output group goes to store4(e, four bf16
// of elements e .. e + 3 packed in a uint2) for VEC = 4, store1(e, one bf16) for VEC = 1. sq: the
// warp's 128 floats of 16-byte aligned shared memory (the official unweighted norm's squares).
// VEC = 4: hd % 4 == 0 and hd − rope_dim even (pairs never straddle a vector); VEC = 1: any hd,
// the plain dims and the rope pairs in two loops.
template <int VEC, typename Store4, typename Store1>
__device__ __forceinline__ void norm_rope_row(const HeadArgs& a, int64_t row, int lane, float* sq, Store4 store4,
                                              Store1 store1) {
    const int64_t hd = a.hd;
    const float* xr = a.x + row * hd;

    // Official norms: the VEC bf16-rounded inputs at e (zeros past hd; e is a multiple of VEC).
    auto load_bf16 = [&](int64_t e, float (&v)[VEC]) {
        if (e >= hd) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) v[j] = 0.0f;
        } else if constexpr (VEC == 4) {
            const float4 q = *reinterpret_cast<const float4*>(xr + e);
            v[0] = nm::bf16_round(q.x), v[1] = nm::bf16_round(q.y), v[2] = nm::bf16_round(q.z), v[3] = nm::bf16_round(q.w);
        } else {
            v[0] = nm::bf16_round(xr[e]);
        }
    };
    float inv = 1.0f;
    if (a.normalize && !a.official) {
        float ss = 0.0f;
        for (int64_t e = lane * VEC; e < hd; e += 32 * VEC) {
            if constexpr (VEC == 4) {
                const float4 q = *reinterpret_cast<const float4*>(xr + e);
                ss = fmaf(q.x, q.x, ss);
                ss = fmaf(q.y, q.y, ss);
                ss = fmaf(q.z, q.z, ss);
                ss = fmaf(q.w, q.w, ss);
            } else {
                ss = fmaf(xr[e], xr[e], ss);
            }
        }
        inv = rk::inv_rms(rk::warp_sum(ss), static_cast<float>(hd), a.eps);
    } else if (a.normalize && a.w != nullptr) {
        // ops::rms_norm of the bf16 values: f64 squares and sum, 1 / sqrt(f32(ss / D) + eps).
        double ss = 0.0;
        for (int64_t e = lane * VEC; e < hd; e += 32 * VEC) {
            float v[VEC];
            load_bf16(e, v);
#pragma unroll
            for (int j = 0; j < VEC; ++j) ss = __dadd_rn(ss, __dmul_rn(v[j], v[j]));
        }
#pragma unroll
        for (int o = 16; o >= 1; o >>= 1) ss = __dadd_rn(ss, __shfl_xor_sync(0xffffffffu, ss, o));
        const float mean = __double2float_rn(__ddiv_rn(ss, static_cast<double>(hd)));
        inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, a.eps)));
    } else if (a.normalize) {
        // ops::head_rms_norm_bf16: ss += bf16(v²) in element order (f32), then mean, + eps and
        // the rsqrt each rounded to bf16; inv is its r. Per chunk of 32·VEC elements the lanes
        // write their squares to the warp's shared slice, then every lane adds the slice in
        // element order (broadcast float4 reads, independent of the add chain). Past hd the
        // squares are +0, which leave ss unchanged.
        float ss = 0.0f;
        for (int64_t e0 = 0; e0 < hd; e0 += 32 * VEC) {
            float v[VEC];
            load_bf16(e0 + lane * VEC, v);
#pragma unroll
            for (int j = 0; j < VEC; ++j) sq[lane * VEC + j] = nm::bf16_round(__fmul_rn(v[j], v[j]));
            __syncwarp();
#pragma unroll
            for (int i = 0; i < 32 * VEC; i += 4) {
                const float4 s4 = *reinterpret_cast<const float4*>(sq + i);
                ss = __fadd_rn(__fadd_rn(__fadd_rn(__fadd_rn(ss, s4.x), s4.y), s4.z), s4.w);
            }
            __syncwarp();   // the slice is rewritten by the next chunk
        }
        const float mean = nm::bf16_round(__fdiv_rn(ss, static_cast<float>(hd)));
        inv = nm::bf16_round(__fdiv_rn(1.0f, __fsqrt_rn(nm::bf16_round(__fadd_rn(mean, a.eps)))));
    }
    // The normalized (and weighted) value of element e, as ops::rms_norm writes it; official: of
    // the bf16 input, and rounded to bf16 (ops::head_rms_norm_bf16, or round_bf16 after rms_norm).
    auto scaled = [&](float v, int64_t e) {
        if (a.official) v = nm::bf16_round(v);
        if (!a.normalize) return v;
        v = __fmul_rn(v, inv);
        if (a.w != nullptr) v = __fmul_rn(rk::bf16_to_f32(a.w[e]), v);
        return a.official ? nm::bf16_round(v) : v;
    };
    const int64_t off = hd - a.rope_dim;
    const float fpos = a.rope_dim > 0 ? static_cast<float>(a.pos[row / a.heads]) : 0.0f;

    if constexpr (VEC == 4) {
        for (int64_t e = lane * 4; e < hd; e += 128) {
            const float4 q = *reinterpret_cast<const float4*>(xr + e);
            float v[4] = {q.x, q.y, q.z, q.w};
            if (a.official) {
#pragma unroll
                for (int j = 0; j < 4; ++j) v[j] = nm::bf16_round(v[j]);
            }
            if (a.normalize) {
#pragma unroll
                for (int j = 0; j < 4; ++j) v[j] = __fmul_rn(v[j], inv);
                if (a.w != nullptr) {
                    const uint2 wb = *reinterpret_cast<const uint2*>(a.w + e);
                    v[0] = __fmul_rn(rk::bf16_lo(wb.x), v[0]);
                    v[1] = __fmul_rn(rk::bf16_hi(wb.x), v[1]);
                    v[2] = __fmul_rn(rk::bf16_lo(wb.y), v[2]);
                    v[3] = __fmul_rn(rk::bf16_hi(wb.y), v[3]);
                }
                if (a.official) {
#pragma unroll
                    for (int j = 0; j < 4; ++j) v[j] = nm::bf16_round(v[j]);
                }
            }
            for (int p = 0; p < 2; ++p) {
                const int64_t e0 = e + 2 * p;   // off is even, so a pair starts at an even element
                if (e0 >= off) rotate(v[2 * p], v[2 * p + 1], fpos, a.inv_freq[(e0 - off) / 2]);
            }
            store4(e, make_uint2(rk::pack_bf16x2(v[0], v[1]), rk::pack_bf16x2(v[2], v[3])));
        }
    } else {
        for (int64_t e = lane; e < off; e += 32) store1(e, static_cast<uint16_t>(rk::f32_to_bf16(scaled(xr[e], e))));
        for (int64_t i = lane; i < a.rope_dim / 2; i += 32) {
            const int64_t e0 = off + 2 * i;
            float v0 = scaled(xr[e0], e0), v1 = scaled(xr[e0 + 1], e0 + 1);
            rotate(v0, v1, fpos, a.inv_freq[i]);
            store1(e0, static_cast<uint16_t>(rk::f32_to_bf16(v0)));
            store1(e0 + 1, static_cast<uint16_t>(rk::f32_to_bf16(v1)));
        }
    }
}

}  // namespace megamoe::cuda::hnr
