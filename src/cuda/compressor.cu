// compressor.cu — the KV compressors and the sliding-window ring on the GPU (contract and state
// layout in compressor.h; the CPU twin is compressor_feed, ref/compressor.cpp). Hopper (sm_90a),
// nothing architecture-specific.
//
// Where a slot's values come from
// -------------------------------
// A chunk c starts at position p0 = pos[chunk_first[c]]; its token at position q ≥ p0 is batch row
// t0 + (q − p0) of this step's kv / gate (the gate then gets + ape[q mod r] here). A position
// q < p0 belongs to a window that was already seen before this step:
//   - the window open at the chunk's start (v = p0 / r): its slot q mod r of pending_* (both
//     series, gate already + ape);
//   - the window before it (v = p0 / r − 1, only ever read as overlap series A): prev_* of v's
//     parity (v mod 2).
// Nothing older is ever needed: a row pools at most windows w−1 and w, and w ≥ p0 / r because the
// closing token is in the chunk. A position q < p0 exists in the sequence, so its state was
// written by an earlier step: a fresh slot needs no reset.
//
// compressor_emit: one CTA per batch token (grid T). A token that does not close a window returns
// at once. Otherwise the CTA first resolves the row's 2r (overlap, w ≥ 1) or r slots into three
// pointers each in shared memory (kv, gate, ape-or-null, already offset to the series), then each
// thread owns feature pairs (2j, 2j+1) — which are exactly RoPE's interleaved pairs, so the
// rotation needs no exchange between threads — and, per feature, runs the softmax in f32 in slot
// order: max over the gates, then Σ e and Σ e·kv with e = expf(g − max), pooled = Σe·kv / Σe. The
// pooled row goes to shared memory; the sum of squares is reduced over the block in a fixed tree
// (per-thread sums in pair order, warp xor-shuffle, warps in order); then each thread normalizes
// (x · inv, then · w as ops::rms_norm rounds), rotates its pairs that fall in the last rope_dim
// features at position w·r (angle = float(w·r) · inv_freq[i] in f32, cosf / sinf, the four
// products and two sums rounded one by one as ops::rope does) and stores bf16x2 (RNE).
// Numerics::official adds compressor_feed's roundings: the pooled values are rounded to bf16 as
// they go to shared memory, and the sum of squares is taken in f64 as the twin's (the squares of
// bf16 values are exact, and so is their sum unless the row spans ~2^28 in squares, so the f32
// mean has the twin's bits whatever the order); the normalized and the rotated values are
// rounded to bf16 and put back into the shared row; after a barrier, either warp 0 applies the
// indexer's Hadamard + FP4 to the whole row (d ≤ 128; numerics.cuh indexer_qk_warp, the twin's
// butterfly order), or each warp takes 64-feature blocks of the FP8 KV latent rounding (lane =
// one feature pair; block amax by a warp butterfly over the features below d − rope_dim), and the
// row is stored.
// Everything is a function of the inputs and the launch shape: deterministic, no atomics.
//
// compressor_save: grid (C, G), G = min(r, 8) slot groups; CTA (c, g) handles slots s ≡ g mod G of
// chunk c, its threads own feature columns. For slot s and column col the thread first writes
// prev[v mod 2][s][col] (overlap, col < d) for the last two windows v the chunk closed (position
// v·r + s is either in this step's buffers or, when v was the window open at the chunk's start,
// in pending(v)[s][col]) and only then pending(u)[s][col]: the chunk's latest position with slot
// s, in window u (the open window end / r when s < end mod r, else the one before), if it is ≥ p0
// (older ones are there already). Writing the closed window's slots, and keeping series A and
// (overlap) the pending slots per window parity, is what makes a rewind exact (compressor.h).
// The elements of pending a thread reads and writes are its own (slot s, column col), so there is
// no hazard between threads or CTAs (a slot appears in at most one chunk of a step, as a sequence
// does). The emit of the same step has finished reading the pending
// state by then (stream order).
//
// window_write: a warp per token (grid ⌈T/8⌉ CTAs of 8 warps); the token copies its kv row into
// ring row pos mod W iff it is one of the last W tokens of its chunk (so no two tokens of a step
// write the same ring row). 16-byte vectors when hd and the pointers allow, bf16 elements else.
//
// All three kernels are launched with programmatic dependent launch and start with
// griddepcontrol.wait, so they touch memory only after the previous kernel of the stream ended.
#include "cuda/compressor.h"
#include "cuda/kv_row.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "core/common.h"
#include "cuda/device.cuh"
#include "cuda/linear.h"   // CUDA_CHECK
#include "cuda/numerics.cuh"

