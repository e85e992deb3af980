// forward_bench.cu — megamoe-forward-bench: whole DeepSeek-V4 forward steps on one GPU, on a
// synthetic full-width model made in GPU memory (random packed weights in the checkpoint formats;
// V4-Flash at full width is ~160 GB, more than a GPU machine's disk holds).
//
// Rows: decode steps at batch 1, 8, 64, 256 and context 1K and 32K (graph-replayed steps of
// step_sample, greedy: as serving runs them, only the drawn ids come back; the same step with every
// logit row brought to the host is printed under it), and an 8K-token prefill. Each row: µs per
// step and per layer, tokens/s, the bandwidth floor (the bytes a step must read ÷ the copy
// bandwidth measured in the same run) and the ratio to it, then where the time goes (an eager step
// with events between the stages).
//
// Validation comes first, as for every benchmark: the forward itself is validated against the CPU
// reference by tests/gpu/runner_test.cpp on the golden checkpoints; here the bench checks that
// the synthetic model's logits are finite and that a graph-replayed step equals an eager one.
//
//   megamoe-forward-bench [--model flash|pro] [--layers N] [--batches 1,8,64,256]
//                         [--contexts 1024,32768] [--prefill 8192] [--steps 20] [--experts nvfp4|mxfp4]
//                         [--trace N] [--serial] [--spec | --spec-tokens K] [--spec-temperature T]
//                         [--numerics exact|official] [--bf16-linears] [--no-lt] [--no-lt-bf16] [--no-moe-small] [--moe-small-max-t T] [--pad-route 0|1] [--stream-priority 0|1] [--idx-side 0|1] [--w4a8]
//                         [--fp8-act-max T] [--lt-min-out N]
//                         [--attn-wide 0|1] [--attn-splits N] [--sample-parts N] [--hc-stage 0|1]
//                         [--gpus N | --multi] [--ep-exchange gather|all-to-all]
//                         [--ep-combine slot-rows|partial-sums] [--replicated-head]
// --spec (= --spec-tokens 1), --spec-tokens K (1..3): after each decode row, speculative decoding
// with the MTP block drafting K tokens per sequence (gpu::generate_speculative's rounds, batched):
// per round one Runner::step_spec over [x, d_1 .. d_K] of every sequence (greedy, or sampled at
// --spec-temperature T > 0: then the standard rule's kernel runs at every verified row),
// Runner::draft_chain for the next round's d_2 .. d_K (and d_1's kept logits), then a rewind of
// each sequence's rejected drafts, or
// where they cannot be rewound (across an HCA window) the record saved before the step and the kept
// tokens again (one re-run step for all such sequences). Synthetic weights accept nothing
// meaningful, so each draft is accepted with probability α while the ones before it were (0.5 /
// 0.8 / 1, a fixed random sequence) whatever the ids: measured rounds at those rates, and tokens/s
// against the plain decode row.
// --serial: everything on one stream (RunnerOptions::side_stream off), to compare.
// --bf16-linears: official numerics without the FP8 × FP8 linears (RunnerOptions::fp8_activations
//   off: the BF16 path on the same rounded inputs), to compare.
// --no-lt: no cuBLASLt at all (RunnerOptions::lt_fp8 and lt_bf16 off: megamoe's own kernels for
//   every linear), to compare. --no-lt-bf16: only its BF16 GEMM off (the bf16-input linears of
//   steps of ≥ cuda::kLtBf16MinM tokens on megamoe's kernels; the official FP8 ones stay on cuBLASLt).
// --no-moe-small: the routed experts through moe_layer at every batch (RunnerOptions::moe_small
//   off), to compare with the two-launch small-T path (which the runner takes at 1-4 tokens, 1-8
//   for NVFP4 experts in exact numerics).
// --moe-small-max-t T: the small-T path at up to T tokens (RunnerOptions::moe_small_max_t; default
//   the runner's rule), to compare.
// --pad-route 0|1: a decode graph's padding rows routed as token 0 (1, the default) or from their own
//   logits (0) (RunnerOptions::pad_route), to compare at batches between the graph buckets.
// --stream-priority 0|1: the main stream at the highest priority and the side streams at the lowest,
//   graphs with node priorities (RunnerOptions::stream_priority), to compare.
// --fp8-act-max T, --lt-min-out N: official numerics, the FP8 × FP8 kernel (linear_fp8_act) at up to
//   T tokens (1..64), and where cuBLASLt applies too (32..T tokens), cuBLASLt only for linears of
//   ≥ N output rows (RunnerOptions::fp8_act_max_t, lt_min_out; default: the runner's rule), to compare.
// --idx-side 0|1: a CSA layer's indexer queries on a third side stream beside wq_b (1) or on the
//   main stream (0) (RunnerOptions::indexer_side; default: the runner's).
// --attn-wide 0|1: the attention's CTAs of 16 heads (0) or 64 heads (1) at every step
//   (RunnerOptions::attn_wide; default: by the step's size, cuda::attention_wide).
// --attn-splits 1|2|4|8: the 16-head CTAs' key splits at every step (RunnerOptions::attn_splits;
//   default: by the step's size and the layer's key tiles, cuda::attention_splits).
// --sample-parts N: the sampler's pass A over N parts of each row (0: one CTA per row;
//   RunnerOptions::sample_parts; default: by the step's rows, cuda::sample_parts).
// --hc-stage 0|1: the mHC mix at ≥ 32 tokens with fn from L2 (0) or staged through shared memory
//   (1, the default; RunnerOptions::hc_stage: same bits).
// --numerics: how activations are rounded (RunnerOptions::numerics; default exact).
// --w4a8: with --numerics official and --experts mxfp4, the routed experts on the W4A8 tiles wherever
//   the automatic choice is a wgmma tile (RunnerOptions::w4a8; off by default: slower so far).
// --trace N: after each decode row, the GPU timeline of one graph-replayed step from CUPTI's kernel
// records (span, kernel time, idle time, a table by kernel, and its first N kernels); after the
// prefill row, the prefill's table by kernel.
// --gpus N [--ep-exchange gather|all-to-all] [--ep-combine slot-rows|partial-sums] [--replicated-head]:
// the same model over GPUs 0..N-1 through the multi-GPU backend (gpu/multi_backend.h: routed
// experts and the head split, attention data-parallel, the NCCL exchange in the decode graphs;
// partial sums send k× fewer bytes back than slot rows at a regrouped f32 sum); --multi runs that
// backend on one GPU (a world of one). Rows: decode at each batch and context (B sequences spread
// over the GPUs), a prefill of --prefill tokens as N sequences of prefill / N tokens (one per
// GPU); µs per step from
// the host (each step ends in one wait per GPU), and the floor from the bytes the busiest GPU must
// read (its share of the weights, of the experts hit and of the sequences' keys).
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "bench_util.h"
#ifdef MEGAMOE_HAVE_CUPTI
#include "kernel_trace.h"
#endif
#include "core/common.h"
#include "cuda/kv_row.h"
#include "gpu/multi_backend.h"
#include "gpu/runner.h"
#include "io/formats.h"
#include "io/synth.h"
#include "io/weights.h"
#include "ref/speculative.h"

