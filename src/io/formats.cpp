// formats.cpp — bit-exact scalar codecs, row decoders and quantizers for the weight formats of
// DeepSeek-V4 checkpoints (see formats.h for the format definitions).
//
// Encoders work on the IEEE-754 bit pattern with integer arithmetic, so their rounding does not
// depend on the FPU rounding mode or on the compiler's floating-point contraction. Decoders use
// lookup tables built at compile time; a decoded weight is one table load and one multiply by a
// block scale, so the row loops stay branch-free per element.
//
// Choices the header leaves open:
//   - f32_to_e4m3 and f32_to_e2m1 keep the sign of zero (-0.0 -> 0x80 / 0x8), and so do values
//     that round to zero. Any NaN encodes to 0x7F (e4m3) or 0 (e2m1), without its sign.
//   - e8m0_ceil returns 0 (2^-127) for v <= 0 and NaN, and 254 for +inf.
//   - The quantizers reject non-finite inputs (megamoe::Error): a NaN or inf would poison a
//     whole block's scale (or, for NVFP4, the whole tensor's scale_2).
//   - NVFP4: an all-zero block (or one too small for e4m3) gets scale byte 0 and zero codes; a
//     tensor whose amax is 0 (or so small that amax/2688 underflows to 0) gets scale_2 = 1 and is
//     all zero. decode_nvfp4_row writes +0.0 for a block whose scale decodes to 0, whatever
//     scale_2 is, so that "scale 0 decodes to exactly 0" holds even for a non-finite scale_2.
#include "io/formats.h"

#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/common.h"
#include "core/sanitize.h"

namespace megamoe {

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

constexpr float bits_to_f32(uint32_t u) { return std::bit_cast<float>(u); }
constexpr uint32_t f32_to_bits(float f) { return std::bit_cast<uint32_t>(f); }

// 2^e for e in [-149, 127], exact (subnormal results included).
constexpr float pow2(int e) {
    if (e >= -126) return bits_to_f32(static_cast<uint32_t>(e + 127) << 23);
    return bits_to_f32(1u << (e + 149));
}

constexpr float e4m3_value(uint8_t v) {
    const int exp = (v >> 3) & 0xF;
    const int man = v & 0x7;
    if (exp == 0xF && man == 0x7) return kNaN;  // e4m3fn: only S.1111.111 is NaN, no infinities
    // Subnormal: man · 2^-9; normal: (8 + man) · 2^(exp-10). Both products are exact.
    const float mag = exp == 0 ? static_cast<float>(man) * pow2(-9)
                               : static_cast<float>(8 + man) * pow2(exp - 10);
    return (v & 0x80) ? -mag : mag;
}

constexpr std::array<float, 256> kE4m3Table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[static_cast<size_t>(i)] = e4m3_value(static_cast<uint8_t>(i));
    return t;
}();

constexpr std::array<float, 16> kE2m1Table = {
    0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
    -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f,
};

constexpr std::array<float, 256> kE8m0Table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 255; ++i) t[static_cast<size_t>(i)] = pow2(i - 127);
    t[255] = kNaN;
    return t;
}();

// Block amax that also reports non-finite inputs (std::max would silently drop a NaN).
struct Amax {
    float amax = 0.0f;
    bool finite = true;
    void add(float w) {
        const float a = std::fabs(w);
        finite &= a <= std::numeric_limits<float>::max();
        amax = a > amax ? a : amax;
    }
};

}  // namespace

// ---- scalars

float bf16_to_f32(uint16_t v) { return bits_to_f32(static_cast<uint32_t>(v) << 16); }

uint16_t f32_to_bf16(float v) {
    const uint32_t u = f32_to_bits(v);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u)  // NaN: truncating could clear the payload, so force quiet
        return static_cast<uint16_t>((u >> 16) | 0x0040u);
    // RNE: add 0x7FFF plus the lsb of the kept half; the carry may ripple into the exponent
    // (up to inf), which is the correct rounding.
    return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

float e4m3_to_f32(uint8_t v) { return kE4m3Table[v]; }

