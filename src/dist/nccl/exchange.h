// exchange.h — one rank's side of the MoE exchange over NCCL, in the layouts of dist/plan.h, as a
// sequence of asynchronous calls on one stream: no host synchronization, no allocation, every
// NCCL call with a byte count that is a host value of the call (the step's T, the same on every
// rank), so a decode step's whole sequence can be captured into the rank's CUDA graph and
// replayed. Both schemes implement dist::ExpertExchange (dist/exchange.h), the interface the GPU
// runner calls. Built only with NCCL (MEGAMOE_HAVE_NCCL).
//
// The expert computation between dispatch and give_back is the caller's (the runner's routed-expert
// layer, cuda/gemm.h): route the local ids over per_rank + 1 experts (the last, `skip`, collects
// slots this rank does not compute), gather, run the experts 0..per_rank−1 over rows
// [0, offsets[per_rank]), and hand the f32 rows (in that expert order, already scaled by the
// routing weight) and inv to give_back().
//
// Why sizes are per call and not per layer's real counts: an ncclSend's count is a host value at
// enqueue time, while the real counts exist only on the device after the router. Reading them back
// would be a host sync per layer; instead the all-to-all sends each peer a block of T rows (a
// token goes to a peer at most once, so T never drops a token) together with the real count, and
// the receiver masks rows past the count. The bytes on the wire are then those of the all-gather
// (T rows per peer); docs/multi-gpu.md compares the two. Hash-routed layers could size exactly
// (their ids are known from the tokens before the step), which this code does not do yet.
//
// One object serves every main MoE layer: the buffers are shared, the partition (which rank owns
// which expert) is a small device table per layer, chosen by dispatch's `layer`.
#pragma once

#include <cstdint>
#include <vector>

#include "cuda/buffer.h"
#include "dist/exchange.h"
#include "dist/nccl/comm.h"
#include "dist/partition.h"
#include "dist/plan.h"
#include "dist/sim.h"   // VocabSplit

struct CUstream_st;

namespace megamoe::dist {

// What both expert exchanges share: the communicator, the partitions' bookkeeping (held experts
// per layer, the skip id) and the call's shape. Not an interface of its own; the runner sees
// ExpertExchange. Throws Error on an empty communicator, no partition, a partition of another
// world or malformed, a partition with another E than layer 0's, k < 1 or D < 1.
class PartitionedExchange : public ExpertExchange {
public:
    int32_t world() const override { return world_; }
    int32_t rank() const override { return rank_; }
    int64_t layers() const override { return static_cast<int64_t>(held_.size()); }
    int32_t skip() const override { return per_rank_; }
    const std::vector<int32_t>& held(int64_t layer) const override;

protected:
    PartitionedExchange(const Communicator& comm, const std::vector<ExpertPartition>& layers, int64_t k, int64_t D);
    // Throws Error on a layer outside the partitions or T outside [0, max_tokens()]; then T_ = T.
    void begin_call(int64_t layer, int64_t T);

    ncclComm* comm_ = nullptr;
    int32_t world_ = 1, rank_ = 0, per_rank_ = 0;
    int64_t T_ = 0, k_ = 0, D_ = 0, E_ = 0;
    std::vector<std::vector<int32_t>> held_;   // [L][E/N]
};

// all-gather + reduce-scatter (plan_gather_scatter's layout; rows g = r·T + t for a call of T
// tokens per rank).
class GatherScatterExchange final : public PartitionedExchange {
public:
    // layers: one partition per main MoE layer (the same world and E in each); T_max: tokens per
    // rank and call at most. Throws Error on a partition of another world, differing E, T_max < 1.
    GatherScatterExchange(const Communicator& comm, const std::vector<ExpertPartition>& layers, int64_t T_max, int64_t k,
                          int64_t D, Combine combine);
    GatherScatterExchange(const Communicator& comm, const ExpertPartition& p, int64_t T_max, int64_t k, int64_t D,
                          Combine combine)
        : GatherScatterExchange(comm, std::vector<ExpertPartition>{p}, T_max, k, D, combine) {}

