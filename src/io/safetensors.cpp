// safetensors.cpp — owns the safetensors header parser/validator, the mmap-backed shard reader,
// checkpoint-folder loading (with or without model.safetensors.index.json) and the writer.
//
// Every check here guards against a malformed or hostile file: the parser is fuzzed, so no input
// may read out of bounds, overflow, or fail with anything but megamoe::Error.
#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <tuple>

#include <nlohmann/json.hpp>

namespace megamoe {

namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

// Error messages quote offending JSON values; keep a hostile 100 MiB value out of them.
std::string brief(const json& v) {
    std::string s = v.dump();
    return s.size() <= 80 ? s : s.substr(0, 77) + "...";
}

template <typename... Args>
[[noreturn]] void tensor_fail(const std::string& file, const std::string& name, const Args&... args) {
    fail(file, ": tensor '", name, "': ", args...);
}

// nlohmann::json silently keeps the last of duplicate keys, so watch every key through the parser
// callback and reject repeats. `top_key` names what a key of the root object is ("tensor name").
json parse_json_strict(std::string_view text, const std::string& file, const char* top_key) {
    std::vector<std::set<std::string>> open;  // keys seen in each open object, innermost last
    std::string top;                          // the root key whose value is being parsed
    auto cb = [&](int, json::parse_event_t ev, json& parsed) {
        if (ev == json::parse_event_t::object_start) {
            open.emplace_back();
        } else if (ev == json::parse_event_t::object_end) {
            open.pop_back();
        } else if (ev == json::parse_event_t::key) {
            const auto& k = parsed.get_ref<const std::string&>();
            if (!open.back().insert(k).second) {
                if (open.size() == 1) fail(file, ": duplicate ", top_key, " '", k, "'");
                fail(file, ": ", top_key, " '", top, "': duplicate key '", k, "'");
            }
            if (open.size() == 1) top = k;
        }
        return true;
    };
    // nlohmann's lexer takes a NUL as end of input, which would let "{}\0<junk>" through; a raw
    // NUL is never valid JSON, so reject it up front.
    if (size_t nul = text.find('\0'); nul != std::string_view::npos)
        fail(file, ": invalid JSON: NUL byte at offset ", nul);
    try {
        return json::parse(text.begin(), text.end(), cb);
    } catch (const json::exception& e) {
        fail(file, ": invalid JSON: ", e.what());
    }
}

// A non-negative JSON integer ("-0" included); anything else (float, huge, string) is rejected.
bool get_uint(const json& v, uint64_t* out) {
    if (v.is_number_unsigned()) {
        *out = v.get<uint64_t>();
        return true;
    }
    if (v.is_number_integer() && v.get<int64_t>() >= 0) {
        *out = static_cast<uint64_t>(v.get<int64_t>());
        return true;
    }
    return false;
}

std::string shape_text(const TensorInfo& t) {
    std::string s = "[";
    for (int i = 0; i < t.ndim; ++i) {
        if (i) s += ", ";
        s += std::to_string(t.shape[size_t(i)]);
    }
    return s + "]";
}

TensorInfo parse_entry(const std::string& name, const json& e, uint64_t data_size,
                       const std::string& file) {
    if (!e.is_object()) tensor_fail(file, name, "entry must be a JSON object, got ", e.type_name());
    for (const auto& [k, v] : e.items()) {
        if (k != "dtype" && k != "shape" && k != "data_offsets")
            tensor_fail(file, name, "unexpected field '", k, "'");
    }
    for (const char* k : {"dtype", "shape", "data_offsets"}) {
        if (!e.contains(k)) tensor_fail(file, name, "missing field '", k, "'");
    }
    TensorInfo t;
    t.name = name;

    const json& dt = e.at("dtype");
    if (!dt.is_string()) tensor_fail(file, name, "dtype must be a string, got ", brief(dt));
    if (!dtype_from_name(dt.get_ref<const std::string&>(), &t.dtype))
        tensor_fail(file, name, "unknown dtype '", dt.get_ref<const std::string&>(), "'");

    const json& sh = e.at("shape");
    if (!sh.is_array()) tensor_fail(file, name, "shape must be an array, got ", brief(sh));
    if (sh.size() > size_t(kMaxDims))
        tensor_fail(file, name, "shape ", brief(sh), " has ", sh.size(), " dims, at most ", kMaxDims);
    t.ndim = int(sh.size());
    uint64_t numel = 1;
    bool overflow = false;
    for (size_t i = 0; i < sh.size(); ++i) {
        uint64_t d = 0;
        if (!get_uint(sh[i], &d) || d > uint64_t(std::numeric_limits<int64_t>::max()))
            tensor_fail(file, name, "shape ", brief(sh), " must hold non-negative integers");
        t.shape[i] = int64_t(d);
        // Checked per step (not just at the end) so Tensor::numel() can never overflow either.
        overflow |= __builtin_mul_overflow(numel, d, &numel);
    }

    const json& off = e.at("data_offsets");
    if (!off.is_array() || off.size() != 2 || !get_uint(off[0], &t.begin) || !get_uint(off[1], &t.end))
        tensor_fail(file, name, "data_offsets ", brief(off), " must be two non-negative integers");
    if (t.begin > t.end)
        tensor_fail(file, name, "data_offsets [", t.begin, ", ", t.end, "] are reversed");
    if (t.end > data_size)
        tensor_fail(file, name, "data_offsets [", t.begin, ", ", t.end, "] run past the end of the ",
                    data_size, "-byte data section (truncated file?)");

    uint64_t bytes = 0;
    overflow = overflow || __builtin_mul_overflow(numel, uint64_t(dtype_size(t.dtype)), &bytes);
    if (overflow)
        tensor_fail(file, name, "shape ", shape_text(t), " x ", dtype_name(t.dtype), " overflows 64 bits");
    if (bytes != t.end - t.begin)
        tensor_fail(file, name, "shape ", shape_text(t), " x ", dtype_name(t.dtype), " is ", bytes,
                    " bytes but data_offsets [", t.begin, ", ", t.end, "] span ", t.end - t.begin);
    return t;
}

}  // namespace

