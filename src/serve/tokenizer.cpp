// tokenizer.cpp — tokenizer.json loading, pre-tokenization (PCRE2), byte-level BPE, decoding.
//
// Encoding pipeline, mirroring HF `tokenizers`:
//   text -> split around added tokens (trie, leftmost-longest) -> for each plain segment, each
//   Split regex in turn cuts every current piece into matches and the gaps between them
//   (Isolated) -> each final piece's bytes -> BPE over byte-level symbols, merging the
//   lowest-rank pair first (leftmost on ties) -> ids.
// BPE results are cached per piece, so the regexes and one hash lookup per piece dominate.
#include "serve/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>

#include "core/common.h"

namespace megamoe {

using json = nlohmann::json;

namespace {

// ---- UTF-8 helpers --------------------------------------------------------------------------

// For a lead byte: sequence length and the allowed range of the second byte (RFC 3629 / Rust:
// no overlongs, no surrogates, nothing above U+10FFFF). len 0 = never valid as a lead.
struct LeadInfo {
    uint8_t len, lo, hi;
};

LeadInfo lead_info(uint8_t b) {
    if (b < 0x80) return {1, 0, 0};
    if (b >= 0xC2 && b <= 0xDF) return {2, 0x80, 0xBF};
    if (b == 0xE0) return {3, 0xA0, 0xBF};
    if (b == 0xED) return {3, 0x80, 0x9F};
    if (b >= 0xE1 && b <= 0xEF) return {3, 0x80, 0xBF};
    if (b == 0xF0) return {4, 0x90, 0xBF};
    if (b >= 0xF1 && b <= 0xF3) return {4, 0x80, 0xBF};
    if (b == 0xF4) return {4, 0x80, 0x8F};
    return {0, 0, 0};
}

// Length of the valid UTF-8 sequence starting at s[i], or 0 if it is invalid or truncated.
// When invalid, *bad is set to the length of the maximal invalid subpart (>= 1).
size_t utf8_seq(std::string_view s, size_t i, size_t* bad) {
    const auto b = static_cast<uint8_t>(s[i]);
    const LeadInfo li = lead_info(b);
    if (li.len == 1) return 1;
    size_t j = i + 1;
    if (li.len == 0 || j >= s.size() || static_cast<uint8_t>(s[j]) < li.lo || static_cast<uint8_t>(s[j]) > li.hi) {
        *bad = 1;
        return 0;
    }
    ++j;
    while (j < i + li.len) {
        if (j >= s.size() || (static_cast<uint8_t>(s[j]) & 0xC0) != 0x80) {
            *bad = j - i;
            return 0;
        }
        ++j;
    }
    return li.len;
}

bool utf8_valid(std::string_view s) {
    size_t i = 0;
    while (i < s.size()) {
        // ASCII fast path, 8 bytes at a time.
        while (i + 8 <= s.size()) {
            uint64_t w;
            std::memcpy(&w, s.data() + i, 8);
            if (w & 0x8080808080808080ULL) break;
            i += 8;
        }
        if (i >= s.size()) break;
        size_t bad = 0;
        const size_t n = utf8_seq(s, i, &bad);
        if (n == 0) return false;
        i += n;
    }
    return true;
}

// Where a trailing, still-completable UTF-8 sequence starts (s.size() when there is none).
// Everything before it decodes the same whatever bytes come next.
size_t utf8_incomplete_tail(std::string_view s) {
    const size_t n = s.size();
    for (size_t k = n; k > 0 && k + 4 > n; --k) {
        const auto b = static_cast<uint8_t>(s[k - 1]);
        if ((b & 0xC0) == 0x80) continue;  // continuation byte: look further back for the lead
        const LeadInfo li = lead_info(b);
        const size_t have = n - (k - 1);
        if (li.len <= 1 || have >= li.len) return n;  // ASCII, invalid lead, or complete
        if (have >= 2) {
            const auto b1 = static_cast<uint8_t>(s[k]);
            if (b1 < li.lo || b1 > li.hi) return n;
            // Any further bytes are continuations (we skipped only those), so the prefix is valid.
        }
        return k - 1;
    }
    return n;
}

// Appends code point cp as UTF-8.
void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
        out += static_cast<char>(cp);
    } else if (cp < 0x800) {
        out += static_cast<char>(0xC0 | (cp >> 6));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        out += static_cast<char>(0xE0 | (cp >> 12));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
        out += static_cast<char>(0xF0 | (cp >> 18));
        out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    }
}

// Decodes the code point of a valid sequence of length n at p.
uint32_t decode_cp(const char* p, size_t n) {
    const auto* u = reinterpret_cast<const uint8_t*>(p);
    switch (n) {
        case 1: return u[0];
        case 2: return (uint32_t(u[0] & 0x1F) << 6) | (u[1] & 0x3F);
        case 3: return (uint32_t(u[0] & 0x0F) << 12) | (uint32_t(u[1] & 0x3F) << 6) | (u[2] & 0x3F);
        default:
            return (uint32_t(u[0] & 0x07) << 18) | (uint32_t(u[1] & 0x3F) << 12) | (uint32_t(u[2] & 0x3F) << 6) |
                   (u[3] & 0x3F);
    }
}

// Unicode White_Space (what Rust's char::is_whitespace and Oniguruma's \s use).
bool is_white_space(uint32_t cp) {
    return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
           cp == 0x3000;
}

// ---- GPT-2 byte-level alphabet --------------------------------------------------------------

// bytes_to_unicode(): printable Latin-1 bytes map to themselves, the other 68 bytes to U+0100..
// in byte order. All code points are below 0x144.
struct ByteLevel {
    std::array<uint32_t, 256> byte_to_cp{};
    std::array<int16_t, 0x144> cp_to_byte{};
    ByteLevel() {
        cp_to_byte.fill(-1);
        uint32_t next = 256;
        for (int b = 0; b < 256; ++b) {
            const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            byte_to_cp[static_cast<size_t>(b)] = printable ? static_cast<uint32_t>(b) : next++;
            cp_to_byte[byte_to_cp[static_cast<size_t>(b)]] = static_cast<int16_t>(b);
        }
    }
};

const ByteLevel& byte_level() {
    static const ByteLevel bl;
    return bl;
}

