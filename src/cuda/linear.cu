// linear.cu — decode / small-M dense linear, y[M, N] = x[M, K] · Wᵀ, with W read in its packed
// checkpoint format (BF16, FP8 e4m3 + e8m0 128×128 blocks, MXFP4, NVFP4) on Hopper (sm_90a).
//
// Launch strategy (bandwidth-bound: M ≤ 16 tokens, every weight byte is read exactly once)
// ---------------------------------------------------------------------------------------
// * Tensor cores do the multiply: mma.sync m16n8k16 bf16 → f32 with the weights as the 16-row A
//   operand and the tokens as the 8-column B operand ("swap AB": M = 1..8 uses one n8 tile,
//   9..16 two). The MMA's k order is free as long as A and B agree, so each lane takes its A
//   values from 16 contiguous bytes of one weight row (4 lanes cover 64 contiguous bytes of a
//   row: one "step") and decodes them in registers. The device copy of fp8 / fp4 rows has each
//   4-byte word permuted once at upload (to_kernel_order, lossless) so that the decoded bf16
//   pairs come out in natural k order and x is staged as it is (src/cuda/device.cuh).
// * Weights stream through a per-warp ring of shared-memory slots (ring_stages: 3, or 6 for BF16
//   up to 8 tokens) filled by 16-byte cp.async copies (L2 only, 256-byte L2 prefetch): while step
//   s is decoded, the next 2 (5) steps are in flight, without holding them in registers. Each
//   lane copies exactly the bytes it later reads, so a slot is ready after cp.async.wait_group
//   alone (no warp or CTA barrier).
// * A warp owns 16·MT output rows (MT = 1 or 2: B fragments are reused MT times) and a range of
//   steps along K. A CTA is 8 warps = W_r row groups × W_k K-ranges; its x slice [M, K-range] is
//   staged once into shared memory. CTAs of one thread-block cluster (S = 1..8 along grid.x)
//   split K further; partial sums are reduced through distributed shared memory in a fixed order
//   (cluster rank, then warp): deterministic, no atomics, no workspace.
// * plan_small_m picks MT, W_r and S per (N, K, M, format) from a small cost model fed with the
//   measured occupancy of each kernel instance (cudaOccupancyMaxActiveClusters), so a launch fills
//   the GPU in as few waves as possible.
// * Programmatic dependent launch: the kernel issues its first weight copies, then waits
//   (griddepcontrol.wait) for the previous kernel of the stream before it reads x or writes y, so
//   its weight prefetch overlaps that kernel's tail.
//
// * FP8 weights of an ungrouped linear with K % 128 == 0 and a 16-byte aligned x do not come here:
//   linear_small_m hands them to linear_regs (linear_regs.cu), which streams each lane's weight
//   bytes into registers (two batches of 4 steps in flight, both requested before the wait), reads
//   x straight into the B fragments and needs neither an x stage nor a cluster. Measured on an H100
//   in one run (megamoe-linear-bench, its "fp8" against "fp8rng" rows), µs at M = 1 / 4 / 16:
//   wq_a 4.60 / 4.62 / 5.35 against 6.39 / 6.26 / 8.25, wq_b 14.62 / 14.95 / 17.92 against 16.80 /
//   16.13 / 20.90, wkv 3.84 / 3.92 / 4.78 against 4.64 / 4.83 / 9.91, wo_b 14.50 / 14.50 / 17.25
//   against 17.93 / 19.50 / 22.73, shared w1 6.49 / 6.52 / 7.19 against 8.33 / 7.80 / 11.04, w2 5.11
//   / 5.25 / 5.91 against 7.84 / 7.15 / 8.99; the 8-layer V4-Flash batch-1 step in exact numerics
//   1746-1763 µs against 1823-1832 (docs/bench-forward.md). Grouped linears (wo_a) stay here: in
//   that step wo_a overlaps the attention, and there the register kernel (with a two-wave plan)
//   added 12.0 µs to the step against the ring's 10.6 in exact numerics, 19.3-20.2 against 14.4 in
//   official numerics (megamoe-forward-bench --trace). BF16 weights take linear_regs above 8
//   tokens only (takes_regs).
//
// Where the time goes (H200, see bench/linear_bench.cu): BF16 streams at ~80% of the
// device-to-device copy bandwidth on large matrices; FP8 and FP4 run at ~40-50% issue efficiency,
// not bound by HBM (FP4 decode: 10 integer + 4 bf16 ops per 8 weights with the rotate+select
// decode, was 15 + 4). For FP8 not by the decode either: a variant on the hardware's e4m3 → f16
// conversion and f16 MMAs issued 32% fewer instructions for wq_b at M = 1 in the same time under
// Nsight Compute (2026-12-04, docs/bench-forward.md). Nor by the depth of each warp's stream:
// rings of 5 or 6 stages (4-5 steps in flight instead of 2) and a loop decoding two steps at once
// into separate accumulators (twice the independent work per warp) measured no faster for FP8
// (wq_b at M = 1: 15.0 µs with 3 stages, 14.8 with 6, 15.9 paired; BF16, twice the bytes, gained
// 26.0 → 18.7 from the deeper ring and the plan its occupancy led to). What the sweeps show
// instead is a fixed cost per launch:
// 3.9-5.2 µs for a 2 MB matrix (wkv) whatever the plan, so a 32 MB one streams at ~3.2 TB/s
// past it. Small matrices (≤ 8 MB) are bound by that latency (~4-5 µs, as cuBLAS).
//
// Exactness: every A value given to the tensor core is the exact weight (up to a power of two
// applied once to y), so y differs from ops::linear only by fp32 summation order/rounding:
//   bf16   : the stored bits.
//   fp8    : e4m3 bits placed in a bf16 (sign, 4 exponent + 3 mantissa bits) are e4m3·2^-120,
//            subnormal e4m3 codes included; one bf16 multiply by 2^(e-7-F) (the block's e8m0
//            scale e and the decode bias) gives e4m3·2^(e-127)·2^-F exactly. y is scaled by 2^F.
//   MXFP4  : e2m1 bits placed in a bf16 are e2m1·2^-126 (the 0.5 code is a bf16 subnormal; PTX
//            bf16 arithmetic keeps subnormals), times 2^(e-1-F) per 32-group. y is scaled by 2^F.
//   NVFP4  : e2m1·2^-126 times bf16(e4m3 scale · 2^117) per 16-group = e2m1·scale·2^-9 exactly
//            (≤ 6 significant bits, range 2^-19..2^12); y is scaled by weight_scale_2·2^9.
//   F ≥ 0 (exp_shift, chosen at upload from the largest scale) keeps the multiplier finite in
//   bf16; it is 0 for any real checkpoint. A decoded weight below the bf16 subnormal range would
//   round: with F = 0 that needs an fp8 block scale under 2^-124 (MXFP4 never); quantizers never
//   make such blocks from finite weights above ~2^-115.
//   fp8 weight bytes that are the e4m3 NaN code would decode as 480, so upload flags them and
//   such a linear (and f32 weights) runs linear_reference: one warp per row, exact fp32 FMA.
#include "cuda/linear.h"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <type_traits>

#include "core/common.h"
#include "cuda/device.cuh"
#include "cuda/device_info.h"
#include "io/formats.h"

namespace cg = cooperative_groups;

