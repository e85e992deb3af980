// runner.cpp — the GPU forward (mirrors ref/forward.cpp block by block; see runner.h).
#include "gpu/runner.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <iomanip>
#include <map>
#include <ostream>
#include <sstream>

#include "cuda/attention.h"
#include "cuda/buffer.h"
#include "cuda/compressor.h"
#include "cuda/gemm.h"
#include "cuda/hyper_conn.h"
#include "cuda/linear.h"
#include "cuda/linear_lt.h"
#include "cuda/numerics.h"
#include "cuda/router.h"
#include "cuda/sampler.h"
#include "cuda/rowwise.h"
#include "cuda/step.h"
#include "dist/exchange.h"
#include "gpu/device_model.h"
#include "gpu/state_pool.h"
#include "io/formats.h"
#include "ref/speculative.h"

namespace megamoe::gpu {

namespace {

constexpr int64_t kGraphChunkMax = 4;   // tokens per chunk of graph-replayed steps (1 + the most drafts)

void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        fail("gpu runner: ", what, ": ", cudaGetErrorString(e));
    }
}

std::string mib(size_t b) { return str(b / (1 << 20), " MiB"); }

// Bytes the checkpoint stores for the weights the device holds (the uploaded walk).
struct CheckpointBytes : WeightVisitor {
    size_t bytes = 0;
    void tensor(const std::string&, DType t, const std::vector<int64_t>& shape, Tensor&) override {
        int64_t n = 1;
        for (int64_t d : shape) n *= d;
        bytes += static_cast<size_t>(n) * dtype_size(t);
    }
    void linear(const std::string&, LinearFormat f, int64_t out, int64_t in, Linear&) override {
        bytes += static_cast<size_t>(format_info(f).packed_bytes(out, in));
    }
};

}  // namespace

std::string MemoryPlan::describe() const {
    std::ostringstream os;
    os << "GPU memory plan:\n"
       << "  weights    " << mib(weights);
    if (ep_world > 1)
        os << " (this GPU's share: 1/" << ep_world << " of the routed experts" << (head_slice ? " and of the head" : "")
           << ", the rest whole; the whole checkpoint " << mib(checkpoint) << ")\n";
    else
        os << " (checkpoint " << mib(checkpoint) << ")\n";
    os
       << "  workspace  " << mib(workspace) << "\n"
       << "  slots      " << mib(slots) << " (per-sequence windows and open compressor windows)\n"
       << "  state pool " << mib(blocks) << " = " << block_count << " blocks of " << block_tokens
       << " positions: " << context_tokens << " tokens of context in all, up to " << max_model_len
       << " per sequence\n"
       << "  prefix     " << mib(snapshots) << " = " << snapshot_count
       << " snapshot records (prefix caching; their rows stay in the pool's blocks)\n";
    if (draft_logits > 0)
        os << "  drafts     " << mib(draft_logits) << " (each slot's draft logits: speculative sampling)\n";
    os << "  KV rows    " << (kv_fp8 ? "fp8 (e4m3 latent, bf16 rope dims), " : "bf16, ") << kv_row_bytes << " bytes";
    if (kv_fp8) os << " (bf16 rows: " << kv_row_bytes_bf16 << ")";
    if (fit_tokens > 0) {
        os << "; the memory left holds " << fit_tokens << " positions of compressed state";
        if (kv_fp8 && fit_tokens_bf16 > 0)
            os << ", " << fit_tokens_bf16 << " with bf16 rows (x" << std::fixed << std::setprecision(2)
               << static_cast<double>(fit_tokens) / static_cast<double>(fit_tokens_bf16) << ")";
    }
    os << "\n";
    return os.str();
}

size_t device_weight_bytes(const Model& model) { return DeviceModel::plan_bytes(model); }

static_assert(cuda::kStreamDraft == static_cast<uint32_t>(SpecStream::draft) &&
                  cuda::kStreamAccept == static_cast<uint32_t>(SpecStream::accept) &&
                  cuda::kStreamResidual == static_cast<uint32_t>(SpecStream::residual),
              "the device's random-number streams are ref/speculative.h's");

// ------------------------------------------------------------------------------------------------
// The workspace: activations and scratch for up to T tokens, C chunks and R logit rows, carved
// from one allocation.

// Official numerics at up to this many tokens per step: the FP8 linears run FP8 × FP8
// (cuda::linear_fp8_act, the small-M regime it is built for) on codes made where their rounded
// input is made. From cuda::kLtMinM tokens on (RunnerOptions::lt_fp8) the same codes go to
// cuBLASLt's block-scaled FP8 GEMM (cuda::LtGemm); in between, the BF16 path on the rounded
// values (cuda::linear → linear_regs: the same values, decoded weights). RunnerOptions::
// fp8_act_max_t and lt_min_out override the rule (to compare).
// Why 8 (one token tile): at 9-16 tokens linear_fp8_act's two-tile instance (two CTAs per SM, 128
// registers) spills and was slower than linear_regs on every V4-Flash and V4-Pro linear it runs
// (wo_a is a bf16 einsum in the official code) (H100, megamoe-gemm-bench --part linears --model all
// --format fp8 --M 16: Flash wq_b 19.51 against 17.09 µs, wo_b 19.10 / 16.64, wq_a 6.61 / 5.32; Pro
// wq_b 54.31 / 46.26, wo_b 66.39 / 53.52), and the 8-layer official step with this rule against 16
// (megamoe-forward-bench --numerics official --fp8-act-max 8, two rounds, same call): B = 12 5128.8
// / 5114.5 → 5007.8 / 5007.1 µs, B = 16 5671.9 / 5668.4 → 5543.7 / 5540.3, B = 4 and 8 even (same
// kernels). At 1-8 tokens linear_fp8_act is the faster (M = 1: wo_b 13.62 against 14.50 µs,
// docs/bench-forward.md). At 32-64 tokens cuBLASLt stays for every FP8 linear although
// linear_fp8_act is faster alone on the small ones (M = 64: wq_a 8.91 against 15.47 µs): the step
// measured slower with them on linear_fp8_act (B = 32 8094.4 → 8166.5 µs, B = 64 11418.1 → 11561.0
// with lt_min_out = 4096; with every linear on linear_fp8_act 8170.7 / 11764.0); those linears run
// beside others on the side streams, where (our reading, not profiled) cuBLASLt's few CTAs leave
// the SMs to them.
constexpr int64_t kFp8ActMaxT = 8;
// A CSA layer's indexer queries run on side stream 2 at up to this many tokens (cuda::linear's
// small-M kernels, which need no scratch: M ≤ 16).
constexpr int64_t kIdxSideMaxT = 16;

struct Workspace {
    int64_t T = 0, C = 0, R = 0, max_rows = 0, part_floats = 0;
    float* X = nullptr;              // [T, hc, D] residual streams
    float* X2 = nullptr;             // [T, hc, D]
    float* part = nullptr;           // hc_mix partial sums
    float* post = nullptr;           // [T, hc]
    float* comb = nullptr;           // [T, hc, hc]
    uint16_t* xn = nullptr;          // [T, D] bf16 normalized sublayer input
    uint16_t* xq = nullptr;          // [T, D] bf16 official numerics: xn FP8-rounded (the quantized linears' input)
    float* y = nullptr;              // [T, D] sublayer output
    // attention
    float* qr_f = nullptr;           // [T, q_lora]
    uint16_t* qr = nullptr;          // [T, q_lora] bf16
    uint16_t* qr_q = nullptr;        // [T, q_lora] bf16 official numerics: qr FP8-rounded
    float* q_f = nullptr;            // [T, H·hd]
    uint16_t* q = nullptr;           // [T, H, hd] bf16
    float* kv_f = nullptr;           // [T, hd]
    uint16_t* kv = nullptr;          // [T, hd] bf16
    float* ckv = nullptr;            // [T, 2·hd] compressor projections
    float* cgate = nullptr;          // [T, 2·hd]
    float* ikv = nullptr;            // [T, 2·dI] indexer compressor projections
    float* igate = nullptr;          // [T, 2·dI]
    float* iq_f = nullptr;           // [T, nI·dI]
    uint16_t* iq = nullptr;          // [T, nI, dI] bf16
    float* iw = nullptr;             // [T, nI]
    float* scores = nullptr;         // [T, max_rows]
    int32_t* topk = nullptr;         // [T, index_topk]
    uint16_t* o = nullptr;           // [T, H, hd] bf16
    uint16_t* z = nullptr;           // [T, G·R] bf16
    // MoE
    float* gate_logits = nullptr;    // [T, E]
    int32_t* ids = nullptr;          // [T, k]
    float* wts = nullptr;            // [T, k]
    float* sh_g = nullptr;           // [T, I]
    float* sh_u = nullptr;           // [T, I]
    uint16_t* sh_h = nullptr;        // [T, I] bf16
    float* sh_out = nullptr;         // [T, D]
    // Official numerics at T ≤ kFp8ActMaxT tokens, and at T ≥ cuda::kLtMinM with cuBLASLt: the FP8
    // linears' inputs as e4m3 codes + block scales (made in the same pass as the rounded bf16 copy).
    // [T8, K] u8 and [T8, K / 128] f32 each, T8 = T with cuBLASLt, else min(T, act_max).
    int64_t T8 = 0;
    bool lt_codes = false;           // carve codes for every T (cuBLASLt on)
    int64_t act_max = kFp8ActMaxT;   // the runner's fp8_act_max
    uint8_t* xq8 = nullptr;          // of xq: K = D
    float* xs8 = nullptr;
    uint8_t* qr8 = nullptr;          // of qr_q: K = q_lora
    float* qrs8 = nullptr;
    uint8_t* z8 = nullptr;           // of z: K = G·R
    float* zs8 = nullptr;
    uint8_t* sh8 = nullptr;          // of sh_h: K = I
    float* shs8 = nullptr;
    // head
    uint16_t* sel = nullptr;         // [R, D] bf16
    float* logits = nullptr;         // [R, V]
    cuda::GemmScratch gemm;          // the wgmma path's permuted x and split-K partials
    cuda::GemmScratch gemm_side;     // the same for linears on the side stream
    cuda::GemmScratch gemm_side2;    // and on the second side stream (attention compressor, shared w3)
    // step inputs (device); their pinned mirror has the same layout
    int32_t* in = nullptr;           // [in_ints]
    int64_t in_ints = 0;
    int32_t* tokens = nullptr;       // [T]
    int32_t* pos = nullptr;          // [T]
    int32_t* slot = nullptr;         // [T]
    int32_t* chunk = nullptr;        // [T]
    int32_t* chunk_first = nullptr;  // [C]
    int32_t* chunk_len = nullptr;    // [C]
    int32_t* rows = nullptr;         // [R] batch index of each logit row
    int32_t* iota = nullptr;         // [T] 0, 1, ... (forced expert ids go through the hash path)
    int32_t* forced_ids = nullptr;   // [T, k] expert ids given by a probe
    int32_t* mtp_next = nullptr;     // [T] the token after each position (MTP pass; in the step inputs)
    int32_t* next_given = nullptr;   // [T] speculative steps: resolve_next_tokens' `given` (step inputs)
    bool with_mtp = false;           // carve the MTP pass's buffers
    uint16_t* mtp_h = nullptr;       // [T, hc, D] bf16 hnorm of the main streams
    float* mtp_pe = nullptr;         // [T, D] e_proj of the next tokens' embedding
    int32_t* mtp_ids = nullptr;      // [R] the MTP block's draft per row (speculative steps)
    int32_t* chain_in = nullptr;     // [5, C] chained drafting: gathered token rows, start positions, slots, d_1,
                                     // and the start tokens' logit rows (d_1's logits, kept for the rule)
    int32_t* chain_out = nullptr;    // [kGraphChunkMax - 1, C] chained drafts, one block per step
    // sampling (per logit row): parameters in, draws out; each block one copy per step
    void* samp_in = nullptr;         // seed u64 [R], index i64 [R], temperature, top_p, min_p f32 [R], top_k i32 [R],
                                     // then for speculative steps q_row i64 [R], draft i32 [R] (spec_accept_rows)
    size_t samp_in_bytes = 0;
    void* samp_out = nullptr;        // ids i32 [R], logprob f32 [R], top ids i32 [R, 20], top logprobs f32 [R, 20],
                                     // accepted i32 [R] (speculative steps)
    size_t samp_out_bytes = 0;
    cuda::SampleScratch samp_scratch;   // the sampler's pass A over parts of few rows (cuda::sample_parts)
    int32_t* masked = nullptr;       // [V] ids never sampled (the first n_masked)

    // Carves every buffer from `a` (a counting arena first, then the real one).
    void carve(cuda::DeviceArena& a, const ModelConfig& c, int64_t gemm_bytes, int64_t gemm2_bytes) {
        const int64_t D = c.hidden_size, hc = c.hc_mult, H = c.num_attention_heads, hd = c.head_dim;
        const int64_t nI = c.index_n_heads, dI = c.index_head_dim, E = c.n_routed_experts, k = c.num_experts_per_tok;
        const int64_t I = c.moe_intermediate_size * std::max<int64_t>(1, c.n_shared_experts);
        X = a.take_n<float>(T * hc * D);
        X2 = a.take_n<float>(T * hc * D);
        part = a.take_n<float>(part_floats);
        post = a.take_n<float>(T * hc);
        comb = a.take_n<float>(T * hc * hc);
        xn = a.take_n<uint16_t>(T * D);
        xq = a.take_n<uint16_t>(T * D);
        y = a.take_n<float>(T * D);
        qr_f = a.take_n<float>(T * c.q_lora_rank);
        qr = a.take_n<uint16_t>(T * c.q_lora_rank);
        qr_q = a.take_n<uint16_t>(T * c.q_lora_rank);
        q_f = a.take_n<float>(T * H * hd);
        q = a.take_n<uint16_t>(T * H * hd);
        kv_f = a.take_n<float>(T * hd);
        kv = a.take_n<uint16_t>(T * hd);
        ckv = a.take_n<float>(T * 2 * hd);
        cgate = a.take_n<float>(T * 2 * hd);
        ikv = a.take_n<float>(T * 2 * dI);
        igate = a.take_n<float>(T * 2 * dI);
        iq_f = a.take_n<float>(T * nI * dI);
        iq = a.take_n<uint16_t>(T * nI * dI);
        iw = a.take_n<float>(T * nI);
        scores = a.take_n<float>(T * std::max<int64_t>(max_rows, 1));
        topk = a.take_n<int32_t>(T * std::max<int64_t>(c.index_topk, 1));
        o = a.take_n<uint16_t>(T * H * hd);
        z = a.take_n<uint16_t>(T * c.o_groups * c.o_lora_rank);
        gate_logits = a.take_n<float>(T * E);
        ids = a.take_n<int32_t>(T * k);
        wts = a.take_n<float>(T * k);
        sh_g = a.take_n<float>(T * I);
        sh_u = a.take_n<float>(T * I);
        sh_h = a.take_n<uint16_t>(T * I);
        sh_out = a.take_n<float>(T * D);
        T8 = lt_codes ? T : std::min<int64_t>(T, act_max);
        const int64_t GR = c.o_groups * c.o_lora_rank;
        xq8 = a.take_n<uint8_t>(T8 * D);
        xs8 = a.take_n<float>(T8 * (D / 128 + 1));
        qr8 = a.take_n<uint8_t>(T8 * c.q_lora_rank);
        qrs8 = a.take_n<float>(T8 * (c.q_lora_rank / 128 + 1));
        z8 = a.take_n<uint8_t>(T8 * GR);
        zs8 = a.take_n<float>(T8 * (GR / 128 + 1));
        sh8 = a.take_n<uint8_t>(T8 * I);
        shs8 = a.take_n<float>(T8 * (I / 128 + 1));
        sel = a.take_n<uint16_t>(R * D);
        logits = a.take_n<float>(R * c.vocab_size);
        gemm.bytes = static_cast<size_t>(gemm_bytes);
        gemm.p = a.take(gemm.bytes);
        gemm_side.bytes = static_cast<size_t>(gemm_bytes);
        gemm_side.p = a.take(gemm_side.bytes);
        gemm_side2.bytes = static_cast<size_t>(gemm2_bytes);
        gemm_side2.p = gemm2_bytes > 0 ? a.take(gemm_side2.bytes) : nullptr;
        samp_in_bytes = static_cast<size_t>(R) * 48;
        samp_in = a.take(samp_in_bytes);
        samp_out_bytes = static_cast<size_t>(R) * (12 + 8 * cuda::kMaxTopLogprobs);
        samp_out = a.take(samp_out_bytes);
        samp_scratch.bytes = cuda::sample_scratch_bytes(R);
        samp_scratch.p = a.take(samp_scratch.bytes);
        masked = a.take_n<int32_t>(c.vocab_size);
        in_ints = 7 * T + 2 * C + R;
        in = a.take_n<int32_t>(in_ints);
        if (with_mtp) {
            mtp_h = a.take_n<uint16_t>(T * c.hc_mult * D);
            mtp_pe = a.take_n<float>(T * D);
            mtp_ids = a.take_n<int32_t>(R);
            chain_in = a.take_n<int32_t>(5 * C);
            chain_out = a.take_n<int32_t>((kGraphChunkMax - 1) * C);
        }
        iota = a.take_n<int32_t>(T);
        forced_ids = a.take_n<int32_t>(T * k);
        tokens = in;
        pos = tokens + T;
        slot = pos + T;
        chunk = slot + T;
        chunk_first = chunk + T;
        chunk_len = chunk_first + C;
        rows = chunk_len + C;
        mtp_next = rows + R;
        next_given = mtp_next + T;
    }
};

