// gemm.cu — the tiled linear (any M) and the grouped routed-expert GEMMs on Hopper (sm_90a).
//
// Kernel (tiled_kernel)
// ---------------------
// * A CTA of WR·WT warps computes a tile of BR weight rows × BT tokens, warps arranged WR (rows) ×
//   WT (tokens); a warp owns 16·MT rows × 8·NT tokens: MT·NT·4 f32 accumulators. The MMA is
//   mma.sync m16n8k16 bf16 → f32 with the weights as A (rows) and the tokens as B ("swap AB", as in
//   linear.cu), so the same in-register decoders serve: each lane decodes the 16 weight bytes of
//   rows g and g+8 at byte 16·tig of a 64-byte row step (kernel-order words, see device.cuh) and
//   reuses every decoded A fragment for NT token tiles; every x fragment (one LDS.128 = 8 bf16)
//   feeds 2·MT MMAs.
// * K is walked in 64-byte weight-row steps (bf16: 32, fp8: 64, fp4: 128 columns). Each step's
//   operands — BR rows × 64 B of packed weights (checkpoint bytes, no dequantized copy), their
//   scale bytes, and BT tokens × the step's x columns — are copied by all threads with 16-byte
//   cp.async into one slot of a kTStages-deep shared-memory ring (one __syncthreads per step).
//   x rows are padded and (fp4) chunk-swizzled so the quarter-warp LDS.128 reads are conflict-free
//   (same layout argument as linear.cu's x stage).
// * Work: grid.x = row blocks, grid.y = work items (a group and BT of its token rows). Groups are
//   either uniform (a grouped linear like wo_a: group g = rows [g·N, (g+1)·N) of one weight, x
//   columns [g·K, (g+1)·K)) or listed (experts: a device table of weight pointers per expert and
//   a device work list built from the routing offsets by build_items, so no host sync is needed;
//   grid.y is the list's upper bound and CTAs past its device-side length exit at once). Empty
//   experts have no items.
// * Epilogues straight from the accumulators: f32 or bf16 y; or, for a SwiGLU pair (w1, w3 of an
//   expert), the warp's first MT/2 row tiles read w1 rows and the last MT/2 the same w3 rows, so a
//   lane holds gate and up of the same (row, token) and writes
//   h = silu(min(g, L)) · clamp(u, -L, L) · routing weight, rounded to bf16.
// Exactness is as in linear.cu: the tensor core sees exact weights (up to a power of two, undone
// in the epilogue), so y differs from the CPU twin only in fp32 summation order (and the final
// bf16 rounding where the output is bf16).
#include "cuda/gemm.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>

#include "common.h"
#include "cuda/device.cuh"
#include "formats.h"

namespace megamoe::cuda {

namespace {

using namespace dev;


enum Epi : int { kEpiF32 = 0, kEpiBf16 = 1, kEpiSwiglu = 2 };

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One weight (or a SwiGLU pair: [0] gate, [1] up) as the kernel reads it.
struct GemmGroup {
    const uint8_t* w[2];
    const uint8_t* s[2];
    float out_scale[2];
    int   bias[2];
};

struct TiledParams {
    GemmGroup        base;        // uniform groups: the one weight
    const GemmGroup* table;       // listed groups: [G] (device), else nullptr
    const int4*      items;       // listed: {group, first x row, rows, 0} per work item (device)
    const int32_t*   n_items;     // listed: number of valid items (device)
    int M;                        // uniform: x rows per group (all groups take all rows)
    int tiles;                    // uniform: token tiles per group
    const uint16_t* x;            // bf16 rows of x_ld; group g of a uniform call reads columns g·K ..
    int64_t x_ld;
    void*   y;                    // f32 / bf16 rows of y_ld; uniform group g writes columns g·N ..
    int64_t y_ld;
    const float* row_scale;       // SwiGLU: routing weight per x row
    int N, K, steps;              // rows per group (per matrix), columns, 64-byte row steps
    int64_t w_row_bytes, s_row_bytes;
    float limit;                  // SwiGLU clamp
};

template <LinearFormat F> struct TileX;   // x row stride in shared memory per step (conflict-free LDS.128)
template <> struct TileX<LinearFormat::bf16> { static constexpr int kRs = 64; };
template <> struct TileX<LinearFormat::fp8_block> { static constexpr int kRs = 144; };
template <> struct TileX<LinearFormat::mxfp4> { static constexpr int kRs = 288; };
template <> struct TileX<LinearFormat::nvfp4> { static constexpr int kRs = 288; };

// Scale bytes per weight row per step in shared memory (fp8: the aligned word holding the byte).
template <LinearFormat F> __host__ __device__ constexpr int scale_slot_bytes() {
    return F == LinearFormat::nvfp4 ? 8 : (F == LinearFormat::bf16 ? 0 : 4);
}

// ST: ring depth (ST - 1 steps in flight while one is multiplied).
template <LinearFormat F, int MT, int NT, int WR, int WT, int ST> struct TileLayout {
    static constexpr int kWT = WT;
    static constexpr int kThreads = WR * WT * 32;
    static constexpr int kBR = WR * MT * 16;
    static constexpr int kBT = kWT * NT * 8;
    static constexpr int kW = 0;
    static constexpr int kS = kBR * kStepBytes;
    static constexpr int kX = kS + kBR * scale_slot_bytes<F>();
    static constexpr int kStage = (kX + kBT * TileX<F>::kRs + 127) / 128 * 128;
    static constexpr int kSmem = ST * kStage;
};

__device__ __forceinline__ void cp_async8(uint32_t dst, const void* src, bool pred) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(dst), "l"(src), "r"(pred ? 8 : 0) : "memory");
}

