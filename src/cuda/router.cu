// router.cu — the MoE routers on the GPU (see router.h for the contract; twins ops::route_score and
// ops::route_hash).
//
// One warp per token, 4 tokens per CTA. Score router: lane l holds experts l, l + 32, ... (NPL per
// lane, a template count: E ≤ 32·NPL ≤ 1024, in registers) with s = sqrt(softplus(logit)) and
// s + bias. k rounds of warp argmax pick the experts in the twin's order: the twin takes the top k
// (ties to the lower id) and stable-sorts them by descending biased score, which is exactly the
// sequence of successive maxima with ties to the lower id. Each candidate is one 64-bit key, the
// biased score's bits mapped to an unsigned order (−0 made +0 first, so the two compare equal as
// floats do) above the complement of the id, so "larger key" is "larger value, then lower id", a
// total order; each lane keeps the key of its best untaken candidate, a butterfly of 5 max steps
// gives every lane the winner, its owner lane broadcasts the winner's s and rescans its own NPL
// candidates. A NaN biased score is treated as −inf (NaN would break the total order; the twin's
// sort is undefined for it anyway).
// Weights: Σ s over the chosen ids in selection order from +0, then s / Σ · route_scale, as
// normalize_weights in ops_moe.cpp. s uses the accurate expf / log1pf / sqrtf (≤ 2 ulp from glibc).
//
// Latency (batch 1): the kernel is one warp and runs beside the shared expert's linears, which
// take most issue slots of the SMs it shares, so its instruction count is its time. The version
// before (every lane scanning 32 predicated slots per round, (value, s, id) in three shuffles per
// butterfly step) added 12-16 µs per score-routed layer on an H200 (megamoe-forward-bench --trace),
// the hash router ~3.
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
    const int32_t* slots;     // [T] or null: graph padding (slots[t] == pad_slot) is routed as token 0
    int32_t pad_slot;
};

// The order key of candidate id with biased score b (see top): larger key = larger b, then lower id.
__device__ __forceinline__ uint64_t route_key(float b, int id) {
    b = isnan(b) ? -INFINITY : __fadd_rn(b, 0.0f);   // NaN as −inf; −0 + 0 = +0
    const uint32_t u = __float_as_uint(b);
    const uint32_t ord = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return (static_cast<uint64_t>(ord) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(id));
}

