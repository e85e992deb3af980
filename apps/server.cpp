// server.cpp — `megamoe serve`: an OpenAI-compatible HTTP server over the Engine.
//
// HTTP threads parse and validate a request, tokenize it, and submit it to the engine; the
// engine thread samples tokens and calls back into the request's Session, which detokenizes,
// applies stop strings and queues text for the HTTP thread. Streaming responses are written
// as SSE from that queue; a client that goes away cancels its request and only its request.
// The server includes engine, chat and tokenizer headers only: it never sees tensors.
#include "server.h"

#include <httplib.h>
#include <sys/socket.h>
#include <netinet/in.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "serve/chat.h"
#include "serve/engine.h"
#include "serve/tokenizer.h"

namespace megamoe {
namespace {

using json = nlohmann::ordered_json;

// Serialized JSON; invalid UTF-8 (which the decoders never produce) is replaced, never thrown on.
std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

// ---- errors

struct HttpError {
    int status;
    std::string message;
    std::string type;    // OpenAI error type
    std::string param;   // offending field, may be empty
};

[[noreturn]] void bad_request(const std::string& msg, const std::string& param = "") {
    throw HttpError{400, msg, "invalid_request_error", param};
}

std::string error_body(const HttpError& e) {
    json err = {{"message", e.message}, {"type", e.type}, {"param", e.param.empty() ? json(nullptr) : json(e.param)},
                {"code", e.status == 404 ? json("model_not_found") : json(nullptr)}};
    return dump(json{{"error", err}});
}

void send_error(httplib::Response& res, const HttpError& e) {
    res.status = e.status;
    res.set_content(error_body(e), "application/json");
}

// ---- request field access with type checks (each error names the field)

const json* field(const json& body, const char* name) {
    auto it = body.find(name);
    return it == body.end() || it->is_null() ? nullptr : &*it;
}

template <typename T>
std::optional<T> get_number(const json& body, const char* name) {
    const json* v = field(body, name);
    if (!v) return std::nullopt;
    if constexpr (std::is_integral_v<T>) {
        if (!v->is_number_integer() && !(v->is_number_float() && v->get<double>() == std::floor(v->get<double>())))
            bad_request(str("'", name, "' must be an integer"), name);
        const double d = v->get<double>();
        if (d < -9e18 || d > 9e18) bad_request(str("'", name, "' is out of range"), name);
        return static_cast<T>(v->get<int64_t>());
    } else {
        if (!v->is_number()) bad_request(str("'", name, "' must be a number"), name);
        return v->get<T>();
    }
}

std::optional<bool> get_bool(const json& body, const char* name) {
    const json* v = field(body, name);
    if (!v) return std::nullopt;
    if (!v->is_boolean()) bad_request(str("'", name, "' must be a boolean"), name);
    return v->get<bool>();
}

std::optional<std::string> get_string(const json& body, const char* name) {
    const json* v = field(body, name);
    if (!v) return std::nullopt;
    if (!v->is_string()) bad_request(str("'", name, "' must be a string"), name);
    return v->get<std::string>();
}

// ---- one request's life: engine callbacks -> queue -> HTTP thread

struct Piece {
    std::string text;                  // new text (after stop-string handling)
    std::optional<TokenOut> token;     // the token it came from, when logprobs are wanted
    std::string token_text;            // that token's own text
};

class Session {
public:
    Session(const Tokenizer& tok, std::vector<std::string> stops, bool logprobs)
        : tok_(tok), dec_(tok, /*skip_special=*/true), stops_(std::move(stops)), logprobs_(logprobs) {
        for (const auto& s : stops_) hold_ = std::max(hold_, s.size());
    }

    // Engine thread: one token. Returns false when a stop string ended the text.
    bool on_token(const TokenOut& t) {
        const size_t before = text_.size();
        text_ += dec_.push(t.id);
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
            p.token_text = tok_.token_bytes(t.id);
        }
        push(std::move(p));
        return !stopped_by_string_;
    }