__device__ __forceinline__ float silu_swiglu(float g, float u, float limit) {
    g = fminf(g, limit);
    u = fminf(fmaxf(u, -limit), limit);
    return g / (1.0f + expf(-g)) * u;
}

template <LinearFormat F, int MT, int NT, int WR, int WT, int ST, int EPI>
static __global__ void __launch_bounds__(WR * WT * 32, 1) tiled_kernel(const TiledParams p) {
    using L = TileLayout<F, MT, NT, WR, WT, ST>;
    constexpr int kThreads = L::kThreads;
    constexpr int kTStages = ST;
    constexpr int BR = L::kBR, BT = L::kBT;
    constexpr int kE = Traits<F>::kElems, kStepK = 4 * kE, kLds = kE / 8;
    constexpr int XRS = TileX<F>::kRs;
    constexpr int SB = scale_slot_bytes<F>();
    constexpr int kXChunks = BT * kStepK / 8;       // 16-byte x chunks per stage
    constexpr int kWChunks = BR * 4 / kThreads;     // 16-byte weight chunks per thread per stage
    constexpr bool kPair = EPI == kEpiSwiglu;
    static_assert(!kPair || MT % 2 == 0, "a SwiGLU tile pairs MT/2 gate with MT/2 up row tiles");
    static_assert(BR * 4 % kThreads == 0, "weight chunks must split evenly over the threads");
    static_assert(BR <= kThreads, "one thread copies each row's scales");
    extern __shared__ __align__(128) uint8_t smem[];

    // ---- the work item
    int gi, row0, rows;
    GemmGroup G;
    if (p.items) {
        asm volatile("griddepcontrol.wait;" ::: "memory");   // the list comes from the previous kernel
        if (static_cast<int>(blockIdx.y) >= *p.n_items) return;
        const int4 it = p.items[blockIdx.y];
        gi = it.x;
        row0 = it.y;
        rows = it.z;
        G = p.table[gi];
    } else {
        gi = static_cast<int>(blockIdx.y) / p.tiles;
        row0 = (static_cast<int>(blockIdx.y) - gi * p.tiles) * BT;
        rows = min(BT, p.M - row0);
        G = p.base;
        asm volatile("griddepcontrol.wait;" ::: "memory");
    }
    const int64_t grow0 = p.items ? 0 : static_cast<int64_t>(gi) * p.N;   // uniform: the group's first row in W
    const uint16_t* xg = p.x + (p.items ? 0 : static_cast<int64_t>(gi) * p.K);

    const int tid = static_cast<int>(threadIdx.x);
    const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
    const int wr_i = warp % WR, wt_i = warp / WR;

    // Tile row r (0..BR) → matrix (0, or 1 for the up half of a SwiGLU pair) and its row in it.
    auto phys_row = [&](int r, int& m, int& row) {
        if constexpr (kPair) {
            const int wblk = r / (MT * 16), mt = (r / 16) % MT;
            m = mt >= MT / 2 ? 1 : 0;
            row = static_cast<int>(blockIdx.x) * (BR / 2) + wblk * (MT / 2) * 16 + (mt % (MT / 2)) * 16 + (r & 15);
        } else {
            m = 0;
            row = static_cast<int>(blockIdx.x) * BR + r;
        }
    };

    // ---- copy sources (step 0); a step adds 64 B to weights and SB·(steps) to scales
    const uint8_t* wsrc[kWChunks];
    bool wok[kWChunks];
#pragma unroll
    for (int i = 0; i < kWChunks; ++i) {
        const int c = tid + i * kThreads;
        int m, row;
        phys_row(c >> 2, m, row);
        wok[i] = row < p.N;
        wsrc[i] = wok[i] ? G.w[m] + (grow0 + row) * p.w_row_bytes + (c & 3) * 16 : G.w[0];
    }
    const uint8_t* ssrc = G.s[0];
    bool sok = false;
    if constexpr (SB > 0) {
        if (tid < BR) {
            int m, row;
            phys_row(tid, m, row);
            sok = row < p.N;
            if (sok) {
                if constexpr (F == LinearFormat::fp8_block) ssrc = G.s[m] + ((grow0 + row) / kFp8Block) * p.s_row_bytes;
                else ssrc = G.s[m] + (grow0 + row) * p.s_row_bytes;
            }
        }
    }
    const uint32_t smem_s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));

    auto issue = [&](int s, int slot) {
        const uint32_t base = smem_s + static_cast<uint32_t>(slot * L::kStage);
#pragma unroll
        for (int i = 0; i < kWChunks; ++i) {
            const int c = tid + i * kThreads;
            cp_async16(base + L::kW + c * 16, wsrc[i] + (wok[i] ? s * kStepBytes : 0), wok[i]);
        }
        if constexpr (SB > 0) {
            if (tid < BR) {
                if constexpr (F == LinearFormat::nvfp4) {
                    cp_async8(base + L::kS + tid * 8, ssrc + (sok ? s * 8 : 0), sok);
                } else if constexpr (F == LinearFormat::mxfp4) {
                    cp_async4(base + L::kS + tid * 4, ssrc + (sok ? s * 4 : 0), sok);
                } else {
                    const uintptr_t a = (reinterpret_cast<uintptr_t>(ssrc) + (sok ? (s * kStepK) / kFp8Block : 0)) & ~uintptr_t(3);
                    cp_async4(base + L::kS + tid * 4, reinterpret_cast<const void*>(a), sok);
                }
            }
        }
        for (int c = tid; c < kXChunks; c += kThreads) {
            const int t = c / (kStepK / 8), q = c - t * (kStepK / 8);
            const int k = s * kStepK + q * 8;
            const bool ok = t < rows && k < p.K;
            const uint16_t* src = ok ? xg + static_cast<int64_t>(row0 + t) * p.x_ld + k : p.x;
            cp_async16(base + L::kX + t * XRS + x_chunk_pos<F>(q) * 16, src, ok);
        }
    };

    // This lane's rows in the tile, and (fp8) the low address bits of their scale-row start.
    int lrow[MT][2], mat[MT];
    uint32_t s_lo[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        mat[mt] = kPair && mt >= MT / 2 ? 1 : 0;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            lrow[mt][h] = wr_i * MT * 16 + mt * 16 + h * 8 + g;
            s_lo[mt][h] = 0;
            if constexpr (F == LinearFormat::fp8_block) {
                int m, row;
                phys_row(lrow[mt][h], m, row);
                s_lo[mt][h] = static_cast<uint32_t>(
                    (reinterpret_cast<uintptr_t>(G.s[m]) + ((grow0 + row) / kFp8Block) * p.s_row_bytes) & 3);
            }
        }
    }

