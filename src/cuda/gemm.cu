// gemm.cu — the tiled linear (any M) and the grouped routed-expert GEMMs on Hopper (sm_90a).
//
// Two kernel families share the weight handling (packed checkpoint bytes in kernel order, decoded
// in registers, never a dequantized copy) and the work decomposition below:
//   tiled_kernel (mma.sync; the mma_* tiles): decode / few tokens per expert, mid-size expert
//     batches (mma_128x16 / mma_256x32 / mma_256x48: 7-60 rows per expert, T ≈ 320-2560 on V4-Flash),
//     and any M or K;
//   wgmma_kernel (wgmma with A from registers; wgmma_256x128, wgmma_256x32): prefill (described
//     where it is defined), and wgmma_ws_kernel, the same tiles with a
//     producer warpgroup (wgmma_ws_256x128: the grouped experts from T ≈ 2816). Tile choices:
//     choose_dense / choose_grouped (measured). The dense wgmma path's buffers (permuted x, split-K partials) are the caller's
//     GemmScratch; the grouped path's are in MoeLayerWorkspace. Nothing here allocates per call.
// A third, wgmma_f8_kernel (wgmma_f8_128x128, wgmma_f8_128x32: MXFP4 experts × FP8 activation codes
// under the official numerics, weights expanded to e4m3 in shared memory, w4a8.h), is taken only
// when named (measured slower so far; described where it is defined); and a fourth,
// wgmma_rf8_kernel (wgmma_rf8_128x128, wgmma_rf8_128x32: the same products with the weights expanded
// in the MMA warps' registers, wgmma's A from registers), written without a GPU and taken only when named.
// The persistent tiles (wgmma_pws_256x128, wgmma_pf8_128x128, wgmma_pf8_128x32: TileWalk) run
// those two warp-specialized kernels with one CTA per SM walking the expert work list, the ring
// running on from tile to tile; not measured yet, so taken only when named.
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
//   cp.async into one slot of an ST-deep shared-memory ring (one __syncthreads per step).
//   x rows are padded and (fp4) chunk-swizzled so the quarter-warp LDS.128 reads are conflict-free
//   (same layout argument as linear.cu's x stage).
// * Work: grid.x = row blocks, grid.y = work items (a group and BT of its token rows). Groups are
//   either uniform (a grouped linear like wo_a: group g = rows [g·N, (g+1)·N) of one weight, x
//   columns [g·K, (g+1)·K)) or listed (experts: a device table of weight pointers per expert and
//   a device work list built from the routing offsets by build_items, so no host sync is needed;
//   grid.y is the list's upper bound and CTAs past its device-side length exit at once). Empty
//   experts have no items. (The persistent tiles instead launch one CTA per SM, each walking the
//   list's row-tile × item pairs: TileWalk.)
// * Epilogues straight from the accumulators: f32 or bf16 y; or, for a SwiGLU pair (w1, w3 of an
//   expert), the warp's first MT/2 row tiles read w1 rows and the last MT/2 the same w3 rows, so a
//   lane holds gate and up of the same (row, token) and writes
//   h = silu(min(g, L)) · clamp(u, -L, L) · routing weight, rounded to bf16.
// Exactness is as in linear.cu: the tensor core sees exact weights (up to a power of two, undone
// in the epilogue), so y differs from the CPU twin only in fp32 summation order (and the final
// bf16 rounding where the output is bf16).
#include "cuda/gemm.h"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "core/common.h"
#include "cuda/device.cuh"
#include "cuda/device_info.h"
#include "cuda/gemm_group.cuh"
#include "cuda/numerics.cuh"
#include "cuda/numerics.h"
#include "cuda/w4a8.h"
#include "io/formats.h"

namespace megamoe::cuda {

namespace cg = cooperative_groups;

namespace {

using namespace dev;

enum Epi : int { kEpiF32 = 0, kEpiBf16 = 1, kEpiSwiglu = 2 };

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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
    int   spz;                    // split-K: steps per blockIdx.z (= steps when not split)
    float* part;                  // wgmma split-K: f32 partial sums [gridDim.z][M][y_ld], or nullptr; the
                                  // mma.sync tiles split K over a cluster of gridDim.z CTAs instead
                                  // (partials summed through distributed shared memory, part unused)
    bool  official;               // SwiGLU: gate and up rounded to bf16 first (Numerics::official)
    // The W4A8 tile (wgmma_f8_kernel) reads x as FP8 codes instead: x8 e4m3 [rows, x_ld] (fp8 kernel
    // order, cuda::quantize_gemm_input) and their scales xs8 f32 [rows, xs_ld] (one per 128 columns).
    const uint8_t* x8;
    const float*   xs8;
    int64_t        xs_ld;
    // The persistent tiles (is_persistent: wgmma_pws_256x128, wgmma_pf8_*; listed groups only): row
    // tiles per work item. gridDim.x CTAs then walk the list (TileWalk); 0 for every other launch.
    int row_tiles;
    // mma_256x32 / mma_256x48 on listed groups: launch tiled_kernel's kSkipDead instance, whose
    // warps multiply only the 8-token column tiles that hold rows of their work item, and whose
    // ring copies x only for those (MoeLayerWorkspace::skip_dead_ntiles; off: every column tile).
    bool skip_dead;
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

// The CTA's work item (blockIdx.y): group gi, its first x row row0, rows (≤ BT) and the group's
// weights. Listed groups read the device work list, which the previous kernel wrote, so they wait
// for it first (griddepcontrol.wait); uniform ones derive the item from blockIdx.y and wait after.
// False if blockIdx.y lies past the list's device-side length (the CTA has nothing to do).
template <int BT>
__device__ __forceinline__ bool work_item(const TiledParams& p, int& gi, int& row0, int& rows, GemmGroup& G) {
    if (p.items) {
        asm volatile("griddepcontrol.wait;" ::: "memory");
        if (static_cast<int>(blockIdx.y) >= *p.n_items) return false;
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
    return true;
}

// The tiles a CTA of the warp-specialized kernels (wgmma_ws_kernel, wgmma_f8_kernel) computes.
// kPersist = false: one, row tile blockIdx.x of work item blockIdx.y (work_item). kPersist = true
// (the persistent tiles, listed groups): tiles t = blockIdx.x, blockIdx.x + gridDim.x, ... of the
// whole list in row-tile-major order (row tile t % p.row_tiles of item t / p.row_tiles, so that the
// CTAs running at one time share their items' x in L2, as a one-tile grid's do), until the item
// count the device-side list holds. One CTA per SM then keeps its ring, barriers and tables from
// tile to tile, and its producer (decoders) fill the next tile's stages while its consumers still
// multiply the last steps and store the previous tile: a one-tile CTA exposes its ring's first
// fill and its epilogue (the W4A8 tile's profile put the epilogue at 11.5% of the stall samples
// and the prologue at 5%: docs/bench-gemm.md, "The decoders' raw-weight ring").
template <int BT, bool kPersist> struct TileWalk {
    int i = 0;    // persistent: the tiles this CTA walked before this one (its steps: i · steps)
    __device__ __forceinline__ bool first(const TiledParams& p, int& gi, int& row0, int& rows, GemmGroup& G) {
        if constexpr (!kPersist) {
            return work_item<BT>(p, gi, row0, rows, G);
        } else {
            asm volatile("griddepcontrol.wait;" ::: "memory");   // the list comes from the kernel before
            return load(p, gi, row0, rows, G);
        }
    }
    // The CTA's next tile; false past the end (and always for a one-tile CTA).
    __device__ __forceinline__ bool next(const TiledParams& p, int& gi, int& row0, int& rows, GemmGroup& G) {
        if constexpr (!kPersist) {
            return false;
        } else {
            ++i;
            return load(p, gi, row0, rows, G);
        }
    }
    // Whether this is the CTA's last tile. (The walk's state is one counter: the tile's item, row
    // tile and the list's length are derived again where needed, so that the walk holds few
    // registers across the main loops: the producer warpgroup has 40.)
    __device__ __forceinline__ bool last(const TiledParams& p) const {
        if constexpr (!kPersist) {
            return true;
        } else {
            int item, rt;
            return !persistent_tile(static_cast<int>(blockIdx.x), i + 1, static_cast<int>(gridDim.x), p.row_tiles,
                                    *p.n_items, item, rt);
        }
    }
    // This tile's row tile (derived, not held: see last()).
    __device__ __forceinline__ int row_tile(const TiledParams& p) const {
        if constexpr (!kPersist) {
            return static_cast<int>(blockIdx.x);
        } else {   // persistent_tile's rt, without the bound (the tile is one the walk took)
            return (static_cast<int>(blockIdx.x) + i * static_cast<int>(gridDim.x)) % p.row_tiles;
        }
    }
    __device__ __forceinline__ bool load(const TiledParams& p, int& gi, int& row0, int& rows, GemmGroup& G) {
        int item, rt;
        if (!persistent_tile(static_cast<int>(blockIdx.x), i, static_cast<int>(gridDim.x), p.row_tiles, *p.n_items, item,
                             rt))
            return false;
        const int4 w = p.items[item];
        gi = w.x;
        row0 = w.y;
        rows = w.z;
        G = p.table[gi];
        return true;
    }
};

// A lane's weights and scale multipliers from one ring stage: the 16 bytes at byte 16·tig of the
// step for each of its rows lrow[mt][h] (w_slot: [rows][64 B]), and the bf16x2 block-scale
// multipliers for them (s_slot: per row, 8 bytes NVFP4, 4 bytes MXFP4 and fp8 (the aligned word
// holding the byte; s_lo: its offset in the word at step 0)), as decode_a takes them.
template <LinearFormat F, int MT>
__device__ __forceinline__ void stage_weights(const uint8_t* w_slot, const uint8_t* s_slot, const int (&lrow)[MT][2],
                                              const int (&mat)[MT], const uint32_t (&s_lo)[MT][2], int tig, int s,
                                              const GemmGroup& G, uint4 (&wv)[MT][2], uint32_t (&mlo)[MT][2],
                                              uint32_t (&mhi)[MT][2]) {
    constexpr int kStepK = 4 * Traits<F>::kElems;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = lrow[mt][h];
            wv[mt][h] = *reinterpret_cast<const uint4*>(w_slot + r * kStepBytes + tig * 16);
            if constexpr (F == LinearFormat::nvfp4) {
                const uint32_t word = *reinterpret_cast<const uint32_t*>(s_slot + r * 8 + (tig >> 1) * 4);
                nvfp4_mults(word >> (16 * (tig & 1)), mlo[mt][h], mhi[mt][h]);
            } else if constexpr (F == LinearFormat::mxfp4) {
                const uint32_t word = *reinterpret_cast<const uint32_t*>(s_slot + r * 4);
                mlo[mt][h] = mhi[mt][h] = pow2_bf16x2((word >> (8 * tig)) & 0xFFu, G.bias[mat[mt]]);
            } else if constexpr (F == LinearFormat::fp8_block) {
                const uint32_t word = *reinterpret_cast<const uint32_t*>(s_slot + r * 4);
                const uint32_t off = (s_lo[mt][h] + static_cast<uint32_t>((s * kStepK) / kFp8Block)) & 3u;
                mlo[mt][h] = mhi[mt][h] = pow2_bf16x2((word >> (8 * off)) & 0xFFu, G.bias[mat[mt]]);
            } else {
                mlo[mt][h] = mhi[mt][h] = 0;
            }
        }
    }
}

// One output element: store_y writes y[o] = v as f32 or bf16 (EPI); store_h, for a SwiGLU pair,
// writes h[xrow, row] = silu(min(g, L)) · clamp(u, ±L) · routing weight of x row xrow, in bf16.
template <int EPI>
__device__ __forceinline__ void store_y(const TiledParams& p, int64_t o, float v) {
    if constexpr (EPI == kEpiBf16) static_cast<__nv_bfloat16*>(p.y)[o] = __float2bfloat16_rn(v);
    else static_cast<float*>(p.y)[o] = v;
}
// rs: p.row_scale[xrow], which a caller storing many values loads for all of them first (see
// row_scales): one load per value here, between the divisions' branches, kept them from being
// hoisted, and ncu showed the wgmma tiles' SwiGLU epilogue waiting out one L2 trip per token.
// With the preload (and the W4A8 decoders' x addresses below) the V4-Flash expert layer measured
// 0.4-2.5% faster (H100, megamoe-gemm-bench --part experts, docs/bench-gemm.md).
__device__ __forceinline__ void store_h(const TiledParams& p, int xrow, int row, float gate, float up, float rs) {
    if (p.official) {   // the official w1 / w3 outputs are bf16 (ops::expert_ffn with linear_rounded)
        gate = nm::bf16_round(gate);
        up = nm::bf16_round(up);
    }
    const float h = silu_swiglu(gate, up, p.limit) * rs;
    static_cast<__nv_bfloat16*>(p.y)[static_cast<int64_t>(xrow) * p.y_ld + row] = __float2bfloat16_rn(h);
}
__device__ __forceinline__ void store_h(const TiledParams& p, int xrow, int row, float gate, float up) {
    store_h(p, xrow, row, gate, up, p.row_scale[xrow]);
}
// The routing weights of a thread's accumulator columns, tokens nt·8 + 2·tig + j (j < 2) of the
// tile, loaded together before the epilogue's stores (0 past rows).
template <int NT>
__device__ __forceinline__ void row_scales(const TiledParams& p, int row0, int rows, int tig, float (&rs)[NT][2]) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int t = nt * 8 + 2 * tig + j;
            rs[nt][j] = t < rows ? p.row_scale[row0 + t] : 0.0f;
        }
}

// CTAs per SM the register budget is held to: mma_256x32 (MT 2, NT 4, 8 × 1 warps) needs at most
// 128 registers for two CTAs per SM (unbounded, ptxas gave its NVFP4 SwiGLU instance 131 and its
// FP8 ones 132: one CTA per SM); mma_256x48 (NT 6) is held to the same and spills a little (measured
// faster than a one-CTA-per-SM form with 4 stages; the same shape at one CTA and 3 stages was not
// measured; choose_grouped); every other shape keeps 1.
template <int MT, int NT, int WR, int WT> constexpr int tiled_min_ctas() {
    return MT == 2 && (NT == 4 || NT == 6) && WR == 8 && WT == 1 ? 2 : 1;
}

// kSkipDead: the instance that skips the column tiles without rows (p.skip_dead; mma_256x32 and
// mma_256x48 on listed groups, launch_tiled); every other instance multiplies all of them.
template <LinearFormat F, int MT, int NT, int WR, int WT, int ST, int EPI, bool kSkipDead = false>
static __global__ void __launch_bounds__(WR * WT * 32, tiled_min_ctas<MT, NT, WR, WT>()) tiled_kernel(const TiledParams p) {
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
    if (!work_item<BT>(p, gi, row0, rows, G)) return;
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

    // The tile's 8-token column tiles that hold rows (kSkipDead with p.skip_dead; else all): the x
    // chunks of the rest are not copied, and a warp's column tiles past them are not multiplied
    // (their columns are never stored, and no warp reads their x).
    static_assert(!kSkipDead || (WT == 1 && NT >= 4 && NT <= 8), "the skip instances: one warp column, 4-8 column tiles");
    const int live_tok = kSkipDead ? min(BT, (rows + 7) & ~7) : BT;
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
        const int x_chunks = kSkipDead ? live_tok * (kStepK / 8) : kXChunks;
        for (int c = tid; c < x_chunks; c += kThreads) {
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

    // Split-K over a cluster (gridDim.z > 1): this CTA's steps [s_begin, s_begin + n_steps).
    const int s_begin = static_cast<int>(blockIdx.z) * p.spz;
    const int n_steps = max(0, min(p.spz, p.steps - s_begin));
#pragma unroll
    for (int i = 0; i < kTStages - 1; ++i) {
        if (i < n_steps) issue(s_begin + i, i);
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
    // The step's MMAs over this warp's first LIVE column tiles (LIVE = NT: all of them).
    auto multiply = [&]<int LIVE>(const uint8_t* st, const uint4 (&wv)[MT][2], const uint32_t (&mlo)[MT][2],
                                  const uint32_t (&mhi)[MT][2]) {
#pragma unroll
        for (int l = 0; l < kLds; ++l) {
            uint4 b[LIVE > 0 ? LIVE : 1];
#pragma unroll
            for (int nt = 0; nt < LIVE; ++nt)
                b[nt] = *reinterpret_cast<const uint4*>(st + L::kX + (tb + nt * 8 + g) * XRS +
                                                        x_chunk_pos<F>(tig * kLds + l) * 16);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                uint32_t a[2][4];
                decode_a<F>(wv[mt][0], wv[mt][1], l, mlo[mt][0], mhi[mt][0], mlo[mt][1], mhi[mt][1], a);
#pragma unroll
                for (int nt = 0; nt < LIVE; ++nt) {
                    mma_bf16(acc[mt][nt], a[0][0], a[0][1], a[0][2], a[0][3], b[nt].x, b[nt].y);
                    mma_bf16(acc[mt][nt], a[1][0], a[1][1], a[1][2], a[1][3], b[nt].z, b[nt].w);
                }
            }
        }
    };
    // This warp's column tiles with rows (warp-uniform, constant over the CTA's steps).
    const int live = kSkipDead ? max(0, min(NT, (live_tok - tb) / 8)) : NT;
    // The main loop for LIVE column tiles; the skip instances run one copy per LIVE, chosen once
    // (the choice inside the loop, per step, made ptxas spill 100-136 bytes in mma_256x48's).
    auto main_loop = [&]<int LIVE>() {
        for (int i = 0; i < n_steps; ++i) {
            const int s = s_begin + i;
            cp_async_wait<kTStages - 2>();
            __syncthreads();   // step s has landed for every thread; slot (i-1) % kTStages is free
            {
                const int nx = i + kTStages - 1;
                if (nx < n_steps) issue(s_begin + nx, nx % kTStages);
                cp_async_commit();
            }
            const uint8_t* st = smem + (i % kTStages) * L::kStage;

            uint4 wv[MT][2];
            uint32_t mlo[MT][2], mhi[MT][2];
            stage_weights<F, MT>(st + L::kW, st + L::kS, lrow, mat, s_lo, tig, s, G, wv, mlo, mhi);
            multiply.template operator()<LIVE>(st, wv, mlo, mhi);
        }
    };
    if constexpr (kSkipDead) {
        // (live ≥ 1: an item has rows, and the warp's columns start at token 0)
        if (live >= NT) main_loop.template operator()<NT>();
        else if (live == NT - 1) main_loop.template operator()<NT - 1>();
        else if (live == NT - 2) main_loop.template operator()<NT - 2>();
        else if (live == NT - 3) main_loop.template operator()<NT - 3>();
        else if constexpr (NT > 4) {
            if (live == NT - 4) main_loop.template operator()<NT - 4>();
            else if constexpr (NT > 5) {
                if (live == NT - 5) main_loop.template operator()<NT - 5>();
                else if constexpr (NT > 6) {
                    if (live == NT - 6) main_loop.template operator()<NT - 6>();
                    else if constexpr (NT > 7) main_loop.template operator()<NT - 7>();
                }
            }
        }
    } else {
        main_loop.template operator()<NT>();
    }
    cp_async_wait<0>();
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");

    // ---- split-K: each thread's fragments go to shared memory (the ring is idle now); rank 0 of
    // the cluster adds the other ranks' in rank order (deterministic) and runs the epilogue alone.
    constexpr int kNv = MT * NT * 4;
    if constexpr (kNv * kThreads * 4 > L::kSmem) {
        if (gridDim.z > 1) __trap();   // the host splits only tiles whose partials fit the ring (mma_128x8)
    } else if (gridDim.z > 1) {
        float* red = reinterpret_cast<float*>(smem);
        __syncthreads();   // every warp is done reading the ring
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int j = 0; j < 4; ++j) red[((mt * NT + nt) * 4 + j) * kThreads + tid] = acc[mt][nt][j];
        cg::cluster_group cluster = cg::this_cluster();
        cluster.sync();
        const unsigned rank = cluster.block_rank();
        if (rank == 0) {
            for (unsigned r = 1; r < gridDim.z; ++r) {
                const float* src = cluster.map_shared_rank(red, r);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                        for (int j = 0; j < 4; ++j) acc[mt][nt][j] += src[((mt * NT + nt) * 4 + j) * kThreads + tid];
            }
        }
        cluster.sync();   // keep every rank's partials alive until rank 0 has read them
        if (rank != 0) return;
    }

    // ---- epilogue. C fragment: c0, c1 = (row g, tokens 2·tig, 2·tig + 1), c2, c3 = (row g + 8, same).
    if constexpr (kPair) {
#pragma unroll
        for (int mt = 0; mt < MT / 2; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int t = tb + nt * 8 + 2 * tig + (i & 1);
                    const int row = static_cast<int>(blockIdx.x) * (BR / 2) + wr_i * (MT / 2) * 16 + mt * 16 + g +
                                    (i >= 2 ? 8 : 0);
                    if (t < rows && row < p.N)
                        store_h(p, row0 + t, row, acc[mt][nt][i] * G.out_scale[0],
                                acc[mt + MT / 2][nt][i] * G.out_scale[1]);
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
                    if (t < rows && row < p.N)
                        store_y<EPI>(p, static_cast<int64_t>(row0 + t) * p.y_ld + ycol + row,
                                     acc[mt][nt][i] * G.out_scale[0]);
                }
    }
}