// Tensors come back in data order (by begin offset), which is also the order the writer used.
std::vector<TensorInfo> parse_safetensors_header(std::string_view text, uint64_t data_size,
                                                 const std::string& file) {
    json root = parse_json_strict(text, file, "tensor name");
    if (!root.is_object()) fail(file, ": header must be a JSON object, got ", root.type_name());
    std::vector<TensorInfo> out;
    out.reserve(root.size());
    for (const auto& [name, entry] : root.items()) {
        if (name == "__metadata__") {
            if (!entry.is_object()) fail(file, ": __metadata__ must be an object, got ", entry.type_name());
            for (const auto& [k, v] : entry.items()) {
                if (!v.is_string())
                    fail(file, ": __metadata__ '", k, "' must be a string, got ", v.type_name());
            }
            continue;
        }
        out.push_back(parse_entry(name, entry, data_size, file));
    }

    // Sorted by begin, a range overlaps some earlier one iff it starts before the previous
    // non-empty range ends (earlier ones are already known disjoint). Empty ranges hold no bytes.
    std::sort(out.begin(), out.end(), [](const TensorInfo& a, const TensorInfo& b) {
        return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
    });
    const TensorInfo* prev = nullptr;
    for (const TensorInfo& t : out) {
        if (t.begin == t.end) continue;
        if (prev && t.begin < prev->end)
            tensor_fail(file, t.name, "data_offsets [", t.begin, ", ", t.end, "] overlap tensor '",
                        prev->name, "' [", prev->begin, ", ", prev->end, "]");
        prev = &t;
    }
    return out;
}

// ---- SafetensorsFile

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(path, ": cannot open: ", std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd);
        fail(path, ": not a readable regular file");
    }
    const uint64_t size = uint64_t(st.st_size);
    if (size < 8) {
        ::close(fd);
        fail(path, ": file is ", size, " bytes, too short for the 8-byte header length");
    }
    void* m = ::mmap(nullptr, size_t(size), PROT_READ, MAP_PRIVATE, fd, 0);
    const int err = errno;
    ::close(fd);  // the mapping keeps the file alive
    if (m == MAP_FAILED) fail(path, ": mmap failed: ", std::strerror(err));
    map_ = m;
    map_size_ = size_t(size);

    try {
        const auto* bytes = static_cast<const uint8_t*>(map_);
        uint64_t header_len = 0;  // little-endian on disk, whatever the host
        for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
        if (header_len > kMaxHeaderBytes)
            fail(path, ": header length ", header_len, " exceeds the ", kMaxHeaderBytes, "-byte limit");
        if (header_len > size - 8)  // size >= 8, so this cannot wrap
            fail(path, ": header length ", header_len, " runs past the end of the ", size, "-byte file");
        data_ = bytes + 8 + header_len;
        tensors_ = parse_safetensors_header(
            std::string_view(reinterpret_cast<const char*>(bytes + 8), size_t(header_len)),
            size - 8 - header_len, path);
        for (size_t i = 0; i < tensors_.size(); ++i) by_name_.emplace(tensors_[i].name, i);
    } catch (...) {
        ::munmap(map_, map_size_);  // the destructor does not run for a throwing constructor
        throw;
    }
}

