#!/usr/bin/env bash
# One device call comparing builds of the small-T expert path and the batch-1/2 step: the expert
# layer alone (megamoe-gemm-bench --moe-small, T = 1, 2; the general path at T = 64) and the 8-layer
# step (megamoe-forward-bench), each variant in turn, in rounds, optionally after a test filter.
#   packing (here): bash scripts/device_pack.sh build tiny-flash-nvfp4, then
#   bash scripts/device_repack.sh NAME=DIR ... (each other build's two benches as *-NAME; deleting
#   .device/golden.tar.xz leaves room for more builds where the tests named need no golden case)
#   usage (on the GPU machine, repository root):
#     bash scripts/device_variants.sh "old dec new" [layers] [gtest filter] ["old new": the steps' variants]
#     ("new": the packed build; the steps run the first list unless the fourth argument names fewer)
set -uo pipefail
source scripts/device_env.sh
read -r -a variants <<< "${1:-old new}"
layers=${2:-8}
filter=${3:-}
read -r -a step_variants <<< "${4:-${1:-old new}}"
nvidia-smi --query-gpu=name --format=csv,noheader
cd /tmp
if [ -n "$filter" ]; then
    timeout 240 megamoe_tests --gtest_filter="$filter" 2>&1 | grep -E "^\[  (PASSED|FAILED) |FAILED|Failure|tests ran" | head -30
fi
bin() { [ "$2" = new ] && echo "$1" || echo "$1-$2"; }
for r in 1 2; do
    for v in "${variants[@]}"; do
        printf 'experts round %s %s: ' "$r" "$v"
        timeout 60 "$(bin megamoe-gemm-bench "$v")" --part experts --model flash --format nvfp4,mxfp4 --T 1,2 --moe-small \
            --no-check 2>/dev/null | grep -E "^\| flash" | awk -F'|' '{printf "%s T=%s %s us (%s)  ", $3, $4, $6, $10}'
        echo
    done
done
for v in "${variants[@]}"; do
    printf 'experts T=64 %s: ' "$v"
    timeout 60 "$(bin megamoe-gemm-bench "$v")" --part experts --model flash --format nvfp4,mxfp4 --T 64 --no-check 2>/dev/null |
        grep -E "^\| flash" | awk -F'|' '{printf "%s T=%s %s us (%s)  ", $3, $4, $6, $10}'
    echo
done
# Where the small path beats the general one (the runner's threshold): the packed build, T = 1-8.
for small in --moe-small ""; do
    printf 'experts %s: ' "${small:-general}"
    timeout 90 megamoe-gemm-bench --part experts --model flash --format nvfp4,mxfp4 --T 1,2,4,8 $small --no-check \
        2>/dev/null | grep -E "^\| flash" | awk -F'|' '{printf "%s T=%s %s us  ", $3, $4, $6}'
    echo
done
for run in nvfp4:exact:1 nvfp4:exact:2 mxfp4:exact:1 nvfp4:official:1; do
    IFS=: read -r f nm r <<< "$run"
    for v in "${step_variants[@]}"; do
        printf '%s %s round %s %s: ' "$f" "$nm" "$r" "$v"
        timeout 45 "$(bin megamoe-forward-bench "$v")" --model flash --layers "$layers" --batches 1,2 --contexts 1024 \
            --prefill 0 --steps 20 --experts "$f" --numerics "$nm" 2>/dev/null | grep -E "^decode B=" |
            awk '{printf "%s %s us %s  ", $2, $4, $NF}'
        echo
    done
done
