// compressor_test.cpp — the GPU compressors and window ring (src/cuda/compressor.h) against the
// CPU specification: compressor_feed (ref/compressor.h) for the rows and the state, the last W
// positions of the sequence for the ring.
//
// Every case drives three sequences (in slots 3, 0 and 4 of 5) through a schedule of steps; each
// step is one batch of chunks (one per sequence present), run as compressor_emit then
// compressor_save on the GPU and as compressor_feed per chunk on the CPU. After every step:
//   - every emitted row (bf16, paged, shuffled block table, the layer's rows between other
//     bytes of the block) against the CPU's f32 row, tolerance below;
//   - every other byte of the pool is still the 0xFF poison (no row that no token closed was
//     written, nothing outside the layer's rows, spare blocks untouched);
//   - the pending slots s < n_past mod r and prev (overlap, once n_past ≥ r) equal the CPU's
//     pending_* / prev_* bit for bit (they are copies and one f32 add of ape, the same add);
//     the state records start as NaN poison, so a row that read an unwritten slot would be NaN;
//     the guard bytes after each record and the records of unused slots stay poison.
// Inputs depend only on (sequence, position), never on the chunking.
//
// Row tolerance. The GPU pools in f32 (expf, f32 sums) where the CPU sums in double, then
// normalizes and rotates as the CPU does and rounds to bf16 (RNE). Per element f of a row with
// norm weights w (|w| ≤ wmax):
//   bf16 rounding: ≤ 2^-8·|y_gpu| (8 significant bits);
//   pooling: |Δpool_f| ≤ (n + 6)·2^-24·max_s|kv_s,f| (n ≤ 2r slot terms, expf within 2 ulp), which
//   the norm scales by |w_f|/rms(pool); with kv ~ U(-1,1)·scale the ratio max|kv|/rms(pool) is at
//   most about sqrt(3·n) ≈ 20 for n = 128 (a uniform softmax), so |Δy_f| ≤ 134·2^-24·20·wmax
//   ≈ 1.6e-4·wmax, twice that after RoPE mixes a pair; the f32 sum of squares moves all values by
//   a relative d·2^-24 ≤ 4e-5; cosf / sinf are within 2 ulp of the CPU's.
// So |bf16(y_gpu) − y_cpu| ≤ 2^-8·|y_cpu| + 2^-11·wmax (4.9e-4·wmax, 1.5× the worst-case
// alignment of every f32 error above; the typical f32 error is ~100× smaller). A wrong slot, a
// missing ape, a wrong rotation position or a stale state value all move elements by O(0.1·wmax).
//
// Official numerics (Numerics::official, compressor_feed's roundings): see the comment above
// OfficialSpec — bit for bit where the pool is exact, counted and bounded where cosf / sinf or the
// f32 pool move a bf16 rounding.
//
// Also: window_write against the last W positions (bit for bit, rows not yet reached still
// poison), determinism (two runs, same bytes), and a CUDA graph of one decode step (emit, save,
// window) replayed with new inputs equal to eager runs. CPU tests (run everywhere): the chunking
// invariance of compressor_feed over the same schedules (the property the GPU relies on: a row
// depends only on the sequence's values), and the state record sizes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "core/common.h"
#include "cuda/compressor.h"
#include "cuda/kv_row.h"
#include "cuda/step.h"
#include "io/formats.h"   // bf16_to_f32, f32_to_bf16
#include "ref/compressor.h"
#include "ref/ops.h"

#ifdef MEGAMOE_HAVE_CUDA
#include <cuda_runtime.h>

#include "cuda/buffer.h"
#include "cuda/linear.h"   // gpu_available, CUDA_CHECK
#endif

namespace megamoe {
namespace {

// ---------------------------------------------------------------- shapes and schedules

struct Spec {
    const char* name;
    int r, d;                 // ratio, row width
    bool overlap;
    int rope;                 // rope_dim (the last features of the row)
    int block_tokens;         // positions per pool block (a multiple of r)
};

int width_of(const Spec& s) { return (s.overlap ? 2 : 1) * s.d; }

// V4-Flash: the attention compressors of CSA and HCA layers and the indexer's compressor.
const Spec kFlash[] = {
    {"flash_csa", 4, 512, true, 64, 256},
    {"flash_hca", 128, 512, false, 64, 256},
    {"flash_indexer", 4, 128, true, 64, 64},
};
// The tiny test model (head_dim 64, rope 16, index_head_dim 32).
const Spec kTiny[] = {
    {"tiny_csa", 4, 64, true, 16, 64},
    {"tiny_hca", 16, 64, false, 16, 64},
    {"tiny_indexer", 4, 32, true, 16, 64},
};
// Odd shapes: every token closes a window (r = 1, the whole row rotated), overlap at other
// ratios, no RoPE, d/2 not a multiple of 32, d > 512 (a thread owns two pairs), small blocks.
const Spec kOdd[] = {
    {"r1_all_rope", 1, 16, false, 16, 4},
    {"r6_overlap", 6, 40, true, 8, 12},
    {"r5_no_rope", 5, 34, false, 0, 20},
    {"r32_d600", 32, 600, false, 64, 64},
    {"r2_overlap_d6", 2, 6, true, 2, 2},
};

struct Chunk {
    int seq;                  // 0, 1, 2
    int n;                    // new tokens
};
using Step = std::vector<Chunk>;
using Schedule = std::vector<Step>;
struct SchedCase {
    std::string name;
    Schedule steps;
};

constexpr int kSeqs = 3;
constexpr int kSlots = 5;
constexpr int kSlotOf[kSeqs] = {3, 0, 4};

// The schedules, scaled by the ratio r (window size W for the ring tests).
std::vector<SchedCase> schedules(int r) {
    std::vector<SchedCase> out;
    out.push_back({"prefill", {{{0, 5 * r + 3}}}});
    {
        Schedule s;
        const int lens[4] = {1, 3, 5, 37};
        for (int i = 0, total = 0; total < 4 * r + 2; ++i) {
            s.push_back({{0, lens[i % 4]}});
            total += lens[i % 4];
        }
        out.push_back({"chunks_1_3_5_37", s});
    }
    {
        Schedule s{{{0, std::max(1, 3 * r - 3)}}};
        const int decodes = r <= 16 ? r + 4 : 8;
        for (int i = 0; i < decodes; ++i) s.push_back({{0, 1}});
        out.push_back({"prefill_decode", s});
    }
    out.push_back({"multi_seq",
                   {{{0, 37}, {1, 5}},
                    {{0, 1}, {1, 2 * r + 1}},
                    {{1, 1}, {0, 3}},
                    {{2, 2}, {0, r + 2}, {1, 1}},
                    {{2, 1}, {0, 1}, {1, 1}},
                    {{1, 3}, {2, 2 * r}, {0, 5}}}});
    out.push_back({"short",
                   {{{0, 1}},
                    {{1, 2}, {0, 1}},
                    {{0, 1}, {2, 1}},
                    {{1, 1}, {2, std::max(1, r - 2)}},
                    {{0, 1}, {1, 1}, {2, 1}}}});
    return out;
}

// ---------------------------------------------------------------- inputs

// A value stream keyed by (seed, sequence, position): the same token gets the same values in any
// schedule.
struct TokenRng {
    uint64_t s;
    TokenRng(uint64_t seed, int seq, int64_t pos)
        : s(seed * 0x9E3779B97F4A7C15ull ^ (static_cast<uint64_t>(seq) << 48) ^ static_cast<uint64_t>(pos)) {
        next();
        next();
    }
    uint64_t next() {   // splitmix64
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    float uniform() { return static_cast<float>(next() >> 40) * 0x1p-24f * 2.0f - 1.0f; }   // [-1, 1)
    float normal() {   // Box-Muller
        const float u1 = std::max(static_cast<float>(next() >> 40) * 0x1p-24f, 1e-7f);
        const float u2 = static_cast<float>(next() >> 40) * 0x1p-24f;
        return std::sqrt(-2.0f * std::log(u1)) * std::cos(6.2831853f * u2);
    }
};

// kv ~ U(-1, 1)·scale (scales differ per sequence), gate ~ N(0, 2).
constexpr float kSeqScale[kSeqs] = {1.0f, 8.0f, 0.05f};
// Grid inputs (make_inputs' `grid`): kv = a multiple of 2^-10 in [-1, 1] times a power of two per
// sequence, gate = 0 (with ape = 0 every slot weighs e^0 = 1 on both sides, so the pool is the mean
// Σkv / n, an exact f32 sum; see the official numerics tests).
constexpr float kGridScale[kSeqs] = {1.0f, 8.0f, 0.0625f};

// One step's batch on the host.
struct StepInput {
    int T = 0, C = 0;
    std::vector<float> kv, gate;                  // [T, width] f32
    std::vector<uint16_t> kv_bf16;                // [T, hd] for the ring tests
    std::vector<int32_t> pos, slot, chunk, chunk_first, chunk_len;
    std::vector<int64_t> pos64;                   // for compressor_feed
    std::vector<int> seq_of_chunk;
};

// The batches of a schedule: width f32 features (compressor) or hd bf16 (ring; width 0).
std::vector<StepInput> make_inputs(const Schedule& sched, int width, int hd, uint64_t seed, int64_t* max_len,
                                   bool grid = false) {
    std::vector<StepInput> out;
    int64_t n_past[kSeqs] = {0, 0, 0};
    for (const Step& step : sched) {
        StepInput in;
        for (const Chunk& ch : step) {
            const int c = in.C++;
            in.chunk_first.push_back(in.T);
            in.chunk_len.push_back(ch.n);
            in.seq_of_chunk.push_back(ch.seq);
            for (int i = 0; i < ch.n; ++i) {
                const int64_t p = n_past[ch.seq] + i;
                in.pos.push_back(static_cast<int32_t>(p));
                in.pos64.push_back(p);
                in.slot.push_back(kSlotOf[ch.seq]);
                in.chunk.push_back(c);
                TokenRng rng(seed, ch.seq, p);
                for (int f = 0; f < width; ++f)
                    in.kv.push_back(grid ? std::round(rng.uniform() * 1024.0f) * 0x1p-10f * kGridScale[ch.seq]
                                         : rng.uniform() * kSeqScale[ch.seq]);
                for (int f = 0; f < width; ++f) in.gate.push_back(grid ? 0.0f : 2.0f * rng.normal());
                for (int f = 0; f < hd; ++f) in.kv_bf16.push_back(f32_to_bf16(rng.normal()));
                ++in.T;
            }
            n_past[ch.seq] += ch.n;
        }
        out.push_back(std::move(in));
    }
    *max_len = *std::max_element(n_past, n_past + kSeqs);
    return out;
}

// The compressor's weights as compressor_feed reads them. Not copyable (w views the vectors).
struct HostComp {
    Spec spec;
    int width;
    std::vector<float> ape;                       // [r, width] f32
    std::vector<uint16_t> norm;                   // [d] bf16
    Compressor w;
    ModelConfig cfg;
    ops::RopeTable rope;
    float wmax = 0;                               // max |norm weight|
    Numerics nm = Numerics::exact;                // the rows' numerics (both sides)
    bool indexer_keys = false;                    // the indexer's compressor (official rounding)

