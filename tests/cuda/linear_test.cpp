// cuda_linear_test.cpp — the GPU small-M linear (src/cuda/linear.h) against its CPU twin ops::linear.
//
// Weights come two ways: realistic ones from the quantizers in formats.h (random normal rows of
// different magnitudes), and random packed codes with random scales, which reach every code the
// fast path decodes (e4m3 subnormals, the ±0.5 e2m1 code whose bf16 bit image is subnormal, -0,
// NVFP4 zero and subnormal block scales). x is random bf16. The CPU twin runs ops::linear on the
// same Linear with x widened to f32; the GPU result must match element by element within
// kRelTol of that element's Σ_k |w_nk · x_tk| (see the constant for why).
//
// Without a CUDA build, or without a GPU, the tests skip (the upload checks that need no GPU
// still run in a CUDA build).
#include <gtest/gtest.h>

#ifdef MEGAMOE_HAVE_CUDA

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda/linear.h"
#include "cuda/linear_lt.h"
#include "cuda/numerics.h"
#include "cuda_test_util.h"
#include "io/formats.h"
#include "ref/ops.h"
#include "core/parallel.h"

namespace megamoe {
namespace {

using cuda::DeviceLinear;
using test::fmt_name;
using test::HostLinear;
using test::make_quantized;
using test::random_x;

// Both sides compute Σ_k w_nk·x_tk over the same exact fp32 products (the GPU's bf16 operands are
// the exact weights, see linear.cu); they differ in summation order, in the tensor core's internal
// fp32 accumulation, and, for NVFP4/fp8, in where the scale product is rounded. Each is a few
// fp32 roundings of partial sums bounded by Σ|w||x|, so the error is ~K_eff·2^-24 of that sum at
// worst; 1e-5 leaves ample margin over the observed ~1e-7 while still catching any wrong
// element, scale or sign (those are errors of order 1e-3 .. 1 of the sum).
constexpr double kRelTol = 1e-5;
constexpr double kAbsTol = 1e-30;   // so that a row whose products are all zero must give exactly 0

bool gpu() { return cuda::gpu_available(); }

#define SKIP_WITHOUT_GPU() \
    if (!gpu()) GTEST_SKIP() << "no CUDA device"

// Random packed codes and scales: every fp8 code but NaN, every nibble, e8m0 scales over a wide
// range, NVFP4 block scales over all finite e4m3 values (zero and subnormals included).
void make_random_codes(HostLinear& h, LinearFormat f, int64_t N, int64_t K, uint32_t seed) {
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int> byte(0, 255);
    switch (f) {
        case LinearFormat::fp8_block: {
            h.w.resize(static_cast<size_t>(N * K));
            for (auto& b : h.w) {
                do b = static_cast<uint8_t>(byte(rng));
                while ((b & 0x7F) == 0x7F);
            }
            h.s.resize(static_cast<size_t>(((N + 127) / 128) * ((K + 127) / 128)));
            std::uniform_int_distribution<int> e(100, 134);
            for (auto& b : h.s) b = static_cast<uint8_t>(e(rng));
            break;
        }
        case LinearFormat::mxfp4: {
            h.w.resize(static_cast<size_t>(N * K / 2));
            for (auto& b : h.w) b = static_cast<uint8_t>(byte(rng));
            h.s.resize(static_cast<size_t>(N * (K / 32)));
            std::uniform_int_distribution<int> e(90, 128);
            for (auto& b : h.s) b = static_cast<uint8_t>(e(rng));
            break;
        }
        case LinearFormat::nvfp4: {
            h.w.resize(static_cast<size_t>(N * K / 2));
            for (auto& b : h.w) b = static_cast<uint8_t>(byte(rng));
            h.s.resize(static_cast<size_t>(N * (K / 16)));
            std::uniform_int_distribution<int> e(0, 0x7E);
            for (auto& b : h.s) b = static_cast<uint8_t>(e(rng));
            h.s2 = 3.0e-4f;
            break;
        }
        default: FAIL() << "make_random_codes: format without codes";
    }
    h.bind(f, N, K);
}

using cuda::DeviceArray;

// y_gpu for x (host bf16), via the fast path or the reference kernel. y starts as NaN bytes so
// that an element left unwritten fails the comparison. `x_offset` shifts x by that many
// elements inside its buffer (to reach the unaligned staging path).
std::vector<float> run_gpu(const DeviceLinear& d, const std::vector<uint16_t>& x, int64_t M, bool reference = false,
                           int x_offset = 0, cudaStream_t stream = nullptr) {
    DeviceArray<uint16_t> dx(x.size() + static_cast<size_t>(x_offset));
    DeviceArray<float> dy(static_cast<size_t>(M * d.out));
    CUDA_CHECK(cudaMemcpy(dx.data() + x_offset, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemset(dy.data(), 0xFF, dy.size() * sizeof(float)));
    if (reference) cuda::linear_reference(d, dx.data() + x_offset, M, dy.data(), stream);
    else cuda::linear_small_m(d, dx.data() + x_offset, M, dy.data(), stream);
    CUDA_CHECK(cudaStreamSynchronize(stream));
    std::vector<float> y(static_cast<size_t>(M * d.out));
    CUDA_CHECK(cudaMemcpy(y.data(), dy.data(), y.size() * sizeof(float), cudaMemcpyDeviceToHost));
    return y;
}

struct Reference {
    std::vector<float> y;       // ops::linear
    std::vector<double> bound;  // Σ_k |w_nk·x_tk|
};

Reference cpu_twin(const Linear& lin, const std::vector<uint16_t>& x, int64_t M) {
    const int64_t N = lin.out, K = lin.in;
    std::vector<float> xf(x.size());
    for (size_t i = 0; i < x.size(); ++i) xf[i] = bf16_to_f32(x[i]);
    Reference r;
    r.y.resize(static_cast<size_t>(M * N));
    ops::linear(lin, xf.data(), M, r.y.data());
    r.bound.resize(static_cast<size_t>(M * N));
    parallel_ranges(N, [&](int64_t b, int64_t e, int) {
        std::vector<float> row(static_cast<size_t>(K));
        for (int64_t n = b; n < e; ++n) {
            lin.decode_row(n, row.data());
            for (int64_t t = 0; t < M; ++t) {
                double s = 0;
                for (int64_t k = 0; k < K; ++k) s += std::fabs(double(row[size_t(k)]) * xf[size_t(t * K + k)]);
                r.bound[static_cast<size_t>(t * N + n)] = s;
            }
        }
    }, K * M);
    return r;
}

// Largest |gpu - cpu| / (Σ|w||x|) over all elements; fails the test at the first bad element.
double compare(const std::vector<float>& gpu_y, const Reference& ref, int64_t M, int64_t N, const std::string& what) {
    double worst = 0;
    int reported = 0;
    for (int64_t t = 0; t < M; ++t) {
        for (int64_t n = 0; n < N; ++n) {
            const size_t i = static_cast<size_t>(t * N + n);
            const double d = std::fabs(double(gpu_y[i]) - double(ref.y[i]));
            const double tol = kRelTol * ref.bound[i] + kAbsTol;
            const bool same_nan = std::isnan(gpu_y[i]) && std::isnan(ref.y[i]);
            if (!same_nan && !(d <= tol)) {
                if (reported++ < 5)
                    ADD_FAILURE() << what << ": y[" << t << ", " << n << "] gpu " << gpu_y[i] << " cpu " << ref.y[i]
                                  << " |diff| " << d << " > tol " << tol;
            }
            if (ref.bound[i] > 0 && !same_nan) worst = std::max(worst, d / ref.bound[i]);
        }
    }
    return worst;
}

struct Shape {
    int64_t N, K;
};

void check_format(LinearFormat f, const std::vector<Shape>& shapes, bool random_codes, uint32_t seed) {
    for (const Shape& s : shapes) {
        HostLinear h;
        if (random_codes) make_random_codes(h, f, s.N, s.K, seed);
        else make_quantized(h, f, s.N, s.K, seed);
        cuda::OwnedLinear d(h.lin);
        for (int64_t M : {1, 3, 16}) {
            const auto x = random_x(M, s.K, seed + static_cast<uint32_t>(M));
            const Reference ref = cpu_twin(h.lin, x, M);
            const std::string what = str(fmt_name(f), random_codes ? " codes " : " ", s.N, "x", s.K, " M=", M);
            const double worst = compare(run_gpu(d.view(), x, M), ref, M, s.N, what);
            std::printf("  %-32s max |gpu-cpu| / sum|w||x| = %.2e\n", what.c_str(), worst);
            ++seed;
        }
    }
}

// ---------------------------------------------------------------------------- tests

TEST(CudaLinear, UploadRejectsBadTensors) {
    // Checks happen before any CUDA call, so this runs in any CUDA build, GPU or not.
    HostLinear h;
    h.w.resize(16 * 64);
    h.s.resize(16 * 2);
    h.bind(LinearFormat::mxfp4, 16, 64);
    h.lin.scale = Tensor(h.s.data(), DType::e8m0, {16, 3});
    try {
        cuda::OwnedLinear d(h.lin);
        ADD_FAILURE() << "expected megamoe::Error";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("scale has shape [16, 3], expected [16, 2]"), std::string::npos) << e.what();
    }
    EXPECT_THROW((void)cuda::upload_linear_bytes(h.lin), Error);
    cuda::DeviceArena plan;
    EXPECT_THROW((void)cuda::upload_linear(h.lin, plan), Error);
    h.bind(LinearFormat::mxfp4, 16, 64);
    h.lin.weight.dtype = DType::f32;
    EXPECT_THROW((void)cuda::OwnedLinear(h.lin), Error);
    EXPECT_THROW((void)cuda::packed_row_bytes(LinearFormat::mxfp4, 48), Error);
    EXPECT_EQ(cuda::device_row_bytes(LinearFormat::nvfp4, 48), 64);
    EXPECT_EQ(cuda::device_row_bytes(LinearFormat::fp8_block, 4096), 4096);
}

TEST(CudaLinear, UploadIsLossless) {
    SKIP_WITHOUT_GPU();
    const LinearFormat formats[] = {LinearFormat::f32, LinearFormat::bf16, LinearFormat::fp8_block,
                                    LinearFormat::mxfp4, LinearFormat::nvfp4};
    for (LinearFormat f : formats) {
        for (Shape s : {Shape{3, 160}, Shape{17, 96}, Shape{130, 256}}) {
            if (f == LinearFormat::mxfp4 && s.K % 32) continue;
            HostLinear h;
            make_quantized(h, f, s.N, s.K, 7);
            cuda::OwnedLinear d(h.lin);
            EXPECT_EQ(d.view().weight_row_bytes % 64, 0);
            const cuda::PackedBytes b = cuda::download_packed(d.view());
            EXPECT_EQ(b.weight, h.w) << fmt_name(f) << " " << s.N << "x" << s.K;
            EXPECT_EQ(b.scale, h.s) << fmt_name(f) << " " << s.N << "x" << s.K;
            EXPECT_EQ(d.view().scale_2, h.s2);
            EXPECT_EQ(d.view().bytes(), h.lin.bytes());   // packed bytes, padding not counted
            EXPECT_EQ(d.device_bytes(), cuda::upload_linear_bytes(h.lin));
            // copy_linear: an independent device copy with the same bytes.
            const cuda::OwnedLinear c = cuda::copy_linear(d.view());
            EXPECT_NE(c.view().weight, d.view().weight);
            EXPECT_EQ(c.device_bytes(), d.device_bytes());
            const cuda::PackedBytes bc = cuda::download_packed(c.view());
            EXPECT_EQ(bc.weight, h.w) << "copy_linear " << fmt_name(f);
            EXPECT_EQ(bc.scale, h.s) << "copy_linear " << fmt_name(f);
        }
    }
}

// Planning with a counting arena (host only, so this runs without a GPU too): the plan has the
// layout of the upload and null buffers, takes upload_linear_bytes, and a second linear carved
// after it starts where the first one's bytes end.
TEST(CudaLinear, CountingArenaPlansWithoutTheGpu) {
    const LinearFormat formats[] = {LinearFormat::f32, LinearFormat::bf16, LinearFormat::fp8_block,
                                    LinearFormat::mxfp4, LinearFormat::nvfp4};
    for (LinearFormat f : formats) {
        for (Shape s : {Shape{3, 160}, Shape{130, 96}, Shape{257, 1024}}) {
            if (f == LinearFormat::mxfp4 && s.K % 32) continue;
            HostLinear h;
            make_quantized(h, f, s.N, s.K, 5);
            cuda::DeviceArena plan;
            const cuda::DeviceLinear d = cuda::upload_linear(h.lin, plan);
            EXPECT_TRUE(plan.counting());
            EXPECT_EQ(d.weight, nullptr);
            EXPECT_EQ(d.scale, nullptr);
            EXPECT_EQ(d.format, f);
            EXPECT_EQ(d.out, s.N);
            EXPECT_EQ(d.in, s.K);
            EXPECT_EQ(d.weight_row_bytes, cuda::device_row_bytes(f, s.K));
            EXPECT_EQ(d.scale_2, h.s2);
            EXPECT_EQ(d.bytes(), h.lin.bytes());
            const size_t n = cuda::upload_linear_bytes(h.lin);
            EXPECT_EQ(plan.used(), n) << fmt_name(f);
            EXPECT_EQ(n % cuda::DeviceArena::kAlign, 0u);
            // Padded weight rows, then (with scales) the scale rows and 16 bytes of slack.
            const size_t w = static_cast<size_t>(s.N * d.weight_row_bytes);
            const FormatInfo& fi = format_info(f);
            const size_t sc = fi.has_scales() ? static_cast<size_t>(fi.scale_rows(s.N) * d.scale_row_bytes) + 16 : 0;
            EXPECT_EQ(n, cuda::DeviceArena::round_up(w) + (sc ? cuda::DeviceArena::round_up(sc) : 0)) << fmt_name(f);
            if (f == LinearFormat::mxfp4 || f == LinearFormat::nvfp4) {
                EXPECT_EQ(d.scale_row_bytes, d.weight_row_bytes * 2 / fi.scale_cols_per);
            }
            if (f == LinearFormat::fp8_block) {
                EXPECT_EQ(d.scale_row_bytes, fi.scale_cols(s.K));
            }
            const cuda::LinearLayout l = cuda::linear_layout(f, s.N, s.K);
            EXPECT_EQ(l.weight_row_bytes, d.weight_row_bytes);
            EXPECT_EQ(l.scale_row_bytes, d.scale_row_bytes);
            EXPECT_EQ(l.weight_bytes, w);
            EXPECT_EQ(l.scale_bytes, sc);
            (void)cuda::upload_linear(h.lin, plan);
            EXPECT_EQ(plan.used(), 2 * n);
        }
    }
}

// Two linears carved from one arena (the runner's way): each downloads as it was uploaded, at the
// offsets a counting arena planned.
TEST(CudaLinear, UploadIntoOneArena) {
    SKIP_WITHOUT_GPU();
    HostLinear a, b;
    make_quantized(a, LinearFormat::nvfp4, 130, 96, 61);
    make_quantized(b, LinearFormat::fp8_block, 70, 320, 62);
    cuda::DeviceArena plan;
    const cuda::DeviceLinear pa = cuda::upload_linear(a.lin, plan);
    const cuda::DeviceLinear pb = cuda::upload_linear(b.lin, plan);
    cuda::DeviceArena arena(plan.used(), "test arena");
    const cuda::DeviceLinear da = cuda::upload_linear(a.lin, arena);
    const cuda::DeviceLinear db = cuda::upload_linear(b.lin, arena);
    EXPECT_EQ(arena.used(), plan.used());
    EXPECT_EQ(static_cast<uint8_t*>(db.weight) - static_cast<uint8_t*>(da.weight),
              static_cast<std::ptrdiff_t>(cuda::upload_linear_bytes(a.lin)));
    EXPECT_EQ(da.weight_row_bytes, pa.weight_row_bytes);
    EXPECT_EQ(db.scale_row_bytes, pb.scale_row_bytes);
    const cuda::PackedBytes ba = cuda::download_packed(da), bb = cuda::download_packed(db);
    EXPECT_EQ(ba.weight, a.w);
    EXPECT_EQ(ba.scale, a.s);
    EXPECT_EQ(bb.weight, b.w);
    EXPECT_EQ(bb.scale, b.s);
    const auto x = random_x(3, 320, 63);
    compare(run_gpu(db, x, 3), cpu_twin(b.lin, x, 3), 3, 70, "fp8 in a shared arena");
    EXPECT_THROW((void)cuda::upload_linear(a.lin, arena), Error);   // the arena is full
}

TEST(CudaLinear, Bf16MatchesCpuTwin) {
    SKIP_WITHOUT_GPU();
    check_format(LinearFormat::bf16, {{3, 160}, {17, 160}, {40, 200}, {512, 4096}, {1024, 4096}}, false, 100);
}

TEST(CudaLinear, Fp8MatchesCpuTwin) {
    SKIP_WITHOUT_GPU();
    // wq_a, wq_b, wkv, wo_b of DeepSeek-V4-Flash, and odd shapes (partial 128-blocks, K % 64 != 0).
    check_format(LinearFormat::fp8_block,
                 {{3, 160}, {17, 160}, {130, 200}, {1024, 4096}, {32768, 1024}, {512, 4096}, {4096, 8192}}, false, 200);
}

TEST(CudaLinear, Mxfp4MatchesCpuTwin) {
    SKIP_WITHOUT_GPU();
    // Expert w1 (and w3) [2048, 4096] and w2 [4096, 2048], and odd shapes.
    check_format(LinearFormat::mxfp4, {{3, 64}, {17, 64}, {40, 96}, {2048, 4096}, {4096, 2048}}, false, 300);
}

TEST(CudaLinear, Nvfp4MatchesCpuTwin) {
    SKIP_WITHOUT_GPU();
    check_format(LinearFormat::nvfp4, {{3, 64}, {17, 64}, {40, 48}, {2048, 4096}, {4096, 2048}}, false, 400);
}

TEST(CudaLinear, AllCodesMatchCpuTwin) {
    SKIP_WITHOUT_GPU();
    check_format(LinearFormat::fp8_block, {{17, 160}, {256, 1024}}, true, 500);
    check_format(LinearFormat::mxfp4, {{17, 64}, {256, 1024}}, true, 600);
    check_format(LinearFormat::nvfp4, {{17, 64}, {256, 1024}}, true, 700);
}

TEST(CudaLinear, ReferenceKernelMatchesCpuTwin) {
    SKIP_WITHOUT_GPU();
    const LinearFormat formats[] = {LinearFormat::f32, LinearFormat::bf16, LinearFormat::fp8_block,
                                    LinearFormat::mxfp4, LinearFormat::nvfp4};
    for (LinearFormat f : formats) {
        HostLinear h;
        make_quantized(h, f, 70, 320, 11);
        cuda::OwnedLinear d(h.lin);
        for (int64_t M : {1, 16, 20}) {
            const auto x = random_x(M, 320, 12);
            compare(run_gpu(d.view(), x, M, /*reference=*/true), cpu_twin(h.lin, x, M), M, 70,
                    str("reference ", fmt_name(f), " M=", M));
        }
    }
}

TEST(CudaLinear, F32AndNanCodesTakeTheExactPath) {
    SKIP_WITHOUT_GPU();
    HostLinear f32;
    make_quantized(f32, LinearFormat::f32, 33, 100, 21);
    cuda::OwnedLinear d32(f32.lin);
    auto x = random_x(2, 100, 22);
    compare(run_gpu(d32.view(), x, 2), cpu_twin(f32.lin, x, 2), 2, 33, "f32");

    HostLinear h;
    make_quantized(h, LinearFormat::fp8_block, 40, 256, 23);
    h.w[5 * 256 + 17] = 0x7F;   // row 5 holds an e4m3 NaN
    cuda::OwnedLinear d(h.lin);
    EXPECT_TRUE(d.view().nan_codes);
    x = random_x(3, 256, 24);
    const auto y = run_gpu(d.view(), x, 3);
    const Reference ref = cpu_twin(h.lin, x, 3);
    for (int64_t t = 0; t < 3; ++t) EXPECT_TRUE(std::isnan(y[static_cast<size_t>(t * 40 + 5)]));
    compare(y, ref, 3, 40, "fp8 with NaN code");
}

TEST(CudaLinear, LargeMUnalignedXAndStreams) {
    SKIP_WITHOUT_GPU();
    HostLinear h;
    make_quantized(h, LinearFormat::nvfp4, 300, 512, 31);
    cuda::OwnedLinear d(h.lin);
    cudaStream_t stream = nullptr;
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    for (int64_t M : {17, 40}) {
        const auto x = random_x(M, 512, 32);
        compare(run_gpu(d.view(), x, M, false, 0, stream), cpu_twin(h.lin, x, M), M, 300, str("nvfp4 M=", M));
    }
    // x one element off 16-byte alignment, and K % 8 != 0 (bf16 K = 100): the scalar staging path.
    const auto x = random_x(5, 512, 33);
    compare(run_gpu(d.view(), x, 5, false, 1, stream), cpu_twin(h.lin, x, 5), 5, 300, "nvfp4 unaligned x");
    HostLinear b;
    make_quantized(b, LinearFormat::bf16, 19, 100, 34);
    cuda::OwnedLinear db(b.lin);
    const auto xb = random_x(4, 100, 35);
    compare(run_gpu(db.view(), xb, 4, false, 0, stream), cpu_twin(b.lin, xb, 4), 4, 19, "bf16 K=100");
    CUDA_CHECK(cudaStreamDestroy(stream));
}

TEST(CudaLinear, Deterministic) {
    SKIP_WITHOUT_GPU();
    HostLinear h;
    make_quantized(h, LinearFormat::fp8_block, 512, 4096, 41);   // split over a cluster of CTAs
    cuda::OwnedLinear d(h.lin);
    const auto x = random_x(16, 4096, 42);
    const auto a = run_gpu(d.view(), x, 16), b = run_gpu(d.view(), x, 16);
    EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)));
}

