// moe_small.cu — the routed-expert layer for a few tokens (decode): two kernels, no dispatch.
//
// At T ≤ kMoeSmallMaxT tokens the layer is bound by reading the weights of the experts the tokens
// hit (V4-Flash at T = 1: 6 experts, ~80 MB), and the general path's eight dependent launches
// (route: rank, scan, scatter; gather; work list; L1; L2; combine) cost more than those bytes.
// Here the layer is two launches, each reading its routing straight from ids.
//
// Status (H200, docs/bench-gemm.md): correct (tests/cuda/gemm_test.cpp), 7-11% faster than
// moe_layer at T = 1 on V4-Flash widths, slower elsewhere, so nothing chooses it yet. Nsight
// Compute on the T = 1 Flash layer: both kernels are latency-bound on instruction issue, not on
// HBM (DRAM 30% / 15% of peak; 0.9-1.2 eligible warps per scheduler, ~8 cycles per issued
// instruction): a warp streams only 8 (L1) or 12 (L2) 64-byte steps, so the ring never fills and
// the per-step decode (fp4x8_bits + scale multiplies, ~1.75 ALU ops per weight) runs serially with
// the MMAs. What should close it: more bytes per warp step (L2 with 32 rows per warp), decoding the
// next step's words before the current MMAs (software pipelining in registers), and L1's K-split
// replaced by longer per-warp row streams.
//
//   The two kernels:
//
//   moe_small_l1   grid (I / (32·rpc) CTAs of rpc row blocks, n = T·k entries upper bound), 8 warps.
//                  Every CTA derives the layer's routing from ids in shared memory (n ≤ 64
//                  slots, O(n²) comparisons spread over the threads): the stable sort of the slots
//                  by expert (the order ops::moe uses) and the "entries": each expert's slots in
//                  runs of at most C (C = T ≤ 8, the MMA's token columns, so an expert hit
//                  by distinct tokens is one entry). CTA (b, q) takes entry q (CTAs past the last
//                  entry exit), stages its tokens' x rows in shared memory, and computes rpc blocks
//                  of 32 rows of g = x·w1ᵀ and u = x·w3ᵀ (rpc: about one wave of CTAs in all; the
//                  ring streams on across the blocks): 2 row groups × 4 K-ranges of warps, each warp
//                  streaming its 16 w1 rows and the same 16 w3 rows through a cp.async ring and
//                  decoding them in registers (device.cuh, as linear.cu), mma.sync m16n8k16 with
//                  the weights as A. K-range partials are summed in shared memory in a fixed
//                  order, then h[slot, row] = silu(min(g, L))·clamp(u, ±L)·weight[slot] in bf16,
//                  at the slot's own row of h (slot = t·k + s: no permutation).
//   moe_small_l2   grid (D / 16 row blocks), 8 warps. Each CTA takes 16 rows of every hit
//                  expert's w2; warp w the K-range w of each entry in turn (one ring across the
//                  entries), with the entry's h rows copied into the same ring stage by the lanes
//                  that read them. Per (slot, row) the CTA then has its 8 K-range partials, and
//                  writes y[t, row] = Σ_s (slot s of token t) in slot order from 0, then
//                  shared[t] + that sum: the combine of moe_dispatch.h, so no rows buffer and no
//                  third launch.
//
// Overlap. L1 waits for the router (griddepcontrol.wait) before anything, since ids say which
// weights to read, and then lets L2 launch at once (launch_dependents). L2 is therefore scheduled
// only once every L1 CTA has passed its wait, i.e. once the router has completed; it reads ids and
// the experts' descriptors, and only then waits for L1 (its h). (An L2-cache prefetch of all its w2
// rows before that wait cost more issue slots than it saved: removed.)
//
// Exactness: as linear.cu / gemm.cu (exact weights on the tensor core, fp32 accumulation), so h
// and y differ from the CPU twins (ops::expert_ffn, ops::moe) only by fp32 summation order and the
// bf16 rounding of h between L1 and L2 — the same contract as moe_l1 / moe_l2 / moe_combine.
// Deterministic: fixed reduction orders, no atomics.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <set>
#include <tuple>

#include "core/common.h"
#include "cuda/device.cuh"
#include "cuda/gemm.h"
#include "cuda/gemm_group.cuh"
#include "io/formats.h"

