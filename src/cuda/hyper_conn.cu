// hyper_conn.cu — mHC on the GPU: the mixing projection (optionally fused with the previous site's
// hc_post) and the two finishes (see hyper_conn.h for the contracts and the CPU twins).
//
// hc_mix: the work of one token is n = hc·D flattened columns against n_mix rows of fn plus the
// sum of squares. Split s takes the d-range [s·P, (s+1)·P) of every stream (P = ceil(D / VEC / S)
// vectors of VEC = 4 or 1 columns), so one CTA owns all hc streams of its d-range: the fused post
// can read X_in[t, :, d] once and write each X_out[t, k, d] exactly once. Each warp holds TB tokens
// (TB below) and G = 32 / TB lanes per token ("column groups"):
//   T = 1:   G = 32 lanes share a token; lane g owns stream k = g mod hc and d-vectors
//            d0 + g / hc + 8m, so a warp-step touches 8 consecutive d-vectors of every stream
//            (coalesced 128-byte segments of X and of each fn row);
//   T = 2..31: TB = the power of two ≥ T tokens per warp, G = 32 / TB lanes each, as above;
//   T ≥ 32:  "wide": TB = 4 tokens per warp, G = 8 lanes per token that take 8 consecutive
//            d-vectors of one stream at a time and walk every stream (KG = 1), so a warp-step
//            reads a 128-byte segment per (token, stream); lanes of the 4 tokens at the same d read
//            the same fn address (one transaction for 4 tokens), fn stays in L1/L2 across the CTA's
//            4 warps; with VEC = 4, where two chunks fit 48 KB (kStageFn: a site's mix up to hc = 4,
//            every head mix), the CTA copies fn through shared memory in chunks of 16 d-vectors,
//            one chunk in flight while the last one is multiplied. (The layout before, one lane per
//            token, read 16 bytes at 64 KB strides: kWideT says what it cost.)
// A lane keeps n_mix + 1 running f32 sums (FMA, in its own fixed column order), then the G lanes
// of a token combine them with a transposing butterfly (32 − TB shuffles per 32 values instead of
// 5 per value: at each level a lane sends the half of its values that its partner keeps), which
// leaves lane (tok, g) with values TB·g .. TB·g + TB − 1 of its token; those it writes to
// part[s, t, :]. Fixed order everywhere, no atomics.
// The split count (hc_mix_splits) aims at ~264 CTAs (two per SM of an H200) but keeps at least
// one vector per lane and splits ≤ n / 128, so the partial sums stay ≤ 1/5 of the bytes of X
// (at T = 1 on V4-Flash: 128 one-warp CTAs, each reading 12 KB of fn).
//
// The finishes: one CTA per token. All warps reduce the splits (value v by warp v mod warps,
// splits strided over lanes, then a butterfly); threads j < hc compute pre_j, threads hc + j post_j;
// then 8 warps form u = Σ_j pre_j X[j] (into shared memory) and its RMS norm, while, in
// hc_pre_finish, a ninth warp runs the Sinkhorn iterations in one thread (they need only the
// mixes, so it starts right after the split reduction) and writes comb. The 8 warps synchronize
// with a named barrier that the Sinkhorn warp never joins.
// The scalar math mirrors ops::hc_pre / ops::hc_head / ops::rms_norm operation by operation
// (explicit _rn intrinsics, no FMA contraction).
#include "cuda/hyper_conn.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "core/common.h"
#include "cuda/device.cuh"
#include "cuda/numerics.cuh"
#include "cuda/numerics.h"
#include "cuda/row_kernels.cuh"

