// exchange.cu — the MoE exchange over NCCL (see exchange.h). Kernels are plain and deterministic:
// every output element is written by one thread from fixed inputs, sums run in a fixed order.
#include "dist/nccl/exchange.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <cub/block/block_scan.cuh>
#include <string>
#include <vector>

#include "core/common.h"
#include "cuda/linear.h"   // CUDA_CHECK
#include "cuda/numerics.cuh"

namespace megamoe::dist {

namespace {

constexpr int kThreads = 256;

cudaStream_t cs(CUstream_st* s) { return reinterpret_cast<cudaStream_t>(s); }
ncclComm_t nc(ncclComm* c) { return reinterpret_cast<ncclComm_t>(c); }

int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

// local[i] = owned[ids[i]] when ≥ 0, else skip (other rank, padding or an id outside [0, E)).
__global__ void map_local_kernel(const int32_t* ids, const int32_t* owned, int64_t n, int32_t E, int32_t skip,
                                 int32_t* local) {
    const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (i >= n) return;
    const int32_t e = ids[i];
    const int32_t l = (e >= 0 && e < E) ? owned[e] : -1;
    local[i] = l >= 0 ? l : skip;
}

// Per row g and column d: slot_rows writes k values, partial_sums one sum (slot order from 0).
// official: each value rounded to bf16 first (ops::moe's official combine sums bf16 rows).
__global__ void place_kernel(const float* rows, const int32_t* inv, const int32_t* local, int64_t R, int32_t k,
                             int64_t D, int32_t skip, bool slot_rows, bool official, float* out) {
    const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (i >= R * D) return;
    const int64_t g = i / D, d = i % D;
    float sum = 0.0f;
    for (int32_t s = 0; s < k; ++s) {
        const int64_t slot = g * k + s;
        const bool here = local[slot] != skip;
        float v = here ? rows[static_cast<int64_t>(inv[slot]) * D + d] : 0.0f;
        if (official) v = cuda::nm::bf16_round(v);
        if (slot_rows)
            out[slot * D + d] = v;
        else if (here)
            sum = __fadd_rn(sum, v);
    }
    if (!slot_rows) out[g * D + d] = sum;
}

// y[t, d] = shared + Σ_s home[t, s, d] (ids ≥ 0) or shared + home[t, d]. official: shared rounded
// to bf16 before the add, the result after it (the slot values were rounded by place_kernel).
__global__ void combine_gs_kernel(const float* home, const int32_t* ids, const float* shared, int64_t T, int32_t k,
                                  int64_t D, bool slot_rows, bool official, float* y) {
    const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (i >= T * D) return;
    const int64_t t = i / D, d = i % D;
    float sum = 0.0f;
    if (slot_rows) {
        for (int32_t s = 0; s < k; ++s)
            if (ids[t * k + s] >= 0) sum = __fadd_rn(sum, home[(t * k + s) * D + d]);
    } else {
        sum = __fadd_rn(sum, home[i]);
    }
    if (shared) sum = __fadd_rn(official ? cuda::nm::bf16_round(shared[i]) : shared[i], sum);
    y[i] = official ? cuda::nm::bf16_round(sum) : sum;
}

// One block per destination q (its send rows at q·blk): the tokens with ≥ 1 slot on q, ascending (a block-wide scan per
// chunk of kThreads tokens), their metadata, the count, and row_of[t, q].
__global__ void pack_meta_kernel(const int32_t* ids, const float* wts, const int32_t* owner, const int32_t* local_of,
                                 int64_t T, int32_t k, int32_t E, int64_t blk, int32_t N, int32_t* send_token,
                                 int32_t* send_local, float* send_wts, int32_t* send_count, int32_t* row_of) {
    using Scan = cub::BlockScan<int, kThreads>;
    __shared__ typename Scan::TempStorage tmp;
    __shared__ int base;
    const int32_t q = blockIdx.x;
    if (threadIdx.x == 0) base = 0;
    __syncthreads();
    for (int64_t t0 = 0; t0 < T; t0 += kThreads) {
        const int64_t t = t0 + threadIdx.x;
        int flag = 0;
        if (t < T)
            for (int32_t s = 0; s < k; ++s) {
                const int32_t e = ids[t * k + s];
                flag |= (e >= 0 && e < E && owner[e] == q) ? 1 : 0;
            }
        int pos = 0, total = 0;
        Scan(tmp).ExclusiveSum(flag, pos, total);
        if (t < T) {
            const int32_t row = flag ? base + pos : -1;
            row_of[t * N + q] = row;
            if (flag) {
                const int64_t j = static_cast<int64_t>(q) * blk + row;
                send_token[j] = static_cast<int32_t>(t);
                for (int32_t s = 0; s < k; ++s) {
                    const int32_t e = ids[t * k + s];
                    send_local[j * k + s] = (e >= 0 && e < E && owner[e] == q) ? local_of[e] : -1;
                    send_wts[j * k + s] = wts[t * k + s];
                }
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) base += total;
        __syncthreads();
    }
    // Rows past the count: no token, no slot (deterministic contents for the fixed-size send).
    for (int64_t j = base + threadIdx.x; j < blk; j += kThreads) {
        send_token[static_cast<int64_t>(q) * blk + j] = -1;
        for (int32_t s = 0; s < k; ++s) {
            send_local[(static_cast<int64_t>(q) * blk + j) * k + s] = -1;
            send_wts[(static_cast<int64_t>(q) * blk + j) * k + s] = 0.0f;
        }
    }
    if (threadIdx.x == 0) send_count[q] = base;
}

// send_x[q, j] = x[send_token[q, j]] (zeros past the count).
__global__ void pack_rows_kernel(const uint16_t* x, const int32_t* send_token, int64_t rows, int64_t D, uint16_t* send_x) {
    const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (i >= rows * D) return;
    const int64_t j = i / D, d = i % D;
    const int32_t t = send_token[j];
    send_x[i] = t >= 0 ? x[static_cast<int64_t>(t) * D + d] : uint16_t{0};
}

// recv_local = meta (−1 → skip), and skip for rows past their block's count.
__global__ void mask_received_kernel(const int32_t* meta, const int32_t* count, int64_t blk, int32_t k, int32_t N,
                                     int32_t skip, int32_t* local) {
    const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (i >= static_cast<int64_t>(N) * blk * k) return;
    const int64_t j = i / k, r = j / blk, row = j % blk;
    const int32_t l = row < count[r] ? meta[i] : -1;
    local[i] = l >= 0 ? l : skip;
}

// y[t] = shared + Σ_q back[q, row_of[t, q]] (ascending q, from 0); official: as combine_gs_kernel.
__global__ void combine_a2a_kernel(const float* back, const int32_t* row_of, const float* shared, int64_t T, int32_t N,
                                   int64_t blk, int64_t D, bool official, float* y) {
    const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (i >= T * D) return;
    const int64_t t = i / D, d = i % D;
    float sum = 0.0f;
    for (int32_t q = 0; q < N; ++q) {
        const int32_t j = row_of[t * N + q];
        if (j >= 0) sum = __fadd_rn(sum, back[(static_cast<int64_t>(q) * blk + j) * D + d]);
    }
    if (shared) sum = __fadd_rn(official ? cuda::nm::bf16_round(shared[i]) : shared[i], sum);
    y[i] = official ? cuda::nm::bf16_round(sum) : sum;
}

// logits[t, begin[q] + v] = recv[R·begin[q] + t·(begin[q+1] − begin[q]) + v]: slice q of row t.
__global__ void assemble_logits_kernel(const float* recv, const int64_t* begin, int32_t N, int64_t R, int64_t V,
                                       float* logits) {
    const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (i >= R * V) return;
    const int64_t t = i / V, col = i % V;
    int32_t q = 0;
    while (q + 1 < N && begin[q + 1] <= col) ++q;
    const int64_t w = begin[q + 1] - begin[q];
    logits[i] = recv[R * begin[q] + t * w + (col - begin[q])];
}

}  // namespace

// ---- what both expert exchanges share

PartitionedExchange::PartitionedExchange(const Communicator& comm, const std::vector<ExpertPartition>& layers,
                                         int64_t k, int64_t D)
    : comm_(comm.get()), world_(comm.world()), rank_(comm.rank()), k_(k), D_(D) {
    if (!comm.get()) throw Error("MoE exchange: the communicator is empty");
    if (layers.empty()) throw Error("MoE exchange: no expert partition (one per main MoE layer)");
    if (k < 1 || D < 1)
        throw Error("MoE exchange: num_experts_per_tok (" + std::to_string(k) + ") and hidden_size (" + std::to_string(D) +
                    ") must be positive");
    for (size_t l = 0; l < layers.size(); ++l) {
        const ExpertPartition& p = layers[l];
        if (p.world != comm.world())
            throw Error("MoE exchange: the expert partition of layer " + std::to_string(l) + " is for " +
                        std::to_string(p.world) + " GPUs, the NCCL world has " + std::to_string(comm.world()));
        if (p.experts != layers[0].experts || p.experts < 1 ||
            p.owner.size() != static_cast<size_t>(p.experts) || p.local.size() != static_cast<size_t>(p.experts) ||
            p.held.size() != static_cast<size_t>(p.world))
            throw Error("MoE exchange: the expert partition of layer " + std::to_string(l) + " is malformed (" +
                        std::to_string(p.experts) + " experts, layer 0 has " + std::to_string(layers[0].experts) + ")");
        held_.push_back(p.held[static_cast<size_t>(comm.rank())]);
    }
    per_rank_ = layers[0].per_rank();
    E_ = layers[0].experts;
}

const std::vector<int32_t>& PartitionedExchange::held(int64_t layer) const {
    if (layer < 0 || layer >= layers())
        throw Error("MoE exchange: layer " + std::to_string(layer) + " outside the " + std::to_string(layers()) +
                    " partitioned layers");
    return held_[static_cast<size_t>(layer)];
}

void PartitionedExchange::begin_call(int64_t layer, int64_t T) {
    (void)held(layer);   // the layer's range check
    if (T < 0 || T > max_tokens())
        throw Error("MoE exchange: " + std::to_string(T) + " tokens in one call, the exchange holds " +
                    std::to_string(max_tokens()));
    T_ = T;
}

// ---- all-gather + reduce-scatter

GatherScatterExchange::GatherScatterExchange(const Communicator& comm, const std::vector<ExpertPartition>& layers,
                                             int64_t T_max, int64_t k, int64_t D, Combine combine)
    : PartitionedExchange(comm, layers, k, D), T_max_(T_max), combine_(combine) {
    if (T_max < 1) throw Error("MoE exchange: T_max must be at least 1, got " + std::to_string(T_max));
    const int64_t R = max_rows();
    x_all = cuda::DeviceArray<uint16_t>(static_cast<size_t>(R * D), "exchange x_all");
    ids_all = cuda::DeviceArray<int32_t>(static_cast<size_t>(R * k), "exchange ids_all");
    wts_all = cuda::DeviceArray<float>(static_cast<size_t>(R * k), "exchange wts_all");
    local = cuda::DeviceArray<int32_t>(static_cast<size_t>(R * k), "exchange local");
    std::vector<int32_t> own(layers.size() * static_cast<size_t>(E_), -1);
    for (size_t l = 0; l < layers.size(); ++l)
        for (int32_t e = 0; e < E_; ++e)
            if (layers[l].owner[static_cast<size_t>(e)] == rank_)
                own[l * static_cast<size_t>(E_) + static_cast<size_t>(e)] = layers[l].local[static_cast<size_t>(e)];
    owned = cuda::DeviceArray<int32_t>(own, "exchange owned");
    out = cuda::DeviceArray<float>(static_cast<size_t>(R * width()), "exchange out");
    home = cuda::DeviceArray<float>(static_cast<size_t>(T_max * width()), "exchange home");
}

void GatherScatterExchange::dispatch(int64_t layer, const uint16_t* x, const int32_t* ids, const float* wts, int64_t T,
                                     CUstream_st* stream) {
    begin_call(layer, T);
    if (T == 0) return;
    nccl_check(ncclGroupStart(), "ncclGroupStart");
    nccl_check(ncclAllGather(x, x_all.data(), static_cast<size_t>(T * D_) * 2, ncclUint8, nc(comm_), cs(stream)),
               "ncclAllGather x");
    nccl_check(ncclAllGather(ids, ids_all.data(), static_cast<size_t>(T * k_), ncclInt32, nc(comm_), cs(stream)),
               "ncclAllGather ids");
    nccl_check(ncclAllGather(wts, wts_all.data(), static_cast<size_t>(T * k_), ncclFloat32, nc(comm_), cs(stream)),
               "ncclAllGather weights");
    nccl_check(ncclGroupEnd(), "ncclGroupEnd (all-gather)");
    const int64_t n = rows() * k_;
    map_local_kernel<<<blocks_for(n), kThreads, 0, cs(stream)>>>(ids_all.data(), owned.data() + layer * E_, n,
                                                                 static_cast<int32_t>(E_), per_rank_, local.data());
    CUDA_CHECK(cudaGetLastError());
}

void GatherScatterExchange::give_back(const float* expert_rows, const int32_t* inv, bool official, CUstream_st* stream) {
    if (T_ == 0) return;
    const int64_t n = rows() * D_;
    place_kernel<<<blocks_for(n), kThreads, 0, cs(stream)>>>(expert_rows, inv, local.data(), rows(),
                                                             static_cast<int32_t>(k_), D_, per_rank_,
                                                             combine_ == Combine::slot_rows, official, out.data());
    CUDA_CHECK(cudaGetLastError());
    give_back_placed(stream);
}

void GatherScatterExchange::give_back_placed(CUstream_st* stream) {
    if (T_ == 0) return;
    nccl_check(ncclReduceScatter(out.data(), home.data(), static_cast<size_t>(T_ * width()), ncclFloat32, ncclSum,
                                 nc(comm_), cs(stream)),
               "ncclReduceScatter");
}

void GatherScatterExchange::combine(const float* shared, const int32_t* ids, float* y, bool official,
                                    CUstream_st* stream) {
    if (T_ == 0) return;
    const int64_t n = T_ * D_;
    combine_gs_kernel<<<blocks_for(n), kThreads, 0, cs(stream)>>>(home.data(), ids, shared, T_,
                                                                  static_cast<int32_t>(k_), D_,
                                                                  combine_ == Combine::slot_rows, official, y);
    CUDA_CHECK(cudaGetLastError());
}

// ---- all-to-all

AllToAllExchange::AllToAllExchange(const Communicator& comm, const std::vector<ExpertPartition>& layers, int64_t cap,
                                   int64_t k, int64_t D)
    : PartitionedExchange(comm, layers, k, D), cap_(cap) {
    if (cap < 1) throw Error("MoE exchange: the per-peer capacity must be at least 1, got " + std::to_string(cap));
    const size_t N = static_cast<size_t>(world_), C = static_cast<size_t>(cap), K = static_cast<size_t>(k),
                 Dz = static_cast<size_t>(D);
    std::vector<int32_t> own, loc;
    for (const ExpertPartition& p : layers) {
        own.insert(own.end(), p.owner.begin(), p.owner.end());
        loc.insert(loc.end(), p.local.begin(), p.local.end());
    }
    owner = cuda::DeviceArray<int32_t>(own, "exchange owner");
    local_of = cuda::DeviceArray<int32_t>(loc, "exchange local_of");
    send_x = cuda::DeviceArray<uint16_t>(N * C * Dz, "exchange send_x");
    send_local = cuda::DeviceArray<int32_t>(N * C * K, "exchange send_local");
    send_wts = cuda::DeviceArray<float>(N * C * K, "exchange send_wts");
    send_token = cuda::DeviceArray<int32_t>(N * C, "exchange send_token");
    send_count = cuda::DeviceArray<int32_t>(N, "exchange send_count");
    row_of = cuda::DeviceArray<int32_t>(C * N, "exchange row_of");
    recv_x = cuda::DeviceArray<uint16_t>(N * C * Dz, "exchange recv_x");
    recv_meta = cuda::DeviceArray<int32_t>(N * C * K, "exchange recv_meta");
    recv_wts = cuda::DeviceArray<float>(N * C * K, "exchange recv_wts");
    recv_count = cuda::DeviceArray<int32_t>(N, "exchange recv_count");
    recv_local = cuda::DeviceArray<int32_t>(N * C * K, "exchange recv_local");
    ret = cuda::DeviceArray<float>(N * C * Dz, "exchange ret");
    back = cuda::DeviceArray<float>(N * C * Dz, "exchange back");
}

void AllToAllExchange::dispatch(int64_t layer, const uint16_t* x, const int32_t* ids, const float* wts, int64_t T,
                                CUstream_st* stream) {
    begin_call(layer, T);
    if (T == 0) return;
    pack_meta_kernel<<<world_, kThreads, 0, cs(stream)>>>(ids, wts, owner.data() + layer * E_, local_of.data() + layer * E_,
                                                          T, static_cast<int32_t>(k_), static_cast<int32_t>(E_), T,
                                                          world_, send_token.data(), send_local.data(), send_wts.data(),
                                                          send_count.data(), row_of.data());
    CUDA_CHECK(cudaGetLastError());
    const int64_t rows = world_ * T;
    pack_rows_kernel<<<blocks_for(rows * D_), kThreads, 0, cs(stream)>>>(x, send_token.data(), rows, D_, send_x.data());
    CUDA_CHECK(cudaGetLastError());
    const size_t xb = static_cast<size_t>(T * D_) * 2, mb = static_cast<size_t>(T * k_);
    nccl_check(ncclGroupStart(), "ncclGroupStart");
    for (int32_t q = 0; q < world_; ++q) {
        const size_t ox = static_cast<size_t>(q) * static_cast<size_t>(T * D_), om = static_cast<size_t>(q) * mb;
        nccl_check(ncclSend(send_count.data() + q, 1, ncclInt32, q, nc(comm_), cs(stream)), "ncclSend count");
        nccl_check(ncclRecv(recv_count.data() + q, 1, ncclInt32, q, nc(comm_), cs(stream)), "ncclRecv count");
        nccl_check(ncclSend(send_x.data() + ox, xb, ncclUint8, q, nc(comm_), cs(stream)), "ncclSend x");
        nccl_check(ncclRecv(recv_x.data() + ox, xb, ncclUint8, q, nc(comm_), cs(stream)), "ncclRecv x");
        nccl_check(ncclSend(send_local.data() + om, mb, ncclInt32, q, nc(comm_), cs(stream)), "ncclSend slots");
        nccl_check(ncclRecv(recv_meta.data() + om, mb, ncclInt32, q, nc(comm_), cs(stream)), "ncclRecv slots");
        nccl_check(ncclSend(send_wts.data() + om, mb, ncclFloat32, q, nc(comm_), cs(stream)), "ncclSend weights");
        nccl_check(ncclRecv(recv_wts.data() + om, mb, ncclFloat32, q, nc(comm_), cs(stream)), "ncclRecv weights");
    }
    nccl_check(ncclGroupEnd(), "ncclGroupEnd (dispatch)");
    const int64_t n = rows * k_;
    mask_received_kernel<<<blocks_for(n), kThreads, 0, cs(stream)>>>(recv_meta.data(), recv_count.data(), T,
                                                                     static_cast<int32_t>(k_), world_, per_rank_,
                                                                     recv_local.data());
    CUDA_CHECK(cudaGetLastError());
}

void AllToAllExchange::give_back(const float* rows, const int32_t* inv, bool official, CUstream_st* stream) {
    if (T_ == 0) return;
    const int64_t R = this->rows();
    place_kernel<<<blocks_for(R * D_), kThreads, 0, cs(stream)>>>(rows, inv, recv_local.data(), R,
                                                                  static_cast<int32_t>(k_), D_, per_rank_, false,
                                                                  official, ret.data());
    CUDA_CHECK(cudaGetLastError());
    give_back_placed(stream);
}

void AllToAllExchange::give_back_placed(CUstream_st* stream) {
    if (T_ == 0) return;
    const size_t n = static_cast<size_t>(T_ * D_);
    nccl_check(ncclGroupStart(), "ncclGroupStart");
    for (int32_t q = 0; q < world_; ++q) {
        nccl_check(ncclSend(ret.data() + q * n, n, ncclFloat32, q, nc(comm_), cs(stream)), "ncclSend partial sums");
        nccl_check(ncclRecv(back.data() + q * n, n, ncclFloat32, q, nc(comm_), cs(stream)), "ncclRecv partial sums");
    }
    nccl_check(ncclGroupEnd(), "ncclGroupEnd (combine)");
}

void AllToAllExchange::combine(const float* shared, const int32_t* /*ids*/, float* y, bool official,
                               CUstream_st* stream) {
    if (T_ == 0) return;
    combine_a2a_kernel<<<blocks_for(T_ * D_), kThreads, 0, cs(stream)>>>(back.data(), row_of.data(), shared, T_, world_,
                                                                         T_, D_, official, y);
    CUDA_CHECK(cudaGetLastError());
}

// ---- the head's vocabulary exchange

VocabExchange::VocabExchange(const Communicator& comm, const VocabSplit& split, int64_t R_max, int64_t D)
    : comm_(comm.get()), world_(comm.world()), rank_(comm.rank()), R_max_(R_max), D_(D), split_(split) {
    if (!comm.get()) throw Error("vocabulary exchange: the communicator is empty");
    if (split.world != comm.world() || split.begin.size() != static_cast<size_t>(split.world) + 1)
        throw Error("vocabulary exchange: the vocabulary split is for " + std::to_string(split.world) +
                    " GPUs, the NCCL world has " + std::to_string(comm.world()));
    for (int32_t q = 0; q < world_; ++q)
        if (split.rows(q) < 1)
            throw Error("vocabulary exchange: GPU " + std::to_string(q) + " would hold no head row (vocab_size " +
                        std::to_string(split.vocab) + " over " + std::to_string(world_) + " GPUs)");
    if (R_max < 1 || D < 1)
        throw Error("vocabulary exchange: rows per call (" + std::to_string(R_max) + ") and hidden_size (" +
                    std::to_string(D) + ") must be positive");
    const int64_t Vs = split.rows(rank_);
    hidden_all_ = cuda::DeviceArray<uint16_t>(static_cast<size_t>(world_ * R_max * D), "vocabulary exchange hidden");
    slices_ = cuda::DeviceArray<float>(static_cast<size_t>(world_ * R_max * Vs), "vocabulary exchange slices");
    recv_ = cuda::DeviceArray<float>(static_cast<size_t>(R_max * split.vocab), "vocabulary exchange received");
    begin_ = cuda::DeviceArray<int64_t>(split.begin, "vocabulary exchange columns");
}

void VocabExchange::gather(const uint16_t* hidden, int64_t R, CUstream_st* stream) {
    if (R < 0 || R > R_max_)
        throw Error("vocabulary exchange: " + std::to_string(R) + " rows in one call, it holds " + std::to_string(R_max_));
    R_ = R;
    if (R == 0) return;
    nccl_check(ncclAllGather(hidden, hidden_all_.data(), static_cast<size_t>(R * D_) * 2, ncclUint8, nc(comm_), cs(stream)),
               "ncclAllGather hidden rows");
}

void VocabExchange::scatter(float* logits, CUstream_st* stream) {
    if (R_ == 0) return;
    const int64_t Vs = split_.rows(rank_);
    nccl_check(ncclGroupStart(), "ncclGroupStart");
    for (int32_t q = 0; q < world_; ++q) {
        // To q: this rank's slice of q's rows; from q: q's slice of this rank's rows.
        nccl_check(ncclSend(slices_.data() + static_cast<int64_t>(q) * R_ * Vs, static_cast<size_t>(R_ * Vs), ncclFloat32,
                            q, nc(comm_), cs(stream)),
                   "ncclSend logits slice");
        nccl_check(ncclRecv(recv_.data() + R_ * split_.begin[static_cast<size_t>(q)],
                            static_cast<size_t>(R_ * split_.rows(q)), ncclFloat32, q, nc(comm_), cs(stream)),
                   "ncclRecv logits slice");
    }
    nccl_check(ncclGroupEnd(), "ncclGroupEnd (logits)");
    const int64_t n = R_ * split_.vocab;
    assemble_logits_kernel<<<blocks_for(n), kThreads, 0, cs(stream)>>>(recv_.data(), begin_.data(), world_, R_,
                                                                       split_.vocab, logits);
    CUDA_CHECK(cudaGetLastError());
}

}  // namespace megamoe::dist
