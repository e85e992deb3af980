// multi_backend.cpp — see multi_backend.h.
#include "gpu/multi_backend.h"

#include "core/common.h"

#if defined(MEGAMOE_HAVE_NCCL)

#include <cuda_runtime_api.h>

#include <algorithm>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <ostream>
#include <sstream>
#include <string>
#include <thread>

#include "dist/dp.h"
#include "dist/nccl/comm.h"
#include "dist/nccl/exchange.h"
#include "dist/sim.h"

namespace megamoe::gpu {

namespace {

// One host thread per GPU: runs the jobs it is given with its device current, one at a time.
class RankWorker {
public:
    explicit RankWorker(int device) : device_(device), thread_([this] { loop(); }) {}
    ~RankWorker() {
        {
            std::lock_guard<std::mutex> l(mu_);
            stop_ = true;
        }
        cv_.notify_all();
        thread_.join();
    }
    RankWorker(const RankWorker&) = delete;
    RankWorker& operator=(const RankWorker&) = delete;

    void post(std::function<void()> job) {
        std::lock_guard<std::mutex> l(mu_);
        job_ = std::move(job);
        error_ = nullptr;
        busy_ = true;
        cv_.notify_all();
    }
    // Waits for the posted job; returns its exception (null when it finished).
    std::exception_ptr wait() {
        std::unique_lock<std::mutex> l(mu_);
        cv_.wait(l, [this] { return !busy_; });
        return error_;
    }

private:
    void loop() {
        const cudaError_t set = cudaSetDevice(device_);
        std::unique_lock<std::mutex> l(mu_);
        for (;;) {
            cv_.wait(l, [this] { return stop_ || busy_; });
            if (!busy_) return;   // stop, nothing posted
            std::function<void()> job = std::move(job_);
            l.unlock();
            std::exception_ptr err;
            try {
                if (set != cudaSuccess)
                    fail("CUDA device ", device_, ": ", cudaGetErrorString(set));
                job();
            } catch (...) {
                err = std::current_exception();
            }
            l.lock();
            error_ = err;
            busy_ = false;
            cv_.notify_all();
        }
    }