// ---------------------------------------------------------------------------- wgmma (prefill)
//
// For many tokens the tiled kernel above is bound by instruction issue (decode + mma.sync + LDS).
// wgmma_kernel multiplies with Hopper's asynchronous warpgroup MMA instead: A (the weights) still
// comes from registers, decoded by each warp exactly as above (a warpgroup's 4 warps hold the 4
// 16-row slices of a 64-row A tile, the m16n8k16 A fragment layout), and B (128 tokens × k16) is
// read by the tensor cores straight from shared memory through a matrix descriptor, so one
// decoded A fragment feeds BT tokens and no x fragment passes through registers.
//   CTA: 2 warpgroups × 2 row tiles of 64 = 256 weight rows, BT = 128 or 32 tokens (wgmma N), a
//   cp.async ring as deep as ~200 KB of shared memory allows (WgLayout::kStages, 3..8).
//   B in shared memory: the canonical K-major layout without swizzle: 8 tokens × 16 bytes "core
//   matrices" of 128 contiguous bytes, K-adjacent ones 128 B apart (LBO), token-adjacent ones
//   256 B apart (SBO), one 16-column slice after another.
//   The decoded A registers cover, per lane, 8 contiguous k of its own 16-byte chunk, so the k16
//   slice j of a step holds the columns wgmma_column(j, s) (below) in its slots s = 0..15; x is
//   permuted into that order once (permute_x_kernel) before the GEMM. The permutation stays
//   inside each step's kStepK columns.
//   Per step: wait for the stage, then for each 8-column word l of the lanes' chunks: decode into
//   one of two A buffers (alternating over all words; the wgmma group that read it two words ago
//   has completed: wait_group 1), fence, 4 wgmmas (2 row tiles × 2 k16 slices), commit. A stage is
//   refilled only after the wgmmas that read it are done (it is the one of two steps back), and
//   the last group of a step still runs while the next step starts.
//   Split-K (dense calls): blockIdx.z takes p.spz steps and writes f32 partials, summed in a fixed
//   order by reduce_split_kernel (deterministic).

__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
           (static_cast<uint64_t>(sbo >> 4) << 32);   // layout type 0: no swizzle, base offset 0
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// wait_group N that also keeps the 16 A registers a group may still be reading alive (and unchanged)
// until the wait: the compiler sees them as read and written here, so it neither reuses their
// physical registers nor moves the next decode's writes above the wait.
template <int N> __device__ __forceinline__ void wgmma_wait_keep(uint32_t (&r)[2][2][4]) {
    asm volatile("wgmma.wait_group.sync.aligned %16;"
                 : "+r"(r[0][0][0]), "+r"(r[0][0][1]), "+r"(r[0][0][2]), "+r"(r[0][0][3]), "+r"(r[0][1][0]),
                   "+r"(r[0][1][1]), "+r"(r[0][1][2]), "+r"(r[0][1][3]), "+r"(r[1][0][0]), "+r"(r[1][0][1]),
                   "+r"(r[1][0][2]), "+r"(r[1][0][3]), "+r"(r[1][1][0]), "+r"(r[1][1][1]), "+r"(r[1][1][2]),
                   "+r"(r[1][1][3])
                 : "n"(N)
                 : "memory");
}
// Keeps the compiler from moving accumulator registers across the asynchronous wgmma window.
__device__ __forceinline__ void reg_fence(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// d[N/2] += A (4 bf16x2 registers: this warp's 16-row slice of the m64k16 A tile) · B (shared-memory
// descriptor, k16 × N), f32. One wrapper per N used (the register list is part of the instruction).
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                uint64_t desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(1));
}
__device__ __forceinline__ void wgmma_m64n32k16(float (&d)[16], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                uint64_t desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(1));
}
template <int N> __device__ __forceinline__ void wgmma_m64k16(float (&d)[N / 2], uint32_t a0, uint32_t a1, uint32_t a2,
                                                       uint32_t a3, uint64_t desc) {
    if constexpr (N == 128) wgmma_m64n128k16(d, a0, a1, a2, a3, desc);
    else wgmma_m64n32k16(d, a0, a1, a2, a3, desc);
}

constexpr int kWgRows = 256, kWgThreads = 256;

template <LinearFormat F, int BT, int CPS = 1> struct WgLayout {
    static constexpr int kStepK = 4 * Traits<F>::kElems;
    static constexpr int kW = 0;
    static constexpr int kS = kWgRows * kStepBytes;
    static constexpr int kX = kS + kWgRows * scale_slot_bytes<F>();
    static constexpr int kStage = (kX + BT * kStepK * 2 + 127) / 128 * 128;
    // Ring depth: as many stages as ~200 KB holds, at most 8 (an fp4 stage of 128 tokens holds
    // 32 KB of x and 18 KB of weights + scales). CPS = 2 (two CTAs per SM): 112 KB each, within
    // what sm_90 gives each of two CTAs (228 KB per SM less 1 KB reserved per CTA, halved): an fp4
    // stage of 32 tokens is 26 KB, so 4 stages.
    static constexpr int kBudget = CPS == 1 ? 200 * 1024 : 112 * 1024;
    static constexpr int kStages = (kBudget / kStage) < 8 ? (kBudget / kStage) : 8;
    static constexpr int kSmem = kStages * kStage;
    static_assert(kStages >= 3, "the ring needs 3 stages (prefetch distance stages - 2)");
};

// The epilogue of the wgmma kernels, straight from the accumulators: acc[mt][4·nt + i] = (row
// lrow[mt][i >> 1], token 8·nt + 2·tig + (i & 1)); f32 split-K partials, h of a SwiGLU pair, or y.
// rt: the CTA's row tile (blockIdx.x, or a persistent CTA's current one: TileWalk). kListed: the
// call is known to be a listed (expert) one (the persistent tiles): no split-K, no uniform groups.
template <int EPI, int BT, bool kListed = false>
__device__ __forceinline__ void wg_epilogue(const TiledParams& p, const float (&acc)[2][BT / 2], const int (&lrow)[2][2],
                                            int gi, int row0, int rows, const GemmGroup& G, int wg, int q, int g,
                                            int tig, int rt) {
    constexpr int MT = 2, BR = kWgRows;
    constexpr bool kPair = EPI == kEpiSwiglu;
    if (!kListed && p.part != nullptr) {   // split-K (uniform groups only): f32 partials, reduced by reduce_split_kernel
        const int64_t ycol = static_cast<int64_t>(gi) * p.N;
        float* part = p.part + static_cast<int64_t>(blockIdx.z) * p.M * p.y_ld;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < BT / 8; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int t = nt * 8 + 2 * tig + (i & 1);
                    const int row = rt * BR + lrow[mt][i >> 1];
                    if (t < rows && row < p.N)
                        part[static_cast<int64_t>(row0 + t) * p.y_ld + ycol + row] = acc[mt][4 * nt + i] * G.out_scale[0];
                }
        return;
    }
    if constexpr (kPair) {
        float rs[BT / 8][2];
        row_scales<BT / 8>(p, row0, rows, tig, rs);
#pragma unroll
        for (int nt = 0; nt < BT / 8; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int t = nt * 8 + 2 * tig + (i & 1);
                const int row = rt * (BR / 2) + wg * 64 + q * 16 + g + (i >= 2 ? 8 : 0);
                if (t < rows && row < p.N)
                    store_h(p, row0 + t, row, acc[0][4 * nt + i] * G.out_scale[0], acc[1][4 * nt + i] * G.out_scale[1],
                            rs[nt][i & 1]);
            }
    } else {
        const int64_t ycol = kListed || p.items ? 0 : static_cast<int64_t>(gi) * p.N;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < BT / 8; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int t = nt * 8 + 2 * tig + (i & 1);
                    const int row = rt * BR + lrow[mt][i >> 1];
                    if (t < rows && row < p.N)
                        store_y<EPI>(p, static_cast<int64_t>(row0 + t) * p.y_ld + ycol + row,
                                     acc[mt][4 * nt + i] * G.out_scale[0]);
                }
    }
}

// One step of a wgmma consumer warpgroup (wgmma_kernel, wgmma_ws_kernel): the lane's weights and
// scale multipliers from the stage (weights at st_w, scales at st_s, x at shared address xs), then
// per 8-column word of the lanes' chunks: wait for the group that read A buffer bf two words ago,
// decode into it, fence, the 4 wgmmas (2 row tiles × 2 k16 slices), commit. With kHandBack (the
// warp-specialized kernel) every thread arrives on `release` at word kRelease, once the previous
// step's last group is complete; unconditionally, since a branch between wgmma groups makes ptxas
// serialize them (C7513).
template <LinearFormat F, int BT, bool kHandBack>
__device__ __forceinline__ void wg_step(const uint8_t* st_w, const uint8_t* st_s, uint32_t xs, const int (&lrow)[2][2],
                                        const int (&mat)[2], const uint32_t (&s_lo)[2][2], int tig, int s,
                                        const GemmGroup& G, uint32_t (&a)[2][2][2][4], float (&acc)[2][BT / 2],
                                        uint32_t release) {
    constexpr int MT = 2, kLds = Traits<F>::kElems / 8;
    constexpr bool kAlt = kLds % 2 == 0;
    constexpr int kRelease = kAlt ? 1 : 0;   // the word whose wait retires the previous step's last group
    uint4 wv[MT][2];
    uint32_t mlo[MT][2], mhi[MT][2];
    stage_weights<F, MT>(st_w, st_s, lrow, mat, s_lo, tig, s, G, wv, mlo, mhi);

#pragma unroll
    for (int l = 0; l < kLds; ++l) {
        const int bf = kAlt ? (l & 1) : 0;
        if (!kAlt) wgmma_wait_keep<0>(a[bf]);
        else if (l > 0) wgmma_wait_keep<1>(a[bf]);   // the group that read buffer bf (two words ago) is done
        if (kHandBack && l == kRelease) mbar_arrive(release);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            decode_a<F>(wv[mt][0], wv[mt][1], l, mlo[mt][0], mhi[mt][0], mlo[mt][1], mhi[mt][1], a[bf][mt]);
        }
        wgmma_fence();
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int j = 2 * l + i;   // k16 slice of the step
            const uint64_t desc = smem_desc(xs + static_cast<uint32_t>(j * (BT / 8) * 256), 128, 256);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const uint32_t(&A)[4] = a[bf][mt][i];
                wgmma_m64k16<BT>(acc[mt], A[0], A[1], A[2], A[3], desc);
            }
        }
        wgmma_commit();
    }
}

template <LinearFormat F, int EPI, int BT, int CPS>
static __global__ void __launch_bounds__(kWgThreads, CPS) wgmma_kernel(const TiledParams p) {
    using L = WgLayout<F, BT, CPS>;
    constexpr int MT = 2, BR = kWgRows;
    static_assert(BT == 32 || BT == 128, "wgmma wrappers exist for N = 32 and 128");
    constexpr int kE = Traits<F>::kElems, kStepK = L::kStepK, kLds = kE / 8;
    constexpr int SB = scale_slot_bytes<F>();
    constexpr int kQ = kStepK / 8;                  // 16-byte x chunks per token per step
    constexpr int kXChunks = BT * kQ;
    constexpr int kWChunks = BR * 4 / kWgThreads;
    constexpr bool kPair = EPI == kEpiSwiglu;
    extern __shared__ __align__(128) uint8_t smem[];

    int gi, row0, rows;
    GemmGroup G;
    if (!work_item<BT>(p, gi, row0, rows, G)) return;
    const int64_t grow0 = p.items ? 0 : static_cast<int64_t>(gi) * p.N;
    const uint16_t* xg = p.x + (p.items ? 0 : static_cast<int64_t>(gi) * p.K);

    const int tid = static_cast<int>(threadIdx.x);
    const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
    const int wg = warp >> 2, q = warp & 3;

    // Tile row r: warpgroup r / 128, row tile (r / 64) % 2, row r % 64 of it.
    auto phys_row = [&](int r, int& m, int& row) {
        if constexpr (kPair) {
            m = (r >> 6) & 1;
            row = static_cast<int>(blockIdx.x) * (BR / 2) + (r >> 7) * 64 + (r & 63);
        } else {
            m = 0;
            row = static_cast<int>(blockIdx.x) * BR + r;
        }
    };

    const uint8_t* wsrc[kWChunks];
    bool wok[kWChunks];
#pragma unroll
    for (int i = 0; i < kWChunks; ++i) {
        const int c = tid + i * kWgThreads;
        int m, row;
        phys_row(c >> 2, m, row);
        wok[i] = row < p.N;
        wsrc[i] = wok[i] ? G.w[m] + (grow0 + row) * p.w_row_bytes + (c & 3) * 16 : G.w[0];
    }
    const uint8_t* ssrc = G.s[0];
    bool sok = false;
    if constexpr (SB > 0) {
        int m, row;
        phys_row(tid, m, row);
        sok = row < p.N;
        if (sok) {
            if constexpr (F == LinearFormat::fp8_block) ssrc = G.s[m] + ((grow0 + row) / kFp8Block) * p.s_row_bytes;
            else ssrc = G.s[m] + (grow0 + row) * p.s_row_bytes;
        }
    }
    const uint32_t smem_s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    // x copies: thread tid takes token (tid / 2) % BT and the K half tid % 2 of the step's k16
    // slices j ≡ tid / (2·BT) (mod kJStride), so its source is one row pointer and its
    // destinations one offset plus j·slice.
    constexpr int kJStride = kWgThreads / (2 * BT);   // threads cover kJStride slices at once
    constexpr int kXPer = (kQ / 2 + kJStride - 1) / kJStride;   // slices per thread per step
    static_assert(kXChunks == kWgThreads * kXPer || kXPer == 1, "x copy mapping");
    const int xt = (tid >> 1) % BT, xkh = tid & 1, xj0 = (tid >> 1) / BT;
    const bool xcopy = xj0 < kQ / 2;   // false only where the threads outnumber the step's chunks
    const bool xok = xt < rows;
    const uint16_t* xrow = xok ? xg + static_cast<int64_t>(row0 + xt) * p.x_ld + xj0 * 16 + xkh * 8 : p.x;
    const uint32_t xdst0 =
        static_cast<uint32_t>(L::kX + xj0 * (BT / 8) * 256 + ((xt >> 3) * 2 + xkh) * 128 + (xt & 7) * 16);

    auto issue = [&](int s, int slot) {
        const uint32_t base = smem_s + static_cast<uint32_t>(slot * L::kStage);
#pragma unroll
        for (int i = 0; i < kWChunks; ++i) {
            const int c = tid + i * kWgThreads;
            cp_async16(base + L::kW + c * 16, wsrc[i] + (wok[i] ? s * kStepBytes : 0), wok[i]);
        }
        if constexpr (F == LinearFormat::nvfp4) {
            cp_async8(base + L::kS + tid * 8, ssrc + (sok ? s * 8 : 0), sok);
        } else if constexpr (F == LinearFormat::mxfp4) {
            cp_async4(base + L::kS + tid * 4, ssrc + (sok ? s * 4 : 0), sok);
        } else if constexpr (F == LinearFormat::fp8_block) {
            const uintptr_t a = (reinterpret_cast<uintptr_t>(ssrc) + (sok ? (s * kStepK) / kFp8Block : 0)) & ~uintptr_t(3);
            cp_async4(base + L::kS + tid * 4, reinterpret_cast<const void*>(a), sok);
        }
        // x: this thread's token row, K half xkh of every k16 slice j (core matrix (j, tokens / 8)).
        if (xcopy) {
#pragma unroll
            for (int j = 0; j < kXPer; ++j)
                cp_async16(base + xdst0 + static_cast<uint32_t>(j * kJStride * (BT / 8) * 256),
                           xrow + (xok ? s * kStepK + j * kJStride * 16 : 0), xok);
        }
    };

    int lrow[MT][2], mat[MT];
    uint32_t s_lo[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        mat[mt] = kPair ? mt : 0;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            lrow[mt][h] = wg * 128 + mt * 64 + q * 16 + h * 8 + g;
            s_lo[mt][h] = 0;
            if constexpr (F == LinearFormat::fp8_block) {
                int m, row;
                phys_row(lrow[mt][h], m, row);
                s_lo[mt][h] = static_cast<uint32_t>(
                    (reinterpret_cast<uintptr_t>(G.s[m]) + ((grow0 + row) / kFp8Block) * p.s_row_bytes) & 3);
            }
        }
    }

    // Prefetch distance ST - 2: the slot refilled at step s is the one step s - 2 read, whose
    // wgmmas are complete (each warpgroup waits for all but its newest group before the barrier);
    // step s - 1's last group may still run while step s starts.
    constexpr int ST = L::kStages;
    constexpr int kAhead = ST - 2;
    const int s0 = static_cast<int>(blockIdx.z) * p.spz;          // split-K: this CTA's steps
    const int ns = max(0, min(p.spz, p.steps - s0));
#pragma unroll
    for (int i = 0; i < kAhead; ++i) {
        if (i < ns) issue(s0 + i, i);
        cp_async_commit();
    }

    constexpr int NA = BT / 2;   // accumulators per thread per row tile (m64nBT f32)
    float acc[MT][NA];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < NA; ++i) acc[mt][i] = 0.0f;

    // A buffers alternate per word; with an odd number of words per step (bf16) one buffer is
    // reused after the previous group completes (the buffer index must be a compile-time constant).
    constexpr bool kAlt = kLds % 2 == 0;
    uint32_t a[2][MT][2][4] = {};   // [buffer][row tile][k16 slice of the word][fragment]
    for (int ls = 0; ls < ns; ++ls) {
        const int s = s0 + ls;   // the weight step; ls indexes the ring
        // Step s - 1's groups but its last are done, so buffer 0 is free. bf16 (one word per step)
        // waits for all: its A registers are the weight registers wv themselves, reloaded below.
        if constexpr (kAlt) wgmma_wait_keep<1>(a[0]);
        else wgmma_wait_keep<0>(a[0]);
        cp_async_wait<kAhead - 1>();
        __syncthreads();
        {
            const int nx = ls + kAhead;
            if (nx < ns) issue(s0 + nx, nx % ST);
            cp_async_commit();
        }
        const int slot = ls % ST;
        const uint8_t* st = smem + slot * L::kStage;
        const uint32_t xs = smem_s + static_cast<uint32_t>(slot * L::kStage + L::kX);

        wg_step<F, BT, false>(st + L::kW, st + L::kS, xs, lrow, mat, s_lo, tig, s, G, a, acc, 0);
    }
    wgmma_wait<0>();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < NA; ++i) reg_fence(acc[mt][i]);
    cp_async_wait<0>();
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");

    wg_epilogue<EPI, BT>(p, acc, lrow, gi, row0, rows, G, wg, q, g, tig, static_cast<int>(blockIdx.x));
}