    HostComp(const Spec& s, uint64_t seed) : spec(s), width(width_of(s)) {
        TokenRng rng(seed, 99, -1);
        ape.resize(static_cast<size_t>(s.r) * static_cast<size_t>(width));
        for (float& v : ape) v = 0.5f * rng.normal();
        norm.resize(static_cast<size_t>(s.d));
        for (uint16_t& v : norm) {
            v = f32_to_bf16(1.0f + 0.5f * rng.uniform());   // [0.5, 1.5]
            wmax = std::max(wmax, std::fabs(bf16_to_f32(v)));
        }
        w.ratio = s.r;
        w.dim = s.d;
        w.overlap = s.overlap;
        w.ape = Tensor(ape.data(), DType::f32, {s.r, width});
        w.norm = Tensor(norm.data(), DType::bf16, {s.d});
        cfg.rms_norm_eps = 1e-6;
        YarnConfig yarn;   // V4's compressed-layer table: base 160000, YaRN factor 16 from 65536
        yarn.factor = 16;
        yarn.original_max_position_embeddings = 65536;
        rope = ops::make_rope_table(160000.0, s.rope, &yarn);
    }
    HostComp(const HostComp&) = delete;
    HostComp& operator=(const HostComp&) = delete;
};

// Runs compressor_feed for every chunk of a step.
void cpu_step(const HostComp& hc, const StepInput& in, std::vector<CompressorState>& cpu) {
    for (int c = 0; c < in.C; ++c) {
        const size_t t0 = static_cast<size_t>(in.chunk_first[static_cast<size_t>(c)]);
        const size_t off = t0 * static_cast<size_t>(hc.width);
        compressor_feed(hc.w, hc.cfg, hc.rope, hc.indexer_keys, in.kv.data() + off, in.gate.data() + off,
                        in.pos64.data() + t0, in.chunk_len[static_cast<size_t>(c)],
                        cpu[static_cast<size_t>(in.seq_of_chunk[static_cast<size_t>(c)])], hc.nm);
    }
}

// ---------------------------------------------------------------- the paged pool and the state

struct PoolLayout {
    int max_blocks = 0, block_tokens = 0, n_blocks = 0;
    int64_t block_bytes = 0, layer_offset = 0;
    int32_t row_bytes = 0;                        // bytes per row; 0: bf16 (d · 2)
    std::vector<int32_t> table;                   // [kSlots, max_blocks], a shuffled permutation
    int64_t state_bytes = 0, state_stride = 0;    // record bytes, record stride (guard bytes after)
    size_t pool_size() const { return static_cast<size_t>(n_blocks) * static_cast<size_t>(block_bytes); }
    size_t state_size() const { return static_cast<size_t>(kSlots) * static_cast<size_t>(state_stride); }
};

PoolLayout make_layout(const Spec& s, int64_t max_len, uint64_t seed, int32_t row_bytes = 0) {
    PoolLayout L;
    L.block_tokens = s.block_tokens;
    L.max_blocks = static_cast<int>((max_len + s.block_tokens - 1) / s.block_tokens) + 1;
    L.n_blocks = kSlots * L.max_blocks + 3;       // 3 spare blocks nobody owns
    L.layer_offset = 512;                         // another layer's rows before this one's ...
    L.row_bytes = row_bytes;
    L.block_bytes = L.layer_offset + static_cast<int64_t>(s.block_tokens / s.r) * (row_bytes ? row_bytes : s.d * 2) +
                    256;   // ... and after
    std::vector<int32_t> perm(static_cast<size_t>(L.n_blocks));
    std::iota(perm.begin(), perm.end(), 0);
    std::mt19937 rng(static_cast<uint32_t>(seed));
    std::shuffle(perm.begin(), perm.end(), rng);
    L.table.assign(perm.begin(), perm.begin() + kSlots * L.max_blocks);
#ifdef MEGAMOE_HAVE_CUDA
    L.state_bytes = cuda::compressor_state_bytes(s.r, s.d, s.overlap);
#else
    L.state_bytes = 4 * ((s.overlap ? 4 : 2) * int64_t{s.r} * width_of(s) + (s.overlap ? 4 * int64_t{s.r} * s.d : 0));
#endif
    L.state_stride = (L.state_bytes + 7) / 8 * 8 + 64;   // 64 guard bytes
    return L;
}

// The host view of the pool with the same addressing as the kernels (PagedRows::row is host code too).
cuda::PagedRows host_rows(const Spec& s, const PoolLayout& L, uint8_t* pool) {
    cuda::PagedRows rows;
    rows.pool = pool;
    rows.block_bytes = L.block_bytes;
    rows.layer_offset = L.layer_offset;
    rows.block_table = L.table.data();
    rows.max_blocks = L.max_blocks;
    rows.block_tokens = L.block_tokens;
    rows.ratio = s.r;
    rows.dim = s.d;
    rows.row_bytes = L.row_bytes;
    return rows;
}

constexpr int kMaxReports = 8;
double g_worst_ratio = 0;   // the largest |gpu − cpu| / tol seen by check_pool (printed per shape)

// Rows: within tolerance where emitted, poison everywhere else.
void check_pool(const HostComp& hc, const PoolLayout& L, std::vector<uint8_t>& pool,
                const std::vector<CompressorState>& cpu) {
    const Spec& s = hc.spec;
    ASSERT_EQ(pool.size(), L.pool_size());
    const cuda::PagedRows rows = host_rows(s, L, pool.data());
    std::vector<char> written(pool.size(), 0);
    int bad = 0;
    const float floor = std::ldexp(hc.wmax, -11);
    for (int q = 0; q < kSeqs; ++q) {
        const CompressorState& st = cpu[static_cast<size_t>(q)];
        ASSERT_EQ(static_cast<int64_t>(st.rows.size()), st.n_rows * s.d);
        for (int64_t w = 0; w < st.n_rows; ++w) {
            const uint16_t* g = rows.row<uint16_t>(kSlotOf[q], w);
            const size_t at = static_cast<size_t>(reinterpret_cast<const uint8_t*>(g) - pool.data());
            std::fill_n(written.begin() + static_cast<std::ptrdiff_t>(at), 2 * s.d, 1);
            for (int f = 0; f < s.d; ++f) {
                const float want = st.rows[static_cast<size_t>(w * s.d + f)];
                const float got = bf16_to_f32(g[f]);
                const float tol = std::ldexp(std::fabs(want), -8) + floor;
                g_worst_ratio = std::max(g_worst_ratio, static_cast<double>(std::fabs(got - want) / tol));
                if (!(std::fabs(got - want) <= tol) && bad++ < kMaxReports)
                    ADD_FAILURE() << "seq " << q << " row " << w << " feature " << f << ": gpu " << got << ", cpu "
                                  << want << ", tol " << tol;
            }
        }
    }
    for (size_t i = 0; i < pool.size(); ++i)
        if (!written[i] && pool[i] != 0xFF && bad++ < kMaxReports)
            ADD_FAILURE() << "pool byte " << i << " (block " << i / static_cast<size_t>(L.block_bytes) << ", offset "
                          << i % static_cast<size_t>(L.block_bytes) << ") written but no emitted row lives there";
    EXPECT_EQ(bad, 0) << "bad pool elements";
}

// First index where two f32 arrays differ in bits, or -1.
int64_t first_bit_mismatch(const float* a, const float* b, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
        if (std::memcmp(a + i, b + i, 4) != 0) return i;
    return -1;
}

// pending / prev bit for bit against the CPU's; guards and unused records still poison.
[[maybe_unused]] void check_state(const HostComp& hc, const PoolLayout& L, const std::vector<uint8_t>& state,
                 const std::vector<CompressorState>& cpu, const int64_t* n_past) {
    const Spec& s = hc.spec;
    const int64_t r = s.r, d = s.d, width = hc.width;
    ASSERT_EQ(state.size(), L.state_size());
    for (int slot = 0; slot < kSlots; ++slot) {
        const uint8_t* rec = state.data() + static_cast<size_t>(slot) * static_cast<size_t>(L.state_stride);
        const int q = static_cast<int>(std::find(kSlotOf, kSlotOf + kSeqs, slot) - kSlotOf);
        const bool used = q < kSeqs && n_past[q] > 0;
        const int64_t from = used ? L.state_bytes : 0;   // unused records: poison throughout
        for (int64_t i = from; i < L.state_stride; ++i)
            if (rec[i] != 0xFF) {
                ADD_FAILURE() << "slot " << slot << " state byte " << i << " written (record is " << L.state_bytes
                              << " bytes" << (used ? "" : ", slot unused") << ")";
                break;
            }
        if (!used) continue;
        const CompressorState& st = cpu[static_cast<size_t>(q)];
        const int64_t n_pending = n_past[q] % r;
        ASSERT_EQ(st.n_pending, n_pending);
        const float* f = reinterpret_cast<const float*>(rec);
        // The open window's pending set: with overlap, the one of its parity (compressor.h).
        const float* pend_kv = f + (s.overlap ? ((n_past[q] / r) & 1) * 2 * r * width : 0);
        const float* pend_gate = pend_kv + r * width;
        EXPECT_EQ(first_bit_mismatch(pend_kv, st.pending_kv.data(), n_pending * width), -1)
            << "seq " << q << " pending_kv (" << n_pending << " slots)";
        const int64_t gm = first_bit_mismatch(pend_gate, st.pending_gate.data(), n_pending * width);
        EXPECT_EQ(gm, -1) << "seq " << q << " pending_gate (" << n_pending << " slots)"
                          << (gm >= 0 ? str(": got ", pend_gate[gm], ", want ", st.pending_gate[static_cast<size_t>(gm)])
                                      : std::string());
        if (s.overlap && n_past[q] >= r) {   // the last closed window's series A, in its parity's buffer
            ASSERT_EQ(static_cast<int64_t>(st.prev_kv.size()), r * d);
            const float* prev = f + 4 * r * width + ((n_past[q] / r - 1) & 1) * 2 * r * d;
            EXPECT_EQ(first_bit_mismatch(prev, st.prev_kv.data(), r * d), -1) << "seq " << q << " prev_kv";
            EXPECT_EQ(first_bit_mismatch(prev + r * d, st.prev_gate.data(), r * d), -1) << "seq " << q << " prev_gate";
        }
    }
}

// A backend runs one step (emit then save) and hands back the pool and the state bytes.
// run_case drives a schedule through it and checks after every step.
template <typename Backend>
void run_case(const Spec& spec, const SchedCase& sc, uint64_t seed, bool past_2gib = false) {
    SCOPED_TRACE(str(spec.name, " / ", sc.name));
    const HostComp hc(spec, seed);
    int64_t max_len = 0;
    const std::vector<StepInput> inputs = make_inputs(sc.steps, hc.width, 0, seed, &max_len);
    const PoolLayout L = make_layout(spec, max_len, seed);
    int max_T = 0, max_C = 0;
    for (const StepInput& in : inputs) max_T = std::max(max_T, in.T), max_C = std::max(max_C, in.C);
    Backend gpu(hc, L, max_T, max_C, past_2gib);
    std::vector<CompressorState> cpu(kSeqs);
    int64_t n_past[kSeqs] = {0, 0, 0};
    for (size_t k = 0; k < inputs.size(); ++k) {
        SCOPED_TRACE(str("step ", k, " (T ", inputs[k].T, ", C ", inputs[k].C, ")"));
        const StepInput& in = inputs[k];
        cpu_step(hc, in, cpu);
        for (int c = 0; c < in.C; ++c) n_past[in.seq_of_chunk[static_cast<size_t>(c)]] += in.chunk_len[static_cast<size_t>(c)];
        gpu.step(in);
        std::vector<uint8_t> pool = gpu.pool_bytes();
        check_pool(hc, L, pool, cpu);
        check_state(hc, L, gpu.state_bytes(), cpu, n_past);
        if (::testing::Test::HasFailure()) return;
    }
}

// The ring: the last min(W, n_past) positions bit for bit, rows not reached yet and the guard
// bytes still poison. With rope ≥ 0 the rows are kv_row.h fp8 rows, byte for byte the host
// encoder's (kv_row_encode) of the random bf16 rows.
struct RingSpec {
    const char* name;
    int hd, W;
    int rope = -1;   // ≥ 0: fp8 rows with this many rope dims
};
const RingSpec kRings[] = {{"flash", 512, 128}, {"tiny", 64, 8}, {"odd_hd13", 13, 5}, {"W1", 8, 1}};
const RingSpec kFp8Rings[] = {
    {"flash_fp8", 512, 128, 64}, {"tiny_fp8", 64, 8, 16}, {"hd128_fp8", 128, 5, 64}, {"no_rope_fp8", 80, 3, 0}};

cuda::KvRow ring_format(const RingSpec& s) { return cuda::KvRow{s.hd, std::max(s.rope, 0), s.rope >= 0}; }
int64_t ring_row_bytes(const RingSpec& s) { return ring_format(s).bytes(); }
int64_t ring_stride(const RingSpec& s) { return (int64_t{s.W} * ring_row_bytes(s) + 15) / 16 * 16 + 16; }

[[maybe_unused]] void check_ring(const RingSpec& rs, const std::vector<uint8_t>& ring, const std::vector<std::vector<uint16_t>>& hist,
                const int64_t* n_past) {
    const int64_t stride = ring_stride(rs), hd = rs.hd, W = rs.W, rb = ring_row_bytes(rs);
    const cuda::KvRow fmt = ring_format(rs);
    ASSERT_EQ(ring.size(), static_cast<size_t>(kSlots * stride));
    int bad = 0;
    std::vector<float> vals(static_cast<size_t>(hd));
    std::vector<uint8_t> want(static_cast<size_t>(rb));
    for (int slot = 0; slot < kSlots; ++slot) {
        const uint8_t* rec = ring.data() + slot * stride;
        const int q = static_cast<int>(std::find(kSlotOf, kSlotOf + kSeqs, slot) - kSlotOf);
        const int64_t n = q < kSeqs ? n_past[q] : 0;
        std::vector<char> written(static_cast<size_t>(stride), 0);
        for (int64_t p = std::max<int64_t>(0, n - W); p < n; ++p) {
            const int64_t at = (p % W) * rb;
            std::fill_n(written.begin() + at, rb, 1);
            const uint16_t* row = hist[static_cast<size_t>(q)].data() + p * hd;
            for (int64_t i = 0; i < hd; ++i) vals[static_cast<size_t>(i)] = bf16_to_f32(row[i]);
            cuda::kv_row_encode(fmt, vals.data(), want.data());
            if (std::memcmp(rec + at, want.data(), static_cast<size_t>(rb)) != 0 && bad++ < kMaxReports)
                ADD_FAILURE() << "seq " << q << " position " << p << " (ring row " << p % W << ") differs";
        }
        for (int64_t i = 0; i < stride; ++i)
            if (!written[static_cast<size_t>(i)] && rec[i] != 0xFF && bad++ < kMaxReports)
                ADD_FAILURE() << "slot " << slot << " ring byte " << i << " written (n_past " << n << ")";
    }
    EXPECT_EQ(bad, 0);
}

template <typename RingBackend>
void run_ring_case(const RingSpec& rs, const SchedCase& sc, uint64_t seed) {
    SCOPED_TRACE(str(rs.name, " / ", sc.name));
    int64_t max_len = 0;
    const std::vector<StepInput> inputs = make_inputs(sc.steps, 0, rs.hd, seed, &max_len);
    int max_T = 0;
    for (const StepInput& in : inputs) max_T = std::max(max_T, in.T);
    RingBackend gpu(rs.hd, rs.W, ring_stride(rs), max_T);
    gpu.fmt = ring_format(rs);
    std::vector<std::vector<uint16_t>> hist(kSeqs);
    int64_t n_past[kSeqs] = {0, 0, 0};
    for (size_t k = 0; k < inputs.size(); ++k) {
        SCOPED_TRACE(str("step ", k));
        const StepInput& in = inputs[k];
        for (int t = 0; t < in.T; ++t) {
            const int q = in.seq_of_chunk[static_cast<size_t>(in.chunk[static_cast<size_t>(t)])];
            hist[static_cast<size_t>(q)].insert(hist[static_cast<size_t>(q)].end(), in.kv_bf16.begin() + t * rs.hd,
                                                in.kv_bf16.begin() + (t + 1) * rs.hd);
            ++n_past[q];
        }
        gpu.step(in);
        check_ring(rs, gpu.ring_bytes(), hist, n_past);
        if (::testing::Test::HasFailure()) return;
    }
}

// Every schedule for every shape of a group.
template <typename Backend>
void run_group(const Spec* specs, size_t n, uint64_t seed) {
    for (size_t i = 0; i < n; ++i) {
        g_worst_ratio = 0;
        for (const SchedCase& sc : schedules(specs[i].r)) {
            run_case<Backend>(specs[i], sc, seed + i);
            if (::testing::Test::HasFailure()) return;
        }
        std::printf("[     INFO ] %s: worst row |gpu - cpu| / tol = %.3g\n", specs[i].name, g_worst_ratio);
    }
}

// ---------------------------------------------------------------- CPU tests (run everywhere)

// The property the GPU's fixed slots rely on: compressor_feed gives the same rows and state in
// every chunking (here: each schedule against one prefill of the same per-sequence tokens).
TEST(CompressorCpu, FeedIsChunkingInvariant) {
    for (const Spec* group : {kFlash, kTiny, kOdd}) {
        const size_t count = group == kOdd ? std::size(kOdd) : 3;
        for (size_t i = 0; i < count; ++i) {
            const Spec& spec = group[i];
            const HostComp hc(spec, 7);
            for (const SchedCase& sc : schedules(spec.r)) {
                SCOPED_TRACE(str(spec.name, " / ", sc.name));
                int64_t max_len = 0;
                std::vector<CompressorState> chunked(kSeqs), whole(kSeqs);
                for (const StepInput& in : make_inputs(sc.steps, hc.width, 0, 7, &max_len)) cpu_step(hc, in, chunked);
                for (int q = 0; q < kSeqs; ++q) {
                    int64_t n = 0;
                    for (const Step& st : sc.steps)
                        for (const Chunk& ch : st) n += ch.seq == q ? ch.n : 0;
                    if (n == 0) continue;
                    const std::vector<StepInput> one = make_inputs({{{q, static_cast<int>(n)}}}, hc.width, 0, 7, &max_len);
                    std::vector<CompressorState> tmp(kSeqs);
                    cpu_step(hc, one[0], tmp);
                    whole[static_cast<size_t>(q)] = tmp[static_cast<size_t>(q)];
                    const CompressorState &a = chunked[static_cast<size_t>(q)], &b = whole[static_cast<size_t>(q)];
                    EXPECT_EQ(a.n_rows, n / spec.r);
                    EXPECT_EQ(a.n_rows, b.n_rows);
                    EXPECT_EQ(a.n_pending, b.n_pending);
                    EXPECT_TRUE(a.rows == b.rows) << "seq " << q << " rows";
                    EXPECT_TRUE(a.pending_kv == b.pending_kv && a.pending_gate == b.pending_gate) << "seq " << q;
                    EXPECT_TRUE(a.prev_kv == b.prev_kv && a.prev_gate == b.prev_gate) << "seq " << q;
                }
            }
        }
    }
}

#ifdef MEGAMOE_HAVE_CUDA

TEST(CompressorCpu, StateRecordBytes) {
    // pending kv + gate [r, width] (with overlap one set per window parity), then prev kv + gate
    // [r, d] per window parity with overlap; f32.
    EXPECT_EQ(cuda::compressor_state_bytes(4, 512, true), 4 * (4 * 4 * 1024 + 4 * 4 * 512));     // 96 KiB (CSA)
    EXPECT_EQ(cuda::compressor_state_bytes(128, 512, false), 4 * (2 * 128 * 512));               // 512 KiB (HCA)
    EXPECT_EQ(cuda::compressor_state_bytes(4, 128, true), 4 * (4 * 4 * 256 + 4 * 4 * 128));     // indexer
    EXPECT_EQ(cuda::compressor_state_bytes(16, 64, false), 4 * (2 * 16 * 64));
}

// ---------------------------------------------------------------- GPU backends

#define SKIP_WITHOUT_GPU() \
    if (!cuda::gpu_available()) GTEST_SKIP() << "no CUDA device"

using cuda::DeviceArray;

struct Stream {
    cudaStream_t s = nullptr;
    Stream() { CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
    ~Stream() { (void)cudaStreamDestroy(s); }
    Stream(const Stream&) = delete;
    Stream& operator=(const Stream&) = delete;
};

// The step's batch arrays on the device, sized for max_T tokens / max_C chunks (so a graph
// captured over them can be replayed with new contents).
struct DeviceBatch {
    DeviceArray<int32_t> pos, slot, chunk, chunk_first, chunk_len;
    int T = 0, C = 0;
    DeviceBatch(int max_T, int max_C)
        : pos(static_cast<size_t>(max_T)), slot(static_cast<size_t>(max_T)), chunk(static_cast<size_t>(max_T)),
          chunk_first(static_cast<size_t>(max_C)), chunk_len(static_cast<size_t>(max_C)) {}
    void upload(const StepInput& in) {
        MEGAMOE_CHECK(in.T <= static_cast<int>(pos.size()) && in.C <= static_cast<int>(chunk_first.size()),
                      "test batch too large");
        pos.upload(in.pos);
        slot.upload(in.slot);
        chunk.upload(in.chunk);
        chunk_first.upload(in.chunk_first);
        chunk_len.upload(in.chunk_len);
        T = in.T;
        C = in.C;
    }
    cuda::BatchView view() const {
        cuda::BatchView b;
        b.T = T;
        b.C = C;
        b.pos = pos.data();
        b.slot = slot.data();
        b.chunk = chunk.data();
        b.chunk_first = chunk_first.data();
        b.chunk_len = chunk_len.data();
        return b;
    }
};

struct GpuCompressor {
    const HostComp& hc;
    const PoolLayout& L;      // the layout the pool / state bytes are checked in
    const bool wide;
    const PoolLayout D;       // the device layout: L, or (wide) L moved past 2^31 bytes
    DeviceBatch batch;
    DeviceArray<float> kv, gate, ape, inv_freq;
    DeviceArray<uint16_t> norm;
    DeviceArray<int32_t> table;
    DeviceArray<uint8_t> pool, state;
    Stream stream;

