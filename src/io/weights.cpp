// weights.cpp — the tensor walk of a DeepSeek-V4 checkpoint, the strict binder, and row decoding.
#include "io/weights.h"

#include <cstring>
#include <map>

#include "io/formats.h"

namespace megamoe {

void Linear::decode_row(int64_t n, float* dst) const {
    switch (format) {
        case LinearFormat::f32:
            std::memcpy(dst, weight.as<float>() + n * in, static_cast<size_t>(in) * sizeof(float));
            return;
        case LinearFormat::bf16:
            decode_bf16_row(weight.as<uint16_t>() + n * in, in, dst);
            return;
        case LinearFormat::fp8_block: {
            const int64_t scale_cols = (in + kFp8Block - 1) / kFp8Block;
            decode_fp8_block_row(weight.as<uint8_t>() + n * in, scale.as<uint8_t>() + (n / kFp8Block) * scale_cols,
                                 in, dst);
            return;
        }
        case LinearFormat::mxfp4:
            decode_mxfp4_row(weight.as<uint8_t>() + n * (in / 2), scale.as<uint8_t>() + n * (in / kMxfp4Group), in, dst);
            return;
        case LinearFormat::nvfp4:
            decode_nvfp4_row(weight.as<uint8_t>() + n * (in / 2), scale.as<uint8_t>() + n * (in / kNvfp4Group),
                             *scale_2.as<float>(), in, dst);
            return;
    }
}

size_t Linear::bytes() const {
    size_t b = weight.bytes();
    if (!scale.empty()) b += scale.bytes();
    if (!scale_2.empty()) b += scale_2.bytes();
    if (!input_scale.empty()) b += input_scale.bytes();
    return b;
}

// ---- the walk

namespace {

struct Walker {
    const ModelConfig& c;
    WeightVisitor&     v;

    void vec(const std::string& name, DType t, int64_t n, Tensor& dst) { v.tensor(name, t, {n}, dst); }

    void hyper_conn(const std::string& p, const std::string& site, HyperConnWeights& hc) {
        v.tensor(p + "hc_" + site + "_fn", DType::f32, {c.mix_width(), c.hc_mult * c.hidden_size}, hc.fn);
        vec(p + "hc_" + site + "_base", DType::f32, c.mix_width(), hc.base);
        vec(p + "hc_" + site + "_scale", DType::f32, 3, hc.scale);
    }

    void compressor(const std::string& p, int64_t ratio, int64_t dim, Compressor& cp) {
        cp.ratio = ratio;
        cp.dim = dim;
        cp.overlap = ratio == 4;
        const int64_t width = (cp.overlap ? 2 : 1) * dim;
        v.linear(p + "wkv", LinearFormat::bf16, width, c.hidden_size, cp.wkv);
        v.linear(p + "wgate", LinearFormat::bf16, width, c.hidden_size, cp.wgate);
        v.tensor(p + "ape", DType::f32, {ratio, width}, cp.ape);
        vec(p + "norm.weight", DType::bf16, dim, cp.norm);
    }

