#!/usr/bin/env bash
# leak_check.sh — a long `megamoe serve` run: thousands of requests (chat and completions,
# streaming and not, streams the client abandons mid-way, malformed and refused requests), with the
# server's resident memory sampled as it goes. Fails if memory keeps growing after warm-up (the
# last sample more than GROWTH_PCT% above the one after the first tenth of the requests) or if a
# sanitizer build reports a leak or an error when the server exits (SIGTERM, drained).
#
#   scripts/leak_check.sh BUILD_DIR [REQUESTS [GROWTH_PCT]]
#
# Requests go two at a time (two clients, so the engine batches them and a request meets others
# in flight); LEAK_CLIENTS sets how many.
# BUILD_DIR holds a built `megamoe` (a Release build measures memory; an ASan build, whose
# quarantine holds freed memory, checks for leaks at exit; a TSan build checks the server's
# threads under this load). Needs curl and ../shared/golden's tokenizer.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:?usage: scripts/leak_check.sh BUILD_DIR [REQUESTS [GROWTH_PCT]]}
total=${2:-3000}
growth_pct=${3:-10}
bin=$build/megamoe
tok=../shared/golden/tokenizer/tokenizer.json
[ -x "$bin" ] || { echo "leak_check: no $bin" >&2; exit 1; }
[ -f "$tok" ] || { echo "leak_check: no $tok" >&2; exit 1; }

work=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
"$bin" synth --out "$work/model" --vocab 6016 --layers 2 --seed 9 >/dev/null
cp "$tok" "$work/model/"
ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}:log_path=$work/sanitizer-asan \
TSAN_OPTIONS=${TSAN_OPTIONS:-second_deadlock_stack=1}:log_path=$work/sanitizer-tsan \
UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}:log_path=$work/sanitizer-ubsan \
    "$bin" serve --model "$work/model" --port 0 --backend cpu --max-model-len 512 --max-body-bytes 65536 \
    --max-requests 64 >"$work/server.log" 2>&1 &
pid=$!
port=
for _ in $(seq 600); do
    port=$(grep -o 'listening on http://[^ ]*:[0-9]*' "$work/server.log" | grep -o '[0-9]*$' || true)
    [ -n "$port" ] && curl -sf "localhost:$port/health" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -sf "localhost:$port/health" >/dev/null || { cat "$work/server.log"; echo "leak_check: the server did not come up" >&2; exit 1; }
url=http://127.0.0.1:$port
rss() { awk '/^VmRSS/ {print $2}' /proc/$pid/status; }

# One request of each kind in turn (i mod 8).
request() {
    local i=$1
    case $((i % 8)) in
        0) curl -s -o /dev/null "$url/v1/chat/completions" -H 'Content-Type: application/json' \
               -d "{\"messages\":[{\"role\":\"user\",\"content\":\"hello $i\"}],\"max_tokens\":8,\"seed\":$i,\"temperature\":0.8}" ;;
        1) curl -s -N -o /dev/null "$url/v1/chat/completions" -H 'Content-Type: application/json' \
               -d "{\"messages\":[{\"role\":\"user\",\"content\":\"stream $i\"}],\"max_tokens\":8,\"stream\":true,\"stream_options\":{\"include_usage\":true},\"logprobs\":true,\"top_logprobs\":2}" ;;
        2) curl -s -o /dev/null "$url/v1/completions" -H 'Content-Type: application/json' \
               -d "{\"prompt\":\"once upon $i\",\"max_tokens\":6,\"n\":3,\"logprobs\":3,\"stop\":[\"e\"]}" ;;
        3) # a stream the client abandons: long generation, cut once its first events have arrived
           # (head closes the pipe after 300 bytes; curl stops on its next write)
           curl -s -N --max-time 10 "$url/v1/completions" -H 'Content-Type: application/json' \
               -d "{\"prompt\":\"abort $i\",\"max_tokens\":400,\"ignore_eos\":true,\"stream\":true}" |
               head -c 300 >/dev/null || true ;;
        4) curl -s -o /dev/null "$url/v1/chat/completions" -H 'Content-Type: application/json' -d '{"messages": [' ;;
        5) curl -s -o /dev/null "$url/v1/chat/completions" -H 'Content-Type: application/json' \
               -d "{\"messages\":[{\"role\":\"robot\",\"content\":\"x\"}],\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"parameters\":{}}}]}" ;;
        6) head -c 70000 /dev/zero | tr '\0' 'a' | curl -s -o /dev/null "$url/v1/completions" \
               -H 'Content-Type: application/json' --data-binary @- ;;
        7) curl -s -o /dev/null "$url/v1/models"; curl -s -o /dev/null "$url/nope"; curl -s -o /dev/null "$url/metrics" ;;
    esac
}

start=$(rss)
warm=
printf 'leak_check: %d requests; VmRSS (KiB) after each tenth:\n' "$total"
printf '  %6s %10s\n' requests rss_kib
printf '  %6s %10s\n' 0 "$start"
step=$(( total / 10 > 0 ? total / 10 : 1 ))
clients=${LEAK_CLIENTS:-2}
t0=$(date +%s)
next_sample=$step
for (( i = 1; i <= total; i += clients )); do
    pids=()
    for (( j = i; j < i + clients && j <= total; ++j )); do request "$j" & pids+=($!); done
    for p in "${pids[@]}"; do wait "$p"; done   # the requests only (the server is a background job too)
    if (( i + clients - 1 >= next_sample || i + clients > total )); then
        r=$(rss)
        printf '  %6d %10d\n' "$(( i + clients - 1 < total ? i + clients - 1 : total ))" "$r"
        [ -z "$warm" ] && warm=$r
        next_sample=$(( next_sample + step ))
    fi
done
last=$(rss)
elapsed=$(( $(date +%s) - t0 ))
curl -sf "$url/health" >/dev/null || { echo "leak_check: the server stopped answering" >&2; exit 1; }
kill -TERM $pid
wait $pid || { echo "leak_check: the server exited with status $?" >&2; tail -5 "$work/server.log"; exit 1; }
pid=
status=0
growth=$(( (last - warm) * 100 / warm ))
printf 'leak_check: %d requests in %d s; VmRSS start %d KiB, after warm-up %d KiB, end %d KiB (%+d%%)\n' \
    "$total" "$elapsed" "$start" "$warm" "$last" "$growth"
if (( growth > growth_pct )); then
    echo "leak_check: memory grew more than $growth_pct% after warm-up" >&2
    status=1
fi
if ls "$work"/sanitizer-* >/dev/null 2>&1; then
    echo "leak_check: sanitizer reports from the server:" >&2
    cat "$work"/sanitizer-* >&2
    status=1
fi
[ $status -eq 0 ] && echo "leak_check: ok (memory flat, no sanitizer report)"
exit $status