uint8_t f32_to_e4m3(float v) {
    const uint32_t u = f32_to_bits(v);
    const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
    const uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return 0x7F;               // NaN
    if (a > f32_to_bits(448.0f)) return static_cast<uint8_t>(sign | 0x7E);  // saturate, +-inf too
    const int fe = static_cast<int>(a >> 23);       // f32 biased exponent
    if (fe >= 127 - 6) {
        // Normal in e4m3 (>= 2^-6): keep 3 mantissa bits with RNE; a carry moves into the
        // exponent field, which is the right result. Rebias 127 -> 7. Cannot pass 448 here.
        const uint32_t r = (a + 0x7FFFFu + ((a >> 20) & 1u)) >> 20;
        return static_cast<uint8_t>(sign | (r - ((127u - 7u) << 3)));
    }
    // Below 2^-6: count in units of 2^-9 (the subnormal step) with RNE. The result 8 is the code
    // of 2^-6 itself, so the subnormal/normal boundary needs no special case.
    const uint32_t sig = fe == 0 ? (a & 0x7FFFFFu) : ((a & 0x7FFFFFu) | 0x800000u);
    const int e = fe == 0 ? -126 : fe - 127;        // a = sig · 2^(e-23)
    const int shift = 14 - e;                       // a / 2^-9 = sig >> shift; shift >= 21
    if (shift >= 32) return sign;                   // a < 2^-17: far below half a step
    const uint32_t q = sig >> shift;
    const uint32_t rem = sig & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1);
    const uint32_t up = (rem > half || (rem == half && (q & 1u))) ? 1u : 0u;
    return static_cast<uint8_t>(sign | (q + up));
}

float e2m1_to_f32(uint8_t nibble) { return kE2m1Table[nibble & 0xF]; }

uint8_t f32_to_e2m1(float v) {
    if (std::isnan(v)) return 0;
    const float a = std::fabs(v);
    // Count the grid midpoints at or below |v|. At a midpoint the comparison is strict when the
    // lower neighbour has the even code (round down) and inclusive when the upper one does.
    // Values past 5 (the 4|6 midpoint) and +-inf saturate to 6 (code 7).
    const int code = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) +
                     (a >= 3.5f) + (a > 5.0f);
    return static_cast<uint8_t>(code | (std::signbit(v) ? 0x8 : 0));
}

float e8m0_to_f32(uint8_t v) { return kE8m0Table[v]; }

uint8_t e8m0_ceil(float v) {
    if (!(v > 0.0f)) return 0;  // v <= 0 or NaN: the smallest scale
    const uint32_t u = f32_to_bits(v);
    const uint32_t fe = u >> 23;
    const uint32_t man = u & 0x7FFFFFu;
    if (fe == 0)  // f32 subnormal, v = man · 2^-149 < 2^-126: 2^-126 if v > 2^-127, else 2^-127
        return man > (1u << 22) ? 1 : 0;
    // Normal: 2^(fe-127) if v is that power, else the next one. The e8m0 bias is also 127.
    const uint32_t e = fe + (man != 0 ? 1u : 0u);
    return static_cast<uint8_t>(e > 254 ? 254 : e);  // +inf and (2^127, max] clamp to 2^127
}

// ---- row decoders

// The row decoders are the CPU forward's innermost loops after the dot product; under ASan and
// TSan their ranges are checked whole and the loops run uninstrumented (core/sanitize.h). The
// loops get the tables as plain pointers and use no helper: an uninstrumented function cannot
// inline an instrumented one (std::array::operator[], bits_to_f32), which then cost a call per
// element.
namespace {

MEGAMOE_UNINSTRUMENTED void bf16_row(const uint16_t* w, int64_t in, float* out) {
    for (int64_t i = 0; i < in; ++i) out[i] = std::bit_cast<float>(static_cast<uint32_t>(w[i]) << 16);
}

MEGAMOE_UNINSTRUMENTED void fp8_block_row(const uint8_t* w_row, const uint8_t* s_row, int64_t in, float* out,
                                          const float* e4m3, const float* e8m0) {
    for (int64_t j0 = 0, b = 0; j0 < in; j0 += kFp8Block, ++b) {
        const float s = e8m0[s_row[b]];
        const int64_t j1 = j0 + kFp8Block < in ? j0 + kFp8Block : in;  // last block may be partial
        for (int64_t j = j0; j < j1; ++j) out[j] = e4m3[w_row[j]] * s;
    }
}

MEGAMOE_UNINSTRUMENTED void mxfp4_row(const uint8_t* q_row, const uint8_t* s_row, int64_t in, float* out,
                                      const float* e2m1, const float* e8m0) {
    for (int64_t g = 0; g < in / kMxfp4Group; ++g) {
        const float s = e8m0[s_row[g]];
        const uint8_t* q = q_row + g * (kMxfp4Group / 2);
        float* o = out + g * kMxfp4Group;
        for (int i = 0; i < kMxfp4Group / 2; ++i) {
            o[2 * i] = e2m1[q[i] & 0xF] * s;     // low nibble = even element
            o[2 * i + 1] = e2m1[q[i] >> 4] * s;
        }
    }
}

MEGAMOE_UNINSTRUMENTED void nvfp4_row(const uint8_t* q_row, const uint8_t* s_row, float scale_2, int64_t in, float* out,
                                      const float* e2m1, const float* e4m3) {
    for (int64_t g = 0; g < in / kNvfp4Group; ++g) {
        const float s = e4m3[s_row[g]];
        const uint8_t* q = q_row + g * (kNvfp4Group / 2);
        float* o = out + g * kNvfp4Group;
        if (s == 0.0f) {  // exactly 0 even if scale_2 is inf/NaN (0 · inf would be NaN)
            for (int i = 0; i < kNvfp4Group; ++i) o[i] = 0.0f;
            continue;
        }
        // (code · scale) · scale_2, in this order: the product the reference computes.
        for (int i = 0; i < kNvfp4Group / 2; ++i) {
            o[2 * i] = e2m1[q[i] & 0xF] * s * scale_2;
            o[2 * i + 1] = e2m1[q[i] >> 4] * s * scale_2;
        }
    }
}

}  // namespace

