// serve_test.cpp — `megamoe serve --backend cuda`: the OpenAI-compatible server on the GPU
// runner, started as a user would, on a small synthetic checkpoint with the tokenizer fixture.
// The server's HTTP behaviour is tested on the CPU backend (tests/apps/server_test.cpp); here:
// greedy completions equal `megamoe generate --backend cuda`, seeded sampling is reproducible,
// logprobs, streaming, concurrent requests, and the cache usage the GPU pool reports.
// Skips without a GPU or without ../shared/golden/tokenizer.
#include <gtest/gtest.h>

#ifdef MEGAMOE_HAVE_CUDA

#include <fcntl.h>
#include <unistd.h>
#include <httplib.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <chrono>
#include <filesystem>
#include <future>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "cuda/linear.h"
#include "io/synth.h"
#include "serve/tokenizer.h"
#include "serve_util.h"
#include "test_util.h"


namespace megamoe {
namespace {

using json = nlohmann::json;

std::string cli() {
    if (std::filesystem::exists(MEGAMOE_CLI_PATH)) return MEGAMOE_CLI_PATH;
    const auto here = std::filesystem::read_symlink("/proc/self/exe").parent_path() / "megamoe";
    return here.string();
}

class GpuServe : public ::testing::Test {
protected:
    static inline std::unique_ptr<test::TempDir> dir;
    static inline pid_t pid = -1;
    static inline int port = 0;
    static inline std::string model_dir;

    static std::string tokenizer() { return test::shared_dir() + "/golden/tokenizer/tokenizer.json"; }

