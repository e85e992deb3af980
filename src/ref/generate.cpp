// generate.cpp — schedules of prefill / chunked prefill / decode over one sequence.
#include "ref/generate.h"

#include <algorithm>

namespace megamoe {

std::vector<float> sequence_logits(const Model& m, const std::vector<int32_t>& tokens, const Schedule& s) {
    const int64_t T = static_cast<int64_t>(tokens.size()), V = m.cfg.vocab_size;
    if (s.chunk < 0) fail("chunk size must be >= 0, got ", s.chunk);
    if (s.decode_from > T) fail("decode-from ", s.decode_from, " is past the ", T, " tokens");
    const int64_t prefill_end = s.decode_from < 0 ? T : s.decode_from;
    const int64_t chunk = s.chunk > 0 ? s.chunk : std::max<int64_t>(prefill_end, 1);
    SequenceState st(m.cfg);
    ForwardOptions opt;
    opt.all_logits = true;
    std::vector<float> out, part;
    out.reserve(static_cast<size_t>(T * V));
    for (int64_t t = 0; t < T;) {
        const int64_t n = t < prefill_end ? std::min(chunk, prefill_end - t) : 1;
        std::vector<SequenceChunk> batch{{&st, std::vector<int32_t>(tokens.begin() + t, tokens.begin() + t + n)}};
        forward(m, batch, opt, part);
        out.insert(out.end(), part.begin(), part.end());
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

std::vector<int32_t> generate_greedy(const Model& m, const std::vector<int32_t>& prompt, int64_t max_new,
                                     int64_t chunk, bool ignore_eos) {
    if (prompt.empty()) fail("generate: the prompt is empty");
    SequenceState st(m.cfg);
    std::vector<int32_t> out;
    std::vector<float> logits;
    const int64_t P = static_cast<int64_t>(prompt.size()), step = chunk > 0 ? chunk : P;
    for (int64_t t = 0; t < P; t += step) {
        std::vector<SequenceChunk> batch{
            {&st, std::vector<int32_t>(prompt.begin() + t, prompt.begin() + std::min(P, t + step))}};
        forward(m, batch, ForwardOptions{}, logits);
    }
    for (int64_t i = 0; i < max_new; ++i) {
        const int32_t next = argmax(logits.data(), m.cfg.vocab_size);
        out.push_back(next);
        if ((!ignore_eos && next == m.cfg.eos_token_id) || i + 1 == max_new) break;
        std::vector<SequenceChunk> batch{{&st, {next}}};
        forward(m, batch, ForwardOptions{}, logits);
    }
    return out;
}

}  // namespace megamoe
