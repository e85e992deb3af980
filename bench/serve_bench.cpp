// serve_bench.cpp — load benchmark for any OpenAI-compatible server (megamoe serve, or another
// engine for a side-by-side), after `vllm bench serve`.
//
// Sends --num-prompts streaming requests per concurrency level (--concurrency 1,2,4,...: a sweep;
// each level runs the same prompts), at most that many in flight, arriving at --request-rate
// (Poisson) or all at once (inf). Prompts are random (token ids or words, --input-len of them, the
// same for every level) or read from a JSONL file; every request asks for --output-len tokens with
// `ignore_eos` (unless --no-ignore-eos) and `stream_options.include_usage`. Per level it reports
// TTFT, TPOT, ITL and end-to-end latency (mean, p50, p90, p99), request and token throughput and
// goodput (requests meeting --slo-ttft-ms / --slo-tpot-ms, per second), prints a summary table,
// and writes JSON (--out-json) and a PNG chart of TTFT and TPOT (p50, p99) against concurrency
// (--out-png; own encoder: RGB scanlines, zlib deflate and CRC-32, a 5x7 bitmap font).
//
// Definitions (as vLLM's): TTFT = first streamed text - request sent; TPOT = (end-to-end - TTFT) /
// (output tokens - 1), per request; ITL = the gaps between consecutive text chunks, all requests
// pooled; output tokens = usage.completion_tokens when the server sends usage, else the number of
// text chunks. Percentiles interpolate linearly between order statistics.
#include <httplib.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/common.h"
#include "serve/tokenizer.h"

namespace {

using megamoe::Error;
using megamoe::fail;
using megamoe::str;
using json = nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;

const char* const kUsage = R"(megamoe-serve-bench: load benchmark for an OpenAI-compatible server (streaming)