void decode_bf16_row(const uint16_t* w, int64_t in, float* out) {
    sanitize_read(w, in);
    sanitize_write(out, in);
    bf16_row(w, in, out);
}

void decode_fp8_block_row(const uint8_t* w_row, const uint8_t* s_row, int64_t in, float* out) {
    sanitize_read(w_row, in);
    sanitize_read(s_row, (in + kFp8Block - 1) / kFp8Block);
    sanitize_write(out, in);
    fp8_block_row(w_row, s_row, in, out, kE4m3Table.data(), kE8m0Table.data());
}

void decode_mxfp4_row(const uint8_t* q_row, const uint8_t* s_row, int64_t in, float* out) {
    MEGAMOE_CHECK(in % kMxfp4Group == 0, "MXFP4 row length ", in, " is not a multiple of ", kMxfp4Group);
    sanitize_read(q_row, in / 2);
    sanitize_read(s_row, in / kMxfp4Group);
    sanitize_write(out, in);
    mxfp4_row(q_row, s_row, in, out, kE2m1Table.data(), kE8m0Table.data());
}

void decode_nvfp4_row(const uint8_t* q_row, const uint8_t* s_row, float scale_2, int64_t in, float* out) {
    MEGAMOE_CHECK(in % kNvfp4Group == 0, "NVFP4 row length ", in, " is not a multiple of ", kNvfp4Group);
    sanitize_read(q_row, in / 2);
    sanitize_read(s_row, in / kNvfp4Group);
    sanitize_write(out, in);
    nvfp4_row(q_row, s_row, scale_2, in, out, kE2m1Table.data(), kE4m3Table.data());
}

// ---- quantizers

void quantize_fp8_block(const float* w, int64_t out, int64_t in, uint8_t* q, uint8_t* scale) {
    MEGAMOE_CHECK(out >= 0 && in >= 0, "bad fp8 weight shape [", out, ", ", in, "]");
    const int64_t scale_cols = (in + kFp8Block - 1) / kFp8Block;
    for (int64_t r0 = 0; r0 < out; r0 += kFp8Block) {
        const int64_t r1 = r0 + kFp8Block < out ? r0 + kFp8Block : out;
        for (int64_t c0 = 0, b = 0; c0 < in; c0 += kFp8Block, ++b) {
            const int64_t c1 = c0 + kFp8Block < in ? c0 + kFp8Block : in;
            Amax m;
            for (int64_t r = r0; r < r1; ++r)
                for (int64_t c = c0; c < c1; ++c) m.add(w[r * in + c]);
            MEGAMOE_CHECK(m.finite, "non-finite weight in fp8 block (", r0 / kFp8Block, ", ", b, ")");
            // All-zero block: e8m0_ceil(0) = 0, i.e. scale 2^-127, and every code is 0.
            const uint8_t s = e8m0_ceil(m.amax / 448.0f);
            scale[(r0 / kFp8Block) * scale_cols + b] = s;
            // w / 2^(s-127) == w · 2^(127-s) exactly: both powers of two are representable
            // (2^-127 as a subnormal) and either way the exact quotient is rounded once.
            const float inv = pow2(127 - s);
            for (int64_t r = r0; r < r1; ++r)
                for (int64_t c = c0; c < c1; ++c) q[r * in + c] = f32_to_e4m3(w[r * in + c] * inv);
        }
    }
}

