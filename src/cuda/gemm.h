// gemm.h — tiled linear for any M (prefill) and the routed-expert layer on the GPU. Host API;
// plain C++, compiles without the CUDA toolkit.
//
// Two kernel families (gemm.cu: mma.sync tiles and wgmma tiles) serve three callers:
//   linear / linear_tiled   y[M, N] = x[M, K] · Wᵀ for one weight (M > 16; M ≤ 16 goes to
//                           linear_small_m, and FP8 / BF16 weights up to kRegsMaxM tokens to
//                           linear_regs), optionally grouped (wo_a) and with bf16 output;
//   moe_l1                  per expert e, rows j of its slice of xs:
//                           h[j] = silu(min(g, L)) · clamp(u, -L, L) · ws[j]   (bf16)
//                           with g = xs[j] · w1[e]ᵀ, u = xs[j] · w3[e]ᵀ computed in one pass;
//   moe_l2                  rows[j] = h[j] · w2[e]ᵀ (f32).
// and moe_layer runs the whole routed-expert layer: route → gather → L1 → L2 → combine, with no
// host synchronization (graph-capturable for a fixed T).
//
// Weights stay in their checkpoint formats (DeviceLinear, kernel-order words; see linear.h).
// Results equal the CPU twins (ops::linear, ops::expert_ffn) up to fp32 summation order, plus the
// bf16 rounding of h between L1 and L2 (the GPU layer's only rounding; the CPU twin keeps h in
// fp32: see tests/cuda_gemm_test.cpp for the bound).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda/buffer.h"
#include "cuda/device_info.h"
#include "cuda/linear.h"
#include "cuda/moe_dispatch.h"
#include "io/weights.h"
#include "core/numerics.h"

struct CUstream_st;

