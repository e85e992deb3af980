// sampler.cu — token sampling on the GPU (see sampler.h; the definition and the CPU twin are in
// serve/sampler.{h,cpp}).
//
// One CTA of 512 threads per row. Every pass streams the row from global memory (L2) in chunks
// of 128 ids (a warp reads a chunk as one float4 per lane; chunks are dealt to the warps
// round-robin); nothing is sorted but small candidate sets in shared memory. With scratch and
// few rows (sample_parts), pass A runs first over parts of each row in CTAs of their own
// (row_stats_kernel) and the row's CTA merges their statistics (exactly: the same bits).
//   A. max m (its lowest id: the greedy token), min, number of valid and of +inf logits.
//   B. Each cut of the ranking (top-n logprobs, top-k, top-p) is a rank position found by
//      select_cut: a histogram of the candidates over 2048 value buckets, floor((m - x) · 2048 /
//      min(m - min, 64)) clamped to the last bucket (monotone in x, so a bucket is a run of the
//      rank order; an outlier far below the max does not coarsen them), of counts and of fixed-
//      point weight W; a scan finds the bucket where the running count / mass reaches the target;
//      its tokens (at most kCap, else see below) are compacted into shared memory, sorted by rank
//      and scanned for the exact position. A cut is the rank key (~key(x) << 32 | id) of its last
//      token: token i is inside when its key is <= the cut.
//      Fallback for a crossing bucket with more than kCap tokens (many equal logits, or
//      degenerate ranges): an exact radix select on the 32-bit order-preserving key of the f32
//      logit (3 passes, 11 + 11 + 10 bits, restricted to the bucket), then, for ties on the
//      crossing key, a search in id order for the j-th tied token.
//   D. The draw: per-chunk sums of the kept W (exact u64), their total M, t = floor(x M / 2^53),
//      a scan over the chunk sums for the chunk where the running sum passes t, and one warp
//      walks that chunk. The same pass accumulates the logprob normalizer and collects the top-n.
// Determinism: histograms and chunk sums are integer sums (atomics on integers give the same bits
// in any order); compaction order does not matter because the candidates are sorted by a total
// order; the only floating-point reduction (the logprob normalizer, in double) runs in a fixed
// order. The twin's agreement: the weights use only correctly rounded f32 operations spelled with
// __fmul_rn / __fadd_rn (no FMA contraction), the same operations as sampling_exp /
// sampling_weight in serve/sampler.cpp, so W has the CPU's bits and the drawn token is the CPU's.
//
// Logprobs: lse = m + log(Σ expf(x - m)) with the accurate expf (<= 2 ulp) summed in double; the
// twin sums exp in double. The normalizer thus differs by <= 2.4e-7 relative, lse by <= 2.4e-7
// absolute, and each logprob (rounded to f32 from double on both sides) by that plus one f32
// rounding.
#include "cuda/sampler.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "core/common.h"
#include "cuda/device_info.h"
#include "cuda/row_kernels.cuh"

namespace megamoe::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kBuckets = 2048;     // value buckets; also the radix digit histogram (<= 11 bits) and chunk sums
constexpr int kCap = 2048;         // crossing-bucket tokens sorted in shared memory
constexpr float kBucketWindow = 64.0f;   // logit range below the max that the value buckets resolve
constexpr int kChunkIds = 128;     // ids per chunk: 32 lanes × float4
constexpr uint64_t kNoCut = ~0ull; // every token inside
constexpr unsigned kFull = 0xffffffffu;
static_assert(kMaxSampleVocab <= int64_t{kBuckets} * kChunkIds, "chunk sums live in the bucket array");

struct PartStats;
struct SampleArgs {
    const float* logits;   // [R, V]
    int V;
    SampleParams p;
    SampleOutputs o;
    SpecCheck check;       // q_row null: no checks
    const PartStats* part = nullptr;   // [R, parts]: pass A by row_stats_kernel (parts > 0)
    int parts = 0;
};

using u128 = unsigned __int128;

struct alignas(16) Smem {
    uint64_t mass[kBuckets];          // bucket / digit masses; per-chunk sums in id-order searches
    uint64_t cand[kCap];              // crossing-bucket candidates as rank keys, sorted
                                      // (mass and cand together: u128 per-chunk sums, wide())
    u128 wscan[kWarps];               // u128 block scan / sum scratch
    uint32_t cnt[kBuckets];           // bucket / digit counts
    uint64_t scan[kWarps];            // block scan / sum scratch
    double dsum[kWarps];
    float red_m[kWarps], red_mn[kWarps];
    int red_id[kWarps], red_nv[kWarps], red_ni[kWarps];
    uint64_t top[kMaxTopLogprobs];    // top-n rank keys
    int n_cand, n_top, found, pick;
    uint64_t found_before;
    u128 wfound_before;
    // kBuckets u128 entries over mass and cand (free once the cuts are found).
    __device__ u128* wide() { return reinterpret_cast<u128*>(mass); }
};
static_assert(kCap == kBuckets && offsetof(Smem, cand) == sizeof(uint64_t) * kBuckets, "wide() spans mass and cand");

// The row as every pass reads it, and the per-row constants of the definition.
struct Row {
    const float* x;
    int V;
    bool vec;       // 16-byte aligned: float4 loads
    float m;        // largest valid logit
    bool inf_max;   // m == +inf: the candidates are the +inf ids, each weighing 1
    float r;        // 1 / T
    float two_s;    // 2^S
    float scale;    // value buckets: floor((m - x) · scale); 0: a single bucket
};

// ------------------------------------------------------------------------------------------------
// The definition's arithmetic (twins of serve/sampler.cpp)

__device__ __forceinline__ uint64_t sampling_bits(uint64_t seed, int64_t index, uint32_t stream) {
    constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
    const uint64_t i = static_cast<uint64_t>(index);
    uint32_t c0 = static_cast<uint32_t>(i), c1 = static_cast<uint32_t>(i >> 32), c2 = stream, c3 = 0;
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += kW0;
            k1 += kW1;
        }
        const uint32_t hi0 = __umulhi(kM0, c0), lo0 = kM0 * c0;
        const uint32_t hi1 = __umulhi(kM1, c2), lo1 = kM1 * c2;
        const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
    }
    return ((static_cast<uint64_t>(c0) << 32) | c1) >> 11;
}

