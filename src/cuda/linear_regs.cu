// linear_regs.cu — register-streamed linears for decode / small M (≤ 64 tokens per launch), on
// sm_90a: linear_fp8_act, FP8 weights × FP8 activations,
// y[M, N] = (q · s)[M, K] · Wᵀ with W in the checkpoint's FP8 128×128-block format and the
// activation in act_quant form (ActFp8, linear.h); and linear_regs, FP8 or BF16 weights × BF16
// activations on the same layout ("BF16 activations" below). One kernel, linear_regs_kernel, runs
// all three (MODE).
//
// Why a second small-M kernel. linear_small_m (linear.cu) gives the tensor core BF16 weights, so
// every FP8 byte is decoded in registers (6 integer ops per 4 weights plus a scale multiply per
// pair): measured with Nsight Compute on an H200 (wq_b 32768×1024 at M = 1), 153 instructions per
// 1 KB warp step, 4 of them MMAs, the schedulers issuing every other cycle; the kernel took 14 µs
// with its 32 MB already in L2 (a plain read of them: 5.4 µs), i.e. it is bound by instruction
// issue, not by HBM. Under the official numerics the activation a FP8 linear takes is itself FP8
// (round_gemm_input), so both operands can go to the tensor core as they are stored:
// mma.sync m16n8k32 e4m3 × e4m3 → f32 needs no decode at all: per 1 KB warp step the source has
// two 16-byte weight loads, one activation load and two MMAs per token tile, and every other step
// the block scaling (4 FMAs and three loads of scales).
//
// Layout. A warp owns 16 weight rows (the MMA's M, "swap AB": tokens are the MMA's N = 8 columns,
// 1, 2, 4 or 8 n-tiles for up to 8, 16, 32 or 64 tokens; with BF16 activations at 33-64 tokens two
// 16-row tiles, MT below) and a range of 64-byte steps along K; lane (g, tig) loads 16 bytes
// of rows g and g + 8 per step (ld.global.nc, no L1 allocation, 256-byte L2 prefetch) and, for
// token g (+ 8), the same 16 columns of q. The MMA's k order inside a step is free as long as A
// and B agree: the lane's words 0, 1 feed one MMA (as its k 4·tig.. and 16 + 4·tig..), words 2, 3
// the next, for weights and activation alike, and both are stored in kernel order (bytes k0 k2 k1
// k3 of every word), so no byte is moved. The weights stream through registers in batches of
// kU = 4 steps (2 from four n-tiles on), double-buffered (the next batch is in flight while this
// one is multiplied), with no shared memory and no barrier on the way.
//
// Numerics. Each 128-column block (two steps) is multiplied into a fresh f32 fragment, which is
// then scaled by the weight block's e8m0 scale times the activation block's scale (both powers
// of two, so the product is exact unless it leaves the f32 range) and added to the accumulator.
// The products of e4m3 codes are exact in f32 and the block sums of at most 128 of them are
// within 2^-24 relative: y differs from ops::linear on round_gemm_input(x) by summation order
// only (tests/cuda/linear_test.cpp: ≤ 3e-8 of Σ|w·x| on the V4 shapes, ≤ 2e-7 on random codes).
// The per-block promotion is also how the official code's FP8 GEMM accumulates.
//
// BF16 activations (linear_regs, the exact numerics' FP8 linears at decode): the same layout,
// loads and work split, with each weight decoded as linear_small_m decodes it (decode_a: e4m3 bits
// in a bf16 times the 128-block's 2^(e - bias), exact; one multiplier per block of two steps) and
// multiplied on m16n8k16 bf16 MMAs with x's bf16 values, which go from global memory (L1) into the
// B fragments. linear_small_m's own kernel stages x in shared memory, streams the weights through
// a cp.async ring of 3 slots per warp and splits K over a cluster; this layout measured faster on
// every V4-Flash shape at M = 1, 4 and 16 (linear.cu, top), and linear_small_m runs it for FP8.
//
// Work split (planned per shape, see plan_fp8): a CTA is 8 warps = wr row tiles × wk K-ranges
// (wk = 8 / wr); K-range partials are summed in shared memory in a fixed order (deterministic, no
// atomics). wk is chosen per shape (plan_fp8).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "core/common.h"
#include "cuda/device.cuh"
#include "cuda/device_info.h"
#include "cuda/linear.h"
#include "io/formats.h"

