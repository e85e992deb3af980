// moe_dispatch.h — data movement of the GPU routed-expert layer: route (stable counting sort of the
// routed slots by expert), gather (token rows into expert-contiguous order) and combine (expert
// outputs back per token, in slot order). Host API; plain C++, compiles without the CUDA toolkit.
//
// Shapes (N = T·k routed rows; row i = t·k + s is slot s of token t):
//   ids     [T, k] int32 in [0, E)        the routed experts (device)
//   weights [T, k] f32                    routing weights (device)
//   counts  [E] int32                     rows per expert
//   offsets [E + 1] int32                 exclusive prefix sum of counts; offsets[E] = N
//   perm    [N] int32                     perm[j] = t·k + s of the j-th row in expert order
//   inv     [N] int32                     inv[t·k + s] = j, i.e. perm[inv[i]] = i
//   xs      [N, D] bf16                   xs[j] = x[perm[j] / k]        (rows offsets[e]..offsets[e+1])
//   ws      [N] f32                       ws[j] = weights[perm[j]]      belong to expert e
//   rows    [N, D] f32                    expert outputs in the permuted order (already scaled by
//                                         the routing weight before w2, as ops::expert_ffn does)
//   y       [T, D] f32 (or bf16)          y[t] = Σ_{s<k} rows[inv[t·k+s]] (+ shared[t], added last)
//
// This is the order ops::moe uses on the CPU: within an expert, rows are in ascending
// (token, slot) order (ops::moe pushes i = t·k + s in increasing i), and the combine adds the k
// slots of a token in slot order into an fp32 accumulator that starts at 0, then adds that sum to
// the shared-expert output. With the same f32 rows, the GPU combine gives the same bits.
//
// Everything is asynchronous on `stream`, uses no host synchronization and allocates nothing (use
// MoeDispatchWorkspace), so for a fixed T the three calls can be captured into a CUDA graph and
// replayed with new contents of ids / weights / x / rows. Deterministic: no result depends on the
// order in which atomics happen (see moe_dispatch.cu).
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/buffer.h"

struct CUstream_st;   // cudaStream_t is CUstream_st*; declared here so the header needs no CUDA include

