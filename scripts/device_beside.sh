#!/usr/bin/env bash
# One device call: the small-T expert path with L2 resident beside L1 (MoeLayerWorkspace::
# small_l2_beside, RunnerOptions::moe_l2_beside) against the plan without it, in the same binary,
# alternated: its tests, the expert layer alone at T = 1-8 (V4-Flash, both formats), and the
# 8-layer V4-Flash decode step at batch 1-2 (exact and official numerics). Logs to $OUT.
#   usage (GPU machine, repository root, carry .device): bash scripts/device_beside.sh [tests] [layer] [step]
set -uo pipefail
source scripts/device_env.sh
out=${OUT:-/tmp/megamoe-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
cd /tmp || exit 1
for stage in "$@"; do
    case "$stage" in
        tests)
            timeout 300 megamoe_tests --gtest_filter='CudaMoeLayer.SmallPath*:CudaMoeLayer.PersistentTiles*:CudaMoeLayer.W4a8TilesGiveTheSameBits*' \
                > "$out/tests.log" 2>&1
            echo "tests rc=$?"
            grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]|Failure|beside, official" "$out/tests.log" | head -30
            ;;
        layer)
            for r in 1 2; do
                for b in 0 1; do
                    timeout 60 megamoe-gemm-bench --part experts --model flash --format nvfp4,mxfp4 --T 1,2,4,8 --moe-small \
                        --no-check --l2-beside "$b" > "$out/layer-b$b-r$r.log" 2>&1
                    printf 'layer beside=%s round %s rc=%s: ' "$b" "$r" "$?"
                    grep -E "^\| flash" "$out/layer-b$b-r$r.log" | awk -F'|' '{printf "%s T=%s %s us (%s) | ", $3, $4, $6, $10}'
                    echo
                done
            done
            ;;
        step)
            for r in 1 2; do
                for nm in exact official; do
                    for b in 0 1; do
                        timeout 100 megamoe-forward-bench --model flash --layers 8 --batches 1,2 --contexts 1024 --prefill 0 \
                            --steps 20 --numerics "$nm" --l2-beside "$b" > "$out/step-$nm-b$b-r$r.log" 2>&1
                        printf 'step %s beside=%s round %s rc=%s: ' "$nm" "$b" "$r" "$?"
                        grep -E "^decode B=" "$out/step-$nm-b$b-r$r.log" | awk '{printf "%s %s us (%s)  ", $2, $4, $NF}'
                        echo
                    done
                done
            done
            ;;
    esac
done
