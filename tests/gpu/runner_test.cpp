// runner_test.cpp — the GPU forward against the CPU specification and the goldens, at the levels
// of gpu-runner-design.md: per state (a slot's device state equals the CPU's), per layer (teacher
// forced: every named intermediate close to the CPU's), whole model (golden logits statistics,
// greedy ids up to the first low-margin position), and graph replay equal to eager execution.
// Every test skips without a GPU (or without ../shared/golden).
#include <gtest/gtest.h>

#ifdef MEGAMOE_HAVE_CUDA

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <tuple>
#include <limits>
#include <map>
#include <sys/wait.h>
#include <fstream>
#include <functional>
#include <filesystem>
#include <memory>
#include <numeric>

#include "cuda/kv_row.h"
#include "dist/load.h"
#include "dist/partition.h"
#if defined(MEGAMOE_HAVE_NCCL)
#include "dist/nccl/exchange.h"
#endif
#include "gpu/device_model.h"
#include "cuda/linear.h"
#include "gpu/backend.h"
#include "gpu/multi_backend.h"
#include "gpu/runner.h"
#include "gpu/state_pool.h"
#include "io/formats.h"
#include "io/safetensors.h"
#include "io/synth.h"
#include "ref/generate.h"
#include "ref/model.h"
#include "ref/trace.h"
#include "serve/engine.h"
#include "serve/sampler.h"
#include "ref/spec_exact.h"
#include "test_util.h"

