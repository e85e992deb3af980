// hyper_conn.h — the manifold-constrained hyper-connections on the GPU: the mixing projection
// (optionally fused with the previous site's hc_post), the Sinkhorn finish that collapses the
// streams into the sublayer's normalized input, and the HC head. Host API; plain C++.
//
// The residual streams stay f32 on the device ([T, hc, D], stream-major per token, as on the CPU).
// One site costs two kernels:
//   hc_mix      part[s, t, :] = partial sums over split s of the flattened streams of token t:
//               n_mix dot products with fn's rows and the sum of squares (in that order, n_mix + 1
//               values). With `post`, it first computes the previous site's output
//                   X_out[t, k, :] = post[t, k] · y[t, :] + Σ_j comb[t, j, k] · X_in[t, j, :]
//               (ops::hc_post), writes it, and mixes that (the fused post-of-l / pre-of-l+1 that
//               saves a pass over the streams); without it, it mixes X_in as is.
//   hc_pre_finish / hc_head_finish
//               reduce the splits in a fixed order, then per token: mixes = dots · rsqrt(ss/n + eps),
//               the pre / post weights and the Sinkhorn comb (ops::hc_pre) or the head's weights
//               (ops::hc_head), u = Σ_j pre_j X[t, j, :], and the RMS norm of u with the sublayer's
//               weight (ops::rms_norm) into bf16.
// Numerics::official adds the official code's bf16 roundings (ref block_forward / head_logits): the
// sublayer output y and the new streams X_out of the fused post, and u before its norm; and the
// finishes can also write xq, xn with round_gemm_input applied (the FP8 GEMMs' input).
// Twin: ops::hc_post, ops::hc_pre / ops::hc_head, ops::rms_norm composed. The splits exist so that a
// decode step (T = 1) reads fn (24 × hc·D f32: 1.5 MB on V4-Flash) with many CTAs.
#pragma once

#include <cstdint>

#include "core/numerics.h"

struct CUstream_st;

namespace megamoe::cuda {

// How many splits hc_mix uses for T tokens of width n = hc·D (enough CTAs to cover the GPU; a
// function of T and n only, so a captured graph and an eager call agree). The partial buffer
// holds splits · T · (n_mix + 1) floats.
int64_t hc_mix_splits(int64_t T, int64_t n);

// X_in f32 [T, hc, D]; fn f32 [n_mix, hc·D]; part f32 [splits, T, n_mix + 1] (every element written;
// any splits ≥ 1 works, the finish must be given the same count). hc ∈ {1, 2, 4, 8} and
// n_mix ∈ {(2 + hc)·hc (a site), hc (the head)} (compile-time variants); others throw.
// Fused post (all four non-null, else all null): y f32 [T, D], post f32 [T, hc], comb f32 [T, hc, hc]
// (comb[t, j, k] as ops::hc_post reads it), X_out f32 [T, hc, D] (may not alias X_in).
// stage_fn: from 32 tokens on (D % 4 == 0, aligned; a site's mix up to hc = 4, every head mix), fn goes
// through shared memory in chunks shared by the CTA's tokens; the same sums in the same order as
// without it (false: loads from L2), so the same bits.
void hc_mix(const float* X_in, const float* y, const float* post, const float* comb, float* X_out, int64_t T,
            int64_t hc, int64_t D, const float* fn, int64_t n_mix, float* part, int64_t splits, CUstream_st* stream,
            Numerics nm = Numerics::exact, bool stage_fn = true);

// The pre-site finish. X f32 [T, hc, D] (the streams hc_mix mixed: its X_out when fused, else X_in);
// base f32 [(2 + hc)·hc]; scale f32 [3]; norm_w bf16 [D]; outputs xn bf16 [T, D] (the normalized
// sublayer input), post f32 [T, hc], comb f32 [T, hc, hc]. hc ≤ 8. norm_w may be null (unweighted).
// xq bf16 [T, D] or null: xn FP8-rounded in 128-blocks per row (twin ops::round_gemm_input).
// xq8 u8 [T, D] and xs8 f32 [T, D/128] (both or neither, and then xq too): xq as codes and scales
// (quantize_gemm_input's layout, linear_fp8_act's input), fused when xq is.
// Shared memory D·4 bytes (D ≤ 58112).
void hc_pre_finish(const float* part, int64_t splits, const float* X, int64_t T, int64_t hc, int64_t D,
                   const float* base, const float* scale, int64_t sinkhorn_iters, float hc_eps, float norm_eps,
                   const uint16_t* norm_w, uint16_t* xn, float* post, float* comb, CUstream_st* stream,
                   Numerics nm = Numerics::exact, uint16_t* xq = nullptr, uint8_t* xq8 = nullptr,
                   float* xs8 = nullptr);

// The head finish (n_mix = hc, no Sinkhorn): pre_j = sigmoid(mix_j · scale[0] + base[j]) + hc_eps,
// u = Σ_j pre_j X[j], xn = rms_norm(u, norm_w) bf16 [T, D].
void hc_head_finish(const float* part, int64_t splits, const float* X, int64_t T, int64_t hc, int64_t D,
                    const float* base, const float* scale, float hc_eps, float norm_eps, const uint16_t* norm_w,
                    uint16_t* xn, CUstream_st* stream, Numerics nm = Numerics::exact, uint16_t* xq = nullptr);

}  // namespace megamoe::cuda