namespace megamoe::cuda {

namespace {

using namespace dev;

constexpr int kThreads = 256;   // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kMaxSlots = static_cast<int>(kMoeSmallMaxSlots);
constexpr int kL1Wr = 2;                      // L1: warps along rows (16 h rows each) ...
constexpr int kL1Wk = kWarps / kL1Wr;         // ... and along K
constexpr int kL1Rows = kL1Wr * 16;           // h rows per L1 CTA
constexpr int kL2Rows = 16;                   // y rows per L2 CTA
constexpr int kL1Stages = 3;                  // per-warp ring depth (kStages - 1 steps in flight)
constexpr int kL2Stages = 6;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct SmallParams {
    const GemmGroup* table;    // [E] (device): L1 (w1, w3) or L2 (w2) descriptors
    const int32_t*   ids;      // [T, k] int32 (device)
    const float*     wts;      // [T, k] f32 routing weights (L1)
    const uint16_t*  x;        // [T, K] bf16 (L1)
    uint16_t*        h;        // [T·k, I] bf16: L1 writes row slot, L2 reads it
    const float*     shared;   // [T, D] f32 or null (L2)
    float*           y;        // [T, D] f32 (L2)
    int T, k, E;
    int C;                     // slots per entry (MMA token columns used)
    int N, K, steps;           // one matrix: rows, columns, 64-byte row steps
    int64_t w_row_bytes, s_row_bytes;
    float limit;               // SwiGLU clamp (L1)
    int spw;                   // steps per warp K-range
    int rpc;                   // L1: row blocks per CTA
    int x_rs;                  // L1: x row stride in shared memory (bytes)
};

// The layer's routing, derived from ids by every CTA (shared memory).
//   order[j]      the j-th slot in the stable sort by expert (ops::moe's order: expert, then slot)
//   entry_*[q]    entry q: expert, first position in order, slot count (≤ C)
//   n_entries     entries in all (≤ n)
struct Routing {
    int order[kMaxSlots];
    int entry_exp[kMaxSlots];
    int entry_start[kMaxSlots];
    int entry_cnt[kMaxSlots];
    int id[kMaxSlots];
    int pos[kMaxSlots];   // rank of the slot among the slots of its expert
    int cnt[kMaxSlots];   // slots of the slot's expert
    int n_entries;
};

// All threads call it; ends with a barrier. ids are clamped into [0, E) (as moe_route_counts does).
__device__ void route_slots(const SmallParams& p, Routing& r) {
    const int n = p.T * p.k, C = p.C;
    const int i = static_cast<int>(threadIdx.x);
    for (int j = i; j < n; j += kThreads) r.id[j] = min(max(p.ids[j], 0), p.E - 1);
    __syncthreads();
    for (int j = i; j < n; j += kThreads) {
        const int e = r.id[j];
        int pos = 0, less = 0, cnt = 0;
        for (int o = 0; o < n; ++o) {
            const int eo = r.id[o];
            less += eo < e;
            cnt += eo == e;
            pos += (eo == e) & (o < j);
        }
        r.pos[j] = pos;
        r.cnt[j] = cnt;
        r.order[less + pos] = j;
    }
    __syncthreads();
    for (int j = i; j < n; j += kThreads) {
        const int pos = r.pos[j];
        if (pos % C != 0) continue;
        const int e = r.id[j];
        int q = pos / C, less = 0;
        for (int o = 0; o < n; ++o) {
            const int eo = r.id[o];
            less += eo < e;
            if (r.pos[o] == 0 && eo < e) q += (r.cnt[o] + C - 1) / C;
        }
        r.entry_exp[q] = e;
        r.entry_start[q] = less + pos;
        r.entry_cnt[q] = min(C, r.cnt[j] - pos);
    }
    if (i == 0) {
        int q = 0;
        for (int o = 0; o < n; ++o)
            if (r.pos[o] == 0) q += (r.cnt[o] + C - 1) / C;
        r.n_entries = q;
    }
    __syncthreads();
}

// A lane's block-scale multipliers (decode_a's lo, hi) from the scale word it copied.
template <LinearFormat F>
__device__ __forceinline__ void scale_mults(uint32_t word, int tig, int bias, uint32_t& lo, uint32_t& hi) {
    if constexpr (F == LinearFormat::nvfp4) {
        nvfp4_mults(word >> (16 * (tig & 1)), lo, hi);
    } else {
        lo = hi = pow2_bf16x2((word >> (8 * tig)) & 0xFFu, bias);
    }
}
// Scale bytes per weight row per step, and where a lane's word starts within them.
template <LinearFormat F> __device__ __forceinline__ int scale_step_bytes() { return F == LinearFormat::nvfp4 ? 8 : 4; }
template <LinearFormat F> __device__ __forceinline__ int scale_lane_off(int tig) {
    return F == LinearFormat::nvfp4 ? (tig >> 1) * 4 : 0;
}

// ---------------------------------------------------------------------------- L1

// Ring stage of an L1 warp: per (matrix mt ∈ {w1, w3}, row half h, lane) 16 weight bytes, then a
// 4-byte scale word each; lane-contiguous (conflict-free), each lane reads only what it copied.
struct L1Stage {
    static constexpr int kWeight = 2 * 2 * 32 * 16;
    static constexpr int kBytes = kWeight + 2 * 2 * 32 * 4;
};

// __launch_bounds__(, 3): 3 CTAs per SM at T = 1 (≤ 85 registers; shared memory allows it there).
template <LinearFormat F, int NT>
__global__ void __launch_bounds__(kThreads, 3) moe_small_l1_kernel(const SmallParams p) {
    constexpr int kE = Traits<F>::kElems;
    constexpr int kStepK = 4 * kE;               // columns per step
    constexpr int kChunksPerStep = kStepK / 8;   // 16-byte x chunks per step
    constexpr int kLds = kE / 8;                 // x chunks per lane per step
    extern __shared__ __align__(16) uint8_t smem[];
    __shared__ Routing rt;

    // ids, weights and x come from the kernels before: wait, then let L2 be scheduled (see top).
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    route_slots(p, rt);
    const int q = static_cast<int>(blockIdx.y);
    if (q >= rt.n_entries) return;
    const int e = rt.entry_exp[q], start = rt.entry_start[q], m = rt.entry_cnt[q];
    const GemmGroup G = p.table[e];

    const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
    const int g = lane >> 2, tig = lane & 3;
    const int wrow = warp % kL1Wr, wk = warp / kL1Wr;
    const int ws0 = wk * p.spw;
    const int nsw = max(0, min(p.spw, p.steps - ws0));   // this warp's steps per row block
    // This CTA's row blocks: rb0 .. rb0 + nrb - 1 (of kL1Rows h rows each), all of entry q.
    const int rb0 = static_cast<int>(blockIdx.x) * p.rpc;
    const int nrb = max(0, min(p.rpc, static_cast<int>(ceil_div(p.N, kL1Rows)) - rb0));

    uint8_t* xs = smem;                                                        // [C][x_rs]
    uint8_t* ring = smem + static_cast<size_t>(p.C) * p.x_rs;                  // [warp][stage]
    float* red = reinterpret_cast<float*>(ring + kWarps * kL1Stages * L1Stage::kBytes);   // [wk][2][rows][C]
    const uint32_t ring_s = static_cast<uint32_t>(__cvta_generic_to_shared(ring)) +
                            static_cast<uint32_t>(warp * kL1Stages * L1Stage::kBytes);

    // The copy cursor: row block rb0 + irb, step ws0 + is; the lane's byte offsets of its two rows
    // at step ws0 of that row block (rows past N copy nothing).
    int irb = 0, is = 0;
    int64_t woff[2], soff[2];
    bool ok[2];
    auto block_rows = [&](int rbi) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int64_t row = static_cast<int64_t>(rb0 + rbi) * kL1Rows + wrow * 16 + h * 8 + g;
            ok[h] = row < p.N;
            woff[h] = ok[h] ? row * p.w_row_bytes + ws0 * kStepBytes + tig * 16 : 0;
            soff[h] = ok[h] ? row * p.s_row_bytes + ws0 * scale_step_bytes<F>() + scale_lane_off<F>(tig) : 0;
        }
    };
    block_rows(0);
    auto issue = [&](int slot) {
        if (irb >= nrb || nsw == 0) return;
        const uint32_t base = ring_s + static_cast<uint32_t>(slot * L1Stage::kBytes);
        const int wst = is * kStepBytes, sst = is * scale_step_bytes<F>();
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                const int idx = (mt * 2 + h) * 32 + lane;
                cp_async16(base + idx * 16, G.w[mt] + woff[h] + wst, ok[h]);
                cp_async4(base + L1Stage::kWeight + idx * 4, G.s[mt] + soff[h] + sst, ok[h]);
            }
        if (++is == nsw) {
            is = 0;
            if (++irb < nrb) block_rows(irb);
        }
    };
