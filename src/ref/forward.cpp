// forward.cpp — the DeepSeek-V4 network, top to bottom, over a batch of independent sequences.
//
// embed → hc streams → per layer { mHC pre → attn_norm → attention (window + compressed rows,
// sink) → mHC post → mHC pre → ffn_norm → router → routed + shared experts → mHC post } →
// HC head → norm → head. Token-parallel work (linears, norms, MoE) runs on the whole batch;
// what depends on a sequence's history (window, compressors, indexer, attention) runs per chunk.
// The attention of a layer is split at the same boundaries as the GPU kernels (cuda/attention.h,
// cuda/compressor.h): inputs, compressors, indexer top-k, attention, window update.
#include <algorithm>
#include <cmath>

#include "core/parallel.h"
#include "ref/compressor.h"
#include "ref/model.h"

namespace megamoe {

namespace {

using Buf = std::vector<float>;

struct BatchLayout {
    std::vector<int64_t> offset;   // [n_chunks + 1] first token of each chunk in the flat batch
    std::vector<int64_t> pos;      // [T] absolute positions
    std::vector<int32_t> tokens;   // [T]
    int64_t T = 0;
};

// Calls the probe on a host buffer; returns true when the probe overwrote it.
bool probe(const ForwardOptions& opt, const char* name, int64_t layer, DType dtype, void* data, int64_t rows,
           int64_t width) {
    if (!opt.probe) return false;
    TraceView v;
    v.name = name, v.layer = layer, v.dtype = dtype, v.data = data, v.rows = rows, v.width = width;
    opt.probe(v);
    return v.modified;
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

AttnInputs attention_inputs(const Model& m, const AttentionWeights& a, const ops::RopeTable& rope,
                            const BatchLayout& B, const float* x) {
    const ModelConfig& c = m.cfg;
    const Numerics nm = m.numerics;
    const int64_t T = B.T, H = c.num_attention_heads, hd = c.head_dim;
    const float eps = static_cast<float>(c.rms_norm_eps);
    AttnInputs in;
    Buf qr(static_cast<size_t>(T * c.q_lora_rank));   // the q latent, also the indexer's input
    ops::linear_rounded(nm, a.wq_a, x, T, qr.data());
    ops::rms_norm(qr.data(), T, c.q_lora_rank, &a.q_norm, eps, qr.data());
    ops::round_bf16(nm, qr.data(), T * c.q_lora_rank);
    in.q.resize(static_cast<size_t>(T * H * hd));
    ops::linear_rounded(nm, a.wq_b, qr.data(), T, in.q.data());
    if (nm == Numerics::official)
        ops::head_rms_norm_bf16(in.q.data(), T * H, hd, eps);   // the official code normalizes q in bf16
    else
        ops::rms_norm(in.q.data(), T * H, hd, nullptr, eps, in.q.data());
    ops::rope(in.q.data(), T, H, hd, B.pos.data(), rope, false);
    ops::round_bf16(nm, in.q.data(), T * H * hd);
    in.kv.resize(static_cast<size_t>(T * hd));
    ops::linear_rounded(nm, a.wkv, x, T, in.kv.data());
    ops::rms_norm(in.kv.data(), T, hd, &a.kv_norm, eps, in.kv.data());
    ops::round_bf16(nm, in.kv.data(), T * hd);
    ops::rope(in.kv.data(), T, 1, hd, B.pos.data(), rope, false);
    ops::round_bf16(nm, in.kv.data(), T * hd);
    ops::round_kv_latent(nm, in.kv.data(), T, hd, c.qk_rope_head_dim);
    if (a.kind == AttnKind::sliding) return in;
    // The compressors' projections are f32 in the official code too (weights upcast, x.float()).
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
    ops::linear_rounded(nm, a.indexer.wq_b, qr.data(), T, in.idx_q.data());
    ops::rope(in.idx_q.data(), T, nI, dI, B.pos.data(), m.rope_compress, false);
    ops::round_bf16(nm, in.idx_q.data(), T * nI * dI);
    ops::round_indexer_qk(nm, in.idx_q.data(), T * nI, dI);
    in.idx_w.resize(static_cast<size_t>(T * nI));
    ops::linear_rounded(nm, a.indexer.weights_proj, x, T, in.idx_w.data());
    if (nm == Numerics::official) {
        // weights_proj(x) · (dI^-0.5 · nI^-0.5) in bf16; indexer_scores_bf16 takes both scales here.
        const float w_scale = 1.0f / std::sqrt(static_cast<float>(dI)) / std::sqrt(static_cast<float>(nI));
        for (float& v : in.idx_w) v = ops::bf16_round(v * w_scale);
    } else {
        const float w_scale = 1.0f / std::sqrt(static_cast<float>(nI));
        for (float& v : in.idx_w) v *= w_scale;
    }
    return in;
}

// Window keys of a query at position p in a chunk that starts at p0: positions
// [max(0, p - W + 1), p], the older ones from the state's window (rows for positions
// p0 - n_window .. p0 - 1), the newer from this chunk's kv rows.
void window_keys(const LayerState& st, const float* chunk_kv, int64_t hd, int64_t W, int64_t p0, int64_t p,
                 std::vector<const float*>& keys) {
    for (int64_t q = std::max<int64_t>(0, p - W + 1); q <= p; ++q)
        keys.push_back(q >= p0 ? chunk_kv + (q - p0) * hd : st.window.data() + (q - (p0 - st.n_window)) * hd);
}

// The indexer's choice for the chunk's tokens: topk[i, :] = ascending rows of the k best
// scores among the n_vis = (p+1)/r visible indexer keys, -1 past min(k, n_vis).
void index_topk(const Model& m, const AttnInputs& in, const BatchLayout& B, int64_t t0, int64_t n, int64_t ratio,
                const LayerState& st, int32_t* topk) {
    const ModelConfig& c = m.cfg;
    const int64_t nI = c.index_n_heads, dI = c.index_head_dim, K = c.index_topk;
    parallel_for(n, [&](int64_t i) {
        const int64_t t = t0 + i, p = B.pos[static_cast<size_t>(t)], n_vis = (p + 1) / ratio;
        int32_t* out = topk + t * K;
        std::fill(out, out + K, -1);
        if (n_vis == 0) return;
        Buf score(static_cast<size_t>(n_vis));
        if (m.numerics == Numerics::official)
            ops::indexer_scores_bf16(in.idx_q.data() + t * nI * dI, in.idx_w.data() + t * nI, nI, dI,
                                     st.index_comp.rows.data(), n_vis, score.data());
        else
            ops::indexer_scores(in.idx_q.data() + t * nI * dI, in.idx_w.data() + t * nI, nI, dI,
                                st.index_comp.rows.data(), n_vis, score.data());
        const std::vector<int32_t> top = ops::topk_indices(score.data(), n_vis, K);
        std::copy(top.begin(), top.end(), out);
    }, nI * dI * c.index_topk);
}

// Attention of one chunk's tokens: each query sees its window keys, then the compressed rows it
// may see (all visible rows for HCA, the indexer's rows for CSA), one softmax with the sink.
void attend_chunk(const Model& m, const AttentionWeights& a, const AttnInputs& in, const BatchLayout& B,
                  int64_t t0, int64_t n, const LayerState& st, const int32_t* topk, float* o) {
    const ModelConfig& c = m.cfg;
    const int64_t H = c.num_attention_heads, hd = c.head_dim, W = c.sliding_window;
    const int64_t ratio = a.kind == AttnKind::sliding ? 0 : a.compressor.ratio;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const int64_t p0 = B.pos[static_cast<size_t>(t0)];
    parallel_for(n, [&](int64_t i) {
        const int64_t t = t0 + i, p = B.pos[static_cast<size_t>(t)];
        std::vector<const float*> keys;
        window_keys(st, in.kv.data() + t0 * hd, hd, W, p0, p, keys);
        if (a.kind == AttnKind::hca) {
            for (int64_t w = 0; w < (p + 1) / ratio; ++w) keys.push_back(st.comp.rows.data() + w * hd);
        } else if (a.kind == AttnKind::csa) {
            for (int64_t j = 0; j < c.index_topk; ++j) {
                const int32_t w = topk[t * c.index_topk + j];
                if (w >= 0 && w < (p + 1) / ratio) keys.push_back(st.comp.rows.data() + w * hd);
            }
        }
        ops::attend_one(in.q.data() + t * H * hd, H, hd, keys.data(), static_cast<int64_t>(keys.size()),
                        a.attn_sink.as<float>(), scale, o + t * H * hd, m.numerics);
    }, H * hd * (W + c.index_topk));
}

// Keep the last W - 1 rows: the keys the next tokens still see besides themselves.
void window_update(LayerState& st, const float* chunk_kv, int64_t n, int64_t hd, int64_t W) {
    const int64_t total = st.n_window + n, keep = std::min(W - 1, total);
    Buf window(static_cast<size_t>(keep * hd));
    for (int64_t i = 0; i < keep; ++i) {
        const int64_t src = total - keep + i;   // index into [state rows ; chunk rows]
        const float* row = src < st.n_window ? st.window.data() + src * hd : chunk_kv + (src - st.n_window) * hd;
        std::copy_n(row, hd, window.data() + i * hd);
    }
    st.window.swap(window);
    st.n_window = keep;
}

// states[s]: the layer state of chunk s (a main layer of its sequence, or its MTP block).
void attention_layer(const Model& m, const AttentionWeights& a, int64_t l, const BatchLayout& B,
                     const std::vector<LayerState*>& states, const ForwardOptions& opt, const float* x, float* out) {
    const ModelConfig& c = m.cfg;
    const Numerics nm = m.numerics;
    const int64_t T = B.T, H = c.num_attention_heads, hd = c.head_dim, W = c.sliding_window;
    const ops::RopeTable& rope = m.rope_for(l);
    AttnInputs in = attention_inputs(m, a, rope, B, x);

    // Compressors first: a row that closes at a token is visible to it.
    for (size_t s = 0; s < states.size(); ++s) {
        const int64_t t0 = B.offset[s], n = B.offset[s + 1] - t0;
        LayerState& st = *states[s];
        if (a.kind != AttnKind::sliding) {
            const int64_t cw = a.compressor.wkv.out;
            compressor_feed(a.compressor, c, m.rope_compress, false, in.comp_kv.data() + t0 * cw,
                            in.comp_gate.data() + t0 * cw, B.pos.data() + t0, n, st.comp, nm);
        }
        if (a.kind == AttnKind::csa) {
            const int64_t iw = a.indexer.compressor.wkv.out;
            compressor_feed(a.indexer.compressor, c, m.rope_compress, true, in.idx_kv.data() + t0 * iw,
                            in.idx_gate.data() + t0 * iw, B.pos.data() + t0, n, st.index_comp, nm);
        }
    }
    std::vector<int32_t> topk;
    if (a.kind == AttnKind::csa) {
        topk.resize(static_cast<size_t>(T * c.index_topk));
        for (size_t s = 0; s < states.size(); ++s)
            index_topk(m, in, B, B.offset[s], B.offset[s + 1] - B.offset[s], a.compressor.ratio, *states[s],
                       topk.data());
        probe(opt, trace_names::index_topk, l, DType::i32, topk.data(), T, c.index_topk);
    }
    Buf o(static_cast<size_t>(T * H * hd));
    for (size_t s = 0; s < states.size(); ++s) {
        const int64_t t0 = B.offset[s], n = B.offset[s + 1] - t0;
        attend_chunk(m, a, in, B, t0, n, *states[s], topk.data(), o.data());
        window_update(*states[s], in.kv.data() + t0 * hd, n, hd, W);
    }
    // V = K carries rotated dims: undo the rotation at the query position, then project.
    ops::rope(o.data(), T, H, hd, B.pos.data(), rope, true);
    ops::round_bf16(nm, o.data(), T * H * hd);
    Buf z(static_cast<size_t>(T * c.o_groups * c.o_lora_rank));
    ops::grouped_linear(a.wo_a, c.o_groups, o.data(), T, z.data());   // official: a bf16 einsum (no FP8 input)
    ops::round_bf16(nm, z.data(), T * c.o_groups * c.o_lora_rank);
    ops::linear_rounded(nm, a.wo_b, z.data(), T, out);
}

void moe_layer(const Model& m, const MoeWeights& f, int64_t l, const BatchLayout& B, const ForwardOptions& opt,
               const float* x, float* out) {
    const ModelConfig& c = m.cfg;
    std::vector<int32_t> ids(static_cast<size_t>(B.T * c.num_experts_per_tok));
    Buf wts(ids.size());
    if (f.router == RouterKind::hash)
        ops::route_hash(f, c, x, B.tokens.data(), B.T, ids.data(), wts.data());
    else
        ops::route_score(f, c, x, B.T, ids.data(), wts.data());
    if (probe(opt, trace_names::expert_ids, l, DType::i32, ids.data(), B.T, c.num_experts_per_tok))
        ops::route_weights(f, c, x, B.T, ids.data(), wts.data());   // the weights of the given experts
    ops::moe(f, c, x, B.T, ids.data(), wts.data(), out, m.numerics);
}

// One V4 block on the streams X [T, hc, D] (in place): mHC pre, attention, mHC post, mHC pre, MoE,
// mHC post. Official numerics keep u, the norms' outputs and the streams in bf16.
void block_forward(const Model& m, const BlockWeights& blk, int64_t l, const BatchLayout& B,
                   const std::vector<LayerState*>& states, const ForwardOptions& opt, Buf& X) {
    const ModelConfig& c = m.cfg;
    const Numerics nm = m.numerics;
    const int64_t T = B.T, D = c.hidden_size, hc = c.hc_mult;
    const float eps = static_cast<float>(c.rms_norm_eps);
    auto trace = [&](const char* name, Buf& v, int64_t width) { probe(opt, name, l, DType::f32, v.data(), T, width); };
    Buf X2(X.size()), u(static_cast<size_t>(T * D)), xn(u.size()), y(u.size());
    Buf post(static_cast<size_t>(T * hc)), comb(static_cast<size_t>(T * hc * hc));
    trace(trace_names::streams, X, hc * D);

    ops::hc_pre(blk.hc_attn, c, X.data(), T, u.data(), post.data(), comb.data());
    ops::round_bf16(nm, u.data(), T * D);
    ops::rms_norm(u.data(), T, D, &blk.attn_norm, eps, xn.data());
    ops::round_bf16(nm, xn.data(), T * D);
    trace(trace_names::attn_in, xn, D);
    attention_layer(m, blk.attn, l, B, states, opt, xn.data(), y.data());
    trace(trace_names::attn_out, y, D);
    ops::hc_post(y.data(), X.data(), post.data(), comb.data(), T, hc, D, X2.data());
    ops::round_bf16(nm, X2.data(), T * hc * D);
    X.swap(X2);

    ops::hc_pre(blk.hc_ffn, c, X.data(), T, u.data(), post.data(), comb.data());
    ops::round_bf16(nm, u.data(), T * D);
    ops::rms_norm(u.data(), T, D, &blk.ffn_norm, eps, xn.data());
    ops::round_bf16(nm, xn.data(), T * D);
    trace(trace_names::ffn_in, xn, D);
    moe_layer(m, blk.ffn, l, B, opt, xn.data(), y.data());
    trace(trace_names::ffn_out, y, D);
    ops::hc_post(y.data(), X.data(), post.data(), comb.data(), T, hc, D, X2.data());
    ops::round_bf16(nm, X2.data(), T * hc * D);
    X.swap(X2);
}

// HC head, norm (bf16 in official numerics), then the f32 head for every token or each chunk's last.
void head_logits(const Model& m, const HyperHeadWeights& hh, const Tensor& norm, const char* norm_trace,
                 const BatchLayout& B, const ForwardOptions& opt, const Buf& X, std::vector<float>& logits) {
    const ModelConfig& c = m.cfg;
    const int64_t T = B.T, D = c.hidden_size;
    Buf u(static_cast<size_t>(T * D)), xn(u.size());
    ops::hc_head(hh, c, X.data(), T, u.data());
    ops::round_bf16(m.numerics, u.data(), T * D);
    ops::rms_norm(u.data(), T, D, &norm, static_cast<float>(c.rms_norm_eps), xn.data());
    ops::round_bf16(m.numerics, xn.data(), T * D);
    probe(opt, norm_trace, c.num_hidden_layers, DType::f32, xn.data(), T, D);

    // Logits for every token, or for the last token of each chunk.
    std::vector<int64_t> rows;
    for (size_t s = 0; s + 1 < B.offset.size(); ++s) {
        if (opt.all_logits)
            for (int64_t t = B.offset[s]; t < B.offset[s + 1]; ++t) rows.push_back(t);
        else
            rows.push_back(B.offset[s + 1] - 1);
    }
    Buf sel(rows.size() * static_cast<size_t>(D));
    for (size_t i = 0; i < rows.size(); ++i) std::copy_n(xn.data() + rows[i] * D, D, sel.data() + i * D);
    logits.resize(rows.size() * static_cast<size_t>(c.vocab_size));
    ops::linear(m.w.head, sel.data(), static_cast<int64_t>(rows.size()), logits.data());
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

    Buf h(static_cast<size_t>(T * D));
    ops::embed(m.w.embed, B.tokens.data(), T, h.data());
    Buf X(static_cast<size_t>(T * hc * D));   // [T, hc, D] residual streams
    for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < hc; ++j) std::copy_n(h.data() + t * D, D, X.data() + (t * hc + j) * D);

    std::vector<LayerState*> states(batch.size());
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
        for (size_t s = 0; s < batch.size(); ++s) states[s] = &batch[s].state->layers[static_cast<size_t>(l)];
        block_forward(m, m.w.layers[static_cast<size_t>(l)], l, B, states, opt, X);
    }
    if (opt.streams_out) *opt.streams_out = X;
    head_logits(m, m.w.hc_head, m.w.norm, trace_names::final_norm, B, opt, X, logits);

