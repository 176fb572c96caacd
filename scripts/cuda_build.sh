#!/usr/bin/env bash
# Builds `liftoff --features cuda` (release) on a machine without a GPU or a CUDA toolkit:
# nvcc and the CUDA libraries come from PyPI, pinned to CUDA 13.0 (the GPU machines' driver;
# newer PTX would not load there), and the driver library is a generated link-time stub (the
# real libcuda.so.1 is loaded at run time). See docs/cuda.md.
#
# Output: target/cuda/release/liftoff (separate target dir: the link flags differ from the CPU
# build's). Fails if the stripped binary is over 48 MiB (the device tool carries 64 MiB; the rest
# is headroom for kernels to come).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/scripts/cache_dir.sh"
CACHE="$LIFTOFF_CACHE_DIR"
VENV="$CACHE/cuda-venv"
LINK="$CACHE/cuda-link"
TARGET="$ROOT/target/cuda"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check \
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
  'nvidia-cublas==13.0.*' 'nvidia-cuda-nvrtc==13.0.*' 'nvidia-curand<10.5' 'nvidia-nccl-cu13<2.29'
NV=$("$VENV/bin/python" -c 'import nvidia; print(list(nvidia.__path__)[0])')
CU13="$NV/cu13"
[ -x "$CU13/bin/nvcc" ] || { echo "nvcc not found under $CU13" >&2; exit 1; }

# Link directory: unversioned names for the PyPI libraries, and the libcuda stub.
mkdir -p "$LINK"
for lib in cublas cublasLt curand nvrtc cudart nccl; do
  so=$(find "$NV" -name "lib$lib.so.*" -type f | sort | head -1)
  [ -n "$so" ] || { echo "lib$lib.so not found under $NV" >&2; exit 1; }
  ln -sf "$so" "$LINK/lib$lib.so"
done
cd "$ROOT"
cargo fetch --quiet
CUDARC=$(cargo metadata --format-version 1 --features liftoff/cuda 2>/dev/null \
  | python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"))')
CUDARC=$(dirname "$CUDARC")
if [ ! -s "$LINK/libcuda.so" ] || [ "$CUDARC/src/driver/sys/mod.rs" -nt "$LINK/libcuda.so" ]; then
  python3 - "$CUDARC/src/driver/sys/mod.rs" "$LINK/cuda_stub.c" <<'PY'
import re, sys
names = sorted(set(re.findall(r"pub unsafe fn (cu[A-Za-z0-9_]+)\s*\(", open(sys.argv[1]).read())))
with open(sys.argv[2], "w") as f:
    f.write("/* Link-time stub of the CUDA driver API: never run; the real libcuda.so.1 loads instead. */\n")
    for n in names:
        f.write(f"void {n}(void) {{}}\n")
print(f"libcuda stub: {len(names)} symbols", file=sys.stderr)
PY
  cc -shared -fPIC -o "$LINK/libcuda.so" -Wl,-soname,libcuda.so.1 "$LINK/cuda_stub.c"
fi

export PATH="$CU13/bin:$PATH" CUDA_ROOT="$CU13" CUDA_PATH="$CU13" CUDA_TOOLKIT_ROOT_DIR="$CU13"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export RUSTFLAGS="-L $LINK"
# Fatbins (candle's statically linked GGUF matmul kernels, ~32 MB of sm_90a SASS) compressed for
# size: ~2.8x smaller, decompressed once when the module loads (needs a CUDA >= 12.8 driver).
# cudaforge does not see this variable, so a change of it cleans candle-kernels' cached objects.
export NVCC_APPEND_FLAGS="--compress-mode=size"
STAMP="$TARGET/nvcc-append-flags"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$NVCC_APPEND_FLAGS" ]; then
  cargo clean --release -p candle-kernels --target-dir "$TARGET" 2>/dev/null || true
  mkdir -p "$TARGET" && echo "$NVCC_APPEND_FLAGS" > "$STAMP"
fi
# The binary must fit the device tool's 64 MiB carry: thin LTO, and the crates no step runs
# (tokenizers, regexes, HTTP, TLS, the hub client, templates) optimised for size.
SMALL=(tokenizers onig onig_sys fancy-regex regex-automata regex-syntax hf-hub reqwest ureq
  rustls ring h2 hyper axum minijinja minijinja-contrib serde_yaml_ng plotters image ab_glyph
  clap_builder tracing-subscriber prometheus)
CONFIG=(--config 'profile.release.lto="thin"')
for c in "${SMALL[@]}"; do
  CONFIG+=(--config "profile.release.package.$c.opt-level=\"s\"")
done
cargo build --release --features cuda -p liftoff --target-dir "$TARGET" "${CONFIG[@]}"
BIN="$TARGET/release/liftoff"
strip "$BIN"
size=$(stat -c %s "$BIN")
echo "built $BIN ($((size / 1048576)) MiB, stripped)"
if [ "$size" -gt $((48 * 1048576)) ]; then
  echo "the CUDA binary is over its 48 MiB budget (the device tool carries 64 MiB)" >&2
  exit 1
fi
