#!/usr/bin/env bash
# One device call (carry .device, made by scripts/device_pack.sh): the FFN's next hc_mix fused
# into the experts' L2 (RunnerOptions::l2_mix, cuda::HcPostMix) and a CSA layer's indexer queries
# on a third side stream (RunnerOptions::indexer_side): their tests, then the batch-1/2 step with
# neither, with the first (--l2-mix 1) and with the second (--idx-side 1), in rounds; and the
# expert layer at T = 1024 on wgmma_256x32 against wgmma_2cta_256x32 (two CTAs per SM).
#   usage (on the GPU machine, repository root): bash scripts/device_l2mix.sh [layers]
set -uo pipefail
source scripts/device_env.sh
layers=${1:-20}
nvidia-smi --query-gpu=name --format=csv,noheader
cd /tmp
timeout 200 megamoe_tests --gtest_filter='CudaMoeLayer.SmallPath*:CudaMoeLayer.L1L2MatchCpuTwin*:CudaGemm.LinearFp8MatchesCpuTwin:CudaGemm.LinearNvfp4MatchesCpuTwin:Golden/GpuRunner.FusedL2MixAndIndexerSideStream/*:Golden/GpuRunner.GoldenLogitsStatistics/*:Golden/GpuRunner.GraphReplayEqualsEager/*:Golden/GpuOfficialNumerics.*' 2>&1 |
    grep -E "fused L2 mix|worst logit cosine|^\[  (PASSED|FAILED) |tests ran|FAILED" | head -40
for run in exact:1 exact:2 official:1; do
    nm=${run%%:*}
    for flag in none l2-mix idx-side; do
        printf '%s round %s %s: ' "$nm" "${run#*:}" "$flag"
        f="--l2-mix 0 --idx-side 0"; [ "$flag" = l2-mix ] && f="--l2-mix 1 --idx-side 0"; [ "$flag" = idx-side ] && f="--l2-mix 0 --idx-side 1"
        timeout 45 megamoe-forward-bench --model flash --layers "$layers" --batches 1,2 --contexts 1024 --prefill 0 \
            --steps 20 --numerics "$nm" $f 2>/dev/null | grep -E "^decode B=" | awk '{printf "%s %s us %s  ", $2, $4, $NF}'
        echo
    done
done
for round in 1 2; do
    for c in wgmma_256x32 wgmma_2cta_256x32; do
        echo "== $c round $round"
        timeout 60 megamoe-gemm-bench --part experts --model flash --format nvfp4,mxfp4 --T 1024 --config "$c" --no-check \
            2>/dev/null | grep -E "^\| flash"
    done
done
