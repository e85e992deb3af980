// state.h — what the CPU reference keeps per sequence between forward calls (f32 throughout).
//
// The GPU runner keeps the same state in device pools (gpu/state_pool.h) and can download a
// sequence's state into these types, so tests compare the two after any schedule of prefill,
// chunked prefill and decode.
#pragma once

#include <cstdint>
#include <vector>

#include "io/config.h"

namespace megamoe {

// State of one compressor (attention or indexer) of one layer of one sequence. The rules that
// fill it are written down with compressor_feed (ref/compressor.h).
struct CompressorState {
    std::vector<float> pending_kv, pending_gate;   // [n_pending, coff·d] tokens of the open window (gate + ape)
    std::vector<float> prev_kv, prev_gate;         // [r, d] series A of the last closed window (overlap only)
    std::vector<float> rows;                       // [n_rows, d] emitted rows (normalized, rotated)
    int64_t n_pending = 0, n_rows = 0;
};

struct LayerState {
    std::vector<float> window;                     // [n_window, head_dim] latest kv rows, last at n_past - 1
    int64_t n_window = 0;                          // ≤ sliding_window - 1
    CompressorState comp;                          // CSA / HCA
    CompressorState index_comp;                    // CSA: the indexer's keys
};

// The MTP block's own state of one sequence (a sliding-window layer): it lives next to the main
// model's state and advances one position behind it or in step with it (ref/model.h mtp_forward).
struct MtpState {
    int64_t n_past = 0;                            // positions the MTP block has processed
    LayerState layer;                              // its window (no compressor)
};

struct SequenceState {
    int64_t n_past = 0;                            // tokens already processed
    std::vector<LayerState> layers;
    MtpState mtp;                                  // used only by mtp_forward
    explicit SequenceState(const ModelConfig& c) : layers(static_cast<size_t>(c.num_hidden_layers)) {}
};

struct SequenceChunk {
    SequenceState* state;
    std::vector<int32_t> tokens;                   // new tokens, at positions n_past ...
};

}  // namespace megamoe
