// moe_dispatch.cu — route / gather / combine for the GPU routed-expert layer (see moe_dispatch.h
// for shapes and the contract). Hopper (sm_90a), but nothing here is architecture-specific.
//
// Launch strategy
// ---------------
// Route (N = T·k rows, E ≤ 1024 experts) is a stable counting sort in three kernels, so that the
// position of every row is a pure function of ids, never of the order in which atomics land:
//   1. moe_route_rank_kernel: one CTA (256 threads) per chunk of kMoeRouteChunk consecutive rows.
//      It walks its chunk 256 rows at a time. In a warp, __match_any_sync groups the lanes with
//      the same expert; a lane's rank inside the warp is the number of its peers on lower lanes.
//      Each group's lowest lane publishes the group size in a per-warp shared table, and a lane's
//      rank in the chunk is running[e] + Σ(lower warps' group sizes for e) + (lower peers): this is
//      ascending row order, i.e. stable. The running per-expert counts are the chunk's shared-
//      memory histogram; they are updated with shared atomics, which commute, so the counts are
//      exact whatever the order. Output: the rank of every row and the chunk's histogram [E].
//   2. moe_route_scan_kernel: one CTA of 1024 threads, thread e owns expert e. It turns its
//      column of the [chunks, E] histogram table into exclusive per-chunk bases (in place), then a
//      block scan over the expert totals gives counts and offsets, and the bases become absolute.
//   3. moe_route_scatter_kernel: row i of chunk c with expert e lands at base[c][e] + rank[i];
//      writes perm and inv. Fully parallel, one thread per row.
//   Cost for the largest case (N = 98304, E = 384): 96 CTAs of kernel 1, a table of 96×384 ints;
//   all three kernels are a few microseconds, dominated by launch latency.
// Gather / combine are bandwidth-bound copies. A row is served by TPR = min(256, pow2 ≥ row
// vectors) threads and a 256-thread CTA serves 256/TPR rows, so that narrow rows (D = 64) do not
// leave most of a CTA idle and wide rows (D = 4096 bf16 = 512 16-byte vectors) loop twice. No
// per-element 64-bit division. 16-byte vectors (8 bf16 / 4 f32) when D and the pointers allow it,
// scalar otherwise.
//
// Exactness of the combine: fp32 adds via __fadd_rn (never contracted into an FMA, and there is no
// multiply to contract with anyway), starting from +0 and adding the k slots in slot order, then
// shared + sum: exactly the additions of ops::moe's combine, in the same order.
#include "cuda/moe_dispatch.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "core/common.h"
#include "cuda/device.cuh"
#include "cuda/numerics.cuh"
#include "cuda/linear.h"   // CUDA_CHECK