// sampling_exp: every operation rounded on its own (no contraction into FMA).
__device__ __forceinline__ float sampling_exp(float x) {
    if (!(x >= -80.0f)) return 0.0f;
    const float k = __fmul_rn(x, 1.44269504088896341f);
    const float n = __fsub_rn(__fadd_rn(k, 12582912.0f), 12582912.0f);
    float r = __fsub_rn(x, __fmul_rn(n, 0.693359375f));
    r = __fsub_rn(r, __fmul_rn(n, -2.12194440e-4f));
    const float z = __fmul_rn(r, r);
    float p = 1.9875691500e-4f;
    p = __fadd_rn(__fmul_rn(p, r), 1.3981999507e-3f);
    p = __fadd_rn(__fmul_rn(p, r), 8.3334519073e-3f);
    p = __fadd_rn(__fmul_rn(p, r), 4.1665795894e-2f);
    p = __fadd_rn(__fmul_rn(p, r), 1.6666665459e-1f);
    p = __fadd_rn(__fmul_rn(p, r), 5.0000001201e-1f);
    const float y = __fadd_rn(__fadd_rn(__fmul_rn(p, z), r), 1.0f);
    return __fmul_rn(y, __uint_as_float(static_cast<uint32_t>(static_cast<int>(n) + 127) << 23));
}

// w of a candidate x (step 4 of the definition).
__device__ __forceinline__ float weight(const Row& w, float x) {
    if (w.inf_max) return 1.0f;
    const float d = __fsub_rn(x, w.m);
    if (d == 0.0f) return 1.0f;
    return sampling_exp(__fmul_rn(d, w.r));
}
__device__ __forceinline__ uint64_t fixed_point(const Row& w, float wt) { return __float2ull_rz(__fmul_rn(wt, w.two_s)); }

// ceil(p · K) for p in (0, 1], exactly (serve/sampler.cpp ceil_mul).
__device__ __forceinline__ uint64_t ceil_mul(float p, uint64_t K) {
    const uint32_t b = __float_as_uint(p);
    const uint32_t e = (b >> 23) & 0xFFu;
    const uint64_t mant = e == 0 ? (b & 0x7FFFFFu) : ((b & 0x7FFFFFu) | 0x800000u);
    const int s = e == 0 ? 149 : 150 - static_cast<int>(e);
    const unsigned __int128 prod = static_cast<unsigned __int128>(mant) * K;
    if (s >= 127) return prod != 0 ? 1 : 0;
    const uint64_t q = static_cast<uint64_t>(prod >> s);
    const bool rem = (prod & ((static_cast<unsigned __int128>(1) << s) - 1)) != 0;
    return q + (rem ? 1 : 0);
}

__device__ __forceinline__ uint64_t draw_target(uint64_t x, uint64_t M) {
    return static_cast<uint64_t>((static_cast<unsigned __int128>(x) * M) >> 53);
}

// floor(x · b / 2^53) for x < 2^53, b < 2^126 (ref/speculative.cpp mul_shift53).
__device__ __forceinline__ u128 mul_shift53(uint64_t x, u128 b) {
    const uint64_t hi = static_cast<uint64_t>(b >> 64), lo = static_cast<uint64_t>(b);
    return ((static_cast<u128>(x) * hi) << 11) + ((static_cast<u128>(x) * lo) >> 53);
}

// ------------------------------------------------------------------------------------------------
// Ranking keys

// Order-preserving u32 of a valid logit (-0 ranks as +0).
__device__ __forceinline__ uint32_t key_of(float x) {
    const uint32_t u = __float_as_uint(x == 0.0f ? 0.0f : x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float value_of(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}
// Rank key: smaller is better (larger logit, then lower id); unique per id.
__device__ __forceinline__ uint64_t rank_of(float x, int id) {
    return (static_cast<uint64_t>(~key_of(x)) << 32) | static_cast<uint32_t>(id);
}
__device__ __forceinline__ float rank_value(uint64_t rk) { return value_of(~static_cast<uint32_t>(rk >> 32)); }
__device__ __forceinline__ int rank_id(uint64_t rk) { return static_cast<int>(static_cast<uint32_t>(rk)); }

__device__ __forceinline__ bool valid(float x) { return x > -INFINITY; }   // false for -inf and NaN

__device__ __forceinline__ int bucket(const Row& w, float x) {
    if (w.scale == 0.0f) return 0;
    const float b = __fmul_rn(__fsub_rn(w.m, x), w.scale);
    return b >= static_cast<float>(kBuckets - 1) ? kBuckets - 1 : static_cast<int>(b);
}

// ------------------------------------------------------------------------------------------------
// Streaming the row

// Ids 4q .. 4q+3, NaN and ids past V as -inf.
__device__ __forceinline__ void load_quad(const Row& w, int q, float (&a)[4]) {
    const int i = q * 4;
    if (w.vec && i + 3 < w.V) {
        const float4 v = reinterpret_cast<const float4*>(w.x)[q];
        a[0] = v.x;
        a[1] = v.y;
        a[2] = v.z;
        a[3] = v.w;
    } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) a[k] = i + k < w.V ? w.x[i + k] : -INFINITY;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) a[k] = valid(a[k]) ? a[k] : -INFINITY;
}

// f(chunk, first id of the lane's quad, values[4]) for every chunk, by whole warps (chunk is
// warp-uniform, so f may use warp collectives). Each thread sees its ids in increasing order.
// for_each_chunk_in: the chunks [c0, c1) only (row_stats_kernel's part of the row).
template <class F>
__device__ __forceinline__ void for_each_chunk_in(const Row& w, int c0, int nchunks, F&& f) {
    const int lane = static_cast<int>(threadIdx.x & 31), warp = static_cast<int>(threadIdx.x >> 5);
    int c = c0 + warp;
    for (; c + 3 * kWarps < nchunks; c += 4 * kWarps) {
        float a[4][4];
#pragma unroll
        for (int u = 0; u < 4; ++u) load_quad(w, (c + u * kWarps) * 32 + lane, a[u]);
#pragma unroll
        for (int u = 0; u < 4; ++u) f(c + u * kWarps, ((c + u * kWarps) * 32 + lane) * 4, a[u]);
    }
    for (; c < nchunks; c += kWarps) {
        float a[4];
        load_quad(w, c * 32 + lane, a);
        f(c, (c * 32 + lane) * 4, a);
    }
}
template <class F>
__device__ __forceinline__ void for_each_chunk(const Row& w, F&& f) {
    for_each_chunk_in(w, 0, (w.V + kChunkIds - 1) / kChunkIds, static_cast<F&&>(f));
}

// ------------------------------------------------------------------------------------------------
// Block primitives (all threads call them; each starts with a barrier so scratch can be reused)

__device__ __forceinline__ uint64_t warp_sum_u64(uint64_t v) {
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
    return v;
}