namespace megamoe::cuda {
namespace {

using rk::aligned;
using rk::pdl_begin;

constexpr int kMixWarpsMax = 4;       // warps per hc_mix CTA (token groups sharing a split)
// From kWideT tokens on (prefill), a warp holds 2^kWideTbShift = 4 tokens and each token's 8 lanes
// walk d side by side over every stream ("wide" mode: KG = 1 below), so a warp-step reads one
// 128-byte segment per (token, stream) and each fn value serves the warp's 4 tokens. The lane-per-
// token layout (TB = 32) it replaces read X rows 64 KB apart, 16 bytes per lane: measured on an
// H200 (ncu, V4-Flash, T = 8192) the fused mix moved 2.6 GB for its 1.15 GB at 1.1 TB/s, 2.4 ms
// per call, 20% of an 8K-token prefill. Wide: 1.19 GB moved (the ideal), 2.0 ms per fused call
// (8192-token prefill 529 → 508 ms, 20 layers); what bounds it now is latency: 130 registers per
// thread cap the fused kernel at ~15 warps per SM (13% active) and each step waits on ~96 fn loads
// from L2 (the 1.5 MB fn does not stay in L1). Tried (H200): narrow splits (512 flat columns) with
// each CTA's fn slice (≤ 48 KB) staged in shared memory and 4 token groups per CTA: 8192-token
// prefill 508 → 466 ms (exact), 562 → 519 ms (official), twin tests passing; not kept, because the
// new split count moved the tiny NVFP4 golden's chunks-of-37 top-1 from 98.44% to 97.66% (one
// position at a near tie), below GoldenLogitsStatistics' 98% bar (the issue's).
constexpr int64_t kWideT = 32;
// Wide mode, VEC = 4: fn staged through shared memory in chunks of kStageVecs d-vectors, two
// buffers of NM·HC·kStageVecs float4 (48 KB for a V4 site: NM 24, HC 4), where they fit the 48 KB a
// kernel gets without opting in; the lanes' fn loads then wait on shared memory instead of L2.
// Measured on an H100 (megamoe-forward-bench --model flash --layers 8 --batches 64,256 --prefill
// 8192 --hc-stage 0|1, one call): 8192-token prefill 173.4 → 154.0 ms, decode B = 256 18.02 →
// 17.48 ms, B = 64 12.33 → 12.21 ms; same bits (CudaHyperConn.StagedFnGivesTheSameBits).
constexpr int kStageVecs = 16;
template <int HC, int NM, int VEC>
constexpr bool kStageFn = VEC == 4 && 2 * NM * HC * kStageVecs * 16 <= 48 * 1024;
template <int HC, int NM> constexpr size_t stage_bytes() { return size_t{2} * NM * HC * kStageVecs * 16; }
constexpr int kWideTbShift = 2;
constexpr int64_t kTargetCtas = 264;  // ~2 per SM on H100 / H200
constexpr int kMaxHc = 8;
constexpr int kMaxMix = (2 + kMaxHc) * kMaxHc;
constexpr int kNormThreads = 256;     // finish: threads forming u and its norm
constexpr int kNormWarps = kNormThreads / 32;

// ---------------------------------------------------------------------------- hc_mix

struct MixGeometry {
    int tb_shift = 0;      // log2(tokens per warp)
    int warps = 1;         // warps per CTA
    int64_t tiles = 1;     // CTAs along the tokens
};

MixGeometry mix_geometry(int64_t T) {
    MixGeometry g;
    if (T >= kWideT) {
        g.tb_shift = kWideTbShift;
    } else {
        while ((int64_t{1} << g.tb_shift) < T && g.tb_shift < 5) ++g.tb_shift;
    }
    const int64_t tb = int64_t{1} << g.tb_shift;
    const int64_t warps_needed = (T + tb - 1) / tb;
    g.warps = static_cast<int>(std::clamp<int64_t>(warps_needed, 1, kMixWarpsMax));
    g.tiles = std::max<int64_t>(1, (T + tb * g.warps - 1) / (tb * g.warps));
    return g;
}

struct MixArgs {
    const float* X_in;     // [T, hc, D]
    const float* y;        // [T, D]       (fused)
    const float* post;     // [T, hc]      (fused)
    const float* comb;     // [T, hc, hc]  (fused)
    float* X_out;          // [T, hc, D]   (fused)
    int64_t T, D;
    const float* fn;       // [n_mix, hc·D]
    float* part;           // [splits, T, n_mix + 1]
    bool official;         // fused: y and X_out rounded to bf16 (Numerics::official)
    bool wide = false;     // T ≥ kWideT: a lane walks every stream (KG = 1), see kWideT
    bool stage = false;    // wide, VEC = 4, kStageFn: fn through shared memory (launched with stage_bytes)
};

template <int VEC> __device__ __forceinline__ void load_vec(const float* p, float (&v)[VEC]) {
    if constexpr (VEC == 4) {
        const float4 q = *reinterpret_cast<const float4*>(p);
        v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
    } else {
        v[0] = *p;
    }
}
template <int VEC> __device__ __forceinline__ void load_vec_ro(const float* p, float (&v)[VEC]) {
    if constexpr (VEC == 4) {
        const float4 q = __ldg(reinterpret_cast<const float4*>(p));
        v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
    } else {
        v[0] = __ldg(p);
    }
}
template <int VEC> __device__ __forceinline__ void store_vec(float* p, const float (&v)[VEC]) {
    if constexpr (VEC == 4) *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    else *p = v[0];
}

// One level of the transposing butterfly (see hc_mix_kernel) on acc[base .. base + 2M).
template <int M, int N>
__device__ __forceinline__ void xpose_level(float (&acc)[N], int base, int lane, int TB) {
    if (M < TB) return;
    const bool upper = (lane & M) != 0;
#pragma unroll
    for (int i = 0; i < M; ++i) {
        const float send = upper ? acc[base + i] : acc[base + i + M];
        const float keep = upper ? acc[base + i + M] : acc[base + i];
        acc[base + i] = keep + __shfl_xor_sync(0xffffffffu, send, M);
    }
}

// HC streams (1, 2, 4 or 8), NM mix rows, FUSED post, VEC columns per load (4 or 1).
template <int HC, int NM, bool FUSED, int VEC>
__global__ void __launch_bounds__(kMixWarpsMax * 32) hc_mix_kernel(MixArgs a, int tb_shift) {
    constexpr int NV = NM + 1;              // the dots, then the sum of squares
    constexpr int NB = (NV + 31) / 32;      // 32-value blocks of the transposing reduction
    const int lane = static_cast<int>(threadIdx.x & 31), warp = static_cast<int>(threadIdx.x >> 5);
    const int TB = 1 << tb_shift, G = 32 >> tb_shift;
    const int tok = lane & (TB - 1), g = lane >> tb_shift;
    const int64_t t = (static_cast<int64_t>(blockIdx.y) * (blockDim.x >> 5) + warp) * TB + tok;
    const bool valid = t < a.T;
    const int64_t S = gridDim.x, s = blockIdx.x;
    const int64_t D = a.D, n = HC * D;
    const int64_t Dv = D / VEC;
    const int64_t per = (Dv + S - 1) / S;
    const int64_t d0 = min(Dv, s * per), d1 = min(Dv, d0 + per);
    const int KG = a.wide ? 1 : (G < HC ? G : HC);   // stream sets among the G column groups
    const int KPL = HC / KG;                // streams per lane: k = kset + KG·q, q < KPL
    const int DG = G / KG;                  // lanes per stream set, interleaved along d
    const int kset = g % KG;
    const int64_t dlane = g / KG;

    // Decode (not wide): the fn lines of the lane's first d-vector into the L2 cache before
    // griddepcontrol.wait (fn is a weight: no kernel writes it), so that the loads after the wait,
    // most of a one-token mix's latency, hit L2 while the previous kernel (wo_b, or the routed
    // experts' L2) finishes. One lane of each group sharing a 128-byte line (8 for VEC = 4, 32 for
    // VEC = 1) and token 0 of the warp's tokens issue them; everything above is index arithmetic.
    if (!a.wide && tok == 0 && d0 + dlane < d1 && (dlane & (VEC == 4 ? 7 : 31)) == 0) {
        for (int q = 0; q < KPL; ++q) {
            const float* f = a.fn + (kset + KG * q) * D + (d0 + dlane) * VEC;
#pragma unroll
            for (int o = 0; o < NM; ++o) asm volatile("prefetch.global.L2 [%0];" ::"l"(f + o * n));
        }
    }
    pdl_begin();

    float acc[NB * 32];
#pragma unroll
    for (int i = 0; i < NB * 32; ++i) acc[i] = 0.0f;

    float pk[HC], cm[HC][HC];   // fused: post[t, k] and comb[t, :, k] of the lane's streams
    if constexpr (FUSED) {
        if (valid) {
#pragma unroll
            for (int q = 0; q < HC; ++q) {
                if (q < KPL) {
                    const int k = kset + KG * q;
                    pk[q] = a.post[t * HC + k];
#pragma unroll
                    for (int j = 0; j < HC; ++j) cm[q][j] = a.comb[(t * HC + j) * HC + k];
                }
            }
        }
    }
    const float* xt = a.X_in + t * n;
    // One d-vector of the lane's streams: the fused post, then the sums of squares and the dots in
    // one fixed order (dv, stream, row). fn_of(o, q, w) gives row o of stream kset + KG·q at this dv.
    auto column = [&](int64_t dv, auto&& fn_of) {
        const int64_t c = dv * VEC;   // column inside a stream
        float xv[HC][VEC];            // the mixed values of the lane's streams
        if constexpr (FUSED) {
            // X_out[t, k, c] = post_k · y[c] + Σ_j comb[j][k] · X_in[t, j, c]   (ops::hc_post's order)
            float yv[VEC], xin[HC][VEC];
            load_vec<VEC>(a.y + t * D + c, yv);
            if (a.official) {   // the sublayer's output is bf16 in the official code
#pragma unroll
                for (int e = 0; e < VEC; ++e) yv[e] = nm::bf16_round(yv[e]);
            }
#pragma unroll
            for (int j = 0; j < HC; ++j) load_vec<VEC>(xt + j * D + c, xin[j]);
#pragma unroll
            for (int q = 0; q < HC; ++q) {
                if (q < KPL) {
#pragma unroll
                    for (int e = 0; e < VEC; ++e) {
                        float o = __fmul_rn(pk[q], yv[e]);
#pragma unroll
                        for (int j = 0; j < HC; ++j) o = __fadd_rn(o, __fmul_rn(cm[q][j], xin[j][e]));
                        xv[q][e] = a.official ? nm::bf16_round(o) : o;   // official: bf16 streams
                    }
                    store_vec<VEC>(a.X_out + t * n + (kset + KG * q) * D + c, xv[q]);
                }
            }
        } else {
#pragma unroll
            for (int q = 0; q < HC; ++q)
                if (q < KPL) load_vec<VEC>(xt + (kset + KG * q) * D + c, xv[q]);
        }
#pragma unroll
        for (int q = 0; q < HC; ++q) {
            if (q < KPL) {
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc[NM] = fmaf(xv[q][e], xv[q][e], acc[NM]);
#pragma unroll
                for (int o = 0; o < NM; ++o) {
                    float w[VEC];
                    fn_of(o, q, w);
#pragma unroll
                    for (int e = 0; e < VEC; ++e) acc[o] = fmaf(w[e], xv[q][e], acc[o]);
                }
            }
        }
    };

    if (kStageFn<HC, NM, VEC> && a.stage) {
        // Wide (prefill): the CTA's warps share every fn value of their d-range, so fn goes through
        // shared memory in chunks of kStageVecs d-vectors (all NM rows of every stream, one chunk
        // copied while the one before is multiplied); the lanes then read it there instead of
        // waiting on L2 for each of their NM·HC loads per d-vector. The same sums in the same
        // order as the loads from global memory below (each lane walks its d-vectors in
        // increasing order, chunk after chunk): the same bits.
        extern __shared__ __align__(16) float4 fn_s[];   // [2][NM][HC][kStageVecs]
        const int64_t nvec = d1 - d0;
        const int64_t chunks = (nvec + kStageVecs - 1) / kStageVecs;
        auto stage = [&](int64_t ch) {
            const int64_t cb = d0 + ch * kStageVecs;
            const int cn = static_cast<int>(min(static_cast<int64_t>(kStageVecs), d1 - cb));
            float4* buf = fn_s + (ch & 1) * (NM * HC * kStageVecs);
            for (int i = static_cast<int>(threadIdx.x); i < NM * HC * kStageVecs; i += static_cast<int>(blockDim.x)) {
                const int v = i % kStageVecs, q = (i / kStageVecs) % HC, o = i / (kStageVecs * HC);
                if (v < cn) dev::cp_async16(dev::smem_addr(buf + i), a.fn + o * n + q * D + (cb + v) * VEC, true);
            }
            dev::cp_async_commit();
        };
        stage(0);
        for (int64_t ch = 0; ch < chunks; ++ch) {
            dev::cp_async_wait<0>();   // chunk ch has landed (this thread's copies)
            __syncthreads();           // ... everyone's; chunk ch − 1's buffer is free
            if (ch + 1 < chunks) stage(ch + 1);
            if (valid) {
                const int64_t cb = d0 + ch * kStageVecs;
                const float4* buf = fn_s + (ch & 1) * (NM * HC * kStageVecs);
                for (int64_t dv = cb + dlane; dv < min(d1, cb + static_cast<int64_t>(kStageVecs)); dv += DG)
                    column(dv, [&](int o, int q, float (&w)[VEC]) {
                        const float4 f4 = buf[(o * HC + q) * kStageVecs + (dv - cb)];
                        w[0] = f4.x;
                        w[1] = f4.y;
                        w[2] = f4.z;
                        w[3] = f4.w;
                    });
            }
        }
    } else if (valid) {
        for (int64_t dv = d0 + dlane; dv < d1; dv += DG)
            column(dv, [&](int o, int q, float (&w)[VEC]) {
                load_vec_ro<VEC>(a.fn + (kset + KG * q) * D + dv * VEC + o * n, w);
            });
    }

    // Transposing butterfly over the lane bits that select the column group (bits tb_shift..4).
    // Level m (a power of two ≥ TB) halves 2m live values to m: the lane with bit m set keeps the
    // upper half, its partner the lower one, and each adds what the other sent. Afterwards slot i
    // (i < TB) of block b holds value b·32 + TB·g + i summed over the token's G lanes.
#pragma unroll
    for (int b = 0; b < NB; ++b) {
        xpose_level<16>(acc, b * 32, lane, TB);
        xpose_level<8>(acc, b * 32, lane, TB);
        xpose_level<4>(acc, b * 32, lane, TB);
        xpose_level<2>(acc, b * 32, lane, TB);
        xpose_level<1>(acc, b * 32, lane, TB);
    }
    if (valid) {
        float* out = a.part + (s * a.T + t) * NV;
#pragma unroll
        for (int b = 0; b < NB; ++b) {
#pragma unroll
            for (int i = 0; i < 32; ++i) {
                const int v = b * 32 + TB * g + i;
                if (i < TB && v < NV) out[v] = acc[b * 32 + i];
            }
        }
    }
}

// ---------------------------------------------------------------------------- finishes

struct FinishArgs {
    const float* part;       // [S, T, n_mix + 1]
    int64_t S;
    const float* X;          // [T, hc, D]
    int64_t T;
    int hc;
    int64_t D;
    const float* base;       // pre: [(2 + hc)·hc]; head: [hc]
    const float* scale;      // pre: [3]; head: [1]
    int iters;
    float hc_eps, norm_eps;
    const uint16_t* norm_w;  // [D] or null
    uint16_t* xn;            // [T, D]
    float* post;             // [T, hc]      (pre)
    float* comb;             // [T, hc, hc]  (pre)
    bool official;           // u rounded to bf16 before its norm (Numerics::official)
    uint16_t* xq;            // [T, D] or null: xn with its 128-blocks FP8-rounded (fused: VEC 4, D % 128 == 0)
    uint8_t* xq8 = nullptr;  // [T, D] or null: xq as e4m3 codes in kernel order (linear_fp8_act's input)
    float* xs8 = nullptr;    // [T, D / 128]: their block scales
};

__device__ __forceinline__ float sigmoid_rn(float v) { return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-v))); }

