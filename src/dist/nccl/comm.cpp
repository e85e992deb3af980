// comm.cpp — NCCL communicator lifetime (see comm.h).
#include "dist/nccl/comm.h"

#include <cstring>
#include <string>

#include <cuda_runtime.h>
#include <nccl.h>

#include "core/common.h"

namespace megamoe::dist {

static_assert(sizeof(ncclUniqueId) == sizeof(NcclId), "NcclId must hold ncclUniqueId");

void nccl_check(int result, const char* what) {
    const auto r = static_cast<ncclResult_t>(result);
    if (r != ncclSuccess) throw Error(std::string("NCCL: ") + what + ": " + ncclGetErrorString(r));
}

static void cuda_check(cudaError_t e, const char* what, int device) {
    if (e != cudaSuccess)
        throw Error(std::string("NCCL setup: ") + what + " on GPU " + std::to_string(device) + ": " + cudaGetErrorString(e));
}

std::vector<Communicator> Communicator::create_local(const std::vector<int>& devices) {
    if (devices.empty()) throw Error("NCCL setup: no GPUs given (--gpus must be at least 1)");
    int count = 0;
    cuda_check(cudaGetDeviceCount(&count), "cudaGetDeviceCount", -1);
    for (int d : devices)
        if (d < 0 || d >= count)
            throw Error("NCCL setup: GPU " + std::to_string(d) + " requested, " + std::to_string(count) + " present");
    ncclUniqueId id;
    nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    const int n = static_cast<int>(devices.size());
    std::vector<Communicator> comms(devices.size());
    nccl_check(ncclGroupStart(), "ncclGroupStart");
    for (int i = 0; i < n; ++i) {
        cuda_check(cudaSetDevice(devices[static_cast<size_t>(i)]), "cudaSetDevice", devices[static_cast<size_t>(i)]);
        Communicator& c = comms[static_cast<size_t>(i)];
        c.rank_ = i;
        c.world_ = n;
        c.device_ = devices[static_cast<size_t>(i)];
        ncclComm_t comm = nullptr;
        const ncclResult_t r = ncclCommInitRank(&comm, n, id, i);
        if (r != ncclSuccess) {
            ncclGroupEnd();
            nccl_check(r, ("ncclCommInitRank on GPU " + std::to_string(c.device_)).c_str());
        }
        c.comm_ = comm;
    }
    nccl_check(ncclGroupEnd(), "ncclGroupEnd (creating the communicators)");
    return comms;
}

NcclId Communicator::make_id() {
    ncclUniqueId id;
    nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    NcclId out;
    std::memcpy(out.data(), &id, sizeof(id));
    return out;
}

Communicator::Communicator(const NcclId& id, int world, int rank, int device) : rank_(rank), world_(world), device_(device) {
    if (world < 1 || rank < 0 || rank >= world)
        throw Error("NCCL setup: rank " + std::to_string(rank) + " outside a world of " + std::to_string(world));
    cuda_check(cudaSetDevice(device), "cudaSetDevice", device);
    ncclUniqueId u;
    std::memcpy(&u, id.data(), sizeof(u));
    ncclComm_t comm = nullptr;
    nccl_check(ncclCommInitRank(&comm, world, u, rank), "ncclCommInitRank");
    comm_ = comm;
}

Communicator::~Communicator() {
    if (comm_) ncclCommDestroy(comm_);
}

Communicator::Communicator(Communicator&& o) noexcept
    : comm_(o.comm_), rank_(o.rank_), world_(o.world_), device_(o.device_) {
    o.comm_ = nullptr;
}

Communicator& Communicator::operator=(Communicator&& o) noexcept {
    if (this != &o) {
        if (comm_) ncclCommDestroy(comm_);
        comm_ = o.comm_;
        rank_ = o.rank_;
        world_ = o.world_;
        device_ = o.device_;
        o.comm_ = nullptr;
    }
    return *this;
}

void Communicator::check() const {
    if (!comm_) throw Error("NCCL: communicator used after it was moved from");
    ncclResult_t async = ncclSuccess;
    nccl_check(ncclCommGetAsyncError(comm_, &async), "ncclCommGetAsyncError");
    nccl_check(async, ("asynchronous error on rank " + std::to_string(rank_)).c_str());
}

}  // namespace megamoe::dist