namespace megamoe::cuda {

namespace {

using namespace dev;

constexpr int kThreads = 256;               // 8 warps
constexpr int kWarps = kThreads / 32;
// Steps per register batch: 4 (two 128-column blocks) up to two token tiles; 2 from four tiles on,
// where each step's MMAs take NT times as long and the accumulators take the registers (NT = 8: 32
// f32 per lane).
template <int NT> constexpr int kU = NT >= 4 ? 2 : 4;
constexpr int kMaxTokens = 64;              // eight n8 tiles per launch
// Token tiles of a launch of m tokens: 1, 2, 4 or 8.
constexpr int token_tiles(int64_t m) { return m > 32 ? 8 : m > 16 ? 4 : m > 8 ? 2 : 1; }

struct Fp8Params {
    const uint8_t* w;       // [N] rows of w_row_bytes (kernel order)
    const uint8_t* scale;   // e8m0 [ceil(N/128), s_row_bytes]
    const uint8_t* q;       // e4m3 [M, K] (kernel order)             (FP8 activations)
    const float*   s;       // f32 [M, K/128]                         (FP8 activations)
    const uint16_t* xb;     // bf16 [M, x_ld]; group g's rows read columns g·K .. g·K + K (BF16 activations)
    void*          y;       // [M, N] f32 or bf16
    int64_t w_row_bytes, s_row_bytes;
    int64_t x_ld;           // BF16 activations: x row stride, elements (K · groups)
    int N, K, M;
    int steps;              // K / 64
    int spw;                // steps per warp (even)
    int wr;                 // row tiles per CTA (wk = 8 / wr)
    int group_rows;         // BF16 activations: rows per group (a multiple of 16), 0: one group
    int bias;               // BF16 activations: the decode bias (kernel_scales)
    float out_scale;        // BF16 activations: 2^F (kernel_scales); 1 otherwise
    bool out_bf16;
};

__device__ __forceinline__ uint4 ld_weights(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// c += A·B, m16n8k32, A row-major e4m3 (4 regs of 4 codes), B col-major e4m3 (2 regs), f32.
__device__ __forceinline__ void mma_e4m3(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// 2^(e-127) for an e8m0 byte, exact (e = 0: the f32 subnormal 2^-127; 255: NaN).
__device__ __forceinline__ float e8m0_value(uint32_t e) {
    return e == 0 ? __uint_as_float(0x00400000u) : (e == 255 ? __uint_as_float(0x7FC00000u) : __uint_as_float(e << 23));
}

template <int U, int MT> struct Batch {
    uint4 r0[MT][U], r1[MT][U];   // rows g and g + 8 of each row tile, U steps
};

// Grid (1, ceil(N / (16·MT·wr))), 256 threads. Warp w: row tile w % wr of the CTA's wr (16·MT rows
// each), K-range w / wr.
// BX: BF16 activations (linear_regs): the weights are decoded as linear_small_m decodes them
// (decode_a: e4m3 bits in a bf16 times the block's 2^(e - bias) multiplier, exact) and multiplied
// with x's bf16 values on m16n8k16 bf16 MMAs; x goes from global memory (L1) straight into the B
// fragments, as the FP8 codes do.
// MODE: kAct (FP8 activations, linear_fp8_act), kFp8W (FP8 weights, BF16 activations) or kBf16W
// (BF16 weights, BF16 activations: the weight bytes are the A fragments as they are); the last two
// are linear_regs.
constexpr int kAct = 0, kFp8W = 1, kBf16W = 2;
template <int NT> constexpr int kMinCtas = NT >= 4 ? 1 : 2;   // CTAs per SM the registers allow
// Partial sums of a CTA whose warps split K: (wk · wr · 16·MT rows) × 8·NT tokens, f32. Up to 32 KB
// they are a static array; MT = 2 at eight token tiles (64 KB) takes dynamic shared memory.
template <int NT, int MT> constexpr int kRedBytes = kWarps * 16 * MT * 8 * NT * 4;
template <int NT, int MT> constexpr bool kRedDynamic = kRedBytes<NT, MT> > 32 * 1024;
// MT: 16-row tiles per warp (1, or 2 with BF16 activations from 33 tokens on): each x fragment a
// lane loads feeds MT tiles' MMAs. At eight token tiles a warp step of one row tile reads 8 KB of
// x (from L1) per 1 KB of weights; two row tiles halve that, at 2 × 8 × 4 accumulators per lane.
template <int NT, int MODE, int MT>
__global__ void __launch_bounds__(kThreads, kMinCtas<NT>) linear_regs_kernel(const Fp8Params p) {
    static_assert(MT == 1 || (MT == 2 && MODE != kAct), "two row tiles per warp: BF16 activations only");
    constexpr bool BX = MODE != kAct;
    constexpr int kStepCols = MODE == kBf16W ? kStepBytes / 2 : kStepBytes;   // columns per 64-byte step
    constexpr int U = kU<NT>;
    constexpr int kWarpRows = 16 * MT;
    __shared__ float red_static[kRedDynamic<NT, MT> ? 1 : kRedBytes<NT, MT> / 4];
    extern __shared__ float red_dynamic[];
    float* red = kRedDynamic<NT, MT> ? red_dynamic : red_static;
    const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
    const int g = lane >> 2, tig = lane & 3;
    const int wk_count = kWarps / p.wr;
    const int wrow = warp % p.wr, wk = warp / p.wr;
    const int R = p.wr * kWarpRows;
    const int row0 = static_cast<int>(blockIdx.y) * R + wrow * kWarpRows;
    const int s0 = wk * p.spw;
    const int n = max(0, min(s0 + p.spw, p.steps) - s0);   // even: K % 128 == 0, spw even
    // Rows past N read row N - 1 (valid memory) and are never written. Row tile mt: rows
    // row0 + 16·mt + g (A rows g) and + 8 (A rows g + 8).
    const uint8_t* wa[MT];
    const uint8_t* wb[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const int ra = min(row0 + 16 * mt + g, p.N - 1), rb = min(row0 + 16 * mt + 8 + g, p.N - 1);
        wa[mt] = p.w + static_cast<int64_t>(ra) * p.w_row_bytes + static_cast<int64_t>(s0) * kStepBytes + tig * 16;
        wb[mt] = p.w + static_cast<int64_t>(rb) * p.w_row_bytes + static_cast<int64_t>(s0) * kStepBytes + tig * 16;
    }
    // A warp's 16·MT rows lie in one 128-row scale block (row0 is a multiple of 16·MT).
    const uint8_t* sc = p.scale + static_cast<int64_t>(min(row0, p.N - 1) / 128) * p.s_row_bytes + s0 / 2;
    const int nblk = p.K / 128;
    // FP8 activations: token t's codes at qbase + qo[nt] and the scales of its C columns at sbase +
    // so[nt][·], as 32-bit offsets (fp8_act_fits keeps 64 rows of codes under 2^31 bytes). With
    // 64-bit pointers the eight-tile instance spilled 52 bytes (ptxas) and this way none: H100,
    // megamoe-gemm-bench --part linears --format fp8, "fp8x8" at M = 64, one call, µs: wq_b 34.12 →
    // 27.45, wo_b 34.71 → 28.06, wq_a 10.56 → 8.91, shared w2 12.06 → 10.27; at M = 16 (two tiles,
    // which still spill: 100 bytes against 72) 1-4% slower (wq_b 18.71 → 19.51), where the runner
    // no longer takes this kernel (kFp8ActMaxT, runner.cpp).
    const uint8_t* qbase = nullptr;
    const float* sbase = nullptr;
    uint32_t qo[NT], so[NT][2];
    // BF16 activations: token g's x at this lane's 16 columns of step s0 (+ 8·nt tokens). A token
    // column past M reads token M - 1 (valid memory, finite where x is): column n of the MMA's B
    // feeds only column n of C, which is not stored for t ≥ M, so no load needs a predicate.
    // (As 32-bit offsets from one base: regs_fits keeps 64 rows of x under 2^31 elements.)
    const uint16_t* xbase = nullptr;
    uint32_t xr[NT];
    if constexpr (BX) {
        const int64_t grp = p.group_rows ? min(row0, p.N - 1) / p.group_rows : 0;
        xbase = p.xb + grp * p.K + static_cast<int64_t>(s0) * kStepCols + tig * (kStepCols / 4);
    } else {
        qbase = p.q + static_cast<int64_t>(s0) * kStepBytes + tig * 16;
        sbase = p.s + s0 / 2;
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int t = min(nt * 8 + g, p.M - 1);
        if constexpr (BX) {
            xr[nt] = static_cast<uint32_t>(t) * static_cast<uint32_t>(p.x_ld);
        } else {
            qo[nt] = static_cast<uint32_t>(t) * static_cast<uint32_t>(p.K);
            // The C fragment's columns: tokens nt·8 + 2·tig and + 1 (clamped; unused ones are not written).
            so[nt][0] = static_cast<uint32_t>(min(nt * 8 + 2 * tig, p.M - 1) * nblk);
            so[nt][1] = static_cast<uint32_t>(min(nt * 8 + 2 * tig + 1, p.M - 1) * nblk);
        }
    }

    float acc[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;

    const int nb = (n + U - 1) / U;
    auto load = [&](Batch<U, MT>& B, int b) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int i = min(b * U + u, n - 1);   // past the range: reload the last step (not used)
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                B.r0[mt][u] = ld_weights(wa[mt] + static_cast<int64_t>(i) * kStepBytes);
                B.r1[mt][u] = ld_weights(wb[mt] + static_cast<int64_t>(i) * kStepBytes);
            }
        }
    };
    auto multiply = [&](const Batch<U, MT>& B, int b) {
#pragma unroll
        for (int u = 0; u < U; u += 2) {   // one 128-column block: steps i, i + 1
            const int i = b * U + u;
            if (i >= n) break;
            if constexpr (MODE == kBf16W) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    uint32_t a[MT][2][4];
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt)
                        decode_a<LinearFormat::bf16>(B.r0[mt][u + h], B.r1[mt][u + h], 0, 0u, 0u, 0u, 0u, a[mt]);
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        const uint4 x = __ldg(reinterpret_cast<const uint4*>(xbase + xr[nt] + (i + h) * kStepCols));
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt) {
                            mma_bf16(acc[mt][nt], a[mt][0][0], a[mt][0][1], a[mt][0][2], a[mt][0][3], x.x, x.y);
                            mma_bf16(acc[mt][nt], a[mt][1][0], a[mt][1][1], a[mt][1][2], a[mt][1][3], x.z, x.w);
                        }
                    }
                }
            } else if constexpr (MODE == kFp8W) {
                // A warp's rows lie in one 128-row block: one multiplier for the block's 128 columns.
                const uint32_t m = pow2_bf16x2(__ldg(sc + i / 2), p.bias);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
#pragma unroll
                    for (int l = 0; l < 2; ++l) {   // the lane's 8-column halves: bytes 8·l .. 8·l + 7
                        uint32_t a[MT][2][4];
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt)
                            decode_a<LinearFormat::fp8_block>(B.r0[mt][u + h], B.r1[mt][u + h], l, m, m, m, m, a[mt]);
#pragma unroll
                        for (int nt = 0; nt < NT; ++nt) {
                            const uint4 x = __ldg(reinterpret_cast<const uint4*>(xbase + xr[nt] + (i + h) * kStepCols + 8 * l));
#pragma unroll
                            for (int mt = 0; mt < MT; ++mt) {
                                mma_bf16(acc[mt][nt], a[mt][0][0], a[mt][0][1], a[mt][0][2], a[mt][0][3], x.x, x.y);
                                mma_bf16(acc[mt][nt], a[mt][1][0], a[mt][1][1], a[mt][1][2], a[mt][1][3], x.z, x.w);
                            }
                        }
                    }
                }
            } else {
                float c[NT][4];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int j = 0; j < 4; ++j) c[nt][j] = 0.0f;
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const uint4& a = B.r0[0][u + h];
                    const uint4& bb = B.r1[0][u + h];
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        // (Predicated on the token for two tiles: unconditional loads spill there, ptxas.)
                        const uint4 x = NT != 2 || nt * 8 + g < p.M
                                            ? __ldg(reinterpret_cast<const uint4*>(qbase + qo[nt] + (i + h) * kStepBytes))
                                            : make_uint4(0, 0, 0, 0);
                        mma_e4m3(c[nt], a.x, bb.x, a.y, bb.y, x.x, x.y);
                        mma_e4m3(c[nt], a.z, bb.z, a.w, bb.w, x.z, x.w);
                    }
                }
                const float sw = e8m0_value(__ldg(sc + i / 2));
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    const float f0 = sw * __ldg(sbase + so[nt][0] + i / 2), f1 = sw * __ldg(sbase + so[nt][1] + i / 2);
                    acc[0][nt][0] = fmaf(c[nt][0], f0, acc[0][nt][0]);
                    acc[0][nt][1] = fmaf(c[nt][1], f1, acc[0][nt][1]);
                    acc[0][nt][2] = fmaf(c[nt][2], f0, acc[0][nt][2]);
                    acc[0][nt][3] = fmaf(c[nt][3], f1, acc[0][nt][3]);
                }
            }
        }
    };

    // Weights are constant: the first batch (one token tile: the first two) is requested before
    // waiting for the previous kernel (programmatic dependent launch), whose output (the
    // activation) is read only after the wait; then one batch is in flight while the other is
    // multiplied. (With two token tiles both batches before the wait spilled: 140 bytes, ptxas.)
    Batch<U, MT> A, B;
    if (n > 0) load(A, 0);
    if constexpr (NT == 1) {
        if (nb > 1) load(B, 1);
    }
    asm volatile("griddepcontrol.wait;" ::: "memory");
    for (int b = 0; b < nb; b += 2) {
        if constexpr (NT == 1) {
            multiply(A, b);
            if (b + 2 < nb) load(A, b + 2);
            if (b + 1 >= nb) break;
            multiply(B, b + 1);
            if (b + 3 < nb) load(B, b + 3);
        } else {
            if (b + 1 < nb) load(B, b + 1);
            multiply(A, b);
            if (b + 1 >= nb) break;
            if (b + 2 < nb) load(A, b + 2);
            multiply(B, b + 1);
        }
    }
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");

    auto store = [&](int t, int row, float v) {
        if constexpr (BX) v *= p.out_scale;
        const int64_t i = static_cast<int64_t>(t) * p.N + row;
        if (p.out_bf16) static_cast<__nv_bfloat16*>(p.y)[i] = __float2bfloat16_rn(v);
        else static_cast<float*>(p.y)[i] = v;
    };
    const int M = p.M;
    if (wk_count == 1) {   // the warp has whole rows: write from the fragments
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int t = nt * 8 + 2 * tig + (i & 1);
                    const int row = row0 + 16 * mt + g + (i >= 2 ? 8 : 0);
                    if (t < M && row < p.N) store(t, row, acc[mt][nt][i]);
                }
        return;
    }
    // Partials red[wk][t][row in CTA], then each (t, row) summed over wk in order.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int t = nt * 8 + 2 * tig + (i & 1);
                const int rl = wrow * kWarpRows + 16 * mt + g + (i >= 2 ? 8 : 0);
                if (t < M) red[(wk * M + t) * R + rl] = acc[mt][nt][i];
            }
    __syncthreads();
    for (int i = static_cast<int>(threadIdx.x); i < M * R; i += kThreads) {
        const int t = i / R, rl = i - t * R;
        float sum = 0.0f;
        for (int k = 0; k < wk_count; ++k) sum += red[(k * M + t) * R + rl];
        const int row = static_cast<int>(blockIdx.y) * R + rl;
        if (row < p.N) store(t, row, sum);
    }
}

