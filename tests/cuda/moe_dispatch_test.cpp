// cuda_moe_dispatch_test.cpp — the GPU MoE route / gather / combine (src/cuda/moe_dispatch.h)
// against plain CPU twins, compared exactly.
//
// Twins (below, plain loops): the route is a stable counting sort of the rows i = t·k + s by
// expert, which is the order ops::moe builds (it pushes i in increasing order into each expert's
// list); the gather copies bf16 bits; the combine adds the k slot rows in slot order into an fp32
// accumulator starting at 0 and then adds the shared term, as ops::moe does. The GPU does the same
// fp32 additions in the same order (no FMA), so every comparison is bit for bit.
//
// Routings exercise experts with 0, 1 and many rows: uniform (distinct experts per token),
// skewed (one expert in every token, one expert used by a single row, half the experts unused),
// and degenerate (every slot of every token to one expert). Sizes: T ∈ {1, 3, 17, 129, 4096},
// k = 6, E ∈ {16, 256, 384}, D ∈ {64, 4096}, plus odd/unaligned shapes for the scalar paths, an
// empty batch, and a CUDA graph captured once and replayed with new ids.
//
// The twins' own tests run everywhere; the GPU tests skip without a CUDA build or a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cuda/moe_dispatch.h"

#ifdef MEGAMOE_HAVE_CUDA
#include <cuda_runtime.h>

#include "core/common.h"
#include "cuda/linear.h"   // gpu_available, CUDA_CHECK
#include "io/formats.h"        // f32_to_bf16 (RNE)
#include "cuda_test_util.h"
#include "test_util.h"
#endif

namespace megamoe {
namespace {

// ---- CPU twins

struct Route {
    std::vector<int32_t> counts, offsets, perm, inv;
};

// Stable counting sort of rows i = t·k + s by ids[i].
Route cpu_route(const std::vector<int32_t>& ids, int64_t T, int64_t k, int64_t E) {
    const int64_t N = T * k;
    Route r;
    r.counts.assign(static_cast<size_t>(E), 0);
    r.offsets.assign(static_cast<size_t>(E + 1), 0);
    r.perm.assign(static_cast<size_t>(N), -1);
    r.inv.assign(static_cast<size_t>(N), -1);
    for (int64_t i = 0; i < N; ++i) ++r.counts[static_cast<size_t>(ids[static_cast<size_t>(i)])];
    for (int64_t e = 0; e < E; ++e)
        r.offsets[static_cast<size_t>(e + 1)] = r.offsets[static_cast<size_t>(e)] + r.counts[static_cast<size_t>(e)];
    std::vector<int32_t> next(r.offsets.begin(), r.offsets.end() - 1);
    for (int64_t i = 0; i < N; ++i) {
        const int32_t pos = next[static_cast<size_t>(ids[static_cast<size_t>(i)])]++;
        r.perm[static_cast<size_t>(pos)] = static_cast<int32_t>(i);
        r.inv[static_cast<size_t>(i)] = pos;
    }
    return r;
}

void cpu_gather(const std::vector<uint16_t>& x, const std::vector<float>& weights, const std::vector<int32_t>& perm,
                int64_t k, int64_t D, std::vector<uint16_t>& xs, std::vector<float>& ws) {
    const size_t N = perm.size();
    xs.resize(N * static_cast<size_t>(D));
    ws.resize(N);
    for (size_t j = 0; j < N; ++j) {
        const int64_t t = perm[j] / k;
        std::copy(x.begin() + t * D, x.begin() + (t + 1) * D, xs.begin() + static_cast<int64_t>(j) * D);
        ws[j] = weights[static_cast<size_t>(perm[j])];
    }
}

// As ops::moe: acc = 0, acc += slot rows in slot order, then y = shared + acc.
void cpu_combine(const std::vector<float>& rows, const std::vector<int32_t>& inv, const float* shared, int64_t T,
                 int64_t k, int64_t D, std::vector<float>& y) {
    y.resize(static_cast<size_t>(T * D));
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t d = 0; d < D; ++d) {
            float acc = 0;
            for (int64_t s = 0; s < k; ++s) acc += rows[static_cast<size_t>(inv[static_cast<size_t>(t * k + s)] * D + d)];
            y[static_cast<size_t>(t * D + d)] = shared ? shared[t * D + d] + acc : acc;
        }
    }
}

