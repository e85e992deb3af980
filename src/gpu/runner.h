// runner.h — the DeepSeek-V4 forward on one GPU: device weights, the state pool, the workspace,
// step inputs and the decode graphs, owned by one object that allocates nothing after start-up.
//
// Runner::step mirrors ref::forward (ref/model.h) block by block, with the same names and the same
// probe points (ref/trace.h): embed → per layer { mHC pre → attention → mHC post → mHC pre → MoE →
// mHC post } → HC head → norm → head. What differs is storage, not math: activations between ops
// are bf16 where a kernel reads them as GEMM input (the normalized sublayer inputs, q latent,
// attention output, wo_a output, shared-expert hidden), the residual streams stay f32, and the
// per-sequence state (window ring, compressed rows, indexer keys) is stored in bf16.
//
// A step: check the batch, fill pinned step inputs, one host-to-device copy, then either replay the
// graph of the batch's bucket (every chunk the same n ≤ 4 tokens, no probe: decode, or speculative
// verification) or enqueue the same code eagerly, copy the logits back, one wait.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "ref/backend.h"
#include "ref/model.h"

struct CUstream_st;

namespace megamoe::dist {
class ExpertExchange;
class HeadExchange;
}

namespace megamoe::gpu {

struct RunnerOptions {
    int64_t max_seqs = 16;             // sequences at once (state slots)
    int64_t max_batch_tokens = 2048;   // tokens per step (callers split longer prefills)
    int64_t max_logit_rows = 0;        // logit rows per step (0: max_seqs); all-logits steps need one per token
    int64_t max_model_len = 0;         // positions per sequence (0: min(max_position_embeddings, 65536))
    double  memory_fraction = 0.92;    // of the GPU's memory megamoe may hold in all
    int64_t block_tokens = 256;        // positions per state block (a multiple of every compress ratio)
    int64_t max_state_tokens = 0;      // positions in the block pool at most (0: what memory holds)
    int64_t prefix_snapshots = -1;     // prefix-cache snapshot records (-1: max_seqs; 0: no prefix caching)
    bool    graphs = true;             // decode steps through CUDA graphs, one per batch-size bucket
    bool    rollback = false;          // a backup record per slot: save_state / restore_state; with an MTP
                                       // block also each slot's draft logits (speculative sampling)
    bool    side_stream = true;        // independent work (the kv latent, the compressors, the shared
                                       // expert) on a second stream beside the main chain
    bool    moe_small = true;          // few tokens: the routed experts through the two-launch
                                       // small-T path (cuda::moe_small_l1 / l2) where it applies
                                       // (runner.cpp says why there); off: moe_layer always
    int64_t moe_small_max_t = -1;      // ... at up to this many tokens; −1: the measured rule
                                       // (Runner::Impl::small_max_t: 8 for NVFP4 experts in exact
                                       // numerics, else 4; runner.cpp says why). The small path
                                       // itself stops at cuda::kMoeSmallMaxT and where the plan does
                                       // not fit (V4-Pro past 4)
    bool    pad_route = true;          // a decode graph's padding rows routed as token 0 (cuda::route's
                                       // graph padding: no expert weights of their own; runner.cpp
                                       // says what it measured); off: routed from their own logits,
                                       // as before (to compare)
    bool    stream_priority = false;   // the main stream (the step's critical chain) at the device's
                                       // highest stream priority and the side streams at its lowest, and
                                       // the decode graphs instantiated with their nodes' priorities
                                       // (cudaGraphInstantiateFlagUseNodePriority), so that where side
                                       // work and the critical chain both wait for an SM the chain's CTAs
                                       // go first. Same results (only the order CTAs are scheduled in).
                                       // Written without a GPU (2026-12-08), off until measured
                                       // (megamoe-forward-bench --stream-priority 1)
    bool    indexer_side = true;       // ≤ 16 tokens: a CSA layer's indexer queries on a third side
                                       // stream beside wq_b (with side_stream); off: the main stream
                                       // (runner.cpp says what it measured)
    bool    fp8_activations = true;    // official numerics, ≤ 8 tokens: FP8 linears run FP8 × FP8
                                       // (cuda::linear_fp8_act) on their input's codes; off: the BF16
                                       // path on the same rounded values (for comparison)
    bool    lt_fp8 = true;             // official numerics, ≥ cuda::kLtMinM tokens (with fp8_activations):
                                       // FP8 linears through cuBLASLt's block-scaled FP8 GEMM
                                       // (cuda::LtGemm) on their input's codes; off: the BF16 path
    int64_t fp8_act_max_t = -1;        // official numerics: FP8 × FP8 (cuda::linear_fp8_act) at up to
                                       // this many tokens (1..cuda::kRegsMaxM; -1: the runner's rule)
    int64_t lt_min_out = -1;           // ... and where both apply (kLtMinM ≤ T ≤ fp8_act_max_t),
                                       // cuBLASLt for linears of at least this many output rows,
                                       // linear_fp8_act for the others (-1: the runner's rule)
    bool    w4a8 = false;              // official numerics, MXFP4 experts: the W4A8 expert tiles (FP8
                                       // tensor core; cuda::moe_w4a8_fits) wherever the automatic
                                       // choice takes a wgmma tile (cuda::w4a8_tile); off: they measured
                                       // slower (docs/bench-gemm.md, "W4A8 expert tiles")
    bool    hc_stage = true;           // ≥ 32 tokens: the mHC mix stages fn through shared memory
                                       // (cuda::hc_mix stage_fn; same bits); off: loads from L2
    int32_t sample_parts = -1;         // the sampler's pass A over parts of each row (cuda::sample_parts):
                                       // -1 by the step's rows, 0 one CTA per row
    int32_t attn_wide = -1;            // the attention's CTAs (cuda::attention_wide): -1 by the step's
                                       // size, 0 16 heads each (key splits), 1 64 heads each
    int32_t attn_splits = 0;           // the 16-head CTAs' key splits (cuda::attention_splits): 0 by
                                       // size, else 1, 2, 4 or 8
    bool    lt_bf16 = true;            // ≥ cuda::kLtBf16MinM tokens: linears with a bf16 input (exact
                                       // numerics, the official wo_a, BF16-weight projections) through
                                       // cuBLASLt's BF16 GEMM (FP8 weights expanded per call into the
                                       // workspace); off: megamoe's kernels
    // Expert parallelism (issue 13; docs/multi-gpu.md §6): when set, this runner is rank
    // exchange->rank() of the exchange's world. It uploads only exchange->held(l) of every main
    // layer's routed experts (the MTP block stays whole) and runs each main layer's routed experts
    // as router → exchange->dispatch → cuda::moe_layer_routed over the rows that arrived (its
    // local experts plus the skip bucket) → give_back → (the shared expert joined) combine. The
    // exchange must carry max_batch_tokens tokens per call; every rank's runner must run the same
    // steps with the same padded token count (its collectives move equal counts; the multi-GPU
    // backend's job). Not owned: it outlives the runner. A synthetic model (the second constructor)
    // makes only this rank's experts, each as in the whole synthetic model.
    dist::ExpertExchange* exchange = nullptr;
    // With exchange: the head split by vocabulary (dist/exchange.h HeadExchange). The runner then
    // uploads only head rows [vocab_begin, vocab_end) and every step's head is: gather all ranks'
    // final rows, this rank's slice of their logits, and each rank's rows' slices back (the
    // logits of the rank's own rows, whole). Every rank must use the same head row count
    // (set_head_rows). The MTP block's passes are refused (they run on one GPU). Not owned.
    dist::HeadExchange* head_exchange = nullptr;
    // How activations are rounded (ref/ops.h Numerics); unset: the model's own (Model::numerics, as
    // the CPU forward reads it), exact for synthetic weights. official: the bf16 activations, FP8
    // GEMM inputs, FP8-rounded KV latent and the indexer's Hadamard + FP4 q / k of DeepSeek's code.
    std::optional<Numerics> numerics;
};

// Where the device memory goes; printed at start-up.
struct MemoryPlan {
    size_t  weights = 0;               // uploaded weights (packed as in the checkpoint)
    int32_t ep_world = 1;              // expert parallelism: `weights` are one GPU's share of this many
    bool    head_slice = false;        // ... and the head is split by vocabulary
    size_t  checkpoint = 0;            // the same weights' bytes in the checkpoint
    size_t  workspace = 0;             // activations and scratch for max_batch_tokens
    size_t  slots = 0;                 // fixed per-sequence state (rings, open windows) for max_seqs
    size_t  blocks = 0;                // the block pool (compressed rows, indexer keys)
    int64_t block_count = 0, block_tokens = 0;
    int64_t context_tokens = 0;        // positions the pool holds across all sequences
    size_t  snapshots = 0;             // prefix-cache snapshot records (copies of slot records)
    int64_t snapshot_count = 0;
    int64_t max_model_len = 0;
    bool    kv_fp8 = false;            // KV rows stored in FP8 (official numerics; cuda/kv_row.h)
    int64_t kv_row_bytes = 0;          // bytes of one KV row (ring and compressed rows)
    int64_t kv_row_bytes_bf16 = 0;     // ... with bf16 storage
    int64_t fit_tokens = 0;            // positions of compressed state the memory left would hold
    int64_t fit_tokens_bf16 = 0;       // ... with bf16 KV rows (the gain of fp8 storage)
    size_t  draft_logits = 0;          // speculative decoding: each slot's draft logits (q of the rule)
    std::string describe() const;      // a few lines for the log
};

struct RunnerChunk {
    int32_t slot = -1;                 // from Runner::open
    std::vector<int32_t> tokens;       // new tokens at positions n_past(slot) ...
};

class Runner {
public:
    // Uploads the model and plans memory (throws Error when it does not fit). `log` receives the
    // memory plan (nullptr: silent).
    Runner(const Model& model, const RunnerOptions& opt, std::ostream* log = nullptr);
    // A model of config `c` with random weights made on the GPU (benchmarks; gpu/device_model.h).
    Runner(const ModelConfig& c, uint64_t synth_seed, const RunnerOptions& opt, std::ostream* log = nullptr);
    ~Runner();
    Runner(const Runner&) = delete;
    Runner& operator=(const Runner&) = delete;

