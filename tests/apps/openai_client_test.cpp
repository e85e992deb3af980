// openai_client_test.cpp — `megamoe serve` driven by the official OpenAI client library (the npm
// package `openai`, pinned in tests/apps/node/package.json): models, chat and completions
// (streamed with usage too), tools, logprobs, seeds, errors as the client's exception classes,
// abort mid-stream, concurrent streams. The server runs as a real process on 127.0.0.1 (CPU
// backend, a synthetic tiny model, the fixture tokenizer); each test runs one check of
// tests/apps/node/openai_client.mjs with node.
//
// Skips, saying why, when node is not on PATH or the package is not installed (scripts/setup.sh
// installs both; CI runs it, so there the tests run).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <sstream>
#include <thread>

#include "io/synth.h"
#include "serve_util.h"
#include "test_util.h"


namespace megamoe {
namespace {

const std::string kNodeDir = std::string(MEGAMOE_SOURCE_DIR) + "/tests/apps/node";
const std::string kModelName = "tiny-synth";

std::string tokenizer_path() { return test::shared_dir() + "/golden/tokenizer/tokenizer.json"; }

// The first executable `node` on PATH, or "".
std::string find_node() {
    const char* path = std::getenv("PATH");
    std::istringstream dirs(path ? path : "");
    for (std::string d; std::getline(dirs, d, ':');) {
        const std::string p = (d.empty() ? "." : d) + "/node";
        if (access(p.c_str(), X_OK) == 0 && std::filesystem::is_regular_file(p)) return p;
    }
    return "";
}

class OpenAIClient : public ::testing::Test {
protected:
    static inline std::unique_ptr<test::TempDir> dir;
    static inline pid_t pid = -1;
    static inline int port = 0;
    static inline std::string node;
    static inline std::string skip_reason;

    static void SetUpTestSuite() {
        node = find_node();
        if (!std::filesystem::exists(tokenizer_path())) {
            skip_reason = "no tokenizer fixture at " + tokenizer_path();
        } else if (node.empty()) {
            skip_reason = "node is not on PATH: install Node.js >= 18 and the client with scripts/setup.sh "
                          "(or apt-get install nodejs npm && npm ci --prefix tests/apps/node)";
        } else if (!std::filesystem::exists(kNodeDir + "/node_modules/openai/package.json")) {
            skip_reason = "the npm package openai is not installed in " + kNodeDir +
                          "/node_modules: run `npm ci --prefix tests/apps/node` (scripts/setup.sh does)";
        }
        if (!skip_reason.empty()) return;
        dir = std::make_unique<test::TempDir>();
        const std::string model_dir = dir->str() + "/" + kModelName;
        SynthOptions o;
        o.vocab = 6016;   // covers the fixture tokenizer's 6014 ids
        o.layers = 4;
        o.seed = 11;
        write_synthetic_checkpoint(model_dir, o);
        std::filesystem::copy_file(tokenizer_path(), model_dir + "/tokenizer.json");
        // The CPU backend: batched and solo greedy runs are then bit-identical (the concurrent check).
        pid = test::spawn_logged({MEGAMOE_CLI_PATH, "serve", "--model", model_dir, "--host", "127.0.0.1", "--port", "0",
                     "--backend", "cpu", "--max-model-len", "1024", "--max-body-bytes", std::to_string(64 * 1024),
                     "--max-batch-tokens", "128"},
                    dir->str() + "/server.log");
        if (pid > 0) port = test::served_port(dir->str() + "/server.log");
        (void)test::wait_healthy(port);
    }

    static void TearDownTestSuite() {
        if (pid > 0) {
            kill(pid, SIGTERM);
            if (!test::wait_exit(pid, 30)) ADD_FAILURE() << "the server did not stop on SIGTERM";
            pid = -1;
        }
        dir.reset();
    }

    void SetUp() override {
        if (!std::filesystem::exists(tokenizer_path())) MEGAMOE_MISSING_GOLDEN() << skip_reason;
        if (!skip_reason.empty()) GTEST_SKIP() << skip_reason;
        ASSERT_GT(pid, 0) << "could not start " << MEGAMOE_CLI_PATH;
        ASSERT_GT(port, 0) << "the server printed no port:\n" << test::read_file(dir->str() + "/server.log");
        httplib::Client c("127.0.0.1", port);
        auto r = c.Get("/health");
        ASSERT_TRUE(r && r->status == 200) << "the server did not come up:\n" << test::read_file(dir->str() + "/server.log");
    }

    // Runs one check of the Node script; it prints "ok CHECK" on success.
    void run_check(const std::string& check) {
        const std::string log = dir->str() + "/node-" + check + ".log";
        const pid_t p = test::spawn_logged({node, kNodeDir + "/openai_client.mjs", "http://127.0.0.1:" + std::to_string(port) + "/v1",
                               kModelName, check},
                              log);
        ASSERT_GT(p, 0) << "could not start " << node;
        const std::optional<int> rc = test::wait_exit(p, 120);
        const std::string out = test::read_file(log);
        ASSERT_TRUE(rc.has_value()) << check << ": the Node client took over 120 s and was killed\n" << out;
        EXPECT_EQ(*rc, 0) << check << " failed:\n" << out;
        EXPECT_NE(out.find("ok " + check), std::string::npos) << out;
    }
};

TEST_F(OpenAIClient, ModelsList) { run_check("models"); }
TEST_F(OpenAIClient, ChatWholeStreamedWithUsageAndStreamHelper) { run_check("chat"); }
TEST_F(OpenAIClient, CompletionsWholeStreamedTokenIdsAndN) { run_check("completions"); }
TEST_F(OpenAIClient, Tools) { run_check("tools"); }
TEST_F(OpenAIClient, Logprobs) { run_check("logprobs"); }
TEST_F(OpenAIClient, Seeds) { run_check("seeds"); }
TEST_F(OpenAIClient, ErrorsAreTheClientsExceptionClasses) { run_check("errors"); }
TEST_F(OpenAIClient, AbortMidStreamCancelsOnServer) { run_check("abort"); }
TEST_F(OpenAIClient, ConcurrentStreamsEqualSoloRuns) { run_check("concurrent"); }

}  // namespace
}  // namespace megamoe
