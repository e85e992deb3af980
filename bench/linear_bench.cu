// linear_bench.cu — decode/small-M linear on the GPU (src/cuda/linear.h): check, then time.
//
// Usage: linear_bench [--quick] [--plans] [--shape NAMES] [--once FORMAT M]
//   --quick: validate only the shapes under 8M weights; --plans: print each launch's shape;
//   --shape: only the shapes whose names appear in NAMES (e.g. "wq_b,wo_b");
//   --once: 5 plain launches of FORMAT at M on the first selected shape, no timing (for ncu).
// For each DeepSeek-V4-Flash projection shape, each weight format (BF16, FP8 block, MXFP4,
// NVFP4) and M = 1, 4, 16 tokens:
//   1. validate linear_small_m against the CPU twin ops::linear (per element, within kRelTol of
//      Σ|w||x|, as in tests/cuda_linear_test.cpp);
//   2. time it: one CUDA graph of L launches that rotate over enough copies of the packed weights
//      to exceed ~200 MB (so every launch reads its weights from HBM, not the 50 MB L2), replayed
//      after warm-up; time per launch = graph time / L, median over the replays. The figure
//      includes the small gap between back-to-back kernels of a graph.
// Prints µs, bytes moved (packed weights + scales + x + y), GB/s and the percentage of the
// device-to-device copy bandwidth measured here (read + write bytes of a 1 GiB cudaMemcpy).
// FP8 and BF16 rows: "fp8" / "bf16" is what linear_small_m runs (linear_regs where it fits),
// "fp8rng" / "bf16rg" the same weights on the shared-memory ring kernel (LinearOptions::ring),
// "fp8x8" linear_fp8_act (FP8 activations, official numerics); "xR" is the fp8 / bf16 row's time
// over that row's.
// Beside each shape: cuBLAS cublasGemmEx (bf16 A/B, fp32 compute, fp32 y) on random BF16
// weights of the same shape (what a dequantized copy would cost), timed the same way, and the
// speed-up of the packed-format kernel over it.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "bench_util.h"
#include "core/common.h"
#include "cuda/buffer.h"
#include "cuda/linear.h"
#include "cuda/numerics.h"
#include "io/formats.h"
#include "ref/ops.h"
#include "core/parallel.h"

using namespace megamoe;

namespace {

constexpr double kRelTol = 1e-5;                 // same bound as the unit test
constexpr size_t kRotateBytes = 200ull << 20;    // per format and shape, > 4× the H100's 50 MB L2
constexpr int kReplays = 21;
// 3 warm-up replays, then ~40 ms busy (clock ramp), then the median of kReplays.
constexpr bench::Timing kTiming{3, kReplays, 40.0, 2000};

struct Shape {
    const char* name;
    int64_t N, K;
};

const char* fmt_name(LinearFormat f) {
    switch (f) {
        case LinearFormat::bf16: return "bf16";
        case LinearFormat::fp8_block: return "fp8";
        case LinearFormat::mxfp4: return "mxfp4";
        case LinearFormat::nvfp4: return "nvfp4";
        default: return "?";
    }
}

// Fast deterministic pseudo-random floats (the values only need to be non-trivial).
struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
    uint32_t u32() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        return static_cast<uint32_t>(s >> 16);
    }
    float sym() { return (static_cast<float>(u32() & 0xFFFFFF) / 8388608.0f) - 1.0f; }   // [-1, 1)
};

struct HostLinear {
    Linear lin;
    std::vector<uint8_t> w, s;
    float s2 = 1.0f;
};