namespace megamoe {
namespace {

struct Case {
    std::unique_ptr<Model> model;
    std::unique_ptr<SafetensorsFile> file;
    std::vector<int32_t> input_ids, greedy_ids;
    const float* golden_logits() const { return file->view(*file->find("logits")).as<float>(); }
    // The CPU reference's traces of one full pass over input_ids: (name, layer) -> [T, width].
    std::map<std::pair<std::string, int64_t>, std::vector<float>> f32;
    std::map<std::pair<std::string, int64_t>, std::vector<int32_t>> i32;
    std::map<std::pair<std::string, int64_t>, int64_t> width;
    std::vector<float> cpu_logits;   // [T, V]
};

std::vector<int32_t> ids_of(const SafetensorsFile& f, const char* name) {
    Tensor t = f.view(*f.find(name));
    std::vector<int32_t> ids;
    for (int64_t i = 0; i < t.numel(); ++i) ids.push_back(static_cast<int32_t>(t.as<int64_t>()[i]));
    return ids;
}

const Case* load_case(const std::string& name) {
    static std::map<std::string, std::unique_ptr<Case>> cache;
    if (!test::have_golden(name)) return nullptr;
    auto& c = cache[name];
    if (!c) {
        c = std::make_unique<Case>();
        c->model = Model::load(test::golden_dir(name) + "/model");
        c->file = std::make_unique<SafetensorsFile>(test::golden_dir(name) + "/golden.safetensors");
        c->input_ids = ids_of(*c->file, "input_ids");
        c->greedy_ids = ids_of(*c->file, "greedy_ids");
        SequenceState st(c->model->cfg);
        std::vector<SequenceChunk> batch{{&st, c->input_ids}};
        ForwardOptions opt;
        opt.all_logits = true;
        Case* cp = c.get();
        opt.probe = [cp](TraceView& v) {
            const auto key = std::make_pair(std::string(v.name), v.layer);
            const size_t n = static_cast<size_t>(v.rows * v.width);
            cp->width[key] = v.width;
            if (v.dtype == DType::i32)
                cp->i32[key].assign(v.i32(), v.i32() + n);
            else
                cp->f32[key].assign(v.f32(), v.f32() + n);
        };
        forward(*c->model, batch, opt, c->cpu_logits);
    }
    return c.get();
}

using test::cosine;

int64_t argmax_row(const float* x, int64_t n) {
    int64_t b = 0;
    for (int64_t i = 1; i < n; ++i)
        if (x[i] > x[b]) b = i;
    return b;
}

// Per-position logits statistics of `got` against `ref` ([T, V]).
struct LogitStats {
    double mean_cos = 0, min_cos = 1, top1 = 0, max_abs = 0;
};
LogitStats compare_logits(const std::vector<float>& got, const float* ref, int64_t T, int64_t V) {
    LogitStats s;
    int64_t agree = 0;
    for (int64_t t = 0; t < T; ++t) {
        const double c = cosine(got.data() + t * V, ref + t * V, V);
        s.mean_cos += c / static_cast<double>(T);
        s.min_cos = std::min(s.min_cos, c);
        agree += argmax_row(got.data() + t * V, V) == argmax_row(ref + t * V, V);
    }
    s.top1 = static_cast<double>(agree) / static_cast<double>(T);
    s.max_abs = test::max_abs_diff(got.data(), ref, static_cast<size_t>(T * V));
    return s;
}

gpu::RunnerOptions small_options() {
    gpu::RunnerOptions o;
    o.max_seqs = 4;
    o.max_batch_tokens = 256;
    o.max_logit_rows = 256;
    o.max_model_len = 512;
    return o;
}

class GpuRunner : public ::testing::TestWithParam<std::string> {
protected:
    const Case* c = nullptr;
    void SetUp() override {
        if (!cuda::gpu_available()) GTEST_SKIP() << "no GPU";
        c = load_case(GetParam());
        if (!c) GTEST_SKIP() << "no golden case " << GetParam();
    }
    int64_t V() const { return c->model->cfg.vocab_size; }
    int64_t T() const { return static_cast<int64_t>(c->input_ids.size()); }
    // Runners whose options differ only in how the work is scheduled: a prefill of the golden
    // sequence's first 40 tokens, then 24 batch-1 steps on each; every step's logits must equal the
    // first runner's bit for bit (`what[i]` names runner i in a failure).
    void expect_same_logits(gpu::Runner* const (&all)[3], const char* const (&what)[3]) {
        int32_t slot[3];
        for (int i = 0; i < 3; ++i) {
            slot[i] = all[i]->open();
            ASSERT_TRUE(all[i]->reserve(slot[i], 128));
        }
        std::vector<float> lg[3];
        const std::vector<int32_t> prompt(c->input_ids.begin(), c->input_ids.begin() + 40);
        for (int step = 0; step <= 24; ++step) {
            for (int i = 0; i < 3; ++i) {
                std::vector<gpu::RunnerChunk> ch{
                    {slot[i], step == 0 ? prompt : std::vector<int32_t>{c->input_ids[static_cast<size_t>(39 + step)]}}};
                all[i]->step(ch, false, lg[i]);
            }
            ASSERT_EQ(lg[0].size(), static_cast<size_t>(V())) << "step " << step;
            for (int i = 1; i < 3; ++i)
                ASSERT_EQ(std::memcmp(lg[0].data(), lg[i].data(), lg[0].size() * 4), 0) << what[i] << ", step " << step;
        }
    }
};

// The CPU specification with bf16 rounding where the official code keeps activations in bf16
// (the residual streams, the sublayers' normalized inputs and their outputs): how far bf16
// activations alone take the logits from the f32 golden on this case.
LogitStats bf16_specification(const Case& c) {
    SequenceState st(c.model->cfg);
    std::vector<SequenceChunk> batch{{&st, c.input_ids}};
    ForwardOptions opt;
    opt.all_logits = true;
    opt.probe = [](TraceView& v) {
        const std::string n = v.name;
        if (v.dtype != DType::f32 || n == trace_names::final_norm) return;
        for (int64_t i = 0; i < v.rows * v.width; ++i) v.f32()[i] = bf16_to_f32(f32_to_bf16(v.f32()[i]));
        v.modified = true;
    };
    std::vector<float> logits;
    forward(*c.model, batch, opt, logits);
    return compare_logits(logits, c.golden_logits(), static_cast<int64_t>(c.input_ids.size()), c.model->cfg.vocab_size);
}

// The bar of the golden statistics, from the CPU specification with bf16 activations on the case:
// the issue's targets (mean cosine ≥ 0.999, top-1 ≥ 98%) where the specification reaches them, else
// within 0.0005 cosine and 2 points of top-1 of the specification.
struct GoldenBar {
    bool targets;
    double cos, top1;
};
GoldenBar golden_bar(const LogitStats& emu) {
    const bool targets = emu.mean_cos >= 0.999 && emu.top1 >= 0.98;
    return {targets, targets ? 0.999 : emu.mean_cos - 0.0005, targets ? 0.98 : emu.top1 - 0.02};
}

// The schedules the golden statistics are taken over: one pass, decode after a prefill, chunks.
struct NamedSchedule {
    const char* name;
    Schedule s;
};
const NamedSchedule kGoldenSchedules[] = {
    {"full pass", {-1, 0}}, {"decode after prefill 100", {100, 0}}, {"chunks of 37", {-1, 37}}};

// Level 4: whole model against the golden logits, for the full pass and the cached schedules.
// Targets: mean cosine ≥ 0.999 and top-1 agreement ≥ 98%. On a case where the specification
// itself, with bf16 activations at the official code's rounding sites, does not reach them (a
// random-weight model with many near ties: one bf16 rounding flips several percent of the
// top-1 choices), the GPU must instead stay within 0.0005 of its cosine and 2 points of its
// top-1 agreement; the test prints which bar applies.
TEST_P(GpuRunner, GoldenLogitsStatistics) {
    auto b = gpu::make_gpu_backend(*c->model, small_options());
    const LogitStats emu = bf16_specification(*c);
    const auto [targets, bar_cos, bar_top1] = golden_bar(emu);
    std::printf("[ %s ] CPU specification with bf16 activations: mean cosine %.6f, top-1 %.2f%% -> bar: cosine >= %.6f, "
                "top-1 >= %.2f%% (%s)\n",
                GetParam().c_str(), emu.mean_cos, 100 * emu.top1, bar_cos, 100 * bar_top1,
                targets ? "the issue's targets" : "bf16 noise floor of this case");
    for (const auto& sc : kGoldenSchedules) {
        const std::vector<float> got = sequence_logits(*b, c->input_ids, sc.s);
        ASSERT_EQ(got.size(), static_cast<size_t>(T() * V())) << sc.name;
        const LogitStats st = compare_logits(got, c->golden_logits(), T(), V());
        std::printf("[ %s | %s ] logits vs golden: mean cosine %.6f, min %.6f, top-1 agreement %.2f%%, max |diff| %.4f\n",
                    GetParam().c_str(), sc.name, st.mean_cos, st.min_cos, 100 * st.top1, st.max_abs);
        EXPECT_GE(st.mean_cos, bar_cos) << sc.name;
        EXPECT_GE(st.top1, bar_top1) << sc.name;
    }
}

// Steps of ≥ cuda::kLtBf16MinM tokens: the bf16-input linears (all of them in exact numerics)
// through cuBLASLt's BF16 GEMM (RunnerOptions::lt_bf16; fp8 weights expanded per call), against the
// same runner on megamoe's kernels. Both sum exact products in f32 (another order), so both must
// meet GoldenLogitsStatistics' bar on the full pass (one 256-token step) and agree with each other
// to within the bf16 noise (0.0005 cosine, 2 points of top-1), with the cuBLASLt launches counted.
TEST_P(GpuRunner, LtBf16LinearsKeepTheGoldenStatistics) {
    gpu::RunnerOptions on = small_options(), off = small_options();
    off.lt_bf16 = false;
    gpu::Runner ron(*c->model, on), roff(*c->model, off);
    const std::vector<float> a = gpu::sequence_logits_mtp(ron, c->input_ids, Schedule{-1, 0}).logits;
    const std::vector<float> b = gpu::sequence_logits_mtp(roff, c->input_ids, Schedule{-1, 0}).logits;
    const LogitStats sa = compare_logits(a, c->golden_logits(), T(), V());
    const LogitStats sb = compare_logits(b, c->golden_logits(), T(), V());
    const LogitStats ab = compare_logits(a, b.data(), T(), V());
    const LogitStats emu = bf16_specification(*c);
    const auto [targets, bar_cos, bar_top1] = golden_bar(emu);
    std::printf("[ %s | full pass ] cuBLASLt BF16 linears vs golden: cosine %.6f, top-1 %.2f%%; megamoe's kernels: "
                "%.6f, %.2f%%; between them: cosine %.6f (min %.6f), top-1 %.2f%%; cuBLASLt BF16 launches %lld\n",
                GetParam().c_str(), sa.mean_cos, 100 * sa.top1, sb.mean_cos, 100 * sb.top1, ab.mean_cos, ab.min_cos,
                100 * ab.top1, static_cast<long long>(ron.lt_bf16_launches()));
    EXPECT_GE(sa.mean_cos, bar_cos);
    EXPECT_GE(sa.top1, bar_top1);
    EXPECT_GE(sa.mean_cos, sb.mean_cos - 0.0005);
    EXPECT_GE(sa.top1, sb.top1 - 0.02);
    EXPECT_GT(ron.lt_bf16_launches(), 0) << "the cuBLASLt BF16 path did not run";
    EXPECT_EQ(roff.lt_bf16_launches(), 0) << "lt_bf16 off";
}

// The attention's 64-head CTAs (RunnerOptions::attn_wide = 1; the tiny models' 8-16 heads run as
// zero-padded rows of one CTA) at every step of every schedule, against the golden and against
// the 16-head kernel (attn_wide = 0): the same arithmetic in another f32 order, so both must meet
// GoldenLogitsStatistics' bar and agree with each other to within the bf16 noise (0.0005 cosine,
// 2 points of top-1). At V4's 64 heads the runner takes it by itself from a wave of tokens on.
TEST_P(GpuRunner, WideAttentionKeepsTheGoldenStatistics) {
    gpu::RunnerOptions wide = small_options(), narrow = small_options();
    wide.attn_wide = 1;
    narrow.attn_wide = 0;
    auto bw = gpu::make_gpu_backend(*c->model, wide);
    auto bn = gpu::make_gpu_backend(*c->model, narrow);
    const LogitStats emu = bf16_specification(*c);
    const auto [targets, bar_cos, bar_top1] = golden_bar(emu);
    for (const auto& sc : kGoldenSchedules) {
        const std::vector<float> a = sequence_logits(*bw, c->input_ids, sc.s);
        const std::vector<float> b = sequence_logits(*bn, c->input_ids, sc.s);
        const LogitStats sa = compare_logits(a, c->golden_logits(), T(), V());
        const LogitStats sb = compare_logits(b, c->golden_logits(), T(), V());
        const LogitStats ab = compare_logits(a, b.data(), T(), V());
        std::printf("[ %s | %s ] 64-head attention vs golden: cosine %.6f, top-1 %.2f%%; 16-head: %.6f, %.2f%%; "
                    "between them: cosine %.6f (min %.6f), top-1 %.2f%%, max |diff| %.3g\n",
                    GetParam().c_str(), sc.name, sa.mean_cos, 100 * sa.top1, sb.mean_cos, 100 * sb.top1, ab.mean_cos,
                    ab.min_cos, 100 * ab.top1, ab.max_abs);
        EXPECT_GE(sa.mean_cos, bar_cos) << sc.name;
        EXPECT_GE(sa.top1, bar_top1) << sc.name;
        EXPECT_GE(sa.mean_cos, sb.mean_cos - 0.0005) << sc.name;
        EXPECT_GE(sa.top1, sb.top1 - 0.02) << sc.name;
    }
}

// The CPU specification of the MTP logits with bf16 activations at the official code's rounding
// sites (the same probe as bf16_specification, on the main pass and the MTP block).
LogitStats bf16_mtp_specification(const Model& m, const std::vector<int32_t>& tokens, const float* golden) {
    const int64_t T = static_cast<int64_t>(tokens.size());
    Probe round = [](TraceView& v) {
        const std::string n = v.name;
        if (v.dtype != DType::f32 || n == trace_names::final_norm || n == trace_names::mtp_norm) return;
        for (int64_t i = 0; i < v.rows * v.width; ++i) v.f32()[i] = bf16_to_f32(f32_to_bf16(v.f32()[i]));
        v.modified = true;
    };
    SequenceState st(m.cfg);
    std::vector<SequenceChunk> batch{{&st, tokens}};
    std::vector<float> streams, logits, mtp;
    ForwardOptions opt;
    opt.all_logits = true;
    opt.probe = round;
    opt.streams_out = &streams;
    forward(m, batch, opt, logits);
    std::vector<MtpChunk> mb{{&st, streams.data(), std::vector<int32_t>(tokens.begin() + 1, tokens.end())}};
    ForwardOptions mopt;
    mopt.all_logits = true;
    mopt.probe = round;
    mtp_forward(m, mb, mopt, mtp);
    return compare_logits(mtp, golden, T - 1, m.cfg.vocab_size);
}

// The MTP block's logits against DeepSeek's official code (mtp.safetensors), for the full pass and
// cached schedules, with the bar of GoldenLogitsStatistics: the issue's targets, or within 0.0005
// cosine and 2 points of top-1 of the CPU specification with bf16 activations on this case.
TEST_P(GpuRunner, MtpLogitsMatchGolden) {
    const std::string path = test::golden_dir(GetParam()) + "/mtp.safetensors";
    if (!std::filesystem::exists(path)) MEGAMOE_MISSING_GOLDEN() << "no " << path;
    ASSERT_TRUE(c->model->w.mtp.has_value());
    SafetensorsFile f(path);
    const std::vector<int32_t> ids = ids_of(f, "input_ids");
    const float* golden = f.view(*f.find("mtp_logits")).as<float>();
    const int64_t Tm = static_cast<int64_t>(ids.size()) - 1;
    const LogitStats emu = bf16_mtp_specification(*c->model, ids, golden);
    const auto [targets, bar_cos, bar_top1] = golden_bar(emu);
    std::printf("[ %s | mtp ] CPU specification with bf16 activations: mean cosine %.6f, top-1 %.2f%% -> bar: cosine "
                ">= %.6f, top-1 >= %.2f%%\n",
                GetParam().c_str(), emu.mean_cos, 100 * emu.top1, bar_cos, 100 * bar_top1);
    gpu::Runner run(*c->model, small_options());
    const struct {
        const char* name;
        Schedule s;
    } schedules[] = {{"full pass", {-1, 0}}, {"decode after prefill 127", {127, 0}}, {"chunks of 37", {-1, 37}}};
    for (const auto& sc : schedules) {
        const std::vector<float> got = gpu::sequence_logits_mtp(run, ids, sc.s).mtp_logits;
        ASSERT_EQ(got.size(), static_cast<size_t>(Tm * V())) << sc.name;
        const LogitStats st = compare_logits(got, golden, Tm, V());
        std::printf("[ %s | mtp | %s ] mtp_logits vs official: mean cosine %.6f, min %.6f, top-1 %.2f%%, max |diff| %.4f\n",
                    GetParam().c_str(), sc.name, st.mean_cos, st.min_cos, 100 * st.top1, st.max_abs);
        EXPECT_GE(st.mean_cos, bar_cos) << sc.name;
        EXPECT_GE(st.top1, bar_top1) << sc.name;
    }
    // Bad input changes nothing: next lists of the wrong length, ids outside the vocabulary.
    const int32_t slot = run.open();
    ASSERT_TRUE(run.reserve(slot, 8));
    std::vector<float> l, m;
    test::expect_error([&] { run.step_mtp({{slot, {1, 2}}}, {{3}}, l, m); }, {"next tokens"});
    test::expect_error([&] { run.step_mtp({{slot, {1}}}, {{static_cast<int32_t>(V())}}, l, m); },
                       {"next token id", "vocabulary"});
    EXPECT_EQ(run.n_past(slot), 0);
}

// Rollback: save, a two-token step, restore, then the first token alone leaves the slot's state as
// running that token alone does, bit for bit; restore_state checks its position.
TEST_P(GpuRunner, RestoreStateUndoesSteps) {
    gpu::RunnerOptions o = small_options();
    o.rollback = true;
    gpu::Runner run(*c->model, o);
    const int32_t a = run.open(), b = run.open();
    ASSERT_TRUE(run.reserve(a, 64) && run.reserve(b, 64));
    const std::vector<int32_t> prompt(c->input_ids.begin(), c->input_ids.begin() + 37);
    std::vector<float> la, lb;
    run.step({{a, prompt}, {b, prompt}}, false, la);
    run.save_state(a);
    run.step({{a, {c->input_ids[37], c->input_ids[38]}}}, false, la);
    EXPECT_EQ(run.n_past(a), 39);
    test::expect_error([&] { run.restore_state(a, 38); }, {"saved at position 37"});
    run.restore_state(a, 37);
    EXPECT_EQ(run.n_past(a), 37);
    run.step({{a, {c->input_ids[37]}}}, false, la);
    run.step({{b, {c->input_ids[37]}}}, false, lb);
    EXPECT_EQ(la, lb);
    const SequenceState sa = run.download_state(a), sb = run.download_state(b);
    ASSERT_EQ(sa.layers.size(), sb.layers.size());
    for (size_t l = 0; l < sa.layers.size(); ++l) {
        EXPECT_EQ(sa.layers[l].window, sb.layers[l].window) << "layer " << l;
        EXPECT_EQ(sa.layers[l].comp.pending_kv, sb.layers[l].comp.pending_kv) << "layer " << l;
        EXPECT_EQ(sa.layers[l].comp.rows, sb.layers[l].comp.rows) << "layer " << l;
        EXPECT_EQ(sa.layers[l].index_comp.rows, sb.layers[l].index_comp.rows) << "layer " << l;
    }
    gpu::Runner plain(*c->model, small_options());
    const int32_t p = plain.open();
    ASSERT_TRUE(plain.reserve(p, 8));
    test::expect_error([&] { plain.save_state(p); }, {"rollback"});
}

// Speculative decoding on the GPU (K = 1, greedy): the same ids as the runner's own greedy
// decoding, and every round accounted for.
TEST_P(GpuRunner, SpeculativeGreedyEqualsGreedy) {
    const size_t P = 16;
    const int64_t N = 40;
    const std::vector<int32_t> prompt(c->input_ids.begin(), c->input_ids.begin() + P);
    auto b = gpu::make_gpu_backend(*c->model, small_options());
    const std::vector<int32_t> plain = generate_greedy(*b, prompt, N, 0, true);
    gpu::RunnerOptions o = small_options();
    o.rollback = true;
    gpu::Runner run(*c->model, o);
    for (int64_t K = 1; K <= kMaxSpeculativeTokens; ++K)
        for (int64_t chunk : {int64_t{0}, int64_t{5}}) {
            const SpeculativeResult r = gpu::generate_speculative(run, prompt, N, K, chunk, true);
            std::printf("[ %s ] GPU speculative K=%ld (chunk %ld): %ld rounds, %ld of %ld drafts accepted, %ld re-run "
                        "steps\n",
                        GetParam().c_str(), static_cast<long>(K), static_cast<long>(chunk), static_cast<long>(r.stats.rounds),
                        static_cast<long>(r.stats.accepted), static_cast<long>(r.stats.drafted),
                        static_cast<long>(r.stats.rerun_steps));
            EXPECT_EQ(r.tokens, plain) << "K " << K << " chunk " << chunk;
            EXPECT_LE(r.stats.drafted, K * r.stats.rounds);
            EXPECT_GE(r.stats.drafted, r.stats.rounds);
            if (K == 1) {
                EXPECT_EQ(r.stats.rerun_steps, 0) << "one draft is always rewound: no re-run";
            }
            EXPECT_EQ(r.stats.round_tokens, r.stats.rounds + r.stats.accepted);
        }
    test::expect_error([&] { gpu::generate_speculative(run, prompt, N, 4, 0, true); }, {"1 to 3"});
}

// Sampled speculative decoding on the GPU keeps the main model's distribution (the CPU test
// Golden/SpecCase.SampledDistributionIsTheMainModels, here through gpu::generate_speculative and the
// device's rule, cuda::spec_accept_rows): the rank bucket of the second sampled token b under the
// main model's p(. | prompt, a), a the first, over n seeded runs at temperature 1, against its exact
// distribution from the CPU reference, within the Bretagnolle-Huber-Carol bound at δ = 1e-6 per
// check. (The GPU's own logits differ from the CPU's by the bf16 noise; the bucket probabilities
// move by far less than the bound.) The rule's acceptance rate must be its exact probability,
// α = Σ_a p(a) Σ_v min(p(v | a), q(v | a)) with q the MTP block's distribution after a (CPU), within
// Hoeffding's bound at δ = 1e-6 plus 0.02 for the GPU's bf16 logits: a rule checking the draft
// against another q (wrong kept rows) accepts at another rate, and the bucket statistic alone would
// not see it. Runs with the same seed are the same.
TEST_P(GpuRunner, SpeculativeSampledDistributionIsTheMainModels) {
    const Model& m = *c->model;
    const std::vector<int32_t> prompt(c->input_ids.begin(), c->input_ids.begin() + 6);
    SamplingParams sp;
    sp.temperature = 1.0f;
    // Exact bucket probabilities, each a's bucket map, and the first draft's acceptance probability
    // (the CPU reference).
    const test::SpecExact ex = test::spec_exact(m, prompt, sp);
    const std::vector<std::vector<int>>& bucket_of = ex.bucket_of;
    const std::vector<double>& exact = ex.exact;
    const double alpha = ex.alpha;
    gpu::RunnerOptions o = small_options();
    o.rollback = true;
    gpu::Runner run(m, o);
    const int64_t n = 2400;
    const double lambda = test::l1_bound(test::kRankBuckets, n, 1e-6);
    for (int64_t K : {int64_t{1}, int64_t{3}}) {
        std::vector<int64_t> count(test::kRankBuckets, 0);
        SpeculativeStats total;
        int64_t first_accepted = 0;
        for (int64_t i = 0; i < n; ++i) {
            SampleSpec s{1.0f};
            s.seed = 5000 + static_cast<uint64_t>(i);
            const SpeculativeResult r = gpu::generate_speculative(run, prompt, 2, K, 0, true, &s);
            ASSERT_EQ(r.tokens.size(), 2u);
            ++count[static_cast<size_t>(bucket_of[static_cast<size_t>(r.tokens[0])][static_cast<size_t>(r.tokens[1])])];
            first_accepted += r.stats.accepted > 0;
            total.drafted += r.stats.drafted, total.accepted += r.stats.accepted, total.rounds += r.stats.rounds;
        }
        double d = 0.0;
        for (int b = 0; b < test::kRankBuckets; ++b)
            d += std::abs(static_cast<double>(count[static_cast<size_t>(b)]) / static_cast<double>(n) - exact[static_cast<size_t>(b)]);
        // The first round's d_1 decision: accepted when the round kept a draft (K = 1: every draft).
        const double first_rate = static_cast<double>(first_accepted) / static_cast<double>(n);
        const double hoeffding = std::sqrt(std::log(2.0 / 1e-6) / (2.0 * static_cast<double>(n)));
        std::printf("[ %s ] GPU sampled speculative K=%ld: L1 to the exact distribution %.4f (bound %.4f, n %ld); "
                    "acceptance %ld/%ld = %.3f; d_1 accepted in %.4f of the runs, exact probability %.4f (bound %.4f)\n",
                    GetParam().c_str(), static_cast<long>(K), d, lambda, static_cast<long>(n),
                    static_cast<long>(total.accepted), static_cast<long>(total.drafted), total.acceptance_rate(),
                    first_rate, alpha, hoeffding + 0.02);
        EXPECT_LT(d, lambda) << "K " << K;
        EXPECT_LT(std::abs(first_rate - alpha), hoeffding + 0.02) << "K " << K;
        EXPECT_GT(total.accepted, 0) << "K " << K;
        EXPECT_LT(total.accepted, total.drafted) << "K " << K;
    }
    // Reproducible: a longer run twice with one seed, once with another.
    SampleSpec s{1.0f};
    s.seed = 77;
    const SpeculativeResult a = gpu::generate_speculative(run, prompt, 32, 3, 0, true, &s);
    const SpeculativeResult a2 = gpu::generate_speculative(run, prompt, 32, 3, 0, true, &s);
    s.seed = 78;
    const SpeculativeResult other = gpu::generate_speculative(run, prompt, 32, 3, 0, true, &s);
    EXPECT_EQ(a.tokens, a2.tokens);
    EXPECT_NE(a.tokens, other.tokens);
    EXPECT_GT(a.stats.accepted, 0);
    std::printf("[ %s ] GPU sampled speculative K=3, 32 tokens: acceptance %ld/%ld, %.2f tokens per verification step\n",
                GetParam().c_str(), static_cast<long>(a.stats.accepted), static_cast<long>(a.stats.drafted),
                a.stats.tokens_per_round());
}

// Chained drafts (K > 1): Runner::draft_chain against the CPU's chain (ref/speculative.cpp: the MTP
// block fed its own pre-head streams and the previous draft, on a scratch copy of its state), and
// the state it leaves: a runner that chained and one that did not give the same MTP logits, bit
// for bit, over the next positions (the rows chained positions overwrite are put back; with
// W = 16 and the prompt lengths below, the next query reads the row chained step 2 overwrote).
TEST_P(GpuRunner, ChainedDraftsMatchCpuAndLeaveTheState) {
    Model& m = *c->model;
    const ModelConfig& cfg = m.cfg;
    ASSERT_TRUE(m.w.mtp.has_value());
    const int64_t Vn = V(), HD = cfg.hc_mult * cfg.hidden_size, steps = 2;
    gpu::RunnerOptions o = small_options();
    o.rollback = true;
    gpu::Runner a(m, o), b(m, o);
    const SampleSpec greedy{0.0f};
    std::vector<std::vector<int32_t>> chained;
    test::expect_error([&] { a.draft_chain({{0, 0, 1, greedy}}, 1, chained); }, {"step_spec"});
    double cos_sum = 0, spec_sum = 0;
    int cos_n = 0;
    for (size_t P : {size_t{15}, size_t{16}, size_t{37}}) {
        SCOPED_TRACE(testing::Message() << "prompt " << P);
        const std::vector<int32_t> prompt(c->input_ids.begin(), c->input_ids.begin() + static_cast<ptrdiff_t>(P));
        // GPU: step_spec (the greedy token x after the prompt, the MTP block over every prompt
        // position, the last fed x, giving d_1), then draft_chain (runner a); runner b skips the chain.
        std::vector<std::vector<SampledToken>> drawn_a, drawn_b;
        std::vector<std::vector<int32_t>> first_a, first_b;
        const int32_t sa = a.open(), sb = b.open();
        ASSERT_TRUE(a.reserve(sa, static_cast<int64_t>(P) + 8) && b.reserve(sb, static_cast<int64_t>(P) + 8));
        std::vector<int64_t> acc_a, acc_b;
        a.step_spec({{sa, prompt, false, -1}}, {greedy}, drawn_a, first_a, acc_a);
        b.step_spec({{sb, prompt, false, -1}}, {greedy}, drawn_b, first_b, acc_b);
        const int32_t x = drawn_a[0][0].id;
        ASSERT_EQ(drawn_b[0][0].id, x);
        std::vector<float> gl;
        test::expect_error([&] { a.draft_chain({{sa, static_cast<int64_t>(P), first_a[0][0], greedy}}, steps, chained); },
                           {"not a token of the last step"});
        a.draft_chain({{sa, static_cast<int64_t>(P) - 1, first_a[0][0], greedy}}, steps, chained, &gl);
        ASSERT_EQ(chained.size(), 1u);
        ASSERT_EQ(static_cast<int64_t>(chained[0].size()), steps);
        ASSERT_EQ(static_cast<int64_t>(gl.size()), steps * Vn);
        // CPU: the same positions fed the GPU's tokens (x, d_1, d_2: a near tie may pick another id
        // on the two sides), the chain on a scratch state as ref/speculative.cpp runs it, twice:
        // exact (the reference the GPU is compared with) and with bf16 activations at the official
        // code's rounding sites (bf16_mtp_specification's probe: what the GPU's arithmetic is
        // specified to be). The second's distance from the first is this prompt's bf16 noise floor.
        Probe round = [](TraceView& v) {
            const std::string n = v.name;
            if (v.dtype != DType::f32 || n == trace_names::final_norm || n == trace_names::mtp_norm) return;
            for (int64_t i = 0; i < v.rows * v.width; ++i) v.f32()[i] = bf16_to_f32(f32_to_bf16(v.f32()[i]));
            v.modified = true;
        };
        std::vector<std::vector<float>> cpu_chain[2];   // [exact, bf16 activations][step] logits
        int32_t cpu_x = -1, cpu_d1[2] = {-1, -1};
        for (int side = 0; side < 2; ++side) {
            SequenceState st(cfg);
            std::vector<float> logits, streams, ml, ms;
            ForwardOptions fo;
            fo.streams_out = &streams;
            if (side) fo.probe = round;
            std::vector<SequenceChunk> fb{{&st, prompt}};
            forward(m, fb, fo, logits);
            if (!side) cpu_x = argmax(logits.data(), Vn);
            std::vector<int32_t> next(prompt.begin() + 1, prompt.end());
            next.push_back(x);
            ForwardOptions mo;
            mo.streams_out = &ms;
            if (side) mo.probe = round;
            std::vector<MtpChunk> mb{{&st, streams.data(), next}};
            mtp_forward(m, mb, mo, ml);
            cpu_d1[side] = argmax(ml.data(), Vn);
            SequenceState scratch(cfg);
            scratch.mtp = st.mtp;
            std::vector<float> h(ms.end() - HD, ms.end());
            for (int64_t k = 1; k <= steps; ++k) {
                const int32_t fed = k == 1 ? first_a[0][0] : chained[0][static_cast<size_t>(k - 2)];
                scratch.n_past = scratch.mtp.n_past + 1;
                std::vector<MtpChunk> cb{{&scratch, h.data(), {fed}}};
                mtp_forward(m, cb, mo, ml);
                h = ms;
                cpu_chain[side].push_back(ml);
            }
        }
        std::printf("[ %s | prompt %zu ] x %d (CPU %d), d_1 %d (CPU %d, CPU with bf16 activations %d)\n",
                    GetParam().c_str(), P, x, cpu_x, first_a[0][0], cpu_d1[0], cpu_d1[1]);
        for (int64_t k = 1; k <= steps; ++k) {
            const std::vector<float>& exact = cpu_chain[0][static_cast<size_t>(k - 1)];
            const double cs = cosine(gl.data() + (k - 1) * Vn, exact.data(), Vn);
            const double spec = cosine(cpu_chain[1][static_cast<size_t>(k - 1)].data(), exact.data(), Vn);
            // Bar: 0.998, or, where the specification itself is further from the exact chain (a
            // near tie upstream: on tiny-flash-mxfp4's prompt 37 the exact and the bf16 CPU pick
            // different d_1, 140 and 593, and the GPU picks 593; their chains then differ by
            // cosine 0.9959 / 0.9979 at the two steps, the GPU's by 0.9950 / 0.9973 on an H100),
            // within twice the specification's deficit.
            const double bar = std::min(0.998, 1.0 - 2.0 * (1.0 - spec));
            std::printf("[ %s | prompt %zu ] chained draft %ld: GPU %d, CPU %d, logits cosine %.6f (CPU with bf16 "
                        "activations: %.6f; bar %.6f)\n",
                        GetParam().c_str(), P, static_cast<long>(k + 1), chained[0][static_cast<size_t>(k - 1)],
                        argmax(exact.data(), Vn), cs, spec, bar);
            EXPECT_GE(cs, bar) << "chained step " << k;
            cos_sum += cs;
            spec_sum += spec;
            ++cos_n;
        }
        // The next positions' MTP logits: runner a (chained) = runner b (not), bit for bit.
        const std::vector<int32_t> fed{x, first_a[0][0], chained[0][0], chained[0][1]};
        const std::vector<int32_t> nx{fed[1], fed[2], fed[3], 0};
        std::vector<float> la, ma, lb, mb2;
        a.step_mtp({{sa, fed}}, {nx}, la, ma);
        b.step_mtp({{sb, fed}}, {nx}, lb, mb2);
        EXPECT_TRUE(la == lb) << "main logits after the chain";
        EXPECT_TRUE(ma == mb2) << "MTP logits after the chain (a ring row it overwrote was not put back)";
        a.close(sa);
        b.close(sb);
    }
    // The mean: 0.9995, or within twice the specification's mean deficit where that is larger.
    const double mean_bar = std::min(0.9995, 1.0 - 2.0 * (1.0 - spec_sum / std::max(cos_n, 1)));
    EXPECT_GE(cos_sum / std::max(cos_n, 1), mean_bar) << "mean cosine of the chained drafts' logits";
}

// step_verify and rewind with drafts from an oracle (the golden models' own MTP drafts are never
// accepted, so the accepted path needs one): the runner's greedy tokens, right drafts on two
// rounds of three and a wrong one on the third, so that rejections fall on every position mod 4
// (drafts that close a window included: one draft is always rewound, no restore). The
// tokens must be the runner's plain greedy ones; the MTP block's drafts at the kept positions are
// compared with a teacher-forced step_mtp over the final sequence. Then a rewind across a window
// boundary is refused.
TEST_P(GpuRunner, VerifyStepWithOracleDrafts) {
    const size_t P = 16;
    const int64_t N = 40;
    const int64_t V = this->V();
    const std::vector<int32_t> prompt(c->input_ids.begin(), c->input_ids.begin() + P);
    auto b = gpu::make_gpu_backend(*c->model, small_options());
    const std::vector<int32_t> plain = generate_greedy(*b, prompt, N + 2, 0, true);
    gpu::RunnerOptions o = small_options();
    o.rollback = true;
    gpu::Runner run(*c->model, o);
    const int32_t slot = run.open();
    ASSERT_TRUE(run.reserve(slot, static_cast<int64_t>(P) + N + 12));
    std::vector<float> logits, mtp;
    run.step({{slot, prompt}}, false, logits);
    std::vector<int32_t> out{static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin())};
    std::vector<int32_t> next(prompt.begin() + 1, prompt.end());
    next.push_back(out.back());
    run.mtp_step({next}, mtp);
    std::map<int64_t, int32_t> drafted_at;   // position -> the MTP block's draft for position + 2
    drafted_at[static_cast<int64_t>(P) - 1] =
        static_cast<int32_t>(std::max_element(mtp.end() - V, mtp.end()) - (mtp.end() - V));
    int64_t accepted = 0, rewinds = 0, restores = 0;
    std::vector<std::vector<int32_t>> main_ids, draft_ids;
    for (int64_t round = 0; static_cast<int64_t>(out.size()) < N; ++round) {
        const int64_t L = static_cast<int64_t>(P + out.size());
        const int32_t x = out.back(), right = plain[out.size()];
        const int32_t draft = round % 3 == 2 ? (right + 1) % static_cast<int32_t>(V) : right;
        const bool saved = run.rewind_needs_save(L, 1);
        if (saved) run.save_state(slot);
        run.step_verify({{slot, {x, draft}}}, main_ids, draft_ids);
        ASSERT_EQ(main_ids.size(), 1u);
        ASSERT_EQ(main_ids[0].size(), 2u);
        ASSERT_EQ(draft_ids[0].size(), 2u);
        EXPECT_EQ(main_ids[0][0], right) << "round " << round;
        if (main_ids[0][0] == draft) {
            ++accepted;
            EXPECT_EQ(run.n_past(slot), L + 1);
            out.push_back(draft);
            out.push_back(main_ids[0][1]);
            drafted_at[L] = draft_ids[0][1];
        } else {
            out.push_back(main_ids[0][0]);
            drafted_at[L - 1] = draft_ids[0][0];
            if (saved) {
                ++restores;
                run.restore_state(slot, L - 1);
                run.step({{slot, {x}}}, false, logits);
            } else {
                ++rewinds;
                run.rewind(slot, L);
            }
            EXPECT_EQ(run.n_past(slot), L);
        }
    }
    std::printf("[ %s ] oracle drafts: %ld accepted, %ld rejected by rewind, %ld by restore + re-run\n",
                GetParam().c_str(), static_cast<long>(accepted), static_cast<long>(rewinds), static_cast<long>(restores));
    EXPECT_GT(accepted, 0);
    EXPECT_GT(rewinds, 0);
    EXPECT_EQ(restores, 0);
    const std::vector<int32_t> want(plain.begin(), plain.begin() + static_cast<std::ptrdiff_t>(out.size()));
    EXPECT_EQ(out, want);

