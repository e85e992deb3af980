// chat.cpp — DeepSeek-V4 prompt encoding and completion parsing (see chat.h).
//
// Section numbers (§) refer to shared/reference/chat-encoding.md. Where this port departs from
// the reference on purpose:
//  - Special-token strings inside request text stay ordinary text pieces (§10, prompt injection);
//    the prompt string itself is unchanged.
//  - Q12 (context + dropping skips messages): we render exactly the messages from `messages`.
//  - Q1/Q2: null content is treated as missing ("" rather than "None" or a crash); non-string
//    content other than an OpenAI parts list is rejected by messages_from_json.
//  - Tool-call arguments given as a JSON object are serialized first, so they render as
//    parameters (the reference would render one string="false" parameter named "arguments").
//  - thinking_mode and reasoning_effort are checked even when nothing is rendered.
//  - Integers beyond 64 bits arrive from nlohmann as doubles and print as floats; NaN/Infinity and
//    lone surrogates in tool arguments make nlohmann reject them, so they take the
//    {"arguments": text} fallback where Python would parse them.
// Parsing never throws (the reference raises on any malformation); see the parser section.
#include "serve/chat.h"

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <span>
#include <unordered_map>

#include "core/common.h"

namespace megamoe {

using ojson = nlohmann::ordered_json;
using detail::MarkerScan;
namespace tok = chat_tokens;

namespace {

constexpr size_t npos = std::string_view::npos;

constexpr std::array<std::string_view, 6> kTasks = {"action", "query", "authority",
                                                    "domain", "title", "read_url"};
constexpr std::array<std::string_view, 6> kTaskTokens = {
    "<｜action｜>", "<｜query｜>", "<｜authority｜>", "<｜domain｜>", "<｜title｜>", "<｜read_url｜>"};

// §2.1, split around {SCHEMAS}. The head follows the "\n\n" separator.
constexpr std::string_view kToolsHead =
    R"(## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name="$TOOL_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$TOOL_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

)";
constexpr std::string_view kToolsTail =
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool "
    "calls.\n";

// §2.2
constexpr std::string_view kResponseFormatHead =
    "\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n";

// §2.3
constexpr std::string_view kEffortMax =
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n";

// DSML tags (§2.5, §8). Only the bare ｜DSML｜ is a special token.
constexpr std::string_view kToolCallsStart = "\n\n<｜DSML｜tool_calls";  // TC_START
constexpr std::string_view kToolCallsOpen = "<｜DSML｜tool_calls";
constexpr std::string_view kToolCallsClose = "</｜DSML｜tool_calls>";
constexpr std::string_view kInvokeOpen = "<｜DSML｜invoke";
constexpr std::string_view kInvokeCloseStem = "</｜DSML｜invoke";
constexpr std::string_view kInvokeClose = "</｜DSML｜invoke>";
constexpr std::string_view kParamOpen = "<｜DSML｜parameter";
constexpr std::string_view kParamClose = "</｜DSML｜parameter>";

// Python truthiness of a JSON value (§ notation).
bool truthy(const ojson& j) {
    switch (j.type()) {
        case ojson::value_t::null: return false;
        case ojson::value_t::boolean: return j.get<bool>();
        case ojson::value_t::number_integer: return j.get<int64_t>() != 0;
        case ojson::value_t::number_unsigned: return j.get<uint64_t>() != 0;
        case ojson::value_t::number_float: return j.get<double>() != 0;
        case ojson::value_t::string: return !j.get_ref<const std::string&>().empty();
        default: return !j.empty();
    }
}

int task_index(std::string_view task) {
    for (size_t i = 0; i < kTasks.size(); ++i)
        if (kTasks[i] == task) return static_cast<int>(i);
    return -1;
}

// Bytes at the end of s that start a UTF-8 character the end cut off (0 if none).
size_t utf8_incomplete_tail(std::string_view s) {
    const size_t n = s.size();
    size_t k = 0;  // trailing continuation bytes
    while (k < 3 && k < n && (static_cast<unsigned char>(s[n - 1 - k]) & 0xC0) == 0x80) ++k;
    if (k == n) return 0;
    const auto lead = static_cast<unsigned char>(s[n - 1 - k]);
    const size_t need = lead >= 0xF8 ? 1 : lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
    return need > k + 1 ? k + 1 : 0;
}

// ---------------------------------------------------------------------------------------------
// Python-compatible JSON output (§5.1)

// Python float repr: shortest round-trip digits, fixed form for exponents in [-4, 16).
void append_float(std::string& out, double v) {
    if (std::isnan(v)) { out += "NaN"; return; }
    if (std::isinf(v)) { out += v < 0 ? "-Infinity" : "Infinity"; return; }
    char buf[64];
    const auto res = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
    std::string_view s(buf, static_cast<size_t>(res.ptr - buf));  // [-]d[.ddd]e(+|-)dd
    if (s.front() == '-') {
        out += '-';
        s.remove_prefix(1);
    }
    const size_t e = s.find('e');
    std::string digits;
    for (char c : s.substr(0, e))
        if (c != '.') digits += c;
    int exp = 0;
    std::from_chars(s.data() + e + 2, s.data() + s.size(), exp);
    if (s[e + 1] == '-') exp = -exp;
    const int n = static_cast<int>(digits.size());
    if (exp >= -4 && exp < 16) {
        if (exp < 0) {
            out += "0." + std::string(static_cast<size_t>(-exp - 1), '0') + digits;
        } else if (n <= exp + 1) {
            out += digits + std::string(static_cast<size_t>(exp + 1 - n), '0') + ".0";
        } else {
            out += digits.substr(0, static_cast<size_t>(exp + 1)) + "." +
                   digits.substr(static_cast<size_t>(exp + 1));
        }
        return;
    }
    out += digits[0];
    if (n > 1) out += "." + digits.substr(1);
    out += exp < 0 ? "e-" : "e+";
    const int a = std::abs(exp);
    if (a < 10) out += '0';
    out += std::to_string(a);
}

void append_string(std::string& out, std::string_view s) {
    static const char* hex = "0123456789abcdef";
    out += '"';
    for (char ch : s) {
        const auto c = static_cast<unsigned char>(ch);
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            case '\b': out += "\\b"; break;
            case '\f': out += "\\f"; break;
            default:
                if (c < 0x20) {
                    out += "\\u00";
                    out += hex[c >> 4];
                    out += hex[c & 15];
                } else {
                    out += ch;  // non-ASCII stays raw UTF-8 (ensure_ascii=False)
                }
        }
    }
    out += '"';
}