#pragma unroll
    for (int i = 0; i < kL1Stages - 1; ++i) {
        issue(i);
        cp_async_commit();
    }

    // Stage the entry's x rows (token of slot order[start + r]), chunk-swizzled as linear.cu.
    {
        const int chunks = p.K / 8;   // K % 8 == 0 (DeviceExperts checks D % 8)
        for (int i = static_cast<int>(threadIdx.x); i < m * chunks; i += kThreads) {
            const int r = i / chunks, c = i - r * chunks;
            const int t = rt.order[start + r] / p.k;
            const uint4 v = __ldg(reinterpret_cast<const uint4*>(p.x + static_cast<int64_t>(t) * p.K) + c);
            *reinterpret_cast<uint4*>(xs + r * p.x_rs + x_chunk_pos<F>(c) * 16) = v;
        }
        // Columns of the last step past K: zeros (the weights there are zero codes; x must be finite).
        const int tail = p.steps * kChunksPerStep - chunks;
        for (int i = static_cast<int>(threadIdx.x); i < m * tail; i += kThreads) {
            const int r = i / tail, c = chunks + (i - r * tail);
            *reinterpret_cast<uint4*>(xs + r * p.x_rs + x_chunk_pos<F>(c) * 16) = make_uint4(0, 0, 0, 0);
        }
    }
    __syncthreads();

    const int C = p.C;
    const int nw = static_cast<int>(ceil_div(p.steps, p.spw));   // K-ranges with steps
    int slot = 0, issue_slot = kL1Stages - 1;
    for (int rbi = 0; rbi < nrb; ++rbi) {
        float acc[2][NT][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;

        for (int js = 0; js < nsw; ++js) {
            const int s = ws0 + js;
            issue(issue_slot);
            issue_slot = issue_slot == kL1Stages - 1 ? 0 : issue_slot + 1;
            cp_async_commit();
            cp_async_wait<kL1Stages - 1>();
            const uint8_t* st = ring + (warp * kL1Stages + slot) * L1Stage::kBytes;
            uint4 wv[2][2];
            uint32_t mlo[2][2], mhi[2][2];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int idx = (mt * 2 + h) * 32 + lane;
                    wv[mt][h] = *reinterpret_cast<const uint4*>(st + idx * 16);
                    const uint32_t word = *reinterpret_cast<const uint32_t*>(st + L1Stage::kWeight + idx * 4);
                    scale_mults<F>(word, tig, G.bias[mt], mlo[mt][h], mhi[mt][h]);
                }
            slot = slot == kL1Stages - 1 ? 0 : slot + 1;

            const int q0 = s * kChunksPerStep + tig * kLds;
#pragma unroll
            for (int l = 0; l < kLds; ++l) {
                uint4 b[NT];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    const int t = nt * 8 + g;
                    b[nt] = t < m ? *reinterpret_cast<const uint4*>(xs + t * p.x_rs + x_chunk_pos<F>(q0 + l) * 16)
                                  : make_uint4(0, 0, 0, 0);
                }
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
                    uint32_t a[2][4];
                    decode_a<F>(wv[mt][0], wv[mt][1], l, mlo[mt][0], mhi[mt][0], mlo[mt][1], mhi[mt][1], a);
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        mma_bf16(acc[mt][nt], a[0][0], a[0][1], a[0][2], a[0][3], b[nt].x, b[nt].y);
                        mma_bf16(acc[mt][nt], a[1][0], a[1][1], a[1][2], a[1][3], b[nt].z, b[nt].w);
                    }
                }
            }
        }

        // Partials red[wk][mt][row in CTA][token column < C], then the fixed-order sum over wk. The
        // ring keeps streaming the next row block meanwhile (its copies were issued above).
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int t = nt * 8 + 2 * tig + (i & 1);
                    const int rl = wrow * 16 + g + (i >= 2 ? 8 : 0);
                    if (t < C) red[((wk * 2 + mt) * kL1Rows + rl) * C + t] = acc[mt][nt][i];
                }
        __syncthreads();
        for (int i = static_cast<int>(threadIdx.x); i < kL1Rows * m; i += kThreads) {
            const int rl = i % kL1Rows, t = i / kL1Rows;
            const int row = (rb0 + rbi) * kL1Rows + rl;
            if (row >= p.N) continue;
            float gs = 0.0f, us = 0.0f;
            for (int w = 0; w < nw; ++w) {
                gs += red[((w * 2 + 0) * kL1Rows + rl) * C + t];
                us += red[((w * 2 + 1) * kL1Rows + rl) * C + t];
            }
            const int sl = rt.order[start + t];
            const float hv = silu_swiglu(gs * G.out_scale[0], us * G.out_scale[1], p.limit) * p.wts[sl];
            p.h[static_cast<int64_t>(sl) * p.N + row] = __bfloat16_as_ushort(__float2bfloat16_rn(hv));
        }
        __syncthreads();   // red is rewritten by the next row block
    }
    cp_async_wait<0>();
}

