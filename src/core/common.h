// common.h — errors and checks shared by every part of megamoe.
//
// Bad input (a malformed checkpoint, config or request) is reported by throwing megamoe::Error
// with a message that names the file, tensor or field. The conventions we follow elsewhere
// (calm, ds4) abort on such errors; we throw instead because a server that is loading or serving
// must be able to report the problem and keep running, and because the malformed-input tests
// check the message without forking a death test. Internal invariants use MEGAMOE_CHECK, which
// throws the same type with file:line.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace megamoe {

struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Concatenate anything streamable into one string: str("tensor ", name, " has ", n, " dims").
template <typename... Args>
std::string str(const Args&... args) {
    std::ostringstream os;
    (os << ... << args);
    return os.str();
}

template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
    throw Error(str(args...));
}

}  // namespace megamoe

#define MEGAMOE_CHECK(cond, ...)                                                                \
    do {                                                                                        \
        if (!(cond))                                                                            \
            ::megamoe::fail(__FILE__, ":", __LINE__, ": check failed: " #cond " ", __VA_ARGS__); \
    } while (0)
