// weights_test.cpp — tests for src/weights: binding the golden tiny-flash checkpoints (layer kinds,
// expert formats, the MTP block), exact decoding of zero-scale NVFP4 blocks, weight_stats, and
// malformed checkpoints (missing, misshapen, mistyped tensors, out-of-range tid2eid, truncated
// shard), each rejected with a message naming the tensor or the file.
//
// Malformed checkpoints are built by copying a golden model folder to a temporary directory and
// rewriting one shard with write_safetensors after altering one tensor.
#include "io/weights.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/common.h"
#include "io/config.h"
#include "io/safetensors.h"

#include "test_util.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace megamoe;

namespace {

const std::string kNvfp4Dir = MEGAMOE_SHARED_DIR "/golden/tiny-flash-nvfp4/model";
const std::string kMxfp4Dir = MEGAMOE_SHARED_DIR "/golden/tiny-flash-mxfp4/model";
const std::string kShard1 = "model-00001-of-00002.safetensors";
const std::string kShard2 = "model-00002-of-00002.safetensors";
const std::string kIndex = "model.safetensors.index.json";

using megamoe::test::expect_error;


// The checks shared by both golden cases; `main_format` is the main layers' expert format.
void check_golden_binding(const std::string& dir, LinearFormat main_format) {
    const ModelConfig cfg = load_model_config(dir);
    Checkpoint ck(dir);
    const Weights w = bind_weights(cfg, ck);

    ASSERT_EQ(w.layers.size(), 6u);
    EXPECT_EQ(w.embed.dim(0), 1024);
    EXPECT_EQ(w.embed.dim(1), 256);
    EXPECT_EQ(w.head.format, LinearFormat::bf16);

    // Layer kinds and compressors.
    EXPECT_EQ(w.layers[0].attn.kind, AttnKind::sliding);
    EXPECT_EQ(w.layers[1].attn.kind, AttnKind::sliding);
    const AttentionWeights& csa = w.layers[2].attn;
    EXPECT_EQ(csa.kind, AttnKind::csa);
    EXPECT_EQ(csa.compressor.ratio, 4);
    EXPECT_TRUE(csa.compressor.overlap);
    EXPECT_EQ(csa.compressor.dim, 64);
    EXPECT_EQ(csa.compressor.wkv.out, 128);      // two overlapping series
    EXPECT_EQ(csa.indexer.compressor.ratio, 4);
    EXPECT_TRUE(csa.indexer.compressor.overlap);
    EXPECT_EQ(csa.indexer.compressor.dim, 32);
    EXPECT_FALSE(csa.indexer.weights_proj.weight.empty());
    const AttentionWeights& hca = w.layers[3].attn;
    EXPECT_EQ(hca.kind, AttnKind::hca);
    EXPECT_EQ(hca.compressor.ratio, 16);
    EXPECT_FALSE(hca.compressor.overlap);
    EXPECT_EQ(hca.compressor.wkv.out, 64);
    EXPECT_TRUE(hca.indexer.weights_proj.weight.empty());   // no indexer on HCA layers
    EXPECT_EQ(w.layers[4].attn.kind, AttnKind::csa);
    EXPECT_EQ(w.layers[5].attn.kind, AttnKind::hca);

    // Routers and experts.
    for (size_t l = 0; l < 6; ++l) {
        const MoeWeights& m = w.layers[l].ffn;
        EXPECT_EQ(m.router, l < 3 ? RouterKind::hash : RouterKind::score) << "layer " << l;
        EXPECT_EQ(m.tid2eid.empty(), l >= 3) << "layer " << l;
        EXPECT_EQ(m.bias.empty(), l < 3) << "layer " << l;
        ASSERT_EQ(m.experts.size(), 16u) << "layer " << l;
        for (const ExpertWeights& e : m.experts) {
            EXPECT_EQ(e.w1.format, main_format) << "layer " << l;
            EXPECT_EQ(e.w2.format, main_format) << "layer " << l;
            EXPECT_EQ(e.w3.format, main_format) << "layer " << l;
        }
        EXPECT_EQ(m.experts[0].w1.out, 128);
        EXPECT_EQ(m.experts[0].w1.in, 256);
        EXPECT_EQ(m.experts[0].w2.out, 256);
        EXPECT_EQ(m.experts[0].w2.in, 128);
        EXPECT_EQ(m.shared.w1.format, LinearFormat::fp8_block);
    }

    // The MTP block: present, score-routed, experts MXFP4 in both checkpoints.
    ASSERT_TRUE(w.mtp.has_value());
    const MoeWeights& mm = w.mtp->block.ffn;
    EXPECT_EQ(w.mtp->block.attn.kind, AttnKind::sliding);
    EXPECT_EQ(mm.router, RouterKind::score);
    ASSERT_EQ(mm.experts.size(), 16u);
    for (const ExpertWeights& e : mm.experts) {
        EXPECT_EQ(e.w1.format, LinearFormat::mxfp4);
        EXPECT_EQ(e.w2.format, LinearFormat::mxfp4);
        EXPECT_EQ(e.w3.format, LinearFormat::mxfp4);
    }
    EXPECT_FALSE(w.mtp->e_proj.weight.empty());
    EXPECT_FALSE(w.mtp->hc_head.fn.empty());
}

}  // namespace