// The bytes a token string in the byte-level alphabet stands for; false if some character is
// outside the alphabet (e.g. "<｜User｜>").
bool byte_level_to_bytes(std::string_view tok, std::string* out) {
    const ByteLevel& bl = byte_level();
    out->clear();
    size_t i = 0;
    while (i < tok.size()) {
        size_t bad = 0;
        const size_t n = utf8_seq(tok, i, &bad);
        if (n == 0) return false;
        const uint32_t cp = decode_cp(tok.data() + i, n);
        if (cp >= bl.cp_to_byte.size() || bl.cp_to_byte[cp] < 0) return false;
        *out += static_cast<char>(bl.cp_to_byte[cp]);
        i += n;
    }
    return true;
}

// What decode() emits for a token: its byte-level bytes, or, when some character is outside the
// alphabet, the string's own UTF-8 (HF's ByteLevel decoder, applied to added tokens too).
std::string token_string_to_bytes(const std::string& tok) {
    std::string out;
    return byte_level_to_bytes(tok, &out) ? out : tok;
}

// ---- misc -----------------------------------------------------------------------------------

struct StrHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};

template <typename V>
using StrMap = std::unordered_map<std::string, V, StrHash, std::equal_to<>>;

// Owns a compiled PCRE2 pattern.
struct Regex {
    pcre2_code* code = nullptr;
    std::string source;  // as given in tokenizer.json, for messages
    Regex() = default;
    Regex(const Regex&) = delete;
    Regex& operator=(const Regex&) = delete;
    ~Regex() {
        if (code) pcre2_code_free(code);
    }
};

// Per-call matching state (PCRE2 match data is not shareable between threads).
struct MatchData {
    pcre2_match_data* md;
    MatchData() : md(pcre2_match_data_create(1, nullptr)) {
        if (!md) throw std::bad_alloc();
    }
    MatchData(const MatchData&) = delete;
    MatchData& operator=(const MatchData&) = delete;
    ~MatchData() { pcre2_match_data_free(md); }
};

std::string pcre2_message(int code) {
    PCRE2_UCHAR buf[256];
    if (pcre2_get_error_message(code, buf, sizeof(buf)) < 0) return str("PCRE2 error ", code);
    return reinterpret_cast<const char*>(buf);
}

// Code points that Unicode 15.0-16.0 added to the general categories L, M, N, P, S. PCRE2 10.42
// (Debian 12) knows Unicode 14 and treats them as unassigned; the Oniguruma inside HF tokenizers
// 0.23 knows them. Found by running \p{X} over every code point in both (no code point left a
// category, so additions suffice); with a newer PCRE2 they are redundant and harmless.
struct CpRange {
    uint32_t lo, hi;
};
struct CategoryAdditions {
    char category;
    std::vector<CpRange> ranges;
};

const std::vector<CategoryAdditions>& unicode16_additions() {
    static const std::vector<CategoryAdditions> table = {
        {'L', {{0x1C89, 0x1C8A}, {0xA7CB, 0xA7CD}, {0xA7DA, 0xA7DC}, {0x105C0, 0x105F3}, {0x10D4A, 0x10D65},
              {0x10D6F, 0x10D85}, {0x10EC2, 0x10EC4}, {0x1123F, 0x11240}, {0x11380, 0x11389}, {0x1138B, 0x1138B},
              {0x1138E, 0x1138E}, {0x11390, 0x113B5}, {0x113B7, 0x113B7}, {0x113D1, 0x113D1}, {0x113D3, 0x113D3},
              {0x11BC0, 0x11BE0}, {0x11F02, 0x11F02}, {0x11F04, 0x11F10}, {0x11F12, 0x11F33}, {0x1342F, 0x1342F},
              {0x13441, 0x13446}, {0x13460, 0x143FA}, {0x16100, 0x1611D}, {0x16D40, 0x16D6C}, {0x18CFF, 0x18CFF},
              {0x1B132, 0x1B132}, {0x1B155, 0x1B155}, {0x1DF25, 0x1DF2A}, {0x1E030, 0x1E06D}, {0x1E4D0, 0x1E4EB},
              {0x1E5D0, 0x1E5ED}, {0x1E5F0, 0x1E5F0}, {0x2B739, 0x2B739}, {0x2EBF0, 0x2EE5D}, {0x31350, 0x323AF}}},
        {'M', {{0x897, 0x897}, {0xCF3, 0xCF3}, {0xECE, 0xECE}, {0x10D69, 0x10D6D}, {0x10EFC, 0x10EFF},
              {0x11241, 0x11241}, {0x113B8, 0x113C0}, {0x113C2, 0x113C2}, {0x113C5, 0x113C5}, {0x113C7, 0x113CA},
              {0x113CC, 0x113D0}, {0x113D2, 0x113D2}, {0x113E1, 0x113E2}, {0x11F00, 0x11F01}, {0x11F03, 0x11F03},
              {0x11F34, 0x11F3A}, {0x11F3E, 0x11F42}, {0x11F5A, 0x11F5A}, {0x13440, 0x13440}, {0x13447, 0x13455},
              {0x1611E, 0x1612F}, {0x1E08F, 0x1E08F}, {0x1E4EC, 0x1E4EF}, {0x1E5EE, 0x1E5EF}}},
        {'N', {{0x10D40, 0x10D49}, {0x116D0, 0x116E3}, {0x11BF0, 0x11BF9}, {0x11F50, 0x11F59}, {0x16130, 0x16139},
              {0x16D70, 0x16D79}, {0x1CCF0, 0x1CCF9}, {0x1D2C0, 0x1D2D3}, {0x1E4F0, 0x1E4F9}, {0x1E5F1, 0x1E5FA}}},
        {'P', {{0x1B4E, 0x1B4F}, {0x1B7F, 0x1B7F}, {0x10D6E, 0x10D6E}, {0x113D4, 0x113D5}, {0x113D7, 0x113D8},
              {0x11B00, 0x11B09}, {0x11BE1, 0x11BE1}, {0x11F43, 0x11F4F}, {0x16D6D, 0x16D6F}, {0x1E5FF, 0x1E5FF}}},
        {'S', {{0x2427, 0x2429}, {0x2FFC, 0x2FFF}, {0x31E4, 0x31E5}, {0x31EF, 0x31EF}, {0x10D8E, 0x10D8F},
              {0x1CC00, 0x1CCEF}, {0x1CD00, 0x1CEB3}, {0x1F6DC, 0x1F6DC}, {0x1F774, 0x1F776}, {0x1F77B, 0x1F77F},
              {0x1F7D9, 0x1F7D9}, {0x1F8B2, 0x1F8BB}, {0x1F8C0, 0x1F8C1}, {0x1FA75, 0x1FA77}, {0x1FA87, 0x1FA89},
              {0x1FA8F, 0x1FA8F}, {0x1FAAD, 0x1FAAF}, {0x1FABB, 0x1FABF}, {0x1FAC6, 0x1FAC6}, {0x1FACE, 0x1FACF},
              {0x1FADA, 0x1FADC}, {0x1FADF, 0x1FADF}, {0x1FAE8, 0x1FAE9}, {0x1FAF7, 0x1FAF8}, {0x1FBCB, 0x1FBEF}}},
    };
    return table;
}

