// numerics.h — the official inference code's activation roundings (deepseek-v4.md §2.3-2.5) as
// standalone in-place kernels, for the sites of the GPU forward that run under Numerics::official.
// Host API; plain C++, compiles without the CUDA toolkit.
//
// Each call is the GPU twin of an op of ref/ops_numerics.cpp and gives its bits exactly (the
// element steps are numerics.cuh's; the block reductions are maxima, exact in any order, and the
// Hadamard butterflies add in the twin's order). "bf16" buffers hold bf16 bit patterns
// (uint16_t). All calls are asynchronous on `stream`, allocate nothing, launch a fixed grid for
// given shapes (graph-capturable) and are deterministic. Inputs are finite (NaN and ±inf are not
// activations; their results are unspecified).
#pragma once

#include <cstdint>

struct CUstream_st;

namespace megamoe::cuda {

// FP8 e4m3 block fake-quant in place, per row: the first `width` elements of each row of x
// bf16 [rows, ld] in blocks of `block` (the last one partial when block ∤ width); per block
// amax = max(max|x|, 1e-4), s = 2^ceil(log2(amax / 448)), x = bf16(e4m3(clamp(x / s, ±448)) · s).
// Elements [width, ld) of each row are untouched.
//   block 128, width = ld = K: a GEMM input             twin: ops::round_gemm_input
//   block 64,  width = hd − rope, ld = hd: the KV latent twin: ops::round_kv_latent
// One warp per block, 8 warps per CTA; 2..16-byte vector loads when block, ld and x allow.
// Requires 1 ≤ width ≤ ld, block ≥ 1, rows ≥ 0.
void fp8_block_round(uint16_t* x, int64_t rows, int64_t ld, int64_t width, int64_t block, CUstream_st* stream);

// The official GEMM input in the form the FP8 × FP8 linear takes (ActFp8, linear.h): for each row of
// x bf16 [rows, K] and 128-block, s = 2^ceil(log2(max(amax, 1e-4) / 448)) (f32 [rows, K/128]) and the
// e4m3 codes of clamp(x / s, ±448) (q [rows, K], each 4-byte word in kernel order: bytes k0 k2 k1
// k3). q · s is round_gemm_input(x) bit for bit (and x itself when x is already rounded: a rounded
// block requantizes exactly).                    twin: ops::round_gemm_input (of which q · s is the value)
// K % 128 == 0, x 8-byte aligned, q and s 4-byte aligned. One warp per block, 8 per CTA.
// ra_order: the 4-byte words of q in the register-A W4A8 tile's order instead (w4a8.h, ra_word:
// within each 32-column slice the even words, then the odd ones); the same words, the same s.
void quantize_gemm_input(const uint16_t* x, int64_t rows, int64_t K, uint8_t* q, float* s, CUstream_st* stream,
                         bool ra_order = false);
// fp8_block_round(x, rows, K, K, 128) and quantize_gemm_input in one pass: x is rounded in place and
// q, s are written (same requirements and ra_order as quantize_gemm_input).
void fp8_block_round_q(uint16_t* x, int64_t rows, int64_t K, uint8_t* q, float* s, CUstream_st* stream,
                       bool ra_order = false);

// The indexer's query / key rounding in place: each row of x bf16 [rows, hd] is rotated by the
// hd-point Walsh-Hadamard transform (f32 butterflies h = 1, 2, 4, ..., then · 1/sqrt(hd)), rounded
// to bf16, then FP4 e2m1 fake-quant in 32-blocks (s = 2^ceil(log2(max(amax, 6·2^-126) / 6))).
//                                                                   twin: ops::round_indexer_qk
// hd a power of two, 1 ≤ hd ≤ 128 (dI = 128 in the releases). One warp per row.
void round_indexer_qk(uint16_t* x, int64_t rows, int64_t hd, CUstream_st* stream);

// x f32 [n] in place: every value rounded to bf16 (RNE) and widened back.   twin: ops::round_bf16
void round_bf16_inplace(float* x, int64_t n, CUstream_st* stream);

// ---- test entry point: numerics.cuh's scalar functions, element-wise on device arrays.
enum class ScalarOp : int32_t {
    bf16_round,   // y = nm::bf16_round(x)
    pow2_ceil,    // y = nm::pow2_ceil(x)            (x > 0, normal)
    fp8_scale,    // y = nm::fp8_scale(x)            (x = a block amax ≥ 0)
    fp4_scale,    // y = nm::fp4_scale(x)
    e4m3_round,   // y = nm::e4m3_round(x)
    e2m1_round,   // y = nm::e2m1_round(x)
    fp8_qdq,      // y = nm::fp8_qdq(x, s)
    fp4_qdq,      // y = nm::fp4_qdq(x, s)
    fp8_qdq_bf16x2,   // y = x's half of nm::fp8_qdq_bf16x2 on the bf16 pair {bf16(x[i & ~1]),
                      //     bf16(x[i | 1])} (0 past n) at s[i] (a power of two)
};
// x, y f32 [n] device; s f32 [n] device (the qdq ops only, else may be null).
void scalar_op_values(ScalarOp op, const float* x, const float* s, int64_t n, float* y, CUstream_st* stream);

}  // namespace megamoe::cuda