void append_json(std::string& out, const ojson& j, size_t depth = 0) {
    if ((j.is_array() || j.is_object()) && depth >= kMaxJsonDepth)
        fail("JSON nested deeper than ", kMaxJsonDepth, " levels");
    switch (j.type()) {
        case ojson::value_t::null: out += "null"; break;
        case ojson::value_t::boolean: out += j.get<bool>() ? "true" : "false"; break;
        case ojson::value_t::number_integer: out += std::to_string(j.get<int64_t>()); break;
        case ojson::value_t::number_unsigned: out += std::to_string(j.get<uint64_t>()); break;
        case ojson::value_t::number_float: append_float(out, j.get<double>()); break;
        case ojson::value_t::string: append_string(out, j.get_ref<const std::string&>()); break;
        case ojson::value_t::array: {
            out += '[';
            bool first = true;
            for (const auto& v : j) {
                if (!first) out += ", ";
                first = false;
                append_json(out, v, depth + 1);
            }
            out += ']';
            break;
        }
        case ojson::value_t::object: {
            out += '{';
            bool first = true;
            for (const auto& [k, v] : j.items()) {
                if (!first) out += ", ";
                first = false;
                append_string(out, k);
                out += ": ";
                append_json(out, v, depth + 1);
            }
            out += '}';
            break;
        }
        default: fail("JSON value of type ", j.type_name(), " cannot be serialized");
    }
}

std::string json_string(std::string_view s) {
    std::string out;
    append_string(out, s);
    return out;
}

}  // namespace

size_t json_nesting_depth(std::string_view text) {
    size_t depth = 0, deepest = 0;
    bool in_string = false, escaped = false;
    for (const char c : text) {
        if (in_string) {
            if (escaped)
                escaped = false;
            else if (c == '\\')
                escaped = true;
            else if (c == '"')
                in_string = false;
        } else if (c == '"') {
            in_string = true;
        } else if (c == '[' || c == '{') {
            deepest = std::max(deepest, ++depth);
        } else if ((c == ']' || c == '}') && depth > 0) {
            --depth;
        }
    }
    return deepest;
}

std::string python_json_dumps(const ojson& value) {
    std::string out;
    append_json(out, value);
    return out;
}

const std::vector<std::string_view>& chat_special_tokens() {
    static const std::vector<std::string_view> tokens = [] {
        std::vector<std::string_view> t = {tok::bos,          tok::eos,        tok::pad,
                                           tok::user,         tok::assistant,  tok::latest_reminder,
                                           tok::think_open,   tok::think_close, tok::dsml,
                                           tok::extracted_url, tok::place_holder_0};
        t.insert(t.end(), kTaskTokens.begin(), kTaskTokens.end());
        return t;
    }();
    return tokens;
}

// ---------------------------------------------------------------------------------------------
// messages_from_json

