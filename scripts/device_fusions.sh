#!/usr/bin/env bash
# On the GPU machine, after `source scripts/device_env.sh` (binaries on PATH): the three decode
# fusions that are off by default (RunnerOptions::hc_one_launch, attn_fused_q, linear_norm_tail;
# docs/bench-forward.md, "three launches folded into their neighbours"): first their tests (each
# checks the fused launch against the launches it replaces, bit for bit), then the forward bench
# without and with each flag and with all three, ROUNDS rounds in this one call, so that every
# ratio is taken on one machine. Prints the bench's decode rows only.
#   bash scripts/device_fusions.sh [LAYERS=8] [ROUNDS=1] [NUMERICS="exact official"]
# Ten bench runs per round (two numerics, five flag sets), each making its synthetic weights first:
# keep a call under the device's 10-minute limit (8 layers, one round: written for that, not yet
# timed).
set -uo pipefail
layers=${1:-8}
rounds=${2:-1}
numerics=${3:-"exact official"}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 900 megamoe_tests --gtest_brief=1 \
    --gtest_filter='CudaHyperConn.*:SparseAttention.FusedQuery*:CudaLinear.NormTail*:Golden/GpuRunner.HcSite*:Golden/GpuRunner.AttentionFusedQuery*:Golden/GpuRunner.NormTail*:Golden/GpuRunner.GraphReplayEqualsEager*:Golden/GpuRunner.GoldenLogitsStatistics*' \
    2>&1 | tail -15
for round in $(seq 1 "$rounds"); do
    for nm in $numerics; do
        for flags in "" "--hc-one-launch" "--attn-fused-q" "--norm-tail" "--hc-one-launch --attn-fused-q --norm-tail"; do
            echo "## round $round, --numerics $nm ${flags:-(no flag)}"
            # shellcheck disable=SC2086
            timeout 300 megamoe-forward-bench --model flash --layers "$layers" --batches 1,2 --contexts 1024 \
                --prefill 0 --steps 20 --numerics "$nm" $flags 2>&1 | grep -E '^decode|megamoe-forward-bench:'
        done
    done
done
