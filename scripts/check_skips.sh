#!/usr/bin/env bash
# check_skips.sh — fails when the last ctest run in BUILD_DIR skipped a test for any reason other
# than a missing GPU (GPU tests GTEST_SKIP with "no CUDA device", "no GPU" or "built without
# CUDA"). A skip for missing golden data, a missing Node.js client or a fixture would otherwise
# pass silently.
#
#   scripts/check_skips.sh BUILD_DIR
set -euo pipefail
log=${1:?usage: scripts/check_skips.sh BUILD_DIR}/Testing/Temporary/LastTest.log
[ -f "$log" ] || { echo "check_skips: no $log (run ctest first)" >&2; exit 1; }
# LastTest.log: per test "N/M Test: NAME", its output, where gtest writes "FILE:LINE: Skipped"
# then the reason on the next line.
awk '
    /^[0-9]+\/[0-9]+ Test: / { name = $3; next }
    /: Skipped$/ { want = 1; next }
    want == 1 {
        want = 0
        total++
        if ($0 ~ /^(no CUDA device|no GPU|built without CUDA)/) { gpu++; next }
        bad++
        printf "check_skips: %s skipped: %s\n", name, $0
    }
    END {
        printf "check_skips: %d skipped, %d of them GPU tests without a GPU\n", total, gpu
        exit bad > 0
    }' "$log"
