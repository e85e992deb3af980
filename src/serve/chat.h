// chat.h — the DeepSeek-V4 chat format: messages -> prompt, and generated text -> message.
//
// A byte-exact port of encode_messages / parse_message_from_completion_text from the reference
// encoding_dsv4.py (specified in shared/reference/chat-encoding.md, "the spec" below; § numbers
// refer to it). The template is hard-coded, no template engine.
//
// Prompts are built as pieces: special tokens (BOS, <｜User｜>, </think>, ｜DSML｜, ...) are
// inserted only by the builder, and text that came from a request (user text, tool results,
// schemas, tool-call values) is always an ordinary piece, so a user who types "<｜User｜>" cannot
// forge a turn. When request text contains no special-token string, tokenizing the pieces one by
// one gives the same ids as tokenizing text() whole, which is what the reference does.
//
// Completion parsing is tolerant where the reference raises: model output never throws; what can
// be recovered goes where it belongs, incomplete markup is dropped, and a tool call is reported
// only once its </｜DSML｜invoke> arrived. On well-formed output it agrees with the reference.
#pragma once

#include <array>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace megamoe {

// The special-token strings of §1. Each is an added special token of the tokenizer.
namespace chat_tokens {
inline constexpr std::string_view bos = "<｜begin▁of▁sentence｜>";
inline constexpr std::string_view eos = "<｜end▁of▁sentence｜>";
inline constexpr std::string_view pad = "<｜▁pad▁｜>";
inline constexpr std::string_view user = "<｜User｜>";
inline constexpr std::string_view assistant = "<｜Assistant｜>";
inline constexpr std::string_view latest_reminder = "<｜latest_reminder｜>";
inline constexpr std::string_view think_open = "<think>";
inline constexpr std::string_view think_close = "</think>";
inline constexpr std::string_view dsml = "｜DSML｜";
inline constexpr std::string_view extracted_url = "<｜extracted_url｜>";
inline constexpr std::string_view place_holder_0 = "<｜place▁holder▁no▁0｜>";
}  // namespace chat_tokens

// Every special-token string above plus the six task tokens (<｜action｜>, <｜query｜>, ...).
const std::vector<std::string_view>& chat_special_tokens();

struct ToolCall {
    std::string id;         // may be empty; only used to order tool results (§4.2)
    std::string name;
    std::string arguments;  // JSON text, normally an object
};

struct ChatMessage {
    std::string role;  // system | user | developer | assistant | tool | latest_reminder
    std::optional<std::string> content;            // missing or null -> "" (see messages_from_json)
    std::optional<std::string> reasoning_content;  // assistant
    std::vector<ToolCall> tool_calls;              // assistant
    std::optional<std::string> tool_call_id;       // tool: which call this result answers
    std::optional<std::string> name;               // accepted, not rendered (as in the reference)
    std::optional<std::string> task;               // action|query|authority|domain|title|read_url
    bool wo_eos = false;                           // assistant: no EOS after it (prefill)
    std::optional<nlohmann::ordered_json> tools;            // system/developer: OpenAI tool list
    std::optional<nlohmann::ordered_json> response_format;  // system/developer: any JSON
};

// Converts an OpenAI-style "messages" array. content may be a string, null, or an array of parts
// ({type:"text", text} parts are concatenated; a tool message's parts are joined with "\n\n" and
// non-text parts become "[Unsupported <type>]" as in the reference). tool_calls follow OpenAI
// ({id, type, function:{name, arguments}}, arguments a string or an object, which is serialized).
// Throws Error naming the field, e.g. "messages[2].role: unknown role 'robot'".
std::vector<ChatMessage> messages_from_json(const nlohmann::ordered_json& messages);

struct ChatPiece {
    bool special;      // one added special token, exactly
    std::string text;  // ordinary text: tokenize with special-token matching off
};

struct ChatPrompt {
    std::vector<ChatPiece> pieces;  // adjacent ordinary pieces are always merged
    std::string text() const;       // the concatenation, byte-equal to the reference's string
};

struct ChatOptions {
    std::string thinking_mode = "thinking";  // "thinking" | "chat"
    std::vector<ChatMessage> context;        // earlier turns: seen by every decision, not rendered
    bool drop_thinking = true;               // drop reasoning of turns before the last user turn
    bool add_bos = true;                     // BOS when there is no context
    std::optional<std::string> reasoning_effort;  // none | "high" | "max"
    // Request-level tools / response_format (OpenAI puts them beside the messages; the reference
    // reads them from the system message). They are given to the leading system message, or to
    // a new empty system message put first when the conversation does not start with one.
    std::optional<nlohmann::ordered_json> tools;
    std::optional<nlohmann::ordered_json> response_format;
};

