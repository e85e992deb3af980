// safetensors_test.cpp — tests for src/safetensors: writer/reader round trips, every malformed
// header the validator must reject (with the file and tensor named in the message), checkpoint
// folders with and without an index, and the golden tiny-flash-nvfp4 checkpoint.
#include "io/safetensors.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <sstream>

#include "test_util.h"

namespace fs = std::filesystem;
using namespace megamoe;

namespace {

using megamoe::test::expect_error;

// A fresh directory per test, removed afterwards.
class SafetensorsTest : public ::testing::Test {
protected:
    void SetUp() override {
        static std::atomic<int> counter{0};
        const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
        dir_ = fs::temp_directory_path() /
               ("megamoe_st_" + std::string(info->name()) + "_" + std::to_string(::getpid()) + "_" +
                std::to_string(counter++));
        fs::create_directories(dir_);
    }
    void TearDown() override {
        std::error_code ec;
        fs::remove_all(dir_, ec);
    }
    std::string path(const std::string& name) const { return (dir_ / name).string(); }

    // Writes `u64 header_len | header | data` with the header taken verbatim.
    std::string write_raw(const std::string& name, const std::string& header, size_t data_bytes,
                          uint64_t header_len = UINT64_MAX) const {
        if (header_len == UINT64_MAX) header_len = header.size();
        std::string bytes(8, '\0');
        for (int i = 0; i < 8; ++i) bytes[size_t(i)] = char(header_len >> (8 * i));
        bytes += header + std::string(data_bytes, '\x5a');
        return write_bytes(name, bytes);
    }
    std::string write_bytes(const std::string& name, const std::string& bytes) const {
        const std::string p = path(name);
        std::ofstream(p, std::ios::binary) << bytes;
        return p;
    }
    // A one-tensor header {"t.weight": {...}} with the given field texts.
    std::string write_one(const std::string& dtype, const std::string& shape,
                          const std::string& offsets, size_t data_bytes) const {
        return write_raw("bad.safetensors",
                         R"({"t.weight":{"dtype":)" + dtype + R"(,"shape":)" + shape +
                             R"(,"data_offsets":)" + offsets + "}}",
                         data_bytes);
    }
    // Expects opening `file` to fail naming the file and the extra substrings.
    void expect_bad(const std::string& file, std::initializer_list<std::string> substrs) const {
        expect_error([&] { SafetensorsFile f(file); }, {fs::path(file).filename().string()});
        expect_error([&] { SafetensorsFile f(file); }, substrs);
    }

    fs::path dir_;
};

using megamoe::test::read_file;

}  // namespace

// ---- round trip

TEST_F(SafetensorsTest, RoundTripEveryDType) {
    const DType all[] = {DType::f32, DType::bf16, DType::f16,  DType::i64, DType::i32,
                         DType::i8,  DType::u8,   DType::e4m3, DType::e8m0};
    std::vector<std::vector<uint8_t>> bufs;
    std::vector<TensorToWrite> in;
    for (DType t : all) {
        const std::vector<int64_t> shape = {3, 5};
        std::vector<uint8_t> b(15 * dtype_size(t));
        for (size_t i = 0; i < b.size(); ++i) b[i] = uint8_t(i * 7 + size_t(t));
        bufs.push_back(std::move(b));
        in.push_back({"w." + std::string(dtype_name(t)), t, shape, bufs.back().data()});
    }
    const float scalar = 3.5f;
    in.push_back({"scalar", DType::f32, {}, &scalar});
    in.push_back({"empty", DType::bf16, {0, 4}, nullptr});
    in.push_back({"four_d", DType::u8, {1, 2, 1, 3}, bufs.back().data()});

    const std::string p = path("rt.safetensors");
    write_safetensors(p, in);
    EXPECT_FALSE(fs::exists(p + ".tmp"));

    // The data section starts 8-aligned.
    const std::string raw = read_file(p);
    uint64_t header_len = 0;
    std::memcpy(&header_len, raw.data(), 8);
    EXPECT_EQ((8 + header_len) % 8, 0u);

    SafetensorsFile f(p);
    ASSERT_EQ(f.tensors().size(), in.size());
    // Tensors come back in data order, i.e. the order written.
    for (size_t i = 0; i < in.size(); ++i) EXPECT_EQ(f.tensors()[i].name, in[i].name);
    for (const TensorToWrite& w : in) {
        const TensorInfo* info = f.find(w.name);
        ASSERT_NE(info, nullptr) << w.name;
        EXPECT_EQ(info->dtype, w.dtype);
        ASSERT_EQ(info->ndim, int(w.shape.size()));
        for (size_t d = 0; d < w.shape.size(); ++d) EXPECT_EQ(info->shape[d], w.shape[d]);
        const Tensor v = f.view(*info);
        EXPECT_EQ(v.dtype, w.dtype);
        EXPECT_EQ(v.ndim, int(w.shape.size()));
        ASSERT_EQ(v.bytes(), info->end - info->begin);
        if (v.bytes()) {
            EXPECT_EQ(std::memcmp(v.data, w.data, v.bytes()), 0) << w.name;
        }
    }
    const Tensor s = f.view(*f.find("scalar"));
    EXPECT_EQ(s.ndim, 0);
    EXPECT_EQ(s.numel(), 1);
    EXPECT_EQ(*s.as<float>(), 3.5f);
    EXPECT_EQ(f.view(*f.find("empty")).numel(), 0);
    EXPECT_EQ(f.find("missing"), nullptr);
}

