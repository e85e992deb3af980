// attention.cu — sparse sink attention (window + compressed keys), the lightning indexer's scores,
// and the per-row top-k, on sm_90 tensor cores (mma.sync m16n8k16 bf16 → f32).
//
// sparse_attention: one CTA of 8 warps per (token, block of 16 heads, key split); MQA, so the 16
// heads share every key row. Heads past H are zero rows (H = 4 or 8 runs a padded block).
//   - Keys: the query's list (attention_keys.h: window keys from this step's kv or the slot's ring,
//     then the compressed rows: all visible ones or the top-k's), 64 per tile. For each tile the
//     64 row addresses are computed by 64 threads two tiles ahead into a shared table (nullptr =
//     no row: masked, zero-filled); the tile itself is gathered by cp.async (16-byte chunks, XOR
//     swizzled so ldmatrix is conflict-free) into a 3-stage ring of shared buffers. With FP8 KV
//     rows (a.kv_fp8, official numerics; kv_row.h) a stored row's raw bytes (592 for hd 512) land
//     unswizzled at the start of its slot, and once the tile has landed each warp expands its 8
//     rows in place to swizzled bf16 (e4m3 · 2^k, exact), one more barrier per tile: everything
//     after reads the same bf16 tile as with bf16 storage.
//   - S = Q·Kᵀ: Q's A fragments live in registers for the whole loop; warp w takes keys 8w..8w+7
//     of the tile over the full head dim. Online softmax in f32 in base 2 (logits · scale · log2 e):
//     the tile's row max crosses warps through shared memory; every thread applies the same
//     running max, so each thread keeps partial row sums that add up at the end in a fixed order.
//   - P = exp2(s − m) is rounded to bf16 (the row sums add the rounded values, so the weights
//     that multiply V are exactly the normalized ones), staged in shared memory, and O += P·V with
//     warp w owning output columns [w·hd/8, (w+1)·hd/8) (V = K: the same tile, ldmatrix.trans).
//   - Split keys (flash-decoding): when T·⌈H/16⌉ CTAs would not fill the GPU, a thread-block
//     cluster of S ∈ {2, 4, 8} CTAs shares one (token, head block) (S doubles while the grid stays
//     within one CTA per SM and each split keeps a tile); CTA r takes a contiguous range
//     of the key tiles. Each CTA leaves (m, l, O) of its range in its shared memory; after a cluster
//     barrier, CTA r combines columns [r·hd/S, (r+1)·hd/S) of all S partials through distributed
//     shared memory, in rank order, with the sink as one more logit (no value row), then applies
//     the inverse RoPE at the query position and writes bf16. S = 1 runs the same code. Each
//     combine step requests its S partials together (combine_splits), and the barrier that keeps a
//     CTA's shared memory alive for its peers has no release fence.
//   The one-token step (V4-Flash: 16 heads × 1-2 tiles per CTA, 8-32 CTAs) is a chain of
//   latencies, not work: ~25 K cycles per CTA. A clock64 probe on an H100 (thread 0 of the first
//   CTA, V4-Flash at 1 K context, window layer S = 2 / CSA layer S = 8), cycles before → after
//   this layout: the combine 7000 → 4600 (S = 2; ~3500 both at S = 8), the closing barrier ~3000
//   (a release fence behind the output stores) → 700-2000 (now mostly waiting for the peer), the
//   split weights 1750 → 600 (the sink loaded at the start, every rank's m and l requested
//   together), issuing the first tile's copies 2800 → 2000 (KeyTiles::load). What remains: the
//   tile's landing (1000-5000), the tile's math (~2500 per tile), query_keys' dependent loads
//   with Q's copies (~1300), and the first cluster barrier (1800-6000: the slower split).
//   S depends on T and H only (graph-capturable); a token's result depends on S (the summation
//   order of the split), so it is fixed for a given batch size, not across batch sizes.
//   From a wave of tokens on (attention_wide: prefill chunks, large decode batches) one CTA takes
//   64 heads instead (sparse_attention_wide_kernel below: each key tile read once for all of them,
//   4× the MMA work per tile); same arithmetic, another f32 order of the row sums.
//
// indexer_topk: (1) scores: CTAs (token, key-block stride); a warp takes 32 key rows as two
//   m16 tiles (keys = MMA rows) against all heads (MMA columns, 8 per n-tile); the key rows go
//   straight from the paged pool into A-fragment registers with 16-byte loads (the contraction
//   order over the head dim is permuted identically in A and B, see indexer_scores_kernel), Q comes
//   from shared memory. relu, · dI^-0.5, · w·w_scale per head, summed in a fixed order (per thread
//   over its heads, then a quad butterfly). Numerics::official: each (row, head) term is rounded as
//   ops::indexer_scores_bf16 rounds it, and the heads are added in head order by the lane that
//   stores the row: per n-tile, a quad transposes its terms (packed bf16 pairs, 4 shuffles) so
//   lane tig holds row tig's terms of all 8 heads of the tile, which it adds in order.
//   (2) top-k: one CTA of 1024 threads per token, radix select + ordered compaction (topk_kernel
//   below); rows of ≤ 52 Ki scores are staged in shared memory first, longer ones are read from
//   global memory by every pass.
//
// A top-k entry outside [0, n_vis) is treated like −1 (no row is read), so a bad index cannot
// fault. Every kernel starts with griddepcontrol.wait (launched with programmatic dependent launch), uses
// no atomics whose order matters (shared-memory histogram counts only), allocates nothing.
#include "cuda/attention.h"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <tuple>

#include "core/common.h"
#include "cuda/attention_keys.h"
#include "cuda/device_info.h"
#include "cuda/kv_row.h"
#include "cuda/device.cuh"
#include "cuda/linear.h"
#include "cuda/numerics.cuh"