// ---------------------------------------------------------------------------- wgmma, warp-specialized
//
// wgmma_ws_kernel: the same tile, decode, B layout and epilogues as wgmma_kernel, with the copies
// moved to a producer warpgroup and the per-step CTA barrier replaced by mbarriers (the next step
// of that kernel, named in docs/bench-gemm.md: its two warpgroups copied, decoded and multiplied,
// and met at a __syncthreads every step, so the tensor cores idled through each step's copy issue
// and the decode of its first word).
//   CTA: 3 warpgroups, 384 threads. Warpgroup 2 (the producer) issues every 16-byte cp.async of a
//   stage (the weights, their scales and x, as wgmma_kernel does, spread over its 128 threads) and
//   then cp.async.mbarrier.arrive.noinc on full[slot] (count 128: the phase completes when every
//   producer thread's copies have landed). Warpgroups 0 and 1 (the consumers) wait on full[slot],
//   decode and multiply as wgmma_kernel does, and hand the slot back on empty[slot] (every consumer
//   thread arrives, count 256) as soon as the wgmmas that read it are complete: in step s, after
//   the wait that retires step s - 1's last group. The producer refills a slot only after its empty
//   phase, so the ring runs kStages - 1 steps ahead of the consumers, and no thread of the CTA
//   waits for another except through the slot it needs.
//   Registers: setmaxnreg gives the producer 40 and each consumer 232 (the 128 accumulators and the A
//   buffers of a consumer thread need most of them: wgmma_kernel, whose threads also hold the copy
//   pointers, uses 254 at 256 threads; without setmaxnreg ptxas budgets 168 and spills). A branch
//   between the wgmma groups makes ptxas serialize them (its C7513), so the consumers' hand-back of a
//   slot is branch-free (below).
//   The consumers fence the async proxy after each full wait, before their wgmmas read the stage
//   (the stage was written by cp.async, a generic-proxy write).
constexpr int kWsConsumers = 256;
// Producer threads: a warpgroup (setmaxnreg works per warpgroup, and ptxas budgets a wgmma kernel's
// registers for whole warpgroups anyway: a 288-thread launch bound still gave 168 per thread).
constexpr int kWsProducers = 128, kWsThreads = kWsConsumers + kWsProducers;
// Registers after setmaxnreg: the CTA is launched with 168 per thread (65536 / 384, rounded down to 8)
// and the warpgroups can only trade what it holds: 128·40 + 256·232 = 384·168. (A first build asked
// for 48 + 232, more than the CTA holds: the consumers' setmaxnreg.inc waited forever.)
constexpr int kWsProducerRegs = 40, kWsConsumerRegs = 232;
static_assert(kWsProducers * kWsProducerRegs + kWsConsumers * kWsConsumerRegs <= kWsThreads * 168,
              "setmaxnreg can only move the CTA's registers");
template <int N> __device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N));
}
template <int N> __device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N));
}

template <LinearFormat F, int BT> struct WsLayout {
    using L = WgLayout<F, BT>;
    static constexpr int kBars = L::kSmem;                           // full[kStages], empty[kStages], a spare
    static constexpr int kSmem = L::kSmem + 8 * (2 * L::kStages + 1);
};

// Arrives on bar (noinc: counted against its initial count) when this thread's cp.asyncs so far have landed.
__device__ __forceinline__ void cp_async_mbar_arrive(uint32_t bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void fence_proxy_async_smem() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// kPersist: the persistent form (Tile::wgmma_pws_256x128, listed groups): the CTA walks its tiles
// (TileWalk) with one ring whose step count runs on across them (gs below: the steps of earlier
// tiles plus this tile's), so the producer copies the next tile's first stages while the consumers
// finish the previous one and run its epilogue. The consumers then hand back a tile's last slot
// after its final wait (a one-tile CTA never needs it back).
template <LinearFormat F, int EPI, int BT, bool kPersist = false>
static __global__ void __launch_bounds__(kWsThreads, 1) wgmma_ws_kernel(const TiledParams p) {
    using L = WgLayout<F, BT>;
    using WL = WsLayout<F, BT>;
    constexpr int MT = 2, BR = kWgRows, ST = L::kStages;
    static_assert(BT == 32 || BT == 128, "wgmma wrappers exist for N = 32 and 128");
    constexpr int kE = Traits<F>::kElems, kStepK = L::kStepK, kLds = kE / 8;
    constexpr int SB = scale_slot_bytes<F>();
    constexpr int kQ = kStepK / 8;                       // 16-byte x chunks per token per step
    static_assert(kWsProducers % BT == 0 && (BT * kQ) % kWsProducers == 0, "x copy mapping");
    constexpr int kXPer = BT * kQ / kWsProducers;        // x chunks per producer thread per step
    constexpr int kWPer = BR * 4 / kWsProducers;         // weight chunks per producer thread per step
    constexpr int kSPer = BR / kWsProducers;             // scale rows per producer thread
    constexpr int kWRowStep = kWsProducers / 4;          // tile rows between a thread's weight chunks
    constexpr bool kPair = EPI == kEpiSwiglu;
    extern __shared__ __align__(128) uint8_t smem[];

    const int tid = static_cast<int>(threadIdx.x);
    const uint32_t smem_s = smem_addr(smem);
    const uint32_t full0 = smem_s + static_cast<uint32_t>(WL::kBars), empty0 = full0 + 8u * ST;
    if (tid == 0) {
        for (int s = 0; s < ST; ++s) {
            mbar_init(full0 + 8u * s, kWsProducers);
            mbar_init(empty0 + 8u * s, kWsConsumers);
        }
        mbar_init(empty0 + 8u * ST, kWsConsumers);   // the spare (see `release` below)
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();

    int gi, row0, rows;
    GemmGroup G;
    TileWalk<BT, kPersist> tw;
    if (!tw.first(p, gi, row0, rows, G)) return;   // the whole CTA: the walk is per CTA
    const int s0 = static_cast<int>(blockIdx.z) * p.spz;   // split-K: this CTA's steps
    const int ns = max(0, min(p.spz, p.steps - s0));

    // Tile row r of row tile rt: warpgroup r / 128, row tile (r / 64) % 2, row r % 64 of it (as wgmma_kernel).
    auto phys_row = [&](int rt, int r, int& m, int& row) {
        if constexpr (kPair) {
            m = (r >> 6) & 1;
            row = rt * (BR / 2) + (r >> 7) * 64 + (r & 63);
        } else {
            m = 0;
            row = rt * BR + r;
        }
    };

    // Matrix m's weights or scales (m = 1: the up half of a SwiGLU pair). The persistent form selects
    // rather than indexes G with the runtime m, which would keep a copy of G in local memory (ptxas:
    // 48 bytes of stack in the SwiGLU instances) beside the 40 registers its producer has.
    auto gw = [&](int m) -> const uint8_t* {
        if constexpr (kPersist) return m ? G.w[1] : G.w[0];
        else return G.w[m];
    };
    auto gs_ = [&](int m) -> const uint8_t* {
        if constexpr (kPersist) return m ? G.s[1] : G.s[0];
        else return G.s[m];
    };

    if (tid >= kWsConsumers) {
        // ---- producer warpgroup
        setmaxnreg_dec<kWsProducerRegs>();
        const int pt = tid - kWsConsumers;
        do {
            const int g0 = tw.i * ns;   // the steps of the CTA's earlier tiles (persistent)
            const int rt = tw.row_tile(p);
            const int64_t grow0 = p.items ? 0 : static_cast<int64_t>(gi) * p.N;
            const uint16_t* xg = p.x + (p.items ? 0 : static_cast<int64_t>(gi) * p.K);
            // Scale rows pt + 128·i (per row: 8 bytes NVFP4, 4 MXFP4, the aligned word of the fp8 block).
            const uint8_t* ssrc[kSPer];
            uint32_t sok = 0;
#pragma unroll
            for (int i = 0; i < kSPer; ++i) {
                ssrc[i] = G.s[0];
                if constexpr (SB > 0) {
                    int m, row;
                    phys_row(rt, pt + kWsProducers * i, m, row);
                    if (row < p.N) {
                        sok |= 1u << i;
                        if constexpr (F == LinearFormat::fp8_block) ssrc[i] = gs_(m) + ((grow0 + row) / kFp8Block) * p.s_row_bytes;
                        else ssrc[i] = gs_(m) + (grow0 + row) * p.s_row_bytes;
                    }
                }
            }
            // x chunk i: token t = pt % BT, 16-byte chunk q = pt / BT + (128 / BT)·i of its step (k16 slice
            // q / 2, half q % 2), into the core-matrix layout of wgmma_kernel. Token-major, so that the 8
            // threads of a quarter-warp write 8 tokens' chunks of one (slice, half): 128 contiguous bytes
            // of shared memory, no bank conflict (a chunk-major order would put them 128 B or 4 KB apart).
            const int xt = pt % BT, q0 = pt / BT;
            const bool xok = xt < rows;
            const uint16_t* xrow = xok ? xg + static_cast<int64_t>(row0 + xt) * p.x_ld : p.x;
            const uint32_t xdst_t = static_cast<uint32_t>(L::kX + (xt >> 3) * 256 + (xt & 7) * 16);
            for (int ls = 0; ls < ns; ++ls) {
                const int gs = g0 + ls;   // the ring's step count (= ls for a one-tile CTA)
                const int slot = gs % ST, s = s0 + ls;
                if (gs >= ST) mbar_wait(empty0 + 8u * slot, static_cast<uint32_t>((gs / ST - 1) & 1));
                const uint32_t base = smem_s + static_cast<uint32_t>(slot * L::kStage);
                // Weight chunk i: tile row (pt >> 2) + kWRowStep·i, 16-byte part pt & 3 of the row's step.
                // (Not unrolled: the producer has 40 registers, and unrolled, the compiler keeps every
                // chunk's source pointer live across steps.)
#pragma unroll 1
                for (int i = 0; i < kWPer; ++i) {
                    int m, row;
                    phys_row(rt, (pt >> 2) + kWRowStep * i, m, row);
                    const bool ok = row < p.N;
                    const uint8_t* src = ok ? gw(m) + (grow0 + row) * p.w_row_bytes + (pt & 3) * 16 + s * kStepBytes : G.w[0];
                    cp_async16(base + L::kW + static_cast<uint32_t>((pt + kWsProducers * i) * 16), src, ok);
                }
#pragma unroll
                for (int i = 0; i < kSPer; ++i) {
                    const bool ok = (sok >> i) & 1u;
                    const uint32_t dst = base + L::kS + static_cast<uint32_t>((pt + kWsProducers * i) * SB);
                    if constexpr (F == LinearFormat::nvfp4) {
                        cp_async8(dst, ssrc[i] + (ok ? s * 8 : 0), ok);
                    } else if constexpr (F == LinearFormat::mxfp4) {
                        cp_async4(dst, ssrc[i] + (ok ? s * 4 : 0), ok);
                    } else if constexpr (F == LinearFormat::fp8_block) {
                        const uintptr_t a =
                            (reinterpret_cast<uintptr_t>(ssrc[i]) + (ok ? (s * kStepK) / kFp8Block : 0)) & ~uintptr_t(3);
                        cp_async4(dst, reinterpret_cast<const void*>(a), ok);
                    }
                }
#pragma unroll
                for (int i = 0; i < kXPer; ++i) {
                    const int q = q0 + (kWsProducers / BT) * i;
                    cp_async16(base + xdst_t + static_cast<uint32_t>((q >> 1) * (BT / 8) * 256 + (q & 1) * 128),
                               xrow + (xok ? s * kStepK + q * 8 : 0), xok);
                }
                cp_async_mbar_arrive(full0 + 8u * slot);
            }
        } while (tw.next(p, gi, row0, rows, G));
        asm volatile("cp.async.wait_all;" ::: "memory");
        asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
        return;
    }

    // ---- consumer warpgroups
    setmaxnreg_inc<kWsConsumerRegs>();
    const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
    const int wg = warp >> 2, qw = warp & 3;
    int lrow[MT][2], mat[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        mat[mt] = kPair ? mt : 0;
#pragma unroll
        for (int h = 0; h < 2; ++h) lrow[mt][h] = wg * 128 + mt * 64 + qw * 16 + h * 8 + g;
    }

    constexpr int NA = BT / 2;   // accumulators per thread per row tile (m64nBT f32)
    // A buffers as in wgmma_kernel: alternating per word, one buffer (waited for in full) for bf16.
    constexpr bool kAlt = kLds % 2 == 0;
    uint32_t a[2][MT][2][4] = {};
    do {
        const int g0 = tw.i * ns;   // the steps of the CTA's earlier tiles (persistent)
        const int64_t grow0 = p.items ? 0 : static_cast<int64_t>(gi) * p.N;
        uint32_t s_lo[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                s_lo[mt][h] = 0;
                if constexpr (F == LinearFormat::fp8_block) {
                    int m, row;
                    phys_row(tw.row_tile(p), lrow[mt][h], m, row);
                    s_lo[mt][h] = static_cast<uint32_t>(
                        (reinterpret_cast<uintptr_t>(gs_(m)) + ((grow0 + row) / kFp8Block) * p.s_row_bytes) & 3);
                }
            }
        float acc[MT][NA];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int i = 0; i < NA; ++i) acc[mt][i] = 0.0f;

        for (int ls = 0; ls < ns; ++ls) {
            const int gs = g0 + ls, s = s0 + ls, slot = gs % ST;
            if constexpr (kAlt) wgmma_wait_keep<1>(a[0]);
            else wgmma_wait_keep<0>(a[0]);
            mbar_wait(full0 + 8u * slot, static_cast<uint32_t>((gs / ST) & 1));
            // The stage's bytes came by cp.async (the generic proxy) and the wgmmas read x through the
            // async proxy: a proxy fence orders them. (Leaving it out in the persistent form, as
            // CUTLASS's SM90 cp.async + GMMA mainloop and this file's wgmma_kernel do, measured −1.4%
            // to +0.5% on an H100, 2026-12-07, docs/bench-gemm.md: inside the run-to-run spread, so kept.)
            fence_proxy_async_smem();
            const uint8_t* st = smem + slot * L::kStage;
            const uint32_t xs = smem_s + static_cast<uint32_t>(slot * L::kStage + L::kX);
            // The barrier to arrive on once step ls - 1 is done: its slot's empty, or (a tile's step 0)
            // a spare barrier nobody waits on, so that the arrive needs no branch.
            const uint32_t release = ls > 0 ? empty0 + 8u * static_cast<uint32_t>((gs - 1) % ST) : empty0 + 8u * ST;

            // Every group of step ls - 1 is complete (and its weights are in registers) after wg_step's
            // first retiring wait: it hands that slot back there.
            wg_step<F, BT, true>(st + L::kW, st + L::kS, xs, lrow, mat, s_lo, tig, s, G, a, acc, release);
        }
        wgmma_wait<0>();
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int i = 0; i < NA; ++i) reg_fence(acc[mt][i]);
        // The tile's last slot back to the producer, which may be filling the next tile's steps.
        if constexpr (kPersist) {
            if (ns > 0) mbar_arrive(empty0 + 8u * static_cast<uint32_t>((g0 + ns - 1) % ST));
        }
        if (tw.last(p)) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
        wg_epilogue<EPI, BT, kPersist>(p, acc, lrow, gi, row0, rows, G, wg, qw, g, tig, tw.row_tile(p));
    } while (tw.next(p, gi, row0, rows, G));
}

// ---------------------------------------------------------------------------- W4A8: MXFP4 × FP8 activations
//
// wgmma_f8_kernel (tiles wgmma_f8_128x128, wgmma_f8_128x32): the routed experts' GEMMs under the official
// numerics with MXFP4 weights (DeepSeek's release; the CUDA backend's default numerics), on the FP8
// tensor core: both operands are e4m3 codes, as in the official W4A8 GEMM (deepseek-v4.md §2.6),
// where the kernels above multiply bf16 (the same products, at half the tensor rate). The
// activation comes quantized (cuda::quantize_gemm_input: e4m3 codes and one power-of-two scale per
// token and 128 columns, exactly the official act_quant of the FP8-rounded x that the experts
// take); the weights are expanded to e4m3 in shared memory (w4a8.h: exact, with each 32-block's
// scale folded into its codes and the 128-block's largest left as a row scale).
//   CTA: 3 warpgroups, 384 threads, 128 weight rows × BT = 128 or 32 tokens; one step = 128 columns
//   (one activation scale block, four MXFP4 blocks); a ring of F8Layout<BT>::kStages stages (5 of
//   33 KB, 8 of 21 KB). At BT = 32 each expanded weight feeds 32 tokens, so the decoder bounds the
//   tile (by our count ~215 instructions per step against 128 tensor cycles), but it still expands
//   weights faster than HBM delivers them: what T ≈ 1024 needs (V4-Flash: ~24 rows per expert).
//   Warpgroup 2 (decoders): thread i owns tile row i. Per step it issues the x copies (cp.async:
//   BT tokens × 128 code bytes, each 32-byte sector by two threads, and token i's scale), decodes the row's
//   64 weight bytes and 4 scale bytes, which it copied into its own ring of raw steps in shared
//   memory kRawSlots − 1 = 3 steps earlier (cp.async; a first build loaded them into registers one
//   step earlier, exposing a trip to L2 or HBM per step: that measured 1.50x / 1.04x the register-A
//   tiles' time at T = 1024 / 16384 on an H100, the ring 1.27x / 1.09x), into 128 e4m3 bytes in
//   the canonical K-major layout without swizzle (the layout of x in
//   wgmma_kernel: 8 rows × 16 bytes core matrices, K-adjacent ones 128 B apart, row-adjacent ones
//   256 B apart, one k32 slice after another; a quarter-warp's stores fill one 128-byte run), writes
//   the row scale, fences the async proxy and arrives on full[slot] twice (a plain arrive for its
//   stores, a cp.async arrive for its copies: count 256).
//   Warpgroups 0 and 1 (MMA, 64 tile rows each): per step, wait on full[slot], issue 4 wgmma
//   m64nBTk32 e4m3 (A and B from shared memory) into a partial accumulator (the first with
//   scale-d 0), wait for them, read the step's row and token scales, hand the slot back on
//   empty[slot] (count 256) and add partial · row scale · token scale into the f32 accumulator:
//   the promotion every 128 columns that DeepSeek's and cuBLASLt's FP8 GEMMs make, since the FP8
//   tensor core's own accumulation keeps about 14 significant bits (DeepSeek-V3 report §3.3.2).
//   While one MMA warpgroup promotes, the other's wgmmas run.
//   SwiGLU pair (L1): tile row 16·w + 8·h + g (w = warp of the 8 MMA warps, g < 8) is w1 (h = 0) or
//   w3 (h = 1) of feature 8·w + g, so each thread holds gate and up of its (feature, token) in its
//   two accumulator rows; a CTA covers 64 features.
//   Registers: setmaxnreg 104 (decoders; with two steps of weights in registers, the first build,
//   ptxas spilled 48-64 bytes at 88, 112-164 at 72) and 200 (MMA at BT = 128: 64 accumulators, 64
//   partials, the step's 32 token scales; no spill).
// Measured (H100, 2026-12-05, docs/bench-gemm.md "W4A8 expert tiles"): correct, but slower than the
// register-A tiles, so choose_grouped does not take it; moe_layer_routed runs it when asked for by
// name (tests, megamoe-gemm-bench --config). With the raw ring: 1.27x wgmma_256x32's time at
// T = 1024 (1.50x with register loads), 1.09x wgmma_ws_256x128's at T = 16384 (1.04x). Source-level
// ncu (T = 4096, L1): the MMA warps poll the full barriers (~75 try_waits per step), i.e. wait for
// the decoders, which issue ~420 instructions per step (x-copy index math, the ring, the decode),
// and the SwiGLU epilogue took 11.5% of the stall samples (one routing-weight load per value).
constexpr int kF8Rows = 128;
constexpr int kF8DecoderRegs = 104, kF8MmaRegs = 200;
static_assert(kWsProducers * kF8DecoderRegs + kWsConsumers * kF8MmaRegs <= kWsThreads * 168, "setmaxnreg budget");

