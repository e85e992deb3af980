// device.cuh — device helpers shared by the GEMM kernels (linear.cu, gemm.cu): cp.async, mma.sync,
// the in-register fp8 / fp4 → bf16 decoders and the per-format constants. CUDA only.
//
// Weight byte order on the device ("kernel order", made once at upload by to_kernel_order in
// linear.cu, lossless and undone by download_packed): every 4-byte word of a row is permuted so
// that the decoders below emit bf16 pairs in natural k order:
//   fp8 : bytes  [k0 k2 k1 k3]                    (fp8x4_bits: lo = {k0 k1}, hi = {k2 k3})
//   fp4 : nibbles [k0 k2 k4 k6 k1 k3 k5 k7]        (fp4x8_bits: p[i] = {k2i, k2i+1})
// so the activation x needs no permutation and can be copied into shared memory unchanged.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "io/weights.h"

namespace megamoe::cuda::dev {

constexpr int kStepBytes = 64;   // one warp step: 4 lanes × 16 B of each weight row
constexpr int kNvfp4Shift = 9;   // NVFP4 A values carry 2^-9, y gets 2^9


// 16 (or 0: zero fill) bytes global -> shared, asynchronous, L2 only, with a 256-byte L2 prefetch.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool pred) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(pred ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool pred) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(pred ? 4 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
    uint32_t d;
    asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

// c += A·B, m16n8k16, A row-major bf16 (4 regs), B col-major bf16 (2 regs), f32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t rotl32(uint32_t x, int k) { return __funnelshift_l(x, x, k); }
// (a & C) | (b & ~C) in one LOP3 (left to itself the compiler splits it in two).
template <uint32_t C> __device__ __forceinline__ uint32_t bitsel(uint32_t a, uint32_t b) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xE4;" : "=r"(d) : "r"(a), "r"(b), "n"(C));
    return d;
}

// Four e4m3 bytes b0..b3 -> bf16x2 {b0, b2} (lo) and {b1, b3} (hi), each value e4m3 · 2^-120:
// the sign goes to bit 15, the 7 exponent+mantissa bits to bits 10..4 (the low exponent bits and
// the top mantissa bits of a bf16). Exact for every code but NaN (which reads as 480·2^-120).
// Bit-identical to (q & 0x80008000) | ((q & 0x7F007F00) >> 4) (hi) and the same on q << 8 (lo),
// in 6 integer ops instead of 7: r = q rotated right by 4 holds every byte's 7 low bits 4 places
// down (byte j at bits 8j-4 .. 8j+2 mod 32), so a byte's bits of r and its sign in q are 11 apart
// as in a bf16; one select per half merges them, one rotate places lo, one AND clears the rest.
__device__ __forceinline__ void fp8x4_bits(uint32_t q, uint32_t& lo, uint32_t& hi) {
    const uint32_t r = rotl32(q, 28);
    hi = bitsel<0x80008000u>(q, r) & 0x87F087F0u;
    const uint32_t t = bitsel<0x00800080u>(q, r);   // b0: bits 28..2 + 7, b2: 12..18 + 23
    lo = rotl32(t, 8) & 0x87F087F0u;
}

// Eight e2m1 nibbles n0..n7 (n0 = bits 0..3 = element 0) -> p[i] = bf16x2 {n_i, n_{i+4}}, each
// value e2m1 · 2^-126 (sign -> bit 15, 2 exponent + 1 mantissa bits -> bits 8..6).
// 10 operations: 6 logic, 3 funnel rotates, 1 left shift. r = q rotated right by 6 holds nibble
// j's 3 magnitude bits at 4j-6 .. 4j-4 (mod 32), 9 below its sign bit 4j+3 in q: the bf16 spacing
// of bit 15 and bits 8..6. Selecting the signs of {n2 n3 n6 n7} from q and everything else from r
// gives one word ta in which those four nibbles' fields are disjoint ({2..4, 11}, {6..8, 15}, +16);
// an AND keeps {n3, n7} and a left shift by 4 then an AND {n2, n6} (no field wraps). The same
// select with the signs of {n0 n1 n4 n5} gives tb, whose fields ({26..28, 3}, {30..0, 7}, {10..12,
// 19}, {14..16, 23}) are disjoint too and land on bits {6..8, 15} and {22..24, 31} by a rotation:
// 12 for {n0, n4}, 8 for {n1, n5}.
// History (each measured on the expert paths in one device call): 10 logic ops and rotates
// (the first form); then 8 logic ops and 5 left shifts, so that the shifts could issue on the FMA
// pipe (IMAD.SHL) rather than the integer pipe (H200: moe_layer 2-4% faster at T = 1, 2, 8, the
// small-T path 0.5-2% slower); now the second select, the same integer-pipe count (9) with 3
// fewer instructions per word: the small-T kernels are bound by issue, not by one pipe
// (docs/bench-gemm.md, "Small-T path"). Bit-identical to the previous form for all 2^32 words
// (checked on the host). Measured with moe_small.cu's changes of the same commit (H100, previous
// build in the same call, megamoe-gemm-bench --part experts --model flash --moe-small): small-T
// path NVFP4 T = 1 / 2 −0.8% / −0.6%, MXFP4 −4.4% / −5.3%; the general path at T = 64 NVFP4 +1.1%
// (one round), MXFP4 −3.9%.
__device__ __forceinline__ void fp4x8_bits(uint32_t q, uint32_t (&p)[4]) {
    constexpr uint32_t kMask = 0x81C081C0u;
    const uint32_t r = rotl32(q, 26);
    const uint32_t ta = bitsel<0x88008800u>(q, r);   // n2 n3 n6 n7
    const uint32_t tb = bitsel<0x00880088u>(q, r);   // n0 n1 n4 n5
    p[3] = ta & kMask;
    p[2] = (ta << 4) & kMask;
    p[1] = rotl32(tb, 8) & kMask;
    p[0] = rotl32(tb, 12) & kMask;
}

