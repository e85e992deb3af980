// config_test.cpp — tests for src/config: the golden tiny-flash configs and the release configs
// parse with the expected values, and every malformed field (missing, wrong type, out of range,
// unsupported value) is rejected with a message naming the file and the field.
//
// Error cases start from the tiny NVFP4 config.json (embedded below), change one field, and parse
// the result.
#include "io/config.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "core/common.h"

#include "test_util.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace megamoe;

namespace {

const std::string kGolden = MEGAMOE_SHARED_DIR "/golden";
const std::string kReleases = MEGAMOE_SHARED_DIR "/reference/configs";


using megamoe::test::expect_error;

// The golden config.json of `name` ("tiny-flash-nvfp4"), or an empty object when absent.
json golden_json(const std::string& name) {
    const std::string path = kGolden + "/" + name + "/model/config.json";
    if (!fs::exists(path)) return json::object();
    return json::parse(megamoe::test::read_file(path));
}

ModelConfig parse(const json& j) { return parse_model_config(j.dump(), "config.json"); }

// The tiny NVFP4 config.json, embedded so the error cases need no ../shared/golden (the golden
// tiny-flash-nvfp4's config.json has the same content: ConfigGolden.EmbeddedTinyConfigIsTheGoldens).
const char* const kTinyNvfp4Config = R"json(
{"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 1024,
"hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 64,
"qk_rope_head_dim": 16, "q_lora_rank": 128, "o_groups": 4, "o_lora_rank": 64,
"sliding_window": 16, "compress_ratios": [0, 0, 4, 16, 4, 16, 0], "num_hidden_layers": 6,
"compress_rope_theta": 160000.0, "rope_theta": 10000.0, "rope_scaling": {"type": "yarn",
"factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1,
"rope_theta": 10000.0, "rope_type": "yarn"}, "index_n_heads": 16, "index_head_dim": 32,
"index_topk": 5, "n_routed_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 128,
"n_shared_experts": 1, "num_hash_layers": 3, "routed_scaling_factor": 1.5,
"scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc", "norm_topk_prob": true,
"swiglu_limit": 1.0, "hidden_act": "silu", "hc_mult": 4, "hc_sinkhorn_iters": 20,
"hc_eps": 1e-06, "rms_norm_eps": 1e-06, "num_nextn_predict_layers": 1,
"max_position_embeddings": 4096, "bos_token_id": 0, "eos_token_id": 1,
"tie_word_embeddings": false, "torch_dtype": "bfloat16", "expert_dtype": "fp4",
"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
"activation_scheme": "dynamic", "weight_block_size": [128, 128], "quant_algo": "MIXED_PRECISION",
"moe_quant_algo": "NVFP4", "group_size": 16, "ignore": ["*.attn.*", "*.ffn.shared_experts.*",
"head", "mtp.*"], "producer": {"name": "modelopt"}}})json";

// Fixture: the tiny NVFP4 config as JSON, to mutate one field per test.
class ConfigError : public ::testing::Test {
protected:
    void SetUp() override {
        j_ = json::parse(kTinyNvfp4Config);
        ASSERT_NO_THROW(parse(j_));   // the unmodified config is valid
    }
    // Parsing the mutated config must fail naming config.json, `field` and the extras.
    void expect_bad(const std::string& field, std::initializer_list<std::string> extra = {}) const {
        expect_error([&] { parse(j_); }, {"config.json", field});
        if (extra.size()) expect_error([&] { parse(j_); }, extra);
    }
    json j_;
};

}  // namespace

// ---- the golden configs

