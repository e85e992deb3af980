// synth.cpp — preset configs, a release-style config.json writer, and random quantized weights.
#include "io/synth.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <span>

#include "io/formats.h"
#include "io/safetensors.h"
#include "io/weights.h"

namespace megamoe {

using json = nlohmann::json;

namespace {

// Ratio schedule of a preset for `n` layers (+ the MTP block's 0).
std::vector<int64_t> schedule(const std::string& preset, int64_t n) {
    std::vector<int64_t> r;
    for (int64_t l = 0; l < n; ++l) {
        if (preset == "tiny") {
            static const int64_t tiny[] = {0, 0, 4, 16};
            r.push_back(l < 4 ? tiny[l] : (l % 2 ? 16 : 4));
        } else if (preset == "flash") {
            r.push_back(l < 2 ? 0 : (l % 2 ? 128 : 4));
        } else {   // pro
            r.push_back(l < 2 ? 128 : (l % 2 ? 128 : 4));
        }
    }
    r.push_back(0);
    return r;
}

}  // namespace

ModelConfig synth_config(const SynthOptions& o) {
    ModelConfig c;
    c.rope_theta = 10000;
    c.compress_rope_theta = 160000;
    c.yarn = YarnConfig{16, 65536, 32, 1};
    c.n_shared_experts = 1;
    c.num_hash_layers = 3;
    c.hc_mult = 4;
    c.hc_sinkhorn_iters = 20;
    c.hc_eps = 1e-6;
    c.rms_norm_eps = 1e-6;
    c.num_nextn_predict_layers = 1;
    c.bos_token_id = 0;
    c.eos_token_id = 1;
    c.head_dim = 512;
    c.qk_rope_head_dim = 64;
    c.o_lora_rank = 1024;
    c.sliding_window = 128;
    c.index_n_heads = 64;
    c.index_head_dim = 128;
    c.num_experts_per_tok = 6;
    c.swiglu_limit = 10;
    c.max_position_embeddings = 1048576;
    c.vocab_size = 129280;
    if (o.preset == "tiny") {   // the size of ../shared/golden's checkpoints
        c.vocab_size = 1024, c.hidden_size = 256, c.num_hidden_layers = 6, c.num_attention_heads = 8;
        c.head_dim = 64, c.qk_rope_head_dim = 16, c.q_lora_rank = 128, c.o_groups = 4, c.o_lora_rank = 64;
        c.sliding_window = 16, c.index_n_heads = 16, c.index_head_dim = 32, c.index_topk = 5;
        c.n_routed_experts = 16, c.num_experts_per_tok = 4, c.moe_intermediate_size = 128;
        c.routed_scaling_factor = 1.5, c.swiglu_limit = 1.0, c.max_position_embeddings = 4096;
    } else if (o.preset == "flash") {
        c.hidden_size = 4096, c.num_hidden_layers = 43, c.num_attention_heads = 64, c.q_lora_rank = 1024;
        c.o_groups = 8, c.index_topk = 512, c.n_routed_experts = 256, c.moe_intermediate_size = 2048;
        c.routed_scaling_factor = 1.5;
    } else if (o.preset == "pro") {
        c.hidden_size = 7168, c.num_hidden_layers = 61, c.num_attention_heads = 128, c.q_lora_rank = 1536;
        c.o_groups = 16, c.index_topk = 1024, c.n_routed_experts = 384, c.moe_intermediate_size = 3072;
        c.routed_scaling_factor = 2.5;
    } else {
        fail("synth: unknown preset '", o.preset, "' (tiny, flash or pro)");
    }
    if (o.layers != -1) {
        if (o.layers < 1) fail("synth: --layers must be >= 1, got ", o.layers);
        c.num_hidden_layers = o.layers;
    }
    if (o.vocab != -1) {
        if (o.vocab < 2) fail("synth: --vocab must be >= 2, got ", o.vocab);
        c.vocab_size = o.vocab;
    }
    if (o.routed_experts != -1) {
        if (o.routed_experts < c.num_experts_per_tok)
            fail("synth: --routed-experts must be >= num_experts_per_tok = ", c.num_experts_per_tok);
        c.n_routed_experts = o.routed_experts;
    }
    c.num_hash_layers = std::min<int64_t>(c.num_hash_layers, c.num_hidden_layers);
    c.compress_ratios = schedule(o.preset, c.num_hidden_layers);
    c.expert_format = o.experts;
    if (o.experts == ExpertFormat::nvfp4) c.quant_ignore = {"*.attn.*", "*.ffn.shared_experts.*", "head", "mtp.*"};
    return c;
}

std::string config_to_json(const ModelConfig& c) {
    json q = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"scale_fmt", "ue8m0"},
              {"activation_scheme", "dynamic"}, {"weight_block_size", {128, 128}}};
    if (c.expert_format == ExpertFormat::nvfp4) {
        q["quant_algo"] = "MIXED_PRECISION";
        q["moe_quant_algo"] = "NVFP4";
        q["group_size"] = 16;
        q["ignore"] = c.quant_ignore;
        q["producer"] = {{"name", "megamoe synth"}};
    }
    json j = {
        {"architectures", {"DeepseekV4ForCausalLM"}},
        {"model_type", "deepseek_v4"},
        {"vocab_size", c.vocab_size},
        {"hidden_size", c.hidden_size},
        {"num_attention_heads", c.num_attention_heads},
        {"num_key_value_heads", 1},
        {"head_dim", c.head_dim},
        {"qk_rope_head_dim", c.qk_rope_head_dim},
        {"q_lora_rank", c.q_lora_rank},
        {"o_groups", c.o_groups},
        {"o_lora_rank", c.o_lora_rank},
        {"sliding_window", c.sliding_window},
        {"compress_ratios", c.compress_ratios},
        {"num_hidden_layers", c.num_hidden_layers},
        {"compress_rope_theta", c.compress_rope_theta},
        {"rope_theta", c.rope_theta},
        {"rope_scaling",
         {{"type", "yarn"}, {"factor", c.yarn.factor},
          {"original_max_position_embeddings", c.yarn.original_max_position_embeddings},
          {"beta_fast", c.yarn.beta_fast}, {"beta_slow", c.yarn.beta_slow}}},
        {"index_n_heads", c.index_n_heads},
        {"index_head_dim", c.index_head_dim},
        {"index_topk", c.index_topk},
        {"n_routed_experts", c.n_routed_experts},
        {"num_experts_per_tok", c.num_experts_per_tok},
        {"moe_intermediate_size", c.moe_intermediate_size},
        {"n_shared_experts", c.n_shared_experts},
        {"num_hash_layers", c.num_hash_layers},
        {"routed_scaling_factor", c.routed_scaling_factor},
        {"scoring_func", "sqrtsoftplus"},
        {"topk_method", "noaux_tc"},
        {"norm_topk_prob", true},
        {"swiglu_limit", c.swiglu_limit},
        {"hidden_act", "silu"},
        {"hc_mult", c.hc_mult},
        {"hc_sinkhorn_iters", c.hc_sinkhorn_iters},
        {"hc_eps", c.hc_eps},
        {"rms_norm_eps", c.rms_norm_eps},
        {"num_nextn_predict_layers", c.num_nextn_predict_layers},
        {"max_position_embeddings", c.max_position_embeddings},
        {"bos_token_id", c.bos_token_id},
        {"eos_token_id", c.eos_token_id},
        {"tie_word_embeddings", false},
        {"torch_dtype", "bfloat16"},
        {"expert_dtype", "fp4"},
        {"quantization_config", q},
    };
    return j.dump(2) + "\n";
}