namespace megamoe::cuda {

namespace {

using namespace dev;

constexpr int kThreads = 256;                 // 8 warps per CTA
constexpr int kWarps = kThreads / 32;
constexpr int kMaxM = 16;                     // tokens per launch (two n8 MMA tiles)
constexpr int kMaxCluster = 8;                // portable cluster size
constexpr int kXSmemBudget = 64 * 1024;       // staged x per CTA (with a 3-stage ring, 2 CTAs fit per SM)
constexpr int kRedSmemMax = 256 * kMaxM * 4;  // partial sums: W_k·R = 128·MT rows × M tokens
// Per-warp cp.async ring slots: kStages - 1 steps in flight while one is decoded. BF16 moves twice
// the bytes of FP8 per weight with no decode, and its stream gains from a deeper ring up to 8
// tokens (H200, megamoe-linear-bench, builds that differ in the ring only, one run, µs at M = 1
// / 4, each with the plan the planner picks for its occupancy: wq_b 19.9 → 18.5 / 22.3 → 19.4,
// wo_b 21.7 → 19.9 / 22.9 → 22.1, w2 7.9 → 6.9 / 8.4 → 7.6; the 20-layer V4-Flash step at B = 1
// 3752 → 3640 µs (its BF16 head, 1 GB, is ~18% of the bytes), B = 8 the same), but not at 16
// (wo_b 27.2 → 35.5 on the same plan). FP8 and FP4 measured no faster with 5-6 stages (wq_b FP8
// 15.0 / 14.8 µs at M = 1), so they keep 3.
constexpr int kStages = 3;
constexpr int kDeepStages = 6;                // BF16 at M ≤ kDeepMaxM
constexpr int kDeepMaxM = 8;
int ring_stages(LinearFormat f, int M) {
    return f == LinearFormat::bf16 && M <= kDeepMaxM ? kDeepStages : kStages;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One ring slot of a warp: 16 weight bytes and a 4-byte scale word for each (m-tile, row half,
// lane), indexed idx = (mt·2 + h)·32 + lane; lane-contiguous, so copies and reads are conflict-free.
template <int MT> struct StageLayout {
    static constexpr int kWeightBytes = MT * 2 * 32 * 16;
    static constexpr int kBytes = kWeightBytes + MT * 2 * 32 * 4;
    __device__ static constexpr int weight(int idx) { return idx * 16; }
    __device__ static constexpr int scale(int idx) { return kWeightBytes + idx * 4; }
};

constexpr int kRingSmemMax = kWarps * kDeepStages * StageLayout<2>::kBytes;   // the rings of the largest tile

struct SmallMParams {
    const uint8_t*  w;            // [N] rows of w_row_bytes
    const uint8_t*  scale;
    const uint16_t* x;            // [M, x_ld] bf16; a row block of group g reads columns g·K .. g·K + K
    void*           y;            // [M, N] f32 or bf16 (out_bf16)
    int64_t x_ld;                 // x row stride, elements (K, or groups·K for a grouped linear)
    int     group_rows;           // rows per group (grouped linear, a multiple of the CTA's rows), 0: none
    bool    out_bf16;
    int64_t w_row_bytes, s_row_bytes;
    int     N, K, M;
    int     steps;                // weight row steps (w_row_bytes / 64)
    int     spc, spw;             // steps per CTA, per warp
    int     wr;                   // warps along rows in a CTA (W_k = 8 / wr)
    int     x_rs;                 // x row stride in shared memory, bytes
    int     bias;                 // fp8: 120 - F, mxfp4: 126 - F
    float   out_scale;            // applied to every output
};

// ---------------------------------------------------------------------------- the kernel

// Grid (S, row blocks), cluster (S, 1, 1), 256 threads. CTA (rank r, row block b) computes rows
// [b·R, b·R + R), R = wr·16·MT, over steps [r·spc, (r+1)·spc) of every row; warp w takes row group
// w % wr and step range w / wr of that. Shared memory: x [M][x_rs], then the warps' rings
// [8][kStages] of StageLayout<MT>::kBytes, then partials [W_k][M][R] f32.
template <LinearFormat F, int MT, int NT, int kStages>
static __global__ void __launch_bounds__(kThreads, 2) linear_small_m_kernel(const SmallMParams p) {
    using T = Traits<F>;
    constexpr int kE = T::kElems;
    constexpr int kStepK = 4 * kE;             // columns per step
    constexpr int kChunksPerStep = kStepK / 8; // 16-byte x chunks per step
    constexpr int kLds = kE / 8;               // x chunks per lane per step (each feeds 2 MMAs)
    extern __shared__ __align__(16) uint8_t smem[];

    const int S = static_cast<int>(gridDim.x);
    const int rank = static_cast<int>(blockIdx.x);
    const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
    const int g = lane >> 2, tig = lane & 3;
    const int wk_count = kWarps / p.wr;
    const int wrow = warp % p.wr, wk = warp / p.wr;
    const int R = p.wr * 16 * MT;
    const int M = p.M;

    const int cs0 = rank * p.spc;
    const int cta_steps = max(0, min(p.spc, p.steps - cs0));
    uint8_t* xs = smem;
    uint8_t* ring = smem + static_cast<size_t>(M) * p.x_rs;   // [warp][stage] of StageLayout<MT>::kBytes
    float* red = reinterpret_cast<float*>(ring + kWarps * kStages * StageLayout<MT>::kBytes);

    const int row0 = static_cast<int>(blockIdx.y) * R + wrow * 16 * MT;
    const int ws0 = wk * p.spw;
    const int ws1 = min(ws0 + p.spw, cta_steps);

    // This warp's ring of kStages slots. Slot layout (StageLayout): the 16-byte weight chunk of
    // each (m-tile, row half, lane), then a 4-byte scale word per (m-tile, row half, lane). Every
    // lane copies exactly the bytes it will read itself, so completion needs no warp barrier.
    const uint32_t ring_s = static_cast<uint32_t>(__cvta_generic_to_shared(ring)) +
                            static_cast<uint32_t>(warp * kStages * StageLayout<MT>::kBytes);
    // This lane's sources at the CTA's first step, per (m-tile, row half); a step adds kStepBytes
    // to the weight pointer and the format's scale bytes per step to the scale pointer. Rows past
    // N keep a valid pointer and copy nothing (zero fill).
    const uint8_t* wsrc[MT][2];
    const uint8_t* ssrc[MT][2];
    bool rok[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = row0 + mt * 16 + h * 8 + g;
            rok[mt][h] = row < p.N;
            wsrc[mt][h] = rok[mt][h] ? p.w + row * p.w_row_bytes + cs0 * kStepBytes + tig * 16 : p.w;
            if constexpr (F == LinearFormat::fp8_block) {
                const int rbase = row0 + mt * 16;   // one e8m0 per 128×128 block; tiles are 16-aligned
                rok[mt][h] = rbase < p.N;
                ssrc[mt][h] = rok[mt][h] ? p.scale + (rbase / kFp8Block) * p.s_row_bytes : p.scale;
            } else if constexpr (F == LinearFormat::mxfp4) {
                ssrc[mt][h] = rok[mt][h] ? p.scale + row * p.s_row_bytes + cs0 * 4 : p.scale;
            } else if constexpr (F == LinearFormat::nvfp4) {
                ssrc[mt][h] = rok[mt][h] ? p.scale + row * p.s_row_bytes + cs0 * 8 + (tig >> 1) * 4 : p.scale;
            } else {
                ssrc[mt][h] = p.w;
            }
        }
    }
    // fp8: address of the block-scale byte of step s (its 4-byte word is what gets copied).
    auto fp8_scale_addr = [&](int mt, int s) {
        return reinterpret_cast<uintptr_t>(ssrc[mt][0]) + static_cast<uintptr_t>(((cs0 + s) * kStepK) / kFp8Block);
    };
    auto issue = [&](int s, int slot) {
        if (s >= ws1) return;   // nothing to fetch; the (empty) group is still committed
        const uint32_t base = ring_s + static_cast<uint32_t>(slot * StageLayout<MT>::kBytes);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int idx = (mt * 2 + h) * 32 + lane;
                const bool ok = row0 + mt * 16 + h * 8 + g < p.N;
                cp_async16(base + StageLayout<MT>::weight(idx), wsrc[mt][h] + (ok ? s * kStepBytes : 0), ok);
                if constexpr (F == LinearFormat::fp8_block) {
                    if (h == 0) {
                        const uintptr_t a = rok[mt][0] ? fp8_scale_addr(mt, s) & ~uintptr_t(3)
                                                       : reinterpret_cast<uintptr_t>(p.scale);
                        cp_async4(base + StageLayout<MT>::scale(idx), reinterpret_cast<const void*>(a), rok[mt][0]);
                    }
                } else if constexpr (F == LinearFormat::mxfp4) {
                    cp_async4(base + StageLayout<MT>::scale(idx), ssrc[mt][h] + (ok ? s * 4 : 0), ok);
                } else if constexpr (F == LinearFormat::nvfp4) {
                    cp_async4(base + StageLayout<MT>::scale(idx), ssrc[mt][h] + (ok ? s * 8 : 0), ok);
                }
            }
        }
    };