__device__ __forceinline__ void named_barrier_norm() {
    asm volatile("bar.sync 1, %0;" ::"n"(kNormThreads) : "memory");
}

// ops::hc_pre's Sinkhorn on the mixes mix[2hc ..) · inv_n, one thread.
// C lives in registers: every loop runs to kMaxHc with a guard, so all indices are constants.
__device__ void sinkhorn(const float* mix, float inv_n, const float* base, float s2, int hc, int iters, float eps,
                         float* out) {
    float C[kMaxHc][kMaxHc];
#pragma unroll
    for (int j = 0; j < kMaxHc; ++j) {
        if (j < hc) {
            float m = -INFINITY;
#pragma unroll
            for (int k = 0; k < kMaxHc; ++k) {
                if (k < hc) {
                    const float mk = __fmul_rn(mix[2 * hc + j * hc + k], inv_n);
                    C[j][k] = __fadd_rn(__fmul_rn(mk, s2), base[2 * hc + j * hc + k]);
                    m = m < C[j][k] ? C[j][k] : m;   // std::max(m, v)
                }
            }
            float s = 0.0f;
#pragma unroll
            for (int k = 0; k < kMaxHc; ++k) {
                if (k < hc) {
                    C[j][k] = expf(__fsub_rn(C[j][k], m));
                    s = __fadd_rn(s, C[j][k]);
                }
            }
#pragma unroll
            for (int k = 0; k < kMaxHc; ++k)
                if (k < hc) C[j][k] = __fadd_rn(__fdiv_rn(C[j][k], s), eps);
        }
    }
    auto normalize_cols = [&] {
#pragma unroll
        for (int k = 0; k < kMaxHc; ++k) {
            if (k < hc) {
                float s = 0.0f;
#pragma unroll
                for (int j = 0; j < kMaxHc; ++j)
                    if (j < hc) s = __fadd_rn(s, C[j][k]);
                const float d = __fadd_rn(s, eps);
#pragma unroll
                for (int j = 0; j < kMaxHc; ++j)
                    if (j < hc) C[j][k] = __fdiv_rn(C[j][k], d);
            }
        }
    };
    auto normalize_rows = [&] {
#pragma unroll
        for (int j = 0; j < kMaxHc; ++j) {
            if (j < hc) {
                float s = 0.0f;
#pragma unroll
                for (int k = 0; k < kMaxHc; ++k)
                    if (k < hc) s = __fadd_rn(s, C[j][k]);
                const float d = __fadd_rn(s, eps);
#pragma unroll
                for (int k = 0; k < kMaxHc; ++k)
                    if (k < hc) C[j][k] = __fdiv_rn(C[j][k], d);
            }
        }
    };
    normalize_cols();
    for (int it = 1; it < iters; ++it) {
        normalize_rows();
        normalize_cols();
    }
#pragma unroll
    for (int j = 0; j < kMaxHc; ++j)
#pragma unroll
        for (int k = 0; k < kMaxHc; ++k)
            if (j < hc && k < hc) out[j * hc + k] = C[j][k];
}

