// compressor.h — the KV compressors (CSA's overlapping ratio-4 windows, HCA's ratio-128 windows,
// the indexer's keys) and the sliding-window ring on the GPU. Host API; plain C++.
//
// The compressor state machine (the CPU version is compressor_feed in ref/compressor.h; both follow
// these rules):
//   - Position p belongs to window w = p / r at slot s = p mod r. Its gate gets the position bias
//     ape[s] (the half that matches the series).
//   - Window w closes at its last position, (w+1)·r − 1, and then emits compressed row w.
//     Without overlap, row w pools the r slots of window w over all d features.
//     With overlap (ratio 4): each token carries two series of d features, A = [0, d) and
//     B = [d, 2d); row w pools 2r slots: series A of window w−1 (absent for w = 0: weight 0) and
//     series B of window w.
//   - Pooling is a per-feature softmax over the slots' gates, weighting the slots' kv.
//   - The pooled row is RMS-normalized (the compressor's norm), rotated at position w·r (the
//     window's first token, with the compressed-layer rope table), and stored as row w.
// State per (sequence, compressor), fixed size, f32 (SlotArray records, layout below):
//   pending_kv, pending_gate  [r, width]   slot s holds the token at position w·r + s of the open
//                                          window w (gate already + ape), valid for s < n_past mod r;
//                                          with overlap one set per parity of w ([2] of both)
//   prev_kv, prev_gate        [2][r, d]    series A of closed window v in buffer v mod 2 (overlap
//                                          only); the last closed window's is valid once n_past ≥ r
// Rewind (speculative decoding drops the last positions of a step): a step writes, for every slot
// s, the chunk's latest position with that slot, whether its window is still open or was closed by
// the chunk (into the pending set of that window's parity, with overlap), and series A of a closed
// window goes to its own parity's buffer. So when a chunk of at most r tokens is cut back to a
// position n, the record is exact for n without a copy when every dropped position lies in n's
// window, or (overlap) in it and the next one: the kept positions' pending slots were written (no
// later position of the chunk shares their slot and window parity), and the series A an emit of
// n's window will read (window n/r − 1, the other parity) was not touched. Slots past n_past mod r
// hold stale values that nothing reads.
// width = 2d with overlap, else d. A fresh sequence needs no reset: nothing is read before it is
// written (positions before the chunk's first come from state only if the sequence had them).
//
// Per step, for every compressor of a layer: compressor_emit, then compressor_save (the save
// overwrites the pending slots the emit reads). A slot appears in at most one chunk per step.
// kv, gate, ape and the state records are 8-byte aligned (record stride a multiple of 8); rows
// 4-byte aligned; d and rope_dim even; rows.block_tokens a multiple of r.
#pragma once

#include <cstdint>

#include "cuda/kv_row.h"
#include "cuda/step.h"
#include "core/numerics.h"

struct CUstream_st;

namespace megamoe::cuda {

// Bytes of one compressor's state record (pending + prev) for ratio r, feature dim d.
// Layout inside the record: pending_kv [r, width] f32, pending_gate [r, width] f32 (with overlap:
// for even windows, then the same for odd ones), then (overlap) prev_kv [r, d] f32, prev_gate
// [r, d] f32 for even windows, the same for odd ones.
int64_t compressor_state_bytes(int64_t r, int64_t d, bool overlap);

struct CompressorArgs {
    int32_t      ratio = 0;                  // r
    int32_t      dim = 0;                    // d (row width)
    bool         overlap = false;            // ratio 4: two series
    const float* kv = nullptr;               // [T, width] this step's wkv · x (f32)
    const float* gate = nullptr;             // [T, width] this step's wgate · x (no ape)
    const float* ape = nullptr;              // [r, width] position bias
    const uint16_t* norm_w = nullptr;        // [d] bf16 RMS norm weight
    float        norm_eps = 1e-6f;
    RopeView     rope;                       // the compressed-layer table
    SlotArray    state;                      // compressor_state_bytes per slot
    PagedRows    rows;                       // where emitted rows go (rows.dim = d, rows.ratio = r)
    Numerics     numerics = Numerics::exact; // official: the emitted rows' roundings (compressor_emit)
    bool         indexer_keys = false;       // the indexer's compressor (official: Hadamard + FP4
                                             // rows; else the attention's: FP8 KV latent rows)
    bool         kv_fp8 = false;             // official, the attention's: rows stored as kv_row.h fp8
                                             // rows (rows.row_bytes = KvRow{dim, rope_dim, true}.bytes())
};

// For every token t whose position closes a window ((pos + 1) mod r == 0): pools row
// w = (pos + 1)/r − 1 from this step's kv/gate (positions ≥ the chunk's first) and the pending /
// prev state (older positions), normalizes, rotates and stores it (bf16) in a.rows.
// twin: ops::compress_pool, ops::rms_norm, ops::rope (what compressor_feed does per row).
// Numerics::official (compressor_feed with nm = official): the pooled row is rounded to bf16
// before the norm (whose f64 sum of squares then has the twin's bits), after it and after the
// rotation; then indexer_keys: ops::round_indexer_qk of the row (d a power of two ≤ 128), else
// ops::round_kv_latent (FP8 e4m3 in 64-blocks over features [0, d − rope_dim)). Stored bf16, or
// with kv_fp8 as its fp8 row (kv_row.h: the same values).
void compressor_emit(const CompressorArgs& a, const BatchView& b, CUstream_st* stream);

// For every chunk: writes prev (overlap: series A of each of the last two windows closed by this
// chunk, into their parity's buffer) and, for every slot, the chunk's latest position with it
// (the window left open at the chunk's end, else the last window it closed).
void compressor_save(const CompressorArgs& a, const BatchView& b, CUstream_st* stream);

// The sliding-window ring: records [W] rows of `fmt` per slot (bf16 [W, hd] by default); position
// p lives in row p mod W. For every chunk, copies its last min(W, n) rows of kv bf16 [T, hd] into
// the ring: as they are, or (fmt.fp8, fmt.hd = hd) encoded as kv_row.h fp8 rows, exact for rows
// round_kv_latent rounded (twin: kv_row_encode). Run after the layer's attention (which reads the
// older rows the copy may overwrite).
void window_write(const uint16_t* kv, int64_t hd, int64_t W, const SlotArray& window, const BatchView& b,
                  CUstream_st* stream, const KvRow& fmt = KvRow{});

}  // namespace megamoe::cuda
