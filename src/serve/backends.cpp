// backends.cpp — the CPU reference or the GPU runner behind one interface.
#include "serve/backends.h"

#include <algorithm>

#ifdef MEGAMOE_HAVE_CUDA
#include "cuda/linear.h"
#include "gpu/backend.h"
#endif

namespace megamoe {

bool cuda_backend_available() {
#ifdef MEGAMOE_HAVE_CUDA
    return cuda::gpu_available();
#else
    return false;
#endif
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

std::unique_ptr<Backend> make_backend(const Model& m, const BackendOptions& o, std::ostream* log) {
    const std::string name = resolve_backend(o.name);
    if (name == "cpu") {
        const int64_t rows = std::max(o.max_logit_rows, o.max_batch_tokens);
        return make_cpu_backend(m, o.max_seqs, std::max(o.max_batch_tokens, rows), o.max_model_len, o.max_state_tokens);
    }
#ifdef MEGAMOE_HAVE_CUDA
    gpu::RunnerOptions ro;
    ro.max_seqs = o.max_seqs;
    ro.max_batch_tokens = o.max_batch_tokens;
    ro.max_logit_rows = o.max_logit_rows;
    ro.max_model_len = o.max_model_len;
    ro.memory_fraction = o.gpu_memory_fraction;
    ro.graphs = o.graphs;
    ro.max_state_tokens = o.max_state_tokens;
    return gpu::make_gpu_backend(m, ro, log);
#else
    (void)log;
    fail("unreachable: no CUDA backend in this build");
#endif
}

std::unique_ptr<Backend> make_synthetic_backend(const ModelConfig& c, uint64_t seed, const BackendOptions& o,
                                                std::ostream* log) {
    if (resolve_backend(o.name) != "cuda") fail("synthetic weights are made on the GPU: they need --backend cuda");
#ifdef MEGAMOE_HAVE_CUDA
    gpu::RunnerOptions ro;
    ro.max_seqs = o.max_seqs;
    ro.max_batch_tokens = o.max_batch_tokens;
    ro.max_logit_rows = o.max_logit_rows;
    ro.max_model_len = o.max_model_len;
    ro.memory_fraction = o.gpu_memory_fraction;
    ro.graphs = o.graphs;
    ro.max_state_tokens = o.max_state_tokens;
    return gpu::make_gpu_backend(c, seed, ro, log);
#else
    (void)c, (void)seed, (void)log;
    fail("unreachable: no CUDA backend in this build");
#endif
}

}  // namespace megamoe