// The grouped expert GEMM's work list (gemm.cu's build_items): expert e with c rows gets
// ceil(c / BT) quads {e, offsets[e] + j·BT, min(BT, c - j·BT), 0}, in expert order.
[[maybe_unused]] std::vector<int32_t> cpu_items(const Route& r, int64_t E, int32_t BT) {   // used by the CUDA tests only
    std::vector<int32_t> q;
    for (int64_t e = 0; e < E; ++e) {
        const int32_t c = r.counts[static_cast<size_t>(e)], first = r.offsets[static_cast<size_t>(e)];
        for (int32_t j = 0; j * BT < c; ++j)
            q.insert(q.end(), {static_cast<int32_t>(e), first + j * BT, std::min(BT, c - j * BT), 0});
    }
    return q;
}

// ---- inputs

enum class Pattern { uniform, skewed, one_expert };
const char* pattern_name(Pattern p) {
    switch (p) {
        case Pattern::uniform: return "uniform";
        case Pattern::skewed: return "skewed";
        case Pattern::one_expert: return "one_expert";
    }
    return "?";
}

std::vector<int32_t> make_ids(Pattern p, int64_t T, int64_t k, int64_t E, uint32_t seed) {
    std::mt19937 rng(seed);
    std::vector<int32_t> ids(static_cast<size_t>(T * k));
    for (int64_t t = 0; t < T; ++t) {
        int32_t* row = ids.data() + t * k;
        if (p == Pattern::one_expert) {   // duplicates inside a token too: the sort must not care
            std::fill(row, row + k, static_cast<int32_t>(7 % E));
            continue;
        }
        // Distinct experts per token, as a real top-k gives. uniform: from all of [0, E).
        // skewed: expert 0 in every token, expert E-1 only in token 0, the rest from [1, E/2)
        // (so [E/2, E-1) get no rows).
        std::vector<int32_t> pool;
        if (p == Pattern::uniform) {
            pool.resize(static_cast<size_t>(E));
            std::iota(pool.begin(), pool.end(), 0);
        } else {
            for (int32_t e = 1; e < std::max<int64_t>(E / 2, k + 1); ++e) pool.push_back(e);
        }
        std::shuffle(pool.begin(), pool.end(), rng);
        std::copy(pool.begin(), pool.begin() + k, row);
        if (p == Pattern::skewed) {
            row[0] = 0;
            if (t == 0) row[1] = static_cast<int32_t>(E - 1);
            std::shuffle(row, row + k, rng);   // the shared experts sit in any slot
        }
    }
    return ids;
}

// Fast deterministic fill (splitmix64): the large cases have ~10^8 elements.
uint64_t splitmix(uint64_t& s) {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Random signs, 24-bit mantissas and exponents over 2^-20..2^20, so that the order of additions
// changes the rounded sums (a wrong order shows up as different bits).
std::vector<float> random_f32(size_t n, uint64_t seed) {
    std::vector<float> v(n);
    for (auto& f : v) {
        const uint64_t r = splitmix(seed);
        const uint32_t sign = static_cast<uint32_t>(r >> 63) << 31;
        const uint32_t exp = static_cast<uint32_t>(127 - 20 + static_cast<int>((r >> 32) % 41)) << 23;
        const uint32_t bits = sign | exp | static_cast<uint32_t>(r & 0x7FFFFFu);
        std::memcpy(&f, &bits, 4);
    }
    return v;
}

std::vector<uint16_t> random_bf16(size_t n, uint64_t seed) {
    std::vector<uint16_t> v(n);
    for (auto& b : v) b = static_cast<uint16_t>(splitmix(seed) >> 48);   // any bits: the gather only copies
    return v;
}

// Index of the first element whose bits differ, or -1 (so a failure prints one element, not 10^8).
template <typename T>
int64_t first_mismatch(const std::vector<T>& a, const std::vector<T>& b) {
    if (a.size() != b.size()) return static_cast<int64_t>(std::min(a.size(), b.size()));
    for (size_t i = 0; i < a.size(); ++i)
        if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) return static_cast<int64_t>(i);
    return -1;
}

// ---- the twins themselves (run everywhere)

