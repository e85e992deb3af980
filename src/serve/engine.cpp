// engine.cpp — the scheduler loop: admit, build a mixed prefill/decode batch, forward, sample.
#include "serve/engine.h"
#include "ref/speculative.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <limits>
#include <map>

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
    // The prompt, then each sampled token as it is drawn. The backend's state holds seq[0, n_fed);
    // a running request feeds seq[n_fed, ...) each step: a prompt chunk, or while generating the
    // one token drawn last. A preempted request keeps seq and starts again from n_fed = 0 (or from
    // a prefix snapshot): recomputing prompt and output gives the state it lost, and its next
    // token has the same sampling key (seed, n_generated), so the output is unchanged.
    std::vector<int32_t> seq;
    int64_t n_prompt = 0;
    GenerationParams params;
    RequestCallbacks cb;
    int32_t slot = -1;             // the backend's sequence slot once admitted
    Sampler sampler;
    int64_t n_fed = 0;
    int64_t n_generated = 0;
    int64_t snap_at = 0;           // a prefill chunk ends here for a prefix snapshot (0: none due)
    std::vector<int32_t> drafts;   // speculative decoding: the MTP block's guesses of the tokens after seq's last
    bool cancelled = false;
    Clock::time_point submitted, last_token;

    Request(const GenerationParams& p, uint64_t seed) : params(p), sampler(p.sampling, seed) {}
    bool generating() const { return n_generated > 0 && n_fed == static_cast<int64_t>(seq.size()) - 1; }
};

namespace {

std::unique_ptr<Backend> cpu_backend_for(const Model& m, const EngineOptions& opt) {
    if (opt.max_batch_tokens < 1) fail("max_batch_tokens must be >= 1");
    if (opt.max_seqs < 1) fail("max_seqs must be >= 1");
    return make_cpu_backend(m, opt.max_seqs, opt.max_batch_tokens, opt.max_model_len);
}

}  // namespace

Engine::Engine(std::unique_ptr<Model> model, const EngineOptions& opt)
    : Engine(std::move(model), nullptr, opt) {}

Engine::Engine(std::unique_ptr<Model> model, std::unique_ptr<Backend> backend, const EngineOptions& opt)
    : model_(std::move(model)), backend_(backend ? std::move(backend) : cpu_backend_for(*model_, opt)), opt_(opt),
      max_model_len_(std::min(opt.max_model_len > 0 ? std::min(opt.max_model_len, model_->cfg.max_position_embeddings)
                                                    : model_->cfg.max_position_embeddings,
                              backend_->max_model_len())) {
    // A sequence never holds more state than the whole pool.
    max_model_len_ = std::min(max_model_len_, backend_->capacity_tokens());
    if (opt_.max_batch_tokens < 1) fail("max_batch_tokens must be >= 1");
    if (opt_.max_seqs < 1) fail("max_seqs must be >= 1");
    opt_.max_batch_tokens = std::min(opt_.max_batch_tokens, backend_->max_batch_tokens());
    opt_.max_seqs = std::min({opt_.max_seqs, backend_->max_seqs(), backend_->max_logit_rows()});
    if (opt_.speculative_tokens < 0 || opt_.speculative_tokens > kMaxSpeculativeTokens)
        fail("--speculative-tokens ", opt_.speculative_tokens, ": the engine drafts 0 to ", kMaxSpeculativeTokens,
             " tokens per step");
    if (opt_.speculative_tokens > 0) {
        if (!backend_->has_speculative())
            fail("--speculative-tokens: the ", backend_->name(),
                 " backend cannot run speculative steps (the cuda backend with the checkpoint's MTP block can)");
        // A verified sequence takes 1 + drafts tokens and logit rows of a step.
        opt_.max_seqs = std::min(opt_.max_seqs, backend_->max_logit_rows() / (1 + opt_.speculative_tokens));
        if (opt_.max_seqs < 1 || opt_.max_batch_tokens < 1 + opt_.speculative_tokens)
            fail("--speculative-tokens ", opt_.speculative_tokens, ": a step must hold ", 1 + opt_.speculative_tokens,
                 " tokens and logit rows of one sequence");
    }
    if (backend_->has_sampler()) backend_->set_masked_ids(opt_.masked_token_ids);
    const int64_t V = model_->cfg.vocab_size;
    masked_.assign(static_cast<size_t>(V), 0);
    for (int32_t id : opt_.masked_token_ids) {
        if (id < 0 || id >= V) fail("masked_token_ids: id ", id, " is outside the vocabulary [0, ", V, ")");
        masked_[static_cast<size_t>(id)] = 1;
    }
    if (std::find(masked_.begin(), masked_.end(), 0) == masked_.end())
        fail("masked_token_ids: every one of the ", V, " ids is masked");
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
        for (auto& r : *list) {
            if (r->slot >= 0) backend_->close(r->slot);
            if (r->cb.on_finish) r->cb.on_finish(FinishReason::cancelled, "");
        }
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
    r->n_prompt = P;
    r->seq = std::move(prompt);
    r->seq.reserve(static_cast<size_t>(P + params.max_tokens));
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
    m.cache_usage = cache_usage_;
    return m;
}

