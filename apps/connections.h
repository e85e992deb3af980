// connections.h — connection threads, read deadlines and disconnect checks for `megamoe serve`.
//
// cpp-httplib 0.11 (Debian 12's, built into a shared library) serves each connection on a thread
// of a fixed pool, times out each read on its own, and gives a handler no access to its socket.
// So clients that trickle their headers a byte at a time hold threads indefinitely, enough of
// them starve /health, and a handler cannot tell that its client went away. Connections is the
// server's task queue instead:
//  - a thread per connection waiting to be served, up to max_threads (threads are reused), so
//    slow connections do not hold up others;
//  - it finds each accepted socket (the queue is called on the accepting thread right after
//    accept(): the one connected socket on the listening port that it does not know yet, looked
//    up in /proc/self/fd) and keeps a duplicate of it, through which a watchdog shuts down a
//    connection that is past its deadline: the request line and headers within header_timeout
//    of connecting or of the previous response, the body within body_timeout of the headers;
//    and one whose request line and headers pass max_header_bytes (httplib 0.11 gathers a line
//    without a bound, so "GET /" and a gigabyte without a newline would all be held in memory).
//    What httplib has read is the kernel's count of bytes received (TCP_INFO) less those still
//    queued (FIONREAD), checked every 50 ms; a body that arrived with the headers is not counted.
//    Through the duplicate the shutdown reaches the right socket even if httplib has just
//    closed its descriptor and the number was reused;
//  - a handler can ask whether its client has gone (client_gone()).
// Phase changes and client_gone() act on the connection served by the calling thread; they do
// nothing on other threads or when the socket was not found.
#pragma once

#include <dirent.h>
#include <fcntl.h>
#include <httplib.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace megamoe {

struct ConnectionLimits {
    std::chrono::milliseconds header_timeout{10000};  // request line + headers, from connect or the previous response
    std::chrono::milliseconds body_timeout{60000};    // request body, from the end of the headers
    size_t max_threads = 1024;                         // connections served at once; more wait for a thread
    int64_t max_header_bytes = 256 << 10;              // request line + headers, roughly (checked every 50 ms)
};

class Connections {
public:
    using Clock = std::chrono::steady_clock;

    explicit Connections(const ConnectionLimits& limits) : lim_(limits), dog_([this] { watchdog(); }) {}

    ~Connections() {
        {
            std::lock_guard<std::mutex> lk(m_);
            stop_dog_ = true;
        }
        dog_cv_.notify_all();
        dog_.join();
        shutdown_pool();
        for (auto& c : conns_) ::close(c->guard);
    }

    Connections(const Connections&) = delete;
    Connections& operator=(const Connections&) = delete;

    // The listening port: accepted sockets are the connected ones whose local port it is.
    void set_port(int port) { port_ = port; }

    // For httplib::Server::new_task_queue (httplib owns and deletes the queue).
    httplib::TaskQueue* make_queue() { return new Queue(*this); }

    // On a connection's thread:
    static void headers_read() { set_phase(Phase::body); }      // the body deadline starts
    static void body_read() { set_phase(Phase::busy); }         // no deadline while the handler works
    // The response is about to be written; after it, the next request's header deadline runs.
    // A streamed response keeps the connection busy until stream_ended().
    static void response_ready(bool streaming) { set_phase(streaming ? Phase::busy : Phase::headers); }
    static void stream_ended() { set_phase(Phase::headers); }

