// synth_test.cpp — `megamoe synth` checkpoints: what the quantizers write is what the loader reads
// back, bit for bit, and every preset (at reduced layer counts) loads and runs, with prefill,
// chunked prefill and decode agreeing exactly.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>

#include "io/formats.h"
#include "ref/generate.h"
#include "ref/model.h"
#include "io/synth.h"
#include "test_util.h"

namespace megamoe {
namespace {

// Quantize the generator's values for one projection, then compare with what the checkpoint holds
// (raw bytes) and with what the loader decodes (every row, exactly).
void expect_linear_round_trip(const Linear& l, const std::string& prefix, uint64_t seed) {
    SCOPED_TRACE(prefix);
    const std::vector<float> w = synth_linear_values(prefix, l.out, l.in, seed);
    std::vector<uint8_t> q, s;
    float scale_2 = 1;
    switch (l.format) {
        case LinearFormat::fp8_block:
            q.resize(w.size());
            s.resize(static_cast<size_t>(((l.out + 127) / 128) * ((l.in + 127) / 128)));
            quantize_fp8_block(w.data(), l.out, l.in, q.data(), s.data());
            break;
        case LinearFormat::mxfp4:
            q.resize(w.size() / 2);
            s.resize(w.size() / kMxfp4Group);
            quantize_mxfp4(w.data(), l.out, l.in, q.data(), s.data());
            break;
        case LinearFormat::nvfp4:
            q.resize(w.size() / 2);
            s.resize(w.size() / kNvfp4Group);
            quantize_nvfp4(w.data(), l.out, l.in, q.data(), s.data(), &scale_2);
            EXPECT_EQ(*l.scale_2.as<float>(), scale_2);
            break;
        default: FAIL() << "unexpected format";
    }
    ASSERT_EQ(l.weight.bytes(), q.size());
    ASSERT_EQ(l.scale.bytes(), s.size());
    EXPECT_EQ(std::memcmp(l.weight.data, q.data(), q.size()), 0);
    EXPECT_EQ(std::memcmp(l.scale.data, s.data(), s.size()), 0);
    // The loader's row decoding (scale indexing included) equals decoding the test's own bytes.
    std::vector<float> row(static_cast<size_t>(l.in)), want(row.size());
    const int64_t fp8_cols = (l.in + kFp8Block - 1) / kFp8Block;
    for (int64_t n = 0; n < l.out; ++n) {
        l.decode_row(n, row.data());
        if (l.format == LinearFormat::fp8_block)
            decode_fp8_block_row(q.data() + n * l.in, s.data() + (n / kFp8Block) * fp8_cols, l.in, want.data());
        else if (l.format == LinearFormat::mxfp4)
            decode_mxfp4_row(q.data() + n * l.in / 2, s.data() + n * l.in / kMxfp4Group, l.in, want.data());
        else
            decode_nvfp4_row(q.data() + n * l.in / 2, s.data() + n * l.in / kNvfp4Group, scale_2, l.in, want.data());
        ASSERT_EQ(std::memcmp(row.data(), want.data(), row.size() * sizeof(float)), 0) << "row " << n;
    }
}

TEST(Synth, QuantizedTensorsReadBackBitExactly) {
    for (ExpertFormat f : {ExpertFormat::nvfp4, ExpertFormat::mxfp4}) {
        test::TempDir dir;
        SynthOptions o;
        o.experts = f;
        o.seed = 7;
        write_synthetic_checkpoint(dir.str(), o);
        auto m = Model::load(dir.str());
        ASSERT_TRUE(m->w.mtp.has_value());
        const BlockWeights& b = m->w.layers[3];
        expect_linear_round_trip(b.attn.wq_b, "layers.3.attn.wq_b", o.seed);
        expect_linear_round_trip(b.ffn.shared.w2, "layers.3.ffn.shared_experts.w2", o.seed);
        expect_linear_round_trip(b.ffn.experts[5].w1, "layers.3.ffn.experts.5.w1", o.seed);
        expect_linear_round_trip(b.ffn.experts[5].w2, "layers.3.ffn.experts.5.w2", o.seed);
        // MTP experts stay MXFP4 in an NVFP4 checkpoint, as in NVIDIA's releases.
        EXPECT_EQ(m->w.mtp->block.ffn.experts[0].w1.format, LinearFormat::mxfp4);
        expect_linear_round_trip(m->w.mtp->block.ffn.experts[0].w1, "mtp.0.ffn.experts.0.w1", o.seed);
        EXPECT_EQ(b.ffn.experts[0].w1.format, f == ExpertFormat::nvfp4 ? LinearFormat::nvfp4 : LinearFormat::mxfp4);
    }
}

TEST(Synth, SameSeedSameBytesOtherSeedOtherBytes) {
    test::TempDir a, b, c;
    SynthOptions o;
    o.layers = 2;
    write_synthetic_checkpoint(a.str(), o);
    write_synthetic_checkpoint(b.str(), o);
    o.seed = 1;
    write_synthetic_checkpoint(c.str(), o);
    auto read = [](const std::string& p) {
        std::ifstream f(p, std::ios::binary);
        return std::string(std::istreambuf_iterator<char>(f), {});
    };
    const std::string shard = "/model-00001-of-00001.safetensors";
    EXPECT_EQ(read(a.str() + shard), read(b.str() + shard));
    EXPECT_NE(read(a.str() + shard), read(c.str() + shard));
}

struct PresetCase {
    const char* name;
    SynthOptions opt;
    int64_t tokens;
};

// Real DeepSeek-V4 shapes, cut to a few layers and experts so a 2-core machine runs them in seconds:
// Flash layers 0-3 are SWA, SWA, CSA, HCA; Pro layers 0 is HCA (ratio 128, hash-routed).
SynthOptions preset(const char* name, int64_t layers, ExpertFormat f, bool mtp) {
    SynthOptions o;
    o.preset = name;
    o.layers = layers;
    o.vocab = 300;
    o.routed_experts = std::string(name) == "tiny" ? -1 : 8;
    o.experts = f;
    o.mtp = mtp;
    o.seed = 3;
    return o;
}

// The parameter as gtest prints it into the test's ctest name ("... # GetParam() = NAME"); by
// default a struct prints as its raw bytes, pointers included, so the ctest names changed from
// run to run (and ctest's timing data, keyed on them, never matched).
void PrintTo(const PresetCase& c, std::ostream* os) { *os << c.name; }

class SynthPreset : public ::testing::TestWithParam<PresetCase> {};

TEST_P(SynthPreset, LoadsAndRunsEverySchedule) {
    const PresetCase& pc = GetParam();
    test::TempDir dir;
    write_synthetic_checkpoint(dir.str(), pc.opt);
    auto m = Model::load(dir.str());
    EXPECT_EQ(m->cfg.num_hidden_layers, pc.opt.layers);
    std::vector<int32_t> ids;
    for (int64_t i = 0; i < pc.tokens; ++i) ids.push_back(static_cast<int32_t>((i * 37 + 11) % m->cfg.vocab_size));
    const std::vector<float> full = sequence_logits(*m, ids, Schedule{});
    ASSERT_EQ(full.size(), ids.size() * static_cast<size_t>(m->cfg.vocab_size));
    double amax = 0;
    for (float v : full) {
        ASSERT_TRUE(std::isfinite(v));
        amax = std::max(amax, static_cast<double>(std::fabs(v)));
    }
    EXPECT_GT(amax, 1e-3);   // not a degenerate all-zero output
    for (Schedule s : {Schedule{pc.tokens / 2, 0}, Schedule{-1, 3}}) {
        const std::vector<float> got = sequence_logits(*m, ids, s);
        EXPECT_EQ(test::max_abs_diff(got.data(), full.data(), full.size()), 0.0)
            << "decode_from " << s.decode_from << " chunk " << s.chunk;
    }
}

INSTANTIATE_TEST_SUITE_P(
    Presets, SynthPreset,
    ::testing::Values(PresetCase{"tiny_nvfp4_mtp", preset("tiny", 6, ExpertFormat::nvfp4, true), 40},
                      PresetCase{"tiny_mxfp4", preset("tiny", 4, ExpertFormat::mxfp4, false), 40},
                      PresetCase{"flash_4_layers_nvfp4", preset("flash", 4, ExpertFormat::nvfp4, false), 10},
                      PresetCase{"pro_1_layer_mxfp4", preset("pro", 1, ExpertFormat::mxfp4, false), 6}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(Synth, BadOptions) {
    SynthOptions o;
    o.preset = "huge";
    test::expect_error([&] { synth_config(o); }, {"unknown preset", "huge"});
    o = SynthOptions{};
    o.layers = 0;
    test::expect_error([&] { synth_config(o); }, {"--layers"});
    o = SynthOptions{};
    o.routed_experts = 2;
    test::expect_error([&] { synth_config(o); }, {"--routed-experts"});
}

}  // namespace
}  // namespace megamoe