    int device_;
    std::mutex mu_;
    std::condition_variable cv_;
    std::function<void()> job_;
    std::exception_ptr error_;
    bool busy_ = false, stop_ = false;
    std::thread thread_;   // last: starts after the members it reads
};

// The calling thread's device set to `device` for a scope (the backend's calls other than steps
// run on the caller's thread: opening a slot, reserving, reading a state).
class DeviceScope {
public:
    explicit DeviceScope(int device) {
        (void)cudaGetDevice(&prev_);
        const cudaError_t e = cudaSetDevice(device);
        if (e != cudaSuccess) fail("CUDA device ", device, ": ", cudaGetErrorString(e));
    }
    ~DeviceScope() { (void)cudaSetDevice(prev_); }
    DeviceScope(const DeviceScope&) = delete;
    DeviceScope& operator=(const DeviceScope&) = delete;

private:
    int prev_ = 0;
};

class MultiGpuBackend final : public Backend {
public:
    // m: a checkpoint model, or null for random weights of config c made on the GPUs from seed.
    MultiGpuBackend(const Model* m, const ModelConfig& c, uint64_t seed, const RunnerOptions& opt,
                    const MultiGpuOptions& mo, std::ostream* log)
        : cfg_(c), devices_(mo.devices), world_(static_cast<int32_t>(mo.devices.size())) {
        check_devices();
        if (opt.rollback)
            fail("--gpus ", world_, ": speculative decoding across several GPUs is not built yet (run it on one GPU)");
        if (opt.exchange || opt.head_exchange)
            fail("multi-GPU backend: the runner options already name an exchange");
        if (!m && mo.partition != dist::PartitionKind::contiguous)
            fail("--partition ", dist::partition_kind_name(mo.partition),
                 ": synthetic weights have no hash tables to balance by; use contiguous");
        const dist::ModelPartition mp = dist::partition_model(cfg_, m ? &m->w : nullptr, world_, mo.partition);
        comms_ = dist::Communicator::create_local(devices_);
        for (int d : devices_) workers_.push_back(std::make_unique<RankWorker>(d));
        exchanges_.resize(static_cast<size_t>(world_));
        runners_.resize(static_cast<size_t>(world_));
        std::vector<std::ostringstream> logs(static_cast<size_t>(world_));
        const int64_t k = cfg_.num_experts_per_tok, D = cfg_.hidden_size;
        split_head_ = mo.split_head;
        // The runner's logit rows per step (RunnerOptions' defaults resolved as the runner does).
        const int64_t logit_rows = std::max(opt.max_logit_rows > 0 ? opt.max_logit_rows : opt.max_seqs,
                                            std::min(opt.max_seqs, opt.max_batch_tokens));
        const dist::VocabSplit vocab = dist::split_vocab(cfg_.vocab_size, world_);
        heads_.resize(static_cast<size_t>(world_));
        try {
            // Each rank makes its exchange and uploads its share on its own thread, all at once.
            on_all([&](int32_t r) {
                const size_t i = static_cast<size_t>(r);
                if (mo.scheme == dist::Scheme::all_to_all)
                    exchanges_[i] = std::make_unique<dist::AllToAllExchange>(comms_[i], mp.layers, opt.max_batch_tokens, k, D);
                else
                    exchanges_[i] = std::make_unique<dist::GatherScatterExchange>(comms_[i], mp.layers, opt.max_batch_tokens,
                                                                                  k, D, mo.combine);
                RunnerOptions o = opt;
                o.exchange = exchanges_[i].get();
                if (split_head_) {
                    heads_[i] = std::make_unique<dist::VocabExchange>(comms_[i], vocab, logit_rows, D);
                    o.head_exchange = heads_[i].get();
                }
                o.prefix_snapshots = 0;   // prefix caching runs on one GPU only (no snapshot records)
                runners_[i] = m ? std::make_unique<Runner>(*m, o, log ? &logs[i] : nullptr)
                                : std::make_unique<Runner>(c, seed, o, log ? &logs[i] : nullptr);
            });
        } catch (...) {
            release();
            throw;
        }
        open_.assign(static_cast<size_t>(world_), 0);
        if (log) {
            *log << "megamoe: " << world_ << " GPUs, routed experts split " << dist::partition_kind_name(mo.partition)
                 << " (expert parallelism, exchange: " << dist::scheme_name(mo.scheme);
            if (mo.scheme == dist::Scheme::gather_scatter) *log << ", " << dist::combine_name(mo.combine);
            *log << "), attention data-parallel (each sequence on one GPU), the head "
                 << (split_head_ ? "split by vocabulary" : "replicated") << "\n";
            for (int32_t r = 0; r < world_; ++r)
                *log << "GPU " << r << " (CUDA device " << devices_[static_cast<size_t>(r)] << "): "
                     << logs[static_cast<size_t>(r)].str();
        }
    }
    ~MultiGpuBackend() override { release(); }

    const ModelConfig& config() const override { return cfg_; }
    std::string name() const override { return "cuda"; }
    int64_t max_seqs() const override { return world_ * runner(0).options().max_seqs; }
    // A step's tokens and rows may all land on one GPU (its sequences' rank), so the limits are one runner's.
    int64_t max_batch_tokens() const override { return runner(0).options().max_batch_tokens; }
    int64_t max_logit_rows() const override { return runner(0).options().max_logit_rows; }
    int64_t max_model_len() const override { return runner(0).options().max_model_len; }