// ------------------------------------------------------------------------------------------------

struct Runner::Impl {
    RunnerOptions opt;
    Numerics nm = Numerics::exact;   // opt.numerics resolved
    ModelConfig cfg;
    MemoryPlan plan;
    std::unique_ptr<DeviceModel> dm;
    std::unique_ptr<StatePool> pool;
    Workspace ws;
    cuda::DeviceArena ws_arena;
    cuda::MoeLayerWorkspace moe_ws;               // the routed experts of a whole layer (no EP; the MTP block)
    cuda::MoeLayerWorkspace moe_ws_ep;            // expert parallelism: the rows that arrive, with a skip bucket
    cudaStream_t stream = nullptr;
    // Side streams for work that does not depend on the main chain (side 0: the kv latent beside
    // the q path, then the indexer's compressor; the shared expert beside the routed experts.
    // Side 1: the attention compressor; the shared expert's w3): at small batches these chains
    // are latency-bound, and running them side by side shortens the step. Side 2: a CSA layer's
    // indexer queries and head weights beside wq_b at ≤ kIdxSideMaxT tokens. Captured graphs keep
    // the forks and joins as edges. Eager profiling (profile_step) runs everything on one stream.
    static constexpr int kSides = 3;
    cudaStream_t side[kSides] = {};
    std::vector<cudaEvent_t> events;              // fork / join events, one pair per site
    bool concurrent = true;
    bool fp8_act_on = true;   // RunnerOptions::fp8_activations
    int64_t fp8_act_max = kFp8ActMaxT;   // linear_fp8_act at up to this many tokens (RunnerOptions::fp8_act_max_t)
    int64_t lt_min_out = 0;   // where both apply, cuBLASLt for linears of ≥ this many rows (RunnerOptions::lt_min_out)
    int64_t fp8_launches = 0; // FP8 × FP8 linear calls enqueued (linear_fp8_act or cuBLASLt)
    int64_t lt_launches = 0;  // of those, through cuBLASLt
    int64_t lt_bf16_launches = 0;   // bf16-input linears through cuBLASLt's BF16 GEMM
    int64_t idx_side_launches = 0;  // CSA indexer queries enqueued on side stream 2
    int64_t moe_small_count = 0;    // MoE layers enqueued through the small-T expert path
    // cuBLASLt: its block-scaled FP8 GEMM for the FP8 linears of steps of ≥ cuda::kLtMinM tokens
    // (official numerics, RunnerOptions::lt_fp8), its BF16 GEMM for the bf16-input linears of steps
    // of ≥ cuda::kLtBf16MinM tokens (RunnerOptions::lt_bf16); null when neither can apply.
    std::unique_ptr<cuda::LtGemm> lt;
    bool lt_fp8_on = false, lt_bf16_on = false;
    int next_event = 0;
    int32_t* pinned_in = nullptr;                 // [ws.in_ints]
    void* pinned_samp_in = nullptr;               // [ws.samp_in_bytes]
    void* pinned_samp_out = nullptr;              // [ws.samp_out_bytes]
    int32_t* pinned_drafts = nullptr;             // [ws.R] the MTP block's drafts of a speculative step
    int32_t* pinned_chain = nullptr;              // [5 C + (kGraphChunkMax - 1) C] draft_chain's inputs and drafts
    // Speculative sampling (RunnerOptions::rollback with an MTP block): per slot the logits its
    // drafts d_1 .. d_K were drawn from, f32 [n_slots + 1, kMaxSpeculativeTokens, V] (the padding
    // slot's rows are scratch), written by draft_chain and read by the next step_spec's rule.
    cuda::DeviceBuffer draft_q;
    int64_t n_masked = 0;
    float* pinned_logits = nullptr;               // [R, V]
    std::map<int64_t, cudaGraphExec_t> graphs;    // (decode bucket, output mode) -> graph
    std::vector<int64_t> buckets;
    int64_t replays = 0;
    double replay_launch_us = 0;   // host time inside cudaGraphLaunch over all replays
    // Stage events of profile_step (eager steps only).
    bool profiling = false;
    std::vector<std::pair<const char*, cudaEvent_t>> marks;
    void mark(const char* stage) {
        if (!profiling) return;
        cudaEvent_t e = nullptr;
        check(cudaEventCreate(&e), "profile event");
        check(cudaEventRecord(e, stream), "profile event");
        marks.push_back({stage, e});
    }

    // m: upload its weights; null: synthesize random weights of config c with `seed`.
    Impl(const Model* m, const ModelConfig& c, uint64_t seed, const RunnerOptions& o, std::ostream* log);
    ~Impl();

    // One step's shapes.
    struct Shape {
        int64_t T = 0, C = 0, R = 0;
        int64_t X = 0;   // expert parallelism: tokens every rank's exchange calls move (≥ T); 0: no exchange
        int64_t RX = 0;  // the head split by vocabulary: rows every rank's head exchange moves (≥ R); 0: none
    };
    int64_t exchange_rows = 0;                    // set_exchange_rows
    int64_t head_rows = 0;                        // set_head_rows
    // The head of a step's R logit rows (ws.sel) into ws.logits; with the vocabulary exchange, RX
    // rows of every rank through it.
    void head_logits(int64_t R, int64_t RX) {
        if (!opt.head_exchange) {
            linear(dm->head, ws.sel, R, ws.logits);
            return;
        }
        dist::HeadExchange& hx = *opt.head_exchange;
        hx.gather(ws.sel, RX, stream);
        linear(dm->head, hx.hidden_all(), hx.rows(), hx.slice_logits());
        hx.scatter(ws.logits, stream);
    }
    void need_mtp() const {
        if (!dm->mtp) fail("gpu runner: the checkpoint has no multi-token-prediction block (mtp.0.* tensors)");
        if (opt.head_exchange)
            fail("gpu runner: the MTP block's passes run on one GPU (with the head split by vocabulary every rank "
                 "would have to run them in lockstep)");
    }
    Shape last_shape;                             // of the last step run (the MTP pass's shape)
    int64_t last_rows = 0;                        // its logit rows without graph padding
    int64_t last_rows_all = 0;                    // its logit rows with padding (== last_shape.T: every token)
    std::vector<int64_t> last_chunk_lens;         // its chunks' token counts (empty: no step to follow)
    std::vector<int32_t> last_pos, last_slot;     // its tokens' positions and slots (host copies)
    std::vector<int32_t> last_logit_row;          // its tokens' logit rows (-1: none)
    bool chain_ready = false;                     // ws.X holds the MTP pass's streams of the last step_spec
    // The MTP pass over the last step's positions (next tokens already in ws.mtp_next): `rows` logit
    // rows back (the step's real tokens, in order).
    void mtp_pass(int64_t rows, std::vector<float>& mtp_logits);
    // What a step hands back: the logits, or sampled ids, or sampled ids with logprobs.
    // kSpec / kSpecLogprobs: a speculative step (step_spec): the draws (with logprobs), then the
    // MTP block over the same positions fed the resolved next tokens, and its draft per row.
    enum Mode : int { kLogits = 0, kSample = 1, kSampleLogprobs = 2, kSpec = 3, kSpecLogprobs = 4 };
    // A speculative step's extra inputs and output (run()): per chunk whether every token is a
    // logit row, per token the next-token encoding of resolve_next_tokens, and the MTP block's
    // draft per logit row.
    struct SpecIo {
        const std::vector<uint8_t>* every_row = nullptr;   // [chunks]
        const std::vector<int32_t>* next = nullptr;        // [tokens] >= 0 a token, -1: the draw at its row
        std::vector<int64_t> q_row;                        // [rows] the draft check (put_sample_spec)
        std::vector<int32_t> check;                        // [rows]
        std::vector<int32_t> drafts;                       // [rows] out
        std::vector<int32_t> accepted;                     // [rows] out
    };
    void enqueue(const Shape& s, const Probe* probe, int mode = kLogits);
    // A step of B chunks of n0 tokens each (uniform) replays the graph of the smallest bucket ≥ B
    // (padding chunks: n0 tokens of the padding slot at positions 0 .. n0-1); 0: an eager step.
    int64_t pick_bucket(int64_t B, int64_t n0, bool uniform, bool all_logits, bool probe) const {
        if (!uniform || n0 > kGraphChunkMax || !opt.graphs || probe) return 0;
        for (int64_t b : buckets)
            if (b >= B && b * n0 <= ws.T && (all_logits ? b * n0 : b) <= ws.R) return b;
        return 0;
    }
    // Replays the graph kept under `key`, or at its first use runs `work` eagerly (this call's work;
    // first-use work such as kernel attributes happens outside the capture), then captures `work`
    // without running it and keeps the graph. `what` names the warm-up wait in errors.
    template <typename F>
    void replay_or_capture(int64_t key, F&& work, const char* what) {
        auto it = graphs.find(key);
        if (it != graphs.end()) {
            const auto t0 = std::chrono::steady_clock::now();
            check(cudaGraphLaunch(it->second, stream), "graph launch");
            replay_launch_us += std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
            ++replays;
            return;
        }
        work();
        check(cudaStreamSynchronize(stream), what);
        cudaGraph_t g = nullptr;
        check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "begin capture");
        work();
        check(cudaStreamEndCapture(stream, &g), "end capture");
        cudaGraphExec_t exec = nullptr;
        // With stream_priority the captured kernels keep their streams' priorities as node
        // priorities, which a graph launch honours only when instantiated to.
        check(cudaGraphInstantiate(&exec, g, opt.stream_priority ? cudaGraphInstantiateFlagUseNodePriority : 0),
              "instantiate graph");
        (void)cudaGraphDestroy(g);
        graphs[key] = exec;
    }
    // The tokens and logit rows a step of these chunks runs, with a decode graph's padding.
    std::pair<int64_t, int64_t> padded(const std::vector<RunnerChunk>& chunks, bool all_logits) const {
        if (chunks.empty()) return {0, 0};
        const int64_t n0 = static_cast<int64_t>(chunks.front().tokens.size());
        int64_t T = 0, R = 0;
        bool uniform = true;
        for (const RunnerChunk& ch : chunks) {
            const int64_t n = static_cast<int64_t>(ch.tokens.size());
            T += n;
            R += all_logits ? n : 1;
            uniform = uniform && n == n0;
        }
        const int64_t bucket = pick_bucket(static_cast<int64_t>(chunks.size()), n0, uniform, all_logits, false);
        if (!bucket) return {T, R};
        return {bucket * n0, all_logits ? bucket * n0 : bucket};
    }
    // Throws Error on any bad input of a step (run's checks, before anything changes).
    void check_chunks(const std::vector<RunnerChunk>& chunks, bool all_logits, const std::vector<SampleSpec>* spec,
                      const SpecIo* sio) const;
    // Expert parallelism, a rank without tokens in a step: every main layer's exchange with X rows
    // of padding (ids −1), so that the other ranks' tokens reach this rank's experts and come back.
    void enqueue_idle(int64_t X);
    // Expert parallelism, between dispatch and combine: this rank's experts over what arrived, and
    // their outputs sent home (the small-T path or moe_layer_routed + give_back).
    void ep_experts(const DeviceLayer& d, dist::ExpertExchange& ex);
    // Runner::draft_chain's device work for n (padded) starts and `steps` chained drafts, from
    // ws.chain_in and the sampling parameters at rows (k - 1)·n .. of ws.samp_in; the drafts into
    // ws.chain_out. Graph-capturable (it leaves the ws.X / ws.X2 parity as it found it).
    // logits (eager only): each step's [n, V] logits appended (a synchronous copy per step).
    void enqueue_chain(int64_t n, int64_t steps, std::vector<float>* logits = nullptr);
    void run(const std::vector<RunnerChunk>& chunks, bool all_logits, const Probe& probe,
             const std::vector<SampleSpec>* spec, std::vector<float>* logits, std::vector<SampledToken>* sampled,
             SpecIo* sio = nullptr);
    // The per-row sampling parameters in ws.samp_in (laid out for ws.R rows) as sample_rows reads them.
    cuda::SampleParams sample_params() const;
    // Row `row` of that layout, in its pinned mirror (uploaded with the step's inputs).
    // q_row / draft: the row's draft check (spec_accept_rows; -1: none).
    void put_sample_spec(int64_t row, const SampleSpec& sp, int64_t q_row = -1, int32_t draft = -1) {
        char* in = static_cast<char*>(pinned_samp_in);
        const int64_t Rw = ws.R;
        reinterpret_cast<uint64_t*>(in)[row] = sp.seed;
        reinterpret_cast<int64_t*>(in + 8 * Rw)[row] = sp.index;
        reinterpret_cast<float*>(in + 16 * Rw)[row] = sp.temperature;
        reinterpret_cast<float*>(in + 20 * Rw)[row] = sp.top_p;
        reinterpret_cast<float*>(in + 24 * Rw)[row] = sp.min_p;
        reinterpret_cast<int32_t*>(in + 28 * Rw)[row] = sp.top_k;
        reinterpret_cast<int64_t*>(in + 32 * Rw)[row] = q_row;
        reinterpret_cast<int32_t*>(in + 40 * Rw)[row] = draft;
    }
    // Draws of rows [0, R) of ws.logits into ids (masked ids excluded) with the step's parameters:
    // the MTP block's drafts (argmax on greedy rows; on sampled rows a draw keyed on
    // (kStreamDraft, the row's index + 1): the index of the token the draft guesses).
    void sample_drafts(int64_t R, int32_t* ids);
    // a8: x's codes and scales when the step made them (act8), else null. A FP8 linear given them
    // runs FP8 × FP8 (linear_fp8_act: the same values, no weight decode); every other call the
    // bf16 path.
    // M ≤ fp8_act_max: linear_fp8_act; M ≥ cuda::kLtMinM: cuBLASLt (when on and the shape fits); where
    // both apply, cuBLASLt for linears of ≥ lt_min_out rows.
    void linear(const cuda::DeviceLinear& w, const uint16_t* x, int64_t M, void* y, bool bf16_out = false,
                int64_t groups = 1, const cuda::ActFp8* a8 = nullptr) {
        cuda::LinearOptions lo;
        lo.groups = groups;
        lo.out_bf16 = bf16_out;
        if (!fp8_linear(w, a8, M, y, lo, ws.gemm, stream) && !bf16_linear(w, x, M, y, lo, ws.gemm, stream))
            cuda::linear(w, x, M, y, lo, &ws.gemm, stream);
    }
    // The same on side stream i, with its own scratch (concurrent linears must not share one).
    // Side stream 2 (a CSA layer's indexer queries at ≤ kIdxSideMaxT tokens) has none: the small-M
    // kernels such calls take need none.
    void linear_side(const cuda::DeviceLinear& w, const uint16_t* x, int64_t M, void* y,
                     const cuda::ActFp8* a8 = nullptr, int i = 0) {
        MEGAMOE_CHECK(i < 2 || M <= kIdxSideMaxT, "linear_side: side stream 2 has no GEMM scratch (M = ", M,
                      " > ", kIdxSideMaxT, ")");
        const cuda::LinearOptions lo;
        const cuda::GemmScratch none{};
        const cuda::GemmScratch& scratch = i == 0 ? ws.gemm_side : i == 1 ? ws.gemm_side2 : none;
        if (!fp8_linear(w, a8, M, y, lo, scratch, side_stream(i)) && !bf16_linear(w, x, M, y, lo, scratch, side_stream(i)))
            cuda::linear(w, x, M, y, lo, i < 2 ? &scratch : nullptr, side_stream(i));
    }
    // cuBLASLt's BF16 GEMM on the bf16 input at ≥ cuda::kLtBf16MinM tokens; false when it does not apply.
    bool bf16_linear(const cuda::DeviceLinear& w, const uint16_t* x, int64_t M, void* y, const cuda::LinearOptions& lo,
                     const cuda::GemmScratch& scratch, cudaStream_t st) {
        if (!lt_bf16_on || M < cuda::kLtBf16MinM || !cuda::LtGemm::bf16_fits(w, lo) ||
            reinterpret_cast<uintptr_t>(x) % 16 || reinterpret_cast<uintptr_t>(y) % 16)
            return false;
        lt->linear_bf16(w, x, M, y, lo, scratch, st);
        ++lt_bf16_launches;
        return true;
    }
    // The FP8 × FP8 forms of a linear given its input's codes; false when none applies.
    bool fp8_linear(const cuda::DeviceLinear& w, const cuda::ActFp8* a8, int64_t M, void* y,
                    const cuda::LinearOptions& lo, const cuda::GemmScratch& scratch, cudaStream_t st) {
        if (!a8 || !rounds_input(w) || M > ws.T8 || !cuda::fp8_act_fits(w, lo)) return false;
        const bool act = M <= fp8_act_max;
        if (lt_fp8_on && M >= cuda::kLtMinM && (!act || w.out >= lt_min_out) && cuda::LtGemm::fits(w, lo)) {
            lt->linear(w, *a8, M, y, lo, scratch, st);
            ++lt_launches;
        } else if (act) {
            cuda::linear_fp8_act(w, *a8, M, y, lo, st);
        } else {
            return false;
        }
        ++fp8_launches;
        return true;
    }
    // Whether this step makes the codes of an official FP8-linear input of width K (see fp8_linear).
    bool act8(int64_t T, int64_t K) const {
        return fp8_act_on && official() && T <= ws.T8 && K % 128 == 0 &&
               (T <= fp8_act_max || (lt_fp8_on && T >= cuda::kLtMinM));
    }
    cudaStream_t side_stream(int i = 0) const { return concurrent ? side[i] : stream; }
    bool official() const { return nm == Numerics::official; }
    // The most tokens the routed experts take the small-T path at (RunnerOptions::moe_small_max_t,
    // or where that is −1 the measured rule). 1-2 tokens first (H200, 2026-12-04), 3-4 since
    // 2026-12-07 (H100; moe() has both measures). 5-8 tokens only for NVFP4 experts in exact
    // numerics: NVIDIA H100 80GB HBM3, 8-layer V4-Flash, `megamoe-forward-bench --model flash
    // --layers 8 --batches 5,6,7,8 --contexts 1024 --prefill 0 --steps 30 --experts E --numerics N
    // --moe-small-max-t 8` against 4, alternated, three rounds, means: NVFP4 exact B = 5 / 6 / 7 / 8
    // −3.4% / −3.5% / −3.8% / −4.0% per step; NVFP4 official +0.1% / +0.3% / +0.3% / −0.1%; MXFP4
    // exact +1.6% / +0.3% / +0.8% / +3.0%; MXFP4 official +5.1% / +4.5% / +5.7% / +7.7%. (The layer
    // alone, `megamoe-gemm-bench --part experts --model flash --T 5,6,7,8`, same call: NVFP4
    // 195 / 226 / 262 / 291 µs → 169 / 196 / 229 / 254 with --moe-small, MXFP4 177 / 217 / 242 / 259
    // → 172 / 199 / 232 / 258; in the step the shared expert runs beside L1, and the MXFP4 small L1
    // gives up more to it.)
    int64_t small_max_t(const cuda::DeviceExperts& e) const {
        if (opt.moe_small_max_t >= 0) return opt.moe_small_max_t;
        return e.format == LinearFormat::nvfp4 && !official() ? 8 : 4;
    }
    // The input of w for the activation x: in official numerics a quantized (FP8 / FP4) linear
    // takes x FP8-rounded in 128-blocks (ops::linear_rounded), xq; every other one x itself.
    bool rounds_input(const cuda::DeviceLinear& w) const {
        return official() && (w.format == LinearFormat::fp8_block || w.format == LinearFormat::mxfp4 ||
                              w.format == LinearFormat::nvfp4);
    }
    const uint16_t* input(const cuda::DeviceLinear& w, const uint16_t* x, const uint16_t* xq) const {
        return rounds_input(w) ? xq : x;
    }
    cudaEvent_t event() {
        if (next_event == static_cast<int>(events.size())) {
            cudaEvent_t e = nullptr;
            check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "event");
            events.push_back(e);
        }
        return events[static_cast<size_t>(next_event++)];
    }
    void fork(int i = 0) {   // side stream i continues from here on the main stream
        if (!concurrent) return;
        cudaEvent_t e = event();
        check(cudaEventRecord(e, stream), "fork");
        check(cudaStreamWaitEvent(side[i], e, 0), "fork");
    }
    void side_waits(int i, int j) {   // side stream i waits for what side stream j did
        if (!concurrent) return;
        cudaEvent_t e = event();
        check(cudaEventRecord(e, side[j]), "side join");
        check(cudaStreamWaitEvent(side[i], e, 0), "side join");
    }
    void join(int i = 0) {   // the main stream waits for what side stream i did
        if (!concurrent) return;
        cudaEvent_t e = event();
        check(cudaEventRecord(e, side[i]), "join");
        check(cudaStreamWaitEvent(stream, e, 0), "join");
    }
    cuda::BatchView batch(const Shape& s) const {
        cuda::BatchView b;
        b.T = static_cast<int32_t>(s.T);
        b.C = static_cast<int32_t>(s.C);
        b.pos = ws.pos;
        b.slot = ws.slot;
        b.chunk = ws.chunk;
        b.chunk_first = ws.chunk_first;
        b.chunk_len = ws.chunk_len;
        return b;
    }
    // A pre site's finish after its hc_mix (ref: hc_pre, then the sublayer's rms_norm): xn, post
    // and the Sinkhorn comb. (Computing comb on the side stream, off the sublayer's path, measured
    // no faster at batch 1 on an H200: the finish's split reduction and norm are its latency.)
    void pre_site(int64_t splits, int64_t T, const float* base, const float* scale, const uint16_t* norm_w) {
        const ModelConfig& c = cfg;
        const float hc_eps = static_cast<float>(c.hc_eps), eps = static_cast<float>(c.rms_norm_eps);
        const bool q8 = act8(T, c.hidden_size);
        cuda::hc_pre_finish(ws.part, splits, ws.X, T, c.hc_mult, c.hidden_size, base, scale, c.hc_sinkhorn_iters,
                            hc_eps, eps, norm_w, ws.xn, ws.post, ws.comb, stream, nm, official() ? ws.xq : nullptr,
                            q8 ? ws.xq8 : nullptr, q8 ? ws.xs8 : nullptr);
    }
    // The codes of xq (made by pre_site / forced_xn) for T tokens, or null when the step has none.
    cuda::ActFp8 x8_{};
    const cuda::ActFp8* x8(int64_t T) {
        if (!act8(T, cfg.hidden_size)) return nullptr;
        x8_ = cuda::ActFp8{ws.xq8, ws.xs8};
        return &x8_;
    }
    // A probe replaced xn: in official numerics the quantized linears read xq, which must follow.
    void forced_xn(int64_t T) {
        if (!official()) return;
        const int64_t D = cfg.hidden_size;
        check(cudaMemcpyAsync(ws.xq, ws.xn, static_cast<size_t>(T * D) * 2, cudaMemcpyDeviceToDevice, stream), "xq");
        cuda::fp8_block_round(ws.xq, T, D, D, 128, stream);
        if (act8(T, D)) cuda::quantize_gemm_input(ws.xq, T, D, ws.xq8, ws.xs8, stream);
    }
    // One block's sublayers: d its weights, l its layer index (state and trace names; L for the
    // MTP block).
    void attention(const DeviceLayer& d, int64_t l, const Shape& s, const Probe* probe);
    void moe(const DeviceLayer& d, int64_t l, const Shape& s, const Probe* probe);
    // The MTP block over the step's tokens (after a main pass left its pre-head streams in ws.X),
    // with the next tokens in ws.mtp_next: logits into ws.logits rows ws.rows.
    void enqueue_mtp(const Shape& s);
    // Probe plumbing: download a device tensor to host f32/i32, call the probe, upload if modified.
    bool trace(const Probe* probe, const char* name, int64_t layer, const void* dev, bool bf16, bool i32, int64_t rows,
               int64_t width);
};

