// backend.h — the GPU runner behind the Backend interface (ref/backend.h).
#pragma once

#include <iosfwd>
#include <memory>

#include "gpu/runner.h"
#include "ref/backend.h"

namespace megamoe::gpu {

// Uploads the model and plans memory (the plan goes to `log`). Throws Error when no GPU is
// present or the model does not fit.
std::unique_ptr<Backend> make_gpu_backend(const Model& m, const RunnerOptions& opt, std::ostream* log = nullptr);
// Random weights of config `c` made on the GPU (gpu/device_model.h): benchmarks only.
std::unique_ptr<Backend> make_gpu_backend(const ModelConfig& c, uint64_t seed, const RunnerOptions& opt,
                                          std::ostream* log = nullptr);

}  // namespace megamoe::gpu
