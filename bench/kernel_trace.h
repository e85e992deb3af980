// kernel_trace.h — the GPU timeline of a few steps, from CUPTI's kernel activity records (start
// and end of every kernel, graph-launched ones included, without serializing them; copies and
// memsets as "[memcpy ...]" / "[memset ...]" entries): what a
// decode step's graph spends in each kernel and how long the GPU waits between kernels. A
// benchmark tool, not part of the engine (Nsight Systems gives the same where it is installed;
// the GPU machines here have only Nsight Compute, which times kernels one at a time).
//
//   bench::KernelTrace tr;  tr.start();  ...steps...;  tr.stop();  tr.print(stdout, first_kernel);
#pragma once

#include <cupti.h>
#include <cxxabi.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "core/common.h"

namespace megamoe::bench {

class KernelTrace {
public:
    struct Kernel {
        std::string name;
        uint64_t start = 0, end = 0;   // ns, GPU timestamps
        uint32_t stream = 0;
    };

    void start() {
        records().clear();
        check(cuptiActivityRegisterCallbacks(&KernelTrace::request, &KernelTrace::complete), "register callbacks");
        check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL), "enable kernel records");
        check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY), "enable memcpy records");
        check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET), "enable memset records");
    }
    // Flushes every record and stops recording; returns the kernels sorted by start.
    const std::vector<Kernel>& stop() {
        check(cuptiActivityFlushAll(1), "flush");
        check(cuptiActivityDisable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL), "disable kernel records");
        check(cuptiActivityDisable(CUPTI_ACTIVITY_KIND_MEMCPY), "disable memcpy records");
        check(cuptiActivityDisable(CUPTI_ACTIVITY_KIND_MEMSET), "disable memset records");
        auto& r = records();
        std::sort(r.begin(), r.end(), [](const Kernel& a, const Kernel& b) { return a.start < b.start; });
        return r;
    }

    // The kernels of the last step: from the last kernel whose name contains `first` (the step's
    // first kernel; with the uploads and memsets right before it, its inputs) to the end. Prints
    // the step's span, the sum of kernel times, the time no kernel runs, a table by kernel name,
    // and the first `timeline` kernels one per line.
    static void print(std::FILE* f, const std::vector<Kernel>& all, const std::string& first, size_t timeline) {
        size_t b = 0;
        for (size_t i = 0; i < all.size(); ++i)
            if (all[i].name.find(first) != std::string::npos) b = i;
        auto input = [](const std::string& n) { return n.rfind("[memcpy HtoD", 0) == 0 || n.rfind("[memset", 0) == 0; };
        while (b > 0 && input(all[b - 1].name)) --b;   // the step's input uploads (the step before ends with its DtoH)
        const std::vector<Kernel> k(all.begin() + static_cast<std::ptrdiff_t>(b), all.end());
        if (k.empty()) return;
        uint64_t span_end = 0, busy = 0, cover = k.front().start;
        double sum = 0;
        for (const Kernel& x : k) {
            sum += static_cast<double>(x.end - x.start);
            if (x.end > cover) {   // union of the kernel intervals, in start order
                busy += x.end - std::max(cover, x.start);
                cover = x.end;
            }
            span_end = std::max(span_end, x.end);
        }
        const double span = static_cast<double>(span_end - k.front().start);
        std::fprintf(f, "    trace: %zu kernels, span %.1f us, kernel time %.1f us (sum), GPU busy %.1f us, idle %.1f us\n",
                     k.size(), span / 1e3, sum / 1e3, static_cast<double>(busy) / 1e3,
                     (span - static_cast<double>(busy)) / 1e3);
        // A kernel's "adds": how far its end moves the latest end seen so far (kernels in start
        // order). With programmatic dependent launch a kernel starts while its predecessor runs
        // and waits inside, so durations overlap; the adds sum to the busy time and say what each
        // kernel costs the step.
        std::vector<double> adds(k.size());
        {
            uint64_t front = k.front().start;
            for (size_t i = 0; i < k.size(); ++i) {
                adds[i] = k[i].end > front ? static_cast<double>(k[i].end - std::max(front, k[i].start)) : 0.0;
                front = std::max(front, k[i].end);
            }
        }
        struct Agg {
            int n = 0;
            double dur = 0, add = 0;
        };
        std::map<std::string, Agg> by;
        for (size_t i = 0; i < k.size(); ++i) {
            Agg& e = by[short_name(k[i].name)];
            ++e.n;
            e.dur += static_cast<double>(k[i].end - k[i].start);
            e.add += adds[i];
        }
        std::vector<std::pair<std::string, Agg>> v(by.begin(), by.end());
        std::sort(v.begin(), v.end(), [](const auto& a, const auto& c) { return a.second.add > c.second.add; });
        std::fprintf(f, "    %-44s %6s %10s %10s %8s %6s\n", "kernel", "count", "dur us", "adds us", "adds/n", "share");
        for (const auto& [n, e] : v)
            std::fprintf(f, "    %-44s %6d %10.1f %10.1f %8.2f %5.1f%%\n", n.c_str(), e.n, e.dur / 1e3, e.add / 1e3,
                         e.add / 1e3 / e.n, 100.0 * e.add / static_cast<double>(busy));
        std::fprintf(f, "    %8s %8s %8s %6s  %s\n", "start us", "dur us", "adds us", "stream", "kernel");
        for (size_t i = 0; i < std::min(timeline, k.size()); ++i) {
            const Kernel& x = k[i];
            std::fprintf(f, "    %8.1f %8.2f %8.2f %6u  %s\n", static_cast<double>(x.start - k.front().start) / 1e3,
                         static_cast<double>(x.end - x.start) / 1e3, adds[i] / 1e3, x.stream,
                         short_name(x.name).c_str());
        }
    }

