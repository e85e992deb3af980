// rowwise.cu — embedding, RMS norms, per-head norm + RoPE, SwiGLU, row gathers and bf16 casts on
// the GPU (see rowwise.h for the contracts and the CPU twins).
//
// Launch shapes (all fixed by the shapes of the call, so eager and captured launches agree):
//   embed_streams, rms_norm_rows, gather_rows_bf16: one CTA per row, threads = the row's vector
//     count rounded up to a warp, at most 256. 16-byte vectors (8 bf16 or 4 f32) when the width and
//     the pointers allow it, scalars otherwise.
//   head_norm_rope: one warp per (token, head) row, 4 rows per CTA (heads are 64..512 wide: a
//     warp covers a 512-wide head with 4 float4 per lane, and the norm is a warp butterfly).
//     Numerics::official: the weighted norm sums the squares in f64 (the twin's ops::rms_norm:
//     the squares of bf16 values are exact in f64 and so is their sum unless the row spans more
//     than ~2^28 in squares, so the f32 mean has the twin's bits whatever the order); the
//     unweighted one (ops::head_rms_norm_bf16) adds the bf16-rounded squares in f32 in element
//     order (every lane the whole chain, reading the squares back from a per-warp shared slice),
//     so the sum is the twin's sequence of roundings: hd dependent adds, the price of its bits.
//   swiglu, f32_to_bf16_rows: element-wise over the flattened [rows · width] array (row
//     boundaries do not matter), one 4-wide vector per thread, the ragged tail by the last thread.
//
// Numerics: where the twin is plain f32 arithmetic (the normalization multiply, the weight, the
// rotation, the SwiGLU) the kernels do the same operations in the same order without FMA
// contraction, so the f32 value before the final bf16 rounding equals the twin's up to the
// differences listed here: the RMS sum of squares runs in f32 with a fixed tree (the twin sums in
// f64), and cosf / sinf / expf may differ from glibc by 1-2 ulp.
#include "cuda/rowwise.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "core/common.h"
#include "cuda/numerics.cuh"
#include "cuda/numerics.h"
#include "cuda/row_kernels.cuh"

