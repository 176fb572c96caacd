#!/usr/bin/env bash
# GPU checks and benchmark, run ON the GPU machine (no Rust toolchain needed): the release
# binary built elsewhere with scripts/cuda_build.sh, PyPI's CUDA 13 libraries from the
# machine's PyTorch, transformers for the references. Each stage fits one 10-minute call of
# the device tool; results go to OUT (default /tmp/liftoff-gpu).
#
#   benches/gpu.sh BIN kernels   liftoff kernel-check on cuda:0 (every kernel vs its reference)
#   benches/gpu.sh BIN logits    random Llama-3.2-1B (bf16): liftoff vs transformers, same prompts
#   benches/gpu.sh BIN serve     random Llama-3.1-8B (bf16): liftoff at concurrency 1, 16, 64,
#                                transformers' batch-1 generate, and the bandwidth bound
set -euo pipefail
BIN=$(realpath "$1")
STAGE=$2
OUT=${OUT:-/tmp/liftoff-gpu}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
NV=$(python3 -c 'import nvidia, os; print(list(nvidia.__path__)[0])')
LD_LIBRARY_PATH=$(find "$NV" -name 'lib*.so*' -printf '%h\n' | sort -u | paste -sd:):${LD_LIBRARY_PATH:-}
export LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"

checkpoint() { # preset dir
  [ -f "$2/config.json" ] || python3 scripts/make_bench_checkpoint.py "$1" "$2" --dtype bf16 --device cuda
}

wait_health() {
  for _ in $(seq 1 600); do curl -sf "$1" >/dev/null && return 0; sleep 0.5; done
  echo "server at $1 did not start" >&2; return 1
}

case "$STAGE" in
  kernels)
    "$BIN" kernel-check --device cuda:0 | tee "$OUT/kernel_check.txt"
    ;;
  logits)
    checkpoint llama-3.2-1b "$OUT/llama-3.2-1b"
    python3 benches/gpu_logits.py "$BIN" "$OUT/llama-3.2-1b" | tee "$OUT/logits.txt"
    ;;
  serve)
    checkpoint llama-3.1-8b "$OUT/llama-3.1-8b"
    "$BIN" serve --model "$OUT/llama-3.1-8b" --device cuda --dtype bf16 --host 127.0.0.1 \
      --port 18200 --management-port 18201 --max-batch-size 64 --max-sequence-length 2048 \
      >"$OUT/serve.log" 2>&1 &
    PID=$!
    trap 'kill $PID 2>/dev/null || true' EXIT
    wait_health http://127.0.0.1:18200/health
    "$BIN" bench run --url http://127.0.0.1:18200 --label "liftoff (GPU)" --concurrency 1,16,64 \
      --max-tokens 128 --out "$OUT/serving_liftoff_gpu.json"
    curl -s http://127.0.0.1:18201/metrics > "$OUT/metrics.txt"
    kill $PID; wait $PID 2>/dev/null || true
    python3 benches/gpu_transformers_generate.py "$OUT/llama-3.1-8b" --max-new-tokens 128 \
      | tee "$OUT/transformers_generate.txt"
    "$BIN" bench plot "$OUT/serving_liftoff_gpu.json" --out "$OUT/serving_gpu.png"
    ;;
  *) echo "unknown stage '$STAGE' (kernels, logits, serve)" >&2; exit 2 ;;
esac
