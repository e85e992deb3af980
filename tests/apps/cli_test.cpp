// cli_test.cpp — the `megamoe` executable as a user runs it: info, logits under each schedule,
// generate, synth → logits, and clear one-line errors (exit status 1) on bad input.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <sys/wait.h>

#include "io/safetensors.h"
#include "test_util.h"

namespace megamoe {
namespace {

constexpr double kLogitTol = 2e-4;   // the golden tolerance (see model_test.cpp)

struct CliRun {
    int status;
    std::string output;   // stdout and stderr together
};

CliRun run(const std::string& args, bool with_stderr = true) {
    const std::string cmd = std::string(MEGAMOE_CLI_PATH) + " " + args + (with_stderr ? " 2>&1" : " 2>/dev/null");
    FILE* p = popen(cmd.c_str(), "r");
    CliRun r{-1, ""};
    if (!p) return r;
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
    const int st = pclose(p);
    r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    return r;
}

void write_text(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

std::string golden_ids(const std::string& name, size_t n) {
    SafetensorsFile f(test::golden_dir(name) + "/golden.safetensors");
    Tensor t = f.view(*f.find("input_ids"));
    std::string s;
    for (size_t i = 0; i < n; ++i) s += std::to_string(t.as<int64_t>()[i]) + " ";
    return s;
}

class Cli : public ::testing::Test {
protected:
    void SetUp() override {
        if (!test::have_golden("tiny-flash-nvfp4")) GTEST_SKIP() << "no golden checkpoints";
    }
    std::string model(const char* name = "tiny-flash-nvfp4") { return test::golden_dir(name) + "/model"; }
};

TEST_F(Cli, Info) {
    CliRun r = run("info --model " + model());
    ASSERT_EQ(r.status, 0) << r.output;
    for (const char* s : {"6 layers", "CSA", "HCA", "hash", "score", "NVFP4", "MXFP4", "routed experts", "total"})
        EXPECT_NE(r.output.find(s), std::string::npos) << s << "\n" << r.output;
}

TEST_F(Cli, LogitsUnderEverySchedule) {
    test::TempDir dir;
    for (const char* name : {"tiny-flash-nvfp4", "tiny-flash-mxfp4"}) {
        const std::string toks = dir.str() + "/tokens.txt";
        write_text(toks, golden_ids(name, 256));
        SafetensorsFile g(test::golden_dir(name) + "/golden.safetensors");
        const float* ref = g.view(*g.find("logits")).as<float>();
        for (const char* sched : {"", "--decode-from 100", "--chunk 37"}) {
            const std::string out = dir.str() + "/logits.safetensors";
            CliRun r = run("logits --model " + model(name) + " --tokens " + toks + " --out " + out + " " + sched);
            ASSERT_EQ(r.status, 0) << r.output;
            SafetensorsFile f(out);
            const TensorInfo* t = f.find("logits");
            ASSERT_NE(t, nullptr);
            ASSERT_EQ(t->dtype, DType::f32);
            ASSERT_EQ(t->ndim, 2);
            ASSERT_EQ(t->shape[0], 256);
            ASSERT_EQ(t->shape[1], 1024);
            EXPECT_LE(test::max_abs_diff(f.view(*t).as<float>(), ref, 256 * 1024), kLogitTol) << name << " " << sched;
        }
    }
}

TEST_F(Cli, GenerateIsGreedy) {
    SafetensorsFile g(test::golden_dir("tiny-flash-nvfp4") + "/golden.safetensors");
    Tensor ids = g.view(*g.find("greedy_ids"));
    std::string prompt, want;
    for (int64_t i = 0; i < ids.numel(); ++i) (i < 16 ? prompt : want) += std::to_string(ids.as<int64_t>()[i]) + " ";
    CliRun r = run("generate --model " + model() + " --ids \"" + prompt + "\" --max-new 48 --chunk 5", false);
    ASSERT_EQ(r.status, 0) << r.output;
    want.pop_back();
    EXPECT_EQ(r.output.substr(0, r.output.find('\n')), want);
}

TEST_F(Cli, SynthThenLogits) {
    test::TempDir dir;
    CliRun s = run("synth --out " + dir.str() + "/ck --preset tiny --layers 3 --vocab 64 --experts mxfp4 --seed 5");
    ASSERT_EQ(s.status, 0) << s.output;
    write_text(dir.str() + "/t.txt", "0 5 9 63 2 2 2 7 1");
    CliRun r = run("logits --model " + dir.str() + "/ck --tokens " + dir.str() + "/t.txt --out " + dir.str() + "/l.safetensors");
    ASSERT_EQ(r.status, 0) << r.output;
    SafetensorsFile f(dir.str() + "/l.safetensors");
    EXPECT_EQ(f.find("logits")->shape[0], 9);
    EXPECT_EQ(f.find("logits")->shape[1], 64);
}

TEST_F(Cli, BadInputsGiveOneClearError) {
    test::TempDir dir;
    const std::string toks = dir.str() + "/bad.txt", out = dir.str() + "/o.safetensors";
    auto expect_fail = [&](const std::string& args, const std::vector<std::string>& subs) {
        CliRun r = run(args);
        EXPECT_EQ(r.status, 1) << args << "\n" << r.output;
        for (const auto& s : subs) EXPECT_NE(r.output.find(s), std::string::npos) << s << "\n" << r.output;
    };
    write_text(toks, "12 abc 7");
    expect_fail("logits --model " + model() + " --tokens " + toks + " --out " + out, {"bad.txt", "'abc'"});
    write_text(toks, "12 5000 7");
    expect_fail("logits --model " + model() + " --tokens " + toks + " --out " + out, {"token id 5000"});
    write_text(toks, "12 13 14");
    expect_fail("logits --model " + model() + " --tokens " + toks + " --out " + out + " --decode-from 9",
                {"decode-from 9"});
    expect_fail("logits --model " + model() + " --tokens " + dir.str() + "/missing.txt --out " + out,
                {"missing.txt", "cannot open"});
    expect_fail("info --model " + dir.str() + "/nowhere", {"nowhere", "config.json"});
    expect_fail("generate --model " + model() + " --ids \"1 2 x\"", {"--ids", "'x'"});
    // serve listens, then fails to load: one clear line and status 1, not a hang or a crash
    expect_fail("serve --model " + dir.str() + "/nowhere --port 0", {"nowhere", "config.json"});
    expect_fail("serve --model " + model() + " --port 0", {"tokenizer.json"});   // the golden dir has none
    EXPECT_FALSE(std::filesystem::exists(out));   // nothing half-written
}

}  // namespace
}  // namespace megamoe
