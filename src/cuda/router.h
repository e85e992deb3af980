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
// Graph padding (slots != null): a token t with slots[t] == pad_slot (int32 [T], read before the
// wait like tokens) is routed as token 0 — the same ids and weights, from token 0's logits (or
// token) — so that the padding rows of a decode graph's bucket hit no expert the real tokens do
// not, and the expert layer reads no weights for them (each token's expert output depends on its
// own rows only, so the real tokens' results do not change). Token 0 must be a real token.
void route(const float* logits, int64_t T, int64_t E, int64_t k, const float* bias, const int32_t* tid2eid,
           const int32_t* tokens, float route_scale, int32_t* ids, float* wts, CUstream_st* stream,
           const int32_t* slots = nullptr, int32_t pad_slot = -1);

}  // namespace megamoe::cuda