// ---- the golden checkpoints

TEST(WeightsGolden, BindNvfp4) {
    if (!fs::is_directory(kNvfp4Dir)) MEGAMOE_MISSING_GOLDEN() << kNvfp4Dir << " not present";
    check_golden_binding(kNvfp4Dir, LinearFormat::nvfp4);
}

TEST(WeightsGolden, BindMxfp4) {
    if (!fs::is_directory(kMxfp4Dir)) MEGAMOE_MISSING_GOLDEN() << kMxfp4Dir << " not present";
    check_golden_binding(kMxfp4Dir, LinearFormat::mxfp4);
}

// Layer 3, expert 0, w1: row 3 columns 16..31 and row 5 columns 32..63 were quantized from
// zeros / 1e-9, so their NVFP4 block scales are 0 and they must decode to exactly 0.
TEST(WeightsGolden, Nvfp4ZeroScaleBlocksDecodeToZero) {
    if (!fs::is_directory(kNvfp4Dir)) MEGAMOE_MISSING_GOLDEN() << kNvfp4Dir << " not present";
    const ModelConfig cfg = load_model_config(kNvfp4Dir);
    Checkpoint ck(kNvfp4Dir);
    const Weights w = bind_weights(cfg, ck);
    const Linear& w1 = w.layers[3].ffn.experts[0].w1;
    ASSERT_EQ(w1.format, LinearFormat::nvfp4);
    ASSERT_EQ(w1.in, 256);

    // Raw scales: weight_scale e4m3 [128, 16], one per 16 inputs.
    ASSERT_EQ(w1.scale.dtype, DType::e4m3);
    ASSERT_EQ(w1.scale.ndim, 2);
    ASSERT_EQ(w1.scale.dim(0), 128);
    ASSERT_EQ(w1.scale.dim(1), 16);
    const uint8_t* s = w1.scale.as<uint8_t>();
    EXPECT_EQ(s[3 * 16 + 1], 0x00);
    EXPECT_EQ(s[5 * 16 + 2], 0x00);
    EXPECT_EQ(s[5 * 16 + 3], 0x00);

    std::vector<float> row(static_cast<size_t>(w1.in));
    w1.decode_row(3, row.data());
    for (size_t i = 16; i < 32; ++i) EXPECT_EQ(row[i], 0.0f) << "row 3 col " << i;
    // The rest of the row holds real weights (the decoder does not just write zeros).
    EXPECT_TRUE(std::any_of(row.begin(), row.begin() + 16, [](float v) { return v != 0.0f; }));

    w1.decode_row(5, row.data());
    for (size_t i = 32; i < 64; ++i) EXPECT_EQ(row[i], 0.0f) << "row 5 col " << i;
    EXPECT_TRUE(std::any_of(row.begin(), row.begin() + 32, [](float v) { return v != 0.0f; }));
    EXPECT_TRUE(std::any_of(row.begin() + 64, row.end(), [](float v) { return v != 0.0f; }));
}

