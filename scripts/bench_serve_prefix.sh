#!/usr/bin/env bash
# Prefix caching and preemption under load (docs/bench-serve.md): requests that share a long
# prefix (a system prompt of PREFIX token ids, then UNIQUE ids of their own), served with and
# without --no-prefix-caching, then with a state pool too small for every running request
# (--max-state-tokens), which forces preemption. Same synthetic V4-Flash as bench_serve.sh.
#   usage: scripts/bench_serve_prefix.sh OUT_DIR [layers] [concurrency] [prefix] [unique] [output]
set -euo pipefail
out=${1:?usage: bench_serve_prefix.sh OUT_DIR [layers] [concurrency] [prefix] [unique] [output]}
layers=${2:-20}
conc=${3:-16}
prefix=${4:-2048}
unique=${5:-64}
out_len=${6:-64}
tok=${TOKENIZER:-../shared/golden/tokenizer/tokenizer.json}
port=${PORT:-8766}
mkdir -p "$out"
n=$(( conc * 4 ))
# The prompts: one shared prefix of token ids, then ids of each request's own (fixed seeds).
awk -v n="$n" -v P="$prefix" -v U="$unique" -v O="$out_len" 'BEGIN {
    srand(1); pre = ""; for (i = 0; i < P; i++) pre = pre (i ? "," : "") (1000 + int(rand() * 4000));
    for (r = 0; r < n; r++) { s = pre; for (i = 0; i < U; i++) s = s "," (1000 + int(rand() * 4000));
        printf "{\"prompt\": [%s], \"max_tokens\": %d}\n", s, O } }' > "$out/prompts.jsonl"
run() {   # name, extra serve flags...
    local name=$1
    shift
    megamoe serve --backend cuda --synthetic flash --synthetic-layers "$layers" --tokenizer "$tok" --port "$port" \
        --max-seqs "$conc" --max-requests 4096 --max-batch-tokens 2048 --max-model-len 4096 "$@" >"$out/$name.log" 2>&1 &
    local srv=$!
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
        kill -0 $srv 2>/dev/null || { cat "$out/$name.log"; exit 1; }
        sleep 1
    done
    megamoe-serve-bench --port "$port" --endpoint completions --prompts "$out/prompts.jsonl" --concurrency "$conc" \
        --warmup 1 --timeout 1200 --out-json "$out/$name.json" > "$out/$name.txt" 2>&1 || true
    curl -sf "http://127.0.0.1:$port/metrics" | grep -E '^megamoe_(prefix|num_preemptions|cache_usage)' > "$out/$name.metrics" || true
    kill $srv; wait $srv 2>/dev/null || true
    echo "== $name"; tail -n 3 "$out/$name.txt"; cat "$out/$name.metrics"
}
run prefix-on
run prefix-off --no-prefix-caching
# A pool of a quarter of what the running requests need, nothing shared (prefix caching off, which
# would share the prefix's blocks): preemption.
need=$(( conc * (prefix + unique + out_len) ))
run preempt --no-prefix-caching --max-state-tokens $(( need / 4 > 4096 ? need / 4 : 4096 ))