    // Prologue: kStages-1 steps in flight while x is staged. With programmatic dependent launch
    // this kernel may start while the previous kernel of the stream still runs: weights and
    // scales are constant, so they are fetched before griddepcontrol.wait, which returns once
    // that kernel has completed and its writes (x, or a y it reads) are visible.
#pragma unroll
    for (int i = 0; i < kStages - 1; ++i) {
        issue(ws0 + i, i);
        cp_async_commit();
    }
    asm volatile("griddepcontrol.wait;" ::: "memory");

    // 1. Stage x[:, cs0·kStepK : (cs0 + cta_steps)·kStepK] (zeros past K); for a grouped linear,
    //    the columns of this row block's group.
    {
        const int chunks = cta_steps * kChunksPerStep;
        const int k_base = cs0 * kStepK;
        const uint16_t* xg = p.x + (p.group_rows ? static_cast<int64_t>(blockIdx.y) * R / p.group_rows * p.K : 0);
        const bool vec = (p.K % 8 == 0) && (p.x_ld % 8 == 0) && ((reinterpret_cast<uintptr_t>(xg) & 15) == 0);
        for (int i = static_cast<int>(threadIdx.x); i < M * chunks; i += kThreads) {
            const int t = i / chunks, q = i - t * chunks;
            const int k = k_base + q * 8;
            const uint16_t* src = xg + static_cast<int64_t>(t) * p.x_ld + k;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (vec && k + 8 <= p.K) {
                v = __ldg(reinterpret_cast<const uint4*>(src));
            } else {
                uint16_t e[8];
#pragma unroll
                for (int j = 0; j < 8; ++j) e[j] = (k + j < p.K) ? src[j] : uint16_t(0);
                v = make_uint4(e[0] | (uint32_t(e[1]) << 16), e[2] | (uint32_t(e[3]) << 16),
                               e[4] | (uint32_t(e[5]) << 16), e[6] | (uint32_t(e[7]) << 16));
            }
            *reinterpret_cast<uint4*>(xs + t * p.x_rs + x_chunk_pos<F>(q) * 16) = v;
        }
    }
    __syncthreads();

    // 2. Stream this warp's weights: step s is decoded while steps s+1 .. s+kStages-1 are in flight.
    float acc[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;

    int slot = 0;   // (s - ws0) % kStages
    for (int s = ws0; s < ws1; ++s) {
        issue(s + kStages - 1, slot == 0 ? kStages - 1 : slot - 1);
        cp_async_commit();
        cp_async_wait<kStages - 1>();   // this lane's copies for step s have landed

        const uint8_t* st = ring + (warp * kStages + slot) * StageLayout<MT>::kBytes;
        uint4 wv[MT][2];
        uint32_t mlo[MT][2], mhi[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int idx = (mt * 2 + h) * 32 + lane;
                wv[mt][h] = *reinterpret_cast<const uint4*>(st + StageLayout<MT>::weight(idx));
                if constexpr (F == LinearFormat::fp8_block) {
                    const int idx0 = (mt * 2) * 32 + lane;
                    const uint32_t word = *reinterpret_cast<const uint32_t*>(st + StageLayout<MT>::scale(idx0));
                    const int off = static_cast<int>(fp8_scale_addr(mt, s) & 3);
                    mlo[mt][h] = mhi[mt][h] = pow2_bf16x2((word >> (8 * off)) & 0xFFu, p.bias);
                } else if constexpr (F == LinearFormat::mxfp4) {
                    const uint32_t word = *reinterpret_cast<const uint32_t*>(st + StageLayout<MT>::scale(idx));
                    mlo[mt][h] = mhi[mt][h] = pow2_bf16x2((word >> (8 * tig)) & 0xFFu, p.bias);
                } else if constexpr (F == LinearFormat::nvfp4) {
                    const uint32_t word = *reinterpret_cast<const uint32_t*>(st + StageLayout<MT>::scale(idx));
                    nvfp4_mults(word >> (16 * (tig & 1)), mlo[mt][h], mhi[mt][h]);
                } else {
                    mlo[mt][h] = mhi[mt][h] = 0;
                }
            }
        }
        slot = slot == kStages - 1 ? 0 : slot + 1;

        const int q0 = s * kChunksPerStep + tig * kLds;
#pragma unroll
        for (int l = 0; l < kLds; ++l) {
            uint4 b[NT];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int t = nt * 8 + g;
                b[nt] = t < M ? *reinterpret_cast<const uint4*>(xs + t * p.x_rs + x_chunk_pos<F>(q0 + l) * 16)
                              : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                uint32_t a[2][4];   // A of the two MMAs fed by this x chunk
                decode_a<F>(wv[mt][0], wv[mt][1], l, mlo[mt][0], mhi[mt][0], mlo[mt][1], mhi[mt][1], a);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    mma_bf16(acc[mt][nt], a[0][0], a[0][1], a[0][2], a[0][3], b[nt].x, b[nt].y);
                    mma_bf16(acc[mt][nt], a[1][0], a[1][1], a[1][2], a[1][3], b[nt].z, b[nt].w);
                }
            }
        }
    }
    cp_async_wait<0>();

    // The next kernel of the stream may be scheduled now (its CTAs start as ours retire).
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");

    // 3. Partials to shared memory: red[wk][t][row in CTA]. C fragment: c0,c1 = (row g, tokens
    //    2·tig, 2·tig+1), c2,c3 = (row g+8, same tokens); + 8 tokens for n-tile 1.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int t = nt * 8 + 2 * tig + (i & 1);
                const int rl = wrow * 16 * MT + mt * 16 + g + (i >= 2 ? 8 : 0);
                if (t < M) red[(wk * M + t) * R + rl] = acc[mt][nt][i];
            }

    // 4. Reduce over the cluster's CTAs and this CTA's K-warps, fixed order; CTA `rank` writes
    //    rows [rank·R/S, (rank+1)·R/S) of the row block.
    cg::cluster_group cluster = cg::this_cluster();
    if (S > 1) cluster.sync();
    else __syncthreads();
    const int rows_per_rank = R / S;
    for (int i = static_cast<int>(threadIdx.x); i < M * rows_per_rank; i += kThreads) {
        const int t = i / rows_per_rank;
        const int rl = rank * rows_per_rank + (i - t * rows_per_rank);
        float sum = 0.0f;
        for (int r = 0; r < S; ++r) {
            const float* src = S > 1 ? cluster.map_shared_rank(red, r) : red;
            for (int k = 0; k < wk_count; ++k) sum += src[(k * M + t) * R + rl];
        }
        const int row = static_cast<int>(blockIdx.y) * R + rl;
        if (row < p.N) {
            const float v = sum * p.out_scale;
            if (p.out_bf16) static_cast<__nv_bfloat16*>(p.y)[static_cast<int64_t>(t) * p.N + row] = __float2bfloat16_rn(v);
            else static_cast<float*>(p.y)[static_cast<int64_t>(t) * p.N + row] = v;
        }
    }
    // Keep this CTA's shared memory alive until every rank has read it. Relaxed, as the one-token
    // attention's closing barrier (attention.cu): each rank's reads of its peers' partials are
    // consumed (its sums and stores used them) before it arrives, and the y stores need no ordering
    // with the peers, so no release fence has to wait for them; cluster.sync()'s arrive is a
    // release, which held the attention's last barrier ~3000 cycles (a clock64 probe on an H100).
    // Here not measured yet (written without a GPU).
    if (S > 1) {
        asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
        asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
    }
}