TEST(CudaLinear, ZeroTokensIsANoOp) {
    SKIP_WITHOUT_GPU();
    HostLinear h;
    make_quantized(h, LinearFormat::bf16, 8, 64, 51);
    cuda::OwnedLinear d(h.lin);
    EXPECT_NO_THROW(cuda::linear_small_m(d.view(), nullptr, 0, nullptr, nullptr));
    EXPECT_THROW(cuda::linear_small_m(d.view(), nullptr, -1, nullptr, nullptr), Error);
    DeviceLinear empty;
    EXPECT_THROW(cuda::linear_small_m(empty, nullptr, 1, nullptr, nullptr), Error);
}

// The upload's word permutation (host code: runs without a GPU). Every one of the 2^16 values of
// the low and high half-words, with random other halves: from_kernel_order undoes
// to_kernel_order, fp8 byte b of the kernel word holds element [0 2 1 3][b], fp4 nibble j holds
// element kFp4KernelOrder[j]; bf16 and f32 rows are left unchanged.
// ---------------------------------------------------------------------------- FP8 × FP8 (linear_regs.cu)

// The official numerics' FP8 linear: x rounded by round_gemm_input (the CPU twin's input), the GPU
// given the same activation as codes + scales by quantize_gemm_input. Both sides then sum exact
// products (e4m3 × e4m3 in f32 on the GPU, the decoded weight times the rounded x on the CPU), so
// the bound is the same kRelTol of Σ|w||x_rounded| as for the BF16 path.
void check_fp8_act(const std::vector<Shape>& shapes, bool random_codes, uint32_t seed) {
    for (const Shape& s : shapes) {
        HostLinear h;
        if (random_codes) make_random_codes(h, LinearFormat::fp8_block, s.N, s.K, seed);
        else make_quantized(h, LinearFormat::fp8_block, s.N, s.K, seed);
        cuda::OwnedLinear d(h.lin);
        ASSERT_TRUE(cuda::fp8_act_fits(d.view(), cuda::LinearOptions{}));
        for (int64_t M : {1, 3, 8, 9, 16, 21, 33, 64, 80}) {   // token tiles 1, 2, 4, 8; two launches
            const auto x = random_x(M, s.K, seed + static_cast<uint32_t>(M));
            std::vector<float> xf(x.size());
            for (size_t i = 0; i < x.size(); ++i) xf[i] = bf16_to_f32(x[i]);
            ops::round_gemm_input(Numerics::official, xf.data(), M, s.K);
            std::vector<uint16_t> xr(x.size());
            for (size_t i = 0; i < x.size(); ++i) {
                xr[i] = f32_to_bf16(xf[i]);
                ASSERT_EQ(bf16_to_f32(xr[i]), xf[i]) << "a rounded GEMM input is a bf16";
            }
            const Reference ref = cpu_twin(h.lin, xr, M);
            DeviceArray<uint16_t> dx(x);
            DeviceArray<uint8_t> dq(static_cast<size_t>(M * s.K));
            DeviceArray<float> ds(static_cast<size_t>(M * s.K / 128));
            DeviceArray<float> dy(static_cast<size_t>(M * s.N));
            dy.fill(0xFF);
            cuda::quantize_gemm_input(dx.data(), M, s.K, dq.data(), ds.data(), nullptr);
            cuda::linear_fp8_act(d.view(), cuda::ActFp8{dq.data(), ds.data()}, M, dy.data(), cuda::LinearOptions{},
                                 nullptr);
            CUDA_CHECK(cudaDeviceSynchronize());
            const std::string what = str("fp8 x fp8", random_codes ? " codes " : " ", s.N, "x", s.K, " M=", M);
            const double worst = compare(dy.download(), ref, M, s.N, what);
            std::printf("  %-36s max |gpu-cpu| / sum|w||x| = %.2e  (%s)\n", what.c_str(), worst,
                        cuda::linear_fp8_act_plan(d.view(), M).c_str());
            if (M == 3) {   // bf16 output: the f32 result rounded to nearest even
                const std::vector<float> y32 = dy.download();
                DeviceArray<uint16_t> dyb(static_cast<size_t>(M * s.N));
                cuda::LinearOptions o;
                o.out_bf16 = true;
                cuda::linear_fp8_act(d.view(), cuda::ActFp8{dq.data(), ds.data()}, M, dyb.data(), o, nullptr);
                CUDA_CHECK(cudaDeviceSynchronize());
                const std::vector<uint16_t> yb = dyb.download();
                for (size_t i = 0; i < yb.size(); ++i)
                    ASSERT_EQ(yb[i], f32_to_bf16(y32[i])) << what << ": bf16 output " << i;
            }
            ++seed;
        }
    }
}