// Every linear of a block but the grouped wo_a (absent ones have a null weight): what the start-up
// probe and the scratch sizing walk.
static std::array<const cuda::DeviceLinear*, 14> ungrouped_linears(const DeviceLayer& d) {
    return {&d.wq_a, &d.wq_b, &d.wkv, &d.wo_b, &d.comp.wkv, &d.comp.wgate, &d.idx_comp.wkv, &d.idx_comp.wgate,
            &d.idx_wq_b, &d.idx_weights_proj, &d.gate, &d.sh_w1, &d.sh_w3, &d.sh_w2};
}

Runner::Impl::Impl(const Model* m, const ModelConfig& cf, uint64_t seed, const RunnerOptions& o, std::ostream* log)
    : opt(o), cfg(cf) {
    const ModelConfig& c = cfg;
    nm = opt.numerics.value_or(m ? m->numerics : Numerics::exact);
    opt.numerics = nm;
    concurrent = opt.side_stream;
    fp8_act_on = opt.fp8_activations;
    MEGAMOE_CHECK(opt.fp8_act_max_t == -1 || (opt.fp8_act_max_t >= 1 && opt.fp8_act_max_t <= cuda::kRegsMaxM),
                  "gpu runner: fp8_act_max_t ", opt.fp8_act_max_t, " (-1: the runner's rule, or 1..", cuda::kRegsMaxM, ")");
    MEGAMOE_CHECK(opt.lt_min_out >= -1, "gpu runner: lt_min_out ", opt.lt_min_out, " (-1: the runner's rule, or rows >= 0)");
    if (opt.fp8_act_max_t > 0) fp8_act_max = opt.fp8_act_max_t;
    if (opt.lt_min_out >= 0) lt_min_out = opt.lt_min_out;
    lt_fp8_on = fp8_act_on && opt.lt_fp8 && nm == Numerics::official && opt.max_batch_tokens >= cuda::kLtMinM;
    lt_bf16_on = opt.lt_bf16 && opt.max_batch_tokens >= cuda::kLtBf16MinM;
    MEGAMOE_CHECK(opt.max_seqs >= 1 && opt.max_batch_tokens >= 1, "gpu runner: max_seqs ", opt.max_seqs,
                  ", max_batch_tokens ", opt.max_batch_tokens);
    MEGAMOE_CHECK(opt.attn_splits == 0 || opt.attn_splits == 1 || opt.attn_splits == 2 || opt.attn_splits == 4 ||
                      opt.attn_splits == 8,
                  "gpu runner: attn_splits ", opt.attn_splits, " (0: by size, or 1, 2, 4, 8)");
    if (opt.max_model_len <= 0) opt.max_model_len = std::min<int64_t>(c.max_position_embeddings, 65536);
    if (opt.max_model_len > c.max_position_embeddings)
        fail("--max-model-len ", opt.max_model_len, " exceeds the model's max_position_embeddings ",
             c.max_position_embeddings);
    if (opt.max_logit_rows <= 0) opt.max_logit_rows = opt.max_seqs;
    if (!cuda::gpu_available()) fail("gpu runner: no CUDA device is available");
    if (opt.exchange) {   // expert parallelism: checked before anything is allocated
        const dist::ExpertExchange& ex = *opt.exchange;
        if (ex.layers() != c.num_hidden_layers)
            fail("gpu runner: the expert exchange partitions ", ex.layers(), " MoE layers, the model has num_hidden_layers = ",
                 c.num_hidden_layers);
        if (ex.max_tokens() < opt.max_batch_tokens)
            fail("gpu runner: the expert exchange carries ", ex.max_tokens(), " tokens per call, fewer than --max-batch-tokens ",
                 opt.max_batch_tokens);
        if (opt.max_batch_tokens >= (int64_t{1} << 20))   // the decode graphs' keys hold the exchange rows in 20 bits
            fail("gpu runner: --max-batch-tokens ", opt.max_batch_tokens, " with expert parallelism: at most ",
                 (int64_t{1} << 20) - 1);
        for (int64_t l = 0; l < c.num_hidden_layers; ++l)
            if (static_cast<int64_t>(ex.held(l).size()) != ex.skip())
                fail("gpu runner: the expert exchange holds ", ex.held(l).size(), " experts of layer ", l, " on rank ",
                     ex.rank(), ", its skip id is ", ex.skip(), " (n_routed_experts / GPUs)");
    }
    if (opt.head_exchange) {
        const dist::HeadExchange& hx = *opt.head_exchange;
        if (!opt.exchange) fail("gpu runner: the head split by vocabulary comes with expert parallelism (RunnerOptions::exchange)");
        if (hx.world() != opt.exchange->world() || hx.rank() != opt.exchange->rank())
            fail("gpu runner: the vocabulary exchange is rank ", hx.rank(), " of ", hx.world(), ", the expert exchange rank ",
                 opt.exchange->rank(), " of ", opt.exchange->world());
        if (hx.vocab() != c.vocab_size)
            fail("gpu runner: the vocabulary exchange splits ", hx.vocab(), " ids, the model has vocab_size = ", c.vocab_size);
        if (hx.max_rows() < std::max(opt.max_logit_rows, std::min(opt.max_seqs, opt.max_batch_tokens)))
            fail("gpu runner: the vocabulary exchange carries ", hx.max_rows(), " rows per call, fewer than a step's ",
                 std::max(opt.max_logit_rows, std::min(opt.max_seqs, opt.max_batch_tokens)), " logit rows");
    }
    if (lt_fp8_on || lt_bf16_on) lt = std::make_unique<cuda::LtGemm>();
    if (opt.stream_priority) {   // RunnerOptions::stream_priority: the critical chain first
        int least = 0, greatest = 0;
        check(cudaDeviceGetStreamPriorityRange(&least, &greatest), "stream priority range");
        check(cudaStreamCreateWithPriority(&stream, cudaStreamNonBlocking, greatest), "stream");
        for (cudaStream_t& st : side) check(cudaStreamCreateWithPriority(&st, cudaStreamNonBlocking, least), "stream");
    } else {
        check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
        for (cudaStream_t& st : side) check(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "stream");
    }

    size_t free_b = 0, total_b = 0;
    check(cudaMemGetInfo(&free_b, &total_b), "memory info");
    const size_t budget = static_cast<size_t>(static_cast<double>(total_b) * opt.memory_fraction);
    const size_t reserve_b = total_b - budget;   // left to other users of the GPU

    // Weights: all of them, or under expert parallelism this rank's experts of every main layer.
    WeightShard shard;
    if (opt.exchange)
        for (int64_t l = 0; l < c.num_hidden_layers; ++l) shard.held.push_back(opt.exchange->held(l));
    if (opt.head_exchange) {
        shard.head_begin = opt.head_exchange->vocab_begin();
        shard.head_end = opt.head_exchange->vocab_end();
    }
    plan.ep_world = opt.exchange ? opt.exchange->world() : 1;
    plan.head_slice = opt.head_exchange != nullptr;
    plan.weights = !m ? DeviceModel::plan_bytes(c, shard)
                      : opt.exchange ? DeviceModel::plan_bytes(*m, shard) : DeviceModel::plan_bytes(*m);
    {
        CheckpointBytes cb;
        Weights scratch;
        visit_weights(c, scratch, cb, m ? m->w.mtp.has_value() : c.num_nextn_predict_layers > 0);
        plan.checkpoint = cb.bytes;
    }
    if (plan.weights + reserve_b > free_b)
        fail("the model's weights need ", mib(plan.weights), " on the GPU; ", mib(free_b), " are free and ",
             mib(reserve_b), " are kept back (--gpu-memory-fraction ", opt.memory_fraction, ")");
    dm = !m ? std::make_unique<DeviceModel>(c, seed, shard)
            : opt.exchange ? std::make_unique<DeviceModel>(*m, shard) : std::make_unique<DeviceModel>(*m);

    // cuBLASLt's block-scaled FP8 GEMM needs Hopper and CUDA >= 12.9 (cuda/linear_lt.h): ask its
    // heuristic for every FP8 linear of the model now, at kLtMinM rows, and run the official
    // numerics' large-M FP8 linears on megamoe's kernels instead where it has no algorithm, rather
    // than fail at the first large step.
    if (lt_fp8_on) {
        std::string why;
        auto probe = [&](const cuda::DeviceLinear& w) {
            if (!why.empty() || !w.weight || w.format != LinearFormat::fp8_block) return;
            const cuda::LinearOptions lo;
            if (!cuda::LtGemm::fits(w, lo)) return;
            try {
                (void)lt->plan(w, cuda::kLtMinM, lo);
            } catch (const Error& e) {
                why = e.what();
            }
        };
        for (const DeviceLayer& d : dm->layers)
            for (const cuda::DeviceLinear* w : ungrouped_linears(d)) probe(*w);
        if (!why.empty()) {
            lt_fp8_on = false;
            if (log) *log << "megamoe: cuBLASLt's FP8 GEMM is not usable here (" << why
                          << "); the FP8 linears run on megamoe's kernels at every batch size\n";
        }
    }

    // Workspace.
    ws.T = opt.max_batch_tokens;
    ws.lt_codes = lt_fp8_on;
    ws.act_max = fp8_act_max;
    ws.C = std::min(opt.max_seqs, ws.T);
    ws.R = std::max(opt.max_logit_rows, ws.C);
    ws.max_rows = c.index_topk > 0 ? (opt.max_model_len + 3) / 4 : 0;
    const int64_t n_flat = c.hc_mult * c.hidden_size;
    for (int64_t t = 1; t <= ws.T; ++t)
        ws.part_floats = std::max(ws.part_floats, cuda::hc_mix_splits(t, n_flat) * t * (c.mix_width() + 1));
    int64_t gemm_bytes = 0, gemm2_bytes = 0;   // scratch of the main / side 0 linears, of side 1's
    auto need_in = [&](int64_t& bytes, const cuda::DeviceLinear& w, int64_t M, int64_t groups) {
        if (!w.weight) return;
        cuda::LinearOptions lo;
        lo.groups = groups;
        bytes = std::max<int64_t>(bytes, static_cast<int64_t>(cuda::linear_scratch_bytes(w, M, lo)));
        if (lt_fp8_on && cuda::LtGemm::fits(w, lo))
            bytes = std::max<int64_t>(bytes, static_cast<int64_t>(cuda::LtGemm::scratch_bytes(w, M)));
        cuda::LinearOptions lob = lo;
        lob.out_bf16 = true;
        if (lt_bf16_on && M >= cuda::kLtBf16MinM && (cuda::LtGemm::bf16_fits(w, lo) || cuda::LtGemm::bf16_fits(w, lob)))
            bytes = std::max<int64_t>(bytes, static_cast<int64_t>(cuda::LtGemm::bf16_scratch_bytes(w)));
    };
    auto need = [&](const cuda::DeviceLinear& w, int64_t M, int64_t groups) { need_in(gemm_bytes, w, M, groups); };
    auto block_needs = [&](const DeviceLayer& d) {   // absent linears (null weight) need nothing
        for (const cuda::DeviceLinear* w : ungrouped_linears(d)) need(*w, ws.T, 1);
        need(d.wo_a, ws.T, c.o_groups);
        // What runs on side stream 1 (Impl::attention, Impl::moe) also takes its scratch.
        for (const cuda::DeviceLinear* w : {&d.comp.wkv, &d.comp.wgate, &d.sh_w3}) need_in(gemm2_bytes, *w, ws.T, 1);
    };
    for (const DeviceLayer& d : dm->layers) block_needs(d);
    need(dm->head, opt.head_exchange ? opt.head_exchange->world() * ws.R : ws.R, 1);   // every rank's rows
    if (dm->mtp) {
        block_needs(dm->mtp->block);
        need(dm->mtp->e_proj, ws.T, 1);
        need(dm->mtp->h_proj, ws.T * c.hc_mult, 1);
        ws.with_mtp = true;
    }
    {
        cuda::DeviceArena counter;
        ws.carve(counter, c, gemm_bytes, gemm2_bytes);
        ws_arena = cuda::DeviceArena(counter.used(), "workspace");
        ws.carve(ws_arena, c, gemm_bytes, gemm2_bytes);
        ws.samp_scratch.parts = opt.sample_parts;
    }
    if (!opt.exchange) {
        moe_ws = cuda::MoeLayerWorkspace(ws.T, c.num_experts_per_tok, dm->layers.at(0).experts);
    } else {
        // The main layers' experts see the exchange's rows (up to world · max_tokens), routed over
        // the local experts and the skip bucket; the MTP block's whole layer keeps its own.
        moe_ws_ep = cuda::MoeLayerWorkspace(opt.exchange->max_rows(), c.num_experts_per_tok, dm->layers.at(0).experts,
                                            /*skip_bucket=*/true);
        if (dm->mtp) moe_ws = cuda::MoeLayerWorkspace(ws.T, c.num_experts_per_tok, dm->mtp->block.experts);
    }
    plan.workspace = ws_arena.used() + moe_ws.bytes() + moe_ws_ep.bytes();
    if (opt.rollback && dm->mtp) {
        draft_q = cuda::DeviceBuffer(
            static_cast<size_t>((opt.max_seqs + 1) * kMaxSpeculativeTokens * c.vocab_size) * sizeof(float), "draft logits");
        draft_q.fill(0);   // a slot's rows before its first drafts: uniform logits, a valid distribution
        plan.draft_logits = draft_q.bytes();
    }
    check(cudaMallocHost(reinterpret_cast<void**>(&pinned_in), static_cast<size_t>(ws.in_ints) * 4), "pinned inputs");
    check(cudaMallocHost(reinterpret_cast<void**>(&pinned_logits), static_cast<size_t>(ws.R * c.vocab_size) * 4),
          "pinned logits");
    check(cudaMallocHost(&pinned_samp_in, ws.samp_in_bytes), "pinned sampling inputs");
    check(cudaMallocHost(&pinned_samp_out, ws.samp_out_bytes), "pinned sampling outputs");
    check(cudaMallocHost(reinterpret_cast<void**>(&pinned_drafts), static_cast<size_t>(ws.R) * 4), "pinned drafts");
    check(cudaMallocHost(reinterpret_cast<void**>(&pinned_chain), static_cast<size_t>((5 + kGraphChunkMax - 1) * ws.C) * 4),
          "pinned chained drafts");
    {
        std::vector<int32_t> iota(static_cast<size_t>(ws.T));
        for (size_t i = 0; i < iota.size(); ++i) iota[i] = static_cast<int32_t>(i);
        check(cudaMemcpy(ws.iota, iota.data(), iota.size() * 4, cudaMemcpyHostToDevice), "iota");
        check(cudaDeviceSynchronize(), "iota");   // pageable copies may still be in flight
    }

    // The state pool from what is left. Official numerics store the KV rows in FP8 (the official
    // code's KV cache; cuda/kv_row.h) where the head's shape allows it.
    const bool kv_fp8 = official() && cuda::KvRow::fp8_fits(c.head_dim, c.qk_rope_head_dim);
    const StateLayout layout = StateLayout::make(c, opt.block_tokens, dm->mtp.has_value(), kv_fp8);
    const int64_t slot_records = opt.max_seqs + 1 + (opt.rollback ? opt.max_seqs : 0);
    plan.slots = static_cast<size_t>(slot_records * layout.slot_bytes);
    const int64_t n_snaps = opt.prefix_snapshots >= 0 ? opt.prefix_snapshots : opt.max_seqs;
    plan.snapshots = static_cast<size_t>(n_snaps * layout.slot_bytes);
    plan.snapshot_count = n_snaps;
    const int64_t max_blocks = (opt.max_model_len + layout.block_tokens - 1) / layout.block_tokens;
    check(cudaMemGetInfo(&free_b, &total_b), "memory info");
    const size_t table_b = static_cast<size_t>((opt.max_seqs + 1) * max_blocks * 4);
    const int64_t slack = 64ll << 20;   // kernels' module data, graphs
    // Bytes left for blocks after the slot and snapshot records of a layout.
    auto left_for = [&](const StateLayout& L) {
        return static_cast<int64_t>(free_b) - static_cast<int64_t>(reserve_b) -
               (slot_records + n_snaps) * L.slot_bytes - static_cast<int64_t>(table_b) - slack;
    };
    const int64_t left = left_for(layout);
    {   // What the same memory holds with bf16 KV rows (the plan's comparison).
        const StateLayout bf16 = StateLayout::make(c, opt.block_tokens, dm->mtp.has_value(), false);
        plan.kv_fp8 = kv_fp8;
        plan.kv_row_bytes = layout.kv.bytes();
        plan.kv_row_bytes_bf16 = bf16.kv.bytes();
        plan.fit_tokens = layout.block_bytes ? std::max<int64_t>(left / layout.block_bytes - 1, 0) * layout.block_tokens : 0;
        plan.fit_tokens_bf16 = bf16.block_bytes ? std::max<int64_t>(left_for(bf16) / bf16.block_bytes - 1, 0) * bf16.block_tokens : 0;
    }
    int64_t n_blocks = 0;
    if (layout.block_bytes > 0) {
        // Blocks beyond what max_seqs full sequences use keep prefix-cache snapshots' rows.
        n_blocks = std::min<int64_t>(left / layout.block_bytes - 1, (opt.max_seqs + n_snaps) * max_blocks);
        if (opt.max_state_tokens > 0) {
            n_blocks = std::min(n_blocks, (opt.max_state_tokens + layout.block_tokens - 1) / layout.block_tokens);
            if (n_blocks < max_blocks)
                fail("--max-state-tokens ", opt.max_state_tokens, " holds fewer positions than one sequence of ",
                     opt.max_model_len, " (raise it or lower --max-model-len)");
        }
        if (n_blocks < max_blocks)
            fail("the GPU has room for ", std::max<int64_t>(n_blocks, 0) * layout.block_tokens,
                 " positions of sequence state after the weights and workspace, fewer than one sequence of ",
                 opt.max_model_len, " (lower --max-model-len, --max-batch-tokens or --max-seqs)");
    } else if (left < 0) {
        fail("the GPU has no room for the per-sequence state of ", opt.max_seqs, " sequences");
    }
    pool = std::make_unique<StatePool>(c, layout, opt.max_seqs, n_blocks, opt.max_model_len, n_snaps, opt.rollback);
    plan.blocks = static_cast<size_t>((n_blocks + 1) * layout.block_bytes);
    plan.block_count = n_blocks;
    plan.block_tokens = layout.block_tokens;
    plan.context_tokens = layout.block_bytes ? n_blocks * layout.block_tokens : opt.max_seqs * opt.max_model_len;
    plan.max_model_len = opt.max_model_len;
    if (log) *log << plan.describe();

    // Decode buckets: powers of two up to the largest decode batch a step can hold (capped at 256).
    const int64_t top = std::min<int64_t>(ws.C, 256);
    for (int64_t b = 1; b <= top; b *= 2) buckets.push_back(b);
    if (buckets.back() < top) buckets.push_back(top);
}