    // Whether the client of the calling thread's connection has closed it (or reset it). A
    // half-closed connection counts as gone, as in uvicorn: the request body was read already.
    static bool client_gone() {
        Conn* c = current_;
        if (!c || c->guard < 0) return false;
        pollfd p{c->guard, POLLIN | POLLRDHUP, 0};
        if (::poll(&p, 1, 0) <= 0) return false;
        if (p.revents & (POLLERR | POLLHUP | POLLRDHUP | POLLNVAL)) return true;
        char byte;
        return ::recv(c->guard, &byte, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
    }

    // Connections the watchdog cut, by the limit they passed (those closed because the server
    // stops are not counted).
    struct Cuts {
        std::atomic<uint64_t> header_timeout{0}, header_bytes{0}, body_timeout{0};
    };
    const Cuts& cuts() const { return cuts_; }

private:
    enum class Phase { headers, body, busy };

    struct Conn {
        int fd = -1;     // httplib's descriptor (only compared: httplib owns it)
        int guard = -1;  // our duplicate: shutdown() through it reaches this connection's socket
        sockaddr_storage peer{};
        socklen_t peer_len = 0;
        Phase phase = Phase::headers;
        Clock::time_point since = Clock::now();
        int64_t read_at = 0;       // bytes read when the headers phase began
        bool cut = false;
        Connections* owner = nullptr;
    };
    struct Job {
        std::shared_ptr<Conn> conn;
        std::function<void()> fn;
    };

    class Queue : public httplib::TaskQueue {
    public:
        explicit Queue(Connections& c) : c_(c) {}
        void enqueue(std::function<void()> fn) override { c_.enqueue(std::move(fn)); }
        void shutdown() override { c_.shutdown_pool(); }

    private:
        Connections& c_;
    };

    static void set_phase(Phase p) {
        Conn* c = current_;
        if (!c || !c->owner) return;
        const int64_t read = p == Phase::headers && c->guard >= 0 ? bytes_read(c->guard) : 0;
        std::lock_guard<std::mutex> lk(c->owner->m_);
        c->phase = p;
        c->since = Clock::now();
        c->read_at = read;
    }

    // Bytes read from the socket so far (received, less those still queued), or -1 where the
    // kernel does not say. glibc's struct tcp_info stops short of tcpi_bytes_received, and
    // <linux/tcp.h> cannot be included beside <netinet/tcp.h>; the kernel only ever appends to
    // the struct, so the layout is fixed. Received is read first: bytes arriving in between
    // make the result smaller, never larger.
    struct KernelTcpInfo {
        tcp_info glibc;
        uint64_t pacing_rate, max_pacing_rate, bytes_acked, bytes_received;
    };
    static int64_t bytes_read(int fd) {
        static_assert(offsetof(KernelTcpInfo, bytes_received) == 128, "struct tcp_info layout");
        KernelTcpInfo info{};
        socklen_t len = sizeof info;
        int queued = 0;
        if (::getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) != 0 || len < sizeof info) return -1;
        if (::ioctl(fd, FIONREAD, &queued) != 0) return -1;
        return static_cast<int64_t>(info.bytes_received) - queued;
    }

    static int port_of(const sockaddr_storage& a) {
        if (a.ss_family == AF_INET) return ntohs(reinterpret_cast<const sockaddr_in&>(a).sin_port);
        if (a.ss_family == AF_INET6) return ntohs(reinterpret_cast<const sockaddr_in6&>(a).sin6_port);
        return -1;
    }

