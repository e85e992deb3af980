// server.cpp — `megamoe serve`: an OpenAI-compatible HTTP server over the Engine.
//
// HTTP threads read, parse and validate a request, tokenize it, and submit one engine request
// per choice (n); the engine thread samples tokens and calls back into each choice's Session,
// which detokenizes, applies stop strings and queues text for the HTTP thread. Streaming
// responses are written as SSE from those queues. A client that goes away, streaming or not,
// cancels its requests and only those. Connection threads, header/body deadlines and the
// disconnect check come from connections.h. The server includes engine, chat and tokenizer
// headers only: it never sees tensors.
#include "server.h"

#include <httplib.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <ctime>
#include <deque>
#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <optional>
#include <thread>
#include <tuple>
#include <vector>

#include "connections.h"
#include "request.h"
#include "io/synth.h"
#include "serve/backends.h"
#include "serve/chat.h"
#include "serve/engine.h"
#include "serve/tokenizer.h"
#include "ref/speculative.h"

namespace megamoe {
namespace {

using json = nlohmann::ordered_json;

std::string dump(const json& j) { return dump_json(j); }

int64_t unix_now() {
    return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

void send_error(httplib::Response& res, const HttpError& e) {
    res.status = e.status;
    res.set_content(error_body(e), "application/json");
}

// Set by the pre-routing handler for the request its thread is serving: it needs a key and has
// none that is valid. Requests without a body are answered 401 there; routes check it after
// reading the body.
thread_local bool t_unauthorized = false;

void deny(httplib::Response& res) {
    res.set_header("WWW-Authenticate", "Bearer");
    send_error(res, unauthorized());
}

// ---- request bodies

// Reads the body through httplib's content reader, so that the limit holds for chunked bodies
// too (httplib 0.11 checks only Content-Length). Past the limit the rest is read and dropped,
// so the client gets its 413 on a connection still in step; the body deadline
// (connections.h) bounds how long that may take.
std::string read_body(httplib::Response& res, const httplib::ContentReader& reader, size_t limit) {
    std::string body;
    bool too_large = false;
    const bool ok = reader([&](const char* data, size_t len) {
        if (too_large || body.size() + len > limit) {
            if (!too_large) std::string().swap(body);
            too_large = true;
            return true;
        }
        body.append(data, len);
        return true;
    });
    if (too_large || res.status == 413)   // httplib sets 413 for a Content-Length over the limit
        throw HttpError{413, str("the request body is too large: over ", limit, " bytes (--max-body-bytes)"),
                        "invalid_request_error", "", ""};
    if (!ok) bad_request("the request body could not be read");
    return body;
}

// ---- one choice's life: engine callbacks -> queue -> HTTP thread

struct Piece {
    std::string text;                  // new text (after stop-string handling)
    std::optional<TokenOut> token;     // the token it came from, when logprobs are wanted
    std::string token_text;            // that token's own text
};

// The lock and signal shared by the choices of one request, so that its HTTP thread can wait
// for any of them.
struct Channel {
    std::mutex m;
    std::condition_variable cv;
};

class Session {
public:
    Session(const Tokenizer& tok, std::shared_ptr<Channel> ch, std::vector<std::string> stops, bool logprobs)
        : tok_(tok), ch_(std::move(ch)), dec_(tok, /*skip_special=*/true), stops_(std::move(stops)), logprobs_(logprobs) {
        for (const auto& s : stops_) hold_ = std::max(hold_, s.size());
    }

    // Engine thread: one token. Returns false when a stop string ended the text. Ids that name
    // no token are masked out of sampling (Engine: masked_token_ids); were one to come, it adds
    // no text and its logprobs entry shows an empty token.
    bool on_token(const TokenOut& t) {
        const bool known = tok_.has_token(t.id);
        const size_t before = text_.size();
        if (known) text_ += dec_.push(t.id);
        ++completion_tokens_;
        // A stop string that ends in the new text starts at most hold_ - 1 bytes before it.
        size_t cut = std::string::npos;
        for (const auto& s : stops_) {
            const size_t at = text_.find(s, before >= s.size() ? before - s.size() + 1 : 0);
            cut = std::min(cut, at);
        }
        if (cut != std::string::npos) {
            text_.resize(cut);
            stopped_by_string_ = true;
        }
        // Hold back a tail that may still turn into a stop string.
        size_t safe = text_.size();
        if (!stopped_by_string_ && hold_ > 1) safe = text_.size() > hold_ - 1 ? text_.size() - (hold_ - 1) : 0;
        while (safe > emitted_ && safe < text_.size() && (static_cast<unsigned char>(text_[safe]) & 0xC0) == 0x80)
            --safe;   // never split a UTF-8 character
        Piece p;
        if (safe > emitted_) {
            p.text = text_.substr(emitted_, safe - emitted_);
            emitted_ = safe;
        }
        if (logprobs_) {
            p.token = t;
            if (known) p.token_text = tok_.token_bytes(t.id);
        }
        std::lock_guard<std::mutex> lk(ch_->m);
        queue_.push_back(std::move(p));
        ch_->cv.notify_all();
        return !stopped_by_string_;
    }

    // Engine thread: the end. Whatever was held back is released.
    void on_finish(FinishReason why, const std::string& error) {
        if (!stopped_by_string_) text_ += dec_.flush();
        Piece p;
        if (text_.size() > emitted_) p.text = text_.substr(emitted_);
        emitted_ = text_.size();
        std::lock_guard<std::mutex> lk(ch_->m);
        if (!p.text.empty()) queue_.push_back(std::move(p));
        finished_ = true;
        reason_ = why;
        error_ = error;
        ch_->cv.notify_all();
    }

    // HTTP thread, with the channel's lock held.
    bool has_news() const { return !queue_.empty() || (finished_ && !ended_); }
    // Moves the queued pieces to `out`; returns true once, when the choice has finished and
    // everything it produced was taken.
    bool take(std::vector<Piece>& out) {
        out.insert(out.end(), std::make_move_iterator(queue_.begin()), std::make_move_iterator(queue_.end()));
        queue_.clear();
        if (!finished_ || ended_) return false;
        ended_ = true;
        return true;
    }

    // After the end was taken:
    FinishReason reason() const { return reason_; }
    const std::string& error() const { return error_; }
    int64_t completion_tokens() const { return completion_tokens_; }

private:
    const Tokenizer& tok_;
    std::shared_ptr<Channel> ch_;
    StreamDecoder dec_;
    std::vector<std::string> stops_;
    size_t hold_ = 0;
    bool logprobs_;
    std::string text_;
    size_t emitted_ = 0;
    bool stopped_by_string_ = false;
    std::atomic<int64_t> completion_tokens_{0};
    std::deque<Piece> queue_;          // under ch_->m from here on
    bool finished_ = false, ended_ = false;
    FinishReason reason_ = FinishReason::stop;
    std::string error_;
};

// ---- the server

class Server;

// A request being answered, from its submission until its response is written: counted, so
// that a shutdown lets it finish, and cancellable as a whole.
class Active {
public:
    // Counts `n` engine requests (the choices) in flight; throws the 503 once the server is
    // draining, and a 429 when they would pass --max-requests.
    Active(Server& s, int64_t n);
    ~Active();
    void add(uint64_t engine_id);

private:
    Server& s_;
    int64_t n_;
    std::vector<uint64_t> ids_;
};

// The choices of one request.
struct Reply {
    std::shared_ptr<Channel> ch = std::make_shared<Channel>();
    std::vector<std::shared_ptr<Session>> sessions;
    std::vector<uint64_t> ids;
    std::shared_ptr<Active> active;
    int64_t created = 0;

    // Waits up to `wait` for news from any choice, then moves each choice's pieces to got[i];
    // ended[i] is set once, when choice i finished and all of it was taken.
    void poll(std::vector<std::vector<Piece>>& got, std::vector<char>& ended, std::chrono::milliseconds wait) {
        got.assign(sessions.size(), {});
        ended.assign(sessions.size(), 0);
        std::unique_lock<std::mutex> lk(ch->m);
        ch->cv.wait_for(lk, wait, [&] {
            for (const auto& s : sessions)
                if (s->has_news()) return true;
            return false;
        });
        for (size_t i = 0; i < sessions.size(); ++i) ended[i] = sessions[i]->take(got[i]);
    }
    int64_t completion_tokens() const {
        int64_t n = 0;
        for (const auto& s : sessions) n += s->completion_tokens();
        return n;
    }
};

class Server {
public:
    explicit Server(const ServeOptions& o);

    int run();

private:
    friend class Active;
    void load();
    void load_synthetic(std::chrono::steady_clock::time_point t0);
    // The engine's and the backend's options from the flags (one place for both loaders).
    EngineOptions engine_options(const ModelConfig& cfg) const {
        EngineOptions eo;
        eo.max_batch_tokens = opt_.max_batch_tokens;
        eo.max_seqs = opt_.max_seqs;
        eo.max_model_len = opt_.max_model_len;
        eo.seed = opt_.seed;
        eo.prefix_caching = opt_.prefix_caching;
        eo.speculative_tokens = opt_.speculative_tokens;
        for (int64_t id = 0; id < cfg.vocab_size; ++id)
            if (!tok_->has_token(static_cast<int32_t>(id))) eo.masked_token_ids.push_back(static_cast<int32_t>(id));
        return eo;
    }
    BackendOptions backend_options() const {
        BackendOptions bo;
        bo.name = opt_.backend;
        bo.max_seqs = opt_.max_seqs;
        bo.max_batch_tokens = opt_.max_batch_tokens;
        bo.max_logit_rows = opt_.max_seqs * (1 + opt_.speculative_tokens);   // a verified sequence: 1 + drafts rows
        bo.speculative = opt_.speculative_tokens > 0;
        bo.max_model_len = opt_.max_model_len;
        bo.gpu_memory_fraction = opt_.gpu_memory_fraction;
        bo.max_state_tokens = opt_.max_state_tokens;
        bo.numerics = resolve_numerics(opt_.numerics, resolve_backend(opt_.backend));
        bo.cublaslt = opt_.cublaslt;
        bo.gpus = opt_.gpus;
        bo.partition = opt_.partition;
        bo.ep_exchange = opt_.ep_exchange;
        return bo;
    }
    void routes();
    RequestContext request_context() const;
    void handle(const httplib::Request& req, httplib::Response& res, const httplib::ContentReader& reader, bool chat);
    void respond_full(httplib::Response& res, const Parsed& p, std::shared_ptr<Reply> r);
    void respond_stream(httplib::Response& res, const Parsed& p, std::shared_ptr<Reply> r);
    std::string metrics_text() const;
    void watch_signals();
    void drain(int sig);
    void stop_http();

    ServeOptions opt_;
    Connections conns_;
    const std::vector<std::string> api_keys_;   // --api-key, --api-key-file; empty: no key needed
    std::atomic<bool> ready_{false};
    std::string model_name_;
    std::unique_ptr<Tokenizer> tok_;
    std::unique_ptr<Engine> engine_;
    SamplingParams defaults_;
    httplib::Server http_;
    const int64_t started_ = unix_now();   // /v1/models "created"

    // Shutdown. active_m_ guards the three below.
    std::mutex active_m_;
    std::condition_variable active_cv_;
    int64_t active_ = 0;                   // requests being answered
    int64_t active_choices_ = 0;           // their engine requests (one per choice), for --max-requests
    std::multiset<uint64_t> active_ids_;   // their engine ids
    bool draining_ = false;                // new requests get 503
    std::atomic<bool> cancelled_all_{false};   // the drain timed out: what runs was cancelled
    std::atomic<bool> stop_signals_{false}, listen_returned_{false}, signalled_{false};
    std::once_flag stop_once_;             // httplib's stop() must run once
};

Active::Active(Server& s, int64_t n) : s_(s), n_(n) {
    std::lock_guard<std::mutex> lk(s_.active_m_);
    if (s_.draining_) throw shutting_down();
    if (s_.active_choices_ + n > s_.opt_.max_requests)
        throw HttpError{429,
                        str("too many requests: ", s_.active_choices_, " running or waiting, and this one adds ", n,
                            " (choices); the server's limit is ", s_.opt_.max_requests, " (--max-requests)"),
                        "rate_limit_exceeded", "", "rate_limit_exceeded"};
    ++s_.active_;
    s_.active_choices_ += n;
}

Active::~Active() {
    std::lock_guard<std::mutex> lk(s_.active_m_);
    for (uint64_t id : ids_) s_.active_ids_.erase(s_.active_ids_.find(id));
    --s_.active_;
    s_.active_choices_ -= n_;
    s_.active_cv_.notify_all();
}

void Active::add(uint64_t id) {
    {
        std::lock_guard<std::mutex> lk(s_.active_m_);
        s_.active_ids_.insert(id);
        ids_.push_back(id);
    }
    if (s_.cancelled_all_) s_.engine_->cancel(id);
}

Server::Server(const ServeOptions& o)
    : opt_(o),
      conns_(ConnectionLimits{std::chrono::milliseconds(static_cast<int64_t>(o.header_timeout * 1000)),
                              std::chrono::milliseconds(static_cast<int64_t>(o.body_timeout * 1000)),
                              static_cast<size_t>(o.max_connections), o.max_header_bytes}),
      api_keys_(load_api_keys(o.api_keys, o.api_key_file)) {}

void Server::load() {
    auto t0 = std::chrono::steady_clock::now();
    // The cheap checks first: the tokenizer and the config, then the weights.
    std::string tok_path = opt_.tokenizer.empty() ? opt_.model_dir + "/tokenizer.json" : opt_.tokenizer;
    std::fprintf(stderr, "megamoe: loading %s\n", tok_path.c_str());
    tok_ = std::make_unique<Tokenizer>(Tokenizer::load(tok_path));
    if (!opt_.synthetic.empty()) {
        load_synthetic(t0);
        return;
    }
    const ModelConfig cfg = load_model_config(opt_.model_dir);
    if (tok_->vocab_size() > cfg.vocab_size)
        fail(tok_path, ": the tokenizer has ", tok_->vocab_size(), " ids but the model only ", cfg.vocab_size);
    defaults_ = load_generation_defaults(opt_.model_dir);
    EngineOptions eo = engine_options(cfg);
    if (!eo.masked_token_ids.empty())
        std::fprintf(stderr, "megamoe: %zu of the model's %ld token ids name no token in the tokenizer: never sampled\n",
                     eo.masked_token_ids.size(), cfg.vocab_size);
    std::fprintf(stderr, "megamoe: loading %s\n", opt_.model_dir.c_str());
    auto model = Model::load(opt_.model_dir, [](size_t done, size_t total) {
        std::fprintf(stderr, "\rmegamoe: binding tensors %zu/%zu (%3zu%%)", done, total, total ? done * 100 / total : 100);
        if (done == total) std::fprintf(stderr, "\n");
    });
    if (model->cfg.vocab_size != cfg.vocab_size) fail(opt_.model_dir, "/config.json changed while loading");
    model->numerics = resolve_numerics(opt_.numerics, resolve_backend(opt_.backend));
    const BackendOptions bo = backend_options();
    std::ostringstream plan;
    auto backend = make_backend(*model, bo, &plan);
    if (!plan.str().empty()) std::fprintf(stderr, "%s", plan.str().c_str());
    std::fprintf(stderr, "megamoe: backend %s\n", backend->name().c_str());
    engine_ = std::make_unique<Engine>(std::move(model), std::move(backend), eo);
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "megamoe: ready in %.1f s, serving '%s' (context %ld tokens)\n", sec, model_name_.c_str(),
                 engine_->max_model_len());
    ready_ = true;
}

// Random weights on the GPU for a preset's config (megamoe-serve-bench against a full-width model
// that has no checkpoint on disk). The engine sees the config only; the GPU runner synthesizes.
void Server::load_synthetic(std::chrono::steady_clock::time_point t0) {
    SynthOptions so;
    so.preset = opt_.synthetic;
    so.layers = opt_.synthetic_layers;
    so.seed = opt_.seed;
    auto model = std::make_unique<Model>();
    model->cfg = synth_config(so);
    const ModelConfig& cfg = model->cfg;
    if (tok_->vocab_size() > cfg.vocab_size)
        fail("--tokenizer has ", tok_->vocab_size(), " ids but the synthetic model only ", cfg.vocab_size);
    EngineOptions eo = engine_options(cfg);
    const BackendOptions bo = backend_options();
    std::ostringstream plan;
    auto backend = make_synthetic_backend(cfg, opt_.seed, bo, &plan);
    std::fprintf(stderr, "%s", plan.str().c_str());
    std::fprintf(stderr, "megamoe: backend %s, synthetic %s weights (%ld layers, random: for benchmarks only)\n",
                 backend->name().c_str(), opt_.synthetic.c_str(), cfg.num_hidden_layers);
    engine_ = std::make_unique<Engine>(std::move(model), std::move(backend), eo);
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "megamoe: ready in %.1f s, serving '%s' (context %ld tokens)\n", sec, model_name_.c_str(),
                 engine_->max_model_len());
    ready_ = true;
}

json usage_json(int64_t prompt, int64_t completion) {
    return {{"prompt_tokens", prompt}, {"completion_tokens", completion}, {"total_tokens", prompt + completion}};
}

std::vector<int> utf8_bytes(const std::string& t) {   // OpenAI's "bytes": the UTF-8 bytes as 0..255
    std::vector<int> b;
    for (unsigned char ch : t) b.push_back(ch);
    return b;
}

// top_logprobs never holds an id without a token (the engine masks them); the check is a guard.
json token_logprob_json(const Tokenizer& tok, const Piece& p) {
    json top = json::array();
    for (const auto& [id, lp] : p.token->top) {
        if (!tok.has_token(id)) continue;
        const std::string t = utf8_lossy(tok.token_bytes(id));
        top.push_back({{"token", t}, {"logprob", lp}, {"bytes", utf8_bytes(t)}});
    }
    const std::string t = utf8_lossy(p.token_text);
    return {{"token", t}, {"logprob", p.token->logprob}, {"bytes", utf8_bytes(t)},
            {"top_logprobs", top}};
}

json completion_top_json(const Tokenizer& tok, const Piece& p) {   // /v1/completions: {token: logprob}
    json top = json::object();
    for (const auto& [id, lp] : p.token->top)
        if (tok.has_token(id)) top[utf8_lossy(tok.token_bytes(id))] = lp;
    return top;
}

std::string finish_name(FinishReason r, bool tool_calls) {
    if (tool_calls && r == FinishReason::stop) return "tool_calls";
    return r == FinishReason::length ? "length" : "stop";
}

json tool_calls_json(const std::vector<ToolCall>& calls, size_t first_index, uint64_t req_id) {
    json out = json::array();
    for (size_t i = 0; i < calls.size(); ++i) {
        out.push_back({{"index", first_index + i},
                       {"id", str("call_", req_id, "_", first_index + i)},
                       {"type", "function"},
                       {"function", {{"name", calls[i].name}, {"arguments", calls[i].arguments}}}});
    }
    return out;
}

// The error a finished choice reports, if any: an engine error, or a cancellation while the
// client is still there, which only the shutdown does.
std::optional<HttpError> choice_error(const Session& s) {
    if (s.reason() == FinishReason::error) return HttpError{500, s.error(), "server_error", "", ""};
    if (s.reason() == FinishReason::cancelled) return shutting_down();
    return std::nullopt;
}

RequestContext Server::request_context() const {
    RequestContext c;
    c.tok = tok_.get();
    c.model_name = model_name_;
    c.defaults = defaults_;
    c.vocab_size = engine_->config().vocab_size;
    c.max_model_len = engine_->max_model_len();
    c.limits.max_prompt_tokens = opt_.max_prompt_tokens;
    c.limits.max_completion_tokens = opt_.max_completion_tokens;
    c.limits.max_json_depth = opt_.max_json_depth;
    return c;
}

void Server::handle(const httplib::Request&, httplib::Response& res, const httplib::ContentReader& reader, bool chat) {
    try {
        const std::string text = read_body(res, reader, static_cast<size_t>(opt_.max_body_bytes));
        Connections::body_read();
        if (t_unauthorized) throw unauthorized();
        {
            std::lock_guard<std::mutex> lk(active_m_);
            if (draining_) throw shutting_down();
        }
        if (!ready_) throw HttpError{503, "the model is still loading", "service_unavailable", "", ""};
        Parsed p = parse_request(request_context(), text, chat);
        auto r = std::make_shared<Reply>();
        r->created = unix_now();
        r->active = std::make_shared<Active>(*this, p.n);
        // n choices: each its own sequence over the same prompt; with a seed, choice i uses seed + i.
        for (int i = 0; i < p.n; ++i) {
            auto session = std::make_shared<Session>(*tok_, r->ch, p.stops, p.logprobs >= 0);
            GenerationParams g = p.gen;
            if (g.sampling.seed) g.sampling.seed = *g.sampling.seed + static_cast<uint64_t>(i);
            RequestCallbacks cb;
            cb.on_token = [session](const TokenOut& t) { return session->on_token(t); };
            cb.on_finish = [session](FinishReason why, const std::string& e) { session->on_finish(why, e); };
            try {
                r->ids.push_back(engine_->submit(p.prompt, g, cb));
            } catch (const Error& e) {
                for (uint64_t id : r->ids) engine_->cancel(id);
                bad_request(e.what(), chat ? "messages" : "prompt");
            }
            r->sessions.push_back(std::move(session));
            r->active->add(r->ids.back());
        }
        if (p.stream)
            respond_stream(res, p, r);
        else
            respond_full(res, p, r);
    } catch (const HttpError& e) {
        send_error(res, e);
    } catch (const std::exception& e) {
        send_error(res, HttpError{500, e.what(), "server_error", "", ""});
    }
}

void Server::respond_full(httplib::Response& res, const Parsed& p, std::shared_ptr<Reply> r) {
    struct Acc {
        std::string text;
        json lp_content = json::array();
        json lp_tokens = json::array(), lp_values = json::array(), lp_top = json::array(), lp_offsets = json::array();
    };
    const size_t n = r->sessions.size();
    std::vector<Acc> acc(n);
    std::vector<std::vector<Piece>> got;
    std::vector<char> ended;
    size_t n_ended = 0;
    bool gone = false;
    while (n_ended < n) {
        r->poll(got, ended, std::chrono::milliseconds(100));
        for (size_t i = 0; i < n; ++i) {
            Acc& a = acc[i];
            for (const auto& pc : got[i]) {
                if (pc.token && p.chat) a.lp_content.push_back(token_logprob_json(*tok_, pc));
                if (pc.token && !p.chat) {
                    a.lp_offsets.push_back(a.text.size());
                    a.lp_tokens.push_back(utf8_lossy(pc.token_text));
                    a.lp_values.push_back(pc.token->logprob);
                    a.lp_top.push_back(completion_top_json(*tok_, pc));
                }
                a.text += pc.text;
            }
            n_ended += ended[i] != 0;
        }
        // A client that hung up gets nothing: stop generating for it.
        if (n_ended < n && !gone && Connections::client_gone()) {
            gone = true;
            for (uint64_t id : r->ids) engine_->cancel(id);
        }
    }
    if (gone) {
        send_error(res, HttpError{499, "the client closed the connection", "invalid_request_error", "", ""});
        return;
    }
    for (const auto& s : r->sessions)
        if (auto e = choice_error(*s)) throw *e;
    const int64_t P = static_cast<int64_t>(p.prompt.size());
    json choices = json::array();
    for (size_t i = 0; i < n; ++i) {
        const Session& s = *r->sessions[i];
        Acc& a = acc[i];
        if (p.chat) {
            ParsedCompletion pc = megamoe::parse_completion(a.text, p.thinking);
            json msg = {{"role", "assistant"}, {"content", pc.content}};
            if (p.thinking) msg["reasoning_content"] = pc.reasoning_content;
            if (pc.has_tool_calls()) msg["tool_calls"] = tool_calls_json(pc.tool_calls, 0, r->ids[i]);
            choices.push_back({{"index", i}, {"message", msg},
                               {"logprobs", p.logprobs >= 0 ? json{{"content", a.lp_content}} : json(nullptr)},
                               {"finish_reason", finish_name(s.reason(), pc.has_tool_calls())}});
        } else {
            json lp = p.logprobs >= 0 ? json{{"tokens", a.lp_tokens}, {"token_logprobs", a.lp_values},
                                             {"top_logprobs", a.lp_top}, {"text_offset", a.lp_offsets}}
                                      : json(nullptr);
            choices.push_back({{"index", i}, {"text", a.text}, {"logprobs", lp},
                               {"finish_reason", finish_name(s.reason(), false)}});
        }
    }
    json out = {{"id", str(p.chat ? "chatcmpl-" : "cmpl-", r->ids[0])},
                {"object", p.chat ? "chat.completion" : "text_completion"},
                {"created", r->created},
                {"model", model_name_},
                {"choices", choices},
                {"usage", usage_json(P, r->completion_tokens())}};   // the prompt once, every choice's tokens
    // Written by a provider so that the request counts as running until its response is out
    // (the releaser holds it): the shutdown waits for that.
    auto text = std::make_shared<std::string>(dump(out));
    auto active = r->active;
    res.set_content_provider(
        text->size(), "application/json",
        [text](size_t offset, size_t length, httplib::DataSink& sink) { return sink.write(text->data() + offset, length); },
        [active](bool) {});
}

void Server::respond_stream(httplib::Response& res, const Parsed& p, std::shared_ptr<Reply> r) {
    struct Choice {
        size_t tool_index = 0;
        size_t text_offset = 0;   // completions logprobs: where each token's text starts
        std::unique_ptr<ChatStreamParser> parser;
    };
    struct StreamState {
        bool started = false;
        bool done = false;
        bool failed = false;      // an error event was sent; the other choices are cancelled
        size_t n_ended = 0;
        std::vector<Choice> choices;
    };
    const size_t n = r->sessions.size();
    auto st = std::make_shared<StreamState>();
    st->choices.resize(n);
    if (p.chat)
        for (auto& c : st->choices) c.parser = std::make_unique<ChatStreamParser>(p.thinking);
    const std::string rid = str(p.chat ? "chatcmpl-" : "cmpl-", r->ids[0]);
    const int64_t P = static_cast<int64_t>(p.prompt.size());
    Engine* engine = engine_.get();
    const Tokenizer* tok = tok_.get();
    const std::string model = model_name_;
    const int64_t created = r->created;
    const char* object = p.chat ? "chat.completion.chunk" : "text_completion";

    auto chunk = [=](json choice) {
        json c = {{"id", rid}, {"object", object}, {"created", created}, {"model", model},
                  {"choices", json::array({std::move(choice)})}};
        return "data: " + dump(c) + "\n\n";
    };
    auto delta_choice = [=](size_t i, json delta, json logprobs, json finish) {
        if (p.chat) return json{{"index", i}, {"delta", delta}, {"logprobs", logprobs}, {"finish_reason", finish}};
        return json{{"index", i}, {"text", delta.value("content", "")}, {"logprobs", logprobs}, {"finish_reason", finish}};
    };
    auto add_chat_delta = [](json& delta, const ChatDelta& d, Choice& c, uint64_t id) {
        if (!d.reasoning_content.empty()) delta["reasoning_content"] = d.reasoning_content;
        if (!d.content.empty()) delta["content"] = d.content;
        if (!d.tool_calls.empty()) {
            delta["tool_calls"] = tool_calls_json(d.tool_calls, c.tool_index, id);
            c.tool_index += d.tool_calls.size();
        }
    };
    auto cancel_all = [r, engine] {
        for (uint64_t id : r->ids) engine->cancel(id);
    };

    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [=](size_t, httplib::DataSink& sink) {
            if (st->done) return false;
            std::string out;
            if (p.chat && !st->started)
                for (size_t i = 0; i < n; ++i)
                    out += chunk(delta_choice(i, {{"role", "assistant"}, {"content", ""}}, nullptr, nullptr));
            st->started = true;
            std::vector<std::vector<Piece>> got;
            std::vector<char> ended;
            r->poll(got, ended, std::chrono::milliseconds(100));
            for (size_t i = 0; i < n; ++i) {
                Choice& c = st->choices[i];
                for (const auto& pc : got[i]) {
                    if (st->failed) break;
                    json lp = nullptr;
                    if (pc.token && p.chat) lp = json{{"content", json::array({token_logprob_json(*tok, pc)})}};
                    if (pc.token && !p.chat)
                        lp = {{"tokens", {utf8_lossy(pc.token_text)}}, {"token_logprobs", {pc.token->logprob}},
                              {"top_logprobs", {completion_top_json(*tok, pc)}}, {"text_offset", {c.text_offset}}};
                    c.text_offset += pc.text.size();
                    if (!p.chat) {
                        if (!pc.text.empty() || pc.token) out += chunk(delta_choice(i, {{"content", pc.text}}, lp, nullptr));
                        continue;
                    }
                    json delta = json::object();
                    add_chat_delta(delta, c.parser->push(pc.text), c, r->ids[i]);
                    if (!delta.empty() || pc.token) out += chunk(delta_choice(i, delta, lp, nullptr));
                }
                if (!ended[i]) continue;
                ++st->n_ended;
                if (st->failed) continue;
                const Session& s = *r->sessions[i];
                if (auto e = choice_error(s)) {
                    out += "data: " + error_body(*e) + "\n\n";
                    st->failed = true;
                    cancel_all();   // the other choices end too
                    continue;
                }
                json delta = json::object();
                if (p.chat) add_chat_delta(delta, c.parser->finish(), c, r->ids[i]);
                out += chunk(delta_choice(i, delta, nullptr, finish_name(s.reason(), c.tool_index > 0)));
            }
            if (st->n_ended == n) {
                if (p.include_usage && !st->failed) {
                    json u = {{"id", rid}, {"object", object}, {"created", created}, {"model", model},
                              {"choices", json::array()}, {"usage", usage_json(P, r->completion_tokens())}};
                    out += "data: " + dump(u) + "\n\n";
                }
                out += "data: [DONE]\n\n";
                st->done = true;
            }
            if (out.empty()) {   // nothing new: check that someone still listens
                if (!Connections::client_gone()) return true;
                cancel_all();
                return false;
            }
            if (!sink.write(out.data(), out.size())) {
                cancel_all();   // the client is gone
                return false;
            }
            if (st->done) sink.done();
            return true;
        },
        [=](bool success) {
            if (!success || !st->done) cancel_all();
            Connections::stream_ended();
        });
}