    // wide: block b of L lives in device block n_blocks − 1 − b of a pool of more than 2^31 bytes
    // (every used block starts past 2^31), and the state records are 2^30 bytes apart (slots 2, 3
    // and 4 start past 2^31); pool_bytes / state_bytes gather them back into L's layout.
    static PoolLayout widen(const PoolLayout& l) {
        PoolLayout d = l;
        d.n_blocks = static_cast<int>((int64_t{1} << 31) / l.block_bytes) + l.n_blocks + 1;
        for (int32_t& b : d.table) b = d.n_blocks - 1 - b;
        d.state_stride = (int64_t{1} << 30) + l.state_stride;
        return d;
    }
    GpuCompressor(const HostComp& h, const PoolLayout& l, int max_T, int max_C, bool past_2gib = false)
        : hc(h), L(l), wide(past_2gib), D(past_2gib ? widen(l) : l), batch(max_T, max_C),
          kv(static_cast<size_t>(max_T) * static_cast<size_t>(h.width)),
          gate(static_cast<size_t>(max_T) * static_cast<size_t>(h.width)), ape(h.ape),
          inv_freq(h.rope.inv_freq), norm(h.norm), table(D.table), pool(D.pool_size()), state(D.state_size()) {
        pool.fill(0xFF);
        state.fill(0xFF);
    }
    cuda::CompressorArgs args() const {
        cuda::CompressorArgs a;
        a.ratio = hc.spec.r;
        a.dim = hc.spec.d;
        a.overlap = hc.spec.overlap;
        a.kv = kv.data();
        a.gate = gate.data();
        a.ape = ape.data();
        a.norm_w = norm.data();
        a.norm_eps = static_cast<float>(hc.cfg.rms_norm_eps);
        a.rope.inv_freq = inv_freq.data();
        a.rope.rope_dim = hc.spec.rope;
        a.state.base = state.data();
        a.state.slot_stride = D.state_stride;
        a.rows = host_rows(hc.spec, D, pool.data());
        a.rows.block_table = table.data();
        a.numerics = hc.nm;
        a.indexer_keys = hc.indexer_keys;
        a.kv_fp8 = L.row_bytes != 0;   // the layout's rows are kv_row.h fp8 rows
        return a;
    }
    void upload(const StepInput& in) {
        batch.upload(in);
        kv.upload(in.kv);
        gate.upload(in.gate);
    }
    void launch(cudaStream_t s) const {
        cuda::compressor_emit(args(), batch.view(), s);
        cuda::compressor_save(args(), batch.view(), s);
    }
    void step(const StepInput& in) {
        upload(in);
        launch(stream.s);
        CUDA_CHECK(cudaStreamSynchronize(stream.s));
    }
    std::vector<uint8_t> pool_bytes() const {
        if (!wide) return pool.download();
        std::vector<uint8_t> h(L.pool_size());
        const size_t bb = static_cast<size_t>(L.block_bytes);
        for (int b = 0; b < L.n_blocks; ++b)
            CUDA_CHECK(cudaMemcpy(h.data() + static_cast<size_t>(b) * bb,
                                  pool.data() + static_cast<size_t>(D.n_blocks - 1 - b) * bb, bb, cudaMemcpyDeviceToHost));
        return h;
    }
    std::vector<uint8_t> state_bytes() const {
        if (!wide) return state.download();
        std::vector<uint8_t> h(L.state_size());
        const size_t n = static_cast<size_t>(L.state_stride);
        for (int slot = 0; slot < kSlots; ++slot)
            CUDA_CHECK(cudaMemcpy(h.data() + static_cast<size_t>(slot) * n,
                                  state.data() + static_cast<size_t>(slot) * static_cast<size_t>(D.state_stride), n,
                                  cudaMemcpyDeviceToHost));
        return h;
    }
};

struct GpuRing {
    int64_t hd, W, stride;
    cuda::KvRow fmt{};   // the rows' format (bf16 unless set)
    DeviceBatch batch;
    DeviceArray<uint16_t> kv;
    DeviceArray<uint8_t> ring;
    Stream stream;