namespace megamoe::cuda {
namespace {

constexpr int kRouteThreads = 256;
constexpr int kRouteWarps = kRouteThreads / 32;
constexpr int kScanThreads = 1024;   // == kMoeMaxExperts: one thread per expert
constexpr int kCopyThreads = 256;
static_assert(kScanThreads == kMoeMaxExperts, "the scan kernel gives each expert one thread");
static_assert(kMoeRouteChunk % kRouteThreads == 0, "a chunk is walked in whole CTA-wide steps");

// First statement of every kernel here (see launch_pdl).
__device__ __forceinline__ void pdl_begin() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

__device__ __forceinline__ int clamp_expert(int e, int E) { return e < 0 ? 0 : (e >= E ? E - 1 : e); }

// Kernel 1: per-chunk stable rank + histogram. Dynamic shared memory: running[E], per_warp[8][E].
static __global__ void __launch_bounds__(kRouteThreads)
moe_route_rank_kernel(const int32_t* __restrict__ ids, int N, int E, int32_t* __restrict__ chunk_table,
                      int32_t* __restrict__ rank) {
    pdl_begin();
    extern __shared__ int32_t smem[];
    int32_t* running = smem;
    int32_t* per_warp = smem + E;
    for (int i = threadIdx.x; i < E * (1 + kRouteWarps); i += kRouteThreads) smem[i] = 0;
    __syncthreads();

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned lower_lanes = (1u << lane) - 1u;
    const int begin = blockIdx.x * static_cast<int>(kMoeRouteChunk);
    const int end = min(begin + static_cast<int>(kMoeRouteChunk), N);
    // begin/end are uniform over the CTA, so every thread runs the same iterations (barriers below).
    for (int base = begin; base < end; base += kRouteThreads) {
        const int i = base + static_cast<int>(threadIdx.x);
        const bool valid = i < end;
        // Invalid lanes use -1, a value no valid lane has, so they form their own group.
        const int e = valid ? clamp_expert(ids[i], E) : -1;
        const unsigned peers = __match_any_sync(0xffffffffu, e);
        const int below = __popc(peers & lower_lanes);
        const bool leader = below == 0;
        const int group = __popc(peers);
        if (valid && leader) per_warp[warp * E + e] = group;   // one writer per (warp, expert)
        __syncthreads();
        if (valid) {
            int r = running[e] + below;
            for (int w = 0; w < warp; ++w) r += per_warp[w * E + e];
            rank[i] = r;
        }
        __syncthreads();
        if (valid && leader) {
            atomicAdd(&running[e], group);   // integer adds commute: exact in any order
            per_warp[warp * E + e] = 0;
        }
        __syncthreads();
    }
    for (int e = threadIdx.x; e < E; e += kRouteThreads) chunk_table[blockIdx.x * E + e] = running[e];
}

// Kernel 2: column scans of the [chunks, E] table (in place, to per-chunk absolute bases), counts,
// offsets. One CTA; thread e owns expert e (E ≤ 1024).
static __global__ void __launch_bounds__(kScanThreads)
moe_route_scan_kernel(int32_t* __restrict__ chunk_table, int chunks, int E, int N, int32_t* __restrict__ counts,
                      int32_t* __restrict__ offsets) {
    pdl_begin();
    __shared__ int32_t warp_sums[kScanThreads / 32];
    const int e = threadIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int total = 0;
    if (e < E) {
        for (int c = 0; c < chunks; ++c) {   // coalesced over e; the loads are independent
            const int v = chunk_table[c * E + e];
            chunk_table[c * E + e] = total;
            total += v;
        }
    }
    // Block-wide exclusive scan of the totals (warp shuffles, then a scan of the 32 warp sums).
    int incl = total;
    for (int d = 1; d < 32; d <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, d);
        if (lane >= d) incl += v;
    }
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        int w = warp_sums[lane];
        for (int d = 1; d < 32; d <<= 1) {
            const int v = __shfl_up_sync(0xffffffffu, w, d);
            if (lane >= d) w += v;
        }
        warp_sums[lane] = w;
    }
    __syncthreads();
    const int excl = incl - total + (warp > 0 ? warp_sums[warp - 1] : 0);
    if (e < E) {
        counts[e] = total;
        offsets[e] = excl;
        for (int c = 0; c < chunks; ++c) chunk_table[c * E + e] += excl;
    }
    if (e == 0) offsets[E] = N;   // == Σ counts: every row has exactly one (clamped) expert
}

// Kernel 3: row i goes to base[chunk(i)][e] + rank[i].
static __global__ void __launch_bounds__(kCopyThreads)
moe_route_scatter_kernel(const int32_t* __restrict__ ids, int N, int E, const int32_t* __restrict__ chunk_table,
                         const int32_t* __restrict__ rank, int32_t* __restrict__ perm, int32_t* __restrict__ inv) {
    pdl_begin();
    for (int i = blockIdx.x * kCopyThreads + threadIdx.x; i < N; i += gridDim.x * kCopyThreads) {
        const int e = clamp_expert(ids[i], E);
        const int pos = chunk_table[(i / static_cast<int>(kMoeRouteChunk)) * E + e] + rank[i];
        perm[pos] = i;
        inv[i] = pos;
    }
}

