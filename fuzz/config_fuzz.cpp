// config_fuzz.cpp — libFuzzer target for config.json -> ModelConfig, quantization_config and its
// `ignore` globs included.
//
// Rejection must be a megamoe::Error. What is accepted must satisfy what the engine relies on:
// one compress ratio per layer plus the MTP block, every layer classifiable, positive sizes, the
// head split evenly into groups; and expert_format_for() must answer for any module name (the
// glob matcher once hung on "**************Q").
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz_util.h"
#include "io/config.h"

using namespace megamoe;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string text(reinterpret_cast<const char*>(data), size);
    ModelConfig c;
    try {
        c = parse_model_config(text, "fuzz/config.json");
    } catch (const Error&) {
        return 0;   // expected for malformed input
    }
    FUZZ_CHECK(c.num_hidden_layers > 0);
    FUZZ_CHECK(c.compress_ratios.size() == static_cast<size_t>(c.num_hidden_layers) + 1);
    for (int64_t l = 0; l <= c.num_hidden_layers; ++l) {
        FUZZ_CHECK(c.ratio(l) >= 0);
        const AttnKind k = c.attn_kind(l);
        FUZZ_CHECK(k == AttnKind::sliding || k == AttnKind::csa || k == AttnKind::hca);
        FUZZ_CHECK((k == AttnKind::sliding) == (c.ratio(l) == 0));
        (void)c.router_kind(l);
    }
    FUZZ_CHECK(c.router_kind(c.num_hidden_layers) == RouterKind::score);
    FUZZ_CHECK(c.vocab_size > 0 && c.hidden_size > 0 && c.num_attention_heads > 0 && c.head_dim > 0);
    FUZZ_CHECK(c.qk_rope_head_dim >= 0 && c.qk_rope_head_dim <= c.head_dim);
    FUZZ_CHECK(c.o_groups > 0 && c.num_attention_heads % c.o_groups == 0);
    FUZZ_CHECK(c.n_routed_experts > 0 && c.num_experts_per_tok > 0 && c.num_experts_per_tok <= c.n_routed_experts);
    FUZZ_CHECK(c.hc_mult > 0 && c.sliding_window > 0 && c.max_position_embeddings > 0);
    // The ignore globs over module names of every kind, and over the patterns themselves.
    for (const std::string m : {"layers.0.ffn.experts", "mtp.0.ffn.experts", "head", "layers.12.attn.wq_a"})
        (void)c.expert_format_for(m);
    for (const auto& pat : c.quant_ignore) (void)c.expert_format_for(pat);
    if (c.expert_format == ExpertFormat::mxfp4) FUZZ_CHECK(c.expert_format_for("layers.0.ffn.experts") == ExpertFormat::mxfp4);
    return 0;
}
