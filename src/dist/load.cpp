// load.cpp — per-rank tensor lists for expert parallelism (see load.h).
#include "dist/load.h"

#include <cstdlib>

#include "core/common.h"
#include "dist/sim.h"
#include "io/formats.h"
#include "io/weights.h"

namespace megamoe::dist {

namespace {

// Main-layer routed-expert tensors are named "layers.<l>.ffn.experts.<e>.<...>": (l, e), else (-1, -1).
bool expert_of(const std::string& name, int64_t& layer, int64_t& expert) {
    static const std::string kLayers = "layers.", kExperts = ".ffn.experts.";
    if (name.rfind(kLayers, 0) != 0) return false;
    const size_t at = name.find(kExperts);
    if (at == std::string::npos) return false;
    char* end = nullptr;
    layer = std::strtoll(name.c_str() + kLayers.size(), &end, 10);
    if (end != name.c_str() + at) return false;
    expert = std::strtoll(name.c_str() + at + kExperts.size(), &end, 10);
    return end != nullptr && *end == '.';
}

// Every tensor of the walk with its checkpoint bytes, in order.
struct ListVisitor : WeightVisitor {
    std::vector<RankTensor> all;
    void tensor(const std::string& name, DType t, const std::vector<int64_t>& shape, Tensor&) override {
        int64_t n = 1;
        for (int64_t d : shape) n *= d;
        all.push_back({name, n * static_cast<int64_t>(dtype_size(t))});
    }
    void linear(const std::string& p, LinearFormat f, int64_t out, int64_t in, Linear&) override {
        const FormatInfo& fi = format_info(f);
        all.push_back({p + ".weight", out * fi.packed_row_bytes(in)});
        if (fi.has_scales())
            all.push_back({p + "." + fi.scale_suffix,
                           fi.scale_rows(out) * fi.scale_cols(in) * static_cast<int64_t>(dtype_size(fi.scale_dtype))});
        if (fi.global_scales) {
            all.push_back({p + ".weight_scale_2", 4});
            all.push_back({p + ".input_scale", 4});
        }
    }
};

}  // namespace

std::vector<RankLoad> plan_rank_loads(const ModelConfig& cfg, const ModelPartition& p, bool with_mtp) {
    const int64_t N = p.world, L = cfg.num_hidden_layers, E = cfg.n_routed_experts;
    if (N < 1) fail("rank loads: world = ", N, " must be at least 1");
    if (static_cast<int64_t>(p.layers.size()) != L)
        fail("rank loads: the partition has ", p.layers.size(), " layers, num_hidden_layers is ", L);
    for (int64_t l = 0; l < L; ++l) {
        const ExpertPartition& ep = p.layers[static_cast<size_t>(l)];
        if (ep.world != N || ep.experts != E || static_cast<int64_t>(ep.owner.size()) != E)
            fail("rank loads: layer ", l, "'s partition is ", ep.experts, " experts over ", ep.world,
                 " ranks; n_routed_experts is ", E, " over ", N);
    }
    Weights w;
    ListVisitor lv;
    visit_weights(cfg, w, lv, with_mtp);
    const VocabSplit vs = split_vocab(cfg.vocab_size, N);
    std::vector<RankLoad> out(static_cast<size_t>(N));
    for (int64_t r = 0; r < N; ++r) {
        RankLoad& rl = out[static_cast<size_t>(r)];
        rl.rank = static_cast<int32_t>(r);
        rl.world = static_cast<int32_t>(N);
        rl.head_begin = vs.begin[static_cast<size_t>(r)];
        rl.head_end = vs.begin[static_cast<size_t>(r) + 1];
    }
    for (const RankTensor& t : lv.all) {
        int64_t layer = -1, expert = -1;
        if (expert_of(t.name, layer, expert)) {
            if (layer < 0 || layer >= L || expert < 0 || expert >= E)
                fail("rank loads: tensor '", t.name, "' is outside ", L, " layers × ", E, " experts");
            RankLoad& rl = out[static_cast<size_t>(p.layers[static_cast<size_t>(layer)].owner[static_cast<size_t>(expert)])];
            rl.expert_bytes += t.bytes;
            rl.tensors.push_back(t);
        } else if (t.name.rfind("head.", 0) == 0) {
            // The head's rows: its tensors are [V, ...] (weight and, for a quantized head, its
            // per-row scales); a rank reads its rows' share.
            for (RankLoad& rl : out) {
                const int64_t b = t.bytes / cfg.vocab_size * (rl.head_end - rl.head_begin);
                rl.head_bytes += b;
                rl.tensors.push_back({t.name, b});
            }
        } else {
            for (RankLoad& rl : out) {
                rl.dense_bytes += t.bytes;
                rl.tensors.push_back(t);
            }
        }
    }
    return out;
}

}  // namespace megamoe::dist