  --host H               server host (127.0.0.1)
  --port P               server port (8000)
  --model NAME           model to request (default: the first of GET /v1/models)
  --endpoint E           chat | completions (completions): /v1/chat/completions or /v1/completions
  --api-key KEY          sent as "Authorization: Bearer KEY" (default: none)
  --prompts FILE.jsonl   prompts from a file, one JSON object a line: {"prompt": "text" | [ids]} or
                         {"messages": [...]} (chat), optional "max_tokens"; default: random prompts
  --prompt-kind K        random prompts of ids | words (ids for completions, words for chat);
                         ids need --endpoint completions
  --input-len N          random prompt length in tokens (128); words: ~1 token each, exact with --tokenizer
  --output-len N         max_tokens of each request (128; a JSONL line's max_tokens wins)
  --id-range LO:HI       random token ids drawn from [LO, HI) (1000:5000)
  --tokenizer FILE       a tokenizer.json: random ids are its ordinary tokens, word prompts exactly --input-len
  --num-prompts N        requests per concurrency level (32; a JSONL file: its line count)
  --prompts-per-concurrency K   a level of concurrency C sends max(--num-prompts, K x C) requests
                         (a sweep's high levels then reach their steady state; 0: off)
  --concurrency LIST     requests in flight at most, a sweep: 1,2,4,8 (default: --num-prompts, unbounded)
  --request-rate R       Poisson arrivals, requests/s, or inf: all at once (inf)
  --temperature T        sampling temperature sent (0)
  --no-ignore-eos        do not send "ignore_eos": true (for servers that reject it)
  --seed S               seed of the random prompts and arrival times (0)
  --slo-ttft-ms X        goodput: a request is good when its TTFT <= X ms ...
  --slo-tpot-ms Y        ... and its TPOT <= Y ms (either or both)
  --warmup N             requests sent one by one before measuring (1)
  --timeout S            seconds one request may take (600)
  --out-json FILE        write the configuration and every level's results as JSON
  --out-png FILE         write a chart: TTFT and TPOT p50 / p99 against concurrency
  --title TEXT           the chart's title (default: model, endpoint, lengths)
  --help                 this text
)";

// ---- options

struct Options {
    std::string host = "127.0.0.1";
    int port = 8000;
    std::string model;
    std::string endpoint = "completions";
    std::string api_key;
    std::string prompts_file;
    std::string prompt_kind;   // "" = by endpoint
    int64_t input_len = 128;
    int64_t output_len = 128;
    int64_t id_lo = 1000, id_hi = 5000;
    std::string tokenizer;
    int64_t num_prompts = -1;  // -1 = default
    int64_t per_concurrency = 0;   // a level of concurrency C sends max(num_prompts, per_concurrency x C)
    std::vector<int64_t> concurrency;   // empty = unbounded (num_prompts)
    double request_rate = std::numeric_limits<double>::infinity();
    double temperature = 0;
    bool ignore_eos = true;
    uint64_t seed = 0;
    std::optional<double> slo_ttft_ms, slo_tpot_ms;
    int64_t warmup = 1;
    double timeout = 600;
    std::string out_json, out_png, title;
};

int64_t parse_int(const std::string& flag, const std::string& v, int64_t lo, int64_t hi) {
    size_t used = 0;
    long long x = 0;
    try {
        x = std::stoll(v, &used);
    } catch (const std::exception&) {
        used = 0;
    }
    if (v.empty() || used != v.size()) fail(flag, ": '", v, "' is not an integer");
    if (x < lo || x > hi) fail(flag, " must be in [", lo, ", ", hi, "], got ", x);
    return x;
}

double parse_double(const std::string& flag, const std::string& v, double lo, double hi) {
    size_t used = 0;
    double x = 0;
    try {
        x = std::stod(v, &used);
    } catch (const std::exception&) {
        used = 0;
    }
    if (v.empty() || used != v.size() || !std::isfinite(x)) fail(flag, ": '", v, "' is not a number");
    if (x < lo || x > hi) fail(flag, " must be in [", lo, ", ", hi, "], got ", v);
    return x;
}

Options parse_args(int argc, char** argv) {
    Options o;
    std::map<std::string, int> seen;
    for (int i = 1; i < argc; ++i) {
        const std::string flag = argv[i];
        if (flag == "--help" || flag == "-h") {
            std::fputs(kUsage, stdout);
            std::exit(0);
        }
        if (flag.rfind("--", 0) != 0) fail("unexpected argument '", flag, "' (flags start with --; see --help)");
        if (++seen[flag] > 1) fail(flag, " is given twice");
        if (flag == "--no-ignore-eos") {
            o.ignore_eos = false;
            continue;
        }
        static const char* const with_value[] = {
            "--host", "--port", "--model", "--endpoint", "--api-key", "--prompts", "--prompt-kind", "--input-len",
            "--output-len", "--id-range", "--tokenizer", "--num-prompts", "--concurrency", "--request-rate",
            "--temperature", "--seed", "--slo-ttft-ms", "--prompts-per-concurrency", "--slo-tpot-ms", "--warmup", "--timeout", "--out-json",
            "--out-png", "--title"};
        if (std::find_if(std::begin(with_value), std::end(with_value), [&](const char* f) { return flag == f; }) ==
            std::end(with_value))
            fail("unknown flag ", flag, " (see --help)");
        if (i + 1 >= argc) fail(flag, " needs a value");
        const std::string v = argv[++i];
        if (flag == "--host") {
            if (v.empty()) fail("--host must not be empty");
            o.host = v;
        } else if (flag == "--port") {
            o.port = static_cast<int>(parse_int(flag, v, 1, 65535));
        } else if (flag == "--model") {
            if (v.empty()) fail("--model must not be empty");
            o.model = v;
        } else if (flag == "--endpoint") {
            if (v != "chat" && v != "completions") fail("--endpoint must be chat or completions, got '", v, "'");
            o.endpoint = v;
        } else if (flag == "--api-key") {
            o.api_key = v;
        } else if (flag == "--prompts") {
            o.prompts_file = v;
        } else if (flag == "--prompt-kind") {
            if (v != "ids" && v != "words") fail("--prompt-kind must be ids or words, got '", v, "'");
            o.prompt_kind = v;
        } else if (flag == "--input-len") {
            o.input_len = parse_int(flag, v, 1, 1 << 24);
        } else if (flag == "--output-len") {
            o.output_len = parse_int(flag, v, 1, 1 << 24);
        } else if (flag == "--id-range") {
            const size_t colon = v.find(':');
            if (colon == std::string::npos) fail("--id-range must be LO:HI, got '", v, "'");
            o.id_lo = parse_int("--id-range (LO)", v.substr(0, colon), 0, INT32_MAX);
            o.id_hi = parse_int("--id-range (HI)", v.substr(colon + 1), 1, INT32_MAX);
            if (o.id_hi <= o.id_lo) fail("--id-range: HI must be above LO, got '", v, "'");
        } else if (flag == "--tokenizer") {
            o.tokenizer = v;
        } else if (flag == "--prompts-per-concurrency") {
            o.per_concurrency = parse_int(flag, v, 0, 4096);
        } else if (flag == "--num-prompts") {
            o.num_prompts = parse_int(flag, v, 1, 1000000);
        } else if (flag == "--concurrency") {
            std::istringstream in(v);
            for (std::string part; std::getline(in, part, ',');)
                o.concurrency.push_back(parse_int("--concurrency", part, 1, 4096));
            if (o.concurrency.empty() || v.back() == ',') fail("--concurrency: '", v, "' is not a list like 1,2,4,8");
            for (size_t k = 1; k < o.concurrency.size(); ++k)
                if (std::count(o.concurrency.begin(), o.concurrency.begin() + static_cast<long>(k), o.concurrency[k]))
                    fail("--concurrency lists ", o.concurrency[k], " twice");
        } else if (flag == "--request-rate") {
            o.request_rate = v == "inf" ? std::numeric_limits<double>::infinity() : parse_double(flag, v, 1e-3, 1e6);
        } else if (flag == "--temperature") {
            o.temperature = parse_double(flag, v, 0, 100);
        } else if (flag == "--seed") {
            o.seed = static_cast<uint64_t>(parse_int(flag, v, 0, INT64_MAX));
        } else if (flag == "--slo-ttft-ms") {
            o.slo_ttft_ms = parse_double(flag, v, 0, 1e9);
        } else if (flag == "--slo-tpot-ms") {
            o.slo_tpot_ms = parse_double(flag, v, 0, 1e9);
        } else if (flag == "--warmup") {
            o.warmup = parse_int(flag, v, 0, 1000);
        } else if (flag == "--timeout") {
            o.timeout = parse_double(flag, v, 0.1, 86400);
        } else if (flag == "--out-json") {
            o.out_json = v;
        } else if (flag == "--out-png") {
            o.out_png = v;
        } else if (flag == "--title") {
            o.title = v;
        }
    }
    if (o.prompt_kind.empty()) o.prompt_kind = o.endpoint == "chat" ? "words" : "ids";
    if (o.prompt_kind == "ids" && o.endpoint == "chat")
        fail("--prompt-kind ids needs --endpoint completions (chat messages are text)");
    if (!o.prompts_file.empty() && (seen.count("--prompt-kind") || seen.count("--input-len") || seen.count("--id-range")))
        fail("--prompts reads the prompts from a file: --prompt-kind, --input-len and --id-range do not apply");
    for (const auto& [flag, path] : {std::pair{"--out-json", o.out_json}, std::pair{"--out-png", o.out_png}}) {
        if (path.empty()) continue;
        if (std::filesystem::is_directory(path)) fail(flag, ": '", path, "' is a directory");
        const auto parent = std::filesystem::path(path).parent_path();
        if (!parent.empty() && !std::filesystem::is_directory(parent))
            fail(flag, ": the directory '", parent.string(), "' does not exist");
    }
    return o;
}

// ---- prompts

struct Prompt {
    json body_part;          // "prompt" (string or ids) or "messages"
    int64_t input_len = 0;   // tokens when known (ids; words with --tokenizer), else the word count
    int64_t max_tokens = 0;
};

const char* const kWords[] = {
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not",
    "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they", "you", "were",
    "their", "one", "all", "we", "can", "her", "has", "there", "been", "if", "more", "when", "will", "would",
    "who", "so", "no", "time", "people", "year", "way", "day", "man", "thing", "world", "life", "hand", "part",
    "child", "eye", "place", "work", "week", "case", "point", "number", "group", "problem", "fact", "good", "new",
    "first", "last", "long", "great", "little", "own", "other", "old", "right", "big", "high", "small", "large",
    "next", "early", "young", "few", "public", "same", "able", "make", "know", "take", "see", "come", "think",
    "look", "want", "give", "use", "find", "tell", "ask", "seem", "feel", "try", "leave", "call", "water", "city",
    "river", "story", "music", "light", "house", "road", "table", "paper", "market", "system", "model", "token"};

std::vector<Prompt> random_prompts(const Options& o, int64_t n, std::mt19937_64& rng) {
    std::optional<megamoe::Tokenizer> tok;
    if (!o.tokenizer.empty()) tok = megamoe::Tokenizer::load(o.tokenizer);
    std::vector<Prompt> out;
    if (o.prompt_kind == "ids") {
        std::vector<int32_t> pool;   // the ids to draw from
        if (tok) {
            for (int32_t id = 0; id < tok->vocab_size(); ++id)
                if (tok->has_token(id) && !tok->is_special(id) && id >= o.id_lo && id < o.id_hi) pool.push_back(id);
            if (pool.empty()) fail("--tokenizer ", o.tokenizer, ": no ordinary token ids in --id-range ", o.id_lo, ":", o.id_hi);
        }
        std::uniform_int_distribution<int64_t> any(o.id_lo, o.id_hi - 1);
        for (int64_t i = 0; i < n; ++i) {
            std::vector<int32_t> ids(static_cast<size_t>(o.input_len));
            for (auto& id : ids) id = pool.empty() ? static_cast<int32_t>(any(rng)) : pool[rng() % pool.size()];
            out.push_back({json{{"prompt", ids}}, o.input_len, o.output_len});
        }
        return out;
    }
    // Words: with a tokenizer each word's cost (" word" is one pre-token) adds up exactly.
    constexpr size_t kNumWords = std::size(kWords);
    std::vector<int64_t> cost(kNumWords, 1);
    std::vector<size_t> single;   // words of one token, to fill the last gap
    if (tok)
        for (size_t w = 0; w < kNumWords; ++w) {
            cost[w] = static_cast<int64_t>(tok->encode_ordinary(std::string(" ") + kWords[w]).size());
            if (cost[w] == 1) single.push_back(w);
        }
    if (tok && single.empty()) fail("--tokenizer ", o.tokenizer, ": no built-in word is a single token; use --prompt-kind ids");
    for (int64_t i = 0; i < n; ++i) {
        std::string text;
        int64_t len = 0;
        while (len < o.input_len) {
            size_t w = rng() % kNumWords;
            if (len + cost[w] > o.input_len) w = single[rng() % single.size()];
            if (!text.empty()) text += ' ';
            text += kWords[w];
            len += cost[w];
        }
        if (tok) len = static_cast<int64_t>(tok->encode_ordinary(text).size());   // the first word has no space
        json part = o.endpoint == "chat" ? json{{"messages", json::array({{{"role", "user"}, {"content", text}}})}}
                                         : json{{"prompt", text}};
        out.push_back({part, len, o.output_len});
    }
    return out;
}

std::vector<Prompt> file_prompts(const Options& o) {
    std::ifstream in(o.prompts_file);
    if (!in) fail("--prompts: cannot open '", o.prompts_file, "'");
    std::vector<Prompt> out;
    std::string line;
    for (int64_t line_no = 1; std::getline(in, line); ++line_no) {
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        const std::string where = str(o.prompts_file, ":", line_no, ": ");
        json j;
        try {
            j = json::parse(line);
        } catch (const json::exception& e) {
            fail(where, "not valid JSON (", e.what(), ")");
        }
        if (!j.is_object()) fail(where, "a line must be a JSON object");
        Prompt p;
        p.max_tokens = o.output_len;
        if (j.contains("max_tokens")) {
            if (!j["max_tokens"].is_number_integer() || j["max_tokens"].get<int64_t>() < 1)
                fail(where, "'max_tokens' must be a positive integer");
            p.max_tokens = j["max_tokens"].get<int64_t>();
        }
        if (j.contains("messages")) {
            if (o.endpoint != "chat") fail(where, "'messages' needs --endpoint chat");
            if (!j["messages"].is_array() || j["messages"].empty()) fail(where, "'messages' must be a non-empty array");
            p.body_part = {{"messages", j["messages"]}};
        } else if (j.contains("prompt")) {
            const json& pr = j["prompt"];
            if (pr.is_string()) {
                const std::string text = pr.get<std::string>();   // one string: begin and end of the same object
                p.input_len = static_cast<int64_t>(std::count(text.begin(), text.end(), ' ')) + 1;
                p.body_part = o.endpoint == "chat"
                                  ? json{{"messages", json::array({{{"role", "user"}, {"content", pr}}})}}
                                  : json{{"prompt", pr}};
            } else if (pr.is_array() && !pr.empty() &&
                       std::all_of(pr.begin(), pr.end(), [](const json& v) { return v.is_number_integer(); })) {
                if (o.endpoint != "completions") fail(where, "a token-id 'prompt' needs --endpoint completions");
                p.input_len = static_cast<int64_t>(pr.size());
                p.body_part = {{"prompt", pr}};
            } else {
                fail(where, "'prompt' must be a string or a non-empty array of token ids");
            }
        } else {
            fail(where, "needs 'prompt' or 'messages'");
        }
        out.push_back(std::move(p));
    }
    if (out.empty()) fail("--prompts: '", o.prompts_file, "' holds no prompts");
    return out;
}

// ---- one streamed request

struct Outcome {
    bool ok = false;
    std::string error;
    double start = 0;                 // s since the level started
    double ttft = 0, e2e = 0;         // s
    std::vector<double> itl;          // s
    int64_t prompt_tokens = 0, output_tokens = 0;
};

std::string path_of(const Options& o) { return o.endpoint == "chat" ? "/v1/chat/completions" : "/v1/completions"; }

json request_body(const Options& o, const Prompt& p) {
    json b = {{"model", o.model}};
    for (auto& [k, v] : p.body_part.items()) b[k] = v;
    b["max_tokens"] = p.max_tokens;
    b["temperature"] = o.temperature;
    b["stream"] = true;
    b["stream_options"] = {{"include_usage", true}};
    if (o.ignore_eos) b["ignore_eos"] = true;
    return b;
}

// The text a chunk carries (content, reasoning, tool calls or completion text), empty if none.
bool chunk_has_text(const json& ev, bool chat) {
    if (!ev.contains("choices") || !ev["choices"].is_array()) return false;
    for (const auto& c : ev["choices"]) {
        if (!chat) {
            if (c.contains("text") && c["text"].is_string() && !c["text"].get<std::string>().empty()) return true;
            continue;
        }
        if (!c.contains("delta") || !c["delta"].is_object()) continue;
        const json& d = c["delta"];
        for (const char* k : {"content", "reasoning_content", "reasoning"})
            if (d.contains(k) && d[k].is_string() && !d[k].get<std::string>().empty()) return true;
        if (d.contains("tool_calls") && d["tool_calls"].is_array() && !d["tool_calls"].empty()) return true;
    }
    return false;
}

Outcome send_one(httplib::Client& cli, const Options& o, const Prompt& p, Clock::time_point level_t0) {
    Outcome r;
    const bool chat = o.endpoint == "chat";
    const auto t0 = Clock::now();
    r.start = std::chrono::duration<double>(t0 - level_t0).count();
    std::vector<double> times;   // s since t0 of each chunk with text
    std::string buf, body_if_error;
    int status = -1;
    bool done = false;
    std::optional<json> usage;
    auto since = [&] { return std::chrono::duration<double>(Clock::now() - t0).count(); };
    auto on_event = [&](const std::string& data) {
        if (data == "[DONE]") {
            done = true;
            return;
        }
        json ev = json::parse(data, nullptr, false);
        if (ev.is_discarded()) {
            if (r.error.empty()) r.error = "an SSE event is not JSON: " + data.substr(0, 200);
            return;
        }
        if (ev.contains("error")) {
            if (r.error.empty()) r.error = "error event: " + ev["error"].dump().substr(0, 300);
            return;
        }
        if (chunk_has_text(ev, chat)) times.push_back(since());
        if (ev.contains("usage") && ev["usage"].is_object()) usage = ev["usage"];
    };
    httplib::Request req;
    req.method = "POST";
    req.path = path_of(o);
    req.body = request_body(o, p).dump();
    req.set_header("Content-Type", "application/json");
    req.set_header("Accept", "text/event-stream");
    if (!o.api_key.empty()) req.set_header("Authorization", "Bearer " + o.api_key);
    req.response_handler = [&](const httplib::Response& res) {
        status = res.status;
        return true;
    };
    req.content_receiver = [&](const char* data, size_t len, uint64_t, uint64_t) {
        if (status != 200) {
            body_if_error.append(data, len);
            return true;
        }
        for (size_t i = 0; i < len; ++i)
            if (data[i] != '\r') buf += data[i];
        for (size_t at; (at = buf.find("\n\n")) != std::string::npos;) {
            std::istringstream lines(buf.substr(0, at));
            buf.erase(0, at + 2);
            std::string data_field;
            for (std::string line; std::getline(lines, line);) {
                if (line.rfind("data:", 0) != 0) continue;
                std::string d = line.substr(5);
                if (!d.empty() && d[0] == ' ') d.erase(0, 1);
                if (!data_field.empty()) data_field += '\n';
                data_field += d;
            }
            if (!data_field.empty()) on_event(data_field);
        }
        return true;
    };
    const httplib::Result res = cli.send(req);
    r.e2e = since();
    if (!res) {
        r.error = "transport error: " + httplib::to_string(res.error());
        return r;
    }
    if (status != 200) {
        r.error = str("HTTP ", status, ": ", body_if_error.substr(0, 300));
        return r;
    }
    if (!r.error.empty()) return r;
    if (!done) {
        r.error = "the stream ended without data: [DONE]";
        return r;
    }
    if (times.empty()) {
        r.error = "the stream carried no text";
        return r;
    }
    r.ttft = times.front();
    for (size_t i = 1; i < times.size(); ++i) r.itl.push_back(times[i] - times[i - 1]);
    r.output_tokens = static_cast<int64_t>(times.size());
    r.prompt_tokens = p.input_len;
    if (usage) {
        if (usage->contains("completion_tokens") && (*usage)["completion_tokens"].is_number_integer())
            r.output_tokens = (*usage)["completion_tokens"].get<int64_t>();
        if (usage->contains("prompt_tokens") && (*usage)["prompt_tokens"].is_number_integer())
            r.prompt_tokens = (*usage)["prompt_tokens"].get<int64_t>();
    }
    r.ok = true;
    return r;
}

httplib::Client make_client(const Options& o) {
    httplib::Client cli(o.host, o.port);
    cli.set_connection_timeout(10, 0);
    const auto us = static_cast<int64_t>(o.timeout * 1e6);
    cli.set_read_timeout(us / 1000000, us % 1000000);
    cli.set_write_timeout(30, 0);
    cli.set_keep_alive(true);
    return cli;
}

// ---- statistics

struct Dist {
    double mean = 0, p50 = 0, p90 = 0, p99 = 0;
    size_t n = 0;
};

double percentile(const std::vector<double>& sorted, double q) {   // linear between order statistics
    if (sorted.empty()) return 0;
    const double pos = q / 100.0 * static_cast<double>(sorted.size() - 1);
    const size_t lo = static_cast<size_t>(std::floor(pos));
    const size_t hi = std::min(lo + 1, sorted.size() - 1);
    return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - static_cast<double>(lo));
}

Dist dist_ms(std::vector<double> s) {   // values in seconds -> milliseconds
    Dist d;
    d.n = s.size();
    if (s.empty()) return d;
    for (double& v : s) v *= 1000;
    std::sort(s.begin(), s.end());
    double sum = 0;
    for (double v : s) sum += v;
    d.mean = sum / static_cast<double>(s.size());
    d.p50 = percentile(s, 50);
    d.p90 = percentile(s, 90);
    d.p99 = percentile(s, 99);
    return d;
}

json dist_json(const Dist& d) { return {{"mean", d.mean}, {"p50", d.p50}, {"p90", d.p90}, {"p99", d.p99}, {"count", d.n}}; }

struct Level {
    int64_t concurrency = 0;
    int64_t completed = 0, failed = 0;
    double duration = 0;
    int64_t input_tokens = 0, output_tokens = 0;
    double req_per_s = 0, out_tok_per_s = 0, total_tok_per_s = 0;
    std::optional<double> goodput;
    int64_t good = 0;
    Dist ttft, tpot, itl, e2el;
    std::vector<std::string> errors;   // the first few
};

Level summarize(const Options& o, int64_t concurrency, const std::vector<Outcome>& outs, double duration) {
    Level L;
    L.concurrency = concurrency;
    L.duration = duration;
    std::vector<double> ttft, tpot, itl, e2el;
    for (const auto& r : outs) {
        if (!r.ok) {
            ++L.failed;
            if (L.errors.size() < 5) L.errors.push_back(r.error);
            continue;
        }
        ++L.completed;
        L.input_tokens += r.prompt_tokens;
        L.output_tokens += r.output_tokens;
        ttft.push_back(r.ttft);
        e2el.push_back(r.e2e);
        itl.insert(itl.end(), r.itl.begin(), r.itl.end());
        std::optional<double> t;
        if (r.output_tokens > 1) {
            t = (r.e2e - r.ttft) / static_cast<double>(r.output_tokens - 1);
            tpot.push_back(*t);
        }
        bool good = true;
        if (o.slo_ttft_ms && r.ttft * 1000 > *o.slo_ttft_ms) good = false;
        if (o.slo_tpot_ms && t && *t * 1000 > *o.slo_tpot_ms) good = false;
        L.good += good;
    }
    L.ttft = dist_ms(ttft);
    L.tpot = dist_ms(tpot);
    L.itl = dist_ms(itl);
    L.e2el = dist_ms(e2el);
    if (duration > 0) {
        L.req_per_s = static_cast<double>(L.completed) / duration;
        L.out_tok_per_s = static_cast<double>(L.output_tokens) / duration;
        L.total_tok_per_s = static_cast<double>(L.input_tokens + L.output_tokens) / duration;
        if (o.slo_ttft_ms || o.slo_tpot_ms) L.goodput = static_cast<double>(L.good) / duration;
    }
    return L;
}

// ---- one level of the sweep

Level run_level(const Options& o, const std::vector<Prompt>& prompts, int64_t concurrency, uint64_t seed) {
    const size_t n = prompts.size();
    std::vector<double> arrival(n, 0.0);   // s after the start
    if (std::isfinite(o.request_rate)) {
        std::mt19937_64 rng(seed);
        std::exponential_distribution<double> gap(o.request_rate);
        double t = 0;
        for (size_t i = 0; i < n; ++i) {
            arrival[i] = t;
            t += gap(rng);
        }
    }
    std::vector<Outcome> outs(n);
    std::atomic<size_t> next{0};
    const auto t0 = Clock::now();
    std::vector<std::thread> workers;
    const size_t threads = std::min<size_t>(n, static_cast<size_t>(concurrency));
    for (size_t w = 0; w < threads; ++w)
        workers.emplace_back([&] {
            httplib::Client cli = make_client(o);
            for (size_t i; (i = next++) < n;) {
                std::this_thread::sleep_until(t0 + std::chrono::duration_cast<Clock::duration>(
                                                       std::chrono::duration<double>(arrival[i])));
                outs[i] = send_one(cli, o, prompts[i], t0);
            }
        });
    for (auto& t : workers) t.join();
    const double duration = std::chrono::duration<double>(Clock::now() - t0).count();
    return summarize(o, concurrency, outs, duration);
}

// ---- reports

void print_level(const Options& o, const Level& L) {
    auto line = [](const char* name, const std::string& v) { std::printf("%-40s %s\n", name, v.c_str()); };
    auto num = [](double v, int prec) {
        char b[64];
        std::snprintf(b, sizeof b, "%.*f", prec, v);
        return std::string(b);
    };
    std::printf("============ Serving Benchmark Result (concurrency %ld) ============\n", L.concurrency);
    line("Successful requests:", std::to_string(L.completed));
    line("Failed requests:", std::to_string(L.failed));
    line("Benchmark duration (s):", num(L.duration, 2));
    line("Total input tokens:", std::to_string(L.input_tokens));
    line("Total generated tokens:", std::to_string(L.output_tokens));
    line("Request throughput (req/s):", num(L.req_per_s, 2));
    line("Output token throughput (tok/s):", num(L.out_tok_per_s, 2));
    line("Total token throughput (tok/s):", num(L.total_tok_per_s, 2));
    if (L.goodput) {
        std::string slo;
        if (o.slo_ttft_ms) slo += str("TTFT <= ", *o.slo_ttft_ms, " ms");
        if (o.slo_tpot_ms) slo += str(slo.empty() ? "" : ", ", "TPOT <= ", *o.slo_tpot_ms, " ms");
        line("Goodput (req/s):", num(*L.goodput, 2) + "  (" + std::to_string(L.good) + " requests with " + slo + ")");
    }
    auto block = [&](const char* title, const char* key, const Dist& d) {
        std::printf("%s\n", title);
        line(str("Mean ", key, " (ms):").c_str(), num(d.mean, 2));
        line(str("Median ", key, " (ms):").c_str(), num(d.p50, 2));
        line(str("P90 ", key, " (ms):").c_str(), num(d.p90, 2));
        line(str("P99 ", key, " (ms):").c_str(), num(d.p99, 2));
    };
    block("---------------Time to First Token----------------", "TTFT", L.ttft);
    block("-----Time per Output Token (excl. 1st token)------", "TPOT", L.tpot);
    block("---------------Inter-token Latency----------------", "ITL", L.itl);
    block("----------------End-to-end Latency----------------", "E2EL", L.e2el);
    for (const auto& e : L.errors) std::printf("error: %s\n", e.c_str());
    std::printf("==================================================\n\n");
    std::fflush(stdout);
}

void print_table(const std::vector<Level>& levels, bool goodput) {
    std::printf("| concurrency | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | ITL p50 ms | "
                "E2EL p50 ms |%s failed |\n",
                goodput ? " goodput req/s |" : "");
    std::printf("|--:|--:|--:|--:|--:|--:|--:|--:|--:|%s--:|\n", goodput ? "--:|" : "");
    for (const auto& L : levels) {
        std::printf("| %ld | %.2f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.0f |", L.concurrency, L.req_per_s,
                    L.out_tok_per_s, L.ttft.p50, L.ttft.p99, L.tpot.p50, L.tpot.p99, L.itl.p50, L.e2el.p50);
        if (goodput) std::printf(" %.2f |", L.goodput.value_or(0));
        std::printf(" %ld |\n", L.failed);
    }
}

json level_json(const Level& L) {
    return {{"concurrency", L.concurrency},
            {"completed", L.completed},
            {"failed", L.failed},
            {"duration_s", L.duration},
            {"total_input_tokens", L.input_tokens},
            {"total_output_tokens", L.output_tokens},
            {"request_throughput", L.req_per_s},
            {"output_throughput", L.out_tok_per_s},
            {"total_token_throughput", L.total_tok_per_s},
            {"goodput", L.goodput ? json(*L.goodput) : json(nullptr)},
            {"good_requests", L.goodput ? json(L.good) : json(nullptr)},
            {"ttft_ms", dist_json(L.ttft)},
            {"tpot_ms", dist_json(L.tpot)},
            {"itl_ms", dist_json(L.itl)},
            {"e2el_ms", dist_json(L.e2el)},
            {"errors", L.errors}};
}

// ---- PNG: an RGB canvas, lines, a 5x7 bitmap font, and the encoder

struct Rgb {
    uint8_t r, g, b;
};

class Canvas {
public:
    Canvas(int w, int h) : w_(w), h_(h), px_(static_cast<size_t>(w) * static_cast<size_t>(h) * 3, 255) {}
    int width() const { return w_; }
    int height() const { return h_; }
    const std::vector<uint8_t>& pixels() const { return px_; }

