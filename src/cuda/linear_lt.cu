// linear_lt.cu — FP8 × FP8 linears at large M through cuBLASLt's block-scaled FP8 GEMM (see
// linear_lt.h for the contract and why this dependency is chosen).
//
// The GEMM in cuBLAS's column-major terms: D [N, M4] = op(A) · B with
//   A = W, stored [N, K] row-major = [K, N] column-major (ld = the device row bytes), op(A) = Aᵀ;
//   B = x codes, stored [M, K] row-major = [K, M] column-major (ld = K), op(B) = B;
//   D = y, stored [M, N] row-major = [N, M] column-major (ld = N).
// This is the "TN" form Hopper's FP8 GEMM requires. A's scales are BLK128x128_32F: f32 per
// 128 × 128 block, the K blocks of one 128-row block of W contiguous, their count padded to a
// multiple of 4; B's are VEC128_32F: f32 per 128 codes of one token, stored token-major (the M4
// tokens of one K block contiguous). These are the layouts cuBLASLt's Hopper kernels read (the
// same PyTorch's _scaled_mm hands it for BlockWise128x128 / BlockWise1x128); the twin test checks
// them element by element.
#include "cuda/linear_lt.h"

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>

#include "core/common.h"

namespace megamoe::cuda {

namespace {

constexpr size_t kWorkspace = size_t{32} << 20;   // cuBLASLt's workspace (what NVIDIA suggests for Hopper)
constexpr size_t kAlign = 256;

size_t round_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

void lt_check(cublasStatus_t s, const char* what) {
    if (s != CUBLAS_STATUS_SUCCESS) fail("cuBLASLt: ", what, ": ", cublasLtGetStatusString(s));
}

// Where the pieces of a call's scratch lie.
struct ScratchLayout {
    int64_t kb = 0, kb4 = 0, nb = 0;   // K / 128, kb padded to 4, ceil(N / 128)
    size_t w_scales = 0;               // offset of the f32 weight scales [nb, kb4]
    size_t x_scales = 0;               // offset of the f32 activation scales [kb, M4]
    size_t bytes = 0;
};
ScratchLayout scratch_layout(int64_t N, int64_t K, int64_t M4) {
    ScratchLayout l;
    l.kb = K / 128;
    l.kb4 = (l.kb + 3) / 4 * 4;
    l.nb = (N + 127) / 128;
    l.w_scales = kWorkspace;
    l.x_scales = l.w_scales + round_up(static_cast<size_t>(l.nb * l.kb4) * 4, kAlign);
    l.bytes = l.x_scales + round_up(static_cast<size_t>(l.kb * std::max<int64_t>(M4, 4)) * 4, kAlign);
    return l;
}

// e8m0 → f32 exactly (2^(e − 127); 255 is NaN; e = 0 is the subnormal 2^-127), as Linear::decode_row.
__device__ __forceinline__ float e8m0_f32(uint8_t e) {
    if (e == 255) return __int_as_float(0x7FC00000);
    if (e == 0) return __int_as_float(0x00400000);
    return __int_as_float(static_cast<int>(e) << 23);
}

// One launch for both scale tensors: ws [nb, kb4] f32 from the weights' e8m0 [nb, scale_row_bytes]
// (padding columns 1), xs [kb, M4] f32 (token-major) from the activation's [M, kb] (rows < M4).
__global__ void lt_scales_kernel(const uint8_t* __restrict__ wscale, int64_t s_row_bytes, int64_t nb, int64_t kb,
                                 int64_t kb4, float* __restrict__ ws, const float* __restrict__ s, int64_t M4,
                                 float* __restrict__ xs) {
    const int64_t nw = nb * kb4, nx = kb * M4;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < nw + nx; i += int64_t(gridDim.x) * blockDim.x) {
        if (i < nw) {
            const int64_t r = i / kb4, c = i % kb4;
            ws[i] = c < kb ? e8m0_f32(wscale[r * s_row_bytes + c]) : 1.0f;
        } else {
            const int64_t j = i - nw, b = j / M4, t = j % M4;   // xs[b, t] = s[t, b]
            xs[j] = s[t * kb + b];
        }
    }
}

}  // namespace