    const ModelConfig& cfg() const;
    const MemoryPlan& plan() const;
    const RunnerOptions& options() const;

    bool    has_mtp() const;                       // the checkpoint's MTP block is on the device
    bool    is_open(int32_t slot) const;
    int32_t open();                                // a free slot, or -1
    void    close(int32_t slot);
    bool    reserve(int32_t slot, int64_t n_tokens);   // room for positions [0, n_tokens)
    int64_t n_past(int32_t slot) const;
    double  cache_usage() const;                   // state blocks in use / all
    int64_t capacity_tokens() const;               // positions the pool holds
    // Prefix caching (gpu/state_pool.h; Backend's contract in ref/backend.h): copies on the
    // runner's stream, ordered with the steps.
    int64_t prefix_block() const;                  // block_tokens, or 0 without snapshot records
    int32_t snapshot(int32_t slot);                // a handle, or -1 when all records are in use
    void    drop_snapshot(int32_t handle);
    int32_t open_from(int32_t handle);             // a slot at the snapshot's position, or -1

    // Runs the chunks (each of a different open slot, within its reservation; at most
    // max_batch_tokens tokens). logits: [rows, V] f32 — every token when all_logits, else each
    // chunk's last. A probe (eager path only) sees every named intermediate and may overwrite it
    // (teacher forcing: streams, index_topk, expert_ids). Throws Error on bad input, changing nothing.
    void step(const std::vector<RunnerChunk>& chunks, bool all_logits, std::vector<float>& logits,
              const Probe& probe = nullptr);