TEST(WeightsGolden, WeightStats) {
    if (!fs::is_directory(kNvfp4Dir)) MEGAMOE_MISSING_GOLDEN() << kNvfp4Dir << " not present";
    const ModelConfig cfg = load_model_config(kNvfp4Dir);
    Weights w;
    const WeightStats st = weight_stats(cfg, w, true);
    int64_t total = 0;
    const WeightStats::Group* routed = nullptr;
    for (const auto& g : st.groups) {
        EXPECT_GE(g.params, 0) << g.name;
        EXPECT_GE(g.bytes, 0) << g.name;
        total += g.params;
        if (g.name == "routed experts") routed = &g;
    }
    ASSERT_NE(routed, nullptr) << "no 'routed experts' group";
    EXPECT_EQ(routed->params, int64_t{6} * 16 * 3 * 128 * 256);   // the MTP block's experts are not counted here
    EXPECT_GT(total, 0);
    EXPECT_FALSE(st.formats.empty());
}

// ---- malformed checkpoints

namespace {

// A fresh copy of the golden NVFP4 model folder per test, removed afterwards.
class WeightsMalformed : public ::testing::Test {
protected:
    void SetUp() override {
        if (!fs::is_directory(kNvfp4Dir)) MEGAMOE_MISSING_GOLDEN() << kNvfp4Dir << " not present";
        static std::atomic<int> counter{0};
        const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
        dir_ = fs::temp_directory_path() / ("megamoe_wt_" + std::string(info->name()) + "_" +
                                            std::to_string(::getpid()) + "_" + std::to_string(counter++));
        fs::create_directories(dir_);
        // The golden files are read-only; the copies must be writable.
        for (const auto& e : fs::directory_iterator(kNvfp4Dir)) {
            const fs::path to = dir_ / e.path().filename();
            fs::copy_file(e.path(), to);
            fs::permissions(to, fs::perms::owner_read | fs::perms::owner_write, fs::perm_options::add);
        }
    }
    void TearDown() override {
        std::error_code ec;
        if (!dir_.empty()) fs::remove_all(dir_, ec);
    }

    std::string dir() const { return dir_.string(); }
    std::string path(const std::string& name) const { return (dir_ / name).string(); }

    // Rewrites shard `shard` of the copy from the golden original, letting `edit` alter the
    // tensor list first (data pointers into buffers the caller keeps alive until this returns).
    void rewrite_shard(const std::string& shard, const std::function<void(std::vector<TensorToWrite>&)>& edit) const {
        const SafetensorsFile src(kNvfp4Dir + "/" + shard);   // mapped while writing the copy
        std::vector<TensorToWrite> ts;
        for (const TensorInfo& t : src.tensors())
            ts.push_back({t.name, t.dtype, std::vector<int64_t>(t.shape.begin(), t.shape.begin() + t.ndim),
                          src.view(t).data});
        edit(ts);
        write_safetensors(path(shard), ts);
    }

    // Drops `name` from the index's weight_map.
    void unlist(const std::string& name) const {
        json idx = json::parse(megamoe::test::read_file(path(kIndex)));
        ASSERT_EQ(idx.at("weight_map").erase(name), 1u) << name;
        std::ofstream(path(kIndex), std::ios::binary) << idx.dump(2);
    }

    fs::path dir_;
};

TensorToWrite& find_tensor(std::vector<TensorToWrite>& ts, const std::string& name) {
    for (auto& t : ts)
        if (t.name == name) return t;
    throw std::runtime_error("test setup: tensor " + name + " not in shard");
}

}  // namespace

// Sanity check of the fixture: an unaltered rewrite still binds.
TEST_F(WeightsMalformed, UnalteredRewriteBinds) {
    rewrite_shard(kShard1, [](std::vector<TensorToWrite>&) {});
    rewrite_shard(kShard2, [](std::vector<TensorToWrite>&) {});
    check_golden_binding(dir(), LinearFormat::nvfp4);
}

TEST_F(WeightsMalformed, DroppedTensorStillInIndex) {
    const std::string name = "layers.2.attn.indexer.weights_proj.weight";
    rewrite_shard(kShard1, [&](std::vector<TensorToWrite>& ts) {
        auto it = std::find_if(ts.begin(), ts.end(), [&](const TensorToWrite& t) { return t.name == name; });
        ASSERT_NE(it, ts.end());
        ts.erase(it);
    });
    // The checkpoint itself rejects an index entry whose shard lacks the tensor.
    expect_error([&] { Checkpoint ck(dir()); }, {name, kShard1, kIndex});
}