struct Fp8Plan {
    int wr = 1, wk = 8, spw = 0, row_blocks = 0;
};

// wk: the largest power of two ≤ 8 that leaves each warp at least one batch (kU steps) and keeps
// the launch within one wave of warps (kMaxWarps: 132 SMs × 16 resident warps, 2 CTAs of 8 per
// SM); rows alone fill the GPU for the tall matrices. Measured on an H200 (M = 1, FP8 × FP8):
// wq_b 32768×1024 (16 steps) 12.7 µs at wk = 2 against 18.7 at wk = 8; wo_b 4096×8192 11.2 µs at
// wk = 8 against 21.6 at wk = 2; shared w2 4096×2048 (32 steps) 4.2 µs at wk = 8 against 5.1 at
// wk = 4. The limit was two waves (4224 warps) until the BF16-activation kernel measured wq_b at
// wk = 1 (one wave, 16 steps per warp) against wk = 2 (two waves) on an H100: M = 1 / 4 / 16 14.57
// / 14.92 / 17.93 µs against 16.12 / 16.78 / 20.47 (megamoe-linear-bench, two builds); the other
// V4-Flash shapes plan the same either way; of V4-Pro's, wo_b (16384 columns) and the shared w2
// go from wk = 8 to 4 (not measured). (A CTA's warps that start only in a second wave begin
// their weight stream from nothing after the first wave's; in one wave every warp's first two
// batches are requested before the wait.)
constexpr int64_t kMaxWarps = 2112;
// From four token tiles on the kernel runs one CTA per SM (kMinCtas): half the warps per wave.
// mt: 16-row tiles per warp (the kernel's MT).
Fp8Plan plan_fp8(int64_t N, int64_t steps, int nt, int mt) {
    Fp8Plan pl;
    const int64_t max_warps = kMaxWarps * (nt >= 4 ? 1 : 2) / 2;
    const int64_t tiles = (N + 16 * mt - 1) / (16 * mt);
    int wk = 8;
    while (wk > 1 && (steps / wk < kU<1> || tiles * wk > max_warps)) wk /= 2;
    pl.wk = wk;
    pl.wr = kWarps / wk;
    int64_t spw = (steps + wk - 1) / wk;
    spw += spw & 1;
    pl.spw = static_cast<int>(spw);
    pl.row_blocks = static_cast<int>((N + 16 * mt * pl.wr - 1) / (16 * mt * pl.wr));
    return pl;
}

