// model.cpp — the DeepSeek-V4 network, top to bottom, over a batch of independent sequences.
//
// embed → 4 streams → per layer { mHC pre → attn_norm → attention (window + compressed rows,
// sink) → mHC post → mHC pre → ffn_norm → router → routed + shared experts → mHC post } →
// HC head → norm → head. Token-parallel work (linears, norms, MoE) runs on the whole batch;
// what depends on a sequence's history (window, compressors, indexer, attention) runs per chunk.
#include "ref/model.h"

#include <algorithm>
#include <cmath>

#include "core/parallel.h"

namespace megamoe {

using Buf = std::vector<float>;

std::unique_ptr<Model> Model::load(const std::string& dir, const std::function<void(size_t, size_t)>& progress) {
    auto m = std::make_unique<Model>();
    m->cfg = load_model_config(dir);
    m->checkpoint = std::make_unique<Checkpoint>(dir);
    m->w = bind_weights(m->cfg, *m->checkpoint, progress);
    m->rope_main = ops::make_rope_table(m->cfg.rope_theta, m->cfg.qk_rope_head_dim, nullptr);
    m->rope_compress = ops::make_rope_table(m->cfg.compress_rope_theta, m->cfg.qk_rope_head_dim, &m->cfg.yarn);
    return m;
}

namespace {

struct BatchLayout {
    std::vector<int64_t> offset;   // [n_chunks + 1] first token of each chunk in the flat batch
    std::vector<int64_t> pos;      // [T] absolute positions
    std::vector<int32_t> tokens;   // [T]
    int64_t T = 0;
};

// Feed one sequence's new tokens to a compressor; emits a row each time a window of r closes.
// kv, gate: [n, coff·d] projections of the new tokens (gate without the position bias).
void compressor_feed(const Compressor& w, const ModelConfig& c, const ops::RopeTable& rope, bool indexer_keys,
                     const float* kv, const float* gate, const int64_t* pos, int64_t n, CompressorState& st) {
    const int64_t r = w.ratio, d = w.dim, width = (w.overlap ? 2 : 1) * d;
    const float* ape = w.ape.as<float>();
    for (int64_t i = 0; i < n; ++i) {
        st.pending_kv.insert(st.pending_kv.end(), kv + i * width, kv + (i + 1) * width);
        for (int64_t f = 0; f < width; ++f) st.pending_gate.push_back(gate[i * width + f] + ape[(pos[i] % r) * width + f]);
        ++st.n_pending;
    }
    std::vector<const float*> kv_slots, gate_slots;
    Buf row(static_cast<size_t>(d));
    while (st.n_pending >= r) {
        kv_slots.clear();
        gate_slots.clear();
        if (w.overlap) {
            // Row w pools series A of window w-1 (absent before the first window: weight 0)
            // and series B of window w, per channel, in one softmax over 2r slots.
            for (int64_t s = 0; s < r && !st.prev_kv.empty(); ++s) {
                kv_slots.push_back(st.prev_kv.data() + s * d);
                gate_slots.push_back(st.prev_gate.data() + s * d);
            }
            for (int64_t s = 0; s < r; ++s) {
                kv_slots.push_back(st.pending_kv.data() + s * width + d);
                gate_slots.push_back(st.pending_gate.data() + s * width + d);
            }
        } else {
            for (int64_t s = 0; s < r; ++s) {
                kv_slots.push_back(st.pending_kv.data() + s * width);
                gate_slots.push_back(st.pending_gate.data() + s * width);
            }
        }
        ops::compress_pool(kv_slots.data(), gate_slots.data(), static_cast<int64_t>(kv_slots.size()), d, row.data());
        ops::rms_norm(row.data(), 1, d, &w.norm, static_cast<float>(c.rms_norm_eps), row.data());
        const int64_t first_pos = st.n_rows * r;   // rows are rotated at their window's first token
        ops::rope(row.data(), 1, 1, d, &first_pos, rope, false);
        if (indexer_keys)
            ops::round_indexer_qk(row.data(), 1, d);
        else
            ops::round_kv_latent(row.data(), 1, d, rope.rope_dim);
        st.rows.insert(st.rows.end(), row.begin(), row.end());
        ++st.n_rows;
        if (w.overlap) {
            st.prev_kv.resize(static_cast<size_t>(r * d));
            st.prev_gate.resize(static_cast<size_t>(r * d));
            for (int64_t s = 0; s < r; ++s) {
                std::copy_n(st.pending_kv.data() + s * width, d, st.prev_kv.data() + s * d);
                std::copy_n(st.pending_gate.data() + s * width, d, st.prev_gate.data() + s * d);
            }
        }
        st.pending_kv.erase(st.pending_kv.begin(), st.pending_kv.begin() + r * width);
        st.pending_gate.erase(st.pending_gate.begin(), st.pending_gate.begin() + r * width);
        st.n_pending -= r;
    }
}

// Everything the attention of one layer computes token-parallel over the batch.
struct AttnInputs {
    Buf q;            // [T, H, hd]   normalized per head, rotated
    Buf kv;           // [T, hd]      the K=V latent, normalized, rotated
    Buf comp_kv;      // [T, coff·hd] compressor projections
    Buf comp_gate;
    Buf idx_kv;       // [T, 2·dI]    indexer compressor projections (CSA)
    Buf idx_gate;
    Buf idx_q;        // [T, nI, dI]  indexer queries, rotated
    Buf idx_w;        // [T, nI]      indexer head weights · nI^-0.5
};

AttnInputs attention_inputs(const Model& m, const AttentionWeights& a, const BatchLayout& B, const float* x) {
    const ModelConfig& c = m.cfg;
    const int64_t T = B.T, H = c.num_attention_heads, hd = c.head_dim;
    const float eps = static_cast<float>(c.rms_norm_eps);
    const ops::RopeTable& rope = a.kind == AttnKind::sliding ? m.rope_main : m.rope_compress;
    AttnInputs in;
    Buf qr(static_cast<size_t>(T * c.q_lora_rank));   // the q latent, also the indexer's input
    ops::linear(a.wq_a, x, T, qr.data());
    ops::rms_norm(qr.data(), T, c.q_lora_rank, &a.q_norm, eps, qr.data());
    in.q.resize(static_cast<size_t>(T * H * hd));
    ops::linear(a.wq_b, qr.data(), T, in.q.data());
    ops::rms_norm(in.q.data(), T * H, hd, nullptr, eps, in.q.data());
    ops::rope(in.q.data(), T, H, hd, B.pos.data(), rope, false);
    in.kv.resize(static_cast<size_t>(T * hd));
    ops::linear(a.wkv, x, T, in.kv.data());
    ops::rms_norm(in.kv.data(), T, hd, &a.kv_norm, eps, in.kv.data());
    ops::rope(in.kv.data(), T, 1, hd, B.pos.data(), rope, false);
    ops::round_kv_latent(in.kv.data(), T, hd, c.qk_rope_head_dim);
    if (a.kind == AttnKind::sliding) return in;
    in.comp_kv.resize(static_cast<size_t>(T * a.compressor.wkv.out));
    in.comp_gate.resize(in.comp_kv.size());
    ops::linear(a.compressor.wkv, x, T, in.comp_kv.data());
    ops::linear(a.compressor.wgate, x, T, in.comp_gate.data());
    if (a.kind != AttnKind::csa) return in;
    const int64_t nI = c.index_n_heads, dI = c.index_head_dim;
    in.idx_kv.resize(static_cast<size_t>(T * a.indexer.compressor.wkv.out));
    in.idx_gate.resize(in.idx_kv.size());
    ops::linear(a.indexer.compressor.wkv, x, T, in.idx_kv.data());
    ops::linear(a.indexer.compressor.wgate, x, T, in.idx_gate.data());
    in.idx_q.resize(static_cast<size_t>(T * nI * dI));
    ops::linear(a.indexer.wq_b, qr.data(), T, in.idx_q.data());
    ops::rope(in.idx_q.data(), T, nI, dI, B.pos.data(), m.rope_compress, false);
    ops::round_indexer_qk(in.idx_q.data(), T * nI, dI);
    in.idx_w.resize(static_cast<size_t>(T * nI));
    ops::linear(a.indexer.weights_proj, x, T, in.idx_w.data());
    const float w_scale = 1.0f / std::sqrt(static_cast<float>(nI));
    for (float& v : in.idx_w) v *= w_scale;
    return in;
}

// Attention of one chunk's tokens: each query sees its window (sliding_window keys, itself
// included), then the compressed rows it may see (w < (p+1)/r): all of them (HCA) or the
// indexer's top-k (CSA); one softmax with the sink over both.
void attend_chunk(const Model& m, const AttentionWeights& a, const AttnInputs& in, const BatchLayout& B, int64_t t0,
                  int64_t n, LayerState& st, float* o) {
    const ModelConfig& c = m.cfg;
    const int64_t H = c.num_attention_heads, hd = c.head_dim, W = c.sliding_window;
    const int64_t ratio = a.kind == AttnKind::sliding ? 0 : a.compressor.ratio;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    // The window keys: stored rows (positions p0 - n_window ...) then this chunk's rows.
    const int64_t p0 = B.pos[static_cast<size_t>(t0)], ext_start = p0 - st.n_window;
    std::vector<const float*> ext(static_cast<size_t>(st.n_window + n));
    for (int64_t i = 0; i < st.n_window; ++i) ext[static_cast<size_t>(i)] = st.window.data() + i * hd;
    for (int64_t i = 0; i < n; ++i) ext[static_cast<size_t>(st.n_window + i)] = in.kv.data() + (t0 + i) * hd;

    parallel_for(n, [&](int64_t i) {
        const int64_t t = t0 + i, p = B.pos[static_cast<size_t>(t)];
        std::vector<const float*> keys;
        for (int64_t q = std::max<int64_t>(0, p - W + 1); q <= p; ++q) keys.push_back(ext[static_cast<size_t>(q - ext_start)]);
        const int64_t n_vis = ratio ? (p + 1) / ratio : 0;
        if (a.kind == AttnKind::hca) {
            for (int64_t w = 0; w < n_vis; ++w) keys.push_back(st.comp.rows.data() + w * hd);
        } else if (a.kind == AttnKind::csa && n_vis > 0) {
            const int64_t nI = c.index_n_heads, dI = c.index_head_dim;
            Buf score(static_cast<size_t>(n_vis));
            ops::indexer_scores(in.idx_q.data() + t * nI * dI, in.idx_w.data() + t * nI, nI, dI,
                                st.index_comp.rows.data(), n_vis, score.data());
            for (int32_t w : ops::topk_indices(score.data(), n_vis, c.index_topk))
                keys.push_back(st.comp.rows.data() + w * hd);
        }
        ops::attend_one(in.q.data() + t * H * hd, H, hd, keys.data(), static_cast<int64_t>(keys.size()),
                        a.attn_sink.as<float>(), scale, o + t * H * hd);
    }, H * hd * (W + c.index_topk));
    // Keep the last W-1 rows: the keys the next tokens still see besides themselves.
    const int64_t total = st.n_window + n, keep = std::min(W - 1, total);
    Buf window(static_cast<size_t>(keep * hd));
    for (int64_t i = 0; i < keep; ++i) std::copy_n(ext[static_cast<size_t>(total - keep + i)], hd, window.data() + i * hd);
    st.window.swap(window);
    st.n_window = keep;
}

void attention_layer(const Model& m, int64_t l, const BatchLayout& B, std::vector<SequenceChunk>& batch,
                     const float* x, float* out) {
    const ModelConfig& c = m.cfg;
    const AttentionWeights& a = m.w.layers[static_cast<size_t>(l)].attn;
    const int64_t T = B.T, H = c.num_attention_heads, hd = c.head_dim;
    const ops::RopeTable& rope = a.kind == AttnKind::sliding ? m.rope_main : m.rope_compress;
    AttnInputs in = attention_inputs(m, a, B, x);
    Buf o(static_cast<size_t>(T * H * hd));
    for (size_t s = 0; s < batch.size(); ++s) {
        const int64_t t0 = B.offset[s], n = B.offset[s + 1] - t0;
        LayerState& st = batch[s].state->layers[static_cast<size_t>(l)];
        if (a.kind != AttnKind::sliding) {
            const int64_t cw = a.compressor.wkv.out;
            compressor_feed(a.compressor, c, m.rope_compress, false, in.comp_kv.data() + t0 * cw,
                            in.comp_gate.data() + t0 * cw, B.pos.data() + t0, n, st.comp);
        }
        if (a.kind == AttnKind::csa) {
            const int64_t iw = a.indexer.compressor.wkv.out;
            compressor_feed(a.indexer.compressor, c, m.rope_compress, true, in.idx_kv.data() + t0 * iw,
                            in.idx_gate.data() + t0 * iw, B.pos.data() + t0, n, st.index_comp);
        }
        attend_chunk(m, a, in, B, t0, n, st, o.data());
    }
    // V = K carries rotated dims: undo the rotation at the query position, then project.
    ops::rope(o.data(), T, H, hd, B.pos.data(), rope, true);
    Buf z(static_cast<size_t>(T * c.o_groups * c.o_lora_rank));
    ops::grouped_linear(a.wo_a, c.o_groups, o.data(), T, z.data());
    ops::linear(a.wo_b, z.data(), T, out);
}

void moe_layer(const Model& m, int64_t l, const BatchLayout& B, const float* x, float* out) {
    const ModelConfig& c = m.cfg;
    const MoeWeights& f = m.w.layers[static_cast<size_t>(l)].ffn;
    std::vector<int32_t> ids(static_cast<size_t>(B.T * c.num_experts_per_tok));
    Buf wts(ids.size());
    if (f.router == RouterKind::hash)
        ops::route_hash(f, c, x, B.tokens.data(), B.T, ids.data(), wts.data());
    else
        ops::route_score(f, c, x, B.T, ids.data(), wts.data());
    ops::moe(f, c, x, B.T, ids.data(), wts.data(), out);
}

BatchLayout layout_batch(const ModelConfig& c, const std::vector<SequenceChunk>& batch) {
    BatchLayout B;
    B.offset.push_back(0);
    for (size_t s = 0; s < batch.size(); ++s) {
        const SequenceChunk& ch = batch[s];
        if (!ch.state) fail("forward: chunk ", s, " has no sequence state");
        if (static_cast<int64_t>(ch.state->layers.size()) != c.num_hidden_layers)
            fail("forward: chunk ", s, " has a state for another model");
        if (ch.tokens.empty()) fail("forward: chunk ", s, " has no tokens");
        const int64_t end = ch.state->n_past + static_cast<int64_t>(ch.tokens.size());
        if (end > c.max_position_embeddings)
            fail("forward: sequence ", s, " would reach ", end, " tokens, past max_position_embeddings ",
                 c.max_position_embeddings);
        for (size_t i = 0; i < ch.tokens.size(); ++i) {
            const int32_t id = ch.tokens[i];
            if (id < 0 || id >= c.vocab_size)
                fail("forward: token id ", id, " (sequence ", s, ", index ", i, ") is outside the vocabulary [0, ",
                     c.vocab_size, ")");
            B.tokens.push_back(id);
            B.pos.push_back(ch.state->n_past + static_cast<int64_t>(i));
        }
        B.offset.push_back(static_cast<int64_t>(B.tokens.size()));
    }
    B.T = static_cast<int64_t>(B.tokens.size());
    return B;
}

}  // namespace

void forward(const Model& m, std::vector<SequenceChunk>& batch, const ForwardOptions& opt, std::vector<float>& logits) {
    const ModelConfig& c = m.cfg;
    const BatchLayout B = layout_batch(c, batch);   // validates before any state changes
    const int64_t T = B.T, D = c.hidden_size, hc = c.hc_mult;
    const float eps = static_cast<float>(c.rms_norm_eps);
    auto trace = [&](const char* name, int64_t layer, const Buf& v, int64_t width) {
        if (opt.trace) opt.trace(name, layer, v.data(), T, width);
    };

    Buf h(static_cast<size_t>(T * D));
    ops::embed(m.w.embed, B.tokens.data(), T, h.data());
    Buf X(static_cast<size_t>(T * hc * D)), X2(X.size());   // [T, hc, D] residual streams
    for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < hc; ++j) std::copy_n(h.data() + t * D, D, X.data() + (t * hc + j) * D);

