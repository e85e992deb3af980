#!/usr/bin/env bash
# One device call (carry .device, made by scripts/device_pack.sh with the golden cases the GPU tests
# read): where main stands on this GPU. Every GPU test (the CPU-only suites are CI's), the
# decode step of as many V4-Flash layers as fit (20 on an H200, 8 on an H100's 80 GB) at batch 1-256,
# exact and official, CUPTI timelines of one step at batch 1, 64, 256 (8 layers), and the expert
# layer at T = 1-256.
# Full outputs go to $OUT (tests.log, forward-*.log, table-*.log, trace.log, experts.log); a summary
# to stdout. "table": the docs' full megamoe-forward-bench rows (V4-Flash, and V4-Pro at 4 layers on an
# H200, 2 on an H100).
#   usage (on the GPU machine, repository root): bash scripts/device_status.sh [layers] [what ...]
#   what: tests attn sampler hc forward table trace experts (default: tests forward trace experts)
#   TESTS: a gtest filter for "tests" (default: every GPU suite); TRACE_BATCHES, TRACE_LINES: the
#   trace's batches (default 1,64,256) and timeline lines (400)
set -uo pipefail
source scripts/device_env.sh
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "$gpu"
layers=${1:-}
shift || true
[ -z "$layers" ] && { case "$gpu" in *H200*) layers=20 ;; *) layers=8 ;; esac; }
what=("$@")
[ ${#what[@]} -eq 0 ] && what=(tests forward trace experts)
out=${OUT:-/tmp/out}
mkdir -p "$out"
cd /tmp
has() { local w; for w in "${what[@]}"; do [ "$w" = "$1" ] && return 0; done; return 1; }
if has tests; then
    filter=${TESTS:-'Cuda*:*Gpu*:*Attention*:IndexerTopk*:MoeDispatch*:W4a8*:Dist*:TopkRows*'}
    start=$(date +%s)
    timeout 420 megamoe_tests --gtest_filter="$filter" > "$out/tests.log" 2>&1
    echo "tests: rc $? in $(( $(date +%s) - start )) s"
    grep -E "^\[  (PASSED|FAILED|SKIPPED) \]|^\[==========\]|FAILED TEST" "$out/tests.log" | tail -20
fi
if has forward; then
    for run in exact:1:1,2,4,8,64,256 exact:2:1,2,4 official:1:1,2,4,8,64,256; do
        IFS=: read -r nm r bs <<< "$run"
        printf '%s round %s (%s layers): ' "$nm" "$r" "$layers"
        timeout 150 megamoe-forward-bench --model flash --layers "$layers" --batches "$bs" --contexts 1024 \
            --prefill 0 --steps 20 --numerics "$nm" > "$out/forward-$nm-$r.log" 2>&1
        grep -E "^decode B=|with every logit" "$out/forward-$nm-$r.log" |
            awk '/^decode/ {printf "%s %s us %s", $2, $4, $NF} /with every/ {printf " [logits %s, launch %s]  ", $11, $(NF-1)}'
        grep -E "copy bandwidth" "$out/forward-$nm-$r.log" | head -1 | sed 's/^# */ | /'
    done
fi
if has attn; then   # the attention's 16-head CTAs against its 64-head ones, in the whole step
    for r in 1 2; do
        for w in 0 1; do
            timeout 120 megamoe-forward-bench --model flash --layers "$layers" --batches 64,256 --contexts 1024 \
                --prefill 8192 --steps 10 --attn-wide "$w" > "$out/attn-$w-$r.log" 2>&1
            printf 'attn-wide %s round %s: ' "$w" "$r"
            grep -E "^decode B=|^prefill" "$out/attn-$w-$r.log" | awk '{printf "%s %s %s %s | ", $1, $2, $3, $4}'
            echo
        done
    done
fi
if has sampler; then   # the sampler's pass A over parts of each row (the default) against one CTA per row
    for r in 1 2; do
        for sp in 0 -1; do
            printf 'sample-parts %s round %s: ' "$sp" "$r"
            timeout 90 megamoe-forward-bench --model flash --layers "$layers" --batches 1,2,4,8 --contexts 1024 \
                --prefill 0 --steps 20 --sample-parts "$sp" 2>/dev/null | grep -E "^decode B=" | awk '{printf "%s %s us  ", $2, $4}'
            echo
        done
    done
fi
if has hc; then   # the mHC mix with fn staged through shared memory (the default) against loads from L2
    for st in 0 1; do
        printf 'hc-stage %s: ' "$st"
        timeout 100 megamoe-forward-bench --model flash --layers "$layers" --batches 64,256 --contexts 1024 \
            --prefill 8192 --steps 10 --hc-stage "$st" > "$out/hc-$st.log" 2>&1
        grep -E "^decode B=|^prefill|with every" "$out/hc-$st.log" |
            awk '/^decode/ {printf "%s %s us  ", $2, $4} /^prefill/ {printf "prefill %s us  ", $3} /with every/ {printf "(launch %s)  ", $(NF-1)}'
        echo
    done
fi
if has table; then   # the docs' table: every default row (batches 1-256, contexts 1K and 32K, 8K prefill)
    timeout 240 megamoe-forward-bench --model flash --layers "$layers" > "$out/table-flash.log" 2>&1
    echo "table flash: rc $?"; grep -E "^decode|^prefill|copy bandwidth" "$out/table-flash.log"
    pro_layers=4; [ "$layers" -lt 20 ] && pro_layers=2
    timeout 150 megamoe-forward-bench --model pro --layers "$pro_layers" > "$out/table-pro.log" 2>&1
    echo "table pro: rc $?"; grep -E "^decode|^prefill|copy bandwidth" "$out/table-pro.log"
fi
if has trace; then
    timeout 120 megamoe-forward-bench --model flash --layers 8 --batches "${TRACE_BATCHES:-1,64,256}" --contexts 1024 \
        --prefill 0 --steps 10 --trace "${TRACE_LINES:-400}" > "$out/trace.log" 2>&1
    echo "trace: rc $?"; grep -E "trace:|^decode B=" "$out/trace.log" | head -12
fi
if has experts; then
    timeout 150 megamoe-gemm-bench --part experts --model flash --format nvfp4,mxfp4 --T 1,4,16,64,256 --no-check \
        > "$out/experts.log" 2>&1
    echo "experts: rc $?"; grep -E "^\| flash" "$out/experts.log" | awk -F'|' '{printf "%s T=%s %s us (%s)\n", $3, $4, $6, $10}'
fi