__device__ uint64_t block_sum_u64(uint64_t v, Smem& s) {
    v = warp_sum_u64(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) s.scan[threadIdx.x >> 5] = v;
    __syncthreads();
    uint64_t t = 0;
    for (int i = 0; i < kWarps; ++i) t += s.scan[i];
    return t;
}

// Fixed order: butterflies (a + b == b + a, so every lane holds the same bits), then warp order.
__device__ double block_sum_f64(double v, Smem& s) {
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) s.dsum[threadIdx.x >> 5] = v;
    __syncthreads();
    double t = 0.0;
    for (int i = 0; i < kWarps; ++i) t += s.dsum[i];
    return t;
}

// Exclusive prefix sum over the threads in thread order.
__device__ uint64_t block_excl_scan(uint64_t v, Smem& s) {
    const int lane = static_cast<int>(threadIdx.x & 31), warp = static_cast<int>(threadIdx.x >> 5);
    uint64_t incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const uint64_t t = __shfl_up_sync(kFull, incl, o);
        if (lane >= o) incl += t;
    }
    __syncthreads();
    if (lane == 31) s.scan[warp] = incl;
    __syncthreads();
    uint64_t before = 0;
    for (int i = 0; i < warp; ++i) before += s.scan[i];
    return before + incl - v;
}

// The first position e in [0, L) where base + Σ_{e' <= e} val(e') >= target, and in `before` the
// sum ahead of it. Requires base < target <= base + Σ val; returns -1 otherwise. Each thread
// takes ceil(L / kThreads) consecutive positions.
template <class F>
__device__ int block_find(Smem& s, int L, F&& val, uint64_t base, uint64_t target, uint64_t& before) {
    const int per = (L + kThreads - 1) / kThreads;
    const int lo = min(L, static_cast<int>(threadIdx.x) * per), hi = min(L, lo + per);
    uint64_t mine = 0;
    for (int e = lo; e < hi; ++e) mine += val(e);
    __syncthreads();   // every thread has read the previous call's result
    if (threadIdx.x == 0) s.found = -1;
    uint64_t acc = base + block_excl_scan(mine, s);   // its barriers order the reset before the writes below
    for (int e = lo; e < hi; ++e) {
        const uint64_t v = val(e);
        if (acc < target && acc + v >= target) {   // true at exactly one position
            s.found = e;
            s.found_before = acc;
        }
        acc += v;
    }
    __syncthreads();
    before = s.found_before;
    return s.found;
}

// Ascending bitonic sort of a[0, n), n <= kCap (padded with ~0 to a power of two).
__device__ void block_sort(uint64_t* a, int n) {
    int P = 1;
    while (P < n) P <<= 1;
    __syncthreads();
    for (int i = n + static_cast<int>(threadIdx.x); i < P; i += kThreads) a[i] = ~0ull;
    __syncthreads();
    for (int k = 2; k <= P; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = static_cast<int>(threadIdx.x); i < P; i += kThreads) {
                const int l = i ^ j;
                if (l > i) {
                    const uint64_t x = a[i], y = a[l];
                    if ((x > y) == ((i & k) == 0)) {
                        a[i] = y;
                        a[l] = x;
                    }
                }
            }
            __syncthreads();
        }
    }
}

// u128 versions for the residual's sums (ref/speculative.h spec_residual: Σ R < 2^126).
__device__ __forceinline__ u128 shfl_xor_u128(u128 v, int o) {
    const uint64_t lo = __shfl_xor_sync(kFull, static_cast<uint64_t>(v), o);
    const uint64_t hi = __shfl_xor_sync(kFull, static_cast<uint64_t>(v >> 64), o);
    return (static_cast<u128>(hi) << 64) | lo;
}
__device__ __forceinline__ u128 shfl_up_u128(u128 v, int o) {
    const uint64_t lo = __shfl_up_sync(kFull, static_cast<uint64_t>(v), o);
    const uint64_t hi = __shfl_up_sync(kFull, static_cast<uint64_t>(v >> 64), o);
    return (static_cast<u128>(hi) << 64) | lo;
}
__device__ __forceinline__ u128 warp_sum_u128(u128 v) {
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) v += shfl_xor_u128(v, o);
    return v;
}
__device__ u128 block_sum_u128(u128 v, Smem& s) {
    v = warp_sum_u128(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) s.wscan[threadIdx.x >> 5] = v;
    __syncthreads();
    u128 t = 0;
    for (int i = 0; i < kWarps; ++i) t += s.wscan[i];
    return t;
}
__device__ u128 block_excl_scan_u128(u128 v, Smem& s) {
    const int lane = static_cast<int>(threadIdx.x & 31), warp = static_cast<int>(threadIdx.x >> 5);
    u128 incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const u128 t = shfl_up_u128(incl, o);
        if (lane >= o) incl += t;
    }
    __syncthreads();
    if (lane == 31) s.wscan[warp] = incl;
    __syncthreads();
    u128 before = 0;
    for (int i = 0; i < warp; ++i) before += s.wscan[i];
    return before + incl - v;
}

// The first id whose running sum (in id order) of val(x, id) exceeds t, given the per-chunk sums
// of val in s.mass; -1 when the total does not exceed t. Warp 0 walks the chunk found.
template <class F>
__device__ int find_in_id_order(Smem& s, const Row& w, F&& val, uint64_t t) {
    const int nchunks = (w.V + kChunkIds - 1) / kChunkIds;
    uint64_t before = 0;
    const int c = block_find(s, nchunks, [&](int e) { return s.mass[e]; }, 0, t + 1, before);
    if (threadIdx.x < 32) {
        const int lane = static_cast<int>(threadIdx.x);
        if (lane == 0) s.pick = -1;
        __syncwarp();
        if (c >= 0) {
            float a[4];
            const int q = c * 32 + lane, i0 = q * 4;
            load_quad(w, q, a);
            uint64_t v[4], mine = 0;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                v[k] = i0 + k < w.V ? val(a[k], i0 + k) : 0;
                mine += v[k];
            }
            uint64_t incl = mine;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const uint64_t u = __shfl_up_sync(kFull, incl, o);
                if (lane >= o) incl += u;
            }
            uint64_t acc = before + incl - mine;
            if (acc <= t && acc + mine > t) {   // exactly one lane
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    acc += v[k];
                    if (acc > t) {
                        s.pick = i0 + k;
                        break;
                    }
                }
            }
        }
    }
    __syncthreads();
    return s.pick;
}

// ------------------------------------------------------------------------------------------------
// Selection: the cut of the ranking restricted to pred where the running count (by_mass false)
// or Σ W (by_mass true) first reaches the target: count_target, or ceil(top_p · Σ W) over pred.
// Returns the rank key of the token at the cut (tokens with pred and rank key <= it are kept).