TEST_F(SafetensorsTest, Metadata) {
    const int32_t x[2] = {1, 2};
    const std::string p = path("meta.safetensors");
    write_safetensors(p, {{"x", DType::i32, {2}, x}}, {{"format", "pt"}, {"note", "hi \"there\""}});
    SafetensorsFile f(p);
    ASSERT_EQ(f.tensors().size(), 1u);
    const std::string raw = read_file(p);
    uint64_t n = 0;
    std::memcpy(&n, raw.data(), 8);
    const auto h = nlohmann::json::parse(raw.substr(8, n));
    EXPECT_EQ(h["__metadata__"]["format"], "pt");
    EXPECT_EQ(h["__metadata__"]["note"], "hi \"there\"");

    // Without metadata, no __metadata__ key at all.
    write_safetensors(p, {{"x", DType::i32, {2}, x}});
    const std::string raw2 = read_file(p);
    std::memcpy(&n, raw2.data(), 8);
    EXPECT_FALSE(nlohmann::json::parse(raw2.substr(8, n)).contains("__metadata__"));
}

TEST_F(SafetensorsTest, EmptyFileHasNoTensors) {
    SafetensorsFile f(write_raw("empty.safetensors", "{}", 0));
    EXPECT_TRUE(f.tensors().empty());
    SafetensorsFile g(write_raw("meta_only.safetensors", R"({"__metadata__":{"a":"b"}}  )", 0));
    EXPECT_TRUE(g.tensors().empty());
}

TEST_F(SafetensorsTest, WriterRejectsBadInput) {
    const float x[4] = {};
    const std::string p = path("w.safetensors");
    expect_error([&] { write_safetensors(p, {{"a", DType::f32, {1}, x}, {"a", DType::f32, {1}, x}}); },
                 {"w.safetensors", "'a'"});
    expect_error([&] { write_safetensors(p, {{"a", DType::f32, {-1}, x}}); }, {"w.safetensors", "'a'"});
    expect_error([&] { write_safetensors(p, {{"a", DType::f32, {1, 1, 1, 1, 1}, x}}); },
                 {"w.safetensors", "'a'"});
    expect_error([&] { write_safetensors(p, {{"a", DType::f32, {1 << 30, 1 << 30, 1 << 30}, x}}); },
                 {"w.safetensors", "'a'"});
    expect_error([&] { write_safetensors(p, {{"a", DType::f32, {4}, nullptr}}); }, {"w.safetensors", "'a'"});
    EXPECT_FALSE(fs::exists(p));
    EXPECT_FALSE(fs::exists(p + ".tmp"));
    // I/O failure names the path and leaves nothing behind.
    const std::string q = path("no/such/dir/x.safetensors");
    expect_error([&] { write_safetensors(q, {{"a", DType::f32, {4}, x}}); }, {q});
    EXPECT_FALSE(fs::exists(q));
}

// ---- malformed shards

TEST_F(SafetensorsTest, TruncatedShard) {
    expect_bad(write_one(R"("F32")", "[4]", "[0, 16]", 10), {"'t.weight'", "[0, 16]"});
}

TEST_F(SafetensorsTest, FileShorterThan8Bytes) {
    expect_bad(write_bytes("short.safetensors", std::string("\x02\0\0", 3)), {"too short"});
    expect_bad(write_bytes("zero.safetensors", ""), {"too short"});
}

TEST_F(SafetensorsTest, MissingFile) { expect_bad(path("nope.safetensors"), {"cannot open"}); }

TEST_F(SafetensorsTest, HeaderLengthPastEnd) {
    expect_bad(write_raw("past.safetensors", "{}", 0, 100), {"header length 100"});
}

