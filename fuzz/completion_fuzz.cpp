// completion_fuzz.cpp — libFuzzer target for the completion parser and the streaming parser on
// arbitrary model text split at arbitrary points.
//
// Input: byte 0 (bit 0: the prompt ended with <think>), bytes 1..8: cut points (each byte a
// distance to the next cut), the rest: the model's text. Invariants: neither parser throws; the
// streamed deltas concatenate to parse_completion()'s result field by field, tool calls
// included, whatever the cuts; every delta is valid UTF-8 when the text is; a tool call has a
// name and JSON-object arguments; stopped() agrees.
#include <cstddef>
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "fuzz_util.h"
#include "serve/chat.h"

using namespace megamoe;

namespace {

bool same_calls(const std::vector<ToolCall>& a, const std::vector<ToolCall>& b) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i)
        if (a[i].name != b[i].name || a[i].arguments != b[i].arguments) return false;
    return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    if (size < 9) return 0;
    const bool thinking = data[0] & 1;
    const uint8_t* cuts = data + 1;
    const std::string_view text(reinterpret_cast<const char*>(data + 9), size - 9);
    const bool utf8 = fuzz::valid_utf8(text);

    const ParsedCompletion whole = parse_completion(text, thinking);
    for (const ToolCall& c : whole.tool_calls) {
        FUZZ_CHECK(!c.name.empty());
        if (!utf8) continue;   // JSON text holds only UTF-8
        const auto args = nlohmann::ordered_json::parse(c.arguments, nullptr, /*allow_exceptions=*/false);
        FUZZ_CHECK(!args.is_discarded() && args.is_object());
    }
    if (utf8) FUZZ_CHECK(fuzz::valid_utf8(whole.content) && fuzz::valid_utf8(whole.reasoning_content));

    ChatStreamParser stream(thinking);
    ParsedCompletion acc;
    auto add = [&](const ChatDelta& d) {
        if (utf8) FUZZ_CHECK(fuzz::valid_utf8(d.content) && fuzz::valid_utf8(d.reasoning_content));
        acc.content += d.content;
        acc.reasoning_content += d.reasoning_content;
        acc.tool_calls.insert(acc.tool_calls.end(), d.tool_calls.begin(), d.tool_calls.end());
    };
    size_t at = 0, k = 0;
    while (at < text.size()) {
        // Cut lengths from the header, repeated; 0 means an empty push.
        const size_t len = std::min<size_t>(cuts[k % 8], text.size() - at);
        ++k;
        add(stream.push(text.substr(at, len)));
        at += len;
        if (k > 8 && len == 0 && cuts[(k - 1) % 8] == 0) {
            // all-zero cut lists would never advance: push the rest at once
            bool all_zero = true;
            for (int i = 0; i < 8; ++i) all_zero &= cuts[i] == 0;
            if (all_zero) {
                add(stream.push(text.substr(at)));
                at = text.size();
            }
        }
    }
    add(stream.finish());
    FUZZ_CHECK(acc.content == whole.content);
    FUZZ_CHECK(acc.reasoning_content == whole.reasoning_content);
    FUZZ_CHECK(same_calls(acc.tool_calls, whole.tool_calls));
    FUZZ_CHECK(stream.stopped() == whole.stopped);
    return 0;
}
