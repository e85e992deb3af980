// config.cpp — config.json parsing and validation. Every error names the file and the field.
#include "io/config.h"

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string_view>

#include "core/common.h"

namespace megamoe {

using json = nlohmann::json;

const char* attn_kind_name(AttnKind k) {
    switch (k) {
        case AttnKind::sliding: return "SWA";
        case AttnKind::csa: return "CSA";
        case AttnKind::hca: return "HCA";
    }
    return "?";
}

const char* expert_format_name(ExpertFormat f) { return f == ExpertFormat::nvfp4 ? "NVFP4" : "MXFP4"; }

int64_t ModelConfig::ratio(int64_t layer) const {
    MEGAMOE_CHECK(layer >= 0 && layer < static_cast<int64_t>(compress_ratios.size()), "layer ", layer);
    return compress_ratios[static_cast<size_t>(layer)];
}

AttnKind ModelConfig::attn_kind(int64_t layer) const {
    const int64_t r = ratio(layer);
    if (r == 0) return AttnKind::sliding;
    return r == 4 ? AttnKind::csa : AttnKind::hca;
}

RouterKind ModelConfig::router_kind(int64_t layer) const {
    return layer < num_hash_layers && layer < num_hidden_layers ? RouterKind::hash : RouterKind::score;
}

// Glob match with '*' only, as used in quantization_config.ignore ("*.attn.*", "mtp.*").
// The classic two-pointer wildcard match: on a mismatch only the last '*' is retried, one
// character further on, so the cost is O(|pattern| * |s|) whatever the pattern (a recursive
// matcher is exponential in the number of stars: "**************Q" hung the loader).
// The bound on the steps: a backtrack moves star_i one character on, and star_i never moves back
// (a later star sets it to i >= star_i), so there are at most |s| backtracks; between two of them
// every step but the backtrack itself moves p on, so a run has at most |pattern| + 1 steps. With
// the final loop over trailing stars (<= |pattern|), steps <= (|pattern| + 1) (|s| + 1) + |pattern|.
bool glob_match(std::string_view pat, std::string_view s, int64_t* steps) {
    constexpr size_t none = std::string_view::npos;
    size_t p = 0, i = 0, star = none, star_i = 0;
    int64_t n = 0;
    while (i < s.size()) {
        ++n;
        if (p < pat.size() && pat[p] == '*') {
            star = p++;        // let the star match nothing for now
            star_i = i;
        } else if (p < pat.size() && pat[p] == s[i]) {
            ++p;
            ++i;
        } else if (star != none) {
            p = star + 1;      // the last star takes one more character
            i = ++star_i;
        } else {
            if (steps) *steps = n;
            return false;
        }
    }
    while (p < pat.size() && pat[p] == '*') ++p, ++n;
    if (steps) *steps = n;
    return p == pat.size();
}

ExpertFormat ModelConfig::expert_format_for(const std::string& module) const {
    if (expert_format == ExpertFormat::mxfp4) return ExpertFormat::mxfp4;
    for (const auto& pat : quant_ignore) {
        // A pattern ignores the module if it matches the module or any tensor inside it.
        if (glob_match(pat, module) || glob_match(pat, module + ".0.w1"))
            return ExpertFormat::mxfp4;
    }
    return ExpertFormat::nvfp4;
}

namespace {

struct Reader {
    const json&        j;
    const std::string& file;
    std::string        prefix;   // "quantization_config." for nested objects