void make_weights(HostLinear& h, LinearFormat f, int64_t N, int64_t K, uint64_t seed) {
    std::vector<float> w(static_cast<size_t>(N * K));
    parallel_ranges(N, [&](int64_t b, int64_t e, int) {
        for (int64_t n = b; n < e; ++n) {
            Rng r(seed * 1000003 + static_cast<uint64_t>(n));
            const float mag = std::exp2(-3.0f * (1.0f + r.sym()));
            for (int64_t k = 0; k < K; ++k) w[static_cast<size_t>(n * K + k)] = r.sym() * mag;
        }
    }, K);
    Linear& l = h.lin;
    l = Linear{};
    l.format = f;
    l.out = N;
    l.in = K;
    switch (f) {
        case LinearFormat::bf16: {
            h.w.resize(w.size() * 2);
            uint16_t* o = reinterpret_cast<uint16_t*>(h.w.data());
            for (size_t i = 0; i < w.size(); ++i) o[i] = f32_to_bf16(w[i]);
            l.weight = Tensor(h.w.data(), DType::bf16, {N, K});
            break;
        }
        case LinearFormat::fp8_block:
            h.w.resize(w.size());
            h.s.resize(static_cast<size_t>(((N + 127) / 128) * ((K + 127) / 128)));
            quantize_fp8_block(w.data(), N, K, h.w.data(), h.s.data());
            l.weight = Tensor(h.w.data(), DType::e4m3, {N, K});
            l.scale = Tensor(h.s.data(), DType::e8m0, {(N + 127) / 128, (K + 127) / 128});
            break;
        case LinearFormat::mxfp4:
            h.w.resize(w.size() / 2);
            h.s.resize(static_cast<size_t>(N * (K / 32)));
            quantize_mxfp4(w.data(), N, K, h.w.data(), h.s.data());
            l.weight = Tensor(h.w.data(), DType::i8, {N, K / 2});
            l.scale = Tensor(h.s.data(), DType::e8m0, {N, K / 32});
            break;
        case LinearFormat::nvfp4:
            h.w.resize(w.size() / 2);
            h.s.resize(static_cast<size_t>(N * (K / 16)));
            quantize_nvfp4(w.data(), N, K, h.w.data(), h.s.data(), &h.s2);
            l.weight = Tensor(h.w.data(), DType::u8, {N, K / 2});
            l.scale = Tensor(h.s.data(), DType::e4m3, {N, K / 16});
            l.scale_2 = Tensor(&h.s2, DType::f32, {});
            break;
        default: fail("make_weights: format");
    }
}

std::vector<uint16_t> random_x(int64_t M, int64_t K, uint64_t seed) {
    Rng r(seed);
    std::vector<uint16_t> x(static_cast<size_t>(M * K));
    for (auto& v : x) v = f32_to_bf16(r.sym() * 2.0f);
    return x;
}

// Worst |gpu - cpu| / Σ|w||x| over all elements of y [M, N] (inf if an element is out of tolerance
// or NaN), x the f32 input both sides multiplied.
double worst_ratio(const HostLinear& h, const std::vector<float>& xf, const std::vector<float>& ref,
                   const std::vector<float>& got, int64_t M) {
    const int64_t N = h.lin.out, K = h.lin.in;
    std::vector<double> worst(static_cast<size_t>(num_threads()), 0.0);
    parallel_ranges(N, [&](int64_t b, int64_t e, int wkr) {
        std::vector<float> row(static_cast<size_t>(K));
        for (int64_t n = b; n < e; ++n) {
            h.lin.decode_row(n, row.data());
            for (int64_t t = 0; t < M; ++t) {
                double bound = 0;
                for (int64_t k = 0; k < K; ++k) bound += std::fabs(double(row[size_t(k)]) * xf[size_t(t * K + k)]);
                const size_t i = static_cast<size_t>(t * N + n);
                const double diff = std::fabs(double(got[i]) - double(ref[i]));
                double r = bound > 0 ? diff / bound : (diff == 0 ? 0 : INFINITY);
                if (!(diff <= kRelTol * bound)) r = INFINITY;
                worst[size_t(wkr)] = std::max(worst[size_t(wkr)], r);
            }
        }
    }, K * M);
    return *std::max_element(worst.begin(), worst.end());
}

// Worst |gpu - cpu| / Σ|w||x| over all elements (inf if an element is out of tolerance or NaN).
double validate(const HostLinear& h, const cuda::DeviceLinear& d, int64_t M, cudaStream_t stream,
                const cuda::LinearOptions& o = {}) {
    const int64_t N = h.lin.out, K = h.lin.in;
    const auto x = random_x(M, K, 77 + static_cast<uint64_t>(M));
    std::vector<float> xf(x.size());
    for (size_t i = 0; i < x.size(); ++i) xf[i] = bf16_to_f32(x[i]);
    std::vector<float> ref(static_cast<size_t>(M * N)), got(ref.size());
    ops::linear(h.lin, xf.data(), M, ref.data());
    const cuda::DeviceArray<uint16_t> dx(x);
    cuda::DeviceArray<float> dy(got.size());
    dy.fill(0xFF);
    cuda::linear_small_m(d, dx.data(), M, dy.data(), o, stream);
    CUDA_CHECK(cudaStreamSynchronize(stream));
    got = dy.download();
    return worst_ratio(h, xf, ref, got, M);
}