// ---------------------------------------------------------------------------- L2

// Ring stage of an L2 warp: 16 weight bytes per (row half, lane), a scale word each, then the B
// operand of the lanes whose token column g < BR = min(8, C) (the others read zeros without a copy):
// per (token tile nt, chunk l, g, tig) 16 bytes (8 h columns). Its size depends on C: l2_stage_bytes.
struct L2Stage {
    static constexpr int kWeight = 2 * 32 * 16;
    static constexpr int kScale = kWeight;
    static constexpr int kB = kScale + 2 * 32 * 4;
};
__host__ __device__ constexpr int l2_b_rows(int C) { return C < 8 ? C : 8; }
__host__ __device__ constexpr int l2_stage_bytes(int nt, int C) { return L2Stage::kB + nt * 4 * l2_b_rows(C) * 4 * 16; }

template <LinearFormat F, int NT>
__global__ void __launch_bounds__(kThreads) moe_small_l2_kernel(const SmallParams p) {
    constexpr int kE = Traits<F>::kElems;
    constexpr int kStepK = 4 * kE;
    constexpr int kLds = kE / 8;   // = 4 for fp4: the chunks of a lane's 16 weight bytes
    using SL = L2Stage;
    const int stage_bytes = l2_stage_bytes(NT, p.C), BR = l2_b_rows(p.C);
    extern __shared__ __align__(16) uint8_t smem[];
    __shared__ Routing rt;
    __shared__ const uint8_t* ent_w[kMaxSlots];
    __shared__ const uint8_t* ent_s[kMaxSlots];
    __shared__ int ent_bias[kMaxSlots];
    __shared__ float ent_os[kMaxSlots];

    // ids were written before L1 ran, and this grid starts only after every L1 CTA passed its own
    // griddepcontrol.wait (see top): they are complete. h is read only after the wait below.
    route_slots(p, rt);
    const int Q = rt.n_entries;
    for (int u = static_cast<int>(threadIdx.x); u < Q; u += kThreads) {
        const GemmGroup G = p.table[rt.entry_exp[u]];
        ent_w[u] = G.w[0];
        ent_s[u] = G.s[0];
        ent_bias[u] = G.bias[0];
        ent_os[u] = G.out_scale[0];
    }
    __syncthreads();

    const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
    const int g = lane >> 2, tig = lane & 3;
    const int row0 = static_cast<int>(blockIdx.x) * kL2Rows;
    const int ws0 = warp * p.spw, ws1 = min(ws0 + p.spw, p.steps);
    const int nsw = max(0, ws1 - ws0);   // this warp's steps per entry
    // Lane constants: byte offsets of its rows' weight and scale bytes at step ws0 (rows past N
    // copy nothing), and of its B chunk in a stage.
    int64_t woff[2], soff[2];
    bool ok[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int64_t row = row0 + h * 8 + g;
        ok[h] = row < p.N;
        woff[h] = ok[h] ? row * p.w_row_bytes + ws0 * kStepBytes + tig * 16 : 0;
        soff[h] = ok[h] ? row * p.s_row_bytes + ws0 * scale_step_bytes<F>() + scale_lane_off<F>(tig) : 0;
    }
    const int col0 = ws0 * kStepK + tig * kE;   // first h column of this lane's chunks
    asm volatile("griddepcontrol.wait;" ::: "memory");

    uint8_t* ring = smem;   // [warp][stage]
    const uint32_t ring_s = static_cast<uint32_t>(__cvta_generic_to_shared(ring)) +
                            static_cast<uint32_t>(warp * kL2Stages * stage_bytes);
    // The copy cursor: entry iu, step is (relative to ws0); hrow: this lane's h rows of entry iu.
    int iu = 0, is = 0;
    const uint16_t* hrow[NT];
    auto entry_rows = [&](int u) {
        const int m = rt.entry_cnt[u], st0 = rt.entry_start[u];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const int t = nt * 8 + g;
            hrow[nt] = t < m && g < BR ? p.h + static_cast<int64_t>(rt.order[st0 + t]) * p.K + col0 : nullptr;
        }
    };
    if (nsw > 0 && Q > 0) entry_rows(0);
    auto issue = [&](int slot) {
        if (iu >= Q || nsw == 0) return;
        const uint32_t base = ring_s + static_cast<uint32_t>(slot * stage_bytes);
        const uint8_t* w = ent_w[iu] + is * kStepBytes;
        const uint8_t* sc = ent_s[iu] + is * scale_step_bytes<F>();
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            cp_async16(base + (h * 32 + lane) * 16, w + woff[h], ok[h]);
            cp_async4(base + SL::kScale + (h * 32 + lane) * 4, sc + soff[h], ok[h]);
        }
        if (g < BR) {
            const int cb = is * kStepK;   // column offset of this step from col0
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                for (int l = 0; l < kLds; ++l) {
                    // K % 8 == 0: a chunk is wholly in or out; rows past the entry's slots read zeros.
                    const bool in = hrow[nt] != nullptr && col0 + cb + l * 8 < p.K;
                    cp_async16(base + SL::kB + (((nt * kLds + l) * BR + g) * 4 + tig) * 16,
                               in ? hrow[nt] + cb + l * 8 : p.h, in);
                }
            }
        }
        if (++is == nsw) {
            is = 0;
            if (++iu < Q) entry_rows(iu);
        }
    };
