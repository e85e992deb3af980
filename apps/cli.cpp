// cli.cpp — the `megamoe` command line: info, logits, generate, synth.
//
// Every failure (a malformed checkpoint, config, token file or flag) prints one line naming what
// is wrong and exits with status 1.

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>

#include "dist/load.h"
#include "dist/partition.h"
#ifdef MEGAMOE_HAVE_CUDA
#include "gpu/device_model.h"
#endif
#include "ref/generate.h"
#include "ref/model.h"
#include "ref/speculative.h"
#include "core/parallel.h"
#include "io/config.h"
#include "io/safetensors.h"
#include "serve/backends.h"
#include "server.h"
#include "io/synth.h"

using namespace megamoe;

namespace {

constexpr int kMaxThreads = 1024;   // --threads

std::vector<int32_t> parse_ids(const std::string& text, const std::string& what) {
    std::istringstream in(text);
    std::vector<int32_t> ids;
    std::string tok;
    while (in >> tok) {
        size_t used = 0;
        long long v = 0;
        try {
            v = std::stoll(tok, &used);
        } catch (const std::exception&) {
            used = 0;
        }
        if (used != tok.size() || v < 0 || v > INT32_MAX) fail(what, ": '", tok, "' is not a token id");
        ids.push_back(static_cast<int32_t>(v));
    }
    if (ids.empty()) fail(what, ": no token ids");
    return ids;
}

std::string read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) fail(path, ": cannot open");
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string human_bytes(int64_t b) {
    char buf[32];
    if (b >= (int64_t{1} << 30))
        std::snprintf(buf, sizeof buf, "%.2f GiB", static_cast<double>(b) / (1 << 30));
    else if (b >= (1 << 20))
        std::snprintf(buf, sizeof buf, "%.2f MiB", static_cast<double>(b) / (1 << 20));
    else
        std::snprintf(buf, sizeof buf, "%.1f KiB", static_cast<double>(b) / 1024);
    return buf;
}

// Expert parallelism over `gpus` ranks: what each would read of the checkpoint (dist/load.h).
struct RankLoadTable {
    dist::PartitionKind kind = dist::PartitionKind::contiguous;
    dist::ModelPartition partition;
    std::vector<dist::RankLoad> loads;
};
RankLoadTable rank_loads(const Model& m, int64_t gpus, const std::string& partition) {
    RankLoadTable t;
    if (partition == "balanced") t.kind = dist::PartitionKind::balanced;
    else if (partition != "contiguous") fail("--partition: '", partition, "' is not contiguous or balanced");
    t.partition = dist::partition_model(m.cfg, &m.w, gpus, t.kind);
    t.loads = dist::plan_rank_loads(m.cfg, t.partition, m.w.mtp.has_value());
    return t;
}
// The table: checkpoint bytes each rank reads, and (CUDA builds) the device bytes its upload takes
// (gpu::DeviceModel's counting pass over the rank's WeightShard; no GPU needed).
void print_rank_loads(const Model& m, const RankLoadTable& t) {
    std::printf("\nexpert parallelism over %d GPUs (%s partition; attention, shared expert, embedding and MTP "
                "block replicated, head split by vocabulary)\n",
                t.partition.world, dist::partition_kind_name(t.kind));
    std::printf("%-5s %9s %-20s %12s %12s %12s %12s", "rank", "experts", "head rows", "replicated", "experts", "head",
                "total");
#ifdef MEGAMOE_HAVE_CUDA
    std::printf(" %12s", "on GPU");
#endif
    std::printf("\n");
    const int per_rank = t.partition.layers.empty() ? 0 : t.partition.layers[0].per_rank();
    for (const auto& rl : t.loads) {
        char rows[48];
        std::snprintf(rows, sizeof rows, "[%ld, %ld)", rl.head_begin, rl.head_end);
        std::printf("%-5d %9d %-20s %12s %12s %12s %12s", rl.rank, per_rank, rows, human_bytes(rl.dense_bytes).c_str(),
                    human_bytes(rl.expert_bytes).c_str(), human_bytes(rl.head_bytes).c_str(),
                    human_bytes(rl.bytes()).c_str());
#ifdef MEGAMOE_HAVE_CUDA
        gpu::WeightShard sh;
        for (const dist::ExpertPartition& ep : t.partition.layers) sh.held.push_back(ep.held[static_cast<size_t>(rl.rank)]);
        sh.head_begin = rl.head_begin;
        sh.head_end = rl.head_end;
        std::printf(" %12s", human_bytes(static_cast<int64_t>(gpu::DeviceModel::plan_bytes(m, sh))).c_str());
#else
        (void)m;
#endif
        std::printf("\n");
    }
}

