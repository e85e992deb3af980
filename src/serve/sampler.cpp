// sampler.cpp — token sampling, generation_config.json defaults and logprobs.
//
// The sampling definition is written out in sampler.h; this file is its CPU implementation and
// the GPU's twin. Determinism: the random bits come from (seed, index) through Philox, every
// weight is a correctly rounded f32 computation, every sum is an exact integer, and the draw
// walks the kept tokens in id order; so nothing depends on how std::nth_element or std::sort
// happen to permute equal-ranked elements, on summation order, or on the platform's libm.
#include "serve/sampler.h"

#include <algorithm>
#include <bit>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/common.h"

// sampling_exp must round every f32 operation on its own, as the GPU does (__fmul_rn, __fadd_rn):
// a compiler that fuses a * b + c into one FMA would change the last bit of some weights. GCC
// fuses by default (-ffp-contract=fast) when the target has FMA instructions (then it defines
// __FP_FAST_FMAF); the attribute turns that off for this function, at the price of a call.
#if defined(__clang__)
#define MEGAMOE_NO_CONTRACT_FN
#define MEGAMOE_NO_CONTRACT_BODY _Pragma("clang fp contract(off)")
#elif defined(__GNUC__) && defined(__FP_FAST_FMAF)
#define MEGAMOE_NO_CONTRACT_FN __attribute__((optimize("fp-contract=off"), noinline))
#define MEGAMOE_NO_CONTRACT_BODY
#else
#define MEGAMOE_NO_CONTRACT_FN
#define MEGAMOE_NO_CONTRACT_BODY
#endif

namespace megamoe {

using json = nlohmann::json;

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

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
// `compared` counts the comparisons (Sampler::comparisons()).
template <typename T>
void keep_best(std::vector<T>& heap, size_t n, const T& item, int64_t& compared) {
    auto by_rank = [&compared](const T& a, const T& b) { return ++compared, better(a, b); };
    if (heap.size() < n) {
        heap.push_back(item);
        std::push_heap(heap.begin(), heap.end(), by_rank);
    } else if (by_rank(item, heap.front())) {
        std::pop_heap(heap.begin(), heap.end(), by_rank);
        heap.back() = item;
        std::push_heap(heap.begin(), heap.end(), by_rank);
    }
}

// Above this top_k, nth_element over a copy beats the O(V log k) worst case of the heap.
constexpr size_t kHeapTopK = 1024;

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
// Definition building blocks

std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> c, std::array<uint32_t, 2> k) {
    constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;   // round multipliers
    constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;   // key schedule (Weyl) increments
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k[0] += kW0;
            k[1] += kW1;
        }
        const uint64_t p0 = static_cast<uint64_t>(kM0) * c[0], p1 = static_cast<uint64_t>(kM1) * c[2];
        const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
        const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
        c = {hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0};
    }
    return c;
}

uint64_t sampling_bits(uint64_t seed, int64_t index, uint32_t stream) {
    const uint64_t i = static_cast<uint64_t>(index);
    const std::array<uint32_t, 4> o =
        philox4x32_10({static_cast<uint32_t>(i), static_cast<uint32_t>(i >> 32), stream, 0u},
                      {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)});
    return ((static_cast<uint64_t>(o[0]) << 32) | o[1]) >> 11;
}

MEGAMOE_NO_CONTRACT_FN float sampling_exp(float x) {
    MEGAMOE_NO_CONTRACT_BODY
    if (!(x >= -80.0f)) return 0.0f;
    // n = round-to-nearest-even(x · log2 e) by the 1.5 · 2^23 trick (|x · log2 e| < 2^22).
    const float k = x * 1.44269504088896341f;
    const float n = (k + 12582912.0f) - 12582912.0f;
    // r = x - n ln2 in two steps (Cody-Waite): n · 0.693359375 is exact (9-bit constant, |n| <= 116).
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    const float z = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = (p * z + r) + 1.0f;
    const uint32_t two_n = static_cast<uint32_t>(static_cast<int>(n) + 127) << 23;   // 2^n, n in [-116, 0]
    return y * std::bit_cast<float>(two_n);
}

