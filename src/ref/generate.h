// generate.h — single-sequence drivers over the batch API: logits of a token sequence under a
// chosen processing schedule, and greedy generation.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "ref/backend.h"
#include "ref/model.h"

namespace megamoe {

struct Schedule {
    int64_t decode_from = -1;   // prefill tokens [0, decode_from), then one token at a time; -1: no decode
    int64_t chunk = 0;          // prefill in chunks of this many tokens; 0: one chunk
};

// Logits [T, V] f32 of every position of `tokens` (one fresh sequence) under `s`. The backend
// version opens a slot for the sequence and closes it after; its steps hold at most
// max_batch_tokens (and max_logit_rows) tokens, so a long prefill chunk runs in several steps.
// The Model version runs the CPU reference with no step limit.
std::vector<float> sequence_logits(Backend& b, const std::vector<int32_t>& tokens, const Schedule& s);
std::vector<float> sequence_logits(const Model& m, const std::vector<int32_t>& tokens, const Schedule& s);

// The main model's logits [T, V] and the MTP block's mtp_logits [T-1, V] f32 of one fresh sequence
// under `s`, on the CPU reference (row t of mtp_logits: the MTP block at position t with token
// t+1, predicting token t+2, the layout of ../shared/golden/*/mtp.safetensors). The MTP block
// runs over each chunk right after the main model, on the chunk's positions whose next token is known.
struct MtpLogits {
    std::vector<float> logits;       // [T, V]
    std::vector<float> mtp_logits;   // [T-1, V]
};
MtpLogits sequence_logits_mtp(const Model& m, const std::vector<int32_t>& tokens, const Schedule& s);

// Index of the largest logit; ties go to the lower id.
int32_t argmax(const float* logits, int64_t n);

// Greedy continuation: prefill `prompt` (in chunks of `chunk`, 0 = one), then up to `max_new`
// tokens, stopping after EOS unless ignore_eos, or when the sequence reaches the backend's context
// limit (fewer than max_new ids come back then). Returns the new ids.
std::vector<int32_t> generate_greedy(Backend& b, const std::vector<int32_t>& prompt, int64_t max_new,
                                     int64_t chunk = 0, bool ignore_eos = false);
std::vector<int32_t> generate_greedy(const Model& m, const std::vector<int32_t>& prompt, int64_t max_new,
                                     int64_t chunk = 0, bool ignore_eos = false);

// The same continuation with each token chosen by `choose` from the logits [V] of the last
// position and the token's index in the output (0 for the first new token): generate_greedy is
// this with argmax; a sampler (serve/sampler.h) gives sampled generation.
using TokenChoice = std::function<int32_t(const float* logits, int64_t vocab, int64_t index)>;
std::vector<int32_t> generate_with(Backend& b, const std::vector<int32_t>& prompt, int64_t max_new, int64_t chunk,
                                   bool ignore_eos, const TokenChoice& choose);

}  // namespace megamoe
