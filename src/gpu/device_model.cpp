// device_model.cpp — the upload walk: one counting pass sizes the arena, the same walk over a real
// arena uploads, so both passes lay out the same bytes by construction. The same walk also makes
// synthetic models (random weights filled on the GPU) from a shape-only Weights.
#include "gpu/device_model.h"

#include <cuda_runtime_api.h>

#include <cstring>

#include "cuda/synth.h"

namespace megamoe::gpu {

// Where the bytes come from: the host tensors (copied unchanged), or a random fill.
struct DeviceModel::Source {
    bool synth = false;
    uint64_t seed = 0;
    mutable uint64_t counter = 0;
    uint64_t next() const { return seed * 0x9E3779B97F4A7C15ull + ++counter; }
};

namespace {

struct Placer {
    cuda::DeviceArena& arena;
    const DeviceModel::Source& src;

    template <typename T>
    const T* put(const Tensor& t, const char* what, cuda::SynthFill fill, int64_t bound = 0) {
        MEGAMOE_CHECK(t.ndim == 0 || t.numel() > 0, "DeviceModel: tensor ", what, " is empty");
        const size_t bytes = t.bytes();
        void* p = arena.take(bytes);
        if (arena.counting()) return static_cast<const T*>(p);
        if (src.synth) {
            cuda::synth_fill(p, static_cast<int64_t>(bytes), fill, src.next(), bound, nullptr);
        } else {
            MEGAMOE_CHECK(!t.empty(), "DeviceModel: tensor ", what, " is missing");
            const cudaError_t e = cudaMemcpy(p, t.data, bytes, cudaMemcpyHostToDevice);
            if (e != cudaSuccess) fail("DeviceModel: upload of ", what, ": ", cudaGetErrorString(e));
        }
        return static_cast<const T*>(p);
    }
    template <typename T>
    const T* put_vec(const std::vector<T>& v, const char* what) {   // host-made tables (both sources)
        void* p = arena.take(v.size() * sizeof(T));
        if (!arena.counting() && !v.empty()) {
            const cudaError_t e = cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
            if (e != cudaSuccess) fail("DeviceModel: upload of ", what, ": ", cudaGetErrorString(e));
        }
        return static_cast<const T*>(p);
    }
    cuda::DeviceLinear linear(const Linear& h) {
        if (src.synth) return cuda::synth_linear(h.format, h.out, h.in, arena, src.next(), nullptr);
        return cuda::upload_linear(h, arena);
    }
    DeviceCompressor compressor(const Compressor& c) {
        DeviceCompressor d;
        d.ratio = static_cast<int32_t>(c.ratio);
        d.dim = static_cast<int32_t>(c.dim);
        d.overlap = c.overlap;
        d.wkv = linear(c.wkv);
        d.wgate = linear(c.wgate);
        d.ape = put<float>(c.ape, "compressor.ape", cuda::SynthFill::f32_zero);
        d.norm = put<uint16_t>(c.norm, "compressor.norm", cuda::SynthFill::bf16_one);
        return d;
    }
    cuda::DeviceExperts experts(const std::vector<ExpertWeights>& ex) {
        if (!src.synth) return cuda::DeviceExperts(ex, arena);
        std::vector<cuda::DeviceLinear> w1, w3, w2;
        for (const ExpertWeights& e : ex) {
            w1.push_back(linear(e.w1));
            w3.push_back(linear(e.w3));
            w2.push_back(linear(e.w2));
        }
        return cuda::DeviceExperts(std::move(w1), std::move(w3), std::move(w2), arena);
    }
    // One V4 block (a main layer or the MTP block): norms, mHC, attention, MoE. held: the routed
    // experts to upload, in this order (null: all).
    DeviceLayer block(const BlockWeights& b, const ModelConfig& c, const std::vector<int32_t>* held = nullptr) {
        using F = cuda::SynthFill;
        DeviceLayer d;
        d.kind = b.attn.kind;
        d.router = b.ffn.router;
        d.attn_norm = put<uint16_t>(b.attn_norm, "attn_norm", F::bf16_one);
        d.ffn_norm = put<uint16_t>(b.ffn_norm, "ffn_norm", F::bf16_one);
        d.hc_attn_fn = put<float>(b.hc_attn.fn, "hc_attn_fn", F::f32_small);
        d.hc_attn_base = put<float>(b.hc_attn.base, "hc_attn_base", F::f32_small);
        d.hc_attn_scale = put<float>(b.hc_attn.scale, "hc_attn_scale", F::f32_small);
        d.hc_ffn_fn = put<float>(b.hc_ffn.fn, "hc_ffn_fn", F::f32_small);
        d.hc_ffn_base = put<float>(b.hc_ffn.base, "hc_ffn_base", F::f32_small);
        d.hc_ffn_scale = put<float>(b.hc_ffn.scale, "hc_ffn_scale", F::f32_small);

        const AttentionWeights& a = b.attn;
        d.wq_a = linear(a.wq_a);
        d.wq_b = linear(a.wq_b);
        d.wkv = linear(a.wkv);
        d.wo_a = linear(a.wo_a);
        d.wo_b = linear(a.wo_b);
        d.q_norm = put<uint16_t>(a.q_norm, "q_norm", F::bf16_one);
        d.kv_norm = put<uint16_t>(a.kv_norm, "kv_norm", F::bf16_one);
        d.attn_sink = put<float>(a.attn_sink, "attn_sink", F::f32_zero);
        if (a.kind != AttnKind::sliding) d.comp = compressor(a.compressor);
        if (a.kind == AttnKind::csa) {
            d.idx_comp = compressor(a.indexer.compressor);
            d.idx_wq_b = linear(a.indexer.wq_b);
            d.idx_weights_proj = linear(a.indexer.weights_proj);
        }

        const MoeWeights& f = b.ffn;
        d.gate = linear(f.gate);
        if (f.router == RouterKind::score) {
            d.gate_bias = put<float>(f.bias, "gate.bias", F::f32_zero);
        } else if (src.synth) {
            Tensor t32 = f.tid2eid;   // the same shape as int32
            t32.dtype = DType::i32;
            d.tid2eid = put<int32_t>(t32, "gate.tid2eid", F::i32_below, c.n_routed_experts);
        } else {
            // ids < E (checked by the binder): i32 holds them exactly.
            std::vector<int32_t> t32(static_cast<size_t>(f.tid2eid.numel()));
            if (!arena.counting()) {
                const int64_t* t64 = f.tid2eid.as<int64_t>();
                for (size_t i = 0; i < t32.size(); ++i) t32[i] = static_cast<int32_t>(t64[i]);
            }
            d.tid2eid = put_vec(t32, "gate.tid2eid");
        }
        if (held == nullptr) {
            d.experts = experts(f.experts);
        } else if (src.synth) {
            // Expert e draws the seeds it draws in the whole model (3 per expert: w1, w3, w2), and
            // the tensors after the experts draw theirs as in the whole model too: the replicated
            // weights are then the same on every rank.
            const uint64_t base = src.counter;
            std::vector<cuda::DeviceLinear> w1, w3, w2;
            for (int32_t e : *held) {
                const ExpertWeights& x = f.experts[static_cast<size_t>(e)];
                src.counter = base + 3 * static_cast<uint64_t>(e);
                w1.push_back(linear(x.w1));
                w3.push_back(linear(x.w3));
                w2.push_back(linear(x.w2));
            }
            src.counter = base + 3 * static_cast<uint64_t>(f.experts.size());
            d.experts = cuda::DeviceExperts(std::move(w1), std::move(w3), std::move(w2), arena);
        } else {
            std::vector<ExpertWeights> mine;   // views: no bytes are read here
            mine.reserve(held->size());
            for (int32_t e : *held) mine.push_back(f.experts[static_cast<size_t>(e)]);
            d.experts = experts(mine);
        }
        d.sh_w1 = linear(f.shared.w1);
        d.sh_w3 = linear(f.shared.w3);
        d.sh_w2 = linear(f.shared.w2);

        return d;
    }
};

// A Weights of shapes only (no data): what visit_weights says each tensor is.
struct ShapeOnly : WeightVisitor {
    void tensor(const std::string&, DType dtype, const std::vector<int64_t>& shape, Tensor& dst) override {
        dst = Tensor{};
        dst.dtype = dtype;
        dst.ndim = static_cast<int>(shape.size());
        for (size_t i = 0; i < shape.size(); ++i) dst.shape[i] = shape[i];
    }
    void linear(const std::string&, LinearFormat f, int64_t out, int64_t in, Linear& dst) override {
        dst = Linear{};
        dst.format = f;
        dst.out = out;
        dst.in = in;
    }
};

// The head rows [b, e) as a Linear view (a row-major weight without block scales: bf16 / f32).
Linear head_rows(const Linear& h, int64_t b, int64_t e) {
    Linear v = h;
    v.out = e - b;
    v.weight.shape[0] = e - b;
    if (v.weight.data != nullptr)
        v.weight.data = static_cast<uint8_t*>(v.weight.data) + b * h.in * static_cast<int64_t>(dtype_size(h.weight.dtype));
    return v;
}

// Checks a shard against the model's shape; throws naming the field.
void check_shard(const ModelConfig& c, const Weights& w, const WeightShard& s) {
    if (!s.held.empty()) {
        MEGAMOE_CHECK(s.held.size() == w.layers.size(), "WeightShard: held has ", s.held.size(),
                      " layers, the model has num_hidden_layers = ", w.layers.size());
        for (size_t l = 0; l < s.held.size(); ++l) {
            const auto& h = s.held[l];
            MEGAMOE_CHECK(!h.empty(), "WeightShard: layer ", l, " holds no routed expert");
            for (size_t i = 0; i < h.size(); ++i) {
                MEGAMOE_CHECK(h[i] >= 0 && h[i] < c.n_routed_experts, "WeightShard: layer ", l, " expert id ", h[i],
                              " is outside [0, n_routed_experts = ", c.n_routed_experts, ")");
                MEGAMOE_CHECK(i == 0 || h[i] > h[i - 1], "WeightShard: layer ", l,
                              " expert ids are not strictly ascending (", h[i - 1], ", ", h[i], ")");
            }
        }
    }
    if (s.head_end >= 0 || s.head_begin != 0) {
        MEGAMOE_CHECK(s.head_begin >= 0 && s.head_begin < s.head_end && s.head_end <= c.vocab_size,
                      "WeightShard: head rows [", s.head_begin, ", ", s.head_end, ") are not inside [0, vocab_size = ",
                      c.vocab_size, ")");
        MEGAMOE_CHECK(w.head.format == LinearFormat::bf16 || w.head.format == LinearFormat::f32,
                      "WeightShard: the head is ", format_info(w.head.format).name,
                      "; only a bf16 / f32 head is split by rows");
    }
}

}  // namespace

void DeviceModel::place(const ModelConfig& c, const Weights& w, const ops::RopeTable& rope_m,
                        const ops::RopeTable& rope_c, cuda::DeviceArena& arena, const Source& src,
                        const WeightShard& shard) {
    using F = cuda::SynthFill;
    check_shard(c, w, shard);
    Placer P{arena, src};
    cfg_ = c;
    embed = P.put<uint16_t>(w.embed, "embed", F::bf16_small);
    head = shard.head_end < 0 && shard.head_begin == 0 ? P.linear(w.head)
                                                        : P.linear(head_rows(w.head, shard.head_begin, shard.head_end));
    norm = P.put<uint16_t>(w.norm, "norm", F::bf16_one);
    hc_head_fn = P.put<float>(w.hc_head.fn, "hc_head_fn", F::f32_small);
    hc_head_base = P.put<float>(w.hc_head.base, "hc_head_base", F::f32_small);
    hc_head_scale = P.put<float>(w.hc_head.scale, "hc_head_scale", F::f32_small);
    rope_main = {P.put_vec(rope_m.inv_freq, "rope table"), static_cast<int32_t>(rope_m.rope_dim)};
    rope_compress = {P.put_vec(rope_c.inv_freq, "rope table"), static_cast<int32_t>(rope_c.rope_dim)};

    layers.clear();
    layers.resize(w.layers.size());
    for (size_t l = 0; l < w.layers.size(); ++l)
        layers[l] = P.block(w.layers[l], c, shard.held.empty() ? nullptr : &shard.held[l]);
    mtp.reset();
    if (w.mtp) {
        const MtpWeights& m = *w.mtp;
        DeviceMtp& d = mtp.emplace();
        d.block = P.block(m.block, c);
        d.e_proj = P.linear(m.e_proj);
        d.h_proj = P.linear(m.h_proj);
        d.enorm = P.put<uint16_t>(m.enorm, "mtp.enorm", F::bf16_one);
        d.hnorm = P.put<uint16_t>(m.hnorm, "mtp.hnorm", F::bf16_one);
        d.norm = P.put<uint16_t>(m.norm, "mtp.norm", F::bf16_one);
        d.hc_head_fn = P.put<float>(m.hc_head.fn, "mtp.hc_head_fn", F::f32_small);
        d.hc_head_base = P.put<float>(m.hc_head.base, "mtp.hc_head_base", F::f32_small);
        d.hc_head_scale = P.put<float>(m.hc_head.scale, "mtp.hc_head_scale", F::f32_small);
    }
}

size_t DeviceModel::plan_bytes(const Model& m) {
    DeviceModel counting;
    cuda::DeviceArena counter;
    counting.place(m.cfg, m.w, m.rope_main, m.rope_compress, counter, Source{});
    return counter.used();
}

size_t DeviceModel::plan_bytes(const Model& m, const WeightShard& shard) {
    DeviceModel counting;
    cuda::DeviceArena counter;
    counting.place(m.cfg, m.w, m.rope_main, m.rope_compress, counter, Source{}, shard);
    return counter.used();
}

size_t DeviceModel::plan_bytes(const ModelConfig& c) { return plan_bytes(c, WeightShard{}); }

size_t DeviceModel::plan_bytes(const ModelConfig& c, const WeightShard& shard) {
    Weights shapes;
    ShapeOnly so;
    visit_weights(c, shapes, so, c.num_nextn_predict_layers > 0);   // synthetic: with the MTP block when the config has one
    const ops::RopeTable rm = ops::make_rope_table(c.rope_theta, c.qk_rope_head_dim, nullptr);
    const ops::RopeTable rc = ops::make_rope_table(c.compress_rope_theta, c.qk_rope_head_dim, &c.yarn);
    DeviceModel counting;
    cuda::DeviceArena counter;
    Source s;
    s.synth = true;
    counting.place(c, shapes, rm, rc, counter, s, shard);
    return counter.used();
}

DeviceModel::DeviceModel(const Model& m) : cfg_(m.cfg), arena_(plan_bytes(m), "model weights") {
    place(m.cfg, m.w, m.rope_main, m.rope_compress, arena_, Source{});
    const cudaError_t e = cudaDeviceSynchronize();
    if (e != cudaSuccess) fail("DeviceModel: upload: ", cudaGetErrorString(e));
}

DeviceModel::DeviceModel(const Model& m, const WeightShard& shard)
    : cfg_(m.cfg), arena_(plan_bytes(m, shard), "model weights (one GPU's share)") {
    place(m.cfg, m.w, m.rope_main, m.rope_compress, arena_, Source{}, shard);
    const cudaError_t e = cudaDeviceSynchronize();
    if (e != cudaSuccess) fail("DeviceModel: upload: ", cudaGetErrorString(e));
}

DeviceModel::DeviceModel(const ModelConfig& c, uint64_t seed) : DeviceModel(c, seed, WeightShard{}) {}

DeviceModel::DeviceModel(const ModelConfig& c, uint64_t seed, const WeightShard& shard)
    : cfg_(c), arena_(plan_bytes(c, shard), "synthetic weights") {
    Weights shapes;
    ShapeOnly so;
    visit_weights(c, shapes, so, c.num_nextn_predict_layers > 0);   // synthetic: with the MTP block when the config has one
    const ops::RopeTable rm = ops::make_rope_table(c.rope_theta, c.qk_rope_head_dim, nullptr);
    const ops::RopeTable rc = ops::make_rope_table(c.compress_rope_theta, c.qk_rope_head_dim, &c.yarn);
    Source s;
    s.synth = true;
    s.seed = seed;
    place(c, shapes, rm, rc, arena_, s, shard);
    const cudaError_t e = cudaDeviceSynchronize();
    if (e != cudaSuccess) fail("DeviceModel: synthesis: ", cudaGetErrorString(e));
}

}  // namespace megamoe::gpu