    // Multi-token prediction, teacher-forced (tests, `logits --mtp`): the step as step() with every
    // token's logits, then the MTP block (ref/model.h mtp_forward) at every position of the chunks,
    // given the token after each position (next: one list per chunk, as long as its tokens).
    // mtp_logits: [Σ tokens, V] f32, row i the MTP block at token i's position predicting the token
    // after next[i]. The MTP block's window advances in lockstep with the main model, so every
    // earlier step of these slots must have gone through step_mtp too. Throws Error without an MTP
    // block or on bad input (nothing changes then).
    void step_mtp(const std::vector<RunnerChunk>& chunks, const std::vector<std::vector<int32_t>>& next,
                  std::vector<float>& logits, std::vector<float>& mtp_logits);
    // The MTP half of step_mtp alone: the MTP block over the positions of the step just run (step,
    // step_sample or step_mtp; nothing else may run in between), given the token after each of them
    // (one list per chunk of that step, as long as its tokens). For speculative decoding, where the
    // token after a step's last position is known only from that step's logits.
    void mtp_step(const std::vector<std::vector<int32_t>>& next, std::vector<float>& mtp_logits);

    // Rollback (needs RunnerOptions::rollback): save_state keeps a copy of the slot's per-sequence
    // record; restore_state puts it back and sets the slot's position to the saved one (n_past must
    // be it), undoing the steps run since. Used by speculative decoding to drop rejected drafts.
    void save_state(int32_t slot);
    void restore_state(int32_t slot, int64_t n_past);