    GpuRing(int64_t hd_, int64_t W_, int64_t stride_, int max_T)
        : hd(hd_), W(W_), stride(stride_), batch(max_T, max_T),
          kv(static_cast<size_t>(max_T) * static_cast<size_t>(hd_)), ring(static_cast<size_t>(kSlots * stride_)) {
        ring.fill(0xFF);
    }
    void upload(const StepInput& in) {
        batch.upload(in);
        kv.upload(in.kv_bf16);
    }
    void launch(cudaStream_t s) const {
        cuda::SlotArray window;
        window.base = ring.data();
        window.slot_stride = stride;
        cuda::window_write(kv.data(), hd, W, window, batch.view(), s, fmt);
    }
    void step(const StepInput& in) {
        upload(in);
        launch(stream.s);
        CUDA_CHECK(cudaStreamSynchronize(stream.s));
    }
    std::vector<uint8_t> ring_bytes() const { return ring.download(); }
};

// ---------------------------------------------------------------- official numerics

// compressor_emit with Numerics::official against compressor_feed(nm = official): each row is
// rounded to bf16 before the norm, after it and after the rotation, then FP8 in 64-blocks over
// features [0, d − rope) (KV latent) or Hadamard + FP4 in 32-blocks (indexer keys). Two inputs:
//  * grid (exact pooling, make_inputs' grid and ape = 0): every slot's softmax weight is
//    expf(0) = exp(0) = 1 on both sides, so both pool the exact mean Σkv / n (an exact f32 sum of
//    2^-10-grid values; the division is correctly rounded on both: n is a power of two in the V4
//    and tiny shapes, and for n = 5, 6, 12 the quotient's binary expansion repeats, so the CPU's
//    f64-then-f32 rounding gives the f32 quotient). The norm then has the twin's bits (f64 sum of
//    exact squares of bf16 values, the same f32 steps), and so has everything before the
//    rotation. Required:
//      - rope_dim = 0: every row bit for bit;
//      - KV latent rows: features [0, d − rope) bit for bit (their FP8 blocks hold no rope
//        feature); the rope features bit for bit but for cosf / sinf-induced bf16 flips (see
//        rowwise_test's head_norm_rope official test): at most max(4, n_rope / 1024) elements of a
//        shape's rows, each within one bf16 ulp (2^-7·max(|g|, |c|)) + 2^-11·wmax;
//      - indexer rows: the Hadamard mixes every rope feature into every output, so a row with a
//        flip may differ in a few FP4 elements: at most max(2, rows / 16) rows of a shape, each
//        element within half its magnitude plus a quarter of its 32-block's max (an e2m1 step).
//  * random (the exact-mode tests' inputs): the GPU pools in f32 where the CPU pools in f64, so a
//    pooled value's bf16 rounding flips now and then (about 10^-3 of them), and the flip travels
//    through the norm into the FP8 / FP4 roundings. Required: every element within one
//    quantization step of the twin plus the exact-mode error — FP8 features 2^-3·max(|g|, |c|)
//    (an e4m3 step; a doubled block scale leaves the normal e4m3·s grid as it is) + 2^-7·|c| +
//    2^-11·wmax + 2^-14·(block max) (the subnormal step); rope features 2^-7·(|c| + row max) (a
//    flipped bf16 input mixed by the rotation); indexer as above — and at most 1/64 of the
//    elements (KV latent) or 1/4 of the rows (indexer) differing in bits (~10^-3 expected). The
//    grid cases are the ones that pin each rounding step.
struct OfficialSpec {
    Spec spec;
    bool indexer;   // the indexer's compressor
};
const OfficialSpec kOfficialSpecs[] = {
    {kFlash[0], false}, {kFlash[1], false}, {kFlash[2], true},
    {kTiny[0], false},  {kTiny[1], false},  {kTiny[2], true},
    {{"flash_csa_no_rope", 4, 512, true, 0, 256}, false},
    {{"flash_indexer_no_rope", 4, 128, true, 0, 64}, true},
    {kOdd[0], false},   {kOdd[1], false},   {kOdd[2], false}, {kOdd[3], false}, {kOdd[4], false},
};

struct OfficialCount {
    int64_t elems = 0, differ = 0, nope_differ = 0, rope_elems = 0, rope_differ = 0, rows = 0, rows_differ = 0;
    int64_t fp8_rows = 0;   // fp8 rows checked against the bf16 ones (each step's visible rows)
    int bad = 0;
};

// Rows against the CPU's in official numerics: tolerances as above, counts into n when `count`
// (the last step of a schedule, so each row counts once); unwritten pool bytes still poison.
void check_pool_official(const HostComp& hc, const PoolLayout& L, std::vector<uint8_t>& pool,
                         const std::vector<CompressorState>& cpu, bool grid, bool count, OfficialCount& n) {
    const Spec& s = hc.spec;
    ASSERT_EQ(pool.size(), L.pool_size());
    const cuda::PagedRows rows = host_rows(s, L, pool.data());
    std::vector<char> written(pool.size(), 0);
    const int q_end = s.d - s.rope;
    for (int q = 0; q < kSeqs; ++q) {
        const CompressorState& st = cpu[static_cast<size_t>(q)];
        ASSERT_EQ(static_cast<int64_t>(st.rows.size()), st.n_rows * s.d);
        for (int64_t w = 0; w < st.n_rows; ++w) {
            const uint16_t* g = rows.row<uint16_t>(kSlotOf[q], w);
            const float* c = st.rows.data() + w * s.d;
            const size_t at = static_cast<size_t>(reinterpret_cast<const uint8_t*>(g) - pool.data());
            std::fill_n(written.begin() + static_cast<std::ptrdiff_t>(at), 2 * s.d, 1);
            double row_max = 0;
            for (int f = 0; f < s.d; ++f) row_max = std::max(row_max, std::fabs(static_cast<double>(c[f])));
            bool row_differs = false;
            for (int f = 0; f < s.d; ++f) {
                const bool rope_dim = !hc.indexer_keys && f >= q_end;
                if (count) {
                    ++n.elems;
                    n.rope_elems += rope_dim ? 1 : 0;
                }
                if (g[f] == f32_to_bf16(c[f])) continue;   // the CPU's rows are bf16 values
                row_differs = true;
                if (count) {
                    ++n.differ;
                    if (rope_dim) ++n.rope_differ;
                    else if (!hc.indexer_keys) ++n.nope_differ;
                }
                const double gv = bf16_to_f32(g[f]), cv = c[f];
                const int bsz = hc.indexer_keys ? 32 : 64, b0 = f / bsz * bsz;
                const int b1 = std::min(hc.indexer_keys ? s.d : q_end, b0 + bsz);
                double block_max = 0;
                for (int i = b0; i < b1; ++i) block_max = std::max(block_max, std::fabs(static_cast<double>(c[i])));
                double tol;
                if (hc.indexer_keys)
                    tol = 0.5 * std::max(std::fabs(gv), std::fabs(cv)) + 0.25 * block_max;
                else if (rope_dim)
                    tol = grid ? std::ldexp(std::max(std::fabs(gv), std::fabs(cv)), -7) +
                                     std::ldexp(static_cast<double>(hc.wmax), -11)
                               : std::ldexp(std::fabs(cv) + row_max, -7);
                else
                    tol = std::ldexp(std::max(std::fabs(gv), std::fabs(cv)), -3) + std::ldexp(std::fabs(cv), -7) +
                          std::ldexp(static_cast<double>(hc.wmax), -11) + std::ldexp(block_max, -14);
                if (!(std::fabs(gv - cv) <= tol) && n.bad++ < kMaxReports)
                    ADD_FAILURE() << "seq " << q << " row " << w << " feature " << f << ": gpu " << gv << ", cpu " << cv
                                  << ", tol " << tol;
            }
            if (count) {
                ++n.rows;
                n.rows_differ += row_differs ? 1 : 0;
            }
        }
    }
    for (size_t i = 0; i < pool.size(); ++i)
        if (!written[i] && pool[i] != 0xFF && n.bad++ < kMaxReports)
            ADD_FAILURE() << "pool byte " << i << " written but no emitted row lives there";
}

void run_official_case(const OfficialSpec& os, const SchedCase& sc, uint64_t seed, bool grid, OfficialCount& n) {
    SCOPED_TRACE(str(os.spec.name, " / ", sc.name, grid ? " (grid)" : " (random)"));
    HostComp hc(os.spec, seed);
    hc.nm = Numerics::official;
    hc.indexer_keys = os.indexer;
    if (grid) std::fill(hc.ape.begin(), hc.ape.end(), 0.0f);   // before the GPU copy is made
    int64_t max_len = 0;
    const std::vector<StepInput> inputs = make_inputs(sc.steps, hc.width, 0, seed, &max_len, grid);
    const PoolLayout L = make_layout(os.spec, max_len, seed);
    int max_T = 0, max_C = 0;
    for (const StepInput& in : inputs) max_T = std::max(max_T, in.T), max_C = std::max(max_C, in.C);
    GpuCompressor gpu(hc, L, max_T, max_C);
    // The attention's rows also as fp8 rows (kv_row.h, what the GPU state stores under official
    // numerics) where the shape allows: they must decode to the bf16 rows' values, bit for bit.
    const cuda::KvRow f8{os.spec.d, os.spec.rope, true};
    const bool fp8 = !os.indexer && cuda::KvRow::fp8_fits(os.spec.d, os.spec.rope);
    const PoolLayout L8 = make_layout(os.spec, max_len, seed, f8.bytes());
    std::optional<GpuCompressor> gpu8;
    if (fp8) gpu8.emplace(hc, L8, max_T, max_C);
    std::vector<CompressorState> cpu(kSeqs);
    int64_t n_past[kSeqs] = {0, 0, 0};
    for (size_t k = 0; k < inputs.size(); ++k) {
        SCOPED_TRACE(str("step ", k));
        const StepInput& in = inputs[k];
        cpu_step(hc, in, cpu);
        for (int c = 0; c < in.C; ++c) n_past[in.seq_of_chunk[static_cast<size_t>(c)]] += in.chunk_len[static_cast<size_t>(c)];
        gpu.step(in);
        std::vector<uint8_t> pool = gpu.pool_bytes();
        check_pool_official(hc, L, pool, cpu, grid, k + 1 == inputs.size(), n);
        check_state(hc, L, gpu.state_bytes(), cpu, n_past);   // the state is numerics-independent: bits
        if (gpu8) {
            gpu8->step(in);
            std::vector<uint8_t> pool8 = gpu8->pool_bytes();
            const cuda::PagedRows r16 = host_rows(os.spec, L, pool.data()), r8 = host_rows(os.spec, L8, pool8.data());
            std::vector<float> dec(static_cast<size_t>(os.spec.d));
            for (int q = 0; q < kSeqs; ++q)
                for (int64_t w = 0; w < cpu[static_cast<size_t>(q)].n_rows; ++w) {
                    cuda::kv_row_decode(f8, r8.row<uint8_t>(kSlotOf[q], w), dec.data());
                    const uint16_t* g = r16.row<uint16_t>(kSlotOf[q], w);
                    for (int e = 0; e < os.spec.d; ++e)
                        if (f32_to_bf16(dec[static_cast<size_t>(e)]) != g[e] || bf16_to_f32(g[e]) != dec[static_cast<size_t>(e)]) {
                            ADD_FAILURE() << "fp8 row of seq " << q << " row " << w << " feature " << e << ": " << dec[static_cast<size_t>(e)]
                                          << ", the bf16 row's " << bf16_to_f32(g[e]);
                            return;
                        }
                    ++n.fp8_rows;
                }
            EXPECT_TRUE(gpu8->state_bytes() == gpu.state_bytes()) << "the compressor state depends on the row format";
        }
        if (::testing::Test::HasFailure()) return;
    }
}

// Every schedule of every official shape; the counts of a shape against the bounds above.
void run_official(bool grid, uint64_t seed) {
    for (const OfficialSpec& os : kOfficialSpecs) {
        const Spec& spec = os.spec;
        OfficialCount n;
        for (const SchedCase& sc : schedules(spec.r)) {
            run_official_case(os, sc, seed++, grid, n);
            if (::testing::Test::HasFailure()) return;
        }
        SCOPED_TRACE(str(spec.name, grid ? " (grid)" : " (random)"));
        EXPECT_EQ(n.bad, 0);
        if (grid) {
            EXPECT_EQ(n.nope_differ, 0) << "FP8 features must be bit-identical with exact pooling";
            EXPECT_LE(n.rope_differ, std::max<int64_t>(4, n.rope_elems / 1024)) << "rope features differing";
            if (os.indexer) {
                EXPECT_LE(n.rows_differ, spec.rope == 0 ? 0 : std::max<int64_t>(2, n.rows / 16)) << "indexer rows differing";
            }
        } else if (os.indexer) {
            EXPECT_LE(n.rows_differ, std::max<int64_t>(2, n.rows / 4)) << "indexer rows differing";
        } else {
            EXPECT_LE(n.differ, std::max<int64_t>(8, n.elems / 64)) << "elements differing";
        }
        if (!os.indexer && cuda::KvRow::fp8_fits(spec.d, spec.rope)) {
            EXPECT_GT(n.fp8_rows, 0);
        }
        std::printf("[     INFO ] %s official %s: %lld of %lld elements differ (%lld rope of %lld), %lld of %lld rows; "
                    "%lld fp8 row checks\n",
                    spec.name, grid ? "grid" : "random", static_cast<long long>(n.differ),
                    static_cast<long long>(n.elems), static_cast<long long>(n.rope_differ),
                    static_cast<long long>(n.rope_elems), static_cast<long long>(n.rows_differ),
                    static_cast<long long>(n.rows), static_cast<long long>(n.fp8_rows));
    }
}

TEST(CudaCompressor, OfficialNumericsExactPoolingMatchesCpu) {
    SKIP_WITHOUT_GPU();
    run_official(true, 600);
}

TEST(CudaCompressor, OfficialNumericsMatchesCpu) {
    SKIP_WITHOUT_GPU();
    run_official(false, 700);
}

TEST(CudaCompressor, FlashShapesMatchCpu) {
    SKIP_WITHOUT_GPU();
    run_group<GpuCompressor>(kFlash, std::size(kFlash), 100);
}

TEST(CudaCompressor, TinyShapesMatchCpu) {
    SKIP_WITHOUT_GPU();
    run_group<GpuCompressor>(kTiny, std::size(kTiny), 200);
}

TEST(CudaCompressor, OddShapesMatchCpu) {
    SKIP_WITHOUT_GPU();
    run_group<GpuCompressor>(kOdd, std::size(kOdd), 300);
}

// Rows and state records that start past 2^31 bytes (64-bit offsets): CSA and HCA shapes.
TEST(CudaCompressor, OffsetsPast2GiB) {
    SKIP_WITHOUT_GPU();
    for (const Spec& spec : {kFlash[0], kFlash[1]}) {
        run_case<GpuCompressor>(spec, schedules(spec.r)[3], 500, true);   // multi_seq
        if (HasFailure()) return;
    }
}

TEST(CudaCompressor, WindowRingKeepsLastW) {
    SKIP_WITHOUT_GPU();
    for (const RingSpec& rs : kRings)
        for (const SchedCase& sc : schedules(rs.W)) {
            run_ring_case<GpuRing>(rs, sc, 400);
            if (HasFailure()) return;
        }
}

// The same with fp8 rows (official numerics' KV storage): each row the host encoder's bytes.
TEST(CudaCompressor, WindowRingFp8RowsAreTheEncodersBytes) {
    SKIP_WITHOUT_GPU();
    for (const RingSpec& rs : kFp8Rings)
        for (const SchedCase& sc : schedules(rs.W)) {
            run_ring_case<GpuRing>(rs, sc, 450);
            if (HasFailure()) return;
        }
}

// One chunk of sequence 0 at positions p0 .. p0 + n - 1 for the rewind tests (stream `seed`);
// positions >= fake_from get the values of another stream (drafts that will be rejected).
StepInput draft_chunk(const HostComp& hc, uint32_t seed, int64_t p0, int n, int64_t fake_from) {
    StepInput in;
    in.C = 1;
    in.chunk_first.push_back(0);
    in.chunk_len.push_back(n);
    in.seq_of_chunk.push_back(0);
    for (int i = 0; i < n; ++i) {
        const int64_t p = p0 + i;
        in.pos.push_back(static_cast<int32_t>(p));
        in.pos64.push_back(p);
        in.slot.push_back(kSlotOf[0]);
        in.chunk.push_back(0);
        TokenRng rng(p >= fake_from ? 1000 : seed, 0, p);
        for (int f = 0; f < hc.width; ++f) in.kv.push_back(rng.uniform());
        for (int f = 0; f < hc.width; ++f) in.gate.push_back(2.0f * rng.normal());
        ++in.T;
    }
    return in;
}

// Rewind (speculative decoding, compressor.h): each step feeds a sequence's next real token and
// a rejected draft after it (values from another stream), then the host drops the draft's
// position (n_past back by one, no device copy). Over 3r + 2 such rounds the draft falls on every
// slot of the window, closes windows, and the real token closes them too; after every round the
// state equals compressor_feed's over the real tokens alone, bit for bit, and at the end (one
// last real token, so that every window a draft closed was closed again for real) every row.
TEST(CudaCompressor, RewindOfARejectedDraftIsExact) {
    SKIP_WITHOUT_GPU();
    for (const Spec& spec : {kFlash[0], kFlash[1], kFlash[2], kTiny[1], kOdd[1], kOdd[4]}) {
        SCOPED_TRACE(spec.name);
        const HostComp hc(spec, 7);
        const int64_t prefill = spec.r + 1, rounds = 3 * int64_t{spec.r} + 2;
        const int64_t total = prefill + rounds + 1;
        const PoolLayout L = make_layout(spec, total + 1, 7);
        GpuCompressor gpu(hc, L, static_cast<int>(prefill), 1);
        std::vector<CompressorState> cpu(kSeqs);
        int64_t n_past[kSeqs] = {0, 0, 0};
        auto chunk = [&](int64_t p0, int n, int64_t fake_from) { return draft_chunk(hc, 7, p0, n, fake_from); };
        const StepInput first = chunk(0, static_cast<int>(prefill), total);
        gpu.step(first);
        cpu_step(hc, first, cpu);
        n_past[0] = prefill;
        for (int64_t k = 0; k < rounds; ++k) {
            SCOPED_TRACE(str("round ", k, " at position ", n_past[0]));
            const StepInput both = chunk(n_past[0], 2, n_past[0] + 1);   // the real token, then a draft
            gpu.step(both);
            const StepInput real = chunk(n_past[0], 1, total);
            cpu_step(hc, real, cpu);
            n_past[0] += 1;                                               // the draft's position dropped
            check_state(hc, L, gpu.state_bytes(), cpu, n_past);
            if (HasFailure()) return;
        }
        const StepInput last = chunk(n_past[0], 1, total);
        gpu.step(last);
        cpu_step(hc, last, cpu);
        n_past[0] += 1;
        check_state(hc, L, gpu.state_bytes(), cpu, n_past);
        std::vector<uint8_t> pool = gpu.pool_bytes();
        check_pool(hc, L, pool, cpu);
        if (HasFailure()) return;
    }
}

// Rewind of up to three rejected drafts (K = 3 speculation) with the overlapping compressors:
// each round feeds the real token and three drafts (a chunk of 4), keeps the real token and the
// first j drafts (j = 0, 1, 2, 3 in turn; the kept drafts carry the real values, the dropped ones
// another stream's) and drops the rest, so the dropped positions fall on every slot and cross into
// the next window. With the pending slots kept per window parity the state equals compressor_feed's
// over the kept tokens alone, bit for bit, after every round, and every row at the end.
TEST(CudaCompressor, RewindOfThreeDraftsAcrossAWindowIsExact) {
    SKIP_WITHOUT_GPU();
    for (const Spec& spec : {kFlash[0], kFlash[2], kTiny[0], kOdd[1]}) {
        SCOPED_TRACE(spec.name);
        ASSERT_TRUE(spec.overlap && spec.r >= 4);
        const HostComp hc(spec, 8);
        const int64_t prefill = spec.r + 1, rounds = 4 * int64_t{spec.r} + 3;
        const int64_t total = prefill + 4 * rounds + 1;
        const PoolLayout L = make_layout(spec, total + 4, 8);
        GpuCompressor gpu(hc, L, static_cast<int>(std::max<int64_t>(prefill, 4)), 1);
        std::vector<CompressorState> cpu(kSeqs);
        int64_t n_past[kSeqs] = {0, 0, 0};
        auto chunk = [&](int64_t p0, int n, int64_t fake_from) { return draft_chunk(hc, 8, p0, n, fake_from); };
        const StepInput first = chunk(0, static_cast<int>(prefill), total);
        gpu.step(first);
        cpu_step(hc, first, cpu);
        n_past[0] = prefill;
        int64_t crossed = 0;
        for (int64_t k = 0; k < rounds; ++k) {
            const int keep = 1 + static_cast<int>(k % 4);
            SCOPED_TRACE(str("round ", k, " at position ", n_past[0], ", keeping ", keep, " of 4"));
            gpu.step(chunk(n_past[0], 4, n_past[0] + keep));
            const StepInput real = chunk(n_past[0], keep, total);
            cpu_step(hc, real, cpu);
            if (keep < 4 && (n_past[0] + keep) / spec.r != (n_past[0] + 3) / spec.r) ++crossed;
            n_past[0] += keep;   // the dropped drafts' positions: a rewind, no copy
            check_state(hc, L, gpu.state_bytes(), cpu, n_past);
            if (HasFailure()) return;
        }
        EXPECT_GT(crossed, 0) << "some drops must cross into the next window";
        // Real tokens past every position a draft wrote, so that every window a draft closed was
        // closed again for real (its row rewritten).
        const int64_t written_end = n_past[0] - 1 + 4;   // the last round's chunk ended at most here
        const StepInput last = chunk(n_past[0], static_cast<int>(written_end + 1 - n_past[0]), total);
        gpu.step(last);
        cpu_step(hc, last, cpu);
        n_past[0] = written_end + 1;
        check_state(hc, L, gpu.state_bytes(), cpu, n_past);
        std::vector<uint8_t> pool = gpu.pool_bytes();
        check_pool(hc, L, pool, cpu);
        if (HasFailure()) return;
    }
}

// Two runs of the same schedules give the same bytes (pool and state) after every step.
TEST(CudaCompressor, Deterministic) {
    SKIP_WITHOUT_GPU();
    for (const Spec& spec : {kFlash[0], kFlash[1], kTiny[1]}) {
        SCOPED_TRACE(spec.name);
        const HostComp hc(spec, 5);
        const SchedCase sc = schedules(spec.r)[3];   // multi_seq
        int64_t max_len = 0;
        const std::vector<StepInput> inputs = make_inputs(sc.steps, hc.width, 0, 5, &max_len);
        const PoolLayout L = make_layout(spec, max_len, 5);
        int max_T = 0, max_C = 0;
        for (const StepInput& in : inputs) max_T = std::max(max_T, in.T), max_C = std::max(max_C, in.C);
        GpuCompressor a(hc, L, max_T, max_C), b(hc, L, max_T, max_C);
        for (size_t k = 0; k < inputs.size(); ++k) {
            a.step(inputs[k]);
            b.step(inputs[k]);
            EXPECT_TRUE(a.pool_bytes() == b.pool_bytes()) << "pool differs after step " << k;
            EXPECT_TRUE(a.state_bytes() == b.state_bytes()) << "state differs after step " << k;
        }
    }
}

// One decode step of two sequences (T = C = 2: emit, save and the ring write) captured once and
// replayed with new positions and values; after every step it equals an eager twin and the CPU.
TEST(CudaCompressor, GraphReplayEqualsEager) {
    SKIP_WITHOUT_GPU();
    const Spec& spec = kFlash[0];
    const RingSpec& rs = kRings[1];
    const HostComp hc(spec, 11);
    Schedule sched{{{0, 9}, {1, 22}}};
    for (int i = 0; i < 10; ++i) sched.push_back(i % 3 == 2 ? Step{{1, 1}, {0, 1}} : Step{{0, 1}, {1, 1}});
    int64_t max_len = 0;
    const std::vector<StepInput> inputs = make_inputs(sched, hc.width, rs.hd, 11, &max_len);
    const PoolLayout L = make_layout(spec, max_len, 11);
    const int max_T = inputs[0].T, max_C = 2;
    GpuCompressor eager(hc, L, max_T, max_C), graphed(hc, L, max_T, max_C);
    GpuRing eager_ring(rs.hd, rs.W, ring_stride(rs), max_T), graphed_ring(rs.hd, rs.W, ring_stride(rs), max_T);
    std::vector<CompressorState> cpu(kSeqs);
    int64_t n_past[kSeqs] = {0, 0, 0};

    Stream s;
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    for (size_t k = 0; k < inputs.size(); ++k) {
        SCOPED_TRACE(str("step ", k));
        const StepInput& in = inputs[k];
        cpu_step(hc, in, cpu);
        for (int c = 0; c < in.C; ++c) n_past[in.seq_of_chunk[static_cast<size_t>(c)]] += in.chunk_len[static_cast<size_t>(c)];
        eager.step(in);
        eager_ring.step(in);
        graphed.upload(in);
        graphed_ring.upload(in);
        if (k == 0) {   // the prefill runs eagerly
            graphed.launch(s.s);
            graphed_ring.launch(s.s);
        } else {
            ASSERT_EQ(in.T, 2);
            if (!exec) {
                CUDA_CHECK(cudaStreamBeginCapture(s.s, cudaStreamCaptureModeThreadLocal));
                graphed.launch(s.s);
                graphed_ring.launch(s.s);
                CUDA_CHECK(cudaStreamEndCapture(s.s, &graph));
                CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
            }
            CUDA_CHECK(cudaGraphLaunch(exec, s.s));
        }
        CUDA_CHECK(cudaStreamSynchronize(s.s));
        EXPECT_TRUE(graphed.pool_bytes() == eager.pool_bytes()) << "pool";
        EXPECT_TRUE(graphed.state_bytes() == eager.state_bytes()) << "state";
        EXPECT_TRUE(graphed_ring.ring_bytes() == eager_ring.ring_bytes()) << "ring";
        std::vector<uint8_t> pool = graphed.pool_bytes();
        check_pool(hc, L, pool, cpu);
        check_state(hc, L, graphed.state_bytes(), cpu, n_past);
        if (HasFailure()) break;
    }
    if (exec) CUDA_CHECK(cudaGraphExecDestroy(exec));
    if (graph) CUDA_CHECK(cudaGraphDestroy(graph));
}

// The launchers check their arguments on the host before any CUDA call (so this runs without a
// GPU: the pointers below are never dereferenced), and an empty batch launches nothing.
TEST(CompressorCpu, LaunchersRejectBadArguments) {
    alignas(16) static float dummy[64];
    static int32_t dummy_i[8];
    static uint16_t dummy_h[64];
    auto good = [&] {
        cuda::CompressorArgs a;
        a.ratio = 4;
        a.dim = 64;
        a.overlap = true;
        a.kv = a.gate = a.ape = dummy;
        a.norm_w = dummy_h;
        a.rope.inv_freq = dummy;
        a.rope.rope_dim = 16;
        a.state.base = dummy;
        a.state.slot_stride = cuda::compressor_state_bytes(4, 64, true);
        a.rows.pool = dummy;
        a.rows.block_bytes = 4096;
        a.rows.block_table = dummy_i;
        a.rows.max_blocks = 2;
        a.rows.block_tokens = 64;
        a.rows.ratio = 4;
        a.rows.dim = 64;
        return a;
    };
    cuda::BatchView b;
    b.T = 1;
    b.C = 1;
    b.pos = b.slot = b.chunk = b.chunk_first = b.chunk_len = dummy_i;
    auto rejects = [&](const cuda::CompressorArgs& a, const char* what) {
        EXPECT_THROW(cuda::compressor_emit(a, b, nullptr), Error) << what;
    };
    cuda::CompressorArgs a = good();
    a.dim = 63, a.rows.dim = 63;
    rejects(a, "odd dim");
    a = good();
    a.rope.rope_dim = 80;
    rejects(a, "rope_dim > dim");
    a = good();
    a.rope.rope_dim = 15;
    rejects(a, "odd rope_dim");
    a = good();
    a.rows.dim = 32;
    rejects(a, "rows of another width");
    a = good();
    a.rows.ratio = 128;
    rejects(a, "rows of another ratio");
    a = good();
    a.rows.block_tokens = 66;
    rejects(a, "block_tokens not a multiple of r");
    a = good();
    a.state.slot_stride = 64;
    rejects(a, "state record too small");
    EXPECT_THROW(cuda::compressor_save(a, b, nullptr), Error);
    a = good();
    a.kv = dummy + 1;
    rejects(a, "misaligned kv");
    a = good();
    a.rows.layer_offset = 2;
    rejects(a, "misaligned rows");
    a = good();
    a.numerics = Numerics::official;
    a.indexer_keys = true;
    a.dim = a.rows.dim = 96;
    a.state.slot_stride = cuda::compressor_state_bytes(4, 96, true);
    rejects(a, "official indexer keys of a dim that is not a power of two");
    a = good();
    a.ratio = 128, a.rows.ratio = 128, a.rows.block_tokens = 128, a.dim = a.rows.dim = 20000;
    a.state.slot_stride = cuda::compressor_state_bytes(128, 20000, true);
    a.rope.rope_dim = 64;
    rejects(a, "more shared memory than a CTA has");
    cuda::SlotArray ring;
    ring.base = dummy;
    ring.slot_stride = 8 * 64 * 2 - 2;
    EXPECT_THROW(cuda::window_write(dummy_h, 64, 8, ring, b, nullptr), Error) << "ring record too small";
    EXPECT_THROW(cuda::window_write(dummy_h, 64, 0, ring, b, nullptr), Error) << "W = 0";
    // An empty batch is a no-op: nothing is launched (no GPU needed).
    b.T = 0;
    b.C = 0;
    cuda::compressor_emit(good(), b, nullptr);
    cuda::compressor_save(good(), b, nullptr);
    ring.slot_stride = 8 * 64 * 2;
    cuda::window_write(dummy_h, 64, 8, ring, b, nullptr);
}

#else  // !MEGAMOE_HAVE_CUDA

TEST(CudaCompressor, SkippedWithoutCuda) { GTEST_SKIP() << "built without CUDA"; }

#endif

}  // namespace
}  // namespace megamoe