    void attention(const std::string& p, int64_t layer, AttentionWeights& a) {
        const int64_t D = c.hidden_size, H = c.num_attention_heads, hd = c.head_dim;
        a.kind = c.attn_kind(layer);
        v.linear(p + "wq_a", LinearFormat::fp8_block, c.q_lora_rank, D, a.wq_a);
        vec(p + "q_norm.weight", DType::bf16, c.q_lora_rank, a.q_norm);
        v.linear(p + "wq_b", LinearFormat::fp8_block, H * hd, c.q_lora_rank, a.wq_b);
        v.linear(p + "wkv", LinearFormat::fp8_block, hd, D, a.wkv);
        vec(p + "kv_norm.weight", DType::bf16, hd, a.kv_norm);
        v.linear(p + "wo_a", LinearFormat::fp8_block, c.o_groups * c.o_lora_rank, c.heads_per_group() * hd, a.wo_a);
        v.linear(p + "wo_b", LinearFormat::fp8_block, D, c.o_groups * c.o_lora_rank, a.wo_b);
        vec(p + "attn_sink", DType::f32, H, a.attn_sink);
        if (a.kind == AttnKind::sliding) return;
        compressor(p + "compressor.", c.ratio(layer), hd, a.compressor);
        if (a.kind != AttnKind::csa) return;
        v.linear(p + "indexer.wq_b", LinearFormat::fp8_block, c.index_n_heads * c.index_head_dim, c.q_lora_rank,
                 a.indexer.wq_b);
        v.linear(p + "indexer.weights_proj", LinearFormat::bf16, c.index_n_heads, D, a.indexer.weights_proj);
        compressor(p + "indexer.compressor.", c.ratio(layer), c.index_head_dim, a.indexer.compressor);
    }

    void expert(const std::string& p, LinearFormat f, int64_t width, ExpertWeights& e) {
        v.linear(p + "w1", f, width, c.hidden_size, e.w1);
        v.linear(p + "w2", f, c.hidden_size, width, e.w2);
        v.linear(p + "w3", f, width, c.hidden_size, e.w3);
    }

    void moe(const std::string& p, int64_t layer, MoeWeights& m) {
        m.router = c.router_kind(layer);
        v.linear(p + "gate", LinearFormat::bf16, c.n_routed_experts, c.hidden_size, m.gate);
        if (m.router == RouterKind::hash)
            v.tensor(p + "gate.tid2eid", DType::i64, {c.vocab_size, c.num_experts_per_tok}, m.tid2eid);
        else
            vec(p + "gate.bias", DType::f32, c.n_routed_experts, m.bias);
        const LinearFormat f =
            c.expert_format_for(p + "experts") == ExpertFormat::nvfp4 ? LinearFormat::nvfp4 : LinearFormat::mxfp4;
        m.experts.resize(static_cast<size_t>(c.n_routed_experts));
        for (int64_t e = 0; e < c.n_routed_experts; ++e)
            expert(p + "experts." + std::to_string(e) + ".", f, c.moe_intermediate_size, m.experts[static_cast<size_t>(e)]);
        expert(p + "shared_experts.", LinearFormat::fp8_block, c.moe_intermediate_size * c.n_shared_experts, m.shared);
    }

    void block(const std::string& p, int64_t layer, BlockWeights& b) {
        vec(p + "attn_norm.weight", DType::bf16, c.hidden_size, b.attn_norm);
        vec(p + "ffn_norm.weight", DType::bf16, c.hidden_size, b.ffn_norm);
        hyper_conn(p, "attn", b.hc_attn);
        hyper_conn(p, "ffn", b.hc_ffn);
        attention(p + "attn.", layer, b.attn);
        moe(p + "ffn.", layer, b.ffn);
    }

