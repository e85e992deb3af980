// step.h — how the forward kernels see one step's batch and the per-sequence state: raw device
// pointers and strides, no model types. Host API; plain C++, compiles without the CUDA toolkit.
//
// A step runs T tokens in C chunks. A chunk is the new tokens of one sequence, contiguous in the
// batch, at consecutive positions: a whole prompt, part of one, or one decode token. Every
// sequence owns a *slot* (an index into the fixed-size per-sequence records: the window ring and
// the compressors' open windows) and a row of the *block table* (the pages that hold its
// compressed rows). The GPU runner (gpu/) fills these arrays; kernels only read them.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MEGAMOE_HD __host__ __device__ __forceinline__
#else
#define MEGAMOE_HD inline
#endif

namespace megamoe::cuda {

// The step's tokens (device arrays).
struct BatchView {
    int32_t        T = 0;                    // tokens
    int32_t        C = 0;                    // chunks
    const int32_t* pos = nullptr;            // [T] absolute position of each token
    const int32_t* slot = nullptr;           // [T] state slot of the token's sequence
    const int32_t* chunk = nullptr;          // [T] chunk of each token
    const int32_t* chunk_first = nullptr;    // [C] batch index of the chunk's first token (t0)
    const int32_t* chunk_len = nullptr;      // [C] tokens in the chunk (n ≥ 1)
};
// Within chunk c: token t0 + i sits at position pos[t0] + i. A chunk's keys at positions ≥ pos[t0]
// come from this step's buffers (row t0 + (q - pos[t0])); older ones from the sequence's state.

// A fixed-size record per slot: element e of slot s is at base + s·slot_stride + e (in bytes: the
// strides are byte counts; the element type is the kernel's).
struct SlotArray {
    void*   base = nullptr;
    int64_t slot_stride = 0;                 // bytes

    template <typename T> MEGAMOE_HD T* at(int32_t slot) const {
        return reinterpret_cast<T*>(static_cast<char*>(base) + static_cast<int64_t>(slot) * slot_stride);
    }
};

// The compressed rows (`dim` values, bf16 or kv_row.h's fp8 rows) of one layer, paged. Row w of
// the sequence in `slot` covers positions [w·ratio, (w+1)·ratio); it lives in the block that
// holds position w·ratio:
//   block = block_table[slot · max_blocks + (w · ratio) / block_tokens]
//   addr  = pool + block · block_bytes + layer_offset + (w mod rows_per_block) · stride()
// All offsets are 64-bit: pool sizes pass 2^31 bytes (an int32 block·stride overflow corrupted a
// paged indexer in another engine at long context).
struct PagedRows {
    void*          pool = nullptr;           // device base of the block pool (all layers)
    int64_t        block_bytes = 0;          // bytes per block
    int64_t        layer_offset = 0;         // bytes of this layer's rows inside a block
    const int32_t* block_table = nullptr;    // [slots, max_blocks]
    int32_t        max_blocks = 0;           // block-table row length
    int32_t        block_tokens = 0;         // positions per block (a multiple of ratio)
    int32_t        ratio = 0;                // positions per row (4 or 128 in the releases)
    int32_t        dim = 0;                  // values per row
    int32_t        row_bytes = 0;            // bytes per row; 0: dim · 2 (bf16)

    MEGAMOE_HD int32_t rows_per_block() const { return block_tokens / ratio; }
    MEGAMOE_HD int64_t stride() const { return row_bytes ? row_bytes : static_cast<int64_t>(dim) * 2; }
    template <typename T> MEGAMOE_HD T* row(int32_t slot, int64_t w) const {
        const int64_t p = w * ratio;
        const int64_t block = block_table[static_cast<int64_t>(slot) * max_blocks + p / block_tokens];
        return reinterpret_cast<T*>(static_cast<char*>(pool) + block * block_bytes + layer_offset +
                                    (w % rows_per_block()) * stride());
    }
};

// Rotary table of one layer kind (ref::RopeTable on the device): rotate the last `rope_dim` dims
// of each head, pair i by angle = float(pos) · inv_freq[i] (an f32 product, then f32 cos/sin, as
// the CPU twin computes it).
struct RopeView {
    const float* inv_freq = nullptr;         // [rope_dim / 2] device
    int32_t      rope_dim = 0;
};

}  // namespace megamoe::cuda
