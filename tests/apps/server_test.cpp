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

#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "io/synth.h"
#include "test_util.h"
#include "serve/tokenizer.h"

extern char** environ;

namespace megamoe {
namespace {

using json = nlohmann::json;

constexpr int64_t kMaxModelLen = 1024;
constexpr size_t kMaxBody = 64 * 1024;

std::string tokenizer_path() { return test::shared_dir() + "/golden/tokenizer/tokenizer.json"; }

int free_port() {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0;
    bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
    socklen_t len = sizeof a;
    getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    close(fd);
    return ntohs(a.sin_port);
}

pid_t spawn_server(const std::string& model_dir, int port, const std::string& log) {
    std::vector<std::string> args = {MEGAMOE_CLI_PATH, "serve", "--model", model_dir, "--host", "127.0.0.1",
                                      "--port", std::to_string(port), "--max-model-len", std::to_string(kMaxModelLen),
                                      "--max-body-bytes", std::to_string(kMaxBody), "--max-batch-tokens", "128"};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    pid_t pid = -1;
    if (posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), environ) != 0) pid = -1;
    posix_spawn_file_actions_destroy(&fa);
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
        port = free_port();
        pid = spawn_server(model_dir, port, dir->str() + "/server.log");
        httplib::Client c("127.0.0.1", port);
        for (int i = 0; i < 600 && pid > 0; ++i) {   // up to 60 s
            auto r = c.Get("/health");
            if (r && r->status == 200) return;
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
        }
    }

    static void TearDownTestSuite() {
        if (pid > 0) {
            kill(pid, SIGTERM);
            waitpid(pid, nullptr, 0);
            pid = -1;
        }
        dir.reset();
    }

    void SetUp() override {
        if (!std::filesystem::exists(tokenizer_path())) GTEST_SKIP() << "no tokenizer fixture";
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
// The load is held up deterministically: config.json is a FIFO that the test writes late.
TEST_F(Server, HealthIs503WhileLoading) {
    test::TempDir slow;
    const std::string dir2 = slow.str() + "/slow-model";
    std::filesystem::create_directories(dir2);
    for (const auto& e : std::filesystem::directory_iterator(model_dir))
        if (e.path().filename() != "config.json") std::filesystem::copy(e.path(), dir2 + "/" + e.path().filename().string());
    ASSERT_EQ(mkfifo((dir2 + "/config.json").c_str(), 0644), 0);
    const int port2 = free_port();
    const pid_t pid2 = spawn_server(dir2, port2, slow.str() + "/server.log");
    ASSERT_GT(pid2, 0);
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
        std::ofstream fifo(dir2 + "/config.json");
        std::ifstream cfg(model_dir + "/config.json");
        fifo << cfg.rdbuf();
    }
    for (int i = 0; i < 200 && health != 200; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        if (auto r = c.Get("/health")) health = r->status;
    }
    EXPECT_EQ(health, 200);
    kill(pid2, SIGTERM);
    waitpid(pid2, nullptr, 0);
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
    const std::string cmd = std::string(MEGAMOE_CLI_PATH) + " generate --model " + model_dir + " --ids \"" + ids +
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

TEST_F(Server, DisconnectCancelsOnlyThatRequest) {
    auto metrics = [] { return client().Get("/metrics")->body; };
    const double gen_before = metric(metrics(), "megamoe_generation_tokens_total");
    // A long streaming request over a raw socket, dropped after its first events.
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    const std::string body = json{{"model", model_name()}, {"prompt", "Tell me a long story"}, {"max_tokens", 200},
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
    // The dropped request stops: nothing runs, and far fewer than 200 + 30 tokens were generated.
    double running = 1;
    for (int i = 0; i < 100 && running != 0; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        running = metric(metrics(), "megamoe_num_requests_running");
    }
    EXPECT_EQ(running, 0);
    const double generated = metric(metrics(), "megamoe_generation_tokens_total") - gen_before;
    EXPECT_LT(generated, 200);
    EXPECT_GE(generated, 30);
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

}  // namespace
}  // namespace megamoe