namespace {

// The value of `key`, or nullptr when it is missing or null.
const ojson* field(const ojson& obj, const char* key) {
    const auto it = obj.find(key);
    return it == obj.end() || it->is_null() ? nullptr : &*it;
}

std::optional<std::string> opt_string(const ojson& obj, const char* key, const std::string& where) {
    const ojson* v = field(obj, key);
    if (!v) return std::nullopt;
    if (!v->is_string()) fail(where, ".", key, ": expected a string, got ", v->type_name());
    return v->get<std::string>();
}

// content: a string, or OpenAI parts. A tool result joins its parts like the reference (§4.7).
std::optional<std::string> content_from_json(const ojson& msg, const std::string& where, bool tool) {
    const ojson* c = field(msg, "content");
    if (!c) return std::nullopt;
    if (c->is_string()) return c->get<std::string>();
    if (!c->is_array())
        fail(where, ".content: expected a string, an array of parts or null, got ", c->type_name());
    std::string out;
    for (size_t i = 0; i < c->size(); ++i) {
        const ojson& part = (*c)[i];
        const std::string pw = str(where, ".content[", i, "]");
        if (!part.is_object()) fail(pw, ": expected an object, got ", part.type_name());
        const std::optional<std::string> type = opt_string(part, "type", pw);
        if (!type) fail(pw, ".type: missing");
        if (tool && i > 0) out += "\n\n";
        if (*type == "text") {
            const std::optional<std::string> text = opt_string(part, "text", pw);
            if (!text) fail(pw, ".text: missing");
            out += *text;
        } else if (tool) {
            out += "[Unsupported " + *type + "]";
        } else {
            fail(pw, ".type: unsupported content part type '", *type, "'");
        }
    }
    return out;
}

ToolCall tool_call_from_json(const ojson& c, const std::string& where) {
    if (!c.is_object()) fail(where, ": expected an object, got ", c.type_name());
    const ojson* fn = field(c, "function");
    if (!fn || !fn->is_object()) fail(where, ".function: expected an object");
    const std::string fw = where + ".function";
    ToolCall call;
    const std::optional<std::string> name = opt_string(*fn, "name", fw);
    if (!name) fail(fw, ".name: missing");
    call.name = *name;
    const ojson* args = field(*fn, "arguments");
    if (!args) fail(fw, ".arguments: missing");
    if (args->is_string()) {
        call.arguments = args->get<std::string>();
    } else if (args->is_object()) {
        try {
            call.arguments = python_json_dumps(*args);
        } catch (const Error& e) {
            fail(fw, ".arguments: ", e.what());
        }
    } else {
        fail(fw, ".arguments: expected a string or an object, got ", args->type_name());
    }
    // The reference takes the id from the call, else from the function (§4.2).
    call.id = opt_string(c, "id", where).value_or("");
    if (call.id.empty()) call.id = opt_string(*fn, "id", fw).value_or("");
    return call;
}

// An OpenAI tool list: [{type: "function", function: {...}}, ...]; `where` names it.
void check_tools(const ojson& tools, const std::string& where) {
    if (!tools.is_array()) fail(where, ": expected an array, got ", tools.type_name());
    for (size_t i = 0; i < tools.size(); ++i) {
        const ojson& t = tools[i];
        if (!t.is_object() || !field(t, "function") || !t["function"].is_object())
            fail(where, "[", i, "].function: expected an object");
    }
}

ChatMessage message_from_json(const ojson& m, const std::string& where) {
    static const std::array<std::string_view, 6> roles = {"system",    "user", "developer",
                                                          "assistant", "tool", "latest_reminder"};
    if (!m.is_object()) fail(where, ": expected an object, got ", m.type_name());
    ChatMessage msg;
    const std::optional<std::string> role = opt_string(m, "role", where);
    if (!role) fail(where, ".role: missing");
    if (std::find(roles.begin(), roles.end(), *role) == roles.end())
        fail(where, ".role: unknown role '", *role, "'");
    msg.role = *role;
    msg.content = content_from_json(m, where, msg.role == "tool");
    msg.reasoning_content = opt_string(m, "reasoning_content", where);
    if (const ojson* calls = field(m, "tool_calls")) {
        if (!calls->is_array()) fail(where, ".tool_calls: expected an array, got ", calls->type_name());
        for (size_t i = 0; i < calls->size(); ++i)
            msg.tool_calls.push_back(tool_call_from_json((*calls)[i], str(where, ".tool_calls[", i, "]")));
    }
    msg.tool_call_id = opt_string(m, "tool_call_id", where);
    msg.name = opt_string(m, "name", where);
    msg.task = opt_string(m, "task", where);
    if (msg.task && task_index(*msg.task) < 0) fail(where, ".task: unknown task '", *msg.task, "'");
    if (const ojson* w = field(m, "wo_eos")) msg.wo_eos = truthy(*w);
    if (const ojson* tools = field(m, "tools")) {
        check_tools(*tools, where + ".tools");
        msg.tools = *tools;
    }
    if (const ojson* rf = field(m, "response_format")) msg.response_format = *rf;
    return msg;
}

}  // namespace

std::vector<ChatMessage> messages_from_json(const ojson& messages) {
    if (!messages.is_array()) fail("messages: expected an array, got ", messages.type_name());
    std::vector<ChatMessage> out;
    out.reserve(messages.size());
    for (size_t i = 0; i < messages.size(); ++i)
        out.push_back(message_from_json(messages[i], str("messages[", i, "]")));
    return out;
}

std::string ChatPrompt::text() const {
    std::string out;
    for (const ChatPiece& p : pieces) out += p.text;
    return out;
}

// ---------------------------------------------------------------------------------------------
// encode_chat

namespace {

// Builds the piece list. text() is request data and never becomes special; markup() is our own
// template text, in which every special-token string becomes a special piece, as it would when
// the reference tokenizes its whole string.
class PromptBuilder {
public:
    void special(std::string_view token) { prompt_.pieces.push_back({true, std::string(token)}); }

    void text(std::string_view s) {
        if (s.empty()) return;
        if (!prompt_.pieces.empty() && !prompt_.pieces.back().special)
            prompt_.pieces.back().text += s;
        else
            prompt_.pieces.push_back({false, std::string(s)});
    }

    void markup(std::string_view s) {
        while (!s.empty()) {
            size_t best = npos;
            std::string_view best_tok;
            for (std::string_view t : chat_special_tokens()) {
                const size_t p = s.find(t);
                if (p < best) best = p, best_tok = t;
            }
            if (best == npos) break;
            text(s.substr(0, best));
            special(best_tok);
            s.remove_prefix(best + best_tok.size());
        }
        text(s);
    }

    ChatPrompt take() { return std::move(prompt_); }

private:
    ChatPrompt prompt_;
};

struct Block {
    bool tool_result = false;
    std::string text;
    std::string tool_use_id;
};

// A message after pass A. User turns hold blocks; every other role reads its source message.
struct Turn {
    std::string role;
    const ChatMessage* msg = nullptr;
    std::optional<std::string> task;
    std::vector<Block> blocks;
    bool rendered = false;  // from `messages` (not the context)
    const char* list = "";  // for error messages: "messages[3]"
    size_t index = 0;