    // The MTP block's drafts against a teacher-forced pass over the same tokens (a fresh runner).
    std::vector<int32_t> seq(prompt);
    seq.insert(seq.end(), out.begin(), out.end());
    gpu::Runner ref(*c->model, small_options());
    const int32_t rs = ref.open();
    ASSERT_TRUE(ref.reserve(rs, static_cast<int64_t>(seq.size())));
    ref.step_mtp({{rs, std::vector<int32_t>(seq.begin(), seq.end() - 1)}}, {std::vector<int32_t>(seq.begin() + 1, seq.end())},
                 logits, mtp);
    int64_t same = 0;
    for (const auto& [p, d] : drafted_at) {
        const float* row = mtp.data() + p * V;
        same += d == static_cast<int32_t>(std::max_element(row, row + V) - row);
    }
    std::printf("[ %s ] MTP drafts equal to the teacher-forced MTP block's argmax: %ld of %zu\n", GetParam().c_str(),
                static_cast<long>(same), drafted_at.size());
    // The same positions, tokens and weights; only a two-token step's bf16 roundings differ from
    // the one-token chunks of the reference, which a near tie could flip.
    EXPECT_GE(same, static_cast<int64_t>(drafted_at.size()) - 1);

    // Five positions are more than the rings' spare rows (and span two windows of ratio 4, three
    // of ratio 16 at most): rewind cannot drop them.
    const int64_t at = run.n_past(slot);
    run.step({{slot, {5, 6, 7, 8, 9}}}, false, logits);
    EXPECT_TRUE(run.rewind_needs_save(at, 5));
    test::expect_error([&] { run.rewind(slot, at); }, {"cannot be dropped by a rewind"});
    EXPECT_EQ(run.n_past(slot), at + 5);
}

// ---- the serving engine with speculative decoding on the GPU

// One request's tokens (and logprob counts); wait() blocks until it finishes.
struct Collected {
    std::mutex m;
    std::condition_variable cv;
    std::vector<int32_t> tokens;
    std::vector<size_t> n_top;
    FinishReason reason = FinishReason::error;
    bool done = false;
    RequestCallbacks callbacks() {
        RequestCallbacks cb;
        cb.on_token = [this](const TokenOut& t) {
            std::lock_guard<std::mutex> lk(m);
            tokens.push_back(t.id);
            n_top.push_back(std::isfinite(t.logprob) ? t.top.size() : 1000);
            return true;
        };
        cb.on_finish = [this](FinishReason why, const std::string&) {
            std::lock_guard<std::mutex> lk(m);
            reason = why;
            done = true;
            cv.notify_all();
        };
        return cb;
    }
    void wait() {
        std::unique_lock<std::mutex> lk(m);
        cv.wait(lk, [&] { return done; });
    }
};

// A backend that forwards to a GPU backend and replaces the drafts its speculative steps return
// with the known continuation of the sequence on two of every three rounds (on one of them the
// last of several drafts stays the MTP block's, so that rounds accept some drafts and not all),
// so that the engine's accepted rounds run (the golden models' MTP drafts are almost never
// accepted). The slot's sequence is tracked from the chunks and draws; the continuation is the
// plain engine's output for the request whose prompt it starts with.
class OracleDrafts final : public Backend {
public:
    OracleDrafts(std::unique_ptr<Backend> b, std::vector<std::vector<int32_t>> full) : b_(std::move(b)), full_(std::move(full)) {}
    const ModelConfig& config() const override { return b_->config(); }
    std::string name() const override { return b_->name(); }
    int64_t max_seqs() const override { return b_->max_seqs(); }
    int64_t max_batch_tokens() const override { return b_->max_batch_tokens(); }
    int64_t max_logit_rows() const override { return b_->max_logit_rows(); }
    int64_t max_model_len() const override { return b_->max_model_len(); }
    int32_t open() override { return b_->open(); }
    void close(int32_t slot) override {
        seq_.erase(slot);
        b_->close(slot);
    }
    bool reserve(int32_t slot, int64_t n) override { return b_->reserve(slot, n); }
    int64_t n_past(int32_t slot) const override { return b_->n_past(slot); }
    void step(const std::vector<BackendChunk>& chunks, bool all_logits, std::vector<float>& logits, const Probe& probe) override {
        b_->step(chunks, all_logits, logits, probe);
    }
    bool has_sampler() const override { return true; }
    void set_masked_ids(const std::vector<int32_t>& ids) override { b_->set_masked_ids(ids); }
    bool has_speculative() const override { return b_->has_speculative(); }
    void step_speculative(const std::vector<SpecChunk>& chunks, const std::vector<SampleSpec>& spec,
                          std::vector<SpecOut>& out) override {
        b_->step_speculative(chunks, spec, out);
        for (size_t i = 0; i < chunks.size(); ++i) {
            std::vector<int32_t>& s = seq_[chunks[i].slot];
            s.insert(s.end(), chunks[i].tokens.begin(), chunks[i].tokens.end());
            // Accepted drafts are in the state too.
            s.insert(s.end(), chunks[i].drafts.begin(), chunks[i].drafts.begin() + static_cast<std::ptrdiff_t>(out[i].tokens.size() - 1));
            // The last draw is token s.size() of the sequence; the drafts guess the ones after it.
            for (const std::vector<int32_t>& f : full_) {
                if (f.size() <= s.size() + 1 || !std::equal(s.begin(), s.end(), f.begin())) continue;
                const int64_t r = ++rounds_ % 3;
                if (r == 0) break;
                const size_t n = std::min(out[i].drafts.size(), f.size() - s.size() - 1);
                std::vector<int32_t> oracle(f.begin() + static_cast<std::ptrdiff_t>(s.size() + 1),
                                            f.begin() + static_cast<std::ptrdiff_t>(s.size() + 1 + n));
                if (r == 2 && oracle.size() > 1) oracle.back() = out[i].drafts.back();
                out[i].drafts = oracle;
                break;
            }
        }
    }
    double cache_usage() const override { return b_->cache_usage(); }
    int64_t capacity_tokens() const override { return b_->capacity_tokens(); }
    SequenceState state(int32_t slot) const override { return b_->state(slot); }

private:
    std::unique_ptr<Backend> b_;
    std::vector<std::vector<int32_t>> full_;   // prompt + plain output of each request
    std::map<int32_t, std::vector<int32_t>> seq_;
    int64_t rounds_ = 0;
};

// Requests through the engine on the GPU: without speculation, with the MTP block's drafts, and
// with oracle drafts (accepted rounds), greedy and sampled, with and without logprobs. Every
// request gets its max_tokens (and its logprobs) in every mode. Greedy requests' outputs are the
// same token for token, up to the GPU's rounding: a multi-token verify step and a different batch
// composition change the logits in the last bits (the small-M linears' split and the mHC
// reductions depend on the step's token count), which flips an argmax only near a tie. So at a
// greedy request's first divergence the two tokens a, b must be a near tie: on a fresh runner's
// logits for that position (teacher-forced on the plain output), moving the logits of the ids
// below max(a, b) against the others by the GPU's own schedule noise, one way and the other, must
// move the choice across that id. (The tiny golden models' noise is large, ~0.6 logits, so this
// bound is loose for them.) The noise is the largest logit difference between a full pass and a
// prefill-then-decode pass of the golden sequence on the GPU. Sampled requests follow the standard
// rule (ref/speculative.h), whose output has the main model's distribution but not the plain run's
// tokens (SpeculativeSampledDistributionIsTheMainModels tests the distribution): here they must
// give the same tokens in two runs with the same seeds. Run once with one request at a time, once
// with several sharing steps (prompt chunks beside verify chunks: eager steps).
TEST_P(GpuRunner, EngineSpeculativeOutputEqualsPlain) {
    struct Req {
        size_t begin, n;
        float temperature;
        int top_logprobs;
    };
    const std::vector<Req> reqs = {{0, 40, 0.0f, -1}, {7, 13, 0.8f, -1}, {50, 77, 0.0f, 2}, {3, 5, 1.0f, 3}, {90, 30, 0.6f, -1}};
    const int64_t N = 20;
    // The GPU's schedule noise: full pass against prefill-then-decode, same tokens.
    double noise = 0;
    {
        auto nb = gpu::make_gpu_backend(*c->model, small_options());
        const std::vector<float> full = sequence_logits(*nb, c->input_ids, Schedule{});
        Schedule dec;
        dec.decode_from = 16;
        const std::vector<float> stepped = sequence_logits(*nb, c->input_ids, dec);
        noise = test::max_abs_diff(full.data(), stepped.data(), full.size());
    }
    auto near_tie = [&](const std::vector<int32_t>& prompt, const std::vector<int32_t>& want, size_t k, int32_t b,
                        const GenerationParams& p) {
        std::vector<int32_t> seq(prompt);
        seq.insert(seq.end(), want.begin(), want.begin() + static_cast<std::ptrdiff_t>(k));
        gpu::Runner run(*c->model, small_options());
        const int32_t slot = run.open();
        if (slot < 0 || !run.reserve(slot, static_cast<int64_t>(seq.size()))) return false;
        std::vector<float> logits;
        run.step({{slot, seq}}, false, logits);
        const int32_t hi = std::max(want[k], b);
        Sampler sampler(p.sampling, 0);
        auto draw = [&](float shift) {
            std::vector<float> row = logits;
            for (int64_t v = 0; v < V(); ++v) row[static_cast<size_t>(v)] += v < hi ? shift : -shift;
            return sampler.sample(row.data(), V(), static_cast<int64_t>(k));
        };
        // The drawn id falls as the low ids gain (the walk is in id order; greedy: one of the two
        // groups wins): the choice between "below hi" and "hi or above" (a and b are on its two
        // sides) must flip within the noise.
        return draw(static_cast<float>(noise)) < hi && draw(-static_cast<float>(noise)) >= hi;
    };
    auto params = [&](const Req& q) {
        GenerationParams p;
        p.sampling.temperature = q.temperature;
        p.sampling.top_p = q.temperature > 0 ? 0.95f : 1.0f;
        p.sampling.seed = 1000 + q.begin;
        p.max_tokens = N;
        p.ignore_eos = true;
        p.top_logprobs = q.top_logprobs;
        return p;
    };
    auto prompt = [&](const Req& q) {
        return std::vector<int32_t>(c->input_ids.begin() + static_cast<std::ptrdiff_t>(q.begin),
                                    c->input_ids.begin() + static_cast<std::ptrdiff_t>(q.begin + q.n));
    };
    for (int64_t max_seqs : {int64_t{1}, int64_t{3}}) {
        // kind 0: plain; 1: the MTP block's drafts, K = 1; 2: oracle drafts, K = 1; 3, 4: the same with
        // K = 3; 5: kind 3 again (sampled requests: the same tokens from the same seeds).
        constexpr int kKinds = 6;
        auto drafts_of = [](int kind) { return kind == 0 ? 0 : kind <= 2 ? 1 : 3; };
        std::vector<std::vector<std::vector<int32_t>>> out(kKinds);
        std::vector<EngineMetrics> metrics(kKinds);
        for (int kind = 0; kind < kKinds; ++kind) {
            auto m = Model::load(test::golden_dir(GetParam()) + "/model");
            gpu::RunnerOptions o = small_options();
            o.max_seqs = max_seqs;
            o.max_logit_rows = (1 + drafts_of(kind)) * max_seqs + 8;
            o.rollback = kind > 0;
            std::unique_ptr<Backend> b = gpu::make_gpu_backend(*m, o);
            if (kind == 2 || kind == 4) {
                std::vector<std::vector<int32_t>> full;
                for (size_t i = 0; i < reqs.size(); ++i) {
                    full.push_back(prompt(reqs[i]));
                    full.back().insert(full.back().end(), out[0][i].begin(), out[0][i].end());
                }
                b = std::make_unique<OracleDrafts>(std::move(b), std::move(full));
            }
            EngineOptions eo;
            eo.max_seqs = max_seqs;
            eo.max_batch_tokens = max_seqs == 1 ? 256 : 24;   // several: prompt chunks beside verify chunks
            eo.prefix_caching = false;
            eo.speculative_tokens = drafts_of(kind);
            Engine e(std::move(m), std::move(b), eo);
            std::vector<std::unique_ptr<Collected>> cols;
            for (const Req& q : reqs) {
                cols.push_back(std::make_unique<Collected>());
                e.submit(prompt(q), params(q), cols.back()->callbacks());
            }
            for (size_t i = 0; i < reqs.size(); ++i) {
                cols[i]->wait();
                EXPECT_EQ(cols[i]->reason, FinishReason::length) << "kind " << kind << ", request " << i;
                EXPECT_EQ(cols[i]->tokens.size(), static_cast<size_t>(N)) << "kind " << kind << ", request " << i;
                if (reqs[i].top_logprobs >= 0) {   // logprobs finite (else 1000), with the alternatives asked for
                    for (size_t n_top : cols[i]->n_top) {
                        EXPECT_EQ(n_top, static_cast<size_t>(reqs[i].top_logprobs));
                    }
                }
                out[static_cast<size_t>(kind)].push_back(cols[i]->tokens);
            }
            metrics[static_cast<size_t>(kind)] = e.metrics();
        }
        size_t same = 0, total = 0, ties = 0;
        for (int kind = 1; kind < kKinds; ++kind)
            for (size_t i = 0; i < reqs.size(); ++i) {
                if (reqs[i].temperature > 0) {   // sampled: the main model's distribution, not its plain tokens
                    if (kind == 5) {
                        EXPECT_EQ(out[5][i], out[3][i]) << "max_seqs " << max_seqs << ", request " << i
                                                        << ": a sampled request's tokens differ between two runs";
                    }
                    continue;
                }
                const std::vector<int32_t>& got = out[static_cast<size_t>(kind)][i];
                const std::vector<int32_t>& want = out[0][i];
                size_t k = 0;
                while (k < got.size() && k < want.size() && got[k] == want[k]) ++k;
                same += k;
                total += want.size();
                if (k == want.size()) continue;
                ++ties;
                EXPECT_TRUE(near_tie(prompt(reqs[i]), want, k, got[k], params(reqs[i])))
                    << "max_seqs " << max_seqs << ", " << (kind % 2 == 1 ? "MTP" : "oracle") << " drafts, K "
                    << drafts_of(kind) << ", request " << i
                    << ": token " << k << " is " << got[k] << ", without speculation " << want[k];
            }
        std::printf("[ %s | max_seqs %ld ] speculative outputs: %zu of %zu tokens before a divergence, %zu divergences "
                    "(each must be a near tie; schedule noise %.4f)\n",
                    GetParam().c_str(), static_cast<long>(max_seqs), same, total, ties, noise);
        for (int kind = 1; kind < kKinds; ++kind)
            std::printf("[ %s | max_seqs %ld ] K=%d %s drafts accepted: %lu of %lu\n", GetParam().c_str(),
                        static_cast<long>(max_seqs), drafts_of(kind), kind % 2 == 1 ? "MTP" : "oracle",
                        static_cast<unsigned long>(metrics[static_cast<size_t>(kind)].spec_accepted_total),
                        static_cast<unsigned long>(metrics[static_cast<size_t>(kind)].spec_drafts_total));
        EXPECT_EQ(metrics[0].spec_drafts_total, 0u);
        for (int kind : {1, 3}) EXPECT_GT(metrics[static_cast<size_t>(kind)].spec_drafts_total, 0u);
        for (int kind : {2, 4}) {
            EXPECT_GT(metrics[static_cast<size_t>(kind)].spec_accepted_total, 0u);
            EXPECT_LT(metrics[static_cast<size_t>(kind)].spec_accepted_total, metrics[static_cast<size_t>(kind)].spec_drafts_total);
        }
        // K = 3 with oracle drafts: rounds that keep more than two tokens.
        EXPECT_GT(metrics[4].spec_accepted_total, metrics[2].spec_accepted_total);
        for (int kind = 0; kind < kKinds; ++kind)
            EXPECT_EQ(metrics[static_cast<size_t>(kind)].generation_tokens_total, reqs.size() * static_cast<size_t>(N));
    }
    // A backend without speculative steps is refused.
    auto m = Model::load(test::golden_dir(GetParam()) + "/model");
    auto plain = gpu::make_gpu_backend(*m, small_options());
    EngineOptions eo;
    eo.speculative_tokens = 1;
    test::expect_error([&] { Engine e(std::move(m), std::move(plain), eo); }, {"cannot run speculative steps"});
}

// Greedy ids equal the golden up to the first position where the golden's own margin (top-1 minus
// top-2 logit, from the CPU reference, which matches the golden to 5e-6) is below the bf16 noise:
// the largest |GPU − CPU| logit difference seen on the full pass of the prompt positions.
TEST_P(GpuRunner, GreedyIdsUpToFirstLowMargin) {
    auto b = gpu::make_gpu_backend(*c->model, small_options());
    const size_t P = 16;
    const std::vector<int32_t> prompt(c->greedy_ids.begin(), c->greedy_ids.begin() + P);
    const std::vector<int32_t> got = generate_greedy(*b, prompt, static_cast<int64_t>(c->greedy_ids.size() - P), 0, true);
    // Noise: GPU vs CPU on the golden sequence.
    const std::vector<float> gl = sequence_logits(*b, c->input_ids, Schedule{});
    const double noise = test::max_abs_diff(gl.data(), c->cpu_logits.data(), gl.size());
    // Margins of the golden greedy sequence (CPU reference, one full pass).
    const std::vector<float> ml = sequence_logits(*c->model, c->greedy_ids, Schedule{});
    size_t first_low = c->greedy_ids.size();
    for (size_t i = P; i < c->greedy_ids.size(); ++i) {
        const float* row = ml.data() + (i - 1) * static_cast<size_t>(V());
        std::vector<float> r(row, row + V());
        std::partial_sort(r.begin(), r.begin() + 2, r.end(), std::greater<float>());
        if (r[0] - r[1] < 2 * noise) {
            first_low = i;
            break;
        }
    }
    size_t agree = 0;
    while (agree < got.size() && got[agree] == c->greedy_ids[P + agree]) ++agree;
    std::printf("[ %s ] greedy: %zu of %zu ids equal the golden; first golden margin below 2x noise (%.4f) at "
                "position %zu\n",
                GetParam().c_str(), agree, got.size(), noise, first_low);
    EXPECT_GE(P + agree, first_low) << "the GPU's greedy ids diverge before the golden's margins get small";
}

// Level 3: per layer, teacher forced. The GPU layer gets the CPU's input streams and the CPU's
// discrete choices; every other named intermediate must have cosine ≥ 0.9999 with the CPU's.
// Unforced, the agreement of the discrete choices is reported.
TEST_P(GpuRunner, TeacherForcedLayersMatchCpu) {
    auto b = gpu::make_gpu_backend(*c->model, small_options());
    const int32_t slot = b->open();
    ASSERT_TRUE(b->reserve(slot, T()));
    double worst = 1;
    std::string worst_name;
    int checked = 0;
    Probe forced = [&](TraceView& v) {
        const auto key = std::make_pair(std::string(v.name), v.layer);
        const size_t n = static_cast<size_t>(v.rows * v.width);
        if (v.dtype == DType::i32) {
            const auto& ref = c->i32.at(key);
            std::copy(ref.begin(), ref.begin() + static_cast<ptrdiff_t>(n), v.i32());
            v.modified = true;
            return;
        }
        const auto& ref = c->f32.at(key);
        if (key.first == trace_names::streams) {
            std::copy(ref.begin(), ref.begin() + static_cast<ptrdiff_t>(n), v.f32());
            v.modified = true;
            return;
        }
        for (int64_t t = 0; t < v.rows; ++t) {
            const double cs = cosine(v.f32() + t * v.width, ref.data() + t * v.width, v.width);
            if (cs < worst) worst = cs, worst_name = key.first + " layer " + std::to_string(key.second);
        }
        ++checked;
    };
    std::vector<float> logits;
    b->step({{slot, c->input_ids}}, true, logits, forced);
    std::printf("[ %s ] teacher forced: %d intermediates, worst per-token cosine %.7f (%s)\n", GetParam().c_str(),
                checked, worst, worst_name.c_str());
    EXPECT_EQ(checked, 4 * c->model->cfg.num_hidden_layers + 1);
    EXPECT_GE(worst, 0.9999) << worst_name;
    b->close(slot);

    // Unforced: how often do the discrete choices agree?
    const int32_t s2 = b->open();
    ASSERT_TRUE(b->reserve(s2, T()));
    int64_t topk_same = 0, topk_all = 0, ids_same = 0, ids_all = 0;
    Probe watch = [&](TraceView& v) {
        if (v.dtype != DType::i32) return;
        const auto& ref = c->i32.at({std::string(v.name), v.layer});
        for (int64_t t = 0; t < v.rows; ++t) {
            std::vector<int32_t> a(v.i32() + t * v.width, v.i32() + (t + 1) * v.width);
            std::vector<int32_t> r(ref.begin() + t * v.width, ref.begin() + (t + 1) * v.width);
            std::sort(a.begin(), a.end());
            std::sort(r.begin(), r.end());
            std::vector<int32_t> common;
            std::set_intersection(a.begin(), a.end(), r.begin(), r.end(), std::back_inserter(common));
            int64_t& same = std::string(v.name) == trace_names::index_topk ? topk_same : ids_same;
            int64_t& all = std::string(v.name) == trace_names::index_topk ? topk_all : ids_all;
            same += static_cast<int64_t>(std::count_if(common.begin(), common.end(), [](int32_t x) { return x >= 0; }));
            all += static_cast<int64_t>(std::count_if(r.begin(), r.end(), [](int32_t x) { return x >= 0; }));
        }
    };
    b->step({{s2, c->input_ids}}, true, logits, watch);
    std::printf("[ %s ] unforced: indexer top-k rows agree %.2f%% (%lld/%lld), expert ids agree %.2f%% (%lld/%lld)\n",
                GetParam().c_str(), 100.0 * static_cast<double>(topk_same) / std::max<int64_t>(topk_all, 1),
                static_cast<long long>(topk_same), static_cast<long long>(topk_all),
                100.0 * static_cast<double>(ids_same) / std::max<int64_t>(ids_all, 1), static_cast<long long>(ids_same),
                static_cast<long long>(ids_all));
    EXPECT_GT(ids_same, ids_all / 2);   // a sanity floor; the numbers above are the report
}

// Runs ids[0 .. total) through `slot` in chunks of the given sizes, then one token at a time,
// each step teacher-forced by position on the traces (f32: the residual streams; i32: the discrete
// choices, index_topk and expert ids). Returns the positions run (total).
int64_t run_forced(Backend& b, int32_t slot, const std::vector<int32_t>& ids, const std::vector<int64_t>& chunks,
                   int64_t total, const std::map<std::pair<std::string, int64_t>, std::vector<float>>& f32,
                   const std::map<std::pair<std::string, int64_t>, std::vector<int32_t>>& i32) {
    int64_t p = 0;
    std::vector<float> logits;
    auto step = [&](int64_t n) {
        const int64_t p0 = p;
        Probe force = [&, p0](TraceView& v) {
            const auto key = std::make_pair(std::string(v.name), v.layer);
            const size_t off = static_cast<size_t>(p0 * v.width), n_el = static_cast<size_t>(v.rows * v.width);
            if (v.dtype == DType::i32) {
                std::copy_n(i32.at(key).begin() + static_cast<ptrdiff_t>(off), n_el, v.i32());
                v.modified = true;
            } else if (key.first == trace_names::streams) {
                std::copy_n(f32.at(key).begin() + static_cast<ptrdiff_t>(off), n_el, v.f32());
                v.modified = true;
            }
        };
        b.step({{slot, std::vector<int32_t>(ids.begin() + p, ids.begin() + p + n)}}, false, logits, force);
        p += n;
    };
    for (int64_t n : chunks) step(n);
    while (p < total) step(1);
    return p;
}

// Level 2: after prefill, chunked prefill and decode schedules (teacher forced, so the state
// differs from the CPU's only by the bf16 rounding of the GPU's activations and storage), the
// slot's state equals the CPU reference's: window rows, open compressor windows, compressed rows,
// indexer keys.
TEST_P(GpuRunner, StateMatchesCpuAfterSchedules) {
    const ModelConfig& cfg = c->model->cfg;
    auto b = gpu::make_gpu_backend(*c->model, small_options());
    const struct {
        const char* name;
        std::vector<int64_t> chunks;   // chunk sizes, then the rest one at a time up to `total`
        int64_t total;
    } schedules[] = {
        {"prefill 256", {256}, 256},
        {"chunks of 37", {37, 37, 37, 37, 37, 37, 34}, 256},
        {"prefill 100 then 33 decodes", {100}, 133},
        {"chunks 3,5,16,17 then decodes", {3, 5, 16, 17}, 70},
    };
    for (const auto& sc : schedules) {
        const int32_t slot = b->open();
        ASSERT_TRUE(b->reserve(slot, sc.total));
        const int64_t p = run_forced(*b, slot, c->input_ids, sc.chunks, sc.total, c->f32, c->i32);

        // The CPU's state for the same tokens (its state does not depend on the schedule).
        SequenceState ref(cfg);
        std::vector<SequenceChunk> batch{{&ref, std::vector<int32_t>(c->input_ids.begin(), c->input_ids.begin() + p)}};
        std::vector<float> cl;
        forward(*c->model, batch, ForwardOptions{}, cl);
        const SequenceState got = b->state(slot);
        ASSERT_EQ(got.n_past, ref.n_past) << sc.name;
        // Rows compared by relative error: bf16 storage (2^-9) on top of bf16 activations
        // upstream (a few 2^-9 through the projections): 2e-2 of the row's norm.
        auto rel = [](const std::vector<float>& a, const std::vector<float>& r, int64_t row_width) {
            double worst = 0;
            for (size_t i0 = 0; i0 < r.size(); i0 += static_cast<size_t>(row_width)) {
                double dd = 0, rr = 0;
                for (size_t i = i0; i < i0 + static_cast<size_t>(row_width); ++i) {
                    dd += (static_cast<double>(a[i]) - r[i]) * (static_cast<double>(a[i]) - r[i]);
                    rr += static_cast<double>(r[i]) * r[i];
                }
                worst = std::max(worst, std::sqrt(dd / std::max(rr, 1e-30)));
            }
            return worst;
        };
        double worst = 0;
        for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
            const LayerState& g = got.layers[static_cast<size_t>(l)];
            const LayerState& r = ref.layers[static_cast<size_t>(l)];
            ASSERT_EQ(g.n_window, r.n_window) << sc.name << " layer " << l;
            ASSERT_EQ(g.window.size(), r.window.size());
            worst = std::max(worst, rel(g.window, r.window, cfg.head_dim));
            for (auto [gc, rc, d] : {std::tuple{&g.comp, &r.comp, cfg.head_dim},
                                     std::tuple{&g.index_comp, &r.index_comp, cfg.index_head_dim}}) {
                ASSERT_EQ(gc->n_rows, rc->n_rows) << sc.name << " layer " << l;
                ASSERT_EQ(gc->n_pending, rc->n_pending) << sc.name << " layer " << l;
                ASSERT_EQ(gc->rows.size(), rc->rows.size());
                ASSERT_EQ(gc->pending_kv.size(), rc->pending_kv.size());
                ASSERT_EQ(gc->prev_kv.size(), rc->prev_kv.size()) << sc.name << " layer " << l;
                if (rc->n_rows) worst = std::max(worst, rel(gc->rows, rc->rows, d));
                const int64_t width = rc->n_pending ? static_cast<int64_t>(rc->pending_kv.size()) / rc->n_pending : 1;
                if (rc->n_pending) {
                    worst = std::max(worst, rel(gc->pending_kv, rc->pending_kv, width));
                    worst = std::max(worst, rel(gc->pending_gate, rc->pending_gate, width));
                }
                if (!rc->prev_kv.empty()) {
                    worst = std::max(worst, rel(gc->prev_kv, rc->prev_kv, d));
                    worst = std::max(worst, rel(gc->prev_gate, rc->prev_gate, d));
                }
            }
        }
        std::printf("[ %s | %s ] state vs CPU: worst relative row error %.2e\n", GetParam().c_str(), sc.name, worst);
        EXPECT_LE(worst, 2e-2) << sc.name;
        b->close(slot);
    }
}