void Engine::loop() {
    for (;;) {
        {
            std::unique_lock<std::mutex> lk(m_);
            cv_.wait(lk, [&] { return stop_ || !waiting_.empty() || !running_.empty(); });
            if (stop_) return;
        }
        try {
            step();
        } catch (const std::exception& e) {   // a bug: fail what runs rather than abort the process
            fail_running(str("engine error: ", e.what()));
        }
    }
}

void Engine::fail_running(const std::string& error) {
    std::vector<Request*> all;
    {
        std::lock_guard<std::mutex> lk(m_);
        for (auto& r : running_) all.push_back(r.get());
    }
    for (Request* r : all) finish(*r, FinishReason::error, error);
}

// Removes a request from the engine and reports its end. Called on the worker thread, without m_.
void Engine::finish(Request& r, FinishReason why, const std::string& error) {
    std::unique_ptr<Request> owned;
    if (r.slot >= 0) {
        backend_->close(r.slot);   // the worker thread owns the backend
        r.slot = -1;
        const double usage = backend_->cache_usage();
        std::lock_guard<std::mutex> lk(m_);
        cache_usage_ = usage;
    }
    {
        std::lock_guard<std::mutex> lk(m_);
        ++metrics_.finished_total[static_cast<size_t>(why)];
        by_id_.erase(r.id);
        auto it = std::find_if(running_.begin(), running_.end(), [&](const auto& p) { return p.get() == &r; });
        if (it != running_.end()) {
            owned = std::move(*it);
            running_.erase(it);
        }
    }
    if (!r.cb.on_finish) return;
    try {
        r.cb.on_finish(why, error);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "megamoe: request %lu: on_finish threw: %s\n", static_cast<unsigned long>(r.id), e.what());
    } catch (...) {
        std::fprintf(stderr, "megamoe: request %lu: on_finish threw\n", static_cast<unsigned long>(r.id));
    }
}

namespace {

// FNV-1a over the token ids: the prefix cache's key (entries also keep the tokens, compared on a hit).
uint64_t prefix_hash(const int32_t* t, int64_t n) {
    uint64_t h = 1469598103934665603ull;
    for (int64_t i = 0; i < n; ++i) {
        uint32_t v = static_cast<uint32_t>(t[i]);
        for (int b = 0; b < 4; ++b, v >>= 8) h = (h ^ (v & 0xffu)) * 1099511628211ull;
    }
    return h;
}

}  // namespace

bool Engine::evict_one_snapshot() {
    if (prefix_.empty()) return false;
    auto lru = prefix_.begin();
    for (auto it = prefix_.begin(); it != prefix_.end(); ++it)
        if (it->second.last_used < lru->second.last_used) lru = it;
    backend_->drop_snapshot(lru->second.handle);
    prefix_.erase(lru);
    metrics_.prefix_entries = static_cast<int64_t>(prefix_.size());
    return true;
}

bool Engine::reserve_or_evict(Request& r, int64_t n) {
    while (!backend_->reserve(r.slot, n))
        if (!evict_one_snapshot()) return false;
    return true;
}

void Engine::preempt(Request& r) {
    backend_->close(r.slot);
    r.slot = -1;
    r.n_fed = 0;
    r.snap_at = 0;
    r.drafts.clear();
    ++metrics_.preemptions_total;
    auto it = std::find_if(running_.begin(), running_.end(), [&](const auto& p) { return p.get() == &r; });
    waiting_.push_front(std::move(*it));   // first in line when room comes back (vLLM's order)
    running_.erase(it);
}

