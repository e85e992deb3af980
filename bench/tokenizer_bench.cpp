// tokenizer_bench.cpp — single-thread encode/decode throughput of megamoe::Tokenizer.
//
// Usage: tokenizer_bench TOKENIZER_JSON [TEXT_FILE] [RUNS]
// Without TEXT_FILE it builds ~4 MB of deterministic mixed text: English prose, source code,
// JSON, numbers, CJK/Japanese/Korean, Cyrillic/Arabic/Thai, emoji, and some random identifiers
// (so not every piece is a BPE-cache hit). It checks decode(encode(text)) == text first, then
// times encode() RUNS times (default 5) on one thread; the first run starts with a cold BPE
// cache and is reported separately. Prints MB/s and tokens/s.
#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/common.h"
#include "serve/tokenizer.h"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

const char* const kWords[] = {
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he",
    "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they", "you", "were", "their",
    "one", "all", "we", "can", "her", "has", "there", "been", "if", "more", "when", "will", "would", "who", "so",
    "model", "token", "attention", "expert", "layer", "weights", "inference", "compression", "sequence", "memory",
    "throughput", "latency", "kernel", "tensor", "router", "gradient", "quantization", "benchmark", "language",
    "DeepSeek", "Transformer", "GPU", "CUDA", "Hello", "World", "however", "therefore", "don't", "it's", "we'll",
    "information", "international", "understanding", "responsibility", "extraordinary", "implementation"};

const char* const kSnippets[] = {
    "def forward(self, x: torch.Tensor) -> torch.Tensor:\n    h = self.norm(x)\n    return x + self.mlp(h)\n",
    "for (int i = 0; i < n; ++i) {\n    sum += a[i] * b[i];  // dot product\n}\n",
    "{\"model\": \"deepseek-v4\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi!\"}], \"max_tokens\": 256}\n",
    "#include <vector>\nstd::vector<int32_t> ids = tok.encode(text);\nif (ids.empty()) return -1;\n",
    "SELECT id, name FROM users WHERE created_at >= '2026-01-01' ORDER BY id DESC LIMIT 100;\n",
    "深度求索（DeepSeek）发布了新一代混合专家模型，支持百万级上下文窗口。",
    "我们在多个基准测试上评估了模型的推理能力和代码生成能力，结果显示显著提升。",
    "日本語のテキストも正しく処理できます。カタカナとひらがなの混在。",
    "한국어 문장도 토큰화할 수 있습니다.",
    "Привет, мир! Это тестовое предложение на русском языке.",
    "مرحبا بالعالم، هذا نص تجريبي.",
    "สวัสดีครับ ยินดีต้อนรับ",
    "Emoji: 👋🏽 🚀🔥 👨‍👩‍👧‍👦 ✅ — “quotes” ‘single’ «guillemets» …",
    "Price: $1,234.56 (€1.099,00) on 2026-11-21T22:53:30Z; pi ≈ 3.14159265358979; e = 2.718281828",
    "<｜User｜>What is 2+2?<｜Assistant｜><think>Simple arithmetic.</think>4<｜end▁of▁sentence｜>",
    "    \n\n\t\tindented\r\n",
};

// ~target bytes of mixed text from a fixed seed.
std::string build_text(size_t target) {
    std::mt19937_64 rng(20261121);
    auto pick = [&](size_t n) { return static_cast<size_t>(rng() % n); };
    const size_t n_words = sizeof(kWords) / sizeof(kWords[0]);
    const size_t n_snippets = sizeof(kSnippets) / sizeof(kSnippets[0]);
    std::string text;
    text.reserve(target + 4096);
    while (text.size() < target) {
        const size_t kind = pick(10);
        if (kind < 6) {  // an English sentence
            const size_t len = 6 + pick(18);
            for (size_t w = 0; w < len; ++w) {
                std::string word = kWords[pick(n_words)];
                if (w == 0) word[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(word[0])));
                if (pick(25) == 0) {  // a random identifier, usually a BPE-cache miss
                    word.clear();
                    const size_t wl = 3 + pick(10);
                    for (size_t c = 0; c < wl; ++c) word += static_cast<char>('a' + pick(26));
                    if (pick(2)) word += "_" + std::to_string(pick(100000));
                }
                text += word;
                if (w + 1 < len) text += pick(12) == 0 ? ", " : " ";
            }
            text += pick(4) == 0 ? ".\n" : ". ";
        } else {
            text += kSnippets[pick(n_snippets)];
            if (pick(3) == 0) text += ' ';
        }
    }
    return text;
}

std::string read_file(const char* path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) megamoe::fail("cannot open ", path);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s TOKENIZER_JSON [TEXT_FILE] [RUNS]\n", argv[0]);
        return 2;
    }
    try {
        auto t0 = Clock::now();
        const megamoe::Tokenizer tok = megamoe::Tokenizer::load(argv[1]);
        std::printf("loaded %s: vocab_size %d in %.1f ms\n", argv[1], tok.vocab_size(), 1e3 * seconds_since(t0));

        const std::string text = argc >= 3 && std::string(argv[2]) != "-" ? read_file(argv[2]) : build_text(4u << 20);
        const int runs = argc >= 4 ? std::max(1, std::atoi(argv[3])) : 5;
        const double mb = static_cast<double>(text.size()) / 1e6;

        // Cold run: empty BPE cache.
        t0 = Clock::now();
        const std::vector<int32_t> ids = tok.encode(text);
        const double cold = seconds_since(t0);
        if (tok.decode(ids) != text) {
            std::fprintf(stderr, "round trip failed: decode(encode(text)) != text\n");
            return 1;
        }
        std::printf("text: %.2f MB, %zu tokens (%.2f bytes/token); round trip ok\n", mb, ids.size(),
                    static_cast<double>(text.size()) / static_cast<double>(ids.size()));
        std::printf("encode (cold cache): %7.1f MB/s  %6.2f M tokens/s\n", mb / cold,
                    static_cast<double>(ids.size()) / cold / 1e6);

        std::vector<double> times;
        for (int r = 0; r < runs; ++r) {
            t0 = Clock::now();
            const std::vector<int32_t> again = tok.encode(text);
            times.push_back(seconds_since(t0));
            if (again != ids) {
                std::fprintf(stderr, "encode is not deterministic\n");
                return 1;
            }
        }
        std::sort(times.begin(), times.end());
        const double best = times.front(), median = times[times.size() / 2];
        std::printf("encode (warm, %d runs): best %7.1f MB/s  median %7.1f MB/s  %6.2f M tokens/s\n", runs, mb / best,
                    mb / median, static_cast<double>(ids.size()) / median / 1e6);

        t0 = Clock::now();
        const std::vector<int32_t> ord = tok.encode_ordinary(text);
        const double t_ord = seconds_since(t0);
        std::printf("encode_ordinary:     %7.1f MB/s\n", mb / t_ord);

        t0 = Clock::now();
        const std::string back = tok.decode(ids);
        const double t_dec = seconds_since(t0);
        std::printf("decode:              %7.1f MB/s  %6.2f M tokens/s\n", mb / t_dec,
                    static_cast<double>(ids.size()) / t_dec / 1e6);
        return back == text && !ord.empty() ? 0 : 1;
    } catch (const megamoe::Error& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