// RunnerOptions::indexer_side (a CSA layer's indexer queries on side stream 2 at ≤ 16 tokens)
// against the runner without it, over a prefill and 24 batch-1 decode steps replayed from graphs
// and the same steps eagerly: the side stream moves no arithmetic, so the logits are equal bit for
// bit, and the queries did run on side stream 2 (in a case with CSA layers).
TEST_P(GpuRunner, IndexerSideStreamEqualsMainStream) {
    gpu::RunnerOptions plain = small_options(), side = small_options(), side_eager = small_options();
    plain.indexer_side = false;
    side.indexer_side = true;
    side_eager.indexer_side = true;
    side_eager.graphs = false;
    gpu::Runner rm(*c->model, plain), rs(*c->model, side), re(*c->model, side_eager);
    expect_same_logits({&rm, &rs, &re}, {"main stream", "graph", "eager"});
    if (HasFatalFailure()) return;
    std::printf("[ %s ] indexer queries on side stream 2: %lld enqueues, logits equal over 25 steps\n",
                GetParam().c_str(), static_cast<long long>(rs.indexer_side_launches()));
    EXPECT_EQ(rm.indexer_side_launches(), 0);
    EXPECT_GT(rs.graph_replays(), 0);
    if (c->model->cfg.index_topk > 0) {
        EXPECT_GT(rs.indexer_side_launches(), 0) << "no indexer query on side stream 2";
    }
}

// RunnerOptions::stream_priority (the main stream at the highest priority, the side streams at the
// lowest, graphs instantiated with node priorities) changes only the order in which CTAs are
// scheduled, never what they compute: the logits of a prefill and 24 batch-1 steps equal the
// default's bit for bit, graph-replayed and eager.
TEST_P(GpuRunner, StreamPriorityGivesTheSameLogits) {
    gpu::RunnerOptions plain = small_options(), prio = small_options(), prio_eager = small_options();
    prio.stream_priority = true;
    prio_eager.stream_priority = true;
    prio_eager.graphs = false;
    gpu::Runner rm(*c->model, plain), rp(*c->model, prio), re(*c->model, prio_eager);
    expect_same_logits({&rm, &rp, &re}, {"default", "graph", "eager"});
    if (HasFatalFailure()) return;
    EXPECT_GT(rp.graph_replays(), 0);
}

// The routed experts of steps of 3 to 8 tokens through the small-T path (moe_small_l1 / l2, which
// the runner takes at up to 4 tokens, and up to 8 for NVFP4 experts in exact numerics) or through
// moe_layer (the small path off), on the golden sequence prefilled in chunks of 3, 4, 6 and 8
// tokens: both must meet GoldenLogitsStatistics' bar and agree with each other to within the bf16
// noise (0.0005 cosine, 2 points of top-1), as WideAttentionKeepsTheGoldenStatistics asks of its two
// paths. Both numerics. (Each path's kernels match the CPU twins in CudaMoeLayer.*. A first form of
// this test compared the two paths row by row on 4 sequences decoded together, at bars of 1e-5 and
// then 0.0005 cosine per row: on tiny-flash-nvfp4 one sequence's rows went to 0.999989 after 3
// steps and to 0.99885 after 7 (H100, 2026-12-07) while tiny-flash-mxfp4 stayed ≥ 0.9999941; with no
// golden for that schedule it could not say which path, if either, left the reference, so the test
// now measures both against the golden.)
TEST_P(GpuRunner, SmallPathAtUpToEightTokensKeepsTheGoldenStatistics) {
    const LogitStats emu = bf16_specification(*c);
    const auto [targets, bar_cos, bar_top1] = golden_bar(emu);
    for (Numerics nm : {Numerics::exact, Numerics::official}) {
        gpu::RunnerOptions sm = small_options(), gen = small_options();
        sm.numerics = gen.numerics = nm;
        sm.moe_small_max_t = 8;
        gen.moe_small = false;
        auto bs = gpu::make_gpu_backend(*c->model, sm);
        auto bg = gpu::make_gpu_backend(*c->model, gen);
        for (int64_t chunk : {3, 4, 6, 8}) {
            const std::string what = std::string(nm == Numerics::official ? "official" : "exact") + ", chunks of " +
                                     std::to_string(chunk);
            const std::vector<float> a = sequence_logits(*bs, c->input_ids, Schedule{-1, chunk});
            const std::vector<float> b = sequence_logits(*bg, c->input_ids, Schedule{-1, chunk});
            ASSERT_EQ(a.size(), static_cast<size_t>(T() * V())) << what;
            ASSERT_EQ(b.size(), a.size()) << what;
            const LogitStats sa = compare_logits(a, c->golden_logits(), T(), V());
            const LogitStats sb = compare_logits(b, c->golden_logits(), T(), V());
            const LogitStats ab = compare_logits(a, b.data(), T(), V());
            std::printf("[ %s | %s ] small-T path vs golden: cosine %.6f, top-1 %.2f%%; moe_layer: %.6f, %.2f%%; "
                        "between them: cosine %.6f (min %.6f), top-1 %.2f%%\n",
                        GetParam().c_str(), what.c_str(), sa.mean_cos, 100 * sa.top1, sb.mean_cos, 100 * sb.top1,
                        ab.mean_cos, ab.min_cos, 100 * ab.top1);
            if (nm == Numerics::exact) {   // the bar is the exact specification's (official: against moe_layer)
                EXPECT_GE(sa.mean_cos, bar_cos) << what;
                EXPECT_GE(sa.top1, bar_top1) << what;
            }
            EXPECT_GE(sa.mean_cos, sb.mean_cos - 0.0005) << what;
            EXPECT_GE(sa.top1, sb.top1 - 0.02) << what;
            // The small path ran: in exact numerics its f32 order gives other bits than moe_layer's
            // (in official numerics the tiny widths' sums are exact, so the bits may agree).
            if (nm == Numerics::exact) {
                EXPECT_NE(std::memcmp(a.data(), b.data(), a.size() * 4), 0) << what << ": the same bits as moe_layer";
            }
        }
    }
}

// Which steps the runner sends through the small-T path by default (RunnerOptions::moe_small_max_t
// −1, runner.cpp's small_max_t): every MoE layer of a 4-token step; of a 6- or 8-token step only
// with NVFP4 experts in exact numerics (where it measured faster); none of a 9-token step.
TEST_P(GpuRunner, SmallPathRuleByTokensFormatAndNumerics) {
    const bool nvfp4 = GetParam().find("nvfp4") != std::string::npos;
    const int64_t L = c->model->cfg.num_hidden_layers;
    ASSERT_GE(T(), 27) << "the golden sequence is shorter than the steps";
    for (Numerics nm : {Numerics::exact, Numerics::official}) {
        gpu::RunnerOptions o = small_options();
        o.numerics = nm;
        ASSERT_EQ(o.moe_small_max_t, -1) << "the default is the measured rule";
        gpu::Runner r(*c->model, o);
        const int32_t slot = r.open();
        ASSERT_TRUE(r.reserve(slot, 128));
        std::vector<float> lg;
        int64_t at = 0;
        for (int64_t chunk : {4, 6, 8, 9}) {
            const std::vector<int32_t> toks(c->input_ids.begin() + at, c->input_ids.begin() + at + chunk);
            at += chunk;
            const int64_t before = r.moe_small_launches();
            std::vector<gpu::RunnerChunk> ch{{slot, toks}};
            r.step(ch, false, lg);
            const int64_t n = r.moe_small_launches() - before;
            const bool want = chunk <= 4 || (chunk <= 8 && nvfp4 && nm == Numerics::exact);
            const std::string what = std::string(nm == Numerics::official ? "official" : "exact") + ", a step of " +
                                     std::to_string(chunk) + " tokens";
            // Every MoE layer once per enqueue (a short chunk's first step runs eagerly and is then
            // captured as a graph: two enqueues).
            if (want) {
                EXPECT_GT(n, 0) << what;
                EXPECT_EQ(n % L, 0) << what << ": " << n << " small-path layers";
            } else {
                EXPECT_EQ(n, 0) << what;
            }
        }
    }
}