TEST(ConfigGolden, TinyFlashNvfp4) {
    const json j = golden_json("tiny-flash-nvfp4");
    if (j.empty()) MEGAMOE_MISSING_GOLDEN() << "golden tiny-flash-nvfp4 not present";
    const ModelConfig c = parse(j);

    EXPECT_EQ(c.vocab_size, 1024);
    EXPECT_EQ(c.hidden_size, 256);
    EXPECT_EQ(c.num_hidden_layers, 6);
    EXPECT_EQ(c.num_attention_heads, 8);
    EXPECT_EQ(c.head_dim, 64);
    EXPECT_EQ(c.qk_rope_head_dim, 16);
    EXPECT_EQ(c.nope_dim(), 48);
    EXPECT_EQ(c.o_groups, 4);
    EXPECT_EQ(c.heads_per_group(), 2);
    EXPECT_EQ(c.sliding_window, 16);
    EXPECT_EQ(c.n_routed_experts, 16);
    EXPECT_EQ(c.num_experts_per_tok, 4);
    EXPECT_EQ(c.moe_intermediate_size, 128);
    EXPECT_EQ(c.n_shared_experts, 1);
    EXPECT_EQ(c.num_hash_layers, 3);
    EXPECT_EQ(c.hc_mult, 4);
    EXPECT_EQ(c.mix_width(), 24);
    EXPECT_EQ(c.num_nextn_predict_layers, 1);
    EXPECT_DOUBLE_EQ(c.swiglu_limit, 1.0);
    EXPECT_DOUBLE_EQ(c.routed_scaling_factor, 1.5);

    // RoPE: plain base on sliding layers, YaRN-scaled base on compressed ones.
    EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
    EXPECT_DOUBLE_EQ(c.compress_rope_theta, 160000.0);
    EXPECT_DOUBLE_EQ(c.yarn.factor, 16.0);
    EXPECT_EQ(c.yarn.original_max_position_embeddings, 65536);
    EXPECT_DOUBLE_EQ(c.yarn.beta_fast, 32.0);
    EXPECT_DOUBLE_EQ(c.yarn.beta_slow, 1.0);

    // Layers 0..5 plus the MTP block (layer 6).
    ASSERT_EQ(c.compress_ratios.size(), 7u);
    const AttnKind want_attn[] = {AttnKind::sliding, AttnKind::sliding, AttnKind::csa, AttnKind::hca,
                                  AttnKind::csa,     AttnKind::hca,     AttnKind::sliding};
    const RouterKind want_router[] = {RouterKind::hash,  RouterKind::hash,  RouterKind::hash, RouterKind::score,
                                      RouterKind::score, RouterKind::score, RouterKind::score};
    for (int64_t l = 0; l <= 6; ++l) {
        EXPECT_EQ(c.attn_kind(l), want_attn[l]) << "layer " << l;
        EXPECT_EQ(c.router_kind(l), want_router[l]) << "layer " << l;
    }
    EXPECT_STREQ(attn_kind_name(c.attn_kind(2)), "CSA");
    EXPECT_STREQ(attn_kind_name(c.attn_kind(3)), "HCA");
    EXPECT_STREQ(attn_kind_name(c.attn_kind(6)), "SWA");

    // NVFP4 for the main layers' experts; the MTP block is in `ignore` ("mtp.*") and stays MXFP4.
    EXPECT_EQ(c.expert_format, ExpertFormat::nvfp4);
    EXPECT_STREQ(expert_format_name(c.expert_format), "NVFP4");
    EXPECT_EQ(c.expert_format_for("layers.3.ffn.experts"), ExpertFormat::nvfp4);
    EXPECT_EQ(c.expert_format_for("layers.0.ffn.experts"), ExpertFormat::nvfp4);
    EXPECT_EQ(c.expert_format_for("mtp.0.ffn.experts"), ExpertFormat::mxfp4);
    EXPECT_EQ(c.quant_ignore.size(), 4u);
}

TEST(ConfigGolden, EmbeddedTinyConfigIsTheGoldens) {
    const json j = golden_json("tiny-flash-nvfp4");
    if (j.empty()) MEGAMOE_MISSING_GOLDEN() << "golden tiny-flash-nvfp4 not present";
    EXPECT_EQ(json::parse(kTinyNvfp4Config), j);
}