    // Engine thread: the end. Whatever was held back is released.
    void on_finish(FinishReason why, const std::string& error) {
        if (!stopped_by_string_) text_ += dec_.flush();
        Piece p;
        if (text_.size() > emitted_) p.text = text_.substr(emitted_);
        emitted_ = text_.size();
        std::lock_guard<std::mutex> lk(m_);
        if (!p.text.empty()) queue_.push_back(std::move(p));
        finished_ = true;
        reason_ = why;
        error_ = error;
        cv_.notify_all();
    }

    // HTTP thread: wait for the next pieces (or the end). Returns false once finished and drained.
    bool next(std::vector<Piece>& out, std::chrono::milliseconds wait = std::chrono::milliseconds(200)) {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait_for(lk, wait, [&] { return !queue_.empty() || finished_; });
        out.assign(std::make_move_iterator(queue_.begin()), std::make_move_iterator(queue_.end()));
        queue_.clear();
        return !(finished_ && out.empty());
    }

    bool finished() const {
        std::lock_guard<std::mutex> lk(m_);
        return finished_;
    }
    FinishReason reason() const { return reason_; }
    const std::string& error() const { return error_; }
    int64_t completion_tokens() const { return completion_tokens_; }

private:
    void push(Piece p) {
        std::lock_guard<std::mutex> lk(m_);
        queue_.push_back(std::move(p));
        cv_.notify_all();
    }

    const Tokenizer& tok_;
    StreamDecoder dec_;
    std::vector<std::string> stops_;
    size_t hold_ = 0;
    bool logprobs_;
    std::string text_;
    size_t emitted_ = 0;
    bool stopped_by_string_ = false;
    std::atomic<int64_t> completion_tokens_{0};
    mutable std::mutex m_;
    std::condition_variable cv_;
    std::deque<Piece> queue_;
    bool finished_ = false;
    FinishReason reason_ = FinishReason::stop;
    std::string error_;
};

// ---- the server

struct Parsed {                     // what both endpoints need after validation
    std::vector<int32_t> prompt;
    GenerationParams gen;
    std::vector<std::string> stops;
    bool stream = false, include_usage = false;
    int logprobs = -1;              // -1 none; else top-k alternatives
    bool chat = false, thinking = false;
};

class Server {
public:
    explicit Server(const ServeOptions& o) : opt_(o) {}

    int run();

private:
    void load();
    void routes();
    std::vector<int32_t> tokenize(const ChatPrompt& p) const;
    void parse_common(const json& body, Parsed& p, bool chat);
    Parsed parse_chat(const json& body);
    Parsed parse_completion(const json& body);
    void handle(const httplib::Request& req, httplib::Response& res, bool chat);
    void respond_full(httplib::Response& res, const Parsed& p, std::shared_ptr<Session> s, uint64_t id);
    void respond_stream(httplib::Response& res, const Parsed& p, std::shared_ptr<Session> s, uint64_t id);
    std::string metrics_text() const;

    ServeOptions opt_;
    std::atomic<bool> ready_{false};
    std::string model_name_;
    std::unique_ptr<Tokenizer> tok_;
    std::unique_ptr<Engine> engine_;
    SamplingParams defaults_;
    std::atomic<uint64_t> next_id_{1};
    httplib::Server http_;
    const int64_t created_ = std::chrono::duration_cast<std::chrono::seconds>(
                                 std::chrono::system_clock::now().time_since_epoch()).count();
};

void Server::load() {
    auto t0 = std::chrono::steady_clock::now();
    std::fprintf(stderr, "megamoe: loading %s\n", opt_.model_dir.c_str());
    auto model = Model::load(opt_.model_dir, [](size_t done, size_t total) {
        std::fprintf(stderr, "\rmegamoe: binding tensors %zu/%zu (%3zu%%)", done, total, total ? done * 100 / total : 100);
        if (done == total) std::fprintf(stderr, "\n");
    });
    std::string tok_path = opt_.tokenizer;
    if (tok_path.empty()) tok_path = opt_.model_dir + "/tokenizer.json";
    if (!std::filesystem::exists(tok_path))
        fail(tok_path, ": no tokenizer.json (put one in the checkpoint directory or pass --tokenizer)");
    tok_ = std::make_unique<Tokenizer>(Tokenizer::load(tok_path));
    if (tok_->vocab_size() > model->cfg.vocab_size)
        fail(tok_path, ": the tokenizer has ", tok_->vocab_size(), " ids but the model only ", model->cfg.vocab_size);
    defaults_ = load_generation_defaults(opt_.model_dir);
    EngineOptions eo;
    eo.max_batch_tokens = opt_.max_batch_tokens;
    eo.max_seqs = opt_.max_seqs;
    eo.max_model_len = opt_.max_model_len;
    eo.seed = opt_.seed;
    engine_ = std::make_unique<Engine>(std::move(model), eo);
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "megamoe: ready in %.1f s, serving '%s' (context %ld tokens)\n", sec, model_name_.c_str(),
                 engine_->max_model_len());
    ready_ = true;
}

