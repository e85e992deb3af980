// sampler.h — token sampling from host fp32 logits (temperature, top-k, top-p, min-p) with
// counter-based random numbers, the defaults a checkpoint's generation_config.json sets, and the
// log-probabilities the OpenAI API reports.
//
// The sampling definition. The CPU Sampler below implements it, and it is the twin of the GPU
// kernel cuda::sample_rows (src/cuda/sampler.h), which implements the same definition without
// sorting the vocabulary. Input: a logits row l[0, V) (f32), the request's parameters (temperature
// T, top_k, top_p, min_p) and the key (seed, index): the request's 64-bit seed and the index of
// the token being sampled in the request's output (0 for the first generated token, 1 for the
// next, ...).
//   1. NaN counts as -inf; id i is valid when l_i > -inf. A row without a valid id is an upstream
//      bug: megamoe::Error.
//   2. Greedy (T == 0 or top_k == 1): the largest logit, ties to the lowest id. No randomness.
//   3. Rank order: i before j when l_i > l_j, or l_i == l_j and i < j (-0 == +0). Larger logit
//      means larger probability, so this is "largest p first, ties to the lower id".
//   4. Temperature. m = the largest valid logit. If m is +inf, the candidates C are the ids with
//      l_i = +inf, each with w_i = 1 (the limit of softmax). Else C = the valid ids and
//      w_i = sampling_exp((l_i - m) * r) with d = l_i - m and r = 1 / T both rounded to f32, and
//      w_i = 1 exactly when d == 0; so p_i ∝ w_i = exp((l_i - max) / T) and the top token weighs 1.
//      Fixed point: W_i = floor(w_i * 2^S), S = 63 - bit_width(|C|), so Σ W < 2^63 and every sum
//      below is exact. (A token lighter than 2^-S of the top token is never drawn; all such tokens
//      together weigh < |C| * 2^-S of the top one, below 2e-9 at V = 129280.)
//   5. top-k (0 < top_k < |C|): keep the first top_k candidates in rank order.
//   6. top-p (top_p < 1): K = Σ W over the kept ids, thr = ceil(top_p * K) (the exact product of
//      the f32 top_p and K); keep the shortest rank-order prefix of the kept ids whose Σ W >= thr.
//      The token that reaches the threshold is kept, ties at the boundary keep the lower ids, and
//      the top token always stays.
//   7. min-p (min_p > 0): drop kept ids with w_i < min_p (f32 comparison). This is
//      p_i < min_p * p_max over the kept ids: the top token survived 5 and 6 and weighs 1, and
//      renormalization does not change ratios.
//   8. Draw: M = Σ W over the kept ids, x = sampling_bits(seed, index) (53 random bits) and
//      t = floor(x * M / 2^53) (exact 128-bit product). Walk the kept ids in ascending id order
//      accumulating W; the token is the first whose running sum exceeds t, i.e. the first whose
//      running sum exceeds u * M for the uniform u = x * 2^-53 in [0, 1).
// The order of application is vLLM's (temperature, top-k, top-p, min-p). Every sum is an exact
// integer and every other step is a correctly rounded f32 operation, so the result does not depend
// on summation order or platform: the GPU draws the same token from the same logits and key.
//
// Logprobs are the log-softmax of the raw logits (temperature 1), over the valid ids.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace megamoe {

struct SamplingParams {
    float temperature = 1.0f;  // 0 -> greedy
    float top_p = 1.0f;        // (0, 1]; 1 -> disabled
    int32_t top_k = 0;         // 0 or -1 -> disabled
    float min_p = 0.0f;        // [0, 1]; 0 -> disabled
    std::optional<uint64_t> seed;

    // Throws Error naming the field for out-of-range values.
    void validate() const;
    // Greedy decoding: argmax, ties to the lowest id, no randomness consumed.
    bool greedy() const { return temperature == 0.0f || top_k == 1; }
};

// Defaults from <model_dir>/generation_config.json when present: temperature, top_p, top_k and
// min_p; "do_sample": false -> temperature 0. A missing file gives SamplingParams{}; a malformed
// one throws Error naming the file and the field.
SamplingParams load_generation_defaults(const std::string& model_dir);

// ---------------------------------------------------------------------------------------------
// The definition's building blocks (public so that tests and the GPU twin can check them).