// ---------------------------------------------------------------------------- reference kernel

struct RefParams {
    LinearFormat    format;
    const uint8_t*  w;
    const uint8_t*  scale;
    const uint16_t* x;            // [M, x_ld]; row n reads columns (n / group_rows)·K .. + K when grouped
    void*           y;            // [M, N] f32 or bf16
    int64_t w_row_bytes, s_row_bytes, x_ld;
    int     N, K, M, group_rows;
    float   scale_2;
    bool    out_bf16;
};

__constant__ float kE2m1Table[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                     -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

__device__ __forceinline__ float e4m3_f32(uint8_t b) {
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(b), __NV_E4M3)));
}
__device__ __forceinline__ float e8m0_f32(uint8_t b) {
    if (b == 255) return __int_as_float(0x7FC00000);
    return b == 0 ? __int_as_float(0x00400000) : __int_as_float(static_cast<int>(b) << 23);
}

// The e2m1 code of element k of a kernel-order fp4 row (nibble j of a word holds k = kFp4Order[j]).
__device__ __forceinline__ uint32_t fp4_code(const uint8_t* row, int k) {
    const int nib = (k & ~7) + ((k & 1) ? 4 + ((k & 7) >> 1) : ((k & 7) >> 1));
    return (row[nib / 2] >> (4 * (nib & 1))) & 0xFu;
}

// Weight (n, k) decoded exactly as Linear::decode_row does (same products in the same order).
__device__ __forceinline__ float ref_weight(const RefParams& p, int n, int k) {
    const uint8_t* row = p.w + n * p.w_row_bytes;
    switch (p.format) {
        case LinearFormat::f32: return reinterpret_cast<const float*>(row)[k];
        case LinearFormat::bf16: return __uint_as_float(uint32_t(reinterpret_cast<const uint16_t*>(row)[k]) << 16);
        case LinearFormat::fp8_block: {
            const int b = (k & ~3) | ((k & 1) << 1) | ((k & 2) >> 1);   // kernel order [k0 k2 k1 k3]
            return e4m3_f32(row[b]) * e8m0_f32(p.scale[(n / kFp8Block) * p.s_row_bytes + k / kFp8Block]);
        }
        case LinearFormat::mxfp4:
            return kE2m1Table[fp4_code(row, k)] * e8m0_f32(p.scale[n * p.s_row_bytes + k / 32]);
        case LinearFormat::nvfp4: {
            const float s = e4m3_f32(p.scale[n * p.s_row_bytes + k / 16]);
            if (s == 0.0f) return 0.0f;
            return kE2m1Table[fp4_code(row, k)] * s * p.scale_2;
        }
    }
    return 0.0f;
}

// One warp per output row, lanes stride over K, fp32 FMA, shuffle reduction. M ≤ 16.
static __global__ void __launch_bounds__(kThreads) linear_reference_kernel(const RefParams p) {
    const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
    const int n = static_cast<int>(blockIdx.x) * kWarps + warp;
    if (n >= p.N) return;
    const uint16_t* x = p.x + (p.group_rows ? static_cast<int64_t>(n / p.group_rows) * p.K : 0);
    float acc[kMaxM];
#pragma unroll
    for (int t = 0; t < kMaxM; ++t) acc[t] = 0.0f;
    for (int k = lane; k < p.K; k += 32) {
        const float w = ref_weight(p, n, k);
#pragma unroll
        for (int t = 0; t < kMaxM; ++t)
            if (t < p.M) acc[t] = fmaf(w, __uint_as_float(uint32_t(x[static_cast<int64_t>(t) * p.x_ld + k]) << 16), acc[t]);
    }
#pragma unroll
    for (int t = 0; t < kMaxM; ++t) {
        float v = acc[t];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
        if (lane == 0 && t < p.M) {
            const int64_t i = static_cast<int64_t>(t) * p.N + n;
            if (p.out_bf16) static_cast<__nv_bfloat16*>(p.y)[i] = __float2bfloat16_rn(v);
            else static_cast<float*>(p.y)[i] = v;
        }
    }
}

// ---------------------------------------------------------------------------- host side

// Weights per 16-byte load (Traits<F>::kElems on the device).
int elems_per_16b(LinearFormat f) { return 128 / format_info(f).weight_bits; }

int x_row_mod(LinearFormat f) {
    switch (f) {
        case LinearFormat::bf16: return Traits<LinearFormat::bf16>::kRowMod;
        case LinearFormat::fp8_block: return Traits<LinearFormat::fp8_block>::kRowMod;
        case LinearFormat::mxfp4: return Traits<LinearFormat::mxfp4>::kRowMod;
        default: return Traits<LinearFormat::nvfp4>::kRowMod;
    }
}

using SmallMKernel = void (*)(SmallMParams);

SmallMKernel small_m_kernel(LinearFormat f, int mt, int nt, int stages) {
#define MEGAMOE_PICK_ST(F, ST)                                                                          \
    return mt == 2 ? (nt == 2 ? linear_small_m_kernel<F, 2, 2, ST> : linear_small_m_kernel<F, 2, 1, ST>) \
                   : (nt == 2 ? linear_small_m_kernel<F, 1, 2, ST> : linear_small_m_kernel<F, 1, 1, ST>)
#define MEGAMOE_PICK(F) MEGAMOE_PICK_ST(F, kStages)
    switch (f) {
        case LinearFormat::bf16:
            if (stages == kDeepStages) MEGAMOE_PICK_ST(LinearFormat::bf16, kDeepStages);
            MEGAMOE_PICK(LinearFormat::bf16);
        case LinearFormat::fp8_block: MEGAMOE_PICK(LinearFormat::fp8_block);
        case LinearFormat::mxfp4: MEGAMOE_PICK(LinearFormat::mxfp4);
        case LinearFormat::nvfp4: MEGAMOE_PICK(LinearFormat::nvfp4);
        default: fail("linear_small_m: no fast kernel for ", linear_format_name(f));
    }
#undef MEGAMOE_PICK
#undef MEGAMOE_PICK_ST
}

int current_device() {
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    return dev;
}

// Per-device facts the planner needs, looked up once: the kernels' raised shared-memory limit
// (default 48 KB) and how many CTAs of a kernel instance fit on the GPU at once for a cluster
// size and shared-memory size (cudaOccupancyMaxActiveClusters: clusters must fit in one GPC, so
// this is not simply CTAs/SM × SMs).
class Occupancy {
public:
    static Occupancy& get() {
        static Occupancy o;
        return o;
    }