// Graphs: decode steps of 4 sequences replayed from a captured graph give the same logits, bit
// for bit, as the same steps run eagerly (a second runner with graphs off).
TEST_P(GpuRunner, GraphReplayEqualsEager) {
    gpu::RunnerOptions with = small_options(), without = small_options();
    without.graphs = false;
    gpu::Runner rg(*c->model, with), re(*c->model, without);
    std::vector<int32_t> sg, se;
    for (int i = 0; i < 4; ++i) {
        sg.push_back(rg.open());
        se.push_back(re.open());
        ASSERT_TRUE(rg.reserve(sg.back(), 128));
        ASSERT_TRUE(re.reserve(se.back(), 128));
    }
    std::vector<float> lg, le;
    // Prefill 4 sequences of different lengths (eager on both).
    std::vector<gpu::RunnerChunk> pg, pe;
    for (int i = 0; i < 4; ++i) {
        std::vector<int32_t> toks(c->input_ids.begin() + i, c->input_ids.begin() + i + 20 + 7 * i);
        pg.push_back({sg[static_cast<size_t>(i)], toks});
        pe.push_back({se[static_cast<size_t>(i)], toks});
    }
    rg.step(pg, false, lg);
    re.step(pe, false, le);
    for (int step = 0; step < 24; ++step) {
        std::vector<gpu::RunnerChunk> dg, de;
        for (int i = 0; i < 4; ++i) {
            const int32_t tok = c->input_ids[static_cast<size_t>(40 + 7 * i + step)];
            dg.push_back({sg[static_cast<size_t>(i)], {tok}});
            de.push_back({se[static_cast<size_t>(i)], {tok}});
        }
        rg.step(dg, false, lg);
        re.step(de, false, le);
        ASSERT_EQ(lg.size(), le.size());
        ASSERT_EQ(std::memcmp(lg.data(), le.data(), lg.size() * 4), 0) << "decode step " << step;
    }
    EXPECT_EQ(rg.graphs_captured(), 1);
    EXPECT_EQ(rg.graph_replays(), 23);
    // Decode steps of 3 of the 4 sequences: the same graph (bucket 4) with one padding row, which
    // cuda::route routes as token 0 (no expert weights of its own), against eager steps without it.
    for (int step = 0; step < 4; ++step) {
        std::vector<gpu::RunnerChunk> dg, de;
        for (int i = 0; i < 3; ++i) {
            const int32_t tok = c->input_ids[static_cast<size_t>(70 + 5 * i + step)];
            dg.push_back({sg[static_cast<size_t>(i)], {tok}});
            de.push_back({se[static_cast<size_t>(i)], {tok}});
        }
        rg.step(dg, false, lg);
        re.step(de, false, le);
        ASSERT_EQ(lg.size(), static_cast<size_t>(3 * V()));
        ASSERT_EQ(lg.size(), le.size());
        ASSERT_EQ(std::memcmp(lg.data(), le.data(), lg.size() * 4), 0) << "3-sequence decode step " << step;
    }
    EXPECT_EQ(rg.graphs_captured(), 1);
    EXPECT_EQ(rg.graph_replays(), 27);
    // Chunks of 3 tokens each (speculative verification's shape), every logit row, 3 of the 4
    // sequences: the bucket of 4 with a padding chunk, replayed from its own graph.
    for (int step = 0; step < 6; ++step) {
        std::vector<gpu::RunnerChunk> dg, de;
        for (int i = 0; i < 3; ++i) {
            const auto at = c->input_ids.begin() + 100 + 11 * i + 3 * step;
            dg.push_back({sg[static_cast<size_t>(i)], std::vector<int32_t>(at, at + 3)});
            de.push_back({se[static_cast<size_t>(i)], std::vector<int32_t>(at, at + 3)});
        }
        rg.step(dg, true, lg);
        re.step(de, true, le);
        ASSERT_EQ(lg.size(), static_cast<size_t>(9 * V()));
        ASSERT_EQ(lg.size(), le.size());
        ASSERT_EQ(std::memcmp(lg.data(), le.data(), lg.size() * 4), 0) << "3-token step " << step;
    }
    EXPECT_EQ(rg.graphs_captured(), 2);
    EXPECT_EQ(rg.graph_replays(), 27 + 5);
    EXPECT_EQ(re.graph_replays(), 0);
}
#if defined(MEGAMOE_HAVE_NCCL)
// Expert parallelism through the runner's hook (issue 13), in a world of one GPU: the exchange
// (all-gather + reduce-scatter with slot rows or partial sums, and all-to-all) moves every token to
// rank 0, the routed-expert layer runs over what arrived with the skip bucket, and the combine
// adds the rows in slot order, so the logits equal the single-GPU runner's bit for bit: a prefill
// of two sequences (eager, every logit row) and decode steps replayed from a CUDA graph, in exact
// and official numerics, also when every exchange call moves padding rows past the rank's tokens
// (set_exchange_rows: what a rank with fewer tokens than its peers does). Both runners take
// moe_layer_routed (the small-T path is off, since the EP path never takes it). A world of N > 1
// needs a multi-GPU machine.
TEST_P(GpuRunner, ExpertParallelWorldOfOneEqualsOneGpu) {
    const ModelConfig& cfg = c->model->cfg;
    std::vector<dist::Communicator> comms = dist::Communicator::create_local({0});
    const dist::ModelPartition mp = dist::partition_model(cfg, &c->model->w, 1, dist::PartitionKind::contiguous);
    const int64_t k = cfg.num_experts_per_tok, D = cfg.hidden_size;
    // moe_small: decode steps of 2 tokens take the small-T path on both sides (the expert-parallel
    // one writes the exchange's layout from its L2, runner.cpp ep_experts), prefills the general one.
    for (const auto& [nm, moe_small] : {std::pair{Numerics::exact, false}, std::pair{Numerics::official, false},
                                        std::pair{Numerics::exact, true}, std::pair{Numerics::official, true}}) {
        gpu::RunnerOptions o = small_options();
        o.numerics = nm;
        o.moe_small = moe_small;
        // Two sequences: a prefill of 20 tokens each, then 8 decode steps of both (with an idle
        // step after each: the exchange alone, as a rank without tokens runs it, which must not
        // touch the sequences' state).
        auto run = [&](gpu::Runner& r, bool idle = false) {
            std::vector<std::vector<float>> out;
            std::vector<int32_t> slots;
            for (int i = 0; i < 2; ++i) {
                slots.push_back(r.open());
                EXPECT_TRUE(r.reserve(slots.back(), 64));
            }
            std::vector<gpu::RunnerChunk> pre;
            for (int i = 0; i < 2; ++i)
                pre.push_back({slots[static_cast<size_t>(i)],
                               std::vector<int32_t>(c->input_ids.begin() + 3 * i, c->input_ids.begin() + 3 * i + 20)});
            out.emplace_back();
            r.step(pre, true, out.back());
            for (int step = 0; step < 8; ++step) {
                std::vector<gpu::RunnerChunk> dec;
                for (int i = 0; i < 2; ++i)
                    dec.push_back({slots[static_cast<size_t>(i)], {c->input_ids[static_cast<size_t>(30 + 5 * i + step)]}});
                out.emplace_back();
                r.step(dec, false, out.back());
                if (idle) r.step_idle();
            }
            return out;
        };
        std::vector<std::vector<float>> want;
        {
            gpu::Runner base(*c->model, o);
            want = run(base);
        }
        std::vector<std::pair<std::string, std::unique_ptr<dist::ExpertExchange>>> exchanges;
        exchanges.emplace_back("all-gather + reduce-scatter, slot rows",
                               std::make_unique<dist::GatherScatterExchange>(comms[0], mp.layers, o.max_batch_tokens, k, D,
                                                                             dist::Combine::slot_rows));
        exchanges.emplace_back("all-gather + reduce-scatter, partial sums",
                               std::make_unique<dist::GatherScatterExchange>(comms[0], mp.layers, o.max_batch_tokens, k, D,
                                                                             dist::Combine::partial_sums));
        exchanges.emplace_back("all-to-all", std::make_unique<dist::AllToAllExchange>(comms[0], mp.layers,
                                                                                      o.max_batch_tokens, k, D));
        exchanges.emplace_back("all-gather + reduce-scatter, slot rows, the head split by vocabulary",
                               std::make_unique<dist::GatherScatterExchange>(comms[0], mp.layers, o.max_batch_tokens, k, D,
                                                                             dist::Combine::slot_rows));
        // The head's vocabulary exchange (a world of one: one slice, the whole vocabulary).
        dist::VocabExchange vx(comms[0], dist::split_vocab(V(), 1), o.max_logit_rows, D);
        for (auto& [name, ex] : exchanges)
            // 48: every step moves padding rows past its tokens (ids −1). (Not more: the expert
            // layer's tile follows the rows it is given, and up to 48 rows · k = 4 over E = 16 it is
            // the tile of the unpadded steps, mma_128x8, whose sums are the same bits.) With the
            // small path, 2: the decode steps stay on it (48 rows would take the general path, whose
            // sums differ in order from the one-GPU small path's), and the idle steps run it over
            // padding alone.
            for (int64_t rows : {int64_t{0}, moe_small ? int64_t{2} : int64_t{48}}) {
                SCOPED_TRACE(name + (nm == Numerics::official ? ", official" : ", exact") +
                             (moe_small ? ", small-T path" : "") + ", exchange rows " + std::to_string(rows));
                gpu::RunnerOptions oe = o;
                oe.exchange = ex.get();
                const bool split_head = name.find("head split") != std::string::npos;
                if (split_head) oe.head_exchange = &vx;
                gpu::Runner r(*c->model, oe);
                EXPECT_EQ(r.plan().ep_world, 1);
                EXPECT_EQ(r.plan().head_slice, split_head);
                r.set_exchange_rows(rows);
                // Head rows: 2, every decode step's own (more would change the head linear's M, and
                // with it the split of its sums); the idle steps need at least one.
                if (split_head) r.set_head_rows(rows > 0 ? 2 : 0);
                const std::vector<std::vector<float>> got = run(r, rows > 0);
                ASSERT_EQ(got.size(), want.size());
                for (size_t i = 0; i < got.size(); ++i) {
                    ASSERT_EQ(got[i].size(), want[i].size()) << "step " << i;
                    EXPECT_EQ(0, std::memcmp(got[i].data(), want[i].data(), want[i].size() * 4)) << "step " << i;
                }
                // Decode: one graph (and with idle steps one more), captured at its first step.
                EXPECT_EQ(r.graphs_captured(), rows > 0 ? 2 : 1);
                EXPECT_EQ(r.graph_replays(), rows > 0 ? 14 : 7);
                comms[0].check();
            }
    }
    // Refusals, before anything is uploaded: an exchange that carries fewer tokens than a step may
    // hold, and one partitioned for another layer count; exchange rows past the step size or
    // without an exchange.
    gpu::RunnerOptions o = small_options();
    {
        gpu::Runner plain(*c->model, o);
        test::expect_error([&] { plain.set_exchange_rows(8); }, {"set_exchange_rows", "without an expert exchange"});
        dist::GatherScatterExchange ex(comms[0], mp.layers, o.max_batch_tokens, k, D, dist::Combine::slot_rows);
        gpu::RunnerOptions oe = o;
        oe.exchange = &ex;
        gpu::Runner r(*c->model, oe);
        test::expect_error([&] { r.set_exchange_rows(257); }, {"257 exchange rows", "--max-batch-tokens 256"});
        test::expect_error([&] { r.set_head_rows(1); }, {"set_head_rows", "without a vocabulary exchange"});
        // With the head split, the MTP block's passes are refused (they run on one GPU).
        dist::VocabExchange vx(comms[0], dist::split_vocab(V(), 1), o.max_logit_rows, D);
        oe.head_exchange = &vx;
        gpu::Runner rh(*c->model, oe);
        const int32_t slot = rh.open();
        ASSERT_TRUE(rh.reserve(slot, 8));
        std::vector<float> a, b;
        if (rh.has_mtp())
            test::expect_error([&] { rh.step_mtp({{slot, {1, 2}}}, {{2, 3}}, a, b); }, {"MTP block's passes run on one GPU"});
        test::expect_error([&] { rh.step_idle(); }, {"set_exchange_rows of at least 1"});
        rh.set_exchange_rows(4);
        test::expect_error([&] { rh.step_idle(); }, {"set_head_rows of at least 1"});
        // A vocabulary exchange without the expert exchange, or carrying too few rows.
        gpu::RunnerOptions oh = o;
        oh.head_exchange = &vx;
        test::expect_error([&] { gpu::Runner bad(*c->model, oh); }, {"comes with expert parallelism"});
        dist::VocabExchange few_rows(comms[0], dist::split_vocab(V(), 1), o.max_logit_rows - 1, D);
        oe.head_exchange = &few_rows;
        test::expect_error([&] { gpu::Runner bad(*c->model, oe); }, {"carries 255 rows per call"});
    }
    dist::GatherScatterExchange few(comms[0], mp.layers, o.max_batch_tokens - 1, k, D, dist::Combine::slot_rows);
    o.exchange = &few;
    test::expect_error([&] { gpu::Runner r(*c->model, o); }, {"carries 255 tokens per call"});
    std::vector<dist::ExpertPartition> short_layers(mp.layers.begin(), mp.layers.end() - 1);
    dist::GatherScatterExchange short_ex(comms[0], short_layers, o.max_batch_tokens, k, D, dist::Combine::slot_rows);
    o.exchange = &short_ex;
    test::expect_error([&] { gpu::Runner r(*c->model, o); }, {"num_hidden_layers"});
}

// The multi-GPU backend (gpu/multi_backend.h: a runner per GPU on its own thread, data-parallel
// attention, the exchange) in a world of one, through the Backend interface the engine uses:
// three sequences (prefills of different lengths, then decode steps with logits and with draws on
// the GPU, greedy and sampled) give the single-GPU backend's logits and tokens bit for bit. Both
// runners take moe_layer_routed (the small-T path off), as in the test above. The refusals of the
// multi-GPU path are checked too.
TEST_P(GpuRunner, MultiGpuBackendWorldOfOneEqualsOneGpu) {
    gpu::RunnerOptions o = small_options();
    o.moe_small = false;
    auto drive = [&](Backend& b) {
        std::vector<std::vector<float>> logits;
        std::vector<std::vector<SampledToken>> drawn;
        std::vector<int32_t> slots;
        for (int i = 0; i < 3; ++i) {
            slots.push_back(b.open());
            EXPECT_GE(slots.back(), 0);
            EXPECT_TRUE(b.reserve(slots.back(), 80));
        }
        std::vector<BackendChunk> pre;
        for (int i = 0; i < 3; ++i)
            pre.push_back({slots[static_cast<size_t>(i)],
                           std::vector<int32_t>(c->input_ids.begin() + i, c->input_ids.begin() + 12 + 5 * i)});
        logits.emplace_back();
        b.step(pre, true, logits.back());
        for (int step = 0; step < 6; ++step) {
            std::vector<BackendChunk> dec;
            std::vector<SampleSpec> spec;
            for (int i = 0; i < 3; ++i) {
                dec.push_back({slots[static_cast<size_t>(i)], {c->input_ids[static_cast<size_t>(40 + 3 * i + step)]}});
                SampleSpec sp{i == 0 ? 0.0f : 0.8f};
                sp.top_k = i == 2 ? 5 : 0;
                sp.seed = 1234 + static_cast<uint64_t>(i);
                sp.index = step;
                sp.n_top = i == 1 ? 3 : -1;
                spec.push_back(sp);
            }
            if (step % 2 == 0) {
                logits.emplace_back();
                b.step(dec, false, logits.back());
            } else {
                drawn.emplace_back();
                b.step_sample(dec, spec, drawn.back());
            }
        }
        EXPECT_EQ(b.n_past(slots[2]), 20 + 6);   // a prefill of 12 + 4·2 tokens, 6 decodes
        return std::make_pair(logits, drawn);
    };
    auto one = gpu::make_gpu_backend(*c->model, o);
    const auto want = drive(*one);
    one.reset();
    gpu::MultiGpuOptions mo;
    mo.devices = {0};
    for (dist::Scheme scheme : {dist::Scheme::gather_scatter, dist::Scheme::all_to_all}) {
        SCOPED_TRACE(dist::scheme_name(scheme));
        mo.scheme = scheme;
        std::ostringstream log;
        auto multi = gpu::make_multi_gpu_backend(*c->model, o, mo, &log);
        EXPECT_NE(log.str().find("GPU 0 (CUDA device 0): GPU memory plan"), std::string::npos) << log.str();
        EXPECT_EQ(multi->max_seqs(), o.max_seqs);
        const auto got = drive(*multi);
        ASSERT_EQ(got.first.size(), want.first.size());
        for (size_t i = 0; i < got.first.size(); ++i) {
            ASSERT_EQ(got.first[i].size(), want.first[i].size()) << "logits step " << i;
            EXPECT_EQ(0, std::memcmp(got.first[i].data(), want.first[i].data(), want.first[i].size() * 4))
                << "logits step " << i;
        }
        ASSERT_EQ(got.second.size(), want.second.size());
        for (size_t i = 0; i < got.second.size(); ++i)
            for (size_t j = 0; j < got.second[i].size(); ++j) {
                EXPECT_EQ(got.second[i][j].id, want.second[i][j].id) << "draw step " << i << ", row " << j;
                EXPECT_EQ(got.second[i][j].logprob, want.second[i][j].logprob) << "draw step " << i << ", row " << j;
                EXPECT_EQ(got.second[i][j].top, want.second[i][j].top) << "draw step " << i << ", row " << j;
            }
        // Bad input is refused before any rank starts, and the backend still runs afterwards.
        const int32_t s = multi->open();
        ASSERT_GE(s, 0);
        ASSERT_TRUE(multi->reserve(s, 4));
        std::vector<float> l;
        test::expect_error([&] { multi->step({{s, {0, 1, 2, 3, 4}}}, false, l); }, {"reserved"});
        test::expect_error([&] { multi->step({{s, {static_cast<int32_t>(V())}}}, false, l); }, {"outside the vocabulary"});
        test::expect_error([&] { multi->step({{s, {1}}}, false, l, [](TraceView&) {}); }, {"probes", "one GPU"});
        multi->step({{s, {1, 2}}}, false, l);
        EXPECT_EQ(l.size(), static_cast<size_t>(V()));
        multi->close(s);
    }
    gpu::RunnerOptions spec = o;
    spec.rollback = true;
    test::expect_error([&] { (void)gpu::make_multi_gpu_backend(*c->model, spec, mo); }, {"speculative decoding"});
    mo.devices = {0, 0};
    test::expect_error([&] { (void)gpu::make_multi_gpu_backend(*c->model, o, mo); }, {"named twice"});
    mo.devices = {0, 4096};
    test::expect_error([&] { (void)gpu::make_multi_gpu_backend(*c->model, o, mo); }, {"CUDA device 4096 is not visible"});
}
#endif

