// sampler.h — token sampling from host fp32 logits (temperature, top-k, top-p, min-p) with a
// seeded, portable RNG, the defaults a checkpoint's generation_config.json sets, and the
// log-probabilities the OpenAI API reports.
//
// NaN logits are treated as -inf everywhere: never sampled, logprob -inf. A row in which every
// logit is -inf or NaN is an upstream bug and throws megamoe::Error.
#pragma once

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

// xoshiro256** seeded through splitmix64: small, fast, and bit-identical on every platform and
// compiler, unlike the standard distributions whose outputs are implementation-defined.
class Rng {
public:
    explicit Rng(uint64_t seed);
    uint64_t next();
    // Uniform in [0, 1) from the top 53 bits.
    double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

private:
    uint64_t s_[4];
};

// One per request: holds the request's RNG, so a request's tokens depend only on its seed and
// its logits, not on what else shares the batch.
class Sampler {
public:
    // Validates params. The seed is params.seed when set, else fallback_seed.
    Sampler(const SamplingParams& params, uint64_t fallback_seed);

    // Applies, in vLLM's order: temperature, top-k, top-p, min-p; renormalizes and draws one
    // token with the request's RNG. Greedy params return the argmax without drawing.
    int32_t sample(const float* logits, int64_t vocab);

    const SamplingParams& params() const { return params_; }
    uint64_t seed() const { return seed_; }

private:
    struct Cand {
        float logit;
        int32_t id;
        double w;  // unnormalized probability after temperature; the best token weighs 1
    };

    SamplingParams params_;
    uint64_t seed_;
    Rng rng_;
    // Scratch reused across calls so a step allocates nothing once warm.
    std::vector<double> weights_;
    std::vector<Cand> cands_;
};

// Log-softmax of the raw logits (temperature 1, as OpenAI logprobs report).
float token_logprob(const float* logits, int64_t vocab, int32_t id);
// The min(k, vocab) most likely (id, logprob) pairs, by logprob descending, ties by lower id.
std::vector<std::pair<int32_t, float>> top_logprobs(const float* logits, int64_t vocab, int k);

}  // namespace megamoe
