// hyper_conn_test.cpp — the GPU mHC kernels (src/cuda/hyper_conn.h) against their CPU twins.
//
// Twins: ops::hc_pre then ops::rms_norm (the pre site: xn, post, comb), ops::hc_head then
// ops::rms_norm (the head), ops::hc_post (the fused post), and f64 dot products for hc_mix's
// partial sums. All inputs are f32 on both sides (the GPU reads the streams, fn, base and scale as
// f32) except the norm weight, generated as bf16. Shapes: V4-Flash (D = 4096, hc = 4: fn is
// 24 × 16384 f32, 1.5 MB), V4-Pro (D = 7168), the tiny model (D = 256), odd D (257: scalar path;
// 4100: vectors but D % 8 != 0), T ∈ {1, 3, 17, 129}, hc = 2 and 8, and split counts that leave
// splits empty.
//
// Tolerances:
//  * X_out of the fused post: the kernel does ops::hc_post's f32 products and sums in its order
//    without contraction, so bit for bit.
//  * fused vs unfused: the mix of the fused X_out and of the same values given as X_in run the
//    same code in the same order: partial sums bit for bit.
//  * hc_mix partial sums (summed over splits in f64 here) against f64 dot products: every f32
//    partial is a sum of products rounded in a fixed order; a random-walk bound for N terms is
//    ~sqrt(N)·2^-24·Σ|terms|, and we allow (4·sqrt(n) + 64)·2^-24·Σ|terms| (for the sum of squares,
//    which cannot cancel, that is a relative 3.4e-5 at n = 16384; a wrong or missing 4-column item
//    of a dot is ~2/sqrt(n)·|x|, several times the allowance).
//  * post, comb (f32): mixes differ from the twin's f64 sums by ~1e-7 relative (f32 order, the
//    RMS factor applied after instead of before the dot); post = 2σ(z) moves by ≤ |scale|/2 of
//    that, and Sinkhorn's normalizations are contractions; both sides then run the identical
//    f32 operation sequence (expf within 2 ulp). Absolute 1e-5 on values in (0, 2) leaves two
//    orders of magnitude of margin and still catches a wrong index or a missed iteration.
//  * xn (bf16): the twin's f32 value c and the GPU's differ by the pre weights' error above
//    times Σ_j |X_j| (u can cancel), plus the RMS factor's f32 sum: relative 2^-8 (bf16 rounding,
//    as in rowwise_test.cpp) plus 2^-14 of the row's largest |c|.
#include <gtest/gtest.h>

#include "cuda/hyper_conn.h"

#ifdef MEGAMOE_HAVE_CUDA

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "core/common.h"
#include "cuda/buffer.h"
#include "cuda/linear.h"
#include "io/config.h"
#include "io/formats.h"
#include "io/weights.h"
#include "ref/ops.h"
#include "rowwise_test_util.h"
#include "test_util.h"