// Decode steps of ≥ cuda::kLtMinM sequences in official numerics put cuBLASLt's FP8 GEMM inside the
// captured graph (and ≥ cuda::kLtBf16MinM in exact numerics its BF16 GEMM): replay equals eager bit
// for bit there too. 32 sequences (official) and 256 (exact), a prefill of 3 tokens each, then
// decode steps; the cuBLASLt launches of the graphed runner are counted at capture.
TEST_P(GpuRunner, GraphReplayEqualsEagerWithCublasLt) {
    for (const auto& [nm, seqs] : {std::pair{Numerics::official, int64_t{32}}, std::pair{Numerics::exact, int64_t{256}}}) {
        gpu::RunnerOptions with = small_options();
        with.numerics = nm;
        with.max_seqs = seqs;
        with.max_batch_tokens = 3 * seqs;
        with.max_logit_rows = seqs;
        with.max_model_len = 64;
        gpu::RunnerOptions without = with;
        without.graphs = false;
        gpu::Runner rg(*c->model, with), re(*c->model, without);
        std::vector<int32_t> sg, se;
        std::vector<gpu::RunnerChunk> pg, pe;
        for (int64_t i = 0; i < seqs; ++i) {
            sg.push_back(rg.open());
            se.push_back(re.open());
            ASSERT_TRUE(rg.reserve(sg.back(), 16) && re.reserve(se.back(), 16));
            const auto at = c->input_ids.begin() + i % 200;
            pg.push_back({sg.back(), std::vector<int32_t>(at, at + 3)});
            pe.push_back({se.back(), std::vector<int32_t>(at, at + 3)});
        }
        std::vector<float> lg, le;
        rg.step(pg, false, lg);
        re.step(pe, false, le);
        ASSERT_EQ(std::memcmp(lg.data(), le.data(), lg.size() * 4), 0) << numerics_name(nm) << " prefill";
        for (int step = 0; step < 4; ++step) {
            std::vector<gpu::RunnerChunk> dg, de;
            for (int64_t i = 0; i < seqs; ++i) {
                const int32_t tok = c->input_ids[static_cast<size_t>((3 + i + step) % 200)];
                dg.push_back({sg[static_cast<size_t>(i)], {tok}});
                de.push_back({se[static_cast<size_t>(i)], {tok}});
            }
            rg.step(dg, false, lg);
            re.step(de, false, le);
            ASSERT_EQ(lg.size(), le.size());
            ASSERT_EQ(std::memcmp(lg.data(), le.data(), lg.size() * 4), 0) << numerics_name(nm) << " decode step " << step;
        }
        std::printf("[ %s | %s, %lld sequences ] graph replays %lld; cuBLASLt launches: FP8 %lld, BF16 %lld (graphed "
                    "runner, counted at capture)\n",
                    GetParam().c_str(), numerics_name(nm), static_cast<long long>(seqs),
                    static_cast<long long>(rg.graph_replays()), static_cast<long long>(rg.lt_linear_launches()),
                    static_cast<long long>(rg.lt_bf16_launches()));
        EXPECT_EQ(rg.graph_replays(), 3) << numerics_name(nm);
        if (nm == Numerics::official) EXPECT_GT(rg.lt_linear_launches(), 0);
        else EXPECT_GT(rg.lt_bf16_launches(), 0);
    }
}
// Official numerics at ≤ 8 tokens per step (runner.cpp, kFp8ActMaxT): the FP8 linears run FP8 × FP8 (linear_fp8_act on the
// codes made beside each rounded input) instead of the BF16 path on the same rounded values. The
// two differ only in f32 summation order, so decode logits agree to cosine ≥ 0.99999 per row, with
// the same argmax except at near ties, and a graph replay of the FP8 path equals its eager run bit
// for bit. (On the tiny models the two are even bit-identical: their products span few enough
// binades that every f32 sum is exact, whatever the order; the launch count shows which ran.)
TEST_P(GpuRunner, Fp8LinearsMatchBf16LinearsInOfficialDecode) {
    gpu::RunnerOptions fp8 = small_options(), eager = small_options(), bf16 = small_options();
    fp8.numerics = eager.numerics = bf16.numerics = Numerics::official;
    eager.graphs = false;
    bf16.fp8_activations = false;
    fp8.lt_fp8 = eager.lt_fp8 = false;   // the 122-token prefill on the BF16 path in all three (cuBLASLt:
                                         // GpuOfficialCode.LtLinearsAgreeAsWellAsBf16Linears)
    gpu::Runner ra(*c->model, fp8), re(*c->model, eager), rb(*c->model, bf16);
    std::vector<int32_t> sa, se, sb;
    for (int i = 0; i < 4; ++i) {
        sa.push_back(ra.open());
        se.push_back(re.open());
        sb.push_back(rb.open());
        ASSERT_TRUE(ra.reserve(sa.back(), 128) && re.reserve(se.back(), 128) && rb.reserve(sb.back(), 128));
    }
    std::vector<float> la, le, lb;
    std::vector<gpu::RunnerChunk> pa, pe, pb;   // prefill: > 8 tokens, the BF16 path in all three
    for (int i = 0; i < 4; ++i) {
        std::vector<int32_t> toks(c->input_ids.begin() + i, c->input_ids.begin() + i + 20 + 7 * i);
        pa.push_back({sa[static_cast<size_t>(i)], toks});
        pe.push_back({se[static_cast<size_t>(i)], toks});
        pb.push_back({sb[static_cast<size_t>(i)], toks});
    }
    ra.step(pa, false, la);
    re.step(pe, false, le);
    rb.step(pb, false, lb);
    ASSERT_EQ(std::memcmp(la.data(), lb.data(), la.size() * 4), 0) << "prefill takes the same path";
    double worst = 1.0, max_diff = 0.0;
    int64_t rows = 0, same_top = 0, differing = 0;
    for (int step = 0; step < 24; ++step) {
        std::vector<gpu::RunnerChunk> da, de, db;
        for (int i = 0; i < 4; ++i) {
            const int32_t tok = c->input_ids[static_cast<size_t>(40 + 7 * i + step)];
            da.push_back({sa[static_cast<size_t>(i)], {tok}});
            de.push_back({se[static_cast<size_t>(i)], {tok}});
            db.push_back({sb[static_cast<size_t>(i)], {tok}});
        }
        ra.step(da, false, la);
        re.step(de, false, le);
        rb.step(db, false, lb);
        ASSERT_EQ(la.size(), le.size());
        ASSERT_EQ(std::memcmp(la.data(), le.data(), la.size() * 4), 0) << "graph replay vs eager, decode step " << step;
        for (int64_t r = 0; r < 4; ++r) {
            const float* a = la.data() + r * V();
            const float* b = lb.data() + r * V();
            worst = std::min(worst, cosine(a, b, V()));
            for (int64_t v = 0; v < V(); ++v) max_diff = std::max(max_diff, double(std::fabs(a[v] - b[v])));
            differing += std::memcmp(a, b, static_cast<size_t>(V()) * 4) != 0;
            same_top += std::max_element(a, a + V()) - a == std::max_element(b, b + V()) - b;
            ++rows;
        }
    }
    std::printf("[ %s | official decode ] FP8 x FP8 linears vs BF16 linears: %lld rows, worst cosine %.8f, max |diff| "
                "%.3e, same argmax %lld, rows not bit-identical %lld; FP8 x FP8 launches %lld\n",
                GetParam().c_str(), static_cast<long long>(rows), worst, max_diff, static_cast<long long>(same_top),
                static_cast<long long>(differing), static_cast<long long>(ra.fp8_linear_launches()));
    EXPECT_GE(worst, 0.99999);
    EXPECT_GE(same_top, rows - 2) << "argmax differs beyond near ties";
    EXPECT_GT(ra.fp8_linear_launches(), 0) << "the FP8 x FP8 path did not run";
    EXPECT_GT(re.fp8_linear_launches(), 0);
    EXPECT_EQ(rb.fp8_linear_launches(), 0) << "fp8_activations off";
    EXPECT_EQ(ra.graph_replays(), 23);
}
// The same at 17-64 tokens per step (RunnerOptions::fp8_act_max_t = 64, cuBLASLt off): prefill
// chunks of 24 and of 40 tokens (and the rest) through linear_fp8_act's 4- and 8-tile instances,
// against the BF16 path on the same rounded values. Again only the f32 summation order differs, so
// every position's logits agree to cosine ≥ 0.99999 with the same argmax except at near ties.
TEST_P(GpuRunner, Fp8LinearsUpTo64TokensMatchBf16Linears) {
    gpu::RunnerOptions fp8 = small_options(), bf16 = small_options();
    fp8.numerics = bf16.numerics = Numerics::official;
    fp8.lt_fp8 = false;
    fp8.fp8_act_max_t = 64;
    bf16.fp8_activations = false;
    gpu::Runner ra(*c->model, fp8), rb(*c->model, bf16);
    for (const int64_t chunk : {24, 40}) {
        const int64_t before = ra.fp8_linear_launches();
        const std::vector<float> la = gpu::sequence_logits_mtp(ra, c->input_ids, Schedule{-1, chunk}).logits;
        const std::vector<float> lb = gpu::sequence_logits_mtp(rb, c->input_ids, Schedule{-1, chunk}).logits;
        ASSERT_EQ(la.size(), lb.size());
        double worst = 1.0;
        int64_t same_top = 0;
        for (int64_t r = 0; r < T(); ++r) {
            const float* a = la.data() + r * V();
            const float* b = lb.data() + r * V();
            worst = std::min(worst, cosine(a, b, V()));
            same_top += std::max_element(a, a + V()) - a == std::max_element(b, b + V()) - b;
        }
        const int64_t launches = ra.fp8_linear_launches() - before;
        std::printf("[ %s | official, chunks of %lld ] FP8 x FP8 linears vs BF16 linears: %lld rows, worst cosine "
                    "%.8f, same argmax %lld; FP8 x FP8 launches %lld\n",
                    GetParam().c_str(), static_cast<long long>(chunk), static_cast<long long>(T()), worst,
                    static_cast<long long>(same_top), static_cast<long long>(launches));
        EXPECT_GE(worst, 0.99999) << "chunks of " << chunk;
        EXPECT_GE(same_top, T() - 2) << "argmax differs beyond near ties, chunks of " << chunk;
        EXPECT_GT(launches, 0) << "the FP8 x FP8 path did not run, chunks of " << chunk;
    }
    EXPECT_EQ(ra.lt_linear_launches(), 0);
    EXPECT_EQ(rb.fp8_linear_launches(), 0) << "fp8_activations off";
    gpu::RunnerOptions bad = small_options();
    bad.numerics = Numerics::official;
    bad.fp8_act_max_t = 65;
    EXPECT_THROW((void)gpu::Runner(*c->model, bad), Error) << "fp8_act_max_t past kRegsMaxM";
    bad.fp8_act_max_t = -1;
    bad.lt_min_out = -2;
    EXPECT_THROW((void)gpu::Runner(*c->model, bad), Error) << "lt_min_out below -1";
}
// Prefix snapshots on the GPU: a sequence opened from a snapshot continues exactly as the one it
// was taken from (bit for bit: the same state and the same step shapes), keeps working after that
// one is closed (the shared blocks stay held), and every block comes back when all let go.
TEST_P(GpuRunner, PrefixSnapshotsContinueBitForBit) {
    gpu::RunnerOptions o = small_options();
    o.block_tokens = 16;
    o.graphs = false;
    gpu::Runner r(*c->model, o);
    ASSERT_EQ(r.prefix_block(), 16);
    const auto& ids = c->input_ids;
    auto toks = [&](size_t b, size_t e) { return std::vector<int32_t>(ids.begin() + static_cast<long>(b), ids.begin() + static_cast<long>(e)); };
    const double empty = r.cache_usage();
    const int32_t a = r.open();
    ASSERT_TRUE(r.reserve(a, 80));
    std::vector<float> la, lb, lc;
    r.step({{a, toks(0, 48)}}, false, la);
    const int32_t h = r.snapshot(a);
    ASSERT_GE(h, 0);
    r.step({{a, toks(48, 60)}}, false, la);
    const int32_t b = r.open_from(h);
    ASSERT_GE(b, 0);
    EXPECT_EQ(r.n_past(b), 48);
    ASSERT_TRUE(r.reserve(b, 80));
    r.step({{b, toks(48, 60)}}, false, lb);
    ASSERT_EQ(la.size(), lb.size());
    EXPECT_EQ(std::memcmp(la.data(), lb.data(), la.size() * 4), 0) << "the snapshot's continuation differs";
    {   // The states agree too (rings, open windows, compressed rows, indexer keys).
        const SequenceState sa = r.download_state(a), sb = r.download_state(b);
        ASSERT_EQ(sa.n_past, sb.n_past);
        for (size_t l = 0; l < sa.layers.size(); ++l) {
            EXPECT_EQ(sa.layers[l].window, sb.layers[l].window) << "layer " << l;
            EXPECT_EQ(sa.layers[l].comp.rows, sb.layers[l].comp.rows) << "layer " << l;
            EXPECT_EQ(sa.layers[l].index_comp.rows, sb.layers[l].index_comp.rows) << "layer " << l;
        }
    }
    // The original goes; the snapshot's sequence and a fresh one from the snapshot go on.
    r.close(a);
    const int32_t c2 = r.open_from(h);
    ASSERT_TRUE(r.reserve(c2, 80));
    r.step({{c2, toks(48, 60)}}, false, lc);
    EXPECT_EQ(std::memcmp(lb.data(), lc.data(), lb.size() * 4), 0);
    for (int step = 0; step < 10; ++step) {
        r.step({{b, toks(60 + step, 61 + step)}}, false, lb);
        r.step({{c2, toks(60 + step, 61 + step)}}, false, lc);
        ASSERT_EQ(std::memcmp(lb.data(), lc.data(), lb.size() * 4), 0) << "decode step " << step;
    }
    r.drop_snapshot(h);
    r.close(b);
    r.close(c2);
    EXPECT_EQ(r.cache_usage(), empty) << "blocks leaked";
    // Records run out: -1, not a crash; a snapshot off a block boundary is a bug the pool names.
    std::vector<int32_t> held;
    const int32_t d = r.open();
    ASSERT_TRUE(r.reserve(d, 32));
    r.step({{d, toks(0, 16)}}, false, la);
    for (int k = 0; k < 8; ++k) held.push_back(r.snapshot(d));
    EXPECT_EQ(std::count(held.begin(), held.end(), -1), 8 - static_cast<long>(o.max_seqs));
    r.step({{d, toks(16, 17)}}, false, la);
    test::expect_error([&] { r.snapshot(d); }, {"multiple of 16"});
    for (int32_t k : held) r.drop_snapshot(k);
    r.close(d);
    EXPECT_EQ(r.cache_usage(), empty);
}


// A batch of sequences gives each the logits it gets alone (within bf16 noise: kernels may pick
// other tiles for other batch sizes), and bad input changes nothing.
TEST_P(GpuRunner, BatchedSequencesAndBadInput) {
    auto b = gpu::make_gpu_backend(*c->model, small_options());
    const std::vector<int32_t> a(c->input_ids.begin(), c->input_ids.begin() + 60);
    const std::vector<int32_t> d(c->input_ids.rbegin(), c->input_ids.rbegin() + 45);
    const std::vector<float> solo_a = sequence_logits(*b, a, Schedule{30, 0});
    const std::vector<float> solo_d = sequence_logits(*b, d, Schedule{20, 0});
    const int32_t sa = b->open(), sd = b->open();
    ASSERT_TRUE(b->reserve(sa, 60));
    ASSERT_TRUE(b->reserve(sd, 45));
    std::vector<float> la, ld, logits;
    b->step({{sa, std::vector<int32_t>(a.begin(), a.begin() + 30)}, {sd, std::vector<int32_t>(d.begin(), d.begin() + 20)}},
            true, logits);
    la.insert(la.end(), logits.begin(), logits.begin() + 30 * V());
    ld.insert(ld.end(), logits.begin() + 30 * V(), logits.end());
    for (size_t i = 30; i < 60; ++i) {
        std::vector<BackendChunk> ch{{sa, {a[i]}}};
        if (i - 10 < 45) ch.push_back({sd, {d[i - 10]}});
        b->step(ch, false, logits);
        la.insert(la.end(), logits.begin(), logits.begin() + V());
        if (ch.size() == 2) ld.insert(ld.end(), logits.begin() + V(), logits.end());
    }
    ASSERT_EQ(la.size(), solo_a.size());
    ASSERT_EQ(ld.size(), solo_d.size());
    // Batched and solo runs round differently (other tiles, other split counts), and a near tie
    // in a top-k can flip for one token: per position the logits stay close on average.
    const LogitStats s1 = compare_logits(la, solo_a.data(), 60, V()), s2 = compare_logits(ld, solo_d.data(), 45, V());
    std::printf("[ %s ] batched vs solo: mean cosine %.6f / %.6f, min %.6f / %.6f\n", GetParam().c_str(), s1.mean_cos,
                s2.mean_cos, s1.min_cos, s2.min_cos);
    EXPECT_GE(s1.mean_cos, 0.9995);
    EXPECT_GE(s2.mean_cos, 0.9995);
    EXPECT_GE(std::min(s1.min_cos, s2.min_cos), 0.99);

    // Bad input: nothing changes, and the sequence continues afterwards.
    ASSERT_TRUE(b->reserve(sa, 64));
    ASSERT_TRUE(b->reserve(sd, 46));
    const int64_t before = b->n_past(sa);
    test::expect_error([&] { b->step({{sa, {static_cast<int32_t>(V())}}}, false, logits); }, {"outside the vocabulary"});
    test::expect_error([&] { b->step({{sa, {1, 2, 3, 4, 5}}}, false, logits); }, {"reserved"});
    test::expect_error([&] { b->step({{99, {1}}}, false, logits); }, {"not open"});
    EXPECT_EQ(b->n_past(sa), before);
    EXPECT_FALSE(b->reserve(sa, 100000));   // past max_model_len: refused, others undisturbed
    EXPECT_EQ(b->n_past(sd), 45);
    b->step({{sa, {a[5]}}, {sd, {d[5]}}}, false, logits);   // both go on
    EXPECT_EQ(b->n_past(sa), before + 1);
}

// Sampling on the GPU inside the step: greedy draws are the logits' argmax, seeded draws equal
// the CPU sampler's (its twin) on the same logits and key, logprobs match, masked ids never come.
TEST_P(GpuRunner, StepSampleIsTheCpuSamplersTwin) {
    gpu::Runner run(*c->model, small_options());
    const std::vector<int32_t> prompt(c->input_ids.begin(), c->input_ids.begin() + 40);
    std::vector<int32_t> masked;
    for (int32_t id = 1000; id < V(); ++id) masked.push_back(id);   // the tail of the vocabulary
    run.set_masked_ids(masked);
    int64_t same = 0, total = 0;
    for (int trial = 0; trial < 4; ++trial) {
        // Two slots, the same prompt and shape: the same logits bit for bit (deterministic kernels).
        const int32_t a = run.open(), b = run.open();
        ASSERT_TRUE(run.reserve(a, 64));
        ASSERT_TRUE(run.reserve(b, 64));
        std::vector<float> logits;
        run.step({{a, prompt}}, false, logits);
        for (int32_t id : masked) logits[static_cast<size_t>(id)] = -std::numeric_limits<float>::infinity();
        SamplingParams sp;
        sp.temperature = trial == 0 ? 0.0f : 0.7f + 0.3f * static_cast<float>(trial);
        sp.top_k = trial == 2 ? 50 : 0;
        sp.top_p = trial == 3 ? 0.9f : 1.0f;
        sp.min_p = trial == 1 ? 0.05f : 0.0f;
        sp.seed = 1234 + static_cast<uint64_t>(trial);
        SampleSpec spec{sp.temperature, sp.top_k, sp.top_p, sp.min_p, *sp.seed, 7, 5};
        std::vector<SampledToken> got;
        run.step_sample({{b, prompt}}, {spec}, got);
        ASSERT_EQ(got.size(), 1u);
        Sampler cpu(sp, 0);
        const int32_t want = cpu.sample(logits.data(), V(), 7);
        EXPECT_EQ(got[0].id, want) << "trial " << trial;
        EXPECT_LT(got[0].id, 1000) << "a masked id was drawn";
        EXPECT_NEAR(got[0].logprob, token_logprob(logits.data(), V(), got[0].id), 1e-4);
        const auto top = top_logprobs(logits.data(), V(), 5);
        ASSERT_EQ(got[0].top.size(), top.size());
        for (size_t j = 0; j < top.size(); ++j) {
            EXPECT_EQ(got[0].top[j].first, top[j].first);
            EXPECT_NEAR(got[0].top[j].second, top[j].second, 1e-4);
        }
        run.close(a);
        run.close(b);
    }
    // Decode steps through the graph: many keys against the CPU twin on the same logits.
    const int32_t a = run.open(), b = run.open();
    ASSERT_TRUE(run.reserve(a, 128));
    ASSERT_TRUE(run.reserve(b, 128));
    std::vector<float> la;
    std::vector<SampledToken> sb;
    run.step({{a, prompt}}, false, la);
    run.step_sample({{b, prompt}}, {SampleSpec{}}, sb);
    for (int i = 0; i < 40; ++i) {
        const int32_t tok = c->input_ids[static_cast<size_t>(40 + i)];
        run.step({{a, {tok}}}, false, la);
        for (int32_t id : masked) la[static_cast<size_t>(id)] = -std::numeric_limits<float>::infinity();
        SamplingParams sp;
        sp.temperature = 1.0f;
        sp.seed = 99;
        const SampleSpec spec{1.0f, 0, 1.0f, 0.0f, 99, i, -1};
        run.step_sample({{b, {tok}}}, {spec}, sb);
        Sampler cpu(sp, 0);
        same += sb[0].id == cpu.sample(la.data(), V(), i);
        ++total;
    }
    std::printf("[ %s ] GPU draws equal to the CPU sampler's: %lld of %lld decode steps\n", GetParam().c_str(),
                static_cast<long long>(same), static_cast<long long>(total));
    EXPECT_EQ(same, total);
}

// The command line on the GPU: `logits --backend cuda` writes the CPU path's file format (tensor
// 'logits' F32 [T, vocab]) with the GPU's logits; `generate --backend cuda` prints the greedy ids.
std::string cli_path() {
    if (std::filesystem::exists(MEGAMOE_CLI_PATH)) return MEGAMOE_CLI_PATH;
    const auto here = std::filesystem::read_symlink("/proc/self/exe").parent_path() / "megamoe";   // a packed run
    return std::filesystem::exists(here) ? here.string() : std::string("megamoe");
}

std::string run_cli(const std::string& args, int* status) {
    FILE* p = popen((cli_path() + " " + args + " 2>&1").c_str(), "r");
    std::string out;
    if (!p) return out;
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
    const int st = pclose(p);
    *status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    return out;
}

TEST_P(GpuRunner, CommandLineBackendCuda) {
    test::TempDir dir;
    std::string ids;
    for (int32_t t : c->input_ids) ids += std::to_string(t) + " ";
    {
        std::ofstream f(dir.str() + "/t.txt");
        f << ids;
    }
    const std::string model = test::golden_dir(GetParam()) + "/model";
    int st = -1;
    // Exact numerics, to compare with the CPU reference (the cuda backend's default is official).
    const std::string out = run_cli("logits --backend cuda --numerics exact --model " + model + " --tokens " + dir.str() +
                                        "/t.txt --out " + dir.str() + "/l.safetensors",
                                    &st);
    ASSERT_EQ(st, 0) << out;
    EXPECT_NE(out.find("backend cuda"), std::string::npos) << out;
    EXPECT_NE(out.find("GPU memory plan"), std::string::npos) << out;
    SafetensorsFile f(dir.str() + "/l.safetensors");
    const TensorInfo* info = f.find("logits");
    ASSERT_NE(info, nullptr);
    Tensor t = f.view(*info);
    ASSERT_EQ(t.dtype, DType::f32);
    ASSERT_EQ(t.ndim, 2);
    ASSERT_EQ(t.dim(0), T());
    ASSERT_EQ(t.dim(1), V());
    std::vector<float> got(t.as<float>(), t.as<float>() + T() * V());
    const LogitStats s = compare_logits(got, c->cpu_logits.data(), T(), V());
    EXPECT_GE(s.mean_cos, 0.998);

    // --mtp on the GPU: mtp_logits [T-1, V] next to the logits, close to the CPU reference's.
    const std::string om = run_cli("logits --backend cuda --numerics exact --mtp --model " + model + " --tokens " +
                                       dir.str() + "/t.txt --out " + dir.str() + "/m.safetensors",
                                   &st);
    ASSERT_EQ(st, 0) << om;
    {
        SafetensorsFile fm(dir.str() + "/m.safetensors");
        const TensorInfo* mi = fm.find("mtp_logits");
        ASSERT_NE(mi, nullptr);
        Tensor mt = fm.view(*mi);
        ASSERT_EQ(mt.ndim, 2);
        ASSERT_EQ(mt.dim(0), T() - 1);
        ASSERT_EQ(mt.dim(1), V());
        const MtpLogits cpu = sequence_logits_mtp(*c->model, c->input_ids, Schedule{});
        const std::vector<float> gm(mt.as<float>(), mt.as<float>() + (T() - 1) * V());
        const LogitStats sm = compare_logits(gm, cpu.mtp_logits.data(), T() - 1, V());
        std::printf("[ %s ] logits --backend cuda --mtp: mtp_logits vs the CPU reference: mean cosine %.6f\n",
                    GetParam().c_str(), sm.mean_cos);
        EXPECT_GE(sm.mean_cos, 0.998);
    }

    // --numerics auto (the default) is official on the cuda backend: the same logits as asking for it.
    std::vector<float> by_default, official;
    for (const char* flag : {"", "--numerics official"}) {
        const std::string o = run_cli(str("logits --backend cuda ", flag, " --model ", model, " --tokens ", dir.str(),
                                          "/t.txt --out ", dir.str(), "/d.safetensors"),
                                      &st);
        ASSERT_EQ(st, 0) << o;
        SafetensorsFile fd(dir.str() + "/d.safetensors");
        const Tensor td = fd.view(*fd.find("logits"));
        (*flag ? official : by_default).assign(td.as<float>(), td.as<float>() + T() * V());
    }
    EXPECT_EQ(test::max_abs_diff(by_default.data(), official.data(), official.size()), 0.0);
    EXPECT_GT(test::max_abs_diff(official.data(), got.data(), official.size()), 0.0);   // and not the exact ones

    const std::string g = run_cli("generate --backend cuda --model " + model + " --ids \"" +
                                      ids.substr(0, ids.find(' ', 40)) + "\" --max-new 8 --ignore-eos",
                                  &st);
    ASSERT_EQ(st, 0) << g;
    EXPECT_NE(g.find("backend cuda"), std::string::npos) << g;
    test::expect_error([&] { throw Error(run_cli("logits --backend tpu --model " + model + " --tokens " + dir.str() +
                                                     "/t.txt --out " + dir.str() + "/x.safetensors",
                                                 &st)); },
                       {"--backend must be cpu, cuda or auto"});
    EXPECT_NE(st, 0);
}