// Route + gather + work list for N ≤ kMoeDispatchSmallMaxRows rows in one CTA of 1024 threads
// (thread e owns expert e for the counts and the two scans). V: uint4 (8 bf16) or uint16_t.
constexpr int kSmallThreads = 1024;
static_assert(kSmallThreads == kMoeMaxExperts, "the small dispatch gives each expert one thread");

template <typename V>
static __global__ void __launch_bounds__(kSmallThreads)
moe_dispatch_small_kernel(const int32_t* __restrict__ ids, const V* __restrict__ x, const float* __restrict__ weights,
                          int N, int k, int E, int64_t vecs, int32_t* __restrict__ counts, int32_t* __restrict__ offsets,
                          int32_t* __restrict__ perm, int32_t* __restrict__ inv, V* __restrict__ xs,
                          float* __restrict__ ws, int BT, int4* __restrict__ items, int32_t* __restrict__ n_items,
                          int item_E) {
    pdl_begin();
    __shared__ int32_t s_ids[kMoeDispatchSmallMaxRows];
    __shared__ int32_t s_pos[kMoeDispatchSmallMaxRows];
    __shared__ int32_t s_rows[kSmallThreads];    // inclusive scan of the counts
    __shared__ int32_t s_tiles[kSmallThreads];   // inclusive scan of the tiles
    const int e = static_cast<int>(threadIdx.x);
    if (e < N) s_ids[e] = clamp_expert(ids[e], E);
    __syncthreads();
    int c = 0;
    if (e < E)
        for (int i = 0; i < N; ++i) c += s_ids[i] == e;
    const int tiles = e < item_E ? (c + BT - 1) / BT : 0;   // buckets from item_E up are never computed
    s_rows[e] = c;
    s_tiles[e] = tiles;
    __syncthreads();
    for (int o = 1; o < kSmallThreads; o <<= 1) {   // inclusive Hillis-Steele scans
        const int32_t r = e >= o ? s_rows[e - o] : 0;
        const int32_t t = e >= o ? s_tiles[e - o] : 0;
        __syncthreads();
        s_rows[e] += r;
        s_tiles[e] += t;
        __syncthreads();
    }
    const int32_t first = s_rows[e] - c;   // offsets[e]
    if (e < E) {
        counts[e] = c;
        offsets[e] = first;
        if (items != nullptr) {
            const int32_t base = s_tiles[e] - tiles;
            for (int32_t j = 0; j < tiles; ++j) items[base + j] = make_int4(e, first + j * BT, min(BT, c - j * BT), 0);
        }
    }
    if (e == 0) offsets[E] = N;
    if (items != nullptr && e == kSmallThreads - 1) *n_items = s_tiles[e];
    if (e < N) {
        const int ex = s_ids[e];
        int cnt = 0, rank = 0;   // rows of expert ex, and those of them below row e
        for (int i = 0; i < N; ++i) {
            const bool same = s_ids[i] == ex;
            cnt += same;
            rank += same && i < e;
        }
        const int pos = (s_rows[ex] - cnt) + rank;   // offsets[ex] + rank (s_rows is inclusive)
        perm[pos] = e;
        inv[e] = pos;
        if (ws != nullptr) ws[pos] = weights[e];
        s_pos[e] = pos;
    }
    __syncthreads();
    // xs[pos(i)] = x[i / k]: warp w copies rows w, w + 32, ..., its lanes along the row.
    const int lane = e & 31, warp = e >> 5;
    for (int i = warp; i < N; i += kSmallThreads / 32) {
        const V* in = x + static_cast<int64_t>(i / k) * vecs;
        V* out = xs + static_cast<int64_t>(s_pos[i]) * vecs;
        for (int64_t col = lane; col < vecs; col += 32) out[col] = in[col];
    }
}

