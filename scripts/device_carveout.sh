#!/usr/bin/env bash
# wip/beside-carveout: the -wip benches (packed beside main's binaries) with L2 beside L1 (its
# carve-out at the maximum) and with every kernel's preferred carve-out at the maximum (--carveout
# 100), against the defaults, alternated; then a timeline of each at batch 1.
#   usage: bash scripts/device_carveout.sh [rounds] [trace]
set -uo pipefail
source scripts/device_env.sh
out=${OUT:-/tmp/megamoe-out}
mkdir -p "$out"
rounds=${1:-2}
cd /tmp || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
for r in $(seq 1 "$rounds"); do
    for b in 0 1; do
        timeout 60 megamoe-gemm-bench-wip --part experts --model flash --format nvfp4,mxfp4 --T 1,2,4,8 --moe-small \
            --no-check --l2-beside "$b" > "$out/layer-b$b-r$r.log" 2>&1
        printf 'layer beside=%s round %s rc=%s: ' "$b" "$r" "$?"
        grep -E "^\| flash" "$out/layer-b$b-r$r.log" | awk -F'|' '{printf "%s T=%s %s us | ", $3, $4, $6}'
        echo
    done
done
for r in $(seq 1 "$rounds"); do
    for v in "" "--l2-beside 1" "--carveout 100" "--carveout 100 --l2-beside 1"; do
        tag=$(echo "x$v" | tr -d ' -')
        # shellcheck disable=SC2086
        timeout 100 megamoe-forward-bench-wip --model flash --layers 8 --batches 1,2 --contexts 1024 --prefill 0 \
            --steps 20 $v > "$out/step-$tag-r$r.log" 2>&1
        printf 'step [%s] round %s rc=%s: ' "$v" "$r" "$?"
        grep -E "^decode B=" "$out/step-$tag-r$r.log" | awk '{printf "%s %s us (%s)  ", $2, $4, $NF}'
        echo
    done
done
[ "${2:-}" = trace ] || exit 0
for v in "" "--carveout 100"; do
    tag=$(echo "x$v" | tr -d ' -')
    # shellcheck disable=SC2086
    timeout 100 megamoe-forward-bench-wip --model flash --layers 4 --batches 1 --contexts 1024 --prefill 0 --steps 10 \
        --trace 400 $v > "$out/trace-$tag.log" 2>&1
    printf 'trace [%s]: ' "$v"; grep -E "trace:" "$out/trace-$tag.log"
done
