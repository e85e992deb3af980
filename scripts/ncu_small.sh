#!/usr/bin/env bash
# Nsight Compute on the small-T expert path's two kernels (megamoe-gemm-bench --moe-small, V4-Flash,
# T = 1, each kernel alone, caches flushed; ncu locks the clocks at base).
#   usage (on the GPU machine, repository root, carry .device):
#     bash scripts/ncu_small.sh [nvfp4|mxfp4]            throughput, occupancy and stall reasons per issued instruction
#     bash scripts/ncu_small.sh [nvfp4|mxfp4] --source   per-SASS-instruction counters as CSV into $OUT (or /tmp)
set -uo pipefail
source scripts/device_env.sh
fmt=${1:-nvfp4}
out=${OUT:-/tmp}
cd /tmp
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
bench=(megamoe-gemm-bench --part experts --model flash --format "$fmt" --T 1 --moe-small --no-check --replays 1)
if [ "${2:-}" = --source ]; then
    for k in moe_small_l1 moe_small_l2; do
        timeout 200 "$NCU" --kernel-name "regex:$k" --launch-count 1 --section SourceCounters --page source \
            --print-source sass --csv "${bench[@]}" > "$out/$k.csv" 2> "$out/$k.err"
        echo "$k: rc $?, $(wc -l < "$out/$k.csv") lines in $out/$k.csv"
    done
    exit 0
fi
stalls=""
for r in barrier long_scoreboard short_scoreboard wait math_pipe_throttle mio_throttle lg_throttle not_selected selected \
         dispatch_stall membar sleeping branch_resolving no_instruction drain imc_miss tex_throttle misc; do
    stalls="$stalls,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio"
done
timeout 240 "$NCU" --kernel-name regex:moe_small_l --launch-count 2 \
    --metrics "gpu__time_duration.sum,smsp__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__warps_active.avg.per_cycle_active${stalls}" \
    "${bench[@]}" 2>&1 |
    grep -E "moe_small|duration|inst_executed|issue_active|dram__|warps_active|stalled" |
    sed -E 's/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//'
