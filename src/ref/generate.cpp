// generate.cpp — schedules of prefill / chunked prefill / decode over one sequence.
#include "ref/generate.h"

#include <algorithm>

namespace megamoe {

namespace {

// One slot for the duration of a driver call.
struct SlotGuard {
    Backend& b;
    int32_t slot;
    SlotGuard(Backend& be, int64_t n_tokens) : b(be), slot(be.open()) {
        if (slot < 0) fail(be.name(), " backend: no free sequence slot");
        if (!b.reserve(slot, n_tokens)) {
            b.close(slot);
            fail(be.name(), " backend: no room for a sequence of ", n_tokens, " positions (max-model-len ",
                 be.max_model_len(), ")");
        }
    }
    ~SlotGuard() { b.close(slot); }
};

// A CPU backend without a step limit: the Model drivers keep forward()'s behaviour.
std::unique_ptr<Backend> unlimited_cpu(const Model& m) { return make_cpu_backend(m, 1, int64_t{1} << 40); }

}  // namespace

std::vector<float> sequence_logits(Backend& b, const std::vector<int32_t>& tokens, const Schedule& s) {
    const int64_t T = static_cast<int64_t>(tokens.size()), V = b.config().vocab_size;
    if (s.chunk < 0) fail("chunk size must be >= 0, got ", s.chunk);
    if (s.decode_from < -1) fail("decode-from must be >= 0 (or -1: no decode), got ", s.decode_from);
    if (s.decode_from > T) fail("decode-from ", s.decode_from, " is past the ", T, " tokens");
    const int64_t prefill_end = s.decode_from < 0 ? T : s.decode_from;
    const int64_t limit = std::min(b.max_batch_tokens(), b.max_logit_rows());
    const int64_t chunk = std::min(s.chunk > 0 ? s.chunk : std::max<int64_t>(prefill_end, 1), limit);
    SlotGuard g(b, T);
    std::vector<float> out, part;
    out.reserve(static_cast<size_t>(T * V));
    for (int64_t t = 0; t < T;) {
        const int64_t n = t < prefill_end ? std::min(chunk, prefill_end - t) : 1;
        b.step({{g.slot, std::vector<int32_t>(tokens.begin() + t, tokens.begin() + t + n)}}, true, part);
        out.insert(out.end(), part.begin(), part.end());
        t += n;
    }
    return out;
}

std::vector<float> sequence_logits(const Model& m, const std::vector<int32_t>& tokens, const Schedule& s) {
    auto b = unlimited_cpu(m);
    return sequence_logits(*b, tokens, s);
}

MtpLogits sequence_logits_mtp(const Model& m, const std::vector<int32_t>& tokens, const Schedule& s) {
    const int64_t T = static_cast<int64_t>(tokens.size()), V = m.cfg.vocab_size;
    if (T == 0) fail("mtp logits: no tokens");
    if (s.chunk < 0) fail("chunk size must be >= 0, got ", s.chunk);
    if (s.decode_from < -1) fail("decode-from must be >= 0 (or -1: no decode), got ", s.decode_from);
    if (s.decode_from > T) fail("decode-from ", s.decode_from, " is past the ", T, " tokens");
    if (!m.w.mtp) fail("mtp logits: the checkpoint has no multi-token-prediction block (mtp.0.* tensors)");
    const int64_t prefill_end = s.decode_from < 0 ? T : s.decode_from;
    const int64_t chunk = s.chunk > 0 ? s.chunk : std::max<int64_t>(prefill_end, 1);
    SequenceState st(m.cfg);
    MtpLogits out;
    out.logits.reserve(static_cast<size_t>(T * V));
    out.mtp_logits.reserve(static_cast<size_t>((T - 1) * V));
    std::vector<float> part, streams;
    ForwardOptions opt;
    opt.all_logits = true;
    opt.streams_out = &streams;
    ForwardOptions mtp_opt;
    mtp_opt.all_logits = true;
    for (int64_t t = 0; t < T;) {
        const int64_t n = t < prefill_end ? std::min(chunk, prefill_end - t) : 1;
        std::vector<SequenceChunk> batch{{&st, std::vector<int32_t>(tokens.begin() + t, tokens.begin() + t + n)}};
        forward(m, batch, opt, part);
        out.logits.insert(out.logits.end(), part.begin(), part.end());
        const int64_t n_mtp = std::min(t + n, T - 1) - t;   // positions whose next token is known
        if (n_mtp > 0) {
            std::vector<MtpChunk> mb{{&st, streams.data(),
                                      std::vector<int32_t>(tokens.begin() + t + 1, tokens.begin() + t + 1 + n_mtp)}};
            mtp_forward(m, mb, mtp_opt, part);
            out.mtp_logits.insert(out.mtp_logits.end(), part.begin(), part.end());
        }
        t += n;
    }
    return out;
}

int32_t argmax(const float* logits, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; ++i)
        if (logits[i] > logits[best]) best = i;
    return static_cast<int32_t>(best);
}

std::vector<int32_t> generate_greedy(Backend& b, const std::vector<int32_t>& prompt, int64_t max_new,
                                     int64_t chunk, bool ignore_eos) {
    return generate_with(b, prompt, max_new, chunk, ignore_eos,
                         [](const float* logits, int64_t V, int64_t) { return argmax(logits, V); });
}

std::vector<int32_t> generate_with(Backend& b, const std::vector<int32_t>& prompt, int64_t max_new, int64_t chunk,
                                   bool ignore_eos, const TokenChoice& choose) {
    if (prompt.empty()) fail("generate: the prompt is empty");
    const int64_t P = static_cast<int64_t>(prompt.size()), V = b.config().vocab_size;
    const int64_t step = std::min(chunk > 0 ? chunk : P, b.max_batch_tokens());
    const int64_t limit = b.max_model_len();   // generation stops there (the output so far is kept)
    if (P > limit) fail("generate: the prompt has ", P, " tokens, more than the context limit ", limit);
    SlotGuard g(b, std::min(P + std::max<int64_t>(max_new - 1, 0), limit));
    std::vector<int32_t> out;
    std::vector<float> logits;
    for (int64_t t = 0; t < P; t += step)
        b.step({{g.slot, std::vector<int32_t>(prompt.begin() + t, prompt.begin() + std::min(P, t + step))}}, false,
               logits);
    for (int64_t i = 0; i < max_new; ++i) {
        const int32_t next = choose(logits.data(), V, i);
        out.push_back(next);
        if ((!ignore_eos && next == b.config().eos_token_id) || i + 1 == max_new) break;
        if (P + i + 1 > limit) break;   // feeding `next` would pass the context limit
        b.step({{g.slot, {next}}}, false, logits);
    }
    return out;
}

std::vector<int32_t> generate_greedy(const Model& m, const std::vector<int32_t>& prompt, int64_t max_new,
                                     int64_t chunk, bool ignore_eos) {
    auto b = unlimited_cpu(m);
    return generate_greedy(*b, prompt, max_new, chunk, ignore_eos);
}

}  // namespace megamoe
