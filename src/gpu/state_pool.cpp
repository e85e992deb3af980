// state_pool.cpp — slot records, the block pool and its tables (see state_pool.h).
#include "gpu/state_pool.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>

#include "core/common.h"
#include "cuda/compressor.h"
#include "io/formats.h"
#include "ref/speculative.h"

namespace megamoe::gpu {

namespace {

void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) fail("state pool: ", what, ": ", cudaGetErrorString(e));
}

int64_t round_up(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

// A verification step writes its drafts' positions into the rings; a rewind drops up to
// kMaxSpeculativeTokens of them without a copy (state_pool.h).
static_assert(StateLayout::kRingSpare >= kMaxSpeculativeTokens, "ring rows for the drafts a rewind drops");

}  // namespace

StateLayout StateLayout::make(const ModelConfig& c, int64_t block_tokens, bool with_mtp, bool kv_fp8) {
    StateLayout L;
    L.W = c.sliding_window;
    L.ring_rows = L.W + kRingSpare;
    L.hd = c.head_dim;
    L.dI = c.index_head_dim;
    if (kv_fp8 && !cuda::KvRow::fp8_fits(c.head_dim, c.qk_rope_head_dim))
        fail("state pool: an fp8 KV row needs head_dim - qk_rope_head_dim a multiple of 16 and qk_rope_head_dim of 8 "
             "(head_dim ", c.head_dim, ", qk_rope_head_dim ", c.qk_rope_head_dim, ")");
    L.kv = cuda::KvRow{static_cast<int32_t>(c.head_dim), static_cast<int32_t>(c.qk_rope_head_dim), kv_fp8};
    const int64_t kv_bytes = L.kv.bytes();
    L.block_tokens = block_tokens;
    int64_t slot = 0, block = 0;
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
        Layer ly;
        const AttnKind kind = c.attn_kind(l);
        ly.ratio = kind == AttnKind::sliding ? 0 : static_cast<int32_t>(c.ratio(l));
        ly.csa = kind == AttnKind::csa;
        ly.ring_off = slot;
        slot += round_up(L.ring_rows * kv_bytes, 256);
        if (kind != AttnKind::sliding) {
            if (block_tokens % ly.ratio)
                fail("state pool: block of ", block_tokens, " positions is not a multiple of layer ", l, "'s ratio ",
                     ly.ratio);
            ly.comp_off = slot;
            slot += round_up(cuda::compressor_state_bytes(ly.ratio, L.hd, kind == AttnKind::csa), 256);
            ly.rows_off = block;
            block += round_up(block_tokens / ly.ratio * kv_bytes, 256);
        }
        if (kind == AttnKind::csa) {
            ly.idx_off = slot;
            slot += round_up(cuda::compressor_state_bytes(ly.ratio, L.dI, true), 256);
            ly.idx_rows_off = block;
            block += round_up(block_tokens / ly.ratio * L.dI * 2, 256);
        }
        L.layers.push_back(ly);
    }
    L.main_bytes = slot;
    if (with_mtp) {   // the MTP block: a sliding-window layer
        Layer ly;
        ly.ring_off = slot;
        slot += round_up(L.ring_rows * kv_bytes, 256);
        L.layers.push_back(ly);
    }
    L.slot_bytes = std::max<int64_t>(slot, 256);
    L.block_bytes = block;
    return L;
}

bool StateLayout::rewind_exact(int64_t first, int64_t n) const {
    if (n <= 0) return true;
    if (n > kRingSpare) return false;   // the later ones' ring rows would overwrite rows the window reads
    for (const Layer& ly : layers) {
        if (ly.ratio == 0) continue;
        const int64_t w0 = first / ly.ratio, w1 = (first + n - 1) / ly.ratio;
        // Within first's window; or, for CSA's overlapping compressors (pending slots per window
        // parity, cuda/compressor.h), into the next one.
        if (w1 != w0 && !(ly.csa && w1 == w0 + 1)) return false;
    }
    return true;
}