SafetensorsFile::~SafetensorsFile() {
    if (map_) ::munmap(map_, map_size_);
}

const TensorInfo* SafetensorsFile::find(std::string_view name) const {
    auto it = by_name_.find(name);
    return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

Tensor SafetensorsFile::view(const TensorInfo& t) const {
    const size_t data_size = map_size_ - size_t(data_ - static_cast<const uint8_t*>(map_));
    MEGAMOE_CHECK(t.begin <= t.end && t.end <= data_size, path_, ": tensor '", t.name,
                  "' does not belong to this file");
    Tensor v;
    // The mapping is PROT_READ: callers must treat the view as read-only (a write faults).
    v.data = const_cast<uint8_t*>(data_ + t.begin);
    v.dtype = t.dtype;
    v.ndim = t.ndim;
    v.shape = t.shape;
    return v;
}

// ---- Checkpoint

Checkpoint::Checkpoint(const std::string& dir) : dir_(dir) {
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) fail(dir, ": checkpoint directory does not exist");
    const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";

    if (fs::exists(index_path, ec)) {
        const std::string index = index_path.string();
        std::ifstream in(index_path, std::ios::binary);
        std::stringstream ss;
        ss << in.rdbuf();
        if (!in) fail(index, ": cannot read");
        json root = parse_json_strict(ss.str(), index, "key");
        if (!root.is_object() || !root.contains("weight_map") || !root.at("weight_map").is_object())
            fail(index, ": must be a JSON object with an object \"weight_map\"");

        std::map<std::string, const SafetensorsFile*> shards;  // each distinct shard opened once
        for (const auto& [name, v] : root.at("weight_map").items()) {
            if (!v.is_string()) fail(index, ": tensor '", name, "': shard must be a string, got ", brief(v));
            const std::string& shard = v.get_ref<const std::string&>();
            // Plain file names only: the index must not reach outside the checkpoint folder.
            if (shard.empty() || shard == "." || shard == ".." ||
                shard.find_first_of(std::string_view("/\0", 2)) != std::string::npos)
                fail(index, ": tensor '", name, "': shard '", shard, "' is not a plain file name");
            auto it = shards.find(shard);
            if (it == shards.end()) {
                const fs::path p = fs::path(dir) / shard;
                if (!fs::exists(p, ec))
                    fail(index, ": tensor '", name, "': shard '", shard, "' does not exist");
                files_.push_back(std::make_unique<SafetensorsFile>(p.string()));
                it = shards.emplace(shard, files_.back().get()).first;
            }
            const TensorInfo* info = it->second->find(name);
            if (!info) fail(index, ": tensor '", name, "' is not in its shard '", shard, "'");
            entries_.emplace(name, Entry{it->second, info});
        }
        // Unlisted tensors are accepted, but a name must not live in two shards.
        for (const auto& f : files_) {
            for (const TensorInfo& t : f->tensors()) {
                auto [it, added] = entries_.emplace(t.name, Entry{f.get(), &t});
                if (!added && it->second.file != f.get())
                    fail(index, ": tensor '", t.name, "' is in shard ", f->path(),
                         " but the index maps it to ", it->second.file->path());
            }
        }
    } else {
        std::vector<fs::path> paths;
        for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
            std::error_code ec2;
            if (it->path().extension() == ".safetensors" && it->is_regular_file(ec2))
                paths.push_back(it->path());
        }
        if (ec) fail(dir, ": cannot list directory: ", ec.message());
        std::sort(paths.begin(), paths.end());
        for (const fs::path& p : paths) {
            files_.push_back(std::make_unique<SafetensorsFile>(p.string()));
            const SafetensorsFile* f = files_.back().get();
            for (const TensorInfo& t : f->tensors()) {
                auto [it, added] = entries_.emplace(t.name, Entry{f, &t});
                if (!added)
                    fail(dir, ": tensor '", t.name, "' appears in both ", it->second.file->path(),
                         " and ", f->path());
            }
        }
    }
    if (files_.empty()) fail(dir, ": no safetensors shards found");
}