// Row-parallel copy geometry: a row of `vecs` vectors is served by 2^tpr_shift threads.
struct RowGeometry {
    int tpr_shift = 0;   // log2(threads per row), ≤ log2(kCopyThreads)
    int64_t rows_per_block() const { return kCopyThreads >> tpr_shift; }
};
RowGeometry row_geometry(int64_t vecs) {
    RowGeometry g;
    while ((int64_t{1} << g.tpr_shift) < vecs && (1 << g.tpr_shift) < kCopyThreads) ++g.tpr_shift;
    return g;
}

// xs[j] = x[perm[j] / k] in vectors of V (uint4 = 8 bf16, or one uint16_t), ws[j] = weights[perm[j]].
template <typename V>
static __global__ void __launch_bounds__(kCopyThreads)
moe_gather_kernel(const V* __restrict__ x, const float* __restrict__ weights, const int32_t* __restrict__ perm, int N,
                  int k, int64_t vecs, int tpr_shift, V* __restrict__ xs, float* __restrict__ ws) {
    pdl_begin();
    const int tpr = 1 << tpr_shift;
    const int64_t row = static_cast<int64_t>(blockIdx.x) * (kCopyThreads >> tpr_shift) + (threadIdx.x >> tpr_shift);
    if (row >= N) return;
    const int col0 = threadIdx.x & (tpr - 1);
    const int src = perm[row];
    const V* in = x + static_cast<int64_t>(src / k) * vecs;
    V* out = xs + row * vecs;
    for (int64_t c = col0; c < vecs; c += tpr) out[c] = in[c];
    if (ws != nullptr && col0 == 0) ws[row] = weights[src];
}

// Round to nearest-even bf16 bits (NaN stays NaN).
__device__ __forceinline__ uint32_t bf16_bits(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }

// Stores VEC consecutive outputs: one 16-byte (f32) or 8-byte (bf16) store when VEC = 4.
template <int VEC>
__device__ __forceinline__ void store_vec(float* p, const float (&v)[VEC]) {
    if constexpr (VEC == 4) *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    else p[0] = v[0];
}
template <int VEC>
__device__ __forceinline__ void store_vec(uint16_t* p, const float (&v)[VEC]) {
    if constexpr (VEC == 4) {
        const uint32_t lo = bf16_bits(v[0]) | (bf16_bits(v[1]) << 16);
        const uint32_t hi = bf16_bits(v[2]) | (bf16_bits(v[3]) << 16);
        *reinterpret_cast<uint2*>(p) = make_uint2(lo, hi);
    } else {
        p[0] = static_cast<uint16_t>(bf16_bits(v[0]));
    }
}
template <int VEC>
__device__ __forceinline__ void load_vec(const float* p, float (&v)[VEC]) {
    if constexpr (VEC == 4) {
        const float4 q = *reinterpret_cast<const float4*>(p);
        v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
    } else {
        v[0] = p[0];
    }
}

