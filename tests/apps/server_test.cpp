// server_test.cpp — `megamoe serve` started as a real process on 127.0.0.1 and driven by a real
// HTTP client: chat and text completions (streaming and not), greedy output equal to
// `megamoe generate`, 32 concurrent requests, a client that disconnects mid-stream, stop
// strings, seeds, and every kind of bad request, after which the server keeps serving.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fcntl.h>
#include <poll.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>

#include "io/synth.h"
#include "serve_util.h"
#include "test_util.h"
#include "serve/tokenizer.h"


namespace megamoe {
namespace {

using json = nlohmann::json;

constexpr int64_t kMaxModelLen = 1024;
constexpr size_t kMaxBody = 64 * 1024;

std::string tokenizer_path() { return test::shared_dir() + "/golden/tokenizer/tokenizer.json"; }

// Starts `megamoe serve` on a port it picks itself (--port 0) and sets *port to the one it
// printed ("listening on http://HOST:PORT"; -1 if it printed none within 60 s). Picking a free
// port first and passing it would race with anything else binding meanwhile.
pid_t spawn_server(const std::string& model_dir, int* port, const std::string& log,
                   const std::vector<std::string>& extra = {}) {
    std::vector<std::string> args = {MEGAMOE_CLI_PATH, "serve", "--model", model_dir, "--host", "127.0.0.1",
                                      "--port", "0"};
    // The CPU backend unless a test asks otherwise: these tests check the server's behaviour, some
    // of it timing (a disconnect seen before N tokens), which a GPU changes.
    for (const auto& [flag, value] : {std::pair<std::string, std::string>{"--max-model-len", std::to_string(kMaxModelLen)},
                                      {"--max-body-bytes", std::to_string(kMaxBody)},
                                      {"--max-batch-tokens", "128"},
                                      {"--backend", "cpu"}})
        if (std::find(extra.begin(), extra.end(), flag) == extra.end()) args.insert(args.end(), {flag, value});
    args.insert(args.end(), extra.begin(), extra.end());
    const pid_t pid = test::spawn_logged(args, log);
    *port = pid > 0 ? test::served_port(log) : -1;
    return pid;
}

class Server : public ::testing::Test {
protected:
    static inline std::unique_ptr<test::TempDir> dir;
    static inline pid_t pid = -1;
    static inline int port = 0;
    static inline std::string model_dir;

    static void SetUpTestSuite() {
        if (!std::filesystem::exists(tokenizer_path())) return;
        dir = std::make_unique<test::TempDir>();
        model_dir = dir->str() + "/tiny-synth";
        SynthOptions o;
        o.vocab = 6016;   // covers the fixture tokenizer's 6014 ids
        o.layers = 4;
        o.seed = 11;
        write_synthetic_checkpoint(model_dir, o);
        std::filesystem::copy_file(tokenizer_path(), model_dir + "/tokenizer.json");
        pid = spawn_server(model_dir, &port, dir->str() + "/server.log");
        if (pid > 0) (void)test::wait_healthy(port);
    }

    static void TearDownTestSuite() {
        test::stop_process(pid);
        dir.reset();
    }

    void SetUp() override {
        if (!std::filesystem::exists(tokenizer_path())) MEGAMOE_MISSING_GOLDEN() << "no tokenizer fixture";
        ASSERT_GT(pid, 0);
        auto r = client().Get("/health");
        ASSERT_TRUE(r && r->status == 200) << "server did not come up";
    }

    static httplib::Client client() {
        httplib::Client c("127.0.0.1", port);
        c.set_read_timeout(60, 0);
        return c;
    }
    static std::string model_name() { return "tiny-synth"; }

    static json post(const std::string& path, const json& body, int* status = nullptr) {
        auto r = client().Post(path.c_str(), body.dump(), "application/json");
        if (!r) return json{{"transport_error", true}};
        if (status) *status = r->status;
        return json::parse(r->body, nullptr, false);
    }