// BT tokens per tile: 128 (prefill) or 32 (mid-size batches: T ≈ 1024 gives V4-Flash ~24 rows per
// expert, so a 128-token tile would be mostly padding).
template <int BT> struct F8Layout {
    static constexpr int kStepK = 128;                            // columns per step
    static constexpr int kASlice = kF8Rows * 32;                  // one k32 slice of the 128 rows
    static constexpr int kBSlice = BT * 32;                       // one k32 slice of the BT tokens
    static constexpr int kA = 0;                                  // [4 slices][16 row groups][2 halves][8][16 B]
    static constexpr int kB = kA + 4 * kASlice;                   // x codes, the same layout over tokens
    static constexpr int kRowScale = kB + 4 * kBSlice;            // f32 [128]: w4a8::row_scale per tile row
    static constexpr int kColScale = kRowScale + kF8Rows * 4;     // f32 [BT]: the activation's scale per token
    static constexpr int kStage = (kColScale + BT * 4 + 127) / 128 * 128;   // 33 KB (BT 128), 21 KB (BT 32)
    static constexpr int kStages = BT == 128 ? 5 : 8;             // ~170 KB either way
    // The decoders' own ring of raw weight steps (cp.async, kRawSlots − 1 steps in flight per
    // thread): thread i's 64 weight bytes of a step, its 16-byte pieces rotated by (i / 2) mod 4 so
    // that a quarter-warp's LDS.128 of piece b hits 8 distinct bank groups, then the 128 scale words.
    static constexpr int kRawSlots = 4;
    static constexpr int kRawW = kF8Rows * 64;                    // [128 rows][4 pieces][16 B]
    static constexpr int kRawSlot = kRawW + kF8Rows * 4;          // + u32 [128] MXFP4 scale words
    static constexpr int kRaw = kStages * kStage;
    static constexpr int kTable = kRaw + kRawSlots * kRawSlot;    // w4a8::table, kTables × 8 bytes
    static constexpr int kBars = kTable + w4a8::kTables * 8;      // full[kStages], empty[kStages]
    static constexpr int kSmem = kBars + 8 * 2 * kStages;
};

// d = (scale_d ? d : 0) + A · B, m64nNk32, e4m3 × e4m3 → f32, A and B from shared-memory
// descriptors (FP8 wgmma takes both K-major and has no transpose operands). N = 128 and 32.
__device__ __forceinline__ void wgmma_f8_m64n128k32(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(scale_d));
}
__device__ __forceinline__ void wgmma_f8_m64n32k32(float (&d)[16], uint64_t da, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k32.f32.e4m3.e4m3 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, %16, %17, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "l"(da), "l"(db), "r"(scale_d));
}
template <int N> __device__ __forceinline__ void wgmma_f8_m64k32(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d) {
    if constexpr (N == 128) wgmma_f8_m64n128k32(d, da, db, scale_d);
    else wgmma_f8_m64n32k32(d, da, db, scale_d);
}

// ---- pieces both W4A8 kernels use (wgmma_f8_kernel, and wgmma_rf8_kernel below)

// Thread 0 initializes the ring's ST full barriers at full0 (count full_count) and ST empty ones at
// empty0 (count kWsConsumers: every MMA thread hands a slot back); the first w4a8::kTables threads of
// the third warpgroup write the expansion tables at smem + table. The caller's __syncthreads
// publishes both.
template <int ST>
__device__ __forceinline__ void f8_init(uint8_t* smem, int table, uint32_t full0, uint32_t empty0, uint32_t full_count) {
    const int tid = static_cast<int>(threadIdx.x);
    if (tid == 0) {
        for (int s = 0; s < ST; ++s) {
            mbar_init(full0 + 8u * s, full_count);
            mbar_init(empty0 + 8u * s, kWsConsumers);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    if (tid >= kWsConsumers && tid < kWsConsumers + w4a8::kTables) {
        uint32_t lo, hi;
        w4a8::table(tid - kWsConsumers, lo, hi);
        *reinterpret_cast<uint2*>(smem + table + 8 * (tid - kWsConsumers)) = make_uint2(lo, hi);
    }
}

// Tile row r of row tile rt → (matrix m, weight row). kPair (L1, a SwiGLU pair): tile row 16·w + 8·h + g
// is w1 (h = 0) or w3 (h = 1) of feature rt·64 + 8·w + g, so an MMA thread holds gate and up of a
// feature in its two accumulator rows; else row rt·128 + r of the one matrix.
template <bool kPair> __device__ __forceinline__ void f8_phys_row(int rt, int r, int& m, int& row) {
    if constexpr (kPair) {
        m = (r >> 3) & 1;
        row = rt * (kF8Rows / 2) + (r >> 4) * 8 + (r & 7);
    } else {
        m = 0;
        row = rt * kF8Rows + r;
    }
}

// A step's promotion: the step's token scales from the slot's f32 [BT] at shared address cs_at, the
// slot handed back on `empty` (every read of it is done once they are in registers), then
// acc += part · row scale · token scale (rs0: the thread's row r0, rs1: r0 + 8).
template <int BT>
__device__ __forceinline__ void f8_promote(uint32_t cs_at, int tig, uint32_t empty, float rs0, float rs1,
                                           float (&acc)[BT / 2], const float (&part)[BT / 2]) {
    constexpr int NT = BT / 8;
    float2 cs[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
        asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];"
                     : "=f"(cs[nt].x), "=f"(cs[nt].y)
                     : "r"(cs_at + static_cast<uint32_t>((nt * 8 + 2 * tig) * 4)));
    mbar_arrive(empty);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        acc[4 * nt + 0] += part[4 * nt + 0] * (rs0 * cs[nt].x);
        acc[4 * nt + 1] += part[4 * nt + 1] * (rs0 * cs[nt].y);
        acc[4 * nt + 2] += part[4 * nt + 2] * (rs1 * cs[nt].x);
        acc[4 * nt + 3] += part[4 * nt + 3] * (rs1 * cs[nt].y);
    }
}

// The tile's epilogue from an MMA thread's accumulators (warpgroup wg, warp qw, lane g·4 + tig; rows
// r0 = 64·wg + 16·qw + g and r0 + 8 of row tile rt): h of its feature's SwiGLU pair, or f32 rows.
template <int EPI, int BT>
__device__ __forceinline__ void f8_epilogue(const TiledParams& p, const float (&acc)[BT / 2], int row0, int rows, int rt,
                                            int wg, int qw, int g, int tig) {
    constexpr int NT = BT / 8;
    if constexpr (EPI == kEpiSwiglu) {
        const int feature = rt * (kF8Rows / 2) + wg * 32 + qw * 8 + g;
        float rsc[NT][2];
        row_scales<NT>(p, row0, rows, tig, rsc);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int t = nt * 8 + 2 * tig + i;
                if (t < rows && feature < p.N)
                    store_h(p, row0 + t, feature, acc[4 * nt + i], acc[4 * nt + 2 + i], rsc[nt][i]);
            }
    } else {
        const int r0 = wg * 64 + qw * 16 + g;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int t = nt * 8 + 2 * tig + (i & 1);
                const int row = rt * kF8Rows + r0 + 8 * (i >> 1);
                if (t < rows && row < p.N)
                    store_y<EPI>(p, static_cast<int64_t>(row0 + t) * p.y_ld + row, acc[4 * nt + i]);
            }
    }
}

// kPersist: the persistent form (Tile::wgmma_pf8_128x128, wgmma_pf8_128x32): the CTA walks its
// tiles (TileWalk) with one ring whose step count runs on across them, as wgmma_ws_kernel's; the
// decoders restart their raw ring at each tile (its first kRawSlots − 1 steps are fetched when the
// tile begins, while the MMA warps still work through the stages already filled).
template <int EPI, int BT, bool kPersist = false>
static __global__ void __launch_bounds__(kWsThreads, 1) wgmma_f8_kernel(const TiledParams p) {
    using L = F8Layout<BT>;
    constexpr int ST = L::kStages;
    static_assert(BT == 128 || BT == 32, "wgmma wrappers exist for N = 128 and 32");
    constexpr bool kPair = EPI == kEpiSwiglu;
    static_assert(EPI != kEpiBf16, "the W4A8 tile serves the expert layer: h (SwiGLU) or f32 rows");
    extern __shared__ __align__(128) uint8_t smem[];

    const int tid = static_cast<int>(threadIdx.x);
    const uint32_t smem_s = smem_addr(smem);
    const uint32_t full0 = smem_s + static_cast<uint32_t>(L::kBars), empty0 = full0 + 8u * ST;
    f8_init<ST>(smem, L::kTable, full0, empty0, 2 * kWsProducers);   // full: each decoder thread's stores and copies
    __syncthreads();

    int gi, row0, rows;
    GemmGroup G;
    TileWalk<BT, kPersist> tw;
    if (!tw.first(p, gi, row0, rows, G)) return;   // the whole CTA: the walk is per CTA
    const int ns = p.steps;

    auto phys_row = [](int rt, int r, int& m, int& row) { f8_phys_row<kPair>(rt, r, m, row); };

    if (tid >= kWsConsumers) {
        // ---- decoding warpgroup
        setmaxnreg_dec<kF8DecoderRegs>();
        const int pt = tid - kWsConsumers;   // this thread's tile row, and the token whose scale it copies
        const uint32_t tab = smem_s + static_cast<uint32_t>(L::kTable);
        const uint32_t adst = static_cast<uint32_t>(L::kA + (pt >> 3) * 256 + (pt & 7) * 16);
        // Raw step s of this thread's row into raw slot s mod kRawSlots (rows past N: zero fill).
        const uint32_t raw0 = smem_s + static_cast<uint32_t>(L::kRaw);
        const uint32_t rot = static_cast<uint32_t>((pt >> 1) & 3);
        auto raw_w = [&](int s, int b) {   // piece b of step s's 64 bytes
            return raw0 + static_cast<uint32_t>((s % L::kRawSlots) * L::kRawSlot + pt * 64) + ((b + rot) & 3u) * 16u;
        };
        auto raw_s = [&](int s) { return raw0 + static_cast<uint32_t>((s % L::kRawSlots) * L::kRawSlot + L::kRawW + pt * 4); };
        do {
            const int g0 = tw.i * ns;   // the steps of the CTA's earlier tiles (persistent)
            const int64_t grow0 = p.items ? 0 : static_cast<int64_t>(gi) * p.N;
            int m, row;
            phys_row(tw.row_tile(p), pt, m, row);
            const bool wok = row < p.N;          // rows past N decode as zeros (their outputs are not stored)
            const uint8_t* wrow = wok ? G.w[m] + (grow0 + row) * p.w_row_bytes : G.w[0];
            const uint8_t* srow = wok ? G.s[m] + (grow0 + row) * p.s_row_bytes : G.s[0];
            const bool tok = pt < rows;        // (rows ≤ BT)
            const float* srcs = tok ? p.xs8 + static_cast<int64_t>(row0 + pt) * p.xs_ld : p.xs8;
            auto fetch = [&](int s) {
                if (s < ns) {
#pragma unroll
                    for (int b = 0; b < 4; ++b) cp_async16(raw_w(s, b), wrow + (wok ? s * kStepBytes + 16 * b : 0), wok);
                    cp_async4(raw_s(s), srow + (wok ? 4 * s : 0), wok);
                }
                cp_async_commit();   // one group per step, empty past the end (the wait below counts groups)
            };
            // The x copies' addresses, once per tile (the loop adds the step): copy i of thread pt is pair
            // u = pt / 2 + 64·i, token u % BT, k32 slice u / BT, its 16-byte half pt % 2 (see below).
            // Recomputed per step they were a good part of the decoders' ~420 instructions per step
            // (ncu, docs/bench-gemm.md).
            const uint8_t* xsrc[BT / 16];
            uint32_t xdst[BT / 16], xok = 0;
#pragma unroll
            for (int i = 0; i < BT / 16; ++i) {
                const int u = (pt >> 1) + 64 * i, t = u % BT, q = 2 * (u / BT) + (pt & 1);
                const bool ok = t < rows;
                xok |= static_cast<uint32_t>(ok) << i;
                xsrc[i] = ok ? p.x8 + static_cast<int64_t>(row0 + t) * p.x_ld + q * 16 : p.x8;
                xdst[i] = static_cast<uint32_t>(L::kB + (q >> 1) * L::kBSlice + (t >> 3) * 256 + (q & 1) * 128 + (t & 7) * 16);
            }
            for (int s = 0; s < L::kRawSlots - 1; ++s) fetch(s);
            for (int ls = 0; ls < ns; ++ls) {
                const int gs = g0 + ls;   // the ring's step count (= ls for a one-tile CTA)
                const int slot = gs % ST;
                if (gs >= ST) mbar_wait(empty0 + 8u * slot, static_cast<uint32_t>((gs / ST - 1) & 1));
                const uint32_t base = smem_s + static_cast<uint32_t>(slot * L::kStage);
                // x: copy i of thread pt is pair u = pt / 2 + 64·i: token u % BT, k32 slice j = u / BT, its
                // 16-byte half pt % 2 (part q = 2·j + pt % 2 of the step). The two threads of a token and
                // slice read one whole 32-byte sector (cp.async.cg goes to L2 by sectors: one 16-byte piece
                // per token and thread, as the token-major order of wgmma_ws_kernel has it, would move
                // twice the bytes, and the 128-token tile reads ~24 KB from L2 per step, about what L2
                // gives an SM in the step's tensor time at half the FP8 rate); a quarter-warp's 8 stores
                // then fall on 4 bank groups twice (2-way).
#pragma unroll
                for (int i = 0; i < BT / 16; ++i) {
                    const bool ok = (xok >> i) & 1u;
                    cp_async16(base + xdst[i], xsrc[i] + (ok ? ls * L::kStepK : 0), ok);
                }
                if (pt < BT) cp_async4(base + static_cast<uint32_t>(L::kColScale + pt * 4), srcs + (tok ? ls : 0), tok);
                // The stage's copies are this thread's cp.asyncs so far: the arrive completes when they
                // (and the raw steps before ls + kRawSlots − 1, issued earlier) have landed.
                cp_async_mbar_arrive(full0 + 8u * slot);
                fetch(ls + L::kRawSlots - 1);
                cp_async_wait<L::kRawSlots - 1>();   // step ls's raw group (and all before it) landed

                // The row's step: the largest exponent is the row scale, each 32-block's distance below it
                // picks its table.
                uint32_t sc;
                asm volatile("ld.shared.u32 %0, [%1];" : "=r"(sc) : "r"(raw_s(ls)) : "memory");
                const uint32_t e[4] = {sc & 0xFFu, (sc >> 8) & 0xFFu, (sc >> 16) & 0xFFu, sc >> 24};
                const uint32_t er = max(max(e[0], e[1]), max(e[2], e[3]));
                asm volatile("st.shared.f32 [%0], %1;" ::"r"(base + static_cast<uint32_t>(L::kRowScale + pt * 4)),
                             "f"(w4a8::row_scale(er))
                             : "memory");
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    const uint32_t d = min(er - e[b], static_cast<uint32_t>(w4a8::kTables - 1));
                    uint32_t tlo, thi;
                    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(tlo), "=r"(thi) : "r"(tab + 8u * d));
                    uint32_t words[4];
                    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                                 : "=r"(words[0]), "=r"(words[1]), "=r"(words[2]), "=r"(words[3])
                                 : "r"(raw_w(ls, b))
                                 : "memory");
                    uint32_t o[8];
#pragma unroll
                    for (int w = 0; w < 4; ++w) w4a8::fp4x8_e4m3(words[w], tlo, thi, o[2 * w], o[2 * w + 1]);
                    // Columns 32·b .. +15 (words 0-1) and +16 .. +31 (words 2-3): the two halves of k32 slice b.
                    const uint32_t dst = base + adst + static_cast<uint32_t>(b * L::kASlice);
                    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};" ::"r"(dst), "r"(o[0]), "r"(o[1]), "r"(o[2]),
                                 "r"(o[3])
                                 : "memory");
                    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};" ::"r"(dst + 128u), "r"(o[4]), "r"(o[5]),
                                 "r"(o[6]), "r"(o[7])
                                 : "memory");
                }
                // The stores above are read by wgmma (the async proxy): a proxy fence orders them first,
                // as CUTLASS's transform warps fence before handing converted operands to the MMA.
                // (Measured on an H100, 2026-12-07, docs/bench-gemm.md: this fence, the one-way
                // release fence and none here at all were within 1.2% of each other at T = 1024 and
                // 16384, so the fence is not what holds a step at ~2 µs.)
                fence_proxy_async_smem();
                mbar_arrive(full0 + 8u * slot);
            }
        } while (tw.next(p, gi, row0, rows, G));
        asm volatile("cp.async.wait_all;" ::: "memory");
        asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
        return;
    }

    // ---- MMA warpgroups
    setmaxnreg_inc<kF8MmaRegs>();
    const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
    const int wg = warp >> 2, qw = warp & 3;
    const int r0 = wg * 64 + qw * 16 + g;   // the thread's accumulator rows: r0 (i < 2) and r0 + 8 (i ≥ 2)
    constexpr int NA = BT / 2;
    do {
        const int g0 = tw.i * ns;   // the steps of the CTA's earlier tiles (persistent)
        float acc[NA], part[NA];
#pragma unroll
        for (int i = 0; i < NA; ++i) acc[i] = part[i] = 0.0f;

        for (int ls = 0; ls < ns; ++ls) {
            const int gs = g0 + ls, slot = gs % ST;
            mbar_wait(full0 + 8u * slot, static_cast<uint32_t>((gs / ST) & 1));
            fence_proxy_async_smem();
            const uint32_t st = smem_s + static_cast<uint32_t>(slot * L::kStage);
            wgmma_fence();
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const uint64_t da = smem_desc(st + static_cast<uint32_t>(L::kA + j * L::kASlice + wg * 8 * 256), 128, 256);
                const uint64_t db = smem_desc(st + static_cast<uint32_t>(L::kB + j * L::kBSlice), 128, 256);
                wgmma_f8_m64k32<BT>(part, da, db, j);   // j = 0: part = A·B
            }
            wgmma_commit();
            wgmma_wait<0>();
#pragma unroll
            for (int i = 0; i < NA; ++i) reg_fence(part[i]);   // read only after the wait
            float rs[2];
            asm volatile("ld.shared.f32 %0, [%1];" : "=f"(rs[0]) : "r"(st + static_cast<uint32_t>(L::kRowScale + r0 * 4)));
            asm volatile("ld.shared.f32 %0, [%1];" : "=f"(rs[1]) : "r"(st + static_cast<uint32_t>(L::kRowScale + (r0 + 8) * 4)));
            // every read of the slot is done once its token scales are in registers: the decoders may refill it
            f8_promote<BT>(st + static_cast<uint32_t>(L::kColScale), tig, empty0 + 8u * slot, rs[0], rs[1], acc, part);
        }
        if (tw.last(p)) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
        f8_epilogue<EPI, BT>(p, acc, row0, rows, tw.row_tile(p), wg, qw, g, tig);
    } while (tw.next(p, gi, row0, rows, G));
}