namespace {

// splitmix64: a tiny, fast, seedable generator; tensors seed it from (seed, name).
struct Rng {
    uint64_t s;
    uint64_t next() {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    float uniform() { return static_cast<float>(next() >> 40) * (1.0f / 16777216.0f); }   // [0, 1)
    // Zero-mean values of standard deviation `std` (uniform, so sqrt(3)·std wide: cheap and bounded).
    float centered(float std) { return (2.0f * uniform() - 1.0f) * 1.7320508f * std; }
};

uint64_t name_seed(uint64_t seed, const std::string& name) {
    uint64_t h = 1469598103934665603ull ^ seed;   // FNV-1a
    for (unsigned char ch : name) h = (h ^ ch) * 1099511628211ull;
    return h;
}

bool ends_with(const std::string& s, const std::string& suf) {
    return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

// One item of the walk, enough to generate its tensors later.
struct Item {
    bool linear = false;
    std::string name;                 // tensor name, or a Linear's prefix
    DType dtype = DType::f32;         // plain tensors
    std::vector<int64_t> shape;
    LinearFormat format = LinearFormat::bf16;
    int64_t out = 0, in = 0;
    int64_t bytes = 0;
};

struct Planner : WeightVisitor {
    std::vector<Item> items;
    void tensor(const std::string& name, DType t, const std::vector<int64_t>& shape, Tensor&) override {
        Item it;
        it.name = name, it.dtype = t, it.shape = shape;
        it.bytes = static_cast<int64_t>(dtype_size(t)) * std::accumulate(shape.begin(), shape.end(), int64_t{1},
                                                                           std::multiplies<>());
        items.push_back(it);
    }
    void linear(const std::string& p, LinearFormat f, int64_t out, int64_t in, Linear&) override {
        Item it;
        it.linear = true, it.name = p, it.format = f, it.out = out, it.in = in;
        it.bytes = format_info(f).packed_bytes(out, in);
        items.push_back(it);
    }
};

// Owned bytes of generated tensors, written one shard at a time.
struct Generated {
    std::vector<std::vector<uint8_t>> blobs;
    std::vector<TensorToWrite> tensors;
    void add(const std::string& name, DType t, std::vector<int64_t> shape, std::vector<uint8_t> data) {
        blobs.push_back(std::move(data));
        tensors.push_back({name, t, std::move(shape), blobs.back().data()});
    }
};

template <typename T>
std::vector<uint8_t> bytes_of(const std::vector<T>& v) {
    std::vector<uint8_t> b(v.size() * sizeof(T));
    std::memcpy(b.data(), v.data(), b.size());
    return b;
}

// The values of synth_linear_values into w [out, in].
void fill_linear_values(const std::string& prefix, int64_t out, int64_t in, uint64_t seed, float* w) {
    Rng rng{name_seed(seed, prefix)};
    const float std = 1.0f / std::sqrt(static_cast<float>(in));   // keeps y = W·x at the scale of x
    for (int64_t i = 0; i < out * in; ++i) w[i] = rng.centered(std);
}

// `values` is scratch for the f32 values before quantization, kept across projections: a fresh
// vector per projection (up to 128 MiB at Flash and Pro shapes) cost a page fault per 4 KiB, over
// a third of the time of writing a full-width checkpoint, and more under AddressSanitizer.
void gen_linear(const Item& it, uint64_t seed, Generated& g, std::vector<float>& values) {
    const int64_t out = it.out, in = it.in;
    if (values.size() < static_cast<size_t>(out * in)) values.resize(static_cast<size_t>(out * in));
    fill_linear_values(it.name, out, in, seed, values.data());
    const std::span<const float> w(values.data(), static_cast<size_t>(out * in));
    const std::string p = it.name;
    const FormatInfo& fi = format_info(it.format);
    std::vector<uint8_t> q(static_cast<size_t>(out * fi.packed_row_bytes(in)));
    std::vector<uint8_t> s(static_cast<size_t>(fi.scale_rows(out) * fi.scale_cols(in)));
    float scale_2 = 1;
    switch (it.format) {   // the quantizer of each format; names, dtypes and shapes from the table
        case LinearFormat::f32: std::memcpy(q.data(), w.data(), q.size()); break;
        case LinearFormat::bf16:
            for (size_t i = 0; i < w.size(); ++i) {
                const uint16_t b = f32_to_bf16(w[i]);
                std::memcpy(q.data() + 2 * i, &b, 2);
            }
            break;
        case LinearFormat::fp8_block: quantize_fp8_block(w.data(), out, in, q.data(), s.data()); break;
        case LinearFormat::mxfp4: quantize_mxfp4(w.data(), out, in, q.data(), s.data()); break;
        case LinearFormat::nvfp4: quantize_nvfp4(w.data(), out, in, q.data(), s.data(), &scale_2); break;
    }
    g.add(p + ".weight", fi.weight_dtype, {out, fi.weight_cols(in)}, std::move(q));
    if (fi.has_scales()) g.add(p + "." + fi.scale_suffix, fi.scale_dtype, {fi.scale_rows(out), fi.scale_cols(in)}, std::move(s));
    if (fi.global_scales) {
        g.add(p + ".weight_scale_2", DType::f32, {}, bytes_of(std::vector<float>{scale_2}));
        // The activation scale a W4A4 kernel would use (amax of O(1) activations / (6·448)).
        g.add(p + ".input_scale", DType::f32, {}, bytes_of(std::vector<float>{8.0f / (6.0f * 448.0f)}));
    }
}

void gen_tensor(const Item& it, const ModelConfig& c, uint64_t seed, Generated& g) {
    Rng rng{name_seed(seed, it.name)};
    const int64_t n = std::accumulate(it.shape.begin(), it.shape.end(), int64_t{1}, std::multiplies<>());
    const std::string& nm = it.name;
    if (it.dtype == DType::i64) {   // tid2eid: k distinct experts per token
        const int64_t k = it.shape[1], E = c.n_routed_experts;
        std::vector<int64_t> ids(static_cast<size_t>(n));
        std::vector<int64_t> perm(static_cast<size_t>(E));
        for (int64_t row = 0; row < it.shape[0]; ++row) {
            std::iota(perm.begin(), perm.end(), 0);
            for (int64_t i = 0; i < k; ++i) {
                const int64_t j = i + static_cast<int64_t>(rng.next() % static_cast<uint64_t>(E - i));
                std::swap(perm[static_cast<size_t>(i)], perm[static_cast<size_t>(j)]);
                ids[static_cast<size_t>(row * k + i)] = perm[static_cast<size_t>(i)];
            }
        }
        g.add(nm, it.dtype, it.shape, bytes_of(ids));
        return;
    }
    std::vector<float> v(static_cast<size_t>(n));
    if (ends_with(nm, "norm.weight")) {
        for (float& x : v) x = 1.0f + rng.centered(0.1f);
    } else if (ends_with(nm, "_fn")) {   // mHC projections: mixes of O(1)
        const float std = 1.0f / std::sqrt(static_cast<float>(it.shape[1]));
        for (float& x : v) x = rng.centered(std);
    } else if (ends_with(nm, "_scale")) {
        for (float& x : v) x = 1.0f + rng.centered(0.2f);
    } else if (ends_with(nm, "embed.weight")) {
        for (float& x : v) x = rng.centered(1.0f);
    } else if (ends_with(nm, "gate.bias")) {
        for (float& x : v) x = rng.centered(0.1f);
    } else {   // hc bases, attention sinks, compressor position biases
        for (float& x : v) x = rng.centered(0.5f);
    }
    if (it.dtype == DType::bf16) {
        std::vector<uint16_t> b(v.size());
        for (size_t i = 0; i < v.size(); ++i) b[i] = f32_to_bf16(v[i]);
        g.add(nm, it.dtype, it.shape, bytes_of(b));
    } else {
        g.add(nm, it.dtype, it.shape, bytes_of(v));
    }
}

}  // namespace

std::vector<float> synth_linear_values(const std::string& prefix, int64_t out, int64_t in, uint64_t seed) {
    std::vector<float> w(static_cast<size_t>(out * in));
    fill_linear_values(prefix, out, in, seed, w.data());
    return w;
}

int64_t write_synthetic_checkpoint(const std::string& dir, const SynthOptions& o) {
    const ModelConfig c = synth_config(o);
    std::filesystem::create_directories(dir);
    {
        std::ofstream f(dir + "/config.json", std::ios::binary);
        f << config_to_json(c);
        if (!f) fail(dir, "/config.json: cannot write");
    }
    Weights scratch;
    Planner plan;
    visit_weights(c, scratch, plan, o.mtp);

    // Shards: consecutive items up to ~shard_bytes each (a projection's tensors stay together).
    std::vector<std::vector<size_t>> shards(1);
    int64_t acc = 0, total = 0;
    for (size_t i = 0; i < plan.items.size(); ++i) {
        if (acc > 0 && acc + plan.items[i].bytes > o.shard_bytes) {
            shards.emplace_back();
            acc = 0;
        }
        shards.back().push_back(i);
        acc += plan.items[i].bytes;
    }
    json weight_map = json::object();
    char fname[64];
    std::vector<float> values;   // gen_linear's scratch
    for (size_t s = 0; s < shards.size(); ++s) {
        std::snprintf(fname, sizeof fname, "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
        Generated g;
        for (size_t i : shards[s]) {
            const Item& it = plan.items[i];
            if (it.linear)
                gen_linear(it, o.seed, g, values);
            else
                gen_tensor(it, c, o.seed, g);
        }
        for (const auto& t : g.tensors) {
            weight_map[t.name] = fname;
            total += static_cast<int64_t>(dtype_size(t.dtype)) *
                     std::accumulate(t.shape.begin(), t.shape.end(), int64_t{1}, std::multiplies<>());
        }
        write_safetensors(dir + "/" + fname, g.tensors, {{"format", "pt"}});
    }
    json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    std::ofstream f(dir + "/model.safetensors.index.json", std::ios::binary);
    f << index.dump(2) << "\n";
    if (!f) fail(dir, "/model.safetensors.index.json: cannot write");
    return total;
}

}  // namespace megamoe
