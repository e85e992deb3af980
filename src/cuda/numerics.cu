// numerics.cu — the official code's activation roundings as in-place kernels (contracts and twins
// in numerics.h; the element steps are numerics.cuh's scalar functions).
//
// Launch shapes (fixed by the call's shapes, so eager and captured launches agree):
//   fp8_block_round: one warp per (row, block), 8 warps per CTA. Lane i takes V consecutive
//     elements at i·V, i·V + 32·V, ... of its block, V ∈ {8, 4, 2, 1} (one 16/8/4/2-byte vector
//     load each), chosen on the host as the smallest V with 32·V ≥ block that the alignment of x,
//     ld and block allows (block 128: V = 4, every lane one 8-byte vector; block 64: V = 2). When
//     32·V ≥ block the values stay in registers between the two passes (amax, then quantize);
//     larger blocks re-read their elements (L1 hits). The block amax is a warp xor-butterfly of
//     fmaxf: a maximum, exact in any order. A decode row of 7168 is 56 warps: one wave, the cost is
//     the launch and one load + store of 14 KB.
//   round_indexer_qk: one warp per row (hd ≤ 128), 8 rows per CTA. Lane i holds E = hd/32
//     consecutive elements (E = 1 and lanes past hd idle-at-zero when hd < 32). The butterflies of
//     width h < E run in registers, the wider ones with __shfl_xor_sync at lane distance h/E; each
//     stage computes exactly the twin's a + b (lower element) and a − b (upper element) from the
//     previous stage's values, so every output is the twin's sequence of f32 adds, bit for bit.
//     Then · 1/sqrt(hd) (the host computes it as the twin does), bf16, and the 32-block amax over
//     the 32/E lanes of the block (xor-butterfly), FP4 quantize-dequantize, store.
//   round_bf16_inplace, scalar_op_values: element-wise, one 4-wide vector (or one element) per
//     thread, 256 threads per CTA.
// Every kernel starts with griddepcontrol.wait (programmatic dependent launch), allocates nothing
// and uses no atomics.
#include "cuda/numerics.h"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "core/common.h"
#include "cuda/numerics.cuh"
#include "cuda/row_kernels.cuh"
#include "cuda/w4a8.h"

