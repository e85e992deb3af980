// trace.h — named intermediates of the forward, shared by the CPU reference and the GPU runner,
// and the probe that sees (and may overwrite) them.
//
// Both forwards call the probe at the same points with the same names, so a per-layer comparison
// finds the first tensor that diverges. A probe that overwrites a view's data and sets `modified`
// makes the forward continue from the new values: the GPU runner uses that for teacher forcing
// (the CPU's input streams and its discrete choices, indexer top-k and expert ids, fed to the GPU
// layer so errors stay local).
#pragma once

#include <cstdint>
#include <functional>

#include "core/tensor.h"

namespace megamoe {

namespace trace_names {
constexpr const char* streams = "streams";        // f32 [T, hc·D] the residual streams entering layer `layer`
constexpr const char* attn_in = "attn_in";        // f32 [T, D] normalized attention input
constexpr const char* index_topk = "index_topk";  // i32 [T, index_topk] the indexer's rows (CSA layers), -1 = none
constexpr const char* attn_out = "attn_out";      // f32 [T, D]
constexpr const char* ffn_in = "ffn_in";          // f32 [T, D]
constexpr const char* expert_ids = "expert_ids";  // i32 [T, k] routed experts
constexpr const char* ffn_out = "ffn_out";        // f32 [T, D]
constexpr const char* final_norm = "final_norm";  // f32 [T, D] after the HC head and the final norm (layer = L)
// The MTP block (mtp_forward): its layer index is L; the names above (streams, attn_in, attn_out,
// index_topk, ffn_in, expert_ids, ffn_out) are traced for its block with layer = L too.
constexpr const char* mtp_embed = "mtp_embed";    // f32 [T, D] enorm(embed[next token])
constexpr const char* mtp_hidden = "mtp_hidden";  // f32 [T, hc·D] hnorm of the main model's pre-head streams
constexpr const char* mtp_norm = "mtp_norm";      // f32 [T, D] after the MTP HC head and its norm (layer = L)
}  // namespace trace_names

// One traced tensor in host memory, row-major [rows, width] of `dtype` (f32 or i32).
struct TraceView {
    const char* name = nullptr;   // a trace_names constant
    int64_t     layer = 0;
    DType       dtype = DType::f32;
    void*       data = nullptr;
    int64_t     rows = 0, width = 0;
    bool        modified = false; // set by a probe that overwrote data

    float*   f32() const { return static_cast<float*>(data); }
    int32_t* i32() const { return static_cast<int32_t*>(data); }
};
using Probe = std::function<void(TraceView&)>;

}  // namespace megamoe
