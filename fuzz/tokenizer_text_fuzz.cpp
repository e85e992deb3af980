// tokenizer_text_fuzz.cpp — libFuzzer target for encode -> decode of arbitrary bytes with a fixed
// tokenizer (the golden DeepSeek-V4 tokenizer.json).
//
// Invariants: every id names a token; decode(encode(x)) == x and decode(encode_ordinary(x)) == x
// when x is valid UTF-8, and == utf8_lossy(x) otherwise (encode replaces invalid bytes first);
// encode_ordinary never yields a special token; the streaming decoder, fed one id at a time,
// returns valid UTF-8 pieces that concatenate to decode(); pre_tokenize's pieces concatenate to
// the (lossy) input. Nothing may throw for any input.
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz_util.h"
#include "serve/tokenizer.h"

using namespace megamoe;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static const Tokenizer tok = Tokenizer::load(fuzz::fixed_tokenizer_path());
    const std::string_view text(reinterpret_cast<const char*>(data), size);
    const bool utf8 = fuzz::valid_utf8(text);
    const std::string lossy = utf8_lossy(text);
    FUZZ_CHECK(fuzz::valid_utf8(lossy));
    FUZZ_CHECK(!utf8 || lossy == text);

    const std::vector<int32_t> ids = tok.encode(text);
    for (const int32_t id : ids) FUZZ_CHECK(tok.has_token(id));
    FUZZ_CHECK(tok.decode(ids) == lossy);

    const std::vector<int32_t> ord = tok.encode_ordinary(text);
    for (const int32_t id : ord) FUZZ_CHECK(tok.has_token(id) && !tok.is_added(id));
    FUZZ_CHECK(tok.decode(ord) == lossy);
    FUZZ_CHECK(tok.decode(ord, /*skip_special=*/true) == lossy);
    FUZZ_CHECK(size == 0 || !ord.empty());

    std::string pieces;
    for (const auto& p : tok.pre_tokenize(lossy)) pieces += p;
    FUZZ_CHECK(pieces == lossy);

    for (const bool skip : {false, true}) {
        StreamDecoder dec(tok, skip);
        std::string streamed;
        for (const int32_t id : ids) {
            const std::string piece = dec.push(id);
            FUZZ_CHECK(fuzz::valid_utf8(piece));
            streamed += piece;
        }
        const std::string tail = dec.flush();
        FUZZ_CHECK(fuzz::valid_utf8(tail));
        streamed += tail;
        FUZZ_CHECK(streamed == tok.decode(ids, skip));
    }
    // Token by token, the bytes of the ids are the UTF-8 of the text (the byte-level BPE loses
    // nothing), for the ordinary encoding.
    std::string bytes;
    for (const int32_t id : ord) bytes += tok.token_bytes(id);
    FUZZ_CHECK(bytes == lossy);
    return 0;
}