float sampling_weight(float x, float m, float r) {
    const float d = x - m;
    if (d == 0.0f) return 1.0f;   // also when r is +inf (T subnormal): 0 · inf would be NaN
    return sampling_exp(d * r);
}

uint64_t ceil_mul(float p, uint64_t K) {
    // p = mant · 2^-s exactly; p < 1 gives s >= 24 (p = 1 gives mant 2^23, s 23).
    const uint32_t b = std::bit_cast<uint32_t>(p);
    const uint32_t e = (b >> 23) & 0xFFu;
    const uint64_t mant = e == 0 ? (b & 0x7FFFFFu) : ((b & 0x7FFFFFu) | 0x800000u);
    const int s = e == 0 ? 149 : 150 - static_cast<int>(e);
    const unsigned __int128 prod = static_cast<unsigned __int128>(mant) * K;   // < 2^87
    if (s >= 127) return prod != 0 ? 1 : 0;
    const unsigned __int128 q = prod >> s;
    const bool rem = (prod & ((static_cast<unsigned __int128>(1) << s) - 1)) != 0;
    return static_cast<uint64_t>(q) + (rem ? 1 : 0);
}

uint64_t draw_target(uint64_t x, uint64_t M) {
    return static_cast<uint64_t>((static_cast<unsigned __int128>(x) * M) >> 53);
}