namespace megamoe::cuda {
namespace {

constexpr int kEmitMaxThreads = 256;
constexpr int kSaveThreads = 256;
constexpr int kSaveMaxGroups = 8;
constexpr int kWindowThreads = 256;
constexpr int kWindowWarps = kWindowThreads / 32;

__device__ __forceinline__ void pdl_begin() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

cudaStream_t as_stream(CUstream_st* s) { return reinterpret_cast<cudaStream_t>(s); }

// The f32 arrays of one state record (compressor.h): pending (kv, gate) [r, width] of window v,
// one set (no overlap) or one per parity of v (overlap), then prev (kv, gate) [r, d] per parity of
// the closed window (overlap).
struct StateRecord {
    float *pend, *prev;
    int64_t rw, rd;   // r·width, r·d
    bool parity;      // pending per window parity (overlap)
    __device__ float* pend_kv(int64_t v) const { return pend + (parity ? (v & 1) * 2 * rw : 0); }
    __device__ float* pend_gate(int64_t v) const { return pend_kv(v) + rw; }
    __device__ float* prev_kv(int64_t v) const { return prev + (v & 1) * 2 * rd; }
    __device__ float* prev_gate(int64_t v) const { return prev + (v & 1) * 2 * rd + rd; }
};
__device__ __forceinline__ StateRecord state_record(const CompressorArgs& a, int32_t slot, int64_t width) {
    float* base = a.state.at<float>(slot);
    const int64_t rw = static_cast<int64_t>(a.ratio) * width, rd = static_cast<int64_t>(a.ratio) * a.dim;
    return {base, base + (a.overlap ? 4 : 2) * rw, rw, rd, a.overlap};
}

// Official numerics, after the rows are normalized, rotated and rounded to bf16 in row[d] (f32):
// the indexer keys' Hadamard + FP4 by warp 0 (E values per lane, d = 32·E or d < 32 with E = 1)
// or the KV latent's FP8 blocks; the row stored as bf16.
template <int E>
__device__ __forceinline__ void emit_indexer_row(const float* row, int d, uint16_t* out) {
    const int lane = static_cast<int>(threadIdx.x) & 31;
    const bool live = lane * E < d;
    float v[E];
#pragma unroll
    for (int j = 0; j < E; ++j) v[j] = live ? row[lane * E + j] : 0.0f;
    const float scale = __fdiv_rn(1.0f, __fsqrt_rn(static_cast<float>(d)));   // as ops::hadamard
    nm::indexer_qk_warp<E>(v, lane, d, scale);
    if (live) {
#pragma unroll
        for (int j = 0; j < E; ++j) out[lane * E + j] = __bfloat16_as_ushort(__float2bfloat16_rn(v[j]));
    }
}

// The KV latent's FP8 rounding of row[d] (features [0, q_end) in 64-blocks), stored as bf16 pairs
// at out, or (fp8 != nullptr) as a kv_row.h fp8 row: the codes, the rope features bf16 at byte
// q_end, the blocks' scale bytes at q_end + 2·(d − q_end).
__device__ __forceinline__ void emit_kv_latent_row(const float* row, int d, int q_end, __nv_bfloat162* out,
                                                   uint8_t* fp8) {
    const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
    const int warps = static_cast<int>(blockDim.x) >> 5;
    const int scale_off = q_end + 2 * (d - q_end);
    for (int c = warp; c * 64 < d; c += warps) {   // 64-feature block c, one pair per lane
        const int f = c * 64 + 2 * lane;
        const bool live = f < d, quant = f < q_end;   // q_end even: a pair is in or out whole
        float v0 = live ? row[f] : 0.0f, v1 = live ? row[f + 1] : 0.0f;
        float amax = quant ? fmaxf(fabsf(v0), fabsf(v1)) : 0.0f;
#pragma unroll
        for (int o = 16; o >= 1; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        const float s = nm::fp8_scale(amax);
        if (fp8) {
            if (quant) {
                const uint16_t codes = static_cast<uint16_t>(nm::e4m3_code(v0, s) | (nm::e4m3_code(v1, s) << 8));
                *reinterpret_cast<uint16_t*>(fp8 + f) = codes;
            } else if (live) {
                *reinterpret_cast<__nv_bfloat162*>(fp8 + q_end + 2 * (f - q_end)) = __floats2bfloat162_rn(v0, v1);
            }
            if (lane == 0 && c * 64 < q_end) fp8[scale_off + c] = nm::scale_byte(s);
            continue;
        }
        if (quant) {
            v0 = nm::fp8_qdq(v0, s);
            v1 = nm::fp8_qdq(v1, s);
        }
        if (live) out[f / 2] = __floats2bfloat162_rn(v0, v1);
    }
    if (fp8 && threadIdx.x < KvRow::kScaleBytes) {   // the unused scale bytes
        const int i = static_cast<int>(threadIdx.x);
        if (i * 64 >= q_end) fp8[scale_off + i] = 0;
    }
}

// Dynamic shared memory: slot_kv[n_max], slot_gate[n_max], slot_ape[n_max] (pointers), row[d],
// red[32] (f64 / f32).
// kOfficial: a.numerics == Numerics::official (a template parameter, so that the exact kernel is
// compiled as it was without the official steps).
template <bool kOfficial>
__global__ void __launch_bounds__(kEmitMaxThreads) compressor_emit_kernel(CompressorArgs a, BatchView b) {
    pdl_begin();
    const int t = static_cast<int>(blockIdx.x);
    const int32_t p = b.pos[t];
    const int r = a.ratio, d = a.dim;
    if ((p + 1) % r != 0) return;   // uniform over the CTA

    const int n_max = a.overlap ? 2 * r : r;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const float** slot_kv = reinterpret_cast<const float**>(smem_raw);
    const float** slot_gate = slot_kv + n_max;
    const float** slot_ape = slot_gate + n_max;
    float* row = reinterpret_cast<float*>(slot_ape + n_max);
    float* red = row + d;
    double* red_d = reinterpret_cast<double*>(red);   // the same 256 bytes (8-aligned: d is even)
    constexpr bool official = kOfficial;

    const int64_t width = a.overlap ? 2 * static_cast<int64_t>(d) : d;
    const int64_t w = (p + 1) / r - 1;                    // the row this token closes
    const int32_t c = b.chunk[t];
    const int32_t t0 = b.chunk_first[c];
    const int64_t p0 = b.pos[t0];
    const int64_t open0 = p0 / r;                         // window open at the chunk's start
    const int32_t slot = b.slot[t];
    const StateRecord st = state_record(a, slot, width);

    const int n_a = (a.overlap && w > 0) ? r : 0;         // series A of window w-1 (absent for w = 0)
    const int n = n_a + r;
    for (int i = static_cast<int>(threadIdx.x); i < n; i += static_cast<int>(blockDim.x)) {
        const bool series_a = i < n_a;
        const int64_t v = series_a ? w - 1 : w;
        const int s = series_a ? i : i - n_a;
        const int64_t col = (a.overlap && !series_a) ? d : 0;
        const int64_t q = v * r + s;
        if (q >= p0) {
            const int64_t src = static_cast<int64_t>(t0) + (q - p0);
            slot_kv[i] = a.kv + src * width + col;
            slot_gate[i] = a.gate + src * width + col;
            slot_ape[i] = a.ape + s * width + col;
        } else if (v == open0) {
            slot_kv[i] = st.pend_kv(v) + s * width + col;
            slot_gate[i] = st.pend_gate(v) + s * width + col;
            slot_ape[i] = nullptr;
        } else {   // v == open0 - 1, series A: the last window closed before this step
            slot_kv[i] = st.prev_kv(v) + static_cast<int64_t>(s) * d;
            slot_gate[i] = st.prev_gate(v) + static_cast<int64_t>(s) * d;
            slot_ape[i] = nullptr;
        }
    }
    __syncthreads();

    // Pool: per feature, softmax over the n slots in slot order (f32).
    float ss = 0.0f;
    double ss_d = 0.0;   // official
    for (int j = static_cast<int>(threadIdx.x); j < d / 2; j += static_cast<int>(blockDim.x)) {
        const int f = 2 * j;
        float2 m = make_float2(-INFINITY, -INFINITY);
        for (int i = 0; i < n; ++i) {
            float2 g = *reinterpret_cast<const float2*>(slot_gate[i] + f);
            if (slot_ape[i]) {
                const float2 e = *reinterpret_cast<const float2*>(slot_ape[i] + f);
                g.x = __fadd_rn(g.x, e.x);
                g.y = __fadd_rn(g.y, e.y);
            }
            m.x = fmaxf(m.x, g.x);
            m.y = fmaxf(m.y, g.y);
        }
        float2 den = make_float2(0.0f, 0.0f), num = make_float2(0.0f, 0.0f);
        for (int i = 0; i < n; ++i) {
            float2 g = *reinterpret_cast<const float2*>(slot_gate[i] + f);
            if (slot_ape[i]) {
                const float2 e = *reinterpret_cast<const float2*>(slot_ape[i] + f);
                g.x = __fadd_rn(g.x, e.x);
                g.y = __fadd_rn(g.y, e.y);
            }
            const float2 kv = *reinterpret_cast<const float2*>(slot_kv[i] + f);
            const float ex = expf(g.x - m.x), ey = expf(g.y - m.y);
            den.x += ex;
            den.y += ey;
            num.x = fmaf(ex, kv.x, num.x);
            num.y = fmaf(ey, kv.y, num.y);
        }
        float x0 = num.x / den.x, x1 = num.y / den.y;
        if constexpr (official) {   // kv.to(x.dtype) before the norm; its squares are exact in f64
            x0 = nm::bf16_round(x0);
            x1 = nm::bf16_round(x1);
            ss_d = __dadd_rn(ss_d, __dmul_rn(x0, x0));
            ss_d = __dadd_rn(ss_d, __dmul_rn(x1, x1));
        }
        row[f] = x0;
        row[f + 1] = x1;
        ss = fmaf(x0, x0, ss);
        ss = fmaf(x1, x1, ss);
    }

    // Block sum of squares: warp tree, then the warps in order (fixed for a given d).
    const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
    float inv;
    if constexpr (official) {   // ops::rms_norm: 1 / sqrt(f32(Σx² / d) + eps), the sum in f64
        for (int o = 16; o > 0; o >>= 1) ss_d = __dadd_rn(ss_d, __shfl_xor_sync(0xffffffffu, ss_d, o));
        if (lane == 0) red_d[warp] = ss_d;
        __syncthreads();
        double total = 0.0;
        for (int i = 0; i < static_cast<int>(blockDim.x) / 32; ++i) total = __dadd_rn(total, red_d[i]);
        const float mean = __double2float_rn(__ddiv_rn(total, static_cast<double>(d)));
        inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, a.norm_eps)));
    } else {
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (lane == 0) red[warp] = ss;
        __syncthreads();
        float total = 0.0f;
        for (int i = 0; i < static_cast<int>(blockDim.x) / 32; ++i) total += red[i];
        inv = 1.0f / sqrtf(total / static_cast<float>(d) + a.norm_eps);
    }

