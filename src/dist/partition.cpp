// partition.cpp — contiguous and load-balanced expert partitions (see partition.h).
#include "dist/partition.h"

#include <algorithm>
#include <numeric>

#include "core/common.h"

namespace megamoe::dist {

const char* partition_kind_name(PartitionKind k) {
    return k == PartitionKind::balanced ? "balanced" : "contiguous";
}

static void check_split(int64_t E, int64_t N) {
    if (N < 1) throw Error("expert partition: --gpus must be at least 1, got " + std::to_string(N));
    if (E < 1) throw Error("expert partition: n_routed_experts must be at least 1, got " + std::to_string(E));
    if (E % N != 0)
        throw Error("expert partition: n_routed_experts = " + std::to_string(E) + " does not split evenly over " +
                    std::to_string(N) + " GPUs (every GPU holds E/N experts)");
}

// Fills local and held from owner (held ascending, so local ids follow global order on each rank).
static void index_owners(ExpertPartition& p) {
    p.held.assign(static_cast<size_t>(p.world), {});
    p.local.assign(static_cast<size_t>(p.experts), -1);
    for (int32_t e = 0; e < p.experts; ++e) {
        auto& h = p.held[static_cast<size_t>(p.owner[static_cast<size_t>(e)])];
        p.local[static_cast<size_t>(e)] = static_cast<int32_t>(h.size());
        h.push_back(e);
    }
}

ExpertPartition ExpertPartition::contiguous(int64_t E, int64_t N) {
    check_split(E, N);
    ExpertPartition p;
    p.world = static_cast<int32_t>(N);
    p.experts = static_cast<int32_t>(E);
    p.owner.resize(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) p.owner[static_cast<size_t>(e)] = static_cast<int32_t>(e / (E / N));
    index_owners(p);
    return p;
}

ExpertPartition ExpertPartition::balanced(const std::vector<double>& load, int64_t N) {
    const int64_t E = static_cast<int64_t>(load.size());
    check_split(E, N);
    for (int64_t e = 0; e < E; ++e)
        if (!(load[static_cast<size_t>(e)] >= 0))
            throw Error("expert partition: load of expert " + std::to_string(e) + " is negative or NaN");
    std::vector<int32_t> order(static_cast<size_t>(E));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return load[static_cast<size_t>(a)] > load[static_cast<size_t>(b)]; });
    ExpertPartition p;
    p.world = static_cast<int32_t>(N);
    p.experts = static_cast<int32_t>(E);
    p.owner.assign(static_cast<size_t>(E), -1);
    std::vector<double> sum(static_cast<size_t>(N), 0.0);
    std::vector<int64_t> room(static_cast<size_t>(N), E / N);
    for (int32_t e : order) {
        int64_t best = -1;
        for (int64_t r = 0; r < N; ++r)
            if (room[static_cast<size_t>(r)] > 0 && (best < 0 || sum[static_cast<size_t>(r)] < sum[static_cast<size_t>(best)]))
                best = r;
        p.owner[static_cast<size_t>(e)] = static_cast<int32_t>(best);
        sum[static_cast<size_t>(best)] += load[static_cast<size_t>(e)];
        --room[static_cast<size_t>(best)];
    }
    index_owners(p);
    return p;
}

std::vector<double> ExpertPartition::rank_load(const std::vector<double>& load) const {
    MEGAMOE_CHECK(static_cast<int64_t>(load.size()) == experts, "rank_load: ", load.size(), " loads for ", experts,
                  " experts");
    std::vector<double> s(static_cast<size_t>(world), 0.0);
    for (int32_t e = 0; e < experts; ++e) s[static_cast<size_t>(owner[static_cast<size_t>(e)])] += load[static_cast<size_t>(e)];
    return s;
}

double ExpertPartition::imbalance(const std::vector<double>& load) const {
    const std::vector<double> s = rank_load(load);
    const double total = std::accumulate(s.begin(), s.end(), 0.0);
    if (total <= 0) return 1.0;
    return *std::max_element(s.begin(), s.end()) / (total / world);
}

std::vector<double> hash_expert_load(const int64_t* tid2eid, int64_t V, int64_t k, int64_t E,
                                     const double* token_weight) {
    std::vector<double> load(static_cast<size_t>(E), 0.0);
    for (int64_t v = 0; v < V; ++v) {
        for (int64_t i = 0; i < k; ++i) {
            const int64_t e = tid2eid[v * k + i];
            if (e < 0 || e >= E)
                throw Error("hash_expert_load: tid2eid[" + std::to_string(v) + ", " + std::to_string(i) + "] = " +
                            std::to_string(e) + " is outside [0, " + std::to_string(E) + ")");
            load[static_cast<size_t>(e)] += token_weight ? token_weight[v] : 1.0;
        }
    }
    return load;
}

std::vector<double> observed_expert_load(const int32_t* ids, int64_t T, int64_t k, int64_t E) {
    std::vector<double> load(static_cast<size_t>(E), 0.0);
    for (int64_t i = 0; i < T * k; ++i) {
        if (ids[i] < 0) continue;
        if (ids[i] >= E)
            throw Error("observed_expert_load: expert id " + std::to_string(ids[i]) + " at row " +
                        std::to_string(i / k) + " is outside [0, " + std::to_string(E) + ")");
        load[static_cast<size_t>(ids[i])] += 1.0;
    }
    return load;
}

ModelPartition partition_model(const ModelConfig& c, const Weights* w, int64_t N, PartitionKind kind,
                               const std::vector<std::vector<double>>* score_load) {
    ModelPartition mp;
    mp.world = static_cast<int32_t>(N);
    mp.kind = kind;
    const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok;
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
        if (kind == PartitionKind::contiguous) {
            mp.layers.push_back(ExpertPartition::contiguous(E, N));
        } else if (c.router_kind(l) == RouterKind::hash) {
            if (!w || static_cast<int64_t>(w->layers.size()) <= l || w->layers[static_cast<size_t>(l)].ffn.tid2eid.empty())
                throw Error("partition_model: balanced partition of hash layer " + std::to_string(l) +
                            " needs its tid2eid table (layers." + std::to_string(l) + ".ffn.gate.tid2eid)");
            const Tensor& t = w->layers[static_cast<size_t>(l)].ffn.tid2eid;
            mp.layers.push_back(ExpertPartition::balanced(hash_expert_load(t.as<int64_t>(), t.dim(0), k, E), N));
        } else if (score_load && static_cast<int64_t>(score_load->size()) > l &&
                   !(*score_load)[static_cast<size_t>(l)].empty()) {
            const auto& ld = (*score_load)[static_cast<size_t>(l)];
            if (static_cast<int64_t>(ld.size()) != E)
                throw Error("partition_model: score load of layer " + std::to_string(l) + " has " +
                            std::to_string(ld.size()) + " entries, n_routed_experts is " + std::to_string(E));
            mp.layers.push_back(ExpertPartition::balanced(ld, N));
        } else {
            mp.layers.push_back(ExpertPartition::contiguous(E, N));
        }
    }
    return mp;
}

}  // namespace megamoe::dist