template <class P>
__device__ uint64_t select_cut(Smem& s, const Row& w, P&& pred, bool by_mass, uint64_t count_target, float top_p) {
    const int tid = static_cast<int>(threadIdx.x);
    const int V = w.V;
    __syncthreads();
    for (int b = tid; b < kBuckets; b += kThreads) {
        s.cnt[b] = 0;
        s.mass[b] = 0;
    }
    __syncthreads();
    for_each_chunk(w, [&](int, int i0, const float (&a)[4]) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int id = i0 + k;
            if (id < V && pred(a[k], id)) {
                const int b = bucket(w, a[k]);
                atomicAdd(&s.cnt[b], 1u);
                if (by_mass) {
                    const unsigned long long W = fixed_point(w, weight(w, a[k]));
                    if (W != 0) atomicAdd(reinterpret_cast<unsigned long long*>(&s.mass[b]), W);
                }
            }
        }
    });
    __syncthreads();
    uint64_t target = count_target;
    if (by_mass) {
        uint64_t part = 0;
        for (int b = tid; b < kBuckets; b += kThreads) part += s.mass[b];
        const uint64_t K = block_sum_u64(part, s);
        target = top_p > 0.0f ? ceil_mul(top_p, K) : 1;
        if (target == 0) target = 1;
    }
    uint64_t base = 0;
    const int bstar = block_find(
        s, kBuckets, [&](int e) -> uint64_t { return by_mass ? s.mass[e] : s.cnt[e]; }, 0, target, base);
    if (bstar < 0) return kNoCut;   // unreachable: the target never exceeds the total
    const uint32_t in_bucket = s.cnt[bstar];

    if (in_bucket <= static_cast<uint32_t>(kCap)) {
        // The crossing bucket's tokens, sorted by rank.
        if (tid == 0) s.n_cand = 0;
        __syncthreads();
        for_each_chunk(w, [&](int, int i0, const float (&a)[4]) {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int id = i0 + k;
                if (id < V && pred(a[k], id) && bucket(w, a[k]) == bstar) {
                    const int slot = atomicAdd(&s.n_cand, 1);
                    if (slot < kCap) s.cand[slot] = rank_of(a[k], id);
                }
            }
        });
        __syncthreads();
        const int n = min(s.n_cand, kCap);
        block_sort(s.cand, n);
        uint64_t before = 0;
        const int e = block_find(
            s, n,
            [&](int i) -> uint64_t { return by_mass ? fixed_point(w, weight(w, rank_value(s.cand[i]))) : 1; },
            base, target, before);
        return e >= 0 ? s.cand[e] : kNoCut;
    }

    // Fallback: radix select on the key within the bucket, 11 + 11 + 10 bits from the top.
    uint32_t prefix = 0;
    int shift = 32;
    for (int pass = 0; pass < 3; ++pass) {
        const int width = pass < 2 ? 11 : 10, lo_bit = shift - width, L = 1 << width;
        __syncthreads();
        for (int b = tid; b < kBuckets; b += kThreads) {
            s.cnt[b] = 0;
            s.mass[b] = 0;
        }
        __syncthreads();
        for_each_chunk(w, [&](int, int i0, const float (&a)[4]) {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int id = i0 + k;
                if (id < V && pred(a[k], id) && bucket(w, a[k]) == bstar) {
                    const uint32_t key = key_of(a[k]);
                    if ((static_cast<uint64_t>(key) >> shift) == prefix) {
                        const int d = static_cast<int>((key >> lo_bit) & static_cast<uint32_t>(L - 1));
                        atomicAdd(&s.cnt[d], 1u);
                        if (by_mass) {
                            const unsigned long long W = fixed_point(w, weight(w, a[k]));
                            if (W != 0) atomicAdd(reinterpret_cast<unsigned long long*>(&s.mass[d]), W);
                        }
                    }
                }
            }
        });
        __syncthreads();
        uint64_t before = 0;
        const int e = block_find(
            s, L, [&](int i) -> uint64_t { return by_mass ? s.mass[L - 1 - i] : s.cnt[L - 1 - i]; }, base, target,
            before);   // digits from the largest key down: rank order
        if (e < 0) return kNoCut;   // unreachable
        prefix = (prefix << width) | static_cast<uint32_t>(L - 1 - e);
        base = before;
        shift = lo_bit;
    }
    // Every token with this key weighs v; the cut takes the first j of them in id order.
    const uint32_t K = prefix;
    uint64_t v = by_mass ? fixed_point(w, weight(w, value_of(K))) : 1;
    if (v == 0) v = 1;   // unreachable: the target was crossed at this key
    const uint64_t j = (target - base + v - 1) / v;
    auto tied = [&](float x, int id) -> uint64_t { return pred(x, id) && key_of(x) == K ? 1 : 0; };
    __syncthreads();
    for_each_chunk(w, [&](int c, int i0, const float (&a)[4]) {
        uint64_t sum = 0;
#pragma unroll
        for (int k = 0; k < 4; ++k)
            if (i0 + k < V) sum += tied(a[k], i0 + k);
        sum = warp_sum_u64(sum);
        if ((threadIdx.x & 31) == 0) s.mass[c] = sum;
    });
    __syncthreads();
    const int id = find_in_id_order(s, w, tied, j - 1);
    return id >= 0 ? ((static_cast<uint64_t>(~K) << 32) | static_cast<uint32_t>(id)) : kNoCut;
}

// ------------------------------------------------------------------------------------------------

// A row's kept set under its parameters (steps 1-7 of the definition) and the row statistics
// every kernel here starts from.
struct Kept {
    Row w;
    float mn = INFINITY;    // smallest valid logit
    int best = INT_MAX;     // the largest valid logit's lowest id (the greedy token)
    int nv = 0, ni = 0;     // valid ids, +inf ids
    bool greedy = false;
    uint64_t cut = kNoCut;  // rank key of the last id top-k / top-p keep
    float min_p = 0.0f;
    __device__ bool is_cand(float x) const { return w.inf_max ? x == INFINITY : valid(x); }
    // W of a non-greedy row's id (0 when not kept).
    __device__ uint64_t kept_w(float x, int id) const {
        if (!is_cand(x) || (cut != kNoCut && rank_of(x, id) > cut)) return 0;
        const float wt = weight(w, x);
        return wt < min_p ? 0 : fixed_point(w, wt);
    }
};