namespace megamoe::cuda {

namespace {

namespace cg = cooperative_groups;
using dev::cp_async16;
using dev::cp_async_commit;
using dev::cp_async_wait;
using dev::mma_bf16;
using dev::smem_addr;

// ---------------------------------------------------------------------------- constants

constexpr int kHeadsPerCta = 16;      // MMA rows
constexpr int kAttnWarps = 8;
constexpr int kAttnThreads = kAttnWarps * 32;
constexpr int kTileKeys = 64;         // keys per tile (8 per warp in S = Q·Kᵀ)
constexpr int kStages = 3;            // key tiles in flight
constexpr int kPtrBufs = kStages + 1; // address tables: written 2 tiles ahead, read for masks
constexpr int kMaxSplits = 8;         // portable cluster size
constexpr int kMaxTopk = 2048;        // top-k entries staged per CTA (V4: 512 / 1024)
constexpr float kLog2e = 1.4426950408889634f;

constexpr int kIdxWarps = 4;
constexpr int kIdxThreads = kIdxWarps * 32;
constexpr int kIdxRowsPerWarp = 32;   // two m16 tiles
constexpr int kIdxRowsPerCta = kIdxWarps * kIdxRowsPerWarp;

constexpr int kTopkThreads = 1024;
constexpr int64_t kTopkCacheFloats = 52 * 1024;   // rows up to 208 KiB are staged in shared memory

// ---------------------------------------------------------------------------- device helpers

// First statement of every kernel here (see dev::launch_pdl).
__device__ __forceinline__ void pdl_begin() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x2_trans(uint32_t addr, uint32_t& r0, uint32_t& r1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];" : "=r"(r0), "=r"(r1) : "r"(addr));
}

// 2^x, relative error ~2^-22 (P is rounded to bf16 right after); ex2(−inf) = +0.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ float bf16_lo(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t v) { return __uint_as_float(v & 0xFFFF0000u); }

// Byte offset of 16-byte chunk c of row r in a tile of rows of `row_bytes` (a multiple of 128):
// chunk c is stored at c ^ (r mod 8), so 8 consecutive rows at one chunk hit 8 bank groups.
__device__ __forceinline__ uint32_t swz(int r, int c, int row_bytes) {
    return static_cast<uint32_t>(r * row_bytes + ((c ^ (r & 7)) << 4));
}

// ---------------------------------------------------------------------------- sparse attention

// Dynamic shared memory of the attention kernel for head dim D (topk_k ints at the end).
template <int D> struct AttnLayout {
    static constexpr int kRowBytes = D * 2;
    static constexpr int kTileBytes = kTileKeys * kRowBytes;
    static constexpr int kPartStride = D + 8;                   // floats per row of the partial O
    static constexpr int kQ = 0;                                // bf16 [16][D] (swizzled)
    static constexpr int kK = kQ + kHeadsPerCta * kRowBytes;    // bf16 [kStages][64][D]; partial O f32 [16][D+8] at the end
    static constexpr int kP = kK + kStages * kTileBytes;        // bf16 [16][64] (swizzled)
    static constexpr int kPtr = kP + kHeadsPerCta * kTileKeys * 2;   // const uint16_t* [kPtrBufs][64]
    static constexpr int kRed = kPtr + kPtrBufs * kTileKeys * 8;     // f32 [8][16]
    static constexpr int kM = kRed + kAttnWarps * kHeadsPerCta * 4;  // f32 [16] running max (log2 units)
    static constexpr int kL = kM + kHeadsPerCta * 4;                 // f32 [16] row sums
    static constexpr int kCoef = kL + kHeadsPerCta * 4;              // f32 [kMaxSplits][16] split weights
    static constexpr int kDen = kCoef + kMaxSplits * kHeadsPerCta * 4;   // f32 [16] denominators
    static constexpr int kTopk = kDen + kHeadsPerCta * 4;            // int32 [topk_k]
    static_assert(kHeadsPerCta * kPartStride * 4 <= kStages * kTileBytes, "partial O fits the key stages");
    static_assert(kK % 128 == 0 && kP % 128 == 0 && kPtr % 16 == 0, "aligned regions");
    static size_t bytes(int topk_k) { return static_cast<size_t>(kTopk) + static_cast<size_t>(topk_k) * 4; }
};

// A query's key rows in tiles of 64, for both attention kernels: the row addresses of a tile
// (fill), its gather into a stage (load), and the expansion of its FP8 rows (decode).
//   fill   threads 0..63 write key j's row address into the table (nullptr: no row). An fp8 row
//          (a.kv_fp8 and a stored row) is tagged by bit 0 of its address (rows are 16-byte aligned).
//   load   cp.async, one 16-byte chunk per thread and row: thread i takes chunk i mod (D/8) of rows
//          i / (D/8) + k·(256·8/D), the order the copies always had; the table entries of a batch of
//          rows are read before any copy is issued, so the reads' shared-memory latency is paid once
//          per batch, not per row (at hd = 512, one token: ~2800 → ~2000 cycles to issue a tile's
//          4096 copies, a clock64 probe on an H100; the rest is the memory system taking them).
//          An fp8 row's raw bytes go unswizzled to the start of its slot; decode expands them.
//   decode expands the fp8 rows of a landed tile in place into swizzled bf16 rows (kv_row.h:
//          e4m3 · 2^(e − 127), exact in bf16). Warp w takes rows 8w .. 8w + 7; its lanes read all of
//          a row's raw bytes before any writes it.
// Tiles are local (lt): tile tile0 + lt of the query's key list; kPtrBufs tables, kStagesN stages.
template <int D, int kPtrBufsN, int kStagesN> struct KeyTiles {
    static constexpr int kRowBytes = D * 2;
    static constexpr int kChunks = D / 8;                          // 16-byte chunks per bf16 row
    static constexpr int kTileBytes = kTileKeys * kRowBytes;
    static constexpr int kRowsPerPass = kAttnThreads / kChunks;    // rows one pass of the CTA copies
    static constexpr int kPasses = kTileKeys / kRowsPerPass;
    static constexpr int kBatch = kPasses < 8 ? kPasses : 8;       // table entries read ahead of their copies
    static_assert(kAttnThreads % kChunks == 0 && kTileKeys % kRowsPerPass == 0 && kPasses % kBatch == 0,
                  "a pass covers whole rows");

    const AttentionArgs& a;
    const QueryKeys& qk;
    const int32_t* topk;        // the token's top-k row (shared memory) for CSA, else nullptr
    const uint16_t** ptr_s;     // [kPtrBufsN][64] row addresses
    uint8_t* k_s;               // [kStagesN][64][D] bf16 (swizzled)
    int32_t tile0, tiles, n_keys;
    int raw_chunks;             // 16-byte chunks of a stored fp8 row (0: bf16 rows)

    __device__ __forceinline__ KvRow fmt() const { return KvRow{D, a.rope.rope_dim, true}; }
    __device__ __forceinline__ const uint16_t* const* table(int lt) const {
        return ptr_s + (lt % kPtrBufsN) * kTileKeys;
    }
    __device__ __forceinline__ uint8_t* stage(int lt) const { return k_s + (lt % kStagesN) * kTileBytes; }

    __device__ __forceinline__ void fill(int lt, int tid) const {
        if (tid >= kTileKeys) return;
        const uint16_t* p = nullptr;
        if (lt < tiles) {
            const int32_t j = (tile0 + lt) * kTileKeys + tid;
            bool stored = false;
            if (j < n_keys) p = key_row(a, qk, j, topk, &stored);
            if (p && stored && a.kv_fp8)
                p = reinterpret_cast<const uint16_t*>(reinterpret_cast<uintptr_t>(p) | uintptr_t{1});
        }
        ptr_s[(lt % kPtrBufsN) * kTileKeys + tid] = p;
    }

    __device__ __forceinline__ void load(int lt, int tid) const {
        const uint16_t* const* ptrs = table(lt);
        uint8_t* const st = stage(lt);
        const int c = tid % kChunks, r0 = tid / kChunks;
#pragma unroll
        for (int p0 = 0; p0 < kPasses; p0 += kBatch) {
            uintptr_t u[kBatch];
#pragma unroll
            for (int k = 0; k < kBatch; ++k) u[k] = reinterpret_cast<uintptr_t>(ptrs[r0 + (p0 + k) * kRowsPerPass]);
#pragma unroll
            for (int k = 0; k < kBatch; ++k) {
                const int r = r0 + (p0 + k) * kRowsPerPass;
                if (u[k] & 1u) {
                    if (c < raw_chunks)
                        cp_async16(smem_addr(st + r * kRowBytes + c * 16),
                                   reinterpret_cast<const uint8_t*>(u[k] - 1u) + c * 16, true);
                } else {
                    const uint16_t* src = reinterpret_cast<const uint16_t*>(u[k]);
                    cp_async16(smem_addr(st + swz(r, c, kRowBytes)), src ? src + c * 8 : a.q, src != nullptr);
                }
            }
        }
    }

    __device__ __forceinline__ void decode(int lt, int warp, int lane) const {
        const uint16_t* const* ptrs = table(lt);
        uint8_t* const st = stage(lt);
        const KvRow f = fmt();
        constexpr int kPer = (kChunks + 31) / 32;
        for (int rr = 0; rr < kTileKeys / kAttnWarps; ++rr) {
            const int r = warp * (kTileKeys / kAttnWarps) + rr;
            if (!(reinterpret_cast<uintptr_t>(ptrs[r]) & 1u)) continue;   // warp-uniform
            uint8_t* const row = st + r * kRowBytes;
            uint4 v[kPer];
#pragma unroll
            for (int i = 0; i < kPer; ++i) {
                const int c = lane + 32 * i, d0 = 8 * c;   // bf16 chunk c: dims d0 .. d0 + 7
                if (c >= kChunks) break;
                if (d0 < f.nope()) {
                    const uint2 q = *reinterpret_cast<const uint2*>(row + d0);
                    const uint32_t e = row[f.scale_offset() + d0 / KvRow::kBlock];
                    const float sc = __uint_as_float(e << 23);
                    v[i].x = nm::e4m3x2_to_bf16x2(static_cast<uint16_t>(q.x & 0xFFFFu), sc);
                    v[i].y = nm::e4m3x2_to_bf16x2(static_cast<uint16_t>(q.x >> 16), sc);
                    v[i].z = nm::e4m3x2_to_bf16x2(static_cast<uint16_t>(q.y & 0xFFFFu), sc);
                    v[i].w = nm::e4m3x2_to_bf16x2(static_cast<uint16_t>(q.y >> 16), sc);
                } else {
                    v[i] = *reinterpret_cast<const uint4*>(row + f.rope_offset() + 2 * (d0 - f.nope()));
                }
            }
            __syncwarp();
#pragma unroll
            for (int i = 0; i < kPer; ++i) {
                const int c = lane + 32 * i;
                if (c >= kChunks) break;
                *reinterpret_cast<uint4*>(st + swz(r, c, kRowBytes)) = v[i];
            }
            __syncwarp();
        }
    }
};

// Whether a query's compressed keys come from its top-k row (CSA): what query_keys says
// (n_comp = topk_k when the layer compresses and has a top-k), known before its loads.
__device__ __forceinline__ bool uses_topk(const AttentionArgs& a) {
    return a.topk != nullptr && a.comp.ratio > 0 && a.topk_k > 0;
}

// Q rows h0 .. h0 + rows − 1 of token t (zero past H) → shared memory (swizzled), asynchronously
// (the caller commits); the top-k row of token t → shared memory (CSA).
template <int D>
__device__ __forceinline__ void stage_query(const AttentionArgs& a, int32_t t, int32_t h0, int rows, uint8_t* q_s,
                                            int32_t* topk_s, int tid) {
    constexpr int kChunks = D / 8;
    for (int i = tid; i < rows * kChunks; i += kAttnThreads) {
        const int r = i / kChunks, c = i % kChunks;
        const bool ok = h0 + r < a.heads;
        const uint16_t* src = a.q + ((static_cast<int64_t>(t) * a.heads + (ok ? h0 + r : 0)) * D + c * 8);
        cp_async16(smem_addr(q_s + swz(r, c, D * 2)), src, ok);
    }
    if (uses_topk(a))
        for (int i = tid; i < a.topk_k; i += kAttnThreads) topk_s[i] = a.topk[static_cast<int64_t>(t) * a.topk_k + i];
}

// Distributed shared memory: the address of the same shared variable in cluster rank `rank`
// (mapa), and 32-bit / 128-bit loads through it (ld.shared::cluster).
__device__ __forceinline__ uint32_t cluster_addr(uint32_t local, uint32_t rank) {
    uint32_t r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(local), "r"(rank));
    return r;
}
__device__ __forceinline__ float ld_cluster_f32(uint32_t addr) {
    float v;
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(addr));
    return v;
}
__device__ __forceinline__ float4 ld_cluster_f4(uint32_t addr) {
    float4 v;
    asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(addr));
    return v;
}