// bf16x2 {2^(e+bias-127), same} for an e8m0 byte e (255 = NaN); subnormal when e+bias <= 0.
__device__ __forceinline__ uint32_t pow2_bf16x2(uint32_t e, int bias) {
    uint32_t b;
    const int f = static_cast<int>(e) + bias;
    if (e == 255u) b = 0x7FC0u;
    else if (f >= 1) b = static_cast<uint32_t>(f) << 7;
    else b = f >= -6 ? (0x40u >> (-f)) : 0u;
    return b | (b << 16);
}

// Two NVFP4 e4m3 scale bytes (low byte = group 2·tig) -> bf16x2 multipliers {s·2^117, s·2^117}
// for each, exact (4 significant bits, 2^108..2^125.8). NaN stays NaN, 0 stays 0.
__device__ __forceinline__ void nvfp4_mults(uint32_t sc, uint32_t& m_lo, uint32_t& m_hi) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(sc & 0xFFFFu), __NV_E4M3);
    float2 f = __half22float2(__half2(h));
    f.x *= 0x1p117f;
    f.y *= 0x1p117f;
    const __nv_bfloat162 b = __float22bfloat162_rn(f);
    uint32_t u;
    memcpy(&u, &b, 4);
    m_lo = __byte_perm(u, 0, 0x1010);
    m_hi = __byte_perm(u, 0, 0x3232);
}

// The routed experts' clamped SwiGLU, as ops::expert_ffn: silu(min(g, L)) · clamp(u, -L, L), f32
// (gemm.cu's grouped L1 epilogue and moe_small.cu's; the caller multiplies by the routing weight).
__device__ __forceinline__ float silu_swiglu(float g, float u, float limit) {
    g = fminf(g, limit);
    u = fminf(fmaxf(u, -limit), limit);
    return g / (1.0f + expf(-g)) * u;
}