    std::string where() const { return str(list, "[", index, "]"); }
};

// Pass A (§4.1): tool results and consecutive user messages merge into user turns.
std::vector<Turn> merge_user_turns(const std::vector<ChatMessage>& list, bool rendered,
                                   const char* name) {
    std::vector<Turn> out;
    for (size_t i = 0; i < list.size(); ++i) {
        const ChatMessage& m = list[i];
        const bool is_tool = m.role == "tool";
        if (is_tool || m.role == "user") {
            Block b{is_tool, m.content.value_or(""), is_tool ? m.tool_call_id.value_or("") : ""};
            // A tool result joins any user turn; a user message only one without a task.
            if (!out.empty() && out.back().role == "user" && (is_tool || !out.back().task)) {
                out.back().blocks.push_back(std::move(b));
                continue;
            }
            Turn t{"user", &m, is_tool ? std::nullopt : m.task, {}, rendered, name, i};
            t.blocks.push_back(std::move(b));
            out.push_back(std::move(t));
        } else {
            out.push_back(Turn{m.role, &m, m.task, {}, rendered, name, i});
        }
    }
    return out;
}

// Pass B (§4.2): tool results in the order of the calls of the latest assistant with calls. One
// pass over context + messages is what the reference's two passes amount to.
void sort_tool_results(std::vector<Turn>& turns) {
    std::unordered_map<std::string, size_t> order;
    for (Turn& t : turns) {
        if (t.role == "assistant" && !t.msg->tool_calls.empty()) {
            order.clear();
            for (size_t k = 0; k < t.msg->tool_calls.size(); ++k)
                if (!t.msg->tool_calls[k].id.empty()) order[t.msg->tool_calls[k].id] = k;
        } else if (t.role == "user" && !order.empty()) {
            std::vector<size_t> slots;
            std::vector<Block> results;
            for (size_t k = 0; k < t.blocks.size(); ++k)
                if (t.blocks[k].tool_result) slots.push_back(k), results.push_back(t.blocks[k]);
            if (results.size() < 2) continue;
            auto key = [&](const Block& b) {  // unknown ids sort as 0 (Q11)
                const auto it = order.find(b.tool_use_id);
                return it == order.end() ? size_t{0} : it->second;
            };
            std::stable_sort(results.begin(), results.end(),
                             [&](const Block& a, const Block& b) { return key(a) < key(b); });
            for (size_t k = 0; k < slots.size(); ++k) t.blocks[slots[k]] = std::move(results[k]);
        }
    }
}

ptrdiff_t last_user_index(const std::vector<Turn>& turns) {
    for (size_t i = turns.size(); i-- > 0;)
        if (turns[i].role == "user" || turns[i].role == "developer") return static_cast<ptrdiff_t>(i);
    return -1;
}

// Pass C (§4.6): before the last user turn, developer and unknown-role messages go away. The
// assistants there keep their place; their reasoning is not rendered because THINK is empty for
// every assistant before the last user turn when dropping.
std::vector<Turn> drop_earlier(const std::vector<Turn>& turns) {
    static const std::array<std::string_view, 6> keep = {
        "user", "system", "tool", "latest_reminder", "direct_search_results", "assistant"};
    const ptrdiff_t last = last_user_index(turns);
    std::vector<Turn> out;
    for (size_t i = 0; i < turns.size(); ++i)
        if (static_cast<ptrdiff_t>(i) >= last ||
            std::find(keep.begin(), keep.end(), turns[i].role) != keep.end())
            out.push_back(turns[i]);
    return out;
}

// Tool-call arguments as DSML parameters (§5.4): {key, string?, value}.
struct Param {
    std::string key;
    bool is_string;
    std::string value;
};

std::vector<Param> call_params(const ToolCall& call, const std::string& where) {
    if (json_nesting_depth(call.arguments) > kMaxJsonDepth)
        fail(where, ".function.arguments: JSON nested deeper than ", kMaxJsonDepth, " levels");
    const ojson args = ojson::parse(call.arguments, nullptr, /*allow_exceptions=*/false);
    if (args.is_discarded()) return {{"arguments", true, call.arguments}};
    if (!args.is_object()) fail(where, ".function.arguments: JSON ", args.type_name(), ", expected an object");
    std::vector<Param> out;
    for (const auto& [k, v] : args.items()) {
        if (v.is_string())
            out.push_back({k, true, v.get<std::string>()});
        else
            out.push_back({k, false, python_json_dumps(v)});
    }
    return out;
}

void render_tool_calls(PromptBuilder& b, const Turn& t) {
    b.markup("\n\n<｜DSML｜tool_calls>\n");
    const std::vector<ToolCall>& calls = t.msg->tool_calls;
    for (size_t k = 0; k < calls.size(); ++k) {
        if (k > 0) b.text("\n");
        b.markup("<｜DSML｜invoke name=\"");
        b.text(calls[k].name);
        b.markup("\">\n");
        const std::vector<Param> params = call_params(calls[k], str(t.where(), ".tool_calls[", k, "]"));
        for (size_t j = 0; j < params.size(); ++j) {
            if (j > 0) b.text("\n");
            b.markup("<｜DSML｜parameter name=\"");
            b.text(params[j].key);
            b.markup(params[j].is_string ? "\" string=\"true\">" : "\" string=\"false\">");
            b.text(params[j].value);
            b.markup("</｜DSML｜parameter>");
        }
        b.markup("\n</｜DSML｜invoke>");
    }
    b.markup("\n</｜DSML｜tool_calls>");
}

// The tools and response_format appendices of system and developer messages (§4.7).
void render_appendices(PromptBuilder& b, const Turn& t) {
    const ChatMessage& m = *t.msg;
    if (m.tools && truthy(*m.tools)) {
        if (!m.tools->is_array()) fail(t.where(), ".tools: expected an array");
        std::string schemas;
        for (size_t i = 0; i < m.tools->size(); ++i) {
            const ojson& tool = (*m.tools)[i];
            if (!tool.is_object() || !tool.contains("function"))
                fail(t.where(), ".tools[", i, "]: no 'function'");
            if (i > 0) schemas += '\n';
            try {
                schemas += python_json_dumps(tool["function"]);
            } catch (const Error& e) {
                fail(t.where(), ".tools[", i, "].function: ", e.what());
            }
        }
        b.markup("\n\n");
        b.markup(kToolsHead);
        b.text(schemas);
        b.markup(kToolsTail);
    }
    if (m.response_format && truthy(*m.response_format)) {
        b.markup(kResponseFormatHead);
        try {
            b.text(python_json_dumps(*m.response_format));
        } catch (const Error& e) {
            fail(t.where(), ".response_format: ", e.what());
        }
    }
}

struct RenderContext {
    const std::vector<Turn>& turns;  // R
    bool thinking;
    bool drop;
    ptrdiff_t last_user;  // L on R
    PromptBuilder& b;
};

void render_user(const RenderContext& rc, const Turn& t) {
    rc.b.special(tok::user);
    for (size_t k = 0; k < t.blocks.size(); ++k) {
        if (k > 0) rc.b.text("\n\n");
        if (t.blocks[k].tool_result) rc.b.text("<tool_result>");
        rc.b.text(t.blocks[k].text);
        if (t.blocks[k].tool_result) rc.b.text("</tool_result>");
    }
}

void render_assistant(const RenderContext& rc, size_t i) {
    const Turn& t = rc.turns[i];
    // The opening <think> came with the previous message's transition; after a task, no THINK.
    if (rc.thinking && (i == 0 || !rc.turns[i - 1].task) &&
        (!rc.drop || static_cast<ptrdiff_t>(i) > rc.last_user)) {
        rc.b.text(t.msg->reasoning_content.value_or(""));
        rc.b.special(tok::think_close);
    }
    rc.b.text(t.msg->content.value_or(""));
    if (!t.msg->tool_calls.empty()) render_tool_calls(rc.b, t);
    if (!t.msg->wo_eos) rc.b.special(tok::eos);
}

// What follows message i when the next one is an assistant or reminder, or i is last (§4.7).
void render_transition(const RenderContext& rc, size_t i) {
    const bool last = i + 1 == rc.turns.size();
    if (!last && rc.turns[i + 1].role != "assistant" && rc.turns[i + 1].role != "latest_reminder")
        return;
    const Turn& t = rc.turns[i];
    if (t.task) {
        const int k = task_index(*t.task);
        if (k < 0) fail(t.where(), ".task: unknown task '", *t.task, "'");
        if (*t.task == "action") {
            rc.b.special(tok::assistant);
            rc.b.special(rc.thinking ? tok::think_open : tok::think_close);
        }
        rc.b.special(kTaskTokens[static_cast<size_t>(k)]);
    } else if (t.role == "user" || t.role == "developer") {
        const bool open = rc.thinking && (!rc.drop || static_cast<ptrdiff_t>(i) >= rc.last_user);
        rc.b.special(tok::assistant);
        rc.b.special(open ? tok::think_open : tok::think_close);
    }
}

void render_turn(const RenderContext& rc, size_t i) {
    const Turn& t = rc.turns[i];
    const ChatMessage& m = *t.msg;
    if (t.role == "system") {
        rc.b.text(m.content.value_or(""));
        render_appendices(rc.b, t);
    } else if (t.role == "developer") {
        if (!m.content || m.content->empty()) fail(t.where(), ".content: a developer message needs content");
        rc.b.special(tok::user);
        rc.b.text(*m.content);
        render_appendices(rc.b, t);
    } else if (t.role == "user") {
        render_user(rc, t);
    } else if (t.role == "latest_reminder") {
        rc.b.special(tok::latest_reminder);
        rc.b.text(m.content.value_or(""));
    } else if (t.role == "assistant") {
        render_assistant(rc, i);
    } else {
        fail(t.where(), ".role: unknown role '", t.role, "'");
    }
    render_transition(rc, i);
}

// Request-level tools / response_format go to the leading system message (see ChatOptions).
void attach_request_fields(const ChatOptions& opt, std::vector<Turn>& context,
                           std::vector<Turn>& messages, std::vector<ChatMessage>& storage) {
    std::vector<Turn>& target = context.empty() ? messages : context;
    if (!target.empty() && target.front().role == "system") {
        storage.push_back(*target.front().msg);
        target.front().msg = &storage.back();
    } else if (!context.empty()) {
        fail("tools/response_format: the context does not start with a system message");
    } else {
        storage.emplace_back().role = "system";
        target.insert(target.begin(), Turn{"system", &storage.back(), {}, {}, true, "request", 0});
    }
    ChatMessage& sys = storage.back();
    const std::string where = target.front().where();
    if (opt.tools) {
        check_tools(*opt.tools, "tools");
        if (sys.tools && truthy(*sys.tools)) fail(where, ".tools: tools given both in the request and on the message");
        sys.tools = *opt.tools;
    }
    if (opt.response_format) {
        if (sys.response_format && truthy(*sys.response_format))
            fail(where, ".response_format: given both in the request and on the message");
        sys.response_format = *opt.response_format;
    }
}

}  // namespace

