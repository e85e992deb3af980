// partition.h — which GPU (rank) holds which routed experts, per MoE layer. CPU-only; no CUDA.
//
// Expert parallelism (EP) over N ranks: every rank holds E/N routed experts of every layer
// (exactly E/N, so the weight bytes per rank are equal: the expert bytes dominate the model, and
// an unequal split would make the largest rank set the memory limit). Which experts go together
// is the only freedom:
//   contiguous  rank r holds [r·E/N, (r+1)·E/N): what a checkpoint's shard order gives for free
//   balanced    experts sorted by expected load (hits per token), each placed on the rank with
//               the least load so far that still has room (ties: lower expert id, lower rank),
//               so the busiest rank, which sets the step time, carries as little as possible
// Hash-routed layers (layer < num_hash_layers) route by token id through tid2eid [V, k], so their
// load is known from the table alone (every token id counted once, or weighted by a token
// frequency); score-routed layers need observed ids (a calibration run) and otherwise use
// contiguous. The partition is a pure function of its inputs: every rank computes the same one.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "io/config.h"
#include "io/weights.h"

namespace megamoe::dist {

enum class PartitionKind : uint8_t { contiguous, balanced };
const char* partition_kind_name(PartitionKind k);   // "contiguous" | "balanced"

// The routed experts of one layer over `world` ranks.
struct ExpertPartition {
    int32_t world = 1;                         // N ranks
    int32_t experts = 0;                       // E routed experts of the layer
    std::vector<int32_t> owner;                // [E] i32   rank that holds expert e
    std::vector<int32_t> local;                // [E] i32   index of e among its owner's experts (0 ≤ local < E/N)
    std::vector<std::vector<int32_t>> held;    // [N][E/N] i32   global ids held by rank r, ascending;
                                               //                held[owner[e]][local[e]] == e

    int32_t per_rank() const { return world > 0 ? experts / world : 0; }

    // Rank r holds [r·E/N, (r+1)·E/N). Throws Error when E % N != 0 (names n_routed_experts).
    static ExpertPartition contiguous(int64_t E, int64_t N);
    // load: [E] expected hits per expert (any non-negative scale). Throws Error on E % N != 0 or a
    // negative load.
    static ExpertPartition balanced(const std::vector<double>& load, int64_t N);

    // [N] summed load per rank, and the busiest rank's load over the mean (1 = perfect).
    std::vector<double> rank_load(const std::vector<double>& load) const;
    double imbalance(const std::vector<double>& load) const;
};

// Expected hits per expert of a hash-routed layer: tid2eid [V, k] i64, each token id weighted by
// token_weight[v] (nullptr: 1 each). Ids outside [0, E) throw Error naming the table entry.
std::vector<double> hash_expert_load(const int64_t* tid2eid, int64_t V, int64_t k, int64_t E,
                                     const double* token_weight = nullptr);
// Observed hits per expert: ids [T, k] i32 in [0, E) (entries < 0 are padding and skipped).
std::vector<double> observed_expert_load(const int32_t* ids, int64_t T, int64_t k, int64_t E);

// One partition per main layer (the MTP block is not split yet). balanced: hash layers from their
// tid2eid tables (w must hold them), score layers from `score_load[layer]` when given ([E] per
// layer, e.g. from a calibration run), else contiguous.
struct ModelPartition {
    int32_t world = 1;
    PartitionKind kind = PartitionKind::contiguous;
    std::vector<ExpertPartition> layers;       // [L]
};
ModelPartition partition_model(const ModelConfig& c, const Weights* w, int64_t N, PartitionKind kind,
                               const std::vector<std::vector<double>>* score_load = nullptr);

}  // namespace megamoe::dist