std::string Server::metrics_text() const {
    std::ostringstream o;
    auto counter = [&](const char* name, const char* help, double v) {
        o << "# HELP " << name << " " << help << "\n# TYPE " << name << " counter\n" << name << " " << v << "\n";
    };
    auto gauge = [&](const char* name, const char* help, double v) {
        o << "# HELP " << name << " " << help << "\n# TYPE " << name << " gauge\n" << name << " " << v << "\n";
    };
    auto histogram = [&](const char* name, const char* help, const Histogram& h) {
        o << "# HELP " << name << " " << help << "\n# TYPE " << name << " histogram\n";
        for (size_t i = 0; i < h.bounds.size(); ++i) o << name << "_bucket{le=\"" << h.bounds[i] << "\"} " << h.counts[i] << "\n";
        o << name << "_bucket{le=\"+Inf\"} " << h.count << "\n" << name << "_sum " << h.sum << "\n" << name << "_count " << h.count << "\n";
    };
    if (!ready_) {
        gauge("megamoe_ready", "1 once the model is loaded", 0);
        return o.str();
    }
    const EngineMetrics m = engine_->metrics();
    gauge("megamoe_ready", "1 once the model is loaded", 1);
    counter("megamoe_requests_total", "requests accepted", static_cast<double>(m.requests_total));
    counter("megamoe_prompt_tokens_total", "prompt tokens accepted", static_cast<double>(m.prompt_tokens_total));
    counter("megamoe_generation_tokens_total", "tokens generated", static_cast<double>(m.generation_tokens_total));
    gauge("megamoe_num_requests_running", "requests in the running batch", static_cast<double>(m.running));
    gauge("megamoe_num_requests_waiting", "requests waiting to run", static_cast<double>(m.waiting));
    gauge("megamoe_cache_usage", "state pool blocks held (running sequences and prefix snapshots) / all", m.cache_usage);
    counter("megamoe_num_preemptions_total", "running requests whose state was dropped for room (recomputed later)",
            static_cast<double>(m.preemptions_total));
    counter("megamoe_prefix_cache_queries_total", "prompt tokens looked up in the prefix cache",
            static_cast<double>(m.prefix_queries_tokens));
    counter("megamoe_prefix_cache_hits_total", "prompt tokens found in the prefix cache (not computed again)",
            static_cast<double>(m.prefix_hits_tokens));
    counter("megamoe_prefix_cache_hit_requests_total", "requests that started from a prefix snapshot",
            static_cast<double>(m.prefix_hit_requests));
    gauge("megamoe_prefix_cache_entries", "prefix snapshots held", static_cast<double>(m.prefix_entries));
    counter("megamoe_spec_decode_num_drafts_total", "speculative decoding: drafts verified",
            static_cast<double>(m.spec_drafts_total));
    counter("megamoe_spec_decode_num_accepted_tokens_total", "speculative decoding: drafts accepted",
            static_cast<double>(m.spec_accepted_total));
    const Connections::Cuts& cuts = conns_.cuts();
    o << "# HELP megamoe_connections_cut_total connections closed by the server for passing a limit, by limit\n"
         "# TYPE megamoe_connections_cut_total counter\n"
         "megamoe_connections_cut_total{limit=\"header_timeout\"} " << cuts.header_timeout.load() << "\n"
         "megamoe_connections_cut_total{limit=\"header_bytes\"} " << cuts.header_bytes.load() << "\n"
         "megamoe_connections_cut_total{limit=\"body_timeout\"} " << cuts.body_timeout.load() << "\n";
    o << "# HELP megamoe_requests_finished_total engine requests finished (one per choice), by reason\n"
         "# TYPE megamoe_requests_finished_total counter\n";
    for (FinishReason r : {FinishReason::stop, FinishReason::length, FinishReason::cancelled, FinishReason::error})
        o << "megamoe_requests_finished_total{reason=\"" << finish_reason_name(r) << "\"} "
          << static_cast<double>(m.finished_total[static_cast<size_t>(r)]) << "\n";
    histogram("megamoe_time_to_first_token_seconds", "time from arrival to the first token", m.ttft);
    histogram("megamoe_time_per_output_token_seconds", "time between consecutive tokens", m.tpot);
    return o.str();
}

