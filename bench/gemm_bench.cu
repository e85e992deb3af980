// gemm_bench.cu — the tiled linear and the routed-expert layer (src/cuda/gemm.h) at DeepSeek-V4's
// real shapes: check against the CPU twins, then time against cuBLAS BF16.
//
// Usage: megamoe-gemm-bench [--quick] [--part linears|experts|all] [--model flash|pro|all]
//                           [--M 1,16,64,1024,8192] [--T 1,4,16,64,256,1024,4096,16384]
//                           [--shape wq_b,wo_a,...] [--format fp8,nvfp4,mxfp4] [--f32-out]
//                           [--replays N] [--no-check] [--config TILE]
//   --quick:   V4-Flash only (unless --model says otherwise), M = 1,64,8192, T = 1,64,4096,
//              the linears wq_b, wo_a and shared w1 only, formats fp8 and nvfp4 only (so the
//              experts in NVFP4 only), 5 replays, shorter graphs; well under a minute.
//   --part:    only the attention/shared linears, or only the routed-expert layer.
//   --model:   flash (D 4096, 256 experts of width 2048) or pro (D 7168, 384 of width 3072).
//   --M / --T: token counts of the linears / of the expert layer (comma-separated).
//   --shape:   only these linears (wq_a, wq_b, wkv, wo_a, wo_b, sh.w1, sh.w2, idx.wq_b).
//   --format:  only these weight formats (linears: fp8, nvfp4, mxfp4; experts: nvfp4, mxfp4).
//   --f32-out: the linears write f32 y (default bf16 y, for ours and for cuBLAS alike).
//   --no-check: skip the checks against the CPU twins (timing only).
//   --config:  force one kernel shape (cuda::Tile, by name such as wgmma_256x32 or by its index in
//              cuda::tiled_configs()) for the linears with M > 16 and for the expert layer.
//   --numerics official: the expert layer under the official numerics (cuda::moe_layer_routed +
//              moe_layer_combine with Numerics::official; x FP8-rounded first, as the runner passes
//              it), checked against the CPU's official composition (ops::expert_ffn per slot, the
//              official combine) by per-token cosine (≥ 0.999: 1 − cosine over 10^-3 is the
//              reported error/bound); what --config wgmma_f8_128x128 (W4A8, MXFP4) needs. Default
//              exact.
//   --skew S:  the expert layer's routings draw expert e in proportion to 1 / (1 + rank e)^S (a fixed
//              shuffle of the experts gives the ranks), so some experts hold several times the mean
//              rows; 0 (the default) is uniform. Each T's first routing's rows per expert are printed.
//   --skip-dead 0|1: the expert layer's workspace's skip_dead_ntiles (gemm.h; default 1): mma_256x32
//              and mma_256x48 multiply (and copy x for) only the 8-token column tiles that hold rows.
// Progress goes to stderr; the header, the result tables (markdown) and the notes to stdout.
//
// Part A — linears. For each projection of the attention and of the shared expert, in its
// checkpoint format (FP8 e4m3 with 128×128 e8m0 blocks in both releases; wo_a grouped, one
// [o_lora_rank, heads_per_group·head_dim] block per o-group, run with LinearOptions{groups}),
// plus NVFP4 and MXFP4 variants of wq_b and shared w1 for comparison, and M tokens:
//   1. check cuda::linear against the CPU twin on a sample of weight rows (every row of the
//      sample decoded with Linear::decode_row, the dot products in double): M = 3 (small-M path),
//      M = 17 and M = 129 with f32 y, M = 129 once per tiled kernel shape (linear_tiled with a
//      forced cuda::Tile), and then each timed call itself (sampled rows × sampled tokens). Bound as
//      in tests/cuda_linear_test.cpp: |y - ref| ≤ 1e-5 · Σ|w·x|; bf16 y must lie in
//      [bf16(ref - bound), bf16(ref + bound)] (the rounding of an f32 result within the bound).
//   2. time: one CUDA graph of L launches that rotate over enough copies of the packed weights to
//      exceed 200 MB (so each launch reads its weights from HBM, not the 50 MB L2), replayed after
//      warm-up; time per launch = graph time / L, median of the replays. x and y buffers are
//      shared by all launches. The same for cuBLAS cublasGemmEx (bf16 A/B, fp32 compute, y in
//      the same type as ours; wo_a: cublasGemmStridedBatchedEx over the groups) on random BF16
//      weights of the same shape (the dequantized model), rotating over its own copies.
//   3. the FP8 linears (one group) again as "fp8·lt": cuBLASLt's block-scaled FP8 GEMM
//      (cuda::LtGemm, a chosen dependency for the official numerics at large M) on the same
//      packed weights and x FP8-quantized in 1×128 blocks, checked against the twin on the rounded
//      x and timed the same way (M ≥ 4), so "fp8" (megamoe's kernel) and "fp8·lt" sit side by side;
//      and as "fp8x8" up to 64 tokens: megamoe's FP8 × FP8 kernel (cuda::linear_fp8_act) on the
//      same rounded x, the official numerics' choice up to 8 tokens;
//      and as "fp8·bf16lt": cuBLASLt's BF16 GEMM on bf16 x after expanding the weights to bf16 in a
//      scratch (cuda::LtGemm::linear_bf16, the bf16-input linears at large M; wo_a included), M ≥ 64.
// Part B — routed experts. For each model and expert format (NVFP4: NVIDIA's release, MXFP4:
// DeepSeek's), all E experts (random packed codes with valid scales; 4 distinct host experts
// uploaded E times, so every expert has its own device copy), a MoeLayerWorkspace for the
// largest T, and T tokens with uniform random top-k routing (k distinct experts per token; --skew
// makes it uneven):
//   1. check cuda::moe_layer (with a shared-expert input) against a CPU composition on the
//      experts the routing picked: T = 5 every token, and a few sampled tokens of every timed
//      call, with a bound derived from the linear bound plus the bf16 rounding of h;
//   2. time a graph of launches that rotate over several routings (at small T each routing
//      touches different experts, so the weights come from HBM), median of the replays;
//   3. cuBLAS: per launch, for every expert the routing hits, one cublasGemmEx for [w1; w3]
//      (N = 2I, bf16 out) and one for w2 (f32 out) on that expert's token count, BF16 weights
//      rotating over a few copies (> 400 MB in all, so they too come from HBM). GEMMs only: no
//      routing, gather, SwiGLU or combine, which favours cuBLAS.
// Each row: µs, bytes read (packed weights + scales actually needed + x + y), GB/s and % of the
// device-to-device copy bandwidth measured in this run, TFLOP/s (linears 2·M·N·K, experts
// 2·T·k·3·D·I) and % of cuBLAS's BF16 rate on a 8192³ GEMM measured in this run, and cuBLAS's
// time and TFLOP/s on the same shape; speed-up = cuBLAS time / ours (= our TFLOP/s as a fraction
// of cuBLAS's on that shape).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "bench_util.h"
#include "core/common.h"
#include "io/config.h"
#include "cuda/gemm.h"
#include "cuda/linear.h"
#include "cuda/linear_lt.h"
#include "cuda/numerics.h"
#include "cuda/moe_dispatch.h"
#include "io/formats.h"
#include "core/parallel.h"
#include "io/synth.h"
#include "io/weights.h"
#include "ref/ops.h"

using namespace megamoe;