    int64_t max_tokens() const override { return T_max_; }
    int64_t max_rows() const override { return world_ * T_max_; }
    int64_t width() const { return combine_ == Combine::slot_rows ? k_ * D_ : D_; }

    // All-gather this rank's x [T, D] bf16, ids [T, k] i32 (negative: padding) and wts [T, k]
    // f32, then local = this rank's local expert id of each gathered slot in `layer`, or skip().
    void dispatch(int64_t layer, const uint16_t* x, const int32_t* ids, const float* wts, int64_t T,
                  CUstream_st* stream) override;
    int64_t rows() const override { return world_ * T_; }       // N·T gathered rows
    const uint16_t* x_in() const override { return x_all.data(); }
    const int32_t* local_in() const override { return local.data(); }
    const float* wts_in() const override { return wts_all.data(); }
    // out from the expert rows (slot_rows: out[g, s] = rows[inv[g·k+s]] where computed here, else 0;
    // partial_sums: out[g] = Σ_s of those in slot order from 0), then a reduce-scatter (sum) of out
    // into home [T, width()].
    void give_back(const float* expert_rows, const int32_t* inv, bool official, CUstream_st* stream) override;
    bool places_slot_rows() const override { return combine_ == Combine::slot_rows; }
    float* placed() override { return out.data(); }
    void give_back_placed(CUstream_st* stream) override;   // the reduce-scatter of out into home
    // y [T, D] f32 = shared + (Σ_s home[t, s] over ids ≥ 0 in slot order from 0 | home[t]).
    void combine(const float* shared, const int32_t* ids, float* y, bool official, CUstream_st* stream) override;

    cuda::DeviceArray<uint16_t> x_all;     // [N·T_max, D] bf16
    cuda::DeviceArray<int32_t>  ids_all;   // [N·T_max, k] i32 global ids
    cuda::DeviceArray<float>    wts_all;   // [N·T_max, k] f32
    cuda::DeviceArray<int32_t>  local;     // [N·T_max, k] i32 local expert id or skip()
    cuda::DeviceArray<int32_t>  owned;     // [L, E] i32 local id of expert e on this rank in layer l, −1 elsewhere
    cuda::DeviceArray<float>    out;       // [N·T_max, width] f32
    cuda::DeviceArray<float>    home;      // [T_max, width] f32

private:
    int64_t T_max_ = 0;
    Combine combine_ = Combine::slot_rows;
};

// all-to-all with one row per (token, destination) (plan_all_to_all's order inside each block; the
// blocks sit at fixed offsets q·T for a call of T tokens per rank instead of packed), partial-sum
// return.
class AllToAllExchange final : public PartitionedExchange {
public:
    AllToAllExchange(const Communicator& comm, const std::vector<ExpertPartition>& layers, int64_t cap, int64_t k,
                     int64_t D);
    AllToAllExchange(const Communicator& comm, const ExpertPartition& p, int64_t cap, int64_t k, int64_t D)
        : AllToAllExchange(comm, std::vector<ExpertPartition>{p}, cap, k, D) {}

    int64_t max_tokens() const override { return cap_; }
    int64_t max_rows() const override { return world_ * cap_; }
    int64_t cap() const { return cap_; }                   // tokens per rank and call at most

    // Pack this rank's T tokens (x [T, D] bf16, ids [T, k], wts [T, k]; T ≤ cap) into per-peer blocks
    // of T rows, then exchange blocks and counts (grouped ncclSend / ncclRecv), then recv_local = the
    // received local ids with skip() for slots elsewhere and rows past a block's count.
    void dispatch(int64_t layer, const uint16_t* x, const int32_t* ids, const float* wts, int64_t T,
                  CUstream_st* stream) override;
    int64_t rows() const override { return world_ * T_; }  // receive rows (block r at r·T)
    const uint16_t* x_in() const override { return recv_x.data(); }
    const int32_t* local_in() const override { return recv_local.data(); }
    const float* wts_in() const override { return recv_wts.data(); }
    // ret[j] = Σ_s rows[inv[j·k+s]] over the computed slots of received row j (slot order from 0),
    // then the blocks go back (grouped send / recv) into back.
    void give_back(const float* rows, const int32_t* inv, bool official, CUstream_st* stream) override;
    bool places_slot_rows() const override { return false; }
    float* placed() override { return ret.data(); }         // [rows, D]: block q at q·T
    void give_back_placed(CUstream_st* stream) override;   // the blocks of ret go back into back
    // y [T, D] f32 = shared + Σ_q back[q, row of t in q] (ascending q, from 0). shared may be
    // nullptr; ids is not read (row_of holds where each token went).
    void combine(const float* shared, const int32_t* ids, float* y, bool official, CUstream_st* stream) override;