template <int NPL>
__global__ void __launch_bounds__(kRouteWarps * 32) route_kernel(RouteArgs a) {
    const int lane = static_cast<int>(threadIdx.x & 31);
    const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + (threadIdx.x >> 5);
    const int E = a.E, k = a.k;
    const bool live = t < a.T;
    const int cnt = (E - lane + 31) / 32;   // score router: experts lane, lane + 32, ... below E

    // Every load is issued before any arithmetic that uses it, and what the previous kernel of the
    // stream does not write is read before griddepcontrol.wait: every kernel megamoe launches with
    // programmatic dependent launch waits before it lets the next one start, so when this kernel
    // runs, all kernels but the previous one have completed. The bias and tid2eid are weights; the
    // token ids are written by the step's input copy or, for a chained MTP block, by a kernel many
    // launches back; the previous kernel is the gate linear that writes the logits.
    float bias[NPL];
    int my_id = 0;      // lane r < k: the expert of slot r
    int64_t src = t;    // the token whose logits (or token id) route this one: token 0 for padding
    if (live) {
        if (a.slots != nullptr && a.slots[t] == a.pad_slot) src = 0;
        if (a.tid2eid != nullptr) {
            if (lane < k) {
                const int id = a.tid2eid[static_cast<int64_t>(a.tokens[src]) * k + lane];
                my_id = id < 0 ? 0 : (id >= E ? E - 1 : id);   // out-of-range table entries are clamped (no stray reads)
            }
        } else {
#pragma unroll
            for (int i = 0; i < NPL; ++i)
                if (i < cnt) bias[i] = a.bias != nullptr ? a.bias[lane + 32 * i] : 0.0f;
        }
    }
    rk::pdl_begin();
    if (!live) return;   // whole warps; no block-wide barrier below
    const float* lt = a.logits + src * a.E;

    float my_s = 0.0f;  // lane r < k: the unbiased score of slot r
    float sum = 0.0f;   // Σ s over the slots, in slot order (the same on every lane)

    if (a.tid2eid != nullptr) {
        if (lane < k) my_s = sqrt_softplus(lt[my_id]);
        for (int r = 0; r < k; ++r) sum = __fadd_rn(sum, __shfl_sync(0xffffffffu, my_s, r));
    } else {
        float sc[NPL];
        uint64_t key[NPL];
#pragma unroll
        for (int i = 0; i < NPL; ++i)
            if (i < cnt) sc[i] = lt[lane + 32 * i];   // all loads first (one round trip)
#pragma unroll
        for (int i = 0; i < NPL; ++i) {
            key[i] = 0;   // below every real key: an empty slot
            if (i < cnt) {
                sc[i] = sqrt_softplus(sc[i]);
                key[i] = route_key(a.bias != nullptr ? __fadd_rn(sc[i], bias[i]) : sc[i], lane + 32 * i);
            }
        }
        // This lane's best untaken candidate: its key and s.
        uint64_t best = 0;
        float best_s = 0.0f;
#pragma unroll
        for (int i = 0; i < NPL; ++i) {
            best_s = key[i] > best ? sc[i] : best_s;
            best = key[i] > best ? key[i] : best;
        }
        for (int r = 0; r < k; ++r) {
            uint64_t win = best;
#pragma unroll
            for (int o = 16; o >= 1; o >>= 1) {
                const uint64_t other = __shfl_xor_sync(0xffffffffu, win, o);
                win = other > win ? other : win;
            }
            const int id = static_cast<int>(~static_cast<uint32_t>(win));
            const int owner = id & 31;
            const float s = __shfl_sync(0xffffffffu, best_s, owner);
            if (lane == owner) {   // the winner is taken; the owner's next best
                const int taken = id >> 5;
                best = 0;
#pragma unroll
                for (int i = 0; i < NPL; ++i) {
                    key[i] = i == taken ? 0 : key[i];
                    best_s = key[i] > best ? sc[i] : best_s;
                    best = key[i] > best ? key[i] : best;
                }
            }
            sum = __fadd_rn(sum, s);
            if (lane == r) {
                my_id = id;
                my_s = s;
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
           const int32_t* tokens, float route_scale, int32_t* ids, float* wts, CUstream_st* stream,
           const int32_t* slots, int32_t pad_slot) {
    if (T < 0) fail("route: T=", T, " is negative");
    if (E < 1 || E > kMaxExperts) fail("route: E=", E, " outside [1, ", kMaxExperts, "]");
    if (k < 1 || k > kMaxK || k > E) fail("route: k=", k, " outside [1, min(", kMaxK, ", E=", E, ")]");
    if (T == 0) return;
    if (!logits || !ids || !wts) fail("route: null logits/ids/wts");
    if (tid2eid != nullptr && tokens == nullptr) fail("route: the hash router needs tokens");
    const RouteArgs a{logits, T, static_cast<int>(E), static_cast<int>(k), bias, tid2eid, tokens, route_scale, ids, wts,
                      slots, pad_slot};
    const dim3 grid(rk::grid_dim((T + kRouteWarps - 1) / kRouteWarps, 0x7fffffff, "route")), block(kRouteWarps * 32);
    const int64_t npl = (E + 31) / 32;   // candidates per lane, rounded up to a compiled count
    if (tid2eid != nullptr || npl <= 1) rk::launch(route_kernel<1>, grid, block, 0, stream, a);
    else if (npl <= 2) rk::launch(route_kernel<2>, grid, block, 0, stream, a);
    else if (npl <= 4) rk::launch(route_kernel<4>, grid, block, 0, stream, a);
    else if (npl <= 8) rk::launch(route_kernel<8>, grid, block, 0, stream, a);
    else if (npl <= 12) rk::launch(route_kernel<12>, grid, block, 0, stream, a);
    else if (npl <= 16) rk::launch(route_kernel<16>, grid, block, 0, stream, a);
    else rk::launch(route_kernel<32>, grid, block, 0, stream, a);
}

}  // namespace megamoe::cuda