TEST(CudaLinear, Fp8ActFitsAndRejects) {
    // Host checks only (no launch), so this runs in every CUDA build.
    DeviceLinear w;
    w.format = LinearFormat::fp8_block;
    w.out = 256;
    w.in = 1024;
    w.weight = reinterpret_cast<void*>(0x1000);
    w.scale = reinterpret_cast<void*>(0x2000);
    cuda::LinearOptions o;
    EXPECT_TRUE(cuda::fp8_act_fits(w, o));
    w.in = 1000;
    EXPECT_FALSE(cuda::fp8_act_fits(w, o)) << "K % 128 != 0";
    w.in = 1024;
    w.nan_codes = true;
    EXPECT_FALSE(cuda::fp8_act_fits(w, o)) << "NaN codes take the exact path";
    w.nan_codes = false;
    o.groups = 2;
    EXPECT_FALSE(cuda::fp8_act_fits(w, o)) << "grouped";
    o.groups = 1;
    w.format = LinearFormat::nvfp4;
    EXPECT_FALSE(cuda::fp8_act_fits(w, o));
    try {
        float y = 0;
        cuda::linear_fp8_act(w, cuda::ActFp8{}, 1, &y, o, nullptr);
        FAIL() << "nvfp4 weights accepted";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("linear_fp8_act"), std::string::npos) << e.what();
    }
}

