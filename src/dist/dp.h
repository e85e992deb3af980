// dp.h — data-parallel attention over N ranks (docs/multi-gpu.md §6, step 2): each sequence lives
// on one rank (its attention state, windows and compressed rows are there only), a step's chunks
// go to their sequences' ranks, every rank runs its part at the same time (the MoE exchange joins
// them layer by layer), and the logit rows come back in the step's order. The multi-GPU backend
// (gpu/multi_backend.h) is these functions plus threads; they are CPU-only and tested in CI.
#pragma once

#include <cstdint>
#include <vector>

namespace megamoe::dist {

// A backend slot names a rank and that rank's runner slot: slot = local · N + rank (so slots of a
// world of one are the runner's own). dp_rank / dp_local throw Error on a negative slot.
int32_t dp_slot(int32_t rank, int32_t local, int32_t world);
int32_t dp_rank(int32_t slot, int32_t world);
int32_t dp_local(int32_t slot, int32_t world);

// The rank a new sequence opens on: among ranks with open[r] < max_seqs, the fewest open
// sequences, then the most free state positions (free_tokens[r]), then the lowest rank; −1 when
// every rank is full. open, free_tokens: [N].
int32_t dp_pick_rank(const std::vector<int64_t>& open, const std::vector<int64_t>& free_tokens, int64_t max_seqs);

// One step split over the ranks.
struct DpStep {
    std::vector<std::vector<int64_t>> chunks;   // [N] indices of the step's chunks on rank r, in step order
    std::vector<std::vector<int64_t>> rows;     // [N] the step's logit row of each of rank r's rows, in its order
    std::vector<int64_t> tokens;                // [N] tokens rank r runs
    int64_t rows_total = 0;                     // logit rows of the whole step
};
// slots: [chunks] backend slots (dp_slot); lens: [chunks] tokens of each (≥ 1); all_logits: every
// token is a logit row, else each chunk's last (the runner's row order: chunk by chunk). Throws
// Error on mismatched sizes, a bad length or a slot twice.
DpStep plan_dp_step(const std::vector<int32_t>& slots, const std::vector<int64_t>& lens, bool all_logits, int32_t world);

// out [rows_total, width] from parts[r] [rows[r].size(), width] (rank r's rows in its order).
// Throws Error when a part's size is not rows[r].size() · width.
template <typename T>
void merge_dp_rows(const DpStep& plan, const std::vector<std::vector<T>>& parts, int64_t width, std::vector<T>& out);

}  // namespace megamoe::dist
