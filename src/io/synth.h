// synth.h — synthetic checkpoints in the release layout (`megamoe synth`).
//
// Writes config.json, sharded safetensors and model.safetensors.index.json for a preset
// (tiny = the golden test size, flash, pro) with optional overrides. Weights are random with
// scales that keep activations O(1); every projection is quantized with the same quantizers
// whose output the loader reads back bit-exactly (FP8 128×128 blocks, MXFP4 or NVFP4 experts,
// MXFP4 MTP experts in an NVFP4 checkpoint, as NVIDIA's releases have them). Each tensor's
// values depend only on (seed, name), so shards can be generated one at a time.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "io/config.h"

namespace megamoe {

struct SynthOptions {
    std::string  preset = "tiny";          // tiny | flash | pro
    int64_t      layers = -1;              // override num_hidden_layers (keeps the preset's ratio schedule)
    int64_t      vocab = -1;               // override vocab_size
    int64_t      routed_experts = -1;      // override n_routed_experts (>= num_experts_per_tok)
    ExpertFormat experts = ExpertFormat::nvfp4;
    bool         mtp = true;               // write the mtp.0.* block
    uint64_t     seed = 0;
    int64_t      shard_bytes = int64_t{4} << 30;   // target shard size
};

ModelConfig synth_config(const SynthOptions& o);            // throws Error on a bad option
std::string config_to_json(const ModelConfig& c);           // release-style config.json text
// Writes the checkpoint into `dir` (created if needed). Returns the number of bytes of tensors.
int64_t write_synthetic_checkpoint(const std::string& dir, const SynthOptions& o);
// The f32 values [out, in] a projection PREFIX is generated from, before quantization.
std::vector<float> synth_linear_values(const std::string& prefix, int64_t out, int64_t in, uint64_t seed);

}  // namespace megamoe