struct LtFp8Gemm::Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
    cublasLtMatmulHeuristicResult_t result{};
    std::string name;
    ~Plan() {
        if (d) cublasLtMatrixLayoutDestroy(d);
        if (b) cublasLtMatrixLayoutDestroy(b);
        if (a) cublasLtMatrixLayoutDestroy(a);
        if (desc) cublasLtMatmulDescDestroy(desc);
    }
};

LtFp8Gemm::LtFp8Gemm() {
    cublasLtHandle_t h = nullptr;
    lt_check(cublasLtCreate(&h), "cublasLtCreate");
    handle_ = h;
}

LtFp8Gemm::~LtFp8Gemm() {
    plans_.clear();
    if (handle_) cublasLtDestroy(handle_);
}

bool LtFp8Gemm::fits(const DeviceLinear& w, const LinearOptions& o) {
    return fp8_act_fits(w, o) && (w.out * (o.out_bf16 ? 2 : 4)) % 16 == 0 && w.weight_row_bytes == w.in &&
           w.out < (int64_t{1} << 31) && w.in < (int64_t{1} << 31);
}

size_t LtFp8Gemm::scratch_bytes(const DeviceLinear& w, int64_t M) {
    return scratch_layout(w.out, w.in, M / 4 * 4).bytes;
}

const LtFp8Gemm::Plan& LtFp8Gemm::plan_for(int64_t N, int64_t K, int64_t M4, bool out_bf16) {
    // The heuristic refuses a block scale mode whose scale pointer is unset, and takes the pointers'
    // alignment from their values (it does not read them): the calls pass scratch offsets that are
    // multiples of 256, so any such address stands in here.
    static const void* const kScaleStandIn = reinterpret_cast<const void*>(uintptr_t{1} << 20);
    const auto key = std::make_tuple(N, K, M4, out_bf16);
    if (auto it = plans_.find(key); it != plans_.end()) return *it->second;
    if (plans_.size() >= kMaxPlans) plans_.clear();
    auto p = std::make_unique<Plan>();
    lt_check(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "matmul descriptor");
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    lt_check(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta), "transa");
    lt_check(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb), "transb");
    const int32_t ma = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F, mb = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    lt_check(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &ma, sizeof ma), "A scale mode");
    lt_check(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mb, sizeof mb), "B scale mode");
    lt_check(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &kScaleStandIn,
                                            sizeof kScaleStandIn), "A scale pointer");
    lt_check(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &kScaleStandIn,
                                            sizeof kScaleStandIn), "B scale pointer");
    const cudaDataType yt = out_bf16 ? CUDA_R_16BF : CUDA_R_32F;
    lt_check(cublasLtMatrixLayoutCreate(&p->a, CUDA_R_8F_E4M3, static_cast<uint64_t>(K), static_cast<uint64_t>(N), K),
             "A layout");
    lt_check(cublasLtMatrixLayoutCreate(&p->b, CUDA_R_8F_E4M3, static_cast<uint64_t>(K), static_cast<uint64_t>(M4), K),
             "B layout");
    lt_check(cublasLtMatrixLayoutCreate(&p->d, yt, static_cast<uint64_t>(N), static_cast<uint64_t>(M4), N), "D layout");
    cublasLtMatmulPreference_t pref = nullptr;
    lt_check(cublasLtMatmulPreferenceCreate(&pref), "preference");
    const uint64_t wsb = kWorkspace;
    // A split-K reduction in the output type would round bf16 partial sums: only f32 ones.
    const uint32_t schemes = out_bf16 ? CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE : CUBLASLT_REDUCTION_SCHEME_MASK;
    cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof wsb);
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &schemes, sizeof schemes);
    int found = 0;
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulAlgoGetHeuristic(handle_, p->desc, p->a, p->b, p->d, p->d, pref, 1, &p->result, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    lt_check(st, "algorithm heuristic");
    if (found < 1 || p->result.state != CUBLAS_STATUS_SUCCESS)
        fail("cuBLASLt: no FP8 block-scaled algorithm for N = ", N, ", K = ", K, ", M = ", M4,
             out_bf16 ? ", bf16 y" : ", f32 y", " (needs Hopper and CUDA >= 12.9)");
    int32_t tile = 0, splitk = 0;
    uint32_t red = 0;
    size_t got = 0;
    cublasLtMatmulAlgoConfigGetAttribute(&p->result.algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof tile, &got);
    cublasLtMatmulAlgoConfigGetAttribute(&p->result.algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk, sizeof splitk, &got);
    cublasLtMatmulAlgoConfigGetAttribute(&p->result.algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &red, sizeof red, &got);
    p->name = "cublasLt fp8 block-scaled M4=" + std::to_string(M4) + " tile=" + std::to_string(tile) +
              " splitK=" + std::to_string(splitk) + " reduction=" + std::to_string(red) +
              " ws=" + std::to_string(p->result.workspaceSize);
    return *plans_.emplace(key, std::move(p)).first->second;
}