// y[t] = (shared[t] +) Σ_s rows[inv[t·k + s]], slot order, fp32 adds without contraction.
// official: every row and shared rounded to bf16 as loaded, and the sum rounded to bf16.
template <typename OutT, int VEC>
static __global__ void __launch_bounds__(kCopyThreads)
moe_combine_kernel(const float* __restrict__ rows, const int32_t* __restrict__ inv, const float* __restrict__ shared,
                   int T, int k, int64_t D, int tpr_shift, OutT* __restrict__ y, bool official) {
    pdl_begin();
    const int tpr = 1 << tpr_shift;
    const int64_t t = static_cast<int64_t>(blockIdx.x) * (kCopyThreads >> tpr_shift) + (threadIdx.x >> tpr_shift);
    if (t >= T) return;
    const int64_t vecs = D / VEC;
    const int32_t* my_inv = inv + t * k;
    // blockIdx.y splits a row's vectors over several CTAs (few tokens: more loads in flight).
    const int64_t step = static_cast<int64_t>(tpr) * gridDim.y;
    for (int64_t c = (threadIdx.x & (tpr - 1)) + static_cast<int64_t>(blockIdx.y) * tpr; c < vecs; c += step) {
        float acc[VEC];
        for (int j = 0; j < VEC; ++j) acc[j] = 0.0f;   // +0 start, as the CPU's `float acc = 0`
        for (int s = 0; s < k; ++s) {
            float v[VEC];
            load_vec<VEC>(rows + static_cast<int64_t>(my_inv[s]) * D + c * VEC, v);
            if (official)
                for (int j = 0; j < VEC; ++j) v[j] = nm::bf16_round(v[j]);
            for (int j = 0; j < VEC; ++j) acc[j] = __fadd_rn(acc[j], v[j]);
        }
        if (shared != nullptr) {
            float sh[VEC];
            load_vec<VEC>(shared + t * D + c * VEC, sh);
            if (official)
                for (int j = 0; j < VEC; ++j) sh[j] = nm::bf16_round(sh[j]);
            for (int j = 0; j < VEC; ++j) acc[j] = __fadd_rn(sh[j], acc[j]);
        }
        if (official)
            for (int j = 0; j < VEC; ++j) acc[j] = nm::bf16_round(acc[j]);
        store_vec<VEC>(y + t * D + c * VEC, acc);
    }
}

bool aligned(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

cudaStream_t as_stream(CUstream_st* s) { return s; }

// Every kernel here starts with pdl_begin() and is launched with dev::launch_pdl.
template <typename... KArgs, typename... Args>
void launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, Args... args) {
    CUDA_CHECK(dev::launch_pdl(kernel, grid, block, smem, s, args...));
}

int grid_for(int64_t rows, int64_t rows_per_block) {
    const int64_t g = (rows + rows_per_block - 1) / rows_per_block;
    MEGAMOE_CHECK(g <= 0x7fffffff, "grid too large: ", g);
    return static_cast<int>(g);
}

void check_shape(int64_t T, int64_t k, const char* op) {
    if (T < 0 || k < 1) fail(op, ": bad shape T=", T, " k=", k);
    if (T * k >= (int64_t{1} << 31)) fail(op, ": T·k = ", T * k, " does not fit int32 row indices");
}

template <typename OutT>
void combine_impl(const float* rows, const int32_t* inv, const float* shared, int64_t T, int64_t k, int64_t D,
                  OutT* y, CUstream_st* stream, const char* op, bool official = false) {
    check_shape(T, k, op);
    if (D < 1) fail(op, ": bad D=", D);
    if (T == 0) return;
    if (!rows || !inv || !y) fail(op, ": null rows/inv/y");
    const bool vec = D % 4 == 0 && aligned(rows, 16) && aligned(y, 4 * sizeof(OutT)) &&
                     (shared == nullptr || aligned(shared, 16));
    const int64_t vecs = vec ? D / 4 : D;
    const RowGeometry g = row_geometry(vecs);
    const int grid = grid_for(T, g.rows_per_block());
    // With few tokens the row CTAs alone would leave the GPU idle and each thread would walk its
    // row serially: split each row's vectors over up to ceil(vecs / TPR) CTAs, aiming at ~2 CTAs
    // per SM in all. Each output element is still summed by one thread in slot order.
    const int64_t iters = (vecs + (int64_t{1} << g.tpr_shift) - 1) >> g.tpr_shift;
    const dim3 blocks(static_cast<unsigned>(grid),
                      static_cast<unsigned>(std::clamp<int64_t>(264 / std::max(grid, 1), 1, std::min<int64_t>(iters, 65535))));
    if (vec)
        launch_pdl(moe_combine_kernel<OutT, 4>, blocks, dim3(kCopyThreads), 0, as_stream(stream), rows, inv, shared,
                   static_cast<int>(T), static_cast<int>(k), D, g.tpr_shift, y, official);
    else
        launch_pdl(moe_combine_kernel<OutT, 1>, blocks, dim3(kCopyThreads), 0, as_stream(stream), rows, inv, shared,
                   static_cast<int>(T), static_cast<int>(k), D, g.tpr_shift, y, official);
    CUDA_CHECK(cudaGetLastError());
}

}  // namespace