    for (auto& ch : batch) ch.state->n_past += static_cast<int64_t>(ch.tokens.size());
}

void mtp_forward(const Model& m, std::vector<MtpChunk>& batch, const ForwardOptions& opt, std::vector<float>& logits) {
    const ModelConfig& c = m.cfg;
    if (!m.w.mtp) fail("mtp: the checkpoint has no multi-token-prediction block (mtp.0.* tensors)");
    const MtpWeights& w = *m.w.mtp;
    const Numerics nm = m.numerics;
    const int64_t D = c.hidden_size, hc = c.hc_mult, L = c.num_hidden_layers;
    const float eps = static_cast<float>(c.rms_norm_eps);

    // Validate everything before any state changes.
    BatchLayout B;
    B.offset.push_back(0);
    for (size_t s = 0; s < batch.size(); ++s) {
        const MtpChunk& ch = batch[s];
        if (!ch.state) fail("mtp: chunk ", s, " has no sequence state");
        if (ch.next_tokens.empty()) fail("mtp: chunk ", s, " has no tokens");
        if (!ch.streams) fail("mtp: chunk ", s, " has no main-model streams");
        const int64_t p0 = ch.state->mtp.n_past, end = p0 + static_cast<int64_t>(ch.next_tokens.size());
        if (end > ch.state->n_past)
            fail("mtp: sequence ", s, " would reach position ", end - 1, " but the main model has processed only ",
                 ch.state->n_past, " positions");
        for (size_t i = 0; i < ch.next_tokens.size(); ++i) {
            const int32_t id = ch.next_tokens[i];
            if (id < 0 || id >= c.vocab_size)
                fail("mtp: token id ", id, " (sequence ", s, ", index ", i, ") is outside the vocabulary [0, ",
                     c.vocab_size, ")");
            B.tokens.push_back(id);
            B.pos.push_back(p0 + static_cast<int64_t>(i));
        }
        B.offset.push_back(static_cast<int64_t>(B.tokens.size()));
    }
    B.T = static_cast<int64_t>(B.tokens.size());
    const int64_t T = B.T;
    auto trace = [&](const char* name, Buf& v, int64_t width) { probe(opt, name, L, DType::f32, v.data(), T, width); };

    // e = enorm(embed[next]); h = hnorm(X_main) per stream; X = e_proj(e) + h_proj(h) per stream.
    Buf e(static_cast<size_t>(T * D)), Xh(static_cast<size_t>(T * hc * D));
    ops::embed(m.w.embed, B.tokens.data(), T, e.data());
    ops::rms_norm(e.data(), T, D, &w.enorm, eps, e.data());
    ops::round_bf16(nm, e.data(), T * D);
    trace(trace_names::mtp_embed, e, D);
    for (size_t s = 0; s < batch.size(); ++s)
        std::copy_n(batch[s].streams, (B.offset[s + 1] - B.offset[s]) * hc * D, Xh.data() + B.offset[s] * hc * D);
    ops::rms_norm(Xh.data(), T * hc, D, &w.hnorm, eps, Xh.data());
    ops::round_bf16(nm, Xh.data(), T * hc * D);
    trace(trace_names::mtp_hidden, Xh, hc * D);
    Buf pe(static_cast<size_t>(T * D)), X(static_cast<size_t>(T * hc * D));
    ops::linear_rounded(nm, w.e_proj, e.data(), T, pe.data());
    ops::linear_rounded(nm, w.h_proj, Xh.data(), T * hc, X.data());
    ops::add_to_streams(pe.data(), T, hc, D, X.data());
    ops::round_bf16(nm, X.data(), T * hc * D);

    std::vector<LayerState*> states(batch.size());
    for (size_t s = 0; s < batch.size(); ++s) states[s] = &batch[s].state->mtp.layer;
    block_forward(m, w.block, L, B, states, opt, X);
    if (opt.streams_out) *opt.streams_out = X;   // the block's own pre-head streams (chained drafts)
    head_logits(m, w.hc_head, w.norm, trace_names::mtp_norm, B, opt, X, logits);

    for (auto& ch : batch) ch.state->mtp.n_past += static_cast<int64_t>(ch.next_tokens.size());
}

}  // namespace megamoe
