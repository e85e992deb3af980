// engine_test.cpp — continuous batching on a synthetic checkpoint of the golden size (the tiny
// preset, its config embedded in io/synth, so no ../shared/golden is needed): requests that share
// steps, chunked prefills under a small token budget and a cap on running requests give exactly
// the tokens each gets alone; cancellation, stop ids, length limits and the context check.
#include <gtest/gtest.h>

#include <cmath>
#include <condition_variable>
#include <future>
#include <mutex>
#include <set>

#include "serve/engine.h"
#include "ref/backend.h"
#include "ref/generate.h"
#include "io/synth.h"
#include "test_util.h"

namespace megamoe {
namespace {

struct Result {
    std::vector<int32_t> tokens;
    FinishReason reason = FinishReason::error;
    bool done = false;
};

// Collects one request's tokens; wait() blocks until it finishes.
struct Collector {
    std::mutex m;
    std::condition_variable cv;
    Result r;
    RequestCallbacks callbacks(int stop_after = -1) {
        RequestCallbacks cb;
        cb.on_token = [this, stop_after](const TokenOut& t) {
            std::lock_guard<std::mutex> lk(m);
            r.tokens.push_back(t.id);
            return stop_after < 0 || static_cast<int>(r.tokens.size()) < stop_after;
        };
        cb.on_finish = [this](FinishReason why, const std::string&) {
            std::lock_guard<std::mutex> lk(m);
            r.reason = why;
            r.done = true;
            cv.notify_all();
        };
        return cb;
    }
    Result wait() {
        std::unique_lock<std::mutex> lk(m);
        cv.wait(lk, [&] { return r.done; });
        return r;
    }
};

class EngineTest : public ::testing::Test {
protected:
    // The tiny preset (D 256, 6 layers with ratios 0, 0, 4, 16, 4, 16, vocab 1024, an MTP block),
    // written once per process.
    static inline std::unique_ptr<test::TempDir> dir;
    static void SetUpTestSuite() {
        dir = std::make_unique<test::TempDir>();
        SynthOptions o;
        o.seed = 17;
        write_synthetic_checkpoint(dir->str(), o);
    }
    static void TearDownTestSuite() { dir.reset(); }