// ---------------------------------------------------------------------------- W4A8, A from registers
//
// wgmma_rf8_kernel (Tile::wgmma_rf8_128x128, wgmma_rf8_128x32; persistent, listed groups only; MXFP4
// experts under the official numerics, moe_w4a8_fits): the products of wgmma_f8_kernel — the same
// e4m3 codes of the weights (w4a8.h: each 32-block's scale folded into its codes relative to the row's largest of the
// step, exact for ≤ 14 binades), the activation's codes and scales, the FP8 tensor core's partial
// over a step's 128 columns promoted into f32 with row scale · token scale — with the weights'
// expansion moved out of a decoding warpgroup and into the MMA warps' own registers, as the bf16
// register-A tiles (wgmma_ws_kernel) decode theirs. Why: the W4A8 tile's MMA warps waited for its one
// decoding warpgroup (ncu source counters, docs/bench-gemm.md: ~75 polls of `full` per step while
// the decoders issued ~420 instructions per warp-step: 4 warps expanding 16 K weights per step),
// and its A operand made a round trip through shared memory (16 KB of codes stored and read back per
// step). Here each of the 8 MMA warps expands its own fragments (per thread per step: 2 rows × 4
// slices, one weight word each, fp4x8_e4m3: ~10 integer ops per 8 codes), and the expansion of step
// s + 1 runs while step s's wgmmas do (two register buffers of A), so the tensor core waits on the
// decode only where both warpgroups are decoding at once.
//   CTA: 3 warpgroups, 384 threads; a tile is 128 weight rows (64 per MMA warpgroup; an L1 tile's
//   rows pair w1 / w3 as wgmma_f8_kernel's do) × BT = 128 or 32 tokens; one step = 128 columns (one
//   activation scale block, four MXFP4 32-blocks, four k32 slices). At 32 tokens (T ≈ 1024 on
//   V4-Flash: ~24 rows per expert) each expanded weight feeds 32 tokens, so the expansion weighs
//   four times as much per product: the tile the W4A8 path has there (wgmma_f8_128x32) measured
//   1.27x the register-A bf16 tile's time, decoder-bound.
//   Warpgroup 2 (producer) copies per step, with cp.async into one of kStages ring slots: the
//   128 rows' 64 weight bytes as they lie in global memory (rows 80 bytes apart: the MMA lanes' LDS.32
//   of word tig of a slice, rows g = 0..7, then fall on 32 distinct banks), each row's four e8m0
//   scales (one word), the BT tokens' 128 codes (16-byte halves of each k32 slice into the canonical
//   K-major layout of wgmma_f8_kernel: 8 tokens × 16 bytes core matrices, halves 128 B apart, token
//   groups 256 B apart) and their step scales; then cp.async.mbarrier.arrive on full[slot].
//   Warpgroups 0 and 1 (MMA): thread (warp w, lane g·4 + tig) owns tile rows r0 = 16·w + g and r0 + 8.
//   For a step: wait on full[slot]; per row the step's scale word gives the row scale (the largest
//   exponent, w4a8::row_scale) and each slice's table (its distance below it); per slice j, weight
//   word 4·j + tig of the row (columns 32·j + 8·tig .. + 7, fp4 kernel order) expands into the two
//   e4m3 words of fp8 kernel-order words 2·tig and 2·tig + 1 of the slice: A registers a0 / a2 (row
//   r0) and a1 / a3 (row r0 + 8), byte positions 4·tig .. and 16 + 4·tig .. of the slice, where the
//   activation codes come in register-A order (w4a8::ra_word; moe_layer_routed quantizes them so).
//   Then 4 wgmma m64n128k32 e4m3 (A from registers, B from the slot) into the partial (the first with
//   scale-d 0), commit; the next step's wait and expansion into the other A buffer; wait for the
//   group (keeping its A registers alive), read the step's token scales, hand the slot back on
//   empty[slot] (count 256), promote: acc += partial · row scale · token scale.
//   Registers: setmaxnreg 40 (producer) and 232 (MMA at BT = 128: 64 accumulators, 64 partials, 32 A
//   registers).
// Written without a GPU (2026-12-08): not measured; taken only when named (--config wgmma_rf8_128x128,
// wgmma_rf8_128x32).
// BT tokens per tile: 128 (prefill) or 32 (wgmma_rf8_128x32: mid-size batches, T ≈ 1024 on V4-Flash).
template <int BT> struct Rf8Layout {
    static constexpr int kRawRs = 80;                              // raw row stride: 64 weight bytes + 16
    static constexpr int kRaw = 0;                                 // [128 rows][80 B]
    static constexpr int kScale = kRaw + kF8Rows * kRawRs;         // u32 [128]: the row's 4 e8m0 exponents
    static constexpr int kB = kScale + kF8Rows * 4;                // codes [4 slices][BT/8 token groups][2 halves][8][16 B]
    static constexpr int kBSlice = BT * 32;
    static constexpr int kColScale = kB + 4 * kBSlice;             // f32 [BT]: the step's scale per token
    static constexpr int kStage = (kColScale + BT * 4 + 127) / 128 * 128;   // 27 KB (BT 128), 15 KB (BT 32)
    static constexpr int kStages = BT == 128 ? 7 : 12;             // 189 / 177 KB
    static constexpr int kTable = kStages * kStage;                // w4a8::table, kTables × 8 bytes
    static constexpr int kBars = kTable + w4a8::kTables * 8;       // full[kStages], empty[kStages]
    static constexpr int kSmem = kBars + 8 * 2 * kStages;
    static_assert(kB % 128 == 0 && kStage % 128 == 0, "wgmma operands 128-byte aligned");
    static_assert(kSmem <= 227 * 1024, "one CTA per SM");
};

// d = (scale_d ? d : 0) + A · B, m64n128k32, e4m3 × e4m3 → f32; A from registers (a0..a3: this warp's
// 16 rows, the fragment layout of mma.m16n8k32 for 8-bit types), B from a shared-memory descriptor.
__device__ __forceinline__ void wgmma_f8_ra_m64n128k32(float (&d)[64], uint32_t a0, uint32_t a1, uint32_t a2,
                                                      uint32_t a3, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64, %65, %66, %67}, %68, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(db), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_f8_ra_m64n32k32(float (&d)[16], uint32_t a0, uint32_t a1, uint32_t a2,
                                                     uint32_t a3, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k32.f32.e4m3.e4m3 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16, %17, %18, %19}, %20, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(db), "r"(scale_d));
}
template <int N>
__device__ __forceinline__ void wgmma_f8_ra_m64k32(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db, int scale_d) {
    if constexpr (N == 128) wgmma_f8_ra_m64n128k32(d, a[0], a[1], a[2], a[3], db, scale_d);
    else wgmma_f8_ra_m64n32k32(d, a[0], a[1], a[2], a[3], db, scale_d);
}

// wgmma.wait_group 0 that keeps a step's 16 A registers alive and unchanged until it (as
// wgmma_wait_keep: the wgmmas read them asynchronously).
__device__ __forceinline__ void wgmma_wait0_keep(uint32_t (&r)[4][4]) {
    asm volatile("wgmma.wait_group.sync.aligned 0;"
                 : "+r"(r[0][0]), "+r"(r[0][1]), "+r"(r[0][2]), "+r"(r[0][3]), "+r"(r[1][0]), "+r"(r[1][1]),
                   "+r"(r[1][2]), "+r"(r[1][3]), "+r"(r[2][0]), "+r"(r[2][1]), "+r"(r[2][2]), "+r"(r[2][3]),
                   "+r"(r[3][0]), "+r"(r[3][1]), "+r"(r[3][2]), "+r"(r[3][3])
                 :
                 : "memory");
}

// A thread's A fragments and row scales of one step, from the ring slot at shared address st: rows r0
// (h = 0) and r0 + 8 (h = 1), whose raw weight word tig of slice 0 is at st + raw and whose scale word
// is at st + sc. A[j] feeds the wgmma of k32 slice j: {a0, a1, a2, a3} = {row r0's first word,
// row r0 + 8's first, row r0's second, row r0 + 8's second} of fp4x8_e4m3.
__device__ __forceinline__ void rf8_decode(uint32_t st, uint32_t raw, uint32_t sc, uint32_t tab, uint32_t (&A)[4][4],
                                           float (&rs)[2]) {
    constexpr int kRawRs = Rf8Layout<128>::kRawRs;   // the same rows for both token counts
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        uint32_t s;
        asm volatile("ld.shared.u32 %0, [%1];" : "=r"(s) : "r"(st + sc + 32u * h) : "memory");   // 8 rows × 4 B on
        const uint32_t e[4] = {s & 0xFFu, (s >> 8) & 0xFFu, (s >> 16) & 0xFFu, s >> 24};
        const uint32_t er = max(max(e[0], e[1]), max(e[2], e[3]));
        rs[h] = w4a8::row_scale(er);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const uint32_t d = min(er - e[j], static_cast<uint32_t>(w4a8::kTables - 1));
            uint32_t tlo, thi, q;
            asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(tlo), "=r"(thi) : "r"(tab + 8u * d));
            asm volatile("ld.shared.u32 %0, [%1];"
                         : "=r"(q)
                         : "r"(st + raw + static_cast<uint32_t>(8 * kRawRs * h + 16 * j))
                         : "memory");
            uint32_t w0, w1;
            w4a8::fp4x8_e4m3(q, tlo, thi, w0, w1);
            A[j][h] = w0;
            A[j][2 + h] = w1;
        }
    }
}

template <int EPI, int BT>
static __global__ void __launch_bounds__(kWsThreads, 1) wgmma_rf8_kernel(const TiledParams p) {
    using L = Rf8Layout<BT>;
    static_assert(BT == 128 || BT == 32, "wgmma wrappers exist for N = 128 and 32");
    constexpr int ST = L::kStages, NA = BT / 2;
    constexpr bool kPair = EPI == kEpiSwiglu;
    static_assert(EPI != kEpiBf16, "the W4A8 tile serves the expert layer: h (SwiGLU) or f32 rows");
    extern __shared__ __align__(128) uint8_t smem[];

    const int tid = static_cast<int>(threadIdx.x);
    const uint32_t smem_s = smem_addr(smem);
    const uint32_t full0 = smem_s + static_cast<uint32_t>(L::kBars), empty0 = full0 + 8u * ST;
    f8_init<ST>(smem, L::kTable, full0, empty0, kWsProducers);   // full: each producer thread's copies of the step
    __syncthreads();

    int gi, row0, rows;
    GemmGroup G;
    TileWalk<BT, true> tw;
    if (!tw.first(p, gi, row0, rows, G)) return;   // the whole CTA: the walk is per CTA
    const int ns = p.steps;

    auto phys_row = [](int rt, int r, int& m, int& row) { f8_phys_row<kPair>(rt, r, m, row); };

    if (tid >= kWsConsumers) {
        // ---- producer warpgroup
        setmaxnreg_dec<kWsProducerRegs>();
        const int pt = tid - kWsConsumers;   // tile row of its scale word, token of its step scale
        do {
            const int g0 = tw.i * ns;   // the steps of the CTA's earlier tiles
            const int rt = tw.row_tile(p);
            int m, row;
            phys_row(rt, pt, m, row);
            const bool sok = row < p.N;
            const uint8_t* srow = sok ? (m ? G.s[1] : G.s[0]) + static_cast<int64_t>(row) * p.s_row_bytes : G.s[0];
            // Codes: this thread copies half xh of k32 slices of tokens: BT = 128, every slice of tokens xt
            // and xt + 64; BT = 32, slices j0 and j0 + 2 of token xt (a quarter-warp writes 4 tokens × both
            // halves: 8 distinct 16-byte bank groups; the two threads of a token read one 32-byte sector).
            const int xh = pt & 1, xt = BT == 128 ? pt >> 1 : (pt >> 1) & 31, j0 = BT == 128 ? 0 : pt >> 6;
            const int xt1 = BT == 128 ? xt + 64 : xt;   // the second token (BT = 32: the same one)
            const bool xok0 = xt < rows, xok1 = xt1 < rows;
            const uint8_t* x0 = xok0 ? p.x8 + static_cast<int64_t>(row0 + xt) * p.x_ld + xh * 16 + j0 * 32 : p.x8;
            const uint8_t* x1 = xok1 ? p.x8 + static_cast<int64_t>(row0 + xt1) * p.x_ld + xh * 16 + j0 * 32 : p.x8;
            const uint32_t xd = static_cast<uint32_t>(L::kB + j0 * L::kBSlice + (xt >> 3) * 256 + xh * 128 + (xt & 7) * 16);
            const bool cok = pt < rows && pt < BT;
            const float* csrc = cok ? p.xs8 + static_cast<int64_t>(row0 + pt) * p.xs_ld : p.xs8;
            for (int ls = 0; ls < ns; ++ls) {
                const int gs = g0 + ls, slot = gs % ST;
                if (gs >= ST) mbar_wait(empty0 + 8u * slot, static_cast<uint32_t>((gs / ST - 1) & 1));
                const uint32_t base = smem_s + static_cast<uint32_t>(slot * L::kStage);
                // Weight chunk i: tile row (pt >> 2) + 32·i, 16-byte part pt & 3 of its step. (Not unrolled:
                // the producer has 40 registers.)
#pragma unroll 1
                for (int i = 0; i < 4; ++i) {
                    const int r = (pt >> 2) + 32 * i;
                    int mw, rw;
                    phys_row(rt, r, mw, rw);
                    const bool ok = rw < p.N;
                    const uint8_t* src = ok ? (mw ? G.w[1] : G.w[0]) + static_cast<int64_t>(rw) * p.w_row_bytes +
                                                  ls * kStepBytes + (pt & 3) * 16
                                            : G.w[0];
                    cp_async16(base + static_cast<uint32_t>(L::kRaw + r * L::kRawRs + (pt & 3) * 16), src, ok);
                }
                cp_async4(base + static_cast<uint32_t>(L::kScale + pt * 4), srow + (sok ? ls * 4 : 0), sok);
                if constexpr (BT == 128) {
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        cp_async16(base + xd + static_cast<uint32_t>(j * L::kBSlice), x0 + (xok0 ? ls * 128 + j * 32 : 0),
                                   xok0);
                        cp_async16(base + xd + static_cast<uint32_t>(8 * 256 + j * L::kBSlice),
                                   x1 + (xok1 ? ls * 128 + j * 32 : 0), xok1);
                    }
                } else {   // slices j0 and j0 + 2 of token xt
                    cp_async16(base + xd, x0 + (xok0 ? ls * 128 : 0), xok0);
                    cp_async16(base + xd + static_cast<uint32_t>(2 * L::kBSlice), x1 + (xok1 ? ls * 128 + 64 : 0), xok1);
                }
                if (pt < BT) cp_async4(base + static_cast<uint32_t>(L::kColScale + pt * 4), csrc + (cok ? ls : 0), cok);
                cp_async_mbar_arrive(full0 + 8u * slot);
            }
        } while (tw.next(p, gi, row0, rows, G));
        asm volatile("cp.async.wait_all;" ::: "memory");
        asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
        return;
    }

    // ---- MMA warpgroups
    setmaxnreg_inc<kWsConsumerRegs>();
    const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
    const int wg = warp >> 2, qw = warp & 3;
    const int r0 = wg * 64 + qw * 16 + g;   // the thread's rows: r0 (accumulators i < 2) and r0 + 8 (i ≥ 2)
    const uint32_t tab = smem_s + static_cast<uint32_t>(L::kTable);
    const uint32_t raw = static_cast<uint32_t>(L::kRaw + r0 * L::kRawRs + tig * 4);
    const uint32_t sc = static_cast<uint32_t>(L::kScale + r0 * 4);
    do {
        const int g0 = tw.i * ns;   // the steps of the CTA's earlier tiles
        float acc[NA], part[NA];
#pragma unroll
        for (int i = 0; i < NA; ++i) acc[i] = part[i] = 0.0f;
        uint32_t a[2][4][4];   // [buffer][k32 slice][register]
        float rs[2][2];        // [buffer][row r0, r0 + 8]
        {
            const int slot = g0 % ST;
            mbar_wait(full0 + 8u * slot, static_cast<uint32_t>((g0 / ST) & 1));
            fence_proxy_async_smem();   // the slot's codes came by cp.async; the wgmmas read them (async proxy)
            rf8_decode(smem_s + static_cast<uint32_t>(slot * L::kStage), raw, sc, tab, a[0], rs[0]);
        }
        // Step ls with A buffer B (a compile-time index: the loop below takes steps in pairs).
        auto step = [&](auto bc, int ls) {
            constexpr int B = decltype(bc)::value;
            const int gs = g0 + ls, slot = gs % ST;
            const uint32_t st = smem_s + static_cast<uint32_t>(slot * L::kStage);
            wgmma_fence();
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const uint64_t db = smem_desc(st + static_cast<uint32_t>(L::kB + j * L::kBSlice), 128, 256);
                wgmma_f8_ra_m64k32<BT>(part, a[B][j], db, j);   // j = 0: part = A·B
            }
            wgmma_commit();
            if (ls + 1 < ns) {   // the next step's fragments while these wgmmas run
                const int gn = gs + 1, sn = gn % ST;
                mbar_wait(full0 + 8u * sn, static_cast<uint32_t>((gn / ST) & 1));
                fence_proxy_async_smem();
                rf8_decode(smem_s + static_cast<uint32_t>(sn * L::kStage), raw, sc, tab, a[B ^ 1], rs[B ^ 1]);
            }
            wgmma_wait0_keep(a[B]);
#pragma unroll
            for (int i = 0; i < NA; ++i) reg_fence(part[i]);   // read only after the wait
            // every read of the slot is done once its token scales are in registers: the producer may refill it
            f8_promote<BT>(st + static_cast<uint32_t>(L::kColScale), tig, empty0 + 8u * slot, rs[B][0], rs[B][1], acc,
                           part);
        };
        for (int ls = 0; ls < ns; ls += 2) {
            step(std::integral_constant<int, 0>{}, ls);
            if (ls + 1 < ns) step(std::integral_constant<int, 1>{}, ls + 1);
        }
        if (tw.last(p)) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
        f8_epilogue<EPI, BT>(p, acc, row0, rows, tw.row_tile(p), wg, qw, g, tig);
    } while (tw.next(p, gi, row0, rows, G));
}

// y[i] = Σ_{z < S} part[z][i] in order z = 0, 1, ... (deterministic), as f32 or rounded to bf16.
static __global__ void __launch_bounds__(256) reduce_split_kernel(const float* part, int64_t n, int S, void* y,
                                                                  bool out_bf16) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x; i < n; i += static_cast<int64_t>(gridDim.x) * 256) {
        float v = part[i];
        for (int z = 1; z < S; ++z) v = __fadd_rn(v, part[z * n + i]);
        if (out_bf16) static_cast<__nv_bfloat16*>(y)[i] = __float2bfloat16_rn(v);
        else static_cast<float*>(y)[i] = v;
    }
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// Column k of a step that slot s of its k16 slice j holds for wgmma_kernel (see above): lane tig's
// word l = j / 2 holds columns tig·kE + 8·l .. + 7; its A registers of slice j = 2l + i hold the
// pairs (4i, 4i + 1) at slots 2·tig and (4i + 2, 4i + 3) at slots 8 + 2·tig.
__host__ __device__ constexpr int wgmma_column(int kE, int j, int s) {
    return ((s & 7) >> 1) * kE + (j >> 1) * 8 + 4 * (j & 1) + 2 * (s >> 3) + (s & 1);
}