    Buf u(static_cast<size_t>(T * D)), xn(u.size()), y(u.size());
    Buf post(static_cast<size_t>(T * hc)), comb(static_cast<size_t>(T * hc * hc));
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
        const BlockWeights& blk = m.w.layers[static_cast<size_t>(l)];
        trace(trace_names::streams, l, X, hc * D);

        ops::hc_pre(blk.hc_attn, c, X.data(), T, u.data(), post.data(), comb.data());
        ops::rms_norm(u.data(), T, D, &blk.attn_norm, eps, xn.data());
        trace(trace_names::attn_in, l, xn, D);
        attention_layer(m, l, B, batch, xn.data(), y.data());
        trace(trace_names::attn_out, l, y, D);
        ops::hc_post(y.data(), X.data(), post.data(), comb.data(), T, hc, D, X2.data());
        X.swap(X2);

        ops::hc_pre(blk.hc_ffn, c, X.data(), T, u.data(), post.data(), comb.data());
        ops::rms_norm(u.data(), T, D, &blk.ffn_norm, eps, xn.data());
        trace(trace_names::ffn_in, l, xn, D);
        moe_layer(m, l, B, xn.data(), y.data());
        trace(trace_names::ffn_out, l, y, D);
        ops::hc_post(y.data(), X.data(), post.data(), comb.data(), T, hc, D, X2.data());
        X.swap(X2);
    }

    ops::hc_head(m.w.hc_head, c, X.data(), T, u.data());
    ops::rms_norm(u.data(), T, D, &m.w.norm, eps, xn.data());
    trace(trace_names::final_norm, c.num_hidden_layers, xn, D);

    // Logits for every token, or for the last token of each chunk.
    std::vector<int64_t> rows;
    for (size_t s = 0; s < batch.size(); ++s) {
        if (opt.all_logits)
            for (int64_t t = B.offset[s]; t < B.offset[s + 1]; ++t) rows.push_back(t);
        else
            rows.push_back(B.offset[s + 1] - 1);
    }
    Buf sel(rows.size() * static_cast<size_t>(D));
    for (size_t i = 0; i < rows.size(); ++i) std::copy_n(xn.data() + rows[i] * D, D, sel.data() + i * D);
    logits.resize(rows.size() * static_cast<size_t>(c.vocab_size));
    ops::linear(m.w.head, sel.data(), static_cast<int64_t>(rows.size()), logits.data());

    for (auto& ch : batch) ch.state->n_past += static_cast<int64_t>(ch.tokens.size());
}

}  // namespace megamoe
