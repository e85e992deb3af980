// chat_request_fuzz.cpp — libFuzzer target for an OpenAI request body (chat completions and
// completions) -> the prompt, through the server's own parser (apps/request.h) and the DeepSeek-V4
// chat encoder, tools and tool calls included, with the golden tokenizer.
//
// The first byte picks the endpoint (even: chat, odd: completions), the rest is the body. A body
// is refused only with an HttpError of status 400, 404 or 413 whose error body is OpenAI's shape;
// nothing else may be thrown. For an accepted chat body: the prompt's pieces concatenate to its
// text, special pieces are exactly the chat format's special tokens, ordinary pieces never hold
// an added token once tokenized, and the ids decode back to the prompt text (so no request text
// was lost or forged into a control token). For both endpoints: ids name tokens, the prompt is
// not empty, n and max_tokens are in range.
#include <cstddef>
#include <cstdint>
#include <string>

#include "../apps/request.h"
#include "fuzz_util.h"

using namespace megamoe;

namespace {

const Tokenizer& tokenizer() {
    static const Tokenizer tok = Tokenizer::load(fuzz::fixed_tokenizer_path());
    return tok;
}

RequestContext context() {
    RequestContext c;
    c.tok = &tokenizer();
    c.model_name = "tiny";
    c.vocab_size = 6016;
    c.max_model_len = 4096;
    c.limits.max_prompt_tokens = 3000;
    c.limits.max_completion_tokens = 2000;
    return c;
}

void check_error(const HttpError& e) {
    FUZZ_CHECK(e.status == 400 || e.status == 404 || e.status == 413);
    FUZZ_CHECK(!e.message.empty());
    const auto j = ojson::parse(error_body(e));
    FUZZ_CHECK(j.at("error").at("message").is_string() && j.at("error").at("type").is_string());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    if (size < 1) return 0;
    static const RequestContext ctx = context();
    const Tokenizer& tok = tokenizer();
    const bool chat = data[0] % 2 == 0;
    const std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
    Parsed p;
    try {
        p = parse_request(ctx, text, chat);
    } catch (const HttpError& e) {
        check_error(e);
        return 0;
    }
    FUZZ_CHECK(!p.prompt.empty());
    FUZZ_CHECK(static_cast<int64_t>(p.prompt.size()) <= ctx.limits.max_prompt_tokens);
    for (const int32_t id : p.prompt) FUZZ_CHECK(id >= 0 && id < ctx.vocab_size);
    FUZZ_CHECK(p.n >= 1 && p.n <= kMaxChoices);
    FUZZ_CHECK(p.gen.max_tokens >= 1 && p.gen.max_tokens <= ctx.limits.max_completion_tokens);
    FUZZ_CHECK(p.logprobs >= -1 && p.logprobs <= 20);
    if (!chat) return 0;

    // The same body through the encoder directly: the pieces and their tokens.
    const ojson body = ojson::parse(text);
    const ChatPrompt prompt = chat_prompt(chat_request_from_json(body));   // accepted above: cannot throw
    std::string joined;
    bool prev_ordinary = false;
    const auto& specials = chat_special_tokens();
    for (const ChatPiece& piece : prompt.pieces) {
        joined += piece.text;
        if (piece.special) {
            FUZZ_CHECK(std::find(specials.begin(), specials.end(), piece.text) != specials.end());
            prev_ordinary = false;
        } else {
            FUZZ_CHECK(!prev_ordinary);   // adjacent ordinary pieces are merged
            prev_ordinary = true;
            for (const int32_t id : tok.encode_ordinary(piece.text)) FUZZ_CHECK(!tok.is_added(id));
        }
    }
    FUZZ_CHECK(joined == prompt.text());
    FUZZ_CHECK(tokenize_prompt(tok, prompt) == p.prompt);
    FUZZ_CHECK(tok.decode(p.prompt) == prompt.text());
    FUZZ_CHECK(p.thinking == (prompt.pieces.back().special && prompt.pieces.back().text == "<think>"));
    return 0;
}
