// backend.cpp — GpuBackend: the Backend interface over a Runner.
#include "gpu/backend.h"

namespace megamoe::gpu {

namespace {

class GpuBackend final : public Backend {
public:
    GpuBackend(const Model& m, const RunnerOptions& opt, std::ostream* log) : r_(m, opt, log) {}
    GpuBackend(const ModelConfig& c, uint64_t seed, const RunnerOptions& opt, std::ostream* log) : r_(c, seed, opt, log) {}

    const ModelConfig& config() const override { return r_.cfg(); }
    std::string name() const override { return "cuda"; }
    int64_t max_seqs() const override { return r_.options().max_seqs; }
    int64_t max_batch_tokens() const override { return r_.options().max_batch_tokens; }
    int64_t max_logit_rows() const override { return r_.options().max_logit_rows; }
    int64_t max_model_len() const override { return r_.options().max_model_len; }
    int32_t open() override { return r_.open(); }
    void close(int32_t slot) override { r_.close(slot); }
    bool reserve(int32_t slot, int64_t n) override { return r_.reserve(slot, n); }
    int64_t n_past(int32_t slot) const override { return r_.n_past(slot); }
    void step(const std::vector<BackendChunk>& chunks, bool all_logits, std::vector<float>& logits,
              const Probe& probe) override {
        std::vector<RunnerChunk> rc(chunks.size());
        for (size_t i = 0; i < chunks.size(); ++i) rc[i] = {chunks[i].slot, chunks[i].tokens};
        r_.step(rc, all_logits, logits, probe);
    }
    bool has_sampler() const override { return true; }
    void set_masked_ids(const std::vector<int32_t>& ids) override { r_.set_masked_ids(ids); }
    void step_sample(const std::vector<BackendChunk>& chunks, const std::vector<SampleSpec>& spec,
                     std::vector<SampledToken>& out) override {
        std::vector<RunnerChunk> rc(chunks.size());
        for (size_t i = 0; i < chunks.size(); ++i) rc[i] = {chunks[i].slot, chunks[i].tokens};
        r_.step_sample(rc, spec, out);
    }
    double cache_usage() const override { return r_.cache_usage(); }
    int64_t capacity_tokens() const override { return r_.capacity_tokens(); }
    int64_t prefix_block() const override { return r_.prefix_block(); }
    int32_t snapshot(int32_t slot) override { return r_.snapshot(slot); }
    void drop_snapshot(int32_t handle) override { r_.drop_snapshot(handle); }
    int32_t open_from(int32_t handle) override { return r_.open_from(handle); }
    SequenceState state(int32_t slot) const override { return r_.download_state(slot); }

private:
    Runner r_;
};

}  // namespace

std::unique_ptr<Backend> make_gpu_backend(const Model& m, const RunnerOptions& opt, std::ostream* log) {
    return std::make_unique<GpuBackend>(m, opt, log);
}

std::unique_ptr<Backend> make_gpu_backend(const ModelConfig& c, uint64_t seed, const RunnerOptions& opt,
                                          std::ostream* log) {
    return std::make_unique<GpuBackend>(c, seed, opt, log);
}

}  // namespace megamoe::gpu
