// backend.h — a model executor as the engine and the command-line drivers see it: sequences live
// in slots, a step runs chunks of new tokens of several sequences, logits come back. The CPU
// reference (make_cpu_backend, here) and the GPU runner (gpu/backend.h) implement it; nothing
// above this interface knows which one runs.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ref/model.h"

namespace megamoe {

struct BackendChunk {
    int32_t slot = -1;                 // from Backend::open
    std::vector<int32_t> tokens;       // new tokens, at positions n_past(slot) ...
};

class Backend {
public:
    virtual ~Backend() = default;
    virtual const ModelConfig& config() const = 0;
    virtual std::string name() const = 0;          // "cpu" | "cuda"
    virtual int64_t max_seqs() const = 0;          // sequences at once
    virtual int64_t max_batch_tokens() const = 0;  // tokens per step (callers split longer prefills)
    virtual int64_t max_logit_rows() const = 0;    // logit rows per step (all-logits steps: one per token)
    virtual int64_t max_model_len() const = 0;     // positions per sequence

    virtual int32_t open() = 0;                    // a free slot, or -1
    virtual void    close(int32_t slot) = 0;       // frees its state; unknown slots: no-op
    // Room for positions [0, n_tokens) of the sequence; false (nothing changed) when there is none.
    virtual bool    reserve(int32_t slot, int64_t n_tokens) = 0;
    virtual int64_t n_past(int32_t slot) const = 0;
    // Runs the chunks (distinct open slots, within their reservations). logits: [rows, V] f32,
    // every token of every chunk (all_logits) or each chunk's last. Throws Error on bad input
    // (an id outside the vocabulary, an unreserved position), changing nothing.
    virtual void    step(const std::vector<BackendChunk>& chunks, bool all_logits, std::vector<float>& logits,
                         const Probe& probe = nullptr) = 0;
    virtual double  cache_usage() const = 0;       // fraction of the sequence state in use
    // The state of a slot in the reference's form (tests).
    virtual SequenceState state(int32_t slot) const = 0;
};

// The CPU reference behind the interface: forward() over SequenceStates kept per slot.
// max_model_len 0: the model's max_position_embeddings.
std::unique_ptr<Backend> make_cpu_backend(const Model& m, int64_t max_seqs = 64, int64_t max_batch_tokens = 4096,
                                          int64_t max_model_len = 0);

}  // namespace megamoe