#pragma unroll
    for (int i = 0; i < kTStages - 1; ++i) {
        if (i < p.steps) issue(i, i);
        cp_async_commit();
    }

    float acc[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;

    const int tb = wt_i * NT * 8;
    for (int s = 0; s < p.steps; ++s) {
        cp_async_wait<kTStages - 2>();
        __syncthreads();   // step s has landed for every thread; slot (s-1) % kTStages is free
        {
            const int nx = s + kTStages - 1;
            if (nx < p.steps) issue(nx, nx % kTStages);
            cp_async_commit();
        }
        const uint8_t* st = smem + (s % kTStages) * L::kStage;

        uint4 wv[MT][2];
        uint32_t mlo[MT][2], mhi[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = lrow[mt][h];
                wv[mt][h] = *reinterpret_cast<const uint4*>(st + L::kW + r * kStepBytes + tig * 16);
                if constexpr (F == LinearFormat::nvfp4) {
                    const uint32_t word = *reinterpret_cast<const uint32_t*>(st + L::kS + r * 8 + (tig >> 1) * 4);
                    nvfp4_mults(word >> (16 * (tig & 1)), mlo[mt][h], mhi[mt][h]);
                } else if constexpr (F == LinearFormat::mxfp4) {
                    const uint32_t word = *reinterpret_cast<const uint32_t*>(st + L::kS + r * 4);
                    mlo[mt][h] = mhi[mt][h] = pow2_bf16x2((word >> (8 * tig)) & 0xFFu, G.bias[mat[mt]]);
                } else if constexpr (F == LinearFormat::fp8_block) {
                    const uint32_t word = *reinterpret_cast<const uint32_t*>(st + L::kS + r * 4);
                    const uint32_t off = (s_lo[mt][h] + static_cast<uint32_t>((s * kStepK) / kFp8Block)) & 3u;
                    mlo[mt][h] = mhi[mt][h] = pow2_bf16x2((word >> (8 * off)) & 0xFFu, G.bias[mat[mt]]);
                } else {
                    mlo[mt][h] = mhi[mt][h] = 0;
                }
            }
        }

#pragma unroll
        for (int l = 0; l < kLds; ++l) {
            uint4 b[NT];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
                b[nt] = *reinterpret_cast<const uint4*>(st + L::kX + (tb + nt * 8 + g) * XRS +
                                                        x_chunk_pos<F>(tig * kLds + l) * 16);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                uint32_t a[2][4];
                const uint4& w0 = wv[mt][0];
                const uint4& w1 = wv[mt][1];
                if constexpr (F == LinearFormat::bf16) {
                    a[0][0] = w0.x; a[0][1] = w1.x; a[0][2] = w0.y; a[0][3] = w1.y;
                    a[1][0] = w0.z; a[1][1] = w1.z; a[1][2] = w0.w; a[1][3] = w1.w;
                } else if constexpr (F == LinearFormat::fp8_block) {
                    const uint32_t q00 = l == 0 ? w0.x : w0.z, q01 = l == 0 ? w0.y : w0.w;
                    const uint32_t q10 = l == 0 ? w1.x : w1.z, q11 = l == 0 ? w1.y : w1.w;
                    uint32_t lo, hi;
                    fp8x4_bits(q00, lo, hi);
                    a[0][0] = bf16x2_mul(lo, mlo[mt][0]); a[0][2] = bf16x2_mul(hi, mlo[mt][0]);
                    fp8x4_bits(q10, lo, hi);
                    a[0][1] = bf16x2_mul(lo, mlo[mt][1]); a[0][3] = bf16x2_mul(hi, mlo[mt][1]);
                    fp8x4_bits(q01, lo, hi);
                    a[1][0] = bf16x2_mul(lo, mlo[mt][0]); a[1][2] = bf16x2_mul(hi, mlo[mt][0]);
                    fp8x4_bits(q11, lo, hi);
                    a[1][1] = bf16x2_mul(lo, mlo[mt][1]); a[1][3] = bf16x2_mul(hi, mlo[mt][1]);
                } else {
                    const uint32_t q0w = l == 0 ? w0.x : l == 1 ? w0.y : l == 2 ? w0.z : w0.w;
                    const uint32_t q1w = l == 0 ? w1.x : l == 1 ? w1.y : l == 2 ? w1.z : w1.w;
                    const uint32_t m0 = l < 2 ? mlo[mt][0] : mhi[mt][0];
                    const uint32_t m1 = l < 2 ? mlo[mt][1] : mhi[mt][1];
                    uint32_t p0[4], p1[4];
                    fp4x8_bits(q0w, p0);
                    fp4x8_bits(q1w, p1);
                    a[0][0] = bf16x2_mul(p0[0], m0); a[0][1] = bf16x2_mul(p1[0], m1);
                    a[0][2] = bf16x2_mul(p0[1], m0); a[0][3] = bf16x2_mul(p1[1], m1);
                    a[1][0] = bf16x2_mul(p0[2], m0); a[1][1] = bf16x2_mul(p1[2], m1);
                    a[1][2] = bf16x2_mul(p0[3], m0); a[1][3] = bf16x2_mul(p1[3], m1);
                }
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    mma_bf16(acc[mt][nt], a[0][0], a[0][1], a[0][2], a[0][3], b[nt].x, b[nt].y);
                    mma_bf16(acc[mt][nt], a[1][0], a[1][1], a[1][2], a[1][3], b[nt].z, b[nt].w);
                }
            }
        }
    }
    cp_async_wait<0>();
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");

    // ---- epilogue. C fragment: c0, c1 = (row g, tokens 2·tig, 2·tig + 1), c2, c3 = (row g + 8, same).
    if constexpr (kPair) {
        __nv_bfloat16* y = static_cast<__nv_bfloat16*>(p.y);
#pragma unroll
        for (int mt = 0; mt < MT / 2; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int t = tb + nt * 8 + 2 * tig + (i & 1);
                    const int row = static_cast<int>(blockIdx.x) * (BR / 2) + wr_i * (MT / 2) * 16 + mt * 16 + g +
                                    (i >= 2 ? 8 : 0);
                    if (t < rows && row < p.N) {
                        const float gate = acc[mt][nt][i] * G.out_scale[0];
                        const float up = acc[mt + MT / 2][nt][i] * G.out_scale[1];
                        const float h = silu_swiglu(gate, up, p.limit) * p.row_scale[row0 + t];
                        y[static_cast<int64_t>(row0 + t) * p.y_ld + row] = __float2bfloat16_rn(h);
                    }
                }
    } else {
        const int64_t ycol = p.items ? 0 : static_cast<int64_t>(gi) * p.N;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int t = tb + nt * 8 + 2 * tig + (i & 1);
                    const int row = static_cast<int>(blockIdx.x) * BR + lrow[mt][i >> 1];
                    if (t < rows && row < p.N) {
                        const float v = acc[mt][nt][i] * G.out_scale[0];
                        const int64_t o = static_cast<int64_t>(row0 + t) * p.y_ld + ycol + row;
                        if constexpr (EPI == kEpiBf16) static_cast<__nv_bfloat16*>(p.y)[o] = __float2bfloat16_rn(v);
                        else static_cast<float*>(p.y)[o] = v;
                    }
                }
    }
}