void Server::routes() {
    http_.new_task_queue = [this] { return conns_.make_queue(); };
    http_.set_payload_max_length(static_cast<size_t>(opt_.max_body_bytes));
    // Each read waits at most the header timeout; the deadlines of whole headers and bodies are
    // kept by conns_. An idle keep-alive connection waits as long for its next request.
    const auto read_us = static_cast<int64_t>(opt_.header_timeout * 1e6);
    http_.set_read_timeout(read_us / 1000000, read_us % 1000000);
    http_.set_write_timeout(30, 0);
    http_.set_keep_alive_timeout(std::max<time_t>(1, static_cast<time_t>(std::ceil(opt_.header_timeout))));
    http_.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
        Connections::headers_read();
        // Who may ask, and which methods are served: decided before any body is read.
        const auto refused = check_request_head(req.method, req.path, req.get_header_value("Authorization"), api_keys_,
                                                opt_.private_metrics);
        t_unauthorized = refused && refused->status == 401;
        if (!refused) return httplib::Server::HandlerResponse::Unhandled;
        const bool body = req.has_header("Transfer-Encoding") ||
                          (req.has_header("Content-Length") && req.get_header_value("Content-Length") != "0");
        if (t_unauthorized && body && req.method != "PRI") {
            // The route reads the body (within --max-body-bytes and --body-timeout), so that the
            // connection stays in step, then answers 401.
            return httplib::Server::HandlerResponse::Unhandled;
        }
        if (t_unauthorized)
            deny(res);
        else
            send_error(res, *refused);
        return httplib::Server::HandlerResponse::Handled;
    });
    http_.set_post_routing_handler([](const httplib::Request&, httplib::Response& res) {
        Connections::response_ready(res.is_chunked_content_provider_);
    });
    http_.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
        if (!res.body.empty() || res.content_provider_) return;
        std::string msg = res.status == 413 ? "the request body is too large"
                        : res.status == 404 ? str("no such endpoint: ", req.method, " ", req.path)
                                            : str("HTTP error ", res.status);
        res.set_content(error_body(HttpError{res.status, msg, res.status == 404 ? "NotFoundError" : "invalid_request_error",
                                             "", ""}),
                        "application/json");
    });
    http_.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
        bool draining;
        {
            std::lock_guard<std::mutex> lk(active_m_);
            draining = draining_;
        }
        res.status = ready_ && !draining ? 200 : 503;
        res.set_content(draining ? "{\"status\":\"draining\"}" : ready_ ? "{\"status\":\"ok\"}" : "{\"status\":\"loading\"}",
                        "application/json");
    });
    http_.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
        if (t_unauthorized) return deny(res);
        res.set_content(metrics_text(), "text/plain; version=0.0.4");
    });
    http_.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
        if (t_unauthorized) return deny(res);
        json data = json::array();
        if (ready_)
            data.push_back({{"id", model_name_}, {"object", "model"}, {"created", started_}, {"owned_by", "megamoe"},
                            {"max_model_len", engine_->max_model_len()}});
        res.set_content(dump(json{{"object", "list"}, {"data", data}}), "application/json");
    });
    http_.Post("/v1/chat/completions", [this](const httplib::Request& q, httplib::Response& r, const httplib::ContentReader& c) {
        handle(q, r, c, true);
    });
    http_.Post("/v1/completions", [this](const httplib::Request& q, httplib::Response& r, const httplib::ContentReader& c) {
        handle(q, r, c, false);
    });
    // Everything else: 405 on a known path with the wrong method (as vLLM), else 404. A body is
    // read first (within --max-body-bytes) so that the connection stays in step.
    auto not_routed = [](const httplib::Request& req, httplib::Response& res) {
        if (t_unauthorized) return deny(res);
        static const std::set<std::string> post = {"/v1/chat/completions", "/v1/completions"},
                                           get = {"/health", "/metrics", "/v1/models"};
        if (post.count(req.path) || get.count(req.path)) {
            const char* allow = post.count(req.path) ? "POST" : "GET, HEAD";
            res.set_header("Allow", allow);
            send_error(res, HttpError{405, str("method ", req.method, " is not allowed on ", req.path, " (allowed: ", allow, ")"),
                                      "invalid_request_error", "", "method_not_allowed"});
        } else {
            send_error(res, HttpError{404, str("no such endpoint: ", req.method, " ", req.path), "NotFoundError", "", ""});
        }
    };
    auto with_body = [this, not_routed](const httplib::Request& req, httplib::Response& res, const httplib::ContentReader& c) {
        try {
            read_body(res, c, static_cast<size_t>(opt_.max_body_bytes));
        } catch (const HttpError& e) {
            send_error(res, e);
            return;
        }
        if (t_unauthorized) return deny(res);
        not_routed(req, res);
    };
    for (const char* path : {"/v1/chat/completions", "/v1/completions"}) http_.Get(path, not_routed);
    http_.Options(".*", not_routed);
    http_.Post(".*", with_body);
    http_.Put(".*", with_body);
    http_.Patch(".*", with_body);
    http_.Delete(".*", with_body);
}

