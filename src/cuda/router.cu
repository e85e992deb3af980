// router.cu — the MoE routers on the GPU (see router.h for the contract; twins ops::route_score and
// ops::route_hash).
//
// One warp per token, 4 tokens per CTA. Score router: lane l holds experts l, l + 32, ... (E ≤ 1024:
// at most 32 per lane, in registers) with s = sqrt(softplus(logit)) and s + bias. k rounds of warp
// argmax (a butterfly on (value, id) under "larger value, then lower id", a total order, so every
// lane ends with the same winner) pick the experts in the twin's order: the twin takes the top k
// (ties to the lower id) and stable-sorts them by descending biased score, which is exactly the
// sequence of successive maxima with ties to the lower id. A NaN biased score is treated as −inf
// (NaN would break the total order; the twin's sort is undefined for it anyway).
// Weights: Σ s over the chosen ids in selection order from +0, then s / Σ · route_scale, as
// normalize_weights in ops_moe.cpp. s uses the accurate expf / log1pf / sqrtf (≤ 2 ulp from glibc).
#include "cuda/router.h"

#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "core/common.h"
#include "cuda/row_kernels.cuh"

namespace megamoe::cuda {
namespace {

constexpr int kRouteWarps = 4;
constexpr int kMaxExperts = 1024;
constexpr int kMaxK = 16;
constexpr int kPerLane = kMaxExperts / 32;

// sqrt(softplus(v)) with torch's threshold (v > 20 gives v), as ops_moe.cpp's sqrt_softplus.
__device__ __forceinline__ float sqrt_softplus(float v) { return __fsqrt_rn(v > 20.0f ? v : log1pf(expf(v))); }

struct RouteArgs {
    const float* logits;      // [T, E]
    int64_t T;
    int E, k;
    const float* bias;        // [E] or null (score router)
    const int32_t* tid2eid;   // [V, k] or null
    const int32_t* tokens;    // [T] (hash router)
    float route_scale;
    int32_t* ids;             // [T, k]
    float* wts;               // [T, k]
};

__global__ void __launch_bounds__(kRouteWarps * 32) route_kernel(RouteArgs a) {
    rk::pdl_begin();
    const int lane = static_cast<int>(threadIdx.x & 31);
    const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + (threadIdx.x >> 5);
    if (t >= a.T) return;   // whole warps; no block-wide barrier below
    const float* lt = a.logits + t * a.E;
    const int E = a.E, k = a.k;

    int my_id = 0;      // lane r < k: the expert of slot r
    float my_s = 0.0f;  // and its unbiased score
    float sum = 0.0f;   // Σ s over the slots, in slot order (the same on every lane)

    if (a.tid2eid != nullptr) {
        if (lane < k) {
            int id = a.tid2eid[static_cast<int64_t>(a.tokens[t]) * k + lane];
            id = id < 0 ? 0 : (id >= E ? E - 1 : id);   // out-of-range table entries are clamped (no stray reads)
            my_id = id;
            my_s = sqrt_softplus(lt[id]);
        }
        for (int r = 0; r < k; ++r) sum = __fadd_rn(sum, __shfl_sync(0xffffffffu, my_s, r));
    } else {
        float sc[kPerLane], bv[kPerLane];
        const int cnt = (E - lane + 31) / 32;   // experts lane, lane + 32, ... below E
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
            if (i < cnt) {
                const int e = lane + 32 * i;
                sc[i] = sqrt_softplus(lt[e]);
                const float b = a.bias != nullptr ? __fadd_rn(sc[i], a.bias[e]) : sc[i];
                bv[i] = isnan(b) ? -INFINITY : b;
            }
        }
        uint32_t taken = 0;   // bit i: expert lane + 32·i already chosen
        for (int r = 0; r < k; ++r) {
            float best = -INFINITY, best_s = 0.0f;
            int best_id = INT_MAX;   // none yet
#pragma unroll
            for (int i = 0; i < kPerLane; ++i) {
                // Ids grow with i, so a strict '>' keeps the lower id on ties.
                if (i < cnt && !((taken >> i) & 1u) && (best_id == INT_MAX || bv[i] > best)) {
                    best = bv[i];
                    best_s = sc[i];
                    best_id = lane + 32 * i;
                }
            }
#pragma unroll
            for (int o = 16; o >= 1; o >>= 1) {
                const float ob = __shfl_xor_sync(0xffffffffu, best, o);
                const float os = __shfl_xor_sync(0xffffffffu, best_s, o);
                const int oid = __shfl_xor_sync(0xffffffffu, best_id, o);
                if (oid != INT_MAX && (best_id == INT_MAX || ob > best || (ob == best && oid < best_id))) {
                    best = ob;
                    best_s = os;
                    best_id = oid;
                }
            }
            if ((best_id & 31) == lane) taken |= 1u << (best_id >> 5);
            sum = __fadd_rn(sum, best_s);
            if (lane == r) {
                my_id = best_id;
                my_s = best_s;
            }
        }
    }
    if (lane < k) {
        a.ids[t * k + lane] = my_id;
        a.wts[t * k + lane] = __fmul_rn(__fdiv_rn(my_s, sum), a.route_scale);
    }
}

}  // namespace

void route(const float* logits, int64_t T, int64_t E, int64_t k, const float* bias, const int32_t* tid2eid,
           const int32_t* tokens, float route_scale, int32_t* ids, float* wts, CUstream_st* stream) {
    if (T < 0) fail("route: T=", T, " is negative");
    if (E < 1 || E > kMaxExperts) fail("route: E=", E, " outside [1, ", kMaxExperts, "]");
    if (k < 1 || k > kMaxK || k > E) fail("route: k=", k, " outside [1, min(", kMaxK, ", E=", E, ")]");
    if (T == 0) return;
    if (!logits || !ids || !wts) fail("route: null logits/ids/wts");
    if (tid2eid != nullptr && tokens == nullptr) fail("route: the hash router needs tokens");
    const RouteArgs a{logits, T, static_cast<int>(E), static_cast<int>(k), bias, tid2eid, tokens, route_scale, ids, wts};
    const dim3 grid(rk::grid_dim((T + kRouteWarps - 1) / kRouteWarps, 0x7fffffff, "route")), block(kRouteWarps * 32);
    rk::launch(route_kernel, grid, block, 0, stream, a);
}

}  // namespace megamoe::cuda