    // Normalize, rotate the last rope_dim features at position w·r, store bf16 (official: each
    // step rounded to bf16, then the row's FP8 or Hadamard + FP4 rounding, then the store).
    __nv_bfloat162* out = a.rows.row<__nv_bfloat162>(slot, w);
    const int off = d - a.rope.rope_dim;
    const float first_pos = static_cast<float>(w * r);
    for (int j = static_cast<int>(threadIdx.x); j < d / 2; j += static_cast<int>(blockDim.x)) {
        const int f = 2 * j;
        float y0 = __fmul_rn(__bfloat162float(__ushort_as_bfloat16(a.norm_w[f])), __fmul_rn(row[f], inv));
        float y1 = __fmul_rn(__bfloat162float(__ushort_as_bfloat16(a.norm_w[f + 1])), __fmul_rn(row[f + 1], inv));
        if constexpr (official) {
            y0 = nm::bf16_round(y0);
            y1 = nm::bf16_round(y1);
        }
        if (f >= off) {
            const float angle = __fmul_rn(first_pos, a.rope.inv_freq[(f - off) / 2]);
            const float cs = cosf(angle), sn = sinf(angle);
            const float r0 = __fsub_rn(__fmul_rn(y0, cs), __fmul_rn(y1, sn));
            const float r1 = __fadd_rn(__fmul_rn(y1, cs), __fmul_rn(y0, sn));
            y0 = r0;
            y1 = r1;
        }
        if constexpr (official) {   // back into the row (each thread its own pairs), rounded
            row[f] = nm::bf16_round(y0);
            row[f + 1] = nm::bf16_round(y1);
        } else {
            out[j] = __floats2bfloat162_rn(y0, y1);
        }
    }
    if constexpr (official) {   // the row's last rounding, once all of it is in shared memory
        __syncthreads();
        if (!a.indexer_keys) {
            emit_kv_latent_row(row, d, off, out, a.kv_fp8 ? reinterpret_cast<uint8_t*>(out) : nullptr);
        } else if (warp == 0) {
            uint16_t* o16 = reinterpret_cast<uint16_t*>(out);
            if (d == 128) emit_indexer_row<4>(row, d, o16);
            else if (d == 64) emit_indexer_row<2>(row, d, o16);
            else emit_indexer_row<1>(row, d, o16);
        }
    }
}

