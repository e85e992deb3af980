// speculative.cpp — speculative decoding with the MTP block as the draft model (ref/speculative.h).
#include "ref/speculative.h"

#include <algorithm>

#include "ref/generate.h"

namespace megamoe {

namespace {

CompressorCheckpoint checkpoint_comp(const CompressorState& c) {
    CompressorCheckpoint cp;
    cp.pending_kv = c.pending_kv, cp.pending_gate = c.pending_gate;
    cp.prev_kv = c.prev_kv, cp.prev_gate = c.prev_gate;
    cp.n_pending = c.n_pending, cp.n_rows = c.n_rows;
    cp.rows_size = c.rows.size();
    return cp;
}

void restore_comp(CompressorState& c, const CompressorCheckpoint& cp) {
    if (c.n_rows < cp.n_rows || c.rows.size() < cp.rows_size)
        fail("restore_state: a compressor has ", c.n_rows, " rows, fewer than the checkpoint's ", cp.n_rows);
    c.pending_kv = cp.pending_kv, c.pending_gate = cp.pending_gate;
    c.prev_kv = cp.prev_kv, c.prev_gate = cp.prev_gate;
    c.n_pending = cp.n_pending, c.n_rows = cp.n_rows;
    c.rows.resize(cp.rows_size);   // rows emitted after the checkpoint go; earlier ones never changed
}

}  // namespace

unsigned __int128 mul_shift53(uint64_t x, unsigned __int128 b) {
    // x · b = x · hi · 2^64 + x · lo, each product < 2^128 (x < 2^53, hi < 2^62); 2^64 is a multiple
    // of 2^53, so floor(x · b / 2^53) = x · hi · 2^11 + floor(x · lo / 2^53).
    using u128 = unsigned __int128;
    const uint64_t hi = static_cast<uint64_t>(b >> 64), lo = static_cast<uint64_t>(b);
    return ((static_cast<u128>(x) * hi) << 11) + ((static_cast<u128>(x) * lo) >> 53);
}

namespace {

// The first id whose running sum of w(i) exceeds floor(x · total / 2^53); -1 when total is 0.
template <class F>
int32_t walk(int64_t V, unsigned __int128 total, uint64_t x, F&& w) {
    if (total == 0) return -1;
    const unsigned __int128 t = mul_shift53(x, total);
    unsigned __int128 acc = 0;
    for (int64_t i = 0; i < V; ++i)
        if ((acc += w(i)) > t) return static_cast<int32_t>(i);
    return -1;   // unreachable: t < total
}

uint64_t mass(const uint64_t* W, int64_t V) {
    uint64_t M = 0;
    for (int64_t i = 0; i < V; ++i) {
        if (W[i] >= (uint64_t{1} << 63) - M) fail("speculative: a distribution's weights reach 2^63");
        M += W[i];
    }
    return M;
}

}  // namespace

int32_t spec_draw(const uint64_t* W, int64_t V, uint64_t x) {
    return walk(V, mass(W, V), x, [&](int64_t i) { return static_cast<unsigned __int128>(W[i]); });
}

bool spec_accepts(uint64_t wp, uint64_t Mp, uint64_t wq, uint64_t Mq, uint64_t x) {
    using u128 = unsigned __int128;
    return mul_shift53(x, static_cast<u128>(Mp) * wq) < static_cast<u128>(wp) * Mq;
}

int32_t spec_residual(const uint64_t* Wp, const uint64_t* Wq, int64_t V, uint64_t x) {
    using u128 = unsigned __int128;
    const uint64_t Mp = mass(Wp, V), Mq = mass(Wq, V);
    auto r = [&](int64_t i) -> u128 {
        const u128 a = static_cast<u128>(Wp[i]) * Mq, b = static_cast<u128>(Wq[i]) * Mp;
        return a > b ? a - b : 0;
    };
    u128 total = 0;
    for (int64_t i = 0; i < V; ++i) total += r(i);
    return walk(V, total, x, r);
}

StateCheckpoint checkpoint_state(const SequenceState& st) {
    StateCheckpoint cp;
    cp.n_past = st.n_past;
    cp.layers.reserve(st.layers.size());
    for (const LayerState& l : st.layers)
        cp.layers.push_back({l.window, l.n_window, checkpoint_comp(l.comp), checkpoint_comp(l.index_comp)});
    cp.mtp = st.mtp;
    return cp;
}

void restore_state(SequenceState& st, const StateCheckpoint& cp) {
    if (st.layers.size() != cp.layers.size())
        fail("restore_state: the checkpoint has ", cp.layers.size(), " layers, the state ", st.layers.size());
    if (st.n_past < cp.n_past)
        fail("restore_state: the state has ", st.n_past, " positions, fewer than the checkpoint's ", cp.n_past);
    for (size_t l = 0; l < st.layers.size(); ++l) {
        LayerState& s = st.layers[l];
        const LayerCheckpoint& c = cp.layers[l];
        restore_comp(s.comp, c.comp);
        restore_comp(s.index_comp, c.index_comp);
        s.window = c.window;
        s.n_window = c.n_window;
    }
    st.mtp = cp.mtp;
    st.n_past = cp.n_past;
}

namespace {

void check_options(const Model& m, const SpeculativeOptions& o) {
    const ModelConfig& c = m.cfg;
    const int64_t K = o.draft_tokens;
    if (K < 0 || K > kMaxSpeculativeTokens)
        fail("--speculative-tokens must be in 1..", kMaxSpeculativeTokens, " (0: off), got ", K);
    if (K > 0 && !m.w.mtp)
        fail("--speculative-tokens needs the checkpoint's multi-token-prediction block (mtp.0.* tensors); "
             "this checkpoint has none");
    if (K + 1 > c.sliding_window - 1)
        fail("--speculative-tokens ", K, ": a verification step of ", K + 1, " tokens must fit the sliding window (",
             c.sliding_window, ")");
    if (o.chunk < 0) fail("generate: chunk size must be >= 0, got ", o.chunk);
    if (o.sampling && (!o.sampling->weights || !o.sampling->bits))
        fail("generate: sampling needs both weights and random bits");
}

}  // namespace

SpeculativeResult generate_speculative(const Model& m, const std::vector<int32_t>& prompt, int64_t max_new,
                                       const SpeculativeOptions& o) {
    check_options(m, o);
    if (prompt.empty()) fail("generate: the prompt is empty");
    if (max_new < 0) fail("generate: max_new must be >= 0, got ", max_new);
    const int64_t P = static_cast<int64_t>(prompt.size()), limit = m.cfg.max_position_embeddings;
    if (P > limit) fail("generate: the prompt has ", P, " tokens, more than the context limit ", limit);
    if (max_new == 0) return {};
    return generate_speculative(m, prefill_speculative(m, prompt, o), max_new, o);
}

SpeculativePrefill prefill_speculative(const Model& m, const std::vector<int32_t>& prompt, const SpeculativeOptions& o) {
    check_options(m, o);
    const ModelConfig& c = m.cfg;
    const int64_t HD = c.hc_mult * c.hidden_size, K = o.draft_tokens;
    if (prompt.empty()) fail("generate: the prompt is empty");
    const int64_t P = static_cast<int64_t>(prompt.size()), limit = c.max_position_embeddings;
    if (P > limit) fail("generate: the prompt has ", P, " tokens, more than the context limit ", limit);

    SpeculativePrefill pre{SequenceState(c), prompt, {}, {}, K > 0};
    SequenceState& st = pre.state;
    // Main pre-head streams f32 [n, hc·D] of positions st.mtp.n_past .. st.n_past - 1: processed by the
    // main model, not yet by the MTP block (their next tokens are S[mtp.n_past + 1 .. n_past]).
    std::vector<float>& pending = pre.pending;
    const std::vector<int32_t>& seq = prompt;
    std::vector<float> streams, mtp_logits;
    ForwardOptions with_streams;
    with_streams.streams_out = &streams;

    // Prefill; the MTP block is fed each chunk's positions whose next token is known (all but the
    // last position of the prompt, which waits for the first new token).
    const int64_t step = o.chunk > 0 ? o.chunk : P;
    for (int64_t t = 0; t < P; t += step) {
        const int64_t n = std::min(step, P - t);
        std::vector<SequenceChunk> b{{&st, std::vector<int32_t>(prompt.begin() + t, prompt.begin() + t + n)}};
        forward(m, b, with_streams, pre.logits);
        if (K == 0) continue;   // no MTP block to feed
        pending.insert(pending.end(), streams.begin(), streams.end());
        const int64_t known = std::min(t + n, P - 1) - st.mtp.n_past;   // positions with their next token
        if (known > 0) {
            std::vector<MtpChunk> mb{{&st, pending.data(), std::vector<int32_t>(seq.begin() + st.mtp.n_past + 1,
                                                                                seq.begin() + st.mtp.n_past + 1 + known)}};
            mtp_forward(m, mb, ForwardOptions{}, mtp_logits);
            pending.erase(pending.begin(), pending.begin() + known * HD);
        }
    }
    return pre;
}

SpeculativeResult generate_speculative(const Model& m, const SpeculativePrefill& from, int64_t max_new,
                                       const SpeculativeOptions& o) {
    check_options(m, o);
    const ModelConfig& c = m.cfg;
    const int64_t V = c.vocab_size, HD = c.hc_mult * c.hidden_size;   // HD: one position's streams [hc·D]
    const int64_t K = o.draft_tokens;
    if (from.mtp_fed != (K > 0))
        fail("generate_speculative: the prefill was made for ", from.mtp_fed ? "drafts" : "no drafts",
             ", the options ask for ", K, " draft tokens");
    if (max_new < 0) fail("generate: max_new must be >= 0, got ", max_new);
    const int64_t limit = c.max_position_embeddings;

    SpeculativeResult res;
    std::vector<int32_t>& out = res.tokens;
    SpeculativeStats& stats = res.stats;
    if (max_new == 0) return res;
    const bool greedy = o.sampling == nullptr;
    auto is_eos = [&](int32_t id) { return !o.ignore_eos && id == c.eos_token_id; };

    std::vector<uint64_t> p;   // [V] the main model's weights (sampling only)
    // The main model's token from a logits row [V]: argmax, or a draw from p with `stream`.
    auto main_token = [&](const float* logits, SpecStream stream, int64_t index) {
        if (greedy) return argmax(logits, V);
        o.sampling->weights(logits, V, p);
        return spec_draw(p.data(), V, o.sampling->bits(stream, index));
    };
    auto total_of = [&](const std::vector<uint64_t>& W) {
        uint64_t M = 0;
        for (uint64_t w : W) M += w;   // < 2^63 (spec_draw checked it)
        return M;
    };

    SequenceState st = from.state;
    std::vector<float> pending = from.pending;   // see prefill_speculative
    std::vector<int32_t> seq(from.prompt);      // S: every accepted token
    std::vector<float> logits, streams, mtp_logits, mtp_streams;
    out.push_back(main_token(from.logits.data(), SpecStream::sample, 0));
    seq.push_back(out.back());

    ForwardOptions verify_opt;
    verify_opt.all_logits = true;
    verify_opt.streams_out = &streams;
    ForwardOptions mtp_opt;
    mtp_opt.streams_out = &mtp_streams;
    while (static_cast<int64_t>(out.size()) < max_new && !is_eos(out.back())) {
        const int64_t L = static_cast<int64_t>(seq.size());   // the main model has processed L - 1 positions
        if (L > limit) break;                                  // feeding S[L-1] would pass the context
        const int64_t k = std::min(K, limit - L);              // this round's drafts: positions up to L-1+k
        const int64_t index = static_cast<int64_t>(out.size());   // output index of the round's first new token

        // 1. Draft: catch the MTP block up to position L-2 (real streams, accepted tokens), then chain.
        std::vector<int32_t> drafts;       // [k]
        std::vector<std::vector<uint64_t>> qs;   // [k][V] draft weights (sampling)
        if (k > 0) {
            const int64_t n_catch = st.n_past - st.mtp.n_past;   // >= 1: position L-2 at least
            std::vector<MtpChunk> mb{{&st, pending.data(), std::vector<int32_t>(seq.begin() + st.mtp.n_past + 1,
                                                                                seq.begin() + st.mtp.n_past + 1 + n_catch)}};
            mtp_forward(m, mb, mtp_opt, mtp_logits);   // the last row: position L-2, token S[L-1]
            pending.clear();
            // Chained drafts run on a scratch state: the MTP state copied, the main model's part unused
            // (n_past only tells mtp_forward which positions have streams: here the block's own).
            SequenceState scratch(c);
            scratch.mtp = st.mtp;
            std::vector<float> h(mtp_streams.end() - HD, mtp_streams.end());   // f32 [hc·D] of the last row
            for (int64_t i = 0; i < k; ++i) {
                if (i > 0) {
                    scratch.n_past = scratch.mtp.n_past + 1;
                    std::vector<MtpChunk> cb{{&scratch, h.data(), {drafts.back()}}};
                    mtp_forward(m, cb, mtp_opt, mtp_logits);
                    h = mtp_streams;
                }
                if (greedy) {
                    drafts.push_back(argmax(mtp_logits.data(), V));
                } else {
                    qs.emplace_back();
                    o.sampling->weights(mtp_logits.data(), V, qs.back());
                    drafts.push_back(spec_draw(qs.back().data(), V, o.sampling->bits(SpecStream::draft, index + i)));
                }
            }
        }

        // 2. Verify x = S[L-1] and the drafts in one forward: logits row i is p_i.
        const StateCheckpoint before = checkpoint_state(st);
        std::vector<int32_t> fed{seq.back()};
        fed.insert(fed.end(), drafts.begin(), drafts.end());
        std::vector<SequenceChunk> vb{{&st, fed}};
        forward(m, vb, verify_opt, logits);   // logits f32 [k+1, V], streams f32 [k+1, hc·D]
        ++stats.rounds;
        stats.drafted += k;

        // 3. Accept.
        std::vector<int32_t> got;   // this round's new tokens
        int64_t j = 0;              // accepted drafts
        while (j < k) {
            const float* row = logits.data() + j * V;
            const int32_t d = drafts[static_cast<size_t>(j)];
            bool ok = o.rule == AcceptRule::always_accept;
            if (!ok && greedy) {
                ok = d == argmax(row, V);
            } else if (!ok) {
                o.sampling->weights(row, V, p);
                const std::vector<uint64_t>& qj = qs[static_cast<size_t>(j)];
                ok = spec_accepts(p[static_cast<size_t>(d)], total_of(p), qj[static_cast<size_t>(d)], total_of(qj),
                                  o.sampling->bits(SpecStream::accept, index + j));
            }
            if (!ok) break;
            got.push_back(d);
            ++j;
            if (is_eos(d)) break;
        }
        const bool stopped_on_eos = !got.empty() && is_eos(got.back());
        if (!stopped_on_eos) {
            const float* row = logits.data() + j * V;
            if (j == k) {
                got.push_back(main_token(row, SpecStream::sample, index + j));   // every draft accepted: bonus
            } else if (greedy) {
                got.push_back(argmax(row, V));                                   // the main model's token
            } else {
                o.sampling->weights(row, V, p);   // p_j; draw from normalize(max(0, p - q))
                const int32_t id = spec_residual(p.data(), qs[static_cast<size_t>(j)].data(), V,
                                                 o.sampling->bits(SpecStream::residual, index + j));
                if (id < 0) fail("speculative: internal error: a rejected draft with p == q");
                got.push_back(id);
            }
        }
        stats.accepted += j;
        stats.round_tokens += static_cast<int64_t>(got.size());

        // 4. Keep x and the j accepted drafts in the main state; their streams go to the MTP block.
        const int64_t keep = j + 1;
        if (keep < k + 1) {
            restore_state(st, before);
            std::vector<SequenceChunk> rb{{&st, std::vector<int32_t>(fed.begin(), fed.begin() + keep)}};
            std::vector<float> unused;
            forward(m, rb, ForwardOptions{}, unused);
            ++stats.rerun_steps;
        }
        if (K > 0) pending.insert(pending.end(), streams.begin(), streams.begin() + keep * HD);
        for (int32_t id : got) {
            if (static_cast<int64_t>(out.size()) == max_new) break;
            out.push_back(id);
            seq.push_back(id);
            if (is_eos(id)) break;
        }
        if (static_cast<int64_t>(out.size()) < max_new && !is_eos(out.back()) &&
            static_cast<int64_t>(seq.size()) != st.n_past + 1)
            fail("speculative: internal error: ", seq.size(), " tokens accepted, the main model at ", st.n_past);
    }
    return res;
}

void resolve_next_tokens(const int32_t* given, const int32_t* drawn, int64_t T, int32_t* out) {
    for (int64_t t = 0; t < T; ++t) out[t] = given[t] >= 0 ? given[t] : drawn[-1 - static_cast<int64_t>(given[t])];
}

}  // namespace megamoe