// Debian's compiled cpp-httplib listens with a backlog of 5 (CPPHTTPLIB_LISTEN_BACKLOG is fixed
// inside the shared library): 32 clients connecting at once overflow the accept queue and some
// connections are reset. listen() again on the bound socket raises the backlog; the socket is
// found as the one listening on our port.
void raise_listen_backlog(int port) {
    for (int fd = 3; fd < 1024; ++fd) {
        int listening = 0;
        socklen_t len = sizeof listening;
        sockaddr_storage addr{};
        socklen_t alen = sizeof addr;
        if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 || !listening) continue;
        if (getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &alen) != 0) continue;
        const int p = addr.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port)
                                                 : ntohs(reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
        if (p == port) listen(fd, SOMAXCONN);
    }
}

// Each connection holds a descriptor (two: httplib's and the watchdog's duplicate); lift the
// soft limit, often 1024, to the hard one.
void raise_fd_limit() {
    rlimit r{};
    if (getrlimit(RLIMIT_NOFILE, &r) != 0) return;
    const rlim_t want = r.rlim_max == RLIM_INFINITY ? rlim_t{1} << 16 : r.rlim_max;
    if (r.rlim_cur < want) {
        r.rlim_cur = want;
        setrlimit(RLIMIT_NOFILE, &r);
    }
}