// Work list from the routing offsets: expert e with c rows gets ceil(c / BT) items
// {e, offsets[e] + j·BT, min(BT, c - j·BT), 0}, in expert order. One block; E ≤ 1024.
static __global__ void __launch_bounds__(1024) build_items_kernel(const int32_t* offsets, int E, int BT, int4* items,
                                                                  int32_t* n_items) {
    __shared__ int32_t scan[1024];
    const int e = static_cast<int>(threadIdx.x);
    asm volatile("griddepcontrol.wait;" ::: "memory");
    const int32_t first = e < E ? offsets[e] : 0;
    const int32_t c = e < E ? offsets[e + 1] - first : 0;
    const int32_t tiles = (c + BT - 1) / BT;
    scan[e] = tiles;
    __syncthreads();
    for (int o = 1; o < 1024; o <<= 1) {   // inclusive Hillis-Steele scan
        const int32_t v = e >= o ? scan[e - o] : 0;
        __syncthreads();
        scan[e] += v;
        __syncthreads();
    }
    const int32_t base = scan[e] - tiles;
    for (int32_t j = 0; j < tiles; ++j) items[base + j] = make_int4(e, first + j * BT, min(BT, c - j * BT), 0);
    if (e == 1023) *n_items = scan[1023];
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// ---------------------------------------------------------------------------- host side

// The instantiated shapes (index = config number). Per step per warp: MT decodes, NT x loads,
// 2·MT·NT MMAs per 32 columns of a lane's chunk. Decode shapes keep more steps in flight (the
// weights stream from HBM once); prefill shapes reuse each decoded fragment NT times.
#define MEGAMOE_TILED_CONFIGS(X) \
    X(0, 2, 1, 4, 1, 6)   /* 128 x 8, 4 warps: decode, few tokens per expert; no duplicate decode */ \
    X(1, 2, 2, 4, 1, 6)   /* 128 x 16, 4 warps */ \
    X(2, 4, 4, 4, 2, 4)   /* 256 x 64 */ \
    X(3, 4, 4, 2, 4, 4)   /* 128 x 128 */ \
    X(4, 2, 8, 4, 2, 3)   /* 128 x 128, NT = 8: half the decode work per MMA */ \
    X(5, 4, 8, 4, 2, 3)   /* 256 x 128 */

const TiledConfig kConfigs[] = {
#define MEGAMOE_ROW(i, mt, nt, wr, wt, st) {mt, nt, wr, wt, (wr) * (mt) * 16, (wt) * (nt) * 8, st},
    MEGAMOE_TILED_CONFIGS(MEGAMOE_ROW)
#undef MEGAMOE_ROW
};
constexpr int kNumConfigs = static_cast<int>(sizeof(kConfigs) / sizeof(kConfigs[0]));

using TiledKernel = void (*)(TiledParams);

template <LinearFormat F, int EPI> TiledKernel pick_cfg(int c) {
    switch (c) {
#define MEGAMOE_CASE(i, mt, nt, wr, wt, st) case i: return tiled_kernel<F, mt, nt, wr, wt, st, EPI>;
        MEGAMOE_TILED_CONFIGS(MEGAMOE_CASE)
#undef MEGAMOE_CASE
    }
    fail("tiled linear: config ", c, " does not exist");
}

template <LinearFormat F> int smem_of(int c) {
    switch (c) {
#define MEGAMOE_CASE(i, mt, nt, wr, wt, st) case i: return TileLayout<F, mt, nt, wr, wt, st>::kSmem;
        MEGAMOE_TILED_CONFIGS(MEGAMOE_CASE)
#undef MEGAMOE_CASE
    }
    fail("tiled linear: config ", c, " does not exist");
}

TiledKernel tiled_kernel_for(LinearFormat f, int epi, int c, int& smem) {
    switch (f) {
        case LinearFormat::bf16:
            smem = smem_of<LinearFormat::bf16>(c);
            return epi == kEpiBf16 ? pick_cfg<LinearFormat::bf16, kEpiBf16>(c) : pick_cfg<LinearFormat::bf16, kEpiF32>(c);
        case LinearFormat::fp8_block:
            smem = smem_of<LinearFormat::fp8_block>(c);
            return epi == kEpiBf16 ? pick_cfg<LinearFormat::fp8_block, kEpiBf16>(c)
                                   : pick_cfg<LinearFormat::fp8_block, kEpiF32>(c);
        case LinearFormat::mxfp4:
            smem = smem_of<LinearFormat::mxfp4>(c);
            return epi == kEpiSwiglu ? pick_cfg<LinearFormat::mxfp4, kEpiSwiglu>(c)
                   : epi == kEpiBf16 ? pick_cfg<LinearFormat::mxfp4, kEpiBf16>(c)
                                     : pick_cfg<LinearFormat::mxfp4, kEpiF32>(c);
        case LinearFormat::nvfp4:
            smem = smem_of<LinearFormat::nvfp4>(c);
            return epi == kEpiSwiglu ? pick_cfg<LinearFormat::nvfp4, kEpiSwiglu>(c)
                   : epi == kEpiBf16 ? pick_cfg<LinearFormat::nvfp4, kEpiBf16>(c)
                                     : pick_cfg<LinearFormat::nvfp4, kEpiF32>(c);
        default: break;
    }
    fail("tiled linear: no kernel for ", linear_format_name(f), epi == kEpiSwiglu ? " with the SwiGLU epilogue" : "");
}

void raise_smem(TiledKernel k, int smem) {
    static std::mutex m;
    static std::map<std::pair<uintptr_t, int>, bool> done;
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    std::lock_guard<std::mutex> lk(m);
    auto key = std::make_pair(reinterpret_cast<uintptr_t>(k), dev);
    if (done.count(key)) return;
    CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    done[key] = true;
}

int sm_count() {
    int dev = 0, sms = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    return sms;
}

void launch_tiled(LinearFormat f, int epi, int c, const TiledParams& p, unsigned grid_x, unsigned grid_y,
                  cudaStream_t stream) {
    int smem = 0;
    const TiledKernel k = tiled_kernel_for(f, epi, c, smem);
    raise_smem(k, smem);
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(grid_x, grid_y, 1);
    cfg.blockDim = dim3(static_cast<unsigned>(kConfigs[c].wr * kConfigs[c].wt * 32), 1, 1);
    cfg.dynamicSmemBytes = static_cast<size_t>(smem);
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    const cudaError_t err = cudaLaunchKernelEx(&cfg, k, p);
    if (err != cudaSuccess) {
        (void)cudaGetLastError();
        fail(__FILE__, ":", __LINE__, ": tiled linear launch (config ", c, ", grid ", grid_x, "x", grid_y, ", smem ", smem,
             "): ", cudaGetErrorString(err));
    }
}

// Config for a dense (uniform) call: the largest tile that still gives at least one CTA per SM,
// else the one with the most CTAs (small problems are latency-bound; more CTAs = more loads in flight).
int choose_dense(int64_t N, int64_t M, int64_t groups) {
    const int64_t sms = sm_count();
    int best = 0;
    int64_t best_ctas = -1;
    for (int c : {5, 4, 1, 0}) {
        const TiledConfig& t = kConfigs[c];
        if (c != 0 && t.tokens >= 2 * M) continue;   // at most half the token tile wasted
        const int64_t ctas = ceil_div(N, t.rows) * ceil_div(M, t.tokens) * groups;
        if (ctas >= sms) return c;
        if (ctas > best_ctas) best = c, best_ctas = ctas;
    }
    return best;
}

// Config for the grouped expert GEMMs from the mean rows per expert (no device sync).
int choose_grouped(int64_t N, int64_t E) {
    const double mean = static_cast<double>(N) / static_cast<double>(std::min<int64_t>(E, std::max<int64_t>(N, 1)));
    if (mean <= 8) return 0;
    if (mean <= 32) return 1;
    return 4;
}

void check_config(int c) { MEGAMOE_CHECK(c >= -1 && c < kNumConfigs, "tiled linear: config ", c, " does not exist"); }

GemmGroup group_of(const DeviceLinear& a, const DeviceLinear* b) {
    GemmGroup g{};
    g.w[0] = static_cast<const uint8_t*>(a.weight);
    g.s[0] = static_cast<const uint8_t*>(a.scale);
    kernel_scales(a, g.bias[0], g.out_scale[0]);
    const DeviceLinear& u = b ? *b : a;
    g.w[1] = static_cast<const uint8_t*>(u.weight);
    g.s[1] = static_cast<const uint8_t*>(u.scale);
    kernel_scales(u, g.bias[1], g.out_scale[1]);
    return g;
}

}  // namespace

