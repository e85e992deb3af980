// numerics.h — how activations are rounded, a run setting shared by the CPU forward (ref) and the
// GPU kernels (cuda), which take it as a plain enum.
#pragma once

#include <cstdint>

namespace megamoe {

// exact = f32 on the weights the checkpoint encodes (the CPU specification, matched by the
// goldens); official = what DeepSeek's inference code computes (bf16 activations, FP8 GEMM inputs,
// FP8 KV latent, Hadamard + FP4 indexer q/k; deepseek-v4.md §2.3-2.5).
enum class Numerics : uint8_t { exact, official };

}  // namespace megamoe