TEST(ConfigGolden, TinyFlashMxfp4) {
    const json j = golden_json("tiny-flash-mxfp4");
    if (j.empty()) MEGAMOE_MISSING_GOLDEN() << "golden tiny-flash-mxfp4 not present";
    const ModelConfig c = parse(j);
    EXPECT_EQ(c.hidden_size, 256);
    EXPECT_EQ(c.num_hidden_layers, 6);
    EXPECT_EQ(c.compress_ratios, (std::vector<int64_t>{0, 0, 4, 16, 4, 16, 0}));
    EXPECT_EQ(c.expert_format, ExpertFormat::mxfp4);
    EXPECT_STREQ(expert_format_name(c.expert_format), "MXFP4");
    EXPECT_EQ(c.expert_format_for("layers.3.ffn.experts"), ExpertFormat::mxfp4);
    EXPECT_EQ(c.expert_format_for("mtp.0.ffn.experts"), ExpertFormat::mxfp4);
    EXPECT_TRUE(c.quant_ignore.empty());
}

TEST(ConfigGolden, LoadFromDirectory) {
    const std::string dir = kGolden + "/tiny-flash-nvfp4/model";
    if (!fs::is_directory(dir)) MEGAMOE_MISSING_GOLDEN() << dir << " not present";
    const ModelConfig c = load_model_config(dir);
    EXPECT_EQ(c.hidden_size, 256);
    EXPECT_EQ(c.expert_format, ExpertFormat::nvfp4);
}

TEST(ConfigGolden, LoadMissingDirectoryNamesPath) {
    const std::string dir = "/nonexistent/megamoe-config-test-dir";
    expect_error([&] { load_model_config(dir); }, {dir, "config.json"});
}

// ---- the release configs

namespace {

struct KindCounts { int swa = 0, csa = 0, hca = 0; };

KindCounts count_kinds(const ModelConfig& c) {
    KindCounts k;
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
        switch (c.attn_kind(l)) {
            case AttnKind::sliding: ++k.swa; break;
            case AttnKind::csa: ++k.csa; break;
            case AttnKind::hca: ++k.hca; break;
        }
    }
    return k;
}

}  // namespace

TEST(ConfigRelease, DeepSeekV4Flash) {
    const std::string dir = kReleases + "/deepseek-v4-flash";
    if (!fs::exists(dir + "/config.json")) MEGAMOE_MISSING_GOLDEN() << dir << " not present";
    const ModelConfig c = load_model_config(dir);
    EXPECT_EQ(c.num_hidden_layers, 43);
    EXPECT_EQ(c.hidden_size, 4096);
    EXPECT_EQ(c.n_routed_experts, 256);
    EXPECT_EQ(c.expert_format, ExpertFormat::mxfp4);
    const KindCounts k = count_kinds(c);
    EXPECT_EQ(k.swa, 2);
    EXPECT_EQ(k.csa, 21);
    EXPECT_EQ(k.hca, 20);
    EXPECT_EQ(c.attn_kind(c.num_hidden_layers), AttnKind::sliding);   // MTP block
    for (int64_t l = 0; l < 3; ++l) EXPECT_EQ(c.router_kind(l), RouterKind::hash) << l;
    EXPECT_EQ(c.router_kind(3), RouterKind::score);
    EXPECT_EQ(c.router_kind(c.num_hidden_layers), RouterKind::score);
}

TEST(ConfigRelease, DeepSeekV4Pro) {
    const std::string dir = kReleases + "/deepseek-v4-pro";
    if (!fs::exists(dir + "/config.json")) MEGAMOE_MISSING_GOLDEN() << dir << " not present";
    const ModelConfig c = load_model_config(dir);
    EXPECT_EQ(c.num_hidden_layers, 61);
    EXPECT_EQ(c.hidden_size, 7168);
    EXPECT_EQ(c.n_routed_experts, 384);
    const KindCounts k = count_kinds(c);
    EXPECT_EQ(k.swa, 0);
    EXPECT_EQ(k.csa, 30);
    EXPECT_EQ(k.hca, 31);
    for (int64_t l = 0; l < 3; ++l) EXPECT_EQ(c.router_kind(l), RouterKind::hash) << l;
    EXPECT_EQ(c.router_kind(3), RouterKind::score);
}

// ---- accepted variations

TEST_F(ConfigError, UnknownFieldsAreIgnored) {
    j_["foo"] = 1;
    j_["quantization_config"]["bar"] = "baz";
    const ModelConfig c = parse(j_);
    EXPECT_EQ(c.hidden_size, 256);
}