// The additions of one category as PCRE2 class items ("\x{1C89}-\x{1C8A}..."); empty when none.
std::string unicode16_class_items(char category) {
    std::string items;
    for (const CategoryAdditions& c : unicode16_additions()) {
        if (c.category != category) continue;
        for (const CpRange& r : c.ranges) {
            items += str("\\x{", std::hex, r.lo, "}");
            if (r.hi != r.lo) items += str("-\\x{", std::hex, r.hi, "}");
        }
    }
    return items;
}

// True if text has a character on which PCRE2's own classes and Oniguruma's differ: U+180E or a
// Unicode 15-16 addition. All of them are >= U+0800, so only 3- and 4-byte sequences are looked
// at. Text without any (nearly all text) can use the unmodified, faster patterns.
bool needs_exact_classes(std::string_view text) {
    static const std::vector<CpRange> merged = [] {
        std::vector<CpRange> all{{0x180E, 0x180E}};
        for (const CategoryAdditions& c : unicode16_additions()) all.insert(all.end(), c.ranges.begin(), c.ranges.end());
        std::sort(all.begin(), all.end(), [](const CpRange& x, const CpRange& y) { return x.lo < y.lo; });
        return all;
    }();
    const auto* p = reinterpret_cast<const uint8_t*>(text.data());
    const size_t n = text.size();
    for (size_t i = 0; i < n; ++i) {
        if (p[i] < 0xE0) continue;  // ASCII, 2-byte leads and continuation bytes
        const size_t len = p[i] >= 0xF0 ? 4 : 3;
        if (i + len > n) break;  // cannot happen for valid UTF-8
        const uint32_t cp = decode_cp(text.data() + i, len);
        auto it = std::upper_bound(merged.begin(), merged.end(), cp,
                                   [](uint32_t v, const CpRange& r) { return v < r.lo; });
        if (it != merged.begin() && cp <= std::prev(it)->hi) return true;
        i += len - 1;
    }
    return false;
}

// Rewrites an Oniguruma pattern so that PCRE2 classifies characters as HF does:
//  - \s and \S become explicit White_Space classes (PCRE2's \s also takes U+180E, Oniguruma's
//    does not);
//  - \p{L}, \p{M}, \p{N}, \p{P}, \p{S} (and \P{..} outside classes) gain the Unicode 15-16
//    additions above.
// Everything else passes through unchanged: the rest of the syntax DeepSeek uses (classes with
// escapes, literal UTF-8, ranges, lookahead) means the same to both engines.
std::string rewrite_pattern(const std::string& pat, const std::string& where) {
    static const char* const kSpace = "\\t\\n\\x0B\\f\\r\\x20\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}"
                                      "\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}";
    std::string out;
    out.reserve(pat.size() + 256);
    bool in_class = false;
    for (size_t i = 0; i < pat.size(); ++i) {
        const char c = pat[i];
        if (c == '\\' && i + 1 < pat.size()) {
            const char e = pat[i + 1];
            if (e == 's') {
                out += in_class ? std::string(kSpace) : str("[", kSpace, "]");
            } else if (e == 'S') {
                if (in_class) fail(where, ": \\S inside a character class is not supported");
                out += str("[^", kSpace, "]");
            } else if (e == 'Q') {
                fail(where, ": \\Q...\\E quoting is not supported");
            } else if ((e == 'p' || e == 'P') && i + 4 < pat.size() && pat[i + 2] == '{' && pat[i + 4] == '}' &&
                       !unicode16_class_items(pat[i + 3]).empty()) {
                const std::string items = str("\\p{", pat[i + 3], "}", unicode16_class_items(pat[i + 3]));
                if (e == 'P' && in_class) fail(where, ": \\P{..} inside a character class is not supported");
                out += in_class ? items : str(e == 'P' ? "[^" : "[", items, "]");
                i += 3;  // plus the 2 below: past the closing brace
            } else {
                out += c;
                out += e;
            }
            ++i;
            continue;
        }
        if (!in_class && c == '[') {
            in_class = true;
            out += c;
            // A ']' right after '[' or '[^' is a literal, not the end of the class.
            if (i + 1 < pat.size() && pat[i + 1] == '^') out += pat[++i];
            if (i + 1 < pat.size() && pat[i + 1] == ']') out += pat[++i];
            continue;
        }
        if (in_class && c == '[') fail(where, ": nested character classes are not supported");
        if (in_class && c == ']') in_class = false;
        out += c;
    }
    return out;
}

// Compiles one Split pattern. `exact` applies rewrite_pattern (see above); literal patterns
// ({"String": ...}) are matched as plain text.
std::unique_ptr<Regex> compile_regex(const std::string& pattern, bool literal, bool exact, const std::string& where) {
    auto re = std::make_unique<Regex>();
    re->source = pattern;
    const std::string pat = literal || !exact ? pattern : rewrite_pattern(pattern, where);
    int err = 0;
    PCRE2_SIZE off = 0;
    const uint32_t opts = PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0);
    re->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pat.data()), pat.size(), opts, &err, &off, nullptr);
    if (!re->code) fail(where, ": regex does not compile (", pcre2_message(err), " at offset ", off, "): ", pattern);
    // JIT is an optimisation only: the interpreter gives the same matches, so ignore failure.
    (void)pcre2_jit_compile(re->code, PCRE2_JIT_COMPLETE);
    return re;
}

