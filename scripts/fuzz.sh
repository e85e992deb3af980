#!/usr/bin/env bash
# fuzz.sh — builds the libFuzzer targets (fuzz/) and runs each for a given time, printing
# executions, coverage and crashes per target.
#
#   scripts/fuzz.sh SECONDS [BUILD_DIR [TARGET...]]
#
# Each target runs for SECONDS of wall time in one process (one core: libFuzzer without -jobs);
# FUZZ_JOBS targets run at once (default: the number of cores), so on N cores every target still
# gets a core of its own for its whole time, and the run takes SECONDS x ceil(targets / N).
# BUILD_DIR (default build-fuzz) is configured with clang, -DMEGAMOE_FUZZ=ON and CPU only. Each
# target starts from its seed corpus (fuzz/corpus/<target>, read only) and grows its own in
# out/fuzz/<target>; a crashing input is saved as out/fuzz/crash-<target>-*. The run fails
# (status 1) if any target crashed, leaked or timed out on an input.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:?usage: scripts/fuzz.sh SECONDS [BUILD_DIR [TARGET...]]}
build=${2:-build-fuzz}
shift $(( $# >= 2 ? 2 : 1 ))
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(safetensors_fuzz config_fuzz checkpoint_json_fuzz tokenizer_load_fuzz
                                     tokenizer_text_fuzz chat_request_fuzz completion_fuzz http_request_fuzz)

cmake -S . -B "$build" -DMEGAMOE_FUZZ=ON -DMEGAMOE_TESTS=OFF -DMEGAMOE_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ >/dev/null
cmake --build "$build" -j"$(nproc)" --target "${targets[@]}" >/dev/null

mkdir -p out/fuzz
jobs=${FUZZ_JOBS:-$(nproc)}

# One target: its log in out/fuzz/TARGET.log, its table row in out/fuzz/TARGET.row.
run_target() {
    local t=$1 corpus=out/fuzz/$1 log=out/fuzz/$1.log status=0
    mkdir -p "$corpus"
    local args=(-max_total_time="$secs" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048
                -artifact_prefix="out/fuzz/crash-$t-")
    [ -f "fuzz/dict/$t.dict" ] && args+=(-dict="fuzz/dict/$t.dict")
    local seeds=()
    [ -d "fuzz/corpus/$t" ] && seeds=("fuzz/corpus/$t")
    "./$build/fuzz/$t" "${args[@]}" "$corpus" "${seeds[@]}" >"$log" 2>&1 || status=$?
    local execs cov ft rate result=ok
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || true)
    ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || true)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
    {
        [ "$status" -ne 0 ] && result="FAILED (status $status; see $log)"
        printf '%-22s %8s %12s %8s %8s %8s %s\n' "$t" "$secs" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "$result"
        if [ "$status" -ne 0 ]; then
            grep -m3 -E 'ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer)|runtime error|invariant failed' "$log" | sed 's/^/    /' || true
        fi
    } >"out/fuzz/$t.row"
    return "$status"
}

for t in "${targets[@]}"; do
    rm -f "out/fuzz/$t.row"
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
    run_target "$t" &
done
wait || true
failed=0
printf '%-22s %8s %12s %8s %8s %8s %s\n' target seconds executions exec/s cov ft result
for t in "${targets[@]}"; do
    if [ -f "out/fuzz/$t.row" ]; then
        cat "out/fuzz/$t.row"
        grep -q FAILED "out/fuzz/$t.row" && failed=1
    else
        printf '%-22s no result\n' "$t"
        failed=1
    fi
done
exit $failed
