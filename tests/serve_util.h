// serve_util.h — child processes for the tests that drive `megamoe serve` and the clients as
// programs (tests/apps/*_test.cpp, tests/gpu/serve_test.cpp): start one with its output in a log,
// find the port a server bound (they start with --port 0), wait for /health, wait for an exit,
// stop one. One copy of what each of those tests had written out for itself.
#pragma once

#include <fcntl.h>
#include <httplib.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "test_util.h"

extern char** environ;

namespace megamoe::test {

// Starts args[0] with args (the environment inherited) and its stdout and stderr into `log`
// (truncated first); -1 if it cannot be started.
inline pid_t spawn_logged(std::vector<std::string> args, const std::string& log) {
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    pid_t pid = -1;
    if (posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), environ) != 0) pid = -1;
    posix_spawn_file_actions_destroy(&fa);
    return pid;
}

// True once GET /health on 127.0.0.1:port answers 200, polling every 100 ms for up to timeout_s.
inline bool wait_healthy(int port, double timeout_s = 60) {
    if (port <= 0) return false;
    httplib::Client c("127.0.0.1", port);
    for (int i = 0; i < static_cast<int>(timeout_s * 10); ++i) {
        auto r = c.Get("/health");
        if (r && r->status == 200) return true;
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return false;
}

// The exit status of pid (128 + the signal if one ended it), waiting up to timeout_s; past that the
// process is killed and the result is nullopt.
inline std::optional<int> wait_exit(pid_t pid, double timeout_s) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
    for (;;) {
        int st = 0;
        const pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        if (r < 0) return std::nullopt;   // not our child (or already reaped)
        if (std::chrono::steady_clock::now() > end) {
            kill(pid, SIGKILL);
            waitpid(pid, nullptr, 0);
            return std::nullopt;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
}

// SIGTERM, then up to grace_s for the process to exit, then SIGKILL. Sets pid to -1.
inline void stop_process(pid_t& pid, double grace_s = 30) {
    if (pid <= 0) return;
    kill(pid, SIGTERM);
    (void)wait_exit(pid, grace_s);
    pid = -1;
}

}  // namespace megamoe::test