// A Split step, compiled twice: `fast` is the pattern as written (PCRE2's own classes), `exact`
// has Oniguruma's classes. They match identically on text for which needs_exact_classes() is
// false; the extra ranges make `exact` about twice as slow, so it is used only when needed.
struct SplitRegex {
    std::unique_ptr<Regex> fast, exact;
};

// Trie over added-token contents for leftmost-longest matching (HF uses Aho-Corasick with
// MatchKind::LeftmostLongest; scanning start positions left to right and taking the longest
// token at the first position that has one is the same thing).
class Trie {
public:
    Trie() { root_.fill(-1); }
    bool empty() const { return nodes_.empty(); }

    void insert(std::string_view s, int32_t value) {
        if (s.empty()) return;
        int32_t node = root_[static_cast<uint8_t>(s[0])];
        if (node < 0) node = root_[static_cast<uint8_t>(s[0])] = new_node();
        for (size_t i = 1; i < s.size(); ++i) {
            int32_t child = find_child(node, static_cast<uint8_t>(s[i]));
            if (child < 0) {
                child = new_node();
                nodes_[static_cast<size_t>(node)].children.emplace_back(static_cast<uint8_t>(s[i]), child);
            }
            node = child;
        }
        nodes_[static_cast<size_t>(node)].value = value;
    }

    // First match at or after `from`: sets start/len/value and returns true.
    bool find(std::string_view s, size_t from, size_t* start, size_t* len, int32_t* value) const {
        for (size_t i = from; i < s.size(); ++i) {
            int32_t node = root_[static_cast<uint8_t>(s[i])];
            if (node < 0) continue;
            size_t best = 0;
            int32_t best_value = -1;
            for (size_t j = i + 1;; ++j) {
                const Node& n = nodes_[static_cast<size_t>(node)];
                if (n.value >= 0) {
                    best = j - i;
                    best_value = n.value;
                }
                if (j >= s.size()) break;
                node = find_child(node, static_cast<uint8_t>(s[j]));
                if (node < 0) break;
            }
            if (best_value >= 0) {
                *start = i;
                *len = best;
                *value = best_value;
                return true;
            }
        }
        return false;
    }

private:
    struct Node {
        int32_t value = -1;
        std::vector<std::pair<uint8_t, int32_t>> children;
    };
    int32_t new_node() {
        nodes_.emplace_back();
        return static_cast<int32_t>(nodes_.size() - 1);
    }
    int32_t find_child(int32_t node, uint8_t b) const {
        for (const auto& [cb, child] : nodes_[static_cast<size_t>(node)].children)
            if (cb == b) return child;
        return -1;
    }
    std::array<int32_t, 256> root_;
    std::vector<Node> nodes_;
};

struct AddedToken {
    int32_t id;
    std::string content;
    bool special, lstrip, rstrip, normalized;
};

struct MergeValue {
    int32_t rank;
    int32_t new_id;
};

enum class Kind : uint8_t { none, vocab, added, special };

constexpr size_t kCacheLimit = 1 << 16;  // pieces; cleared when full (working sets are small)

}  // namespace

// ---- Tokenizer::Impl ------------------------------------------------------------------------

struct Tokenizer::Impl {
    std::string path;
    std::vector<std::string> id_token;  // as written in the file; "" for unused ids
    std::vector<std::string> id_bytes;  // what decode() emits
    std::vector<Kind> id_kind;
    StrMap<int32_t> vocab;               // model.vocab: token string -> id
    StrMap<int32_t> added_by_content;    // added_tokens: content -> id
    StrMap<int32_t> vocab_by_bytes;      // for ignore_merges: raw bytes -> id
    std::array<int32_t, 256> byte_id{};  // id of each single-byte symbol, -1 if not in vocab
    std::unordered_map<uint64_t, MergeValue> merges;
    bool ignore_merges = false;
    std::vector<SplitRegex> splits;
    std::vector<AddedToken> added;
    Trie trie_raw, trie_normalized;  // added tokens with normalized false / true; values index `added`

    mutable std::mutex cache_mu;
    mutable StrMap<std::vector<int32_t>> cache;

    // BPE working state: a linked list of symbols and a heap of candidate merges.
    struct Symbol {
        int32_t id, prev, next;
        bool alive;
    };
    struct Candidate {
        int32_t rank, pos, new_id;
    };

    static uint64_t pair_key(int32_t a, int32_t b) {
        return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
    }

    const MergeValue* find_merge(int32_t a, int32_t b) const {
        auto it = merges.find(pair_key(a, b));
        return it == merges.end() ? nullptr : &it->second;
    }

    void bpe(std::string_view piece, std::vector<int32_t>& out) const;
    void encode_piece(std::string_view piece, std::vector<int32_t>& out) const;
    template <typename Sink>
    void pretokenize(size_t stage, std::string_view s, bool exact, Sink& sink, MatchData& m) const;
    void encode_plain(std::string_view s, std::vector<int32_t>& out) const;
    void encode_with_added(std::string_view s, size_t trie_level, std::vector<int32_t>& out) const;
    void check_id(int32_t id, const char* what) const {
        if (id < 0 || static_cast<size_t>(id) >= id_kind.size() || id_kind[static_cast<size_t>(id)] == Kind::none)
            fail("tokenizer ", path, ": ", what, ": unknown token id ", id);
    }
};

