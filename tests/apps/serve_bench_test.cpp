// serve_bench_test.cpp — megamoe-serve-bench as a user runs it: against a real `megamoe serve`
// (CPU backend, a synthetic tiny model) a small concurrency sweep on both endpoints, random and
// JSONL prompts, its JSON (every level, consistent numbers) and its PNG (a valid file: signature,
// IHDR, chunk CRCs, the image data inflating to the scanlines); and bad flags, each refused with
// a message naming the flag.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>

#include "io/synth.h"
#include "serve_util.h"
#include "test_util.h"


namespace megamoe {
namespace {

using json = nlohmann::json;

std::string tokenizer_path() { return test::shared_dir() + "/golden/tokenizer/tokenizer.json"; }

struct BenchRun {
    int rc = -1;
    std::string out;   // stdout and stderr
};

BenchRun bench(const std::string& log, std::vector<std::string> args) {
    args.insert(args.begin(), MEGAMOE_SERVE_BENCH_PATH);
    BenchRun r;
    const pid_t p = test::spawn_logged(args, log);
    if (p <= 0) return r;
    r.rc = test::wait_exit(p, 120).value_or(-1);
    r.out = test::read_file(log);
    return r;
}

uint32_t be32(const std::string& s, size_t at) {
    return (static_cast<uint32_t>(static_cast<unsigned char>(s[at])) << 24) |
           (static_cast<uint32_t>(static_cast<unsigned char>(s[at + 1])) << 16) |
           (static_cast<uint32_t>(static_cast<unsigned char>(s[at + 2])) << 8) |
           static_cast<uint32_t>(static_cast<unsigned char>(s[at + 3]));
}

// Checks a PNG file chunk by chunk; returns the inflated scanlines.
std::string check_png(const std::string& png, uint32_t* w, uint32_t* h) {
    EXPECT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
    std::string idat, types;
    for (size_t at = 8; at + 12 <= png.size();) {
        const uint32_t len = be32(png, at);
        if (at + 12 + len > png.size()) {
            ADD_FAILURE() << "a chunk runs past the end";
            break;
        }
        const std::string type = png.substr(at + 4, 4), data = png.substr(at + 8, len);
        const uLong crc = crc32(0, reinterpret_cast<const Bytef*>(png.data() + at + 4), len + 4);
        EXPECT_EQ(be32(png, at + 8 + len), static_cast<uint32_t>(crc)) << type << " CRC";
        types += type + " ";
        if (type == "IHDR") {
            *w = be32(data, 0);
            *h = be32(data, 4);
            EXPECT_EQ(data.substr(8), std::string("\x08\x02\x00\x00\x00", 5));   // 8-bit RGB, no interlace
        }
        if (type == "IDAT") idat += data;
        at += 12 + len;
    }
    EXPECT_EQ(types, "IHDR IDAT IEND ");
    std::string raw(static_cast<size_t>(*w * 3 + 1) * *h, '\0');
    uLongf raw_len = raw.size();
    EXPECT_EQ(uncompress(reinterpret_cast<Bytef*>(raw.data()), &raw_len, reinterpret_cast<const Bytef*>(idat.data()),
                         idat.size()),
              Z_OK);
    EXPECT_EQ(raw_len, raw.size());
    return raw;
}

class ServeBench : public ::testing::Test {
protected:
    static inline std::unique_ptr<test::TempDir> dir;
    static inline pid_t pid = -1;
    static inline int port = 0;

    static void SetUpTestSuite() {
        if (!std::filesystem::exists(tokenizer_path())) return;
        dir = std::make_unique<test::TempDir>();
        const std::string model_dir = dir->str() + "/tiny-synth";
        SynthOptions o;
        o.vocab = 6016;
        o.layers = 4;
        o.seed = 3;
        write_synthetic_checkpoint(model_dir, o);
        std::filesystem::copy_file(tokenizer_path(), model_dir + "/tokenizer.json");
        pid = test::spawn_logged({MEGAMOE_CLI_PATH, "serve", "--model", model_dir, "--host", "127.0.0.1", "--port", "0",
                     "--backend", "cpu", "--max-model-len", "512"},
                    dir->str() + "/server.log");
        if (pid > 0) port = test::served_port(dir->str() + "/server.log");
        (void)test::wait_healthy(port);
    }

