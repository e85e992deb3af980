// load.h — what each GPU (rank) of an expert-parallel run reads from a checkpoint, and its bytes.
// CPU-only; no CUDA.
//
// The split (docs/multi-gpu.md): the routed experts of every main layer go to the rank the
// ModelPartition names (E/N each); the head [V, D] is split by vocabulary (dist::split_vocab, the
// rows a rank's logits slice needs); everything else — the embedding, attention, compressors,
// indexer, shared expert, router (with the hash layers' tid2eid), norms, mHC and the MTP block — is
// replicated (data-parallel attention; the MTP block is not split yet, partition.h). Each rank
// then maps and uploads only its own tensors (per-GPU loading), and the per-rank bytes are its
// weight memory.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dist/partition.h"
#include "io/config.h"

namespace megamoe::dist {

struct RankTensor {
    std::string name;              // checkpoint tensor name
    int64_t bytes = 0;             // what the rank reads of it (the head: its rows' share)
};

struct RankLoad {
    int32_t rank = 0, world = 1;
    int64_t head_begin = 0, head_end = 0;   // head rows [head_begin, head_end) of V
    int64_t dense_bytes = 0;                // replicated tensors (the same on every rank)
    int64_t expert_bytes = 0;               // this rank's routed experts of the main layers
    int64_t head_bytes = 0;                 // its head rows
    std::vector<RankTensor> tensors;        // every tensor it reads, in the weight walk's order
    int64_t bytes() const { return dense_bytes + expert_bytes + head_bytes; }
};

// One RankLoad per rank of p (p.layers: one ExpertPartition per main layer of cfg). with_mtp: the
// checkpoint has the MTP block (mtp.0.*). Tensor names and byte counts are the checkpoint's, as
// the binder reads them (FormatInfo); a BF16 head is split by whole rows. Throws Error when p does
// not match cfg (layer count, experts per layer), naming the field.
std::vector<RankLoad> plan_rank_loads(const ModelConfig& cfg, const ModelPartition& p, bool with_mtp);

}  // namespace megamoe::dist