std::vector<int32_t> Server::tokenize(const ChatPrompt& p) const {
    std::vector<int32_t> ids;
    for (const auto& piece : p.pieces) {
        if (piece.special) {
            auto id = tok_->token_id(piece.text);
            if (!id) throw HttpError{500, str("the tokenizer has no special token ", piece.text), "server_error", ""};
            ids.push_back(*id);
        } else {
            auto part = tok_->encode_ordinary(piece.text);   // user text never becomes special tokens
            ids.insert(ids.end(), part.begin(), part.end());
        }
    }
    return ids;
}

void Server::parse_common(const json& body, Parsed& p, bool chat) {
    if (auto m = get_string(body, "model"); m && *m != model_name_)
        throw HttpError{404, str("The model `", *m, "` does not exist."), "NotFoundError", "model"};
    if (auto n = get_number<int64_t>(body, "n"); n && *n != 1) bad_request("only n = 1 is supported", "n");
    p.stream = get_bool(body, "stream").value_or(false);
    if (const json* so = field(body, "stream_options")) {
        if (!so->is_object()) bad_request("'stream_options' must be an object", "stream_options");
        p.include_usage = get_bool(*so, "include_usage").value_or(false);
    }
    SamplingParams& s = p.gen.sampling;
    s = defaults_;
    if (auto v = get_number<float>(body, "temperature")) s.temperature = *v;
    if (auto v = get_number<float>(body, "top_p")) s.top_p = *v;
    if (auto v = get_number<int32_t>(body, "top_k")) s.top_k = *v;
    if (auto v = get_number<float>(body, "min_p")) s.min_p = *v;
    if (auto v = get_number<int64_t>(body, "seed")) s.seed = static_cast<uint64_t>(*v);
    try {
        s.validate();
    } catch (const Error& e) {
        bad_request(e.what());
    }
    std::optional<int64_t> max_tokens = get_number<int64_t>(body, "max_tokens");
    if (auto v = get_number<int64_t>(body, "max_completion_tokens")) max_tokens = v;
    if (max_tokens && *max_tokens < 1) bad_request("max_tokens must be at least 1", "max_tokens");
    p.gen.max_tokens = max_tokens.value_or(0);   // 0: fill the context, decided once the prompt is known
    p.gen.ignore_eos = get_bool(body, "ignore_eos").value_or(false);
    if (const json* st = field(body, "stop")) {
        if (st->is_string()) {
            p.stops.push_back(st->get<std::string>());
        } else if (st->is_array()) {
            for (const auto& v : *st) {
                if (!v.is_string()) bad_request("'stop' must be a string or an array of strings", "stop");
                p.stops.push_back(v.get<std::string>());
            }
        } else {
            bad_request("'stop' must be a string or an array of strings", "stop");
        }
        if (p.stops.size() > 16) bad_request("at most 16 stop strings", "stop");
        for (const auto& s2 : p.stops)
            if (s2.empty()) bad_request("stop strings must not be empty", "stop");
    }
    if (chat) {
        const bool lp = get_bool(body, "logprobs").value_or(false);
        auto top = get_number<int64_t>(body, "top_logprobs");
        if (top && (*top < 0 || *top > 20)) bad_request("'top_logprobs' must be in [0, 20]", "top_logprobs");
        if (top && !lp) bad_request("'top_logprobs' requires 'logprobs': true", "top_logprobs");
        p.logprobs = lp ? static_cast<int>(top.value_or(0)) : -1;
    } else if (auto lp = get_number<int64_t>(body, "logprobs")) {
        if (*lp < 0 || *lp > 20) bad_request("'logprobs' must be in [0, 20]", "logprobs");
        p.logprobs = static_cast<int>(*lp);
    }
    p.gen.top_logprobs = p.logprobs;
}

