// sampler.cpp — token sampling, generation_config.json defaults and logprobs.
//
// Determinism: the RNG is explicit (xoshiro256**), every sum that feeds a decision is taken in an
// order fixed by the logits alone (token id order, or rank order with ties broken by id), and the
// draw walks the cumulative sum in id order. So nothing depends on how std::nth_element or
// std::sort happen to permute equal-ranked elements; the only platform dependence left is the
// last bit of libm's exp().
#include "serve/sampler.h"

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/common.h"

namespace megamoe {

using json = nlohmann::json;

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// False for -inf and NaN: such tokens are never sampled.
bool valid(float x) { return x > kNegInf; }

void check_vocab(int64_t vocab, const char* what) {
    if (vocab <= 0 || vocab > INT32_MAX) fail(what, ": vocab size must be in [1, 2^31), got ", vocab);
}

[[noreturn]] void fail_no_token(const char* what, int64_t vocab) {
    fail(what, ": every one of the ", vocab, " logits is -inf or NaN");
}

// Largest logit, NaN skipped; -inf when no token is valid.
float max_logit(const float* logits, int64_t vocab) {
    float m = kNegInf;
    for (int64_t i = 0; i < vocab; ++i)
        if (logits[i] > m) m = logits[i];
    return m;
}

// Argmax with ties to the lowest id (strict > keeps the first), NaN skipped.
int32_t argmax(const float* logits, int64_t vocab) {
    int64_t best = -1;
    float best_x = kNegInf;
    for (int64_t i = 0; i < vocab; ++i) {
        if (logits[i] > best_x) {
            best_x = logits[i];
            best = i;
        }
    }
    if (best < 0) fail_no_token("Sampler::sample", vocab);
    return static_cast<int32_t>(best);
}

// Strict total order for ranking: higher logit first, ties by lower id. Being total (no NaN can
// reach it), it makes every partial sort's selected prefix unique.
template <typename T>
bool better(const T& a, const T& b) {
    return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
}

// Keeps the n best elements of a stream in `heap`, a heap whose front is the worst kept: most
// elements cost one comparison, so picking a small k from a large vocabulary is one cheap pass.
template <typename T>
void keep_best(std::vector<T>& heap, size_t n, const T& item) {
    auto by_rank = [](const T& a, const T& b) { return better(a, b); };
    if (heap.size() < n) {
        heap.push_back(item);
        std::push_heap(heap.begin(), heap.end(), by_rank);
    } else if (better(item, heap.front())) {
        std::pop_heap(heap.begin(), heap.end(), by_rank);
        heap.back() = item;
        std::push_heap(heap.begin(), heap.end(), by_rank);
    }
}

// Above this top_k, nth_element over a copy beats the O(V log k) worst case of the heap.
constexpr size_t kHeapTopK = 1024;

uint64_t splitmix64(uint64_t& x) {
    uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

// log-softmax normalizer over the valid logits, in double. When some logits are +inf, the
// distribution is uniform over them (the limit of softmax), so only their count matters.
struct LogNorm {
    float max;
    double lse;     // log-sum-exp when max is finite
    int64_t n_inf;  // number of +inf logits when max is +inf

    double logprob(float x) const {
        if (!valid(x)) return -std::numeric_limits<double>::infinity();
        if (std::isinf(max))
            return x == max ? -std::log(static_cast<double>(n_inf)) : -std::numeric_limits<double>::infinity();
        return static_cast<double>(x) - lse;
    }
};

LogNorm log_norm(const float* logits, int64_t vocab, const char* what) {
    LogNorm n{max_logit(logits, vocab), 0.0, 0};
    if (!valid(n.max)) fail_no_token(what, vocab);
    if (std::isinf(n.max)) {
        for (int64_t i = 0; i < vocab; ++i) n.n_inf += logits[i] == n.max;
        return n;
    }
    const double m = n.max;
    double sum = 0.0;
    for (int64_t i = 0; i < vocab; ++i)
        if (valid(logits[i])) sum += std::exp(static_cast<double>(logits[i]) - m);
    n.lse = m + std::log(sum);
    return n;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Parameters

void SamplingParams::validate() const {
    if (!(temperature >= 0.0f && std::isfinite(temperature)))
        fail("sampling parameter 'temperature' must be finite and >= 0 (0 means greedy), got ", temperature);
    if (!(top_p > 0.0f && top_p <= 1.0f)) fail("sampling parameter 'top_p' must be in (0, 1], got ", top_p);
    if (top_k < -1) fail("sampling parameter 'top_k' must be >= -1 (0 or -1 disable it), got ", top_k);
    if (!(min_p >= 0.0f && min_p <= 1.0f)) fail("sampling parameter 'min_p' must be in [0, 1], got ", min_p);
}

SamplingParams load_generation_defaults(const std::string& model_dir) {
    SamplingParams p;
    const std::string path = model_dir + "/generation_config.json";
    std::error_code ec;
    if (!std::filesystem::exists(path, ec)) return p;  // optional file: most checkpoints ship one, some do not
    std::ifstream f(path, std::ios::binary);
    if (!f) fail(path, ": cannot open");
    std::stringstream text;
    text << f.rdbuf();
    json root;
    try {
        root = json::parse(text.str());
    } catch (const json::exception& e) {
        fail(path, ": not valid JSON: ", e.what());
    }
    if (!root.is_object()) fail(path, ": top level must be a JSON object");

    // HF writes null for unset fields; treat it like absence.
    auto field = [&](const char* name) -> const json* {
        auto it = root.find(name);
        return it == root.end() || it->is_null() ? nullptr : &*it;
    };
    auto read_float = [&](const char* name, float& out) {
        const json* v = field(name);
        if (!v) return;
        if (!v->is_number()) fail(path, ": field '", name, "' must be a number, got ", v->dump());
        const double d = v->get<double>();
        // Range-check before the narrowing cast, which is undefined for out-of-range values.
        if (!(std::fabs(d) <= FLT_MAX)) fail(path, ": field '", name, "' is out of range: ", v->dump());
        out = static_cast<float>(d);
    };
    read_float("temperature", p.temperature);
    read_float("top_p", p.top_p);
    read_float("min_p", p.min_p);
    if (const json* v = field("top_k")) {
        if (!v->is_number_integer()) fail(path, ": field 'top_k' must be an integer, got ", v->dump());
        if (v->is_number_unsigned() ? v->get<uint64_t>() > INT32_MAX
                                    : (v->get<int64_t>() < INT32_MIN || v->get<int64_t>() > INT32_MAX))
            fail(path, ": field 'top_k' is out of range: ", v->dump());
        p.top_k = static_cast<int32_t>(v->get<int64_t>());
    }
    if (const json* v = field("do_sample")) {
        if (!v->is_boolean()) fail(path, ": field 'do_sample' must be a boolean, got ", v->dump());
        if (!v->get<bool>()) p.temperature = 0.0f;
    }
    try {
        p.validate();
    } catch (const Error& e) {
        fail(path, ": ", e.what());
    }
    return p;
}

// ---------------------------------------------------------------------------------------------
// RNG

Rng::Rng(uint64_t seed) {
    // splitmix64 spreads any seed (0 included) over the state; it never yields four zero words.
    uint64_t x = seed;
    for (uint64_t& w : s_) w = splitmix64(x);
}

uint64_t Rng::next() {
    const uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
}

// ---------------------------------------------------------------------------------------------
// Sampler

Sampler::Sampler(const SamplingParams& params, uint64_t fallback_seed)
    : params_(params), seed_(params.seed.value_or(fallback_seed)), rng_(seed_) {
    params_.validate();
}

int32_t Sampler::sample(const float* logits, int64_t vocab) {
    check_vocab(vocab, "Sampler::sample");
    if (params_.greedy()) return argmax(logits, vocab);

    const float m = max_logit(logits, vocab);
    if (!valid(m)) fail_no_token("Sampler::sample", vocab);
    const bool inf_max = std::isinf(m);
    const double dm = m;
    const double inv_t = 1.0 / static_cast<double>(params_.temperature);
    // Probability relative to the best token (which weighs exactly 1), after temperature.
    // Double keeps the sums exact enough that the top-p boundary is not decided by rounding.
    auto weight = [&](float x) -> double {
        if (!valid(x)) return 0.0;
        if (inf_max) return x == m ? 1.0 : 0.0;
        return std::exp((static_cast<double>(x) - dm) * inv_t);
    };
    // min-p compares with p_max; as ratios of weights this is w < min_p * 1, and renormalizing
    // after top-k / top-p does not change it because both always keep the best token.
    const double min_w = params_.min_p;
    const bool use_top_k = params_.top_k > 1 && params_.top_k < vocab;
    const bool use_top_p = params_.top_p < 1.0f;

    if (!use_top_k && !use_top_p) {
        // No ranking needed: one pass computes the weights, a second walks the cumulative sum.
        weights_.resize(static_cast<size_t>(vocab));
        double total = 0.0;
        for (int64_t i = 0; i < vocab; ++i) {
            double w = weight(logits[i]);
            if (w < min_w) w = 0.0;
            weights_[static_cast<size_t>(i)] = w;
            total += w;
        }
        const double target = rng_.uniform() * total;
        double acc = 0.0;
        int64_t last = 0;
        for (int64_t i = 0; i < vocab; ++i) {
            const double w = weights_[static_cast<size_t>(i)];
            if (w <= 0.0) continue;
            acc += w;
            last = i;
            if (target < acc) return static_cast<int32_t>(i);
        }
        return static_cast<int32_t>(last);  // u * total rounded up to total
    }

    // Ranked path: the candidates (valid tokens; only the +inf ones when there are any).
    auto is_cand = [&](float x) { return valid(x) && (!inf_max || x == m); };
    auto by_rank = [](const Cand& a, const Cand& b) { return better(a, b); };
    auto by_id = [](const Cand& a, const Cand& b) { return a.id < b.id; };
    cands_.clear();
    const size_t k = use_top_k ? static_cast<size_t>(params_.top_k) : 0;
    if (use_top_k && k <= kHeapTopK) {
        // Small k (the usual case): one streaming pass, no vocabulary-sized copy.
        for (int64_t i = 0; i < vocab; ++i)
            if (is_cand(logits[i])) keep_best(cands_, k, Cand{logits[i], static_cast<int32_t>(i), 0.0});
    } else {
        for (int64_t i = 0; i < vocab; ++i)
            if (is_cand(logits[i])) cands_.push_back({logits[i], static_cast<int32_t>(i), 0.0});
        // Large k: selection, not a sort.
        if (use_top_k && k < cands_.size()) {
            std::nth_element(cands_.begin(), cands_.begin() + static_cast<std::ptrdiff_t>(k), cands_.end(), by_rank);
            cands_.resize(k);
        }
    }
    // Back to id order, so the total below is summed in an order that does not depend on how
    // the selection permuted the candidates.
    if (use_top_k) std::sort(cands_.begin(), cands_.end(), by_id);
    double total = 0.0;
    for (Cand& c : cands_) total += (c.w = weight(c.logit));

    // top-p: the smallest set, in rank order, whose probability reaches top_p (the token that
    // crosses the threshold is kept; so is the best token).
    if (use_top_p && cands_.size() > 1) {
        const double threshold = static_cast<double>(params_.top_p) * total;
        // Exact pruning first: the tokens lighter than floor_w are a suffix of the ranking whose
        // total is at most half of the (1 - top_p) tail, so the tokens above them already reach
        // the threshold (with a margin far beyond rounding) and the nucleus cannot include them.
        // With real logits this drops nearly the whole vocabulary before any ranking.
        const double floor_w =
            0.5 * (1.0 - static_cast<double>(params_.top_p)) * total / static_cast<double>(cands_.size());
        cands_.erase(std::remove_if(cands_.begin(), cands_.end(), [&](const Cand& c) { return c.w < floor_w; }),
                     cands_.end());
        // The nucleus is usually small, so rank in growing chunks (select with nth_element, then
        // sort the chunk) instead of sorting every candidate.
        const size_t n = cands_.size();
        size_t done = 0, keep = n, chunk = 64;
        double cum = 0.0;
        while (done < n && keep == n) {
            const size_t hi = std::min(n, done + chunk);
            const auto lo_it = cands_.begin() + static_cast<std::ptrdiff_t>(done);
            const auto hi_it = cands_.begin() + static_cast<std::ptrdiff_t>(hi);
            if (hi < n) std::nth_element(lo_it, hi_it, cands_.end(), by_rank);
            std::sort(lo_it, hi_it, by_rank);
            for (size_t j = done; j < hi; ++j) {
                cum += cands_[j].w;
                if (cum >= threshold) {
                    keep = j + 1;
                    break;
                }
            }
            done = hi;
            chunk *= 4;
        }
        cands_.resize(keep);  // keep == n only if rounding kept cum below threshold: keep all
        std::sort(cands_.begin(), cands_.end(), by_id);
    }

    if (min_w > 0.0)
        cands_.erase(std::remove_if(cands_.begin(), cands_.end(), [&](const Cand& c) { return c.w < min_w; }),
                     cands_.end());

    // Renormalize implicitly (draw against the surviving total), walking in id order.
    double kept = 0.0;
    for (const Cand& c : cands_) kept += c.w;
    const double target = rng_.uniform() * kept;
    double acc = 0.0;
    int32_t last = cands_.front().id;  // non-empty: the best token survives every filter
    for (const Cand& c : cands_) {
        if (c.w <= 0.0) continue;
        acc += c.w;
        last = c.id;
        if (target < acc) return c.id;
    }
    return last;
}

// ---------------------------------------------------------------------------------------------
// Logprobs

float token_logprob(const float* logits, int64_t vocab, int32_t id) {
    check_vocab(vocab, "token_logprob");
    if (id < 0 || id >= vocab) fail("token_logprob: token id ", id, " out of range [0, ", vocab, ")");
    return static_cast<float>(log_norm(logits, vocab, "token_logprob").logprob(logits[id]));
}

std::vector<std::pair<int32_t, float>> top_logprobs(const float* logits, int64_t vocab, int k) {
    check_vocab(vocab, "top_logprobs");
    if (k < 0) fail("top_logprobs: k must be >= 0, got ", k);
    const LogNorm norm = log_norm(logits, vocab, "top_logprobs");
    const size_t n = static_cast<size_t>(std::min<int64_t>(k, vocab));
    if (n == 0) return {};

    // NaN ranks as -inf so the order stays total.
    struct Item {
        float logit;
        int32_t id;
    };
    std::vector<Item> heap;
    heap.reserve(n);
    for (int64_t i = 0; i < vocab; ++i)
        keep_best(heap, n, Item{valid(logits[i]) ? logits[i] : kNegInf, static_cast<int32_t>(i)});
    auto by_rank = [](const Item& a, const Item& b) { return better(a, b); };
    std::sort(heap.begin(), heap.end(), by_rank);
    std::vector<std::pair<int32_t, float>> out;
    out.reserve(n);
    for (const Item& it : heap) out.emplace_back(it.id, static_cast<float>(norm.logprob(it.logit)));
    return out;
}

}  // namespace megamoe
