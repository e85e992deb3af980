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

struct CUstream_st;

namespace megamoe::cuda {

// X[t, j, :] = f32(table[ids[t], :]) for every stream j < hc.               twin: ops::embed + repeat
// table bf16 [V, D]; ids int32 [T] (in [0, V): checked by the runner); X f32 [T, hc, D].
void embed_streams(const uint16_t* table, const int32_t* ids, int64_t T, int64_t D, int64_t hc, float* X,
                   CUstream_st* stream);

// y[r, :] = x[r, :] · rsqrt(mean(x[r]²) + eps) (· w)                          twin: ops::rms_norm
// x f32 [rows, D]; w bf16 [D] or null (unweighted); y bf16 [rows, D].
void rms_norm_rows(const float* x, int64_t rows, int64_t D, const uint16_t* w, float eps, uint16_t* y,
                   CUstream_st* stream);

// Per head of x f32 [T, heads, hd]: optional RMS norm over the head's hd values (weight w bf16 [hd]
// or null), then RoPE on the last rope.rope_dim dims at position pos[t]; y bf16 [T, heads, hd].
// twin: ops::rms_norm(x, T·heads, hd, w) then ops::rope(...)   (normalize = false: rope only)
// Used for q (unweighted), kv (kv_norm) and the indexer's q (rope only). rope.rope_dim even and
// ≤ hd (0: no rotation; pos and inv_freq may then be null); w must be null when !normalize.
// angle = f32(pos[t]) · inv_freq[i], then the accurate cosf / sinf (not __cosf), as the twin.
void head_norm_rope(const float* x, int64_t T, int64_t heads, int64_t hd, bool normalize, const uint16_t* w,
                    float eps, const int32_t* pos, const RopeView& rope, uint16_t* y, CUstream_st* stream);

// h[t, i] = silu(min(g[t, i], L)) · clamp(u[t, i], -L, L)        twin: the SwiGLU of ops::expert_ffn
// with scale = nullptr (the shared expert). g, u f32 [T, I] (the w1 and w3 outputs); h bf16 [T, I].
void swiglu(const float* g, const float* u, int64_t T, int64_t I, float limit, uint16_t* h, CUstream_st* stream);

// X[t, j, :] = a[t, j, :] + b[t, :] for every stream j < hc (f32 adds).  twin: the MTP block's
// input sum in ref mtp_forward (h_proj of each stream plus e_proj of the token).
// a f32 [T, hc, D], b f32 [T, D], X f32 [T, hc, D] (may alias a, not b).
void add_rows_broadcast(const float* a, const float* b, int64_t T, int64_t hc, int64_t D, float* X,
                        CUstream_st* stream);

// dst[i, :] = src[idx[i], :] for i < n (bf16 rows of `width`; idx in range: checked by the caller).
//                                                                           (the head's row selection)
void gather_rows_bf16(const uint16_t* src, const int32_t* idx, int64_t n, int64_t width, uint16_t* dst,
                      CUstream_st* stream);

// Copies the f32 rows [n, width] into bf16 (round to nearest even; the same bits as
// megamoe::f32_to_bf16, NaN included).
void f32_to_bf16_rows(const float* src, int64_t n, int64_t width, uint16_t* dst, CUstream_st* stream);

}  // namespace megamoe::cuda
