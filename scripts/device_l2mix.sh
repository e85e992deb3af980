#!/usr/bin/env bash
# One device call (carry .device, made by scripts/device_pack.sh): the FFN's next hc_mix fused
# into the experts' L2 (RunnerOptions::l2_mix, cuda::HcPostMix) and a CSA layer's indexer queries
# on a third side stream (RunnerOptions::indexer_side): their tests, then the batch-1/2 step with
# both, without the first (--no-l2-mix) and without the second (--no-idx-side), in rounds.
#   usage (on the GPU machine, repository root): bash scripts/device_l2mix.sh [layers]
set -uo pipefail
source scripts/device_env.sh
layers=${1:-20}
nvidia-smi --query-gpu=name --format=csv,noheader
cd /tmp
timeout 240 megamoe_tests --gtest_filter='CudaMoeLayer.SmallPath*:Golden/GpuRunner.GoldenLogitsStatistics/*:Golden/GpuRunner.GraphReplayEqualsEager/*:Golden/GpuOfficialNumerics.*' 2>&1 |
    grep -E "fused L2 mix|^\[  (PASSED|FAILED) |tests ran|FAILED" | head -40
for run in exact:1 exact:2 official:1; do
    nm=${run%%:*}
    for flag in both --no-l2-mix --no-idx-side; do
        printf '%s round %s %s: ' "$nm" "${run#*:}" "$flag"
        f=$flag; [ "$f" = both ] && f=""
        timeout 60 megamoe-forward-bench --model flash --layers "$layers" --batches 1,2 --contexts 1024 --prefill 0 \
            --steps 20 --numerics "$nm" $f 2>/dev/null | grep -E "^decode B=" | awk '{printf "%s %s us %s  ", $2, $4, $NF}'
        echo
    done
done