TEST_F(ConfigError, IntegralFloatAccepted) {
    j_["hidden_size"] = 256.0;
    EXPECT_EQ(parse(j_).hidden_size, 256);
    j_["hidden_size"] = 256.5;
    expect_bad("hidden_size", {"integer"});
}

// A float outside int64's range must be rejected, not cast (the cast would be undefined).
TEST_F(ConfigError, HugeFloatRejected) {
    j_["hidden_size"] = 1e300;
    expect_bad("hidden_size", {"integer"});
}

// ---- missing required fields

TEST_F(ConfigError, MissingHiddenSize) {
    j_.erase("hidden_size");
    expect_bad("hidden_size", {"missing"});
}

TEST_F(ConfigError, MissingCompressRatios) {
    j_.erase("compress_ratios");
    expect_bad("compress_ratios", {"missing"});
}

TEST_F(ConfigError, MissingQuantizationConfig) {
    j_.erase("quantization_config");
    expect_bad("quantization_config", {"missing"});
}

TEST_F(ConfigError, MissingRopeTheta) {
    j_.erase("rope_theta");
    expect_bad("rope_theta", {"missing"});
}

TEST_F(ConfigError, MissingScoringFunc) {
    j_.erase("scoring_func");
    expect_bad("scoring_func", {"missing"});
}

TEST_F(ConfigError, NullCountsAsMissing) {
    j_["hidden_size"] = nullptr;
    expect_bad("hidden_size", {"missing"});
}

// ---- wrong types

TEST_F(ConfigError, HiddenSizeAsString) {
    j_["hidden_size"] = "256";
    expect_bad("hidden_size", {"integer"});
}

TEST_F(ConfigError, CompressRatiosAsObject) {
    j_["compress_ratios"] = json::object({{"0", 0}});
    expect_bad("compress_ratios", {"array"});
}

// ---- out of range

TEST_F(ConfigError, ZeroHeads) {
    j_["num_attention_heads"] = 0;
    expect_bad("num_attention_heads", {"positive"});
}

TEST_F(ConfigError, NegativeSlidingWindow) {
    j_["sliding_window"] = -1;
    expect_bad("sliding_window", {"positive", "-1"});
}

TEST_F(ConfigError, CompressRatiosWrongLength) {
    j_["compress_ratios"] = {0, 0, 4, 16, 4, 16};   // the MTP entry is missing
    expect_bad("compress_ratios", {"has 6 entries", "7"});
}

TEST_F(ConfigError, CompressRatiosNegativeEntry) {
    j_["compress_ratios"] = {0, 0, 4, -16, 4, 16, 0};
    expect_bad("compress_ratios", {"non-negative", "-16"});
}

TEST_F(ConfigError, CompressRatiosLastEntryNonZero) {
    j_["compress_ratios"] = {0, 0, 4, 16, 4, 16, 4};
    expect_bad("compress_ratios", {"last entry"});
}

TEST_F(ConfigError, OGroupsNotDividingHeads) {
    j_["o_groups"] = 3;
    expect_bad("o_groups", {"num_attention_heads"});
}

TEST_F(ConfigError, TopKExceedsExperts) {
    j_["num_experts_per_tok"] = 17;
    expect_bad("num_experts_per_tok", {"n_routed_experts"});
}

TEST_F(ConfigError, OddRopeDim) {
    j_["qk_rope_head_dim"] = 15;
    expect_bad("qk_rope_head_dim", {"even"});
}

TEST_F(ConfigError, ZeroSwigluLimit) {
    j_["swiglu_limit"] = 0;
    expect_bad("swiglu_limit", {"positive"});
}

// ---- unsupported values

TEST_F(ConfigError, SoftmaxScoring) {
    j_["scoring_func"] = "softmax";
    expect_bad("scoring_func", {"softmax"});
}

TEST_F(ConfigError, WeightBlockSize64) {
    j_["quantization_config"]["weight_block_size"] = {64, 64};
    expect_bad("quantization_config.weight_block_size", {"[64,64]"});
}

TEST_F(ConfigError, MoeQuantAlgoInt4) {
    j_["quantization_config"]["moe_quant_algo"] = "INT4";
    expect_bad("quantization_config.moe_quant_algo", {"INT4"});
}

