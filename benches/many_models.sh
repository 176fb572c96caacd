#!/usr/bin/env bash
# Many models on one server under a memory budget vs one server per model (see
# benches/many_models.py). Makes N random `many-small` checkpoints once (24M parameters each,
# different seeds) in the cache, builds the release binary, writes docs/bench/many_models.{json,png}.
#
# Usage: benches/many_models.sh [N_MODELS] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cache_dir.sh
N=${1:-12}
OUT=${2:-docs/bench}
PY=$(scripts/reference_venv.sh)
"$PY" -c "import matplotlib, httpx" 2>/dev/null ||
  "$PY" -m pip install --quiet --disable-pip-version-check matplotlib httpx >&2
DIR="$LIFTOFF_CACHE_DIR/many-models"
MODELS=()
for i in $(seq 0 $((N - 1))); do
  M="$DIR/m$i"
  [ -f "$M/config.json" ] || "$PY" scripts/make_bench_checkpoint.py many-small "$M" --seed "$i" >&2
  MODELS+=("$M")
done
cargo build --release -p liftoff >&2
"$PY" benches/many_models.py --bin target/release/liftoff --models "${MODELS[@]}" --out "$OUT"
