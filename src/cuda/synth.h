// synth.h — random weights made on the GPU, in the device layout of real uploads: for benchmarks
// of models too large for a checkpoint on disk (V4-Flash at full width is ~160 GB). Values are
// random but finite and of realistic magnitude per format (fp8 codes never the NaN code; scales
// chosen so |w| is about 0.01-0.05), so kernels take their usual paths. Host API; plain C++.
#pragma once

#include <cstdint>

#include "cuda/buffer.h"
#include "cuda/linear.h"

struct CUstream_st;

namespace megamoe::cuda {

// How synth_fill fills a buffer of `bytes`.
enum class SynthFill : uint8_t {
    bf16_small,      // bf16 values uniform in [-0.05, 0.05]
    bf16_one,        // bf16 1.0 (norm weights)
    f32_small,       // f32 uniform in [-0.01, 0.01]
    f32_zero,        // f32 0 (sinks, position biases, router biases)
    i32_below,       // int32 uniform in [0, bound) (tid2eid)
};
void synth_fill(void* p, int64_t bytes, SynthFill how, uint64_t seed, int64_t bound, CUstream_st* stream);

// A projection of format f and shape [out, in], carved from `arena` exactly as upload_linear
// carves a real one (weight rows padded to device_row_bytes, then the scale rows + 16 bytes), and
// filled with random codes and scales on `stream`. A counting arena: layout only, no CUDA call.
DeviceLinear synth_linear(LinearFormat f, int64_t out, int64_t in, DeviceArena& arena, uint64_t seed,
                          CUstream_st* stream);

}  // namespace megamoe::cuda