const std::vector<TiledConfig>& tiled_configs() {
    static const std::vector<TiledConfig> v(std::begin(kConfigs), std::end(kConfigs));
    return v;
}

std::string tiled_config_name(int c) {
    check_config(c);
    if (c < 0) return "auto";
    const TiledConfig& t = kConfigs[c];
    return str("tile ", t.rows, "x", t.tokens, " (MT=", t.mt, " NT=", t.nt, " WR=", t.wr, " WT=", t.wt,
               " stages=", t.stages, ")");
}

void linear_tiled(const DeviceLinear& w, const uint16_t* x, int64_t M, void* y, const LinearOptions& o,
                  CUstream_st* stream, int config) {
    check_config(config);
    MEGAMOE_CHECK(w.weight != nullptr, "linear_tiled: weights not uploaded");
    MEGAMOE_CHECK(M >= 0 && M <= std::numeric_limits<int>::max() / 2, "linear_tiled: M = ", M);
    MEGAMOE_CHECK(o.groups >= 1 && w.out % o.groups == 0, "linear_tiled: ", o.groups, " groups do not divide ", w.out,
                  " rows");
    if (M == 0) return;
    MEGAMOE_CHECK(x != nullptr && y != nullptr, "linear_tiled: null x or y");
    if (w.format == LinearFormat::f32 || w.nan_codes || w.in % 8 != 0 || (reinterpret_cast<uintptr_t>(x) & 15) != 0) {
        // The exact kernel: f32 weights, fp8 NaN codes, or x rows that 16-byte copies cannot take.
        linear_reference(w, x, M, y, o, stream);
        return;
    }
    const int64_t N = w.out / o.groups;
    const int c = config >= 0 ? config : choose_dense(N, M, o.groups);
    const TiledConfig& t = kConfigs[c];
    TiledParams p{};
    p.base = group_of(w, nullptr);
    p.table = nullptr;
    p.items = nullptr;
    p.n_items = nullptr;
    p.M = static_cast<int>(M);
    p.tiles = static_cast<int>(ceil_div(M, t.tokens));
    p.x = x;
    p.x_ld = w.in * o.groups;
    p.y = y;
    p.y_ld = w.out;
    p.row_scale = nullptr;
    p.N = static_cast<int>(N);
    p.K = static_cast<int>(w.in);
    p.steps = static_cast<int>(w.weight_row_bytes / kStepBytes);
    p.w_row_bytes = w.weight_row_bytes;
    p.s_row_bytes = w.scale_row_bytes;
    p.limit = 0;
    const int64_t gy = p.tiles * o.groups;
    MEGAMOE_CHECK(gy <= 65535, "linear_tiled: ", M, " rows × ", o.groups, " groups is too many tiles for one launch");
    launch_tiled(w.format, o.out_bf16 ? kEpiBf16 : kEpiF32, c, p, static_cast<unsigned>(ceil_div(N, t.rows)),
                 static_cast<unsigned>(gy), stream);
}