__global__ void __launch_bounds__(kSaveThreads) compressor_save_kernel(CompressorArgs a, BatchView b, int groups) {
    pdl_begin();
    const int c = static_cast<int>(blockIdx.x), g = static_cast<int>(blockIdx.y);
    const int r = a.ratio, d = a.dim;
    const int64_t width = a.overlap ? 2 * static_cast<int64_t>(d) : d;
    const int32_t t0 = b.chunk_first[c];
    const int64_t p0 = b.pos[t0];
    const int64_t end = p0 + b.chunk_len[c];              // n_past after this step
    const int64_t open1 = end / r;                        // window open at the chunk's end
    const int n_open = static_cast<int>(end % r);         // its valid slots
    // Windows closed by this chunk: v_lo .. open1 - 1 (window v closes at v·r + r - 1 >= p0).
    const int64_t v_lo = p0 / r, v_hi = open1 - 1;
    const StateRecord st = state_record(a, b.slot[t0], width);

    for (int s = g; s < r; s += groups) {
        // The chunk's latest position with slot s: in the open window, else in the last closed one.
        const int64_t q_pend = open1 * r + s - (s < n_open ? 0 : r);
        const bool pend_here = q_pend >= p0;
        const bool prev_here = a.overlap && v_hi >= v_lo;
        if (!prev_here && !pend_here) continue;           // uniform over the CTA
        for (int64_t col = threadIdx.x; col < width; col += blockDim.x) {
            if (prev_here && col < d) {
                // Series A of the last two windows closed here, each into its parity's buffer.
                for (int64_t v = v_hi - 1 > v_lo ? v_hi - 1 : v_lo; v <= v_hi; ++v) {
                    const int64_t q = v * r + s;
                    float kv, gt;
                    if (q >= p0) {
                        const int64_t src = static_cast<int64_t>(t0) + (q - p0);
                        kv = a.kv[src * width + col];
                        gt = __fadd_rn(a.gate[src * width + col], a.ape[s * width + col]);
                    } else {   // v was open at the chunk's start: pending (read before written below)
                        kv = st.pend_kv(v)[s * width + col];
                        gt = st.pend_gate(v)[s * width + col];
                    }
                    st.prev_kv(v)[static_cast<int64_t>(s) * d + col] = kv;
                    st.prev_gate(v)[static_cast<int64_t>(s) * d + col] = gt;
                }
            }
            if (pend_here) {
                const int64_t src = static_cast<int64_t>(t0) + (q_pend - p0);
                const int64_t u = q_pend / r;   // its window (overlap: the pending set of u's parity)
                st.pend_kv(u)[s * width + col] = a.kv[src * width + col];
                st.pend_gate(u)[s * width + col] = __fadd_rn(a.gate[src * width + col], a.ape[s * width + col]);
            }
        }
    }
}