void cmd_info(const std::string& dir, int64_t gpus, const std::string& partition) {
    auto m = Model::load(dir);
    RankLoadTable ranks;
    if (gpus > 1) ranks = rank_loads(*m, gpus, partition);   // bad --gpus / --partition fail before any output
    const ModelConfig& c = m->cfg;
    std::printf("model        %s\n", dir.c_str());
    std::printf("hidden       %ld, %ld layers (+%s MTP block), vocab %ld\n", c.hidden_size, c.num_hidden_layers,
                m->w.mtp ? "1" : "no", c.vocab_size);
    std::printf("attention    %ld heads x %ld (rope %ld), q_lora %ld, %ld output groups x %ld, window %ld\n",
                c.num_attention_heads, c.head_dim, c.qk_rope_head_dim, c.q_lora_rank, c.o_groups, c.o_lora_rank,
                c.sliding_window);
    std::printf("indexer      %ld heads x %ld, top %ld\n", c.index_n_heads, c.index_head_dim, c.index_topk);
    std::printf("moe          %ld routed experts (%s) top-%ld, width %ld, + %ld shared; scale %.3g, swiglu limit %.3g\n",
                c.n_routed_experts, expert_format_name(c.expert_format), c.num_experts_per_tok,
                c.moe_intermediate_size, c.n_shared_experts, c.routed_scaling_factor, c.swiglu_limit);
    std::printf("rope         theta %.0f (SWA layers), %.0f + YaRN x%.0f from %ld (compressed layers)\n", c.rope_theta,
                c.compress_rope_theta, c.yarn.factor, c.yarn.original_max_position_embeddings);
    std::printf("context      %ld tokens\n\nlayer  attention  ratio  router\n", c.max_position_embeddings);
    for (int64_t l = 0; l <= c.num_hidden_layers; ++l) {
        const bool mtp = l == c.num_hidden_layers;
        if (mtp && !m->w.mtp) break;
        std::printf("%-6s %-10s %-6ld %s\n", mtp ? "mtp" : std::to_string(l).c_str(), attn_kind_name(c.attn_kind(l)),
                    c.ratio(l), c.router_kind(l) == RouterKind::hash ? "hash" : "score");
    }
    Weights scratch;
    WeightStats s = weight_stats(c, scratch, m->w.mtp.has_value());
    int64_t params = 0, bytes = 0;
    std::printf("\n%-16s %16s %12s\n", "group", "parameters", "bytes");
    for (const auto& g : s.groups) {
        std::printf("%-16s %16ld %12s\n", g.name.c_str(), g.params, human_bytes(g.bytes).c_str());
        params += g.params;
        bytes += g.bytes;
    }
    std::printf("%-16s %16ld %12s\n\nformat                                    bytes\n", "total", params,
                human_bytes(bytes).c_str());
    for (const auto& [name, b] : s.formats) std::printf("%-40s %12s\n", name.c_str(), human_bytes(b).c_str());
    if (gpus > 1) print_rank_loads(*m, ranks);
}