void quantize_mxfp4(const float* w, int64_t out, int64_t in, uint8_t* q, uint8_t* scale) {
    MEGAMOE_CHECK(out >= 0 && in >= 0, "bad MXFP4 weight shape [", out, ", ", in, "]");
    MEGAMOE_CHECK(in % kMxfp4Group == 0, "MXFP4 input size ", in, " is not a multiple of ", kMxfp4Group);
    const int64_t groups = in / kMxfp4Group;
    for (int64_t r = 0; r < out; ++r) {
        for (int64_t g = 0; g < groups; ++g) {
            const float* x = w + r * in + g * kMxfp4Group;
            Amax m;
            for (int i = 0; i < kMxfp4Group; ++i) m.add(x[i]);
            MEGAMOE_CHECK(m.finite, "non-finite weight in MXFP4 row ", r, " group ", g);
            const uint8_t s = e8m0_ceil(m.amax / 6.0f);  // all-zero group: 0
            scale[r * groups + g] = s;
            const float inv = pow2(127 - s);  // exact reciprocal, see quantize_fp8_block
            uint8_t* o = q + r * (in / 2) + g * (kMxfp4Group / 2);
            for (int i = 0; i < kMxfp4Group / 2; ++i)
                o[i] = static_cast<uint8_t>(f32_to_e2m1(x[2 * i] * inv) |
                                            (f32_to_e2m1(x[2 * i + 1] * inv) << 4));
        }
    }
}

void quantize_nvfp4(const float* w, int64_t out, int64_t in, uint8_t* q, uint8_t* scale, float* scale_2) {
    MEGAMOE_CHECK(out >= 0 && in >= 0, "bad NVFP4 weight shape [", out, ", ", in, "]");
    MEGAMOE_CHECK(in % kNvfp4Group == 0, "NVFP4 input size ", in, " is not a multiple of ", kNvfp4Group);
    Amax m;
    const int64_t n = out * in;
    for (int64_t i = 0; i < n; ++i) m.add(w[i]);
    MEGAMOE_CHECK(m.finite, "non-finite weight in NVFP4 tensor");
    float s2 = m.amax / (6.0f * 448.0f);
    // All zero, or so small that scale_2 underflows: scale_2 = 1 and every block scale 0.
    const bool zero = !(s2 > 0.0f);
    if (zero) s2 = 1.0f;
    *scale_2 = s2;
    const float s2x6 = 6.0f * s2;
    const int64_t groups = in / kNvfp4Group;
    for (int64_t r = 0; r < out; ++r) {
        for (int64_t g = 0; g < groups; ++g) {
            const float* x = w + r * in + g * kNvfp4Group;
            float amax = 0.0f;
            for (int i = 0; i < kNvfp4Group && !zero; ++i) amax = std::fmax(amax, std::fabs(x[i]));
            const uint8_t s = f32_to_e4m3(amax / s2x6);
            scale[r * groups + g] = s;
            uint8_t* o = q + r * (in / 2) + g * (kNvfp4Group / 2);
            const float d = e4m3_to_f32(s) * s2;
            if (d == 0.0f) {  // scale 0: the block decodes to 0 whatever the codes, write zeros
                std::memset(o, 0, kNvfp4Group / 2);
                continue;
            }
            for (int i = 0; i < kNvfp4Group / 2; ++i)
                o[i] = static_cast<uint8_t>(f32_to_e2m1(x[2 * i] / d) | (f32_to_e2m1(x[2 * i + 1] / d) << 4));
        }
    }
}

// ---- the weight-format table

const FormatInfo& format_info(LinearFormat f) {
    static const FormatInfo table[] = {
        {LinearFormat::f32, "F32", 32, DType::f32, DType::f32, nullptr, DType::u8, 0, 0, false},
        {LinearFormat::bf16, "BF16", 16, DType::bf16, DType::bf16, nullptr, DType::u8, 0, 0, false},
        {LinearFormat::fp8_block, "FP8 e4m3, e8m0 128x128 blocks", 8, DType::e4m3, DType::u8, "scale", DType::e8m0,
         kFp8Block, kFp8Block, false},
        {LinearFormat::mxfp4, "MXFP4 (e2m1, e8m0 per 32)", 4, DType::i8, DType::u8, "scale", DType::e8m0, 1, kMxfp4Group,
         false},
        {LinearFormat::nvfp4, "NVFP4 (e2m1, e4m3 per 16, f32 global)", 4, DType::u8, DType::i8, "weight_scale",
         DType::e4m3, 1, kNvfp4Group, true},
    };
    const auto i = static_cast<size_t>(f);
    if (i >= sizeof(table) / sizeof(table[0])) fail("unknown weight format ", i);
    return table[i];
}

void FormatInfo::check_in(int64_t in, const char* what) const {
    if (in <= 0) fail(what, ": input size ", in);
    if (weight_bits == 4 && in % scale_cols_per)
        fail(what, ": ", name, " input size ", in, " is not a multiple of ", scale_cols_per);
}

}  // namespace megamoe