// Pass A's statistics of a set of ids: the largest valid logit and its lowest id, the smallest,
// the number of valid and of +inf logits. merge is exact and commutative (max / min with the id
// as tie-break, integer sums), so any split of the row and any merge order give the same bits.
struct RowStats {
    float m = -INFINITY, mn = INFINITY;
    int best = INT_MAX, nv = 0, ni = 0;
    __device__ __forceinline__ void fold(int i0, const float (&v)[4]) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            if (!valid(v[k])) continue;   // also ids past V
            ++nv;
            ni += v[k] == INFINITY;
            if (v[k] > m || (v[k] == m && i0 + k < best)) {
                m = v[k];
                best = i0 + k;
            }
            mn = fminf(mn, v[k]);
        }
    }
    __device__ __forceinline__ void merge(float om, float omn, int ob, int onv, int oni) {
        if (om > m || (om == m && ob < best)) {
            m = om;
            best = ob;
        }
        mn = fminf(mn, omn);
        nv += onv;
        ni += oni;
    }
    // The CTA's merge of every thread's stats (all threads call it; all return the same).
    __device__ void block_merge(Smem& s) {
        const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
#pragma unroll
        for (int o = 16; o >= 1; o >>= 1)
            merge(__shfl_xor_sync(kFull, m, o), __shfl_xor_sync(kFull, mn, o), __shfl_xor_sync(kFull, best, o),
                  __shfl_xor_sync(kFull, nv, o), __shfl_xor_sync(kFull, ni, o));
        __syncthreads();   // the previous user of the scratch is done
        if (lane == 0) {
            s.red_m[warp] = m;
            s.red_mn[warp] = mn;
            s.red_id[warp] = best;
            s.red_nv[warp] = nv;
            s.red_ni[warp] = ni;
        }
        __syncthreads();
        *this = RowStats{};
        for (int i = 0; i < kWarps; ++i) merge(s.red_m[i], s.red_mn[i], s.red_id[i], s.red_nv[i], s.red_ni[i]);
    }
};

// A part's stats as row_stats_kernel stores them for sample_kernel (32 bytes).
struct alignas(16) PartStats {
    float m, mn;
    int best, nv, ni, pad[3];
};

// Pass A (max with its lowest id, min, counts) and the cuts of steps 5-6 of row x [V] with the
// parameters (T, top_k, top_p, min_p). nv == 0: no valid id (nothing else is set).
// parts > 0: pass A was done by row_stats_kernel, whose `parts` partial stats of this row are at
// part[0 .. parts); else this CTA streams the row.
__device__ Kept kept_set(Smem& s, const float* x, int V, float T, int top_k, float top_p, float min_p_in,
                         const PartStats* part = nullptr, int parts = 0) {
    Kept K;
    Row& w = K.w;
    w.x = x;
    w.V = V;
    w.vec = (reinterpret_cast<uintptr_t>(w.x) & 15u) == 0;

    RowStats st;
    if (parts > 0) {
        for (int i = static_cast<int>(threadIdx.x); i < parts; i += kThreads) {
            const PartStats ps = part[i];
            st.merge(ps.m, ps.mn, ps.best, ps.nv, ps.ni);
        }
    } else {
        for_each_chunk(w, [&](int, int i0, const float (&v)[4]) { st.fold(i0, v); });
    }
    st.block_merge(s);
    const float m = st.m, mn = st.mn;
    const int best = st.best, nv = st.nv, ni = st.ni;
    K.mn = mn;
    K.best = best;
    K.nv = nv;
    K.ni = ni;
    if (nv == 0) return K;

    K.greedy = !(T > 0.0f) || top_k == 1;
    w.m = m;
    w.inf_max = m == INFINITY;
    const int n_cand = w.inf_max ? ni : nv;
    const int S = __clzll(static_cast<long long>(n_cand)) - 1;   // 63 - bit_width(n_cand)
    w.two_s = __uint_as_float(static_cast<uint32_t>(127 + S) << 23);
    w.r = K.greedy ? 1.0f : __fdiv_rn(1.0f, T);
    w.scale = 0.0f;   // buckets cover [m - min(m - mn, kBucketWindow), m]; lower logits share the last one
    if (!w.inf_max && mn < m) {
        const float range = fminf(__fsub_rn(m, mn), kBucketWindow);
        const float sc = __fdiv_rn(static_cast<float>(kBuckets), range);
        if (isfinite(sc)) w.scale = sc;
    }
    if (!K.greedy) {
        const Kept& C = K;
        if (top_k > 0 && top_k < n_cand)
            K.cut = select_cut(
                s, w, [&](float v, int) { return C.is_cand(v); }, false, static_cast<uint64_t>(top_k), 0.0f);
        if (top_p < 1.0f) {
            const uint64_t ck = K.cut;
            K.cut = select_cut(
                s, w, [&](float v, int id) { return C.is_cand(v) && (ck == kNoCut || rank_of(v, id) <= ck); }, true, 0,
                top_p);
        }
    }
    K.min_p = min_p_in > 0.0f ? fminf(min_p_in, 1.0f) : 0.0f;
    return K;
}