    // A speculative decoding step (the serving engine's; ref/speculative.h states the rule), in one
    // wait and, when every chunk has the same n <= 4 tokens and kind, one graph replay (needs the
    // MTP block and RunnerOptions::rollback). A verify chunk is a sequence's last accepted token
    // followed by its drafts d_1 .. d_k: each of its tokens is a logit row, row j keyed on index
    // spec[i].index + j; row j < k checks d_{j+1} by the standard rule (cuda::spec_accept_rows)
    // against the draft logits draft_chain kept for the slot, and its token is d_{j+1} when
    // accepted, else the residual draw; row k's token is a plain draw (the bonus token). Another
    // chunk (a prompt, or a decode without a draft) has its last token as its row, drawn with
    // spec[i]. Then the MTP block runs over every position of the step, given the token after it:
    // the next prompt token (a chunk's own, then SpecChunk::next), or where that is -1 and for
    // verified tokens the row's token; and draws a draft at every row with that row's parameters
    // (greedy requests: the argmax; sampled ones: a draw keyed on (kStreamDraft, index + 1), the
    // index of the token it guesses). drawn[i][j] / drafts[i][j]: chunk i's row j (verify: after
    // token j; else after its last); accepted[i]: the leading drafts of chunk i accepted (0 for
    // other chunks), so drawn[i][0 .. accepted[i]] are its new tokens and drafts[i][accepted[i]]
    // the next d_1. Then draft_chain (every chunk that goes on drafting, steps >= 0: it also keeps
    // d_1's logits), and the rejected positions dropped (rewind, or restore_state and the kept
    // tokens again: rewind_needs_save). Throws Error on bad input, changing nothing.
    struct SpecChunk {
        int32_t slot = -1;
        std::vector<int32_t> tokens;   // new tokens at positions n_past(slot) ...
        bool    verify = false;        // tokens = [last accepted token, drafts...]
        int32_t next = -1;             // not verify: the token after the last one when known, else -1
    };
    void step_spec(const std::vector<SpecChunk>& chunks, const std::vector<SampleSpec>& spec,
                   std::vector<std::vector<SampledToken>>& drawn, std::vector<std::vector<int32_t>>& drafts,
                   std::vector<int64_t>& accepted);

