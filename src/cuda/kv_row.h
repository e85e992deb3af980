// kv_row.h — how one KV-latent row (a sliding-window ring row, a compressed row of the attention's
// compressor) is stored in the GPU's per-sequence state, and the host twins of its codec.
// Plain C++ (the struct is host/device); compiles without the CUDA toolkit.
//
//   bf16 (Numerics::exact): the hd values as bf16, 2·hd bytes.
//   fp8  (Numerics::official, the official code's FP8 KV cache, deepseek-v4.md §2.4): the row holds
//        exactly what ops::round_kv_latent leaves in it (the nope dims e4m3 in 64-blocks with
//        power-of-two scales, the rope dims bf16), as
//          bytes [0, nope)               e4m3 codes of dims 0 .. nope − 1      (nope = hd − rope)
//                [nope, nope + 2·rope)   the rope dims, bf16
//                [nope + 2·rope, + 16)   one byte per 64-block b of the nope dims (the last block
//                                        may be shorter): the biased exponent e of its scale
//                                        2^(e − 127) (an E8M0 byte); the rest zero
//        V4's hd 512 / rope 64 row is 592 bytes instead of 1024. Needs nope % 16 == 0 (every part
//        16-byte aligned), rope % 8 == 0 and at most 16 blocks (fp8_fits).
//
// Encoding applies fp8_block_qdq's element rule to the nope dims of bf16 values (the block's
// scale s = pow2_ceil(max(amax, 1e-4) / 448), the code e4m3(clamp(v / s, ±448)), round to nearest
// even, saturating). On a row round_kv_latent already rounded it changes no value: every v is
// q·s0 with q an e4m3 and s0 the scale of the row before rounding; the block's new amax is at most
// 448·s0, so the new scale s is s0 / 2^k (k ≥ 0), and v / s = q·2^k is again an e4m3 (a 4-bit
// significand, |v / s| ≤ 448). Decoding gives e4m3 · s, which is a bf16 (4 significant bits, s
// ≥ 2^-22), so the attention reads the same bf16 key rows from either storage, bit for bit.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cuda/step.h"
#include "io/formats.h"

namespace megamoe::cuda {

struct KvRow {
    static constexpr int32_t kBlock = 64;    // nope dims per scale
    static constexpr int32_t kScaleBytes = 16;

    int32_t hd = 0;                          // values per row
    int32_t rope = 0;                        // the trailing rope dims (bf16 in both formats)
    bool    fp8 = false;

    MEGAMOE_HD int32_t nope() const { return hd - rope; }
    MEGAMOE_HD int32_t blocks() const { return (nope() + kBlock - 1) / kBlock; }
    MEGAMOE_HD int32_t rope_offset() const { return nope(); }              // fp8: bytes before the rope dims
    MEGAMOE_HD int32_t scale_offset() const { return nope() + 2 * rope; }  // fp8: bytes before the scales
    MEGAMOE_HD int32_t bytes() const { return fp8 ? nope() + 2 * rope + kScaleBytes : 2 * hd; }

    // Whether rows of hd values with `rope` rope dims can be stored as fp8 (else they stay bf16).
    static bool fp8_fits(int64_t hd, int64_t rope) {
        const int64_t nope = hd - rope;
        return rope >= 0 && nope > 0 && nope % 16 == 0 && rope % 8 == 0 && (nope + kBlock - 1) / kBlock <= kScaleBytes;
    }
};

// The E8M0 byte of the FP8 scale of a block with largest magnitude amax: pow2_ceil(max(amax, 1e-4)
// / 448) (ops::fp8_block_qdq's scale), as its biased exponent.
inline uint8_t kv_fp8_scale_byte(float amax) {
    return e8m0_ceil(std::fmax(amax, 1e-4f) / 448.0f);
}

// Host twins of the device codec (window_write, compressor_emit; the attention's tile loader and
// StatePool::download decode). v: hd f32 values (bf16 values for a lossless round trip).
inline void kv_row_encode(const KvRow& f, const float* v, uint8_t* out) {
    if (!f.fp8) {
        for (int32_t i = 0; i < f.hd; ++i) {
            const uint16_t b = f32_to_bf16(v[i]);
            std::memcpy(out + 2 * i, &b, 2);
        }
        return;
    }
    std::memset(out, 0, static_cast<size_t>(f.bytes()));
    for (int32_t b = 0; b < f.blocks(); ++b) {
        const int32_t i0 = b * KvRow::kBlock, i1 = std::min(f.nope(), i0 + KvRow::kBlock);
        float amax = 0.0f;
        for (int32_t i = i0; i < i1; ++i) amax = std::fmax(amax, std::fabs(v[i]));
        const uint8_t e = kv_fp8_scale_byte(amax);
        const float s = e8m0_to_f32(e);
        for (int32_t i = i0; i < i1; ++i) out[i] = f32_to_e4m3(std::fmin(std::fmax(v[i] / s, -448.0f), 448.0f));
        out[f.scale_offset() + b] = e;
    }
    for (int32_t i = 0; i < f.rope; ++i) {
        const uint16_t b = f32_to_bf16(v[f.nope() + i]);
        std::memcpy(out + f.rope_offset() + 2 * i, &b, 2);
    }
}

inline void kv_row_decode(const KvRow& f, const uint8_t* in, float* v) {
    auto bf16_at = [&](int32_t byte) {
        uint16_t b;
        std::memcpy(&b, in + byte, 2);
        return bf16_to_f32(b);
    };
    if (!f.fp8) {
        for (int32_t i = 0; i < f.hd; ++i) v[i] = bf16_at(2 * i);
        return;
    }
    for (int32_t i = 0; i < f.nope(); ++i)
        v[i] = e4m3_to_f32(in[i]) * e8m0_to_f32(in[f.scale_offset() + i / KvRow::kBlock]);
    for (int32_t i = 0; i < f.rope; ++i) v[f.nope() + i] = bf16_at(f.rope_offset() + 2 * i);
}

}  // namespace megamoe::cuda
