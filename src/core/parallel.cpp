// parallel.cpp — the fork-join pool behind parallel_for.
#include "core/parallel.h"

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace megamoe {

namespace {

constexpr int64_t kMinWorkPerThread = 1 << 15;   // below this, waking a thread costs more than it saves

class Pool {
public:
    explicit Pool(int n) { resize(n); }
    ~Pool() { stop(); }

    int size() const { return static_cast<int>(workers_.size()) + 1; }

    // Not concurrent with run(). New workers start from the current generation: a worker that
    // started from 0 after earlier runs took the last run's (finished) job for a new one and
    // called a null job_ (set_num_threads after any parallel work crashed).
    void resize(int n) {
        stop();
        n = std::max(n, 1);
        done_ = false;
        const uint64_t gen = generation_;
        for (int i = 1; i < n; ++i) workers_.emplace_back([this, i, gen] { loop(i, gen); });
    }

    // Runs job(worker) on `n` workers (the caller is worker 0) and waits for all of them.
    void run(int n, const std::function<void(int)>& job) {
        std::unique_lock<std::mutex> lk(m_);
        job_ = &job;
        active_ = n;
        pending_ = n - 1;
        ++generation_;
        cv_.notify_all();
        lk.unlock();
        job(0);
        lk.lock();
        done_cv_.wait(lk, [&] { return pending_ == 0; });
        job_ = nullptr;
    }

private:
    void loop(int id, uint64_t seen) {
        std::unique_lock<std::mutex> lk(m_);
        for (;;) {
            cv_.wait(lk, [&] { return done_ || generation_ != seen; });
            if (done_) return;
            seen = generation_;
            if (id >= active_) continue;
            const std::function<void(int)>* job = job_;
            lk.unlock();
            (*job)(id);
            lk.lock();
            if (--pending_ == 0) done_cv_.notify_one();
        }
    }

    void stop() {
        {
            std::lock_guard<std::mutex> lk(m_);
            done_ = true;
            cv_.notify_all();
        }
        for (auto& t : workers_) t.join();
        workers_.clear();
    }

    std::mutex m_;
    std::condition_variable cv_, done_cv_;
    std::vector<std::thread> workers_;
    const std::function<void(int)>* job_ = nullptr;
    uint64_t generation_ = 0;
    int active_ = 0, pending_ = 0;
    bool done_ = false;
};

// MEGAMOE_THREADS when it is a positive number (up to 1024), else every core.
int default_threads() {
    if (const char* env = std::getenv("MEGAMOE_THREADS")) {
        char* end = nullptr;
        const long n = std::strtol(env, &end, 10);
        if (end != env && *end == '\0' && n > 0 && n <= 1024) return static_cast<int>(n);
    }
    return std::max(1u, std::thread::hardware_concurrency());
}

Pool& pool() {
    static Pool p(default_threads());
    return p;
}

thread_local bool in_parallel = false;
std::mutex run_mutex;   // one fork-join at a time; a second caller runs inline

}  // namespace

void set_num_threads(int n) { pool().resize(n > 0 ? n : default_threads()); }
int num_threads() { return pool().size(); }

void parallel_ranges(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn, int64_t cost_per_item) {
    if (n <= 0) return;
    const int64_t by_work = std::max<int64_t>(1, n * std::max<int64_t>(cost_per_item, 1) / kMinWorkPerThread);
    const int threads = static_cast<int>(std::min<int64_t>({num_threads(), n, by_work}));
    std::unique_lock<std::mutex> lk(run_mutex, std::defer_lock);
    if (threads <= 1 || in_parallel || !lk.try_lock()) {
        fn(0, n, 0);
        return;
    }
    pool().run(threads, [&](int w) {
        in_parallel = true;
        const int64_t begin = n * w / threads, end = n * (w + 1) / threads;
        if (begin < end) fn(begin, end, w);
        in_parallel = false;
    });
}

void parallel_for(int64_t n, const std::function<void(int64_t)>& fn, int64_t cost_per_item) {
    parallel_ranges(
        n,
        [&](int64_t b, int64_t e, int) {
            for (int64_t i = b; i < e; ++i) fn(i);
        },
        cost_per_item);
}

}  // namespace megamoe