    static void SetUpTestSuite() {
        if (!cuda::gpu_available() || !std::filesystem::exists(tokenizer())) return;
        dir = std::make_unique<test::TempDir>();
        model_dir = dir->str() + "/tiny-synth";
        SynthOptions o;
        o.vocab = 6016;   // covers the fixture tokenizer's 6014 ids
        o.layers = 4;
        o.seed = 5;
        write_synthetic_checkpoint(model_dir, o);
        std::filesystem::copy_file(tokenizer(), model_dir + "/tokenizer.json");
        // --port 0: the kernel picks the port and the server prints it (no race for a port picked first).
        const std::string log = dir->str() + "/server.log";
        pid = test::spawn_logged({cli(), "serve", "--backend", "cuda", "--model", model_dir, "--host", "127.0.0.1",
                                  "--port", "0", "--max-model-len", "1024", "--max-seqs", "16", "--max-batch-tokens",
                                  "256"},
                                 log);
        port = pid > 0 ? test::served_port(log) : -1;
        if (port > 0) (void)test::wait_healthy(port);
    }
    static void TearDownTestSuite() {
        test::stop_process(pid);
        dir.reset();
    }
    void SetUp() override {
        if (!cuda::gpu_available()) GTEST_SKIP() << "no GPU";
        if (!std::filesystem::exists(tokenizer())) GTEST_SKIP() << "no tokenizer fixture";
        ASSERT_GT(pid, 0);
        auto r = client().Get("/health");
        ASSERT_TRUE(r && r->status == 200) << "server did not come up: " << test::read_file(dir->str() + "/server.log");
    }
    static httplib::Client client() {
        httplib::Client c("127.0.0.1", port);
        c.set_read_timeout(60, 0);
        return c;
    }
    static json post(const std::string& path, const json& body, int* status) {
        auto r = client().Post(path.c_str(), body.dump(), "application/json");
        if (!r) return json{{"transport_error", true}};
        *status = r->status;
        return json::parse(r->body, nullptr, false);
    }
};

TEST_F(GpuServe, LogSaysCudaAndPrintsThePlan) {
    const std::string log = test::read_file(dir->str() + "/server.log");
    EXPECT_NE(log.find("backend cuda"), std::string::npos) << log;
    EXPECT_NE(log.find("GPU memory plan"), std::string::npos) << log;
}

TEST_F(GpuServe, GreedyCompletionEqualsGenerate) {
    const std::vector<int32_t> prompt = {300, 1200, 45, 4000, 17, 990, 5};
    std::string ids;
    for (int32_t v : prompt) ids += std::to_string(v) + " ";
    FILE* p = popen((cli() + " generate --backend cuda --model " + model_dir + " --ids \"" + ids +
                     "\" --max-new 12 --ignore-eos 2>/dev/null")
                        .c_str(),
                    "r");
    ASSERT_NE(p, nullptr);
    char buf[4096] = {0};
    const size_t n = fread(buf, 1, sizeof buf - 1, p);
    pclose(p);
    std::istringstream in(std::string(buf, n));
    std::vector<int32_t> want;
    for (int32_t v; in >> v;) want.push_back(v);
    ASSERT_EQ(want.size(), 12u);
    int status = 0;
    json r = post("/v1/completions",
                  {{"model", "tiny-synth"}, {"prompt", prompt}, {"max_tokens", 12}, {"temperature", 0},
                   {"ignore_eos", true}, {"logprobs", 2}},
                  &status);
    ASSERT_EQ(status, 200) << r.dump();
    const json& lp = r["choices"][0]["logprobs"];
    ASSERT_EQ(lp["tokens"].size(), 12u) << r.dump();
    for (size_t i = 0; i < 12; ++i) {   // greedy: the chosen token is the most likely one
        EXPECT_LE(lp["token_logprobs"][i].get<double>(), 0.0);
        double best = -1e30;
        for (const auto& [tok, v] : lp["top_logprobs"][i].items()) best = std::max(best, v.get<double>());
        EXPECT_NEAR(lp["token_logprobs"][i].get<double>(), best, 1e-5);
    }
    Tokenizer tok = Tokenizer::load(model_dir + "/tokenizer.json");
    EXPECT_EQ(r["choices"][0]["text"], tok.decode(want, /*skip_special=*/true));
    json r3 = post("/v1/completions",
                   {{"model", "tiny-synth"}, {"prompt", prompt}, {"max_tokens", 12}, {"temperature", 0}, {"ignore_eos", true}},
                   &status);
    ASSERT_EQ(status, 200);
    EXPECT_EQ(r3["choices"][0]["text"], r["choices"][0]["text"]);   // deterministic
}

TEST_F(GpuServe, SeededSamplingIsReproducibleAndConcurrentRequestsAllFinish) {
    const json body = {{"model", "tiny-synth"},
                       {"messages", json::array({{{"role", "user"}, {"content", "Tell me about the sea"}}})},
                       {"max_tokens", 24},
                       {"temperature", 0.9},
                       {"top_p", 0.95},
                       {"seed", 1234}};
    int s1 = 0, s2 = 0;
    const json a = post("/v1/chat/completions", body, &s1), b = post("/v1/chat/completions", body, &s2);
    ASSERT_EQ(s1, 200) << a.dump();
    ASSERT_EQ(s2, 200) << b.dump();
    EXPECT_EQ(a["choices"][0]["message"], b["choices"][0]["message"]);
    // 12 concurrent requests of different lengths, streaming and not.
    std::vector<std::future<int>> f;
    for (int i = 0; i < 12; ++i)
        f.push_back(std::async(std::launch::async, [i] {
            json q = {{"model", "tiny-synth"}, {"prompt", std::string(static_cast<size_t>(5 + 7 * i), 'a')},
                      {"max_tokens", 8 + i}, {"ignore_eos", true}};
            if (i % 2) q["stream"] = true;
            auto r = client().Post("/v1/completions", q.dump(), "application/json");
            return r ? r->status : -1;
        }));
    for (auto& x : f) EXPECT_EQ(x.get(), 200);
    auto m = client().Get("/metrics");
    ASSERT_TRUE(m);
    EXPECT_NE(m->body.find("megamoe_generation_tokens_total"), std::string::npos);
}

// Prefix caching on the GPU through the server: a prompt of 300 ids leaves a snapshot where its
// last whole 256-position block ends; the same prompt again starts from it (256 tokens reused,
// counted in /metrics) and, computing the same last chunk from the same state, gives the same
// greedy completion.
TEST_F(GpuServe, RepeatedPromptStartsFromItsPrefixSnapshot) {
    auto metric = [](const std::string& name) {
        auto m = client().Get("/metrics");
        if (!m) return -1.0;
        std::istringstream in(m->body);
        for (std::string line; std::getline(in, line);)
            if (line.rfind(name + " ", 0) == 0) return std::stod(line.substr(name.size() + 1));
        return -1.0;
    };
    std::vector<int32_t> prompt;
    for (int i = 0; i < 300; ++i) prompt.push_back(100 + (i * 37) % 3000);
    const json body = {{"model", "tiny-synth"}, {"prompt", prompt}, {"max_tokens", 10}, {"temperature", 0},
                       {"ignore_eos", true}};
    const double hits0 = metric("megamoe_prefix_cache_hits_total");
    ASSERT_GE(hits0, 0) << "no prefix-cache metric";
    int status = 0;
    const json a = post("/v1/completions", body, &status);
    ASSERT_EQ(status, 200) << a.dump();
    EXPECT_EQ(metric("megamoe_prefix_cache_hits_total"), hits0);
    const json b = post("/v1/completions", body, &status);
    ASSERT_EQ(status, 200) << b.dump();
    EXPECT_EQ(metric("megamoe_prefix_cache_hits_total"), hits0 + 256);
    EXPECT_EQ(b["choices"][0]["text"], a["choices"][0]["text"]);
    EXPECT_GE(metric("megamoe_prefix_cache_entries"), 1);
}

// `serve --speculative-tokens 1`: a second server on the same checkpoint, with the MTP block
// drafting. Greedy completions (with logprobs, and a repeated prompt that starts from its prefix
// snapshot) are the same text as the plain server's; a seeded sampled one (the standard rule:
// the main model's distribution, not the plain server's tokens) is the same text when asked
// twice, with its max_tokens; /metrics counts the drafts.
TEST_F(GpuServe, SpeculativeServerAnswersAsThePlainOne) {
    const std::string log = dir->str() + "/server-spec.log";
    pid_t spid = test::spawn_logged({cli(), "serve", "--backend", "cuda", "--model", model_dir, "--host", "127.0.0.1",
                                     "--port", "0", "--max-model-len", "1024", "--max-seqs", "16",
                                     "--max-batch-tokens", "256", "--speculative-tokens", "1"},
                                    log);
    const int sport = spid > 0 ? test::served_port(log) : -1;
    ASSERT_GT(sport, 0) << test::read_file(log);
    ASSERT_TRUE(test::wait_healthy(sport)) << test::read_file(log);
    httplib::Client sc("127.0.0.1", sport);
    sc.set_read_timeout(60, 0);
    std::vector<int32_t> longp;
    for (int i = 0; i < 300; ++i) longp.push_back(100 + (i * 41) % 3000);
    const std::vector<json> bodies = {
        {{"model", "tiny-synth"}, {"prompt", std::vector<int32_t>{300, 1200, 45, 4000, 17, 990, 5}}, {"max_tokens", 16},
         {"temperature", 0}, {"ignore_eos", true}, {"logprobs", 2}},
        {{"model", "tiny-synth"}, {"prompt", std::vector<int32_t>{11, 22, 33, 44}}, {"max_tokens", 16}, {"temperature", 0.9},
         {"top_p", 0.9}, {"seed", 1234}, {"ignore_eos", true}},
        {{"model", "tiny-synth"}, {"prompt", longp}, {"max_tokens", 12}, {"temperature", 0}, {"ignore_eos", true}},
        {{"model", "tiny-synth"}, {"prompt", longp}, {"max_tokens", 12}, {"temperature", 0}, {"ignore_eos", true}},
    };
    for (size_t i = 0; i < bodies.size(); ++i) {
        int status = 0;
        const json want = post("/v1/completions", bodies[i], &status);
        ASSERT_EQ(status, 200) << want.dump();
        auto r = sc.Post("/v1/completions", bodies[i].dump(), "application/json");
        ASSERT_TRUE(r && r->status == 200) << (r ? r->body : std::string("no response")) << test::read_file(log);
        const json got = json::parse(r->body);
        if (bodies[i]["temperature"] != 0) {
            auto again = sc.Post("/v1/completions", bodies[i].dump(), "application/json");
            ASSERT_TRUE(again && again->status == 200);
            EXPECT_EQ(json::parse(again->body)["choices"][0]["text"], got["choices"][0]["text"]) << "request " << i;
            EXPECT_EQ(got["usage"]["completion_tokens"], bodies[i]["max_tokens"]) << "request " << i;
            continue;
        }
        EXPECT_EQ(got["choices"][0]["text"], want["choices"][0]["text"]) << "request " << i;
        if (i == 0) {
            EXPECT_EQ(got["choices"][0]["logprobs"]["tokens"], want["choices"][0]["logprobs"]["tokens"]);
        }
    }
    auto m = sc.Get("/metrics");
    ASSERT_TRUE(m && m->status == 200);
    double drafts = -1;
    std::istringstream in(m->body);
    for (std::string line; std::getline(in, line);)
        if (line.rfind("megamoe_spec_decode_num_drafts_total ", 0) == 0) drafts = std::stod(line.substr(line.find(' ') + 1));
    EXPECT_GT(drafts, 0) << m->body;
    test::stop_process(spid);
    // The CPU backend has no speculative steps: a clear error at start-up.
    const std::string cpu_log = dir->str() + "/server-spec-cpu.log";
    pid_t cpid = test::spawn_logged({cli(), "serve", "--backend", "cpu", "--model", model_dir, "--host", "127.0.0.1",
                                     "--port", "0", "--speculative-tokens", "1"},
                                    cpu_log);
    ASSERT_GT(cpid, 0);
    const std::optional<int> rc = test::wait_exit(cpid, 60);
    ASSERT_TRUE(rc.has_value()) << "the server did not exit";
    EXPECT_NE(*rc, 0);
    EXPECT_NE(test::read_file(cpu_log).find("cannot run speculative steps"), std::string::npos) << test::read_file(cpu_log);
}

}  // namespace
}  // namespace megamoe

#else  // !MEGAMOE_HAVE_CUDA

TEST(GpuServe, NeedsCuda) { GTEST_SKIP() << "built without CUDA"; }

#endif  // MEGAMOE_HAVE_CUDA