    int resident_ctas(SmallMKernel k, int dev, int cluster, size_t smem) {
        const Key key{reinterpret_cast<uintptr_t>(k), dev, cluster, static_cast<int>(smem)};
        std::lock_guard<std::mutex> lk(m_);
        auto it = cache_.find(key);
        if (it != cache_.end()) return it->second;
        raise_dynamic_smem(reinterpret_cast<const void*>(k), kXSmemBudget + kRingSmemMax + kRedSmemMax);
        int n = 0;
        if (cluster == 1) {
            int per_sm = 0, sms = 0;
            CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k, kThreads, smem));
            CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
            n = per_sm * sms;
        } else {
            cudaLaunchConfig_t cfg = {};
            cfg.gridDim = dim3(static_cast<unsigned>(cluster), 1, 1);
            cfg.blockDim = dim3(kThreads, 1, 1);
            cfg.dynamicSmemBytes = smem;
            cudaLaunchAttribute attr[1];
            attr[0].id = cudaLaunchAttributeClusterDimension;
            attr[0].val.clusterDim.x = static_cast<unsigned>(cluster);
            attr[0].val.clusterDim.y = 1;
            attr[0].val.clusterDim.z = 1;
            cfg.attrs = attr;
            cfg.numAttrs = 1;
            int clusters = 0;
            CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, k, &cfg));
            n = clusters * cluster;
        }
        cache_[key] = n;
        return n;
    }

private:
    struct Key {
        uintptr_t k;
        int dev, cluster, smem;
        bool operator<(const Key& o) const {
            return std::tie(k, dev, cluster, smem) < std::tie(o.k, o.dev, o.cluster, o.smem);
        }
    };
    std::mutex m_;
    std::map<Key, int> cache_;
};

struct Plan {
    int mt = 1, nt = 1, wr = 1, s = 1, spc = 0, spw = 0, x_rs = 0, row_blocks = 0;
    int stages = kStages;   // ring slots per warp (ring_stages)
    size_t smem = 0;
    double cost = 0;   // model time, µs
};

// Shapes for one launch of M ≤ 16 tokens: MT (row tiles per warp), W_r (row groups per CTA, so
// W_k = 8 / W_r warps split the CTA's K range) and S (CTAs of a cluster along K). Each candidate
// is scored with a small model: the launch runs in `waves` rounds of at most `resident` CTAs
// (the measured occupancy of that kernel, cluster size and shared memory); each round costs a
// latency floor, and the bytes (weights, plus x staged from L2 at half weight) stream at the
// memory bandwidth times the fraction of CTA slots the launch keeps busy. Lowest model time
// wins; ties keep the earlier candidate (more rows per CTA: better x reuse, fewer partials).
// Returns false if x for M tokens does not fit the shared-memory budget even with S = 8 (or no
// row block size divides group_rows, for a grouped linear).
bool plan_small_m(LinearFormat f, int64_t N, int64_t steps, int M, int dev, int64_t group_rows, Plan& out) {
    constexpr double kBandwidth = 4.0e6;     // bytes/µs of HBM (order of magnitude; H100 3.35, H200 4.8 TB/s)
    constexpr double kRoundUs = 2.0;         // latency floor of a round: x stage, loads, reduction
    // Each CTA of a cluster beyond the first adds latency that the bandwidth term does not see
    // (a cluster's CTAs start together in one GPC, sync twice, and read each other's partials).
    // Fitted on an H200 (megamoe-linear-bench, 2026-12-04, the planner restricted to S ≤ 1, 2, 4,
    // 8 in one run, then this term at 0.15-1.0 µs in two consecutive runs): at M = 1 the S = 8
    // the model chose without it lost to S = 2 (FP8 wkv 5.20 against 3.92 µs, wq_a 6.44 against 4.74, NVFP4 w1
    // 7.03 against 5.38); with the term at 0.6, M = 1 and 4 gain up to 1.7 µs per linear (BF16
    // wq_b ~6 µs) and the one loss is 0.26 µs (NVFP4 wq_b at M = 4, 11.71 → 11.97, measured in
    // consecutive calls). From M = 8 the smaller x slice of each CTA pays for the split
    // (wq_a at M = 16: 8.2 µs at S = 8 against 12.2 at S = 2), and the 20-layer V4-Flash step at
    // B = 8 ran 1.5% slower with the term than without, so it applies up to M = 4 only.
    constexpr double kClusterRankUs = 0.6;
    const double cluster_us = M <= 4 ? kClusterRankUs : 0.0;
    const int step_k = 4 * elems_per_16b(f);
    const int64_t t16 = ceil_div(N, 16);
    const int nt = M > 8 ? 2 : 1;
    const int stages = ring_stages(f, M);
    bool found = false;
    for (int mt : {2, 1}) {
        if (mt == 2 && t16 < 2) continue;
        const SmallMKernel k = small_m_kernel(f, mt, nt, stages);
        for (int wr : {8, 4, 2, 1}) {
            if (wr > 1 && wr * mt > t16) continue;
            const int64_t rows = int64_t(wr) * 16 * mt;
            const int64_t rb = ceil_div(N, rows);
            if (rb > 65535) continue;
            if (group_rows > 0 && group_rows % rows != 0) continue;   // a CTA's rows lie in one group
            for (int s = 1; s <= kMaxCluster; s *= 2) {
                if (s > 1 && s > steps) break;
                const int64_t spc = ceil_div(steps, s);
                const int64_t wk = kWarps / wr;
                const int64_t x_rs = ceil_div(spc * step_k * 2, 128) * 128 + x_row_mod(f);
                if (int64_t(M) * x_rs > kXSmemBudget) continue;
                const size_t ring = size_t(kWarps) * stages * (mt == 2 ? StageLayout<2>::kBytes : StageLayout<1>::kBytes);
                const size_t smem = static_cast<size_t>(M) * x_rs + ring + size_t(wk) * M * rows * sizeof(float);
                const int64_t ctas = rb * s;
                const int resident = Occupancy::get().resident_ctas(k, dev, s, smem);
                if (resident <= 0) continue;
                const int64_t waves = ceil_div(ctas, resident);
                const double busy = double(ctas) / double(waves * resident);
                const double bytes = double(ctas) * (double(rows) * spc * kStepBytes + 0.5 * double(M) * spc * step_k * 2);
                const double cost =
                    double(waves) * kRoundUs + double(s - 1) * cluster_us + bytes / (kBandwidth * busy);
                if (!found || cost < out.cost * 0.98) {
                    out.mt = mt;
                    out.nt = nt;
                    out.stages = stages;
                    out.wr = wr;
                    out.s = s;
                    out.spc = static_cast<int>(spc);
                    out.spw = static_cast<int>(ceil_div(spc, wk));
                    out.x_rs = static_cast<int>(x_rs);
                    out.row_blocks = static_cast<int>(rb);
                    out.smem = smem;
                    out.cost = cost;
                    found = true;
                }
            }
        }
    }
    return found;
}

