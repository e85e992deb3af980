// sim.h — the CPU twins of the multi-GPU MoE layer and vocabulary-split head: N ranks simulated in
// one process, each working only from its own buffers (what it holds plus what the plan's
// exchanges deliver to it), with the CPU reference's ops (ref/ops.h). CPU-only; no CUDA.
//
// simulate_moe with Combine::slot_rows equals ops::moe on one rank bit for bit (plan.h says why);
// with Combine::partial_sums it differs by rounding within the bound stated in plan.h. The head
// split is exact: every logit is the same dot product of one head row with u, wherever it runs.
#pragma once

#include <cstdint>
#include <vector>

#include "dist/partition.h"
#include "dist/plan.h"
#include "io/config.h"
#include "io/weights.h"

namespace megamoe::dist {

// One rank's input to a MoE layer (the router already ran on it).
struct RankMoeInput {
    const float*   x = nullptr;      // [T, D] f32 the normalized MoE input of the rank's tokens
    const int32_t* ids = nullptr;    // [T, k] i32 routed experts
    const float*   wts = nullptr;    // [T, k] f32 routing weights (already scaled)
    int64_t T = 0;
};

// Bytes each rank sends over the exchange (payload only; the NCCL code's byte counts).
struct ExchangeBytes {
    std::vector<int64_t> dispatch;   // [N] bytes rank r sends out (to other ranks) on the way to the experts
    std::vector<int64_t> combine;    // [N] bytes rank r sends out on the way back
};

// y[r]: [T_r, D] f32 per rank. The experts of rank q are m.experts[p.held[q][l]]; the shared
// expert runs on each token's home rank. x_bytes: bytes of one element of x on the wire (2: bf16
// as the GPU sends it, 4: f32), used only for `bytes`. Throws Error on inconsistent inputs.
void simulate_moe(const MoeWeights& m, const ModelConfig& c, const ExpertPartition& p, Scheme scheme,
                  Combine combine, const std::vector<RankMoeInput>& in, std::vector<std::vector<float>>& y,
                  ExchangeBytes* bytes = nullptr, int64_t x_bytes = 2);

// ---- the head split by vocabulary: rank r holds rows [begin[r], begin[r+1]) of head [V, D].
struct VocabSplit {
    int32_t world = 1;
    int64_t vocab = 0;
    std::vector<int64_t> begin;      // [N + 1] i64, begin[0] = 0, begin[N] = V
    int64_t rows(int32_t r) const { return begin[static_cast<size_t>(r) + 1] - begin[static_cast<size_t>(r)]; }
};
// Slices of ceil(V / N) rounded up to a multiple of `align` rows (the last slice takes the rest,
// possibly fewer rows or none). Throws Error when N < 1 or V < 1.
VocabSplit split_vocab(int64_t V, int64_t N, int64_t align = 64);

// A view of head rows [v0, v1) as a Linear [v1 − v0, D] (no copy; bf16 and f32 heads; other
// formats throw Error naming the head's format).
Linear head_rows(const Linear& head, int64_t v0, int64_t v1);
// Rank r's logits slice: out [T, rows(r)] f32 = u [T, D] · head[begin[r]:begin[r+1]]ᵀ.
void head_logits_slice(const Linear& head, const VocabSplit& s, int32_t r, const float* u, int64_t T, float* out);
// The all-gather of the slices into [T, V] f32 (slices[r]: [T, rows(r)]).
void gather_logits(const VocabSplit& s, const std::vector<std::vector<float>>& slices, int64_t T, float* logits);

// Greedy across ranks without gathering the logits: each rank reduces its slice to one candidate
// per row (8 bytes), one all-gather of the candidates, then every rank picks the same id. Equal to
// ref's argmax over the whole row (ties to the lower id; a NaN logit never wins, except that a
// NaN at id 0 makes id 0 the answer, as ref's argmax scan does).
struct ArgmaxCandidate {
    float   value = 0;               // the slice's largest non-NaN logit
    int32_t id = -1;                 // its global id (−1: the slice has no non-NaN logit)
    int32_t nan_at_zero = 0;         // 1 when this slice holds id 0 and logit 0 is NaN
};
// slice: [T, rows(r)] f32 of rank r; out: [T] candidates.
void argmax_candidates(const VocabSplit& s, int32_t r, const float* slice, int64_t T, ArgmaxCandidate* out);
// cands: [N][T] (every rank's candidates for the same rows); ids: [T].
void reduce_argmax(const std::vector<std::vector<ArgmaxCandidate>>& cands, int64_t T, int32_t* ids);

}  // namespace megamoe::dist
