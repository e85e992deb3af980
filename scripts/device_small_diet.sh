#!/usr/bin/env bash
# One device call (carry .device, made by scripts/device_pack.sh with the previous build's
# megamoe-gemm-bench and megamoe-forward-bench added as *-old): the small-T expert path's tests, then
# the expert layer alone and the batch-1/2 step, previous build against this one, in rounds.
#   packing (here): bash scripts/device_pack.sh build tiny-flash-nvfp4 tiny-flash-mxfp4, then unpack
#   .device/pack.tar.xz, add the previous build's two benches to its bin/ as megamoe-gemm-bench-old and
#   megamoe-forward-bench-old, drop bin/megamoe and re-pack (under the 64 MiB a run carries)
#   usage (on the GPU machine, repository root): bash scripts/device_small_diet.sh [layers]
set -uo pipefail
source scripts/device_env.sh
layers=${1:-8}
nvidia-smi --query-gpu=name --format=csv,noheader
cd /tmp
timeout 200 megamoe_tests --gtest_filter='CudaMoeLayer.SmallPath*:CudaMoeLayer.L1L2MatchCpuTwin*:Golden/GpuRunner.IndexerSideStreamEqualsMainStream/*' 2>&1 |
    grep -E "^\[  (PASSED|FAILED) |FAILED|Failure" | head -30
for r in 1 2; do
    for b in old new; do
        bin=megamoe-gemm-bench; [ $b = old ] && bin=megamoe-gemm-bench-old
        printf 'experts round %s %s: ' "$r" "$b"
        timeout 60 $bin --part experts --model flash --format nvfp4,mxfp4 --T 1,2 --moe-small --no-check 2>/dev/null |
            grep -E "^\| flash" | awk -F'|' '{printf "%s T=%s %s us (%s)  ", $3, $4, $6, $10}'
        echo
    done
done
for run in nvfp4:exact:1 nvfp4:exact:2 mxfp4:exact:1 nvfp4:official:1; do
    IFS=: read -r f nm r <<< "$run"
    for b in old new; do
        bin=megamoe-forward-bench; [ $b = old ] && bin=megamoe-forward-bench-old
        printf '%s %s round %s %s: ' "$f" "$nm" "$r" "$b"
        timeout 45 $bin --model flash --layers "$layers" --batches 1,2 --contexts 1024 --prefill 0 \
            --steps 20 --experts "$f" --numerics "$nm" 2>/dev/null | grep -E "^decode B=" | awk '{printf "%s %s us %s  ", $2, $4, $NF}'
        echo
    done
done