#pragma unroll
    for (int i = 0; i < kL2Stages - 1; ++i) {
        issue(i);
        cp_async_commit();
    }

    float acc[NT][4];
    // Each finished entry's partials go to shared memory after the rings, per (warp, slot, row).
    float* fin = reinterpret_cast<float*>(ring + kWarps * kL2Stages * stage_bytes);   // [warp][slot][16]
    const int n = p.T * p.k;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[nt][i] = 0.0f;

    int slot = 0, issue_slot = kL2Stages - 1;
    const int total = Q * nsw;
    int cu = 0, cs = 0;   // the compute cursor: entry, step
    for (int j = 0; j < total; ++j) {
        issue(issue_slot);
        issue_slot = issue_slot == kL2Stages - 1 ? 0 : issue_slot + 1;
        cp_async_commit();
        cp_async_wait<kL2Stages - 1>();
        const uint8_t* st = ring + (warp * kL2Stages + slot) * stage_bytes;
        uint4 wv[2];
        uint32_t mlo[2], mhi[2];
        const int bias = ent_bias[cu];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int idx = h * 32 + lane;
            wv[h] = *reinterpret_cast<const uint4*>(st + idx * 16);
            const uint32_t word = *reinterpret_cast<const uint32_t*>(st + SL::kScale + idx * 4);
            scale_mults<F>(word, tig, bias, mlo[h], mhi[h]);
        }
        uint4 bv[NT][kLds];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int l = 0; l < kLds; ++l)
                bv[nt][l] = g < BR ? *reinterpret_cast<const uint4*>(st + SL::kB + (((nt * kLds + l) * BR + g) * 4 + tig) * 16)
                                   : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int l = 0; l < kLds; ++l) {
            uint32_t a[2][4];
            decode_a<F>(wv[0], wv[1], l, mlo[0], mhi[0], mlo[1], mhi[1], a);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                mma_bf16(acc[nt], a[0][0], a[0][1], a[0][2], a[0][3], bv[nt][l].x, bv[nt][l].y);
                mma_bf16(acc[nt], a[1][0], a[1][1], a[1][2], a[1][3], bv[nt][l].z, bv[nt][l].w);
            }
        }
        slot = slot == kL2Stages - 1 ? 0 : slot + 1;
        if (++cs == nsw) {
            // Entry cu done: its (slot, row) partials of this K-range, scaled by the expert's factor.
            const float os = ent_os[cu];
            const int m = rt.entry_cnt[cu], st0 = rt.entry_start[cu];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int t = nt * 8 + 2 * tig + (i & 1);
                    if (t < m) {
                        const int rl = g + (i >= 2 ? 8 : 0);
                        fin[(warp * n + rt.order[st0 + t]) * kL2Rows + rl] = acc[nt][i] * os;
                    }
                    acc[nt][i] = 0.0f;
                }
            cs = 0;
            ++cu;
        }
    }
    cp_async_wait<0>();
    __syncthreads();

    // y[t, row] = shared[t, row] + Σ_s (Σ_w fin[w][t·k + s][row]), sums in fixed order from 0.
    const int nw = static_cast<int>(ceil_div(p.steps, p.spw));
    for (int i = static_cast<int>(threadIdx.x); i < p.T * kL2Rows; i += kThreads) {
        const int rl = i % kL2Rows, t = i / kL2Rows;
        const int row = row0 + rl;
        if (row >= p.N) continue;
        float sum = 0.0f;
        for (int s = 0; s < p.k; ++s) {
            const int sl = t * p.k + s;
            float v = 0.0f;
            for (int w = 0; w < nw; ++w) v = __fadd_rn(v, fin[(w * n + sl) * kL2Rows + rl]);
            sum = __fadd_rn(sum, v);
        }
        const int64_t o = static_cast<int64_t>(t) * p.N + row;
        p.y[o] = p.shared ? __fadd_rn(p.shared[o], sum) : sum;
    }
}

