// checkpoint_json_fuzz.cpp — libFuzzer target for the two small JSON files of a checkpoint folder
// besides config.json: model.safetensors.index.json (the weight map) and generation_config.json
// (sampling defaults). Each input is written as both, in folders of their own.
//
// Index: the folder holds two real shards (a.safetensors with tensors "x" and "y", b.safetensors
// with "z"); whatever index is accepted, every name it maps resolves to the shard that holds it,
// every view stays inside its file's mapping, and the index cannot reach outside the folder.
// Generation config: what is accepted passes SamplingParams::validate(). Rejection must be a
// megamoe::Error either way.
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz_util.h"
#include "io/safetensors.h"
#include "serve/sampler.h"

using namespace megamoe;

namespace {

struct Folders {
    std::filesystem::path ckpt, gen;
    Folders() {
        ckpt = fuzz::scratch_dir() / "ckpt";
        gen = fuzz::scratch_dir() / "gen";
        std::filesystem::create_directories(ckpt);
        std::filesystem::create_directories(gen);
        const float xy[6] = {1, 2, 3, 4, 5, 6};
        const int32_t z[2] = {7, 8};
        write_safetensors((ckpt / "a.safetensors").string(),
                          {{"x", DType::f32, {2, 2}, xy}, {"y", DType::f32, {2}, xy + 4}});
        write_safetensors((ckpt / "b.safetensors").string(), {{"z", DType::i32, {2}, z}});
    }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static const Folders f;
    const std::string_view text(reinterpret_cast<const char*>(data), size);

    fuzz::write_file(f.ckpt / "model.safetensors.index.json", text);
    try {
        Checkpoint c(f.ckpt.string());
        FUZZ_CHECK(c.size() >= 1 && c.size() <= 3);
        for (const auto& name : c.names()) {
            const Checkpoint::Entry* e = c.find(name);
            FUZZ_CHECK(e != nullptr && e->file != nullptr && e->info != nullptr);
            FUZZ_CHECK(e->info->name == name);
            const std::string shard = std::filesystem::path(e->file->path()).filename().string();
            FUZZ_CHECK(std::filesystem::path(e->file->path()).parent_path() == f.ckpt);
            FUZZ_CHECK(shard == (name == "z" ? "b.safetensors" : "a.safetensors"));
            const Tensor t = c.view(*e);
            FUZZ_CHECK(t.numel() == (name == "x" ? 4 : 2));
        }
    } catch (const Error&) {
        // expected for malformed input
    }

    fuzz::write_file(f.gen / "generation_config.json", text);
    SamplingParams p;
    try {
        p = load_generation_defaults(f.gen.string());
    } catch (const Error&) {
        return 0;
    }
    bool valid = true;
    try {
        p.validate();   // the loader validated what it accepted
    } catch (const Error&) {
        valid = false;
    }
    FUZZ_CHECK(valid);
    return 0;
}
