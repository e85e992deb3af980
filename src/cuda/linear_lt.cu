// linear_lt.cu — linears at large M through cuBLASLt: its block-scaled FP8 GEMM and its BF16 GEMM
// (see linear_lt.h for the contracts and why this dependency is chosen).
//
// The FP8 GEMM in cuBLAS's column-major terms: D [N, M4] = op(A) · B with
//   A = W, stored [N, K] row-major = [K, N] column-major (ld = K: the device rows are unpadded), op(A) = Aᵀ;
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
#include <cuda_bf16.h>
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

// fp8_block weights (kernel order: bytes k0 k2 k1 k3 per 4-byte word) → bf16 [N, K] natural order,
// each value code · 2^(e − 127 − F). 16 codes per thread: one 16-byte load, two 16-byte stores.
__device__ __forceinline__ float e4m3_f32(uint32_t b) {
    const uint32_t e = (b >> 3) & 15u, m = b & 7u;
    const float v = e == 0 ? static_cast<float>(m) * 0x1p-9f : __int_as_float(static_cast<int>(((e + 120u) << 23) | (m << 20)));
    return (b & 0x80u) ? -v : v;
}
__global__ void expand_fp8_kernel(const uint8_t* __restrict__ w, int64_t row_bytes, const uint8_t* __restrict__ scale,
                                  int64_t s_row_bytes, int64_t N, int64_t K, int shift, uint16_t* __restrict__ out) {
    const int64_t per_row = K / 16, n16 = N * per_row;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n16; i += int64_t(gridDim.x) * blockDim.x) {
        const int64_t r = i / per_row, k0 = (i % per_row) * 16;
        const uint4 q = *reinterpret_cast<const uint4*>(w + r * row_bytes + k0);
        const int e = scale[(r / 128) * s_row_bytes + k0 / 128];
        const int n = e - 127 - shift;   // 2^n exactly (f32 subnormal below 2^-126)
        const float f = e == 255 ? __int_as_float(0x7FC00000)
                        : n >= -126 ? __int_as_float((n + 127) << 23)
                        : n >= -149 ? __int_as_float(1 << (n + 149)) : 0.0f;
        const uint32_t words[4] = {q.x, q.y, q.z, q.w};
        uint32_t o[8];
#pragma unroll
        for (int j = 0; j < 4; ++j) {   // word bytes b0 b1 b2 b3 hold k0 k2 k1 k3
            const uint32_t v = words[j];
            const float x0 = e4m3_f32(v & 0xFFu) * f, x2 = e4m3_f32((v >> 8) & 0xFFu) * f;
            const float x1 = e4m3_f32((v >> 16) & 0xFFu) * f, x3 = e4m3_f32(v >> 24) * f;
            o[2 * j] = static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(x0))) |
                       (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(x1))) << 16);
            o[2 * j + 1] = static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(x2))) |
                           (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(x3))) << 16);
        }
        uint4* dst = reinterpret_cast<uint4*>(out + r * K + k0);
        dst[0] = make_uint4(o[0], o[1], o[2], o[3]);
        dst[1] = make_uint4(o[4], o[5], o[6], o[7]);
    }
}

}  // namespace

struct LtGemm::Plan {
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

// The heuristic's first algorithm for a descriptor and its layouts (D doubling as C) within
// kWorkspace, into r; false when it has none. A split-K reduction in the output type would round
// bf16 partial sums: only f32 ones.
static bool choose_algo(cublasLtHandle_t h, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                 cublasLtMatrixLayout_t d, bool out_bf16, cublasLtMatmulHeuristicResult_t& r) {
    cublasLtMatmulPreference_t pref = nullptr;
    lt_check(cublasLtMatmulPreferenceCreate(&pref), "preference");
    const uint64_t wsb = kWorkspace;
    const uint32_t schemes = out_bf16 ? CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE : CUBLASLT_REDUCTION_SCHEME_MASK;
    cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof wsb);
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &schemes, sizeof schemes);
    int found = 0;
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulAlgoGetHeuristic(h, desc, a, b, d, d, pref, 1, &r, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    lt_check(st, "algorithm heuristic");
    return found >= 1 && r.state == CUBLAS_STATUS_SUCCESS;
}

LtGemm::LtGemm() {
    cublasLtHandle_t h = nullptr;
    lt_check(cublasLtCreate(&h), "cublasLtCreate");
    handle_ = h;
}

LtGemm::~LtGemm() {
    plans_.clear();
    if (handle_) cublasLtDestroy(handle_);
}

bool LtGemm::fits(const DeviceLinear& w, const LinearOptions& o) {
    return fp8_act_fits(w, o) && (w.out * (o.out_bf16 ? 2 : 4)) % 16 == 0 && w.weight_row_bytes == w.in &&
           w.out < (int64_t{1} << 31) && w.in < (int64_t{1} << 31);
}

