// engine.h — continuous batching: requests join and leave a running batch; each step prefills
// chunks of new prompts within a token budget, mixed with one decode token per running request.
//
// The engine drives a Backend (ref/backend.h: the CPU reference or the GPU runner) and never sees
// a tensor: a request is admitted when the backend gives it a slot and reserves state for its
// whole length (prompt + max_tokens); until then it waits. One worker thread owns the backend and
// every sequence's state (ds4's rule: the worker owns all live KV state); other threads talk to it
// through submit() / cancel(). Callbacks run on the worker thread, without the engine lock held,
// so they may call cancel().
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "ref/backend.h"
#include "ref/model.h"
#include "serve/sampler.h"

namespace megamoe {

struct EngineOptions {
    int64_t  max_batch_tokens = 512;   // tokens per forward step: prefill chunks + decodes
    int64_t  max_seqs = 64;            // requests running at once; the rest wait
    int64_t  max_model_len = 0;        // context limit (prompt + completion); 0: max_position_embeddings
    uint64_t seed = 0;                 // seeds requests that bring none (each gets seed + request id)
    // Ids that name no token. A checkpoint's vocabulary is often padded past its tokenizer's
    // (DeepSeek-V4: 129280 logits, fewer tokenizer ids); as in vLLM, these ids' logits are set to
    // -inf before sampling and logprobs, so they are never sampled and never listed in
    // TokenOut::top (which may then hold fewer than k entries), and logprobs are normalized over
    // the ids that remain. Each must be in [0, vocab_size); at least one id must stay unmasked.
    std::vector<int32_t> masked_token_ids;
    // Automatic prefix caching (vLLM's default): a request whose tokens begin with those of one
    // already run starts from a snapshot of that state (Backend::snapshot) at the longest common
    // multiple of the backend's prefix_block(). Snapshots are taken where a prompt's last whole
    // block ends and at every block boundary while generating (so a chat's next turn, which
    // repeats the previous turn's prompt and answer, finds them), and dropped least recently used
    // first when the pool needs room.
    bool prefix_caching = true;
    // Speculative decoding with the checkpoint's MTP block drafting this many tokens per step and
    // sequence (0: off; 1 to 3): ref/speculative.h, "the serving engine". Each generating request
    // verifies [last token, d_1 .. d_K] in one step and keeps 1 to K + 1 tokens by the standard
    // rule (greedy: the drafts equal to the argmaxes; sampled: rejection sampling), so a greedy
    // output is the one without speculation and a sampled one has the same distribution. Needs a
    // backend with has_speculative() (Engine's constructor throws otherwise).
    int64_t speculative_tokens = 0;
};

struct GenerationParams {
    SamplingParams       sampling;
    int64_t              max_tokens = 16;   // completion tokens at most
    bool                 ignore_eos = false;
    std::vector<int32_t> stop_token_ids;    // finish (reason "stop") after any of these
    int                  top_logprobs = -1; // -1: none; k >= 0: the sampled token's logprob and k alternatives
};

struct TokenOut {
    int32_t id = 0;
    float   logprob = 0;                               // when top_logprobs >= 0
    std::vector<std::pair<int32_t, float>> top;        // [k] (id, logprob)
};

enum class FinishReason { stop, length, cancelled, error };
const char* finish_reason_name(FinishReason r);      // "stop" | "length" | "cancelled" | "error"

struct RequestCallbacks {
    // Each new token; return false to finish the request here (reason "stop"), e.g. a stop string.
    std::function<bool(const TokenOut&)> on_token;
    // Exactly once, after the last token (or on cancellation, or an engine error with its message).
    // An exception from on_token ends the request with reason "error" and its message; one from
    // on_finish is printed to stderr. None escapes the engine thread.
    std::function<void(FinishReason, const std::string& error)> on_finish;
};

// Prometheus-style histogram with fixed bucket bounds (seconds).
struct Histogram {
    std::vector<double>   bounds;
    std::vector<uint64_t> counts;                      // cumulative per bound, as Prometheus wants
    uint64_t count = 0;
    double   sum = 0;
    explicit Histogram(std::vector<double> b) : bounds(std::move(b)), counts(bounds.size()) {}
    void observe(double v);
};

struct EngineMetrics {
    uint64_t requests_total = 0, prompt_tokens_total = 0, generation_tokens_total = 0;
    int64_t  running = 0, waiting = 0;
    double   cache_usage = 0;                          // the backend's state in use (fraction)
    uint64_t preemptions_total = 0;                    // running requests whose state was dropped for room
    uint64_t spec_drafts_total = 0;                    // speculative decoding: drafts verified (vLLM's num_drafts)
    uint64_t spec_accepted_total = 0;                  // ... of them accepted (vLLM's num_accepted_tokens)
    uint64_t prefix_queries_tokens = 0;                // prompt tokens looked up in the prefix cache (vLLM's)
    uint64_t prefix_hits_tokens = 0;                   // ... of them found there (not computed again)
    uint64_t prefix_hit_requests = 0;                  // admissions that started from a snapshot
    int64_t  prefix_entries = 0;                       // snapshots held
    std::array<uint64_t, 4> finished_total{};          // requests finished, by FinishReason (stop, length, cancelled, error)
    Histogram ttft{{0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}};
    Histogram tpot{{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}};
};

class Engine {
public:
    // The CPU reference backend for `model`.
    Engine(std::unique_ptr<Model> model, const EngineOptions& opt);
    // A given backend (which may hold references into `model`: the engine keeps both, the backend
    // destroyed first). max_seqs, max_batch_tokens and max_model_len are capped by the backend's.
    Engine(std::unique_ptr<Model> model, std::unique_ptr<Backend> backend, const EngineOptions& opt);
    ~Engine();   // cancels what is left and joins the worker

