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
#include "cuda/head_norm_rope.cuh"
#include "cuda/numerics.cuh"
#include "cuda/row_norm.cuh"
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

// One CTA per row; the row's body is rnorm::rms_norm_row (row_norm.cuh).
template <int VEC>
__global__ void __launch_bounds__(kMaxRowThreads)
rms_norm_kernel(const float* __restrict__ x, int64_t D, const uint16_t* __restrict__ w, float eps,
                uint16_t* y, bool official, uint16_t* yq, uint8_t* yq8, float* ys8) {
    pdl_begin();
    __shared__ float red[32];
    rnorm::rms_norm_row<VEC, false>(x, blockIdx.x, D, w, eps, y, official, yq, yq8, ys8, red);
}

// ---------------------------------------------------------------------------- head norm + rope

using hnr::HeadArgs;

// One warp per row (t, h); the row's body is hnr::norm_rope_row (head_norm_rope.cuh).
template <int VEC>
__global__ void __launch_bounds__(kHeadWarps * 32) head_norm_rope_kernel(HeadArgs a) {
    pdl_begin();
    __shared__ __align__(16) float sq_s[kHeadWarps][128];   // official q norm: a chunk of squares per warp
    const int lane = static_cast<int>(threadIdx.x & 31);
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kHeadWarps + (threadIdx.x >> 5);
    if (row >= a.rows) return;   // whole warps; the kernel uses no block-wide barrier
    uint16_t* yr = a.y + row * a.hd;
    hnr::norm_rope_row<VEC>(
        a, row, lane, sq_s[threadIdx.x >> 5], [&](int64_t e, uint2 v) { *reinterpret_cast<uint2*>(yr + e) = v; },
        [&](int64_t e, uint16_t v) { yr[e] = v; });
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