void launch_small_m(const SmallMParams& prm, const Plan& plan, LinearFormat f, cudaStream_t stream) {
    const SmallMKernel kernel = small_m_kernel(f, plan.mt, plan.nt, plan.stages);
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(plan.s), static_cast<unsigned>(plan.row_blocks), 1);
    cfg.blockDim = dim3(kThreads, 1, 1);
    cfg.dynamicSmemBytes = plan.smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[2];
    unsigned n_attr = 0;
    // Programmatic dependent launch: may start while the previous kernel of the stream runs (see
    // griddepcontrol in the kernel); measured 0.3-0.6 µs per launch on back-to-back launches.
    attr[n_attr].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n_attr].val.programmaticStreamSerializationAllowed = 1;
    ++n_attr;
    if (plan.s > 1) {
        attr[n_attr].id = cudaLaunchAttributeClusterDimension;
        attr[n_attr].val.clusterDim.x = static_cast<unsigned>(plan.s);
        attr[n_attr].val.clusterDim.y = 1;
        attr[n_attr].val.clusterDim.z = 1;
        ++n_attr;
    }
    cfg.attrs = attr;
    cfg.numAttrs = n_attr;
    const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, prm);
    if (err != cudaSuccess) {
        (void)cudaGetLastError();   // a refused launch is not sticky; leave no error for the next call
        fail(__FILE__, ":", __LINE__, ": linear_small_m launch (grid ", plan.s, "x", plan.row_blocks, ", smem ",
             plan.smem, "): ", cudaGetErrorString(err));
    }
}

// Whether linear_small_m hands a call to linear_regs (linear.cu, top): FP8 weights always where it
// fits; BF16 weights only above kDeepMaxM tokens, where the ring kernel runs 3 stages. Measured
// on an H100 (megamoe-linear-bench, "bf16" against "bf16rg", one run), µs at M = 1 / 16: wq_a 6.13
// / 6.70 against 5.79 / 8.44, wkv 4.87 / 5.64 against 4.56 / 9.85, gate 4.47 / 5.40 against 3.99 /
// 7.82, wo_b 23.40 / 25.21 against 26.12 / 32.06, shared w2 7.37 / 8.24 against 8.40 / 11.96:
// with its 6-stage ring the ring kernel is as fast or faster at 1-4 tokens on the small BF16
// matrices (the router gate, the compressors), and the 8-layer batch-1 step measured no faster
// with every BF16 linear on linear_regs; at 16 tokens linear_regs is faster on every shape.
// Grouped linears stay on the ring (wo_a beside the attention, see the top of this file).
bool takes_regs(const DeviceLinear& w, const uint16_t* x, int64_t M, const LinearOptions& o) {
    if (o.ring || o.groups != 1 || !regs_fits(w, x, o)) return false;
    return w.format != LinearFormat::bf16 || M > kDeepMaxM;
}

void check_launch_args(const DeviceLinear& w, const uint16_t* x, int64_t M, const void* y, const LinearOptions& o,
                       const char* what) {
    MEGAMOE_CHECK(o.groups >= 1 && w.out % o.groups == 0, what, ": ", o.groups, " groups do not divide ", w.out, " rows");
    MEGAMOE_CHECK(w.weight != nullptr, what, ": weights not uploaded");
    MEGAMOE_CHECK(M >= 0, what, ": M = ", M);
    MEGAMOE_CHECK(M == 0 || (x != nullptr && y != nullptr), what, ": null x or y");
    MEGAMOE_CHECK(w.out > 0 && w.out <= std::numeric_limits<int>::max() && w.in > 0 &&
                      w.in <= std::numeric_limits<int>::max() / 4,
                  what, ": unsupported shape [", w.out, ", ", w.in, "]");
    MEGAMOE_CHECK(w.format == LinearFormat::f32 || w.format == LinearFormat::bf16 || w.scale != nullptr, what,
                  ": scales not uploaded");
}

void launch_reference(const DeviceLinear& w, const uint16_t* x, int64_t M, void* y, const LinearOptions& o,
                      cudaStream_t stream) {
    RefParams p;
    p.format = w.format;
    p.w = static_cast<const uint8_t*>(w.weight);
    p.scale = static_cast<const uint8_t*>(w.scale);
    p.x = x;
    p.y = y;
    p.w_row_bytes = w.weight_row_bytes;
    p.s_row_bytes = w.scale_row_bytes;
    p.x_ld = w.in * o.groups;
    p.N = static_cast<int>(w.out);
    p.K = static_cast<int>(w.in);
    p.M = static_cast<int>(M);
    p.group_rows = o.groups > 1 ? static_cast<int>(w.out / o.groups) : 0;
    p.scale_2 = w.scale_2;
    p.out_bf16 = o.out_bf16;
    const unsigned blocks = static_cast<unsigned>(ceil_div(w.out, kWarps));
    linear_reference_kernel<<<blocks, kThreads, 0, stream>>>(p);
    CUDA_CHECK(cudaGetLastError());
}

}  // namespace

// ---------------------------------------------------------------------------- public API

int64_t packed_row_bytes(LinearFormat f, int64_t in) {
    const FormatInfo& fi = format_info(f);
    fi.check_in(in, "linear");
    return fi.packed_row_bytes(in);
}

int64_t device_row_bytes(LinearFormat f, int64_t in) {
    return ceil_div(packed_row_bytes(f, in), kStepBytes) * kStepBytes;
}

size_t DeviceLinear::bytes() const {
    // As the checkpoint stores them, less NVFP4's input_scale (not uploaded; weight_scale_2 is scale_2).
    const FormatInfo& fi = format_info(format);
    return static_cast<size_t>(out * fi.packed_row_bytes(in) + fi.scale_rows(out) * fi.scale_cols(in)) +
           (fi.global_scales ? sizeof(float) : 0);
}

int gpu_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();   // clear the sticky-free error so later calls start clean
        return 0;
    }
    return n;
}

bool gpu_available() { return gpu_count() > 0; }

namespace {

void expect_tensor(const Tensor& t, const char* what, std::initializer_list<DType> dtypes,
                   std::initializer_list<int64_t> shape) {
    MEGAMOE_CHECK(!t.empty(), "upload_linear: ", what, " is missing");
    MEGAMOE_CHECK(t.device == Device::cpu, "upload_linear: ", what, " is not in host memory");
    bool dtype_ok = false;
    for (DType d : dtypes) dtype_ok |= t.dtype == d;
    if (!dtype_ok) fail("upload_linear: ", what, " has dtype ", dtype_name(t.dtype));
    bool shape_ok = t.ndim == static_cast<int>(shape.size());
    int i = 0;
    for (int64_t d : shape) shape_ok = shape_ok && t.dim(i++) == d;
    if (!shape_ok) {
        std::string want = "[";
        i = 0;
        for (int64_t d : shape) want += (i++ ? ", " : "") + std::to_string(d);
        fail("upload_linear: ", what, " has shape ", t.shape_str(), ", expected ", want, "]");
    }
}

// Rows of `row_bytes` from host `src` into device rows of `dst_row_bytes`; the padding at each
// row's end gets `fill`.
void copy_rows(void* dst, int64_t dst_row_bytes, const void* src, int64_t row_bytes, int64_t rows, int fill) {
    if (rows == 0 || row_bytes == 0) return;
    if (dst_row_bytes == row_bytes) {
        CUDA_CHECK(cudaMemcpy(dst, src, static_cast<size_t>(rows * row_bytes), cudaMemcpyHostToDevice));
        return;
    }
    CUDA_CHECK(cudaMemset(dst, fill, static_cast<size_t>(rows * dst_row_bytes)));
    CUDA_CHECK(cudaMemcpy2D(dst, static_cast<size_t>(dst_row_bytes), src, static_cast<size_t>(row_bytes),
                            static_cast<size_t>(row_bytes), static_cast<size_t>(rows), cudaMemcpyHostToDevice));
}

}  // namespace

