// w4a8.h — the weight expansion of the W4A8 expert tile (gemm.cu, Tile::wgmma_f8_128x128): MXFP4
// weights (e2m1 codes, one e8m0 scale per 32 columns) turned into e4m3 codes for the FP8 tensor
// core, so that both operands of the official numerics' routed-expert GEMMs (deepseek-v4.md §2.6,
// "FP4 weight": the activation quantized to FP8 in 1×128 blocks, FP4 converted exactly to FP8) go
// to wgmma as they are. Host-and-device functions: the CPU tests check them bit for bit
// (tests/cuda/gemm_test.cpp, W4a8.*); the kernel runs the same code.
//
// The scales. A tile step covers one 128-column block of a weight row: four 32-blocks with e8m0
// exponents e0..e3. Their largest, e_ref, becomes the row's scale for the step (applied to the
// step's f32 partial sum together with the activation's block scale, as the official GEMM scales
// each 32-block's partial), and each 32-block's own exponent is folded into its e4m3 codes:
//   code = e4m3(e2m1 · 2^(6 − d)),  d = e_ref − e_b ≥ 0,  row scale 2^(e_ref − 127 − 6).
// e2m1 · 2^6 ≤ 6 · 64 = 384 < 448 fits e4m3 (the rule of the official FP4 → FP8 conversion,
// deepseek-v4.md §7.1, which takes the maximum over a 128×128 block where this takes it over one
// row's 128 columns), and every e2m1 value times 2^(6 − d) is an e4m3 value (normal or subnormal:
// multiples of 2^-9) for d ≤ 14, so the expansion is exact whenever a 32-block lies at most 14
// binades below the largest of its 128-block in the same row. Beyond that the codes round to
// nearest even (values below 2^-10 · 2^(e_ref − 127) of a 32-block whose neighbour is 2^15 times
// larger); d ≥ 31 gives zeros. The e4m3 products and their f32 sums are otherwise those of the
// official per-32-block GEMM, up to summation order and the FP8 tensor core's accumulator (see
// gemm.cu).
//
// The codes. One 32-bit word of a device row holds 8 e2m1 nibbles in fp4 kernel order (device.cuh:
// nibbles [k0 k2 k4 k6 k1 k3 k5 k7]); the activation's e4m3 codes are in fp8 kernel order (bytes
// [k0 k2 k1 k3] per 4-byte word, cuda::quantize_gemm_input). fp4x8_e4m3 turns one weight word into
// the two e4m3 words of the same 8 columns in the activation's order, so the tensor core pairs
// weight and activation of the same column: one PRMT per 4 magnitudes looks them up in the 32-block's
// 8-entry table (the e4m3 code of each e2m1 magnitude, above), one PRMT per 4 signs replicates each
// nibble's sign bit over a byte (PRMT's sign mode), and one LOP3 merges them.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MEGAMOE_W4A8_HD __host__ __device__ __forceinline__
#else
#define MEGAMOE_W4A8_HD inline
#endif

namespace megamoe::cuda::w4a8 {

// Table entries: d = 0 .. kTables − 1 (a 32-block d binades below its 128-block's largest); larger
// d takes the last, all zeros.
constexpr int kTables = 32;

// The e4m3 code (sign bit 0) of e2m1 magnitude code m (0..7: 0, 0.5, 1, 1.5, 2, 3, 4, 6) times
// 2^sh, sh ≤ 6, rounded to nearest even below the e4m3 normal range (2^-6) and to 0 below 2^-10.
MEGAMOE_W4A8_HD uint32_t e2m1_e4m3(uint32_t m, int sh) {
    const uint32_t twice[8] = {0, 1, 2, 3, 4, 6, 8, 12};   // the magnitude in halves
    const uint32_t n = twice[m & 7u];
    if (n == 0) return 0;
    const int p = sh - 1;                                   // value = n · 2^p
    int b = 0;                                              // n's highest set bit
    while ((n >> (b + 1)) != 0) ++b;
    const int e = b + p;                                    // value = 1.f · 2^e
    if (e >= -6) {
        const uint32_t mant = ((n << 3) >> b) & 7u;         // n has at most 2 significant bits
        return (static_cast<uint32_t>(e + 7) << 3) | mant;
    }
    // Subnormal: value = k · 2^-9, k = n · 2^(p + 9) < 8 (p + 9 < 0 here), rounded to nearest even.
    const int s = -(p + 9);
    if (s <= 0) return n << (-s);                           // exact (e < -6 keeps it below 8)
    if (s >= 5) return 0;                                   // n < 16 ≤ half of 2^s: rounds to 0
    const uint32_t q = n >> s, r = n & ((1u << s) - 1u), half = 1u << (s - 1);
    return (r > half || (r == half && (q & 1u))) ? q + 1u : q;   // q + 1 = 8 reads as 2^-6: correct
}

// The table of a 32-block d ≥ 0 binades below its 128-block's largest scale: byte m of lo (m < 4)
// or hi (m ≥ 4) is e2m1_e4m3(m, 6 − d); d ≥ kTables − 1: zeros.
MEGAMOE_W4A8_HD void table(int d, uint32_t& lo, uint32_t& hi) {
    if (d >= kTables - 1) {
        lo = hi = 0;
        return;
    }
    lo = hi = 0;
    for (uint32_t m = 0; m < 4; ++m) {
        lo |= e2m1_e4m3(m, 6 - d) << (8 * m);
        hi |= e2m1_e4m3(m + 4, 6 - d) << (8 * m);
    }
}

// PTX prmt.b32 (default mode): byte i of the result is byte (c >> 4i) & 7 of {b, a} (a: bytes 0-3),
// or, when bit 3 of that selector nibble is set, that byte's sign bit copied over all 8 bits.
MEGAMOE_W4A8_HD uint32_t prmt(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDA_ARCH__)
    uint32_t d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
#else
    const uint64_t pool = static_cast<uint64_t>(a) | (static_cast<uint64_t>(b) << 32);
    uint32_t d = 0;
    for (int i = 0; i < 4; ++i) {
        const uint32_t sel = (c >> (4 * i)) & 0xFu;
        uint32_t byte = static_cast<uint32_t>(pool >> (8 * (sel & 7u))) & 0xFFu;
        if (sel & 8u) byte = (byte & 0x80u) ? 0xFFu : 0x00u;
        d |= byte << (8 * i);
    }
    return d;
#endif
}

