// backend.h — the GPU runner behind the Backend interface (ref/backend.h).
#pragma once

#include <iosfwd>
#include <memory>

#include "gpu/runner.h"
#include "ref/backend.h"
#include "ref/generate.h"
#include "ref/speculative.h"

namespace megamoe::gpu {

// Uploads the model and plans memory (the plan goes to `log`). Throws Error when no GPU is
// present or the model does not fit.
std::unique_ptr<Backend> make_gpu_backend(const Model& m, const RunnerOptions& opt, std::ostream* log = nullptr);
// Random weights of config `c` made on the GPU (gpu/device_model.h): benchmarks only.
std::unique_ptr<Backend> make_gpu_backend(const ModelConfig& c, uint64_t seed, const RunnerOptions& opt,
                                          std::ostream* log = nullptr);

// The main model's logits [T, V] and the MTP block's mtp_logits [T-1, V] of one fresh sequence
// under `s` on the GPU (the contract of ref/generate.h sequence_logits_mtp): teacher-forced
// Runner::step_mtp steps, each at most the runner's max_batch_tokens (longer prefill chunks run
// as several steps). Throws Error without an MTP block or with fewer than 2 tokens.
MtpLogits sequence_logits_mtp(Runner& run, const std::vector<int32_t>& tokens, const Schedule& s);

// Speculative decoding on the GPU with the MTP block drafting K = 1..3 tokens per round (the round
// of ref/speculative.h, its rule and keys): Runner::step_spec verifies [last token, d_1 .. d_K] in
// one step, decides by the standard rule and gives the MTP block's draft after each position;
// Runner::draft_chain chains d_2 .. d_K from the last kept one. Rejected positions are dropped
// with Runner::rewind (no copy) where they stay in the window of the first dropped one (one draft
// always does), else by restore_state and the kept tokens run again
// (SpeculativeStats::rerun_steps). The runner needs RunnerOptions::rollback and an MTP block;
// prompt chunks of `chunk` tokens (0: one, capped at the runner's step size). sampling: the
// parameters and seed (index and n_top are ignored) of a sampled run; null: greedy. Greedy output
// is the runner's own greedy decoding, except where a near tie resolves differently in a
// multi-token step than in a one-token step (bf16 activations); sampled output has the main
// model's distribution, and is generate_speculative's (ref) from the same logits.
SpeculativeResult generate_speculative(Runner& run, const std::vector<int32_t>& prompt, int64_t max_new, int64_t K,
                                       int64_t chunk, bool ignore_eos, const SampleSpec* sampling = nullptr);

}  // namespace megamoe::gpu