namespace megamoe::cuda {
namespace {

using rk::aligned;
using rk::pdl_begin;

constexpr int kWarpsPerCta = 8;
constexpr int kThreads = kWarpsPerCta * 32;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float warp_max(float v, int lanes) {
    for (int o = lanes / 2; o >= 1; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
    return v;
}

// ---------------------------------------------------------------------------- fp8 blocks

// V bf16 at p (aligned to 2V bytes) <-> f32.
template <int V> __device__ __forceinline__ void load_bf16(const uint16_t* p, float (&v)[V]) {
    if constexpr (V == 8) {
        const uint4 q = *reinterpret_cast<const uint4*>(p);
        const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) v[2 * i] = rk::bf16_lo(w[i]), v[2 * i + 1] = rk::bf16_hi(w[i]);
    } else if constexpr (V == 4) {
        const uint2 q = *reinterpret_cast<const uint2*>(p);
        v[0] = rk::bf16_lo(q.x), v[1] = rk::bf16_hi(q.x), v[2] = rk::bf16_lo(q.y), v[3] = rk::bf16_hi(q.y);
    } else if constexpr (V == 2) {
        const uint32_t q = *reinterpret_cast<const uint32_t*>(p);
        v[0] = rk::bf16_lo(q), v[1] = rk::bf16_hi(q);
    } else {
        v[0] = rk::bf16_to_f32(*p);
    }
}
template <int V> __device__ __forceinline__ void store_bf16(uint16_t* p, const float (&v)[V]) {
    if constexpr (V == 8) {
        *reinterpret_cast<uint4*>(p) = make_uint4(rk::pack_bf16x2(v[0], v[1]), rk::pack_bf16x2(v[2], v[3]),
                                                  rk::pack_bf16x2(v[4], v[5]), rk::pack_bf16x2(v[6], v[7]));
    } else if constexpr (V == 4) {
        *reinterpret_cast<uint2*>(p) = make_uint2(rk::pack_bf16x2(v[0], v[1]), rk::pack_bf16x2(v[2], v[3]));
    } else if constexpr (V == 2) {
        *reinterpret_cast<uint32_t*>(p) = rk::pack_bf16x2(v[0], v[1]);
    } else {
        *p = static_cast<uint16_t>(rk::f32_to_bf16(v[0]));
    }
}

// Block b of row r: elements [b·block, min(width, (b+1)·block)) of x + r·ld. A vector that runs
// past the block's end (only in a partial last block, when width is not a multiple of V) is
// handled element by element. kOne: 32·V ≥ block, so each lane has at most one vector.
template <int V, bool kOne>
__global__ void __launch_bounds__(kThreads)
fp8_block_round_kernel(uint16_t* __restrict__ x, int64_t n_units, int64_t nblk, int64_t ld, int64_t width,
                       int64_t block) {
    pdl_begin();
    const int lane = static_cast<int>(threadIdx.x & 31);
    const int64_t unit = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
    if (unit >= n_units) return;   // whole warps
    const int64_t r = unit / nblk, b = unit - r * nblk;
    const int64_t b0 = b * block;
    const int64_t n = width - b0 < block ? width - b0 : block;
    uint16_t* p = x + r * ld + b0;

    // The V elements at i (clamped to the block: zeros past n, which do not change the amax).
    auto load = [&](int64_t i, float (&v)[V]) {
        if (i + V <= n) {
            load_bf16<V>(p + i, v);
        } else {
#pragma unroll
            for (int j = 0; j < V; ++j) v[j] = i + j < n ? rk::bf16_to_f32(p[i + j]) : 0.0f;
        }
    };
    auto store = [&](int64_t i, const float (&v)[V]) {
        if (i + V <= n) {
            store_bf16<V>(p + i, v);
        } else {
#pragma unroll
            for (int j = 0; j < V; ++j)
                if (i + j < n) p[i + j] = static_cast<uint16_t>(rk::f32_to_bf16(v[j]));
        }
    };

    float amax = 0.0f;
    float v[V];
    if constexpr (kOne) {
        const int64_t i = static_cast<int64_t>(lane) * V;
        if (i < n) {
            load(i, v);
#pragma unroll
            for (int j = 0; j < V; ++j) amax = fmaxf(amax, fabsf(v[j]));
        }
        const float s = nm::fp8_scale(warp_max(amax, 32));
        if (i < n) {
#pragma unroll
            for (int j = 0; j < V; ++j) v[j] = nm::fp8_qdq(v[j], s);
            store(i, v);
        }
    } else {
        for (int64_t i = static_cast<int64_t>(lane) * V; i < n; i += 32 * V) {
            load(i, v);
#pragma unroll
            for (int j = 0; j < V; ++j) amax = fmaxf(amax, fabsf(v[j]));
        }
        const float s = nm::fp8_scale(warp_max(amax, 32));
        for (int64_t i = static_cast<int64_t>(lane) * V; i < n; i += 32 * V) {
            load(i, v);
#pragma unroll
            for (int j = 0; j < V; ++j) v[j] = nm::fp8_qdq(v[j], s);
            store(i, v);
        }
    }
}

// The act_quant form of a GEMM input (ActFp8): one warp per (row, 128-block), lane i the 4
// elements 4i .. 4i + 3 (one 8-byte load). s = fp8_scale(amax) as fp8_block_round's; the codes are
// fp8_qdq's (nm::e4m3_code), written as one word in kernel order (bytes k0 k2 k1 k3). kRound:
// also store the rounded values back into x (fp8_block_round's result). kRa: the word goes to its
// register-A position in the block (w4a8::ra_word) instead of word `lane`.
template <bool kRound, bool kRa>
__global__ void __launch_bounds__(kThreads)
quantize_gemm_input_kernel(uint16_t* __restrict__ x, int64_t n_units, int64_t nblk, uint8_t* __restrict__ q,
                           float* __restrict__ s) {
    pdl_begin();
    const int lane = static_cast<int>(threadIdx.x & 31);
    const int64_t unit = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
    if (unit >= n_units) return;   // whole warps
    const int64_t off = unit * 128 + lane * 4;   // rows are nblk·128 long, so unit·128 is the block start
    float v[4];
    load_bf16<4>(x + off, v);
    float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
    const float sc = nm::fp8_scale(warp_max(amax, 32));
    uint32_t c[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) c[j] = nm::e4m3_code(v[j], sc);
    const int64_t qoff = kRa ? unit * 128 + w4a8::ra_word(lane) * 4 : off;
    *reinterpret_cast<uint32_t*>(q + qoff) = c[0] | (c[2] << 8) | (c[1] << 16) | (c[3] << 24);
    if (lane == 0) s[unit] = sc;
    if constexpr (kRound) {
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = nm::fp8_qdq(v[j], sc);
        store_bf16<4>(x + off, v);
    }
    (void)nblk;
}

// ---------------------------------------------------------------------------- indexer q / k

// E elements per lane (1, 2 or 4); hd = 32·E, or hd < 32 with E = 1.
template <int E>
__global__ void __launch_bounds__(kThreads)
round_indexer_qk_kernel(uint16_t* __restrict__ x, int64_t rows, int hd, float scale) {
    pdl_begin();
    const int lane = static_cast<int>(threadIdx.x & 31);
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
    if (row >= rows) return;   // whole warps
    uint16_t* p = x + row * hd;
    const bool live = lane * E < hd;
    float v[E];
#pragma unroll
    for (int j = 0; j < E; ++j) v[j] = live ? rk::bf16_to_f32(p[lane * E + j]) : 0.0f;
    nm::indexer_qk_warp<E>(v, lane, hd, scale);
    if (live) {
#pragma unroll
        for (int j = 0; j < E; ++j) p[lane * E + j] = static_cast<uint16_t>(rk::f32_to_bf16(v[j]));
    }
}

// ---------------------------------------------------------------------------- element-wise

template <int VEC>
__global__ void __launch_bounds__(kThreads) round_bf16_kernel(float* __restrict__ x, int64_t n) {
    pdl_begin();
    const int64_t e = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
    if (e >= n) return;
    if (VEC == 4 && e + 4 <= n) {
        float4 q = *reinterpret_cast<const float4*>(x + e);
        q.x = nm::bf16_round(q.x);
        q.y = nm::bf16_round(q.y);
        q.z = nm::bf16_round(q.z);
        q.w = nm::bf16_round(q.w);
        *reinterpret_cast<float4*>(x + e) = q;
    } else {
        for (int64_t i = e; i < n && i < e + VEC; ++i) x[i] = nm::bf16_round(x[i]);
    }
}

__global__ void __launch_bounds__(kThreads)
scalar_op_kernel(ScalarOp op, const float* __restrict__ x, const float* __restrict__ s, int64_t n, float* __restrict__ y) {
    pdl_begin();
    const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
    if (i >= n) return;
    const float v = x[i];
    float r = 0.0f;
    switch (op) {
        case ScalarOp::bf16_round: r = nm::bf16_round(v); break;
        case ScalarOp::pow2_ceil: r = nm::pow2_ceil(v); break;
        case ScalarOp::fp8_scale: r = nm::fp8_scale(v); break;
        case ScalarOp::fp4_scale: r = nm::fp4_scale(v); break;
        case ScalarOp::e4m3_round: r = nm::e4m3_round(v); break;
        case ScalarOp::e2m1_round: r = nm::e2m1_round(v); break;
        case ScalarOp::fp8_qdq: r = nm::fp8_qdq(v, s[i]); break;
        case ScalarOp::fp4_qdq: r = nm::fp4_qdq(v, s[i]); break;
        case ScalarOp::fp8_qdq_bf16x2: {
            const int64_t e = i & ~int64_t(1);
            const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(x[e]));
            const uint32_t hi = e + 1 < n ? __bfloat16_as_ushort(__float2bfloat16_rn(x[e + 1])) : 0u;
            const uint32_t q = nm::fp8_qdq_bf16x2(lo | (hi << 16), s[i], 1.0f / s[i]);
            r = __uint_as_float(i & 1 ? q & 0xFFFF0000u : q << 16);
            break;
        }
    }
    y[i] = r;
}

unsigned grid_of(int64_t units, int64_t per_cta, const char* op) {
    return rk::grid_dim((units + per_cta - 1) / per_cta, 0x7fffffff, op);
}

}  // namespace