std::vector<uint64_t> sampling_weights(const SamplingParams& sp, const float* logits, int64_t V) {
    sp.validate();
    std::vector<uint64_t> W(static_cast<size_t>(V), 0);
    const float inf = INFINITY;
    auto valid = [&](float x) { return x > -inf; };   // step 1; NaN: false
    float m = -inf;
    int64_t best = -1;
    for (int64_t i = 0; i < V; ++i)
        if (valid(logits[i]) && (best < 0 || logits[i] > m)) m = logits[i], best = i;
    if (best < 0) fail("sampler: no valid logit among ", V, " (all -inf or NaN)");
    if (sp.greedy()) {   // step 2
        W[static_cast<size_t>(best)] = 1;
        return W;
    }
    const bool inf_max = m == inf;
    std::vector<int32_t> cands;   // step 4
    for (int64_t i = 0; i < V; ++i)
        if (inf_max ? logits[i] == inf : valid(logits[i])) cands.push_back(static_cast<int32_t>(i));
    const int S = 63 - static_cast<int>(std::bit_width(cands.size()));
    const float r = 1.0f / sp.temperature;
    std::vector<float> w(static_cast<size_t>(V), 0.0f);
    for (int32_t i : cands) {
        w[static_cast<size_t>(i)] = inf_max ? 1.0f : sampling_weight(logits[i], m, r);
        W[static_cast<size_t>(i)] = static_cast<uint64_t>(w[static_cast<size_t>(i)] * std::ldexp(1.0f, S));
    }
    std::sort(cands.begin(), cands.end(), [&](int32_t a, int32_t b) {   // step 3: rank order
        return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    std::vector<int32_t> kept = cands;
    if (sp.top_k > 0 && static_cast<size_t>(sp.top_k) < kept.size()) kept.resize(static_cast<size_t>(sp.top_k));   // 5
    if (sp.top_p < 1.0f) {   // 6
        uint64_t total = 0, cum = 0;
        for (int32_t i : kept) total += W[static_cast<size_t>(i)];
        const uint64_t thr = ceil_mul(sp.top_p, total);
        size_t keep = kept.size();
        for (size_t j = 0; j < kept.size(); ++j) {
            cum += W[static_cast<size_t>(kept[j])];
            if (cum >= thr) {
                keep = j + 1;
                break;
            }
        }
        kept.resize(keep);
    }
    if (sp.min_p > 0.0f)   // 7
        kept.erase(std::remove_if(kept.begin(), kept.end(), [&](int32_t i) { return w[static_cast<size_t>(i)] < sp.min_p; }),
                   kept.end());
    std::vector<uint64_t> out(static_cast<size_t>(V), 0);
    for (int32_t i : kept) out[static_cast<size_t>(i)] = W[static_cast<size_t>(i)];
    return out;
}

// ---------------------------------------------------------------------------------------------
// Sampler

Sampler::Sampler(const SamplingParams& params, uint64_t fallback_seed)
    : params_(params), seed_(params.seed.value_or(fallback_seed)) {
    params_.validate();
}

int32_t Sampler::sample(const float* logits, int64_t vocab, int64_t index) {
    check_vocab(vocab, "Sampler::sample");
    comparisons_ = 0;
    if (params_.greedy()) return argmax(logits, vocab);

    // Step 4's candidates: m, and how many there are (S depends on the count).
    float m = kNegInf;
    int64_t n_valid = 0, n_inf = 0;
    for (int64_t i = 0; i < vocab; ++i) {
        const float x = logits[i];
        if (!valid(x)) continue;
        ++n_valid;
        n_inf += x == kPosInf;
        if (x > m) m = x;
    }
    if (n_valid == 0) fail_no_token("Sampler::sample", vocab);
    const bool inf_max = m == kPosInf;
    const int64_t n_cand = inf_max ? n_inf : n_valid;
    const int S = 63 - static_cast<int>(std::bit_width(static_cast<uint64_t>(n_cand)));
    const float two_s = std::ldexp(1.0f, S);
    const float r = 1.0f / params_.temperature;
    auto is_cand = [&](float x) { return inf_max ? x == kPosInf : valid(x); };
    auto weight = [&](float x) { return inf_max ? 1.0f : sampling_weight(x, m, r); };   // x a candidate
    auto fixed = [&](float w) { return static_cast<uint64_t>(w * two_s); };             // exact scaling, truncation
    const float min_p = params_.min_p;
    const uint64_t bits = sampling_bits(seed_, index);
    const bool use_top_k = params_.top_k > 0 && params_.top_k < n_cand;
    const bool use_top_p = params_.top_p < 1.0f;

    if (!use_top_k && !use_top_p) {
        // No ranking needed: one pass computes the weights (min-p applied), a second walks them.
        weights_.resize(static_cast<size_t>(vocab));
        uint64_t total = 0;
        for (int64_t i = 0; i < vocab; ++i) {
            uint64_t W = 0;
            if (is_cand(logits[i])) {
                const float w = weight(logits[i]);
                if (!(w < min_p)) W = fixed(w);
            }
            weights_[static_cast<size_t>(i)] = W;
            total += W;
        }
        const uint64_t t = draw_target(bits, total);
        uint64_t acc = 0;
        for (int64_t i = 0; i < vocab; ++i) {
            acc += weights_[static_cast<size_t>(i)];
            if (acc > t) return static_cast<int32_t>(i);
        }
        fail("Sampler::sample: internal error: the draw ran past the kept mass");   // t < total: unreachable
    }

    // Ranked path: the candidates, with their weights.
    int64_t& compared = comparisons_;
    auto by_rank = [&compared](const Cand& a, const Cand& b) { return ++compared, better(a, b); };
    auto by_id = [&compared](const Cand& a, const Cand& b) { return ++compared, a.id < b.id; };
    cands_.clear();
    const size_t k = use_top_k ? static_cast<size_t>(params_.top_k) : 0;
    if (use_top_k && k <= kHeapTopK) {
        // Small k (the usual case): one streaming pass, no vocabulary-sized copy.
        for (int64_t i = 0; i < vocab; ++i)
            if (is_cand(logits[i])) keep_best(cands_, k, Cand{logits[i], static_cast<int32_t>(i), 0.0f, 0}, compared);
    } else {
        for (int64_t i = 0; i < vocab; ++i)
            if (is_cand(logits[i])) cands_.push_back({logits[i], static_cast<int32_t>(i), 0.0f, 0});
        // Large k: selection, not a sort.
        if (use_top_k && k < cands_.size()) {
            std::nth_element(cands_.begin(), cands_.begin() + static_cast<std::ptrdiff_t>(k), cands_.end(), by_rank);
            cands_.resize(k);
        }
    }
    uint64_t total = 0;
    for (Cand& c : cands_) {
        c.w = weight(c.logit);
        c.W = fixed(c.w);
        total += c.W;
    }

    // top-p: the shortest rank-order prefix whose mass reaches thr.
    if (use_top_p && cands_.size() > 1) {
        const uint64_t thr = ceil_mul(params_.top_p, total);
        // Exact pruning first. With F = floor((total - thr) / n), every token below the lowest
        // logit L of the tokens weighing >= F weighs < F, so together they weigh < n F <= total - thr;
        // the tokens at or above L (a rank prefix) thus reach thr and the nucleus lies among them.
        // With real logits this drops nearly the whole vocabulary before any ranking.
        const uint64_t F = (total - thr) / cands_.size();
        if (F > 0) {
            float L = kPosInf;
            for (const Cand& c : cands_)
                if (c.W >= F) L = std::min(L, c.logit);
            cands_.erase(std::remove_if(cands_.begin(), cands_.end(), [&](const Cand& c) { return c.logit < L; }),
                         cands_.end());
        }
        // The nucleus is usually small, so rank in growing chunks (select with nth_element, then
        // sort the chunk) instead of sorting every candidate.
        const size_t n = cands_.size();
        size_t done = 0, keep = n, chunk = 64;
        uint64_t cum = 0;
        while (done < n && keep == n) {
            const size_t hi = std::min(n, done + chunk);
            const auto lo_it = cands_.begin() + static_cast<std::ptrdiff_t>(done);
            const auto hi_it = cands_.begin() + static_cast<std::ptrdiff_t>(hi);
            if (hi < n) std::nth_element(lo_it, hi_it, cands_.end(), by_rank);
            std::sort(lo_it, hi_it, by_rank);
            for (size_t j = done; j < hi; ++j) {
                cum += cands_[j].W;
                if (cum >= thr) {
                    keep = j + 1;
                    break;
                }
            }
            done = hi;
            chunk *= 4;
        }
        cands_.resize(keep);   // thr <= total, so the walk always stops; keep == n when it stops last
    }

    if (min_p > 0.0f)
        cands_.erase(std::remove_if(cands_.begin(), cands_.end(), [&](const Cand& c) { return c.w < min_p; }),
                     cands_.end());

    // The draw, in id order.
    std::sort(cands_.begin(), cands_.end(), by_id);
    uint64_t kept = 0;
    for (const Cand& c : cands_) kept += c.W;
    const uint64_t t = draw_target(bits, kept);
    uint64_t acc = 0;
    for (const Cand& c : cands_) {
        acc += c.W;
        if (acc > t) return c.id;
    }
    fail("Sampler::sample: internal error: the draw ran past the kept mass");   // the top token weighs 2^S > 0
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

    struct Item {
        float logit;
        int32_t id;
    };
    std::vector<Item> heap;
    heap.reserve(n);
    int64_t compared = 0;
    for (int64_t i = 0; i < vocab; ++i)
        if (valid(logits[i])) keep_best(heap, n, Item{logits[i], static_cast<int32_t>(i)}, compared);
    auto by_rank = [](const Item& a, const Item& b) { return better(a, b); };
    std::sort(heap.begin(), heap.end(), by_rank);
    std::vector<std::pair<int32_t, float>> out;
    out.reserve(heap.size());
    for (const Item& it : heap) out.emplace_back(it.id, static_cast<float>(norm.logprob(it.logit)));
    return out;
}

}  // namespace megamoe