// The same Sinkhorn for hc = 4 on 16 lanes of a warp, lane j·4 + k holding C[j][k]: every sum
// gathers its four terms by shuffles and adds them in ops::hc_pre's order, and every quotient
// is the same IEEE division, so the result is bit-identical to sinkhorn() above while the chain
// of 20 iterations runs at shuffle latency instead of 16 serial divisions per normalization
// (the one-thread version kept every pre site's finish waiting ~10 µs at decode).
__device__ void sinkhorn4_warp(const float* mix, float inv_n, const float* base, float s2, int iters, float eps,
                               float* out) {
    const int lane = static_cast<int>(threadIdx.x & 31);
    const int j = (lane >> 2) & 3, k = lane & 3;
    constexpr unsigned kAll = 0xffffffffu;
    const float mk = __fmul_rn(mix[8 + j * 4 + k], inv_n);
    float c = __fadd_rn(__fmul_rn(mk, s2), base[8 + j * 4 + k]);
    auto row = [&](float v, int kk) { return __shfl_sync(kAll, v, (lane & ~3) | kk); };          // C[j][kk]
    auto col = [&](float v, int jj) { return __shfl_sync(kAll, v, (lane & ~15) | (jj << 2) | k); };   // C[jj][k]
    // Row softmax + eps.
    float m = row(c, 0);
    for (int kk = 1; kk < 4; ++kk) {
        const float v = row(c, kk);
        m = m < v ? v : m;
    }
    c = expf(__fsub_rn(c, m));
    float s = 0.0f;
    for (int kk = 0; kk < 4; ++kk) s = __fadd_rn(s, row(c, kk));
    c = __fadd_rn(__fdiv_rn(c, s), eps);
    auto normalize_cols = [&] {
        float t = 0.0f;
        for (int jj = 0; jj < 4; ++jj) t = __fadd_rn(t, col(c, jj));
        c = __fdiv_rn(c, __fadd_rn(t, eps));
    };
    auto normalize_rows = [&] {
        float t = 0.0f;
        for (int kk = 0; kk < 4; ++kk) t = __fadd_rn(t, row(c, kk));
        c = __fdiv_rn(c, __fadd_rn(t, eps));
    };
    normalize_cols();
    for (int it = 1; it < iters; ++it) {
        normalize_rows();
        normalize_cols();
    }
    if (lane < 16) out[j * 4 + k] = c;
}

