set -uo pipefail
source scripts/device_env.sh
cd /tmp
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
$NCU --version | tail -1
for k in moe_small_l1 moe_small_l2; do
  timeout 200 $NCU --kernel-name regex:$k --launch-count 1 --section SourceCounters --page source --print-source sass --csv \
    megamoe-gemm-bench --part experts --model flash --format nvfp4 --T 1 --moe-small --no-check --replays 1 > $OUT/$k.csv 2> $OUT/$k.err
  echo "$k rc=$? $(wc -l < $OUT/$k.csv) lines"; head -c 600 $OUT/$k.csv; echo
done