// Admission in arrival order (preempted requests first), while the backend has a slot and room
// for the request's tokens so far plus the one it will draw next.
void Engine::admit_locked() {
    const int64_t B = opt_.prefix_caching ? backend_->prefix_block() : 0;
    while (!waiting_.empty() && static_cast<int64_t>(running_.size()) < opt_.max_seqs) {
        Request& r = *waiting_.front();
        const int64_t S = static_cast<int64_t>(r.seq.size());
        // The longest cached prefix that leaves at least one token to run (its logits are needed).
        int64_t start = 0;
        int32_t slot = -1;
        PrefixEntry* hit = nullptr;   // valid until reserve_or_evict (which may drop entries)
        uint64_t hit_key = 0;
        if (B > 0) {
            for (int64_t p = ((S - 1) / B) * B; p > 0 && !hit; p -= B) {
                const uint64_t key = prefix_hash(r.seq.data(), p);
                auto it = prefix_.find(key);
                if (it != prefix_.end() && static_cast<int64_t>(it->second.tokens.size()) == p &&
                    std::equal(it->second.tokens.begin(), it->second.tokens.end(), r.seq.begin())) {
                    hit = &it->second;
                    hit_key = key;
                    start = p;
                }
            }
        }
        slot = hit ? backend_->open_from(hit->handle) : backend_->open();
        if (slot < 0) break;
        r.slot = slot;
        if (!reserve_or_evict(r, S + 1)) {   // may drop `hit`'s entry: the slot holds its own copy now
            backend_->close(slot);
            r.slot = -1;
            break;   // it waits for running requests to finish (or be preempted for older ones)
        }
        if (B > 0 && r.n_generated == 0) {   // counted once per request, as vLLM counts queries
            metrics_.prefix_queries_tokens += static_cast<uint64_t>(S);
            metrics_.prefix_hits_tokens += static_cast<uint64_t>(start);
            if (start > 0) ++metrics_.prefix_hit_requests;
        }
        if (hit) {   // still held unless reserve_or_evict dropped it
            auto it = prefix_.find(hit_key);
            if (it != prefix_.end()) it->second.last_used = ++prefix_clock_;
        }
        r.n_fed = start;
        // The prompt's last whole block ends a prefill chunk, for a snapshot there.
        r.snap_at = B > 0 && (S / B) * B > start ? (S / B) * B : 0;
        running_.push_back(std::move(waiting_.front()));
        waiting_.pop_front();
    }
}

void Engine::maybe_snapshot(Request& r) {
    const int64_t B = opt_.prefix_caching ? backend_->prefix_block() : 0;
    if (B == 0 || r.n_fed == 0 || r.n_fed % B != 0) return;
    // Where the prompt's last whole block ends, and at each boundary reached while generating.
    const bool due = r.n_fed == r.snap_at || (r.n_fed > r.n_prompt && r.n_fed == static_cast<int64_t>(r.seq.size()));
    if (r.n_fed == r.snap_at) r.snap_at = 0;
    if (!due) return;
    std::lock_guard<std::mutex> lk(m_);
    const uint64_t key = prefix_hash(r.seq.data(), r.n_fed);
    auto it = prefix_.find(key);
    if (it != prefix_.end()) {   // already cached (or a collision: keep the older entry)
        it->second.last_used = ++prefix_clock_;
        return;
    }
    int32_t h = backend_->snapshot(r.slot);
    if (h < 0 && evict_one_snapshot()) h = backend_->snapshot(r.slot);
    if (h < 0) return;
    prefix_[key] = PrefixEntry{h, std::vector<int32_t>(r.seq.begin(), r.seq.begin() + r.n_fed), ++prefix_clock_};
    metrics_.prefix_entries = static_cast<int64_t>(prefix_.size());
}