void fp8_block_round(uint16_t* x, int64_t rows, int64_t ld, int64_t width, int64_t block, CUstream_st* stream) {
    if (rows < 0) fail("fp8_block_round: rows=", rows, " is negative");
    if (block < 1) fail("fp8_block_round: block=", block, " must be ≥ 1");
    if (width < 1 || width > ld) fail("fp8_block_round: width=", width, " must be in [1, ld=", ld, "]");
    if (rows == 0) return;
    if (!x) fail("fp8_block_round: null x");
    const int64_t nblk = (width + block - 1) / block, units = rows * nblk;
    // The smallest vector that lets 32 lanes cover a block, narrowed until every block start is
    // aligned to it (x, the row stride and the block size all multiples of the vector).
    int V = 8;
    while (V > 1 && 32 * (V / 2) >= block) V /= 2;
    while (V > 1 && (block % V != 0 || ld % V != 0 || !aligned(x, 2 * static_cast<size_t>(V)))) V /= 2;
    const bool one = 32 * V >= block;
    const dim3 grid(grid_of(units, kWarpsPerCta, "fp8_block_round")), threads(kThreads);
#define MEGAMOE_FP8_CASE(VV)                                                                                  \
    if (V == VV) {                                                                                            \
        if (one) rk::launch(fp8_block_round_kernel<VV, true>, grid, threads, 0, stream, x, units, nblk, ld, width, block); \
        else rk::launch(fp8_block_round_kernel<VV, false>, grid, threads, 0, stream, x, units, nblk, ld, width, block);   \
        return;                                                                                               \
    }
    MEGAMOE_FP8_CASE(8)
    MEGAMOE_FP8_CASE(4)
    MEGAMOE_FP8_CASE(2)
    MEGAMOE_FP8_CASE(1)
#undef MEGAMOE_FP8_CASE
}