// The standard acceptance rule at row r (spec_accept_rows; twins in ref/speculative.cpp), given
// the row's kept set P (nv > 0): the row's token (the draft when accepted, else the residual
// draw; -1 for a row without a check) and in `acc` 1 when accepted. All threads call it; they all
// return the same.
__device__ int32_t spec_decide(Smem& s, const Kept& P, const SpecCheck& ck, const SampleParams& sp, int64_t r, int V,
                               int32_t& acc) {
    const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
    const int64_t qr = ck.q_row[r];
    const int d = ck.draft[r];
    acc = 0;
    if (qr < 0 || d < 0 || d >= V) return -1;
    if (P.greedy) {   // q is one-hot at the draft: accept the argmax, else take it
        acc = d == P.best ? 1 : 0;
        return P.best;
    }
    const float T = sp.temperature[r], top_p = sp.top_p[r], min_p = sp.min_p[r];
    const int top_k = sp.top_k[r];
    const Kept Q = kept_set(s, ck.q + qr * V, V, T, top_k, top_p, min_p);
    if (Q.nv == 0) return -1;

    // Mp, Mq, and the test x · 2^-53 < (wp / Mp) / (wq / Mq).
    uint64_t part_p = 0, part_q = 0;
    for_each_chunk(P.w, [&](int, int i0, const float (&x)[4]) {
#pragma unroll
        for (int k = 0; k < 4; ++k) part_p += P.kept_w(x[k], i0 + k);   // ids past V load as -inf: 0
    });
    const uint64_t Mp = block_sum_u64(part_p, s);
    for_each_chunk(Q.w, [&](int, int i0, const float (&x)[4]) {
#pragma unroll
        for (int k = 0; k < 4; ++k) part_q += Q.kept_w(x[k], i0 + k);
    });
    const uint64_t Mq = block_sum_u64(part_q, s);
    const uint64_t wp = P.kept_w(P.w.x[d], d), wq = Q.kept_w(Q.w.x[d], d);
    const int64_t index = sp.index[r];
    if (mul_shift53(sampling_bits(sp.seed[r], index, kStreamAccept), static_cast<u128>(Mp) * wq) <
        static_cast<u128>(wp) * Mq) {
        acc = 1;
        return d;
    }

    // Rejected: a draw from R_v = max(0, Wp_v · Mq − Wq_v · Mp), in id order, with u128 sums.
    auto resid = [&](float xp, float xq, int id) -> u128 {
        const u128 pv = static_cast<u128>(P.kept_w(xp, id)) * Mq, qv = static_cast<u128>(Q.kept_w(xq, id)) * Mp;
        return pv > qv ? pv - qv : 0;
    };
    u128* cs = s.wide();   // per-chunk sums
    const int nchunks = (V + kChunkIds - 1) / kChunkIds;
    __syncthreads();       // every reader of mass / cand is done
    for (int c = warp; c < nchunks; c += kWarps) {
        float xp[4], xq[4];
        const int qd = c * 32 + lane;
        load_quad(P.w, qd, xp);
        load_quad(Q.w, qd, xq);
        u128 sum = 0;
#pragma unroll
        for (int k = 0; k < 4; ++k) sum += resid(xp[k], xq[k], qd * 4 + k);
        sum = warp_sum_u128(sum);
        if (lane == 0) cs[c] = sum;
    }
    __syncthreads();
    u128 part = 0;
    for (int c = tid; c < nchunks; c += kThreads) part += cs[c];
    const u128 Mr = block_sum_u128(part, s);
    if (Mr == 0) return -1;   // unreachable: p(d) < q(d) leaves p > q somewhere
    const u128 t = mul_shift53(sampling_bits(sp.seed[r], index, kStreamResidual), Mr);
    // The chunk where the running sum first exceeds t (each thread scans consecutive chunks) ...
    const int per = (nchunks + kThreads - 1) / kThreads;
    const int lo = min(nchunks, tid * per), hi = min(nchunks, lo + per);
    u128 mine = 0;
    for (int e = lo; e < hi; ++e) mine += cs[e];
    if (tid == 0) s.found = -1;
    u128 run_sum = block_excl_scan_u128(mine, s);   // its barriers order the reset before the writes below
    for (int e = lo; e < hi; ++e) {
        const u128 v = cs[e];
        if (run_sum <= t && run_sum + v > t) {   // exactly one chunk
            s.found = e;
            s.wfound_before = run_sum;
        }
        run_sum += v;
    }
    __syncthreads();
    const int found = s.found;
    const u128 before = s.wfound_before;
    // ... and warp 0 walks it.
    if (warp == 0) {
        if (lane == 0) s.pick = -1;
        __syncwarp();
        if (found >= 0) {
            float xp[4], xq[4];
            const int qd = found * 32 + lane;
            load_quad(P.w, qd, xp);
            load_quad(Q.w, qd, xq);
            u128 v[4], sum = 0;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                v[k] = resid(xp[k], xq[k], qd * 4 + k);
                sum += v[k];
            }
            u128 incl = sum;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const u128 up = shfl_up_u128(incl, o);
                if (lane >= o) incl += up;
            }
            u128 run = before + incl - sum;
            if (run <= t && run + sum > t) {   // exactly one lane
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    run += v[k];
                    if (run > t) {
                        s.pick = qd * 4 + k;
                        break;
                    }
                }
            }
        }
    }
    __syncthreads();
    return s.pick;
}

__global__ void __launch_bounds__(kThreads) spec_accept_kernel(SpecAcceptArgs a, int V) {
    rk::pdl_begin();
    __shared__ Smem s;
    const int64_t r = blockIdx.x;
    const SampleParams& sp = a.params;
    int32_t id = -1, acc = 0;
    if (a.check.q_row[r] >= 0) {
        const Kept P = kept_set(s, a.p + r * V, V, sp.temperature[r], sp.top_k[r], sp.top_p[r], sp.min_p[r]);
        if (P.nv > 0) id = spec_decide(s, P, a.check, sp, r, V, acc);   // else sample_rows reports the row
    }
    if (threadIdx.x == 0) {
        a.given[r] = id;
        a.check.accepted[r] = acc;
    }
}


// Pass A over part blockIdx.x of row blockIdx.y: chunks [p·per, min((p + 1)·per, nchunks)).
__global__ void __launch_bounds__(kThreads) row_stats_kernel(const float* logits, int V, int parts, PartStats* out) {
    rk::pdl_begin();
    __shared__ Smem s;
    const int64_t r = blockIdx.y;
    const int p = static_cast<int>(blockIdx.x);
    Row w;
    w.x = logits + r * V;
    w.V = V;
    w.vec = (reinterpret_cast<uintptr_t>(w.x) & 15u) == 0;
    const int nchunks = (V + kChunkIds - 1) / kChunkIds, per = (nchunks + parts - 1) / parts;
    RowStats st;
    for_each_chunk_in(w, p * per, min(nchunks, (p + 1) * per), [&](int, int i0, const float (&v)[4]) { st.fold(i0, v); });
    st.block_merge(s);
    if (threadIdx.x == 0) out[r * parts + p] = PartStats{st.m, st.mn, st.best, st.nv, st.ni, {0, 0, 0}};
}

