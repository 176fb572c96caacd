#!/usr/bin/env bash
# Creates (once) the Python venv with Hugging Face transformers that the reference scripts use.
# Prints the venv's python.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/cache_dir.sh"
VENV="${LIFTOFF_REF_VENV:-$LIFTOFF_CACHE_DIR/venv}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import transformers, torch, gguf" 2>/dev/null; then
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    torch==2.15.0 transformers==5.23.0 gguf==0.19.0 accelerate tokenizers safetensors numpy >&2
fi
echo "$VENV/bin/python"