// Philox-4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3",
// SC'11): a counter-based generator, bijective in the counter for each key. Matches Random123's
// known-answer vectors.
std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key);

// The 53 random bits of the draw for (seed, index): Philox-4x32-10 with key {seed low 32 bits,
// seed high 32 bits} and counter {index low, index high, stream, 0}; with o the output,
// ((o[0] << 32) | o[1]) >> 11. The uniform is sampling_bits * 2^-53. Stream 0 is the draw of
// step 8; speculative decoding keys its other random numbers on streams 1-3 (ref/speculative.h
// SpecStream), so they are independent of it and of each other.
uint64_t sampling_bits(uint64_t seed, int64_t index, uint32_t stream = 0);

// exp(x) for x <= 0, from correctly rounded f32 + - * only (so the GPU computes the same bits):
// Cody-Waite reduction x = n ln2 + r and Cephes' degree-7 polynomial for exp(r), scaled by 2^n.
// 0 for x < -80 (and -inf); exactly 1 at 0; within 1 ulp of exp elsewhere; monotone; never > 1.
float sampling_exp(float x);

// w of step 4 for a valid logit x below a finite max m, r = 1 / T rounded to f32.
float sampling_weight(float x, float m, float r);

// ceil(p * K) for p in (0, 1] (f32, taken exactly) and K < 2^63.
uint64_t ceil_mul(float p, uint64_t K);

// floor(x * M / 2^53) for x < 2^53: the draw's target in the kept mass M.
uint64_t draw_target(uint64_t x, uint64_t M);

// The definition's distribution written out: W [V] with W_i = the fixed-point weight of step 4 for
// the ids steps 5-7 keep, 0 for the others (greedy: 1 at the argmax, 0 elsewhere); step 8 draws id i
// with probability W_i / Σ W (Σ W < 2^63). Sorts the candidates: the plain statement of the
// definition, for speculative decoding's acceptance rule (ref/speculative.h) and tests; Sampler::
// sample draws from the same W without sorting the vocabulary. Throws Error for a row without a
// valid id, or invalid params.
std::vector<uint64_t> sampling_weights(const SamplingParams& params, const float* logits, int64_t vocab);

// One per request: holds the request's parameters and seed; each token's randomness comes from
// (seed, index) alone, so a request's tokens depend only on its seed and its logits, not on what
// else shares the batch, nor on how often or in which order sample() is called.
class Sampler {
public:
    // Validates params. The seed is params.seed when set, else fallback_seed.
    Sampler(const SamplingParams& params, uint64_t fallback_seed);

    // The token drawn from logits [vocab] (f32) for the request's token number `index` (0 for the
    // first generated token), by the definition at the top of this file. Greedy params return the
    // argmax and ignore the index.
    int32_t sample(const float* logits, int64_t vocab, int64_t index);

    const SamplingParams& params() const { return params_; }
    uint64_t seed() const { return seed_; }
    // The rank and id comparisons the last sample() made: the measure of its work that can grow
    // faster than the vocabulary (every other step is one or two passes over it). Without top-k
    // and top-p none; with a small top-k about one per candidate plus O(k log k log V); with top-p
    // alone, the ranking of what its pruning keeps; a sort of all candidates would be about
    // V log2 V. Tests bound it instead of timing calls.
    int64_t comparisons() const { return comparisons_; }

private:
    struct Cand {
        float logit;
        int32_t id;
        float w;     // weight after temperature (the top token weighs 1)
        uint64_t W;  // fixed point floor(w * 2^S)
    };

    SamplingParams params_;
    uint64_t seed_;
    // Scratch reused across calls so a step allocates nothing once warm.
    std::vector<uint64_t> weights_;
    std::vector<Cand> cands_;
    int64_t comparisons_ = 0;
};

// Log-softmax of the raw logits (temperature 1, as OpenAI logprobs report), over the valid ids;
// -inf for an invalid id.
float token_logprob(const float* logits, int64_t vocab, int32_t id);
// The min(k, number of valid ids) most likely (id, logprob) pairs, by logprob descending (rank
// order: larger logit first, ties by lower id). Ids with a -inf or NaN logit are never listed.
std::vector<std::pair<int32_t, float>> top_logprobs(const float* logits, int64_t vocab, int k);

}  // namespace megamoe
