#!/usr/bin/env bash
# The serving benchmark of docs/bench-serve.md: `megamoe serve --backend cuda` on a synthetic
# full-width V4-Flash (random weights made on the GPU; --layers of its 43 layers, as many as one
# GPU holds), driven by megamoe-serve-bench over HTTP at each concurrency of a sweep.
#   usage: scripts/bench_serve.sh OUT_DIR [layers] [concurrency list] [input len] [output len]
# Needs megamoe and megamoe-serve-bench on PATH and the tokenizer fixture at $TOKENIZER
# (default: ../shared/golden/tokenizer/tokenizer.json).
set -euo pipefail
out=${1:?usage: bench_serve.sh OUT_DIR [layers] [concurrency] [input len] [output len]}
layers=${2:-20}
conc=${3:-1,2,4,8,16,32,64,128,256}
in_len=${4:-512}
out_len=${5:-128}
tok=${TOKENIZER:-../shared/golden/tokenizer/tokenizer.json}
port=${PORT:-8765}
max_c=$(echo "$conc" | tr , '\n' | sort -n | tail -1)
mkdir -p "$out"
megamoe serve --backend cuda --synthetic flash --synthetic-layers "$layers" --tokenizer "$tok" \
    --port "$port" --max-seqs "$max_c" --max-requests 4096 --max-batch-tokens 2048 --max-model-len 4096 \
    >"$out/serve.log" 2>&1 &
srv=$!
trap 'kill $srv 2>/dev/null || true; wait $srv 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    kill -0 $srv 2>/dev/null || { cat "$out/serve.log"; exit 1; }
    sleep 1
done
curl -sf "http://127.0.0.1:$port/health" >/dev/null
# Each level sends max(8, 2 x concurrency) requests, all at once, at most `concurrency` in flight.
megamoe-serve-bench --port "$port" --endpoint completions --prompt-kind ids --tokenizer "$tok" \
    --input-len "$in_len" --output-len "$out_len" --num-prompts 8 --prompts-per-concurrency 2 \
    --concurrency "$conc" --warmup 2 --timeout 1200 \
    --title "megamoe serve --backend cuda, synthetic V4-Flash $layers layers, IN $in_len OUT $out_len" \
    --out-json "$out/bench-serve.json" --out-png "$out/bench-serve.png" 2>&1 | tee "$out/bench.txt"
curl -sf "http://127.0.0.1:$port/metrics" > "$out/metrics.txt" || true