// ---------------------------------------------------------------------------- mbarrier + bulk copy
// (moe_small.cu's weight ring, gemm.cu's warp-specialized wgmma kernel)

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_arrive(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
// Waits until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    uint32_t done = 0;
    do {
        asm volatile(
            "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}
// bytes (a multiple of 16; both addresses 16-byte aligned) global → shared, completion on bar.
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}

// ---------------------------------------------------------------------------- format traits

// kElems: weights per 16-byte load; one warp step covers kStepK = 4·kElems columns (64 B/row).
// The device copy of fp8 / fp4 weights is in kernel order (see to_kernel_order in linear.cu), so
// the decoded A registers come out in natural k order and x is used as it is. kRowMod: x row stride mod 128 B that makes the LDS.128 of a
//   quarter-warp (rows g, g+1 × 4 lanes) hit 8 distinct 16-byte bank groups; fp4 also swizzles
//   16-byte chunk q to q ^ bit3(q) (its 4 lanes sit 64 B apart).
template <LinearFormat F> struct Traits;
template <> struct Traits<LinearFormat::bf16> {
    static constexpr int kElems = 8, kRowMod = 64;
    static constexpr bool kSwizzle = false;
};
template <> struct Traits<LinearFormat::fp8_block> {
    static constexpr int kElems = 16, kRowMod = 16;
    static constexpr bool kSwizzle = false;
};
template <> struct Traits<LinearFormat::mxfp4> {
    static constexpr int kElems = 32, kRowMod = 32;
    static constexpr bool kSwizzle = true;
};
template <> struct Traits<LinearFormat::nvfp4> {
    static constexpr int kElems = 32, kRowMod = 32;
    static constexpr bool kSwizzle = true;
};

template <LinearFormat F> __device__ __forceinline__ int x_chunk_pos(int q) {
    return Traits<F>::kSwizzle ? (q ^ ((q >> 3) & 1)) : q;
}



// The A fragments of the two m16n8k16 MMAs fed by word l of a lane's 16 weight bytes (rows g and
// g + 8 of a 16-row tile: w0, w1), each multiplied by its block's bf16x2 scale multiplier:
// (lo0, hi0) for row g, (lo1, hi1) for row g + 8; hi is the lane's second 16-group (NVFP4 only,
// words 2 and 3). a[i] feeds the MMA over the word's columns 4i .. 4i + 3 (kernel order, natural k
// pairs). Shared by every kernel that takes its weights in registers (linear.cu, gemm.cu).
template <LinearFormat F>
__device__ __forceinline__ void decode_a(const uint4& w0, const uint4& w1, int l, uint32_t lo0, uint32_t hi0,
                                         uint32_t lo1, uint32_t hi1, uint32_t (&a)[2][4]) {
    if constexpr (F == LinearFormat::bf16) {
        a[0][0] = w0.x; a[0][1] = w1.x; a[0][2] = w0.y; a[0][3] = w1.y;
        a[1][0] = w0.z; a[1][1] = w1.z; a[1][2] = w0.w; a[1][3] = w1.w;
    } else if constexpr (F == LinearFormat::fp8_block) {
        const uint32_t q00 = l == 0 ? w0.x : w0.z, q01 = l == 0 ? w0.y : w0.w;
        const uint32_t q10 = l == 0 ? w1.x : w1.z, q11 = l == 0 ? w1.y : w1.w;
        uint32_t lo, hi;
        fp8x4_bits(q00, lo, hi);
        a[0][0] = bf16x2_mul(lo, lo0); a[0][2] = bf16x2_mul(hi, lo0);
        fp8x4_bits(q10, lo, hi);
        a[0][1] = bf16x2_mul(lo, lo1); a[0][3] = bf16x2_mul(hi, lo1);
        fp8x4_bits(q01, lo, hi);
        a[1][0] = bf16x2_mul(lo, lo0); a[1][2] = bf16x2_mul(hi, lo0);
        fp8x4_bits(q11, lo, hi);
        a[1][1] = bf16x2_mul(lo, lo1); a[1][3] = bf16x2_mul(hi, lo1);
    } else {
        const uint32_t q0w = l == 0 ? w0.x : l == 1 ? w0.y : l == 2 ? w0.z : w0.w;
        const uint32_t q1w = l == 0 ? w1.x : l == 1 ? w1.y : l == 2 ? w1.z : w1.w;
        // NVFP4: words 0,1 of a lane's 16 B are group 2·tig, words 2,3 group 2·tig+1.
        const uint32_t m0 = l < 2 ? lo0 : hi0;
        const uint32_t m1 = l < 2 ? lo1 : hi1;
        uint32_t p0[4], p1[4];
        fp4x8_bits(q0w, p0);
        fp4x8_bits(q1w, p1);
        a[0][0] = bf16x2_mul(p0[0], m0); a[0][1] = bf16x2_mul(p1[0], m1);
        a[0][2] = bf16x2_mul(p0[1], m0); a[0][3] = bf16x2_mul(p1[1], m1);
        a[1][0] = bf16x2_mul(p0[2], m0); a[1][1] = bf16x2_mul(p1[2], m1);
        a[1][2] = bf16x2_mul(p0[3], m0); a[1][3] = bf16x2_mul(p1[3], m1);
    }
}


// Host: launch `kernel` with programmatic dependent launch (it may be scheduled while the previous
// kernel of the stream finishes; every kernel launched this way calls griddepcontrol.wait before it
// touches memory the previous kernel writes or reads, so stream order holds). Returns the launch
// status; the caller reports it.
// Rule every such kernel keeps: griddepcontrol.launch_dependents only after its own
// griddepcontrol.wait (or not at all: then at its end). So while a kernel runs, every kernel of the
// stream before the previous one has completed, and a kernel may read, before its wait, anything
// the previous kernel does not write (weights, step inputs, older results): the router, the mHC
// finish and moe_small's L2 do.
template <typename... KArgs, typename... Args>
cudaError_t launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, Args... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...);
}

}  // namespace megamoe::cuda::dev