    // Speculative verification with greedy acceptance, in one graph-replayed step and one wait
    // (needs the MTP block): each chunk is a sequence's last accepted token followed by its
    // drafts. Runs the step with every token's logits, the main model's greedy token after each
    // position (main_ids[i][j]: after chunk i's token j), then the MTP block over the same
    // positions given those tokens as the next ones, and its greedy token (draft_ids[i][j]: the
    // draft for the position after main_ids[i][j]). The drafts j < a accepted (draft j+1 equals
    // main_ids[i][j]) make main_ids[i][0..a] the tokens, and draft_ids[i][a] the next draft; the
    // MTP rows of the kept positions are exact (the rest are overwritten by later steps). Only ids
    // come back. Masked ids (set_masked_ids) are never chosen. Then drop the rejected positions
    // with rewind. Throws Error on bad input, changing nothing. (step_spec, greedy, every chunk
    // verified.)
    void step_verify(const std::vector<RunnerChunk>& chunks, std::vector<std::vector<int32_t>>& main_ids,
                     std::vector<std::vector<int32_t>>& draft_ids);
    // Chained drafting (K > 1 drafts per round; ref/speculative.h step 1: the checkpoint's one MTP
    // block run again, as DeepSeek chains its sequential MTP modules). Right after step_spec or
    // step_verify (nothing may run in between; rewind and restore_state may): for each start, the
    // MTP block at positions p + 1 .. p + steps (p: the position of the step's token `row`, whose
    // MTP draft is d_1), fed at p + k its own pre-head streams from p + k − 1 and the token d_k,
    // giving d_{k+1}: drafts[i] = {d_2 .. d_{steps+1}}, drawn as step_spec draws drafts (argmax for
    // a greedy spec, else a draw keyed on (kStreamDraft, spec.index + k + 1)). With
    // RunnerOptions::rollback it keeps, per slot, the logits d_1 .. d_{steps+1} were drawn from
    // (the next step_spec's q); steps may be 0 for that alone. The chained positions' rows of the
    // MTP block's window ring are scratch (the ring's spare rows: they overwrite no row a later
    // query reads, and the next real pass rewrites them). Throws Error on bad input.
    struct ChainStart {
        int32_t slot = -1;
        int64_t row = 0;            // token index in the last step (chunk i's token j: Σ earlier chunks' tokens + j)
        int32_t draft = -1;         // d_1
        SampleSpec spec;            // how d_2 .. are drawn (index: that of the token drawn at `row`)
    };
    // logits (tests): if set, f32 [steps, starts, V] the MTP block's logits of each chained step.
    void draft_chain(const std::vector<ChainStart>& starts, int64_t steps, std::vector<std::vector<int32_t>>& drafts,
                     std::vector<float>* logits = nullptr);

    // Whether dropping positions [first, first + n) of a step (drafts that may be rejected) needs
    // a saved record: true when they cross from first's compressor window into the next
    // (StateLayout::rewind_exact). Then save_state before the step, and after it restore_state
    // plus running the kept tokens again; otherwise rewind alone is exact. One draft never needs it.
    bool rewind_needs_save(int64_t first, int64_t n) const;
    // Drops the positions [n_past, n_past(slot)) of the last step (the rejected drafts), without
    // copying state; exact when rewind_needs_save was false for those positions (checked: throws
    // Error otherwise, changing nothing).
    void rewind(int32_t slot, int64_t n_past);