// The split combine of sparse_attention_kernel: columns [rank·D/S, (rank+1)·D/S) of the 16 rows,
// 4 at a time (two RoPE pairs): O = Σ_r e_r·O_r (rank order, from 0) / den, the inverse rotation of
// the rope dims at the query position p, bf16 stores; the same operations in the same order as
// one pair at a time, so the same bits. Each step requests its S partials together (its own from
// shared memory, the peers' through the cluster) before using any: one round trip per step where
// one pair and one rank at a time took S per pair (at S = 2, hd = 512: ~7000 cycles for the
// combine, a clock64 probe on an H100). It stays a loop: unrolled over a thread's steps (and
// templated on S) the combine measured slower, its code fetched cold at every launch (one CTA per
// SM runs it once per step).
template <int D>
__device__ __forceinline__ void combine_splits(const AttentionArgs& a, int32_t t, int32_t h0, int32_t rank,
                                               int32_t splits, int32_t p, const float* part, const float* coef_s,
                                               const float* den_s) {
    using L = AttnLayout<D>;
    const int cols = D / splits, quads = cols / 4;               // this rank's columns, in float4s (D / 8 ≥ 8)
    const int c0 = static_cast<int>(rank) * cols;
    const int off = D - a.rope.rope_dim;
    const int32_t H = a.heads;
    for (int it = static_cast<int>(threadIdx.x); it < kHeadsPerCta * quads; it += kAttnThreads) {
        const int row = it / quads, c = c0 + 4 * (it % quads);
        // (Before the reads: every peer read must be used before the closing barrier's relaxed
        // arrive, which lets the peers exit.)
        if (h0 + row >= H) continue;
        const float* src = part + row * L::kPartStride + c;
        const uint32_t local = smem_addr(src);
        float4 v[kMaxSplits];
#pragma unroll
        for (int r = 0; r < kMaxSplits; ++r)
            if (r < splits)
                v[r] = r == rank ? *reinterpret_cast<const float4*>(src)
                                 : ld_cluster_f4(cluster_addr(local, static_cast<uint32_t>(r)));
        float y[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int r = 0; r < kMaxSplits; ++r)
            if (r < splits) {
                const float e = coef_s[r * kHeadsPerCta + row];
                y[0] = fmaf(v[r].x, e, y[0]);
                y[1] = fmaf(v[r].y, e, y[1]);
                y[2] = fmaf(v[r].z, e, y[2]);
                y[3] = fmaf(v[r].w, e, y[3]);
            }
        const float den = den_s[row];
        y[0] /= den;
        y[1] /= den;
        y[2] /= den;
        y[3] /= den;
        for (int pr = 0; pr < 2; ++pr) {
            const int cc = c + 2 * pr;
            if (cc < off) continue;
            const float angle = static_cast<float>(p) * a.rope.inv_freq[(cc - off) / 2];
            float sn, cs;
            sincosf(angle, &sn, &cs);
            sn = -sn;   // the conjugate rotation (ops::rope, inverse)
            const float x0 = y[2 * pr], x1 = y[2 * pr + 1];
            y[2 * pr] = x0 * cs - x1 * sn;
            y[2 * pr + 1] = x1 * cs + x0 * sn;
        }
        *reinterpret_cast<uint2*>(a.out + (static_cast<int64_t>(t) * H + h0 + row) * D + c) =
            make_uint2(pack_bf16x2(y[0], y[1]), pack_bf16x2(y[2], y[3]));
    }
}

template <int D>
__global__ void __launch_bounds__(kAttnThreads, 1)
sparse_attention_kernel(const AttentionArgs a, const BatchView b, const int32_t splits) {
    using L = AttnLayout<D>;
    constexpr int kQFrags = D / 16;      // k-steps of S = Q·Kᵀ
    constexpr int kNT = D / 64;          // n-tiles of 8 output columns per warp in O += P·V
    constexpr int kColsPerWarp = D / kAttnWarps;
    pdl_begin();
    extern __shared__ __align__(128) uint8_t smem[];
    uint8_t* const q_s = smem + L::kQ;
    uint8_t* const k_s = smem + L::kK;
    uint8_t* const p_s = smem + L::kP;
    const uint16_t** const ptr_s = reinterpret_cast<const uint16_t**>(smem + L::kPtr);
    float* const red_s = reinterpret_cast<float*>(smem + L::kRed);
    float* const m_s = reinterpret_cast<float*>(smem + L::kM);
    float* const l_s = reinterpret_cast<float*>(smem + L::kL);
    float* const coef_s = reinterpret_cast<float*>(smem + L::kCoef);
    float* const den_s = reinterpret_cast<float*>(smem + L::kDen);
    int32_t* const topk_s = reinterpret_cast<int32_t*>(smem + L::kTopk);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
    const int32_t rank = static_cast<int32_t>(blockIdx.x % static_cast<uint32_t>(splits));   // cluster = (splits, 1, 1)
    const int32_t t = static_cast<int32_t>(blockIdx.x / static_cast<uint32_t>(splits));
    const int32_t h0 = static_cast<int32_t>(blockIdx.y) * kHeadsPerCta;
    const int32_t H = a.heads;
    // The sink logit of this thread's row for the split weights (threads 0..15), loaded now.
    const float sink2 = tid < kHeadsPerCta && h0 + tid < H ? a.sink[h0 + tid] * kLog2e : 0.0f;

    // The query's keys (query_keys: dependent loads, chunk → its first token → that position),
    // then Q (16 rows) and the top-k row → shared memory. (Q's copies first measured ~500 cycles
    // slower at one token: the copies' issue then sits in front of those loads.)
    const QueryKeys qk = query_keys(a, b, t);
    stage_query<D>(a, t, h0, kHeadsPerCta, q_s, topk_s, tid);
    cp_async_commit();
    const int32_t n_keys = qk.n_keys();
    const int32_t n_tiles = (n_keys + kTileKeys - 1) / kTileKeys;
    const int32_t per_split = (n_tiles + splits - 1) / splits;
    const int32_t tile_begin = min(n_tiles, rank * per_split);
    const int32_t my_tiles = min(n_tiles, tile_begin + per_split) - tile_begin;
    const bool csa = uses_topk(a);
    __syncthreads();

    const int raw_chunks = a.kv_fp8 ? KvRow{D, a.rope.rope_dim, true}.bytes() / 16 : 0;
    const KeyTiles<D, kPtrBufs, kStages> kt{a, qk, csa ? topk_s : nullptr, ptr_s, k_s, tile_begin, my_tiles,
                                            n_keys, raw_chunks};

    for (int s = 0; s < kStages; ++s) kt.fill(s, tid);
    __syncthreads();
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < my_tiles) kt.load(s, tid);
        cp_async_commit();
    }
    cp_async_wait<kStages - 1>();   // the Q group (the oldest) has landed
    __syncthreads();

    // Q's A fragments for every k-step, in registers for the whole loop.
    uint32_t qf[kQFrags][4];
    {
        const int r = (lane & 7) + 8 * ((lane >> 3) & 1);
#pragma unroll
        for (int kk = 0; kk < kQFrags; ++kk)
            ldsm_x4(smem_addr(q_s + swz(r, 2 * kk + (lane >> 4), L::kRowBytes)), qf[kk][0], qf[kk][1], qf[kk][2],
                    qf[kk][3]);
    }

    const float sl2 = a.scale * kLog2e;
    float o[kNT][4];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;
    float m_run[2] = {-INFINITY, -INFINITY};   // rows g, g + 8 (log2 units), the same in every thread
    float l_run[2] = {0.0f, 0.0f};             // this thread's share of the row sums

    for (int lt = 0; lt < my_tiles; ++lt) {
        cp_async_wait<kStages - 2>();   // tile lt has landed (this thread's copies)
        __syncthreads();                // ... everyone's; tile lt − 1 is fully consumed
        {
            const int nl = lt + kStages - 1;
            if (nl < my_tiles) kt.load(nl, tid);
            cp_async_commit();
            kt.fill(lt + kStages, tid);   // its buffer last held tile lt − 1's table
        }
        if (a.kv_fp8) {
            kt.decode(lt, warp, lane);
            __syncthreads();
        }
        const uint8_t* const stage = k_s + (lt % kStages) * L::kTileBytes;
        const uint16_t* const* ptrs = ptr_s + (lt % kPtrBufs) * kTileKeys;

        // S[16 × 8] for keys 8·warp .. 8·warp + 7.
        float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        {
            const int kr = 8 * warp + (lane & 7);
#pragma unroll
            for (int ks = 0; ks < D / 32; ++ks) {
                uint32_t b0, b1, b2, b3;
                ldsm_x4(smem_addr(stage + swz(kr, 4 * ks + (lane >> 3), L::kRowBytes)), b0, b1, b2, b3);
                mma_bf16(s, qf[2 * ks][0], qf[2 * ks][1], qf[2 * ks][2], qf[2 * ks][3], b0, b1);
                mma_bf16(s, qf[2 * ks + 1][0], qf[2 * ks + 1][1], qf[2 * ks + 1][2], qf[2 * ks + 1][3], b2, b3);
            }
        }
        const int col = 8 * warp + 2 * tig;
        const bool v0 = ptrs[col] != nullptr, v1 = ptrs[col + 1] != nullptr;
        s[0] = v0 ? s[0] * sl2 : -INFINITY;
        s[1] = v1 ? s[1] * sl2 : -INFINITY;
        s[2] = v0 ? s[2] * sl2 : -INFINITY;
        s[3] = v1 ? s[3] * sl2 : -INFINITY;
        float mx0 = fmaxf(s[0], s[1]), mx1 = fmaxf(s[2], s[3]);
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xFFFFFFFFu, mx0, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xFFFFFFFFu, mx1, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xFFFFFFFFu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xFFFFFFFFu, mx1, 2));
        if (tig == 0) {
            red_s[warp * kHeadsPerCta + g] = mx0;
            red_s[warp * kHeadsPerCta + g + 8] = mx1;
        }
        __syncthreads();
