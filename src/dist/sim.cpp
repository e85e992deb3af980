// sim.cpp — N ranks in one process: the MoE layer over an expert partition and the head over a
// vocabulary split (see sim.h). Every rank reads only its own buffers; "transport" is a copy of a
// block from one rank's send buffer into another's receive buffer at the plan's offsets.
#include "dist/sim.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/common.h"
#include "ref/ops.h"

namespace megamoe::dist {

namespace {

// One expert row to compute on a rank: input row, routing weight, where the output goes.
struct Job {
    const float* x;
    float w;
    float* out;
};

// Runs rank q's local experts over their jobs (each expert once over all of its rows, as ops::moe).
void run_experts(const MoeWeights& m, const ExpertPartition& p, int32_t q, float limit, int64_t D,
                 const std::vector<std::vector<Job>>& jobs) {
    std::vector<float> xs, ws, ys;
    for (size_t l = 0; l < jobs.size(); ++l) {
        const auto& js = jobs[l];
        if (js.empty()) continue;
        const int64_t n = static_cast<int64_t>(js.size());
        xs.resize(static_cast<size_t>(n * D));
        ws.resize(static_cast<size_t>(n));
        ys.resize(static_cast<size_t>(n * D));
        for (int64_t i = 0; i < n; ++i) {
            std::copy(js[static_cast<size_t>(i)].x, js[static_cast<size_t>(i)].x + D, xs.begin() + i * D);
            ws[static_cast<size_t>(i)] = js[static_cast<size_t>(i)].w;
        }
        const int32_t e = p.held[static_cast<size_t>(q)][l];
        ops::expert_ffn(m.experts[static_cast<size_t>(e)], limit, xs.data(), n, ws.data(), ys.data());
        for (int64_t i = 0; i < n; ++i)
            std::copy(ys.begin() + i * D, ys.begin() + (i + 1) * D, js[static_cast<size_t>(i)].out);
    }
}

// out[0 .. D) = Σ rows[idx[i]] over i < n in list order, skipping negative entries: f32 adds from
// +0, the order ops::moe's combine adds a token's slots in. Every combine below is this sum over
// the rows its plan lists (a token's pair rows, its slots, its ranks' partial rows).
void sum_rows(const float* rows, const std::vector<int64_t>& idx, int64_t D, float* out) {
    for (int64_t d = 0; d < D; ++d) {
        float sum = 0;
        for (const int64_t i : idx)
            if (i >= 0) sum += rows[i * D + d];
        out[d] = sum;
    }
}

// dst rows [dst_row, dst_row + n) = src rows [src_row, src_row + n), rows of `width` elements.
template <typename T>
void copy_rows(const std::vector<T>& src, int64_t src_row, std::vector<T>& dst, int64_t dst_row, int64_t n,
               int64_t width) {
    if (n <= 0) return;
    std::copy(src.begin() + src_row * width, src.begin() + (src_row + n) * width, dst.begin() + dst_row * width);
}

void moe_all_to_all(const MoeWeights& m, const ModelConfig& c, const ExpertPartition& p, Combine combine,
                    const std::vector<RankMoeInput>& in, std::vector<std::vector<float>>& acc, ExchangeBytes* bytes,
                    int64_t x_bytes) {
    const int32_t N = p.world;
    const int64_t D = c.hidden_size, k = c.num_experts_per_tok;
    const float limit = static_cast<float>(c.swiglu_limit);
    std::vector<RankIds> rid;
    for (const auto& r : in) rid.push_back({r.ids, r.T});
    const AllToAllPlan a = plan_all_to_all(p, rid, k);
    auto at = [N](int32_t r, int32_t q) { return static_cast<size_t>(r * N + q); };

    // Each rank packs its send buffer: x row, k weights, k local ids per (token, destination).
    std::vector<std::vector<float>> sx(static_cast<size_t>(N)), sw(static_cast<size_t>(N));
    for (int32_t r = 0; r < N; ++r) {
        const int64_t rows = a.send_rows(r);
        sx[static_cast<size_t>(r)].resize(static_cast<size_t>(rows * D));
        sw[static_cast<size_t>(r)].resize(static_cast<size_t>(rows * k));
        for (int64_t j = 0; j < rows; ++j) {
            const int64_t t = a.send_token[static_cast<size_t>(r)][static_cast<size_t>(j)];
            std::copy(in[static_cast<size_t>(r)].x + t * D, in[static_cast<size_t>(r)].x + (t + 1) * D,
                      sx[static_cast<size_t>(r)].begin() + j * D);
            std::copy(in[static_cast<size_t>(r)].wts + t * k, in[static_cast<size_t>(r)].wts + (t + 1) * k,
                      sw[static_cast<size_t>(r)].begin() + j * k);
        }
    }
    // Dispatch exchange: block r→q lands in q's receive buffer at recv_offset[q, r].
    std::vector<std::vector<float>> rx(static_cast<size_t>(N)), rw(static_cast<size_t>(N));
    std::vector<std::vector<int32_t>> rl(static_cast<size_t>(N));
    for (int32_t q = 0; q < N; ++q) {
        const int64_t rows = a.recv_rows(q);
        rx[static_cast<size_t>(q)].resize(static_cast<size_t>(rows * D));
        rw[static_cast<size_t>(q)].resize(static_cast<size_t>(rows * k));
        rl[static_cast<size_t>(q)].resize(static_cast<size_t>(rows * k));
        for (int32_t r = 0; r < N; ++r) {
            const int64_t n = a.send_count[at(r, q)], from = a.send_offset[at(r, q)], to = a.recv_offset[at(q, r)];
            copy_rows(sx[static_cast<size_t>(r)], from, rx[static_cast<size_t>(q)], to, n, D);
            copy_rows(sw[static_cast<size_t>(r)], from, rw[static_cast<size_t>(q)], to, n, k);
            copy_rows(a.send_local[static_cast<size_t>(r)], from, rl[static_cast<size_t>(q)], to, n, k);
        }
    }
    // Each rank computes its pairs: pair rows numbered in receive order, slots ascending (that is the
    // return layout: blocks per source rank, (t, s) ascending inside).
    std::vector<std::vector<float>> ret(static_cast<size_t>(N));
    for (int32_t q = 0; q < N; ++q) {
        const int64_t rows = a.recv_rows(q), pairs = a.pairs_sent(q);
        std::vector<float> pair_out(static_cast<size_t>(pairs * D));
        std::vector<std::vector<Job>> jobs(static_cast<size_t>(p.per_rank()));
        std::vector<int64_t> first_pair(static_cast<size_t>(rows + 1), 0);
        int64_t np = 0;
        for (int64_t j = 0; j < rows; ++j) {
            first_pair[static_cast<size_t>(j)] = np;
            for (int64_t s = 0; s < k; ++s) {
                const int32_t l = rl[static_cast<size_t>(q)][static_cast<size_t>(j * k + s)];
                if (l < 0) continue;
                jobs[static_cast<size_t>(l)].push_back(
                    {rx[static_cast<size_t>(q)].data() + j * D, rw[static_cast<size_t>(q)][static_cast<size_t>(j * k + s)],
                     pair_out.data() + np * D});
                ++np;
            }
        }
        first_pair[static_cast<size_t>(rows)] = np;
        MEGAMOE_CHECK(np == pairs, "simulate_moe: rank ", q, " received ", np, " pairs, the plan says ", pairs);
        run_experts(m, p, q, limit, D, jobs);
        if (combine == Combine::slot_rows) {
            ret[static_cast<size_t>(q)] = std::move(pair_out);
        } else {
            auto& part = ret[static_cast<size_t>(q)];
            part.assign(static_cast<size_t>(rows * D), 0.0f);
            std::vector<int64_t> idx;
            for (int64_t j = 0; j < rows; ++j) {   // a received row's pairs, in order
                idx.clear();
                for (int64_t i = first_pair[static_cast<size_t>(j)]; i < first_pair[static_cast<size_t>(j) + 1]; ++i)
                    idx.push_back(i);
                sum_rows(pair_out.data(), idx, D, part.data() + j * D);
            }
        }
    }
    // Combine exchange and the home rank's sums.
    for (int32_t r = 0; r < N; ++r) {
        const int64_t T = in[static_cast<size_t>(r)].T;
        auto& ac = acc[static_cast<size_t>(r)];
        if (combine == Combine::slot_rows) {
            std::vector<float> home(static_cast<size_t>(a.pairs_home(r) * D));
            for (int32_t q = 0; q < N; ++q)
                copy_rows(ret[static_cast<size_t>(q)], a.pair_send_offset[at(q, r)], home, a.pair_offset[at(r, q)],
                          a.pair_count[at(r, q)], D);
            const auto& prow = a.pair_row[static_cast<size_t>(r)];
            std::vector<int64_t> idx(static_cast<size_t>(k));
            for (int64_t t = 0; t < T; ++t) {   // a token's slots, in slot order
                for (int64_t s = 0; s < k; ++s) idx[static_cast<size_t>(s)] = prow[static_cast<size_t>(t * k + s)];
                sum_rows(home.data(), idx, D, ac.data() + t * D);
            }
        } else {
            std::vector<float> home(static_cast<size_t>(a.send_rows(r) * D));
            std::vector<int64_t> row_of(static_cast<size_t>(T * N), -1);   // [T, N] send row of (t, q)
            for (int32_t q = 0; q < N; ++q) {
                copy_rows(ret[static_cast<size_t>(q)], a.recv_offset[at(q, r)], home, a.send_offset[at(r, q)],
                          a.send_count[at(r, q)], D);
                for (int64_t j = a.send_offset[at(r, q)]; j < a.send_offset[at(r, q)] + a.send_count[at(r, q)]; ++j)
                    row_of[static_cast<size_t>(a.send_token[static_cast<size_t>(r)][static_cast<size_t>(j)] * N + q)] = j;
            }
            std::vector<int64_t> idx(static_cast<size_t>(N));
            for (int64_t t = 0; t < T; ++t) {   // a token's partial rows, in rank order
                for (int32_t q = 0; q < N; ++q) idx[static_cast<size_t>(q)] = row_of[static_cast<size_t>(t * N + q)];
                sum_rows(home.data(), idx, D, ac.data() + t * D);
            }
        }
    }
    if (bytes) {
        const int64_t row = D * x_bytes + k * 4 + k * 4;   // x, weights f32, local ids i32
        for (int32_t r = 0; r < N; ++r) {
            int64_t out = 0, back = 0;
            for (int32_t q = 0; q < N; ++q) {
                if (q == r) continue;
                out += a.send_count[at(r, q)] * row;
                back += (combine == Combine::slot_rows ? a.pair_count[at(q, r)] : a.send_count[at(q, r)]) * D * 4;
            }
            bytes->dispatch.push_back(out);
            bytes->combine.push_back(back);
        }
    }
}

void moe_gather_scatter(const MoeWeights& m, const ModelConfig& c, const ExpertPartition& p, Combine combine,
                        const std::vector<RankMoeInput>& in, std::vector<std::vector<float>>& acc, ExchangeBytes* bytes,
                        int64_t x_bytes) {
    const int32_t N = p.world;
    const int64_t D = c.hidden_size, k = c.num_experts_per_tok;
    const float limit = static_cast<float>(c.swiglu_limit);
    std::vector<RankIds> rid;
    for (const auto& r : in) rid.push_back({r.ids, r.T});
    const GatherPlan g = plan_gather_scatter(p, rid, k);
    const int64_t rows = N * g.T_pad;
    // All-gather: every rank ends with the same [N·T_pad] rows (padding rows zero, ids −1).
    std::vector<float> gx(static_cast<size_t>(rows * D), 0.0f), gw(static_cast<size_t>(rows * k), 0.0f);
    for (int32_t r = 0; r < N; ++r) {
        const auto& ri = in[static_cast<size_t>(r)];
        if (ri.T == 0) continue;
        std::copy(ri.x, ri.x + ri.T * D, gx.begin() + r * g.T_pad * D);
        std::copy(ri.wts, ri.wts + ri.T * k, gw.begin() + r * g.T_pad * k);
    }
    const int64_t width = combine == Combine::slot_rows ? k * D : D;
    std::vector<std::vector<float>> out(static_cast<size_t>(N));
    for (int32_t q = 0; q < N; ++q) {
        const auto& loc = g.local[static_cast<size_t>(q)];
        std::vector<float> slot_out(static_cast<size_t>(rows * k * D), 0.0f);   // [rows, k, D]
        std::vector<std::vector<Job>> jobs(static_cast<size_t>(p.per_rank()));
        for (int64_t i = 0; i < rows * k; ++i) {
            const int32_t l = loc[static_cast<size_t>(i)];
            if (l >= 0)
                jobs[static_cast<size_t>(l)].push_back(
                    {gx.data() + (i / k) * D, gw[static_cast<size_t>(i)], slot_out.data() + i * D});
        }
        run_experts(m, p, q, limit, D, jobs);
        if (combine == Combine::slot_rows) {
            out[static_cast<size_t>(q)] = std::move(slot_out);
        } else {
            auto& part = out[static_cast<size_t>(q)];
            part.assign(static_cast<size_t>(rows * D), 0.0f);
            std::vector<int64_t> idx(static_cast<size_t>(k));
            for (int64_t row = 0; row < rows; ++row) {   // the row's slots held here, in slot order
                for (int64_t s = 0; s < k; ++s)
                    idx[static_cast<size_t>(s)] = loc[static_cast<size_t>(row * k + s)] >= 0 ? row * k + s : -1;
                sum_rows(slot_out.data(), idx, D, part.data() + row * D);
            }
        }
    }
    // Reduce-scatter: rank r gets Σ_q out[q] over its T_pad rows, added in rank order.
    for (int32_t r = 0; r < N; ++r) {
        std::vector<float> red(static_cast<size_t>(g.T_pad * width));
        for (int64_t i = 0; i < g.T_pad * width; ++i) {
            float v = out[0][static_cast<size_t>(r * g.T_pad * width + i)];
            for (int32_t q = 1; q < N; ++q) v += out[static_cast<size_t>(q)][static_cast<size_t>(r * g.T_pad * width + i)];
            red[static_cast<size_t>(i)] = v;
        }
        const int64_t T = in[static_cast<size_t>(r)].T;
        auto& ac = acc[static_cast<size_t>(r)];
        if (combine == Combine::partial_sums) {
            std::copy(red.begin(), red.begin() + T * D, ac.begin());
            continue;
        }
        std::vector<int64_t> idx(static_cast<size_t>(k));
        for (int64_t t = 0; t < T; ++t) {   // a token's slots, in slot order
            for (int64_t s = 0; s < k; ++s)
                idx[static_cast<size_t>(s)] = in[static_cast<size_t>(r)].ids[t * k + s] >= 0 ? t * k + s : -1;
            sum_rows(red.data(), idx, D, ac.data() + t * D);
        }
    }
    if (bytes) {
        // Ring collectives: each rank sends (N−1) chunks of its share in each.
        const int64_t row = D * x_bytes + k * 4 + k * 4;   // x, weights f32, ids i32
        for (int32_t r = 0; r < N; ++r) {
            bytes->dispatch.push_back((N - 1) * g.T_pad * row);
            bytes->combine.push_back((N - 1) * g.T_pad * width * 4);
        }
    }
}

}  // namespace

void simulate_moe(const MoeWeights& m, const ModelConfig& c, const ExpertPartition& p, Scheme scheme,
                  Combine combine, const std::vector<RankMoeInput>& in, std::vector<std::vector<float>>& y,
                  ExchangeBytes* bytes, int64_t x_bytes) {
    const int32_t N = p.world;
    const int64_t D = c.hidden_size, k = c.num_experts_per_tok;
    if (p.experts != c.n_routed_experts || static_cast<int64_t>(m.experts.size()) != c.n_routed_experts)
        throw Error("simulate_moe: the partition has " + std::to_string(p.experts) + " experts, the layer " +
                    std::to_string(m.experts.size()) + ", n_routed_experts is " + std::to_string(c.n_routed_experts));
    if (static_cast<int64_t>(in.size()) != N)
        throw Error("simulate_moe: inputs of " + std::to_string(in.size()) + " ranks for a world of " + std::to_string(N));
    for (size_t r = 0; r < in.size(); ++r)
        if (in[r].T < 0 || (in[r].T > 0 && (!in[r].x || !in[r].ids || !in[r].wts)))
            throw Error("simulate_moe: rank " + std::to_string(r) + " lacks x, ids or wts for its " +
                        std::to_string(in[r].T) + " tokens");
    if (bytes) *bytes = ExchangeBytes{};
    const float limit = static_cast<float>(c.swiglu_limit);
    // The home rank's part: the shared expert, then (after the exchange) y += Σ of the routed rows.
    y.assign(static_cast<size_t>(N), {});
    std::vector<std::vector<float>> acc(static_cast<size_t>(N));
    for (int32_t r = 0; r < N; ++r) {
        const int64_t T = in[static_cast<size_t>(r)].T;
        y[static_cast<size_t>(r)].assign(static_cast<size_t>(T * D), 0.0f);
        acc[static_cast<size_t>(r)].assign(static_cast<size_t>(T * D), 0.0f);
        if (T > 0) ops::expert_ffn(m.shared, limit, in[static_cast<size_t>(r)].x, T, nullptr, y[static_cast<size_t>(r)].data());
    }
    if (scheme == Scheme::all_to_all)
        moe_all_to_all(m, c, p, combine, in, acc, bytes, x_bytes);
    else
        moe_gather_scatter(m, c, p, combine, in, acc, bytes, x_bytes);
    for (int32_t r = 0; r < N; ++r)
        for (size_t i = 0; i < y[static_cast<size_t>(r)].size(); ++i) y[static_cast<size_t>(r)][i] += acc[static_cast<size_t>(r)][i];
    (void)k;
}

// ---- head

VocabSplit split_vocab(int64_t V, int64_t N, int64_t align) {
    if (N < 1) throw Error("split_vocab: --gpus must be at least 1, got " + std::to_string(N));
    if (V < 1) throw Error("split_vocab: vocab_size must be at least 1, got " + std::to_string(V));
    if (align < 1) align = 1;
    const int64_t per = ((V + N - 1) / N + align - 1) / align * align;
    VocabSplit s;
    s.world = static_cast<int32_t>(N);
    s.vocab = V;
    for (int64_t r = 0; r <= N; ++r) s.begin.push_back(std::min(r * per, V));
    s.begin.back() = V;
    return s;
}

Linear head_rows(const Linear& head, int64_t v0, int64_t v1) {
    if (head.format != LinearFormat::bf16 && head.format != LinearFormat::f32)
        throw Error(std::string("head_rows: the head is ") + linear_format_name(head.format) +
                    "; a vocabulary split of it needs bf16 or f32 rows");
    if (v0 < 0 || v1 < v0 || v1 > head.out)
        throw Error("head_rows: rows [" + std::to_string(v0) + ", " + std::to_string(v1) + ") outside the head's " +
                    std::to_string(head.out));
    Linear h = head;
    const size_t elem = head.format == LinearFormat::bf16 ? 2 : 4;
    h.out = v1 - v0;
    h.weight.data = static_cast<char*>(head.weight.data) + static_cast<size_t>(v0 * head.in) * elem;
    h.weight.shape[0] = v1 - v0;
    return h;
}

void head_logits_slice(const Linear& head, const VocabSplit& s, int32_t r, const float* u, int64_t T, float* out) {
    if (r < 0 || r >= s.world) throw Error("head_logits_slice: rank " + std::to_string(r) + " outside the world");
    if (s.rows(r) == 0 || T == 0) return;
    ops::linear(head_rows(head, s.begin[static_cast<size_t>(r)], s.begin[static_cast<size_t>(r) + 1]), u, T, out);
}

void gather_logits(const VocabSplit& s, const std::vector<std::vector<float>>& slices, int64_t T, float* logits) {
    for (int32_t r = 0; r < s.world; ++r) {
        const int64_t n = s.rows(r), v0 = s.begin[static_cast<size_t>(r)];
        MEGAMOE_CHECK(static_cast<int64_t>(slices[static_cast<size_t>(r)].size()) >= T * n, "gather_logits: slice ", r,
                      " is short");
        for (int64_t t = 0; t < T; ++t)
            std::copy(slices[static_cast<size_t>(r)].begin() + t * n, slices[static_cast<size_t>(r)].begin() + (t + 1) * n,
                      logits + t * s.vocab + v0);
    }
}

void argmax_candidates(const VocabSplit& s, int32_t r, const float* slice, int64_t T, ArgmaxCandidate* out) {
    const int64_t n = s.rows(r), v0 = s.begin[static_cast<size_t>(r)];
    for (int64_t t = 0; t < T; ++t) {
        const float* row = slice + t * n;
        ArgmaxCandidate cnd;
        cnd.nan_at_zero = (v0 == 0 && n > 0 && std::isnan(row[0])) ? 1 : 0;
        for (int64_t i = 0; i < n; ++i) {
            if (std::isnan(row[i])) continue;
            if (cnd.id < 0 || row[i] > cnd.value) {
                cnd.value = row[i];
                cnd.id = static_cast<int32_t>(v0 + i);
            }
        }
        out[t] = cnd;
    }
}

void reduce_argmax(const std::vector<std::vector<ArgmaxCandidate>>& cands, int64_t T, int32_t* ids) {
    for (int64_t t = 0; t < T; ++t) {
        int32_t best = -1;
        float value = 0;
        bool nan0 = false;
        for (const auto& c : cands) {   // rank order = id order (slices are contiguous)
            const ArgmaxCandidate& cd = c[static_cast<size_t>(t)];
            nan0 = nan0 || cd.nan_at_zero;
            if (cd.id >= 0 && (best < 0 || cd.value > value)) {
                best = cd.id;
                value = cd.value;
            }
        }
        ids[t] = (nan0 || best < 0) ? 0 : best;
    }
}

}  // namespace megamoe::dist