// ---- official numerics on the GPU (RunnerOptions::numerics)

// The CPU forward in official numerics over `ids` (one full pass): its traces and logits.
struct OfficialTraces {
    std::map<std::pair<std::string, int64_t>, std::vector<float>> f32;
    std::map<std::pair<std::string, int64_t>, std::vector<int32_t>> i32;
    std::vector<float> logits;
};
OfficialTraces cpu_official(Model& m, const std::vector<int32_t>& ids) {
    OfficialTraces r;
    const Numerics was = m.numerics;
    m.numerics = Numerics::official;
    SequenceState st(m.cfg);
    std::vector<SequenceChunk> batch{{&st, ids}};
    ForwardOptions opt;
    opt.all_logits = true;
    opt.probe = [&r](TraceView& v) {
        const auto key = std::make_pair(std::string(v.name), v.layer);
        const size_t n = static_cast<size_t>(v.rows * v.width);
        if (v.dtype == DType::i32) r.i32[key].assign(v.i32(), v.i32() + n);
        else r.f32[key].assign(v.f32(), v.f32() + n);
    };
    forward(m, batch, opt, r.logits);
    m.numerics = was;
    return r;
}

// Per state in official numerics, where the GPU stores the KV rows in FP8 (cuda/kv_row.h): after
// the same schedules as StateMatchesCpuAfterSchedules (streams and discrete choices forced to the
// CPU's official ones), (a) every downloaded window and compressed KV row is a fixed point of
// ops::round_kv_latent (the storage holds FP8 values, decoded exactly), and (b) the rows agree
// with the CPU's official state: the KV rows within the exact test's 2e-2 of the row norm (an FP8
// flip moves one element by an e4m3 step, 2^-3 of it, so a few flips per row stay well inside), and
// the share of elements that are bit-identical is printed with the indexer keys' worst row error
// (FP4 values: a flip moves an element by up to a third of its block's range).
TEST_P(GpuRunner, StateMatchesCpuOfficialWithFp8KvRows) {
    Model& m = *c->model;
    const ModelConfig& cfg = m.cfg;
    if (!cuda::KvRow::fp8_fits(cfg.head_dim, cfg.qk_rope_head_dim)) GTEST_SKIP() << "no fp8 KV rows for this shape";
    gpu::RunnerOptions o = small_options();
    o.numerics = Numerics::official;
    // The f32-summing linears, so the rows differ from the CPU's by FP8 flips at rounding boundaries
    // alone. With cuBLASLt's FP8 GEMM in the ≥ 32-token steps (the default) its ~14-bit block sums
    // (cuda/linear_lt.h) move wkv's output by ~1e-4 before the FP8 rounding, and more elements flip:
    // measured on an H200, worst row 2.26e-2 against 2e-2 (tiny-flash-nvfp4, prefill 256; 99.48% of
    // the elements still bit-identical). That path is checked against DeepSeek's code instead
    // (GpuOfficialCode.LtLinearsAgreeAsWellAsBf16Linears).
    o.lt_fp8 = false;
    auto b = gpu::make_gpu_backend(m, o);
    const int64_t total_max = 256;
    const std::vector<int32_t> ids(c->input_ids.begin(), c->input_ids.begin() + total_max);
    const OfficialTraces ref_tr = cpu_official(m, ids);
    const struct {
        const char* name;
        std::vector<int64_t> chunks;
        int64_t total;
    } schedules[] = {
        {"prefill 256", {256}, 256},
        {"chunks of 37", {37, 37, 37, 37, 37, 37, 34}, 256},
        {"prefill 100 then 33 decodes", {100}, 133},
    };
    for (const auto& sc : schedules) {
        const int32_t slot = b->open();
        ASSERT_TRUE(b->reserve(slot, sc.total));
        const int64_t p = run_forced(*b, slot, ids, sc.chunks, sc.total, ref_tr.f32, ref_tr.i32);

        SequenceState ref(cfg);
        {
            const Numerics was = m.numerics;
            m.numerics = Numerics::official;
            std::vector<SequenceChunk> batch{{&ref, std::vector<int32_t>(ids.begin(), ids.begin() + p)}};
            std::vector<float> cl;
            forward(m, batch, ForwardOptions{}, cl);
            m.numerics = was;
        }
        const SequenceState got = b->state(slot);
        ASSERT_EQ(got.n_past, ref.n_past) << sc.name;
        int64_t kv_rows = 0, not_fp8 = 0, elems = 0, same = 0;
        double kv_worst = 0, idx_worst = 0;
        auto compare = [&](const std::vector<float>& g, const std::vector<float>& r, int64_t width, bool kv, double& worst) {
            ASSERT_EQ(g.size(), r.size());
            std::vector<float> rounded;
            for (size_t i0 = 0; i0 < r.size(); i0 += static_cast<size_t>(width)) {
                if (kv) {
                    rounded.assign(g.begin() + static_cast<ptrdiff_t>(i0), g.begin() + static_cast<ptrdiff_t>(i0 + width));
                    ops::round_kv_latent(Numerics::official, rounded.data(), 1, width, cfg.qk_rope_head_dim);
                    ++kv_rows;
                    not_fp8 += std::memcmp(rounded.data(), g.data() + i0, static_cast<size_t>(width) * 4) != 0;
                }
                double dd = 0, rr = 0;
                for (size_t i = i0; i < i0 + static_cast<size_t>(width); ++i) {
                    dd += (static_cast<double>(g[i]) - r[i]) * (static_cast<double>(g[i]) - r[i]);
                    rr += static_cast<double>(r[i]) * r[i];
                    ++elems;
                    same += std::memcmp(&g[i], &r[i], 4) == 0;
                }
                worst = std::max(worst, std::sqrt(dd / std::max(rr, 1e-30)));
            }
        };
        for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
            const LayerState& g = got.layers[static_cast<size_t>(l)];
            const LayerState& r = ref.layers[static_cast<size_t>(l)];
            ASSERT_EQ(g.n_window, r.n_window) << sc.name << " layer " << l;
            compare(g.window, r.window, cfg.head_dim, true, kv_worst);
            ASSERT_EQ(g.comp.n_rows, r.comp.n_rows) << sc.name << " layer " << l;
            compare(g.comp.rows, r.comp.rows, cfg.head_dim, true, kv_worst);
            ASSERT_EQ(g.index_comp.n_rows, r.index_comp.n_rows) << sc.name << " layer " << l;
            compare(g.index_comp.rows, r.index_comp.rows, cfg.index_head_dim, false, idx_worst);
        }
        std::printf("[ %s | %s | official ] fp8 KV rows: %lld rows, %lld not FP8 values; vs CPU official: worst "
                    "relative row error %.2e (KV rows), %.2e (indexer keys); %.3f%% of %lld elements bit-identical\n",
                    GetParam().c_str(), sc.name, static_cast<long long>(kv_rows), static_cast<long long>(not_fp8),
                    kv_worst, idx_worst, 100.0 * static_cast<double>(same) / static_cast<double>(std::max<int64_t>(elems, 1)),
                    static_cast<long long>(elems));
        EXPECT_GT(kv_rows, 0) << sc.name;
        EXPECT_EQ(not_fp8, 0) << sc.name << ": KV rows that round_kv_latent changes";
        EXPECT_LE(kv_worst, 2e-2) << sc.name;
        b->close(slot);
    }
}

// Teacher forced in official numerics on both sides, per sublayer: the GPU gets the CPU's input
// streams, the CPU's sublayer inputs (attn_in, ffn_in: xn, and so the same FP8-rounded xq) and
// its discrete choices, so each sublayer output (attn_out, ffn_out) and the final norm depend on
// the CPU's inputs alone. Per (token, output): the cosine with the CPU's. The sublayer inputs are
// compared before they are replaced (ffn_in then carries the GPU's own attention output), with
// how many elements round to a different FP8 value under round_gemm_input on the two sides.
struct OfficialForced {
    int checked = 0;              // intermediates compared
    int64_t pairs = 0, below = 0; // (token, intermediate) pairs, those with cosine < 0.9999
    double worst = 1;
    std::string where;            // the worst pair: intermediate, layer, token
    int64_t worst_flips = -1;     // FP8 flips in that token's sublayer input (-1: not a sublayer output)
    int64_t input_flips = 0;      // FP8 flips over all sublayer inputs, before they are replaced
    double inputs_worst = 1;      // the sublayer inputs' worst cosine, before they are replaced
};
OfficialForced official_teacher_forced(const Model& m, const std::vector<int32_t>& ids, const OfficialTraces& ref,
                                      bool lt_fp8) {
    gpu::RunnerOptions o = small_options();
    o.numerics = Numerics::official;
    o.lt_fp8 = lt_fp8;
    auto b = gpu::make_gpu_backend(m, o);
    const int32_t slot = b->open();
    EXPECT_TRUE(b->reserve(slot, static_cast<int64_t>(ids.size())));
    OfficialForced r;
    std::map<std::tuple<std::string, int64_t, int64_t>, int64_t> flips;   // (input name, layer, token)
    std::tuple<std::string, int64_t, int64_t> worst_key;
    Probe forced = [&](TraceView& v) {
        const auto key = std::make_pair(std::string(v.name), v.layer);
        const size_t n = static_cast<size_t>(v.rows * v.width);
        if (v.dtype == DType::i32) {
            const auto& c = ref.i32.at(key);
            std::copy(c.begin(), c.begin() + static_cast<ptrdiff_t>(n), v.i32());
            v.modified = true;
            return;
        }
        const auto& c = ref.f32.at(key);
        if (key.first == trace_names::streams) {
            std::copy(c.begin(), c.begin() + static_cast<ptrdiff_t>(n), v.f32());
            v.modified = true;
            return;
        }
        const bool input = key.first == trace_names::attn_in || key.first == trace_names::ffn_in;
        for (int64_t t = 0; t < v.rows && input; ++t) {
            std::vector<float> gq(v.f32() + t * v.width, v.f32() + (t + 1) * v.width);
            std::vector<float> cq(c.data() + t * v.width, c.data() + (t + 1) * v.width);
            ops::round_gemm_input(Numerics::official, gq.data(), 1, v.width);
            ops::round_gemm_input(Numerics::official, cq.data(), 1, v.width);
            int64_t f = 0;
            for (int64_t i = 0; i < v.width; ++i) f += gq[static_cast<size_t>(i)] != cq[static_cast<size_t>(i)];
            flips[{key.first, key.second, t}] = f;
            r.input_flips += f;
            r.inputs_worst = std::min(r.inputs_worst, cosine(v.f32() + t * v.width, c.data() + t * v.width, v.width));
        }
        if (input) {   // replace: the sublayer runs on the CPU's input
            std::copy(c.begin(), c.begin() + static_cast<ptrdiff_t>(n), v.f32());
            v.modified = true;
            ++r.checked;
            return;
        }
        for (int64_t t = 0; t < v.rows; ++t) {
            const float* g = v.f32() + t * v.width;
            const float* cr = c.data() + t * v.width;
            const double cs = cosine(g, cr, v.width);
            ++r.pairs;
            r.below += cs < 0.9999;
            if (cs < r.worst) {
                r.worst = cs;
                r.where = str(key.first, " layer ", key.second, " token ", t);
                worst_key = {key.first, key.second, t};
            }
        }
        ++r.checked;
    };
    std::vector<float> logits;
    b->step({{slot, ids}}, true, logits, forced);
    const auto& [wn, wl, wt] = worst_key;
    const std::string in = wn == trace_names::attn_out ? trace_names::attn_in
                           : wn == trace_names::ffn_out ? trace_names::ffn_in : "";
    if (!in.empty() && flips.count({in, wl, wt})) r.worst_flips = flips.at({in, wl, wt});
    return r;
}

// Official numerics on the GPU against the CPU's official numerics, layer by layer, on every
// golden model, teacher forced. Official numerics are discrete: where the two sides' f32 sums
// (other orders) put a value on two sides of a bf16 or FP8 rounding boundary, one element moves
// by a whole FP8 step (2^-3 relative), or a block's power-of-two scale doubles and the block
// rounds coarser. Forcing the sublayer inputs removes such flips at the sublayer's input, but a
// sublayer has its own rounding points inside (the bf16 outputs of wq_a / wkv / wq_b / the
// experts' w1 and w3, the FP8 kv latent, z and the experts' hidden, the indexer's FP4 q and keys),
// and a flip there moves the output by ~2^-3·|x_i| / |x| per flipped element: a cosine deficit of
// a few 1e-5 each, so a token with a few flips falls below 0.9999 (the exact-numerics bar, which
// GpuRunner.TeacherForcedLayersMatchCpu meets for every pair). Measured on an H200 (2026-12-03):
// 260 of 3328 pairs below 0.9999 (official-tiny-mxfp4), 173 (tiny-flash-nvfp4), 187
// (tiny-flash-mxfp4); worst 0.99966 / 0.99971 / 0.99953, each an attn_out whose forced input had
// no FP8 flip. The bar: at least 90% of the (token, output) pairs within 0.9999 and every pair
// within 0.999 (twice the worst deficit measured; a wrong rounding step or a misplaced block
// costs far more: the exact pass against official differs by cosine ~0.987 at the logits).
class GpuOfficialNumerics : public ::testing::TestWithParam<std::string> {};

TEST_P(GpuOfficialNumerics, TeacherForcedLayersMatchCpuOfficial) {
    if (!cuda::gpu_available()) GTEST_SKIP() << "no GPU";
    const std::string& name = GetParam();
    if (!test::have_golden(name)) MEGAMOE_MISSING_GOLDEN() << "no golden case " << name;
    auto m = Model::load(test::golden_dir(name) + "/model");
    SafetensorsFile f(test::golden_dir(name) + "/golden.safetensors");
    const std::vector<int32_t> ids = ids_of(f, "input_ids");
    const OfficialTraces ref = cpu_official(*m, ids);
    // The f32-summing kernels (cuBLASLt off): every sublayer as the CPU's official numerics.
    const OfficialForced r = official_teacher_forced(*m, ids, ref, false);
    std::printf("[ %s | official ] teacher forced per sublayer: %d intermediates, %lld of %lld (token, output) pairs "
                "below cosine 0.9999; worst %.7f (%s; FP8 flips in its sublayer's unforced input: %lld); sublayer "
                "inputs before forcing: worst cosine %.7f, %lld FP8 flips in all\n",
                name.c_str(), r.checked, static_cast<long long>(r.below), static_cast<long long>(r.pairs), r.worst,
                r.where.c_str(), static_cast<long long>(r.worst_flips), r.inputs_worst,
                static_cast<long long>(r.input_flips));
    EXPECT_EQ(r.checked, 4 * m->cfg.num_hidden_layers + 1) << name;
    EXPECT_LE(r.below * 10, r.pairs) << name;
    EXPECT_GE(r.worst, 0.999) << name << ": " << r.where;
    // The 256-token step's FP8 linears through cuBLASLt (the runner's default): its FP8 WGMMA sums a
    // 128-block in ~14 bits (cuda/linear_lt.h), as DeepSeek's own FP8 GEMMs on Hopper do, so more
    // pairs fall below 0.9999 than with f32 sums. Measured on an H200: 791 of 3328 pairs
    // (official-tiny-mxfp4) and 712 (tiny-flash-nvfp4), worst 0.99917 and 0.99900. The bar follows
    // the rule above, twice the worst deficit measured: every pair within 0.998. Whole-model
    // agreement with DeepSeek's code: GpuOfficialCode.LtLinearsAgreeAsWellAsBf16Linears.
    const OfficialForced rl = official_teacher_forced(*m, ids, ref, true);
    std::printf("[ %s | official, cuBLASLt FP8 linears ] teacher forced: %lld of %lld pairs below cosine 0.9999; worst "
                "%.7f (%s)\n",
                name.c_str(), static_cast<long long>(rl.below), static_cast<long long>(rl.pairs), rl.worst,
                rl.where.c_str());
    EXPECT_EQ(rl.checked, r.checked) << name;
    EXPECT_GE(rl.worst, 0.998) << name << ": " << rl.where;
}

INSTANTIATE_TEST_SUITE_P(Golden, GpuOfficialNumerics,
                         ::testing::Values("official-tiny-mxfp4", "tiny-flash-nvfp4", "tiny-flash-mxfp4"),
                         [](const ::testing::TestParamInfo<std::string>& i) {
                             std::string n = i.param;
                             std::replace(n.begin(), n.end(), '-', '_');
                             return n;
                         });

// The whole model in official numerics on the GPU against DeepSeek's own code (official-tiny-mxfp4),
// with the bar of the CPU's test (tests/ref/numerics_test.cpp, OfficialNumerics.AgreesWithTheOfficialCode:
// the official code agrees with itself across schedules only to cosine 0.9906 / top-1 0.789, so a
// second implementation is asked for cosine >= 0.98 and top-1 >= 0.65): the full pass, the decode
// schedule of the golden (prefill 100) and the MTP block. Also printed: the CPU's official numerics
// against the same, and the GPU's official against its exact numerics (which must differ).
TEST(GpuOfficialCode, AgreesWithTheOfficialCode) {
    if (!cuda::gpu_available()) GTEST_SKIP() << "no GPU";
    const std::string name = "official-tiny-mxfp4";
    if (!test::have_golden(name)) MEGAMOE_MISSING_GOLDEN() << "no golden case " << name;
    auto m = Model::load(test::golden_dir(name) + "/model");
    SafetensorsFile f(test::golden_dir(name) + "/golden.safetensors");
    const std::vector<int32_t> ids = ids_of(f, "input_ids");
    const int64_t T = static_cast<int64_t>(ids.size()), V = m->cfg.vocab_size;
    const float* gold_full = f.view(*f.find("logits")).as<float>();
    const float* gold_decode = f.view(*f.find("logits_decode")).as<float>();
    const float* gold_mtp = f.view(*f.find("mtp_logits")).as<float>();

    gpu::RunnerOptions o = small_options();
    o.numerics = Numerics::official;
    gpu::Runner run(*m, o);
    const MtpLogits full = gpu::sequence_logits_mtp(run, ids, Schedule{-1, 0});
    const MtpLogits decode = gpu::sequence_logits_mtp(run, ids, Schedule{100, 0});
    gpu::RunnerOptions oe = small_options();
    oe.numerics = Numerics::exact;
    gpu::Runner exact_run(*m, oe);
    const MtpLogits exact = gpu::sequence_logits_mtp(exact_run, ids, Schedule{-1, 0});

    const LogitStats s_full = compare_logits(full.logits, gold_full, T, V);
    const LogitStats s_decode = compare_logits(decode.logits, gold_decode, T, V);
    const LogitStats s_mtp = compare_logits(full.mtp_logits, gold_mtp, T - 1, V);
    const LogitStats s_exact = compare_logits(exact.logits, gold_full, T, V);
    const LogitStats s_cpu = compare_logits(cpu_official(*m, ids).logits, gold_full, T, V);
    const LogitStats s_self = compare_logits(full.logits, decode.logits.data(), T, V);
    auto show = [](const char* what, const LogitStats& s) {
        std::printf("[ official-tiny-mxfp4 ] %-46s cos %.4f (min %.4f)  top-1 %.3f  max|d| %.3f\n", what, s.mean_cos,
                    s.min_cos, s.top1, s.max_abs);
    };
    show("GPU official full vs official full", s_full);
    show("GPU official decode@100 vs official decode", s_decode);
    show("GPU official MTP vs official MTP", s_mtp);
    show("GPU exact full vs official full", s_exact);
    show("CPU official full vs official full", s_cpu);
    show("GPU official decode@100 vs GPU official full", s_self);
    for (const LogitStats* s : {&s_full, &s_decode, &s_mtp}) {
        EXPECT_GE(s->mean_cos, 0.98);
        EXPECT_GE(s->top1, 0.65);
    }
    EXPECT_GT(test::max_abs_diff(full.logits.data(), exact.logits.data(), full.logits.size()), 0.05)
        << "official numerics change nothing on the GPU";
}