    void hyper_head(const std::string& p, HyperHeadWeights& h) {
        v.tensor(p + "hc_head_fn", DType::f32, {c.hc_mult, c.hc_mult * c.hidden_size}, h.fn);
        vec(p + "hc_head_base", DType::f32, c.hc_mult, h.base);
        vec(p + "hc_head_scale", DType::f32, 1, h.scale);
    }
};

}  // namespace

void visit_weights(const ModelConfig& c, Weights& w, WeightVisitor& v, bool with_mtp) {
    Walker walk{c, v};
    v.tensor("embed.weight", DType::bf16, {c.vocab_size, c.hidden_size}, w.embed);
    v.linear("head", LinearFormat::bf16, c.vocab_size, c.hidden_size, w.head);
    walk.vec("norm.weight", DType::bf16, c.hidden_size, w.norm);
    walk.hyper_head("", w.hc_head);
    w.layers.resize(static_cast<size_t>(c.num_hidden_layers));
    for (int64_t l = 0; l < c.num_hidden_layers; ++l)
        walk.block("layers." + std::to_string(l) + ".", l, w.layers[static_cast<size_t>(l)]);
    if (!with_mtp) {
        w.mtp.reset();
        return;
    }
    w.mtp.emplace();
    MtpWeights& m = *w.mtp;
    const std::string p = "mtp.0.";
    walk.block(p, c.num_hidden_layers, m.block);
    v.linear(p + "e_proj", LinearFormat::fp8_block, c.hidden_size, c.hidden_size, m.e_proj);
    v.linear(p + "h_proj", LinearFormat::fp8_block, c.hidden_size, c.hidden_size, m.h_proj);
    walk.vec(p + "enorm.weight", DType::bf16, c.hidden_size, m.enorm);
    walk.vec(p + "hnorm.weight", DType::bf16, c.hidden_size, m.hnorm);
    walk.vec(p + "norm.weight", DType::bf16, c.hidden_size, m.norm);
    walk.hyper_head(p, m.hc_head);
}

// ---- binding

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
    std::string r = "[";
    for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
    return r + "]";
}

struct Binder : WeightVisitor {
    const Checkpoint& ck;
    Weights& w;
    std::function<void(size_t, size_t)> progress;
    size_t bound = 0;
    Binder(const Checkpoint& c, Weights& weights) : ck(c), w(weights) {}

    // A tensor at a misaligned offset is copied once into an aligned buffer the Weights own.
    Tensor aligned(Tensor t) {
        if (reinterpret_cast<uintptr_t>(t.data) % dtype_size(t.dtype) == 0) return t;
        auto& buf = w.realigned.emplace_back((t.bytes() + 7) / 8);
        std::memcpy(buf.data(), t.data, t.bytes());
        t.data = buf.data();
        return t;
    }

    Tensor get(const std::string& name, DType dtype, const std::vector<int64_t>& shape) {
        const Checkpoint::Entry* e = ck.find(name);
        if (!e) fail(ck.dir(), ": missing tensor '", name, "' (expected ", dtype_name(dtype), " ", shape_str(shape), ")");
        Tensor t = ck.view(*e);
        std::vector<int64_t> got(t.shape.begin(), t.shape.begin() + t.ndim);
        if (t.dtype != dtype || got != shape)
            fail(e->file->path(), ": tensor '", name, "' is ", dtype_name(t.dtype), " ", shape_str(got), ", expected ",
                 dtype_name(dtype), " ", shape_str(shape));
        if (progress && ++bound % 256 == 0) progress(bound, ck.size());
        return aligned(t);
    }

    void tensor(const std::string& name, DType dtype, const std::vector<int64_t>& shape, Tensor& dst) override {
        dst = get(name, dtype, shape);
    }

    void linear(const std::string& p, LinearFormat f, int64_t out, int64_t in, Linear& dst) override {
        dst = Linear{};
        dst.format = f;
        dst.out = out;
        dst.in = in;
        const FormatInfo& fi = format_info(f);
        // A converted checkpoint may hold an FP8 projection dequantized to BF16 (the official
        // convert.py does so for wo_a); accept it as such.
        if (f == LinearFormat::fp8_block) {
            const Checkpoint::Entry* e = ck.find(p + ".weight");
            if (e && e->info->dtype == DType::bf16 && !ck.find(p + ".scale")) {
                dst.format = LinearFormat::bf16;
                dst.weight = get(p + ".weight", DType::bf16, {out, in});
                return;
            }
        }
        if (fi.weight_bits == 4 && in % fi.scale_cols_per)
            fail(ck.dir(), ": tensor '", p, ".weight' has ", in, " inputs, not a multiple of ", fi.scale_cols_per);
        dst.weight = get(p + ".weight", fi.weight_dtype, {out, fi.weight_cols(in)});
        if (fi.has_scales())
            dst.scale = get(p + "." + fi.scale_suffix, fi.scale_dtype, {fi.scale_rows(out), fi.scale_cols(in)});
        if (fi.global_scales) {
            dst.scale_2 = get(p + ".weight_scale_2", DType::f32, {});
            dst.input_scale = get(p + ".input_scale", DType::f32, {});
        }
    }


};

