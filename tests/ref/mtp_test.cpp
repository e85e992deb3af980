// mtp_test.cpp — the multi-token-prediction block on the CPU against ../shared/golden/*/mtp.safetensors
// (DeepSeek's official inference/model.py in exact numerics), under the full pass, decode and
// chunked schedules, and the MTP API as speculative decoding will drive it (one position behind).
#include <gtest/gtest.h>

#include <cstdio>
#include <map>
#include <memory>

#include "io/safetensors.h"
#include "ref/generate.h"
#include "ref/model.h"
#include "io/synth.h"
#include "test_util.h"

namespace megamoe {
namespace {

// The bar, as for the main model's logits: a float32 implementation of the same math
// agrees with the official code to about 1e-5 here (mtp.json: the official code's own decode vs
// full pass differ by 4e-6; |mtp_logits| <= 5).
constexpr double kMtpTol = 2e-4;

struct MtpGolden {
    std::unique_ptr<Model> model;
    std::unique_ptr<SafetensorsFile> file;
    std::vector<int32_t> input_ids;
    MtpLogits full;   // ours, full pass
    const float* mtp_logits() const { return file->view(*file->find("mtp_logits")).as<float>(); }
};

const MtpGolden* mtp_golden(const std::string& name) {
    static std::map<std::string, std::unique_ptr<MtpGolden>> cache;
    const std::string dir = test::golden_dir(name);
    if (!std::filesystem::exists(dir + "/mtp.safetensors")) return nullptr;
    auto& g = cache[name];
    if (!g) {
        g = std::make_unique<MtpGolden>();
        g->model = Model::load(dir + "/model");
        g->file = std::make_unique<SafetensorsFile>(dir + "/mtp.safetensors");
        Tensor ids = g->file->view(*g->file->find("input_ids"));
        for (int64_t i = 0; i < ids.numel(); ++i) g->input_ids.push_back(static_cast<int32_t>(ids.as<int64_t>()[i]));
        g->full = sequence_logits_mtp(*g->model, g->input_ids, Schedule{});
    }
    return g.get();
}

class MtpCase : public ::testing::TestWithParam<std::string> {
protected:
    const MtpGolden* g = nullptr;
    void SetUp() override {
        g = mtp_golden(GetParam());
        if (!g) MEGAMOE_MISSING_GOLDEN() << "no MTP golden for " << GetParam();
    }
    size_t n_mtp() const { return (g->input_ids.size() - 1) * static_cast<size_t>(g->model->cfg.vocab_size); }
};

TEST_P(MtpCase, FullPassMatchesOfficial) {
    ASSERT_TRUE(g->model->w.mtp.has_value());
    ASSERT_EQ(g->full.mtp_logits.size(), n_mtp());
    const TensorInfo* info = g->file->find("mtp_logits");
    ASSERT_EQ(info->ndim, 2);
    ASSERT_EQ(info->shape[0], static_cast<int64_t>(g->input_ids.size()) - 1);
    ASSERT_EQ(info->shape[1], g->model->cfg.vocab_size);
    const double d = test::max_abs_diff(g->full.mtp_logits.data(), g->mtp_logits(), n_mtp());
    std::printf("[ mtp ] %s full pass: max |mtp_logits - official| = %.3g\n", GetParam().c_str(), d);
    EXPECT_LE(d, kMtpTol);
}

// Every schedule gives the full pass's MTP logits: within the golden tolerance, and bit for bit.
TEST_P(MtpCase, SchedulesMatchFullPass) {
    const struct {
        const char* name;
        Schedule s;
    } cases[] = {
        {"decode_from_127", {127, 0}},   // mtp.json: mtp_decode_split
        {"chunk_37", {-1, 37}},
        {"chunk_5", {-1, 5}},
        {"chunk_16_then_decode_from_200", {200, 16}},
    };
    for (const auto& c : cases) {
        MtpLogits got = sequence_logits_mtp(*g->model, g->input_ids, c.s);
        ASSERT_EQ(got.mtp_logits.size(), n_mtp()) << c.name;
        const double d = test::max_abs_diff(got.mtp_logits.data(), g->mtp_logits(), n_mtp());
        std::printf("[ mtp ] %s %s: max |mtp_logits - official| = %.3g\n", GetParam().c_str(), c.name, d);
        EXPECT_LE(d, kMtpTol) << c.name;
        EXPECT_EQ(test::max_abs_diff(got.mtp_logits.data(), g->full.mtp_logits.data(), n_mtp()), 0.0) << c.name;
        EXPECT_EQ(test::max_abs_diff(got.logits.data(), g->full.logits.data(), got.logits.size()), 0.0) << c.name;
    }
}

// As speculative decoding drives it: the main model decodes token p, and only then is the MTP block
// fed position p-1 (whose next token, p, is now known). Its logits equal the full pass's rows.
TEST_P(MtpCase, LaggingDecodeMatchesFullPass) {
    const Model& m = *g->model;
    const int64_t V = m.cfg.vocab_size, P = 40, T = 80;
    SequenceState st(m.cfg);
    std::vector<float> logits, streams, mtp;
    ForwardOptions opt;
    opt.streams_out = &streams;
    std::vector<SequenceChunk> pre{{&st, std::vector<int32_t>(g->input_ids.begin(), g->input_ids.begin() + P)}};
    forward(m, pre, opt, logits);
    std::vector<float> held(streams.end() - m.cfg.hc_mult * m.cfg.hidden_size, streams.end());   // position P-1
    // Positions 0..P-2 have their next token: one MTP chunk.
    std::vector<MtpChunk> mb{{&st, streams.data(), std::vector<int32_t>(g->input_ids.begin() + 1, g->input_ids.begin() + P)}};
    ForwardOptions all;
    all.all_logits = true;
    mtp_forward(m, mb, all, mtp);
    std::vector<float> got(mtp);
    for (int64_t p = P; p < T; ++p) {
        std::vector<SequenceChunk> one{{&st, {g->input_ids[static_cast<size_t>(p)]}}};
        forward(m, one, opt, logits);
        std::vector<MtpChunk> lag{{&st, held.data(), {g->input_ids[static_cast<size_t>(p)]}}};   // position p-1
        mtp_forward(m, lag, ForwardOptions{}, mtp);
        got.insert(got.end(), mtp.begin(), mtp.end());
        held = streams;
    }
    EXPECT_EQ(st.mtp.n_past, T - 1);
    ASSERT_EQ(got.size(), static_cast<size_t>((T - 1) * V));
    EXPECT_EQ(test::max_abs_diff(got.data(), g->full.mtp_logits.data(), got.size()), 0.0);
}

TEST_P(MtpCase, BadInputLeavesStateUntouched) {
    const Model& m = *g->model;
    SequenceState st(m.cfg);
    std::vector<float> logits, streams;
    ForwardOptions opt;
    opt.streams_out = &streams;
    std::vector<SequenceChunk> pre{{&st, {5, 6, 7}}};
    forward(m, pre, opt, logits);
    std::vector<MtpChunk> past{{&st, streams.data(), {6, 7, 8, 9}}};   // 4 positions, the main model has 3
    test::expect_error([&] { mtp_forward(m, past, ForwardOptions{}, logits); }, {"position 3", "processed only 3"});
    std::vector<MtpChunk> bad{{&st, streams.data(), {6, static_cast<int32_t>(m.cfg.vocab_size)}}};
    test::expect_error([&] { mtp_forward(m, bad, ForwardOptions{}, logits); }, {"token id", "vocabulary"});
    EXPECT_EQ(st.mtp.n_past, 0);
    EXPECT_EQ(st.mtp.layer.n_window, 0);
}

INSTANTIATE_TEST_SUITE_P(Golden, MtpCase, ::testing::Values("tiny-flash-nvfp4", "tiny-flash-mxfp4"),
                         [](const auto& info) {
                             std::string s = info.param;
                             std::replace(s.begin(), s.end(), '-', '_');
                             return s;
                         });

TEST(Mtp, CheckpointWithoutMtpBlock) {
    test::TempDir dir;   // a synthetic tiny checkpoint written without the mtp.0.* block
    SynthOptions o;
    o.layers = 2;
    o.mtp = false;
    write_synthetic_checkpoint(dir.str(), o);
    auto m = Model::load(dir.str());
    ASSERT_FALSE(m->w.mtp.has_value());
    test::expect_error([&] { sequence_logits_mtp(*m, {1, 2, 3}, Schedule{}); }, {"no multi-token-prediction block"});
}

}  // namespace
}  // namespace megamoe
