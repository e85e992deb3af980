// backends.cpp — the CPU reference or the GPU runner behind one interface.
#include "serve/backends.h"

#include <algorithm>

#ifdef MEGAMOE_HAVE_CUDA
#include "cuda/linear.h"
#include "gpu/backend.h"
#include "gpu/multi_backend.h"
#endif

namespace megamoe {

bool cuda_backend_available() {
#ifdef MEGAMOE_HAVE_CUDA
    return cuda::gpu_available();
#else
    return false;
#endif
}

Numerics resolve_numerics(const std::string& name, const std::string& backend) {
    if (name == "auto" || name.empty()) return backend == "cuda" ? Numerics::official : Numerics::exact;
    if (name != "exact" && name != "official") fail("--numerics must be exact, official or auto, got '", name, "'");
    return parse_numerics(name);
}

std::string resolve_backend(const std::string& name) {
    if (name.empty() || name == "auto") return cuda_backend_available() ? "cuda" : "cpu";
    if (name == "cpu") return name;
    if (name == "cuda") {
#ifdef MEGAMOE_HAVE_CUDA
        if (!cuda::gpu_available()) fail("--backend cuda: no usable CUDA GPU on this machine");
        return name;
#else
        fail("--backend cuda: this megamoe was built without CUDA (nvcc was not found at configure time)");
#endif
    }
    fail("--backend must be cpu, cuda or auto, got '", name, "'");
}

#ifdef MEGAMOE_HAVE_CUDA
// --gpus N: devices 0 .. N-1, the partition and the exchange by name (checked by check_gpus).
static gpu::MultiGpuOptions multi_gpu_options(const BackendOptions& o) {
    gpu::MultiGpuOptions mo;
    for (int d = 0; d < o.gpus; ++d) mo.devices.push_back(d);
    mo.partition = o.partition == "balanced" ? dist::PartitionKind::balanced : dist::PartitionKind::contiguous;
    mo.scheme = o.ep_exchange == "all-to-all" ? dist::Scheme::all_to_all : dist::Scheme::gather_scatter;
    return mo;
}

// The runner's options from a backend's (the callers below adjust rows, sequences and rollback).
static gpu::RunnerOptions runner_options(const BackendOptions& o) {
    gpu::RunnerOptions ro;
    ro.max_seqs = o.max_seqs;
    ro.max_batch_tokens = o.max_batch_tokens;
    ro.max_logit_rows = o.max_logit_rows;
    ro.max_model_len = o.max_model_len;
    ro.memory_fraction = o.gpu_memory_fraction;
    ro.graphs = o.graphs;
    ro.lt_fp8 = ro.lt_bf16 = o.cublaslt;
    ro.max_state_tokens = o.max_state_tokens;
    return ro;
}
#endif

void check_gpus(const BackendOptions& o, const std::string& backend) {
    if (o.gpus < 1) fail("--gpus must be at least 1, got ", o.gpus);
    if (o.partition != "contiguous" && o.partition != "balanced")
        fail("--partition must be contiguous or balanced, got '", o.partition, "'");
    if (o.ep_exchange != "gather" && o.ep_exchange != "all-to-all")
        fail("--ep-exchange must be gather or all-to-all, got '", o.ep_exchange, "'");
    if (o.gpus == 1) return;
    if (backend != "cuda")
        fail("--gpus ", o.gpus, ": several GPUs run the cuda backend, and this command resolved to the ", backend,
             " backend", cuda_backend_available() ? "" : " (no usable GPU here)");
    if (o.speculative)
        fail("--gpus ", o.gpus, ": speculative decoding across several GPUs is not built yet (run it with --gpus 1)");
#ifdef MEGAMOE_HAVE_CUDA
    if (!gpu::multi_gpu_available())
        fail("--gpus ", o.gpus, ": this build has no NCCL (CUDA's nccl.h and libnccl were not found at configure time)");
    const int visible = cuda::gpu_count();
    if (o.gpus > visible) fail("--gpus ", o.gpus, ": ", visible, " CUDA device", visible == 1 ? " is" : "s are", " visible");
#endif
}

std::unique_ptr<Backend> make_backend(const Model& m, const BackendOptions& o, std::ostream* log) {
    const std::string name = resolve_backend(o.name);
    check_gpus(o, name);
    if (name == "cpu") {
        const int64_t rows = std::max(o.max_logit_rows, o.max_batch_tokens);
        return make_cpu_backend(m, o.max_seqs, std::max(o.max_batch_tokens, rows), o.max_model_len, o.max_state_tokens);
    }
#ifdef MEGAMOE_HAVE_CUDA
    gpu::RunnerOptions ro = runner_options(o);
    ro.rollback = o.speculative;
    if (o.gpus > 1) {
        // max_seqs sequences in all, shared out over the GPUs (each sequence lives on one).
        ro.max_seqs = (o.max_seqs + o.gpus - 1) / o.gpus;
        return gpu::make_multi_gpu_backend(m, ro, multi_gpu_options(o), log);
    }
    return gpu::make_gpu_backend(m, ro, log);
#else
    (void)log;
    fail("unreachable: no CUDA backend in this build");
#endif
}

MtpLogits sequence_logits_mtp_on(const Model& m, const std::vector<int32_t>& tokens, const Schedule& s,
                                 const BackendOptions& o, std::ostream* log) {
    if (o.gpus != 1) fail("--gpus ", o.gpus, ": the MTP block's logits (--mtp) run on one GPU (the MTP block is not split)");
    if (resolve_backend(o.name) == "cpu") return sequence_logits_mtp(m, tokens, s);
#ifdef MEGAMOE_HAVE_CUDA
    gpu::RunnerOptions ro = runner_options(o);
    ro.max_seqs = 1;
    ro.max_logit_rows = std::max(o.max_logit_rows, o.max_batch_tokens);
    gpu::Runner run(m, ro, log);
    return gpu::sequence_logits_mtp(run, tokens, s);
#else
    (void)log;
    fail("unreachable: no CUDA backend in this build");
#endif
}

SpeculativeSampling speculative_sampling(const SamplingParams& sp, uint64_t seed) {
    sp.validate();
    SpeculativeSampling s;
    s.weights = [sp](const float* logits, int64_t V, std::vector<uint64_t>& W) { W = sampling_weights(sp, logits, V); };
    s.bits = [seed](SpecStream stream, int64_t index) { return sampling_bits(seed, index, static_cast<uint32_t>(stream)); };
    return s;
}

SpeculativeResult generate_speculative_on(const Model& m, const std::vector<int32_t>& prompt, int64_t max_new,
                                          const SpeculativeOptions& so, const BackendOptions& o, std::ostream* log,
                                          const SamplingParams* sampling) {
    const bool sampled = sampling && !sampling->greedy();
    if (sampling) sampling->validate();
    if (o.gpus != 1)
        fail("--gpus ", o.gpus, ": speculative decoding across several GPUs is not built yet (run it with --gpus 1)");
    if (resolve_backend(o.name) == "cpu") {
        SpeculativeOptions cpu = so;
        SpeculativeSampling s;
        if (sampled) s = speculative_sampling(*sampling, sampling->seed.value_or(0));
        cpu.sampling = sampled ? &s : nullptr;
        return generate_speculative(m, prompt, max_new, cpu);
    }
#ifdef MEGAMOE_HAVE_CUDA
    gpu::RunnerOptions ro = runner_options(o);
    ro.max_seqs = 1;
    ro.max_logit_rows = std::max<int64_t>(o.max_logit_rows, 1 + so.draft_tokens);
    ro.rollback = true;
    gpu::Runner run(m, ro, log);
    SampleSpec spec{0.0f};
    if (sampled) {
        spec.temperature = sampling->temperature;
        spec.top_k = sampling->top_k;
        spec.top_p = sampling->top_p;
        spec.min_p = sampling->min_p;
        spec.seed = sampling->seed.value_or(0);
    }
    return gpu::generate_speculative(run, prompt, max_new, so.draft_tokens, so.chunk, so.ignore_eos,
                                     sampled ? &spec : nullptr);
#else
    (void)log;
    fail("unreachable: no CUDA backend in this build");
#endif
}

std::unique_ptr<Backend> make_synthetic_backend(const ModelConfig& c, uint64_t seed, const BackendOptions& o,
                                                std::ostream* log) {
    const std::string name = resolve_backend(o.name);
    if (name != "cuda") fail("synthetic weights are made on the GPU: they need --backend cuda");
    check_gpus(o, name);
#ifdef MEGAMOE_HAVE_CUDA
    gpu::RunnerOptions ro = runner_options(o);
    ro.rollback = o.speculative;
    ro.numerics = o.numerics;
    if (o.gpus > 1) {   // each GPU makes its own share (gpu/multi_backend.h)
        ro.max_seqs = (o.max_seqs + o.gpus - 1) / o.gpus;
        return gpu::make_multi_gpu_backend(c, seed, ro, multi_gpu_options(o), log);
    }
    return gpu::make_gpu_backend(c, seed, ro, log);
#else
    (void)c, (void)seed, (void)log;
    fail("unreachable: no CUDA backend in this build");
#endif
}

}  // namespace megamoe