const Checkpoint::Entry* Checkpoint::find(std::string_view name) const {
    auto it = entries_.find(name);
    return it == entries_.end() ? nullptr : &it->second;
}

std::vector<std::string> Checkpoint::names() const {
    std::vector<std::string> out;
    out.reserve(entries_.size());
    for (const auto& [name, e] : entries_) out.push_back(name);
    return out;
}

// ---- writer

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
    // The header is built by hand (not as a json object) to keep the caller's tensor order.
    std::string header = "{";
    std::set<std::string_view> names;
    std::vector<uint64_t> sizes;  // validated byte length of each tensor
    uint64_t offset = 0;
    try {
        if (!metadata.empty()) header += "\"__metadata__\":" + json(metadata).dump();
        for (const TensorToWrite& t : tensors) {
            if (t.name == "__metadata__" || !names.insert(t.name).second)
                fail(path, ": tensor '", t.name, "': duplicate or reserved tensor name");
            if (t.shape.size() > size_t(kMaxDims))
                fail(path, ": tensor '", t.name, "': ", t.shape.size(), " dims, at most ", kMaxDims);
            uint64_t bytes = dtype_size(t.dtype);
            std::string shape;
            for (int64_t d : t.shape) {
                if (d < 0 || __builtin_mul_overflow(bytes, uint64_t(d), &bytes))
                    fail(path, ": tensor '", t.name, "': bad or overflowing shape");
                if (!shape.empty()) shape += ',';
                shape += std::to_string(d);
            }
            if (bytes > 0 && !t.data) fail(path, ": tensor '", t.name, "': null data");
            uint64_t end = 0;
            if (__builtin_add_overflow(offset, bytes, &end)) fail(path, ": data exceeds 64 bits");
            if (header.size() > 1) header += ',';
            // Plain appends: GCC 12 at -O3 raises a false -Wrestrict on `"lit" + std::string`.
            header += json(t.name).dump();
            header += str(":{\"dtype\":\"", dtype_name(t.dtype), "\",\"shape\":[", shape,
                          "],\"data_offsets\":[", offset, ",", end, "]}");
            sizes.push_back(bytes);
            offset = end;
        }
    } catch (const json::exception& e) {  // e.g. a name or metadata that is not valid UTF-8
        fail(path, ": cannot encode header: ", e.what());
    }
    header += '}';
    while ((8 + header.size()) % 8 != 0) header += ' ';  // so the data section starts 8-aligned
    if (header.size() > kMaxHeaderBytes) fail(path, ": header exceeds ", kMaxHeaderBytes, " bytes");

    // Write beside the target and rename, so a failed write never leaves a truncated shard.
    const std::string tmp = path + ".tmp";
    std::FILE* f = std::fopen(tmp.c_str(), "wb");
    if (!f) fail(path, ": cannot create ", tmp, ": ", std::strerror(errno));
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(header.size()) >> (8 * i));
    bool ok = std::fwrite(len, 1, 8, f) == 8 &&
              std::fwrite(header.data(), 1, header.size(), f) == header.size();
    for (size_t i = 0; ok && i < tensors.size(); ++i)
        ok = sizes[i] == 0 || std::fwrite(tensors[i].data, 1, sizes[i], f) == sizes[i];
    int err = ok ? 0 : errno;
    if (std::fclose(f) != 0 && ok) {  // fclose flushes: a full disk may only show up here
        ok = false;
        err = errno;
    }
    if (ok && std::rename(tmp.c_str(), path.c_str()) != 0) {
        ok = false;
        err = errno;
    }
    if (!ok) {
        std::remove(tmp.c_str());
        fail(path, ": write failed: ", std::strerror(err));
    }
}

}  // namespace megamoe