#pragma unroll
        for (int w = 0; w < kAttnWarps; ++w) {
            mx0 = fmaxf(mx0, red_s[w * kHeadsPerCta + g]);
            mx1 = fmaxf(mx1, red_s[w * kHeadsPerCta + g + 8]);
        }
        const float mn0 = fmaxf(m_run[0], mx0), mn1 = fmaxf(m_run[1], mx1);
        const float mu0 = mn0 == -INFINITY ? 0.0f : mn0, mu1 = mn1 == -INFINITY ? 0.0f : mn1;
        const float corr0 = fast_exp2(m_run[0] - mu0), corr1 = fast_exp2(m_run[1] - mu1);
        m_run[0] = mn0;
        m_run[1] = mn1;
        const uint32_t p01 = pack_bf16x2(fast_exp2(s[0] - mu0), fast_exp2(s[1] - mu0));
        const uint32_t p23 = pack_bf16x2(fast_exp2(s[2] - mu1), fast_exp2(s[3] - mu1));
        l_run[0] = l_run[0] * corr0 + (bf16_lo(p01) + bf16_hi(p01));
        l_run[1] = l_run[1] * corr1 + (bf16_lo(p23) + bf16_hi(p23));
        // P row g / g + 8, keys col, col + 1: chunk `warp` of a 128-byte row (swizzled by row mod 8 = g).
        *reinterpret_cast<uint32_t*>(p_s + swz(g, warp, kTileKeys * 2) + 4 * tig) = p01;
        *reinterpret_cast<uint32_t*>(p_s + swz(g + 8, warp, kTileKeys * 2) + 4 * tig) = p23;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
            o[nt][0] *= corr0;
            o[nt][1] *= corr0;
            o[nt][2] *= corr1;
            o[nt][3] *= corr1;
        }
        __syncthreads();

        // O[16 × D/8] += P[16 × 64] · V[64 × D/8], V = this tile's rows.
        const int ar = (lane & 7) + 8 * ((lane >> 3) & 1);
#pragma unroll
        for (int kk = 0; kk < kTileKeys / 16; ++kk) {
            uint32_t a0, a1, a2, a3;
            ldsm_x4(smem_addr(p_s + swz(ar, 2 * kk + (lane >> 4), kTileKeys * 2)), a0, a1, a2, a3);
            const int vr = 16 * kk + ar;
            if constexpr (kNT == 1) {
                uint32_t b0, b1;
                ldsm_x2_trans(smem_addr(stage + swz(vr, warp * (kColsPerWarp / 8), L::kRowBytes)), b0, b1);
                mma_bf16(o[0], a0, a1, a2, a3, b0, b1);
            } else {
#pragma unroll
                for (int np = 0; np < kNT / 2; ++np) {
                    uint32_t b0, b1, b2, b3;
                    const int c = warp * (kColsPerWarp / 8) + 2 * np + (lane >> 4);
                    ldsm_x4_trans(smem_addr(stage + swz(vr, c, L::kRowBytes)), b0, b1, b2, b3);
                    mma_bf16(o[2 * np], a0, a1, a2, a3, b0, b1);
                    mma_bf16(o[2 * np + 1], a0, a1, a2, a3, b2, b3);
                }
            }
        }
    }

    // This CTA's partial (m, l, O) → shared memory (the key stages are free once every copy landed).
    cp_async_wait<0>();
    float l0 = l_run[0] + __shfl_xor_sync(0xFFFFFFFFu, l_run[0], 1);
    float l1 = l_run[1] + __shfl_xor_sync(0xFFFFFFFFu, l_run[1], 1);
    l0 += __shfl_xor_sync(0xFFFFFFFFu, l0, 2);
    l1 += __shfl_xor_sync(0xFFFFFFFFu, l1, 2);
    __syncthreads();   // all warps are past their last tile (red_s and the stages are free)
    if (tig == 0) {
        red_s[warp * kHeadsPerCta + g] = l0;
        red_s[warp * kHeadsPerCta + g + 8] = l1;
        if (warp == 0) {
            m_s[g] = m_run[0];
            m_s[g + 8] = m_run[1];
        }
    }
    float* const part = reinterpret_cast<float*>(k_s);   // [16][D + 8]
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
        const int c = warp * kColsPerWarp + 8 * nt + 2 * tig;
        *reinterpret_cast<float2*>(part + g * L::kPartStride + c) = make_float2(o[nt][0], o[nt][1]);
        *reinterpret_cast<float2*>(part + (g + 8) * L::kPartStride + c) = make_float2(o[nt][2], o[nt][3]);
    }
    __syncthreads();
    if (tid < kHeadsPerCta) {
        float l = 0.0f;
#pragma unroll
        for (int w = 0; w < kAttnWarps; ++w) l += red_s[w * kHeadsPerCta + tid];
        l_s[tid] = l;
    }

    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();   // every CTA's partial is complete and visible to the cluster

    // Split weights per row: M = max(sink, m_r), e_r = 2^(m_r − M), den = 2^(sink − M) + Σ_r l_r e_r.
    // Every rank's m and l are requested before any is used (one round trip, not 3·S in turn).
    if (tid < kHeadsPerCta) {
        float mr[kMaxSplits], lr[kMaxSplits];
        const uint32_t m_local = smem_addr(m_s + tid), l_local = smem_addr(l_s + tid);
#pragma unroll
        for (int r = 0; r < kMaxSplits; ++r)
            if (r < splits) {
                mr[r] = ld_cluster_f32(cluster_addr(m_local, static_cast<uint32_t>(r)));
                lr[r] = ld_cluster_f32(cluster_addr(l_local, static_cast<uint32_t>(r)));
            }
        float mx = sink2;
#pragma unroll
        for (int r = 0; r < kMaxSplits; ++r)
            if (r < splits) mx = fmaxf(mx, mr[r]);
        float den = fast_exp2(sink2 - mx);
#pragma unroll
        for (int r = 0; r < kMaxSplits; ++r)
            if (r < splits) {
                const float e = fast_exp2(mr[r] - mx);
                coef_s[r * kHeadsPerCta + tid] = e;
                den += lr[r] * e;
            }
        den_s[tid] = den;
    }
    __syncthreads();

    combine_splits<D>(a, t, h0, rank, splits, qk.p, part, coef_s, den_s);
    // Peers may still read this CTA's shared memory until they arrive. Relaxed: each CTA's reads
    // are consumed (its stores used them), and the global stores need no ordering with the peers,
    // so no release fence waits for them (cluster.sync's did: ~3000 cycles at the end of every
    // one-token attention, a clock64 probe on an H100).
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
    asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
}

// ---------------------------------------------------------------------------- sparse attention, 64 heads per CTA

// At many tokens (prefill chunks, large decode batches) the 16-head CTAs above read every key
// row once per head block (4 times for V4-Flash's 64 heads, 8 for V4-Pro's 128) and spend a
// barrier-bound tile on 2 MFLOP. sparse_attention_wide_kernel keeps the same arithmetic (64-key
// tiles, online softmax in base 2 in f32, P rounded to bf16, f32 accumulation; so the same
// tolerance and twin) with one CTA per (token, 64 heads), no key split:
//   - S = Q·Kᵀ: warp w takes heads 16·(w mod 4) .. + 15 and keys 32·(w / 4) .. + 31 of the tile
//     (4 n-tiles over the full head dim; Q's A fragments from shared memory, each used for the
//     4 n-tiles); the two warps of a head group exchange their row maxima through shared memory.
//   - O += P·V: warp w takes the same 16 heads and output columns [(w / 4)·hd/2, (w / 4 + 1)·hd/2)
//     (hd/16 n-tiles: 128 f32 accumulators per thread at hd = 512), so the rescale by the running
//     max uses the max this warp just computed, and each thread's accumulators hold whole RoPE pairs:
//     the epilogue (sink, normalization, inverse rotation, bf16 store) runs from registers.
//   - Shared memory at hd = 512: Q 64 KB, two key stages of 64 KB, P 8 KB (WideLayout; three
//     stages below hd = 512).
// Per 64-key tile a CTA does 8 MFLOP (4× the 16-head CTA's) and reads the tile once for all 64
// heads. Row sums: each thread adds its share in tile order, then the quad and the two key halves
// are added in a fixed order, as above.

constexpr int kWideHeads = 64;        // heads per CTA (MMA rows: 4 groups of 16)

template <int D> struct WideLayout {
    static constexpr int kStages = D >= 512 ? 2 : 3;
    static constexpr int kPtrBufs = kStages + 1;
    static constexpr int kRowBytes = D * 2;
    static constexpr int kTileBytes = kTileKeys * kRowBytes;
    static constexpr int kQ = 0;                                       // bf16 [64][D] (swizzled)
    static constexpr int kK = kQ + kWideHeads * kRowBytes;             // bf16 [kStages][64][D]
    static constexpr int kP = kK + kStages * kTileBytes;               // bf16 [64 heads][64 keys] (swizzled)
    static constexpr int kPtr = kP + kWideHeads * kTileKeys * 2;       // const uint16_t* [kPtrBufs][64]
    static constexpr int kRed = kPtr + kPtrBufs * kTileKeys * 8;       // f32 [8 warps][16]
    static constexpr int kTopk = kRed + kAttnWarps * kHeadsPerCta * 4; // int32 [topk_k]
    static_assert(kK % 128 == 0 && kP % 128 == 0 && kPtr % 16 == 0, "aligned regions");
    static size_t bytes(int topk_k) { return static_cast<size_t>(kTopk) + static_cast<size_t>(topk_k) * 4; }
};

