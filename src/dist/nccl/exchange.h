// exchange.h — one rank's side of the MoE exchange over NCCL, in the layouts of dist/plan.h, as a
// sequence of asynchronous calls on one stream: no host synchronization, no allocation, every
// NCCL call with a byte count fixed at construction, so a decode step's whole sequence can be
// captured into the rank's CUDA graph and replayed. Built only with NCCL (MEGAMOE_HAVE_NCCL).
//
// The expert computation between dispatch and combine is the caller's (the runner's routed-expert
// layer, cuda/gemm.h): route the local ids over per_rank + 1 experts with cuda::moe_route_counts
// (the last, `skip`, collects slots this rank does not compute), gather, run the experts
// 0..per_rank−1 over rows [0, offsets[per_rank]), and hand the f32 rows (in that expert order,
// already scaled by the routing weight) and inv to place().
//
// Why sizes are fixed: an ncclSend's count is a host value at enqueue time, while the real counts
// exist only on the device after the router. Reading them back would be a host sync per layer;
// instead the all-to-all sends each peer a block of capacity T_pad rows (a token goes to a peer at
// most once, so T_pad never drops a token) together with the real count, and the receiver masks
// rows past the count. The bytes on the wire are then those of the all-gather (T_pad rows per
// peer); docs/multi-gpu.md compares the two. Hash-routed layers could size exactly (their ids
// are known from the tokens before the step), which this code does not do yet.
#pragma once

#include <cstdint>

#include "cuda/buffer.h"
#include "dist/nccl/comm.h"
#include "dist/partition.h"
#include "dist/plan.h"

struct CUstream_st;

namespace megamoe::dist {

// all-gather + reduce-scatter (plan_gather_scatter's layout; rows g = r·T_pad + t).
class GatherScatterExchange {
public:
    GatherScatterExchange(const Communicator& comm, const ExpertPartition& p, int64_t T_pad, int64_t k, int64_t D,
                          Combine combine);   // throws Error on a partition of another world

    int64_t rows() const { return world_ * T_pad_; }       // N·T_pad gathered rows
    int32_t skip() const { return per_rank_; }             // local id of a slot computed elsewhere
    int64_t width() const { return combine_ == Combine::slot_rows ? k_ * D_ : D_; }

    // All-gather this rank's x [T_pad, D] bf16, ids [T_pad, k] i32 (negative: padding) and wts
    // [T_pad, k] f32, then local = this rank's local expert id of each gathered slot, or skip().
    void gather(const uint16_t* x, const int32_t* ids, const float* wts, CUstream_st* stream);
    // out from the expert rows: slot_rows: out[g, s] = rows[inv[g·k+s]] where computed here, else 0;
    // partial_sums: out[g] = Σ_s of those in slot order from 0.  rows: [≥ pairs, D] f32, inv: [rows()·k].
    void place(const float* expert_rows, const int32_t* inv, CUstream_st* stream);
    // Reduce-scatter (sum) of out into home [T_pad, width()].
    void scatter(CUstream_st* stream);
    // y [T_pad, D] f32 = shared + (Σ_s home[t, s] over ids ≥ 0 in slot order from 0 | home[t]).
    // shared: [T_pad, D] f32 or nullptr (then 0 + sum); ids: this rank's [T_pad, k].
    void combine(const float* shared, const int32_t* ids, float* y, CUstream_st* stream) const;

    cuda::DeviceArray<uint16_t> x_all;     // [N·T_pad, D] bf16
    cuda::DeviceArray<int32_t>  ids_all;   // [N·T_pad, k] i32 global ids
    cuda::DeviceArray<float>    wts_all;   // [N·T_pad, k] f32
    cuda::DeviceArray<int32_t>  local;     // [N·T_pad, k] i32 local expert id or skip()
    cuda::DeviceArray<int32_t>  owned;     // [E] i32 local id of expert e on this rank, −1 elsewhere
    cuda::DeviceArray<float>    out;       // [N·T_pad, width] f32
    cuda::DeviceArray<float>    home;      // [T_pad, width] f32

private:
    ncclComm* comm_ = nullptr;
    int32_t world_ = 1, rank_ = 0, per_rank_ = 0;
    int64_t T_pad_ = 0, k_ = 0, D_ = 0, E_ = 0;
    Combine combine_ = Combine::slot_rows;
};

// all-to-all with one row per (token, destination) (plan_all_to_all's order inside each block; the
// blocks sit at fixed offsets q·cap instead of packed), partial-sum return.
class AllToAllExchange {
public:
    AllToAllExchange(const Communicator& comm, const ExpertPartition& p, int64_t cap, int64_t k, int64_t D);

    int64_t cap() const { return cap_; }                   // rows per peer block (≥ the tokens of a step)
    int32_t skip() const { return per_rank_; }
    int64_t recv_rows() const { return world_ * cap_; }    // receive buffer rows (block r at r·cap)

    // Pack this rank's T tokens (x [T, D] bf16, ids [T, k], wts [T, k]; T ≤ cap) into per-peer blocks,
    // then exchange blocks and counts (grouped ncclSend / ncclRecv), then recv_local = the received
    // local ids with skip() for slots elsewhere and rows past a block's count.
    void dispatch(const uint16_t* x, const int32_t* ids, const float* wts, int64_t T, CUstream_st* stream);
    // ret[j] = Σ_s rows[inv[j·k+s]] over the computed slots of received row j (slot order from 0),
    // then the blocks go back (grouped send / recv) into back.  rows: f32 [≥ pairs, D]; inv [recv_rows()·k].
    void give_back(const float* rows, const int32_t* inv, CUstream_st* stream);
    // y [T, D] f32 = shared + Σ_q back[q, row of t in q] (ascending q, from 0). shared may be nullptr.
    void combine(const float* shared, float* y, int64_t T, CUstream_st* stream) const;

    cuda::DeviceArray<int32_t>  owner;       // [E] i32 partition owner
    cuda::DeviceArray<int32_t>  local_of;    // [E] i32 partition local id
    cuda::DeviceArray<uint16_t> send_x;      // [N, cap, D] bf16
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
    ncclComm* comm_ = nullptr;
    int32_t world_ = 1, rank_ = 0, per_rank_ = 0;
    int64_t cap_ = 0, k_ = 0, D_ = 0, E_ = 0;
};

}  // namespace megamoe::dist
