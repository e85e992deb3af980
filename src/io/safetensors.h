// safetensors.h — memory-mapped, strictly validated safetensors shards and checkpoint folders.
//
// A shard is `u64 header_len | JSON header | data`. Validation (every failure throws
// megamoe::Error naming the file and, where there is one, the tensor):
//   - the file holds at least 8 bytes; header_len <= kMaxHeaderBytes and 8 + header_len <= file size;
//   - the header is a JSON object; `__metadata__` (optional) maps strings to strings;
//   - each tensor has exactly `dtype` (one of F32 BF16 F16 I64 I32 I8 U8 F8_E4M3 F8_E8M0),
//     `shape` (<= 4 non-negative integers), `data_offsets` [begin, end] with begin <= end <= data size;
//   - numel × dtype size == end - begin, computed without overflow;
//   - no two tensors' byte ranges overlap.
// A Checkpoint is a folder: `model.safetensors.index.json` (weight_map name -> shard file) when
// present, else every *.safetensors file in it. A name in the index must exist in its shard, and
// a tensor name may appear in only one shard.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/tensor.h"

namespace megamoe {

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // 100 MiB, the limit the Rust reference uses

struct TensorInfo {
    std::string name;
    DType       dtype = DType::f32;
    int         ndim  = 0;
    std::array<int64_t, kMaxDims> shape{};
    uint64_t    begin = 0, end = 0;               // byte offsets inside the data section
};

// Parse and validate a header (the JSON text only) for a data section of `data_size` bytes.
// `file` names the source in error messages. Exposed for the fuzz target and tests.
std::vector<TensorInfo> parse_safetensors_header(std::string_view json, uint64_t data_size,
                                                 const std::string& file);

class SafetensorsFile {
public:
    explicit SafetensorsFile(const std::string& path);   // mmap + validate; throws Error
    ~SafetensorsFile();
    SafetensorsFile(const SafetensorsFile&) = delete;
    SafetensorsFile& operator=(const SafetensorsFile&) = delete;

    const std::string&             path() const { return path_; }
    const std::vector<TensorInfo>& tensors() const { return tensors_; }
    const TensorInfo*              find(std::string_view name) const;   // nullptr if absent
    Tensor                         view(const TensorInfo& t) const;     // points into the mapping

private:
    std::string             path_;
    void*                   map_ = nullptr;
    size_t                  map_size_ = 0;
    const uint8_t*          data_ = nullptr;      // start of the data section
    std::vector<TensorInfo> tensors_;
    std::map<std::string, size_t, std::less<>> by_name_;
};

class Checkpoint {
public:
    explicit Checkpoint(const std::string& dir);          // throws Error
    const std::string& dir() const { return dir_; }

    struct Entry {
        const SafetensorsFile* file;
        const TensorInfo*      info;
    };
    const Entry* find(std::string_view name) const;       // nullptr if absent
    Tensor       view(const Entry& e) const { return e.file->view(*e.info); }
    std::vector<std::string> names() const;                // sorted
    size_t       size() const { return entries_.size(); }

private:
    std::string dir_;
    std::vector<std::unique_ptr<SafetensorsFile>> files_;
    std::map<std::string, Entry, std::less<>> entries_;
};

// ---- writer (for `megamoe logits --out` and `megamoe synth`)
struct TensorToWrite {
    std::string name;
    DType       dtype;
    std::vector<int64_t> shape;
    const void* data;                              // numel × dtype size bytes
};
// Writes one shard; tensors are laid out in the given order, header padded to 8 bytes.
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace megamoe
