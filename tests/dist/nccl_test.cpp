// nccl_test.cpp — the NCCL exchanges (dist/nccl/exchange.h) in a world of one GPU against the CPU
// plans (dist/plan.h): what arrives, where, and the combined sums bit for bit (exact and official
// rounding, calls of fewer tokens, a later layer's partition); the gather/scatter sequence
// captured into a CUDA graph and replayed equals eager execution; the head's vocabulary exchange. Skips without a GPU,
// or when the build has no NCCL. A world of N > 1 needs a multi-GPU machine (not run yet).
#include <gtest/gtest.h>

#if defined(MEGAMOE_HAVE_NCCL)

#include <cuda_runtime.h>

#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "cuda/linear.h"
#include "cuda/moe_dispatch.h"
#include "dist/nccl/exchange.h"
#include "io/formats.h"
#include "ref/ops.h"

namespace megamoe::dist {
namespace {

constexpr int64_t E = 16, k = 4, D = 72, T = 5, T_pad = 6;

struct Inputs {
    std::vector<uint16_t> x;     // [T_pad, D] bf16
    std::vector<int32_t> ids;    // [T_pad, k] (row T_pad − 1 padding: −1)
    std::vector<float> wts;      // [T_pad, k]
    std::vector<float> shared;   // [T_pad, D]
    std::vector<float> pair;     // [T_pad·k, D] the "expert output" of each (token, slot)
};

Inputs make_inputs(uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    Inputs in;
    for (int64_t i = 0; i < T_pad * D; ++i) in.x.push_back(f32_to_bf16(nd(rng)));
    for (int64_t i = 0; i < T_pad * k; ++i) in.ids.push_back(i / k < T ? static_cast<int32_t>(rng() % E) : -1);
    for (int64_t i = 0; i < T_pad * k; ++i) in.wts.push_back(nd(rng));
    for (int64_t i = 0; i < T_pad * D; ++i) in.shared.push_back(nd(rng));
    for (int64_t i = 0; i < T_pad * k * D; ++i) in.pair.push_back(nd(rng));
    return in;
}

// y[t] = shared[t] + Σ_s pair[t, s] over the routed slots, slot order from 0 (ops::moe's order);
// official: each pair and shared rounded to bf16 before the adds, y after them (ops::moe's official
// combine). The first `rows` tokens.
std::vector<float> expected(const Inputs& in, bool official = false, int64_t rows = T_pad) {
    const auto r = [official](float v) { return official ? ops::bf16_round(v) : v; };
    std::vector<float> y(static_cast<size_t>(rows * D));
    for (int64_t t = 0; t < rows; ++t)
        for (int64_t d = 0; d < D; ++d) {
            float acc = 0;
            for (int64_t s = 0; s < k; ++s)
                if (in.ids[static_cast<size_t>(t * k + s)] >= 0) acc += r(in.pair[static_cast<size_t>((t * k + s) * D + d)]);
            y[static_cast<size_t>(t * D + d)] = r(r(in.shared[static_cast<size_t>(t * D + d)]) + acc);
        }
    return y;
}

// Expert rows in the routed order: rows[j] = pair[perm[j]] (as the expert layer would produce them).
std::vector<float> rows_in_expert_order(const std::vector<int32_t>& perm, int64_t n, const std::vector<float>& pair,
                                        const std::vector<int32_t>* src_pair = nullptr) {
    std::vector<float> rows(static_cast<size_t>(std::max<int64_t>(n, 1) * D), 0.0f);
    for (int64_t j = 0; j < n; ++j) {
        const int64_t i = src_pair ? (*src_pair)[static_cast<size_t>(perm[static_cast<size_t>(j)])] : perm[static_cast<size_t>(j)];
        std::copy(pair.begin() + i * D, pair.begin() + (i + 1) * D, rows.begin() + j * D);
    }
    return rows;
}

struct Stream {
    cudaStream_t s = nullptr;
    Stream() { CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
    ~Stream() { cudaStreamDestroy(s); }
    CUstream_st* get() const { return reinterpret_cast<CUstream_st*>(s); }
    void sync() const { CUDA_CHECK(cudaStreamSynchronize(s)); }
};

// Local routing over per_rank + 1 experts (the last one collects the skipped slots).
struct Route {
    cuda::DeviceArray<int32_t> counts, offsets, perm, inv, scratch;
    Route(int64_t rows, int64_t experts)
        : counts(static_cast<size_t>(experts)), offsets(static_cast<size_t>(experts + 1)),
          perm(static_cast<size_t>(rows * k)), inv(static_cast<size_t>(rows * k)),
          scratch(static_cast<size_t>(cuda::moe_route_scratch_ints(rows * k, experts))) {}
    void run(const int32_t* local, int64_t rows, int64_t experts, CUstream_st* s) {
        cuda::moe_route_counts(local, rows, k, experts, counts.data(), offsets.data(), perm.data(), inv.data(),
                               scratch.data(), s);
    }
};

#define SKIP_WITHOUT_GPU() \
    if (!cuda::gpu_available()) GTEST_SKIP() << "no CUDA device"

TEST(DistNccl, GatherScatterWorldOfOne) {
    SKIP_WITHOUT_GPU();
    std::vector<Communicator> comms = Communicator::create_local({0});
    ASSERT_EQ(comms.size(), 1u);
    EXPECT_EQ(comms[0].world(), 1);
    const ExpertPartition p = ExpertPartition::contiguous(E, 1);
    const Inputs in = make_inputs(1);
    const GatherPlan plan = plan_gather_scatter(p, {{in.ids.data(), T_pad}}, k);
    for (Combine combine : {Combine::slot_rows, Combine::partial_sums})
        for (bool official : {false, true}) {
            GatherScatterExchange ex(comms[0], p, T_pad, k, D, combine);
            EXPECT_EQ(ex.held(0), p.held[0]);
            EXPECT_EQ(ex.max_rows(), T_pad);
            Stream st;
            cuda::DeviceArray<uint16_t> x(in.x);
            cuda::DeviceArray<int32_t> ids(in.ids);
            cuda::DeviceArray<float> wts(in.wts), shared(in.shared), y(static_cast<size_t>(T_pad * D));
            ex.dispatch(0, x.data(), ids.data(), wts.data(), T_pad, st.get());
            ASSERT_EQ(ex.rows(), T_pad);
            Route route(ex.rows(), ex.skip() + 1);
            route.run(ex.local_in(), ex.rows(), ex.skip() + 1, st.get());
            st.sync();
            EXPECT_EQ(ex.x_all.download(), in.x);
            EXPECT_EQ(ex.wts_all.download(), in.wts);
            std::vector<int32_t> want_local = plan.local[0];
            for (int32_t& l : want_local) l = l < 0 ? ex.skip() : l;
            EXPECT_EQ(ex.local.download(), want_local);
            const std::vector<int32_t> offsets = route.offsets.download();
            cuda::DeviceArray<float> rows(
                rows_in_expert_order(route.perm.download(), offsets[static_cast<size_t>(ex.skip())], in.pair));
            ex.give_back(rows.data(), route.inv.data(), official, st.get());
            ex.combine(shared.data(), ids.data(), y.data(), official, st.get());
            st.sync();
            comms[0].check();
            const std::vector<float> got = y.download(), want = expected(in, official);
            EXPECT_EQ(0, std::memcmp(got.data(), want.data(), want.size() * sizeof(float)))
                << combine_name(combine) << (official ? ", official" : ", exact");
        }
}

// A call of fewer tokens than the exchange holds moves and combines just those (the rows of a
// decode bucket smaller than the prefill the buffers are sized for), in a later layer's partition.
TEST(DistNccl, CallsOfFewerTokensAndAnotherLayer) {
    SKIP_WITHOUT_GPU();
    std::vector<Communicator> comms = Communicator::create_local({0});
    const std::vector<ExpertPartition> layers{ExpertPartition::contiguous(E, 1), ExpertPartition::contiguous(E, 1)};
    const Inputs in = make_inputs(5);
    constexpr int64_t Tc = 3;
    GatherScatterExchange gs(comms[0], layers, T_pad, k, D, Combine::slot_rows);
    AllToAllExchange a2a(comms[0], layers, T_pad, k, D);
    for (ExpertExchange* ex : {static_cast<ExpertExchange*>(&gs), static_cast<ExpertExchange*>(&a2a)}) {
        EXPECT_EQ(ex->layers(), 2);
        Stream st;
        cuda::DeviceArray<uint16_t> x(in.x);
        cuda::DeviceArray<int32_t> ids(in.ids);
        cuda::DeviceArray<float> wts(in.wts), shared(in.shared), y(static_cast<size_t>(T_pad * D));
        y.fill(0);
        ex->dispatch(1, x.data(), ids.data(), wts.data(), Tc, st.get());
        ASSERT_EQ(ex->rows(), Tc);
        Route route(ex->rows(), ex->skip() + 1);
        route.run(ex->local_in(), ex->rows(), ex->skip() + 1, st.get());
        st.sync();
        // Received row j is token j here (a world of one, every token has a slot on rank 0).
        std::vector<int32_t> src_pair(static_cast<size_t>(Tc * k));
        std::iota(src_pair.begin(), src_pair.end(), 0);
        const std::vector<int32_t> offsets = route.offsets.download();
        cuda::DeviceArray<float> rows(
            rows_in_expert_order(route.perm.download(), offsets[static_cast<size_t>(ex->skip())], in.pair, &src_pair));
        ex->give_back(rows.data(), route.inv.data(), false, st.get());
        ex->combine(shared.data(), ids.data(), y.data(), false, st.get());
        st.sync();
        comms[0].check();
        const std::vector<float> got = y.download(), want = expected(in, false, Tc);
        EXPECT_EQ(0, std::memcmp(got.data(), want.data(), want.size() * sizeof(float)));
        for (size_t i = want.size(); i < got.size(); ++i) ASSERT_EQ(got[i], 0.0f) << "row past the call's tokens";
        EXPECT_THROW(ex->dispatch(2, x.data(), ids.data(), wts.data(), Tc, st.get()), Error);
        EXPECT_THROW(ex->dispatch(0, x.data(), ids.data(), wts.data(), T_pad + 1, st.get()), Error);
    }
}

TEST(DistNccl, AllToAllWorldOfOne) {
    SKIP_WITHOUT_GPU();
    std::vector<Communicator> comms = Communicator::create_local({0});
    const ExpertPartition p = ExpertPartition::contiguous(E, 1);
    const Inputs in = make_inputs(2);
    const AllToAllPlan plan = plan_all_to_all(p, {{in.ids.data(), T_pad}}, k);
    AllToAllExchange ex(comms[0], p, T_pad, k, D);
    Stream st;
    cuda::DeviceArray<uint16_t> x(in.x);
    cuda::DeviceArray<int32_t> ids(in.ids);
    cuda::DeviceArray<float> wts(in.wts), shared(in.shared), y(static_cast<size_t>(T_pad * D));
    ex.dispatch(0, x.data(), ids.data(), wts.data(), T_pad, st.get());
    st.sync();
    // What arrived is plan_all_to_all's block 0 → 0, at row 0 of the receive buffer.
    const int64_t n = plan.send_count[0];
    EXPECT_EQ(ex.recv_count.download()[0], n);
    const std::vector<int32_t> meta = ex.recv_meta.download(), tok = ex.send_token.download();
    const std::vector<uint16_t> rx = ex.recv_x.download();
    const std::vector<float> rw = ex.recv_wts.download();
    for (int64_t j = 0; j < n; ++j) {
        const int32_t t = plan.send_token[0][static_cast<size_t>(j)];
        EXPECT_EQ(tok[static_cast<size_t>(j)], t);
        for (int64_t s = 0; s < k; ++s) {
            EXPECT_EQ(meta[static_cast<size_t>(j * k + s)], plan.send_local[0][static_cast<size_t>(j * k + s)]);
            EXPECT_EQ(rw[static_cast<size_t>(j * k + s)], in.wts[static_cast<size_t>(t * k + s)]);
        }
        EXPECT_EQ(0, std::memcmp(rx.data() + j * D, in.x.data() + t * D, D * sizeof(uint16_t)));
    }
    // The experts' rows: received row j slot s is pair (send_token[j], s).
    Route route(ex.rows(), ex.skip() + 1);
    route.run(ex.local_in(), ex.rows(), ex.skip() + 1, st.get());
    st.sync();
    std::vector<int32_t> src_pair(static_cast<size_t>(ex.rows() * k), 0);
    for (int64_t j = 0; j < n; ++j)
        for (int64_t s = 0; s < k; ++s) src_pair[static_cast<size_t>(j * k + s)] = tok[static_cast<size_t>(j)] * k + static_cast<int32_t>(s);
    const std::vector<int32_t> offsets = route.offsets.download();
    cuda::DeviceArray<float> rows(
        rows_in_expert_order(route.perm.download(), offsets[static_cast<size_t>(ex.skip())], in.pair, &src_pair));
    ex.give_back(rows.data(), route.inv.data(), false, st.get());
    ex.combine(shared.data(), ids.data(), y.data(), false, st.get());
    st.sync();
    comms[0].check();
    const std::vector<float> got = y.download(), want = expected(in);
    EXPECT_EQ(0, std::memcmp(got.data(), want.data(), want.size() * sizeof(float)));
}

// gather → local routing → place → reduce-scatter → combine, captured once, replayed on new inputs.
TEST(DistNccl, GatherScatterCapturesIntoAGraph) {
    SKIP_WITHOUT_GPU();
    std::vector<Communicator> comms = Communicator::create_local({0});
    const ExpertPartition p = ExpertPartition::contiguous(E, 1);
    GatherScatterExchange ex(comms[0], p, T_pad, k, D, Combine::slot_rows);
    Stream st;
    Inputs in = make_inputs(3);
    cuda::DeviceArray<uint16_t> x(in.x);
    cuda::DeviceArray<int32_t> ids(in.ids);
    cuda::DeviceArray<float> wts(in.wts), shared(in.shared), y(static_cast<size_t>(T_pad * D));
    cuda::DeviceArray<float> rows(std::vector<float>(in.pair.begin(), in.pair.end()));   // any f32 rows
    Route route(T_pad, ex.skip() + 1);   // a world of one gathers T_pad rows
    auto step = [&] {
        ex.dispatch(0, x.data(), ids.data(), wts.data(), T_pad, st.get());
        route.run(ex.local_in(), ex.rows(), ex.skip() + 1, st.get());
        ex.give_back(rows.data(), route.inv.data(), false, st.get());
        ex.combine(shared.data(), ids.data(), y.data(), false, st.get());
    };
    step();
    st.sync();
    const std::vector<float> eager = y.download();
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    CUDA_CHECK(cudaStreamBeginCapture(st.s, cudaStreamCaptureModeThreadLocal));
    step();
    CUDA_CHECK(cudaStreamEndCapture(st.s, &graph));
    CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    y.fill(0);
    CUDA_CHECK(cudaGraphLaunch(exec, st.s));
    st.sync();
    EXPECT_EQ(y.download(), eager);
    // New contents in the same buffers: the replay follows them.
    in = make_inputs(4);
    x.upload(in.x);
    ids.upload(in.ids);
    wts.upload(in.wts);
    step();
    st.sync();
    const std::vector<float> eager2 = y.download();
    EXPECT_NE(eager2, eager);
    y.fill(0);
    CUDA_CHECK(cudaGraphLaunch(exec, st.s));
    st.sync();
    EXPECT_EQ(y.download(), eager2);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    comms[0].check();
}

// The head's vocabulary exchange in a world of one: the hidden rows arrive as sent, and the
// slice written into slice_logits() comes back as the whole rows' logits; calls of fewer rows than
// it holds move just those; a split of another world or an empty slice is refused.
TEST(DistNccl, VocabExchangeWorldOfOne) {
    SKIP_WITHOUT_GPU();
    std::vector<Communicator> comms = Communicator::create_local({0});
    constexpr int64_t V = 300, R_max = 5;
    VocabExchange vx(comms[0], split_vocab(V, 1), R_max, D);
    EXPECT_EQ(vx.vocab_begin(), 0);
    EXPECT_EQ(vx.vocab_end(), V);
    Stream st;
    std::mt19937 rng(9);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (int64_t R : {R_max, int64_t{2}}) {
        std::vector<uint16_t> hidden;
        for (int64_t i = 0; i < R * D; ++i) hidden.push_back(f32_to_bf16(nd(rng)));
        std::vector<float> slices;
        for (int64_t i = 0; i < R * V; ++i) slices.push_back(nd(rng));
        cuda::DeviceArray<uint16_t> h(hidden);
        cuda::DeviceArray<float> logits(static_cast<size_t>(R_max * V));
        vx.gather(h.data(), R, st.get());
        ASSERT_EQ(vx.rows(), R);
        CUDA_CHECK(cudaMemcpyAsync(vx.slice_logits(), slices.data(), slices.size() * 4, cudaMemcpyHostToDevice, st.s));
        vx.scatter(logits.data(), st.get());
        st.sync();
        comms[0].check();
        std::vector<uint16_t> got_h(static_cast<size_t>(R * D));
        CUDA_CHECK(cudaMemcpy(got_h.data(), vx.hidden_all(), got_h.size() * 2, cudaMemcpyDeviceToHost));
        EXPECT_EQ(got_h, hidden) << "R = " << R;
        const std::vector<float> got = logits.download();
        EXPECT_EQ(0, std::memcmp(got.data(), slices.data(), slices.size() * 4)) << "R = " << R;
    }
    EXPECT_THROW(vx.gather(nullptr, R_max + 1, st.get()), Error);
    EXPECT_THROW(VocabExchange(comms[0], split_vocab(V, 2), R_max, D), Error);
    VocabSplit empty = split_vocab(V, 1);
    empty.begin = {0, 0};
    EXPECT_THROW(VocabExchange(comms[0], empty, R_max, D), Error);
}

TEST(DistNccl, RefusesAPartitionOfAnotherWorld) {
    SKIP_WITHOUT_GPU();
    std::vector<Communicator> comms = Communicator::create_local({0});
    EXPECT_THROW(GatherScatterExchange(comms[0], ExpertPartition::contiguous(E, 2), T_pad, k, D, Combine::slot_rows), Error);
    EXPECT_THROW(Communicator::create_local({0, 99}), Error);
}

}  // namespace
}  // namespace megamoe::dist

#else

TEST(DistNccl, SkippedWithoutNccl) { GTEST_SKIP() << "built without CUDA + NCCL"; }

#endif
