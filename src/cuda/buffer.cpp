// buffer.cpp — DeviceBuffer and DeviceArena (see buffer.h).
#include "cuda/buffer.h"

#include <cuda_runtime_api.h>

#include <utility>

#include "core/common.h"

namespace megamoe::cuda {

DeviceBuffer::DeviceBuffer(size_t bytes, const char* what) {
    const cudaError_t e = cudaMalloc(&p_, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        p_ = nullptr;
        size_t free_b = 0, total_b = 0;
        (void)cudaMemGetInfo(&free_b, &total_b);
        (void)cudaGetLastError();
        fail(what, ": cannot allocate ", bytes, " bytes on the GPU (", free_b >> 20, " MiB free of ", total_b >> 20,
             " MiB): ", cudaGetErrorString(e));
    }
    n_ = bytes;
}

DeviceBuffer::~DeviceBuffer() { reset(); }

DeviceBuffer::DeviceBuffer(DeviceBuffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
        reset();
        p_ = std::exchange(o.p_, nullptr);
        n_ = std::exchange(o.n_, 0);
    }
    return *this;
}

void DeviceBuffer::reset() noexcept {
    if (p_) (void)cudaFree(p_);   // errors ignored: this runs on error paths and in destructors
    p_ = nullptr;
    n_ = 0;
}

void DeviceBuffer::upload(const void* src, size_t bytes, size_t off) {
    MEGAMOE_CHECK(off + bytes <= n_, "DeviceBuffer::upload of ", bytes, " bytes at ", off, " into ", n_);
    if (bytes == 0) return;
    const cudaError_t e = cudaMemcpy(static_cast<char*>(p_) + off, src, bytes, cudaMemcpyHostToDevice);
    if (e != cudaSuccess) fail("DeviceBuffer::upload: ", cudaGetErrorString(e));
    // From pageable memory, cudaMemcpy may return before the DMA into the buffer is done; work on
    // another (non-blocking) stream could then read old bytes. Synchronous means done.
    const cudaError_t s = cudaDeviceSynchronize();
    if (s != cudaSuccess) fail("DeviceBuffer::upload: ", cudaGetErrorString(s));
}

void DeviceBuffer::download(void* dst, size_t bytes, size_t off) const {
    MEGAMOE_CHECK(off + bytes <= n_, "DeviceBuffer::download of ", bytes, " bytes at ", off, " from ", n_);
    if (bytes == 0) return;
    const cudaError_t e = cudaMemcpy(dst, static_cast<const char*>(p_) + off, bytes, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) fail("DeviceBuffer::download: ", cudaGetErrorString(e));
}

void DeviceBuffer::fill(int byte_value) {
    if (!p_) return;
    const cudaError_t e = cudaMemset(p_, byte_value, n_ ? n_ : 1);
    if (e != cudaSuccess) fail("DeviceBuffer::fill: ", cudaGetErrorString(e));
}

void* DeviceArena::take(size_t bytes) {
    const size_t at = used_;
    used_ += round_up(bytes);
    if (counting()) return nullptr;
    MEGAMOE_CHECK(used_ <= cap_, "DeviceArena: ", used_, " bytes taken from an arena of ", cap_);
    return static_cast<char*>(buf_.get()) + at;
}

}  // namespace megamoe::cuda