ChatPrompt encode_chat(const std::vector<ChatMessage>& messages, const ChatOptions& opt) {
    if (opt.thinking_mode != "thinking" && opt.thinking_mode != "chat")
        fail("thinking_mode: expected 'thinking' or 'chat', got '", opt.thinking_mode, "'");
    if (opt.reasoning_effort && *opt.reasoning_effort != "high" && *opt.reasoning_effort != "max")
        fail("reasoning_effort: expected 'high' or 'max', got '", *opt.reasoning_effort, "'");
    const bool thinking = opt.thinking_mode == "thinking";

    std::vector<Turn> context = merge_user_turns(opt.context, false, "context");
    std::vector<Turn> turns = merge_user_turns(messages, true, "messages");
    std::vector<ChatMessage> storage;
    storage.reserve(1);  // attach_request_fields keeps a pointer into it
    if (opt.tools || opt.response_format) attach_request_fields(opt, context, turns, storage);
    const bool bos = opt.add_bos && context.empty();
    turns.insert(turns.begin(), context.begin(), context.end());
    sort_tool_results(turns);

    // Tools anywhere (user messages lost theirs in pass A) keep all reasoning (§4.5).
    bool drop = opt.drop_thinking;
    for (const Turn& t : turns)
        if (t.role != "user" && t.msg->tools && truthy(*t.msg->tools)) drop = false;
    if (thinking && drop) turns = drop_earlier(turns);

    PromptBuilder b;
    if (bos) b.special(tok::bos);
    const RenderContext rc{turns, thinking, drop, last_user_index(turns), b};
    for (size_t i = 0; i < turns.size(); ++i) {
        if (!turns[i].rendered) continue;
        if (i == 0 && thinking && opt.reasoning_effort == "max") b.text(kEffortMax);
        render_turn(rc, i);
    }
    return b.take();
}

