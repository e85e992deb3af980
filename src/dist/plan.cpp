// plan.cpp — dispatch plans from the router's ids (see plan.h). Plain loops: the specification the
// device pack kernels (dist/ep_nccl.cu) are tested against.
#include "dist/plan.h"

#include <algorithm>

#include "core/common.h"

namespace megamoe::dist {

const char* scheme_name(Scheme s) {
    return s == Scheme::all_to_all ? "all-to-all" : "all-gather + reduce-scatter";
}
const char* combine_name(Combine c) { return c == Combine::slot_rows ? "slot rows" : "partial sums"; }

static void check_ids(const ExpertPartition& p, const std::vector<RankIds>& ids, int64_t k) {
    if (k < 1) throw Error("dispatch plan: num_experts_per_tok must be at least 1, got " + std::to_string(k));
    if (static_cast<int64_t>(ids.size()) != p.world)
        throw Error("dispatch plan: ids of " + std::to_string(ids.size()) + " ranks for a world of " +
                    std::to_string(p.world));
    for (size_t r = 0; r < ids.size(); ++r) {
        if (ids[r].T < 0 || (ids[r].T > 0 && !ids[r].ids))
            throw Error("dispatch plan: rank " + std::to_string(r) + " has no ids for its " + std::to_string(ids[r].T) +
                        " tokens");
        for (int64_t i = 0; i < ids[r].T * k; ++i)
            if (ids[r].ids[i] >= p.experts)
                throw Error("dispatch plan: rank " + std::to_string(r) + " token " + std::to_string(i / k) + " slot " +
                            std::to_string(i % k) + ": expert id " + std::to_string(ids[r].ids[i]) +
                            " is not below n_routed_experts = " + std::to_string(p.experts));
    }
}

int64_t AllToAllPlan::send_rows(int32_t r) const {
    int64_t n = 0;
    for (int32_t q = 0; q < world; ++q) n += send_count[static_cast<size_t>(r * world + q)];
    return n;
}
int64_t AllToAllPlan::recv_rows(int32_t q) const {
    int64_t n = 0;
    for (int32_t r = 0; r < world; ++r) n += send_count[static_cast<size_t>(r * world + q)];
    return n;
}
int64_t AllToAllPlan::pairs_sent(int32_t q) const {
    int64_t n = 0;
    for (int32_t r = 0; r < world; ++r) n += pair_count[static_cast<size_t>(r * world + q)];
    return n;
}
int64_t AllToAllPlan::pairs_home(int32_t r) const {
    int64_t n = 0;
    for (int32_t q = 0; q < world; ++q) n += pair_count[static_cast<size_t>(r * world + q)];
    return n;
}
int64_t AllToAllPlan::max_block() const {
    return send_count.empty() ? 0 : *std::max_element(send_count.begin(), send_count.end());
}

AllToAllPlan plan_all_to_all(const ExpertPartition& p, const std::vector<RankIds>& ids, int64_t k) {
    check_ids(p, ids, k);
    const int32_t N = p.world;
    const size_t NN = static_cast<size_t>(N) * static_cast<size_t>(N);
    AllToAllPlan a;
    a.world = N;
    a.k = static_cast<int32_t>(k);
    a.send_count.assign(NN, 0);
    a.send_offset.assign(NN, 0);
    a.recv_offset.assign(NN, 0);
    a.pair_count.assign(NN, 0);
    a.pair_offset.assign(NN, 0);
    a.pair_send_offset.assign(NN, 0);
    a.send_token.resize(static_cast<size_t>(N));
    a.send_local.resize(static_cast<size_t>(N));
    a.pair_row.resize(static_cast<size_t>(N));
    for (int32_t r = 0; r < N; ++r) {
        const int64_t T = ids[static_cast<size_t>(r)].T;
        const int32_t* id = ids[static_cast<size_t>(r)].ids;
        a.tokens.push_back(T);
        // Counts first (a token goes to q at most once), then the blocks in rank order.
        for (int64_t t = 0; t < T; ++t) {
            for (int32_t q = 0; q < N; ++q) {
                bool any = false;
                for (int64_t s = 0; s < k; ++s) {
                    const int32_t e = id[t * k + s];
                    if (e >= 0 && p.owner[static_cast<size_t>(e)] == q) {
                        any = true;
                        ++a.pair_count[static_cast<size_t>(r * N + q)];
                    }
                }
                if (any) ++a.send_count[static_cast<size_t>(r * N + q)];
            }
        }
        for (int32_t q = 1; q < N; ++q) {
            a.send_offset[static_cast<size_t>(r * N + q)] =
                a.send_offset[static_cast<size_t>(r * N + q - 1)] + a.send_count[static_cast<size_t>(r * N + q - 1)];
            a.pair_offset[static_cast<size_t>(r * N + q)] =
                a.pair_offset[static_cast<size_t>(r * N + q - 1)] + a.pair_count[static_cast<size_t>(r * N + q - 1)];
        }
        auto& tok = a.send_token[static_cast<size_t>(r)];
        auto& loc = a.send_local[static_cast<size_t>(r)];
        auto& prow = a.pair_row[static_cast<size_t>(r)];
        tok.clear();
        loc.clear();
        prow.assign(static_cast<size_t>(T * k), -1);
        for (int32_t q = 0; q < N; ++q) {
            int64_t pair = a.pair_offset[static_cast<size_t>(r * N + q)];
            for (int64_t t = 0; t < T; ++t) {
                bool any = false;
                for (int64_t s = 0; s < k; ++s) {
                    const int32_t e = id[t * k + s];
                    if (e >= 0 && p.owner[static_cast<size_t>(e)] == q) {
                        any = true;
                        prow[static_cast<size_t>(t * k + s)] = static_cast<int32_t>(pair++);
                    }
                }
                if (!any) continue;
                tok.push_back(static_cast<int32_t>(t));
                for (int64_t s = 0; s < k; ++s) {
                    const int32_t e = id[t * k + s];
                    loc.push_back(e >= 0 && p.owner[static_cast<size_t>(e)] == q ? p.local[static_cast<size_t>(e)] : -1);
                }
            }
        }
    }
    for (int32_t q = 0; q < N; ++q) {
        for (int32_t r = 1; r < N; ++r) {
            a.recv_offset[static_cast<size_t>(q * N + r)] =
                a.recv_offset[static_cast<size_t>(q * N + r - 1)] + a.send_count[static_cast<size_t>((r - 1) * N + q)];
            a.pair_send_offset[static_cast<size_t>(q * N + r)] =
                a.pair_send_offset[static_cast<size_t>(q * N + r - 1)] + a.pair_count[static_cast<size_t>((r - 1) * N + q)];
        }
    }
    return a;
}

GatherPlan plan_gather_scatter(const ExpertPartition& p, const std::vector<RankIds>& ids, int64_t k) {
    check_ids(p, ids, k);
    const int32_t N = p.world;
    GatherPlan g;
    g.world = N;
    g.k = static_cast<int32_t>(k);
    for (const auto& r : ids) {
        g.tokens.push_back(r.T);
        g.T_pad = std::max(g.T_pad, r.T);
    }
    const int64_t rows = N * g.T_pad;
    g.gathered_ids.assign(static_cast<size_t>(rows * k), -1);
    for (int32_t r = 0; r < N; ++r)
        for (int64_t i = 0; i < ids[static_cast<size_t>(r)].T * k; ++i)
            g.gathered_ids[static_cast<size_t>(r * g.T_pad * k + i)] = std::max(ids[static_cast<size_t>(r)].ids[i], -1);
    g.local.assign(static_cast<size_t>(N), std::vector<int32_t>(static_cast<size_t>(rows * k), -1));
    g.pairs.assign(static_cast<size_t>(N), 0);
    for (int64_t i = 0; i < rows * k; ++i) {
        const int32_t e = g.gathered_ids[static_cast<size_t>(i)];
        if (e < 0) continue;
        const int32_t q = p.owner[static_cast<size_t>(e)];
        g.local[static_cast<size_t>(q)][static_cast<size_t>(i)] = p.local[static_cast<size_t>(e)];
        ++g.pairs[static_cast<size_t>(q)];
    }
    return g;
}

}  // namespace megamoe::dist
