// engine.cpp — the scheduler loop: admit, build a mixed prefill/decode batch, forward, sample.
#include "serve/engine.h"

#include <algorithm>
#include <chrono>

namespace megamoe {

using Clock = std::chrono::steady_clock;

const char* finish_reason_name(FinishReason r) {
    switch (r) {
        case FinishReason::stop: return "stop";
        case FinishReason::length: return "length";
        case FinishReason::cancelled: return "cancelled";
        case FinishReason::error: return "error";
    }
    return "?";
}

void Histogram::observe(double v) {
    ++count;
    sum += v;
    for (size_t i = 0; i < bounds.size(); ++i)
        if (v <= bounds[i]) ++counts[i];
}

struct Engine::Request {
    uint64_t id = 0;
    std::vector<int32_t> prompt;
    GenerationParams params;
    RequestCallbacks cb;
    std::unique_ptr<SequenceState> state;
    Sampler sampler;
    std::atomic<int64_t> n_fed{0}; // tokens the model has seen: prompt, then generated (metrics() reads it)
    int32_t pending = -1;          // the last sampled token, fed at the next step
    int64_t n_generated = 0;
    bool cancelled = false;
    Clock::time_point submitted, last_token;

    Request(const GenerationParams& p, uint64_t seed) : params(p), sampler(p.sampling, seed) {}
};

Engine::Engine(std::unique_ptr<Model> model, const EngineOptions& opt)
    : model_(std::move(model)), opt_(opt),
      max_model_len_(opt.max_model_len > 0 ? std::min(opt.max_model_len, model_->cfg.max_position_embeddings)
                                           : model_->cfg.max_position_embeddings) {
    if (opt_.max_batch_tokens < 1) fail("max_batch_tokens must be >= 1");
    if (opt_.max_seqs < 1) fail("max_seqs must be >= 1");
    worker_ = std::thread([this] { loop(); });
}

Engine::~Engine() {
    {
        std::lock_guard<std::mutex> lk(m_);
        stop_ = true;
    }
    cv_.notify_all();
    worker_.join();
    for (auto* list : {&running_}) {
        for (auto& r : *list)
            if (r->cb.on_finish) r->cb.on_finish(FinishReason::cancelled, "");
    }
    for (auto& r : waiting_)
        if (r->cb.on_finish) r->cb.on_finish(FinishReason::cancelled, "");
}

uint64_t Engine::submit(std::vector<int32_t> prompt, const GenerationParams& params, RequestCallbacks cb) {
    const int64_t P = static_cast<int64_t>(prompt.size());
    if (P == 0) fail("the prompt is empty");
    for (int32_t id : prompt)
        if (id < 0 || id >= model_->cfg.vocab_size)
            fail("token id ", id, " is outside the vocabulary [0, ", model_->cfg.vocab_size, ")");
    if (P >= max_model_len_)
        fail("This model's maximum context length is ", max_model_len_, " tokens. However, your request has ", P,
             " input tokens. Please reduce the length of the input messages.");
    if (params.max_tokens < 1) fail("max_tokens must be at least 1, got ", params.max_tokens);
    if (P + params.max_tokens > max_model_len_)
        fail("This model's maximum context length is ", max_model_len_, " tokens. However, you requested ",
             P + params.max_tokens, " tokens (", P, " in the messages, ", params.max_tokens,
             " in the completion). Please reduce the length of the messages or completion.");
    std::unique_lock<std::mutex> lk(m_);
    const uint64_t id = next_id_++;
    auto r = std::make_unique<Request>(params, opt_.seed + id);   // validates the sampling params
    r->id = id;
    r->prompt = std::move(prompt);
    r->cb = std::move(cb);
    r->submitted = Clock::now();
    by_id_[id] = r.get();
    waiting_.push_back(std::move(r));
    ++metrics_.requests_total;
    metrics_.prompt_tokens_total += static_cast<uint64_t>(P);
    lk.unlock();
    cv_.notify_all();
    return id;
}

void Engine::cancel(uint64_t id) {
    std::lock_guard<std::mutex> lk(m_);
    auto it = by_id_.find(id);
    if (it != by_id_.end()) it->second->cancelled = true;
    cv_.notify_all();
}

EngineMetrics Engine::metrics() const {
    std::lock_guard<std::mutex> lk(m_);
    EngineMetrics m = metrics_;
    m.running = static_cast<int64_t>(running_.size());
    m.waiting = static_cast<int64_t>(waiting_.size());
    int64_t held = 0;
    for (const auto& r : running_) held += r->n_fed;
    m.cache_usage = static_cast<double>(held) / static_cast<double>(opt_.max_seqs * max_model_len_);
    return m;
}

void Engine::loop() {
    for (;;) {
        {
            std::unique_lock<std::mutex> lk(m_);
            cv_.wait(lk, [&] { return stop_ || !waiting_.empty() || !running_.empty(); });
            if (stop_) return;
        }
        step();
    }
}

// Removes a request from the engine and reports its end. Called on the worker thread, without m_.
void Engine::finish(Request& r, FinishReason why, const std::string& error) {
    std::unique_ptr<Request> owned;
    {
        std::lock_guard<std::mutex> lk(m_);
        by_id_.erase(r.id);
        auto it = std::find_if(running_.begin(), running_.end(), [&](const auto& p) { return p.get() == &r; });
        if (it != running_.end()) {
            owned = std::move(*it);
            running_.erase(it);
        }
    }
    if (r.cb.on_finish) r.cb.on_finish(why, error);
}

bool Engine::step() {
    std::vector<Request*> cancelled, chunk_of;
    std::vector<SequenceChunk> batch;
    {
        std::lock_guard<std::mutex> lk(m_);
        // Waiting requests cancelled before they ran leave at once.
        for (auto it = waiting_.begin(); it != waiting_.end();) {
            if ((*it)->cancelled) {
                running_.push_back(std::move(*it));   // finish() takes it from running_
                cancelled.push_back(running_.back().get());
                it = waiting_.erase(it);
            } else {
                ++it;
            }
        }
        while (!waiting_.empty() && static_cast<int64_t>(running_.size()) < opt_.max_seqs) {
            running_.push_back(std::move(waiting_.front()));
            waiting_.pop_front();
            running_.back()->state = std::make_unique<SequenceState>(model_->cfg);
        }
        // Decodes first (one token each), then prompt chunks in arrival order within the budget.
        int64_t budget = opt_.max_batch_tokens;
        for (auto& r : running_) {
            if (r->cancelled) {
                if (std::find(cancelled.begin(), cancelled.end(), r.get()) == cancelled.end()) cancelled.push_back(r.get());
                continue;
            }
            if (r->pending < 0) continue;
            batch.push_back({r->state.get(), {r->pending}});
            chunk_of.push_back(r.get());
            --budget;
        }
        for (auto& r : running_) {
            const int64_t left = static_cast<int64_t>(r->prompt.size()) - r->n_fed;
            if (r->cancelled || left <= 0 || budget <= 0) continue;
            const int64_t n = std::min(left, budget), fed = r->n_fed;
            batch.push_back({r->state.get(), std::vector<int32_t>(r->prompt.begin() + fed, r->prompt.begin() + fed + n)});
            chunk_of.push_back(r.get());
            budget -= n;
        }
    }
    for (Request* r : cancelled) finish(*r, FinishReason::cancelled);
    if (batch.empty()) return !cancelled.empty();

    std::vector<float> logits;
    try {
        forward(*model_, batch, ForwardOptions{}, logits);
    } catch (const std::exception& e) {
        for (Request* r : chunk_of) finish(*r, FinishReason::error, e.what());
        return true;
    }
    const int64_t V = model_->cfg.vocab_size;
    for (size_t i = 0; i < chunk_of.size(); ++i) {
        Request& r = *chunk_of[i];
        r.n_fed += static_cast<int64_t>(batch[i].tokens.size());
        r.pending = -1;
        if (r.n_fed < static_cast<int64_t>(r.prompt.size())) continue;   // more prompt to prefill
        const float* row = logits.data() + static_cast<int64_t>(i) * V;
        TokenOut out;
        out.id = r.sampler.sample(row, V);
        if (r.params.top_logprobs >= 0) {
            out.logprob = token_logprob(row, V, out.id);
            out.top = top_logprobs(row, V, r.params.top_logprobs);
        }
        ++r.n_generated;
        const auto now = Clock::now();
        {
            std::lock_guard<std::mutex> lk(m_);
            ++metrics_.generation_tokens_total;
            if (r.n_generated == 1)
                metrics_.ttft.observe(std::chrono::duration<double>(now - r.submitted).count());
            else
                metrics_.tpot.observe(std::chrono::duration<double>(now - r.last_token).count());
        }
        r.last_token = now;
        const auto& stops = r.params.stop_token_ids;
        const bool stop = (!r.params.ignore_eos && out.id == model_->cfg.eos_token_id) ||
                          std::find(stops.begin(), stops.end(), out.id) != stops.end();
        const bool length = r.n_generated >= r.params.max_tokens || r.n_fed + 1 > max_model_len_;
        const bool keep = !r.cb.on_token || r.cb.on_token(out);
        if (!keep || stop)
            finish(r, FinishReason::stop);
        else if (length)
            finish(r, FinishReason::length);
        else
            r.pending = out.id;
    }
    return true;
}

}  // namespace megamoe