StatePool::StatePool(const ModelConfig& c, const StateLayout& layout, int64_t n_slots, int64_t n_blocks,
                     int64_t max_len, int64_t n_snapshots, bool rollback)
    : cfg_(c), L_(layout), n_slots_(n_slots), n_blocks_(L_.block_bytes ? n_blocks : 0), max_len_(max_len) {
    MEGAMOE_CHECK(n_slots >= 1 && max_len >= 1, "state pool: ", n_slots, " slots, max length ", max_len);
    max_blocks_ = (max_len + L_.block_tokens - 1) / L_.block_tokens;
    slots_ = cuda::DeviceBuffer(static_cast<size_t>((n_slots + 1) * L_.slot_bytes), "sequence slots");
    blocks_ = cuda::DeviceBuffer(static_cast<size_t>((n_blocks_ + 1) * std::max<int64_t>(L_.block_bytes, 1)),
                                 "state block pool");
    const size_t table_bytes = static_cast<size_t>((n_slots + 1) * max_blocks_) * sizeof(int32_t);
    table_ = cuda::DeviceBuffer(table_bytes, "block tables");
    check(cudaMallocHost(reinterpret_cast<void**>(&table_host_), std::max<size_t>(table_bytes, 4)), "pinned block table");
    std::memset(table_host_, 0, table_bytes);   // every entry: the reserved block 0
    table_.upload(table_host_, table_bytes);
    // Slot records need no initialization (the compressor reads nothing it has not written), but
    // zeros keep downloads of unused state deterministic.
    slots_.fill(0);
    blocks_.fill(0);   // rows never written read as zeros (benchmarks that skip prefill)
    dirty_.assign(static_cast<size_t>(n_slots + 1), false);
    for (int64_t b = n_blocks_; b >= 1; --b) free_.push_back(static_cast<int32_t>(b));
    seqs_.resize(static_cast<size_t>(n_slots));
    refs_.assign(static_cast<size_t>(n_blocks_ + 1), 0);
    MEGAMOE_CHECK(n_snapshots >= 0, "state pool: ", n_snapshots, " snapshots");
    if (n_snapshots > 0) snaps_buf_ = cuda::DeviceBuffer(static_cast<size_t>(n_snapshots * L_.slot_bytes), "prefix snapshots");
    snaps_.resize(static_cast<size_t>(n_snapshots));
    if (rollback) backup_ = cuda::DeviceBuffer(static_cast<size_t>(n_slots * L_.slot_bytes), "rollback records");
    saved_at_.assign(static_cast<size_t>(n_slots), -1);
}

void StatePool::save(int32_t slot, CUstream_st* stream) {
    MEGAMOE_CHECK(is_open(slot), "state pool: slot ", slot, " is not open");
    MEGAMOE_CHECK(backup_.bytes() > 0, "state pool: rollback was not enabled (RunnerOptions::rollback)");
    check(cudaMemcpyAsync(backup_.as<char>() + static_cast<int64_t>(slot) * L_.slot_bytes,
                          slots_.as<char>() + static_cast<int64_t>(slot) * L_.slot_bytes,
                          static_cast<size_t>(L_.main_bytes), cudaMemcpyDeviceToDevice, stream),
          "rollback save");
    saved_at_[static_cast<size_t>(slot)] = seqs_[static_cast<size_t>(slot)].n_past;
}

void StatePool::restore(int32_t slot, int64_t n_past, CUstream_st* stream) {
    MEGAMOE_CHECK(is_open(slot), "state pool: slot ", slot, " is not open");
    const int64_t at = saved_at_[static_cast<size_t>(slot)];
    Seq& s = seqs_[static_cast<size_t>(slot)];
    MEGAMOE_CHECK(at >= 0, "state pool: slot ", slot, " has no saved state");
    MEGAMOE_CHECK(n_past == at, "state pool: slot ", slot, " was saved at position ", at, ", not ", n_past,
                  " (a restore goes back to the saved position)");
    MEGAMOE_CHECK(n_past <= s.n_past, "state pool: slot ", slot, " is at ", s.n_past, ", before ", n_past);
    check(cudaMemcpyAsync(slots_.as<char>() + static_cast<int64_t>(slot) * L_.slot_bytes,
                          backup_.as<char>() + static_cast<int64_t>(slot) * L_.slot_bytes,
                          static_cast<size_t>(L_.main_bytes), cudaMemcpyDeviceToDevice, stream),
          "rollback restore");
    s.n_past = n_past;
}

void StatePool::rewind(int32_t slot, int64_t n_past) {
    MEGAMOE_CHECK(is_open(slot), "state pool: slot ", slot, " is not open");
    Seq& s = seqs_[static_cast<size_t>(slot)];
    MEGAMOE_CHECK(n_past >= 0 && n_past <= s.n_past, "state pool: slot ", slot, " is at ", s.n_past,
                  ", cannot rewind to ", n_past);
    s.n_past = n_past;
}

void StatePool::release(const std::vector<int32_t>& blocks) {
    for (int32_t b : blocks) {
        MEGAMOE_CHECK(b >= 1 && b <= n_blocks_ && refs_[static_cast<size_t>(b)] > 0, "state pool: block ", b,
                      " released twice");
        if (--refs_[static_cast<size_t>(b)] == 0) free_.push_back(b);
    }
}