    // The socket accept() just returned: the one connected socket on our port that is neither a
    // known connection nor one of our duplicates. Called with m_ held, on the accepting thread,
    // before the connection's job exists, so that socket cannot have been closed yet.
    std::shared_ptr<Conn> find_accepted() {
        auto conn = std::make_shared<Conn>();
        conn->owner = this;
        const int port = port_;
        DIR* dir = port > 0 ? ::opendir("/proc/self/fd") : nullptr;
        if (!dir) {
            if (port > 0 && !warned_) {
                std::fprintf(stderr, "megamoe: cannot read /proc/self/fd: connections get no deadlines or disconnect checks\n");
                warned_ = true;
            }
            return conn;
        }
        int found = -1, n_found = 0;
        while (const dirent* e = ::readdir(dir)) {
            char* end = nullptr;
            const long v = std::strtol(e->d_name, &end, 10);
            if (end == e->d_name || *end != '\0' || v == ::dirfd(dir)) continue;
            const int fd = static_cast<int>(v);
            if (guards_.count(fd)) continue;
            sockaddr_storage local{}, peer{};
            socklen_t llen = sizeof local, plen = sizeof peer;
            if (::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &llen) != 0 || port_of(local) != port) continue;
            if (::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &plen) != 0) continue;   // the listener
            if (auto it = by_fd_.find(fd); it != by_fd_.end() && it->second->peer_len == plen &&
                                           std::memcmp(&it->second->peer, &peer, plen) == 0)
                continue;   // a connection being served
            found = fd;
            conn->peer = peer;
            conn->peer_len = plen;
            ++n_found;
        }
        ::closedir(dir);
        if (n_found != 1) return conn;   // not identified: served without deadlines
        conn->fd = found;
        conn->guard = ::fcntl(found, F_DUPFD_CLOEXEC, 0);
        if (conn->guard >= 0) {
            guards_.insert(conn->guard);
            by_fd_[found] = conn.get();
        }
        return conn;
    }

    void enqueue(std::function<void()> fn) {
        std::lock_guard<std::mutex> lk(m_);
        std::shared_ptr<Conn> conn = find_accepted();
        conns_.push_back(conn);
        jobs_.push_back({std::move(conn), std::move(fn)});
        if (idle_ < jobs_.size() && threads_.size() < lim_.max_threads) threads_.emplace_back([this] { worker(); });
        jobs_cv_.notify_one();
    }

    void worker() {
        std::unique_lock<std::mutex> lk(m_);
        for (;;) {
            ++idle_;
            jobs_cv_.wait(lk, [&] { return stopping_ || !jobs_.empty(); });
            --idle_;
            if (jobs_.empty()) return;   // stopping, nothing left
            Job job = std::move(jobs_.front());
            jobs_.pop_front();
            lk.unlock();
            current_ = job.conn.get();
            try {
                job.fn();   // httplib serves the connection and closes its descriptor
            } catch (...) {
            }
            current_ = nullptr;
            job.fn = nullptr;
            lk.lock();
            Conn* c = job.conn.get();
            if (auto it = by_fd_.find(c->fd); it != by_fd_.end() && it->second == c) by_fd_.erase(it);
            if (c->guard >= 0) {
                guards_.erase(c->guard);
                ::close(c->guard);
                c->guard = -1;
            }
            conns_.remove(job.conn);
        }
    }

    // httplib stopped listening: serve what was accepted, cut connections that only wait for a
    // next request, and join the threads.
    void shutdown_pool() {
        {
            std::lock_guard<std::mutex> lk(m_);
            if (stopping_ && threads_.empty()) return;
            stopping_ = true;
        }
        jobs_cv_.notify_all();
        dog_cv_.notify_all();
        for (auto& t : threads_) t.join();   // enqueue() is not called any more
        std::lock_guard<std::mutex> lk(m_);
        threads_.clear();
    }

    void watchdog() {
        std::unique_lock<std::mutex> lk(m_);
        while (!stop_dog_) {
            dog_cv_.wait_for(lk, std::chrono::milliseconds(50));
            const auto now = Clock::now();
            for (auto& c : conns_) {
                if (c->cut || c->guard < 0) continue;
                const auto age = now - c->since;
                bool late = false;
                std::atomic<uint64_t>* why = nullptr;
                switch (c->phase) {
                    // While stopping, a connection waiting for its next request is closed; the
                    // 100 ms let a response that was just finished be written first.
                    case Phase::headers:
                        if (age > lim_.header_timeout) {
                            late = true, why = &cuts_.header_timeout;
                        } else if (const int64_t read = lim_.max_header_bytes > 0 ? bytes_read(c->guard) : -1;
                                   read >= 0 && read - c->read_at > lim_.max_header_bytes) {
                            late = true, why = &cuts_.header_bytes;
                        } else {
                            late = stopping_ && age > std::chrono::milliseconds(100);
                        }
                        break;
                    case Phase::body: late = age > lim_.body_timeout, why = &cuts_.body_timeout; break;
                    case Phase::busy: break;
                }
                if (late) {
                    ::shutdown(c->guard, SHUT_RDWR);   // httplib's reads and writes fail; it closes
                    c->cut = true;
                    if (why) ++*why;
                }
            }
        }
    }

    Cuts cuts_;
    ConnectionLimits lim_;
    std::atomic<int> port_{0};
    std::mutex m_;
    std::condition_variable jobs_cv_, dog_cv_;
    std::deque<Job> jobs_;
    std::vector<std::thread> threads_;
    size_t idle_ = 0;
    bool stopping_ = false;
    bool stop_dog_ = false;
    bool warned_ = false;
    std::list<std::shared_ptr<Conn>> conns_;
    std::unordered_map<int, Conn*> by_fd_;     // httplib descriptor -> its connection
    std::unordered_set<int> guards_;           // our duplicates
    std::thread dog_;                          // last: started once the rest is built
    static inline thread_local Conn* current_ = nullptr;
};

}  // namespace megamoe
