// server.h — `megamoe serve`: the OpenAI-compatible HTTP server.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace megamoe {

struct ServeOptions {
    std::string model_dir;
    std::string tokenizer;                 // default: MODEL_DIR/tokenizer.json
    std::string served_model_name;         // default: the model directory's name
    std::string host = "127.0.0.1";
    int         port = 8000;               // 1..65535; 0: any free port (printed)
    int64_t     max_model_len = 0;         // 0: the model's max_position_embeddings
    int64_t     max_batch_tokens = 512;
    int64_t     max_seqs = 64;
    int64_t     max_body_bytes = 4 << 20;  // larger bodies get 413, chunked ones too
    uint64_t    seed = 0;
    double      header_timeout = 10;       // s to send a request's headers (from connecting or the last response)
    double      body_timeout = 60;         // s to send a request's body (from the end of its headers)
    double      drain_timeout = 30;        // s running requests may take to finish after SIGTERM / SIGINT
    int64_t     max_connections = 1024;    // connections served at once (one thread each); more wait
    int64_t     max_header_bytes = 256 << 10;   // request line + headers; more: the connection is closed
    // Limits per request (over one: 400 or 413 naming the flag) and in total (429).
    int64_t     max_prompt_tokens = 0;     // 0: the context length
    int64_t     max_completion_tokens = 0; // per choice; 0: the context length
    int64_t     max_requests = 256;        // engine requests (one per choice) running or waiting, in all
    int64_t     max_json_depth = 128;      // nesting of arrays and objects in a body (at most 128)
    // Who may use the server: with keys, every request but GET /health (and GET /metrics unless
    // private_metrics) needs "Authorization: Bearer KEY" with one of them, else 401.
    std::vector<std::string> api_keys;     // --api-key (repeatable)
    std::string api_key_file;              // --api-key-file: one key per line
    bool        private_metrics = false;   // --private-metrics: /metrics needs a key too
    std::string backend = "auto";          // cpu | cuda | auto (cuda when a GPU is usable)
    // Benchmarks: instead of --model, random weights made on the GPU for a preset's config
    // (flash | pro, `synthetic_layers` of its layers; --tokenizer required). No checkpoint is read.
    std::string synthetic;
    int64_t     synthetic_layers = -1;
    double      gpu_memory_fraction = 0.92;
    std::string numerics = "auto";         // auto | exact | official (serve/backends.h resolve_numerics)
    bool        cublaslt = true;           // --no-cublaslt: megamoe's own kernels for every linear (BackendOptions)
    // Sequence state: at most this many positions in the pool (0: as many as memory holds; the
    // CPU backend: no limit). Past it, requests wait and running ones are preempted.
    int64_t     max_state_tokens = 0;
    bool        prefix_caching = true;     // --no-prefix-caching turns it off
    // Speculative decoding with the checkpoint's MTP block (EngineOptions::speculative_tokens):
    // 0 off, 1 draft per step and sequence (the cuda backend).
    int64_t     speculative_tokens = 0;
    // Several GPUs (BackendOptions::gpus): routed experts split over devices 0 .. gpus-1, attention
    // data-parallel; max_seqs is then shared out over them.
    int64_t     gpus = 1;
    std::string partition = "contiguous";  // contiguous | balanced
    std::string ep_exchange = "gather";    // gather | all-to-all
};

// Throws Error naming the flag (--port, --max-seqs, ...) for a value out of range. serve()
// calls it first, before anything is loaded.
void validate(const ServeOptions& opt);

// Blocks SIGTERM and SIGINT in the calling thread and so in every thread it starts later; serve()
// waits for them on a thread of its own. Call it before starting any thread (main() does).
void block_shutdown_signals();

// Validates the options, checks that the checkpoint's config.json and the tokenizer exist,
// listens, then loads the tokenizer, the config and the weights in the background (/health
// answers 503 meanwhile). On SIGTERM or SIGINT it refuses new requests (503), lets running ones
// finish for up to drain_timeout (then cancels them: streams end with an error event and
// [DONE]), and returns 0; a second signal stops at once. Throws Error when the options are
// invalid, the port cannot be bound or the model fails to load.
int serve(const ServeOptions& opt);

}  // namespace megamoe