    const ModelConfig& config() const { return model_->cfg; }
    const Backend& backend() const { return *backend_; }
    int64_t max_model_len() const { return max_model_len_; }

    // Queues a request. Throws Error, changing nothing, when the prompt is empty, holds an id
    // outside the vocabulary, or prompt + max_tokens exceeds the context limit (vLLM's wording).
    uint64_t submit(std::vector<int32_t> prompt, const GenerationParams& params, RequestCallbacks cb);
    void cancel(uint64_t id);          // no-op for unknown or finished ids
    EngineMetrics metrics() const;

private:
    struct Request;
    void loop();
    bool step();                       // one forward over the current batch; false when idle
    void emit(Request& r, float* row); // samples r's next token from its logits row (CPU) and delivers it
    // Reports a drawn token; stop, length, or feed it next. False when r finished (r is gone then).
    bool deliver(Request& r, const TokenOut& out);
    void finish(Request& r, FinishReason why, const std::string& error = "");
    void fail_running(const std::string& error);   // ends every running request with an error
    // Pool room (called on the worker thread with m_ held): reserve() for positions [0, n) of r,
    // dropping prefix-cache snapshots (least recently used first) while it fails.
    bool reserve_or_evict(Request& r, int64_t n);
    bool evict_one_snapshot();
    void preempt(Request& r);                          // drops r's state; it waits at the front, recomputed later
    void admit_locked();
    void maybe_snapshot(Request& r);                   // after a step: a snapshot where r stands, if it is due

    std::unique_ptr<Model> model_;
    std::unique_ptr<Backend> backend_;   // after model_: destroyed first
    EngineOptions opt_;
    int64_t max_model_len_;
    std::vector<char> masked_;         // [vocab] 1 for EngineOptions::masked_token_ids
    mutable std::mutex m_;
    std::condition_variable cv_;
    std::deque<std::unique_ptr<Request>> waiting_;
    std::vector<std::unique_ptr<Request>> running_;
    std::map<uint64_t, Request*> by_id_;
    uint64_t next_id_ = 1;
    bool stop_ = false;
    EngineMetrics metrics_;
    double cache_usage_ = 0;           // the backend's, after the last step
    struct PrefixEntry {
        int32_t handle = -1;             // Backend::snapshot
        std::vector<int32_t> tokens;     // the tokens its state holds (checked on a hit: no hash collision aliases)
        uint64_t last_used = 0;
    };
    std::unordered_map<uint64_t, PrefixEntry> prefix_;   // key: prefix_hash(tokens)
    uint64_t prefix_clock_ = 0;
    std::thread worker_;
};

}  // namespace megamoe