void linear(const DeviceLinear& w, const uint16_t* x, int64_t M, void* y, const LinearOptions& o, CUstream_st* stream) {
    if (M <= 16) linear_small_m(w, x, M, y, o, stream);
    else linear_tiled(w, x, M, y, o, stream, -1);
}

// ------------------------------------------------------------------------ routed experts

DeviceExperts::DeviceExperts(const std::vector<ExpertWeights>& experts) {
    MEGAMOE_CHECK(!experts.empty(), "DeviceExperts: no experts");
    MEGAMOE_CHECK(static_cast<int64_t>(experts.size()) <= kMoeMaxExperts, "DeviceExperts: ", experts.size(),
                  " experts (at most ", kMoeMaxExperts, ")");
    const ExpertWeights& e0 = experts[0];
    format = e0.w1.format;
    I = e0.w1.out;
    D = e0.w1.in;
    E = static_cast<int64_t>(experts.size());
    MEGAMOE_CHECK(format == LinearFormat::nvfp4 || format == LinearFormat::mxfp4, "DeviceExperts: expert weights are ",
                  linear_format_name(format), "; the grouped kernels take NVFP4 or MXFP4 (the releases' expert formats)");
    try {
        for (int64_t e = 0; e < E; ++e) {
            const ExpertWeights& x = experts[static_cast<size_t>(e)];
            auto check = [&](const Linear& l, const char* name, int64_t out, int64_t in) {
                if (l.format != format)
                    fail("DeviceExperts: expert ", e, " ", name, " is ", linear_format_name(l.format), ", expert 0 is ",
                         linear_format_name(format));
                if (l.out != out || l.in != in)
                    fail("DeviceExperts: expert ", e, " ", name, " is [", l.out, ", ", l.in, "], expected [", out, ", ",
                         in, "]");
            };
            check(x.w1, "w1", I, D);
            check(x.w3, "w3", I, D);
            check(x.w2, "w2", D, I);
            w1.push_back(upload_linear(x.w1));
            w3.push_back(upload_linear(x.w3));
            w2.push_back(upload_linear(x.w2));
            if (w1.back().nan_codes || w3.back().nan_codes || w2.back().nan_codes)
                fail("DeviceExperts: expert ", e, " has fp8 NaN weight codes (not supported by the grouped kernels)");
            MEGAMOE_CHECK(D % 8 == 0 && I % 8 == 0, "DeviceExperts: D = ", D, " and I = ", I, " must be multiples of 8");
        }
        std::vector<GemmGroup> t1(static_cast<size_t>(E)), t2(static_cast<size_t>(E));
        for (int64_t e = 0; e < E; ++e) {
            t1[static_cast<size_t>(e)] = group_of(w1[static_cast<size_t>(e)], &w3[static_cast<size_t>(e)]);
            t2[static_cast<size_t>(e)] = group_of(w2[static_cast<size_t>(e)], nullptr);
        }
        CUDA_CHECK(cudaMalloc(&l1_table, t1.size() * sizeof(GemmGroup)));
        CUDA_CHECK(cudaMalloc(&l2_table, t2.size() * sizeof(GemmGroup)));
        CUDA_CHECK(cudaMemcpy(l1_table, t1.data(), t1.size() * sizeof(GemmGroup), cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(l2_table, t2.data(), t2.size() * sizeof(GemmGroup), cudaMemcpyHostToDevice));
    } catch (...) {
        release();
        throw;
    }
}

void DeviceExperts::release() noexcept {
    for (auto* v : {&w1, &w3, &w2})
        for (DeviceLinear& l : *v) free_linear(l);
    w1.clear();
    w3.clear();
    w2.clear();
    if (l1_table) (void)cudaFree(l1_table);
    if (l2_table) (void)cudaFree(l2_table);
    l1_table = l2_table = nullptr;
}

DeviceExperts::~DeviceExperts() { release(); }

DeviceExperts::DeviceExperts(DeviceExperts&& o) noexcept { *this = std::move(o); }

DeviceExperts& DeviceExperts::operator=(DeviceExperts&& o) noexcept {
    if (this != &o) {
        release();
        format = o.format;
        E = o.E;
        D = o.D;
        I = o.I;
        w1 = std::move(o.w1);
        w3 = std::move(o.w3);
        w2 = std::move(o.w2);
        l1_table = o.l1_table;
        l2_table = o.l2_table;
        o.w1.clear();
        o.w3.clear();
        o.w2.clear();
        o.l1_table = o.l2_table = nullptr;
        o.E = 0;
    }
    return *this;
}

size_t DeviceExperts::bytes() const {
    size_t b = 0;
    for (const auto* v : {&w1, &w3, &w2})
        for (const DeviceLinear& l : *v) b += l.bytes();
    return b;
}

MoeLayerWorkspace::MoeLayerWorkspace(int64_t T_max, int64_t k, const DeviceExperts& ex) {
    MEGAMOE_CHECK(ex.E > 0, "MoeLayerWorkspace: experts not uploaded");
    MEGAMOE_CHECK(T_max >= 1 && k >= 1, "MoeLayerWorkspace: T_max = ", T_max, ", k = ", k);
    dispatch = MoeDispatchWorkspace(T_max, k, ex.E, ex.D);
    const int64_t N = T_max * k;
    // Items for the smallest token tile: Σ_e ceil(c_e / BT) ≤ N / BT + (experts with rows).
    max_items = ceil_div(N, kConfigs[0].tokens) + std::min(N, ex.E);
    i_ = ex.I;
    try {
        CUDA_CHECK(cudaMalloc(&h, static_cast<size_t>(N * ex.I) * sizeof(uint16_t)));
        CUDA_CHECK(cudaMalloc(&rows, static_cast<size_t>(N * ex.D) * sizeof(float)));
        CUDA_CHECK(cudaMalloc(&items, static_cast<size_t>(max_items) * 4 * sizeof(int32_t)));
        CUDA_CHECK(cudaMalloc(&n_items, 2 * sizeof(int32_t)));
    } catch (...) {
        release();
        throw;
    }
}

void MoeLayerWorkspace::release() noexcept {
    if (h) (void)cudaFree(h);
    if (rows) (void)cudaFree(rows);
    if (items) (void)cudaFree(items);
    if (n_items) (void)cudaFree(n_items);
    h = nullptr;
    rows = nullptr;
    items = nullptr;
    n_items = nullptr;
}

MoeLayerWorkspace::~MoeLayerWorkspace() { release(); }

MoeLayerWorkspace::MoeLayerWorkspace(MoeLayerWorkspace&& o) noexcept { *this = std::move(o); }

MoeLayerWorkspace& MoeLayerWorkspace::operator=(MoeLayerWorkspace&& o) noexcept {
    if (this != &o) {
        release();
        dispatch = std::move(o.dispatch);
        h = o.h;
        rows = o.rows;
        items = o.items;
        n_items = o.n_items;
        max_items = o.max_items;
        i_ = o.i_;
        o.h = nullptr;
        o.rows = nullptr;
        o.items = nullptr;
        o.n_items = nullptr;
        o.max_items = 0;
    }
    return *this;
}

size_t MoeLayerWorkspace::bytes() const {
    const int64_t N = dispatch.T_max * dispatch.k;
    const int64_t I = h ? i_ : 0;
    return dispatch.bytes() + static_cast<size_t>(N * I) * 2 + static_cast<size_t>(N * dispatch.D) * 4 +
           static_cast<size_t>(max_items) * 16 + 8;
}

namespace {

void launch_build_items(const MoeLayerWorkspace& ws, int64_t E, int BT, cudaStream_t stream) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(1, 1, 1);
    cfg.blockDim = dim3(1024, 1, 1);
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    CUDA_CHECK(cudaLaunchKernelEx(&cfg, build_items_kernel, static_cast<const int32_t*>(ws.dispatch.offsets),
                                  static_cast<int>(E), BT, reinterpret_cast<int4*>(ws.items), ws.n_items));
}

void grouped(const DeviceExperts& ex, MoeLayerWorkspace& ws, int64_t N, bool l1, float limit, int config,
             bool build, cudaStream_t stream) {
    check_config(config);
    MEGAMOE_CHECK(ex.E > 0 && ex.E == ws.dispatch.E && ex.D == ws.dispatch.D, "moe_l", l1 ? 1 : 2,
                  ": workspace is for E = ", ws.dispatch.E, ", D = ", ws.dispatch.D, ", experts have E = ", ex.E,
                  ", D = ", ex.D);
    MEGAMOE_CHECK(N >= 0 && N <= ws.dispatch.T_max * ws.dispatch.k, "moe_l", l1 ? 1 : 2, ": ", N,
                  " rows exceed the workspace (", ws.dispatch.T_max * ws.dispatch.k, ")");
    if (N == 0) return;
    const int c = config >= 0 ? config : choose_grouped(N, ex.E);
    const TiledConfig& t = kConfigs[c];
    if (build) launch_build_items(ws, ex.E, t.tokens, stream);
    const DeviceLinear& w = l1 ? ex.w1[0] : ex.w2[0];
    TiledParams p{};
    p.base = GemmGroup{};
    p.table = static_cast<const GemmGroup*>(l1 ? ex.l1_table : ex.l2_table);
    p.items = reinterpret_cast<const int4*>(ws.items);
    p.n_items = ws.n_items;
    p.M = 0;
    p.tiles = 0;
    p.x = l1 ? ws.dispatch.xs : ws.h;
    p.x_ld = l1 ? ex.D : ex.I;
    p.y = l1 ? static_cast<void*>(ws.h) : static_cast<void*>(ws.rows);
    p.y_ld = l1 ? ex.I : ex.D;
    p.row_scale = ws.dispatch.ws;
    p.N = static_cast<int>(w.out);
    p.K = static_cast<int>(w.in);
    p.steps = static_cast<int>(w.weight_row_bytes / kStepBytes);
    p.w_row_bytes = w.weight_row_bytes;
    p.s_row_bytes = w.scale_row_bytes;
    p.limit = limit;
    const int64_t items = ceil_div(N, t.tokens) + std::min(N, ex.E);
    MEGAMOE_CHECK(items <= 65535, "moe_l", l1 ? 1 : 2, ": ", items, " work items exceed one launch");
    const int64_t rows_per_cta = l1 ? t.rows / 2 : t.rows;
    launch_tiled(ex.format, l1 ? kEpiSwiglu : kEpiF32, c, p, static_cast<unsigned>(ceil_div(w.out, rows_per_cta)),
                 static_cast<unsigned>(items), stream);
}

}  // namespace

