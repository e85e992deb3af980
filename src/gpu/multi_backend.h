// multi_backend.h — DeepSeek-V4 over the GPUs of one host (issue 13; docs/multi-gpu.md §6): the
// routed experts split by expert parallelism, attention data-parallel (each sequence lives on one
// GPU), the rest replicated. One gpu::Runner per GPU, each on a host thread of its own with its
// device current (dist/nccl/comm.h says why threads, not processes), joined layer by layer by the
// NCCL exchange of its MoE blocks (dist/nccl/exchange.h through RunnerOptions::exchange).
//
// A step: the chunks go to their sequences' GPUs (dist::plan_dp_step), every rank's part is
// checked before any rank starts, every rank moves the same rows through the exchange (the
// largest rank's padded token count: Runner::set_exchange_rows; a rank without chunks runs
// Runner::step_idle), and the logit rows or draws come back in the step's order. Decode steps
// replay each rank's CUDA graph. The head is split by vocabulary (each GPU holds 1/N of its rows and
// computes that slice of every rank's rows; dist::HeadExchange), or replicated. Speculative
// decoding, prefix caching and probes run on one GPU only (refused or absent here).
#pragma once

#include <iosfwd>
#include <memory>
#include <vector>

#include "dist/partition.h"
#include "dist/plan.h"
#include "gpu/runner.h"
#include "ref/backend.h"

namespace megamoe::gpu {

struct MultiGpuOptions {
    std::vector<int> devices;                                        // CUDA devices, rank r on devices[r]
    dist::PartitionKind partition = dist::PartitionKind::contiguous;
    dist::Scheme scheme = dist::Scheme::gather_scatter;              // the MoE exchange
    dist::Combine combine = dist::Combine::slot_rows;                // gather_scatter's return (all-to-all: partial sums)
    bool split_head = true;                                          // the head split by vocabulary (else replicated)
};

// True when this build has the NCCL exchange (MEGAMOE_HAVE_NCCL).
bool multi_gpu_available();
// Uploads each rank's share of `m` (in parallel, each GPU reading only its tensors) and prints
// each rank's memory plan to `log`. opt: every rank's runner options (max_seqs and the state pool
// per GPU). Throws Error (naming the device or the field) when the devices are not distinct and
// visible, n_routed_experts is not a multiple of their count, opt.rollback is set (speculative
// decoding is not built across GPUs), or a rank does not fit.
std::unique_ptr<Backend> make_multi_gpu_backend(const Model& m, const RunnerOptions& opt, const MultiGpuOptions& mo,
                                                std::ostream* log = nullptr);
// Random weights of config `c` made on the GPUs (benchmarks; gpu/device_model.h): each rank makes
// only its experts and head rows, each as in the whole synthetic model. The contiguous partition
// only (balanced needs a checkpoint's hash tables).
std::unique_ptr<Backend> make_multi_gpu_backend(const ModelConfig& c, uint64_t seed, const RunnerOptions& opt,
                                                const MultiGpuOptions& mo, std::ostream* log = nullptr);
// Benchmarks: a slot's position set without running its tokens (Runner::set_n_past_for_benchmark
// on the slot's GPU). `b` must come from make_multi_gpu_backend; throws Error otherwise.
void set_n_past_for_benchmark(Backend& b, int32_t slot, int64_t n);

}  // namespace megamoe::gpu
