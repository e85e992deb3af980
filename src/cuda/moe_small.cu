// moe_small.cu — the routed-expert layer for a few tokens (decode): two kernels, no dispatch.
//
// At T ≤ kMoeSmallMaxT tokens the layer is bound by reading the weights of the experts the tokens
// hit (V4-Flash at T = 1: 6 experts, ~80 MB), and the general path's dependent launches (route,
// gather, work list, L1, L2, combine) cost latency beside those bytes. Here the layer is two
// launches, each reading its routing straight from ids and streaming its weights through a
// warp-specialized ring: one producer thread moves whole weight blocks from HBM into shared memory
// with bulk asynchronous copies (cp.async.bulk, completion counted on an mbarrier), and the
// consumer warps decode (device.cuh, as linear.cu) and multiply them (mma.sync m16n8k16, weights
// as A, tokens as B).
//
//   moe_small_l1  grid: one CTA per SM (two for MXFP4 at T ≤ kL1TwoMaxT; at most one per (entry,
//                 row block) pair); 8 consumer warps + 1. Every CTA derives the layer's routing
//                 from ids in shared memory (route_slots: the stable sort of the T·k slots by
//                 expert, the order ops::moe uses, and the "entries": each expert's slots in runs
//                 of at most C = min(T, 8), the MMA's token columns). The work is the list of
//                 (entry q, 16-row block rb) pairs, q-major; CTA c takes a contiguous share of it.
//                 A pair is two ring stages, the block's 16 w1 rows and then the same 16 w3 rows,
//                 each with its scale rows. Consumer warp w multiplies its K-range (steps [w·spw,
//                 (w+1)·spw) of 64 weight bytes) of every stage with the entry's tokens' x (staged
//                 once in shared memory for all T tokens, as linear.cu's x stage; at ≤ 4 steps per
//                 warp, V4-Flash at one CTA per SM, the fragments are held in registers per
//                 entry); after the w3 stage the eight K-range partials are summed in shared memory
//                 in warp order and h[slot, row] = silu(min(g, L))·clamp(u, ±L)·weight[slot] is
//                 written in bf16 at the slot's own row of h (slot = t·k + s).
//   moe_small_l2  grid: one CTA per SM (at most one per 16-row block of y); 16 consumer warps + 1
//                 (8 for V4-Pro's w2: l2_warps).
//                 CTA c owns a contiguous range of row blocks of y and streams, entry by entry, the
//                 w2 rows of those blocks (up to 2 blocks per stage); consumer warp w holds the
//                 entry's h columns of its K-range (1-3 steps) in registers, loaded one entry
//                 ahead (under official numerics FP8-rounded there in their 128-column blocks,
//                 which are exactly a step's columns). Each (slot, row) partial goes to shared
//                 memory per warp, and at the end y[t, row] = shared[t] + Σ_s (Σ_w partial) in slot
//                 order from 0: the combine of moe_dispatch.h, so no rows buffer and no third launch.
//
// Expert parallelism (gemm.h, moe_small_l2_placed): a slot whose id lies outside [0, E) has no
// expert (route_slots sorts it last, in no entry); L2 can write, instead of y, the slot rows or row
// sums that the exchange sends home, so that a rank's few rows need neither the general path's
// dispatch nor the exchange's place kernel.
//
// The ring: a stage holds a block of weight rows and its scale rows as they lie in global memory
// (each one bulk copy). full[s] completes when the producer has arrived with the stage's byte count
// and the copies have landed; empty[s] when every consumer warp is done with it. Rows past N are
// not copied (their stale bytes feed MMA rows whose results are never stored); a partial block's
// scale bytes past a multiple of 16 (odd widths only) are copied by the producer thread itself.
//
// Measured (H200, megamoe-gemm-bench --part experts [--moe-small], docs/bench-gemm.md "small-T
// path"): V4-Flash NVFP4 T = 1 46.2 µs against moe_layer's 54.0, T = 2-4 even, T = 8 slower (265
// against 242 µs). What bounds it, by taking halves away in a temporary build (consumers that skip
// the math: the stream alone; a producer that copies nothing: the math alone): at T = 1 the stream
// alone took 30.5 µs (at T = 8, 85% of copy bandwidth) and the math alone 43.5 µs. The math is
// bound by the integer pipe: the FP4 → BF16 decode was ~1.25 LOP3/SHF per weight (fp4x8_bits; 1.0
// since, plus shifts the compiler may move to the FMA pipe), an SM sub-partition issues integer ops
// at half rate, and the consumers reach ~0.45 issued
// instructions per cycle per scheduler (Nsight Compute: math-pipe throttle, then wait and
// not-selected stalls). 16 L1 consumer warps measured no faster. One bulk copy per weight row
// (rows padded apart in shared memory against the 2-way bank conflict of rows g, g + 1 in a
// quarter-warp's LDS.128) held the stream to 1.9-2.2 TB/s: 32 copies per stage instead of 2.
// Without a ring (measured slower, not kept; docs/bench-gemm.md "Small-T path: both halves from
// registers"): each warp loading its own weights into registers, linear_regs' layout (L1 as tiles
// of 8 w1 + 8 w3 rows, a warp over the whole K, the SwiGLU from its own accumulators; L2 as
// 16-row tiles × 8 K-ranges, two CTAs of 8 warps per SM) took V4-Flash NVFP4 T = 1 from 45.9 to
// 50.3 µs (H100); L2 alone from registers, with this L1, 45.7 (even), and the step in official
// numerics 1.6% slower; an L2-cache bulk prefetch of each warp's next tile, 60 µs.
//
// On the FP8 tensor core (wgmma m64n16k32 e4m3, A from registers: the e2m1 codes placed as e4m3
// in 5 ops per 8 weights; official numerics, branch wip/small-fp8-l1): correct, but L1 measured
// slower (H100, V4-Flash NVFP4 T = 1 / 2 +2.7% / +7.8%, the 8-layer step +0.9% / +1.1%; docs/bench-gemm.md
// "L1 on the FP8 tensor core through wgmma"): the consumers wait on latency, not issue.
//
// Overlap. L1 waits for the router (griddepcontrol.wait) before anything, since ids say which
// weights to read, and then lets L2 launch at once (launch_dependents). L2 reads ids and the
// experts' descriptors and starts streaming w2 as soon as its CTAs are resident, and waits for
// L1 (its h) only before the first h load.
//
// Exactness: as linear.cu / gemm.cu (exact weights on the tensor core, fp32 accumulation), so h
// and y differ from the CPU twins (ops::expert_ffn, ops::moe) only by fp32 summation order and the
// bf16 rounding of h between L1 and L2 — the same contract as moe_l1 / moe_l2 / moe_combine.
// Deterministic: fixed reduction orders, no atomics.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "core/common.h"
#include "cuda/device.cuh"
#include "cuda/device_info.h"
#include "cuda/gemm.h"
#include "cuda/gemm_group.cuh"
#include "cuda/numerics.cuh"
#include "io/formats.h"