template <int D>
__global__ void __launch_bounds__(kAttnThreads, 1)
sparse_attention_wide_kernel(const AttentionArgs a, const BatchView b) {
    using L = WideLayout<D>;
    constexpr int kStages = L::kStages;
    constexpr int kHalf = D / 2;           // output columns per warp
    constexpr int kNT = kHalf / 8;         // n-tiles of O per warp
    pdl_begin();
    extern __shared__ __align__(128) uint8_t smem[];
    uint8_t* const q_s = smem + L::kQ;
    uint8_t* const k_s = smem + L::kK;
    uint8_t* const p_s = smem + L::kP;
    const uint16_t** const ptr_s = reinterpret_cast<const uint16_t**>(smem + L::kPtr);
    float* const red_s = reinterpret_cast<float*>(smem + L::kRed);
    int32_t* const topk_s = reinterpret_cast<int32_t*>(smem + L::kTopk);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
    const int hg = warp & 3, half = warp >> 2;   // head group; key half (S) and column half (O)
    const int32_t t = static_cast<int32_t>(blockIdx.x);
    const int32_t h0 = static_cast<int32_t>(blockIdx.y) * kWideHeads;
    const int32_t H = a.heads;

    const QueryKeys qk = query_keys(a, b, t);
    stage_query<D>(a, t, h0, kWideHeads, q_s, topk_s, tid);
    cp_async_commit();
    const int32_t n_keys = qk.n_keys();
    const int32_t n_tiles = (n_keys + kTileKeys - 1) / kTileKeys;
    const bool csa = uses_topk(a);
    __syncthreads();

    // Key addresses, tile gather and fp8 expansion: KeyTiles, as sparse_attention_kernel (no split).
    const int raw_chunks = a.kv_fp8 ? KvRow{D, a.rope.rope_dim, true}.bytes() / 16 : 0;
    const KeyTiles<D, L::kPtrBufs, kStages> kt{a, qk, csa ? topk_s : nullptr, ptr_s, k_s, 0, n_tiles, n_keys,
                                               raw_chunks};

    for (int s = 0; s < kStages; ++s) kt.fill(s, tid);
    __syncthreads();
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < n_tiles) kt.load(s, tid);
        cp_async_commit();
    }

    const float sl2 = a.scale * kLog2e;
    float o[kNT][4];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;
    float m_run[2] = {-INFINITY, -INFINITY};   // heads 16·hg + g, + 8 (log2 units), the same in both warps of hg
    float l_run[2] = {0.0f, 0.0f};             // this thread's share of the row sums (its key half)
    const int qr = 16 * hg + (lane & 7) + 8 * ((lane >> 3) & 1);   // ldmatrix row of Q and P
    const int vr0 = (lane & 7) + 8 * ((lane >> 3) & 1);            // ldmatrix.trans key row within 16

    for (int lt = 0; lt < n_tiles; ++lt) {
        cp_async_wait<kStages - 2>();   // tile lt (and, at lt = 0, Q) has landed (this thread's copies)
        __syncthreads();                // ... everyone's; tile lt − 1 and P are fully consumed
        {
            const int nl = lt + kStages - 1;
            if (nl < n_tiles) kt.load(nl, tid);
            cp_async_commit();
            kt.fill(lt + kStages, tid);   // its buffer last held tile lt − 1's table
        }
        if (a.kv_fp8) {
            kt.decode(lt, warp, lane);
            __syncthreads();
        }
        const uint8_t* const stage = k_s + (lt % kStages) * L::kTileBytes;
        const uint16_t* const* ptrs = ptr_s + (lt % L::kPtrBufs) * kTileKeys;

        // S[16 heads × 32 keys]: keys 32·half + 8·j + (0..7), j = 0..3.
        float s[4][4];
#pragma unroll
        for (int j = 0; j < 4; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll 4
        for (int ks = 0; ks < D / 32; ++ks) {
            uint32_t qa[4], qb[4];
            ldsm_x4(smem_addr(q_s + swz(qr, 4 * ks + (lane >> 4), L::kRowBytes)), qa[0], qa[1], qa[2], qa[3]);
            ldsm_x4(smem_addr(q_s + swz(qr, 4 * ks + 2 + (lane >> 4), L::kRowBytes)), qb[0], qb[1], qb[2], qb[3]);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int kr = 32 * half + 8 * j + (lane & 7);
                uint32_t b0, b1, b2, b3;
                ldsm_x4(smem_addr(stage + swz(kr, 4 * ks + (lane >> 3), L::kRowBytes)), b0, b1, b2, b3);
                mma_bf16(s[j], qa[0], qa[1], qa[2], qa[3], b0, b1);
                mma_bf16(s[j], qb[0], qb[1], qb[2], qb[3], b2, b3);
            }
        }
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int col = 32 * half + 8 * j + 2 * tig;
            const bool v0 = ptrs[col] != nullptr, v1 = ptrs[col + 1] != nullptr;
            s[j][0] = v0 ? s[j][0] * sl2 : -INFINITY;
            s[j][1] = v1 ? s[j][1] * sl2 : -INFINITY;
            s[j][2] = v0 ? s[j][2] * sl2 : -INFINITY;
            s[j][3] = v1 ? s[j][3] * sl2 : -INFINITY;
            mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
            mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xFFFFFFFFu, mx0, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xFFFFFFFFu, mx1, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xFFFFFFFFu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xFFFFFFFFu, mx1, 2));
        if (tig == 0) {
            red_s[warp * kHeadsPerCta + g] = mx0;
            red_s[warp * kHeadsPerCta + g + 8] = mx1;
        }
        __syncthreads();
        mx0 = fmaxf(red_s[hg * kHeadsPerCta + g], red_s[(hg + 4) * kHeadsPerCta + g]);
        mx1 = fmaxf(red_s[hg * kHeadsPerCta + g + 8], red_s[(hg + 4) * kHeadsPerCta + g + 8]);
        const float mn0 = fmaxf(m_run[0], mx0), mn1 = fmaxf(m_run[1], mx1);
        const float mu0 = mn0 == -INFINITY ? 0.0f : mn0, mu1 = mn1 == -INFINITY ? 0.0f : mn1;
        const float corr0 = fast_exp2(m_run[0] - mu0), corr1 = fast_exp2(m_run[1] - mu1);
        m_run[0] = mn0;
        m_run[1] = mn1;
        float ls0 = 0.0f, ls1 = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const uint32_t p01 = pack_bf16x2(fast_exp2(s[j][0] - mu0), fast_exp2(s[j][1] - mu0));
            const uint32_t p23 = pack_bf16x2(fast_exp2(s[j][2] - mu1), fast_exp2(s[j][3] - mu1));
            ls0 += bf16_lo(p01) + bf16_hi(p01);
            ls1 += bf16_lo(p23) + bf16_hi(p23);
            // P rows 16·hg + g / + 8, keys col, col + 1: chunk 4·half + j of a 128-byte row.
            *reinterpret_cast<uint32_t*>(p_s + swz(16 * hg + g, 4 * half + j, kTileKeys * 2) + 4 * tig) = p01;
            *reinterpret_cast<uint32_t*>(p_s + swz(16 * hg + g + 8, 4 * half + j, kTileKeys * 2) + 4 * tig) = p23;
        }
        l_run[0] = l_run[0] * corr0 + ls0;
        l_run[1] = l_run[1] * corr1 + ls1;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
            o[nt][0] *= corr0;
            o[nt][1] *= corr0;
            o[nt][2] *= corr1;
            o[nt][3] *= corr1;
        }
        __syncthreads();   // P of both key halves is in shared memory

        // O[16 × hd/2] += P[16 × 64] · V[64 × hd/2], V = this tile's rows, columns of this half.
#pragma unroll
        for (int kk = 0; kk < kTileKeys / 16; ++kk) {
            uint32_t a0, a1, a2, a3;
            ldsm_x4(smem_addr(p_s + swz(qr, 2 * kk + (lane >> 4), kTileKeys * 2)), a0, a1, a2, a3);
            const int vr = 16 * kk + vr0;
#pragma unroll
            for (int np = 0; np < kNT / 2; ++np) {
                uint32_t b0, b1, b2, b3;
                const int c = half * (kHalf / 8) + 2 * np + (lane >> 4);
                ldsm_x4_trans(smem_addr(stage + swz(vr, c, L::kRowBytes)), b0, b1, b2, b3);
                mma_bf16(o[2 * np], a0, a1, a2, a3, b0, b1);
                mma_bf16(o[2 * np + 1], a0, a1, a2, a3, b2, b3);
            }
        }
    }
    cp_async_wait<0>();

    // Row sums: the quad, then key half 0 + key half 1 (fixed order).
    float l0 = l_run[0] + __shfl_xor_sync(0xFFFFFFFFu, l_run[0], 1);
    float l1 = l_run[1] + __shfl_xor_sync(0xFFFFFFFFu, l_run[1], 1);
    l0 += __shfl_xor_sync(0xFFFFFFFFu, l0, 2);
    l1 += __shfl_xor_sync(0xFFFFFFFFu, l1, 2);
    __syncthreads();   // every warp is past its last read of red_s
    if (tig == 0) {
        red_s[warp * kHeadsPerCta + g] = l0;
        red_s[warp * kHeadsPerCta + g + 8] = l1;
    }
    __syncthreads();
    // With the sink as one more logit (no value row): M = max(sink, m), den = 2^(sink − M) + l·2^(m − M).
    float e[2], den[2];
    bool live[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const int row = g + 8 * rr, h = h0 + 16 * hg + row;
        live[rr] = h < H;
        const float l = red_s[hg * kHeadsPerCta + row] + red_s[(hg + 4) * kHeadsPerCta + row];
        const float sink2 = live[rr] ? a.sink[h] * kLog2e : 0.0f;
        const float mx = fmaxf(sink2, m_run[rr]);
        e[rr] = fast_exp2(m_run[rr] - mx);
        den[rr] = fast_exp2(sink2 - mx) + l * e[rr];
    }
    const int rd = a.rope.rope_dim, off = D - rd;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
        const int c = half * kHalf + 8 * nt + 2 * tig;
        float sn = 0.0f, cs = 1.0f;
        if (c >= off) {
            const float angle = static_cast<float>(qk.p) * a.rope.inv_freq[(c - off) / 2];
            sincosf(angle, &sn, &cs);
            sn = -sn;   // the conjugate rotation (ops::rope, inverse)
        }
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            if (!live[rr]) continue;
            float x0 = o[nt][2 * rr] * e[rr], x1 = o[nt][2 * rr + 1] * e[rr];
            x0 /= den[rr];
            x1 /= den[rr];
            if (c >= off) {
                const float y0 = x0 * cs - x1 * sn, y1 = x1 * cs + x0 * sn;
                x0 = y0;
                x1 = y1;
            }
            const int h = h0 + 16 * hg + g + 8 * rr;
            *reinterpret_cast<uint32_t*>(a.out + (static_cast<int64_t>(t) * H + h) * D + c) = pack_bf16x2(x0, x1);
        }
    }
}