    // SSE: the JSON of every `data:` event before [DONE]; done tells whether [DONE] came.
    static std::vector<json> stream(const std::string& path, json body, bool* done) {
        body["stream"] = true;
        std::string raw;
        auto r = client().Post(path.c_str(), body.dump(), "application/json");
        *done = false;
        std::vector<json> events;
        if (!r || r->status != 200) return events;
        std::istringstream in(r->body);
        std::string line;
        while (std::getline(in, line)) {
            if (line.rfind("data: ", 0) != 0) continue;
            const std::string data = line.substr(6);
            if (data == "[DONE]") {
                *done = true;
                break;
            }
            events.push_back(json::parse(data));
        }
        return events;
    }
};

json user_chat(const std::string& text, int max_tokens) {
    return {{"model", "tiny-synth"},
            {"messages", {{{"role", "user"}, {"content", text}}}},
            {"max_tokens", max_tokens},
            {"temperature", 0}};
}

// While the checkpoint loads, /health answers 503 and requests are refused with 503; then 200.
// The load is held up deterministically: tokenizer.json, read first, is a FIFO that the test
// writes late.
TEST_F(Server, HealthIs503WhileLoading) {
    test::TempDir slow;
    const std::string dir2 = slow.str() + "/slow-model";
    std::filesystem::create_directories(dir2);
    for (const auto& e : std::filesystem::directory_iterator(model_dir))
        if (e.path().filename() != "tokenizer.json") std::filesystem::copy(e.path(), dir2 + "/" + e.path().filename().string());
    ASSERT_EQ(mkfifo((dir2 + "/tokenizer.json").c_str(), 0644), 0);
    int port2 = -1;
    const pid_t pid2 = spawn_server(dir2, &port2, slow.str() + "/server.log");
    ASSERT_GT(pid2, 0);
    ASSERT_GT(port2, 0) << test::read_file(slow.str() + "/server.log");
    httplib::Client c("127.0.0.1", port2);
    int health = -1;
    for (int i = 0; i < 200 && health != 503; ++i) {   // wait until it listens
        if (auto r = c.Get("/health")) health = r->status;
        else std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    EXPECT_EQ(health, 503);
    auto busy = c.Post("/v1/completions", json{{"prompt", "hi"}}.dump(), "application/json");
    ASSERT_TRUE(busy);
    EXPECT_EQ(busy->status, 503);
    EXPECT_NE(busy->body.find("loading"), std::string::npos);
    {   // now let the load go on
        std::ofstream fifo(dir2 + "/tokenizer.json");
        std::ifstream tok(model_dir + "/tokenizer.json");
        fifo << tok.rdbuf();
    }
    for (int i = 0; i < 200 && health != 200; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        if (auto r = c.Get("/health")) health = r->status;
    }
    EXPECT_EQ(health, 200);
    pid_t p = pid2;
    test::stop_process(p);
}

TEST_F(Server, ModelsHealthMetrics) {
    auto r = client().Get("/v1/models");
    ASSERT_TRUE(r);
    json j = json::parse(r->body);
    EXPECT_EQ(j["object"], "list");
    ASSERT_EQ(j["data"].size(), 1u);
    EXPECT_EQ(j["data"][0]["id"], model_name());
    EXPECT_EQ(j["data"][0]["max_model_len"], kMaxModelLen);
    post("/v1/chat/completions", user_chat("hi", 2));
    auto m = client().Get("/metrics");
    ASSERT_TRUE(m);
    for (const char* name : {"megamoe_requests_total", "megamoe_prompt_tokens_total", "megamoe_generation_tokens_total",
                             "megamoe_time_to_first_token_seconds_bucket", "megamoe_time_per_output_token_seconds_count",
                             "megamoe_num_requests_running", "megamoe_num_requests_waiting", "megamoe_cache_usage"})
        EXPECT_NE(m->body.find(name), std::string::npos) << name;
}

TEST_F(Server, ChatCompletionAndItsStream) {
    int status = 0;
    json full = post("/v1/chat/completions", user_chat("What is the capital of France?", 12), &status);
    ASSERT_EQ(status, 200) << full.dump();
    EXPECT_EQ(full["object"], "chat.completion");
    EXPECT_EQ(full["model"], model_name());
    const json& ch = full["choices"][0];
    EXPECT_EQ(ch["message"]["role"], "assistant");
    EXPECT_TRUE(ch["message"]["content"].is_string());
    EXPECT_TRUE(ch["message"]["reasoning_content"].is_string());   // thinking mode by default
    EXPECT_TRUE(ch["finish_reason"] == "stop" || ch["finish_reason"] == "length");
    const int64_t completion = full["usage"]["completion_tokens"];
    EXPECT_GE(completion, 1);
    EXPECT_LE(completion, 12);
    EXPECT_GT(full["usage"]["prompt_tokens"].get<int64_t>(), 5);
    EXPECT_EQ(full["usage"]["total_tokens"], full["usage"]["prompt_tokens"].get<int64_t>() + completion);

    json body = user_chat("What is the capital of France?", 12);
    body["stream_options"] = {{"include_usage", true}};
    bool done = false;
    std::vector<json> ev = stream("/v1/chat/completions", body, &done);
    ASSERT_TRUE(done);
    ASSERT_GE(ev.size(), 3u);
    EXPECT_EQ(ev[0]["object"], "chat.completion.chunk");
    EXPECT_EQ(ev[0]["choices"][0]["delta"]["role"], "assistant");
    std::string content, reasoning;
    std::string finish;
    for (size_t i = 0; i + 1 < ev.size(); ++i) {
        const json& d = ev[i]["choices"][0]["delta"];
        if (d.contains("content")) content += d["content"].get<std::string>();
        if (d.contains("reasoning_content")) reasoning += d["reasoning_content"].get<std::string>();
        if (!ev[i]["choices"][0]["finish_reason"].is_null()) finish = ev[i]["choices"][0]["finish_reason"];
    }
    EXPECT_EQ(content, ch["message"]["content"]);
    EXPECT_EQ(reasoning, ch["message"]["reasoning_content"]);
    EXPECT_EQ(finish, ch["finish_reason"]);
    const json& last = ev.back();   // the usage chunk
    EXPECT_TRUE(last["choices"].empty());
    EXPECT_EQ(last["usage"], full["usage"]);
}

TEST_F(Server, ThinkingOffAndLogprobs) {
    json body = user_chat("Say something.", 5);
    body["chat_template_kwargs"] = {{"thinking", false}};
    body["logprobs"] = true;
    body["top_logprobs"] = 3;
    int status = 0;
    json r = post("/v1/chat/completions", body, &status);
    ASSERT_EQ(status, 200) << r.dump();
    const json& ch = r["choices"][0];
    EXPECT_FALSE(ch["message"].contains("reasoning_content"));
    const json& lp = ch["logprobs"]["content"];
    ASSERT_EQ(static_cast<int64_t>(lp.size()), r["usage"]["completion_tokens"].get<int64_t>());
    for (const auto& t : lp) {
        ASSERT_EQ(t["top_logprobs"].size(), 3u);
        std::string from_bytes;
        for (const auto& b : t["bytes"]) {
            ASSERT_TRUE(b.get<int>() >= 0 && b.get<int>() <= 255);
            from_bytes += static_cast<char>(b.get<int>());
        }
        EXPECT_EQ(from_bytes, t["token"].get<std::string>());
        EXPECT_LE(t["logprob"].get<double>(), 0.0);
        // greedy: the chosen token is the most likely one
        EXPECT_NEAR(t["logprob"].get<double>(), t["top_logprobs"][0]["logprob"].get<double>(), 1e-6);
    }
}

TEST_F(Server, GreedyCompletionEqualsGenerate) {
    const std::vector<int32_t> prompt = {300, 1200, 45, 4000, 17, 990, 5};
    std::string ids;
    for (int32_t v : prompt) ids += std::to_string(v) + " ";
    // megamoe generate, as a user would run it
    const std::string cmd = std::string(MEGAMOE_CLI_PATH) + " generate --backend cpu --model " + model_dir + " --ids \"" + ids +
                            "\" --max-new 10 --ignore-eos 2>/dev/null";
    FILE* p = popen(cmd.c_str(), "r");
    ASSERT_NE(p, nullptr);
    char buf[4096] = {0};
    const size_t n = fread(buf, 1, sizeof buf - 1, p);
    pclose(p);
    std::istringstream in(std::string(buf, n));
    std::vector<int32_t> want;
    for (int32_t v; in >> v;) want.push_back(v);
    ASSERT_EQ(want.size(), 10u);
    Tokenizer tok = Tokenizer::load(model_dir + "/tokenizer.json");
    int status = 0;
    json r = post("/v1/completions",
                  {{"model", model_name()}, {"prompt", prompt}, {"max_tokens", 10}, {"temperature", 0}, {"ignore_eos", true}},
                  &status);
    ASSERT_EQ(status, 200) << r.dump();
    EXPECT_EQ(r["object"], "text_completion");
    EXPECT_EQ(r["choices"][0]["text"], tok.decode(want, /*skip_special=*/true));
    EXPECT_EQ(r["choices"][0]["finish_reason"], "length");
    EXPECT_EQ(r["usage"]["completion_tokens"], 10);
    // and streamed
    bool done = false;
    std::vector<json> ev = stream("/v1/completions",
                                  {{"model", model_name()}, {"prompt", prompt}, {"max_tokens", 10}, {"temperature", 0},
                                   {"ignore_eos", true}},
                                  &done);
    ASSERT_TRUE(done);
    std::string text;
    for (const auto& e : ev) text += e["choices"][0]["text"].get<std::string>();
    EXPECT_EQ(text, r["choices"][0]["text"]);
    // logprobs, whole and streamed: one entry per token, the greedy token the most likely
    json lp_body = {{"model", model_name()}, {"prompt", prompt}, {"max_tokens", 4}, {"temperature", 0},
                    {"ignore_eos", true}, {"logprobs", 2}};
    json lp = post("/v1/completions", lp_body)["choices"][0]["logprobs"];
    ASSERT_EQ(lp["token_logprobs"].size(), 4u);
    for (size_t i = 0; i < 4; ++i) {
        EXPECT_EQ(lp["top_logprobs"][i].size(), 2u);
        double best = -1e30;
        for (auto& [k, v] : lp["top_logprobs"][i].items()) best = std::max(best, v.get<double>());
        EXPECT_NEAR(lp["token_logprobs"][i].get<double>(), best, 1e-6);
    }
    std::vector<json> lev = stream("/v1/completions", lp_body, &done);
    ASSERT_TRUE(done);
    size_t n_lp = 0;
    for (const auto& e : lev)
        if (!e["choices"][0]["logprobs"].is_null()) {
            EXPECT_EQ(e["choices"][0]["logprobs"]["token_logprobs"][0], lp["token_logprobs"][n_lp]);
            ++n_lp;
        }
    EXPECT_EQ(n_lp, 4u);
}

TEST_F(Server, StopStringsAndSeeds) {
    json base = {{"model", model_name()}, {"prompt", "Once upon a time"}, {"max_tokens", 16}, {"temperature", 0},
                 {"ignore_eos", true}};
    json r = post("/v1/completions", base);
    const std::string text = r["choices"][0]["text"];
    ASSERT_GE(text.size(), 6u);
    // A stop string of whole UTF-8 characters from the middle of the greedy text.
    size_t b = text.size() / 2, e = b + 1;
    while (b > 0 && (static_cast<unsigned char>(text[b]) & 0xC0) == 0x80) --b;
    while (e < text.size() && (static_cast<unsigned char>(text[e]) & 0xC0) == 0x80) ++e;
    const std::string stop = text.substr(b, e - b);
    json with_stop = base;
    with_stop["stop"] = {stop};
    json s = post("/v1/completions", with_stop);
    EXPECT_EQ(s["choices"][0]["text"], text.substr(0, text.find(stop)));
    EXPECT_EQ(s["choices"][0]["finish_reason"], "stop");
    // Same seed, same tokens; the sampling is not greedy here.
    json sampled = base;
    sampled["temperature"] = 1.0;
    sampled["seed"] = 1234;
    EXPECT_EQ(post("/v1/completions", sampled)["choices"][0]["text"], post("/v1/completions", sampled)["choices"][0]["text"]);
}

TEST_F(Server, ThirtyTwoConcurrentRequests) {
    std::vector<std::thread> threads;
    std::atomic<int> ok{0};
    for (int i = 0; i < 32; ++i) {
        threads.emplace_back([&, i] {
            json body = {{"model", model_name()}, {"prompt", "Request number " + std::to_string(i)},
                         {"max_tokens", 6}, {"temperature", 0.7}, {"seed", i}, {"ignore_eos", true}};
            if (i % 2) body["stream"] = true;
            auto r = client().Post("/v1/completions", body.dump(), "application/json");
            if (r && r->status == 200 && (i % 2 ? r->body.find("data: [DONE]") != std::string::npos
                                                : json::parse(r->body)["usage"]["completion_tokens"] == 6))
                ++ok;
            else
                ADD_FAILURE() << "request " << i << ": " << (r ? std::to_string(r->status) + " " + r->body
                                                              : "transport error " + httplib::to_string(r.error()));
        });
    }
    for (auto& t : threads) t.join();
    EXPECT_EQ(ok.load(), 32);
}

double metric(const std::string& text, const std::string& name) {
    const size_t at = text.find("\n" + name + " ");
    return at == std::string::npos ? -1 : std::stod(text.substr(at + name.size() + 2));
}

// Requests that ended for `reason` so far (megamoe_requests_finished_total).
double finished(const std::string& metrics_text, const std::string& reason) {
    return metric(metrics_text, "megamoe_requests_finished_total{reason=\"" + reason + "\"}");
}

// Whether a request was cancelled is counted, not inferred from how few tokens it produced in
// some time: the dropped request must end as "cancelled" (a server that missed the disconnect
// would run it to its length limit, 900 tokens, and count it under "length").
TEST_F(Server, DisconnectCancelsOnlyThatRequest) {
    auto metrics = [] { return client().Get("/metrics")->body; };
    const std::string before = metrics();
    const double cancelled_before = finished(before, "cancelled"), length_before = finished(before, "length");
    ASSERT_GE(cancelled_before, 0);
    // A long streaming request over a raw socket, dropped after its first events.
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    const std::string body = json{{"model", model_name()}, {"prompt", "Tell me a long story"}, {"max_tokens", 900},
                                  {"ignore_eos", true}, {"stream", true}}.dump();
    const std::string req = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                            "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
    ASSERT_EQ(write(fd, req.data(), req.size()), static_cast<ssize_t>(req.size()));
    // Meanwhile another client runs a normal request to completion.
    std::thread other([&] {
        json r = post("/v1/completions", {{"model", model_name()}, {"prompt", "Hi"}, {"max_tokens", 30},
                                           {"ignore_eos", true}});
        EXPECT_EQ(r["usage"]["completion_tokens"], 30);
    });
    std::string got;
    char buf[4096];
    while (std::count(got.begin(), got.end(), '\n') < 12) {
        const ssize_t n = read(fd, buf, sizeof buf);
        ASSERT_GT(n, 0);
        got.append(buf, static_cast<size_t>(n));
    }
    close(fd);
    other.join();
    // The dropped request ends as cancelled, the other one by its length; nothing runs after.
    std::string after;
    for (int i = 0; i < 600; ++i) {
        after = metrics();
        if (finished(after, "cancelled") + finished(after, "length") >= cancelled_before + length_before + 2) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    EXPECT_EQ(finished(after, "cancelled") - cancelled_before, 1);
    EXPECT_EQ(finished(after, "length") - length_before, 1);
    EXPECT_EQ(metric(after, "megamoe_num_requests_running"), 0);
}

TEST_F(Server, BadRequestsGetErrorsAndTheServerGoesOn) {
    auto expect = [](int want_status, const std::string& raw, const std::string& substr, const char* path = "/v1/chat/completions") {
        auto r = client().Post(path, raw, "application/json");
        ASSERT_TRUE(r) << raw;
        EXPECT_EQ(r->status, want_status) << raw << " -> " << r->body;
        json j = json::parse(r->body, nullptr, false);
        ASSERT_TRUE(j.is_object() && j.contains("error")) << r->body;
        EXPECT_TRUE(j["error"]["message"].is_string());
        EXPECT_NE(r->body.find(substr), std::string::npos) << r->body;
    };
    expect(400, "{\"model\": \"tiny-synth\", \"messages\": [", "not valid JSON");
    expect(400, "[1, 2]", "JSON object");
    expect(400, json{{"model", "tiny-synth"}}.dump(), "messages");
    expect(400, json{{"model", "tiny-synth"}, {"messages", "hello"}}.dump(), "messages");
    expect(400, json{{"model", "tiny-synth"}, {"messages", {{{"role", "robot"}, {"content", "x"}}}}}.dump(), "robot");
    json wrong = user_chat("x", 4);
    wrong["max_tokens"] = "ten";
    expect(400, wrong.dump(), "max_tokens");
    wrong = user_chat("x", 4);
    wrong["temperature"] = -1;
    expect(400, wrong.dump(), "temperature");
    wrong = user_chat("x", 4);
    wrong["stream"] = "yes";
    expect(400, wrong.dump(), "stream");
    wrong = user_chat("x", 4);
    wrong["model"] = "gpt-4";
    expect(404, wrong.dump(), "gpt-4");
    std::vector<int> long_prompt(1100, 100);
    expect(400, json{{"model", "tiny-synth"}, {"prompt", long_prompt}}.dump(),
           "This model's maximum context length is 1024 tokens", "/v1/completions");
    expect(400, json{{"model", "tiny-synth"}, {"prompt", std::vector<int>(1000, 100)}, {"max_tokens", 100}}.dump(),
           "However, you requested 1100 tokens (1000 in the messages, 100 in the completion)", "/v1/completions");
    expect(400, json{{"model", "tiny-synth"}, {"prompt", {1, 999999}}}.dump(), "outside the vocabulary", "/v1/completions");
    expect(413, json{{"model", "tiny-synth"}, {"prompt", std::string(kMaxBody + 100, 'a')}}.dump(), "too large",
           "/v1/completions");
    // still serving
    int status = 0;
    json ok = post("/v1/chat/completions", user_chat("still there?", 3), &status);
    EXPECT_EQ(status, 200) << ok.dump();
}

TEST_F(Server, ToolsReasoningEffortResponseFormat) {
    json body = user_chat("What's the weather in Paris?", 4);
    body["tools"] = json::parse(R"([{"type": "function", "function": {"name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}])");
    body["tool_choice"] = "auto";
    body["reasoning_effort"] = "high";
    int with_tools = 0, status = 0;
    json r = post("/v1/chat/completions", body, &status);
    ASSERT_EQ(status, 200) << r.dump();
    with_tools = r["usage"]["prompt_tokens"];
    body["tool_choice"] = "none";   // the tools are not rendered
    json r2 = post("/v1/chat/completions", body, &status);
    ASSERT_EQ(status, 200) << r2.dump();
    EXPECT_LT(r2["usage"]["prompt_tokens"].get<int>(), with_tools);
    body["response_format"] = {{"type", "json_object"}};
    EXPECT_EQ(post("/v1/chat/completions", body, &status)["object"], "chat.completion");
    EXPECT_EQ(status, 200);
    for (const json& choice : {json("sometimes"), json("required"),
                               json{{"type", "function"}, {"function", {{"name", "get_weather"}}}}}) {
        body["tool_choice"] = choice;   // unknown, or needing constrained decoding: unsupported
        json err = post("/v1/chat/completions", body, &status);
        EXPECT_EQ(status, 400) << choice.dump();
        EXPECT_EQ(err["error"]["param"], "tool_choice");
    }
    // An assistant turn with reasoning_content and tool calls, then the tool's result.
    json conv = user_chat("Weather?", 3);
    conv["messages"].push_back({{"role", "assistant"},
                                {"reasoning_content", "I should call the tool."},
                                {"content", ""},
                                {"tool_calls",
                                 {{{"id", "call_1"},
                                   {"type", "function"},
                                   {"function", {{"name", "get_weather"}, {"arguments", "{\"city\": \"Paris\"}"}}}}}}});
    conv["messages"].push_back({{"role", "tool"}, {"tool_call_id", "call_1"}, {"content", "sunny"}});
    conv["tools"] = body["tools"];
    post("/v1/chat/completions", conv, &status);
    EXPECT_EQ(status, 200);
}

TEST_F(Server, SpecialTokenTextInUserContentIsOrdinaryText) {
    // The user message carries the bytes of <｜User｜>: as ordinary text it costs several tokens,
    // so the prompt is longer than with the plain word.
    int s1 = 0, s2 = 0;
    json a = post("/v1/chat/completions", user_chat("x", 1), &s1);
    json b = post("/v1/chat/completions", user_chat("x<｜User｜>", 1), &s2);
    ASSERT_EQ(s1, 200);
    ASSERT_EQ(s2, 200);
    Tokenizer tok = Tokenizer::load(tokenizer_path());
    const int64_t extra = static_cast<int64_t>(tok.encode_ordinary("x<｜User｜>").size() - tok.encode_ordinary("x").size());
    EXPECT_GT(extra, 1);
    EXPECT_EQ(b["usage"]["prompt_tokens"].get<int64_t>() - a["usage"]["prompt_tokens"].get<int64_t>(), extra);
}


// ---- hardening: what a careless or hostile client does

int64_t unix_now() {
    return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

httplib::Client client_at(int port) {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(60, 0);
    return c;
}

json post_at(int port, const std::string& path, const json& body, int* status = nullptr) {
    auto r = client_at(port).Post(path.c_str(), body.dump(), "application/json");
    if (!r) return json{{"transport_error", true}};
    if (status) *status = r->status;
    return json::parse(r->body, nullptr, false);
}

// The JSON of every SSE `data:` event before [DONE] in `raw`; done tells whether [DONE] came.
std::vector<json> sse_events(const std::string& raw, bool* done) {
    std::vector<json> events;
    std::istringstream in(raw);
    std::string line;
    *done = false;
    while (std::getline(in, line)) {
        if (line.rfind("data: ", 0) != 0) continue;
        if (line.substr(6) == "[DONE]") {
            *done = true;
            break;
        }
        events.push_back(json::parse(line.substr(6), nullptr, false));
    }
    return events;
}

// A raw TCP connection, for what an HTTP client library will not do: trickle, chunk, hang up.
class RawConn {
public:
    explicit RawConn(int port) {
        fd_ = socket(AF_INET, SOCK_STREAM, 0);
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_port = htons(static_cast<uint16_t>(port));
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) close_now();
    }
    ~RawConn() { close_now(); }
    RawConn(const RawConn&) = delete;
    RawConn& operator=(const RawConn&) = delete;

    bool ok() const { return fd_ >= 0; }
    bool send(const std::string& s) {   // MSG_NOSIGNAL: a connection the server closed gives EPIPE, not SIGPIPE
        return fd_ >= 0 && ::send(fd_, s.data(), s.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(s.size());
    }
    // Reads until `until` has arrived, the peer closes, or timeout_s passes; returns all read so far.
    std::string read_until(const std::string& until, double timeout_s) {
        const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
        while (fd_ >= 0 && got_.find(until) == std::string::npos && std::chrono::steady_clock::now() < end) {
            pollfd p{fd_, POLLIN, 50};
            if (poll(&p, 1, 50) <= 0) continue;
            char buf[8192];
            const ssize_t n = recv(fd_, buf, sizeof buf, 0);
            if (n <= 0) break;
            got_.append(buf, static_cast<size_t>(n));
        }
        return got_;
    }
    // Whether the server has closed (or reset) the connection; never blocks.
    bool closed_by_server() {
        char buf[4096];
        for (;;) {
            const ssize_t n = recv(fd_, buf, sizeof buf, MSG_DONTWAIT);
            if (n == 0) return true;
            if (n < 0) return errno != EAGAIN && errno != EWOULDBLOCK;
        }
    }
    void close_now() {
        if (fd_ >= 0) close(fd_);
        fd_ = -1;
    }

private:
    int fd_ = -1;
    std::string got_;
};

std::string post_request(const std::string& path, const std::string& body) {
    return "POST " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: " +
           std::to_string(body.size()) + "\r\n\r\n" + body;
}

// Waits up to timeout_s for the process to exit; kills it (and fails) if it does not.
int wait_exit(pid_t pid, double timeout_s) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
    int st = 0;
    while (std::chrono::steady_clock::now() < end) {
        if (waitpid(pid, &st, WNOHANG) == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    kill(pid, SIGKILL);
    waitpid(pid, &st, 0);
    ADD_FAILURE() << "the server did not exit within " << timeout_s << " s";
    return -1;
}

// vLLM answers a wrong method with 405 and Allow; an unknown path is 404 without the
// model_not_found code, which belongs to an unknown model.
TEST_F(Server, WrongMethodIs405AndUnknownPathIs404) {
    for (const char* path : {"/v1/chat/completions", "/v1/completions"}) {
        auto r = client().Get(path);
        ASSERT_TRUE(r);
        EXPECT_EQ(r->status, 405) << path << " " << r->body;
        EXPECT_EQ(r->get_header_value("Allow"), "POST");
        json j = json::parse(r->body, nullptr, false);
        EXPECT_EQ(j["error"]["code"], "method_not_allowed") << r->body;
        auto put = client().Put(path, "{}", "application/json");
        ASSERT_TRUE(put);
        EXPECT_EQ(put->status, 405);
    }
    auto r = client().Post("/health", "{}", "application/json");
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, 405);
    EXPECT_EQ(r->get_header_value("Allow"), "GET, HEAD");
    for (bool get : {true, false}) {
        auto nf = get ? client().Get("/v1/nothing") : client().Post("/v1/nothing", "{}", "application/json");
        ASSERT_TRUE(nf);
        EXPECT_EQ(nf->status, 404);
        json j = json::parse(nf->body, nullptr, false);
        EXPECT_TRUE(j["error"]["code"].is_null()) << nf->body;
        EXPECT_NE(nf->body.find("/v1/nothing"), std::string::npos);
    }
    json wrong = user_chat("x", 1);
    wrong["model"] = "gpt-4";
    int status = 0;
    EXPECT_EQ(post("/v1/chat/completions", wrong, &status)["error"]["code"], "model_not_found");
    EXPECT_EQ(status, 404);
}

// "created" is when the completion was made, not when the server started.
TEST_F(Server, CreatedIsTheRequestTime) {
    const int64_t started = json::parse(client().Get("/v1/models")->body)["data"][0]["created"];
    while (unix_now() <= started) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    const int64_t before = unix_now();
    json body = {{"model", model_name()}, {"prompt", "Hi"}, {"max_tokens", 1}};
    json r = post("/v1/completions", body);
    EXPECT_GE(r["created"].get<int64_t>(), before) << r.dump();
    bool done = false;
    std::vector<json> ev = stream("/v1/completions", body, &done);
    ASSERT_TRUE(done);
    EXPECT_GE(ev.at(0)["created"].get<int64_t>(), before);
}

// n choices share the prompt; each is its own sequence, choice i sampled with seed + i; usage
// counts the prompt once and every choice's tokens. Streamed, each choice ends on its own.
TEST_F(Server, NChoices) {
    json body = {{"model", model_name()}, {"prompt", "Once upon a time"}, {"max_tokens", 6}, {"temperature", 1.0},
                 {"seed", 42}, {"ignore_eos", true}, {"n", 3}};
    int status = 0;
    json r = post("/v1/completions", body, &status);
    ASSERT_EQ(status, 200) << r.dump();
    ASSERT_EQ(r["choices"].size(), 3u);
    std::set<std::string> distinct;
    for (int i = 0; i < 3; ++i) {
        EXPECT_EQ(r["choices"][i]["index"], i);
        json one = body;
        one.erase("n");
        one["seed"] = 42 + i;
        EXPECT_EQ(post("/v1/completions", one)["choices"][0]["text"], r["choices"][i]["text"]) << i;
        distinct.insert(r["choices"][i]["text"].get<std::string>());
    }
    EXPECT_GT(distinct.size(), 1u);
    const int64_t prompt_tokens = r["usage"]["prompt_tokens"];
    EXPECT_EQ(r["usage"]["completion_tokens"], 18);
    EXPECT_EQ(r["usage"]["total_tokens"], prompt_tokens + 18);

    json chat = user_chat("Tell me a story", 5);
    chat["n"] = 2;
    chat["temperature"] = 1.0;
    chat["seed"] = 3;
    json full = post("/v1/chat/completions", chat, &status);
    ASSERT_EQ(status, 200) << full.dump();
    ASSERT_EQ(full["choices"].size(), 2u);
    chat["stream_options"] = {{"include_usage", true}};
    bool done = false;
    std::vector<json> ev = stream("/v1/chat/completions", chat, &done);
    ASSERT_TRUE(done);
    ASSERT_FALSE(ev.empty());
    std::map<int, std::string> text, finish;
    for (size_t k = 0; k + 1 < ev.size(); ++k) {
        const json& c = ev[k]["choices"][0];
        const int i = c["index"];
        const json& d = c["delta"];
        if (d.contains("reasoning_content")) text[i] += d["reasoning_content"].get<std::string>();
        if (d.contains("content")) text[i] += d["content"].get<std::string>();
        if (!c["finish_reason"].is_null()) finish[i] = c["finish_reason"];
    }
    ASSERT_EQ(finish.size(), 2u);
    for (int i = 0; i < 2; ++i) {
        const json& m = full["choices"][i]["message"];
        EXPECT_EQ(text[i], m.value("reasoning_content", "") + m["content"].get<std::string>()) << i;
        EXPECT_EQ(finish[i], full["choices"][i]["finish_reason"]);
    }
    EXPECT_EQ(ev.back()["usage"], full["usage"]);
    for (int n : {0, 129}) {
        json bad = user_chat("x", 1);
        bad["n"] = n;
        EXPECT_EQ(post("/v1/chat/completions", bad, &status)["error"]["param"], "n");
        EXPECT_EQ(status, 400);
    }
}

// JSON nested 30000 deep in 60 KB: a 400, not a stack overflow in the re-serializers.
TEST_F(Server, DeeplyNestedJsonIs400) {
    const std::string deep = std::string(30000, '[') + std::string(30000, ']');
    const std::string head = R"({"model": "tiny-synth", "max_tokens": 2, )";
    const std::vector<std::string> bodies = {
        head + R"("messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f", "parameters": )" +
            deep + "}}]}",
        head + R"("messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"a": )" +
            deep + "}}}]}]}",
        // arguments as a string holding the JSON: the chat encoder parses it, and bounds it too
        head + R"("messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{\"a\": )" +
            deep + R"(}"}}]}, {"role": "user", "content": "and?"}]})"};
    for (const auto& b : bodies) {
        ASSERT_LT(b.size(), kMaxBody);
        auto r = client().Post("/v1/chat/completions", b, "application/json");
        ASSERT_TRUE(r) << "transport error: the server died";
        EXPECT_EQ(r->status, 400) << r->body;
        EXPECT_NE(r->body.find("deeper than 128"), std::string::npos) << r->body;
    }
    int status = 0;
    post("/v1/chat/completions", user_chat("still there?", 1), &status);
    EXPECT_EQ(status, 200);
}