size_t LtGemm::scratch_bytes(const DeviceLinear& w, int64_t M) {
    return scratch_layout(w.out, w.in, M / 4 * 4).bytes;
}

const LtGemm::Plan& LtGemm::plan_for(int64_t N, int64_t K, int64_t M4, bool out_bf16) {
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
    if (!choose_algo(handle_, p->desc, p->a, p->b, p->d, out_bf16, p->result))
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

std::string LtGemm::plan(const DeviceLinear& w, int64_t M, const LinearOptions& o) {
    if (!fits(w, o)) return "cublasLt: does not fit";
    std::string s = M >= 4 ? plan_for(w.out, w.in, M / 4 * 4, o.out_bf16).name : std::string("cublasLt: none");
    if (M % 4) s += " + " + std::to_string(M % 4) + " rows " + linear_fp8_act_plan(w, M % 4);
    return s;
}

void LtGemm::linear(const DeviceLinear& w, const ActFp8& x, int64_t M, void* y, const LinearOptions& o,
                       const GemmScratch& scratch, CUstream_st* stream) {
    if (!fits(w, o))
        fail("LtGemm: needs fp8_block weights without NaN codes, K % 128 == 0, one group and 16-byte y rows (got ",
             linear_format_name(w.format), ", N = ", w.out, ", K = ", w.in, ", groups = ", o.groups, ")");
    if (M < 0) fail("LtGemm: M = ", M, " is negative");
    if (M == 0) return;
    if (!x.q || !x.s || !y) fail("LtGemm: null activation or output");
    const int64_t M4 = M / 4 * 4, N = w.out, K = w.in;
    if (M4 > 0) {
        const ScratchLayout l = scratch_layout(N, K, M4);
        if (!scratch.p || scratch.bytes < l.bytes)
            fail("LtGemm: scratch of ", scratch.bytes, " bytes, the call needs ", l.bytes);
        const uintptr_t align = reinterpret_cast<uintptr_t>(x.q) | reinterpret_cast<uintptr_t>(y);
        if (align % 16) fail("LtGemm: x codes and y must be 16-byte aligned");
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
        if (e != cudaSuccess) fail("LtGemm: scale kernel launch: ", cudaGetErrorString(e));
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

// ---------------------------------------------------------------------------- BF16 linears

bool LtGemm::bf16_fits(const DeviceLinear& w, const LinearOptions& o) {
    if (!w.weight || w.out <= 0 || w.in <= 0 || o.groups < 1 || w.out % o.groups) return false;
    if (w.out >= (int64_t{1} << 31) || w.in * o.groups >= (int64_t{1} << 31)) return false;
    const int64_t R = w.out / o.groups, yb = o.out_bf16 ? 2 : 4;
    if ((w.in * o.groups) % 8 || (w.out * yb) % 16 || (o.groups > 1 && (R * yb) % 16)) return false;
    if (w.format == LinearFormat::bf16) return w.weight_row_bytes % 16 == 0;
    return w.format == LinearFormat::fp8_block && !w.nan_codes && w.in % 16 == 0 && w.scale &&
           w.weight_row_bytes % 16 == 0;
}

size_t LtGemm::bf16_scratch_bytes(const DeviceLinear& w) {
    return kWorkspace + (w.format == LinearFormat::fp8_block ? round_up(static_cast<size_t>(w.out * w.in) * 2, kAlign) : 0);
}

const LtGemm::Plan& LtGemm::bf16_plan_for(int64_t N, int64_t K, int64_t lda, int64_t G, int64_t M, bool out_bf16) {
    const auto key = std::make_tuple(N, K, lda, G, M, out_bf16);
    if (auto it = bf16_plans_.find(key); it != bf16_plans_.end()) return *it->second;
    if (bf16_plans_.size() >= kMaxPlans) bf16_plans_.clear();
    auto p = std::make_unique<Plan>();
    const int64_t R = N / G;
    lt_check(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "matmul descriptor");
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    lt_check(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta), "transa");
    lt_check(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb), "transb");
    const cudaDataType yt = out_bf16 ? CUDA_R_16BF : CUDA_R_32F;
    // Group g: D_g [R, M] (ld N) = W_gᵀ · X_g, W_g = rows g·R.. of W ([K, R] column-major, ld lda),
    // X_g = columns g·K.. of x ([K, M] column-major, ld K·G).
    lt_check(cublasLtMatrixLayoutCreate(&p->a, CUDA_R_16BF, static_cast<uint64_t>(K), static_cast<uint64_t>(R), lda),
             "A layout");
    lt_check(cublasLtMatrixLayoutCreate(&p->b, CUDA_R_16BF, static_cast<uint64_t>(K), static_cast<uint64_t>(M), K * G),
             "B layout");
    lt_check(cublasLtMatrixLayoutCreate(&p->d, yt, static_cast<uint64_t>(R), static_cast<uint64_t>(M), N), "D layout");
    if (G > 1) {
        const int32_t count = static_cast<int32_t>(G);
        const int64_t sa = R * lda, sb = K, sd = R;
        for (auto [layout, stride] : {std::pair{p->a, sa}, std::pair{p->b, sb}, std::pair{p->d, sd}}) {
            lt_check(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof count),
                     "batch count");
            lt_check(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                                      sizeof stride),
                     "batch stride");
        }
    }
    if (!choose_algo(handle_, p->desc, p->a, p->b, p->d, out_bf16, p->result))
        fail("cuBLASLt: no BF16 algorithm for N = ", N, ", K = ", K, ", groups = ", G, ", M = ", M);
    int32_t tile = 0, splitk = 0;
    size_t got = 0;
    cublasLtMatmulAlgoConfigGetAttribute(&p->result.algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof tile, &got);
    cublasLtMatmulAlgoConfigGetAttribute(&p->result.algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk, sizeof splitk, &got);
    p->name = "cublasLt bf16" + std::string(G > 1 ? " batched x" + std::to_string(G) : "") + " tile=" +
              std::to_string(tile) + " splitK=" + std::to_string(splitk) + " ws=" + std::to_string(p->result.workspaceSize);
    return *bf16_plans_.emplace(key, std::move(p)).first->second;
}

