// model.h — a loaded DeepSeek-V4 model and its forward pass: the CPU specification.
//
// The forward takes a batch of independent sequences, each with its own state (ref/state.h) and
// any number of new tokens: a whole prompt (prefill), a chunk of it (chunked prefill), or one
// token (decode). All three run the same code and give the same logits: every per-token result is
// computed in an order that does not depend on how tokens are grouped.
//
// The GPU runner (gpu/runner.h) mirrors forward() block by block with the same names: the layer
// schedule, the weight walk, the trace names (ref/trace.h) and the state semantics are shared.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "io/config.h"
#include "io/safetensors.h"
#include "io/weights.h"
#include "ref/ops.h"
#include "ref/state.h"
#include "ref/trace.h"

namespace megamoe {

struct Model {
    ModelConfig cfg;
    std::unique_ptr<Checkpoint> checkpoint;   // owns the mappings the weights point into
    Weights w;
    ops::RopeTable rope_main;                 // ratio-0 layers: rope_theta, no YaRN
    ops::RopeTable rope_compress;             // compressed layers: compress_rope_theta with YaRN
    Numerics numerics = Numerics::exact;      // how activations are rounded (a run setting: --numerics)

    const ops::RopeTable& rope_for(int64_t layer) const {
        return cfg.attn_kind(layer) == AttnKind::sliding ? rope_main : rope_compress;
    }

    // Reads DIR/config.json and binds the checkpoint; progress(done, total) reports tensors bound.
    static std::unique_ptr<Model> load(const std::string& dir,
                                       const std::function<void(size_t, size_t)>& progress = nullptr);   // throws Error
};

struct ForwardOptions {
    bool  all_logits = false;                      // logits for every token, else only each chunk's last
    Probe probe;                                   // sees every named intermediate (ref/trace.h)
    std::vector<float>* streams_out = nullptr;     // if set: f32 [Σ tokens, hc·D] the residual streams
                                                   // before the HC head (the MTP block's input)
};

// Runs the new tokens of every chunk through the model, advancing each state. logits receives
// [Σ tokens, V] (all_logits) or [n_chunks, V] f32. Throws Error on a token id outside the
// vocabulary or a sequence past max_position_embeddings; no state changes then.
void forward(const Model& m, std::vector<SequenceChunk>& batch, const ForwardOptions& opt, std::vector<float>& logits);

// ---- multi-token prediction (the checkpoint's mtp.0.* block; deepseek-v4.md §5)
// The MTP block at position p takes the main model's pre-head streams at p and the embedding of
// token p+1 and predicts token p+2: e = enorm(embed[next]), X = e_proj(e) + h_proj(hnorm(X_main))
// (per stream), one sliding-window V4 block (base-10000 RoPE, score router) over the block's own
// window of earlier positions (SequenceState::mtp), then its own HC head and norm, the shared head.
// A chunk feeds positions mtp.n_past .. mtp.n_past + n - 1, which the main model must already have
// processed (n_past of the main state); any chunking gives the same logits bit for bit.
struct MtpChunk {
    SequenceState* state = nullptr;                // its .mtp advances by next_tokens.size()
    const float* streams = nullptr;                // f32 [n, hc·D] main pre-head streams at those positions
    std::vector<int32_t> next_tokens;              // [n] the token at each position + 1
};
// logits: f32 [Σ n, V] (opt.all_logits) or [n_chunks, V] (each chunk's last); opt.streams_out, if
// set, receives f32 [Σ n, hc·D] the block's own streams before its HC head, which speculative
// decoding feeds back as the next draft's `streams` (ref/speculative.h). Throws Error (no state changes) without an MTP block, on a token outside the vocabulary,
// or for a position the main model has not processed.
void mtp_forward(const Model& m, std::vector<MtpChunk>& batch, const ForwardOptions& opt, std::vector<float>& logits);

}  // namespace megamoe