namespace {

constexpr double kRelTol = 1e-5;                  // tests/cuda_linear_test.cpp
constexpr double kLtRelTol = 1.0 / 1024;          // the fp8·lt rows: FP8 WGMMA accumulation (tests/cuda/linear_test.cpp)
constexpr double kAbsTol = 1e-30;                 // a row whose products are all 0 must give exactly 0
constexpr size_t kRotateBytes = 200ull << 20;     // linears: > 4× the H100's 50 MB L2
constexpr size_t kRotateBytesBlas = 400ull << 20; // cuBLAS expert weights (bf16)
constexpr int64_t kComputeM = 1024;               // from here on the linears are compute-bound
constexpr int kHostExperts = 4;                   // distinct host experts, uploaded E times

struct Settings {
    int replays = 9;
    int warmup = 2;
    double warm_ms = 25;       // busy time before each measurement (clocks up)
    double target_us = 2000;   // graph length to aim for
    int max_launches = 256;
};
Settings g_set;
bench::Timing g_timing() { return {g_set.warmup, g_set.replays, g_set.warm_ms, 1000}; }

void progress(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void progress(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::vfprintf(stderr, fmt, ap);
    va_end(ap);
    std::fflush(stderr);
}

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, f);
    std::vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

const char* fmt_name(LinearFormat f) {
    switch (f) {
        case LinearFormat::bf16: return "bf16";
        case LinearFormat::fp8_block: return "fp8";
        case LinearFormat::mxfp4: return "mxfp4";
        case LinearFormat::nvfp4: return "nvfp4";
        default: return "?";
    }
}

// ---------------------------------------------------------------------------- small helpers

// Device buffers: cuda::DeviceArray (move-only, freed on scope exit).
using cuda::DeviceArray;

uint64_t splitmix(uint64_t& s) {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ uint64_t dev_mix(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// p[i] = bf16(uniform [-scale, scale)) / f32, a hash of (seed, i): fast on the device, no host copy.
__global__ void fill_bf16_kernel(uint16_t* p, int64_t n, uint64_t seed, float scale) {
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const uint64_t h = dev_mix(seed * 0xD1B54A32D192ED03ull + static_cast<uint64_t>(i));
        const float v = (static_cast<float>(h >> 40) * (2.0f / 16777216.0f) - 1.0f) * scale;
        p[i] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
    }
}
__global__ void fill_f32_kernel(float* p, int64_t n, uint64_t seed, float scale) {
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const uint64_t h = dev_mix(seed * 0xD1B54A32D192ED03ull + static_cast<uint64_t>(i));
        p[i] = (static_cast<float>(h >> 40) * (2.0f / 16777216.0f) - 1.0f) * scale;
    }
}
void fill_bf16(uint16_t* p, int64_t n, uint64_t seed, float scale) {
    fill_bf16_kernel<<<2048, 256>>>(p, n, seed, scale);
    CUDA_CHECK(cudaGetLastError());
    CUDA_CHECK(cudaDeviceSynchronize());
}
void fill_f32(float* p, int64_t n, uint64_t seed, float scale) {
    fill_f32_kernel<<<2048, 256>>>(p, n, seed, scale);
    CUDA_CHECK(cudaGetLastError());
    CUDA_CHECK(cudaDeviceSynchronize());
}

std::vector<int64_t> parse_list(const char* s) {
    std::vector<int64_t> v;
    const std::string str_(s);
    size_t i = 0;
    while (i < str_.size()) {
        size_t j = str_.find(',', i);
        if (j == std::string::npos) j = str_.size();
        if (j > i) {
            const long long x = std::atoll(str_.substr(i, j - i).c_str());
            if (x < 1) fail("bad list element '", str_.substr(i, j - i), "' in '", str_, "'");
            v.push_back(x);
        }
        i = j + 1;
    }
    return v;
}

bool in_list(const std::string& csv, const std::string& name) {
    if (csv.empty()) return true;
    size_t i = 0;
    while (i <= csv.size()) {
        size_t j = csv.find(',', i);
        if (j == std::string::npos) j = csv.size();
        if (csv.substr(i, j - i) == name) return true;
        i = j + 1;
    }
    return false;
}

// Up to `count` distinct indices of [0, n), ascending: the first and last few, the rest random.
std::vector<int64_t> sample_indices(int64_t n, int64_t count, uint64_t seed) {
    std::vector<int64_t> v;
    if (n <= count) {
        for (int64_t i = 0; i < n; ++i) v.push_back(i);
        return v;
    }
    std::vector<char> mark(static_cast<size_t>(n), 0);
    const int64_t edge = std::max<int64_t>(1, count / 16);
    for (int64_t i = 0; i < edge; ++i) mark[size_t(i)] = mark[size_t(n - 1 - i)] = 1;
    int64_t have = 2 * edge;
    uint64_t s = seed;
    while (have < count) {
        const int64_t i = static_cast<int64_t>(splitmix(s) % static_cast<uint64_t>(n));
        if (!mark[size_t(i)]) mark[size_t(i)] = 1, ++have;
    }
    for (int64_t i = 0; i < n; ++i)
        if (mark[size_t(i)]) v.push_back(i);
    return v;
}

// ---------------------------------------------------------------------------- timing

// Mean µs per enqueue of `n` eager enqueues (after one), to choose a graph length.
template <typename F>
double estimate_us(cudaStream_t stream, F&& enqueue, int n) {
    enqueue(0);   // also does any lazy one-time setup outside the capture
    CUDA_CHECK(cudaStreamSynchronize(stream));
    cudaEvent_t a, b;
    CUDA_CHECK(cudaEventCreate(&a));
    CUDA_CHECK(cudaEventCreate(&b));
    CUDA_CHECK(cudaEventRecord(a, stream));
    for (int i = 0; i < n; ++i) enqueue(i);
    CUDA_CHECK(cudaEventRecord(b, stream));
    CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    CUDA_CHECK(cudaEventDestroy(a));
    CUDA_CHECK(cudaEventDestroy(b));
    return 1000.0 * ms / n;
}

// Launches per graph: about target_us of work, at least `min_launches`, a multiple of `multiple`.
int launches_for(double est_us, int min_launches, int multiple) {
    int L = static_cast<int>(std::ceil(g_set.target_us / std::max(est_us, 0.5)));
    L = std::min(L, g_set.max_launches);
    L = std::max({L, min_launches, 1});
    L = (L + multiple - 1) / multiple * multiple;
    return L;
}

// cuBLAS BF16 (bf16 out, fp32 compute) on a square 8192³ GEMM: the dense reference rate (TFLOP/s).
double blas_peak_tflops(cublasHandle_t blas, cudaStream_t stream) {
    const int n = 8192;
    DeviceArray<uint16_t> a(size_t(n) * n), b(size_t(n) * n), c(size_t(n) * n);
    fill_bf16(a.data(), int64_t(n) * n, 1, 0.05f);
    fill_bf16(b.data(), int64_t(n) * n, 2, 1.0f);
    const float alpha = 1.0f, beta = 0.0f;
    auto gemm = [&](int) {
        CUBLAS_CHECK(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &alpha, a.data(), CUDA_R_16BF, n, b.data(),
                                  CUDA_R_16BF, n, &beta, c.data(), CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    };
    const double est = estimate_us(stream, gemm, 2);
    const double us = bench::time_graph(launches_for(est, 2, 1), stream, gemm, g_timing());
    return 2.0 * n * double(n) * n / (us * 1e-6) / 1e12;
}

// ---------------------------------------------------------------------------- weights

// A projection in host memory, packed as a checkpoint stores it. Move-safe (views into vectors).
struct HostLinear {
    Linear lin;
    std::vector<uint8_t> w, s;
    std::vector<float> s2 = std::vector<float>(1, 1.0f);
};

// Random packed codes with valid, sane scales (fast; the kernels' speed does not depend on the
// values, and the checks only need non-trivial ones). |w| ≲ 0.1, so x·Wᵀ stays O(1):
//   fp8:   e4m3 bytes with exponent field ≤ 7 (|v| < 2, never the NaN codes 0x7F/0xFF), block
//          scales 2^-7..2^-5;
//   mxfp4: any e2m1 codes, scales 2^-8..2^-6;
//   nvfp4: any e2m1 codes, e4m3 scales in [1, 16), weight_scale_2 = 2^-10.
void make_random_linear(HostLinear& h, LinearFormat f, int64_t N, int64_t K, uint64_t seed) {
    Linear& l = h.lin;
    l = Linear{};
    l.format = f;
    l.out = N;
    l.in = K;
    const int64_t row_bytes = f == LinearFormat::fp8_block ? K : K / 2;
    h.w.assign(static_cast<size_t>(N * row_bytes), 0);
    parallel_ranges(N, [&](int64_t b, int64_t e, int) {
        for (int64_t n = b; n < e; ++n) {
            uint64_t st = seed * 0x100000001B3ull + static_cast<uint64_t>(n) * 0x9E3779B1ull;
            uint8_t* p = h.w.data() + n * row_bytes;
            for (int64_t i = 0; i < row_bytes; i += 8) {
                uint64_t r = splitmix(st);
                if (f == LinearFormat::fp8_block) r &= 0xBFBFBFBFBFBFBFBFull;
                std::memcpy(p + i, &r, static_cast<size_t>(std::min<int64_t>(8, row_bytes - i)));
            }
        }
    }, row_bytes);
    uint64_t st = seed ^ 0x5CA1E5ull;
    switch (f) {
        case LinearFormat::fp8_block: {
            const int64_t sr = (N + 127) / 128, sc = (K + 127) / 128;
            h.s.resize(static_cast<size_t>(sr * sc));
            for (auto& v : h.s) v = static_cast<uint8_t>(120 + splitmix(st) % 3);
            l.weight = Tensor(h.w.data(), DType::e4m3, {N, K});
            l.scale = Tensor(h.s.data(), DType::e8m0, {sr, sc});
            break;
        }
        case LinearFormat::mxfp4:
            h.s.resize(static_cast<size_t>(N * (K / 32)));
            for (auto& v : h.s) v = static_cast<uint8_t>(119 + splitmix(st) % 3);
            l.weight = Tensor(h.w.data(), DType::i8, {N, K / 2});
            l.scale = Tensor(h.s.data(), DType::e8m0, {N, K / 32});
            break;
        case LinearFormat::nvfp4:
            h.s.resize(static_cast<size_t>(N * (K / 16)));
            for (auto& v : h.s) {
                const uint64_t r = splitmix(st);
                v = static_cast<uint8_t>(((7 + r % 3) << 3) | ((r >> 8) & 7));   // e4m3 1.0 .. 15
            }
            h.s2[0] = 1.0f / 1024.0f;
            l.weight = Tensor(h.w.data(), DType::u8, {N, K / 2});
            l.scale = Tensor(h.s.data(), DType::e4m3, {N, K / 16});
            l.scale_2 = Tensor(h.s2.data(), DType::f32, {});
            break;
        default: fail("make_random_linear: format ", fmt_name(f));
    }
}

// Another device copy of the same packed weights (D2D), sharing nothing with `d`.

// ---------------------------------------------------------------------------- checks

void download_x_rows(const uint16_t* dx, int64_t ld, int64_t cols, const std::vector<int64_t>& tokens,
                     std::vector<float>& out) {
    out.resize(tokens.size() * static_cast<size_t>(cols));
    std::vector<uint16_t> row(static_cast<size_t>(cols));
    for (size_t j = 0; j < tokens.size(); ++j) {
        CUDA_CHECK(cudaMemcpy(row.data(), dx + tokens[j] * ld, row.size() * 2, cudaMemcpyDeviceToHost));
        for (int64_t c = 0; c < cols; ++c) out[j * size_t(cols) + size_t(c)] = bf16_to_f32(row[size_t(c)]);
    }
}

// Reference values of y[tokens, rows] for a linear (grouped when groups > 1), in double, with the
// bound Σ|w·x| of each element.
struct LinRef {
    std::vector<int64_t> rows, tokens;
    std::vector<double> ref, bound;   // [tokens][rows]
};

LinRef linear_ref(const Linear& lin, int64_t groups, const uint16_t* dx, std::vector<int64_t> rows,
                  std::vector<int64_t> tokens) {
    LinRef r;
    r.rows = std::move(rows);
    r.tokens = std::move(tokens);
    const int64_t N = lin.out, K = lin.in, Kx = K * groups, R = N / groups;
    std::vector<float> xs;
    download_x_rows(dx, Kx, Kx, r.tokens, xs);
    const size_t nr = r.rows.size(), nt = r.tokens.size();
    r.ref.assign(nr * nt, 0.0);
    r.bound.assign(nr * nt, 0.0);
    parallel_ranges(static_cast<int64_t>(nr), [&](int64_t b, int64_t e, int) {
        std::vector<float> w(static_cast<size_t>(K));
        for (int64_t i = b; i < e; ++i) {
            const int64_t n = r.rows[size_t(i)];
            lin.decode_row(n, w.data());
            const int64_t g = n / R;
            for (size_t j = 0; j < nt; ++j) {
                const float* x = xs.data() + j * size_t(Kx) + size_t(g * K);
                double acc = 0, bnd = 0;
                for (int64_t k = 0; k < K; ++k) {
                    const double p = double(w[size_t(k)]) * double(x[k]);
                    acc += p;
                    bnd += std::fabs(p);
                }
                r.ref[j * nr + size_t(i)] = acc;
                r.bound[j * nr + size_t(i)] = bnd;
            }
        }
    }, K * static_cast<int64_t>(nt + 1));
    return r;
}

// Worst |y - ref| / tol over the reference's elements; > 1 (or inf for NaN) means out of bound.
// bf16 y: pass iff y ∈ [bf16(ref - tol), bf16(ref + tol)] (f32 result within tol, then rounded).
double compare_linear(const LinRef& r, const void* dy, int64_t N, bool y_bf16, double rel_tol = kRelTol) {
    double worst = 0;
    const size_t nr = r.rows.size();
    std::vector<uint16_t> yb(static_cast<size_t>(N));
    std::vector<float> yf(static_cast<size_t>(N));
    for (size_t j = 0; j < r.tokens.size(); ++j) {
        const int64_t t = r.tokens[j];
        if (y_bf16) {
            CUDA_CHECK(cudaMemcpy(yb.data(), static_cast<const uint16_t*>(dy) + t * N, size_t(N) * 2,
                                  cudaMemcpyDeviceToHost));
            for (int64_t n = 0; n < N; ++n) yf[size_t(n)] = bf16_to_f32(yb[size_t(n)]);
        } else {
            CUDA_CHECK(cudaMemcpy(yf.data(), static_cast<const float*>(dy) + t * N, size_t(N) * 4,
                                  cudaMemcpyDeviceToHost));
        }
        for (size_t i = 0; i < nr; ++i) {
            const double ref = r.ref[j * nr + i], bnd = r.bound[j * nr + i];
            const double v = yf[size_t(r.rows[i])];
            double tol = rel_tol * bnd + kAbsTol;
            bool in = std::fabs(v - ref) <= tol;
            if (y_bf16) {   // the f32 result is within tol of ref, and rounding to bf16 is monotone
                const double lo = bf16_to_f32(f32_to_bf16(static_cast<float>(ref - tol)));
                const double hi = bf16_to_f32(f32_to_bf16(static_cast<float>(ref + tol)));
                in = lo <= v && v <= hi;
                tol = std::max({tol, ref - lo, hi - ref});
            }
            const double diff = std::fabs(v - ref);
            // bf16 y in its interval counts 0 (pass/fail only; the f32 checks give the margin).
            const double q = in ? (y_bf16 ? 0.0 : diff / tol)
                                : (std::isfinite(diff) ? std::max(diff / tol, 1.0 + 1e-9) : INFINITY);
            worst = std::max(worst, q);
        }
    }
    return worst;
}

struct CheckRow {
    std::string what, detail;
    double worst = 0;
    bool ok = true;
};

// ---------------------------------------------------------------------------- options and context

// --config: a tile name (cuda::tile_name, e.g. mma_128x8) or its index in cuda::tiled_configs().
cuda::Tile parse_tile(const std::string& s) {
    if (!s.empty() && s.find_first_not_of("0123456789") == std::string::npos) {
        const size_t i = std::stoul(s);
        if (i >= cuda::tiled_configs().size())
            fail("--config ", s, ": there are ", cuda::tiled_configs().size(), " tiles");
        return cuda::tiled_configs()[i].tile;
    }
    return cuda::tile_from_name(s);
}

struct Options {
    bool quick = false, check = true, y_f32 = false;
    cuda::Tile tile = cuda::Tile::automatic;   // --config: force this kernel shape (linears M > 16, expert layer)
    bool moe_small = false;                    // --moe-small: the expert layer through cuda::moe_layer_small
    Numerics nm = Numerics::exact;             // --numerics: the expert layer's numerics
    double skew = 0.0;                         // --skew: expert popularity 1 / (1 + rank)^skew (0: uniform)
    bool skip_dead = true;                     // --skip-dead 0|1: MoeLayerWorkspace::skip_dead_ntiles
    std::string part = "all", models, shapes, formats;
    std::vector<int64_t> Ms, Ts;
};

struct Ctx {
    cudaStream_t stream = nullptr;
    cublasHandle_t blas = nullptr;
    cuda::LtGemm* lt = nullptr;   // the fp8·lt rows (cuBLASLt block-scaled FP8); null: none
    double d2d = 0;          // GB/s
    double peak = 0;         // cuBLAS BF16 8192³, TFLOP/s
    std::vector<std::string> linear_rows, expert_rows;
    std::vector<CheckRow> checks;
    bool all_ok = true;
    void record(const std::string& what, const std::string& detail, double worst) {
        const bool ok = worst <= 1.0;
        all_ok &= ok;
        checks.push_back({what, detail, worst, ok});
        progress("  check %-28s %-44s max err/tol %.3g %s\n", what.c_str(), detail.c_str(), worst,
                 ok ? "ok" : "FAILED");
    }
};

ModelConfig model_config(const std::string& model) {
    SynthOptions so;
    so.preset = model;
    return synth_config(so);
}

// ---------------------------------------------------------------------------- Part A: linears

struct LinShape {
    std::string name;
    int64_t N, K, groups;
    std::vector<LinearFormat> formats;
};

std::vector<LinShape> linear_shapes(const ModelConfig& c) {
    using F = LinearFormat;
    const int64_t D = c.hidden_size, H = c.num_attention_heads, hd = c.head_dim, q = c.q_lora_rank;
    const int64_t G = c.o_groups, R = c.o_lora_rank, I = c.moe_intermediate_size * c.n_shared_experts;
    const int64_t ih = c.index_n_heads * c.index_head_dim;
    return {
        {"wq_a", q, D, 1, {F::fp8_block}},
        {"wq_b", H * hd, q, 1, {F::fp8_block, F::nvfp4, F::mxfp4}},
        {"wkv", hd, D, 1, {F::fp8_block}},
        {"wo_a", G * R, (H / G) * hd, G, {F::fp8_block}},
        {"wo_b", D, G * R, 1, {F::fp8_block}},
        {"sh.w1", I, D, 1, {F::fp8_block, F::nvfp4, F::mxfp4}},   // shared w3 has the same shape
        {"sh.w2", D, I, 1, {F::fp8_block}},
        {"idx.wq_b", ih, q, 1, {F::fp8_block}},
    };
}

// cuBLAS y = x · Wᵀ (grouped: per group) on BF16 weights, as a column-major Yᵀ = W · Xᵀ.
void blas_linear(cublasHandle_t blas, const uint16_t* w, int64_t N, int64_t K, int64_t G, const uint16_t* x, int64_t M,
                 void* y, bool y_bf16) {
    const float alpha = 1.0f, beta = 0.0f;
    const cudaDataType yt = y_bf16 ? CUDA_R_16BF : CUDA_R_32F;
    if (G == 1) {
        CUBLAS_CHECK(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, int(N), int(M), int(K), &alpha, w, CUDA_R_16BF, int(K),
                                  x, CUDA_R_16BF, int(K), &beta, y, yt, int(N), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    } else {
        const int64_t R = N / G;   // group g: Y[:, gR..] = X[:, gK..] · W[gR.., :]ᵀ
        CUBLAS_CHECK(cublasGemmStridedBatchedEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, int(R), int(M), int(K), &alpha, w,
                                                CUDA_R_16BF, int(K), R * K, x, CUDA_R_16BF, int(G * K), K, &beta, y, yt,
                                                int(N), R, int(G), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
}

// The same FP8 weights on x FP8-quantized in 1×128 blocks (the official numerics' GEMM input; the
// codes and scales made once, outside the timed calls, as the runner makes them in the kernel that
// rounds x), each call checked against the twin on the rounded x and then timed like the other rows:
//   "fp8·lt": cuBLASLt's block-scaled FP8 GEMM (cuda::LtGemm, the official numerics' large-M path),
//     within kLtRelTol (the FP8 WGMMA's ~14-bit accumulation; the test explains the bound), the
//     per-call scale layout kernel included; M ≥ 4 only (fewer rows are linear_fp8_act's);
//   "fp8x8": megamoe's FP8 × FP8 kernel (cuda::linear_fp8_act, what the official numerics run up to
//     8 tokens; one launch up to 64), within kRelTol (exact products in f32; tests/cuda/
//     linear_test.cpp); M ≤ 64 only: beside the "fp8" and fp8·lt rows it shows where the runner
//     should switch between them (at 8 / 32 tokens: runner.cpp, kFp8ActMaxT, says what was measured).
void run_fp8_act_rows(const std::string& model, const LinShape& sh, const std::string& shape_str, const HostLinear& h,
                      const std::vector<cuda::DeviceLinear>& dl, size_t packed, const uint16_t* dx, void* dy,
                      const Options& opt, const std::vector<double>& blas_us, Ctx& ctx) {
    const cudaStream_t stream = ctx.stream;
    const int64_t N = sh.N, K = sh.K;
    const bool y_bf16 = !opt.y_f32;
    const size_t ysz = y_bf16 ? 2 : 4;
    const cuda::LinearOptions o{1, y_bf16};
    const int copies = static_cast<int>(dl.size());
    const int64_t maxM = *std::max_element(opt.Ms.begin(), opt.Ms.end());
    DeviceArray<uint16_t> dxr(static_cast<size_t>(maxM * K));
    DeviceArray<uint8_t> dq(static_cast<size_t>(maxM * K));
    DeviceArray<float> ds(static_cast<size_t>(maxM * K / 128));
    CUDA_CHECK(cudaMemcpyAsync(dxr.data(), dx, dxr.bytes(), cudaMemcpyDeviceToDevice, stream));
    cuda::fp8_block_round_q(dxr.data(), maxM, K, dq.data(), ds.data(), stream);
    const cuda::ActFp8 a{dq.data(), ds.data()};
    const bool with_lt = ctx.lt && cuda::LtGemm::fits(dl[0], o);
    DeviceArray<uint8_t> scratch_buf(with_lt ? cuda::LtGemm::scratch_bytes(dl[0], maxM) : 0);
    const cuda::GemmScratch scratch{scratch_buf.data(), scratch_buf.size()};

    // One kind of row: call(w, M) runs it, plan(M) names its launch, seed picks the sampled rows
    // (seed) and tokens (seed - 6), as each kind did on its own.
    auto rows_of = [&](const char* tag, double tol, uint64_t seed, int64_t min_m, int64_t max_m, auto call, auto plan) {
        const std::string what = fmt("%s %s %s", model.c_str(), sh.name.c_str(), tag);
        const auto rows = sample_indices(N, 192, seed + uint64_t(N));
        double worst = 0;
        for (size_t mi = 0; mi < opt.Ms.size(); ++mi) {
            const int64_t M = opt.Ms[mi];
            if (M < min_m || M > max_m) continue;
            if (opt.check) {
                CUDA_CHECK(cudaMemsetAsync(dy, 0xFF, size_t(M * N) * ysz, stream));
                call(dl[0], M);
                CUDA_CHECK(cudaStreamSynchronize(stream));
                const auto toks = sample_indices(M, 12, seed - 6 + uint64_t(M));
                const double w = compare_linear(linear_ref(h.lin, 1, dxr.data(), rows, toks), dy, N, y_bf16, tol);
                if (w > 1.0) progress("  %s: M=%lld out of bound (%.3g)\n", what.c_str(), (long long)M, w);
                worst = std::max(worst, w);
            }
            auto launch = [&](int i) { call(dl[size_t(i % copies)], M); };
            const double est = estimate_us(stream, launch, 3);
            const int L = launches_for(est, M < kComputeM ? copies : 1, 1);
            const double us = bench::time_graph(L, stream, launch, g_timing());
            const double bytes = double(packed) + double(M * K) + double(M * N) * double(ysz);
            const double gbs = bytes / (us * 1e-6) / 1e9;
            const double flop = 2.0 * double(M) * double(N) * double(K);
            const double tf = flop / (us * 1e-6) / 1e12, btf = flop / (blas_us[mi] * 1e-6) / 1e12;
            progress("  %-6s M=%-5lld %10.2f us  %8.0f GB/s  %7.1f TFLOP/s  cuBLAS %10.2f us  x%.2f  (%s)\n", tag,
                     (long long)M, us, gbs, tf, blas_us[mi], blas_us[mi] / us, plan(M).c_str());
            ctx.linear_rows.push_back(fmt(
                "| %s | %s | %s | %s | %lld | %.2f | %.2f | %.0f | %.1f%% | %.2f | %.1f%% | %.2f | %.2f | %.2fx |",
                model.c_str(), sh.name.c_str(), shape_str.c_str(), tag, (long long)M, us, bytes / 1e6, gbs,
                100.0 * gbs / ctx.d2d, tf, 100.0 * tf / ctx.peak, blas_us[mi], btf, blas_us[mi] / us));
        }
        if (opt.check) ctx.record(what, fmt("timed M sampled (%s y), x FP8-rounded", y_bf16 ? "bf16" : "f32"), worst);
    };
    if (with_lt)
        rows_of("fp8·lt", kLtRelTol, 11, 4, maxM,
                [&](const cuda::DeviceLinear& w, int64_t M) { ctx.lt->linear(w, a, M, dy, o, scratch, stream); },
                [&](int64_t M) { return ctx.lt->plan(dl[0], M, o); });
    if (cuda::fp8_act_fits(dl[0], o))
        rows_of("fp8x8", kRelTol, 13, 1, cuda::kRegsMaxM,
                [&](const cuda::DeviceLinear& w, int64_t M) { cuda::linear_fp8_act(w, a, M, dy, o, stream); },
                [&](int64_t M) { return cuda::linear_fp8_act_plan(dl[0], M); });
}

// The same FP8 weights through cuBLASLt's BF16 GEMM on bf16 x (cuda::LtGemm::linear_bf16, the
// large-M path of the bf16-input linears: exact numerics, the official wo_a), format "fp8·bf16lt":
// each call expands the weights to bf16 in the scratch (timed with it), then one GEMM (grouped:
// strided-batched). Checked against the twin within kRelTol like megamoe's own rows (exact products,
// f32 accumulation). M ≥ 64 only.
void run_lt_bf16_rows(const std::string& model, const LinShape& sh, const std::string& shape_str, const HostLinear& h,
                      const std::vector<cuda::DeviceLinear>& dl, size_t packed, const uint16_t* dx, void* dy,
                      const Options& opt, const std::vector<double>& blas_us, Ctx& ctx) {
    const cudaStream_t stream = ctx.stream;
    const int64_t N = sh.N, K = sh.K, G = sh.groups, Kx = K * G;
    const bool y_bf16 = !opt.y_f32;
    const size_t ysz = y_bf16 ? 2 : 4;
    const cuda::LinearOptions o{G, y_bf16};
    const int copies = static_cast<int>(dl.size());
    DeviceArray<uint8_t> scratch_buf(cuda::LtGemm::bf16_scratch_bytes(dl[0]));
    const cuda::GemmScratch scratch{scratch_buf.data(), scratch_buf.size()};
    const std::string what = fmt("%s %s fp8·bf16lt", model.c_str(), sh.name.c_str());
    const auto rows = sample_indices(N, 192, 11 + uint64_t(N));
    double worst = 0;
    for (size_t mi = 0; mi < opt.Ms.size(); ++mi) {
        const int64_t M = opt.Ms[mi];
        if (M < 64) continue;
        if (opt.check) {
            CUDA_CHECK(cudaMemsetAsync(dy, 0xFF, size_t(M * N) * ysz, stream));
            ctx.lt->linear_bf16(dl[0], dx, M, dy, o, scratch, stream);
            CUDA_CHECK(cudaStreamSynchronize(stream));
            const auto toks = sample_indices(M, 12, 5 + uint64_t(M));
            const double w = compare_linear(linear_ref(h.lin, G, dx, rows, toks), dy, N, y_bf16);
            if (w > 1.0) progress("  %s: M=%lld out of bound (%.3g)\n", what.c_str(), (long long)M, w);
            worst = std::max(worst, w);
        }
        auto launch = [&](int i) { ctx.lt->linear_bf16(dl[size_t(i % copies)], dx, M, dy, o, scratch, stream); };
        const double est = estimate_us(stream, launch, 3);
        const int L = launches_for(est, M < kComputeM ? copies : 1, 1);
        const double us = bench::time_graph(L, stream, launch, g_timing());
        const double bytes = double(packed) + double(M * Kx * 2) + double(M * N) * double(ysz);
        const double gbs = bytes / (us * 1e-6) / 1e9;
        const double flop = 2.0 * double(M) * double(N) * double(K);
        const double tf = flop / (us * 1e-6) / 1e12, btf = flop / (blas_us[mi] * 1e-6) / 1e12;
        progress("  fp8·bf16lt M=%-5lld %10.2f us  %8.0f GB/s  %7.1f TFLOP/s  cuBLAS %10.2f us  x%.2f  (%s)\n",
                 (long long)M, us, gbs, tf, blas_us[mi], blas_us[mi] / us, ctx.lt->bf16_plan(dl[0], M, o).c_str());
        ctx.linear_rows.push_back(fmt(
            "| %s | %s | %s | fp8·bf16lt | %lld | %.2f | %.2f | %.0f | %.1f%% | %.2f | %.1f%% | %.2f | %.2f | %.2fx |",
            model.c_str(), sh.name.c_str(), shape_str.c_str(), (long long)M, us, bytes / 1e6, gbs,
            100.0 * gbs / ctx.d2d, tf, 100.0 * tf / ctx.peak, blas_us[mi], btf, blas_us[mi] / us));
    }
    if (opt.check) ctx.record(what, fmt("timed M sampled (%s y)", y_bf16 ? "bf16" : "f32"), worst);
}

void run_linears(const std::string& model, const Options& opt, Ctx& ctx) {
    const ModelConfig cfg = model_config(model);
    std::vector<LinShape> shapes;
    for (const auto& s : linear_shapes(cfg))
        if (in_list(opt.shapes, s.name)) shapes.push_back(s);
    if (shapes.empty()) return;
    const cudaStream_t stream = ctx.stream;
    const bool y_bf16 = !opt.y_f32;
    const size_t ysz = y_bf16 ? 2 : 4;
    const int64_t maxM = *std::max_element(opt.Ms.begin(), opt.Ms.end());
    const bool rotate = *std::min_element(opt.Ms.begin(), opt.Ms.end()) < kComputeM;
    const int64_t Mx = std::max<int64_t>(maxM, 129);
    int64_t maxKx = 0, maxN = 0;
    for (const auto& s : shapes) maxKx = std::max(maxKx, s.K * s.groups), maxN = std::max(maxN, s.N);
    // x and y shared by every launch (x random in [-2, 2); y written, never read).
    DeviceArray<uint16_t> dx(static_cast<size_t>(Mx * maxKx));
    DeviceArray<uint8_t> dy(static_cast<size_t>(Mx * maxN) * 4);
    fill_bf16(dx.data(), Mx * maxKx, 7, 2.0f);
    const auto& configs = cuda::tiled_configs();
    std::vector<cuda::Tile> tiles = {cuda::Tile::automatic};
    for (const cuda::TiledConfig& c : configs) {   // the W4A8 and persistent tiles are the expert layer's only
        const cuda::Tile t = c.tile;
        if (t != cuda::Tile::wgmma_f8_128x128 && t != cuda::Tile::wgmma_f8_128x32 && t != cuda::Tile::wgmma_pws_256x128 &&
            t != cuda::Tile::wgmma_pf8_128x128 && t != cuda::Tile::wgmma_pf8_128x32 && t != cuda::Tile::wgmma_rf8_128x128 &&
            t != cuda::Tile::wgmma_rf8_128x32)
            tiles.push_back(t);
    }

    for (const LinShape& sh : shapes) {
        const int64_t N = sh.N, K = sh.K, G = sh.groups, Kx = K * G;
        bool any = false;
        for (LinearFormat f : sh.formats) any |= in_list(opt.formats, fmt_name(f));
        if (!any) continue;
        const std::string shape_str =
            G > 1 ? fmt("%lldx%lld, %lld groups", (long long)N, (long long)K, (long long)G)
                  : fmt("%lldx%lld", (long long)N, (long long)K);
        progress("[%s %s %s]\n", model.c_str(), sh.name.c_str(), shape_str.c_str());

        // cuBLAS on BF16 weights of the shape, rotating over its own copies.
        std::vector<double> blas_us(opt.Ms.size(), 0.0);
        {
            const size_t wbytes = static_cast<size_t>(N * K) * 2;
            const int copies = rotate ? int(std::max<size_t>(2, (kRotateBytes + wbytes - 1) / wbytes)) : 2;
            std::vector<DeviceArray<uint16_t>> wb;
            for (int c = 0; c < copies; ++c) {
                wb.emplace_back(static_cast<size_t>(N * K));
                fill_bf16(wb.back().data(), N * K, 100 + uint64_t(c), 0.05f);
            }
            for (size_t mi = 0; mi < opt.Ms.size(); ++mi) {
                const int64_t M = opt.Ms[mi];
                auto gemm = [&](int i) {
                    blas_linear(ctx.blas, wb[size_t(i % copies)].data(), N, K, G, dx.data(), M, dy.data(), y_bf16);
                };
                const double est = estimate_us(stream, gemm, 3);
                blas_us[mi] = bench::time_graph(launches_for(est, M < kComputeM ? copies : 1, 1), stream, gemm, g_timing());
            }
        }

        for (LinearFormat f : sh.formats) {
            if (!in_list(opt.formats, fmt_name(f))) continue;
            HostLinear h;
            make_random_linear(h, f, N, K, 1000 + 17 * uint64_t(f) + uint64_t(N) * 31 + uint64_t(K));
            std::vector<cuda::OwnedLinear> owned;
            owned.emplace_back(h.lin);
            const size_t packed = owned[0].view().bytes();
            const int copies = rotate ? int(std::max<size_t>(2, (kRotateBytes + packed - 1) / packed)) : 2;
            while (int(owned.size()) < copies) owned.push_back(cuda::copy_linear(owned[0].view()));
            std::vector<cuda::DeviceLinear> dl;   // views of the copies (same layout)
            for (const auto& w : owned) dl.push_back(w.view());
            // The upload and the copies ran on the legacy stream, which the benchmark stream does not wait for.
            CUDA_CHECK(cudaDeviceSynchronize());
            const cuda::LinearOptions o32{G, false}, o{G, y_bf16};
            // The dense wgmma path's scratch for every M here (one stream: the calls are ordered).
            DeviceArray<uint8_t> scratch_buf(cuda::linear_scratch_bytes(dl[0], Mx, o32));
            const cuda::GemmScratch scratch{scratch_buf.data(), scratch_buf.size()};
            const std::string what = fmt("%s %s %s", model.c_str(), sh.name.c_str(), fmt_name(f));
            const auto rows = sample_indices(N, 192, 11 + uint64_t(N));
            auto all_tokens = [](int64_t M) {
                std::vector<int64_t> t;
                for (int64_t i = 0; i < M; ++i) t.push_back(i);
                return t;
            };
            double worst = 0;
            std::string detail;
            if (opt.check) {
                // The small-M path and the tiled path with their own choice, then every kernel shape.
                for (int64_t M : {int64_t(3), int64_t(17)}) {
                    CUDA_CHECK(cudaMemsetAsync(dy.data(), 0xFF, size_t(M * N) * 4, stream));
                    cuda::linear(dl[0], dx.data(), M, dy.data(), o32, &scratch, stream);
                    CUDA_CHECK(cudaStreamSynchronize(stream));
                    worst = std::max(worst, compare_linear(linear_ref(h.lin, G, dx.data(), rows, all_tokens(M)),
                                                           dy.data(), N, false));
                }
                const LinRef r129 = linear_ref(h.lin, G, dx.data(), rows, all_tokens(129));
                for (cuda::Tile c : tiles) {
                    CUDA_CHECK(cudaMemsetAsync(dy.data(), 0xFF, size_t(129 * N) * 4, stream));
                    cuda::linear_tiled(dl[0], dx.data(), 129, dy.data(), o32, &scratch, stream, c);
                    CUDA_CHECK(cudaStreamSynchronize(stream));
                    const double w = compare_linear(r129, dy.data(), N, false);
                    if (w > 1.0) progress("  %s: M=129 %s out of bound (%.3g)\n", what.c_str(),
                                          cuda::tiled_config_name(c).c_str(), w);
                    worst = std::max(worst, w);
                }
                detail = fmt("M=3,17,129 x %d tiles (f32 y), %zu rows", int(tiles.size()), rows.size());
            }
            for (size_t mi = 0; mi < opt.Ms.size(); ++mi) {
                const int64_t M = opt.Ms[mi];
                if (opt.check) {   // the timed call itself, sampled
                    CUDA_CHECK(cudaMemsetAsync(dy.data(), 0xFF, size_t(M * N) * ysz, stream));
                    cuda::linear(dl[0], dx.data(), M, dy.data(), o, &scratch, stream);
                    CUDA_CHECK(cudaStreamSynchronize(stream));
                    const auto toks = sample_indices(M, 12, 5 + uint64_t(M));
                    const double w = compare_linear(linear_ref(h.lin, G, dx.data(), rows, toks), dy.data(), N, y_bf16);
                    if (w > 1.0) progress("  %s: M=%lld out of bound (%.3g)\n", what.c_str(), (long long)M, w);
                    worst = std::max(worst, w);
                }
                auto launch = [&](int i) {
                    const cuda::DeviceLinear& w = dl[size_t(i % copies)];
                    if (opt.tile != cuda::Tile::automatic && M > 16)
                        cuda::linear_tiled(w, dx.data(), M, dy.data(), o, &scratch, stream, opt.tile);
                    else cuda::linear(w, dx.data(), M, dy.data(), o, &scratch, stream);
                };
                const double est = estimate_us(stream, launch, 3);
                const int L = launches_for(est, M < kComputeM ? copies : 1, 1);
                const double us = bench::time_graph(L, stream, launch, g_timing());
                const double bytes = double(packed) + double(M * Kx * 2) + double(M * N) * double(ysz);
                const double gbs = bytes / (us * 1e-6) / 1e9;
                const double flop = 2.0 * double(M) * double(N) * double(K);
                const double tf = flop / (us * 1e-6) / 1e12, btf = flop / (blas_us[mi] * 1e-6) / 1e12;
                progress("  %-6s M=%-5lld %10.2f us  %8.0f GB/s  %7.1f TFLOP/s  cuBLAS %10.2f us  x%.2f  (%d launches)\n",
                         fmt_name(f), (long long)M, us, gbs, tf, blas_us[mi], blas_us[mi] / us, L);
                ctx.linear_rows.push_back(fmt(
                    "| %s | %s | %s | %s | %lld | %.2f | %.2f | %.0f | %.1f%% | %.2f | %.1f%% | %.2f | %.2f | %.2fx |",
                    model.c_str(), sh.name.c_str(), shape_str.c_str(), fmt_name(f), (long long)M, us, bytes / 1e6, gbs,
                    100.0 * gbs / ctx.d2d, tf, 100.0 * tf / ctx.peak, blas_us[mi], btf, blas_us[mi] / us));
            }
            if (opt.check) {
                detail += fmt("; timed M sampled (%s y)", y_bf16 ? "bf16" : "f32");
                ctx.record(what, detail, worst);
            }
            if (f == LinearFormat::fp8_block)
                run_fp8_act_rows(model, sh, shape_str, h, dl, packed, dx.data(), dy.data(), opt, blas_us, ctx);
            if (f == LinearFormat::fp8_block && ctx.lt && cuda::LtGemm::bf16_fits(dl[0], o))
                run_lt_bf16_rows(model, sh, shape_str, h, dl, packed, dx.data(), dy.data(), opt, blas_us, ctx);
        }
    }
}

// ---------------------------------------------------------------------------- Part B: experts

struct HostExpert {
    HostLinear w1, w3, w2;
};

// One routing of T tokens: k distinct experts per token, uniform (skew 0) or with expert e drawn in
// proportion to 1 / (1 + rank(e))^skew, rank a fixed shuffle of the experts (so the hot experts are
// not the low ids); positive weights. Serving's routing is not uniform: a batch's busiest experts hold
// several times the mean rows, and the expert layer's tile is chosen from the mean (choose_grouped).
struct Routing {
    std::vector<int32_t> ids;
    std::vector<float> wts;
    std::vector<int32_t> counts;   // [E]
    int64_t distinct = 0;
};

Routing make_routing(int64_t T, int64_t k, int64_t E, uint64_t seed, double skew = 0.0) {
    Routing r;
    r.ids.resize(static_cast<size_t>(T * k));
    r.wts.resize(r.ids.size());
    r.counts.assign(static_cast<size_t>(E), 0);
    uint64_t s = seed * 0x2545F4914F6CDD1Dull + 12345;
    std::vector<double> cdf;   // skew > 0: cumulative weights over the experts
    if (skew > 0.0) {
        std::vector<int32_t> rank(static_cast<size_t>(E));
        for (int64_t e = 0; e < E; ++e) rank[size_t(e)] = static_cast<int32_t>(e);
        uint64_t ps = 0x5EEDull;   // the same shuffle for every routing and T
        for (int64_t e = E - 1; e > 0; --e) std::swap(rank[size_t(e)], rank[size_t(splitmix(ps) % uint64_t(e + 1))]);
        double acc = 0.0;
        for (int64_t e = 0; e < E; ++e) cdf.push_back(acc += std::pow(1.0 + rank[size_t(e)], -skew));
    }
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t j = 0; j < k; ++j) {
            int32_t e;
            bool dup;
            do {
                if (cdf.empty()) {
                    e = static_cast<int32_t>(splitmix(s) % static_cast<uint64_t>(E));
                } else {
                    const double u = static_cast<double>(splitmix(s) >> 11) * 0x1.0p-53 * cdf.back();
                    e = static_cast<int32_t>(std::upper_bound(cdf.begin(), cdf.end(), u) - cdf.begin());
                    e = std::min<int32_t>(e, static_cast<int32_t>(E - 1));
                }
                dup = false;
                for (int64_t i = 0; i < j; ++i) dup |= r.ids[size_t(t * k + i)] == e;
            } while (dup);
            r.ids[size_t(t * k + j)] = e;
            r.wts[size_t(t * k + j)] = 0.05f + 0.45f * static_cast<float>(splitmix(s) >> 40) / 16777216.0f;
            ++r.counts[size_t(e)];
        }
    }
    for (int32_t c : r.counts) r.distinct += c > 0;
    return r;
}

int routings_for(int64_t T) { return T <= 64 ? 8 : (T <= 1024 ? 4 : 2); }
uint64_t routing_seed(int64_t T, int r) { return uint64_t(T) * 1000 + uint64_t(r); }

// moe_layer (with `shared`) for routing `rt` against the CPU composition on the tokens `tokens`:
// per slot g = w1·x, u = w3·x (double), h = silu(min(g, L))·clamp(u, ±L)·weight, y = shared + Σ_slots w2·hb.
// The GPU's h before its bf16 rounding lies within δ_i = weight·(1.1·δg·|clamp u| + |silu|·δu) + 1e-6·|h|
// of the exact h (silu' ≤ 1.1, min/clamp 1-Lipschitz, δg, δu = 1e-5·Σ|w·x| as for a linear); rounding
// is monotone, so its bf16 h lies in [bf16(h - δ), bf16(h + δ)] — almost always one value, which the
// reference uses (hb = bf16(h)), with allowance a_i = the interval's reach from hb (0 or one ulp).
// Bound per output element: Σ over slots and i of |w2[d,i]|·a_i + 1e-5·Σ|w2·hb| + fp32 combine rounding.
double check_moe(const std::vector<HostExpert>& hosts, const cuda::DeviceExperts& ex, cuda::MoeLayerWorkspace& ws,
                 int64_t k, float limit, const uint16_t* dx, const float* dshared, float* dy, int64_t T,
                 const Routing& rt, const std::vector<int64_t>& tokens, cudaStream_t stream, bool small = false) {
    const int64_t D = ex.D, I = ex.I;
    DeviceArray<int32_t> dids(rt.ids.size());
    DeviceArray<float> dw(rt.wts.size());
    CUDA_CHECK(cudaMemcpyAsync(dids.data(), rt.ids.data(), rt.ids.size() * 4, cudaMemcpyHostToDevice, stream));
    CUDA_CHECK(cudaMemcpyAsync(dw.data(), rt.wts.data(), rt.wts.size() * 4, cudaMemcpyHostToDevice, stream));
    CUDA_CHECK(cudaMemsetAsync(dy, 0xFF, size_t(T * D) * 4, stream));
    if (small)
        cuda::moe_layer_small(ex, limit, dx, dids.data(), dw.data(), T, dshared, dy, ws, stream);
    else
        cuda::moe_layer(ex, limit, dx, dids.data(), dw.data(), T, dshared, dy, ws, stream);
    CUDA_CHECK(cudaStreamSynchronize(stream));
    double worst = 0;
    std::vector<float> x, y(static_cast<size_t>(D)), sh(static_cast<size_t>(D));
    std::vector<double> ref(static_cast<size_t>(D)), tol(static_cast<size_t>(D)), mag(static_cast<size_t>(D));
    std::vector<double> h(static_cast<size_t>(I)), dh(static_cast<size_t>(I));   // bf16 h of a slot, allowance
    for (int64_t t : tokens) {
        download_x_rows(dx, D, D, {t}, x);
        CUDA_CHECK(cudaMemcpy(y.data(), dy + t * D, size_t(D) * 4, cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(sh.data(), dshared + t * D, size_t(D) * 4, cudaMemcpyDeviceToHost));
        std::fill(ref.begin(), ref.end(), 0.0);
        std::fill(tol.begin(), tol.end(), 0.0);
        std::fill(mag.begin(), mag.end(), 0.0);
        for (int64_t s = 0; s < k; ++s) {
            const int32_t e = rt.ids[size_t(t * k + s)];
            const double wt = rt.wts[size_t(t * k + s)];
            const HostExpert& he = hosts[size_t(e) % hosts.size()];
            parallel_ranges(I, [&](int64_t b, int64_t en, int) {
                std::vector<float> r1(static_cast<size_t>(D)), r3(static_cast<size_t>(D));
                for (int64_t i = b; i < en; ++i) {
                    he.w1.lin.decode_row(i, r1.data());
                    he.w3.lin.decode_row(i, r3.data());
                    double g = 0, u = 0, bg = 0, bu = 0;
                    for (int64_t d = 0; d < D; ++d) {
                        const double pg = double(r1[size_t(d)]) * x[size_t(d)], pu = double(r3[size_t(d)]) * x[size_t(d)];
                        g += pg, u += pu, bg += std::fabs(pg), bu += std::fabs(pu);
                    }
                    const double gc = std::min(g, double(limit)), uc = std::clamp(u, -double(limit), double(limit));
                    const double silu = gc / (1.0 + std::exp(-gc));
                    const double hv = silu * uc * wt;
                    const double delta = wt * (1.1 * kRelTol * bg * std::fabs(uc) + std::fabs(silu) * kRelTol * bu) +
                                         1e-6 * std::fabs(hv);
                    const double hb = bf16_to_f32(f32_to_bf16(static_cast<float>(hv)));
                    const double lo = bf16_to_f32(f32_to_bf16(static_cast<float>(hv - delta)));
                    const double hi = bf16_to_f32(f32_to_bf16(static_cast<float>(hv + delta)));
                    h[size_t(i)] = hb;
                    dh[size_t(i)] = std::max(hb - lo, hi - hb);
                }
            }, 2 * D);
            parallel_ranges(D, [&](int64_t b, int64_t en, int) {
                std::vector<float> r2(static_cast<size_t>(I));
                for (int64_t d = b; d < en; ++d) {
                    he.w2.lin.decode_row(d, r2.data());
                    double acc = 0, bnd = 0, prop = 0;
                    for (int64_t i = 0; i < I; ++i) {
                        const double w = r2[size_t(i)];
                        acc += w * h[size_t(i)];
                        bnd += std::fabs(w * h[size_t(i)]);
                        prop += std::fabs(w) * dh[size_t(i)];
                    }
                    ref[size_t(d)] += acc;
                    tol[size_t(d)] += prop + kRelTol * bnd;
                    mag[size_t(d)] += std::fabs(acc) + bnd * kRelTol;
                }
            }, I);
        }
        for (int64_t d = 0; d < D; ++d) {
            const double want = double(sh[size_t(d)]) + ref[size_t(d)];
            const double tl = tol[size_t(d)] + 1e-6 * (std::fabs(sh[size_t(d)]) + mag[size_t(d)]) + kAbsTol;
            const double diff = std::fabs(double(y[size_t(d)]) - want);
            const double q = diff <= tl ? diff / tl : (std::isfinite(diff) ? std::max(diff / tl, 1.0 + 1e-9) : INFINITY);
            worst = std::max(worst, q);
        }
    }
    return worst;
}

// The expert layer under the official numerics (moe_layer_routed + moe_layer_combine, tile `tile`)
// against the CPU's official composition on the tokens `tokens`: per slot ops::expert_ffn with
// Numerics::official (w1 / w3 outputs rounded to bf16, h FP8-rounded in 128-blocks, the output
// rounded to bf16), y = bf16(bf16(shared) + Σ_slots row) in slot order. Not bit for bit (a g or u
// that lands on the other side of a bf16 or FP8 rounding boundary moves h by a step; the W4A8 tile
// accumulates in FP8 tensor-core precision between its f32 promotions): the per-token cosine, as
// 1 − cosine over 10^-3 (≤ 1: cosine ≥ 0.999, the bound of tests/cuda/gemm_test.cpp's official tests).
double check_moe_official(const std::vector<HostExpert>& hosts, const cuda::DeviceExperts& ex,
                          cuda::MoeLayerWorkspace& ws, int64_t k, float limit, const uint16_t* dx,
                          const float* dshared, float* dy, int64_t T, const Routing& rt,
                          const std::vector<int64_t>& tokens, cudaStream_t stream, cuda::Tile tile, bool small) {
    const int64_t D = ex.D;
    DeviceArray<int32_t> dids(rt.ids.size());
    DeviceArray<float> dw(rt.wts.size());
    CUDA_CHECK(cudaMemcpyAsync(dids.data(), rt.ids.data(), rt.ids.size() * 4, cudaMemcpyHostToDevice, stream));
    CUDA_CHECK(cudaMemcpyAsync(dw.data(), rt.wts.data(), rt.wts.size() * 4, cudaMemcpyHostToDevice, stream));
    CUDA_CHECK(cudaMemsetAsync(dy, 0xFF, size_t(T * D) * 4, stream));
    if (small) {
        cuda::moe_layer_small(ex, limit, dx, dids.data(), dw.data(), T, dshared, dy, ws, stream, Numerics::official);
    } else {
        cuda::moe_layer_routed(ex, limit, dx, dids.data(), dw.data(), T, ws, stream, tile, Numerics::official);
        cuda::moe_layer_combine(ws, T, dshared, dy, stream, Numerics::official);
    }
    CUDA_CHECK(cudaStreamSynchronize(stream));
    double worst = 0;
    std::vector<float> x, y(static_cast<size_t>(D)), sh(static_cast<size_t>(D)), row(static_cast<size_t>(D));
    std::vector<double> ref(static_cast<size_t>(D));
    for (int64_t t : tokens) {
        download_x_rows(dx, D, D, {t}, x);
        CUDA_CHECK(cudaMemcpy(y.data(), dy + t * D, size_t(D) * 4, cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(sh.data(), dshared + t * D, size_t(D) * 4, cudaMemcpyDeviceToHost));
        for (int64_t d = 0; d < D; ++d) ref[size_t(d)] = bf16_to_f32(f32_to_bf16(sh[size_t(d)]));
        for (int64_t s = 0; s < k; ++s) {
            const HostExpert& he = hosts[size_t(rt.ids[size_t(t * k + s)]) % hosts.size()];
            const ExpertWeights ew{he.w1.lin, he.w3.lin, he.w2.lin};
            const float wt = rt.wts[size_t(t * k + s)];
            ops::expert_ffn(ew, limit, x.data(), 1, &wt, row.data(), Numerics::official);
            for (int64_t d = 0; d < D; ++d) ref[size_t(d)] += bf16_to_f32(f32_to_bf16(row[size_t(d)]));
        }
        double ab = 0, aa = 0, bb = 0;
        for (int64_t d = 0; d < D; ++d) {
            const double a = y[size_t(d)], b = bf16_to_f32(f32_to_bf16(static_cast<float>(ref[size_t(d)])));
            ab += a * b, aa += a * a, bb += b * b;
        }
        const double cosine = ab / std::sqrt(aa * bb);
        worst = std::max(worst, std::isfinite(cosine) ? (1.0 - cosine) / 1e-3 : INFINITY);
    }
    return worst;
}

void run_experts(const std::string& model, const Options& opt, Ctx& ctx) {
    const ModelConfig cfg = model_config(model);
    const int64_t E = cfg.n_routed_experts, D = cfg.hidden_size, I = cfg.moe_intermediate_size,
                  k = cfg.num_experts_per_tok;
    const float limit = static_cast<float>(cfg.swiglu_limit);
    const cudaStream_t stream = ctx.stream;
    const int64_t T_max = std::max<int64_t>(*std::max_element(opt.Ts.begin(), opt.Ts.end()), 5);
    const double flop_per_token = 2.0 * double(k) * 3.0 * double(D) * double(I);
    std::vector<LinearFormat> formats;
    for (LinearFormat f : {LinearFormat::nvfp4, LinearFormat::mxfp4})
        if (in_list(opt.formats, fmt_name(f))) formats.push_back(f);
    if (formats.empty()) return;
    progress("[%s experts: E=%lld D=%lld I=%lld k=%lld]\n", model.c_str(), (long long)E, (long long)D, (long long)I,
             (long long)k);

    // The routings of each T (the same for cuBLAS and both formats).
    std::vector<std::vector<Routing>> routings(opt.Ts.size());
    for (size_t ti = 0; ti < opt.Ts.size(); ++ti)
        for (int r = 0; r < routings_for(opt.Ts[ti]); ++r)
            routings[ti].push_back(make_routing(opt.Ts[ti], k, E, routing_seed(opt.Ts[ti], r), opt.skew));
    if (opt.skew > 0.0)
        for (size_t ti = 0; ti < opt.Ts.size(); ++ti) {
            const Routing& rt = routings[ti][0];
            progress("  routing T=%-6lld skew %.2f: rows per expert mean %.1f (over %lld hit), max %d\n",
                     (long long)opt.Ts[ti], opt.skew, double(opt.Ts[ti] * k) / double(std::max<int64_t>(rt.distinct, 1)),
                     (long long)rt.distinct, *std::max_element(rt.counts.begin(), rt.counts.end()));
        }

    // cuBLAS first (its buffers are freed before the packed experts are made).
    std::vector<double> blas_us(opt.Ts.size(), 0.0);
    {
        const size_t per = size_t(3 * I * D) * 2;
        const int C = int(std::max<size_t>(3, (kRotateBytesBlas + per - 1) / per));
        std::vector<DeviceArray<uint16_t>> w13, w2;
        for (int c = 0; c < C; ++c) {
            w13.emplace_back(size_t(2 * I * D));
            w2.emplace_back(size_t(D * I));
            fill_bf16(w13.back().data(), 2 * I * D, 200 + uint64_t(c), 0.05f);
            fill_bf16(w2.back().data(), D * I, 300 + uint64_t(c), 0.05f);
        }
        const int64_t Nmax = T_max * k;
        DeviceArray<uint16_t> xs(size_t(Nmax * D)), h13(size_t(Nmax * 2 * I)), hb(size_t(Nmax * I));
        DeviceArray<float> out(size_t(Nmax * D));
        fill_bf16(xs.data(), Nmax * D, 8, 2.0f);
        fill_bf16(hb.data(), Nmax * I, 9, 2.0f);
        const float alpha = 1.0f, beta = 0.0f;
        int64_t rot = 0;
        for (size_t ti = 0; ti < opt.Ts.size(); ++ti) {
            const int64_t T = opt.Ts[ti];
            const int R = int(routings[ti].size());
            auto enqueue = [&](int i) {
                const Routing& rt = routings[ti][size_t(i % R)];
                int64_t off = 0;
                for (int64_t e = 0; e < E; ++e) {
                    const int cnt = rt.counts[size_t(e)];
                    if (!cnt) continue;
                    const size_t b = size_t(rot++ % C);
                    CUBLAS_CHECK(cublasGemmEx(ctx.blas, CUBLAS_OP_T, CUBLAS_OP_N, int(2 * I), cnt, int(D), &alpha,
                                              w13[b].data(), CUDA_R_16BF, int(D), xs.data() + off * D, CUDA_R_16BF, int(D), &beta,
                                              h13.data() + off * 2 * I, CUDA_R_16BF, int(2 * I), CUBLAS_COMPUTE_32F,
                                              CUBLAS_GEMM_DEFAULT));
                    CUBLAS_CHECK(cublasGemmEx(ctx.blas, CUBLAS_OP_T, CUBLAS_OP_N, int(D), cnt, int(I), &alpha, w2[b].data(),
                                              CUDA_R_16BF, int(I), hb.data() + off * I, CUDA_R_16BF, int(I), &beta,
                                              out.data() + off * D, CUDA_R_32F, int(D), CUBLAS_COMPUTE_32F,
                                              CUBLAS_GEMM_DEFAULT));
                    off += cnt;
                }
            };
            const double est = estimate_us(stream, enqueue, R);
            // At most ~4096 GEMMs per graph (captures stay quick), at least one pass over the routings.
            const int cap = std::max(R, int(4096 / (2 * routings[ti][0].distinct)) / R * R);
            const int L = std::min(launches_for(est, R, R), cap);
            blas_us[ti] = bench::time_graph(L, stream, enqueue, g_timing());
            progress("  cuBLAS bf16 T=%-6lld %10.2f us  %7.1f TFLOP/s  (%d launches, %d weight copies)\n", (long long)T,
                     blas_us[ti], flop_per_token * double(T) / (blas_us[ti] * 1e-6) / 1e12, L, C);
        }
    }

    for (LinearFormat f : formats) {
        const auto t0 = std::chrono::steady_clock::now();
        std::vector<HostExpert> hosts(kHostExperts);
        for (int v = 0; v < kHostExperts; ++v) {
            const uint64_t seed = 5000 + 10 * uint64_t(v) + 100 * uint64_t(f);
            make_random_linear(hosts[size_t(v)].w1, f, I, D, seed + 1);
            make_random_linear(hosts[size_t(v)].w3, f, I, D, seed + 2);
            make_random_linear(hosts[size_t(v)].w2, f, D, I, seed + 3);
        }
        std::vector<ExpertWeights> host(static_cast<size_t>(E));
        for (int64_t e = 0; e < E; ++e) {
            const HostExpert& he = hosts[size_t(e) % hosts.size()];
            host[size_t(e)] = ExpertWeights{he.w1.lin, he.w3.lin, he.w2.lin};
        }
        cuda::DeviceExperts ex(host);
        cuda::MoeLayerWorkspace ws(T_max, k, ex);
        ws.skip_dead_ntiles = opt.skip_dead;
        if (!opt.skip_dead) progress("  skip_dead_ntiles off: mma_256x32 / mma_256x48 multiply every column tile\n");
        CUDA_CHECK(cudaDeviceSynchronize());   // uploads ran on the legacy stream
        DeviceArray<uint16_t> dx(size_t(T_max * D));
        DeviceArray<float> dshared(size_t(T_max * D)), dy(size_t(T_max * D));
        fill_bf16(dx.data(), T_max * D, 21, 2.0f);
        fill_f32(dshared.data(), T_max * D, 22, 1.0f);
        const bool official = opt.nm == Numerics::official;
        if (official) cuda::fp8_block_round(dx.data(), T_max, D, D, 128, stream);   // the runner's xq
        const double per_expert = double(ex.bytes()) / double(E);
        progress("  %s: %lld experts uploaded, %.2f GB packed (%.1f MB per expert), workspace %.2f GB, %.1f s\n",
                 fmt_name(f), (long long)E, ex.bytes() / 1e9, per_expert / 1e6, ws.bytes() / 1e9,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        const std::string what = fmt("%s experts %s%s", model.c_str(), fmt_name(f), official ? " official" : "");
        double worst = 0;
        if (opt.check) {
            std::vector<int64_t> all5 = {0, 1, 2, 3, 4};
            worst = official ? check_moe_official(hosts, ex, ws, k, limit, dx.data(), dshared.data(), dy.data(), 5,
                                                  make_routing(5, k, E, 77), all5, stream, opt.tile, opt.moe_small)
                             : check_moe(hosts, ex, ws, k, limit, dx.data(), dshared.data(), dy.data(), 5,
                                         make_routing(5, k, E, 77), all5, stream, opt.moe_small);
            if (worst > 1.0) progress("  %s: T=5 out of bound (%.3g)\n", what.c_str(), worst);
        }
        for (size_t ti = 0; ti < opt.Ts.size(); ++ti) {
            const int64_t T = opt.Ts[ti];
            const auto& rts = routings[ti];
            const int R = int(rts.size());
            if (opt.check) {   // the timed call (routing 0) on a few tokens
                const auto toks = sample_indices(T, opt.quick ? 2 : 3, 31 + uint64_t(T));
                const double w = official ? check_moe_official(hosts, ex, ws, k, limit, dx.data(), dshared.data(), dy.data(),
                                                               T, rts[0], toks, stream, opt.tile, opt.moe_small)
                                          : check_moe(hosts, ex, ws, k, limit, dx.data(), dshared.data(), dy.data(), T,
                                                      rts[0], toks, stream, opt.moe_small);
                if (w > 1.0) progress("  %s: T=%lld out of bound (%.3g)\n", what.c_str(), (long long)T, w);
                worst = std::max(worst, w);
            }
            DeviceArray<int32_t> dids(size_t(R * T * k));
            DeviceArray<float> dw(size_t(R * T * k));
            double distinct = 0;
            for (int r = 0; r < R; ++r) {
                CUDA_CHECK(cudaMemcpy(dids.data() + r * T * k, rts[size_t(r)].ids.data(), size_t(T * k) * 4,
                                      cudaMemcpyHostToDevice));
                CUDA_CHECK(cudaMemcpy(dw.data() + r * T * k, rts[size_t(r)].wts.data(), size_t(T * k) * 4,
                                      cudaMemcpyHostToDevice));
                distinct += double(rts[size_t(r)].distinct) / R;
            }
            CUDA_CHECK(cudaDeviceSynchronize());   // the copies above ran on the legacy stream
            auto launch = [&](int i) {
                const int r = i % R;
                if (opt.moe_small)
                    cuda::moe_layer_small(ex, limit, dx.data(), dids.data() + r * T * k, dw.data() + r * T * k, T,
                                          dshared.data(), dy.data(), ws, stream, opt.nm);
                else if (official) {
                    cuda::moe_layer_routed(ex, limit, dx.data(), dids.data() + r * T * k, dw.data() + r * T * k, T, ws,
                                           stream, opt.tile, Numerics::official);
                    cuda::moe_layer_combine(ws, T, dshared.data(), dy.data(), stream, Numerics::official);
                } else
                    cuda::moe_layer(ex, limit, dx.data(), dids.data() + r * T * k, dw.data() + r * T * k, T, dshared.data(), dy.data(), ws, stream,
                                    opt.tile);
            };
            const double est = estimate_us(stream, launch, R);
            const int L = launches_for(est, R, R);
            const double us = bench::time_graph(L, stream, launch, g_timing());
            // Bytes: the experts this launch's routing touches, x (bf16), shared and y (f32), ids and weights.
            const double bytes = distinct * per_expert + double(T * D) * (2 + 4 + 4) + double(T * k) * 8;
            const double gbs = bytes / (us * 1e-6) / 1e9;
            const double flop = flop_per_token * double(T);
            const double tf = flop / (us * 1e-6) / 1e12, btf = flop / (blas_us[ti] * 1e-6) / 1e12;
            progress("  %-6s T=%-6lld %10.2f us  %6.1f experts  %8.0f GB/s  %7.1f TFLOP/s  x%.2f vs cuBLAS (%d launches)\n",
                     fmt_name(f), (long long)T, us, distinct, gbs, tf, blas_us[ti] / us, L);
            ctx.expert_rows.push_back(fmt(
                "| %s | %s | %lld | %.1f | %.2f | %.2f | %.1f | %.0f | %.1f%% | %.2f | %.1f%% | %.2f | %.2f | %.2fx |",
                model.c_str(), official ? fmt("%s official", fmt_name(f)).c_str() : fmt_name(f), (long long)T, distinct, us,
                us / double(T), bytes / 1e6, gbs,
                100.0 * gbs / ctx.d2d, tf, 100.0 * tf / ctx.peak, blas_us[ti], btf, blas_us[ti] / us));
        }
        if (opt.check)
            ctx.record(what, fmt("T=5 all tokens; timed T sampled (%d tokens each)", opt.quick ? 2 : 3), worst);
    }
}

}  // namespace

int main(int argc, char** argv) {
    try {
        Options opt;
        std::string Ms, Ts;
        bool replays_set = false;
        for (int i = 1; i < argc; ++i) {
            const std::string a = argv[i];
            auto next = [&]() -> const char* {
                if (i + 1 >= argc) fail("option ", a, " needs a value");
                return argv[++i];
            };
            if (a == "--quick") opt.quick = true;
            else if (a == "--no-check") opt.check = false;
            else if (a == "--f32-out") opt.y_f32 = true;
            else if (a == "--config") opt.tile = parse_tile(next());
            else if (a == "--moe-small") opt.moe_small = true;
            else if (a == "--skip-dead") {
                const std::string v = next();
                if (v != "0" && v != "1") fail("--skip-dead must be 0 or 1, got '", v, "'");
                opt.skip_dead = v == "1";
            }
            else if (a == "--skew") {
                const std::string v = next();
                char* end = nullptr;
                opt.skew = std::strtod(v.c_str(), &end);
                // At most 2: drawing k distinct experts by rejection needs ~1 / (the mass outside the
                // top k - 1) draws per slot, ~9 at S = 2 on V4-Flash but ~10^6 at S = 8.
                if (end == v.c_str() || *end != '\0' || !(opt.skew >= 0.0) || opt.skew > 2.0)
                    fail("--skew must be a number in [0, 2], got '", v, "'");
            }
            else if (a == "--numerics") {
                const std::string v = next();
                if (v != "exact" && v != "official") fail("--numerics must be exact or official, got '", v, "'");
                opt.nm = v == "official" ? Numerics::official : Numerics::exact;
            }
            else if (a == "--part") opt.part = next();
            else if (a == "--model") opt.models = next();
            else if (a == "--shape") opt.shapes = next();
            else if (a == "--format") opt.formats = next();
            else if (a == "--M") Ms = next();
            else if (a == "--T") Ts = next();
            else if (a == "--replays") g_set.replays = std::max(1, std::atoi(next())), replays_set = true;
            else if (a == "--help" || a == "-h") {
                std::printf(
                    "usage: megamoe-gemm-bench [--quick] [--part linears|experts|all] [--model flash|pro|all]\n"
                    "       [--M 1,16,64,1024,8192] [--T 1,4,16,64,256,1024,4096,16384] [--shape NAMES]\n"
                    "       [--format fp8,nvfp4,mxfp4] [--f32-out] [--replays N] [--no-check] [--config TILE]\n"
                    "       [--moe-small]  (expert layer: the two-launch small-T path, T <= 8)\n"
                    "       [--numerics exact|official]  (expert layer; official: W4A8 with --config wgmma_f8_128x128)\n"
                    "       [--skew S]  (expert layer: expert e routed in proportion to 1 / (1 + rank e)^S; 0 = uniform)\n"
                    "       [--skip-dead 0|1]  (expert layer: mma_256x32 / mma_256x48 skip the 8-token column tiles without rows; default 1)\n"
                    "shapes: wq_a wq_b wkv wo_a wo_b sh.w1 sh.w2 idx.wq_b\n"
                    "tiles (--config: a name or its index):");
                for (size_t i = 0; i < cuda::tiled_configs().size(); ++i)
                    std::printf(" %zu=%s", i, cuda::tiled_configs()[i].name);
                std::printf("\n");
                return 0;
            } else fail("unknown option '", a, "' (see --help)");
        }
        if (opt.part != "all" && opt.part != "linears" && opt.part != "experts")
            fail("--part must be linears, experts or all");
        if (opt.models.empty()) opt.models = opt.quick ? "flash" : "all";
        if (opt.models != "all" && opt.models != "flash" && opt.models != "pro") fail("--model must be flash, pro or all");
        if (opt.quick) {
            if (!replays_set) g_set.replays = 5;
            g_set.target_us = 1000;
            g_set.warm_ms = 15;
            if (opt.shapes.empty()) opt.shapes = "wq_b,wo_a,sh.w1";
            if (opt.formats.empty()) opt.formats = "fp8,nvfp4";
        }
        opt.Ms = !Ms.empty() ? parse_list(Ms.c_str())
                             : (opt.quick ? std::vector<int64_t>{1, 64, 8192} : std::vector<int64_t>{1, 16, 64, 1024, 8192});
        opt.Ts = !Ts.empty() ? parse_list(Ts.c_str())
                             : (opt.quick ? std::vector<int64_t>{1, 64, 4096}
                                          : std::vector<int64_t>{1, 4, 16, 64, 256, 1024, 4096, 16384});
        std::vector<std::string> models;
        if (opt.models == "all" || opt.models == "flash") models.push_back("flash");
        if (opt.models == "all" || opt.models == "pro") models.push_back("pro");

        if (!cuda::gpu_available()) {
            std::printf("gemm_bench: no CUDA device\n");
            return 1;
        }
        const auto t_start = std::chrono::steady_clock::now();
        Ctx ctx;
        int dev = 0, sm_khz = 0, mem_khz = 0, bus = 0, rt_ver = 0, drv_ver = 0, blas_ver = 0;
        CUDA_CHECK(cudaGetDevice(&dev));
        cudaDeviceProp prop;
        CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
        CUDA_CHECK(cudaDeviceGetAttribute(&sm_khz, cudaDevAttrClockRate, dev));
        CUDA_CHECK(cudaDeviceGetAttribute(&mem_khz, cudaDevAttrMemoryClockRate, dev));
        CUDA_CHECK(cudaDeviceGetAttribute(&bus, cudaDevAttrGlobalMemoryBusWidth, dev));
        CUDA_CHECK(cudaRuntimeGetVersion(&rt_ver));
        CUDA_CHECK(cudaDriverGetVersion(&drv_ver));
        CUDA_CHECK(cudaStreamCreateWithFlags(&ctx.stream, cudaStreamNonBlocking));
        CUBLAS_CHECK(cublasCreate(&ctx.blas));
        CUBLAS_CHECK(cublasSetStream(ctx.blas, ctx.stream));
        CUBLAS_CHECK(cublasGetVersion(ctx.blas, &blas_ver));
        DeviceArray<uint8_t> blas_ws(64ull << 20);
        CUBLAS_CHECK(cublasSetWorkspace(ctx.blas, blas_ws.data(), blas_ws.bytes()));
        ctx.d2d = bench::d2d_bandwidth(ctx.stream);
        ctx.peak = blas_peak_tflops(ctx.blas, ctx.stream);
        cuda::LtGemm lt;
        ctx.lt = &lt;

        std::printf("## megamoe-gemm-bench\n\n");
        std::printf("- GPU: %s, %d SMs, SM clock %.0f MHz (peak), L2 %.0f MB, HBM %.1f GB\n", prop.name,
                    prop.multiProcessorCount, sm_khz / 1e3, prop.l2CacheSize / 1048576.0, prop.totalGlobalMem / 1e9);
        std::printf("- memory: clock %.0f MHz, %d-bit bus, theoretical %.0f GB/s\n", mem_khz / 1e3, bus,
                    2.0 * mem_khz * 1e3 * (bus / 8.0) / 1e9);
        std::printf("- CUDA runtime %d.%d, driver %d.%d, cuBLAS %d\n", rt_ver / 1000, (rt_ver % 1000) / 10,
                    drv_ver / 1000, (drv_ver % 1000) / 10, blas_ver);
        std::printf("- device-to-device copy (read + write, 1 GiB cudaMemcpy): **%.0f GB/s** (the 100%% of %% copy)\n",
                    ctx.d2d);
        std::printf("- cuBLAS BF16 GEMM 8192x8192x8192 (fp32 compute, bf16 out): **%.0f TFLOP/s** (the 100%% of %% peak)\n",
                    ctx.peak);
        std::printf("- timing: CUDA graphs, median of %d replays after warm-up; %s%s\n", g_set.replays,
                    opt.quick ? "--quick; " : "", opt.check ? "every row checked against the CPU twin first" : "no checks");
        for (const auto& m : models) {
            const ModelConfig c = model_config(m);
            std::printf("- V4-%s: D %lld, %lld heads x %lld, q_lora %lld, o_groups %lld x o_lora %lld, indexer %lld x %lld, "
                        "%lld experts of width %lld, top-%lld\n",
                        m == "flash" ? "Flash" : "Pro", (long long)c.hidden_size, (long long)c.num_attention_heads,
                        (long long)c.head_dim, (long long)c.q_lora_rank, (long long)c.o_groups,
                        (long long)c.o_lora_rank, (long long)c.index_n_heads, (long long)c.index_head_dim,
                        (long long)c.n_routed_experts, (long long)c.moe_intermediate_size,
                        (long long)c.num_experts_per_tok);
        }
        std::printf("\n");
        std::fflush(stdout);

        if (opt.part != "experts")
            for (const auto& m : models) run_linears(m, opt, ctx);
        if (opt.part != "linears")
            for (const auto& m : models) run_experts(m, opt, ctx);

        if (!ctx.linear_rows.empty()) {
            std::printf("### Linears (cuda::linear; y %s)\n\n", opt.y_f32 ? "f32" : "bf16");
            std::printf("| model | linear | N x K | format | M | µs | MB | GB/s | %% copy | TFLOP/s | %% peak | "
                        "cuBLAS µs | cuBLAS TFLOP/s | speed-up |\n");
            std::printf("|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
            for (const auto& r : ctx.linear_rows) std::printf("%s\n", r.c_str());
            std::printf("\nMB: packed weights + scales + x + y per call. Weights rotate over copies of > 200 MB in all "
                        "when M < %lld. wo_a: one call for all groups (LinearOptions{groups}); its cuBLAS twin is "
                        "cublasGemmStridedBatchedEx over the groups. sh.w1 stands for w1 and w3 (same shape).\n\n",
                        (long long)kComputeM);
        }
        if (!ctx.expert_rows.empty()) {
            std::printf("### Routed-expert layer (cuda::moe_layer: route, gather, L1 w1|w3+SwiGLU, L2 w2, combine)\n\n");
            std::printf("| model | format | T | experts hit | µs | µs/token | MB | GB/s | %% copy | TFLOP/s | %% peak | "
                        "cuBLAS µs | cuBLAS TFLOP/s | speed-up |\n");
            std::printf("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
            for (const auto& r : ctx.expert_rows) std::printf("%s\n", r.c_str());
            std::printf("\nexperts hit: distinct experts of one launch's routing (uniform random top-k, k distinct per "
                        "token; launches rotate over several routings so that small T reads its experts from HBM). MB: "
                        "packed bytes of the experts hit + x (bf16) + shared-expert input and y (f32) + ids and weights; "
                        "the layer's internal traffic (xs, h, rows) is not counted. TFLOP/s: 2·T·k·3·D·I. cuBLAS: per "
                        "launch, for each expert hit, cublasGemmEx of [w1; w3] (bf16 out) and of w2 (f32 out) on that "
                        "expert's tokens, BF16 weights rotating over copies of > 400 MB in all; GEMMs only (no routing, "
                        "gather, SwiGLU or combine).\n\n");
        }
        if (!ctx.checks.empty()) {
            std::printf("### Checks against the CPU twins\n\n| what | checks | max err/tol | result |\n|---|---|--:|---|\n");
            for (const auto& c : ctx.checks)
                std::printf("| %s | %s | %.3g | %s |\n", c.what.c_str(), c.detail.c_str(), c.worst,
                            c.ok ? "ok" : "**FAILED**");
            std::printf("\nerr/tol: |GPU - reference| / bound; the bound is 1e-5·Σ|w·x| per linear as in "
                        "tests/cuda_linear_test.cpp (bf16 y: the bf16 roundings of ref ± bound; experts: the bound "
                        "propagated through SwiGLU and the bf16 rounding of h). Pass: ≤ 1.\n\n");
        }
        CUBLAS_CHECK(cublasDestroy(ctx.blas));
        CUDA_CHECK(cudaStreamDestroy(ctx.stream));
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
        std::printf("%s. %.0f s.\n", !opt.check ? "checks skipped" : (ctx.all_ok ? "all checks passed" : "SOME CHECKS FAILED"),
                    secs);
        return ctx.all_ok ? 0 : 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "gemm_bench: %s\n", e.what());
        return 1;
    }
}
