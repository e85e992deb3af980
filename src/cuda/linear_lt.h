// linear_lt.h — linears at large M through cuBLASLt: FP8 × FP8 with block scaling (Hopper, CUDA ≥
// 12.9) for the official numerics' FP8-input linears, and BF16 for the bf16-input ones (below): a
// chosen dependency. megamoe's own dense kernels decode FP8 weights to BF16 for the tensor core
// (linear_tiled) and reach 0.28–0.46× cuBLAS BF16 at M = 8192; for the official
// numerics' FP8-input linears, cuBLASLt's GEMM with DeepSeek's scaling (1×128 activation scales,
// 128×128 weight scales) measured faster on the same job from the M in kLtMinM on (the rows side by
// side: megamoe-gemm-bench, docs/bench-gemm.md "FP8 linears at large M"). Host API; plain C++,
// compiles without the CUDA toolkit (the cuBLASLt handle is declared opaque).
//
//   y[M, N] (f32, or bf16 with o.out_bf16) = (q · s)[M, K] · Wᵀ      twin: ops::linear(W, round_gemm_input(x))
//
// The same contract as linear_fp8_act (linear.h): both multiply the weights' e4m3 codes by the
// activation's e4m3 codes (every product exact) and scale each 128-column block's partial sum by
// (weight block scale · activation block scale), accumulating the blocks in f32. They differ in how
// a block's partial is summed: cuBLASLt runs Hopper's FP8 WGMMA, whose accumulator keeps about 14
// significant bits (DeepSeek-V3 technical report §3.3.2; the block scaling promotes it to f32 every
// 128 elements of K, as DeepSeek's own FP8 GEMMs do), where linear_fp8_act's mma.sync sums in f32.
// Measured against the CPU twin (CudaLinear.LtFp8MatchesCpuTwin): max |y − twin| / Σ|w·x| 8.8e-6 to
// 4.8e-5 on quantized V4 shapes (up to 8.4e-5 on small odd ones) and up to 3.8e-4 on random codes
// with wide scales, against ~1e-8 for linear_fp8_act; the test's bound is 2^-10 of Σ|w·x|. This is
// the precision of the official numerics' own FP8 GEMMs on Hopper, and the reason the path is for
// the official numerics only.
// The weights stay as uploaded: their bytes are in kernel order ([k0 k2 k1 k3] per 4-byte word)
// and the activation codes are in the same order, so the dot products are unchanged (the same
// permutation of k on both operands, inside each 128-block).
//
// Per call, one small kernel writes the scales in the layouts cuBLASLt reads (f32 weight scales
// [ceil(N/128), ceil(K/128) padded to 4] and the activation's [K/128, M4] token-major, M4 = M
// rounded down to a multiple of 4) into the caller's scratch, then cuBLASLt multiplies the first
// M4 rows; the last M − M4 < 4 rows go through linear_fp8_act (cuBLASLt's token-major scales want
// whole groups of 4 tokens, and padding x would need rows the caller does not have).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>

#include "cuda/gemm.h"
#include "cuda/linear.h"

struct cublasLtContext;   // cublasLtHandle_t is cublasLtContext*

namespace megamoe::cuda {

// From this many rows on, a FP8-input linear runs through cuBLASLt (below, linear_fp8_act at
// M ≤ 16 and the BF16-decode path between). Measured on an H200 (megamoe-gemm-bench --part linears
// --format fp8, bf16 y; docs/bench-gemm.md "FP8 linears at large M"): at M = 32 cuBLASLt takes
// 15.9 / 17.2 / 15.9 µs for V4-Flash wq_a / wq_b / wkv against megamoe's 16.5 / 35.1 / 16.7, and
// wins by more above; at M = 16 megamoe's small-M kernels are faster on most shapes (wq_a 8.2 and
// wkv 9.8 against 15.8 and 15.8; wq_b is the exception, 18.7 against 15.2): a cuBLASLt call costs
// ~15.7 µs at any small shape with K = 4096.
constexpr int64_t kLtMinM = 32;

// From this many rows on, a linear with a bf16 input (exact numerics, and the official numerics'
// wo_a) runs through cuBLASLt's BF16 GEMM (LtGemm::linear_bf16); below, megamoe's own kernels.
// Measured on an H200: docs/bench-gemm.md, "BF16 linears at large M".
constexpr int64_t kLtBf16MinM = 256;

class LtGemm {
public:
    LtGemm();    // cublasLtCreate; throws megamoe::Error when cuBLASLt cannot start
    ~LtGemm();
    LtGemm(const LtGemm&) = delete;
    LtGemm& operator=(const LtGemm&) = delete;