TEST_F(WeightsMalformed, DroppedTensor) {
    const std::string name = "layers.2.attn.indexer.weights_proj.weight";
    rewrite_shard(kShard1, [&](std::vector<TensorToWrite>& ts) {
        auto it = std::find_if(ts.begin(), ts.end(), [&](const TensorToWrite& t) { return t.name == name; });
        ASSERT_NE(it, ts.end());
        ts.erase(it);
    });
    unlist(name);
    const ModelConfig cfg = load_model_config(dir());
    Checkpoint ck(dir());
    expect_error([&] { bind_weights(cfg, ck); }, {"missing tensor", name, "BF16", "[16, 256]"});
}

TEST_F(WeightsMalformed, MisshapenTensor) {
    const std::string name = "layers.0.attn.wq_a.weight";   // e4m3 [128, 256]
    rewrite_shard(kShard1, [&](std::vector<TensorToWrite>& ts) {
        TensorToWrite& t = find_tensor(ts, name);
        ASSERT_EQ(t.shape, (std::vector<int64_t>{128, 256}));
        t.shape = {128, 128};   // the first half of the bytes
    });
    const ModelConfig cfg = load_model_config(dir());
    Checkpoint ck(dir());
    expect_error([&] { bind_weights(cfg, ck); }, {name, "[128, 128]", "[128, 256]", kShard1});
}

TEST_F(WeightsMalformed, WrongDType) {
    const std::string name = "layers.0.attn_norm.weight";   // bf16 [256]
    std::vector<float> f32(256, 1.0f);
    rewrite_shard(kShard1, [&](std::vector<TensorToWrite>& ts) {
        TensorToWrite& t = find_tensor(ts, name);
        ASSERT_EQ(t.dtype, DType::bf16);
        t.dtype = DType::f32;
        t.data = f32.data();
    });
    const ModelConfig cfg = load_model_config(dir());
    Checkpoint ck(dir());
    expect_error([&] { bind_weights(cfg, ck); }, {name, "F32", "BF16", "[256]"});
}

TEST_F(WeightsMalformed, Tid2eidOutOfRange) {
    const std::string name = "layers.1.ffn.gate.tid2eid";   // i64 [1024, 4]
    std::vector<int64_t> ids;
    rewrite_shard(kShard1, [&](std::vector<TensorToWrite>& ts) {
        TensorToWrite& t = find_tensor(ts, name);
        ASSERT_EQ(t.dtype, DType::i64);
        ASSERT_EQ(t.shape, (std::vector<int64_t>{1024, 4}));
        const auto* src = static_cast<const int64_t*>(t.data);
        ids.assign(src, src + 1024 * 4);
        ids[7 * 4 + 2] = 99;   // row 7
        t.data = ids.data();
    });
    const ModelConfig cfg = load_model_config(dir());
    Checkpoint ck(dir());
    expect_error([&] { bind_weights(cfg, ck); }, {name, "99", "row 7"});
}

TEST_F(WeightsMalformed, NegativeTid2eid) {
    const std::string name = "layers.0.ffn.gate.tid2eid";
    std::vector<int64_t> ids;
    rewrite_shard(kShard1, [&](std::vector<TensorToWrite>& ts) {
        TensorToWrite& t = find_tensor(ts, name);
        const auto* src = static_cast<const int64_t*>(t.data);
        ids.assign(src, src + 1024 * 4);
        ids[0] = -1;
        t.data = ids.data();
    });
    const ModelConfig cfg = load_model_config(dir());
    Checkpoint ck(dir());
    expect_error([&] { bind_weights(cfg, ck); }, {name, "-1", "row 0"});
}

TEST_F(WeightsMalformed, TruncatedShard) {
    const std::string p = path(kShard2);
    fs::resize_file(p, fs::file_size(p) - 100);
    expect_error([&] { Checkpoint ck(dir()); }, {kShard2});
}
