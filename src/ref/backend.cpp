// backend.cpp — the CPU reference as a Backend.
#include "ref/backend.h"

namespace megamoe {

namespace {

class CpuBackend final : public Backend {
public:
    CpuBackend(const Model& m, int64_t max_seqs, int64_t max_batch_tokens, int64_t max_model_len)
        : m_(m), max_seqs_(max_seqs), max_batch_tokens_(max_batch_tokens),
          max_len_(max_model_len > 0 ? max_model_len : m.cfg.max_position_embeddings) {
        MEGAMOE_CHECK(max_seqs >= 1 && max_batch_tokens >= 1, "cpu backend: max_seqs ", max_seqs,
                      ", max_batch_tokens ", max_batch_tokens);
        slots_.resize(static_cast<size_t>(max_seqs));
    }

    const ModelConfig& config() const override { return m_.cfg; }
    std::string name() const override { return "cpu"; }
    int64_t max_seqs() const override { return max_seqs_; }
    int64_t max_batch_tokens() const override { return max_batch_tokens_; }
    int64_t max_logit_rows() const override { return max_batch_tokens_; }
    int64_t max_model_len() const override { return max_len_; }

    int32_t open() override {
        for (size_t s = 0; s < slots_.size(); ++s) {
            if (!slots_[s].state) {
                slots_[s].state = std::make_unique<SequenceState>(m_.cfg);
                slots_[s].reserved = 0;
                return static_cast<int32_t>(s);
            }
        }
        return -1;
    }
    void close(int32_t slot) override {
        if (valid(slot)) slots_[static_cast<size_t>(slot)] = Slot{};
    }
    bool reserve(int32_t slot, int64_t n) override {
        Slot& s = get(slot);
        if (n > max_len_) return false;
        s.reserved = std::max(s.reserved, n);
        return true;
    }
    int64_t n_past(int32_t slot) const override { return get(slot).state->n_past; }

    void step(const std::vector<BackendChunk>& chunks, bool all_logits, std::vector<float>& logits,
              const Probe& probe) override {
        std::vector<SequenceChunk> batch;
        int64_t T = 0;
        std::vector<bool> seen(slots_.size(), false);
        for (size_t i = 0; i < chunks.size(); ++i) {
            const BackendChunk& ch = chunks[i];
            Slot& s = get(ch.slot);
            if (seen[static_cast<size_t>(ch.slot)]) fail("cpu backend: slot ", ch.slot, " appears twice in one step");
            seen[static_cast<size_t>(ch.slot)] = true;
            const int64_t end = s.state->n_past + static_cast<int64_t>(ch.tokens.size());
            if (end > s.reserved)
                fail("cpu backend: sequence in slot ", ch.slot, " would reach ", end, " positions, past the ",
                     s.reserved, " reserved for it");
            T += static_cast<int64_t>(ch.tokens.size());
            batch.push_back({s.state.get(), ch.tokens});
        }
        if (T > max_batch_tokens_) fail("cpu backend: ", T, " tokens in one step, more than ", max_batch_tokens_);
        ForwardOptions opt;
        opt.all_logits = all_logits;
        opt.probe = probe;
        forward(m_, batch, opt, logits);
    }
    double cache_usage() const override {
        int64_t used = 0;
        for (const Slot& s : slots_)
            if (s.state) used += s.state->n_past;
        return static_cast<double>(used) / static_cast<double>(max_seqs_ * max_len_);
    }
    SequenceState state(int32_t slot) const override { return *get(slot).state; }

private:
    struct Slot {
        std::unique_ptr<SequenceState> state;
        int64_t reserved = 0;
    };
    bool valid(int32_t slot) const {
        return slot >= 0 && slot < static_cast<int32_t>(slots_.size()) && slots_[static_cast<size_t>(slot)].state;
    }
    Slot& get(int32_t slot) {
        if (!valid(slot)) fail("cpu backend: slot ", slot, " is not open");
        return slots_[static_cast<size_t>(slot)];
    }
    const Slot& get(int32_t slot) const {
        if (!valid(slot)) fail("cpu backend: slot ", slot, " is not open");
        return slots_[static_cast<size_t>(slot)];
    }

    const Model& m_;
    int64_t max_seqs_, max_batch_tokens_, max_len_;
    std::vector<Slot> slots_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const Model& m, int64_t max_seqs, int64_t max_batch_tokens,
                                          int64_t max_model_len) {
    return std::make_unique<CpuBackend>(m, max_seqs, max_batch_tokens, max_model_len);
}

}  // namespace megamoe