    std::vector<int32_t> ids;   // 256 prompt ids in [2, 1024)
    void SetUp() override {
        uint64_t x = 12345;
        for (int i = 0; i < 256; ++i) {
            x = x * 6364136223846793005ULL + 1442695040888963407ULL;
            ids.push_back(2 + static_cast<int32_t>((x >> 33) % 1022));
        }
    }
    std::unique_ptr<Model> load() { return Model::load(dir->str()); }
    std::vector<int32_t> prompt(size_t begin, size_t n) { return {ids.begin() + begin, ids.begin() + begin + n}; }
};

GenerationParams greedy(int64_t max_tokens) {
    GenerationParams p;
    p.sampling.temperature = 0;
    p.max_tokens = max_tokens;
    p.ignore_eos = true;
    return p;
}

TEST_F(EngineTest, BatchedRequestsMatchSoloGreedy) {
    auto solo_model = load();
    const std::vector<std::pair<size_t, size_t>> prompts = {{0, 40}, {10, 3}, {50, 77}, {100, 1}, {3, 20}, {130, 64}};
    std::vector<std::vector<int32_t>> want;
    for (auto [b, n] : prompts) want.push_back(generate_greedy(*solo_model, prompt(b, n), 12, 0, true));

    EngineOptions eo;
    eo.max_batch_tokens = 24;   // forces chunked prefills that share steps with decodes
    eo.max_seqs = 3;            // and a waiting queue
    Engine e(load(), eo);
    std::vector<std::unique_ptr<Collector>> cols;
    for (auto [b, n] : prompts) {
        cols.push_back(std::make_unique<Collector>());
        e.submit(prompt(b, n), greedy(12), cols.back()->callbacks());
    }
    for (size_t i = 0; i < prompts.size(); ++i) {
        Result r = cols[i]->wait();
        EXPECT_EQ(r.reason, FinishReason::length) << i;
        EXPECT_EQ(r.tokens, want[i]) << "request " << i;
    }
    EngineMetrics m = e.metrics();
    EXPECT_EQ(m.requests_total, prompts.size());
    EXPECT_EQ(m.generation_tokens_total, 12 * prompts.size());
    EXPECT_EQ(m.ttft.count, prompts.size());
    EXPECT_EQ(m.tpot.count, 11 * prompts.size());
    EXPECT_EQ(m.running, 0);
    EXPECT_EQ(m.waiting, 0);
}

TEST_F(EngineTest, CancelStopsOnlyThatRequest) {
    EngineOptions eo;
    Engine e(load(), eo);
    Collector a, b;
    std::promise<void> first_token;
    bool signalled = false;
    RequestCallbacks cb = a.callbacks();
    auto inner = cb.on_token;
    cb.on_token = [&](const TokenOut& t) {
        if (!signalled) {
            signalled = true;
            first_token.set_value();
        }
        return inner(t);
    };
    const uint64_t ida = e.submit(prompt(0, 16), greedy(1000), cb);
    e.submit(prompt(20, 16), greedy(20), b.callbacks());
    first_token.get_future().wait();
    e.cancel(ida);
    Result ra = a.wait(), rb = b.wait();
    EXPECT_EQ(ra.reason, FinishReason::cancelled);
    EXPECT_LT(ra.tokens.size(), 1000u);
    EXPECT_EQ(rb.reason, FinishReason::length);
    EXPECT_EQ(rb.tokens.size(), 20u);
    e.cancel(ida);       // unknown now: no effect
    e.cancel(987654);
}

TEST_F(EngineTest, StopIdsCallbacksAndLimits) {
    auto solo_model = load();
    const std::vector<int32_t> free_run = generate_greedy(*solo_model, prompt(0, 10), 8, 0, true);
    Engine e(load(), EngineOptions{});
    // A stop token id: the request ends with it, reason stop.
    GenerationParams p = greedy(8);
    p.stop_token_ids = {free_run[3]};
    Collector c1;
    e.submit(prompt(0, 10), p, c1.callbacks());
    Result r1 = c1.wait();
    EXPECT_EQ(r1.reason, FinishReason::stop);
    EXPECT_EQ(r1.tokens, std::vector<int32_t>(free_run.begin(), free_run.begin() + 4));
    // The token callback asks to stop (a stop string, say).
    Collector c2;
    e.submit(prompt(0, 10), greedy(8), c2.callbacks(/*stop_after=*/2));
    Result r2 = c2.wait();
    EXPECT_EQ(r2.reason, FinishReason::stop);
    EXPECT_EQ(r2.tokens.size(), 2u);
}

TEST_F(EngineTest, RejectsWhatCannotFit) {
    EngineOptions eo;
    eo.max_model_len = 64;
    Engine e(load(), eo);
    Collector c;
    test::expect_error([&] { e.submit(prompt(0, 64), greedy(1), c.callbacks()); },
                       {"This model's maximum context length is 64 tokens", "your request has 64 input tokens"});
    test::expect_error([&] { e.submit(prompt(0, 50), greedy(20), c.callbacks()); },
                       {"maximum context length is 64 tokens. However, you requested 70 tokens (50 in the messages, 20 in "
                        "the completion)"});
    test::expect_error([&] { e.submit({}, greedy(1), c.callbacks()); }, {"empty"});
    test::expect_error([&] { e.submit({5, 1024}, greedy(1), c.callbacks()); }, {"token id 1024"});
    GenerationParams bad = greedy(1);
    bad.sampling.temperature = -1;
    test::expect_error([&] { e.submit({5}, bad, c.callbacks()); }, {"temperature"});
    EXPECT_EQ(e.metrics().requests_total, 0u);
    // Exactly at the limit is fine.
    e.submit(prompt(0, 50), greedy(14), c.callbacks());
    EXPECT_EQ(c.wait().tokens.size(), 14u);
}

// Ids that name no token are masked: never sampled, even at a temperature that makes every
// logit equal, and never listed in top_logprobs, whose logprobs are normalized over the rest.
TEST_F(EngineTest, MaskedIdsAreNeverSampledNorListed) {
    const std::vector<int32_t> allowed = {1, 5, 17, 300, 1023};
    EngineOptions eo;
    for (int32_t id = 0; id < 1024; ++id)
        if (std::find(allowed.begin(), allowed.end(), id) == allowed.end()) eo.masked_token_ids.push_back(id);
    Engine e(load(), eo);
    std::vector<TokenOut> outs;
    std::mutex m;
    Collector c;
    RequestCallbacks cb = c.callbacks();
    cb.on_token = [&](const TokenOut& t) {
        std::lock_guard<std::mutex> lk(m);
        outs.push_back(t);
        return true;
    };
    GenerationParams p;
    p.sampling.temperature = 1e9f;
    p.sampling.seed = 1;
    p.max_tokens = 40;
    p.ignore_eos = true;
    p.top_logprobs = 20;
    e.submit(prompt(0, 8), p, cb);
    EXPECT_EQ(c.wait().reason, FinishReason::length);
    ASSERT_EQ(outs.size(), 40u);
    std::set<int32_t> seen;
    for (const TokenOut& t : outs) {
        seen.insert(t.id);
        EXPECT_NE(std::find(allowed.begin(), allowed.end(), t.id), allowed.end()) << t.id;
        EXPECT_TRUE(std::isfinite(t.logprob));
        ASSERT_EQ(t.top.size(), allowed.size());   // only the unmasked ids, though 20 were asked for
        double total = 0;
        for (const auto& [id, lp] : t.top) {
            EXPECT_NE(std::find(allowed.begin(), allowed.end(), id), allowed.end()) << id;
            total += std::exp(static_cast<double>(lp));
        }
        EXPECT_NEAR(total, 1.0, 1e-4);
    }
    EXPECT_GT(seen.size(), 2u);   // really sampled, not stuck on one id
    test::expect_error([&] { EngineOptions bad; bad.masked_token_ids = {1024}; Engine(load(), bad); },
                       {"masked_token_ids", "1024"});
}

// A callback that throws ends its request with an error; the engine thread lives on.
TEST_F(EngineTest, CallbackExceptionsEndOnlyThatRequest) {
    Engine e(load(), EngineOptions{});
    std::mutex m;
    std::condition_variable cv;
    std::string error;
    FinishReason why = FinishReason::stop;
    bool done = false;
    RequestCallbacks cb;
    cb.on_token = [](const TokenOut&) -> bool { throw Error("the detokenizer does not know this id"); };
    cb.on_finish = [&](FinishReason r, const std::string& msg) {
        std::lock_guard<std::mutex> lk(m);
        why = r;
        error = msg;
        done = true;
        cv.notify_all();
    };
    e.submit(prompt(0, 8), greedy(5), cb);
    {
        std::unique_lock<std::mutex> lk(m);
        cv.wait(lk, [&] { return done; });
    }
    EXPECT_EQ(why, FinishReason::error);
    EXPECT_NE(error.find("does not know this id"), std::string::npos) << error;
    // on_finish may throw too; the next request still runs.
    RequestCallbacks bad_finish;
    bad_finish.on_finish = [](FinishReason, const std::string&) { throw Error("on_finish failed"); };
    e.submit(prompt(0, 8), greedy(2), bad_finish);
    Collector ok;
    e.submit(prompt(0, 8), greedy(3), ok.callbacks());
    Result r = ok.wait();
    EXPECT_EQ(r.reason, FinishReason::length);
    EXPECT_EQ(r.tokens.size(), 3u);
}

// A pool of 6 blocks of 16 positions (the tiny config's ratios are 4 and 16) cannot hold four
// 44-token requests at once: running requests are preempted (state dropped, recomputed later),
// and every request still gets exactly the tokens it gets alone, greedy and seeded sampling alike
// (the sampling key is (seed, index in the output), so recomputation draws the same numbers).
TEST_F(EngineTest, PreemptionRecomputesAndKeepsEveryOutput) {
    auto solo_model = load();
    const std::vector<std::pair<size_t, size_t>> prompts = {{0, 20}, {30, 19}, {60, 21}, {90, 18}};
    std::vector<std::vector<int32_t>> want;
    for (auto [b, n] : prompts) want.push_back(generate_greedy(*solo_model, prompt(b, n), 24, 0, true));
    GenerationParams sampled = greedy(24);
    sampled.sampling.temperature = 0.8f;
    sampled.sampling.seed = 7;
    // The sampled outputs with room for everything, then with preemption.
    auto run = [&](int64_t state_tokens, bool prefix, EngineMetrics* metrics) {
        auto model = load();
        auto backend = make_cpu_backend(*model, 4, 24, 0, state_tokens, 16);
        EngineOptions eo;
        eo.max_batch_tokens = 24;
        eo.max_seqs = 4;
        eo.prefix_caching = prefix;
        Engine e(std::move(model), std::move(backend), eo);
        std::vector<std::unique_ptr<Collector>> cols;
        for (auto [b, n] : prompts) {
            cols.push_back(std::make_unique<Collector>());
            e.submit(prompt(b, n), greedy(24), cols.back()->callbacks());
            cols.push_back(std::make_unique<Collector>());
            e.submit(prompt(b, n), sampled, cols.back()->callbacks());
        }
        std::vector<Result> out;
        for (auto& c : cols) out.push_back(c->wait());
        if (metrics) *metrics = e.metrics();
        return out;
    };
    const std::vector<Result> roomy = run(0, false, nullptr);
    for (bool prefix : {false, true}) {
        EngineMetrics m;
        const std::vector<Result> tight = run(96, prefix, &m);
        for (size_t i = 0; i < prompts.size(); ++i) {
            EXPECT_EQ(tight[2 * i].reason, FinishReason::length) << i;
            EXPECT_EQ(tight[2 * i].tokens, want[i]) << "greedy request " << i << ", prefix caching " << prefix;
            EXPECT_EQ(tight[2 * i + 1].reason, FinishReason::length) << i;
            EXPECT_EQ(tight[2 * i + 1].tokens, roomy[2 * i + 1].tokens) << "sampled request " << i;
        }
        EXPECT_GT(m.preemptions_total, 0u) << "the pool was meant to be too small for all at once";
        EXPECT_EQ(m.running, 0);
        EXPECT_EQ(m.waiting, 0);
        EXPECT_EQ(m.generation_tokens_total, 24u * 2 * prompts.size());
    }
}

// Automatic prefix caching: a prompt that begins with an earlier prompt starts from the snapshot
// taken where that prompt's last whole block ended; the next turn of a chat (the earlier prompt,
// its answer, a new message) starts from the snapshot taken while the answer was generated. The
// outputs equal those computed from scratch, and the metrics count the reused tokens.
TEST_F(EngineTest, PrefixCacheReusesEarlierPromptsAndAnswers) {
    auto solo_model = load();
    auto model = load();
    auto backend = make_cpu_backend(*model, 4, 64, 0, 0, 16);
    EngineOptions eo;
    eo.max_batch_tokens = 64;
    eo.max_seqs = 4;
    Engine e(std::move(model), std::move(backend), eo);
    auto run = [&](const std::vector<int32_t>& p, int64_t n) {
        Collector c;
        e.submit(p, greedy(n), c.callbacks());
        Result r = c.wait();
        EXPECT_EQ(r.reason, FinishReason::length);
        EXPECT_EQ(r.tokens, generate_greedy(*solo_model, p, n, 0, true)) << "prompt of " << p.size();
        return r.tokens;
    };
    // Turn 1: 40 prompt tokens (a snapshot at 32), 12 generated (one at 48).
    const std::vector<int32_t> a = prompt(0, 40);
    const std::vector<int32_t> answer = run(a, 12);
    EngineMetrics m = e.metrics();
    EXPECT_EQ(m.prefix_hits_tokens, 0u);
    EXPECT_EQ(m.prefix_queries_tokens, 40u);
    EXPECT_EQ(m.prefix_entries, 2);
    // The same 40 tokens and 5 others: 32 reused.
    std::vector<int32_t> b = a;
    for (int32_t t : prompt(200, 5)) b.push_back(t);
    run(b, 6);
    m = e.metrics();
    EXPECT_EQ(m.prefix_hits_tokens, 32u);
    EXPECT_EQ(m.prefix_hit_requests, 1u);
    // The next turn: prompt, answer and 3 new tokens (55): the snapshot at 48 holds 40 + 8 of them.
    std::vector<int32_t> c = a;
    c.insert(c.end(), answer.begin(), answer.end());
    for (int32_t t : prompt(220, 3)) c.push_back(t);
    run(c, 6);
    m = e.metrics();
    EXPECT_EQ(m.prefix_hits_tokens, 32u + 48u);
    EXPECT_EQ(m.prefix_hit_requests, 2u);
    // A prompt of exactly the cached 32 tokens is not taken whole from the cache (its last
    // token's logits are needed), and no snapshot ends earlier: nothing is reused.
    run(prompt(0, 32), 3);
    m = e.metrics();
    EXPECT_EQ(m.prefix_hits_tokens, 32u + 48u);
    EXPECT_EQ(m.prefix_queries_tokens, 40u + 45u + 55u + 32u);
    // Turned off: nothing is looked up.
    auto model2 = load();
    auto backend2 = make_cpu_backend(*model2, 4, 64, 0, 0, 16);
    eo.prefix_caching = false;
    Engine off(std::move(model2), std::move(backend2), eo);
    for (int k = 0; k < 2; ++k) {
        Collector col;
        off.submit(a, greedy(3), col.callbacks());
        col.wait();
    }
    EXPECT_EQ(off.metrics().prefix_queries_tokens, 0u);
    EXPECT_EQ(off.metrics().prefix_entries, 0);
}

// A pool smaller than the model's context caps the context: a request that could never fit is
// refused at submission, in vLLM's words, instead of waiting forever.
TEST_F(EngineTest, RequestsLongerThanThePoolAreRefused) {
    auto model = load();
    auto backend = make_cpu_backend(*model, 2, 64, 0, 64, 16);
    Engine e(std::move(model), std::move(backend), EngineOptions{});
    EXPECT_EQ(e.max_model_len(), 64);
    Collector c;
    test::expect_error([&] { e.submit(prompt(0, 50), greedy(20), c.callbacks()); },
                       {"maximum context length is 64 tokens", "you requested 70 tokens"});
    e.submit(prompt(0, 50), greedy(14), c.callbacks());
    EXPECT_EQ(c.wait().tokens.size(), 14u);
}

}  // namespace
}  // namespace megamoe