// Standard HF BPE: symbols are the piece's bytes; repeatedly merge the adjacent pair with the
// lowest merge rank (leftmost among equal ranks) until no pair has a merge. A heap keeps this
// O(n log n) for long pieces (runs of CJK or repeated characters).
void Tokenizer::Impl::bpe(std::string_view piece, std::vector<int32_t>& out) const {
    std::vector<Symbol> sym;
    sym.reserve(piece.size());
    for (char c : piece) {
        const int32_t id = byte_id[static_cast<uint8_t>(c)];
        if (id < 0) continue;  // HF drops characters missing from the vocab when there is no unk
        const auto n = static_cast<int32_t>(sym.size());
        sym.push_back({id, n - 1, n + 1, true});
    }
    if (sym.empty()) return;
    sym.back().next = -1;

    auto later = [](const Candidate& x, const Candidate& y) {
        return x.rank != y.rank ? x.rank > y.rank : x.pos > y.pos;  // min-heap on (rank, pos)
    };
    std::vector<Candidate> heap;
    for (size_t i = 0; i + 1 < sym.size(); ++i)
        if (const MergeValue* m = find_merge(sym[i].id, sym[i + 1].id))
            heap.push_back({m->rank, static_cast<int32_t>(i), m->new_id});
    std::make_heap(heap.begin(), heap.end(), later);

    while (!heap.empty()) {
        std::pop_heap(heap.begin(), heap.end(), later);
        const Candidate top = heap.back();
        heap.pop_back();
        Symbol& left = sym[static_cast<size_t>(top.pos)];
        if (!left.alive || left.next < 0) continue;
        Symbol& right = sym[static_cast<size_t>(left.next)];
        // Stale entry: one side has merged with something else since it was pushed. Symbols only
        // grow, so a pair yielding the same new id is the same pair.
        const MergeValue* now = find_merge(left.id, right.id);
        if (!now || now->new_id != top.new_id) continue;
        left.id = top.new_id;
        right.alive = false;
        left.next = right.next;
        if (left.next >= 0) sym[static_cast<size_t>(left.next)].prev = top.pos;
        if (left.prev >= 0) {
            if (const MergeValue* m = find_merge(sym[static_cast<size_t>(left.prev)].id, left.id)) {
                heap.push_back({m->rank, left.prev, m->new_id});
                std::push_heap(heap.begin(), heap.end(), later);
            }
        }
        if (left.next >= 0) {
            if (const MergeValue* m = find_merge(left.id, sym[static_cast<size_t>(left.next)].id)) {
                heap.push_back({m->rank, top.pos, m->new_id});
                std::push_heap(heap.begin(), heap.end(), later);
            }
        }
    }
    // Symbol 0 is never merged away (merges absorb the right symbol), so walk from it.
    for (int32_t i = 0; i >= 0; i = sym[static_cast<size_t>(i)].next) out.push_back(sym[static_cast<size_t>(i)].id);
}

void Tokenizer::Impl::encode_piece(std::string_view piece, std::vector<int32_t>& out) const {
    if (piece.size() == 1) {
        const int32_t id = byte_id[static_cast<uint8_t>(piece[0])];
        if (id >= 0) out.push_back(id);
        return;
    }
    if (ignore_merges) {
        auto it = vocab_by_bytes.find(piece);
        if (it != vocab_by_bytes.end()) {
            out.push_back(it->second);
            return;
        }
    }
    {
        std::lock_guard<std::mutex> lock(cache_mu);
        auto it = cache.find(piece);
        if (it != cache.end()) {
            out.insert(out.end(), it->second.begin(), it->second.end());
            return;
        }
    }
    const size_t first = out.size();
    bpe(piece, out);
    std::vector<int32_t> ids(out.begin() + static_cast<std::ptrdiff_t>(first), out.end());
    std::lock_guard<std::mutex> lock(cache_mu);
    if (cache.size() >= kCacheLimit) cache.clear();
    cache.emplace(std::string(piece), std::move(ids));
}

// Applies Split regex `stage` to s: every match and every gap between matches becomes a piece
// for the next stage (HF "Isolated"); after the last stage each piece is BPE'd. Each piece is
// its own subject, so a lookahead like \s+(?!\S) cannot see past the piece's end (as in HF).
template <typename Sink>
void Tokenizer::Impl::pretokenize(size_t stage, std::string_view s, bool exact, Sink& sink, MatchData& m) const {
    if (s.empty()) return;
    if (stage == splits.size()) {
        sink(s);
        return;
    }
    const Regex& re = exact ? *splits[stage].exact : *splits[stage].fast;
    const pcre2_code* code = re.code;
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    size_t pos = 0, prev = 0;
    size_t last_match_end = std::string_view::npos;
    while (pos <= s.size()) {
        // NO_UTF_CHECK: the text was validated once up front; checking here would make the
        // repeated calls on one subject quadratic.
        const int rc = pcre2_match(code, subject, s.size(), pos, PCRE2_NO_UTF_CHECK, m.md, nullptr);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0)
            fail("tokenizer ", path, ": matching pre_tokenizer regex ", re.source, ": ", pcre2_message(rc));
        const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(m.md);
        const size_t ms = ov[0], me = ov[1];
        if (ms == me && me == last_match_end) {
            // An empty match right after the previous match: step one character (as the onig
            // crate's find_iter does) so the loop advances.
            if (pos >= s.size()) break;
            size_t bad = 0;
            const size_t n = utf8_seq(s, pos, &bad);
            pos += n ? n : 1;
            continue;
        }
        if (ms > prev) pretokenize(stage + 1, s.substr(prev, ms - prev), exact, sink, m);
        if (me > ms) pretokenize(stage + 1, s.substr(ms, me - ms), exact, sink, m);
        prev = me;
        last_match_end = me;
        pos = me;
    }
    if (prev < s.size()) pretokenize(stage + 1, s.substr(prev), exact, sink, m);
}

void Tokenizer::Impl::encode_plain(std::string_view s, std::vector<int32_t>& out) const {
    MatchData m;
    auto sink = [&](std::string_view piece) { encode_piece(piece, out); };
    pretokenize(0, s, needs_exact_classes(s), sink, m);
}

// HF AddedVocabulary: first split on added tokens with normalized=false, then split what is left
// on those with normalized=true (there is no normalizer, so both see the same text), then the
// plain segments go through pre-tokenization and BPE.
void Tokenizer::Impl::encode_with_added(std::string_view s, size_t trie_level, std::vector<int32_t>& out) const {
    if (s.empty()) return;
    if (trie_level == 2) {
        encode_plain(s, out);
        return;
    }
    const Trie& trie = trie_level == 0 ? trie_raw : trie_normalized;
    if (trie.empty()) {
        encode_with_added(s, trie_level + 1, out);
        return;
    }
    size_t offset = 0;  // start of the text not yet emitted
    size_t search = 0;
    size_t ms = 0, mlen = 0;
    int32_t value = -1;
    while (trie.find(s, search, &ms, &mlen, &value)) {
        const AddedToken& tok = added[static_cast<size_t>(value)];
        size_t start = ms, stop = ms + mlen;
        // lstrip/rstrip: the token also swallows the whitespace around it (never text that an
        // earlier match already took).
        if (tok.lstrip) {
            while (start > offset) {
                size_t k = start - 1;
                while (k > offset && (static_cast<uint8_t>(s[k]) & 0xC0) == 0x80) --k;
                size_t bad = 0;
                const size_t n = utf8_seq(s, k, &bad);
                if (n == 0 || !is_white_space(decode_cp(s.data() + k, n))) break;
                start = k;
            }
        }
        if (tok.rstrip) {
            while (stop < s.size()) {
                size_t bad = 0;
                const size_t n = utf8_seq(s, stop, &bad);
                if (n == 0 || !is_white_space(decode_cp(s.data() + stop, n))) break;
                stop += n;
            }
        }
        if (start > offset) encode_with_added(s.substr(offset, start - offset), trie_level + 1, out);
        out.push_back(tok.id);
        offset = stop;
        search = stop;
    }
    if (offset < s.size()) encode_with_added(s.substr(offset), trie_level + 1, out);
}