// ---------------------------------------------------------------------------- host

// Dynamic shared memory: L1 x [C][x_rs], the rings, the partials [wk][2][rows][C]; L2 the rings and
// the finished partials [warp][n][rows].
size_t l1_smem(int C, int x_rs) {
    return static_cast<size_t>(C) * x_rs + static_cast<size_t>(kWarps) * kL1Stages * L1Stage::kBytes +
           static_cast<size_t>(kL1Wk) * 2 * kL1Rows * C * sizeof(float);
}
size_t l2_smem(int nt, int C, int n) {
    return static_cast<size_t>(kWarps) * kL2Stages * l2_stage_bytes(nt, C) +
           static_cast<size_t>(kWarps) * n * kL2Rows * sizeof(float);
}

// CTAs of `kernel` resident on the whole GPU at `smem` bytes (cached per kernel, device, size).
template <typename K> int64_t resident_ctas(K kernel, size_t smem) {
    static std::mutex m;
    static std::map<std::tuple<const void*, int, size_t>, int64_t> cache;
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    std::lock_guard<std::mutex> lk(m);
    const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), dev, smem);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
    int per_sm = 0, sms = 0;
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    return cache[key] = static_cast<int64_t>(per_sm) * sms;
}

template <typename K> void raise_smem(K kernel) {
    static std::mutex m;
    static std::set<std::pair<const void*, int>> done;
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    std::lock_guard<std::mutex> lk(m);
    if (done.insert({reinterpret_cast<const void*>(kernel), dev}).second)
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
}