    // Expert parallelism (RunnerOptions::exchange): the tokens each of the next steps' exchange
    // calls move, at least the step's own padded count (0: the step's own). Every rank of a world
    // must move the same count, so the multi-GPU backend sets the largest rank's here on every
    // rank; this rank's rows past its tokens are padding slots (ids −1: no expert, zero output).
    // Decode graphs are kept per count. Throws Error without an exchange or past max_batch_tokens.
    void set_exchange_rows(int64_t rows);
    // The tokens a step of these chunks runs (with a decode graph's padding chunks): what the
    // multi-GPU backend takes the largest of over the ranks for set_exchange_rows. 0 for no chunks.
    int64_t padded_tokens(const std::vector<RunnerChunk>& chunks, bool all_logits) const;
    // The head's row count of the next steps' vocabulary exchange (RunnerOptions::head_exchange),
    // at least a step's own padded logit rows (0: the step's own): the largest rank's, set on
    // every rank. padded_rows: a step's logit rows with a decode graph's padding (0 for no chunks).
    void set_head_rows(int64_t rows);
    int64_t padded_rows(const std::vector<RunnerChunk>& chunks, bool all_logits) const;
    // Throws Error where step (spec: step_sample) would refuse these chunks, changing nothing: the
    // multi-GPU backend checks every rank's part before any rank starts (a rank that threw after
    // its peers entered the step's collectives would leave them waiting).
    void check_step(const std::vector<RunnerChunk>& chunks, bool all_logits,
                    const std::vector<SampleSpec>* spec = nullptr) const;
    // Expert parallelism, a rank with no chunk in a step: only the MoE exchange of every main layer
    // (set_exchange_rows rows of padding), so that the other ranks' tokens reach this rank's
    // experts; no state changes. A CUDA graph per row count (RunnerOptions::graphs). One wait.
    // Throws Error without an exchange or with exchange rows 0.
    void step_idle();

    // The same step, drawing one token per chunk on the GPU from its last logits (mask_logits then
    // sample_rows, cuda/sampler.h): only ids and logprobs come back. spec: one per chunk.
    void step_sample(const std::vector<RunnerChunk>& chunks, const std::vector<SampleSpec>& spec,
                     std::vector<SampledToken>& out);
    // Ids never sampled nor listed in logprobs (their logits are set to -inf first).
    void set_masked_ids(const std::vector<int32_t>& ids);

    // The state of a slot in the CPU reference's form (tests; synchronous).
    SequenceState download_state(int32_t slot) const;

    // Graph statistics (tests and logs): decode steps replayed from a graph, graphs captured.
    int64_t graph_replays() const;
    // Host time spent inside cudaGraphLaunch over all replays (µs; the benchmark reports it per step).
    double graph_launch_host_us() const;
    int64_t graphs_captured() const;
    // FP8 × FP8 linear launches enqueued so far (RunnerOptions::fp8_activations; a captured graph's
    // count once, at its capture).
    int64_t fp8_linear_launches() const;
    // Of those, the ones through cuBLASLt (RunnerOptions::lt_fp8, steps of ≥ cuda::kLtMinM tokens).
    int64_t lt_linear_launches() const;
    // Linears with a bf16 input enqueued through cuBLASLt's BF16 GEMM (RunnerOptions::lt_bf16).
    int64_t lt_bf16_launches() const;
    // CSA layers' indexer queries enqueued on side stream 2 (RunnerOptions::indexer_side).
    int64_t indexer_side_launches() const;
    // MoE layers enqueued through the small-T expert path (RunnerOptions::moe_small, moe_small_max_t;
    // a graph's first use counts its eager run and its capture).
    int64_t moe_small_launches() const;

    // For benchmarks: set a slot's position without running its tokens (the state then holds
    // whatever the pool held: timing only), and the stream the runner works on.
    void    set_n_past_for_benchmark(int32_t slot, int64_t n);
    CUstream_st* stream() const;
    // One eager step (no graph) with CUDA events between the forward's stages; returns the GPU time
    // of each stage summed over layers, in ms, in the order the stages first ran (attn.q_kv,
    // attn.compressors, attn.indexer, attn.sparse, attn.out, hc, moe.router, moe.shared, ...).
    std::vector<std::pair<std::string, double>> profile_step(const std::vector<RunnerChunk>& chunks);

    struct Impl;

private:
    std::unique_ptr<Impl> impl_;
};

// Weight bytes a model takes on the GPU (the upload plan; no GPU needed).
size_t device_weight_bytes(const Model& model);

}  // namespace megamoe::gpu