int64_t moe_route_scratch_ints(int64_t N, int64_t E) {
    const int64_t chunks = (N + kMoeRouteChunk - 1) / kMoeRouteChunk;
    return chunks * E + N;
}

void moe_route_counts(const int32_t* ids, int64_t T, int64_t k, int64_t E, int32_t* counts, int32_t* offsets,
                      int32_t* perm, int32_t* inv, int32_t* scratch, CUstream_st* stream) {
    check_shape(T, k, "moe_route_counts");
    if (E < 1 || E > kMoeMaxExperts) fail("moe_route_counts: E=", E, " outside [1, ", kMoeMaxExperts, "]");
    if (!counts || !offsets) fail("moe_route_counts: null counts/offsets");
    const int64_t N = T * k;
    if (N > 0 && (!ids || !perm || !inv || !scratch)) fail("moe_route_counts: null ids/perm/inv/scratch");
    const int chunks = static_cast<int>((N + kMoeRouteChunk - 1) / kMoeRouteChunk);
    int32_t* table = scratch;                                      // [chunks, E]
    int32_t* rank = scratch + static_cast<int64_t>(chunks) * E;    // [N]
    const cudaStream_t s = as_stream(stream);
    if (N > 0) {
        const size_t smem = sizeof(int32_t) * static_cast<size_t>(E) * (1 + kRouteWarps);   // ≤ 36 KiB
        launch_pdl(moe_route_rank_kernel, dim3(chunks), dim3(kRouteThreads), smem, s, ids, static_cast<int>(N),
                   static_cast<int>(E), table, rank);
        CUDA_CHECK(cudaGetLastError());
    }
    // Runs for N = 0 too (chunks = 0), so counts and offsets are always written.
    launch_pdl(moe_route_scan_kernel, dim3(1), dim3(kScanThreads), 0, s, table, chunks, static_cast<int>(E),
               static_cast<int>(N), counts, offsets);
    CUDA_CHECK(cudaGetLastError());
    if (N > 0) {
        const int grid = static_cast<int>(std::min<int64_t>((N + kCopyThreads - 1) / kCopyThreads, 4096));
        launch_pdl(moe_route_scatter_kernel, dim3(grid), dim3(kCopyThreads), 0, s, ids, static_cast<int>(N),
                   static_cast<int>(E), static_cast<const int32_t*>(table), static_cast<const int32_t*>(rank), perm, inv);
        CUDA_CHECK(cudaGetLastError());
    }
}

void moe_gather(const uint16_t* x_bf16, const float* weights, const int32_t* perm, int64_t T, int64_t k, int64_t D,
                uint16_t* xs_bf16, float* ws, CUstream_st* stream) {
    check_shape(T, k, "moe_gather");
    if (D < 1) fail("moe_gather: bad D=", D);
    const int64_t N = T * k;
    if (N == 0) return;
    if (!x_bf16 || !perm || !xs_bf16) fail("moe_gather: null x/perm/xs");
    if (weights == nullptr) ws = nullptr;   // ws is written only when both are given
    const bool vec = D % 8 == 0 && aligned(x_bf16, 16) && aligned(xs_bf16, 16);
    const int64_t vecs = vec ? D / 8 : D;
    const RowGeometry g = row_geometry(vecs);
    const int grid = grid_for(N, g.rows_per_block());
    const cudaStream_t s = as_stream(stream);
    if (vec)
        launch_pdl(moe_gather_kernel<uint4>, dim3(grid), dim3(kCopyThreads), 0, s, reinterpret_cast<const uint4*>(x_bf16),
                   weights, perm, static_cast<int>(N), static_cast<int>(k), vecs, g.tpr_shift,
                   reinterpret_cast<uint4*>(xs_bf16), ws);
    else
        launch_pdl(moe_gather_kernel<uint16_t>, dim3(grid), dim3(kCopyThreads), 0, s, x_bf16, weights, perm,
                   static_cast<int>(N), static_cast<int>(k), vecs, g.tpr_shift, xs_bf16, ws);
    CUDA_CHECK(cudaGetLastError());
}