// x rows permuted in place (in == out allowed) or out of place into wgmma_kernel's column order:
// out[r, b·kStepK + p] = in[r, b·kStepK + wgmma_column(p)] for every kStepK block b of `cols`.
// One warp per block: the block goes through shared memory, so in-place is safe.
static __global__ void __launch_bounds__(256) permute_x_kernel(const uint16_t* in, int64_t in_ld, uint16_t* out,
                                                               int64_t out_ld, int64_t rows, int64_t cols, int kE) {
    __shared__ __align__(16) uint32_t buf[8][64];   // one 256-byte block per warp
    const int kStepK = 4 * kE, words = kStepK / 2, chunks = kStepK / 8;
    const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
    asm volatile("griddepcontrol.wait;" ::: "memory");
    const int64_t blocks_per_row = cols / kStepK, n = rows * blocks_per_row;
    for (int64_t b = static_cast<int64_t>(blockIdx.x) * 8 + warp; b < n; b += static_cast<int64_t>(gridDim.x) * 8) {
        const int64_t r = b / blocks_per_row, c0 = (b - r * blocks_per_row) * kStepK;
        const uint32_t* src = reinterpret_cast<const uint32_t*>(in + r * in_ld + c0);
        for (int w = lane; w < words; w += 32) buf[warp][w] = src[w];
        __syncwarp();
        if (lane < chunks) {
            const int j = lane >> 1, hi = lane & 1;
            uint32_t v[4];
#pragma unroll
            for (int t = 0; t < 4; ++t) v[t] = buf[warp][wgmma_column(kE, j, hi * 8 + 2 * t) >> 1];
            *reinterpret_cast<uint4*>(out + r * out_ld + c0 + lane * 8) = make_uint4(v[0], v[1], v[2], v[3]);
        }
        __syncwarp();
    }
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
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

// The instantiated mma.sync shapes, in Tile order. Per step per warp: MT decodes, NT x loads,
// 2·MT·NT MMAs per 32 columns of a lane's chunk. Decode shapes keep more steps in flight (the
// weights stream from HBM once); prefill shapes reuse each decoded fragment NT times.
#define MEGAMOE_TILED_CONFIGS(X) \
    X(mma_128x8, 2, 1, 4, 1, 3)        /* 4 warps: decode, few tokens per expert; no duplicate decode. */ \
                                       /* 3 stages: 5 CTAs (20 warps) per SM; 6 stages (2 CTAs) was 15-20% */ \
                                       /* slower on H200 (instruction-issue bound, more warps hide more latency) */ \
    X(mma_128x16, 2, 2, 4, 1, 4)       /* 4 warps; experts at 7-12 rows each (choose_grouped) */ \
    X(mma_256x64, 4, 4, 4, 2, 4) \
    X(mma_128x128, 4, 4, 2, 4, 4) \
    X(mma_128x128_nt8, 2, 8, 4, 2, 3)  /* NT = 8: half the decode work per MMA */ \
    X(mma_256x128, 4, 8, 4, 2, 3) \
    X(mma_256x32, 2, 4, 8, 1, 3)       /* 12-31, 49-60 rows per expert: 8 warps of 32 rows x 32 tokens, each decoded */ \
                                       /* fragment feeding 4 token tiles; 2 CTAs per SM (16 warps). On an */ \
                                       /* H100 a 4-stage ring and a 4-warp 128x32 tile were slower */ \
                                       /* (choose_grouped) */ \
    X(mma_256x48, 2, 6, 8, 1, 3)       /* 31-48 rows per expert: one 48-token tile where mma_256x32 */ \
                                       /* needs two. Held to 128 registers for two CTAs per SM it spills */ \
                                       /* (ptxas: 32-68 spill stores per instance); at one CTA per SM */ \
                                       /* with 4 stages it was slower still (choose_grouped) */

constexpr TiledConfig kConfigs[] = {
#define MEGAMOE_ROW(tile, mt, nt, wr, wt, st) {Tile::tile, #tile, mt, nt, wr, wt, (wr) * (mt) * 16, (wt) * (nt) * 8, st},
    MEGAMOE_TILED_CONFIGS(MEGAMOE_ROW)
#undef MEGAMOE_ROW
    // wgmma_kernel, 128 tokens (x in wgmma column order; stages by format)
    {Tile::wgmma_256x128, "wgmma_256x128", 2, 16, 8, 1, kWgRows, 128, 0},
    // wgmma_kernel, 32 tokens (more weight bytes in flight)
    {Tile::wgmma_256x32, "wgmma_256x32", 2, 4, 8, 1, kWgRows, 32, 0},
    // wgmma_ws_kernel: the same consumer shapes (8 warps) plus a producer warpgroup (kWsThreads in all)
    {Tile::wgmma_ws_256x128, "wgmma_ws_256x128", 2, 16, 8, 1, kWgRows, 128, 0},
    {Tile::wgmma_ws_256x32, "wgmma_ws_256x32", 2, 4, 8, 1, kWgRows, 32, 0},
    // wgmma_f8_kernel: 8 MMA warps (m64nNk32 e4m3, A and B from shared memory) plus a decoding warpgroup
    {Tile::wgmma_f8_128x128, "wgmma_f8_128x128", 1, 16, 8, 1, kF8Rows, 128, 0},
    {Tile::wgmma_f8_128x32, "wgmma_f8_128x32", 1, 4, 8, 1, kF8Rows, 32, 0},
    // wgmma_kernel, 32 tokens, two CTAs per SM (a 4-stage ring each)
    {Tile::wgmma_2cta_256x32, "wgmma_2cta_256x32", 2, 4, 8, 1, kWgRows, 32, 0},
    // the persistent forms of wgmma_ws_256x128, wgmma_f8_128x128 and wgmma_f8_128x32 (TileWalk)
    {Tile::wgmma_pws_256x128, "wgmma_pws_256x128", 2, 16, 8, 1, kWgRows, 128, 0},
    {Tile::wgmma_pf8_128x128, "wgmma_pf8_128x128", 1, 16, 8, 1, kF8Rows, 128, 0},
    {Tile::wgmma_pf8_128x32, "wgmma_pf8_128x32", 1, 4, 8, 1, kF8Rows, 32, 0},
    // wgmma_rf8_kernel: 8 MMA warps (m64nNk32 e4m3, A from registers) plus a producer warpgroup; persistent
    {Tile::wgmma_rf8_128x128, "wgmma_rf8_128x128", 1, 16, 8, 1, kF8Rows, 128, 0},
    {Tile::wgmma_rf8_128x32, "wgmma_rf8_128x32", 1, 4, 8, 1, kF8Rows, 32, 0},
};
constexpr int kNumConfigs = static_cast<int>(sizeof(kConfigs) / sizeof(kConfigs[0]));
constexpr bool configs_in_tile_order() {
    for (int i = 0; i < kNumConfigs; ++i)
        if (static_cast<int>(kConfigs[i].tile) != i) return false;
    return true;
}
static_assert(configs_in_tile_order(), "kConfigs[i] must describe Tile i");

bool is_ws(Tile c) { return c == Tile::wgmma_ws_256x128 || c == Tile::wgmma_ws_256x32 || c == Tile::wgmma_pws_256x128; }
bool is_wg(Tile c) {
    return c == Tile::wgmma_256x128 || c == Tile::wgmma_256x32 || c == Tile::wgmma_2cta_256x32 || is_ws(c);
}
// The W4A8 tiles: MXFP4 weights × FP8 activation codes, on moe_layer_routed's official-numerics path
// only (moe_w4a8_fits); everywhere else a call that names one runs f8_fallback's register-A tile of
// the same token count (the same work list).
// The register-A W4A8 tiles (wgmma_rf8_kernel): their activation codes in register-A order (w4a8::ra_word).
bool is_rf8(Tile c) { return c == Tile::wgmma_rf8_128x128 || c == Tile::wgmma_rf8_128x32; }
bool is_f8(Tile c) {
    return c == Tile::wgmma_f8_128x128 || c == Tile::wgmma_f8_128x32 || c == Tile::wgmma_pf8_128x128 ||
           c == Tile::wgmma_pf8_128x32 || is_rf8(c);
}
// What a W4A8 tile runs as where it does not apply: the register-A wgmma tile of the same token
// count (the same work list), persistent where one is instantiated.
Tile f8_fallback(Tile c) {
    if (c == Tile::wgmma_f8_128x32 || c == Tile::wgmma_pf8_128x32 || c == Tile::wgmma_rf8_128x32) return Tile::wgmma_256x32;
    return c == Tile::wgmma_pf8_128x128 || c == Tile::wgmma_rf8_128x128 ? Tile::wgmma_pws_256x128
                                                                        : Tile::wgmma_ws_256x128;
}
// The persistent tiles (TileWalk): listed groups only; a dense call runs one_tile_form(c).
bool is_persistent(Tile c) {
    return c == Tile::wgmma_pws_256x128 || c == Tile::wgmma_pf8_128x128 || c == Tile::wgmma_pf8_128x32 ||
           is_rf8(c);
}
Tile one_tile_form(Tile c) {
    switch (c) {
        case Tile::wgmma_pws_256x128: return Tile::wgmma_ws_256x128;
        case Tile::wgmma_pf8_128x128: return Tile::wgmma_f8_128x128;
        case Tile::wgmma_pf8_128x32: return Tile::wgmma_f8_128x32;
        default: return c;
    }
}

// A forced tile (or automatic) that names a shape; throws otherwise.
void check_tile(Tile c) {
    const int i = static_cast<int>(c);
    MEGAMOE_CHECK(i >= -1 && i < kNumConfigs, "tiled linear: tile ", i, " does not exist");
}
const TiledConfig& cfg(Tile c) {
    const int i = static_cast<int>(c);
    MEGAMOE_CHECK(i >= 0 && i < kNumConfigs, "tiled linear: tile ", i, " names no kernel shape");
    return kConfigs[i];
}

// Threads per CTA of a shape: its warps, plus the producer warpgroup of the warp-specialized ones.
unsigned threads_of(Tile c) {
    if (is_ws(c) || is_f8(c)) return kWsThreads;
    const TiledConfig& t = cfg(c);
    return static_cast<unsigned>(t.wr * t.wt * 32);
}

using TiledKernel = void (*)(TiledParams);

template <LinearFormat F, int EPI> TiledKernel pick_cfg(Tile c) {
    switch (c) {
#define MEGAMOE_CASE(tile, mt, nt, wr, wt, st) case Tile::tile: return tiled_kernel<F, mt, nt, wr, wt, st, EPI>;
        MEGAMOE_TILED_CONFIGS(MEGAMOE_CASE)
#undef MEGAMOE_CASE
        default: break;
    }
    fail("tiled linear: no mma.sync kernel for tile ", static_cast<int>(c));
}

template <LinearFormat F> int smem_of(Tile c) {
    switch (c) {
#define MEGAMOE_CASE(tile, mt, nt, wr, wt, st) case Tile::tile: return TileLayout<F, mt, nt, wr, wt, st>::kSmem;
        MEGAMOE_TILED_CONFIGS(MEGAMOE_CASE)
#undef MEGAMOE_CASE
        default: break;
    }
    fail("tiled linear: no mma.sync kernel for tile ", static_cast<int>(c));
}

// WS: the warp-specialized kernel; CPS: CTAs per SM of wgmma_kernel (1, or 2 for wgmma_2cta_256x32).
template <LinearFormat F, int BT, bool WS, int CPS = 1> TiledKernel wg_kernel_for(int epi, int& smem) {
    static_assert(!WS || CPS == 1, "the warp-specialized kernel runs one CTA per SM");
    smem = WS ? WsLayout<F, BT>::kSmem : WgLayout<F, BT, CPS>::kSmem;
    if constexpr (F == LinearFormat::mxfp4 || F == LinearFormat::nvfp4)
        if (epi == kEpiSwiglu) return WS ? wgmma_ws_kernel<F, kEpiSwiglu, BT> : wgmma_kernel<F, kEpiSwiglu, BT, CPS>;
    MEGAMOE_CHECK(epi != kEpiSwiglu, "wgmma linear: no SwiGLU epilogue for ", linear_format_name(F));
    if (epi == kEpiBf16) return WS ? wgmma_ws_kernel<F, kEpiBf16, BT> : wgmma_kernel<F, kEpiBf16, BT, CPS>;
    return WS ? wgmma_ws_kernel<F, kEpiF32, BT> : wgmma_kernel<F, kEpiF32, BT, CPS>;
}
// wgmma_pws_256x128: the expert layer's formats and epilogues only (h of a SwiGLU pair, f32 rows),
// the instances a grouped call can ask for.
template <LinearFormat F> TiledKernel pws_kernel_for(int epi, int& smem) {
    if constexpr (F == LinearFormat::mxfp4 || F == LinearFormat::nvfp4) {
        smem = WsLayout<F, 128>::kSmem;
        if (epi == kEpiSwiglu) return wgmma_ws_kernel<F, kEpiSwiglu, 128, true>;
        if (epi == kEpiF32) return wgmma_ws_kernel<F, kEpiF32, 128, true>;
    }
    fail("wgmma_pws_256x128: grouped NVFP4 / MXFP4 layers with h or f32 rows only, not ", linear_format_name(F),
         epi == kEpiBf16 ? " with bf16 y" : "");
}

template <LinearFormat F> TiledKernel wg_kernel_for(Tile c, int epi, int& smem) {
    switch (c) {
        case Tile::wgmma_256x128: return wg_kernel_for<F, 128, false>(epi, smem);
        case Tile::wgmma_256x32: return wg_kernel_for<F, 32, false>(epi, smem);
        case Tile::wgmma_2cta_256x32: return wg_kernel_for<F, 32, false, 2>(epi, smem);
        case Tile::wgmma_ws_256x128: return wg_kernel_for<F, 128, true>(epi, smem);
        case Tile::wgmma_pws_256x128: return pws_kernel_for<F>(epi, smem);
        default: return wg_kernel_for<F, 32, true>(epi, smem);
    }
}

TiledKernel tiled_kernel_for(LinearFormat f, int epi, Tile c, int& smem) {
    if (is_f8(c)) {
        MEGAMOE_CHECK(f == LinearFormat::mxfp4 && epi != kEpiBf16, "wgmma_f8: MXFP4 expert layers only, not ",
                      linear_format_name(f), epi == kEpiBf16 ? " with bf16 y" : "");
        const bool sw = epi == kEpiSwiglu, pe = is_persistent(c);
        if (c == Tile::wgmma_rf8_128x128) {
            smem = Rf8Layout<128>::kSmem;
            return sw ? wgmma_rf8_kernel<kEpiSwiglu, 128> : wgmma_rf8_kernel<kEpiF32, 128>;
        }
        if (c == Tile::wgmma_rf8_128x32) {
            smem = Rf8Layout<32>::kSmem;
            return sw ? wgmma_rf8_kernel<kEpiSwiglu, 32> : wgmma_rf8_kernel<kEpiF32, 32>;
        }
        if (cfg(c).tokens == 32) {
            smem = F8Layout<32>::kSmem;
            if (pe) return sw ? wgmma_f8_kernel<kEpiSwiglu, 32, true> : wgmma_f8_kernel<kEpiF32, 32, true>;
            return sw ? wgmma_f8_kernel<kEpiSwiglu, 32> : wgmma_f8_kernel<kEpiF32, 32>;
        }
        smem = F8Layout<128>::kSmem;
        if (pe) return sw ? wgmma_f8_kernel<kEpiSwiglu, 128, true> : wgmma_f8_kernel<kEpiF32, 128, true>;
        return sw ? wgmma_f8_kernel<kEpiSwiglu, 128> : wgmma_f8_kernel<kEpiF32, 128>;
    }
    if (is_wg(c)) {
        switch (f) {
            case LinearFormat::bf16: return wg_kernel_for<LinearFormat::bf16>(c, epi, smem);
            case LinearFormat::fp8_block: return wg_kernel_for<LinearFormat::fp8_block>(c, epi, smem);
            case LinearFormat::mxfp4: return wg_kernel_for<LinearFormat::mxfp4>(c, epi, smem);
            case LinearFormat::nvfp4: return wg_kernel_for<LinearFormat::nvfp4>(c, epi, smem);
            default: fail("wgmma linear: no kernel for ", linear_format_name(f));
        }
    }
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

// Split-K of a grouped decode launch (mma_128x8) over a cluster of 2 CTAs: at one token per expert
// the layer is a few hundred 4-warp CTAs each streaming a 128-row tile over the whole K, so most
// SMs hold one or two of them and wait on memory. Measured on an H200 (megamoe-gemm-bench --part
// experts --model flash, whole layer): T = 1 NVFP4 54.4 µs with two halves of K against 59.9
// unsplit, MXFP4 53.8 against 62.2; three or four parts 58-59 µs; at T = 2 (twice the CTAs) two
// parts were slower (83.9 against 81.6). So: two parts when the launch has at most 2 CTAs per SM
// and at least 16 steps.
int64_t decode_split(Tile c, int64_t ctas, int64_t steps) {
    if (c != Tile::mma_128x8 || steps < 16) return 1;
    return ctas <= 2 * sm_count() ? 2 : 1;
}

static_assert(kConfigs[static_cast<int>(Tile::mma_256x32)].mt == 2 && kConfigs[static_cast<int>(Tile::mma_256x32)].nt == 4 &&
                  kConfigs[static_cast<int>(Tile::mma_256x32)].wr == 8 && kConfigs[static_cast<int>(Tile::mma_256x32)].wt == 1 &&
                  kConfigs[static_cast<int>(Tile::mma_256x32)].stages == 3 &&
                  kConfigs[static_cast<int>(Tile::mma_256x48)].mt == 2 && kConfigs[static_cast<int>(Tile::mma_256x48)].nt == 6 &&
                  kConfigs[static_cast<int>(Tile::mma_256x48)].wr == 8 && kConfigs[static_cast<int>(Tile::mma_256x48)].wt == 1 &&
                  kConfigs[static_cast<int>(Tile::mma_256x48)].stages == 3,
              "skip_dead_kernel_for instantiates mma_256x32 and mma_256x48 by their shapes");
// The kSkipDead instances of tiled_kernel (TiledParams::skip_dead): mma_256x32 and mma_256x48,
// the expert layer's formats and epilogues; null for any other tile.
template <LinearFormat F> TiledKernel skip_dead_kernel_for(Tile c, int epi) {
    if constexpr (F == LinearFormat::nvfp4 || F == LinearFormat::mxfp4) {
        if (epi == kEpiBf16) return nullptr;
        const bool sw = epi == kEpiSwiglu;
        if (c == Tile::mma_256x32)
            return sw ? tiled_kernel<F, 2, 4, 8, 1, 3, kEpiSwiglu, true> : tiled_kernel<F, 2, 4, 8, 1, 3, kEpiF32, true>;
        if (c == Tile::mma_256x48)
            return sw ? tiled_kernel<F, 2, 6, 8, 1, 3, kEpiSwiglu, true> : tiled_kernel<F, 2, 6, 8, 1, 3, kEpiF32, true>;
    }
    return nullptr;
}

void launch_tiled(LinearFormat f, int epi, Tile c, const TiledParams& p, unsigned grid_x, unsigned grid_y,
                  cudaStream_t stream, unsigned grid_z = 1) {
    int smem = 0;
    TiledKernel k = tiled_kernel_for(f, epi, c, smem);
    if (p.skip_dead && p.items != nullptr) {   // the same shape and shared memory, its skip instance
        const TiledKernel ks = f == LinearFormat::nvfp4   ? skip_dead_kernel_for<LinearFormat::nvfp4>(c, epi)
                               : f == LinearFormat::mxfp4 ? skip_dead_kernel_for<LinearFormat::mxfp4>(c, epi)
                                                          : nullptr;
        if (ks != nullptr) k = ks;
    }
    raise_dynamic_smem(reinterpret_cast<const void*>(k), static_cast<size_t>(smem));
    const TiledConfig& t = cfg(c);
    const unsigned threads = threads_of(c);
    cudaError_t err;
    if (grid_z > 1 && !is_wg(c) && !is_f8(c)) {
        // The mma.sync tiles split K over a cluster of grid_z CTAs (partials reduced in its shared memory).
        cudaLaunchConfig_t lc = {};
        lc.gridDim = dim3(grid_x, grid_y, grid_z);
        lc.blockDim = dim3(threads);
        lc.dynamicSmemBytes = static_cast<size_t>(smem);
        lc.stream = stream;
        cudaLaunchAttribute attr[2];
        attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[0].val.programmaticStreamSerializationAllowed = 1;
        attr[1].id = cudaLaunchAttributeClusterDimension;
        attr[1].val.clusterDim.x = 1;
        attr[1].val.clusterDim.y = 1;
        attr[1].val.clusterDim.z = grid_z;
        lc.attrs = attr;
        lc.numAttrs = 2;
        err = cudaLaunchKernelEx(&lc, k, p);
    } else {
        err = launch_pdl(k, dim3(grid_x, grid_y, grid_z), dim3(threads),
                         static_cast<size_t>(smem), stream, p);
    }
    if (err != cudaSuccess) {
        (void)cudaGetLastError();
        fail(__FILE__, ":", __LINE__, ": tiled linear launch (", t.name, ", grid ", grid_x, "x", grid_y, ", smem ", smem,
             "): ", cudaGetErrorString(err));
    }
}

// Weights per 16-byte load (Traits<F>::kElems on the device) for the host; f32 has no tiled kernel.
int elems_of(LinearFormat f) {
    if (f == LinearFormat::f32) fail("tiled linear: no kernel for ", linear_format_name(f));
    return 128 / format_info(f).weight_bits;
}
int step_cols(LinearFormat f) { return 4 * elems_of(f); }

// x [rows, cols] (row stride in_ld) into wgmma column order (out may equal in).
void launch_permute(LinearFormat f, const uint16_t* in, int64_t in_ld, uint16_t* out, int64_t out_ld, int64_t rows,
                    int64_t cols, cudaStream_t stream) {
    const int64_t blocks = rows * (cols / step_cols(f));
    const unsigned grid = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(blocks, 8), 4 * 8 * sm_count())));
    CUDA_CHECK(launch_pdl(permute_x_kernel, dim3(grid), dim3(256), 0, stream, in, in_ld, out, out_ld, rows, cols,
                          elems_of(f)));
}