// Official numerics at ≥ cuda::kLtMinM tokens per step: the FP8 linears through cuBLASLt's
// block-scaled FP8 GEMM (RunnerOptions::lt_fp8) instead of the BF16 path on the same rounded values.
// cuBLASLt's FP8 WGMMA accumulates a 128-block in ~14 bits (cuda/linear_lt.h), so the two paths do
// not agree bit for bit, and this model is path-dependent in bf16 (its own code agrees with itself
// across schedules to cosine 0.9906 and top-1 78.9%): the test asks that the cuBLASLt path agrees
// with DeepSeek's code as well as the BF16 path does in mean cosine (within 0.003) and meets the bar
// of AgreesWithTheOfficialCode (cosine ≥ 0.98, top-1 ≥ 0.65), on the full pass (one 256-token step)
// and on a prefill of 100 then decode, and that the cuBLASLt launches happened (none with the option
// off). Top-1 is not compared between the paths: on this model it moves by several points with any
// summation order (measured on an H200: this path's decode@100 top-1 went from 74.2% to 69.9% when
// only the mHC mix's split count changed), so a margin between two paths would test the noise.
TEST(GpuOfficialCode, LtLinearsAgreeAsWellAsBf16Linears) {
    if (!cuda::gpu_available()) GTEST_SKIP() << "no GPU";
    const std::string name = "official-tiny-mxfp4";
    if (!test::have_golden(name)) MEGAMOE_MISSING_GOLDEN() << "no golden case " << name;
    auto m = Model::load(test::golden_dir(name) + "/model");
    SafetensorsFile f(test::golden_dir(name) + "/golden.safetensors");
    const std::vector<int32_t> ids = ids_of(f, "input_ids");
    const int64_t T = static_cast<int64_t>(ids.size()), V = m->cfg.vocab_size;
    const float* gold_full = f.view(*f.find("logits")).as<float>();
    const float* gold_decode = f.view(*f.find("logits_decode")).as<float>();
    gpu::RunnerOptions on = small_options(), off = small_options();
    on.numerics = off.numerics = Numerics::official;
    off.lt_fp8 = false;
    gpu::Runner ron(*m, on), roff(*m, off);
    const MtpLogits full_on = gpu::sequence_logits_mtp(ron, ids, Schedule{-1, 0});
    const int64_t lt_full = ron.lt_linear_launches();
    const MtpLogits decode_on = gpu::sequence_logits_mtp(ron, ids, Schedule{100, 0});
    const int64_t lt_decode = ron.lt_linear_launches() - lt_full;
    const MtpLogits full_off = gpu::sequence_logits_mtp(roff, ids, Schedule{-1, 0});
    const MtpLogits decode_off = gpu::sequence_logits_mtp(roff, ids, Schedule{100, 0});
    const LogitStats f_on = compare_logits(full_on.logits, gold_full, T, V);
    const LogitStats f_off = compare_logits(full_off.logits, gold_full, T, V);
    const LogitStats d_on = compare_logits(decode_on.logits, gold_decode, T, V);
    const LogitStats d_off = compare_logits(decode_off.logits, gold_decode, T, V);
    const LogitStats between = compare_logits(full_on.logits, full_off.logits.data(), T, V);
    auto show = [](const char* what, const LogitStats& s) {
        std::printf("[ official-tiny-mxfp4 ] %-50s cos %.4f (min %.4f)  top-1 %.3f  max|d| %.3f\n", what, s.mean_cos,
                    s.min_cos, s.top1, s.max_abs);
    };
    show("GPU official full, cuBLASLt FP8 vs official full", f_on);
    show("GPU official full, BF16 path vs official full", f_off);
    show("GPU official decode@100, cuBLASLt vs official", d_on);
    show("GPU official decode@100, BF16 path vs official", d_off);
    show("GPU official full, cuBLASLt vs BF16 path", between);
    std::printf("[ official-tiny-mxfp4 ] cuBLASLt launches: full pass %lld, prefill 100 + decode %lld\n",
                static_cast<long long>(lt_full), static_cast<long long>(lt_decode));
    for (const auto& [a, b] : {std::pair{f_on, f_off}, std::pair{d_on, d_off}}) {
        EXPECT_GE(a.mean_cos, 0.98);
        EXPECT_GE(a.top1, 0.65);
        EXPECT_GE(a.mean_cos, b.mean_cos - 0.003);
    }
    EXPECT_GT(lt_full, 0) << "the cuBLASLt path did not run";
    EXPECT_GT(lt_decode, 0) << "the 100-token prefill runs through cuBLASLt";
    EXPECT_EQ(roff.lt_linear_launches(), 0) << "lt_fp8 off";

    // Chunks of 64 tokens with both FP8 × FP8 kernels in one step (RunnerOptions::fp8_act_max_t = 64,
    // lt_min_out = D: cuBLASLt for wq_b, wo_b, the shared w2 and the indexer's wq_b of this model,
    // linear_fp8_act for wq_a, wkv and the shared w1 / w3): the same bars against DeepSeek's code.
    gpu::RunnerOptions mixed = on;
    mixed.fp8_act_max_t = 64;
    mixed.lt_min_out = m->cfg.hidden_size;
    gpu::Runner rmix(*m, mixed);
    const std::vector<float> chunk_mix = gpu::sequence_logits_mtp(rmix, ids, Schedule{-1, 64}).logits;
    const std::vector<float> chunk_off = gpu::sequence_logits_mtp(roff, ids, Schedule{-1, 64}).logits;
    const LogitStats c_mix = compare_logits(chunk_mix, gold_full, T, V);
    const LogitStats c_off = compare_logits(chunk_off, gold_full, T, V);
    show("GPU official chunks of 64, both FP8 kernels vs official", c_mix);
    show("GPU official chunks of 64, BF16 path vs official", c_off);
    std::printf("[ official-tiny-mxfp4 ] chunks of 64: FP8 x FP8 launches %lld, of them cuBLASLt %lld\n",
                static_cast<long long>(rmix.fp8_linear_launches()), static_cast<long long>(rmix.lt_linear_launches()));
    EXPECT_GE(c_mix.mean_cos, 0.98);
    EXPECT_GE(c_mix.top1, 0.65);
    EXPECT_GE(c_mix.mean_cos, c_off.mean_cos - 0.003);
    EXPECT_GT(rmix.lt_linear_launches(), 0) << "no linear took cuBLASLt";
    EXPECT_GT(rmix.fp8_linear_launches(), rmix.lt_linear_launches()) << "no linear took linear_fp8_act";
}

INSTANTIATE_TEST_SUITE_P(Golden, GpuRunner, ::testing::Values("tiny-flash-nvfp4", "tiny-flash-mxfp4"),
                         [](const auto& info) {
                             std::string s = info.param;
                             std::replace(s.begin(), s.end(), '-', '_');
                             return s;
                         });

#if defined(MEGAMOE_HAVE_NCCL)
// Synthetic weights over the multi-GPU backend (benchmarks: each rank makes only its experts and
// head rows, each as in the whole synthetic model), in a world of one: the same weights as the
// single-GPU synthetic backend, so the same logits bit for bit (the small-T path off in both).
TEST(GpuMultiBackend, SyntheticWorldOfOneEqualsOneGpu) {
    if (!cuda::gpu_available()) GTEST_SKIP() << "no GPU";
    SynthOptions so;
    so.preset = "tiny";
    const ModelConfig cfg = synth_config(so);
    gpu::RunnerOptions o = small_options();
    o.moe_small = false;
    auto drive = [&](Backend& b) {
        std::vector<std::vector<float>> out;
        const int32_t s0 = b.open(), s1 = b.open();
        EXPECT_TRUE(b.reserve(s0, 40) && b.reserve(s1, 40));
        out.emplace_back();
        b.step({{s0, {5, 6, 7, 8, 9, 10, 11}}, {s1, {12, 13, 14}}}, true, out.back());
        for (int32_t t = 0; t < 5; ++t) {
            out.emplace_back();
            b.step({{s0, {20 + t}}, {s1, {30 + t}}}, false, out.back());
        }
        return out;
    };
    auto one = gpu::make_gpu_backend(cfg, 77, o);
    const auto want = drive(*one);
    one.reset();
    gpu::MultiGpuOptions mo;
    mo.devices = {0};
    auto multi = gpu::make_multi_gpu_backend(cfg, 77, o, mo);
    const auto got = drive(*multi);
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i) {
        ASSERT_EQ(got[i].size(), want[i].size()) << "step " << i;
        for (float v : got[i]) ASSERT_TRUE(std::isfinite(v)) << "step " << i;
        EXPECT_EQ(0, std::memcmp(got[i].data(), want[i].data(), want[i].size() * 4)) << "step " << i;
    }
    mo.partition = dist::PartitionKind::balanced;
    test::expect_error([&] { (void)gpu::make_multi_gpu_backend(cfg, 77, o, mo); }, {"synthetic weights have no hash tables"});
}
#endif

// Which drops of drafted positions a rewind takes without a copy (no GPU needed): the tiny
// goldens' layers are SWA, CSA (ratio 4, overlapping compressors: pending slots per window
// parity) and HCA (ratio 16); the rings hold W + 3 rows.
TEST(GpuRunnerPlan, RewindExactRules) {
    if (!test::have_golden("tiny-flash-nvfp4")) GTEST_SKIP() << "no golden case";
    const ModelConfig c = Model::load(test::golden_dir("tiny-flash-nvfp4") + "/model")->cfg;
    const gpu::StateLayout L = gpu::StateLayout::make(c, 64, true, false);
    EXPECT_EQ(L.ring_rows, c.sliding_window + 3);
    EXPECT_TRUE(L.rewind_exact(16, 1));
    EXPECT_TRUE(L.rewind_exact(16, 3)) << "one window of every ratio";
    EXPECT_TRUE(L.rewind_exact(18, 3)) << "18..20 crosses a ratio-4 window (parity pending), not a ratio-16 one";
    EXPECT_FALSE(L.rewind_exact(30, 3)) << "30..32 crosses a ratio-16 (HCA) window";
    EXPECT_FALSE(L.rewind_exact(17, 4)) << "more positions than the rings' spare rows";
    EXPECT_TRUE(L.rewind_exact(5, 0));
}

TEST(GpuRunnerPlan, WeightBytesMatchCheckpoint) {
    if (!test::have_golden("tiny-flash-nvfp4")) GTEST_SKIP() << "no golden case";
    // The upload plan needs no GPU: packed bytes within 2% of the checkpoint's (the MTP block included).
    auto m = Model::load(test::golden_dir("tiny-flash-nvfp4") + "/model");
    const size_t dev = gpu::device_weight_bytes(*m);
    size_t ck = 0;
    struct Count : WeightVisitor {
        size_t* b;
        void tensor(const std::string&, DType t, const std::vector<int64_t>& shape, Tensor&) override {
            int64_t n = 1;
            for (int64_t d : shape) n *= d;
            *b += static_cast<size_t>(n) * dtype_size(t);
        }
        void linear(const std::string&, LinearFormat f, int64_t out, int64_t in, Linear&) override {
            *b += static_cast<size_t>(format_info(f).packed_bytes(out, in));
        }
    } cnt;
    cnt.b = &ck;
    Weights w;
    visit_weights(m->cfg, w, cnt, m->w.mtp.has_value());
    std::printf("device weight bytes %zu, checkpoint %zu (%.2f%%)\n", dev, ck, 100.0 * static_cast<double>(dev) / ck);
    // The tiny model's rows are short, so per-tensor alignment (256 B) and row padding weigh more
    // than on the real models; the 2% bound is checked on V4-Flash shapes by the benchmark.
    EXPECT_LE(static_cast<double>(dev), 1.10 * static_cast<double>(ck));
    EXPECT_GE(dev, ck * 99 / 100);
}

// Per-GPU loading (docs/multi-gpu.md §6.3): one rank's share of the tiny golden uploads, per the
// counting pass (no GPU), within the whole-model bound of the bytes dist::plan_rank_loads says the
// rank reads; a whole-model shard counts exactly as the unsharded model; bad shards are refused
// naming the field.
TEST(GpuRunnerPlan, RankShareBytesMatchTheLoadPlan) {
    if (!test::have_golden("tiny-flash-nvfp4")) GTEST_SKIP() << "no golden case";
    auto m = Model::load(test::golden_dir("tiny-flash-nvfp4") + "/model");
    const ModelConfig& c = m->cfg;
    EXPECT_EQ(gpu::DeviceModel::plan_bytes(*m, gpu::WeightShard{}), gpu::DeviceModel::plan_bytes(*m));
    for (int64_t N : {1, 2, 4}) {
        if (c.n_routed_experts % N != 0) continue;
        for (dist::PartitionKind kind : {dist::PartitionKind::contiguous, dist::PartitionKind::balanced}) {
            const dist::ModelPartition p = dist::partition_model(c, &m->w, N, kind);
            const auto loads = dist::plan_rank_loads(c, p, m->w.mtp.has_value());
            for (int32_t r = 0; r < N; ++r) {
                SCOPED_TRACE(str(dist::partition_kind_name(kind), " rank ", r, " of ", N));
                gpu::WeightShard sh;
                for (const dist::ExpertPartition& ep : p.layers) sh.held.push_back(ep.held[static_cast<size_t>(r)]);
                sh.head_begin = loads[static_cast<size_t>(r)].head_begin;
                sh.head_end = loads[static_cast<size_t>(r)].head_end;
                const size_t dev = gpu::DeviceModel::plan_bytes(*m, sh);
                const double want = static_cast<double>(loads[static_cast<size_t>(r)].bytes());
                std::printf("  %s N=%ld rank %d: device %zu bytes, checkpoint share %.0f\n",
                            dist::partition_kind_name(kind), static_cast<long>(N), r, dev, want);
                EXPECT_LE(static_cast<double>(dev), 1.10 * want);   // the bound of WeightBytesMatchCheckpoint
                EXPECT_GE(static_cast<double>(dev), 0.99 * want);
                if (N > 1) {
                    EXPECT_LT(dev, gpu::DeviceModel::plan_bytes(*m));
                }
            }
        }
    }
    // Refused shards.
    const int64_t L = c.num_hidden_layers, E = c.n_routed_experts;
    auto all = [&] {
        gpu::WeightShard s;
        for (int64_t l = 0; l < L; ++l) {
            s.held.emplace_back();
            for (int64_t e = 0; e < E; ++e) s.held.back().push_back(static_cast<int32_t>(e));
        }
        return s;
    };
    gpu::WeightShard bad = all();
    bad.held.pop_back();
    test::expect_error([&] { gpu::DeviceModel::plan_bytes(*m, bad); }, {"WeightShard", "num_hidden_layers"});
    bad = all();
    bad.held[0][1] = static_cast<int32_t>(E);
    test::expect_error([&] { gpu::DeviceModel::plan_bytes(*m, bad); }, {"WeightShard", "layer 0", "n_routed_experts"});
    bad = all();
    std::swap(bad.held[1][0], bad.held[1][1]);
    test::expect_error([&] { gpu::DeviceModel::plan_bytes(*m, bad); }, {"WeightShard", "layer 1", "ascending"});
    bad = all();
    bad.head_begin = 5;
    bad.head_end = c.vocab_size + 1;
    test::expect_error([&] { gpu::DeviceModel::plan_bytes(*m, bad); }, {"WeightShard", "head rows", "vocab_size"});
}

// The same share uploaded (GPU): each held expert's and the head rows' device bytes are the
// checkpoint's, downloaded back (the upload is lossless).
TEST(GpuRunnerPlan, RankShareUploadsItsOwnTensors) {
    if (!cuda::gpu_available()) GTEST_SKIP() << "no GPU";
    if (!test::have_golden("tiny-flash-nvfp4")) GTEST_SKIP() << "no golden case";
    auto m = Model::load(test::golden_dir("tiny-flash-nvfp4") + "/model");
    const ModelConfig& c = m->cfg;
    const int64_t N = 2;
    ASSERT_EQ(c.n_routed_experts % N, 0);
    const dist::ModelPartition p = dist::partition_model(c, &m->w, N, dist::PartitionKind::balanced);
    const auto loads = dist::plan_rank_loads(c, p, m->w.mtp.has_value());
    for (int32_t r = 0; r < N; ++r) {
        SCOPED_TRACE(str("rank ", r));
        gpu::WeightShard sh;
        for (const dist::ExpertPartition& ep : p.layers) sh.held.push_back(ep.held[static_cast<size_t>(r)]);
        sh.head_begin = loads[static_cast<size_t>(r)].head_begin;
        sh.head_end = loads[static_cast<size_t>(r)].head_end;
        const gpu::DeviceModel dm(*m, sh);
        EXPECT_EQ(dm.bytes(), gpu::DeviceModel::plan_bytes(*m, sh));
        for (size_t l = 0; l < dm.layers.size(); ++l) {
            const cuda::DeviceExperts& ex = dm.layers[l].experts;
            ASSERT_EQ(ex.E, static_cast<int64_t>(sh.held[l].size()));
            for (size_t i = 0; i < sh.held[l].size(); ++i) {
                const ExpertWeights& want = m->w.layers[l].ffn.experts[static_cast<size_t>(sh.held[l][i])];
                const cuda::PackedBytes got = cuda::download_packed(ex.w2[i]);
                ASSERT_EQ(got.weight.size(), want.w2.weight.bytes());
                EXPECT_EQ(0, std::memcmp(got.weight.data(), want.w2.weight.data, got.weight.size()))
                    << "layer " << l << " local expert " << i << " (global " << sh.held[l][i] << ")";
                const cuda::PackedBytes g1 = cuda::download_packed(ex.w1[i]);
                EXPECT_EQ(0, std::memcmp(g1.weight.data(), want.w1.weight.data, g1.weight.size()));
            }
        }
        const cuda::PackedBytes head = cuda::download_packed(dm.head);
        const size_t row = static_cast<size_t>(c.hidden_size) * dtype_size(m->w.head.weight.dtype);
        ASSERT_EQ(head.weight.size(), static_cast<size_t>(sh.head_end - sh.head_begin) * row);
        EXPECT_EQ(0, std::memcmp(head.weight.data(),
                                 static_cast<const uint8_t*>(m->w.head.weight.data) + sh.head_begin * row,
                                 head.weight.size()));
    }
}

}  // namespace
}  // namespace megamoe

#else  // !MEGAMOE_HAVE_CUDA

TEST(GpuRunner, NeedsCuda) { GTEST_SKIP() << "built without CUDA"; }

#endif  // MEGAMOE_HAVE_CUDA
