// backend.cpp — GpuBackend: the Backend interface over a Runner.
#include "gpu/backend.h"

#include <algorithm>

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
    bool has_speculative() const override { return r_.options().rollback && r_.has_mtp(); }
    void step_speculative(const std::vector<SpecChunk>& chunks, const std::vector<SampleSpec>& spec,
                          std::vector<SpecOut>& out) override {
        if (spec.size() != chunks.size()) fail("gpu backend: ", spec.size(), " sampling specs for ", chunks.size(), " chunks");
        std::vector<Runner::SpecChunk> sc;
        std::vector<bool> saved;
        std::vector<int64_t> past, first_row;   // per chunk: n_past before the step, its first token's index
        int64_t rows = 0;
        int64_t K = 1;
        for (size_t i = 0; i < chunks.size(); ++i) {
            const SpecChunk& ch = chunks[i];
            const int64_t k = static_cast<int64_t>(ch.drafts.size());
            if (ch.n_drafts < 1 || ch.n_drafts > kMaxSpeculativeTokens)
                fail("gpu backend: chunk ", i, " asks for ", ch.n_drafts, " drafts (1 to ", kMaxSpeculativeTokens, ")");
            if (k > kMaxSpeculativeTokens) fail("gpu backend: chunk ", i, " has ", k, " drafts (at most ", kMaxSpeculativeTokens, ")");
            K = std::max<int64_t>(K, ch.n_drafts);
            past.push_back(r_.is_open(ch.slot) ? r_.n_past(ch.slot) : 0);
            first_row.push_back(rows);
            if (k > 0) {
                if (ch.tokens.size() != 1)
                    fail("gpu backend: chunk ", i, " has drafts and ", ch.tokens.size(), " tokens (one: the last accepted)");
                if (!r_.options().rollback) fail("gpu backend: speculative steps need RunnerOptions::rollback");
                std::vector<int32_t> fed{ch.tokens[0]};
                fed.insert(fed.end(), ch.drafts.begin(), ch.drafts.end());
                sc.push_back({ch.slot, fed, true, -1});
                // Drafts that cannot be rewound (StateLayout::rewind_exact: across an HCA window): save first.
                saved.push_back(r_.is_open(ch.slot) && r_.rewind_needs_save(past.back() + 1, k));
                rows += 1 + k;
            } else {
                sc.push_back({ch.slot, ch.tokens, false, ch.next});
                saved.push_back(false);
                rows += static_cast<int64_t>(ch.tokens.size());
            }
        }
        for (size_t i = 0; i < chunks.size(); ++i)
            if (saved[i]) r_.save_state(chunks[i].slot);
        std::vector<std::vector<SampledToken>> drawn;
        std::vector<std::vector<int32_t>> drafts;
        std::vector<int64_t> kept;                   // accepted drafts per verified chunk (the standard rule)
        r_.step_spec(sc, spec, drawn, drafts, kept);
        out.assign(chunks.size(), SpecOut{});
        std::vector<Runner::ChainStart> starts;
        std::vector<size_t> start_of;
        int64_t room = K - 1;                        // chained drafts: as many as every chunk has room for
        const int64_t limit = r_.options().max_model_len;
        for (size_t i = 0; i < chunks.size(); ++i) {
            const SpecChunk& ch = chunks[i];
            const int64_t k = static_cast<int64_t>(ch.drafts.size());
            const int64_t a = kept[i];
            const size_t n_out = k > 0 ? static_cast<size_t>(a + 1) : 1;
            for (size_t j = 0; j < n_out; ++j) out[i].tokens.push_back(std::move(drawn[i][j]));
            out[i].drafts = {drafts[i][n_out - 1]};
            // Chain from the token whose MTP row gave that draft (not for a prompt chunk followed by
            // more prompt); draft_chain also keeps d_1's logits for the next step's rule.
            if (k > 0 || ch.next < 0) {
                const int64_t row = k > 0 ? first_row[i] + a : first_row[i] + static_cast<int64_t>(ch.tokens.size()) - 1;
                const int64_t pos = past[i] + (row - first_row[i]);
                room = std::min(room, limit - 1 - pos);
                SampleSpec sp = spec[i];
                sp.index += k > 0 ? a : 0;
                starts.push_back({ch.slot, row, out[i].drafts[0], sp});
                start_of.push_back(i);
            }
        }
        if (!starts.empty()) {
            std::vector<std::vector<int32_t>> chained;
            r_.draft_chain(starts, std::max<int64_t>(room, 0), chained);
            for (size_t s = 0; s < starts.size(); ++s) {
                const size_t want = static_cast<size_t>(chunks[start_of[s]].n_drafts - 1);
                std::vector<int32_t>& d = out[start_of[s]].drafts;
                d.insert(d.end(), chained[s].begin(), chained[s].begin() + static_cast<std::ptrdiff_t>(std::min(want, chained[s].size())));
            }
        }
        // Drop the rejected positions: a rewind, or the saved record back and the kept tokens again.
        std::vector<RunnerChunk> again;
        for (size_t i = 0; i < chunks.size(); ++i) {
            const SpecChunk& ch = chunks[i];
            const int64_t k = static_cast<int64_t>(ch.drafts.size());
            if (k == 0 || kept[i] == k) continue;
            if (saved[i]) {
                r_.restore_state(ch.slot, past[i]);
                again.push_back({ch.slot, std::vector<int32_t>(sc[i].tokens.begin(), sc[i].tokens.begin() + kept[i] + 1)});
            } else {
                r_.rewind(ch.slot, past[i] + 1 + kept[i]);
            }
        }
        if (!again.empty()) {
            std::vector<float> unused;
            r_.step(again, false, unused);
        }
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

MtpLogits sequence_logits_mtp(Runner& run, const std::vector<int32_t>& tokens, const Schedule& s) {
    const int64_t T = static_cast<int64_t>(tokens.size()), V = run.cfg().vocab_size;
    if (T < 2) fail("mtp logits: ", T, " tokens; the MTP block needs at least 2 (row t predicts token t+2)");
    if (s.chunk < 0) fail("chunk size must be >= 0, got ", s.chunk);
    if (s.decode_from < -1 || s.decode_from > T) fail("decode-from ", s.decode_from, " is outside [0, ", T, "]");
    const int64_t prefill_end = s.decode_from < 0 ? T : s.decode_from;
    const int64_t step_max = std::max<int64_t>(1, std::min(run.options().max_batch_tokens, run.options().max_logit_rows));
    const int64_t chunk = std::min(s.chunk > 0 ? s.chunk : std::max<int64_t>(prefill_end, 1), step_max);
    const int32_t slot = run.open();
    if (slot < 0) fail("mtp logits: no free sequence slot");
    MtpLogits out;
    try {
        if (!run.reserve(slot, T)) fail("mtp logits: no room for ", T, " positions");
        out.logits.reserve(static_cast<size_t>(T * V));
        out.mtp_logits.reserve(static_cast<size_t>((T - 1) * V));
        std::vector<float> logits, mtp;
        for (int64_t t = 0; t < T;) {
            const int64_t n = t < prefill_end ? std::min(chunk, prefill_end - t) : 1;
            // The token after each position; the sequence's last has none (its row is dropped).
            std::vector<int32_t> next;
            for (int64_t i = t + 1; i <= t + n; ++i) next.push_back(i < T ? tokens[static_cast<size_t>(i)] : 0);
            run.step_mtp({{slot, std::vector<int32_t>(tokens.begin() + t, tokens.begin() + t + n)}}, {next}, logits, mtp);
            out.logits.insert(out.logits.end(), logits.begin(), logits.end());
            const int64_t known = std::min(t + n, T - 1) - t;
            out.mtp_logits.insert(out.mtp_logits.end(), mtp.begin(), mtp.begin() + known * V);
            t += n;
        }
    } catch (...) {
        run.close(slot);
        throw;
    }
    run.close(slot);
    return out;
}


SpeculativeResult generate_speculative(Runner& run, const std::vector<int32_t>& prompt, int64_t max_new, int64_t K,
                                       int64_t chunk, bool ignore_eos, const SampleSpec* sampling) {
    const ModelConfig& c = run.cfg();
    const int64_t P = static_cast<int64_t>(prompt.size());
    if (K < 1 || K > kMaxSpeculativeTokens)
        fail("--speculative-tokens ", K, ": the GPU drafts 1 to ", kMaxSpeculativeTokens, " tokens per round");
    if (!run.options().rollback) fail("generate_speculative: the runner was made without RunnerOptions::rollback");
    if (prompt.empty()) fail("generate: the prompt is empty");
    if (max_new < 0) fail("generate: max_new must be >= 0, got ", max_new);
    if (chunk < 0) fail("--chunk must be >= 0, got ", chunk);
    const int64_t limit = run.options().max_model_len;
    if (P > limit) fail("generate: the prompt has ", P, " tokens, more than the context limit ", limit);
    SpeculativeResult res;
    if (max_new == 0) return res;
    auto is_eos = [&](int32_t id) { return !ignore_eos && id == c.eos_token_id; };
    const int64_t step_max = std::max<int64_t>(1, std::min(run.options().max_batch_tokens, run.options().max_logit_rows));
    if (K + 1 > step_max) fail("--speculative-tokens ", K, ": a step must hold ", K + 1, " tokens (max ", step_max, ")");
    const int64_t step = std::min(chunk > 0 ? chunk : P, step_max);
    // The draws' parameters and key (greedy: temperature 0), at output index `index`.
    SampleSpec base = sampling ? *sampling : SampleSpec{0.0f};
    base.n_top = -1;
    auto spec_at = [&](int64_t index) {
        SampleSpec sp = base;
        sp.index = index;
        return sp;
    };
    const int32_t slot = run.open();
    if (slot < 0) fail("generate: no free sequence slot");
    std::vector<int32_t>& out = res.tokens;
    SpeculativeStats& st = res.stats;
    try {
        if (!run.reserve(slot, std::min(P + max_new + K, limit))) fail("generate: no room for the sequence's state");
        std::vector<float> logits, mtp;
        std::vector<std::vector<SampledToken>> drawn;
        std::vector<std::vector<int32_t>> draft_ids, chained;
        std::vector<int64_t> accepted;
        // d_2 .. d_{chain+1} after d_1, drawn at the MTP row of the last step's token `row` (whose
        // own token has output index `index`); draft_chain also keeps their logits for the rule.
        std::vector<int32_t> drafts;   // this round's d_1 .. d_K
        auto chain_from = [&](int64_t row, int64_t index, int64_t chain) {
            run.draft_chain({{slot, row, drafts[0], spec_at(index)}}, chain, chained);
            drafts.insert(drafts.end(), chained[0].begin(), chained[0].end());
        };
        // Prefill. The MTP block follows every prompt position; the last one's next token is the
        // main model's first output, so the last chunk runs as a plain step and then its MTP half.
        for (int64_t t = 0; t < P; t += step) {
            const int64_t n = std::min(step, P - t);
            const std::vector<int32_t> toks(prompt.begin() + t, prompt.begin() + t + n);
            if (t + n < P) {
                run.step_mtp({{slot, toks}}, {std::vector<int32_t>(prompt.begin() + t + 1, prompt.begin() + t + n + 1)},
                             logits, mtp);
                continue;
            }
            // The last chunk: the first token, the MTP block over its positions (fed the prompt's
            // next tokens and that token) and d_1 at the last one, then d_2 .. d_K chained.
            run.step_spec({{slot, toks, false, -1}}, {spec_at(0)}, drawn, draft_ids, accepted);
            out.push_back(drawn[0][0].id);
            drafts = {draft_ids[0][0]};
            chain_from(n - 1, 0, std::min<int64_t>(K - 1, std::max<int64_t>(limit - (P + 1) - 1, 0)));
        }
        // Rounds (ref/speculative.h): verify [x, d_1 .. d_k] in one step_spec, which decides by the
        // standard rule and gives the MTP block's draft after each position; keep the accepted
        // drafts and the token after them; chain the next round's drafts from the MTP row of the
        // last kept position (draft_chain); drop the rejected positions with a rewind, or, where
        // they cross an HCA window boundary (rewind_needs_save), restore the record saved before
        // the step and run the kept tokens again (ref/speculative.h does the latter every time).
        while (static_cast<int64_t>(out.size()) < max_new && !is_eos(out.back())) {
            const int64_t L = P + static_cast<int64_t>(out.size());   // the main model has run L - 1 positions
            const int64_t index = static_cast<int64_t>(out.size());   // output index of the token after x
            const int32_t x = out.back();
            if (L > limit) break;                                     // feeding x would pass the context
            const int64_t k = std::min<int64_t>(static_cast<int64_t>(drafts.size()), limit - L);   // drafts at L .. L + k - 1
            if (k == 0) {                                             // room for x only: a plain step
                std::vector<SampledToken> one;
                run.step_sample({{slot, {x}}}, {spec_at(index)}, one);
                out.push_back(one[0].id);
                break;
            }
            const bool saved = run.rewind_needs_save(L, k);          // the drafts' positions
            if (saved) run.save_state(slot);
            std::vector<int32_t> fed{x};
            fed.insert(fed.end(), drafts.begin(), drafts.begin() + k);
            run.step_spec({{slot, fed, true, -1}}, {spec_at(index)}, drawn, draft_ids, accepted);
            ++st.rounds;
            st.drafted += k;
            int64_t a = 0;   // accepted drafts (ref/speculative.h's rule: an accepted eos ends the round)
            std::vector<int32_t> fresh;
            while (a < accepted[0]) {
                fresh.push_back(drafts[static_cast<size_t>(a++)]);
                if (is_eos(fresh.back())) break;
            }
            st.accepted += a;
            if (fresh.empty() || !is_eos(fresh.back())) fresh.push_back(drawn[0][static_cast<size_t>(a)].id);
            // The next round's drafts: d_1 from the MTP row of the last kept position (token a of
            // the step), then chained.
            drafts = {draft_ids[0][static_cast<size_t>(a)]};
            const int64_t room = limit - (L + a + 1);                 // positions after the next x
            chain_from(a, index + a, std::min<int64_t>(K - 1, std::max<int64_t>(room - 1, 0)));
            if (a < k) {
                if (saved) {
                    ++st.rerun_steps;
                    run.restore_state(slot, L - 1);
                    run.step({{slot, std::vector<int32_t>(fed.begin(), fed.begin() + a + 1)}}, false, logits);
                } else {
                    run.rewind(slot, L + a);
                }
            }
            st.round_tokens += static_cast<int64_t>(fresh.size());
            for (int32_t id : fresh) {
                out.push_back(id);
                if (is_eos(id) || static_cast<int64_t>(out.size()) == max_new) break;
            }
        }
    } catch (...) {
        run.close(slot);
        throw;
    }
    run.close(slot);
    return res;
}

}  // namespace megamoe::gpu