// ---------------------------------------------------------------------------- indexer scores

// scores[t, s] = Σ_h w[t,h]·w_scale · relu(q[t,h]·K[s] · scale) for s < n_vis(t), row blocks of
// 128 keys strided over gridDim.y. Q smem: [NH][DI] bf16, 16-byte chunk c of head h stored at
// c ^ 4·(h mod 2) (DI ≥ 64) so a quarter-warp's LDS.128 (heads g, g+1 × 4 chunks) is conflict-free.
//
// The contraction over the head dim is permuted: lane (g, tig) loads 16 bytes = dims
// [32P + 8·tig, 32P + 8·tig + 8) of its rows for P = 0 .. DI/32 − 1 and feeds them to k-steps 2P
// (elements 0..3) and 2P + 1 (elements 4..7) as the k pairs {2tig, 2tig+1} and {2tig+8, 2tig+9}:
// a bijection of the DI dims, the same for A (key rows) and B (query heads), so every dot product
// is complete (in another order of its f32 sums).
//
// kOfficial (Numerics::official, ops::indexer_scores_bf16): w_h = bf16(bf16(w)·w_scale); the term
// of (row, head) is bf16(max(bf16(dot), 0)·w_h) (std::max's order: −0 stays −0), a bf16 value, so
// two of them pack into one 32-bit word exactly. The accumulator fragment gives lane (g, tig) rows
// g + 8·rr (rr = 0..3) × heads nt·8 + 2·tig, +1; the twin adds the heads of a row in order. Per
// n-tile the quad transposes: in step k lane tig reads quad lane (tig + k) mod 4, which offers the
// packed pair of the row its reader stores (rr = reader's tig); then lane tig adds the 8 terms of
// row tig in head order to its f32 accumulator (which starts at +0, as the twin's). The score is
// bf16(acc). `scale` is unused (dI^-0.5 is inside w_scale).
template <int NH, int DI, bool kOfficial>
__global__ void __launch_bounds__(kIdxThreads)
indexer_scores_kernel(const IndexerArgs a, const BatchView b, const float scale) {
    constexpr int kChunks = DI / 8, kPairs = DI / 32, kNT = NH / 8;
    pdl_begin();
    __shared__ __align__(16) uint16_t q_s[NH * DI];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
    const int32_t t = static_cast<int32_t>(blockIdx.x);
    const int32_t slot = b.slot[t];
    int64_t n_vis = (b.pos[t] + 1) / a.keys.ratio;
    if (n_vis > a.max_rows) n_vis = a.max_rows;
    if (static_cast<int64_t>(blockIdx.y) * kIdxRowsPerCta >= n_vis) return;

    auto q_chunk = [](int h, int c) { return h * DI + ((DI >= 64 ? c ^ ((h & 1) << 2) : c) << 3); };
    for (int i = tid; i < NH * kChunks; i += kIdxThreads) {
        const int h = i / kChunks, c = i % kChunks;
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(a.q + (static_cast<int64_t>(t) * NH + h) * DI) + c);
        *reinterpret_cast<uint4*>(q_s + q_chunk(h, c)) = v;
    }
    float wr[kNT][2];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const float wv = a.w[static_cast<int64_t>(t) * NH + nt * 8 + 2 * tig + i];
            if constexpr (kOfficial) wr[nt][i] = nm::bf16_round(__fmul_rn(nm::bf16_round(wv), a.w_scale));
            else wr[nt][i] = wv * a.w_scale;
        }
    }
    __syncthreads();

    float* const out = a.scores + static_cast<int64_t>(t) * a.max_rows;
    for (int64_t blk = blockIdx.y; blk * kIdxRowsPerCta < n_vis; blk += gridDim.y) {
        const int64_t r0 = blk * kIdxRowsPerCta + warp * kIdxRowsPerWarp;
        // Rows r0 + g + 8·rr (rr = 0, 1: m-tile 0 rows g, g+8; rr = 2, 3: m-tile 1).
        uint4 ka[4][kPairs];
#pragma unroll
        for (int rr = 0; rr < 4; ++rr) {
            const int64_t row = r0 + g + 8 * rr;
            if (row < n_vis) {
                const uint4* src = reinterpret_cast<const uint4*>(a.keys.row<const uint16_t>(slot, row));
#pragma unroll
                for (int pp = 0; pp < kPairs; ++pp) ka[rr][pp] = __ldg(src + 4 * pp + tig);
            } else {
#pragma unroll
                for (int pp = 0; pp < kPairs; ++pp) ka[rr][pp] = make_uint4(0, 0, 0, 0);
            }
        }
        float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        float acc = 0.0f;   // official: the score sum of row r0 + g + 8·tig
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
            float c[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
            for (int pp = 0; pp < kPairs; ++pp) {
                const uint4 bq = *reinterpret_cast<const uint4*>(q_s + q_chunk(nt * 8 + g, 4 * pp + tig));
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
                    const uint4& lo = ka[2 * mt][pp];       // row g (+16)
                    const uint4& hi = ka[2 * mt + 1][pp];   // row g + 8 (+16)
                    mma_bf16(c[mt], lo.x, hi.x, lo.y, hi.y, bq.x, bq.y);
                    mma_bf16(c[mt], lo.z, hi.z, lo.w, hi.w, bq.z, bq.w);
                }
            }
            if constexpr (kOfficial) {
                // bf16 bits of one term: bf16(max(bf16(dot), 0) · w).
                auto term = [](float dot, float wv) {
                    const float d = nm::bf16_round(dot);
                    const float l = d < 0.0f ? 0.0f : d;
                    return __float_as_uint(nm::bf16_round(__fmul_rn(l, wv))) >> 16;
                };
                uint32_t pk[4];   // row rr: heads 2·tig (low half), 2·tig + 1 (high half) of the tile
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
                    pk[2 * mt] = term(c[mt][0], wr[nt][0]) | (term(c[mt][1], wr[nt][1]) << 16);
                    pk[2 * mt + 1] = term(c[mt][2], wr[nt][0]) | (term(c[mt][3], wr[nt][1]) << 16);
                }
                uint32_t from[4] = {0u, 0u, 0u, 0u};   // from[s]: quad lane s's pair for row tig
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const int want = (tig - k) & 3, src = (tig + k) & 3;
                    uint32_t give = pk[0];
#pragma unroll
                    for (int rr = 1; rr < 4; ++rr) give = want == rr ? pk[rr] : give;
                    const uint32_t got = __shfl_sync(0xFFFFFFFFu, give, (lane & ~3) | src);
#pragma unroll
                    for (int s2 = 0; s2 < 4; ++s2) from[s2] = src == s2 ? got : from[s2];
                }
#pragma unroll
                for (int s2 = 0; s2 < 4; ++s2) {
                    acc = __fadd_rn(acc, __uint_as_float(from[s2] << 16));
                    acc = __fadd_rn(acc, __uint_as_float(from[s2] & 0xFFFF0000u));
                }
            } else {
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
                    part[2 * mt] = fmaf(fmaxf(c[mt][0], 0.0f) * scale, wr[nt][0], part[2 * mt]);
                    part[2 * mt] = fmaf(fmaxf(c[mt][1], 0.0f) * scale, wr[nt][1], part[2 * mt]);
                    part[2 * mt + 1] = fmaf(fmaxf(c[mt][2], 0.0f) * scale, wr[nt][0], part[2 * mt + 1]);
                    part[2 * mt + 1] = fmaf(fmaxf(c[mt][3], 0.0f) * scale, wr[nt][1], part[2 * mt + 1]);
                }
            }
        }
        float mine;
        if constexpr (kOfficial) {
            mine = nm::bf16_round(acc);
        } else {
#pragma unroll
            for (int rr = 0; rr < 4; ++rr) {
                part[rr] += __shfl_xor_sync(0xFFFFFFFFu, part[rr], 1);
                part[rr] += __shfl_xor_sync(0xFFFFFFFFu, part[rr], 2);
            }
            // part[rr] is row r0 + g + 8·rr in every lane of the quad; lane tig stores rr = tig.
            mine = part[0];
#pragma unroll
            for (int rr = 1; rr < 4; ++rr)
                if (tig == rr) mine = part[rr];
        }
        const int64_t row = r0 + g + 8 * tig;
        if (row < n_vis) out[row] = mine;
    }
}

// ---------------------------------------------------------------------------- top-k

// Order-preserving map f32 → u32 (larger float, larger key); −0 maps with +0 (they compare equal).
__device__ __forceinline__ uint32_t order_key(float f) {
    uint32_t u = __float_as_uint(f);
    if (u == 0x80000000u) u = 0;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive prefix sum of v over the 1024 threads (thread order); total → every thread.
__device__ __forceinline__ uint32_t block_scan(uint32_t v, uint32_t* warp_sums, uint32_t& total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    uint32_t x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const uint32_t y = __shfl_up_sync(0xFFFFFFFFu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) warp_sums[warp] = x;
    __syncthreads();
    if (warp == 0) {
        uint32_t w = warp_sums[lane];
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const uint32_t y = __shfl_up_sync(0xFFFFFFFFu, w, o);
            if (lane >= o) w += y;
        }
        warp_sums[lane] = w;
    }
    __syncthreads();
    const uint32_t before = warp == 0 ? 0u : warp_sums[warp - 1];
    total = warp_sums[31];
    __syncthreads();   // warp_sums may be reused
    return before + x - v;
}