TEST_F(SafetensorsTest, HeaderLengthHuge) {
    expect_bad(write_raw("huge.safetensors", "{}", 0, uint64_t(1) << 63), {"exceeds"});
    expect_bad(write_raw("max.safetensors", "{}", 0, UINT64_MAX - 1), {"exceeds"});
}

TEST_F(SafetensorsTest, InvalidJson) {
    expect_bad(write_raw("json.safetensors", R"({"t.weight": {"dtype": )", 0), {"invalid JSON"});
    expect_bad(write_raw("nul.safetensors", std::string("{}\0\0", 4), 0), {"invalid JSON"});
}

TEST_F(SafetensorsTest, HeaderNotObject) {
    expect_bad(write_raw("arr.safetensors", "[1, 2]", 0), {"JSON object"});
}

TEST_F(SafetensorsTest, EntryNotObject) {
    expect_bad(write_raw("e.safetensors", R"({"t.weight": 5})", 0), {"'t.weight'", "object"});
}

TEST_F(SafetensorsTest, MissingAndExtraFields) {
    expect_bad(write_raw("m.safetensors", R"({"t.weight": {"dtype": "F32", "shape": []}})", 4),
               {"'t.weight'", "missing field 'data_offsets'"});
    expect_bad(write_raw("x.safetensors",
                         R"({"t.weight": {"dtype": "F32", "shape": [], "data_offsets": [0, 4], "z": 1}})", 4),
               {"'t.weight'", "unexpected field 'z'"});
    expect_bad(write_one("7", "[1]", "[0, 4]", 4), {"'t.weight'", "dtype"});
}

TEST_F(SafetensorsTest, UnknownDType) {
    expect_bad(write_one(R"("F64")", "[1]", "[0, 8]", 8), {"'t.weight'", "unknown dtype 'F64'"});
}

TEST_F(SafetensorsTest, ShapeNegative) {
    expect_bad(write_one(R"("U8")", "[2, -1]", "[0, 2]", 2), {"'t.weight'", "shape"});
}

TEST_F(SafetensorsTest, ShapeFiveDims) {
    expect_bad(write_one(R"("U8")", "[1, 1, 1, 1, 1]", "[0, 1]", 1), {"'t.weight'", "5 dims"});
}

TEST_F(SafetensorsTest, ShapeNotIntegers) {
    expect_bad(write_one(R"("U8")", "[1.5]", "[0, 1]", 1), {"'t.weight'", "shape"});
    expect_bad(write_one(R"("U8")", R"(["1"])", "[0, 1]", 1), {"'t.weight'", "shape"});
    expect_bad(write_one(R"("U8")", "4", "[0, 4]", 4), {"'t.weight'", "shape"});
    expect_bad(write_one(R"("U8")", "[1e30]", "[0, 1]", 1), {"'t.weight'", "shape"});
}

TEST_F(SafetensorsTest, OffsetsReversed) {
    expect_bad(write_one(R"("U8")", "[4]", "[8, 4]", 8), {"'t.weight'", "reversed"});
}

TEST_F(SafetensorsTest, OffsetsOutOfRange) {
    expect_bad(write_one(R"("U8")", "[4]", "[0, 4, 8]", 8), {"'t.weight'", "data_offsets"});
    expect_bad(write_one(R"("U8")", "[4]", "[-4, 0]", 8), {"'t.weight'", "data_offsets"});
    expect_bad(write_one(R"("U8")", "[4]", "[18446744073709551612, 18446744073709551615]", 8),
               {"'t.weight'", "past the end"});
}

TEST_F(SafetensorsTest, OverlappingOffsets) {
    const std::string h =
        R"({"layers.0.attn.wq_a.weight": {"dtype": "U8", "shape": [10], "data_offsets": [10, 20]},)"
        R"( "x": {"dtype": "U8", "shape": [15], "data_offsets": [15, 30]}})";
    expect_bad(write_raw("overlap.safetensors", h, 32), {"overlap", "'x'", "'layers.0.attn.wq_a.weight'"});
    // Identical ranges overlap too; empty ranges inside another tensor do not.
    const std::string same =
        R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},)"
        R"( "b": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}})";
    expect_bad(write_raw("same.safetensors", same, 4), {"overlap", "'a'", "'b'"});
    const std::string empty_inside =
        R"({"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},)"
        R"( "b": {"dtype": "U8", "shape": [0], "data_offsets": [4, 4]}})";
    SafetensorsFile f(write_raw("ok.safetensors", empty_inside, 8));
    EXPECT_EQ(f.tensors().size(), 2u);
}

TEST_F(SafetensorsTest, SizeMismatch) {
    expect_bad(write_one(R"("BF16")", "[2, 3]", "[0, 6]", 12), {"'t.weight'", "12 bytes", "span 6"});
}