// 127.0.0.0/8, ::1 and "localhost": only this machine can connect.
bool is_loopback(const std::string& host) {
    return host == "localhost" || host == "::1" || host == "[::1]" || host.rfind("127.", 0) == 0;
}

sigset_t shutdown_signals() {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    return set;
}

void Server::stop_http() {
    std::call_once(stop_once_, [this] {
        // stop() acts once listen_after_bind() runs: wait for that (or for it to have ended).
        while (!http_.is_running() && !listen_returned_) std::this_thread::sleep_for(std::chrono::milliseconds(5));
        http_.stop();
    });
}

void Server::watch_signals() {
    const sigset_t set = shutdown_signals();
    const timespec tick{0, 100 * 1000 * 1000};
    while (!stop_signals_) {
        const int sig = sigtimedwait(&set, nullptr, &tick);
        if (sig == SIGTERM || sig == SIGINT) {
            drain(sig);
            return;
        }
    }
}

// Refuses new requests, lets the running ones finish for up to --drain-timeout, then cancels
// what is left (its clients get an error event or a 503) and stops listening. A second signal
// cuts the wait short.
void Server::drain(int sig) {
    signalled_ = true;
    int64_t running = 0;
    {
        std::lock_guard<std::mutex> lk(active_m_);
        draining_ = true;
        running = active_;
    }
    std::fprintf(stderr, "megamoe: %s: refusing new requests; %ld running may take up to %g s to finish (a second signal stops at once)\n",
                 sig == SIGTERM ? "SIGTERM" : "SIGINT", running, opt_.drain_timeout);
    const sigset_t set = shutdown_signals();
    const timespec now_only{0, 0};
    bool again = false;
    auto wait_idle = [&](std::chrono::steady_clock::time_point until) {
        for (;;) {
            {
                std::unique_lock<std::mutex> lk(active_m_);
                if (active_cv_.wait_for(lk, std::chrono::milliseconds(50), [&] { return active_ == 0; })) return true;
            }
            if (again || std::chrono::steady_clock::now() >= until) return false;
            if (sigtimedwait(&set, nullptr, &now_only) > 0) again = true;
        }
    };
    const auto t0 = std::chrono::steady_clock::now();
    if (!wait_idle(t0 + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(opt_.drain_timeout)))) {
        cancelled_all_ = true;
        std::vector<uint64_t> ids;
        {
            std::lock_guard<std::mutex> lk(active_m_);
            ids.assign(active_ids_.begin(), active_ids_.end());
        }
        std::fprintf(stderr, "megamoe: cancelling what still runs\n");
        if (ready_)
            for (uint64_t id : ids) engine_->cancel(id);
        if (!again) wait_idle(std::chrono::steady_clock::now() + std::chrono::seconds(5));
    }
    stop_http();
}

