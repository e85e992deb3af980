// gemm_group.cuh — the per-expert weight descriptor the grouped kernels read from a device table
// (DeviceExperts::l1_table / l2_table): gemm.cu's tiled and wgmma kernels and moe_small.cu's
// small-T kernels. CUDA only.
#pragma once

#include <cstdint>

namespace megamoe::cuda::dev {

// One weight (or a SwiGLU pair: [0] gate = w1, [1] up = w3) as a kernel reads it: kernel-order
// weight rows, block scales, and the constants of kernel_scales (decode bias, output factor).
struct GemmGroup {
    const uint8_t* w[2];
    const uint8_t* s[2];
    float out_scale[2];
    int   bias[2];
};

}  // namespace megamoe::cuda::dev