// The FP8 × FP8 path (official numerics): x rounded by round_gemm_input on the CPU side, quantized
// by quantize_gemm_input on the GPU; same per-element bound. Returns the worst ratio, inf on failure.
double validate_fp8_act(const HostLinear& h, const cuda::DeviceLinear& d, int64_t M, cudaStream_t stream) {
    const int64_t N = h.lin.out, K = h.lin.in;
    const auto x = random_x(M, K, 77 + static_cast<uint64_t>(M));
    std::vector<float> xf(x.size());
    for (size_t i = 0; i < x.size(); ++i) xf[i] = bf16_to_f32(x[i]);
    ops::round_gemm_input(Numerics::official, xf.data(), M, K);
    std::vector<float> ref(static_cast<size_t>(M * N));
    ops::linear(h.lin, xf.data(), M, ref.data());
    const cuda::DeviceArray<uint16_t> dx(x);
    cuda::DeviceArray<uint8_t> dq(static_cast<size_t>(M * K));
    cuda::DeviceArray<float> ds(static_cast<size_t>(M * K / 128)), dy(ref.size());
    dy.fill(0xFF);
    cuda::quantize_gemm_input(dx.data(), M, K, dq.data(), ds.data(), stream);
    cuda::linear_fp8_act(d, cuda::ActFp8{dq.data(), ds.data()}, M, dy.data(), cuda::LinearOptions{}, stream);
    CUDA_CHECK(cudaStreamSynchronize(stream));
    const std::vector<float> got = dy.download();
    return worst_ratio(h, xf, ref, got, M);
}

}  // namespace