int32_t StatePool::snapshot(int32_t slot, CUstream_st* stream) {
    MEGAMOE_CHECK(is_open(slot), "state pool: slot ", slot, " is not open");
    const Seq& s = seqs_[static_cast<size_t>(slot)];
    MEGAMOE_CHECK(s.n_past > 0 && s.n_past % L_.block_tokens == 0, "state pool: a snapshot is taken at a multiple of ",
                  L_.block_tokens, " positions; slot ", slot, " is at ", s.n_past);
    for (size_t h = 0; h < snaps_.size(); ++h) {
        if (snaps_[h].open) continue;
        check(cudaMemcpyAsync(snaps_buf_.as<char>() + static_cast<int64_t>(h) * L_.slot_bytes,
                              slots_.as<char>() + static_cast<int64_t>(slot) * L_.slot_bytes,
                              static_cast<size_t>(L_.slot_bytes), cudaMemcpyDeviceToDevice, stream),
              "snapshot copy");
        Seq& snap = snaps_[h];
        snap.open = true;
        snap.n_past = snap.reserved = s.n_past;
        const size_t nb = L_.block_bytes ? static_cast<size_t>(s.n_past / L_.block_tokens) : 0;
        snap.blocks.assign(s.blocks.begin(), s.blocks.begin() + static_cast<long>(std::min(nb, s.blocks.size())));
        for (int32_t b : snap.blocks) ++refs_[static_cast<size_t>(b)];
        return static_cast<int32_t>(h);
    }
    return -1;
}

void StatePool::drop_snapshot(int32_t h) {
    if (h < 0 || h >= static_cast<int32_t>(snaps_.size()) || !snaps_[static_cast<size_t>(h)].open) return;
    release(snaps_[static_cast<size_t>(h)].blocks);
    snaps_[static_cast<size_t>(h)] = Seq{};
}

int32_t StatePool::open_from(int32_t h, CUstream_st* stream) {
    MEGAMOE_CHECK(h >= 0 && h < static_cast<int32_t>(snaps_.size()) && snaps_[static_cast<size_t>(h)].open,
                  "state pool: no snapshot ", h);
    const int32_t slot = open();
    if (slot < 0) return -1;
    const Seq& snap = snaps_[static_cast<size_t>(h)];
    check(cudaMemcpyAsync(slots_.as<char>() + static_cast<int64_t>(slot) * L_.slot_bytes,
                          snaps_buf_.as<char>() + static_cast<int64_t>(h) * L_.slot_bytes,
                          static_cast<size_t>(L_.slot_bytes), cudaMemcpyDeviceToDevice, stream),
          "snapshot restore");
    Seq& s = seqs_[static_cast<size_t>(slot)];
    s.n_past = s.reserved = snap.n_past;
    s.blocks = snap.blocks;
    int32_t* row = table_host_ + static_cast<int64_t>(slot) * max_blocks_;
    for (size_t i = 0; i < s.blocks.size(); ++i) {
        ++refs_[static_cast<size_t>(s.blocks[i])];
        row[i] = s.blocks[i];
    }
    dirty_[static_cast<size_t>(slot)] = true;
    return slot;
}

StatePool::~StatePool() {
    if (table_host_) (void)cudaFreeHost(table_host_);
}

int32_t StatePool::open() {
    for (size_t s = 0; s < seqs_.size(); ++s) {
        if (!seqs_[s].open) {
            seqs_[s] = Seq{};
            seqs_[s].open = true;
            saved_at_[s] = -1;
            return static_cast<int32_t>(s);
        }
    }
    return -1;
}

bool StatePool::is_open(int32_t slot) const {
    return slot >= 0 && slot < n_slots_ && seqs_[static_cast<size_t>(slot)].open;
}

void StatePool::close(int32_t slot) {
    if (!is_open(slot)) return;
    Seq& s = seqs_[static_cast<size_t>(slot)];
    release(s.blocks);
    int32_t* row = table_host_ + static_cast<int64_t>(slot) * max_blocks_;
    std::fill(row, row + max_blocks_, 0);
    dirty_[static_cast<size_t>(slot)] = true;
    s = Seq{};
    saved_at_[static_cast<size_t>(slot)] = -1;
}