TEST_F(SafetensorsTest, NumelOverflow) {
    expect_bad(write_one(R"("U8")", "[1099511627776, 1099511627776]", "[0, 0]", 0),
               {"'t.weight'", "overflow"});
    // numel fits but numel x dtype size does not.
    expect_bad(write_one(R"("F32")", "[4611686018427387904]", "[0, 0]", 0), {"'t.weight'", "overflow"});
    // An overflowing partial product is rejected even if a later dim is zero.
    expect_bad(write_one(R"("U8")", "[4294967296, 4294967296, 0]", "[0, 0]", 0),
               {"'t.weight'", "overflow"});
}

TEST_F(SafetensorsTest, DuplicateTensorName) {
    const std::string h =
        R"({"t.weight": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},)"
        R"( "t.weight": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}})";
    expect_bad(write_raw("dup.safetensors", h, 8), {"duplicate tensor name 't.weight'"});
    const std::string field =
        R"({"t.weight": {"dtype": "U8", "dtype": "I8", "shape": [4], "data_offsets": [0, 4]}})";
    expect_bad(write_raw("dupfield.safetensors", field, 4), {"'t.weight'", "duplicate key 'dtype'"});
}

TEST_F(SafetensorsTest, BadMetadata) {
    expect_bad(write_raw("m1.safetensors", R"({"__metadata__": {"format": 1}})", 0), {"__metadata__", "format"});
    expect_bad(write_raw("m2.safetensors", R"({"__metadata__": ["pt"]})", 0), {"__metadata__"});
}

TEST_F(SafetensorsTest, ParseHeaderDirectly) {
    const auto t = parse_safetensors_header(
        R"({"a": {"dtype": "F8_E4M3", "shape": [2, 2], "data_offsets": [4, 8]}})", 8, "mem");
    ASSERT_EQ(t.size(), 1u);
    EXPECT_EQ(t[0].dtype, DType::e4m3);
    EXPECT_EQ(t[0].begin, 4u);
    expect_error([] { parse_safetensors_header("nope", 0, "mem.safetensors"); }, {"mem.safetensors"});
}

// ---- checkpoints

namespace {
void write_index(const fs::path& dir, const std::string& weight_map) {
    std::ofstream(dir / "model.safetensors.index.json") << R"({"metadata": {}, "weight_map": )" << weight_map << "}";
}
}  // namespace

TEST_F(SafetensorsTest, CheckpointIndexTwoShards) {
    const float a[2] = {1, 2}, b[3] = {3, 4, 5}, c = 6;
    write_safetensors(path("s1.safetensors"), {{"a", DType::f32, {2}, a}, {"extra", DType::f32, {}, &c}});
    write_safetensors(path("s2.safetensors"), {{"b", DType::f32, {3}, b}});
    write_index(dir_, R"({"a": "s1.safetensors", "b": "s2.safetensors"})");
    Checkpoint ck(dir_.string());
    EXPECT_EQ(ck.size(), 3u);  // "extra" is unlisted but accepted
    EXPECT_EQ(ck.names(), (std::vector<std::string>{"a", "b", "extra"}));
    const auto* e = ck.find("b");
    ASSERT_NE(e, nullptr);
    EXPECT_EQ(fs::path(e->file->path()).filename(), "s2.safetensors");
    EXPECT_EQ(ck.view(*e).as<float>()[2], 5.0f);
    EXPECT_EQ(ck.find("zzz"), nullptr);
}

TEST_F(SafetensorsTest, CheckpointIndexMissingShard) {
    const float a[2] = {1, 2};
    write_safetensors(path("s1.safetensors"), {{"a", DType::f32, {2}, a}});
    write_index(dir_, R"({"a": "s1.safetensors", "b": "s9.safetensors"})");
    expect_error([&] { Checkpoint ck(dir_.string()); },
                 {"model.safetensors.index.json", "'b'", "s9.safetensors"});
}

TEST_F(SafetensorsTest, CheckpointIndexTensorNotInShard) {
    const float a[2] = {1, 2};
    write_safetensors(path("s1.safetensors"), {{"a", DType::f32, {2}, a}});
    write_index(dir_, R"({"a": "s1.safetensors", "ghost": "s1.safetensors"})");
    expect_error([&] { Checkpoint ck(dir_.string()); }, {"'ghost'", "s1.safetensors"});
}