template <typename V>
__global__ void __launch_bounds__(kWindowThreads) window_write_kernel(const V* kv, int64_t row_vecs, int64_t hd,
                                                                     int64_t W, SlotArray window, BatchView b) {
    pdl_begin();
    const int lane = static_cast<int>(threadIdx.x) & 31;
    const int64_t t = static_cast<int64_t>(blockIdx.x) * kWindowWarps + (threadIdx.x >> 5);
    if (t >= b.T) return;
    const int32_t c = b.chunk[t];
    const int64_t i = t - b.chunk_first[c];               // index inside the chunk
    if (b.chunk_len[c] - i > W) return;                   // not among the chunk's last W tokens
    const int64_t p = b.pos[t];
    V* dst = reinterpret_cast<V*>(window.at<uint16_t>(b.slot[t]) + (p % W) * hd);
    const V* src = kv + t * row_vecs;
    for (int64_t k = lane; k < row_vecs; k += 32) dst[k] = src[k];
}

// The same rows as window_write_kernel, stored as kv_row.h fp8 rows (one warp per token): the
// encoding of fp8_block_qdq's rule, which leaves a row round_kv_latent already rounded unchanged.
__global__ void __launch_bounds__(kWindowThreads) window_write_fp8_kernel(const uint16_t* kv, KvRow f, int64_t W,
                                                                        SlotArray window, BatchView b) {
    pdl_begin();
    const int lane = static_cast<int>(threadIdx.x) & 31;
    const int64_t t = static_cast<int64_t>(blockIdx.x) * kWindowWarps + (threadIdx.x >> 5);
    if (t >= b.T) return;
    const int32_t c = b.chunk[t];
    const int64_t i = t - b.chunk_first[c];
    if (b.chunk_len[c] - i > W) return;
    const int64_t p = b.pos[t];
    uint8_t* dst = window.at<uint8_t>(b.slot[t]) + (p % W) * f.bytes();
    const uint16_t* src = kv + t * f.hd;
    const int nope = f.nope();
    for (int blk = 0; blk < f.blocks(); ++blk) {   // one pair of the 64-block per lane
        const int e = blk * KvRow::kBlock + 2 * lane;
        const bool live = e < nope;   // nope is a multiple of 16: pairs are whole
        const __nv_bfloat162 pr = live ? *reinterpret_cast<const __nv_bfloat162*>(src + e) : __floats2bfloat162_rn(0.0f, 0.0f);
        const float v0 = __low2float(pr), v1 = __high2float(pr);
        float amax = fmaxf(fabsf(v0), fabsf(v1));
#pragma unroll
        for (int o = 16; o >= 1; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        const float s = nm::fp8_scale(amax);
        if (live) *reinterpret_cast<uint16_t*>(dst + e) = static_cast<uint16_t>(nm::e4m3_code(v0, s) | (nm::e4m3_code(v1, s) << 8));
        if (lane == 0) dst[f.scale_offset() + blk] = nm::scale_byte(s);
    }
    if (lane < KvRow::kScaleBytes && lane >= f.blocks()) dst[f.scale_offset() + lane] = 0;
    const uint32_t* rope_src = reinterpret_cast<const uint32_t*>(src + nope);
    uint32_t* rope_dst = reinterpret_cast<uint32_t*>(dst + f.rope_offset());
    for (int k = lane; k < f.rope / 2; k += 32) rope_dst[k] = rope_src[k];
}

bool aligned(const void* p, uintptr_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; }

void check_args(const CompressorArgs& a, const BatchView& b, const char* what) {
    MEGAMOE_CHECK(a.ratio > 0 && a.dim > 0 && a.dim % 2 == 0, what, ": ratio ", a.ratio, ", dim ", a.dim,
                  " (dim must be even and positive)");
    MEGAMOE_CHECK(a.rope.rope_dim >= 0 && a.rope.rope_dim % 2 == 0 && a.rope.rope_dim <= a.dim, what,
                  ": rope_dim ", a.rope.rope_dim, " for dim ", a.dim);
    MEGAMOE_CHECK(b.T >= 0 && b.C >= 0, what, ": T ", b.T, ", C ", b.C);
    if (b.T == 0) return;
    MEGAMOE_CHECK(a.kv && a.gate && a.ape && a.state.base && b.pos && b.slot && b.chunk && b.chunk_first &&
                      b.chunk_len,
                  what, ": null pointer");
    // f32 pairs are read as float2: rows of even width from 8-byte aligned bases.
    MEGAMOE_CHECK(aligned(a.kv, 8) && aligned(a.gate, 8) && aligned(a.ape, 8) && aligned(a.state.base, 8) &&
                      a.state.slot_stride % 8 == 0,
                  what, ": kv, gate, ape and state must be 8-byte aligned (state stride ", a.state.slot_stride, ")");
    MEGAMOE_CHECK(a.state.slot_stride >= compressor_state_bytes(a.ratio, a.dim, a.overlap), what,
                  ": state stride ", a.state.slot_stride, " < record bytes ",
                  compressor_state_bytes(a.ratio, a.dim, a.overlap));
}

}  // namespace