// One CTA per token: kNormThreads (+ one Sinkhorn warp when PRE). Dynamic shared memory: u [D].
// HC = a.hc (1, 2, 4 or 8), a template parameter so that X can be held in registers.
//
// Latency (decode, one CTA): every load that does not depend on another is issued at once. The
// weights (norm_w, base, scale) are read before griddepcontrol.wait (they are not written by any
// kernel); right after it each thread issues the loads of X for its first kPreV d-vectors of every
// stream (64 KB for V4-Flash: the whole token) and, per warp, the split partials of all its mix
// values, before any of them is used. Loading them round by round instead (a split-reduction round
// per 9 values, then one X vector of every stream per loop iteration) chained ~8 dependent trips to
// memory: ~8 µs per pre site of a V4-Flash batch-1 step on an H200, two sites per layer.
template <bool PRE, int VEC, int HC>
__global__ void __launch_bounds__(kNormThreads + 32) hc_finish_kernel(FinishArgs a) {
    constexpr int kPreV = VEC == 4 ? (HC <= 4 ? 4 : 2) : 0;   // d-vectors per thread and stream held in registers
    constexpr int kPreA = kPreV > 0 ? kPreV : 1;
    constexpr int kRounds = 4;                                  // mix values per warp whose partials are loaded together
    extern __shared__ float u_s[];
    __shared__ float mix_s[kMaxMix + 1];
    __shared__ float pre_s[kMaxHc];
    __shared__ float red[kNormWarps];
    const int64_t t = blockIdx.x;
    constexpr int hc = HC;
    const int64_t D = a.D;
    const int64_t nvec = D / VEC;
    constexpr int NM = PRE ? (2 + hc) * hc : hc;
    const int lane = static_cast<int>(threadIdx.x & 31), warp = static_cast<int>(threadIdx.x >> 5);
    const int nwarps = static_cast<int>(blockDim.x >> 5);
    const int i = static_cast<int>(threadIdx.x);

    // Weights first (before the wait).
    uint2 nw[kPreA];
    if constexpr (kPreV > 0) {
#pragma unroll
        for (int q = 0; q < kPreV; ++q) {
            const int64_t v = i + static_cast<int64_t>(q) * kNormThreads;
            nw[q] = a.norm_w != nullptr && i < kNormThreads && v < nvec ? reinterpret_cast<const uint2*>(a.norm_w)[v]
                                                                         : make_uint2(0u, 0u);
        }
    }
    float my_base = 0.0f, my_scale = 0.0f;   // thread i < hc: pre_i's; hc ≤ i < 2·hc: post's
    if (i < (PRE ? 2 * hc : hc)) {
        my_base = a.base[i];
        my_scale = a.scale[i < hc ? 0 : 1];
    }
    pdl_begin();

    const float* xt = a.X + t * hc * D;
    float4 xr[kPreA][hc];
    if constexpr (kPreV > 0) {
        if (i < kNormThreads) {
#pragma unroll
            for (int q = 0; q < kPreV; ++q) {
                const int64_t v = i + static_cast<int64_t>(q) * kNormThreads;
#pragma unroll
                for (int j = 0; j < hc; ++j)
                    if (v < nvec) xr[q][j] = *reinterpret_cast<const float4*>(xt + j * D + v * 4);
            }
        }
    }

    // The splits, in a fixed order: lane l sums splits l, l + 32, ... of value v; then the
    // butterfly. A warp takes values warp, warp + nwarps, ... and loads kRounds of them together.
    for (int v0 = warp; v0 <= NM; v0 += kRounds * nwarps) {
        float acc[kRounds];
#pragma unroll
        for (int r = 0; r < kRounds; ++r) acc[r] = 0.0f;
        for (int64_t s = lane; s < a.S; s += 32) {
            const float* ps = a.part + (s * a.T + t) * (NM + 1);
#pragma unroll
            for (int r = 0; r < kRounds; ++r)
                if (v0 + r * nwarps <= NM) acc[r] += ps[v0 + r * nwarps];
        }
#pragma unroll
        for (int r = 0; r < kRounds; ++r) {
            const float sum = rk::warp_sum(acc[r]);
            if (lane == 0 && v0 + r * nwarps <= NM) mix_s[v0 + r * nwarps] = sum;
        }
    }
    __syncthreads();
    // mixes = dots · rsqrt(ss / n + eps) (every thread computes the same factor); thread j < hc:
    // pre_j = sigmoid(mix_j·scale0 + base_j) + eps; thread hc + j: post_j = 2·sigmoid(mix_{hc+j}·scale1
    // + base_{hc+j}); the Sinkhorn warp starts at once (it needs only the mixes) and skips the
    // barriers of the other 8 warps.
    const float inv_n = rk::inv_rms(mix_s[NM], static_cast<float>(hc * D), a.norm_eps);
    if constexpr (PRE) {
        if (warp == kNormWarps) {
            if constexpr (hc == 4)
                sinkhorn4_warp(mix_s, inv_n, a.base, a.scale[2], a.iters, a.hc_eps, a.comb + t * 16);
            else if (lane == 0)
                sinkhorn(mix_s, inv_n, a.base, a.scale[2], hc, a.iters, a.hc_eps, a.comb + t * hc * hc);
            return;
        }
    }
    if (i < hc) {
        const float m = __fmul_rn(mix_s[i], inv_n);
        pre_s[i] = __fadd_rn(sigmoid_rn(__fadd_rn(__fmul_rn(m, my_scale), my_base)), a.hc_eps);
    } else if (PRE && i < 2 * hc) {
        const float m = __fmul_rn(mix_s[i], inv_n);
        a.post[t * hc + (i - hc)] = __fmul_rn(2.0f, sigmoid_rn(__fadd_rn(__fmul_rn(m, my_scale), my_base)));
    }
    named_barrier_norm();   // pre_s is complete

    // u[d] = Σ_j pre_j X[t, j, d] from +0 in stream order (ops::hc_pre), kept in shared memory.
    float ss = 0.0f;
    auto form_u = [&](int64_t v, const float (&x)[hc][VEC]) {
        float u[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) u[e] = 0.0f;
#pragma unroll
        for (int j = 0; j < hc; ++j) {
            const float p = pre_s[j];
#pragma unroll
            for (int e = 0; e < VEC; ++e) u[e] = __fadd_rn(u[e], __fmul_rn(p, x[j][e]));
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            if (a.official) u[e] = nm::bf16_round(u[e]);   // hc_pre's output is bf16 in the official code
            u_s[v * VEC + e] = u[e];
            ss = fmaf(u[e], u[e], ss);
        }
    };
    if constexpr (kPreV > 0) {
#pragma unroll
        for (int q = 0; q < kPreV; ++q) {
            const int64_t v = i + static_cast<int64_t>(q) * kNormThreads;
            if (v < nvec) {
                float x[hc][VEC];
#pragma unroll
                for (int j = 0; j < hc; ++j) {
                    x[j][0] = xr[q][j].x;
                    x[j][1] = xr[q][j].y;
                    x[j][2] = xr[q][j].z;
                    x[j][3] = xr[q][j].w;
                }
                form_u(v, x);
            }
        }
    }
    for (int64_t v = i + static_cast<int64_t>(kPreV) * kNormThreads; v < nvec; v += kNormThreads) {
        float x[hc][VEC];
#pragma unroll
        for (int j = 0; j < hc; ++j) load_vec<VEC>(xt + j * D + v * VEC, x[j]);
        form_u(v, x);
    }
    ss = rk::warp_sum(ss);
    if (lane == 0) red[warp] = ss;
    named_barrier_norm();
    float tot = 0.0f;
    for (int w = 0; w < kNormWarps; ++w) tot += red[w];
    const float inv = rk::inv_rms(tot, static_cast<float>(D), a.norm_eps);
    uint16_t* out = a.xn + t * D;
    auto emit = [&](int64_t v, uint2 wb) {   // this thread's own u_s entries; wb: norm_w of v (VEC 4)
        float o[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) o[e] = __fmul_rn(u_s[v * VEC + e], inv);
        if constexpr (VEC == 4) {
            if (a.norm_w != nullptr) {
                o[0] = __fmul_rn(rk::bf16_lo(wb.x), o[0]);
                o[1] = __fmul_rn(rk::bf16_hi(wb.x), o[1]);
                o[2] = __fmul_rn(rk::bf16_lo(wb.y), o[2]);
                o[3] = __fmul_rn(rk::bf16_hi(wb.y), o[3]);
            }
            *reinterpret_cast<uint2*>(out + v * 4) = make_uint2(rk::pack_bf16x2(o[0], o[1]), rk::pack_bf16x2(o[2], o[3]));
            if (a.xq != nullptr) {
                // round_gemm_input fused: with D % 128 == 0 every lane of the warp is here, and the
                // warp's 32 vectors v = 32·warp + 256·i + lane are one aligned 128-block of the row.
                float b[4] = {o[0], o[1], o[2], o[3]};
                if (a.xq8 != nullptr) {
                    uint32_t codes;
                    float sc;
                    nm::fp8_round_warp_block4(b, codes, sc);
                    reinterpret_cast<uint32_t*>(a.xq8 + t * D)[v] = codes;
                    if ((v & 31) == 0) a.xs8[(t * D + v * 4) / 128] = sc;
                } else {
                    nm::fp8_round_warp_block4(b);
                }
                *reinterpret_cast<uint2*>(a.xq + t * D + v * 4) =
                    make_uint2(rk::pack_bf16x2(b[0], b[1]), rk::pack_bf16x2(b[2], b[3]));
            }
        } else {
            if (a.norm_w != nullptr) o[0] = __fmul_rn(rk::bf16_to_f32(a.norm_w[v]), o[0]);
            out[v] = static_cast<uint16_t>(rk::f32_to_bf16(o[0]));
        }
    };
    if constexpr (kPreV > 0) {
#pragma unroll
        for (int q = 0; q < kPreV; ++q) {
            const int64_t v = i + static_cast<int64_t>(q) * kNormThreads;
            if (v < nvec) emit(v, nw[q]);
        }
    }
    for (int64_t v = i + static_cast<int64_t>(kPreV) * kNormThreads; v < nvec; v += kNormThreads)
        emit(v, VEC == 4 && a.norm_w != nullptr ? reinterpret_cast<const uint2*>(a.norm_w)[v] : make_uint2(0u, 0u));
}

