// attention.cpp — sink attention over explicit key rows, compressor pooling, indexer scoring, top-k.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "ref/ops.h"

namespace megamoe::ops {

void attend_one(const float* q, int64_t H, int64_t hd, const float* const* keys, int64_t n_keys, const float* sink,
                float scale, float* o, Numerics nm) {
    std::vector<float> logit(static_cast<size_t>(n_keys));
    std::vector<double> acc(static_cast<size_t>(hd));
    for (int64_t h = 0; h < H; ++h) {
        const float* qh = q + h * hd;
        float m = sink[h];   // the sink is a raw logit: not scaled, no value row
        for (int64_t j = 0; j < n_keys; ++j) {
            double s = 0;
            for (int64_t d = 0; d < hd; ++d) s += static_cast<double>(qh[d]) * keys[j][d];
            logit[static_cast<size_t>(j)] = static_cast<float>(s) * scale;
            m = std::max(m, logit[static_cast<size_t>(j)]);
        }
        double den = std::exp(static_cast<double>(sink[h] - m));
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t j = 0; j < n_keys; ++j) {
            const double p = std::exp(static_cast<double>(logit[static_cast<size_t>(j)] - m));
            den += p;
            // official: P is cast to bf16 before the PV product (the normalizer keeps f32 P)
            const double pv = nm == Numerics::official ? bf16_round(static_cast<float>(p)) : p;
            for (int64_t d = 0; d < hd; ++d) acc[static_cast<size_t>(d)] += pv * keys[j][d];
        }
        for (int64_t d = 0; d < hd; ++d) o[h * hd + d] = static_cast<float>(acc[static_cast<size_t>(d)] / den);
        round_bf16(nm, o + h * hd, hd);
    }
}

void compress_pool(const float* const* kv, const float* const* gate, int64_t n_slots, int64_t d, float* out) {
    for (int64_t f = 0; f < d; ++f) {
        float m = -INFINITY;
        for (int64_t s = 0; s < n_slots; ++s) m = std::max(m, gate[s][f]);
        double den = 0, num = 0;
        for (int64_t s = 0; s < n_slots; ++s) {
            const double e = std::exp(static_cast<double>(gate[s][f] - m));
            den += e;
            num += e * kv[s][f];
        }
        out[f] = static_cast<float>(num / den);
    }
}

void indexer_scores(const float* q, const float* w, int64_t nh, int64_t hd, const float* K, int64_t n_rows,
                    float* score) {
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    for (int64_t s = 0; s < n_rows; ++s) {
        const float* k = K + s * hd;
        double acc = 0;
        for (int64_t h = 0; h < nh; ++h) {
            double dotp = 0;
            for (int64_t d = 0; d < hd; ++d) dotp += static_cast<double>(q[h * hd + d]) * k[d];
            // ReLU before the per-head weight; the weights may be negative.
            if (dotp > 0) acc += static_cast<double>(static_cast<float>(dotp) * scale) * w[h];
        }
        score[s] = static_cast<float>(acc);
    }
}

std::vector<int32_t> topk_indices(const float* score, int64_t n, int64_t k) {
    k = std::min(k, n);
    std::vector<int32_t> idx(static_cast<size_t>(n));
    std::iota(idx.begin(), idx.end(), 0);
    // Larger score first; equal scores keep the lower index first, on every backend.
    auto better = [&](int32_t a, int32_t b) { return score[a] > score[b] || (score[a] == score[b] && a < b); };
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), better);
    idx.resize(static_cast<size_t>(k));
    std::sort(idx.begin(), idx.end());
    return idx;
}

}  // namespace megamoe::ops