int Server::run() {
    model_name_ = !opt_.served_model_name.empty() ? opt_.served_model_name
                  : !opt_.synthetic.empty()         ? "synthetic-" + opt_.synthetic
                                                    : std::filesystem::path(opt_.model_dir).lexically_normal().filename().string();
    if (model_name_.empty() || model_name_ == ".") model_name_ = "megamoe";
    routes();
    int port = opt_.port;
    if (port == 0)
        port = http_.bind_to_any_port(opt_.host);
    else if (!http_.bind_to_port(opt_.host, port))
        port = -1;
    if (port <= 0) fail("cannot listen on ", opt_.host, ":", opt_.port);
    conns_.set_port(port);
    raise_listen_backlog(port);
    std::fprintf(stderr, "megamoe: listening on http://%s:%d (health 503 until loaded)\n", opt_.host.c_str(), port);
    if (api_keys_.empty() && !is_loopback(opt_.host))
        std::fprintf(stderr, "megamoe: WARNING: listening on %s, not a loopback address, without an API key: anyone who "
                             "can reach this port can use the model (pass --api-key KEY or --api-key-file FILE)\n",
                     opt_.host.c_str());
    std::thread signals([this] { watch_signals(); });
    // Load in the background so /health answers 503 meanwhile.
    std::string load_error;
    std::atomic<bool> load_done{false};
    std::thread loader([&] {
        try {
            load();
        } catch (const std::exception& e) {
            load_error = e.what();
        }
        load_done = true;
        if (!load_error.empty()) stop_http();
    });
    http_.listen_after_bind();
    listen_returned_ = true;
    stop_signals_ = true;
    signals.join();
    if (signalled_ && !load_done) {   // stopped while loading, which cannot be interrupted
        std::fprintf(stderr, "megamoe: stopped while loading\n");
        std::_Exit(0);
    }
    loader.join();
    if (!load_error.empty()) fail(load_error);
    engine_.reset();
    std::fprintf(stderr, "megamoe: stopped\n");
    return 0;
}

}  // namespace

