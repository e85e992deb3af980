// row_norm.cuh — the row body of rms_norm_rows (rowwise.cu: the kernel, its contract and its
// numerics), shared with the small-M linear's fused tail (linear_regs.cu, LinearTail), so that
// both make the same bits by construction. Device code only.
#pragma once

#include <cstdint>

#include "cuda/numerics.cuh"
#include "cuda/row_kernels.cuh"

namespace megamoe::cuda::rnorm {

// y[r] = bf16(w · (x[r] · inv)), inv = 1 / sqrt(Σx² / D + eps), by the whole CTA (blockDim.x
// threads, a multiple of 32: the sum's order depends on it). VEC = 4 (float4 in, 4 bf16 out) or 1.
// official: x is rounded to bf16 as loaded; yq (fused: VEC 4, D % 128 == 0, every lane of a warp
// in the loop) receives y FP8-rounded in 128-blocks, the warp's 32 vectors being one block, and
// yq8 / ys8 (or null) its e4m3 codes and block scales. yq may alias y (then only the rounded values
// remain). CG: x was written by other CTAs of the running grid, so it is read through L2. red:
// shared [32]; a CTA calling this for a second row needs a barrier in between.
template <int VEC, bool CG>
__device__ __forceinline__ void rms_norm_row(const float* __restrict__ x, int64_t r, int64_t D,
                                             const uint16_t* __restrict__ w, float eps,
                                             uint16_t* y, bool official, uint16_t* yq, uint8_t* yq8, float* ys8,
                                             float* red) {
    const float* xr = x + r * D;
    uint16_t* yr = y + r * D;
    const int64_t nv = D / VEC;
    auto load = [&](int64_t v, float (&q)[VEC]) {
        if constexpr (VEC == 4) {
            const float4 f = CG ? __ldcg(reinterpret_cast<const float4*>(xr) + v) : reinterpret_cast<const float4*>(xr)[v];
            q[0] = f.x, q[1] = f.y, q[2] = f.z, q[3] = f.w;
        } else {
            q[0] = CG ? __ldcg(xr + v) : xr[v];
        }
        if (official)
            for (int e = 0; e < VEC; ++e) q[e] = nm::bf16_round(q[e]);
    };
    float ss = 0.0f;
    for (int64_t v = threadIdx.x; v < nv; v += blockDim.x) {
        float q[VEC];
        load(v, q);
        for (int e = 0; e < VEC; ++e) ss = fmaf(q[e], q[e], ss);
    }
    const float inv = rk::inv_rms(rk::block_sum(ss, red), static_cast<float>(D), eps);
    // Second pass over the row: the same thread re-reads its own elements (L1 hits; CG: L2).
    for (int64_t v = threadIdx.x; v < nv; v += blockDim.x) {
        float q[VEC];
        load(v, q);
        if constexpr (VEC == 4) {
            float o[4] = {__fmul_rn(q[0], inv), __fmul_rn(q[1], inv), __fmul_rn(q[2], inv), __fmul_rn(q[3], inv)};
            if (w != nullptr) {
                const uint2 wb = reinterpret_cast<const uint2*>(w)[v];
                o[0] = __fmul_rn(rk::bf16_lo(wb.x), o[0]);
                o[1] = __fmul_rn(rk::bf16_hi(wb.x), o[1]);
                o[2] = __fmul_rn(rk::bf16_lo(wb.y), o[2]);
                o[3] = __fmul_rn(rk::bf16_hi(wb.y), o[3]);
            }
            reinterpret_cast<uint2*>(yr)[v] = make_uint2(rk::pack_bf16x2(o[0], o[1]), rk::pack_bf16x2(o[2], o[3]));
            if (yq8 != nullptr) {   // ... and its codes and scale (linear_fp8_act's input)
                uint32_t codes;
                float sc;
                nm::fp8_round_warp_block4(o, codes, sc);
                reinterpret_cast<uint32_t*>(yq8 + r * D)[v] = codes;
                if ((v & 31) == 0) ys8[(r * D + v * 4) / 128] = sc;
                reinterpret_cast<uint2*>(yq + r * D)[v] = make_uint2(rk::pack_bf16x2(o[0], o[1]), rk::pack_bf16x2(o[2], o[3]));
            } else if (yq != nullptr) {   // round_gemm_input of this 128-block (see above)
                nm::fp8_round_warp_block4(o);
                reinterpret_cast<uint2*>(yq + r * D)[v] = make_uint2(rk::pack_bf16x2(o[0], o[1]), rk::pack_bf16x2(o[2], o[3]));
            }
        } else {
            float o = __fmul_rn(q[0], inv);
            if (w != nullptr) o = __fmul_rn(rk::bf16_to_f32(w[v]), o);
            yr[v] = static_cast<uint16_t>(rk::f32_to_bf16(o));
        }
    }
}

}  // namespace megamoe::cuda::rnorm