TEST(CudaLinear, RegsFitsAndRejects) {
    // Host checks only (no launch), so this runs in every CUDA build.
    DeviceLinear w;
    w.format = LinearFormat::fp8_block;
    w.out = 8 * 1024;
    w.in = 1024;
    w.weight = reinterpret_cast<void*>(0x1000);
    w.scale = reinterpret_cast<void*>(0x2000);
    const auto* x = reinterpret_cast<const uint16_t*>(0x3000);
    cuda::LinearOptions o;
    EXPECT_TRUE(cuda::regs_fits(w, x, o));
    o.groups = 8;
    EXPECT_TRUE(cuda::regs_fits(w, x, o)) << "grouped, 1024 rows per group";
    w.out = 8 * 40;
    EXPECT_FALSE(cuda::regs_fits(w, x, o)) << "groups of 40 rows: a warp's 16 rows would straddle two";
    w.out = 8 * 1024;
    o.groups = 1;
    EXPECT_FALSE(cuda::regs_fits(w, x + 1, o)) << "x not 16-byte aligned";
    w.in = 1000;
    EXPECT_FALSE(cuda::regs_fits(w, x, o)) << "K % 128 != 0";
    w.in = 1024;
    w.nan_codes = true;
    EXPECT_FALSE(cuda::regs_fits(w, x, o)) << "NaN codes take the exact path";
    w.nan_codes = false;
    w.format = LinearFormat::bf16;
    w.scale = nullptr;
    EXPECT_TRUE(cuda::regs_fits(w, x, o)) << "bf16, K % 64 == 0";
    w.in = 1000;
    EXPECT_FALSE(cuda::regs_fits(w, x, o)) << "bf16, K % 64 != 0";
    w.in = 1024;
    w.format = LinearFormat::nvfp4;
    EXPECT_FALSE(cuda::regs_fits(w, x, o));
    try {
        float y = 0;
        cuda::linear_regs(w, x, 1, &y, o, nullptr);
        FAIL() << "nvfp4 weights accepted";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("linear_regs"), std::string::npos) << e.what();
    }
}