__global__ void __launch_bounds__(kThreads) sample_kernel(SampleArgs a) {
    rk::pdl_begin();
    __shared__ Smem s;
    const int tid = static_cast<int>(threadIdx.x), lane = tid & 31;
    const int64_t r = blockIdx.x;
    const int V = a.V;
    const Kept K = kept_set(s, a.logits + r * V, V, a.p.temperature[r], a.p.top_k[r], a.p.top_p[r], a.p.min_p[r],
                            a.part + r * a.parts, a.parts);
    const Row& w = K.w;
    const int best = K.best, nv = K.nv, ni = K.ni;
    const float m = w.m;

    const int n_top = a.o.n_top;
    if (nv == 0) {   // nothing to sample: the caller reports the error
        if (tid == 0) {
            a.o.ids[r] = -1;
            if (a.o.logprob) a.o.logprob[r] = -INFINITY;
            if (a.check.q_row) a.check.accepted[r] = 0;
        }
        if (tid < n_top) {
            a.o.top_ids[r * n_top + tid] = -1;
            a.o.top_logprobs[r * n_top + tid] = -INFINITY;
        }
        return;
    }
    int32_t given = a.p.given ? a.p.given[r] : -1;
    if (a.check.q_row) {   // the standard rule first: the checked row's token is its decision
        int32_t acc = 0;
        const int32_t id = spec_decide(s, K, a.check, a.p, r, V, acc);
        if (id >= 0) given = id;
        if (tid == 0) a.check.accepted[r] = acc;
    }
    const bool greedy = K.greedy, inf_max = w.inf_max;
    const bool draw = !greedy && given < 0;

    // B. The top-n logprobs' cut (over every valid id).
    const bool want_lse = a.o.logprob != nullptr || n_top > 0;
    uint64_t cut_n = kNoCut;
    if (n_top > 0 && nv > n_top)
        cut_n = select_cut(s, w, [&](float x, int) { return valid(x); }, false, static_cast<uint64_t>(n_top), 0.0f);
    auto kept_w = [&](float x, int id) -> uint64_t { return K.kept_w(x, id); };

    // D. The draw's chunk sums, the logprob normalizer and the top-n, in one pass.
    if (!draw && !want_lse) {
        if (tid == 0) a.o.ids[r] = given >= 0 ? given : best;
        return;
    }
    __syncthreads();
    if (tid == 0) s.n_top = 0;
    __syncthreads();
    double lsum = 0.0;
    for_each_chunk(w, [&](int c, int i0, const float (&x)[4]) {
        uint64_t sum = 0;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int id = i0 + k;
            if (!valid(x[k])) continue;   // also ids past V
            if (want_lse && !inf_max) lsum += static_cast<double>(expf(__fsub_rn(x[k], m)));
            if (n_top > 0 && (cut_n == kNoCut || rank_of(x[k], id) <= cut_n)) {
                const int slot = atomicAdd(&s.n_top, 1);
                if (slot < kMaxTopLogprobs) s.top[slot] = rank_of(x[k], id);
            }
            if (draw) sum += kept_w(x[k], id);
        }
        if (draw) {
            sum = warp_sum_u64(sum);
            if (lane == 0) s.mass[c] = sum;
        }
    });
    const double lse = want_lse && !inf_max ? static_cast<double>(m) + log(block_sum_f64(lsum, s)) : 0.0;
    int id = given >= 0 ? given : best;
    if (draw) {
        __syncthreads();
        const int nchunks = (V + kChunkIds - 1) / kChunkIds;
        uint64_t part = 0;
        for (int c = tid; c < nchunks; c += kThreads) part += s.mass[c];
        const uint64_t M = block_sum_u64(part, s);
        const uint64_t t = draw_target(sampling_bits(a.p.seed[r], a.p.index[r] + a.p.index_offset, a.p.stream), M);
        id = find_in_id_order(s, w, kept_w, t);
    }

    // Outputs.
    __syncthreads();   // the top-n list is complete
    auto logprob = [&](float x) -> float {
        if (!valid(x)) return -INFINITY;
        if (inf_max) return x == INFINITY ? static_cast<float>(-log(static_cast<double>(ni))) : -INFINITY;
        return static_cast<float>(static_cast<double>(x) - lse);
    };
    if (tid == 0) {
        a.o.ids[r] = id;
        if (a.o.logprob) a.o.logprob[r] = id >= 0 ? logprob(w.x[id]) : -INFINITY;
        if (n_top > 0) {
            const int n = min(s.n_top, kMaxTopLogprobs);
            for (int i = 1; i < n; ++i) {   // insertion sort by rank key (<= 20 entries)
                const uint64_t v = s.top[i];
                int j = i - 1;
                while (j >= 0 && s.top[j] > v) {
                    s.top[j + 1] = s.top[j];
                    --j;
                }
                s.top[j + 1] = v;
            }
            for (int i = 0; i < n_top; ++i) {
                a.o.top_ids[r * n_top + i] = i < n ? rank_id(s.top[i]) : -1;
                a.o.top_logprobs[r * n_top + i] = i < n ? logprob(rank_value(s.top[i])) : -INFINITY;
            }
        }
    }
}

__global__ void __launch_bounds__(256) keep_rows_kernel(const float* src, const int32_t* rows, const int32_t* slot,
                                                        int64_t V, int32_t k, int32_t per_slot, float* dst) {
    rk::pdl_begin();
    const int64_t i = blockIdx.y;
    const int32_t sl = slot[i];
    if (sl < 0) return;
    const float* from = src + static_cast<int64_t>(rows ? rows[i] : i) * V;
    float* to = dst + (static_cast<int64_t>(sl) * per_slot + k) * V;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * 256;
    for (int64_t v = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x; v < V; v += stride) to[v] = from[v];
}

__global__ void __launch_bounds__(256) mask_kernel(float* logits, int64_t R, int64_t V, const int32_t* ids, int64_t n) {
    rk::pdl_begin();
    const int64_t total = R * n;
    for (int64_t e = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x; e < total;
         e += static_cast<int64_t>(gridDim.x) * 256) {
        const int64_t row = e / n;
        const int32_t id = ids[e - row * n];
        if (id >= 0 && id < V) logits[row * V + id] = -INFINITY;
    }
}

// out[t] = given[t] >= 0 ? given[t] : drawn[-1 - given[t]] (see resolve_next_tokens).
__global__ void __launch_bounds__(256) resolve_next_kernel(const int32_t* given, const int32_t* drawn, int64_t T,
                                                           int32_t* out) {
    rk::pdl_begin();
    for (int64_t t = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x; t < T; t += static_cast<int64_t>(gridDim.x) * 256) {
        const int32_t g = given[t];
        out[t] = g >= 0 ? g : drawn[-1 - static_cast<int64_t>(g)];
    }
}

__global__ void __launch_bounds__(256) chain_inputs_kernel(ChainStepInputs a, int64_t n, int32_t k) {
    rk::pdl_begin();
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x; i < n; i += static_cast<int64_t>(gridDim.x) * 256) {
        const int32_t r = static_cast<int32_t>(i);
        a.tok[i] = 0;
        a.pos[i] = a.start_pos[i] + k;
        a.slot_out[i] = a.slot[i];
        a.chunk[i] = a.first[i] = a.rows[i] = r;
        a.len[i] = 1;
        a.next[i] = a.prev[i];
    }
}

}  // namespace

