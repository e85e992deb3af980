// buffer.h — the one owner type of device memory, and an arena that carves many buffers out of
// one allocation. Host API; plain C++, compiles without the CUDA toolkit.
//
// Every device byte megamoe holds belongs to a DeviceBuffer: workspaces of the kernels, uploaded
// weights (through a DeviceArena), the runner's state pool and step inputs, the tests' inputs.
// A DeviceBuffer is move-only and frees in its destructor; pointers taken from it stay valid
// until it is destroyed or reset (a CUDA graph captured over them must not outlive it).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace megamoe::cuda {

class DeviceBuffer {
public:
    DeviceBuffer() = default;
    // cudaMalloc of max(bytes, 1) (so a zero-size buffer still has a distinct non-null address).
    // Throws megamoe::Error naming `what` and the size when the device has no room.
    explicit DeviceBuffer(size_t bytes, const char* what = "device buffer");
    ~DeviceBuffer();
    DeviceBuffer(DeviceBuffer&& o) noexcept;
    DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;

    void*  get() const { return p_; }
    size_t bytes() const { return n_; }
    bool   empty() const { return p_ == nullptr; }
    template <typename T> T* as() const { return static_cast<T*>(p_); }
    void   reset() noexcept;   // frees now

    // Synchronous copies (tests, uploads): `bytes` from / to host memory at byte offset `off`.
    void upload(const void* src, size_t bytes, size_t off = 0);
    void download(void* dst, size_t bytes, size_t off = 0) const;
    void fill(int byte_value);   // cudaMemset of the whole buffer

private:
    void*  p_ = nullptr;
    size_t n_ = 0;
};

// A typed DeviceBuffer of `count` T, for workspaces, tests and small owners. Move-only like the
// buffer it holds; the count is the buffer's, so a moved-from array is empty (size 0, null data).
template <typename T>
class DeviceArray {
public:
    DeviceArray() = default;
    explicit DeviceArray(size_t count, const char* what = "device array") : buf_(count * sizeof(T), what) {}
    explicit DeviceArray(const std::vector<T>& host, const char* what = "device array")
        : DeviceArray(host.size(), what) {
        buf_.upload(host.data(), host.size() * sizeof(T));
    }
    T*     data() const { return buf_.as<T>(); }
    size_t size() const { return buf_.bytes() / sizeof(T); }
    size_t bytes() const { return buf_.bytes(); }
    bool   empty() const { return buf_.empty(); }
    void   upload(const std::vector<T>& host) { buf_.upload(host.data(), std::min(host.size(), size()) * sizeof(T)); }
    std::vector<T> download() const {
        std::vector<T> h(size());
        buf_.download(h.data(), h.size() * sizeof(T));
        return h;
    }
    void fill(int byte_value) { buf_.fill(byte_value); }

private:
    DeviceBuffer buf_;   // [count] T
};

// Bump allocation inside one DeviceBuffer: many small buffers (a model's weights, a workspace's
// activations) in one cudaMalloc, each aligned to 256 bytes. Plan first with a counting arena
// (the default constructor: same calls, nothing allocated, no CUDA call at all, so planning runs
// on machines without a GPU too), allocate a real arena of the counted used() bytes, then carve
// in the same order: the same sequence of take() calls gives the same offsets in both. Nothing is
// freed alone. Move-only (a moved-from arena is a counting one).
class DeviceArena {
public:
    static constexpr size_t kAlign = 256;
    static size_t round_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

    // A counting arena: take() returns nullptr and only adds up the sizes.
    DeviceArena() = default;
    // A real arena of `bytes` (one allocation).
    explicit DeviceArena(size_t bytes, const char* what = "device arena") : buf_(bytes, what), cap_(bytes) {}

    bool   counting() const { return buf_.empty(); }
    size_t used() const { return used_; }
    size_t capacity() const { return cap_; }
    // `bytes` aligned to kAlign; throws when a real arena is out of room (a planning bug).
    void*  take(size_t bytes);
    template <typename T> T* take_n(size_t count) { return static_cast<T*>(take(count * sizeof(T))); }

private:
    DeviceBuffer buf_;
    size_t cap_ = 0, used_ = 0;
};

}  // namespace megamoe::cuda