Parsed Server::parse_chat(const json& body) {
    Parsed p;
    p.chat = true;
    parse_common(body, p, true);
    const json* msgs = field(body, "messages");
    if (!msgs) bad_request("'messages' is required", "messages");
    if (!msgs->is_array() || msgs->empty()) bad_request("'messages' must be a non-empty array", "messages");
    ChatRequest cr;
    try {
        cr.messages = messages_from_json(*msgs);
    } catch (const Error& e) {
        bad_request(e.what(), "messages");
    }
    bool thinking = true;
    if (const json* k = field(body, "chat_template_kwargs")) {
        if (!k->is_object()) bad_request("'chat_template_kwargs' must be an object", "chat_template_kwargs");
        if (auto t = get_bool(*k, "thinking")) thinking = *t;
        if (auto t = get_bool(*k, "enable_thinking")) thinking = *t;
    }
    cr.thinking = thinking;
    if (auto e = get_string(body, "reasoning_effort")) cr.reasoning_effort = *e;
    std::string tool_choice = "auto";
    if (const json* tc = field(body, "tool_choice")) {
        // "required" and a named function need constrained decoding, which this engine lacks.
        if (!tc->is_string()) bad_request("only the tool_choice values \"none\" and \"auto\" are supported", "tool_choice");
        tool_choice = tc->get<std::string>();
        if (tool_choice != "none" && tool_choice != "auto")
            bad_request(str("tool_choice '", tool_choice, "' is not supported (\"none\" or \"auto\")"), "tool_choice");
    }
    if (const json* tools = field(body, "tools"); tools && tool_choice != "none") {
        if (!tools->is_array()) bad_request("'tools' must be an array", "tools");
        for (size_t i = 0; i < tools->size(); ++i) {
            const json& t = (*tools)[i];
            if (!t.is_object() || !t.contains("function") || !t["function"].is_object() ||
                !t["function"].contains("name") || !t["function"]["name"].is_string())
                bad_request(str("tools[", i, "] must be {\"type\": \"function\", \"function\": {\"name\": ...}}"), "tools");
        }
        if (!tools->empty()) cr.tools = *tools;
    }
    if (const json* rf = field(body, "response_format")) {
        if (!rf->is_object()) bad_request("'response_format' must be an object", "response_format");
        if (rf->value("type", "text") != "text") cr.response_format = *rf;
    }
    ChatPrompt prompt;
    try {
        prompt = encode_chat(cr);
    } catch (const Error& e) {
        bad_request(e.what(), "messages");
    }
    p.thinking = !prompt.pieces.empty() && prompt.pieces.back().special && prompt.pieces.back().text == "<think>";
    p.prompt = tokenize(prompt);
    return p;
}

Parsed Server::parse_completion(const json& body) {
    Parsed p;
    parse_common(body, p, false);
    const json* pr = field(body, "prompt");
    if (!pr) bad_request("'prompt' is required", "prompt");
    if (pr->is_string()) {
        p.prompt = tok_->encode_ordinary(pr->get<std::string>());
    } else if (pr->is_array() && !pr->empty() && (*pr)[0].is_number_integer()) {
        for (const auto& v : *pr) {
            if (!v.is_number_integer()) bad_request("'prompt' token arrays must hold integers", "prompt");
            const int64_t id = v.get<int64_t>();
            if (id < 0 || id >= engine_->config().vocab_size)
                bad_request(str("token id ", id, " is outside the vocabulary"), "prompt");
            p.prompt.push_back(static_cast<int32_t>(id));
        }
    } else if (pr->is_array() && pr->size() == 1 && (*pr)[0].is_string()) {
        p.prompt = tok_->encode_ordinary((*pr)[0].get<std::string>());
    } else {
        bad_request("'prompt' must be a string or an array of token ids (one prompt per request)", "prompt");
    }
    if (auto echo = get_bool(body, "echo"); echo && *echo) bad_request("'echo' is not supported", "echo");
    if (p.prompt.empty()) bad_request("the prompt is empty", "prompt");
    return p;
}