namespace megamoe::cuda {

namespace {

using namespace dev;

// Consumer warps (decode + MMA) per CTA; one more warp holds the producer thread (bulk copies).
// L1: 8 (2 per scheduler; 16 measured no faster), each holding its K-range's x fragments in
// registers where that is at most 4 steps (V4-Flash); L2: 16 (V4-Flash: one step of w2's K each) or
// 8 (V4-Pro: three steps each; l2_warps says why), and the entry's h fragments of a warp's K-range
// fit in registers twice (prefetch).
constexpr int kL1Warps = 8;
constexpr int kL2Warps = 16;
constexpr int kL2ProWarps = 8;
constexpr int kL1XRegSteps = 4;   // L1: x fragments in registers up to this many steps per warp
constexpr int kL2MaxChunk = 2;    // L2: 16-row blocks per stage at most (fewer, larger stages: less sync per byte)
constexpr int kMaxSlots = static_cast<int>(kMoeSmallMaxSlots);
constexpr int kRows = 16;                           // weight rows per stage: the MMA's M
constexpr int kMaxStages = 8;
constexpr int kMinStages = 2;
constexpr int kL2MaxSpw = 2;                        // L2 at kL2Warps: steps per consumer warp held in registers
constexpr int kL2ProSpw = 3;                        // L2 at kL2ProWarps: its steps per warp
// L2's consumer warps for w2's K of `steps` 128-column steps. The instances are 16 warps of 1 or 2
// steps and 8 warps of 3. V4-Pro's w2 has 24 steps: at 16 warps, 12 warps took 2 and 4 had none
// (the ring's stage waited for the slowest), at 8 warps each takes 3 and the fin partials halve.
// Measured (H100, main's 16 warps against 8 in one device call, megamoe-gemm-bench --part experts
// --model all --T 1,2 --moe-small, two rounds): V4-Pro NVFP4 T = 1 104.4 → 97.0 µs (−7.3%),
// T = 2 190.1 → 172.4 (−9.3%); MXFP4 T = 1 109.7 → 108.8, T = 2 196.0 → 187.1 (−4.6%); again on
// 2026-12-07 against a 191a93e build (H100, one call, --model pro, two rounds): NVFP4 −5.6% / −8.6%,
// MXFP4 −0.9% / −4.6% at T = 1 / 2 (docs/bench-gemm.md, "L2 at 8 warps for V4-Pro"). V4-Flash
// (16 steps, one per warp at 16) measured even (NVFP4) or 4% slower (MXFP4 T = 1) at 8 warps of 2,
// and keeps 16. Steps 33-48 (16 warps of 3) have no instance: the plan refuses them (not ok).
// Registers (ptxas, sm_90a): 16 warps of 2 steps are held to 96 per thread by the 544-thread block
// and spill 188-232 bytes; 8 warps of 3 take 163-164 and do not spill.
__host__ __device__ constexpr int l2_warps(int steps) { return steps > 16 && steps <= 8 * kL2ProSpw ? kL2ProWarps : kL2Warps; }
constexpr int kSmemBudget = 220 * 1024;             // dynamic shared memory per CTA (227 KB on sm_90)
// Ring depths (H200, V4-Flash NVFP4): standalone, 3 / 4 stages measured as fast as 4 / 6 (T = 1
// 46.97 against 47.79 µs, T = 8 280.4 against 280.3); in the 20-layer batch-1 step 3 L1 stages
// measured 4480.1 µs against 4500.0 with 2 (with 4 L2 stages). Fewer stages leave more shared memory
// to the kernels running beside L1 (the shared expert on the runner's side stream).
constexpr int kL1StagesWanted = 3;
constexpr int kL2StagesWanted = 4;
// L1 at two CTAs per SM (grid 2 × SMs, two ring stages each, x from shared memory: kXs = 0) where
// the two fit (two_cta_budget of dynamic shared memory each): 16 consumer warps per SM in two
// independent rings, against 8 in one. The consumers are latency-bound, not issue-bound (H100 ncu,
// V4-Flash NVFP4 T = 1: 46% issue-active, stalls on fixed-latency dependencies of the decode, then
// on the ring), and 8 warps per SM leave too little to hide it; 16 warps in one CTA had measured no
// faster (see the top: they share one ring, each with half the K-range). Measured (H100, main
// against this in one device call, megamoe-gemm-bench --part experts --model flash --moe-small):
// MXFP4 T = 1 / 2 / 4 53.3 / 89.4 / 160.0 → 50.0 / 83.2 / 147.8 µs; NVFP4 48.6 / 80.5 / 143.4 →
// 49.1 / 81.8 / 168.3 (its scale decode, nvfp4_mults, costs more registers and instructions per
// step, and T = 4 lost), so NVFP4 keeps one CTA. The 8-layer batch-1 / 2 step with MXFP4 experts
// (megamoe-forward-bench --experts mxfp4, three rounds, medians): exact 1796.5 / 2242.1 → 1753.5 /
// 2171.1 µs, official 1858.2 / 2312.7 → 1814.7 / 2246.8 (that build ran both formats at two CTAs;
// this rule, one round in a later call: −1.1% to −1.7%). T ≤ kL1TwoMaxT: what was measured.
constexpr int64_t kL1TwoMaxT = 4;
// How much shared memory each of the two CTAs may take: two_cta_budget (below), from the device's
// facts.

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

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
    int spw;                   // steps per consumer warp
    int stages;                // ring depth
    int stage_rows;            // weight rows per stage: 16 (L1), 16 · rb_chunk (L2)
    int stage_bytes;           // one stage: stage_rows weight rows, then as many scale rows (as in global memory)
    int rb_chunk;              // L2: row blocks per stage
    int x_rs;                  // L1: x row stride in shared memory (bytes)
    int rb_max;                // L2: row blocks per CTA at most
    bool official;             // Numerics::official (gate / up rounded to bf16; h FP8-rounded; combine)
    int placed;                // L2's output: kPlaceY (y = shared + the slots' sum), or for expert
                               // parallelism kPlaceSlotRows / kPlaceRowSums (moe_small_l2_placed)
};
constexpr int kPlaceY = 0, kPlaceSlotRows = 1, kPlaceRowSums = 2;

template <int W> __device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(W * 32) : "memory"); }