SmallParams base_params(const DeviceExperts& ex, int64_t T, int64_t k, int nt) {
    SmallParams p{};
    p.T = static_cast<int>(T);
    p.k = static_cast<int>(k);
    p.E = static_cast<int>(ex.E);
    p.C = static_cast<int>(std::min<int64_t>(8 * nt, T));
    return p;
}

// L1: w1 / w3 [I, D] → h.
template <LinearFormat F, int NT>
void launch_l1(const DeviceExperts& ex, float limit, const uint16_t* x, const int32_t* ids, const float* weights,
               int64_t T, int64_t k, uint16_t* h, cudaStream_t stream) {
    constexpr int kStepK = 4 * Traits<F>::kElems;
    SmallParams p = base_params(ex, T, k, NT);
    p.ids = ids;
    p.wts = weights;
    p.x = x;
    p.h = h;
    p.limit = limit;
    p.table = static_cast<const GemmGroup*>(ex.l1_table);
    p.N = static_cast<int>(ex.I);
    p.K = static_cast<int>(ex.D);
    p.steps = static_cast<int>(ex.w1[0].weight_row_bytes / kStepBytes);
    p.w_row_bytes = ex.w1[0].weight_row_bytes;
    p.s_row_bytes = ex.w1[0].scale_row_bytes;
    p.spw = static_cast<int>(ceil_div(p.steps, kL1Wk));
    p.x_rs = static_cast<int>(ceil_div(static_cast<int64_t>(p.steps) * kStepK * 2, 128) * 128 + Traits<F>::kRowMod);
    const size_t smem = l1_smem(p.C, p.x_rs);
    raise_smem(moe_small_l1_kernel<F, NT>);
    // Row blocks per CTA: the n·RB (entry, row block) pairs spread over about one wave of CTAs, so
    // that each CTA's fixed costs (routing, x stage, ring fill) are paid once for several blocks.
    const int64_t RB = ceil_div(ex.I, kL1Rows), n = T * k;
    const int64_t resident = std::max<int64_t>(1, resident_ctas(moe_small_l1_kernel<F, NT>, smem));
    p.rpc = static_cast<int>(std::clamp<int64_t>(n * RB / resident, 1, RB));
    CUDA_CHECK(launch_pdl(moe_small_l1_kernel<F, NT>,
                          dim3(static_cast<unsigned>(ceil_div(RB, p.rpc)), static_cast<unsigned>(n)),
                          dim3(kThreads), smem, stream, p));
}

// L2: h · w2 [D, I]ᵀ, combined per token (+ shared) → y.
template <LinearFormat F, int NT>
void launch_l2(const DeviceExperts& ex, const int32_t* ids, int64_t T, int64_t k, const uint16_t* h,
               const float* shared, float* y, cudaStream_t stream) {
    SmallParams p = base_params(ex, T, k, NT);
    p.ids = ids;
    p.h = const_cast<uint16_t*>(h);
    p.shared = shared;
    p.y = y;
    p.table = static_cast<const GemmGroup*>(ex.l2_table);
    p.N = static_cast<int>(ex.D);
    p.K = static_cast<int>(ex.I);
    p.steps = static_cast<int>(ex.w2[0].weight_row_bytes / kStepBytes);
    p.w_row_bytes = ex.w2[0].weight_row_bytes;
    p.s_row_bytes = ex.w2[0].scale_row_bytes;
    p.spw = static_cast<int>(ceil_div(p.steps, kWarps));
    const size_t smem = l2_smem(NT, p.C, static_cast<int>(T * k));
    raise_smem(moe_small_l2_kernel<F, NT>);
    CUDA_CHECK(launch_pdl(moe_small_l2_kernel<F, NT>, dim3(static_cast<unsigned>(ceil_div(ex.D, kL2Rows))),
                          dim3(kThreads), smem, stream, p));
}