// One weight word q (8 e2m1 nibbles, fp4 kernel order: nibble j of q is column kj of [k0 k2 k4 k6
// k1 k3 k5 k7]) → its e4m3 codes in fp8 kernel order: w0 = columns [k0 k2 k1 k3] (nibbles 0 1 4 5),
// w1 = [k4 k6 k5 k7] (nibbles 2 3 6 7), each magnitude looked up in the table (tlo, thi) and signed.
// Ten integer ops for 8 columns (a mask, a shift, 6 PRMTs, 2 LOP3s) where the bf16 path's
// fp4x8_bits takes 10 and 4 bf16 scale multiplies (device.cuh).
MEGAMOE_W4A8_HD void fp4x8_e4m3(uint32_t q, uint32_t tlo, uint32_t thi, uint32_t& w0, uint32_t& w1) {
    const uint32_t m = q & 0x77777777u;   // magnitudes; bytes: n0|n1, n2|n3, n4|n5, n6|n7
    // Selectors of 4 magnitudes each (only the low 16 bits count): nibbles n0 n1 n4 n5, n2 n3 n6 n7.
    const uint32_t s0 = prmt(m, 0, 0x0020u), s1 = prmt(m, 0, 0x0031u);
    // Signs: byte j's top bit of q << 4 is nibble 2j's sign, of q nibble 2j + 1's (pool {q << 4, q}).
    const uint32_t qs = q << 4;
    const uint32_t g0 = prmt(qs, q, 0xEAC8u);   // nibbles 0 (byte 0 of qs), 1 (byte 0 of q), 4, 5
    const uint32_t g1 = prmt(qs, q, 0xFBD9u);   // nibbles 2, 3, 6, 7
    w0 = prmt(tlo, thi, s0) | (g0 & 0x80808080u);
    w1 = prmt(tlo, thi, s1) | (g1 & 0x80808080u);
}

// The f32 row scale of a step whose largest 32-block exponent is e (e8m0): 2^(e − 133), the
// 2^(e − 127) of the scale and the 2^-6 that the table's codes carry; e = 255 (NaN) → NaN.
MEGAMOE_W4A8_HD float row_scale(uint32_t e) {
    uint32_t bits;
    if (e == 255u) bits = 0x7FC00000u;
    else if (e >= 7u) bits = (e - 6u) << 23;   // biased exponent e − 133 + 127
    else bits = 1u << (e + 16u);               // subnormal: 2^(e − 133) = 2^(e + 16) · 2^-149
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// ---- the register-A W4A8 tiles (gemm.cu, Tile::wgmma_rf8_128x128 and wgmma_rf8_128x32)
//
// There the weights' e4m3 codes go to wgmma from registers: in a k32 slice of a step (32 columns),
// lane tig of a warp holds, for its rows g and g + 8, the codes of byte positions 4·tig .. 4·tig + 3
// (registers a0, a1) and 16 + 4·tig .. (a2, a3) — the A fragment of wgmma m64nNk32 with 8-bit
// types, as of mma.m16n8k32 — and the tensor core pairs each with the activation code at the
// same position of the slice in shared memory. The lane decodes one weight word of the slice,
// word tig (columns 32·j + 8·tig .. + 7), whose two e4m3 words are fp8 kernel-order words 2·tig and
// 2·tig + 1 of the slice (fp4x8_e4m3); so the activation's codes come in "register-A order": in
// each 32-column slice, fp8 word w (4 columns) at word position ra_word(w), the even words first
// (positions 0-3, the slice's first 16 bytes), then the odd ones (positions 4-7). quantize_gemm_input
// and fp8_block_round_q write that order when asked (numerics.h); a 16-byte copy then moves each
// half-slice whole.
MEGAMOE_W4A8_HD int ra_word(int w) { return (w & ~7) | ((w & 7) >> 1) | ((w & 1) << 2); }

}  // namespace megamoe::cuda::w4a8