std::string LtGemm::bf16_plan(const DeviceLinear& w, int64_t M, const LinearOptions& o) {
    if (!bf16_fits(w, o) || M < 1) return "cublasLt bf16: does not fit";
    const bool fp8 = w.format == LinearFormat::fp8_block;
    const int64_t lda = fp8 ? w.in : w.weight_row_bytes / 2;
    return (fp8 ? "fp8 -> bf16 expansion + " : "") + bf16_plan_for(w.out, w.in, lda, o.groups, M, o.out_bf16).name;
}

void LtGemm::linear_bf16(const DeviceLinear& w, const uint16_t* x, int64_t M, void* y, const LinearOptions& o,
                         const GemmScratch& scratch, CUstream_st* stream) {
    if (!bf16_fits(w, o))
        fail("LtGemm::linear_bf16: needs bf16 or fp8_block weights (no NaN codes) with 16-byte x and y rows (got ",
             linear_format_name(w.format), ", N = ", w.out, ", K = ", w.in, ", groups = ", o.groups, ")");
    if (M < 0) fail("LtGemm::linear_bf16: M = ", M, " is negative");
    if (M == 0) return;
    if (!x || !y) fail("LtGemm::linear_bf16: null x or y");
    if ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y)) % 16)
        fail("LtGemm::linear_bf16: x and y must be 16-byte aligned");
    const size_t need = bf16_scratch_bytes(w);
    if (!scratch.p || scratch.bytes < need) fail("LtGemm::linear_bf16: scratch of ", scratch.bytes, " bytes, the call needs ", need);
    const bool fp8 = w.format == LinearFormat::fp8_block;
    uint8_t* base = static_cast<uint8_t*>(scratch.p);
    const void* a = w.weight;
    int64_t lda = w.weight_row_bytes / 2;
    float alpha = 1.0f;
    if (fp8) {
        uint16_t* wb = reinterpret_cast<uint16_t*>(base + kWorkspace);
        const int64_t n16 = w.out * (w.in / 16);
        const int threads = 256;
        const int blocks = static_cast<int>(std::min<int64_t>((n16 + threads - 1) / threads, 132 * 16));
        expand_fp8_kernel<<<blocks, threads, 0, stream>>>(static_cast<const uint8_t*>(w.weight), w.weight_row_bytes,
                                                          static_cast<const uint8_t*>(w.scale), w.scale_row_bytes, w.out,
                                                          w.in, w.exp_shift, wb);
        const cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) fail("LtGemm::linear_bf16: expansion launch: ", cudaGetErrorString(e));
        a = wb;
        lda = w.in;
        alpha = std::ldexp(1.0f, w.exp_shift);
    }
    const Plan& p = bf16_plan_for(w.out, w.in, lda, o.groups, M, o.out_bf16);
    const float beta = 0.0f;
    lt_check(cublasLtMatmul(handle_, p.desc, &alpha, a, p.a, x, p.b, &beta, y, p.d, y, p.d, &p.result.algo, base,
                            kWorkspace, stream),
             "matmul (bf16)");
}

}  // namespace megamoe::cuda