    [[noreturn]] void bad(const std::string& field, const std::string& why) const {
        fail(file, ": field '", prefix, field, "' ", why);
    }
    const json* get(const std::string& field, bool required) const {
        auto it = j.find(field);
        if (it == j.end() || it->is_null()) {
            if (required) bad(field, "is missing");
            return nullptr;
        }
        return &*it;
    }
    int64_t integer(const std::string& field, bool required = true, int64_t def = 0) const {
        const json* v = get(field, required);
        if (!v) return def;
        if (v->is_number_integer()) return v->get<int64_t>();
        // Some configs write integers as 16.0; accept exact integral floats.
        if (v->is_number_float()) {
            const double d = v->get<double>();   // range-check before the cast, which is UB outside int64
            if (d >= -9.2e18 && d <= 9.2e18 && d == std::trunc(d)) return static_cast<int64_t>(d);
        }
        bad(field, str("must be an integer, got ", v->dump()));
    }
    // Dimensions are bounded so that products of them (tensor sizes) cannot overflow int64.
    int64_t positive(const std::string& field, int64_t max = int64_t{1} << 20) const {
        int64_t v = integer(field);
        if (v <= 0) bad(field, str("must be positive, got ", v));
        if (v > max) bad(field, str("= ", v, " is larger than this engine supports (", max, ")"));
        return v;
    }
    double number(const std::string& field, bool required = true, double def = 0) const {
        const json* v = get(field, required);
        if (!v) return def;
        if (!v->is_number()) bad(field, str("must be a number, got ", v->dump()));
        return v->get<double>();
    }
    std::string string(const std::string& field, bool required = true, const std::string& def = "") const {
        const json* v = get(field, required);
        if (!v) return def;
        if (!v->is_string()) bad(field, str("must be a string, got ", v->dump()));
        return v->get<std::string>();
    }
    void expect_string(const std::string& field, const std::string& want, bool required) const {
        if (!get(field, required)) return;
        std::string s = string(field);
        if (s != want) bad(field, str("= \"", s, "\" is not supported (expected \"", want, "\")"));
    }
};

void parse_quantization(const json& root, const std::string& file, ModelConfig& c) {
    Reader top{root, file, ""};
    const json* q = top.get("quantization_config", true);
    if (!q->is_object()) top.bad("quantization_config", "must be an object");
    Reader r{*q, file, "quantization_config."};
    r.expect_string("quant_method", "fp8", true);
    r.expect_string("fmt", "e4m3", false);
    r.expect_string("scale_fmt", "ue8m0", false);
    if (const json* b = r.get("weight_block_size", true);
        !(b->is_array() && *b == json::array({128, 128}))) {
        r.bad("weight_block_size", str("= ", b->dump(), " is not supported (expected [128, 128])"));
    }
    std::string moe = r.string("moe_quant_algo", false, "");
    if (moe.empty() || moe == "MXFP4") {
        c.expert_format = ExpertFormat::mxfp4;
    } else if (moe == "NVFP4") {
        c.expert_format = ExpertFormat::nvfp4;
        if (const json* ig = r.get("ignore", false)) {
            if (!ig->is_array()) r.bad("ignore", "must be an array of strings");
            for (const auto& p : *ig) {
                if (!p.is_string()) r.bad("ignore", str("entries must be strings, got ", p.dump()));
                c.quant_ignore.push_back(p.get<std::string>());
            }
        }
        int64_t g = r.integer("group_size", false, 16);
        if (g != 16) r.bad("group_size", str("= ", g, " is not supported for NVFP4 (expected 16)"));
    } else {
        r.bad("moe_quant_algo", str("= \"", moe, "\" is not supported (expected NVFP4 or absent)"));
    }
}

void parse_rope(const json& root, const std::string& file, ModelConfig& c) {
    Reader r{root, file, ""};
    c.rope_theta = r.number("rope_theta");
    c.compress_rope_theta = r.number("compress_rope_theta");
    if (c.rope_theta <= 0) r.bad("rope_theta", "must be positive");
    if (c.compress_rope_theta <= 0) r.bad("compress_rope_theta", "must be positive");
    const json* s = r.get("rope_scaling", false);
    if (!s) return;   // no YaRN on compressed layers either
    if (!s->is_object()) r.bad("rope_scaling", "must be an object");
    Reader y{*s, file, "rope_scaling."};
    const char* type_field = y.get("type", false) ? "type" : "rope_type";
    std::string type = y.string(type_field, false, "");
    if (type != "yarn") y.bad(type_field, str("= \"", type, "\" is not supported (expected \"yarn\")"));
    c.yarn.factor = y.number("factor");
    c.yarn.original_max_position_embeddings = y.positive("original_max_position_embeddings");
    c.yarn.beta_fast = y.number("beta_fast");
    c.yarn.beta_slow = y.number("beta_slow");
    if (c.yarn.factor < 1) y.bad("factor", "must be >= 1");
    if (c.yarn.beta_fast <= c.yarn.beta_slow || c.yarn.beta_slow <= 0)
        y.bad("beta_fast", "must exceed beta_slow > 0");
}

}  // namespace

ModelConfig parse_model_config(const std::string& text, const std::string& file) {
    json root;
    try {
        root = json::parse(text);
    } catch (const json::exception& e) {
        fail(file, ": not valid JSON: ", e.what());
    }
    if (!root.is_object()) fail(file, ": top level must be a JSON object");
    Reader r{root, file, ""};
    ModelConfig c;

    c.vocab_size = r.positive("vocab_size", int64_t{1} << 31);
    c.hidden_size = r.positive("hidden_size");
    c.num_hidden_layers = r.positive("num_hidden_layers");
    c.num_attention_heads = r.positive("num_attention_heads");
    c.head_dim = r.positive("head_dim");
    c.qk_rope_head_dim = r.positive("qk_rope_head_dim");
    c.q_lora_rank = r.positive("q_lora_rank");
    c.o_groups = r.positive("o_groups");
    c.o_lora_rank = r.positive("o_lora_rank");
    c.sliding_window = r.positive("sliding_window");
    c.index_n_heads = r.positive("index_n_heads");
    c.index_head_dim = r.positive("index_head_dim");
    c.index_topk = r.positive("index_topk");
    c.n_routed_experts = r.positive("n_routed_experts");
    c.num_experts_per_tok = r.positive("num_experts_per_tok");
    c.moe_intermediate_size = r.positive("moe_intermediate_size");
    c.n_shared_experts = r.integer("n_shared_experts");
    c.num_hash_layers = r.integer("num_hash_layers");
    c.routed_scaling_factor = r.number("routed_scaling_factor");
    c.swiglu_limit = r.number("swiglu_limit");
    c.hc_mult = r.positive("hc_mult");
    c.hc_sinkhorn_iters = r.positive("hc_sinkhorn_iters");
    c.hc_eps = r.number("hc_eps");
    c.rms_norm_eps = r.number("rms_norm_eps");
    c.num_nextn_predict_layers = r.integer("num_nextn_predict_layers", false, 0);
    c.max_position_embeddings = r.positive("max_position_embeddings", int64_t{1} << 40);
    c.bos_token_id = r.integer("bos_token_id", false, 0);
    c.eos_token_id = r.integer("eos_token_id", false, 1);
    // Token ids index the vocabulary: a negative or too large one would never match (EOS) or
    // would index past the embedding (BOS).
    for (const auto& [field, id] : {std::pair{"bos_token_id", c.bos_token_id}, std::pair{"eos_token_id", c.eos_token_id}})
        if (id < 0 || id >= c.vocab_size)
            r.bad(field, str("= ", id, " is not a token id: it must be in [0, vocab_size = ", c.vocab_size, ")"));
    parse_rope(root, file, c);
    parse_quantization(root, file, c);

    // Values this engine implements exactly one way.
    r.expect_string("scoring_func", "sqrtsoftplus", true);
    r.expect_string("topk_method", "noaux_tc", false);
    r.expect_string("hidden_act", "silu", false);
    r.expect_string("expert_dtype", "fp4", false);
    if (r.integer("num_key_value_heads", false, 1) != 1)
        r.bad("num_key_value_heads", "must be 1 (one shared K=V latent)");
    if (const json* t = r.get("tie_word_embeddings", false); t && !(t->is_boolean() && !t->get<bool>()))
        r.bad("tie_word_embeddings", "must be false (separate embed and head)");
    if (const json* n = r.get("norm_topk_prob", false); n && !(n->is_boolean() && n->get<bool>()))
        r.bad("norm_topk_prob", "must be true");

    // Shape relations.
    if (c.qk_rope_head_dim % 2 || c.qk_rope_head_dim > c.head_dim)
        r.bad("qk_rope_head_dim", str("= ", c.qk_rope_head_dim, " must be even and <= head_dim ", c.head_dim));
    if (c.index_head_dim < c.qk_rope_head_dim)
        r.bad("index_head_dim", str("= ", c.index_head_dim, " must be >= qk_rope_head_dim"));
    if (c.num_attention_heads % c.o_groups)
        r.bad("o_groups", str("= ", c.o_groups, " must divide num_attention_heads ", c.num_attention_heads));
    if (c.num_experts_per_tok > c.n_routed_experts)
        r.bad("num_experts_per_tok", str("= ", c.num_experts_per_tok, " exceeds n_routed_experts"));
    if (c.n_shared_experts != 1) r.bad("n_shared_experts", str("= ", c.n_shared_experts, " is not supported (expected 1)"));
    if (c.num_hash_layers < 0 || c.num_hash_layers > c.num_hidden_layers)
        r.bad("num_hash_layers", str("= ", c.num_hash_layers, " must be in [0, num_hidden_layers]"));
    if (c.hc_eps < 0) r.bad("hc_eps", "must be >= 0");
    if (c.rms_norm_eps <= 0) r.bad("rms_norm_eps", "must be positive");
    if (!(c.swiglu_limit > 0)) r.bad("swiglu_limit", str("= ", c.swiglu_limit, " must be positive"));
    if (c.num_nextn_predict_layers < 0 || c.num_nextn_predict_layers > 1)
        r.bad("num_nextn_predict_layers", "must be 0 or 1");

    const json* cr = r.get("compress_ratios", true);
    if (!cr->is_array()) r.bad("compress_ratios", "must be an array");
    for (const auto& v : *cr) {
        if (!v.is_number_integer() || v.get<int64_t>() < 0)
            r.bad("compress_ratios", str("entries must be non-negative integers, got ", v.dump()));
        c.compress_ratios.push_back(v.get<int64_t>());
    }
    const size_t want = static_cast<size_t>(c.num_hidden_layers) + 1;
    if (c.compress_ratios.size() != want)
        r.bad("compress_ratios", str("has ", c.compress_ratios.size(), " entries, expected num_hidden_layers + 1 = ",
                                     want, " (the last is the MTP block)"));
    if (c.compress_ratios.back() != 0)
        r.bad("compress_ratios", "last entry (MTP block) must be 0");
    return c;
}

ModelConfig load_model_config(const std::string& model_dir) {
    const std::string path = model_dir + "/config.json";
    std::ifstream f(path, std::ios::binary);
    if (!f) fail(path, ": cannot open");
    std::stringstream ss;
    ss << f.rdbuf();
    return parse_model_config(ss.str(), path);
}

}  // namespace megamoe
