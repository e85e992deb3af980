// tokenizer_test.cpp — tests for src/tokenizer: the golden tokenizer fixture (HF `tokenizers`
// 0.23.2 ids, token strings and decoded text for 72 strings) is reproduced exactly, plus a few
// extra HF-produced cases for whitespace classes and added-token flags; encode_ordinary never
// yields added tokens; decode(encode(t)) == t; the streaming decoder agrees with decode() and
// never splits a UTF-8 character; malformed tokenizer.json files are rejected naming the file.
#include "serve/tokenizer.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/common.h"
#include "test_util.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace megamoe;

namespace {

const std::string kTokDir = MEGAMOE_SHARED_DIR "/golden/tokenizer";

using megamoe::test::read_file;

void write_file(const std::string& path, const std::string& text) {
    std::ofstream out(path, std::ios::binary);
    out << text;
}

// Loaded once: parsing the fixture is the slowest part of the suite.
class TokenizerTest : public ::testing::Test {
protected:
    static void SetUpTestSuite() {
        if (!fs::exists(kTokDir + "/tokenizer.json") || !fs::exists(kTokDir + "/cases.json")) return;
        tok_ = new Tokenizer(Tokenizer::load(kTokDir + "/tokenizer.json"));
        cases_ = new json(json::parse(read_file(kTokDir + "/cases.json")).at("cases"));
    }
    static void TearDownTestSuite() {
        delete tok_;
        delete cases_;
        tok_ = nullptr;
        cases_ = nullptr;
    }
    void SetUp() override {
        if (!tok_) MEGAMOE_MISSING_GOLDEN() << "tokenizer fixture not found in " << kTokDir;
    }
    static Tokenizer* tok_;
    static json* cases_;
};

Tokenizer* TokenizerTest::tok_ = nullptr;
json* TokenizerTest::cases_ = nullptr;

// True if s ends inside a multi-byte UTF-8 sequence.
bool ends_mid_sequence(const std::string& s) {
    for (size_t k = 0; k < 4 && k < s.size(); ++k) {
        const auto b = static_cast<uint8_t>(s[s.size() - 1 - k]);
        if ((b & 0xC0) == 0x80) continue;
        if (b < 0x80) return false;
        const size_t len = b >= 0xF0 ? 4 : b >= 0xE0 ? 3 : 2;
        return k + 1 < len;
    }
    return false;
}

TEST_F(TokenizerTest, GoldenCases) {
    ASSERT_EQ(cases_->size(), 72u);
    for (const json& c : *cases_) {
        const std::string text = c.at("text");
        const auto want = c.at("ids").get<std::vector<int32_t>>();
        const auto want_tokens = c.at("tokens").get<std::vector<std::string>>();
        const std::vector<int32_t> ids = tok_->encode(text);
        EXPECT_EQ(ids, want) << "text: " << text;
        std::vector<std::string> tokens;
        for (int32_t id : want) tokens.push_back(tok_->id_to_token(id));
        EXPECT_EQ(tokens, want_tokens) << "text: " << text;
        EXPECT_EQ(tok_->decode(want), c.at("decoded").get<std::string>()) << "text: " << text;
    }
}

TEST_F(TokenizerTest, RoundTrip) {
    for (const json& c : *cases_) {
        const std::string text = c.at("text");
        EXPECT_EQ(tok_->decode(tok_->encode(text)), text);
        EXPECT_EQ(tok_->decode(tok_->encode_ordinary(text)), text);
    }
}

// Produced by HF tokenizers 0.23.2 (npm binding) on the same tokenizer.json: whitespace edge
// cases where PCRE2 and Oniguruma classes could differ (U+0085 is \s, U+180E is not, U+001C is
// not), a number run in another script, and invalid-looking but valid text.
TEST_F(TokenizerTest, ExtraHfCases) {
    struct Case {
        std::string text;
        std::vector<int32_t> ids;
    };
    const std::vector<Case> cases = {
        {" \xC2\x85 ", {973, 230, 223}},              // " U+0085 "
        {" \xE1\xA0\x8E ", {223, 160, 257, 239, 223}},  // " U+180E "
        {" \x1C ", {223, 219, 223}},
        {"a\xC2\x85 b", {67, 129, 230, 332}},
        {"abc  \xE3\x80\x80 d", {321, 69, 259, 859, 225, 457}},  // ideographic space
    };
    for (const Case& c : cases) EXPECT_EQ(tok_->encode(c.text), c.ids) << "text: " << c.text;
}

// Pre-tokenizer pieces from HF (pre_tokenizer.pre_tokenize_str) for characters Unicode 15-16
// added (PCRE2 10.42 does not know them) and for U+180E, which PCRE2 calls whitespace.
TEST_F(TokenizerTest, UnicodeVersionPieces) {
    struct Case {
        std::string text;
        std::vector<std::string> pieces;
    };
    const std::vector<Case> cases = {
        {"a\U00031350b \U00031350", {"a\U00031350b", " \U00031350"}},              // CJK Ext H letter
        {"x\U0001FAE8!! \U0001FAE8y", {"x", "\U0001FAE8!!", " \U0001FAE8", "y"}},  // emoji 15 (So)
        {" \u180E\u180E x", {" ", "\u180E\u180E", " x"}},
        {"ab\u0897c d\U00016D70\U00016D71\U00016D72\U00016D73",                  // mark; Kirat Rai digits
         {"ab\u0897c", " d", "\U00016D70\U00016D71\U00016D72", "\U00016D73"}},
    };
    for (const Case& c : cases) EXPECT_EQ(tok_->pre_tokenize(c.text), c.pieces) << "text: " << c.text;
    EXPECT_EQ(tok_->encode("x\U0001FAE8!! \U0001FAE8y"), (std::vector<int32_t>{90, 670, 107, 104, 3, 3, 2043, 107, 104, 91}));
}

TEST_F(TokenizerTest, Lookups) {
    EXPECT_EQ(tok_->token_id("<｜User｜>"), std::optional<int32_t>(6000));
    EXPECT_EQ(tok_->token_id("<｜begin▁of▁sentence｜>"), std::optional<int32_t>(0));
    EXPECT_EQ(tok_->token_id("Ġ"), std::optional<int32_t>(223));
    EXPECT_EQ(tok_->token_id("no such token"), std::nullopt);
    EXPECT_TRUE(tok_->is_special(0));
    EXPECT_TRUE(tok_->is_special(6005));
    EXPECT_FALSE(tok_->is_special(223));
    EXPECT_EQ(tok_->vocab_size(), 6014);
    EXPECT_EQ(tok_->token_bytes(223), " ");
    EXPECT_EQ(tok_->token_bytes(6000), "<｜User｜>");
    EXPECT_EQ(tok_->token_bytes(166), "\xE7");  // "ç" = byte 0xE7, not the character
    test::expect_error([&] { tok_->decode({6014}); }, {"unknown token id 6014"});
    test::expect_error([&] { tok_->decode({-1}); }, {"unknown token id -1"});
    EXPECT_EQ(tok_->decode({0, 223, 1}, true), " ");
}

TEST_F(TokenizerTest, LossyDecode) {
    // 166 = byte E7 (a 3-byte lead), 161 = E2, 5 = '#': HF gives "\uFFFD\uFFFD#\uFFFD".
    EXPECT_EQ(tok_->decode({166, 161, 5, 166}), "\xEF\xBF\xBD\xEF\xBF\xBD#\xEF\xBF\xBD");
    EXPECT_EQ(utf8_lossy("a\xE0\xA0"), "a\xEF\xBF\xBD");        // truncated: one U+FFFD
    EXPECT_EQ(utf8_lossy("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate
    EXPECT_EQ(utf8_lossy("\xF0\x9F\x98\x80"), "\xF0\x9F\x98\x80");
    // Invalid UTF-8 input is encoded as its lossy repair.
    EXPECT_EQ(tok_->decode(tok_->encode("x\xFFy")), "x\xEF\xBF\xBDy");
}

TEST_F(TokenizerTest, EncodeOrdinaryNeverYieldsAddedTokens) {
    const std::vector<std::string> texts = {
        "hi <｜User｜> there ｜DSML｜ x",
        "<｜begin▁of▁sentence｜>",
        "<think>reasoning</think><｜Assistant｜><｜end▁of▁sentence｜>",
        "<｜place▁holder▁no▁0｜><｜▁pad▁｜>",
    };
    for (const std::string& t : texts) {
        const auto ids = tok_->encode_ordinary(t);
        for (int32_t id : ids) EXPECT_FALSE(tok_->is_added(id)) << "id " << id << " in encode_ordinary(" << t << ")";
        EXPECT_EQ(tok_->decode(ids), t);
        const auto with_added = tok_->encode(t);
        EXPECT_NE(ids, with_added);
        EXPECT_EQ(tok_->decode(with_added), t);
    }
    const auto ids = tok_->encode("hi <｜User｜> there ｜DSML｜ x");
    EXPECT_NE(std::find(ids.begin(), ids.end(), 6000), ids.end());
    EXPECT_NE(std::find(ids.begin(), ids.end(), 6005), ids.end());
    EXPECT_EQ(tok_->encode("<｜begin▁of▁sentence｜>"), std::vector<int32_t>{0});
}

TEST_F(TokenizerTest, StreamDecoder) {
    std::vector<std::vector<int32_t>> seqs;
    for (const json& c : *cases_) seqs.push_back(c.at("ids").get<std::vector<int32_t>>());
    seqs.push_back({166, 161, 5, 166});        // invalid bytes
    seqs.push_back({166, 2357, 161});          // lead, then continuation-led token, then a dangling lead
    seqs.push_back({856, 2437});               // ends inside an emoji
    for (bool skip : {false, true}) {
        for (const auto& ids : seqs) {
            StreamDecoder sd(*tok_, skip);
            std::string all;
            for (int32_t id : ids) {
                const std::string piece = sd.push(id);
                EXPECT_FALSE(ends_mid_sequence(piece));
                EXPECT_EQ(utf8_lossy(piece), piece);  // valid UTF-8
                all += piece;
            }
            all += sd.flush();
            EXPECT_EQ(all, tok_->decode(ids, skip));
        }
    }
    // A character split over tokens is held back until it is complete: 😀 = F0 9F 98 80.
    StreamDecoder sd(*tok_);
    const auto ids = tok_->encode("\xF0\x9F\x98\x80");
    std::string got;
    for (size_t i = 0; i < ids.size(); ++i) {
        const std::string piece = sd.push(ids[i]);
        if (i + 1 < ids.size()) {
            EXPECT_EQ(piece, "");
        }
        got += piece;
    }
    EXPECT_EQ(got, "\xF0\x9F\x98\x80");
    EXPECT_EQ(sd.flush(), "");
}

TEST_F(TokenizerTest, LongPiecesAndMixedText) {
    // Long single pieces go through the heap BPE and the regexes without stack trouble.
    const std::string spaces(20000, ' '), letters(20000, 'x'), cjk = [] {
        std::string s;
        for (int i = 0; i < 5000; ++i) s += "深度求索";
        return s;
    }();
    for (const std::string& t : {spaces, letters, cjk, std::string(30000, '!'), spaces + "a" + letters}) {
        EXPECT_EQ(tok_->decode(tok_->encode(t)), t);
    }
}

TEST_F(TokenizerTest, ConcurrentEncode) {
    // The BPE cache is shared; two threads encoding at once must get the single-thread answer.
    std::string text;
    for (const json& c : *cases_) text += c.at("text").get<std::string>() + "\n";
    const std::vector<int32_t> want = tok_->encode(text);
    std::vector<std::vector<int32_t>> got(2);
    std::vector<std::thread> threads;
    for (size_t t = 0; t < got.size(); ++t)
        threads.emplace_back([&, t] {
            for (int r = 0; r < 20; ++r) got[t] = tok_->encode(text);
        });
    for (auto& th : threads) th.join();
    for (const auto& g : got) EXPECT_EQ(g, want);
}

// ---- malformed files ------------------------------------------------------------------------

class TokenizerFileTest : public ::testing::Test {
protected:
    // A small valid tokenizer.json: bytes 'a','b', merge "a b".
    static json minimal() {
        json j = json::parse(R"({
          "version": "1.0", "added_tokens": [], "normalizer": null,
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
              {"type": "Split", "pattern": {"Regex": "\\s+(?!\\S)|\\s+|\\S+"}, "behavior": "Isolated", "invert": false},
              {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]},
          "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
          "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "Ġ": 3}, "merges": ["a b"]}
        })");
        return j;
    }
    std::string write(const std::string& text) {
        const std::string p = dir_.str() + "/tokenizer.json";
        write_file(p, text);
        return p;
    }
    void expect_bad(const json& j, const std::vector<std::string>& substrings) {
        const std::string p = write(j.dump());
        std::vector<std::string> want = substrings;
        want.push_back(p);
        test::expect_error([&] { Tokenizer::load(p); }, want);
    }
    test::TempDir dir_;
};

TEST_F(TokenizerFileTest, MinimalLoads) {
    const Tokenizer t = Tokenizer::load(write(minimal().dump()));
    EXPECT_EQ(t.encode("abab ba"), (std::vector<int32_t>{2, 2, 3, 1, 0}));
    json j = minimal();
    j["model"]["merges"] = json::array({json::array({"a", "b"})});  // pair form
    const Tokenizer t2 = Tokenizer::load(write(j.dump()));
    EXPECT_EQ(t2.encode("ab"), std::vector<int32_t>{2});
}

// Added-token flags, checked against HF tokenizers 0.23.2 on random text: lstrip/rstrip swallow
// the whitespace around the token, normalized=false tokens are split out before normalized=true
// ones, and an added token whose content is in the vocab keeps the vocab id.
TEST_F(TokenizerFileTest, AddedTokenFlags) {
    json j = minimal();
    j["added_tokens"] = json::parse(R"([
        {"id": 4, "content": "<s>", "special": true, "normalized": false},
        {"id": 5, "content": "X", "special": false, "lstrip": true, "rstrip": true, "normalized": false},
        {"id": 2, "content": "ab", "special": true, "normalized": true},
        {"id": 6, "content": "<s", "special": false, "normalized": true}])");
    const Tokenizer t = Tokenizer::load(write(j.dump()));
    EXPECT_EQ(t.encode("a  X  b"), (std::vector<int32_t>{0, 5, 1}));
    EXPECT_EQ(t.encode("<s><sab"), (std::vector<int32_t>{4, 6, 2}));
    EXPECT_EQ(t.encode_ordinary("<s>"), (std::vector<int32_t>{}));  // '<', 's', '>' are not in the vocab
    EXPECT_TRUE(t.is_special(2));
    EXPECT_EQ(t.decode({0, 2, 1}, true), "ab");
    EXPECT_EQ(t.vocab_size(), 7);
}

