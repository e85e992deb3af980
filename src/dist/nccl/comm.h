// comm.h — NCCL communicators for expert parallelism. Built only when CUDA and NCCL are found
// (CMake: MEGAMOE_HAVE_NCCL); the header itself needs neither (ncclComm is declared opaque).
//
// One thread per GPU, one process per node (the choice, and why):
//  - The checkpoint is mapped and bound once (Model), the config, tokenizer, scheduler and server
//    exist once; each GPU's thread uploads only its own tensors from the shared mapping, in
//    parallel. With a process per GPU every process would parse and bind the index, and the engine
//    (serve/engine) would need an IPC protocol to hand each step's batch to N processes.
//  - A step is the same host work for every rank (the batch, the block tables); one thread builds
//    it once and N GPU threads launch (or replay their CUDA graph) on their own streams; the
//    results come back to one place for sampling and streaming. No serialization.
//  - NCCL supports it directly: N ranks in one process (ncclCommInitRank under ncclGroupStart /
//    ncclGroupEnd, i.e. ncclCommInitAll), each rank's collectives issued from its own thread on its
//    own stream, and NCCL calls are capturable into that thread's CUDA graph.
//  - Two nodes are two processes of N threads each: the same code with a ncclUniqueId made on
//    node 0 and handed to node 1 out of band (Communicator's second constructor); only that
//    bootstrap differs. A process per GPU would also need it, for every rank instead of every node.
//  - What it costs: a fault in one GPU's thread takes the whole process down (it would end the
//    job in either design, since every step needs every rank), and the host threads must not
//    share a CUDA stream or a non-thread-safe object (each rank owns its runner).
#pragma once

#include <array>
#include <cstdint>
#include <vector>

struct ncclComm;   // ncclComm_t is ncclComm*

namespace megamoe::dist {

using NcclId = std::array<char, 128>;   // ncclUniqueId's bytes (NCCL_UNIQUE_ID_BYTES)

class Communicator {
public:
    // All ranks of a single-process world, rank i on GPU devices[i] (ncclCommInitAll's equivalent).
    // Throws Error naming the device and NCCL's message when NCCL cannot form the world.
    static std::vector<Communicator> create_local(const std::vector<int>& devices);
    // A fresh id (rank 0 makes it; every other rank of the world receives the same bytes).
    static NcclId make_id();
    // One rank of a world spread over processes (nodes): every rank calls this with the same id
    // and world, concurrently (NCCL blocks until all ranks have joined).
    Communicator(const NcclId& id, int world, int rank, int device);

    Communicator() = default;
    ~Communicator();
    Communicator(Communicator&& o) noexcept;
    Communicator& operator=(Communicator&& o) noexcept;
    Communicator(const Communicator&) = delete;
    Communicator& operator=(const Communicator&) = delete;

    int rank() const { return rank_; }
    int world() const { return world_; }
    int device() const { return device_; }
    ncclComm* get() const { return comm_; }
    // Throws Error when NCCL reports an asynchronous error on this communicator (a peer died, a
    // network error). Call after a step's wait, outside graph capture.
    void check() const;

private:
    ncclComm* comm_ = nullptr;
    int rank_ = 0, world_ = 0, device_ = -1;
};

// Throws Error "NCCL: <what>: <NCCL's message>" unless result is ncclSuccess (an ncclResult_t).
void nccl_check(int result, const char* what);

}  // namespace megamoe::dist