    int32_t open() override {
        std::vector<int64_t> free_tokens(static_cast<size_t>(world_));
        for (int32_t r = 0; r < world_; ++r) {
            const Runner& run = runner(r);
            free_tokens[static_cast<size_t>(r)] = static_cast<int64_t>(
                (1.0 - run.cache_usage()) * static_cast<double>(run.capacity_tokens()));
        }
        const int32_t r = dist::dp_pick_rank(open_, free_tokens, runner(0).options().max_seqs);
        if (r < 0) return -1;
        DeviceScope ds(device(r));
        const int32_t local = runner(r).open();
        if (local < 0) return -1;
        ++open_[static_cast<size_t>(r)];
        return dist::dp_slot(r, local, world_);
    }
    void close(int32_t slot) override {
        if (slot < 0) return;
        const int32_t r = dist::dp_rank(slot, world_), local = dist::dp_local(slot, world_);
        DeviceScope ds(device(r));
        if (!runner(r).is_open(local)) return;
        runner(r).close(local);
        --open_[static_cast<size_t>(r)];
    }
    bool reserve(int32_t slot, int64_t n) override {
        const int32_t r = rank_of(slot);
        DeviceScope ds(device(r));
        return runner(r).reserve(dist::dp_local(slot, world_), n);
    }
    int64_t n_past(int32_t slot) const override {
        const int32_t r = rank_of(slot);
        return runner(r).n_past(dist::dp_local(slot, world_));
    }

    void step(const std::vector<BackendChunk>& chunks, bool all_logits, std::vector<float>& logits,
              const Probe& probe) override {
        if (probe) fail("multi-GPU backend: probes (traces, teacher forcing) run on one GPU");
        Split sp = split(chunks, all_logits, nullptr);
        std::vector<std::vector<float>> parts(static_cast<size_t>(world_));
        run_step(sp, [&](int32_t r) {
            runner(r).step(sp.chunks[static_cast<size_t>(r)], all_logits, parts[static_cast<size_t>(r)]);
        });
        dist::merge_dp_rows(sp.plan, parts, cfg_.vocab_size, logits);
    }

    bool has_sampler() const override { return true; }
    void set_masked_ids(const std::vector<int32_t>& ids) override {
        for (int32_t r = 0; r < world_; ++r) {
            DeviceScope ds(device(r));
            runner(r).set_masked_ids(ids);
        }
    }
    void step_sample(const std::vector<BackendChunk>& chunks, const std::vector<SampleSpec>& spec,
                     std::vector<SampledToken>& out) override {
        if (spec.size() != chunks.size())
            fail("multi-GPU backend: ", spec.size(), " sampling specs for ", chunks.size(), " chunks");
        Split sp = split(chunks, false, &spec);
        std::vector<std::vector<SampledToken>> parts(static_cast<size_t>(world_));
        run_step(sp, [&](int32_t r) {
            runner(r).step_sample(sp.chunks[static_cast<size_t>(r)], sp.spec[static_cast<size_t>(r)],
                                  parts[static_cast<size_t>(r)]);
        });
        dist::merge_dp_rows(sp.plan, parts, 1, out);
    }

    // The share of all ranks' state in use.
    double cache_usage() const override {
        double used = 0, all = 0;
        for (int32_t r = 0; r < world_; ++r) {
            const double cap = static_cast<double>(runner(r).capacity_tokens());
            used += runner(r).cache_usage() * cap;
            all += cap;
        }
        return all > 0 ? used / all : 0.0;
    }
    // A sequence lives on one GPU: the longest one any rank can hold is the smallest rank's pool.
    int64_t capacity_tokens() const override {
        int64_t cap = runner(0).capacity_tokens();
        for (int32_t r = 1; r < world_; ++r) cap = std::min(cap, runner(r).capacity_tokens());
        return cap;
    }
    void set_n_past_for_benchmark(int32_t slot, int64_t n) {
        const int32_t r = rank_of(slot);
        DeviceScope ds(device(r));
        runner(r).set_n_past_for_benchmark(dist::dp_local(slot, world_), n);
    }
    SequenceState state(int32_t slot) const override {
        const int32_t r = rank_of(slot);
        DeviceScope ds(device(r));
        return runner(r).download_state(dist::dp_local(slot, world_));
    }

private:
    struct Split {
        dist::DpStep plan;
        std::vector<std::vector<RunnerChunk>> chunks;   // [N] each rank's chunks (its runner's slots)
        std::vector<std::vector<SampleSpec>> spec;      // [N] their sampling specs (step_sample)
        int64_t rows = 0;                               // exchange rows of the step (the largest rank's)
        int64_t head_rows = 0;                          // head rows of the step (the largest rank's)
    };

