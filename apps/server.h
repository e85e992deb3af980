// server.h — `megamoe serve`: the OpenAI-compatible HTTP server.
#pragma once

#include <cstdint>
#include <string>

namespace megamoe {

struct ServeOptions {
    std::string model_dir;
    std::string tokenizer;                 // default: MODEL_DIR/tokenizer.json
    std::string served_model_name;         // default: the model directory's name
    std::string host = "127.0.0.1";
    int         port = 8000;
    int64_t     max_model_len = 0;         // 0: the model's max_position_embeddings
    int64_t     max_batch_tokens = 512;
    int64_t     max_seqs = 64;
    size_t      max_body_bytes = 4u << 20;  // larger bodies get 413
    uint64_t    seed = 0;
};

// Listens, loads the model in the background (/health answers 503 meanwhile), serves until
// killed. Throws Error when the port cannot be bound or the model fails to load.
int serve(const ServeOptions& opt);

}  // namespace megamoe
