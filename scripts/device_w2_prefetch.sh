#!/usr/bin/env bash
# One device call (carry .device, made by scripts/device_pack.sh): the small-T expert path's use of
# the L2 cache (cuda::MoeSmallOptions: w2 prefetched by L1's producer, evict-first weight copies) —
# the tests that hold its results, then the expert layer alone (megamoe-gemm-bench --moe-small) and
# the batch-1/2 step (megamoe-forward-bench) without and with each option, in rounds.
#   usage (on the GPU machine, repository root): bash scripts/device_w2_prefetch.sh [layers] [tests 0|1]
# (8 layers fit an H100's 80 GB with the head; 20 an H200's.)
set -uo pipefail
source scripts/device_env.sh
layers=${1:-8}
tests=${2:-1}
nvidia-smi --query-gpu=name --format=csv,noheader
cd /tmp
if [ "$tests" = 1 ]; then
    timeout 200 megamoe_tests --gtest_filter='CudaMoeLayer.SmallPath*:Golden/GpuRunner.IndexerSideStreamEqualsMainStream/*' 2>&1 |
        grep -E "^\[  (PASSED|FAILED) |FAILED|Failure|differs" | head -40
fi
for f in nvfp4 mxfp4; do
    for o in 0:0 1:0 0:1 1:1 2:1; do
        printf '%s w2-prefetch %s evict-first %s: ' "$f" "${o%%:*}" "${o#*:}"
        timeout 60 megamoe-gemm-bench --part experts --model flash --format "$f" --T 1,2 --moe-small --no-check \
            --w2-prefetch "${o%%:*}" --evict-first "${o#*:}" 2>/dev/null | grep -E "^\| flash" | awk -F'|' '{printf "T=%s %s us  ", $4, $5}'
        echo
    done
done
for run in nvfp4:exact:1 nvfp4:exact:2 mxfp4:exact:1 nvfp4:official:1; do
    IFS=: read -r f nm r <<< "$run"
    for o in 0:0 1:1 2:1 1:0; do
        printf '%s %s round %s w2-prefetch %s evict-first %s: ' "$f" "$nm" "$r" "${o%%:*}" "${o#*:}"
        timeout 45 megamoe-forward-bench --model flash --layers "$layers" --batches 1,2 --contexts 1024 --prefill 0 \
            --steps 20 --experts "$f" --numerics "$nm" --w2-prefetch "${o%%:*}" --evict-first "${o#*:}" 2>/dev/null |
            grep -E "^decode B=" | awk '{printf "%s %s us %s  ", $2, $4, $NF}'
        echo
    done
done
# Where the time goes (CUPTI timeline of one graph-replayed B = 1 step): the two small-path kernels'
# rows of the per-kernel table ("adds" = how far each moves the end of the busy frontier).
for o in 0:0 1:1; do
    echo "== trace, w2-prefetch ${o%%:*} evict-first ${o#*:}"
    timeout 60 megamoe-forward-bench --model flash --layers "$layers" --batches 1 --contexts 1024 --prefill 0 \
        --steps 10 --w2-prefetch "${o%%:*}" --evict-first "${o#*:}" --trace 0 2>/dev/null |
        grep -E "trace:|moe_small|linear_small_m|linear_regs|kernel  " | head -12
done