bool Engine::step() {
    std::vector<Request*> cancelled, chunk_of, no_room;
    std::vector<BackendChunk> batch;
    std::vector<std::vector<int32_t>> drafts;   // per chunk: the drafts it verifies (speculation)
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
        admit_locked();
        // Tokens per request this step: decodes first (one token each), then prompt chunks (or a
        // preempted request's recomputation) in admission order within the budget.
        std::map<Request*, int64_t> want;
        int64_t budget = opt_.max_batch_tokens;
        for (auto& r : running_) {
            if (r->cancelled) {
                if (std::find(cancelled.begin(), cancelled.end(), r.get()) == cancelled.end()) cancelled.push_back(r.get());
                continue;
            }
            if (r->slot >= 0 && r->generating()) {
                // With drafts (speculation): the last token and the drafts, within the context.
                const int64_t k = std::min({static_cast<int64_t>(r->drafts.size()), max_model_len_ - r->n_fed - 1,
                                            budget - 1});
                const int64_t n = 1 + std::max<int64_t>(k, 0);
                want[r.get()] = n;
                budget -= n;
            }
        }
        for (auto& r : running_) {
            if (r->cancelled || r->slot < 0 || r->generating() || budget <= 0) continue;
            int64_t n = std::min(static_cast<int64_t>(r->seq.size()) - r->n_fed, budget);
            if (r->snap_at > r->n_fed) n = std::min(n, r->snap_at - r->n_fed);
            if (n <= 0) continue;
            want[r.get()] = n;
            budget -= n;
        }
        // Room for each, oldest first; when the pool is full, snapshots go first, then the
        // newest running requests are preempted (their state dropped, recomputed when room comes
        // back) rather than failed.
        for (size_t i = 0; i < running_.size(); ++i) {
            Request* r = running_[i].get();
            auto w = want.find(r);
            if (w == want.end()) continue;
            bool ok = reserve_or_evict(*r, r->n_fed + w->second);
            while (!ok) {
                // The newest running request that is not cancelled (cancelled ones leave this step).
                Request* victim = nullptr;
                for (size_t j = running_.size(); j-- > i;)
                    if (!running_[j]->cancelled) {
                        victim = running_[j].get();
                        break;
                    }
                if (victim == r && running_.size() == 1 + cancelled.size()) {
                    // Alone and still no room: submit() checks the capacity, so this is a bug.
                    no_room.push_back(r);
                    want.erase(r);
                    break;
                }
                want.erase(victim);
                preempt(*victim);
                if (victim == r) break;
                ok = reserve_or_evict(*r, r->n_fed + w->second);
            }
            if (i < running_.size() && running_[i].get() != r) --i;   // r was preempted: the next moved here
        }
        for (auto& r : running_) {
            auto w = want.find(r.get());
            if (w == want.end() || r->cancelled) continue;
            const int64_t fed = r->n_fed;
            const int64_t n = r->generating() ? 1 : w->second;   // a verified chunk: its last token, then the drafts
            batch.push_back({r->slot, std::vector<int32_t>(r->seq.begin() + fed, r->seq.begin() + fed + n)});
            chunk_of.push_back(r.get());
            drafts.push_back(r->generating() ? std::vector<int32_t>(r->drafts.begin(), r->drafts.begin() + (w->second - 1))
                                             : std::vector<int32_t>{});
        }
    }
    for (Request* r : cancelled) finish(*r, FinishReason::cancelled);
    for (Request* r : no_room)
        finish(*r, FinishReason::error, str("engine error: the state pool (", backend_->capacity_tokens(),
                                            " positions) has no room for this request"));
    if (batch.empty()) return !cancelled.empty() || !no_room.empty();

    // The backend samples where the logits are when it can (the GPU: only ids come back);
    // otherwise the CPU sampler draws from the logits here. Both follow serve/sampler.h's
    // definition with the key (request seed, index of the token in the output).
    const bool device = backend_->has_sampler();
    const bool speculative = opt_.speculative_tokens > 0;
    std::vector<float> logits;
    std::vector<SampledToken> drawn;
    std::vector<Backend::SpecOut> spec_out;
    try {
        if (device) {
            std::vector<SampleSpec> spec;
            for (Request* r : chunk_of) {
                const SamplingParams& p = r->sampler.params();
                SampleSpec sp;
                sp.temperature = p.greedy() ? 0.0f : p.temperature;
                sp.top_k = p.top_k;
                sp.top_p = p.top_p;
                sp.min_p = p.min_p;
                sp.seed = r->sampler.seed();
                sp.index = r->n_generated;
                sp.n_top = r->params.top_logprobs;
                spec.push_back(sp);
            }
            if (speculative) {
                std::vector<Backend::SpecChunk> sc;
                for (size_t i = 0; i < batch.size(); ++i) {
                    const Request& r = *chunk_of[i];
                    const int64_t end = r.n_fed + static_cast<int64_t>(batch[i].tokens.size());
                    // A prompt (or recomputation) chunk followed by more of it knows its next token.
                    const int32_t next = drafts[i].empty() && end < static_cast<int64_t>(r.seq.size())
                                             ? r.seq[static_cast<size_t>(end)]
                                             : -1;
                    sc.push_back({batch[i].slot, batch[i].tokens, drafts[i], next,
                                  static_cast<int32_t>(opt_.speculative_tokens)});
                }
                backend_->step_speculative(sc, spec, spec_out);
            } else {
                backend_->step_sample(batch, spec, drawn);
            }
        } else {
            backend_->step(batch, false, logits);
        }
    } catch (const std::exception& e) {
        for (Request* r : chunk_of) finish(*r, FinishReason::error, e.what());
        return true;
    }
    {
        const double usage = backend_->cache_usage();
        std::lock_guard<std::mutex> lk(m_);
        cache_usage_ = usage;
    }
    const int64_t V = model_->cfg.vocab_size;
    for (size_t i = 0; i < chunk_of.size(); ++i) {
        Request& r = *chunk_of[i];
        r.n_fed += static_cast<int64_t>(batch[i].tokens.size());
        if (speculative) {
            // Snapshots are taken where the state stands after a chunk; a verified step that keeps
            // several tokens can step over a block boundary, and then no snapshot is taken there.
            maybe_snapshot(r);
            if (r.n_fed < static_cast<int64_t>(r.seq.size())) continue;   // more prompt to run
            const Backend::SpecOut& so = spec_out[i];
            if (!drafts[i].empty()) {
                std::lock_guard<std::mutex> lk(m_);
                metrics_.spec_drafts_total += drafts[i].size();
                metrics_.spec_accepted_total += so.tokens.size() - 1;
            }
            try {
                bool alive = true;
                for (size_t j = 0; j < so.tokens.size() && alive; ++j) {
                    const SampledToken& d = so.tokens[j];
                    if (d.id < 0) fail("the model produced no valid logit for this request");
                    if (j > 0) ++r.n_fed;   // the accepted draft is in the state too
                    TokenOut out;
                    out.id = d.id;
                    if (r.params.top_logprobs >= 0) {
                        out.logprob = d.logprob;
                        out.top = d.top;
                    }
                    alive = deliver(r, out);
                }
                if (alive) r.drafts = so.drafts;
            } catch (const std::exception& e) {
                finish(r, FinishReason::error, e.what());
            }
            continue;
        }
        maybe_snapshot(r);
        if (r.n_fed < static_cast<int64_t>(r.seq.size())) continue;   // more prompt (or recomputation) to run
        try {
            if (device) {
                const SampledToken& d = drawn[i];
                if (d.id < 0) fail("the model produced no valid logit for this request");
                TokenOut out;
                out.id = d.id;
                if (r.params.top_logprobs >= 0) {
                    out.logprob = d.logprob;
                    out.top = d.top;
                }
                deliver(r, out);
            } else {
                emit(r, logits.data() + static_cast<int64_t>(i) * V);
            }
        } catch (const std::exception& e) {
            finish(r, FinishReason::error, e.what());
        }
    }
    return true;
}

void Engine::emit(Request& r, float* row) {
    const int64_t V = model_->cfg.vocab_size;
    for (int32_t id : opt_.masked_token_ids) row[id] = -std::numeric_limits<float>::infinity();
    TokenOut out;
    out.id = r.sampler.sample(row, V, r.n_generated);   // the key: (seed, index of this token in the output)
    if (r.params.top_logprobs >= 0) {
        out.logprob = token_logprob(row, V, out.id);
        out.top = top_logprobs(row, V, r.params.top_logprobs);
        std::erase_if(out.top, [&](const auto& t) { return masked_[static_cast<size_t>(t.first)] != 0; });
    }
    deliver(r, out);
}

bool Engine::deliver(Request& r, const TokenOut& out) {
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
    if (!keep || stop) {
        finish(r, FinishReason::stop);
        return false;
    }
    if (length) {
        finish(r, FinishReason::length);
        return false;
    }
    r.seq.push_back(out.id);   // fed at the next step
    return true;
}

}  // namespace megamoe
