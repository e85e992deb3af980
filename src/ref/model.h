// model.h — a loaded DeepSeek-V4 model, per-sequence state, and the forward pass.
//
// The engine API takes a batch of independent sequences, each with its own state and any number
// of new tokens: a whole prompt (prefill), a chunk of it (chunked prefill), or one token (decode).
// All three run the same code and give the same logits: every per-token result is computed in
// an order that does not depend on how tokens are grouped.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "io/config.h"
#include "ref/ops.h"
#include "io/safetensors.h"
#include "io/weights.h"

namespace megamoe {

struct Model {
    ModelConfig cfg;
    std::unique_ptr<Checkpoint> checkpoint;   // owns the mappings the weights point into
    Weights w;
    ops::RopeTable rope_main;                 // ratio-0 layers: rope_theta, no YaRN
    ops::RopeTable rope_compress;             // compressed layers: compress_rope_theta with YaRN

    // Reads DIR/config.json and binds the checkpoint; progress(done, total) reports tensors bound.
    static std::unique_ptr<Model> load(const std::string& dir,
                                       const std::function<void(size_t, size_t)>& progress = nullptr);   // throws Error
};

// State of one compressor (attention or indexer) of one layer of one sequence.
struct CompressorState {
    std::vector<float> pending_kv, pending_gate;   // [n_pending, coff·d] tokens of the open window (gate + ape)
    std::vector<float> prev_kv, prev_gate;         // [r, d] series A of the last closed window (overlap only)
    std::vector<float> rows;                       // [n_rows, d] emitted rows (normalized, rotated)
    int64_t n_pending = 0, n_rows = 0;
};

struct LayerState {
    std::vector<float> window;                     // [n_window, head_dim] latest kv rows, last at n_past - 1
    int64_t n_window = 0;
    CompressorState comp;                          // CSA / HCA
    CompressorState index_comp;                    // CSA: the indexer's keys
};

struct SequenceState {
    int64_t n_past = 0;                            // tokens already processed
    std::vector<LayerState> layers;
    explicit SequenceState(const ModelConfig& c) : layers(static_cast<size_t>(c.num_hidden_layers)) {}
};

struct SequenceChunk {
    SequenceState* state;
    std::vector<int32_t> tokens;                   // new tokens, at positions n_past ...
};

// Names of the intermediates passed to ForwardOptions::trace ([T, width] f32, T = batch tokens).
namespace trace_names {
constexpr const char* streams = "streams";        // [T, hc·D] the residual streams entering layer `layer`
constexpr const char* attn_in = "attn_in";        // [T, D] normalized attention input
constexpr const char* attn_out = "attn_out";      // [T, D]
constexpr const char* ffn_in = "ffn_in";          // [T, D]
constexpr const char* ffn_out = "ffn_out";        // [T, D]
constexpr const char* final_norm = "final_norm";  // [T, D] after the HC head and the final norm (layer = L)
}  // namespace trace_names

struct ForwardOptions {
    bool all_logits = false;                       // logits for every token, else only each chunk's last
    std::function<void(const char* name, int64_t layer, const float* data, int64_t T, int64_t width)> trace;
};

// Runs the new tokens of every chunk through the model, advancing each state. logits receives
// [Σ tokens, V] (all_logits) or [n_chunks, V] f32. Throws Error on a token id outside the
// vocabulary or a sequence past max_position_embeddings; no state changes then.
void forward(const Model& m, std::vector<SequenceChunk>& batch, const ForwardOptions& opt, std::vector<float>& logits);

}  // namespace megamoe