namespace megamoe {
namespace {

using cuda::DeviceArray;
using test::rw::expect_bf16_close;
using test::rw::expect_bits_equal;
using test::rw::expect_f32_close;
using test::rw::fake_ptr;
using test::rw::normal_rows;
using test::rw::to_bf16;

constexpr double kBf16Rel = 1.0 / 256;
constexpr double kXnAbs = 1.0 / 16384;
constexpr double kWeightAbs = 1e-5;
constexpr float kHcEps = 1e-6f, kNormEps = 1e-6f;
constexpr int64_t kIters = 20;

struct Site {
    int64_t T, hc, D;
    bool head = false;   // n_mix = hc (the HC head) instead of (2 + hc)·hc
    int64_t n() const { return hc * D; }
    int64_t nm() const { return head ? hc : (2 + hc) * hc; }
    std::string name() const { return str(head ? "head" : "pre", " T=", T, " hc=", hc, " D=", D); }
};

// Host inputs of one site: streams X [T, hc, D], fn [nm, n], base [nm], scale [3], norm w [D].
struct Inputs {
    std::vector<float> X, fn, base, scale;
    std::vector<uint16_t> norm_w;
};

Inputs make_inputs(const Site& s, uint32_t seed) {
    Inputs in;
    in.X = normal_rows(s.T * s.hc, s.D, seed, 1.0f, -2.0f, 2.0f);   // streams of different scales
    in.fn = normal_rows(s.nm(), s.n(), seed + 1, 1.0f / std::sqrt(static_cast<float>(s.n())));   // mixes ~ N(0, 1)
    in.base = normal_rows(1, s.nm(), seed + 2, 1.0f);
    std::mt19937 rng(seed + 3);
    std::uniform_real_distribution<float> u(0.5f, 2.0f);
    in.scale = {u(rng), u(rng), u(rng)};
    in.norm_w = to_bf16(normal_rows(1, s.D, seed + 4, 1.0f));
    return in;
}

ModelConfig config(const Site& s) {
    ModelConfig c;
    c.hc_mult = s.hc;
    c.hidden_size = s.D;
    c.hc_sinkhorn_iters = kIters;
    c.hc_eps = kHcEps;
    c.rms_norm_eps = kNormEps;
    return c;
}

// The twin's outputs of a site: xn (f32, before the bf16 rounding), post, comb.
struct Ref {
    std::vector<float> xn, post, comb;
};

Ref cpu_site(const Site& s, Inputs& in, Numerics nm = Numerics::exact) {
    const ModelConfig c = config(s);
    Ref r;
    std::vector<float> u(static_cast<size_t>(s.T * s.D));
    if (s.head) {
        HyperHeadWeights w;
        w.fn = Tensor(in.fn.data(), DType::f32, {s.nm(), s.n()});
        w.base = Tensor(in.base.data(), DType::f32, {s.nm()});
        w.scale = Tensor(in.scale.data(), DType::f32, {1});
        ops::hc_head(w, c, in.X.data(), s.T, u.data());
    } else {
        HyperConnWeights w;
        w.fn = Tensor(in.fn.data(), DType::f32, {s.nm(), s.n()});
        w.base = Tensor(in.base.data(), DType::f32, {s.nm()});
        w.scale = Tensor(in.scale.data(), DType::f32, {3});
        r.post.resize(static_cast<size_t>(s.T * s.hc));
        r.comb.resize(static_cast<size_t>(s.T * s.hc * s.hc));
        ops::hc_pre(w, c, in.X.data(), s.T, u.data(), r.post.data(), r.comb.data());
    }
    ops::round_bf16(nm, u.data(), s.T * s.D);   // official: hc_pre's output is bf16
    const Tensor nw(in.norm_w.data(), DType::bf16, {s.D});
    r.xn.resize(u.size());
    ops::rms_norm(u.data(), s.T, s.D, &nw, kNormEps, r.xn.data());
    return r;
}

// Device copies of a site's inputs and outputs.
struct Dev {
    DeviceArray<float> X, fn, base, scale, part, post, comb;
    DeviceArray<uint16_t> norm_w, xn;
    int64_t splits = 0;

    Dev(const Site& s, const Inputs& in, int64_t splits_)
        : X(in.X), fn(in.fn), base(in.base), scale(in.scale),
          part(static_cast<size_t>(splits_ * s.T * (s.nm() + 1))),
          post(static_cast<size_t>(s.T * s.hc)), comb(static_cast<size_t>(s.T * s.hc * s.hc)),
          norm_w(in.norm_w), xn(static_cast<size_t>(s.T * s.D)), splits(splits_) {
        part.fill(0xFF);   // NaN: a partial the kernel forgets to write shows up
        post.fill(0xFF);
        comb.fill(0xFF);
        xn.fill(0xFF);
    }