    cuda::DeviceArray<int32_t>  owner;       // [L, E] i32 partition owner
    cuda::DeviceArray<int32_t>  local_of;    // [L, E] i32 partition local id
    cuda::DeviceArray<uint16_t> send_x;      // [N, cap, D] bf16 (block q at q·T)
    cuda::DeviceArray<int32_t>  send_local;  // [N, cap, k] i32 (−1: slot elsewhere)
    cuda::DeviceArray<float>    send_wts;    // [N, cap, k] f32
    cuda::DeviceArray<int32_t>  send_token;  // [N, cap] i32 local token of each send row, −1 past the count
    cuda::DeviceArray<int32_t>  send_count;  // [N] i32
    cuda::DeviceArray<int32_t>  row_of;      // [cap, N] i32 send row of (t, q), −1: t not sent to q
    cuda::DeviceArray<uint16_t> recv_x;      // [N, cap, D] bf16
    cuda::DeviceArray<int32_t>  recv_meta;   // [N, cap, k] i32 as sent
    cuda::DeviceArray<float>    recv_wts;    // [N, cap, k] f32
    cuda::DeviceArray<int32_t>  recv_count;  // [N] i32
    cuda::DeviceArray<int32_t>  recv_local;  // [N, cap, k] i32 local id or skip()
    cuda::DeviceArray<float>    ret;         // [N, cap, D] f32 partial sums going back
    cuda::DeviceArray<float>    back;        // [N, cap, D] f32 partial sums come home

private:
    int64_t cap_ = 0;
};

// The head's vocabulary exchange (dist::HeadExchange): all-gather of the hidden rows, then grouped
// send / recv of each rank's rows' slices (rank q's slice has rows(q) columns; a slice of no
// columns sends nothing), then one kernel that writes each slice into its columns.
class VocabExchange final : public HeadExchange {
public:
    // split: split_vocab's slices (split.world == comm.world(), every slice non-empty); R_max: rows
    // per rank and call at most; D: hidden size. Throws Error otherwise.
    VocabExchange(const Communicator& comm, const VocabSplit& split, int64_t R_max, int64_t D);

    int32_t world() const override { return world_; }
    int32_t rank() const override { return rank_; }
    int64_t vocab() const override { return split_.vocab; }
    int64_t vocab_begin() const override { return split_.begin[static_cast<size_t>(rank_)]; }
    int64_t vocab_end() const override { return split_.begin[static_cast<size_t>(rank_) + 1]; }
    int64_t max_rows() const override { return R_max_; }

    void gather(const uint16_t* hidden, int64_t R, CUstream_st* stream) override;
    int64_t rows() const override { return world_ * R_; }
    const uint16_t* hidden_all() const override { return hidden_all_.data(); }
    float* slice_logits() override { return slices_.data(); }
    void scatter(float* logits, CUstream_st* stream) override;

private:
    ncclComm* comm_ = nullptr;
    int32_t world_ = 1, rank_ = 0;
    int64_t R_max_ = 0, R_ = 0, D_ = 0;
    VocabSplit split_;
    cuda::DeviceArray<uint16_t> hidden_all_;   // [N·R_max, D] bf16
    cuda::DeviceArray<float>    slices_;       // [N·R_max, rows(rank)] f32 this rank's slice of every row
    cuda::DeviceArray<float>    recv_;         // [R_max·V] f32: from rank q, [R, rows(q)] at R·begin[q]
    cuda::DeviceArray<int64_t>  begin_;        // [N + 1] the split's column starts
};

}  // namespace megamoe::dist
