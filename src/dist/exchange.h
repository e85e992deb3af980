// exchange.h — what the GPU runner (gpu/runner.cpp) needs from an expert-parallel MoE exchange:
// one rank's side of every main MoE layer, as three asynchronous calls on the runner's stream.
// The NCCL implementations (dist/nccl/exchange.h: all-gather + reduce-scatter, all-to-all) derive
// from it; the runner sees only this interface, so the gpu layer does not depend on NCCL.
//
// A MoE layer under expert parallelism (docs/multi-gpu.md §6, step 4):
//   router          ids [T, k] global expert ids, wts [T, k] (this rank's T tokens)
//   dispatch        the rows this rank's experts must see arrive: x_in [rows, D] bf16, local_in
//                   [rows, k] (this rank's local expert id of each slot, or skip() for a slot
//                   another rank computes), wts_in [rows, k]
//   expert layer    cuda::moe_layer_routed over per_rank experts + the skip bucket: f32 rows in
//                   expert order (routing weight applied) and inv [rows·k]
//   give_back       those rows go home (each slot's row, or each row's partial sum)
//   combine         y [T, D] f32 = shared + the routed outputs of this rank's tokens
// Every rank calls the same sequence with the same T (the collectives move T rows per rank; the
// multi-GPU backend pads each rank's step to a common bucket), so a decode step's calls have
// fixed sizes and are captured into the rank's CUDA graph. No host synchronization, no allocation.
//
// Numerics: exact (f32 adds in slot order from +0, then shared + sum: ops::moe's order, so one
// rank's y is bit-identical to the single-GPU combine) or official (each slot's row and the shared
// output rounded to bf16 before the sum, the sum rounded to bf16: ops::moe's official combine).
// Partial sums regroup the k terms (dist/plan.h states the bound); slot rows keep them bit-exact.
#pragma once

#include <cstdint>
#include <vector>

struct CUstream_st;

namespace megamoe::dist {

class ExpertExchange {
public:
    virtual ~ExpertExchange() = default;

    virtual int32_t world() const = 0;
    virtual int32_t rank() const = 0;
    virtual int64_t layers() const = 0;          // main MoE layers it holds a partition of
    virtual int32_t skip() const = 0;            // E / N: the local id of a slot computed elsewhere
    // Global ids of the routed experts this rank computes in `layer`, ascending (its local order;
    // ExpertPartition::held[rank]): what the rank uploads (gpu::WeightShard::held).
    virtual const std::vector<int32_t>& held(int64_t layer) const = 0;
    virtual int64_t max_tokens() const = 0;      // T per call at most
    virtual int64_t max_rows() const = 0;        // rows() at most (the expert layer's workspace T_max)

    // Sends this rank's T tokens of MoE layer `layer`: x [T, D] bf16, ids [T, k] i32 global ids
    // (negative: a padding slot, no expert), wts [T, k] f32. Throws Error on T outside
    // [0, max_tokens()] or a layer out of range.
    virtual void dispatch(int64_t layer, const uint16_t* x, const int32_t* ids, const float* wts, int64_t T,
                          CUstream_st* stream) = 0;
    // The expert layer's input after dispatch (device pointers valid until the next dispatch).
    virtual int64_t rows() const = 0;            // rows that arrived (including masked ones)
    virtual const uint16_t* x_in() const = 0;    // [rows, D] bf16
    virtual const int32_t* local_in() const = 0; // [rows, k] i32 local expert id or skip()
    virtual const float* wts_in() const = 0;     // [rows, k] f32
    // The expert layer's output goes home: expert_rows [≥ computed pairs, D] f32 in expert order,
    // inv [rows()·k] i32 the row of each computed slot (cuda::MoeLayerWorkspace's rows and
    // dispatch.inv). official: each row rounded to bf16 before any sum.
    virtual void give_back(const float* expert_rows, const int32_t* inv, bool official, CUstream_st* stream) = 0;
    // The small-T path's way home (cuda::moe_small_l2_placed): the expert layer writes each arrived
    // row's output straight into placed() in the exchange's own layout — per slot [rows, k, D] f32
    // (places_slot_rows(): slot s's row, 0 where computed elsewhere) or per row [rows, D] f32 (the
    // sum over the slots computed here, slot order from 0); official: each slot's row rounded to
    // bf16 first — which is what give_back makes of expert rows and inv; give_back_placed then
    // sends it home as give_back does.
    virtual bool places_slot_rows() const = 0;
    virtual float* placed() = 0;
    virtual void give_back_placed(CUstream_st* stream) = 0;
    // y [T, D] f32 = shared + Σ over this rank's T tokens' routed slots (slot order from 0).
    // shared: [T, D] f32 or nullptr; ids: the same [T, k] as dispatch's.
    virtual void combine(const float* shared, const int32_t* ids, float* y, bool official, CUstream_st* stream) = 0;
};

// The head split by vocabulary (docs/multi-gpu.md §5): rank r holds head rows [vocab_begin,
// vocab_end) (dist::split_vocab). With data-parallel attention each rank has its own sequences'
// rows, so a step's head is: gather every rank's final hidden rows, this rank's slice of the
// logits of all of them (the runner's head linear over rows() rows into slice_logits()), then
// each rank gets its own rows' slices from every rank and assembles their full logits. Every rank
// calls with the same R (the multi-GPU backend's padded row count); no host sync, capturable.
class HeadExchange {
public:
    virtual ~HeadExchange() = default;

    virtual int32_t world() const = 0;
    virtual int32_t rank() const = 0;
    virtual int64_t vocab() const = 0;           // V
    virtual int64_t vocab_begin() const = 0;     // this rank's head rows [vocab_begin, vocab_end)
    virtual int64_t vocab_end() const = 0;
    virtual int64_t max_rows() const = 0;        // R per call at most

    // All-gather this rank's R hidden rows [R, D] bf16 (rows past its own are padding: any values).
    // Throws Error on R outside [0, max_rows()].
    virtual void gather(const uint16_t* hidden, int64_t R, CUstream_st* stream) = 0;
    virtual int64_t rows() const = 0;            // N·R after gather (row q·R + t: rank q's row t)
    virtual const uint16_t* hidden_all() const = 0;   // [rows, D] bf16
    virtual float* slice_logits() = 0;           // [rows, vocab_end − vocab_begin] f32: the head's output
    // Each rank's rows of slice_logits go to it; logits [R, V] f32 = this rank's rows, every slice
    // in its columns.
    virtual void scatter(float* logits, CUstream_st* stream) = 0;
};

}  // namespace megamoe::dist