int64_t compressor_state_bytes(int64_t r, int64_t d, bool overlap) {
    const int64_t width = (overlap ? 2 : 1) * d;
    return static_cast<int64_t>(sizeof(float)) * ((overlap ? 4 : 2) * r * width + (overlap ? 4 * r * d : 0));
}

void compressor_emit(const CompressorArgs& a, const BatchView& b, CUstream_st* stream) {
    check_args(a, b, "compressor_emit");
    if (b.T == 0) return;
    MEGAMOE_CHECK(a.norm_w && a.rows.pool && a.rows.block_table && (a.rope.rope_dim == 0 || a.rope.inv_freq),
                  "compressor_emit: null pointer");
    MEGAMOE_CHECK(a.rows.dim == a.dim && a.rows.ratio == a.ratio, "compressor_emit: rows are ", a.rows.dim,
                  " wide at ratio ", a.rows.ratio, ", the compressor's ", a.dim, " at ratio ", a.ratio);
    if (a.kv_fp8) {
        const KvRow f{a.dim, a.rope.rope_dim, true};
        MEGAMOE_CHECK(a.numerics == Numerics::official && !a.indexer_keys && KvRow::fp8_fits(a.dim, a.rope.rope_dim),
                      "compressor_emit: fp8 rows are the attention compressor's under official numerics, with dim − "
                      "rope_dim a multiple of 16 and rope_dim of 8 (dim ", a.dim, ", rope_dim ", a.rope.rope_dim, ")");
        MEGAMOE_CHECK(a.rows.stride() == f.bytes(), "compressor_emit: rows of ", a.rows.stride(), " bytes, an fp8 row is ",
                      f.bytes());
    } else {
        MEGAMOE_CHECK(a.rows.stride() == 2 * static_cast<int64_t>(a.dim), "compressor_emit: rows of ", a.rows.stride(),
                      " bytes, a bf16 row is ", 2 * a.dim);
    }
    MEGAMOE_CHECK(a.rows.block_tokens > 0 && a.rows.block_tokens % a.ratio == 0 && a.rows.max_blocks > 0,
                  "compressor_emit: block_tokens ", a.rows.block_tokens, " is not a positive multiple of ratio ",
                  a.ratio);
    // Rows are stored as bf16 pairs (4-byte stores).
    MEGAMOE_CHECK(aligned(a.rows.pool, 4) && a.rows.block_bytes % 4 == 0 && a.rows.layer_offset % 4 == 0,
                  "compressor_emit: rows must be 4-byte aligned (block_bytes ", a.rows.block_bytes,
                  ", layer_offset ", a.rows.layer_offset, ")");
    if (a.numerics == Numerics::official && a.indexer_keys)
        MEGAMOE_CHECK(a.dim <= 128 && (a.dim & (a.dim - 1)) == 0, "compressor_emit: indexer keys of dim ", a.dim,
                      " (official numerics: a power of two ≤ 128, the Hadamard of round_indexer_qk)");
    const int n_max = a.overlap ? 2 * a.ratio : a.ratio;
    const size_t smem = static_cast<size_t>(n_max) * 3 * sizeof(const float*) + static_cast<size_t>(a.dim) * 4 +
                        32 * sizeof(double);
    MEGAMOE_CHECK(smem <= 48 * 1024, "compressor_emit: ratio ", a.ratio, " and dim ", a.dim,
                  " need ", smem, " bytes of shared memory (limit 48 KiB)");
    const int threads = std::min(kEmitMaxThreads, (a.dim / 2 + 31) / 32 * 32);
    auto kernel = a.numerics == Numerics::official ? compressor_emit_kernel<true> : compressor_emit_kernel<false>;
    CUDA_CHECK(dev::launch_pdl(kernel, dim3(static_cast<unsigned>(b.T)), dim3(threads), smem, as_stream(stream), a, b));
}

