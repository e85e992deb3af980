// load_test.cpp — per-rank tensor lists of expert parallelism (src/dist/load.h) against a real
// checkpoint's tensors: every name a rank reads exists with the bytes counted, every tensor is read
// by some rank, each main-layer expert by exactly its owner, the head split by rows, the rest
// replicated; the byte totals add up to the checkpoint's.
#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <set>
#include <string>

#include "core/common.h"
#include "dist/load.h"
#include "dist/partition.h"
#include "io/synth.h"
#include "io/weights.h"
#include "ref/model.h"
#include "test_util.h"

namespace megamoe {
namespace {

// A synthetic checkpoint with the MTP block, NVFP4 experts (global scales) and a hash layer.
const Model& model() {
    static std::unique_ptr<test::TempDir> dir;
    static std::unique_ptr<Model> m;
    if (!m) {
        dir = std::make_unique<test::TempDir>();
        SynthOptions o;
        o.layers = 4;
        o.vocab = 1000;
        o.mtp = true;
        o.seed = 21;
        write_synthetic_checkpoint(dir->str(), o);
        m = Model::load(dir->str());
    }
    return *m;
}

int64_t stats_bytes(const Model& m, const std::string& group) {
    Weights scratch;
    for (const auto& g : weight_stats(m.cfg, scratch, m.w.mtp.has_value()).groups)
        if (g.name == group) return g.bytes;
    return 0;
}

void check_loads(const Model& m, int64_t N, dist::PartitionKind kind) {
    SCOPED_TRACE(std::string(dist::partition_kind_name(kind)) + " over " + std::to_string(N));
    const ModelConfig& c = m.cfg;
    const dist::ModelPartition p = dist::partition_model(c, &m.w, N, kind);
    const auto loads = dist::plan_rank_loads(c, p, m.w.mtp.has_value());
    ASSERT_EQ(static_cast<int64_t>(loads.size()), N);
    const Checkpoint& ck = *m.checkpoint;
    std::map<std::string, int> readers;
    int64_t experts = 0, head = 0, all = 0, head_rows = 0;
    for (const auto& rl : loads) {
        EXPECT_EQ(rl.world, N);
        EXPECT_EQ(rl.dense_bytes, loads[0].dense_bytes) << "replicated bytes differ on rank " << rl.rank;
        EXPECT_EQ(rl.head_begin, head_rows) << "head rows are contiguous";
        head_rows = rl.head_end;
        int64_t sum = 0;
        for (const auto& t : rl.tensors) {
            const Checkpoint::Entry* e = ck.find(t.name);
            ASSERT_NE(e, nullptr) << "rank " << rl.rank << " reads '" << t.name << "', which the checkpoint lacks";
            const int64_t size = static_cast<int64_t>(e->info->end - e->info->begin);
            if (t.name.rfind("head.", 0) == 0) {
                EXPECT_EQ(t.bytes, size / c.vocab_size * (rl.head_end - rl.head_begin));
            } else {
                EXPECT_EQ(t.bytes, size) << t.name;
            }
            ++readers[t.name];
            sum += t.bytes;
            int64_t l = -1, x = -1;
            if (std::sscanf(t.name.c_str(), "layers.%ld.ffn.experts.%ld.", &l, &x) == 2) {
                EXPECT_EQ(p.layers[static_cast<size_t>(l)].owner[static_cast<size_t>(x)], rl.rank) << t.name;
            }
        }
        EXPECT_EQ(sum, rl.bytes()) << "rank " << rl.rank;
        experts += rl.expert_bytes;
        head += rl.head_bytes;
        all += rl.bytes() - (rl.rank == 0 ? 0 : rl.dense_bytes);
    }
    EXPECT_EQ(head_rows, c.vocab_size);
    EXPECT_EQ(experts, stats_bytes(m, "routed experts"));
    EXPECT_EQ(head, stats_bytes(m, "head"));
    int64_t ck_bytes = 0;
    for (const std::string& name : ck.names()) {
        const Checkpoint::Entry* e = ck.find(name);
        ck_bytes += static_cast<int64_t>(e->info->end - e->info->begin);
        ASSERT_TRUE(readers.count(name)) << "no rank reads '" << name << "'";
        const bool expert = name.rfind("layers.", 0) == 0 && name.find(".ffn.experts.") != std::string::npos;
        EXPECT_EQ(readers[name], expert ? 1 : N) << name;
    }
    EXPECT_EQ(all, ck_bytes) << "replicated once + every expert once + the head once = the checkpoint";
    if (N == 1) {
        EXPECT_EQ(loads[0].bytes(), ck_bytes);
    }
}

TEST(DistLoad, RanksSplitExpertsAndHeadAndReplicateTheRest) {
    const Model& m = model();
    for (int64_t N : {1, 2, 4})
        for (auto kind : {dist::PartitionKind::contiguous, dist::PartitionKind::balanced}) check_loads(m, N, kind);
}

TEST(DistLoad, RejectsAPartitionOfAnotherModel) {
    const Model& m = model();
    dist::ModelPartition p = dist::partition_model(m.cfg, &m.w, 2, dist::PartitionKind::contiguous);
    p.layers.pop_back();
    test::expect_error([&] { dist::plan_rank_loads(m.cfg, p, true); }, {"num_hidden_layers"});
    p = dist::partition_model(m.cfg, &m.w, 2, dist::PartitionKind::contiguous);
    p.layers[1] = dist::ExpertPartition::contiguous(m.cfg.n_routed_experts, 4);
    test::expect_error([&] { dist::plan_rank_loads(m.cfg, p, true); }, {"layer 1"});
    test::expect_error([&] { dist::partition_model(m.cfg, &m.w, 3, dist::PartitionKind::contiguous); },
                       {"n_routed_experts"});
}

}  // namespace
}  // namespace megamoe
