// gemm.h — tiled linear for any M (prefill) and the routed-expert layer on the GPU. Host API;
// plain C++, compiles without the CUDA toolkit.
//
// Two kernel families (gemm.cu: mma.sync tiles and wgmma tiles) serve three callers:
//   linear / linear_tiled   y[M, N] = x[M, K] · Wᵀ for one weight (M > 16; M ≤ 16 goes to
//                           linear_small_m), optionally grouped (wo_a) and with bf16 output;
//   moe_l1                  per expert e, rows j of its slice of xs:
//                           h[j] = silu(min(g, L)) · clamp(u, -L, L) · ws[j]   (bf16)
//                           with g = xs[j] · w1[e]ᵀ, u = xs[j] · w3[e]ᵀ computed in one pass;
//   moe_l2                  rows[j] = h[j] · w2[e]ᵀ (f32).
// and moe_layer runs the whole routed-expert layer: route → gather → L1 → L2 → combine, with no
// host synchronization (graph-capturable for a fixed T).
//
// Weights stay in their checkpoint formats (DeviceLinear, kernel-order words; see linear.h).
// Results equal the CPU twins (ops::linear, ops::expert_ffn) up to fp32 summation order, plus the
// bf16 rounding of h between L1 and L2 (the GPU layer's only rounding; the CPU twin keeps h in
// fp32: see tests/cuda_gemm_test.cpp for the bound).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda/linear.h"
#include "cuda/moe_dispatch.h"
#include "io/weights.h"

struct CUstream_st;

namespace megamoe::cuda {

// y[M, N] = x[M, K·groups] · Wᵀ (see LinearOptions): M ≤ 16 → linear_small_m, else linear_tiled.
// x bf16 row-major [M, K·groups] (16-byte aligned; for the tiled path K % 8 == 0), y f32 or bf16
// [M, N]. Asynchronous, deterministic, graph-capturable. For M > 16 the wgmma path uses a scratch
// buffer per (device, stream) (x in its column order, split-K partials) that is allocated or grown
// on first need outside stream capture; during capture a call that would need a larger one runs
// the mma.sync kernel instead (same results up to summation order). Capture after a warm-up call.
void linear(const DeviceLinear& w, const uint16_t* x_bf16, int64_t M, void* y, const LinearOptions& o,
            CUstream_st* stream);

// The tiled kernel for any M ≥ 1 (what linear uses for M > 16). f32 weights and fp8 weights with
// NaN codes go to linear_reference. `config` forces one of the kernel shapes (tests, benchmarks):
// -1 chooses from M; otherwise an index into tiled_configs().
void linear_tiled(const DeviceLinear& w, const uint16_t* x_bf16, int64_t M, void* y, const LinearOptions& o,
                  CUstream_st* stream, int config = -1);

// The kernel shapes: a CTA of wr·wt warps covers `rows` weight rows × `tokens` tokens per tile.
struct TiledConfig {
    int mt, nt, wr, wt;      // per warp: 16·mt weight rows × 8·nt tokens; wr × wt warps (rows × tokens)
    int rows, tokens;        // CTA tile
    int stages;              // shared-memory ring depth (0: the wgmma shapes, chosen per format)
};
const std::vector<TiledConfig>& tiled_configs();
std::string tiled_config_name(int config);

// ------------------------------------------------------------------------ routed experts

// The routed experts of one MoE layer on the device: E × (w1, w3 [I, D], w2 [D, I]) in one format
// (NVFP4 or MXFP4, the releases' expert formats; others are refused), each uploaded with
// upload_linear, plus the per-expert parameter tables the grouped kernels read. Move-only; frees
// in the destructor.
class DeviceExperts {
public:
    DeviceExperts() = default;
    explicit DeviceExperts(const std::vector<ExpertWeights>& experts);   // throws megamoe::Error
    ~DeviceExperts();
    DeviceExperts(DeviceExperts&& o) noexcept;
    DeviceExperts& operator=(DeviceExperts&& o) noexcept;
    DeviceExperts(const DeviceExperts&) = delete;
    DeviceExperts& operator=(const DeviceExperts&) = delete;