Runner::Impl::~Impl() {
    for (auto& [b, g] : graphs) (void)cudaGraphExecDestroy(g);
    if (pinned_in) (void)cudaFreeHost(pinned_in);
    if (pinned_logits) (void)cudaFreeHost(pinned_logits);
    if (pinned_samp_in) (void)cudaFreeHost(pinned_samp_in);
    if (pinned_samp_out) (void)cudaFreeHost(pinned_samp_out);
    if (pinned_drafts) (void)cudaFreeHost(pinned_drafts);
    if (pinned_chain) (void)cudaFreeHost(pinned_chain);
    for (cudaEvent_t e : events) (void)cudaEventDestroy(e);
    for (cudaStream_t st : side)
        if (st) (void)cudaStreamDestroy(st);
    if (stream) (void)cudaStreamDestroy(stream);
}

bool Runner::Impl::trace(const Probe* probe, const char* name, int64_t layer, const void* dev, bool bf16, bool i32,
                         int64_t rows, int64_t width) {
    if (!probe || !*probe) return false;
    check(cudaStreamSynchronize(stream), "probe sync");
    const size_t n = static_cast<size_t>(rows * width);
    std::vector<float> f(i32 ? 0 : n);
    std::vector<int32_t> iv(i32 ? n : 0);
    // Copies on the runner's stream (the legacy stream does not order against it), each waited for.
    auto copy = [&](void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, const char* what) {
        check(cudaMemcpyAsync(dst, src, bytes, kind, stream), what);
        check(cudaStreamSynchronize(stream), what);
    };
    if (i32) {
        copy(iv.data(), dev, n * 4, cudaMemcpyDeviceToHost, "probe download");
    } else if (bf16) {
        std::vector<uint16_t> b(n);
        copy(b.data(), dev, n * 2, cudaMemcpyDeviceToHost, "probe download");
        for (size_t i = 0; i < n; ++i) f[i] = bf16_to_f32(b[i]);
    } else {
        copy(f.data(), dev, n * 4, cudaMemcpyDeviceToHost, "probe download");
    }
    TraceView v;
    v.name = name, v.layer = layer, v.dtype = i32 ? DType::i32 : DType::f32;
    v.data = i32 ? static_cast<void*>(iv.data()) : static_cast<void*>(f.data());
    v.rows = rows, v.width = width;
    (*probe)(v);
    if (!v.modified) return false;
    void* d = const_cast<void*>(dev);
    if (i32) {
        copy(d, iv.data(), n * 4, cudaMemcpyHostToDevice, "probe upload");
    } else if (bf16) {
        std::vector<uint16_t> b(n);
        for (size_t i = 0; i < n; ++i) b[i] = f32_to_bf16(f[i]);
        copy(d, b.data(), n * 2, cudaMemcpyHostToDevice, "probe upload");
    } else {
        copy(d, f.data(), n * 4, cudaMemcpyHostToDevice, "probe upload");
    }
    return true;
}