// linear_small_m's two kernels for FP8 and BF16 weights, the register-streamed one (linear_regs,
// what linear_small_m runs for FP8 and for BF16 above 8 tokens) and the shared-memory ring
// (linear_small_m with LinearOptions::ring), against the CPU twin on the
// same inputs: V4-Flash wq_a, wq_b, wkv, wo_b (FP8), the router gate (BF16); odd row counts
// (partial 16-row tiles and 128-row scale blocks), odd K for BF16 (a multiple of 64 only);
// M = 1, 3, 9 (two token tiles) and 16; f32 and bf16 y (the bf16 y is the f32 one rounded);
// every code but NaN with wide block scales; a grouped linear (3 groups of 48 rows, the regs
// kernel's x offset per group; the last group straddles two 128-row scale blocks), through
// linear_regs and through linear_small_m (which runs grouped linears on the ring), against
// double sums of each decoded row over its group's columns of x.
TEST(CudaLinear, RegsAndRingMatchCpuTwin) {
    SKIP_WITHOUT_GPU();
    struct Case {
        int64_t N, K;
        bool codes;
        LinearFormat f = LinearFormat::fp8_block;
    };
    uint32_t seed = 1200;
    for (const Case c : {Case{17, 128, false}, Case{130, 256, false}, Case{1024, 4096, false}, Case{32768, 1024, false},
                         Case{512, 4096, false}, Case{4096, 8192, false}, Case{17, 256, true}, Case{256, 1024, true},
                         Case{256, 4096, false, LinearFormat::bf16}, Case{17, 64, false, LinearFormat::bf16},
                         Case{130, 192, false, LinearFormat::bf16}}) {
        HostLinear h;
        if (c.codes) make_random_codes(h, c.f, c.N, c.K, seed);
        else make_quantized(h, c.f, c.N, c.K, seed);
        cuda::OwnedLinear d(h.lin);
        // 1-16 tokens: linear_regs and the ring; 17-64 (token tiles 4, 8) and 80 (two launches):
        // linear_regs, and at 64 also cuda::linear with LinearOptions::ring, which then runs the
        // tiled kernel it ran there before linear_regs took 17-64 tokens.
        for (int64_t M : {1, 3, 9, 16, 17, 33, 64, 80}) {
            const auto x = random_x(M, c.K, seed + static_cast<uint32_t>(M));
            const Reference ref = cpu_twin(h.lin, x, M);
            DeviceArray<uint16_t> dx(x);
            ASSERT_TRUE(cuda::regs_fits(d.view(), dx.data(), cuda::LinearOptions{}));
            for (bool ring : {false, true}) {
                if (ring && M > 16 && M != 64) continue;
                cuda::LinearOptions o;
                o.ring = ring;
                DeviceArray<float> yf(static_cast<size_t>(M * c.N));
                DeviceArray<uint16_t> yb(static_cast<size_t>(M * c.N));
                CUDA_CHECK(cudaMemset(yf.data(), 0xFF, yf.size() * sizeof(float)));
                CUDA_CHECK(cudaMemset(yb.data(), 0xFF, yb.size() * 2));
                auto run = [&](void* y) {
                    if (ring && M > 16) cuda::linear(d.view(), dx.data(), M, y, o, nullptr, nullptr);
                    else if (ring) cuda::linear_small_m(d.view(), dx.data(), M, y, o, nullptr);
                    else cuda::linear_regs(d.view(), dx.data(), M, y, o, nullptr);
                };
                run(yf.data());
                o.out_bf16 = true;
                run(yb.data());
                CUDA_CHECK(cudaDeviceSynchronize());
                const std::vector<float> gf = yf.download();
                const std::vector<uint16_t> gb = yb.download();
                const std::string what =
                    str(ring ? (M > 16 ? "tiled " : "ring ") : "regs ", fmt_name(c.f), c.codes ? " codes " : " ", c.N, "x", c.K,
                        " M=", M);
                const double worst = compare(gf, ref, M, c.N, what);
                size_t bad = 0;
                for (size_t i = 0; i < gf.size(); ++i) bad += gb[i] != f32_to_bf16(gf[i]);
                EXPECT_EQ(bad, 0u) << what << ": bf16 y is not the f32 y rounded";
                if (M == 1 || M == 16 || M == 64) std::printf("  %-34s max |gpu-cpu| / sum|w||x| = %.2e\n", what.c_str(), worst);
                if (HasFailure()) return;
            }
        }
        ++seed;
    }
    // Grouped: y[:, g·48 .. g·48 + 48) = x[:, g·256 .. g·256 + 256) · W_gᵀ.
    const int64_t G = 3, R = 48, K = 256;
    HostLinear h;
    make_quantized(h, LinearFormat::fp8_block, G * R, K, 1300);
    cuda::OwnedLinear d(h.lin);
    cuda::LinearOptions og;
    og.groups = G;
    for (int64_t M : {1, 5, 16, 40}) {
        const auto x = random_x(M, G * K, 1301 + static_cast<uint32_t>(M));
        DeviceArray<uint16_t> dx(x);
        ASSERT_TRUE(cuda::regs_fits(d.view(), dx.data(), og));
        DeviceArray<float> dy(static_cast<size_t>(M * G * R)), dr(dy.size());
        CUDA_CHECK(cudaMemset(dy.data(), 0xFF, dy.size() * sizeof(float)));
        CUDA_CHECK(cudaMemset(dr.data(), 0xFF, dr.size() * sizeof(float)));
        cuda::linear_regs(d.view(), dx.data(), M, dy.data(), og, nullptr);
        cuda::linear_small_m(d.view(), dx.data(), M, dr.data(), og, nullptr);   // grouped: the ring kernel
        CUDA_CHECK(cudaDeviceSynchronize());
        const std::vector<float> y = dy.download(), yr = dr.download();
        Reference ref;   // row n of group n / R times that group's K columns of x, in double
        ref.y.resize(y.size());
        ref.bound.resize(y.size());
        std::vector<float> row(static_cast<size_t>(K));
        for (int64_t n = 0; n < G * R; ++n) {
            h.lin.decode_row(n, row.data());
            for (int64_t t = 0; t < M; ++t) {
                double acc = 0, bound = 0;
                for (int64_t k = 0; k < K; ++k) {
                    const double p = double(row[size_t(k)]) * bf16_to_f32(x[size_t(t * G * K + (n / R) * K + k)]);
                    acc += p;
                    bound += std::fabs(p);
                }
                ref.y[size_t(t * G * R + n)] = static_cast<float>(acc);
                ref.bound[size_t(t * G * R + n)] = bound;
            }
        }
        compare(y, ref, M, G * R, str("regs grouped G=", G, " M=", M));
        compare(yr, ref, M, G * R, str("ring grouped G=", G, " M=", M));
        if (HasFailure()) return;
    }
}