void moe_dispatch_small(const int32_t* ids, const uint16_t* x_bf16, const float* weights, int64_t T, int64_t k,
                        int64_t E, int64_t D, int32_t* counts, int32_t* offsets, int32_t* perm, int32_t* inv,
                        uint16_t* xs_bf16, float* ws, int32_t BT, int32_t* items, int32_t* n_items,
                        CUstream_st* stream, int64_t item_experts) {
    check_shape(T, k, "moe_dispatch_small");
    if (item_experts == 0) item_experts = E;
    const int64_t N = T * k;
    if (N < 1 || N > kMoeDispatchSmallMaxRows)
        fail("moe_dispatch_small: T·k = ", N, " outside [1, ", kMoeDispatchSmallMaxRows, "]");
    if (E < 1 || E > kMoeMaxExperts) fail("moe_dispatch_small: E=", E, " outside [1, ", kMoeMaxExperts, "]");
    if (D < 1) fail("moe_dispatch_small: bad D=", D);
    if (BT < 1) fail("moe_dispatch_small: bad tile height ", BT);
    if (item_experts < 1 || item_experts > E)
        fail("moe_dispatch_small: item_experts = ", item_experts, " outside [1, E = ", E, "]");
    if (!ids || !x_bf16 || !counts || !offsets || !perm || !inv || !xs_bf16)
        fail("moe_dispatch_small: null ids/x/counts/offsets/perm/inv/xs");
    if (items != nullptr && n_items == nullptr) fail("moe_dispatch_small: items without n_items");
    if (weights == nullptr) ws = nullptr;   // ws is written only when both are given
    const bool vec = D % 8 == 0 && aligned(x_bf16, 16) && aligned(xs_bf16, 16);
    const int64_t vecs = vec ? D / 8 : D;
    const cudaStream_t s = as_stream(stream);
    int4* it = reinterpret_cast<int4*>(items);
    if (vec)
        launch_pdl(moe_dispatch_small_kernel<uint4>, dim3(1), dim3(kSmallThreads), 0, s, ids,
                   reinterpret_cast<const uint4*>(x_bf16), weights, static_cast<int>(N), static_cast<int>(k),
                   static_cast<int>(E), vecs, counts, offsets, perm, inv, reinterpret_cast<uint4*>(xs_bf16), ws,
                   static_cast<int>(BT), it, n_items, static_cast<int>(item_experts));
    else
        launch_pdl(moe_dispatch_small_kernel<uint16_t>, dim3(1), dim3(kSmallThreads), 0, s, ids, x_bf16, weights,
                   static_cast<int>(N), static_cast<int>(k), static_cast<int>(E), vecs, counts, offsets, perm, inv,
                   xs_bf16, ws, static_cast<int>(BT), it, n_items, static_cast<int>(item_experts));
    CUDA_CHECK(cudaGetLastError());
}

void moe_combine(const float* rows, const int32_t* inv, const float* shared, int64_t T, int64_t k, int64_t D,
                 float* y, CUstream_st* stream, bool official) {
    combine_impl<float>(rows, inv, shared, T, k, D, y, stream, "moe_combine", official);
}

