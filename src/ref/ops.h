// ops.h — the table of contents of the math: every op of the DeepSeek-V4 forward, CPU backend.
//
// These are the specification twins: plain fp32 loops, threads (parallel.h) only on outer loops, every result
// independent of how many tokens are processed together (each output element is computed in one
// fixed order), so prefill, chunked prefill and decode give bit-identical results. Activations are
// contiguous row-major f32 arrays; the shape comment on each declaration is its contract
// (T tokens, D hidden, H heads, hd head_dim, r rope dims, hc streams, E experts, k experts/token).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/numerics.h"
#include "io/config.h"
#include "io/weights.h"

namespace megamoe {

const char* numerics_name(Numerics nm);            // "exact" | "official"
Numerics parse_numerics(const std::string& name);  // throws Error naming the value

}  // namespace megamoe

namespace megamoe::ops {

// ---- basic
// out[T, D] = embed[ids[t], :]                              embed: bf16 [V, D]
void embed(const Tensor& table, const int32_t* ids, int64_t T, float* out);
// X[t, j, :] += b[t, :] for every stream j < hc. X f32 [T, hc, D], b f32 [T, D].
// (The MTP block's input: h_proj of each stream plus e_proj of the next token.)
void add_to_streams(const float* b, int64_t T, int64_t hc, int64_t D, float* X);
// y[T, D] = x * rsqrt(mean(x²) + eps) (* w)                 w: bf16 [D] or nullptr (unweighted)
void rms_norm(const float* x, int64_t T, int64_t D, const Tensor* w, float eps, float* y);
// y[T, N] = x[T, K] · Wᵀ                                    W: [N, K] any LinearFormat
void linear(const Linear& W, const float* x, int64_t T, float* y);
// y[T, G, R] = x[T, G, K] ·g W[gR:(g+1)R, :]ᵀ, one weight block per group (wo_a)   W: [G·R, K]
void grouped_linear(const Linear& W, int64_t groups, const float* x, int64_t T, float* y);

// ---- rotary embedding (interleaved pairs on the trailing rope dims of each head)
struct RopeTable {
    int64_t rope_dim = 0;               // r
    std::vector<float> inv_freq;        // [r/2]
};
// base^(-2i/r), with YaRN blending when yarn != nullptr (as the official code and HF compute it in f32).
RopeTable make_rope_table(double base, int64_t rope_dim, const YarnConfig* yarn);
// x[T, heads, head_dim]: rotate dims [head_dim - r, head_dim) of every head by pos[t]·f (inverse: conjugate).
void rope(float* x, int64_t T, int64_t heads, int64_t head_dim, const int64_t* pos, const RopeTable& table,
          bool inverse);

// ---- manifold-constrained hyper-connections
// From X[T, hc, D]: u[T, D] = Σ_j pre_j X[j]; post[T, hc]; comb[T, hc, hc] (Sinkhorn, doubly stochastic).
void hc_pre(const HyperConnWeights& w, const ModelConfig& c, const float* X, int64_t T, float* u, float* post,
            float* comb);
// out[T, hc, D]: out[k] = post_k · y + Σ_j comb[j][k] · res[j]          (the transposed comb)
void hc_post(const float* y, const float* res, const float* post, const float* comb, int64_t T, int64_t hc,
             int64_t D, float* out);
// u[T, D] = Σ_j (sigmoid(mix_j · scale + base_j) + eps) X[j]           (the final collapse)
void hc_head(const HyperHeadWeights& w, const ModelConfig& c, const float* X, int64_t T, float* u);

// ---- attention pieces
// One query's attention over explicit key rows with a per-head sink:
// o[H, hd] = Σ_j softmax([q·k_j·scale ..., sink_h])_j k_j (sink column dropped); keys[n] point to rows of hd.
// official: the probabilities are rounded to bf16 before they weight the values (the normalizer
// stays f32) and o is rounded to bf16, as the official sparse_attn kernel does.
void attend_one(const float* q, int64_t H, int64_t hd, const float* const* keys, int64_t n_keys,
                const float* sink, float scale, float* o, Numerics nm = Numerics::exact);
// Gated pooling of one compressed row (fp32): c[f] = Σ_s softmax_s(gate[s][f]) kv[s][f] over n_slots,
// slots given as row pointers of width d (gate already includes the position bias).
void compress_pool(const float* const* kv, const float* const* gate, int64_t n_slots, int64_t d, float* out);
// Lightning-indexer scores of one query against rows [0, n_rows):
// score[s] = Σ_h w[h] · relu(q[h]·K[s]) · hd^-0.5            q: [nh, hd]  K: [n_rows, hd]  w: [nh]
void indexer_scores(const float* q, const float* w, int64_t nh, int64_t hd, const float* K, int64_t n_rows,
                    float* score);
// Indices of the k largest scores (ties -> lower index), returned ascending.   score: [n]
std::vector<int32_t> topk_indices(const float* score, int64_t n, int64_t k);

// ---- MoE
// Score router: s = sqrt(softplus(x · gateᵀ)); ids = top-k of s + bias (ties -> lower index);
// weights = s[ids] / Σ s[ids] · scale.   x: [T, D]  ids, wts: [T, k]
void route_score(const MoeWeights& m, const ModelConfig& c, const float* x, int64_t T, int32_t* ids, float* wts);
// Hash router: ids = tid2eid[token]; weights as above from the same scores.
void route_hash(const MoeWeights& m, const ModelConfig& c, const float* x, const int32_t* tokens, int64_t T,
                int32_t* ids, float* wts);
// Weights of given experts: ids [T, k] (any, e.g. forced by a probe); wts as above.
void route_weights(const MoeWeights& m, const ModelConfig& c, const float* x, int64_t T, const int32_t* ids,
                   float* wts);
// Clamped SwiGLU expert: y[T, D] = w2 · (silu(min(w1·x, L)) · clamp(w3·x, ±L) · scale[t])
// scale: [T] per-token routing weight or nullptr (shared expert).
// official: linear_rounded for w1/w3/w2, and the SwiGLU output rounded to bf16 before w2.
void expert_ffn(const ExpertWeights& e, float limit, const float* x, int64_t T, const float* scale, float* y,
                Numerics nm = Numerics::exact);
// y[T, D] = Σ_k wts[t,k] · expert_{ids[t,k]}(x[t]) + shared(x[t])     (fp32 accumulation)
// official: experts as expert_ffn says; the f32 sum (routed, then shared) is rounded to bf16.
void moe(const MoeWeights& m, const ModelConfig& c, const float* x, int64_t T, const int32_t* ids,
         const float* wts, float* y, Numerics nm = Numerics::exact);

// ---- numerics: where the official inference code rounds activations (deepseek-v4.md §2.3-2.5)
// In exact numerics (the default, the goldens' specification) every function below that takes a
// Numerics leaves its input untouched; in official numerics it applies the official code's rounding.
// The rounding sites of the network are in forward.cpp, compressor.cpp and mtp.cpp, each one call.

// Round to bf16 (RNE), as torch's .to(torch.bfloat16).
float bf16_round(float v);
// x[n]: every value to bf16 (official: the official code keeps this activation in bf16).
void round_bf16(Numerics nm, float* x, int64_t n);
// x[n], always rounded: per block of `block` values (the last block may be shorter),
// amax = max(max|x|, 1e-4), s = 2^ceil(log2(amax/448)), x = bf16(e4m3(clamp(x/s, ±448))·s).
void fp8_block_qdq(float* x, int64_t n, int64_t block);
// x[n], always rounded: per block of `block` values, amax = max(max|x|, 6·2^-126),
// s = 2^ceil(log2(amax/6)), x = bf16(e2m1(clamp(x/s, ±6))·s).
void fp4_block_qdq(float* x, int64_t n, int64_t block);
// x[n] = H_n x / sqrt(n): the Sylvester-ordered Walsh-Hadamard transform in f32; n a power of two.
void hadamard(float* x, int64_t n);
// kv[n, hd]: FP8 e4m3 rounding of the non-RoPE dims [0, hd - rope) in 64-blocks (window and
// compressed attention rows).
void round_kv_latent(Numerics nm, float* kv, int64_t n, int64_t hd, int64_t rope);
// x[n, hd]: rows rotated by the hd-point Hadamard transform, rounded to bf16, then FP4 (E2M1) in
// 32-blocks (indexer queries and compressed indexer keys).
void round_indexer_qk(Numerics nm, float* x, int64_t n, int64_t hd);
// x[T, K]: FP8 e4m3 rounding in 1x128 blocks with power-of-two scales (the input of a linear whose
// weights are FP8 or FP4: the official W8A8 / W4A8 GEMMs).
void round_gemm_input(Numerics nm, float* x, int64_t T, int64_t K);
// y[T, N] = x[T, K] · Wᵀ as the official code runs a quantized or bf16 linear: exact: linear();
// official: FP8/FP4 weights get the input rounded by round_gemm_input, and the output is bf16.
// (The f32 linears of the official code, compressor wkv/wgate, router gate and head, use linear().)
void linear_rounded(Numerics nm, const Linear& W, const float* x, int64_t T, float* y);
// x[n, hd] in place: the official per-head unweighted q norm, done on a bf16 tensor (each op's
// result rounded to bf16: squares, mean, + eps, rsqrt, product).
void head_rms_norm_bf16(float* x, int64_t n, int64_t hd, float eps);
// The official lightning-indexer score of one query (bf16 einsum and reductions):
// score[s] = bf16(Σ_h bf16(relu(bf16(q[h]·K[s])) · w[h]))   q: [nh, hd]  K: [n_rows, hd]
// w: [nh] bf16 values already scaled by hd^-0.5 · nh^-0.5.
void indexer_scores_bf16(const float* q, const float* w, int64_t nh, int64_t hd, const float* K, int64_t n_rows,
                         float* score);

}  // namespace megamoe::ops
