#!/usr/bin/env bash
# Copies the CUDA libraries the CUDA binary loads (`readelf -d`: cuBLAS + cuBLASLt, cuRAND,
# the CUDA runtime, NCCL; the driver's libcuda.so.1 comes from the host) from the PyPI wheels
# `scripts/cuda_build.sh` installed into DEST: the exact versions the binary was built against.
# Usage: scripts/cuda_runtime_libs.sh DEST
set -euo pipefail
DEST=${1:?usage: $0 DEST}
. "$(dirname "$0")/cache_dir.sh"
PY="$LIFTOFF_CACHE_DIR/cuda-venv/bin/python"
[ -x "$PY" ] || { echo "no CUDA venv at $LIFTOFF_CACHE_DIR/cuda-venv: run scripts/cuda_build.sh first" >&2; exit 1; }
NV=$("$PY" -c 'import nvidia; print(list(nvidia.__path__)[0])')
mkdir -p "$DEST"
for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13 libnccl.so.2; do
  so=$(find "$NV" -name "$lib" | sort | head -1)
  [ -n "$so" ] || { echo "$lib not found under $NV" >&2; exit 1; }
  cp -L "$so" "$DEST/$lib"
done