TEST(CudaLinear, Fp8ActMatchesCpuTwin) {
    SKIP_WITHOUT_GPU();
    // V4-Flash wq_a, wq_b, wkv, wo_b, shared w1 / w2, V4-Pro wq_a; odd row counts (partial 16-row
    // tiles and 128-row scale blocks), one and three 128-blocks of K.
    check_fp8_act({{3, 128}, {17, 384}, {130, 256}, {1024, 4096}, {32768, 1024}, {512, 4096}, {4096, 8192},
                   {2048, 4096}, {4096, 2048}, {1536, 7168}},
                  false, 800);
    // Every code but NaN in weights and wide block scales.
    check_fp8_act({{17, 256}, {256, 1024}}, true, 900);
}

// cuBLASLt's block-scaled FP8 GEMM (cuda::LtGemm, the large-M path of the official numerics'
// FP8 linears) against the same CPU twin as linear_fp8_act: ops::linear on round_gemm_input(x).
// M = 4 (cuBLASLt alone), 7 (4 rows there, 3 through linear_fp8_act), 64 and 1027; the twin runs
// on a sample of the token rows (the first four, both sides of the M4 boundary, the last, random
// ones) over every weight row. Also: a second call gives the same bits (the algorithm and its
// reduction order are fixed), and bf16 y lies within the bound plus its bf16 rounding.
//
// The bound is not kRelTol: Hopper's FP8 WGMMA accumulates a 128-element block's products in an
// accumulator of about 14 significant bits (DeepSeek-V3 technical report §3.3.2), so each block
// partial carries errors of a few units of 2^-13 of its magnitude, added over the K / 32 MMA steps
// of the block; the blocks are then summed in f32. 2^-10 of Σ|w·x| leaves ~2.5x over the worst
// measured on an H200 (3.8e-4, random codes with scales over 2^-27 .. 2^7; 8.8e-6 .. 4.8e-5 on the
// quantized V4 shapes, up to 8.4e-5 on the small odd ones). What this path can get wrong in layout — a scale block misplaced (tested by partial
// row blocks, 3 K blocks, wide scales), the two operands' kernel byte order, the M − M4 tail rows —
// makes errors of order 2^-3 .. 1 of Σ|w·x|, far above it.
constexpr double kLtRelTol = 1.0 / 1024;

