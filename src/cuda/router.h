// router.h — the MoE routers on the GPU: from the gate's logits to expert ids and routing weights.
// Host API; plain C++, compiles without the CUDA toolkit.
#pragma once

#include <cstdint>

struct CUstream_st;

namespace megamoe::cuda {

// logits f32 [T, E] (the gate linear's output, x · gateᵀ); s = sqrt(softplus(logits)) (torch's
// threshold: v > 20 gives v).
//   score router (tid2eid == null): ids = the k largest s + bias (ties to the lower expert id), in
//                  descending order of s + bias; bias f32 [E] affects the selection only;
//   hash router  (tid2eid != null): ids[t] = tid2eid[tokens[t], :] (int32 [V, k]).
// wts[t, i] = s[ids[t, i]] / Σ_i s[ids[t, i]] · route_scale.     twin: ops::route_score / ops::route_hash
// ids int32 [T, k], wts f32 [T, k]. E ≤ 1024, k ≤ min(16, E). bias null = no bias. Out-of-range
// tid2eid entries are clamped into [0, E) (no stray reads; tokens must lie in [0, V)). A NaN biased
// score ranks as −inf. Launched with programmatic dependent launch: bias, tid2eid and tokens are
// read before the wait for the previous kernel of the stream, so that kernel must not write them
// (only logits may come from it; every earlier kernel has completed, see dev::launch_pdl).
void route(const float* logits, int64_t T, int64_t E, int64_t k, const float* bias, const int32_t* tid2eid,
           const int32_t* tokens, float route_scale, int32_t* ids, float* wts, CUstream_st* stream);

}  // namespace megamoe::cuda