TEST(MoeDispatchCpu, TwinRouteIsOpsMoeOrder) {
    for (Pattern p : {Pattern::uniform, Pattern::skewed, Pattern::one_expert}) {
        const int64_t T = 37, k = 6, E = 16;
        const auto ids = make_ids(p, T, k, E, 11);
        const Route r = cpu_route(ids, T, k, E);
        // ops::moe's per-expert lists, concatenated, are perm.
        std::vector<std::vector<int32_t>> slots(static_cast<size_t>(E));
        for (int64_t i = 0; i < T * k; ++i) slots[static_cast<size_t>(ids[static_cast<size_t>(i)])].push_back(static_cast<int32_t>(i));
        std::vector<int32_t> cat;
        for (const auto& s : slots) cat.insert(cat.end(), s.begin(), s.end());
        EXPECT_EQ(first_mismatch(cat, r.perm), -1) << pattern_name(p);
        EXPECT_EQ(r.offsets.back(), T * k);
        for (int64_t i = 0; i < T * k; ++i) EXPECT_EQ(r.perm[static_cast<size_t>(r.inv[static_cast<size_t>(i)])], i);
        if (p == Pattern::skewed) {
            EXPECT_EQ(r.counts[0], T);
            EXPECT_EQ(r.counts[static_cast<size_t>(E - 1)], 1);
            EXPECT_EQ(r.counts[static_cast<size_t>(E / 2)], 0);
        }
    }
}

TEST(MoeDispatchCpu, TwinGatherCombineMatchOpsMoeLayout) {
    const int64_t T = 5, k = 6, E = 16, D = 8;
    const auto ids = make_ids(Pattern::uniform, T, k, E, 3);
    const Route r = cpu_route(ids, T, k, E);
    const auto x = random_bf16(static_cast<size_t>(T * D), 1);
    const auto w = random_f32(static_cast<size_t>(T * k), 2);
    std::vector<uint16_t> xs;
    std::vector<float> ws;
    cpu_gather(x, w, r.perm, k, D, xs, ws);
    for (int64_t i = 0; i < T * k; ++i) {
        const int64_t j = r.inv[static_cast<size_t>(i)];
        EXPECT_EQ(ws[static_cast<size_t>(j)], w[static_cast<size_t>(i)]);
        for (int64_t d = 0; d < D; ++d) EXPECT_EQ(xs[static_cast<size_t>(j * D + d)], x[static_cast<size_t>(i / k * D + d)]);
    }
    // ops::moe keeps out[T, k, D] in slot layout; rows is the same data in permuted order.
    const auto out = random_f32(static_cast<size_t>(T * k * D), 4);
    const auto shared = random_f32(static_cast<size_t>(T * D), 5);
    std::vector<float> rows(out.size());
    for (int64_t i = 0; i < T * k; ++i)
        std::copy(out.begin() + i * D, out.begin() + (i + 1) * D, rows.begin() + r.inv[static_cast<size_t>(i)] * D);
    std::vector<float> y;
    cpu_combine(rows, r.inv, shared.data(), T, k, D, y);
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t d = 0; d < D; ++d) {
            float yy = shared[static_cast<size_t>(t * D + d)], acc = 0;   // ops::moe's loop, verbatim
            for (int64_t s = 0; s < k; ++s) acc += out[static_cast<size_t>((t * k + s) * D + d)];
            yy += acc;
            EXPECT_EQ(y[static_cast<size_t>(t * D + d)], yy);
        }
    }
}

#ifdef MEGAMOE_HAVE_CUDA

#define SKIP_WITHOUT_GPU() \
    if (!cuda::gpu_available()) GTEST_SKIP() << "no CUDA device"


using cuda::DeviceArray;