namespace {
template <bool kRound>
void quantize_launch(const char* name, uint16_t* x, int64_t rows, int64_t K, uint8_t* q, float* s, CUstream_st* stream,
                     bool ra_order) {
    if (rows < 0) fail(name, ": rows=", rows, " is negative");
    if (K < 128 || K % 128 != 0) fail(name, ": K=", K, " must be a positive multiple of 128");
    if (rows == 0) return;
    if (!x || !q || !s) fail(name, ": null pointer");
    if (!aligned(x, 8) || !aligned(q, 4) || !aligned(s, 4)) fail(name, ": x must be 8-byte aligned, q and s 4-byte");
    const int64_t nblk = K / 128, units = rows * nblk;
    const dim3 grid(grid_of(units, kWarpsPerCta, name)), threads(kThreads);
    if (ra_order) rk::launch(quantize_gemm_input_kernel<kRound, true>, grid, threads, 0, stream, x, units, nblk, q, s);
    else rk::launch(quantize_gemm_input_kernel<kRound, false>, grid, threads, 0, stream, x, units, nblk, q, s);
}
}  // namespace

void quantize_gemm_input(const uint16_t* x, int64_t rows, int64_t K, uint8_t* q, float* s, CUstream_st* stream,
                         bool ra_order) {
    quantize_launch<false>("quantize_gemm_input", const_cast<uint16_t*>(x), rows, K, q, s, stream, ra_order);
}

void fp8_block_round_q(uint16_t* x, int64_t rows, int64_t K, uint8_t* q, float* s, CUstream_st* stream,
                       bool ra_order) {
    quantize_launch<true>("fp8_block_round_q", x, rows, K, q, s, stream, ra_order);
}

void round_indexer_qk(uint16_t* x, int64_t rows, int64_t hd, CUstream_st* stream) {
    if (rows < 0) fail("round_indexer_qk: rows=", rows, " is negative");
    if (hd < 1 || hd > 128 || (hd & (hd - 1)) != 0) fail("round_indexer_qk: hd=", hd, " must be a power of two ≤ 128");
    if (rows == 0) return;
    if (!x) fail("round_indexer_qk: null x");
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));   // as ops::hadamard
    const dim3 grid(grid_of(rows, kWarpsPerCta, "round_indexer_qk")), threads(kThreads);
    const int h = static_cast<int>(hd);
    if (hd == 128) rk::launch(round_indexer_qk_kernel<4>, grid, threads, 0, stream, x, rows, h, scale);
    else if (hd == 64) rk::launch(round_indexer_qk_kernel<2>, grid, threads, 0, stream, x, rows, h, scale);
    else rk::launch(round_indexer_qk_kernel<1>, grid, threads, 0, stream, x, rows, h, scale);
}

void round_bf16_inplace(float* x, int64_t n, CUstream_st* stream) {
    if (n < 0) fail("round_bf16_inplace: n=", n, " is negative");
    if (n == 0) return;
    if (!x) fail("round_bf16_inplace: null x");
    if (aligned(x, 16))
        rk::launch(round_bf16_kernel<4>, dim3(grid_of((n + 3) / 4, kThreads, "round_bf16_inplace")), dim3(kThreads), 0,
                   stream, x, n);
    else
        rk::launch(round_bf16_kernel<1>, dim3(grid_of(n, kThreads, "round_bf16_inplace")), dim3(kThreads), 0, stream,
                   x, n);
}

void scalar_op_values(ScalarOp op, const float* x, const float* s, int64_t n, float* y, CUstream_st* stream) {
    if (n < 0) fail("scalar_op_values: n=", n, " is negative");
    if (n == 0) return;
    const bool needs_s = op == ScalarOp::fp8_qdq || op == ScalarOp::fp4_qdq || op == ScalarOp::fp8_qdq_bf16x2;
    if (!x || !y || (needs_s && !s)) fail("scalar_op_values: null x/s/y");
    rk::launch(scalar_op_kernel, dim3(grid_of(n, kThreads, "scalar_op_values")), dim3(kThreads), 0, stream, op, x, s,
               n, y);
}

}  // namespace megamoe::cuda