TEST_F(ConfigError, LinearRopeScaling) {
    j_["rope_scaling"]["type"] = "linear";
    expect_bad("rope_scaling.type", {"linear"});
}

TEST_F(ConfigError, TwoKvHeads) {
    j_["num_key_value_heads"] = 2;
    expect_bad("num_key_value_heads");
}

TEST_F(ConfigError, TwoSharedExperts) {
    j_["n_shared_experts"] = 2;
    expect_bad("n_shared_experts");
}

TEST_F(ConfigError, NegativeEosTokenId) {
    j_["eos_token_id"] = -1;
    expect_bad("eos_token_id", {"-1", "vocab_size"});
}

TEST_F(ConfigError, EosTokenIdPastVocab) {
    j_["eos_token_id"] = 1024;   // vocab_size is 1024
    expect_bad("eos_token_id", {"1024"});
    j_["eos_token_id"] = 1;
    j_["bos_token_id"] = -3;
    expect_bad("bos_token_id", {"-3"});
}

// quantization_config.ignore globs match in polynomial time: a pattern of many stars that
// cannot match used to take exponential time (the loader hung on "**************Q"). The work is
// counted, not timed: the matcher's steps stay within (|pattern| + 1) (|s| + 2) (its argument is
// in config.cpp), where a backtracking matcher takes C(|s| + stars, stars) paths, over 1e30 for
// 14 stars on 2000 characters.
TEST_F(ConfigError, HostileIgnoreGlobIsFast) {
    const std::vector<std::string> hostile = {"**************Q", "*.*.*.*.*.*.*.*.*.*.*.*.*.*.*.*Q", "*a*a*a*a*a*a*a*b"};
    for (const std::string& name : {std::string(2000, 'a'), std::string("layers.3.ffn.experts"),
                                    std::string(1000, '.') + std::string(1000, 'a')}) {
        for (const std::string& pat : hostile) {
            int64_t steps = -1;
            EXPECT_FALSE(glob_match(pat, name, &steps)) << pat;
            const auto bound = static_cast<int64_t>((pat.size() + 1) * (name.size() + 2));
            EXPECT_GT(steps, 0) << pat;
            EXPECT_LE(steps, bound) << pat << " on " << name.size() << " characters";
        }
    }
    j_["quantization_config"]["ignore"] = {"**************Q", "*.*.*.*.*.*.*.*.*.*.*.*.*.*.*.*Q", "layers.*.ffn.*"};
    const ModelConfig c = parse(j_);
    EXPECT_EQ(c.expert_format_for("layers.3.ffn.experts"), ExpertFormat::mxfp4);   // the last pattern
    EXPECT_EQ(c.expert_format_for("mtp.0.ffn.experts"), ExpertFormat::nvfp4);      // none
    const std::string long_name(2000, 'a');
    EXPECT_EQ(c.expert_format_for(long_name), ExpertFormat::nvfp4);
    // The matcher's semantics: '*' matches any run, everything else itself.
    j_["quantization_config"]["ignore"] = {"*a*b", "x*"};
    const ModelConfig d = parse(j_);
    EXPECT_EQ(d.expert_format_for("zzazzb"), ExpertFormat::mxfp4);       // "*a*b" on the module
    EXPECT_EQ(d.expert_format_for("zzazzbq"), ExpertFormat::nvfp4);      // nor on "zzazzbq.0.w1"
    EXPECT_EQ(d.expert_format_for("xy"), ExpertFormat::mxfp4);
    EXPECT_EQ(d.expert_format_for("ab"), ExpertFormat::mxfp4);
    EXPECT_EQ(d.expert_format_for("ba"), ExpertFormat::nvfp4);
}

// ---- not a config object at all

TEST(ConfigText, InvalidJson) {
    expect_error([] { parse_model_config("{\"hidden_size\": 256,", "config.json"); }, {"config.json", "JSON"});
}

TEST(ConfigText, TopLevelArray) {
    expect_error([] { parse_model_config("[1, 2, 3]", "config.json"); }, {"config.json", "object"});
}