// ---------------------------------------------------------------------------- host

template <int HC, int NM>
void launch_mix(bool fused, bool vec, dim3 grid, dim3 block, MixArgs a, int tb_shift, CUstream_st* s) {
    a.stage = a.stage && vec && kStageFn<HC, NM, 4>;
    const size_t smem = a.stage ? stage_bytes<HC, NM>() : 0;
    if (fused) {
        if (vec) rk::launch(hc_mix_kernel<HC, NM, true, 4>, grid, block, smem, s, a, tb_shift);
        else rk::launch(hc_mix_kernel<HC, NM, true, 1>, grid, block, 0, s, a, tb_shift);
    } else {
        if (vec) rk::launch(hc_mix_kernel<HC, NM, false, 4>, grid, block, smem, s, a, tb_shift);
        else rk::launch(hc_mix_kernel<HC, NM, false, 1>, grid, block, 0, s, a, tb_shift);
    }
}

template <int HC>
void launch_mix_hc(bool head, bool fused, bool vec, dim3 grid, dim3 block, const MixArgs& a, int tb_shift,
                   CUstream_st* s) {
    if (head) launch_mix<HC, HC>(fused, vec, grid, block, a, tb_shift, s);
    else launch_mix<HC, (2 + HC) * HC>(fused, vec, grid, block, a, tb_shift, s);
}

