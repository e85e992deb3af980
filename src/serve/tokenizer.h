// tokenizer.h — Hugging Face tokenizer.json loader and byte-level BPE tokenizer (DeepSeek-V3/V4).
//
// Reproduces HF `tokenizers` (0.23) for the tokenizer.json shape DeepSeek ships: model BPE over
// the GPT-2 byte-level alphabet, no normalizer, pre_tokenizer = Sequence[Split(regex, Isolated)...,
// ByteLevel(add_prefix_space=false, use_regex=false)], decoder ByteLevel. encode() matches
// `Tokenizer.encode(text, add_special_tokens=False).ids` and decode() matches
// `Tokenizer.decode(ids, skip_special_tokens=...)`. Anything outside that shape (another model
// type, a normalizer, another pre-tokenizer or decoder) is rejected at load with megamoe::Error
// naming the file and the field, rather than tokenized differently from HF.
//
// The Split regexes run on PCRE2 (UTF + UCP, JIT when available) after a small rewrite so that
// PCRE2 classifies characters as HF's Oniguruma does: `\s`/`\S` become the White_Space set
// (U+180E is not whitespace), and \p{L}/\p{M}/\p{N}/\p{P}/\p{S} gain the characters Unicode
// 15-16 added, which PCRE2 10.42 (Unicode 14) does not know. Checked against HF 0.23.2 on every
// code point.
//
// Thread safety: a loaded Tokenizer is safe to use from several threads at once (the per-piece
// BPE cache is behind a mutex). Text is UTF-8; invalid UTF-8 given to encode() is first replaced
// the way Rust's String::from_utf8_lossy does (one U+FFFD per maximal invalid subpart).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace megamoe {

class Tokenizer {
public:
    // Parses and validates `path` (a tokenizer.json). Throws megamoe::Error naming the file and
    // what is wrong: unreadable, not JSON, model.type != "BPE", missing vocab/merges, a merge
    // naming an unknown token, duplicate ids, unsupported normalizer/pre_tokenizer/decoder.
    // added_tokens: lstrip/rstrip/normalized behave as in HF, single_word=true is rejected; HF
    // ignores the stored ids and numbers added tokens itself (vocab id if the content is in the
    // vocab, else the next id), so a file whose ids disagree is rejected rather than renumbered.
    static Tokenizer load(const std::string& path);

    Tokenizer(Tokenizer&&) noexcept;
    Tokenizer& operator=(Tokenizer&&) noexcept;
    ~Tokenizer();

    // HF encode(text, add_special_tokens=False): added tokens occurring in the text are matched
    // as whole tokens (leftmost, then longest), everything between them is pre-tokenized and
    // BPE'd. No BOS/EOS is added. Empty text -> empty vector.
    std::vector<int32_t> encode(std::string_view text) const;

    // Like encode() but never matches added tokens: "<｜User｜>" in the text is BPE'd as
    // ordinary characters. Use for all user-supplied content so it cannot forge control tokens.
    std::vector<int32_t> encode_ordinary(std::string_view text) const;

    // The pieces the Split regexes cut `text` into (as raw UTF-8, before the byte-level mapping),
    // ignoring added tokens: what BPE sees. For tests and debugging; HF's pre_tokenize_str.
    std::vector<std::string> pre_tokenize(std::string_view text) const;

    // HF decode(ids, skip_special_tokens): concatenates token bytes (skipping added tokens marked
    // special when skip_special) and converts to UTF-8 lossily, as HF does: each maximal invalid
    // byte subpart becomes U+FFFD. Throws Error for an id that names no token.
    std::string decode(const std::vector<int32_t>& ids, bool skip_special = false) const;

    // Raw bytes of one token, as decode() uses them (for added tokens: their content, after the
    // byte-level mapping when every character of it is in the byte-level alphabet, as in HF).
    // Throws Error for an id that names no token.
    std::string token_bytes(int32_t id) const;

    // The token's string as written in tokenizer.json (byte-level alphabet, e.g. "Ġthe"; added
    // tokens: their content). Throws Error for an id that names no token.
    const std::string& id_to_token(int32_t id) const;

    // Exact lookup of a token string as written in tokenizer.json, added tokens first
    // (e.g. "<｜User｜>", "Ġthe"); nullopt when absent.
    std::optional<int32_t> token_id(std::string_view token) const;

    bool has_token(int32_t id) const;   // the id names a token (vocab or added); false past vocab_size()
    bool is_special(int32_t id) const;  // an added token with "special": true
    bool is_added(int32_t id) const;    // any entry of added_tokens
    int32_t vocab_size() const;         // max id + 1 over vocab and added tokens
    const std::string& path() const;    // the file it was loaded from

    struct Impl;  // opaque; defined in tokenizer.cpp

private:
    explicit Tokenizer(std::unique_ptr<Impl> impl);
    std::unique_ptr<Impl> impl_;
    friend class StreamDecoder;
};

// Streaming detokenizer: push ids one at a time and get text only once it forms complete UTF-8.
// A multi-byte character split across tokens is held back until its last byte arrives; bytes
// that can no longer become valid UTF-8 come out as U+FFFD exactly as decode() would produce them,
// so concat(push(...)...) + flush() == decode(ids, skip_special). Every returned string is
// valid UTF-8. Keeps a pointer to the Tokenizer, which must outlive it (and not be moved from).
class StreamDecoder {
public:
    explicit StreamDecoder(const Tokenizer& tok, bool skip_special = false);
    std::string push(int32_t id);  // throws Error for an unknown id
    std::string flush();           // the held-back tail (an incomplete sequence -> U+FFFD); resets

private:
    const Tokenizer* tok_;
    bool skip_special_;
    std::string pending_;  // bytes not yet returned: at most an incomplete UTF-8 sequence (< 4)
};

// Rust String::from_utf8_lossy: valid UTF-8 is copied, each maximal invalid subpart -> U+FFFD.
std::string utf8_lossy(std::string_view bytes);

}  // namespace megamoe