ChatOptions chat_options(const ChatRequest& request) {
    ChatOptions opt;
    opt.thinking_mode = request.thinking ? "thinking" : "chat";
    opt.reasoning_effort = request.reasoning_effort;
    opt.tools = request.tools;
    opt.response_format = request.response_format;
    return opt;
}

ChatPrompt encode_chat(const ChatRequest& request) {
    return encode_chat(request.messages, chat_options(request));
}

// ---------------------------------------------------------------------------------------------
// Completion parsing
//
// One state machine serves parse_completion and streaming: reasoning -> content -> tool-call
// block -> done. In reasoning and content, the earliest marker wins (§8 "read until"); a marker
// is acted on only when no other marker could still start earlier, so every chunking gives the
// same result. Each marker's search resumes where it stopped (MarkerScan), so the work stays
// linear in the text whatever the chunking. Departures from the reference, which raises on all
// of these:
//  - no </think> in thinking mode: everything is reasoning; a leading <think> is dropped;
//  - a tool-call block ends the reasoning too, and needs no blank line in front
//    ("\n\n" is removed with it when present, as the encoder writes it);
//  - no EOS: fine (truncated, or the detokenizer dropped it); text after EOS or after
//    </｜DSML｜tool_calls> is ignored;
//  - stray BOS, <think>, </think> (in content) and DSML tags are dropped from the text (with a
//    U+FFFD in their place where the text around them would otherwise join into markup);
//  - tool calls: whitespace between tags is free; an invoke is reported only when its
//    </｜DSML｜invoke> arrived (the reference accepts a block cut after a header, §10 says not
//    to); a malformed header (an empty name included) or parameter or a duplicate key drops
//    that invoke; a string="false" value that is not JSON becomes a JSON string so arguments
//    stay valid JSON;
//    a parameter must end with "</｜DSML｜parameter>" (the reference's regex also takes
//    "<\n/｜DSML｜parameter>");
//  - at the end of generation, a tail that is an incomplete marker (e.g. "</thi", "\n\n<｜DS")
//    or an incomplete UTF-8 character is dropped; a tail of bare newlines is kept as text.