namespace megamoe::cuda {

// The tiled kernel shapes, named after their CTA tile (weight rows × tokens). mma_*: tiled_kernel
// (mma.sync m16n8k16; any M, any K % 8 == 0); wgmma_*: wgmma_kernel (K a whole number of 64-byte
// weight steps, x permuted into the kernel's column order first). The reasons for each shape and
// the measurements behind the automatic choice are next to the table in gemm.cu.
enum class Tile : int8_t {
    automatic = -1,    // chosen per call: from M (dense), from the mean rows per expert (grouped)
    mma_128x8 = 0,     // decode, few tokens per expert: 4 warps, no duplicate decode, 5 CTAs per SM
    mma_128x16,        // 4 warps, each decoded fragment used for two token tiles; experts at 7-12 rows each
    mma_256x64,
    mma_128x128,
    mma_128x128_nt8,   // NT = 8: half the decode work per MMA; the grouped fallback without wgmma
    mma_256x128,       // the dense fallback when wgmma cannot run (K not whole steps, no scratch)
    mma_256x32,        // mean rows per expert in (12, 31] and (48, 60] (V4-Flash T = 513-1322, 2049-2560):
                       // 8 warps of 32 rows × 32 tokens, two CTAs per SM
    mma_256x48,        // mean rows per expert in (31, 48] (V4-Flash T = 1323-2048): mma_256x32 with
                       // 48 tokens per tile
    wgmma_256x128,     // prefill: each weight decoded once per 128 tokens; split-K fills the GPU
    wgmma_256x32,      // mid-size expert batches (the choice until 2026-12-07; now mma_256x32)
    wgmma_ws_256x128,  // wgmma_256x128 with a producer warpgroup and mbarriers (no CTA barrier per step)
    wgmma_ws_256x32,   // wgmma_256x32, likewise
    wgmma_f8_128x128,  // W4A8: MXFP4 experts × FP8 activations on the FP8 tensor core, official numerics
                       // only (moe_w4a8_fits); elsewhere it runs as wgmma_ws_256x128. Measured slower (gemm.cu).
    wgmma_f8_128x32,   // the same for 32 tokens per tile (T ≈ 1024); elsewhere it runs as wgmma_256x32
    wgmma_2cta_256x32, // wgmma_256x32 at two CTAs per SM (a 4-stage ring each): one CTA's ring fill and
                       // epilogue overlap the other's steps (the MXFP4 choice at T ≈ 512-2048 until mma_256x32)
    // The persistent tiles (grouped calls; a dense call runs the one-tile form): one CTA per SM walks
    // the work list, its ring running on from tile to tile, so the producer (decoders) fill the next
    // tile's stages while the consumers finish a tile and store it.
    wgmma_pws_256x128, // wgmma_ws_256x128, persistent: the automatic choice from 61 rows per expert since its
                       // measure (H100, 2026-12-07: 5-11% faster, choose_grouped)
    wgmma_pf8_128x128, // wgmma_f8_128x128, persistent; where W4A8 does not apply it runs as wgmma_pws_256x128
    wgmma_pf8_128x32,  // wgmma_f8_128x32, persistent; where W4A8 does not apply it runs as wgmma_256x32
    wgmma_rf8_128x128, // W4A8 with the weights' e4m3 codes decoded in the MMA warps' registers (wgmma A from
                       // registers, as the register-A bf16 tiles), persistent; official MXFP4 only, else it runs
                       // as wgmma_pws_256x128. Not chosen automatically (written without a GPU, gemm.cu).
    wgmma_rf8_128x32,  // the same for 32 tokens per tile (T ≈ 1024); elsewhere it runs as wgmma_256x32
};

// A kernel shape: a CTA of wr·wt warps covers `rows` weight rows × `tokens` tokens per tile.
struct TiledConfig {
    Tile        tile;
    const char* name;        // the enumerator's name, e.g. "mma_128x8"
    int mt, nt, wr, wt;      // per warp: 16·mt weight rows × 8·nt tokens; wr × wt warps (rows × tokens)
    int rows, tokens;        // CTA tile
    int stages;              // shared-memory ring depth (0: the wgmma shapes, chosen per format)
};
// Every shape (Tile::automatic excluded), in enum order: iterate this to run or print them all.
const std::vector<TiledConfig>& tiled_configs();
const TiledConfig& tiled_config(Tile tile);       // throws for automatic and for values naming no shape
const char* tile_name(Tile tile);                 // "automatic", "mma_128x8", ...; throws like tiled_config
std::string tiled_config_name(Tile tile);         // name and shape, for logs and test messages
Tile tile_from_name(const std::string& name);     // inverse of tile_name; throws listing the names

// Device scratch of the dense wgmma path, owned by the caller (a DeviceBuffer, or a piece of a
// DeviceArena): x in the kernel's column order, then the split-K partial sums. The library keeps
// no scratch of its own, so a call allocates nothing and depends on no state outside its
// arguments. One scratch must not serve two calls that may run at the same time (calls on one
// stream are ordered by it; calls on different streams need a scratch each).
struct GemmScratch {
    void*  p = nullptr;   // device, 16-byte aligned (cudaMalloc / DeviceArena memory is 256-aligned)
    size_t bytes = 0;
};

// Scratch bytes that make linear_tiled (and linear for M > 16) run its wgmma path with split-K
// for any call of w with 1..M rows and options o, whatever the tile (the largest of the permuted x
// and the partial sums over those calls; the split depends on the current device's SM count).
// 0 when w never takes the wgmma path (f32, fp8 NaN codes, K not a whole number of steps). Reads
// only w's layout, so w may be a plan from a counting arena (upload_linear).
size_t linear_scratch_bytes(const DeviceLinear& w, int64_t M, const LinearOptions& o);

// y[M, N] = x[M, K·groups] · Wᵀ (see LinearOptions): M ≤ 16 → linear_small_m; M ≤ kRegsMaxM with
// regs_fits (FP8 blocks or BF16 weights; linear.h) → linear_regs; else linear_tiled.
// x bf16 row-major [M, K·groups] (16-byte aligned; for the tiled path K % 8 == 0), y f32 or bf16
// [M, N]. Asynchronous, deterministic, allocation-free and graph-capturable: the wgmma path takes
// its buffers from `scratch` (see GemmScratch), which the caller owns, so capture needs no warm-up
// call and a captured graph keeps using that same memory (it must outlive the graph, and no other
// work may use it while the graph runs). scratch == nullptr or smaller than the call needs: the
// mma.sync kernel (no x buffer) or wgmma without split-K (no room for the partial sums) — the same
// results up to summation order.
void linear(const DeviceLinear& w, const uint16_t* x_bf16, int64_t M, void* y, const LinearOptions& o,
            const GemmScratch* scratch, CUstream_st* stream);

// The tiled kernel for any M ≥ 1 (what linear uses for M > 16). f32 weights, fp8 weights with NaN
// codes and x that 16-byte copies cannot read go to linear_reference. `tile` forces a kernel shape
// (tests, benchmarks; a wgmma tile without enough scratch runs as linear describes); automatic
// chooses from M.
void linear_tiled(const DeviceLinear& w, const uint16_t* x_bf16, int64_t M, void* y, const LinearOptions& o,
                  const GemmScratch* scratch, CUstream_st* stream, Tile tile = Tile::automatic);

// ------------------------------------------------------------------------ routed experts

// The routed experts of one MoE layer on the device: E × (w1, w3 [I, D], w2 [D, I]) in one format
// (NVFP4 or MXFP4, the releases' expert formats; others are refused), each uploaded with
// upload_linear, plus the per-expert parameter tables the grouped kernels read. Two ways to place
// them: into a caller's DeviceArena (a model's weights in one allocation; plan with a counting
// arena first: the same constructor checks and counts, then carve from the real arena), or
// standalone, in one allocation this object owns. Move-only; a moved-from object has no experts.
class DeviceExperts {
public:
    DeviceExperts() = default;
    // Standalone: every weight and both tables in one allocation owned here. Throws megamoe::Error.
    explicit DeviceExperts(const std::vector<ExpertWeights>& experts);
    // Into `arena`, in order: per expert w1, w3, w2 (upload_linear), then the L1 and L2 tables.
    // The views point into the arena, which must outlive this object. A counting arena: checks
    // and counts only, no CUDA call (the result has the shapes, null device pointers).
    DeviceExperts(const std::vector<ExpertWeights>& experts, DeviceArena& arena);
    // From expert matrices already on the device ([E] each, e.g. synth_linear or upload_linear
    // views; this object views them too): the same checks, and the two tables carved from `arena`
    // (a counting arena: counted only).
    DeviceExperts(std::vector<DeviceLinear> w1, std::vector<DeviceLinear> w3, std::vector<DeviceLinear> w2,
                  DeviceArena& arena);

