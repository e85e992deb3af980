#!/usr/bin/env bash
# One device call (carry .device, made by scripts/device_pack.sh): a CSA layer's indexer queries on
# a third side stream (RunnerOptions::indexer_side) — its test, then the batch-1/2 step without and
# with it (megamoe-forward-bench --idx-side 0|1), in rounds — and the expert layer at T ≈ 512-2048
# on wgmma_256x32 against wgmma_2cta_256x32 (two CTAs per SM; the MXFP4 choice).
#   usage (on the GPU machine, repository root): bash scripts/device_idx_side.sh [layers]
# (8 layers fit an H100's 80 GB with the head; 20 an H200's.)
set -uo pipefail
source scripts/device_env.sh
layers=${1:-8}
nvidia-smi --query-gpu=name --format=csv,noheader
cd /tmp
timeout 150 megamoe_tests --gtest_filter='Golden/GpuRunner.IndexerSideStreamEqualsMainStream/*:Golden/GpuRunner.GraphReplayEqualsEager/*:CudaMoeLayer.L1L2MatchCpuTwin*' 2>&1 |
    grep -E "side stream 2|^\[  (PASSED|FAILED) |FAILED" | head -40
for run in exact:1 exact:2 official:1; do
    nm=${run%%:*}
    for side in 0 1; do
        printf '%s round %s idx-side %s: ' "$nm" "${run#*:}" "$side"
        timeout 45 megamoe-forward-bench --model flash --layers "$layers" --batches 1,2 --contexts 1024 --prefill 0 \
            --steps 20 --numerics "$nm" --idx-side "$side" 2>/dev/null | grep -E "^decode B=" | awk '{printf "%s %s us %s  ", $2, $4, $NF}'
        echo
    done
done
for c in wgmma_256x32 wgmma_2cta_256x32; do
    echo "== $c"
    timeout 80 megamoe-gemm-bench --part experts --model flash --format nvfp4,mxfp4 --T 512,1024,2048 --config "$c" --no-check \
        2>/dev/null | grep -E "^\| flash"
done