namespace megamoe::cuda {
namespace {

using rk::aligned;
using rk::pdl_begin;

constexpr int kMaxRowThreads = 256;
constexpr int kHeadWarps = 4;       // head_norm_rope rows per CTA
constexpr int kFlatThreads = 256;   // element-wise kernels

int row_threads(int64_t vecs) {
    return static_cast<int>(std::clamp<int64_t>((vecs + 31) / 32 * 32, 32, kMaxRowThreads));
}

// ---------------------------------------------------------------------------- embed

// X[t, j, :] = f32(table[ids[t], :]) for j < hc. VEC = 8 (uint4 of bf16 in, 2 float4 out per
// stream) or 1.
template <int VEC>
__global__ void __launch_bounds__(kMaxRowThreads)
embed_streams_kernel(const uint16_t* __restrict__ table, const int32_t* __restrict__ ids, int64_t D, int hc,
                     float* __restrict__ X) {
    pdl_begin();
    const int64_t t = blockIdx.x;
    const uint16_t* row = table + static_cast<int64_t>(ids[t]) * D;
    float* out = X + t * hc * D;
    for (int64_t v = threadIdx.x; v < D / VEC; v += blockDim.x) {
        if constexpr (VEC == 8) {
            const uint4 q = __ldg(reinterpret_cast<const uint4*>(row) + v);
            const float4 a = make_float4(rk::bf16_lo(q.x), rk::bf16_hi(q.x), rk::bf16_lo(q.y), rk::bf16_hi(q.y));
            const float4 b = make_float4(rk::bf16_lo(q.z), rk::bf16_hi(q.z), rk::bf16_lo(q.w), rk::bf16_hi(q.w));
            for (int j = 0; j < hc; ++j) {
                float4* o = reinterpret_cast<float4*>(out + j * D) + 2 * v;
                o[0] = a;
                o[1] = b;
            }
        } else {
            const float f = rk::bf16_to_f32(row[v]);
            for (int j = 0; j < hc; ++j) out[j * D + v] = f;
        }
    }
}

// ---------------------------------------------------------------------------- rms norm

// y[r] = bf16(w · (x[r] · inv)), inv = 1 / sqrt(Σx² / D + eps). VEC = 4 (float4 in, 4 bf16 out) or 1.
// official: x is rounded to bf16 as loaded; yq (fused: VEC 4, D % 128 == 0, every lane of a warp
// in the loop) receives y FP8-rounded in 128-blocks, the warp's 32 vectors being one block. yq may
// alias y (then only the rounded values remain).
template <int VEC>
__global__ void __launch_bounds__(kMaxRowThreads)
rms_norm_kernel(const float* __restrict__ x, int64_t D, const uint16_t* __restrict__ w, float eps,
                uint16_t* y, bool official, uint16_t* yq, uint8_t* yq8, float* ys8) {
    pdl_begin();
    __shared__ float red[32];
    const int64_t r = blockIdx.x;
    const float* xr = x + r * D;
    uint16_t* yr = y + r * D;
    const int64_t nv = D / VEC;
    auto load = [&](int64_t v, float (&q)[VEC]) {
        if constexpr (VEC == 4) {
            const float4 f = reinterpret_cast<const float4*>(xr)[v];
            q[0] = f.x, q[1] = f.y, q[2] = f.z, q[3] = f.w;
        } else {
            q[0] = xr[v];
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
    // Second pass over the row: the same thread re-reads its own elements (L1 hits).
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

// ---------------------------------------------------------------------------- head norm + rope

struct HeadArgs {
    const float* x;           // [rows, hd]
    int64_t rows, heads, hd;
    bool normalize;
    const uint16_t* w;        // [hd] or null
    float eps;
    const int32_t* pos;       // [T]
    const float* inv_freq;    // [rope_dim / 2]
    int64_t rope_dim;
    uint16_t* y;              // [rows, hd]
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

// One warp per row (t, h). VEC = 4: hd % 4 == 0 and hd − rope_dim even (pairs never straddle a
// vector); VEC = 1: any hd, the plain dims and the rope pairs in two loops.
template <int VEC>
__global__ void __launch_bounds__(kHeadWarps * 32) head_norm_rope_kernel(HeadArgs a) {
    pdl_begin();
    __shared__ __align__(16) float sq_s[kHeadWarps][128];   // official q norm: a chunk of squares per warp
    const int lane = static_cast<int>(threadIdx.x & 31);
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kHeadWarps + (threadIdx.x >> 5);
    if (row >= a.rows) return;   // whole warps; the kernel uses no block-wide barrier
    const int64_t hd = a.hd;
    const float* xr = a.x + row * hd;
    uint16_t* yr = a.y + row * hd;

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
        float* sq = sq_s[threadIdx.x >> 5];
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
            *reinterpret_cast<uint2*>(yr + e) = make_uint2(rk::pack_bf16x2(v[0], v[1]), rk::pack_bf16x2(v[2], v[3]));
        }
    } else {
        for (int64_t e = lane; e < off; e += 32) yr[e] = static_cast<uint16_t>(rk::f32_to_bf16(scaled(xr[e], e)));
        for (int64_t i = lane; i < a.rope_dim / 2; i += 32) {
            const int64_t e0 = off + 2 * i;
            float v0 = scaled(xr[e0], e0), v1 = scaled(xr[e0 + 1], e0 + 1);
            rotate(v0, v1, fpos, a.inv_freq[i]);
            yr[e0] = static_cast<uint16_t>(rk::f32_to_bf16(v0));
            yr[e0 + 1] = static_cast<uint16_t>(rk::f32_to_bf16(v1));
        }
    }
}

// ---------------------------------------------------------------------------- element-wise

// silu(min(g, L)) · clamp(u, −L, L), in ops::expert_ffn's order: gv / (1 + exp(−gv)) · uv.
// std::min / std::clamp semantics (a NaN input stays NaN).
__device__ __forceinline__ float swiglu1(float g, float u, float L) {
    const float gv = L < g ? L : g;
    const float uv = u < -L ? -L : (L < u ? L : u);
    return __fmul_rn(__fdiv_rn(gv, __fadd_rn(1.0f, expf(-gv))), uv);
}

// Thread i handles elements [4i, 4i + 4) of the flattened array (VEC = 4: float4 loads when the
// whole vector is in range, scalars for the tail) or element i (VEC = 1).
template <int VEC>
__global__ void __launch_bounds__(kFlatThreads)
swiglu_kernel(const float* __restrict__ g, const float* __restrict__ u, int64_t n, float L, uint16_t* __restrict__ h,
              bool official) {
    pdl_begin();
    const int64_t e = (static_cast<int64_t>(blockIdx.x) * kFlatThreads + threadIdx.x) * VEC;
    if (e >= n) return;
    if (official) {   // the official w1 / w3 outputs are bf16: round g and u as loaded
        for (int64_t i = e; i < n && i < e + VEC; ++i)
            h[i] = static_cast<uint16_t>(rk::f32_to_bf16(swiglu1(nm::bf16_round(g[i]), nm::bf16_round(u[i]), L)));
        return;
    }
    if (VEC == 4 && e + 4 <= n) {
        const float4 a = *reinterpret_cast<const float4*>(g + e);
        const float4 b = *reinterpret_cast<const float4*>(u + e);
        *reinterpret_cast<uint2*>(h + e) = make_uint2(rk::pack_bf16x2(swiglu1(a.x, b.x, L), swiglu1(a.y, b.y, L)),
                                                      rk::pack_bf16x2(swiglu1(a.z, b.z, L), swiglu1(a.w, b.w, L)));
    } else {
        for (int64_t i = e; i < n && i < e + VEC; ++i) h[i] = static_cast<uint16_t>(rk::f32_to_bf16(swiglu1(g[i], u[i], L)));
    }
}

template <int VEC>
__global__ void __launch_bounds__(kFlatThreads)
f32_to_bf16_kernel(const float* __restrict__ src, int64_t n, uint16_t* __restrict__ dst) {
    pdl_begin();
    const int64_t e = (static_cast<int64_t>(blockIdx.x) * kFlatThreads + threadIdx.x) * VEC;
    if (e >= n) return;
    if (VEC == 4 && e + 4 <= n) {
        const float4 a = *reinterpret_cast<const float4*>(src + e);
        *reinterpret_cast<uint2*>(dst + e) = make_uint2(rk::pack_bf16x2(a.x, a.y), rk::pack_bf16x2(a.z, a.w));
    } else {
        for (int64_t i = e; i < n && i < e + VEC; ++i) dst[i] = static_cast<uint16_t>(rk::f32_to_bf16(src[i]));
    }
}

// X[t, j, :] = a[t, j, :] + b[t, :]: thread i takes elements [VEC·i, VEC·i + VEC) of the flattened
// [T, hc, D] (VEC = 4 when D % 4 == 0 and the pointers are 16-byte aligned, so a vector never
// crosses a row).
template <int VEC>
__global__ void __launch_bounds__(kFlatThreads)
add_broadcast_kernel(const float* __restrict__ a, const float* __restrict__ b, int64_t n, int64_t D, int64_t hc,
                     float* X, bool official) {
    pdl_begin();
    const int64_t e = (static_cast<int64_t>(blockIdx.x) * kFlatThreads + threadIdx.x) * VEC;
    if (e >= n) return;
    const int64_t row = e / D, d = e - row * D, t = row / hc;
    if (official) {   // bf16 inputs (the official e_proj / h_proj outputs) and a bf16 sum
        for (int64_t i = e, j = t * D + d; i < e + VEC; ++i, ++j)
            X[i] = nm::bf16_round(__fadd_rn(nm::bf16_round(a[i]), nm::bf16_round(b[j])));
        return;
    }
    if constexpr (VEC == 4) {
        const float4 x = *reinterpret_cast<const float4*>(a + e);
        const float4 y = *reinterpret_cast<const float4*>(b + t * D + d);
        *reinterpret_cast<float4*>(X + e) = make_float4(__fadd_rn(x.x, y.x), __fadd_rn(x.y, y.y), __fadd_rn(x.z, y.z),
                                                        __fadd_rn(x.w, y.w));
    } else {
        X[e] = __fadd_rn(a[e], b[t * D + d]);
    }
}

// ---------------------------------------------------------------------------- gather

// dst[i] = src[idx[i]], V = uint4 (8 bf16) or uint16_t.
template <typename V>
__global__ void __launch_bounds__(kMaxRowThreads)
gather_rows_kernel(const V* __restrict__ src, const int32_t* __restrict__ idx, int64_t vecs, V* __restrict__ dst) {
    pdl_begin();
    const int64_t i = blockIdx.x;
    const V* in = src + static_cast<int64_t>(idx[i]) * vecs;
    V* out = dst + i * vecs;
    for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) out[v] = in[v];
}

// ---------------------------------------------------------------------------- host helpers

void check_rows(const char* op, int64_t rows, int64_t width, const char* rows_name, const char* width_name) {
    if (rows < 0) fail(op, ": ", rows_name, "=", rows, " is negative");
    if (width < 1) fail(op, ": ", width_name, "=", width, " must be ≥ 1");
}

unsigned row_grid(int64_t rows, const char* op) { return rk::grid_dim(rows, 0x7fffffff, op); }

unsigned flat_grid(int64_t n, int vec, const char* op) {
    const int64_t threads = (n + vec - 1) / vec;
    return rk::grid_dim((threads + kFlatThreads - 1) / kFlatThreads, 0x7fffffff, op);
}

}  // namespace

void embed_streams(const uint16_t* table, const int32_t* ids, int64_t T, int64_t D, int64_t hc, float* X,
                   CUstream_st* stream) {
    check_rows("embed_streams", T, D, "T", "D");
    if (hc < 1) fail("embed_streams: hc=", hc, " must be ≥ 1");
    if (T == 0) return;
    if (!table || !ids || !X) fail("embed_streams: null table/ids/X");
    const bool vec = D % 8 == 0 && aligned(table, 16) && aligned(X, 16);
    const int64_t vecs = vec ? D / 8 : D;
    const dim3 grid(row_grid(T, "embed_streams")), block(row_threads(vecs));
    if (vec) rk::launch(embed_streams_kernel<8>, grid, block, 0, stream, table, ids, D, static_cast<int>(hc), X);
    else rk::launch(embed_streams_kernel<1>, grid, block, 0, stream, table, ids, D, static_cast<int>(hc), X);
}

void rms_norm_rows(const float* x, int64_t rows, int64_t D, const uint16_t* w, float eps, uint16_t* y,
                   CUstream_st* stream, Numerics nm, uint16_t* yq, uint8_t* yq8, float* ys8) {
    check_rows("rms_norm_rows", rows, D, "rows", "D");
    if ((yq8 == nullptr) != (ys8 == nullptr) || (yq8 != nullptr && yq == nullptr))
        fail("rms_norm_rows: codes need both yq8 and ys8, and yq");
    if (rows == 0) return;
    if (!x || !y) fail("rms_norm_rows: null x/y");
    const bool official = nm == Numerics::official;
    const bool vec = D % 4 == 0 && aligned(x, 16) && aligned(y, 8) && (w == nullptr || aligned(w, 8));
    const int64_t vecs = vec ? D / 4 : D;
    // The rounded copy is fused when a warp's 32 vectors are one 128-block of the row.
    const bool fuse_q = yq != nullptr && vec && D % 128 == 0 && aligned(yq, 8);
    const dim3 grid(row_grid(rows, "rms_norm_rows")), block(row_threads(vecs));
    const bool fuse_q8 = fuse_q && yq8 != nullptr && aligned(yq8, 4);
    if (vec)
        rk::launch(rms_norm_kernel<4>, grid, block, 0, stream, x, D, w, eps, y, official, fuse_q ? yq : nullptr,
                   fuse_q8 ? yq8 : nullptr, fuse_q8 ? ys8 : nullptr);
    else
        rk::launch(rms_norm_kernel<1>, grid, block, 0, stream, x, D, w, eps, y, official, static_cast<uint16_t*>(nullptr),
                   static_cast<uint8_t*>(nullptr), static_cast<float*>(nullptr));
    if (yq != nullptr && !fuse_q) {
        if (yq != y)
            CUDA_CHECK(cudaMemcpyAsync(yq, y, static_cast<size_t>(rows * D) * 2, cudaMemcpyDeviceToDevice, stream));
        fp8_block_round(yq, rows, D, D, 128, stream);
    }
    if (yq8 != nullptr && !fuse_q8) quantize_gemm_input(yq, rows, D, yq8, ys8, stream);
}

void head_norm_rope(const float* x, int64_t T, int64_t heads, int64_t hd, bool normalize, const uint16_t* w,
                    float eps, const int32_t* pos, const RopeView& rope, uint16_t* y, CUstream_st* stream,
                    Numerics nm) {
    check_rows("head_norm_rope", T, hd, "T", "hd");
    if (heads < 1) fail("head_norm_rope: heads=", heads, " must be ≥ 1");
    const int64_t r = rope.rope_dim;
    if (r < 0 || r % 2 != 0 || r > hd) fail("head_norm_rope: rope_dim=", r, " must be even and in [0, hd=", hd, "]");
    if (!normalize && w != nullptr) fail("head_norm_rope: a norm weight without normalize");
    if (T == 0) return;
    if (!x || !y) fail("head_norm_rope: null x/y");
    if (r > 0 && (!pos || !rope.inv_freq)) fail("head_norm_rope: rope_dim=", r, " with null pos/inv_freq");
    const int64_t rows = T * heads;
    const HeadArgs a{x, rows, heads, hd, normalize, w, eps, pos, rope.inv_freq, r, y, nm == Numerics::official};
    const bool vec = hd % 4 == 0 && (hd - r) % 2 == 0 && aligned(x, 16) && aligned(y, 8) &&
                     (w == nullptr || aligned(w, 8));
    const dim3 grid(row_grid((rows + kHeadWarps - 1) / kHeadWarps, "head_norm_rope")), block(kHeadWarps * 32);
    if (vec) rk::launch(head_norm_rope_kernel<4>, grid, block, 0, stream, a);
    else rk::launch(head_norm_rope_kernel<1>, grid, block, 0, stream, a);
}

void swiglu(const float* g, const float* u, int64_t T, int64_t I, float limit, uint16_t* h, CUstream_st* stream,
            Numerics nm) {
    check_rows("swiglu", T, I, "T", "I");
    if (T == 0) return;
    if (!g || !u || !h) fail("swiglu: null g/u/h");
    const int64_t n = T * I;
    const bool vec = aligned(g, 16) && aligned(u, 16) && aligned(h, 8);
    const bool official = nm == Numerics::official;
    if (vec) rk::launch(swiglu_kernel<4>, dim3(flat_grid(n, 4, "swiglu")), dim3(kFlatThreads), 0, stream, g, u, n, limit, h, official);
    else rk::launch(swiglu_kernel<1>, dim3(flat_grid(n, 1, "swiglu")), dim3(kFlatThreads), 0, stream, g, u, n, limit, h, official);
}

void add_rows_broadcast(const float* a, const float* b, int64_t T, int64_t hc, int64_t D, float* X,
                        CUstream_st* stream, Numerics nm) {
    check_rows("add_rows_broadcast", T, D, "T", "D");
    if (hc < 1) fail("add_rows_broadcast: hc=", hc, " must be ≥ 1");
    if (T == 0) return;
    if (!a || !b || !X) fail("add_rows_broadcast: null a/b/X");
    if (X < b + T * D && b < X + T * hc * D) fail("add_rows_broadcast: X overlaps b");
    const int64_t n = T * hc * D;
    const bool vec = D % 4 == 0 && aligned(a, 16) && aligned(b, 16) && aligned(X, 16);
    if (vec)
        rk::launch(add_broadcast_kernel<4>, dim3(flat_grid(n, 4, "add_rows_broadcast")), dim3(kFlatThreads), 0, stream,
                   a, b, n, D, hc, X, nm == Numerics::official);
    else
        rk::launch(add_broadcast_kernel<1>, dim3(flat_grid(n, 1, "add_rows_broadcast")), dim3(kFlatThreads), 0, stream,
                   a, b, n, D, hc, X, nm == Numerics::official);
}

void gather_rows_bf16(const uint16_t* src, const int32_t* idx, int64_t n, int64_t width, uint16_t* dst,
                      CUstream_st* stream) {
    check_rows("gather_rows_bf16", n, width, "n", "width");
    if (n == 0) return;
    if (!src || !idx || !dst) fail("gather_rows_bf16: null src/idx/dst");
    const bool vec = width % 8 == 0 && aligned(src, 16) && aligned(dst, 16);
    const int64_t vecs = vec ? width / 8 : width;
    const dim3 grid(row_grid(n, "gather_rows_bf16")), block(row_threads(vecs));
    if (vec)
        rk::launch(gather_rows_kernel<uint4>, grid, block, 0, stream, reinterpret_cast<const uint4*>(src), idx, vecs,
                   reinterpret_cast<uint4*>(dst));
    else rk::launch(gather_rows_kernel<uint16_t>, grid, block, 0, stream, src, idx, vecs, dst);
}

void gather_rows_f32(const float* src, const int32_t* idx, int64_t n, int64_t width, float* dst, CUstream_st* stream) {
    check_rows("gather_rows_f32", n, width, "n", "width");
    if (n == 0) return;
    if (!src || !idx || !dst) fail("gather_rows_f32: null src/idx/dst");
    const bool vec = width % 4 == 0 && aligned(src, 16) && aligned(dst, 16);
    const int64_t vecs = vec ? width / 4 : width;
    const dim3 grid(row_grid(n, "gather_rows_f32")), block(row_threads(vecs));
    if (vec)
        rk::launch(gather_rows_kernel<uint4>, grid, block, 0, stream, reinterpret_cast<const uint4*>(src), idx, vecs,
                   reinterpret_cast<uint4*>(dst));
    else rk::launch(gather_rows_kernel<float>, grid, block, 0, stream, src, idx, vecs, dst);
}

void f32_to_bf16_rows(const float* src, int64_t n, int64_t width, uint16_t* dst, CUstream_st* stream) {
    check_rows("f32_to_bf16_rows", n, width, "n", "width");
    if (n == 0) return;
    if (!src || !dst) fail("f32_to_bf16_rows: null src/dst");
    const int64_t count = n * width;
    const bool vec = aligned(src, 16) && aligned(dst, 8);
    if (vec)
        rk::launch(f32_to_bf16_kernel<4>, dim3(flat_grid(count, 4, "f32_to_bf16_rows")), dim3(kFlatThreads), 0, stream,
                   src, count, dst);
    else
        rk::launch(f32_to_bf16_kernel<1>, dim3(flat_grid(count, 1, "f32_to_bf16_rows")), dim3(kFlatThreads), 0, stream,
                   src, count, dst);
}

}  // namespace megamoe::cuda
