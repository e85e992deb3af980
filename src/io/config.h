// config.h — the model description, parsed once from a checkpoint's config.json.
//
// Field names follow config.json (snake_case already). Everything the engine uses is required
// and validated; a missing required field or an unsupported value throws megamoe::Error naming
// the field ("config.json: field 'compress_ratios' ..."). Fields the engine does not use are
// ignored. Per layer: compress ratio 0 -> sliding-window attention only; 4 -> CSA (overlapping
// compressor + lightning indexer); any other ratio -> HCA (non-overlapping compressor). Layers
// below num_hash_layers route by token id (tid2eid); the rest by score.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace megamoe {

enum class AttnKind : uint8_t { sliding, csa, hca };
enum class RouterKind : uint8_t { hash, score };
enum class ExpertFormat : uint8_t { mxfp4, nvfp4 };

const char* attn_kind_name(AttnKind k);       // "SWA" | "CSA" | "HCA"
const char* expert_format_name(ExpertFormat f);

struct YarnConfig {
    double factor = 1;                        // rope_scaling.factor
    int64_t original_max_position_embeddings = 0;
    double beta_fast = 32, beta_slow = 1;
};

struct ModelConfig {
    int64_t vocab_size = 0;
    int64_t hidden_size = 0;                  // D
    int64_t num_hidden_layers = 0;            // L (the MTP block is extra)
    int64_t num_attention_heads = 0;          // H
    int64_t head_dim = 0;                     // 512 in the releases
    int64_t qk_rope_head_dim = 0;             // trailing dims that carry RoPE
    int64_t q_lora_rank = 0;
    int64_t o_groups = 0;
    int64_t o_lora_rank = 0;
    int64_t sliding_window = 0;               // keys per query, the query included
    double  rope_theta = 0;                   // base on ratio-0 layers, no YaRN
    double  compress_rope_theta = 0;          // base on compressed layers, with YaRN
    YarnConfig yarn;
    std::vector<int64_t> compress_ratios;     // L + 1 entries; the last is the MTP block's
    int64_t index_n_heads = 0;
    int64_t index_head_dim = 0;
    int64_t index_topk = 0;
    int64_t n_routed_experts = 0;             // E
    int64_t num_experts_per_tok = 0;          // k
    int64_t moe_intermediate_size = 0;        // expert width I
    int64_t n_shared_experts = 0;             // 1 (width = n_shared · I)
    int64_t num_hash_layers = 0;
    double  routed_scaling_factor = 1;
    double  swiglu_limit = 0;                 // gate clamped above, up clamped to ±limit
    int64_t hc_mult = 0;                      // hyper-connection streams
    int64_t hc_sinkhorn_iters = 0;
    double  hc_eps = 0;
    double  rms_norm_eps = 0;
    int64_t num_nextn_predict_layers = 0;
    int64_t max_position_embeddings = 0;
    int64_t bos_token_id = 0, eos_token_id = 1;
    ExpertFormat expert_format = ExpertFormat::mxfp4;   // from quantization_config.moe_quant_algo
    std::vector<std::string> quant_ignore;    // quantization_config.ignore: modules left unconverted

    // The routed-expert format of a module ("layers.3.ffn.experts", "mtp.0.ffn.experts"): NVFP4
    // releases convert only the main layers' experts; a module matched by `ignore` (the MTP block,
    // "mtp.*") keeps the official MXFP4. Decoding those as NVFP4 was a real vLLM bug.
    ExpertFormat expert_format_for(const std::string& module) const;

    AttnKind   attn_kind(int64_t layer) const;          // layer may be L for the MTP block
    RouterKind router_kind(int64_t layer) const;        // the MTP block always routes by score
    int64_t    ratio(int64_t layer) const;                  // layer in [0, L]
    int64_t    nope_dim() const { return head_dim - qk_rope_head_dim; }
    int64_t    heads_per_group() const { return num_attention_heads / o_groups; }
    int64_t    mix_width() const { return (2 + hc_mult) * hc_mult; }   // mHC pre|post|comb
};

// Glob match with '*' only, as quantization_config.ignore uses ("*.attn.*", "mtp.*"). Its cost is
// O(|pattern| · |s|) whatever the pattern: when `steps` is given it receives the number of steps
// taken, at most (|pattern| + 1) · (|s| + 2) (the argument is at the definition).
bool glob_match(std::string_view pattern, std::string_view s, int64_t* steps = nullptr);

// Parse config.json text; `file` names the source in errors. Validates every used field.
ModelConfig parse_model_config(const std::string& json_text, const std::string& file);
ModelConfig load_model_config(const std::string& model_dir);   // reads DIR/config.json

}  // namespace megamoe
