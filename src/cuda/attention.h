// attention.h — DeepSeek-V4 attention on the GPU: the lightning indexer (scores over the
// compressed keys, top-k) and sink attention over the sliding window plus compressed rows.
// Host API; plain C++, compiles without the CUDA toolkit.
//
// Which keys a query at position p (in chunk c, first position p0, first batch row t0) sees:
//   window      positions q in [max(0, p − W + 1), p]: this step's kv row t0 + (q − p0) if q ≥ p0,
//               else the sequence's ring row q mod W;
//   compressed  rows w < n_vis = (p + 1) / r of the layer's PagedRows: all of them (HCA), or the
//               indexer's top-k of them (CSA), or none (ratio 0).
// Window keys come first, then compressed rows in ascending row order; one softmax with the
// head's sink over all of them (ops::attend_one's order).
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/step.h"
#include "core/numerics.h"

struct CUstream_st;

namespace megamoe::cuda {

struct AttentionArgs {
    int32_t         heads = 0;               // H
    int32_t         head_dim = 0;            // hd (64, 128, 256 or 512)
    int32_t         window = 0;              // W keys per query, the query included
    const uint16_t* q = nullptr;             // [T, H, hd] bf16, normalized and rotated
    const uint16_t* kv = nullptr;            // [T, hd] bf16 this step's latents, normalized and rotated
    SlotArray       ring;                    // [ring_rows] KvRow rows per slot (window_write's layout)
    int32_t         ring_rows = 0;           // rows of the ring (≥ window; 0: window): position q in row q mod ring_rows
    PagedRows       comp;                    // compressed rows (comp.ratio = 0: none)
    bool            kv_fp8 = false;          // ring and comp rows are KvRow{hd, rope.rope_dim, fp8}
                                             //   rows (cuda/kv_row.h; comp.row_bytes its bytes); kv is bf16
    const int32_t*  topk = nullptr;          // [T, topk_k] ascending rows, −1 = none (CSA); null: all
    int32_t         topk_k = 0;              //   visible rows (HCA)
    const float*    sink = nullptr;          // [H] f32, a raw logit per head
    float           scale = 0;               // hd^-0.5
    RopeView        rope;                    // the layer's table: the output's rope dims are rotated
                                             // back at the query position (ops::rope, inverse)
    uint16_t*       out = nullptr;           // [T, H, hd] bf16
    int32_t         wide = -1;               // which kernel (attention_wide): -1 by size, 0 the CTAs of
                                             //   16 heads (key splits at few tokens), 1 of 64 heads
    int32_t         splits = 0;              // the 16-head CTAs' key splits (attention_splits): 0 by
                                             //   size, else 1, 2, 4 or 8 (fewer where a cluster of them
                                             //   does not fit)
};

// Whether sparse_attention runs its CTAs of 64 heads (one per token and 64 heads, each key tile
// read once for them) rather than of 16 heads (which split a token's keys over a cluster when the
// grid is small): `wide` 0 / 1 forces the choice; -1 takes 64 heads when the model has at least 64
// and the tokens give a full wave of such CTAs (T·⌈H/64⌉ ≥ sms). Same arithmetic, same tolerance.
inline bool attention_wide(int64_t heads, int64_t T, int64_t sms, int32_t wide) {
    if (wide >= 0) return wide == 1;
    return heads >= 64 && T * ((heads + 63) / 64) >= sms;
}

// The 16-head kernel's key splits for `ctas` CTAs (tokens × head blocks) whose queries have at most
// `max_tiles` key tiles (64 keys): `forced` (1, 2, 4 or 8) if given, else doubled from 1 while the
// grid stays within one CTA per SM (sms) and each split keeps a tile. sparse_attention halves it
// further where a cluster of that many does not fit. (Not splitting below 8 tiles, so that a
// window layer's 2 tiles and a compressed layer's 3-6 run in one CTA without the split's exchange,
// measured slower at batch 1: H100, 8-layer V4-Flash, 1683.7 / 1714.6 µs against 1691.0 / 1683.7,
// official numerics 1769.2 against 1739.0; docs/bench-forward.md, "The one-token attention".)
inline int32_t attention_splits(int64_t ctas, int64_t max_tiles, int64_t sms, int32_t forced) {
    if (forced > 0) return forced;
    int32_t splits = 1;
    while (splits < 8 && ctas * splits * 2 <= sms && 2 * splits <= max_tiles) splits *= 2;
    return splits;
}

// out[t, h] = Σ_j softmax([q·k_j·scale ..., sink_h])_j · k_j (sink column dropped), keys as above,
// then the inverse rotation of its rope dims.      twin: ops::attend_one, then ops::rope(inverse)
// bf16 products, f32 accumulation; the softmax weights are rounded to bf16 before the P·V product.
// kv_fp8: stored rows are decoded to bf16 (e4m3 · scale, exact) in shared memory, so the result is
// that of bf16 storage holding the decoded values, bit for bit.
void sparse_attention(const AttentionArgs& a, const BatchView& b, CUstream_st* stream);

// The lightning indexer of a CSA layer.
struct IndexerArgs {
    int32_t         heads = 0;               // nI (64 in the releases)
    int32_t         head_dim = 0;            // dI (128)
    const uint16_t* q = nullptr;             // [T, nI, dI] bf16, rotated (official: and rounded by
                                             //   round_indexer_qk, cuda/numerics.h)
    const float*    w = nullptr;             // [T, nI] f32 head weights: weights_proj · x, unscaled
    float           w_scale = 0;             // applied to w: indexer_w_scale(nI, dI, numerics)
    PagedRows       keys;                    // the indexer compressor's rows (keys.dim = dI, ratio 4)
    float*          scores = nullptr;        // [T, max_rows] f32 scratch
    int64_t         max_rows = 0;            // row stride of `scores` (≥ every token's n_vis)
    int32_t         k = 0;                   // index_topk
    int32_t*        topk = nullptr;          // [T, k] out: ascending row ids, −1 past min(k, n_vis)
    Numerics        numerics = Numerics::exact;
};

// w_scale as the CPU forward computes it (ref attention_inputs): exact nI^-0.5 (the kernel scales
// the dots by dI^-0.5); official dI^-0.5 · nI^-0.5, in that order of f32 roundings (the official
// code folds dI^-0.5 into the bf16 weights and does not scale the dots).
inline float indexer_w_scale(int32_t heads, int32_t head_dim, Numerics nm) {
    if (nm == Numerics::official)
        return 1.0f / std::sqrt(static_cast<float>(head_dim)) / std::sqrt(static_cast<float>(heads));
    return 1.0f / std::sqrt(static_cast<float>(heads));
}

// For s < n_vis(t), then the k largest (ties to the lower row) in ascending order:
// exact:    score[t, s] = Σ_h w[t, h]·w_scale · relu(q[t, h] · K[s] · dI^-0.5)
//           twin: ops::indexer_scores (with w · w_scale), ops::topk_indices
// official: w_h = bf16(bf16(w[t, h]) · w_scale) (the linear's bf16 output, scaled in bf16), and
//           score[t, s] = bf16(Σ_h bf16(max(bf16(q[t, h] · K[s]), 0) · w_h)), the heads added in
//           f32 in order h = 0 .. nI − 1 as the twin does (so the scores are the twin's bits
//           whenever the f32 dots are: for FP4-rounded q and K they are exact sums).
//           twin: ops::indexer_scores_bf16 with the forward's idx_w, ops::topk_indices
void indexer_topk(const IndexerArgs& a, const BatchView& b, CUstream_st* stream);

// The top-k alone (exposed for its tests): for each row t of scores [T, stride], the k largest of
// the first n[t] values (ties to the lower index), ascending, −1 past min(k, n[t]).
// twin: ops::topk_indices
void topk_rows(const float* scores, int64_t T, int64_t stride, const int32_t* n, int32_t k, int32_t* out,
               CUstream_st* stream);

}  // namespace megamoe::cuda