// Per row t: the k largest of scores[t, 0 .. n) (ties to the lower index), ascending, −1 past
// min(k, n). n = n_rows[t], or (pos[t] + 1) / ratio when n_rows is null; clamped to [0, stride].
// Radix select of the k-th largest key over the order-preserving bit patterns, 11 + 11 + 10 bits
// (shared histograms; their counts do not depend on the atomics' order), then one ordered pass:
// element i is taken if its key > τ, or == τ and fewer than `need` equal keys precede it; its output
// slot is the number of taken elements before it (a block scan of the (greater, equal) counts).
// kCache: the row is first copied into shared memory (stride ≤ kTopkCacheFloats), so the four
// passes read global memory once.
template <bool kCache>
__global__ void __launch_bounds__(kTopkThreads)
topk_kernel(const float* scores, int64_t stride, const int32_t* n_rows, const int32_t* pos, int32_t ratio, int32_t k,
            int32_t* out) {
    pdl_begin();
    extern __shared__ float row_cache[];
    __shared__ uint32_t hist[2048];
    __shared__ uint32_t warp_sums[32];
    __shared__ uint32_t sel_digit, sel_above;
    constexpr int kU = 4;   // loads in flight per thread
    const int tid = threadIdx.x;
    const int64_t t = blockIdx.x;
    int64_t n = n_rows ? n_rows[t] : (pos[t] + 1) / ratio;
    if (n > stride) n = stride;
    if (n < 0) n = 0;
    int32_t* o = out + t * k;
    if (n <= k) {
        for (int i = tid; i < k; i += kTopkThreads) o[i] = i < n ? i : -1;
        return;
    }
    const float* row = scores + t * stride;
    if constexpr (kCache) {
        int64_t i = tid;
        for (; i + (kU - 1) * kTopkThreads < n; i += kU * kTopkThreads) {
            float v[kU];
#pragma unroll
            for (int u = 0; u < kU; ++u) v[u] = row[i + u * kTopkThreads];
#pragma unroll
            for (int u = 0; u < kU; ++u) row_cache[i + u * kTopkThreads] = v[u];
        }
        for (; i < n; i += kTopkThreads) row_cache[i] = row[i];
        __syncthreads();
        row = row_cache;
    }
    uint32_t prefix = 0, pmask = 0, rem = static_cast<uint32_t>(k);
    constexpr int kShift[3] = {21, 10, 0}, kBits[3] = {11, 11, 10};
#pragma unroll
    for (int pass = 0; pass < 3; ++pass) {
        const int nb = 1 << kBits[pass], sh = kShift[pass];
        for (int i = tid; i < nb; i += kTopkThreads) hist[i] = 0;
        __syncthreads();
        int64_t i = tid;
        for (; i + (kU - 1) * kTopkThreads < n; i += kU * kTopkThreads) {
            uint32_t key[kU];
#pragma unroll
            for (int u = 0; u < kU; ++u) key[u] = order_key(row[i + u * kTopkThreads]);
#pragma unroll
            for (int u = 0; u < kU; ++u)
                if ((key[u] & pmask) == prefix) atomicAdd(&hist[(key[u] >> sh) & (nb - 1)], 1u);
        }
        for (; i < n; i += kTopkThreads) {
            const uint32_t key = order_key(row[i]);
            if ((key & pmask) == prefix) atomicAdd(&hist[(key >> sh) & (nb - 1)], 1u);
        }
        __syncthreads();
        // Thread i holds digits nb−1−2i and nb−2−2i (descending digit order across threads).
        const int r0 = 2 * tid, r1 = 2 * tid + 1;
        const uint32_t c0 = r0 < nb ? hist[nb - 1 - r0] : 0u, c1 = r1 < nb ? hist[nb - 1 - r1] : 0u;
        uint32_t total;
        const uint32_t above = block_scan(c0 + c1, warp_sums, total);
        if (r0 < nb && above < rem && rem <= above + c0) {
            sel_digit = static_cast<uint32_t>(nb - 1 - r0);
            sel_above = above;
        }
        if (r1 < nb && above + c0 < rem && rem <= above + c0 + c1) {
            sel_digit = static_cast<uint32_t>(nb - 1 - r1);
            sel_above = above + c0;
        }
        __syncthreads();
        rem -= sel_above;
        prefix |= sel_digit << sh;
        pmask |= static_cast<uint32_t>(nb - 1) << sh;
        __syncthreads();   // sel_* and hist are rewritten by the next pass
    }
    const uint32_t tau = prefix, need = rem;   // `need` (≥ 1) keys equal to τ are taken, the lowest first
    uint32_t gt_run = 0, eq_run = 0;
    for (int64_t base = 0; base < n; base += kTopkThreads) {
        const int64_t i = base + tid;
        const uint32_t key = i < n ? order_key(row[i]) : 0u;
        const bool gt = i < n && key > tau, eq = i < n && key == tau;
        uint32_t total;
        const uint32_t ex = block_scan((gt ? 0x10000u : 0u) | (eq ? 1u : 0u), warp_sums, total);
        const uint32_t gt_before = gt_run + (ex >> 16), eq_before = eq_run + (ex & 0xFFFFu);
        if (gt || (eq && eq_before < need)) o[gt_before + min(eq_before, need)] = static_cast<int32_t>(i);
        gt_run += total >> 16;
        eq_run += total & 0xFFFFu;
        if (gt_run + min(eq_run, need) >= static_cast<uint32_t>(k)) break;
    }
}

// ---------------------------------------------------------------------------- host helpers

// Whether clusters of `splits` CTAs of this kernel (with `smem` bytes each) can be resident.
bool cluster_fits(const void* kernel, int splits, size_t smem) {
    static std::mutex m;
    static std::map<std::tuple<int, const void*, int, size_t>, bool> cache;
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    std::lock_guard<std::mutex> lk(m);
    const auto key = std::make_tuple(dev, kernel, splits, smem);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(splits), 1, 1);
    cfg.blockDim = dim3(kAttnThreads);
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(splits);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    const cudaError_t err = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg);
    if (err != cudaSuccess) (void)cudaGetLastError();
    const bool ok = err == cudaSuccess && clusters > 0;
    cache[key] = ok;
    return ok;
}

template <typename... KArgs, typename... Args>
void launch(const char* what, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, int cluster_x,
            cudaStream_t stream, Args... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[2];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    int n = 1;
    if (cluster_x > 0) {
        attr[1].id = cudaLaunchAttributeClusterDimension;
        attr[1].val.clusterDim.x = static_cast<unsigned>(cluster_x);
        attr[1].val.clusterDim.y = 1;
        attr[1].val.clusterDim.z = 1;
        n = 2;
    }
    cfg.attrs = attr;
    cfg.numAttrs = n;
    const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...);
    if (err != cudaSuccess) {
        (void)cudaGetLastError();   // a refused launch is not sticky; leave no error behind
        fail(__FILE__, ":", __LINE__, ": ", what, " launch (grid ", grid.x, "x", grid.y, ", cluster ", cluster_x,
             ", smem ", smem, "): ", cudaGetErrorString(err));
    }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

void check_batch(const BatchView& b, const char* op) {
    MEGAMOE_CHECK(b.T >= 0 && b.C >= 0, op, ": batch T = ", b.T, ", C = ", b.C);
    if (b.T == 0) return;
    MEGAMOE_CHECK(b.C >= 1 && b.pos && b.slot && b.chunk && b.chunk_first && b.chunk_len, op,
                  ": batch arrays missing (T = ", b.T, ", C = ", b.C, ")");
}

void check_paged(const PagedRows& r, const char* op, const char* name) {
    MEGAMOE_CHECK(r.pool && r.block_table && r.max_blocks > 0 && r.block_tokens > 0 && r.ratio > 0 &&
                      r.block_tokens % r.ratio == 0,
                  op, ": ", name, " paged rows (pool ", r.pool, ", table ", r.block_table, ", max_blocks ",
                  r.max_blocks, ", block_tokens ", r.block_tokens, ", ratio ", r.ratio, ")");
    MEGAMOE_CHECK(aligned16(r.pool) && r.block_bytes % 16 == 0 && r.layer_offset % 16 == 0 && r.layer_offset >= 0 &&
                      r.stride() % 16 == 0 &&
                      r.block_bytes >= r.layer_offset + static_cast<int64_t>(r.rows_per_block()) * r.stride(),
                  op, ": ", name, " paged rows: pool, block_bytes (", r.block_bytes, ") and layer_offset (",
                  r.layer_offset, ") and rows (", r.stride(), " bytes) must be 16-byte aligned and hold ",
                  r.rows_per_block(), " rows of ", r.dim);
}

template <int D> void launch_attention(const AttentionArgs& a, const BatchView& b, cudaStream_t stream) {
    const int64_t wide_blocks = (a.heads + kWideHeads - 1) / kWideHeads;
    if (attention_wide(a.heads, b.T, sm_count(), a.wide)) {
        auto* kernel = sparse_attention_wide_kernel<D>;
        const size_t smem = WideLayout<D>::bytes(a.topk ? a.topk_k : 0);
        raise_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
        MEGAMOE_CHECK(b.T <= 0x7FFFFFFF && wide_blocks <= 65535, "sparse_attention: T = ", b.T, ", heads = ", a.heads,
                      " too large");
        launch("sparse_attention (64 heads per CTA)", kernel,
               dim3(static_cast<unsigned>(b.T), static_cast<unsigned>(wide_blocks)), dim3(kAttnThreads), smem, 0, stream,
               a, b);
        return;
    }
    auto* kernel = sparse_attention_kernel<D>;
    const size_t smem = AttnLayout<D>::bytes(a.topk ? a.topk_k : 0);
    raise_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
    const int64_t head_blocks = (a.heads + kHeadsPerCta - 1) / kHeadsPerCta;
    const int64_t ctas = static_cast<int64_t>(b.T) * head_blocks;
    // Key tiles a query can have at most: its window plus the top-k, or every row its table holds.
    int64_t max_keys = a.window;
    if (a.comp.ratio > 0)
        max_keys += a.topk ? a.topk_k
                           : static_cast<int64_t>(a.comp.max_blocks) * a.comp.block_tokens / a.comp.ratio;
    const int64_t max_tiles = (max_keys + kTileKeys - 1) / kTileKeys;
    // One wave at most (one CTA per SM: the hd = 512 kernel's shared memory and registers allow no
    // more), each split at least one tile (attention_splits).
    int splits = attention_splits(ctas, max_tiles, sm_count(), a.splits);
    while (splits > 1 && !cluster_fits(reinterpret_cast<const void*>(kernel), splits, smem)) splits /= 2;
    const int64_t gx = ctas / head_blocks * splits;
    MEGAMOE_CHECK(gx <= 0x7FFFFFFF, "sparse_attention: T = ", b.T, " too large");
    launch("sparse_attention", kernel, dim3(static_cast<unsigned>(gx), static_cast<unsigned>(head_blocks)),
           dim3(kAttnThreads), smem, splits, stream, a, b, static_cast<int32_t>(splits));
}