TEST_F(TokenizerFileTest, Malformed) {
    test::expect_error([&] { Tokenizer::load(dir_.str() + "/missing.json"); }, {"missing.json", "cannot open"});
    {
        const std::string p = write("{\"model\": ");
        test::expect_error([&] { Tokenizer::load(p); }, {p, "not valid JSON"});
    }
    json j = minimal();
    j.erase("model");
    expect_bad(j, {"missing field 'model'"});

    j = minimal();
    j["model"]["type"] = "WordPiece";
    expect_bad(j, {"model.type", "BPE"});

    j = minimal();
    j["model"].erase("vocab");
    expect_bad(j, {"missing field 'vocab'"});

    j = minimal();
    j["model"].erase("merges");
    expect_bad(j, {"missing field 'merges'"});

    j = minimal();
    j["model"]["merges"] = {"a c"};
    expect_bad(j, {"merges[0]", "unknown token \"c\""});

    j = minimal();
    j["model"]["merges"] = {"b a"};
    expect_bad(j, {"merges[0]", "\"ba\" is not in the vocab"});

    j = minimal();
    j["model"]["merges"] = {"ab"};
    expect_bad(j, {"merges[0]"});

    j = minimal();
    j["model"]["vocab"]["c"] = 1;
    expect_bad(j, {"duplicate id 1"});

    // A sparse id far past the entries (the dense id tables would take gigabytes): refused, naming
    // the entry, before anything is allocated for it.
    j = minimal();
    j["model"]["vocab"]["c"] = 111111111;
    expect_bad(j, {"model.vocab[\"c\"]", "id 111111111", "far past"});
    j = minimal();
    j["model"]["vocab"]["c"] = 1030;   // within 2 · entries + 1024: a hole is accepted
    EXPECT_NO_THROW((void)Tokenizer::load(write(j.dump())));

    j = minimal();
    j["added_tokens"] = json::parse(R"([{"id": 4, "content": "<x>", "special": true},
                                        {"id": 4, "content": "<y>", "special": true}])");
    expect_bad(j, {"added_tokens[1]", "id 4", "would assign it id 5"});

    // HF ignores stored added-token ids and numbers them itself; a file that disagrees is refused.
    j = minimal();
    j["added_tokens"] = json::parse(R"([{"id": 9, "content": "<x>", "special": true}])");
    expect_bad(j, {"added_tokens[0]", "id 9", "would assign it id 4"});
    j["added_tokens"] = json::parse(R"([{"id": 4, "content": "ab", "special": true}])");
    expect_bad(j, {"added_tokens[0]", "id 4", "would assign it id 2"});

    j = minimal();
    j["normalizer"] = json::parse(R"({"type": "NFC"})");
    expect_bad(j, {"normalizer", "NFC"});

    j = minimal();
    j["pre_tokenizer"] = json::parse(R"({"type": "Whitespace"})");
    expect_bad(j, {"pre_tokenizer", "Whitespace"});

    j = minimal();
    j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
    expect_bad(j, {"pre_tokenizer", "regex does not compile"});

    j = minimal();
    j["decoder"] = json::parse(R"({"type": "WordPiece"})");
    expect_bad(j, {"decoder", "WordPiece"});
}

}  // namespace
