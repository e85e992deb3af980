// request.h — what `megamoe serve` does with a request before the engine sees it: who may ask
// (API keys), which endpoint it is, and the body parsed and checked into a prompt and generation
// parameters, with every limit that applies to one request.
//
// Engine-free and socket-free, so that the fuzz target fuzz/http_request_fuzz.cpp drives the same
// code the server runs. Every rejection is an HttpError in OpenAI's error shape (status, message,
// type, param, code); nothing here may throw anything else for any input (megamoe::Error from
// the chat encoder and the tokenizer is turned into a 400 naming the field).
#pragma once

#include <algorithm>
#include <cctype>
#include <cmath>
#include <fstream>
#include <limits>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/common.h"
#include "serve/chat.h"
#include "serve/engine.h"
#include "serve/sampler.h"
#include "serve/tokenizer.h"

namespace megamoe {

using ojson = nlohmann::ordered_json;

inline constexpr int kMaxChoices = 128;   // n

// Serialized JSON; invalid UTF-8 (which the decoders never produce) is replaced, never thrown on.
inline std::string dump_json(const ojson& j) { return j.dump(-1, ' ', false, ojson::error_handler_t::replace); }

// ---- errors

struct HttpError {
    int status;
    std::string message;
    std::string type;    // OpenAI error type
    std::string param;   // offending field, may be empty
    std::string code;    // e.g. "model_not_found", may be empty
};

[[noreturn]] inline void bad_request(const std::string& msg, const std::string& param = "") {
    throw HttpError{400, msg, "invalid_request_error", param, ""};
}

inline std::string error_body(const HttpError& e) {
    ojson err = {{"message", e.message}, {"type", e.type}, {"param", e.param.empty() ? ojson(nullptr) : ojson(e.param)},
                 {"code", e.code.empty() ? ojson(nullptr) : ojson(e.code)}};
    return dump_json(ojson{{"error", err}});
}

inline HttpError shutting_down() { return {503, "the server is shutting down", "service_unavailable", "", ""}; }

// ---- who may use the server

// The keys a request may present: --api-key KEY (any number) and --api-key-file FILE (one key per
// line; blank lines and surrounding spaces ignored). Throws Error naming the file or the flag.
inline std::vector<std::string> load_api_keys(const std::vector<std::string>& keys, const std::string& key_file) {
    std::vector<std::string> out;
    auto add = [&](std::string k, const std::string& where) {
        while (!k.empty() && std::isspace(static_cast<unsigned char>(k.back()))) k.pop_back();
        size_t b = 0;
        while (b < k.size() && std::isspace(static_cast<unsigned char>(k[b]))) ++b;
        k.erase(0, b);
        if (k.empty()) return false;
        for (unsigned char c : k)
            if (c < 0x21 || c > 0x7e) fail(where, ": an API key must be printable ASCII without spaces");
        out.push_back(std::move(k));
        return true;
    };
    for (const auto& k : keys)
        if (!add(k, "--api-key")) fail("--api-key: the key is empty");
    if (!key_file.empty()) {
        std::ifstream in(key_file, std::ios::binary);
        if (!in) fail(key_file, ": cannot read the API key file (--api-key-file)");
        std::string line;
        int64_t n = 0, lineno = 0;
        while (std::getline(in, line)) n += add(line, str(key_file, ":", ++lineno));
        if (n == 0) fail(key_file, ": the API key file (--api-key-file) holds no key");
    }
    return out;
}

// Equal without an early exit: the time depends on the length of `key` (the secret) only, not on
// where `given` first differs from it.
inline bool constant_time_equal(std::string_view key, std::string_view given) {
    unsigned diff = key.size() != given.size() ? 1u : 0u;
    for (size_t i = 0; i < key.size(); ++i) {
        const unsigned char g = i < given.size() ? static_cast<unsigned char>(given[i]) : 0;
        diff |= static_cast<unsigned>(static_cast<unsigned char>(key[i]) ^ g);
    }
    return diff == 0;
}

// Whether an Authorization header value ("Bearer KEY") names one of `keys`. Every key is compared,
// match or not. No keys: everyone is allowed.
inline bool authorized(const std::vector<std::string>& keys, std::string_view authorization) {
    if (keys.empty()) return true;
    std::string_view token;
    constexpr std::string_view scheme = "Bearer ";
    if (authorization.size() > scheme.size()) {
        bool bearer = true;   // the scheme is case-insensitive (RFC 7235)
        for (size_t i = 0; i < scheme.size(); ++i)
            if (std::tolower(static_cast<unsigned char>(authorization[i])) != std::tolower(static_cast<unsigned char>(scheme[i])))
                bearer = false;
        if (bearer) token = authorization.substr(scheme.size());
        while (!token.empty() && (token.front() == ' ' || token.front() == '\t')) token.remove_prefix(1);
        while (!token.empty() && (token.back() == ' ' || token.back() == '\t')) token.remove_suffix(1);
    }
    bool ok = false;
    for (const auto& k : keys) ok |= constant_time_equal(k, token) && !token.empty();
    return ok;
}

// OpenAI's answer to a request without a valid key (it does not echo the key).
inline HttpError unauthorized() {
    return {401, "missing or incorrect API key: send the header 'Authorization: Bearer KEY'", "invalid_request_error", "",
            "invalid_api_key"};
}

// Which paths need a key when keys are set: all but /health, and /metrics only with
// --private-metrics.
inline bool needs_key(std::string_view path, bool private_metrics) {
    if (path == "/health") return false;
    if (path == "/metrics") return private_metrics;
    return true;
}

// What the server decides from a request's line and headers alone, before reading its body:
// a method it does not serve (PRI, whose body httplib would read without a limit, TRACE,
// CONNECT, ...) gets 405; a request that needs a key and has no valid one gets 401. nullopt:
// go on to the route.
inline std::optional<HttpError> check_request_head(std::string_view method, std::string_view path,
                                                   std::string_view authorization, const std::vector<std::string>& keys,
                                                   bool private_metrics) {
    if (!keys.empty() && needs_key(path, private_metrics) && !authorized(keys, authorization)) return unauthorized();
    for (const std::string_view m : {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
        if (method == m) return std::nullopt;
    return HttpError{405, str("method ", method, " is not allowed"), "invalid_request_error", "", "method_not_allowed"};
}

// ---- limits that apply to one request (flags of `megamoe serve`, see server.h)

struct RequestLimits {
    int64_t max_prompt_tokens = 0;       // 0: the context length
    int64_t max_completion_tokens = 0;   // per choice; 0: the context length
    int64_t max_json_depth = static_cast<int64_t>(kMaxJsonDepth);
};

// What parsing needs from the server.
struct RequestContext {
    const Tokenizer* tok = nullptr;
    std::string model_name;
    SamplingParams defaults;
    int64_t vocab_size = 0;      // the model's logits; token ids in a prompt must be below it
    int64_t max_model_len = 0;   // context: prompt + completion
    RequestLimits limits;
};

// ---- request field access with type checks (each error names the field)

inline const ojson* field(const ojson& body, const char* name) {
    auto it = body.find(name);
    return it == body.end() || it->is_null() ? nullptr : &*it;
}

template <typename T>
std::optional<T> get_number(const ojson& body, const char* name) {
    const ojson* v = field(body, name);
    if (!v) return std::nullopt;
    if constexpr (std::is_integral_v<T>) {
        if (!v->is_number_integer() && !(v->is_number_float() && v->get<double>() == std::floor(v->get<double>())))
            bad_request(str("'", name, "' must be an integer"), name);
        const double d = v->get<double>();
        if (d < -9e18 || d > 9e18) bad_request(str("'", name, "' is out of range"), name);
        const int64_t i = v->is_number_unsigned() ? static_cast<int64_t>(v->get<uint64_t>()) : v->get<int64_t>();
        if (i < static_cast<int64_t>(std::numeric_limits<T>::min()) || i > static_cast<int64_t>(std::numeric_limits<T>::max()))
            bad_request(str("'", name, "' is out of range"), name);
        return static_cast<T>(i);
    } else {
        if (!v->is_number()) bad_request(str("'", name, "' must be a number"), name);
        const double d = v->get<double>();
        if (!(std::fabs(d) <= static_cast<double>(std::numeric_limits<T>::max())))
            bad_request(str("'", name, "' is out of range"), name);
        return static_cast<T>(d);
    }
}

inline std::optional<bool> get_bool(const ojson& body, const char* name) {
    const ojson* v = field(body, name);
    if (!v) return std::nullopt;
    if (!v->is_boolean()) bad_request(str("'", name, "' must be a boolean"), name);
    return v->get<bool>();
}

inline std::optional<std::string> get_string(const ojson& body, const char* name) {
    const ojson* v = field(body, name);
    if (!v) return std::nullopt;
    if (!v->is_string()) bad_request(str("'", name, "' must be a string"), name);
    return v->get<std::string>();
}

// ---- the parsed request

struct Parsed {                     // what both endpoints need after validation
    std::vector<int32_t> prompt;
    GenerationParams gen;
    std::vector<std::string> stops;
    bool stream = false, include_usage = false;
    int logprobs = -1;              // -1 none; else top-k alternatives
    int n = 1;                      // choices, each its own engine request
    bool chat = false, thinking = false;
};

// The chat prompt's pieces as ids: special pieces are single added tokens, user text never
// becomes one.
inline std::vector<int32_t> tokenize_prompt(const Tokenizer& tok, const ChatPrompt& p) {
    std::vector<int32_t> ids;
    for (const auto& piece : p.pieces) {
        if (piece.special) {
            auto id = tok.token_id(piece.text);
            if (!id) throw HttpError{500, str("the tokenizer has no special token ", piece.text), "server_error", "", ""};
            ids.push_back(*id);
        } else {
            auto part = tok.encode_ordinary(piece.text);   // user text never becomes special tokens
            ids.insert(ids.end(), part.begin(), part.end());
        }
    }
    return ids;
}

inline void parse_common(const RequestContext& ctx, const ojson& body, Parsed& p, bool chat) {
    if (auto m = get_string(body, "model"); m && *m != ctx.model_name)
        throw HttpError{404, str("The model `", *m, "` does not exist."), "NotFoundError", "model", "model_not_found"};
    if (auto n = get_number<int64_t>(body, "n")) {
        if (*n < 1 || *n > kMaxChoices) bad_request(str("'n' must be in [1, ", kMaxChoices, "]"), "n");
        p.n = static_cast<int>(*n);
    }
    p.stream = get_bool(body, "stream").value_or(false);
    if (const ojson* so = field(body, "stream_options")) {
        if (!so->is_object()) bad_request("'stream_options' must be an object", "stream_options");
        p.include_usage = get_bool(*so, "include_usage").value_or(false);
    }
    SamplingParams& s = p.gen.sampling;
    s = ctx.defaults;
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
    const int64_t cap = ctx.limits.max_completion_tokens;
    if (max_tokens && cap > 0 && *max_tokens > cap)
        bad_request(str("max_tokens ", *max_tokens, " is over the server's limit of ", cap,
                        " generated tokens per choice (--max-completion-tokens)"),
                    "max_tokens");
    p.gen.max_tokens = max_tokens.value_or(0);   // 0: fill the context (or the cap), decided once the prompt is known
    p.gen.ignore_eos = get_bool(body, "ignore_eos").value_or(false);
    if (const ojson* st = field(body, "stop")) {
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

// The chat-specific fields: messages, chat_template_kwargs, reasoning_effort, tool_choice, tools,
// response_format.
inline ChatRequest chat_request_from_json(const ojson& body) {
    const ojson* msgs = field(body, "messages");
    if (!msgs) bad_request("'messages' is required", "messages");
    if (!msgs->is_array() || msgs->empty()) bad_request("'messages' must be a non-empty array", "messages");
    ChatRequest cr;
    try {
        cr.messages = messages_from_json(*msgs);
    } catch (const Error& e) {
        bad_request(e.what(), "messages");
    }
    bool thinking = true;
    if (const ojson* k = field(body, "chat_template_kwargs")) {
        if (!k->is_object()) bad_request("'chat_template_kwargs' must be an object", "chat_template_kwargs");
        if (auto t = get_bool(*k, "thinking")) thinking = *t;
        if (auto t = get_bool(*k, "enable_thinking")) thinking = *t;
    }
    cr.thinking = thinking;
    if (auto e = get_string(body, "reasoning_effort")) cr.reasoning_effort = *e;
    std::string tool_choice = "auto";
    if (const ojson* tc = field(body, "tool_choice")) {
        // "required" and a named function need constrained decoding, which this engine lacks.
        if (!tc->is_string()) bad_request("only the tool_choice values \"none\" and \"auto\" are supported", "tool_choice");
        tool_choice = tc->get<std::string>();
        if (tool_choice != "none" && tool_choice != "auto")
            bad_request(str("tool_choice '", tool_choice, "' is not supported (\"none\" or \"auto\")"), "tool_choice");
    }
    if (const ojson* tools = field(body, "tools"); tools && tool_choice != "none") {
        if (!tools->is_array()) bad_request("'tools' must be an array", "tools");
        for (size_t i = 0; i < tools->size(); ++i) {
            const ojson& t = (*tools)[i];
            if (!t.is_object() || !t.contains("function") || !t["function"].is_object() ||
                !t["function"].contains("name") || !t["function"]["name"].is_string())
                bad_request(str("tools[", i, "] must be {\"type\": \"function\", \"function\": {\"name\": ...}}"), "tools");
        }
        if (!tools->empty()) cr.tools = *tools;
    }
    if (const ojson* rf = field(body, "response_format")) {
        if (!rf->is_object()) bad_request("'response_format' must be an object", "response_format");
        const ojson* type = field(*rf, "type");
        if (type && !type->is_string()) bad_request("'response_format.type' must be a string", "response_format");
        if (type && type->get_ref<const std::string&>() != "text") cr.response_format = *rf;
    }
    return cr;
}

// The prompt a chat request renders to (throws HttpError 400 where the chat encoder refuses it).
inline ChatPrompt chat_prompt(const ChatRequest& cr) {
    try {
        return encode_chat(cr);
    } catch (const Error& e) {
        bad_request(e.what(), "messages");
    }
}

inline Parsed parse_chat_request(const RequestContext& ctx, const ojson& body) {
    Parsed p;
    p.chat = true;
    parse_common(ctx, body, p, true);
    const ChatPrompt prompt = chat_prompt(chat_request_from_json(body));
    p.thinking = !prompt.pieces.empty() && prompt.pieces.back().special && prompt.pieces.back().text == "<think>";
    p.prompt = tokenize_prompt(*ctx.tok, prompt);
    return p;
}

inline Parsed parse_completion_request(const RequestContext& ctx, const ojson& body) {
    Parsed p;
    parse_common(ctx, body, p, false);
    const ojson* pr = field(body, "prompt");
    if (!pr) bad_request("'prompt' is required", "prompt");
    if (pr->is_string()) {
        p.prompt = ctx.tok->encode_ordinary(pr->get<std::string>());
    } else if (pr->is_array() && !pr->empty() && (*pr)[0].is_number_integer()) {
        for (const auto& v : *pr) {
            if (!v.is_number_integer()) bad_request("'prompt' token arrays must hold integers", "prompt");
            const int64_t id = v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX) ? INT64_MAX : v.get<int64_t>();
            if (id < 0 || id >= ctx.vocab_size)
                bad_request(str("token id ", id, " is outside the vocabulary"), "prompt");
            p.prompt.push_back(static_cast<int32_t>(id));
        }
    } else if (pr->is_array() && pr->size() == 1 && (*pr)[0].is_string()) {
        p.prompt = ctx.tok->encode_ordinary((*pr)[0].get<std::string>());
    } else {
        bad_request("'prompt' must be a string or an array of token ids (one prompt per request)", "prompt");
    }
    if (auto echo = get_bool(body, "echo"); echo && *echo) bad_request("'echo' is not supported", "echo");
    if (p.prompt.empty()) bad_request("the prompt is empty", "prompt");
    return p;
}

// A request body (the text of a POST to /v1/chat/completions when chat, else /v1/completions)
// parsed, checked against the per-request limits, and with max_tokens decided: the request's own,
// else what the context leaves (capped by --max-completion-tokens). Throws HttpError.
inline Parsed parse_request(const RequestContext& ctx, std::string_view text, bool chat) {
    // Copying and serializing JSON recurse once per level: bound the nesting before parsing.
    const int64_t depth_limit = std::min<int64_t>(ctx.limits.max_json_depth, static_cast<int64_t>(kMaxJsonDepth));
    if (static_cast<int64_t>(json_nesting_depth(text)) > depth_limit)
        bad_request(str("the request body nests arrays and objects deeper than ", depth_limit, " levels (--max-json-depth)"));
    ojson body;
    try {
        body = ojson::parse(text);
    } catch (const ojson::exception& e) {
        bad_request(str("the request body is not valid JSON: ", e.what()));
    }
    if (!body.is_object()) bad_request("the request body must be a JSON object");
    Parsed p = chat ? parse_chat_request(ctx, body) : parse_completion_request(ctx, body);
    const int64_t P = static_cast<int64_t>(p.prompt.size());
    const int64_t prompt_cap = ctx.limits.max_prompt_tokens;
    if (prompt_cap > 0 && P > prompt_cap)
        throw HttpError{413, str("the prompt has ", P, " tokens, over the server's limit of ", prompt_cap,
                                 " prompt tokens (--max-prompt-tokens)"),
                        "invalid_request_error", chat ? "messages" : "prompt", "prompt_too_long"};
    if (p.gen.max_tokens == 0) {
        p.gen.max_tokens = std::max<int64_t>(1, ctx.max_model_len - P);
        if (ctx.limits.max_completion_tokens > 0) p.gen.max_tokens = std::min(p.gen.max_tokens, ctx.limits.max_completion_tokens);
    }
    return p;
}

}  // namespace megamoe
