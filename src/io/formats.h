// formats.h — bit-exact codecs for the number formats of DeepSeek-V4 checkpoints.
//
// Scalars: BF16, FP8 E4M3 (OCP "fn": no infinities, 0x7F/0xFF are NaN, max 448), FP4 E2M1
// (sign bit 3, magnitude index bits 0-2 into {0, .5, 1, 1.5, 2, 3, 4, 6}), E8M0 (2^(e-127),
// 0xFF is NaN). Encoders round to nearest, ties to even, and saturate to the format's largest
// finite value (NaN input gives the format's NaN where it has one).
//
// Weight formats (W is [out, in] row-major, y = x · Wᵀ):
//   fp8 block  — weight e4m3 [out, in]; scale e8m0 [ceil(out/128), ceil(in/128)];
//                w = e4m3 · 2^(s-127) per 128×128 block.
//   MXFP4      — weight I8 [out, in/2], two E2M1 per byte, low nibble = even column;
//                scale e8m0 [out, in/32]; w = e2m1 · 2^(s-127).
//   NVFP4      — weight U8 [out, in/2], same packing; scale e4m3 [out, in/16];
//                weight_scale_2 f32 scalar; w = e2m1 · f32(scale) · scale_2.
// A block whose scale decodes to zero decodes to exactly 0.
#pragma once

#include <cstdint>

#include "core/tensor.h"

namespace megamoe {

// ---- scalars
float    bf16_to_f32(uint16_t v);
uint16_t f32_to_bf16(float v);                 // RNE; NaN stays NaN (quiet)
float    e4m3_to_f32(uint8_t v);
uint8_t  f32_to_e4m3(float v);                 // RNE, saturates to ±448, NaN -> 0x7F
float    e2m1_to_f32(uint8_t nibble);          // low 4 bits used
uint8_t  f32_to_e2m1(float v);                 // RNE, saturates to ±6, NaN -> 0 (E2M1 has no NaN)
float    e8m0_to_f32(uint8_t v);               // 2^(v-127); 0xFF -> NaN
uint8_t  e8m0_ceil(float v);                   // smallest 2^k >= v (v > 0), as E8M0; clamped to [0, 254]

constexpr int kFp8Block   = 128;  // fp8 weight scale block (both dims)
constexpr int kMxfp4Group = 32;   // MXFP4 inputs per scale
constexpr int kNvfp4Group = 16;   // NVFP4 inputs per scale

// ---- weight formats of a projection W [out, in] (y = x · Wᵀ), and their facts in one table.
enum class LinearFormat : uint8_t { f32, bf16, fp8_block, mxfp4, nvfp4 };

// Everything that differs between weight formats except the arithmetic of decoding: tensor names
// and dtypes, packed sizes, the shape of the scale tensor. Every layer reads these facts here
// (the binder, `megamoe info`, the device upload, the benchmarks) instead of switching on the format.
struct FormatInfo {
    LinearFormat format;
    const char* name;               // for logs and `megamoe info`
    int         weight_bits;        // bits per packed weight element: 32, 16, 8 or 4
    DType       weight_dtype;       // dtype of PREFIX.weight in the checkpoint
    DType       weight_dtype_alt;   // also accepted on upload (I8 and U8 packings are the same bytes)
    const char* scale_suffix;       // block scales: PREFIX.<suffix>; nullptr: none
    DType       scale_dtype;
    int         scale_rows_per;     // one scale covers scale_rows_per × scale_cols_per weights
    int         scale_cols_per;     //   (fp8 128×128, MXFP4 1×32, NVFP4 1×16); 0 without scales
    bool        global_scales;      // NVFP4: PREFIX.weight_scale_2 and PREFIX.input_scale, f32 scalars

    bool    has_scales() const { return scale_suffix != nullptr; }
    // `in` this format can hold: fp4 packs whole scale groups only (throws Error otherwise, naming `what`).
    void    check_in(int64_t in, const char* what) const;
    int64_t packed_row_bytes(int64_t in) const { return in * weight_bits / 8; }
    int64_t weight_cols(int64_t in) const { return weight_bits == 4 ? in / 2 : in; }   // PREFIX.weight is [out, this]
    int64_t scale_rows(int64_t out) const { return has_scales() ? (out + scale_rows_per - 1) / scale_rows_per : 0; }
    int64_t scale_cols(int64_t in) const { return has_scales() ? (in + scale_cols_per - 1) / scale_cols_per : 0; }
    // Bytes as the checkpoint stores them: weight + block scales (+ the 8 bytes of NVFP4's scalars).
    int64_t packed_bytes(int64_t out, int64_t in) const {
        return out * packed_row_bytes(in) + scale_rows(out) * scale_cols(in) + (global_scales ? 8 : 0);
    }
};
const FormatInfo& format_info(LinearFormat f);
inline const char* linear_format_name(LinearFormat f) { return format_info(f).name; }

// ---- row decoders: expand one weight row n into `in` floats.
// bf16: w -> &weight[n*in]
void decode_bf16_row(const uint16_t* w, int64_t in, float* out);
// fp8: w_row -> &weight[n*in], s_row -> &scale[(n/128) * ceil(in/128)]
void decode_fp8_block_row(const uint8_t* w_row, const uint8_t* s_row, int64_t in, float* out);
// mxfp4: q_row -> &weight[n*in/2], s_row -> &scale[n*in/32]
void decode_mxfp4_row(const uint8_t* q_row, const uint8_t* s_row, int64_t in, float* out);
// nvfp4: q_row -> &weight[n*in/2], s_row -> &weight_scale[n*in/16]
void decode_nvfp4_row(const uint8_t* q_row, const uint8_t* s_row, float scale_2, int64_t in, float* out);

// ---- quantizers (used by `megamoe synth` and the tests); w is f32 [out, in].
// fp8 block: s = 2^ceil(log2(amax/448)) per 128×128 block (amax of an all-zero block -> s = 2^-127
// is avoided: such a block gets the smallest scale 2^-127 and all-zero codes).
void quantize_fp8_block(const float* w, int64_t out, int64_t in, uint8_t* q, uint8_t* scale);
// MXFP4: s = 2^ceil(log2(amax/6)) per 32 inputs; codes = e2m1(w / s). `in` must be a multiple of 32.
void quantize_mxfp4(const float* w, int64_t out, int64_t in, uint8_t* q, uint8_t* scale);
// NVFP4 (ModelOpt recipe): scale_2 = amax(W)/(6·448); per 16 inputs s = e4m3(amax_blk/(6·scale_2));
// codes = e2m1(w / (f32(s)·scale_2)), all-zero codes where s == 0. `in` must be a multiple of 16.
void quantize_nvfp4(const float* w, int64_t out, int64_t in, uint8_t* q, uint8_t* scale, float* scale_2);

}  // namespace megamoe
