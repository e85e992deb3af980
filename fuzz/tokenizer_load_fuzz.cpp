// tokenizer_load_fuzz.cpp — libFuzzer target for tokenizer.json loading.
//
// Each input is written as a tokenizer.json and loaded. Rejection must be a megamoe::Error. A
// tokenizer that loads must be usable: every id below vocab_size() that names a token has bytes
// and a string, and a short text encodes to ids that name tokens and decodes without throwing.
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz_util.h"
#include "serve/tokenizer.h"

using namespace megamoe;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static const std::filesystem::path path = fuzz::scratch_dir() / "tokenizer.json";
    fuzz::write_file(path, std::string_view(reinterpret_cast<const char*>(data), size));
    std::optional<Tokenizer> tok;
    try {
        tok.emplace(Tokenizer::load(path.string()));
    } catch (const Error&) {
        return 0;   // expected for malformed input
    }
    const int32_t V = tok->vocab_size();
    FUZZ_CHECK(V >= 0);
    for (int32_t id = 0; id < V && id < 4096; ++id) {
        if (!tok->has_token(id)) continue;
        (void)tok->token_bytes(id);
        const std::string& s = tok->id_to_token(id);
        const auto back = tok->token_id(s);
        FUZZ_CHECK(back.has_value());
    }
    FUZZ_CHECK(!tok->has_token(V) && !tok->has_token(-1));
    for (const std::string_view text : {"Hello, world! 123 ", "\xe4\xbd\xa0\xe5\xa5\xbd\n\n  x", "<think>a</think>"}) {
        try {
            for (const int32_t id : tok->encode(text)) FUZZ_CHECK(tok->has_token(id));
            const auto ids = tok->encode_ordinary(text);
            for (const int32_t id : ids) FUZZ_CHECK(tok->has_token(id));
            (void)tok->decode(ids);
        } catch (const Error&) {
            // A vocabulary without some byte cannot encode every text: a clear error is fine.
        }
    }
    return 0;
}