void sample_rows(const float* logits, int64_t R, int64_t V, const SampleParams& p, const SampleOutputs& o,
                 CUstream_st* stream, const SpecCheck* check, const SampleScratch* scratch) {
    constexpr const char* op = "sample_rows";
    if (R < 0) fail(op, ": R=", R, " is negative");
    if (V < 1 || V > kMaxSampleVocab) fail(op, ": V=", V, " is outside [1, ", kMaxSampleVocab, "]");
    if (o.n_top < 0 || o.n_top > kMaxTopLogprobs)
        fail(op, ": n_top=", o.n_top, " is outside [0, ", kMaxTopLogprobs, "]");
    if (R == 0) return;
    if (!logits || !o.ids) fail(op, ": logits and ids must not be null");
    if (!p.temperature || !p.top_k || !p.top_p || !p.min_p || !p.seed || !p.index)
        fail(op, ": every parameter array (temperature, top_k, top_p, min_p, seed, index) is required");
    if (o.n_top > 0 && (!o.top_ids || !o.top_logprobs))
        fail(op, ": n_top=", o.n_top, " needs top_ids and top_logprobs");
    if (check && (!check->q || !check->q_row || !check->draft || !check->accepted))
        fail(op, ": a draft check needs q, q_row, draft and accepted");
    SampleArgs args{logits, static_cast<int>(V), p, o, check ? *check : SpecCheck{}};
    const int parts = scratch ? sample_parts(R, V, sm_count(), scratch->parts) : 0;
    if (parts > 0) {
        if (!scratch->p || scratch->bytes < sample_scratch_bytes(R, parts))
            fail(op, ": scratch of ", scratch->bytes, " bytes for ", R, " rows of ", parts, " parts (",
                 sample_scratch_bytes(R, parts), " needed)");
        args.part = static_cast<const PartStats*>(scratch->p);
        args.parts = parts;
        rk::launch(row_stats_kernel, dim3(static_cast<unsigned>(parts), rk::grid_dim(R, 65535, op)), dim3(kThreads), 0,
                   stream, logits, static_cast<int>(V), parts, static_cast<PartStats*>(scratch->p));
    }
    rk::launch(sample_kernel, dim3(rk::grid_dim(R, 0x7fffffff, op)), dim3(kThreads), 0, stream, args);
}

int sample_parts(int64_t R, int64_t V, int sms, int parts) {
    const int64_t nchunks = (V + kChunkIds - 1) / kChunkIds;
    if (parts >= 0) return static_cast<int>(std::min<int64_t>({parts, kMaxSampleParts, nchunks}));
    if (R <= 0 || 2 * R >= sms) return 0;   // the rows alone give half a wave of CTAs: one pass each
    const int64_t want = std::min<int64_t>({(2 * static_cast<int64_t>(sms) + R - 1) / R, kMaxSampleParts, nchunks / 8});
    return want >= 2 ? static_cast<int>(want) : 0;
}

size_t sample_scratch_bytes(int64_t R, int parts) {
    return static_cast<size_t>(std::max<int64_t>(R, 0)) * static_cast<size_t>(std::max(parts, 0)) * sizeof(PartStats);
}

void spec_accept_rows(const SpecAcceptArgs& a, int64_t R, int64_t V, CUstream_st* stream) {
    constexpr const char* op = "spec_accept_rows";
    if (R < 0) fail(op, ": R=", R, " is negative");
    if (V < 1 || V > kMaxSampleVocab) fail(op, ": V=", V, " is outside [1, ", kMaxSampleVocab, "]");
    if (R == 0) return;
    if (!a.p || !a.check.q || !a.check.q_row || !a.check.draft || !a.given || !a.check.accepted)
        fail(op, ": p, q, q_row, draft, given and accepted must not be null");
    const SampleParams& p = a.params;
    if (!p.temperature || !p.top_k || !p.top_p || !p.min_p || !p.seed || !p.index)
        fail(op, ": every parameter array (temperature, top_k, top_p, min_p, seed, index) is required");
    rk::launch(spec_accept_kernel, dim3(rk::grid_dim(R, 0x7fffffff, op)), dim3(kThreads), 0, stream, a,
               static_cast<int>(V));
}

void keep_draft_rows(const float* src, const int32_t* rows, const int32_t* slot, int64_t n, int64_t V, int32_t k,
                     int32_t per_slot, float* dst, CUstream_st* stream) {
    constexpr const char* op = "keep_draft_rows";
    if (n < 0 || V < 1 || k < 0 || per_slot < 1 || k >= per_slot)
        fail(op, ": bad shape n=", n, " V=", V, " k=", k, " per_slot=", per_slot);
    if (n == 0) return;
    if (n > 65535) fail(op, ": ", n, " rows, more than 65535");
    if (!src || !slot || !dst) fail(op, ": src, slot and dst must not be null");
    const int64_t bx = std::min<int64_t>((V + 255) / 256, 64);
    rk::launch(keep_rows_kernel, dim3(static_cast<unsigned>(bx), static_cast<unsigned>(n)), dim3(256), 0, stream, src,
               rows, slot, V, k, per_slot, dst);
}

void mask_logits(float* logits, int64_t R, int64_t V, const int32_t* ids, int64_t n, CUstream_st* stream) {
    constexpr const char* op = "mask_logits";
    if (R < 0 || V < 1 || n < 0) fail(op, ": bad shape R=", R, " V=", V, " n=", n);
    if (R == 0 || n == 0) return;
    if (!logits || !ids) fail(op, ": logits and ids must not be null");
    const int64_t blocks = std::min<int64_t>((R * n + 255) / 256, 1024);
    rk::launch(mask_kernel, dim3(static_cast<unsigned>(blocks)), dim3(256), 0, stream, logits, R, V, ids, n);
}

void resolve_next_tokens(const int32_t* given, const int32_t* drawn, int64_t T, int32_t* out, CUstream_st* stream) {
    constexpr const char* op = "resolve_next_tokens";
    if (T < 0) fail(op, ": bad length T=", T);
    if (T == 0) return;
    if (!given || !drawn || !out) fail(op, ": given, drawn and out must not be null");
    const int64_t blocks = std::min<int64_t>((T + 255) / 256, 1024);
    rk::launch(resolve_next_kernel, dim3(static_cast<unsigned>(blocks)), dim3(256), 0, stream, given, drawn, T, out);
}

void chain_step_inputs(const ChainStepInputs& a, int64_t n, int32_t k, CUstream_st* stream) {
    constexpr const char* op = "chain_step_inputs";
    if (n < 0 || k < 1) fail(op, ": n=", n, ", k=", k);
    if (n == 0) return;
    if (!a.start_pos || !a.slot || !a.prev || !a.tok || !a.pos || !a.slot_out || !a.chunk || !a.first || !a.len || !a.rows ||
        !a.next)
        fail(op, ": null array");
    const int64_t blocks = std::min<int64_t>((n + 255) / 256, 1024);
    rk::launch(chain_inputs_kernel, dim3(static_cast<unsigned>(blocks)), dim3(256), 0, stream, a, n, k);
}

}  // namespace megamoe::cuda