bool StatePool::reserve(int32_t slot, int64_t n_tokens) {
    MEGAMOE_CHECK(is_open(slot), "state pool: slot ", slot, " is not open");
    if (n_tokens > max_len_) return false;
    Seq& s = seqs_[static_cast<size_t>(slot)];
    if (L_.block_bytes == 0) {
        s.reserved = std::max(s.reserved, n_tokens);
        return true;
    }
    const int64_t need = (n_tokens + L_.block_tokens - 1) / L_.block_tokens;
    const int64_t have = static_cast<int64_t>(s.blocks.size());
    if (need <= have) {
        s.reserved = std::max(s.reserved, n_tokens);
        return true;
    }
    if (need - have > static_cast<int64_t>(free_.size())) return false;
    int32_t* row = table_host_ + static_cast<int64_t>(slot) * max_blocks_;
    for (int64_t i = have; i < need; ++i) {
        const int32_t b = free_.back();
        free_.pop_back();
        refs_[static_cast<size_t>(b)] = 1;
        s.blocks.push_back(b);
        row[i] = b;
    }
    dirty_[static_cast<size_t>(slot)] = true;
    s.reserved = std::max(s.reserved, n_tokens);
    return true;
}

int64_t StatePool::reserved_tokens(int32_t slot) const {
    MEGAMOE_CHECK(is_open(slot), "state pool: slot ", slot, " is not open");
    return seqs_[static_cast<size_t>(slot)].reserved;
}

int64_t StatePool::n_past(int32_t slot) const {
    MEGAMOE_CHECK(is_open(slot), "state pool: slot ", slot, " is not open");
    return seqs_[static_cast<size_t>(slot)].n_past;
}

void StatePool::advance(int32_t slot, int64_t n) {
    MEGAMOE_CHECK(is_open(slot), "state pool: slot ", slot, " is not open");
    seqs_[static_cast<size_t>(slot)].n_past += n;
}

double StatePool::usage() const {
    if (n_blocks_ == 0) return 0;
    return static_cast<double>(n_blocks_ - static_cast<int64_t>(free_.size())) / static_cast<double>(n_blocks_);
}

void StatePool::sync_tables(CUstream_st* stream) {
    const size_t row_bytes = static_cast<size_t>(max_blocks_) * sizeof(int32_t);
    for (size_t s = 0; s < dirty_.size(); ++s) {
        if (!dirty_[s]) continue;
        check(cudaMemcpyAsync(table_.as<char>() + s * row_bytes, reinterpret_cast<char*>(table_host_) + s * row_bytes,
                              row_bytes, cudaMemcpyHostToDevice, stream),
              "block table upload");
        dirty_[s] = false;
    }
}

cuda::SlotArray StatePool::ring(int64_t l) const {
    return {slots_.as<char>() + L_.layers[static_cast<size_t>(l)].ring_off, L_.slot_bytes};
}

cuda::SlotArray StatePool::comp_state(int64_t l) const {
    const auto& ly = L_.layers[static_cast<size_t>(l)];
    MEGAMOE_CHECK(ly.comp_off >= 0, "state pool: layer ", l, " has no compressor");
    return {slots_.as<char>() + ly.comp_off, L_.slot_bytes};
}

cuda::SlotArray StatePool::idx_state(int64_t l) const {
    const auto& ly = L_.layers[static_cast<size_t>(l)];
    MEGAMOE_CHECK(ly.idx_off >= 0, "state pool: layer ", l, " has no indexer");
    return {slots_.as<char>() + ly.idx_off, L_.slot_bytes};
}

cuda::PagedRows StatePool::comp_rows(int64_t l, int32_t dim) const {
    const auto& ly = L_.layers[static_cast<size_t>(l)];
    MEGAMOE_CHECK(ly.rows_off >= 0, "state pool: layer ", l, " has no compressed rows");
    cuda::PagedRows r;
    r.pool = blocks_.get();
    r.block_bytes = L_.block_bytes;
    r.layer_offset = ly.rows_off;
    r.block_table = table_.as<int32_t>();
    r.max_blocks = static_cast<int32_t>(max_blocks_);
    r.block_tokens = static_cast<int32_t>(L_.block_tokens);
    r.ratio = ly.ratio;
    r.dim = dim;
    MEGAMOE_CHECK(dim == L_.kv.hd, "state pool: compressed rows of ", dim, " values, head_dim ", L_.kv.hd);
    r.row_bytes = L_.kv.bytes();
    return r;
}

cuda::PagedRows StatePool::idx_rows(int64_t l, int32_t dim) const {
    cuda::PagedRows r = comp_rows(l, static_cast<int32_t>(L_.kv.hd));
    const auto& ly = L_.layers[static_cast<size_t>(l)];
    MEGAMOE_CHECK(ly.idx_rows_off >= 0, "state pool: layer ", l, " has no indexer keys");
    r.layer_offset = ly.idx_rows_off;
    r.dim = dim;
    r.row_bytes = 0;   // bf16
    return r;
}