// Row tiles per warp for a launch of nt token tiles with BF16 activations (bx): two at eight token
// tiles where a group (if any) holds whole 32-row tiles and the launch keeps at least half a wave
// of warps, else one. Measured on an H100 (megamoe-gemm-bench --part linears --M 64 --format fp8,
// one call, µs, MT = 2 against MT = 1): wq_b 24.41 / 28.22, wo_a 25.79 / 31.65, wo_b 25.52 / 28.20,
// shared w2 10.00 / 10.80, indexer wq_b 11.50 / 12.24 (each 1024 warps at MT = 2); but wq_a 12.75 /
// 9.99, wkv 12.09 / 9.56, shared w1 13.77 / 10.16, where 32-row tiles leave 128-512 warps.
int row_tiles(int nt, bool bx, int64_t group_rows, int64_t N, int64_t steps) {
    if (!bx || nt != 8 || group_rows % 32 != 0) return 1;
    const Fp8Plan pl = plan_fp8(N, steps, nt, 2);
    return int64_t{pl.row_blocks} * kWarps >= kMaxWarps / 4 ? 2 : 1;   // kMaxWarps / 4: half a wave at one CTA per SM
}

// The plan of either host entry point, as text (benchmarks' --plans).
std::string plan_text(const std::string& kernel, const DeviceLinear& w, int64_t M, bool bx, int64_t group_rows) {
    const int nt = token_tiles(std::min<int64_t>(std::max<int64_t>(M, 1), kMaxTokens));
    const int mt = row_tiles(nt, bx, group_rows, w.out, w.weight_row_bytes / kStepBytes);
    const Fp8Plan pl = plan_fp8(w.out, w.weight_row_bytes / kStepBytes, nt, mt);
    return kernel + " NT=" + std::to_string(nt) + " MT=" + std::to_string(mt) + " Wr=" + std::to_string(pl.wr) +
           " Wk=" + std::to_string(pl.wk) + " grid=1x" + std::to_string(pl.row_blocks) +
           " steps/warp=" + std::to_string(pl.spw);
}