// The backend of `logits` / `generate`: one sequence of up to `positions` positions. The GPU runs
// steps of at most 512 tokens with a logit row each (a longer prefill chunk runs as several steps,
// which gives the same logits up to bf16 rounding); the CPU runs each chunk in one step.
// --gpus and its options (BackendOptions::gpus, partition, ep_exchange).
struct GpuSplit {
    int64_t gpus = 1;
    std::string partition = "contiguous", exchange = "gather";
    void apply(BackendOptions& bo) const {
        bo.gpus = gpus;
        bo.partition = partition;
        bo.ep_exchange = exchange;
    }
    // Before anything loads: the flags against the resolved backend (serve/backends.h check_gpus).
    void check(const std::string& backend, bool speculative) const {
        BackendOptions bo;
        apply(bo);
        bo.speculative = speculative;
        check_gpus(bo, gpus == 1 ? std::string("cpu") : resolve_backend(backend));
    }
};

std::unique_ptr<Backend> one_sequence_backend(const Model& m, const std::string& name, double mem_fraction,
                                              int64_t positions, bool cublaslt, const GpuSplit& split) {
    BackendOptions bo;
    split.apply(bo);
    bo.cublaslt = cublaslt;
    bo.name = resolve_backend(name);
    bo.max_seqs = 1;
    bo.max_batch_tokens = bo.name == "cuda" ? 512 : int64_t{1} << 40;
    bo.max_logit_rows = bo.name == "cuda" ? 512 : bo.max_batch_tokens;
    bo.max_model_len = std::max<int64_t>(positions, 1);
    bo.gpu_memory_fraction = mem_fraction;
    auto b = make_backend(m, bo, &std::cerr);
    std::fprintf(stderr, "megamoe: backend %s\n", b->name().c_str());
    return b;
}

void cmd_logits(const std::string& dir, const std::string& tokens_file, const std::string& out, const Schedule& s,
                const std::string& backend, double mem_fraction, Numerics numerics, bool mtp, bool cublaslt,
                const GpuSplit& split) {
    if (s.chunk < 0) fail("--chunk must be >= 0 (0: one chunk), got ", s.chunk);
    split.check(backend, false);
    if (mtp && split.gpus > 1)
        fail("--gpus ", split.gpus, ": the MTP block's logits (--mtp) run on one GPU (the MTP block is not split)");
    const std::vector<int32_t> ids = parse_ids(read_file(tokens_file), tokens_file);
    const std::string be = resolve_backend(backend);   // a bad --backend fails before the weights load
    if (mtp && ids.size() < 2) fail(tokens_file, ": --mtp needs at least 2 tokens (row t predicts token t+2)");
    auto m = Model::load(dir);
    m->numerics = numerics;
    if (mtp && !m->w.mtp) fail(dir, ": --mtp: the checkpoint has no multi-token-prediction block (mtp.0.* tensors)");
    const int64_t T = static_cast<int64_t>(ids.size()), V = m->cfg.vocab_size;
    auto t0 = std::chrono::steady_clock::now();
    std::vector<float> logits, mtp_logits;
    if (mtp) {   // the MTP block beside the main model, teacher-forced with the next tokens
        BackendOptions bo;
        bo.name = be;
        bo.max_batch_tokens = 512;
        bo.max_logit_rows = 512;
        bo.max_model_len = T;
        bo.gpu_memory_fraction = mem_fraction;
        bo.cublaslt = cublaslt;
        MtpLogits r = sequence_logits_mtp_on(*m, ids, s, bo, &std::cerr);
        std::fprintf(stderr, "megamoe: backend %s\n", be.c_str());
        logits.swap(r.logits);
        mtp_logits.swap(r.mtp_logits);
    } else {
        auto b = one_sequence_backend(*m, backend, mem_fraction, T, cublaslt, split);
        logits = sequence_logits(*b, ids, s);
    }
    const double sec = seconds_since(t0);
    std::vector<TensorToWrite> tensors{{"logits", DType::f32, {T, V}, logits.data()}};
    if (mtp) tensors.push_back({"mtp_logits", DType::f32, {T - 1, V}, mtp_logits.data()});
    write_safetensors(out, tensors);
    std::fprintf(stderr, "%zu tokens in %.2f s (%.1f tok/s), logits -> %s\n", ids.size(), sec,
                 static_cast<double>(ids.size()) / sec, out.c_str());
}