void moe_l1(const DeviceExperts& ex, float limit, MoeLayerWorkspace& ws, int64_t N, CUstream_st* stream, int config) {
    grouped(ex, ws, N, true, limit, config, true, stream);
}

void moe_l2(const DeviceExperts& ex, MoeLayerWorkspace& ws, int64_t N, CUstream_st* stream, int config) {
    grouped(ex, ws, N, false, 0.0f, config, true, stream);
}

void moe_layer(const DeviceExperts& ex, float limit, const uint16_t* x, const int32_t* ids, const float* weights,
               int64_t T, const float* shared, float* y, MoeLayerWorkspace& ws, CUstream_st* stream, int config) {
    check_config(config);
    MEGAMOE_CHECK(T >= 0 && T <= ws.dispatch.T_max, "moe_layer: T = ", T, " exceeds the workspace's T_max = ",
                  ws.dispatch.T_max);
    if (T == 0) return;
    const int64_t N = T * ws.dispatch.k;
    ws.dispatch.route(ids, T, stream);
    ws.dispatch.gather(x, weights, T, stream);
    const int c = config >= 0 ? config : choose_grouped(N, ex.E);
    grouped(ex, ws, N, true, limit, c, true, stream);
    grouped(ex, ws, N, false, 0.0f, c, false, stream);   // same tile size: L1's work list serves
    ws.dispatch.combine(ws.rows, shared, T, y, stream);
}

int moe_layer_config(const DeviceExperts& ex, int64_t T, int64_t k) { return choose_grouped(T * k, ex.E); }

int linear_tiled_config(const DeviceLinear& w, int64_t M, const LinearOptions& o) {
    MEGAMOE_CHECK(o.groups >= 1 && w.out % o.groups == 0, "linear_tiled_config: bad groups");
    return choose_dense(w.out / o.groups, M, o.groups);
}

}  // namespace megamoe::cuda