    LinearFormat format = LinearFormat::nvfp4;
    int64_t E = 0, D = 0, I = 0;
    std::vector<DeviceLinear> w1, w3, w2;   // [E] each
    void* l1_table = nullptr;               // device: per-expert (w1, w3) descriptors
    void* l2_table = nullptr;               // device: per-expert w2 descriptors
    size_t bytes() const;                   // packed checkpoint bytes of all experts

private:
    void release() noexcept;
};

// Device buffers for the routed-expert layer at up to T_max tokens (allocated once; the calls
// below allocate nothing). Move-only.
class MoeLayerWorkspace {
public:
    MoeLayerWorkspace() = default;
    MoeLayerWorkspace(int64_t T_max, int64_t k, const DeviceExperts& ex);   // throws megamoe::Error
    ~MoeLayerWorkspace();
    MoeLayerWorkspace(MoeLayerWorkspace&& o) noexcept;
    MoeLayerWorkspace& operator=(MoeLayerWorkspace&& o) noexcept;
    MoeLayerWorkspace(const MoeLayerWorkspace&) = delete;
    MoeLayerWorkspace& operator=(const MoeLayerWorkspace&) = delete;

    MoeDispatchWorkspace dispatch;   // counts, offsets, perm, inv, xs [T_max·k, D], ws
    uint16_t* h = nullptr;           // [T_max·k, I] bf16, L1 output
    uint16_t* xp = nullptr;          // [T_max·k, max(D, I)] bf16: xs or h in wgmma column order (large T)
    float*    rows = nullptr;        // [T_max·k, D] f32, L2 output (routing weight already applied)
    int32_t*  items = nullptr;       // work list of the grouped kernels: [max_items] × 4 int32
    int32_t*  n_items = nullptr;     // [2]: items of L1's tile size, of L2's
    int64_t   max_items = 0;
    size_t    bytes() const;

private:
    int64_t i_ = 0;   // expert width I the buffers are sized for
    void release() noexcept;
};

// L1 of the routed experts over the rows of ws.dispatch (after route + gather):
// h[j, :] = silu(min(g, limit)) · clamp(u, -limit, limit) · ws[j] in bf16, g/u from w1/w3 of the
// expert that row j belongs to (offsets). N = T·k rows. `config` as in linear_tiled (-1: from T).
void moe_l1(const DeviceExperts& ex, float swiglu_limit, MoeLayerWorkspace& ws, int64_t N, CUstream_st* stream,
            int config = -1);
// L2: rows[j, :] = h[j, :] · w2[e]ᵀ (f32).
void moe_l2(const DeviceExperts& ex, MoeLayerWorkspace& ws, int64_t N, CUstream_st* stream, int config = -1);

// The whole routed-expert layer: y[T, D] = Σ_s weights[t, s] · expert_{ids[t, s]}(x[t]) (+ shared[t]
// added last, if not null), in the slot order of ops::moe. x bf16 [T, D], ids int32 [T, k],
// weights f32 [T, k], shared f32 [T, D] or null, y f32 [T, D]: all device pointers. No host
// synchronization, no allocation: for a fixed T the call can be captured into a CUDA graph and
// replayed with new x / ids / weights.
void moe_layer(const DeviceExperts& ex, float swiglu_limit, const uint16_t* x_bf16, const int32_t* ids,
               const float* weights, int64_t T, const float* shared, float* y, MoeLayerWorkspace& ws,
               CUstream_st* stream, int config = -1);

// The tiled kernel shape moe_layer uses for T tokens (config = -1), and linear_tiled for M rows.
int moe_layer_config(const DeviceExperts& ex, int64_t T, int64_t k);
int linear_tiled_config(const DeviceLinear& w, int64_t M, const LinearOptions& o);

}  // namespace megamoe::cuda
