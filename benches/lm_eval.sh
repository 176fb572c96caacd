#!/usr/bin/env bash
# EleutherAI's lm-evaluation-harness against liftoff's OpenAI API (`local-completions`), on the
# two small local tasks in tests/lm_eval/: liftoff_mc (multiple choice: loglikelihood requests,
# /v1/completions with echo + logprobs) and liftoff_qa (generate_until, exact match).
#
# Installs the pinned lm-eval into the reference venv (scripts/reference_venv.sh), fetches the
# default model, builds target/release/liftoff if it is missing or older than the sources,
# starts `liftoff serve` on free loopback ports, converts the GGUF's tokenizer into a temporary
# Hugging Face tokenizer folder (lm-eval tokenizes prompts itself and sends token ids), runs
# lm_eval fully offline and prints its results table. Exits non-zero if lm_eval fails or a task
# has no result.
#
# Usage: benches/lm_eval.sh [TASKS] [extra lm_eval arguments, e.g. --limit 5 --log_samples]
#   TASKS: comma-separated, default liftoff_mc,liftoff_qa
#   LIFTOFF_BIN=path: use this binary as it is (no build)
#   LIFTOFF_SERVE_ARGS="--device cpu ...": extra `liftoff serve` arguments
#   LM_EVAL_OUTPUT=dir: keep lm_eval's output (results JSON, samples) there; else a temp dir
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cache_dir.sh
LM_EVAL_VERSION=0.4.13
TASKS=${1:-liftoff_mc,liftoff_qa}
shift || true

PY=$(scripts/reference_venv.sh)
VENV_BIN=$(dirname "$PY")
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('lm_eval') != '$LM_EVAL_VERSION')" 2>/dev/null ||
  ! "$PY" -c "import aiohttp, tenacity" 2>/dev/null; then
  echo "installing lm-eval[api]==$LM_EVAL_VERSION into $(dirname "$VENV_BIN")" >&2
  "$PY" -m pip install --quiet --disable-pip-version-check "lm-eval[api]==$LM_EVAL_VERSION" >&2
fi

MODEL=$(scripts/fetch_default_model.sh)

if [ -n "${LIFTOFF_BIN:-}" ]; then
  BIN=$LIFTOFF_BIN
else
  BIN=target/release/liftoff
  if [ ! -x "$BIN" ] || [ -n "$(find engine kernels server launcher Cargo.toml Cargo.lock -type f -newer "$BIN" -print -quit)" ]; then
    cargo build --release -p liftoff >&2
  fi
fi

TMP=$(mktemp -d)
SERVER_PID=
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT
OUT=${LM_EVAL_OUTPUT:-$TMP/out}

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

# The model's own tokenizer (from the GGUF's metadata, as scripts/make_reference.py reads it),
# saved as a Hugging Face tokenizer folder and checked against the ids in the tokenizer fixture.
"$PY" - "$MODEL" "$TMP/tokenizer" tests/fixtures/reference/smollm2_tokenizer.json <<'PY'
import json, os, sys
from transformers import AutoTokenizer
gguf, out, fixture = sys.argv[1:]
AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf)).save_pretrained(out)
tok = AutoTokenizer.from_pretrained(out)
bad = [c["text"] for c in json.load(open(fixture))["cases"]
       if tok(c["text"], add_special_tokens=False).input_ids != c["ids"]]
if bad:
    sys.exit(f"the converted tokenizer disagrees with {fixture} on {bad}")
PY

read -r PORT MPORT < <("$PY" -c "
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(('127.0.0.1', 0))
print(*[x.getsockname()[1] for x in s])")
# shellcheck disable=SC2086
TAKEOFF_LOG_LEVEL=${TAKEOFF_LOG_LEVEL:-warn} "$BIN" serve --model "$MODEL" --host 127.0.0.1 \
  --port "$PORT" --management-port "$MPORT" ${LIFTOFF_SERVE_ARGS:-} >"$TMP/server.log" 2>&1 &
SERVER_PID=$!
for i in $(seq 600); do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "liftoff exited:" >&2; tail -20 "$TMP/server.log" >&2; exit 1
  fi
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
  [ "$i" = 600 ] && { echo "liftoff did not become healthy in 120 s" >&2; exit 1; }
  sleep 0.2
done
SERVED=$(curl -sf "http://127.0.0.1:$PORT/v1/models" | "$PY" -c "import json, sys; print(json.load(sys.stdin)['data'][0]['id'])")
echo "liftoff $BIN serving $SERVED on 127.0.0.1:$PORT; tasks $TASKS" >&2

start=$(date +%s)
set +e
"$VENV_BIN/lm_eval" --model local-completions \
  --model_args "model=$SERVED,base_url=http://127.0.0.1:$PORT/v1/completions,tokenizer_backend=huggingface,tokenizer=$TMP/tokenizer,num_concurrent=4,max_retries=1" \
  --tasks "$TASKS" --include_path tests/lm_eval --output_path "$OUT" "$@" 2>"$TMP/lm_eval.log"
rc=$?
set -e
echo "lm_eval: exit $rc in $(($(date +%s) - start)) s" >&2
if [ "$rc" != 0 ]; then
  echo "--- lm_eval's log (errors) ---" >&2
  grep -E "ERROR|WARNING|Error:|Exception" "$TMP/lm_eval.log" | grep -v "Session is closed" | cut -c1-400 | sort | uniq -c | head -20 >&2
  tail -5 "$TMP/lm_eval.log" >&2
  exit "$rc"
fi
# Every task asked for must have a result with at least one metric.
"$PY" - "$OUT" "$TASKS" <<'PY'
import glob, json, os, sys
out, tasks = sys.argv[1], sys.argv[2].split(",")
files = sorted(glob.glob(os.path.join(out, "**", "results_*.json"), recursive=True), key=os.path.getmtime)
if not files:
    sys.exit(f"no results file under {out}")
results = json.load(open(files[-1])).get("results", {})
missing = [t for t in tasks if not any(k != "alias" and isinstance(v, (int, float)) for k, v in results.get(t, {}).items())]
if missing:
    sys.exit(f"no result for {missing} in {files[-1]}")
PY