void cmd_generate(const std::string& dir, const std::string& ids_text, int64_t max_new, int64_t chunk, bool ignore_eos,
                  const std::string& backend, double mem_fraction, Numerics numerics, int64_t spec_tokens,
                  const SamplingParams& sampling, bool cublaslt, const GpuSplit& split) {
    sampling.validate();   // a bad --temperature / --top-p / ... fails before the weights load
    split.check(backend, spec_tokens > 0);
    const std::vector<int32_t> prompt = parse_ids(ids_text, "--ids");
    if (max_new < 0) fail("--max-new must be >= 0, got ", max_new);
    if (spec_tokens < 0 || spec_tokens > kMaxSpeculativeTokens)
        fail("--speculative-tokens must be in 1..", kMaxSpeculativeTokens, " (0: off), got ", spec_tokens);
    if (chunk < 0) fail("--chunk must be >= 0 (0: the whole prompt at once), got ", chunk);
    // The context holds the prompt and every new token but the last (which is never fed back).
    const int64_t P = static_cast<int64_t>(prompt.size()), context = load_model_config(dir).max_position_embeddings;
    if (P > context) fail("--ids: the prompt has ", P, " tokens, more than the model's context of ", context);
    if (max_new > context - P + 1) {
        std::fprintf(stderr, "megamoe: note: --max-new %ld stops at the context limit: %ld new tokens after the %ld-token prompt (max_position_embeddings %ld)\n",
                     max_new, context - P + 1, P, context);
        max_new = context - P + 1;
    }
    (void)resolve_backend(backend);   // a bad --backend fails before the weights load
    auto m = Model::load(dir);
    m->numerics = numerics;
    std::vector<int32_t> out;
    auto t0 = std::chrono::steady_clock::now();
    if (spec_tokens > 0) {   // the MTP block drafting (ref/speculative.h; gpu/backend.h)
        if (!m->w.mtp)
            fail(dir, ": --speculative-tokens needs the multi-token-prediction block (mtp.0.* tensors); the checkpoint has none");
        const std::string be = resolve_backend(backend);
        SpeculativeOptions so;
        so.draft_tokens = spec_tokens, so.chunk = chunk, so.ignore_eos = ignore_eos;
        BackendOptions bo;
        bo.name = be;
        bo.max_batch_tokens = 512;
        bo.max_logit_rows = 512;
        bo.max_model_len = std::min(P + max_new + spec_tokens, context);
        bo.gpu_memory_fraction = mem_fraction;
        bo.cublaslt = cublaslt;
        t0 = std::chrono::steady_clock::now();
        SpeculativeResult r = generate_speculative_on(*m, prompt, max_new, so, bo, &std::cerr, &sampling);
        std::fprintf(stderr, "megamoe: backend %s\n", be.c_str());
        out.swap(r.tokens);
        std::fprintf(stderr, "speculative: %ld drafts, %ld accepted (%.1f%%), %ld verification steps, %.2f tokens per step\n",
                     r.stats.drafted, r.stats.accepted, 100.0 * r.stats.acceptance_rate(), r.stats.rounds,
                     r.stats.tokens_per_round());
    } else {
        auto b = one_sequence_backend(*m, backend, mem_fraction, P + std::max<int64_t>(max_new - 1, 0), cublaslt, split);
        t0 = std::chrono::steady_clock::now();
        if (sampling.greedy()) {
            out = generate_greedy(*b, prompt, max_new, chunk, ignore_eos);
        } else {   // drawn on the host from each step's logits (serve/sampler.h), keyed on (--seed, index)
            Sampler sampler(sampling, 0);
            out = generate_with(*b, prompt, max_new, chunk, ignore_eos,
                                [&](const float* logits, int64_t V, int64_t index) { return sampler.sample(logits, V, index); });
        }
    }
    const double sec = seconds_since(t0);
    for (size_t i = 0; i < out.size(); ++i) std::printf("%s%d", i ? " " : "", out[i]);
    std::printf("\n");
    std::fprintf(stderr, "%zu prompt + %zu new tokens in %.2f s\n", prompt.size(), out.size(), sec);
}

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"megamoe: DeepSeek-V4 inference with 4-bit experts (CUDA on Hopper, or the CPU reference)"};
    app.require_subcommand(1);
    int threads = 0;
    app.add_option("--threads", threads, "CPU threads (default: MEGAMOE_THREADS, else all cores)");

    std::string model, tokens, out, ids, preset = "tiny", experts = "nvfp4";
    Schedule sched;
    int64_t max_new = 16, chunk = 0, layers = -1, vocab = -1, routed = -1, shard_mb = 4096;
    uint64_t seed = 0;
    int64_t spec_tokens = 0;
    bool ignore_eos = false, no_mtp = false, mtp = false;
    std::string numerics = "auto";
    const char* numerics_help = "auto (the default: official on cuda, exact on cpu) | exact (f32 activations) | official (DeepSeek's roundings: bf16 "
                                "activations, FP8 GEMM inputs and KV latent, Hadamard + FP4 indexer q/k)";
    bool no_cublaslt = false;
    const char* cublaslt_help = "cuda: run every linear on megamoe's own kernels (f32 sums). By default steps of >= 32 tokens "
                                "take cuBLASLt's FP8 GEMM for the official FP8 linears (Hopper's ~14-bit FP8 accumulation, "
                                "as DeepSeek's own kernels) and >= 256 tokens its BF16 GEMM for bf16-input ones";

    auto* info = app.add_subcommand("info", "config summary, layer schedule, weight formats and sizes");
    info->add_option("--model", model, "checkpoint directory")->required();
    int64_t info_gpus = 1;
    std::string info_partition = "contiguous";
    info->add_option("--gpus", info_gpus, "also print what each of N GPUs would hold under expert parallelism")
        ->check(CLI::Range(int64_t{1}, int64_t{1024}));
    info->add_option("--partition", info_partition, "expert partition for --gpus: contiguous | balanced");

    auto* lg = app.add_subcommand("logits", "logits of every position of one token sequence");
    lg->add_option("--model", model, "checkpoint directory")->required();
    lg->add_option("--tokens", tokens, "file of whitespace-separated token ids")->required();
    lg->add_option("--out", out, "output .safetensors (tensor 'logits' F32 [T, vocab])")->required();
    auto* decode_from = lg->add_option("--decode-from", sched.decode_from, "prefill N tokens, then decode one at a time");
    lg->add_option("--chunk", sched.chunk, "prefill in chunks of C tokens");
    std::string backend = "auto";
    double mem_fraction = 0.92;
    lg->add_option("--backend", backend, "cpu | cuda | auto (cuda when a GPU is usable)");
    GpuSplit split;
    const char* gpus_help = "GPUs to split the model over (devices 0..N-1): routed experts by expert parallelism over NCCL, "
                            "attention data-parallel (each sequence on one GPU)";
    const char* partition_help = "--gpus: which experts go together, contiguous | balanced (hash layers by their tid2eid load)";
    const char* exchange_help = "--gpus: the MoE exchange, gather (all-gather + reduce-scatter) | all-to-all";
    auto add_split = [&](CLI::App* cmd) {
        cmd->add_option("--gpus", split.gpus, gpus_help)->check(CLI::Range(int64_t{1}, int64_t{1024}));
        cmd->add_option("--partition", split.partition, partition_help);
        cmd->add_option("--ep-exchange", split.exchange, exchange_help);
    };
    add_split(lg);
    lg->add_option("--gpu-memory-fraction", mem_fraction, "share of the GPU's memory megamoe may hold");
    lg->add_option("--numerics", numerics, numerics_help);
    lg->add_flag("--no-cublaslt", no_cublaslt, cublaslt_help);
    lg->add_flag("--mtp", mtp, "also write 'mtp_logits' F32 [T-1, vocab]: row t, the MTP block at t, predicts token t+2");

    auto* gen = app.add_subcommand("generate", "continuation (greedy, or sampled with --temperature); prints the new ids");
    gen->add_option("--model", model, "checkpoint directory")->required();
    gen->add_option("--ids", ids, "prompt token ids, e.g. \"1 2 3\"")->required();
    gen->add_option("--max-new", max_new, "tokens to generate");
    gen->add_option("--chunk", chunk, "prefill the prompt in chunks of C tokens");
    gen->add_flag("--ignore-eos", ignore_eos, "do not stop at the EOS token");
    gen->add_option("--backend", backend, "cpu | cuda | auto (cuda when a GPU is usable)");
    add_split(gen);
    gen->add_option("--gpu-memory-fraction", mem_fraction, "share of the GPU's memory megamoe may hold");
    gen->add_option("--numerics", numerics, numerics_help);
    gen->add_flag("--no-cublaslt", no_cublaslt, cublaslt_help);
    gen->add_option("--speculative-tokens", spec_tokens,
                    "draft K tokens a step with the MTP block, verified by the main model (1..3; 0: off)");
    SamplingParams gen_sampling;
    gen_sampling.temperature = 0.0f;   // greedy unless asked
    uint64_t gen_seed = 0;
    gen->add_option("--temperature", gen_sampling.temperature, "sampling temperature (0: greedy, the default)");
    gen->add_option("--top-k", gen_sampling.top_k, "keep the k most likely tokens (0: off)");
    gen->add_option("--top-p", gen_sampling.top_p, "keep the smallest set with this much probability (1: off)");
    gen->add_option("--min-p", gen_sampling.min_p, "drop tokens below min_p times the top one's probability (0: off)");
    gen->add_option("--seed", gen_seed, "sampling seed: the draws are keyed on (seed, token index)");

    auto* syn = app.add_subcommand("synth", "write a random checkpoint in the release layout");
    syn->add_option("--out", out, "output directory")->required();
    syn->add_option("--preset", preset, "tiny | flash | pro")->check(CLI::IsMember({"tiny", "flash", "pro"}));
    syn->add_option("--layers", layers, "number of layers (the preset's schedule, cut)");
    syn->add_option("--vocab", vocab, "vocabulary size");
    syn->add_option("--experts", experts, "routed-expert format: nvfp4 | mxfp4")->check(CLI::IsMember({"nvfp4", "mxfp4"}));
    syn->add_option("--routed-experts", routed, "number of routed experts (default: the preset's)");
    syn->add_option("--seed", seed, "random seed");
    syn->add_option("--shard-mb", shard_mb, "target shard size in MiB");
    syn->add_flag("--no-mtp", no_mtp, "leave out the mtp.0.* block");

    ServeOptions so;
    auto* srv = app.add_subcommand("serve", "OpenAI-compatible HTTP server");
    srv->add_option("--model", so.model_dir, "checkpoint directory");
    srv->add_option("--synthetic", so.synthetic,
                    "instead of --model: random weights of a preset (tiny|flash|pro) made on the GPU, for benchmarks");
    srv->add_option("--synthetic-layers", so.synthetic_layers, "layers of the --synthetic preset");
    srv->add_option("--tokenizer", so.tokenizer, "tokenizer.json (default: MODEL/tokenizer.json)");
    srv->add_option("--served-model-name", so.served_model_name, "model id in the API (default: directory name)");
    srv->add_option("--host", so.host, "address to listen on");
    srv->add_option("--port", so.port, "port");
    srv->add_option("--max-model-len", so.max_model_len, "context limit, prompt + completion");
    srv->add_option("--max-batch-tokens", so.max_batch_tokens, "tokens per engine step (prefill chunks + decodes)");
    srv->add_option("--max-seqs", so.max_seqs, "requests running at once");
    srv->add_option("--max-body-bytes", so.max_body_bytes, "largest request body accepted (413 above)");
    srv->add_option("--seed", so.seed, "seed for requests that bring none");
    srv->add_option("--header-timeout", so.header_timeout, "seconds a client has to send a request's headers");
    srv->add_option("--body-timeout", so.body_timeout, "seconds a client has to send a request's body");
    srv->add_option("--drain-timeout", so.drain_timeout, "seconds running requests get to finish on SIGTERM/SIGINT");
    srv->add_option("--max-connections", so.max_connections, "connections served at once (more wait)");
    srv->add_option("--max-header-bytes", so.max_header_bytes, "largest request line + headers (the connection is closed)");
    srv->add_option("--max-prompt-tokens", so.max_prompt_tokens, "prompt tokens per request, 0: the context (413 above)");
    srv->add_option("--max-completion-tokens", so.max_completion_tokens,
                    "generated tokens per choice, 0: the context (400 for a larger max_tokens)");
    srv->add_option("--max-requests", so.max_requests, "engine requests (one per choice) running or waiting (429 above)");
    srv->add_option("--max-json-depth", so.max_json_depth, "nesting of arrays and objects in a body, at most 128 (400 above)");
    srv->add_option("--api-key", so.api_keys, "require 'Authorization: Bearer KEY' (repeatable; /health stays open)");
    srv->add_option("--api-key-file", so.api_key_file, "file of API keys, one per line");
    srv->add_flag("--private-metrics", so.private_metrics, "/metrics needs an API key too");
    srv->add_option("--backend", so.backend, "cpu | cuda | auto (cuda when a GPU is usable)");
    srv->add_option("--gpu-memory-fraction", so.gpu_memory_fraction, "share of the GPU's memory megamoe may hold");
    srv->add_option("--numerics", so.numerics, numerics_help);
    srv->add_flag("--no-cublaslt", no_cublaslt, cublaslt_help);
    srv->add_option("--max-state-tokens", so.max_state_tokens,
                    "positions of sequence state in the pool, 0: what memory holds (past it: wait, preempt)");
    srv->add_flag("--no-prefix-caching{false}", so.prefix_caching, "do not reuse the state of earlier prompts");
    add_split(srv);
    srv->add_option("--speculative-tokens", so.speculative_tokens,
                    "draft tokens per step from the checkpoint's MTP block (0: off; 1..3, the cuda backend)");

    CLI11_PARSE(app, argc, argv);
    // serve waits for SIGTERM/SIGINT on a thread of its own: block them before any thread starts.
    if (*srv) block_shutdown_signals();
    try {
        if (threads < 0 || threads > kMaxThreads)
            fail("--threads must be in 1..", kMaxThreads, " (default: MEGAMOE_THREADS, else all cores), got ", threads);
        if (threads > 0) set_num_threads(threads);
        if (decode_from->count() && sched.decode_from < 0)
            fail("--decode-from must be >= 0 (the number of tokens to prefill), got ", sched.decode_from);
        if (*info) cmd_info(model, info_gpus, info_partition);
        if (mem_fraction <= 0 || mem_fraction > 1)
            fail("--gpu-memory-fraction must be in (0, 1], got ", mem_fraction);
        if (*lg) cmd_logits(model, tokens, out, sched, backend, mem_fraction,
                              resolve_numerics(numerics, resolve_backend(backend)), mtp, !no_cublaslt, split);
        if (*gen) {
            gen_sampling.seed = gen_seed;
            cmd_generate(model, ids, max_new, chunk, ignore_eos, backend, mem_fraction,
                         resolve_numerics(numerics, resolve_backend(backend)), spec_tokens, gen_sampling, !no_cublaslt,
                         split);
        }
        if (*srv) {
            so.cublaslt = !no_cublaslt;
            so.gpus = split.gpus;
            so.partition = split.partition;
            so.ep_exchange = split.exchange;
            return serve(so);
        }
        if (*syn) {
            SynthOptions o;
            o.preset = preset, o.layers = layers, o.vocab = vocab, o.routed_experts = routed, o.seed = seed;
            o.experts = experts == "mxfp4" ? ExpertFormat::mxfp4 : ExpertFormat::nvfp4;
            o.mtp = !no_mtp;
            o.shard_bytes = shard_mb << 20;
            auto t0 = std::chrono::steady_clock::now();
            const int64_t bytes = write_synthetic_checkpoint(out, o);
            std::fprintf(stderr, "wrote %s of %s weights to %s in %.1f s\n", human_bytes(bytes).c_str(),
                         preset.c_str(), out.c_str(), seconds_since(t0));
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "megamoe: error: %s\n", e.what());
        return 1;
    }
    return 0;
}