// Tile for a dense (uniform) call: the largest tile that still gives at least one CTA per SM,
// else the one with the most CTAs (small problems are latency-bound; more CTAs = more loads in flight).
Tile choose_dense(int64_t N, int64_t M, int64_t groups, bool wgmma_ok) {
    if (wgmma_ok) return Tile::wgmma_256x128;   // decodes each weight once per 128 tokens; split-K fills the GPU
    const int64_t sms = sm_count();
    Tile best = Tile::mma_128x8;
    int64_t best_ctas = -1;
    for (Tile c : {Tile::mma_256x128, Tile::mma_128x128_nt8, Tile::mma_128x16, Tile::mma_128x8}) {
        const TiledConfig& t = cfg(c);
        if (c != Tile::mma_128x8 && t.tokens >= 2 * M) continue;   // at most half the token tile wasted
        const int64_t ctas = ceil_div(N, t.rows) * ceil_div(M, t.tokens) * groups;
        if (ctas >= sms) return c;
        if (ctas > best_ctas) best = c, best_ctas = ctas;
    }
    return best;
}

// Tile for the grouped expert GEMMs from the mean rows per expert (no device sync).
Tile choose_grouped(int64_t N, int64_t E) {   // the same rule for NVFP4 and MXFP4 (measured)
    const double mean = static_cast<double>(N) / static_cast<double>(std::min<int64_t>(E, std::max<int64_t>(N, 1)));
    // Up to 12 rows per expert: stream the weights, 8- or 16-token tiles on mma.sync (4 warps). NVIDIA
    // H100 80GB HBM3, 2026-12-07, one machine, megamoe-gemm-bench --part experts --format nvfp4,mxfp4
    // --no-check --config C, µs per layer NVFP4 | MXFP4, mma_128x8 / mma_128x16 / mma_256x32, (rows per expert):
    //   Flash T = 192 (4.5)   1485 / 1581 / 1726 | 1301 / 1439 / 1698
    //   Flash T = 256 (6)     1529 / 1633 / 1794 | 1365 / 1537 / 1746
    //   Flash T = 320 (7.5)   1644 / 1663 / 1795 | 1581 / 1509 / 1763
    //   Pro   T = 512 (8)     6704 / 6317 / 6506 | 6226 / 5937 / 6247
    //   Flash T = 384 (9)     1879 / 1676 / 1800 | 1822 / 1564 / 1761
    //   Flash T = 448 (10.5)  2119 / 1724 / 1836 | 2069 / 1629 / 1779
    //   Flash T = 512 (12)    2300 / 1816 / 1844 | 2251 / 1707 / 1775
    //   Pro   T = 768 (12)   10103 / 7863 / 8078 | 10076 / 7504 / 7824
    //   Flash T = 576 (13.5)  2519 / 1913 / 1848 | 2465 / 1811 / 1794
    //   Flash T = 640 (15)    2621 / 2082 / 1871 | 2584 / 1990 / 1816
    // (before: mma_128x8 up to 12 rows, 27% slower than mma_128x16 at Flash T = 512).
    if (mean <= 7) return Tile::mma_128x8;
    if (mean <= 12) return Tile::mma_128x16;
    // T ≈ 512-2048: 32-token tiles on mma.sync, 8 warps, two CTAs per SM. NVIDIA H100 80GB HBM3,
    // 2026-12-07, megamoe-gemm-bench --part experts --format nvfp4,mxfp4 --T 512,1024,2048 --no-check
    // --config C, one machine, µs per layer, wgmma_256x32 / wgmma_2cta_256x32 / mma_256x32:
    //   Flash NVFP4 T = 512  1907.4 / 1941.9 / 1796.4,  1024  2198.9 / 2214.0 / 2081.0,  2048  4109.4 / 3862.8 / 3756.2
    //   Flash MXFP4 T = 512  2100.8 / 1923.9 / 1764.7,  1024  2328.1 / 2164.5 / 2016.7,  2048  4340.1 / 3912.9 / 3615.3
    //   Pro (T = 1024)  NVFP4 6916.9 / 7413.6 / 6888.9,  MXFP4 8034.2 / 7413.2 / 6720.8
    // (the previous choice, wgmma_256x32 for NVFP4 and wgmma_2cta_256x32 for MXFP4, 5.4-9.3% slower at
    // T = 1024 and 2048, Pro NVFP4 even; T = 512, 12 rows per expert, takes mma_128x16 above).
    // Nsight Compute, Flash NVFP4 T = 1024, L1: the wgmma tile holds 2 warps per scheduler (one CTA
    // of 8, 144 registers) and issues on 40% of the cycles, tensor pipe 22% active, DRAM 45% of its
    // peak; mma_256x32 holds 3.95, issues on 54%, tensor pipe 37%, DRAM 51%, its largest stall the
    // math pipe's throttle (1.44 per issued instruction): the decode's latency was the limit, now
    // partly the mma.sync pipe. It also needs no permuted copy of x
    // (permute_x: 64 + 33 µs per layer at T = 1024 under ncu).
    // Its upper edge: the same H100 kind, 2026-12-07, NVFP4 | MXFP4, mma_256x32 against wgmma_ws_256x128
    // (rows per expert): Flash T = 2048 (48) 3725.7 | 3594.1 against 4204.3 | 4114.1, 2304 (54) 3840.3 |
    // 3746.8 against 4293.2 | 4210.6, 2560 (60) 4235.8 | 4188.4 against 4320.4 | 4228.0, 2816 (66)
    // 4739.6 | 4566.2 against 4494.8 | 4398.6, 3072 (72) 5152.3 | 5007.0 against 4580.8 | 4465.2;
    // Pro T = 2048 (32) 10097.5 | 9853.3 against 14578.2 | 14584.9, 4096 (64) 17007.4 | 16663.3 against
    // 15713.5 | 15576.3. (mma_256x128 was slower than one of the two in every row; mma_256x64 won one
    // cell, Flash NVFP4 T = 2048 at 3576.3, and lost its MXFP4 twin by 8.7%: not taken.)
    // 31-48 rows per expert: 48-token tiles, where most experts need two 32-token tiles (decoding
    // their weights twice). Same H100 kind, 2026-12-07, one machine, NVFP4 | MXFP4, mma_256x32 against
    // mma_256x48 (rows per expert): Flash T = 1024 (24) 1960.6 | 1968.1 against 2464.0 | 2444.1,
    // 1152 (27) 2182.2 | 2089.9 against 2500.6 | 2470.1, 1280 (30) 2506.0 | 2414.9 against 2556.5 |
    // 2502.5, 1408 (33) 2966.9 | 2820.9 against 2555.8 | 2593.4, 1536 (36) 3174.3 | 3055.8 against
    // 2692.9 | 2541.2, 2048 (48) 3694.7 | 3560.5 against 3387.3 | 3469.2, 2304 (54) 3919.4 | 3804.4
    // against 4186.7 | 4197.5, 2560 (60) 4164.5 | 4109.2 against 4505.5 | 4524.0; Pro T = 2048 (32)
    // 10062.2 | 9734.3 against 9206.2 | 9268.2, 3072 (48) 13720.1 | 13219.1 against 13241.9 | 13388.8.
    // From 49 rows both tiles need two per expert, and the narrower one wastes fewer MMAs.
    if (mean <= 31) return Tile::mma_256x32;
    if (mean <= 48) return Tile::mma_256x48;
    if (mean <= 60) return Tile::mma_256x32;
    // T ≥ 2816 on V4-Flash: wgmma, 128-token tiles, warp-specialized. H200, megamoe-gemm-bench --part experts --model
    // flash --config wgmma_256x128 | wgmma_ws_256x128, two rounds in one device call, whole layer µs:
    // NVFP4 T = 4096 4929.8 / 4919.1 against 4937.0 / 4930.2 (even), T = 16384 17432.8 / 17451.4 against
    // 16899.8 / 16894.1 (-3.1%); MXFP4 T = 4096 4956.7 / 4971.6 against 4794.8 / 4785.5 (-3.5%), T = 16384
    // 17839.4 / 17792.1 against 16499.0 / 16522.4 (-7.4%). At 32 tokens (T = 1024) the warp-specialized
    // tile was slower (NVFP4 2398.0 / 2398.3 against 2242.0 / 2244.6 µs, MXFP4 2840.8 / 2835.9 against
    // 2447.2 / 2446.9), so wgmma_256x32 stays.
    // Its persistent form since 2026-12-07 (TileWalk: one CTA per SM walks the list, so a tile's
    // epilogue overlaps the next tile's first copies). NVIDIA H100 80GB HBM3, one machine,
    // megamoe-gemm-bench --part experts --model flash --format nvfp4,mxfp4 --T 4096,16384 --no-check
    // --config wgmma_ws_256x128 | wgmma_pws_256x128, two rounds: NVFP4 T = 4096 4912.9 / 4894.5 against
    // 4312.8 / 4392.3 (-11.3%), T = 16384 16958.7 / 17019.8 against 16079.7 / 16104.4 (-5.3%); MXFP4
    // T = 4096 4787.4 / 4744.2 against 4290.5 / 4286.2 (-10.0%), T = 16384 16497.9 / 16619.1 against
    // 15649.9 / 15663.1 (-5.4%). The same bits (CudaMoeLayer.PersistentTilesEqualOneTileForms).
    return Tile::wgmma_pws_256x128;
}

// Split-K of a dense wgmma call: S parts of spz steps each over blockIdx.z, when the tiles alone
// (`ctas` of them) leave SMs idle (few rows and tokens, long K): at least 8 steps per split, at
// most 8 splits; partial sums reduced in a fixed order. S = 1: no split (spz = steps).
int64_t split_k(int64_t ctas, int64_t steps, int64_t& spz) {
    const int64_t sms = sm_count();
    int64_t S = 1;
    if (ctas < sms) S = std::min<int64_t>({8, ceil_div(sms, ctas), std::max<int64_t>(1, steps / 8)});
    spz = steps;
    if (S > 1) {
        spz = ceil_div(steps, S);
        S = ceil_div(steps, spz);
    }
    return S;
}

// Scratch of a dense wgmma call of M rows (see GemmScratch): x in wgmma column order [M, cols]
// bf16 at offset 0, then the f32 partial sums [S][M][out] at xperm_bytes(M, cols).
size_t xperm_bytes(int64_t M, int64_t cols) { return DeviceArena::round_up(static_cast<size_t>(M * cols) * 2); }
size_t partial_bytes(int64_t S, int64_t M, int64_t out) { return static_cast<size_t>(S * M * out) * 4; }

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

const TiledConfig& tiled_config(Tile tile) {
    (void)cfg(tile);   // checks
    return tiled_configs()[static_cast<size_t>(tile)];
}

const char* tile_name(Tile tile) {
    if (tile == Tile::automatic) return "automatic";
    return cfg(tile).name;
}

std::string tiled_config_name(Tile tile) {
    check_tile(tile);
    if (tile == Tile::automatic) return "automatic";
    const TiledConfig& t = cfg(tile);
    if (is_wg(tile))
        return str(t.name, " (wgmma tile ", t.rows, "x", t.tokens, ", 2 warpgroups x 2 m64n", t.tokens, " tiles",
                   is_ws(tile) ? ", a producer warpgroup)" : tile == Tile::wgmma_2cta_256x32 ? ", 2 CTAs per SM)" : ")");
    return str(t.name, " (tile ", t.rows, "x", t.tokens, ", MT=", t.mt, " NT=", t.nt, " WR=", t.wr, " WT=", t.wt,
               " stages=", t.stages, ")");
}

Tile tile_from_name(const std::string& name) {
    if (name == "automatic") return Tile::automatic;
    std::string names = "automatic";
    for (const TiledConfig& t : kConfigs) {
        if (name == t.name) return t.tile;
        names += str(", ", t.name);
    }
    fail("unknown tile '", name, "' (tiles: ", names, ")");
}

size_t linear_scratch_bytes(const DeviceLinear& w, int64_t M, const LinearOptions& o) {
    MEGAMOE_CHECK(w.out > 0 && w.in > 0 && w.weight_row_bytes > 0, "linear_scratch_bytes: no layout");
    MEGAMOE_CHECK(M >= 0, "linear_scratch_bytes: M = ", M);
    MEGAMOE_CHECK(o.groups >= 1 && w.out % o.groups == 0, "linear_scratch_bytes: ", o.groups, " groups do not divide ",
                  w.out, " rows");
    // As linear_tiled: these never take the wgmma path.
    if (M == 0 || w.format == LinearFormat::f32 || w.nan_codes || w.in % 8 != 0 || w.in % step_cols(w.format) != 0)
        return 0;
    const int64_t N = w.out / o.groups, steps = w.weight_row_bytes / kStepBytes, sms = sm_count();
    size_t most = 0;
    for (Tile c : {Tile::wgmma_256x128, Tile::wgmma_256x32}) {
        const TiledConfig& t = cfg(c);
        const int64_t gx = ceil_div(N, t.rows);
        // The largest S·m over m ≤ M: S is fixed while the tile count ceil(m / tokens) is, so the
        // candidates are the last m of each count; past ctas ≥ SMs there is no split at all.
        int64_t split_rows = 0;
        for (int64_t tiles = 1;; ++tiles) {
            const int64_t m = std::min(M, tiles * t.tokens), ctas = gx * tiles * o.groups;
            int64_t spz = 0;
            const int64_t S = split_k(ctas, steps, spz);
            if (S > 1) split_rows = std::max(split_rows, S * m);
            if (m == M || ctas >= sms) break;
        }
        most = std::max(most, xperm_bytes(M, w.in * o.groups) + partial_bytes(split_rows, 1, w.out));
    }
    return most;
}

void linear_tiled(const DeviceLinear& w, const uint16_t* x, int64_t M, void* y, const LinearOptions& o,
                  const GemmScratch* scratch, CUstream_st* stream, Tile tile) {
    check_tile(tile);
    MEGAMOE_CHECK(w.weight != nullptr, "linear_tiled: weights not uploaded");
    MEGAMOE_CHECK(M >= 0 && M <= std::numeric_limits<int>::max() / 2, "linear_tiled: M = ", M);
    MEGAMOE_CHECK(o.groups >= 1 && w.out % o.groups == 0, "linear_tiled: ", o.groups, " groups do not divide ", w.out,
                  " rows");
    if (M == 0) return;
    MEGAMOE_CHECK(x != nullptr && y != nullptr, "linear_tiled: null x or y");
    MEGAMOE_CHECK(scratch == nullptr || scratch->p == nullptr || (reinterpret_cast<uintptr_t>(scratch->p) & 15) == 0,
                  "linear_tiled: scratch is not 16-byte aligned");
    if (w.format == LinearFormat::f32 || w.nan_codes || w.in % 8 != 0 || (reinterpret_cast<uintptr_t>(x) & 15) != 0) {
        // The exact kernel: f32 weights, fp8 NaN codes, or x rows that 16-byte copies cannot take.
        linear_reference(w, x, M, y, o, stream);
        return;
    }
    const int64_t N = w.out / o.groups;
    Tile c = tile != Tile::automatic ? tile : choose_dense(N, M, o.groups, w.in % step_cols(w.format) == 0);
    if (is_f8(c)) c = f8_fallback(c);   // the W4A8 tiles are the expert layer's (is_f8)
    c = one_tile_form(c);               // a dense call has no work list for a persistent walk
    const uint16_t* xk = x;   // x as the kernel reads it
    const int64_t cols = w.in * o.groups;
    const size_t room = scratch != nullptr && scratch->p != nullptr ? scratch->bytes : 0;
    if (is_wg(c)) {
        // wgmma_kernel reads x in its column order, permuted within each step's columns (into scratch).
        if (w.in % step_cols(w.format) == 0 && room >= static_cast<size_t>(M * cols) * 2) {
            uint16_t* buf = static_cast<uint16_t*>(scratch->p);
            launch_permute(w.format, x, cols, buf, cols, M, cols, stream);
            xk = buf;
        } else {
            c = Tile::mma_256x128;   // K not a whole number of steps, or no room for x: mma.sync kernel
        }
    }
    const TiledConfig& t = cfg(c);
    TiledParams p{};
    p.base = group_of(w, nullptr);
    p.table = nullptr;
    p.items = nullptr;
    p.n_items = nullptr;
    p.M = static_cast<int>(M);
    p.tiles = static_cast<int>(ceil_div(M, t.tokens));
    p.x = xk;
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
    p.spz = p.steps;
    p.part = nullptr;
    const int64_t gy = p.tiles * o.groups;
    MEGAMOE_CHECK(gy <= 65535, "linear_tiled: ", M, " rows × ", o.groups, " groups is too many tiles for one launch");
    const int64_t gx = ceil_div(N, t.rows);
    int64_t S = 1;
    if (is_wg(c)) {
        int64_t spz = p.steps;
        S = split_k(gx * gy, p.steps, spz);
        // The partial sums go after x in scratch; without room for them, no split.
        if (S > 1 && room >= xperm_bytes(M, cols) + partial_bytes(S, M, w.out)) {
            p.spz = static_cast<int>(spz);
            p.part = reinterpret_cast<float*>(static_cast<uint8_t*>(scratch->p) + xperm_bytes(M, cols));
        } else {
            S = 1;
        }
    }
    launch_tiled(w.format, o.out_bf16 ? kEpiBf16 : kEpiF32, c, p, static_cast<unsigned>(gx), static_cast<unsigned>(gy),
                 stream, static_cast<unsigned>(S));
    if (S > 1) {
        const int64_t n = M * w.out;
        const unsigned grid = static_cast<unsigned>(std::min<int64_t>(ceil_div(n, 256), 4 * sm_count()));
        CUDA_CHECK(launch_pdl(reduce_split_kernel, dim3(grid), dim3(256), 0, stream, static_cast<const float*>(p.part), n,
                              static_cast<int>(S), y, o.out_bf16));
    }
}