namespace {

enum class Act { end, close_think, tool_calls, drop };

// Markers in reasoning and content, and what each does there (</think> ends the reasoning and
// is dropped from content).
constexpr std::array<std::string_view, 12> kTextMarkers = {
    tok::eos,        tok::think_close, kToolCallsStart, kToolCallsOpen,
    tok::think_open, tok::bos,         kToolCallsClose, kInvokeClose,
    kParamClose,     kInvokeOpen,      kParamOpen,      tok::dsml};
constexpr std::array<Act, 12> kTextActs = {
    Act::end,  Act::close_think, Act::tool_calls, Act::tool_calls,
    Act::drop, Act::drop,        Act::drop,       Act::drop,
    Act::drop, Act::drop,        Act::drop,       Act::drop};

// The tool-call block's needles, in pairs per state (ToolState::between, header, params), then
// the closing tag of a parameter. Each has its own MarkerScan in ChatStreamParser.
constexpr std::array<std::string_view, 7> kToolNeedles = {
    kInvokeOpen, kToolCallsClose, kParamOpen, kInvokeCloseStem, kParamOpen, kInvokeClose, kParamClose};

// The next occurrence of `needle` at or after `from` (npos if none yet), resuming where the
// previous search of this scan stopped: `from` only grows and the text is only appended to.
size_t scan_next(MarkerScan& s, std::string_view hay, std::string_view needle, size_t from) {
    if (s.next != npos && s.next >= from) return s.next;
    const size_t start = std::max(from, s.scanned);
    s.next = hay.find(needle, start);
    if (s.next != npos)
        s.scanned = s.next;
    else if (hay.size() >= needle.size())
        s.scanned = std::max(start, hay.size() - needle.size() + 1);
    return s.next;
}

// Earliest position q >= from where hay[q..] is a proper prefix of a needle: a marker that
// the next bytes may complete.
size_t partial_start(std::string_view hay, size_t from, std::span<const std::string_view> needles) {
    size_t longest = 0;
    for (std::string_view n : needles) longest = std::max(longest, n.size());
    const size_t lo = std::max(from, hay.size() >= longest ? hay.size() - longest + 1 : 0);
    for (size_t q = lo; q < hay.size(); ++q) {
        const std::string_view tail = hay.substr(q);
        for (std::string_view n : needles)
            if (tail.size() < n.size() && n.substr(0, tail.size()) == tail) return q;
    }
    return npos;
}

struct Decision {
    size_t pos = npos;   // the marker to act on now, if any
    size_t which = 0;    // its index in the needles
    size_t hold = npos;  // text from here on may belong to a marker
};

// The earliest marker at or after `from` (the longest at a tie), acted on only when no marker
// can start before it once more text arrives: so any chunking decides the same way.
Decision decide(std::string_view hay, size_t from, std::span<const std::string_view> needles,
                std::span<MarkerScan> scans, bool final) {
    Decision d;
    for (size_t k = 0; k < needles.size(); ++k) {
        const size_t p = scan_next(scans[k], hay, needles[k], from);
        if (p < d.pos || (p == d.pos && p != npos && needles[k].size() > needles[d.which].size())) {
            d.pos = p;
            d.which = k;
        }
    }
    const size_t partial = final ? npos : partial_start(hay, from, needles);
    d.hold = std::min(d.pos, partial);
    if (partial < d.pos) d.pos = npos;
    return d;
}

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

std::string_view trim(std::string_view s) {
    while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
    while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
    return s;
}

// Invoke header: ws name="NAME"> ws, NAME not empty (a call must name its function). False if
// malformed.
bool parse_invoke_header(std::string_view header, std::string& name) {
    header = trim(header);
    constexpr std::string_view pre = "name=\"", post = "\">";
    if (header.size() <= pre.size() + post.size() || !header.starts_with(pre) || !header.ends_with(post))
        return false;
    name = header.substr(pre.size(), header.size() - pre.size() - post.size());
    return true;
}

// Parameter body (between "<｜DSML｜parameter" and "</｜DSML｜parameter>"):
// ws name="KEY" string="true|false">VALUE. Returns {key, JSON value text}, or nullopt.
std::optional<std::pair<std::string, std::string>> parse_param(std::string_view p) {
    while (!p.empty() && is_space(p.front())) p.remove_prefix(1);
    constexpr std::string_view pre = "name=\"", mid = "\" string=\"";
    if (!p.starts_with(pre)) return std::nullopt;
    p.remove_prefix(pre.size());
    const size_t m = p.find(mid);  // the key is the shortest match, as in the reference
    if (m == npos) return std::nullopt;
    std::string key(p.substr(0, m));
    p.remove_prefix(m + mid.size());
    bool is_string;
    if (p.starts_with("true\">")) {
        is_string = true;
        p.remove_prefix(6);
    } else if (p.starts_with("false\">")) {
        is_string = false;
        p.remove_prefix(7);
    } else {
        return std::nullopt;
    }
    // JSON text never holds a raw NUL, and nlohmann's lexer stops at one (it would accept "0\0x" as
    // "0" and the verbatim text would then not parse): such a value is a string.
    if (is_string || p.find('\0') != npos || !ojson::accept(p)) return std::pair{std::move(key), json_string(p)};
    return std::pair{std::move(key), std::string(p)};  // JSON text, verbatim as the reference
}

}  // namespace

ChatStreamParser::ChatStreamParser(bool thinking) : state_(thinking ? State::reasoning : State::content) {}

void ChatStreamParser::emit(std::string_view text, ChatDelta& out) {
    (state_ == State::reasoning ? out.reasoning_content : out.content) += text;
    tail_ += text;
    if (tail_.size() > 64) tail_.erase(0, tail_.size() - 64);
}

// Dropping a stray marker must not join the text around it into a new one ("<｜" + "</think>" +
// "DSML｜tool_calls"): when the text before it ends like the start of a marker, a U+FFFD goes
// between (no marker contains it).
void ChatStreamParser::drop_marker(ChatDelta& out) {
    if (partial_start(tail_, 0, kTextMarkers) != npos) emit("\uFFFD", out);
}

void ChatStreamParser::scan_text(bool final, ChatDelta& out) {
    if (state_ != State::reasoning && state_ != State::content) return;
    std::array<MarkerScan, kTextMarkers.size()> scans{};
    size_t at = 0;  // pending_[0, at) is consumed
    Decision d;
    while ((d = decide(pending_, at, kTextMarkers, scans, final)).pos != npos) {
        emit(std::string_view(pending_).substr(at, d.pos - at), out);
        at = d.pos + kTextMarkers[d.which].size();
        Act act = kTextActs[d.which];
        if (act == Act::close_think && state_ == State::content) act = Act::drop;
        switch (act) {
            case Act::end:
                state_ = State::done;
                stopped_ = true;
                pending_.clear();
                return;
            case Act::tool_calls:
                pending_.erase(0, at);
                state_ = State::tools;
                tool_state_ = ToolState::between;
                pos_ = eos_scanned_ = 0;
                tool_scans_ = {};
                return;
            case Act::close_think:
                state_ = State::content;
                tail_.clear();
                break;
            case Act::drop: drop_marker(out); break;
        }
    }
    if (final) {
        pending_.erase(0, at);
        flush_text_tail(out);
        return;
    }
    // Emit what no marker can claim any more, short of a cut UTF-8 character.
    size_t safe = std::min(d.hold, pending_.size());
    safe -= utf8_incomplete_tail(std::string_view(pending_).substr(at, safe - at));
    emit(std::string_view(pending_).substr(at, safe - at), out);
    pending_.erase(0, safe);
}