int main(int argc, char** argv) {
    try {
        bool quick = false, verbose = false;
        std::string only, once_fmt;
        int64_t once_m = 0;
        for (int i = 1; i < argc; ++i) {
            quick |= std::strcmp(argv[i], "--quick") == 0;
            verbose |= std::strcmp(argv[i], "--plans") == 0;
            if (std::strcmp(argv[i], "--shape") == 0 && i + 1 < argc) only = argv[++i];
            if (std::strcmp(argv[i], "--once") == 0 && i + 2 < argc) {
                once_fmt = argv[++i];
                once_m = std::atoll(argv[++i]);
            }
        }
        if (!cuda::gpu_available()) {
            std::printf("linear_bench: no CUDA device\n");
            return 1;
        }
        const auto t_start = std::chrono::steady_clock::now();
        int dev = 0;
        CUDA_CHECK(cudaGetDevice(&dev));
        cudaDeviceProp prop;
        CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
        cudaStream_t stream;
        CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        const double d2d = bench::d2d_bandwidth(stream);
        std::printf("GPU: %s, %d SMs, L2 %.0f MB, HBM %.0f GB\n", prop.name, prop.multiProcessorCount,
                    prop.l2CacheSize / 1048576.0, prop.totalGlobalMem / 1e9);
        std::printf("device-to-device cudaMemcpy (read + write): %.0f GB/s\n\n", d2d);

        cublasHandle_t blas;
        CUBLAS_CHECK(cublasCreate(&blas));
        CUBLAS_CHECK(cublasSetStream(blas, stream));
        cuda::DeviceBuffer blas_ws(64ull << 20, "cuBLAS workspace");
        CUBLAS_CHECK(cublasSetWorkspace(blas, blas_ws.get(), blas_ws.bytes()));

        const Shape shapes[] = {{"wq_a", 1024, 4096}, {"wq_b", 32768, 1024}, {"wkv", 512, 4096},
                                {"wo_b", 4096, 8192}, {"w1", 2048, 4096},    {"w2", 4096, 2048},
                                {"gate", 256, 4096}};   // gate: the router (BF16 in the checkpoints)
        const LinearFormat formats[] = {LinearFormat::bf16, LinearFormat::fp8_block, LinearFormat::mxfp4,
                                        LinearFormat::nvfp4};
        const int64_t Ms[] = {1, 4, 16};
        const int64_t max_M = 16;

        std::printf("%-5s %-11s %-6s %3s %9s %10s %8s %6s %9s %8s %9s\n", "shape", "N x K", "format", "M", "us",
                    "bytes", "GB/s", "%d2d", "max err", "cuBLAS", "speed-up");
        bool all_ok = true;
        for (const Shape& sh : shapes) {
            if (!only.empty() && only.find(sh.name) == std::string::npos) continue;
            const int64_t N = sh.N, K = sh.K;
            // x and y buffers shared by every launch (tiny; they stay in L2 like in a real decode step).
            const cuda::DeviceArray<uint16_t> dx(random_x(max_M, K, 5));
            cuda::DeviceArray<float> dy(static_cast<size_t>(max_M * N));

            // cuBLAS on BF16 weights of this shape: y^T[N, M] = W[N, K] · x^T[K, M] (column-major view).
            double blas_us[3] = {0, 0, 0};
            if (once_fmt.empty()) {
                const size_t wbytes = static_cast<size_t>(N * K) * 2;
                const int copies = static_cast<int>(std::max<size_t>(2, (kRotateBytes + wbytes - 1) / wbytes));
                std::vector<uint16_t> wb(static_cast<size_t>(N * K));
                Rng r(99);
                for (auto& v : wb) v = f32_to_bf16(r.sym() * 0.05f);
                std::vector<cuda::DeviceArray<uint16_t>> bufs;
                for (int c = 0; c < copies; ++c) bufs.emplace_back(wb, "cuBLAS weights");
                for (int mi = 0; mi < 3; ++mi) {
                    const int M = static_cast<int>(Ms[mi]);
                    const float alpha = 1.0f, beta = 0.0f;
                    auto gemm = [&](int i) {
                        CUBLAS_CHECK(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(N), M,
                                                  static_cast<int>(K), &alpha, bufs[size_t(i % copies)].data(),
                                                  CUDA_R_16BF, static_cast<int>(K), dx.data(), CUDA_R_16BF,
                                                  static_cast<int>(K), &beta, dy.data(), CUDA_R_32F, static_cast<int>(N),
                                                  CUBLAS_COMPUTE_32F,
                                                  CUBLAS_GEMM_DEFAULT));
                    };
                    gemm(0);   // warm-up outside capture (heuristics, handle state)
                    CUDA_CHECK(cudaStreamSynchronize(stream));
                    blas_us[mi] = bench::time_graph(std::max(copies, 20), stream, gemm, kTiming);
                }
            }

            if (!once_fmt.empty()) {
                // One format and M on the first selected shape, a few plain launches (for profilers).
                for (LinearFormat f : formats) {
                    if (once_fmt != fmt_name(f)) continue;
                    HostLinear h;
                    make_weights(h, f, N, K, 1234 + static_cast<uint64_t>(f));
                    const cuda::OwnedLinear d(h.lin);
                    std::printf("%s %s M=%lld: %s\n", sh.name, fmt_name(f), static_cast<long long>(once_m),
                                cuda::linear_small_m_plan(d.view(), once_m).c_str());
                    for (int i = 0; i < 5; ++i) cuda::linear_small_m(d.view(), dx.data(), once_m, dy.data(), stream);
                    CUDA_CHECK(cudaStreamSynchronize(stream));
                }
                return 0;
            }
            for (LinearFormat f : formats) {
                HostLinear h;
                make_weights(h, f, N, K, 1234 + static_cast<uint64_t>(f));
                std::vector<cuda::OwnedLinear> owned;
                owned.emplace_back(h.lin);
                const size_t packed = owned[0].view().bytes();
                const int copies = static_cast<int>(std::max<size_t>(2, (kRotateBytes + packed - 1) / packed));
                while (static_cast<int>(owned.size()) < copies) owned.push_back(cuda::copy_linear(owned[0].view()));
                std::vector<cuda::DeviceLinear> dl;   // views
                for (const auto& o : owned) dl.push_back(o.view());
                for (int mi = 0; mi < 3; ++mi) {
                    const int64_t M = Ms[mi];
                    const double err = (quick && sh.N * sh.K > (8ll << 20)) ? 0.0 : validate(h, dl[0], M, stream);
                    const bool ok = std::isfinite(err);
                    all_ok &= ok;
                    const double us = bench::time_graph(std::max(copies, 20), stream, [&](int i) {
                        cuda::linear_small_m(dl[size_t(i % copies)], dx.data(), M, dy.data(), stream);
                    }, kTiming);
                    const double bytes = static_cast<double>(packed) + double(M * K * 2) + double(M * N * 4);
                    const double gbs = bytes / (us * 1e-6) / 1e9;
                    char nk[32];
                    std::snprintf(nk, sizeof nk, "%lldx%lld", static_cast<long long>(N), static_cast<long long>(K));
                    std::printf("%-5s %-11s %-6s %3lld %9.2f %10.0f %8.0f %5.1f%% %9.1e %8.2f %8.2fx%s%s%s\n", sh.name,
                                nk, fmt_name(f), static_cast<long long>(M), us, bytes, gbs, 100.0 * gbs / d2d, err,
                                blas_us[mi], blas_us[mi] / us, ok ? "" : "  VALIDATION FAILED",
                                verbose ? "  " : "", verbose ? cuda::linear_small_m_plan(dl[0], M).c_str() : "");
                    std::fflush(stdout);
                    if (cuda::regs_fits(dl[0], dx.data(), cuda::LinearOptions{})) {
                        // The row above ran linear_regs; the same weights on the shared-memory ring kernel.
                        cuda::LinearOptions ring;
                        ring.ring = true;
                        const double er = (quick && sh.N * sh.K > (8ll << 20)) ? 0.0 : validate(h, dl[0], M, stream, ring);
                        all_ok &= std::isfinite(er);
                        const double usr = bench::time_graph(std::max(copies, 20), stream, [&](int i) {
                            cuda::linear_small_m(dl[size_t(i % copies)], dx.data(), M, dy.data(), ring, stream);
                        }, kTiming);
                        const double gbsr = bytes / (usr * 1e-6) / 1e9;
                        std::printf("%-5s %-11s %-6s %3lld %9.2f %10.0f %8.0f %5.1f%% %9.1e %8.2f %8.2fx  x%.2f%s%s%s\n", sh.name,
                                    nk, f == LinearFormat::bf16 ? "bf16rg" : "fp8rng", static_cast<long long>(M), usr, bytes,
                                    gbsr, 100.0 * gbsr / d2d, er, blas_us[mi], blas_us[mi] / usr, us / usr,
                                    std::isfinite(er) ? "" : "  VALIDATION FAILED",
                                    verbose ? "  " : "", verbose ? cuda::linear_small_m_plan(dl[0], M, ring).c_str() : "");
                        std::fflush(stdout);
                    }
                    if (f == LinearFormat::fp8_block && cuda::fp8_act_fits(dl[0], cuda::LinearOptions{})) {
                        // The same weights FP8 × FP8 (official numerics: x as codes + scales, made once).
                        const double e8 = (quick && sh.N * sh.K > (8ll << 20)) ? 0.0 : validate_fp8_act(h, dl[0], M, stream);
                        all_ok &= std::isfinite(e8);
                        cuda::DeviceArray<uint8_t> dq(static_cast<size_t>(M * K));
                        cuda::DeviceArray<float> ds(static_cast<size_t>(M * K / 128));
                        cuda::quantize_gemm_input(dx.data(), M, K, dq.data(), ds.data(), stream);
                        const double us8 = bench::time_graph(std::max(copies, 20), stream, [&](int i) {
                            cuda::linear_fp8_act(dl[size_t(i % copies)], cuda::ActFp8{dq.data(), ds.data()}, M, dy.data(),
                                                 cuda::LinearOptions{}, stream);
                        }, kTiming);
                        const double bytes8 = static_cast<double>(packed) + double(M * K) + double(M * N * 4);
                        const double gbs8 = bytes8 / (us8 * 1e-6) / 1e9;
                        std::printf("%-5s %-11s %-6s %3lld %9.2f %10.0f %8.0f %5.1f%% %9.1e %8.2f %8.2fx  x%.2f vs fp8%s%s%s\n", sh.name,
                                    nk, "fp8x8", static_cast<long long>(M), us8, bytes8, gbs8, 100.0 * gbs8 / d2d, e8,
                                    blas_us[mi], blas_us[mi] / us8, us / us8, std::isfinite(e8) ? "" : "  VALIDATION FAILED",
                                    verbose ? "  " : "", verbose ? cuda::linear_fp8_act_plan(dl[0], M).c_str() : "");
                        std::fflush(stdout);
                    }
                }
            }
        }
        CUBLAS_CHECK(cublasDestroy(blas));
        CUDA_CHECK(cudaStreamDestroy(stream));
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
        std::printf("\nus: per launch, median of %d graph replays; cuBLAS: cublasGemmEx bf16 x bf16 -> f32 on BF16 "
                    "weights of the same shape. %s. %.0f s.\n",
                    kReplays, all_ok ? "all validations passed" : "SOME VALIDATIONS FAILED", secs);
        return all_ok ? 0 : 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "linear_bench: %s\n", e.what());
        return 1;
    }
}