using namespace megamoe;

namespace {

std::vector<int64_t> parse_list(const std::string& s) {
    std::vector<int64_t> v;
    std::stringstream ss(s);
    std::string item;
    while (std::getline(ss, item, ',')) v.push_back(std::stoll(item));
    return v;
}

// Bytes of the weights by role, from the weight walk (packed checkpoint bytes).
struct WeightBytes : WeightVisitor {
    double dense = 0;          // everything a step reads whatever the batch (attention, shared, router, hc, norms)
    double expert = 0;         // one routed expert of one layer (w1 + w3 + w2)
    double head = 0, embed_row = 0;
    int64_t D = 0;
    void tensor(const std::string& name, DType t, const std::vector<int64_t>& shape, Tensor&) override {
        int64_t n = 1;
        for (int64_t d : shape) n *= d;
        const double b = static_cast<double>(n) * static_cast<double>(dtype_size(t));
        if (name == "embed.weight") embed_row = b / static_cast<double>(shape[0]);
        else if (name.find("tid2eid") != std::string::npos) {}   // one row per token: negligible
        else dense += b;
    }
    void linear(const std::string& p, LinearFormat f, int64_t out, int64_t in, Linear&) override {
        const double b = static_cast<double>(format_info(f).packed_bytes(out, in));
        if (p == "head") head = b;
        else if (p.find(".experts.") != std::string::npos) {
            if (p.find(".experts.0.") != std::string::npos && p.rfind("layers.0.", 0) == 0) expert += b;
        } else dense += b;
    }
};

struct Row {
    std::string what;
    double us_step = 0, us_layer = 0, tok_s = 0, floor_us = 0;
};

// The multi-GPU rows (--gpus / --multi): decode at each batch and context, then a prefill.
void run_multi(const ModelConfig& cfg, const WeightBytes& wb, int64_t gpus, const std::string& exchange,
               const std::string& combine, bool split_head,
               const std::vector<int64_t>& batches, const std::vector<int64_t>& contexts, int64_t prefill, int64_t steps,
               Numerics numerics, bool moe_small, double bw) {
    const int64_t max_batch = *std::max_element(batches.begin(), batches.end());
    const int64_t max_ctx = *std::max_element(contexts.begin(), contexts.end());
    gpu::RunnerOptions ro;
    ro.max_seqs = (max_batch + gpus - 1) / gpus;   // per GPU: the sequences spread evenly (dist::dp_pick_rank)
    ro.max_batch_tokens = std::max(prefill, max_batch);
    ro.max_logit_rows = max_batch;
    ro.max_model_len = std::max(max_ctx, prefill) + 8 * steps + 16;
    ro.memory_fraction = 0.95;
    ro.numerics = numerics;
    ro.moe_small = moe_small;
    gpu::MultiGpuOptions mo;
    for (int d = 0; d < gpus; ++d) mo.devices.push_back(d);
    mo.scheme = exchange == "all-to-all" ? dist::Scheme::all_to_all : dist::Scheme::gather_scatter;
    mo.combine = combine == "partial-sums" ? dist::Combine::partial_sums : dist::Combine::slot_rows;
    mo.split_head = split_head;
    const auto t0 = std::chrono::steady_clock::now();
    auto b = gpu::make_multi_gpu_backend(cfg, 1234, ro, mo, &std::cout);
    std::printf("# synthetic weights made on %ld GPUs in %.1f s\n", static_cast<long>(gpus),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    const double L = static_cast<double>(cfg.num_hidden_layers), E = static_cast<double>(cfg.n_routed_experts);
    const double k = static_cast<double>(cfg.num_experts_per_tok), N = static_cast<double>(gpus);
    int64_t n_csa = 0, n_hca = 0, hca_ratio = 128;
    for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
        n_csa += cfg.attn_kind(l) == AttnKind::csa;
        n_hca += cfg.attn_kind(l) == AttnKind::hca;
        if (cfg.attn_kind(l) == AttnKind::hca) hca_ratio = cfg.ratio(l);
    }
    cuda::KvRow kv{static_cast<int32_t>(cfg.head_dim), static_cast<int32_t>(cfg.qk_rope_head_dim),
                   numerics == Numerics::official && cuda::KvRow::fp8_fits(cfg.head_dim, cfg.qk_rope_head_dim)};
    const double kv_row = static_cast<double>(kv.bytes());
    std::vector<float> logits;
    for (int64_t ctx : contexts)
        for (int64_t B : batches) {
            std::vector<int32_t> slots;
            for (int64_t i = 0; i < B; ++i) {
                slots.push_back(b->open());
                if (slots.back() < 0 || !b->reserve(slots.back(), ctx + 8 * steps + 16))
                    fail("no room for ", B, " sequences of ", ctx, " positions over ", gpus, " GPUs");
                gpu::set_n_past_for_benchmark(*b, slots.back(), ctx);
            }
            auto decode = [&](int64_t st) {
                std::vector<BackendChunk> ch;
                for (int64_t i = 0; i < B; ++i)
                    ch.push_back({slots[static_cast<size_t>(i)], {static_cast<int32_t>((7 * i + 13 * st) % 1000 + 2)}});
                return ch;
            };
            b->step(decode(0), false, logits);   // eager, then capture (every GPU)
            b->step(decode(1), false, logits);   // first replay
            for (float v : logits)
                if (!std::isfinite(v)) fail("non-finite logit at batch ", B, ", context ", ctx);
            // Timed: step_sample (greedy), as serving runs it (see the single-GPU rows).
            const std::vector<SampleSpec> greedy(static_cast<size_t>(B), SampleSpec{0.0f});
            std::vector<SampledToken> drawn;
            b->step_sample(decode(2), greedy, drawn);   // eager, then capture
            b->step_sample(decode(3), greedy, drawn);   // first replay
            for (const SampledToken& d : drawn)
                if (d.id < 0 || d.id >= cfg.vocab_size) fail("sampled id ", d.id, " at batch ", B, ", context ", ctx);
            const auto a = std::chrono::steady_clock::now();
            for (int64_t st = 4; st < steps + 4; ++st) b->step_sample(decode(st), greedy, drawn);
            const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - a).count() /
                              static_cast<double>(steps);
            // The busiest GPU's bytes: the replicated weights, its share of the head and of the
            // experts hit (uniform routing: hit / N of them), and the keys of its ⌈B / N⌉ sequences.
            const double hit = E * (1.0 - std::pow(1.0 - k / E, static_cast<double>(B)));
            const double c = static_cast<double>(ctx);
            const double kv_tok =
                L * static_cast<double>(cfg.sliding_window) * kv_row +
                static_cast<double>(n_csa) * (std::min<double>(static_cast<double>(cfg.index_topk), c / 4) * kv_row +
                                              c / 4 * static_cast<double>(cfg.index_head_dim) * 2) +
                static_cast<double>(n_hca) * (c / static_cast<double>(hca_ratio)) * kv_row;
            const double seqs = std::ceil(static_cast<double>(B) / N);
            const double bytes = wb.dense + (split_head ? wb.head / N : wb.head) + L * std::ceil(hit / N) * wb.expert +
                                 seqs * kv_tok;
            const double floor_us = bytes / (bw * 1e9) * 1e6;
            std::printf("%-24s %9.1f us/step %8.1f us/layer %10.0f tok/s  floor %8.1f us per GPU (%.2fx)\n",
                        str("decode B=", B, " ctx=", ctx).c_str(), us, us / L, static_cast<double>(B) * 1e6 / us, floor_us,
                        us / floor_us);
            for (int32_t s : slots) b->close(s);
        }
    if (prefill > 0) {
        std::vector<int32_t> slots;
        std::vector<BackendChunk> ch;
        const int64_t per = std::max<int64_t>(1, prefill / gpus);
        for (int64_t g = 0; g < gpus; ++g) {
            slots.push_back(b->open());
            if (slots.back() < 0 || !b->reserve(slots.back(), per)) fail("no room for a prefill of ", per);
            std::vector<int32_t> toks(static_cast<size_t>(per));
            for (int64_t i = 0; i < per; ++i) toks[static_cast<size_t>(i)] = static_cast<int32_t>((31 * i + g) % 1000 + 2);
            ch.push_back({slots.back(), toks});
        }
        b->step(ch, false, logits);   // first use (kernel attributes, cuBLASLt plans)
        for (int32_t s : slots) b->close(s);
        slots.clear();
        for (BackendChunk& c : ch) {
            c.slot = b->open();
            if (c.slot < 0 || !b->reserve(c.slot, per)) fail("no room for a prefill of ", per);
            slots.push_back(c.slot);
        }
        const auto a = std::chrono::steady_clock::now();
        b->step(ch, false, logits);
        const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - a).count();
        for (float v : logits)
            if (!std::isfinite(v)) fail("non-finite logit in the prefill");
        std::printf("%-24s %9.1f us/step %8.1f us/layer %10.0f tok/s  (%ld sequences of %ld tokens, one per GPU)\n",
                    str("prefill T=", per * gpus).c_str(), us, us / L, static_cast<double>(per * gpus) * 1e6 / us,
                    static_cast<long>(gpus), static_cast<long>(per));
        for (int32_t s : slots) b->close(s);
    }
    std::printf("# all rows ran; logits finite\n");
}

}  // namespace