// The launch parameters both entry points share, for the m tokens of one launch from token m0
// (activation pointers, and what only BF16 activations use, are the caller's).
Fp8Params weight_params(const DeviceLinear& w, const Fp8Plan& pl, const LinearOptions& o, void* y, int64_t m0, int m) {
    Fp8Params p{};
    p.w = static_cast<const uint8_t*>(w.weight);
    p.scale = static_cast<const uint8_t*>(w.scale);
    p.y = static_cast<uint8_t*>(y) + m0 * w.out * (o.out_bf16 ? 2 : 4);
    p.w_row_bytes = w.weight_row_bytes;
    p.s_row_bytes = w.scale_row_bytes;
    p.N = static_cast<int>(w.out);
    p.K = static_cast<int>(w.in);
    p.M = m;
    p.steps = static_cast<int>(w.weight_row_bytes / kStepBytes);
    p.spw = pl.spw;
    p.wr = pl.wr;
    p.out_bf16 = o.out_bf16;
    p.out_scale = 1.0f;
    return p;
}

template <int NT, int MODE, int MT>
cudaError_t launch_regs_kernel(const Fp8Plan& pl, const Fp8Params& p, CUstream_st* stream) {
    const auto kernel = linear_regs_kernel<NT, MODE, MT>;
    size_t smem = 0;
    if constexpr (kRedDynamic<NT, MT>) {
        smem = kRedBytes<NT, MT>;
        raise_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
    }
    return launch_pdl(kernel, dim3(1, static_cast<unsigned>(pl.row_blocks)), dim3(kThreads), smem, stream, p);
}