bool overlaps(const float* a, const float* b, int64_t n) { return a < b + n && b < a + n; }

template <bool PRE>
void launch_finish(FinishArgs a, CUstream_st* stream, const char* op) {
    if (a.T == 0) return;
    const bool vec = a.D % 4 == 0 && aligned(a.X, 16) && aligned(a.xn, 8) && (a.norm_w == nullptr || aligned(a.norm_w, 8));
    uint16_t* const xq_after = a.xq != nullptr && !(vec && a.D % 128 == 0 && aligned(a.xq, 8)) ? a.xq : nullptr;
    if (xq_after != nullptr) a.xq = nullptr;   // not fusable: a copy of xn, rounded after the kernel
    if ((a.xq8 == nullptr) != (a.xs8 == nullptr) || (a.xq8 != nullptr && a.xq == nullptr && xq_after == nullptr))
        fail(op, ": codes need both xq8 and xs8, and xq");
    uint8_t* const xq8_after = a.xq8 != nullptr && (xq_after != nullptr || !aligned(a.xq8, 4)) ? a.xq8 : nullptr;
    float* const xs8_after = xq8_after != nullptr ? a.xs8 : nullptr;
    if (xq8_after != nullptr) a.xq8 = nullptr, a.xs8 = nullptr;   // not fusable: quantized after the rounding
    const size_t smem = static_cast<size_t>(a.D) * sizeof(float);
    constexpr size_t kDefaultSmem = 48 * 1024, kMaxSmem = 227 * 1024;
    if (smem > kMaxSmem) fail(op, ": D=", a.D, " needs ", smem, " bytes of shared memory (max ", kMaxSmem, ")");
    void (*kernel)(FinishArgs) = nullptr;
    switch (a.hc) {
        case 1: kernel = vec ? hc_finish_kernel<PRE, 4, 1> : hc_finish_kernel<PRE, 1, 1>; break;
        case 2: kernel = vec ? hc_finish_kernel<PRE, 4, 2> : hc_finish_kernel<PRE, 1, 2>; break;
        case 4: kernel = vec ? hc_finish_kernel<PRE, 4, 4> : hc_finish_kernel<PRE, 1, 4>; break;
        case 8: kernel = vec ? hc_finish_kernel<PRE, 4, 8> : hc_finish_kernel<PRE, 1, 8>; break;
        default: fail(op, ": hc=", a.hc, " must be 1, 2, 4 or 8");
    }
    if (smem > kDefaultSmem)
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    const dim3 grid(rk::grid_dim(a.T, 0x7fffffff, op)), block(kNormThreads + (PRE ? 32 : 0));
    rk::launch(kernel, grid, block, smem, stream, a);
    if (xq_after != nullptr) {
        CUDA_CHECK(cudaMemcpyAsync(xq_after, a.xn, static_cast<size_t>(a.T * a.D) * 2, cudaMemcpyDeviceToDevice, stream));
        fp8_block_round(xq_after, a.T, a.D, a.D, 128, stream);
    }
    if (xq8_after != nullptr) quantize_gemm_input(xq_after ? xq_after : a.xq, a.T, a.D, xq8_after, xs8_after, stream);
}