    void check_devices() const {
        if (world_ < 1) fail("multi-GPU backend: no GPU given");
        int count = 0;
        const cudaError_t e = cudaGetDeviceCount(&count);
        if (e != cudaSuccess) fail("--gpus ", world_, ": no CUDA device is usable (", cudaGetErrorString(e), ")");
        for (size_t i = 0; i < devices_.size(); ++i) {
            if (devices_[i] < 0 || devices_[i] >= count)
                fail("--gpus ", world_, ": CUDA device ", devices_[i], " is not visible (", count, " visible)");
            for (size_t j = 0; j < i; ++j)
                if (devices_[j] == devices_[i]) fail("--gpus: CUDA device ", devices_[i], " is named twice");
        }
    }

    int device(int32_t r) const { return devices_[static_cast<size_t>(r)]; }
    Runner& runner(int32_t r) { return *runners_[static_cast<size_t>(r)]; }
    const Runner& runner(int32_t r) const { return *runners_[static_cast<size_t>(r)]; }
    int32_t rank_of(int32_t slot) const {
        const int32_t r = dist::dp_rank(slot, world_);
        if (!runners_[static_cast<size_t>(r)]->is_open(dist::dp_local(slot, world_)))
            fail("multi-GPU backend: slot ", slot, " is not open");
        return r;
    }

    // Runs fn(r) on every rank's thread at once; rethrows the first rank's error after all finished.
    void on_all(const std::function<void(int32_t)>& fn) {
        for (int32_t r = 0; r < world_; ++r) workers_[static_cast<size_t>(r)]->post([&fn, r] { fn(r); });
        std::exception_ptr first;
        for (int32_t r = 0; r < world_; ++r) {
            std::exception_ptr e = workers_[static_cast<size_t>(r)]->wait();
            if (e && !first) first = e;
        }
        if (first) std::rethrow_exception(first);
    }

    // The step's chunks per rank, every rank's part checked (before any rank starts: a rank that
    // threw inside the step would leave its peers waiting in the exchange), and the exchange rows.
    Split split(const std::vector<BackendChunk>& chunks, bool all_logits, const std::vector<SampleSpec>* spec) {
        if (chunks.empty()) fail("multi-GPU backend: a step needs at least one chunk");
        std::vector<int32_t> slots;
        std::vector<int64_t> lens;
        for (const BackendChunk& ch : chunks) {
            slots.push_back(ch.slot);
            lens.push_back(std::max<int64_t>(1, static_cast<int64_t>(ch.tokens.size())));   // empty: the runner's check names it
            if (ch.slot < 0) fail("multi-GPU backend: slot ", ch.slot, " is not open");
        }
        Split sp;
        sp.plan = dist::plan_dp_step(slots, lens, all_logits, world_);
        sp.chunks.resize(static_cast<size_t>(world_));
        sp.spec.resize(static_cast<size_t>(world_));
        for (int32_t r = 0; r < world_; ++r) {
            const size_t ri = static_cast<size_t>(r);
            for (int64_t i : sp.plan.chunks[ri]) {
                const BackendChunk& ch = chunks[static_cast<size_t>(i)];
                sp.chunks[ri].push_back({dist::dp_local(ch.slot, world_), ch.tokens});
                if (spec) sp.spec[ri].push_back((*spec)[static_cast<size_t>(i)]);
            }
            if (sp.chunks[ri].empty()) continue;
            runner(r).check_step(sp.chunks[ri], all_logits, spec ? &sp.spec[ri] : nullptr);
            sp.rows = std::max(sp.rows, runner(r).padded_tokens(sp.chunks[ri], all_logits));
            sp.head_rows = std::max(sp.head_rows, runner(r).padded_rows(sp.chunks[ri], all_logits));
        }
        return sp;
    }