// One launch of linear_regs_kernel with nt token tiles (token_tiles of the launch's m) and mt row
// tiles per warp (row_tiles).
template <int MODE> cudaError_t launch_regs(int nt, int mt, const Fp8Plan& pl, const Fp8Params& p, CUstream_st* stream) {
    switch (nt) {
        case 1: return launch_regs_kernel<1, MODE, 1>(pl, p, stream);
        case 2: return launch_regs_kernel<2, MODE, 1>(pl, p, stream);
        case 4: return launch_regs_kernel<4, MODE, 1>(pl, p, stream);
        default:
            if constexpr (MODE != kAct) {
                if (mt == 2) return launch_regs_kernel<8, MODE, 2>(pl, p, stream);
            }
            return launch_regs_kernel<8, MODE, 1>(pl, p, stream);
    }
}

}  // namespace

bool fp8_act_fits(const DeviceLinear& w, const LinearOptions& o) {
    return w.format == LinearFormat::fp8_block && !w.nan_codes && w.in % 128 == 0 && w.in > 0 && w.out > 0 &&
           o.groups == 1 && w.weight && w.scale && w.in * kMaxTokens < (int64_t{1} << 31);   // 32-bit code offsets
}

std::string linear_fp8_act_plan(const DeviceLinear& w, int64_t M) { return plan_text("fp8xfp8", w, M, false, 0); }

