// rowwise.h — the row-by-row ops of the forward on the GPU: embedding, RMS norms, RoPE, the
// clamped SwiGLU of the shared expert, row gathers. Host API; plain C++, compiles without CUDA.
//
// Each op names its CPU twin (ref/ops.h). Shapes in brackets; "bf16" buffers hold bf16 bit
// patterns (uint16_t). All calls are asynchronous on `stream`, allocate nothing, launch a fixed
// grid for given shapes (graph-capturable) and are deterministic (no atomics). Reductions run in
// f32 in a fixed order; results differ from the f32 twins by the bf16 rounding of bf16 outputs
// and by f32 summation order (the tests bound both).
#pragma once

#include <cstdint>

#include "cuda/step.h"
#include "core/numerics.h"

struct CUstream_st;

namespace megamoe::cuda {

// X[t, j, :] = f32(table[ids[t], :]) for every stream j < hc.               twin: ops::embed + repeat
// table bf16 [V, D]; ids int32 [T] (in [0, V): checked by the runner); X f32 [T, hc, D].
void embed_streams(const uint16_t* table, const int32_t* ids, int64_t T, int64_t D, int64_t hc, float* X,
                   CUstream_st* stream);

// y[r, :] = x[r, :] · rsqrt(mean(x[r]²) + eps) (· w)                          twin: ops::rms_norm
// x f32 [rows, D]; w bf16 [D] or null (unweighted); y bf16 [rows, D].
// Numerics::official: x (a linear's f32 output, bf16 in the official code) is rounded to bf16 first.
// yq bf16 [rows, D] or null: y FP8-rounded in 128-blocks (ops::round_gemm_input), the input of the
// quantized linears that read it; may equal y (the row is then only kept rounded).
// yq8 u8 [rows, D] and ys8 f32 [rows, D/128], both or neither (and then yq too): yq as codes and
// scales (quantize_gemm_input's layout, the input of linear_fp8_act), fused into the same pass.
void rms_norm_rows(const float* x, int64_t rows, int64_t D, const uint16_t* w, float eps, uint16_t* y,
                   CUstream_st* stream, Numerics nm = Numerics::exact, uint16_t* yq = nullptr,
                   uint8_t* yq8 = nullptr, float* ys8 = nullptr);

// Per head of x f32 [T, heads, hd]: optional RMS norm over the head's hd values (weight w bf16 [hd]
// or null), then RoPE on the last rope.rope_dim dims at position pos[t]; y bf16 [T, heads, hd].
// twin: ops::rms_norm(x, T·heads, hd, w) then ops::rope(...)   (normalize = false: rope only)
// Used for q (unweighted), kv (kv_norm) and the indexer's q (rope only). rope.rope_dim even and
// ≤ hd (0: no rotation; pos and inv_freq may then be null); w must be null when !normalize.
// angle = f32(pos[t]) · inv_freq[i], then the accurate cosf / sinf (not __cosf), as the twin.
// Numerics::official (the sequence of ref attention_inputs; x is a linear's f32 output, which the
// official linears return in bf16): x is first rounded to bf16, then
//   normalize, w (kv):     ops::rms_norm (its f64 sum of squares, the same bits), round_bf16, rope
//   normalize, no w (q):   ops::head_rms_norm_bf16 (each op rounded to bf16; its f32 sum of the
//                          squares in element order, kept sequential here for the same bits), rope
//   !normalize (idx q):    rope
// and y is bf16 as in exact numerics. The FP8 rounding of the kv latent (round_kv_latent) and the
// indexer's Hadamard + FP4 (round_indexer_qk) are separate calls on y (cuda/numerics.h).
void head_norm_rope(const float* x, int64_t T, int64_t heads, int64_t hd, bool normalize, const uint16_t* w,
                    float eps, const int32_t* pos, const RopeView& rope, uint16_t* y, CUstream_st* stream,
                    Numerics nm = Numerics::exact);

// h[t, i] = silu(min(g[t, i], L)) · clamp(u[t, i], -L, L)        twin: the SwiGLU of ops::expert_ffn
// with scale = nullptr (the shared expert). g, u f32 [T, I] (the w1 and w3 outputs); h bf16 [T, I].
// Numerics::official: g and u rounded to bf16 first (the official w1 / w3 outputs are bf16).
void swiglu(const float* g, const float* u, int64_t T, int64_t I, float limit, uint16_t* h, CUstream_st* stream,
            Numerics nm = Numerics::exact);

// X[t, j, :] = a[t, j, :] + b[t, :] for every stream j < hc (f32 adds).  twin: the MTP block's
// input sum in ref mtp_forward (h_proj of each stream plus e_proj of the token).
// a f32 [T, hc, D], b f32 [T, D], X f32 [T, hc, D] (may alias a, not b).
// Numerics::official: a and b rounded to bf16 as read and X = bf16(a + b) (ref mtp_forward).
void add_rows_broadcast(const float* a, const float* b, int64_t T, int64_t hc, int64_t D, float* X,
                        CUstream_st* stream, Numerics nm = Numerics::exact);

// dst[i, :] = src[idx[i], :] for i < n (bf16 rows of `width`; idx in range: checked by the caller).
//                                                                           (the head's row selection)
void gather_rows_bf16(const uint16_t* src, const int32_t* idx, int64_t n, int64_t width, uint16_t* dst,
                      CUstream_st* stream);

// dst[i, :] = src[idx[i], :] for i < n, f32 rows of `width` (the MTP block's streams of chosen
// rows, Runner::draft_chain). Bit copies.
void gather_rows_f32(const float* src, const int32_t* idx, int64_t n, int64_t width, float* dst, CUstream_st* stream);

// Copies the f32 rows [n, width] into bf16 (round to nearest even; the same bits as
// megamoe::f32_to_bf16, NaN included).
void f32_to_bf16_rows(const float* src, int64_t n, int64_t width, uint16_t* dst, CUstream_st* stream);

}  // namespace megamoe::cuda