void Runner::Impl::attention(const DeviceLayer& d, int64_t l, const Shape& s, const Probe* probe) {
    const ModelConfig& c = cfg;
    const int64_t T = s.T, H = c.num_attention_heads, hd = c.head_dim;
    const float eps = static_cast<float>(c.rms_norm_eps);
    const cuda::RopeView& rope = d.kind == AttnKind::sliding ? dm->rope_main : dm->rope_compress;
    const cuda::BatchView b = batch(s);

    // Inputs (ref: attention_inputs): the q path on the main stream; the kv latent and then the
    // indexer's compressor beside it on side stream 0, the attention compressor on side stream 1
    // (the compressors read only xn). Beside the q path's four launches the kv latent is off the
    // critical path at batch 1 (measured on an H200: a sliding layer's q path ~33 µs, wkv and its
    // norm ~12 µs). With both compressors after the kv latent on one side stream, that stream ended
    // 13-16 µs after the main one in every compressed layer (megamoe-forward-bench --trace, batch 1).
    // Official numerics (ref attention_inputs): the quantized linears take FP8-rounded inputs (xq,
    // qr_q), their outputs are rounded to bf16 where they are read (head_norm_rope, rms_norm_rows),
    // and the kv latent's non-rope dims are FP8-rounded in 64-blocks.
    fork();
    if (d.kind != AttnKind::sliding) fork(1);
    const cudaStream_t cs = side_stream();
    const cuda::ActFp8* xa8 = x8(T);
    const bool q8 = act8(T, c.q_lora_rank) && (rounds_input(d.wq_b) || rounds_input(d.idx_wq_b));
    const cuda::ActFp8 qa8{ws.qr8, ws.qrs8};
    linear_side(d.wkv, input(d.wkv, ws.xn, ws.xq), T, ws.kv_f, xa8);
    cuda::head_norm_rope(ws.kv_f, T, 1, hd, true, d.kv_norm, eps, ws.pos, rope, ws.kv, cs, nm);
    if (official()) cuda::fp8_block_round(ws.kv, T, hd, hd - c.qk_rope_head_dim, 64, cs);   // round_kv_latent
    linear(d.wq_a, input(d.wq_a, ws.xn, ws.xq), T, ws.qr_f, false, 1, xa8);
    cuda::rms_norm_rows(ws.qr_f, T, c.q_lora_rank, d.q_norm, eps, ws.qr, stream, nm,
                        rounds_input(d.wq_b) || rounds_input(d.idx_wq_b) ? ws.qr_q : nullptr, q8 ? ws.qr8 : nullptr,
                        q8 ? ws.qrs8 : nullptr);
    if (d.kind == AttnKind::csa && concurrent && opt.indexer_side && T <= kIdxSideMaxT) fork(2);   // the indexer's queries (below)
    linear(d.wq_b, input(d.wq_b, ws.qr, ws.qr_q), T, ws.q_f, false, 1, q8 ? &qa8 : nullptr);
    cuda::head_norm_rope(ws.q_f, T, H, hd, true, nullptr, eps, ws.pos, rope, ws.q, stream, nm);
    mark("attn.q_kv");

    // Compressors (ref: compressor_feed per chunk): a row that closes at a token is visible to it.
    auto compress = [&](const DeviceCompressor& dc, float* kvp, float* gatep, const cuda::SlotArray& st,
                        const cuda::PagedRows& rows, int side_i) {
        linear_side(dc.wkv, ws.xn, T, kvp, nullptr, side_i);
        linear_side(dc.wgate, ws.xn, T, gatep, nullptr, side_i);
        cuda::CompressorArgs a;
        a.ratio = dc.ratio;
        a.dim = dc.dim;
        a.overlap = dc.overlap;
        a.kv = kvp;
        a.gate = gatep;
        a.ape = dc.ape;
        a.norm_w = dc.norm;
        a.norm_eps = eps;
        a.rope = dm->rope_compress;
        a.state = st;
        a.rows = rows;
        a.numerics = nm;
        a.indexer_keys = &dc == &d.idx_comp;
        a.kv_fp8 = !a.indexer_keys && pool->layout().kv.fp8;
        cuda::compressor_emit(a, b, side_stream(side_i));
        cuda::compressor_save(a, b, side_stream(side_i));
    };
    cuda::PagedRows comp_rows;
    if (d.kind != AttnKind::sliding) {
        comp_rows = pool->comp_rows(l, static_cast<int32_t>(hd));
        compress(d.comp, ws.ckv, ws.cgate, pool->comp_state(l), comp_rows, 1);
    }
    if (d.kind == AttnKind::csa) {
        const cuda::PagedRows keys = pool->idx_rows(l, static_cast<int32_t>(c.index_head_dim));
        compress(d.idx_comp, ws.ikv, ws.igate, pool->idx_state(l), keys, 0);
    }
    if (d.kind != AttnKind::sliding) mark("attn.compressors");
    if (d.kind == AttnKind::csa) {
        // The indexer's queries and head weights, then its top-k over the keys the side stream just
        // emitted. At ≤ kIdxSideMaxT tokens the queries run on side stream 2 (forked after the q
        // norm, above), beside wq_b and the q rope: on the main stream they added their four
        // launches to a CSA layer's path to the attention. Its linears take the small-M kernels
        // there, which need no GEMM scratch (so side 2 has none). Measured on an H100 (one device
        // call, megamoe-forward-bench --model flash --layers 8 --batches 1,2 --contexts 1024
        // --prefill 0 --idx-side 0|1): exact B = 1 1745.2 / 1741.3 → 1723.6 / 1720.6 µs, B = 2
        // 2143.1 / 2121.3 → 2117.3 / 2111.3 (two rounds); official B = 1 1799.3 → 1782.5.
        const int64_t nI = c.index_n_heads, dI = c.index_head_dim;
        const bool on_side = concurrent && opt.indexer_side && T <= kIdxSideMaxT;
        const cudaStream_t is = on_side ? side_stream(2) : stream;
        if (on_side) linear_side(d.idx_wq_b, input(d.idx_wq_b, ws.qr, ws.qr_q), T, ws.iq_f, q8 ? &qa8 : nullptr, 2);
        else linear(d.idx_wq_b, input(d.idx_wq_b, ws.qr, ws.qr_q), T, ws.iq_f, false, 1, q8 ? &qa8 : nullptr);
        cuda::head_norm_rope(ws.iq_f, T, nI, dI, false, nullptr, eps, ws.pos, dm->rope_compress, ws.iq, is, nm);
        if (official()) cuda::round_indexer_qk(ws.iq, T * nI, dI, is);
        if (on_side) {
            linear_side(d.idx_weights_proj, input(d.idx_weights_proj, ws.xn, ws.xq), T, ws.iw, xa8, 2);
            join(2);
            ++idx_side_launches;
        } else {
            linear(d.idx_weights_proj, input(d.idx_weights_proj, ws.xn, ws.xq), T, ws.iw, false, 1, xa8);
        }
        join();
        join(1);
        cuda::IndexerArgs ia;
        ia.heads = static_cast<int32_t>(nI);
        ia.head_dim = static_cast<int32_t>(dI);
        ia.q = ws.iq;
        ia.w = ws.iw;
        ia.w_scale = cuda::indexer_w_scale(static_cast<int32_t>(nI), static_cast<int32_t>(dI), nm);
        ia.keys = pool->idx_rows(l, static_cast<int32_t>(dI));
        ia.scores = ws.scores;
        ia.max_rows = ws.max_rows;
        ia.k = static_cast<int32_t>(c.index_topk);
        ia.topk = ws.topk;
        ia.numerics = nm;
        cuda::indexer_topk(ia, b, stream);
        mark("attn.indexer");
        trace(probe, trace_names::index_topk, l, ws.topk, false, true, T, c.index_topk);
    } else {
        join();
        if (d.kind != AttnKind::sliding) join(1);
    }

    cuda::AttentionArgs aa;
    aa.heads = static_cast<int32_t>(H);
    aa.head_dim = static_cast<int32_t>(hd);
    aa.window = static_cast<int32_t>(c.sliding_window);
    aa.q = ws.q;
    aa.kv = ws.kv;
    aa.ring = pool->ring(l);
    aa.ring_rows = static_cast<int32_t>(pool->layout().ring_rows);
    aa.comp = comp_rows;   // ratio 0 for SWA
    aa.topk = d.kind == AttnKind::csa ? ws.topk : nullptr;
    aa.topk_k = d.kind == AttnKind::csa ? static_cast<int32_t>(c.index_topk) : 0;
    aa.sink = d.attn_sink;
    aa.scale = 1.0f / std::sqrt(static_cast<float>(hd));
    aa.rope = rope;
    aa.out = ws.o;
    aa.kv_fp8 = pool->layout().kv.fp8;
    aa.wide = opt.attn_wide;
    aa.splits = opt.attn_splits;
    cuda::sparse_attention(aa, b, stream);
    // The ring write on side stream 1 (it must follow the attention, which reads the ring, and
    // come before the next step's; the MoE's side streams join it into the main stream): on the
    // main stream between the attention and wo_a it kept wo_a from starting its weight copies
    // while the attention ran (programmatic launch overlaps only adjacent kernels of a stream).
    fork(1);
    cuda::window_write(ws.kv, hd, pool->layout().ring_rows, pool->ring(l), b, side_stream(1), pool->layout().kv);
    mark("attn.sparse");

    // o (inverse-rotated by the attention kernel) → grouped wo_a → wo_b.
    linear(d.wo_a, ws.o, T, ws.z, true, c.o_groups);   // official: a bf16 einsum (no FP8 input), z bf16
    const bool z8 = rounds_input(d.wo_b) && act8(T, d.wo_b.in);
    const cuda::ActFp8 za8{ws.z8, ws.zs8};
    if (z8) cuda::fp8_block_round_q(ws.z, T, d.wo_b.in, ws.z8, ws.zs8, stream);   // z is wo_b's alone
    else if (rounds_input(d.wo_b)) cuda::fp8_block_round(ws.z, T, d.wo_b.in, d.wo_b.in, 128, stream);
    linear(d.wo_b, ws.z, T, ws.y, false, 1, z8 ? &za8 : nullptr);   // official: rounded to bf16 where hc_mix reads it
    mark("attn.out");
}

void Runner::Impl::moe(const DeviceLayer& d, int64_t l, const Shape& s, const Probe* probe) {
    const ModelConfig& c = cfg;
    const int64_t T = s.T, E = c.n_routed_experts, k = c.num_experts_per_tok;
    const float scale = static_cast<float>(c.routed_scaling_factor), limit = static_cast<float>(c.swiglu_limit);
    // The router and the routed experts on the main stream; the shared expert (fp8 w1, w3, clamped
    // SwiGLU, w2) beside them, joined only before the combine that adds it last: w1 on side stream
    // 0, w3 on side stream 1, both enqueued before the routed experts so that they start beside
    // them. (With w3 after w1 on one stream, w3 started only when the routed L1 was nearly done,
    // ~20 µs after w1 ended, at batch 1 on an H200: megamoe-forward-bench --trace.) (Forking after
    // the router instead measured the same at batch 1 on an H200: the router got ~2.5 µs faster,
    // the dispatch as much slower.)
    fork();
    fork(1);
    linear(d.gate, input(d.gate, ws.xn, ws.xq), T, ws.gate_logits, false, 1, x8(T));
    cuda::route(ws.gate_logits, T, E, k, d.router == RouterKind::score ? d.gate_bias : nullptr,
                d.router == RouterKind::hash ? d.tid2eid : nullptr, ws.tokens, scale, ws.ids, ws.wts, stream,
                opt.pad_route ? ws.slot : nullptr, pool->pad_slot());   // padding rows as token 0 (router.h)
    // (pad_route measured on an H100, 2026-12-07: 8-layer V4-Flash NVFP4 steps at batch 3 / 5 / 7 /
    // 12 −9.0% / −6.7% / −5.8% / −3.9% exact, −8.6% / −6.3% / −5.4% / −3.8% official;
    // megamoe-forward-bench --pad-route 0|1, docs/bench-forward.md.)
    if (trace(probe, trace_names::expert_ids, l, ws.ids, false, true, T, k)) {
        // The weights of the given experts: the hash path with a table of the forced ids.
        check(cudaMemcpyAsync(ws.forced_ids, ws.ids, static_cast<size_t>(T * k) * 4, cudaMemcpyDeviceToDevice, stream),
              "forced ids");
        cuda::route(ws.gate_logits, T, E, k, nullptr, ws.forced_ids, ws.iota, scale, ws.ids, ws.wts, stream);
    }
    mark("moe.router");
    const cudaStream_t ss = side_stream();
    const cuda::ActFp8* xa8 = x8(T);
    linear_side(d.sh_w1, input(d.sh_w1, ws.xn, ws.xq), T, ws.sh_g, xa8);
    linear_side(d.sh_w3, input(d.sh_w3, ws.xn, ws.xq), T, ws.sh_u, xa8, 1);
    side_waits(0, 1);
    cuda::swiglu(ws.sh_g, ws.sh_u, T, d.sh_w1.out, limit, ws.sh_h, ss, nm);
    const bool h8 = rounds_input(d.sh_w2) && act8(T, d.sh_w2.in);
    const cuda::ActFp8 ha8{ws.sh8, ws.shs8};
    if (h8) cuda::fp8_block_round_q(ws.sh_h, T, d.sh_w2.in, ws.sh8, ws.shs8, ss);   // sh_h is w2's alone
    else if (rounds_input(d.sh_w2)) cuda::fp8_block_round(ws.sh_h, T, d.sh_w2.in, d.sh_w2.in, 128, ss);
    linear_side(d.sh_w2, ws.sh_h, T, ws.sh_out, h8 ? &ha8 : nullptr);
    mark("moe.shared");
    // official: the experts are quantized, so they take xq; see moe_layer_routed for the rest.
    const uint16_t* xe = official() ? ws.xq : ws.xn;
    if (opt.exchange && l < c.num_hidden_layers) {
        // Expert parallelism: the tokens go to the ranks that hold their experts, this rank's
        // experts run over what arrived (slots of other ranks' experts sort into the skip bucket and
        // are not computed), the rows go home, and the combine adds them to the shared expert in
        // slot order (exchange.h: bit-identical to moe_layer_combine in a world of one).
        dist::ExpertExchange& ex = *opt.exchange;
        ex.dispatch(l, xe, ws.ids, ws.wts, s.X, stream);   // rows [T, X): ids −1 (enqueue), no expert
        ep_experts(d, ex);
        join();
        ex.combine(ws.sh_out, ws.ids, ws.y, official(), stream);
        mark("moe.experts");
        return;
    }
    // The small-T path at up to small_max_t tokens (4, or 8 for NVFP4 experts in exact numerics),
    // where it measured faster end to end: at 1-2 tokens first (H200, megamoe-forward-bench --model
    // flash --layers 20, docs/bench-gemm.md "small-T path": B = 1 / 2 exact 4472 / 5309 against
    // 4494 / 5490 µs per step, official 4405 / 5288 against 4502 / 5357); at 3-4 tokens since
    // 2026-12-07 (H100, 8-layer V4-Flash, --moe-small-max-t 4 against 2, three rounds, means: NVFP4
    // exact B = 3 / 4 −7.1% / −7.3%, official −4.0% / −4.3%; MXFP4 exact −3.7% / −3.3%, official
    // −0.7% / −0.4%; 2-layer V4-Pro exact −5.8% / −6.0%; docs/bench-forward.md); at 5-8 tokens see
    // small_max_t.
    const bool small = opt.moe_small && T <= small_max_t(d.experts) && cuda::moe_small_fits(d.experts, T, k, xe);
    if (small) {
        // Few tokens: L1 reads its routing from ids, L2 combines and adds the shared expert itself.
        ++moe_small_count;
        cuda::moe_small_l1(d.experts, limit, xe, ws.ids, ws.wts, T, moe_ws, stream, nm);
        join();
        cuda::moe_small_l2(d.experts, xe, ws.ids, T, ws.sh_out, ws.y, moe_ws, stream, nm);
    } else {
        // RunnerOptions::w4a8: the W4A8 tile where the automatic choice is a wgmma tile (it runs as that
        // choice unless moe_w4a8_fits: official numerics, MXFP4 experts).
        const cuda::Tile tile = opt.w4a8 ? cuda::w4a8_tile(cuda::moe_layer_config(d.experts, T, k)) : cuda::Tile::automatic;
        cuda::moe_layer_routed(d.experts, limit, xe, ws.ids, ws.wts, T, moe_ws, stream, tile, nm);
        join();
        cuda::moe_layer_combine(moe_ws, T, ws.sh_out, ws.y, stream, nm);
    }
    mark("moe.experts");
}

