// linear.h — dense linear on the GPU for decode / small M, reading the weights in their packed
// checkpoint formats (host API; plain C++, compiles without the CUDA toolkit).
//
//   y[M, N] (f32) = x[M, K] (bf16) · Wᵀ        W: [N, K] = [out, in] in any LinearFormat
//
// The same function as ops::linear (the CPU twin) on the same decoded weights, with x given as
// bf16: results agree up to the order of fp32 summation (see linear.cu for the argument). The
// kernel is built for M = 1..16, the bandwidth-bound decode regime; larger M is processed in
// slices of 16 rows (correct, not tuned).
//
// Device layout (what upload_linear makes; lossless, see device_row_bytes):
//   weight: [out rows] × weight_row_bytes, each row the checkpoint's packed row bytes unchanged,
//           zero-padded at its end to a multiple of 64 bytes (only when the row is not already).
//   scale:  fp8_block  e8m0 [ceil(out/128), ceil(in/128)]            as stored (no padding)
//           mxfp4      e8m0 [out] × scale_row_bytes, row = in/32 bytes, padded with 127 (2^0)
//           nvfp4      e4m3 [out] × scale_row_bytes, row = in/16 bytes, padded with 0
//   Padding covers whole 64-byte weight-row chunks; padded codes are zero, so they add nothing.
//   The scale buffer has 16 bytes more than its rows (the kernels read aligned words around a
//   scale byte). linear_layout gives these sizes; upload_linear carves them from a DeviceArena.
// fp8 / fp4 weight rows are stored in "kernel order": each 4-byte word permuted as
// to_kernel_order says (lossless; download_packed undoes it). Nothing else is reordered.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda/buffer.h"
#include "io/weights.h"

struct CUstream_st;   // cudaStream_t is CUstream_st*; declared here so the header needs no CUDA include

namespace megamoe::cuda {

// A projection on the device: a plain, copyable view of device memory owned elsewhere (an
// OwnedLinear, or the DeviceArena upload_linear carved it from); valid while that owner lives.
struct DeviceLinear {
    LinearFormat format = LinearFormat::bf16;
    int64_t out = 0, in = 0;              // N, K
    void*   weight = nullptr;             // device, [out] rows of weight_row_bytes (layout above)
    int64_t weight_row_bytes = 0;         // multiple of 64
    void*   scale = nullptr;              // device, nullptr for f32/bf16
    int64_t scale_row_bytes = 0;          // bytes per scale row (fp8: ceil(in/128); mx/nv: padded)
    float   scale_2 = 1.0f;               // nvfp4 weight_scale_2, as stored (1 for other formats)

    // Derived at upload from the packed bytes (no weight value changes):
    int     exp_shift = 0;                // fp8/mxfp4: F >= 0 so that every block scale 2^(e-127-F)
                                          // times the kernel's decode bias fits bf16; y is scaled by 2^F
    bool    nan_codes = false;            // fp8: some weight byte is the e4m3 NaN code (0x7F/0xFF);
                                          // such a linear runs the exact fallback kernel
    size_t  bytes() const;                // packed checkpoint bytes (weight + scales + weight_scale_2), no padding
};

// Packed row bytes of the checkpoint layout (f32: 4K, bf16: 2K, fp8: K, fp4: K/2) and the device
// row stride (that, rounded up to 64 bytes). Throws for K that the format cannot hold (mxfp4: K % 32,
// nvfp4: K % 16).
int64_t packed_row_bytes(LinearFormat f, int64_t in);
int64_t device_row_bytes(LinearFormat f, int64_t in);

// The device layout upload_linear gives a projection of format f and shape [out, in] (see the
// top of this file), for code that carves or fills such buffers itself. Throws like
// device_row_bytes.
struct LinearLayout {
    int64_t weight_row_bytes = 0;   // device_row_bytes(f, in)
    int64_t scale_row_bytes = 0;    // scales of one padded weight row (0 without block scales)
    int64_t scale_rows = 0;         // FormatInfo::scale_rows(out) (0 without block scales)
    size_t  weight_bytes = 0;       // out · weight_row_bytes
    size_t  scale_bytes = 0;        // scale_rows · scale_row_bytes + 16 bytes the kernels may read past; 0 without
};
LinearLayout linear_layout(LinearFormat f, int64_t out, int64_t in);

// Device bytes that upload_linear(host, arena) takes from an arena: the weight rows padded to
// device_row_bytes, and for formats with block scales the scale rows (padded as above) plus 16
// bytes, since the kernels copy 4-byte aligned words around each scale byte they need; each
// buffer rounded up to DeviceArena::kAlign. Checks `host` like upload_linear. No CUDA call.
size_t upload_linear_bytes(const Linear& host);

// Copies the packed tensors of `host` (CPU memory, as bound from a checkpoint or made by the
// quantizers) into two buffers carved from `arena` (weight, then scale), in the device layout
// above. Checks dtypes and shapes first and throws megamoe::Error naming the mismatch, before any
// CUDA call. Synchronous. The result views arena memory. A counting arena only checks and counts
// (no CUDA call, no scan of the weights): the result has the layout (format, shape, row bytes,
// scale_2) but null buffers, and is not launchable; carving the same linears in the same order
// from a real arena of the counted size gives the same offsets.
DeviceLinear upload_linear(const Linear& host, DeviceArena& arena);

// A DeviceLinear that owns its device memory (one allocation of upload_linear_bytes): for tests,
// benchmarks and tools; a model's weights go into one arena instead. Move-only (rule of zero);
// the view is valid while this object lives, and a moved-from object's view must not be used.
class OwnedLinear {
public:
    OwnedLinear() = default;
    explicit OwnedLinear(const Linear& host);   // upload_linear into its own arena; throws megamoe::Error