    // Every rank at once: its part of the step, or only the exchange when it has no chunk.
    void run_step(const Split& sp, const std::function<void(int32_t)>& part) {
        on_all([&](int32_t r) {
            Runner& run = runner(r);
            run.set_exchange_rows(sp.rows);
            if (split_head_) run.set_head_rows(sp.head_rows);
            if (sp.chunks[static_cast<size_t>(r)].empty())
                run.step_idle();
            else
                part(r);
        });
    }

    // Runners and exchanges go on their own GPU's thread, before the communicators.
    void release() {
        if (workers_.size() == static_cast<size_t>(world_)) {
            try {
                on_all([&](int32_t r) {
                    runners_[static_cast<size_t>(r)].reset();
                    exchanges_[static_cast<size_t>(r)].reset();
                    if (static_cast<size_t>(r) < heads_.size()) heads_[static_cast<size_t>(r)].reset();
                });
            } catch (...) {   // a destructor's CUDA error: nothing more to free
            }
        }
        runners_.clear();
        exchanges_.clear();
        heads_.clear();
        workers_.clear();
        comms_.clear();
    }

    ModelConfig cfg_;
    std::vector<int> devices_;
    int32_t world_ = 1;
    std::vector<dist::Communicator> comms_;                       // [N]
    std::vector<std::unique_ptr<RankWorker>> workers_;            // [N]
    std::vector<std::unique_ptr<dist::ExpertExchange>> exchanges_;   // [N] (before the runners that use them)
    std::vector<std::unique_ptr<dist::HeadExchange>> heads_;      // [N] when the head is split
    bool split_head_ = true;
    std::vector<std::unique_ptr<Runner>> runners_;                // [N]
    std::vector<int64_t> open_;                                   // [N] sequences open on each rank
};

}  // namespace

bool multi_gpu_available() { return true; }

std::unique_ptr<Backend> make_multi_gpu_backend(const Model& m, const RunnerOptions& opt, const MultiGpuOptions& mo,
                                                std::ostream* log) {
    return std::make_unique<MultiGpuBackend>(&m, m.cfg, 0, opt, mo, log);
}

std::unique_ptr<Backend> make_multi_gpu_backend(const ModelConfig& c, uint64_t seed, const RunnerOptions& opt,
                                                const MultiGpuOptions& mo, std::ostream* log) {
    return std::make_unique<MultiGpuBackend>(nullptr, c, seed, opt, mo, log);
}

void set_n_past_for_benchmark(Backend& b, int32_t slot, int64_t n) {
    auto* mb = dynamic_cast<MultiGpuBackend*>(&b);
    if (!mb) fail("set_n_past_for_benchmark: not a multi-GPU backend (", b.name(), ")");
    mb->set_n_past_for_benchmark(slot, n);
}

}  // namespace megamoe::gpu

#else

namespace megamoe::gpu {

bool multi_gpu_available() { return false; }

std::unique_ptr<Backend> make_multi_gpu_backend(const Model&, const RunnerOptions&, const MultiGpuOptions& mo,
                                                std::ostream*) {
    fail("--gpus ", mo.devices.size(), ": this build has no NCCL (CUDA's nccl.h and libnccl were not found at configure time)");
}

std::unique_ptr<Backend> make_multi_gpu_backend(const ModelConfig&, uint64_t, const RunnerOptions&,
                                                const MultiGpuOptions& mo, std::ostream*) {
    fail("--gpus ", mo.devices.size(), ": this build has no NCCL (CUDA's nccl.h and libnccl were not found at configure time)");
}

void set_n_past_for_benchmark(Backend& b, int32_t, int64_t) {
    fail("set_n_past_for_benchmark: not a multi-GPU backend (", b.name(), ")");
}

}  // namespace megamoe::gpu

#endif
