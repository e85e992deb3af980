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
};

// Runs the new tokens of every chunk through the model, advancing each state. logits receives
// [Σ tokens, V] (all_logits) or [n_chunks, V] f32. Throws Error on a token id outside the
// vocabulary or a sequence past max_position_embeddings; no state changes then.
void forward(const Model& m, std::vector<SequenceChunk>& batch, const ForwardOptions& opt, std::vector<float>& logits);

}  // namespace megamoe