    const DeviceLinear& view() const { return view_; }
    size_t device_bytes() const { return arena_.capacity(); }   // padded device bytes held

private:
    friend OwnedLinear copy_linear(const DeviceLinear& w);
    DeviceArena  arena_;   // weight, then scale
    DeviceLinear view_;    // into arena_
};

// A second device copy of w, same layout and allocation sizes as an upload (device to device,
// synchronous; e.g. to rotate weight copies in benchmarks).
OwnedLinear copy_linear(const DeviceLinear& w);

// The checkpoint bytes back from the device, padding dropped: weight [out, packed_row_bytes]
// and the scale tensor with its checkpoint shape (empty for f32/bf16). For tests (lossless upload).
struct PackedBytes {
    std::vector<uint8_t> weight, scale;
};
PackedBytes download_packed(const DeviceLinear& w);

// The kernel order of fp8 / fp4 weight words: fp8 bytes [k0 k2 k1 k3]; fp4 nibble j (bits 4j..4j+3)
// holds element kFp4KernelOrder[j] of its 8. With it the in-register decoders of the kernels emit
// bf16 pairs in natural k order, so x needs no permutation. n: a multiple of 4 bytes (whole rows
// of the padded device layout). Other formats are left unchanged.
constexpr int kFp4KernelOrder[8] = {0, 2, 4, 6, 1, 3, 5, 7};
void to_kernel_order(LinearFormat f, uint8_t* bytes, int64_t n);
void from_kernel_order(LinearFormat f, uint8_t* bytes, int64_t n);

// How a call reads x and writes y.
//   groups = G > 1: a grouped linear (DeepSeek-V4's wo_a): W [N, K] is G blocks of N/G rows;
//     block g multiplies x columns [g·K, (g+1)·K) of x [M, G·K] into y columns [g·N/G, (g+1)·N/G)
//     of y [M, N]. One call for all groups.
//   out_bf16: y is bf16 (the f32 result rounded to nearest even) instead of f32.
//   ring: linear_small_m runs its shared-memory ring kernel even where it would run linear_regs,
//     and cuda::linear its tiled kernels at 17-64 tokens (for benchmarks and tests that compare
//     the kernels).
struct LinearOptions {
    int64_t groups = 1;
    bool    out_bf16 = false;
    bool    ring = false;
};

// The kernels' per-linear constants: the decode bias (fp8: 120 - F, mxfp4: 126 - F) and the
// factor applied to every output (2^F, or NVFP4's weight_scale_2·2^9). See linear.cu.
void kernel_scales(const DeviceLinear& w, int& bias, float& out_scale);

// y[M, N] = x[M, K] · Wᵀ on `stream` (nullptr = legacy default stream). x: bf16 bits, device,
// row-major [M, K] (any alignment; 16-byte aligned with K % 8 == 0 is the fast path for staging).
// y: f32, device, row-major [M, N], every element written (no accumulation into y).
// Asynchronous; launch errors throw megamoe::Error. Deterministic: the same inputs give the same
// bits on the same GPU (fixed reduction order, no atomics). May be captured into a CUDA graph.
// A DeviceLinear may be used by several streams at once (the kernel keeps no state in it).
// Launched with programmatic dependent launch: the kernel may start while the previous kernel
// on `stream` still runs and prefetch weights, but it reads x and writes y only after that
// kernel has completed (griddepcontrol.wait), so ordinary stream order holds for x and y.
void linear_small_m(const DeviceLinear& w, const uint16_t* x_bf16, int64_t M, float* y, CUstream_st* stream);
// The same with LinearOptions (grouped, bf16 y: y points to M·N bf16 or f32).
void linear_small_m(const DeviceLinear& w, const uint16_t* x_bf16, int64_t M, void* y, const LinearOptions& o,
                    CUstream_st* stream);

// How linear_small_m would launch for M tokens (first slice of 16), for benchmarks and logs.
std::string linear_small_m_plan(const DeviceLinear& w, int64_t M);
std::string linear_small_m_plan(const DeviceLinear& w, int64_t M, const LinearOptions& o);

// ---- FP8 × FP8 small-M linear (linear_regs.cu): official numerics' quantized GEMM input.
//
// An activation in the form the official code gives a FP8 GEMM (act_quant, deepseek-v4.md §2.3):
// per row and 128-column block a power-of-two scale s and the e4m3 codes of x / s. Made by
// cuda::quantize_gemm_input / fp8_block_round_q (numerics.h) from x; q · s is exactly
// round_gemm_input(x) (ops::round_gemm_input), the bf16 input the other linears take.
//   q: e4m3 codes [M, K], each 4-byte word in kernel order (bytes k0 k2 k1 k3, as the weights)
//   s: f32 [M, K / 128]
struct ActFp8 {
    const uint8_t* q = nullptr;
    const float*   s = nullptr;
};
// Whether linear_fp8_act can run w: fp8_block weights without NaN codes, K % 128 == 0, one group.
bool fp8_act_fits(const DeviceLinear& w, const LinearOptions& o);
// y[M, N] (f32, or bf16 with o.out_bf16) = (q · s)[M, K] · Wᵀ with the weights' e4m3 codes and the
// activation's codes multiplied on the tensor core (mma.sync m16n8k32 e4m3, no weight decode), each
// 128-column block's f32 partial scaled by (weight block scale · activation block scale) and
// accumulated in f32. Every product is exact (e4m3 × e4m3 fits f32); y differs from the CPU twin
// ops::linear(w, round_gemm_input(x)) by the order of f32 summation only. M ≤ 64 per launch (slices
// of 64 beyond). Same launch contract as linear_small_m (asynchronous, capturable, deterministic,
// programmatic dependent launch: weights are prefetched before the wait for the previous kernel).
// Throws unless fp8_act_fits(w, o).
void linear_fp8_act(const DeviceLinear& w, const ActFp8& x, int64_t M, void* y, const LinearOptions& o,
                    CUstream_st* stream);
std::string linear_fp8_act_plan(const DeviceLinear& w, int64_t M);

// ---- FP8 or BF16 weights × BF16 activations, register-streamed (linear_regs.cu): what
// linear_small_m runs where it fits for ungrouped FP8 weights (the exact numerics' FP8 linears at
// decode), and for BF16 weights above 8 tokens (linear.cu, takes_regs, says why).
//
// The same function and contract as linear_small_m (x bf16 [M, K · groups], y f32 or bf16, grouped
// linears, asynchronous, capturable, deterministic, programmatic dependent launch) and the same
// exactness (each weight decoded exactly to bf16 with its block scale, fp32 accumulation: y differs
// from ops::linear by summation order only), but laid out as linear_fp8_act: each lane streams 16
// bytes of two weight rows per step into registers (two batches of 4 steps in flight, both
// requested before the wait for the previous kernel; batches of 2 steps from 17 tokens on), x goes
// from global memory into the B fragments, no shared-memory x stage and no cluster; the K-range
// partials of a CTA's warps are summed in shared memory in a fixed order. Up to 64 tokens per
// launch (1, 2, 4 or 8 token tiles of 8 per warp), more in launches of 64.
// Fits: fp8_block weights without NaN codes and K % 128 == 0, or bf16 weights and K % 64 == 0;
// groups of a multiple of 16 rows; x 16-byte aligned. linear_regs throws otherwise.
bool regs_fits(const DeviceLinear& w, const uint16_t* x_bf16, const LinearOptions& o);
// cuda::linear (gemm.h) runs linear_regs up to this many tokens where it fits (one launch up to 64
// tokens: eight n8 MMA tiles per warp), the wgmma tiles above.
constexpr int64_t kRegsMaxM = 64;
void linear_regs(const DeviceLinear& w, const uint16_t* x_bf16, int64_t M, void* y, const LinearOptions& o,
                 CUstream_st* stream);
std::string linear_regs_plan(const DeviceLinear& w, int64_t M);

// The plain exact kernel that linear_small_m falls back to for f32 weights and fp8 NaN codes:
// one warp per output row, decode exactly as Linear::decode_row, fp32 FMA. Exposed for tests.
void linear_reference(const DeviceLinear& w, const uint16_t* x_bf16, int64_t M, float* y, CUstream_st* stream);
void linear_reference(const DeviceLinear& w, const uint16_t* x_bf16, int64_t M, void* y, const LinearOptions& o,
                      CUstream_st* stream);

// True if a CUDA device is present and usable (cudaGetDeviceCount > 0). Never throws.
bool gpu_available();
// The CUDA devices visible (cudaGetDeviceCount; 0 when CUDA is not usable). Never throws.
int gpu_count();

}  // namespace megamoe::cuda

// Throws megamoe::Error("file:line: expr: <cudaGetErrorString>") when a CUDA runtime call fails.
// Expand only where cuda_runtime.h is included.
#ifndef CUDA_CHECK
#define CUDA_CHECK(expr)                                                                                   \
    do {                                                                                                   \
        const auto megamoe_cuda_err_ = (expr);                                                             \
        if (megamoe_cuda_err_ != cudaSuccess)                                                              \
            ::megamoe::fail(__FILE__, ":", __LINE__, ": ", #expr, ": ", cudaGetErrorString(megamoe_cuda_err_)); \
    } while (0)
#endif