std::string LtFp8Gemm::plan(const DeviceLinear& w, int64_t M, const LinearOptions& o) {
    if (!fits(w, o)) return "cublasLt: does not fit";
    std::string s = M >= 4 ? plan_for(w.out, w.in, M / 4 * 4, o.out_bf16).name : std::string("cublasLt: none");
    if (M % 4) s += " + " + std::to_string(M % 4) + " rows " + linear_fp8_act_plan(w, M % 4);
    return s;
}

void LtFp8Gemm::linear(const DeviceLinear& w, const ActFp8& x, int64_t M, void* y, const LinearOptions& o,
                       const GemmScratch& scratch, CUstream_st* stream) {
    if (!fits(w, o))
        fail("LtFp8Gemm: needs fp8_block weights without NaN codes, K % 128 == 0, one group and 16-byte y rows (got ",
             linear_format_name(w.format), ", N = ", w.out, ", K = ", w.in, ", groups = ", o.groups, ")");
    if (M < 0) fail("LtFp8Gemm: M = ", M, " is negative");
    if (M == 0) return;
    if (!x.q || !x.s || !y) fail("LtFp8Gemm: null activation or output");
    const int64_t M4 = M / 4 * 4, N = w.out, K = w.in;
    if (M4 > 0) {
        const ScratchLayout l = scratch_layout(N, K, M4);
        if (!scratch.p || scratch.bytes < l.bytes)
            fail("LtFp8Gemm: scratch of ", scratch.bytes, " bytes, the call needs ", l.bytes);
        const uintptr_t align = reinterpret_cast<uintptr_t>(x.q) | reinterpret_cast<uintptr_t>(y);
        if (align % 16) fail("LtFp8Gemm: x codes and y must be 16-byte aligned");
        const Plan& p = plan_for(N, K, M4, o.out_bf16);
        uint8_t* base = static_cast<uint8_t*>(scratch.p);
        float* ws = reinterpret_cast<float*>(base + l.w_scales);
        float* xs = reinterpret_cast<float*>(base + l.x_scales);
        const int64_t n = l.nb * l.kb4 + l.kb * M4;
        const int threads = 256;
        const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 1024));
        lt_scales_kernel<<<blocks, threads, 0, stream>>>(static_cast<const uint8_t*>(w.scale), w.scale_row_bytes, l.nb,
                                                         l.kb, l.kb4, ws, x.s, M4, xs);
        const cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) fail("LtFp8Gemm: scale kernel launch: ", cudaGetErrorString(e));
        lt_check(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &ws, sizeof ws),
                 "A scale pointer");
        lt_check(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &xs, sizeof xs),
                 "B scale pointer");
        const float alpha = 1.0f, beta = 0.0f;
        lt_check(cublasLtMatmul(handle_, p.desc, &alpha, w.weight, p.a, x.q, p.b, &beta, y, p.d, y, p.d, &p.result.algo,
                                base, kWorkspace, stream),
                 "matmul");
    }
    if (M4 < M) {   // the last M − M4 < 4 rows
        const int64_t y_row = N * (o.out_bf16 ? 2 : 4);
        const ActFp8 tail{x.q + M4 * K, x.s + M4 * (K / 128)};
        linear_fp8_act(w, tail, M - M4, static_cast<uint8_t*>(y) + M4 * y_row, o, stream);
    }
}

}  // namespace megamoe::cuda
