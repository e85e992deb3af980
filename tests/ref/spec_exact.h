// spec_exact.h — the exact expectations of the speculative decoders' distribution tests (the CPU
// reference's, tests/ref/speculative_test.cpp, and the GPU's, tests/gpu/runner_test.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ref/generate.h"
#include "ref/model.h"
#include "ref/speculative.h"
#include "serve/sampler.h"
#include "test_util.h"

namespace megamoe::test {

// The probabilities W / Σ W of integer sampling weights.
inline std::vector<double> probabilities(const std::vector<uint64_t>& W) {
    double total = 0.0;
    for (uint64_t x : W) total += static_cast<double>(x);
    std::vector<double> p(W.size());
    for (size_t i = 0; i < W.size(); ++i) p[i] = static_cast<double>(W[i]) / total;
    return p;
}

// For the first two sampled tokens a, b after `prompt` under sp (the CPU reference's logits):
// bucket_of[a][b], b's rank bucket (rank_buckets) under the main model's p(. | prompt, a);
// exact[k] = Σ_a p(a) Σ_{b in bucket k} p(b | a), the statistic's distribution with or without
// speculation; alpha = Σ_a p(a) Σ_v min(p(v | a), q(v | a)), the probability that the first round's
// draft d_1 is accepted by the standard rule (q: the MTP block's distribution after a). From
// batched forwards over copies of the prompt's state, 64 values of a at a time.
struct SpecExact {
    std::vector<std::vector<int>> bucket_of;   // [V][V]
    std::vector<double> exact;                 // [kRankBuckets]
    double alpha = 0.0;
};
inline SpecExact spec_exact(const Model& m, const std::vector<int32_t>& prompt, const SamplingParams& sp) {
    const int64_t V = m.cfg.vocab_size;
    auto probs = [&](const float* row) { return probabilities(sampling_weights(sp, row, V)); };
    SpeculativeOptions po;
    po.draft_tokens = 1;
    const SpeculativePrefill pre = prefill_speculative(m, prompt, po);   // the MTP block fed all but the last position
    const std::vector<double> p0 = probs(pre.logits.data());
    SpecExact r;
    r.bucket_of.resize(static_cast<size_t>(V));
    r.exact.assign(kRankBuckets, 0.0);
    std::vector<float> logits, mtp_logits;
    for (int64_t a0 = 0; a0 < V; a0 += 64) {
        const size_t nb = static_cast<size_t>(std::min<int64_t>(64, V - a0));
        std::vector<SequenceState> states(nb, pre.state), mstates(nb, pre.state);
        std::vector<SequenceChunk> b;
        std::vector<MtpChunk> mb;
        for (size_t i = 0; i < nb; ++i) {
            const int32_t a = static_cast<int32_t>(a0 + static_cast<int64_t>(i));
            b.push_back({&states[i], {a}});
            mb.push_back({&mstates[i], pre.pending.data(), {a}});
        }
        forward(m, b, ForwardOptions{}, logits);            // p(. | prompt, a)
        mtp_forward(m, mb, ForwardOptions{}, mtp_logits);   // q(. | prompt, a): the first round's d_1
        for (size_t i = 0; i < nb; ++i) {
            const size_t a = static_cast<size_t>(a0) + i;
            const std::vector<double> pb = probs(logits.data() + static_cast<int64_t>(i) * V);
            const std::vector<double> qb = probs(mtp_logits.data() + static_cast<int64_t>(i) * V);
            r.bucket_of[a] = rank_buckets(pb);
            double overlap = 0.0;
            for (int64_t t = 0; t < V; ++t) {
                r.exact[static_cast<size_t>(r.bucket_of[a][static_cast<size_t>(t)])] += p0[a] * pb[static_cast<size_t>(t)];
                overlap += std::min(pb[static_cast<size_t>(t)], qb[static_cast<size_t>(t)]);
            }
            r.alpha += p0[a] * overlap;
        }
    }
    return r;
}

}  // namespace megamoe::test