void Runner::Impl::enqueue(const Shape& s, const Probe* probe, int mode) {
    next_event = 0;   // the fork / join events of this step, in order
    const ModelConfig& c = cfg;
    const int64_t T = s.T, D = c.hidden_size, hc = c.hc_mult, L = c.num_hidden_layers;
    const float hc_eps = static_cast<float>(c.hc_eps), eps = static_cast<float>(c.rms_norm_eps);
    const int64_t splits = cuda::hc_mix_splits(T, hc * D);

    mark("start");
    if (s.X > T)   // expert parallelism, rows past this rank's tokens: padding slots (ids −1) for every layer
        check(cudaMemsetAsync(ws.ids + T * c.num_experts_per_tok, 0xff,
                              static_cast<size_t>((s.X - T) * c.num_experts_per_tok) * 4, stream),
              "exchange padding ids");
    cuda::embed_streams(dm->embed, ws.tokens, T, D, hc, ws.X, stream);
    cuda::hc_mix(ws.X, nullptr, nullptr, nullptr, nullptr, T, hc, D, dm->layers[0].hc_attn_fn, c.mix_width(), ws.part,
                 splits, stream, nm, opt.hc_stage);
    for (int64_t l = 0; l < L; ++l) {
        const DeviceLayer& d = dm->layers[static_cast<size_t>(l)];
        if (trace(probe, trace_names::streams, l, ws.X, false, false, T, hc * D))   // forced: mix the new streams
            cuda::hc_mix(ws.X, nullptr, nullptr, nullptr, nullptr, T, hc, D, d.hc_attn_fn, c.mix_width(), ws.part,
                         splits, stream, nm, opt.hc_stage);

        pre_site(splits, T, d.hc_attn_base, d.hc_attn_scale, d.attn_norm);
        mark("hc");
        if (trace(probe, trace_names::attn_in, l, ws.xn, true, false, T, D)) forced_xn(T);
        attention(d, l, s, probe);
        trace(probe, trace_names::attn_out, l, ws.y, false, false, T, D);
        // hc_post of the attention fused with the mix of the ffn site.
        cuda::hc_mix(ws.X, ws.y, ws.post, ws.comb, ws.X2, T, hc, D, d.hc_ffn_fn, c.mix_width(), ws.part, splits,
                     stream, nm, opt.hc_stage);
        std::swap(ws.X, ws.X2);

        pre_site(splits, T, d.hc_ffn_base, d.hc_ffn_scale, d.ffn_norm);
        mark("hc");
        if (trace(probe, trace_names::ffn_in, l, ws.xn, true, false, T, D)) forced_xn(T);
        moe(d, l, s, probe);
        trace(probe, trace_names::ffn_out, l, ws.y, false, false, T, D);
        // hc_post of the ffn fused with the next site's mix (the next layer's attention, or the head).
        const bool last = l + 1 == L;
        cuda::hc_mix(ws.X, ws.y, ws.post, ws.comb, ws.X2, T, hc, D,
                     last ? dm->hc_head_fn : dm->layers[static_cast<size_t>(l + 1)].hc_attn_fn,
                     last ? hc : c.mix_width(), ws.part, splits, stream, nm, opt.hc_stage);
        std::swap(ws.X, ws.X2);
    }
    cuda::hc_head_finish(ws.part, splits, ws.X, T, hc, D, dm->hc_head_base, dm->hc_head_scale, hc_eps, eps, dm->norm,
                         ws.xn, stream, nm);
    trace(probe, trace_names::final_norm, L, ws.xn, true, false, T, D);
    mark("hc");
    cuda::gather_rows_bf16(ws.xn, ws.rows, s.R, D, ws.sel, stream);
    head_logits(s.R, s.RX);
    mark("head");
    if (mode == kLogits) return;
    // Sampling on the device (cuda/sampler.h): masked ids to -inf, then one draw per row.
    const int64_t V = c.vocab_size, R = s.R;
    if (n_masked > 0) cuda::mask_logits(ws.logits, R, V, ws.masked, n_masked, stream);
    char* out = static_cast<char*>(ws.samp_out);
    const int64_t Rw = ws.R;   // the blocks are laid out for ws.R rows
    const cuda::SampleParams sp = sample_params();
    cuda::SampleOutputs so;
    so.ids = reinterpret_cast<int32_t*>(out);
    if (mode == kSampleLogprobs || mode == kSpecLogprobs) {
        so.logprob = reinterpret_cast<float*>(out + 4 * Rw);
        so.n_top = cuda::kMaxTopLogprobs;
        so.top_ids = reinterpret_cast<int32_t*>(out + 8 * Rw);
        so.top_logprobs = reinterpret_cast<float*>(out + (8 + 4 * cuda::kMaxTopLogprobs) * Rw);
    }
    if (mode == kSpec || mode == kSpecLogprobs) {
        // The standard rule at the verified rows (their drafts' logits kept per slot by
        // draft_chain), fused into the draws: checked rows report their decision, the others
        // draw, one CTA per row side by side (twin: spec_accept_rows, then sample_rows).
        cuda::SpecCheck check;
        check.q = draft_q.empty() ? ws.logits : draft_q.as<float>();   // greedy rows read no q
        check.q_row = reinterpret_cast<const int64_t*>(static_cast<const char*>(ws.samp_in) + 32 * Rw);
        check.draft = reinterpret_cast<const int32_t*>(static_cast<const char*>(ws.samp_in) + 40 * Rw);
        check.accepted = reinterpret_cast<int32_t*>(out + (8 + 8 * cuda::kMaxTopLogprobs) * Rw);
        cuda::sample_rows(ws.logits, R, V, sp, so, stream, &check, &ws.samp_scratch);
    } else {
        cuda::sample_rows(ws.logits, R, V, sp, so, stream, nullptr, &ws.samp_scratch);
    }
    mark("sample");
    if (mode != kSpec && mode != kSpecLogprobs) return;
    // A speculative step: the MTP block's next token at each position is a prompt's next token or
    // the token drawn at that position's row (for a verified token: the accepted draft itself,
    // the correction at the first rejection, the bonus token after the last draft).
    cuda::resolve_next_tokens(ws.next_given, so.ids, s.T, ws.mtp_next, stream);
    enqueue_mtp(s);
    sample_drafts(R, ws.mtp_ids);
    mark("mtp");
}

cuda::SampleParams Runner::Impl::sample_params() const {
    const char* in = static_cast<const char*>(ws.samp_in);
    const int64_t Rw = ws.R;
    cuda::SampleParams sp;
    sp.seed = reinterpret_cast<const uint64_t*>(in);
    sp.index = reinterpret_cast<const int64_t*>(in + 8 * Rw);
    sp.temperature = reinterpret_cast<const float*>(in + 16 * Rw);
    sp.top_p = reinterpret_cast<const float*>(in + 20 * Rw);
    sp.min_p = reinterpret_cast<const float*>(in + 24 * Rw);
    sp.top_k = reinterpret_cast<const int32_t*>(in + 28 * Rw);
    return sp;
}

void Runner::Impl::sample_drafts(int64_t R, int32_t* ids) {
    const int64_t V = cfg.vocab_size;
    if (n_masked > 0) cuda::mask_logits(ws.logits, R, V, ws.masked, n_masked, stream);
    cuda::SampleOutputs so;
    so.ids = ids;
    cuda::SampleParams sp = sample_params();
    sp.stream = cuda::kStreamDraft;
    sp.index_offset = 1;
    cuda::sample_rows(ws.logits, R, V, sp, so, stream, nullptr, &ws.samp_scratch);
}

// The MTP block (ref: mtp_forward) over the positions of the step just run, in lockstep with the
// main model: e = enorm(embed[next]), h = hnorm(main pre-head streams), X = h_proj(h) + e_proj(e)
// per stream, one V4 block with its own window ring (state layer L), its HC head and norm, the
// shared head. Like the main forward, GEMM inputs are bf16.
void Runner::Impl::enqueue_mtp(const Shape& s) {
    next_event = 0;
    const ModelConfig& c = cfg;
    const DeviceMtp& mt = *dm->mtp;
    const DeviceLayer& d = mt.block;
    const int64_t T = s.T, D = c.hidden_size, hc = c.hc_mult, L = c.num_hidden_layers;
    const float hc_eps = static_cast<float>(c.hc_eps), eps = static_cast<float>(c.rms_norm_eps);
    const int64_t splits = cuda::hc_mix_splits(T, hc * D);

    // Official numerics (ref mtp_forward): e and h in bf16, FP8-rounded for e_proj / h_proj (mtp_h is
    // h_proj's alone, so it is rounded in place), and their sum in bf16.
    cuda::rms_norm_rows(ws.X, T * hc, D, mt.hnorm, eps, ws.mtp_h, stream, nm,   // before ws.X is rewritten
                        rounds_input(mt.h_proj) ? ws.mtp_h : nullptr);
    cuda::embed_streams(dm->embed, ws.mtp_next, T, D, 1, ws.y, stream);
    cuda::rms_norm_rows(ws.y, T, D, mt.enorm, eps, ws.xn, stream, nm, rounds_input(mt.e_proj) ? ws.xq : nullptr);
    linear(mt.e_proj, input(mt.e_proj, ws.xn, ws.xq), T, ws.mtp_pe);
    linear(mt.h_proj, ws.mtp_h, T * hc, ws.X2);
    cuda::add_rows_broadcast(ws.X2, ws.mtp_pe, T, hc, D, ws.X, stream, nm);   // official: bf16 inputs and sum

    cuda::hc_mix(ws.X, nullptr, nullptr, nullptr, nullptr, T, hc, D, d.hc_attn_fn, c.mix_width(), ws.part, splits,
                 stream, nm, opt.hc_stage);
    pre_site(splits, T, d.hc_attn_base, d.hc_attn_scale, d.attn_norm);
    attention(d, L, s, nullptr);
    cuda::hc_mix(ws.X, ws.y, ws.post, ws.comb, ws.X2, T, hc, D, d.hc_ffn_fn, c.mix_width(), ws.part, splits, stream, nm, opt.hc_stage);
    std::swap(ws.X, ws.X2);
    pre_site(splits, T, d.hc_ffn_base, d.hc_ffn_scale, d.ffn_norm);
    moe(d, L, s, nullptr);
    cuda::hc_mix(ws.X, ws.y, ws.post, ws.comb, ws.X2, T, hc, D, mt.hc_head_fn, hc, ws.part, splits, stream, nm, opt.hc_stage);
    std::swap(ws.X, ws.X2);
    cuda::hc_head_finish(ws.part, splits, ws.X, T, hc, D, mt.hc_head_base, mt.hc_head_scale, hc_eps, eps, mt.norm,
                         ws.xn, stream, nm);
    cuda::gather_rows_bf16(ws.xn, ws.rows, s.R, D, ws.sel, stream);
    head_logits(s.R, s.R);   // (need_mtp: no vocabulary exchange here)
}

// ------------------------------------------------------------------------------------------------

Runner::Runner(const Model& model, const RunnerOptions& opt, std::ostream* log)
    : impl_(std::make_unique<Impl>(&model, model.cfg, 0, opt, log)) {}
Runner::Runner(const ModelConfig& c, uint64_t synth_seed, const RunnerOptions& opt, std::ostream* log)
    : impl_(std::make_unique<Impl>(nullptr, c, synth_seed, opt, log)) {}
Runner::~Runner() = default;

const ModelConfig& Runner::cfg() const { return impl_->cfg; }
const MemoryPlan& Runner::plan() const { return impl_->plan; }
const RunnerOptions& Runner::options() const { return impl_->opt; }
bool Runner::has_mtp() const { return impl_->dm->mtp.has_value(); }
bool Runner::is_open(int32_t slot) const { return impl_->pool->is_open(slot); }
int32_t Runner::open() { return impl_->pool->open(); }
void Runner::close(int32_t slot) { impl_->pool->close(slot); }
bool Runner::reserve(int32_t slot, int64_t n) { return impl_->pool->reserve(slot, n); }
int64_t Runner::n_past(int32_t slot) const { return impl_->pool->n_past(slot); }
double Runner::cache_usage() const { return impl_->pool->usage(); }
int64_t Runner::capacity_tokens() const { return impl_->pool->capacity_tokens(); }
int64_t Runner::prefix_block() const { return impl_->pool->n_snapshots() > 0 ? impl_->pool->layout().block_tokens : 0; }
int32_t Runner::snapshot(int32_t slot) { return impl_->pool->snapshot(slot, impl_->stream); }
void Runner::drop_snapshot(int32_t handle) { impl_->pool->drop_snapshot(handle); }
int32_t Runner::open_from(int32_t handle) { return impl_->pool->open_from(handle, impl_->stream); }
int64_t Runner::graph_replays() const { return impl_->replays; }
double Runner::graph_launch_host_us() const { return impl_->replay_launch_us; }
int64_t Runner::padded_tokens(const std::vector<RunnerChunk>& chunks, bool all_logits) const {
    return impl_->padded(chunks, all_logits).first;
}

int64_t Runner::padded_rows(const std::vector<RunnerChunk>& chunks, bool all_logits) const {
    return impl_->padded(chunks, all_logits).second;
}

void Runner::set_head_rows(int64_t rows) {
    Impl& I = *impl_;
    if (!I.opt.head_exchange) fail("gpu runner: set_head_rows without a vocabulary exchange (RunnerOptions::head_exchange)");
    if (rows < 0 || rows > I.ws.R) fail("gpu runner: ", rows, " head rows per step, outside [0, ", I.ws.R, "] logit rows");
    I.head_rows = rows;
}

void Runner::Impl::ep_experts(const DeviceLayer& d, dist::ExpertExchange& ex) {
    const int64_t k = cfg.num_experts_per_tok, rows = ex.rows();
    const float limit = static_cast<float>(cfg.swiglu_limit);
    // The small-T path where a rank computes about as many tokens as the single-GPU rule takes it
    // for (T ≤ small_max_t, see moe()): rows / world tokens' slots are local on average. Its L2
    // writes the exchange's layout itself (slot rows or row sums), so neither the general path's
    // dispatch kernels nor the exchange's place kernel run. (Chosen from the single-GPU measurement; not
    // measured on several GPUs.)
    if (opt.moe_small && rows <= small_max_t(d.experts) * ex.world() &&
        cuda::moe_small_fits(d.experts, rows, k, ex.x_in())) {
        ++moe_small_count;
        cuda::moe_small_l1(d.experts, limit, ex.x_in(), ex.local_in(), ex.wts_in(), rows, moe_ws_ep, stream, nm);
        cuda::moe_small_l2_placed(d.experts, ex.x_in(), ex.local_in(), rows, ex.places_slot_rows(), ex.placed(),
                                  moe_ws_ep, stream, nm);
        ex.give_back_placed(stream);
        return;
    }
    // The tile from the rows this rank's experts can expect: a slot's expert is local with
    // probability 1 / world, so rows / world tokens over the local experts (the automatic choice
    // would count the skip bucket's rows as if they were computed).
    const cuda::Tile tile = cuda::moe_layer_config(d.experts, rows / ex.world(), k);
    cuda::moe_layer_routed(d.experts, limit, ex.x_in(), ex.local_in(), ex.wts_in(), rows, moe_ws_ep, stream, tile, nm);
    ex.give_back(moe_ws_ep.rows.data(), moe_ws_ep.dispatch.inv.data(), official(), stream);
}

void Runner::Impl::enqueue_idle(int64_t X) {
    const ModelConfig& c = cfg;
    const int64_t k = c.num_experts_per_tok;
    dist::ExpertExchange& ex = *opt.exchange;
    check(cudaMemsetAsync(ws.ids, 0xff, static_cast<size_t>(X * k) * 4, stream), "exchange padding ids");
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
        const DeviceLayer& d = dm->layers[static_cast<size_t>(l)];
        ex.dispatch(l, ws.xn, ws.ids, ws.wts, X, stream);   // x and weights: never read (every slot padding)
        ep_experts(d, ex);
        ex.combine(nullptr, ws.ids, ws.y, official(), stream);
    }
    if (opt.head_exchange) head_logits(0, head_rows);   // the other ranks' rows through this rank's head slice
}

void Runner::step_idle() {
    Impl& I = *impl_;
    if (!I.opt.exchange) fail("gpu runner: step_idle without an expert exchange (RunnerOptions::exchange)");
    const int64_t X = I.exchange_rows;
    if (X < 1) fail("gpu runner: step_idle needs set_exchange_rows of at least 1 (the rows the other ranks move)");
    if (I.opt.head_exchange && I.head_rows < 1)
        fail("gpu runner: step_idle needs set_head_rows of at least 1 (the rows the other ranks' heads move)");
    // Idle graphs: below the chained drafts' negative keys.
    const int64_t key = -(int64_t{1} << 40) - (I.head_rows * (int64_t{1} << 20) + X);
    if (I.opt.graphs)
        I.replay_or_capture(key, [&] { I.enqueue_idle(X); }, "idle step");
    else
        I.enqueue_idle(X);
    check(cudaStreamSynchronize(I.stream), "idle step");
}

void Runner::set_exchange_rows(int64_t rows) {
    Impl& I = *impl_;
    if (!I.opt.exchange) fail("gpu runner: set_exchange_rows without an expert exchange (RunnerOptions::exchange)");
    if (rows < 0 || rows > I.ws.T)
        fail("gpu runner: ", rows, " exchange rows per step, outside [0, --max-batch-tokens ", I.ws.T, "]");
    I.exchange_rows = rows;
}

int64_t Runner::graphs_captured() const { return static_cast<int64_t>(impl_->graphs.size()); }
int64_t Runner::fp8_linear_launches() const { return impl_->fp8_launches; }
int64_t Runner::lt_linear_launches() const { return impl_->lt_launches; }
int64_t Runner::lt_bf16_launches() const { return impl_->lt_bf16_launches; }
int64_t Runner::indexer_side_launches() const { return impl_->idx_side_launches; }
int64_t Runner::moe_small_launches() const { return impl_->moe_small_count; }
CUstream_st* Runner::stream() const { return impl_->stream; }

std::vector<std::pair<std::string, double>> Runner::profile_step(const std::vector<RunnerChunk>& chunks) {
    Impl& I = *impl_;
    const bool graphs = I.opt.graphs;
    I.opt.graphs = false;
    I.profiling = true;
    I.concurrent = false;   // stage times one after another
    std::vector<float> logits;
    try {
        step(chunks, false, logits);   // the profile times the logits path (sampling is timed by its own tests)
    } catch (...) {
        I.opt.graphs = graphs;
        I.profiling = false;
        I.concurrent = I.opt.side_stream;
        for (auto& [n, e] : I.marks) (void)cudaEventDestroy(e);
        I.marks.clear();
        throw;
    }
    I.opt.graphs = graphs;
    I.profiling = false;
    I.concurrent = I.opt.side_stream;
    std::vector<std::pair<std::string, double>> out;
    for (size_t i = 1; i < I.marks.size(); ++i) {
        float ms = 0;
        check(cudaEventElapsedTime(&ms, I.marks[i - 1].second, I.marks[i].second), "profile event");
        auto it = std::find_if(out.begin(), out.end(), [&](const auto& p) { return p.first == I.marks[i].first; });
        if (it == out.end())
            out.push_back({I.marks[i].first, ms});
        else
            it->second += ms;
    }
    for (auto& [n, e] : I.marks) (void)cudaEventDestroy(e);
    I.marks.clear();
    return out;
}
void Runner::set_n_past_for_benchmark(int32_t slot, int64_t n) {
    MEGAMOE_CHECK(n <= impl_->pool->reserved_tokens(slot), "set_n_past_for_benchmark: ", n, " positions, ",
                  impl_->pool->reserved_tokens(slot), " reserved");
    impl_->pool->advance(slot, n - impl_->pool->n_past(slot));
}

