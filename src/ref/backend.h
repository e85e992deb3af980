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

// How to draw the next token of one chunk (from its last token's logits): the parameters of
// serve/sampler.h's definition and its counter-based key (the request's seed, the index of the
// token in the request's output).
struct SampleSpec {
    float    temperature = 1.0f;       // 0: greedy
    int32_t  top_k = 0;                // 0: off
    float    top_p = 1.0f;             // 1: off
    float    min_p = 0.0f;             // 0: off
    uint64_t seed = 0;
    int64_t  index = 0;
    int      n_top = -1;               // -1: no logprobs; k in 0..20: the token's logprob and k alternatives
};
struct SampledToken {
    int32_t id = -1;                   // -1: the row had no valid logit (an upstream error)
    float   logprob = 0;               // when n_top >= 0
    std::vector<std::pair<int32_t, float>> top;   // [≤ n_top] (id, logprob), most likely first
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
    // Sampling where the logits are (the GPU backend: they never leave the device). A backend
    // without it (the CPU reference) returns false and its caller samples step()'s logits with the
    // CPU sampler (serve/sampler.h), the twin of the device one.
    virtual bool    has_sampler() const { return false; }
    // Ids that name no token: their logits are -inf before sampling and logprobs, so they are
    // never drawn nor listed (set once, before the first step_sample).
    virtual void    set_masked_ids(const std::vector<int32_t>& /*ids*/) { fail(name(), " backend: no sampler"); }
    // Runs the chunks like step() and draws one token per chunk from its last logits, as spec[i] says.
    virtual void    step_sample(const std::vector<BackendChunk>& /*chunks*/, const std::vector<SampleSpec>& /*spec*/,
                                std::vector<SampledToken>& /*out*/) {
        fail(name(), " backend: no sampler");
    }
    // Speculative decoding (ref/speculative.h, "the serving engine"): a backend with the MTP block
    // that can drop rejected positions (the GPU runner). A chunk with drafts is a generating
    // sequence's last accepted token (tokens, one) and its drafts d_1 .. d_k: the backend verifies
    // them in one step by the standard rule (spec[i], key index spec[i].index + j for the token
    // after j kept ones: greedy requests keep the drafts equal to the argmaxes, sampled ones
    // rejection-sample against the draft distributions the backend kept), drops the rest, and
    // returns the tokens (the kept drafts and the one after them: 1 .. k + 1). A chunk without
    // drafts (a prompt chunk, or a decode) returns the draw after its last token; `next` is the
    // token after its last when the sequence continues with known tokens (a prompt chunk followed
    // by more prompt), else -1. Every chunk returns up to n_drafts drafts for the positions after
    // its last returned token, from the MTP block (drawn with spec[i]'s parameters: greedy
    // requests get the argmax), chained past the first (ref/speculative.h step 1). All the slot's
    // steps must go through this call (the MTP block follows every position). Throws Error on bad
    // input, changing nothing.
    struct SpecChunk {
        int32_t slot = -1;
        std::vector<int32_t> tokens;   // new tokens (with drafts: exactly one, the last accepted)
        std::vector<int32_t> drafts;   // empty: none
        int32_t next = -1;
        int32_t n_drafts = 1;          // drafts wanted for the next round (the engine's K)
    };
    struct SpecOut {
        std::vector<SampledToken> tokens;   // 1 .. k + 1 draws, in output order
        std::vector<int32_t> drafts;        // the next drafts (1 .. n_drafts)
    };
    virtual bool    has_speculative() const { return false; }
    virtual void    step_speculative(const std::vector<SpecChunk>& /*chunks*/, const std::vector<SampleSpec>& /*spec*/,
                                     std::vector<SpecOut>& /*out*/) {
        fail(name(), " backend: no speculative decoding");
    }
    virtual double  cache_usage() const = 0;       // fraction of the sequence state in use
    // Positions of state the backend holds for all sequences together (its pool), and how many of
    // them are free now (prefix-cache snapshots hold some). A request longer than the capacity can
    // never run; the engine refuses it at submission.
    virtual int64_t capacity_tokens() const = 0;

    // Prefix caching (vLLM's and SGLang's automatic prefix caching, for DeepSeek-V4's state).
    // At a position that is a multiple of prefix_block() every layer's state is closed: the
    // compressors' windows (ratio 4, 128 or the tiny configs' 16) all end there, so the compressed
    // rows before it are final. A snapshot taken there keeps the compressed rows and indexer keys
    // by sharing the sequence's blocks (no copy; blocks are freed when nothing holds them), and
    // copies what is per sequence and not paged (the sliding-window ring and the compressors'
    // overlap state). A later sequence opened from it continues from that position, and its own
    // writes land only in blocks after it. 0: the backend has no prefix caching.
    virtual int64_t prefix_block() const { return 0; }
    // Snapshot of `slot` at its n_past (a positive multiple of prefix_block()); a handle >= 0, or
    // -1 when there is no room for another (the caller drops one and retries).
    virtual int32_t snapshot(int32_t /*slot*/) { return -1; }
    virtual void    drop_snapshot(int32_t /*handle*/) {}
    // A new slot whose state equals the snapshot's (n_past = its position, reserved up to it), or
    // -1 when no slot is free.
    virtual int32_t open_from(int32_t /*handle*/) { return -1; }
    // The state of a slot in the reference's form (tests).
    virtual SequenceState state(int32_t slot) const = 0;
};

// The CPU reference behind the interface: forward() over SequenceStates kept per slot.
// max_model_len 0: the model's max_position_embeddings.
// state_tokens > 0: the pool holds that many positions, in blocks of block_tokens, shared and
// freed as the GPU pool's are (gpu/state_pool.h), so admission, preemption and prefix caching run
// under the same limits as on the GPU; 0: no limit but max_seqs x max_model_len.
// block_tokens: the prefix-cache granularity (a multiple of every compress ratio; 0: the GPU's, 256).
std::unique_ptr<Backend> make_cpu_backend(const Model& m, int64_t max_seqs = 64, int64_t max_batch_tokens = 4096,
                                          int64_t max_model_len = 0, int64_t state_tokens = 0,
                                          int64_t block_tokens = 0);

}  // namespace megamoe
