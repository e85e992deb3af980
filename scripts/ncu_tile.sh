#!/usr/bin/env bash
# Nsight Compute on one kernel of a megamoe-gemm-bench expert-layer run (each launch alone, caches
# flushed, clocks locked at base): the sections the earlier profiles of the prefill tiles read
# (docs/bench-gemm.md: tensor pipe, issue, warp states, memory), or with --source the per-SASS
# counters (stall samples per instruction) as CSV into $OUT.
#   usage (on the GPU machine, repository root, carry .device):
#     bash scripts/ncu_tile.sh KERNEL_REGEX [--source] -- BENCH_ARGS...
#   e.g. bash scripts/ncu_tile.sh wgmma_rf8_kernel -- --format mxfp4 --numerics official --T 4096 --config wgmma_rf8_128x128
#   (the first matching launch is L1, the second L2: --launch-count 1 takes L1).
set -uo pipefail
source scripts/device_env.sh
kernel=${1:?kernel name regex}
shift
source_mode=0
if [ "${1:-}" = --source ]; then source_mode=1; shift; fi
[ "${1:-}" = -- ] && shift
out=${OUT:-/tmp}
cd /tmp || exit 1
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
bench=(megamoe-gemm-bench --part experts --model flash --no-check --replays 1 "$@")
tag=$(echo "$kernel" | tr -c 'A-Za-z0-9_' '_')
if [ "$source_mode" = 1 ]; then
    timeout 300 "$NCU" --kernel-name "regex:$kernel" --launch-count 1 --section SourceCounters --page source \
        --print-source sass --csv "${bench[@]}" > "$out/ncu-$tag.csv" 2> "$out/ncu-$tag.err"
    echo "$kernel: rc $?, $(wc -l < "$out/ncu-$tag.csv") lines in $out/ncu-$tag.csv"
    exit 0
fi
timeout 300 "$NCU" --kernel-name "regex:$kernel" --launch-count 1 --section SpeedOfLight --section SchedulerStats \
    --section WarpStateStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis "${bench[@]}" \
    > "$out/ncu-$tag.log" 2>&1
echo "$kernel: rc $? (full report in $out/ncu-$tag.log)"
grep -E "Duration|Throughput|Pipe|Issue|Eligible|Active Warps|Warp Cycles|Stall|Tensor|L1/TEX Hit|L2 Hit|Bank" \
    "$out/ncu-$tag.log" | head -60