void validate(const ServeOptions& o) {
    if (o.numerics != "auto" && o.numerics != "exact" && o.numerics != "official")
        fail("--numerics must be exact, official or auto, got '", o.numerics, "'");
    {
        BackendOptions bo;
        bo.gpus = o.gpus;
        bo.partition = o.partition;
        bo.ep_exchange = o.ep_exchange;
        bo.speculative = o.speculative_tokens > 0;
        check_gpus(bo, o.gpus == 1 ? std::string("cpu") : resolve_backend(o.backend));   // one GPU: names only
    }
    if (o.synthetic.empty() && o.model_dir.empty()) fail("--model: a checkpoint directory is required");
    if (!o.synthetic.empty()) {
        if (!o.model_dir.empty()) fail("--synthetic and --model exclude each other");
        if (o.synthetic != "flash" && o.synthetic != "pro" && o.synthetic != "tiny")
            fail("--synthetic must be tiny, flash or pro, got '", o.synthetic, "'");
        if (o.tokenizer.empty()) fail("--synthetic needs --tokenizer (there is no checkpoint directory to find one in)");
        if (o.synthetic_layers == 0 || o.synthetic_layers < -1) fail("--synthetic-layers must be >= 1, got ", o.synthetic_layers);
    }
    if (o.port < 0 || o.port > 65535) fail("--port must be in 1..65535 (0: any free port), got ", o.port);
    if (o.max_model_len < 0) fail("--max-model-len must be >= 0 (0: the model's context), got ", o.max_model_len);
    if (o.max_batch_tokens < 1 || o.max_batch_tokens > (int64_t{1} << 20))
        fail("--max-batch-tokens must be in 1..1048576, got ", o.max_batch_tokens);
    if (o.max_seqs < 1 || o.max_seqs > 65536) fail("--max-seqs must be in 1..65536, got ", o.max_seqs);
    if (o.max_state_tokens < 0) fail("--max-state-tokens must be >= 0, got ", o.max_state_tokens);
    if (o.speculative_tokens < 0 || o.speculative_tokens > kMaxSpeculativeTokens)
        fail("--speculative-tokens must be in 0..", kMaxSpeculativeTokens, ", got ", o.speculative_tokens);
    if (o.max_body_bytes < 1) fail("--max-body-bytes must be >= 1, got ", o.max_body_bytes);
    if (o.max_connections < 1 || o.max_connections > 65536)
        fail("--max-connections must be in 1..65536, got ", o.max_connections);
    if (o.max_header_bytes < 1024 || o.max_header_bytes > (int64_t{1} << 30))
        fail("--max-header-bytes must be in 1024..1073741824, got ", o.max_header_bytes);
    if (o.max_prompt_tokens < 0) fail("--max-prompt-tokens must be >= 0 (0: the context length), got ", o.max_prompt_tokens);
    if (o.max_completion_tokens < 0)
        fail("--max-completion-tokens must be >= 0 (0: the context length), got ", o.max_completion_tokens);
    if (o.max_requests < 1 || o.max_requests > (int64_t{1} << 20))
        fail("--max-requests must be in 1..1048576, got ", o.max_requests);
    if (o.max_json_depth < 1 || o.max_json_depth > static_cast<int64_t>(kMaxJsonDepth))
        fail("--max-json-depth must be in 1..", kMaxJsonDepth, ", got ", o.max_json_depth);
    load_api_keys(o.api_keys, o.api_key_file);   // an unreadable or empty key file, before anything else
    for (const auto& [flag, v, low] : {std::tuple{"--header-timeout", o.header_timeout, 0.1},
                                       std::tuple{"--body-timeout", o.body_timeout, 0.1},
                                       std::tuple{"--drain-timeout", o.drain_timeout, 0.0}})
        if (!(v >= low && v <= 86400)) fail(flag, " must be in [", low, ", 86400] seconds, got ", v);
    if (!(o.gpu_memory_fraction > 0 && o.gpu_memory_fraction <= 1))
        fail("--gpu-memory-fraction must be in (0, 1], got ", o.gpu_memory_fraction);
    const std::string backend = resolve_backend(o.backend);   // an unknown backend, or cuda without a GPU
    if (!o.synthetic.empty() && backend != "cuda")
        fail("--synthetic: random weights are made on the GPU; the ", backend, " backend has none (use --backend cuda)");
}

void block_shutdown_signals() {
    const sigset_t set = shutdown_signals();
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

int serve(const ServeOptions& opt) {
    validate(opt);
    block_shutdown_signals();
    // What can be checked without reading: before the port is bound.
    if (opt.synthetic.empty() && !std::filesystem::exists(opt.model_dir + "/config.json"))
        fail(opt.model_dir, "/config.json: no such file (is --model a checkpoint directory?)");
    const std::string tok = opt.tokenizer.empty() ? opt.model_dir + "/tokenizer.json" : opt.tokenizer;
    if (!std::filesystem::exists(tok))
        fail(tok, ": no tokenizer.json (put one in the checkpoint directory or pass --tokenizer)");
    raise_fd_limit();
    Server s(opt);
    return s.run();
}

}  // namespace megamoe
