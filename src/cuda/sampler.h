// sampler.h — token sampling on the GPU, the twin of the CPU Sampler: the sampling definition
// written out in serve/sampler.h (greedy, temperature, top-k, top-p, min-p with per-row
// parameters; Philox-4x32-10 random bits keyed on (request seed, token index)), plus the
// logprobs the OpenAI API reports. Host API; plain C++, compiles without the CUDA toolkit.
//
// Given the same logits row, parameters and key, sample_rows draws the same token as
// megamoe::Sampler::sample (every weight is the same correctly rounded f32 computation and every
// sum an exact integer; tests/cuda/sampler_test.cpp checks it), and its logprobs agree with
// token_logprob / top_logprobs to a few f32 ulps (see sampler.cu).
#pragma once

#include <cstdint>

struct CUstream_st;

namespace megamoe::cuda {

constexpr int     kMaxTopLogprobs = 20;       // the OpenAI API's limit
constexpr int64_t kMaxSampleVocab = 262144;   // V limit of sample_rows (DeepSeek-V4: 129280)

// Per-row sampling parameters: device arrays of R entries each, all required. Values are those
// SamplingParams::validate accepts; others are read so that the kernel stays defined:
// temperature <= 0 or NaN is greedy, top_k <= 0 is off (1 is greedy), top_p >= 1 or NaN is off
// (top_p <= 0 keeps the top token), min_p <= 0 or NaN is off (> 1 acts as 1).
struct SampleParams {
    const float*    temperature = nullptr;   // f32 [R]
    const int32_t*  top_k = nullptr;         // i32 [R]
    const float*    top_p = nullptr;         // f32 [R]
    const float*    min_p = nullptr;         // f32 [R]
    const uint64_t* seed = nullptr;          // u64 [R]  the request's seed (Philox key)
    const int64_t*  index = nullptr;         // i64 [R]  the sampled token's index in its request's output
                                             //          (0 for the first generated token; Philox counter)
    uint32_t        stream = 0;              // Philox counter word 2 (serve/sampler.h sampling_bits): 0 for
                                             //   the plain draw; speculative drafts use kStreamDraft
    int64_t         index_offset = 0;        // added to index[r] (drafts guess the token after the row's)
    const int32_t*  given = nullptr;         // i32 [R] or null: where given[r] >= 0 the row's token is
                                             //   given[r], not drawn (its logprob and top-n are reported)
};

// Speculative decoding's random-number streams (ref/speculative.h SpecStream).
constexpr uint32_t kStreamDraft = 1, kStreamAccept = 2, kStreamResidual = 3;

// Outputs (device). A row without a valid logit (every one -inf or NaN; the CPU Sampler throws)
// gets id -1, logprob -inf and no top entries: the caller reports it as an error.
struct SampleOutputs {
    int32_t* ids = nullptr;            // i32 [R], required: the sampled token
    float*   logprob = nullptr;        // f32 [R] or null: log-softmax at temperature 1 of ids[r] over the
                                       //   valid ids (-inf and NaN logits excluded), as token_logprob
    int      n_top = 0;                // 0..kMaxTopLogprobs alternatives per row
    int32_t* top_ids = nullptr;        // i32 [R, n_top] (null when n_top == 0): the n_top most likely ids,
                                       //   by logprob descending, ties to the lower id (top_logprobs);
                                       //   -1 past the row's valid ids (invalid ids are never listed)
    float*   top_logprobs = nullptr;   // f32 [R, n_top]: their logprobs; -inf past the valid ids
};

// Speculative decoding's draft checks (spec_accept_rows below): row r checks the draft draft[r]
// against q's row q_row[r] (-1: no check); accepted[r] out.
struct SpecCheck {
    const float*   q = nullptr;        // f32 [*, V] draft logits rows (masked ids at -inf)
    const int64_t* q_row = nullptr;    // i64 [R] q's row for row r; -1: row r checks no draft
    const int32_t* draft = nullptr;    // i32 [R] the draft checked at row r
    int32_t*       accepted = nullptr; // i32 [R] out: 1 accepted, 0 not (or no check)
};

// Samples one token from each row of logits [R, V] f32 (device, row-major; -inf marks masked ids,
// NaN counts as -inf) with row r's parameters and key (p.seed[r], p.index[r]), and writes the
// outputs o. 1 <= V <= kMaxSampleVocab. One CTA per row: a fixed grid for given (R, V), no
// allocation, no atomics whose order matters (integer sums only), so the results are
// deterministic; asynchronous on `stream`, may be captured into a CUDA graph. The logits are
// not modified. Launch errors and bad arguments throw megamoe::Error.
// check (optional; the runner's verify steps): the standard rule fused in, each checked row's
// token is spec_accept_rows' decision, reported as a given id would be (so the rows' checks and
// draws run side by side, one CTA each); twin: spec_accept_rows, then sample_rows with given.
// scratch (optional): where few rows would leave most SMs idle (sample_parts), pass A (the row's
// max, its id, min and counts) first runs over `parts` parts of each row in a CTA each
// (row_stats_kernel) and the row's CTA merges their results: exact integer and max/min merges, so
// the outputs are the same bits as without scratch. Without scratch every row is one CTA's.
struct SampleScratch {
    void*  p = nullptr;     // device, sample_scratch_bytes(R, parts) bytes at least
    size_t bytes = 0;
    int    parts = -1;      // -1: sample_parts' choice; 0: none; n > 0: n parts (capped; tests)
};
constexpr int kMaxSampleParts = 64;
void sample_rows(const float* logits, int64_t R, int64_t V, const SampleParams& p, const SampleOutputs& o,
                 CUstream_st* stream, const SpecCheck* check = nullptr, const SampleScratch* scratch = nullptr);
// Parts per row of pass A for R rows of V ids on a GPU of `sms` SMs: `parts` ≥ 0 as asked (at most
// kMaxSampleParts and the row's 128-id chunks); -1: 0 (no pre-pass) from sms / 2 rows on, else
// about two CTAs per SM in all, at least 8 chunks per part. Fixed for given (R, V, GPU):
// graph-capturable.
int sample_parts(int64_t R, int64_t V, int sms, int parts = -1);
// Scratch bytes for R rows of `parts` parts (sample_scratch_bytes(R, kMaxSampleParts) covers every choice).
size_t sample_scratch_bytes(int64_t R, int parts = kMaxSampleParts);

// logits[r, ids[j]] = -inf for every row r < R and j < n (device; ids i32 [n], entries outside
// [0, V) are skipped): the engine's masked_token_ids applied on the device before sample_rows.
// Asynchronous, graph-capturable, fixed grid for given (R, n).
void mask_logits(float* logits, int64_t R, int64_t V, const int32_t* ids, int64_t n, CUstream_st* stream);

// Speculative acceptance, the standard rule (ref/speculative.h; twins: spec_accepts, spec_residual
// over serve/sampler.h sampling_weights). Row r with a draft (q_row[r] >= 0) checks the draft
// d = draft[r] against the main model's logits p (row r) and the draft's logits q (row q_row[r] of
// q, the MTP block's logits d was drawn from), both turned into the sampler's integer weights with
// row r's parameters: accepted when spec_accepts with the bits (seed, index, kStreamAccept); else
// the row's token is spec_residual's draw with (seed, index, kStreamResidual). Greedy rows accept
// d when it is p's argmax, else take the argmax (q is not read). given[r] = d when accepted, else
// the residual token; -1 for rows without a draft or without a valid logit. accepted[r] = 1 or 0.
// One CTA per row, a fixed grid, integer sums only: deterministic, graph-capturable.
struct SpecAcceptArgs {
    const float*   p = nullptr;        // f32 [R, V] the main model's logits (masked ids at -inf)
    SpecCheck      check;              // the drafts, their q rows, accepted out
    SampleParams   params;             // row r's parameters and key (stream and given are not used)
    int32_t*       given = nullptr;    // i32 [R] out
};
void spec_accept_rows(const SpecAcceptArgs& a, int64_t R, int64_t V, CUstream_st* stream);

// Keeps draft logits rows for the next step's acceptance: dst[(slot[i] · per_slot + k) · V + v] =
// src[(rows ? rows[i] : i) · V + v] for i < n (rows, slot: device i32 [n]; entries with slot < 0
// are skipped). Asynchronous, graph-capturable.
void keep_draft_rows(const float* src, const int32_t* rows, const int32_t* slot, int64_t n, int64_t V, int32_t k,
                     int32_t per_slot, float* dst, CUstream_st* stream);

// Speculative steps: the token after each of T positions, given or drawn. out[t] = given[t] when
// given[t] >= 0, else drawn[-1 - given[t]] (the token sampled at logit row -1 - given[t]). given,
// drawn (i32, the rows the encoding names) and out: device. Asynchronous, graph-capturable.
// twin: megamoe::resolve_next_tokens (ref/speculative.h).
void resolve_next_tokens(const int32_t* given, const int32_t* drawn, int64_t T, int32_t* out, CUstream_st* stream);

// Chained drafting (Runner::draft_chain), step k ≥ 1 of n one-token chunks: the step inputs of
// chunk i, token i at position start_pos[i] + k of slot[i] (chunk i, first token i, length 1,
// logit row i, token id 0), and its next token prev[i] (the draft before it). Device arrays;
// tok, pos, slot_out, chunk, first, len, rows, next: [n] outputs. Asynchronous, graph-capturable.
struct ChainStepInputs {
    const int32_t* start_pos = nullptr;
    const int32_t* slot = nullptr;
    const int32_t* prev = nullptr;
    int32_t *tok = nullptr, *pos = nullptr, *slot_out = nullptr, *chunk = nullptr, *first = nullptr, *len = nullptr,
            *rows = nullptr, *next = nullptr;
};
void chain_step_inputs(const ChainStepInputs& a, int64_t n, int32_t k, CUstream_st* stream);

}  // namespace megamoe::cuda