LinearLayout linear_layout(LinearFormat f, int64_t out, int64_t in) {
    MEGAMOE_CHECK(out > 0, "linear_layout: ", out, " rows");
    const FormatInfo& fi = format_info(f);
    LinearLayout l;
    l.weight_row_bytes = device_row_bytes(f, in);
    l.weight_bytes = static_cast<size_t>(out * l.weight_row_bytes);
    if (fi.has_scales()) {
        // The scales of a padded weight row: fp4's padded groups get scales too; fp8's 64-byte
        // padding never adds a 128-column block, so its rows stay the checkpoint's ceil(in/128).
        l.scale_rows = fi.scale_rows(out);
        l.scale_row_bytes = fi.scale_cols(l.weight_row_bytes * 8 / fi.weight_bits);
        // + 16: the kernels copy 4-byte aligned words around each scale byte they need.
        l.scale_bytes = static_cast<size_t>(l.scale_rows * l.scale_row_bytes) + 16;
    }
    return l;
}

void to_kernel_order(LinearFormat f, uint8_t* bytes, int64_t n) {
    MEGAMOE_CHECK(n % 4 == 0, "to_kernel_order: ", n, " bytes is not a whole number of words");
    for (int64_t i = 0; i < n; i += 4) {
        uint32_t q;
        std::memcpy(&q, bytes + i, 4);
        uint32_t r = q;
        if (f == LinearFormat::fp8_block) {
            r = (q & 0xFF0000FFu) | ((q >> 8) & 0x0000FF00u) | ((q << 8) & 0x00FF0000u);   // [k0 k2 k1 k3]
        } else if (f == LinearFormat::mxfp4 || f == LinearFormat::nvfp4) {
            r = 0;
            for (int j = 0; j < 8; ++j) r |= ((q >> (4 * kFp4KernelOrder[j])) & 0xFu) << (4 * j);
        }
        std::memcpy(bytes + i, &r, 4);
    }
}

void from_kernel_order(LinearFormat f, uint8_t* bytes, int64_t n) {
    MEGAMOE_CHECK(n % 4 == 0, "from_kernel_order: ", n, " bytes is not a whole number of words");
    for (int64_t i = 0; i < n; i += 4) {
        uint32_t q;
        std::memcpy(&q, bytes + i, 4);
        uint32_t r = q;
        if (f == LinearFormat::fp8_block) {
            r = (q & 0xFF0000FFu) | ((q >> 8) & 0x0000FF00u) | ((q << 8) & 0x00FF0000u);   // the swap is its own inverse
        } else if (f == LinearFormat::mxfp4 || f == LinearFormat::nvfp4) {
            r = 0;
            for (int j = 0; j < 8; ++j) r |= ((q >> (4 * j)) & 0xFu) << (4 * kFp4KernelOrder[j]);
        }
        std::memcpy(bytes + i, &r, 4);
    }
}

DeviceLinear upload_linear(const Linear& h, DeviceArena& arena) {
    MEGAMOE_CHECK(h.out > 0 && h.in > 0, "upload_linear: shape [", h.out, ", ", h.in, "]");
    const FormatInfo& fi = format_info(h.format);
    fi.check_in(h.in, "upload_linear");
    expect_tensor(h.weight, "weight", {fi.weight_dtype, fi.weight_dtype_alt}, {h.out, fi.weight_cols(h.in)});
    if (fi.has_scales())
        expect_tensor(h.scale, fi.scale_suffix, {fi.scale_dtype, DType::u8}, {fi.scale_rows(h.out), fi.scale_cols(h.in)});
    if (fi.global_scales) expect_tensor(h.scale_2, "weight_scale_2", {DType::f32}, {});

    const LinearLayout lay = linear_layout(h.format, h.out, h.in);
    DeviceLinear d;
    d.format = h.format;
    d.out = h.out;
    d.in = h.in;
    d.weight_row_bytes = lay.weight_row_bytes;
    d.scale_row_bytes = lay.scale_row_bytes;
    if (fi.global_scales) d.scale_2 = *h.scale_2.as<float>();
    d.weight = arena.take(lay.weight_bytes);
    if (lay.scale_bytes) d.scale = arena.take(lay.scale_bytes);
    if (arena.counting()) return d;   // a plan: layout only

    const int64_t row_bytes = fi.packed_row_bytes(h.in);
    if (fi.weight_bits <= 8) {
        // fp8 / fp4: padded rows in kernel order, made on the host in slices of rows (bounded memory).
        const int64_t rows_per = std::max<int64_t>(1, (64ll << 20) / d.weight_row_bytes);
        std::vector<uint8_t> buf;
        for (int64_t r0 = 0; r0 < h.out; r0 += rows_per) {
            const int64_t n = std::min(rows_per, h.out - r0);
            buf.assign(static_cast<size_t>(n * d.weight_row_bytes), 0);
            const uint8_t* src = h.weight.as<uint8_t>() + r0 * row_bytes;
            for (int64_t r = 0; r < n; ++r)
                std::memcpy(buf.data() + r * d.weight_row_bytes, src + r * row_bytes, static_cast<size_t>(row_bytes));
            to_kernel_order(h.format, buf.data(), static_cast<int64_t>(buf.size()));
            CUDA_CHECK(cudaMemcpy(static_cast<uint8_t*>(d.weight) + r0 * d.weight_row_bytes, buf.data(), buf.size(),
                                  cudaMemcpyHostToDevice));
        }
    } else {
        copy_rows(d.weight, d.weight_row_bytes, h.weight.data, row_bytes, h.out, 0);
    }

    const uint8_t* sc = h.scale.empty() ? nullptr : h.scale.as<uint8_t>();
    const int64_t scale_rows = fi.scale_rows(h.out), scale_cols = fi.scale_cols(h.in);
    if (fi.has_scales()) {
        const int fill = h.format == LinearFormat::mxfp4 ? 127 : 0;   // MXFP4: 2^0 for the padded groups (codes 0)
        copy_rows(d.scale, d.scale_row_bytes, sc, scale_cols, scale_rows, fill);
    }

    // The bias shift F: the largest finite e8m0 scale must keep the kernel's bf16 multiplier
    // 2^(e + bias - 127) finite (fp8 bias 120, mxfp4 126, so e ≤ 134 / 128 need no shift).
    if (h.format == LinearFormat::fp8_block || h.format == LinearFormat::mxfp4) {
        int max_e = 0;
        for (int64_t i = 0; i < scale_rows * scale_cols; ++i)
            if (sc[i] != 255) max_e = std::max(max_e, static_cast<int>(sc[i]));
        const int limit = h.format == LinearFormat::fp8_block ? 134 : 128;
        d.exp_shift = std::max(0, max_e - limit);
    }
    if (h.format == LinearFormat::fp8_block) {
        const uint8_t* wb = h.weight.as<uint8_t>();
        const int64_t n = h.out * h.in;
        for (int64_t i = 0; i < n && !d.nan_codes; ++i) d.nan_codes = (wb[i] & 0x7F) == 0x7F;
    }
    return d;
}

size_t upload_linear_bytes(const Linear& h) {
    DeviceArena plan;
    (void)upload_linear(h, plan);
    return plan.used();
}

OwnedLinear::OwnedLinear(const Linear& host)
    : arena_(upload_linear_bytes(host), "linear weights"), view_(upload_linear(host, arena_)) {}

OwnedLinear copy_linear(const DeviceLinear& w) {
    MEGAMOE_CHECK(w.weight != nullptr, "copy_linear: weights not uploaded");
    const LinearLayout lay = linear_layout(w.format, w.out, w.in);
    const size_t wbytes = lay.weight_bytes, sbytes = lay.scale_bytes;
    OwnedLinear c;
    c.arena_ = DeviceArena(DeviceArena::round_up(wbytes) + DeviceArena::round_up(sbytes), "linear weights");
    c.view_ = w;
    c.view_.weight = c.arena_.take(wbytes);
    CUDA_CHECK(cudaMemcpy(c.view_.weight, w.weight, wbytes, cudaMemcpyDeviceToDevice));
    c.view_.scale = nullptr;
    if (sbytes) {
        c.view_.scale = c.arena_.take(sbytes);
        CUDA_CHECK(cudaMemcpy(c.view_.scale, w.scale, sbytes, cudaMemcpyDeviceToDevice));
    }
    return c;
}

