// device_model.h — every weight of a model on the GPU, uploaded once into one allocation, packed
// exactly as the checkpoint stores it (fp8/fp4 words in the kernels' order, a lossless per-word
// permutation; tid2eid narrowed from i64 to i32, ids < E). Field names follow io/weights.h, so the
// GPU forward reads like the CPU one.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "cuda/buffer.h"
#include "cuda/gemm.h"
#include "cuda/linear.h"
#include "cuda/step.h"
#include "ref/model.h"

namespace megamoe::gpu {

struct DeviceCompressor {
    int32_t            ratio = 0, dim = 0;
    bool               overlap = false;
    cuda::DeviceLinear wkv, wgate;           // bf16 [coff·d, D]
    const float*       ape = nullptr;        // [r, coff·d] f32
    const uint16_t*    norm = nullptr;       // [d] bf16
};

struct DeviceLayer {
    AttnKind   kind = AttnKind::sliding;
    RouterKind router = RouterKind::score;
    const uint16_t* attn_norm = nullptr;     // [D] bf16
    const uint16_t* ffn_norm = nullptr;      // [D] bf16
    const float* hc_attn_fn = nullptr;       // [(2+hc)·hc, hc·D] f32
    const float* hc_attn_base = nullptr;     // [(2+hc)·hc]
    const float* hc_attn_scale = nullptr;    // [3]
    const float* hc_ffn_fn = nullptr;
    const float* hc_ffn_base = nullptr;
    const float* hc_ffn_scale = nullptr;
    // attention
    cuda::DeviceLinear wq_a, wq_b, wkv, wo_a, wo_b;   // fp8 (wo_a may be bf16 in converted checkpoints)
    const uint16_t* q_norm = nullptr;        // [q_lora] bf16
    const uint16_t* kv_norm = nullptr;       // [hd] bf16
    const float*    attn_sink = nullptr;     // [H] f32
    DeviceCompressor comp;                   // CSA / HCA
    DeviceCompressor idx_comp;               // CSA: the indexer's keys
    cuda::DeviceLinear idx_wq_b;             // fp8 [nI·dI, q_lora]
    cuda::DeviceLinear idx_weights_proj;     // bf16 [nI, D]
    // MoE
    cuda::DeviceLinear gate;                 // bf16 [E, D]
    const float*   gate_bias = nullptr;      // [E] f32 (score router)
    const int32_t* tid2eid = nullptr;        // [V, k] i32 (hash router)
    cuda::DeviceExperts experts;             // E routed experts (NVFP4 or MXFP4)
    cuda::DeviceLinear sh_w1, sh_w3, sh_w2;  // shared expert, fp8
};

// The multi-token-prediction block (mtp.0.*; ref/model.h mtp_forward): its own V4 block (sliding
// window, score router), the projections of the next token's embedding and the main model's
// streams, its HC head and norm; the embedding and the head are the main model's.
struct DeviceMtp {
    DeviceLayer        block;
    cuda::DeviceLinear e_proj, h_proj;       // [D, D] (fp8 in the releases)
    const uint16_t*    enorm = nullptr;      // [D] bf16
    const uint16_t*    hnorm = nullptr;      // [D] bf16
    const uint16_t*    norm = nullptr;       // [D] bf16
    const float* hc_head_fn = nullptr;       // [hc, hc·D] f32
    const float* hc_head_base = nullptr;     // [hc]
    const float* hc_head_scale = nullptr;    // [1]
};

// One GPU's share of an expert-parallel model (docs/multi-gpu.md §6, step 3; the tensors it names
// are dist::plan_rank_loads' RankLoad): the routed experts it holds in every main layer, in its
// local order (global ids ascending, ExpertPartition::held[rank]), and the rows of the head its
// logits slice needs (dist::split_vocab). Everything else is replicated; the MTP block too (not
// split yet, dist/partition.h). The default shard is the whole model.
struct WeightShard {
    std::vector<std::vector<int32_t>> held;   // [main layers][E/N] global expert ids; empty: every expert
    int64_t head_begin = 0, head_end = -1;    // head rows [head_begin, head_end) of V; head_end < 0: all
};

class DeviceModel {
public:
    // Uploads every weight of `m`, the MTP block included when the checkpoint has one. Synchronous.
    explicit DeviceModel(const Model& m);
    // Uploads only `shard`'s weights of `m` (per-GPU loading): layers[l].experts then holds
    // shard.held[l] in that order, `head` the rows [head_begin, head_end). Nothing reads the other
    // experts' or rows' bytes of the mapped checkpoint. Such a model is not yet runnable: the
    // runner's expert-parallel exchange is not built (docs/multi-gpu.md §5). Throws Error on a shard
    // that does not fit m (layer count, expert ids out of range or not ascending, head range, a
    // block-scaled head), naming the field.
    DeviceModel(const Model& m, const WeightShard& shard);
    // A model of config `c` with random weights made on the GPU (cuda/synth.h), in the same layout
    // (benchmarks of models too large for a checkpoint on disk).
    DeviceModel(const ModelConfig& c, uint64_t seed);
    // ... only `shard`'s experts and head rows of it (benchmarks of several GPUs): expert e and
    // every replicated tensor get the values they get in the whole synthetic model.
    DeviceModel(const ModelConfig& c, uint64_t seed, const WeightShard& shard);
    // Bytes the upload takes on the device (a counting pass over the same walk; no GPU needed).
    static size_t plan_bytes(const Model& m);
    static size_t plan_bytes(const Model& m, const WeightShard& shard);
    static size_t plan_bytes(const ModelConfig& c);
    static size_t plan_bytes(const ModelConfig& c, const WeightShard& shard);

    const ModelConfig& cfg() const { return cfg_; }
    size_t bytes() const { return arena_.used(); }

    const uint16_t*       embed = nullptr;   // [V, D] bf16
    cuda::DeviceLinear    head;              // bf16 [V, D]
    const uint16_t*       norm = nullptr;    // [D] bf16
    const float* hc_head_fn = nullptr;       // [hc, hc·D] f32
    const float* hc_head_base = nullptr;     // [hc]
    const float* hc_head_scale = nullptr;    // [1]
    std::vector<DeviceLayer> layers;
    std::optional<DeviceMtp> mtp;            // when the checkpoint (or a synthetic config) has mtp.0.*
    cuda::RopeView rope_main, rope_compress; // device rope tables
    const cuda::RopeView& rope_for(int64_t layer) const {
        return cfg_.attn_kind(layer) == AttnKind::sliding ? rope_main : rope_compress;
    }

    struct Source;             // where the bytes come from (device_model.cpp)

private:
    DeviceModel() = default;   // for the counting pass
    // The one walk over the weights (counting or real arena; copies from `src` or synthesizes).
    void place(const ModelConfig& c, const Weights& w, const ops::RopeTable& rope_main,
               const ops::RopeTable& rope_compress, cuda::DeviceArena& arena, const Source& src,
               const WeightShard& shard = {});
    ModelConfig cfg_;
    cuda::DeviceArena arena_;
};

}  // namespace megamoe::gpu