    LinearFormat format = LinearFormat::nvfp4;
    int64_t E = 0, D = 0, I = 0;
    std::vector<DeviceLinear> w1, w3, w2;   // [E] each, views
    void* l1_table = nullptr;               // device [E]: per-expert (w1, w3) descriptors
    void* l2_table = nullptr;               // device [E]: per-expert w2 descriptors
    size_t bytes() const;                   // packed checkpoint bytes of all experts

private:
    DeviceArena own_;   // the standalone constructor's allocation (a counting arena otherwise)
    void place(const std::vector<ExpertWeights>& experts, DeviceArena& arena);   // checks, uploads, tables()
    void tables(DeviceArena& arena);   // checks w1, w3, w2 and sets the shapes; carves and fills the tables
};

// Device buffers for the routed-expert layer at up to T_max tokens (allocated once; the calls
// below allocate nothing). Move-only; a moved-from workspace holds no buffers.
//
// skip_bucket (expert parallelism, docs/multi-gpu.md §6 step 4): the dispatch gets ex.E + 1
// buckets, and ids may name bucket ex.E ("skip": a slot another rank computes). moe_layer_routed
// routes and gathers those slots like the others (they sort after every expert's rows) but never
// computes them: ws.h and ws.rows hold results only for rows [0, dispatch.offsets[ex.E]), which is
// what a rank hands back to the exchange. The calls that combine every slot (moe_layer,
// moe_layer_combine) and the small-T path (which reads ids itself) refuse such a workspace.
class MoeLayerWorkspace {
public:
    MoeLayerWorkspace() = default;
    MoeLayerWorkspace(int64_t T_max, int64_t k, const DeviceExperts& ex, bool skip_bucket = false);   // throws

