// state_pool.h — per-sequence state on the GPU: fixed-size slot records and a pool of blocks
// addressed through block tables. Nothing is allocated after construction.
//
//   slot record (one per sequence slot, fixed size, all layers):
//       per layer: the sliding-window ring [R] KV rows, R = W + kRingSpare (position p in row
//                  p mod R: a speculative step writes up to kRingSpare positions past the one
//                  a rewind keeps, and with the spare rows they never overwrite a row that a later
//                  query reads, so dropping them needs no copy); with an MTP
//                  block, one more ring after the main layers (its sliding window);
//                  CSA/HCA: the attention compressor's open window (cuda::compressor_state_bytes);
//                  CSA: the indexer compressor's open window
//   block (block_tokens positions of one sequence, all layers):
//       per compressed layer: its rows [block_tokens / r] KV rows; CSA also the indexer's keys
//       bf16 [block_tokens / 4, dI]
// A KV row (cuda/kv_row.h) is hd bf16 values, or under official numerics the FP8 row that holds
// the same values (e4m3 nope dims with a scale byte per 64, bf16 rope dims: 592 bytes for V4's
// hd 512 instead of 1024), so the state pool holds more positions in the same memory.
// A sequence holds one slot and the blocks its block-table row lists; `reserve` grows that list.
// Prefix caching: a snapshot copies a slot record into one of n_snapshots spare records and holds
// the sequence's full blocks before its position (shared, counted: a block is free when no
// sequence and no snapshot holds it); a sequence opened from it gets the record back and shares
// those blocks, writing only to blocks after them (the position is a multiple of block_tokens).
// Block 0 is never given to a sequence: unused table entries and the padding slot (which takes
// the padding rows of a graph-captured decode bucket) point to it, so stray writes land there.
// What a CPU SequenceState holds (ref/state.h) can be read back with `download` (tests).
#pragma once

#include <cstdint>
#include <vector>

#include "cuda/buffer.h"
#include "cuda/kv_row.h"
#include "cuda/step.h"
#include "ref/state.h"

struct CUstream_st;

namespace megamoe::gpu {

// Where everything lives, from the config alone (no GPU needed; the memory plan uses it).
struct StateLayout {
    struct Layer {
        int64_t ring_off = 0;                // bytes into the slot record
        int64_t comp_off = -1, idx_off = -1; // compressor state records (-1: none)
        int64_t rows_off = -1, idx_rows_off = -1;   // bytes into a block (-1: none)
        int32_t ratio = 0;                   // 0 (SWA), 4 (CSA) or the HCA ratio
        bool    csa = false;                 // overlapping compressor + indexer
    };
    static constexpr int64_t kRingSpare = 3;   // kMaxSpeculativeTokens (ref/speculative.h)
    int64_t W = 0, hd = 0, dI = 0;
    int64_t ring_rows = 0;                   // W + kRingSpare
    cuda::KvRow kv;                          // how ring rows and compressed rows are stored
    int64_t block_tokens = 0;
    int64_t slot_bytes = 0;                  // one slot record
    int64_t main_bytes = 0;                  // its main-model part (all of it but the MTP block's ring,
                                             // which comes last): what a rollback saves and restores
    int64_t block_bytes = 0;                 // one block (0: no compressed layer)
    std::vector<Layer> layers;

    // with_mtp: one more sliding-window ring after the main layers (layer index L, the MTP block's).
    // kv_fp8: KV rows stored as fp8 (official numerics; needs KvRow::fp8_fits(hd, qk_rope_head_dim)).
    static StateLayout make(const ModelConfig& c, int64_t block_tokens, bool with_mtp = false, bool kv_fp8 = false);

    // Whether dropping positions [first, first + n) of a step (keeping those before first) can be
    // done by a rewind (StatePool::rewind): n ≤ kRingSpare, and every dropped position lies in the
    // window of `first`, or for a CSA layer (overlapping compressors) in it and the next one
    // (cuda/compressor.h, "Rewind"). A single dropped position always does (one speculative draft);
    // so do up to 3 unless they cross an HCA window boundary.
    bool rewind_exact(int64_t first, int64_t n) const;
};

class StatePool {
public:
    // n_slots sequence slots (plus one padding slot), n_blocks blocks of layout.block_tokens
    // positions (plus the reserved block 0), sequences up to max_len positions.
    // rollback: one backup record per slot for save / restore (speculative decoding).
    StatePool(const ModelConfig& c, const StateLayout& layout, int64_t n_slots, int64_t n_blocks, int64_t max_len,
              int64_t n_snapshots = 0, bool rollback = false);

    const StateLayout& layout() const { return L_; }
    int64_t n_slots() const { return n_slots_; }
    int32_t pad_slot() const { return static_cast<int32_t>(n_slots_); }
    int64_t max_len() const { return max_len_; }
    size_t  bytes() const { return slots_.bytes() + snaps_buf_.bytes() + blocks_.bytes() + table_.bytes(); }