// ---- loading --------------------------------------------------------------------------------

namespace {

const json& need(const json& obj, const char* key, const std::string& where) {
    if (!obj.is_object()) fail(where, ": expected an object");
    auto it = obj.find(key);
    if (it == obj.end()) fail(where, ": missing field '", key, "'");
    return *it;
}

std::string need_string(const json& obj, const char* key, const std::string& where) {
    const json& v = need(obj, key, where);
    if (!v.is_string()) fail(where, ": field '", key, "' must be a string");
    return v.get<std::string>();
}

bool opt_bool(const json& obj, const char* key, bool dflt, const std::string& where) {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return dflt;
    if (!it->is_boolean()) fail(where, ": field '", key, "' must be a boolean");
    return it->get<bool>();
}

int32_t to_id(const json& v, const std::string& where) {
    if (!v.is_number_integer() && !v.is_number_unsigned()) fail(where, ": token id must be an integer");
    const int64_t id = v.get<int64_t>();
    if (id < 0 || id >= (int64_t{1} << 30)) fail(where, ": token id ", id, " out of range");
    return static_cast<int32_t>(id);
}

bool is_null_or_empty(const json& obj, const char* key) {
    auto it = obj.find(key);
    return it == obj.end() || it->is_null() || (it->is_string() && it->get<std::string>().empty());
}

void set_token(Tokenizer::Impl& t, int32_t id, const std::string& token, Kind kind) {
    const auto i = static_cast<size_t>(id);
    if (i >= t.id_kind.size()) {
        t.id_kind.resize(i + 1, Kind::none);
        t.id_token.resize(i + 1);
        t.id_bytes.resize(i + 1);
    }
    t.id_kind[i] = kind;
    t.id_token[i] = token;
    t.id_bytes[i] = token_string_to_bytes(token);
}

void load_model(Tokenizer::Impl& t, const json& root, const std::string& file) {
    const std::string where = file + ": model";
    const json& model = need(root, "model", file);
    if (!model.is_object()) fail(where, ": must be an object");
    auto type = model.find("type");
    if (type != model.end() && !(type->is_string() && *type == "BPE"))
        fail(where, ".type: only \"BPE\" is supported, got ", type->dump());
    if (type == model.end() && !model.contains("merges")) fail(where, ": missing field 'type'");
    if (!is_null_or_empty(model, "dropout") && !(model["dropout"].is_number() && model["dropout"] == 0.0))
        fail(where, ".dropout: BPE dropout is not supported");
    if (!is_null_or_empty(model, "continuing_subword_prefix"))
        fail(where, ".continuing_subword_prefix is not supported");
    if (!is_null_or_empty(model, "end_of_word_suffix")) fail(where, ".end_of_word_suffix is not supported");
    // unk_token and byte_fallback cannot matter: every byte is a symbol of the byte-level alphabet.
    t.ignore_merges = opt_bool(model, "ignore_merges", false, where);

    const json& vocab = need(model, "vocab", where);
    if (!vocab.is_object()) fail(where, ".vocab: must be an object (token -> id)");
    // The id tables are dense (indexed by id), so ids far past the number of entries would make a
    // small file allocate gigabytes: found by tokenizer_load_fuzz (an id of ~1.1e8 in a 4.8 KB file
    // asked for 3.5 GB). Real vocabularies number their tokens densely from 0 (DeepSeek-V4's:
    // 0 .. 127999); holes up to as many ids again as there are entries, plus 1024, are accepted.
    const int64_t id_cap = 2 * static_cast<int64_t>(vocab.size()) + 1024;
    std::vector<bool> seen;
    t.vocab.reserve(vocab.size());
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
        const int32_t id = to_id(it.value(), str(where, ".vocab[\"", it.key(), "\"]"));
        if (id >= id_cap)
            fail(where, ".vocab[\"", it.key(), "\"]: id ", id, " is far past the ", vocab.size(),
                 " entries of the vocab (ids must be below ", id_cap, ")");
        const auto i = static_cast<size_t>(id);
        if (i >= seen.size()) seen.resize(i + 1, false);
        if (seen[i]) fail(where, ".vocab: duplicate id ", id, " (\"", it.key(), "\" and \"", t.id_token[i], "\")");
        seen[i] = true;
        set_token(t, id, it.key(), Kind::vocab);
        t.vocab.emplace(it.key(), id);
    }
    if (t.vocab.empty()) fail(where, ".vocab: is empty");

    const ByteLevel& bl = byte_level();
    for (size_t b = 0; b < 256; ++b) {
        std::string s;
        append_utf8(s, bl.byte_to_cp[b]);
        auto it = t.vocab.find(s);
        t.byte_id[b] = it == t.vocab.end() ? -1 : it->second;
    }
    if (t.ignore_merges) {
        // HF looks the byte-level piece up in the vocab; tokens outside the alphabet never match.
        std::string bytes;
        for (const auto& [tok, id] : t.vocab)
            if (byte_level_to_bytes(tok, &bytes)) t.vocab_by_bytes.emplace(bytes, id);
    }