void linear(const DeviceLinear& w, const uint16_t* x, int64_t M, void* y, const LinearOptions& o,
            const GemmScratch* scratch, CUstream_st* stream) {
    if (M <= 16) linear_small_m(w, x, M, y, o, stream);
    else if (M <= kRegsMaxM && !o.ring && regs_fits(w, x, o)) linear_regs(w, x, M, y, o, stream);
    else linear_tiled(w, x, M, y, o, scratch, stream, Tile::automatic);
}

// ------------------------------------------------------------------------ routed experts

DeviceExperts::DeviceExperts(const std::vector<ExpertWeights>& experts) {
    DeviceArena plan;   // checks everything and counts, before any allocation
    place(experts, plan);
    own_ = DeviceArena(plan.used(), "routed experts");
    place(experts, own_);
}

DeviceExperts::DeviceExperts(const std::vector<ExpertWeights>& experts, DeviceArena& arena) { place(experts, arena); }

DeviceExperts::DeviceExperts(std::vector<DeviceLinear> w1_, std::vector<DeviceLinear> w3_, std::vector<DeviceLinear> w2_,
                             DeviceArena& arena)
    : w1(std::move(w1_)), w3(std::move(w3_)), w2(std::move(w2_)) {
    tables(arena);
}

namespace {

// Expert e's matrix `name` must be in the experts' format and of shape [out, in].
void check_expert_matrix(int64_t e, const char* name, LinearFormat f, int64_t rows, int64_t cols, LinearFormat format,
                         int64_t out, int64_t in) {
    if (f != format)
        fail("DeviceExperts: expert ", e, " ", name, " is ", linear_format_name(f), ", expert 0 is ",
             linear_format_name(format));
    if (rows != out || cols != in)
        fail("DeviceExperts: expert ", e, " ", name, " is [", rows, ", ", cols, "], expected [", out, ", ", in, "]");
}

void check_expert_set(size_t n, LinearFormat format) {
    MEGAMOE_CHECK(n > 0, "DeviceExperts: no experts");
    MEGAMOE_CHECK(static_cast<int64_t>(n) <= kMoeMaxExperts, "DeviceExperts: ", n, " experts (at most ", kMoeMaxExperts,
                  ")");
    MEGAMOE_CHECK(format == LinearFormat::nvfp4 || format == LinearFormat::mxfp4, "DeviceExperts: expert weights are ",
                  linear_format_name(format), "; the grouped kernels take NVFP4 or MXFP4 (the releases' expert formats)");
}

}  // namespace

void DeviceExperts::place(const std::vector<ExpertWeights>& experts, DeviceArena& arena) {
    // Every check before the first upload (a plan in a counting arena finds every error).
    check_expert_set(experts.size(), experts.empty() ? LinearFormat::nvfp4 : experts[0].w1.format);
    const Linear& l0 = experts[0].w1;
    for (size_t e = 0; e < experts.size(); ++e) {
        const ExpertWeights& x = experts[e];
        const int64_t i = static_cast<int64_t>(e);
        check_expert_matrix(i, "w1", x.w1.format, x.w1.out, x.w1.in, l0.format, l0.out, l0.in);
        check_expert_matrix(i, "w3", x.w3.format, x.w3.out, x.w3.in, l0.format, l0.out, l0.in);
        check_expert_matrix(i, "w2", x.w2.format, x.w2.out, x.w2.in, l0.format, l0.in, l0.out);
    }
    MEGAMOE_CHECK(l0.in % 8 == 0 && l0.out % 8 == 0, "DeviceExperts: D = ", l0.in, " and I = ", l0.out,
                  " must be multiples of 8");
    w1.clear();
    w3.clear();
    w2.clear();
    for (const ExpertWeights& x : experts) {
        w1.push_back(upload_linear(x.w1, arena));
        w3.push_back(upload_linear(x.w3, arena));
        w2.push_back(upload_linear(x.w2, arena));
    }
    tables(arena);
}

void DeviceExperts::tables(DeviceArena& arena) {
    check_expert_set(w1.size(), w1.empty() ? LinearFormat::nvfp4 : w1[0].format);
    MEGAMOE_CHECK(w3.size() == w1.size() && w2.size() == w1.size(), "DeviceExperts: ", w1.size(), " w1, ", w3.size(),
                  " w3 and ", w2.size(), " w2");
    format = w1[0].format;
    I = w1[0].out;
    D = w1[0].in;
    E = static_cast<int64_t>(w1.size());
    for (int64_t e = 0; e < E; ++e) {
        const auto i = static_cast<size_t>(e);
        check_expert_matrix(e, "w1", w1[i].format, w1[i].out, w1[i].in, format, I, D);
        check_expert_matrix(e, "w3", w3[i].format, w3[i].out, w3[i].in, format, I, D);
        check_expert_matrix(e, "w2", w2[i].format, w2[i].out, w2[i].in, format, D, I);
        if (w1[i].nan_codes || w3[i].nan_codes || w2[i].nan_codes)
            fail("DeviceExperts: expert ", e, " has fp8 NaN weight codes (not supported by the grouped kernels)");
    }
    MEGAMOE_CHECK(D % 8 == 0 && I % 8 == 0, "DeviceExperts: D = ", D, " and I = ", I, " must be multiples of 8");
    const size_t table_bytes = static_cast<size_t>(E) * sizeof(GemmGroup);
    l1_table = arena.take(table_bytes);
    l2_table = arena.take(table_bytes);
    if (arena.counting()) return;   // a plan: shapes only
    std::vector<GemmGroup> t1(static_cast<size_t>(E)), t2(static_cast<size_t>(E));
    for (size_t e = 0; e < t1.size(); ++e) {
        t1[e] = group_of(w1[e], &w3[e]);
        t2[e] = group_of(w2[e], nullptr);
    }
    CUDA_CHECK(cudaMemcpy(l1_table, t1.data(), table_bytes, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(l2_table, t2.data(), table_bytes, cudaMemcpyHostToDevice));
}

size_t DeviceExperts::bytes() const {
    size_t b = 0;
    for (const auto* v : {&w1, &w3, &w2})
        for (const DeviceLinear& l : *v) b += l.bytes();
    return b;
}

MoeLayerWorkspace::MoeLayerWorkspace(int64_t T_max, int64_t k, const DeviceExperts& ex, bool skip)
    : skip_bucket(skip) {
    MEGAMOE_CHECK(ex.E > 0, "MoeLayerWorkspace: experts not uploaded");
    MEGAMOE_CHECK(T_max >= 1 && k >= 1, "MoeLayerWorkspace: T_max = ", T_max, ", k = ", k);
    dispatch = MoeDispatchWorkspace(T_max, k, ex.E + (skip ? 1 : 0), ex.D);
    const int64_t N = T_max * k;
    // Items for the smallest token tile: Σ_e ceil(c_e / BT) ≤ N / BT + (experts with rows).
    max_items = ceil_div(N, cfg(Tile::mma_128x8).tokens) + std::min(N, ex.E);
    h = DeviceArray<uint16_t>(static_cast<size_t>(N * ex.I), "MoeLayerWorkspace h");
    xp = DeviceArray<uint16_t>(static_cast<size_t>(N * std::max(ex.D, ex.I)), "MoeLayerWorkspace xp");
    rows = DeviceArray<float>(static_cast<size_t>(N * ex.D), "MoeLayerWorkspace rows");
    items = DeviceArray<int32_t>(static_cast<size_t>(max_items) * 4, "MoeLayerWorkspace items");
    n_items = DeviceArray<int32_t>(2, "MoeLayerWorkspace n_items");
}

size_t MoeLayerWorkspace::bytes() const {
    return dispatch.bytes() + h.bytes() + xp.bytes() + rows.bytes() + items.bytes() + n_items.bytes();
}

namespace {

void launch_build_items(const MoeLayerWorkspace& ws, int64_t E, int BT, cudaStream_t stream) {
    CUDA_CHECK(launch_pdl(build_items_kernel, dim3(1), dim3(1024), 0, stream,
                          static_cast<const int32_t*>(ws.dispatch.offsets.data()), static_cast<int>(E), BT,
                          reinterpret_cast<int4*>(ws.items.data()), ws.n_items.data()));
}

// x8: the layer's input (xs for L1, h for L2) as FP8 codes and scales, when moe_layer_routed runs a
// W4A8 tile (moe_w4a8_fits); null otherwise, and then a request for one runs f8_fallback's tile.
void grouped(const DeviceExperts& ex, MoeLayerWorkspace& ws, int64_t N, bool l1, float limit, Tile tile, bool build,
             cudaStream_t stream, bool official = false, const ActFp8* x8 = nullptr) {
    check_tile(tile);
    MEGAMOE_CHECK(ex.E > 0 && static_cast<int64_t>(ex.w1.size()) == ex.E, "moe_l", l1 ? 1 : 2,
                  ": experts not uploaded");
    MEGAMOE_CHECK(!ws.items.empty(), "moe_l", l1 ? 1 : 2, ": the workspace holds no buffers");
    const int64_t buckets = ex.E + (ws.skip_bucket ? 1 : 0);   // build_items covers experts [0, ex.E) only
    MEGAMOE_CHECK(buckets == ws.dispatch.E && ex.D == ws.dispatch.D, "moe_l", l1 ? 1 : 2, ": workspace is for ",
                  ws.dispatch.E, " buckets, D = ", ws.dispatch.D, ", experts have E = ", ex.E,
                  ws.skip_bucket ? " (+ the skip bucket)" : "", ", D = ", ex.D);
    MEGAMOE_CHECK(N >= 0 && N <= ws.dispatch.T_max * ws.dispatch.k, "moe_l", l1 ? 1 : 2, ": ", N,
                  " rows exceed the workspace (", ws.dispatch.T_max * ws.dispatch.k, ")");
    if (N == 0) return;
    Tile c = tile != Tile::automatic ? tile : choose_grouped(N, ex.E);
    if (is_f8(c) && x8 == nullptr) c = f8_fallback(c);   // same token tile: the same work list
    const DeviceLinear& w = l1 ? ex.w1[0] : ex.w2[0];
    const uint16_t* x = l1 ? ws.dispatch.xs.data() : ws.h.data();
    if (is_f8(c)) {
        MEGAMOE_CHECK(official && ex.format == LinearFormat::mxfp4 && w.in % 128 == 0 && w.weight_row_bytes == w.in / 2,
                      "moe_l", l1 ? 1 : 2, ": the W4A8 tile takes MXFP4 experts under the official numerics with ",
                      "K % 128 == 0 (moe_w4a8_fits)");
    } else if (is_wg(c)) {
        // wgmma_kernel reads its input in wgmma column order: a permuted copy in ws.xp.
        if (w.in % step_cols(ex.format) == 0) {
            launch_permute(ex.format, x, w.in, ws.xp.data(), w.in, N, w.in, stream);
            x = ws.xp.data();
        } else {
            const Tile fallback = Tile::mma_128x128_nt8;
            if (cfg(c).tokens != cfg(fallback).tokens) build = true;   // the work list's tile changes
            c = fallback;
        }
    }
    const TiledConfig& t = cfg(c);
    if (build) launch_build_items(ws, ex.E, t.tokens, stream);
    TiledParams p{};
    p.base = GemmGroup{};
    p.table = static_cast<const GemmGroup*>(l1 ? ex.l1_table : ex.l2_table);
    p.items = reinterpret_cast<const int4*>(ws.items.data());
    p.n_items = ws.n_items.data();
    p.M = 0;
    p.tiles = 0;
    p.x = x;
    p.x_ld = l1 ? ex.D : ex.I;
    p.y = l1 ? static_cast<void*>(ws.h.data()) : static_cast<void*>(ws.rows.data());
    p.y_ld = l1 ? ex.I : ex.D;
    p.row_scale = ws.dispatch.ws.data();
    p.N = static_cast<int>(w.out);
    p.K = static_cast<int>(w.in);
    p.steps = static_cast<int>(w.weight_row_bytes / kStepBytes);
    p.w_row_bytes = w.weight_row_bytes;
    p.s_row_bytes = w.scale_row_bytes;
    p.limit = limit;
    p.spz = p.steps;
    p.part = nullptr;
    p.official = official;
    p.skip_dead = ws.skip_dead_ntiles;
    if (is_f8(c)) {   // x as codes: x_ld bytes per row (= K), one scale per 128 columns
        p.x8 = x8->q;
        p.xs8 = x8->s;
        p.xs_ld = w.in / 128;
    }
    const int64_t items = ceil_div(N, t.tokens) + std::min(N, ex.E);
    MEGAMOE_CHECK(items <= 65535, "moe_l", l1 ? 1 : 2, ": ", items, " work items exceed one launch");
    const int64_t rows_per_cta = l1 ? t.rows / 2 : t.rows;
    const int64_t gx = ceil_div(w.out, rows_per_cta);
    if (is_persistent(c)) {   // one CTA per SM walks the list's gx · n_items tiles (TileWalk)
        MEGAMOE_CHECK(gx * items <= std::numeric_limits<int>::max(), "moe_l", l1 ? 1 : 2, ": ", gx * items, " tiles");
        p.row_tiles = static_cast<int>(gx);
        const int64_t grid = std::min<int64_t>(gx * items, sm_count());
        launch_tiled(ex.format, l1 ? kEpiSwiglu : kEpiF32, c, p, static_cast<unsigned>(grid), 1, stream);
        return;
    }
    const int64_t S = decode_split(c, gx * items, p.steps);
    p.spz = static_cast<int>(ceil_div(p.steps, S));
    launch_tiled(ex.format, l1 ? kEpiSwiglu : kEpiF32, c, p, static_cast<unsigned>(gx), static_cast<unsigned>(items),
                 stream, static_cast<unsigned>(S));
}

}  // namespace

void moe_l1(const DeviceExperts& ex, float limit, MoeLayerWorkspace& ws, int64_t N, CUstream_st* stream, Tile tile) {
    grouped(ex, ws, N, true, limit, tile, true, stream);
}

void moe_l2(const DeviceExperts& ex, MoeLayerWorkspace& ws, int64_t N, CUstream_st* stream, Tile tile) {
    grouped(ex, ws, N, false, 0.0f, tile, true, stream);
}

bool moe_w4a8_fits(const DeviceExperts& ex, Numerics nm) {
    return nm == Numerics::official && ex.format == LinearFormat::mxfp4 && ex.E > 0 && ex.D % 128 == 0 &&
           ex.I % 128 == 0 && ex.w1[0].weight_row_bytes == ex.D / 2 && ex.w2[0].weight_row_bytes == ex.I / 2;
}

void moe_layer_routed(const DeviceExperts& ex, float limit, const uint16_t* x, const int32_t* ids,
                      const float* weights, int64_t T, MoeLayerWorkspace& ws, CUstream_st* stream, Tile tile,
                      Numerics nm) {
    const bool official = nm == Numerics::official;
    check_tile(tile);
    MEGAMOE_CHECK(T >= 0 && T <= ws.dispatch.T_max, "moe_layer: T = ", T, " exceeds the workspace's T_max = ",
                  ws.dispatch.T_max);
    if (T == 0) return;
    const int64_t N = T * ws.dispatch.k;
    Tile c = tile != Tile::automatic ? tile : choose_grouped(N, ex.E);
    const bool w4a8 = is_f8(c) && moe_w4a8_fits(ex, nm);
    if (is_f8(c) && !w4a8) c = f8_fallback(c);
    // The W4A8 tile's inputs as codes and scales, in ws.xp (room: 2·N·max(D, I) bytes hold N·K codes
    // and N·K/128 f32 scales); L1's are dead once L1 has run, so L2's take the same place.
    auto codes = [&](int64_t K) {
        uint8_t* q = reinterpret_cast<uint8_t*>(ws.xp.data());
        return std::make_pair(q, reinterpret_cast<float*>(q + N * K));
    };
    if (N <= kMoeDispatchSmallMaxRows && !is_wg(c) && !is_f8(c)) {
        // Few rows: route, gather and L1's work list in one launch instead of five.
        ws.dispatch.route_gather_small(ids, x, weights, T, cfg(c).tokens, ws.items.data(), ws.n_items.data(), stream,
                                       ex.E);
        grouped(ex, ws, N, true, limit, c, false, stream, official);
    } else if (w4a8) {
        ws.dispatch.route(ids, T, stream);
        ws.dispatch.gather(x, weights, T, stream);
        const auto [q, s] = codes(ex.D);
        // x is FP8-rounded: exact codes (in register-A order for the wgmma_rf8 tiles, w4a8::ra_word)
        quantize_gemm_input(ws.dispatch.xs.data(), N, ex.D, q, s, stream, is_rf8(c));
        const ActFp8 x8{q, s};
        grouped(ex, ws, N, true, limit, c, true, stream, official, &x8);
    } else {
        ws.dispatch.route(ids, T, stream);
        ws.dispatch.gather(x, weights, T, stream);
        grouped(ex, ws, N, true, limit, c, true, stream, official);
    }
    // official: w2's input is FP8-rounded in 128-blocks (ops::expert_ffn's linear_rounded); the W4A8
    // tile takes its codes as well.
    if (w4a8) {
        const auto [q, s] = codes(ex.I);
        fp8_block_round_q(ws.h.data(), N, ex.I, q, s, stream, is_rf8(c));
        const ActFp8 h8{q, s};
        grouped(ex, ws, N, false, 0.0f, c, false, stream, official, &h8);
        return;
    }
    if (official) fp8_block_round(ws.h.data(), N, ex.I, ex.I, 128, stream);
    grouped(ex, ws, N, false, 0.0f, c, false, stream);   // same tile size: L1's work list serves
}

void moe_layer_combine(MoeLayerWorkspace& ws, int64_t T, const float* shared, float* y, CUstream_st* stream,
                       Numerics nm) {
    MEGAMOE_CHECK(T >= 0 && T <= ws.dispatch.T_max, "moe_layer: T = ", T, " exceeds the workspace's T_max = ",
                  ws.dispatch.T_max);
    MEGAMOE_CHECK(!ws.skip_bucket, "moe_layer_combine: the workspace has a skip bucket, whose rows are never "
                                   "computed (an expert-parallel rank's results go back through the exchange)");
    if (T == 0) return;
    ws.dispatch.combine(ws.rows.data(), shared, T, y, stream, nm == Numerics::official);
}

void moe_layer(const DeviceExperts& ex, float limit, const uint16_t* x, const int32_t* ids, const float* weights,
               int64_t T, const float* shared, float* y, MoeLayerWorkspace& ws, CUstream_st* stream, Tile tile) {
    MEGAMOE_CHECK(!ws.skip_bucket, "moe_layer: the workspace has a skip bucket (use moe_layer_routed)");
    moe_layer_routed(ex, limit, x, ids, weights, T, ws, stream, tile);
    moe_layer_combine(ws, T, shared, y, stream);
}

Tile moe_layer_config(const DeviceExperts& ex, int64_t T, int64_t k) { return choose_grouped(T * k, ex.E); }

Tile w4a8_tile(Tile c) {
    if (c == Tile::wgmma_ws_256x128) return Tile::wgmma_f8_128x128;
    if (c == Tile::wgmma_pws_256x128) return Tile::wgmma_pf8_128x128;
    if (c == Tile::wgmma_256x32 || c == Tile::wgmma_2cta_256x32 || c == Tile::mma_256x32 || c == Tile::mma_256x48)
        return Tile::wgmma_f8_128x32;
    return c;
}

Tile linear_tiled_config(const DeviceLinear& w, int64_t M, const LinearOptions& o) {
    MEGAMOE_CHECK(o.groups >= 1 && w.out % o.groups == 0, "linear_tiled_config: bad groups");
    return choose_dense(w.out / o.groups, M, o.groups,
                        w.format != LinearFormat::f32 && w.in % step_cols(w.format) == 0);
}

}  // namespace megamoe::cuda