    // Whether w can run here: fp8_act_fits(w, o), unpadded device rows (always so with K % 128 == 0)
    // and rows of y whose bytes are a multiple of 16 (cuBLASLt's leading-dimension alignment for
    // FP8: N % 4 with f32 y, N % 8 with bf16 y).
    static bool fits(const DeviceLinear& w, const LinearOptions& o);
    // Scratch bytes a call of w with up to M rows needs: cuBLASLt's workspace and the two scale
    // tensors. Reads only w's shape (a counting-arena plan works).
    static size_t scratch_bytes(const DeviceLinear& w, int64_t M);

    // y = x · Wᵀ as above, on `stream`. x.q [M, K] e4m3 (kernel order), x.s [M, K/128] f32; q, s and
    // y 16-byte aligned. scratch: at least scratch_bytes(w, M), not used by any call that may run at
    // the same time. Asynchronous, allocation-free and capturable (the algorithm is chosen on the
    // host, once per shape, before anything is enqueued). Deterministic for a given device: the
    // chosen algorithm is fixed per (N, K, M, y type) and its split-K, if any, reduces in a fixed
    // order (checked by CudaLinear.LtFp8MatchesCpuTwin). Throws megamoe::Error unless fits(w, o),
    // on a short scratch, and when cuBLASLt has no algorithm for the shape (it needs CUDA >= 12.9
    // and a Hopper GPU).
    void linear(const DeviceLinear& w, const ActFp8& x, int64_t M, void* y, const LinearOptions& o,
                const GemmScratch& scratch, CUstream_st* stream);
    // What a call would run, for benchmarks and logs ("cublasLt fp8 block-scaled M4=... algo ...").
    std::string plan(const DeviceLinear& w, int64_t M, const LinearOptions& o);

    // ---- BF16 linears: y[M, N] (f32, or bf16 with o.out_bf16) = x[M, K·G] (bf16) · Wᵀ, grouped as
    // linear.h's LinearOptions says, through cuBLASLt's BF16 GEMM (WGMMA, f32 accumulation; one
    // strided-batched call for the G groups). twin: ops::linear / ops::grouped_linear on x.
    // bf16 weights are read as uploaded; fp8_block weights are first expanded to bf16 into the
    // caller's scratch by one kernel (code · 2^(e − 127 − F), exact as in linear.cu's decode, the
    // kernel byte order undone; y scaled by 2^F), so the products are the exact weights' and y
    // differs from the twin by f32 summation order only. What it costs: reading the weights once
    // more and writing them twice (2 bytes each), which pays from kLtBf16MinM rows on.
    //
    // Whether w can run here: bf16 weights, or fp8_block without NaN codes and K % 16 == 0; x rows
    // and y rows a multiple of 16 bytes ((K·G) % 8; N % 8 with bf16 y, N % 4 with f32 y), and with
    // groups the group's rows too ((N / G) % 8).
    static bool bf16_fits(const DeviceLinear& w, const LinearOptions& o);
    // Scratch bytes a call of w needs (cuBLASLt's workspace, and N·K·2 for the expanded fp8
    // weights). Reads only w's shape.
    static size_t bf16_scratch_bytes(const DeviceLinear& w);
    // Same launch contract as linear() above (x 16-byte aligned); throws unless bf16_fits(w, o).
    void linear_bf16(const DeviceLinear& w, const uint16_t* x, int64_t M, void* y, const LinearOptions& o,
                     const GemmScratch& scratch, CUstream_st* stream);
    std::string bf16_plan(const DeviceLinear& w, int64_t M, const LinearOptions& o);

private:
    struct Plan;
    const Plan& plan_for(int64_t N, int64_t K, int64_t M4, bool out_bf16);
    const Plan& bf16_plan_for(int64_t N, int64_t K, int64_t lda, int64_t G, int64_t M, bool out_bf16);
    cublasLtContext* handle_ = nullptr;
    // The heuristic's choice per (N, K, M4, bf16 y): host memory only, owned by this object (a
    // graph captured over a call holds cuBLASLt's kernel, not this map). Cleared when it holds
    // kMaxPlans, so a long-running server with many prefill lengths stays bounded.
    static constexpr size_t kMaxPlans = 512;
    std::map<std::tuple<int64_t, int64_t, int64_t, bool>, std::unique_ptr<Plan>> plans_;
    std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, bool>, std::unique_ptr<Plan>> bf16_plans_;
};

}  // namespace megamoe::cuda
