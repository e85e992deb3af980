// moe.cpp — routers (score and hash), the clamped SwiGLU expert, and the routed + shared combine.
#include <algorithm>
#include <cmath>
#include <vector>

#include "ref/ops.h"

namespace megamoe::ops {

// sqrt(softplus(v)) with torch's softplus threshold (v > 20 returns v).
static float sqrt_softplus(float v) { return std::sqrt(v > 20.0f ? v : std::log1p(std::exp(v))); }

static void normalize_weights(const float* s, const int32_t* ids, int64_t k, float scale, float* wts) {
    float sum = 0;
    for (int64_t i = 0; i < k; ++i) sum += s[ids[i]];
    for (int64_t i = 0; i < k; ++i) wts[i] = s[ids[i]] / sum * scale;
}

static std::vector<float> router_scores(const MoeWeights& m, const float* x, int64_t T) {
    std::vector<float> s(static_cast<size_t>(T * m.gate.out));
    linear(m.gate, x, T, s.data());
    for (float& v : s) v = sqrt_softplus(v);
    return s;
}

void route_score(const MoeWeights& m, const ModelConfig& c, const float* x, int64_t T, int32_t* ids, float* wts) {
    const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok;
    std::vector<float> s = router_scores(m, x, T), biased(static_cast<size_t>(E));
    const float* bias = m.bias.as<float>();
    for (int64_t t = 0; t < T; ++t) {
        const float* st = s.data() + t * E;
        for (int64_t e = 0; e < E; ++e) biased[static_cast<size_t>(e)] = st[e] + bias[e];   // bias: selection only
        std::vector<int32_t> top = topk_indices(biased.data(), E, k);
        // Keep the selection in descending biased-score order (ties by index) for readability of traces.
        std::stable_sort(top.begin(), top.end(), [&](int32_t a, int32_t b) { return biased[a] > biased[b]; });
        std::copy(top.begin(), top.end(), ids + t * k);
        normalize_weights(st, ids + t * k, k, static_cast<float>(c.routed_scaling_factor), wts + t * k);
    }
}

void route_hash(const MoeWeights& m, const ModelConfig& c, const float* x, const int32_t* tokens, int64_t T,
                int32_t* ids, float* wts) {
    const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok;
    std::vector<float> s = router_scores(m, x, T);
    const int64_t* table = m.tid2eid.as<int64_t>();
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t i = 0; i < k; ++i) ids[t * k + i] = static_cast<int32_t>(table[tokens[t] * k + i]);
        normalize_weights(s.data() + t * E, ids + t * k, k, static_cast<float>(c.routed_scaling_factor), wts + t * k);
    }
}

void route_weights(const MoeWeights& m, const ModelConfig& c, const float* x, int64_t T, const int32_t* ids,
                   float* wts) {
    const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok;
    std::vector<float> s = router_scores(m, x, T);
    for (int64_t t = 0; t < T; ++t)
        normalize_weights(s.data() + t * E, ids + t * k, k, static_cast<float>(c.routed_scaling_factor), wts + t * k);
}

void expert_ffn(const ExpertWeights& e, float limit, const float* x, int64_t T, const float* scale, float* y,
                Numerics nm) {
    const int64_t I = e.w1.out;
    std::vector<float> g(static_cast<size_t>(T * I)), u(static_cast<size_t>(T * I));
    linear_rounded(nm, e.w1, x, T, g.data());
    linear_rounded(nm, e.w3, x, T, u.data());
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t i = 0; i < I; ++i) {
            const float gv = std::min(g[static_cast<size_t>(t * I + i)], limit);            // gate: clamped above
            const float uv = std::clamp(u[static_cast<size_t>(t * I + i)], -limit, limit);  // up: both sides
            float a = gv / (1.0f + std::exp(-gv)) * uv;
            if (scale) a *= scale[t];   // routing weight before w2, as the official code does
            g[static_cast<size_t>(t * I + i)] = a;
        }
    }
    round_bf16(nm, g.data(), T * I);   // official: x.to(bf16) before w2
    linear_rounded(nm, e.w2, g.data(), T, y);
}

void moe(const MoeWeights& m, const ModelConfig& c, const float* x, int64_t T, const int32_t* ids, const float* wts,
         float* y, Numerics nm) {
    const int64_t D = c.hidden_size, k = c.num_experts_per_tok, E = c.n_routed_experts;
    const float limit = static_cast<float>(c.swiglu_limit);
    // Gather each expert's (token, slot) pairs; experts without tokens cost nothing.
    std::vector<std::vector<int64_t>> slots(static_cast<size_t>(E));
    for (int64_t i = 0; i < T * k; ++i) slots[static_cast<size_t>(ids[i])].push_back(i);
    std::vector<float> out(static_cast<size_t>(T * k * D));   // [T, k, D] per-slot expert outputs
    std::vector<float> xs, ws, ys;
    for (int64_t e = 0; e < E; ++e) {
        const auto& sl = slots[static_cast<size_t>(e)];
        if (sl.empty()) continue;
        const int64_t n = static_cast<int64_t>(sl.size());
        xs.resize(static_cast<size_t>(n * D));
        ws.resize(static_cast<size_t>(n));
        ys.resize(static_cast<size_t>(n * D));
        for (int64_t i = 0; i < n; ++i) {
            std::copy(x + (sl[static_cast<size_t>(i)] / k) * D, x + (sl[static_cast<size_t>(i)] / k + 1) * D,
                      xs.begin() + i * D);
            ws[static_cast<size_t>(i)] = wts[sl[static_cast<size_t>(i)]];
        }
        expert_ffn(m.experts[static_cast<size_t>(e)], limit, xs.data(), n, ws.data(), ys.data(), nm);
        for (int64_t i = 0; i < n; ++i)
            std::copy(ys.begin() + i * D, ys.begin() + (i + 1) * D, out.begin() + sl[static_cast<size_t>(i)] * D);
    }
    expert_ffn(m.shared, limit, x, T, nullptr, y, nm);
    // Combine in slot order per token, so the sum does not depend on the batch.
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t d = 0; d < D; ++d) {
            float acc = 0;
            for (int64_t s = 0; s < k; ++s) acc += out[static_cast<size_t>((t * k + s) * D + d)];
            y[t * D + d] += acc;
        }
    }
    round_bf16(nm, y, T * D);   // official: y.type_as(x)
}

}  // namespace megamoe::ops
