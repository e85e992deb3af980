// dp.cpp — see dp.h.
#include "dist/dp.h"

#include <algorithm>
#include <cstddef>
#include <string>
#include <utility>

#include "core/common.h"
#include "ref/backend.h"   // SampledToken

namespace megamoe::dist {

namespace {
void check_world(int32_t world) {
    if (world < 1) fail("data-parallel ranks: a world of ", world, " GPUs");
}
}  // namespace

int32_t dp_slot(int32_t rank, int32_t local, int32_t world) {
    check_world(world);
    if (rank < 0 || rank >= world || local < 0) fail("data-parallel slot: rank ", rank, " of ", world, ", local slot ", local);
    return local * world + rank;
}

int32_t dp_rank(int32_t slot, int32_t world) {
    check_world(world);
    if (slot < 0) fail("data-parallel slot ", slot, " is negative");
    return slot % world;
}

int32_t dp_local(int32_t slot, int32_t world) {
    check_world(world);
    if (slot < 0) fail("data-parallel slot ", slot, " is negative");
    return slot / world;
}

int32_t dp_pick_rank(const std::vector<int64_t>& open, const std::vector<int64_t>& free_tokens, int64_t max_seqs) {
    if (open.size() != free_tokens.size()) fail("dp_pick_rank: ", open.size(), " open counts, ", free_tokens.size(), " free counts");
    int32_t best = -1;
    for (size_t r = 0; r < open.size(); ++r) {
        if (open[r] >= max_seqs) continue;
        if (best < 0) {
            best = static_cast<int32_t>(r);
            continue;
        }
        const size_t b = static_cast<size_t>(best);
        if (open[r] < open[b] || (open[r] == open[b] && free_tokens[r] > free_tokens[b])) best = static_cast<int32_t>(r);
    }
    return best;
}

DpStep plan_dp_step(const std::vector<int32_t>& slots, const std::vector<int64_t>& lens, bool all_logits, int32_t world) {
    check_world(world);
    if (slots.size() != lens.size()) fail("data-parallel step: ", slots.size(), " slots for ", lens.size(), " chunk lengths");
    DpStep p;
    p.chunks.resize(static_cast<size_t>(world));
    p.rows.resize(static_cast<size_t>(world));
    p.tokens.assign(static_cast<size_t>(world), 0);
    // A slot twice: sorted (slot, chunk) pairs, O(n log n) for a decode step of hundreds of chunks.
    std::vector<std::pair<int32_t, size_t>> order;
    for (size_t i = 0; i < slots.size(); ++i) order.emplace_back(slots[i], i);
    std::sort(order.begin(), order.end());
    for (size_t i = 1; i < order.size(); ++i)
        if (order[i].first == order[i - 1].first)
            fail("data-parallel step: slot ", order[i].first, " appears twice (chunks ", order[i - 1].second, " and ",
                 order[i].second, ")");
    for (size_t i = 0; i < slots.size(); ++i) {
        if (lens[i] < 1) fail("data-parallel step: chunk ", i, " has ", lens[i], " tokens");
        const size_t r = static_cast<size_t>(dp_rank(slots[i], world));
        p.chunks[r].push_back(static_cast<int64_t>(i));
        p.tokens[r] += lens[i];
        const int64_t n = all_logits ? lens[i] : 1;
        for (int64_t j = 0; j < n; ++j) p.rows[r].push_back(p.rows_total + j);
        p.rows_total += n;
    }
    return p;
}

template <typename T>
void merge_dp_rows(const DpStep& plan, const std::vector<std::vector<T>>& parts, int64_t width, std::vector<T>& out) {
    if (parts.size() != plan.rows.size()) fail("merge_dp_rows: ", parts.size(), " parts for ", plan.rows.size(), " ranks");
    out.assign(static_cast<size_t>(plan.rows_total * width), T{});
    for (size_t r = 0; r < parts.size(); ++r) {
        const std::vector<int64_t>& rows = plan.rows[r];
        if (parts[r].size() != rows.size() * static_cast<size_t>(width))
            fail("merge_dp_rows: rank ", r, " returned ", parts[r].size(), " values for ", rows.size(), " rows of ", width);
        for (size_t i = 0; i < rows.size(); ++i)
            std::copy(parts[r].begin() + static_cast<std::ptrdiff_t>(i * static_cast<size_t>(width)),
                      parts[r].begin() + static_cast<std::ptrdiff_t>((i + 1) * static_cast<size_t>(width)),
                      out.begin() + static_cast<std::ptrdiff_t>(rows[i] * width));
    }
}

template void merge_dp_rows<float>(const DpStep&, const std::vector<std::vector<float>>&, int64_t, std::vector<float>&);
template void merge_dp_rows<SampledToken>(const DpStep&, const std::vector<std::vector<SampledToken>>&, int64_t,
                                          std::vector<SampledToken>&);

}  // namespace megamoe::dist