    static void TearDownTestSuite() {
        if (pid > 0) {
            kill(pid, SIGTERM);
            (void)test::wait_exit(pid, 30);
            pid = -1;
        }
        dir.reset();
    }

    void SetUp() override {
        if (!std::filesystem::exists(tokenizer_path())) MEGAMOE_MISSING_GOLDEN() << "no tokenizer fixture";
        ASSERT_GT(pid, 0);
        ASSERT_GT(port, 0) << "the server printed no port:\n" << test::read_file(dir->str() + "/server.log");
        httplib::Client c("127.0.0.1", port);
        auto r = c.Get("/health");
        ASSERT_TRUE(r && r->status == 200) << "the server did not come up";
    }
};

TEST_F(ServeBench, SweepWritesJsonAndPng) {
    const std::string js = dir->str() + "/sweep.json", png = dir->str() + "/sweep.png";
    BenchRun r = bench(dir->str() + "/sweep.log",
                  {"--port", std::to_string(port), "--input-len", "12", "--output-len", "5", "--num-prompts", "4",
                   "--concurrency", "1,2,4", "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--out-json", js,
                   "--out-png", png, "--title", "test sweep"});
    ASSERT_EQ(r.rc, 0) << r.out;
    EXPECT_NE(r.out.find("Serving Benchmark Result (concurrency 4)"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("| concurrency | req/s |"), std::string::npos) << r.out;
    json j = json::parse(test::read_file(js));
    EXPECT_EQ(j["config"]["model"], "tiny-synth");   // from GET /v1/models
    EXPECT_EQ(j["config"]["endpoint"], "/v1/completions");
    EXPECT_EQ(j["config"]["prompt_kind"], "ids");
    ASSERT_EQ(j["levels"].size(), 3u);
    for (size_t k = 0; k < 3; ++k) {
        const json& L = j["levels"][k];
        EXPECT_EQ(L["concurrency"], int64_t{1} << k);
        EXPECT_EQ(L["completed"], 4);
        EXPECT_EQ(L["failed"], 0);
        EXPECT_EQ(L["total_input_tokens"], 4 * 12);      // token-id prompts: exact
        EXPECT_EQ(L["total_output_tokens"], 4 * 5);      // usage, with ignore_eos
        EXPECT_EQ(L["good_requests"], 4);
        EXPECT_NEAR(L["goodput"].get<double>(), L["request_throughput"].get<double>(), 1e-9);
        EXPECT_NEAR(L["output_throughput"].get<double>(), 20 / L["duration_s"].get<double>(), 1e-6);
        for (const char* m : {"ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"}) {
            const json& d = L[m];
            EXPECT_GT(d["p50"].get<double>(), 0) << m;
            EXPECT_LE(d["p50"].get<double>(), d["p90"].get<double>()) << m;
            EXPECT_LE(d["p90"].get<double>(), d["p99"].get<double>()) << m;
        }
        EXPECT_EQ(L["ttft_ms"]["count"], 4);
        EXPECT_EQ(L["tpot_ms"]["count"], 4);
        EXPECT_LT(L["ttft_ms"]["p99"].get<double>(), L["e2el_ms"]["p99"].get<double>() + 1e-9);
    }
    uint32_t w = 0, h = 0;
    const std::string raw = check_png(test::read_file(png), &w, &h);
    EXPECT_EQ(w, 1200u);
    EXPECT_EQ(h, 520u);
    size_t coloured = 0;
    for (uint32_t y = 0; y < h && raw.size() == static_cast<size_t>(w * 3 + 1) * h; ++y) {
        ASSERT_EQ(raw[y * (w * 3 + 1)], 0) << "filter byte of row " << y;
        for (uint32_t x = 0; x < w; ++x) {
            const unsigned char* p = reinterpret_cast<const unsigned char*>(raw.data()) + y * (w * 3 + 1) + 1 + x * 3;
            coloured += p[0] != p[1] || p[1] != p[2];   // the series' colours (the rest is grey)
        }
    }
    EXPECT_GT(coloured, 500u);
}

TEST_F(ServeBench, ChatWithJsonlPromptsAndPoissonArrivals) {
    const std::string jl = dir->str() + "/prompts.jsonl", js = dir->str() + "/chat.json";
    {
        std::ofstream f(jl);
        f << R"({"prompt": "What is the capital of France?"})" << "\n\n"
          << R"({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "max_tokens": 3})"
          << "\n";
    }
    BenchRun r = bench(dir->str() + "/chat.log", {"--port", std::to_string(port), "--model", "tiny-synth", "--endpoint", "chat",
                                             "--prompts", jl, "--output-len", "4", "--num-prompts", "4",
                                             "--request-rate", "50", "--concurrency", "2", "--out-json", js});
    ASSERT_EQ(r.rc, 0) << r.out;
    json j = json::parse(test::read_file(js));
    ASSERT_EQ(j["levels"].size(), 1u);
    EXPECT_EQ(j["levels"][0]["completed"], 4);
    EXPECT_EQ(j["levels"][0]["total_output_tokens"], 4 + 3 + 4 + 3);   // the file cycles; its max_tokens wins
    EXPECT_EQ(j["config"]["request_rate"], 50.0);
    EXPECT_TRUE(j["levels"][0]["goodput"].is_null());   // no SLO given
}

TEST_F(ServeBench, BadFlagsAndServerRefusalsAreClearErrors) {
    const std::string p = std::to_string(port);
    const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
        {{"--port", "x"}, "--port: 'x' is not an integer"},
        {{"--port", "70000"}, "--port must be in [1, 65535]"},
        {{"--endpoint", "embeddings"}, "--endpoint must be chat or completions"},
        {{"--concurrency", "1,,4"}, "--concurrency"},
        {{"--concurrency", "2,2"}, "--concurrency lists 2 twice"},
        {{"--request-rate", "0"}, "--request-rate must be in"},
        {{"--input-len"}, "--input-len needs a value"},
        {{"--frobnicate", "1"}, "unknown flag --frobnicate"},
        {{"--endpoint", "chat", "--prompt-kind", "ids"}, "--prompt-kind ids needs --endpoint completions"},
        {{"--id-range", "9:3"}, "--id-range"},
        {{"--prompts", dir->str() + "/missing.jsonl"}, "--prompts: cannot open"},
        {{"--out-png", dir->str() + "/no/such/dir/x.png"}, "--out-png: the directory"},
        {{"--port", "1", "--num-prompts", "1"}, "cannot reach http://127.0.0.1:1/v1/models (--host, --port)"},
        {{"--port", p, "--model", "other", "--num-prompts", "1"}, "The model `other` does not exist"},
    };
    for (const auto& [args, want] : cases) {
        BenchRun r = bench(dir->str() + "/bad.log", args);
        EXPECT_EQ(r.rc, 1) << args[0] << ": " << r.out;
        EXPECT_NE(r.out.find(want), std::string::npos) << "'" << want << "' not in: " << r.out;
    }
    const std::string bad = dir->str() + "/bad.jsonl";
    std::ofstream(bad) << "{\"prompt\": \"ok\"}\n{\"text\": \"no prompt\"}\n";
    BenchRun r = bench(dir->str() + "/bad.log", {"--prompts", bad, "--port", p});
    EXPECT_EQ(r.rc, 1);
    EXPECT_NE(r.out.find("bad.jsonl:2: needs 'prompt' or 'messages'"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace megamoe