SequenceState Runner::download_state(int32_t slot) const {
    check(cudaStreamSynchronize(impl_->stream), "sync");
    return impl_->pool->download(impl_->cfg, slot);
}

void Runner::step(const std::vector<RunnerChunk>& chunks, bool all_logits, std::vector<float>& logits,
                  const Probe& probe) {
    impl_->run(chunks, all_logits, probe, nullptr, &logits, nullptr);
}

void Runner::step_mtp(const std::vector<RunnerChunk>& chunks, const std::vector<std::vector<int32_t>>& next,
                      std::vector<float>& logits, std::vector<float>& mtp_logits) {
    Impl& I = *impl_;
    const ModelConfig& c = I.cfg;
    I.need_mtp();
    if (next.size() != chunks.size()) fail("gpu runner: ", next.size(), " next-token lists for ", chunks.size(), " chunks");
    // The next tokens go with the step inputs (Workspace::mtp_next, one per token; 0 on padding rows).
    int32_t* dst = I.pinned_in + (I.ws.mtp_next - I.ws.in);
    std::fill(dst, dst + I.ws.T, 0);
    int64_t t = 0;
    for (size_t i = 0; i < chunks.size(); ++i) {
        if (next[i].size() != chunks[i].tokens.size())
            fail("gpu runner: chunk ", i, " has ", chunks[i].tokens.size(), " tokens but ", next[i].size(), " next tokens");
        for (size_t j = 0; j < next[i].size(); ++j) {
            if (next[i][j] < 0 || next[i][j] >= c.vocab_size)
                fail("gpu runner: next token id ", next[i][j], " (chunk ", i, ", index ", j,
                     ") is outside the vocabulary [0, ", c.vocab_size, ")");
            if (t < I.ws.T) dst[t++] = next[i][j];
        }
    }
    // The main step (it checks the chunks and uploads the inputs, next tokens included), then the
    // MTP block over the same positions, reading the streams the main pass left in the workspace.
    I.run(chunks, true, nullptr, nullptr, &logits, nullptr);
    I.mtp_pass(I.last_rows, mtp_logits);
}

void Runner::Impl::mtp_pass(int64_t rows, std::vector<float>& mtp_logits) {
    const ModelConfig& c = cfg;
    chain_ready = false;
    // Every position of the step gets a logit row (the rows of an all-logits step are its tokens).
    const Shape s{last_shape.T, last_shape.C, last_shape.T};
    if (last_rows_all != last_shape.T) {
        // The step's logit rows were its chunks' last tokens: point them at every token instead.
        for (int64_t t = 0; t < last_shape.T; ++t) pinned_in[(ws.rows - ws.in) + t] = static_cast<int32_t>(t);
        check(cudaMemcpyAsync(ws.rows, pinned_in + (ws.rows - ws.in), static_cast<size_t>(last_shape.T) * 4,
                              cudaMemcpyHostToDevice, stream),
              "mtp rows");
    }
    if (s.R > ws.R) fail("gpu runner: the MTP pass needs ", s.R, " logit rows, more than the ", ws.R, " planned");
    enqueue_mtp(s);
    check(cudaMemcpyAsync(pinned_logits, ws.logits, static_cast<size_t>(rows * c.vocab_size) * 4,
                          cudaMemcpyDeviceToHost, stream),
          "mtp logits");
    check(cudaStreamSynchronize(stream), "mtp step");
    mtp_logits.assign(pinned_logits, pinned_logits + rows * c.vocab_size);
}

void Runner::mtp_step(const std::vector<std::vector<int32_t>>& next, std::vector<float>& mtp_logits) {
    Impl& I = *impl_;
    const ModelConfig& c = I.cfg;
    I.need_mtp();
    if (I.last_chunk_lens.empty()) fail("gpu runner: mtp_step needs a step run just before it");
    if (next.size() != I.last_chunk_lens.size())
        fail("gpu runner: ", next.size(), " next-token lists for the last step's ", I.last_chunk_lens.size(), " chunks");
    std::vector<int32_t> ids(static_cast<size_t>(I.last_shape.T), 0);   // padding rows: token 0
    int64_t t = 0;
    for (size_t i = 0; i < next.size(); ++i) {
        if (static_cast<int64_t>(next[i].size()) != I.last_chunk_lens[i])
            fail("gpu runner: chunk ", i, " of the last step has ", I.last_chunk_lens[i], " tokens but ", next[i].size(),
                 " next tokens");
        for (size_t j = 0; j < next[i].size(); ++j) {
            if (next[i][j] < 0 || next[i][j] >= c.vocab_size)
                fail("gpu runner: next token id ", next[i][j], " (chunk ", i, ", index ", j,
                     ") is outside the vocabulary [0, ", c.vocab_size, ")");
            ids[static_cast<size_t>(t++)] = next[i][j];
        }
    }
    int32_t* pin = I.pinned_in + (I.ws.mtp_next - I.ws.in);
    std::copy(ids.begin(), ids.end(), pin);
    check(cudaMemcpyAsync(I.ws.mtp_next, pin, ids.size() * 4, cudaMemcpyHostToDevice, I.stream), "mtp next tokens");
    I.mtp_pass(t, mtp_logits);
    I.last_chunk_lens.clear();   // the workspace no longer holds that step's streams
}

void Runner::save_state(int32_t slot) {
    if (!impl_->opt.rollback) fail("gpu runner: save_state needs RunnerOptions::rollback");
    impl_->pool->save(slot, impl_->stream);
}

void Runner::restore_state(int32_t slot, int64_t n_past) {
    if (!impl_->opt.rollback) fail("gpu runner: restore_state needs RunnerOptions::rollback");
    impl_->pool->restore(slot, n_past, impl_->stream);
    impl_->last_chunk_lens.clear();
}

void Runner::step_spec(const std::vector<SpecChunk>& chunks, const std::vector<SampleSpec>& spec,
                       std::vector<std::vector<SampledToken>>& drawn, std::vector<std::vector<int32_t>>& drafts,
                       std::vector<int64_t>& accepted) {
    Impl& I = *impl_;
    if (spec.size() != chunks.size()) fail("gpu runner: ", spec.size(), " sampling specs for ", chunks.size(), " chunks");
    Impl::SpecIo sio;
    std::vector<RunnerChunk> rc;
    std::vector<uint8_t> every;
    std::vector<int32_t> next;
    std::vector<SampleSpec> row_spec;   // one per logit row: the chunk's, its index counting rows
    for (size_t i = 0; i < chunks.size(); ++i) {
        const SpecChunk& ch = chunks[i];
        const int64_t n = static_cast<int64_t>(ch.tokens.size());
        if (ch.next < -1 || ch.next >= I.cfg.vocab_size)
            fail("gpu runner: chunk ", i, "'s next token ", ch.next, " is outside the vocabulary [0, ", I.cfg.vocab_size, ")");
        if (ch.verify && ch.next != -1) fail("gpu runner: chunk ", i, " is verified; its next tokens are the draws");
        if (ch.verify && n - 1 > kMaxSpeculativeTokens)
            fail("gpu runner: chunk ", i, " verifies ", n - 1, " drafts, at most ", kMaxSpeculativeTokens);
        const bool greedy = spec[i].temperature <= 0.0f || spec[i].top_k == 1;
        if (ch.verify && n > 1 && !greedy && I.draft_q.empty())
            fail("gpu runner: verifying sampled drafts needs RunnerOptions::rollback (the slots' draft logits)");
        rc.push_back({ch.slot, ch.tokens});
        every.push_back(ch.verify ? 1 : 0);
        for (int64_t j = 0; j < n; ++j) {
            if (ch.verify) next.push_back(-1);
            else next.push_back(j + 1 < n ? ch.tokens[static_cast<size_t>(j + 1)] : ch.next);
        }
        for (int64_t j = ch.verify ? 0 : n - 1; j < n; ++j) {
            SampleSpec sp = spec[i];
            sp.index += ch.verify ? j : 0;
            row_spec.push_back(sp);
            // Row j < n - 1 of a verified chunk checks d_{j+1} against the slot's kept q row j.
            const bool check = ch.verify && j + 1 < n;
            sio.q_row.push_back(check ? static_cast<int64_t>(ch.slot) * kMaxSpeculativeTokens + j : -1);
            sio.check.push_back(check ? ch.tokens[static_cast<size_t>(j + 1)] : -1);
        }
    }
    sio.every_row = &every;
    sio.next = &next;
    std::vector<SampledToken> rows;
    I.run(rc, false, nullptr, &row_spec, nullptr, &rows, &sio);
    I.last_chunk_lens.clear();   // the MTP pass rewrote the main streams: no mtp_step may follow
    I.chain_ready = true;        // ... and left its own: draft_chain may follow
    drawn.assign(chunks.size(), {});
    drafts.assign(chunks.size(), {});
    accepted.assign(chunks.size(), 0);
    size_t r = 0;
    for (size_t i = 0; i < chunks.size(); ++i) {
        const size_t n = chunks[i].verify ? chunks[i].tokens.size() : 1;
        bool leading = chunks[i].verify;
        for (size_t j = 0; j < n; ++j, ++r) {
            drawn[i].push_back(std::move(rows[r]));
            drafts[i].push_back(sio.drafts[r]);
            leading = leading && j + 1 < n && sio.accepted[r] != 0;
            if (leading) ++accepted[i];
        }
    }
}

void Runner::step_verify(const std::vector<RunnerChunk>& chunks, std::vector<std::vector<int32_t>>& main_ids,
                         std::vector<std::vector<int32_t>>& draft_ids) {
    std::vector<SpecChunk> sc;
    for (const RunnerChunk& ch : chunks) sc.push_back({ch.slot, ch.tokens, true, -1});
    const std::vector<SampleSpec> greedy(chunks.size(), SampleSpec{0.0f});   // temperature 0: argmax
    std::vector<std::vector<SampledToken>> drawn;
    std::vector<int64_t> accepted;
    step_spec(sc, greedy, drawn, draft_ids, accepted);
    main_ids.assign(chunks.size(), {});
    for (size_t i = 0; i < chunks.size(); ++i)
        for (const SampledToken& d : drawn[i]) main_ids[i].push_back(d.id);
}

void Runner::Impl::enqueue_chain(int64_t n, int64_t steps, std::vector<float>* logits) {
    const ModelConfig& c = cfg;
    const int64_t hcD = c.hc_mult * c.hidden_size, V = c.vocab_size;
    const int32_t* rows = ws.chain_in;
    const int32_t* start_pos = ws.chain_in + ws.C;
    const int32_t* slots = ws.chain_in + 2 * ws.C;
    const int32_t* d1 = ws.chain_in + 3 * ws.C;
    const int32_t* logit_rows = ws.chain_in + 4 * ws.C;
    float* q = draft_q.as<float>();
    const int32_t Kq = static_cast<int32_t>(kMaxSpeculativeTokens);
    // d_1's logits (the last MTP pass's, masked, at the starting rows) kept as the slots' q row 0.
    if (q) cuda::keep_draft_rows(ws.logits, logit_rows, slots, n, V, 0, Kq, q, stream);
    if (steps == 0) return;
    // The starting rows' streams (the last MTP pass's, in ws.X) to rows 0 .. n - 1.
    cuda::gather_rows_f32(ws.X, rows, n, hcD, ws.X2, stream);
    std::swap(ws.X, ws.X2);
    for (int64_t k = 1; k <= steps; ++k) {
        cuda::ChainStepInputs in;
        in.start_pos = start_pos;
        in.slot = slots;
        in.prev = k == 1 ? d1 : ws.chain_out + (k - 2) * ws.C;
        in.tok = ws.tokens;
        in.pos = ws.pos;
        in.slot_out = ws.slot;
        in.chunk = ws.chunk;
        in.first = ws.chunk_first;
        in.len = ws.chunk_len;
        in.rows = ws.rows;
        in.next = ws.mtp_next;
        cuda::chain_step_inputs(in, n, static_cast<int32_t>(k), stream);
        enqueue_mtp(Shape{n, n, n});   // leaves the block's streams of these rows in ws.X
        if (logits) {
            check(cudaMemcpyAsync(pinned_logits, ws.logits, static_cast<size_t>(n * V) * 4, cudaMemcpyDeviceToHost, stream),
                  "chained draft logits");
            check(cudaStreamSynchronize(stream), "chained draft logits");
            logits->insert(logits->end(), pinned_logits, pinned_logits + n * V);
        }
        if (n_masked > 0) cuda::mask_logits(ws.logits, n, V, ws.masked, n_masked, stream);
        if (q) cuda::keep_draft_rows(ws.logits, nullptr, slots, n, V, static_cast<int32_t>(k), Kq, q, stream);
        cuda::SampleParams sp = sample_params();
        sp.stream = cuda::kStreamDraft;   // d_{k+1} guesses the token at index + k + 1
        sp.index_offset = 1;
        const int64_t r0 = (k - 1) * n;   // this step's parameter rows
        sp.seed += r0;
        sp.index += r0;
        sp.temperature += r0;
        sp.top_p += r0;
        sp.min_p += r0;
        sp.top_k += r0;
        cuda::SampleOutputs so;
        so.ids = ws.chain_out + (k - 1) * ws.C;
        cuda::sample_rows(ws.logits, n, V, sp, so, stream, nullptr, &ws.samp_scratch);
    }
    // Back to the buffer parity the captured graphs were recorded with (enqueue_mtp swaps an even
    // number of times; the gather swapped once).
    std::swap(ws.X, ws.X2);
}