// Renders `messages` (§4). Throws Error on input the reference rejects (unknown role, developer
// without content, tool arguments that are JSON but not an object, bad thinking_mode, ...).
ChatPrompt encode_chat(const std::vector<ChatMessage>& messages, const ChatOptions& options);

// A chat completion request as the server sees it.
struct ChatRequest {
    std::vector<ChatMessage> messages;
    std::optional<nlohmann::ordered_json> tools;  // OpenAI form: [{type:"function", function:{...}}]
    bool thinking = true;
    std::optional<std::string> reasoning_effort;
    std::optional<nlohmann::ordered_json> response_format;
};

ChatOptions chat_options(const ChatRequest& request);
ChatPrompt encode_chat(const ChatRequest& request);

// Python json.dumps(value, ensure_ascii=False) with default separators (§5.1): input key order,
// ints as ints, floats as Python repr (1.0, 0.1, 1e-05), only ", \ and control chars escaped.
// Throws Error for a value nested deeper than kMaxJsonDepth (it recurses once per level).
std::string python_json_dumps(const nlohmann::ordered_json& value);

// Request JSON may nest arrays and objects at most this deep. Serializing and copying JSON
// recurse once per level, so unbounded nesting (a 60 KB body can nest 30000 levels) would
// overflow the stack; real tool schemas and arguments nest a few levels.
inline constexpr size_t kMaxJsonDepth = 128;

// The deepest nesting of arrays and objects in JSON text: brackets outside strings, counted in
// one pass without parsing (the text need not be valid JSON). Check text with it before parsing.
size_t json_nesting_depth(std::string_view text);

struct ParsedCompletion {
    std::string reasoning_content;
    std::string content;
    std::vector<ToolCall> tool_calls;  // complete calls only; ids are left for the server to assign
    bool stopped = false;  // EOS or the end of a tool-call block was seen (not cut off)
    bool has_tool_calls() const { return !tool_calls.empty(); }  // finish_reason "tool_calls"
};

// Parses generated text (what follows the prompt; EOS present as text when generation stopped on
// it). thinking: the prompt ended with <think>, so the text starts inside the reasoning. Never
// throws. Deviations from the reference on malformed or truncated text are listed in chat.cpp.
ParsedCompletion parse_completion(std::string_view text, bool thinking);

struct ChatDelta {
    std::string reasoning_content;    // to append
    std::string content;              // to append
    std::vector<ToolCall> tool_calls;  // calls completed by this step
    bool empty() const { return reasoning_content.empty() && content.empty() && tool_calls.empty(); }
};

// Incremental parse_completion. Holds back any suffix that may still become markup (a prefix of
// "</think>", of "\n\n<｜DSML｜tool_calls", an incomplete UTF-8 character, ...) until the next
// bytes decide it, so markup never reaches content or reasoning whatever the chunking. The
// concatenated deltas of push(...)... + finish() equal parse_completion() of the whole text.
namespace detail {
// Where one marker occurs next in a growing text, and how far it was looked for; it keeps the
// stream parser linear however the text is chunked.
struct MarkerScan {
    size_t next = std::string_view::npos;
    size_t scanned = 0;
};
}  // namespace detail

class ChatStreamParser {
public:
    explicit ChatStreamParser(bool thinking);
    ChatDelta push(std::string_view new_text);
    ChatDelta finish();  // end of generation: flush plain text, drop incomplete markup
    bool stopped() const { return stopped_; }

private:
    enum class State { reasoning, content, tools, done };
    enum class ToolState { between, header, params };  // indexes needle pairs in chat.cpp

    void scan_text(bool final, ChatDelta& out);
    void flush_text_tail(ChatDelta& out);
    void emit(std::string_view text, ChatDelta& out);
    void drop_marker(ChatDelta& out);
    void scan_tools(bool final, ChatDelta& out);
    bool tools_step(bool final, ChatDelta& out);
    bool tools_param(size_t at);

    State state_;
    bool stopped_ = false;
    std::string pending_;  // unconsumed text: the held-back tail, or the tool-call block
    std::string tail_;     // the last bytes emitted to the current field

    // Tool-call block parsing (state_ == tools), over pending_ from pos_.
    ToolState tool_state_ = ToolState::between;
    size_t pos_ = 0;
    size_t eos_scanned_ = 0;  // pending_ before this offset holds no EOS
    std::array<detail::MarkerScan, 7> tool_scans_{};  // one per tool-block needle (chat.cpp)
    ToolCall call_;
    std::vector<std::pair<std::string, std::string>> params_;  // key, JSON value text
    bool call_ok_ = true;
};

}  // namespace megamoe
