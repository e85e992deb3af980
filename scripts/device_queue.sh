#!/usr/bin/env bash
# The measurements sessions without a device machine left for the next GPU call (the ninth,
# 2026-12-07: tests, persist, w4a8, skip, linears; the eleventh, 2026-12-08: rf8, prio), in stages
# that each fit one device call (600 s), each command under its own timeout so that a hang
# (a barrier that never completes) costs its slot, not the call. Full logs go to $OUT; the table
# rows (megamoe-gemm-bench's markdown, "| flash | ...") and the tests' verdicts to stdout.
#   packing (here): bash scripts/device_pack.sh build tiny-flash-nvfp4 tiny-flash-mxfp4 official-tiny-mxfp4
#   usage (on the GPU machine, repository root, carry .device): bash scripts/device_queue.sh STAGE ...
#   stages:
#     tests    the ninth session's tests first (persistent tiles, W4A8 repeat runs, skipped column tiles), then
#              the expert-layer tests that run every tile against the CPU twins            (~4-6 min)
#     persist  wgmma_ws_256x128 against wgmma_pws_256x128, V4-Flash NVFP4 and
#              MXFP4, T = 4096, 16384, two rounds                                          (~5 min)
#     w4a8     MXFP4, official numerics: the W4A8 tiles (one-tile and persistent) against the
#              register-A tiles of their token counts, T = 1024, 4096, 16384               (~3 min)
#     skip     mma_256x32 / mma_256x48 with --skip-dead 0 and 1, T = 768-2048, uniform and
#              --skew 0.3 routing, and the automatic choice                               (~4 min)
#     rf8      (eleventh session, 2026-12-08) the register-A W4A8 tiles wgmma_rf8_128x128 / wgmma_rf8_128x32:
#              their tests first (W4A8, the quantize order), then MXFP4 official against the automatic
#              choice and the shared-memory W4A8 tiles at T = 1024, 2048, 4096, 16384, the rf8 rows
#              checked against the CPU's official layer before timing, two rounds            (~5 min)
#     prio     (eleventh session) RunnerOptions::stream_priority: its test, then the 8-layer V4-Flash
#              step at batch 1 and 2 with --stream-priority 0 and 1 alternated, exact and official,
#              two rounds, and a batch-1 timeline of each                                   (~5 min)
#     linears  the small-M linears whose ring kernel splits K over a cluster (grouped wo_a, NVFP4 and
#              MXFP4 wq_b / shared w1) at M = 1-16, this build and, when packed beside it as
#              megamoe-gemm-bench-old (scripts/device_repack.sh old=DIR, a build of 1f94d2c), the
#              previous one, alternated, two rounds: linear_small_m's relaxed closing barrier (~3 min)
#   Then the standing measures: bash scripts/device_status.sh (every GPU test, the 20-layer
#   V4-Flash step on an H200: issue 8's table).
set -uo pipefail
# shellcheck source=/dev/null
source scripts/device_env.sh
out=${OUT:-/tmp/megamoe-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
cd /tmp || exit 1

bench() {   # name timeout args...: one megamoe-gemm-bench run, its rows to stdout
    local name=$1 t=$2
    shift 2
    timeout "$t" megamoe-gemm-bench --part experts --model flash "$@" > "$out/$name.log" 2>&1
    local rc=$?
    printf '%-44s rc=%s\n' "$name" "$rc"
    grep -E "^\| flash|check|bound" "$out/$name.log" | grep -v "^| model" | head -12
}

for stage in "$@"; do
    echo "== $stage"
    case "$stage" in
        tests)
            timeout 240 megamoe_tests --gtest_filter='CudaMoeLayer.PersistentTiles*:CudaMoeLayer.W4a8TilesGiveTheSameBits*:CudaMoeLayer.SkipDead*' \
                > "$out/tests-new.log" 2>&1
            echo "new tests rc=$? (124: timed out)"
            grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]|Failure|mismatch" "$out/tests-new.log" | head -30
            timeout 300 megamoe_tests --gtest_filter='CudaMoeLayer.L1L2MatchCpuTwin*:CudaMoeLayer.W4a8*:W4a8.*:CudaGemm.*' \
                > "$out/tests-tiles.log" 2>&1
            echo "tile tests rc=$? (124: timed out)"
            grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]|Failure" "$out/tests-tiles.log" | head -30
            ;;
        persist)
            for r in 1 2; do
                bench "persist-ws-r$r" 120 --format nvfp4,mxfp4 --T 4096,16384 --no-check --config wgmma_ws_256x128
                bench "persist-pws-r$r" 120 --format nvfp4,mxfp4 --T 4096,16384 --no-check --config wgmma_pws_256x128
            done
            ;;
        w4a8)
            o=(--format mxfp4 --numerics official)
            bench "w4a8-1024-reg" 60 "${o[@]}" --T 1024 --config wgmma_256x32
            bench "w4a8-1024-auto" 60 "${o[@]}" --T 1024
            bench "w4a8-1024-f8" 60 "${o[@]}" --T 1024 --config wgmma_f8_128x32
            bench "w4a8-1024-pf8" 60 "${o[@]}" --T 1024 --config wgmma_pf8_128x32
            bench "w4a8-big-reg" 90 "${o[@]}" --T 4096,16384 --no-check --config wgmma_ws_256x128
            bench "w4a8-big-f8" 90 "${o[@]}" --T 4096,16384 --no-check --config wgmma_f8_128x128
            bench "w4a8-big-pf8" 90 "${o[@]}" --T 4096,16384 --no-check --config wgmma_pf8_128x128
            ;;
        rf8)
            timeout 240 megamoe_tests --gtest_filter='W4a8.*:CudaNumerics.QuantizeGemmInput*:CudaMoeLayer.W4a8*' \
                > "$out/tests-rf8.log" 2>&1
            echo "rf8 tests rc=$? (124: timed out)"
            grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]|Failure|rf8" "$out/tests-rf8.log" | head -30
            o=(--format mxfp4 --numerics official)
            for r in 1 2; do
                chk=(); [ "$r" = 2 ] && chk=(--no-check)
                bench "rf8-mid-auto-r$r" 60 "${o[@]}" --T 1024,2048 --no-check
                bench "rf8-mid-pf8-r$r" 60 "${o[@]}" --T 1024,2048 --no-check --config wgmma_pf8_128x32
                bench "rf8-mid-rf8-r$r" 90 "${o[@]}" --T 1024,2048 "${chk[@]}" --config wgmma_rf8_128x32
                bench "rf8-big-auto-r$r" 90 "${o[@]}" --T 4096,16384 --no-check
                bench "rf8-big-pf8-r$r" 90 "${o[@]}" --T 4096,16384 --no-check --config wgmma_pf8_128x128
                bench "rf8-big-rf8-r$r" 120 "${o[@]}" --T 4096,16384 "${chk[@]}" --config wgmma_rf8_128x128
            done
            ;;
        prio)
            timeout 200 megamoe_tests --gtest_filter='Golden/GpuRunner.StreamPriorityGivesTheSameLogits/*' \
                > "$out/tests-prio.log" 2>&1
            echo "prio tests rc=$? (124: timed out)"
            grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]|Failure" "$out/tests-prio.log" | head -10
            for r in 1 2; do
                for nm in exact official; do
                    for v in 0 1; do
                        timeout 100 megamoe-forward-bench --model flash --layers 8 --batches 1,2 --contexts 1024 --prefill 0 \
                            --steps 20 --numerics "$nm" --stream-priority "$v" > "$out/prio-$nm-$v-r$r.log" 2>&1
                        printf 'step %s priority=%s round %s rc=%s: ' "$nm" "$v" "$r" "$?"
                        grep -E "^decode B=" "$out/prio-$nm-$v-r$r.log" | awk '{printf "%s %s us (%s)  ", $2, $4, $NF}'
                        echo
                    done
                done
            done
            for v in 0 1; do
                timeout 100 megamoe-forward-bench --model flash --layers 4 --batches 1 --contexts 1024 --prefill 0 --steps 10 \
                    --trace 400 --stream-priority "$v" > "$out/prio-trace-$v.log" 2>&1
                printf 'trace priority=%s: ' "$v"; grep -E "trace:" "$out/prio-trace-$v.log"
            done
            ;;
        skip)
            for s in 0 0.3; do
                bench "skip-auto-s$s" 60 --format nvfp4,mxfp4 --T 768,1024,1536,2048 --skew "$s" --no-check
                for t in mma_256x32 mma_256x48; do
                    bench "skip-$t-s$s" 60 --format nvfp4,mxfp4 --T 768,1024,1536,2048 --skew "$s" --no-check --config "$t" \
                        --skip-dead 0
                    bench "skip-$t-s$s-dead" 60 --format nvfp4,mxfp4 --T 768,1024,1536,2048 --skew "$s" --no-check \
                        --config "$t" --skip-dead 1
                done
            done
            ;;
        linears)
            bins=(megamoe-gemm-bench)
            command -v megamoe-gemm-bench-old > /dev/null && bins=(megamoe-gemm-bench-old megamoe-gemm-bench)
            for r in 1 2; do
                for b in "${bins[@]}"; do
                    timeout 120 "$b" --part linears --model flash --shape wo_a,wq_b,sh.w1 --format fp8,nvfp4,mxfp4 \
                        --M 1,2,4,8,16 --no-check > "$out/linears-$b-r$r.log" 2>&1
                    echo "linears $b round $r rc=$?"
                    grep -E "^\| flash" "$out/linears-$b-r$r.log" | awk -F'|' '{printf "  %s %s %s M=%s %s us\n", $3, $4, $5, $6, $7}'
                done
            done
            ;;
        *) echo "unknown stage '$stage' (tests persist w4a8 skip linears)" ;;
    esac
done