void linear_fp8_act(const DeviceLinear& w, const ActFp8& x, int64_t M, void* y, const LinearOptions& o,
                    CUstream_st* stream) {
    if (!fp8_act_fits(w, o))
        fail("linear_fp8_act: needs fp8_block weights without NaN codes, K % 128 == 0 and one group (got ",
             linear_format_name(w.format), ", K = ", w.in, ", groups = ", o.groups, w.nan_codes ? ", NaN codes" : "", ")");
    if (M < 0) fail("linear_fp8_act: M = ", M, " is negative");
    if (M == 0) return;
    if (!x.q || !x.s || !y) fail("linear_fp8_act: null activation or output");
    if (w.out > (int64_t{1} << 30) || w.in > (int64_t{1} << 30)) fail("linear_fp8_act: shape too large");
    for (int64_t m0 = 0; m0 < M; m0 += kMaxTokens) {
        const int m = static_cast<int>(std::min<int64_t>(kMaxTokens, M - m0));
        const int nt = token_tiles(m);
        const Fp8Plan pl = plan_fp8(w.out, w.weight_row_bytes / kStepBytes, nt, 1);
        Fp8Params p = weight_params(w, pl, o, y, m0, m);
        p.q = x.q + m0 * w.in;
        p.s = x.s + m0 * (w.in / 128);
        const cudaError_t e = launch_regs<kAct>(nt, 1, pl, p, stream);
        if (e != cudaSuccess) fail("linear_fp8_act: launch: ", cudaGetErrorString(e));
    }
}