// The ring's barriers: full[s] (count 1: the producer's arrive, plus the stage's bytes) and
// empty[s] (count: the consumer warps). Thread 0 initializes; the caller's next __syncthreads publishes.
struct Ring {
    uint64_t full[kMaxStages];
    uint64_t empty[kMaxStages];
};
__device__ __forceinline__ void ring_init(Ring& r, int stages, int warps) {
    if (threadIdx.x == 0) {
        for (int s = 0; s < stages; ++s) {
            mbar_init(smem_addr(&r.full[s]), 1);
            mbar_init(smem_addr(&r.empty[s]), static_cast<uint32_t>(warps));
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
}

// Item i of a CTA's ring sequence: its slot (i % stages) and the parity of its round ((i / stages)
// & 1), advanced one item at a time. (Per item, the divisions by the runtime stage count cost ~25
// instructions of each consumer warp: Nsight Compute's source counters, docs/bench-gemm.md.)
struct RingPos {
    int slot = 0;
    uint32_t phase = 0;
    bool wrapped = false;   // i >= stages: the slot was used before (the producer waits for it)
    __device__ __forceinline__ void next(int stages) {
        if (++slot == stages) {
            slot = 0;
            phase ^= 1u;
            wrapped = true;
        }
    }
};

// Producer (one thread): stage rp.slot ← rows [row0, row0 + rows) ∩ [0, N) of one weight (rows of
// w_row_bytes at w, scale rows of s_row_bytes at s; rows ≤ stage_rows), each block in one bulk
// copy: the weight rows are contiguous, and so are the scale rows (one copy per row measured
// slower, see the top). Waits for the slot to be free, then advances rp.
__device__ __forceinline__ void produce(const SmallParams& p, Ring& r, uint8_t* ring, RingPos& rp, const uint8_t* w,
                                        const uint8_t* s, int row0, int rows) {
    const int slot = rp.slot;
    if (rp.wrapped) mbar_wait(smem_addr(&r.empty[slot]), rp.phase ^ 1u);
    rp.next(p.stages);
    uint8_t* st = ring + static_cast<size_t>(slot) * p.stage_bytes;
    rows = min(rows, p.N - row0);
    const uint32_t wbytes = static_cast<uint32_t>(rows * p.w_row_bytes);
    const int64_t sbytes = static_cast<int64_t>(rows) * p.s_row_bytes;
    const uint32_t sbulk = static_cast<uint32_t>(sbytes & ~int64_t(15));
    uint8_t* sc = st + p.stage_rows * p.w_row_bytes;
    const uint8_t* ssrc = s + static_cast<int64_t>(row0) * p.s_row_bytes;
    const uint32_t full = smem_addr(&r.full[slot]);
    if (sbulk < sbytes) {   // a partial block of odd widths: the last (≤ 12) scale bytes by hand
        for (int64_t b = sbulk; b < sbytes; b += 4)   // s_row_bytes % 4 == 0: whole words
            *reinterpret_cast<uint32_t*>(sc + b) = __ldg(reinterpret_cast<const uint32_t*>(ssrc + b));
        // These generic writes come before any later bulk copy into the same bytes.
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    }
    mbar_expect_arrive(full, wbytes + sbulk);
    bulk_copy(smem_addr(st), w + static_cast<int64_t>(row0) * p.w_row_bytes, wbytes, full);
    if (sbulk > 0) bulk_copy(smem_addr(sc), ssrc, sbulk, full);
}

// ---------------------------------------------------------------------------- routing

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

// All threads call it; ends with a barrier. A slot whose id lies outside [0, E) has no expert
// (padding, or under expert parallelism the skip id of a slot another rank computes): it sorts
// last (as E) and is in no entry, so it is not computed and its h row is not written.
__device__ __forceinline__ bool has_expert(const SmallParams& p, int j) { return p.ids[j] >= 0 && p.ids[j] < p.E; }
__device__ void route_slots(const SmallParams& p, Routing& r) {
    const int n = p.T * p.k, C = p.C;
    const int i = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
    for (int j = i; j < n; j += nt) r.id[j] = has_expert(p, j) ? p.ids[j] : p.E;
    __syncthreads();
    for (int j = i; j < n; j += nt) {
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
    for (int j = i; j < n; j += nt) {
        const int pos = r.pos[j];
        const int e = r.id[j];
        if (pos % C != 0 || e == p.E) continue;
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
            if (r.pos[o] == 0 && r.id[o] < p.E) q += (r.cnt[o] + C - 1) / C;
        r.n_entries = q;
    }
    __syncthreads();
}

// ---------------------------------------------------------------------------- consumers

// A lane's block-scale multipliers (decode_a's lo, hi) from the scale word of its row.
template <LinearFormat F>
__device__ __forceinline__ void scale_mults(uint32_t word, int tig, int bias, uint32_t& lo, uint32_t& hi) {
    if constexpr (F == LinearFormat::nvfp4) {
        nvfp4_mults(word >> (16 * (tig & 1)), lo, hi);
    } else {
        lo = hi = pow2_bf16x2((word >> (8 * tig)) & 0xFFu, bias);
    }
}
// Scale bytes per weight row per step, and the offset of a lane's word within them.
template <LinearFormat F> __device__ __forceinline__ int scale_step_bytes() { return F == LinearFormat::nvfp4 ? 8 : 4; }
template <LinearFormat F> __device__ __forceinline__ int scale_lane_off(int tig) {
    return F == LinearFormat::nvfp4 ? (tig >> 1) * 4 : 0;
}

// One step of a consumer warp: acc[2][4] (two chains, summed by the caller) += the stage's 16 rows ×
// step s times B, where bfrag(l) gives the lane's x / h fragment of chunk l (the 8 columns of word l
// of its 16 weight bytes).
template <LinearFormat F, typename BFrag>
__device__ __forceinline__ void consume_step(const uint8_t* w0, const uint8_t* w1, const uint8_t* sc0,
                                             const uint8_t* sc1, int s, int tig, int bias, float (&acc)[2][4],
                                             BFrag&& bfrag) {
    const uint4 wv0 = *reinterpret_cast<const uint4*>(w0 + s * kStepBytes);
    const uint4 wv1 = *reinterpret_cast<const uint4*>(w1 + s * kStepBytes);
    uint32_t lo0, hi0, lo1, hi1;
    scale_mults<F>(*reinterpret_cast<const uint32_t*>(sc0 + s * scale_step_bytes<F>()), tig, bias, lo0, hi0);
    scale_mults<F>(*reinterpret_cast<const uint32_t*>(sc1 + s * scale_step_bytes<F>()), tig, bias, lo1, hi1);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
        const uint4 b = bfrag(l);
        uint32_t a[2][4];
        decode_a<F>(wv0, wv1, l, lo0, hi0, lo1, hi1, a);
        mma_bf16(acc[l & 1], a[0][0], a[0][1], a[0][2], a[0][3], b.x, b.y);
        mma_bf16(acc[l & 1], a[1][0], a[1][1], a[1][2], a[1][3], b.z, b.w);
    }
}

// A lane's byte offsets within a 16-row block of a stage: its weight rows g and g + 8 (16 bytes at
// column tig·16 of each step) and its scale words of the same rows. Fixed for the kernel, so they
// are computed once (in 32 bits: a stage is < 227 KB) rather than per block and entry.
struct LaneOffs {
    int w0, w1, s0, s1;
};
template <LinearFormat F> __device__ __forceinline__ LaneOffs lane_offs(const SmallParams& p) {
    const int lane = static_cast<int>(threadIdx.x) & 31, g = lane >> 2, tig = lane & 3;
    const int wr = static_cast<int>(p.w_row_bytes), sr = static_cast<int>(p.s_row_bytes);
    LaneOffs o;
    o.w0 = g * wr + tig * 16;
    o.w1 = o.w0 + 8 * wr;
    o.s0 = scale_lane_off<F>(tig) + g * sr;
    o.s1 = o.s0 + 8 * sr;
    return o;
}

// One consumer warp's K-range of 16 rows of a stage (weight rows at wst, scale rows at sst; the
// lane's offsets lo): steps [s0, s0 + ns); bfrag(j, l) for step j of the range. kUnroll > 0: the
// loop fully unrolled to at most kUnroll steps (so that a caller's per-step register arrays stay in
// registers); 0: a plain loop.
template <LinearFormat F, int kUnroll, typename BFrag>
__device__ __forceinline__ void consume(const LaneOffs& lo, const uint8_t* wst, const uint8_t* sst, int s0, int ns,
                                        int bias, float (&acc)[2][4], BFrag&& bfrag) {
    const int tig = static_cast<int>(threadIdx.x) & 3;
    const uint8_t* w0 = wst + lo.w0;
    const uint8_t* w1 = wst + lo.w1;
    const uint8_t* sc0 = sst + lo.s0;
    const uint8_t* sc1 = sst + lo.s1;
    if constexpr (kUnroll > 0) {
#pragma unroll
        for (int j = 0; j < kUnroll; ++j)
            if (j < ns) consume_step<F>(w0, w1, sc0, sc1, s0 + j, tig, bias, acc, [&](int l) { return bfrag(j, l); });
    } else {
#pragma unroll 2
        for (int j = 0; j < ns; ++j)
            consume_step<F>(w0, w1, sc0, sc1, s0 + j, tig, bias, acc, [&](int l) { return bfrag(j, l); });
    }
}

__device__ __forceinline__ void zero(float (&acc)[2][4]) {
#pragma unroll
    for (int c = 0; c < 2; ++c)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[c][v] = 0.0f;
}

// ---------------------------------------------------------------------------- L1

// kXs > 0: each warp's x fragments (at most kXs steps) held in registers per entry; 0: read from
// the x stage in shared memory at every step, in few enough registers (86-91, ptxas) for two CTAs
// per SM (kL1TwoMaxT).
template <LinearFormat F, int kXs>
__global__ void __launch_bounds__((kL1Warps + 1) * 32, kXs > 0 ? 1 : 2) moe_small_l1_kernel(const SmallParams p) {
    constexpr int kStepK = 4 * Traits<F>::kElems;   // columns per step (128)
    constexpr int kChunksPerStep = kStepK / 8;      // 16-byte x chunks per step
    extern __shared__ __align__(128) uint8_t smem[];
    __shared__ Routing rt;
    __shared__ Ring ring_bars;

    ring_init(ring_bars, p.stages, kL1Warps);
    // ids, weights and x come from the kernels before: wait, then let L2 be scheduled (see top).
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    route_slots(p, rt);   // its barriers also publish the ring's barriers

    const int RB = static_cast<int>(ceil_div(p.N, kRows));
    const int64_t pairs = static_cast<int64_t>(rt.n_entries) * RB;
    const int pa = static_cast<int>(pairs * blockIdx.x / gridDim.x);
    const int pb = static_cast<int>(pairs * (blockIdx.x + 1) / gridDim.x);
    const int items = 2 * (pb - pa);   // (pair, w1) then (pair, w3)
    uint8_t* ring = smem;
    uint8_t* xs = smem + static_cast<size_t>(p.stages) * p.stage_bytes;                  // [T][x_rs]
    float* red = reinterpret_cast<float*>(xs + static_cast<size_t>(p.T) * p.x_rs);        // [2][kL1Warps][2][16][C]
    const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;

    if (warp == kL1Warps) {   // ---- producer: one thread
        if (lane != 0) return;
        int gq = -1, q = pa / RB, rb = pa - q * RB;   // pair pa + i / 2 = (entry q, row block rb)
        GemmGroup G{};
        RingPos rp;
        for (int i = 0; i < items; ++i) {
            const int m = i & 1;
            if (m == 0 && i > 0 && ++rb == RB) {
                rb = 0;
                ++q;
            }
            if (q != gq) {
                G = p.table[rt.entry_exp[q]];
                gq = q;
            }
            produce(p, ring_bars, ring, rp, G.w[m], G.s[m], rb * kRows, kRows);
        }
        return;
    }

    // ---- consumers: stage all T tokens' x, chunk-swizzled as linear.cu (columns past K: zeros).
    {
        const int chunks = p.K / 8;   // K % 8 == 0 (DeviceExperts checks D % 8)
        const int per_row = p.steps * kChunksPerStep;
        for (int i = static_cast<int>(threadIdx.x); i < p.T * per_row; i += kL1Warps * 32) {
            const int t = i / per_row, c = i - t * per_row;
            const uint4 v = c < chunks ? __ldg(reinterpret_cast<const uint4*>(p.x + static_cast<int64_t>(t) * p.K) + c)
                                       : make_uint4(0, 0, 0, 0);
            *reinterpret_cast<uint4*>(xs + t * p.x_rs + x_chunk_pos<F>(c) * 16) = v;
        }
    }
    consumers_sync<kL1Warps>();

    const int g = lane >> 2, tig = lane & 3;
    const int s0 = warp * p.spw, ns = max(0, min(p.spw, p.steps - s0));
    const int C = p.C;
    const LaneOffs offs = lane_offs<F>(p);
    float acc[2][2][4];   // [w1 | w3][chain][fragment]
    int cur_q = -1, xoff = 0, m_cnt = 0, start = 0;
    GemmGroup G{};
    auto xfrag = [&](int j, int l) {   // from the x stage
        return *reinterpret_cast<const uint4*>(xs + xoff + x_chunk_pos<F>((s0 + j) * kChunksPerStep + tig * 4 + l) * 16);
    };
    uint4 xb[kXs > 0 ? kXs : 1][4];   // kXs > 0: the entry's fragments
    int q = pa / RB, rb = pa - q * RB;   // pair pa + i / 2 = (entry q, row block rb), advanced per pair
    RingPos rp;
    for (int i = 0; i < items; ++i) {
        const int m = i & 1;
        if (m == 0 && i > 0 && ++rb == RB) {
            rb = 0;
            ++q;
        }
        if (q != cur_q) {
            cur_q = q;
            m_cnt = rt.entry_cnt[q];
            start = rt.entry_start[q];
            G = p.table[rt.entry_exp[q]];
            // This lane's B token row: its slot's token, or for a lane past the entry's slots (g ≥
            // m_cnt) the last slot's: that MMA column's partials are never summed (the pair's
            // epilogue reads t < m_cnt), so any finite row serves and the reads need no zero fill.
            xoff = (rt.order[start + min(g, m_cnt - 1)] / p.k) * p.x_rs;
            if constexpr (kXs > 0) {
#pragma unroll
                for (int j = 0; j < kXs; ++j)
#pragma unroll
                    for (int l = 0; l < 4; ++l) xb[j][l] = j < ns ? xfrag(j, l) : make_uint4(0, 0, 0, 0);
            }
        }
        const int slot = rp.slot;
        mbar_wait(smem_addr(&ring_bars.full[slot]), rp.phase);
        rp.next(p.stages);
        const uint8_t* st = ring + static_cast<size_t>(slot) * p.stage_bytes;
        // m is warp-uniform but not a compile-time index: each branch names its matrix's accumulators
        // (a runtime index would put acc in local memory).
        auto run = [&](float (&a)[2][4], int bias) {
            zero(a);
            const uint8_t* sst = st + kRows * p.w_row_bytes;
            if constexpr (kXs > 0) consume<F, kXs>(offs, st, sst, s0, ns, bias, a, [&](int j, int l) { return xb[j][l]; });
            else consume<F, 0>(offs, st, sst, s0, ns, bias, a, xfrag);
        };
        if (m == 0) run(acc[0], G.bias[0]);
        else run(acc[1], G.bias[1]);
        __syncwarp();
        if (lane == 0) mbar_arrive(smem_addr(&ring_bars.empty[slot]));
        if (m == 0) continue;

        // Pair done: partials red[buf][warp][matrix][row][token], then the fixed-order sum over warps.
        float* rd = red + static_cast<size_t>((i >> 1) & 1) * kL1Warps * 2 * kRows * C;
#pragma unroll
        for (int mm = 0; mm < 2; ++mm)
#pragma unroll
            for (int v = 0; v < 4; ++v) {
                const int t = 2 * tig + (v & 1), rl = g + (v >= 2 ? 8 : 0);
                if (t < C) rd[((warp * 2 + mm) * kRows + rl) * C + t] = acc[mm][0][v] + acc[mm][1][v];
            }
        consumers_sync<kL1Warps>();   // (double-buffered: buffer b is rewritten two pairs later, after the next sync)
        for (int o = static_cast<int>(threadIdx.x); o < kRows * m_cnt; o += kL1Warps * 32) {
            const int rl = o % kRows, t = o / kRows;
            const int row = rb * kRows + rl;
            if (row >= p.N) continue;
            float gs = 0.0f, us = 0.0f;
            for (int w = 0; w < kL1Warps; ++w) {
                gs += rd[((w * 2 + 0) * kRows + rl) * C + t];
                us += rd[((w * 2 + 1) * kRows + rl) * C + t];
            }
            gs *= G.out_scale[0];
            us *= G.out_scale[1];
            if (p.official) {   // the official w1 / w3 outputs are bf16 (ops::expert_ffn with linear_rounded)
                gs = nm::bf16_round(gs);
                us = nm::bf16_round(us);
            }
            const int sl = rt.order[start + t];
            const float hv = silu_swiglu(gs, us, p.limit) * p.wts[sl];
            p.h[static_cast<int64_t>(sl) * p.N + row] = __bfloat16_as_ushort(__float2bfloat16_rn(hv));
        }
    }
}

// ---------------------------------------------------------------------------- L2

// W consumer warps (kL2Warps or kL2ProWarps) of kSpw steps at most each.
// kOff: Numerics::official (SmallParams::official), a template parameter so that the exact
// instances hold none of the official rounding code (compiled in, it slowed the exact path by
// 1.4-3% on an H100, docs/bench-gemm.md "h rounded once per warp"). Measured in this form against
// the previous L2 (H100, one device call, megamoe-gemm-bench --part experts --model all --T 1,2
// --moe-small, two rounds): official V4-Flash even to −1.6%, V4-Pro −2.8% to −4.9%; exact V4-Flash
// −0.6% to −1.4%, V4-Pro −3.1% to −7.5%; the 8-layer batch-1 / 2 step even.
template <LinearFormat F, int kSpw, int W, bool kOff>
__global__ void __launch_bounds__((W + 1) * 32, 1) moe_small_l2_kernel(const SmallParams p) {
    constexpr int kStepK = 4 * Traits<F>::kElems;
    extern __shared__ __align__(128) uint8_t smem[];
    __shared__ Routing rt;
    __shared__ Ring ring_bars;

    ring_init(ring_bars, p.stages, W);
    // ids were written before L1 ran, and this grid starts only after every L1 CTA passed its own
    // griddepcontrol.wait (see top): they are complete. h is read only after the wait below.
    route_slots(p, rt);
    const int Q = rt.n_entries;
    const int RB = static_cast<int>(ceil_div(p.N, kRows));
    const int ra = static_cast<int>(static_cast<int64_t>(RB) * blockIdx.x / gridDim.x);
    const int nrb = static_cast<int>(static_cast<int64_t>(RB) * (blockIdx.x + 1) / gridDim.x) - ra;
    const int nch = static_cast<int>(ceil_div(nrb, p.rb_chunk));   // stages per entry
    const int items = Q * nch;   // entry-major: (q, c) = (i / nch, i % nch); chunk c: row blocks c·rb_chunk ..
    const int n = p.T * p.k;
    uint8_t* ring = smem;
    float* fin = reinterpret_cast<float*>(smem + static_cast<size_t>(p.stages) * p.stage_bytes);   // [W][n][rb_max][16]
    const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;

    if (warp == W) {   // ---- producer: one thread (w2 does not depend on L1: no wait)
        if (lane != 0) return;
        int gq = -1, q = 0, c = 0;   // item i = (entry q, chunk c), entry-major
        GemmGroup G{};
        RingPos rp;
        for (int i = 0; i < items; ++i) {
            if (q != gq) {
                G = p.table[rt.entry_exp[q]];
                gq = q;
            }
            const int j0 = c * p.rb_chunk;
            produce(p, ring_bars, ring, rp, G.w[0], G.s[0], (ra + j0) * kRows, min(p.rb_chunk, nrb - j0) * kRows);
            if (++c == nch) {
                c = 0;
                ++q;
            }
        }
        return;
    }

    asm volatile("griddepcontrol.wait;" ::: "memory");   // L1's h
    // The next kernel (the fused hc_mix) may be scheduled now; it waits for this grid the same way.
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    const int g = lane >> 2, tig = lane & 3;
    const int s0 = warp * p.spw, ns = max(0, min(p.spw, p.steps - s0));
    const LaneOffs offs = lane_offs<F>(p);
    // Byte offsets within a stage (32 bits: a stage is < 227 KB): a 16-row block's weight rows,
    // the scale rows' start, a 16-row block's scale rows.
    const int blk_w = kRows * static_cast<int>(p.w_row_bytes);
    const int sc_at = p.stage_rows * static_cast<int>(p.w_row_bytes);
    const int blk_s = kRows * static_cast<int>(p.s_row_bytes);
    // The warp's K-range lies wholly inside K (V4-Flash, V4-Pro: every warp with steps): its h
    // loads need no per-chunk predicate.
    const bool whole = ns == kSpw && (s0 + kSpw) * kStepK <= p.K;
    // This lane's h fragments for entry q: slot g's columns (s0 + j)·128 + (4·tig + l)·8 .. + 8.
    // Loaded one entry ahead (two register sets), so the loads' latency hides behind an entry's MMAs.
    // A lane whose token column g has no slot in the entry (g ≥ its count) reads the entry's last
    // slot instead: that MMA column is never stored (fo < 0 below), so any finite row serves, and
    // the loads need neither a zero fill nor a predicate (exact: the stored columns see only
    // their own lanes' fragments).
    // Under official numerics an entry of one slot (every entry at T = 1, most at T = 2) loads its
    // h compactly: the 8 token columns of the MMA would all hold that slot's row, so lane (g, tig)
    // loads only its words 2g, 2g + 1 of the 16 the fragment set of tig needs (columns (4·tig +
    // g/2)·8 + 4·(g & 1) .. + 4, one 8-byte load per step, into hb[j][0].x, .y) and round_h1 rounds
    // those and gathers the rest from the lanes holding them.
    auto compact = [&](int q) { return kOff && rt.entry_cnt[q] == 1; };
    auto load_h = [&](int q, uint4 (&hb)[kSpw][4]) {
        if (q >= Q) return;   // uniform: no entry after the last
        const uint16_t* hrow =
            p.h + static_cast<int64_t>(rt.order[rt.entry_start[q] + min(g, rt.entry_cnt[q] - 1)]) * p.K;
        if (compact(q)) {   // uniform
#pragma unroll
            for (int j = 0; j < kSpw; ++j) {
                const int col = (s0 + j) * kStepK + (4 * tig + (g >> 1)) * 8 + 4 * (g & 1);
                const uint2 v = j < ns && col < p.K ? *reinterpret_cast<const uint2*>(hrow + col) : make_uint2(0, 0);
                hb[j][0].x = v.x;
                hb[j][0].y = v.y;
            }
            return;
        }
        if (whole) {
#pragma unroll
            for (int j = 0; j < kSpw; ++j)
#pragma unroll
                for (int l = 0; l < 4; ++l)
                    hb[j][l] = *reinterpret_cast<const uint4*>(hrow + (s0 + j) * kStepK + (4 * tig + l) * 8);
            return;
        }
#pragma unroll
        for (int j = 0; j < kSpw; ++j)
#pragma unroll
            for (int l = 0; l < 4; ++l) {
                const int col = (s0 + j) * kStepK + (4 * tig + l) * 8;
                hb[j][l] = j < ns && col < p.K   // K % 8 == 0: a chunk is wholly in or out
                               ? *reinterpret_cast<const uint4*>(hrow + col)
                               : make_uint4(0, 0, 0, 0);
            }
    };
    // w2's input is FP8-rounded in 128-column blocks under official numerics (ops::expert_ffn's
    // linear_rounded): a step's 128 columns are one block, held by the 4 lanes of token row g.
    auto round_h = [&](uint4 (&hb)[kSpw][4]) {
#pragma unroll
        for (int j = 0; j < kSpw; ++j) {
            if (j >= ns) continue;   // warp-uniform
            uint32_t m2 = 0;   // |bf16| pairs, max per half (integer max of magnitudes = value max)
#pragma unroll
            for (int l = 0; l < 4; ++l) {
                const uint32_t* u = reinterpret_cast<const uint32_t*>(&hb[j][l]);
#pragma unroll
                for (int e = 0; e < 4; ++e) m2 = __vmaxu2(m2, u[e] & 0x7FFF7FFFu);
            }
            float amax = fmaxf(__uint_as_float(m2 << 16), __uint_as_float(m2 & 0xFFFF0000u));
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
            const float sc = nm::fp8_scale(amax), inv = 1.0f / sc;   // powers of two: inv is exact
#pragma unroll
            for (int l = 0; l < 4; ++l) {
                uint32_t* u = reinterpret_cast<uint32_t*>(&hb[j][l]);
#pragma unroll
                for (int e = 0; e < 4; ++e) u[e] = nm::fp8_qdq_bf16x2(u[e], sc, inv);
            }
        }
    };
    // round_h for a compactly loaded entry (above): the same block maxima (over the step's 128
    // columns, here all 32 lanes' 4 values) and the same fp8_qdq_bf16x2 per pair, so the same bits,
    // with each value rounded once per warp instead of once per token column (8 times): ~50
    // instructions per step against ~180. Then word w (= 4·l + e) of hb[j][l] comes from lane
    // 4·(w / 2) + tig, which holds it as its word w & 1.
    auto round_h1 = [&](uint4 (&hb)[kSpw][4]) {
#pragma unroll
        for (int j = 0; j < kSpw; ++j) {
            if (j >= ns) continue;   // warp-uniform
            uint32_t c[2] = {hb[j][0].x, hb[j][0].y};
            const uint32_t m2 = __vmaxu2(c[0] & 0x7FFF7FFFu, c[1] & 0x7FFF7FFFu);
            float amax = fmaxf(__uint_as_float(m2 << 16), __uint_as_float(m2 & 0xFFFF0000u));
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
            const float sc = nm::fp8_scale(amax), inv = 1.0f / sc;
            c[0] = nm::fp8_qdq_bf16x2(c[0], sc, inv);
            c[1] = nm::fp8_qdq_bf16x2(c[1], sc, inv);
#pragma unroll
            for (int l = 0; l < 4; ++l) {
                uint32_t* u = reinterpret_cast<uint32_t*>(&hb[j][l]);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int w = 4 * l + e;
                    u[e] = __shfl_sync(0xffffffffu, c[w & 1], 4 * (w >> 1) + tig);
                }
            }
        }
    };
    RingPos rp;   // the stages in the producer's order: entry-major, chunk c within
    auto entry = [&](int q, uint4 (&hb)[kSpw][4], uint4 (&next)[kSpw][4]) {
        const int m_cnt = rt.entry_cnt[q], start = rt.entry_start[q];
        const GemmGroup G = p.table[rt.entry_exp[q]];
        // This lane's partial rows in fin for its token columns t = 2·tig + e (−1: past the entry's
        // slots), once per entry rather than per store.
        int fo[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int t = 2 * tig + e;
            fo[e] = t < m_cnt ? (warp * n + rt.order[start + t]) * p.rb_max * kRows : -1;
        }
        if (compact(q)) round_h1(hb);
        else if constexpr (kOff) round_h(hb);
        load_h(q + 1, next);
        for (int c = 0; c < nch; ++c) {
            const int slot = rp.slot;
            mbar_wait(smem_addr(&ring_bars.full[slot]), rp.phase);
            rp.next(p.stages);
            const uint8_t* st = ring + static_cast<size_t>(slot) * p.stage_bytes;
            const int nj = min(p.rb_chunk, nrb - c * p.rb_chunk);
            float acc[kL2MaxChunk][2][4];
#pragma unroll
            for (int jj = 0; jj < kL2MaxChunk; ++jj) {
                zero(acc[jj]);
                if (jj < nj)
                    consume<F, kSpw>(offs, st + jj * blk_w, st + sc_at + jj * blk_s, s0, ns, G.bias[0], acc[jj],
                                     [&](int j2, int l) { return hb[j2][l]; });
            }
            __syncwarp();
            if (lane == 0) mbar_arrive(smem_addr(&ring_bars.empty[slot]));
#pragma unroll
            for (int jj = 0; jj < kL2MaxChunk; ++jj) {
                if (jj >= nj) continue;
                const int j = c * p.rb_chunk + jj;
#pragma unroll
                for (int v = 0; v < 4; ++v) {
                    if (fo[v & 1] >= 0) {
                        const int rl = g + (v >= 2 ? 8 : 0);
                        fin[fo[v & 1] + j * kRows + rl] = (acc[jj][0][v] + acc[jj][1][v]) * G.out_scale[0];
                    }
                }
            }
        }
    };
    uint4 ha[kSpw][4], hb[kSpw][4];
    load_h(0, ha);
    for (int q = 0; q < Q; q += 2) {
        entry(q, ha, hb);
        if (q + 1 < Q) entry(q + 1, hb, ha);
    }
    consumers_sync<W>();

    // y[t, row] = shared[t, row] + Σ_s (Σ_w fin[w][t·k + s][row]), sums in fixed order from 0, over
    // the slots with an expert. official: each slot's row and shared rounded to bf16 first, and y
    // after (moe_combine's rule). Placed outputs (expert parallelism) stop before shared: each
    // slot's row (0 for a slot without expert), or the slots' sum, unrounded: what the exchange's
    // place kernel makes of the general path's rows (dist/nccl/exchange.cu).
    for (int o = static_cast<int>(threadIdx.x); o < p.T * nrb * kRows; o += W * 32) {
        const int rl = o % kRows, j = (o / kRows) % nrb, t = o / (kRows * nrb);
        const int row = (ra + j) * kRows + rl;
        if (row >= p.N) continue;
        float sum = 0.0f;
        for (int s = 0; s < p.k; ++s) {
            const int sl = t * p.k + s;
            const bool here = has_expert(p, sl);
            float v = 0.0f;
            if (here)
                for (int w = 0; w < W; ++w) v = __fadd_rn(v, fin[((w * n + sl) * p.rb_max + j) * kRows + rl]);
            if constexpr (kOff) v = nm::bf16_round(v);
            if (p.placed == kPlaceSlotRows) p.y[static_cast<int64_t>(sl) * p.N + row] = v;
            else if (here) sum = __fadd_rn(sum, v);
        }
        const int64_t o2 = static_cast<int64_t>(t) * p.N + row;
        if (p.placed == kPlaceRowSums) p.y[o2] = sum;
        if (p.placed != kPlaceY) continue;
        if (p.shared) sum = __fadd_rn(kOff ? nm::bf16_round(p.shared[o2]) : p.shared[o2], sum);
        p.y[o2] = kOff ? nm::bf16_round(sum) : sum;
    }
}

// ---------------------------------------------------------------------------- host

// Static shared memory of either kernel: Routing and Ring (ptxas reports these 2 KB).
constexpr int64_t kStaticSmem = round_up(static_cast<int64_t>(sizeof(Routing)), 128) +
                                round_up(static_cast<int64_t>(sizeof(Ring)), 128);
// Dynamic shared memory of one CTA: kSmemBudget, or less where the device allows less per CTA.
int64_t cta_budget(const SmFacts& f) { return std::min<int64_t>(kSmemBudget, f.smem_per_block_optin - kStaticSmem); }
// ... of each of two CTAs sharing an SM: half the SM less the driver's per-CTA reserve and the
// static shared memory (sm_90: 114 − 1 − 2 = 111 KB; V4-Flash MXFP4 at T = 4 takes 110,720 bytes).
int64_t two_cta_budget(const SmFacts& f) {
    return std::min(cta_budget(f), f.smem_per_sm / 2 - f.smem_reserved_per_block - kStaticSmem);
}

// One stage: the 16 weight rows, then the 16 scale rows (16-byte aligned), 128-byte aligned.
int64_t stage_bytes(const DeviceLinear& w) {
    return round_up(kRows * w.weight_row_bytes + round_up(kRows * w.scale_row_bytes, 16), 128);
}

// The launch shape of both halves, from the experts' geometry, T and the device's SM facts alone,
// so that moe_small_fits and the launches agree.
struct Plan {
    SmallParams l1{}, l2{};
    size_t smem1 = 0, smem2 = 0;
    int grid1 = 0, grid2 = 0;
    bool l1_two = false;   // L1 at two CTAs per SM (kL1TwoMaxT)
    int warps2 = kL2Warps; // L2's consumer warps (l2_warps)
    bool ok = false;
};

Plan make_plan(const DeviceExperts& ex, int64_t T, int64_t k, const SmFacts& f) {
    Plan pl;
    const int64_t sms = f.sms, budget = cta_budget(f);
    constexpr int kStepK = 128;   // fp4 columns per 64-byte step
    const int C = static_cast<int>(std::min<int64_t>(8, T));
    const int64_t n = T * k;
    auto common = [&](SmallParams& p, const DeviceLinear& w, int64_t N, int64_t K, int warps) {
        p.T = static_cast<int>(T);
        p.k = static_cast<int>(k);
        p.E = static_cast<int>(ex.E);
        p.C = C;
        p.N = static_cast<int>(N);
        p.K = static_cast<int>(K);
        p.steps = static_cast<int>(w.weight_row_bytes / kStepBytes);
        p.w_row_bytes = w.weight_row_bytes;
        p.s_row_bytes = w.scale_row_bytes;
        p.spw = static_cast<int>(ceil_div(p.steps, warps));
        p.stage_rows = kRows;
        p.stage_bytes = static_cast<int>(stage_bytes(w));
    };
    // L1: the ring, x of all T tokens, the double-buffered partials [2][kL1Warps][2][16][C].
    SmallParams& a = pl.l1;
    common(a, ex.w1[0], ex.I, ex.D, kL1Warps);
    a.x_rs = static_cast<int>(round_up(static_cast<int64_t>(a.steps) * kStepK * 2, 128) + Traits<LinearFormat::nvfp4>::kRowMod);
    const int64_t fixed1 = T * a.x_rs + 2 * kL1Warps * 2 * kRows * C * 4;
    pl.l1_two = ex.format == LinearFormat::mxfp4 && T <= kL1TwoMaxT && fixed1 + 2 * a.stage_bytes <= two_cta_budget(f);
    a.stages = pl.l1_two ? 2 : static_cast<int>(std::min<int64_t>(kL1StagesWanted, (budget - fixed1) / a.stage_bytes));
    pl.smem1 = static_cast<size_t>(a.stages * a.stage_bytes + fixed1);
    pl.grid1 = static_cast<int>(std::min<int64_t>((pl.l1_two ? 2 : 1) * sms, n * ceil_div(ex.I, kRows)));
    // L2: the ring and the per-warp partials [warps2][n][rb_max][16].
    SmallParams& b = pl.l2;
    pl.warps2 = l2_warps(static_cast<int>(ex.w2[0].weight_row_bytes / kStepBytes));
    common(b, ex.w2[0], ex.D, ex.I, pl.warps2);
    const int64_t RB2 = ceil_div(ex.D, kRows);
    pl.grid2 = static_cast<int>(std::min<int64_t>(sms, RB2));
    b.rb_max = static_cast<int>(ceil_div(RB2, pl.grid2));
    b.rb_chunk = static_cast<int>(std::min<int64_t>(kL2MaxChunk, b.rb_max));
    b.stage_rows = b.rb_chunk * kRows;
    b.stage_bytes = static_cast<int>(round_up(b.stage_rows * ex.w2[0].weight_row_bytes +
                                              round_up(b.stage_rows * ex.w2[0].scale_row_bytes, 16), 128));
    const int64_t fixed2 = static_cast<int64_t>(pl.warps2) * n * b.rb_max * kRows * 4;
    b.stages = static_cast<int>(std::min<int64_t>(kL2StagesWanted, (budget - fixed2) / b.stage_bytes));
    pl.smem2 = static_cast<size_t>(b.stages * b.stage_bytes + fixed2);
    const bool l2_instance = pl.warps2 == kL2ProWarps ? b.spw <= kL2ProSpw : b.spw <= kL2MaxSpw;
    pl.ok = a.stages >= kMinStages && b.stages >= kMinStages && l2_instance;
    return pl;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Checks shared by the two halves; false for T = 0 (nothing to launch).
bool check_small(const char* what, const DeviceExperts& ex, int64_t T, const uint16_t* x, const MoeLayerWorkspace& ws) {
    MEGAMOE_CHECK(ex.E > 0 && static_cast<int64_t>(ex.w1.size()) == ex.E, what, ": experts not uploaded");
    MEGAMOE_CHECK(!ws.h.empty(), what, ": the workspace holds no buffers");
    // A skip-bucket workspace (expert parallelism) serves too: the small path uses its h only, and
    // reads the skip id E as "no expert" itself.
    const int64_t E_ws = ws.dispatch.E - (ws.skip_bucket ? 1 : 0);
    MEGAMOE_CHECK(ex.E == E_ws && ex.D == ws.dispatch.D, what, ": workspace is for E = ", E_ws,
                  ws.skip_bucket ? " (+ the skip bucket)" : "", ", D = ", ws.dispatch.D, ", experts have E = ", ex.E,
                  ", D = ", ex.D);
    MEGAMOE_CHECK(T >= 0 && T <= ws.dispatch.T_max, what, ": T = ", T, " exceeds the workspace's T_max = ",
                  ws.dispatch.T_max);
    if (T == 0) return false;
    const int64_t k = ws.dispatch.k;
    MEGAMOE_CHECK(moe_small_fits(ex, T, k, x), what, ": T = ", T, ", k = ", k,
                  " (or x's alignment, the format or the widths) is outside the small path (T <= ", kMoeSmallMaxT,
                  ", T*k <= ", kMoeSmallMaxSlots, ", 16-byte aligned x and weights, NVFP4 or MXFP4, stages in ",
                  cta_budget(sm_facts()), " bytes of shared memory)");
    return true;
}

}  // namespace

bool moe_small_fits(const DeviceExperts& ex, int64_t T, int64_t k, const uint16_t* x_bf16) {
    if (T < 1 || T > kMoeSmallMaxT || T * k > kMoeSmallMaxSlots) return false;
    if (ex.format != LinearFormat::nvfp4 && ex.format != LinearFormat::mxfp4) return false;
    if (!aligned16(x_bf16)) return false;   // the x stage copies 16 bytes
    for (const auto* ws : {&ex.w1, &ex.w3, &ex.w2})
        for (const DeviceLinear& w : *ws)
            if (!aligned16(w.weight) || !aligned16(w.scale)) return false;   // bulk copies: 16-byte sources
    return make_plan(ex, T, k, sm_facts()).ok;
}

MoeSmallPlan moe_small_plan(const DeviceExperts& ex, int64_t T, int64_t k, const SmFacts& f) {
    MEGAMOE_CHECK(T >= 1 && T <= kMoeSmallMaxT && T * k <= kMoeSmallMaxSlots && ex.E > 0, "moe_small_plan: T = ", T,
                  ", k = ", k, ", E = ", ex.E, " is outside the small path");
    const Plan pl = make_plan(ex, T, k, f);
    MoeSmallPlan r;
    r.ok = pl.ok;
    r.l1_two = pl.l1_two;
    r.grid1 = pl.grid1;
    r.grid2 = pl.grid2;
    r.stages1 = pl.l1.stages;
    r.stages2 = pl.l2.stages;
    r.warps2 = pl.warps2;
    r.spw2 = pl.l2.spw;
    r.smem1 = static_cast<int64_t>(pl.smem1);
    r.smem2 = static_cast<int64_t>(pl.smem2);
    r.static_smem = kStaticSmem;
    return r;
}

void moe_small_l1(const DeviceExperts& ex, float limit, const uint16_t* x, const int32_t* ids, const float* weights,
                  int64_t T, MoeLayerWorkspace& ws, CUstream_st* stream, Numerics nm) {
    if (!check_small("moe_small_l1", ex, T, x, ws)) return;
    const SmFacts f = sm_facts();
    Plan pl = make_plan(ex, T, ws.dispatch.k, f);
    SmallParams& p = pl.l1;
    p.table = static_cast<const GemmGroup*>(ex.l1_table);
    p.ids = ids;
    p.wts = weights;
    p.x = x;
    p.h = ws.h.data();
    p.limit = limit;
    p.official = nm == Numerics::official;
    // x fragments in registers: V4-Flash at one CTA per SM (4 steps per warp); V4-Pro has 7 and two
    // CTAs per SM need the registers (kL1TwoMaxT): from shared memory.
    const bool xr = !pl.l1_two && p.spw <= kL1XRegSteps;
    auto kernel = ex.format == LinearFormat::nvfp4
                      ? (xr ? moe_small_l1_kernel<LinearFormat::nvfp4, kL1XRegSteps> : moe_small_l1_kernel<LinearFormat::nvfp4, 0>)
                      : (xr ? moe_small_l1_kernel<LinearFormat::mxfp4, kL1XRegSteps> : moe_small_l1_kernel<LinearFormat::mxfp4, 0>);
    raise_dynamic_smem(reinterpret_cast<const void*>(kernel), static_cast<size_t>(cta_budget(f)));
    CUDA_CHECK(launch_pdl(kernel, dim3(static_cast<unsigned>(pl.grid1)), dim3((kL1Warps + 1) * 32), pl.smem1, stream, p));
}

namespace {
void launch_l2(const char* what, const DeviceExperts& ex, const uint16_t* x, const int32_t* ids, int64_t T,
               const float* shared, float* y, int placed, MoeLayerWorkspace& ws, CUstream_st* stream, Numerics nm) {
    if (!check_small(what, ex, T, x, ws)) return;
    const SmFacts f = sm_facts();
    Plan pl = make_plan(ex, T, ws.dispatch.k, f);
    SmallParams& p = pl.l2;
    p.table = static_cast<const GemmGroup*>(ex.l2_table);
    p.ids = ids;
    p.h = ws.h.data();
    p.shared = shared;
    p.y = y;
    p.placed = placed;
    p.official = nm == Numerics::official;
    // The h fragments' register sets are sized by the steps per warp (V4-Flash 1 at 16 warps,
    // V4-Pro 3 at 8); the plan is ok only for these instances (check_small).
    using K2 = void (*)(SmallParams);
    auto pick_nm = [&](auto fmt, auto off) -> K2 {
        constexpr LinearFormat F = decltype(fmt)::value;
        constexpr bool kOff = decltype(off)::value;
        if (pl.warps2 == kL2ProWarps) return moe_small_l2_kernel<F, kL2ProSpw, kL2ProWarps, kOff>;
        return p.spw <= 1 ? moe_small_l2_kernel<F, 1, kL2Warps, kOff> : moe_small_l2_kernel<F, kL2MaxSpw, kL2Warps, kOff>;
    };
    auto pick = [&](auto fmt) -> K2 {
        return p.official ? pick_nm(fmt, std::true_type{}) : pick_nm(fmt, std::false_type{});
    };
    const K2 kernel = ex.format == LinearFormat::nvfp4 ? pick(std::integral_constant<LinearFormat, LinearFormat::nvfp4>{})
                                                       : pick(std::integral_constant<LinearFormat, LinearFormat::mxfp4>{});
    raise_dynamic_smem(reinterpret_cast<const void*>(kernel), static_cast<size_t>(cta_budget(f)));
    CUDA_CHECK(launch_pdl(kernel, dim3(static_cast<unsigned>(pl.grid2)), dim3((pl.warps2 + 1) * 32), pl.smem2, stream, p));
}
}  // namespace

void moe_small_l2(const DeviceExperts& ex, const uint16_t* x, const int32_t* ids, int64_t T, const float* shared,
                  float* y, MoeLayerWorkspace& ws, CUstream_st* stream, Numerics nm) {
    launch_l2("moe_small_l2", ex, x, ids, T, shared, y, kPlaceY, ws, stream, nm);
}

void moe_small_l2_placed(const DeviceExperts& ex, const uint16_t* x, const int32_t* ids, int64_t T, bool slot_rows,
                         float* out, MoeLayerWorkspace& ws, CUstream_st* stream, Numerics nm) {
    launch_l2("moe_small_l2_placed", ex, x, ids, T, nullptr, out, slot_rows ? kPlaceSlotRows : kPlaceRowSums, ws,
              stream, nm);
}

void moe_layer_small(const DeviceExperts& ex, float limit, const uint16_t* x, const int32_t* ids, const float* weights,
                     int64_t T, const float* shared, float* y, MoeLayerWorkspace& ws, CUstream_st* stream,
                     Numerics nm) {
    if (!check_small("moe_layer_small", ex, T, x, ws)) return;
    moe_small_l1(ex, limit, x, ids, weights, T, ws, stream, nm);
    moe_small_l2(ex, x, ids, T, shared, y, ws, stream, nm);
}

}  // namespace megamoe::cuda