void moe_combine_bf16(const float* rows, const int32_t* inv, const float* shared, int64_t T, int64_t k, int64_t D,
                      uint16_t* y_bf16, CUstream_st* stream) {
    combine_impl<uint16_t>(rows, inv, shared, T, k, D, y_bf16, stream, "moe_combine_bf16");
}

// ---- workspace

MoeDispatchWorkspace::MoeDispatchWorkspace(int64_t T_max_, int64_t k_, int64_t E_, int64_t D_)
    : T_max(T_max_), k(k_), E(E_), D(D_) {
    check_shape(T_max, k, "MoeDispatchWorkspace");
    if (E < 1 || E > kMoeMaxExperts) fail("MoeDispatchWorkspace: E=", E, " outside [1, ", kMoeMaxExperts, "]");
    if (D < 1) fail("MoeDispatchWorkspace: bad D=", D);
    const int64_t N = T_max * k;
    // At least one element each: every buffer is non-null, so T_max = 0 works too.
    auto count = [](int64_t n) { return static_cast<size_t>(std::max<int64_t>(n, 1)); };
    counts = DeviceArray<int32_t>(count(E), "MoeDispatchWorkspace counts");
    offsets = DeviceArray<int32_t>(count(E + 1), "MoeDispatchWorkspace offsets");
    perm = DeviceArray<int32_t>(count(N), "MoeDispatchWorkspace perm");
    inv = DeviceArray<int32_t>(count(N), "MoeDispatchWorkspace inv");
    xs = DeviceArray<uint16_t>(count(N * D), "MoeDispatchWorkspace xs");
    ws = DeviceArray<float>(count(N), "MoeDispatchWorkspace ws");
    scratch = DeviceArray<int32_t>(count(moe_route_scratch_ints(N, E)), "MoeDispatchWorkspace scratch");
}

size_t MoeDispatchWorkspace::bytes() const {
    return counts.bytes() + offsets.bytes() + perm.bytes() + inv.bytes() + xs.bytes() + ws.bytes() + scratch.bytes();
}

namespace {

void check_workspace(const MoeDispatchWorkspace& w, int64_t T, const char* what) {
    if (w.counts.empty()) fail(what, ": the workspace holds no buffers");
    if (T < 0 || T > w.T_max) fail(what, ": T=", T, " outside [0, ", w.T_max, "]");
}

}  // namespace

void MoeDispatchWorkspace::route(const int32_t* ids, int64_t T, CUstream_st* stream) {
    check_workspace(*this, T, "MoeDispatchWorkspace::route");
    moe_route_counts(ids, T, k, E, counts.data(), offsets.data(), perm.data(), inv.data(), scratch.data(), stream);
}

void MoeDispatchWorkspace::gather(const uint16_t* x_bf16, const float* weights, int64_t T, CUstream_st* stream) {
    check_workspace(*this, T, "MoeDispatchWorkspace::gather");
    moe_gather(x_bf16, weights, perm.data(), T, k, D, xs.data(), ws.data(), stream);
}

void MoeDispatchWorkspace::route_gather_small(const int32_t* ids, const uint16_t* x_bf16, const float* weights,
                                              int64_t T, int32_t BT, int32_t* items, int32_t* n_items,
                                              CUstream_st* stream, int64_t item_experts) {
    check_workspace(*this, T, "MoeDispatchWorkspace::route_gather_small");
    moe_dispatch_small(ids, x_bf16, weights, T, k, E, D, counts.data(), offsets.data(), perm.data(), inv.data(),
                       xs.data(), ws.data(), BT, items, n_items, stream, item_experts);
}

void MoeDispatchWorkspace::combine(const float* rows, const float* shared, int64_t T, float* y,
                                   CUstream_st* stream, bool official) const {
    check_workspace(*this, T, "MoeDispatchWorkspace::combine");
    moe_combine(rows, inv.data(), shared, T, k, D, y, stream, official);
}

}  // namespace megamoe::cuda
