// server_auth_test.cpp — who may use `megamoe serve` and how much one request may ask: API keys
// (flag and file; 401 in OpenAI's shape; /health open; /metrics private on request), the warning
// for a public address without a key, and the per-request and total limits (prompt tokens,
// generated tokens, requests in flight, JSON depth), each answered with its status and the flag
// named. The server runs as a real process on a port it picks itself (--port 0), read from its log.
#include <gtest/gtest.h>
#include <httplib.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fcntl.h>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "../../apps/request.h"
#include "io/synth.h"
#include "serve_util.h"
#include "test_util.h"


namespace megamoe {
namespace {

using json = nlohmann::json;

std::string tokenizer_path() { return test::shared_dir() + "/golden/tokenizer/tokenizer.json"; }

pid_t spawn(const std::vector<std::string>& extra, const std::string& log) {
    std::vector<std::string> args = {MEGAMOE_CLI_PATH, "serve", "--port", "0", "--backend", "cpu"};
    args.insert(args.end(), extra.begin(), extra.end());
    return test::spawn_logged(args, log);
}

// The port the server printed ("listening on http://HOST:PORT (..."), waiting up to `seconds`.
int bound_port(const std::string& log, double seconds) {
    const std::string marker = "listening on http://";
    for (int i = 0; i < seconds * 20; ++i) {
        const std::string text = test::read_file(log);
        const size_t at = text.find(marker);
        const size_t end = at == std::string::npos ? at : text.find(' ', at + marker.size());
        if (end != std::string::npos) {
            const size_t colon = text.rfind(':', end);
            if (colon != std::string::npos && colon > at) return std::atoi(text.c_str() + colon + 1);
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return -1;
}

void stop(pid_t& pid) { test::stop_process(pid, 30); }

constexpr const char* kKey1 = "sk-first-0123456789";
constexpr const char* kKey2 = "sk-from-the-file";

class ServerAuth : public ::testing::Test {
protected:
    static inline std::unique_ptr<test::TempDir> dir;
    static inline pid_t pid = -1;
    static inline int port = -1;

    static void SetUpTestSuite() {
        if (!std::filesystem::exists(tokenizer_path())) return;
        dir = std::make_unique<test::TempDir>();
        const std::string model = dir->str() + "/tiny";
        SynthOptions o;
        o.vocab = 6016;
        o.layers = 2;
        o.seed = 3;
        write_synthetic_checkpoint(model, o);
        std::filesystem::copy_file(tokenizer_path(), model + "/tokenizer.json");
        const std::string keys = dir->str() + "/keys.txt";
        std::ofstream(keys) << "\n  " << kKey2 << "  \n\n";
        const std::string log = dir->str() + "/server.log";
        pid = spawn({"--model", model, "--max-model-len", "1024", "--api-key", kKey1, "--api-key-file", keys,
                     "--private-metrics", "--max-prompt-tokens", "64", "--max-completion-tokens", "40",
                     "--max-requests", "4", "--max-json-depth", "16"},
                    log);
        port = bound_port(log, 60);
        for (int i = 0; i < 600 && port > 0; ++i) {
            auto r = httplib::Client("127.0.0.1", port).Get("/health");
            if (r && r->status == 200) return;
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
        }
        ADD_FAILURE() << "the server did not come up: " << test::read_file(log);
    }
    static void TearDownTestSuite() {
        stop(pid);
        dir.reset();
    }
    void SetUp() override {
        if (!std::filesystem::exists(tokenizer_path())) MEGAMOE_MISSING_GOLDEN() << "no tokenizer fixture";
        ASSERT_GT(pid, 0);
        ASSERT_GT(port, 0);
    }
    static httplib::Client client() {
        httplib::Client c("127.0.0.1", port);
        c.set_read_timeout(60, 0);
        return c;
    }
    static httplib::Headers bearer(const std::string& key) { return {{"Authorization", "Bearer " + key}}; }
    static json post(const std::string& path, const json& body, const std::string& key, int* status) {
        auto r = client().Post(path.c_str(), bearer(key), body.dump(), "application/json");
        if (!r) return json{{"transport_error", true}};
        *status = r->status;
        return json::parse(r->body, nullptr, false);
    }
    static void expect_401(const httplib::Result& r, const std::string& what) {
        ASSERT_TRUE(r) << what << ": transport error";
        EXPECT_EQ(r->status, 401) << what;
        const json e = json::parse(r->body, nullptr, false);
        ASSERT_TRUE(e.contains("error")) << what << ": " << r->body;
        EXPECT_EQ(e["error"]["type"], "invalid_request_error") << what;
        EXPECT_EQ(e["error"]["code"], "invalid_api_key") << what;
        EXPECT_TRUE(e["error"]["param"].is_null()) << what;
        EXPECT_EQ(r->body.find(kKey1), std::string::npos) << what << ": the error names a key";
    }
};

TEST_F(ServerAuth, HealthIsOpenEverythingElseNeedsAKey) {
    auto h = client().Get("/health");
    ASSERT_TRUE(h);
    EXPECT_EQ(h->status, 200);
    expect_401(client().Get("/v1/models"), "models without a key");
    expect_401(client().Get("/v1/models", bearer("sk-wrong")), "models with a wrong key");
    expect_401(client().Get("/v1/models", bearer(std::string(kKey1) + "x")), "models with a longer key");
    expect_401(client().Get("/v1/models", bearer(std::string(kKey1).substr(0, 5))), "models with a prefix of the key");
    expect_401(client().Get("/v1/models", httplib::Headers{{"Authorization", kKey1}}), "the key without 'Bearer'");
    expect_401(client().Get("/metrics"), "private metrics without a key");
    expect_401(client().Get("/no/such/path"), "an unknown path without a key");
    for (const char* key : {kKey1, kKey2}) {
        auto m = client().Get("/v1/models", bearer(key));
        ASSERT_TRUE(m);
        EXPECT_EQ(m->status, 200) << key;
        auto met = client().Get("/metrics", bearer(key));
        ASSERT_TRUE(met);
        EXPECT_EQ(met->status, 200) << key;
        EXPECT_NE(met->body.find("megamoe_ready 1"), std::string::npos);
    }
    auto lower = client().Get("/v1/models", httplib::Headers{{"Authorization", std::string("bearer ") + kKey2}});
    ASSERT_TRUE(lower);
    EXPECT_EQ(lower->status, 200) << "the scheme is case-insensitive";
}

// A request with a body and no key: 401 after the body is read, and the connection stays in step
// for the next request on it.
TEST_F(ServerAuth, PostWithoutKeyIs401AndTheConnectionStaysUsable) {
    httplib::Client c = client();
    c.set_keep_alive(true);
    const std::string body = json{{"messages", {{{"role", "user"}, {"content", "Hi"}}}}, {"max_tokens", 2}}.dump();
    expect_401(c.Post("/v1/chat/completions", body, "application/json"), "chat without a key");
    expect_401(c.Post("/v1/completions", httplib::Headers{{"Authorization", "Bearer nope"}}, "{\"prompt\": \"x\"}",
                      "application/json"),
               "completion with a wrong key");
    expect_401(c.Delete("/v1/models", body, "application/json"), "a wrong method without a key");
    auto ok = c.Post("/v1/chat/completions", bearer(kKey1), body, "application/json");
    ASSERT_TRUE(ok) << "the connection is out of step";
    EXPECT_EQ(ok->status, 200) << ok->body;
}

TEST_F(ServerAuth, PerRequestLimitsNameTheirFlag) {
    int status = 0;
    // Prompt tokens: 413.
    json r = post("/v1/completions", {{"prompt", std::vector<int>(65, 5)}, {"max_tokens", 1}}, kKey1, &status);
    EXPECT_EQ(status, 413) << r.dump();
    EXPECT_NE(r.dump().find("--max-prompt-tokens"), std::string::npos) << r.dump();
    r = post("/v1/completions", {{"prompt", std::vector<int>(64, 5)}, {"max_tokens", 1}}, kKey1, &status);
    EXPECT_EQ(status, 200) << r.dump();
    // Generated tokens: a larger max_tokens is a 400; none given fills up to the cap.
    r = post("/v1/completions", {{"prompt", "Hi"}, {"max_tokens", 41}}, kKey1, &status);
    EXPECT_EQ(status, 400) << r.dump();
    EXPECT_NE(r.dump().find("--max-completion-tokens"), std::string::npos) << r.dump();
    r = post("/v1/completions", {{"prompt", "Hi"}, {"ignore_eos", true}}, kKey1, &status);
    EXPECT_EQ(status, 200) << r.dump();
    EXPECT_EQ(r["usage"]["completion_tokens"], 40);
    // Requests in flight and waiting, counted per choice: 429.
    r = post("/v1/completions", {{"prompt", "Hi"}, {"max_tokens", 1}, {"n", 5}}, kKey1, &status);
    EXPECT_EQ(status, 429) << r.dump();
    EXPECT_NE(r.dump().find("--max-requests"), std::string::npos) << r.dump();
    EXPECT_EQ(r["error"]["code"], "rate_limit_exceeded");
    // JSON depth: 400.
    std::string deep = "{\"prompt\": \"Hi\", \"x\": " + std::string(20, '[') + std::string(20, ']') + "}";
    auto d = client().Post("/v1/completions", bearer(kKey1), deep, "application/json");
    ASSERT_TRUE(d);
    EXPECT_EQ(d->status, 400);
    EXPECT_NE(d->body.find("--max-json-depth"), std::string::npos) << d->body;
    // Numbers a float cannot hold, a response_format type that is not a string: 400, not a crash or a 500.
    r = post("/v1/completions", {{"prompt", "Hi"}, {"temperature", 1e300}}, kKey1, &status);
    EXPECT_EQ(status, 400) << r.dump();
    r = post("/v1/completions", {{"prompt", "Hi"}, {"top_k", 5000000000LL}}, kKey1, &status);
    EXPECT_EQ(status, 400) << r.dump();
    r = post("/v1/chat/completions",
             {{"messages", {{{"role", "user"}, {"content", "Hi"}}}}, {"response_format", {{"type", 5}}}}, kKey1, &status);
    EXPECT_EQ(status, 400) << r.dump();
    auto h = client().Get("/health");
    ASSERT_TRUE(h) << "the server died";
    EXPECT_EQ(h->status, 200);
}

// Listening on an address other machines reach, without a key: a warning on the terminal.
TEST(ServerBind, PublicAddressWithoutKeyWarns) {
    if (!std::filesystem::exists(tokenizer_path())) MEGAMOE_MISSING_GOLDEN() << "no tokenizer fixture";
    test::TempDir dir;
    const std::string model = dir.str() + "/tiny";
    SynthOptions o;
    o.vocab = 6016;
    o.layers = 1;
    write_synthetic_checkpoint(model, o);
    std::filesystem::copy_file(tokenizer_path(), model + "/tokenizer.json");
    for (const bool with_key : {false, true}) {
        const std::string log = dir.str() + (with_key ? "/keyed.log" : "/open.log");
        std::vector<std::string> args = {"--model", model, "--host", "0.0.0.0"};
        if (with_key) args.insert(args.end(), {"--api-key", kKey1});
        pid_t pid = spawn(args, log);
        ASSERT_GT(pid, 0);
        const int port = bound_port(log, 30);
        EXPECT_GT(port, 0) << test::read_file(log);
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        const std::string text = test::read_file(log);
        EXPECT_EQ(text.find("WARNING") != std::string::npos, !with_key) << text;
        stop(pid);
    }
    // The loopback default: no warning.
    const std::string log = dir.str() + "/local.log";
    pid_t pid = spawn({"--model", model}, log);
    ASSERT_GT(pid, 0);
    EXPECT_GT(bound_port(log, 30), 0);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    EXPECT_EQ(test::read_file(log).find("WARNING"), std::string::npos);
    stop(pid);
}

TEST(ServerBind, BadKeyFlagsAreRefusedBeforeListening) {
    test::TempDir dir;
    const std::string empty = dir.str() + "/empty.txt";
    std::ofstream(empty) << "\n   \n";
    for (const auto& [args, want] : std::vector<std::pair<std::vector<std::string>, std::string>>{
             {{"--api-key-file", dir.str() + "/missing.txt"}, "cannot read the API key file"},
             {{"--api-key-file", empty}, "holds no key"},
             {{"--api-key", "has space"}, "printable ASCII"},
             {{"--max-json-depth", "500"}, "--max-json-depth"},
             {{"--max-requests", "0"}, "--max-requests"}}) {
        std::vector<std::string> full = {"--model", dir.str()};
        full.insert(full.end(), args.begin(), args.end());
        const std::string log = dir.str() + "/out.log";
        pid_t pid = spawn(full, log);
        ASSERT_GT(pid, 0);
        int st = 0;
        waitpid(pid, &st, 0);
        EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 1) << want;
        EXPECT_NE(test::read_file(log).find(want), std::string::npos) << test::read_file(log);
    }
}

// The key check itself: every key compared, nothing but an exact match accepted.
TEST(ApiKeys, ComparisonAndParsing) {
    const std::vector<std::string> keys = {"abc", "sk-123"};
    EXPECT_TRUE(authorized(keys, "Bearer abc"));
    EXPECT_TRUE(authorized(keys, "Bearer sk-123"));
    EXPECT_TRUE(authorized(keys, "BEARER sk-123 "));
    EXPECT_FALSE(authorized(keys, "Bearer ab"));
    EXPECT_FALSE(authorized(keys, "Bearer abcd"));
    EXPECT_FALSE(authorized(keys, "Bearer "));
    EXPECT_FALSE(authorized(keys, "abc"));
    EXPECT_FALSE(authorized(keys, "Basic abc"));
    EXPECT_FALSE(authorized(keys, ""));
    EXPECT_TRUE(authorized({}, ""));   // no keys: open
    EXPECT_TRUE(constant_time_equal("k", "k"));
    EXPECT_FALSE(constant_time_equal("k", std::string("k\0", 2)));
    EXPECT_FALSE(needs_key("/health", true));
    EXPECT_FALSE(needs_key("/metrics", false));
    EXPECT_TRUE(needs_key("/metrics", true));
    EXPECT_TRUE(needs_key("/v1/models", false));
}

}  // namespace
}  // namespace megamoe