// End of generation in reasoning or content: pending_ holds no full marker.
void ChatStreamParser::flush_text_tail(ChatDelta& out) {
    std::string_view text = pending_;
    const size_t q = partial_start(text, 0, kTextMarkers);
    if (q != npos && text.find_first_not_of('\n', q) != npos) text = text.substr(0, q);
    text.remove_suffix(utf8_incomplete_tail(text));
    emit(text, out);
    pending_.clear();
}

// One step of the tool-call block over pending_[pos_..]. False when it needs more text.
bool ChatStreamParser::tools_step(bool final, ChatDelta& out) {
    const std::string_view buf = pending_;
    const size_t state = static_cast<size_t>(tool_state_);
    const Decision d = decide(buf, pos_, std::span(kToolNeedles).subspan(2 * state, 2),
                              std::span(tool_scans_).subspan(2 * state, 2), final);
    if (d.pos == npos) return false;
    switch (tool_state_) {
        case ToolState::between:  // text here ('>' of the opening tag, newlines) is skipped
            if (d.which == 1) {   // </｜DSML｜tool_calls>
                state_ = State::done;
                stopped_ = true;
                return false;
            }
            pos_ = d.pos + kInvokeOpen.size();
            call_ = ToolCall{};
            params_.clear();
            call_ok_ = true;
            tool_state_ = ToolState::header;
            return true;
        case ToolState::header:
            call_ok_ = parse_invoke_header(buf.substr(pos_, d.pos - pos_), call_.name);
            pos_ = d.pos;
            tool_state_ = ToolState::params;
            return true;
        case ToolState::params:
            if (d.which == 0) return tools_param(d.pos);
            if (call_ok_) {  // </｜DSML｜invoke>: the call is complete
                std::string args = "{";
                for (size_t k = 0; k < params_.size(); ++k)
                    args += (k ? ", " : "") + json_string(params_[k].first) + ": " + params_[k].second;
                call_.arguments = args + "}";
                out.tool_calls.push_back(std::move(call_));
            }
            pos_ = d.pos + kInvokeClose.size();
            tool_state_ = ToolState::between;
            return true;
    }
    return false;
}

// A parameter whose tag starts at `at`; false until its closing tag has arrived.
bool ChatStreamParser::tools_param(size_t at) {
    const size_t start = at + kParamOpen.size();
    const size_t end = scan_next(tool_scans_[6], pending_, kParamClose, start);
    if (end == npos) return false;
    auto param = parse_param(std::string_view(pending_).substr(start, end - start));
    if (!param) {
        call_ok_ = false;
    } else {
        for (const auto& [key, value] : params_)
            if (key == param->first) call_ok_ = false;  // duplicate key
        params_.push_back(std::move(*param));
    }
    pos_ = end + kParamClose.size();
    return true;
}

void ChatStreamParser::scan_tools(bool final, ChatDelta& out) {
    // EOS ends generation wherever it appears; the block is complete or cut there.
    const size_t eos = std::string_view(pending_).find(tok::eos, eos_scanned_);
    if (eos != npos) {
        pending_.resize(eos);
        pos_ = std::min(pos_, eos);
        for (size_t k = 0; k < tool_scans_.size(); ++k) {  // forget matches cut by the EOS
            MarkerScan& s = tool_scans_[k];
            if (s.next != npos && s.next + kToolNeedles[k].size() > eos) s.next = npos;
            s.scanned = std::min(s.scanned, eos);
        }
        stopped_ = final = true;
    } else if (pending_.size() >= tok::eos.size()) {
        eos_scanned_ = pending_.size() - tok::eos.size() + 1;
    }
    while (state_ == State::tools && tools_step(final, out)) {}
    if (final || state_ == State::done) {
        state_ = State::done;  // an invoke still open is incomplete: dropped
        pending_.clear();
    }
}

ChatDelta ChatStreamParser::push(std::string_view new_text) {
    ChatDelta out;
    if (state_ == State::done) return out;
    pending_ += new_text;
    scan_text(false, out);
    if (state_ == State::tools) scan_tools(false, out);
    return out;
}

ChatDelta ChatStreamParser::finish() {
    ChatDelta out;
    scan_text(true, out);
    if (state_ == State::tools) scan_tools(true, out);
    state_ = State::done;
    pending_.clear();
    return out;
}

ParsedCompletion parse_completion(std::string_view text, bool thinking) {
    ChatStreamParser parser(thinking);
    ParsedCompletion r;
    for (ChatDelta d : {parser.push(text), parser.finish()}) {
        r.reasoning_content += d.reasoning_content;
        r.content += d.content;
        for (ToolCall& c : d.tool_calls) r.tool_calls.push_back(std::move(c));
    }
    r.stopped = parser.stopped();
    return r;
}

}  // namespace megamoe