void Runner::draft_chain(const std::vector<ChainStart>& starts, int64_t steps, std::vector<std::vector<int32_t>>& drafts,
                         std::vector<float>* logits) {
    Impl& I = *impl_;
    Workspace& ws = I.ws;
    const ModelConfig& c = I.cfg;
    drafts.assign(starts.size(), {});
    if (logits) logits->clear();
    if (starts.empty() || steps < 0 || (steps == 0 && I.draft_q.empty())) return;   // nothing to chain or keep
    I.need_mtp();
    if (!I.chain_ready) fail("gpu runner: draft_chain needs a step_spec or step_verify just before it");
    if (steps > kGraphChunkMax - 1) fail("gpu runner: ", steps, " chained drafts, at most ", kGraphChunkMax - 1);
    const int64_t n = static_cast<int64_t>(starts.size());
    std::vector<bool> seen(static_cast<size_t>(I.pool->n_slots()), false);
    for (size_t i = 0; i < starts.size(); ++i) {
        const ChainStart& st = starts[i];
        if (st.row < 0 || st.row >= static_cast<int64_t>(I.last_pos.size()))
            fail("gpu runner: chain start ", i, ": row ", st.row, " is not a token of the last step (", I.last_pos.size(), ")");
        if (I.last_slot[static_cast<size_t>(st.row)] != st.slot)
            fail("gpu runner: chain start ", i, ": row ", st.row, " is slot ", I.last_slot[static_cast<size_t>(st.row)],
                 "'s, not ", st.slot, "'s");
        if (seen[static_cast<size_t>(st.slot)]) fail("gpu runner: slot ", st.slot, " is chained twice");
        seen[static_cast<size_t>(st.slot)] = true;
        if (st.draft < 0 || st.draft >= c.vocab_size)
            fail("gpu runner: chain start ", i, ": draft ", st.draft, " is outside the vocabulary [0, ", c.vocab_size, ")");
        if (I.last_logit_row[static_cast<size_t>(st.row)] < 0)
            fail("gpu runner: chain start ", i, ": token ", st.row, " of the last step had no logit row (no d_1 drawn there)");
        if (I.last_pos[static_cast<size_t>(st.row)] + steps >= I.opt.max_model_len)
            fail("gpu runner: chain start ", i, ": positions past --max-model-len ", I.opt.max_model_len);
    }
    // Pad to a decode bucket (the padding slot at position 0, row 0, token 0) so that the chain
    // replays a graph per (bucket, steps); logits for tests run eagerly.
    int64_t nb = n;
    if (I.opt.graphs && !logits)
        for (int64_t b : I.buckets)
            if (b >= n && b * steps <= ws.R) {
                nb = b;
                break;
            }
    if (nb * steps > ws.R || nb > ws.C)
        fail("gpu runner: ", n, " chained starts of ", steps, " drafts need ", n * steps, " sampling rows, more than ", ws.R);
    // The chained positions p + 1 .. p + steps write rows of the MTP block's ring; with its
    // StateLayout::kRingSpare spare rows they overwrite none that a later query reads (the next
    // real query, at p + 1, reads positions from p + 2 - W), and the next real pass rewrites them.
    int32_t* pin = I.pinned_chain;
    for (int64_t i = 0; i < nb; ++i) {
        const bool real = i < n;
        const ChainStart* st = real ? &starts[static_cast<size_t>(i)] : nullptr;
        pin[i] = real ? static_cast<int32_t>(st->row) : 0;
        pin[ws.C + i] = real ? I.last_pos[static_cast<size_t>(st->row)] : 0;
        pin[2 * ws.C + i] = real ? st->slot : I.pool->pad_slot();
        pin[3 * ws.C + i] = real ? st->draft : 0;
        pin[4 * ws.C + i] = real ? I.last_logit_row[static_cast<size_t>(st->row)] : 0;
        SampleSpec sp = real ? st->spec : SampleSpec{0.0f};
        const int64_t index = sp.index;
        for (int64_t k = 1; k <= steps; ++k) {   // step k's row (k - 1)·nb + i, keyed on index + k
            sp.index = index + k;
            I.put_sample_spec((k - 1) * nb + i, sp);
        }
    }
    const cudaStream_t stream = I.stream;
    check(cudaMemcpyAsync(ws.chain_in, pin, static_cast<size_t>(5 * ws.C) * 4, cudaMemcpyHostToDevice, stream),
          "chained draft inputs");
    check(cudaMemcpyAsync(ws.samp_in, I.pinned_samp_in, ws.samp_in_bytes, cudaMemcpyHostToDevice, stream),
          "chained draft sampling inputs");
    if (logits) {   // eager, with each step's logits
        I.enqueue_chain(nb, steps, logits);
    } else {
        const int64_t key = -1 - (nb * kGraphChunkMax + steps);   // chain graphs: negative keys
        if (I.opt.graphs)
            I.replay_or_capture(key, [&] { I.enqueue_chain(nb, steps); }, "chained drafts");
        else
            I.enqueue_chain(nb, steps);
    }
    int32_t* out = pin + 5 * ws.C;
    check(cudaMemcpyAsync(out, ws.chain_out, static_cast<size_t>(steps * ws.C) * 4, cudaMemcpyDeviceToHost, stream),
          "chained drafts");
    check(cudaStreamSynchronize(stream), "chained drafts");
    for (int64_t i = 0; i < n; ++i)
        for (int64_t k = 0; k < steps; ++k) drafts[static_cast<size_t>(i)].push_back(out[k * ws.C + i]);
    I.chain_ready = false;
    I.last_chunk_lens.clear();
}

bool Runner::rewind_needs_save(int64_t first, int64_t n) const {
    return !impl_->pool->layout().rewind_exact(first, n);
}

void Runner::rewind(int32_t slot, int64_t n_past) {
    Impl& I = *impl_;
    if (!I.pool->is_open(slot)) fail("gpu runner: slot ", slot, " is not open");
    const int64_t now = I.pool->n_past(slot);
    if (n_past < 0 || n_past > now) fail("gpu runner: cannot rewind slot ", slot, " from ", now, " to ", n_past);
    if (!I.pool->layout().rewind_exact(n_past, now - n_past))
        fail("gpu runner: positions ", n_past, "..", now - 1, " of slot ", slot,
             " cannot be dropped by a rewind (StateLayout::rewind_exact; restore_state instead)");
    I.pool->rewind(slot, n_past);
    I.last_chunk_lens.clear();
}

void Runner::step_sample(const std::vector<RunnerChunk>& chunks, const std::vector<SampleSpec>& spec,
                         std::vector<SampledToken>& out) {
    if (spec.size() != chunks.size()) fail("gpu runner: ", spec.size(), " sampling specs for ", chunks.size(), " chunks");
    impl_->run(chunks, false, nullptr, &spec, nullptr, &out);
}

void Runner::set_masked_ids(const std::vector<int32_t>& ids) {
    Impl& I = *impl_;
    const int64_t V = I.cfg.vocab_size;
    for (int32_t id : ids)
        if (id < 0 || id >= V) fail("masked ids: ", id, " is outside the vocabulary [0, ", V, ")");
    if (static_cast<int64_t>(ids.size()) >= V) fail("masked ids: every one of the ", V, " ids is masked");
    if (!ids.empty())
        check(cudaMemcpyAsync(I.ws.masked, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice, I.stream), "masked ids");
    check(cudaStreamSynchronize(I.stream), "masked ids");
    I.n_masked = static_cast<int64_t>(ids.size());
    for (auto& [k, g] : I.graphs) (void)cudaGraphExecDestroy(g);   // they hold the old count
    I.graphs.clear();
}

void Runner::Impl::check_chunks(const std::vector<RunnerChunk>& chunks, bool all_logits,
                                const std::vector<SampleSpec>* spec, const SpecIo* sio) const {
    const ModelConfig& c = cfg;
    if (chunks.empty()) fail("gpu runner: a step needs at least one chunk");
    int64_t T = 0, R = 0;
    std::vector<bool> seen(static_cast<size_t>(pool->n_slots()), false);
    for (size_t i = 0; i < chunks.size(); ++i) {
        const RunnerChunk& ch = chunks[i];
        if (!pool->is_open(ch.slot)) fail("gpu runner: chunk ", i, " names slot ", ch.slot, ", which is not open");
        if (seen[static_cast<size_t>(ch.slot)]) fail("gpu runner: slot ", ch.slot, " appears twice in one step");
        seen[static_cast<size_t>(ch.slot)] = true;
        if (ch.tokens.empty()) fail("gpu runner: chunk ", i, " has no tokens");
        const int64_t n = static_cast<int64_t>(ch.tokens.size());
        const int64_t end = pool->n_past(ch.slot) + n;
        if (end > pool->reserved_tokens(ch.slot))
            fail("gpu runner: sequence in slot ", ch.slot, " would reach ", end, " positions, past the ",
                 pool->reserved_tokens(ch.slot), " reserved for it");
        for (size_t j = 0; j < ch.tokens.size(); ++j)
            if (ch.tokens[j] < 0 || ch.tokens[j] >= c.vocab_size)
                fail("gpu runner: token id ", ch.tokens[j], " (chunk ", i, ", index ", j,
                     ") is outside the vocabulary [0, ", c.vocab_size, ")");
        const bool every = sio ? (*sio->every_row)[i] != 0 : all_logits;
        T += n;
        R += every ? n : 1;
    }
    if (T > ws.T) fail("gpu runner: ", T, " tokens in one step, more than --max-batch-tokens ", ws.T);
    if (static_cast<int64_t>(chunks.size()) > ws.C) fail("gpu runner: ", chunks.size(), " chunks, more than ", ws.C);
    if (R > ws.R) fail("gpu runner: ", R, " logit rows in one step, more than the ", ws.R, " planned");
    if (spec)
        for (const SampleSpec& sp : *spec)
            if (sp.n_top > cuda::kMaxTopLogprobs) fail("gpu runner: ", sp.n_top, " top logprobs, more than ", cuda::kMaxTopLogprobs);
}

void Runner::check_step(const std::vector<RunnerChunk>& chunks, bool all_logits, const std::vector<SampleSpec>* spec) const {
    if (spec && spec->size() != chunks.size())
        fail("gpu runner: ", spec->size(), " sampling specs for ", chunks.size(), " chunks");
    impl_->check_chunks(chunks, all_logits, spec, nullptr);
}

void Runner::Impl::run(const std::vector<RunnerChunk>& chunks, bool all_logits, const Probe& probe,
                       const std::vector<SampleSpec>* spec, std::vector<float>* logits_out,
                       std::vector<SampledToken>* sampled, SpecIo* sio) {
    Impl& I = *this;
    const ModelConfig& c = I.cfg;
    I.check_chunks(chunks, all_logits, spec, sio);   // everything, before anything changes
    int64_t T = 0, R = 0;
    // Steps whose chunks all have the same n ≤ kGraphChunkMax tokens (decode: n = 1; speculative
    // verification: n = 1 + drafts) replay a CUDA graph: enqueue depends only on the step's shape.
    const int64_t n0 = static_cast<int64_t>(chunks.front().tokens.size());
    bool uniform = true;
    for (size_t i = 0; i < chunks.size(); ++i) {
        const int64_t n = static_cast<int64_t>(chunks[i].tokens.size());
        const bool every = sio ? (*sio->every_row)[i] != 0 : all_logits;
        T += n;
        R += every ? n : 1;
        uniform = uniform && n == n0 && every == (sio ? (*sio->every_row)[0] != 0 : all_logits);
    }
    if (sio) all_logits = (*sio->every_row)[0] != 0;   // for a uniform step: the graph's row layout
    int mode = kLogits;
    if (spec) {
        mode = kSample;
        for (const SampleSpec& sp : *spec) {
            if (sp.n_top >= 0) mode = kSampleLogprobs;
        }
    }
    if (sio) {
        I.need_mtp();
        mode = mode == kSampleLogprobs ? kSpecLogprobs : kSpec;
    }

    const int64_t B = static_cast<int64_t>(chunks.size());
    const int64_t bucket = I.pick_bucket(B, n0, uniform, all_logits, static_cast<bool>(probe));
    const int64_t Tp = bucket ? bucket * n0 : T;
    const int64_t Rp = bucket ? (all_logits ? bucket * n0 : bucket) : R;

    // Step inputs into pinned memory (layout of Workspace::in).
    int32_t* tok = I.pinned_in;
    int32_t* pos = tok + ws.T;
    int32_t* slot = pos + ws.T;
    int32_t* chunk = slot + ws.T;
    int32_t* first = chunk + ws.T;
    int32_t* len = first + ws.C;
    int32_t* rows = len + ws.C;
    int32_t* given = I.pinned_in + (ws.next_given - ws.in);
    int64_t t = 0, r = 0;
    for (size_t i = 0; i < chunks.size(); ++i) {
        const RunnerChunk& ch = chunks[i];
        const int64_t p0 = I.pool->n_past(ch.slot), n = static_cast<int64_t>(ch.tokens.size());
        const bool every = sio ? (*sio->every_row)[i] != 0 : all_logits;
        first[i] = static_cast<int32_t>(t);
        len[i] = static_cast<int32_t>(n);
        for (int64_t j = 0; j < n; ++j, ++t) {
            tok[t] = ch.tokens[static_cast<size_t>(j)];
            pos[t] = static_cast<int32_t>(p0 + j);
            slot[t] = ch.slot;
            chunk[t] = static_cast<int32_t>(i);
            if (every || j == n - 1) rows[r++] = static_cast<int32_t>(t);
            if (sio) given[t] = (*sio->next)[static_cast<size_t>(t)] >= 0 ? (*sio->next)[static_cast<size_t>(t)]
                                                                          : static_cast<int32_t>(-r);   // -1 - (r - 1)
        }
    }
    for (int64_t i = B; bucket && i < bucket; ++i) {   // graph padding: chunks of the padding slot
        first[i] = static_cast<int32_t>(t);
        len[i] = static_cast<int32_t>(n0);
        for (int64_t j = 0; j < n0; ++j, ++t) {
            tok[t] = 0;
            pos[t] = static_cast<int32_t>(j);
            slot[t] = I.pool->pad_slot();
            chunk[t] = static_cast<int32_t>(i);
            if (all_logits || j == n0 - 1) rows[r++] = static_cast<int32_t>(t);
            if (sio) given[t] = 0;   // padding positions: any token
        }
    }
    if (spec)   // sampling parameters and draft checks; padding rows: greedy, no check
        for (int64_t i = 0; i < Rp; ++i) {
            const bool real = i < R;
            I.put_sample_spec(i, real ? (*spec)[static_cast<size_t>(i)] : SampleSpec{0.0f},
                              sio && real ? sio->q_row[static_cast<size_t>(i)] : -1,
                              sio && real ? sio->check[static_cast<size_t>(i)] : -1);
        }

    I.pool->sync_tables(I.stream);
    check(cudaMemcpyAsync(ws.in, I.pinned_in, static_cast<size_t>(ws.in_ints) * 4, cudaMemcpyHostToDevice, I.stream),
          "step inputs");
    if (spec)
        check(cudaMemcpyAsync(ws.samp_in, I.pinned_samp_in, ws.samp_in_bytes, cudaMemcpyHostToDevice, I.stream),
              "sampling inputs");
    const Impl::Shape shape{Tp, bucket ? bucket : B, Rp, I.opt.exchange ? std::max(Tp, I.exchange_rows) : 0,
                            I.opt.head_exchange ? std::max(Rp, I.head_rows) : 0};
    I.chain_ready = false;
    I.last_pos.assign(pos, pos + T);
    I.last_slot.assign(slot, slot + T);
    I.last_logit_row.assign(static_cast<size_t>(T), -1);
    for (int64_t i = 0; i < R; ++i) I.last_logit_row[static_cast<size_t>(rows[i])] = static_cast<int32_t>(i);
    I.last_shape = shape;
    I.last_rows = R;
    I.last_rows_all = all_logits ? Rp : -1;
    I.last_chunk_lens.clear();
    for (const RunnerChunk& ch : chunks) I.last_chunk_lens.push_back(static_cast<int64_t>(ch.tokens.size()));
    if (bucket) {
        // (bucket ≤ 256, n0 ≤ kGraphChunkMax, mode < 8; X ≤ max_batch_tokens < 2²⁰; RX ≤ ws.R)
        const int64_t key =
            (((shape.RX * (int64_t{1} << 20) + shape.X) * 257 + bucket) * (kGraphChunkMax + 1) + n0) * 16 +
            (all_logits ? 8 : 0) + mode;
        I.replay_or_capture(key, [&] { I.enqueue(shape, nullptr, mode); }, "warm-up step");
    } else {
        I.enqueue(shape, probe ? &probe : nullptr, mode);
    }
    if (logits_out)
        check(cudaMemcpyAsync(I.pinned_logits, ws.logits, static_cast<size_t>(R * c.vocab_size) * 4,
                              cudaMemcpyDeviceToHost, I.stream),
              "logits");
    if (sampled) check(cudaMemcpyAsync(I.pinned_samp_out, ws.samp_out, ws.samp_out_bytes, cudaMemcpyDeviceToHost, I.stream), "draws");
    if (sio)
        check(cudaMemcpyAsync(I.pinned_drafts, ws.mtp_ids, static_cast<size_t>(R) * 4, cudaMemcpyDeviceToHost, I.stream),
              "drafts");
    check(cudaStreamSynchronize(I.stream), "step");
    if (sio) {
        sio->drafts.assign(I.pinned_drafts, I.pinned_drafts + R);
        const int32_t* acc = reinterpret_cast<const int32_t*>(static_cast<const char*>(I.pinned_samp_out) +
                                                              (8 + 8 * cuda::kMaxTopLogprobs) * ws.R);
        sio->accepted.assign(acc, acc + R);
    }
    if (logits_out) logits_out->assign(I.pinned_logits, I.pinned_logits + R * c.vocab_size);
    if (sampled) {
        const char* out = static_cast<const char*>(I.pinned_samp_out);
        const int64_t Rw = ws.R, K = cuda::kMaxTopLogprobs;
        sampled->assign(static_cast<size_t>(R), SampledToken{});
        for (int64_t i = 0; i < R; ++i) {
            SampledToken& st = (*sampled)[static_cast<size_t>(i)];
            const SampleSpec& sp = (*spec)[static_cast<size_t>(i)];
            st.id = reinterpret_cast<const int32_t*>(out)[i];
            if (sp.n_top < 0) continue;
            st.logprob = reinterpret_cast<const float*>(out + 4 * Rw)[i];
            const int32_t* ti = reinterpret_cast<const int32_t*>(out + 8 * Rw) + i * K;
            const float* tl = reinterpret_cast<const float*>(out + (8 + 4 * K) * Rw) + i * K;
            for (int j = 0; j < sp.n_top; ++j)
                if (ti[j] >= 0) st.top.push_back({ti[j], tl[j]});
        }
    }
    for (const RunnerChunk& ch : chunks) I.pool->advance(ch.slot, static_cast<int64_t>(ch.tokens.size()));
}

}  // namespace megamoe::gpu
