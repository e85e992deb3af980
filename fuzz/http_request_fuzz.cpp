// http_request_fuzz.cpp — libFuzzer target for the server's request path, driven in process as
// far as megamoe's own code goes: the raw request is split into request line, headers and body
// (httplib's job in the server, done here by a plain splitter), then the server's head check
// (method, API key: apps/request.h check_request_head), the body limit (413) and the body parser
// with every per-request limit (parse_request) run exactly as in apps/server.cpp.
//
// Invariants: a refusal is an HttpError with a 4xx status among those the README lists, in
// OpenAI's error shape, and a 401 never names the key; a request without the key never gets
// past the head check; an accepted request has a non-empty prompt within the limits and ids in
// the vocabulary. Nothing else may be thrown.
#include <cstddef>
#include <cstdint>
#include <string>

#include "../apps/request.h"
#include "fuzz_util.h"

using namespace megamoe;

namespace {

constexpr std::string_view kKey = "sk-test-key";
constexpr size_t kMaxBody = 2048;

struct Fixture {
    Tokenizer tok = Tokenizer::load(fuzz::fixed_tokenizer_path());
    std::vector<std::string> keys = load_api_keys({std::string(kKey), "second-key"}, "");
    RequestContext ctx;
    Fixture() {
        ctx.tok = &tok;
        ctx.model_name = "tiny";
        ctx.vocab_size = 6016;
        ctx.max_model_len = 512;
        ctx.limits.max_prompt_tokens = 256;
        ctx.limits.max_completion_tokens = 128;
        ctx.limits.max_json_depth = 32;
    }
};

void check_error(const HttpError& e) {
    static const int allowed[] = {400, 401, 404, 405, 413};
    FUZZ_CHECK(std::find(std::begin(allowed), std::end(allowed), e.status) != std::end(allowed));
    const auto j = ojson::parse(error_body(e));
    FUZZ_CHECK(j.at("error").at("message").is_string() && j.at("error").at("type").is_string());
    // A 401 never names a key (other errors may quote what the client sent, its own key included).
    if (e.status == 401) FUZZ_CHECK(error_body(e).find(kKey) == std::string::npos);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static const Fixture f;
    const std::string_view raw(reinterpret_cast<const char*>(data), size);
    // Request line "METHOD PATH VERSION", header lines "Name: value", a blank line, the body.
    const size_t head_end = raw.find("\r\n\r\n");
    const std::string_view head = raw.substr(0, head_end);
    const std::string_view body = head_end == std::string_view::npos ? std::string_view() : raw.substr(head_end + 4);
    const size_t line_end = head.find("\r\n");
    const std::string_view line = head.substr(0, line_end);
    const size_t sp1 = line.find(' ');
    if (sp1 == std::string_view::npos) return 0;   // httplib answers 400 itself
    const std::string_view method = line.substr(0, sp1);
    std::string_view path = line.substr(sp1 + 1);
    path = path.substr(0, path.find(' '));
    path = path.substr(0, path.find('?'));
    std::string_view authorization;
    bool has_auth_header = false;
    for (size_t at = line_end; at != std::string_view::npos && at < head.size();) {
        const size_t next = head.find("\r\n", at + 2);
        const std::string_view h = head.substr(at + 2, next == std::string_view::npos ? head.npos : next - at - 2);
        const size_t colon = h.find(':');
        if (colon != std::string_view::npos && h.substr(0, colon) == "Authorization") {
            authorization = h.substr(colon + 1);
            while (!authorization.empty() && authorization.front() == ' ') authorization.remove_prefix(1);
            has_auth_header = true;
        }
        at = next;
    }

    if (auto refused = check_request_head(method, path, authorization, f.keys, /*private_metrics=*/false)) {
        check_error(*refused);
        return 0;
    }
    // Past the head check: the path is open, or the request carried a valid key.
    FUZZ_CHECK(!needs_key(path, false) || (has_auth_header && authorized(f.keys, authorization)));
    if (method != "POST" || (path != "/v1/chat/completions" && path != "/v1/completions")) return 0;
    try {
        if (body.size() > kMaxBody)
            throw HttpError{413, str("the request body is too large: over ", kMaxBody, " bytes (--max-body-bytes)"),
                            "invalid_request_error", "", ""};
        const Parsed p = parse_request(f.ctx, body, path == "/v1/chat/completions");
        FUZZ_CHECK(!p.prompt.empty() && static_cast<int64_t>(p.prompt.size()) <= f.ctx.limits.max_prompt_tokens);
        for (const int32_t id : p.prompt) FUZZ_CHECK(id >= 0 && id < f.ctx.vocab_size);
        FUZZ_CHECK(p.gen.max_tokens >= 1 && p.gen.max_tokens <= f.ctx.limits.max_completion_tokens);
        FUZZ_CHECK(p.n >= 1 && p.n <= kMaxChoices);
    } catch (const HttpError& e) {
        check_error(e);
    }
    return 0;
}