    void set(int x, int y, Rgb c) {
        if (x < 0 || y < 0 || x >= w_ || y >= h_) return;
        uint8_t* p = &px_[(static_cast<size_t>(y) * static_cast<size_t>(w_) + static_cast<size_t>(x)) * 3];
        p[0] = c.r;
        p[1] = c.g;
        p[2] = c.b;
    }
    void fill(int x0, int y0, int x1, int y1, Rgb c) {   // inclusive corners
        for (int y = std::min(y0, y1); y <= std::max(y0, y1); ++y)
            for (int x = std::min(x0, x1); x <= std::max(x0, x1); ++x) set(x, y, c);
    }
    // Bresenham's line, each point stamped as a (2r+1)^2 square; dash > 0: on and off every dash pixels.
    void line(int x0, int y0, int x1, int y1, Rgb c, int r = 0, int dash = 0) {
        const int dx = std::abs(x1 - x0), dy = -std::abs(y1 - y0);
        const int sx = x0 < x1 ? 1 : -1, sy = y0 < y1 ? 1 : -1;
        int err = dx + dy, step = 0;
        for (;;) {
            if (dash <= 0 || (step / dash) % 2 == 0) fill(x0 - r, y0 - r, x0 + r, y0 + r, c);
            ++step;
            if (x0 == x1 && y0 == y1) break;
            const int e2 = 2 * err;
            if (e2 >= dy) {
                err += dy;
                x0 += sx;
            }
            if (e2 <= dx) {
                err += dx;
                y0 += sy;
            }
        }
    }

private:
    int w_, h_;
    std::vector<uint8_t> px_;
};

// 5x7 glyphs, one byte a row, bit 4 the leftmost pixel. Lower case is drawn as upper case;
// anything else as '?'.
const std::map<char, std::array<uint8_t, 7>>& font() {
    static const std::map<char, std::array<uint8_t, 7>> f = {
        {' ', {0, 0, 0, 0, 0, 0, 0}},
        {'0', {0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110}},
        {'1', {0b00100, 0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110}},
        {'2', {0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111}},
        {'3', {0b11111, 0b00010, 0b00100, 0b00010, 0b00001, 0b10001, 0b01110}},
        {'4', {0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010}},
        {'5', {0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110}},
        {'6', {0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110}},
        {'7', {0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000}},
        {'8', {0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110}},
        {'9', {0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100}},
        {'A', {0b01110, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001}},
        {'B', {0b11110, 0b10001, 0b10001, 0b11110, 0b10001, 0b10001, 0b11110}},
        {'C', {0b01110, 0b10001, 0b10000, 0b10000, 0b10000, 0b10001, 0b01110}},
        {'D', {0b11110, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b11110}},
        {'E', {0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b11111}},
        {'F', {0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b10000}},
        {'G', {0b01110, 0b10001, 0b10000, 0b10111, 0b10001, 0b10001, 0b01111}},
        {'H', {0b10001, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001}},
        {'I', {0b01110, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110}},
        {'J', {0b00111, 0b00010, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100}},
        {'K', {0b10001, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b10001}},
        {'L', {0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111}},
        {'M', {0b10001, 0b11011, 0b10101, 0b10101, 0b10001, 0b10001, 0b10001}},
        {'N', {0b10001, 0b10001, 0b11001, 0b10101, 0b10011, 0b10001, 0b10001}},
        {'O', {0b01110, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110}},
        {'P', {0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000, 0b10000}},
        {'Q', {0b01110, 0b10001, 0b10001, 0b10001, 0b10101, 0b10010, 0b01101}},
        {'R', {0b11110, 0b10001, 0b10001, 0b11110, 0b10100, 0b10010, 0b10001}},
        {'S', {0b01111, 0b10000, 0b10000, 0b01110, 0b00001, 0b00001, 0b11110}},
        {'T', {0b11111, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100}},
        {'U', {0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110}},
        {'V', {0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100}},
        {'W', {0b10001, 0b10001, 0b10001, 0b10101, 0b10101, 0b10101, 0b01010}},
        {'X', {0b10001, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b10001}},
        {'Y', {0b10001, 0b10001, 0b01010, 0b00100, 0b00100, 0b00100, 0b00100}},
        {'Z', {0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b11111}},
        {'.', {0, 0, 0, 0, 0, 0b01100, 0b01100}},
        {',', {0, 0, 0, 0, 0b01100, 0b00100, 0b01000}},
        {'-', {0, 0, 0, 0b11111, 0, 0, 0}},
        {'+', {0, 0b00100, 0b00100, 0b11111, 0b00100, 0b00100, 0}},
        {'=', {0, 0, 0b11111, 0, 0b11111, 0, 0}},
        {'_', {0, 0, 0, 0, 0, 0, 0b11111}},
        {'/', {0, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0}},
        {':', {0, 0b01100, 0b01100, 0, 0b01100, 0b01100, 0}},
        {'(', {0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00100, 0b00010}},
        {')', {0b01000, 0b00100, 0b00010, 0b00010, 0b00010, 0b00100, 0b01000}},
        {'%', {0b11000, 0b11001, 0b00010, 0b00100, 0b01000, 0b10011, 0b00011}},
        {'?', {0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0, 0b00100}},
    };
    return f;
}

constexpr int kGlyphW = 6, kGlyphH = 8;   // cell: 5x7 glyph plus a column and a row of space

int text_width(const std::string& s, int scale) { return static_cast<int>(s.size()) * kGlyphW * scale; }

void draw_text(Canvas& c, int x, int y, const std::string& s, Rgb color, int scale) {
    for (char ch : s) {
        const char up = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
        auto it = font().find(up);
        const auto& g = it == font().end() ? font().at('?') : it->second;
        for (int row = 0; row < 7; ++row)
            for (int col = 0; col < 5; ++col)
                if (g[static_cast<size_t>(row)] & (1 << (4 - col)))
                    c.fill(x + col * scale, y + row * scale, x + col * scale + scale - 1, y + row * scale + scale - 1, color);
        x += kGlyphW * scale;
    }
}

void put_u32(std::string& s, uint32_t v) {
    for (int shift = 24; shift >= 0; shift -= 8) s += static_cast<char>((v >> shift) & 0xFF);
}

void png_chunk(std::string& out, const char* type, const std::string& data) {
    put_u32(out, static_cast<uint32_t>(data.size()));
    const std::string td = std::string(type, 4) + data;
    out += td;
    put_u32(out, static_cast<uint32_t>(crc32(0, reinterpret_cast<const Bytef*>(td.data()), static_cast<uInt>(td.size()))));
}

std::string encode_png(const Canvas& c) {
    std::string raw;   // each scanline: filter type 0 (none), then RGB
    const size_t row = static_cast<size_t>(c.width()) * 3;
    raw.reserve((row + 1) * static_cast<size_t>(c.height()));
    for (int y = 0; y < c.height(); ++y) {
        raw += '\0';
        raw.append(reinterpret_cast<const char*>(&c.pixels()[static_cast<size_t>(y) * row]), row);
    }
    uLongf zlen = compressBound(static_cast<uLong>(raw.size()));
    std::string z(zlen, '\0');
    if (compress2(reinterpret_cast<Bytef*>(z.data()), &zlen, reinterpret_cast<const Bytef*>(raw.data()),
                  static_cast<uLong>(raw.size()), 9) != Z_OK)
        fail("--out-png: zlib could not compress the image");
    z.resize(zlen);
    std::string ihdr;
    put_u32(ihdr, static_cast<uint32_t>(c.width()));
    put_u32(ihdr, static_cast<uint32_t>(c.height()));
    ihdr += std::string{8, 2, 0, 0, 0};   // 8 bits, RGB, deflate, adaptive filtering, no interlace
    std::string out = "\x89PNG\r\n\x1a\n";
    png_chunk(out, "IHDR", ihdr);
    png_chunk(out, "IDAT", z);
    png_chunk(out, "IEND", "");
    return out;
}

// A round step near range / target: 1, 2 or 5 times a power of ten.
double nice_step(double range, int target) {
    const double raw = range / target;
    const double p = std::pow(10.0, std::floor(std::log10(raw)));
    for (double m : {1.0, 2.0, 5.0, 10.0})
        if (m * p >= raw) return m * p;
    return 10 * p;
}

std::string tick_label(double v, double step) {
    char b[32];
    const int decimals = step >= 1 ? 0 : static_cast<int>(std::ceil(-std::log10(step) - 1e-9));
    std::snprintf(b, sizeof b, "%.*f", decimals, v);
    return b;
}

struct Series {
    std::string name;
    std::vector<double> y;
    Rgb color;
    int dash;
};

// One panel: a y axis from 0, an x axis in log2 of the concurrency, the series as lines with
// square markers, a legend.
void draw_panel(Canvas& c, int x0, int y0, int w, int h, const std::string& title, const std::vector<int64_t>& xs,
                const std::vector<Series>& series) {
    const Rgb black{0, 0, 0}, grid{225, 225, 225}, axis{60, 60, 60};
    const int left = x0 + 78, right = x0 + w - 16, top = y0 + 34, bottom = y0 + h - 52;
    draw_text(c, x0 + (w - text_width(title, 2)) / 2, y0 + 6, title, black, 2);
    double ymax = 0;
    for (const auto& s : series)
        for (double v : s.y) ymax = std::max(ymax, v);
    if (!(ymax > 0)) ymax = 1;
    const double step = nice_step(ymax * 1.08, 5);
    const double ytop = std::ceil(ymax * 1.08 / step) * step;
    auto ypix = [&](double v) { return bottom - static_cast<int>(std::lround((v / ytop) * (bottom - top))); };
    const double lmin = std::log2(static_cast<double>(xs.front())), lmax = std::log2(static_cast<double>(xs.back()));
    auto xpix = [&](int64_t x) {
        if (lmax <= lmin) return (left + right) / 2;
        const double f = (std::log2(static_cast<double>(x)) - lmin) / (lmax - lmin);
        return left + 20 + static_cast<int>(std::lround(f * (right - left - 40)));
    };
    for (double v = 0; v <= ytop + step / 2; v += step) {
        const int y = ypix(v);
        c.line(left, y, right, y, grid);
        const std::string l = tick_label(v, step);
        draw_text(c, left - 8 - text_width(l, 2), y - 7, l, black, 2);
    }
    for (int64_t x : xs) {
        const int px = xpix(x);
        c.line(px, top, px, bottom, grid);
        c.line(px, bottom, px, bottom + 5, axis);
        const std::string l = std::to_string(x);
        draw_text(c, px - text_width(l, 2) / 2 + 1, bottom + 10, l, black, 2);
    }
    c.line(left, top, left, bottom, axis, 1);
    c.line(left, bottom, right, bottom, axis, 1);
    const std::string xl = "CONCURRENCY";
    draw_text(c, (left + right - text_width(xl, 2)) / 2, bottom + 32, xl, black, 2);
    int ly = top + 8;
    for (const auto& s : series) {
        for (size_t i = 0; i + 1 < xs.size(); ++i)
            c.line(xpix(xs[i]), ypix(s.y[i]), xpix(xs[i + 1]), ypix(s.y[i + 1]), s.color, 1, s.dash);
        for (size_t i = 0; i < xs.size(); ++i) c.fill(xpix(xs[i]) - 4, ypix(s.y[i]) - 4, xpix(xs[i]) + 4, ypix(s.y[i]) + 4, s.color);
        c.line(left + 12, ly + 7, left + 42, ly + 7, s.color, 1, s.dash);
        draw_text(c, left + 50, ly, s.name, black, 2);
        ly += 22;
    }
}

void write_png(const Options& o, const std::vector<Level>& levels, const std::string& title) {
    std::vector<Level> sorted = levels;
    std::sort(sorted.begin(), sorted.end(), [](const Level& a, const Level& b) { return a.concurrency < b.concurrency; });
    std::vector<int64_t> xs;
    std::vector<double> ttft50, ttft99, tpot50, tpot99;
    for (const auto& L : sorted) {
        xs.push_back(L.concurrency);
        ttft50.push_back(L.ttft.p50);
        ttft99.push_back(L.ttft.p99);
        tpot50.push_back(L.tpot.p50);
        tpot99.push_back(L.tpot.p99);
    }
    const Rgb blue{31, 100, 200}, red{210, 50, 40};
    Canvas c(1200, 520);
    draw_text(c, (c.width() - text_width(title, 2)) / 2, 12, title, Rgb{0, 0, 0}, 2);
    draw_panel(c, 0, 40, 600, 480, "TTFT (MS)", xs, {{"P50", ttft50, blue, 0}, {"P99", ttft99, red, 6}});
    draw_panel(c, 600, 40, 600, 480, "TPOT (MS)", xs, {{"P50", tpot50, blue, 0}, {"P99", tpot99, red, 6}});
    const std::string png = encode_png(c);
    std::ofstream f(o.out_png, std::ios::binary);
    if (!f || !f.write(png.data(), static_cast<std::streamsize>(png.size())))
        fail("--out-png: cannot write '", o.out_png, "'");
}

std::string utc_now() {
    const std::time_t t = std::time(nullptr);
    std::tm tm{};
    gmtime_r(&t, &tm);
    char b[32];
    std::strftime(b, sizeof b, "%Y-%m-%dT%H:%M:%SZ", &tm);
    return b;
}

// ---- main

int run(int argc, char** argv) {
    Options o = parse_args(argc, argv);
    std::mt19937_64 rng(o.seed);
    std::vector<Prompt> prompts;
    if (!o.prompts_file.empty()) {
        std::vector<Prompt> lines = file_prompts(o);
        const int64_t n = o.num_prompts > 0 ? o.num_prompts : static_cast<int64_t>(lines.size());
        for (int64_t i = 0; i < n; ++i) prompts.push_back(lines[static_cast<size_t>(i) % lines.size()]);
    } else {
        int64_t n = o.num_prompts > 0 ? o.num_prompts : 32;
        for (int64_t c : o.concurrency) n = std::max(n, o.per_concurrency * c);
        prompts = random_prompts(o, n, rng);
    }
    // Requests of each level: all prompts, or with --prompts-per-concurrency the first
    // max(--num-prompts, K x C) of them.
    auto level_size = [&](int64_t c) {
        if (o.per_concurrency == 0) return prompts.size();
        const int64_t base = o.num_prompts > 0 ? o.num_prompts : 32;
        return static_cast<size_t>(std::min<int64_t>(static_cast<int64_t>(prompts.size()), std::max(base, o.per_concurrency * c)));
    };
    // The model: given, or the server's first.
    {
        httplib::Client cli = make_client(o);
        cli.set_read_timeout(30, 0);
        httplib::Headers h;
        if (!o.api_key.empty()) h.emplace("Authorization", "Bearer " + o.api_key);
        auto r = cli.Get("/v1/models", h);
        if (!r) fail("cannot reach http://", o.host, ":", o.port, "/v1/models (--host, --port): ", httplib::to_string(r.error()));
        if (o.model.empty()) {
            json j = json::parse(r->body, nullptr, false);
            if (r->status != 200 || !j.is_object() || !j.contains("data") || !j["data"].is_array() || j["data"].empty() ||
                !j["data"][0].contains("id") || !j["data"][0]["id"].is_string())
                fail("GET /v1/models answered ", r->status, " without a model id; pass --model");
            o.model = j["data"][0]["id"].get<std::string>();
        }
    }
    if (o.concurrency.empty()) o.concurrency.push_back(static_cast<int64_t>(prompts.size()));
    std::fprintf(stderr, "megamoe-serve-bench: %s at http://%s:%d%s, %zu prompts per level, concurrency", o.model.c_str(),
                 o.host.c_str(), o.port, path_of(o).c_str(), prompts.size());
    for (int64_t c : o.concurrency) std::fprintf(stderr, " %ld", c);
    std::fprintf(stderr, ", request rate %s\n", std::isfinite(o.request_rate) ? str(o.request_rate, "/s").c_str() : "inf");
    // Warm-up, one by one; a failure here is a configuration problem (model, endpoint, a parameter).
    {
        httplib::Client cli = make_client(o);
        for (int64_t i = 0; i < o.warmup; ++i) {
            Outcome w = send_one(cli, o, prompts[static_cast<size_t>(i) % prompts.size()], Clock::now());
            if (!w.ok) fail("the warm-up request to ", path_of(o), " failed (check --model, --endpoint, --no-ignore-eos): ", w.error);
        }
    }
    std::vector<Level> levels;
    for (size_t k = 0; k < o.concurrency.size(); ++k) {
        const std::vector<Prompt> level(prompts.begin(), prompts.begin() + static_cast<long>(level_size(o.concurrency[k])));
        levels.push_back(run_level(o, level, o.concurrency[k], o.seed + 1 + k));
        print_level(o, levels.back());
    }
    const bool goodput = o.slo_ttft_ms || o.slo_tpot_ms;
    print_table(levels, goodput);
    const std::string title =
        !o.title.empty() ? o.title
                         : str(o.model, " ", o.endpoint, ", IN ", prompts.front().input_len, " OUT ", prompts.front().max_tokens);
    if (!o.out_json.empty()) {
        json cfg = {{"date", utc_now()},
                    {"host", o.host},
                    {"port", o.port},
                    {"model", o.model},
                    {"endpoint", path_of(o)},
                    {"prompts", o.prompts_file.empty() ? json("random") : json(o.prompts_file)},
                    {"prompt_kind", o.prompts_file.empty() ? json(o.prompt_kind) : json(nullptr)},
                    {"input_len", o.prompts_file.empty() ? json(o.input_len) : json(nullptr)},
                    {"output_len", o.output_len},
                    {"num_prompts", prompts.size()},
                    {"prompts_per_concurrency", o.per_concurrency},
                    {"request_rate", std::isfinite(o.request_rate) ? json(o.request_rate) : json("inf")},
                    {"concurrency", o.concurrency},
                    {"temperature", o.temperature},
                    {"ignore_eos", o.ignore_eos},
                    {"seed", o.seed},
                    {"slo_ttft_ms", o.slo_ttft_ms ? json(*o.slo_ttft_ms) : json(nullptr)},
                    {"slo_tpot_ms", o.slo_tpot_ms ? json(*o.slo_tpot_ms) : json(nullptr)},
                    {"title", title}};
        json out = {{"config", cfg}, {"levels", json::array()}};
        for (const auto& L : levels) out["levels"].push_back(level_json(L));
        std::ofstream f(o.out_json);
        if (!f || !(f << out.dump(2) << "\n")) fail("--out-json: cannot write '", o.out_json, "'");
    }
    if (!o.out_png.empty()) write_png(o, levels, title);
    int64_t failed = 0;
    for (const auto& L : levels) failed += L.failed;
    return failed ? 2 : 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return run(argc, argv);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "megamoe-serve-bench: %s\n", e.what());
        return 1;
    }
}
