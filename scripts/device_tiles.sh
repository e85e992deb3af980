#!/usr/bin/env bash
# On the GPU machine, from the repository root, after scripts/device_pack.sh packed a build here
# (carry .device): the GEMM / expert-layer tests, then megamoe-gemm-bench's V4-Flash expert layer
# for pairs of tiles (a baseline and a candidate) in one call, each command under its own timeout
# so that a hang costs its slot, not the device call. Full logs go to $OUT (what the device tool
# brings back); the lines that matter go to stdout.
#   usage: scripts/device_tiles.sh [pair ...]
#   pair:  FORMAT:NUMERICS:TS:BASELINE:CANDIDATE, e.g. mxfp4:official:4096,16384:wgmma_ws_256x128:wgmma_f8_128x128
#   Without pairs: the W4A8 tiles against the register-A tiles of their token counts (official
#   numerics, MXFP4), at T = 4096, 16384 and T = 1024.
set -uo pipefail
root=$PWD
# shellcheck source=/dev/null
source scripts/device_env.sh
out=${OUT:-/tmp/megamoe-out}
mkdir -p "$out"
pairs=("$@")
[ ${#pairs[@]} -eq 0 ] && pairs=("mxfp4:official:4096,16384:wgmma_ws_256x128:wgmma_f8_128x128"
                                 "mxfp4:official:1024:wgmma_256x32:wgmma_f8_128x32")
cd /tmp || exit 1
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader

echo "== tests"
timeout "${TESTS_TIMEOUT:-300}" megamoe_tests --gtest_filter="${TESTS_FILTER:-W4a8.*:CudaGemm*:CudaMoeLayer*:CudaLinear*}" \
    > "$out/tests.log" 2>&1
echo "tests rc=$? (124: timed out)"
grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[  FAILED  \]|wgmma_f8|W4A8|Failure" "$out/tests.log" | head -60

for p in "${pairs[@]}"; do
    IFS=: read -r fmt nm ts base cand <<< "$p"
    for tile in "$base" "$cand"; do
        log="$out/bench-$fmt-$nm-$tile-${ts//,/_}.log"
        echo "== bench $fmt $nm T=$ts $tile"
        timeout "${BENCH_TIMEOUT:-180}" megamoe-gemm-bench --part experts --model flash --format "$fmt" --numerics "$nm" \
            --T "$ts" --config "$tile" > "$log" 2>&1
        echo "bench rc=$? (124: timed out)"
        grep -E "check |T=[0-9]+ .* us |out of bound" "$log" | grep -v "cuBLAS" | head -12
    done
done
cd "$root" || exit 1