template <typename T>
void to_device(T* dst, const std::vector<T>& src) {
    CUDA_CHECK(cudaMemcpy(dst, src.data(), src.size() * sizeof(T), cudaMemcpyHostToDevice));
}
template <typename T>
std::vector<T> to_host(const T* src, size_t n) {
    std::vector<T> v(n);
    CUDA_CHECK(cudaMemcpy(v.data(), src, n * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
}

// Route + gather + combine (f32 and bf16) on the GPU for one case, against the twins.
// `off` shifts x, rows, shared and y by that many elements inside their buffers (off = 1 takes the
// scalar, unaligned paths).
void check_case(const std::vector<int32_t>& ids, const std::vector<uint16_t>& x, const std::vector<float>& w,
                const std::vector<float>& rows, const std::vector<float>& shared, int64_t T, int64_t k, int64_t E,
                int64_t D, const std::string& what, int off = 0) {
    SCOPED_TRACE(what);
    const int64_t N = T * k;
    const Route r = cpu_route(ids, T, k, E);

    DeviceArray<int32_t> d_ids(ids.size()), counts(static_cast<size_t>(E)), offsets(static_cast<size_t>(E + 1)),
        perm(static_cast<size_t>(N)), inv(static_cast<size_t>(N)),
        scratch(static_cast<size_t>(cuda::moe_route_scratch_ints(N, E)));
    to_device(d_ids.data(), ids);
    // Outputs start as 0xFF bytes (-1 / NaN) so that anything left unwritten fails.
    CUDA_CHECK(cudaMemset(counts.data(), 0xFF, counts.size() * 4));
    CUDA_CHECK(cudaMemset(offsets.data(), 0xFF, offsets.size() * 4));
    CUDA_CHECK(cudaMemset(perm.data(), 0xFF, perm.size() * 4));
    CUDA_CHECK(cudaMemset(inv.data(), 0xFF, inv.size() * 4));
    cuda::moe_route_counts(d_ids.data(), T, k, E, counts.data(), offsets.data(), perm.data(), inv.data(), scratch.data(), nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_EQ(first_mismatch(to_host(counts.data(), counts.size()), r.counts), -1) << "counts";
    EXPECT_EQ(first_mismatch(to_host(offsets.data(), offsets.size()), r.offsets), -1) << "offsets";
    EXPECT_EQ(first_mismatch(to_host(perm.data(), perm.size()), r.perm), -1) << "perm";
    EXPECT_EQ(first_mismatch(to_host(inv.data(), inv.size()), r.inv), -1) << "inv";

    // Gather from the GPU's own perm (equal to the twin's if the checks above passed).
    std::vector<uint16_t> xs_ref;
    std::vector<float> ws_ref;
    cpu_gather(x, w, r.perm, k, D, xs_ref, ws_ref);
    DeviceArray<uint16_t> d_x(x.size() + static_cast<size_t>(off)), xs(static_cast<size_t>(N * D));
    DeviceArray<float> d_w(w.size()), ws(static_cast<size_t>(N));
    CUDA_CHECK(cudaMemcpy(d_x.data() + off, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
    to_device(d_w.data(), w);
    CUDA_CHECK(cudaMemset(xs.data(), 0xFF, xs.size() * 2));
    CUDA_CHECK(cudaMemset(ws.data(), 0xFF, ws.size() * 4));
    cuda::moe_gather(d_x.data() + off, d_w.data(), perm.data(), T, k, D, xs.data(), ws.data(), nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_EQ(first_mismatch(to_host(xs.data(), xs.size()), xs_ref), -1) << "xs";
    EXPECT_EQ(first_mismatch(to_host(ws.data(), ws.size()), ws_ref), -1) << "ws";

    // Combine, with and without the shared term, f32 and bf16 out.
    DeviceArray<float> d_rows(rows.size() + static_cast<size_t>(off)), d_shared(shared.size() + static_cast<size_t>(off)),
        y(static_cast<size_t>(T * D) + static_cast<size_t>(off));
    DeviceArray<uint16_t> yb(static_cast<size_t>(T * D) + static_cast<size_t>(off));
    CUDA_CHECK(cudaMemcpy(d_rows.data() + off, rows.data(), rows.size() * 4, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(d_shared.data() + off, shared.data(), shared.size() * 4, cudaMemcpyHostToDevice));
    for (bool with_shared : {true, false}) {
        std::vector<float> y_ref;
        cpu_combine(rows, r.inv, with_shared ? shared.data() : nullptr, T, k, D, y_ref);
        std::vector<uint16_t> yb_ref(y_ref.size());
        for (size_t i = 0; i < y_ref.size(); ++i) yb_ref[i] = f32_to_bf16(y_ref[i]);
        const float* sh = with_shared ? d_shared.data() + off : nullptr;
        CUDA_CHECK(cudaMemset(y.data(), 0xFF, y.size() * 4));
        CUDA_CHECK(cudaMemset(yb.data(), 0xFF, yb.size() * 2));
        cuda::moe_combine(d_rows.data() + off, inv.data(), sh, T, k, D, y.data() + off, nullptr);
        cuda::moe_combine_bf16(d_rows.data() + off, inv.data(), sh, T, k, D, yb.data() + off, nullptr);
        CUDA_CHECK(cudaDeviceSynchronize());
        auto y_gpu = to_host(y.data() + off, static_cast<size_t>(T * D));
        auto yb_gpu = to_host(yb.data() + off, static_cast<size_t>(T * D));
        EXPECT_EQ(first_mismatch(y_gpu, y_ref), -1) << "y f32, shared=" << with_shared;
        EXPECT_EQ(first_mismatch(yb_gpu, yb_ref), -1) << "y bf16, shared=" << with_shared;
    }
}

TEST(MoeDispatch, RouteGatherCombineMatchCpu) {
    SKIP_WITHOUT_GPU();
    const int64_t k = 6;
    for (int64_t T : {1, 3, 17, 129, 4096}) {
        for (int64_t D : {64, 4096}) {
            // Data independent of the routing: made once per (T, D).
            const auto x = random_bf16(static_cast<size_t>(T * D), static_cast<uint64_t>(T * 131 + D));
            const auto w = random_f32(static_cast<size_t>(T * k), static_cast<uint64_t>(T * 7 + 1));
            const auto rows = random_f32(static_cast<size_t>(T * k * D), static_cast<uint64_t>(T * 17 + D + 2));
            const auto shared = random_f32(static_cast<size_t>(T * D), static_cast<uint64_t>(T * 19 + D + 3));
            for (int64_t E : {16, 256, 384}) {
                for (Pattern p : {Pattern::uniform, Pattern::skewed, Pattern::one_expert}) {
                    const auto ids = make_ids(p, T, k, E, static_cast<uint32_t>(T * 1000 + E));
                    check_case(ids, x, w, rows, shared, T, k, E, D,
                               str("T=", T, " E=", E, " D=", D, " ", pattern_name(p)));
                    if (HasFatalFailure()) return;
                }
            }
        }
    }
}

// D not a multiple of 8 / 4 and pointers off 16-byte alignment: the scalar kernels.
TEST(MoeDispatch, ScalarPathsMatchCpu) {
    SKIP_WITHOUT_GPU();
    const int64_t k = 6, E = 256;
    for (int64_t T : {1, 129, 1500}) {
        for (int64_t D : {67, 64}) {
            for (int off : {0, 1}) {
                const auto x = random_bf16(static_cast<size_t>(T * D), 5);
                const auto w = random_f32(static_cast<size_t>(T * k), 6);
                const auto rows = random_f32(static_cast<size_t>(T * k * D), 7);
                const auto shared = random_f32(static_cast<size_t>(T * D), 8);
                const auto ids = make_ids(Pattern::skewed, T, k, E, 9);
                check_case(ids, x, w, rows, shared, T, k, E, D, str("T=", T, " D=", D, " off=", off), off);
            }
        }
    }
}

// The one-launch dispatch of small batches (route + gather + work list) against the twins: every
// T with T·k ≤ kMoeDispatchSmallMaxRows at k = 6, and k = 1 / k = 8 at the limit; the V4 widths,
// odd ones (the scalar copy), an unaligned x; E up to kMoeMaxExperts; tile heights 1, 3, 8, 16.
TEST(MoeDispatch, SmallDispatchMatchesRouteGatherAndWorkList) {
    SKIP_WITHOUT_GPU();
    struct Case {
        int64_t T, k, E, D;
        int off;
    };
    std::vector<Case> cases;
    for (int64_t T = 1; T * 6 <= cuda::kMoeDispatchSmallMaxRows; ++T)
        for (int64_t E : {16, 256, 384}) cases.push_back({T, 6, E, T % 2 ? 4096 : 7168, 0});
    cases.push_back({64, 1, 256, 4096, 0});
    cases.push_back({8, 8, cuda::kMoeMaxExperts, 64, 0});
    cases.push_back({3, 6, 256, 67, 0});    // D % 8 != 0: scalar copy
    cases.push_back({5, 6, 256, 4096, 1});  // x off 16-byte alignment: scalar copy
    for (const Case& c : cases) {
        for (Pattern p : {Pattern::uniform, Pattern::skewed, Pattern::one_expert}) {
            for (int32_t BT : {1, 3, 8, 16}) {
                SCOPED_TRACE(str("T=", c.T, " k=", c.k, " E=", c.E, " D=", c.D, " off=", c.off, " ",
                                 pattern_name(p), " BT=", BT));
                const int64_t N = c.T * c.k;
                const auto ids = make_ids(p, c.T, c.k, c.E, static_cast<uint32_t>(N * 31 + c.E + BT));
                const auto x = random_bf16(static_cast<size_t>(c.T * c.D), static_cast<uint64_t>(N + c.D));
                const auto w = random_f32(static_cast<size_t>(N), static_cast<uint64_t>(N + 5));
                const Route r = cpu_route(ids, c.T, c.k, c.E);
                std::vector<uint16_t> xs_ref;
                std::vector<float> ws_ref;
                cpu_gather(x, w, r.perm, c.k, c.D, xs_ref, ws_ref);
                const std::vector<int32_t> items_ref = cpu_items(r, c.E, BT);

                cuda::MoeDispatchWorkspace work(c.T, c.k, c.E, c.D);
                DeviceArray<int32_t> d_ids(ids.size()), items(static_cast<size_t>(4 * (N + c.E))), n_items(1);
                DeviceArray<uint16_t> d_x(x.size() + static_cast<size_t>(c.off));
                DeviceArray<float> d_w(w.size());
                to_device(d_ids.data(), ids);
                CUDA_CHECK(cudaMemcpy(d_x.data() + c.off, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
                to_device(d_w.data(), w);
                // Outputs start as 0xFF bytes so that anything left unwritten fails.
                for (auto* a : {&work.counts, &work.offsets, &work.perm, &work.inv})
                    CUDA_CHECK(cudaMemset(a->data(), 0xFF, a->size() * 4));
                CUDA_CHECK(cudaMemset(work.xs.data(), 0xFF, work.xs.size() * 2));
                CUDA_CHECK(cudaMemset(work.ws.data(), 0xFF, work.ws.size() * 4));
                CUDA_CHECK(cudaMemset(items.data(), 0xFF, items.size() * 4));
                CUDA_CHECK(cudaMemset(n_items.data(), 0xFF, 4));
                work.route_gather_small(d_ids.data(), d_x.data() + c.off, d_w.data(), c.T, BT, items.data(),
                                        n_items.data(), nullptr);
                CUDA_CHECK(cudaDeviceSynchronize());
                EXPECT_EQ(first_mismatch(to_host(work.counts.data(), static_cast<size_t>(c.E)), r.counts), -1) << "counts";
                EXPECT_EQ(first_mismatch(to_host(work.offsets.data(), static_cast<size_t>(c.E + 1)), r.offsets), -1)
                    << "offsets";
                EXPECT_EQ(first_mismatch(to_host(work.perm.data(), static_cast<size_t>(N)), r.perm), -1) << "perm";
                EXPECT_EQ(first_mismatch(to_host(work.inv.data(), static_cast<size_t>(N)), r.inv), -1) << "inv";
                EXPECT_EQ(first_mismatch(to_host(work.xs.data(), xs_ref.size()), xs_ref), -1) << "xs";
                EXPECT_EQ(first_mismatch(to_host(work.ws.data(), static_cast<size_t>(N)), ws_ref), -1) << "ws";
                const int32_t n = to_host(n_items.data(), 1)[0];
                ASSERT_EQ(static_cast<size_t>(n) * 4, items_ref.size());
                EXPECT_EQ(first_mismatch(to_host(items.data(), items_ref.size()), items_ref), -1) << "items";
                if (HasFatalFailure()) return;
                if (c.E > 1) {
                    // Expert parallelism's skip bucket: the last expert routed and gathered, but no items.
                    const std::vector<int32_t> part_ref = cpu_items(r, c.E - 1, BT);
                    CUDA_CHECK(cudaMemset(items.data(), 0xFF, items.size() * 4));
                    work.route_gather_small(d_ids.data(), d_x.data() + c.off, d_w.data(), c.T, BT, items.data(),
                                            n_items.data(), nullptr, c.E - 1);
                    CUDA_CHECK(cudaDeviceSynchronize());
                    EXPECT_EQ(first_mismatch(to_host(work.perm.data(), static_cast<size_t>(N)), r.perm), -1) << "perm";
                    const int32_t m = to_host(n_items.data(), 1)[0];
                    ASSERT_EQ(static_cast<size_t>(m) * 4, part_ref.size()) << "items of E - 1 experts";
                    EXPECT_EQ(first_mismatch(to_host(items.data(), part_ref.size()), part_ref), -1) << "items of E - 1";
                }
            }
        }
    }
    // Outside its range it refuses, naming the limit.
    cuda::MoeDispatchWorkspace big(11, 6, 16, 64);
    DeviceArray<int32_t> ids(66), items(4 * 82), n_items(1);
    DeviceArray<uint16_t> x(11 * 64);
    EXPECT_THROW(big.route_gather_small(ids.data(), x.data(), nullptr, 11, 8, items.data(), n_items.data(), nullptr),
                 Error);
    EXPECT_THROW(big.route_gather_small(ids.data(), x.data(), nullptr, 1, 0, items.data(), n_items.data(), nullptr),
                 Error);
    for (int64_t bad : {int64_t{17}, int64_t{-1}})   // item_experts outside [1, E = 16]
        test::expect_error(
            [&] {
                big.route_gather_small(ids.data(), x.data(), nullptr, 1, 8, items.data(), n_items.data(), nullptr, bad);
            },
            {str("item_experts = ", bad)});
}

// Largest sizes the route is designed for (T·k = 98304, several chunks) and the largest E.
TEST(MoeDispatch, RouteLargeBatchAndMaxExperts) {
    SKIP_WITHOUT_GPU();
    const int64_t k = 6, D = 8;
    for (int64_t E : {int64_t{384}, cuda::kMoeMaxExperts}) {
        for (int64_t T : {16384, 171}) {
            const auto x = random_bf16(static_cast<size_t>(T * D), 1);
            const auto w = random_f32(static_cast<size_t>(T * k), 2);
            const auto rows = random_f32(static_cast<size_t>(T * k * D), 3);
            const auto shared = random_f32(static_cast<size_t>(T * D), 4);
            for (Pattern p : {Pattern::uniform, Pattern::skewed})
                check_case(make_ids(p, T, k, E, 77), x, w, rows, shared, T, k, E, D,
                           str("T=", T, " E=", E, " ", pattern_name(p)));
        }
    }
}

TEST(MoeDispatch, EmptyBatchWritesZeroCounts) {
    SKIP_WITHOUT_GPU();
    const int64_t E = 16;
    cuda::MoeDispatchWorkspace ws(4, 6, E, 64);
    CUDA_CHECK(cudaMemset(ws.counts.data(), 0xFF, E * 4));
    CUDA_CHECK(cudaMemset(ws.offsets.data(), 0xFF, (E + 1) * 4));
    ws.route(nullptr, 0, nullptr);
    ws.gather(nullptr, nullptr, 0, nullptr);
    ws.combine(nullptr, nullptr, 0, nullptr, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_EQ(to_host(ws.counts.data(), E), std::vector<int32_t>(E, 0));
    EXPECT_EQ(to_host(ws.offsets.data(), E + 1), std::vector<int32_t>(E + 1, 0));
}

TEST(MoeDispatch, RejectsBadArguments) {
    SKIP_WITHOUT_GPU();
    cuda::MoeDispatchWorkspace ws(4, 6, 16, 64);
    EXPECT_THROW(ws.route(nullptr, 5, nullptr), Error);   // T > T_max
    EXPECT_THROW(cuda::MoeDispatchWorkspace(4, 6, cuda::kMoeMaxExperts + 1, 64), Error);
    EXPECT_THROW(cuda::moe_route_counts(nullptr, 1, 6, 16, ws.counts.data(), ws.offsets.data(), ws.perm.data(),
                                        ws.inv.data(), ws.scratch.data(), nullptr),
                 Error);
    EXPECT_GT(ws.bytes(), 0u);
    // Move-only: the moved-to workspace holds the buffers, the moved-from one none (and refuses work).
    cuda::MoeDispatchWorkspace moved = std::move(ws);
    EXPECT_EQ(ws.counts.data(), nullptr);
    EXPECT_EQ(ws.bytes(), 0u);
    EXPECT_NE(moved.counts.data(), nullptr);
    EXPECT_THROW(ws.route(nullptr, 0, nullptr), Error);
}

// Route + gather + combine captured once into a CUDA graph for fixed T, replayed twice with new
// contents of ids (and rows); each replay must match the twins.
TEST(MoeDispatch, GraphCaptureReplaysWithNewIds) {
    SKIP_WITHOUT_GPU();
    const int64_t T = 129, k = 6, E = 256, D = 64;
    cuda::MoeDispatchWorkspace work(T, k, E, D);
    DeviceArray<int32_t> ids(static_cast<size_t>(T * k));
    DeviceArray<uint16_t> x(static_cast<size_t>(T * D));
    DeviceArray<float> w(static_cast<size_t>(T * k)), rows(static_cast<size_t>(T * k * D)), shared(static_cast<size_t>(T * D)),
        y(static_cast<size_t>(T * D));
    const auto hx = random_bf16(x.size(), 1);
    const auto hw = random_f32(w.size(), 2);
    const auto hshared = random_f32(shared.size(), 3);
    to_device(x.data(), hx);
    to_device(w.data(), hw);
    to_device(shared.data(), hshared);

    cudaStream_t stream;
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    work.route(ids.data(), T, stream);
    work.gather(x.data(), w.data(), T, stream);
    work.combine(rows.data(), shared.data(), T, y.data(), stream);
    CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));

    const Pattern patterns[2] = {Pattern::uniform, Pattern::skewed};
    for (int replay = 0; replay < 2; ++replay) {
        SCOPED_TRACE(str("replay ", replay));
        const auto hids = make_ids(patterns[replay], T, k, E, static_cast<uint32_t>(100 + replay));
        const auto hrows = random_f32(rows.size(), static_cast<uint64_t>(200 + replay));
        to_device(ids.data(), hids);
        to_device(rows.data(), hrows);
        CUDA_CHECK(cudaMemset(y.data(), 0xFF, y.size() * 4));
        CUDA_CHECK(cudaMemset(work.perm.data(), 0xFF, static_cast<size_t>(T * k) * 4));
        CUDA_CHECK(cudaGraphLaunch(exec, stream));
        CUDA_CHECK(cudaStreamSynchronize(stream));

        const Route r = cpu_route(hids, T, k, E);
        std::vector<uint16_t> xs_ref;
        std::vector<float> ws_ref, y_ref;
        cpu_gather(hx, hw, r.perm, k, D, xs_ref, ws_ref);
        cpu_combine(hrows, r.inv, hshared.data(), T, k, D, y_ref);
        EXPECT_EQ(first_mismatch(to_host(work.counts.data(), static_cast<size_t>(E)), r.counts), -1) << "counts";
        EXPECT_EQ(first_mismatch(to_host(work.offsets.data(), static_cast<size_t>(E + 1)), r.offsets), -1) << "offsets";
        EXPECT_EQ(first_mismatch(to_host(work.perm.data(), static_cast<size_t>(T * k)), r.perm), -1) << "perm";
        EXPECT_EQ(first_mismatch(to_host(work.inv.data(), static_cast<size_t>(T * k)), r.inv), -1) << "inv";
        EXPECT_EQ(first_mismatch(to_host(work.xs.data(), static_cast<size_t>(T * k * D)), xs_ref), -1) << "xs";
        EXPECT_EQ(first_mismatch(to_host(work.ws.data(), static_cast<size_t>(T * k)), ws_ref), -1) << "ws";
        EXPECT_EQ(first_mismatch(to_host(y.data(), y.size()), y_ref), -1) << "y";
    }
    CUDA_CHECK(cudaGraphExecDestroy(exec));
    CUDA_CHECK(cudaGraphDestroy(graph));
    CUDA_CHECK(cudaStreamDestroy(stream));
}

#else  // !MEGAMOE_HAVE_CUDA

TEST(MoeDispatch, SkippedWithoutCuda) { GTEST_SKIP() << "built without CUDA"; }

#endif

}  // namespace
}  // namespace megamoe
