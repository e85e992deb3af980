// plan.h — where the routed (token, slot) pairs of one MoE layer go over N ranks, and how their
// outputs come back: the exact buffer layouts the NCCL exchange uses (dist/ep_nccl.h), computed on
// the CPU from the router's expert ids. CPU-only; no CUDA.
//
// Tokens are data-parallel: rank r holds T_r tokens of its own (its share of the batch) with the
// router's ids_r [T_r, k] i32. Two schemes move them to the experts' owners (partition.h):
//
// all-to-all (EP dispatch, DeepEP-style): rank r sends each of its tokens once to every rank q that
//   owns at least one of the token's k experts (one row per (token, destination), not per slot: with
//   N = 2 and k = 6 a token has ~3 slots on each rank, so this moves ~3× fewer bytes than a row per
//   slot). A sent row carries x [D], its k routing weights and, per slot, the receiver's local expert
//   id or −1. Send buffer of r: blocks for q = 0..N−1 in rank order, tokens ascending inside a block.
//   Receive buffer of q: blocks from r = 0..N−1 in rank order. The return trip goes back the same way.
// gather / scatter (all-gather + reduce-scatter): every rank contributes T_pad = max_r T_r rows
//   (NCCL collectives need equal counts; rows ≥ T_r are padding with ids −1), the all-gather gives
//   every rank all N·T_pad rows (row g = r·T_pad + t), rank q computes the pairs it owns and a
//   reduce-scatter sums the ranks' outputs and hands rank r its T_pad rows.
//
// Combine (the outputs back into y[t] = shared(x_t) + Σ_s out(t, s)):
//   slot_rows     one f32 row per (token, slot) comes home (all-to-all: pair rows, the pairs of r on q
//                 ascending by t·k + s; gather/scatter: [N·T_pad, k, D] with zeros where another rank
//                 owns the slot, so the reduce-scatter adds only zeros to each value), and the home
//                 rank adds the k rows in slot order from 0, then adds that to the shared expert's
//                 output: the same f32 operations as ops::moe on one rank, so y is bit-identical.
//   partial_sums  each rank returns, per token, the sum of its own slots (in slot order from 0), and
//                 the home rank (all-to-all, ascending rank) or the reduce-scatter adds the partials:
//                 k× fewer bytes back than slot_rows in gather/scatter (1 row per token instead of k),
//                 but the k terms are added in another grouping, so y differs from one rank's y by
//                 rounding only: |Δ| ≤ 2(k−1)·u·Σ_s|out(t,s)| + u·(|y₁| + |y_N|), u = 2⁻²⁴ (two orders
//                 of the same k terms each err by at most (k−1)·u·Σ|terms| [Higham, §4.2]; the shared
//                 add rounds once more). tests/dist checks that bound element by element.
#pragma once

#include <cstdint>
#include <vector>

#include "dist/partition.h"

namespace megamoe::dist {

enum class Scheme : uint8_t { all_to_all, gather_scatter };
enum class Combine : uint8_t { slot_rows, partial_sums };
const char* scheme_name(Scheme s);     // "all-to-all" | "all-gather + reduce-scatter"
const char* combine_name(Combine c);   // "slot rows" | "partial sums"

// One rank's router output for a step.
struct RankIds {
    const int32_t* ids = nullptr;      // [T, k] i32 in [0, E); a negative id is a padding slot (no expert)
    int64_t T = 0;
};

// Matrices indexed [r·N + q] are row-major [N, N].
struct AllToAllPlan {
    int32_t world = 1, k = 0;
    std::vector<int64_t> tokens;             // [N] T_r
    // dispatch: one row per (token, destination)
    std::vector<int64_t> send_count;         // [N, N] rows r sends to q (its tokens with ≥ 1 slot on q)
    std::vector<int64_t> send_offset;        // [N, N] first row of the r→q block in r's send buffer
    std::vector<int64_t> recv_offset;        // [N, N] [q·N + r] first row of the r→q block in q's receive buffer
    std::vector<std::vector<int32_t>> send_token;   // [N][send rows of r] i32 local token of each send row
    std::vector<std::vector<int32_t>> send_local;   // [N][send rows of r, k] i32 local expert id of each
                                                    //   slot on the destination, −1: elsewhere or padding
    // slot_rows return: one row per (token, slot) pair
    std::vector<int64_t> pair_count;         // [N, N] pairs of r whose expert is on q
    std::vector<int64_t> pair_offset;        // [N, N] first row of q's block in r's return buffer
    std::vector<int64_t> pair_send_offset;   // [N, N] [q·N + r] first row of the block for r in q's return send buffer
    std::vector<std::vector<int32_t>> pair_row;     // [N][T_r, k] i32 row of pair (t, s) in r's return buffer, −1 padding

    int64_t send_rows(int32_t r) const;      // Σ_q send_count[r, q]
    int64_t recv_rows(int32_t q) const;      // Σ_r send_count[r, q]
    int64_t pairs_sent(int32_t q) const;     // Σ_r pair_count[r, q] (rows q returns with slot_rows)
    int64_t pairs_home(int32_t r) const;     // Σ_q pair_count[r, q]
    int64_t max_block() const;               // largest send_count (the per-peer capacity a fixed-size exchange needs)
};

// ids: one entry per rank (ids.size() = p.world). Throws Error on an id ≥ E, or k < 1.
AllToAllPlan plan_all_to_all(const ExpertPartition& p, const std::vector<RankIds>& ids, int64_t k);

struct GatherPlan {
    int32_t world = 1, k = 0;
    int64_t T_pad = 0;                       // rows every rank contributes (max T_r)
    std::vector<int64_t> tokens;             // [N] T_r
    std::vector<int32_t> gathered_ids;       // [N·T_pad, k] i32 global ids after the all-gather, −1 padding
    std::vector<std::vector<int32_t>> local; // [N][N·T_pad, k] i32 rank q's local expert id of each slot, −1 not on q
    std::vector<int64_t> pairs;              // [N] pairs rank q computes
};
GatherPlan plan_gather_scatter(const ExpertPartition& p, const std::vector<RankIds>& ids, int64_t k);

}  // namespace megamoe::dist