void compressor_save(const CompressorArgs& a, const BatchView& b, CUstream_st* stream) {
    check_args(a, b, "compressor_save");
    if (b.T == 0 || b.C == 0) return;
    const int groups = std::min(a.ratio, kSaveMaxGroups);
    CUDA_CHECK(dev::launch_pdl(compressor_save_kernel, dim3(static_cast<unsigned>(b.C), static_cast<unsigned>(groups)),
                               dim3(kSaveThreads), 0, as_stream(stream), a, b, groups));
}

void window_write(const uint16_t* kv, int64_t hd, int64_t W, const SlotArray& window, const BatchView& b,
                  CUstream_st* stream, const KvRow& fmt) {
    MEGAMOE_CHECK(hd > 0 && W > 0, "window_write: hd ", hd, ", W ", W);
    MEGAMOE_CHECK(b.T >= 0, "window_write: T ", b.T);
    if (b.T == 0) return;
    MEGAMOE_CHECK(kv && window.base && b.pos && b.slot && b.chunk && b.chunk_first && b.chunk_len,
                  "window_write: null pointer");
    if (fmt.fp8)
        MEGAMOE_CHECK(fmt.hd == hd && KvRow::fp8_fits(fmt.hd, fmt.rope), "window_write: fp8 rows of ", fmt.hd,
                      " values with ", fmt.rope, " rope dims for kv rows of ", hd,
                      " (needs hd − rope a multiple of 16, rope of 8)");
    const int64_t row_bytes = fmt.fp8 ? fmt.bytes() : hd * 2;
    MEGAMOE_CHECK(window.slot_stride >= W * row_bytes, "window_write: slot stride ", window.slot_stride, " < ",
                  W * row_bytes, " bytes of ring");
    const dim3 grid(static_cast<unsigned>((static_cast<int64_t>(b.T) + kWindowWarps - 1) / kWindowWarps));
    if (fmt.fp8) {
        MEGAMOE_CHECK(aligned(kv, 4) && aligned(window.base, 4) && window.slot_stride % 4 == 0,
                      "window_write: kv and the ring must be 4-byte aligned");
        CUDA_CHECK(dev::launch_pdl(window_write_fp8_kernel, grid, dim3(kWindowThreads), 0, as_stream(stream), kv, fmt,
                                   W, window, b));
        return;
    }
    const bool vec = hd % 8 == 0 && aligned(kv, 16) && aligned(window.base, 16) && window.slot_stride % 16 == 0;
    if (vec)
        CUDA_CHECK(dev::launch_pdl(window_write_kernel<uint4>, grid, dim3(kWindowThreads), 0, as_stream(stream),
                                   reinterpret_cast<const uint4*>(kv), hd / 8, hd, W, window, b));
    else
        CUDA_CHECK(dev::launch_pdl(window_write_kernel<uint16_t>, grid, dim3(kWindowThreads), 0, as_stream(stream),
                                   kv, hd, hd, W, window, b));
}

}  // namespace megamoe::cuda