// The top-k kernel for rows of `stride` floats: staged in shared memory when they fit.
void launch_topk(const float* scores, int64_t T, int64_t stride, const int32_t* n, const int32_t* pos, int32_t ratio,
                 int32_t k, int32_t* out, cudaStream_t stream) {
    MEGAMOE_CHECK(T <= 0x7FFFFFFF, "top-k: T = ", T, " too large");
    if (stride <= kTopkCacheFloats) {
        const size_t smem = static_cast<size_t>(std::max<int64_t>(stride, 1)) * 4;
        raise_dynamic_smem(reinterpret_cast<const void*>(topk_kernel<true>), smem);
        launch("top-k", topk_kernel<true>, dim3(static_cast<unsigned>(T)), dim3(kTopkThreads), smem, 0, stream, scores,
               stride, n, pos, ratio, k, out);
    } else {
        launch("top-k", topk_kernel<false>, dim3(static_cast<unsigned>(T)), dim3(kTopkThreads), 0, 0, stream, scores,
               stride, n, pos, ratio, k, out);
    }
}

template <int NH, int DI> void launch_indexer(const IndexerArgs& a, const BatchView& b, float scale, cudaStream_t stream) {
    const int64_t blocks = (a.max_rows + kIdxRowsPerCta - 1) / kIdxRowsPerCta;
    const int64_t want = (4LL * sm_count() + b.T - 1) / b.T;   // ~4 CTAs per SM at small T
    const int64_t gy = std::max<int64_t>(1, std::min<int64_t>({blocks, want, 65535}));
    const dim3 grid(static_cast<unsigned>(b.T), static_cast<unsigned>(gy));
    if (a.numerics == Numerics::official)
        launch("indexer scores", indexer_scores_kernel<NH, DI, true>, grid, dim3(kIdxThreads), 0, 0, stream, a, b, scale);
    else
        launch("indexer scores", indexer_scores_kernel<NH, DI, false>, grid, dim3(kIdxThreads), 0, 0, stream, a, b, scale);
}

}  // namespace

// ---------------------------------------------------------------------------- launchers

void sparse_attention(const AttentionArgs& a, const BatchView& b, CUstream_st* stream) {
    check_batch(b, "sparse_attention");
    MEGAMOE_CHECK(a.heads > 0, "sparse_attention: heads = ", a.heads);
    MEGAMOE_CHECK(a.splits == 0 || a.splits == 1 || a.splits == 2 || a.splits == 4 || a.splits == kMaxSplits,
                  "sparse_attention: splits = ", a.splits, " (0: by size, or 1, 2, 4, 8)");
    MEGAMOE_CHECK(a.head_dim == 64 || a.head_dim == 128 || a.head_dim == 256 || a.head_dim == 512,
                  "sparse_attention: head_dim ", a.head_dim, " (supported: 64, 128, 256, 512)");
    MEGAMOE_CHECK(a.window > 0, "sparse_attention: window = ", a.window);
    MEGAMOE_CHECK(a.ring_rows == 0 || a.ring_rows >= a.window, "sparse_attention: a ring of ", a.ring_rows,
                  " rows for a window of ", a.window);
    MEGAMOE_CHECK(a.rope.rope_dim >= 0 && a.rope.rope_dim % 2 == 0 && a.rope.rope_dim <= a.head_dim &&
                      (a.rope.rope_dim == 0 || a.rope.inv_freq),
                  "sparse_attention: rope_dim ", a.rope.rope_dim, " (even, ≤ head_dim ", a.head_dim, ", with a table)");
    MEGAMOE_CHECK(a.comp.ratio >= 0, "sparse_attention: comp.ratio = ", a.comp.ratio);
    if (a.kv_fp8)
        MEGAMOE_CHECK(KvRow::fp8_fits(a.head_dim, a.rope.rope_dim), "sparse_attention: fp8 KV rows of head_dim ",
                      a.head_dim, " with rope_dim ", a.rope.rope_dim,
                      " (needs head_dim - rope_dim a multiple of 16, rope_dim of 8)");
    if (a.comp.ratio > 0) {
        MEGAMOE_CHECK(a.comp.dim == a.head_dim, "sparse_attention: compressed rows of ", a.comp.dim,
                      " elements, head_dim ", a.head_dim);
        check_paged(a.comp, "sparse_attention", "comp");
        const KvRow f{a.head_dim, a.rope.rope_dim, a.kv_fp8};
        MEGAMOE_CHECK(a.comp.stride() == f.bytes(), "sparse_attention: compressed rows of ", a.comp.stride(),
                      " bytes, a ", a.kv_fp8 ? "fp8" : "bf16", " KV row is ", f.bytes());
        if (a.topk)
            MEGAMOE_CHECK(a.topk_k > 0 && a.topk_k <= kMaxTopk, "sparse_attention: topk_k = ", a.topk_k, " (1 .. ",
                          kMaxTopk, ")");
    }
    if (b.T == 0) return;
    MEGAMOE_CHECK(a.q && a.kv && a.out && a.sink && a.ring.base, "sparse_attention: null q, kv, out, sink or ring");
    MEGAMOE_CHECK(aligned16(a.q) && aligned16(a.kv) && aligned16(a.ring.base) && a.ring.slot_stride % 16 == 0 &&
                      (reinterpret_cast<uintptr_t>(a.out) & 3u) == 0,
                  "sparse_attention: q, kv, ring (base and slot_stride) must be 16-byte aligned, out 4-byte aligned");
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    switch (a.head_dim) {
        case 64: launch_attention<64>(a, b, s); break;
        case 128: launch_attention<128>(a, b, s); break;
        case 256: launch_attention<256>(a, b, s); break;
        case 512: launch_attention<512>(a, b, s); break;
        default: break;
    }
}

void indexer_topk(const IndexerArgs& a, const BatchView& b, CUstream_st* stream) {
    check_batch(b, "indexer_topk");
    MEGAMOE_CHECK((a.heads == 8 || a.heads == 16 || a.heads == 32 || a.heads == 64) &&
                      (a.head_dim == 32 || a.head_dim == 64 || a.head_dim == 128),
                  "indexer_topk: heads ", a.heads, " × head_dim ", a.head_dim,
                  " (supported: heads 8, 16, 32, 64; head_dim 32, 64, 128)");
    MEGAMOE_CHECK(a.keys.dim == a.head_dim, "indexer_topk: key rows of ", a.keys.dim, " elements, head_dim ",
                  a.head_dim);
    check_paged(a.keys, "indexer_topk", "keys");
    MEGAMOE_CHECK(a.k >= 0 && a.max_rows >= 0, "indexer_topk: k = ", a.k, ", max_rows = ", a.max_rows);
    if (b.T == 0 || a.k == 0) return;
    MEGAMOE_CHECK(a.q && a.w && a.scores && a.topk, "indexer_topk: null q, w, scores or topk");
    MEGAMOE_CHECK(aligned16(a.q), "indexer_topk: q must be 16-byte aligned");
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (a.max_rows > 0) {
        const float scale = 1.0f / std::sqrt(static_cast<float>(a.head_dim));   // as ops::indexer_scores
#define MEGAMOE_IDX_CASE(NH, DI) \
    if (a.heads == NH && a.head_dim == DI) launch_indexer<NH, DI>(a, b, scale, s);
        MEGAMOE_IDX_CASE(8, 32) MEGAMOE_IDX_CASE(8, 64) MEGAMOE_IDX_CASE(8, 128)
        MEGAMOE_IDX_CASE(16, 32) MEGAMOE_IDX_CASE(16, 64) MEGAMOE_IDX_CASE(16, 128)
        MEGAMOE_IDX_CASE(32, 32) MEGAMOE_IDX_CASE(32, 64) MEGAMOE_IDX_CASE(32, 128)
        MEGAMOE_IDX_CASE(64, 32) MEGAMOE_IDX_CASE(64, 64) MEGAMOE_IDX_CASE(64, 128)
#undef MEGAMOE_IDX_CASE
    }
    launch_topk(a.scores, b.T, a.max_rows, nullptr, b.pos, a.keys.ratio, a.k, a.topk, s);
}

void topk_rows(const float* scores, int64_t T, int64_t stride, const int32_t* n, int32_t k, int32_t* out,
               CUstream_st* stream) {
    MEGAMOE_CHECK(T >= 0 && stride >= 0 && k >= 0, "topk_rows: T = ", T, ", stride = ", stride, ", k = ", k);
    if (T == 0 || k == 0) return;
    MEGAMOE_CHECK(n && out && (scores || stride == 0), "topk_rows: null scores, n or out");
    launch_topk(scores, T, stride, n, nullptr, 1, k, out, reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace megamoe::cuda