double compare_lt(const std::vector<float>& gpu_y, const Reference& ref, int64_t M, int64_t N, const std::string& what) {
    double worst = 0;
    int reported = 0;
    for (size_t i = 0; i < static_cast<size_t>(M * N); ++i) {
        const double d = std::fabs(double(gpu_y[i]) - double(ref.y[i]));
        if (!(d <= kLtRelTol * ref.bound[i] + kAbsTol) && reported++ < 5)
            ADD_FAILURE() << what << ": y[" << i / size_t(N) << ", " << i % size_t(N) << "] gpu " << gpu_y[i] << " cpu "
                          << ref.y[i] << " |diff| " << d << " > " << kLtRelTol * ref.bound[i];
        if (ref.bound[i] > 0) worst = std::max(worst, d / ref.bound[i]);
    }
    return worst;
}
void check_lt(cuda::LtGemm& lt, const std::vector<Shape>& shapes, bool random_codes, uint32_t seed) {
    for (const Shape& s : shapes) {
        HostLinear h;
        if (random_codes) make_random_codes(h, LinearFormat::fp8_block, s.N, s.K, seed);
        else make_quantized(h, LinearFormat::fp8_block, s.N, s.K, seed);
        cuda::OwnedLinear d(h.lin);
        ASSERT_TRUE(cuda::LtGemm::fits(d.view(), cuda::LinearOptions{})) << s.N << "x" << s.K;
        for (int64_t M : {4, 7, 64, 1027}) {
            const auto x = random_x(M, s.K, seed + static_cast<uint32_t>(M));
            DeviceArray<uint16_t> dx(x);
            DeviceArray<uint8_t> dq(static_cast<size_t>(M * s.K));
            DeviceArray<float> ds(static_cast<size_t>(M * s.K / 128));
            DeviceArray<float> dy(static_cast<size_t>(M * s.N));
            DeviceArray<uint8_t> scratch(cuda::LtGemm::scratch_bytes(d.view(), M));
            const cuda::GemmScratch sc{scratch.data(), scratch.size()};
            dy.fill(0xFF);
            cuda::quantize_gemm_input(dx.data(), M, s.K, dq.data(), ds.data(), nullptr);
            const cuda::ActFp8 a{dq.data(), ds.data()};
            lt.linear(d.view(), a, M, dy.data(), cuda::LinearOptions{}, sc, nullptr);
            CUDA_CHECK(cudaDeviceSynchronize());
            const std::vector<float> y = dy.download();
            // The sampled token rows and their rounded inputs.
            std::vector<int64_t> toks;
            for (int64_t t : {int64_t(0), int64_t(1), int64_t(2), int64_t(3), M / 4 * 4 - 1, M / 4 * 4, M - 1})
                if (t >= 0 && t < M && std::find(toks.begin(), toks.end(), t) == toks.end()) toks.push_back(t);
            std::mt19937 rng(seed);
            while (static_cast<int64_t>(toks.size()) < std::min<int64_t>(M, 12)) {
                const int64_t t = static_cast<int64_t>(rng() % static_cast<uint32_t>(M));
                if (std::find(toks.begin(), toks.end(), t) == toks.end()) toks.push_back(t);
            }
            const int64_t m = static_cast<int64_t>(toks.size());
            std::vector<float> xf(static_cast<size_t>(m * s.K));
            for (int64_t i = 0; i < m; ++i)
                for (int64_t k = 0; k < s.K; ++k) xf[size_t(i * s.K + k)] = bf16_to_f32(x[size_t(toks[size_t(i)] * s.K + k)]);
            ops::round_gemm_input(Numerics::official, xf.data(), m, s.K);
            std::vector<uint16_t> xr(xf.size());
            for (size_t i = 0; i < xf.size(); ++i) xr[i] = f32_to_bf16(xf[i]);
            const Reference ref = cpu_twin(h.lin, xr, m);
            std::vector<float> ys(static_cast<size_t>(m * s.N));
            for (int64_t i = 0; i < m; ++i)
                std::copy_n(y.begin() + toks[size_t(i)] * s.N, s.N, ys.begin() + i * s.N);
            const std::string what = str("cublasLt fp8", random_codes ? " codes " : " ", s.N, "x", s.K, " M=", M);
            const double worst = compare_lt(ys, ref, m, s.N, what);
            std::printf("  %-40s max |gpu-cpu| / sum|w||x| = %.2e  (%s)\n", what.c_str(), worst,
                        lt.plan(d.view(), M, cuda::LinearOptions{}).c_str());
            // Unwritten rows would still hold the 0xFF NaN pattern.
            for (size_t i = 0; i < y.size(); ++i)
                if (std::isnan(y[i])) FAIL() << what << ": y[" << i / size_t(s.N) << ", " << i % size_t(s.N) << "] unwritten";
            // The same call again: the same bits.
            dy.fill(0);
            lt.linear(d.view(), a, M, dy.data(), cuda::LinearOptions{}, sc, nullptr);
            CUDA_CHECK(cudaDeviceSynchronize());
            ASSERT_TRUE(dy.download() == y) << what << ": a second call differs";
            if (M == 64 && s.N % 8 == 0) {   // bf16 y: the f32 result rounded (its algorithm may differ: 1 ulp)
                cuda::LinearOptions o;
                o.out_bf16 = true;
                DeviceArray<uint16_t> dyb(static_cast<size_t>(M * s.N));
                lt.linear(d.view(), a, M, dyb.data(), o, sc, nullptr);
                CUDA_CHECK(cudaDeviceSynchronize());
                const std::vector<uint16_t> yb = dyb.download();
                for (int64_t i = 0; i < m; ++i)
                    for (int64_t n = 0; n < s.N; ++n) {
                        const size_t gi = size_t(toks[size_t(i)] * s.N + n), ri = size_t(i * s.N + n);
                        const double tol = kLtRelTol * ref.bound[ri] + std::ldexp(std::fabs(double(ref.y[ri])), -8) + kAbsTol;
                        ASSERT_LE(std::fabs(double(bf16_to_f32(yb[gi])) - double(ref.y[ri])), tol)
                            << what << ": bf16 y[" << toks[size_t(i)] << ", " << n << "]";
                    }
            }
            ++seed;
        }
    }
}