TEST_F(SafetensorsTest, CheckpointIndexPathEscape) {
    const float a[2] = {1, 2};
    write_safetensors(path("s1.safetensors"), {{"a", DType::f32, {2}, a}});
    write_index(dir_, R"({"a": "../s1.safetensors"})");
    expect_error([&] { Checkpoint ck(dir_.string()); }, {"model.safetensors.index.json", "'a'", "../s1"});
    write_index(dir_, R"({"a": ".."})");
    expect_error([&] { Checkpoint ck(dir_.string()); }, {"model.safetensors.index.json", "'a'"});
    write_index(dir_, R"({"a": "/etc/passwd"})");
    expect_error([&] { Checkpoint ck(dir_.string()); }, {"model.safetensors.index.json", "'a'"});
}

TEST_F(SafetensorsTest, CheckpointIndexUnlistedDuplicate) {
    const float a[2] = {1, 2};
    write_safetensors(path("s1.safetensors"), {{"a", DType::f32, {2}, a}});
    write_safetensors(path("s2.safetensors"), {{"a", DType::f32, {2}, a}, {"b", DType::f32, {2}, a}});
    write_index(dir_, R"({"a": "s1.safetensors", "b": "s2.safetensors"})");
    expect_error([&] { Checkpoint ck(dir_.string()); }, {"'a'", "s1.safetensors", "s2.safetensors"});
}

TEST_F(SafetensorsTest, CheckpointIndexMalformed) {
    std::ofstream(dir_ / "model.safetensors.index.json") << R"({"weight_map": ["a"]})";
    expect_error([&] { Checkpoint ck(dir_.string()); }, {"model.safetensors.index.json", "weight_map"});
    std::ofstream(dir_ / "model.safetensors.index.json") << "{";
    expect_error([&] { Checkpoint ck(dir_.string()); }, {"model.safetensors.index.json", "invalid JSON"});
}

TEST_F(SafetensorsTest, CheckpointNoIndexDuplicate) {
    const float a[2] = {1, 2};
    write_safetensors(path("s1.safetensors"), {{"a", DType::f32, {2}, a}, {"c", DType::f32, {2}, a}});
    write_safetensors(path("s2.safetensors"), {{"b", DType::f32, {2}, a}, {"c", DType::f32, {2}, a}});
    expect_error([&] { Checkpoint ck(dir_.string()); }, {"'c'", "s1.safetensors", "s2.safetensors"});
}

TEST_F(SafetensorsTest, CheckpointNoIndexHappy) {
    const float a[2] = {1, 2};
    write_safetensors(path("s2.safetensors"), {{"b", DType::f32, {2}, a}});
    write_safetensors(path("s1.safetensors"), {{"a", DType::f32, {2}, a}});
    std::ofstream(dir_ / "README.md") << "not a shard";
    Checkpoint ck(dir_.string());
    EXPECT_EQ(ck.names(), (std::vector<std::string>{"a", "b"}));
}

TEST_F(SafetensorsTest, CheckpointEmptyOrMissingDir) {
    expect_error([&] { Checkpoint ck(dir_.string()); }, {dir_.string(), "no safetensors"});
    const std::string missing = path("does_not_exist");
    expect_error([&] { Checkpoint ck(missing); }, {missing, "does not exist"});
}

// ---- golden checkpoint

TEST(SafetensorsGolden, TinyFlashNvfp4) {
    const std::string dir = MEGAMOE_SHARED_DIR "/golden/tiny-flash-nvfp4/model";
    if (!fs::is_directory(dir)) MEGAMOE_MISSING_GOLDEN() << dir << " not present";
    Checkpoint ck(dir);

    struct Want {
        const char* name;
        DType dtype;
        std::vector<int64_t> shape;
    };
    const Want want[] = {
        {"embed.weight", DType::bf16, {1024, 256}},
        {"layers.0.ffn.experts.0.w1.weight", DType::u8, {128, 128}},
        {"layers.0.ffn.experts.0.w1.weight_scale_2", DType::f32, {}},
        {"mtp.0.ffn.experts.0.w1.weight", DType::i8, {128, 128}},
        {"layers.0.attn.wq_a.scale", DType::e8m0, {1, 2}},
    };
    for (const Want& w : want) {
        const auto* e = ck.find(w.name);
        ASSERT_NE(e, nullptr) << w.name;
        const Tensor t = ck.view(*e);
        EXPECT_EQ(t.dtype, w.dtype) << w.name;
        ASSERT_EQ(t.ndim, int(w.shape.size())) << w.name;
        for (size_t d = 0; d < w.shape.size(); ++d) EXPECT_EQ(t.shape[d], w.shape[d]) << w.name;
        EXPECT_NE(t.data, nullptr);
    }
    const auto index = nlohmann::json::parse(read_file(dir + "/model.safetensors.index.json"));
    EXPECT_EQ(ck.size(), index.at("weight_map").size());
}