// A non-streaming client that hangs up (curl -m 1) cancels its generation.
TEST_F(Server, NonStreamingClientThatLeavesIsCancelled) {
    auto value = [](const char* name) {
        auto r = client().Get("/metrics");
        return r ? metric(r->body, name) : -1;
    };
    const std::string before = client().Get("/metrics")->body;
    const double cancelled_before = finished(before, "cancelled"), length_before = finished(before, "length");
    RawConn c(port);
    ASSERT_TRUE(c.send(post_request("/v1/completions", json{{"model", model_name()}, {"prompt", "Tell me a long story"},
                                                            {"max_tokens", 1000}, {"ignore_eos", true},
                                                            {"temperature", 0}}.dump())));
    double running = 0;
    for (int i = 0; i < 250 && running != 1; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
        running = value("megamoe_num_requests_running");
    }
    ASSERT_EQ(running, 1);
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    c.close_now();
    // Counted, not timed: the request ends as cancelled (had the hang-up gone unseen, it would run
    // to its 1000 tokens and end as "length").
    std::string after;
    for (int i = 0; i < 600; ++i) {
        after = client().Get("/metrics")->body;
        if (finished(after, "cancelled") + finished(after, "length") > cancelled_before + length_before) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    EXPECT_EQ(finished(after, "cancelled") - cancelled_before, 1);
    EXPECT_EQ(finished(after, "length") - length_before, 0);
    EXPECT_EQ(metric(after, "megamoe_num_requests_running"), 0);
}

// A second server whose model has more logits (8192) than the tokenizer has ids (6014), with
// short header and body deadlines.
class ServerLimits : public ::testing::Test {
protected:
    static inline std::unique_ptr<test::TempDir> dir;
    static inline pid_t pid = -1;
    static inline int port = 0;
    static inline std::string model_dir;
    static constexpr int64_t kContext = 4096;

    static std::vector<std::string> flags() {
        return {"--header-timeout", "1", "--body-timeout", "2", "--max-model-len", std::to_string(kContext)};
    }
    static void SetUpTestSuite() {
        if (!std::filesystem::exists(tokenizer_path())) return;
        dir = std::make_unique<test::TempDir>();
        model_dir = dir->str() + "/wide-vocab";
        SynthOptions o;
        o.vocab = 8192;
        o.layers = 2;
        o.seed = 5;
        write_synthetic_checkpoint(model_dir, o);
        std::filesystem::copy_file(tokenizer_path(), model_dir + "/tokenizer.json");
        pid = spawn_server(model_dir, &port, dir->str() + "/server.log", flags());
        if (!test::wait_healthy(port, 60)) ADD_FAILURE() << "the server did not come up";
    }
    static void TearDownTestSuite() {
        if (pid > 0) {
            kill(pid, SIGTERM);
            wait_exit(pid, 30);
            pid = -1;
        }
        dir.reset();
    }
    void SetUp() override {
        if (!std::filesystem::exists(tokenizer_path())) MEGAMOE_MISSING_GOLDEN() << "no tokenizer fixture";
        ASSERT_GT(pid, 0);
        auto r = client_at(port).Get("/health");
        ASSERT_TRUE(r && r->status == 200) << "server not healthy";
    }
};

// Ids without a token are never sampled, even where sampling is uniform, and never listed
// among the alternatives. The server used to abort on the first one.
TEST_F(ServerLimits, IdsPastTheTokenizerAreNeverSampled) {
    int status = 0;
    json r = post_at(port, "/v1/completions",
                     {{"prompt", "Hello"}, {"temperature", 1e9}, {"seed", 1}, {"ignore_eos", true}, {"max_tokens", 64},
                      {"logprobs", 5}},
                     &status);
    ASSERT_EQ(status, 200) << r.dump();
    EXPECT_EQ(r["usage"]["completion_tokens"], 64);
    ASSERT_EQ(r["choices"][0]["logprobs"]["tokens"].size(), 64u);
    for (const auto& top : r["choices"][0]["logprobs"]["top_logprobs"]) EXPECT_GE(top.size(), 1u);
    // Streamed chat with 20 alternatives per token: each is a real token.
    json chat = {{"messages", {{{"role", "user"}, {"content", "Hi"}}}}, {"max_tokens", 8}, {"logprobs", true},
                 {"top_logprobs", 20}, {"stream", true}, {"temperature", 1e9}, {"seed", 2}};
    auto s = client_at(port).Post("/v1/chat/completions", chat.dump(), "application/json");
    ASSERT_TRUE(s) << "transport error: the server died";
    bool done = false;
    std::vector<json> ev = sse_events(s->body, &done);
    ASSERT_TRUE(done) << s->body;
    size_t tokens = 0;
    for (const auto& e : ev) {
        const json& lp = e["choices"][0]["logprobs"];
        if (lp.is_null()) continue;
        ++tokens;
        const json& t = lp["content"][0];
        EXPECT_TRUE(t["token"].is_string());
        EXPECT_EQ(t["top_logprobs"].size(), 20u);
        for (const auto& alt : t["top_logprobs"]) EXPECT_TRUE(alt["token"].is_string() && alt["logprob"].is_number());
    }
    EXPECT_EQ(tokens, 8u);
}

// --max-body-bytes holds for chunked bodies as it does for Content-Length: 413, and the body is
// never gathered. The connection stays usable.
TEST_F(ServerLimits, ChunkedBodyOverTheLimitIs413) {
    RawConn c(port);
    ASSERT_TRUE(c.ok());
    const std::string big = json{{"prompt", std::string(200000, 'a')}, {"max_tokens", 1}}.dump();
    std::string req = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      "Transfer-Encoding: chunked\r\n\r\n";
    char hex[16];
    for (size_t at = 0; at < big.size(); at += 8192) {
        const std::string part = big.substr(at, 8192);
        std::snprintf(hex, sizeof hex, "%zx\r\n", part.size());
        req += hex + part + "\r\n";
    }
    req += "0\r\n\r\n";
    ASSERT_TRUE(c.send(req));
    std::string got = c.read_until("}}", 20);
    EXPECT_EQ(got.rfind("HTTP/1.1 413", 0), 0u) << got.substr(0, 200);
    EXPECT_NE(got.find("too large: over 65536 bytes"), std::string::npos) << got.substr(0, 400);
    // The same connection, a small chunked request: answered.
    const std::string small = json{{"prompt", "Hi"}, {"max_tokens", 1}}.dump();
    std::snprintf(hex, sizeof hex, "%zx\r\n", small.size());
    const size_t before = got.size();
    ASSERT_TRUE(c.send("POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n" +
                       std::string(hex) + small + "\r\n0\r\n\r\n"));
    got = c.read_until("text_completion", 20);
    EXPECT_NE(got.find("HTTP/1.1 200", before), std::string::npos) << got.substr(before);
}

// Connections the server cut for passing `limit` so far (megamoe_connections_cut_total).
double cuts(const std::string& metrics_text, const std::string& limit) {
    return metric(metrics_text, "megamoe_connections_cut_total{limit=\"" + limit + "\"}");
}

// A hundred clients trickling their headers a byte at a time neither starve /health and
// /metrics nor hold their connections past the header deadline (1 s here). Counted, not timed:
// /metrics, asked right after /health, reports how many slow clients the deadline had cut by then;
// fewer than all hundred means both were answered while slow clients still held their connections,
// not queued behind them (a server with a fixed pool of threads answered only once the deadline had
// freed them all). Then the deadline cuts the hundred, each counted under header_timeout.
TEST_F(ServerLimits, SlowClientsDoNotStarveHealth) {
    const std::string before = client_at(port).Get("/metrics")->body;
    const double timeouts_before = cuts(before, "header_timeout");
    ASSERT_GE(timeouts_before, 0);
    std::vector<std::unique_ptr<RawConn>> slow;
    for (int i = 0; i < 100; ++i) {
        slow.push_back(std::make_unique<RawConn>(port));
        ASSERT_TRUE(slow.back()->ok());
        slow.back()->send("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    }
    std::atomic<bool> stop{false};
    std::thread trickle([&] {
        while (!stop) {
            for (auto& c : slow) c->send("X");
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
        }
    });
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(30, 0);
    auto h = c.Get("/health");
    auto m = c.Get("/metrics");
    EXPECT_TRUE(h && h->status == 200);
    ASSERT_TRUE(m && m->status == 200);
    const double cut_then = cuts(m->body, "header_timeout") - timeouts_before;
    std::printf("    slow clients cut when /metrics answered: %.0f of 100\n", cut_then);
    EXPECT_LT(cut_then, 100) << "/health and /metrics were answered only once every slow client was cut";
    // Then the deadline disconnects every slow client, and the server counts each.
    int closed = 0;
    for (int i = 0; i < 300 && closed < 100; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        closed = 0;
        for (auto& s : slow) closed += s->closed_by_server();
    }
    stop = true;
    trickle.join();
    EXPECT_EQ(closed, 100);
    EXPECT_EQ(cuts(client_at(port).Get("/metrics")->body, "header_timeout") - timeouts_before, 100);
}

// A header line without end is cut once the headers pass 256 KiB (httplib 0.11 would gather it
// all in memory), not by the header deadline: the server counts the cut under header_bytes.
TEST_F(ServerLimits, EndlessHeaderLineIsCut) {
    const std::string before = client_at(port).Get("/metrics")->body;
    const double bytes_before = cuts(before, "header_bytes"), timeouts_before = cuts(before, "header_timeout");
    ASSERT_GE(bytes_before, 0);
    RawConn c(port);
    ASSERT_TRUE(c.send("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "));
    const std::string piece(64 << 10, 'a');
    for (int i = 0; i < 64; ++i)   // up to 4 MiB, no newline; stops once the server hangs up
        if (!c.send(piece)) break;
    bool closed = false;
    for (int i = 0; i < 500 && !closed; ++i) {
        closed = c.closed_by_server();
        if (!closed) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    EXPECT_TRUE(closed);
    const std::string after = client_at(port).Get("/metrics")->body;
    EXPECT_EQ(cuts(after, "header_bytes") - bytes_before, 1);
    EXPECT_EQ(cuts(after, "header_timeout") - timeouts_before, 0);
    auto h = client_at(port).Get("/health");
    EXPECT_TRUE(h && h->status == 200);
}

// SIGTERM: new requests get 503 while running ones finish ([DONE]), then exit 0. Past
// --drain-timeout, what still runs is cancelled: an error event, [DONE], exit 0.
TEST_F(ServerLimits, SigtermDrainsThenExits) {
    for (const bool patient : {true, false}) {
        int port2 = -1;
        std::vector<std::string> f = flags();
        f.insert(f.end(), {"--drain-timeout", patient ? "30" : "0.3"});
        const pid_t p2 = spawn_server(model_dir, &port2, dir->str() + "/drain.log", f);
        ASSERT_GT(p2, 0);
        ASSERT_GT(port2, 0);
        ASSERT_TRUE(test::wait_healthy(port2, 60));
        RawConn c(port2);
        ASSERT_TRUE(c.send(post_request("/v1/completions", json{{"prompt", "Hi"}, {"max_tokens", patient ? 100 : 3000},
                                                                 {"ignore_eos", true}, {"stream", true}}.dump())));
        ASSERT_NE(c.read_until("data: {", 20).find("data: {"), std::string::npos);
        kill(p2, SIGTERM);
        if (patient) {
            int health = 0;
            for (int i = 0; i < 100 && health != 503; ++i) {
                if (auto r = httplib::Client("127.0.0.1", port2).Get("/health")) health = r->status;
                if (health != 503) std::this_thread::sleep_for(std::chrono::milliseconds(10));
            }
            EXPECT_EQ(health, 503);
            int status = 0;
            json refused = post_at(port2, "/v1/completions", {{"prompt", "Hi"}, {"max_tokens", 1}}, &status);
            EXPECT_EQ(status, 503) << refused.dump();
            EXPECT_NE(refused.dump().find("shutting down"), std::string::npos);
        }
        const std::string got = c.read_until("data: [DONE]", 30);
        ASSERT_NE(got.find("data: [DONE]"), std::string::npos) << got.substr(got.size() > 300 ? got.size() - 300 : 0);
        if (patient) {
            EXPECT_NE(got.find("\"finish_reason\":\"length\""), std::string::npos);
        } else {
            EXPECT_NE(got.find("shutting down"), std::string::npos);
        }
        EXPECT_EQ(wait_exit(p2, 20), 0);
    }
}
}  // namespace
}  // namespace megamoe