private:
    static std::vector<Kernel>& records() {
        static std::vector<Kernel> r;
        return r;
    }
    static void check(CUptiResult r, const char* what) {
        if (r != CUPTI_SUCCESS) {
            const char* s = nullptr;
            cuptiGetResultString(r, &s);
            fail("CUPTI ", what, ": ", s ? s : "error");
        }
    }
    // "void (anonymous namespace)::tiled_kernel<(LinearFormat)3, 4, ...>(Params)" -> "tiled_kernel<...>".
    static std::string short_name(const std::string& mangled) {
        if (!mangled.empty() && mangled[0] == '[') return mangled;   // a copy or memset
        int st = 0;
        char* d = abi::__cxa_demangle(mangled.c_str(), nullptr, nullptr, &st);
        std::string s = st == 0 && d ? d : mangled;
        std::free(d);
        for (const std::string drop : {"(anonymous namespace)::", "megamoe::", "cuda::"})
            for (size_t at; (at = s.find(drop)) != std::string::npos;) s.erase(at, drop.size());
        if (s.rfind("void ", 0) == 0) s = s.substr(5);
        const size_t paren = s.find('(');   // the parameter list
        if (paren != std::string::npos && paren > 0) s = s.substr(0, paren);
        return s.size() > 44 ? s.substr(0, 44) : s;
    }
    static void CUPTIAPI request(uint8_t** buffer, size_t* size, size_t* max_records) {
        *size = 8u << 20;
        *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, *size));
        *max_records = 0;
    }
    static void CUPTIAPI complete(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
        CUpti_Activity* rec = nullptr;
        while (cuptiActivityGetNextRecord(buffer, valid, &rec) == CUPTI_SUCCESS) {
            if (rec->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) {
                const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(rec);
                records().push_back({k->name ? k->name : "?", k->start, k->end, k->streamId});
            } else if (rec->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {   // copies and memsets count as busy time
                const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(rec);
                const char* dir = m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_HTOD   ? "HtoD"
                                  : m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_DTOH ? "DtoH"
                                  : m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_DTOD ? "DtoD"
                                                                                   : "other";
                records().push_back({std::string("[memcpy ") + dir + " " + std::to_string(m->bytes / 1024) + " KB]",
                                     m->start, m->end, m->streamId});
            } else if (rec->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
                const auto* m = reinterpret_cast<const CUpti_ActivityMemset4*>(rec);
                records().push_back({"[memset " + std::to_string(m->bytes / 1024) + " KB]", m->start, m->end, m->streamId});
            }
        }
        std::free(buffer);
    }
};

}  // namespace megamoe::bench