namespace {

std::vector<float> download_f32(const void* src, int64_t n) {
    std::vector<float> v(static_cast<size_t>(n));
    if (n) check(cudaMemcpy(v.data(), src, static_cast<size_t>(n) * 4, cudaMemcpyDeviceToHost), "download");
    return v;
}

std::vector<float> download_kv_row(const void* src, const cuda::KvRow& f) {
    std::vector<uint8_t> b(static_cast<size_t>(f.bytes()));
    check(cudaMemcpy(b.data(), src, b.size(), cudaMemcpyDeviceToHost), "download");
    std::vector<float> v(static_cast<size_t>(f.hd));
    cuda::kv_row_decode(f, b.data(), v.data());
    return v;
}

std::vector<float> download_bf16(const void* src, int64_t n) {
    std::vector<uint16_t> b(static_cast<size_t>(n));
    if (n) check(cudaMemcpy(b.data(), src, static_cast<size_t>(n) * 2, cudaMemcpyDeviceToHost), "download");
    std::vector<float> v(b.size());
    for (size_t i = 0; i < b.size(); ++i) v[i] = bf16_to_f32(b[i]);
    return v;
}

}  // namespace

SequenceState StatePool::download(const ModelConfig& c, int32_t slot) const {
    MEGAMOE_CHECK(is_open(slot), "state pool: slot ", slot, " is not open");
    SequenceState st(c);
    const int64_t n = n_past(slot);
    st.n_past = n;
    const int64_t W = L_.W, hd = L_.hd;
    const char* rec = slots_.as<char>() + static_cast<int64_t>(slot) * L_.slot_bytes;
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
        const auto& ly = L_.layers[static_cast<size_t>(l)];
        LayerState& ls = st.layers[static_cast<size_t>(l)];
        // The CPU keeps the last min(W - 1, n) rows in position order.
        ls.n_window = std::min(W - 1, n);
        for (int64_t p = n - ls.n_window; p < n; ++p) {
            const std::vector<float> row = download_kv_row(rec + ly.ring_off + (p % L_.ring_rows) * L_.kv.bytes(), L_.kv);
            ls.window.insert(ls.window.end(), row.begin(), row.end());
        }
        auto comp = [&](int64_t off, int64_t rows_off, int64_t d, bool overlap, bool kv_rows, CompressorState& cs) {
            const int64_t r = ly.ratio, width = (overlap ? 2 : 1) * d;
            const char* base = rec + off;
            cs.n_pending = n % r;
            // The open window's pending set (with overlap: the one of its parity; cuda/compressor.h).
            const char* pend = base + (overlap ? ((n / r) & 1) * 2 * r * width * 4 : 0);
            const std::vector<float> pk = download_f32(pend, cs.n_pending * width);
            const std::vector<float> pg = download_f32(pend + r * width * 4, cs.n_pending * width);
            cs.pending_kv = pk;
            cs.pending_gate = pg;
            if (overlap && n >= r) {   // series A of the last closed window, in its parity's buffer
                const char* prev = base + 4 * r * width * 4 + ((n / r - 1) & 1) * 2 * r * d * 4;
                cs.prev_kv = download_f32(prev, r * d);
                cs.prev_gate = download_f32(prev + r * d * 4, r * d);
            }
            cs.n_rows = n / r;
            const std::vector<int32_t>& blocks = seqs_[static_cast<size_t>(slot)].blocks;
            const int64_t per_block = L_.block_tokens / r;
            for (int64_t w = 0; w < cs.n_rows; ++w) {
                const int64_t b = blocks[static_cast<size_t>(w * r / L_.block_tokens)];
                const char* at = blocks_.as<char>() + b * L_.block_bytes + rows_off;
                const std::vector<float> row = kv_rows ? download_kv_row(at + (w % per_block) * L_.kv.bytes(), L_.kv)
                                                       : download_bf16(at + (w % per_block) * d * 2, d);
                cs.rows.insert(cs.rows.end(), row.begin(), row.end());
            }
        };
        if (ly.comp_off >= 0) comp(ly.comp_off, ly.rows_off, hd, ly.csa, true, ls.comp);
        if (ly.idx_off >= 0) comp(ly.idx_off, ly.idx_rows_off, L_.dI, true, false, ls.index_comp);
    }
    return st;
}

}  // namespace megamoe::gpu