void check_finish(const char* op, const float* part, int64_t splits, const float* X, int64_t T, int64_t hc, int64_t D,
                  const float* base, const float* scale, const uint16_t* xn) {
    if (T < 0) fail(op, ": T=", T, " is negative");
    if (hc != 1 && hc != 2 && hc != 4 && hc != 8) fail(op, ": hc=", hc, " must be 1, 2, 4 or 8");
    if (D < 1) fail(op, ": D=", D, " must be ≥ 1");
    if (splits < 1) fail(op, ": splits=", splits, " must be ≥ 1");
    if (T > 0 && (!part || !X || !base || !scale || !xn)) fail(op, ": null part/X/base/scale/xn");
}

}  // namespace

int64_t hc_mix_splits(int64_t T, int64_t n) {
    if (T < 0 || n < 1) fail("hc_mix_splits: bad shape T=", T, " n=", n);
    const MixGeometry g = mix_geometry(std::max<int64_t>(T, 1));
    const int64_t G = 32 >> g.tb_shift;
    const int64_t want = (kTargetCtas + g.tiles - 1) / g.tiles;
    const int64_t lane_cap = std::max<int64_t>(1, ((n + 3) / 4 + G - 1) / G);   // ≥ one 4-vector per lane
    const int64_t part_cap = std::max<int64_t>(1, n / 128);                     // partials ≤ n/5 per token
    return std::clamp<int64_t>(want, 1, std::min(lane_cap, part_cap));
}

void hc_mix(const float* X_in, const float* y, const float* post, const float* comb, float* X_out, int64_t T,
            int64_t hc, int64_t D, const float* fn, int64_t n_mix, float* part, int64_t splits, CUstream_st* stream,
            Numerics nm, bool stage_fn) {
    if (T < 0) fail("hc_mix: T=", T, " is negative");
    if (hc != 1 && hc != 2 && hc != 4 && hc != 8) fail("hc_mix: hc=", hc, " must be 1, 2, 4 or 8");
    if (D < 1) fail("hc_mix: D=", D, " must be ≥ 1");
    const bool head = n_mix == hc;
    if (!head && n_mix != (2 + hc) * hc)
        fail("hc_mix: n_mix=", n_mix, " must be (2 + hc)·hc = ", (2 + hc) * hc, " (a site) or hc = ", hc, " (the head)");
    if (splits < 1 || splits > 0x7fffffff) fail("hc_mix: splits=", splits, " must be ≥ 1");
    const int given = (y != nullptr) + (post != nullptr) + (comb != nullptr) + (X_out != nullptr);
    if (given != 0 && given != 4) fail("hc_mix: the fused post needs all of y, post, comb, X_out (or none)");
    const bool fused = given == 4;
    if (T == 0) return;
    if (!X_in || !fn || !part) fail("hc_mix: null X_in/fn/part");
    const int64_t n = hc * D;
    if (fused && overlaps(X_in, X_out, T * n)) fail("hc_mix: X_out overlaps X_in");
    const MixGeometry g = mix_geometry(T);
    if (g.tiles > 65535) fail("hc_mix: T=", T, " needs ", g.tiles, " token tiles (max 65535)");
    const bool vec = D % 4 == 0 && aligned(X_in, 16) && aligned(fn, 16) && (!fused || (aligned(y, 16) && aligned(X_out, 16)));
    const MixArgs a{X_in, y, post, comb, X_out, T, D, fn, part, nm == Numerics::official, T >= kWideT,
                    stage_fn && T >= kWideT};
    const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(g.tiles)), block(g.warps * 32);
    switch (hc) {
        case 1: launch_mix_hc<1>(head, fused, vec, grid, block, a, g.tb_shift, stream); break;
        case 2: launch_mix_hc<2>(head, fused, vec, grid, block, a, g.tb_shift, stream); break;
        case 4: launch_mix_hc<4>(head, fused, vec, grid, block, a, g.tb_shift, stream); break;
        default: launch_mix_hc<8>(head, fused, vec, grid, block, a, g.tb_shift, stream); break;
    }
}

void hc_pre_finish(const float* part, int64_t splits, const float* X, int64_t T, int64_t hc, int64_t D,
                   const float* base, const float* scale, int64_t sinkhorn_iters, float hc_eps, float norm_eps,
                   const uint16_t* norm_w, uint16_t* xn, float* post, float* comb, CUstream_st* stream,
                   Numerics nm, uint16_t* xq, uint8_t* xq8, float* xs8) {
    check_finish("hc_pre_finish", part, splits, X, T, hc, D, base, scale, xn);
    if (sinkhorn_iters < 0 || sinkhorn_iters > 1000000) fail("hc_pre_finish: sinkhorn_iters=", sinkhorn_iters);
    if (T > 0 && (!post || !comb)) fail("hc_pre_finish: null post/comb");
    FinishArgs a{part, splits, X, T, static_cast<int>(hc), D, base, scale, static_cast<int>(sinkhorn_iters),
                 hc_eps, norm_eps, norm_w, xn, post, comb, nm == Numerics::official, xq};
    a.xq8 = xq8;
    a.xs8 = xs8;
    launch_finish<true>(a, stream, "hc_pre_finish");
}

void hc_head_finish(const float* part, int64_t splits, const float* X, int64_t T, int64_t hc, int64_t D,
                    const float* base, const float* scale, float hc_eps, float norm_eps, const uint16_t* norm_w,
                    uint16_t* xn, CUstream_st* stream, Numerics nm, uint16_t* xq) {
    check_finish("hc_head_finish", part, splits, X, T, hc, D, base, scale, xn);
    const FinishArgs a{part, splits, X, T, static_cast<int>(hc), D, base, scale, 0, hc_eps, norm_eps, norm_w, xn,
                       nullptr, nullptr, nm == Numerics::official, xq};
    launch_finish<false>(a, stream, "hc_head_finish");
}

}  // namespace megamoe::cuda