// Checks shared by the two halves; false for T = 0 (nothing to launch).
bool check_small(const char* what, const DeviceExperts& ex, int64_t T, const uint16_t* x, const MoeLayerWorkspace& ws) {
    MEGAMOE_CHECK(ex.E > 0 && static_cast<int64_t>(ex.w1.size()) == ex.E, what, ": experts not uploaded");
    MEGAMOE_CHECK(!ws.h.empty(), what, ": the workspace holds no buffers");
    MEGAMOE_CHECK(ex.E == ws.dispatch.E && ex.D == ws.dispatch.D, what, ": workspace is for E = ", ws.dispatch.E,
                  ", D = ", ws.dispatch.D, ", experts have E = ", ex.E, ", D = ", ex.D);
    MEGAMOE_CHECK(T >= 0 && T <= ws.dispatch.T_max, what, ": T = ", T, " exceeds the workspace's T_max = ",
                  ws.dispatch.T_max);
    if (T == 0) return false;
    const int64_t k = ws.dispatch.k;
    MEGAMOE_CHECK(moe_small_fits(ex, T, k, x), what, ": T = ", T, ", k = ", k,
                  " (or x's alignment, or the format) is outside the small path (T <= ", kMoeSmallMaxT, ", T*k <= ",
                  kMoeSmallMaxSlots, ", 16-byte aligned x, NVFP4 or MXFP4)");
    return true;
}

}  // namespace

bool moe_small_fits(const DeviceExperts& ex, int64_t T, int64_t k, const uint16_t* x_bf16) {
    if (T < 1 || T > kMoeSmallMaxT || T * k > kMoeSmallMaxSlots) return false;
    if (ex.format != LinearFormat::nvfp4 && ex.format != LinearFormat::mxfp4) return false;
    if (reinterpret_cast<uintptr_t>(x_bf16) % 16 != 0) return false;   // the x stage copies 16 bytes
    // Shared memory of the largest instance (L1 stages up to C = 16 x rows of D bf16).
    const int64_t x_rs = ceil_div(ex.D * 2, 128) * 128 + 32;   // fp4 kRowMod
    const int C = static_cast<int>(T);   // T ≤ 8: one n8 token tile (NT = 1)
    return l1_smem(C, static_cast<int>(x_rs)) <= 200 * 1024 && l2_smem(1, C, static_cast<int>(T * k)) <= 200 * 1024;
}

void moe_small_l1(const DeviceExperts& ex, float limit, const uint16_t* x, const int32_t* ids, const float* weights,
                  int64_t T, MoeLayerWorkspace& ws, CUstream_st* stream) {
    if (!check_small("moe_small_l1", ex, T, x, ws)) return;
    const int64_t k = ws.dispatch.k;
    uint16_t* h = ws.h.data();
    if (ex.format == LinearFormat::nvfp4) launch_l1<LinearFormat::nvfp4, 1>(ex, limit, x, ids, weights, T, k, h, stream);
    else launch_l1<LinearFormat::mxfp4, 1>(ex, limit, x, ids, weights, T, k, h, stream);
}

void moe_small_l2(const DeviceExperts& ex, const uint16_t* x, const int32_t* ids, int64_t T, const float* shared,
                  float* y, MoeLayerWorkspace& ws, CUstream_st* stream) {
    if (!check_small("moe_small_l2", ex, T, x, ws)) return;
    const int64_t k = ws.dispatch.k;
    const uint16_t* h = ws.h.data();
    if (ex.format == LinearFormat::nvfp4) launch_l2<LinearFormat::nvfp4, 1>(ex, ids, T, k, h, shared, y, stream);
    else launch_l2<LinearFormat::mxfp4, 1>(ex, ids, T, k, h, shared, y, stream);
}

void moe_layer_small(const DeviceExperts& ex, float limit, const uint16_t* x, const int32_t* ids, const float* weights,
                     int64_t T, const float* shared, float* y, MoeLayerWorkspace& ws, CUstream_st* stream) {
    if (!check_small("moe_layer_small", ex, T, x, ws)) return;
    moe_small_l1(ex, limit, x, ids, weights, T, ws, stream);
    moe_small_l2(ex, x, ids, T, shared, y, ws, stream);
}

}  // namespace megamoe::cuda