    const json& merges = need(model, "merges", where);
    if (!merges.is_array()) fail(where, ".merges: must be an array");
    t.merges.reserve(merges.size() * 2);
    int32_t rank = 0;
    std::string joined;
    for (const json& m : merges) {
        std::string a, b;
        if (m.is_string()) {
            const std::string& s = m.get_ref<const std::string&>();
            const size_t sp = s.find(' ');
            if (sp == std::string::npos || sp == 0 || sp + 1 == s.size() || s.find(' ', sp + 1) != std::string::npos)
                fail(where, ".merges[", rank, "]: expected \"left right\", got \"", s, "\"");
            a = s.substr(0, sp);
            b = s.substr(sp + 1);
        } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
            a = m[0].get<std::string>();
            b = m[1].get<std::string>();
        } else {
            fail(where, ".merges[", rank, "]: expected a \"left right\" string or a [left, right] pair");
        }
        joined.assign(a).append(b);
        auto ia = t.vocab.find(a), ib = t.vocab.find(b), ic = t.vocab.find(joined);
        if (ia == t.vocab.end()) fail(where, ".merges[", rank, "]: unknown token \"", a, "\"");
        if (ib == t.vocab.end()) fail(where, ".merges[", rank, "]: unknown token \"", b, "\"");
        if (ic == t.vocab.end()) fail(where, ".merges[", rank, "]: merged token \"", joined, "\" is not in the vocab");
        // A repeated pair keeps its last rank, as HF's HashMap collect does.
        t.merges[Tokenizer::Impl::pair_key(ia->second, ib->second)] = {rank, ic->second};
        ++rank;
    }
}

void load_added_tokens(Tokenizer::Impl& t, const json& root, const std::string& file) {
    auto it = root.find("added_tokens");
    if (it == root.end() || it->is_null()) return;
    const std::string where = file + ": added_tokens";
    if (!it->is_array()) fail(where, ": must be an array");
    const auto vocab_len = static_cast<int64_t>(t.vocab.size());
    int64_t max_added = -1;
    for (size_t k = 0; k < it->size(); ++k) {
        const json& e = (*it)[k];
        const std::string w = str(where, "[", k, "]");
        if (!e.is_object()) fail(w, ": must be an object");
        AddedToken a;
        a.id = to_id(need(e, "id", w), w + ".id");
        a.content = need_string(e, "content", w);
        if (a.content.empty()) fail(w, ".content: is empty");
        if (!utf8_valid(a.content)) fail(w, ".content: is not valid UTF-8");
        a.special = opt_bool(e, "special", false, w);
        a.lstrip = opt_bool(e, "lstrip", false, w);
        a.rstrip = opt_bool(e, "rstrip", false, w);
        a.normalized = opt_bool(e, "normalized", !a.special, w);
        if (opt_bool(e, "single_word", false, w)) fail(w, ".single_word: true is not supported");
        if (!t.added_by_content.emplace(a.content, a.id).second) fail(w, ": duplicate content \"", a.content, "\"");
        // HF does not use the stored id (AddedVocabulary::add_tokens): content already in the
        // vocab keeps its vocab id (DeepSeek's BOS/EOS/pad), anything else gets the next id after
        // the vocab and the added tokens so far. A file that disagrees would be renumbered by HF
        // (with only a log warning), so refuse it instead of guessing which ids the model uses.
        const auto in_vocab = t.vocab.find(a.content);
        const int64_t hf_id = in_vocab != t.vocab.end()              ? in_vocab->second
                              : (max_added >= vocab_len || vocab_len == 0) ? max_added + 1
                                                                           : vocab_len;
        if (a.id != hf_id)
            fail(w, ": id ", a.id, " for \"", a.content, "\", but HF tokenizers would assign it id ", hf_id,
                 in_vocab != t.vocab.end() ? " (its id in model.vocab)" : " (the next id after the vocab)");
        if (in_vocab == t.vocab.end() && static_cast<size_t>(a.id) < t.id_kind.size() &&
            t.id_kind[static_cast<size_t>(a.id)] != Kind::none)
            fail(w, ": duplicate id ", a.id, " (also \"", t.id_token[static_cast<size_t>(a.id)], "\")");
        max_added = std::max(max_added, hf_id);
        set_token(t, a.id, a.content, a.special ? Kind::special : Kind::added);
        (a.normalized ? t.trie_normalized : t.trie_raw).insert(a.content, static_cast<int32_t>(t.added.size()));
        t.added.push_back(std::move(a));
    }
}

void load_pipeline(Tokenizer::Impl& t, const json& root, const std::string& file) {
    // normalizer: none (null, or an empty Sequence).
    if (auto n = root.find("normalizer"); n != root.end() && !n->is_null()) {
        const bool empty_seq = n->is_object() && n->value("type", "") == "Sequence" && n->contains("normalizers") &&
                               (*n)["normalizers"].is_array() && (*n)["normalizers"].empty();
        if (!empty_seq)
            fail(file, ": normalizer: only null is supported, got ",
                 n->is_object() ? n->value("type", std::string("?")) : n->dump());
    }

    // pre_tokenizer: Split(Isolated)* then ByteLevel(add_prefix_space=false, use_regex=false).
    const json& pre = need(root, "pre_tokenizer", file);
    std::vector<const json*> steps;
    const std::string pw = file + ": pre_tokenizer";
    if (!pre.is_object()) fail(pw, ": must be an object");
    if (need_string(pre, "type", pw) == "Sequence") {
        const json& list = need(pre, "pretokenizers", pw);
        if (!list.is_array()) fail(pw, ".pretokenizers: must be an array");
        for (const json& s : list) steps.push_back(&s);
    } else {
        steps.push_back(&pre);
    }
    bool have_byte_level = false;
    for (size_t k = 0; k < steps.size(); ++k) {
        const json& s = *steps[k];
        const std::string w = steps.size() > 1 || &s != &pre ? str(pw, ".pretokenizers[", k, "]") : pw;
        const std::string type = need_string(s, "type", w);
        if (have_byte_level) fail(w, ": ", type, " after ByteLevel is not supported");
        if (type == "Split") {
            const std::string behavior = need_string(s, "behavior", w);
            if (behavior != "Isolated") fail(w, ".behavior: only \"Isolated\" is supported, got \"", behavior, "\"");
            if (opt_bool(s, "invert", false, w)) fail(w, ".invert: true is not supported");
            const json& pat = need(s, "pattern", w);
            const bool is_regex = pat.is_object() && pat.contains("Regex") && pat["Regex"].is_string();
            const bool is_string = pat.is_object() && pat.contains("String") && pat["String"].is_string();
            if (!is_regex && !is_string) fail(w, ".pattern: expected {\"Regex\": ...} or {\"String\": ...}");
            const std::string text = pat[is_regex ? "Regex" : "String"].get<std::string>();
            const std::string pw2 = w + (is_regex ? ".pattern.Regex" : ".pattern.String");
            t.splits.push_back({compile_regex(text, !is_regex, false, pw2), compile_regex(text, !is_regex, true, pw2)});
        } else if (type == "ByteLevel") {
            if (opt_bool(s, "add_prefix_space", false, w)) fail(w, ".add_prefix_space: true is not supported");
            if (opt_bool(s, "use_regex", true, w)) fail(w, ".use_regex: true is not supported");
            have_byte_level = true;
        } else {
            fail(w, ".type: unsupported pre-tokenizer \"", type, "\" (supported: Split, ByteLevel)");
        }
    }
    if (!have_byte_level) fail(pw, ": must end with a ByteLevel pre-tokenizer");

    const json& dec = need(root, "decoder", file);
    if (!dec.is_object() || need_string(dec, "type", file + ": decoder") != "ByteLevel")
        fail(file, ": decoder: only ByteLevel is supported, got ",
             dec.is_object() && dec.contains("type") ? dec["type"].dump() : dec.dump());
}

}  // namespace

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::load(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) fail("tokenizer ", path, ": cannot open file");
    std::stringstream ss;
    ss << in.rdbuf();
    if (in.bad()) fail("tokenizer ", path, ": read error");
    json root;
    try {
        root = json::parse(ss.str());
    } catch (const json::exception& e) {
        fail("tokenizer ", path, ": not valid JSON: ", e.what());
    }
    if (!root.is_object()) fail("tokenizer ", path, ": top level must be a JSON object");
    auto impl = std::make_unique<Impl>();
    impl->path = path;
    const std::string file = "tokenizer " + path;
    try {
        load_model(*impl, root, file);
        load_added_tokens(*impl, root, file);
        load_pipeline(*impl, root, file);
    } catch (const json::exception& e) {
        // Wrong JSON types that the checks above did not anticipate.
        fail(file, ": malformed: ", e.what());
    }
    return Tokenizer(std::move(impl));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
    std::vector<int32_t> out;
    out.reserve(text.size() / 3 + 4);
    if (utf8_valid(text)) {
        impl_->encode_with_added(text, 0, out);
    } else {
        const std::string fixed = utf8_lossy(text);
        impl_->encode_with_added(fixed, 0, out);
    }
    return out;
}

