// weights.h — every tensor of a DeepSeek-V4 checkpoint bound into a named field.
//
// Weights stay packed exactly as the checkpoint stores them (views into the memory-mapped
// shards); Linear::decode_row expands one row on the fly. After binding nothing looks tensors
// up by name. The walk over the model's tensors (visit_weights) is written once and drives the
// binder (checkpoint -> fields, strict dtype and shape checks), `megamoe synth` (fields ->
// random quantized tensors) and `megamoe info` (bytes by group).
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "io/config.h"
#include "io/formats.h"
#include "io/safetensors.h"
#include "core/tensor.h"

namespace megamoe {


// y[M, out] = x[M, in] · Wᵀ. Tensor names: PREFIX.weight plus
//   fp8_block: PREFIX.scale e8m0 [ceil(out/128), ceil(in/128)]
//   mxfp4:     PREFIX.scale e8m0 [out, in/32]                         (weight I8 [out, in/2])
//   nvfp4:     PREFIX.weight_scale e4m3 [out, in/16], PREFIX.weight_scale_2 f32 [],
//              PREFIX.input_scale f32 []                              (weight U8 [out, in/2])
struct Linear {
    LinearFormat format = LinearFormat::bf16;
    int64_t out = 0, in = 0;
    Tensor weight;                 // packed as stored
    Tensor scale;                  // see above; empty for f32/bf16
    Tensor scale_2;                // nvfp4 weight_scale_2 f32 []
    Tensor input_scale;            // nvfp4 input_scale f32 [] (W4A4 activation scale; read and kept)

    void decode_row(int64_t n, float* dst) const;   // dst: [in] f32
    size_t bytes() const;                           // weight + scales as stored
};

struct Compressor {                // KV compression of one attention (d = head_dim) or indexer (d = index_head_dim)
    int64_t ratio = 0, dim = 0;
    bool    overlap = false;       // ratio 4: two series, windows of 2r with stride r
    Linear  wkv, wgate;            // bf16 [coff·d, D]  (coff = 2 with overlap)
    Tensor  ape;                   // f32  [r, coff·d]  position bias inside a window
    Tensor  norm;                  // bf16 [d]
};

struct Indexer {                   // lightning indexer (CSA layers)
    Linear     wq_b;               // fp8 [index_n_heads·index_head_dim, q_lora_rank]
    Linear     weights_proj;       // bf16 [index_n_heads, D]
    Compressor compressor;         // d = index_head_dim, ratio 4, overlap
};

struct AttentionWeights {
    AttnKind kind = AttnKind::sliding;
    Linear   wq_a;                 // fp8 [q_lora_rank, D]
    Tensor   q_norm;               // bf16 [q_lora_rank]
    Linear   wq_b;                 // fp8 [H·head_dim, q_lora_rank]
    Linear   wkv;                  // fp8 [head_dim, D]
    Tensor   kv_norm;              // bf16 [head_dim]
    Linear   wo_a;                 // fp8 [o_groups·o_lora_rank, (H/o_groups)·head_dim], one block per group
    Linear   wo_b;                 // fp8 [D, o_groups·o_lora_rank]
    Tensor   attn_sink;            // f32 [H]
    Compressor compressor;         // CSA and HCA
    Indexer    indexer;            // CSA only
};

struct HyperConnWeights {          // mHC at one site
    Tensor fn;                     // f32 [(2+hc)·hc, hc·D]
    Tensor base;                   // f32 [(2+hc)·hc]
    Tensor scale;                  // f32 [3]  (pre, post, comb)
};

struct ExpertWeights {
    Linear w1, w3;                 // [I, D]  gate, up
    Linear w2;                     // [D, I]  down
};

struct MoeWeights {
    RouterKind router = RouterKind::score;
    Linear gate;                   // bf16 [E, D]
    Tensor bias;                   // f32 [E]      (score router)
    Tensor tid2eid;                // i64 [V, k]   (hash router), values checked in [0, E)
    std::vector<ExpertWeights> experts;   // E routed, NVFP4 or MXFP4
    ExpertWeights shared;                 // fp8
};

struct BlockWeights {
    Tensor attn_norm, ffn_norm;    // bf16 [D]
    HyperConnWeights hc_attn, hc_ffn;
    AttentionWeights attn;
    MoeWeights ffn;
};

struct HyperHeadWeights {
    Tensor fn;                     // f32 [hc, hc·D]
    Tensor base;                   // f32 [hc]
    Tensor scale;                  // f32 [1]
};

struct MtpWeights {                // multi-token prediction block (loaded, not used yet)
    BlockWeights block;
    Linear e_proj, h_proj;         // fp8 [D, D]
    Tensor enorm, hnorm, norm;     // bf16 [D]
    HyperHeadWeights hc_head;
};

struct Weights {
    // Copies of tensors whose offset in their shard is not aligned for their dtype (safetensors
    // does not require alignment; reading a float through a misaligned pointer is undefined).
    std::vector<std::vector<uint64_t>> realigned;

    Tensor embed;                  // bf16 [V, D]
    Linear head;                   // bf16 [V, D]
    Tensor norm;                   // bf16 [D]
    HyperHeadWeights hc_head;
    std::vector<BlockWeights> layers;
    std::optional<MtpWeights> mtp;
};

// The walk over every tensor of the model. `tensor` is called for plain tensors, `linear` for
// projections (the visitor decides how a Linear's tensors are named and typed, see Linear).
struct WeightVisitor {
    virtual ~WeightVisitor() = default;
    virtual void tensor(const std::string& name, DType dtype, const std::vector<int64_t>& shape, Tensor& dst) = 0;
    virtual void linear(const std::string& prefix, LinearFormat format, int64_t out, int64_t in, Linear& dst) = 0;
};
// Sizes `w` (layers, experts) from the config and visits every tensor; `with_mtp` includes mtp.0.*.
void visit_weights(const ModelConfig& cfg, Weights& w, WeightVisitor& v, bool with_mtp);

// Bind a checkpoint: every tensor the config implies must exist with the right dtype and shape
// (errors name the tensor and both shapes). The MTP block is bound when its tensors are present.
// progress(done, total), when given, is called as tensors are bound (total = tensors in the checkpoint).
Weights bind_weights(const ModelConfig& cfg, const Checkpoint& ck,
                     const std::function<void(size_t, size_t)>& progress = nullptr);

// Weight byte counts by group (for `megamoe info`).
struct WeightStats {
    struct Group { std::string name; int64_t params = 0; int64_t bytes = 0; };
    std::vector<Group> groups;
    std::vector<std::pair<std::string, int64_t>> formats;   // "FP8 block" -> bytes, ...
};
WeightStats weight_stats(const ModelConfig& cfg, Weights& w, bool with_mtp);

}  // namespace megamoe
