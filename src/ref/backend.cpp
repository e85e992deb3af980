// backend.cpp — the CPU reference as a Backend.
#include "ref/backend.h"

#include <map>

namespace megamoe {

namespace {

class CpuBackend final : public Backend {
public:
    CpuBackend(const Model& m, int64_t max_seqs, int64_t max_batch_tokens, int64_t max_model_len, int64_t state_tokens,
               int64_t block_tokens)
        : m_(m), max_seqs_(max_seqs), max_batch_tokens_(max_batch_tokens),
          max_len_(max_model_len > 0 ? max_model_len : m.cfg.max_position_embeddings),
          block_(block_tokens > 0 ? block_tokens : 256) {
        MEGAMOE_CHECK(max_seqs >= 1 && max_batch_tokens >= 1 && state_tokens >= 0, "cpu backend: max_seqs ", max_seqs,
                      ", max_batch_tokens ", max_batch_tokens, ", state_tokens ", state_tokens);
        for (int64_t r : m.cfg.compress_ratios)
            if (r > 0 && block_ % r != 0)
                fail("cpu backend: state blocks of ", block_, " positions are not a multiple of the compress ratio ", r);
        slots_.resize(static_cast<size_t>(max_seqs));
        snaps_.resize(static_cast<size_t>(max_seqs));   // as many snapshots as slots, as on the GPU
        if (state_tokens > 0) {
            n_blocks_ = state_tokens / block_;
            if (n_blocks_ < 1) fail("cpu backend: a state pool of ", state_tokens, " positions holds no block of ", block_);
        } else {
            n_blocks_ = max_seqs * ((max_len_ + block_ - 1) / block_);
        }
        limited_ = state_tokens > 0;
        free_blocks_ = n_blocks_;
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
                slots_[s] = Slot{};
                slots_[s].state = std::make_unique<SequenceState>(m_.cfg);
                return static_cast<int32_t>(s);
            }
        }
        return -1;
    }
    void close(int32_t slot) override {
        if (!valid(slot)) return;
        release(slots_[static_cast<size_t>(slot)].blocks);
        slots_[static_cast<size_t>(slot)] = Slot{};
    }
    bool reserve(int32_t slot, int64_t n) override {
        Slot& s = get(slot);
        if (n > max_len_) return false;
        const int64_t need = (n + block_ - 1) / block_ - static_cast<int64_t>(s.blocks.size());
        if (need > free_blocks_) return false;
        for (int64_t i = 0; i < need; ++i) s.blocks.push_back(take());
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
        if (limited_) return static_cast<double>(n_blocks_ - free_blocks_) / static_cast<double>(n_blocks_);
        int64_t used = 0;
        for (const Slot& s : slots_)
            if (s.state) used += s.state->n_past;
        return static_cast<double>(used) / static_cast<double>(max_seqs_ * max_len_);
    }
    int64_t capacity_tokens() const override { return n_blocks_ * block_; }
    SequenceState state(int32_t slot) const override { return *get(slot).state; }

    // Prefix caching. The CPU state is one SequenceState per sequence, so a snapshot is a copy of
    // it; its blocks are the slot's, shared (counted once, freed when the last holder lets go), so
    // the pool's arithmetic is the GPU's.
    int64_t prefix_block() const override { return block_; }
    int32_t snapshot(int32_t slot) override {
        const Slot& s = get(slot);
        const int64_t p = s.state->n_past;
        if (p <= 0 || p % block_ != 0)
            fail("cpu backend: a snapshot is taken at a multiple of ", block_, " positions; slot ", slot, " is at ", p);
        for (size_t h = 0; h < snaps_.size(); ++h) {
            if (snaps_[h].state) continue;
            snaps_[h].state = std::make_unique<SequenceState>(*s.state);
            snaps_[h].blocks.assign(s.blocks.begin(), s.blocks.begin() + p / block_);
            for (int64_t b : snaps_[h].blocks) ++refs_[b];
            return static_cast<int32_t>(h);
        }
        return -1;
    }
    void drop_snapshot(int32_t h) override {
        if (h < 0 || h >= static_cast<int32_t>(snaps_.size()) || !snaps_[static_cast<size_t>(h)].state) return;
        release(snaps_[static_cast<size_t>(h)].blocks);
        snaps_[static_cast<size_t>(h)] = Slot{};
    }
    int32_t open_from(int32_t h) override {
        if (h < 0 || h >= static_cast<int32_t>(snaps_.size()) || !snaps_[static_cast<size_t>(h)].state)
            fail("cpu backend: no snapshot ", h);
        const Slot& snap = snaps_[static_cast<size_t>(h)];
        const int32_t slot = open();
        if (slot < 0) return -1;
        Slot& s = slots_[static_cast<size_t>(slot)];
        *s.state = *snap.state;
        s.blocks = snap.blocks;
        for (int64_t b : s.blocks) ++refs_[b];
        s.reserved = s.state->n_past;
        return slot;
    }

private:
    struct Slot {
        std::unique_ptr<SequenceState> state;
        int64_t reserved = 0;
        std::vector<int64_t> blocks;   // block ids (accounting: the CPU state lives in `state`)
    };
    int64_t take() {
        --free_blocks_;
        const int64_t b = next_block_++;
        refs_[b] = 1;
        return b;
    }
    void release(const std::vector<int64_t>& blocks) {
        for (int64_t b : blocks) {
            auto it = refs_.find(b);
            MEGAMOE_CHECK(it != refs_.end() && it->second > 0, "cpu backend: block ", b, " released twice");
            if (--it->second == 0) {
                refs_.erase(it);
                ++free_blocks_;
            }
        }
    }
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
    int64_t max_seqs_, max_batch_tokens_, max_len_, block_;
    int64_t n_blocks_ = 0, free_blocks_ = 0;
    bool limited_ = false;
    int64_t next_block_ = 0;              // ids are never reused: a stale id is caught, not aliased
    std::map<int64_t, int32_t> refs_;     // block id -> holders (slots and snapshots)
    std::vector<Slot> slots_;
    std::vector<Slot> snaps_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const Model& m, int64_t max_seqs, int64_t max_batch_tokens,
                                          int64_t max_model_len, int64_t state_tokens, int64_t block_tokens) {
    return std::make_unique<CpuBackend>(m, max_seqs, max_batch_tokens, max_model_len, state_tokens, block_tokens);
}

}  // namespace megamoe