bool regs_fits(const DeviceLinear& w, const uint16_t* x, const LinearOptions& o) {
    if (w.in <= 0 || w.out <= 0 || !w.weight || o.groups < 1 || w.out % o.groups != 0) return false;
    if (w.format == LinearFormat::fp8_block) {
        if (w.nan_codes || w.in % 128 != 0 || !w.scale) return false;   // whole 128-column blocks: steps in pairs
    } else if (w.format == LinearFormat::bf16) {
        if (w.in % 64 != 0) return false;                               // whole pairs of 32-column steps
    } else {
        return false;
    }
    if (o.groups > 1 && (w.out / o.groups) % 16 != 0) return false;   // a warp's 16 rows in one group
    if (w.in * o.groups * kMaxTokens >= (int64_t{1} << 31)) return false;   // x offsets of a launch in 32 bits
    return reinterpret_cast<uintptr_t>(x) % 16 == 0;                  // x rows: K · groups, a multiple of 64
}

std::string linear_regs_plan(const DeviceLinear& w, int64_t M) {
    return plan_text(w.format == LinearFormat::bf16 ? "bf16 regs" : "fp8 regs", w, M, true, 0);
}

void linear_regs(const DeviceLinear& w, const uint16_t* x, int64_t M, void* y, const LinearOptions& o,
                 CUstream_st* stream) {
    if (!regs_fits(w, x, o))
        fail("linear_regs: needs fp8_block weights without NaN codes and K % 128 == 0, or bf16 weights and K % 64 == 0; "
             "groups of a multiple of 16 rows; a 16-byte aligned x (got ", linear_format_name(w.format), ", K = ", w.in,
             ", groups = ", o.groups, w.nan_codes ? ", NaN codes" : "", ")");
    if (M < 0) fail("linear_regs: M = ", M, " is negative");
    if (M == 0) return;
    if (!x || !y) fail("linear_regs: null activation or output");
    if (w.out > (int64_t{1} << 30) || w.in > (int64_t{1} << 30)) fail("linear_regs: shape too large");
    const int64_t x_ld = w.in * o.groups;
    const bool bf16 = w.format == LinearFormat::bf16;
    const int64_t group_rows = o.groups > 1 ? w.out / o.groups : 0;
    for (int64_t m0 = 0; m0 < M; m0 += kMaxTokens) {
        const int m = static_cast<int>(std::min<int64_t>(kMaxTokens, M - m0));
        const int nt = token_tiles(m), mt = row_tiles(nt, true, group_rows, w.out, w.weight_row_bytes / kStepBytes);
        const Fp8Plan pl = plan_fp8(w.out, w.weight_row_bytes / kStepBytes, nt, mt);
        Fp8Params p = weight_params(w, pl, o, y, m0, m);
        if (bf16) p.scale = p.w;   // (not read)
        p.xb = x + m0 * x_ld;
        p.x_ld = x_ld;
        p.group_rows = static_cast<int>(group_rows);
        kernel_scales(w, p.bias, p.out_scale);
        const cudaError_t e = bf16 ? launch_regs<kBf16W>(nt, mt, pl, p, stream) : launch_regs<kFp8W>(nt, mt, pl, p, stream);
        if (e != cudaSuccess) fail("linear_regs: launch: ", cudaGetErrorString(e));
    }
}

}  // namespace megamoe::cuda