    MoeDispatchWorkspace     dispatch;   // counts, offsets, perm, inv, xs [T_max·k, D], ws
    DeviceArray<uint16_t>    h;          // [T_max·k, I] bf16, L1 output
    DeviceArray<uint16_t>    xp;         // [T_max·k, max(D, I)] bf16: xs or h in wgmma column order (large T)
    DeviceArray<float>       rows;       // [T_max·k, D] f32, L2 output (routing weight already applied)
    DeviceArray<int32_t>     items;      // [max_items, 4] int32: work list of the grouped kernels
    DeviceArray<int32_t>     n_items;    // [2] int32: items of L1's tile size, of L2's
    int64_t                  max_items = 0;
    bool                     skip_bucket = false;   // dispatch.E = experts + 1 (see above)
    // mma_256x32 / mma_256x48 (the tiles of 12-60 rows per expert): each warp multiplies only the
    // 8-token column tiles of a work item that hold rows, and x is copied only for those, so a
    // 48-token tile of 20 rows costs about what a 24-token one would. Same results bit for bit
    // (the skipped columns are never stored). On by default since its measure (NVIDIA H100 80GB
    // HBM3, 2026-12-07: V4-Flash T = 768-2048, both formats, uniform and skewed routing, 1-24%
    // faster at every point; docs/bench-gemm.md); megamoe-gemm-bench --skip-dead 0 turns it off.
    bool                     skip_dead_ntiles = true;
    size_t bytes() const;                // device bytes held
};

// L1 of the routed experts over the rows of ws.dispatch (after route + gather):
// h[j, :] = silu(min(g, limit)) · clamp(u, -limit, limit) · ws[j] in bf16, g/u from w1/w3 of the
// expert that row j belongs to (offsets). N = T·k rows. `tile` as in linear_tiled (automatic: from
// the mean rows per expert).
void moe_l1(const DeviceExperts& ex, float swiglu_limit, MoeLayerWorkspace& ws, int64_t N, CUstream_st* stream,
            Tile tile = Tile::automatic);
// L2: rows[j, :] = h[j, :] · w2[e]ᵀ (f32).
void moe_l2(const DeviceExperts& ex, MoeLayerWorkspace& ws, int64_t N, CUstream_st* stream,
            Tile tile = Tile::automatic);

// The whole routed-expert layer: y[T, D] = Σ_s weights[t, s] · expert_{ids[t, s]}(x[t]) (+ shared[t]
// added last, if not null), in the slot order of ops::moe. x bf16 [T, D], ids int32 [T, k],
// weights f32 [T, k], shared f32 [T, D] or null, y f32 [T, D]: all device pointers. No host
// synchronization, no allocation: for a fixed T the call can be captured into a CUDA graph and
// replayed with new x / ids / weights. (The two-launch small-T path is moe_layer_small, below.)
void moe_layer(const DeviceExperts& ex, float swiglu_limit, const uint16_t* x_bf16, const int32_t* ids,
               const float* weights, int64_t T, const float* shared, float* y, MoeLayerWorkspace& ws,
               CUstream_st* stream, Tile tile = Tile::automatic);

// moe_layer in two calls, for a caller that overlaps other work with the experts (the runner: the
// shared expert on a side stream, joined before the combine that adds it). moe_layer_routed leaves
// each slot's expert output in ws.rows; moe_layer_combine reads ws.rows and shared (the same T).
// Numerics::official (ops::moe's official numerics; x is then the FP8-rounded input): the w1 / w3
// outputs rounded to bf16 before the SwiGLU, h FP8-rounded in 128-blocks before w2, and in the
// combine each slot's row and the shared output rounded to bf16 before the sum, and y after it.
void moe_layer_routed(const DeviceExperts& ex, float swiglu_limit, const uint16_t* x_bf16, const int32_t* ids,
                      const float* weights, int64_t T, MoeLayerWorkspace& ws, CUstream_st* stream,
                      Tile tile = Tile::automatic, Numerics nm = Numerics::exact);
void moe_layer_combine(MoeLayerWorkspace& ws, int64_t T, const float* shared, float* y, CUstream_st* stream,
                       Numerics nm = Numerics::exact);

// Whether moe_layer_routed runs Tile::wgmma_f8_128x128 / wgmma_f8_128x32 as W4A8 (MXFP4 weights × FP8
// activation codes on the FP8 tensor core) when asked for one: official numerics, MXFP4 experts, D and I
// multiples of 128 with unpadded device rows. Then x (already FP8-rounded) and h are quantized to
// e4m3 codes and 128-block scales in ws.xp (cuda::quantize_gemm_input / fp8_block_round_q: h is
// still FP8-rounded in place, as on the other tiles) and L1 / L2 multiply codes by codes (gemm.cu:
// the products are the official W4A8 GEMM's; the FP8 tensor core's accumulation is promoted to f32
// every 128 columns, as DeepSeek's and cuBLASLt's FP8 GEMMs do, so rows differ from the bf16 tiles'
// by that accumulator's precision, not only by f32 summation order: the tests bound it by 2^-10 of
// Σ|w·h|). Otherwise those tiles run as wgmma_ws_256x128 / wgmma_256x32 (the persistent
// wgmma_pf8_128x128 / wgmma_pf8_128x32 as wgmma_pws_256x128 / wgmma_256x32, and wgmma_rf8_128x128 /
// wgmma_rf8_128x32 — whose codes moe_layer_routed quantizes in register-A order, w4a8::ra_word — as
// wgmma_pws_256x128 / wgmma_256x32).
bool moe_w4a8_fits(const DeviceExperts& ex, Numerics nm);
// The W4A8 tile for a tile the automatic choice took: wgmma_ws_256x128 → wgmma_f8_128x128,
// wgmma_256x32, wgmma_2cta_256x32, mma_256x32 or mma_256x48 → wgmma_f8_128x32, wgmma_pws_256x128 →
// wgmma_pf8_128x128; any other tile stays (the mma.sync tiles of fewer rows per expert).
Tile w4a8_tile(Tile automatic_choice);

#if defined(__CUDACC__)
#define MEGAMOE_GEMM_HD __host__ __device__ __forceinline__
#else
#define MEGAMOE_GEMM_HD inline
#endif
// The persistent tiles' walk (gemm.cu, TileWalk): CTA b of a grid of `grid` takes tiles b,
// b + grid, b + 2·grid, ... of the list's n_items × row_tiles tiles in row-tile-major order; its
// i-th is row tile rt of work item `item`, or none (false) past the list. Host and device (the
// kernels' walk, and a CPU test that every tile is taken once).
MEGAMOE_GEMM_HD constexpr bool persistent_tile(int b, int i, int grid, int row_tiles, int n_items, int& item, int& rt) {
    const int t = b + i * grid;
    if (t >= n_items * row_tiles) return false;
    item = t / row_tiles;
    rt = t - item * row_tiles;
    return true;
}

// The small-T path (moe_small.cu): two launches that read their routing straight from ids (no
// route / gather / work list / combine kernels), L1 writing h at each slot's own row (ws.h row
// t·k + s) and L2 combining in slot order itself (ws.rows and the dispatch buffers are not used).
// Same contract as moe_layer (nm: as moe_layer_routed + moe_layer_combine). Applies when
// moe_small_fits: 1 ≤ T ≤ kMoeSmallMaxT, T·k ≤ kMoeSmallMaxSlots, NVFP4 or MXFP4 experts, x and
// every expert tensor 16-byte aligned, w2's rows at most 32 steps of 64 bytes (I ≤ 4096), and at
// least two ring stages of each half fit its shared memory beside x (V4-Pro: T ≤ 4);
// moe_layer_small throws otherwise. Measured against moe_layer on an H200 (docs/bench-gemm.md,
// "small-T path"): faster at T = 1 (V4-Flash NVFP4 46.2 against 54.0 µs), even at T = 2-4, slower
// at T = 8; since then, on an H100 (2026-12-07), T = 3 / 4 111.2 / 134.9 against 135.8 / 164.4 µs;
// the runner takes it at 1-4 tokens, and at 5-8 for NVFP4 experts in exact numerics (runner.cpp's
// small_max_t says why).
constexpr int64_t kMoeSmallMaxT = 8;       // one n8 MMA token tile
constexpr int64_t kMoeSmallMaxSlots = 64;
bool moe_small_fits(const DeviceExperts& ex, int64_t T, int64_t k, const uint16_t* x_bf16);
void moe_layer_small(const DeviceExperts& ex, float swiglu_limit, const uint16_t* x_bf16, const int32_t* ids,
                     const float* weights, int64_t T, const float* shared, float* y, MoeLayerWorkspace& ws,
                     CUstream_st* stream, Numerics nm = Numerics::exact);
// The small path's launch plan for T tokens of k slots on a device with SM facts f (what
// moe_small_fits and the launches use with sm_facts() of the current device; no CUDA call, so it
// can be asked about any device). ok: the path applies (at least two ring stages of each half fit,
// and w2's K steps per L2 warp have a kernel instance: 16 warps of 1-2 or 8 of 3).
// l1_two: L1 runs two CTAs per SM (MXFP4 at T ≤ 4 where two CTAs' shared memory fits an SM).
// Throws for T outside [1, kMoeSmallMaxT], T·k > kMoeSmallMaxSlots, or experts without shapes.
struct MoeSmallPlan {
    bool ok = false;
    bool l1_two = false;
    int grid1 = 0, grid2 = 0;             // CTAs of L1 and L2
    int stages1 = 0, stages2 = 0;         // ring stages
    int warps2 = 0, spw2 = 0;             // L2's consumer warps and w2's 128-column K steps per warp
    int64_t smem1 = 0, smem2 = 0;         // dynamic shared memory per CTA, bytes
    int64_t static_smem = 0;              // static shared memory of either kernel (the plan's bound), bytes
};
MoeSmallPlan moe_small_plan(const DeviceExperts& ex, int64_t T, int64_t k, const SmFacts& f);
// Its two launches, for a caller that overlaps other work with L1 (the runner: the shared expert on
// a side stream, joined before L2). moe_small_l1 writes ws.h; moe_small_l2 reads ws.h, ids (the same
// as L1's) and shared, and writes y. x is L1's input (moe_small_l2 takes it only for the same
// moe_small_fits check). moe_layer_small = moe_small_l1, then moe_small_l2 on the same stream.
void moe_small_l1(const DeviceExperts& ex, float swiglu_limit, const uint16_t* x_bf16, const int32_t* ids,
                  const float* weights, int64_t T, MoeLayerWorkspace& ws, CUstream_st* stream,
                  Numerics nm = Numerics::exact);
void moe_small_l2(const DeviceExperts& ex, const uint16_t* x_bf16, const int32_t* ids, int64_t T, const float* shared,
                  float* y, MoeLayerWorkspace& ws, CUstream_st* stream, Numerics nm = Numerics::exact);
// Expert parallelism (dist/exchange.h): a slot whose id lies outside [0, ex.E) — padding, or the
// skip id ex.E of a slot another rank computes — has no expert on either half: not computed, and
// it adds nothing (that holds for moe_small_l2 too). The workspace may then be a skip-bucket one
// (its h is all the small path uses). moe_small_l2_placed is L2 writing what the exchange sends
// home instead of y (no shared, no final rounding): slot_rows: out [T, k, D] f32, each slot's row
// (0 for a slot without expert); else out [T, D] f32, the sum over the slots with an expert in slot
// order from 0. official: each slot's row rounded to bf16 first (moe_layer_combine's rule).
void moe_small_l2_placed(const DeviceExperts& ex, const uint16_t* x_bf16, const int32_t* ids, int64_t T,
                         bool slot_rows, float* out, MoeLayerWorkspace& ws, CUstream_st* stream,
                         Numerics nm = Numerics::exact);

// The kernel shape Tile::automatic picks: moe_layer for T tokens, linear_tiled for M rows (with
// enough scratch; without, a wgmma choice runs as mma_256x128).
Tile moe_layer_config(const DeviceExperts& ex, int64_t T, int64_t k);
Tile linear_tiled_config(const DeviceLinear& w, int64_t M, const LinearOptions& o);

}  // namespace megamoe::cuda