json usage_json(int64_t prompt, int64_t completion) {
    return {{"prompt_tokens", prompt}, {"completion_tokens", completion}, {"total_tokens", prompt + completion}};
}

std::vector<int> utf8_bytes(const std::string& t) {   // OpenAI's "bytes": the UTF-8 bytes as 0..255
    std::vector<int> b;
    for (unsigned char ch : t) b.push_back(ch);
    return b;
}

json token_logprob_json(const Tokenizer& tok, const Piece& p) {
    json top = json::array();
    for (const auto& [id, lp] : p.token->top) {
        const std::string t = utf8_lossy(tok.token_bytes(id));
        top.push_back({{"token", t}, {"logprob", lp}, {"bytes", utf8_bytes(t)}});
    }
    const std::string t = utf8_lossy(p.token_text);
    return {{"token", t}, {"logprob", p.token->logprob}, {"bytes", utf8_bytes(t)},
            {"top_logprobs", top}};
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

void Server::handle(const httplib::Request& req, httplib::Response& res, bool chat) {
    try {
        if (!ready_) throw HttpError{503, "the model is still loading", "service_unavailable", ""};
        json body;
        try {
            body = json::parse(req.body);
        } catch (const json::exception& e) {
            bad_request(str("the request body is not valid JSON: ", e.what()));
        }
        if (!body.is_object()) bad_request("the request body must be a JSON object");
        Parsed p = chat ? parse_chat(body) : parse_completion(body);
        const int64_t P = static_cast<int64_t>(p.prompt.size());
        if (p.gen.max_tokens == 0) p.gen.max_tokens = std::max<int64_t>(1, engine_->max_model_len() - P);
        auto session = std::make_shared<Session>(*tok_, p.stops, p.logprobs >= 0);
        RequestCallbacks cb;
        cb.on_token = [session](const TokenOut& t) { return session->on_token(t); };
        cb.on_finish = [session](FinishReason r, const std::string& e) { session->on_finish(r, e); };
        uint64_t id = 0;
        try {
            id = engine_->submit(p.prompt, p.gen, cb);
        } catch (const Error& e) {
            bad_request(e.what(), "messages");
        }
        if (p.stream)
            respond_stream(res, p, session, id);
        else
            respond_full(res, p, session, id);
    } catch (const HttpError& e) {
        send_error(res, e);
    } catch (const std::exception& e) {
        send_error(res, HttpError{500, e.what(), "server_error", ""});
    }
}

void Server::respond_full(httplib::Response& res, const Parsed& p, std::shared_ptr<Session> s, uint64_t id) {
    std::string text;
    json lp_content = json::array();
    json lp_tokens = json::array(), lp_values = json::array(), lp_top = json::array(), lp_offsets = json::array();
    std::vector<Piece> pieces;
    while (s->next(pieces)) {
        for (const auto& pc : pieces) {
            if (pc.token && p.chat) lp_content.push_back(token_logprob_json(*tok_, pc));
            if (pc.token && !p.chat) {
                lp_offsets.push_back(text.size());
                lp_tokens.push_back(utf8_lossy(pc.token_text));
                lp_values.push_back(pc.token->logprob);
                json top = json::object();
                for (const auto& [tid, v] : pc.token->top) top[utf8_lossy(tok_->token_bytes(tid))] = v;
                lp_top.push_back(top);
            }
            text += pc.text;
        }
    }
    if (s->reason() == FinishReason::error) throw HttpError{500, s->error(), "server_error", ""};
    const int64_t P = static_cast<int64_t>(p.prompt.size());
    json choice;
    if (p.chat) {
        ParsedCompletion pc = megamoe::parse_completion(text, p.thinking);
        json msg = {{"role", "assistant"}, {"content", pc.content}};
        if (p.thinking) msg["reasoning_content"] = pc.reasoning_content;
        if (pc.has_tool_calls()) msg["tool_calls"] = tool_calls_json(pc.tool_calls, 0, id);
        choice = {{"index", 0}, {"message", msg},
                  {"logprobs", p.logprobs >= 0 ? json{{"content", lp_content}} : json(nullptr)},
                  {"finish_reason", finish_name(s->reason(), pc.has_tool_calls())}};
    } else {
        json lp = p.logprobs >= 0 ? json{{"tokens", lp_tokens}, {"token_logprobs", lp_values}, {"top_logprobs", lp_top},
                                         {"text_offset", lp_offsets}}
                                  : json(nullptr);
        choice = {{"index", 0}, {"text", text}, {"logprobs", lp}, {"finish_reason", finish_name(s->reason(), false)}};
    }
    json out = {{"id", str(p.chat ? "chatcmpl-" : "cmpl-", id)},
                {"object", p.chat ? "chat.completion" : "text_completion"},
                {"created", created_},
                {"model", model_name_},
                {"choices", json::array({choice})},
                {"usage", usage_json(P, s->completion_tokens())}};
    res.set_content(dump(out), "application/json");
}

void Server::respond_stream(httplib::Response& res, const Parsed& p, std::shared_ptr<Session> s, uint64_t id) {
    struct StreamState {
        bool started = false;
        bool done = false;
        size_t tool_index = 0;
        size_t text_offset = 0;   // completions logprobs: where each token's text starts
        std::unique_ptr<ChatStreamParser> parser;
    };
    auto st = std::make_shared<StreamState>();
    if (p.chat) st->parser = std::make_unique<ChatStreamParser>(p.thinking);
    const std::string rid = str(p.chat ? "chatcmpl-" : "cmpl-", id);
    const int64_t P = static_cast<int64_t>(p.prompt.size());
    Engine* engine = engine_.get();
    const Tokenizer* tok = tok_.get();
    const std::string model = model_name_;
    const int64_t created = created_;

    auto chunk = [=](json choice) {
        json c = {{"id", rid}, {"object", p.chat ? "chat.completion.chunk" : "text_completion"}, {"created", created},
                  {"model", model}, {"choices", json::array({std::move(choice)})}};
        return "data: " + dump(c) + "\n\n";
    };
    auto delta_choice = [=](json delta, json logprobs, json finish) {
        if (p.chat) return json{{"index", 0}, {"delta", delta}, {"logprobs", logprobs}, {"finish_reason", finish}};
        return json{{"index", 0}, {"text", delta.value("content", "")}, {"logprobs", logprobs}, {"finish_reason", finish}};
    };

    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [=](size_t, httplib::DataSink& sink) {
            if (st->done) return false;
            std::string out;
            if (p.chat && !st->started) {
                out += chunk(delta_choice({{"role", "assistant"}, {"content", ""}}, nullptr, nullptr));
                st->started = true;
            }
            std::vector<Piece> pieces;
            const bool more = s->next(pieces);
            for (const auto& pc : pieces) {
                json lp = nullptr;
                if (pc.token && p.chat) lp = json{{"content", json::array({token_logprob_json(*tok, pc)})}};
                if (pc.token && !p.chat) {
                    json top = json::object();
                    for (const auto& [tid, v] : pc.token->top) top[utf8_lossy(tok->token_bytes(tid))] = v;
                    lp = {{"tokens", {utf8_lossy(pc.token_text)}}, {"token_logprobs", {pc.token->logprob}},
                          {"top_logprobs", {top}}, {"text_offset", {st->text_offset}}};
                }
                st->text_offset += pc.text.size();
                if (!p.chat) {
                    if (!pc.text.empty() || pc.token) out += chunk(delta_choice({{"content", pc.text}}, lp, nullptr));
                    continue;
                }
                ChatDelta d = st->parser->push(pc.text);
                json delta = json::object();
                if (!d.reasoning_content.empty()) delta["reasoning_content"] = d.reasoning_content;
                if (!d.content.empty()) delta["content"] = d.content;
                if (!d.tool_calls.empty()) {
                    delta["tool_calls"] = tool_calls_json(d.tool_calls, st->tool_index, id);
                    st->tool_index += d.tool_calls.size();
                }
                if (!delta.empty() || pc.token) out += chunk(delta_choice(delta, lp, nullptr));
            }
            if (!more) {
                if (s->reason() == FinishReason::error) {
                    out += "data: " + error_body(HttpError{500, s->error(), "server_error", ""}) + "\n\n";
                } else {
                    json delta = json::object();
                    if (p.chat) {
                        ChatDelta d = st->parser->finish();
                        if (!d.reasoning_content.empty()) delta["reasoning_content"] = d.reasoning_content;
                        if (!d.content.empty()) delta["content"] = d.content;
                        if (!d.tool_calls.empty()) {
                            delta["tool_calls"] = tool_calls_json(d.tool_calls, st->tool_index, id);
                            st->tool_index += d.tool_calls.size();
                        }
                    }
                    out += chunk(delta_choice(delta, nullptr, finish_name(s->reason(), st->tool_index > 0)));
                    if (p.include_usage) {
                        json c = {{"id", rid}, {"object", p.chat ? "chat.completion.chunk" : "text_completion"},
                                  {"created", created}, {"model", model}, {"choices", json::array()},
                                  {"usage", usage_json(P, s->completion_tokens())}};
                        out += "data: " + dump(c) + "\n\n";
                    }
                }
                out += "data: [DONE]\n\n";
                st->done = true;
            }
            if (!out.empty() && !sink.write(out.data(), out.size())) {
                engine->cancel(id);   // the client is gone
                return false;
            }
            if (st->done) sink.done();
            return true;
        },
        [=](bool success) {
            if (!success || !s->finished()) engine->cancel(id);
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
    gauge("megamoe_cache_usage", "sequence tokens held / (max_seqs x max_model_len)", m.cache_usage);
    histogram("megamoe_time_to_first_token_seconds", "time from arrival to the first token", m.ttft);
    histogram("megamoe_time_per_output_token_seconds", "time between consecutive tokens", m.tpot);
    return o.str();
}

void Server::routes() {
    http_.new_task_queue = [] { return new httplib::ThreadPool(64); };
    http_.set_payload_max_length(opt_.max_body_bytes);
    http_.set_read_timeout(30, 0);
    http_.set_write_timeout(30, 0);
    http_.set_error_handler([](const httplib::Request&, httplib::Response& res) {
        if (!res.body.empty()) return;
        std::string msg = res.status == 413 ? "the request body is too large" :
                          res.status == 404 ? "no such endpoint" : str("HTTP error ", res.status);
        res.set_content(error_body(HttpError{res.status, msg, res.status == 404 ? "NotFoundError" : "invalid_request_error", ""}),
                        "application/json");
    });
    http_.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
        res.status = ready_ ? 200 : 503;
        res.set_content(ready_ ? "{\"status\":\"ok\"}" : "{\"status\":\"loading\"}", "application/json");
    });
    http_.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
        res.set_content(metrics_text(), "text/plain; version=0.0.4");
    });
    http_.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
        json data = json::array();
        if (ready_)
            data.push_back({{"id", model_name_}, {"object", "model"}, {"created", created_}, {"owned_by", "megamoe"},
                            {"max_model_len", engine_->max_model_len()}});
        res.set_content(dump(json{{"object", "list"}, {"data", data}}), "application/json");
    });
    http_.Post("/v1/chat/completions", [this](const httplib::Request& q, httplib::Response& r) { handle(q, r, true); });
    http_.Post("/v1/completions", [this](const httplib::Request& q, httplib::Response& r) { handle(q, r, false); });
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

int Server::run() {
    model_name_ = opt_.served_model_name.empty()
                      ? std::filesystem::path(opt_.model_dir).lexically_normal().filename().string()
                      : opt_.served_model_name;
    if (model_name_.empty() || model_name_ == ".") model_name_ = "megamoe";
    routes();
    if (!http_.bind_to_port(opt_.host, opt_.port)) fail("cannot listen on ", opt_.host, ":", opt_.port);
    raise_listen_backlog(opt_.port);
    std::fprintf(stderr, "megamoe: listening on http://%s:%d (health 503 until loaded)\n", opt_.host.c_str(), opt_.port);
    // Load in the background so /health answers 503 meanwhile.
    std::string load_error;
    std::thread loader([&] {
        try {
            load();
        } catch (const std::exception& e) {
            load_error = e.what();
            http_.stop();
        }
    });
    http_.listen_after_bind();
    loader.join();
    if (!load_error.empty()) fail(load_error);
    engine_.reset();
    return 0;
}

}  // namespace

int serve(const ServeOptions& opt) {
    Server s(opt);
    return s.run();
}

}  // namespace megamoe