namespace megamoe::cuda {

// Largest expert count the route kernels handle (one scan thread per expert, per-chunk shared
// histograms). DeepSeek-V4 uses 256 / 384.
constexpr int64_t kMoeMaxExperts = 1024;

// Routed rows sorted per block of the route kernels; the scratch holds one E-wide table per chunk.
constexpr int64_t kMoeRouteChunk = 1024;

// int32 elements of device scratch that moe_route_counts needs for T·k = N rows and E experts:
// a [ceil(N / kMoeRouteChunk), E] table of per-chunk counts / bases and a [N] rank per row.
int64_t moe_route_scratch_ints(int64_t N, int64_t E);

// Route: counts, offsets, perm and inv from ids [T, k] (device). All outputs are fully written
// (for T = 0: counts = offsets = 0). ids must lie in [0, E); out-of-range ids are clamped into it
// (no memory outside the buffers is touched, but the routing is then meaningless). Requires
// 1 ≤ E ≤ kMoeMaxExperts, k ≥ 1, T·k < 2^31. scratch: moe_route_scratch_ints(T·k, E) int32s.
// Three kernels: per-chunk histogram + stable rank, per-expert scan, scatter.
void moe_route_counts(const int32_t* ids, int64_t T, int64_t k, int64_t E, int32_t* counts, int32_t* offsets,
                      int32_t* perm, int32_t* inv, int32_t* scratch, CUstream_st* stream);

// Route + gather (+ the grouped GEMM's work list) in one launch, for small batches where the three
// route kernels and the gather are each a launch of a few microseconds around a few KB of work:
// the same counts, offsets, perm, inv, xs and ws as moe_route_counts then moe_gather, bit for bit
// (one CTA; a row's rank among the rows of its expert is the number of lower rows with that
// expert). When items is not null it also writes the work list of the grouped expert GEMM for
// tiles of BT rows: expert e with c rows gets ceil(c / BT) int32 quads {e, offsets[e] + j·BT,
// min(BT, c - j·BT), 0}, in expert order, and *n_items = their number. Requires 1 ≤ T·k ≤
// kMoeDispatchSmallMaxRows, 1 ≤ E ≤ kMoeMaxExperts, BT ≥ 1; weights / ws may both be null.
// item_experts (1 ≤ item_experts ≤ E; E when omitted): only experts below it get work items. The
// buckets above are routed and gathered like the others but never computed: an expert-parallel
// rank routes its slots over its local experts plus one "skip" bucket for the slots other ranks
// compute (docs/multi-gpu.md §6 step 4).
constexpr int64_t kMoeDispatchSmallMaxRows = 64;
void moe_dispatch_small(const int32_t* ids, const uint16_t* x_bf16, const float* weights, int64_t T, int64_t k,
                        int64_t E, int64_t D, int32_t* counts, int32_t* offsets, int32_t* perm, int32_t* inv,
                        uint16_t* xs_bf16, float* ws, int32_t BT, int32_t* items, int32_t* n_items,
                        CUstream_st* stream, int64_t item_experts = 0);

// Gather: xs[j, :] = x[perm[j] / k, :] (bf16 bits, copied unchanged) and, when weights and ws are
// both non-null, ws[j] = weights[perm[j]]. x: [T, D] row-major bf16 (16-byte aligned with
// D % 8 == 0 is the vectorized path; anything else works). One kernel.
void moe_gather(const uint16_t* x_bf16, const float* weights, const int32_t* perm, int64_t T, int64_t k, int64_t D,
                uint16_t* xs_bf16, float* ws, CUstream_st* stream);

// Combine: y[t, :] = Σ_{s=0..k-1} rows[inv[t·k+s], :] in that order with fp32 adds (no FMA
// contraction), then y[t] = shared[t] + sum when shared != nullptr. y is overwritten, not
// accumulated into. rows / shared / y: row-major with row length D (y may not alias rows).
// The bf16 variant rounds the same f32 result to nearest-even (NaN stays NaN).
// official: each row and shared rounded to bf16 before the sum, y rounded to bf16 (ops::moe official).
void moe_combine(const float* rows, const int32_t* inv, const float* shared, int64_t T, int64_t k, int64_t D,
                 float* y, CUstream_st* stream, bool official = false);
void moe_combine_bf16(const float* rows, const int32_t* inv, const float* shared, int64_t T, int64_t k, int64_t D,
                      uint16_t* y_bf16, CUstream_st* stream);

// Device buffers for up to T_max tokens of a (k, E, D) layer, allocated once so that the calls
// below allocate nothing (and can be captured into a CUDA graph). Every buffer is a DeviceArray
// sized for T_max (at least one element, so that even T_max = 0 gives non-null pointers).
// Move-only; a moved-from workspace holds no buffers (its calls throw).
class MoeDispatchWorkspace {
public:
    MoeDispatchWorkspace() = default;
    MoeDispatchWorkspace(int64_t T_max, int64_t k, int64_t E, int64_t D);   // throws megamoe::Error

    int64_t T_max = 0, k = 0, E = 0, D = 0;
    DeviceArray<int32_t>  counts;    // [E]
    DeviceArray<int32_t>  offsets;   // [E + 1]
    DeviceArray<int32_t>  perm;      // [T_max·k]
    DeviceArray<int32_t>  inv;       // [T_max·k]
    DeviceArray<uint16_t> xs;        // [T_max·k, D] bf16
    DeviceArray<float>    ws;        // [T_max·k]
    DeviceArray<int32_t>  scratch;   // [moe_route_scratch_ints(T_max·k, E)]
    size_t bytes() const;            // device bytes held

    // The three steps on this workspace's buffers (T ≤ T_max; throws otherwise).
    void route(const int32_t* ids, int64_t T, CUstream_st* stream);
    void gather(const uint16_t* x_bf16, const float* weights, int64_t T, CUstream_st* stream);
    // route + gather in one launch (moe_dispatch_small; T·k ≤ kMoeDispatchSmallMaxRows), with the
    // work list for tiles of BT rows of experts [0, item_experts) when items is not null
    // (item_experts 0: all E).
    void route_gather_small(const int32_t* ids, const uint16_t* x_bf16, const float* weights, int64_t T, int32_t BT,
                            int32_t* items, int32_t* n_items, CUstream_st* stream, int64_t item_experts = 0);
    void combine(const float* rows, const float* shared, int64_t T, float* y, CUstream_st* stream,
                 bool official = false) const;
};

}  // namespace megamoe::cuda
