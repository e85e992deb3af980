// speculative.h — speculative decoding on the CPU reference with the checkpoint's MTP block as the
// draft model (the specification; deepseek-v4.md §5, issue 12).
//
// A round, with L tokens accepted so far (prompt + output) and the main model one position behind
// (it has processed positions 0..L-2; the last accepted token x = S[L-1] is not fed yet):
//   1. Draft. The MTP block catches up on the positions the main model has processed (real main
//      streams, known next tokens) and its last row, position L-2 with token x, gives q_1 and draft
//      d_1 (a guess of S[L]). For k > 1 the MTP block is chained as DeepSeek's sequential MTP
//      modules are: the checkpoint has one block (mtp.0), so the same block runs again at the next
//      position with its own pre-head streams in place of the main model's and the token d_{k-1}.
//      The chained positions run on a scratch copy of the MTP state (a window of <= W-1 rows), so
//      they never enter the sequence's MTP state: it only ever holds positions with real main
//      streams and accepted tokens.
//   2. Verify. One main-model forward over the K+1 positions L-1..L-1+K (tokens x, d_1..d_K) gives
//      p_0..p_K (p_i: the main model's distribution for the token after the i-th of those).
//   3. Accept. Greedy: d_i is accepted while it equals argmax p_{i-1}; the first mismatch is replaced
//      by that argmax; if all K are accepted, argmax p_K is added. Sampling: d_i is accepted with
//      probability min(1, p(d_i) / q(d_i)); on rejection the token is drawn from
//      normalize(max(0, p - q)) and the round ends; if all K are accepted a bonus token is drawn
//      from p_K. So a round yields 1..K+1 tokens and every token has the main model's distribution.
//   4. Roll back. The main state has advanced K+1 positions but only j+1 (x and the j accepted
//      drafts) belong to the sequence. See checkpoint_state below for how it is put back.
//
// Random numbers: 53 random bits keyed on (seed, stream, index of the token in the output), from
// the caller's SpeculativeSampling::bits. Stream 0 is the plain sampler's draw (serve/sampler.h:
// a token drawn from p alone), the others are this file's: the draft's draw, the acceptance test
// and the residual draw. So a run is reproducible from its seed and does not depend on how many
// random numbers earlier rounds used.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "ref/model.h"

