// attention_keys.h — which key rows one query of sparse_attention reads (attention.h's rules), as
// host/device functions: the kernel gathers its key tiles through key_row, and the tests run the
// same functions on host copies of the arrays to check the addressing against a flat history.
// Plain C++, compiles without the CUDA toolkit.
#pragma once

#include <cstdint>

#include "cuda/attention.h"
#include "cuda/kv_row.h"
#include "cuda/step.h"

namespace megamoe::cuda {

// The key list of the query in batch row t: n_window window keys (positions lo .. p), then n_comp
// compressed slots (all n_vis visible rows, or the topk_k entries of the token's top-k row).
struct QueryKeys {
    int32_t p = 0;          // query position
    int32_t p0 = 0;         // position of the chunk's first token
    int32_t t0 = 0;         // batch row of the chunk's first token
    int32_t slot = 0;       // the sequence's state slot
    int32_t lo = 0;         // first window position, max(0, p − W + 1)
    int32_t n_window = 0;   // p − lo + 1 (≥ 1: the query itself)
    int32_t n_vis = 0;      // compressed rows visible, (p + 1) / ratio (0 without compression)
    int32_t n_comp = 0;     // compressed key slots: 0, n_vis (HCA) or topk_k (CSA)

    MEGAMOE_HD int32_t n_keys() const { return n_window + n_comp; }
};

// Reads b.chunk, b.chunk_first, b.pos and b.slot (device arrays on the device, host arrays in tests).
MEGAMOE_HD QueryKeys query_keys(const AttentionArgs& a, const BatchView& b, int32_t t) {
    QueryKeys k;
    k.t0 = b.chunk_first[b.chunk[t]];
    k.p = b.pos[t];
    k.p0 = b.pos[k.t0];
    k.slot = b.slot[t];
    k.lo = k.p - a.window + 1 > 0 ? k.p - a.window + 1 : 0;
    k.n_window = k.p - k.lo + 1;
    k.n_vis = a.comp.ratio > 0 ? (k.p + 1) / a.comp.ratio : 0;
    k.n_comp = a.comp.ratio > 0 ? (a.topk ? a.topk_k : k.n_vis) : 0;
    return k;
}

// Row of key j, 0 ≤ j < k.n_keys(), or nullptr for a compressed slot that holds no row (a −1
// top-k entry; entries outside [0, n_vis) are treated the same, so a bad index reads nothing).
// topk_row: the token's top-k row [topk_k] (CSA) or nullptr (HCA: slot i is row i).
// *stored (when given): whether the row is in the state (ring or compressed rows: a KvRow row,
// fp8 when a.kv_fp8) rather than this step's kv (hd bf16).
MEGAMOE_HD const uint16_t* key_row(const AttentionArgs& a, const QueryKeys& k, int32_t j, const int32_t* topk_row,
                                   bool* stored = nullptr) {
    if (stored) *stored = true;
    if (j < k.n_window) {
        const int32_t q = k.lo + j;
        if (q >= k.p0) {
            if (stored) *stored = false;
            return a.kv + static_cast<int64_t>(k.t0 + (q - k.p0)) * a.head_dim;
        }
        const KvRow f{a.head_dim, a.rope.rope_dim, a.kv_fp8};
        return reinterpret_cast<const uint16_t*>(a.ring.at<const uint8_t>(k.slot) +
                                                 static_cast<int64_t>(q % (a.ring_rows > 0 ? a.ring_rows : a.window)) *
                                                     f.bytes());
    }
    const int32_t i = j - k.n_window;
    const int32_t w = topk_row ? topk_row[i] : i;
    if (w < 0 || w >= k.n_vis) return nullptr;
    return a.comp.row<const uint16_t>(k.slot, w);
}

}  // namespace megamoe::cuda
