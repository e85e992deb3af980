// backends.h — choosing and making the backend a command runs on (`--backend cpu|cuda`).
#pragma once

#include <cstdint>
#include <iosfwd>
#include <memory>
#include <string>

#include "ref/backend.h"
#include "ref/generate.h"
#include "ref/speculative.h"
#include "serve/sampler.h"

namespace megamoe {

struct BackendOptions {
    std::string name;                  // "cpu", "cuda", or "" / "auto": cuda when a GPU is usable
    int64_t max_seqs = 1;              // sequences at once
    int64_t max_batch_tokens = 512;    // tokens per step
    int64_t max_logit_rows = 0;        // logit rows per step (0: max_seqs; all-logits steps need max_batch_tokens)
    int64_t max_model_len = 0;         // positions per sequence (0: the model's, capped on the GPU by memory)
    double  gpu_memory_fraction = 0.92;
    bool    graphs = true;             // decode steps through CUDA graphs
    int64_t max_state_tokens = 0;      // positions of sequence state (0: the GPU's memory; the CPU: unlimited)
    bool    speculative = false;       // the GPU runner keeps rollback records (Backend::step_speculative)
    Numerics numerics = Numerics::exact;   // synthetic weights only (a loaded model carries its own, Model::numerics)
    // The GPU's large-M linears through cuBLASLt (gpu::RunnerOptions::lt_fp8 / lt_bf16); false:
    // megamoe's own kernels everywhere (--no-cublaslt: the official numerics' FP8 linears with f32
    // block sums instead of Hopper's ~14-bit FP8 accumulation, cuda/linear_lt.h).
    bool    cublaslt = true;
    // Several GPUs of this host (gpu/multi_backend.h): the routed experts split over devices
    // 0 .. gpus-1 (expert parallelism), attention data-parallel; 1: one GPU. Per GPU: max_seqs
    // sequences and its own state pool.
    int64_t gpus = 1;
    std::string partition = "contiguous";   // --partition: contiguous | balanced
    std::string ep_exchange = "gather";     // --ep-exchange: gather (all-gather + reduce-scatter) | all-to-all
};

// Checks --gpus and its options against a resolved backend name before anything loads: gpus ≥ 1;
// more than one needs the cuda backend, a build with NCCL and that many visible GPUs; speculative
// decoding runs on one GPU only; partition and ep_exchange are known names. Throws Error.
void check_gpus(const BackendOptions& o, const std::string& backend);

// True when this build has the CUDA backend and a GPU is usable.
bool cuda_backend_available();
// --numerics: exact | official | auto (official on the cuda backend, exact on the cpu one: the GPU
// runs what DeepSeek's code computes, the CPU the specification the goldens match). `backend` is
// a resolved name (resolve_backend). Throws Error naming a bad value.
Numerics resolve_numerics(const std::string& name, const std::string& backend);
// "cpu" or "cuda" for a requested name (auto: cuda when available); throws Error for an unknown
// name, or for "cuda" in a build without CUDA or on a machine without a GPU.
std::string resolve_backend(const std::string& name);
// The backend for `m` (which must outlive it). The GPU backend prints its memory plan to `log`.
std::unique_ptr<Backend> make_backend(const Model& m, const BackendOptions& o, std::ostream* log);
// A GPU backend with random weights of config `c` made on the GPU (benchmarks of models with no
// checkpoint on disk); throws Error for the CPU backend.
std::unique_ptr<Backend> make_synthetic_backend(const ModelConfig& c, uint64_t seed, const BackendOptions& o,
                                                std::ostream* log);

// The main model's and the MTP block's logits of one fresh sequence under `s` (ref/generate.h
// sequence_logits_mtp) on the backend o.name names: the CPU reference, or the GPU runner's
// teacher-forced MTP steps (one sequence; o's step and length limits apply).
MtpLogits sequence_logits_mtp_on(const Model& m, const std::vector<int32_t>& tokens, const Schedule& s,
                                 const BackendOptions& o, std::ostream* log);

// Speculative generation of one sequence (the MTP block drafting, K = 1..3) on the backend o.name
// names: the CPU reference (ref/speculative.h) or the GPU runner (gpu/backend.h). sampling: null
// for greedy, else the parameters and seed (SamplingParams::seed, 0 when unset) of a sampled run
// under the standard rule; so.sampling is ignored (it is made from these for the CPU).
SpeculativeResult generate_speculative_on(const Model& m, const std::vector<int32_t>& prompt, int64_t max_new,
                                          const SpeculativeOptions& so, const BackendOptions& o, std::ostream* log,
                                          const SamplingParams* sampling = nullptr);

// serve/sampler.h's definition as ref/speculative.h's SpeculativeSampling: sampling_weights and
// sampling_bits(seed, index, stream).
SpeculativeSampling speculative_sampling(const SamplingParams& sp, uint64_t seed);

}  // namespace megamoe