namespace megamoe {

// ---- state checkpoint / restore
//
// A forward over new tokens rewrites, per layer, the window (its last W-1 kv rows) and each
// compressor's open window (pending tokens, the previous window's series A, counters), and appends
// to the compressors' emitted rows; rows already emitted are never changed (ref/compressor.h). A
// checkpoint copies the rewritten parts (their size does not grow with the sequence: at most W-1
// window rows and one compressor window per layer) and the number of emitted rows; restore copies
// them back and truncates the rows. The MTP block's state (one window) is copied whole.
//
// Rollback after a verification that accepted j of K drafts = restore the checkpoint taken before
// it, then run the j+1 accepted tokens again (one forward of <= K tokens, only on rounds with a
// rejection). Why not truncate in place: the state after an arbitrary prefix of the verified tokens
// cannot be rebuilt from the states before and after them, since a compressor window that closes
// inside the step drops its pending tokens (and keeps only the last window's series A); truncating
// would need forward() to keep every token's compressor inputs. Nothing before the round is
// recomputed, and forward's results do not depend on chunking, so the state is the one a run of
// the accepted tokens alone gives, bit for bit (tests/ref/speculative_test.cpp).
struct CompressorCheckpoint {
    std::vector<float> pending_kv, pending_gate, prev_kv, prev_gate;
    int64_t n_pending = 0, n_rows = 0;
    size_t rows_size = 0;                          // rows.size() at the checkpoint (n_rows · d)
};
struct LayerCheckpoint {
    std::vector<float> window;                     // [n_window, head_dim]
    int64_t n_window = 0;
    CompressorCheckpoint comp, index_comp;
};
struct StateCheckpoint {
    int64_t n_past = 0;
    std::vector<LayerCheckpoint> layers;
    MtpState mtp;
};
StateCheckpoint checkpoint_state(const SequenceState& st);
// Puts `st` back to the checkpoint taken from it. Throws Error if `st` is not that sequence's state
// at or after the checkpoint (fewer positions or rows than recorded, another layer count).
void restore_state(SequenceState& st, const StateCheckpoint& cp);

// ---- speculative generation

// How tokens are drawn when sampling (ref/ does not depend on serve/; serve/sampler.h's
// sampling_weights and sampling_bits are the definition callers supply). weights: the integer
// weights W [V] (id i drawn with probability W_i / Σ W, Σ W < 2^63) the sampler draws from for a
// logits row [V]; the same definition turns the MTP logits into the draft distribution q. bits: 53
// random bits keyed on (stream, token index) and the caller's seed (the uniform is bits · 2^-53).
enum class SpecStream : uint32_t { sample = 0, draft = 1, accept = 2, residual = 3 };
struct SpeculativeSampling {
    std::function<void(const float* logits, int64_t vocab, std::vector<uint64_t>& W)> weights;
    std::function<uint64_t(SpecStream stream, int64_t index)> bits;
};

// The rule's arithmetic, exact in integers so that the GPU (cuda::spec_accept_rows) decides the
// same from the same weights and bits. p = Wp / Mp (the main model's), q = Wq / Mq (the draft's),
// Mp = Σ Wp, Mq = Σ Wq, both in (0, 2^63); x: 53 random bits.
//   spec_draw: the first id, in ascending order, whose running Σ W exceeds floor(x · Σ W / 2^53)
//     (serve/sampler.h step 8); -1 when Σ W == 0.
//   spec_accepts: x · 2^-53 < p(d) / q(d), i.e. floor(x · Mp · wq / 2^53) < wp · Mq with
//     wp = Wp[d], wq = Wq[d] (products of up to 179 bits, taken exactly). q(d) = 0 (d cannot have
//     been drawn from q) accepts when p(d) > 0.
//   spec_residual: a draw (as spec_draw) from R_v = max(0, Wp_v · Mq − Wq_v · Mp), which is
//     max(0, p − q) scaled by Mp · Mq (Σ R <= Mp · Mq < 2^126: exact in 128 bits); -1 when R is 0
//     everywhere (p == q, where every draft is accepted).
int32_t spec_draw(const uint64_t* W, int64_t V, uint64_t x);
bool    spec_accepts(uint64_t wp, uint64_t Mp, uint64_t wq, uint64_t Mq, uint64_t x);
int32_t spec_residual(const uint64_t* Wp, const uint64_t* Wq, int64_t V, uint64_t x);
// floor(x · b / 2^53) for x < 2^53 and b < 2^126 (the result < 2^126).
unsigned __int128 mul_shift53(uint64_t x, unsigned __int128 b);

// The acceptance rule. always_accept is wrong on purpose (every draft is kept): the distribution
// test runs it to show that it detects a broken rule.
enum class AcceptRule { standard, always_accept };

constexpr int64_t kMaxSpeculativeTokens = 3;

struct SpeculativeOptions {
    int64_t draft_tokens = 1;                      // K in 1..3 (0: no speculation, one token per step)
    int64_t chunk = 0;                             // prefill the prompt in chunks of this many tokens; 0: one
    bool ignore_eos = false;
    const SpeculativeSampling* sampling = nullptr; // nullptr: greedy
    AcceptRule rule = AcceptRule::standard;
};

struct SpeculativeStats {
    int64_t rounds = 0;            // verification steps of the main model (prefill excluded)
    int64_t drafted = 0;           // draft tokens proposed
    int64_t accepted = 0;          // draft tokens accepted
    int64_t round_tokens = 0;      // tokens the rounds produced (before truncation to max_new)
    int64_t rerun_steps = 0;       // rollbacks: forwards that re-ran the accepted tokens
    double acceptance_rate() const { return drafted ? static_cast<double>(accepted) / static_cast<double>(drafted) : 0.0; }
    double tokens_per_round() const { return rounds ? static_cast<double>(round_tokens) / static_cast<double>(rounds) : 0.0; }
};

struct SpeculativeResult {
    std::vector<int32_t> tokens;   // the new ids
    SpeculativeStats stats;
};

// Prefill `prompt`, take the first token from the main model, then speculative rounds until
// max_new tokens (a round's extra tokens are cut off), EOS (unless ignore_eos) or the context
// (max_position_embeddings: a round drafts fewer tokens near it). Greedy output equals
// generate_greedy's; sampled output has the main model's distribution. Throws Error for K outside
// 0..3 (--speculative-tokens), an empty prompt, or a checkpoint without an MTP block (K > 0).
SpeculativeResult generate_speculative(const Model& m, const std::vector<int32_t>& prompt, int64_t max_new,
                                       const SpeculativeOptions& o);

// The prefill alone: the state the rounds start from (the prompt run in chunks of o.chunk and, for
// K > 0, the MTP block fed every prompt position whose next token is known) and the last prompt
// position's logits. It depends on the prompt, the chunking and whether K > 0, not on the
// sampling, so many continuations of one prompt (other seeds) can start from one prefill:
// generate_speculative(m, prefill_speculative(m, prompt, o), max_new, o) is
// generate_speculative(m, prompt, max_new, o), token for token.
struct SpeculativePrefill {
    SequenceState state;
    std::vector<int32_t> prompt;
    std::vector<float> pending;   // main pre-head streams [n, hc·D] of positions the MTP block has not seen
    std::vector<float> logits;    // [V] of the last prompt position
    bool mtp_fed = false;         // prepared for K > 0
};
SpeculativePrefill prefill_speculative(const Model& m, const std::vector<int32_t>& prompt, const SpeculativeOptions& o);
// Continues from a copy of `from` (which is left as it is). Throws Error when `from` was prepared
// for K = 0 and o asks for drafts, or the other way round.
SpeculativeResult generate_speculative(const Model& m, const SpeculativePrefill& from, int64_t max_new,
                                       const SpeculativeOptions& o);

// ---- the serving engine (GPU backend: gpu/runner.h step_spec)
//
// The engine runs the rounds above with the same rule and the same keys: drafts drawn from q with
// (draft, index), accepted by spec_accepts with (accept, index), a rejection's token drawn by
// spec_residual with (residual, index), the bonus token and every token of a round without drafts
// drawn from p with the plain sampler's key (sample, index); greedy requests take argmaxes. So a
// request's output has the main model's distribution, and given the same logits it is the tokens
// generate_speculative gives. Its rounds differ from the ones above in scheduling only: the MTP
// block runs in the verification step itself over every verified position (given the token drawn
// there), and rejected positions are dropped by a rewind where that is exact.
//
// The token after each position of such a step, for the MTP block: out[t] = given[t] where
// given[t] >= 0 (a prompt's next token), else drawn[-1 - given[t]] (the token drawn at that logit
// row: for a verified token, the accepted draft or the correction or the bonus token).
// The CPU twin of cuda::resolve_next_tokens.
void resolve_next_tokens(const int32_t* given, const int32_t* drawn, int64_t T, int32_t* out);

}  // namespace megamoe