    // hc_mix (unfused, on X) + the site's finish.
    void run(const Site& s, cudaStream_t stream = nullptr) {
        cuda::hc_mix(X.data(), nullptr, nullptr, nullptr, nullptr, s.T, s.hc, s.D, fn.data(), s.nm(), part.data(),
                     splits, stream);
        finish(s, X.data(), stream);
    }
    void finish(const Site& s, const float* streams, cudaStream_t stream = nullptr, Numerics nm = Numerics::exact,
                uint16_t* xq = nullptr, uint8_t* xq8 = nullptr, float* xs8 = nullptr) {
        if (s.head)
            cuda::hc_head_finish(part.data(), splits, streams, s.T, s.hc, s.D, base.data(), scale.data(), kHcEps,
                                 kNormEps, norm_w.data(), xn.data(), stream, nm, xq);
        else
            cuda::hc_pre_finish(part.data(), splits, streams, s.T, s.hc, s.D, base.data(), scale.data(), kIters,
                                kHcEps, kNormEps, norm_w.data(), xn.data(), post.data(), comb.data(), stream, nm, xq,
                                xq8, xs8);
    }
};

void compare_outputs(const Site& s, const Ref& ref, Dev& d, double rel = kBf16Rel) {
    expect_bf16_close(d.xn.download(), ref.xn, s.D, rel, kXnAbs, "xn");
    if (!s.head) {
        expect_f32_close(d.post.download(), ref.post, 0.0, kWeightAbs, "post");
        expect_f32_close(d.comb.download(), ref.comb, 0.0, kWeightAbs, "comb");
    }
}

// hc_mix's partial sums, summed over the splits in f64, against f64 dot products.
void check_partials(const Site& s, const Inputs& in, const std::vector<float>& X, Dev& d) {
    const std::vector<float> part = d.part.download();
    const int64_t n = s.n(), nm = s.nm(), NV = nm + 1;
    size_t bad = 0;
    std::string first;
    for (int64_t t = 0; t < s.T; ++t) {
        const float* x = X.data() + t * n;
        for (int64_t v = 0; v < NV; ++v) {
            double got = 0;
            for (int64_t sp = 0; sp < d.splits; ++sp) got += part[static_cast<size_t>((sp * s.T + t) * NV + v)];
            double want = 0, mag = 0;
            for (int64_t i = 0; i < n; ++i) {
                const double term = v < nm ? static_cast<double>(in.fn[static_cast<size_t>(v * n + i)]) * x[i]
                                           : static_cast<double>(x[i]) * x[i];
                want += term;
                mag += std::fabs(term);
            }
            const double tol = (4.0 * std::sqrt(static_cast<double>(n)) + 64.0) * 0x1p-24 * mag;
            if (!(std::fabs(got - want) <= tol)) {
                if (bad < 5) first += str("  t=", t, " v=", v, " got ", got, " want ", want, " tol ", tol, "\n");
                ++bad;
            }
        }
    }
    EXPECT_EQ(bad, 0u) << "hc_mix partial sums: " << bad << " off\n" << first;
}

void check_site(const Site& s, uint32_t seed, int64_t splits = 0) {
    SCOPED_TRACE(s.name() + str(" splits=", splits));
    Inputs in = make_inputs(s, seed);
    const Ref ref = cpu_site(s, in);
    Dev d(s, in, splits > 0 ? splits : cuda::hc_mix_splits(s.T, s.n()));
    d.run(s);
    check_partials(s, in, in.X, d);
    compare_outputs(s, ref, d);
}

TEST(CudaHyperConn, PreSiteMatchesHcPreThenRmsNorm) {
    RW_SKIP_WITHOUT_GPU();
    check_site({1, 4, 4096}, 100);      // V4-Flash decode: 128 splits
    check_site({3, 4, 4096}, 101);
    check_site({17, 4, 4096}, 102);
    check_site({129, 4, 4096}, 103);    // lanes = tokens, 2 token tiles
    check_site({1, 4, 7168}, 104);      // V4-Pro: 224 splits
    check_site({3, 4, 7168}, 105);
    check_site({17, 4, 256}, 106);      // tiny model
    check_site({1, 4, 257}, 107);       // scalar path
    check_site({33, 4, 257}, 108);
    check_site({3, 4, 4100}, 109);      // D % 8 != 0, vector path
    check_site({5, 2, 130}, 110);       // hc = 2
    check_site({33, 8, 96}, 111);       // hc = 8 (80 mix rows)
}

TEST(CudaHyperConn, HeadMatchesHcHeadThenRmsNorm) {
    RW_SKIP_WITHOUT_GPU();
    check_site({1, 4, 4096, true}, 120);
    check_site({17, 4, 4096, true}, 121);
    check_site({3, 4, 7168, true}, 122);
    check_site({129, 4, 256, true}, 123);
    check_site({3, 4, 257, true}, 124);
    check_site({2, 8, 64, true}, 125);
}

TEST(CudaHyperConn, AnySplitCountWorks) {
    RW_SKIP_WITHOUT_GPU();
    // 1 split, a count that divides nothing, and more splits than d-vectors (empty splits).
    for (int64_t splits : {1, 7, 300}) {
        check_site({3, 4, 256}, 130, splits);
        check_site({40, 4, 1024}, 131, splits);
        check_site({2, 4, 257, true}, 132, splits);
    }
}

// The fused post: X_out bit for bit against ops::hc_post, and the partial sums equal to those of
// the unfused mix run on ops::hc_post's output; the finish then matches the twin as above.
void check_fused(const Site& s, uint32_t seed) {
    SCOPED_TRACE("fused " + s.name());
    Inputs in = make_inputs(s, seed);
    const std::vector<float> y = normal_rows(s.T, s.D, seed + 10, 1.0f, -2.0f, 2.0f);
    std::vector<float> post(static_cast<size_t>(s.T * s.hc)), comb(static_cast<size_t>(s.T * s.hc * s.hc));
    std::mt19937 rng(seed + 11);
    std::uniform_real_distribution<float> u01(0.0f, 1.0f);
    for (auto& p : post) p = 2.0f * u01(rng);
    for (auto& c : comb) c = u01(rng) * 2.0f / static_cast<float>(s.hc);
    std::vector<float> X_out_ref(in.X.size());
    ops::hc_post(y.data(), in.X.data(), post.data(), comb.data(), s.T, s.hc, s.D, X_out_ref.data());

    const int64_t splits = cuda::hc_mix_splits(s.T, s.n());
    Dev fused(s, in, splits);
    DeviceArray<float> d_y(y), d_post(post), d_comb(comb), d_out(in.X.size());
    d_out.fill(0xFF);
    cuda::hc_mix(fused.X.data(), d_y.data(), d_post.data(), d_comb.data(), d_out.data(), s.T, s.hc, s.D,
                 fused.fn.data(), s.nm(), fused.part.data(), splits, nullptr);
    fused.finish(s, d_out.data());
    expect_bits_equal(d_out.download(), X_out_ref, "X_out vs ops::hc_post");

    Inputs next = in;
    next.X = X_out_ref;
    Dev unfused(s, next, splits);
    unfused.run(s);
    expect_bits_equal(fused.part.download(), unfused.part.download(), "fused vs unfused partials");
    expect_bits_equal(fused.xn.download(), unfused.xn.download(), "fused vs unfused xn");

    const Ref ref = cpu_site(s, next);
    check_partials(s, in, X_out_ref, fused);
    compare_outputs(s, ref, fused);
}

TEST(CudaHyperConn, FusedPostEqualsPostThenMix) {
    RW_SKIP_WITHOUT_GPU();
    check_fused({1, 4, 4096}, 140);
    check_fused({3, 4, 4096}, 141);
    check_fused({17, 4, 4096}, 142);
    check_fused({129, 4, 4096}, 143);
    check_fused({1, 4, 7168}, 144);
    check_fused({17, 4, 256}, 145);
    check_fused({3, 4, 257}, 146);        // scalar path
    check_fused({5, 2, 130}, 147);
    check_fused({33, 8, 96}, 148);
    check_fused({2, 4, 4096, true}, 149); // the head's mix fused with the last block's post
}

// From 32 tokens on the mix stages fn through shared memory (hc_mix's stage_fn): the same sums in
// the same order as the loads from L2, so partial sums and the fused X_out bit for bit, fused or
// not, exact or official, a site's mix and the head's, with one split and several (T = 33: more
// CTAs' worth of splits), V4-Flash, V4-Pro and tiny widths, and D % 64 != 0 (a last chunk of
// fewer than 16 vectors).
TEST(CudaHyperConn, StagedFnGivesTheSameBits) {
    RW_SKIP_WITHOUT_GPU();
    for (const Site& s : {Site{129, 4, 4096}, Site{33, 4, 4096}, Site{40, 4, 7168}, Site{64, 4, 256},
                          Site{35, 4, 4100}, Site{100, 4, 4096, true}, Site{48, 2, 1024}})
        for (bool fused : {false, true})
            for (Numerics nm : {Numerics::exact, Numerics::official}) {
                SCOPED_TRACE(str(s.name(), fused ? " fused" : "", nm == Numerics::official ? " official" : ""));
                const Inputs in = make_inputs(s, 190 + static_cast<uint32_t>(s.T));
                const int64_t splits = cuda::hc_mix_splits(s.T, s.n());
                const std::vector<float> y = normal_rows(s.T, s.D, 191, 1.0f, -2.0f, 2.0f);
                std::vector<float> post(static_cast<size_t>(s.T * s.hc), 0.75f), comb(static_cast<size_t>(s.T * s.hc * s.hc));
                for (size_t i = 0; i < comb.size(); ++i) comb[i] = 0.1f + 0.05f * static_cast<float>(i % 7);
                DeviceArray<float> X(in.X), fn(in.fn), d_y(y), d_post(post), d_comb(comb);
                std::vector<float> part[2], out[2];
                for (int staged = 0; staged < 2; ++staged) {
                    DeviceArray<float> d_part(static_cast<size_t>(splits * s.T * (s.nm() + 1))), d_out(in.X.size());
                    d_part.fill(0xFF);
                    d_out.fill(0xFF);
                    cuda::hc_mix(X.data(), fused ? d_y.data() : nullptr, fused ? d_post.data() : nullptr,
                                 fused ? d_comb.data() : nullptr, fused ? d_out.data() : nullptr, s.T, s.hc, s.D,
                                 fn.data(), s.nm(), d_part.data(), splits, nullptr, nm, staged == 1);
                    CUDA_CHECK(cudaDeviceSynchronize());
                    part[staged] = d_part.download();
                    if (fused) out[staged] = d_out.download();
                }
                expect_bits_equal(part[1], part[0], "partial sums, staged fn vs loads");
                if (fused) expect_bits_equal(out[1], out[0], "X_out, staged fn vs loads");
            }
}

// Official numerics: the fused post rounds y and the new streams to bf16, bit for bit against
// ops::hc_post on bf16(y) then round_bf16 (ref block_forward); the finish rounds u to bf16 before its
// norm (xn against the twin with the exact-mode tolerance), and xq is round_gemm_input of the
// kernel's own xn, bit for bit (fused in the finish when D % 128 == 0 on the vector path, else a
// copy rounded by cuda::fp8_block_round).
void check_official(const Site& s, uint32_t seed) {
    SCOPED_TRACE("official " + s.name());
    Inputs in = make_inputs(s, seed);
    std::vector<float> y = normal_rows(s.T, s.D, seed + 10, 1.0f, -2.0f, 2.0f);
    std::vector<float> post(static_cast<size_t>(s.T * s.hc)), comb(static_cast<size_t>(s.T * s.hc * s.hc));
    std::mt19937 rng(seed + 11);
    std::uniform_real_distribution<float> u01(0.0f, 1.0f);
    for (auto& p : post) p = 2.0f * u01(rng);
    for (auto& c : comb) c = u01(rng) * 2.0f / static_cast<float>(s.hc);
    std::vector<float> y_r = y, X_out_ref(in.X.size());
    ops::round_bf16(Numerics::official, y_r.data(), static_cast<int64_t>(y_r.size()));
    ops::hc_post(y_r.data(), in.X.data(), post.data(), comb.data(), s.T, s.hc, s.D, X_out_ref.data());
    ops::round_bf16(Numerics::official, X_out_ref.data(), static_cast<int64_t>(X_out_ref.size()));

    const int64_t splits = cuda::hc_mix_splits(s.T, s.n());
    Dev d(s, in, splits);
    DeviceArray<float> d_y(y), d_post(post), d_comb(comb), d_out(in.X.size());
    DeviceArray<uint16_t> d_xq(static_cast<size_t>(s.T * s.D));
    d_out.fill(0xFF);
    d_xq.fill(0xFF);
    cuda::hc_mix(d.X.data(), d_y.data(), d_post.data(), d_comb.data(), d_out.data(), s.T, s.hc, s.D, d.fn.data(),
                 s.nm(), d.part.data(), splits, nullptr, Numerics::official);
    d.finish(s, d_out.data(), nullptr, Numerics::official, d_xq.data());
    expect_bits_equal(d_out.download(), X_out_ref, "X_out vs bf16(ops::hc_post(bf16(y)))");

    Inputs next = in;
    next.X = X_out_ref;
    const Ref ref = cpu_site(s, next, Numerics::official);
    check_partials(s, in, X_out_ref, d);
    // u is rounded to bf16 before the norm: where the GPU's u and the twin's (the same value up to
    // the pre weights' f32 error) fall on two sides of a bf16 rounding boundary, they differ by one
    // bf16 step (2^-8 relative), which the norm (linear in u) carries into xn before xn's own
    // rounding: twice the exact-mode relative bound (measured: 1 element of 122k at D = 7168).
    compare_outputs(s, ref, d, 2 * kBf16Rel);
    std::vector<float> xq_ref = test::rw::from_bf16(d.xn.download());
    ops::round_gemm_input(Numerics::official, xq_ref.data(), s.T, s.D);
    expect_bits_equal(d_xq.download(), to_bf16(xq_ref), "xq vs round_gemm_input(xn)");
    if (!s.head && s.D % 128 == 0) {   // with codes (linear_fp8_act's input): codes · scales == xq
        DeviceArray<uint16_t> d_xq2(static_cast<size_t>(s.T * s.D));
        DeviceArray<uint8_t> d_c(static_cast<size_t>(s.T * s.D));
        DeviceArray<float> d_s(static_cast<size_t>(s.T * s.D / 128));
        d.finish(s, d_out.data(), nullptr, Numerics::official, d_xq2.data(), d_c.data(), d_s.data());
        expect_bits_equal(d_xq2.download(), to_bf16(xq_ref), "xq with codes");
        expect_bits_equal(test::rw::act_fp8_values(d_c.download(), d_s.download(), s.T, s.D), to_bf16(xq_ref),
                          "codes · scales == xq");
    }
}

TEST(CudaHyperConn, OfficialNumericsRoundAsTheTwin) {
    RW_SKIP_WITHOUT_GPU();
    check_official({1, 4, 4096}, 170);     // V4-Flash decode: xq fused
    check_official({3, 4, 4096}, 171);
    check_official({17, 4, 7168}, 172);    // V4-Pro
    check_official({129, 4, 256}, 173);    // the tiny model
    check_official({3, 4, 257}, 174);      // scalar path: xq rounded after the finish
    check_official({5, 2, 4100}, 175);     // vector path, D % 128 != 0: xq rounded after the finish
    check_official({2, 4, 4096, true}, 176);   // the head
}

TEST(CudaHyperConn, RepeatedRunsAreBitIdentical) {
    RW_SKIP_WITHOUT_GPU();
    for (const Site& s : {Site{1, 4, 4096}, Site{129, 4, 4096}}) {
        SCOPED_TRACE(s.name());
        Inputs in = make_inputs(s, 150);
        const int64_t splits = cuda::hc_mix_splits(s.T, s.n());
        Dev a(s, in, splits), b(s, in, splits);
        a.run(s);
        b.run(s);
        expect_bits_equal(a.part.download(), b.part.download(), "part");
        expect_bits_equal(a.xn.download(), b.xn.download(), "xn");
        expect_bits_equal(a.post.download(), b.post.download(), "post");
        expect_bits_equal(a.comb.download(), b.comb.download(), "comb");
    }
}

TEST(CudaHyperConn, GraphReplayEqualsEager) {
    RW_SKIP_WITHOUT_GPU();
    const Site s{3, 4, 4096};
    Inputs in = make_inputs(s, 160);
    const std::vector<float> y = normal_rows(s.T, s.D, 161);
    const std::vector<float> post(static_cast<size_t>(s.T * s.hc), 0.75f);
    const std::vector<float> comb(static_cast<size_t>(s.T * s.hc * s.hc), 0.25f);
    const int64_t splits = cuda::hc_mix_splits(s.T, s.n());
    Dev g(s, in, splits), e(s, in, splits);
    DeviceArray<float> d_y(y), d_post(post), d_comb(comb), out_g(in.X.size()), out_e(in.X.size());
    auto fused_site = [&](Dev& d, DeviceArray<float>& out, cudaStream_t st) {
        cuda::hc_mix(d.X.data(), d_y.data(), d_post.data(), d_comb.data(), out.data(), s.T, s.hc, s.D, d.fn.data(),
                     s.nm(), d.part.data(), splits, st);
        d.finish(s, out.data(), st);
    };
    cudaStream_t st = nullptr;
    CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    CUDA_CHECK(cudaDeviceSynchronize());   // the uploads and fills ran on the legacy stream; st does not wait
    CUDA_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    fused_site(g, out_g, st);
    CUDA_CHECK(cudaStreamEndCapture(st, &graph));
    CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (int round = 0; round < 2; ++round) {
        if (round == 1) {   // new stream contents in the same buffers
            in.X = normal_rows(s.T * s.hc, s.D, 162, 1.0f, -2.0f, 2.0f);
            g.X.upload(in.X);
            e.X.upload(in.X);
            CUDA_CHECK(cudaDeviceSynchronize());
        }
        CUDA_CHECK(cudaGraphLaunch(exec, st));
        fused_site(e, out_e, st);
        CUDA_CHECK(cudaStreamSynchronize(st));
        expect_bits_equal(out_g.download(), out_e.download(), str("X_out round ", round));
        expect_bits_equal(g.xn.download(), e.xn.download(), str("xn round ", round));
        expect_bits_equal(g.comb.download(), e.comb.download(), str("comb round ", round));
    }
    CUDA_CHECK(cudaGraphExecDestroy(exec));
    CUDA_CHECK(cudaGraphDestroy(graph));
    CUDA_CHECK(cudaStreamDestroy(st));
}

// ---------------------------------------------------------------------------- host-only checks

TEST(CudaHyperConn, SplitCountIsAFunctionOfTAndN) {
    // Decode on V4-Flash / V4-Pro: one 16-byte vector per lane, 128 / 224 one-warp CTAs.
    EXPECT_EQ(cuda::hc_mix_splits(1, 4 * 4096), 128);
    EXPECT_EQ(cuda::hc_mix_splits(1, 4 * 7168), 224);
    for (int64_t n : {4 * 256, 4 * 257, 4 * 4096, 4 * 7168, 8 * 96}) {
        for (int64_t T : {1, 2, 3, 17, 31, 32, 33, 129, 1000, 4096, 65536}) {
            const int64_t S = cuda::hc_mix_splits(T, n);
            EXPECT_GE(S, 1) << "T=" << T << " n=" << n;
            EXPECT_LE(S, std::max<int64_t>(1, n / 128)) << "T=" << T << " n=" << n;   // partials ≤ n/5 per token
            EXPECT_EQ(S, cuda::hc_mix_splits(T, n));
        }
    }
    EXPECT_EQ(cuda::hc_mix_splits(0, 1024), cuda::hc_mix_splits(1, 1024));
}

TEST(CudaHyperConn, RejectsBadArguments) {
    using test::expect_error;
    float* f = fake_ptr<float>();
    float* g = f + (1 << 20);   // a second, disjoint fake buffer
    uint16_t* b = fake_ptr<uint16_t>();
    expect_error([&] { cuda::hc_mix_splits(-1, 16); }, {"hc_mix_splits"});
    expect_error([&] { cuda::hc_mix_splits(1, 0); }, {"hc_mix_splits"});
    expect_error([&] { cuda::hc_mix(f, nullptr, nullptr, nullptr, nullptr, 1, 3, 64, f, 15, f, 1, nullptr); },
                 {"hc_mix", "hc=3"});
    expect_error([&] { cuda::hc_mix(f, nullptr, nullptr, nullptr, nullptr, 1, 4, 64, f, 10, f, 1, nullptr); },
                 {"hc_mix", "n_mix=10"});
    expect_error([&] { cuda::hc_mix(f, nullptr, nullptr, nullptr, nullptr, 1, 4, 0, f, 24, f, 1, nullptr); },
                 {"hc_mix", "D=0"});
    expect_error([&] { cuda::hc_mix(f, nullptr, nullptr, nullptr, nullptr, 1, 4, 64, f, 24, f, 0, nullptr); },
                 {"hc_mix", "splits=0"});
    expect_error([&] { cuda::hc_mix(f, f, nullptr, nullptr, g, 1, 4, 64, f, 24, f, 1, nullptr); },
                 {"hc_mix", "all of y, post, comb, X_out"});
    expect_error([&] { cuda::hc_mix(f, g, g, g, f + 8, 1, 4, 64, f, 24, f, 1, nullptr); },
                 {"hc_mix", "overlaps"});
    expect_error([&] { cuda::hc_mix(nullptr, nullptr, nullptr, nullptr, nullptr, 1, 4, 64, f, 24, f, 1, nullptr); },
                 {"hc_mix", "null"});
    expect_error([&] { cuda::hc_pre_finish(f, 1, f, 1, 9, 64, f, f, 20, 1e-6f, 1e-6f, b, b, f, f, nullptr); },
                 {"hc_pre_finish", "hc=9"});
    expect_error([&] { cuda::hc_pre_finish(f, 0, f, 1, 4, 64, f, f, 20, 1e-6f, 1e-6f, b, b, f, f, nullptr); },
                 {"hc_pre_finish", "splits=0"});
    expect_error([&] { cuda::hc_pre_finish(f, 1, f, 1, 4, 64, f, f, 20, 1e-6f, 1e-6f, b, b, nullptr, f, nullptr); },
                 {"hc_pre_finish", "null post/comb"});
    expect_error([&] { cuda::hc_pre_finish(f, 1, f, 1, 4, 64, f, f, -1, 1e-6f, 1e-6f, b, b, f, f, nullptr); },
                 {"hc_pre_finish", "sinkhorn_iters"});
    expect_error([&] { cuda::hc_head_finish(f, 1, f, -1, 4, 64, f, f, 1e-6f, 1e-6f, b, b, nullptr); },
                 {"hc_head_finish", "T=-1"});
    expect_error([&] { cuda::hc_head_finish(f, 1, nullptr, 1, 4, 64, f, f, 1e-6f, 1e-6f, b, b, nullptr); },
                 {"hc_head_finish", "null"});
    expect_error([&] { cuda::hc_head_finish(f, 1, f, 1, 4, 60000, f, f, 1e-6f, 1e-6f, b, b, nullptr); },
                 {"hc_head_finish", "shared memory"});
    // T = 0 launches nothing.
    cuda::hc_mix(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 4, 64, nullptr, 24, nullptr, 1, nullptr);
    cuda::hc_pre_finish(nullptr, 1, nullptr, 0, 4, 64, nullptr, nullptr, 20, 1e-6f, 1e-6f, nullptr, nullptr, nullptr,
                        nullptr, nullptr);
}

}  // namespace
}  // namespace megamoe

#else

TEST(CudaHyperConn, SkippedWithoutCuda) { GTEST_SKIP() << "built without CUDA"; }

#endif