void check_tid2eid(const Checkpoint& ck, const std::string& name, const Tensor& t, int64_t n_experts) {
    const int64_t* ids = t.as<int64_t>();
    for (int64_t i = 0; i < t.numel(); ++i) {
        if (ids[i] < 0 || ids[i] >= n_experts)
            fail(ck.dir(), ": tensor '", name, "' holds expert id ", ids[i], " at row ", i / t.dim(1),
                 ", outside [0, ", n_experts, ")");
    }
}

}  // namespace

Weights bind_weights(const ModelConfig& cfg, const Checkpoint& ck, const std::function<void(size_t, size_t)>& progress) {
    Weights w;
    Binder b(ck, w);
    b.progress = progress;
    const bool with_mtp = cfg.num_nextn_predict_layers > 0 && ck.find("mtp.0.attn.wq_a.weight") != nullptr;
    visit_weights(cfg, w, b, with_mtp);
    for (size_t l = 0; l < w.layers.size(); ++l) {
        if (w.layers[l].ffn.router == RouterKind::hash)
            check_tid2eid(ck, "layers." + std::to_string(l) + ".ffn.gate.tid2eid", w.layers[l].ffn.tid2eid,
                          cfg.n_routed_experts);
    }
    if (progress) progress(ck.size(), ck.size());
    return w;
}

// ---- statistics

namespace {

struct StatsVisitor : WeightVisitor {
    std::map<std::string, WeightStats::Group> groups;
    std::vector<std::string> order;
    std::map<std::string, int64_t> formats;

    static std::string group_of(const std::string& name) {
        if (name.rfind("mtp.", 0) == 0) return "mtp block";
        if (name.rfind("embed", 0) == 0) return "embed";
        if (name.rfind("head", 0) == 0) return "head";
        if (name.find(".ffn.experts.") != std::string::npos) return "routed experts";
        if (name.find(".shared_experts.") != std::string::npos) return "shared expert";
        if (name.find(".ffn.gate") != std::string::npos) return "router";
        if (name.find(".indexer.") != std::string::npos) return "indexer";
        if (name.find(".compressor.") != std::string::npos) return "compressor";
        if (name.find(".attn.") != std::string::npos) return "attention";
        return "norms + mHC";
    }
    void add(const std::string& name, int64_t params, int64_t bytes, const std::string& fmt) {
        std::string g = group_of(name);
        if (!groups.count(g)) order.push_back(g);
        auto& grp = groups[g];
        grp.name = g;
        grp.params += params;
        grp.bytes += bytes;
        formats[fmt] += bytes;
    }
    void tensor(const std::string& name, DType t, const std::vector<int64_t>& shape, Tensor&) override {
        int64_t n = 1;
        for (int64_t d : shape) n *= d;
        add(name, n, n * static_cast<int64_t>(dtype_size(t)), std::string(dtype_name(t)));
    }
    void linear(const std::string& p, LinearFormat f, int64_t out, int64_t in, Linear&) override {
        const int64_t params = out * in, bytes = format_info(f).packed_bytes(out, in);
        add(p + ".weight", params, bytes, linear_format_name(f));
    }
};

}  // namespace

WeightStats weight_stats(const ModelConfig& cfg, Weights& w, bool with_mtp) {
    StatsVisitor sv;
    visit_weights(cfg, w, sv, with_mtp);
    WeightStats s;
    for (const auto& g : sv.order) s.groups.push_back(sv.groups[g]);
    for (const auto& [k, b] : sv.formats) s.formats.emplace_back(k, b);
    return s;
}

}  // namespace megamoe