TEST(CudaLinear, LtFp8MatchesCpuTwin) {
    SKIP_WITHOUT_GPU();
    cuda::LtGemm lt;
    // V4-Flash wq_a, wq_b, wo_b, shared w1 / w2, indexer wq_b, V4-Pro wq_a; a partial 128-row block
    // (N = 136) and a K-block count that is not a multiple of 4 (K = 384).
    check_lt(lt, {{1024, 4096}, {32768, 1024}, {4096, 8192}, {2048, 4096}, {4096, 2048}, {8192, 1024}, {1536, 7168},
                  {136, 256}, {256, 384}},
             false, 1200);
    // Every code but NaN in weights and wide block scales.
    check_lt(lt, {{136, 384}, {512, 1024}}, true, 1300);
}

TEST(CudaLinear, LtFp8FitsAndRejects) {
    // Host checks only (no launch, no handle).
    DeviceLinear w;
    w.format = LinearFormat::fp8_block;
    w.out = 256;
    w.in = 1024;
    w.weight_row_bytes = 1024;
    w.weight = reinterpret_cast<void*>(0x1000);
    w.scale = reinterpret_cast<void*>(0x2000);
    cuda::LinearOptions o;
    EXPECT_TRUE(cuda::LtGemm::fits(w, o));
    w.out = 3;
    EXPECT_FALSE(cuda::LtGemm::fits(w, o)) << "f32 y rows of 12 bytes";
    w.out = 4;
    EXPECT_TRUE(cuda::LtGemm::fits(w, o));
    o.out_bf16 = true;
    EXPECT_FALSE(cuda::LtGemm::fits(w, o)) << "bf16 y rows of 8 bytes";
    w.out = 8;
    EXPECT_TRUE(cuda::LtGemm::fits(w, o));
    w.in = 1000;
    w.weight_row_bytes = 1024;
    EXPECT_FALSE(cuda::LtGemm::fits(w, o)) << "K % 128 != 0";
    w.in = 1024;
    o.groups = 8;
    EXPECT_FALSE(cuda::LtGemm::fits(w, o)) << "grouped";
    o.groups = 1;
    w.format = LinearFormat::mxfp4;
    EXPECT_FALSE(cuda::LtGemm::fits(w, o));
    EXPECT_GT(cuda::LtGemm::scratch_bytes(w, 1024), size_t{1024} * 8 * 4) << "room for the activation scales";
}

TEST(CudaLinear, KernelOrderIsALosslessWordPermutation) {
    std::mt19937 rng(77);
    std::vector<uint8_t> orig(4 * 2 * 65536);
    for (uint32_t i = 0; i < 2 * 65536; ++i) {
        const uint32_t r = rng();
        const uint32_t w = i < 65536 ? (r & 0xFFFF0000u) | i : (r & 0x0000FFFFu) | ((i - 65536) << 16);
        std::memcpy(orig.data() + 4 * i, &w, 4);
    }
    for (LinearFormat f : {LinearFormat::f32, LinearFormat::bf16, LinearFormat::fp8_block, LinearFormat::mxfp4,
                           LinearFormat::nvfp4}) {
        std::vector<uint8_t> k = orig;
        cuda::to_kernel_order(f, k.data(), static_cast<int64_t>(k.size()));
        for (size_t i = 0; i < orig.size(); i += 4) {
            uint32_t a, b;
            std::memcpy(&a, orig.data() + i, 4);
            std::memcpy(&b, k.data() + i, 4);
            for (int j = 0; j < 8; ++j) {
                int src = j;   // the element of the original word at position j of the kernel word
                if (f == LinearFormat::fp8_block) src = j / 2 == 0 || j / 2 == 3 ? j : (j / 2 == 1 ? j + 2 : j - 2);
                if (f == LinearFormat::mxfp4 || f == LinearFormat::nvfp4) src = cuda::kFp4KernelOrder[j];
                ASSERT_EQ((b >> (4 * j)) & 0xFu, (a >> (4 * src)) & 0xFu) << fmt_name(f) << " word " << i / 4 << " nibble " << j;
            }
        }
        cuda::from_kernel_order(f, k.data(), static_cast<int64_t>(k.size()));
        ASSERT_EQ(k, orig) << fmt_name(f);
    }
    std::vector<uint8_t> odd(6);
    EXPECT_THROW(cuda::to_kernel_order(LinearFormat::nvfp4, odd.data(), 6), Error);
}

}  // namespace
}  // namespace megamoe

#else  // !MEGAMOE_HAVE_CUDA

TEST(CudaLinear, SkippedWithoutCuda) { GTEST_SKIP() << "built without CUDA"; }

#endif