PackedBytes download_packed(const DeviceLinear& w) {
    MEGAMOE_CHECK(w.weight != nullptr, "download_packed: weights not uploaded");
    PackedBytes b;
    const int64_t row_bytes = packed_row_bytes(w.format, w.in);
    std::vector<uint8_t> dev_rows(static_cast<size_t>(w.out * w.weight_row_bytes));
    CUDA_CHECK(cudaMemcpy(dev_rows.data(), w.weight, dev_rows.size(), cudaMemcpyDeviceToHost));
    from_kernel_order(w.format, dev_rows.data(), static_cast<int64_t>(dev_rows.size()));
    b.weight.resize(static_cast<size_t>(w.out * row_bytes));
    for (int64_t r = 0; r < w.out; ++r)
        std::memcpy(b.weight.data() + r * row_bytes, dev_rows.data() + r * w.weight_row_bytes, static_cast<size_t>(row_bytes));
    const FormatInfo& fi = format_info(w.format);
    const int64_t rows = fi.scale_rows(w.out), cols = fi.scale_cols(w.in);
    if (rows > 0) {
        b.scale.resize(static_cast<size_t>(rows * cols));
        CUDA_CHECK(cudaMemcpy2D(b.scale.data(), static_cast<size_t>(cols), w.scale,
                                static_cast<size_t>(w.scale_row_bytes), static_cast<size_t>(cols),
                                static_cast<size_t>(rows), cudaMemcpyDeviceToHost));
    }
    return b;
}

void linear_reference(const DeviceLinear& w, const uint16_t* x, int64_t M, void* y, const LinearOptions& o,
                      CUstream_st* stream) {
    check_launch_args(w, x, M, y, o, "linear_reference");
    const int64_t y_row = w.out * (o.out_bf16 ? 2 : 4);
    for (int64_t m0 = 0; m0 < M; m0 += kMaxM) {
        const int64_t m = std::min<int64_t>(kMaxM, M - m0);
        launch_reference(w, x + m0 * w.in * o.groups, m, static_cast<uint8_t*>(y) + m0 * y_row, o, stream);
    }
}

std::string linear_small_m_plan(const DeviceLinear& w, int64_t M, const LinearOptions& o) {
    check_launch_args(w, nullptr, 0, nullptr, o, "linear_small_m_plan");
    if (w.format == LinearFormat::f32 || w.nan_codes) return "reference kernel";
    // (x's alignment is not known here: the plan assumes an aligned x, as every caller in the tree has.)
    if (takes_regs(w, reinterpret_cast<const uint16_t*>(uintptr_t{16}), M, o)) return linear_regs_plan(w, M);
    int m = static_cast<int>(std::clamp<int64_t>(M, 1, kMaxM));
    Plan plan;
    const int64_t group_rows = o.groups > 1 ? w.out / o.groups : 0;
    while (!plan_small_m(w.format, w.out, w.weight_row_bytes / kStepBytes, m, current_device(), group_rows, plan)) {
        if (m == 1) return "no plan (K too large, or no row block divides the group)";
        m = (m + 1) / 2;
    }
    return str("MT=", plan.mt, " NT=", plan.nt, " stages=", plan.stages, " Wr=", plan.wr, " Wk=", kWarps / plan.wr,
               " S=", plan.s, " grid=", plan.s, "x", plan.row_blocks, " steps/warp=", plan.spw, " smem=", plan.smem,
               " model=", static_cast<int>(plan.cost * 10) / 10.0, "us");
}

void linear_small_m(const DeviceLinear& w, const uint16_t* x, int64_t M, void* y, const LinearOptions& o,
                    CUstream_st* stream) {
    check_launch_args(w, x, M, y, o, "linear_small_m");
    if (M == 0) return;
    if (w.format == LinearFormat::f32 || w.nan_codes) {
        linear_reference(w, x, M, y, o, stream);
        return;
    }
    if (takes_regs(w, x, M, o)) {
        linear_regs(w, x, M, y, o, stream);
        return;
    }
    const int dev = current_device();
    const int64_t steps = w.weight_row_bytes / kStepBytes;
    const int64_t group_rows = o.groups > 1 ? w.out / o.groups : 0;
    const int64_t x_ld = w.in * o.groups;
    const int64_t y_row = w.out * (o.out_bf16 ? 2 : 4);
    int64_t m0 = 0;
    while (m0 < M) {
        // Up to 16 tokens per launch; fewer only if x for 16 would not fit shared memory.
        int m = static_cast<int>(std::min<int64_t>(kMaxM, M - m0));
        Plan plan;
        while (!plan_small_m(w.format, w.out, steps, m, dev, group_rows, plan)) {
            if (m == 1) {
                if (group_rows > 0) {   // no CTA row count divides the group: the exact kernel does it
                    linear_reference(w, x + m0 * x_ld, M - m0, static_cast<uint8_t*>(y) + m0 * y_row, o, stream);
                    return;
                }
                fail("linear_small_m: K = ", w.in, " is too large for the shared-memory x stage");
            }
            m = (m + 1) / 2;
        }
        SmallMParams p;
        p.w = static_cast<const uint8_t*>(w.weight);
        p.scale = static_cast<const uint8_t*>(w.scale);
        p.x = x + m0 * x_ld;
        p.y = static_cast<uint8_t*>(y) + m0 * y_row;
        p.x_ld = x_ld;
        p.group_rows = static_cast<int>(group_rows);
        p.out_bf16 = o.out_bf16;
        p.w_row_bytes = w.weight_row_bytes;
        p.s_row_bytes = w.scale_row_bytes;
        p.N = static_cast<int>(w.out);
        p.K = static_cast<int>(w.in);
        p.M = m;
        p.steps = static_cast<int>(steps);
        p.spc = plan.spc;
        p.spw = plan.spw;
        p.wr = plan.wr;
        p.x_rs = plan.x_rs;
        p.bias = 0;
        p.out_scale = 1.0f;
        kernel_scales(w, p.bias, p.out_scale);
        launch_small_m(p, plan, w.format, stream);
        CUDA_CHECK(cudaGetLastError());
        m0 += m;
    }
}

void linear_small_m(const DeviceLinear& w, const uint16_t* x, int64_t M, float* y, CUstream_st* stream) {
    linear_small_m(w, x, M, y, LinearOptions{}, stream);
}

void linear_reference(const DeviceLinear& w, const uint16_t* x, int64_t M, float* y, CUstream_st* stream) {
    linear_reference(w, x, M, y, LinearOptions{}, stream);
}

std::string linear_small_m_plan(const DeviceLinear& w, int64_t M) { return linear_small_m_plan(w, M, LinearOptions{}); }

void kernel_scales(const DeviceLinear& w, int& bias, float& out_scale) {
    bias = 0;
    out_scale = 1.0f;
    switch (w.format) {
        case LinearFormat::fp8_block:
            bias = 120 - w.exp_shift;
            out_scale = std::ldexp(1.0f, w.exp_shift);
            break;
        case LinearFormat::mxfp4:
            bias = 126 - w.exp_shift;
            out_scale = std::ldexp(1.0f, w.exp_shift);
            break;
        case LinearFormat::nvfp4: out_scale = w.scale_2 * std::ldexp(1.0f, kNvfp4Shift); break;
        default: break;
    }
}

}  // namespace megamoe::cuda
