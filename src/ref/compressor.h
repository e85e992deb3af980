// compressor.h — the KV compressor's state machine (CPU specification).
//
// One compressor of one layer turns the token stream of a sequence into compressed rows. Its
// rules (the GPU kernels in cuda/compressor.h follow the same ones):
//   1. Position p belongs to window w = p / r, slot s = p mod r. Each token brings kv and gate
//      projections of width coff·d (coff = 2 with overlap, else 1); its gate gets the position
//      bias ape[s] when it arrives, and both are kept while its window is open (pending_*).
//   2. Window w closes at position (w+1)·r − 1 and emits row w. Without overlap, row w pools the
//      r slots of window w. With overlap (ratio 4) each token carries two series, A = features
//      [0, d) and B = [d, 2d): row w pools 2r slots, series A of window w−1 (kept in prev_* when
//      w−1 closed; absent for w = 0, i.e. weight 0) then series B of window w.
//   3. Pooling is a per-feature softmax over the slots' gates weighting the slots' kv (f32).
//   4. The pooled row is RMS-normalized with the compressor's norm and rotated at position w·r,
//      the window's first token (compressed-layer rope table); the official code then rounds it
//      (FP8 for attention rows, FP4 + Hadamard for indexer keys: no-ops in exact numerics; in
//      official numerics the pooled row, the norm and the rotation are also rounded to bf16).
//   5. Rows are appended in order: row w is visible to a query at position p iff w < (p+1)/r.
// Feeding a sequence's tokens in any chunking gives the same rows bit for bit (each row is
// computed from the same values in the same order).
#pragma once

#include <cstdint>

#include "io/config.h"
#include "io/weights.h"
#include "ref/ops.h"
#include "ref/state.h"

namespace megamoe {

// Feed n new tokens at positions pos[0..n) (consecutive, continuing the sequence) to one
// compressor; emits a row into st.rows each time a window closes.
// kv, gate: [n, coff·d] f32 projections of the new tokens (gate without the position bias).
// indexer_keys: the indexer's compressor (rounding site differs; see rule 4).
void compressor_feed(const Compressor& w, const ModelConfig& c, const ops::RopeTable& rope, bool indexer_keys,
                     const float* kv, const float* gate, const int64_t* pos, int64_t n, CompressorState& st,
                     Numerics nm = Numerics::exact);

}  // namespace megamoe