std::vector<int32_t> Tokenizer::encode_ordinary(std::string_view text) const {
    std::vector<int32_t> out;
    out.reserve(text.size() / 3 + 4);
    if (utf8_valid(text)) {
        impl_->encode_plain(text, out);
    } else {
        const std::string fixed = utf8_lossy(text);
        impl_->encode_plain(fixed, out);
    }
    return out;
}

std::vector<std::string> Tokenizer::pre_tokenize(std::string_view text) const {
    const std::string fixed = utf8_valid(text) ? std::string(text) : utf8_lossy(text);
    std::vector<std::string> pieces;
    MatchData m;
    auto sink = [&](std::string_view piece) { pieces.emplace_back(piece); };
    impl_->pretokenize(0, fixed, needs_exact_classes(fixed), sink, m);
    return pieces;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
    std::string bytes;
    for (int32_t id : ids) {
        impl_->check_id(id, "decode");
        if (skip_special && impl_->id_kind[static_cast<size_t>(id)] == Kind::special) continue;
        bytes += impl_->id_bytes[static_cast<size_t>(id)];
    }
    return utf8_valid(bytes) ? bytes : utf8_lossy(bytes);
}

std::string Tokenizer::token_bytes(int32_t id) const {
    impl_->check_id(id, "token_bytes");
    return impl_->id_bytes[static_cast<size_t>(id)];
}

const std::string& Tokenizer::id_to_token(int32_t id) const {
    impl_->check_id(id, "id_to_token");
    return impl_->id_token[static_cast<size_t>(id)];
}

std::optional<int32_t> Tokenizer::token_id(std::string_view token) const {
    if (auto it = impl_->added_by_content.find(token); it != impl_->added_by_content.end()) return it->second;
    if (auto it = impl_->vocab.find(token); it != impl_->vocab.end()) return it->second;
    return std::nullopt;
}

bool Tokenizer::is_special(int32_t id) const {
    return id >= 0 && static_cast<size_t>(id) < impl_->id_kind.size() &&
           impl_->id_kind[static_cast<size_t>(id)] == Kind::special;
}

bool Tokenizer::is_added(int32_t id) const {
    if (id < 0 || static_cast<size_t>(id) >= impl_->id_kind.size()) return false;
    const Kind k = impl_->id_kind[static_cast<size_t>(id)];
    return k == Kind::added || k == Kind::special;
}

bool Tokenizer::has_token(int32_t id) const {
    return id >= 0 && static_cast<size_t>(id) < impl_->id_kind.size() && impl_->id_kind[static_cast<size_t>(id)] != Kind::none;
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->id_kind.size()); }

const std::string& Tokenizer::path() const { return impl_->path; }

// ---- StreamDecoder --------------------------------------------------------------------------

StreamDecoder::StreamDecoder(const Tokenizer& tok, bool skip_special) : tok_(&tok), skip_special_(skip_special) {}

std::string StreamDecoder::push(int32_t id) {
    const auto& impl = *tok_->impl_;
    impl.check_id(id, "StreamDecoder::push");
    if (skip_special_ && impl.id_kind[static_cast<size_t>(id)] == Kind::special) return {};
    pending_ += impl.id_bytes[static_cast<size_t>(id)];
    // Everything before a trailing, still-completable sequence decodes the same whatever comes
    // next (a lossy decoder restarts at every lead byte), so it can go out now.
    const size_t cut = utf8_incomplete_tail(pending_);
    std::string out = utf8_lossy(std::string_view(pending_).substr(0, cut));
    pending_.erase(0, cut);
    return out;
}

std::string StreamDecoder::flush() {
    std::string out = utf8_lossy(pending_);
    pending_.clear();
    return out;
}

std::string utf8_lossy(std::string_view s) {
    std::string out;
    out.reserve(s.size());
    size_t i = 0;
    while (i < s.size()) {
        size_t bad = 0;
        const size_t n = utf8_seq(s, i, &bad);
        if (n) {
            out.append(s.data() + i, n);
            i += n;
        } else {
            out += "\xEF\xBF\xBD";  // U+FFFD
            i += bad;
        }
    }
    return out;
}

}  // namespace megamoe