    int32_t open();                          // a free slot (n_past = 0, no blocks), or -1
    void    close(int32_t slot);             // frees its blocks; unknown/closed slots: no-op
    bool    is_open(int32_t slot) const;
    // Blocks for positions [0, n_tokens): false (nothing changed) when the pool or max_len lacks room.
    bool    reserve(int32_t slot, int64_t n_tokens);
    int64_t reserved_tokens(int32_t slot) const;   // as reserved (≤ what its blocks hold)
    int64_t n_past(int32_t slot) const;
    void    advance(int32_t slot, int64_t n);   // after a step ran n tokens of it
    double  usage() const;                   // blocks in use / blocks (0 without compressed layers)
    int64_t free_blocks() const { return static_cast<int64_t>(free_.size()); }
    // Positions the pool holds for all sequences (without compressed layers: slots x max_len).
    int64_t capacity_tokens() const { return L_.block_bytes ? n_blocks_ * L_.block_tokens : n_slots_ * max_len_; }

    // Prefix snapshots (stream-ordered copies of slot records on `stream`).
    int32_t snapshot(int32_t slot, CUstream_st* stream);          // a handle, or -1 when all are in use
    void    drop_snapshot(int32_t handle);                        // unknown handles: no-op
    int32_t open_from(int32_t handle, CUstream_st* stream);       // a slot at the snapshot's position, or -1
    int64_t n_snapshots() const { return static_cast<int64_t>(snaps_.size()); }

    // Rollback (speculative decoding; needs rollback at construction): save copies the main-model
    // part of the slot's record (window rings, open compressor windows; not the MTP block's ring,
    // whose rows are keyed by position and stay valid: a verification step's MTP pass wrote the
    // rows of the kept positions, which re-running them through the main model does not redo)
    // to its backup; restore copies it back
    // and sets the position to n_past (at most the current one, at least the saved one). Rows that
    // steps after the save wrote into blocks past n_past are never read before later steps rewrite
    // them (rows and keys are read by position), so the slot is then exactly as it was at n_past.
    // Stream-ordered copies on `stream`.
    void save(int32_t slot, CUstream_st* stream);
    void restore(int32_t slot, int64_t n_past, CUstream_st* stream);
    // Sets the position back to n_past (≤ the current one) without touching device memory. Exact
    // when StateLayout::rewind_exact holds for the dropped positions, the step that wrote them
    // had at most min(ratio) tokens and at most kRingSpare of them are dropped: the window rings
    // (row p mod ring_rows), the compressed rows and the indexer keys are keyed by position, so the
    // dropped positions' writes are never read before later steps rewrite them (the rings' spare
    // rows keep them off the rows the window still reads), and the compressors' records are kept
    // exact for such a cut (cuda/compressor.h, "Rewind"). The caller checks.
    void rewind(int32_t slot, int64_t n_past);

    // Uploads the block-table rows changed since the last call (stream-ordered, from pinned memory).
    void sync_tables(CUstream_st* stream);

    // Kernel views of layer l's state.
    cuda::SlotArray ring(int64_t l) const;
    cuda::SlotArray comp_state(int64_t l) const;
    cuda::SlotArray idx_state(int64_t l) const;
    cuda::PagedRows comp_rows(int64_t l, int32_t dim) const;
    cuda::PagedRows idx_rows(int64_t l, int32_t dim) const;

    // The state of `slot` in the CPU reference's form (bf16 rows widened to f32). Synchronous.
    SequenceState download(const ModelConfig& c, int32_t slot) const;

private:
    ModelConfig cfg_;
    StateLayout L_;
    int64_t n_slots_ = 0, n_blocks_ = 0, max_len_ = 0, max_blocks_ = 0;
    cuda::DeviceBuffer slots_;               // [n_slots + 1] slot records
    cuda::DeviceBuffer blocks_;              // [n_blocks + 1] blocks
    cuda::DeviceBuffer table_;               // [n_slots + 1, max_blocks] int32
    int32_t* table_host_ = nullptr;          // pinned mirror
    std::vector<bool> dirty_;                // per slot row
    std::vector<int32_t> free_;              // free block ids (stack)
    struct Seq {
        bool open = false;
        int64_t n_past = 0;
        int64_t reserved = 0;                // positions reserved (blocks hold at least these)
        std::vector<int32_t> blocks;
    };
    std::vector<Seq> seqs_;
    std::vector<int32_t> refs_;              // [n_blocks + 1] holders of each block (sequences, snapshots)
    cuda::DeviceBuffer snaps_buf_;           // [n_snapshots] slot records
    cuda::DeviceBuffer backup_;              // [n_slots] slot records (rollback), or empty
    std::vector<int64_t> saved_at_;          // [n_slots] position of the backup (-1: none)
    std::vector<Seq> snaps_;                 // open = in use; n_past = its position; blocks shared
    void release(const std::vector<int32_t>& blocks);

public:
    ~StatePool();
    StatePool(const StatePool&) = delete;
    StatePool& operator=(const StatePool&) = delete;
};

}  // namespace megamoe::gpu