int main(int argc, char** argv) {
    try {
        std::string preset = "flash", experts = "nvfp4";
        int idx_side = -1;   // -1: RunnerOptions' default
        int attn_wide = -1;  // -1: by the step's size
        int attn_splits = 0;     // 0: by the step's size
        int sample_parts = -1;   // -1: by the step's rows
        int hc_stage = -1;       // -1: RunnerOptions' default
        int64_t moe_small_max_t = -1;   // -1: RunnerOptions' default
        int pad_route = -1;             // -1: RunnerOptions' default
        int stream_priority = -1;       // -1: RunnerOptions' default
        int64_t fp8_act_max = -1, lt_min_out = -1;   // -1: the runner's rule
        auto on_off = [](const std::string& flag, const std::string& v) {
            if (v != "0" && v != "1") fail(flag, " takes 0 or 1, not '", v, "'");
            return v == "1" ? 1 : 0;
        };
        bool serial = false, spec = false, bf16_linears = false, no_lt = false, no_lt_bf16 = false, no_moe_small = false,
             w4a8 = false;
        int64_t spec_k = 1;
        float spec_temperature = 0.0f;
        Numerics numerics = Numerics::exact;
        int64_t layers = -1, prefill = 8192, steps = 20, trace = -1, gpus = 1;
        bool multi = false, replicated_head = false;
        std::string ep_exchange = "gather", ep_combine = "slot-rows";
        std::vector<int64_t> batches{1, 8, 64, 256}, contexts{1024, 32768};
        for (int i = 1; i < argc; ++i) {
            const std::string a = argv[i];
            auto next = [&]() -> std::string {
                if (i + 1 >= argc) fail(a, " needs a value");
                return argv[++i];
            };
            if (a == "--model") preset = next();
            else if (a == "--layers") layers = std::stoll(next());
            else if (a == "--batches") batches = parse_list(next());
            else if (a == "--contexts") contexts = parse_list(next());
            else if (a == "--prefill") prefill = std::stoll(next());
            else if (a == "--steps") steps = std::stoll(next());
            else if (a == "--experts") experts = next();
            else if (a == "--trace") trace = std::stoll(next());
            else if (a == "--serial") serial = true;
            else if (a == "--bf16-linears") bf16_linears = true;
            else if (a == "--no-lt") no_lt = true;
            else if (a == "--no-lt-bf16") no_lt_bf16 = true;
            else if (a == "--no-moe-small") no_moe_small = true;
            else if (a == "--moe-small-max-t") {
                moe_small_max_t = std::stoll(next());
                if (moe_small_max_t < 0) fail("--moe-small-max-t takes a token count >= 0 (0: never), not ", moe_small_max_t);
            }
            else if (a == "--pad-route") pad_route = on_off(a, next());
            else if (a == "--stream-priority") stream_priority = on_off(a, next());
            else if (a == "--idx-side") idx_side = on_off(a, next());
            else if (a == "--attn-wide") attn_wide = on_off(a, next());
            else if (a == "--attn-splits") attn_splits = static_cast<int>(std::stoll(next()));
            else if (a == "--sample-parts") sample_parts = static_cast<int>(std::stoll(next()));
            else if (a == "--hc-stage") hc_stage = on_off(a, next());
            else if (a == "--w4a8") w4a8 = true;
            else if (a == "--fp8-act-max") fp8_act_max = std::stoll(next());
            else if (a == "--lt-min-out") lt_min_out = std::stoll(next());
            else if (a == "--spec") spec = true;
            else if (a == "--spec-tokens") {
                spec = true;
                spec_k = std::stoll(next());
                if (spec_k < 1 || spec_k > kMaxSpeculativeTokens) fail("--spec-tokens must be in 1..", kMaxSpeculativeTokens);
            }
            else if (a == "--spec-temperature") spec_temperature = std::stof(next());
            else if (a == "--numerics") numerics = parse_numerics(next());
            else if (a == "--gpus") gpus = std::stoll(next());
            else if (a == "--multi") multi = true;
            else if (a == "--ep-exchange") ep_exchange = next();
            else if (a == "--ep-combine") ep_combine = next();
            else if (a == "--replicated-head") replicated_head = true;
            else fail("unknown option ", a);
        }
        if (layers < 0) layers = preset == "pro" ? 4 : 20;
        SynthOptions so;
        so.preset = preset;
        so.layers = layers;
        so.experts = experts == "mxfp4" ? ExpertFormat::mxfp4 : ExpertFormat::nvfp4;
        const ModelConfig cfg = synth_config(so);

        cudaDeviceProp prop{};
        CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
        cudaStream_t side = nullptr;
        CUDA_CHECK(cudaStreamCreate(&side));
        const double bw = bench::d2d_bandwidth(side);   // GB/s, bytes read + written
        std::printf("# megamoe-forward-bench: %s, V4-%s at full width, %ld of the release's layers, %s experts\n",
                    prop.name, preset.c_str(), static_cast<long>(layers), experts.c_str());
        std::printf("# copy bandwidth (read + write) measured in this run: %.0f GB/s\n", bw);
        std::printf("# numerics: %s\n", numerics_name(numerics));

        if (gpus < 1) fail("--gpus must be at least 1");
        if (ep_exchange != "gather" && ep_exchange != "all-to-all") fail("--ep-exchange must be gather or all-to-all");
        if (ep_combine != "slot-rows" && ep_combine != "partial-sums") fail("--ep-combine must be slot-rows or partial-sums");
        if (gpus > 1 || multi) {
            if (spec || trace >= 0 || serial || bf16_linears || no_lt || no_lt_bf16 || w4a8 || attn_wide >= 0 ||
                attn_splits > 0 || sample_parts >= 0 || hc_stage >= 0 || fp8_act_max >= 0 || lt_min_out >= 0)
                fail("--gpus / --multi: the multi-GPU rows take --model, --layers, --batches, --contexts, --prefill, "
                     "--steps, --experts, --numerics, --ep-exchange, --ep-combine, --replicated-head and "
                     "--no-moe-small only");
            WeightBytes wb;
            Weights shapes;
            visit_weights(cfg, shapes, wb, false);
            std::printf("# %ld GPUs (multi-GPU backend), exchange %s (%s), head %s\n", static_cast<long>(gpus),
                        ep_exchange.c_str(), ep_exchange == "gather" ? ep_combine.c_str() : "partial sums",
                        replicated_head ? "replicated" : "split by vocabulary");
            run_multi(cfg, wb, gpus, ep_exchange, ep_combine, !replicated_head, batches, contexts, prefill, steps, numerics,
                      !no_moe_small, bw);
            return 0;
        }
        const int64_t max_batch = *std::max_element(batches.begin(), batches.end());
        const int64_t max_ctx = *std::max_element(contexts.begin(), contexts.end());
        gpu::RunnerOptions ro;
        ro.max_seqs = max_batch;
        // --spec verifies 1 + K tokens of every sequence in a step (every token a logit row).
        ro.max_batch_tokens = std::max(prefill, (spec ? 1 + spec_k : 1) * max_batch);
        ro.max_logit_rows = (spec ? 1 + spec_k : 1) * max_batch;
        ro.max_model_len = std::max(max_ctx, prefill) + 8 * steps + 16;
        ro.memory_fraction = 0.95;
        ro.side_stream = !serial;
        ro.fp8_activations = !bf16_linears;
        ro.lt_fp8 = !no_lt;
        ro.lt_bf16 = !no_lt && !no_lt_bf16;
        ro.moe_small = !no_moe_small;
        if (moe_small_max_t >= 0) ro.moe_small_max_t = moe_small_max_t;
        if (pad_route >= 0) ro.pad_route = pad_route == 1;
        if (stream_priority >= 0) ro.stream_priority = stream_priority == 1;
        if (idx_side >= 0) ro.indexer_side = idx_side == 1;
        ro.attn_wide = attn_wide;
        ro.attn_splits = attn_splits;
        ro.sample_parts = sample_parts;
        if (hc_stage >= 0) ro.hc_stage = hc_stage == 1;
        ro.w4a8 = w4a8;
        ro.fp8_act_max_t = fp8_act_max;
        ro.lt_min_out = lt_min_out;
        ro.rollback = spec;
        ro.numerics = numerics;
        const auto t0 = std::chrono::steady_clock::now();
        gpu::Runner run(cfg, 1234, ro, &std::cout);
        std::printf("# synthetic weights made in %.1f s\n",
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());

        WeightBytes wb;
        Weights shapes;
        visit_weights(cfg, shapes, wb, false);
        const double L = static_cast<double>(cfg.num_hidden_layers), E = static_cast<double>(cfg.n_routed_experts);
        const double k = static_cast<double>(cfg.num_experts_per_tok);
        int64_t n_csa = 0, n_hca = 0;
        for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
            n_csa += cfg.attn_kind(l) == AttnKind::csa;
            n_hca += cfg.attn_kind(l) == AttnKind::hca;
        }
        int64_t hca_ratio = 128;
        for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
            if (cfg.attn_kind(l) == AttnKind::hca) hca_ratio = cfg.ratio(l);

        std::vector<Row> rows;
        std::vector<float> logits;
        for (int64_t ctx : contexts) {
            for (int64_t B : batches) {
                std::vector<int32_t> slots;
                for (int64_t i = 0; i < B; ++i) {
                    slots.push_back(run.open());
                    if (slots.back() < 0 || !run.reserve(slots.back(), ctx + 8 * steps + 16))
                        fail("no room for ", B, " sequences of ", ctx, " positions");
                    run.set_n_past_for_benchmark(slots.back(), ctx);
                }
                auto decode = [&](int64_t s) {
                    std::vector<gpu::RunnerChunk> ch;
                    for (int64_t i = 0; i < B; ++i)
                        ch.push_back({slots[static_cast<size_t>(i)], {static_cast<int32_t>((7 * i + 13 * s) % 1000 + 2)}});
                    return ch;
                };
                run.step(decode(0), false, logits);   // eager, then capture
                run.step(decode(1), false, logits);   // first replay
                for (float v : logits)
                    if (!std::isfinite(v)) fail("non-finite logit at batch ", B, ", context ", ctx);
                // The timed step is the one serving runs (serve/engine.cpp): step_sample, greedy here,
                // which draws on the GPU and brings back only the ids. The step that brings every
                // logit row to the host (step(), what `megamoe logits` and the tests use) is timed
                // after it: at B = 256 that is 132 MB of f32 logits per step through PCIe and a host
                // copy, which the rows before 2026-12-06 counted as part of the decode step.
                const std::vector<SampleSpec> greedy(static_cast<size_t>(B), SampleSpec{0.0f});
                std::vector<SampledToken> drawn;
                run.step_sample(decode(2), greedy, drawn);   // eager, then capture (the sampling graph)
                run.step_sample(decode(3), greedy, drawn);   // first replay
                for (const SampledToken& d : drawn)
                    if (d.id < 0 || d.id >= cfg.vocab_size) fail("sampled id ", d.id, " at batch ", B, ", context ", ctx);
                auto time_steps = [&](bool with_logits, int64_t s0) {
                    CUDA_CHECK(cudaDeviceSynchronize());
                    const auto a = std::chrono::steady_clock::now();
                    for (int64_t s = s0; s < s0 + steps; ++s) {
                        if (with_logits) run.step(decode(s), false, logits);
                        else run.step_sample(decode(s), greedy, drawn);
                    }
                    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - a).count() /
                           static_cast<double>(steps);
                };
                const double launch0 = run.graph_launch_host_us();
                const int64_t replays0 = run.graph_replays();
                const double us = time_steps(false, 4);
                const double launch_us = (run.graph_launch_host_us() - launch0) /
                                         static_cast<double>(std::max<int64_t>(1, run.graph_replays() - replays0));
                const double us_logits = time_steps(true, 4 + steps);
                // Floor: dense weights + the experts B tokens hit (expected distinct, uniform routing)
                // + the head + per token its keys (window + top-k or all HCA rows + indexer keys).
                const double hit = E * (1.0 - std::pow(1.0 - k / E, static_cast<double>(B)));
                const double c = static_cast<double>(ctx);
                const double kv_row = static_cast<double>(run.plan().kv_row_bytes);   // bf16, or fp8 (official)
                const double kv_tok =
                    L * static_cast<double>(cfg.sliding_window) * kv_row +
                    static_cast<double>(n_csa) * (std::min<double>(static_cast<double>(cfg.index_topk), c / 4) * kv_row +
                                                  c / 4 * static_cast<double>(cfg.index_head_dim) * 2) +
                    static_cast<double>(n_hca) * (c / static_cast<double>(hca_ratio)) * kv_row;
                const double bytes = wb.dense + L * hit * wb.expert + wb.head + static_cast<double>(B) * kv_tok;
                Row r;
                r.what = str("decode B=", B, " ctx=", ctx);
                r.us_step = us;
                r.us_layer = us / L;
                r.tok_s = static_cast<double>(B) * 1e6 / us;
                r.floor_us = bytes / (bw * 1e9) * 1e6;   // the copy rate (read + write) as the read limit, as megamoe-gemm-bench does
                rows.push_back(r);
                std::printf("%-24s %9.1f us/step %8.1f us/layer %10.0f tok/s  floor %8.1f us (%.2fx)\n", r.what.c_str(),
                            r.us_step, r.us_layer, r.tok_s, r.floor_us, r.us_step / r.floor_us);
                std::printf("    with every logit row to the host (step, not step_sample): %.1f us/step; host time in "
                            "cudaGraphLaunch: %.1f us/step\n", us_logits, launch_us);
                if (trace >= 0) {
#ifdef MEGAMOE_HAVE_CUPTI
                    bench::KernelTrace tr;
                    tr.start();
                    run.step_sample(decode(2 * steps + 4), greedy, drawn);
                    run.step_sample(decode(2 * steps + 5), greedy, drawn);
                    CUDA_CHECK(cudaDeviceSynchronize());
                    bench::KernelTrace::print(stdout, tr.stop(), "embed_streams", static_cast<size_t>(trace));
#else
                    fail("--trace: this megamoe-forward-bench was built without CUPTI");
#endif
                }
                const auto prof = run.profile_step(decode(2 * steps + 6));
                double tot = 0;
                for (const auto& [n, ms] : prof) tot += ms;
                std::printf("    eager step %.1f us:", tot * 1000);
                for (const auto& [n, ms] : prof) std::printf(" %s %.0f%%", n.c_str(), 100 * ms / tot);
                std::printf("\n");
                if (spec) {
                    uint64_t rng = 0x9E3779B97F4A7C15ull;
                    auto uniform = [&rng] {   // splitmix64 → [0, 1)
                        uint64_t z = (rng += 0x9E3779B97F4A7C15ull);
                        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
                        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
                        return static_cast<double>((z ^ (z >> 31)) >> 11) * 0x1.0p-53;
                    };
                    std::vector<std::vector<int32_t>> di, chained;
                    std::vector<std::vector<SampledToken>> drawn;
                    std::vector<int64_t> acc;
                    SampleSpec draw{spec_temperature};
                    draw.seed = 7;
                    const int64_t K = spec_k;
                    for (double alpha : {0.5, 0.8, 1.0}) {
                        int64_t tokens = 0, reruns = 0, rounds = 0;
                        double us_total = 0;
                        for (int64_t r = -2; r < steps; ++r) {   // two rounds of warm-up (graph capture)
                            // Keep every sequence within its reservation: back to the context length.
                            for (int32_t sl : slots)
                                if (run.n_past(sl) > ctx + 6 * steps) run.set_n_past_for_benchmark(sl, ctx);
                            CUDA_CHECK(cudaDeviceSynchronize());
                            const auto t0 = std::chrono::steady_clock::now();
                            std::vector<gpu::RunnerChunk> ch;
                            std::vector<bool> saved;
                            std::vector<int64_t> past;
                            for (int64_t i = 0; i < B; ++i) {
                                const int32_t sl = slots[static_cast<size_t>(i)];
                                past.push_back(run.n_past(sl));
                                saved.push_back(run.rewind_needs_save(past.back() + 1, K));
                                if (saved.back()) run.save_state(sl);
                                std::vector<int32_t> toks;
                                for (int64_t j = 0; j <= K; ++j)
                                    toks.push_back(static_cast<int32_t>(((5 + 2 * j) * i + (11 + 2 * j) * (r + 2)) % 1000 + 2));
                                ch.push_back({sl, toks});
                            }
                            std::vector<gpu::Runner::SpecChunk> sc;
                            for (const gpu::RunnerChunk& c : ch) sc.push_back({c.slot, c.tokens, true, -1});
                            std::vector<SampleSpec> ss(static_cast<size_t>(B), draw);
                            for (int64_t i = 0; i < B; ++i) ss[static_cast<size_t>(i)].index = r * (K + 1) + 1000;
                            run.step_spec(sc, ss, drawn, di, acc);
                            std::vector<int64_t> kept(static_cast<size_t>(B));
                            std::vector<gpu::Runner::ChainStart> starts;
                            int64_t got = 0;
                            for (int64_t i = 0; i < B; ++i) {
                                int64_t a = 0;
                                while (a < K && uniform() < alpha) ++a;
                                kept[static_cast<size_t>(i)] = a;
                                got += a + 1;
                                starts.push_back({slots[static_cast<size_t>(i)], i * (K + 1) + a,
                                                  di[static_cast<size_t>(i)][static_cast<size_t>(a)], draw});
                            }
                            run.draft_chain(starts, K - 1, chained);
                            std::vector<gpu::RunnerChunk> again;
                            for (int64_t i = 0; i < B; ++i) {
                                const int32_t sl = slots[static_cast<size_t>(i)];
                                const int64_t a = kept[static_cast<size_t>(i)];
                                if (a == K) continue;
                                if (saved[static_cast<size_t>(i)]) {
                                    run.restore_state(sl, past[static_cast<size_t>(i)]);
                                    const auto& t = ch[static_cast<size_t>(i)].tokens;
                                    again.push_back({sl, std::vector<int32_t>(t.begin(), t.begin() + a + 1)});
                                } else {
                                    run.rewind(sl, past[static_cast<size_t>(i)] + 1 + a);
                                }
                            }
                            if (!again.empty()) run.step(again, false, logits);
                            CUDA_CHECK(cudaDeviceSynchronize());
                            if (r < 0) continue;
                            us_total += std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
                            tokens += got;
                            reruns += again.empty() ? 0 : 1;
                            ++rounds;
                        }
                        const double per_tok = us_total / static_cast<double>(tokens) * static_cast<double>(B);
                        std::printf("    speculative K=%ld %s, acceptance %.1f: %.1f us/round, %.2f tokens/round per sequence, "
                                    "%ld re-run steps in %ld rounds: %.1f us per token per sequence, %.0f tok/s, "
                                    "%.2fx plain decode\n",
                                    static_cast<long>(K), spec_temperature > 0 ? "sampled" : "greedy", alpha, us_total / static_cast<double>(rounds),
                                    static_cast<double>(tokens) / static_cast<double>(rounds * B),
                                    static_cast<long>(reruns), static_cast<long>(rounds), per_tok,
                                    static_cast<double>(tokens) * 1e6 / us_total, us / per_tok);
                    }
                }
                for (int32_t s : slots) run.close(s);
            }
        }
        if (prefill > 0) {
            const int32_t s = run.open();
            if (s < 0 || !run.reserve(s, prefill)) fail("no room for a prefill of ", prefill);
            std::vector<int32_t> toks(static_cast<size_t>(prefill));
            for (int64_t i = 0; i < prefill; ++i) toks[static_cast<size_t>(i)] = static_cast<int32_t>((31 * i) % 1000 + 2);
            run.step({{s, toks}}, false, logits);   // warm-up
            run.close(s);
            const int32_t s2 = run.open();
            (void)run.reserve(s2, prefill);
            CUDA_CHECK(cudaDeviceSynchronize());
            const auto a = std::chrono::steady_clock::now();
            run.step({{s2, toks}}, false, logits);
            const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - a).count();
            const double bytes = wb.dense + L * E * wb.expert + wb.head;
            Row r;
            r.what = str("prefill T=", prefill);
            r.us_step = us;
            r.us_layer = us / L;
            r.tok_s = static_cast<double>(prefill) * 1e6 / us;
            r.floor_us = bytes / (bw * 1e9) * 1e6;
            std::printf("%-24s %9.1f us/step %8.1f us/layer %10.0f tok/s  (weights-read floor %.1f us; compute-bound)\n",
                        r.what.c_str(), r.us_step, r.us_layer, r.tok_s, r.floor_us);
            run.close(s2);
            const int32_t s3 = run.open();
            (void)run.reserve(s3, prefill);
            const auto prof = run.profile_step({{s3, toks}});
            double tot = 0;
            for (const auto& [n, ms] : prof) tot += ms;
            std::printf("    eager step %.1f us:", tot * 1000);
            for (const auto& [n, ms] : prof) std::printf(" %s %.0f%%", n.c_str(), 100 * ms / tot);
            std::printf("\n");
            run.close(s3);
            if (trace >= 0) {   // the prefill's kernels by name (its timeline is thousands of launches: none listed)
#ifdef MEGAMOE_HAVE_CUPTI
                const int32_t s4 = run.open();
                (void)run.reserve(s4, prefill);
                bench::KernelTrace tr;
                tr.start();
                run.step({{s4, toks}}, false, logits);
                CUDA_CHECK(cudaDeviceSynchronize());
                bench::KernelTrace::print(stdout, tr.stop(), "embed_streams", 0);
                run.close(s4);
#endif
            }
        }
        std::printf("# all rows ran; logits finite\n");
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "megamoe-forward-bench: %s\n", e.what());
        return 1;
    }
}
